//! A frozen linear layer with a LoRA term as one candle custom op:
//! `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ` (Hu et al., 2021, with PEFT's dropout on A's input).
//!
//! Composed from candle ops, one adapted layer keeps the dropped-out copy of `x` (n, in),
//! its mask, the base output, the LoRA delta and their sum (four (n, out) buffers), and the
//! backward adds a zero buffer and an add per node. Here the forward writes one (n, out)
//! buffer (the LoRA product is accumulated into the base GEMM's output) and keeps nothing
//! else: the dropout mask is a pure function of `(seed, row, col)`, so the backward
//! regenerates it, and `drop(x)·Aᵀ` (n, r) is recomputed from the same row chunks that the
//! weight gradients need anyway.
//!
//! Backward, with `g = s·dy·B` (n, r) and `M` the scaled mask:
//! `dx = dy·W + (g·A) ⊙ M`, `dA = gᵀ·drop(x)`, `dB = s·dyᵀ·(drop(x)·Aᵀ)`; `W` gets none.
//! Every product runs on faer through strided views, so transposes are never copied.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu::{is_cpu_f32, matmul_into, CResult, MatView};
use crate::error::{Error, Result};

/// Rows per rayon task in the chunked (dropout) passes: a dropped-out chunk is at most
/// `CHUNK_ROWS · in` floats, which stays in L2 for the usual hidden sizes.
const CHUNK_ROWS: usize = 32;

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
    check_shapes(x, w, a, b)?;
    if !(0.0..1.0).contains(&dropout_p) {
        return Err(Error::msg(format!(
            "dropout probability {dropout_p} is outside [0, 1)"
        )));
    }
    if ![x, w, a, b].iter().all(|t| is_cpu_f32(t)) {
        return super::reference::lora_linear(x, w, a, b, scale, dropout_p, seed);
    }
    let op = LoraLinear {
        w: w.detach(),
        scale: scale as f32,
        mask: MaskSpec::new(dropout_p, seed),
    };
    Ok(x.apply_op3(a, b, op)?)
}

