"""χ²-DRO-REBEL with TRL: drorebel's fused loss inside a TRL ``DPOTrainer`` subclass.

Run: ``python examples/trl_rebel.py`` (needs ``pip install drorebel[trl]``; a few seconds on a
CPU). The dataset has TRL's preference columns ``prompt``/``chosen``/``rejected`` plus the
rewards of both responses (``chosen_reward``/``rejected_reward``; ``score_chosen``/
``score_rejected`` work too). A tiny Llama and a word-level tokenizer are built in code, so
nothing is downloaded. With a real model, pass its name or the loaded model and tokenizer
instead, and a ``ref_model`` (or ``precompute_ref_log_probs=True``, or a PEFT model).
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from drorebel.integrations.trl import DroRebelTRLConfig, DroRebelTRLTrainer

WORDS = ["good", "nice", "fine", "bad", "awful", "no", "the", "a", "cat", "dog", "is", "was",
         "very", "not", "say", "what"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: <pad>=0, <eos>=1, <unk>=2, then ``WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tiny_dataset(n: int = 16, seed: int = 0, reward_columns=("chosen_reward", "rejected_reward")
                 ) -> Dataset:
    """Pairs whose rewards prefer 'good' words; responses of different lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS[6:]) for _ in range(rng.randint(2, 4)))
        chosen = " ".join(rng.choice(WORDS[:3]) for _ in range(rng.randint(1, 4)))
        rejected = " ".join(rng.choice(WORDS[3:6]) for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": prompt + " ", "chosen": chosen, "rejected": rejected,
                     reward_columns[0]: 1.0 + rng.random(), reward_columns[1]: -rng.random()})
    return Dataset.from_list(rows)


def make_trainer(output_dir: str, steps: int, divergence: str = "chi2", rho: float | None = 0.5,
                 dataset: Dataset | None = None, batch_size: int = 4, **config
                 ) -> DroRebelTRLTrainer:
    """The trainer on the tiny model and data; ``batch_size`` pairs per device (under
    ``torchrun`` or ``accelerate launch`` the DRO weights cover all devices' pairs)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    args = DroRebelTRLConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, eta=1.0, divergence=divergence, rho=rho, **config)
    return DroRebelTRLTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                              train_dataset=dataset if dataset is not None else tiny_dataset(),
                              processing_class=tokenizer)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--divergence", default="chi2", choices=["none", "chi2", "kl",
                                                                 "wasserstein"])
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--average-log-prob", action="store_true",
                        help="per-token mean log-probs (policy and reference alike)")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, a.steps, a.divergence, a.rho,
                               average_log_prob=a.average_log_prob)
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:
        print(f"step {e['step']}: loss {e['loss']:.4f}  rewards/margins "
              f"{e['rewards/margins']:+.3f}  dro/weight_max {e['dro/weight_max']:.3f}")
    return [e["loss"] for e in logs]


if __name__ == "__main__":
    main()
