//! `lora-dash selftest`: the logits of the tiny reference models (LLaMA, BERT, DeBERTa-v2/v3)
//! on a device, against the golden files written by transformers (`tests/golden`). It checks
//! a build on a machine without a Rust toolchain, e.g. a CUDA binary on a GPU
//! (`scripts/gpu-check.sh`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::io::{self, Weights};
use crate::models::{Ctx, HeadSpec, Model};

#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// The golden directory (the repository's `tests/golden`).
    #[arg(long, default_value = "tests/golden")]
    pub golden: PathBuf,
    /// cpu (default), cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Largest accepted difference, relative to the largest reference value.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
}

/// max |got − want| / max |want| over every element.
fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f64> {
    rel_diff_kept(got, want, None)
}

/// [`rel_diff`] over the positions `keep` (b, t) marks with 1 (logits (b, t, v)): padding
/// positions have no reference value.
fn rel_diff_kept(got: &Tensor, want: &Tensor, keep: Option<&Tensor>) -> Result<f64> {
    let g = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let w = want.to_dtype(DType::F32)?;
    if g.dims() != w.dims() {
        return Err(Error::ShapeMismatch {
            name: "selftest logits".into(),
            expected: w.dims().to_vec(),
            got: g.dims().to_vec(),
        });
    }
    let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6) as f64;
    let mut diff = (g - &w)?.abs()?;
    if let Some(k) = keep {
        diff = diff.broadcast_mul(&k.to_dtype(DType::F32)?.unsqueeze(2)?)?;
    }
    let d = diff.max_all()?.to_scalar::<f32>()? as f64;
    Ok(d / scale)
}

fn load_on(dir: &Path, head: &HeadSpec, dev: &Device) -> Result<Box<dyn Model>> {
    let mut loaded = io::load_model(&dir.to_string_lossy())?;
    loaded.weights = crate::device::place(&loaded.weights, dev)?;
    crate::models::load(&loaded, head)
}

fn golden(dir: &Path, name: &str) -> Result<Weights> {
    Weights::load_safetensors(&dir.join(name))
}

fn encoder_batch(g: &Weights, dev: &Device) -> Result<Batch> {
    let ids = g.get("input_ids")?.to_dtype(DType::U32)?;
    let mask = g.get("attention_mask")?;
    let n_tokens = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
    let b = ids.dims()[0];
    Batch {
        input_ids: ids,
        attention_mask: mask.to_dtype(DType::F32)?,
        token_type_ids: Some(g.get("token_type_ids")?.to_dtype(DType::U32)?),
        labels: Tensor::zeros(b, DType::I64, &Device::Cpu)?,
        n_tokens,
        n_target_tokens: b,
    }
    .to_device(dev)
}

fn set_head(m: &dyn Model, path: &str, g: &Weights, prefix: &str) -> Result<()> {
    let h = m
        .heads()
        .into_iter()
        .find(|h| h.path == path)
        .ok_or_else(|| Error::msg(format!("selftest: the model has no `{path}` head")))?;
    h.set(
        g.get(&format!("{prefix}{path}.weight"))?,
        g.get(&format!("{prefix}{path}.bias"))?,
    )
}

/// Runs every check, prints one line each, and fails when one is over `tol`.
pub fn run(args: &SelftestArgs) -> Result<()> {
    let dev = crate::device::select(&args.device)?;
    let dir = &args.golden;
    let seq = |n| HeadSpec::Sequence {
        num_labels: n,
        classifier_dropout: Some(0.0),
        seed: 1,
    };
    let ctx = Ctx::eval();
    let mut results: Vec<(String, f64)> = Vec::new();

    // LLaMA: right- and left-padded batches.
    let g = golden(dir, "tiny_logits.safetensors")?;
    let m = load_on(&dir.join("tiny-llama"), &HeadSpec::CausalLm, &dev)?;
    let lm = m
        .as_causal_lm()
        .ok_or_else(|| Error::msg("selftest: tiny-llama is not a causal LM"))?;
    let ids = |k: &str| -> Result<Tensor> { Ok(g.get(k)?.to_dtype(DType::U32)?.to_device(&dev)?) };
    let on = |k: &str| -> Result<Tensor> { Ok(g.get(k)?.to_device(&dev)?) };
    let right = lm.forward(&ids("input_ids")?, Some(&on("attention_mask")?), &ctx)?;
    let right = rel_diff_kept(&right, g.get("logits")?, Some(g.get("attention_mask")?))?;
    results.push(("llama logits".into(), right));
    let h = lm.forward_hidden(
        &ids("input_ids_left")?,
        Some(&on("attention_mask_left")?),
        Some(&ids("position_ids_left")?),
        None,
        &ctx,
    )?;
    results.push((
        "llama logits, left padding".into(),
        rel_diff_kept(
            &lm.logits(&h, &ctx)?,
            g.get("logits_left")?,
            Some(g.get("attention_mask_left")?),
        )?,
    ));

    // BERT with its classifier.
    let g = golden(dir, "bert_tiny_golden.safetensors")?;
    let m = load_on(&dir.join("tiny-bert"), &seq(3), &dev)?;
    set_head(m.as_ref(), "classifier", &g, "")?;
    let bt = encoder_batch(&g, &dev)?;
    let cls = m
        .as_classifier()
        .ok_or_else(|| Error::msg("selftest: tiny-bert is not a classifier"))?;
    results.push((
        "bert logits".into(),
        rel_diff(&cls.classify(&bt, &ctx)?, g.get("logits")?)?,
    ));

    // DeBERTa-v2/v3 configs (disentangled attention, log buckets, c2p/p2c).
    let g = golden(dir, "deberta_tiny_golden.safetensors")?;
    let bt = encoder_batch(&g, &dev)?;
    for name in ["tiny-deberta-v3", "tiny-deberta-v2", "tiny-deberta-p2c"] {
        let m = load_on(&dir.join(name), &seq(3), &dev)?;
        for head in ["pooler.dense", "classifier"] {
            set_head(m.as_ref(), head, &g, &format!("{name}."))?;
        }
        let cls = m
            .as_classifier()
            .ok_or_else(|| Error::msg(format!("selftest: {name} is not a classifier")))?;
        let want = g.get(&format!("{name}.logits"))?;
        results.push((
            format!("{name} logits"),
            rel_diff(&cls.classify(&bt, &ctx)?, want)?,
        ));
    }

    let mut failed = 0;
    for (what, d) in &results {
        let ok = *d <= args.tol;
        failed += usize::from(!ok);
        println!(
            "{} {what}: max rel diff {d:.2e} (tol {:.0e})",
            if ok { "ok  " } else { "FAIL" },
            args.tol
        );
    }
    println!(
        "selftest on {}: {} of {} checks passed",
        args.device,
        results.len() - failed,
        results.len()
    );
    if failed > 0 {
        return Err(Error::msg(format!(
            "selftest: {failed} check(s) over tolerance"
        )));
    }
    Ok(())
}
