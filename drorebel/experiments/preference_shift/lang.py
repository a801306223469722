"""Synthetic language and tiny base LM of the preference-shift demo.

The language: a prompt ``<bos> <u> topic1 topic2 <a>`` (always 5 tokens, so prompts need no
padding) followed by a response of 2–8 words and ``<eos>``. Each response word is a filler word
(probability ``FILLER_P``) or a word of one of three classes — ``joy``, ``formal``, ``calm`` —
chosen with probabilities tilted by the prompt's topics. The rewards
(:mod:`drorebel.experiments.preference_shift.reward`) are the class probabilities of a classifier
that counts class words, so the base model samples diverse responses whose rewards differ between
objectives, like the emotion classifier of the paper's Emotion task (DRO-REBEL,
arXiv 2509.19104 §5) at laptop size.

The base model is a tiny ``LlamaForCausalLM`` pretrained for a few seconds on samples of the
language, saved (with a word-level tokenizer) under a cache directory and reused when the
fingerprint of its configuration matches.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLASSES",
    "SPECIAL",
    "VOCAB",
    "BaseConfig",
    "decode",
    "encode_prompt",
    "load_or_train_base",
    "model_config",
    "sample_corpus",
    "sample_prompts",
]

SPECIAL = ["<pad>", "<eos>", "<unk>", "<bos>", "<u>", "<a>"]
PAD, EOS, BOS, USER, ASSISTANT = 0, 1, 3, 4, 5
CLASSES: dict[str, list[str]] = {
    "joy": ["happy", "glad", "delight", "love", "smile", "cheer"],
    "formal": ["therefore", "regards", "kindly", "furthermore", "sincerely", "hereby"],
    "calm": ["quiet", "gentle", "slow", "soft", "still", "peace"],
}
FILLER = ["the", "a", "we", "it", "is", "and", "to", "day"]
# topic -> class tilt (multiplies the uniform class probability)
TOPICS: dict[str, tuple[float, float, float]] = {
    "party": (3.0, 0.5, 1.0), "letter": (0.5, 3.0, 1.0), "garden": (1.0, 0.5, 3.0),
    "work": (0.7, 2.0, 0.7), "friend": (2.0, 0.7, 1.0), "rain": (0.7, 1.0, 2.0),
}
VOCAB: list[str] = SPECIAL + list(TOPICS) + FILLER + [w for ws in CLASSES.values() for w in ws]
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
FILLER_P = 0.4
PROMPT_LEN = 5
MIN_WORDS, MAX_WORDS = 2, 8


@dataclass(frozen=True)
class BaseConfig:
    """Size and pretraining budget of the tiny base model (all of it enters the cache key)."""

    hidden_size: int = 48
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 1234

    def fingerprint(self) -> str:
        blob = json.dumps({"cfg": asdict(self), "vocab": VOCAB, "topics": TOPICS,
                           "filler_p": FILLER_P, "words": [MIN_WORDS, MAX_WORDS]},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_prompts(n: int, rng: random.Random) -> list[list[int]]:
    """``n`` prompts ``[<bos>, <u>, topic, topic, <a>]`` (topic ids)."""
    topics = list(TOPICS)
    return [[BOS, USER, WORD_ID[rng.choice(topics)], WORD_ID[rng.choice(topics)], ASSISTANT]
            for _ in range(n)]


def _class_probs(prompt: list[int]) -> list[float]:
    tilt = [1.0, 1.0, 1.0]
    for tok in prompt:
        word = VOCAB[tok]
        if word in TOPICS:
            tilt = [t * s for t, s in zip(tilt, TOPICS[word])]
    total = sum(tilt)
    return [t / total for t in tilt]


def sample_response(prompt: list[int], rng: random.Random) -> list[int]:
    """One response of the base language (word ids, ending with ``<eos>``)."""
    probs = _class_probs(prompt)
    names = list(CLASSES)
    out = []
    for _ in range(rng.randint(MIN_WORDS, MAX_WORDS)):
        if rng.random() < FILLER_P:
            out.append(WORD_ID[rng.choice(FILLER)])
        else:
            cls = rng.choices(names, weights=probs)[0]
            out.append(WORD_ID[rng.choice(CLASSES[cls])])
    return out + [EOS]


def sample_corpus(n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[n, 5 + MAX_WORDS + 1]``: right-padded sequences of the language;
    labels are the response tokens (prompt and padding = -100), unshifted (HF convention)."""
    width = PROMPT_LEN + MAX_WORDS + 1
    ids = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, prompt in enumerate(sample_prompts(n, rng)):
        seq = prompt + sample_response(prompt, rng)
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, PROMPT_LEN: len(seq)] = ids[i, PROMPT_LEN: len(seq)]
    return ids, labels


def encode_prompt(prompt: list[int]) -> str:
    """Text of a prompt (what a string reward function receives)."""
    return " ".join(VOCAB[t] for t in prompt)


def decode(tokens: list[int] | torch.Tensor) -> str:
    """Text of a response: the words before the first ``<eos>``/``<pad>``, space-separated."""
    words = []
    for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        if t in (EOS, PAD):
            break
        words.append(VOCAB[t])
    return " ".join(words)


def model_config(cfg: BaseConfig) -> Any:
    """The ``LlamaConfig`` of the base model (untied LM head, as in the fused losses' tests)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS,
    )


def _pretrain(cfg: BaseConfig, progress: bool):
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    rng = random.Random(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="pretrain base LM", disable=not progress, leave=False):
        ids, labels = sample_corpus(cfg.batch_size, rng)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def build_tokenizer() -> Any:
    """A word-level HF tokenizer of ``VOCAB`` (whitespace split), saved with the base model so
    that the trainer's online mode can load the model by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(WORD_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")


def load_or_train_base(cache_dir: str | Path, cfg: BaseConfig | None = None,
                       progress: bool = True) -> tuple[object, dict]:
    """Load the base model from ``cache_dir/<fingerprint of cfg>`` if it is there, else pretrain
    it (a few seconds) and save it there (HF model + word-level tokenizer), so differently sized
    bases (``--quick``, full) coexist. Returns ``(model, info)``; ``info["trained"]`` says whether
    this call trained it, ``info["path"]`` is the model folder, ``info["final_loss"]`` the mean of
    the last 20 pretraining losses."""
    from transformers import LlamaForCausalLM

    cfg = cfg or BaseConfig()
    cache = Path(cache_dir) / cfg.fingerprint()
    meta_path = cache / "drorebel_base.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == cfg.fingerprint():
            model = LlamaForCausalLM.from_pretrained(cache)
            model.eval()
            return model, meta | {"trained": False, "path": str(cache)}
    model, losses = _pretrain(cfg, progress)
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    build_tokenizer().save_pretrained(cache)
    meta = {"fingerprint": cfg.fingerprint(), "config": asdict(cfg),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "first_loss": losses[0]}
    meta_path.write_text(json.dumps(meta, indent=1))
    return model, meta | {"trained": True, "path": str(cache)}
