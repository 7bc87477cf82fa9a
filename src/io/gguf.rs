//! GGUF (llama.cpp's model file, versions 2 and 3) read into Hugging Face form.
//!
//! Layout (ggml `docs/gguf.md`): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/values, the tensor infos (name, dims with `ne[0]` innermost, ggml
//! type, offset), then the tensor data starting at the next multiple of `general.alignment`
//! (default 32). Everything is little-endian.
//!
//! Loading maps llama.cpp tensor names to Hugging Face names, reverses the dims into row-major
//! `(out, in)` shapes, dequantises to f32 and undoes the Q/K row permutation that
//! `convert_hf_to_gguf.py` applies for rotary embeddings.

#[cfg(test)]
mod checks_tests;
mod header;
mod llama_config;
mod quants;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use llama_config::hf_config;
pub use quants::{dequantize, GgmlType};

use crate::error::{Error, IoContext, Result};
use crate::io::{LoadedModel, SourceKind, Weights};
use crate::models::config::HfConfig;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        use GgufValue::*;
        match *self {
            U8(x) => Some(x as u64),
            U16(x) => Some(x as u64),
            U32(x) => Some(x as u64),
            U64(x) => Some(x),
            I8(x) => u64::try_from(x).ok(),
            I16(x) => u64::try_from(x).ok(),
            I32(x) => u64::try_from(x).ok(),
            I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        use GgufValue::*;
        match *self {
            I8(x) => Some(x as i64),
            I16(x) => Some(x as i64),
            I32(x) => Some(x as i64),
            I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// Any numeric value as f64. An f32 is widened through its shortest decimal form, so a
    /// stored `1e-5` reads as 1e-5 rather than 9.99999974e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => x.to_string().parse().ok(),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Metadata keys to values, e.g. `llama.block_count`.
pub type Metadata = BTreeMap<String, GgufValue>;

/// One tensor's entry in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape (the reverse of the GGUF dims), e.g. `(out, in)` for a linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements, or None when the product of the dims overflows.
    pub fn checked_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// Number of elements (saturating; see [`TensorInfo::checked_elements`]).
    pub fn n_elements(&self) -> u64 {
        self.checked_elements().unwrap_or(u64::MAX)
    }

    /// Bytes of data, or None when the type is unknown, the dims do not fit its blocks or
    /// the size overflows.
    pub fn n_bytes(&self) -> Option<u64> {
        let (blk, size) = self.ggml_type.block_layout()?;
        let n = self.checked_elements()?;
        if !n.is_multiple_of(blk as u64) {
            return None;
        }
        (n / blk as u64).checked_mul(size as u64)
    }
}

/// An opened GGUF file: parsed header and the memory-mapped data.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).at(path)?;
        // SAFETY: read-only mapping of a file we do not modify while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        let (version, metadata, tensors, data_start) = header::parse(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let n = info.n_bytes().ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor `{}`: type {} with dims {:?} is not supported",
                    info.name,
                    info.ggml_type.name(),
                    info.dims
                ),
            )
        })?;
        let start = (self.data_start as u64).checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.mmap.len() as u64 => {
                Ok(&self.mmap[s as usize..e as usize])
            }
            _ => Err(Error::format(
                &self.path,
                format!("tensor `{}` data lies past the end of the file", info.name),
            )),
        }
    }

    /// Checks every tensor before any is read: a unique name, a type this reader knows,
    /// dims that fit its blocks, and data lying within the file.
    pub fn check_tensors(&self) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for info in &self.tensors {
            if !seen.insert(info.name.as_str()) {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{}` appears twice", crate::error::clip(&info.name)),
                ));
            }
            self.tensor_bytes(info)?;
        }
        Ok(())
    }

    /// The tensor dequantised to f32 in its row-major shape.
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Tensor> {
        let bytes = self.tensor_bytes(info)?;
        let data = dequantize(info.ggml_type, bytes, info.n_elements() as usize)
            .map_err(|m| Error::format(&self.path, format!("tensor `{}`: {m}", info.name)))?;
        Ok(Tensor::from_vec(
            data,
            info.shape(),
            &crate::device::host(),
        )?)
    }
}

/// The Hugging Face name of a llama.cpp tensor, or None for tensors without one
/// (e.g. `rope_freqs.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's Q/K row permutation (`permute` in `convert_hf_to_gguf.py`): rows of `w`
/// `(rows, cols)` viewed as `(n_head, 2, head_dim/2, cols)`, axes 1 and 2 swapped. It turns
/// Hugging Face's rotate-half pairing (i, i + head_dim/2) into adjacent rows (2i, 2i+1).
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    // hf row h*hd + s*hd/2 + i  ->  gguf row h*hd + 2i + s
    reorder_rows(w, rows, cols, n_head, |h, s, i, hd| {
        (h * hd + s * hd / 2 + i, h * hd + 2 * i + s)
    })
}

/// The inverse of [`permute_qk`] (transformers' `reverse_permute_weights`): rows viewed as
/// `(n_head, head_dim/2, 2, cols)`, axes 1 and 2 swapped.
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    // gguf row h*hd + 2i + s  ->  hf row h*hd + s*hd/2 + i
    reorder_rows(w, rows, cols, n_head, |h, s, i, hd| {
        (h * hd + 2 * i + s, h * hd + s * hd / 2 + i)
    })
}

