//! Differentiable building blocks. candle's fused norm / rope / softmax kernels carry no
//! backward, so everything the model differentiates through lives here.
//!
//! The functions below are the API the model uses. Each is a candle custom op with a CPU
//! f32 kernel and an explicit backward (one file per op family); other devices or dtypes
//! fall back to the naive composed reference (`reference::*`) built from candle primitives
//! that do have gradients. Tests compare the fast versions against those references and
//! against finite differences (`gradcheck`).
//!
//! candle 0.11 primitives checked to carry gradients (see `gradcheck` tests): `silu`, `exp`,
//! `index_select` (embeddings), `gather`, `narrow`, `cat`, `transpose`, `broadcast_*`,
//! `matmul`; `erf` (under `reference::gelu_erf`) is checked by the `gelu` tests.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

mod attention;
mod cpu;
pub use cpu::gemm_profile;
pub mod disentangled;
pub mod dora_linear;
mod elementwise;
mod encoder_attention;
mod gelu;
pub mod gradcheck;
mod layer_norm;
mod linear;
mod linear_ce;
mod lora_linear;
mod loss;
mod norm;
mod rope;
mod softmax;

pub use attention::causal_attention;
pub use disentangled::{disentangled_attention, RelIndex};
pub use dora_linear::dora_linear;
pub use elementwise::{dropout, silu_mul};
pub use lora_linear::dropout_mask as lora_dropout_mask;
pub use lora_linear::DashTerm;

/// Which implementation the ops run where both exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The fused CPU kernels for f32 host tensors, the composed reference elsewhere.
    Fused,
    /// The composed, device-generic reference everywhere (the path every device without a
    /// fused kernel takes), for checking that path on the CPU.
    Reference,
}

/// The environment variable that selects [`Kernels`]: `fused` (the default) or `reference`.
pub const KERNELS_ENV: &str = "LORA_DASH_KERNELS";

/// The kernels `LORA_DASH_KERNELS` asks for; an unknown value is an error naming it.
pub fn kernels() -> Result<Kernels> {
    match std::env::var(KERNELS_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(Kernels::Fused),
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("fused") => Ok(Kernels::Fused),
        Ok(v) if v.eq_ignore_ascii_case("reference") => Ok(Kernels::Reference),
        Ok(v) => Err(crate::error::Error::config(
            KERNELS_ENV,
            format!("`{v}`: expected `fused` or `reference`"),
        )),
        Err(e) => Err(crate::error::Error::config(KERNELS_ENV, e.to_string())),
    }
}

/// Whether the composed reference is forced for every op (read once per process; a bad
/// value counts as the default here, and the binary refuses it at start-up through
/// [`kernels`]).
pub fn reference_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| matches!(kernels(), Ok(Kernels::Reference)))
}

/// Label value that is excluded from the loss (Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// `x · wᵀ` for a frozen weight `w` (out, in); `x` is (.., in). The backward returns the
/// gradient of `x` only: no weight-gradient GEMM, no weight-sized buffer.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear::frozen_linear(x, w)
}

/// [`frozen_linear`] plus a frozen bias `(out)` that starts the output (one pass, no
/// gradient for the bias).
pub fn frozen_linear_bias(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear::frozen_linear_bias(x, w, bias)
}

/// `x (n, in) · wᵀ + scale · (drop(x) · aᵀ) · bᵀ`: a frozen linear layer plus its LoRA
/// term in one op, `w (out, in)` frozen, `a (r, in)`, `b (out, r)`. `drop` is inverted
/// dropout with probability `dropout_p` whose mask is a function of `seed`
/// ([`lora_dropout_mask`]), regenerated in backward instead of stored.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
) -> Result<Tensor> {
    lora_linear::lora_linear(x, w, a, b, scale, dropout_p, seed)
}

/// [`lora_linear`] plus LoRA-Dash's dash term `x · v_s · diag(c) · u_sᵀ` (on the undropped
/// `x`, unscaled) when `dash` is given, in the same op: the term adds no (n, out) buffer.
/// `c (s)` gets a gradient when tracked; `u_s (out, s)` and `v_s (in, s)` are frozen.
/// `dash` with s = 0 is the same as `None`.
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
    lora_linear::lora_dash_linear(x, w, a, b, scale, dropout_p, seed, dash)
}

