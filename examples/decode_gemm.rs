//! Times the frozen-weight product `x · wᵀ` at the row counts of decoding (a few new tokens
//! against every weight) for SmolLM2-135M's shapes, to compare the few-row kernel with the
//! GEMM path: run it twice, `LORA_DASH_SKINNY=0` (GEMM) and unset (few-row kernel).
//!
//! `cargo run --release --example decode_gemm [-- ROWS...]` (default rows 1 4 8 16 32).
use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> lora_dash::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("rows: integers"))
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 4, 8, 16, 32]
    } else {
        rows
    };
    let dev = Device::Cpu;
    // (out, in): q/o, k/v, gate/up, down, LM head (tied embedding).
    let shapes = [
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ];
    let per_layer = [2usize, 2, 2, 1, 0];
    // 30 distinct copies of the layer weights, as in the model, so that they stream from
    // memory as in a decoding step instead of staying in cache.
    let layers = 30;
    let weights: Vec<Vec<Tensor>> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(o, i))| {
            (0..if s == 4 { 1 } else { layers })
                .map(|_| Tensor::randn(0f32, 0.02, (o, i), &dev))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .collect::<candle_core::Result<_>>()?;
    println!("rows | us per layer (7 products) | us LM head | GB/s of weight read, layer");
    for &m in &rows {
        let xs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, i)| Tensor::randn(0f32, 1.0, (m, i), &dev))
            .collect::<candle_core::Result<_>>()?;
        let time = |s: usize, reps: usize| -> lora_dash::Result<f64> {
            let ws = &weights[s];
            let _ = lora_dash::ops::frozen_linear(&xs[s], &ws[0])?;
            let t = Instant::now();
            for r in 0..reps {
                let _ = lora_dash::ops::frozen_linear(&xs[s], &ws[r % ws.len()])?;
            }
            Ok(t.elapsed().as_secs_f64() * 1e6 / reps as f64)
        };
        let mut layer = 0.0;
        let mut bytes = 0.0;
        for s in 0..4 {
            layer += per_layer[s] as f64 * time(s, 300)?;
            bytes += per_layer[s] as f64 * (shapes[s].0 * shapes[s].1 * 4) as f64;
        }
        let head = time(4, 20)?;
        println!(
            "{m:4} | {layer:9.1} | {head:9.1} | {:.1}",
            bytes / (layer * 1e-6) / 1e9
        );
    }
    Ok(())
}
