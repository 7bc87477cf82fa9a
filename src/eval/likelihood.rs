//! Likelihood scoring of answer candidates: log P(continuation | prompt) as a sum of token
//! log-probabilities, for every candidate of a batch of prompts at once.
//!
//! Tokenisation: a byte-level BPE tokenises `prompt + continuation` differently from the two
//! halves (the prompt's trailing spaces merge with the first word), so each candidate is
//! tokenised jointly and the context is the longest token prefix shared by the prompt and
//! every candidate. Continuations are the remaining tokens; they share the context exactly, so
//! the context (with the start the continuations have in common) is run once per prompt and
//! its KV cache copied to each candidate's row.
//! No end-of-sequence token is appended to the continuation.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::io::TextTokenizer;
use crate::models::beam::log_softmax_row;
use crate::models::prefill::{prefill, sharing_enabled};
use crate::models::CausalLm;
use crate::models::Ctx;

/// One prompt's shared context and the tokens of each candidate continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

/// Tokenises `prompt + c` for every continuation `c` and splits off the common context.
pub fn tokenize_candidates(
    tok: &TextTokenizer,
    prompt: &str,
    continuations: &[String],
) -> Result<Candidates> {
    if continuations.is_empty() {
        return Err(Error::msg("no candidate continuation to score"));
    }
    let prompt_ids = tok.encode(prompt)?;
    let full: Vec<Vec<u32>> = continuations
        .iter()
        .map(|c| tok.encode(&format!("{prompt}{c}")))
        .collect::<Result<_>>()?;
    let mut shared = prompt_ids.len();
    for f in &full {
        let common = prompt_ids.iter().zip(f).take_while(|(a, b)| a == b).count();
        // At least one token of every continuation must remain to be scored.
        shared = shared.min(common).min(f.len().saturating_sub(1));
    }
    if shared == 0 {
        return Err(Error::msg("prompt and continuations share no leading token; cannot score a continuation without context"));
    }
    Ok(Candidates {
        context: prompt_ids[..shared].to_vec(),
        continuations: full.into_iter().map(|f| f[shared..].to_vec()).collect(),
    })
}

/// Sum of log P(token) over `targets`, where row `j` of `logp` is the distribution of `targets[j]`.
fn gather_sum(rows: &[Vec<f32>], targets: &[u32]) -> f64 {
    rows.iter()
        .zip(targets)
        .map(|(r, &t)| r[t as usize] as f64)
        .sum()
}

