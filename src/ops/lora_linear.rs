//! A frozen linear layer with a LoRA term, and optionally LoRA-Dash's dash term, as one
//! candle custom op:
//! `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + x·V_s·diag(c)·U_sᵀ` (Hu et al., 2021, with PEFT's dropout
//! on A's input; the dash term of Si et al., ICLR 2025, §4, takes the undropped input).
//!
//! Composed from candle ops, one adapted layer keeps the dropped-out copy of `x` (n, in),
//! its mask, the base output, the LoRA delta and their sum (four (n, out) buffers), the
//! dash term two more, and the backward adds a zero buffer and an add per node. Here the
//! forward writes one (n, out) buffer (both low-rank terms are accumulated into the base
//! GEMM's output by a single product of inner size r + s) and keeps nothing else: the
//! dropout mask is a pure function of `(seed, row, col)`, so the backward regenerates it,
//! and `drop(x)·Aᵀ` (n, r) and `x·V_s` (n, s) are recomputed from the same row chunks that
//! the weight gradients need anyway.
//!
//! Backward, with `[g | h] = dy·[s·B | U_s]` (n, r + s) and `M` the scaled mask:
//! `dx = dy·W + (g·A) ⊙ M + (h·diag(c))·V_sᵀ`, `dA = gᵀ·drop(x)`, `dB = s·dyᵀ·(drop(x)·Aᵀ)`,
//! `dc = Σ_rows (x·V_s) ⊙ h`; `W`, `U_s` and `V_s` get none.
//! Every product runs on faer through strided views, so transposes are never copied.

mod backward;
mod dash;
mod mask;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu::{
    is_cpu_f32, is_cpu_weight, matmul_into, weight_view, widened_weight, CResult, MatView,
};
use crate::error::{Error, Result};
use dash::LoraDashLinear;
pub use mask::dropout_mask;
pub(crate) use mask::MaskSpec;

/// Rows per rayon task in the chunked (dropout) passes: a dropped-out chunk is at most
/// `CHUNK_ROWS · in` floats, which stays in L2 for the usual hidden sizes.
const CHUNK_ROWS: usize = 32;

/// LoRA-Dash's dash term `x·V_s·diag(c)·U_sᵀ`: the frozen directions `u_s (out, s)` and
/// `v_s (in, s)` and their trainable scales `c (s)`.
#[derive(Clone, Copy, Debug)]
pub struct DashTerm<'a> {
    pub u_s: &'a Tensor,
    pub v_s: &'a Tensor,
    pub c: &'a Tensor,
}

impl DashTerm<'_> {
    /// Number of directions.
    pub fn s(&self) -> usize {
        self.c.dims().first().copied().unwrap_or(0)
    }
}

/// `x (n, in) · wᵀ + scale · (drop(x) · aᵀ) · bᵀ` with `w (out, in)` frozen, `a (r, in)`,
/// `b (out, r)`. `drop` is inverted dropout with probability `dropout_p` and the mask of
/// [`dropout_mask`] for `seed`; identity when `dropout_p == 0`. Gradients flow to `x`, `a`
/// and `b` (each only when it is tracked), never to `w`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
) -> Result<Tensor> {
    lora_dash_linear(x, w, a, b, scale, dropout_p, seed, None)
}

/// [`lora_linear`] plus, when `dash` is given, `x · v_s · diag(c) · u_sᵀ` on the undropped
/// `x`, unscaled. `c` gets a gradient when it is tracked; `u_s` and `v_s` never do.
#[allow(clippy::too_many_arguments)]
pub fn lora_dash_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
    dash: Option<DashTerm>,
) -> Result<Tensor> {
    lora_dash_linear_bias(x, w, None, a, b, scale, dropout_p, seed, dash)
}

