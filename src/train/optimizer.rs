//! AdamW with the semantics of PyTorch's `torch.optim.AdamW` (single-tensor path, the one
//! PyTorch takes on CPU), and gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! Per parameter and step t (counted per parameter, so parameters added mid-run start at 1):
//!   p ← p·(1 − lr·wd)                      (decoupled weight decay, before the Adam update)
//!   m ← lerp(m, g, 1 − β₁);  v ← β₂·v + (1 − β₂)·g²
//!   p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)   (ε outside the square root)
//! The element loops run in f32 with the scalar factors computed in f64, in PyTorch's order.
//!
//! Where the state lives: a parameter in host memory keeps its moments in host vectors and is
//! updated by one parallel f32 loop; a parameter on another device (or every parameter when
//! `LORA_DASH_KERNELS=reference`) keeps them as tensors on its device and is updated by
//! candle ops there, the same arithmetic in the same order, so nothing crosses to the host
//! but the gradient norm (one scalar per parameter).
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

/// First and second moments of one parameter.
enum Moments {
    /// Host vectors (the parameter is in host memory).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// f32 tensors on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(var: &Var, device: bool) -> Result<Moments> {
        Ok(if device {
            let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            Moments::Device { m: z.clone(), v: z }
        } else {
            let n = var.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        })
    }

    fn from_vecs(var: &Var, device: bool, m: Vec<f32>, v: Vec<f32>) -> Result<Moments> {
        Ok(if device {
            let t = |x: Vec<f32>| Tensor::from_vec(x, var.shape(), var.device());
            Moments::Device { m: t(m)?, v: t(v)? }
        } else {
            Moments::Host { m, v }
        })
    }

    fn is_device(&self) -> bool {
        matches!(self, Moments::Device { .. })
    }

    /// Both moments as host tensors of `shape`.
    fn to_host(&self, shape: &candle_core::Shape) -> Result<(Tensor, Tensor)> {
        let host = crate::device::host();
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, shape.clone(), &host)?,
                Tensor::from_slice(v, shape.clone(), &host)?,
            ),
            Moments::Device { m, v } => (m.to_device(&host)?, v.to_device(&host)?),
        })
    }
}

/// Whether `var`'s state lives on its device (tensors) rather than in host vectors:
/// always off the host, and on the host too when `force` (the reference path).
fn on_device(var: &Var, force: bool) -> bool {
    force || !var.device().is_cpu()
}

struct ParamState {
    name: String,
    var: Var,
    moments: Moments,
    step: u64,
    /// Multiplies the step's learning rate for this parameter (1: the base rate).
    lr_scale: f64,
}

pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    /// Gradient factor set by `clip_grad_norm`, consumed by the next `step`.
    pending_scale: Option<f64>,
    /// Keep host parameters' state as tensors too (`LORA_DASH_KERNELS=reference`).
    force_device_state: bool,
}

/// Elements per parallel chunk; small tensors run on one thread.
const CHUNK: usize = 1 << 15;

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut opt = AdamW {
            params: Vec::new(),
            cfg,
            pending_scale: None,
            force_device_state: crate::ops::reference_forced(),
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
            let moments = Moments::zeros(&var, on_device(&var, self.force_device_state))?;
            self.params.push(ParamState {
                name,
                var,
                moments,
                step: 0,
                lr_scale: 1.0,
            });
        }
        Ok(())
    }

    /// Keeps the state of parameters added from now on as tensors on their device even in
    /// host memory (what `LORA_DASH_KERNELS=reference` does), so that path can be tested
    /// against the host loop.
    pub fn force_device_state(&mut self) {
        self.force_device_state = true;
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
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Updates every parameter with learning rate `lr`, using (and clearing) the factor set by
    /// [`AdamW::clip_grad_norm`]. Fails with [`Error::NoGradient`] before touching anything
    /// when a parameter has no gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let scale = self.pending_scale.take().unwrap_or(1.0) as f32;
        let gs: Vec<Grad> = self
            .params
            .iter()
            .map(|p| grad_of(grads, &p.name, &p.var, p.moments.is_device()))
            .collect::<Result<_>>()?;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        for (p, g) in self.params.iter_mut().zip(gs) {
            p.step += 1;
            let t = p.step as i32;
            let lr = lr * p.lr_scale;
            let k = StepFactors {
                scale,
                decay: (1.0 - lr * weight_decay) as f32,
                w1: (1.0 - beta1) as f32,
                b2: beta2 as f32,
                w2: (1.0 - beta2) as f32,
                neg_step: (-(lr / (1.0 - beta1.powi(t)))) as f32,
                bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
                eps: eps as f32,
            };
            match (&mut p.moments, g) {
                (Moments::Host { m, v }, Grad::Host(g)) => k.host(&p.var, m, v, g)?,
                (Moments::Device { m, v }, Grad::Device(g)) => {
                    let (m2, v2) = k.device(&p.var, m, v, &g)?;
                    *m = m2;
                    *v = v2;
                }
                _ => unreachable!("gradients are read in the form of the moments"),
            }
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
            sq += grad_sq(grads, &p.name, &p.var, p.moments.is_device())?;
        }
        Ok(sq.sqrt())
    }

    /// Moments and step count of every parameter, as `{name}.exp_avg`, `{name}.exp_avg_sq`
    /// (f32, the parameter's shape) and `{name}.step` (i64, shape [1]).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let host = crate::device::host();
        let mut out = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            let (m, v) = p.moments.to_host(p.var.shape())?;
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
            out.push((
                format!("{}.step", p.name),
                Tensor::new(&[p.step as i64], &host)?,
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
            p.moments = Moments::from_vecs(&p.var, p.moments.is_device(), m, v)?;
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
        sq += grad_sq(
            grads,
            name,
            var,
            on_device(var, crate::ops::reference_forced()),
        )?;
    }
    Ok(sq.sqrt())
}

