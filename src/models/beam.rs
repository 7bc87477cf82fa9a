//! Batched beam search with a KV cache, following transformers 4.46 `_beam_search` with
//! `BeamSearchScorer` (`do_sample=False`, no logits processors, one returned sequence).
//!
//! What is implemented, step by step:
//! * prompts are left-padded and prefilled once (their shared prefix once per batch:
//!   `models::prefill`); the cache is then copied to `num_beams` rows
//!   per prompt (transformers prefills every copy, with the same result);
//! * beam scores start at 0 for beam 0 and −1e9 for the others, so the first step expands
//!   beam 0 only;
//! * each step adds the f32 log-softmax of the next-token logits to the beam scores and keeps
//!   the top `max(2, 1 + n_eos) · num_beams` of the `num_beams · vocab` candidates per prompt,
//!   best first;
//! * walking those candidates in order, an end-of-sequence token ranked within the first
//!   `num_beams` closes a hypothesis (tokens so far, EOS excluded) with score
//!   `sum_logprobs / generated_len^length_penalty`, where `generated_len` counts the EOS; any
//!   other token extends a beam, until `num_beams` beams are filled;
//! * a finished-hypothesis list keeps the best `num_beams`; a prompt is done when it holds
//!   `num_beams` hypotheses and its worst one scores at least
//!   `best candidate sum_logprobs / generated_len^length_penalty` (transformers' default
//!   `early_stopping=False` heuristic); done prompts keep decoding pad tokens, ignored;
//! * decoding stops when every prompt is done or after `max_new_tokens` tokens; open beams are
//!   then added as hypotheses (score divided by their length), and the best one is returned.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::prefill::prefill;
use crate::models::{CausalLm, Ctx};

/// Log-softmax of one row of logits, in f32 with an f64 normaliser.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// The finished hypotheses of one prompt (transformers' `BeamHypotheses`).
struct Hypotheses {
    beams: Vec<(f64, Vec<u32>)>,
    worst: f64,
    capacity: usize,
    length_penalty: f64,
}

impl Hypotheses {
    fn new(capacity: usize, length_penalty: f64) -> Self {
        Hypotheses {
            beams: Vec::new(),
            worst: 1e9,
            capacity,
            length_penalty,
        }
    }

