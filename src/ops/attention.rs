//! Causal scaled-dot-product attention with grouped-query heads (query head `h` reads
//! key/value head `h / (heads / kv_heads)`, as Hugging Face `repeat_kv`) and an optional
//! key padding mask, as a single op in the spirit of FlashAttention (Dao et al. 2022):
//! the forward keeps only the output and one log-sum-exp per query row, and the backward
//! recomputes the probabilities head by head. The composed version keeps the (b, h, t, s)
//! scores, their exponentials and the probabilities alive for every layer.
//!
//! Query row `i` sits at absolute position `q_offset + i` and sees key `j` iff
//! `j <= q_offset + i` and the key is not padding. Rows that see no key output zeros.
//!
//! Backward, per head with `P = softmax(S)`, `S = scale · Q Kᵀ`:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(dO ⊙ O))`, `dQ = scale · dS K`,
//! `dK = scale · dSᵀ Q`; heads sharing a key/value head are summed into one task's buffers.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    dot_f32, exp_f32, f32_data, is_cpu_f32, matmul_into, row_max, simd, storage_f32, sum_f32,
    CResult, MatView,
};
use crate::error::{Error, Result};

/// `softmax(q kᵀ / sqrt(d) + causal/padding mask) v` for `q (b, h, t, d)`,
/// `k`, `v (b, kv_heads, s, d)` and `key_mask (b, s)` (1 = keep, 0 = padding).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    q_offset: usize,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kvh, s, _) = k.dims4()?;
    if k.dims()[0] != b || k.dims()[3] != d || v.dims() != k.dims() {
        return Err(Error::ShapeMismatch {
            name: "causal_attention key/value".into(),
            expected: vec![b, kvh, s, d],
            got: if k.dims()[0] != b || k.dims()[3] != d {
                k.dims().to_vec()
            } else {
                v.dims().to_vec()
            },
        });
    }
    if kvh == 0 || h % kvh != 0 {
        return Err(Error::msg(format!(
            "causal_attention: {h} query heads are not a multiple of {kvh} key/value heads"
        )));
    }
    let keep = match key_mask {
        None => None,
        Some(m) if m.dims() == [b, s] => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(m.iter().map(|&x| x > 0.5).collect::<Vec<bool>>()))
        }
        Some(m) => {
            return Err(Error::ShapeMismatch {
                name: "causal_attention key_mask".into(),
                expected: vec![b, s],
                got: m.dims().to_vec(),
            })
        }
    };
    if !(is_cpu_f32(q) && is_cpu_f32(k) && is_cpu_f32(v)) {
        return super::reference::causal_attention(q, k, v, key_mask, q_offset);
    }
    let geo = Geometry {
        b,
        h,
        kvh,
        t,
        s,
        d,
        q_offset,
        scale: 1.0 / (d as f32).sqrt(),
        keep,
    };
    Ok(q.apply_op3(
        k,
        v,
        Attention {
            geo,
            lse: Mutex::new(None),
        },
    )?)
}

/// Query rows per block: a block's products use only the keys its last row can see, so a
/// causal square computes about (1 + 1/n_blocks) / 2 of the full score matrix.
const QUERY_BLOCK: usize = 64;

/// Query rows `i0 .. i0 + rows` against keys `lo .. lo + width`.
struct Block {
    i0: usize,
    rows: usize,
    lo: usize,
    width: usize,
}

#[derive(Clone)]
struct Geometry {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    s: usize,
    d: usize,
    q_offset: usize,
    scale: f32,
    keep: Option<Arc<Vec<bool>>>,
}

impl Geometry {
    fn rep(&self) -> usize {
        self.h / self.kvh
    }

    fn allowed(&self, bi: usize, i: usize, j: usize) -> bool {
        j <= self.q_offset + i && self.keep.as_ref().is_none_or(|k| k[bi * self.s + j])
    }

