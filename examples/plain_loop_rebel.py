"""χ²-DRO-REBEL in a hand-written PyTorch loop with the fused loss (no logits materialised).

Run: ``python examples/plain_loop_rebel.py``. A tiny Llama built from a config learns to prefer
responses with many even token ids (a Python reward function); the pairs are stacked ``[a; b]``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drorebel import FusedLinearRebelLoss, linear_sequence_logps

PROMPT, RESPONSE, VOCAB = 4, 6, 128


def reward(tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of even token ids in each response."""
    return (tokens % 2 == 0).float().mean(dim=-1)


def make_pairs(n_pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stacked ``[a; b]`` batch: shared prompts, two random responses each, HF-style labels."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (n_pairs, PROMPT), generator=g).repeat(2, 1)
    response = torch.randint(0, VOCAB, (2 * n_pairs, RESPONSE), generator=g)
    input_ids = torch.cat([prompt, response], dim=1)
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100  # only response tokens count
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels, "rewards": reward(response)}


def hidden_states(model: LlamaForCausalLM, batch: dict) -> torch.Tensor:
    """Final hidden states that predict the next token: ``[2B, T-1, H]``."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = FusedLinearRebelLoss(eta=1.0, divergence="chi2", rho=0.5)
    batch = make_pairs(args.pairs)
    labels = batch["labels"][:, 1:]  # aligned with hidden_states(): position t predicts t+1
    with torch.no_grad():  # REBEL: log π_t of the policy that sampled the pairs, recorded once
        ref_logps = linear_sequence_logps(hidden_states(model, batch), model.lm_head.weight,
                                          labels)
    losses = []
    for step in range(args.steps):
        out = loss_fn(hidden_states(model, batch), model.lm_head.weight, labels,
                      batch["rewards"], ref_logps)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        print(f"step {step}: loss {out.loss.item():.4f}  "
              f"ESS {out.metrics['dro/ess'].item():.2f}  max weight {out.weights.max():.3f}")
    return losses


if __name__ == "__main__":
    main()
