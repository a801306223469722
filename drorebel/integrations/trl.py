"""drorebel's fused losses inside TRL (``pip install drorebel[trl]``).

Two trainers, both subclasses of TRL's ``DPOTrainer``. They keep its dataset handling (the
``prompt``/``chosen``/``rejected`` columns, conversational or plain text, truncation), its
reference model (a ``ref_model``, the PEFT base with the adapter disabled, or
``precompute_ref_log_probs=True``), its optimiser and logging, and replace only the loss:

* :class:`DroRebelTRLTrainer` (config :class:`DroRebelTRLConfig`): REBEL and its χ², KL and
  Wasserstein DRO variants (:class:`drorebel.FusedLinearRebelLoss`) on pairs with rewards, read
  from the columns ``chosen_reward``/``rejected_reward`` or ``score_chosen``/``score_rejected``.
  Response a is ``chosen``, b is ``rejected``.
* :class:`FusedDPOTrainer`: TRL's sigmoid DPO computed by :class:`drorebel.FusedLinearDPOLoss`;
  same value and gradients as ``DPOTrainer`` with ``loss_type="sigmoid"``.

How the loss reaches the model: the policy (and the reference model) get a forward keyword,
``model(input_ids, attention_mask, drorebel_head=fn)``, that runs the decoder only and returns
``fn(last_hidden_state[:, :-1], lm_head.weight)``. The call goes through the wrappers around
the model (PEFT, DDP), so their forward hooks run, and the ``[tokens, vocab]`` logits are never
built. Under DeepSpeed ZeRO-3 the head is registered as an external parameter of the model
and the loss leaves the forward as a dict, so ZeRO-3 gathers the head for the forward and the
backward. Models whose head has a bias, a logit scale or a soft-cap are refused;
prompt-learning PEFT (virtual tokens) is not supported (docs/integrations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

try:
    from trl import DPOConfig, DPOTrainer
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] != "trl":
        raise
    raise ImportError("drorebel.integrations.trl needs TRL: pip install 'drorebel[trl]'") from None

from accelerate.utils import is_peft_model

from drorebel.losses.fused_common import check_eta
from drorebel.losses.fused_dpo import FusedLinearDPOLoss
from drorebel.losses.fused_rebel import FusedLinearRebelLoss, check_divergence
from drorebel.losses.options import IMPLS, check_choice
from drorebel.losses.output import LossOutput
from drorebel.losses.zero3 import register_lm_head

try:  # TRL internals used the way DPOTrainer uses them; harmless fallbacks if they move
    from trl.models.utils import disable_gradient_checkpointing
except ImportError:  # pragma: no cover - depends on the TRL version
    def disable_gradient_checkpointing(model, kwargs=None):
        return contextlib.nullcontext()
try:
    from trl.trainer.utils import use_adapter
except ImportError:  # pragma: no cover - depends on the TRL version
    use_adapter = None

__all__ = ["DroRebelTRLConfig", "DroRebelTRLTrainer", "FusedDPOTrainer", "REWARD_COLUMNS",
           "install_hidden_head", "unpack"]

# accepted (chosen, rejected) reward column names, in order of preference
REWARD_COLUMNS = (("chosen_reward", "rejected_reward"), ("score_chosen", "score_rejected"))
_HEAD_FLAG = "_drorebel_hidden_head"
_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                "lm_head_multiplier", "logits_scaling")


# ---- the model side: decoder → hidden states → a drorebel function of (hidden, head) ----------


def _check_plain_head(model: torch.nn.Module) -> None:
    """drorebel's head is ``softmax(W h / T)``: refuse heads with a bias, a scale or a soft-cap."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _SCALED_HEAD:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            raise ValueError(f"{type(model).__name__} has {name}={value}: drorebel's fused head "
                             "computes softmax(W h / T) only (no logit scale or soft-cap)")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: drorebel needs an LM head without bias "
                         "(get_output_embeddings() is None or has a bias)")


