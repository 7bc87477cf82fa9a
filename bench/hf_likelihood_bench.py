#!/usr/bin/env python3
"""transformers side of the evaluation-speed benchmark, likelihood mode: the candidate
scoring of `lora-dash eval --mode likelihood` in PyTorch (CPU, float32).

Versions used for the recorded numbers: Python 3.11, torch 2.5.1, transformers 4.46.3.

Protocol, mirroring `lora-dash eval --mode likelihood` (src/eval/likelihood.rs, task.rs):
  * a Hugging Face model directory, e.g. the one `lora-dash convert --model
    SmolLM2-135M-Instruct.Q4_1.gguf --out DIR` writes (see hf_generate_bench.py);
  * the task's answer vocabulary is recognised from the `answer` fields of the whole file
    (true/false, solution1-2, answer1-5, ending1-4, option1-2); the first --limit records
    are scored;
  * prompt = generate_prompt(instruction, input) of CR_MR/commonsense_evaluate.py;
  * the candidates of a record are the options its instruction lists after the last
    "Answer format:" (first line, split at "/") when there are at least two and all belong
    to the vocabulary, else the vocabulary's first N words (N: 2 for the two-way tasks,
    4 for endings, the largest answerN of the file for answerN);
  * each candidate's continuation is the text the training data would hold for it: the
    record's output with the last occurrence of its answer replaced by the candidate
    ("the correct answer is answer3"), or the bare candidate when the output lacks it;
  * prompt + continuation is tokenised jointly (special tokens as the tokenizer adds them);
    the context is the longest token prefix shared by the prompt and every candidate, with
    at least one token left to every continuation; no EOS is appended;
  * score = sum of log P(token) over the continuation tokens (float32 log-softmax, summed
    in float64); the prediction is the first candidate with the highest score;
  * records sorted by context length, longest first (stable), in batches of --batch-size.

Implementation (lora-dash's algorithm before two further savings, see below): per batch,
ONE forward of the left-padded
contexts (attention mask, positions counted from the first real token, a DynamicCache, logits
of the last position only via num_logits_to_keep=1), whose last logits score every
continuation's first token; the cache rows are then copied to one row per (record,
candidate) (DynamicCache.batch_select_indices) and ONE forward of all right-padded
continuations minus their last token scores the rest. The context is thus computed once per
record, not once per candidate. `--strategy full` instead runs every context+continuation
sequence, right-padded, in one forward per batch (no cache; the context is recomputed for
each candidate), as simpler harnesses do; it is slower and gives the same scores.

lora-dash additionally computes (i) the token prefix shared by the whole batch's contexts
(the prompt template's header) once per batch instead of once per record, and (ii) the
start all of a record's continuations share ("the correct answer is answer") once per
record, scored in the context forward, instead of once per candidate. Both are exact (the
same conditional probabilities, up to the order of floating-point additions) and this script
does neither, so the benchmark's likelihood ratio includes them (BENCHMARKS.md gives the
ratio with them off, LORA_DASH_SHARED_PREFIX=0, too).

The timed region is what `lora-dash eval` times: prompt building, candidate derivation,
tokenisation, scoring and answer picking of every record; model loading and reading the data
file are excluded; no warm-up on either side. Prints one JSON object; --dump writes one JSON
line per record ({"index", "raw": {candidate: log-likelihood}, "prediction", "label",
"correct"}), the fields of predictions.jsonl of `lora-dash eval --mode likelihood --out`.

Example, from the crate root:
    lora-dash convert --model ~/.cache/lora-dash/SmolLM2-135M-Instruct.Q4_1.gguf --out smol-hf
    python bench/hf_likelihood_bench.py --model smol-hf --limit 100 --threads 1
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

CRATE = Path(__file__).resolve().parent.parent
DEFAULT_DATA = CRATE.parent / "shared" / "data" / "commonsense" / "ARC-Easy" / "test.json"


def eval_prompt(instruction, inp):
    """generate_prompt of CR_MR/commonsense_evaluate.py (same bytes as data::alpaca::eval_prompt)."""
    ind = "\n                "
    if inp:
        return (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n"
            + ind + "### Instruction:" + ind + instruction + "\n"
            + ind + "### Input:" + ind + inp + "\n"
            + ind + "### Response:" + ind
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n"
        + ind + "### Instruction:" + ind + instruction + "\n"
        + ind + "### Response:" + ind
    )


# Answer vocabularies of the LLM-Adapters commonsense suite, as eval::task::Family.
FAMILIES = [
    ["true", "false"],
    ["solution1", "solution2"],
    ["answer%d" % i for i in range(1, 6)],
    ["ending%d" % i for i in range(1, 5)],
    ["option1", "option2"],
]


def detect_task(records):
    """(vocabulary, number of options) from the answers of every record (eval::detect_task)."""
    answers = [r["answer"] for r in records]
    words = next((f for f in FAMILIES if answers[0] in f), None)
    if words is None or any(a not in words for a in answers):
        raise SystemExit("answers fit no single known vocabulary")
    if words[0] == "answer1":
        return words, max(2, max(words.index(a) for a in answers) + 1)
    return words, len(words)


def candidates_for(rec, words, num_choices):
    """Task::candidates_for: the options listed after the last "Answer format:", if valid."""
    parts = rec["instruction"].rsplit("Answer format:", 1)
    if len(parts) == 2:
        lines = parts[1].splitlines()
        listed = [w.strip() for w in (lines[0] if lines else "").split("/")]
        if len(listed) >= 2 and all(w in words for w in listed):
            return listed
    return words[:num_choices]


def continuation(rec, cand):
    """eval::task::continuation: the output with its answer (last occurrence) replaced."""
    ans, out = rec.get("answer") or "", rec["output"]
    pos = out.rfind(ans) if ans else -1
    if pos < 0:
        return cand
    return out[:pos] + cand + out[pos + len(ans) :]


def tokenize_candidates(tok, prompt, conts):
    """(context ids, [continuation ids]) as likelihood::tokenize_candidates."""
    pid = tok(prompt)["input_ids"]
    full = [tok(prompt + c)["input_ids"] for c in conts]
    shared = len(pid)
    for f in full:
        common = 0
        for a, b in zip(pid, f):
            if a != b:
                break
            common += 1
        shared = min(shared, common, len(f) - 1)
    if shared <= 0:
        raise SystemExit("prompt and continuations share no leading token")
    return pid[:shared], [f[shared:] for f in full]


def score_shared(model, items, pad):
    """Context once per record (left-padded, cached), then all continuations in one batch."""
    b = len(items)
    lens = torch.tensor([len(c) for c, _ in items])
    t = int(lens.max())
    ids = torch.full((b, t), pad, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, (c, _) in enumerate(items):
        ids[i, t - len(c) :] = torch.tensor(c)
        mask[i, t - len(c) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, num_logits_to_keep=1)
    first = out.logits[:, -1, :].float().log_softmax(-1)  # (b, V)
    owner = [i for i, (_, cs) in enumerate(items) for _ in cs]
    conts = [c for _, cs in items for c in cs]
    rows = len(conts)
    own = torch.tensor(owner)
    scores = first[own, torch.tensor([c[0] for c in conts])].double()
    w = max(len(c) - 1 for c in conts)
    if w > 0:
        cache.batch_select_indices(own)
        cids = torch.full((rows, w), pad, dtype=torch.long)
        tgt = torch.zeros((rows, w), dtype=torch.long)
        cmask = torch.zeros((rows, w), dtype=torch.long)
        for r, c in enumerate(conts):
            n = len(c) - 1
            if n:
                cids[r, :n] = torch.tensor(c[:-1])
                tgt[r, :n] = torch.tensor(c[1:])
                cmask[r, :n] = 1
        m = torch.cat([mask[own], cmask], dim=1)
        cpos = lens[own].unsqueeze(1) + torch.arange(w)
        logits = model(input_ids=cids, attention_mask=m, position_ids=cpos, past_key_values=cache,
                       use_cache=True).logits  # (rows, w, V)
        lp = logits.float().log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        scores = scores + (lp.double() * cmask).sum(-1)
    out, at = [], 0
    for _, cs in items:
        out.append(scores[at : at + len(cs)].tolist())
        at += len(cs)
    return out


def score_full(model, items, pad):
    """Every context+continuation sequence right-padded in one forward, no cache."""
    seqs = [(len(c), c + k) for c, cs in items for k in cs]
    rows, width = len(seqs), max(len(s) for _, s in seqs)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    tmask = torch.zeros((rows, width - 1), dtype=torch.double)
    for r, (n_ctx, s) in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        tmask[r, n_ctx - 1 : len(s) - 1] = 1  # position j predicts token j+1
    # Logits from the first position that predicts a continuation token on.
    lo = min(n for n, _ in seqs) - 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                   num_logits_to_keep=width - lo).logits[:, :-1]  # positions lo..width-2
    lp = logits.float().log_softmax(-1).gather(-1, ids[:, lo + 1 :].unsqueeze(-1)).squeeze(-1)
    scores = (lp.double() * tmask[:, lo:]).sum(-1)
    out, at = [], 0
    for _, cs in items:
        out.append(scores[at : at + len(cs)].tolist())
        at += len(cs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--strategy", choices=["shared", "full"], default="shared",
                    help="shared: context once, cached (default, as lora-dash); full: every candidate sequence padded")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--dump", default=None, help="write per-candidate scores as JSON Lines here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    all_records = json.loads(Path(args.data).read_text())
    words, num_choices = detect_task(all_records)  # on the whole file, as lora-dash
    records = all_records[: args.limit]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    score = score_shared if args.strategy == "shared" else score_full

    start = time.perf_counter()
    prompts = [eval_prompt(r["instruction"], r.get("input") or "") for r in records]
    cands = [candidates_for(r, words, num_choices) for r in records]
    items = [
        tokenize_candidates(tok, p, [continuation(r, c) for c in cs])
        for r, p, cs in zip(records, prompts, cands)
    ]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores = [None] * len(items)
    with torch.no_grad():
        for b in range(0, len(order), args.batch_size):
            idx = order[b : b + args.batch_size]
            for i, s in zip(idx, score(model, [items[i] for i in idx], pad)):
                scores[i] = s
    # First best on ties, like an argmax.
    preds = [cs[max(range(len(s)), key=lambda j: (s[j], -j))] for cs, s in zip(cands, scores)]
    secs = time.perf_counter() - start

    correct = sum(p == r["answer"] for p, r in zip(preds, records))
    if args.dump:
        with open(args.dump, "w") as f:
            for i, (r, cs, s, p) in enumerate(zip(records, cands, scores, preds)):
                f.write(json.dumps({"index": i, "raw": dict(zip(cs, s)), "prediction": p,
                                    "label": r["answer"], "correct": p == r["answer"]}) + "\n")
    print(
        json.dumps(
            {
                "examples": len(records),
                "correct": correct,
                "total": len(records),
                "seconds": secs,
                "examples_per_s": len(records) / secs,
                "candidates": sum(len(c) for c in cands),
                "batch_size": args.batch_size,
                "strategy": args.strategy,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
