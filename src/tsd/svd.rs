//! Thin SVD of frozen weights (faer, f32), cached on disk by content hash so a second run
//! on the same base reuses it, and computed in the background while pre-launch training
//! runs (LoRA-Dash needs it only at step t).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::weights::save_tensors;
use crate::io::Weights;

/// W = U·diag(σ)·Vᵀ with k = min(out, in): u (out, k), sigma (k) non-increasing, v (in, k).
#[derive(Debug, Clone)]
pub struct Svd {
    pub u: Tensor,
    pub sigma: Vec<f32>,
    pub v: Tensor,
}

impl Svd {
    pub fn k(&self) -> usize {
        self.sigma.len()
    }

    /// Columns `idx` of U and V: (out, s) and (in, s).
    pub fn columns(&self, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &Device::Cpu,
        )?;
        Ok((
            self.u.index_select(&ids, 1)?.contiguous()?,
            self.v.index_select(&ids, 1)?.contiguous()?,
        ))
    }
}

/// Thin SVD of a 2-D f32 tensor, with `threads` worker threads (1 = sequential).
pub fn thin_svd(w: &Tensor, threads: usize) -> Result<Svd> {
    let (m, n) = w.dims2()?;
    let data: Vec<f32> = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mat = faer::Mat::<f32>::from_fn(m, n, |i, j| data[i * n + j]);
    let par = if threads <= 1 {
        faer::Par::Seq
    } else {
        faer::Par::rayon(threads)
    };
    let prev = faer::get_global_parallelism();
    faer::set_global_parallelism(par);
    let svd = mat.thin_svd();
    faer::set_global_parallelism(prev);
    let svd = svd.map_err(|e| Error::msg(format!("SVD did not converge: {e:?}")))?;
    let k = m.min(n);
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let mut ub = Vec::with_capacity(m * k);
    for i in 0..m {
        for j in 0..k {
            ub.push(u[(i, j)]);
        }
    }
    let mut vb = Vec::with_capacity(n * k);
    for i in 0..n {
        for j in 0..k {
            vb.push(v[(i, j)]);
        }
    }
    let sigma: Vec<f32> = (0..k).map(|i| s[i]).collect();
    Ok(Svd {
        u: Tensor::from_vec(ub, (m, k), &Device::Cpu)?,
        sigma,
        v: Tensor::from_vec(vb, (n, k), &Device::Cpu)?,
    })
}

