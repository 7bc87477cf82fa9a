//! The seeded dropout mask of `lora_linear`: a counter-based hash of `(seed, row, col)`, so
//! the forward never stores the mask and the backward regenerates exactly the same one.

use rayon::prelude::*;

/// The dropout mask as a counter-based hash: element (row, col) is kept when the top 24
/// bits of `fmix32((col ^ k0) + k1)` are at least `p · 2²⁴`, where `(k0, k1)` are the two
/// halves of SplitMix64 output number `row` of `seed` (MurmurHash3's finaliser has full
/// avalanche, so one round per element suffices; the backward draws every element twice
/// more, so its cost matters). Any element can be drawn in any order, so rows are generated
/// in parallel and again in the backward.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskSpec {
    seed: u64,
    /// Kept iff the 24-bit draw is `>= threshold`; 0 means no dropout.
    threshold: u32,
    /// `1 / (1 - p)`.
    keep_scale: f32,
}

impl MaskSpec {
    pub(crate) fn new(p: f32, seed: u64) -> Self {
        // draw · 2⁻²⁴ ≥ p  ⟺  draw ≥ ⌈p · 2²⁴⌉ (both sides exact in f64).
        let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
        MaskSpec {
            seed,
            threshold,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    pub(crate) fn active(&self) -> bool {
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
        let h = fmix32((col as u32 ^ k.0).wrapping_add(k.1));
        if h >> 8 >= self.threshold {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// `out[j] = src[j · stride] · mask(row, j)`.
    pub(crate) fn drop_row(&self, row: usize, src: &[f32], stride: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature the function is compiled for was detected at run time.
            return unsafe { self.drop_row_avx2(row, src, stride, out) };
        }
        self.drop_row_any(row, src, stride, out)
    }

    /// `acc[j] += add[j] · mask(row, j)`.
    pub(super) fn add_masked_row(&self, row: usize, add: &[f32], acc: &mut [f32]) {
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
    let mut out = crate::ops::cpu::zeros(rows * cols);
    if cols > 0 {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, o)| spec.drop_row(i, &ones, 1, o));
    }
    out
}
