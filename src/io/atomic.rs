//! Writes that never leave a half-written file or directory behind: write to a temporary
//! sibling, then rename over the target.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes).at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// Like [`write_file`] with a writer callback (for large outputs).
pub fn write_with(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_sibling(path);
    if let Err(e) = f(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).at(path)
}

/// A temporary name next to `path`, unique per process and call (threads may write the
/// same target concurrently, e.g. the SVD cache).
fn tmp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}-{n}", std::process::id()))
}

/// A directory filled under a temporary name and renamed into place by [`StagedDir::commit`].
/// Dropped without commit, it removes itself.
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    done: bool,
}

impl StagedDir {
    /// Fails with [`Error::OutputExists`] when `target` exists and `overwrite` is false.
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        if target.exists() && !overwrite {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        if let Some(parent) = target.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).at(parent)?;
            }
        }
        let tmp = tmp_sibling(target);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).at(&tmp)?;
        Ok(StagedDir {
            tmp,
            target: target.to_path_buf(),
            overwrite,
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.overwrite {
                return Err(Error::OutputExists(self.target.clone()));
            }
            let old = tmp_sibling(&self.target).with_extension("old");
            std::fs::rename(&self.target, &old).at(&self.target)?;
            std::fs::rename(&self.tmp, &self.target).at(&self.target)?;
            let _ = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
        } else {
            std::fs::rename(&self.tmp, &self.target).at(&self.target)?;
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_refuses_existing_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        std::fs::create_dir(&target).unwrap();
        assert!(matches!(
            StagedDir::new(&target, false),
            Err(Error::OutputExists(_))
        ));
        {
            let s = StagedDir::new(&target, true).unwrap();
            std::fs::write(s.join("a"), b"x").unwrap();
        } // dropped: nothing committed
        assert!(!target.join("a").exists());
        let s = StagedDir::new(&target, true).unwrap();
        std::fs::write(s.join("a"), b"x").unwrap();
        s.commit().unwrap();
        assert!(target.join("a").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