class _Fields(dict):
    """A dataclass result (a :class:`LossOutput`) as a dict of its fields: DeepSpeed ZeRO-3 finds
    the tensors of a module's output in dicts, tuples and lists only, and hooks them to gather
    the parameters again before the backward. :func:`unpack` rebuilds the dataclass."""

    def __init__(self, obj: Any) -> None:
        super().__init__({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        self.kind = type(obj)


def unpack(out: Any) -> Any:
    """The value ``fn`` returned inside ``model(..., drorebel_head=fn)``."""
    return out.kind(**out) if isinstance(out, _Fields) else out


def install_hidden_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give a transformers causal LM the forward keyword ``drorebel_head``.

    ``model(..., drorebel_head=fn)`` runs the decoder (``model.base_model``) and returns
    ``fn(hidden, weight)`` with ``hidden = last_hidden_state[:, :-1]`` (position t predicts
    token t + 1) and ``weight`` the LM head ``[V, H]`` (a dataclass such as a
    :class:`LossOutput` comes back as a dict, which :func:`unpack` turns back into it);
    without the keyword the forward is unchanged. Under DeepSpeed ZeRO-3 the head is an
    external parameter of ``model``, gathered for this forward and its backward. Patch the
    transformers model itself (under PEFT: ``get_base_model()``), then call through any
    wrapper. Idempotent; returns ``model``.
    """
    if getattr(model, _HEAD_FLAG, False):
        return model
    _check_plain_head(model)
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, drorebel_head: Callable | None = None, **kwargs):
        if drorebel_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        weight = self.get_output_embeddings().weight
        out = drorebel_head(hidden[:, :-1].to(weight.device), weight)
        return _Fields(out) if dataclasses.is_dataclass(out) else out

    model.forward = types.MethodType(forward, model)
    # ZeRO-3: the head is read inside this forward, not its own; as an external parameter of
    # the model it is gathered for the forward and again for the backward (a no-op otherwise)
    register_lm_head(model, model.get_output_embeddings().weight)
    setattr(model, _HEAD_FLAG, True)
    return model


class _RewardCollator:
    """TRL's preference collator plus the two reward columns as float tensors ``[B]``."""

    def __init__(self, inner: Callable, columns: tuple[str, str]) -> None:
        self.inner, self.columns = inner, columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        for key, column in zip(("chosen_reward", "rejected_reward"), self.columns):
            if column not in examples[0]:
                raise ValueError(f"a batch has no reward column {column!r} (columns: "
                                 f"{sorted(examples[0])})")
            out[key] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return out


def _reward_columns(dataset: Any, name: str) -> tuple[str, str]:
    """The reward columns of ``dataset``: the first pair of :data:`REWARD_COLUMNS` it has."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset of unknown features: look at the first row
        columns = list(next(iter(dataset)))
    for pair in REWARD_COLUMNS:
        if all(c in columns for c in pair):
            return pair
    wanted = " or ".join("/".join(p) for p in REWARD_COLUMNS)
    raise ValueError(f"{name} needs reward columns {wanted} next to prompt/chosen/rejected; "
                     f"it has {sorted(columns)}")


class _FusedHeadMixin:
    """What both trainers share: the drorebel head on the policy and the reference, the
    reference log-probs, the metrics. ``self._drorebel_loss`` is the loss module; its
    ``sequence_logps`` (temperature, ``average_log_prob``) also computes the reference."""

    _drorebel_loss: FusedLinearRebelLoss | FusedLinearDPOLoss
    _extra_keys: tuple[str, ...] = ()

    def _check_common_args(self, args: DPOConfig) -> None:
        if getattr(args, "padding_free", False):
            raise ValueError(f"{type(self).__name__} does not support padding_free=True "
                             "(drorebel's loss reads padded [2B, T] batches)")
        if getattr(args, "ld_alpha", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support ld_alpha "
                             "(drorebel sums or averages all response tokens)")
        if getattr(args, "use_weighting", False):
            raise ValueError(f"{type(self).__name__} does not support use_weighting (WPO)")

    def _with_head(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = self.accelerator.unwrap_model(model)
        install_hidden_head(inner.get_base_model() if is_peft_model(inner) else inner)
        return model

    def _model_inputs(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``(model kwargs, labels [2B, T-1])``: labels shifted, prompt and padding = -100."""
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")
                  if k in inputs}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return kwargs, labels[:, 1:]

    def _sequence_head(self, labels: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        loss = self._drorebel_loss
        return lambda hidden, weight: loss.sequence_logps(hidden, weight, labels)

    def _reference_sequence_logps(self, model_kwargs: dict[str, Tensor], labels: Tensor
                                  ) -> Tensor:
        """``[2B]`` reference log-probs with the loss's settings, without gradient."""
        head = self._sequence_head(labels)
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self._with_head(self.ref_model)(**model_kwargs, drorebel_head=head)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if not is_peft_model(unwrapped) or use_adapter is None:
                raise ValueError("no reference: pass ref_model, a PEFT model, or "
                                 "precompute_ref_log_probs=True")
            name = "ref" if "ref" in unwrapped.peft_config else None
            with use_adapter(unwrapped, adapter_name=name):
                return self._with_head(self.model)(**model_kwargs, drorebel_head=head)

    def _reference(self, inputs: dict[str, Tensor], model_kwargs: dict[str, Tensor],
                   labels: Tensor) -> Tensor:
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        return self._reference_sequence_logps(model_kwargs, labels)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's hook for ``precompute_ref_log_probs=True``: the reference log-probs with the
        same head settings as the loss (temperature, ``average_log_prob``)."""
        model_kwargs, labels = self._model_inputs(inputs)
        context = contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and is_peft_model(unwrapped) and use_adapter is not None:
            name = "ref" if "ref" in unwrapped.peft_config else None
            context = use_adapter(unwrapped, adapter_name=name)
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs), context, \
                self.accelerator.autocast():
            logps = self._with_head(model)(**model_kwargs,
                                           drorebel_head=self._sequence_head(labels))
        return logps.chunk(2, dim=0)

    def _record(self, mode: str, metrics: dict[str, Tensor | float], inputs: dict) -> None:
        store = self._metrics[mode]
        for key, value in metrics.items():
            store[key].append(float(value))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
            self._total_train_tokens += int(tokens.item())
        store["num_tokens"] = [self._total_train_tokens]

    def _fused_loss(self, model, inputs: dict[str, Tensor], loss: Callable
                    ) -> tuple[LossOutput, Tensor]:
        """``(loss(hidden, weight, labels, ref_logps), ref_logps)``, the loss computed inside
        the policy's forward."""
        model_kwargs, labels = self._model_inputs(inputs)
        ref = self._reference(inputs, model_kwargs, labels).to(inputs["input_ids"].device)
        out = self._with_head(model)(
            **model_kwargs, drorebel_head=lambda hidden, weight: loss(hidden, weight, labels, ref))
        return unpack(out), ref

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss only: the fused head builds no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# ---- REBEL / DRO-REBEL --------------------------------------------------------------------------


@dataclass
class DroRebelTRLConfig(DPOConfig):
    """``DPOConfig`` plus the settings of drorebel's REBEL loss.

    ``beta``, ``loss_type`` and the other DPO-only fields are not used; the reference settings
    (``precompute_ref_log_probs``, ``sync_ref_model``, ...) and everything of ``Trainer`` are.
    """

    eta: float = field(default=1.0, metadata={"help": "REBEL step size η > 0: the implicit "
                                              "reward is (log π − log π_ref)/η."})
    divergence: str = field(default="none", metadata={
        "help": "none (REBEL), chi2, kl or wasserstein (DRO-REBEL)."})
    rho: float | None = field(default=None, metadata={
        "help": "Radius of the ambiguity set (chi2, kl, wasserstein)."})
    tau: float | None = field(default=None, metadata={
        "help": "Fixed KL temperature (divergence=kl, instead of rho)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature T of the log-probs: log softmax(W h / T)."})
    average_log_prob: bool = field(default=False, metadata={
        "help": "Per-token mean log-probs instead of sums (policy and reference)."})
    loss_impl: str = field(default="auto", metadata={
        "help": "auto, triton, torch (fused) or materialized (full logits)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = check_eta(self.eta)
        check_divergence(self.divergence, self.rho, self.tau)
        check_choice("loss_impl", self.loss_impl, IMPLS)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")


def _rebel_loss_from(args: DroRebelTRLConfig) -> FusedLinearRebelLoss:
    return FusedLinearRebelLoss(eta=args.eta, divergence=args.divergence, rho=args.rho,
                                tau=args.tau, temperature=args.temperature, impl=args.loss_impl,
                                average_log_prob=args.average_log_prob)


def _weight_entropy(p: Tensor) -> Tensor:
    """``−Σ p log p`` (0 log 0 = 0): log n for uniform weights, 0 for one pair."""
    return -torch.special.xlogy(p, p).sum()


class DroRebelTRLTrainer(_FusedHeadMixin, DPOTrainer):
    """TRL ``DPOTrainer`` whose loss is drorebel's fused (DRO-)REBEL loss on pairs with rewards.

    Same constructor as ``DPOTrainer``; ``args`` is a :class:`DroRebelTRLConfig`. The dataset
    has TRL's preference columns plus the rewards (``chosen_reward``/``rejected_reward`` or
    ``score_chosen``/``score_rejected``). With ``a`` = chosen and ``b`` = rejected the loss is
    ``Σ_i p_i Δ_i²``, ``Δ_i = [(log π(a_i) − log π_ref(a_i)) − (log π(b_i) − log π_ref(b_i))]/η −
    (r_a,i − r_b,i)``, with ``p`` uniform (REBEL) or the χ²/KL worst-case weights, or the
    Wasserstein penalty (docs/design.md §1).

    Logged metrics: TRL's ``rewards/chosen`` and ``rewards/rejected`` (mean implicit reward
    ``(log π − log π_ref)/η``), ``rewards/margins``, ``rewards/accuracies`` (fraction of pairs whose
    implicit margin has the sign of ``r_chosen − r_rejected``), ``logps/chosen``,
    ``logps/rejected``; drorebel's ``rebel/residual_mean``, ``rebel/residual_sq`` (mean Δ²),
    ``rebel/residual_abs_max``, ``dro/weight_max``, ``dro/weight_entropy``, ``dro/ess``,
    ``dro/robust_objective``, ``dro/eta_star`` or ``dro/tau_star``, ``wasserstein/*``; and
    ``num_tokens``.
    """

    _tag_names = ["trl", "drorebel", "rebel"]

    def __init__(self, model, ref_model=None, args: DroRebelTRLConfig | None = None,
                 data_collator=None, train_dataset=None, *rest, **kwargs) -> None:
        if args is None:
            args = DroRebelTRLConfig(output_dir="drorebel-trl")
        if not isinstance(args, DroRebelTRLConfig):
            raise TypeError(f"args must be a DroRebelTRLConfig, got {type(args).__name__}")
        self._check_common_args(args)
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self._reward_cols = _reward_columns(train_dataset, "train_dataset")
        self._drorebel_loss = _rebel_loss_from(args)  # before super(): the precompute uses it
        super().__init__(model, ref_model, args, data_collator, train_dataset, *rest, **kwargs)
        self.data_collator = _RewardCollator(self.data_collator, self._reward_cols)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in self._reward_cols:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        rewards = torch.cat([inputs["chosen_reward"], inputs["rejected_reward"]])
        out, ref = self._fused_loss(model, inputs, lambda hidden, weight, labels, ref:
                                    self._drorebel_loss(hidden, weight, labels, rewards, ref))
        self._record(mode, self._metrics_of(out, ref), inputs)
        return (out.loss, out) if return_outputs else out.loss

    def _metrics_of(self, out: LossOutput, ref: Tensor) -> dict[str, Tensor]:
        m = dict(out.metrics)
        ref_a, ref_b = ref.chunk(2)
        eta = self._drorebel_loss.eta
        gather = self.accelerator.gather
        chosen = gather((out.policy_logps_a.detach() - ref_a.to(out.policy_logps_a.dtype)) / eta)
        rejected = gather((out.policy_logps_b.detach() - ref_b.to(out.policy_logps_b.dtype))
                          / eta)
        metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/margins": m.pop("rewards/margins"),
                   "rewards/accuracies": m.pop("rewards/accuracies"),
                   "logps/chosen": m.pop("logps/a"), "logps/rejected": m.pop("logps/b"),
                   "rebel/residual_sq": m["rebel/loss_mean"]}
        if out.weights is not None:
            metrics["dro/weight_entropy"] = _weight_entropy(gather(out.weights.detach()))
        metrics.update(m)
        return metrics


# ---- DPO ----------------------------------------------------------------------------------------


class FusedDPOTrainer(_FusedHeadMixin, DPOTrainer):
    """TRL ``DPOTrainer`` whose sigmoid DPO loss is drorebel's :class:`FusedLinearDPOLoss`.

    A drop-in for ``DPOTrainer(args=DPOConfig(loss_type="sigmoid"))``: same data, reference and
    ``beta``, same loss and gradients (``tests/test_integration_trl.py``), without the logits.
    ``impl`` picks drorebel's path (``"auto"``, ``"triton"``, ``"torch"``, ``"materialized"``).
    Only the plain sigmoid loss is supported: other ``loss_type``s, ``f_divergence_type``,
    ``label_smoothing``, ``ld_alpha``, ``use_weighting`` and ``padding_free`` are refused. Logs
    TRL's ``rewards/*`` and ``logps/*`` metrics and ``num_tokens``.
    """

    _tag_names = ["trl", "dpo", "drorebel"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *rest,
                 impl: str = "auto", **kwargs) -> None:
        if args is None:
            args = DPOConfig(output_dir="drorebel-fused-dpo")
        self._check_common_args(args)
        if list(args.loss_type) != ["sigmoid"] or args.f_divergence_type != "reverse_kl" \
                or args.label_smoothing:
            raise ValueError("FusedDPOTrainer computes the plain sigmoid DPO loss: use "
                             "loss_type='sigmoid', f_divergence_type='reverse_kl', "
                             "label_smoothing=0")
        self._drorebel_loss = FusedLinearDPOLoss(beta=args.beta, impl=impl)
        super().__init__(model, ref_model, args, *rest, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        out, _ = self._fused_loss(model, inputs, self._drorebel_loss)
        self._record(mode, {k: v for k, v in out.metrics.items()
                            if k.startswith(("rewards/", "logps/"))}, inputs)
        return (out.loss, out) if return_outputs else out.loss