/// SHA-256 of a tensor's shape and f32 contents, hex.
pub fn weight_hash(w: &Tensor) -> Result<String> {
    let mut h = Sha256::new();
    for d in w.dims() {
        h.update((*d as u64).to_le_bytes());
    }
    let data: Vec<f32> = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    for x in data {
        h.update(x.to_le_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default cache directory: `$LORA_DASH_CACHE/svd`, else `~/.cache/lora-dash/svd`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("LORA_DASH_CACHE") {
        return Some(PathBuf::from(d).join("svd"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("lora-dash")
            .join("svd")
    })
}

/// SVDs on disk, one safetensors file per weight content hash.
#[derive(Debug, Clone)]
pub struct SvdCache {
    dir: Option<PathBuf>,
}

impl SvdCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        SvdCache { dir }
    }

    pub fn disabled() -> Self {
        SvdCache { dir: None }
    }

    fn file(&self, hash: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{hash}.safetensors")))
    }

    /// The cached SVD of `w`, or a fresh one (then stored). Returns whether it was cached.
    pub fn get_or_compute(&self, w: &Tensor, threads: usize) -> Result<(Svd, bool)> {
        let hash = weight_hash(w)?;
        if let Some(path) = self.file(&hash) {
            if path.exists() {
                if let Ok(svd) = read(&path, w.dims()) {
                    return Ok((svd, true));
                }
            }
        }
        let svd = thin_svd(w, threads)?;
        if let (Some(dir), Some(path)) = (&self.dir, self.file(&hash)) {
            // A cache that cannot be written only costs time.
            if std::fs::create_dir_all(dir).is_ok() {
                let s = Tensor::from_vec(svd.sigma.clone(), svd.k(), &Device::Cpu)?;
                let _ = save_tensors(
                    [("u", &svd.u), ("sigma", &s), ("v", &svd.v)].into_iter(),
                    &path,
                    None,
                );
            }
        }
        Ok((svd, false))
    }
}

fn read(path: &Path, dims: &[usize]) -> Result<Svd> {
    let w = Weights::load_safetensors(path)?;
    let (m, n) = (dims[0], dims[1]);
    let k = m.min(n);
    Ok(Svd {
        u: w.get_shaped("u", &[m, k])?,
        sigma: w.get_shaped("sigma", &[k])?.to_vec1()?,
        v: w.get_shaped("v", &[n, k])?,
    })
}

type Slots = HashMap<String, std::result::Result<Arc<Svd>, String>>;

/// SVDs of named weights computed on a background thread, in order.
pub struct SvdPrefetch {
    state: Arc<(Mutex<Slots>, Condvar)>,
    pub cached_hits: Arc<Mutex<usize>>,
}

impl SvdPrefetch {
    /// Starts computing the SVD of every `(name, weight)` on one background thread.
    pub fn start(weights: Vec<(String, Tensor)>, cache: SvdCache) -> Self {
        let state: Arc<(Mutex<Slots>, Condvar)> =
            Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
        let hits = Arc::new(Mutex::new(0usize));
        let st = state.clone();
        let h2 = hits.clone();
        std::thread::spawn(move || {
            for (name, w) in weights {
                let r = cache.get_or_compute(&w, 1).map_err(|e| e.to_string());
                if let Ok((_, true)) = &r {
                    *h2.lock().expect("svd hit counter") += 1;
                }
                let (lock, cv) = &*st;
                lock.lock()
                    .expect("svd slots")
                    .insert(name, r.map(|x| Arc::new(x.0)));
                cv.notify_all();
            }
        });
        SvdPrefetch {
            state,
            cached_hits: hits,
        }
    }

    /// Blocks until the SVD of `name` is ready.
    pub fn wait(&self, name: &str) -> Result<Arc<Svd>> {
        let (lock, cv) = &*self.state;
        let mut slots = lock.lock().expect("svd slots");
        loop {
            if let Some(r) = slots.get(name) {
                return r
                    .clone()
                    .map_err(|e| Error::msg(format!("SVD of `{name}`: {e}")));
            }
            slots = cv
                .wait_timeout(slots, Duration::from_millis(200))
                .expect("svd slots")
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_svd_reconstructs_and_cache_round_trips() {
        let mut rng = crate::rng::Rng::new(3);
        let w =
            Tensor::from_vec(rng.uniform_vec(40 * 24, -1.0, 1.0), (40, 24), &Device::Cpu).unwrap();
        let svd = thin_svd(&w, 1).unwrap();
        assert_eq!(svd.k(), 24);
        assert!(svd.sigma.windows(2).all(|p| p[0] >= p[1]));
        let s = Tensor::from_vec(svd.sigma.clone(), 24, &Device::Cpu).unwrap();
        let rec = svd
            .u
            .broadcast_mul(&s)
            .unwrap()
            .matmul(&svd.v.t().unwrap())
            .unwrap();
        let err = (rec - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-4, "reconstruction error {err}");
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(Some(dir.path().to_path_buf()));
        let (a, hit) = cache.get_or_compute(&w, 1).unwrap();
        assert!(!hit);
        let (b, hit) = cache.get_or_compute(&w, 1).unwrap();
        assert!(hit);
        assert_eq!(a.sigma, b.sigma);
        let p = SvdPrefetch::start(vec![("w".into(), w.clone())], cache);
        assert_eq!(p.wait("w").unwrap().sigma, a.sigma);
    }
}
