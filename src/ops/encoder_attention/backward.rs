//! Backward of the encoder attention op: per head, the probabilities are recomputed from
//! the saved log-sum-exps, then `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(P ⊙ dP))`
//! (`rowsum(P ⊙ dP)` equals FlashAttention's `rowsum(dO ⊙ O)` and needs no output),
//! `dQ = scale · dS K`, `dK = scale · dSᵀ Q` and `d bias = dS`, summed over the dims the
//! bias is broadcast along.
//!
//! Heads reading the same bias slice are split into a fixed number of groups (set by
//! [`MIN_TASKS`], not by the thread count, so results do not depend on the machine); each
//! group sums its heads' `dS` into its own buffer and the buffers are added at the end.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{with_inputs, BiasArg, Geometry, Heads};
use crate::ops::cpu::{dot_f32, exp_f32, f32_storage, matmul_into, simd, CResult, MatView};

/// Tasks the bias-gradient reduction aims for when the bias is broadcast.
const MIN_TASKS: usize = 64;

/// `(q, k, v) -> [dq, dk, dv, d bias]` packed flat (d bias only when the bias is an
/// input), given the output gradient and the saved log-sum-exps.
pub(super) struct AttentionBwd {
    pub geo: Geometry,
    pub bias: BiasArg,
    pub lse: Arc<Vec<f32>>,
    pub dy: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "attention-bwd"
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
        let need_bias = matches!(self.bias, BiasArg::Input);
        let nbias = match g.bias_heads {
            Some((nb, nh)) if need_bias => nb * nh * g.t * g.s,
            _ => 0,
        };
        let len = g.b * g.h * (g.t + 2 * g.s) * g.d + nbias;
        let mut packed = crate::ops::cpu::zeros(len);
        if g.is_empty() {
            return Ok((CpuStorage::F32(packed), Shape::from(len)));
        }
        let (dy_store, dy_l) = self.dy.storage_and_layout();
        let dy = match &*dy_store {
            candle_core::Storage::Cpu(s) => Heads::of(f32_storage(s, "attention-bwd")?, dy_l)?,
            _ => {
                let msg = "attention-bwd: expected a CPU gradient";
                return Err(candle_core::Error::Msg(msg.into()).bt());
            }
        };
        let run = |q: Heads, k: Heads, v: Heads, bias: Option<&[f32]>| {
            let fwd = Saved {
                q,
                k,
                v,
                bias,
                dy,
                lse: &self.lse,
            };
            backward(g, &fwd, &mut packed, need_bias)
        };
        with_inputs(&self.bias, s1, l1, s2, l2, s3, l3, "attention-bwd", run)?;
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// What the backward reads: the forward's inputs, the output gradient and the
/// log-sum-exps.
struct Saved<'a> {
    q: Heads<'a>,
    k: Heads<'a>,
    v: Heads<'a>,
    bias: Option<&'a [f32]>,
    dy: Heads<'a>,
    lse: &'a [f32],
}

/// One head's gradient outputs: (head index, dq (t, d), dk (s, d), dv (s, d)).
type HeadGrads<'a> = (usize, &'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// Gradients of head `bh` into its dq, dk, dv; leaves `dS` (t, s) in `ds`.
fn head_backward(g: &Geometry, f: &Saved, head: HeadGrads, p: &mut [f32], ds: &mut [f32]) {
    let (t, s) = (g.t, g.s);
    let (bh, dq, dk, dv) = head;
    g.scores(p, bh, f.q, f.k, f.bias);
    let dyh = f.dy.head(bh);
    let lse = &f.lse[bh * t..][..t];
    // dP = dO Vᵀ
    matmul_into(ds, dyh, f.v.head(bh).t(), 1.0, false, false);
    simd(
        #[inline(always)]
        || {
            for ((prow, drow), &lse) in p.chunks_mut(s).zip(ds.chunks_mut(s)).zip(lse) {
                // Masked scores are -inf and a row with no key has lse = +inf: both give 0.
                prow.iter_mut().for_each(|x| *x = exp_f32(*x - lse));
                // rowsum(dO ⊙ O) = rowsum(P ⊙ dP), from buffers at hand.
                let delta = dot_f32(prow, drow) as f32;
                for (d, &p) in drow.iter_mut().zip(prow.iter()) {
                    *d = p * (*d - delta);
                }
            }
        },
    );
    let (pm, dsm) = (MatView::rows(p, t, s), MatView::rows(ds, t, s));
    matmul_into(dq, dsm, f.k.head(bh), g.scale, false, false);
    matmul_into(dk, dsm.t(), f.q.head(bh), g.scale, false, false);
    matmul_into(dv, pm.t(), dyh, 1.0, false, false);
}