/// [`lora_dash_linear`] plus a frozen bias `(out)`, written into the output before the
/// products accumulate onto it (no separate pass over the output, no gradient).
#[allow(clippy::too_many_arguments)]
pub fn lora_dash_linear_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
    dash: Option<DashTerm>,
) -> Result<Tensor> {
    check_shapes(x, w, a, b, dash.as_ref())?;
    if let Some(bias) = bias {
        let out_dim = w.dims2()?.0;
        if bias.dims() != [out_dim] {
            return Err(Error::ShapeMismatch {
                name: "lora_linear bias".into(),
                expected: vec![out_dim],
                got: bias.dims().to_vec(),
            });
        }
    }
    if !(0.0..1.0).contains(&dropout_p) {
        return Err(Error::msg(format!(
            "dropout probability {dropout_p} is outside [0, 1)"
        )));
    }
    // No directions, no term (and nothing for c to learn).
    let dash = dash.filter(|d| d.s() > 0);
    let dash_on_cpu = dash.is_none_or(|d| [d.u_s, d.v_s, d.c].iter().all(|t| is_cpu_f32(t)));
    let bias_on_cpu = bias.is_none_or(is_cpu_f32);
    if !([x, a, b].iter().all(|t| is_cpu_f32(t)) && is_cpu_weight(w) && dash_on_cpu && bias_on_cpu)
    {
        let y = super::reference::lora_dash_linear(x, w, a, b, scale, dropout_p, seed, dash)?;
        return Ok(match bias {
            Some(bias) => y.broadcast_add(&bias.detach())?,
            None => y,
        });
    }
    let lora = LoraLinear {
        bias: super::linear::bias_values(bias)?,
        w: w.detach(),
        scale: scale as f32,
        mask: MaskSpec::new(dropout_p, seed),
        thin: std::sync::Mutex::new(None),
    };
    match dash {
        None => Ok(x.apply_op3(a, b, lora)?),
        Some(d) => {
            let (op, ab) = LoraDashLinear::new(lora, a, b, d)?;
            Ok(x.apply_op3(&ab, d.c, op)?)
        }
    }
}

fn check_shapes(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dash: Option<&DashTerm>,
) -> Result<()> {
    let (out_dim, in_dim) = w.dims2()?;
    let r = a.dims().first().copied().unwrap_or(0);
    let mut checks: Vec<(&str, &Tensor, Vec<usize>)> = vec![
        (
            "lora_linear x",
            x,
            vec![x.dims().first().copied().unwrap_or(0), in_dim],
        ),
        ("lora_linear a", a, vec![r, in_dim]),
        ("lora_linear b", b, vec![out_dim, r]),
    ];
    if let Some(d) = dash {
        let s = d.s();
        checks.push(("lora_dash_linear c", d.c, vec![s]));
        checks.push(("lora_dash_linear u_s", d.u_s, vec![out_dim, s]));
        checks.push(("lora_dash_linear v_s", d.v_s, vec![in_dim, s]));
    }
    for (name, t, expected) in checks {
        if t.dims() != expected.as_slice() {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected,
                got: t.dims().to_vec(),
            });
        }
    }
    Ok(())
}

/// The frozen part of the op and its dropout; the LoRA factors are inputs.
struct LoraLinear {
    w: Tensor,
    /// Frozen `(out)`, the output's starting value.
    bias: Option<Vec<f32>>,
    scale: f32,
    mask: MaskSpec,
    /// The forward's thin projection `[drop(x)·Aᵀ | x·V_s]` (n, r + s), kept for the
    /// backward (dB and dc read it) when the output is part of a graph: n·(r + s) floats
    /// instead of a second pass over x. Each call builds its own op, so one forward fills it.
    thin: std::sync::Mutex<Option<Vec<f32>>>,
}

/// The dash term as the kernels read it.
#[derive(Clone, Copy)]
struct DashViews<'a> {
    /// (out, s)
    u: MatView<'a>,
    /// (in, s)
    v: MatView<'a>,
    /// (s)
    c: &'a [f32],
}

/// A rank-2 strided view over the storage a layout addresses.
pub(super) fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &'static str) -> CResult<MatView<'a>> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), what).bt());
    };
    let [rows, cols] = l.dims() else {
        return Err(candle_core::Error::Msg(format!(
            "{what}: expected a matrix, got {:?}",
            l.dims()
        ))
        .bt());
    };
    let [rs, cs] = l.stride() else {
        return Err(candle_core::Error::Msg(format!("{what}: bad layout")).bt());
    };
    Ok(MatView {
        data: &v[l.start_offset()..],
        rows: *rows,
        cols: *cols,
        rs: *rs,
        cs: *cs,
    })
}

/// Rows `r0..r0 + len` of `m`, still strided.
fn row_block(m: MatView, r0: usize, len: usize) -> MatView {
    MatView {
        data: if len == 0 {
            &m.data[..0]
        } else {
            &m.data[r0 * m.rs..]
        },
        rows: len,
        ..m
    }
}

