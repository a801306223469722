"""Rewards for online REBEL: a Python callable or a sequence-classification reward model.

Reward contract (what ``reward_fn: "module:function"`` must implement)::

    fn(prompts: list[str], responses: list[str], **columns) -> Sequence[float]
                                                            | Sequence[Sequence[float]]

- ``prompts[i]`` is the prompt text of response ``i`` (a chat prompt is rendered with the
  policy tokenizer's chat template, and its messages are passed in the extra column
  ``prompt_messages``); ``responses[i]`` is the decoded response (special tokens skipped; it
  may be the empty string);
- ``columns`` are the prompt dataset's other columns, one list entry per response;
- the result is ``n`` finite numbers (one objective) or an ``[n, k]`` table (``k`` objectives,
  the same ``k`` for every row). The trainer combines objectives with the mixture
  ``r = Σ_j α_j r_j`` (``reward_weights`` α, DRO-REBEL arXiv 2509.19104 §5), so ``len(α)`` must
  equal ``k``.

Both responses of a batch of prompts are scored in one call. A raising reward function, a
result of the wrong shape and a non-finite value are reported as :class:`RewardError` naming
the prompt row of the dataset, the field (``response_a``/``response_b``) and the objective.

A reward model (``reward_model: path``) is an ``AutoModelForSequenceClassification`` loaded
with safetensors (``trust_remote_code`` off unless ``reward_trust_remote_code``); it scores the
prompt + response rendered with *its* tokenizer's chat template (plain concatenation when it
has none); a head with ``num_labels = k > 1`` is a ``k``-objective reward.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from drorebel.trainer.data import DataError

__all__ = ["RewardError", "RewardFn", "load_reward_fn", "RewardModelScorer", "score_responses",
           "combine_objectives"]

RewardFn = Callable[..., Any]


class RewardError(DataError):
    """The reward raised or returned an unusable value; the message names the row and field."""


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"package.module:function"`` and return the callable (ValueError if it fails)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"`reward_fn` must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"`reward_fn`: cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"`reward_fn`: {module_name!r} has no callable {attr!r}")
    return fn


class RewardModelScorer:
    """A sequence-classification reward model with the reward contract above.

    ``scorer(prompts, responses, prompt_messages=None, **ignored) -> Tensor [n, num_labels]``
    (float64 logits of the last non-padding token, computed without gradients).
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False, batch_size: int = 16,
                 max_length: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end of the response
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or limit or 2048

    def texts(self, prompts: Sequence[str], responses: Sequence[str],
              prompt_messages: Sequence[Any] | None = None) -> list[str]:
        """Prompt + response, through the reward tokenizer's chat template when it has one."""
        if self.tokenizer.chat_template is None:
            return [p + r for p, r in zip(prompts, responses)]
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            msgs = prompt_messages[i] if prompt_messages is not None else None
            msgs = list(msgs) if msgs else [{"role": "user", "content": p}]
            out.append(self.tokenizer.apply_chat_template(
                [*msgs, {"role": "assistant", "content": r}], tokenize=False))
        return out

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 prompt_messages: Sequence[Any] | None = None, **_: Any) -> torch.Tensor:
        texts = self.texts(prompts, responses, prompt_messages)
        parts = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=self.tokenizer.chat_template is None)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            parts.append(self.model(**enc).logits.double().cpu())
        return torch.cat(parts)


def score_responses(fn: RewardFn, prompts: list[str], responses: list[str],
                    columns: dict[str, list[Any]], rows: list[int], fields: list[str],
                    name: str = "reward") -> torch.Tensor:
    """Call ``fn`` once on all responses and validate: float64 ``[n, k]``.

    ``rows[i]``/``fields[i]`` (dataset row and ``response_a``/``response_b``) name response
    ``i`` in errors. When the batched call raises, responses are retried one at a time to find
    the first one that fails.
    """
    try:
        out = fn(prompts, responses, **columns)
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported
        i, cause = _first_failing(fn, prompts, responses, columns, err)
        raise RewardError(f"{name} raised on prompt row {rows[i]}, field '{fields[i]}': "
                          f"{type(cause).__name__}: {cause}") from cause
    return _as_table(out, len(responses), rows, fields, name)


def _first_failing(fn: RewardFn, prompts: list[str], responses: list[str],
                   columns: dict[str, list[Any]], err: Exception) -> tuple[int, Exception]:
    for i in range(len(responses)):
        try:
            fn(prompts[i:i + 1], responses[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as one:  # noqa: BLE001
            return i, one
    return 0, err  # fails only in a batch: blame the first row


def _as_table(out: Any, n: int, rows: list[int], fields: list[str], name: str) -> torch.Tensor:
    if torch.is_tensor(out):
        out = out.detach().cpu().double().tolist()
    elif hasattr(out, "tolist"):  # numpy
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
        raise RewardError(f"{name} must return a sequence of {n} numbers or an [{n}, k] table, "
                          f"got {type(out).__name__}")
    if len(out) != n:
        raise RewardError(f"{name} returned {len(out)} values for {n} responses "
                          f"(prompt rows {sorted(set(rows))})")
    table = [_row(v, i, rows, fields, name) for i, v in enumerate(out)]
    k = len(table[0])
    for i, v in enumerate(table):
        if len(v) != k:
            raise RewardError(f"{name}: prompt row {rows[i]}, field '{fields[i]}' has {len(v)} "
                              f"objectives, the first response has {k}")
        for j, x in enumerate(v):
            if not math.isfinite(x):
                raise RewardError(f"{name}: prompt row {rows[i]}, field '{fields[i]}', "
                                  f"objective {j} is not finite ({x})")
    return torch.tensor(table, dtype=torch.float64)


def _row(v: Any, i: int, rows: list[int], fields: list[str], name: str) -> list[float]:
    vals = list(v) if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else [v]
    if not vals:
        raise RewardError(f"{name}: prompt row {rows[i]}, field '{fields[i]}' has no values")
    for j, x in enumerate(vals):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RewardError(f"{name}: prompt row {rows[i]}, field '{fields[i]}', objective {j} "
                              f"is not a number ({x!r})")
    return [float(x) for x in vals]


def combine_objectives(table: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """``r_i = Σ_j α_j r_{ij}`` (float64 ``[n]``); one objective and no α: ``r_i = r_{i0}``.

    Raises :class:`RewardError` when ``len(α)`` differs from the number of objectives ``k``.
    """
    k = table.shape[1]
    if weights is None:
        if k != 1:
            raise RewardError(f"the reward returns k={k} objectives: set `reward_weights` "
                              f"(a list of {k} mixture weights α)")
        return table[:, 0]
    if len(weights) != k:
        raise RewardError(f"`reward_weights` has {len(weights)} entries but the reward returns "
                          f"k={k} objectives")
    return table @ torch.tensor([float(w) for w in weights], dtype=torch.float64)
