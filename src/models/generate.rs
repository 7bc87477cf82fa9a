//! Batched greedy decoding with a KV cache. Prompts are left-padded after their shared prefix
//! (`models::prefill`), positions follow the attention mask (as transformers' `generate`), so
//! every row decodes as if alone.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::prefill::prefill;
use crate::models::{CausalLm, Ctx};

/// Generated token ids per prompt (without the prompt, stopping before any of `eos`).
pub fn generate_greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::msg("cannot generate from an empty prompt"));
    }
    if prompts.is_empty() || max_new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let dev = model.device().clone();
    let b = prompts.len();
    let ctx = Ctx::eval();
    let pre = prefill(model, prompts, pad_id, 1, &ctx)?;
    let mut cache = pre.cache;
    let mut mask_all = pre.mask;
    let mut next_pos: Vec<u32> = pre.lens.iter().map(|&l| l as u32).collect();
    let mut last = pre.tail; // (b, 1, e)
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..max_new_tokens {
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
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        // One more key column per row: (b, s) -> (b, s+1).
        let s = cache.len();
        let mut grown = Vec::with_capacity(b * (s + 1));
        for i in 0..b {
            grown.extend_from_slice(&mask_all[i * s..(i + 1) * s]);
            grown.push(1.0);
        }
        mask_all = grown;
        let input = Tensor::from_vec(
            next.iter()
                .zip(&done)
                .map(|(&n, &d)| if d { pad_id } else { n })
                .collect::<Vec<_>>(),
            (b, 1),
            &dev,
        )?;
        let positions = Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let m = Tensor::from_vec(mask_all.clone(), (b, s + 1), &dev)?;
        last = model.forward_hidden(&input, Some(&m), Some(&positions), Some(&mut cache), &ctx)?;
    }
    Ok(out)
}