/// Scores of every candidate of every item, batched.
///
/// The candidates of an item usually share the start of their continuation as well ("the
/// correct answer is answer" before 1, 2, 3 or 4): that part is the same tokens after the
/// same context, so it is appended to the context and scored once per item. One prefill of
/// these extended contexts (their batch-wide shared prefix once, `models::prefill`) gives
/// the shared part's log-probabilities and every candidate's first own token; one forward of
/// all right-padded remainders, on copies of the context cache, scores the rest (skipped when
/// no candidate has more than one own token).
pub fn score_batch(
    model: &dyn CausalLm,
    items: &[Candidates],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>> {
    if items.is_empty() {
        return Ok(vec![]);
    }
    let v = model.vocab_size();
    for it in items {
        if it.continuations.iter().any(|c| c.is_empty()) {
            return Err(Error::msg("empty candidate continuation"));
        }
        if it.context.is_empty() {
            return Err(Error::msg("cannot score a continuation without context"));
        }
        if let Some(&bad) = it
            .context
            .iter()
            .chain(it.continuations.iter().flatten())
            .find(|&&t| t as usize >= v)
        {
            return Err(Error::msg(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
    }
    let dev = model.device().clone();
    let ctx = Ctx::eval();
    let b = items.len();
    // q[i]: tokens every candidate of item i begins with, leaving each at least one of its own.
    // (`LORA_DASH_SHARED_PREFIX=0` turns this off with the batch-wide prefix sharing.)
    let share = sharing_enabled();
    let q: Vec<usize> = items
        .iter()
        .map(|it| {
            if !share {
                return 0;
            }
            let c0 = &it.continuations[0];
            it.continuations
                .iter()
                .map(|c| {
                    c0.iter()
                        .zip(c)
                        .take_while(|(x, y)| x == y)
                        .count()
                        .min(c.len() - 1)
                })
                .min()
                .unwrap_or(0)
        })
        .collect();
    let contexts: Vec<Vec<u32>> = items
        .iter()
        .zip(&q)
        .map(|(it, &q)| {
            it.context
                .iter()
                .chain(&it.continuations[0][..q])
                .copied()
                .collect()
        })
        .collect();
    // The last q + 1 positions of an extended context predict its q shared tokens and the
    // candidates' first own token.
    let keep = q.iter().max().copied().unwrap_or(0) + 1;
    let pre = prefill(model, &contexts, pad_id, keep, &ctx)?;
    let t = pre.width;
    let mut cache = pre.cache;
    let tail: Vec<f32> = model
        .logits(&pre.tail, &ctx)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?; // b·keep·v
    let mut shared_score = Vec::with_capacity(b);
    let mut first = Vec::with_capacity(b);
    for (i, it) in items.iter().enumerate() {
        let row = |j: usize| log_softmax_row(&tail[(i * keep + j) * v..(i * keep + j + 1) * v]);
        let start = keep - (q[i] + 1);
        let lps: Vec<Vec<f32>> = (start..keep - 1).map(row).collect();
        shared_score.push(gather_sum(&lps, &it.continuations[0][..q[i]]));
        first.push(row(keep - 1));
    }

    // One row per (item, candidate); row r continues the cache of item owner[r] with the
    // candidate's own tokens.
    let mut owner = Vec::new();
    let mut conts: Vec<&[u32]> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        for c in &it.continuations {
            owner.push(i);
            conts.push(&c[q[i]..]);
        }
    }
    let rows = owner.len();
    let mut scores: Vec<f64> = conts
        .iter()
        .zip(&owner)
        .map(|(c, &i)| shared_score[i] + first[i][c[0] as usize] as f64)
        .collect();

    // Feed every remainder but its last token: position j predicts token j+1.
    let w = conts.iter().map(|c| c.len() - 1).max().unwrap_or(0);
    if w > 0 {
        let sel = Tensor::from_vec(
            owner.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            rows,
            &dev,
        )?;
        cache.select_rows(&sel)?;
        let s = t + w;
        let mut ids = Vec::with_capacity(rows * w);
        let mut m = Vec::with_capacity(rows * s);
        let mut pos = Vec::with_capacity(rows * w);
        for (c, &i) in conts.iter().zip(&owner) {
            let n = c.len() - 1;
            ids.extend(
                c[..n]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, w - n)),
            );
            m.extend_from_slice(&pre.mask[i * t..(i + 1) * t]);
            m.extend(std::iter::repeat_n(1f32, n).chain(std::iter::repeat_n(0f32, w - n)));
            pos.extend((0..w).map(|j| (pre.lens[i] + j) as u32));
        }
        let ids = Tensor::from_vec(ids, (rows, w), &dev)?;
        let m = Tensor::from_vec(m, (rows, s), &dev)?;
        let pos = Tensor::from_vec(pos, (rows, w), &dev)?;
        let h = model.forward_hidden(&ids, Some(&m), Some(&pos), Some(&mut cache), &ctx)?; // (rows, w, e)
        let logits: Vec<f32> = model
            .logits(&h, &ctx)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?; // rows·w·v
        for (r, c) in conts.iter().enumerate() {
            let n = c.len() - 1;
            let base = r * w * v;
            let lps: Vec<Vec<f32>> = (0..n)
                .map(|j| log_softmax_row(&logits[base + j * v..base + (j + 1) * v]))
                .collect();
            scores[r] += gather_sum(&lps, &c[1..]);
        }
    }
    let mut out = Vec::with_capacity(b);
    let mut at = 0;
    for it in items {
        out.push(scores[at..at + it.continuations.len()].to_vec());
        at += it.continuations.len();
    }
    Ok(out)
}

/// Reference scores of one item: each candidate run alone, context and continuation in one
/// forward without cache or padding. Slow; for checking [`score_batch`].
pub fn score_naive(model: &dyn CausalLm, item: &Candidates) -> Result<Vec<f64>> {
    let ctx = Ctx::eval();
    let v = model.vocab_size();
    let n_ctx = item.context.len();
    if n_ctx == 0 {
        return Err(Error::msg("cannot score a continuation without context"));
    }
    item.continuations
        .iter()
        .map(|c| {
            let ids: Vec<u32> = item.context.iter().chain(c).copied().collect();
            let n = ids.len();
            let logits =
                model.forward(&Tensor::from_vec(ids, (1, n), model.device())?, None, &ctx)?; // (1, n, v)
            let flat: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let rows: Vec<Vec<f32>> = (n_ctx - 1..n - 1)
                .map(|p| log_softmax_row(&flat[p * v..(p + 1) * v]))
                .collect();
            Ok(gather_sum(&rows, c))
        })
        .collect()
}
