//! Bidirectional (encoder) scaled-dot-product attention with a key padding mask and an
//! optional additive score bias, as a single op: `softmax(scale · Q Kᵀ + bias + mask) V`,
//! the self-attention of BERT (Devlin et al. 2019) and, with DeBERTa's relative-position
//! terms carried in `bias`, of DeBERTa (He et al. 2021). As in FlashAttention (Dao et
//! al. 2022) the forward keeps only the output and one log-sum-exp per query row, and the
//! backward recomputes the probabilities head by head.
//!
//! Masked keys get probability exactly 0, which equals Hugging Face's
//! `finfo(f32).min` additive mask whenever a row has at least one real key. A row with no
//! real key (an all-padding sequence) outputs zeros and passes no gradient, where the
//! additive mask would average every key.
//!
//! Backward, per head with `P = softmax(S)`, `S = scale · Q Kᵀ + B`:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(dO ⊙ O))`, `dQ = scale · dS K`,
//! `dK = scale · dSᵀ Q` and `dB = dS`, summed over the batch / head dims along which `B`
//! is broadcast. Heads sharing a bias slot are split into a fixed number of groups (not
//! depending on the thread count), each summing its heads' `dS` into its own buffer.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    dot_f32, exp_f32, f32_data, is_cpu_f32, matmul_into, row_max, simd, storage_f32, sum_f32,
    CResult, MatView,
};
use crate::error::{Error, Result};

/// Tasks the bias-gradient reduction aims for when the bias is broadcast.
const MIN_TASKS: usize = 64;

/// `softmax(scale · q kᵀ + bias + padding mask) v` for `q (b, h, t, d)`, `k`, `v (b, h, s, d)`,
/// `key_mask (b, s)` (1 = real key, 0 = padding) and `bias` (b | 1, h | 1, t, s).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let s = k.dims().get(2).copied().unwrap_or(0);
    for (name, x) in [("attention key", k), ("attention value", v)] {
        if x.dims() != [b, h, s, d] {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: vec![b, h, s, d],
                got: x.dims().to_vec(),
            });
        }
    }
    let keep = match key_mask {
        None => None,
        Some(m) if m.dims() == [b, s] => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(m.iter().map(|&x| x > 0.5).collect::<Vec<bool>>()))
        }
        Some(m) => {
            return Err(Error::ShapeMismatch {
                name: "attention key_mask".into(),
                expected: vec![b, s],
                got: m.dims().to_vec(),
            })
        }
    };
    let bias_heads = match bias {
        None => None,
        Some(x) => {
            let dims = x.dims();
            let ok = dims.len() == 4
                && (dims[0] == b || dims[0] == 1)
                && (dims[1] == h || dims[1] == 1)
                && dims[2..] == [t, s];
            if !ok {
                return Err(Error::ShapeMismatch {
                    name: "attention bias (b or 1, h or 1, t, s)".into(),
                    expected: vec![b, h, t, s],
                    got: dims.to_vec(),
                });
            }
            Some((dims[0], dims[1]))
        }
    };
    if !scale.is_finite() {
        return Err(Error::msg(format!(
            "attention: scale {scale} is not finite"
        )));
    }
    let all_cpu_f32 = [q, k, v].into_iter().chain(bias).all(is_cpu_f32);
    if !all_cpu_f32 {
        return super::reference::attention(q, k, v, key_mask, bias, scale);
    }
    let geo = Geometry {
        b,
        h,
        t,
        s,
        d,
        scale: scale as f32,
        keep,
        bias_heads,
    };
    let lse = Mutex::new(None);
    match bias {
        Some(bias) if bias.track_op() => {
            // A custom op has at most three inputs: k and v travel stacked.
            let kv = Tensor::stack(&[k, v], 0)?; // (2, b, h, s, d)
            let op = Attention {
                geo,
                bias: BiasArg::Input,
                lse,
            };
            Ok(q.apply_op3(&kv, bias, op)?)
        }
        _ => {
            let op = Attention {
                geo,
                bias: bias.map_or(BiasArg::None, |x| BiasArg::Const(x.clone())),
                lse,
            };
            Ok(q.apply_op3(k, v, op)?)
        }
    }
}

#[derive(Clone)]
struct Geometry {
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
    keep: Option<Arc<Vec<bool>>>,
    /// Batch and head extents of the bias (each the full extent or 1), when there is one.
    bias_heads: Option<(usize, usize)>,
}

