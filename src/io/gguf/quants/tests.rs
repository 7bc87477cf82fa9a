//! Dequantisation of blocks built by hand; expected values worked out from the block
//! layouts by hand.

use super::*;

fn h(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

fn check(ty: GgmlType, block: &[u8], n: usize, expect: &[(usize, f32)]) -> Vec<f32> {
    let y = dequantize(ty, block, n).unwrap();
    let max_diff = expect
        .iter()
        .map(|&(i, v)| (y[i] - v).abs())
        .fold(0f32, f32::max);
    println!(
        "{}: max diff {max_diff:e} over {} hand-computed values",
        ty.name(),
        expect.len()
    );
    for &(i, v) in expect {
        assert_eq!(y[i], v, "{} element {i}", ty.name());
    }
    y
}

#[test]
fn float_types() {
    let mut b = Vec::new();
    b.extend(1.5f32.to_le_bytes());
    b.extend((-0.25f32).to_le_bytes());
    check(GgmlType::F32, &b, 2, &[(0, 1.5), (1, -0.25)]);
    check(
        GgmlType::F16,
        &[0x00, 0x3C, 0x00, 0xC0],
        2,
        &[(0, 1.0), (1, -2.0)],
    );
    check(
        GgmlType::BF16,
        &[0x80, 0x3F, 0x40, 0xC0],
        2,
        &[(0, 1.0), (1, -3.0)],
    );
}

#[test]
fn q4_0_block() {
    // d = 0.5; qs[j] = j | (15 - j) << 4: element j = (j - 8) / 2, element 16 + j = (7 - j) / 2.
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = check(
        GgmlType::Q4_0,
        &b,
        32,
        &[(0, -4.0), (8, 0.0), (15, 3.5), (16, 3.5), (31, -4.0)],
    );
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[16 + j], (7.0 - j as f32) * 0.5);
    }
}

#[test]
fn q4_1_block() {
    // d = 0.25, m = -1: element = nibble / 4 - 1.
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    check(
        GgmlType::Q4_1,
        &b,
        32,
        &[(0, -1.0), (1, -0.75), (15, 2.75), (16, 2.75), (31, -1.0)],
    );
}

#[test]
fn q5_0_block() {
    // d = 1, qh bits 0 and 31 set, qs[15] = 0xF0: element 0 = 16 - 16 = 0, element 1 = -16,
    // element 31 = (15 | 16) - 16 = 15, element 16 = -16.
    let mut b = h(1.0).to_vec();
    b.extend(0x8000_0001u32.to_le_bytes());
    let mut qs = [0u8; 16];
    qs[15] = 0xF0;
    b.extend(qs);
    check(
        GgmlType::Q5_0,
        &b,
        32,
        &[(0, 0.0), (1, -16.0), (16, -16.0), (31, 15.0)],
    );
}

#[test]
fn q5_1_block() {
    // d = 0.5, m = 1, qh bit 20 (element 20 = high nibble of qs[4]), qs[4] = 0x32:
    // element 4 = 2 * 0.5 + 1 = 2, element 20 = (3 | 16) * 0.5 + 1 = 10.5, others 1.
    let mut b = h(0.5).to_vec();
    b.extend(h(1.0));
    b.extend((1u32 << 20).to_le_bytes());
    let mut qs = [0u8; 16];
    qs[4] = 0x32;
    b.extend(qs);
    check(
        GgmlType::Q5_1,
        &b,
        32,
        &[(0, 1.0), (4, 2.0), (20, 10.5), (21, 1.0)],
    );
}

#[test]
fn q8_0_and_q8_k_blocks() {
    // d = 0.125, qs[j] = j - 16, qs[0] = -128.
    let mut b = h(0.125).to_vec();
    b.extend((0..32i32).map(|j| {
        if j == 0 {
            -128i8 as u8
        } else {
            (j - 16) as i8 as u8
        }
    }));
    check(
        GgmlType::Q8_0,
        &b,
        32,
        &[(0, -16.0), (1, -1.875), (16, 0.0), (31, 1.875)],
    );
    // Q8_K: f32 d = 0.5, qs[j] = j as i8, then 16 unused i16 sums.
    let mut b = 0.5f32.to_le_bytes().to_vec();
    b.extend((0..256u32).map(|j| j as u8));
    b.extend([0u8; 32]);
    check(
        GgmlType::Q8K,
        &b,
        256,
        &[
            (0, 0.0),
            (3, 1.5),
            (127, 63.5),
            (128, -64.0),
            (200, -28.0),
            (255, -0.5),
        ],
    );
}

