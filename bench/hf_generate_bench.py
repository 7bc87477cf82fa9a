#!/usr/bin/env python3
"""transformers side of the evaluation-speed benchmark: `generate` on the prompts that
`lora-dash eval --mode generate` decodes, with the same batching (CPU, float32).

Versions used for the recorded numbers: Python 3.11, torch 2.5.1, transformers 4.46.3.

Workload, mirroring `lora-dash eval` (and CR_MR/commonsense_evaluate.py's prompt):
  * a Hugging Face model directory, e.g. the one `lora-dash convert --model
    SmolLM2-135M-Instruct.Q4_1.gguf --out DIR` writes (transformers 4.46 does not tie
    lm_head when it loads the GGUF directly, so use the converted directory);
  * the first --limit records of an LLM-Adapters test file, prompt = generate_prompt
    (instruction, input) of commonsense_evaluate.py, byte for byte;
  * prompts sorted by token length, longest first (stable), in batches of --batch-size,
    left-padded with the tokenizer's pad id and an attention mask;
  * greedy decoding (do_sample=False, num_beams=1; --num-beams 4 for beam search),
    max_new_tokens=32, stopping at the model's EOS ids;
  * the timed region is what `lora-dash eval` times: tokenisation, generation and decoding
    of every record; model loading is excluded; no warm-up on either side.
Prints one JSON object; --dump writes the responses (text after "### Response:", stripped)
as JSON Lines with the record index, to compare with predictions.jsonl of `lora-dash eval`.

Example, from the crate root:
    lora-dash convert --model ~/.cache/lora-dash/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    python bench/hf_generate_bench.py --model /tmp/smollm2 --limit 100
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=1, help="1 = greedy; 4 = the reference evaluation's beam search")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--dump", default=None, help="write responses as JSON Lines here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records = json.loads(Path(args.data).read_text())[: args.limit]
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

    start = time.perf_counter()
    prompts = [eval_prompt(r["instruction"], r.get("input", "")) for r in records]
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lens[i])
    responses = [None] * len(prompts)
    new_tokens = 0
    for b in range(0, len(order), args.batch_size):
        idx = order[b : b + args.batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, return_token_type_ids=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=False,
                num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        gen = out[:, enc["input_ids"].shape[1] :]
        for i, row in zip(idx, gen.tolist()):
            kept = []
            for t in row:
                if t in eos:
                    break
                kept.append(t)
            new_tokens += len(kept)
            text = tok.decode(kept, skip_special_tokens=True)
            responses[i] = text.split("### Response:")[-1].strip()
    secs = time.perf_counter() - start

    if args.dump:
        with open(args.dump, "w") as f:
            for i, r in enumerate(responses):
                f.write(json.dumps({"index": i, "raw": r}) + "\n")
    print(
        json.dumps(
            {
                "examples": len(prompts),
                "seconds": secs,
                "examples_per_s": len(prompts) / secs,
                "generated_tokens": new_tokens,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "num_beams": args.num_beams,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