/// Moves row `from` to row `to` for every (head, s, i) as given by `map`.
fn reorder_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    map: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Result<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || w.len() != rows * cols {
        return Err(Error::msg(format!(
            "cannot permute a ({rows}, {cols}) matrix into {n_head} heads of even size"
        )));
    }
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..hd / 2 {
                let (from, to) = map(h, s, i, hd);
                out[to * cols..(to + 1) * cols].copy_from_slice(&w[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// All tensors with a Hugging Face name, dequantised, in HF shapes, Q/K rows un-permuted.
pub fn hf_weights(g: &GgufFile, config: &HfConfig) -> Result<Weights> {
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads.unwrap_or(heads);
    let mut w = Weights::for_model(Some(g.path().to_path_buf()));
    for info in &g.tensors {
        let Some(name) = hf_tensor_name(&info.name) else {
            // e.g. `rope_freqs.weight` (llama-3 RoPE scaling): dropping it would change
            // what the model computes.
            return Err(Error::format(
                g.path(),
                format!(
                    "tensor `{}` has no Hugging Face LLaMA counterpart; the model would not use it",
                    crate::error::clip(&info.name)
                ),
            ));
        };
        if w.contains(&name) {
            return Err(Error::format(
                g.path(),
                format!("tensor `{}` appears twice (as `{name}`)", info.name),
            ));
        }
        let mut t = g.tensor_f32(info)?;
        let n_head = if name.contains(".self_attn.q_proj.") {
            Some(heads)
        } else if name.contains(".self_attn.k_proj.") {
            Some(kv_heads)
        } else {
            None
        };
        if let Some(n_head) = n_head {
            // weight (out, in) or bias (out,): rows are the out features.
            let shape = t.dims().to_vec();
            let Some(&rows) = shape.first() else {
                return Err(Error::format(
                    g.path(),
                    format!("tensor `{}` has no dimensions", info.name),
                ));
            };
            let cols = shape.iter().skip(1).product::<usize>();
            let data = unpermute_qk(&t.flatten_all()?.to_vec1::<f32>()?, rows, cols, n_head)
                .map_err(|e| Error::format(g.path(), format!("tensor `{}`: {e}", info.name)))?;
            t = Tensor::from_vec(data, shape, &crate::device::host())?;
        }
        w.insert(name, t);
    }
    Ok(w)
}

/// Loads a llama GGUF as a Hugging Face model. A tokenizer type that cannot be converted
/// leaves `tokenizer` empty with a note on stderr, so the weights stay usable.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let config = hf_config(&g)?;
    // Config errors (sizes, unsupported features) before any tensor is read.
    let resolved = config.resolve()?;
    g.check_tensors()?;
    let tokenizer = match crate::io::gguf_tokenizer::load_tokenizer(&g.metadata) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("note: {}: no tokenizer: {e}", path.display());
            None
        }
    };
    let weights = hf_weights(&g, &config)?;
    resolved.check_weights(&weights)?;
    Ok(LoadedModel {
        config_json: serde_json::to_value(&config)?,
        config,
        weights,
        tokenizer,
        path: path.to_path_buf(),
        kind: SourceKind::Gguf,
    })
}
