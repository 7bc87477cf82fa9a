//! The GGUF header: magic, version, counts, metadata key/values and tensor infos, read with
//! bounds checks so that a truncated or corrupt file gives an error, never a panic or a huge
//! allocation.

use std::path::Path;

use super::{GgmlType, GgufValue, Metadata, TensorInfo, DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{clip, Error, Result};

/// Bounds-checked little-endian reader over the header.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(Error::format(
                self.path,
                format!(
                    "truncated GGUF header at byte {} while reading {}",
                    self.pos,
                    clip(what)
                ),
            )),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count of items that each take at least `min_size` bytes, checked against what is left
    /// so a corrupt count cannot trigger a huge allocation.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(Error::format(
                self.path,
                format!("{} {n} is larger than the file allows", clip(what)),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        use GgufValue as V;
        Ok(match ty {
            0 => V::U8(self.arr::<1>(key)?[0]),
            1 => V::I8(self.arr::<1>(key)?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => V::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => V::U32(self.u32(key)?),
            5 => V::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => V::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => V::Bool(self.arr::<1>(key)?[0] != 0),
            8 => V::String(self.string(key)?),
            // Arrays may nest; a small bound keeps a corrupt file from recursing deeply.
            9 if depth < 4 => {
                let elem = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(self.u64(key)?),
            11 => V::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => V::F64(f64::from_le_bytes(self.arr(key)?)),
            t => {
                return Err(Error::format(
                    self.path,
                    format!("metadata `{}`: unknown value type {t}", clip(key)),
                ))
            }
        })
    }
}

/// Parses the header: (version, metadata, tensor infos, start of the data section).
pub(super) fn parse(b: &[u8], path: &Path) -> Result<(u32, Metadata, Vec<TensorInfo>, usize)> {
    let mut r = Reader { b, pos: 0, path };
    if r.take(4, "magic").ok() != Some(&MAGIC[..]) {
        return Err(Error::format(path, "not a GGUF file (bad magic)"));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::format(
                path,
                "GGUF version 1 is not supported; re-convert with a current llama.cpp",
            ))
        }
        v if v.swap_bytes() <= 3 => {
            return Err(Error::format(
                path,
                "big-endian GGUF files are not supported",
            ))
        }
        v => return Err(Error::format(path, format!("unsupported GGUF version {v}"))),
    }
    // A tensor info takes at least 8 (name) + 4 + 4 + 8 bytes, a key/value at least 8 + 4 + 1.
    let n_tensors = r.count(24, "tensor count")?;
    let n_kv = r.count(13, "metadata count")?;
    let mut metadata = Metadata::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)? as usize;
        if n_dims > 8 {
            return Err(Error::format(
                path,
                format!("tensor `{}` has {n_dims} dims", clip(&name)),
            ));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&name))
            .collect::<Result<Vec<_>>>()?;
        let ggml_type = GgmlType::from_id(r.u32(&name)?);
        let offset = r.u64(&name)?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(|v| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(Error::format(
            path,
            format!("general.alignment {alignment} is not a power of two"),
        ));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{}` offset {} is not aligned to {alignment}",
                    clip(&t.name),
                    t.offset
                ),
            ));
        }
    }
    Ok((version, metadata, tensors, data_start as usize))
}
