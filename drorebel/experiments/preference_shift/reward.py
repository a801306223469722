"""Multi-objective reward of the preference-shift demo (the laptop-size "emotion classifier").

For a response (whitespace split, special tokens such as ``<eos>`` ignored) a 4-class
"emotion classifier" scores each class by its word count and a neutral class by a constant; the
three objectives are its class probabilities

    r_k(y) = exp(c_k) / (exp(c_joy) + exp(c_formal) + exp(c_calm) + exp(NEUTRAL_LOGIT)),
    c_k(y) = #{words of y in class k},   k ∈ (joy, formal, calm),

so each lies in (0, 1) on the same scale and the objectives COMPETE (they sum to less than 1): a
policy that maximises one mixture ``α·joy + (1 − α)·formal`` with α > ½ fills its response with
joy words and loses at α < ½, exactly the tension of the paper's Emotion task.
This mirrors the Emotion task of DRO-REBEL (arXiv 2509.19104 §5), where a classifier's per-emotion
probabilities are mixed ``r_α = α·r_1 + (1 − α)·r_2`` for training and evaluated at other α and at
emotions unseen in training.

``reward`` has the trainer's reward-function contract
``fn(prompts: list[str], responses: list[str], **columns) -> list[list[float]]`` ([n, k]), so
``reward_fn="drorebel.experiments.preference_shift.reward:reward"`` works in online mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drorebel.experiments.preference_shift.lang import CLASSES, SPECIAL, VOCAB

__all__ = ["OBJECTIVES", "mix", "objective_matrix", "objectives", "reward", "token_objectives"]

OBJECTIVES: tuple[str, ...] = tuple(CLASSES)
_CLASS_OF = {w: k for k, name in enumerate(OBJECTIVES) for w in CLASSES[name]}
_SKIP = set(SPECIAL)
NEUTRAL_LOGIT = 1.0


def _softmax_probs(counts: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[n, 3]`` (the neutral class dropped) from counts ``[n, 3]``."""
    logits = torch.cat([counts, counts.new_full((counts.shape[0], 1), NEUTRAL_LOGIT)], 1)
    return torch.softmax(logits, 1)[:, :-1]


def objectives(response: str) -> list[float]:
    """``[joy, formal, calm]`` classifier probabilities (see the module docstring)."""
    words = [w for w in response.split() if w not in _SKIP]
    counts = [0] * len(OBJECTIVES)
    for w in words:
        k = _CLASS_OF.get(w)
        if k is not None:
            counts[k] += 1
    return _softmax_probs(torch.tensor([counts], dtype=torch.float64))[0].tolist()


def reward(
    prompts: Sequence[str], responses: Sequence[str], **columns: object
) -> list[list[float]]:
    """Trainer reward contract: ``[n, 3]`` objective values (joy, formal, calm) per response.

    ``prompts`` and extra dataset ``columns`` are accepted and ignored (the objectives depend on
    the response only)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [objectives(r) for r in responses]


# token id -> objective index (or -1); used by the fast tensor path of the training loop
_TOKEN_CLASS = torch.tensor([_CLASS_OF.get(w, -1) for w in VOCAB])
_TOKEN_WORD = torch.tensor([w not in _SKIP for w in VOCAB])


def token_objectives(responses: torch.Tensor, eos_id: int = 1, pad_id: int = 0) -> torch.Tensor:
    """Same values as :func:`objectives` of the decoded text from response token ids ``[n, T]``
    (words up to the first ``eos_id`` or ``pad_id``); returns float64 ``[n, 3]``."""
    stop = (responses == eos_id) | (responses == pad_id)
    before_eos = stop.long().cumsum(1) == 0
    words = _TOKEN_WORD[responses] & before_eos
    cls = _TOKEN_CLASS[responses]
    counts = [((cls == k) & words).sum(1) for k in range(len(OBJECTIVES))]
    return _softmax_probs(torch.stack(counts, 1).to(torch.float64))


def objective_matrix(responses: Sequence[str]) -> torch.Tensor:
    """float64 ``[n, 3]`` of :func:`objectives`."""
    return torch.tensor([objectives(r) for r in responses], dtype=torch.float64)


def mix(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Scalar reward of a mixture: ``values [n, k] @ weights [k]`` (weights on the simplex)."""
    w = torch.tensor(list(weights), dtype=values.dtype)
    if w.numel() != values.shape[-1] or (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-9:
        raise ValueError(f"mixture weights must be {values.shape[-1]} non-negative numbers "
                         f"summing to 1, got {list(weights)}")
    return values @ w
