//! The fused CPU f32 kernel of disentangled attention. Per (batch, head), the forward forms
//! `S = scale · (Q Kᵀ + gather_c2p(Q PKᵀ) + gather_p2c(K PQᵀ)ᵀ)` in one (t, t) buffer (the
//! relative products are (t, 2·span) and gathered by bucket while added), applies the
//! pairwise padding mask, and keeps only the output and one log-sum-exp per query row, as
//! the encoder attention op does. The backward (`backward.rs`) recomputes the
//! probabilities.
//!
//! q, k and v travel stacked in one contiguous (3, b, h, t, d) tensor and the position
//! projections in one (n, h, 2·span, d) tensor (c2p first when present): a custom op has
//! at most three inputs, and the copies are O(b·t·e) against the O(b·h·t²·d) work.
//! Without relative terms the encoder attention op runs with the key mask, and padding
//! query rows are zeroed after it.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::RelIndex;
use crate::error::Result;
use crate::ops::cpu::{exp_f32, f32_data, matmul_into, row_max, simd, sum_f32, CResult, MatView};

mod backward;

#[allow(clippy::too_many_arguments)]
pub(super) fn disentangled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos_key: Option<&Tensor>,
    pos_query: Option<&Tensor>,
    rel: Option<&RelIndex>,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let rel = match rel {
        Some(r) if pos_key.is_some() || pos_query.is_some() => r,
        _ => {
            // Plain scaled attention; XSoftmax also zeroes the rows of padding queries.
            let a = crate::ops::attention(q, k, v, mask, None, scale)?; // (b, h, t, d)
            return match mask {
                Some(m) => Ok(a.broadcast_mul(&m.to_dtype(DType::F32)?.reshape((b, 1, t, 1))?)?),
                None => Ok(a),
            };
        }
    };
    let qkv = Tensor::stack(&[q, k, v], 0)?; // (3, b, h, t, d)
    let pos: Vec<&Tensor> = pos_key.into_iter().chain(pos_query).collect();
    let pos = Tensor::stack(&pos, 0)?; // (n, h, r, d)
    let keep = match mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(m.iter().map(|&x| x > 0.5).collect::<Vec<bool>>()))
        }
        None => None,
    };
    let geo = Geo {
        b,
        h,
        t,
        d,
        r: 2 * rel.span,
        scale: scale as f32,
        c2p: pos_key.is_some(),
        p2c: pos_query.is_some(),
        keep,
        rel: rel.clone(),
    };
    let op = Disentangled {
        geo,
        lse: Mutex::new(None),
    };
    Ok(qkv.apply_op2(&pos, op)?)
}

#[derive(Clone)]
pub(super) struct Geo {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub d: usize,
    /// Rows of the relative tables, 2·span.
    pub r: usize,
    pub scale: f32,
    pub c2p: bool,
    pub p2c: bool,
    /// (b, t): true for real tokens.
    pub keep: Option<Arc<Vec<bool>>>,
    pub rel: RelIndex,
}

/// One head's operands, dense row-major.
pub(super) struct HeadIn<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// (r, d) position keys / queries of this head.
    pub pk: Option<&'a [f32]>,
    pub pq: Option<&'a [f32]>,
}

