#!/usr/bin/env python3
"""Reference decodes of tiny-llama by transformers' `generate`, for tests/eval.rs.

Writes tests/golden/tiny_generate.json: for a left-padded batch of prompts (pad id 0, as
CR_MR/commonsense_evaluate.py), the generated token ids of
  * greedy decoding (num_beams=1),
  * beam search with 4 beams and EOS = [2],
  * beam search with 3 beams and two EOS ids, the second a token the random model emits
    often, so that hypotheses finish early and the early-stopping heuristic is exercised,
  * beam search with 2 beams and four EOS ids (the three most frequent greedy tokens too),
    which widens the candidate list to max(2, 1 + n_eos) * num_beams,
all with do_sample=False, length_penalty=1.0, early_stopping=False (transformers' defaults).
The ids after the prompt are cut at the first EOS id (transformers appends EOS, then pads).

With --smollm2-dir DIR (the Hugging Face directory `lora-dash convert` writes from
SmolLM2-135M-Instruct.Q4_1.gguf) it also writes tests/golden/smollm2_eval_golden.json, the
`lora-dash eval` reference on the first 8 records of ../shared/data/commonsense/ARC-Easy/
test.json: the greedy responses (one left-padded batch, max_new_tokens=32, text after
"### Response:" stripped, as CR_MR/commonsense_evaluate.py keeps it) and, for the first 4
records, log P(continuation | prompt) of every listed answer, where the continuation is the
record's output with its answer replaced and the context is the longest token prefix shared
by the prompt and all prompt+continuation tokenisations.

Versions: torch 2.5.1, transformers 4.46.3 (see requirements.txt). From the crate root:
    python tests/golden/make_generate_golden.py [--smollm2-dir DIR]
"""

import argparse

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
MAX_NEW = 12


def eval_prompt(instruction):
    """generate_prompt(instruction) of CR_MR/commonsense_evaluate.py (no input)."""
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n\n                ### Instruction:\n                "
        + instruction
        + "\n\n                ### Response:\n                "
    )


PROMPTS = [
    "Which gas do plants take in? Answer format: answer1/answer2",
    "the correct answer is",
    eval_prompt("Pick one: answer1 water answer2 sand. Answer format: answer1/answer2"),
    "A",
]


def cut(ids, eos):
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(int(t))
    return out


def run(model, enc, num_beams, eos, max_new=MAX_NEW, pad=0):
    with torch.no_grad():
        seq = model.generate(
            **enc,
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=pad,
            length_penalty=1.0,
            early_stopping=False,
        )
    width = enc["input_ids"].shape[1]
    return [cut(row[width:].tolist(), eos) for row in seq]


def smollm2(model_dir):
    data = HERE.parent.parent.parent / "shared" / "data" / "commonsense" / "ARC-Easy" / "test.json"
    recs = json.loads(data.read_text())[:8]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    eos = [model.generation_config.eos_token_id]
    prompts = [eval_prompt(r["instruction"]) for r in recs]
    assert all(not r["input"] for r in recs)
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    gen = run(model, enc, 1, eos, max_new=32, pad=tok.pad_token_id)
    responses = [tok.decode(g, skip_special_tokens=True).split("### Response:")[-1].strip() for g in gen]
    scores = []
    for r, p in zip(recs[:4], prompts):
        listed = r["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
        conts = [r["output"][: r["output"].rfind(r["answer"])] + c for c in listed]
        pid = tok(p)["input_ids"]
        full = [tok(p + c)["input_ids"] for c in conts]
        shared = min(min(len(pid), len(f) - 1) for f in full)
        for f in full:
            shared = min(shared, next(i for i, (a, b) in enumerate(zip(pid + [-1], f)) if a != b))
        row = {}
        for c, f in zip(listed, full):
            with torch.no_grad():
                lp = model(torch.tensor([f])).logits[0].log_softmax(-1)
            row[c] = sum(lp[j - 1, f[j]].item() for j in range(shared, len(f)))
        scores.append(row)
    out = {"data": "ARC-Easy/test.json", "responses": responses, "likelihood": scores}
    (HERE / "smollm2_eval_golden.json").write_text(json.dumps(out, indent=1) + "\n")
    print(responses, scores)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = HERE / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    tok.pad_token_id = 0
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    enc = tok(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    greedy = run(model, enc, 1, [2])
    # The most frequent greedy tokens serve as extra EOS ids.
    ranked = [int(t) for t, _ in Counter(t for g in greedy for t in g).most_common(3)]
    common = ranked[0]
    cases = [
        {"num_beams": 1, "eos": [2], "generated": greedy},
        {"num_beams": 4, "eos": [2], "generated": run(model, enc, 4, [2])},
        {"num_beams": 3, "eos": [2, common], "generated": run(model, enc, 3, [2, common])},
        {"num_beams": 2, "eos": [2] + ranked, "generated": run(model, enc, 2, [2] + ranked)},
    ]
    out = {
        "prompts": PROMPTS,
        "prompt_ids": [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())],
        "max_new_tokens": MAX_NEW,
        "cases": cases,
    }
    (HERE / "tiny_generate.json").write_text(json.dumps(out, indent=1) + "\n")
    for c in cases:
        print(c["num_beams"], c["eos"], [len(g) for g in c["generated"]])
    if args.smollm2_dir:
        smollm2(args.smollm2_dir)


if __name__ == "__main__":
    main()
