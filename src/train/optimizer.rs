//! AdamW with the semantics of PyTorch's `torch.optim.AdamW` (single-tensor path, the one
//! PyTorch takes on CPU), and gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! Per parameter and step t (counted per parameter, so parameters added mid-run start at 1):
//!   p ← p·(1 − lr·wd)                      (decoupled weight decay, before the Adam update)
//!   m ← lerp(m, g, 1 − β₁);  v ← β₂·v + (1 − β₂)·g²
//!   p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)   (ε outside the square root)
//! The element loops run in f32 with the scalar factors computed in f64, in PyTorch's order.
//!
//! Clipping: [`AdamW::clip_grad_norm`] does not rewrite the gradients; it records the factor
//! `min(1, max_norm / (norm + 1e-6))` and the next [`AdamW::step`] multiplies every gradient by
//! it before use (then forgets it), which is what scaling the gradients in place would do.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's betas and eps; weight decay 0 as in transformers' `TrainingArguments`.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct ParamState {
    name: String,
    var: Var,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    step: u64,
    /// Multiplies the step's learning rate for this parameter (1: the base rate).
    lr_scale: f64,
}

pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    /// Gradient factor set by `clip_grad_norm`, consumed by the next `step`.
    pending_scale: Option<f64>,
}

/// Elements per parallel chunk; small tensors run on one thread.
const CHUNK: usize = 1 << 15;

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut opt = AdamW {
            params: Vec::new(),
            cfg,
            pending_scale: None,
        };
        opt.add_params(params)?;
        Ok(opt)
    }

    /// Adds parameters with zero moments and step 0 (LoRA-Dash adds its direction parameters
    /// part-way through training). Names must be unique; parameters must be f32.
    pub fn add_params(&mut self, params: Vec<(String, Var)>) -> Result<()> {
        for (name, var) in params {
            if self.params.iter().any(|p| p.name == name) {
                return Err(Error::msg(format!(
                    "parameter `{name}` is already in the optimizer"
                )));
            }
            if var.dtype() != DType::F32 {
                return Err(Error::msg(format!(
                    "parameter `{name}` is {:?}; AdamW needs f32",
                    var.dtype()
                )));
            }
            let n = var.elem_count();
            self.params.push(ParamState {
                name,
                var,
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
                step: 0,
                lr_scale: 1.0,
            });
        }
        Ok(())
    }

    /// Keeps only the parameters whose name satisfies `keep`, dropping the others' state
    /// (LoRA-Dash may freeze A and B once its directions take over).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.params.retain(|p| keep(&p.name));
    }

    /// Gives the parameters whose name satisfies `select` the learning rate `lr·scale` in every
    /// later [`AdamW::step`] (a parameter group with its own rate, the schedule applied alike).
    /// A scale of 1 leaves the update bit-identical.
    pub fn set_lr_scale(&mut self, mut select: impl FnMut(&str) -> bool, scale: f64) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::msg(format!(
                "learning-rate scale must be a positive number, got {scale}"
            )));
        }
        for p in self.params.iter_mut().filter(|p| select(&p.name)) {
            p.lr_scale = scale;
        }
        Ok(())
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// `(name, var)` of every parameter, in insertion order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Total number of trainable scalars.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.exp_avg.len()).sum()
    }

    /// Updates every parameter with learning rate `lr`, using (and clearing) the factor set by
    /// [`AdamW::clip_grad_norm`]. Fails with [`Error::NoGradient`] before touching anything
    /// when a parameter has no gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let scale = self.pending_scale.take().unwrap_or(1.0) as f32;
        let gs: Vec<Vec<f32>> = self
            .params
            .iter()
            .map(|p| grad_of(grads, &p.name, &p.var))
            .collect::<Result<_>>()?;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        for (p, mut g) in self.params.iter_mut().zip(gs) {
            if scale != 1.0 {
                g.iter_mut().for_each(|x| *x *= scale);
            }
            p.step += 1;
            let t = p.step as i32;
            let lr = lr * p.lr_scale;
            let decay = (1.0 - lr * weight_decay) as f32;
            let w1 = (1.0 - beta1) as f32;
            let b2 = beta2 as f32;
            let w2 = (1.0 - beta2) as f32;
            let step_size = lr / (1.0 - beta1.powi(t));
            let neg_step = (-step_size) as f32;
            let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt() as f32;
            let eps = eps as f32;
            let mut data: Vec<f32> = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let update = |x: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
                for i in 0..x.len() {
                    x[i] *= decay;
                    // torch.lerp for weight < 0.5: m + w·(g − m).
                    m[i] = if w1 < 0.5 {
                        m[i] + w1 * (g[i] - m[i])
                    } else {
                        g[i] - (g[i] - m[i]) * (1.0 - w1)
                    };
                    v[i] = v[i] * b2 + w2 * g[i] * g[i];
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    x[i] += neg_step * m[i] / denom;
                }
            };
            data.par_chunks_mut(CHUNK)
                .zip(p.exp_avg.par_chunks_mut(CHUNK))
                .zip(p.exp_avg_sq.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((x, m), v), g)| update(x, m, v, g));
            let shape = p.var.shape().clone();
            let dev = p.var.device().clone();
            p.var.set(&Tensor::from_vec(data, shape, &dev)?)?;
        }
        Ok(())
    }

    /// The global L2 norm of this optimizer's gradients (as `clip_grad_norm_` returns it) and
    /// remembers `min(1, max_norm / (norm + 1e-6))` for the next [`AdamW::step`].
    pub fn clip_grad_norm(&mut self, grads: &GradStore, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let coef = max_norm / (norm + 1e-6);
        self.pending_scale = Some(coef.min(1.0));
        Ok(norm)
    }

    /// The global L2 norm of this optimizer's gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for p in &self.params {
            let g = grad_of(grads, &p.name, &p.var)?;
            sq += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        Ok(sq.sqrt())
    }

    /// Moments and step count of every parameter, as `{name}.exp_avg`, `{name}.exp_avg_sq`
    /// (f32, the parameter's shape) and `{name}.step` (i64, shape [1]).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = candle_core::Device::Cpu;
        let mut out = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            let shape = p.var.shape().clone();
            out.push((
                format!("{}.exp_avg", p.name),
                Tensor::from_slice(&p.exp_avg, shape.clone(), &cpu)?,
            ));
            out.push((
                format!("{}.exp_avg_sq", p.name),
                Tensor::from_slice(&p.exp_avg_sq, shape, &cpu)?,
            ));
            out.push((
                format!("{}.step", p.name),
                Tensor::new(&[p.step as i64], &cpu)?,
            ));
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved. The saved set must match the current
    /// parameters exactly: a missing entry is [`Error::MissingTensor`], a wrong shape
    /// [`Error::ShapeMismatch`], and an entry for an unknown parameter an error too, since it
    /// means the checkpoint belongs to a different run.
    pub fn load_state(&mut self, state: &Weights) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let dims = p.var.dims().to_vec();
            let read = |suffix: &str| -> Result<Vec<f32>> {
                let t = state.get_shaped(&format!("{}.{suffix}", p.name), &dims)?;
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (m, v) = (read("exp_avg")?, read("exp_avg_sq")?);
            let step_name = format!("{}.step", p.name);
            let steps = state
                .get(&step_name)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let step = match steps.as_slice() {
                [s] if *s >= 0.0 && s.fract() == 0.0 => *s as u64,
                _ => {
                    return Err(Error::msg(format!(
                        "`{step_name}` must hold one non-negative integer, got {steps:?}"
                    )))
                }
            };
            loaded.push((m, v, step));
        }
        for name in state.names() {
            let known = self.params.iter().any(|p| {
                name.strip_prefix(p.name.as_str())
                    .is_some_and(|s| matches!(s, ".exp_avg" | ".exp_avg_sq" | ".step"))
            });
            if !known {
                return Err(Error::msg(format!(
                    "optimizer state `{name}` matches no trainable parameter of this run"
                )));
            }
        }
        for (p, (m, v, step)) in self.params.iter_mut().zip(loaded) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
            p.step = step;
        }
        self.pending_scale = None;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `params` (accumulated in f64).
pub fn grad_norm(grads: &GradStore, params: &[(String, Var)]) -> Result<f64> {
    let mut sq = 0f64;
    for (name, var) in params {
        let g = grad_of(grads, name, var)?;
        sq += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    }
    Ok(sq.sqrt())
}

fn grad_of(grads: &GradStore, name: &str, var: &Var) -> Result<Vec<f32>> {
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| Error::NoGradient(name.to_string()))?;
    if g.dims() != var.dims() {
        return Err(Error::ShapeMismatch {
            name: format!("{name} (gradient)"),
            expected: var.dims().to_vec(),
            got: g.dims().to_vec(),
        });
    }
    Ok(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests;