    /// The query blocks of batch row `bi` with the span of keys each can see (the causal
    /// limit of its last row, cut to the row's first and last unmasked key); blocks that
    /// see no key are left out (their rows output zeros).
    fn blocks(&self, bi: usize) -> impl Iterator<Item = Block> + '_ {
        let (lo, hi) = match &self.keep {
            None => (0, self.s),
            Some(k) => {
                let row = &k[bi * self.s..][..self.s];
                match row.iter().position(|&x| x) {
                    None => (0, 0),
                    Some(first) => (
                        first,
                        self.s - row.iter().rev().position(|&x| x).unwrap_or(0),
                    ),
                }
            }
        };
        (0..self.t).step_by(QUERY_BLOCK).filter_map(move |i0| {
            let rows = QUERY_BLOCK.min(self.t - i0);
            let end = hi.min(self.q_offset + i0 + rows);
            // `then`, not `then_some`: the width must not be computed for a block that sees
            // no key (end ≤ lo).
            (end > lo).then(|| Block {
                i0,
                rows,
                lo,
                width: end - lo,
            })
        })
    }

    /// Nothing to compute: the output (and every gradient) is all zeros.
    fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.d == 0 || self.s == 0
    }
}

struct Attention {
    geo: Geometry,
    /// Per query row log-sum-exp of the scaled, masked scores; +inf for rows seeing no key.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = &self.geo;
        let (t, s, d) = (g.t, g.s, g.d);
        let mut out = crate::ops::cpu::zeros(g.b * g.h * t * d);
        let mut lse = vec![f32::INFINITY; g.b * g.h * t];
        if !g.is_empty() {
            let q = f32_data(s1, l1, "causal-attention")?;
            let k = f32_data(s2, l2, "causal-attention")?;
            let v = f32_data(s3, l3, "causal-attention")?;
            out.par_chunks_mut(t * d)
                .zip(lse.par_chunks_mut(t))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (bi, hi) = (bh / g.h, bh % g.h);
                    let kv = bi * g.kvh + hi / g.rep();
                    let qh = &q[bh * t * d..][..t * d];
                    let kh = &k[kv * s * d..][..s * d];
                    let vh = &v[kv * s * d..][..s * d];
                    // Probabilities of one block of query rows against the keys it can see.
                    let mut p = crate::ops::cpu::zeros(QUERY_BLOCK.min(t) * s);
                    for blk in g.blocks(bi) {
                        let (i0, nb, lo, w) = (blk.i0, blk.rows, blk.lo, blk.width);
                        let p = &mut p[..nb * w];
                        matmul_into(
                            p,
                            MatView::rows(&qh[i0 * d..][..nb * d], nb, d),
                            MatView::rows(&kh[lo * d..][..w * d], w, d).t(),
                            g.scale,
                            false,
                            false,
                        );
                        let lse = &mut lse[i0..][..nb];
                        simd(
                            #[inline(always)]
                            || {
                                for (ii, row) in p.chunks_mut(w).enumerate() {
                                    for (jj, x) in row.iter_mut().enumerate() {
                                        if !g.allowed(bi, i0 + ii, lo + jj) {
                                            *x = f32::NEG_INFINITY;
                                        }
                                    }
                                    let max = row_max(row);
                                    if max == f32::NEG_INFINITY {
                                        row.iter_mut().for_each(|x| *x = 0.0);
                                        continue;
                                    }
                                    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
                                    let sum = sum_f32(row);
                                    lse[ii] = max + sum.ln() as f32;
                                    let inv = (1.0 / sum) as f32;
                                    row.iter_mut().for_each(|x| *x *= inv);
                                }
                            },
                        );
                        matmul_into(
                            &mut o[i0 * d..][..nb * d],
                            MatView::rows(p, nb, w),
                            MatView::rows(&vh[lo * d..][..w * d], w, d),
                            1.0,
                            false,
                            false,
                        );
                    }
                });
        }
        if let Ok(mut saved) = self.lse.lock() {
            *saved = Some(Arc::new(lse));
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.h, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.lock().ok().and_then(|s| s.clone()) {
            Some(l) => l,
            None => {
                return Err(candle_core::Error::Msg(
                    "causal_attention: backward before forward".into(),
                )
                .bt())
            }
        };
        let bwd = AttentionBwd {
            geo: self.geo.clone(),
            lse,
            out: res.clone(),
            dy: grad.clone(),
        };
        let packed = q.apply_op3_no_bwd(k, v, &bwd)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(k.shape())?;
        Ok((
            Some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

/// `(q, k, v) -> [dq, dk, dv]` packed flat, given the forward output and its gradient.
struct AttentionBwd {
    geo: Geometry,
    lse: Arc<Vec<f32>>,
    out: Tensor,
    dy: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = &self.geo;
        let (t, s, d, rep) = (g.t, g.s, g.d, g.rep());
        let (nq, nk) = (g.b * g.h * t * d, g.b * g.kvh * s * d);
        let mut packed = crate::ops::cpu::zeros(nq + 2 * nk);
        if g.is_empty() {
            return Ok((CpuStorage::F32(packed), Shape::from(nq + 2 * nk)));
        }
        let q = f32_data(s1, l1, "causal-attention-bwd")?;
        let k = f32_data(s2, l2, "causal-attention-bwd")?;
        let v = f32_data(s3, l3, "causal-attention-bwd")?;
        let (o_store, o_l) = self.out.storage_and_layout();
        let o = storage_f32(&o_store, o_l, "causal-attention-bwd")?;
        let (dy_store, dy_l) = self.dy.storage_and_layout();
        let dy = storage_f32(&dy_store, dy_l, "causal-attention-bwd")?;
        let (dq, dkv) = packed.split_at_mut(nq);
        let (dk, dv) = dkv.split_at_mut(nk);
        // One task per (batch, kv head): it owns that kv head's dK/dV and its heads' dQ.
        dq.par_chunks_mut(rep * t * d)
            .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
            .enumerate()
            .for_each(|(grp, (dq, (dk, dv)))| {
                let bi = grp / g.kvh;
                let kh = &k[grp * s * d..][..s * d];
                let vh = &v[grp * s * d..][..s * d];
                let cap = QUERY_BLOCK.min(t) * s;
                let mut p = crate::ops::cpu::zeros(cap);
                let mut ds = crate::ops::cpu::zeros(cap);
                for (r, dq) in dq.chunks_mut(t * d).enumerate() {
                    let bh = grp * rep + r;
                    let span = bh * t * d..(bh + 1) * t * d;
                    let (qh, oh, dyh) = (&q[span.clone()], &o[span.clone()], &dy[span]);
                    let lse = &self.lse[bh * t..][..t];
                    for blk in g.blocks(bi) {
                        let (i0, nb, lo, w) = (blk.i0, blk.rows, blk.lo, blk.width);
                        let (p, ds) = (&mut p[..nb * w], &mut ds[..nb * w]);
                        let (qb, dyb) = (&qh[i0 * d..][..nb * d], &dyh[i0 * d..][..nb * d]);
                        let (kb, vb) = (&kh[lo * d..][..w * d], &vh[lo * d..][..w * d]);
                        // P = exp(scale · Q Kᵀ - lse), masked entries exactly 0.
                        matmul_into(
                            p,
                            MatView::rows(qb, nb, d),
                            MatView::rows(kb, w, d).t(),
                            g.scale,
                            false,
                            false,
                        );
                        // dP = dO Vᵀ
                        matmul_into(
                            ds,
                            MatView::rows(dyb, nb, d),
                            MatView::rows(vb, w, d).t(),
                            1.0,
                            false,
                            false,
                        );
                        simd(
                            #[inline(always)]
                            || {
                                for ii in 0..nb {
                                    let i = i0 + ii;
                                    let prow = &mut p[ii * w..][..w];
                                    let drow = &mut ds[ii * w..][..w];
                                    let delta =
                                        dot_f32(&dyh[i * d..][..d], &oh[i * d..][..d]) as f32;
                                    for jj in 0..w {
                                        let pij = if g.allowed(bi, i, lo + jj) {
                                            exp_f32(prow[jj] - lse[i])
                                        } else {
                                            0.0
                                        };
                                        prow[jj] = pij;
                                        drow[jj] = pij * (drow[jj] - delta);
                                    }
                                }
                            },
                        );
                        let (pm, dsm) = (MatView::rows(p, nb, w), MatView::rows(ds, nb, w));
                        let kbm = MatView::rows(kb, w, d);
                        matmul_into(&mut dq[i0 * d..][..nb * d], dsm, kbm, g.scale, false, false);
                        matmul_into(
                            &mut dk[lo * d..][..w * d],
                            dsm.t(),
                            MatView::rows(qb, nb, d),
                            g.scale,
                            true,
                            false,
                        );
                        matmul_into(
                            &mut dv[lo * d..][..w * d],
                            pm.t(),
                            MatView::rows(dyb, nb, d),
                            1.0,
                            true,
                            false,
                        );
                    }
                }
            });
        Ok((CpuStorage::F32(packed), Shape::from(nq + 2 * nk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, randn};
    use crate::ops::reference;
    use candle_core::{Device, Var};

    /// Compares values and all three gradients with the composed reference.
    fn compare(
        dims_q: [usize; 4],
        kvh: usize,
        s: usize,
        mask: Option<&Tensor>,
        q_offset: usize,
        label: &str,
    ) -> Result<()> {
        let [b, _h, _t, d] = dims_q;
        let q = Var::from_tensor(&randn(&dims_q, 61)?)?;
        let k = Var::from_tensor(&randn(&[b, kvh, s, d], 62)?)?;
        let v = Var::from_tensor(&randn(&[b, kvh, s, d], 63)?)?;
        let y = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, q_offset)?;
        let y_ref = reference::causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask,
            q_offset,
        )?;
        let diff = max_abs_diff(&y, &y_ref)?;
        println!("attention {label} forward max |diff| = {diff:e}");
        assert!(diff < 1e-5);
        let proj = randn(&dims_q, 64)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let diff = max_abs_diff(g.get(var).expect("grad"), g_ref.get(var).expect("ref grad"))?;
            println!("attention {label} {name} max |diff| = {diff:e}");
            assert!(diff < 1e-5, "{name}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn gqa_with_padding_and_offset_matches_reference() -> Result<()> {
        // Left padding on the second sequence; queries start at absolute position 2.
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 1., 1.], [0., 0., 1., 1., 1., 1., 1.]],
            &Device::Cpu,
        )?;
        compare([2, 4, 5, 8], 2, 7, Some(&mask), 2, "gqa+mask+offset")?;
        compare([1, 3, 6, 4], 3, 6, None, 0, "mha square")?;
        Ok(())
    }

    #[test]
    fn query_blocks_match_reference() -> Result<()> {
        // Several query blocks (t > QUERY_BLOCK, last one partial): right padding on the
        // first sequence, left padding on the second, a third with every key padding.
        let (t, off) = (2 * QUERY_BLOCK + 11, 9);
        let s = t + off;
        let mut m = vec![0f32; 3 * s];
        for j in 0..s {
            m[j] = (j < s - 40) as u8 as f32;
            m[s + j] = (j >= 70) as u8 as f32;
        }
        let mask = Tensor::from_vec(m, (3, s), &Device::Cpu)?;
        compare([3, 4, t, 8], 2, s, Some(&mask), off, "blocks+mask+offset")?;
        compare([1, 2, t, 4], 1, t, None, 0, "blocks causal square")?;
        Ok(())
    }

    #[test]
    fn rows_seeing_no_key_are_zero() -> Result<()> {
        // Keys 0..2 are padding, so with q_offset 0 the first two queries see nothing.
        let mask = Tensor::new(&[[0f32, 0., 1., 1.]], &Device::Cpu)?;
        compare([1, 2, 4, 4], 1, 4, Some(&mask), 0, "fully masked rows")?;
        let q = randn(&[1, 2, 4, 4], 1)?;
        let k = randn(&[1, 1, 4, 4], 2)?;
        let y = causal_attention(&q, &k, &k, Some(&mask), 0)?;
        let first = y.narrow(2, 0, 2)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(first, 0.0);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let mask = Tensor::new(&[[1f32, 1., 0., 1., 1.]], &Device::Cpu)?;
        let q = randn(&[1, 2, 3, 4], 71)?;
        let k = randn(&[1, 1, 5, 4], 72)?;
        let v = randn(&[1, 1, 5, 4], 73)?;
        let rep = finite_difference_check(
            "causal_attention",
            |t: &[Tensor]| causal_attention(&t[0], &t[1], &t[2], Some(&mask), 2),
            &[q, k, v],
            &[0, 1, 2],
            1e-2,
        )?;
        rep.assert_within(1e-3);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let q = randn(&[1, 3, 2, 4], 1)?;
        let k = randn(&[1, 2, 2, 4], 2)?;
        assert!(causal_attention(&q, &k, &k, None, 0).is_err());
        let k = randn(&[1, 1, 2, 4], 2)?;
        let bad_mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu)?;
        assert!(matches!(
            causal_attention(&q, &k, &k, Some(&bad_mask), 0),
            Err(Error::ShapeMismatch { .. })
        ));
        Ok(())
    }
}
