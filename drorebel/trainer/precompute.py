"""``drorebel precompute-ref``: store reference log-probs ``log π_ref(a|x)``, ``log π_ref(b|x)``.

The reference is the model named by the config (its initial weights), the same quantity the
trainer computes before its first update when the columns are absent (REBEL, arXiv 2404.16767:
π_ref = the policy the pairs are regressed against). The output is a JSONL copy of the kept
rows with ``ref_logp_a`` and ``ref_logp_b`` added.
"""

from __future__ import annotations

import json
import os

import torch

from drorebel.trainer.config import TrainConfig
from drorebel.trainer.data import load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.driver import reference_logps, seed_all
from drorebel.trainer.loop import REFERENCE_CHUNK
from drorebel.trainer.model import load_model, load_tokenizer, sequence_logps, wrap_model

__all__ = ["precompute_reference"]


def precompute_reference(cfg: TrainConfig, out_path: str) -> int:
    """Write ``out_path`` (JSONL) with cached reference columns; returns the number of rows."""
    cfg.check_paths()
    seed_all(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # dro_over: groups: the `group` column is checked here too, so a bad row fails before the
    # model loads rather than at training time (the column is copied to the output as is)
    rows = normalise_rows(load_rows(cfg.train_file, "train_file", cfg.train_split,
                                    cfg.column_map), groups=cfg.dro_over == "groups")
    data = tokenise_pairs(rows, load_tokenizer(cfg), cfg.max_length, cfg.max_prompt_length,
                          cfg.overlong)
    wrapper = wrap_model(load_model(cfg, device), cfg).eval()
    ref_a, ref_b = reference_logps(
        lambda i, m, y: sequence_logps(wrapper, i.to(device), m.to(device), y.to(device)),
        data, REFERENCE_CHUNK)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for j, i in enumerate(data.kept):
            row = {**rows[i], "ref_logp_a": float(ref_a[j]), "ref_logp_b": float(ref_b[j])}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out_path)
    return len(data.kept)
