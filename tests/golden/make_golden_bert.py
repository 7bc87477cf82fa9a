#!/usr/bin/env python3
"""Reference ("golden") files for the BERT encoder / GLUE classification path, produced by
the real PyTorch + transformers + PEFT stack.

Versions (pinned in tests/golden/requirements.txt): Python 3.11, torch 2.5.1,
transformers 4.46.3, peft 0.13.2, tokenizers 0.20.3, safetensors 0.8.0, numpy 1.26.4.
Everything runs on CPU in float32 on one thread with fixed seeds; two runs write
byte-identical files.

Usage, from the crate root:
    pip install -r tests/golden/requirements.txt
    python tests/golden/make_golden_bert.py          # a few seconds on two cores

Outputs (all under tests/golden/, described in README.md there):
    tiny-bert/                     random 2-layer BertModel (with pooler) + WordPiece tokenizer
    tiny-bert-nopool/              the same encoder saved without pooler weights
    tiny-bert-lora/                PEFT LoRA (SEQ_CLS, q/k/v) on tiny-bert, classifier saved
    tiny-bert-nopool-lora/         PEFT LoRA on tiny-bert-nopool, classifier + pooler saved
    bert_tiny_inputs.json          texts and their ids under the tiny tokenizer
    bert_tiny_golden.safetensors   inputs, hidden states, pooled output, classification and
                                   regression heads (logits, MSE loss)
    bert_tiny_lora_logits.safetensors   logits with each adapter (unmerged and merged)
    bert_tiny_train_step.safetensors    loss, LoRA/classifier gradients, AdamW steps
    bert_minilm_tokenizer_golden.json   all-MiniLM-L6-v2 token ids of GLUE texts
    bert_minilm_golden.safetensors      all-MiniLM-L6-v2 + seeded classifier: pooled
                                        output and logits (skipped when the model is absent)

all-MiniLM-L6-v2 is found via --minilm, else $LORA_DASH_MINILM, else
$LORA_DASH_CACHE/all-MiniLM-L6-v2, else ~/.cache/lora-dash/all-MiniLM-L6-v2
(scripts/fetch-minilm.sh puts it there).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent
CRATE = GOLDEN.parent.parent
sys.path.insert(0, str(GOLDEN))
from make_golden import save_st, versions, write_json  # noqa: E402

DATA = CRATE.parent / "shared" / "data" / "glue"
MINILM_NAME = "all-MiniLM-L6-v2"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
TARGETS = ["query", "key", "value"]
MAX_LEN_TINY = 24


# --------------------------------------------------------------------------------------
# GLUE TSV readers: tab-separated, no field quoting (a '"' inside a sentence is text).
def read_tsv(path, header):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = [ln.split("\t") for ln in lines]
    return rows[1:] if header else rows


def rte_pairs(path):
    """(sentence1, sentence2, label) of an RTE file with header index/sentence1/sentence2/label."""
    return [(r[1], r[2], r[3]) for r in read_tsv(path, header=True)]


def cola_sentences(path):
    """Last column of CoLA's raw files (source, label, original mark, sentence; no header)."""
    return [r[-1] for r in read_tsv(path, header=False)]


# --------------------------------------------------------------------------------------
# a. tiny BERT + WordPiece tokenizer
def bert_template():
    from tokenizers import processors

    # Exactly the post-processor of bert-base-uncased's tokenizer.json (ids 2 and 3 here).
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )


