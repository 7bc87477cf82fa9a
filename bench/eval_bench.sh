#!/usr/bin/env bash
# Evaluation speed, lora-dash next to transformers on the same prompts: SmolLM2-135M-Instruct
# (Q4_1 GGUF in f32), the first LIMIT records of ARC-Easy test, batch 8, 32 new tokens.
# lora-dash: greedy, beam-4 and likelihood; transformers: `generate` greedy and beam-4 at
# 1 thread, greedy at 2, and the likelihood protocol (bench/hf_likelihood_bench.py) at 1 and
# 2 threads. Prints one line per run (examples/s; model loading is excluded), then the ratios
# lora-dash / transformers per mode, against transformers' faster thread setting.
#
#   PYTHON=path/to/python [LORA_DASH_BIN=path/to/lora-dash] bench/eval_bench.sh [LIMIT]
#
# Without LORA_DASH_BIN the release binary is built first (`cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-100}"
py="${PYTHON:-python3}"
gguf="${LORA_DASH_SMOLLM2_GGUF:-$(./scripts/fetch-smollm2.sh)}"
data="../shared/data/commonsense/ARC-Easy/test.json"
if [ -n "${LORA_DASH_BIN:-}" ]; then
  bin="$LORA_DASH_BIN"
else
  cargo build --release -q
  bin=target/release/lora-dash
fi
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
# transformers runs at 1 and 2 threads, greedy and beam-4; the ratios take its faster
# setting (on a loaded machine 1 thread wins, on an idle one 2 threads do).
for run in "1 1" "1 4" "2 1" "2 4"; do
  read -r threads beams <<<"$run"
  echo -n "transformers generate --num-beams $beams, $threads thread(s): "
  "$py" bench/hf_generate_bench.py --model "$tmp/hf" --data "$data" --limit "$limit" \
    --threads "$threads" --num-beams "$beams" 2>/dev/null | tail -1 | tee "$tmp/hf_gen_${beams}_${threads}.json"
done
for threads in 1 2; do
  echo -n "transformers likelihood, $threads thread(s): "
  "$py" bench/hf_likelihood_bench.py --model "$tmp/hf" --data "$data" --limit "$limit" \
    --threads "$threads" 2>/dev/null | tail -1 | tee "$tmp/hf_ll_${threads}.json"
done
"$py" - "$tmp" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
def ours(name):
    r = json.loads((d / name / "results.json").read_text())
    return [v for v in r.values() if isinstance(v, dict)][0]["examples_per_s"]
def theirs(pattern):
    runs = [json.loads(p.read_text()) for p in sorted(d.glob(pattern))]
    best = max(runs, key=lambda r: r["examples_per_s"])
    return best["examples_per_s"], best["threads"]
print("lora-dash / transformers (transformers at its faster thread setting):")
for label, name, pattern in [
    ("greedy", "generate_--num-beams_1", "hf_gen_1_*.json"),
    ("beam-4", "generate_--num-beams_4", "hf_gen_4_*.json"),
    ("likelihood", "likelihood", "hf_ll_*.json"),
]:
    a, (b, t) = ours(name), theirs(pattern)
    print("  %-10s %.3f / %.3f examples/s = %.2fx (transformers: %d thread(s))" % (label, a, b, a / b, t))
PY