fn check_shapes(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    let (out_dim, in_dim) = w.dims2()?;
    let r = a.dims().first().copied().unwrap_or(0);
    let checks: [(&str, &Tensor, Vec<usize>); 3] = [
        (
            "lora_linear x",
            x,
            vec![x.dims().first().copied().unwrap_or(0), in_dim],
        ),
        ("lora_linear a", a, vec![r, in_dim]),
        ("lora_linear b", b, vec![out_dim, r]),
    ];
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

/// The dropout mask as a counter-based hash: element (row, col) is kept when the top 24
/// bits of `fmix32(fmix32(col ^ k0) + k1)` are at least `p · 2²⁴`, where `(k0, k1)` are
/// the two halves of SplitMix64 output number `row` of `seed`. Any element can be drawn in
/// any order, so rows are generated in parallel and again in the backward.
#[derive(Clone, Copy, Debug)]
struct MaskSpec {
    seed: u64,
    /// Kept iff the 24-bit draw is `>= threshold`; 0 means no dropout.
    threshold: u32,
    /// `1 / (1 - p)`.
    keep_scale: f32,
}

impl MaskSpec {
    fn new(p: f32, seed: u64) -> Self {
        // draw · 2⁻²⁴ ≥ p  ⟺  draw ≥ ⌈p · 2²⁴⌉ (both sides exact in f64).
        let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
        MaskSpec {
            seed,
            threshold,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    fn active(&self) -> bool {
        self.threshold > 0
    }

    fn row_keys(&self, row: usize) -> (u32, u32) {
        let z = splitmix64(
            self.seed
                .wrapping_add((row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
        (z as u32, (z >> 32) as u32)
    }

    /// `keep_scale` or 0 for element `col` of the row with keys `k`.
    #[inline(always)]
    fn value(&self, k: (u32, u32), col: usize) -> f32 {
        let h = fmix32(fmix32(col as u32 ^ k.0).wrapping_add(k.1));
        if h >> 8 >= self.threshold {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// `out[j] = src[j · stride] · mask(row, j)`.
    fn drop_row(&self, row: usize, src: &[f32], stride: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature the function is compiled for was detected at run time.
            return unsafe { self.drop_row_avx2(row, src, stride, out) };
        }
        self.drop_row_any(row, src, stride, out)
    }

    /// `acc[j] += add[j] · mask(row, j)`.
    fn add_masked_row(&self, row: usize, add: &[f32], acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { self.add_masked_row_avx2(row, add, acc) };
        }
        self.add_masked_row_any(row, add, acc)
    }

    // The hash needs 32-bit lane multiplies, which x86-64's baseline (SSE2) lacks: these
    // copies are compiled for AVX2 so the row loops run 8 lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn drop_row_avx2(&self, row: usize, src: &[f32], stride: usize, out: &mut [f32]) {
        self.drop_row_any(row, src, stride, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_masked_row_avx2(&self, row: usize, add: &[f32], acc: &mut [f32]) {
        self.add_masked_row_any(row, add, acc)
    }

    #[inline(always)]
    fn drop_row_any(&self, row: usize, src: &[f32], stride: usize, out: &mut [f32]) {
        let k = self.row_keys(row);
        if stride == 1 {
            let n = out.len().min(src.len());
            let (out, src) = (&mut out[..n], &src[..n]);
            for j in 0..n {
                out[j] = src[j] * self.value(k, j);
            }
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                *o = src[j * stride] * self.value(k, j);
            }
        }
    }

    #[inline(always)]
    fn add_masked_row_any(&self, row: usize, add: &[f32], acc: &mut [f32]) {
        let k = self.row_keys(row);
        let n = acc.len().min(add.len());
        let (acc, add) = (&mut acc[..n], &add[..n]);
        for j in 0..n {
            acc[j] += add[j] * self.value(k, j);
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// MurmurHash3's 32-bit finaliser: a bijective mix with full avalanche, cheap in SIMD.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The (rows, cols) row-major dropout mask `lora_linear` applies for `(p, seed)`: entries
/// are `1 / (1 - p)` (kept) or 0; all ones when `p == 0`.
pub fn dropout_mask(rows: usize, cols: usize, p: f32, seed: u64) -> Vec<f32> {
    let spec = MaskSpec::new(p, seed);
    if !spec.active() {
        return vec![1.0; rows * cols];
    }
    let ones = vec![1.0f32; cols];
    let mut out = vec![0f32; rows * cols];
    if cols > 0 {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, o)| spec.drop_row(i, &ones, 1, o));
    }
    out
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
    mask: MaskSpec,
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

/// `xa (n, r) = drop(x) · aᵀ`, in parallel row chunks.
fn project_dropped(x: MatView, a: MatView, mask: &MaskSpec) -> Vec<f32> {
    let r = a.rows;
    let mut xa = vec![0f32; x.rows * r];
    if !mask.active() {
        matmul_into(&mut xa, x, a.t(), 1.0, false, true);
        return xa;
    }
    if r == 0 {
        return xa;
    }
    xa.par_chunks_mut(CHUNK_ROWS * r)
        .enumerate()
        .for_each(|(c, out)| {
            let mut buf = Vec::new();
            let r0 = c * CHUNK_ROWS;
            let d = dropped_block(x, mask, r0, out.len() / r, &mut buf);
            matmul_into(out, d, a.t(), 1.0, false, false);
        });
    xa
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
        let (ws, wl) = self.w.storage_and_layout();
        let w = tensor_view(&ws, wl, "lora-linear w")?;
        let (n, out_dim) = (x.rows, w.rows);
        let mut y = vec![0f32; n * out_dim];
        matmul_into(&mut y, x, w.t(), 1.0, false, true);
        let xa = project_dropped(x, a, &self.mask); // (n, r)
        matmul_into(
            &mut y,
            MatView::rows(&xa, n, a.rows),
            b.t(),
            self.scale,
            true,
            true,
        );
        Ok((CpuStorage::F32(y), Shape::from((n, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_a, need_b) = (x.track_op(), a.track_op(), b.track_op());
        if !(need_x || need_a || need_b) {
            return Ok((None, None, None));
        }
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
                w: tensor_view(&ws, wl, "lora-linear w")?,
            };
            self.backward(&v, need_x, need_a, need_b)
        };
        let dev = Device::Cpu;
        let to_tensor = |g: Option<Vec<f32>>, t: &Tensor| -> CResult<Option<Tensor>> {
            g.map(|g| Tensor::from_vec(g, t.shape(), &dev)).transpose()
        };
        Ok((
            to_tensor(grads.0, x)?,
            to_tensor(grads.1, a)?,
            to_tensor(grads.2, b)?,
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
}

type Grads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

impl LoraLinear {
    /// `(dx, dA, dB)` as dense row-major buffers, each only when asked for.
    fn backward(&self, v: &Views, need_x: bool, need_a: bool, need_b: bool) -> Grads {
        let (n, in_dim, r) = (v.x.rows, v.x.cols, v.a.rows);
        let mask = &self.mask;
        // g = s · dy · B  (n, r): the gradient reaching drop(x)·Aᵀ.
        let mut g = vec![0f32; n * r];
        if need_x || need_a {
            matmul_into(&mut g, v.dy, v.b, self.scale, false, true);
        }
        let gv = MatView::rows(&g, n, r);
        let mut dx = need_x.then(|| {
            let mut dx = vec![0f32; n * in_dim];
            matmul_into(&mut dx, v.dy, v.w, 1.0, false, true); // dy · W
            dx
        });
        let mut xa = need_b.then(|| vec![0f32; n * r]);

        // One pass over row chunks regenerates each chunk of drop(x) once for dA and
        // drop(x)·Aᵀ, and applies the mask to the LoRA part of dx.
        let chunks = n.div_ceil(CHUNK_ROWS);
        let mut dx_parts: Vec<Option<&mut [f32]>> = match dx.as_mut() {
            Some(d) if in_dim > 0 => d.chunks_mut(CHUNK_ROWS * in_dim).map(Some).collect(),
            _ => (0..chunks).map(|_| None).collect(),
        };
        let mut xa_parts: Vec<Option<&mut [f32]>> = match xa.as_mut() {
            Some(d) if r > 0 => d.chunks_mut(CHUNK_ROWS * r).map(Some).collect(),
            _ => (0..chunks).map(|_| None).collect(),
        };
        dx_parts.resize_with(chunks, || None);
        xa_parts.resize_with(chunks, || None);
        let partial_da: Vec<Vec<f32>> = dx_parts
            .into_par_iter()
            .zip(xa_parts.into_par_iter())
            .enumerate()
            .map(|(c, (dx_c, xa_c))| {
                let r0 = c * CHUNK_ROWS;
                let len = CHUNK_ROWS.min(n - r0);
                let g_c = row_block(gv, r0, len);
                let mut buf = Vec::new();
                let mut da = Vec::new();
                if need_a || need_b {
                    let d = dropped_block(v.x, mask, r0, len, &mut buf);
                    if let Some(xa_c) = xa_c {
                        matmul_into(xa_c, d, v.a.t(), 1.0, false, false);
                    }
                    if need_a {
                        da = vec![0f32; r * in_dim];
                        matmul_into(&mut da, g_c.t(), d, 1.0, false, false);
                    }
                }
                if let Some(dx_c) = dx_c {
                    if mask.active() {
                        let mut t = vec![0f32; len * in_dim];
                        matmul_into(&mut t, g_c, v.a, 1.0, false, false); // g·A
                        for i in 0..len {
                            let rows = i * in_dim..(i + 1) * in_dim;
                            mask.add_masked_row(r0 + i, &t[rows.clone()], &mut dx_c[rows]);
                        }
                    } else {
                        matmul_into(dx_c, g_c, v.a, 1.0, true, false);
                    }
                }
                da
            })
            .collect();
        let da = need_a.then(|| {
            let mut da = vec![0f32; r * in_dim];
            for p in partial_da.iter().filter(|p| !p.is_empty()) {
                da.iter_mut().zip(p).for_each(|(d, &p)| *d += p);
            }
            da
        });
        // dB = s · dyᵀ · (drop(x)·Aᵀ)  (out, r)
        let db = xa.map(|xa| {
            let mut db = vec![0f32; v.b.rows * r];
            matmul_into(
                &mut db,
                v.dy.t(),
                MatView::rows(&xa, n, r),
                self.scale,
                false,
                true,
            );
            db
        });
        (dx, da, db)
    }
}

#[cfg(test)]
mod tests;
