//! Host-side plumbing shared by the CPU kernels of `ops`: typed slice access to candle
//! storage (gathering strided layouts into a dense copy only when needed), a strided
//! matmul on faer, vectorisable `exp` and row reductions, runtime AVX2 dispatch, and the
//! device/dtype test that decides between a fused kernel and the composed reference.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Tensor};
use rayon::prelude::*;

pub(crate) type CResult<T> = candle_core::Result<T>;

/// True when `t` can go through the fused f32 CPU kernels: an f32 tensor in host memory,
/// and the fused kernels not switched off (`LORA_DASH_KERNELS=reference`, see
/// [`super::kernels`]).
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    !super::reference_forced() && matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// True when `w` can be the frozen weight of the fused CPU linear kernels: in host memory, f32
/// or stored in bf16 / f16 (`--dtype`), which those kernels widen to f32 per call.
pub(crate) fn is_cpu_weight(w: &Tensor) -> bool {
    !super::reference_forced()
        && matches!(w.device(), Device::Cpu)
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// A bf16 / f16 frozen weight `(rows, cols)` widened to a dense row-major f32 buffer (exact:
/// every half value is an f32), for one kernel call; None for an f32 weight, which the
/// kernels read in place. The buffer lives only as long as the call.
pub(crate) fn widened_weight(w: &Tensor) -> CResult<Option<Vec<f32>>> {
    if w.dtype() == DType::F32 {
        return Ok(None);
    }
    let (rows, cols) = w.dims2()?;
    // A transposed weight is widened in its own (column-major) order, so the kernels see the
    // same strides as for the f32 weight and compute the same numbers.
    let w = if col_major(w.layout()) {
        w.t()?.contiguous()?
    } else {
        w.contiguous()?
    };
    let (s, l) = w.storage_and_layout();
    let n = rows * cols;
    let off = l.start_offset();
    let out = match &*s {
        candle_core::Storage::Cpu(CpuStorage::BF16(v)) => {
            v[off..off + n].par_iter().map(|x| x.to_f32()).collect()
        }
        candle_core::Storage::Cpu(CpuStorage::F16(v)) => {
            v[off..off + n].par_iter().map(|x| x.to_f32()).collect()
        }
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "frozen weight: expected f32, bf16 or f16 on the CPU, got {:?}",
                w.dtype()
            ))
            .bt())
        }
    };
    Ok(Some(out))
}

/// A 2-d layout that is the transpose of a dense row-major one (and not itself row-major).
fn col_major(l: &Layout) -> bool {
    let (d, st) = (l.dims(), l.stride());
    d.len() == 2 && d[0] > 1 && d[1] > 1 && st[0] == 1 && st[1] == d[0]
}

/// The view of a frozen weight: the widened buffer when there is one, else the weight's own
/// f32 storage through its layout.
pub(crate) fn weight_view<'a>(
    widened: &'a Option<Vec<f32>>,
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &'static str,
) -> CResult<MatView<'a>> {
    match widened {
        Some(v) => {
            let (rows, cols) = (l.dims()[0], l.dims()[1]);
            if col_major(l) {
                Ok(MatView::rows(v, cols, rows).t())
            } else {
                Ok(MatView::rows(v, rows, cols))
            }
        }
        None => match s {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                let st = l.stride();
                Ok(MatView {
                    data: &v[l.start_offset()..],
                    rows: l.dims()[0],
                    cols: l.dims()[1],
                    rs: st[0],
                    cs: st[1],
                })
            }
            _ => Err(candle_core::Error::Msg(format!("{what}: expected an f32 CPU tensor")).bt()),
        },
    }
}

/// The f32 data of `s` viewed through `l`, row-major. Borrowed when the layout is already
/// contiguous (the common case), gathered into a fresh buffer otherwise.
pub(crate) fn f32_data<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> CResult<Cow<'a, [f32]>> {
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

/// The f32 data of a tensor's storage (from `Tensor::storage_and_layout`), for tensors an
/// op holds rather than receives as arguments.
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &'static str,
) -> CResult<Cow<'a, [f32]>> {
    match s {
        candle_core::Storage::Cpu(s) => f32_data(s, l, op),
        _ => Err(candle_core::Error::Msg(format!("{op}: expected a CPU tensor")).bt()),
    }
}

/// The i64 data of `s` viewed through `l`, row-major.
pub(crate) fn i64_data<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> CResult<Cow<'a, [i64]>> {
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

