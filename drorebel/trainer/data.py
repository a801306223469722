"""Offline pair data: load, normalise, validate and tokenise.

Accepted rows (json / jsonl / parquet through ``datasets``):

- ``prompt, response_a, response_b, reward_a, reward_b``, or
- TRL style ``prompt, chosen, rejected, chosen_reward, rejected_reward``,

where texts are strings or chat messages (lists of ``{"role", "content"}``, rendered with the
tokenizer's chat template), and optional cached reference log-probs ``ref_logp_a, ref_logp_b``.
Every problem is reported before training with the row number and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from drorebel.trainer.errors import DataError

__all__ = ["DataError", "PairBatchData", "load_rows", "normalise_rows", "tokenise_pairs"]

_TRL = {"chosen": "response_a", "rejected": "response_b",
        "chosen_reward": "reward_a", "rejected_reward": "reward_b"}
_REQUIRED = ("prompt", "response_a", "response_b", "reward_a", "reward_b")
_REF = ("ref_logp_a", "ref_logp_b")




@dataclass
class PairBatchData:
    """Tokenised pairs: ``ids_*``/``labels_*`` are ``[n, T]`` (labels −100 on prompt/padding)."""

    ids_a: torch.Tensor
    labels_a: torch.Tensor
    mask_a: torch.Tensor
    ids_b: torch.Tensor
    labels_b: torch.Tensor
    mask_b: torch.Tensor
    rewards_a: torch.Tensor
    rewards_b: torch.Tensor
    ref_a: torch.Tensor | None
    ref_b: torch.Tensor | None
    n_truncated: int
    n_dropped: int
    kept: list[int] = field(default_factory=list)  # source row of each pair

    def __len__(self) -> int:
        return self.ids_a.shape[0]


def load_rows(path: str) -> list[dict[str, Any]]:
    """Read a local json / jsonl / parquet file with ``datasets`` into a list of dicts."""
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "json"
    ds = datasets.load_dataset(kind, data_files=path, split="train", keep_in_memory=True)
    return [dict(r) for r in ds]


def normalise_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Map TRL names to ours and check every field; :class:`DataError` on the first bad one."""
    if not rows:
        raise DataError("the dataset is empty")
    out = []
    for i, row in enumerate(rows):
        row = {_TRL.get(k, k): v for k, v in row.items()}
        missing = [k for k in _REQUIRED if k not in row or row[k] is None]
        if missing:
            raise DataError(f"row {i}: missing field(s) {missing} (have {sorted(row)})")
        for key in ("prompt", "response_a", "response_b"):
            _check_text(i, key, row[key], allow_empty=key == "prompt")
        for key in ("reward_a", "reward_b", *[k for k in _REF if row.get(k) is not None]):
            _check_number(i, key, row[key])
        out.append(row)
    has_ref = [all(r.get(k) is not None for k in _REF) for r in out]
    if any(has_ref) and not all(has_ref):
        raise DataError(f"row {has_ref.index(False)}: ref_logp_a/ref_logp_b missing in some rows")
    return out


def _check_text(i: int, key: str, value: Any, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(f"row {i}: field '{key}' is empty")
        return
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DataError(f"row {i}: field '{key}' must be a string or chat messages, "
                        f"got {type(value).__name__}")
    if not allow_empty and not any(m["content"].strip() for m in value):
        raise DataError(f"row {i}: field '{key}' is empty")


def _check_number(i: int, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"row {i}: field '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DataError(f"row {i}: field '{key}' is not finite ({value})")


def _encode(tokenizer: Any, prompt: Any, response: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (chat: template split at the prompt)."""
    if isinstance(prompt, str) and isinstance(response, str):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return p, r + ([eos] if eos is not None else [])
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    r_msgs = (response if isinstance(response, list)
              else [{"role": "assistant", "content": response}])
    p = _ids(tokenizer.apply_chat_template(p_msgs, tokenize=True, add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=True))
    if full[: len(p)] != p:
        raise DataError("the chat template does not extend the prompt; cannot split the response")
    return p, full[len(p):]


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def tokenise_pairs(rows: list[dict[str, Any]], tokenizer: Any, max_length: int,
                   max_prompt_length: int, overlong: str) -> PairBatchData:
    """Tokenise normalised rows into padded tensors; over-long prompts truncated (left) or dropped.

    Responses are cut to ``max_length − len(prompt)``; a response left without tokens is an error.
    """
    seqs: list[tuple[list[int], list[int], list[int]]] = []
    keep, kept_idx, n_trunc, n_drop = [], [], 0, 0
    for i, row in enumerate(rows):
        p, ra = _encode(tokenizer, row["prompt"], row["response_a"])
        _, rb = _encode(tokenizer, row["prompt"], row["response_b"])
        if len(p) > max_prompt_length:
            if overlong == "drop":
                n_drop += 1
                continue
            p, n_trunc = p[-max_prompt_length:], n_trunc + 1
        for key, r in (("response_a", ra), ("response_b", rb)):
            if not r:
                raise DataError(f"row {i}: field '{key}' has no tokens")
        room = max_length - len(p)
        seqs.append((p, ra[:room], rb[:room]))
        keep.append(row)
        kept_idx.append(i)
    if not keep:
        raise DataError(f"all {len(rows)} rows were dropped (prompt longer than max_prompt_length)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_a, lab_a, m_a = _pad([(p, ra) for p, ra, _ in seqs], pad)
    ids_b, lab_b, m_b = _pad([(p, rb) for p, _, rb in seqs], pad)
    f64 = torch.float64
    has_ref = keep[0].get("ref_logp_a") is not None
    return PairBatchData(
        ids_a, lab_a, m_a, ids_b, lab_b, m_b,
        torch.tensor([r["reward_a"] for r in keep], dtype=f64),
        torch.tensor([r["reward_b"] for r in keep], dtype=f64),
        torch.tensor([r["ref_logp_a"] for r in keep], dtype=f64) if has_ref else None,
        torch.tensor([r["ref_logp_b"] for r in keep], dtype=f64) if has_ref else None,
        n_trunc, n_drop, kept_idx,
    )


def _pad(pairs: list[tuple[list[int], list[int]]], pad: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt+response; labels are the response tokens, −100 elsewhere."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[j, :n] = torch.tensor(p + r)
        labels[j, len(p):n] = torch.tensor(r)
        mask[j, :n] = 1
    return ids, labels, mask
