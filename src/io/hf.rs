//! Hugging Face model directories (`config.json`, safetensors, `tokenizer.json`), the hub cache
//! (`models--org--name/refs/main` + `snapshots/<rev>/`, as `huggingface_hub` lays it out),
//! downloads through `hf-hub`, and writing a model back as a Hugging Face directory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{json, Value};

use crate::error::{clip, Error, IoContext, Result};
use crate::io::atomic::{write_file, StagedDir};
use crate::io::{gguf, gguf_tokenizer, LoadedModel, SourceKind, TextTokenizer, Weights};
use crate::models::config::HfConfig;

const INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads a model directory, a `.gguf` file or a hub id `org/name` (cache first, then download
/// unless `LORA_DASH_OFFLINE` or `HF_HUB_OFFLINE` is set).
pub fn load_model(spec: &str) -> Result<LoadedModel> {
    load_model_from(spec, &hub_cache_root(), !offline())
}

/// [`load_model`] with an explicit hub cache and download switch.
pub fn load_model_from(spec: &str, cache_root: &Path, allow_download: bool) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.is_dir() {
        return load_dir(path);
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return gguf::load(path);
        }
        if path.file_name().is_some_and(|n| n == "config.json") {
            return load_dir(path.parent().unwrap_or(Path::new(".")));
        }
        return Err(Error::format(
            path,
            "expected a model directory, a .gguf file or a hub id `org/name`",
        ));
    }
    if is_hub_id(spec) {
        let dir = resolve_hub(spec, cache_root, allow_download)?;
        return load_dir(&dir);
    }
    Err(Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
    ))
}

fn offline() -> bool {
    ["LORA_DASH_OFFLINE", "HF_HUB_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false)
    })
}

/// Whether `spec` has the shape of a hub model id `org/name`.
pub fn is_hub_id(spec: &str) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(spec.split_once('/'), Some((org, name)) if ok_part(org) && ok_part(name))
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Weight files a snapshot directory needs, when its index (if any) can be read.
fn has_weights(dir: &Path) -> bool {
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    match shard_names(&dir.join(INDEX_FILE)) {
        Ok(shards) => shards.iter().all(|s| dir.join(s).is_file()),
        Err(_) => false,
    }
}

/// The cached snapshot of `id` under `cache_root` that has a config and all its weights:
/// the one `refs/main` names, else the most recently modified complete one.
pub fn resolve_hub_cache(id: &str, cache_root: &Path) -> Option<PathBuf> {
    let repo = cache_root.join(format!("models--{}", id.replace('/', "--")));
    let complete = |d: &Path| d.join("config.json").is_file() && has_weights(d);
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let snap = repo.join("snapshots").join(rev.trim());
        if complete(&snap) {
            return Some(snap);
        }
    }
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> =
        std::fs::read_dir(repo.join("snapshots"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| complete(p))
            .map(|p| {
                (
                    p.metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH),
                    p,
                )
            })
            .collect();
    snaps.sort();
    snaps.pop().map(|(_, p)| p)
}

/// The local snapshot directory of hub model `id`, downloading it when allowed.
pub fn resolve_hub(id: &str, cache_root: &Path, allow_download: bool) -> Result<PathBuf> {
    if let Some(dir) = resolve_hub_cache(id, cache_root) {
        return Ok(dir);
    }
    if !allow_download {
        return Err(Error::msg(format!(
            "could not download {id} (offline?); pass a local directory or .gguf file ({} has no complete copy, and downloads are off)",
            cache_root.display()
        )));
    }
    download(id, cache_root)
}

#[cfg(feature = "hub")]
fn download(id: &str, cache_root: &Path) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let fail = |e: &dyn std::fmt::Display| {
        Error::msg(format!(
            "could not download {id} (offline?); pass a local directory or .gguf file ({e})"
        ))
    };
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache_root.to_path_buf()));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| fail(&e))?;
    let repo = api.model(id.to_string());
    let info = repo.info().map_err(|e| fail(&e))?;
    let files: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let config = repo.get("config.json").map_err(|e| fail(&e))?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if files.contains(f) {
            repo.get(f).map_err(|e| fail(&e))?;
        }
    }
    if files.contains("model.safetensors") {
        repo.get("model.safetensors").map_err(|e| fail(&e))?;
    } else if files.contains(INDEX_FILE) {
        let index = repo.get(INDEX_FILE).map_err(|e| fail(&e))?;
        for shard in shard_names(&index)? {
            repo.get(&shard).map_err(|e| fail(&e))?;
        }
    } else if files
        .iter()
        .any(|f| f.starts_with("pytorch_model") && f.ends_with(".bin"))
    {
        return Err(Error::msg(format!(
            "{id} only has PyTorch .bin weights; convert them to safetensors first"
        )));
    } else {
        return Err(Error::msg(format!(
            "{id} has no model.safetensors or {INDEX_FILE}"
        )));
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(not(feature = "hub"))]
fn download(id: &str, _cache_root: &Path) -> Result<PathBuf> {
    Err(Error::msg(format!(
        "could not download {id} (built without the `hub` feature); pass a local directory or .gguf file"
    )))
}

