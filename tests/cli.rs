//! The binary's boundary: bad input is a clear error and a non-zero exit, with nothing
//! half-written; flags and the TOML config combine as documented.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::golden;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-dash"))
}

fn tiny() -> String {
    golden("tiny-llama").to_string_lossy().into_owned()
}

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
}

/// Runs `lora-dash train` on the tiny model with extra args; returns (ok, stderr).
fn train(extra: &[&str], out: &Path) -> (bool, String) {
    let o = bin()
        .args([
            "train",
            "--model",
            &tiny(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--rank",
            "2",
            "--cutoff-len",
            "32",
            "--max-records",
            "8",
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fails_with(extra: &[&str], out: &Path, needle: &str) {
    let (ok, err) = train(extra, out);
    assert!(!ok, "expected failure for {extra:?}");
    assert!(
        err.contains(needle),
        "error for {extra:?} should mention `{needle}`:\n{err}"
    );
    assert!(!out.exists(), "nothing may be left behind for {extra:?}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let dp = data();
    let ds = dp.to_str().unwrap();
    fails_with(&["--data", "no/such/file.json"], &out, "no/such/file.json");

    let bad = d.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ]"#,
    )
    .unwrap();
    fails_with(&["--data", bad.to_str().unwrap()], &out, "bad.json");

    let no_out = d.path().join("no_output.jsonl");
    std::fs::write(
        &no_out,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n",
    )
    .unwrap();
    fails_with(&["--data", no_out.to_str().unwrap()], &out, "output");

    fails_with(
        &["--data", ds, "--target-modules", "nonexistent_proj"],
        &out,
        "nonexistent_proj",
    );
    fails_with(&["--data", ds, "--method", "prefix"], &out, "prefix");
    fails_with(&["--data", ds, "--schedule", "zigzag"], &out, "zigzag");
    fails_with(&["--data", ds, "--rank", "0"], &out, "rank");

    // Unknown architecture and a tensor of the wrong shape, in copies of the tiny model.
    let model = d.path().join("model");
    copy(&golden("tiny-llama"), &model);
    let cfg = model.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let o = bin()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            ds,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("GPT2LMHeadModel"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        text.replace("\"intermediate_size\": 160", "\"intermediate_size\": 161"),
    )
    .unwrap();
    let o = bin()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            ds,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("gate_proj.weight") && err.contains("161"),
        "{err}"
    );
    assert!(!out.exists());

    // An existing directory that is not a run is never replaced, even with --overwrite.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let (ok, err) = train(&["--data", ds], &out);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert!(out.join("keep").exists());
    let (ok, err) = train(&["--data", ds, "--overwrite"], &out);
    assert!(!ok && err.contains("not an earlier output"), "{err}");
    assert!(out.join("keep").exists());
    // An earlier run is replaced with --overwrite, and kept without it.
    std::fs::remove_dir_all(&out).unwrap();
    let (ok, err) = train(&["--data", ds], &out);
    assert!(ok, "{err}");
    let (ok, err) = train(&["--data", ds], &out);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    let (ok, err) = train(&["--data", ds, "--overwrite"], &out);
    assert!(ok, "{err}");
    assert!(out.join("adapter_model.safetensors").exists());
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn toml_config_is_strict_and_flags_override_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!("model = {:?}\ndata = [{:?}]\nrank = 3\nbatch-size = 2\nmax_steps = 2\ncutoff_len = 32\nmax_records = 8\nalpha = 6.0\n", tiny(), data()),
    )
    .unwrap();
    let out = d.path().join("run");
    let o = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run_config.json")).unwrap())
            .unwrap();
    assert_eq!(run["lora"]["r"], 2, "the flag wins over the file");
    assert_eq!(
        run["lora"]["alpha"].as_f64(),
        Some(6.0),
        "the file fills what flags leave out"
    );
    assert_eq!(run["batch_size"], 2);
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["r"], 2);

    std::fs::write(&cfg, "rank = 3\nlearning_rate = 0.1\n").unwrap();
    let o = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("learning_rate"),
        "{err}"
    );
}

#[test]
fn merge_convert_and_generate_work_on_the_tiny_model() {
    let d = tempfile::tempdir().unwrap();
    let merged = d.path().join("merged");
    let o = bin()
        .args([
            "merge",
            "--model",
            &tiny(),
            "--adapter",
            golden("tiny-lora").to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        merged.join("model.safetensors").exists()
            && merged.join("config.json").exists()
            && merged.join("tokenizer.json").exists()
    );
    // The merged directory gives PEFT's merged logits.
    let g = common::load_golden("tiny_logits.safetensors");
    let want = common::load_golden("tiny_lora_logits.safetensors");
    let loaded = lora_dash::io::load_model(merged.to_str().unwrap()).unwrap();
    let m =
        lora_dash::models::Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap();
    let ids = g
        .get("input_ids")
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let logits = m
        .forward(
            &ids,
            Some(g.get("attention_mask").unwrap()),
            &lora_dash::models::Ctx::eval(),
        )
        .unwrap();
    assert!(
        common::max_rel_diff(
            "merged dir",
            &logits,
            want.get("merged_logits").unwrap(),
            Some(g.get("attention_mask").unwrap())
        ) < 1e-4
    );
    // Refuses to overwrite.
    let o = bin()
        .args([
            "merge",
            "--model",
            &tiny(),
            "--adapter",
            golden("tiny-lora").to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());

    let o = bin()
        .args([
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            "What is 2 + 3?",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "5",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("What is 2 + 3?") && text.contains("Hi"),
        "{text}"
    );
}

/// `--device` (flag and TOML key): `cpu` trains; a malformed value, and `cuda` in a build
/// without the cuda feature (or on a machine without a GPU), are errors that name the flag,
/// with nothing written; every subcommand that loads a model takes the flag.
#[test]
fn device_flag_and_toml_key() {
    let d = tempfile::tempdir().unwrap();
    let data = data();
    let data = data.to_str().unwrap();
    let out = d.path().join("cpu");
    let (ok, err) = train(&["--data", data, "--device", "cpu"], &out);
    assert!(ok, "{err}");
    fails_with(
        &["--data", data, "--device", "tpu"],
        &d.path().join("tpu"),
        "expected cpu, cuda or cuda:N",
    );
    if !cfg!(feature = "cuda") {
        fails_with(
            &["--data", data, "--device", "cuda:0"],
            &d.path().join("cuda"),
            "`cuda:0` is not available",
        );
    }
    let toml = d.path().join("run.toml");
    std::fs::write(&toml, "device = \"gpu0\"\n").unwrap();
    fails_with(
        &["--data", data, "--config", toml.to_str().unwrap()],
        &d.path().join("toml"),
        "device",
    );
    for args in [
        vec!["generate", "--prompt", "1 +", "--max-new-tokens", "2"],
        vec!["eval", "--data", data, "--limit", "1"],
        vec!["selftest"],
    ] {
        let o = bin()
            .args(&args)
            .args(
                ["--model", &tiny(), "--device", "cuda:x"]
                    [usize::from(args[0] == "selftest") * 2..]
                    .iter(),
            )
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains("expected cpu, cuda or cuda:N"),
            "{args:?}: {e}"
        );
    }
}