def wordpiece_vocab(words, size, n_alphabet=60):
    """A WordPiece vocabulary built deterministically from word counts.

    The `tokenizers` WordPieceTrainer breaks frequency ties in hash-map order, so two runs
    give different vocabularies; this builder orders every choice by (-count, string):
    specials, the `n_alphabet` most frequent characters (the rest become [UNK]), each of
    them as a continuation piece `##c`, then the most frequent whole words, word-initial
    pieces and `##` suffix pieces (lengths 2..5), interleaved by count, up to `size`."""
    from collections import Counter

    chars = Counter()
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
    alphabet = [ch for ch, _ in sorted(chars.items(), key=lambda x: (-x[1], x[0]))[:n_alphabet]]
    known = set(alphabet)
    pieces = Counter()
    for w, c in words.items():
        if len(w) < 2 or not set(w) <= known:
            continue
        pieces[w] += c
        for n in range(2, min(5, len(w) - 1) + 1):
            pieces[w[:n]] += c
            pieces["##" + w[-n:]] += c
    vocab = SPECIALS + alphabet + ["##" + ch for ch in alphabet]
    seen = set(vocab)
    for p, _ in sorted(pieces.items(), key=lambda x: (-x[1], x[0])):
        if len(vocab) == size:
            break
        if p not in seen:
            vocab.append(p)
            seen.add(p)
    assert len(vocab) == size, len(vocab)
    return {t: i for i, t in enumerate(vocab)}


def build_tokenizer(texts):
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(words, 512), unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    tok.post_processor = bert_template()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=128,
        padding_side="right",
        truncation_side="right",
    )


