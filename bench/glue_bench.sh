#!/usr/bin/env bash
# Encoder training throughput and memory, lora-dash next to PyTorch+PEFT on the same machine:
# all-MiniLM-L6-v2 (BERT) with a 2-label classifier, LoRA r=8 on query,key,value, RTE train,
# batch 32, cutoff 128 (batches padded to their longest row). Then LoRA-Dash's dash phase.
# Runs are interleaved (A B A B) so background load hits both sides alike.
#
#   PYTHON=path/to/python bench/glue_bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
py="${PYTHON:-python3}"
model="${LORA_DASH_MINILM:-$(./scripts/fetch-minilm.sh)}"
data="${GLUE:-../shared/data/glue}/rte/train.tsv"
cargo build --release -q
bin="${CARGO_TARGET_DIR:-target}/release/lora-dash"
common=(--model "$model" --task rte --data "$data" --batch-size 32 --cutoff-len 128 --rank 8
        --alpha 16 --target-modules query,key,value --lr 5e-4 --schedule constant)
for r in $(seq "$rounds"); do
  echo "round $r"
  echo -n "lora-dash lora: "; "$bin" bench "${common[@]}" --max-steps 12 --skip 2 2>/dev/null
  echo -n "pytorch+peft:   "; "$py" bench/peft_glue_bench.py --model "$model" --data "$data" \
    --steps 10 --warmup 2 2>/dev/null |
    "$py" -c 'import json, sys; r = json.load(sys.stdin); r.pop("losses", None); print(json.dumps(r))'
  echo -n "lora-dash dash: "; "$bin" bench "${common[@]}" --method dash --dash-t 2 --dash-s 8 --max-steps 12 --skip 2 2>/dev/null
done