/// [`lora_dash_linear`] plus a frozen bias `(out)` that starts the output.
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
    lora_linear::lora_dash_linear_bias(x, w, bias, a, b, scale, dropout_p, seed, dash)
}

/// Mean cross-entropy of the logits `h (n, e) · wᵀ` (`w (v, e)` frozen) against `labels`
/// (n,), without keeping the (n, v) logits: rows go through in chunks, and when `h` is
/// tracked the forward also forms `d loss / d h` (n, e) from each chunk while it is at
/// hand. Same semantics as `cross_entropy(frozen_linear(h, w), labels)`.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
    linear_ce::linear_cross_entropy(h, w, labels)
}

/// Root-mean-square norm over the last dim, times `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    norm::rms_norm(x, w, eps)
}

/// LayerNorm over the last dim as `torch.nn.LayerNorm`: `(x - mean) / sqrt(var + eps) · w + b`
/// with the biased variance; `x` is (.., e), `w` and `b` are (e). Gradients for all three.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm::layer_norm(x, w, b, eps)
}

/// Exact GELU `0.5 · x · (1 + erf(x / √2))`, Hugging Face's `"gelu"` activation.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    gelu::gelu_erf(x)
}

/// Bidirectional attention `softmax(scale · q kᵀ + bias) v` with `q (b, h, t, d)`,
/// `k`, `v (b, h, s, d)`; returns (b, h, t, d). `key_mask (b, s)` is 1 for real keys and 0
/// for padding (masked keys get probability 0; a row with no real key outputs zeros).
/// `bias` is additive, (b, h, t, s), (1, h, t, s), (b, 1, t, s) or (1, 1, t, s), and gets
/// a gradient (summed over its broadcast dims) when it is tracked.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    encoder_attention::attention(q, k, v, key_mask, bias, scale)
}

/// Rotate-half RoPE (Hugging Face layout). `x` is (b, h, t, d); `cos`/`sin` are (t, d/2)
/// or (b, t, d/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope::rope(x, cos, sin)
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax::softmax_last_dim(x)
}

/// Mean cross-entropy over positions whose label is not [`IGNORE_INDEX`].
/// `logits` (n, v) f32, `labels` (n,) i64. Returns a scalar; 0 when every label is ignored.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    loss::cross_entropy(logits, labels)
}

/// Composed reference implementations: slow, obviously right, differentiable through
/// candle's own autograd.
pub mod reference {
    use super::*;