impl Geometry {
    /// Nothing to compute: the output (and every gradient) is all zeros.
    fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.d == 0 || self.s == 0
    }

    /// Index of the (t, s) bias slice head `bh` reads.
    fn bias_slot(&self, bh: usize) -> usize {
        let (nb, nh) = self.bias_heads.unwrap_or((1, 1));
        let (bi, hi) = (bh / self.h, bh % self.h);
        (if nb == 1 { 0 } else { bi }) * nh + if nh == 1 { 0 } else { hi }
    }

    /// Additive key mask of batch row `bi`: 0 for real keys, -inf for padding.
    fn mask_row(&self, bi: usize) -> Option<Vec<f32>> {
        self.keep.as_ref().map(|keep| {
            keep[bi * self.s..][..self.s]
                .iter()
                .map(|&k| if k { 0.0 } else { f32::NEG_INFINITY })
                .collect()
        })
    }

    /// `S = scale · Q Kᵀ + bias + mask` of head `bh` into `p` (t, s).
    fn scores(&self, p: &mut [f32], bh: usize, q: &[f32], k: &[f32], bias: Option<&[f32]>) {
        let (t, s, d) = (self.t, self.s, self.d);
        let qh = MatView::rows(&q[bh * t * d..][..t * d], t, d);
        let kh = MatView::rows(&k[bh * s * d..][..s * d], s, d);
        matmul_into(p, qh, kh.t(), self.scale, false, false);
        let bias = bias.map(|x| &x[self.bias_slot(bh) * t * s..][..t * s]);
        let mask = self.mask_row(bh / self.h);
        simd(|| {
            for (i, row) in p.chunks_mut(s).enumerate() {
                if let Some(bias) = bias {
                    for (x, &c) in row.iter_mut().zip(&bias[i * s..][..s]) {
                        *x += c;
                    }
                }
                if let Some(mask) = &mask {
                    for (x, &m) in row.iter_mut().zip(mask) {
                        *x += m;
                    }
                }
            }
        });
    }
}

/// Where the bias comes from: none, a constant held by the op (no gradient), or the
/// op's third input (then the second input is k and v stacked).
#[derive(Clone)]
enum BiasArg {
    None,
    Const(Tensor),
    Input,
}

struct Attention {
    geo: Geometry,
    bias: BiasArg,
    /// Per query row log-sum-exp of the biased, masked scores; +inf for rows seeing no key.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

/// Runs `f(q, k, v, bias)` on the op's inputs as dense row-major f32 slices, whichever
/// way the bias travels.
#[allow(clippy::too_many_arguments)]
fn with_inputs<R>(
    arg: &BiasArg,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    op: &'static str,
    f: impl FnOnce(&[f32], &[f32], &[f32], Option<&[f32]>) -> R,
) -> CResult<R> {
    let q = f32_data(s1, l1, op)?;
    let a2 = f32_data(s2, l2, op)?;
    let a3 = f32_data(s3, l3, op)?;
    match arg {
        BiasArg::Input => {
            let (k, v) = a2.split_at(a2.len() / 2); // (2, b, h, s, d) -> k, v
            Ok(f(&q, k, v, Some(&a3)))
        }
        BiasArg::None => Ok(f(&q, &a2, &a3, None)),
        BiasArg::Const(bias) => {
            let (store, layout) = bias.storage_and_layout();
            let bias = storage_f32(&store, layout, op)?;
            Ok(f(&q, &a2, &a3, Some(&bias)))
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let mut out = vec![0f32; g.b * g.h * g.t * g.d];
        let mut lse = vec![f32::INFINITY; g.b * g.h * g.t];
        if !g.is_empty() {
            let run = |q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>| {
                forward(g, q, k, v, bias, &mut out, &mut lse)
            };
            with_inputs(&self.bias, s1, l1, s2, l2, s3, l3, "attention", run)?;
        }
        if let Ok(mut saved) = self.lse.lock() {
            *saved = Some(Arc::new(lse));
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.h, g.t, g.d))))
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.lock().ok().and_then(|s| s.clone()) {
            Some(l) => l,
            None => {
                return Err(
                    candle_core::Error::Msg("attention: backward before forward".into()).bt(),
                )
            }
        };
        let need_bias = matches!(self.bias, BiasArg::Input);
        let bwd = AttentionBwd {
            geo: self.geo.clone(),
            bias: self.bias.clone(),
            lse,
            out: res.clone(),
            dy: grad.clone(),
        };
        // Packed output: dq, dk, dv, then d bias when the bias is an input.
        let packed = a1.apply_op3_no_bwd(a2, a3, &bwd)?;
        let g = &self.geo;
        let (nq, nk) = (g.b * g.h * g.t * g.d, g.b * g.h * g.s * g.d);
        let dq = packed.narrow(0, 0, nq)?.reshape(a1.shape())?;
        let dq = a1.track_op().then_some(dq);
        if need_bias {
            let dkv = packed.narrow(0, nq, 2 * nk)?.reshape(a2.shape())?;
            let db = packed.narrow(0, nq + 2 * nk, a3.elem_count())?;
            let db = db.reshape(a3.shape())?;
            Ok((dq, a2.track_op().then_some(dkv), Some(db)))
        } else {
            let dk = packed.narrow(0, nq, nk)?.reshape(a2.shape())?;
            let dv = packed.narrow(0, nq + nk, nk)?.reshape(a3.shape())?;
            Ok((dq, a2.track_op().then_some(dk), a3.track_op().then_some(dv)))
        }
    }
}

