"""Online (DRO-)REBEL and DPO training loop of the preference-shift demo, on the public API.

One iteration (REBEL, Gao et al., arXiv 2404.16767, Alg. 1; DRO-REBEL, arXiv 2509.19104):

1. sample two responses ``a, b`` per prompt from the current policy π_t (HF ``generate``,
   temperature 1, full softmax: no top-k / top-p, so log π_t below is the sampling density);
2. score them with the training mixture ``r = α·joy + (1 − α)·formal``;
3. record ``log π_t(a)``, ``log π_t(b)`` with one no-grad forward (the reference = π_t);
4. take ``passes`` Adam steps on the loss of the method over that batch:

   * ``rebel`` / ``chi2`` / ``kl``: :func:`drorebel.losses.fused_rebel.fused_linear_rebel_loss`
     (uniform, χ²-ball or KL-ball worst-case weights of radius ρ),
   * ``wasserstein``: :func:`drorebel.losses.wasserstein.fused_linear_wasserstein_rebel_loss`
     (``mean ℓ + ρ·sqrt(mean ‖∇_h ℓ_i‖²)``, penalty on the final hidden states),
   * ``dpo``: :func:`drorebel.losses.fused_dpo.fused_linear_dpo_loss` with chosen = the response
     with the higher reward (ties dropped), reference = π_t (online DPO);
   * ``group-chi2`` / ``group-kl``: the same fused loss with ``groups``
     (a χ²/KL ball over the groups of the reward design, weights on per-group mean losses).

Regimes (``TrainConfig.regime``): ``online`` as above; ``offline`` as the paper analyses it —
``offline_batches`` batches of pairs sampled ONCE from the initial model, the reference fixed to
the initial model, and the iterations cycling over them in epochs (reshuffled per epoch), so a
residual measures the regression's misfit rather than a fresh reward gap. Reward designs
(:mod:`~drorebel.experiments.preference_shift.designs`): one mixture for every pair, a population
of groups, or a random mixture per prompt.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from drorebel.experiments.preference_shift.designs import design_rng, score_weights
from drorebel.experiments.preference_shift.lang import (
    EOS,
    MAX_WORDS,
    PAD,
    PROMPT_LEN,
    sample_prompts,
)
from drorebel.experiments.preference_shift.reward import token_objectives
from drorebel.losses.fused_dpo import fused_linear_dpo_loss
from drorebel.losses.fused_rebel import fused_linear_rebel_loss
from drorebel.losses.output import LossOutput
from drorebel.losses.wasserstein import fused_linear_wasserstein_rebel_loss
from drorebel.ops.sequence import linear_sequence_logps

__all__ = ["Method", "TrainConfig", "budgets", "default_methods", "rollout", "sample_responses",
           "train", "REGIMES", "KINDS"]

REGIMES = ("online", "offline")
KINDS = ("rebel", "chi2", "kl", "wasserstein", "dpo", "group-chi2", "group-kl")

MAX_NEW = MAX_WORDS + 1


@dataclass(frozen=True)
class Method:
    """A training objective: ``kind`` in :data:`KINDS`, ``param`` = ρ (χ², KL, Wasserstein,
    group χ²/KL) or β (DPO); unused for rebel."""

    name: str
    kind: str
    param: float = 0.0


@dataclass
class TrainConfig:
    """Identical budget for every method: ``iterations`` × ``prompts`` pairs, ``passes`` Adam
    steps per batch at learning rate ``lr``; REBEL step size ``eta``; training mixture ``alpha``;
    reward ``design`` (``minority``: the minority group's share) and ``regime`` (``offline``:
    ``offline_batches`` fixed batches from the initial model)."""

    iterations: int = 60
    prompts: int = 32
    passes: int = 2
    lr: float = 1e-3
    eta: float = 0.2
    alpha: float = 0.8
    methods: list[Method] = field(default_factory=lambda: default_methods())
    design: str = "homogeneous"
    minority: float = 0.2
    regime: str = "online"
    offline_batches: int = 8


def default_methods(chi2: float = 0.5, kl: float = 0.05, wasserstein: float = 0.1,
                    dpo_beta: float = 0.1) -> list[Method]:
    """The five compared methods with the radii chosen by the sweep (see the demo's docs)."""
    return [Method("REBEL", "rebel"), Method("chi2-REBEL", "chi2", chi2),
            Method("KL-REBEL", "kl", kl), Method("W-REBEL", "wasserstein", wasserstein),
            Method("DPO", "dpo", dpo_beta)]


def sample_responses(model: Any, prompts: Tensor, copies: int = 1) -> Tensor:
    """``copies`` samples per prompt (rows ``i*copies + j``), ``[n*copies, PROMPT_LEN+MAX_NEW]``
    right-padded with ``<pad>`` (pure sampling at temperature 1 over the full vocabulary)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, max_new_tokens=MAX_NEW, top_k=0, top_p=1.0,
                           temperature=1.0, pad_token_id=PAD, eos_token_id=EOS)
    ids = prompts.repeat_interleave(copies, dim=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    width = PROMPT_LEN + MAX_NEW
    if out.shape[1] < width:
        out = torch.cat([out, out.new_full((out.shape[0], width - out.shape[1]), PAD)], 1)
    return out


def response_labels(seqs: Tensor) -> Tensor:
    """Labels ``[n, MAX_NEW]``: response tokens up to and including the first ``<eos>``,
    -100 after it."""
    resp = seqs[:, PROMPT_LEN:]
    after_eos = ((resp == EOS).long().cumsum(1) - (resp == EOS).long()) > 0
    return resp.masked_fill(after_eos, -100)


def hidden_and_head(model: Any, seqs: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states that predict the response tokens ``[n, MAX_NEW, H]`` and the LM head."""
    h = model.model(input_ids=seqs, attention_mask=torch.ones_like(seqs)).last_hidden_state
    return h[:, PROMPT_LEN - 1: -1], model.lm_head.weight


@dataclass
class Rollout:
    """One batch of pairs: sequences, labels, reference log-probs, objectives ``[n, 3]``."""

    seq_a: Tensor
    seq_b: Tensor
    lab_a: Tensor
    lab_b: Tensor
    ref_a: Tensor
    ref_b: Tensor
    obj_a: Tensor
    obj_b: Tensor
    weights: Tensor | None = None  # [n, 3] per-pair objective weights (None: the config's mixture)
    groups: Tensor | None = None  # [n] group ids of the reward design

    def rewards(self, alpha: float) -> tuple[Tensor, Tensor]:
        """Scalar rewards ``(r_a, r_b)`` (float32): the mixture ``(α, 1 − α, 0)`` or the
        per-pair weights of the design."""
        if self.weights is None:
            w = torch.tensor([alpha, 1.0 - alpha, 0.0], dtype=torch.float64)
            return (self.obj_a @ w).float(), (self.obj_b @ w).float()
        return ((self.obj_a * self.weights).sum(1).float(),
                (self.obj_b * self.weights).sum(1).float())


def rollout(model: Any, prompts: Tensor) -> Rollout:
    """Sample a pair per prompt from π_t and record ``log π_t`` of both (the REBEL reference)."""
    seqs = sample_responses(model, prompts, copies=2)
    labels = response_labels(seqs)
    with torch.no_grad():
        h, w = hidden_and_head(model, seqs)
        ref = linear_sequence_logps(h, w, labels)
    objs = token_objectives(seqs[:, PROMPT_LEN:])
    return Rollout(seqs[0::2], seqs[1::2], labels[0::2], labels[1::2], ref[0::2], ref[1::2],
                   objs[0::2], objs[1::2])


def method_loss(model: Any, batch: Rollout, method: Method, eta: float,
                alpha: float) -> LossOutput | None:
    """The method's ``LossOutput`` on one batch (None for DPO when every pair is a tie)."""
    r_a, r_b = batch.rewards(alpha)
    n = batch.seq_a.shape[0]
    h, w = hidden_and_head(model, torch.cat([batch.seq_a, batch.seq_b]))
    h_a, h_b = h[:n], h[n:]
    if method.kind == "dpo":
        keep = r_a != r_b
        if not bool(keep.any()):
            return None
        a_wins = (r_a > r_b)[keep]
        pick = lambda x, y: torch.where(a_wins.view(-1, *[1] * (x.dim() - 1)), x, y)  # noqa: E731
        ha, hb, la, lb = h_a[keep], h_b[keep], batch.lab_a[keep], batch.lab_b[keep]
        ra, rb = batch.ref_a[keep], batch.ref_b[keep]
        return fused_linear_dpo_loss(pick(ha, hb), pick(hb, ha), w, pick(la, lb), pick(lb, la),
                                     pick(ra, rb), pick(rb, ra), beta=method.param)
    args = (h_a, h_b, w, batch.lab_a, batch.lab_b, batch.ref_a, batch.ref_b, r_a, r_b)
    if method.kind == "wasserstein":
        return fused_linear_wasserstein_rebel_loss(*args, eta=eta, rho=method.param)
    if method.kind.startswith("group-"):
        if batch.groups is None:
            raise ValueError(f"{method.name}: group-level DRO needs a reward design with groups")
        return fused_linear_rebel_loss(*args, eta=eta, rho=method.param, groups=batch.groups,
                                       divergence=method.kind.removeprefix("group-"))
    divergence = {"rebel": "none", "chi2": "chi2", "kl": "kl"}[method.kind]
    rho = None if divergence == "none" else method.param
    return fused_linear_rebel_loss(*args, eta=eta, divergence=divergence, rho=rho)


def budgets(iterations: int, points: int) -> list[int]:
    """``points`` intermediate training budgets, evenly spaced in ``(0, iterations)``, without
    repeats (fewer when ``iterations`` is small): where REBEL's frontier is evaluated."""
    return sorted({round(iterations * k / (points + 1)) for k in range(1, points + 1)}
                  - {0, iterations})


def _snapshot(model: Any, evaluate: Callable[[Any], dict]) -> dict:
    """``evaluate(model)`` in eval mode without touching the training run's RNG stream."""
    model.eval()
    with torch.random.fork_rng(devices=[]):
        out = evaluate(model)
    model.train()
    return out


def _collect(model: Any, cfg: TrainConfig, rng: random.Random, drng: random.Random) -> Rollout:
    """One batch: ``cfg.prompts`` prompts, a pair each from ``model``, scored by the design."""
    prompts = torch.tensor(sample_prompts(cfg.prompts, rng))
    model.eval()
    batch = rollout(model, prompts)
    model.train()
    batch.weights, batch.groups = score_weights(cfg.design, cfg.prompts, drng, alpha=cfg.alpha,
                                                minority=cfg.minority)
    return batch


def _group_share(out: LossOutput, batch: Rollout) -> list[list[float]] | None:
    """``[[weight share of group g, its share of the pairs] for g in (0, 1)]`` of one pass."""
    if batch.groups is None or out.weights is None or out.weights.shape != batch.groups.shape:
        return None
    p = out.weights.detach().double()
    return [[float(p[batch.groups == g].sum()), float((batch.groups == g).double().mean())]
            for g in (0, 1)]


def train(base: Any, method: Method, cfg: TrainConfig, seed: int, progress: Any = None,
          evaluate_at: Sequence[int] = (), evaluate: Callable[[Any], dict] | None = None
          ) -> tuple[Any, dict]:
    """Train a copy of ``base`` with ``method`` (``cfg.regime``, ``cfg.design``); returns
    ``(policy, curves)`` where the curves hold, per iteration, the mean training reward and
    objectives of the batch (online: the policy's own samples before that iteration's update)
    and the mean loss (None when no step was taken: DPO on a batch of ties only); with a design
    that has groups, ``curves["group_share"]`` holds per pass the DRO weight each group receives
    next to its share of the pairs. With ``evaluate``, ``curves["snapshots"]`` holds
    ``[iteration, evaluate(policy after that many iterations)]`` for every iteration of
    ``evaluate_at``; the evaluations leave the training run bit-identical (own RNG state)."""
    if cfg.regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {cfg.regime!r}")
    torch.manual_seed(seed)
    rng, drng = random.Random(seed), design_rng(seed)
    model = copy.deepcopy(base)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curves: dict[str, list] = {"train_reward": [], "loss": [], "objectives": []}
    if cfg.design != "homogeneous":
        curves["group_share"] = []
    data = ([_collect(model, cfg, rng, drng) for _ in range(cfg.offline_batches)]
            if cfg.regime == "offline" else [])
    order: list[int] = []
    if evaluate is not None:
        curves["snapshots"] = []
    for it in range(cfg.iterations):
        if evaluate is not None and it in evaluate_at:
            curves["snapshots"].append([it, _snapshot(model, evaluate)])
        if data:
            if not order:  # a new epoch over the fixed pairs
                order = rng.sample(range(len(data)), len(data))
            batch = data[order.pop()]
        else:
            batch = _collect(model, cfg, rng, drng)
        objs = torch.cat([batch.obj_a, batch.obj_b]).mean(0)
        curves["objectives"].append(objs.tolist())
        if batch.weights is None:
            curves["train_reward"].append(cfg.alpha * objs[0].item()
                                          + (1 - cfg.alpha) * objs[1].item())
        else:
            curves["train_reward"].append(float(torch.cat(batch.rewards(cfg.alpha)).mean()))
        losses = []
        for _ in range(cfg.passes):
            out = method_loss(model, batch, method, cfg.eta, cfg.alpha)
            if out is None:
                continue
            if "group_share" in curves and method.kind != "dpo":  # DPO has no DRO weights
                curves["group_share"].append(_group_share(out, batch))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        curves["loss"].append(sum(losses) / len(losses) if losses else None)
        if progress is not None:
            progress.update(1)
    model.eval()
    return model, curves