impl Geo {
    pub fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.d == 0
    }

    /// Head `bh`'s operands from the stacked inputs.
    pub fn head<'a>(&self, qkv: &'a [f32], pos: &'a [f32], bh: usize) -> HeadIn<'a> {
        let (n, td, rd) = (self.b * self.h, self.t * self.d, self.r * self.d);
        let hi = bh % self.h;
        let slot = |i: usize| &pos[(i * self.h + hi) * rd..][..rd];
        HeadIn {
            q: &qkv[bh * td..][..td],
            k: &qkv[(n + bh) * td..][..td],
            v: &qkv[(2 * n + bh) * td..][..td],
            pk: self.c2p.then(|| slot(0)),
            pq: self.p2c.then(|| slot(self.c2p as usize)),
        }
    }

    /// Masked scores of head `bh` into `s` (t, t); `c` (t, r) is scratch. Masked pairs and
    /// whole padding query rows are -inf.
    pub fn scores(&self, s: &mut [f32], c: &mut [f32], bh: usize, x: &HeadIn) {
        let (t, d) = (self.t, self.d);
        let (q, k) = (MatView::rows(x.q, t, d), MatView::rows(x.k, t, d));
        matmul_into(s, q, k.t(), self.scale, false, false);
        // Only relative rows lo..=hi are indexed: c is (t, w) over those rows.
        let (lo, w) = (self.rel.lo, self.rel.hi + 1 - self.rel.lo);
        let c = &mut c[..t * w];
        if let Some(pk) = x.pk {
            // c[i][.] = scale · q_i · pk[lo + .]; S[i][j] += c[i][c2p[i][j] - lo].
            let pk = MatView::rows(&pk[lo * d..][..w * d], w, d);
            matmul_into(c, q, pk.t(), self.scale, false, false);
            for ((srow, ix), crow) in s.chunks_mut(t).zip(self.rel.c2p.chunks(t)).zip(c.chunks(w)) {
                for (x, &i) in srow.iter_mut().zip(ix) {
                    *x += crow[i as usize - lo];
                }
            }
        }
        if let Some(pq) = x.pq {
            // c[j][.] = scale · k_j · pq[lo + .]; S[i][j] += c[j][p2c[i][j] - lo].
            let pq = MatView::rows(&pq[lo * d..][..w * d], w, d);
            matmul_into(c, k, pq.t(), self.scale, false, false);
            for (srow, ix) in s.chunks_mut(t).zip(self.rel.p2c.chunks(t)) {
                for (j, (x, &i)) in srow.iter_mut().zip(ix).enumerate() {
                    *x += c[j * w + i as usize - lo];
                }
            }
        }
        if let Some(keep) = &self.keep {
            let keep = &keep[bh / self.h * t..][..t];
            for (srow, &ki) in s.chunks_mut(t).zip(keep) {
                for (x, &kj) in srow.iter_mut().zip(keep) {
                    if !(ki && kj) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

struct Disentangled {
    geo: Geo,
    /// Per query row log-sum-exp; +inf for padding rows.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CustomOp2 for Disentangled {
    fn name(&self) -> &'static str {
        "disentangled-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = &self.geo;
        let (t, d, r) = (g.t, g.d, g.r);
        let mut out = crate::ops::cpu::zeros(g.b * g.h * t * d);
        let mut lse = vec![f32::INFINITY; g.b * g.h * t];
        if !g.is_empty() {
            let qkv = f32_data(s1, l1, "disentangled-attention")?;
            let pos = f32_data(s2, l2, "disentangled-attention")?;
            out.par_chunks_mut(t * d)
                .zip(lse.par_chunks_mut(t))
                .enumerate()
                .for_each_init(
                    || (crate::ops::cpu::zeros(t * t), crate::ops::cpu::zeros(t * r)),
                    |(p, c), (bh, (o, lse))| {
                        let x = g.head(&qkv, &pos, bh);
                        g.scores(p, c, bh, &x);
                        softmax_rows(p, t, lse);
                        matmul_into(
                            o,
                            MatView::rows(p, t, t),
                            MatView::rows(x.v, t, d),
                            1.0,
                            false,
                            false,
                        );
                    },
                );
        }
        if let Ok(mut saved) = self.lse.lock() {
            *saved = Some(Arc::new(lse));
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.h, t, d))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        pos: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.lock().ok().and_then(|s| s.clone()) else {
            return Err(candle_core::Error::Msg(
                "disentangled-attention: backward before forward".into(),
            )
            .bt());
        };
        let bwd = backward::DisentangledBwd {
            geo: self.geo.clone(),
            lse,
        };
        let packed = qkv.apply_op3_no_bwd(pos, &grad.contiguous()?, &bwd)?;
        let nqkv = qkv.elem_count();
        let dqkv = packed.narrow(0, 0, nqkv)?.reshape(qkv.shape())?;
        let dpos = packed
            .narrow(0, nqkv, pos.elem_count())?
            .reshape(pos.shape())?;
        Ok((
            qkv.track_op().then_some(dqkv),
            pos.track_op().then_some(dpos),
        ))
    }
}

/// Row softmax of (rows, n) scores in place with each row's log-sum-exp; a row that is all
/// -inf becomes zeros with lse +inf.
fn softmax_rows(p: &mut [f32], n: usize, lse: &mut [f32]) {
    simd(
        #[inline(always)]
        || {
            for (row, lse) in p.chunks_mut(n).zip(lse.iter_mut()) {
                let max = row_max(row);
                if max == f32::NEG_INFINITY {
                    row.iter_mut().for_each(|x| *x = 0.0);
                    *lse = f32::INFINITY;
                    continue;
                }
                row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
                let sum = sum_f32(row);
                *lse = max + sum.ln() as f32;
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        },
    );
}

/// `dS = P ⊙ (dP - rowsum(P ⊙ dP))` in place of `dp`, rows of length `n`.
fn softmax_grad_rows(p: &[f32], dp: &mut [f32], n: usize) {
    simd(
        #[inline(always)]
        || {
            for (prow, drow) in p.chunks(n).zip(dp.chunks_mut(n)) {
                let delta = crate::ops::cpu::dot_f32(prow, drow) as f32;
                for (d, &p) in drow.iter_mut().zip(prow) {
                    *d = p * (*d - delta);
                }
            }
        },
    );
}