    fn add(&mut self, tokens: Vec<u32>, sum_logprobs: f64, generated_len: usize) {
        let score = sum_logprobs / (generated_len as f64).powf(self.length_penalty);
        if self.beams.len() < self.capacity || score > self.worst {
            self.beams.push((score, tokens));
            if self.beams.len() > self.capacity {
                // Drop the worst; the new worst is the second-worst before the drop.
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&a, &b| self.beams[a].0.total_cmp(&self.beams[b].0));
                self.worst = self.beams[order[1]].0;
                self.beams.remove(order[0]);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    fn is_done(&self, best_sum_logprobs: f64, generated_len: usize) -> bool {
        self.beams.len() >= self.capacity
            && self.worst >= best_sum_logprobs / (generated_len as f64).powf(self.length_penalty)
    }

    /// Highest score; on ties the later hypothesis, as Python's stable sort then `pop()`.
    fn best(self) -> Vec<u32> {
        let mut best: Option<(f64, Vec<u32>)> = None;
        for (s, t) in self.beams {
            if best.as_ref().is_none_or(|(bs, _)| s >= *bs) {
                best = Some((s, t));
            }
        }
        best.map(|b| b.1).unwrap_or_default()
    }
}

/// The `keep` best (score, flat index) pairs of `scores`, best first; ties keep the lower index.
fn top_k(scores: impl Iterator<Item = f32>, keep: usize) -> Vec<(f32, usize)> {
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(keep + 1);
    for (i, s) in scores.enumerate() {
        // Only strictly better scores enter a full list (NaN never does).
        if top.len() == keep && s.partial_cmp(&top[keep - 1].0) != Some(std::cmp::Ordering::Greater)
        {
            continue;
        }
        let at = top.iter().position(|&(ts, _)| s > ts).unwrap_or(top.len());
        top.insert(at, (s, i));
        top.truncate(keep);
    }
    top
}

/// Beam-search continuations of each prompt (without the prompt, without EOS).
pub fn generate_beam(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    max_new_tokens: usize,
    eos: &[u32],
    num_beams: usize,
    length_penalty: f64,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || max_new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    if num_beams == 0 {
        return Err(Error::config("num_beams", "must be at least 1"));
    }
    let dev = model.device().clone();
    let ctx = Ctx::eval();
    let k = num_beams;
    let b = prompts.len();
    let rows = b * k;
    // Prefill once per prompt (its shared prefix once per batch), then copy each prompt's
    // cache to its k beams.
    let pre = prefill(model, prompts, pad_id, 1, &ctx)?;
    let mut cache = pre.cache;
    let last = pre.tail; // (b, 1, e)
    let expand: Vec<u32> = (0..rows).map(|r| (r / k) as u32).collect();
    let expand = Tensor::from_vec(expand, rows, &dev)?;
    let mut logits = model
        .logits(&last, &ctx)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .index_select(&expand, 0)?; // (rows, v)
    cache.select_rows(&expand)?;

    let v = model.vocab_size();
    let keep = 2usize.max(1 + eos.len()) * k;
    let mut beam_scores: Vec<f32> = (0..rows)
        .map(|r| if r % k == 0 { 0.0 } else { -1e9 })
        .collect();
    let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut hyps: Vec<Hypotheses> = (0..b).map(|_| Hypotheses::new(k, length_penalty)).collect();
    let mut done = vec![false; b];
    for step in 0..max_new_tokens {
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if flat.len() != rows * v {
            return Err(Error::ShapeMismatch {
                name: "beam logits".into(),
                expected: vec![rows, v],
                got: logits.dims().to_vec(),
            });
        }
        let logp: Vec<Vec<f32>> = flat.chunks(v).map(log_softmax_row).collect();
        let generated_len = step + 1; // includes the token chosen now
        let mut next_scores = vec![0f32; rows];
        let mut next_tokens = vec![pad_id; rows];
        let mut next_src = vec![0usize; rows];
        for i in 0..b {
            if done[i] {
                // Keep the rows alive with pad tokens; their output is already final.
                for j in 0..k {
                    next_src[i * k + j] = i * k;
                }
                continue;
            }
            let cand = (0..k).flat_map(|j| {
                let r = i * k + j;
                let bs = beam_scores[r];
                logp[r].iter().map(move |&x| x + bs)
            });
            let top = top_k(cand, keep);
            let mut filled = 0;
            for (rank, &(score, flat_idx)) in top.iter().enumerate() {
                let (src, tok) = (i * k + flat_idx / v, (flat_idx % v) as u32);
                if eos.contains(&tok) {
                    if rank < k {
                        hyps[i].add(seqs[src].clone(), score as f64, generated_len);
                    }
                } else {
                    let r = i * k + filled;
                    next_scores[r] = score;
                    next_tokens[r] = tok;
                    next_src[r] = src;
                    filled += 1;
                }
                if filled == k {
                    break;
                }
            }
            if filled < k {
                return Err(Error::msg(format!(
                    "beam search: too few non-EOS candidates among the top {keep}"
                )));
            }
            let best = top
                .first()
                .map(|&(s, _)| s as f64)
                .unwrap_or(f64::NEG_INFINITY);
            done[i] = hyps[i].is_done(best, generated_len);
        }
        seqs = (0..rows)
            .map(|r| {
                let mut s = seqs[next_src[r]].clone();
                s.push(next_tokens[r]);
                s
            })
            .collect();
        beam_scores = next_scores;
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        let src = Tensor::from_vec(
            next_src.iter().map(|&s| s as u32).collect::<Vec<_>>(),
            rows,
            &dev,
        )?;
        cache.select_rows(&src)?;
        // Mask (rows, t + step + 1): the prompt's key mask, then one real column per new token.
        let t = pre.width;
        let s = t + step + 1;
        let mut m = Vec::with_capacity(rows * s);
        for r in 0..rows {
            let i = r / k;
            m.extend_from_slice(&pre.mask[i * t..(i + 1) * t]);
            m.extend(std::iter::repeat_n(1f32, step + 1));
        }
        let m = Tensor::from_vec(m, (rows, s), &dev)?;
        let pos: Vec<u32> = (0..rows).map(|r| (pre.lens[r / k] + step) as u32).collect();
        let pos = Tensor::from_vec(pos, (rows, 1), &dev)?;
        let input = Tensor::from_vec(next_tokens, (rows, 1), &dev)?;
        let h = model.forward_hidden(&input, Some(&m), Some(&pos), Some(&mut cache), &ctx)?; // (rows, 1, e)
        logits = model.logits(&h, &ctx)?.squeeze(1)?.to_dtype(DType::F32)?; // (rows, v)
    }
    let mut out = Vec::with_capacity(b);
    for (i, mut h) in hyps.into_iter().enumerate() {
        if !done[i] {
            for j in 0..k {
                let r = i * k + j;
                h.add(seqs[r].clone(), beam_scores[r] as f64, seqs[r].len());
            }
        }
        out.push(h.best());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let got = top_k([1.0f32, 3.0, 2.0, 3.0, -1.0].into_iter(), 3);
        assert_eq!(got, vec![(3.0, 1), (3.0, 3), (2.0, 2)]);
    }

    #[test]
    fn hypotheses_keep_the_best_and_stop_like_transformers() {
        let mut h = Hypotheses::new(2, 1.0);
        h.add(vec![1], -4.0, 2); // score -2
        assert!(!h.is_done(-1.0, 2), "only one hypothesis");
        h.add(vec![2], -3.0, 3); // score -1
        assert_eq!(h.worst, -2.0);
        // Best open beam could still reach -1.5 > worst -2: not done.
        assert!(!h.is_done(-3.0, 2));
        assert!(h.is_done(-5.0, 2));
        h.add(vec![3], -1.5, 3); // score -0.5 evicts -2
        assert_eq!(h.beams.len(), 2);
        assert_eq!(h.worst, -1.0);
        assert_eq!(h.best(), vec![3]);
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax_row(&[1.0, 2.0, 3.0, 1000.0]);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        println!("sum of probabilities: {total}");
        assert!((total - 1.0).abs() < 1e-6);
    }
}