/// A parameter's gradient, in the form its moments take.
enum Grad {
    Host(Vec<f32>),
    Device(Tensor),
}

/// The scalar factors of one AdamW step of one parameter (f32, computed in f64).
struct StepFactors {
    scale: f32,
    decay: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl StepFactors {
    /// The update on host vectors, in parallel chunks.
    fn host(&self, var: &Var, m: &mut [f32], v: &mut [f32], mut g: Vec<f32>) -> Result<()> {
        let k = self;
        if k.scale != 1.0 {
            g.iter_mut().for_each(|x| *x *= k.scale);
        }
        let mut data: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let update = |x: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            for i in 0..x.len() {
                x[i] *= k.decay;
                // torch.lerp for weight < 0.5: m + w·(g − m).
                m[i] = if k.w1 < 0.5 {
                    m[i] + k.w1 * (g[i] - m[i])
                } else {
                    g[i] - (g[i] - m[i]) * (1.0 - k.w1)
                };
                v[i] = v[i] * k.b2 + k.w2 * g[i] * g[i];
                let denom = v[i].sqrt() / k.bc2_sqrt + k.eps;
                x[i] += k.neg_step * m[i] / denom;
            }
        };
        data.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((x, m), v), g)| update(x, m, v, g));
        var.set(&Tensor::from_vec(data, var.shape().clone(), var.device())?)?;
        Ok(())
    }

    /// The same update with candle ops on the parameter's device; returns the new moments.
    /// Scalars enter as f32 values (candle's affine ops multiply in the tensor's dtype) and
    /// divisions stay divisions, so the arithmetic is the host loop's, element for element.
    fn device(&self, var: &Var, m: &Tensor, v: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self;
        let f = |x: f32| x as f64;
        let g = if k.scale != 1.0 {
            (g * f(k.scale))?
        } else {
            g.clone()
        };
        let x = (var.as_tensor().detach() * f(k.decay))?;
        let m = if k.w1 < 0.5 {
            (m + ((&g - m)? * f(k.w1))?)?
        } else {
            (&g - ((&g - m)? * f(1.0 - k.w1))?)?
        };
        let v = ((v * f(k.b2))? + ((&g * f(k.w2))? * &g)?)?;
        let bc2 = Tensor::new(k.bc2_sqrt, var.device())?;
        let denom = (v.sqrt()?.broadcast_div(&bc2)? + f(k.eps))?;
        let x = (x + ((&m * f(k.neg_step))? / &denom)?)?;
        var.set(&x)?;
        Ok((m, v))
    }
}

fn checked_grad<'a>(grads: &'a GradStore, name: &str, var: &Var) -> Result<&'a Tensor> {
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
    Ok(g)
}

fn grad_of(grads: &GradStore, name: &str, var: &Var, device: bool) -> Result<Grad> {
    let g = checked_grad(grads, name, var)?.to_dtype(DType::F32)?;
    Ok(if device {
        Grad::Device(g.contiguous()?)
    } else {
        Grad::Host(g.flatten_all()?.to_vec1::<f32>()?)
    })
}

/// The squared L2 norm of a parameter's gradient, accumulated in f64: sequentially on the
/// host for a host parameter, as one reduction on the device otherwise.
fn grad_sq(grads: &GradStore, name: &str, var: &Var, device: bool) -> Result<f64> {
    let g = checked_grad(grads, name, var)?;
    if device {
        return Ok(g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?);
    }
    let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
}

#[cfg(test)]
mod tests;
