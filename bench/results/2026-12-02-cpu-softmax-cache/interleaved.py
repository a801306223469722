"""Interleaved CPU timing of linear_logps fwd+bwd (N=4096, H=256, V=32000, fp32): each round
runs every provider once, so a burst of load from other jobs hits all of them.

    .venv/bin/python bench/results/2026-12-02-cpu-softmax-cache/interleaved.py ROUNDS

Prints, per provider, the round with the smallest wall time (fwd, bwd, total, CPU seconds of
the process) and every round's total.
"""

import sys
import time

import torch

from drorebel.ops.linear_logps import linear_logps
from drorebel.reference.logps import linear_logps_reference

torch.manual_seed(0)
N, H, V = 4096, 256, 32000
h = torch.randn(N, H).requires_grad_()
w = (torch.randn(V, H) * H**-0.5).requires_grad_()
y = torch.randint(0, V, (N,))
g = torch.randn(N)
fns = {"chunked": lambda: linear_logps(h, w, y, impl="torch"),
       "cache": lambda: linear_logps(h, w, y, impl="torch", softmax_cache=2**62),
       "mat": lambda: linear_logps_reference(h, w, y)}
res = {k: [] for k in fns}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for k, f in fns.items():
        h.grad = None
        w.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        out = f()
        t1 = time.perf_counter()
        out.backward(g)
        t2, c2 = time.perf_counter(), time.process_time()
        res[k].append((t1 - t0, t2 - t1, t2 - t0, c2 - c0))
for k, v in res.items():
    best = min(v, key=lambda x: x[2])
    print(k, "best fwd {:.2f} bwd {:.2f} total {:.2f} cpu {:.2f}".format(*best),
          " all totals", [round(x[2], 2) for x in v])
