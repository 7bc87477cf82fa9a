#!/usr/bin/env python3
"""Table of a GLUE study written by examples/glue/run.sh (standard library only).

    summarize.py OUT...       # markdown tables: mean ± std over seeds per task, rank and method
                              # (several OUT folders merge; a run found twice is an error)
    summarize.py --one RUN    # one run's score, for the progress line
    summarize.py --dash OUT   # how far each LoRA-Dash run's predictions are from its LoRA twin
                              # (runs named dash or dashlrN)
    summarize.py --dash-c RUN # a LoRA-Dash run's dash coefficients as JSON (the run's
                              # dash_c.json, which --dash reads where the adapter is not kept)

Scores are the task's GLUE metric on the dev file (QNLI: the held-out split), in percent:
CoLA Matthews correlation, STS-B Pearson, accuracy otherwise. Trainable parameters are read
from the run's log (LoRA-Dash adds s coefficients per adapted layer at the switch); wall
time is training plus scoring.
"""

import json
import re
import statistics
import struct
import sys
from pathlib import Path

METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}
ORDER = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]


def score(run_eval: Path, task: str):
    r = json.loads((run_eval / "results.json").read_text())
    files = r.get("files", {})
    if not files:
        return None
    first = next(iter(files.values()))
    v = first.get(METRIC.get(task, "accuracy"))
    return None if v is None else 100.0 * v


def params(log: Path, method: str, s: int):
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(r"(\d+) adapted layers, (\d+) trainable parameters", text)
    if not m:
        return None
    layers, n = int(m.group(1)), int(m.group(2))
    return n + (layers * s if method.startswith("dash") else 0)


METHODS = ["lora", "dash", "dashlr", "pissa", "milora", "dora"]


def label(method: str):
    if method.startswith("dashlr"):
        return f"LoRA-Dash, c lr ×{method[len('dashlr'):]}"
    return {"lora": "LoRA", "dash": "LoRA-Dash", "pissa": "PiSSA", "milora": "MiLoRA", "dora": "DoRA"}.get(method, method)


def method_key(method: str):
    base = "dashlr" if method.startswith("dashlr") else method
    rest = method[len("dashlr"):] if base == "dashlr" else ""
    return (METHODS.index(base) if base in METHODS else len(METHODS),
            float(rest) if rest.replace(".", "", 1).isdigit() else 0.0, method)


def runs(out: Path):
    for ev in sorted(out.glob("*/*.eval")):
        task = ev.parent.name
        m = re.fullmatch(r"r(\d+)-(\w+)-seed(\d+)\.eval", ev.name)
        if not m or not (ev / "results.json").exists():
            continue
        r, method, seed = int(m.group(1)), m.group(2), int(m.group(3))
        run = ev.parent / ev.name[: -len(".eval")]
        s = 0
        cfg = run / "dash_config.json"
        if cfg.exists():
            s = int(json.loads(cfg.read_text()).get("s", 0) or 0)
        wall = ev / "wall_s"
        yield {
            "task": task, "rank": r, "method": method, "seed": seed,
            "score": score(ev, task),
            "params": params(ev.parent / (run.name + ".log"), method, s),
            # A run that shared the machine (a note in wall_shared says with what) has no
            # wall time worth comparing.
            "wall": float(wall.read_text()) if wall.exists() and not (ev / "wall_shared").exists() else None,
        }


def dash_coefficients(run: Path):
    """All `dash_c` values of a LoRA-Dash run's adapter (safetensors, F32), read without numpy;
    where only the run's small files were kept, from its `dash_c.json` (`--dash-c RUN`)."""
    f = run / "dash_adapter.safetensors"
    if not f.exists():
        kept = run / "dash_c.json"
        return json.loads(kept.read_text()) if kept.exists() else []
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = []
    for name, t in header.items():
        if name == "__metadata__" or not name.endswith("dash_c") or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        blob = raw[8 + n + a : 8 + n + b]
        out.extend(struct.unpack(f"<{len(blob) // 4}f", blob))
    return out


