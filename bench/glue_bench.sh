#!/usr/bin/env bash
# Encoder training, lora-dash next to PyTorch+PEFT on the same machine, ratios printed at the
# end: all-MiniLM-L6-v2 (BERT) with a 2-label classifier, LoRA r=8 on query,key,value, RTE
# train, batch 32, cutoff 128, each tool at its defaults otherwise (lora-dash groups batches
# by length; PEFT's script pads batches of consecutive rows to their longest row). Also per
# round lora-dash with `--group-by-length false` and LoRA-Dash's dash phase on the same batches.
# Runs are interleaved so background load hits every side alike; medians over rounds.
#
#   PYTHON=path/to/python bench/glue_bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
py="${PYTHON:-python3}"
model="${LORA_DASH_MINILM:-$(./scripts/fetch-minilm.sh)}"
data="${LORA_DASH_DATA:-../shared/data}/glue/rte/train.tsv"
if [ -z "${LORA_DASH_BIN:-}" ]; then
  cargo build --release -q --bin lora-dash
fi
bin="${LORA_DASH_BIN:-${CARGO_TARGET_DIR:-target}/release/lora-dash}"
out="$(mktemp -d)"
common=(--model "$model" --task rte --data "$data" --batch-size 32 --cutoff-len 128 --rank 8
        --alpha 16 --target-modules query,key,value --lr 5e-4 --schedule constant
        --max-steps 12 --skip 2)
peft() { "$py" bench/peft_glue_bench.py --model "$model" --data "$data" "$@" 2>/dev/null |
         "$py" -c 'import json, sys; r = json.load(sys.stdin); r.pop("losses", None); print(json.dumps(r))'; }
run() { local name="$1"; shift; echo -n "$name: "; "$@" | tail -1 | tee -a "$out/$name.jsonl"; }
for r in $(seq "$rounds"); do
  echo "round $r (load $(cut -d' ' -f1-3 /proc/loadavg))"
  run lora-dash          "$bin" bench "${common[@]}" 2>/dev/null
  run pytorch-peft       peft --steps 10 --warmup 2
  run lora-dash-nogroup  "$bin" bench "${common[@]}" --group-by-length false 2>/dev/null
  run lora-dash-dash     "$bin" bench "${common[@]}" --method dash --dash-t 2 --dash-s 8 2>/dev/null
done
echo
"$py" bench/summarize.py "$out" \
  "lora-dash=pytorch-peft:defaults" \
  "lora-dash-nogroup=pytorch-peft:random batches" \
  "lora-dash-dash=lora-dash:dash phase over LoRA, same batches"
echo "(raw JSON lines in $out)"
