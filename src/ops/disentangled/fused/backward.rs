//! Backward of the fused disentangled attention. Per (batch, head) the probabilities are
//! recomputed from the saved log-sum-exps, then, as for plain attention,
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(P ⊙ dP))`, `dQ = scale · dS K`,
//! `dK = scale · dSᵀ Q`; the relative terms scatter `dS` back by bucket:
//! `dC[i][c2p[i][j]] += dS[i][j]` gives `dQ += scale · dC PK` and `dPK += scale · dCᵀ Q`,
//! `dC'[j][p2c[i][j]] += dS[i][j]` gives `dK += scale · dC' PQ` and `dPQ += scale · dC'ᵀ K`.
//!
//! The position projections are shared by the batch: each head's batch rows are split
//! into a fixed number of groups (not set by the thread count, so results do not depend
//! on the machine), each group sums into its own buffer, and the buffers are added last.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{softmax_grad_rows, Geo};
use crate::ops::cpu::{exp_f32, f32_data, matmul_into, simd, CResult, MatView};

/// Tasks the reduction over the batch aims for.
const MIN_TASKS: usize = 64;

/// `(qkv, pos, dO) -> [dqkv, dpos]` packed flat.
pub(super) struct DisentangledBwd {
    pub geo: Geo,
    pub lse: Arc<Vec<f32>>,
}

/// One (batch, head)'s gradient outputs: (bh, dq, dk, dv).
type HeadGrads<'a> = (usize, &'a mut [f32], &'a mut [f32], &'a mut [f32]);

impl CustomOp3 for DisentangledBwd {
    fn name(&self) -> &'static str {
        "disentangled-attention-bwd"
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
        let (b, h, t, d, r) = (g.b, g.h, g.t, g.d, g.r);
        let npos = g.c2p as usize + g.p2c as usize;
        let (n, td, rd) = (b * h, t * d, r * d);
        let len = 3 * n * td + npos * h * rd;
        let mut packed = crate::ops::cpu::zeros(len);
        if g.is_empty() {
            return Ok((CpuStorage::F32(packed), Shape::from(len)));
        }
        let op = "disentangled-attention-bwd";
        let qkv = f32_data(s1, l1, op)?;
        let pos = f32_data(s2, l2, op)?;
        let dy = f32_data(s3, l3, op)?;
        let (dqkv, dpos) = packed.split_at_mut(3 * n * td);
        let (dq, rest) = dqkv.split_at_mut(n * td);
        let (dk, dv) = rest.split_at_mut(n * td);
        // Heads of the same head index, in batch order, split into groups.
        let groups = MIN_TASKS.div_ceil(h).clamp(1, b);
        let per_group = b.div_ceil(groups);
        let mut tasks: Vec<Vec<HeadGrads>> = (0..h * groups).map(|_| Vec::new()).collect();
        for (bh, ((dq, dk), dv)) in dq
            .chunks_mut(td)
            .zip(dk.chunks_mut(td))
            .zip(dv.chunks_mut(td))
            .enumerate()
        {
            let (bi, hi) = (bh / h, bh % h);
            tasks[hi * groups + bi / per_group].push((bh, dq, dk, dv));
        }
        // Per task: (npos, r, d) partial position gradients.
        let mut partial = crate::ops::cpu::zeros(h * groups * npos * rd);
        partial
            .par_chunks_mut(npos * rd)
            .zip(tasks.into_par_iter())
            .for_each_init(
                || Scratch::new(t, r),
                |sc, (acc, heads)| {
                    for head in heads {
                        head_backward(g, &qkv, &pos, &dy, &self.lse, head, acc, sc);
                    }
                },
            );
        // dpos (npos, h, r, d) = sum over each head's groups.
        for (slot, out) in dpos.chunks_mut(h * rd).enumerate() {
            for (hi, out) in out.chunks_mut(rd).enumerate() {
                for gi in 0..groups {
                    let part = &partial[((hi * groups + gi) * npos + slot) * rd..][..rd];
                    out.iter_mut().zip(part).for_each(|(o, x)| *o += x);
                }
            }
        }
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    c: Vec<f32>,
}

