"""Online REBEL rollouts: prompt dataset, two sampled responses per prompt, pair tensors.

REBEL (Gao et al., arXiv 2404.16767, Alg. 1) samples two responses ``a, b ~ π_t(·|x)`` per
prompt from the current policy; this module loads and tokenises the prompts (validated row by
row before training), picks each iteration's prompts in a seeded order, samples with Hugging
Face ``generate`` under a seed derived from ``(seed, iteration, rank)``, and builds the padded
pair tensors of :func:`drorebel.trainer.data.tokenise_pairs` (labels −100 on prompt and padding).
A response ends at (and includes) the first EOS, or after ``max_new_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from drorebel.trainer.data import DataError, load_rows, repeat_notice, row_location

__all__ = ["PromptSet", "load_prompts", "iteration_prompts", "sample_responses", "pair_tensors",
           "derive_seed"]


@dataclass
class PromptSet:
    """Tokenised prompts and what the reward receives about them (one entry per kept row)."""

    ids: list[list[int]]  # prompt token ids (left-truncated to max_prompt_length)
    texts: list[str]  # prompt text given to the reward (chat prompts rendered by the template)
    messages: list[list[dict] | None]  # the chat messages of a chat prompt, else None
    columns: dict[str, list[Any]]  # the dataset's other columns
    rows: list[int]  # source row of each prompt
    n_truncated: int = 0
    n_dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def reward_columns(self, idx: list[int]) -> dict[str, list[Any]]:
        """The extra columns for prompts ``idx`` (plus ``prompt_messages`` for chat prompts)."""
        cols = {k: [v[i] for i in idx] for k, v in self.columns.items()}
        if any(self.messages[i] is not None for i in idx):
            cols["prompt_messages"] = [self.messages[i] for i in idx]
        return cols


def load_prompts(path: str, tokenizer: Any, max_prompt_length: int, overlong: str,
                 rollout_batch_size: int | None = None, setting: str | None = None,
                 split: str | None = None, column_map: dict[str, str] | None = None
                 ) -> PromptSet:
    """Read ``path`` (the formats of :func:`drorebel.trainer.data.load_rows`: JSON Lines, JSON,
    Parquet, a ``save_to_disk`` directory, a directory of data files, a hub dataset; ``split``
    and ``column_map`` as there) and tokenise its ``prompt`` column.

    A prompt is a string (tokenised with the tokenizer's special tokens) or chat messages
    (``apply_chat_template(add_generation_prompt=True)``). Every problem is a :class:`DataError`
    of one line: the file and line of a malformed file (see ``load_rows``), the row and field of
    a missing/mistyped prompt or of one without tokens (its first response token could not be
    predicted; a tokenizer that adds BOS gives every prompt a token). Over-long prompts are
    left-truncated or dropped (counted). The other columns (the union over all rows, ``None``
    where a row lacks one) go to the reward with their exact JSON values. With
    ``rollout_batch_size``, fewer prompts than that prints a notice (prompts repeat within an
    iteration). ``setting`` names the config field in messages about the path itself.
    """
    rows = load_rows(path, setting, split, column_map)
    if not rows:
        raise DataError(f"{path}: the prompt dataset is empty")
    extra = list(dict.fromkeys(k for row in rows for k in row if k != "prompt"))
    out = PromptSet([], [], [], {k: [] for k in extra}, [])
    for i, row in enumerate(rows):
        where = row_location(rows, i)
        if row.get("prompt") is None:
            raise DataError(f"{where}: missing field 'prompt' (have {sorted(row)})")
        ids, text, msgs = _encode_prompt(tokenizer, row["prompt"], where)
        if len(ids) > max_prompt_length:
            if overlong == "drop":
                out.n_dropped += 1
                continue
            ids, out.n_truncated = ids[-max_prompt_length:], out.n_truncated + 1
        out.ids.append(ids)
        out.texts.append(text)
        out.messages.append(msgs)
        out.rows.append(i)
        for k in extra:
            out.columns[k].append(row.get(k))
    if not out.ids:
        raise DataError(f"{path}: all {len(rows)} prompts were dropped (longer than "
                        f"max_prompt_length={max_prompt_length})")
    if rollout_batch_size is not None:
        repeat_notice(len(out), rollout_batch_size, "prompts", "rollout_batch_size")
    return out


def _encode_prompt(tokenizer: Any, prompt: Any, where: str
                   ) -> tuple[list[int], str, list[dict] | None]:
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        text, msgs = prompt, None
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)
            for m in prompt):
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        raise DataError(f"{where}: field 'prompt' must be a string or chat messages (a "
                        f"non-empty list of {{'role', 'content'}}), got {type(prompt).__name__}")
    if not ids:
        raise DataError(f"{where}: field 'prompt' has no tokens, so the first response token "
                        "could not be predicted; give a non-empty prompt or a tokenizer that "
                        "adds BOS")
    return ids, text, msgs


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that is a fixed function of ``seed`` and ``parts`` (iteration, rank, ...)."""
    h = seed & 0xFFFFFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + 1442695040888963407 + p) % (1 << 63)
    return h


