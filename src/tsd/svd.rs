//! Thin SVD of frozen weights (faer, f32), cached on disk by content hash so a second run
//! on the same base reuses it, and computed in the background while pre-launch training
//! runs (LoRA-Dash needs it only at step t).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use candle_core::Tensor;
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
            &crate::device::host(),
        )?;
        Ok((
            self.u.index_select(&ids, 1)?.contiguous()?,
            self.v.index_select(&ids, 1)?.contiguous()?,
        ))
    }
}

/// Thin SVD of a 2-D f32 tensor, with `threads` worker threads (1 = sequential). An empty
/// or non-finite matrix is an error (faer's result would be meaningless).
pub fn thin_svd(w: &Tensor, threads: usize) -> Result<Svd> {
    let (m, n) = w.dims2()?;
    if m == 0 || n == 0 {
        return Err(Error::msg(format!(
            "cannot take the SVD of a ({m}, {n}) matrix"
        )));
    }
    let data: Vec<f32> = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(Error::msg(format!(
            "cannot take the SVD of a matrix holding {} at index {i}",
            data[i]
        )));
    }
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
        u: Tensor::from_vec(ub, (m, k), &crate::device::host())?,
        sigma,
        v: Tensor::from_vec(vb, (n, k), &crate::device::host())?,
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

/// f32 hashes of base weights stored in half precision (`--dtype`), by tensor id.
fn stored_hashes(
) -> &'static std::sync::Mutex<std::collections::HashMap<candle_core::TensorId, String>> {
    static H: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<candle_core::TensorId, String>>,
    > = std::sync::OnceLock::new();
    H.get_or_init(Default::default)
}

/// `w` converted to `dtype` for storage, with `w`'s own [`weight_hash`] recorded as the
/// converted tensor's [`base_hash`].
pub fn store_as(w: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let hash = weight_hash(w)?;
    let t = w.to_dtype(dtype)?;
    stored_hashes()
        .lock()
        .expect("hash registry")
        .insert(t.id(), hash);
    Ok(t)
}

