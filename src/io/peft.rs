//! PEFT's on-disk LoRA format, treated as public API: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` /
//! `.lora_B.weight` (A is (r, in), B is (out, r)).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapters::{lora_scale, Adapter, LoraConfig, LoraLayer, TargetModules};
use crate::error::{Error, IoContext, Result};
use crate::io::atomic;
use crate::io::Weights;
use crate::models::Llama;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

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
            task_type: Some("CAUSAL_LM".into()),
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
        if c.use_dora {
            return Err(Error::format(&path, "DoRA adapters are not supported"));
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
        if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(Error::format(&path, "modules_to_save is not supported"));
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

/// Writes the model's LoRA adapters into `dir` (which must exist) in PEFT's format.
pub fn save_lora(model: &Llama, cfg: &LoraConfig, base: Option<String>, dir: &Path) -> Result<()> {
    let mut w = Weights::new(None);
    for l in model.linears() {
        if let Some(lora) = l.adapter.as_ref().and_then(Adapter::as_lora) {
            w.insert(key(&l.path, "lora_A.weight"), lora.a.as_tensor().clone());
            w.insert(key(&l.path, "lora_B.weight"), lora.b.as_tensor().clone());
        }
    }
    if w.is_empty() {
        return Err(Error::msg("the model has no LoRA adapter to save"));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    w.save_safetensors(&dir.join(WEIGHTS_FILE), Some(meta))?;
    let json = serde_json::to_string_pretty(&PeftConfig::from_lora(cfg, base))?;
    atomic::write_file(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Attaches the PEFT LoRA adapter in `dir` to `model`. Every tensor in the file must land
/// on a linear layer of the model with matching shapes.
pub fn load_lora(model: &mut Llama, dir: &Path) -> Result<PeftConfig> {
    let cfg = PeftConfig::read(dir)?;
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
    let mut attached = 0;
    for l in model.linears_mut() {
        let ka = key(&l.path, "lora_A.weight");
        let kb = key(&l.path, "lora_B.weight");
        // Some writers keep the adapter name in the key.
        let ka2 = key(&l.path, "lora_A.default.weight");
        let kb2 = key(&l.path, "lora_B.default.weight");
        let a = w.remove(&ka).or_else(|| w.remove(&ka2));
        let b = w.remove(&kb).or_else(|| w.remove(&kb2));
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
                l.adapter = Some(Adapter::Lora(LoraLayer::from_tensors(
                    &a,
                    &b,
                    scale,
                    cfg.lora_dropout,
                )?));
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