/// Shard file names listed in a safetensors index's `weight_map`, sorted and deduplicated.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).at(index)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("invalid JSON: {}", clip(&e.to_string()))))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(index, format!("`{}` maps to a non-string", clip(tensor)))
        })?;
        // Shards are plain names in the same directory; anything else could escape it.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(Error::format(
                index,
                format!("shard name `{}` is not a plain file name", clip(file)),
            ));
        }
        names.insert(file.to_string());
    }
    Ok(names.into_iter().collect())
}

/// Loads a Hugging Face model directory.
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).at(&config_path)?;
    let config = HfConfig::from_json_str(&text, &config_path)?;
    let config_json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&config_path, format!("invalid config.json: {e}")))?;
    let mut weights = Weights::for_model(Some(dir.to_path_buf()));
    let single = dir.join("model.safetensors");
    let index = dir.join(INDEX_FILE);
    if single.is_file() {
        Weights::read_safetensors(&single, &mut weights)?;
    } else if index.is_file() {
        for shard in shard_names(&index)? {
            Weights::read_safetensors(&dir.join(shard), &mut weights)?;
        }
    } else if dir.join("pytorch_model.bin").is_file()
        || dir.join("pytorch_model.bin.index.json").is_file()
    {
        return Err(Error::format(
            dir,
            "only PyTorch .bin weights found; save the model with safetensors (save_pretrained(..., safe_serialization=True))",
        ));
    } else {
        return Err(Error::format(
            dir,
            format!("no model.safetensors or {INDEX_FILE}"),
        ));
    }
    check_loaded(&config, &weights)?;
    let tokenizer = load_tokenizer_dir(dir, &config)?;
    Ok(LoadedModel {
        config,
        config_json,
        weights,
        tokenizer,
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    })
}

