"""Reward functions with the online-mode contract, for tests (word counts of the tiny vocab)."""

from __future__ import annotations

import json
import random

from trainer_fixtures.tiny import WORDS

GOOD = ("good", "nice", "fine")
BAD = ("bad", "awful", "no")


def good_fraction(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    """Fraction of the response's words in GOOD (0 for an empty response)."""
    out = []
    for r in responses:
        words = r.split()
        out.append(sum(w in GOOD for w in words) / max(len(words), 1))
    return out


def good_bad_counts(prompts: list[str], responses: list[str], **columns: object
                    ) -> list[list[float]]:
    """Two objectives: [#GOOD words, #BAD words]."""
    return [[float(sum(w in GOOD for w in r.split())), float(sum(w in BAD for w in r.split()))]
            for r in responses]


def bonus_column(prompts: list[str], responses: list[str], bonus: list[float],
                 **columns: object) -> list[float]:
    """The dataset column ``bonus`` of the prompt, as the reward (tests column passing)."""
    assert len(bonus) == len(responses)
    return [float(b) for b in bonus]


def write_prompts(path: str, n: int = 16, seed: int = 0, chat: bool = False) -> str:
    """JSONL of short prompts with an extra numeric column ``bonus`` (= the row index)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS[6:14]) for _ in range(rng.randint(2, 5)))
            prompt = [{"role": "user", "content": text}] if chat else text
            f.write(json.dumps({"prompt": prompt, "bonus": float(i)}) + "\n")
    return path
