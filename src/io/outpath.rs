//! Output directories chosen by the user (`--out`): never one that would destroy an input,
//! never replaced unless the run succeeded.
//!
//! Two rules, checked before anything on disk is touched:
//! - `--out` must not be, contain, or lie inside any input path (model, adapter, data,
//!   resume source). Paths are compared after resolving symlinks and `..`, also when `--out`
//!   does not exist yet (its nearest existing ancestor is resolved).
//! - An existing `--out` is replaced only with `--overwrite`, and only when it looks like an
//!   earlier output of the same command (it holds one of the command's marker files), so a
//!   mistyped `--out $HOME --overwrite` is refused rather than emptied.
//!
//! The new output is then built in a temporary sibling and swapped in on success
//! ([`StagedDir`]); a failed run leaves the previous output as it was.
//!
//! ```ignore
//! use lora_dash::io::outpath::stage_output;
//!
//! // Before loading anything:
//! let stage = stage_output(
//!     &args.out,
//!     args.overwrite,
//!     &[("--model", Path::new(&args.model)), ("--adapter", &args.adapter)],
//!     &["config.json"], // what an earlier output of this command holds
//! )?;
//! // ... load, compute, write files under `stage.path()` / `stage.join("x")` ...
//! stage.commit()?; // only now is an existing `--out` replaced
//! ```
//!
//! Inputs that are not paths (a hub id `org/name`) can be passed as they are: a path that
//! does not exist simply cannot overlap an existing input. Pass the resolved location too
//! when one is known (e.g. `LoadedModel::path`).

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;

/// `p` made absolute, with symlinks resolved in the longest existing prefix and `.` / `..`
/// applied lexically to the rest (which does not exist, so holds no symlinks).
pub fn resolve_path(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let mut rest: Vec<Component<'_>> = Vec::new();
    let mut base = abs.as_path();
    let resolved = loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            break c;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                base = parent;
            }
            _ => break PathBuf::new(),
        }
    };
    let mut out = resolved;
    for c in rest.into_iter().rev() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Refuses an `out` that is, contains, or lies inside any of `inputs` (`(flag, path)`
/// pairs, e.g. `("--model", model_dir)`), naming the flag. Works for paths that do not
/// exist yet, relative paths and symlinks.
pub fn check_output_disjoint(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve_path(out);
    for (flag, input) in inputs {
        if input.as_os_str().is_empty() {
            continue;
        }
        let i = resolve_path(input);
        let relation = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        return Err(Error::OutputOverlapsInput {
            out: out.to_path_buf(),
            relation,
            flag: flag.to_string(),
            input: input.to_path_buf(),
        });
    }
    Ok(())
}

/// Refuses to replace an existing `out` that is not an earlier output of the command: a
/// file, or a non-empty directory holding none of `markers`. An empty `markers` accepts
/// any directory.
pub fn check_replaceable(out: &Path, markers: &[&str]) -> Result<()> {
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    let refuse = |reason: String| {
        Err(Error::OutputNotReplaceable {
            path: out.to_path_buf(),
            reason,
        })
    };
    if !meta.is_dir() {
        return refuse("is a file, not an output directory".into());
    }
    if markers.is_empty() || markers.iter().any(|m| out.join(m).exists()) {
        return Ok(());
    }
    let empty = std::fs::read_dir(out)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if empty {
        return Ok(());
    }
    refuse(format!(
        "is a non-empty directory without {}, so not an earlier output of this command",
        markers
            .iter()
            .map(|m| format!("`{m}`"))
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// All the checks of [`stage_output`] without staging anything: for commands that want to
/// fail fast, before a long computation, and stage the output when they have it.
pub fn check_output(
    out: &Path,
    overwrite: bool,
    inputs: &[(&str, &Path)],
    markers: &[&str],
) -> Result<()> {
    check_output_disjoint(out, inputs)?;
    if out.symlink_metadata().is_ok() {
        if !overwrite {
            return Err(Error::OutputExists(out.to_path_buf()));
        }
        check_replaceable(out, markers)?;
    }
    Ok(())
}

/// Checks `out` against the inputs and the overwrite rules ([`check_output`]), then stages
/// the new output in a temporary sibling. Errors come before anything on disk changes. See
/// the module documentation for an example.
pub fn stage_output(
    out: &Path,
    overwrite: bool,
    inputs: &[(&str, &Path)],
    markers: &[&str],
) -> Result<StagedDir> {
    check_output(out, overwrite, inputs, markers)?;
    StagedDir::new(out, overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(out: &Path, inputs: &[(&str, &Path)]) -> String {
        check_output_disjoint(out, inputs).unwrap_err().to_string()
    }

    #[test]
    fn output_overlapping_an_input_is_refused_naming_the_flag() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("m");
        std::fs::create_dir(&model).unwrap();
        let gguf = d.path().join("x.gguf");
        std::fs::write(&gguf, b"x").unwrap();
        let e = err(&model, &[("--model", &model)]);
        assert!(e.contains("is the --model input"), "{e}");
        let e = err(d.path(), &[("--model", &gguf)]);
        assert!(e.contains("contains the --model input"), "{e}");
        // Not existing yet, and reached through `..`.
        let inside = model.join("sub").join("..").join("new");
        let e = err(
            &inside,
            &[("--data", Path::new("nope")), ("--model", &model)],
        );
        assert!(e.contains("lies inside the --model input"), "{e}");
        // Disjoint siblings (also by name prefix) are fine.
        let sib = d.path().join("m2");
        check_output_disjoint(&sib, &[("--model", &model), ("--data", &gguf)]).unwrap();
    }

    #[test]
    fn symlinks_and_relative_paths_are_resolved() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        #[cfg(unix)]
        {
            let link = d.path().join("link");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            let e = err(&link.join("out"), &[("--adapter", &real)]);
            assert!(e.contains("lies inside the --adapter input"), "{e}");
            let e = err(&real, &[("--resume", &link)]);
            assert!(e.contains("is the --resume input"), "{e}");
        }
        let cwd = std::env::current_dir().unwrap();
        let rel = Path::new("some-relative-out");
        assert_eq!(resolve_path(rel), resolve_path(&cwd).join(rel));
        let e = err(Path::new("."), &[("--data", &cwd.join("x.json"))]);
        assert!(e.contains("contains the --data input"), "{e}");
    }

    #[test]
    fn only_earlier_outputs_are_replaced() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        // A directory with unrelated content is refused, even with --overwrite.
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
        let e = stage_output(&out, true, &[], &["config.json"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not an earlier output"), "{e}");
        assert!(out.join("notes.txt").exists());
        // Without --overwrite any existing output is refused.
        std::fs::write(out.join("config.json"), b"{}").unwrap();
        assert!(matches!(
            stage_output(&out, false, &[], &["config.json"]),
            Err(Error::OutputExists(_))
        ));
        // An earlier output is replaced, but only on commit.
        let s = stage_output(&out, true, &[], &["config.json"]).unwrap();
        std::fs::write(s.join("config.json"), b"{\"new\":1}").unwrap();
        assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");
        s.commit().unwrap();
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            b"{\"new\":1}"
        );
        assert!(!out.join("notes.txt").exists());
        // A file is never replaced by an output directory.
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(stage_output(&f, true, &[], &[]).is_err());
    }
}
