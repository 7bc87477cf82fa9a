"""Checks a lora-dash PEFT export (PiSSA / MiLoRA rank-2r conversion, or a DoRA run
directory) against `lora-dash merge` with PEFT itself.

Loads the unmodified base with transformers, attaches the adapter with
`PeftModel.from_pretrained`, and compares its logits on a fixed token batch with those of
the merged Hugging Face directory that `lora-dash merge` wrote for the same run.

    lora-dash train --method pissa ... --out RUN
    lora-dash merge --model BASE --adapter RUN --out MERGED
    python tests/golden/check_peft_baselines.py --model BASE --adapter RUN/peft --merged MERGED

(for DoRA, `--adapter RUN`). Prints the largest difference relative to the largest logit;
exits 1 when it exceeds --tol (1e-4). Versions: those of tests/golden/requirements.txt.
"""
import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = json.load(open(f"{args.adapter}/adapter_config.json"))
    base = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
    peft = PeftModel.from_pretrained(base, args.adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(args.merged, attn_implementation="eager").eval()
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    with torch.no_grad():
        a = peft(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"{args.adapter}: r = {cfg['r']}, lora_alpha = {cfg['lora_alpha']}, "
          f"use_dora = {cfg.get('use_dora')}; PEFT on the original base vs lora-dash merge: "
          f"max |diff| / max |logit| = {rel:.3e}")
    sys.exit(0 if rel <= args.tol else 1)


if __name__ == "__main__":
    main()
