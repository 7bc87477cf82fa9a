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
//! q, k and v are read in place through their strides (heads cut from a projection are
//! transposed views). A custom op takes at most three inputs, so when the bias needs a
//! gradient k and v travel stacked into one (2, b, h, s, d) tensor, a copy the graph keeps
//! until backward; an untracked bias is held by the op as a constant. The backward is in
//! `backward.rs`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    exp_f32, f32_data, f32_storage, is_cpu_f32, matmul_into, row_max, simd, storage_f32, sum_f32,
    CResult, MatView,
};
use crate::error::{Error, Result};

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
    if let Some(m) = key_mask.filter(|m| m.dims() != [b, s]) {
        return Err(Error::ShapeMismatch {
            name: "attention key_mask".into(),
            expected: vec![b, s],
            got: m.dims().to_vec(),
        });
    }
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
    let mask = match key_mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let add = |&x: &f32| if x > 0.5 { 0.0 } else { f32::NEG_INFINITY };
            Some(Arc::new(m.iter().map(add).collect::<Vec<f32>>()))
        }
        None => None,
    };
    let geo = Geometry {
        b,
        h,
        t,
        s,
        d,
        scale: scale as f32,
        mask,
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
    /// Additive key mask (b, s): 0 for real keys, -inf for padding.
    mask: Option<Arc<Vec<f32>>>,
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

    /// `S = scale · Q Kᵀ + bias + mask` of head `bh` into `p` (t, s).
    fn scores(&self, p: &mut [f32], bh: usize, q: Heads, k: Heads, bias: Option<&[f32]>) {
        let (t, s) = (self.t, self.s);
        matmul_into(p, q.head(bh), k.head(bh).t(), self.scale, false, false);
        let bias = bias.map(|x| &x[self.bias_slot(bh) * t * s..][..t * s]);
        let mask = self.mask.as_ref().map(|m| &m[bh / self.h * s..][..s]);
        simd(
            #[inline(always)]
            || {
                for (i, row) in p.chunks_mut(s).enumerate() {
                    if let Some(bias) = bias {
                        for (x, &c) in row.iter_mut().zip(&bias[i * s..][..s]) {
                            *x += c;
                        }
                    }
                    if let Some(mask) = mask {
                        for (x, &m) in row.iter_mut().zip(mask) {
                            *x += m;
                        }
                    }
                }
            },
        );
    }
}

/// The per-head (rows, cols) matrices of a strided rank-4 (b, h, rows, cols) tensor, read
/// in place: q, k, v are usually transposed views of (b, n, h, d) projections, and the
/// matmuls take any strides, so gathering them into a dense copy would be wasted work.
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    start: usize,
    /// Element strides of (b, h, rows, cols).
    stride: [usize; 4],
    h: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Heads<'a> {
    /// `stride` and `start` from the tensor's layout; `data` its whole storage buffer.
    fn new(data: &'a [f32], start: usize, stride: &[usize], dims: &[usize]) -> CResult<Self> {
        match (stride, dims) {
            (&[s0, s1, s2, s3], &[_, h, rows, cols]) => Ok(Heads {
                data,
                start,
                stride: [s0, s1, s2, s3],
                h,
                rows,
                cols,
            }),
            _ => Err(candle_core::Error::Msg(format!(
                "attention: expected a rank-4 operand, got dims {dims:?}"
            ))
            .bt()),
        }
    }

    fn of(data: &'a [f32], l: &Layout) -> CResult<Self> {
        Heads::new(data, l.start_offset(), l.stride(), l.dims())
    }

    /// Head `bh = b_index · h + h_index` as a strided matrix.
    fn head(&self, bh: usize) -> MatView<'a> {
        let [s0, s1, rs, cs] = self.stride;
        let off = self.start + bh / self.h * s0 + bh % self.h * s1;
        MatView {
            data: &self.data[off..],
            rows: self.rows,
            cols: self.cols,
            rs,
            cs,
        }
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

/// Runs `f(q, k, v, bias)` on the op's inputs, whichever way the bias travels: q, k, v as
/// strided heads, the bias as a dense row-major slice.
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
    f: impl FnOnce(Heads, Heads, Heads, Option<&[f32]>) -> R,
) -> CResult<R> {
    let q = Heads::of(f32_storage(s1, op)?, l1)?;
    match arg {
        BiasArg::Input => {
            // (2, b, h, s, d): k at the start, v one stride of the first dim further.
            let kv = f32_storage(s2, op)?;
            let (start, stride, dims) = (l2.start_offset(), l2.stride(), l2.dims());
            if stride.len() != 5 {
                return Err(candle_core::Error::Msg("attention: bad k/v stack".into()).bt());
            }
            let k = Heads::new(kv, start, &stride[1..], &dims[1..])?;
            let v = Heads::new(kv, start + stride[0], &stride[1..], &dims[1..])?;
            Ok(f(q, k, v, Some(&f32_data(s3, l3, op)?)))
        }
        BiasArg::None => {
            let (k, v) = (f32_storage(s2, op)?, f32_storage(s3, op)?);
            Ok(f(q, Heads::of(k, l2)?, Heads::of(v, l3)?, None))
        }
        BiasArg::Const(bias) => {
            let (k, v) = (f32_storage(s2, op)?, f32_storage(s3, op)?);
            let (store, layout) = bias.storage_and_layout();
            let bias = storage_f32(&store, layout, op)?;
            Ok(f(q, Heads::of(k, l2)?, Heads::of(v, l3)?, Some(&bias)))
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
        let mut out = crate::ops::cpu::zeros(g.b * g.h * g.t * g.d);
        let mut lse = vec![f32::INFINITY; g.b * g.h * g.t];
        if !g.is_empty() {
            let run = |q: Heads, k: Heads, v: Heads, bias: Option<&[f32]>| {
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
        _res: &Tensor,
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
        let bwd = backward::AttentionBwd {
            geo: self.geo.clone(),
            bias: self.bias.clone(),
            lse,
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
    q: Heads,
    k: Heads,
    v: Heads,
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (t, s, d) = (g.t, g.s, g.d);
    out.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each_init(
            || crate::ops::cpu::zeros(t * s),
            |p, (bh, (o, lse))| {
                g.scores(p, bh, q, k, bias);
                simd(
                    #[inline(always)]
                    || {
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
                    },
                );
                matmul_into(o, MatView::rows(p, t, s), v.head(bh), 1.0, false, false);
            },
        );
}

mod backward;
#[cfg(test)]
mod tests;
