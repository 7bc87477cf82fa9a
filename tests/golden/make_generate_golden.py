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

Versions: torch 2.5.1, transformers 4.46.3 (see requirements.txt). From the crate root:
    python tests/golden/make_generate_golden.py
"""

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


def run(model, enc, num_beams, eos):
    with torch.no_grad():
        seq = model.generate(
            **enc,
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW,
            eos_token_id=eos,
            pad_token_id=0,
            length_penalty=1.0,
            early_stopping=False,
        )
    width = enc["input_ids"].shape[1]
    return [cut(row[width:].tolist(), eos) for row in seq]


def main():
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


if __name__ == "__main__":
    main()
