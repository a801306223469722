"""A tiny word-level tokenizer and pair dataset built in code (no downloads)."""

from __future__ import annotations

import json
import os
import random

WORDS = ["good", "bad", "fine", "nice", "awful", "ok", "the", "a", "cat", "dog", "is", "was",
         "very", "not", "answer", "question", "yes", "no", "maybe", "say"]
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 32, "max_position_embeddings": 64, "tie_word_embeddings": False}


def build_tokenizer(path: str) -> str:
    """Save a WordLevel tokenizer (whitespace split, <eos>=1, <pad>=0) to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3, "<u>": 4, "<a>": 5}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")
    fast.chat_template = ("{% for m in messages %}{{ '<u> ' if m['role'] == 'user' else '<a> ' }}"
                          "{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<a> {% endif %}")
    fast.save_pretrained(path)
    return path


def write_pairs(path: str, n: int = 16, seed: int = 0, trl: bool = False) -> str:
    """JSONL of pairs whose reward says 'good' answers beat 'bad' ones."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS[6:14]) for _ in range(rng.randint(2, 5)))
            a = " ".join(rng.choice(["good", "nice", "fine"]) for _ in range(rng.randint(1, 4)))
            b = " ".join(rng.choice(["bad", "awful", "no"]) for _ in range(rng.randint(1, 4)))
            ra, rb = 1.0 + rng.random(), -rng.random()
            if trl:
                row = {"prompt": prompt, "chosen": a, "rejected": b,
                       "chosen_reward": ra, "rejected_reward": rb}
            else:
                row = {"prompt": prompt, "response_a": a, "response_b": b,
                       "reward_a": ra, "reward_b": rb}
            f.write(json.dumps(row) + "\n")
    return path


def base_overrides(tmp: str, **extra: object) -> dict:
    """A TrainConfig dict for the tiny model/data under ``tmp``."""
    tok = os.path.join(tmp, "tok")
    if not os.path.exists(tok):
        build_tokenizer(tok)
    data = os.path.join(tmp, "pairs.jsonl")
    if not os.path.exists(data):
        write_pairs(data)
    cfg = {"model_config": dict(TINY_MODEL), "tokenizer": tok, "train_file": data,
           "output_dir": os.path.join(tmp, "run"), "max_steps": 6, "batch_size": 4,
           "lr": 3e-3, "progress": False, "max_length": 24, "max_prompt_length": 12}
    cfg.update(extra)
    return cfg