/// The view of a tensor the op holds or receives in `bwd`, from `Tensor::storage_and_layout`.
pub(super) fn tensor_view<'a>(
    s: &'a Storage,
    l: &Layout,
    what: &'static str,
) -> CResult<MatView<'a>> {
    match s {
        Storage::Cpu(c) => view(c, l, what),
        _ => Err(candle_core::Error::Msg(format!("{what}: expected a CPU tensor")).bt()),
    }
}

/// The rows `r0..r0+len` of `drop(x)` as a dense block in `buf`, or `x`'s own view of them
/// when there is no dropout.
fn dropped_block<'a>(
    x: MatView<'a>,
    mask: &MaskSpec,
    r0: usize,
    len: usize,
    buf: &'a mut Vec<f32>,
) -> MatView<'a> {
    let block = row_block(x, r0, len);
    if !mask.active() {
        return block;
    }
    let cols = x.cols;
    buf.resize(len * cols, 0.0);
    for i in 0..len {
        let src = &block.data[i * block.rs..];
        mask.drop_row(r0 + i, src, block.cs, &mut buf[i * cols..(i + 1) * cols]);
    }
    MatView::rows(buf, len, cols)
}

/// `[drop(x) · aᵀ | x · v]` (n, r + s), in parallel row chunks, reading each row of `x`
/// once; just `drop(x) · aᵀ` (n, r) without `v`.
fn project(x: MatView, a: MatView, v: Option<MatView>, mask: &MaskSpec) -> Vec<f32> {
    let (r, s) = (a.rows, v.map_or(0, |v| v.cols));
    let k = r + s;
    let mut out = crate::ops::cpu::zeros(x.rows * k);
    if k == 0 {
        return out;
    }
    if !mask.active() {
        match v {
            None => matmul_into(&mut out, x, a.t(), 1.0, false, true),
            Some(v) => {
                let rhs = concat_cols(a.t(), 1.0, v, None); // (in, r+s) = [Aᵀ | V]
                matmul_into(
                    &mut out,
                    x,
                    MatView::rows(&rhs, x.cols, k),
                    1.0,
                    false,
                    true,
                );
            }
        }
        return out;
    }
    out.par_chunks_mut(CHUNK_ROWS * k)
        .enumerate()
        .for_each(|(c, out)| {
            let mut buf = Vec::new();
            let (r0, len) = (c * CHUNK_ROWS, out.len() / k);
            let d = dropped_block(x, mask, r0, len, &mut buf);
            let Some(v) = v else {
                return matmul_into(out, d, a.t(), 1.0, false, false);
            };
            let (mut xa, mut xv) = (
                crate::ops::cpu::zeros(len * r),
                crate::ops::cpu::zeros(len * s),
            );
            matmul_into(&mut xa, d, a.t(), 1.0, false, false);
            matmul_into(&mut xv, row_block(x, r0, len), v, 1.0, false, false);
            for (i, row) in out.chunks_exact_mut(k).enumerate() {
                row[..r].copy_from_slice(&xa[i * r..(i + 1) * r]);
                row[r..].copy_from_slice(&xv[i * s..(i + 1) * s]);
            }
        });
    out
}

/// `[p · p_scale | q · diag(q_scale)]` (m, k₁ + k₂), row-major, for `p (m, k₁)` and
/// `q (m, k₂)`; `q_scale` is 1 when absent.
fn concat_cols(p: MatView, p_scale: f32, q: MatView, q_scale: Option<&[f32]>) -> Vec<f32> {
    let (m, k1, k2) = (p.rows, p.cols, q.cols);
    let k = k1 + k2;
    let mut out = crate::ops::cpu::zeros(m * k);
    for (i, row) in out.chunks_exact_mut(k.max(1)).take(m).enumerate() {
        for (j, o) in row[..k1].iter_mut().enumerate() {
            *o = p_scale * p.data[i * p.rs + j * p.cs];
        }
        for (j, o) in row[k1..].iter_mut().enumerate() {
            *o = q.data[i * q.rs + j * q.cs] * q_scale.map_or(1.0, |c| c[j]);
        }
    }
    out
}

/// Columns `c0..c0 + width` of rows `r0..r0 + len` of the dense row-major `m` with `k`
/// columns.
fn col_block(m: &[f32], k: usize, r0: usize, len: usize, c0: usize, width: usize) -> MatView<'_> {
    MatView {
        data: &m[(r0 * k + c0).min(m.len())..],
        rows: len,
        cols: width,
        rs: k,
        cs: 1,
    }
}

