//! LoRA-Dash adapters on disk.
//!
//! Native form (continues training, keeps the selection): `dash_config.json` and
//! `dash_adapter.safetensors` with, per layer, PEFT's `lora_A.weight` / `lora_B.weight` keys
//! plus `dash_U` (out, s), `dash_V` (in, s), `dash_c` (s). The config holds t, s, the
//! LoRA settings, the selected indices and a content hash of each base weight, so loading
//! onto another base fails clearly.
//!
//! Export form (any LoRA runtime): a plain PEFT LoRA of rank r+s with scale 1,
//! B' = [(α/r)·B | U_s·diag(c)], A' = [A; V_sᵀ], r' = lora_alpha' = r+s.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapters::{Adapter, DashLayer, LoraConfig, LoraLayer, TargetModules};
use crate::error::{Error, IoContext, Result};
use crate::io::peft::{
    check_task_type, insert_heads, key, peft_config_for, take_heads, CONFIG_FILE as PEFT_CONFIG,
    WEIGHTS_FILE as PEFT_WEIGHTS,
};
use crate::io::{atomic, Weights};
use crate::models::Model;

pub const CONFIG_FILE: &str = "dash_config.json";
pub const WEIGHTS_FILE: &str = "dash_adapter.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DashLayerInfo {
    pub indices: Vec<usize>,
    /// SHA-256 of the frozen base weight (see `tsd::svd::weight_hash`).
    pub base_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DashAdapterConfig {
    pub method: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub t: usize,
    pub s: usize,
    pub freeze_ab: bool,
    pub layers: BTreeMap<String, DashLayerInfo>,
    /// PEFT task type of the run (`CAUSAL_LM`, or `SEQ_CLS` with trained heads).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Trained heads saved beside the adapters (PEFT's `modules_to_save` keys).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

impl DashAdapterConfig {
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

/// Writes the native Dash adapter of `model` into `dir`.
pub fn save_native(
    model: &dyn Model,
    lora: &LoraConfig,
    t: usize,
    s: usize,
    freeze_ab: bool,
    base: Option<String>,
    dir: &Path,
) -> Result<()> {
    let mut w = Weights::new(None);
    let mut layers = BTreeMap::new();
    for l in model.linears() {
        if let Some(d) = l.adapter.as_ref().and_then(Adapter::as_dash) {
            w.insert(key(&l.path, "lora_A.weight"), d.lora.a.as_tensor().clone());
            w.insert(key(&l.path, "lora_B.weight"), d.lora.b.as_tensor().clone());
            w.insert(key(&l.path, "dash_U"), d.u_s.clone());
            w.insert(key(&l.path, "dash_V"), d.v_s.clone());
            w.insert(key(&l.path, "dash_c"), d.c.as_tensor().clone());
            layers.insert(
                l.path.clone(),
                DashLayerInfo {
                    indices: d.indices.clone(),
                    base_hash: l.base_hash()?,
                },
            );
        }
    }
    if layers.is_empty() {
        return Err(Error::msg("the model has no Dash adapter to save"));
    }
    insert_heads(model, &mut w);
    let peft = peft_config_for(model, lora, None);
    let cfg = DashAdapterConfig {
        task_type: peft.task_type,
        modules_to_save: peft.modules_to_save.unwrap_or_default(),
        method: "lora-dash".into(),
        base_model_name_or_path: base,
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        use_rslora: lora.use_rslora,
        target_modules: lora.target_modules.clone(),
        t,
        s,
        freeze_ab,
        layers,
    };
    w.save_safetensors(&dir.join(WEIGHTS_FILE), None)?;
    atomic::write_file(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )
}

/// Attaches the native Dash adapter in `dir`; every base weight must hash as recorded.
pub fn load_native(model: &mut dyn Model, dir: &Path) -> Result<DashAdapterConfig> {
    let cpath = dir.join(CONFIG_FILE);
    let cfg: DashAdapterConfig = serde_json::from_str(&std::fs::read_to_string(&cpath).at(&cpath)?)
        .map_err(|e| Error::format(&cpath, format!("invalid Dash adapter config: {e}")))?;
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
        let hash = l.base_hash()?;
        if hash != info.base_hash {
            return Err(Error::format(
                &cpath,
                format!("layer `{}` was trained on a different base weight (hash mismatch): wrong --model for this adapter?", l.path),
            ));
        }
        let s = info.indices.len();
        let (o, i, r) = (l.out_dim(), l.in_dim(), cfg.r);
        let dev = l.weight.device().clone();
        let mut take = |name: &str, shape: &[usize]| -> Result<candle_core::Tensor> {
            let k = key(&l.path, name);
            let t = w.get_shaped(&k, shape)?;
            w.remove(&k);
            Ok(t.to_device(&dev)?)
        };
        let a = take("lora_A.weight", &[r, i])?;
        let b = take("lora_B.weight", &[o, r])?;
        let u = take("dash_U", &[o, s])?;
        let v = take("dash_V", &[i, s])?;
        let c = take("dash_c", &[s])?;
        let lora = LoraLayer::from_tensors(&a, &b, scale, cfg.lora_dropout)?;
        let d = DashLayer::new(lora, u, v, info.indices.clone(), cfg.freeze_ab)?;
        d.c.set(&c)?;
        l.adapter = Some(Adapter::Dash(d));
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

/// Writes the rank-(r+s) PEFT export of every Dash layer into `dir`.
pub fn save_peft_export(
    model: &dyn Model,
    lora: &LoraConfig,
    s: usize,
    base: Option<String>,
    dir: &Path,
) -> Result<()> {
    let mut w = Weights::new(None);
    for l in model.linears() {
        if let Some(d) = l.adapter.as_ref().and_then(Adapter::as_dash) {
            let (a2, b2) = d.export_lora()?;
            w.insert(key(&l.path, "lora_A.weight"), a2);
            w.insert(key(&l.path, "lora_B.weight"), b2);
        }
    }
    if w.is_empty() {
        return Err(Error::msg("the model has no Dash adapter to export"));
    }
    insert_heads(model, &mut w);
    let r2 = lora.r + s;
    let export = LoraConfig {
        r: r2,
        alpha: r2 as f64,
        dropout: lora.dropout,
        use_rslora: false,
        target_modules: lora.target_modules.clone(),
    };
    let meta = [("format".to_string(), "pt".to_string())].into();
    w.save_safetensors(&dir.join(PEFT_WEIGHTS), Some(meta))?;
    let json = serde_json::to_string_pretty(&peft_config_for(model, &export, base))?;
    atomic::write_file(&dir.join(PEFT_CONFIG), json.as_bytes())
}

/// Attaches whatever adapter `dir` holds: a native Dash or PiSSA / MiLoRA adapter, a PEFT
/// LoRA adapter, or a lora-dash run directory (its native adapter or LoRA adapter).
pub fn load_any(model: &mut dyn Model, dir: &Path) -> Result<String> {
    if dir.join(CONFIG_FILE).exists() {
        load_native(model, dir)?;
        return Ok("lora-dash".into());
    }
    if dir.join(crate::io::pissa::CONFIG_FILE).exists() {
        let cfg = crate::io::pissa::load_native(model, dir)?;
        return Ok(cfg.method.name().into());
    }
    if dir.join(PEFT_CONFIG).exists() {
        crate::io::peft::load_lora(model, dir)?;
        return Ok("lora".into());
    }
    if !dir.exists() {
        return Err(Error::io(
            dir,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    Err(Error::format(
        dir,
        format!(
            "holds no adapter ({PEFT_CONFIG}, {CONFIG_FILE} or {})",
            crate::io::pissa::CONFIG_FILE
        ),
    ))
}

/// The head a model needs to take the adapter in `dir`: a sequence head with the number
/// of labels its trained classifier has (SEQ_CLS adapters), else none beyond the base's.
pub fn head_spec_of(dir: &Path) -> Result<crate::models::HeadSpec> {
    use crate::models::HeadSpec;
    let (task_type, wpath) = if dir.join(CONFIG_FILE).exists() {
        let cpath = dir.join(CONFIG_FILE);
        let cfg: DashAdapterConfig =
            serde_json::from_str(&std::fs::read_to_string(&cpath).at(&cpath)?)
                .map_err(|e| Error::format(&cpath, format!("invalid Dash adapter config: {e}")))?;
        (cfg.task_type, dir.join(WEIGHTS_FILE))
    } else if dir.join(crate::io::pissa::CONFIG_FILE).exists() {
        (
            crate::io::pissa::PissaAdapterConfig::read(dir)?.task_type,
            dir.join(crate::io::pissa::WEIGHTS_FILE),
        )
    } else if dir.join(PEFT_CONFIG).exists() {
        (
            crate::io::peft::PeftConfig::read(dir)?.task_type,
            dir.join(PEFT_WEIGHTS),
        )
    } else {
        return Ok(HeadSpec::Base);
    };
    if task_type.as_deref() != Some(crate::io::peft::SEQ_CLS) {
        return Ok(HeadSpec::Base);
    }
    let w = Weights::load_safetensors(&wpath)?;
    let k = key("classifier", "weight");
    let num_labels = w
        .get(&k)
        .map_err(|_| {
            Error::format(
                &wpath,
                format!("is a SEQ_CLS adapter without a trained classifier (`{k}`)"),
            )
        })?
        .dims()
        .first()
        .copied()
        .unwrap_or(0);
    Ok(HeadSpec::Sequence {
        num_labels,
        classifier_dropout: None,
        seed: 0,
    })
}
