#!/usr/bin/env bash
# Checks a CUDA build of lora-dash on a machine with an NVIDIA GPU, in a few minutes, with
# nothing but the binary (no Rust toolchain), python3 (standard library only) and these files:
#
#   scripts/gpu-check.sh [BIN]        # BIN defaults to target/cuda/lora-dash-cuda
#
# 1. `selftest --device cuda`: logits of the tiny LLaMA, BERT and DeBERTa-v2/v3 models on
#    the GPU against the golden files of transformers (tests/golden), ≤ 1e-4 relative.
# 2. 20 training steps of LoRA and of LoRA-Dash (t = 10, s = 8) on SmolLM2-135M-Instruct,
#    ARC-Easy train, batch 4, cutoff 256, r = 8 on q,k,v,up,down, once on the CPU and once
#    on the GPU with the same batches: per-step losses must agree within LOSS_TOL
#    (default 2e-3 relative; both run f32, the GPU's cuBLAS sums in another order, and
#    Adam amplifies last-bit differences of near-zero gradients over the steps).
# 3. tokens/s of each run (from metrics.jsonl), and a summary on stdout and in $OUT (or
#    gpu-check/) as gpu_check.json.
#
# Environment: SMOLLM2_GGUF (default: $LORA_DASH_SMOLLM2_GGUF, else the lora-dash cache),
# DATA (ARC-Easy train.json; default ../shared/data/commonsense/ARC-Easy/train.json),
# DEVICE (cuda; `DEVICE=cpu` dry-runs the script here, the second run then on the
# device-generic path, LORA_DASH_KERNELS=reference), LOSS_TOL, STEPS (20).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/cuda/lora-dash-cuda}"
dev="${DEVICE:-cuda}"
steps="${STEPS:-20}"
tol="${LOSS_TOL:-2e-3}"
gguf="${SMOLLM2_GGUF:-${LORA_DASH_SMOLLM2_GGUF:-${LORA_DASH_CACHE:-$HOME/.cache/lora-dash}/SmolLM2-135M-Instruct.Q4_1.gguf}}"
data="${DATA:-../shared/data/commonsense/ARC-Easy/train.json}"
out="${OUT:-gpu-check}"
for f in "$bin" "$gguf" "$data"; do
  [ -e "$f" ] || { echo "gpu-check: $f not found" >&2; exit 2; }
done
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== selftest on $dev"
"$bin" selftest --device "$dev" --golden tests/golden | tee "$out/selftest.txt"

common=(--model "$gguf" --data "$data" --rank 8 --alpha 16
        --target-modules q_proj,k_proj,v_proj,up_proj,down_proj
        --batch-size 4 --cutoff-len 256 --max-steps "$steps" --lr 3e-4 --seed 1 --overwrite)
for method in lora dash; do
  extra=()
  [ "$method" = dash ] && extra=(--method dash --dash-t $((steps / 2)) --dash-s 8)
  for side in cpu gpu; do
    d=cpu; kernels=fused
    if [ "$side" = gpu ]; then
      d="$dev"
      # A dry run on a machine without a GPU (DEVICE=cpu) takes the device-generic path.
      [ "$dev" = cpu ] && kernels=reference
    fi
    echo "== $method, $steps steps on $d ($kernels kernels)"
    LORA_DASH_KERNELS=$kernels "$bin" train "${common[@]}" "${extra[@]}" --device "$d" \
      --out "$out/$method-$side" >"$out/$method-$side.log" 2>&1 \
      || { tail -20 "$out/$method-$side.log"; exit 1; }
    tail -1 "$out/$method-$side.log"
  done
done

python3 - "$out" "$dev" "$tol" <<'PY'
import json, os, sys
out, dev, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
def recs(d):
    with open(os.path.join(out, d, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r and "step" in r]
summary, ok = {}, True
for m in ("lora", "dash"):
    c, g = recs(f"{m}-cpu"), recs(f"{m}-gpu")
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(c, g))
    tps = lambda rs: sum(r.get("tokens", 0) for r in rs[2:]) / max(sum(r.get("step_s", 0) for r in rs[2:]), 1e-9)
    good = len(c) == len(g) and worst <= tol
    ok &= good
    summary[m] = {"steps": len(g), "max_rel_loss_diff": worst, "tol": tol, "ok": good,
                  "tokens_per_s_cpu": tps(c), "tokens_per_s_gpu": tps(g)}
    print(f"{'ok  ' if good else 'FAIL'} {m}: {len(g)} steps, max rel loss diff cpu vs {dev} {worst:.2e} "
          f"(tol {tol:g}); tokens/s cpu {tps(c):.0f}, {dev} {tps(g):.0f}")
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
sys.exit(0 if ok else 1)
PY
echo "gpu-check: all checks passed; figures in $out/"
