#!/usr/bin/env python3
"""Summarises the JSON lines of a bench script: per run kind the median over rounds of
tokens/s, step time and peak RSS, then the ratios the script asks for.

    summarize.py DIR NUM=DEN[:label] ...

DIR holds one `KIND.jsonl` per run kind (one JSON object per round, as `lora-dash bench`,
`profile_step` and the PyTorch scripts print). Each NUM=DEN pair prints NUM / DEN of tokens/s,
step time and peak RSS.
"""

import json
import statistics
import sys
from pathlib import Path


def load(d):
    runs = {}
    for f in sorted(Path(d).glob("*.jsonl")):
        rows = []
        for line in f.read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        if rows:
            runs[f.stem] = rows
    return runs


def med(rows, key):
    v = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else None


def main():
    d, pairs = sys.argv[1], sys.argv[2:]
    runs = load(d)
    print(f"{'run':<24} {'rounds':>6} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'padding':>8}")
    for k, rows in runs.items():
        tps, st, rss, pad = (med(rows, x) for x in
                             ("tokens_per_s", "step_time_s", "peak_rss_gib", "padding_fraction"))
        fmt = lambda x, f: (f % x) if x is not None else "-"
        print(f"{k:<24} {len(rows):>6} {fmt(tps, '%.1f'):>10} {fmt(st, '%.3f'):>8} "
              f"{fmt(rss, '%.2f'):>9} {fmt(pad, '%.3f'):>8}")
    for p in pairs:
        spec, _, label = p.partition(":")
        num, _, den = spec.partition("=")
        if num not in runs or den not in runs:
            print(f"{label or spec}: missing runs")
            continue
        out = []
        for key, name in (("tokens_per_s", "tokens/s"), ("step_time_s", "step time"),
                          ("peak_rss_gib", "peak RSS")):
            a, b = med(runs[num], key), med(runs[den], key)
            if a is not None and b:
                out.append(f"{name} {a / b:.2f}x")
        print(f"ratio {label or spec} ({num} / {den}): " + ", ".join(out))


if __name__ == "__main__":
    main()
