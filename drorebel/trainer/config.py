"""Training configuration: one dataclass, loaded from YAML and ``key=value`` overrides.

``drorebel train --config run.yaml lr=1e-5 divergence=chi2`` and
``TrainConfig.from_yaml("run.yaml", ["lr=1e-5"])`` build the same object.

Every field carries its meaning in ``metadata["help"]`` and its group in ``metadata["group"]``
(:data:`GROUPS`); ``drorebel train --help`` prints them (:func:`format_fields_help`). The
Hugging Face ``TrainingArguments`` / TRL spellings of fields we have are accepted in the YAML
file and on the command line through one table, :data:`ALIASES`; HF/TRL settings with no
equivalent here are refused with what to use instead (:data:`UNSUPPORTED`).

``batch_size`` is the GLOBAL micro-batch: pairs per forward/backward summed over all ranks, not
per GPU (see :func:`drorebel.trainer.loop.micro_batch`).

Every setting is checked before any model loads, and a bad one is ONE line, a
:class:`ConfigError` naming the setting, its value and what is allowed (the CLI prints it and
exits 2): :meth:`TrainConfig.validate` (on construction: types - a YAML ``true`` is not the
number 1 -, finite numbers in range, choices, settings that contradict each other or have no
effect with the chosen loss) and :meth:`TrainConfig.check_paths` (before training: the files,
``output_dir``, ``resume`` and the launcher's WORLD_SIZE); the rules themselves live in
:mod:`drorebel.trainer.config_checks`. A config file that is not valid YAML, not UTF-8,
unreadable or missing is one line too (file, line and column).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drorebel.losses.options import DIVERGENCES, W_TARGETS
from drorebel.trainer import config_aliases as _aliases
from drorebel.trainer import config_checks as _checks
from drorebel.trainer.config_aliases import (
    ALIASES,
    DTYPES,
    SCHEDULERS,
    UNSUPPORTED,
    Alias,
    check_types,
    load_yaml,
)
from drorebel.trainer.config_checks import (  # noqa: F401 (re-exported: the config's vocabulary)
    CHOICES,
    DRO_OVER,
    LOSS_IMPLS,
    LOSSES,
    MODES,
    ON_NONFINITE,
    OVERLONG,
    REFERENCES,
    REPORT_TO,
    SEED_MAX,
    TRL_COLUMNS,
    MissingPathError,
    hub_dataset_name,
    looks_local,
)
from drorebel.trainer.errors import ConfigError

__all__ = ["TrainConfig", "ConfigError", "parse_overrides", "read_yaml_mapping", "Alias",
           "ALIASES", "UNSUPPORTED", "GROUPS", "resolve_aliases", "format_fields_help",
           "BATCH_SIZE_RULE", "ON_NONFINITE", "MissingPathError"]

# fields that may change between a run and its resumption without invalidating the checkpoint
# (they change no maths of the steps that run; on_nonfinite: a run stopped by a NaN may resume
# with on_nonfinite=skip). New fields that do change the maths must not be added here.
_RESUME_FREE = ("stop_at_step", "resume", "progress", "save_steps", "save_total_limit", "log_steps",
                "tensorboard", "overwrite_output_dir", "on_nonfinite", "report_to")
# fields added after checkpoints existed: left out of the fingerprint while at these defaults, so
# older checkpoints keep resuming (a non-default value changes the data or the maths)
_FINGERPRINT_DEFAULTS = {"train_split": "train", "prompt_split": "train", "column_map": None,
                         "kl_coef": 0.0}
# LoRA fields (lora.py): out of the fingerprint while LoRA is off (lora_r 0 / null)
_FINGERPRINT_DEFAULTS.update(lora_r=0, lora_alpha=None, lora_dropout=None,
                             lora_target_modules=None, lora_save_merged=False)
_FINGERPRINT_DEFAULTS["softmax_cache"] = 0  # the softmax cache (off: the recompute backward)
_FINGERPRINT_DEFAULTS["dro_over"] = "pairs"  # group-level DRO (off: the per-pair ball)
GROUPS = ("model", "data", "loss", "optimisation", "online", "distributed",
          "checkpoints/logging")

BATCH_SIZE_RULE = (
    "batch_size is the GLOBAL micro-batch: pairs per forward/backward summed over ALL ranks "
    "(not per GPU); each of the WORLD_SIZE ranks takes batch_size / WORLD_SIZE pairs, the DRO "
    "weights cover the whole global micro-batch and an optimiser step sees batch_size x "
    "grad_accum pairs. global_batch_size is accepted for it; HF's "
    "per_device_train_batch_size is converted to batch_size = per_device_train_batch_size x "
    "WORLD_SIZE, WORLD_SIZE read from the launcher's environment (torchrun, deepspeed, "
    "accelerate; 1 without a launcher) - give batch_size instead when a run must resume on "
    "another number of GPUs.")


def _in(group: str) -> Callable[..., Any]:
    """``field`` factory of one :data:`GROUPS` entry: ``_in("loss")(default, "help")``."""
    assert group in GROUPS

    def make(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None
             ) -> Any:
        meta = {"group": group, "help": " ".join(help.split())}
        if factory is not None:
            return field(default_factory=factory, metadata=meta)
        return field(default=default, metadata=meta)

    return make


_model, _data, _loss, _opt = _in("model"), _in("data"), _in("loss"), _in("optimisation")
_online, _dist, _out = _in("online"), _in("distributed"), _in("checkpoints/logging")


@dataclass
class TrainConfig:
    """Every setting of a DRO-REBEL run (see ``configs/*.yaml`` for examples).

    The loss is DRO-REBEL (arXiv 2509.19104): ``L = Σ_i p_i ℓ_i``, ``ℓ_i = Δ_i²`` with the
    REBEL residual (arXiv 2404.16767) and ``p`` uniform (``divergence="none"``) or the worst case
    of a χ² / KL ball of radius ``rho`` (KL: or a fixed temperature ``tau``); or the
    Wasserstein penalty ``L_W = mean ℓ + ρ·sqrt(mean_i ‖∇_z ℓ_i‖²)`` with z the final hidden
    states (``w_target="hidden"``, fused) or the input embeddings (``"embeddings"``, double
    backward). ``batch_size`` is the GLOBAL micro-batch (all ranks together); the weights cover
    each micro-batch. ``mode="online"`` samples the pairs from the policy (see online.py).

    ``loss="dpo"`` trains the DPO baseline instead (arXiv 2305.18290):
    ``ℓ_i = −log σ(β·[(π_c − ref_c) − (π_r − ref_r)])`` with the chosen response c the one of
    higher reward (offline: ``reward_a``/``reward_b``; online: the sampled pair's scores); tied
    pairs are masked out (no loss, no gradient) and ``L`` is the mean over the untied pairs of
    the global micro-batch. It needs ``divergence="none"``; ``eta`` is unused.

    Each field's meaning (units, allowed values, the loss/mode it applies to) is its
    ``metadata["help"]``; ``drorebel train --help`` lists them by group.
    """

    # model
    model: str | None = _model(None, """Hub id or local directory of an AutoModelForCausalLM
        (safetensors weights only). Set exactly one of `model` / `model_config`.""")
    model_config: dict[str, Any] | None = _model(None, """Build a freshly initialised model from
        AutoConfig.for_model(**model_config) instead of loading weights: a mapping with
        `model_type` (e.g. {model_type: llama, hidden_size: 32, ...}); needs `tokenizer`.""")
    tokenizer: str | None = _model(None, """Tokenizer hub id or local path; default: `model`.
        Required with `model_config`.""")
    trust_remote_code: bool = _model(False, """Allow custom modelling code from the hub for
        `model` and `tokenizer`.""")
    attn_implementation: str = _model("auto", """Attention kernel passed to transformers: auto
        (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa, eager,
        flash_attention_2, ... ; w_target=embeddings needs eager (auto picks it).""")
    dtype: str = _model("float32", f"""dtype the model's weights are loaded in: one of
        {', '.join(DTYPES)} (float64 is not supported); under DeepSpeed it also switches
        DeepSpeed's bf16/fp16 mode on.
        HF `bf16: true` / `fp16: true` and TRL `torch_dtype` set it.""")
    # LoRA (peft; drorebel/trainer/lora.py)
    lora_r: int | None = _model(0, """LoRA rank r >= 0: > 0 wraps the model with peft's LoRA
        (needs `pip install drorebel[peft]`) and trains only the adapters; 0 or null: full
        fine-tuning. TRL ModelConfig's lora_r.""")
    lora_alpha: float | None = _model(None, """LoRA alpha > 0 (the update is scaled by
        lora_alpha / lora_r); null: 2 x lora_r. Needs lora_r > 0.""")
    lora_dropout: float | None = _model(None, """Dropout in [0, 1) on the input of the LoRA
        branch (not on the LM head's adapter: the fused loss uses its merged weight); null: 0.
        Needs lora_r > 0.""")
    lora_target_modules: list[str] | str | None = _model(None, """Modules that get an adapter:
        a list of module names (a name matches every module whose path ends with it, e.g.
        [q_proj, v_proj]) or "all-linear" (every linear layer except the LM head); null:
        all-linear. Listing lm_head adapts the head (the fused loss then uses W +
        scale*B*A). Needs lora_r > 0.""")
    lora_save_merged: bool = _model(False, """Also save output_dir/final/merged: whole weights
        with the adapter merged in (W + scale*B*A), loadable by from_pretrained without peft;
        final/ always holds the adapter. Needs lora_r > 0.""")
    # data
    train_file: str | None = _data(None, """mode=offline: the pairs - a local .json/.jsonl/
        .parquet file, a datasets save_to_disk directory, a local directory of data files
        (train.jsonl, data/train-*.parquet, ...) or a Hugging Face Hub dataset name (tried only
        when no such local path exists) - with columns prompt, response_a, response_b,
        reward_a, reward_b (TRL's chosen, rejected, chosen_reward, rejected_reward accepted;
        other names through column_map), optionally ref_logp_a/ref_logp_b from `drorebel
        precompute-ref` and `group` (the pair's group for dro_over=groups).""")
    train_split: str = _data("train", """Split of train_file to read when it is a dataset
        with splits (a DatasetDict save_to_disk directory, a data directory, a hub dataset);
        a single file has only `train`.""")
    column_map: dict[str, str] | None = _data(None, """{canonical_name: column_in_file}:
        read these columns under the trainer's names, e.g. {prompt: question, chosen:
        answer_good, rejected: answer_bad, chosen_reward: score_good, rejected_reward:
        score_bad}. Canonical names: prompt, response_a, response_b, reward_a, reward_b,
        ref_logp_a, ref_logp_b, group and the TRL names chosen, rejected, chosen_reward,
        rejected_reward (offline); prompt (mode=online, prompt_file). null: the names as
        they are.""")
    max_length: int = _data(64, """Tokens per sequence, prompt + response (the same meaning as
        TRL DPOConfig's max_length). Offline responses are cut to max_length minus the prompt's
        tokens; mode=online needs max_prompt_length + max_new_tokens <= max_length.""")
    max_prompt_length: int = _data(32, """Prompt tokens kept (< max_length); longer prompts
        follow `overlong`.""")
    overlong: str = _data("truncate", f"""What to do with a prompt longer than
        max_prompt_length: one of {', '.join(OVERLONG)} (truncate keeps its last
        max_prompt_length tokens; drop skips the row, the count is printed).""")
    # loss
    loss: str = _loss("rebel", f"""One of {', '.join(LOSSES)}. rebel: DRO-REBEL, the squared
        REBEL residual weighted per `divergence`; dpo: the DPO baseline -log sigmoid(beta *
        margin) with chosen = the higher-reward response, tied pairs masked out (needs
        divergence=none).""")
    beta: float = _loss(0.1, """DPO beta > 0 (finite), the scale of the implicit-reward margin
        (loss=dpo only; TRL DPOConfig's beta). loss=rebel ignores it.""")
    divergence: str = _loss("none", f"""loss=rebel: robust weighting of the pair losses over
        each GLOBAL micro-batch, one of {', '.join(DIVERGENCES)}. none: uniform (plain REBEL);
        chi2: worst case in a chi-square ball of radius rho; kl: worst case in a KL ball of
        radius rho, or softmax weights at fixed temperature tau; wasserstein: a gradient
        penalty of radius rho (see w_target).""")
    rho: float | None = _loss(None, """Radius >= 0 (finite) of the ambiguity set: the chi2/KL
        ball radius (divergence=chi2|kl, in units of the divergence) or the Wasserstein radius,
        the coefficient of sqrt(mean_i |grad_z loss_i|^2) (divergence=wasserstein). Required
        unless divergence=none (kl: or tau); refused with divergence=none (it would have no
        effect).""")
    tau: float | None = _loss(None, """divergence=kl only: fixed temperature > 0 (finite) of
        the weights p = softmax(loss_i / tau), instead of the radius rho (give exactly one);
        refused with the other divergences.""")
    dro_over: str = _loss("pairs", f"""What the chi2/KL ball of `divergence` perturbs, one of
        {', '.join(DRO_OVER)}. pairs: the distribution of the pairs of each global micro-batch
        (DRO-REBEL); groups: the distribution of their groups around the groups' shares (each
        pair of group g weighs q_g/n_g; beyond the paper), the group of a pair read from the
        `group` column of train_file (ints or strings). groups needs loss=rebel, divergence=chi2
        or kl and mode=offline. Adds the metrics dro/num_groups and dro/worst_group_loss.""")
    eta: float = _loss(1.0, """REBEL's eta > 0 (finite; loss=rebel): the residual is
        (1/eta)*[(log pi - log pi_ref)(a) - (log pi - log pi_ref)(b)] - (r_a - r_b), so 1/eta
        converts nats of log-ratio into reward units. loss=dpo ignores it.""")
    temperature: float = _loss(1.0, """Log-prob temperature T > 0 (finite): policy and reference
        log-probs are computed from logits / T (both losses); mode=online also samples at this
        temperature (TRL's temperature). 1.0: plain log-probs.""")
    loss_impl: str = _loss("fused", f"""One of {', '.join(LOSS_IMPLS)}. fused: log-probs from
        the final hidden states without materialising the tokens x vocab logits; materialized:
        full logits (more memory; a reference path; not for divergence=wasserstein with
        w_target=hidden).""")
    softmax_cache: int | str = _loss(0, """Bytes (int >= 0) the fused policy log-probs may
        keep the softmax of the first tokens in, so that their backward skips the logit
        recompute (3 instead of 4 tokens x hidden x vocab GEMMs; bf16 probabilities for bf16
        models, fp32 otherwise), or "auto": a quarter of the free GPU memory (CPU: of the free
        RAM, at most 4 GiB). 0: no cache. Needs loss_impl=fused and no Wasserstein penalty.
        Part of the checkpoint fingerprint: in bf16 it changes the rounding.""")
    w_target: str = _loss("hidden", f"""divergence=wasserstein only, one of
        {', '.join(W_TARGETS)}: perturb the final hidden states (hidden; fused, one backward) or
        the input embeddings (embeddings; a double backward: needs attn_implementation
        eager/auto, no DeepSpeed). embeddings with another divergence is refused.""")
    # optimisation
    lr: float = _opt(1e-4, """Peak AdamW learning rate > 0 (finite), reached after warm-up. HF:
        learning_rate.""")
    weight_decay: float = _opt(0.0, """AdamW decoupled weight decay >= 0 (finite). HF:
        weight_decay.""")
    adam_betas: list[float] = _opt(factory=lambda: [0.9, 0.999], help="""AdamW (beta1, beta2)
        as a two-element list, each in [0, 1) (HF's adam_beta1 / adam_beta2 go here).""")
    scheduler: str = _opt("constant", f"""Learning-rate schedule after the linear warm-up, one
        of {', '.join(SCHEDULERS)} (linear and cosine decay to 0 at max_steps). HF:
        lr_scheduler_type (constant_with_warmup = constant).""")
    warmup_steps: int = _opt(0, """Optimiser steps of linear warm-up (>= 0), for every
        scheduler (0: none).""")
    batch_size: int = _opt(4, """GLOBAL micro-batch: pairs per forward/backward summed over ALL
        ranks, NOT per GPU. Each of the WORLD_SIZE ranks takes batch_size / WORLD_SIZE pairs
        (must divide); the DRO weights cover the whole global micro-batch. Aliases:
        global_batch_size; HF per_device_train_batch_size (x WORLD_SIZE).""")
    grad_accum: int = _opt(1, """Global micro-batches per optimiser step (>= 1): a step sees
        batch_size x grad_accum pairs. HF: gradient_accumulation_steps.""")
    max_grad_norm: float | None = _opt(1.0, """> 0: clip the gradient's global L2 norm to this
        before each optimiser step; null or 0: no clipping (0 is DeepSpeed's "off", the same
        on every engine). Negative, NaN and inf are refused.""")
    max_steps: int = _opt(10, """Optimiser steps of the whole run (>= 1); sets the schedule and is
        part of the checkpoint fingerprint. There is no epoch setting: one epoch of N pairs is
        N / (batch_size x grad_accum) steps.""")
    stop_at_step: int | None = _opt(None, """End early, as if interrupted, after this step
        (>= 1; a checkpoint is written; resume with resume=auto); the schedule still follows
        max_steps. null: run to max_steps.""")
    seed: int = _opt(0, f"""Seeds the data order, a model_config model's initialisation and
        sampling: an integer in [0, {SEED_MAX}].""")
    on_nonfinite: str = _opt("stop", f"""What a non-finite (NaN/inf) loss, gradient or parameter
        does, one of {', '.join(ON_NONFINITE)}. stop: the run ends with one error line naming
        the step and the rows of the micro-batch (the last saved checkpoint is intact); skip:
        that optimiser step is skipped (no update), counted and logged, and training goes on.
        Not part of the checkpoint fingerprint (a stopped run may resume with skip).""")
    # output
    output_dir: str = _out("runs/default", """Directory of the checkpoints (checkpoint-<step>),
        metrics.jsonl, tensorboard/ and the final model; created when missing. An existing
        file, or a directory that cannot be written, is refused before the model loads.""")
    overwrite_output_dir: bool = _out(False, """A new run (resume null) in an output_dir that
        already holds another run's files (checkpoints, metrics.jsonl, final/) is refused
        unless this is true (HF TrainingArguments' name); resume=auto or a checkpoint path
        continues that run instead. Not part of the checkpoint fingerprint.""")
    save_steps: int = _out(0, """Save a checkpoint every this many optimiser steps (>= 0); 0:
        only at the end.""")
    save_total_limit: int | None = _out(2, """Keep this many newest checkpoints (>= 0; older
        ones are deleted); 0 or null: keep all.""")
    resume: str | None = _out(None, """auto: continue from the newest complete checkpoint in
        output_dir (a fresh start when there is none); a checkpoint path (it must exist:
        checked before the model loads); null: start fresh. A checkpoint written with
        different training settings is refused. HF: resume_from_checkpoint.""")
    log_steps: int = _out(1, """Write metrics (metrics.jsonl, tensorboard) every this many
        optimiser steps (>= 1; the last step is always written). HF: logging_steps.""")
    progress: bool = _out(True, "Show a progress bar with ETA (rank 0).")
    tensorboard: bool = _out(False, """Also write the scalars to output_dir/tensorboard (needs
        the tensorboard package); the same as listing tensorboard in report_to.""")
    report_to: list[str] | str = _out(factory=lambda: ["jsonl"], help=f"""Where the step
        scalars go, a list of {', '.join(REPORT_TO)} (HF TrainingArguments' report_to; a
        single name or none is accepted). jsonl: output_dir/metrics.jsonl, always written (the
        run's record, trimmed on resume); tensorboard: output_dir/tensorboard; wandb: a
        Weights & Biases run (rank 0; WANDB_MODE=offline works without network; WANDB_PROJECT,
        default drorebel; WANDB_DIR, default output_dir). Not part of the checkpoint
        fingerprint.""")
    # distributed / performance
    deepspeed: str | None = _dist(None, """DeepSpeed JSON config (configs/ds_zero{2,3}*.json;
        launch with `deepspeed`); its "auto" values are filled from this config, explicit batch
        size / clipping / precision values must agree with it. null: DDP under torchrun, else
        one process.""")
    gradient_checkpointing: bool = _dist(False, """Recompute activations in the backward
        (non-reentrant): less activation memory, more compute.""")
    liger_kernel: bool = _dist(False, """Apply Liger-Kernel's RMSNorm/RoPE/SwiGLU patches to
        the model (CUDA only; skipped with a warning on CPU). HF: use_liger_kernel.""")
    # online (REBEL iterations: sample two responses per prompt, score, K passes; see online.py)
    mode: str = _online("offline", f"""One of {', '.join(MODES)}. offline: pairs from
        train_file; online: REBEL iterations - sample two responses per prompt of prompt_file
        from the policy, score them with the reward, train num_passes passes.""")
    prompt_file: str | None = _online(None, """mode=online: the prompts, with a `prompt` column
        (plus any columns the reward reads): a local json/jsonl/parquet file, a save_to_disk
        directory, a local directory of data files or a hub dataset name (as train_file).""")
    prompt_split: str = _online("train", """mode=online: split of prompt_file to read when it
        is a dataset with splits (as train_split).""")
    reward_fn: str | None = _online(None, """mode=online: 'module:function' with the contract of
        drorebel/trainer/rewards.py; exactly one of reward_fn / reward_model.""")
    reward_model: str | None = _online(None, """mode=online: AutoModelForSequenceClassification
        hub id or path (safetensors) scoring prompt + response; exactly one of reward_fn /
        reward_model.""")
    reward_trust_remote_code: bool = _online(False, "Allow custom modelling code for reward_model.")
    reward_weights: list[float] | None = _online(None, """mode=online, k-objective reward: the
        mixture alpha, r = sum_j alpha_j r_j (k finite numbers); null for a single objective.""")
    reference: str = _online("sampling", f"""mode=online reference policy, one of
        {', '.join(REFERENCES)}: sampling (pi_t, the policy that sampled the batch; REBEL) or
        initial (a frozen copy of the starting model).""")
    kl_coef: float = _online(0.0, """mode=online: KL-shaped rewards as in the official REBEL
        code, r = score - kl_coef * (log pi_t(y|x) - log pi_0(y|x)), sequence log-probs with
        pi_0 the initial model (a frozen copy is loaded for it, whatever `reference` is);
        >= 0 and finite, 0: raw scores (no copy). Refused with mode=offline.""")
    rollout_batch_size: int = _online(8, """mode=online: prompts per iteration (two responses
        each, so that many pairs); >= 1, a multiple of batch_size x grad_accum.""")
    num_passes: int = _online(1, """mode=online: optimiser passes K >= 1 over each rollout
        batch. TRL: num_ppo_epochs.""")
    max_new_tokens: int = _online(16, """mode=online: response tokens sampled per completion,
        >= 1 (max_prompt_length + max_new_tokens <= max_length). TRL: max_new_tokens,
        max_completion_length.""")
    do_sample: bool = _online(True, "mode=online: sample (true) or decode greedily (false).")
    top_p: float = _online(1.0, "mode=online: nucleus sampling, 0 < top_p <= 1 (1: off).")
    top_k: int = _online(0, "mode=online: top-k sampling, >= 0 (0: off).")
    generation_batch_size: int | None = _online(None, """mode=online: prompts per generate call
        (null: a rank's whole share), a divisor of rollout_batch_size; samples depend only on
        the chunk, so equal values give equal runs on any number of ranks.""")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field, its value and what is allowed.

        Types (a YAML ``true`` is not the number 1), choices, finite numbers in range, and the
        settings that contradict each other or would have no effect with the chosen loss
        (``rho`` with ``divergence=none``, ``tau`` outside KL, ...). No file is read: the
        paths are :meth:`check_paths`. Fills ``tokenizer`` from ``model``, ``save_total_limit``
        null → 0 and ``attn_implementation`` auto → eager for ``w_target=embeddings``."""
        if isinstance(self.adam_betas, tuple):
            self.adam_betas = list(self.adam_betas)
        if isinstance(self.report_to, tuple):
            self.report_to = list(self.report_to)
        check_types(self)
        _checks.validate_values(self)

    def check_paths(self, *, outputs: bool = True) -> None:
        """The checks against the file system and the launcher, run before any model loads.

        The data file and local model/tokenizer/DeepSpeed paths must exist (hub ids without a
        slash-prefix are allowed); with ``outputs`` (training; precompute-ref may pass False):
        ``output_dir`` must be a directory that exists and is writable or can be created, and
        ``resume`` a checkpoint path that exists (``auto`` is always allowed). Under a launcher
        (WORLD_SIZE set) ``batch_size`` and the online generation chunks must split over the
        ranks."""
        _checks.check_paths(self, outputs)

    def fingerprint(self) -> str:
        """Hash of the settings a checkpoint depends on (resume refuses a different one).

        ``loss`` and ``beta`` count only for ``loss="dpo"`` (REBEL ignores β, and REBEL
        checkpoints written before these fields existed keep their fingerprint).
        """
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUME_FREE}
        for k, default in _FINGERPRINT_DEFAULTS.items():
            if k in d and d[k] == default:
                del d[k]
        if self.loss == "rebel":
            del d["loss"], d["beta"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build from one mapping of field names or their :data:`ALIASES` (types checked)."""
        values, origins = resolve_aliases(data, where)
        _aliases.check_alias_requirements(values, origins, cls)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | None = None) -> TrainConfig:
        """Load ``path`` (may be None) and apply ``key=value`` overrides (YAML-parsed values).

        Each layer may use :data:`ALIASES`; within a layer an alias and its field with different
        values is an error, across layers the command line wins."""
        values, origins = resolve_aliases(read_yaml_mapping(path), path or "config")
        over, over_origins = resolve_aliases(parse_overrides(overrides or []), "the command line")
        values.update(over)
        origins.update(over_origins)
        _aliases.check_alias_requirements(values, origins, cls)
        return cls(**values)


def read_yaml_mapping(path: str | None) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (``{}`` for None or an empty file). A missing or
    unreadable file, bytes that are not UTF-8, a YAML syntax error (``path:line:column``), a key
    given twice and a top level that is not a mapping are each one :class:`ConfigError` line."""
    if path is None:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: "
                          f"{err.strerror or type(err).__name__}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {path!r} is not UTF-8 text (line {line}, byte "
                          f"{err.start}: {err.reason})") from err
    data = load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of `setting: value` lines, "
                          f"got a {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-5", "model_config={hidden_size: 32}"]`` → dict (values parsed as YAML; a value
    that is not YAML, or one key given twice with different values, is a ConfigError)."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed = load_yaml(value, f"override {item!r}") if value != "" else None
        if key in out and not _same_value(out[key], parsed):
            raise ConfigError(f"override `{key}` is given twice with different values "
                              f"({given[key]!r} and {item!r}); give it once")
        out[key], given[key] = parsed, item
    return out


def _same_value(a: Any, b: Any) -> bool:
    """``a == b``, numbers compared as floats ("1e-5", which YAML 1.1 reads as a string, equals
    1.0e-5)."""
    if a == b:
        return True
    scalar = (str, int, float)
    if not (isinstance(a, scalar) and isinstance(b, scalar)) or isinstance(a, bool) or \
            isinstance(b, bool):
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def resolve_aliases(data: dict[str, Any], where: str = "config"
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`drorebel.trainer.config_aliases.resolve_aliases` for :class:`TrainConfig`."""
    return _aliases.resolve_aliases(data, TrainConfig, CHOICES, where)


def format_fields_help(width: int = 100) -> str:
    """The epilog of ``drorebel train --help``: every field by group, the batch-size rule and
    the HF/TRL spellings (:func:`drorebel.trainer.config_aliases.format_fields_help`)."""
    return _aliases.format_fields_help(TrainConfig, GROUPS, BATCH_SIZE_RULE, width)