/// Shared scales for Q4_K / Q5_K: sub-block 0: sc 1, min 2; sub-block 1: sc 3, min 4;
/// sub-block 4: sc 3 | 16 = 19 (high bits from byte 0), min 1; sub-block 5: sc 5,
/// min 2 | 16 = 18 (high bits from byte 5); the rest 0.
fn k_scales() -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0] = 1 | (1 << 6);
    s[1] = 3;
    s[4] = 2;
    s[5] = 4 | (1 << 6);
    s[8] = 0x13;
    s[9] = 0x25;
    s
}

#[test]
fn q4_k_block() {
    // d = 1, dmin = 0.5; qs[0] = 0x7A (elements 0 / 32), qs[64] = 0x2F (elements 128 / 160).
    let mut b = h(1.0).to_vec();
    b.extend(h(0.5));
    b.extend(k_scales());
    let mut qs = [0u8; 128];
    qs[0] = 0x7A;
    qs[64] = 0x2F;
    b.extend(qs);
    check(
        GgmlType::Q4K,
        &b,
        256,
        &[
            (0, 9.0),
            (1, -1.0),
            (32, 19.0),
            (33, -2.0),
            (64, 0.0),
            (128, 284.5),
            (160, 1.0),
            (161, -9.0),
        ],
    );
}

#[test]
fn q5_k_block() {
    // As Q4_K plus qh[0] = 0b1_0001: +16 for element 0 (bit 0) and element 128 (bit 4).
    let mut b = h(1.0).to_vec();
    b.extend(h(0.5));
    b.extend(k_scales());
    let mut qh = [0u8; 32];
    qh[0] = 0b1_0001;
    b.extend(qh);
    let mut qs = [0u8; 128];
    qs[0] = 0x7A;
    qs[64] = 0x2F;
    b.extend(qs);
    check(
        GgmlType::Q5K,
        &b,
        256,
        &[(0, 25.0), (1, -1.0), (32, 19.0), (128, 588.5), (160, 1.0)],
    );
}

#[test]
fn q6_k_block() {
    // d = 0.5; scales[0] 2, [1] 7, [2] -3, [4] 1, [6] 4, [8] 5.
    // ql[0] = 0x3A, ql[32] = 0x51, qh[0] = 0xE4 (2-bit fields 0, 1, 2, 3), ql[64] = 0x0F, qh[32] = 3.
    // element 0: (10 | 0) - 32 = -22 -> 0.5 * 2 * -22 = -22; element 32: (1 | 16) - 32 = -15
    // -> 0.5 * -3 * -15 = 22.5; element 64: (3 | 32) - 32 = 3 -> 1.5; element 96:
    // (5 | 48) - 32 = 21 -> 42; element 16: -32 * 0.5 * 7 = -112; element 128: (15 | 48) - 32
    // = 31 -> 0.5 * 5 * 31 = 77.5.
    let mut ql = [0u8; 128];
    ql[0] = 0x3A;
    ql[32] = 0x51;
    ql[64] = 0x0F;
    let mut qh = [0u8; 64];
    qh[0] = 0xE4;
    qh[32] = 3;
    let mut sc = [0u8; 16];
    sc[0] = 2;
    sc[1] = 7;
    sc[2] = -3i8 as u8;
    sc[4] = 1;
    sc[6] = 4;
    sc[8] = 5;
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(sc);
    b.extend(h(0.5));
    check(
        GgmlType::Q6K,
        &b,
        256,
        &[
            (0, -22.0),
            (1, -32.0),
            (16, -112.0),
            (32, 22.5),
            (64, 1.5),
            (96, 42.0),
            (128, 77.5),
        ],
    );
}

#[test]
fn bad_input_is_an_error() {
    let e = dequantize(GgmlType::Q2K, &[0u8; 84], 256).unwrap_err();
    assert!(e.contains("Q2_K"), "{e}");
    let e = dequantize(GgmlType::Other(23), &[], 0).unwrap_err();
    assert!(e.contains("ggml type 23"), "{e}");
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], 31).is_err());
}
