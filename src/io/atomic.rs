//! Writes that never leave a half-written file or directory behind: write to a temporary
//! sibling, flush it to disk, then rename over the target.
//!
//! Sibling names: `.<name>.tmp-<pid>-<n>` while being written, `.<name>.trash-<pid>-<n>` for
//! a replaced directory on its way out. A process killed between the two leaves such a
//! sibling behind; the next [`StagedDir`] for the same target removes the ones whose process
//! is gone.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory. On any error
/// the temporary file is removed and `path` is untouched (a full disk never leaves a
/// truncated or zero-byte file in its place).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        use std::io::Write;
        let mut f = std::fs::File::create(tmp).at(tmp)?;
        f.write_all(bytes).at(tmp)?;
        f.sync_all().at(tmp)
    })
}

/// Like [`write_file`] with a writer callback (for large outputs): `f` writes the file it
/// is given, which is renamed onto `path` once `f` succeeded and the data is on disk.
pub fn write_with(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(path, "tmp");
    let done = f(&tmp).and_then(|()| {
        // The callback may have written through its own handle: flush that data too.
        std::fs::File::open(&tmp)
            .and_then(|h| h.sync_all())
            .at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done?;
    sync_parent(path);
    Ok(())
}

/// Flushes the directory entry of `path` (best effort: not every platform allows it).
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// A name next to `path`, `.<name>.<kind>-<pid>-<n>`, unique per process and call (threads
/// may write the same target concurrently, e.g. the SVD cache).
fn sibling(path: &Path, kind: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{kind}-{}-{n}", std::process::id()))
}

/// Whether process `pid` is running. Where `/proc` is not available every other process
/// counts as gone, so leftovers are removed rather than kept forever.
fn process_alive(pid: u32) -> bool {
    pid == std::process::id()
        || (Path::new("/proc/self").exists() && Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes temporary and trash siblings of `target` left by processes that no longer run.
pub fn remove_stale_siblings(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let Some(rest) = rest
            .strip_prefix("tmp-")
            .or_else(|| rest.strip_prefix("trash-"))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !process_alive(p)) {
            let p = e.path();
            let _ = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                _ => std::fs::remove_file(&p),
            };
        }
    }
}

/// A directory filled under a temporary sibling name and swapped into place by
/// [`StagedDir::commit`]; a failed run therefore never loses the previous output. Dropped
/// without commit, it removes itself.
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    done: bool,
}

impl StagedDir {
    /// Fails with [`Error::OutputExists`] when `target` exists and `overwrite` is false;
    /// nothing is touched then. Leftover siblings of killed runs are removed.
    ///
    /// This does not check that `target` stays clear of the command's inputs: commands
    /// writing a user-chosen `--out` use [`crate::io::outpath::stage_output`].
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        if target.symlink_metadata().is_ok() && !overwrite {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        if let Some(parent) = target.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).at(parent)?;
            }
        }
        remove_stale_siblings(target);
        let tmp = sibling(target, "tmp");
        std::fs::create_dir(&tmp).at(&tmp)?;
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

    /// The directory the output will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Swaps the staged directory into place: an existing target is moved to a trash
    /// sibling, the new directory renamed onto the target, then the trash removed. If the
    /// second rename fails the old target is put back.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.symlink_metadata().is_ok() {
            if !self.overwrite {
                return Err(Error::OutputExists(self.target.clone()));
            }
            let trash = sibling(&self.target, "trash");
            std::fs::rename(&self.target, &trash).at(&self.target)?;
            if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
                let _ = std::fs::rename(&trash, &self.target);
                return Err(Error::io(&self.target, e));
            }
            let _ = if trash.is_dir() {
                std::fs::remove_dir_all(&trash)
            } else {
                std::fs::remove_file(&trash)
            };
        } else {
            std::fs::rename(&self.tmp, &self.target).at(&self.target)?;
        }
        sync_parent(&self.target);
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn staged_dir_refuses_existing_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"o").unwrap();
        assert!(matches!(
            StagedDir::new(&target, false),
            Err(Error::OutputExists(_))
        ));
        {
            let s = StagedDir::new(&target, true).unwrap();
            std::fs::write(s.join("a"), b"x").unwrap();
        } // dropped: nothing committed, the old output is intact
        assert!(!target.join("a").exists());
        assert!(target.join("old").exists());
        let s = StagedDir::new(&target, true).unwrap();
        std::fs::write(s.join("a"), b"x").unwrap();
        s.commit().unwrap();
        assert!(target.join("a").exists());
        assert!(!target.join("old").exists());
        assert_eq!(names(d.path()), ["out"]);
    }

    #[test]
    fn leftovers_of_killed_runs_are_removed_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        // A pid far above any kernel's pid_max: that process cannot be running.
        let dead = d.path().join(".out.tmp-4294967294-0");
        let dead_trash = d.path().join(".out.trash-4294967294-3");
        let mine = d
            .path()
            .join(format!(".out.tmp-{}-999999", std::process::id()));
        let other = d.path().join(".other.tmp-4294967294-0");
        for p in [&dead, &dead_trash, &mine, &other] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join("f"), b"x").unwrap();
        }
        let s = StagedDir::new(&target, false).unwrap();
        s.commit().unwrap();
        assert!(!dead.exists() && !dead_trash.exists());
        assert!(mine.exists(), "a sibling of a running process is kept");
        assert!(other.exists(), "siblings of other targets are kept");
    }

    #[test]
    fn write_file_replaces_atomically_and_leaves_no_temp_on_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let e = write_with(&p, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err(Error::msg("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(d.path()), ["f.json"]);
        // A target directory that does not exist: error, nothing left behind.
        assert!(write_file(&d.path().join("no/such/dir/f"), b"x").is_err());
        assert_eq!(names(d.path()), ["f.json"]);
    }
}
