#!/usr/bin/env bash
# Evaluation speed, lora-dash next to transformers' `generate` on the same prompts:
# SmolLM2-135M-Instruct (Q4_1 GGUF in f32), the first LIMIT records of ARC-Easy test,
# batch 8, 32 new tokens. lora-dash: greedy, beam-4 and likelihood; transformers: greedy and
# beam-4 at 1 thread, greedy at 2. Prints one line per run (examples/s); model loading is excluded.
#
#   PYTHON=path/to/python bench/eval_bench.sh [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-100}"
py="${PYTHON:-python3}"
gguf="${LORA_DASH_SMOLLM2_GGUF:-$(./scripts/fetch-smollm2.sh)}"
data="../shared/data/commonsense/ARC-Easy/test.json"
cargo build --release -q
bin=target/release/lora-dash
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$bin" convert --model "$gguf" --out "$tmp/hf" >/dev/null
rate() { "$py" -c '
import json, sys
r = json.load(open(sys.argv[1]))
t = [v for v in r.values() if isinstance(v, dict)][0]
print("%d/%d correct, %.3f examples/s" % (t["correct"], t["total"], t["examples_per_s"]))' "$1"; }
for mode in "generate --num-beams 1" "generate --num-beams 4" "likelihood"; do
  name="${mode// /_}"
  "$bin" eval --model "$gguf" --data "$data" --limit "$limit" --mode $mode --out "$tmp/$name" >/dev/null 2>&1
  echo "lora-dash $mode: $(rate "$tmp/$name/results.json")"
done
# torch's best setting here is 1 thread (2 threads was slower in every run we made); greedy
# is also timed at 2 threads to show it.
for run in "1 1" "1 4" "2 1"; do
  read -r threads beams <<<"$run"
  echo -n "transformers generate --num-beams $beams, $threads thread(s): "
  "$py" bench/hf_generate_bench.py --model "$tmp/hf" --data "$data" --limit "$limit" \
    --threads "$threads" --num-beams "$beams" 2>/dev/null | tail -1
done
