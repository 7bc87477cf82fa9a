#!/usr/bin/env python3
"""PyTorch + PEFT side of the GLUE (sequence classification) LoRA training benchmark
(CPU, float32).

Versions used for the recorded numbers (see tests/golden/requirements.txt): Python 3.11,
torch 2.5.1, transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, numpy 1.26.4.

Workload:
  * all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT encoder with pooler; scripts/fetch-minilm.sh)
    as BertForSequenceClassification(num_labels=2), the classifier initialised by
    transformers under --seed;
  * LoRA r=8, alpha=16, dropout 0.05 on query, key, value (task_type SEQ_CLS, so PEFT also
    trains a copy of the classifier); model in train mode (hidden/attention dropout 0.1
    from the checkpoint's config);
  * RTE train (header index/sentence1/sentence2/label; entailment = 0, not_entailment = 1),
    pairs tokenized with truncation=True (longest_first) at --max-length 128;
  * batches of --batch-size 32 consecutive rows in file order, right-padded to the longest
    row of the batch (tokenizer.pad, as DataCollatorWithPadding does);
  * cross-entropy loss as BertForSequenceClassification computes it, AdamW lr 5e-4
    (betas 0.9/0.999, eps 1e-8, --weight-decay 0), no LR schedule, no gradient
    accumulation, no mixed precision.
`--warmup` untimed steps run first, then `--steps` timed ones. tokens_per_s counts
non-pad tokens (attention mask 1) of the timed steps over their wall time. Prints one
JSON object on one line.

Example, from the crate root:
    python bench/peft_glue_bench.py --model "$(scripts/fetch-minilm.sh)" --steps 20
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

CRATE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CRATE / "tests" / "golden"))
from make_golden_bert import DATA, MINILM_NAME, find_minilm, rte_pairs  # noqa: E402

TARGETS = ["query", "key", "value"]
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help=f"{MINILM_NAME} Hugging Face directory (default: $LORA_DASH_MINILM, "
                    f"$LORA_DASH_CACHE/{MINILM_NAME}, ~/.cache/lora-dash/{MINILM_NAME})")
    ap.add_argument("--data", type=Path, default=DATA / "rte" / "train.tsv")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                    help="attention implementation (default: transformers' choice)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    model_dir = Path(args.model) if args.model else find_minilm(None)
    if not (model_dir / "config.json").is_file():
        sys.exit(f"model not found: {model_dir} (run scripts/fetch-minilm.sh or pass --model)")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    # tokenizer.pad on pre-tokenized rows is exactly what DataCollatorWithPadding runs; the
    # "faster to pad in __call__" hint does not apply to per-row truncation.
    tok.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    kw = {"attn_implementation": args.attn} if args.attn else {}
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                          torch_dtype=torch.float32, **kw)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none",
        task_type="SEQ_CLS"))
    model.train()
    load_s = time.perf_counter() - t0

    rows = rte_pairs(args.data)
    for i, (_, _, lab) in enumerate(rows):
        if lab not in RTE_LABELS:
            sys.exit(f"{args.data}: data row {i + 1}: label {lab!r} is not one of {sorted(RTE_LABELS)}")
    total = args.warmup + args.steps
    batches = []
    for s in range(total):
        chunk = [rows[(s * args.batch_size + j) % len(rows)] for j in range(args.batch_size)]
        enc = [tok(a, b, truncation=True, max_length=args.max_length) for a, b, _ in chunk]
        batch = tok.pad(enc, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([RTE_LABELS[lab] for _, _, lab in chunk], dtype=torch.int64)
        batches.append(batch)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    step_times, losses, timed_tokens, widths = [], [], 0, []
    for step, batch in enumerate(batches):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if step >= args.warmup:
            step_times.append(dt)
            timed_tokens += int(batch["attention_mask"].sum())
            widths.append(batch["input_ids"].shape[1])
        print(f"step {step + 1}/{total} loss {losses[-1]:.4f} width {batch['input_ids'].shape[1]} "
              f"{dt:.2f}s" + (" (warmup)" if step < args.warmup else ""), file=sys.stderr)

    import peft
    import transformers

    wall = sum(step_times)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "framework": "pytorch+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "model": model_dir.name,
        "task": "rte",
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "trainable_params": n_train,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "timed_tokens": timed_tokens,
        "mean_padded_width": sum(widths) / len(widths) if widths else None,
        "tokens_per_s": timed_tokens / wall if wall > 0 else None,
        "step_time_s": wall / len(step_times) if step_times else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "load_s": load_s,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
    }))


if __name__ == "__main__":
    main()
