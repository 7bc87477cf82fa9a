#!/usr/bin/env python3
"""Reference ("golden") files for the Rust tests, produced by the real PyTorch stack.

Versions (pinned in tests/golden/requirements.txt): Python 3.11, torch 2.5.1,
transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, safetensors 0.8.0, numpy 1.26.4,
gguf 0.10.0. Everything runs on CPU in float32 and is seeded, so a rerun with these
versions reproduces the files (up to float rounding if the thread count differs).

Usage, from the crate root:
    pip install -r tests/golden/requirements.txt
    python tests/golden/make_golden.py

Outputs (all under tests/golden/, described in README.md there):
    tiny-llama/                   random 2-layer LLaMA (GQA) + byte-level BPE tokenizer
    tiny_tokenizer_golden.json    texts and their token ids under the tiny tokenizer
    tiny_logits.safetensors       base-model logits, right- and left-padded batches
    tiny-lora/, tiny-lora-rslora/ PEFT LoRA adapters with non-zero A and B
    tiny_lora_logits.safetensors, tiny_lora_rslora_logits.safetensors
    tiny_train_step.safetensors   loss, LoRA gradients and AdamW updates, two steps
    smollm2_golden.safetensors/.json  token ids, logits and dequantized weight slices of
                                  SmolLM2-135M-Instruct Q4_1 GGUF (skipped when absent)

The SmolLM2 GGUF is found via $LORA_DASH_SMOLLM2_GGUF, else
$LORA_DASH_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf, else
~/.cache/lora-dash/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).resolve().parent
CRATE = GOLDEN.parent.parent
DEFAULT_DATA = CRATE.parent / "shared" / "data" / "commonsense" / "ARC-Easy" / "train.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID = 0  # <unk>, as LLM-Adapters' finetune.py pads with id 0


# --------------------------------------------------------------------------------------
# Prompt template of Chongjie-Si/Subspace-Tuning CR_MR/finetune.py (same bytes as
# src/data/alpaca.rs), used to give the tiny tokenizer realistic training text.
def generate_prompt(rec):
    # Written with explicit escapes: the original's trailing spaces are significant.
    ind = "\n                "
    if rec["input"]:
        return (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request. \n"
            + ind + "### Instruction:" + ind + rec["instruction"] + ind
            + ind + "### Input:" + ind + rec["input"] + ind
            + ind + "### Response:" + ind + rec["output"]
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.  \n"
        + ind + "### Instruction:" + ind + rec["instruction"] + ind
        + ind + "### Response:" + ind + rec["output"]
    )


def versions():
    import peft
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def save_st(path, tensors):
    # contiguous() because safetensors refuses views; clone() so shared storage is fine.
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    print(f"wrote {path.relative_to(CRATE)} ({path.stat().st_size} bytes)")


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path.relative_to(CRATE)} ({path.stat().st_size} bytes)")


# --------------------------------------------------------------------------------------
# a. tiny model + tokenizer
def build_tokenizer(records):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in LLaMA
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((generate_prompt(r) for r in records), trainer)
    assert tok.get_vocab_size() == 384, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    # LLaMA convention: BOS prepended, no EOS (training code appends EOS itself).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=128,
        padding_side="right",
    )


def build_tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # RMSNorm weights start at 1; make them non-trivial so a missing or misplaced norm
    # weight shows up in the logits.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_tiny(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def make_inputs(tokenizer, records):
    """Row 0: 10 real tokens; row 1: 7 real tokens then 3 pad (right) or 3 pad then 7 (left).
    The rows start differently so that a mix-up between batch rows cannot go unnoticed."""
    a = tokenizer(generate_prompt(records[0])).input_ids[:10]
    # The question after the fixed "Please choose the correct answer to the question: ".
    b = tokenizer(records[1]["instruction"].split(": ", 1)[1]).input_ids[:7]
    assert len(a) == 10 and len(b) == 7
    ids_r = torch.tensor([a, b + [PAD_ID] * 3], dtype=torch.int64)
    mask_r = torch.tensor([[1] * 10, [1] * 7 + [0] * 3], dtype=torch.int64)
    ids_l = torch.tensor([a, [PAD_ID] * 3 + b], dtype=torch.int64)
    mask_l = torch.tensor([[1] * 10, [0] * 3 + [1] * 7], dtype=torch.int64)
    # Exactly what transformers' generate() does (generation/utils.py,
    # prepare_inputs_for_generation): padded slots get position 1, which only affects
    # outputs at padded positions.
    pos_l = mask_l.cumsum(-1) - 1
    pos_l.masked_fill_(mask_l == 0, 1)
    return ids_r, mask_r, ids_l, mask_l, pos_l


@torch.no_grad()
def logits_of(model, inp):
    ids_r, mask_r, ids_l, mask_l, pos_l = inp
    right = model(input_ids=ids_r, attention_mask=mask_r).logits.float()
    left = model(input_ids=ids_l, attention_mask=mask_l, position_ids=pos_l).logits.float()
    return right, left


# --------------------------------------------------------------------------------------
# c. LoRA adapters
def randomize_lora(peft_model, seed):
    """Non-trivial adapter: A ~ N(0, 0.2^2), B ~ N(0, 0.1^2) (PEFT would start B at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_adapter(tiny_dir, out_dir, cfg_kwargs, seed, inp, with_merged):
    from peft import LoraConfig, get_peft_model

    base = load_tiny(tiny_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **cfg_kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg).eval()
    randomize_lora(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    # PEFT stores target_modules from a set, so its order depends on the string hash seed;
    # sort it (same json.dumps options as PEFT) to make the file reproducible.
    cfg_path = Path(out_dir) / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    # The generated model card is boilerplate with no information.
    (Path(out_dir) / "README.md").unlink(missing_ok=True)
    print(f"wrote tests/golden/{out_dir}/")
    right, left = logits_of(model, inp)
    out = {"logits": right, "logits_left": left}
    if with_merged:
        merged = model.merge_and_unload().eval()
        out["merged_logits"], out["merged_logits_left"] = logits_of(merged, inp)
    return out


# --------------------------------------------------------------------------------------
# d. training steps
def train_steps(tiny_dir, inp):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    ids, mask = inp[0], inp[1]
    labels = ids.masked_fill(mask == 0, -100)
    base = load_tiny(tiny_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                     target_modules=TARGETS_ALL)
    torch.manual_seed(1234)  # PEFT's own init: A kaiming-uniform(a=sqrt(5)), B = 0
    model = get_peft_model(base, cfg)
    model.train()

    # Map live parameter names to the adapter-file names (".default" dropped).
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    file_name = {n: n.replace(".default.", ".") for n in params}
    assert set(file_name.values()) == set(get_peft_model_state_dict(model).keys())

    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for n, p in params.items():
        out[f"init.{file_name[n]}"] = p.detach().clone()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    for step in (1, 2):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        out[f"loss{step}"] = loss.detach().reshape(1)
        for n, p in params.items():
            out[f"grad{step}.{file_name[n]}"] = p.grad.detach().clone()
        opt.step()
        for n, p in params.items():
            out[f"step{step}.{file_name[n]}"] = p.detach().clone()
        print(f"train step {step}: loss {loss.item():.6f}")
    return out


# --------------------------------------------------------------------------------------
# e. SmolLM2-135M-Instruct from its Q4_1 GGUF
def find_gguf():
    if os.environ.get("LORA_DASH_SMOLLM2_GGUF"):
        return Path(os.environ["LORA_DASH_SMOLLM2_GGUF"])
    if os.environ.get("LORA_DASH_CACHE"):
        return Path(os.environ["LORA_DASH_CACHE"]) / GGUF_NAME
    return Path.home() / ".cache" / "lora-dash" / GGUF_NAME


SMOLLM2_TEXTS = [
    "Hello, world! 123",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nWhich is a mammal?\n\n### Response:\n",
]

# (key, HF tensor, GGUF tensor, rows, cols). Q/K slices straddle the half-head boundary
# (rows 30..34 of a 64-row head) and a head boundary (rows 62..66), where a wrong
# un-permutation of llama.cpp's rotary row order shows up.
SMOLLM2_SLICES = [
    ("q_proj.r0", "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", (0, 4), (0, 8)),
    ("q_proj.r30", "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", (30, 34), (0, 8)),
    ("k_proj.r0", "model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", (0, 4), (0, 8)),
    ("k_proj.r62", "model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", (62, 66), (0, 8)),
    ("v_proj.r0", "model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", (0, 4), (0, 8)),
    ("o_proj.r0", "model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", (0, 4), (0, 8)),
    ("embed_tokens.r0", "model.embed_tokens.weight", "token_embd.weight", (0, 2), (0, 8)),
    ("embed_tokens.r1000", "model.embed_tokens.weight", "token_embd.weight", (1000, 1002), (0, 8)),
    ("gate_proj.r0", "model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", (0, 2), (0, 8)),
    ("up_proj.r0", "model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", (0, 2), (0, 8)),
    ("down_proj.r0", "model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", (0, 2), (0, 8)),
    ("down_proj.L29.r0", "model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight", (0, 2), (0, 8)),
]


def smollm2_reference_tokenizer(tok):
    """The pre-tokenizer of the original SmolLM2 tokenizer.json (digits split one by one,
    then byte-level), built over the GGUF's vocab/merges. transformers 4.46's GGUF
    converter uses plain ByteLevel; both must agree on the golden texts."""
    from tokenizers import Tokenizer, pre_tokenizers

    j = json.loads(tok.backend_tokenizer.to_str())
    j["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    j["post_processor"] = None
    t = Tokenizer.from_str(json.dumps(j))
    assert isinstance(t.pre_tokenizer, pre_tokenizers.Sequence)
    return t


def smollm2(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    meta = load_gguf_checkpoint(str(gguf), return_tensors=False)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
    # The GGUF has no output.weight (SmolLM2 ties lm_head to the embedding), and
    # transformers 4.46 leaves lm_head randomly initialised in that case; tie it by hand.
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    model.eval()

    # GGUF metadata says tokenizer.ggml.add_bos_token = false, but transformers 4.46's
    # GGUF tokenizer prepends <|im_start|> regardless; ids are therefore taken without
    # special tokens, which is what llama.cpp and the original tokenizer.json produce.
    ref = smollm2_reference_tokenizer(tok)
    ids = []
    for text in SMOLLM2_TEXTS:
        a = tok(text, add_special_tokens=False).input_ids
        b = ref.encode(text, add_special_tokens=False).ids
        assert a == b, (text, a, b)
        ids.append(a)

    out = {f"ids_{i}": torch.tensor(x, dtype=torch.int64) for i, x in enumerate(ids)}
    with torch.no_grad():
        logits = model(input_ids=out["ids_2"][None]).logits[0].float()  # (T, 49152)
    out["alpaca_logits_head"] = logits[:, :1024]
    out["alpaca_logits_last"] = logits[-1]
    out["alpaca_argmax"] = logits.argmax(-1).to(torch.int64)
    sd = model.state_dict()
    slices = []
    for key, hf, gg, (r0, r1), (c0, c1) in SMOLLM2_SLICES:
        out[f"w.{key}"] = sd[hf][r0:r1, c0:c1].float()
        slices.append({"key": f"w.{key}", "tensor": hf, "gguf_tensor": gg,
                       "rows": [r0, r1], "cols": [c0, c1]})
    for key, name, gg in (("input_layernorm.L0", "model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                          ("norm", "model.norm.weight", "output_norm.weight")):
        out[f"w.{key}"] = sd[name][:8].float()
        slices.append({"key": f"w.{key}", "tensor": name, "gguf_tensor": gg, "rows": [0, 8]})

    top5 = torch.topk(out["alpaca_logits_last"], 5)
    info = {
        "gguf_file": f,
        "versions": versions(),
        "notes": [
            "token ids: no BOS/EOS added (GGUF tokenizer.ggml.add_bos_token = false)",
            "lm_head tied to model.embed_tokens.weight (the GGUF has no output.weight)",
            "weights dequantized by gguf 0.10.0 via transformers 4.46.3, Q/K rows un-permuted",
            "logits computed in float32 on CPU, eager attention over the whole prompt",
        ],
        "config": {k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps",
            "max_position_embeddings")},
        "tokenizer": {"bos_token_id": int(meta["config"].get("bos_token_id", 1)),
                      "eos_token_id": 2, "add_bos_token": False},
        "texts": [{"text": t, "key": f"ids_{i}", "ids": x,
                   "tokens": tok.convert_ids_to_tokens(x)} for i, (t, x) in enumerate(zip(SMOLLM2_TEXTS, ids))],
        "alpaca_argmax": out["alpaca_argmax"].tolist(),
        "alpaca_last_top5": {"ids": top5.indices.tolist(), "logits": top5.values.tolist()},
        "weight_slices": slices,
    }
    return out, info


# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="ARC-Easy train.json (LLM-Adapters format) for the tiny tokenizer")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct Q4_1 GGUF")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    # Silences "sequence longer than model_max_length" (only tokenization, never a forward
    # pass, sees the long prompts) and the lm_head notice handled in smollm2().
    import transformers

    transformers.logging.set_verbosity_error()
    # Relative paths inside the adapter configs ("tiny-llama"), never absolute ones.
    os.chdir(GOLDEN)

    records = json.loads(args.data.read_text())
    tokenizer = build_tokenizer(records)
    model = build_tiny_model()
    model.save_pretrained("tiny-llama", safe_serialization=True)
    tokenizer.save_pretrained("tiny-llama")
    print("wrote tests/golden/tiny-llama/")

    # The saved tokenizer must round-trip through AutoTokenizer unchanged.
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained("tiny-llama")
    tok_texts = ["Hello, world! 123", records[0]["instruction"], generate_prompt(records[0]),
                 "the correct answer is answer2</s>"]
    tok_golden = []
    for t in tok_texts:
        ids = tokenizer(t).input_ids
        assert ids == reloaded(t).input_ids
        tok_golden.append({"text": t, "ids": ids, "ids_no_special": tokenizer(t, add_special_tokens=False).input_ids})
    write_json(GOLDEN / "tiny_tokenizer_golden.json",
               {"tokenizer": "tiny-llama/tokenizer.json", "add_bos_token": True, "bos_token_id": 1,
                "eos_token_id": 2, "unk_token_id": 0, "pad_token_id": 0, "texts": tok_golden})

    model = load_tiny("tiny-llama")  # reloaded, so goldens are of exactly the saved weights
    inp = make_inputs(tokenizer, records)
    right, left = logits_of(model, inp)
    save_st(GOLDEN / "tiny_logits.safetensors", {
        "input_ids": inp[0], "attention_mask": inp[1], "logits": right,
        "input_ids_left": inp[2], "attention_mask_left": inp[3], "position_ids_left": inp[4],
        "logits_left": left,
    })

    lora = make_adapter("tiny-llama", "tiny-lora",
                        dict(r=4, lora_alpha=8, target_modules=TARGETS_ALL), 42, inp, True)
    save_st(GOLDEN / "tiny_lora_logits.safetensors", lora)
    rs = make_adapter("tiny-llama", "tiny-lora-rslora",
                      dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
                      43, inp, False)
    save_st(GOLDEN / "tiny_lora_rslora_logits.safetensors", rs)
    # Sanity: the adapters must actually move the logits.
    print("max |lora - base|", (lora["logits"] - right).abs().max().item(),
          "max |rslora - base|", (rs["logits"] - right).abs().max().item(),
          "max |merged - lora|", (lora["merged_logits"] - lora["logits"]).abs().max().item())

    save_st(GOLDEN / "tiny_train_step.safetensors", train_steps("tiny-llama", inp))

    if args.skip_smollm2:
        return
    gguf = args.gguf or find_gguf()
    if not gguf.is_file():
        print(f"note: {gguf} not found; SmolLM2 golden files not regenerated")
        return
    tensors, info = smollm2(gguf)
    save_st(GOLDEN / "smollm2_golden.safetensors", tensors)
    write_json(GOLDEN / "smollm2_golden.json", info)


if __name__ == "__main__":
    main()
