//! A named set of f32 tensors in Hugging Face naming, whatever file they came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{clip, Error, Result};

#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    origin: Option<PathBuf>,
    /// Storage dtype of the frozen linear weights of a model being read (`--dtype`).
    store_linear: Option<DType>,
}

thread_local! {
    static LOAD_LINEAR_AS: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a model load) with the model's frozen linear weights stored in `dtype` as they
/// are read, one tensor at a time, so the f32 set never exists at once: the weights of a
/// model file read inside `f` (see [`Weights::for_model`]) that are matrices of linear
/// layers, by name (`*.weight`, rank 2, not an embedding). Each such tensor's f32 hash is
/// kept (`tsd::svd::base_hash`), so adapters still name the f32 base.
pub fn with_linear_dtype<T>(dtype: DType, f: impl FnOnce() -> T) -> T {
    if dtype == DType::F32 {
        return f();
    }
    let before = LOAD_LINEAR_AS.with(|c| c.replace(Some(dtype)));
    let out = f();
    LOAD_LINEAR_AS.with(|c| c.set(before));
    out
}

/// Whether `name` is a linear layer's weight matrix that `--dtype` stores in half precision.
fn is_linear_matrix(name: &str, t: &Tensor) -> bool {
    t.rank() == 2
        && t.dtype().is_float()
        && name.ends_with(".weight")
        && !name.contains("embed")
        && !name.contains("LayerNorm")
}

impl Weights {
    pub fn new(origin: Option<PathBuf>) -> Self {
        Weights {
            tensors: BTreeMap::new(),
            origin,
            store_linear: None,
        }
    }

    /// The weights of a model file: like [`Weights::new`], storing linear matrices in the
    /// dtype of an enclosing [`with_linear_dtype`].
    pub fn for_model(origin: Option<PathBuf>) -> Self {
        Weights {
            store_linear: LOAD_LINEAR_AS.with(|c| c.get()),
            ..Weights::new(origin)
        }
    }

    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// Adds `t` as `name`; in a model read under [`with_linear_dtype`], a linear weight
    /// matrix is stored in that dtype (its f32 hash registered first).
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        let t = match self.store_linear {
            Some(dt) if t.dtype() != dt && is_linear_matrix(&name, &t) => {
                match crate::tsd::svd::store_as(&t, dt) {
                    Ok(h) => h,
                    // A tensor that cannot be converted stays as read (f32).
                    Err(_) => t,
                }
            }
            _ => t,
        };
        self.tensors.insert(name, t);
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            from: self.origin.clone(),
        })
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Reads every tensor of a safetensors file, converted to f32 (integer tensors are kept).
    pub fn read_safetensors(path: &Path, into: &mut Weights) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
            Error::format(
                path,
                format!("not a safetensors file: {}", clip(&e.to_string())),
            )
        })?;
        for (name, view) in st.tensors() {
            let t = view_to_tensor(&view)
                .map_err(|e| Error::format(path, format!("tensor `{}`: {e}", clip(&name))))?;
            let t = match t.dtype() {
                DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
                _ => t,
            };
            into.insert(name, t);
        }
        Ok(())
    }

    /// Refuses weights holding NaN or ±inf: the error names the first such tensor and the
    /// file the weights came from.
    pub fn check_finite(&self) -> Result<()> {
        self.tensors
            .iter()
            .try_for_each(|(name, t)| check_finite_in(name, t, self.origin.as_deref()))
    }

    pub fn load_safetensors(path: &Path) -> Result<Weights> {
        let mut w = Weights::new(Some(path.to_path_buf()));
        Weights::read_safetensors(path, &mut w)?;
        Ok(w)
    }

    /// Writes all tensors (contiguous, in their dtype) atomically, with optional metadata.
    pub fn save_safetensors(
        &self,
        path: &Path,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<()> {
        save_tensors(
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)),
            path,
            metadata,
        )
    }
}

/// Refuses a tensor holding NaN or ±inf, naming it. Integer tensors always pass.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    check_finite_in(name, t, None)
}

