//! PEFT's on-disk LoRA format, treated as public API: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` /
//! `.lora_B.weight` (A is (r, in), B is (out, r)); DoRA adapters (`use_dora: true`) add
//! `.lora_magnitude_vector` (out).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapters::{lora_scale, Adapter, DoraLayer, LoraConfig, LoraLayer, TargetModules};
use crate::error::{Error, IoContext, Result};
use crate::io::atomic;
use crate::io::Weights;
use crate::models::{Model, Objective};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";
/// DoRA's magnitude vector, as PEFT's state dict names it (adapter name and `.weight` dropped).
const MAGNITUDE: &str = "lora_magnitude_vector";
/// PEFT `task_type` of causal-LM adapters.
pub const CAUSAL_LM: &str = "CAUSAL_LM";
/// PEFT `task_type` of sequence-classification adapters (heads in `modules_to_save`).
pub const SEQ_CLS: &str = "SEQ_CLS";

/// `adapter_config.json`, read leniently; written with the keys PEFT 0.13 writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub revision: Option<String>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn bias_none() -> String {
    "none".into()
}
fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl PeftConfig {
    pub fn from_lora(cfg: &LoraConfig, base: Option<String>) -> Self {
        PeftConfig {
            peft_type: lora_type(),
            task_type: Some(CAUSAL_LM.into()),
            base_model_name_or_path: base,
            r: cfg.r,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            target_modules: Some(cfg.target_modules.clone()),
            use_rslora: cfg.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            bias: bias_none(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            inference_mode: true,
            init_lora_weights: yes(),
            layers_to_transform: None,
            layers_pattern: None,
            revision: None,
        }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let s = std::fs::read_to_string(&path).at(&path)?;
        let c: PeftConfig = serde_json::from_str(&s)
            .map_err(|e| Error::format(&path, format!("invalid adapter config: {e}")))?;
        if c.peft_type != "LORA" {
            return Err(Error::format(
                &path,
                format!("peft_type `{}` is not supported (LORA only)", c.peft_type),
            ));
        }
        if c.fan_in_fan_out {
            return Err(Error::format(
                &path,
                "fan_in_fan_out adapters (Conv1D bases) are not supported",
            ));
        }
        if c.bias != "none" {
            return Err(Error::format(
                &path,
                format!("bias = `{}` is not supported", c.bias),
            ));
        }
        Ok(c)
    }

    /// Scale for the module at `path`, honouring `rank_pattern` / `alpha_pattern` the way
    /// PEFT does (a key matches a path that ends with it).
    fn scale_for(&self, path: &str, r: usize) -> f64 {
        let alpha = pattern_lookup(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        lora_scale(alpha, r, self.use_rslora)
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: self
                .target_modules
                .clone()
                .unwrap_or(TargetModules::Pattern("all-linear".into())),
        }
    }
}

fn pattern_lookup<T: Copy>(m: &BTreeMap<String, T>, path: &str) -> Option<T> {
    m.iter()
        .find(|(k, _)| {
            regex::Regex::new(&format!(r"(^|.*\.){}$", k))
                .map(|r| r.is_match(path))
                .unwrap_or(false)
        })
        .map(|(_, v)| *v)
}

/// PEFT's key for a tensor of the module at `path`.
pub fn key(path: &str, tensor: &str) -> String {
    format!("{PREFIX}{path}.{tensor}")
}

/// The PEFT config of `model`'s adapters: `task_type` from the model's objective, trained
/// heads in `modules_to_save`.
pub fn peft_config_for(model: &dyn Model, cfg: &LoraConfig, base: Option<String>) -> PeftConfig {
    let mut c = PeftConfig::from_lora(cfg, base);
    if model.objective() != Objective::CausalLm {
        c.task_type = Some(SEQ_CLS.into());
        let heads = model.modules_to_save();
        // PEFT 0.13 resolves `all-linear` on a sequence classifier into leaf names (`dense`)
        // that also reach the heads it wraps in `modules_to_save`, and then fails to load
        // (`ModulesToSaveWrapper` has no attribute `dense`). The exact paths that carry an
        // adapter, as one full-match regex, load everywhere and mean the same layers.
        if !heads.is_empty()
            && matches!(&cfg.target_modules, TargetModules::Pattern(p) if p == "all-linear")
        {
            let paths: Vec<String> = model
                .linears()
                .into_iter()
                .filter(|l| l.adapter.is_some())
                .map(|l| regex::escape(&l.path))
                .collect();
            if !paths.is_empty() {
                c.target_modules = Some(TargetModules::Pattern(format!("^({})$", paths.join("|"))));
            }
        }
        c.modules_to_save = Some(heads);
    }
    c
}

/// Adds the trained heads of `model` to `w` under PEFT's `modules_to_save` keys
/// (`base_model.model.<module path>.weight`).
pub fn insert_heads(model: &dyn Model, w: &mut Weights) {
    for h in model.heads() {
        w.insert(key(&h.path, "weight"), h.weight.as_tensor().clone());
        w.insert(key(&h.path, "bias"), h.bias.as_tensor().clone());
    }
}

/// Loads the trained heads of `model` from `w` (removing their tensors), checking shapes:
/// an adapter trained for another number of labels fails here, naming the tensor.
pub fn take_heads(model: &dyn Model, w: &mut Weights, from: &Path) -> Result<()> {
    for h in model.heads() {
        let (kw, kb) = (key(&h.path, "weight"), key(&h.path, "bias"));
        let (Some(weight), Some(bias)) = (w.remove(&kw), w.remove(&kb)) else {
            return Err(Error::format(
                from,
                format!(
                    "has no trained `{}` head ({kw}); the model needs one for its task (adapter trained for a causal LM or another task?)",
                    h.path
                ),
            ));
        };
        for (k, t, want) in [
            (&kw, &weight, vec![h.out_dim(), h.in_dim()]),
            (&kb, &bias, vec![h.out_dim()]),
        ] {
            if t.dims() != want.as_slice() {
                return Err(Error::format(
                    from,
                    format!(
                        "tensor `{k}` has shape {:?}, the model expects {want:?} (adapter trained for another task or number of labels?)",
                        t.dims()
                    ),
                ));
            }
        }
        h.set(&weight, &bias)?;
    }
    Ok(())
}

/// Refuses an adapter whose `task_type` does not fit the model.
pub fn check_task_type(model: &dyn Model, task_type: Option<&str>, from: &Path) -> Result<()> {
    let is_cls = model.objective() != Objective::CausalLm;
    match task_type {
        Some(SEQ_CLS) if !is_cls => Err(Error::format(
            from,
            "is a sequence-classification adapter (task_type SEQ_CLS); the model is a causal LM",
        )),
        Some(CAUSAL_LM) if is_cls => Err(Error::format(
            from,
            "is a causal-LM adapter (task_type CAUSAL_LM); the model is a sequence classifier",
        )),
        _ => Ok(()),
    }
}

/// Writes the model's LoRA adapters (and trained heads) into `dir` (which must exist) in
/// PEFT's format.
pub fn save_lora(
    model: &dyn Model,
    cfg: &LoraConfig,
    base: Option<String>,
    dir: &Path,
) -> Result<()> {
    let mut w = Weights::new(None);
    let mut dora = false;
    for l in model.linears() {
        if let Some(lora) = l.adapter.as_ref().and_then(Adapter::as_lora) {
            w.insert(key(&l.path, "lora_A.weight"), lora.a.as_tensor().clone());
            w.insert(key(&l.path, "lora_B.weight"), lora.b.as_tensor().clone());
        }
        if let Some(d) = l.adapter.as_ref().and_then(Adapter::as_dora) {
            w.insert(key(&l.path, MAGNITUDE), d.m.as_tensor().clone());
            dora = true;
        }
    }
    if w.is_empty() {
        return Err(Error::msg("the model has no LoRA adapter to save"));
    }
    insert_heads(model, &mut w);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    w.save_safetensors(&dir.join(WEIGHTS_FILE), Some(meta))?;
    let mut c = peft_config_for(model, cfg, base);
    c.use_dora = dora;
    let json = serde_json::to_string_pretty(&c)?;
    atomic::write_file(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Attaches the PEFT LoRA adapter in `dir` to `model`. Every tensor in the file must land
/// on a linear layer of the model with matching shapes.
pub fn load_lora(model: &mut dyn Model, dir: &Path) -> Result<PeftConfig> {
    let cfg = PeftConfig::read(dir)?;
    check_task_type(model, cfg.task_type.as_deref(), &dir.join(CONFIG_FILE))?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(Error::format(&wpath, "missing; adapter_model.bin (pickle) is not supported, save with safe_serialization"));
        }
        return Err(Error::io(
            &wpath,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut w = Weights::load_safetensors(&wpath)?;
    w.check_finite()?;
    take_heads(model, &mut w, &wpath)?;
    let mut attached = 0;
    for l in model.linears_mut() {
        let ka = key(&l.path, "lora_A.weight");
        let kb = key(&l.path, "lora_B.weight");
        // Some writers keep the adapter name in the key.
        let ka2 = key(&l.path, "lora_A.default.weight");
        let kb2 = key(&l.path, "lora_B.default.weight");
        let dev = l.weight.device().clone();
        let on_dev = |t: Option<candle_core::Tensor>| t.map(|t| t.to_device(&dev)).transpose();
        let a = on_dev(w.remove(&ka).or_else(|| w.remove(&ka2)))?;
        let b = on_dev(w.remove(&kb).or_else(|| w.remove(&kb2)))?;
        match (a, b) {
            (None, None) => continue,
            (Some(_), None) => {
                return Err(Error::MissingTensor {
                    name: kb,
                    from: Some(wpath),
                })
            }
            (None, Some(_)) => {
                return Err(Error::MissingTensor {
                    name: ka,
                    from: Some(wpath),
                })
            }
            (Some(a), Some(b)) => {
                let r = a.dims().first().copied().unwrap_or(0);
                if a.dims() != [r, l.in_dim()] {
                    return Err(Error::ShapeMismatch {
                        name: ka,
                        expected: vec![r, l.in_dim()],
                        got: a.dims().to_vec(),
                    });
                }
                if b.dims() != [l.out_dim(), r] {
                    return Err(Error::ShapeMismatch {
                        name: kb,
                        expected: vec![l.out_dim(), r],
                        got: b.dims().to_vec(),
                    });
                }
                let scale = cfg.scale_for(&l.path, r);
                let lora = LoraLayer::from_tensors(&a, &b, scale, cfg.lora_dropout)?;
                l.adapter = Some(if cfg.use_dora {
                    let km = key(&l.path, MAGNITUDE);
                    let m = on_dev(w.remove(&km))?.ok_or_else(|| Error::MissingTensor {
                        name: km.clone(),
                        from: Some(wpath.clone()),
                    })?;
                    if m.dims() != [l.out_dim()] {
                        return Err(Error::ShapeMismatch {
                            name: km,
                            expected: vec![l.out_dim()],
                            got: m.dims().to_vec(),
                        });
                    }
                    Adapter::Dora(DoraLayer::from_tensors(lora, &m)?)
                } else {
                    Adapter::Lora(lora)
                });
                attached += 1;
            }
        }
    }
    if let Some(extra) = w.names().next() {
        return Err(Error::format(
            &wpath,
            format!(
                "tensor `{extra}` matches no linear layer of the model (adapter for another base?)"
            ),
        ));
    }
    if attached == 0 {
        return Err(Error::format(&wpath, "holds no LoRA tensors"));
    }
    Ok(cfg)
}
