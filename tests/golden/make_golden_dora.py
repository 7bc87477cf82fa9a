#!/usr/bin/env python3
"""DoRA reference files for the Rust tests, on the tiny LLaMA of make_golden.py (run that
first; this script reads tests/golden/tiny-llama and tiny_logits.safetensors).

DoRA is PEFT 0.13.2's own `use_dora=True` (`DoraLinearLayer`): magnitude m initialised to
‖W + s·B·A‖ per output row (B = 0 at init, so ‖W‖), output
x·Wᵀ + (k − 1)⊙(drop(x)·Wᵀ) + k⊙s·drop(x)·Aᵀ·Bᵀ with k = m / ‖W + s·B·A‖ (detached).
B is then set to seeded non-zero values (PEFT would start it at 0) so that k ≠ 1 and A gets
a gradient at the first step.

Versions: tests/golden/requirements.txt (torch 2.5.1, transformers 4.46.3, peft 0.13.2,
safetensors 0.8.0); CPU, float32, seeded.

Usage, from the crate root:
    python tests/golden/make_golden_dora.py

Outputs (under tests/golden/):
    tiny-dora/                 the PEFT DoRA adapter (r = 4, α = 8, q/v/down_proj), B non-zero
    tiny_dora.safetensors
        logits, merged_logits  the adapter's logits (eval) and those of merge_and_unload(),
                               right-padded batch of tiny_logits.safetensors
        labels                 the batch's labels (pad = -100)
        init.<key>, grad{1,2}.<key>, step{1,2}.<key>, loss{1,2}
                               two AdamW steps (lr 1e-3, wd 0.01) in train mode, dropout 0;
                               <key> as in adapter_model.safetensors
"""

import json
import sys
from pathlib import Path

import torch

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import GOLDEN, load_tiny, save_st  # noqa: E402

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj", "down_proj"]
B_SEED = 21


def file_key(name):
    """Live parameter name → adapter_model.safetensors key (PEFT's renaming)."""
    k = name.replace(".default", "")
    return k[: -len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k


def main():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    g = load_file(GOLDEN / "tiny_logits.safetensors")
    ids, mask = g["input_ids"], g["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                     target_modules=TARGETS, use_dora=True)
    torch.manual_seed(1234)
    model = get_peft_model(load_tiny(GOLDEN / "tiny-llama"), cfg)
    gen = torch.Generator().manual_seed(B_SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))

    dest = GOLDEN / "tiny-dora"
    model.save_pretrained(dest)
    cfg_path = dest / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    saved["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (dest / "README.md").unlink(missing_ok=True)
    print(f"wrote {dest}")

    out = {"labels": labels}
    model.eval()
    with torch.no_grad():
        out["logits"] = model(input_ids=ids, attention_mask=mask).logits.float()

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    keys = {n: file_key(n) for n in params}
    assert set(keys.values()) == set(get_peft_model_state_dict(model).keys())
    for n, p in params.items():
        out[f"init.{keys[n]}"] = p.detach().clone()
    model.train()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    for step in (1, 2):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        out[f"loss{step}"] = loss.detach().reshape(1)
        for n, p in params.items():
            out[f"grad{step}.{keys[n]}"] = p.grad.detach().clone()
        opt.step()
        for n, p in params.items():
            out[f"step{step}.{keys[n]}"] = p.detach().clone()
        print(f"DoRA train step {step}: loss {loss.item():.6f}")

    # Merge the saved (pre-training) adapter, as `lora-dash merge` does.
    from peft import PeftModel

    fresh = PeftModel.from_pretrained(load_tiny(GOLDEN / "tiny-llama"), dest)
    merged = fresh.merge_and_unload().eval()
    with torch.no_grad():
        out["merged_logits"] = merged(input_ids=ids, attention_mask=mask).logits.float()
    d = (out["merged_logits"] - out["logits"]).abs().max().item()
    print(f"PEFT merged vs unmerged DoRA: max |diff| {d:.3e}")
    save_st(GOLDEN / "tiny_dora.safetensors", out)


if __name__ == "__main__":
    main()
