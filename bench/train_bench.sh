#!/usr/bin/env bash
# Training throughput and memory, lora-dash next to PyTorch+PEFT on the same machine:
# SmolLM2-135M-Instruct, LoRA r=8 on q,k,v,up,down, batch 4, cutoff 256, ARC-Easy train.
# Then LoRA-Dash's per-step overhead (dash phase vs plain LoRA on the same batches).
# Runs are interleaved (A B A B) so background load hits both sides alike.
#
#   PYTHON=path/to/python bench/train_bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
py="${PYTHON:-python3}"
gguf="${LORA_DASH_SMOLLM2_GGUF:-$(./scripts/fetch-smollm2.sh)}"
data="../shared/data/commonsense/ARC-Easy/train.json"
cargo build --release -q
bin=target/release/lora-dash
common=(--model "$gguf" --data "$data" --batch-size 4 --cutoff-len 256 --rank 8 --alpha 16
        --target-modules q_proj,k_proj,v_proj,up_proj,down_proj --lr 3e-4 --schedule constant)
for r in $(seq "$rounds"); do
  echo "round $r"
  echo -n "lora-dash lora: "; "$bin" bench "${common[@]}" --max-steps 22 --skip 2 2>/dev/null
  echo -n "pytorch+peft:   "; "$py" bench/peft_bench.py --gguf "$gguf" --steps 20 --warmup 2 2>/dev/null |
    "$py" -c 'import json, sys; r = json.load(sys.stdin); r.pop("losses", None); print(json.dumps(r))'
  echo -n "lora-dash dash: "; "$bin" bench "${common[@]}" --method dash --dash-t 2 --dash-s 8 --max-steps 22 --skip 2 2>/dev/null
done