fn check_finite_in(name: &str, t: &Tensor, from: Option<&Path>) -> Result<()> {
    let bad = match t.dtype() {
        DType::F64 => first_bad(&t.flatten_all()?.to_vec1::<f64>()?, |x| {
            (x.is_finite(), x as f32)
        }),
        DType::F32 | DType::F16 | DType::BF16 => {
            let t = t
                .to_device(&crate::device::host())?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let (storage, layout) = t.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
                    first_bad(&v[a..b], |x| (x.is_finite(), x))
                }
                _ => first_bad(&t.flatten_all()?.to_vec1::<f32>()?, |x| (x.is_finite(), x)),
            }
        }
        _ => None,
    };
    match bad {
        None => Ok(()),
        Some((count, index, value)) => Err(Error::NonFiniteTensor {
            name: name.to_string(),
            from: from.map(Path::to_path_buf),
            count,
            index,
            value,
        }),
    }
}

/// (number of non-finite values, index of the first, its value), None when all are finite.
fn first_bad<T: Copy>(v: &[T], test: impl Fn(T) -> (bool, f32)) -> Option<(usize, usize, f32)> {
    if v.iter().all(|&x| test(x).0) {
        return None;
    }
    let mut bad = v.iter().enumerate().filter(|(_, &x)| !test(x).0);
    let (index, &first) = bad.next()?;
    Some((bad.count() + 1, index, test(first).1))
}

fn view_to_tensor(view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let dtype = match view.dtype() {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        S::I32 => DType::I32,
        d => return Err(Error::msg(format!("unsupported dtype {d:?}"))),
    };
    Ok(Tensor::from_raw_buffer(
        view.data(),
        dtype,
        view.shape(),
        &crate::device::host(),
    )?)
}

/// Writes `(name, tensor)` pairs as one safetensors file, atomically.
pub fn save_tensors<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a Tensor)>,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    use safetensors::Dtype as S;
    let mut owned: Vec<(String, Vec<u8>, S, Vec<usize>)> = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&crate::device::host())?.contiguous()?;
        let (dt, bytes): (S, Vec<u8>) = match t.dtype() {
            DType::F32 => (S::F32, bytes_of(&t.flatten_all()?.to_vec1::<f32>()?)),
            DType::F16 => (S::F16, bytes_of(&t.flatten_all()?.to_vec1::<half::f16>()?)),
            DType::BF16 => (
                S::BF16,
                bytes_of(&t.flatten_all()?.to_vec1::<half::bf16>()?),
            ),
            DType::F64 => (S::F64, bytes_of(&t.flatten_all()?.to_vec1::<f64>()?)),
            DType::I64 => (S::I64, bytes_of(&t.flatten_all()?.to_vec1::<i64>()?)),
            DType::U32 => (S::U32, bytes_of(&t.flatten_all()?.to_vec1::<u32>()?)),
            DType::U8 => (S::U8, t.flatten_all()?.to_vec1::<u8>()?),
            d => {
                return Err(Error::msg(format!(
                    "tensor `{name}`: cannot save dtype {d:?}"
                )))
            }
        };
        owned.push((name.to_string(), bytes, dt, t.dims().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, b, dt, shape)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::msg(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::msg(format!("safetensors: {e}")))?;
    crate::io::atomic::write_file(path, &bytes)
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain-old-data numeric slice reinterpreted as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn non_finite_values_are_refused_naming_tensor_and_file() {
        let mut w = Weights::new(Some(PathBuf::from("adapter_model.safetensors")));
        w.insert("a", Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap());
        w.insert("ids", Tensor::new(&[1u32, 2], &Device::Cpu).unwrap());
        w.check_finite().unwrap();
        for (bad, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let t = Tensor::new(&[[0f32, 1.0], [bad, bad]], &Device::Cpu).unwrap();
            for t in [t.clone(), t.t().unwrap(), t.to_dtype(DType::BF16).unwrap()] {
                let mut w = w.clone();
                w.insert("b.lora_A.weight", t);
                let e = w.check_finite().unwrap_err().to_string();
                assert!(
                    e.contains("`b.lora_A.weight` in adapter_model.safetensors")
                        && e.contains("2 non-finite")
                        && e.contains(shown),
                    "{e}"
                );
            }
        }
        let t = Tensor::new(&[1f64, 1e300, f64::NAN], &Device::Cpu).unwrap();
        let e = check_finite("x", &t).unwrap_err().to_string();
        assert!(
            e.contains("`x` holds 1 non-finite") && e.contains("index 2"),
            "{e}"
        );
        // A large finite f64 is finite, even though it does not fit in f32.
        check_finite("y", &Tensor::new(&[1e300f64], &Device::Cpu).unwrap()).unwrap();
    }
}
