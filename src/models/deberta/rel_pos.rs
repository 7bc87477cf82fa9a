//! Relative positions of DeBERTa's disentangled attention, as transformers 4.46.3's
//! `make_log_bucket_position` and `build_relative_position` compute them
//! (`modeling_deberta_v2.py`), in the same f32 arithmetic, and the two gather tables of
//! `DisentangledSelfAttention.disentangled_attention_bias`.

use crate::models::deberta::config::RelGeometry;

/// `make_log_bucket_position` of one relative position: the identity for
/// `|r| <= bucket_size / 2`, logarithmic buckets beyond, up to `max_position`.
pub fn log_bucket(r: i64, bucket_size: i64, max_position: i64) -> i64 {
    let mid = bucket_size / 2;
    let abs = if r < mid && r > -mid {
        mid - 1
    } else {
        r.abs()
    };
    if abs <= mid {
        return r;
    }
    // torch: ceil(log(abs / mid) / log(tensor((max_position - 1) / mid)) * (mid - 1)) + mid,
    // every operand f32 (the Python float ratio is rounded to f32 by `torch.tensor`).
    let ratio = ((max_position - 1) as f64 / mid as f64) as f32;
    let x = (abs as f32 / mid as f32).ln() / ratio.ln() * (mid - 1) as f32;
    let log_pos = x.ceil() + mid as f32;
    (log_pos * r.signum() as f32) as i64
}

/// `build_relative_position(q, k, bucket_size, max_position)`: (q, k) row-major, entry
/// `[i][j]` the (bucketed) `i - j`.
pub fn relative_positions(q: usize, k: usize, bucket_size: i64, max_position: i64) -> Vec<i64> {
    let mut v = Vec::with_capacity(q * k);
    for i in 0..q as i64 {
        for j in 0..k as i64 {
            let r = i - j;
            v.push(if bucket_size > 0 && max_position > 0 {
                log_bucket(r, bucket_size, max_position)
            } else {
                r
            });
        }
    }
    v
}

/// The (t, t) gather tables `(c2p, p2c)` into the 2·span rows of projected relative
/// embeddings: `c2p[i][j] = clamp(rel[i][j] + span)` and
/// `p2c[i][j] = clamp(span - rel[j][i])`, the index transformers gathers the key rows with
/// before transposing the p2c scores, read transposed so both tables address score `[i][j]`.
pub fn tables(t: usize, g: &RelGeometry) -> (Vec<u32>, Vec<u32>) {
    let rel = relative_positions(t, t, g.buckets, g.max_relative);
    let span = g.span as i64;
    let clamp = |x: i64| x.clamp(0, 2 * span - 1) as u32;
    let mut c2p = Vec::with_capacity(t * t);
    let mut p2c = Vec::with_capacity(t * t);
    for i in 0..t {
        for j in 0..t {
            c2p.push(clamp(rel[i * t + j] + span));
            p2c.push(clamp(span - rel[j * t + i]));
        }
    }
    (c2p, p2c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_identity_near_zero_and_logarithmic_beyond() {
        for r in -4..=4 {
            assert_eq!(log_bucket(r, 8, 64), r);
        }
        // The largest distance below max_position lands on the last bucket, mid + mid - 1.
        assert_eq!(log_bucket(63, 8, 64), 7);
        assert_eq!(log_bucket(-63, 8, 64), -7);
        let v: Vec<i64> = (0..80).map(|r| log_bucket(r, 8, 64)).collect();
        assert!(v.windows(2).all(|w| w[1] >= w[0]), "{v:?}");
    }

    #[test]
    fn p2c_table_reads_the_transposed_relative_position() {
        let g = RelGeometry {
            buckets: -1,
            max_relative: 3,
            span: 3,
        };
        let (c2p, p2c) = tables(5, &g);
        // Unbucketed: rel[i][j] = i - j, so both tables hold clamp(i - j + 3) in [0, 5].
        for i in 0..5 {
            for j in 0..5 {
                let want = (i as i64 - j as i64 + 3).clamp(0, 5) as u32;
                assert_eq!(c2p[i * 5 + j], want);
                assert_eq!(p2c[i * 5 + j], want);
            }
        }
    }
}