/// A strided read-only matrix view over a slice (strides in elements).
#[derive(Clone, Copy)]
pub(crate) struct MatView<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatView<'a> {
    /// Dense row-major `rows × cols`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatView {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without touching the data.
    pub fn t(self) -> Self {
        MatView {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m, n) = alpha · a (m, k) · b (k, n)`, or `dst += …` when `accumulate`; `dst` is
/// dense row-major. `parallel` spreads one product over the rayon pool; callers already
/// inside a rayon task pass `false`.
///
/// Runs on faer's matmul: on the AVX2 machines this targets it is about 1.5–2× as fast as
/// the `gemm` crate candle's own CPU matmul uses (same shapes, same thread count).
#[track_caller]
pub(crate) fn matmul_into(
    dst: &mut [f32],
    a: MatView,
    b: MatView,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if gemm_profile::enabled() {
        let at = std::panic::Location::caller();
        let t = std::time::Instant::now();
        matmul_into_impl(dst, a, b, alpha, accumulate, parallel);
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        gemm_profile::record(at, (a.rows, a.cols, b.cols), threads, t.elapsed());
    } else {
        matmul_into_impl(dst, a, b, alpha, accumulate, parallel);
    }
}

/// Per-call-site GEMM time and FLOPs, for the step profile in BENCHMARKS.md: enabled by
/// `LORA_DASH_PROFILE_GEMM=1`, read with [`gemm_profile::take`]. Off, it costs one load
/// of a flag per product.
pub mod gemm_profile {
    use std::collections::BTreeMap;
    use std::panic::Location;
    use std::sync::{Mutex, OnceLock, PoisonError};
    use std::time::Duration;

    /// One call site's totals.
    #[derive(Debug, Clone, Default)]
    pub struct Site {
        pub calls: u64,
        pub flops: f64,
        /// Wall seconds of the calls.
        pub seconds: f64,
        /// Core-seconds: wall seconds × the threads each call ran on.
        pub core_seconds: f64,
        /// Largest (m, k, n) seen.
        pub shape: (usize, usize, usize),
    }

    static ON: OnceLock<bool> = OnceLock::new();
    static SITES: Mutex<BTreeMap<String, Site>> = Mutex::new(BTreeMap::new());

    pub fn enabled() -> bool {
        *ON.get_or_init(|| std::env::var("LORA_DASH_PROFILE_GEMM").is_ok_and(|v| v == "1"))
    }

    pub(crate) fn record(
        at: &Location,
        (m, k, n): (usize, usize, usize),
        threads: usize,
        dt: Duration,
    ) {
        // Few-row products run on their own kernel: kept apart from the GEMMs of a site.
        let key = if m <= super::SKINNY_MAX_ROWS {
            format!(
                "{}:{} (m <= {})",
                at.file(),
                at.line(),
                super::SKINNY_MAX_ROWS
            )
        } else {
            format!("{}:{}", at.file(), at.line())
        };
        let mut sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
        let s = sites.entry(key).or_default();
        s.calls += 1;
        s.flops += 2.0 * (m * k * n) as f64;
        s.seconds += dt.as_secs_f64();
        s.core_seconds += dt.as_secs_f64() * threads as f64;
        if m * k * n > s.shape.0 * s.shape.1 * s.shape.2 {
            s.shape = (m, k, n);
        }
    }

    /// The totals so far as a table per call site, divided by `steps` (per `unit`: step,
    /// run, …), sorted by core seconds, with a total line; resets them. Empty when
    /// nothing was recorded.
    pub fn report(steps: f64, unit: &str) -> String {
        use std::fmt::Write;
        let sites = take();
        let mut out = String::new();
        if sites.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "{:<52} {:>7} {:>9} {:>8} {:>8} {:>10} {:>18}",
            format!("GEMM call site (per {unit})"),
            "calls",
            "GFLOP",
            "wall s",
            "core s",
            "GFLOP/s/c",
            "largest m,k,n"
        );
        let mut rows: Vec<_> = sites.into_iter().collect();
        rows.sort_by(|a, b| b.1.core_seconds.total_cmp(&a.1.core_seconds));
        let (mut f, mut c) = (0.0, 0.0);
        for (site, s) in rows {
            let short = site.rsplit("src/").next().unwrap_or(&site).to_string();
            let _ = writeln!(
                out,
                "{:<52} {:>7.0} {:>9.2} {:>8.3} {:>8.3} {:>10.1} {:>18}",
                short,
                s.calls as f64 / steps,
                s.flops / steps / 1e9,
                s.seconds / steps,
                s.core_seconds / steps,
                s.flops / s.core_seconds.max(1e-12) / 1e9,
                format!("{},{},{}", s.shape.0, s.shape.1, s.shape.2)
            );
            f += s.flops / steps;
            c += s.core_seconds / steps;
        }
        // Calls made inside a parallel chunk run one per core at the same time: their wall
        // seconds overlap, so only core seconds add up.
        let _ = writeln!(
            out,
            "{:<52} {:>7} {:>9.2} {:>8} {:>8.3} {:>10.1}",
            "all GEMMs",
            "",
            f / 1e9,
            "",
            c,
            f / c.max(1e-12) / 1e9
        );
        out
    }

    /// The totals so far, by `file:line` of the call site; resets them.
    pub fn take() -> BTreeMap<String, Site> {
        std::mem::take(&mut *SITES.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn matmul_into_impl(
    dst: &mut [f32],
    a: MatView,
    b: MatView,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() >= m * n, "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    let dst = &mut dst[..m * n];
    if k == 0 {
        if !accumulate {
            dst.iter_mut().for_each(|d| *d = 0.0);
        }
        return;
    }
    // The last element each operand touches must be in bounds: the views below are built
    // from raw pointers, so check here instead of trusting the caller's strides.
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "matmul lhs out of bounds"
    );
    assert!(
        (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
        "matmul rhs out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if (2..=SKINNY_MAX_ROWS).contains(&m) && a.cs == 1 && b.rs == 1 && skinny_enabled() {
        skinny_matmul(dst, a, b, alpha, accumulate, parallel);
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        faer::Par::rayon(threads)
    } else {
        faer::Par::Seq
    };
    let split = parallel && threads > 1 && split_gemm() && m * n * k >= SPLIT_MIN_FLOP;
    // SAFETY: every (row, col) of both views addresses an in-bounds element (checked above)
    // and the views only read.
    let (av, bv) = unsafe {
        (
            faer::MatRef::<f32>::from_raw_parts(
                a.data.as_ptr(),
                m,
                k,
                a.rs as isize,
                a.cs as isize,
            ),
            faer::MatRef::<f32>::from_raw_parts(
                b.data.as_ptr(),
                k,
                n,
                b.rs as isize,
                b.cs as isize,
            ),
        )
    };
    let c = faer::MatMut::from_row_major_slice_mut(dst, m, n);
    let acc = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    if split {
        split_matmul(c, acc, av, bv, alpha, threads);
    } else {
        faer::linalg::matmul::matmul(c, acc, av, bv, alpha, par);
    }
}

/// Products with 2 to this many rows (one row is a matrix-vector product, which faer
/// already streams) whose operands are both contiguous along `k` (the
/// forward product against a row-major frozen weight, `x · wᵀ`) run on [`skinny_matmul`].
pub(crate) const SKINNY_MAX_ROWS: usize = 16;

/// Whether the few-row kernel runs: on CPUs with AVX2 and FMA (elsewhere faer takes these
/// products too), unless `LORA_DASH_SKINNY=0` sends them to faer (for comparison). Checked once.
#[cfg(target_arch = "x86_64")]
fn skinny_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("LORA_DASH_SKINNY").map_or(true, |v| v != "0")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    })
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used by `skinny_matmul`, whose tasks write disjoint columns.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for OutPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for OutPtr {}

/// `dst (m, n) = alpha · a (m, k) · b (k, n)` (or `+=`) for a few rows `m`, with the rows of
/// `a` and the columns of `b` contiguous (`a.cs == 1`, `b.rs == 1`): every output element is a
/// dot product of two contiguous vectors. This is the decoding step's shape (a handful of new
/// tokens against every weight), where a GEMM's packing of the weight costs as much as the
/// product: here each weight column is read once, straight from memory, against all rows of
/// `a` held in cache, in register blocks of 4 rows × 2 columns of 8 lanes (AVX2) or 8 rows × 2
/// columns of 16 lanes (AVX-512, where the CPU has it; `LORA_DASH_SIMD=avx2` keeps the AVX2
/// kernel). The columns are split over the
/// rayon pool when `parallel`. Each element is one sum in a fixed order (the lanes, then a fixed
/// fold), so the result does not depend on the thread count. Only called when
/// [`skinny_enabled`] (the CPU has AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
fn skinny_matmul(
    dst: &mut [f32],
    a: MatView,
    b: MatView,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let wide = simd_level() == SimdLevel::Avx512;
    skinny_matmul_with(dst, a, b, alpha, accumulate, parallel, wide);
}

/// [`skinny_matmul`] on the AVX-512 kernel (`wide`, only where the CPU has AVX-512F) or the
/// AVX2 one.
#[cfg(target_arch = "x86_64")]
fn skinny_matmul_with(
    dst: &mut [f32],
    a: MatView,
    b: MatView,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
    wide: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert!(m <= SKINNY_MAX_ROWS);
    let out = OutPtr(dst.as_mut_ptr());
    // SAFETY: tasks get disjoint column ranges [j0, j1) of dst (m × n, row-major, length
    // ≥ m·n checked by the caller); a and b are in bounds (checked by the caller for the last
    // element each view touches); the caller checked AVX2 and FMA, and AVX-512F for `wide`.
    let run =
        |j0: usize, j1: usize| unsafe { skinny_cols(out, a, b, alpha, accumulate, j0, j1, wide) };
    let threads = rayon::current_num_threads();
    // About 64 KiB of b per task, at least 2 tasks per thread where n allows.
    let per_task = (16384 / k.max(1)).clamp(2, n.div_ceil(2 * threads).max(2));
    let per_task = per_task.div_ceil(2) * 2;
    if parallel && threads > 1 && n > per_task && m * n * k >= (1 << 16) {
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
            let j0 = t * per_task;
            run(j0, (j0 + per_task).min(n));
        });
    } else {
        run(0, n);
    }
}

/// `acc[i][c] = rows[i][..k] · cols[c][..k]` for `R` rows and `C` columns: `R × C` AVX-512
/// accumulators of 16 lanes, the last partial chunk loaded under a mask.
///
/// # Safety
/// The CPU has AVX-512F; `rows[..R]` and `cols[..C]` each address `k` readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots512<const R: usize, const C: usize>(
    acc: &mut [[f32; 2]; 8],
    rows: &[*const f32; 8],
    cols: &[*const f32; 2],
    k: usize,
) {
    use std::arch::x86_64::*;
    const W: usize = 16;
    let body = k / W * W;
    let mut lanes = [[_mm512_setzero_ps(); C]; R];
    let mut p = 0;
    while p < body {
        let mut wv = [_mm512_setzero_ps(); C];
        for c in 0..C {
            wv[c] = _mm512_loadu_ps(cols[c].add(p));
        }
        for i in 0..R {
            let xv = _mm512_loadu_ps(rows[i].add(p));
            for c in 0..C {
                lanes[i][c] = _mm512_fmadd_ps(xv, wv[c], lanes[i][c]);
            }
        }
        p += W;
    }
    if body < k {
        let mask = ((1u32 << (k - body)) - 1) as __mmask16;
        let mut wv = [_mm512_setzero_ps(); C];
        for c in 0..C {
            wv[c] = _mm512_maskz_loadu_ps(mask, cols[c].add(body));
        }
        for i in 0..R {
            let xv = _mm512_maskz_loadu_ps(mask, rows[i].add(body));
            for c in 0..C {
                lanes[i][c] = _mm512_fmadd_ps(xv, wv[c], lanes[i][c]);
            }
        }
    }
    for i in 0..R {
        for c in 0..C {
            acc[i][c] = _mm512_reduce_add_ps(lanes[i][c]);
        }
    }
}

/// Columns `[j0, j1)` of [`skinny_matmul`]: column pairs, each against row blocks of up to 8
/// rows on the AVX-512 kernel ([`dots512`], when `wide`) or 4 on the AVX2 one ([`dots`]).
///
/// # Safety
/// `out` addresses a row-major `a.rows × b.cols` buffer that no one else writes in these
/// columns; `a.cs == 1`, `b.rs == 1` and both views are in bounds; the CPU has AVX2 and FMA,
/// and AVX-512F when `wide`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_cols(
    out: OutPtr,
    a: MatView,
    b: MatView,
    alpha: f32,
    accumulate: bool,
    j0: usize,
    j1: usize,
    wide: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let row = |r: usize| &a.data[r * a.rs..r * a.rs + k];
    let col = |j: usize| &b.data[j * b.cs..j * b.cs + k];
    let block_rows = if wide { 8 } else { 4 };
    let mut j = j0;
    while j < j1 {
        let jb = (j1 - j).min(2);
        let mut r = 0;
        while r < m {
            let rb = (m - r).min(block_rows);
            let mut acc = [[0f32; 2]; 8];
            if wide {
                let cols = [col(j).as_ptr(), col(j + jb - 1).as_ptr()];
                let mut rows = [row(r).as_ptr(); 8];
                for (i, p) in rows.iter_mut().enumerate().take(rb) {
                    *p = row(r + i).as_ptr();
                }
                macro_rules! block {
                    ($($r:literal),*) => {
                        match (rb, jb) {
                            $(($r, 2) => dots512::<$r, 2>(&mut acc, &rows, &cols, k),
                              ($r, _) => dots512::<$r, 1>(&mut acc, &rows, &cols, k),)*
                            _ => unreachable!("row block of {rb}"),
                        }
                    };
                }
                block!(1, 2, 3, 4, 5, 6, 7, 8);
            } else {
                match (rb, jb) {
                    (4, 2) => dots::<4, 2>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (3, 2) => dots::<3, 2>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (2, 2) => dots::<2, 2>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (1, 2) => dots::<1, 2>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (4, _) => dots::<4, 1>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (3, _) => dots::<3, 1>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    (2, _) => dots::<2, 1>(&mut acc, |i| row(r + i), |c| col(j + c)),
                    _ => dots::<1, 1>(&mut acc, |i| row(r + i), |c| col(j + c)),
                }
            }
            for (i, acc_row) in acc.iter().enumerate().take(rb) {
                for (c, &v) in acc_row.iter().enumerate().take(jb) {
                    let d = out.0.add((r + i) * n + j + c);
                    *d = if accumulate {
                        *d + alpha * v
                    } else {
                        alpha * v
                    };
                }
            }
            r += rb;
        }
        j += jb;
    }
}

/// `acc[i][c] = rows(i) · cols(c)` for `R` rows and `C` columns of equal length: `R × C`
/// AVX2 accumulators of 8 lanes with fused multiply-adds, each folded pairwise at the end and
/// the tail added last.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots<'a, const R: usize, const C: usize>(
    acc: &mut [[f32; 2]; 8],
    rows: impl Fn(usize) -> &'a [f32],
    cols: impl Fn(usize) -> &'a [f32],
) {
    use std::arch::x86_64::*;
    let rs: [&[f32]; R] = std::array::from_fn(&rows);
    let cs: [&[f32]; C] = std::array::from_fn(&cols);
    let k = rs[0].len();
    let body = k / LANES * LANES;
    let mut lanes = [[_mm256_setzero_ps(); C]; R];
    let mut p = 0;
    while p < body {
        let mut wv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            wv[c] = _mm256_loadu_ps(cs[c].as_ptr().add(p));
        }
        for i in 0..R {
            let xv = _mm256_loadu_ps(rs[i].as_ptr().add(p));
            for c in 0..C {
                lanes[i][c] = _mm256_fmadd_ps(xv, wv[c], lanes[i][c]);
            }
        }
        p += LANES;
    }
    for i in 0..R {
        for c in 0..C {
            let mut v = [0f32; LANES];
            _mm256_storeu_ps(v.as_mut_ptr(), lanes[i][c]);
            let mut s = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
            for q in body..k {
                s += rs[i][q] * cs[c][q];
            }
            acc[i][c] = s;
        }
    }
}

/// Products smaller than this (m·n·k) are not worth splitting across threads.
const SPLIT_MIN_FLOP: usize = 1 << 20;

/// Whether parallel products are split into one sequential product per thread (the
/// default) instead of handing the thread count to faer. faer's parallel kernel synchronises
/// its threads after every block of the product; for the short products of a training step
/// (a few hundred rows) those waits cost more than the split's duplicated packing.
/// `LORA_DASH_GEMM=faer` restores faer's own split.
fn split_gemm() -> bool {
    static SPLIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| std::env::var("LORA_DASH_GEMM").map_or(true, |v| v != "faer"))
}

/// `c = acc(c, alpha · a · b)` as `parts` independent sequential products over contiguous
/// slabs of the output's longer side.
fn split_matmul(
    c: faer::MatMut<f32>,
    acc: faer::Accum,
    a: faer::MatRef<f32>,
    b: faer::MatRef<f32>,
    alpha: f32,
    parts: usize,
) {
    let (m, n) = (c.nrows(), c.ncols());
    if parts <= 1 || (m < 2 && n < 2) {
        faer::linalg::matmul::matmul(c, acc, a, b, alpha, faer::Par::Seq);
        return;
    }
    let left = parts / 2;
    let right = parts - left;
    // Split the longer side: every part packs all of the other operand, so splitting rows
    // repeats B's packing and splitting columns repeats A's (the LM head's 128 × 49152
    // products split by columns, the layers' 1024 × 576 ones by rows).
    if m >= n {
        let mid = m * left / parts;
        let (c0, c1) = c.split_at_row_mut(mid);
        let (a0, a1) = a.split_at_row(mid);
        rayon::join(
            || split_matmul(c0, acc, a0, b, alpha, left),
            || split_matmul(c1, acc, a1, b, alpha, right),
        );
    } else {
        let mid = n * left / parts;
        let (c0, c1) = c.split_at_col_mut(mid);
        let (b0, b1) = b.split_at_col(mid);
        rayon::join(
            || split_matmul(c0, acc, a, b0, alpha, left),
            || split_matmul(c1, acc, a, b1, alpha, right),
        );
    }
}

/// Buffers at least this long are zeroed by the rayon pool rather than the calling thread.
const PAR_ZERO_MIN: usize = 1 << 16;

/// A zero-filled f32 buffer of `n` elements. `vec![0.0; n]` zeroes a reused heap block with
/// one `memset` on the calling thread (a tenth of an encoder step, with the other cores
/// idle); large buffers are zeroed by the rayon workers instead, in chunks.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    use std::mem::{ManuallyDrop, MaybeUninit};
    if n < PAR_ZERO_MIN || rayon::current_num_threads() < 2 {
        return vec![0f32; n];
    }
    let mut v: Vec<MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` elements need no initialisation; the capacity is `n`.
    unsafe { v.set_len(n) };
    v.par_chunks_mut(PAR_ZERO_MIN / 4)
        .for_each(|c| c.fill(MaybeUninit::new(0.0)));
    let mut v = ManuallyDrop::new(v);
    // SAFETY: every element was written above; `MaybeUninit<f32>` has the layout of `f32`,
    // and the allocation is handed over with its length and capacity unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// `n` copies of `row`, row-major, written by the rayon workers for large buffers (no
/// zeroing first). Empty for an empty `row`.
pub(crate) fn repeat_rows(row: &[f32], n: usize) -> Vec<f32> {
    use std::mem::{ManuallyDrop, MaybeUninit};
    let d = row.len();
    if d == 0 || n == 0 {
        return Vec::new();
    }
    let len = n * d;
    let mut v: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: as in `zeros`.
    unsafe { v.set_len(len) };
    let write = |c: &mut [MaybeUninit<f32>]| {
        for r in c.chunks_exact_mut(d) {
            for (o, &x) in r.iter_mut().zip(row) {
                *o = MaybeUninit::new(x);
            }
        }
    };
    if len < PAR_ZERO_MIN || rayon::current_num_threads() < 2 {
        write(&mut v);
    } else {
        v.par_chunks_mut(d * rows_per_task(d)).for_each(write);
    }
    let mut v = ManuallyDrop::new(v);
    // SAFETY: every element was written (the chunks are whole rows); see `zeros`.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// Rows at least this long are worth a rayon task each; shorter rows are batched.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// `f(out_row, x_row)` for every length-`d` row of `out` and `x` (same length), rows
/// batched into rayon tasks by `rows_per_task` and each task run under `simd`. No-op for
/// `d == 0`.
#[inline(always)]
pub(crate) fn map_rows(
    out: &mut [f32],
    x: &[f32],
    d: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    if d == 0 {
        return;
    }
    let chunk = d * rows_per_task(d);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| {
            simd(
                #[inline(always)]
                || {
                    for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                        f(o, x);
                    }
                },
            )
        });
}

