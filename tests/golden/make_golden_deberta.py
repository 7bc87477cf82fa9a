#!/usr/bin/env python3
"""Reference ("golden") files for the DeBERTa-v2/v3 encoder (`model_type` `deberta-v2`),
produced by the real PyTorch + transformers + PEFT stack on small random configs.

Versions (pinned in tests/golden/requirements.txt): Python 3.11, torch 2.5.1,
transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, safetensors 0.8.0, numpy 1.26.4.
Everything runs on CPU in float32 on one thread with fixed seeds; two runs write
byte-identical files. Run make_golden_bert.py first: the tiny WordPiece tokenizer and the
padded RTE inputs are taken from its outputs (tiny-bert/, bert_tiny_golden.safetensors).

Usage, from the crate root:
    python tests/golden/make_golden_deberta.py       # a few seconds

Configs (between them every option lora-dash implements):
    tiny-deberta-v3   relative_attention, position_buckets 8 (log buckets),
                      max_relative_positions -1 (-> max_position_embeddings 64),
                      share_att_key, pos_att_type [p2c, c2p], norm_rel_ebd layer_norm,
                      position_biased_input false, type_vocab_size 0, pooler gelu
    tiny-deberta-v2   share_att_key false (pos_key_proj), pos_att_type "c2p" (a string),
                      position_buckets -1, max_relative_positions 6 (shorter than the
                      inputs: clamped), position_biased_input true, type_vocab_size 2,
                      embedding_size 24 != hidden_size 32 (embed_proj), pooler tanh
    tiny-deberta-p2c  share_att_key false (pos_query_proj), pos_att_type [p2c],
                      position_buckets 16, max_relative_positions 20, norm_rel_ebd none

Outputs (under tests/golden/):
    tiny-deberta-{v3,v2,p2c}/      the random DebertaV2Model + the tiny WordPiece tokenizer
    tiny-deberta-v3-lora/          PEFT LoRA (SEQ_CLS, query/key/value_proj), classifier +
                                   pooler in modules_to_save
    tiny-deberta-v2-lora/          PEFT LoRA on query_proj, value_proj, pos_key_proj,
                                   embed_proj, classifier + pooler in modules_to_save
    deberta_tiny_golden.safetensors  per config: last hidden states, pooled output,
                                   logits of a seeded 3-label head; relative
                                   position tables; the LoRA logits (unmerged, merged)
    deberta_tiny_train_step.safetensors  two AdamW steps with the v3 adapter
"""

import json
import shutil
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent
CRATE = GOLDEN.parent.parent
sys.path.insert(0, str(GOLDEN))
from make_golden import save_st  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              hidden_act="gelu", layer_norm_eps=1e-7, initializer_range=0.2, pad_token_id=0,
              max_position_embeddings=64, relative_attention=True)
CONFIGS = {
    "tiny-deberta-v3": dict(position_buckets=8, max_relative_positions=-1, share_att_key=True,
                            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                            position_biased_input=False, type_vocab_size=0,
                            pooler_hidden_act="gelu"),
    "tiny-deberta-v2": dict(position_buckets=-1, max_relative_positions=6, share_att_key=False,
                            pos_att_type="c2p", norm_rel_ebd="none", position_biased_input=True,
                            type_vocab_size=2, embedding_size=24, pooler_hidden_act="tanh"),
    "tiny-deberta-p2c": dict(position_buckets=16, max_relative_positions=20, share_att_key=False,
                             pos_att_type=["p2c"], position_biased_input=False,
                             type_vocab_size=0, pooler_hidden_act="gelu"),
}
ADAPTERS = {
    "tiny-deberta-v3": ["query_proj", "key_proj", "value_proj"],
    "tiny-deberta-v2": ["query_proj", "value_proj", "pos_key_proj", "embed_proj"],
}
# (t, position_buckets, max_relative_positions) of the recorded build_relative_position tables.
REL_TABLES = [(40, 8, 64), (30, 16, 20), (12, -1, 6), (600, 256, 512)]


def build(name, vocab_size):
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(vocab_size=vocab_size, torch_dtype="float32", **COMMON, **CONFIGS[name])
    torch.manual_seed(0)
    model = DebertaV2Model(cfg)
    # transformers starts every bias at 0 and every LayerNorm at (1, 0); make them
    # non-trivial so that a dropped bias or norm parameter shows up in the outputs.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "LayerNorm.weight" in n:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(name, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(Path("tiny-bert") / f, Path(name) / f)
    print(f"wrote tests/golden/{name}/")