impl Scratch {
    fn new(t: usize, r: usize) -> Self {
        Scratch {
            p: crate::ops::cpu::zeros(t * t),
            ds: crate::ops::cpu::zeros(t * t),
            c: crate::ops::cpu::zeros(t * r),
        }
    }
}

/// Gradients of head `bh` into its dq, dk, dv, and its position gradients added to `acc`
/// (npos, r, d).
#[allow(clippy::too_many_arguments)]
fn head_backward(
    g: &Geo,
    qkv: &[f32],
    pos: &[f32],
    dy: &[f32],
    lse: &[f32],
    head: HeadGrads,
    acc: &mut [f32],
    sc: &mut Scratch,
) {
    let (t, d, r) = (g.t, g.d, g.r);
    let (bh, dq, dk, dv) = head;
    let x = g.head(qkv, pos, bh);
    let Scratch { p, ds, c } = sc;
    g.scores(p, c, bh, &x);
    let dyh = MatView::rows(&dy[bh * t * d..][..t * d], t, d);
    let lse = &lse[bh * t..][..t];
    simd(
        #[inline(always)]
        || {
            for (row, &lse) in p.chunks_mut(t).zip(lse) {
                // Masked scores are -inf and padding rows have lse = +inf: both give 0.
                row.iter_mut().for_each(|s| *s = exp_f32(*s - lse));
            }
        },
    );
    // dP = dO Vᵀ, then dS.
    matmul_into(ds, dyh, MatView::rows(x.v, t, d).t(), 1.0, false, false);
    softmax_grad_rows(p, ds, t);
    let dsm = MatView::rows(ds, t, t);
    matmul_into(dq, dsm, MatView::rows(x.k, t, d), g.scale, false, false);
    matmul_into(dk, dsm.t(), MatView::rows(x.q, t, d), g.scale, false, false);
    matmul_into(dv, MatView::rows(p, t, t).t(), dyh, 1.0, false, false);
    let rd = r * d;
    // Only relative rows lo..=hi are indexed: dC is (t, w) over those rows.
    let (lo, w) = (g.rel.lo, g.rel.hi + 1 - g.rel.lo);
    let c = &mut c[..t * w];
    if let Some(pk) = x.pk {
        c.iter_mut().for_each(|v| *v = 0.0);
        for ((dsrow, ix), crow) in ds.chunks(t).zip(g.rel.c2p.chunks(t)).zip(c.chunks_mut(w)) {
            for (&v, &i) in dsrow.iter().zip(ix) {
                crow[i as usize - lo] += v;
            }
        }
        let cm = MatView::rows(c, t, w);
        let pk = MatView::rows(&pk[lo * d..][..w * d], w, d);
        matmul_into(dq, cm, pk, g.scale, true, false);
        let dpk = &mut acc[lo * d..][..w * d];
        matmul_into(dpk, cm.t(), MatView::rows(x.q, t, d), g.scale, true, false);
    }
    if let Some(pq) = x.pq {
        c.iter_mut().for_each(|v| *v = 0.0);
        for (dsrow, ix) in ds.chunks(t).zip(g.rel.p2c.chunks(t)) {
            for (j, (&v, &i)) in dsrow.iter().zip(ix).enumerate() {
                c[j * w + i as usize - lo] += v;
            }
        }
        let cm = MatView::rows(c, t, w);
        let pq = MatView::rows(&pq[lo * d..][..w * d], w, d);
        matmul_into(dk, cm, pq, g.scale, true, false);
        let slot = g.c2p as usize;
        let dpq = &mut acc[slot * rd + lo * d..][..w * d];
        matmul_into(dpq, cm.t(), MatView::rows(x.k, t, d), g.scale, true, false);
    }
}
