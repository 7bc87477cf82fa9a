//! PiSSA / MiLoRA adapters on disk.
//!
//! Native form (continues training, merges onto the base it was made from):
//! `pissa_config.json` and `pissa_adapter.safetensors` with, per layer, PEFT's
//! `lora_A.weight` / `lora_B.weight` keys (the trained factors) plus `lora_A0` / `lora_B0`
//! (the initial ones). The residual is not stored: it is W − (s·B₀)·A₀, recomputed from the
//! base on load with the same operations as at init, so it is bit-identical to the one
//! trained on. The config records the residual's provenance per layer: the hash of the
//! original W (a different base is refused), the singular triplets taken, and the hash of
//! the residual itself (checked after recomputing it).
//!
//! Export form (any LoRA runtime, on the **original** base): PEFT's
//! `save_pretrained(path_initial_model_for_weight_conversion=...)` conversion
//! (`LoraModel.subtract_mutated_init`): A' = [A; A₀], B' = [B | −B₀], r' = 2r,
//! lora_alpha' = 2α (√2·α with rsLoRA), so the scale and ΔW = s·(B·A − B₀·A₀) are kept.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapters::pissa::residual_of;
use crate::adapters::{Adapter, LoraConfig, LoraLayer, PissaLayer, SvdInit, TargetModules};
use crate::error::{Error, IoContext, Result};
use crate::io::atomic::{self, StagedDir};
use crate::io::peft::{
    check_task_type, insert_heads, key, peft_config_for, take_heads, CONFIG_FILE as PEFT_CONFIG,
    WEIGHTS_FILE as PEFT_WEIGHTS,
};
use crate::io::Weights;
use crate::models::Model;
use crate::tsd::svd::weight_hash;

pub const CONFIG_FILE: &str = "pissa_config.json";
pub const WEIGHTS_FILE: &str = "pissa_adapter.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PissaLayerInfo {
    /// Singular triplets of W (descending σ) that seeded A₀, B₀.
    pub indices: Vec<usize>,
    /// SHA-256 of the original base weight (see `tsd::svd::weight_hash`).
    pub base_hash: String,
    /// SHA-256 of the residual W − s·B₀·A₀ trained on.
    pub residual_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PissaAdapterConfig {
    /// `pissa` or `milora`.
    pub method: SvdInit,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub layers: BTreeMap<String, PissaLayerInfo>,
    /// PEFT task type of the run (`CAUSAL_LM`, or `SEQ_CLS` with trained heads).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Trained heads saved beside the adapters (PEFT's `modules_to_save` keys).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

impl PissaAdapterConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let cpath = dir.join(CONFIG_FILE);
        serde_json::from_str(&std::fs::read_to_string(&cpath).at(&cpath)?)
            .map_err(|e| Error::format(&cpath, format!("invalid PiSSA adapter config: {e}")))
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
        }
    }
}

fn pissa_layers(model: &dyn Model) -> Vec<(&str, &PissaLayer, &candle_core::Tensor)> {
    model
        .linears()
        .into_iter()
        .filter_map(|l| {
            l.adapter
                .as_ref()
                .and_then(Adapter::as_pissa)
                .map(|p| (l.path.as_str(), p, &l.weight))
        })
        .collect()
}

/// Writes the native adapter into `dir` (which must exist).
pub fn save_native(
    model: &dyn Model,
    lora: &LoraConfig,
    base: Option<String>,
    dir: &Path,
) -> Result<()> {
    let mut w = Weights::new(None);
    let mut layers = BTreeMap::new();
    let mut method = None;
    for (path, p, residual) in pissa_layers(model) {
        w.insert(key(path, "lora_A.weight"), p.lora.a.as_tensor().clone());
        w.insert(key(path, "lora_B.weight"), p.lora.b.as_tensor().clone());
        w.insert(key(path, "lora_A0"), p.a0.clone());
        w.insert(key(path, "lora_B0"), p.b0.clone());
        layers.insert(
            path.to_string(),
            PissaLayerInfo {
                indices: p.indices.clone(),
                base_hash: p.base_hash.clone(),
                residual_hash: weight_hash(residual)?,
            },
        );
        method = Some(p.init);
    }
    let Some(method) = method else {
        return Err(Error::msg(
            "the model has no PiSSA / MiLoRA adapter to save",
        ));
    };
    insert_heads(model, &mut w);
    let peft = peft_config_for(model, lora, None);
    let cfg = PissaAdapterConfig {
        method,
        base_model_name_or_path: base,
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        use_rslora: lora.use_rslora,
        target_modules: lora.target_modules.clone(),
        layers,
        task_type: peft.task_type,
        modules_to_save: peft.modules_to_save.unwrap_or_default(),
    };
    w.save_safetensors(&dir.join(WEIGHTS_FILE), None)?;
    atomic::write_file(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )
}