/// `map_rows` over two inputs of the same shape: `f(out_row, x_row, y_row)`.
#[inline(always)]
pub(crate) fn map_rows2(
    out: &mut [f32],
    x: &[f32],
    y: &[f32],
    d: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    if d == 0 {
        return;
    }
    let chunk = d * rows_per_task(d);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(y.par_chunks(chunk)))
        .for_each(|(o, (x, y))| {
            simd(
                #[inline(always)]
                || {
                    for ((o, x), y) in o.chunks_mut(d).zip(x.chunks(d)).zip(y.chunks(d)) {
                        f(o, x, y);
                    }
                },
            )
        });
}

/// `e^x` in f32 without a libm call, so the loops that use it vectorise: Cephes `expf`
/// range reduction (`x = n ln2 + z`, |z| ≤ ln2/2, n by the 1.5·2²³ rounding trick) and its
/// degree-6 polynomial, about 1 ulp over the normal range. Below `ln(f32::MIN_POSITIVE)` it
/// returns 0 (so `-inf` maps to 0), above `ln(f32::MAX)` +inf, and NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.72283;
    const LO: f32 = -87.33654;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a short head (exact products with small n) and a tail.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let xc = x.clamp(LO, HI); // NaN passes through
    let r = xc * LOG2E + ROUND;
    let n = (r.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let fx = r - ROUND;
    let z = xc - fx * C1 - fx * C2;
    let z2 = z * z;
    let p = ((((1.987_569_1e-4 * z + 1.398_199_9e-3) * z + 8.333_452e-3) * z + 4.166_579_6e-2) * z
        + 1.666_666_5e-1)
        * z
        + 0.5;
    let y = p * z2 + z + 1.0;
    let scale = f32::from_bits((n.wrapping_add(127) as u32) << 23);
    let out = y * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        out
    }
}

