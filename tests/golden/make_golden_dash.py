#!/usr/bin/env python3
"""LoRA-Dash reference files for the Rust tests, built on the tiny model and LoRA adapter
of make_golden.py (run that first; this script only reads its outputs).

LoRA-Dash (Si et al., ICLR 2025): for a frozen W (out×in) with thin SVD W = U·Σ·Vᵀ and a
LoRA update ΔW = (α/r)·B·A, the change rate of core direction i is
δ_i = |u_iᵀ·ΔW·v_i| / σ_i; the s directions with the largest δ (ties: lower index) get a
trainable scalar each, and the layer computes

    y = x·Wᵀ + (α/r)·x·Aᵀ·Bᵀ + x·V_s·diag(c)·U_sᵀ          (the dash term is not scaled).

The same update is a plain LoRA of rank r+s with scale 1:
B' = [(α/r)·B | U_s·diag(c)], A' = [A; V_sᵀ], r' = lora_alpha' = r+s.

Same versions as make_golden.py (tests/golden/requirements.txt); CPU, float32 except the
SVD and δ, which are float64. Deterministic: two runs give byte-identical files.

Usage, from the crate root:
    python tests/golden/make_golden_dash.py

Outputs (under tests/golden/, described in README.md there):
    tiny-dash/dash_config.json, tiny-dash/dash_adapter.safetensors   native LoRA-Dash adapter
    tiny-dash/peft/                   its rank-(r+s) export as a PEFT LoRA adapter
    tiny_dash_logits.safetensors      logits of the export (PEFT), of a direct dash forward,
                                      and of the merged export
    tiny_dash_delta.safetensors       float64 σ and δ per layer and the selected indices
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# make_golden.py sits next to this file; reuse its loaders and writers (without leaving a
# __pycache__ in the golden directory).
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import CRATE, GOLDEN, TARGETS_ALL, load_tiny, logits_of, save_st  # noqa: E402

R, ALPHA = 4, 8.0  # tiny-lora's adapter (make_golden.py)
S = 3  # dash directions per layer
T = 100  # LoRA warm-up steps before the dash phase (recorded in the config only)
C_SEED = 7
PREFIX = "base_model.model."


def weight_hash(w):
    """src/tsd/svd.rs `weight_hash`: SHA-256 over each dim as u64 LE, then every f32 value
    (row-major) as LE bytes; lowercase hex."""
    h = hashlib.sha256()
    h.update(np.asarray(w.shape, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(w.detach().numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


def lora_paths(model):
    """Module paths (as in the Rust model, e.g. `model.layers.0.self_attn.q_proj`) of every
    adapted linear layer, sorted like the BTreeMap of dash_config.json."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS_ALL)


def top_s(delta, s):
    # Stable sort on -δ keeps the lower index first among equal values.
    return sorted(range(len(delta)), key=lambda i: (-delta[i], i))[:s]


def build_dash(base, lora_sd):
    """Per layer: f64 SVD, δ, top-s indices, U_s / V_s (f32) and seeded c."""
    g = torch.Generator().manual_seed(C_SEED)
    layers = {}
    for p in lora_paths(base):
        w = base.get_submodule(p).weight.detach()  # (out, in), f32
        a = lora_sd[f"{PREFIX}{p}.lora_A.weight"]  # (r, in)
        b = lora_sd[f"{PREFIX}{p}.lora_B.weight"]  # (out, r)
        u, sigma, vh = torch.linalg.svd(w.double(), full_matrices=False)  # (out,k), (k), (k,in)
        dw = (ALPHA / R) * (b.double() @ a.double())  # (out, in), dense on purpose: naive reference
        proj = ((u.T @ dw) * vh).sum(1)  # (k): u_iᵀ ΔW v_i
        delta = proj.abs() / sigma
        idx = top_s(delta.tolist(), S)
        srt = sorted(delta.tolist(), reverse=True)
        layers[p] = {
            "w": w, "a": a, "b": b, "sigma": sigma, "delta": delta, "indices": idx,
            "u_s": u[:, idx].float().contiguous(),  # (out, s)
            "v_s": vh[idx, :].T.float().contiguous(),  # (in, s)
            "c": (0.5 * torch.randn(S, generator=g, dtype=torch.float32)),  # (s)
            # Relative gap between the s-th and (s+1)-th δ: how safe the selection is
            # against f32 rounding on the Rust side.
            "gap": (srt[S - 1] - srt[S]) / srt[S - 1],
        }
    return layers


def write_native(layers, out_dir):
    tensors, cfg_layers = {}, {}
    for p, L in layers.items():
        tensors[f"{PREFIX}{p}.lora_A.weight"] = L["a"]
        tensors[f"{PREFIX}{p}.lora_B.weight"] = L["b"]
        tensors[f"{PREFIX}{p}.dash_U"] = L["u_s"]
        tensors[f"{PREFIX}{p}.dash_V"] = L["v_s"]
        tensors[f"{PREFIX}{p}.dash_c"] = L["c"]
        cfg_layers[p] = {"indices": L["indices"], "base_hash": weight_hash(L["w"])}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_st(out_dir / "dash_adapter.safetensors", tensors)
    # Field order of DashAdapterConfig (src/io/dash.rs); 2-space indent and no trailing
    # newline, as serde_json::to_string_pretty writes it.
    cfg = {
        "method": "lora-dash",
        "base_model_name_or_path": "tiny-llama",
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": sorted(TARGETS_ALL),
        "t": T,
        "s": S,
        "freeze_ab": False,
        "layers": cfg_layers,
    }
    path = out_dir / "dash_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    print(f"wrote {path.relative_to(CRATE)} ({path.stat().st_size} bytes)")


