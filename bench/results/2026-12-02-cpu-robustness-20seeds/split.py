"""Paired frontier gaps of a 20-seed robustness run: all seeds, the first 12 (the committed
run) and the 8 new ones (12-19) alone."""
import json
import math
import sys

d = json.load(open(sys.argv[1]))
seeds = d["seeds"]
print("| method | radius | seeds | gap: worst group | gap: worst mixture |")
print("|---|---|---|---|---|")


def ms(xs):
    n = len(xs)
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    above = sum(x > 0 for x in xs)
    return f"{m:+.3f} ± {se:.3f} ({above}/{n})"


for name, m in d["methods"].items():
    if "gap_worst_group" not in m:
        continue
    g, w = m["gap_worst_group"]["gaps"], m["gap_worst_mixture"]["gaps"]
    for label, idx in (("0–19", range(len(seeds))), ("0–11", range(12)),
                       ("12–19 (new)", range(12, len(seeds)))):
        print(f"| {name} | {m['param']} | {label} | {ms([g[i] for i in idx])} | "
              f"{ms([w[i] for i in idx])} |")
