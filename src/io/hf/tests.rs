//! Hugging Face directory round trips and hub-cache resolution (no network: downloads are
//! switched off through `load_model_from`'s parameter).

use std::path::Path;

use super::*;
use crate::io::gguf::testutil::{tiny_id, write_tiny_llama};

fn assert_same_weights(a: &Weights, b: &Weights) {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    let mut max_diff = 0f32;
    for (name, t) in a.iter() {
        let u = b.get(name).unwrap();
        assert_eq!(t.dims(), u.dims(), "{name}");
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        max_diff = max_diff.max(d);
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs (max diff {d:e})"
        );
    }
    println!("{} tensors bit-identical (max diff {max_diff:e})", a.len());
}

fn assert_same_tokenizer(a: &TextTokenizer, b: &TextTokenizer, texts: &[&str]) {
    assert_eq!(
        (a.bos_id, a.eos_id, a.pad_id, a.add_bos),
        (b.bos_id, b.eos_id, b.pad_id, b.add_bos)
    );
    for t in texts {
        assert_eq!(a.encode(t).unwrap(), b.encode(t).unwrap(), "{t:?}");
        assert_eq!(
            a.encode_plain(t).unwrap(),
            b.encode_plain(t).unwrap(),
            "{t:?}"
        );
    }
}

const TEXTS: &[&str] = &[
    "hello world 12",
    "<|im_start|>user\nhi<|im_end|>",
    "  é\t😀 1234",
];

#[test]
fn tiny_gguf_to_hf_dir_round_trips() {
    for tied in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let gguf_path = d.path().join("tiny.gguf");
        write_tiny_llama(&gguf_path, tied, "smollm");
        let model = load_model(gguf_path.to_str().unwrap()).unwrap();
        let out = d.path().join("hf");
        write_hf_dir(&model, &model.weights, &out, false).unwrap();
        let back = load_model(out.to_str().unwrap()).unwrap();
        assert_eq!(back.kind, SourceKind::HfDir);
        assert_eq!(
            back.config.resolve().unwrap(),
            model.config.resolve().unwrap()
        );
        assert_same_weights(&model.weights, &back.weights);
        assert_same_tokenizer(
            model.tokenizer.as_ref().unwrap(),
            back.tokenizer.as_ref().unwrap(),
            TEXTS,
        );

        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(
            (cfg["model_type"].as_str(), cfg["torch_dtype"].as_str()),
            (Some("llama"), Some("float32"))
        );
        assert_eq!(cfg["tie_word_embeddings"], json!(tied));
        assert!(cfg.as_object().unwrap().values().all(|v| !v.is_null()));
        let tc: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
            (Some("<|im_start|>"), Some("<|im_end|>"))
        );

        // Refuses to replace output unless asked.
        assert!(matches!(
            write_hf_dir(&model, &model.weights, &out, false),
            Err(Error::OutputExists(_))
        ));
        write_hf_dir(&model, &model.weights, &out, true).unwrap();
    }
}

#[test]
fn tied_lm_head_is_not_written() {
    let d = tempfile::tempdir().unwrap();
    let gguf_path = d.path().join("tiny.gguf");
    write_tiny_llama(&gguf_path, true, "smollm");
    let model = load_model(gguf_path.to_str().unwrap()).unwrap();
    let mut w = model.weights.clone();
    w.insert(
        "lm_head.weight",
        w.get("model.embed_tokens.weight").unwrap().clone(),
    );
    let out = d.path().join("hf");
    write_hf_dir(&model, &w, &out, false).unwrap();
    let back = Weights::load_safetensors(&out.join("model.safetensors")).unwrap();
    assert!(!back.contains("lm_head.weight"));
    assert_eq!(back.len(), model.weights.len());
}

#[test]
fn sharded_dirs_and_missing_files() {
    let d = tempfile::tempdir().unwrap();
    let gguf_path = d.path().join("tiny.gguf");
    write_tiny_llama(&gguf_path, true, "smollm");
    let model = load_model(gguf_path.to_str().unwrap()).unwrap();
    let dir = d.path().join("sharded");
    write_hf_dir(&model, &model.weights, &dir, false).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    // Two shards plus the index transformers writes.
    let names: Vec<&String> = model.weights.names().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let ts: Vec<(&str, &candle_core::Tensor)> = part
            .iter()
            .map(|n| (n.as_str(), model.weights.get(n).unwrap()))
            .collect();
        crate::io::weights::save_tensors(ts.into_iter(), &dir.join(shard), None).unwrap();
        for n in part {
            map.insert(n.to_string(), json!(shard));
        }
    }
    std::fs::write(
        dir.join(INDEX_FILE),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let back = load_model(dir.to_str().unwrap()).unwrap();
    assert_same_weights(&model.weights, &back.weights);

    // PyTorch-only directories get a pointer to safetensors.
    std::fs::remove_file(dir.join(INDEX_FILE)).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
    let e = load_model(dir.to_str().unwrap()).err().unwrap().to_string();
    assert!(e.contains("safetensors"), "{e}");
    // No tokenizer.json: the model still loads, without a tokenizer.
    let bare = d.path().join("bare");
    write_hf_dir(
        &LoadedModel {
            tokenizer: None,
            ..load_model(gguf_path.to_str().unwrap()).unwrap()
        },
        &model.weights,
        &bare,
        false,
    )
    .unwrap();
    assert!(load_model(bare.to_str().unwrap())
        .unwrap()
        .tokenizer
        .is_none());
    // A missing path names itself.
    let missing = d.path().join("nope");
    match load_model(missing.to_str().unwrap()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an I/O error, got {:?}", other.err()),
    }
}