    /// A weight stored in another dtype (`--dtype`) is widened to `x`'s for the product.
    pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)?)
    }

    /// `x ⊙ mask` with the seeded mask of [`lora_dropout_mask`]; `x` is (n, in).
    pub fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        if p == 0.0 {
            return Ok(x.clone());
        }
        let (n, k) = x.dims2()?;
        let mask = Tensor::from_vec(lora_dropout_mask(n, k, p, seed), (n, k), x.device())?; // (n, in)
        Ok(x.mul(&mask.to_dtype(x.dtype())?)?)
    }

    pub fn lora_linear(
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout_p: f32,
        seed: u64,
    ) -> Result<Tensor> {
        let base = frozen_linear(x, &w.detach())?; // (n, out)
        let xa = seeded_dropout(x, dropout_p, seed)?.matmul(&a.t()?)?; // (n, r)
        Ok((base + (xa.matmul(&b.t()?)? * scale)?)?)
    }

    /// `lora_linear` plus `(x · v_s) · diag(c) · u_sᵀ` with `u_s`, `v_s` frozen.
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
        let y = lora_linear(x, w, a, b, scale, dropout_p, seed)?; // (n, out)
        let Some(d) = dash.filter(|d| d.s() > 0) else {
            return Ok(y);
        };
        let xv = x.matmul(&d.v_s.detach())?; // (n, s)
        let dash = xv.broadcast_mul(d.c)?.matmul(&d.u_s.detach().t()?)?; // (n, out)
        Ok((y + dash)?)
    }

    pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
        cross_entropy(&frozen_linear(h, &w.detach())?, labels)
    }

    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(w)?)
    }

    /// Centered two-pass statistics, as `torch.nn.LayerNorm`.
    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
    }

    /// Built on candle's `erf`, whose backward is `2/√π e^{-x²}`.
    pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
        Ok(((x * 0.5)? * cdf)?)
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (_b, _h, _t, d) = x.dims4()?;
        let half = d / 2;
        // (t, d/2) -> (1, 1, t, d) ; (b, t, d/2) -> (b, 1, t, d)
        let expand = |c: &Tensor| -> Result<Tensor> {
            let c = Tensor::cat(&[c, c], D::Minus1)?;
            Ok(match c.rank() {
                2 => c.unsqueeze(0)?.unsqueeze(0)?,
                _ => c.unsqueeze(1)?,
            })
        };
        let cos = expand(cos)?;
        let sin = expand(sin)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }

    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        Ok(e.broadcast_div(&s)?)
    }

    pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (n, _v) = logits.dims2()?;
        let labels_host: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
        let valid: Vec<f32> = labels_host
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = valid.iter().sum();
        let idx: Vec<u32> = labels_host
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 })
            .collect();
        let dev = logits.device();
        let idx = Tensor::from_vec(idx, (n, 1), dev)?;
        let valid = Tensor::from_vec(valid, n, dev)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let logp = shifted.broadcast_sub(&lse)?;
        let picked = logp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?;
        let total = (picked * valid)?.sum_all()?.neg()?;
        Ok((total / (count.max(1.0) as f64))?)
    }

    /// Materialises the (b, h, t, s) scores, and nothing larger: the query heads that share a
    /// key/value head are stacked along the rows (q (b, h, t, d) as (b, kvh, rep·t, d), a
    /// free reshape), so K and V are never repeated per query head. Masked logits get a
    /// -1e9 bias; multiplying the probabilities by the 0/1 mask afterwards zeroes rows that
    /// see no key at all.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: Option<&Tensor>,
        q_offset: usize,
    ) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let (_, kvh, s, _) = k.dims4()?;
        let rep = h / kvh;
        // Query head kv·rep + r reads key/value head kv (Hugging Face's repeat_kv).
        let q = q.contiguous()?.reshape((b, kvh, rep * t, d))?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (b, kvh, rep·t, s)
        let scores = scores.reshape((b, kvh, rep, t, s))?;
        // Position i may see key j <= q_offset + i, built on the device: (t, s).
        let dev = q.device();
        let rows = Tensor::arange(q_offset as u32, (q_offset + t) as u32, dev)?.reshape((t, 1))?;
        let cols = Tensor::arange(0u32, s as u32, dev)?.reshape((1, s))?;
        let mut allowed = cols
            .broadcast_le(&rows)?
            .to_dtype(scores.dtype())?
            .reshape((1, 1, 1, t, s))?;
        if let Some(m) = key_mask {
            // (b, s) -> (b, 1, 1, 1, s)
            let m = m.to_dtype(scores.dtype())?.reshape((b, 1, 1, 1, s))?;
            allowed = allowed.broadcast_mul(&m)?;
        }
        let bias = ((&allowed - 1.0)? * 1e9)?;
        let p = softmax_last_dim(&scores.broadcast_add(&bias)?)?.broadcast_mul(&allowed)?;
        let p = p.reshape((b, kvh, rep * t, s))?;
        Ok(p.matmul(&v)?.reshape((b, h, t, d))?) // (b, kvh, rep·t, d) -> (b, h, t, d)
    }

    /// Materialises the (b, h, t, s) scores. Padding keys get a -1e9 bias; multiplying the
    /// probabilities by the 0/1 mask afterwards zeroes rows that see no key at all.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: Option<&Tensor>,
        bias: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, _h, _t, _d) = q.dims4()?;
        let s = k.dim(2)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let mut scores = (q.matmul(&k.t()?)? * scale)?; // (b, h, t, s)
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let p = match key_mask {
            None => softmax_last_dim(&scores)?,
            Some(m) => {
                let keep = m.to_dtype(q.dtype())?.reshape((b, 1, 1, s))?; // (b, s) -> (b, 1, 1, s)
                let neg = ((&keep - 1.0)? * 1e9)?;
                softmax_last_dim(&scores.broadcast_add(&neg)?)?.broadcast_mul(&keep)?
            }
        };
        Ok(p.matmul(&v)?)
    }
}