/// Writes the rank-2r PEFT LoRA for the original base into `dir` (which must exist).
pub fn save_peft_export(
    model: &dyn Model,
    lora: &LoraConfig,
    base: Option<String>,
    dir: &Path,
) -> Result<()> {
    let mut w = Weights::new(None);
    for (path, p, _) in pissa_layers(model) {
        let (a2, b2) = p.export_lora()?;
        w.insert(key(path, "lora_A.weight"), a2);
        w.insert(key(path, "lora_B.weight"), b2);
    }
    if w.is_empty() {
        return Err(Error::msg(
            "the model has no PiSSA / MiLoRA adapter to export",
        ));
    }
    insert_heads(model, &mut w);
    let export = LoraConfig {
        r: 2 * lora.r,
        alpha: if lora.use_rslora {
            lora.alpha * 2f64.sqrt()
        } else {
            2.0 * lora.alpha
        },
        ..lora.clone()
    };
    let meta = [("format".to_string(), "pt".to_string())].into();
    w.save_safetensors(&dir.join(PEFT_WEIGHTS), Some(meta))?;
    let json = serde_json::to_string_pretty(&peft_config_for(model, &export, base))?;
    atomic::write_file(&dir.join(PEFT_CONFIG), json.as_bytes())
}

/// A finished run's files: the native adapter in `out` and the PEFT export in
/// `out/<export_dir>`, written whole or not at all.
pub fn save_run(
    model: &dyn Model,
    lora: &LoraConfig,
    base: Option<String>,
    out: &Path,
    export_dir: &str,
) -> Result<()> {
    save_native(model, lora, base.clone(), out)?;
    let staged = StagedDir::new(&out.join(export_dir), true)?;
    save_peft_export(model, lora, base, staged.path())?;
    staged.commit()?;
    Ok(())
}

/// Attaches the native adapter in `dir`: every adapted layer's weight must hash as the base
/// it was made from; it is replaced by the residual.
pub fn load_native(model: &mut dyn Model, dir: &Path) -> Result<PissaAdapterConfig> {
    let cpath = dir.join(CONFIG_FILE);
    let cfg = PissaAdapterConfig::read(dir)?;
    check_task_type(model, cfg.task_type.as_deref(), &cpath)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let mut w = Weights::load_safetensors(&wpath)?;
    w.check_finite()?;
    take_heads(model, &mut w, &wpath)?;
    let scale = cfg.lora_config().scale();
    let mut attached = 0;
    for l in model.linears_mut() {
        let Some(info) = cfg.layers.get(&l.path) else {
            continue;
        };
        if l.base_hash()? != info.base_hash {
            return Err(Error::format(
                &cpath,
                format!(
                    "layer `{}` was initialised from a different base weight (hash mismatch): the {} residual belongs to another --model",
                    l.path,
                    cfg.method.name()
                ),
            ));
        }
        let (o, i, r) = (l.out_dim(), l.in_dim(), cfg.r);
        if info.indices.len() != r {
            return Err(Error::format(
                &cpath,
                format!(
                    "layer `{}` lists {} triplets for r = {r}",
                    l.path,
                    info.indices.len()
                ),
            ));
        }
        let dev = l.weight.device().clone();
        let mut take = |name: &str, shape: &[usize]| -> Result<candle_core::Tensor> {
            let k = key(&l.path, name);
            let t = w.get_shaped(&k, shape)?;
            w.remove(&k);
            Ok(t.to_device(&dev)?)
        };
        let a = take("lora_A.weight", &[r, i])?;
        let b = take("lora_B.weight", &[o, r])?;
        let a0 = take("lora_A0", &[r, i])?;
        let b0 = take("lora_B0", &[o, r])?;
        let residual = residual_of(&l.weight, &a0, &b0, scale)?;
        if weight_hash(&residual)? != info.residual_hash {
            return Err(Error::format(
                &cpath,
                format!(
                    "layer `{}`: the residual W − s·B₀·A₀ recomputed from the base does not match the one trained on (residual_hash)",
                    l.path
                ),
            ));
        }
        let lora = LoraLayer::from_tensors(&a, &b, scale, cfg.lora_dropout)?;
        l.weight = residual;
        l.adapter = Some(Adapter::Pissa(PissaLayer::from_parts(
            lora,
            a0,
            b0,
            cfg.method,
            info.indices.clone(),
            info.base_hash.clone(),
        )));
        attached += 1;
    }
    if attached != cfg.layers.len() {
        return Err(Error::format(
            &cpath,
            "names layers the model does not have (adapter for another architecture?)",
        ));
    }
    if let Some(extra) = w.names().next() {
        return Err(Error::format(
            &wpath,
            format!("tensor `{extra}` belongs to no layer listed in {CONFIG_FILE}"),
        ));
    }
    Ok(cfg)
}