/// Runs `f` compiled for AVX2 when the CPU has it (checked once, cached by std), else as
/// is. Kernel bodies are `#[inline(always)]` helpers, so wrapping a row loop in `simd`
/// lets LLVM widen it to 8 lanes without building the crate for a newer CPU baseline.
/// The closure itself must be `#[inline(always)]` too (`simd(#[inline(always)] || ..)`):
/// otherwise LLVM may keep it as a separate function compiled for the SSE baseline, and
/// the loop runs 4 lanes wide behind an AVX2 call.
///
/// Where the CPU has AVX-512F the loop is compiled for it instead (16 lanes). The loops are
/// plain element-wise arithmetic and fixed-lane reductions, so both widths give bit-identical
/// results; `LORA_DASH_SIMD=avx2` keeps the 8-lane version.
#[inline(always)]
pub(crate) fn simd<R, F: FnOnce() -> R>(f: F) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn with_avx2<R, F: FnOnce() -> R>(f: F) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn with_avx512<R, F: FnOnce() -> R>(f: F) -> R {
            f()
        }
        match simd_level() {
            // SAFETY: the features each function is compiled for were detected at run time.
            SimdLevel::Avx512 => return unsafe { with_avx512(f) },
            SimdLevel::Avx2 => return unsafe { with_avx2(f) },
            SimdLevel::Baseline => {}
        }
    }
    f()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SimdLevel {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest vector extension the row kernels use, detected once.
#[inline(always)]
fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2_only = std::env::var("LORA_DASH_SIMD").is_ok_and(|v| v == "avx2");
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && !avx2_only
            {
                return SimdLevel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Baseline
    })
}

