//! Device selection: the one place that names concrete devices. Model weights, adapters
//! and batches live on the device the model was loaded to (`Model::device`); the host is
//! where file contents, collated batches and the SVDs of frozen weights are formed before
//! they move there.

use candle_core::Device;

use crate::error::{Error, Result};

/// Host memory: where file contents land and host-side maths (SVD, metrics) runs.
pub fn host() -> Device {
    Device::Cpu
}

/// The device a `--device` value names: `cpu`, `cuda` or `cuda:N`.
pub fn select(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::config("device", format!("`{spec}`: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(Error::config(
                "device",
                format!("`{spec}`: expected cpu, cuda or cuda:N"),
            ))
        }
    };
    Device::new_cuda(ordinal).map_err(|e| {
        Error::config(
            "device",
            format!("`{spec}` is not available ({e}); this binary may lack the cuda feature"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_selects_and_bad_specs_are_errors() {
        assert!(select("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda0", ""] {
            let e = select(bad).unwrap_err().to_string();
            assert!(e.contains("device"), "{bad}: {e}");
        }
    }
}
