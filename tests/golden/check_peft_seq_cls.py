"""Checks a lora-dash sequence-classification adapter against PEFT.

Loads `AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)`, attaches the
adapter with `PeftModel.from_pretrained`, scores the first rows of a GLUE TSV exactly as
`lora-dash eval --task` encodes them (`tokenizer(a, b, truncation=True, max_length=L)`), and
compares the logits with the `scores` of lora-dash's `predictions.jsonl`.

    python tests/golden/check_peft_seq_cls.py --model MINILM_DIR --adapter RUN/peft \
        --tsv dev.tsv --columns sentence --num-labels 2 --max-length 128 \
        --predictions EVAL_DIR/predictions.jsonl --limit 200

Works for any architecture AutoModelForSequenceClassification loads (BERT, DeBERTa-v2/v3).
Prints the largest absolute difference and the largest relative one, per row (each row's
difference over its own largest |logit|) and over the whole set (over the largest |logit| of
all rows); exits 1 when the one --scale names (default row) exceeds --tol (1e-4). A row whose
logits are all near 0 inflates the per-row figure; `--scale global` measures against the
logits' overall size, as the Rust tests' max_rel_diff does.
Versions: those of tests/golden/requirements.txt.
"""
import argparse
import csv
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--tsv", required=True)
    ap.add_argument("--columns", required=True, help="comma list: text_a[,text_b] header names")
    ap.add_argument("--num-labels", type=int, required=True)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--predictions", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--scale", choices=["row", "global"], default="row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=args.num_labels, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    cols = args.columns.split(",")
    with open(args.tsv, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.limit]
    preds = [json.loads(l) for l in open(args.predictions)][: len(rows)]
    worst, worst_abs, largest = 0.0, 0.0, 1e-6
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        texts = [[r[c] for c in cols] for r in chunk]
        enc = tok(*zip(*texts), truncation=True, max_length=args.max_length,
                  padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        for j, row in enumerate(logits.tolist()):
            ours = preds[i + j]["scores"]
            scale = max(1e-6, max(abs(x) for x in row))
            diff = max(abs(a - b) for a, b in zip(ours, row))
            worst = max(worst, diff / scale)
            worst_abs = max(worst_abs, diff)
            largest = max(largest, scale)
    overall = worst_abs / largest
    print(f"{len(rows)} rows: max |lora-dash - PEFT| = {worst_abs:.3e}; per row / max |PEFT row| = "
          f"{worst:.3e}; over all rows / max |PEFT| = {overall:.3e}")
    sys.exit(0 if (worst if args.scale == "row" else overall) <= args.tol else 1)


if __name__ == "__main__":
    main()
