#!/usr/bin/env bash
# Decoder training, lora-dash next to PyTorch+PEFT on the same machine, ratios printed at the
# end: SmolLM2-135M-Instruct, LoRA r=8 on q,k,v,up,down, batch 4, cutoff 256, ARC-Easy train,
# each tool at its defaults otherwise (lora-dash groups batches by length; PEFT's script pads
# batches of consecutive records). Also, per round:
#   * lora-dash with `--group-by-length false` (random batches, as PEFT's padding);
#   * LoRA-Dash's dash phase (`--method dash --dash-t 2`) against plain LoRA on the same
#     batches: the dash overhead;
#   * kernel-only: both sides on identical synthetic batches (4 × 256 token ids, no padding;
#     `profile_step` without the optimizer step, PEFT with it).
# Runs are interleaved so background load hits every side alike; medians over rounds.
#
#   PYTHON=path/to/python bench/train_bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
py="${PYTHON:-python3}"
gguf="${LORA_DASH_SMOLLM2_GGUF:-$(./scripts/fetch-smollm2.sh)}"
data="${LORA_DASH_DATA:-../shared/data}/commonsense/ARC-Easy/train.json"
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${LORA_DASH_BIN:-}" ]; then
  cargo build --release -q --bin lora-dash --example profile_step
fi
bin="${LORA_DASH_BIN:-$target/release/lora-dash}"
prof="${LORA_DASH_PROFILE_STEP:-$target/release/examples/profile_step}"
out="$(mktemp -d)"
common=(--model "$gguf" --data "$data" --batch-size 4 --cutoff-len 256 --rank 8 --alpha 16
        --target-modules q_proj,k_proj,v_proj,up_proj,down_proj --lr 3e-4 --schedule constant
        --max-steps 22 --skip 2)
peft() { "$py" bench/peft_bench.py --gguf "$gguf" --data "$data" "$@" 2>/dev/null |
         "$py" -c 'import json, sys; r = json.load(sys.stdin); r.pop("losses", None); print(json.dumps(r))'; }
run() { local name="$1"; shift; echo -n "$name: "; "$@" | tail -1 | tee -a "$out/$name.jsonl"; }
for r in $(seq "$rounds"); do
  echo "round $r (load $(cut -d' ' -f1-3 /proc/loadavg))"
  run lora-dash                "$bin" bench "${common[@]}" 2>/dev/null
  run pytorch-peft             peft --steps 20 --warmup 2
  run lora-dash-nogroup        "$bin" bench "${common[@]}" --group-by-length false 2>/dev/null
  run lora-dash-dash           "$bin" bench "${common[@]}" --method dash --dash-t 2 --dash-s 8 2>/dev/null
  run kernel-lora-dash         env T=256 ITERS=4 "$prof" "$gguf"
  run kernel-pytorch-peft      peft --synthetic 256 --steps 3 --warmup 1
done
echo
"$py" bench/summarize.py "$out" \
  "lora-dash=pytorch-peft:defaults" \
  "lora-dash-nogroup=pytorch-peft:random batches" \
  "kernel-lora-dash=kernel-pytorch-peft:kernel-only, identical batches" \
  "lora-dash-dash=lora-dash:dash phase over LoRA, same batches"
echo "(raw JSON lines in $out)"
