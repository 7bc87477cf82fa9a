//! Times the parts of one training step on a model (forward, backward, per-op breakdown
//! hints) to find where time goes. `cargo run --release --example profile_step -- MODEL`.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lora_dash::adapters::{LoraConfig, TargetModules};
use lora_dash::models::{Ctx, Llama};

fn main() -> lora_dash::Result<()> {
    let path = std::env::args().nth(1).expect("model path");
    let loaded = lora_dash::io::load_model(&path)?;
    let cfg = loaded.config.resolve()?;
    let mut m = Llama::load(&cfg, &loaded.weights)?;
    let lc = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        use_rslora: false,
        target_modules: TargetModules::parse("q_proj,k_proj,v_proj,up_proj,down_proj")?,
    };
    m.inject_lora(&lc, 0)?;
    let (b, t) = (
        4usize,
        std::env::var("T")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(128usize),
    );
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 40000) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), DType::F32, &Device::Cpu)?;
    let labels = ids.to_dtype(DType::I64)?;
    for it in 0..3 {
        let ctx = Ctx::train(lora_dash::rng::Rng::new(it));
        let t0 = Instant::now();
        let h = m.forward_hidden(&ids, Some(&mask), None, None, &ctx)?;
        let t1 = Instant::now();
        // LM head + loss through the training path (chunked, no (n, v) logits kept).
        let loss = m.loss_from_hidden(&h, &labels, &ctx)?;
        let t3 = Instant::now();
        let g = loss.backward()?;
        let t4 = Instant::now();
        drop(g);
        println!(
            "body {:.2}s  lm_head+ce {:.2}s  backward {:.2}s  total {:.2}s  ({:.0} tok/s)",
            (t1 - t0).as_secs_f64(),
            (t3 - t1).as_secs_f64(),
            (t4 - t3).as_secs_f64(),
            (t4 - t0).as_secs_f64(),
            (b * t) as f64 / (t4 - t0).as_secs_f64()
        );
    }
    println!(
        "peak RSS {:.2} GiB",
        lora_dash::train::trainer::peak_rss_bytes() as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
