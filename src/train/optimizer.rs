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
                return Err(Error::msg(format!("parameter `{name}` is already in the optimizer")));
            }
            if var.dtype() != DType::F32 {
                return Err(Error::msg(format!("parameter `{name}` is {:?}; AdamW needs f32", var.dtype())));
            }
            let n = var.elem_count();
            self.params.push(ParamState {
                name,
                var,
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
                step: 0,
            });
        }
        Ok(())
    }

    /// Keeps only the parameters whose name satisfies `keep`, dropping the others' state
    /// (LoRA-Dash may freeze A and B once its directions take over).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.params.retain(|p| keep(&p.name));
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
                    m[i] = if w1 < 0.5 { m[i] + w1 * (g[i] - m[i]) } else { g[i] - (g[i] - m[i]) * (1.0 - w1) };
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
            out.push((format!("{}.exp_avg", p.name), Tensor::from_slice(&p.exp_avg, shape.clone(), &cpu)?));
            out.push((format!("{}.exp_avg_sq", p.name), Tensor::from_slice(&p.exp_avg_sq, shape, &cpu)?));
            out.push((format!("{}.step", p.name), Tensor::new(&[p.step as i64], &cpu)?));
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
            let steps = state.get(&step_name)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let step = match steps.as_slice() {
                [s] if *s >= 0.0 && s.fract() == 0.0 => *s as u64,
                _ => return Err(Error::msg(format!("`{step_name}` must hold one non-negative integer, got {steps:?}"))),
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
mod tests {
    use super::*;
    use candle_core::Device;

    const P0: [f32; 6] = [0.5, -1.0, 2.0, 0.0, 0.25, -3.0];
    const Q0: [f32; 2] = [1.5, -0.5];
    const GP: [[f32; 6]; 3] = [
        [0.1, -0.2, 0.3, -0.4, 0.5, -0.6],
        [1.0, 0.0, -1.0, 2.0, -2.0, 0.5],
        [-0.3, 0.7, 0.2, 0.05, -0.9, 1.2],
    ];
    const GQ: [[f32; 2]; 3] = [[2.0, -1.0], [0.5, 3.0], [-1.0, -2.0]];
    const LRS: [f64; 3] = [1e-2, 2e-2, 5e-3];
    const CFG: AdamWConfig = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    fn vars() -> Vec<(String, Var)> {
        let cpu = Device::Cpu;
        vec![
            ("p".into(), Var::from_tensor(&Tensor::new(&P0, &cpu).unwrap().reshape((2, 3)).unwrap()).unwrap()),
            ("q".into(), Var::from_tensor(&Tensor::new(&Q0, &cpu).unwrap()).unwrap()),
        ]
    }

    /// Gradients equal to `gp`, `gq` through real backprop: d/dp sum(p * c) = c.
    fn grads(params: &[(String, Var)], k: usize) -> GradStore {
        let cpu = Device::Cpu;
        let cp = Tensor::new(&GP[k], &cpu).unwrap().reshape((2, 3)).unwrap();
        let cq = Tensor::new(&GQ[k], &cpu).unwrap();
        let lp = (params[0].1.as_tensor() * cp).unwrap().sum_all().unwrap();
        let lq = (params[1].1.as_tensor() * cq).unwrap().sum_all().unwrap();
        (lp + lq).unwrap().backward().unwrap()
    }

    fn values(params: &[(String, Var)]) -> Vec<f32> {
        params.iter().flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    /// AdamW written from the update rule in the torch.optim.AdamW documentation, in f64.
    fn reference(steps: usize, clip: Option<f64>) -> Vec<f64> {
        let mut x: Vec<f64> = P0.iter().chain(&Q0).map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0f64; 8], vec![0f64; 8]);
        for k in 0..steps {
            let mut g: Vec<f64> = GP[k].iter().chain(&GQ[k]).map(|&v| v as f64).collect();
            if let Some(max) = clip {
                let n = g.iter().map(|a| a * a).sum::<f64>().sqrt();
                let c = (max / (n + 1e-6)).min(1.0);
                g.iter_mut().for_each(|a| *a *= c);
            }
            let (lr, t) = (LRS[k], (k + 1) as i32);
            for i in 0..8 {
                x[i] -= lr * CFG.weight_decay * x[i];
                m[i] = CFG.beta1 * m[i] + (1.0 - CFG.beta1) * g[i];
                v[i] = CFG.beta2 * v[i] + (1.0 - CFG.beta2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - CFG.beta1.powi(t));
                let vhat = v[i] / (1.0 - CFG.beta2.powi(t));
                x[i] -= lr * mhat / (vhat.sqrt() + CFG.eps);
            }
        }
        x
    }

    fn max_diff(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
        a.iter().zip(b).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max)
    }

    // torch 2.5.1 torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1) on CPU,
    // after step 3 with the gradients and learning rates above (p then q, flattened).
    const TORCH_3: [f64; 8] = [
        0.47006818652153015, -0.9754946231842041, 1.994807243347168, -0.004376358352601528,
        0.2535955309867859, -2.9813709259033203, 1.4666838645935059, -0.4980616867542267,
    ];
    // The same with torch.nn.utils.clip_grad_norm_(params, 1.0) before every step.
    const TORCH_3_CLIP: [f64; 8] = [
        0.4696085453033447, -0.9753574132919312, 1.9900776147842407, -0.0013718267437070608,
        0.25019314885139465, -2.975646734237671, 1.468024730682373, -0.4927668869495392,
    ];
    const TORCH_NORMS: [f64; 3] = [2.431049108505249, 4.41588020324707, 2.805797576904297];

    #[test]
    fn three_steps_match_reference_and_torch() {
        for clip in [None, Some(1.0)] {
            let params = vars();
            let mut opt = AdamW::new(params.clone(), CFG).unwrap();
            for k in 0..3 {
                let g = grads(&params, k);
                if let Some(max) = clip {
                    let n = opt.clip_grad_norm(&g, max).unwrap();
                    assert!((n - TORCH_NORMS[k]).abs() < 1e-6, "norm {n} vs {}", TORCH_NORMS[k]);
                }
                opt.step(&g, LRS[k]).unwrap();
                let d = max_diff(&values(&params), reference(k + 1, clip));
                println!("clip {clip:?} step {}: max |diff| vs f64 reference = {d:e}", k + 1);
                assert!(d < 2e-6, "{d}");
            }
            let torch = if clip.is_some() { TORCH_3_CLIP } else { TORCH_3 };
            let d = max_diff(&values(&params), torch);
            println!("clip {clip:?}: max |diff| vs torch = {d:e}");
            // Within an f32 rounding step of PyTorch's values.
            assert!(d < 1e-8, "{d}");
        }
    }

    #[test]
    fn missing_gradient_is_an_error_and_changes_nothing() {
        let params = vars();
        let extra = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(params.clone(), CFG).unwrap();
        opt.add_params(vec![("dash.w".into(), extra)]).unwrap();
        let before = values(&params);
        let err = opt.step(&grads(&params, 0), 1e-2).unwrap_err();
        assert!(matches!(&err, Error::NoGradient(n) if n == "dash.w"), "{err:?}");
        assert_eq!(values(&params), before);
        assert!(opt.add_params(vec![("p".into(), params[0].1.clone())]).is_err());
        // Dropping the gradient-less parameter makes the step valid again.
        opt.retain(|n| n != "dash.w");
        assert_eq!(opt.params().map(|(n, _)| n).collect::<Vec<_>>(), vec!["p", "q"]);
        opt.step(&grads(&params, 0), LRS[0]).unwrap();
        let d = max_diff(&values(&params), reference(1, None));
        assert!(d < 2e-6, "{d}");
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let params = vars();
        let mut opt = AdamW::new(params.clone(), CFG).unwrap();
        opt.step(&grads(&params, 0), LRS[0]).unwrap();
        let st = opt.state_tensors().unwrap();
        crate::io::weights::save_tensors(st.iter().map(|(n, t)| (n.as_str(), t)), &path, None).unwrap();
        let snapshot = values(&params);

        // Continue the original.
        for k in 1..3 {
            opt.step(&grads(&params, k), LRS[k]).unwrap();
        }
        let expected = values(&params);

        // Fresh parameters at the snapshot, fresh optimizer, loaded state.
        let cpu = Device::Cpu;
        let fresh = vec![
            ("p".to_string(), Var::from_tensor(&Tensor::new(&snapshot[..6], &cpu).unwrap().reshape((2, 3)).unwrap()).unwrap()),
            ("q".to_string(), Var::from_tensor(&Tensor::new(&snapshot[6..], &cpu).unwrap()).unwrap()),
        ];
        let mut opt2 = AdamW::new(fresh.clone(), CFG).unwrap();
        opt2.load_state(&Weights::load_safetensors(&path).unwrap()).unwrap();
        for k in 1..3 {
            opt2.step(&grads(&fresh, k), LRS[k]).unwrap();
        }
        assert_eq!(values(&fresh), expected, "resumed steps must be bit-identical");

        // A state for a different parameter set is refused.
        let mut other = AdamW::new(vec![fresh[0].clone()], CFG).unwrap();
        assert!(other.load_state(&Weights::load_safetensors(&path).unwrap()).is_err());
        let mut bigger = AdamW::new(fresh.clone(), CFG).unwrap();
        let z = Var::from_tensor(&Tensor::zeros(2, DType::F32, &cpu).unwrap()).unwrap();
        bigger.add_params(vec![("r".into(), z)]).unwrap();
        let e = bigger.load_state(&Weights::load_safetensors(&path).unwrap()).unwrap_err();
        assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    }

    #[test]
    fn large_parameter_step_is_fast() {
        let n = 1 << 20;
        let cpu = Device::Cpu;
        let var = Var::from_tensor(&Tensor::ones(n, DType::F32, &cpu).unwrap()).unwrap();
        let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], CFG).unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..5 {
            opt.step(&g, 1e-3).unwrap();
        }
        let per_step = t0.elapsed().as_secs_f64() / 5.0;
        println!("AdamW step over {n} params: {:.2} ms", per_step * 1e3);
        // Constant gradient: each step moves by about lr (m̂/√v̂ = 1), after decay.
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        let expect = reference_const(5, 1.0, 0.5, 1e-3);
        let d = w.iter().map(|&x| (x as f64 - expect).abs()).fold(0.0, f64::max);
        println!("max |diff| vs f64 reference = {d:e}");
        assert!(d < 1e-6, "{d}");
        assert!(per_step < 0.5, "step took {per_step} s");
    }

    fn reference_const(steps: i32, x0: f64, g: f64, lr: f64) -> f64 {
        let (mut x, mut m, mut v) = (x0, 0.0, 0.0);
        for t in 1..=steps {
            x -= lr * CFG.weight_decay * x;
            m = CFG.beta1 * m + (1.0 - CFG.beta1) * g;
            v = CFG.beta2 * v + (1.0 - CFG.beta2) * g * g;
            x -= lr * (m / (1.0 - CFG.beta1.powi(t))) / ((v / (1.0 - CFG.beta2.powi(t))).sqrt() + CFG.eps);
        }
        x
    }
}
