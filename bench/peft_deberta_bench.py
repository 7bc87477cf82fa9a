#!/usr/bin/env python3
"""PyTorch + PEFT side of the DeBERTa-v3 (base-sized, random weights) LoRA training
benchmark (CPU, float32), and the builder of the random model both sides train.

Versions used for the recorded numbers (see tests/golden/requirements.txt): Python 3.11,
torch 2.5.1, transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, numpy 1.26.4.

Model (`--make DIR` writes it and exits): DebertaV2Model with deberta-v3-base's geometry
(hidden 768, 12 layers, 12 heads, intermediate 3072, relative_attention, position_buckets
256, max_relative_positions 512, share_att_key, pos_att_type p2c|c2p, norm_rel_ebd
layer_norm, position_biased_input false, type_vocab_size 0), random weights from seed 0,
and the tiny WordPiece tokenizer of tests/golden/tiny-bert (vocab 512: RTE text gives
token ids and lengths like a real tokenizer's; the embedding table is the only part of the
model smaller than deberta-v3-base's).

Workload (as bench/peft_glue_bench.py): DebertaV2ForSequenceClassification(num_labels=2),
pooler and classifier initialised by transformers under --seed and trained
(modules_to_save); LoRA r=8, alpha=16, dropout 0.05 on query_proj, key_proj, value_proj;
train mode (hidden dropout 0.1; attention-probability dropout set to 0, as lora-dash does
not apply it); RTE train pairs, truncation at --max-length 128, batches of --batch-size 32
right-padded to the longest row; AdamW lr 5e-4, no schedule. `--warmup` untimed steps,
then `--steps` timed ones; tokens_per_s counts non-pad tokens. Prints one JSON line.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

CRATE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CRATE / "tests" / "golden"))
from make_golden_bert import DATA, rte_pairs  # noqa: E402

TARGETS = ["query_proj", "key_proj", "value_proj"]
RTE_LABELS = {"entailment": 0, "not_entailment": 1}
TOKENIZER = CRATE / "tests" / "golden" / "tiny-bert"


def make(out):
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    vocab = AutoTokenizer.from_pretrained(TOKENIZER).backend_tokenizer.get_vocab_size()
    cfg = DebertaV2Config(
        vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
        relative_attention=True, position_buckets=256, max_relative_positions=-1,
        share_att_key=True, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7,
        attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(0)
    DebertaV2Model(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(TOKENIZER / f, Path(out) / f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", default=None, help="write the random model here and exit")
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=DATA / "rte" / "train.tsv")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.make:
        make(args.make)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DebertaV2ForSequenceClassification

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    model = DebertaV2ForSequenceClassification.from_pretrained(
        args.model, num_labels=2, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none",
        task_type="SEQ_CLS", modules_to_save=["classifier", "pooler"]))
    model.train()
    load_s = time.perf_counter() - t0
    rows = rte_pairs(args.data)
    total = args.warmup + args.steps
    batches = []
    for s in range(total):
        chunk = [rows[(s * args.batch_size + j) % len(rows)] for j in range(args.batch_size)]
        enc = [tok(a, b, truncation=True, max_length=args.max_length) for a, b, _ in chunk]
        batch = tok.pad(enc, padding=True, return_tensors="pt")
        batch.pop("token_type_ids", None)
        batch["labels"] = torch.tensor([RTE_LABELS[lab] for _, _, lab in chunk], dtype=torch.int64)
        batches.append(batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    step_times, losses, timed_tokens = [], [], 0
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
        print(f"step {step + 1}/{total} loss {losses[-1]:.4f} {dt:.2f}s", file=sys.stderr)
    wall = sum(step_times)
    print(json.dumps({
        "framework": "pytorch+peft",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "timed_tokens": timed_tokens,
        "tokens_per_s": timed_tokens / wall if wall > 0 else None,
        "step_time_s": wall / len(step_times) if step_times else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_s": load_s,
    }))


if __name__ == "__main__":
    main()
