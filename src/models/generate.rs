//! Batched greedy decoding with a KV cache. Prompts are left-padded, positions follow the
//! attention mask (as transformers' `generate`), so every row decodes as if alone.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::{CausalLm, Ctx, KvCache};

/// Generated token ids per prompt (without the prompt, stopping before any of `eos`).
pub fn generate_greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::msg("cannot generate from an empty prompt"));
    }
    let dev = model.device().clone();
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut pos = Vec::with_capacity(b * t);
    let mut next_pos = vec![0u32; b];
    for (i, p) in prompts.iter().enumerate() {
        let pad = t - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0f32, pad).chain(std::iter::repeat_n(1f32, p.len())));
        pos.extend(std::iter::repeat_n(0u32, pad).chain(0..p.len() as u32));
        next_pos[i] = p.len() as u32;
    }
    let ctx = Ctx::eval();
    let mut cache = KvCache::new();
    let mut mask_all = mask;
    let mut input = Tensor::from_vec(ids, (b, t), &dev)?;
    let mut positions = Tensor::from_vec(pos, (b, t), &dev)?;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for _ in 0..max_new_tokens {
        let s = cache.len() + input.dims()[1];
        let m = Tensor::from_vec(mask_all.clone(), (b, s), &dev)?;
        let h = model.forward_hidden(&input, Some(&m), Some(&positions), Some(&mut cache), &ctx)?;
        let last = h.narrow(1, h.dims()[1] - 1, 1)?; // (b, 1, e)
        let logits = model
            .logits(&last, &ctx)?
            .squeeze(1)?
            .to_dtype(DType::F32)?; // (b, v)
        let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        for i in 0..b {
            if !done[i] {
                if eos.contains(&next[i]) {
                    done[i] = true;
                } else {
                    out[i].push(next[i]);
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // Append one column to the mask (b, s) -> (b, s+1).
        let mut grown = Vec::with_capacity(b * (s + 1));
        for i in 0..b {
            grown.extend_from_slice(&mask_all[i * s..(i + 1) * s]);
            grown.push(1.0);
        }
        mask_all = grown;
        input = Tensor::from_vec(
            next.iter()
                .zip(&done)
                .map(|(&n, &d)| if d { pad_id } else { n })
                .collect::<Vec<_>>(),
            (b, 1),
            &dev,
        )?;
        positions = Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    Ok(out)
}
