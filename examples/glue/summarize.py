#!/usr/bin/env python3
"""Table of a GLUE study written by examples/glue/run.sh (standard library only).

    summarize.py OUT          # markdown table: mean ± std over seeds per task, rank and method
    summarize.py --one RUN    # one run's score, for the progress line

Scores are the task's GLUE metric on the dev file (QNLI: the held-out split), in percent:
CoLA Matthews correlation, STS-B Pearson, accuracy otherwise. Trainable parameters are read
from the run's log (LoRA-Dash adds s coefficients per adapted layer at the switch); wall
time is training plus scoring.
"""

import json
import re
import statistics
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
    return n + (layers * s if method == "dash" else 0)


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
            "wall": float(wall.read_text()) if wall.exists() else None,
        }


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
    out = Path(sys.argv[1])
    rows = list(runs(out))
    tasks = [t for t in ORDER if any(r["task"] == t for r in rows)]
    configs = sorted({(r["rank"], r["method"]) for r in rows}, key=lambda c: (-c[0], c[1] != "lora"))
    head = ["method", "rank", "trainable params"] + tasks + ["average", "wall s / run"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for rank, method in configs:
        sel = [r for r in rows if (r["rank"], r["method"]) == (rank, method)]
        cells = [{"lora": "LoRA", "dash": "LoRA-Dash"}.get(method, method), str(rank)]
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
        cells.append(fmt([r["wall"] for r in sel]))
        print("| " + " | ".join(cells) + " |")
    print()
    print("Scores in percent on the dev files (QNLI: held-out fifth of its dev file); "
          "mean ± sample std over seeds; the average is over tasks within a seed, then over seeds.")


if __name__ == "__main__":
    main()
