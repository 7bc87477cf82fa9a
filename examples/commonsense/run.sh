#!/usr/bin/env bash
# The LoRA-Dash paper's commonsense protocol at small scale, on SmolLM2-135M-Instruct:
#   1. fine-tune with LoRA and with LoRA-Dash on the commonsense train files (one shuffled mix),
#   2. evaluate the base model and both fine-tunes on the commonsense test files
#      (generate mode: Alpaca prompt, greedy, 32 new tokens, first answer word counts),
#   3. print one table (accuracy per task and the average).
# Both runs see the same batches (same seed); they differ only from the switch at step DASH_T.
#
#   examples/commonsense/run.sh [OUT]          # OUT defaults to runs/commonsense
#
# Scale knobs (environment): STEPS (optimizer steps, 1000), DASH_T (pre-launch, 100), DASH_S (8),
# LIMIT (test records per task, 200; `all` for whole files), BEAMS (1 = greedy; 4 = the authors' beam search),
# DATA (the directory holding <task>/{train,test}.json, ../shared/data/commonsense),
# BIN (the lora-dash binary; built with `cargo build --release` when unset), JOBS (2 runs the
# two fine-tunes, then the two fine-tuned evaluations, side by side on one thread each: on
# 2 cores that is faster than one after the other on two threads; default 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/commonsense}"
data="${DATA:-../shared/data/commonsense}"
steps="${STEPS:-1000}"
dash_t="${DASH_T:-100}"
dash_s="${DASH_S:-8}"
limit="${LIMIT:-200}"
beams="${BEAMS:-1}"
jobs="${JOBS:-1}"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/lora-dash; fi
gguf="${LORA_DASH_SMOLLM2_GGUF:-$(./scripts/fetch-smollm2.sh)}"

train_files=()
for t in boolq ARC-Easy ARC-Challenge openbookqa piqa social_i_qa hellaswag winogrande; do
  [ -f "$data/$t/train.json" ] && train_files+=("$data/$t/train.json")
done
test_files=()
for t in boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa; do
  [ -f "$data/$t/test.json" ] && test_files+=("$data/$t/test.json")
done
[ ${#train_files[@]} -gt 0 ] || { echo "no <task>/train.json under $data" >&2; exit 1; }

# The paper's LoRA settings (r, target modules, cutoff, lr), scaled down in rank, batch and length.
common=(--model "$gguf" --data "${train_files[@]}" --rank 8 --alpha 16 --dropout 0.05
        --target-modules q_proj,k_proj,v_proj,up_proj,down_proj --batch-size 4 --cutoff-len 256
        --lr 3e-4 --warmup-steps 10 --schedule linear --max-steps "$steps"
        --val-set-size 64 --eval-every 100 --seed 42)
ev=(--model "$gguf" --data "${test_files[@]}" --mode generate --num-beams "$beams")
[ "$limit" = all ] || ev+=(--limit "$limit")
mkdir -p "$out"

# Runs "$@" (a lora-dash command writing $out/$name) unless $out/$name/$done exists, so an
# interrupted recipe resumes where it stopped; with JOBS=2 in the background on one thread,
# logging to $out/$name.log (`finish` waits and fails if any of them failed).
pids=()
step() {
  local name="$1" done="$2"; shift 2
  [ -e "$out/$name/$done" ] && return 0
  if [ "$jobs" -gt 1 ]; then
    RAYON_NUM_THREADS=1 "$@" >"$out/$name.log" 2>&1 &
    pids+=($!)
  else
    "$@"
  fi
}
finish() {
  for p in "${pids[@]}"; do wait "$p" || { echo "a background step failed: see $out/*.log" >&2; exit 1; }; done
  pids=()
}
step lora adapter_model.safetensors \
  "$BIN" train "${common[@]}" --method lora --out "$out/lora" --overwrite
step dash dash_adapter.safetensors \
  "$BIN" train "${common[@]}" --method dash --dash-t "$dash_t" --dash-s "$dash_s" --out "$out/dash" --overwrite
finish
step eval-lora results.json "$BIN" eval "${ev[@]}" --adapter "$out/lora" --out "$out/eval-lora" --overwrite
step eval-dash results.json "$BIN" eval "${ev[@]}" --adapter "$out/dash" --out "$out/eval-dash" --overwrite
finish
jobs=1
step eval-base results.json "$BIN" eval "${ev[@]}" --out "$out/eval-base" --overwrite

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = [("base (zero-shot)", "eval-base"), ("LoRA r=8", "eval-lora"), ("LoRA-Dash r=8, s=8", "eval-dash")]
res = {name: json.load(open(f"{out}/{d}/results.json")) for name, d in runs}
found = [k for k, v in res[runs[0][0]].items() if isinstance(v, dict)]
paper = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
tasks = [t for t in paper if t in found] + [t for t in found if t not in paper]
print("| model | " + " | ".join(tasks) + " | average |")
print("| --- " * (len(tasks) + 2) + "|")
for name, _ in runs:
    r = res[name]
    cells = [f"{100 * r[t]['accuracy']:.1f}" for t in tasks]
    print(f"| {name} | " + " | ".join(cells) + f" | {100 * r['average']:.1f} |")
print("records per task: " + ", ".join(f"{t} {res[runs[0][0]][t]['total']}" for t in tasks))
PY