def build_tiny_bert(vocab_size):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=128,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=True)
    # transformers starts every bias at 0 and every LayerNorm at (1, 0); make them
    # non-trivial so that a dropped bias or norm parameter shows up in the outputs.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_cls(path, num_labels, seed, **kw):
    """BertForSequenceClassification as a user gets it: encoder from the checkpoint,
    classifier (and a missing pooler) initialised by transformers under `seed`."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, attn_implementation="eager", **kw).eval()


# --------------------------------------------------------------------------------------
# b. inputs
def tiny_inputs(tokenizer, dev_rows):
    """6 RTE dev pairs + 2 short single sentences (RTE dev hypotheses), truncated to 24
    tokens (longest_first) and right-padded to the longest row, as DataCollatorWithPadding
    would pad them."""
    pairs = [(a, b) for a, b, _ in dev_rows[:6]]
    singles = [dev_rows[7][1], dev_rows[6][1]]
    enc = [tokenizer(a, b, truncation=True, max_length=MAX_LEN_TINY) for a, b in pairs]
    enc += [tokenizer(s, truncation=True, max_length=MAX_LEN_TINY) for s in singles]
    batch = tokenizer.pad(enc, padding=True, return_tensors="pt")
    texts = [{"text_a": a, "text_b": b} for a, b in pairs] + [{"text_a": s, "text_b": None}
                                                             for s in singles]
    for t, e in zip(texts, enc):
        t["input_ids"], t["token_type_ids"] = e["input_ids"], e["token_type_ids"]
        t["tokens"] = tokenizer.convert_ids_to_tokens(e["input_ids"])
        t["truncated"] = len(tokenizer(t["text_a"], t["text_b"]).input_ids) > MAX_LEN_TINY
    inp = {k: batch[k].to(torch.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
    return inp, texts


@torch.no_grad()
def run_cls(model, inp):
    out = model(**inp, output_hidden_states=True)
    bert = model.bert if hasattr(model, "bert") else model.base_model.model.bert
    pooled = bert.pooler(out.hidden_states[-1])
    return out, pooled


# --------------------------------------------------------------------------------------
# d. LoRA adapters
def randomize_adapter(peft_model, seed):
    """Non-trivial adapter: A ~ N(0, 0.2^2), B ~ N(0, 0.1^2) (PEFT would start B at 0);
    every modules_to_save copy (classifier, pooler) moved by N(0, 0.1^2) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_adapter(base_dir, out_dir, modules_to_save, seed, inp):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_cls(base_dir, 3, seed)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS,
                     lora_dropout=0.0, bias="none", modules_to_save=modules_to_save)
    model = get_peft_model(base, cfg).eval()
    randomize_adapter(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    # PEFT stores target_modules from a set, so its order depends on the string hash seed;
    # sort it (same json.dumps options as PEFT) to make the file reproducible.
    # modules_to_save is a list and is kept exactly as PEFT wrote it.
    cfg_path = Path(out_dir) / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (Path(out_dir) / "README.md").unlink(missing_ok=True)  # boilerplate model card
    print(f"wrote tests/golden/{out_dir}/")
    with torch.no_grad():
        logits = model(**inp).logits

    # The saved adapter, loaded onto a base whose classifier/pooler init differs, must
    # reproduce the logits: every trained head parameter comes from the adapter file.
    fresh = PeftModel.from_pretrained(load_cls(base_dir, 3, seed + 1000), out_dir).eval()
    with torch.no_grad():
        again = fresh(**inp).logits
        merged = fresh.merge_and_unload().eval()(**inp).logits
    assert torch.allclose(logits, again, atol=1e-6), (logits - again).abs().max()
    print(f"{out_dir}: max |merged - unmerged| {(merged - logits).abs().max().item():.2e}")
    return logits, merged


# --------------------------------------------------------------------------------------
# e. training steps
def train_steps(inp, labels, seed):
    from peft import PeftModel, get_peft_model_state_dict

    base = load_cls("tiny-bert", 3, seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = PeftModel.from_pretrained(base, "tiny-bert-lora", is_trainable=True)
    model.train()

    # Live parameter names -> adapter-file names (".default" and ".modules_to_save" dropped).
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
        # The loss BertForSequenceClassification computes for integer labels, num_labels > 1.
        logits = model(**inp).logits
        ce = torch.nn.functional.cross_entropy(logits, labels)
        assert torch.allclose(loss, ce, atol=1e-6)
        loss.backward()
        out[f"loss{step}"] = loss.detach().reshape(1)
        out[f"logits{step}"] = logits.detach()
        for n, p in params.items():
            out[f"grad{step}.{file_name[n]}"] = p.grad.detach().clone()
        opt.step()
        for n, p in params.items():
            out[f"step{step}.{file_name[n]}"] = p.detach().clone()
        print(f"train step {step}: loss {loss.item():.6f}")
    return out


# --------------------------------------------------------------------------------------
# f. all-MiniLM-L6-v2
def find_minilm(arg):
    if arg:
        return Path(arg)
    if os.environ.get("LORA_DASH_MINILM"):
        return Path(os.environ["LORA_DASH_MINILM"])
    if os.environ.get("LORA_DASH_CACHE"):
        return Path(os.environ["LORA_DASH_CACHE"]) / MINILM_NAME
    return Path.home() / ".cache" / "lora-dash" / MINILM_NAME


def minilm_tokenizer_golden(d, rte_dev, cola_dev):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    # The raw tokenizer.json carries truncation to 128 and fixed padding to 128;
    # transformers replaces both per call. Cross-check against the raw file with them off.
    raw = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    raw.no_padding()

    quoted = [(a, b) for a, b, _ in rte_dev[20:] if '"' in a + b][:4]
    items = [(a, b, "rte_dev") for a, b, _ in rte_dev[:20]]
    items += [(s, None, "cola_in_domain_dev") for s in cola_dev[:10]]
    items += [(a, b, "rte_dev_quoted") for a, b in quoted]
    # Edge cases of BERT's normalizer / pre-tokenizer / WordPiece.
    items += [("Café naïve résumé — “quoted” 'single' 1,000.50 $5 e-mail U.S.A.", None, "handmade"),
              ("Tabs\tand  double  spaces\nand a newline; ÀÉÎ 東京 ☃ [SEP] [MASK] x" + "y" * 120, None,
               "handmade")]
    entries = []
    for max_len in (128, 24):
        raw.enable_truncation(max_len, strategy="longest_first")
        for a, b, src in items:
            e = tok(a, b, truncation=True, max_length=max_len)
            r = raw.encode(a, b) if b is not None else raw.encode(a)
            assert e["input_ids"] == r.ids and e["token_type_ids"] == r.type_ids, (a, b)
            entries.append({"source": src, "text_a": a, "text_b": b, "max_length": max_len,
                            "input_ids": e["input_ids"], "token_type_ids": e["token_type_ids"],
                            "tokens": tok.convert_ids_to_tokens(e["input_ids"])})
    n_trunc = sum(len(e["input_ids"]) == e["max_length"] for e in entries)
    print(f"minilm tokenizer: {len(entries)} encodings, {n_trunc} at max_length")
    return tok, {
        "tokenizer": f"{MINILM_NAME}/tokenizer.json",
        "versions": versions(),
        "notes": [
            "truncation=True (longest_first: the longer of text_a/text_b loses its last token "
            "first), no padding; text_b null = single sentence",
            "tokenizer.json itself sets truncation max_length 128 and padding Fixed 128; "
            "transformers overrides both per call, as do these ids",
        ],
        "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
        "entries": entries,
    }


def minilm_logits(d, tok, rte_dev, seed):
    rows = rte_dev[:4]
    batch = tok([a for a, _, _ in rows], [b for _, b, _ in rows], truncation=True,
                max_length=128, padding=True, return_tensors="pt")
    inp = {k: batch[k].to(torch.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
    model = load_cls(str(d), 2, seed)
    out, pooled = run_cls(model, inp)
    sd = model.state_dict()
    return {
        **inp,
        "classifier.weight": sd["classifier.weight"],
        "classifier.bias": sd["classifier.bias"],
        "cls_hidden": out.hidden_states[-1][:, 0, :],  # last_hidden_state at [CLS]
        "pooled_output": pooled,
        "logits": out.logits,
        # Slices of the loaded weights, to catch a mis-mapped checkpoint name.
        "w.word_embeddings.r101": sd["bert.embeddings.word_embeddings.weight"][101:103, :8],
        "w.layer5.value.r0": sd["bert.encoder.layer.5.attention.self.value.weight"][:2, :8],
        "w.pooler.dense.r0": sd["bert.pooler.dense.weight"][:2, :8],
    }


# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "rte" / "train.tsv",
                    help="RTE train.tsv, text for the tiny WordPiece tokenizer")
    ap.add_argument("--rte-dev", type=Path, default=DATA / "rte" / "dev.tsv")
    ap.add_argument("--cola-dev", type=Path, default=DATA / "cola" / "in_domain_dev.tsv")
    ap.add_argument("--minilm", default=None, help=f"{MINILM_NAME} Hugging Face directory")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    args.data, args.rte_dev, args.cola_dev = (p.resolve() for p in (args.data, args.rte_dev, args.cola_dev))

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one summation order, so reruns are byte-identical
    import transformers

    transformers.logging.set_verbosity_error()
    # Relative paths inside the adapter configs ("tiny-bert"), never absolute ones.
    os.chdir(GOLDEN)

    train = rte_pairs(args.data)
    rte_dev = rte_pairs(args.rte_dev)
    tokenizer = build_tokenizer([s for a, b, _ in train for s in (a, b)])
    base = build_tiny_bert(tokenizer.backend_tokenizer.get_vocab_size())
    base.save_pretrained("tiny-bert", safe_serialization=True)
    tokenizer.save_pretrained("tiny-bert")
    from transformers import BertModel

    nopool = BertModel(base.config, add_pooling_layer=False)
    nopool.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")})
    nopool.save_pretrained("tiny-bert-nopool", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path("tiny-bert") / f, Path("tiny-bert-nopool") / f)
    print("wrote tests/golden/tiny-bert/, tests/golden/tiny-bert-nopool/")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("tiny-bert")  # exactly the saved tokenizer
    inp, texts = tiny_inputs(tokenizer, rte_dev)
    assert inp["attention_mask"].min() == 0 and any(t["truncated"] for t in texts)
    unk_text = "Zoë's café — naïve ✓"
    write_json(GOLDEN / "bert_tiny_inputs.json", {
        "tokenizer": "tiny-bert/tokenizer.json", "max_length": MAX_LEN_TINY,
        "pad_token_id": 0, "unk_token_id": 1, "cls_token_id": 2, "sep_token_id": 3,
        "mask_token_id": 4, "texts": texts,
        "unk_example": {"text": unk_text, "input_ids": tokenizer(unk_text).input_ids,
                        "tokens": tokenizer.convert_ids_to_tokens(tokenizer(unk_text).input_ids)},
    })

    # c. classification (3 labels) and regression (1 label) heads on the saved base.
    gold = dict(inp)
    clf = load_cls("tiny-bert", 3, 100)
    out, pooled = run_cls(clf, inp)
    sd = clf.state_dict()
    gold.update({
        "classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"],
        "embedding_output": out.hidden_states[0], "hidden_states.layer0": out.hidden_states[1],
        "last_hidden_state": out.hidden_states[-1], "pooled_output": pooled, "logits": out.logits,
    })
    reg = load_cls("tiny-bert", 1, 101, problem_type="regression")
    reg_labels = torch.tensor([0.5, 4.2, 2.0, 3.3, 1.1, 0.0, 5.0, 2.7])
    with torch.no_grad():
        r = reg(**inp, labels=reg_labels)
    assert torch.allclose(r.loss, torch.nn.functional.mse_loss(r.logits.squeeze(-1), reg_labels))
    sd = reg.state_dict()
    gold.update({
        "regression.classifier.weight": sd["classifier.weight"],
        "regression.classifier.bias": sd["classifier.bias"],
        "regression.labels": reg_labels, "regression.logits": r.logits,
        "regression.loss": r.loss.reshape(1),
    })
    # The nopool base loaded into BertForSequenceClassification: the pooler is initialised
    # by transformers (it is missing from the checkpoint); recorded so a test can use it.
    np_clf = load_cls("tiny-bert-nopool", 3, 102)
    sd = np_clf.state_dict()
    gold.update({"nopool.pooler.dense.weight": sd["bert.pooler.dense.weight"],
                 "nopool.pooler.dense.bias": sd["bert.pooler.dense.bias"]})
    save_st(GOLDEN / "bert_tiny_golden.safetensors", gold)

    # d. LoRA adapters.
    lora, lora_merged = make_adapter("tiny-bert", "tiny-bert-lora", None, 200, inp)
    np_lora, np_merged = make_adapter("tiny-bert-nopool", "tiny-bert-nopool-lora",
                                      ["classifier", "pooler"], 201, inp)
    save_st(GOLDEN / "bert_tiny_lora_logits.safetensors", {
        "logits": lora, "merged_logits": lora_merged,
        "nopool.logits": np_lora, "nopool.merged_logits": np_merged,
    })
    print("max |lora - base|", (lora - gold["logits"]).abs().max().item())

    # e. training.
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 1, 0], dtype=torch.int64)
    save_st(GOLDEN / "bert_tiny_train_step.safetensors", train_steps(inp, labels, 300))

    # f. all-MiniLM-L6-v2.
    if args.skip_minilm:
        return
    d = find_minilm(args.minilm)
    if not (d / "model.safetensors").is_file():
        print(f"note: {d} not found (scripts/fetch-minilm.sh); MiniLM golden files not regenerated")
        return
    cola_dev = cola_sentences(args.cola_dev)
    tok, info = minilm_tokenizer_golden(d, rte_dev, cola_dev)
    write_json(GOLDEN / "bert_minilm_tokenizer_golden.json", info)
    save_st(GOLDEN / "bert_minilm_golden.safetensors", minilm_logits(d, tok, rte_dev, 400))


if __name__ == "__main__":
    main()