def load_cls(path, num_labels, seed, **kw):
    """DebertaV2ForSequenceClassification as a user gets it: encoder from the checkpoint,
    pooler and classifier initialised by transformers under `seed`."""
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    return DebertaV2ForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, attn_implementation="eager", **kw).eval()


def randomize_adapter(peft_model, seed):
    """A ~ N(0, 0.2^2), B ~ N(0, 0.1^2) (PEFT would start B at 0); heads moved by noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_B." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_adapter(base, targets, seed, inp):
    from peft import LoraConfig, PeftModel, get_peft_model

    out_dir = f"{base}-lora"
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                     lora_dropout=0.0, bias="none", modules_to_save=["classifier", "pooler"])
    model = get_peft_model(load_cls(base, 3, seed), cfg).eval()
    randomize_adapter(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = Path(out_dir) / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])  # PEFT writes a set
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (Path(out_dir) / "README.md").unlink(missing_ok=True)
    print(f"wrote tests/golden/{out_dir}/")
    with torch.no_grad():
        logits = model(**inp).logits
    fresh = PeftModel.from_pretrained(load_cls(base, 3, seed + 1000), out_dir).eval()
    with torch.no_grad():
        again = fresh(**inp).logits
        merged = fresh.merge_and_unload().eval()(**inp).logits
    assert torch.allclose(logits, again, atol=1e-6), (logits - again).abs().max()
    print(f"{out_dir}: max |merged - unmerged| {(merged - logits).abs().max().item():.2e}")
    return logits, merged


def train_steps(inp, labels, seed):
    from peft import PeftModel, get_peft_model_state_dict

    base = load_cls("tiny-deberta-v3", 3, seed, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    model = PeftModel.from_pretrained(base, "tiny-deberta-v3-lora", is_trainable=True)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    file_name = {n: n.replace(".modules_to_save.default.", ".").replace(".default.", ".")
                 for n in params}
    assert set(file_name.values()) == set(get_peft_model_state_dict(model).keys())
    out = {"labels": labels}
    for n, p in params.items():
        out[f"init.{file_name[n]}"] = p.detach().clone()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    for step in (1, 2):
        opt.zero_grad()
        loss = model(**inp, labels=labels).loss
        loss.backward()
        out[f"loss{step}"] = loss.detach().reshape(1)
        for n, p in params.items():
            out[f"grad{step}.{file_name[n]}"] = p.grad.detach().clone()
        opt.step()
        for n, p in params.items():
            out[f"step{step}.{file_name[n]}"] = p.detach().clone()
        print(f"train step {step}: loss {loss.item():.6f}")
    return out


def main():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    import os

    os.chdir(GOLDEN)
    vocab = AutoTokenizer.from_pretrained("tiny-bert").backend_tokenizer.get_vocab_size()
    bert = load_file("bert_tiny_golden.safetensors")
    inp = {k: bert[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    assert inp["attention_mask"].min() == 0
    gold = dict(inp)
    for t, buckets, max_rel in REL_TABLES:
        rel = build_relative_position(t, t, bucket_size=buckets, max_position=max_rel)[0]
        # rel[i][j] depends on i - j only: the first row and column hold every value.
        gold[f"rel_pos.{t}.{buckets}.{max_rel}.row0"] = rel[0]
        gold[f"rel_pos.{t}.{buckets}.{max_rel}.col0"] = rel[:, 0]
        if t <= 40:
            gold[f"rel_pos.{t}.{buckets}.{max_rel}"] = rel
    for seed, name in enumerate(CONFIGS):
        build(name, vocab)
        m = load_cls(name, 3, 100 + seed)
        with torch.no_grad():
            out = m(**inp, output_hidden_states=True)
            pooled = m.pooler(out.hidden_states[-1])
        sd = m.state_dict()
        for k in ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight",
                  "classifier.bias"):
            gold[f"{name}.{k}"] = sd[k]
        gold.update({f"{name}.last_hidden_state": out.hidden_states[-1],
                     f"{name}.pooled_output": pooled, f"{name}.logits": out.logits})
    for seed, (name, targets) in enumerate(ADAPTERS.items()):
        logits, merged = make_adapter(name, targets, 200 + seed, inp)
        gold[f"{name}.lora_logits"] = logits
        gold[f"{name}.lora_merged_logits"] = merged
    save_st(GOLDEN / "deberta_tiny_golden.safetensors", gold)
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 1, 0], dtype=torch.int64)
    save_st(GOLDEN / "deberta_tiny_train_step.safetensors", train_steps(inp, labels, 300))


if __name__ == "__main__":
    main()