/// Lanes for the manual reductions below: independent accumulators let the compiler keep
/// them in one vector register (a single running float sum would serialise the loop).
const LANES: usize = 8;
/// Elements summed in f32 lanes before the partial is folded into an f64 total, which
/// bounds the f32 rounding however long the slice is.
const BLOCK: usize = 256;

/// Maximum of a row; `-inf` for an empty row. NaN entries are skipped, like `f32::max`.
#[inline(always)]
pub(crate) fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Sum of at most a few hundred values in f32 lanes.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of a slice: f32 lanes within blocks, f64 across blocks.
#[inline(always)]
pub(crate) fn sum_f32(x: &[f32]) -> f64 {
    x.chunks(BLOCK).map(|b| lane_sum(b) as f64).sum()
}

/// Dot product: f32 lanes within blocks, f64 across blocks.
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f64 {
    let mut buf = [0f32; BLOCK];
    let mut s = 0f64;
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let t = &mut buf[..ca.len().min(cb.len())];
        for ((t, &x), &y) in t.iter_mut().zip(ca).zip(cb) {
            *t = x * y;
        }
        s += lane_sum(t) as f64;
    }
    s
}

/// `out = scale · exp(x - shift)` element-wise.
#[inline(always)]
pub(crate) fn exp_map(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scale * exp_f32(v - shift);
    }
}

