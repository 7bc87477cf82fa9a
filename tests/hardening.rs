//! Regression tests for defects found by trying the tool as a new user would and by
//! mutating model, adapter and GGUF files: inputs destroyed by `--overwrite`, architectures
//! loaded but not computed, untrusted sizes, non-finite values, unchecked caches and flags.
//! Each test is named after the defect it guards against.

mod common;

use std::path::{Path, PathBuf};

use common::golden;
use lora_dash::cli::analyze_cmd::{self, AnalyzeArgs};
use lora_dash::cli::commands;
use lora_dash::Error;

/// A copy of the tiny golden model at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn tiny_copy(root: &Path) -> PathBuf {
    let m = root.join("m");
    copy_dir(&golden("tiny-llama"), &m);
    m
}

#[test]
fn overwrite_never_deletes_the_convert_input() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let spec = m.to_str().unwrap();
    for (out, needle) in [
        (d.path().to_path_buf(), "contains the --model input"),
        (m.clone(), "is the --model input"),
        (m.join("sub"), "lies inside the --model input"),
    ] {
        let e = commands::convert(spec, &out, true).unwrap_err().to_string();
        assert!(e.contains(needle), "{}: {e}", out.display());
        assert!(m.join("model.safetensors").exists(), "input deleted");
    }
    // The same through a relative path with `..`.
    let rel = m.join("..").join("m");
    let e = commands::convert(spec, &rel, true).unwrap_err().to_string();
    assert!(e.contains("is the --model input"), "{e}");
    assert!(m.join("config.json").exists());
}

#[test]
fn overwrite_replaces_only_an_earlier_output_and_only_on_success() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let out = d.path().join("out");
    commands::convert(m.to_str().unwrap(), &out, false).unwrap();
    // A second run replaces the earlier output with --overwrite only.
    assert!(matches!(
        commands::convert(m.to_str().unwrap(), &out, false),
        Err(Error::OutputExists(_))
    ));
    commands::convert(m.to_str().unwrap(), &out, true).unwrap();
    assert!(out.join("model.safetensors").exists());
    // A directory that is not an earlier output is not emptied.
    let notes = d.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), b"keep").unwrap();
    let e = commands::convert(m.to_str().unwrap(), &notes, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an earlier output"), "{e}");
    assert!(notes.join("todo.txt").exists());
    // A failed run leaves the previous output as it was (the model fails to load here).
    std::fs::write(m.join("config.json"), b"{ not json").unwrap();
    assert!(commands::convert(m.to_str().unwrap(), &out, true).is_err());
    assert!(out.join("model.safetensors").exists());
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary siblings left: {left:?}");
}

fn analyze_args(out: &Path, adapter: &Path) -> AnalyzeArgs {
    AnalyzeArgs {
        model: golden("tiny-llama").to_string_lossy().into_owned(),
        adapter: Some(adapter.to_path_buf()),
        out: out.to_path_buf(),
        s: 2,
        bins: 8,
        overwrite: true,
        ..Default::default()
    }
}

#[test]
fn overwrite_never_deletes_the_analyze_inputs() {
    let d = tempfile::tempdir().unwrap();
    let adapter = d.path().join("adapter");
    copy_dir(&golden("tiny-lora"), &adapter);
    for out in [adapter.clone(), d.path().to_path_buf(), adapter.join("x")] {
        let e = analyze_cmd::run(&analyze_args(&out, &adapter))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the --adapter input"), "{e}");
    }
    let e = analyze_cmd::run(&analyze_args(&golden("tiny-llama").join("a"), &adapter))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lies inside the --model input"), "{e}");
    assert!(adapter.join("adapter_model.safetensors").exists());
}

#[test]
fn analyze_bins_zero_is_refused_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let mut a = analyze_args(&d.path().join("out"), &golden("tiny-lora"));
    a.bins = 0;
    let e = analyze_cmd::run(&a).unwrap_err().to_string();
    assert!(e.contains("--bins"), "{e}");
    assert!(!d.path().join("out").exists());
}
