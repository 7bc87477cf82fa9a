//! GGML tensor types and their dequantisation to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` / `ggml-quants.c` (`dequantize_row_*`) and
//! gguf-py's `quants.py`. All multi-byte fields are little-endian; `d`/`m` scales are f16
//! except in Q8_K, whose scale is f32. Within the 32-element blocks of Q4_x/Q5_x the low
//! nibbles hold elements 0..16 and the high nibbles elements 16..32.

use rayon::prelude::*;

/// A GGML tensor type, by its id in the GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other id (the i-quants, ternary types, ...): readable layout unknown here.
    Other(u32),
}

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            x => Other(x),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Other(x) => x,
        }
    }

    /// (elements per block, bytes per block), or None for an unknown type.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 2 + 2 + 32),
            // scales[16], qs[64], d, dmin
            Q2K => (QK_K, 16 + 64 + 4),
            // hmask[32], qs[64], scales[12], d
            Q3K => (QK_K, 32 + 64 + 12 + 2),
            // d, dmin, scales[12], qs[128]
            Q4K => (QK_K, 4 + 12 + 128),
            // d, dmin, scales[12], qh[32], qs[128]
            Q5K => (QK_K, 4 + 12 + 32 + 128),
            // ql[128], qh[64], scales[16], d
            Q6K => (QK_K, 128 + 64 + 16 + 2),
            // d (f32), qs[256], bsums[16] (i16)
            Q8K => (QK_K, 4 + 256 + 32),
            Other(_) => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::Other(x) => format!("ggml type {x}"),
            t => format!("{t:?}").replace('K', "_K"),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantises `n` elements of type `ty` from `data` (exactly the tensor's bytes).
/// Errors are plain messages; the caller names the tensor.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let (blk, size) = ty
        .block_layout()
        .ok_or_else(|| format!("unsupported tensor type {}", ty.name()))?;
    if !n.is_multiple_of(blk) {
        return Err(format!(
            "{n} elements is not a multiple of the {} block size {blk}",
            ty.name()
        ));
    }
    let need = n / blk * size;
    if data.len() != need {
        return Err(format!(
            "{} data is {} bytes, expected {need} for {n} elements",
            ty.name(),
            data.len()
        ));
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::F64 => |b, y| y[0] = f64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])) as f32,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q8_1 => q8_1,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        GgmlType::Q8K => q8_k,
        t => return Err(format!("tensor type {} cannot be dequantised (supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q4_K, Q5_K, Q6_K, Q8_K)", t.name())),
    };
    let mut out = vec![0f32; n];
    // Blocks are independent; large embeddings dequantise in parallel.
    out.par_chunks_mut(blk * 1024)
        .zip(data.par_chunks(size * 1024))
        .for_each(|(y, b)| {
            for (yb, bb) in y.chunks_mut(blk).zip(b.chunks(size)) {
                block_fn(bb, yb);
            }
        });
    Ok(out)
}

/// Q4_0: d (f16), qs[16]; x = (nibble - 8) * d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: d (f16), m (f16), qs[16]; x = nibble * d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Fifth bits of Q5_x: bit j of the u32 `qh` for element j (j < 32).
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        v[j] = (qs[j] & 0x0F) | h0;
        v[j + 16] = (qs[j] >> 4) | h1;
    }
    v
}

/// Q5_0: d (f16), qh (u32), qs[16]; x = (5-bit value - 16) * d.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let v = q5_values(qh, &b[6..22]);
    for j in 0..32 {
        y[j] = (v[j] as i32 - 16) as f32 * d;
    }
}

/// Q5_1: d (f16), m (f16), qh (u32), qs[16]; x = 5-bit value * d + m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let v = q5_values(qh, &b[8..24]);
    for j in 0..32 {
        y[j] = v[j] as f32 * d + m;
    }
}

/// Q8_0: d (f16), qs[32] (i8); x = q * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// Q8_1: d (f16), s (f16, sum used only by dot products), qs[32] (i8); x = q * d.
fn q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[4 + j] as i8 as f32 * d;
    }
}

/// Q8_K: d (f32), qs[256] (i8), bsums; x = q * d.
fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = b[4 + j] as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the packed 12 bytes of Q4_K/Q5_K
/// (ggml's `get_scale_min_k4`): sub-blocks 0..4 sit in the low 6 bits of bytes 0..8,
/// sub-blocks 4..8 combine a nibble of bytes 8..12 with the top 2 bits of bytes 0..8.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 8 sub-blocks of 32; x = d * scale * q - dmin * min. Each 32 bytes of qs hold two
/// sub-blocks: low nibbles the first, high nibbles the second.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, q) in qs.chunks(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K plus a fifth bit per element from qh[32]: bit 2c of qh[l] for the low-nibble
/// sub-block of chunk c, bit 2c+1 for the high-nibble one.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (c, q) in qs.chunks(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: two halves of 128; in each, element l (0..32) of the four 32-runs takes its low 4 bits
/// from ql[l] / ql[l+32] (low then high nibbles) and its top 2 bits from qh[l] bits 0-1, 2-3,
/// 4-5, 6-7; x = d * scale[16-run] * (q - 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests;