def export_factors(L):
    """B' = [(α/r)·B | U_s·diag(c)] (out, r+s), A' = [A; V_sᵀ] (r+s, in)."""
    b2 = torch.cat([(ALPHA / R) * L["b"], L["u_s"] * L["c"]], dim=1)
    a2 = torch.cat([L["a"], L["v_s"].T], dim=0)
    return a2, b2


def write_export(layers, out_dir):
    from peft import LoraConfig, get_peft_model

    rp = R + S
    cfg = LoraConfig(task_type="CAUSAL_LM", r=rp, lora_alpha=rp, lora_dropout=0.0, bias="none",
                     target_modules=TARGETS_ALL)
    model = get_peft_model(load_tiny("tiny-llama"), cfg).eval()
    with torch.no_grad():
        for p, L in layers.items():
            a2, b2 = export_factors(L)
            m = model.base_model.model.get_submodule(p)
            assert m.scaling["default"] == 1.0
            m.lora_A["default"].weight.copy_(a2)
            m.lora_B["default"].weight.copy_(b2)
    model.save_pretrained(out_dir, safe_serialization=True)
    # As in make_golden.py: target_modules sorted (PEFT saves a set), model card dropped.
    cfg_path = out_dir / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (out_dir / "README.md").unlink(missing_ok=True)
    print(f"wrote {out_dir.relative_to(CRATE)}/")


def dash_model(layers):
    """The base model with forward hooks adding the LoRA and dash terms directly."""
    model = load_tiny("tiny-llama")
    for p, L in layers.items():
        a, b, u_s, v_s, c = L["a"], L["b"], L["u_s"], L["v_s"], L["c"]

        def hook(mod, args, out, a=a, b=b, u_s=u_s, v_s=v_s, c=c):
            x = args[0]  # (batch, seq, in)
            lora = (ALPHA / R) * ((x @ a.T) @ b.T)  # (batch, seq, out)
            dash = ((x @ v_s) * c) @ u_s.T  # (batch, seq, s) -> (batch, seq, out)
            return out + lora + dash

        model.get_submodule(p).register_forward_hook(hook)
    return model


def main():
    torch.use_deterministic_algorithms(True)
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    os.chdir(GOLDEN)  # relative "tiny-llama" in the adapter configs

    t = load_file("tiny_logits.safetensors")
    inp = (t["input_ids"], t["attention_mask"], t["input_ids_left"], t["attention_mask_left"],
           t["position_ids_left"])
    lora_sd = load_file("tiny-lora/adapter_model.safetensors")
    base = load_tiny("tiny-llama")
    layers = build_dash(base, lora_sd)
    assert len(layers) == 14 and len(lora_sd) == 28
    for p, L in layers.items():
        print(f"{p}: indices {L['indices']} δ {[round(L['delta'][i].item(), 5) for i in L['indices']]}"
              f" relative gap to next {L['gap']:.3f} c {[round(x, 4) for x in L['c'].tolist()]}")

    dash_dir = GOLDEN / "tiny-dash"
    write_native(layers, dash_dir)
    write_export(layers, dash_dir / "peft")

    # The export, reloaded from disk by PEFT onto a fresh base.
    peft_model = PeftModel.from_pretrained(load_tiny("tiny-llama"), "tiny-dash/peft").eval()
    logits, logits_left = logits_of(peft_model, inp)
    dash_logits, dash_logits_left = logits_of(dash_model(layers), inp)
    merged_logits, _ = logits_of(peft_model.merge_and_unload().eval(), inp)

    valid = t["attention_mask"].bool()
    valid_l = t["attention_mask_left"].bool()
    d_dash = (logits - dash_logits)[valid].abs().max().item()
    d_dash_l = (logits_left - dash_logits_left)[valid_l].abs().max().item()
    d_merged = (logits - merged_logits)[valid].abs().max().item()
    lora_logits = load_file("tiny_lora_logits.safetensors")["logits"]
    d_lora = (logits - lora_logits)[valid].abs().max().item()
    d_pad = (logits[1, :7] - logits_left[1, 3:]).abs().max().item()
    print(f"max |PEFT export - direct dash| {d_dash:.3g} (left-padded {d_dash_l:.3g}), "
          f"max |merged - PEFT export| {d_merged:.3g}, max |dash - plain LoRA| {d_lora:.3g} "
          f"(the dash term must move the logits), right vs left padding {d_pad:.3g}")
    assert d_dash < 1e-4 and d_dash_l < 1e-4 and d_merged < 1e-4 and d_pad < 1e-4
    assert d_lora > 1e-2

    save_st(GOLDEN / "tiny_dash_logits.safetensors", {
        "logits": logits, "logits_left": logits_left,
        "dash_logits": dash_logits, "merged_logits": merged_logits,
    })
    delta = {}
    for p, L in layers.items():
        delta[p] = L["delta"]
        delta[f"{p}.sigma"] = L["sigma"]
        delta[f"{p}.indices"] = torch.tensor(L["indices"], dtype=torch.int64)
    save_st(GOLDEN / "tiny_dash_delta.safetensors", delta)


if __name__ == "__main__":
    main()
