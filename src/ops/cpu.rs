//! Host-side plumbing shared by the CPU kernels of `ops`: typed slice access to candle
//! storage (gathering strided layouts into a dense copy only when needed), the GEMM wrapper
//! around the `gemm` crate, and the device/dtype test that decides between a fused kernel
//! and the composed reference.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Tensor};

pub(crate) type CResult<T> = candle_core::Result<T>;

/// True when `t` can go through the fused f32 CPU kernels.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The f32 data of `s` viewed through `l`, row-major. Borrowed when the layout is already
/// contiguous (the common case), gathered into a fresh buffer otherwise.
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> CResult<Cow<'a, [f32]>> {
    let v = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => {
            return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt());
        }
    };
    Ok(dense(v, l))
}

/// The whole f32 buffer behind `s`, to be indexed through a layout's own strides.
pub(crate) fn f32_storage<'a>(s: &'a CpuStorage, op: &'static str) -> CResult<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    }
}

/// The i64 data of `s` viewed through `l`, row-major.
pub(crate) fn i64_data<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> CResult<Cow<'a, [i64]>> {
    let v = match s {
        CpuStorage::I64(v) => v.as_slice(),
        other => {
            return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt());
        }
    };
    Ok(dense(v, l))
}

/// Row-major copy of the elements `l` addresses in `v` (or a borrow when contiguous).
pub(crate) fn dense<'a, T: Copy>(v: &'a [T], l: &Layout) -> Cow<'a, [T]> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return Cow::Borrowed(&v[a..b]);
    }
    let dims = l.dims();
    let stride = l.stride();
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Cow::Owned(out);
    }
    // Odometer over all but the last dim; the last dim is walked with its own stride.
    let rank = dims.len();
    if rank == 0 {
        out.push(v[l.start_offset()]);
        return Cow::Owned(out);
    }
    let last = dims[rank - 1];
    let last_stride = stride[rank - 1];
    let mut idx = vec![0usize; rank - 1];
    let mut base = l.start_offset();
    loop {
        for j in 0..last {
            out.push(v[base + j * last_stride]);
        }
        // advance the odometer
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return Cow::Owned(out);
            }
            d -= 1;
            idx[d] += 1;
            base += stride[d];
            if idx[d] < dims[d] {
                break;
            }
            base -= stride[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` in f32 with explicit row/column strides for the
/// operands (element units); `dst` is dense row-major and fully overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].iter_mut().for_each(|d| *d = 0.0);
        return;
    }
    // The last element each operand touches must be in bounds: the unsafe call below reads
    // raw pointers, so check here instead of trusting the caller's strides.
    assert!((m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(), "gemm lhs out of bounds");
    assert!((k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(), "gemm rhs out of bounds");
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds of every operand were checked above; dst is dense (m, n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Rows at least this long are worth a rayon task each; shorter rows are batched.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}
