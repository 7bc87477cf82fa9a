"""Writes examples/data/arithmetic.jsonl: a small self-contained instruction task (two-digit
addition and subtraction with a short worked answer) used by the README's quick start."""
import json
import random

rng = random.Random(0)
rows = []
for i in range(600):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if i % 2 == 0:
        rows.append({"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}."})
    else:
        a, b = max(a, b), min(a, b)
        rows.append({"instruction": "Subtract the second number from the first.", "input": f"{a}, {b}",
                     "output": f"{a} - {b} = {a - b}. The answer is {a - b}."})
with open("examples/data/arithmetic.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
