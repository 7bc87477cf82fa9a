#!/usr/bin/env python3
"""PiSSA / MiLoRA reference files for the Rust tests, on the tiny LLaMA of make_golden.py
(run that first; this script only reads tests/golden/tiny-llama and the shared inputs).

PiSSA is PEFT 0.13.2's own `init_lora_weights="pissa"` (`LoraLayer.pissa_init`): with
W = U·diag(σ)·Vᵀ, A₀ = diag(√(σ_r/s))·V_rᵀ, B₀ = U_r·diag(√(σ_r/s)), base ← W − s·B₀·A₀.
PEFT 0.13.2 has no MiLoRA init; MiLoRA's residual is computed here the same way from the r
*smallest* triplets (torch.linalg.svd, float32), as the MiLoRA paper defines it.

SVD signs differ between libraries, so only sign-invariant quantities are compared in Rust:
the residual, s·B₀·A₀ and logits. To test the trained-adapter path without matching signs,
the PiSSA factors are moved away from their init by a seeded perturbation (a stand-in for
training), the adapter is saved with PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` (the rank-2r LoRA for the
original base), and that adapter is loaded by PEFT onto the unmodified base.

Versions: tests/golden/requirements.txt (torch 2.5.1, transformers 4.46.3, peft 0.13.2,
safetensors 0.8.0); CPU, float32, seeded.

Usage, from the crate root:
    python tests/golden/make_golden_pissa.py

Outputs (under tests/golden/):
    tiny-pissa/           PEFT's converted rank-2r LoRA adapter (r = 4 → 8, α = 8 → 16)
    tiny_pissa.safetensors
        residual.<path>            PiSSA residual W − s·B₀·A₀ (PEFT), every target but
                                   layer 1's down_proj (kept small)
        milora_residual.<path>     the same for MiLoRA (r smallest triplets), layer 0
        exact_residual.<path>      PiSSA's residual from a float64 SVD, layer 0
        init_logits                logits of the PiSSA-initialised model (PEFT)
        trained_logits             logits of the perturbed PiSSA model (residual base)
        converted_logits           PEFT: original base + tiny-pissa/
    (right-padded batch of tiny_logits.safetensors)
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import GOLDEN, load_tiny, logits_of, save_st  # noqa: E402

R, ALPHA = 4, 8.0
SCALE = ALPHA / R
TARGETS = ["q_proj", "v_proj", "down_proj"]
PERTURB_SEED = 11


def inputs():
    """The right- and left-padded batches of tiny_logits.safetensors (make_golden.py)."""
    from safetensors.torch import load_file

    g = load_file(GOLDEN / "tiny_logits.safetensors")
    return (g["input_ids"], g["attention_mask"], g["input_ids_left"],
            g["attention_mask_left"], g["position_ids_left"])


def targeted(model):
    return [(n, m) for n, m in model.named_modules()
            if n.split(".")[-1] in TARGETS and isinstance(m, torch.nn.Linear)]


def exact_residuals(base):
    """The PiSSA residual of layer 0's targets from a float64 SVD: what both float32 SVDs
    approximate (their subspaces err by ~eps·σ₁/(σ_r − σ_{r+1}))."""
    out = {}
    for name, m in targeted(base):
        if name.startswith("model.layers.0."):
            w = m.weight.detach().to(torch.float64)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            out[f"exact_residual.{name}"] = (w - u[:, :R] @ torch.diag(s[:R]) @ vh[:R]).float()
    return out


def milora_residuals(base):
    out = {}
    for name, m in targeted(base):
        if not name.startswith("model.layers.0."):
            continue
        w = m.weight.detach().to(torch.float32)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = s[-R:] / SCALE
        a0 = torch.diag(torch.sqrt(sr)) @ vh[-R:]
        b0 = u[:, -R:] @ torch.diag(torch.sqrt(sr))
        out[f"milora_residual.{name}"] = w - SCALE * b0 @ a0
    return out


def main():
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    inp = inputs()
    tiny = GOLDEN / "tiny-llama"
    out = milora_residuals(load_tiny(tiny))
    out.update(exact_residuals(load_tiny(tiny)))

    cfg = LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                     target_modules=TARGETS, init_lora_weights="pissa")
    model = get_peft_model(load_tiny(tiny), cfg).eval()
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            path = name.removeprefix("base_model.model.")
            if path.startswith("model.layers.0.") or "down_proj" not in path:
                out[f"residual.{path}"] = m.base_layer.weight.detach().clone()
            if f"exact_residual.{path}" in out:
                w = m.base_layer.weight.detach()
                d = (w - out[f"exact_residual.{path}"]).abs().max().item()
                print(f"PEFT residual {path} vs float64: max |diff| {d:.3e}")
    out["init_logits"] = logits_of(model, inp)[0]

    work = Path(tempfile.mkdtemp())
    try:
        # The initial adapter, saved as PEFT's docs say: with init_lora_weights = True.
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(work / "init")
        model.peft_config["default"].init_lora_weights = "pissa"
        g = torch.Generator().manual_seed(PERTURB_SEED)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if ".lora_A." in name or ".lora_B." in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        out["trained_logits"] = logits_of(model, inp)[0]
        dest = GOLDEN / "tiny-pissa"
        shutil.rmtree(dest, ignore_errors=True)
        model.save_pretrained(dest, path_initial_model_for_weight_conversion=str(work / "init"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cfg_path = dest / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    saved["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (dest / "README.md").unlink(missing_ok=True)
    print(f"wrote {dest} (r = {saved['r']}, lora_alpha = {saved['lora_alpha']})")

    converted = PeftModel.from_pretrained(load_tiny(tiny), dest).eval()
    out["converted_logits"] = logits_of(converted, inp)[0]
    d = (out["converted_logits"] - out["trained_logits"]).abs().max().item()
    print(f"PEFT: converted adapter on the original base vs PiSSA on the residual: max |diff| {d:.3e}")
    save_st(GOLDEN / "tiny_pissa.safetensors", out)


if __name__ == "__main__":
    main()
