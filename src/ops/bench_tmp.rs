#[cfg(test)]
mod tests {
    use crate::ops::*;
    use crate::ops::gradcheck::randn;
    use candle_core::{Tensor, Var};
    use std::time::Instant;

    fn time<F: FnMut() -> crate::Result<()>>(label: &str, reps: usize, mut f: F) -> f64 {
        f().unwrap();
        let t = Instant::now();
        for _ in 0..reps { f().unwrap(); }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
        println!("{label:40} {ms:8.2} ms");
        ms
    }

    #[test]
    #[ignore]
    fn bench_attn() {
        let q = Var::from_tensor(&randn(&[4, 9, 256, 64], 1).unwrap()).unwrap();
        let k = Var::from_tensor(&randn(&[4, 3, 256, 64], 2).unwrap()).unwrap();
        let v = Var::from_tensor(&randn(&[4, 3, 256, 64], 3).unwrap()).unwrap();
        for _ in 0..2 {
        time("attention fwd", 5, || { causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, 0)?; Ok(()) });
        time("reference attention fwd", 5, || { reference::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, 0)?; Ok(()) });
        time("attention fwd+bwd", 5, || { causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, 0)?.sum_all()?.backward()?; Ok(()) });
        time("reference attention fwd+bwd", 5, || { reference::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, 0)?.sum_all()?.backward()?; Ok(()) });
        }
    }

    #[test]
    #[ignore]
    fn bench_ce() {
        let logits = Var::from_tensor(&randn(&[1024, 49152], 7).unwrap()).unwrap();
        let labels: Vec<i64> = (0..1024).map(|i| if i % 5 == 0 { -100 } else { (i * 37) % 49152 }).collect();
        let labels = Tensor::new(labels.as_slice(), &candle_core::Device::Cpu).unwrap();
        time("cross_entropy fwd", 3, || { cross_entropy(logits.as_tensor(), &labels)?; Ok(()) });
        time("cross_entropy fwd+bwd", 3, || { cross_entropy(logits.as_tensor(), &labels)?.backward()?; Ok(()) });
        time("zeros+add 50M", 3, || { let z = logits.as_tensor().zeros_like()?; let _ = z.add(logits.as_tensor())?; Ok(()) });
        let x = logits.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        time("exp_f32 map 50M (1 thread)", 3, || { let v: Vec<f32> = x.iter().map(|&a| crate::ops::cpu::exp_f32(a)).collect(); assert!(v.len() > 0); Ok(()) });
        time("std exp map 50M (1 thread)", 3, || { let v: Vec<f32> = x.iter().map(|&a| a.exp()).collect(); assert!(v.len() > 0); Ok(()) });
        time("sum_exp 50M (1 thread)", 3, || { let s = crate::ops::cpu::sum_exp(&x, 0.0); assert!(s > 0.0); Ok(()) });
    }

    #[test]
    #[ignore]
    fn bench_ops() {
        println!("threads {}", rayon::current_num_threads());
        let x = randn(&[1024, 576], 1).unwrap();
        let w = randn(&[1536, 576], 2).unwrap();
        let x3 = x.reshape((4, 256, 576)).unwrap();
        time("frozen_linear fwd 2d", 20, || { frozen_linear(&x, &w)?; Ok(()) });
        time("candle matmul x.matmul(w.t()) 2d", 20, || { x.matmul(&w.t()?)?; Ok(()) });
        time("frozen_linear fwd 3d", 20, || { frozen_linear(&x3, &w)?; Ok(()) });
        time("candle broadcast_matmul 3d", 20, || { x3.broadcast_matmul(&w.t()?)?; Ok(()) });
        let xv = Var::from_tensor(&x3).unwrap();
        time("frozen_linear fwd+bwd", 10, || { frozen_linear(xv.as_tensor(), &w)?.sum_all()?.backward()?; Ok(()) });
        time("reference fwd+bwd", 10, || { reference::frozen_linear(xv.as_tensor(), &w)?.sum_all()?.backward()?; Ok(()) });
        let g = Var::from_tensor(&randn(&[1024, 1536], 3).unwrap()).unwrap();
        let u = Var::from_tensor(&randn(&[1024, 1536], 4).unwrap()).unwrap();
        time("silu_mul fwd", 20, || { silu_mul(g.as_tensor(), u.as_tensor())?; Ok(()) });
        time("reference silu_mul fwd", 20, || { reference::silu_mul(g.as_tensor(), u.as_tensor())?; Ok(()) });
        time("silu_mul fwd+bwd", 10, || { silu_mul(g.as_tensor(), u.as_tensor())?.sum_all()?.backward()?; Ok(()) });
        time("reference silu_mul fwd+bwd", 10, || { reference::silu_mul(g.as_tensor(), u.as_tensor())?.sum_all()?.backward()?; Ok(()) });
        let xn = Var::from_tensor(&x3).unwrap();
        let wn = randn(&[576], 5).unwrap();
        time("rms_norm fwd+bwd", 10, || { rms_norm(xn.as_tensor(), &wn, 1e-5)?.sum_all()?.backward()?; Ok(()) });
        time("reference rms_norm fwd+bwd", 10, || { reference::rms_norm(xn.as_tensor(), &wn, 1e-5)?.sum_all()?.backward()?; Ok(()) });
        let s = Var::from_tensor(&randn(&[4, 9, 256, 256], 6).unwrap()).unwrap();
        time("softmax fwd+bwd", 10, || { softmax_last_dim(s.as_tensor())?.sum_all()?.backward()?; Ok(()) });
        time("reference softmax fwd+bwd", 10, || { reference::softmax_last_dim(s.as_tensor())?.sum_all()?.backward()?; Ok(()) });
        let logits = Var::from_tensor(&randn(&[1024, 49152], 7).unwrap()).unwrap();
        let labels: Vec<i64> = (0..1024).map(|i| if i % 5 == 0 { -100 } else { (i * 37) % 49152 }).collect();
        let labels = Tensor::new(labels.as_slice(), &candle_core::Device::Cpu).unwrap();
        time("cross_entropy fwd+bwd", 3, || { cross_entropy(logits.as_tensor(), &labels)?.backward()?; Ok(()) });
        time("reference cross_entropy fwd+bwd", 3, || { reference::cross_entropy(logits.as_tensor(), &labels)?.backward()?; Ok(()) });
    }
}
