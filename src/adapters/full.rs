//! Full fine-tuning of a linear weight, written as a dense additive update: the layer
//! computes x·Wᵀ + x·ΔWᵀ with W frozen and ΔW (out, in) trainable, starting at 0. Training
//! ΔW is training W itself (same gradient, W* = W + ΔW), except that AdamW's decoupled
//! weight decay shrinks ΔW towards 0 rather than W towards 0.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;

pub struct FullDelta {
    /// (out, in), trainable
    pub delta: Var,
}

impl FullDelta {
    /// ΔW = 0: the adapted layer starts as the base layer.
    pub fn zeros(in_dim: usize, out_dim: usize, dev: &Device) -> Result<Self> {
        Ok(FullDelta {
            delta: Var::from_tensor(&Tensor::zeros((out_dim, in_dim), DType::F32, dev)?)?,
        })
    }

    /// x·ΔWᵀ for x (n, in) → (n, out).
    pub fn delta_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.delta.as_tensor().t()?)?)
    }

    /// ΔW, (out, in).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.delta.as_tensor().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// d/dΔW_{ij} of L = Σ (x·ΔWᵀ ⊙ g) against central finite differences.
    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = Rng::new(5);
        let (n, i, o) = (3, 5, 4);
        let x = Tensor::from_vec(rng.uniform_vec(n * i, -1.0, 1.0), (n, i), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(rng.uniform_vec(n * o, -1.0, 1.0), (n, o), &Device::Cpu).unwrap();
        let f = FullDelta::zeros(i, o, &Device::Cpu).unwrap();
        let d0 = Tensor::from_vec(rng.uniform_vec(o * i, -0.5, 0.5), (o, i), &Device::Cpu).unwrap();
        f.delta.set(&d0).unwrap();
        let loss = |f: &FullDelta| -> Tensor {
            (f.delta_forward(&x).unwrap() * &g)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(&f).backward().unwrap();
        let ga: Vec<f32> = grads
            .get(f.delta.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = d0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let mut max = 0f32;
        for k in [0, 7, o * i - 1] {
            let mut p = base.clone();
            p[k] += eps;
            f.delta
                .set(&Tensor::from_vec(p.clone(), (o, i), &Device::Cpu).unwrap())
                .unwrap();
            let lp = loss(&f).to_scalar::<f32>().unwrap();
            p[k] -= 2.0 * eps;
            f.delta
                .set(&Tensor::from_vec(p, (o, i), &Device::Cpu).unwrap())
                .unwrap();
            let lm = loss(&f).to_scalar::<f32>().unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            max = max.max((fd - ga[k]).abs() / fd.abs().max(1e-2));
        }
        println!("full delta: max rel diff analytic vs finite differences {max:.3e}");
        assert!(max < 1e-2, "{max}");
    }
}