def predictions(ev: Path):
    path = ev / "predictions.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dash_vs_lora(out: Path):
    """Per task and rank, over seeds: the share of dev predictions where LoRA-Dash and LoRA
    (same seed, same batches until the switch) disagree, the largest change of a class score,
    and the size of the dash coefficients c."""
    print("| task | rank | method | seeds | predictions that differ from LoRA | max abs score change | median abs c | max abs c |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    groups = {}
    for ev in sorted(out.glob("*/r*-dash*-seed*.eval")):
        m = re.fullmatch(r"r(\d+)-(dash\w*)-seed(\d+)\.eval", ev.name)
        if not m:
            continue
        twin = ev.parent / f"r{m.group(1)}-lora-seed{m.group(3)}.eval"
        a, b = predictions(ev), predictions(twin)
        if a is None or b is None or len(a) != len(b):
            continue
        differ = sum(x["prediction"] != y["prediction"] for x, y in zip(a, b))
        change = max(
            (abs(u - v) for x, y in zip(a, b) for u, v in zip(x["scores"], y["scores"])),
            default=0.0,
        )
        c = [abs(v) for v in dash_coefficients(ev.parent / ev.name[: -len(".eval")])]
        g = groups.setdefault((ORDER.index(ev.parent.name) if ev.parent.name in ORDER else 99,
                               ev.parent.name, -int(m.group(1)), method_key(m.group(2))), [])
        g.append((differ, len(a), change, c))
    for (_, task, neg_rank, mkey), g in sorted(groups.items()):
        differ = sum(x[0] for x in g)
        total = sum(x[1] for x in g)
        cs = [v for x in g for v in x[3]]
        print(f"| {task} | {-neg_rank} | {label(mkey[2])} | {len(g)} | {differ} of {total} ({100 * differ / total:.2f} %) "
              f"| {max(x[2] for x in g):.4f} | "
              f"{statistics.median(cs) if cs else float('nan'):.4f} | {max(cs) if cs else float('nan'):.4f} |")


def fmt(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def main():
    if sys.argv[1] == "--one":
        run = Path(sys.argv[2])
        ev = run.parent / (run.name + ".eval")
        print(f"{score(ev, run.parent.name):.2f}")
        return
    if sys.argv[1] == "--dash":
        dash_vs_lora(Path(sys.argv[2]))
        return
    if sys.argv[1] == "--dash-c":
        print(json.dumps(dash_coefficients(Path(sys.argv[2]))))
        return
    rows, seen = [], {}
    for out in map(Path, sys.argv[1:]):
        for r in runs(out):
            key = (r["task"], r["rank"], r["method"], r["seed"])
            if key in seen:
                sys.exit(f"summarize.py: {r['task']} r{r['rank']}-{r['method']}-seed{r['seed']} "
                         f"is in both {seen[key]} and {out}")
            seen[key] = out
            rows.append(r)
    tasks = [t for t in ORDER if any(r["task"] == t for r in rows)]
    configs = sorted({(r["rank"], r["method"]) for r in rows}, key=lambda c: (-c[0], method_key(c[1])))
    head = ["method", "rank", "trainable params"] + tasks + ["average"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for rank, method in configs:
        sel = [r for r in rows if (r["rank"], r["method"]) == (rank, method)]
        cells = [label(method), str(rank)]
        ps = sorted({r["params"] for r in sel if r["params"] is not None})
        cells.append("/".join(str(p) for p in ps) or "–")
        per_seed_avg = {}
        for t in tasks:
            xs = [r["score"] for r in sel if r["task"] == t]
            cells.append(fmt(xs) + f" (n={len(xs)})")
            for r in sel:
                if r["task"] == t and r["score"] is not None:
                    per_seed_avg.setdefault(r["seed"], {})[t] = r["score"]
        full = [statistics.mean(v.values()) for v in per_seed_avg.values() if len(v) == len(tasks)]
        cells.append(fmt(full))
        print("| " + " | ".join(cells) + " |")
    print()
    print("Wall seconds per run (training and scoring), mean ± std over seeds:")
    print()
    print("| method | rank | " + " | ".join(tasks) + " |")
    print("|" + " --- |" * (len(tasks) + 2))
    for rank, method in configs:
        sel = [r for r in rows if (r["rank"], r["method"]) == (rank, method)]
        walls = [fmt([r["wall"] for r in sel if r["task"] == t]) for t in tasks]
        print(f"| {label(method)} | {rank} | " + " | ".join(walls) + " |")
    print()
    print("Scores in percent on the dev files (QNLI: held-out fifth of its dev file); "
          "mean ± sample std over seeds; the average is over tasks within a seed, then over seeds.")


if __name__ == "__main__":
    main()