/// Checks a model as read from disk before anything is built from it: a LLaMA-family
/// config must resolve and match the tensors present (`LlamaConfig::check_weights`).
/// Architectures this resolver does not know are left to the loader that handles them.
pub fn check_loaded(config: &HfConfig, weights: &Weights) -> Result<()> {
    match config.resolve() {
        Ok(c) => c.check_weights(weights),
        Err(Error::UnknownArchitecture(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A token given in `tokenizer_config.json` as a string or as an `AddedToken` object.
fn token_string(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

fn first_id(v: &Option<Value>) -> Option<u32> {
    match v.as_ref()? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

/// The tokenizer of a model directory, None when it has no `tokenizer.json`. Special ids come
/// from `tokenizer_config.json`, else from `config.json`. For the Llama tokenizer classes BOS
/// and EOS follow `add_bos_token` / `add_eos_token`, as transformers' `LlamaTokenizerFast`
/// rebuilds its post-processor from them; other classes keep `tokenizer.json`'s own.
pub fn load_tokenizer_dir(dir: &Path, config: &HfConfig) -> Result<Option<TextTokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let mut inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        Error::format(
            &path,
            format!("invalid tokenizer: {}", clip(&e.to_string())),
        )
    })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tc: Value = if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::format(&cfg_path, format!("invalid JSON: {}", clip(&e.to_string())))
        })?
    } else {
        json!({})
    };
    let id_of = |key: &str, fallback: &Option<Value>| {
        token_string(tc.get(key))
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| first_id(fallback))
    };
    let bos_id = id_of("bos_token", &config.bos_token_id);
    let eos_id = id_of("eos_token", &config.eos_token_id);
    let pad_id = id_of("pad_token", &config.pad_token_id);

    let class = tc
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("");
    if matches!(
        class,
        "LlamaTokenizer" | "LlamaTokenizerFast" | "CodeLlamaTokenizer" | "CodeLlamaTokenizerFast"
    ) {
        let add_bos = tc
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let add_eos = tc
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let named = |id: Option<u32>, on: bool| {
            id.filter(|_| on)
                .and_then(|i| inner.id_to_token(i).map(|t| (t, i)))
        };
        let (bos, eos) = (named(bos_id, add_bos), named(eos_id, add_eos));
        let mut v: Value = serde_json::from_str(
            &inner
                .to_string(false)
                .map_err(|e| Error::format(&path, e.to_string()))?,
        )?;
        v["post_processor"] = gguf_tokenizer::template_post_processor(
            bos.as_ref().map(|(t, i)| (t.as_str(), *i)),
            eos.as_ref().map(|(t, i)| (t.as_str(), *i)),
        );
        inner = v.to_string().parse().map_err(|e: tokenizers::Error| {
            Error::format(
                &path,
                format!("invalid tokenizer: {}", clip(&e.to_string())),
            )
        })?;
    }
    // Whether BOS is prepended is whatever the final post-processor does.
    let add_bos = match bos_id {
        Some(b) => {
            let with = inner
                .encode("a", true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let without = inner
                .encode("a", false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            with.get_ids().first() == Some(&b) && without.get_ids().first() != Some(&b)
        }
        None => false,
    };
    Ok(Some(TextTokenizer {
        inner,
        bos_id,
        eos_id,
        pad_id,
        add_bos,
    }))
}

/// Marker of an earlier Hugging Face directory output: `--overwrite` replaces only those.
pub const HF_OUTPUT_MARKERS: &[&str] = &["config.json"];

/// Writes `weights` (with `model`'s config and tokenizer) as a Hugging Face directory that
/// transformers loads: `config.json`, f32 `model.safetensors` (without `lm_head.weight` when
/// the embeddings are tied), and `tokenizer.json` + `tokenizer_config.json` when there is a
/// tokenizer. The directory appears whole or not at all, and `out` must stay clear of the
/// model it was loaded from (see [`crate::io::outpath`]).
pub fn write_hf_dir(
    model: &LoadedModel,
    weights: &Weights,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let stage = crate::io::outpath::stage_output(
        out,
        overwrite,
        &[("--model", &model.path)],
        HF_OUTPUT_MARKERS,
    )?;
    write_hf_into(model, weights, stage)?;
    Ok(())
}

/// [`write_hf_dir`] into an output already staged (and checked against every input) with
/// [`crate::io::outpath::stage_output`]; commits it and returns the final directory.
pub fn write_hf_into(model: &LoadedModel, weights: &Weights, stage: StagedDir) -> Result<PathBuf> {
    // The directory is written as a llama checkpoint: refuse anything that is not one.
    model.config.resolve()?;
    let mut config = model.config.clone();
    config.architectures = Some(vec!["LlamaForCausalLM".into()]);
    config.model_type = Some("llama".into());
    config.torch_dtype = Some("float32".into());
    config.hidden_act.get_or_insert_with(|| "silu".into());
    let mut cv = serde_json::to_value(&config)?;
    if let Value::Object(m) = &mut cv {
        // Unset optional fields are left out rather than written as null.
        m.retain(|_, v| !v.is_null());
    }
    write_hf_into_with_config(model, &cv, weights, stage)
}

/// [`write_hf_dir`] with the `config.json` given (any architecture). `lm_head.weight` is left
/// out when the config ties the embeddings.
pub fn write_hf_dir_with_config(
    model: &LoadedModel,
    cv: &Value,
    weights: &Weights,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let stage = crate::io::outpath::stage_output(
        out,
        overwrite,
        &[("--model", &model.path)],
        HF_OUTPUT_MARKERS,
    )?;
    write_hf_into_with_config(model, cv, weights, stage)?;
    Ok(())
}

/// [`write_hf_dir_with_config`] into an already staged output; commits it.
pub fn write_hf_into_with_config(
    model: &LoadedModel,
    cv: &Value,
    weights: &Weights,
    stage: StagedDir,
) -> Result<PathBuf> {
    write_file(
        &stage.join("config.json"),
        serde_json::to_string_pretty(cv)?.as_bytes(),
    )?;
    let tied = cv
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut tensors = Vec::with_capacity(weights.len());
    for (name, t) in weights.iter() {
        if tied && name == "lm_head.weight" {
            continue;
        }
        let t = if t.dtype().is_float() && t.dtype() != DType::F32 {
            t.to_dtype(DType::F32)?
        } else {
            t.clone()
        };
        tensors.push((name.as_str(), t));
    }
    // transformers refuses safetensors files whose metadata lacks format=pt.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::weights::save_tensors(
        tensors.iter().map(|(n, t)| (*n, t)),
        &stage.join("model.safetensors"),
        Some(meta),
    )?;

    if let Some(tok) = &model.tokenizer {
        let text = tok
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        write_file(&stage.join("tokenizer.json"), text.as_bytes())?;
        let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
        let tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "add_eos_token": false,
            "bos_token": name(tok.bos_id),
            "eos_token": name(tok.eos_id),
            "pad_token": name(tok.pad_id),
            "model_max_length": cv.get("max_position_embeddings").cloned().unwrap_or(json!(2048)),
            "clean_up_tokenization_spaces": false,
        });
        write_file(
            &stage.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc)?.as_bytes(),
        )?;
    }
    stage.commit()
}

#[cfg(test)]
mod tests;
