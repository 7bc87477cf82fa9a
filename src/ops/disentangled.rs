//! DeBERTa's disentangled self-attention (He et al. 2021, "DeBERTa: Decoding-enhanced BERT
//! with Disentangled Attention"; transformers 4.46.3 `DisentangledSelfAttention` and
//! `XSoftmax`, `modeling_deberta_v2.py`):
//!
//! `S[i][j] = scale · (q_i · k_j + q_i · pk[c2p[i][j]] + k_j · pq[p2c[i][j]])`,
//! `softmax` over the keys `j` under the pairwise padding mask `m_i · m_j`, times v.
//!
//! `pk` / `pq` (h, 2·span, d) are the projected relative embeddings (content-to-position
//! and position-to-content terms, either optional) and `c2p` / `p2c` the (t, t) bucket
//! tables ([`RelIndex`]). As `XSoftmax`, masked pairs get probability exactly 0, so a
//! padding query row (`m_i = 0`) outputs zeros.
//!
//! On the CPU in f32 the fused op (`fused.rs`, backward in `fused/backward.rs`) runs;
//! elsewhere the composed [`reference`] built from candle ops with gradients.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

mod fused;

/// The gather tables of the relative terms for t positions: `c2p[i·t + j]` and
/// `p2c[i·t + j]`, each below `2 · span`.
#[derive(Clone)]
pub struct RelIndex {
    pub t: usize,
    pub span: usize,
    pub c2p: Arc<Vec<u32>>,
    pub p2c: Arc<Vec<u32>>,
    /// Smallest and largest index in either table: only rows `lo..=hi` of the relative
    /// projections are read (for t positions fewer than 2·span when t < span).
    pub lo: usize,
    pub hi: usize,
}

impl RelIndex {
    /// Checks the tables' sizes and ranges.
    pub fn new(t: usize, span: usize, c2p: Vec<u32>, p2c: Vec<u32>) -> Result<Self> {
        let n = 2 * span as u32;
        if c2p.len() != t * t || p2c.len() != t * t {
            return Err(Error::msg(format!(
                "disentangled attention: index tables of {} and {} entries for {t} positions",
                c2p.len(),
                p2c.len()
            )));
        }
        if c2p.iter().chain(&p2c).any(|&i| i >= n) {
            return Err(Error::msg(format!(
                "disentangled attention: an index is outside the 2·span = {n} relative embeddings"
            )));
        }
        let all = || c2p.iter().chain(&p2c).map(|&i| i as usize);
        let (lo, hi) = (all().min().unwrap_or(0), all().max().unwrap_or(0));
        Ok(RelIndex {
            t,
            span,
            c2p: Arc::new(c2p),
            p2c: Arc::new(p2c),
            lo,
            hi,
        })
    }
}

/// Disentangled attention for `q`, `k`, `v` (b, h, t, d); `pos_key` / `pos_query`
/// (h, 2·span, d) with `rel` when the model has relative attention; `mask` (b, t) 1 for
/// real tokens, 0 for padding. Returns (b, h, t, d).
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos_key: Option<&Tensor>,
    pos_query: Option<&Tensor>,
    rel: Option<&RelIndex>,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    check(q, k, v, pos_key, pos_query, rel, mask)?;
    let cpu = [q, k, v]
        .into_iter()
        .chain(pos_key)
        .chain(pos_query)
        .all(super::cpu::is_cpu_f32);
    if cpu {
        fused::disentangled_attention(q, k, v, pos_key, pos_query, rel, mask, scale)
    } else {
        reference::disentangled_attention(q, k, v, pos_key, pos_query, rel, mask, scale)
    }
}

fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos_key: Option<&Tensor>,
    pos_query: Option<&Tensor>,
    rel: Option<&RelIndex>,
    mask: Option<&Tensor>,
) -> Result<()> {
    let (b, h, t, d) = q.dims4()?;
    let shape = |name: &str, x: &Tensor, want: Vec<usize>| -> Result<()> {
        if x.dims() != want.as_slice() {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: want,
                got: x.dims().to_vec(),
            });
        }
        Ok(())
    };
    shape("disentangled attention key", k, vec![b, h, t, d])?;
    shape("disentangled attention value", v, vec![b, h, t, d])?;
    if let Some(m) = mask {
        shape("disentangled attention mask", m, vec![b, t])?;
    }
    if pos_key.is_some() || pos_query.is_some() {
        let Some(r) = rel else {
            return Err(Error::msg(
                "disentangled attention: position projections without index tables",
            ));
        };
        if r.t != t {
            return Err(Error::msg(format!(
                "disentangled attention: index tables for {} positions, inputs have {t}",
                r.t
            )));
        }
        for (name, p) in [("position key", pos_key), ("position query", pos_query)] {
            if let Some(p) = p {
                shape(
                    &format!("disentangled attention {name}"),
                    p,
                    vec![h, 2 * r.span, d],
                )?;
            }
        }
    }
    Ok(())
}

/// Composed reference from candle ops with gradients: materialises the (b, h, t, 2·span)
/// relative scores and gathers them as transformers does.
pub mod reference {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub fn disentangled_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos_key: Option<&Tensor>,
        pos_query: Option<&Tensor>,
        rel: Option<&RelIndex>,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, h, t, _d) = q.dims4()?;
        let dev = q.device();
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let mut scores = (q.matmul(&k.t()?)? * scale)?; // (b, h, t, t)
        let table = |ix: &[u32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(ix, (1, 1, t, t), dev)?
                .broadcast_as((b, h, t, t))?
                .contiguous()?)
        };
        if let (Some(pk), Some(r)) = (pos_key, rel) {
            // (b, h, t, d) · (1, h, d, 2span) -> (b, h, t, 2span), gathered by bucket.
            let c = q.broadcast_matmul(&pk.t()?.unsqueeze(0)?)?;
            let c2p = c.gather(&table(&r.c2p)?, 3)?; // (b, h, t, t)
            scores = (scores + (c2p * scale)?)?;
        }
        if let (Some(pq), Some(r)) = (pos_query, rel) {
            // transformers gathers key rows with index [a][c] = clamp(span - rel[a][c]),
            // which is p2c transposed, then transposes the result.
            let c = k.broadcast_matmul(&pq.t()?.unsqueeze(0)?)?; // (b, h, t, 2span)
            let ix_t: Vec<u32> = (0..t * t).map(|n| r.p2c[(n % t) * t + n / t]).collect();
            let p2c = c.gather(&table(&ix_t)?, 3)?.transpose(2, 3)?; // (b, h, t, t)
            scores = (scores + (p2c * scale)?)?;
        }
        let p = match mask {
            None => crate::ops::reference::softmax_last_dim(&scores)?,
            Some(m) => {
                let m = m.to_dtype(DType::F32)?; // (b, t)
                let pair = m
                    .unsqueeze(2)?
                    .broadcast_mul(&m.unsqueeze(1)?)?
                    .unsqueeze(1)?; // (b, 1, t, t)
                let neg = ((&pair - 1.0)? * 1e9)?;
                crate::ops::reference::softmax_last_dim(&scores.broadcast_add(&neg)?)?
                    .broadcast_mul(&pair)?
            }
        };
        Ok(p.matmul(&v)?)
    }
}

#[cfg(test)]
mod tests;
