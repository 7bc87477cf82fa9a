//! Device selection: the one place that names concrete devices. Model weights, adapters
//! and batches live on the device the model was loaded to (`Model::device`); the host is
//! where file contents, collated batches and the SVDs of frozen weights are formed before
//! they move there.

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::io::Weights;

/// Host memory: where file contents land and host-side maths (SVD, metrics) runs.
pub fn host() -> Device {
    Device::Cpu
}

/// What a `--device` value names: `cpu` (None) or `cuda` / `cuda:N` (Some(N)). Only the
/// syntax is checked here; [`select`] opens the device.
pub fn parse(spec: &str) -> Result<Option<usize>> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(None);
    }
    let bad = || Error::config("device", format!("`{spec}`: expected cpu, cuda or cuda:N"));
    match s.strip_prefix("cuda") {
        Some("") => Ok(Some(0)),
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .map(Some)
            .ok_or_else(bad),
        None => Err(bad()),
    }
}

/// The device a `--device` value names: `cpu`, `cuda` or `cuda:N`.
pub fn select(spec: &str) -> Result<Device> {
    let Some(ordinal) = parse(spec)? else {
        return Ok(Device::Cpu);
    };
    #[cfg(feature = "cuda")]
    // SAFETY: only tries to open the driver library by its usual names; nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::config(
            "device",
            format!("`{spec}`: no NVIDIA driver library (libcuda.so) on this machine or in LD_LIBRARY_PATH"),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::config(
            "device",
            format!("`{spec}` is not available ({e}); this binary may lack the cuda feature (scripts/build-cuda.sh builds one with it)"),
        )
    })
}

/// The storage dtype a `--dtype` value names for the frozen base weights: `f32`, `bf16` or
/// `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::config(
            "dtype",
            format!("`{spec}`: expected f32, bf16 or f16"),
        )),
    }
}

/// Moves every tensor of `w` to `dev` (a no-op on the host).
pub fn place(w: &Weights, dev: &Device) -> Result<Weights> {
    if dev.is_cpu() {
        return Ok(w.clone());
    }
    let mut out = Weights::new(w.origin().map(|p| p.to_path_buf()));
    for (name, t) in w.iter() {
        out.insert(name.clone(), t.to_device(dev)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_selects_and_bad_specs_are_errors() {
        assert!(select("cpu").unwrap().is_cpu());
        assert_eq!(parse("CUDA").unwrap(), Some(0));
        assert_eq!(parse("cuda:3").unwrap(), Some(3));
        assert_eq!(parse(" cpu ").unwrap(), None);
        for bad in ["gpu", "cuda:x", "cuda0", "", "cuda:-1", "cpu:0"] {
            let e = select(bad).unwrap_err().to_string();
            assert!(e.contains("device"), "{bad}: {e}");
        }
    }
}