impl LoraLinear {
    /// The output `y (n, out)`, dense row-major.
    fn forward(
        &self,
        x: MatView,
        w: MatView,
        a: MatView,
        b: MatView,
        dash: Option<DashViews>,
    ) -> Vec<f32> {
        let (n, out_dim, r) = (x.rows, w.rows, a.rows);
        let mut y = match &self.bias {
            Some(bias) => super::linear::bias_rows(bias, n),
            None => crate::ops::cpu::zeros(n * out_dim),
        };
        matmul_into(&mut y, x, w.t(), 1.0, self.bias.is_some(), true);
        let Some(d) = dash else {
            let xa = project(x, a, None, &self.mask); // (n, r)
            matmul_into(
                &mut y,
                MatView::rows(&xa, n, r),
                b.t(),
                self.scale,
                true,
                true,
            );
            self.keep(xa);
            return y;
        };
        // Both low-rank terms in one accumulating product, so y is read and written once:
        // [drop(x)·Aᵀ | x·V_s] (n, r+s) · [s·B | U_s·diag(c)]ᵀ (r+s, out).
        let s = d.c.len();
        let left = project(x, a, Some(d.v), &self.mask); // (n, r+s)
        let right = concat_cols(b, self.scale, d.u, Some(d.c)); // (out, r+s)
        matmul_into(
            &mut y,
            MatView::rows(&left, n, r + s),
            MatView::rows(&right, out_dim, r + s).t(),
            1.0,
            true,
            true,
        );
        self.keep(left);
        y
    }

    fn keep(&self, thin: Vec<f32>) {
        *self
            .thin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(thin);
    }

    /// The kept thin projection, when it matches `n` rows of width `k` (taken: the backward
    /// runs once).
    fn take_thin(&self, n: usize, k: usize) -> Option<Vec<f32>> {
        let t = self
            .thin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        (t.len() == n * k).then_some(t)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let x = view(s1, l1, "lora-linear x")?;
        let a = view(s2, l2, "lora-linear a")?;
        let b = view(s3, l3, "lora-linear b")?;
        let widened = widened_weight(&self.w)?;
        let (ws, wl) = self.w.storage_and_layout();
        let w = weight_view(&widened, &ws, wl, "lora-linear w")?;
        let y = self.forward(x, w, a, b, None);
        Ok((CpuStorage::F32(y), Shape::from((x.rows, w.rows))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Needs {
            x: x.track_op(),
            a: a.track_op(),
            b: b.track_op(),
            c: false,
        };
        if !(need.x || need.a || need.b) {
            return Ok((None, None, None));
        }
        let widened = widened_weight(&self.w)?;
        let grads = {
            let (xs, xl) = x.storage_and_layout();
            let (as_, al) = a.storage_and_layout();
            let (bs, bl) = b.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (ws, wl) = self.w.storage_and_layout();
            let v = Views {
                x: tensor_view(&xs, xl, "lora-linear x")?,
                a: tensor_view(&as_, al, "lora-linear a")?,
                b: tensor_view(&bs, bl, "lora-linear b")?,
                dy: tensor_view(&gs, gl, "lora-linear dy")?,
                w: weight_view(&widened, &ws, wl, "lora-linear w")?,
                dash: None,
            };
            self.backward(&v, need)
        };
        let dev = Device::Cpu;
        let to_tensor = |g: Option<Vec<f32>>, t: &Tensor| -> CResult<Option<Tensor>> {
            g.map(|g| Tensor::from_vec(g, t.shape(), &dev)).transpose()
        };
        Ok((
            to_tensor(grads.x, x)?,
            to_tensor(grads.a, a)?,
            to_tensor(grads.b, b)?,
        ))
    }
}

/// Everything the backward reads.
struct Views<'a> {
    x: MatView<'a>,
    a: MatView<'a>,
    b: MatView<'a>,
    dy: MatView<'a>,
    w: MatView<'a>,
    dash: Option<DashViews<'a>>,
}

/// Which gradients the backward forms.
#[derive(Clone, Copy, Debug)]
struct Needs {
    x: bool,
    a: bool,
    b: bool,
    c: bool,
}

/// Dense row-major gradients, each only when asked for.
struct Grads {
    x: Option<Vec<f32>>,
    a: Option<Vec<f32>>,
    b: Option<Vec<f32>>,
    c: Option<Vec<f32>>,
}

#[cfg(test)]
mod tests;