/// The hash by which saved adapters name a base weight: [`weight_hash`] of the f32 weight
/// as read from the model file, also when `--dtype` stores it in half precision (then the
/// hash recorded by [`store_as`]). The SVD cache keys on [`weight_hash`] of the stored
/// values instead, since the SVD is of those.
pub fn base_hash(w: &Tensor) -> Result<String> {
    if let Some(h) = stored_hashes().lock().expect("hash registry").get(&w.id()) {
        return Ok(h.clone());
    }
    weight_hash(w)
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

/// Metadata keys of a cache entry: the weight's hash and a checksum of the stored SVD.
const META_WEIGHT: &str = "weight_sha256";
const META_CHECKSUM: &str = "svd_sha256";

/// SHA-256 over the shapes and f32 contents of an SVD's factors, hex.
fn svd_checksum(u: &Tensor, sigma: &Tensor, v: &Tensor) -> Result<String> {
    let mut h = Sha256::new();
    for t in [u, sigma, v] {
        h.update(weight_hash(t)?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// SVDs on disk, one safetensors file per weight content hash, each stored with a checksum
/// that is verified on read: a corrupt or foreign entry is recomputed and overwritten.
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

    /// The cache file of a weight hash (None when the cache is disabled).
    pub fn file(&self, hash: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{hash}.safetensors")))
    }

    /// The cached SVD of `w`, or a fresh one (then stored). Returns whether it was cached.
    pub fn get_or_compute(&self, w: &Tensor, threads: usize) -> Result<(Svd, bool)> {
        let (m, n) = w.dims2()?;
        let hash = weight_hash(w)?;
        if let Some(path) = self.file(&hash) {
            if path.exists() {
                match read(&path, &hash, m, n) {
                    Ok(svd) => return Ok((svd, true)),
                    Err(e) => eprintln!("note: SVD cache entry recomputed: {e}"),
                }
            }
        }
        let svd = thin_svd(w, threads)?;
        if let (Some(dir), Some(path)) = (&self.dir, self.file(&hash)) {
            // A cache that cannot be written only costs time; the write is atomic, so a
            // full disk never leaves a truncated entry.
            if std::fs::create_dir_all(dir).is_ok() {
                let s = Tensor::from_vec(svd.sigma.clone(), svd.k(), &crate::device::host())?;
                let meta = HashMap::from([
                    (META_WEIGHT.to_string(), hash.clone()),
                    (META_CHECKSUM.to_string(), svd_checksum(&svd.u, &s, &svd.v)?),
                ]);
                let _ = save_tensors(
                    [("u", &svd.u), ("sigma", &s), ("v", &svd.v)].into_iter(),
                    &path,
                    Some(meta),
                );
            }
        }
        Ok((svd, false))
    }
}

/// A finished background SVD: in memory, or in its cache entry, read back when it is
/// needed. The second keeps a run's memory free of SVDs that LoRA-Dash reads only once, at
/// the switch (for SmolLM2-135M's q, k, v, up, down they are 0.4 GB).
#[derive(Clone)]
enum Done {
    Resident(Arc<Svd>),
    Stored {
        path: PathBuf,
        hash: String,
        w: Tensor,
    },
}

impl SvdCache {
    /// Makes sure `w`'s SVD is in the cache and returns where; the SVD itself stays in
    /// memory only when the cache is disabled or cannot be written. `hit` says whether it
    /// was there already.
    fn ensure(&self, w: &Tensor, threads: usize) -> Result<(Done, bool)> {
        let hash = weight_hash(w)?;
        if let Some(path) = self.file(&hash) {
            if path.exists() && entry_of(&path, &hash) {
                return Ok((
                    Done::Stored {
                        path,
                        hash,
                        w: w.clone(),
                    },
                    true,
                ));
            }
        }
        let (svd, hit) = self.get_or_compute(w, threads)?;
        Ok(match self.file(&hash) {
            Some(path) if path.exists() => (
                Done::Stored {
                    path,
                    hash,
                    w: w.clone(),
                },
                hit,
            ),
            _ => (Done::Resident(Arc::new(svd)), hit),
        })
    }
}

impl Done {
    /// The SVD, read and verified from its cache entry when stored; recomputed (with a note)
    /// when the entry went bad since it was written.
    fn load(&self) -> Result<Arc<Svd>> {
        match self {
            Done::Resident(s) => Ok(s.clone()),
            Done::Stored { path, hash, w } => {
                let (m, n) = w.dims2()?;
                match read(path, hash, m, n) {
                    Ok(s) => Ok(Arc::new(s)),
                    Err(e) => {
                        eprintln!("note: SVD cache entry recomputed: {e}");
                        Ok(Arc::new(thin_svd(w, rayon::current_num_threads())?))
                    }
                }
            }
        }
    }
}

/// Whether the header of the cache entry at `path` names the weight `hash` (the contents
/// are verified when read).
fn entry_of(path: &Path, hash: &str) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    use std::io::Read;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(len);
    if n > 1 << 24 {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return false;
    };
    v["__metadata__"][META_WEIGHT].as_str() == Some(hash)
}

/// Reads and verifies a cache entry for an (m, n) weight of hash `hash`.
fn read(path: &Path, hash: &str, m: usize, n: usize) -> Result<Svd> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get(META_WEIGHT).map(String::as_str) != Some(hash) {
        return Err(Error::format(path, "entry belongs to another weight"));
    }
    let w = Weights::load_safetensors(path)?;
    let k = m.min(n);
    let (u, s, v) = (
        w.get_shaped("u", &[m, k])?,
        w.get_shaped("sigma", &[k])?,
        w.get_shaped("v", &[n, k])?,
    );
    if meta.get(META_CHECKSUM) != Some(&svd_checksum(&u, &s, &v)?) {
        return Err(Error::format(path, "checksum mismatch"));
    }
    Ok(Svd {
        u,
        sigma: s.to_vec1()?,
        v,
    })
}

type Slots = HashMap<String, std::result::Result<Done, String>>;

/// What the background thread shares with the waiters.
#[derive(Default)]
struct Shared {
    slots: Slots,
    /// The thread has ended (normally, by a panic, or cancelled): nothing more will come.
    finished: bool,
    cancel: bool,
}

/// Marks the work finished when the thread ends, however it ends.
struct FinishGuard(Arc<(Mutex<Shared>, Condvar)>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap_or_else(PoisonError::into_inner).finished = true;
        cv.notify_all();
    }
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// SVDs of named weights computed on a background thread, in order. A job that fails or
/// panics is reported by [`SvdPrefetch::wait`] as an error; waiting never hangs. Dropping
/// the prefetch stops the thread after its current job and joins it.
pub struct SvdPrefetch {
    state: Arc<(Mutex<Shared>, Condvar)>,
    names: std::collections::BTreeSet<String>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub cached_hits: Arc<Mutex<usize>>,
}

impl SvdPrefetch {
    /// Starts computing the SVD of every `(name, weight)` on one background thread,
    /// through `cache`.
    /// Finished SVDs wait in the cache, not in memory, when the cache is enabled.
    pub fn start(weights: Vec<(String, Tensor)>, cache: SvdCache) -> Self {
        let hits = Arc::new(Mutex::new(0usize));
        let h2 = hits.clone();
        Self::spawn(weights, move |_, w| {
            let (done, hit) = cache.ensure(w, 1)?;
            if hit {
                *h2.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
            Ok(done)
        })
        .with_hits(hits)
    }

    fn with_hits(mut self, hits: Arc<Mutex<usize>>) -> Self {
        self.cached_hits = hits;
        self
    }

    /// [`SvdPrefetch::start`] with any SVD function (tests inject failures through it).
    pub fn start_with(
        weights: Vec<(String, Tensor)>,
        svd: impl Fn(&str, &Tensor) -> Result<Svd> + Send + 'static,
    ) -> Self {
        Self::spawn(weights, move |name, w| {
            Ok(Done::Resident(Arc::new(svd(name, w)?)))
        })
    }

    fn spawn(
        weights: Vec<(String, Tensor)>,
        svd: impl Fn(&str, &Tensor) -> Result<Done> + Send + 'static,
    ) -> Self {
        let state: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let names: std::collections::BTreeSet<String> =
            weights.iter().map(|(n, _)| n.clone()).collect();
        let st = state.clone();
        let handle = std::thread::Builder::new()
            .name("svd-prefetch".into())
            .spawn(move || {
                let _guard = FinishGuard(st.clone());
                let (lock, cv) = &*st;
                for (name, w) in weights {
                    if lock.lock().unwrap_or_else(PoisonError::into_inner).cancel {
                        return;
                    }
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svd(&name, &w)));
                    let r = match r {
                        Ok(Ok(s)) => Ok(s),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(p) => Err(format!("panicked: {}", panic_message(p.as_ref()))),
                    };
                    lock.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .slots
                        .insert(name, r);
                    cv.notify_all();
                }
            });
        let handle = match handle {
            Ok(h) => Some(h),
            Err(e) => {
                // No thread: every wait reports why.
                let mut s = state.0.lock().unwrap_or_else(PoisonError::into_inner);
                s.finished = true;
                for n in &names {
                    s.slots.insert(
                        n.clone(),
                        Err(format!("could not start the SVD thread: {e}")),
                    );
                }
                drop(s);
                None
            }
        };
        SvdPrefetch {
            state,
            names,
            handle,
            cached_hits: Arc::new(Mutex::new(0)),
        }
    }

    /// Blocks until the SVD of `name` is ready; an error when it failed, panicked, was
    /// never requested, or the thread ended without it.
    pub fn wait(&self, name: &str) -> Result<Arc<Svd>> {
        if !self.names.contains(name) {
            return Err(Error::msg(format!("SVD of `{name}` was never requested")));
        }
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = s.slots.get(name) {
                let done = r
                    .clone()
                    .map_err(|e| Error::msg(format!("SVD of `{name}`: {e}")))?;
                drop(s);
                return done
                    .load()
                    .map_err(|e| Error::msg(format!("SVD of `{name}`: {e}")));
            }
            if s.finished {
                return Err(Error::msg(format!(
                    "SVD of `{name}`: the background SVD thread ended without computing it"
                )));
            }
            s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for SvdPrefetch {
    fn drop(&mut self) {
        self.state
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancel = true;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
        let p = SvdPrefetch::start(vec![("w".into(), w.clone())], cache.clone());
        assert_eq!(p.wait("w").unwrap().sigma, a.sigma);
        assert_eq!(*p.cached_hits.lock().unwrap(), 1);
        // A fresh weight: computed in the background, kept in its cache entry, read back.
        let w2 = (&w * 2.0).unwrap();
        let p = SvdPrefetch::start(vec![("w2".into(), w2.clone())], cache.clone());
        let got = p.wait("w2").unwrap();
        assert_eq!(*p.cached_hits.lock().unwrap(), 0);
        let path = cache.file(&weight_hash(&w2).unwrap()).unwrap();
        assert!(path.exists());
        let twice: Vec<f32> = a.sigma.iter().map(|x| 2.0 * x).collect();
        for (g, t) in got.sigma.iter().zip(&twice) {
            assert!((g - t).abs() <= 1e-4 * t.abs().max(1.0), "{g} vs {t}");
        }
        // An entry damaged between the background SVD and the switch is recomputed.
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let again = p.wait("w2").unwrap();
        for (g, t) in again.sigma.iter().zip(&got.sigma) {
            assert!((g - t).abs() <= 1e-5 * t.abs().max(1.0), "{g} vs {t}");
        }
    }

    fn random(m: usize, n: usize, seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        Tensor::from_vec(rng.uniform_vec(m * n, -1.0, 1.0), (m, n), &Device::Cpu).unwrap()
    }

    #[test]
    fn corrupt_cache_entry_is_detected_and_recomputed() {
        let w = random(12, 8, 5);
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(Some(dir.path().to_path_buf()));
        let (fresh, _) = cache.get_or_compute(&w, 1).unwrap();
        let path = cache.file(&weight_hash(&w).unwrap()).unwrap();
        let good = std::fs::read(&path).unwrap();
        // One flipped bit in the last stored value, a truncated file, and an entry of
        // another weight stored under this weight's name.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        let other = {
            let c2 = SvdCache::new(Some(dir.path().join("other")));
            let w2 = random(12, 8, 6);
            c2.get_or_compute(&w2, 1).unwrap();
            std::fs::read(c2.file(&weight_hash(&w2).unwrap()).unwrap()).unwrap()
        };
        for bad in [flipped, good[..good.len() / 2].to_vec(), other] {
            std::fs::write(&path, &bad).unwrap();
            let (svd, hit) = cache.get_or_compute(&w, 1).unwrap();
            assert!(!hit, "a bad entry must not count as a hit");
            assert_eq!(svd.sigma, fresh.sigma);
            let hash = weight_hash(&w).unwrap();
            assert!(read(&path, &hash, 12, 8).is_ok(), "entry rewritten");
            assert!(cache.get_or_compute(&w, 1).unwrap().1);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn failing_or_panicking_background_svd_is_an_error_not_a_hang() {
        let jobs = vec![
            ("ok".to_string(), random(6, 4, 1)),
            ("fails".to_string(), random(6, 4, 2)),
            ("panics".to_string(), random(6, 4, 3)),
            ("after".to_string(), random(6, 4, 4)),
        ];
        let p = SvdPrefetch::start_with(jobs, |name, w| match name {
            "fails" => Err(Error::msg("injected failure")),
            "panics" => panic!("injected panic"),
            _ => thin_svd(w, 1),
        });
        assert_eq!(p.wait("after").unwrap().k(), 4);
        assert_eq!(p.wait("ok").unwrap().k(), 4);
        let e = p.wait("fails").unwrap_err().to_string();
        assert!(
            e.contains("`fails`") && e.contains("injected failure"),
            "{e}"
        );
        let e = p.wait("panics").unwrap_err().to_string();
        assert!(e.contains("panicked: injected panic"), "{e}");
        assert!(p.wait("never").is_err());
        // Non-finite and empty weights are errors of the SVD itself.
        let nan = Tensor::new(&[[1f32, f32::NAN], [0.0, 1.0]], &Device::Cpu).unwrap();
        let p = SvdPrefetch::start(
            vec![
                ("nan".into(), nan),
                (
                    "empty".into(),
                    Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
                ),
            ],
            SvdCache::disabled(),
        );
        assert!(p.wait("nan").unwrap_err().to_string().contains("NaN"));
        assert!(p.wait("empty").is_err());
    }
}