def iteration_prompts(n: int, rollout_batch_size: int, seed: int, iteration: int) -> list[int]:
    """Prompt indices of ``iteration``: positions ``[it·R, (it+1)·R)`` of a stream of seeded
    per-epoch permutations of ``range(n)`` (a pure function of seed and iteration)."""
    out: list[int] = []
    cur_epoch, perm = -1, []
    for pos in range(iteration * rollout_batch_size, (iteration + 1) * rollout_batch_size):
        epoch = pos // n
        if epoch != cur_epoch:
            cur_epoch = epoch
            gen = torch.Generator().manual_seed(derive_seed(seed, 7, epoch))
            perm = torch.randperm(n, generator=gen).tolist()
        out.append(perm[pos % n])
    return out


@torch.no_grad()
def sample_responses(model: Any, prompt_ids: list[list[int]], tokenizer: Any, cfg: Any,
                     seed: int, device: torch.device, synced_gpus: bool = False
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Two sampled responses per prompt, ``generate`` on the left-padded prompts (2n rows).

    Sampling uses ``cfg.temperature``, ``top_p``, ``top_k`` (0: off), ``do_sample``,
    ``max_new_tokens``; the torch RNG is seeded with ``seed`` inside ``fork_rng`` (the global
    RNG stream is left as it was). Each response is cut after its first EOS (kept).
    """
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # every sampling setting explicit: a model's generation_config.json (repetition penalty,
    # temperature 0.6, ...) must not change the distribution the log-probs describe
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                           pad_token_id=pad, eos_token_id=eos, num_beams=1, use_cache=True,
                           repetition_penalty=1.0, no_repeat_ngram_size=0,
                           **({"temperature": cfg.temperature, "top_p": cfg.top_p,
                               "top_k": cfg.top_k} if cfg.do_sample else {}))
    rows = prompt_ids + prompt_ids
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(rows):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=gen, synced_gpus=synced_gpus)
    new = out[:, width:].cpu().tolist()
    resp = [_until_eos(r, eos) for r in new]
    n = len(prompt_ids)
    return resp[:n], resp[n:]


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def pair_tensors(prompt_ids: list[list[int]], resp_a: list[list[int]], resp_b: list[list[int]],
                 pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``ids_*``, ``mask_*``, ``labels_*`` ``[n, T]`` of prompt + response (labels:
    the response tokens, −100 on prompt and padding; the two sides share one width)."""
    width = max(len(p) + max(len(a), len(b)) for p, a, b in zip(prompt_ids, resp_a, resp_b))
    out = {}
    for side, resp in (("a", resp_a), ("b", resp_b)):
        ids = torch.full((len(resp), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for j, (p, r) in enumerate(zip(prompt_ids, resp)):
            n = len(p) + len(r)
            ids[j, :n] = torch.tensor(p + r, dtype=torch.long)
            labels[j, len(p):n] = torch.tensor(r, dtype=torch.long)
            mask[j, :n] = 1
        out.update({f"ids_{side}": ids, f"mask_{side}": mask, f"labels_{side}": labels})
    return out
