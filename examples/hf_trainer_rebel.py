"""KL-DRO-REBEL inside a Hugging Face ``Trainer``: override ``compute_loss`` with the fused loss.

Run: ``python examples/hf_trainer_rebel.py``. Each dataset row is one preference pair (a
prompt, two responses, their rewards and the reference log-probs recorded when the pair was
sampled); the collator stacks the a- and b-sequences as ``[a; b]``. Under DeepSpeed ZeRO-3 the
LM head is partitioned: wrap the model in ``drorebel.losses.zero3.CausalLMWithFusedLoss``
(its forward does what ``compute_loss`` does here) and return ``model(**inputs)["loss"]``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from drorebel import FusedLinearRebelLoss, linear_sequence_logps

PROMPT, RESPONSE, VOCAB = 4, 6, 128


class RebelTrainer(Trainer):
    """``Trainer`` whose loss is the fused (DRO-)REBEL loss on the final hidden states."""

    def __init__(self, *args, rebel_loss: FusedLinearRebelLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.rebel_loss = rebel_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model.base_model(input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"])
        result = self.rebel_loss(
            out.last_hidden_state[:, :-1],          # hidden[:, t] predicts token t + 1
            model.get_output_embeddings().weight,   # LM head [V, H]
            inputs["labels"][:, 1:],                # prompt / padding = -100
            inputs["rewards"],                      # [2B], stacked [a; b]
            inputs["ref_logps"],                    # [2B], log π_ref per sequence
        )
        if self.model.training:
            self.log({k: v.item() for k, v in result.metrics.items()})
        return (result.loss, result) if return_outputs else result.loss


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Pairs → one stacked ``[a; b]`` batch (all rows have the same length here)."""
    def stack(key: str) -> torch.Tensor:
        return torch.stack([r[f"{key}_a"] for r in rows] + [r[f"{key}_b"] for r in rows])

    ids = stack("input_ids")
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "rewards": stack("reward"), "ref_logps": stack("ref_logps")}


@torch.no_grad()
def make_dataset(model: LlamaForCausalLM, n_pairs: int, seed: int = 0) -> list[dict]:
    """Random pairs rewarded by their fraction of even tokens; log π_ref recorded from
    ``model`` (REBEL: the policy that sampled the pairs), one no-grad pass."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_pairs):
        prompt = torch.randint(0, VOCAB, (PROMPT,), generator=g)
        row = {"ref_logps_a": torch.tensor(0.0), "ref_logps_b": torch.tensor(0.0)}
        for side in "ab":
            response = torch.randint(0, VOCAB, (RESPONSE,), generator=g)
            row[f"input_ids_{side}"] = torch.cat([prompt, response])
            row[f"reward_{side}"] = (response % 2 == 0).float().mean()
        rows.append(row)
    batch = collate(rows)
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
    ref = linear_sequence_logps(hidden, model.lm_head.weight, batch["labels"][:, 1:])
    for i, row in enumerate(rows):
        row["ref_logps_a"], row["ref_logps_b"] = ref[i], ref[n_pairs + i]
    return rows


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs-per-batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    dataset = make_dataset(model, n_pairs=4 * args.pairs_per_batch)
    with tempfile.TemporaryDirectory() as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir, max_steps=args.steps, learning_rate=1e-3,
            per_device_train_batch_size=args.pairs_per_batch, logging_steps=1,
            save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
        )
        trainer = RebelTrainer(model=model, args=training_args, train_dataset=dataset,
                               data_collator=collate,
                               rebel_loss=FusedLinearRebelLoss(eta=1.0, divergence="kl", rho=0.1))
        trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


if __name__ == "__main__":
    main()