/// Forward of every head: output rows into `out` (b, h, t, d), log-sum-exps into `lse`.
fn forward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (t, s, d) = (g.t, g.s, g.d);
    out.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each_init(
            || vec![0f32; t * s],
            |p, (bh, (o, lse))| {
                g.scores(p, bh, q, k, bias);
                simd(|| {
                    for (row, lse) in p.chunks_mut(s).zip(lse.iter_mut()) {
                        let max = row_max(row);
                        if max == f32::NEG_INFINITY {
                            row.iter_mut().for_each(|x| *x = 0.0);
                            continue;
                        }
                        row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
                        let sum = sum_f32(row);
                        *lse = max + sum.ln() as f32;
                        let inv = (1.0 / sum) as f32;
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                });
                let vh = MatView::rows(&v[bh * s * d..][..s * d], s, d);
                matmul_into(o, MatView::rows(p, t, s), vh, 1.0, false, false);
            },
        );
}

/// `(q, k, v) -> [dq, dk, dv, d bias]` packed flat (d bias only when the bias is an
/// input), given the forward output, its gradient and the saved log-sum-exps.
struct AttentionBwd {
    geo: Geometry,
    bias: BiasArg,
    lse: Arc<Vec<f32>>,
    out: Tensor,
    dy: Tensor,
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
        let mut packed = vec![0f32; len];
        if g.is_empty() {
            return Ok((CpuStorage::F32(packed), Shape::from(len)));
        }
        let (o_store, o_l) = self.out.storage_and_layout();
        let o = storage_f32(&o_store, o_l, "attention-bwd")?;
        let (dy_store, dy_l) = self.dy.storage_and_layout();
        let dy = storage_f32(&dy_store, dy_l, "attention-bwd")?;
        let run = |q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>| {
            let fwd = Saved {
                q,
                k,
                v,
                bias,
                o: &o,
                dy: &dy,
                lse: &self.lse,
            };
            backward(g, &fwd, &mut packed, need_bias)
        };
        with_inputs(&self.bias, s1, l1, s2, l2, s3, l3, "attention-bwd", run)?;
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// What the backward reads: the forward's inputs, output, output gradient and
/// log-sum-exps, all dense.
struct Saved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    o: &'a [f32],
    dy: &'a [f32],
    lse: &'a [f32],
}

/// One head's gradient outputs: (head index, dq (t, d), dk (s, d), dv (s, d)).
type HeadGrads<'a> = (usize, &'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// Gradients of head `bh` into its dq, dk, dv; leaves `dS` (t, s) in `ds`.
fn head_backward(g: &Geometry, f: &Saved, head: HeadGrads, p: &mut [f32], ds: &mut [f32]) {
    let (t, s, d) = (g.t, g.s, g.d);
    let (bh, dq, dk, dv) = head;
    g.scores(p, bh, f.q, f.k, f.bias);
    let span = bh * t * d..(bh + 1) * t * d;
    let (qh, oh, dyh) = (&f.q[span.clone()], &f.o[span.clone()], &f.dy[span]);
    let kh = MatView::rows(&f.k[bh * s * d..][..s * d], s, d);
    let vh = MatView::rows(&f.v[bh * s * d..][..s * d], s, d);
    let lse = &f.lse[bh * t..][..t];
    // dP = dO Vᵀ
    matmul_into(ds, MatView::rows(dyh, t, d), vh.t(), 1.0, false, false);
    simd(|| {
        for i in 0..t {
            let prow = &mut p[i * s..][..s];
            let drow = &mut ds[i * s..][..s];
            let delta = dot_f32(&dyh[i * d..][..d], &oh[i * d..][..d]) as f32;
            // Masked scores are -inf and a row with no key has lse = +inf: both give 0.
            for j in 0..s {
                let pij = exp_f32(prow[j] - lse[i]);
                prow[j] = pij;
                drow[j] = pij * (drow[j] - delta);
            }
        }
    });
    let (pm, dsm) = (MatView::rows(p, t, s), MatView::rows(ds, t, s));
    matmul_into(dq, dsm, kh, g.scale, false, false);
    matmul_into(dk, dsm.t(), MatView::rows(qh, t, d), g.scale, false, false);
    matmul_into(dv, pm.t(), MatView::rows(dyh, t, d), 1.0, false, false);
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
    let bufs = || (vec![0f32; t * s], vec![0f32; t * s]);
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
                simd(|| acc.iter_mut().zip(ds.iter()).for_each(|(a, x)| *a += x));
            }
        });
    if groups > 1 {
        dbias
            .par_chunks_mut(t * s)
            .zip(partial.par_chunks(groups * t * s))
            .for_each(|(out, parts)| {
                simd(|| {
                    for part in parts.chunks(t * s) {
                        out.iter_mut().zip(part).for_each(|(o, x)| *o += x);
                    }
                })
            });
    }
}

#[cfg(test)]
mod tests;