/// Fills `packed` = [dq, dk, dv, d bias]; d bias only when `need_bias`.
fn backward(g: &Geometry, f: &Saved, packed: &mut [f32], need_bias: bool) {
    let (t, s, d) = (g.t, g.s, g.d);
    let (nq, nk) = (g.b * g.h * t * d, g.b * g.h * s * d);
    let (dq, rest) = packed.split_at_mut(nq);
    let (dk, rest) = rest.split_at_mut(nk);
    let (dv, dbias) = rest.split_at_mut(nk);
    let heads: Vec<HeadGrads> = dq
        .chunks_mut(t * d)
        .zip(dk.chunks_mut(s * d))
        .zip(dv.chunks_mut(s * d))
        .enumerate()
        .map(|(bh, ((dq, dk), dv))| (bh, dq, dk, dv))
        .collect();
    let bufs = || (crate::ops::cpu::zeros(t * s), crate::ops::cpu::zeros(t * s));
    let (nb, nh) = match g.bias_heads {
        Some(x) if need_bias => x,
        _ => {
            heads
                .into_par_iter()
                .for_each_init(bufs, |(p, ds), head| head_backward(g, f, head, p, ds));
            return;
        }
    };
    // Heads reading the same bias slot, split into `groups` runs of `per_group` heads.
    let slots = nb * nh;
    let members = g.b * g.h / slots;
    let per_group = members.div_ceil(MIN_TASKS.div_ceil(slots).clamp(1, members));
    let groups = members.div_ceil(per_group);
    let mut by_slot: Vec<Vec<HeadGrads>> = (0..slots).map(|_| Vec::new()).collect();
    for head in heads {
        by_slot[g.bias_slot(head.0)].push(head);
    }
    let mut partial = vec![
        0f32;
        if groups > 1 {
            slots * groups * t * s
        } else {
            0
        }
    ];
    let accs = if groups > 1 {
        partial.chunks_mut(t * s)
    } else {
        dbias.chunks_mut(t * s)
    };
    let runs = by_slot.into_iter().flat_map(|heads| {
        let mut heads = heads.into_iter();
        (0..groups).map(move |_| heads.by_ref().take(per_group).collect::<Vec<_>>())
    });
    let tasks: Vec<(&mut [f32], Vec<HeadGrads>)> = accs.zip(runs).collect();
    tasks
        .into_par_iter()
        .for_each_init(bufs, |(p, ds), (acc, heads)| {
            for head in heads {
                head_backward(g, f, head, p, ds);
                simd(
                    #[inline(always)]
                    || acc.iter_mut().zip(ds.iter()).for_each(|(a, x)| *a += x),
                );
            }
        });
    if groups > 1 {
        dbias
            .par_chunks_mut(t * s)
            .zip(partial.par_chunks(groups * t * s))
            .for_each(|(out, parts)| {
                simd(
                    #[inline(always)]
                    || {
                        for part in parts.chunks(t * s) {
                            out.iter_mut().zip(part).for_each(|(o, x)| *o += x);
                        }
                    },
                )
            });
    }
}
