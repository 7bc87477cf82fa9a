#!/usr/bin/env bash
# LoRA vs LoRA-Dash on GLUE at equal rank, the paper's NLU comparison at small scale:
# for every task, rank and seed, one LoRA run and one LoRA-Dash run (t = DASH_T, s = DASH_S)
# on the same batches, each scored on the task's dev file; then one table, mean ± std over
# seeds per task and the average (examples/glue/summarize.py).
#
#   examples/glue/run.sh [OUT]            # OUT defaults to runs/glue
#
# Model: all-MiniLM-L6-v2 by default (MODEL: any BERT or DeBERTa-v2/v3 Hugging Face
# directory; nothing else changes). Targets are the authors': the attention projections,
# the attention output, the intermediate and the layer output; the classifier (and a pooler
# the checkpoint lacks) trains fully.
#
# Per-task settings, from the authors' DeBERTaV3-base scripts (lr / max length / classifier
# dropout / weight decay), with the number of epochs replaced by a step budget that runs
# here in reasonable time (STEPS_<TASK> overrides it; batch 32, linear decay after a 10 %
# warmup):
#   cola  8e-4  / 64  / 0.1  / 0     600 steps (2.2 epochs of 8551)
#   sst2  8e-4  / 128 / 0    / 0.01  600 steps (0.3 epoch of 67349)
#   rte   1.2e-3 / 320 / 0.2 / 0.01  400 steps (5.1 epochs of 2490)
#   qnli  5e-4  / 256 / 0.1  / 0.01  400 steps (2.9 epochs of the 4370-row training split)
# QNLI: only the dev file is at hand, so rows 0, 5, 10, … (1093) are held out for scoring
# and the other 4370 train; the split is written under OUT and said in the table.
# MRPC, STS-B, MNLI and QQP work the same way when their files are under DATA
# (settings below), but are not in the default TASKS.
#
# Knobs (environment): TASKS ("cola rte sst2 qnli"), SEEDS ("1 2 3"), RANKS ("8 1"),
# METHODS ("lora dash"; also dashlrN = LoRA-Dash with --dash-lr-scale N, pissa, milora, dora),
# STEPS_<TASK> and LR_<TASK> (the step budget and learning rate of one task),
# DASH_T (100), DASH_S (8), DATA (../shared/data/glue), BIN (the lora-dash binary; built when
# unset), MODEL. An interrupted study resumes: finished runs (with NAME.eval/results.json)
# are kept. Run it with `nice` on a machine that is not also benchmarking.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/glue}"
data="${DATA:-../shared/data/glue}"
tasks="${TASKS:-cola rte sst2 qnli}"
seeds="${SEEDS:-1 2 3}"
ranks="${RANKS:-8 1}"
dash_t="${DASH_T:-100}"
dash_s="${DASH_S:-8}"
methods="${METHODS:-lora dash}"
model="${MODEL:-$(./scripts/fetch-minilm.sh)}"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/lora-dash; fi
mkdir -p "$out"

case "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_type"])' "$model/config.json")" in
  bert) targets="query,key,value,attention.output.dense,intermediate.dense,output.dense" ;;
  deberta-v2) targets="query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense" ;;
  *) echo "examples/glue: unsupported model_type in $model/config.json" >&2; exit 1 ;;
esac

# task -> "lr max_len classifier_dropout weight_decay steps train dev"
settings() {
  case "$1" in
    cola) echo "8e-4 64 0.1 0 ${STEPS_COLA:-600} $data/cola/in_domain_train.tsv $data/cola/in_domain_dev.tsv" ;;
    sst2) echo "8e-4 128 0 0.01 ${STEPS_SST2:-600} $data/sst2/train.tsv $data/sst2/dev.tsv" ;;
    rte)  echo "1.2e-3 320 0.2 0.01 ${STEPS_RTE:-400} $data/rte/train.tsv $data/rte/dev.tsv" ;;
    qnli) echo "5e-4 256 0.1 0.01 ${STEPS_QNLI:-400} $out/qnli_split/train.tsv $out/qnli_split/heldout.tsv" ;;
    mrpc) echo "1e-3 320 0 0.01 ${STEPS_MRPC:-400} $data/mrpc/train.tsv $data/mrpc/dev.tsv" ;;
    stsb) echo "2.2e-3 128 0.2 0.1 ${STEPS_STSB:-400} $data/stsb/train.tsv $data/stsb/dev.tsv" ;;
    mnli) echo "5e-4 256 0.15 0 ${STEPS_MNLI:-600} $data/mnli/train.tsv $data/mnli/dev_matched.tsv" ;;
    qqp)  echo "8e-4 320 0.15 0.01 ${STEPS_QQP:-600} $data/qqp/train.tsv $data/qqp/dev.tsv" ;;
    *) echo "examples/glue: unknown task $1" >&2; exit 1 ;;
  esac
}

if [[ " $tasks " == *" qnli "* ]] && [ ! -f "$out/qnli_split/heldout.tsv" ]; then
  mkdir -p "$out/qnli_split"
  # Header kept in both; data rows 0, 5, 10, … held out.
  awk -v h="$out/qnli_split/heldout.tsv" -v t="$out/qnli_split/train.tsv" \
    'NR == 1 { print > h; print > t; next } { if ((NR - 2) % 5 == 0) print > h; else print > t }' \
    "$data/qnli/dev.tsv"
fi

for task in $tasks; do
  read -r lr len drop wd steps train dev <<<"$(settings "$task")"
  # LR_<TASK> overrides the authors' learning rate (e.g. LR_RTE=3e-4).
  lr_var="LR_${task^^}"
  lr="${!lr_var:-$lr}"
  warmup=$((steps / 10))
  for r in $ranks; do
    for seed in $seeds; do
      for method in $methods; do
        name="$task/r$r-$method-seed$seed"
        [ -f "$out/$name.eval/results.json" ] && continue
        case "$method" in
          lora) extra=() ;;
          dash) extra=(--method dash --dash-t "$dash_t" --dash-s "$dash_s") ;;
          dashlr*) extra=(--method dash --dash-t "$dash_t" --dash-s "$dash_s" --dash-lr-scale "${method#dashlr}") ;;
          pissa | milora | dora) extra=(--method "$method") ;;
          *) echo "examples/glue: unknown method $method (lora, dash, dashlrN, pissa, milora, dora)" >&2; exit 1 ;;
        esac
        mkdir -p "$out/$task"
        start=$(date +%s)
        "$BIN" train --model "$model" --task "$task" --data "$train" --out "$out/$name" --overwrite \
          --rank "$r" --alpha $((2 * r)) --dropout 0.05 --target-modules "$targets" \
          --batch-size 32 --cutoff-len "$len" --lr "$lr" --weight-decay "$wd" \
          --classifier-dropout "$drop" --warmup-steps "$warmup" --schedule linear \
          --max-steps "$steps" --seed "$seed" "${extra[@]}" >"$out/$name.log" 2>&1
        "$BIN" eval --model "$model" --adapter "$out/$name" --task "$task" --data "$dev" \
          --out "$out/$name.eval" --overwrite >>"$out/$name.log" 2>&1
        echo "$(( $(date +%s) - start ))" >"$out/$name.eval/wall_s"
        echo "$name: $(python3 examples/glue/summarize.py --one "$out/$name")"
      done
    done
  done
done
python3 examples/glue/summarize.py "$out" | tee "$out/table.md"