/// `Σ exp(x - shift)` without keeping the exponentials.
#[inline(always)]
pub(crate) fn sum_exp(x: &[f32], shift: f32) -> f64 {
    let mut buf = [0f32; BLOCK];
    let mut s = 0f64;
    for c in x.chunks(BLOCK) {
        let b = &mut buf[..c.len()];
        exp_map(c, shift, 1.0, b);
        s += lane_sum(b) as f64;
    }
    s
}

/// `out = exp(x - shift)`; returns the sum of `out`.
#[inline(always)]
pub(crate) fn exp_store_sum(x: &[f32], shift: f32, out: &mut [f32]) -> f64 {
    exp_map(x, shift, 1.0, out);
    sum_f32(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_and_repeat_rows_fill_every_element() {
        for n in [0, 5, PAR_ZERO_MIN - 1, PAR_ZERO_MIN, 3 * PAR_ZERO_MIN + 7] {
            let z = zeros(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&x| x == 0.0), "zeros({n})");
        }
        let row: Vec<f32> = (0..384).map(|i| i as f32 * 0.5 - 3.0).collect();
        for n in [0, 1, 7, 1000] {
            let r = repeat_rows(&row, n);
            assert_eq!(r.len(), n * row.len());
            for (i, chunk) in r.chunks(row.len()).enumerate() {
                assert_eq!(chunk, &row[..], "row {i} of {n}");
            }
        }
        assert!(repeat_rows(&[], 9).is_empty());
    }

    /// candle's strided copy (`contiguous`) of large views runs split over threads in the
    /// vendored crate: every permutation, a narrowed start and unit dims against an
    /// index-by-index gather.
    #[test]
    fn large_strided_copies_match_an_index_gather() -> candle_core::Result<()> {
        let dims = [3usize, 70, 5, 64]; // 67,200 elements: above the parallel threshold
        let n: usize = dims.iter().product();
        let base: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let t = Tensor::from_vec(base.clone(), &dims[..], &Device::Cpu)?;
        let perms: [[usize; 4]; 6] = [
            [0, 2, 1, 3],
            [0, 1, 3, 2],
            [3, 2, 1, 0],
            [1, 0, 2, 3],
            [2, 0, 3, 1],
            [0, 3, 1, 2],
        ];
        for p in perms {
            let v = t.permute(p)?;
            let got = v.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let vd: Vec<usize> = p.iter().map(|&i| dims[i]).collect();
            let src_stride = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
            let vs: Vec<usize> = p.iter().map(|&i| src_stride[i]).collect();
            let mut want = Vec::with_capacity(n);
            for a in 0..vd[0] {
                for b in 0..vd[1] {
                    for c in 0..vd[2] {
                        for d in 0..vd[3] {
                            want.push(base[a * vs[0] + b * vs[1] + c * vs[2] + d * vs[3]]);
                        }
                    }
                }
            }
            assert_eq!(got, want, "permutation {p:?}");
        }
        // A narrowed (offset) transposed view with a unit dim.
        let v = t.narrow(1, 3, 60)?.narrow(0, 1, 1)?.transpose(1, 2)?; // (1, 5, 60, 64)
        let got = v.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut want = Vec::new();
        for c in 0..5 {
            for b in 3..63 {
                for d in 0..64 {
                    want.push(base[dims[1] * dims[2] * dims[3] + b * 5 * 64 + c * 64 + d]);
                }
            }
        }
        assert_eq!(got, want, "narrowed transpose");
        Ok(())
    }

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = exp_f32(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        println!("exp_f32 max relative error on [-87, 88] = {worst:e}");
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_naive_sums() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = (0..1003)
            .map(|i| ((i * 13 % 97) as f32 - 48.0) / 9.0)
            .collect();
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row_max(&x), m);
        let naive: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let fast = sum_exp(&x, m);
        println!("sum_exp rel err {:e}", ((fast - naive) / naive).abs());
        assert!(((fast - naive) / naive).abs() < 1e-6);
        let mut out = vec![0f32; x.len()];
        assert!((exp_store_sum(&x, m, &mut out) - fast).abs() < 1e-9 * fast);
        let long = vec![0.1f32; 3_000_000];
        println!("sum of 3e6 × 0.1 = {}", sum_f32(&long));
        assert!((sum_f32(&long) - 300_000.0).abs() < 1.0);
        let naive_dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        println!(
            "dot rel err {:e}",
            ((dot_f32(&x, &y) - naive_dot) / naive_dot).abs()
        );
        assert!(((dot_f32(&x, &y) - naive_dot) / naive_dot).abs() < 1e-5);
        assert!((sum_f32(&x) - x.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-3);
    }

    /// The few-row path against an f64 triple loop: every row count up to the limit, odd
    /// and lane-aligned k, odd n (column pairs and a single column), a row stride wider than
    /// k, alpha and accumulation; then the same product split over threads and not, which
    /// must agree bit for bit.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn skinny_products_match_a_naive_product() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipped: the few-row kernel needs AVX2 and FMA");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(k, n) in &[
            (1usize, 1usize),
            (7, 3),
            (8, 2),
            (37, 65),
            (576, 193),
            (1536, 40),
        ] {
            for m in 1..=SKINNY_MAX_ROWS {
                let a_rs = k + 3;
                let a: Vec<f32> = (0..m * a_rs).map(|_| rnd()).collect();
                // b (k, n) stored as its transpose: column j contiguous at j * (k + 1).
                let b_cs = k + 1;
                let b: Vec<f32> = (0..n * b_cs).map(|_| rnd()).collect();
                let av = MatView {
                    data: &a,
                    rows: m,
                    cols: k,
                    rs: a_rs,
                    cs: 1,
                };
                let bv = MatView {
                    data: &b,
                    rows: k,
                    cols: n,
                    rs: 1,
                    cs: b_cs,
                };
                let start: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                for (accumulate, wide) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    if wide && !std::is_x86_feature_detected!("avx512f") {
                        continue;
                    }
                    let mut got = start.clone();
                    skinny_matmul_with(&mut got, av, bv, 0.75, accumulate, true, wide);
                    let mut seq = start.clone();
                    skinny_matmul_with(&mut seq, av, bv, 0.75, accumulate, false, wide);
                    assert_eq!(
                        got, seq,
                        "m={m} k={k} n={n} wide={wide}: threads change the result"
                    );
                    for r in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|q| a[r * a_rs + q] as f64 * b[j * b_cs + q] as f64)
                                .sum();
                            let want = 0.75 * dot
                                + if accumulate {
                                    start[r * n + j] as f64
                                } else {
                                    0.0
                                };
                            let tol = 1e-5 * (1.0 + k as f64).sqrt();
                            let g = got[r * n + j] as f64;
                            assert!(
                                (g - want).abs() <= tol,
                                "m={m} k={k} n={n} wide={wide} ({r},{j}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
