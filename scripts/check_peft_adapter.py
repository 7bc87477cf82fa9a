#!/usr/bin/env python3
"""Checks that PEFT loads a lora-dash adapter and agrees with lora-dash's own merge.

    lora-dash convert --model SmolLM2.gguf --out base_hf
    lora-dash merge --model SmolLM2.gguf --adapter RUN_DIR --out merged_hf
    python scripts/check_peft_adapter.py --base base_hf --adapter RUN_DIR --merged merged_hf

Loads `base_hf` with transformers, attaches the adapter with PeftModel.from_pretrained
(failing on any missing or unexpected key), and compares its logits on a prompt with those
of the merged directory written by lora-dash. Prints the max relative difference as JSON
and exits non-zero above 1e-4. Tested with torch 2.5.1, transformers 4.46.3, peft 0.13.2.
"""
import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--adapter", required=True)
ap.add_argument("--merged", required=True)
ap.add_argument("--prompt", default="Below is an instruction that describes a task. Write a response "
                "that appropriately completes the request.\n\n### Instruction:\nWhich gas do plants absorb?\n\n### Response:\n")
args = ap.parse_args()

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(args.base)
ids = tok(args.prompt, return_tensors="pt").input_ids
base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32, attn_implementation="eager")
with torch.no_grad():
    base_logits = base(ids).logits
model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False)
model.eval()
with torch.no_grad():
    peft_logits = model(ids).logits
merged = AutoModelForCausalLM.from_pretrained(args.merged, torch_dtype=torch.float32, attn_implementation="eager")
with torch.no_grad():
    merged_logits = merged(ids).logits
scale = merged_logits.abs().max().item()
diff = (peft_logits - merged_logits).abs().max().item() / scale
moved = (peft_logits - base_logits).abs().max().item() / scale
print(json.dumps({"tokens": ids.shape[1], "peft_vs_lora_dash_merge": diff, "adapter_effect": moved}))
sys.exit(0 if diff < 1e-4 and moved > 0 else 1)