#[test]
fn llama_tokenizer_class_follows_add_bos_token() {
    let d = tempfile::tempdir().unwrap();
    let gguf_path = d.path().join("tiny.gguf");
    write_tiny_llama(&gguf_path, true, "smollm");
    let model = load_model(gguf_path.to_str().unwrap()).unwrap();
    let dir = d.path().join("hf");
    write_hf_dir(&model, &model.weights, &dir, false).unwrap();
    let tc = json!({"tokenizer_class": "LlamaTokenizerFast", "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let tok = load_model(dir.to_str().unwrap())
        .unwrap()
        .tokenizer
        .unwrap();
    // LlamaTokenizerFast defaults add_bos_token to true.
    assert!(tok.add_bos);
    assert_eq!(tok.encode("hello").unwrap(), [1, tiny_id("hello")]);
    assert_eq!(tok.encode_plain("hello").unwrap(), [tiny_id("hello")]);
}

fn fake_snapshot(root: &Path, id: &str, rev: &str, model: &LoadedModel) -> PathBuf {
    let snap = root
        .join(format!("models--{}", id.replace('/', "--")))
        .join("snapshots")
        .join(rev);
    write_hf_dir(model, &model.weights, &snap, false).unwrap();
    snap
}

#[test]
fn hub_ids_resolve_from_the_cache_and_fail_clearly_offline() {
    for (s, ok) in [
        ("org/name", true),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", true),
        ("a/b.c_d-1", true),
        ("name", false),
        ("/abs/path", false),
        ("org/", false),
        ("../x", false),
        ("a/b/c", false),
        ("a/..b", false),
    ] {
        assert_eq!(is_hub_id(s), ok, "{s}");
    }
    let d = tempfile::tempdir().unwrap();
    let gguf_path = d.path().join("tiny.gguf");
    write_tiny_llama(&gguf_path, true, "smollm");
    let model = load_model(gguf_path.to_str().unwrap()).unwrap();
    let root = d.path().join("hub");

    // refs/main names the snapshot.
    let snap = fake_snapshot(&root, "org/tiny", "abc123", &model);
    let refs = root.join("models--org--tiny").join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "abc123\n").unwrap();
    assert_eq!(resolve_hub_cache("org/tiny", &root), Some(snap.clone()));
    let loaded = load_model_from("org/tiny", &root, false).unwrap();
    assert_eq!(loaded.path, snap);
    assert_same_weights(&model.weights, &loaded.weights);

    // A ref to an incomplete snapshot falls back to a complete one.
    std::fs::write(refs.join("main"), "def456").unwrap();
    let partial = root
        .join("models--org--tiny")
        .join("snapshots")
        .join("def456");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(snap.join("config.json"), partial.join("config.json")).unwrap();
    assert_eq!(resolve_hub_cache("org/tiny", &root), Some(snap));

    // Config without weights is not a usable copy; with downloads off the error says what to do.
    let only_cfg = root
        .join("models--org--partial")
        .join("snapshots")
        .join("r1");
    std::fs::create_dir_all(&only_cfg).unwrap();
    std::fs::write(only_cfg.join("config.json"), "{}").unwrap();
    assert_eq!(resolve_hub_cache("org/partial", &root), None);
    for id in ["org/missing", "org/partial"] {
        let e = load_model_from(id, &root, false).err().unwrap().to_string();
        assert!(
            e.contains(&format!(
                "could not download {id} (offline?); pass a local directory or .gguf file"
            )),
            "{e}"
        );
    }
}

#[test]
fn smollm2_gguf_to_hf_dir_round_trips() {
    let Some(path) = crate::io::gguf::tests::smollm2_gguf() else {
        return;
    };
    let model = load_model(path.to_str().unwrap()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("smollm2");
    write_hf_dir(&model, &model.weights, &out, false).unwrap();
    let back = load_model(out.to_str().unwrap()).unwrap();
    assert_eq!(
        back.config.resolve().unwrap(),
        model.config.resolve().unwrap()
    );
    assert_same_weights(&model.weights, &back.weights);
    assert_same_tokenizer(
        model.tokenizer.as_ref().unwrap(),
        back.tokenizer.as_ref().unwrap(),
        &[
            "Hello, world! 123",
            "<|im_start|>user",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        ],
    );
}
