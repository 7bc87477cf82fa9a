#!/usr/bin/env python3
"""PyTorch + PEFT side of the LoRA training-throughput benchmark (CPU, float32).

Versions used for the recorded numbers (see tests/golden/requirements.txt): Python 3.11,
torch 2.5.1, transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, numpy 1.26.4, gguf 0.10.0.

Workload, mirroring Chongjie-Si/Subspace-Tuning CR_MR/finetune.py (the LoRA-Dash reference
code, itself LLM-Adapters' finetune.py):
  * SmolLM2-135M-Instruct, from a Hugging Face directory (--model) or the Q4_1 GGUF
    (--gguf, dequantized to float32 by transformers);
  * LoRA r=8, alpha=16, dropout 0.05 on q_proj, k_proj, v_proj, up_proj, down_proj;
  * Alpaca prompts (generate_prompt with/without input) + output, tokenized, truncated at
    cutoff_len=256, EOS appended when shorter, train_on_inputs=True (labels = input ids);
  * micro-batches of 4 consecutive records in file order, right-padded to the longest row
    (pad id 0, label -100, attention mask 0); the original pads to a multiple of 8, which
    only adds masked work;
  * AdamW lr 3e-4 (torch defaults otherwise; weight_decay 0 as in finetune.py), no LR
    schedule, no gradient accumulation, no mixed precision.
`--warmup` untimed steps run first, then `--steps` timed ones. tokens_per_s counts
non-pad tokens of the timed steps over their wall time. Prints one JSON object.

Example, from the crate root:
    python bench/peft_bench.py --gguf ~/.cache/lora-dash/SmolLM2-135M-Instruct.Q4_1.gguf --steps 20
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
# The training prompt, padding id and model location are those of the golden-file generator.
sys.path.insert(0, str(CRATE / "tests" / "golden"))
from make_golden import DEFAULT_DATA, GGUF_NAME, PAD_ID, find_gguf, generate_prompt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def load(args):
    """Returns (model, tokenizer, add_special_tokens, eos_id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        return model, tok, True, tok.eos_token_id

    from gguf import GGUFReader

    gguf = Path(args.gguf) if args.gguf else find_gguf()
    if not gguf.is_file():
        sys.exit(f"GGUF not found: {gguf} (pass --gguf or --model)")
    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    # No output.weight in the GGUF (tied embeddings); transformers 4.46 would leave lm_head
    # random, so tie it as the original checkpoint does.
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    # transformers 4.46's GGUF tokenizer ignores add_bos_token and maps eos to the BOS
    # token; take both from the GGUF metadata instead.
    fields = GGUFReader(str(gguf)).fields

    def scalar(key, default):
        fld = fields.get(key)
        return fld.parts[fld.data[0]].tolist()[0] if fld is not None else default

    return model, tok, bool(scalar("tokenizer.ggml.add_bos_token", False)), int(
        scalar("tokenizer.ggml.eos_token_id", 2))


def tokenize(tok, add_special, eos_id, rec, cutoff):
    ids = tok(generate_prompt(rec), add_special_tokens=add_special, truncation=True,
              max_length=cutoff).input_ids
    if ids[-1] != eos_id and len(ids) < cutoff:
        ids.append(eos_id)
    return ids  # labels = ids (train_on_inputs)


def collate(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    labels = torch.full((len(rows), width), -100, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    src.add_argument("--gguf", help="SmolLM2 GGUF file (default: $LORA_DASH_SMOLLM2_GGUF, "
                     "$LORA_DASH_CACHE/" + GGUF_NAME + ", ~/.cache/lora-dash/" + GGUF_NAME + ")")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cutoff-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--synthetic", type=int, metavar="T", default=0,
                    help="instead of the data, batches of --batch-size rows of T random token "
                         "ids, no padding (the shapes of `profile_step` with T=...)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model, tok, add_special, eos_id = load(args)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none",
        task_type="CAUSAL_LM"))
    model.train()
    load_s = time.perf_counter() - t0

    total = args.warmup + args.steps
    n_rows = total * args.batch_size
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        rows = [torch.randint(0, vocab, (args.synthetic,), generator=g).tolist()
                for _ in range(n_rows)]
    else:
        records = json.loads(args.data.read_text())
        rows = [tokenize(tok, add_special, eos_id, records[i % len(records)], args.cutoff_len)
                for i in range(n_rows)]
    batches = [collate(rows[i: i + args.batch_size]) for i in range(0, n_rows, args.batch_size)]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    step_times, losses, timed_tokens = [], [], 0
    for step, (ids, mask, labels) in enumerate(batches):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if step >= args.warmup:
            step_times.append(dt)
            timed_tokens += int(mask.sum())
        print(f"step {step + 1}/{total} loss {losses[-1]:.4f} {dt:.2f}s"
              + (" (warmup)" if step < args.warmup else ""), file=sys.stderr)

    import peft
    import transformers

    wall = sum(step_times)
    print(json.dumps({
        "framework": "pytorch+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "model": args.model or str(Path(args.gguf).name if args.gguf else GGUF_NAME),
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "cutoff_len": args.cutoff_len,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "synthetic_t": args.synthetic or None,
        "timed_tokens": timed_tokens,
        "tokens_per_s": timed_tokens / wall if wall > 0 else None,
        "step_time_s": wall / len(step_times) if step_times else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "load_s": load_s,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
    }, indent=1))


if __name__ == "__main__":
    main()
