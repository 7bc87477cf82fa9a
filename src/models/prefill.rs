//! The prompt forward of a decoding batch (greedy generation, beam search, likelihood
//! scoring), with the batch's shared token prefix computed once.
//!
//! Prompts built from one template begin with the same tokens (the commonsense prompt's
//! header is 33 tokens, about a third of an ARC prompt), and under causal attention the keys
//! and values of a shared prefix do not depend on what follows it. So the batch's longest
//! common prefix runs once, as a batch of one, its cache is copied to every row, and each
//! row's remaining tokens run after it, left-padded. A row's key positions are then
//! `[shared prefix | padding | own tokens]`, masked so that padding is never attended, with
//! RoPE positions counting real tokens only: every row computes what it computes alone, up to
//! the order of floating-point additions.
//!
//! `LORA_DASH_SHARED_PREFIX=0` turns the sharing off (one left-padded forward of the whole
//! prompts; likelihood scoring then also runs each candidate's whole continuation), for
//! comparisons.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::models::{CausalLm, Ctx, KvCache};

/// The state after a batch's prompt forward.
pub struct Prefilled {
    pub cache: KvCache,
    /// Key mask over the cached positions, (b, width) row-major: 1 real, 0 padding.
    pub mask: Vec<f32>,
    /// Number of cached positions.
    pub width: usize,
    /// Final hidden states of each row's last `keep` prompt tokens, (b, keep, e).
    pub tail: Tensor,
    /// Each row's prompt length, which is also the RoPE position of its next token.
    pub lens: Vec<usize>,
    /// Number of leading tokens computed once for the whole batch.
    pub shared: usize,
}

/// Whether [`prefill`] shares prefixes (`LORA_DASH_SHARED_PREFIX=0` turns it off).
pub fn sharing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORA_DASH_SHARED_PREFIX").map_or(true, |v| v != "0"))
}

/// Length of the prefix worth computing once: the longest common prefix of all prompts,
/// leaving every row at least `keep` tokens of its own (its last positions give the
/// next-token logits), and 0 when the saving, `(b − 1) · P` token positions, is below 32 (a forward of
/// a few positions still reads every weight once).
pub fn shared_prefix_len(prompts: &[Vec<u32>], keep: usize) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let mut p = prompts
        .iter()
        .map(|x| x.len())
        .min()
        .unwrap_or(0)
        .saturating_sub(keep.max(1));
    for x in &prompts[1..] {
        p = p.min(first.iter().zip(x).take_while(|(a, b)| a == b).count());
    }
    if (prompts.len() - 1) * p < 32 {
        0
    } else {
        p
    }
}

/// Runs the prompts (each at least `keep` tokens long) through `model` into a fresh cache
/// and returns the hidden states of their last `keep` tokens; shares their common prefix
/// when [`sharing_enabled`].
pub fn prefill(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    keep: usize,
    ctx: &Ctx,
) -> Result<Prefilled> {
    let shared = if sharing_enabled() {
        shared_prefix_len(prompts, keep)
    } else {
        0
    };
    prefill_sharing(model, prompts, pad_id, shared, keep, ctx)
}

/// [`prefill`] with the first `shared` tokens (common to every prompt, which each keep at
/// least `keep` tokens after them) computed once; `shared = 0` is one left-padded forward of
/// the whole prompts.
pub fn prefill_sharing(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    shared: usize,
    keep: usize,
    ctx: &Ctx,
) -> Result<Prefilled> {
    if keep == 0 {
        return Err(Error::msg("prefill: keep at least one position"));
    }
    if prompts.is_empty() {
        return Err(Error::msg("no prompt to run"));
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::msg("cannot decode from an empty prompt"));
    }
    if prompts
        .iter()
        .any(|p| p.len() < shared + keep || p[..shared] != prompts[0][..shared])
    {
        return Err(Error::msg(format!(
            "prefill: {shared} shared tokens are not a common prefix with {keep} more tokens in every prompt"
        )));
    }
    let dev = model.device().clone();
    let b = prompts.len();
    let mut cache = KvCache::new();
    if shared > 0 {
        let ids = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), &dev)?;
        model.forward_hidden(&ids, None, None, Some(&mut cache), ctx)?;
        cache.select_rows(&Tensor::zeros(b, candle_core::DType::U32, &dev)?)?;
    }
    let t = prompts.iter().map(|p| p.len() - shared).max().unwrap_or(0);
    let width = shared + t;
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * width);
    let mut pos = Vec::with_capacity(b * t);
    for p in prompts {
        let own = p.len() - shared;
        let pad = t - own;
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p[shared..].iter().copied()));
        mask.extend(std::iter::repeat_n(1f32, shared));
        mask.extend(std::iter::repeat_n(0f32, pad).chain(std::iter::repeat_n(1f32, own)));
        pos.extend(std::iter::repeat_n(0u32, pad).chain(shared as u32..p.len() as u32));
    }
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let m = Tensor::from_vec(mask.clone(), (b, width), &dev)?;
    let pos = Tensor::from_vec(pos, (b, t), &dev)?;
    let h = model.forward_hidden(&ids, Some(&m), Some(&pos), Some(&mut cache), ctx)?;
    Ok(Prefilled {
        cache,
        mask,
        width,
        tail: h.narrow(1, t - keep, keep)?,
        lens: prompts.iter().map(|p| p.len()).collect(),
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::shared_prefix_len;

    #[test]
    fn shared_prefix_leaves_every_row_a_token_and_skips_small_savings() {
        let base: Vec<u32> = (0..40).collect();
        let mut a = base.clone();
        a.extend([100, 101]);
        let mut b = base.clone();
        b.extend([200]);
        // Common 40, both longer: all 40 shared.
        assert_eq!(shared_prefix_len(&[a.clone(), b.clone()], 1), 40);
        // One prompt is the prefix itself: it keeps its last token.
        assert_eq!(shared_prefix_len(&[a.clone(), base.clone()], 1), 39);
        // A saving under 32 positions is not worth a forward.
        assert_eq!(
            shared_prefix_len(&[a[..20].to_vec(), b[..20].to_vec()], 1),
            0
        );
        assert_eq!(
            shared_prefix_len(
                &[
                    a[..12].to_vec(),
                    a[..13].to_vec(),
                    a[..14].to_vec(),
                    a[..15].to_vec()
                ],
                1
            ),
            11
        );
        assert_eq!(shared_prefix_len(&[a.clone()], 1), 0);
        // Rows keep `keep` tokens: the last 3 of the shortest.
        assert_eq!(shared_prefix_len(&[a.clone(), base.clone()], 3), 37);
        assert_eq!(shared_prefix_len(&[vec![1, 2, 3], vec![4, 5, 6]], 1), 0);
    }
}
