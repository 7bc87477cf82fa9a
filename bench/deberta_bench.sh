#!/usr/bin/env bash
# DeBERTa-v3 training throughput, lora-dash next to PyTorch+PEFT on the same machine: a
# random base-sized DeBERTa-v3 (hidden 768, 12 layers, 12 heads, intermediate 3072, 256
# position buckets, max_relative_positions 512, share_att_key, p2c|c2p, relative LayerNorm;
# built by bench/peft_deberta_bench.py --make) with a 2-label head, LoRA r=8 on
# query_proj,key_proj,value_proj, RTE train, batch 32, cutoff 128. Runs back to back; prints
# each side's JSON, the tokens/s ratio and the machine load (uptime) around the runs.
#
#   PYTHON=path/to/python bench/deberta_bench.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-6}"
py="${PYTHON:-python3}"
data="${GLUE:-../shared/data/glue}/rte/train.tsv"
cargo build --release -q
bin="${CARGO_TARGET_DIR:-target}/release/lora-dash"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" bench/peft_deberta_bench.py --make "$tmp/deberta-v3-base-random" 2>/dev/null
model="$tmp/deberta-v3-base-random"
uptime
ours=$("$bin" bench --model "$model" --task rte --data "$data" --batch-size 32 --cutoff-len 128 \
  --rank 8 --alpha 16 --target-modules query_proj,key_proj,value_proj --lr 5e-4 \
  --schedule constant --max-steps $((steps + 2)) --skip 2 2>/dev/null)
echo "lora-dash lora: $ours"
uptime
theirs=$("$py" bench/peft_deberta_bench.py --model "$model" --data "$data" --steps "$steps" --warmup 2 2>/dev/null)
echo "pytorch+peft:   $theirs"
uptime
"$py" -c 'import json, sys
a, b = (json.loads(x)["tokens_per_s"] for x in sys.argv[1:3])
print(f"tokens/s: lora-dash {a:.1f}, pytorch+peft {b:.1f}, ratio {a / b:.2f}x")' "$ours" "$theirs"
