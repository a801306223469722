"""``drorebel train`` end to end on this machine: 20 offline χ²-REBEL steps with a checkpoint
at step 10, then the same run stopped at step 10 and resumed; the resumed steps 11–20 must
match the uninterrupted run's.

    python bench/gpu_train_check.py --out DIR [--small]

On CUDA: bf16 weights, SDPA, a 4-layer Llama built from a config (no hub). Without CUDA (the
CPU dry run of bench/run_gpu.sh, or ``--small``): fp32 and a 2-layer model. The tokenizer and
the pairs are the test suite's tiny ones (tests/trainer_fixtures), so only the trainer is
exercised, not the head's speed. Writes ``DIR/train_check.json`` with the loss curves and the
largest difference; exit status 0 when both runs finished and the resumed steps match (bitwise
on the CPU, to 1e-3 relative on CUDA, where cuBLAS may pick other kernels after a restart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from trainer_fixtures.tiny import base_overrides  # noqa: E402

STEPS, SAVE = 20, 10


def _model(cuda: bool) -> dict:
    width, layers = (512, 4) if cuda else (32, 2)
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": width * 2,
            "num_hidden_layers": layers, "num_attention_heads": 8 if cuda else 4,
            "num_key_value_heads": 4 if cuda else 2, "vocab_size": 32,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


def _train(cfg: dict, out: str, **extra: object) -> tuple[int, float, str]:
    args = [f"{k}={json.dumps(v)}" for k, v in (cfg | {"output_dir": out} | extra).items()]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "drorebel.cli", "train", *args],
                          capture_output=True, text=True, timeout=240)
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-2000:]


def _losses(out: str) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="fp32, tiny model (CPU dry run)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.small
    os.makedirs(args.out, exist_ok=True)
    cfg = base_overrides(args.out) | {
        "model_config": _model(cuda), "dtype": "bfloat16" if cuda else "float32",
        "divergence": "chi2", "rho": 0.5, "max_steps": STEPS, "save_steps": SAVE,
        "batch_size": 4, "progress": False,
    }
    cfg.pop("model", None)
    if cuda:
        cfg["attn_implementation"] = "sdpa"
    report: dict[str, object] = {"cuda": cuda, "config": cfg}
    full, stopped = os.path.join(args.out, "full"), os.path.join(args.out, "resumed")
    rc_full, t_full, log_full = _train(cfg, full)
    rc_stop, t_stop, log_stop = _train(cfg, stopped, stop_at_step=SAVE)
    rc_res, t_res, log_res = _train(cfg, stopped, resume="auto")
    report["runs"] = {"full": [rc_full, round(t_full, 1)], "stopped": [rc_stop, round(t_stop, 1)],
                      "resumed": [rc_res, round(t_res, 1)]}
    ok = rc_full == rc_stop == rc_res == 0
    if ok:
        a, b = _losses(full), _losses(stopped)
        steps = [s for s in range(SAVE + 1, STEPS + 1) if s in a]
        diff = max((abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps), default=float("nan"))
        report |= {"losses_full": a, "losses_resumed": b, "max_rel_diff_11_20": diff,
                   "final_exists": os.path.isdir(os.path.join(stopped, "final"))}
        tol = 1e-3 if cuda else 0.0
        ok = len(steps) == STEPS - SAVE and diff <= tol and bool(report["final_exists"])
    else:
        report["logs"] = {"full": log_full, "stopped": log_stop, "resumed": log_res}
    report["ok"] = ok
    with open(os.path.join(args.out, "train_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "logs")},
                     default=str)[:3000])
    if not ok and "logs" in report:
        print(json.dumps(report["logs"], indent=1)[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
