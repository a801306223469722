"""Training engines: one process, torchrun DDP, or DeepSpeed ZeRO-2/3 — one small interface.

:func:`create_engine` picks the backend: DeepSpeed when ``cfg.deepspeed`` names a JSON config,
DDP when ``WORLD_SIZE > 1`` (torchrun; gloo on CPU, nccl on CUDA), else a plain process. Every
engine exposes ``module`` (the unwrapped Hugging Face model, for ``generate``), ``device``,
``rank``, ``world_size``, ``forward`` / ``backward`` / ``step`` for one optimiser step, no-grad
:meth:`Engine.sequence_logps`, and the checkpoint hooks used by
:mod:`drorebel.trainer.checkpoint`.

Data parallel DRO-REBEL (arXiv 2509.19104): ``cfg.batch_size`` is the *global* micro-batch;
each rank holds ``batch_size / world_size`` pairs of it and the loss module gathers the detached
per-pair losses, so the worst-case weights cover the global micro-batch and
``loss = world·Σ_{i local} p_i ℓ_i`` — gradient averaging then gives the single-process gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from drorebel.losses.zero3 import CausalLMWithFusedLoss
from drorebel.trainer.batch import PairBatch
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.errors import TrainingDiverged
from drorebel.trainer.lora import (
    ADAPTER_WEIGHTS,
    MERGED_DIR,
    adapter_disabled,
    load_adapter,
    lora_enabled,
    merged_state_dict,
    save_adapter,
)
from drorebel.trainer.model import load_model, policy_module, sequence_logps, wrap_model
from drorebel.trainer.run_dir import agree, torch_save, writing

__all__ = ["TrainingDiverged", "NonFiniteStep", "Engine", "DDPEngine", "DeepSpeedEngine",
           "create_engine", "close_process_group", "owns_process_group", "build_optimizer",
           "deepspeed_config", "all_finite"]

# per-sequence outputs of the loss module that are not step metrics
_PER_SEQUENCE = ("policy_logps", "weights")


class NonFiniteStep(TrainingDiverged):
    """:meth:`Engine.step` found a NaN/inf gradient norm. ``updated``: whether the parameters
    were changed anyway (DeepSpeed applied a non-finite update); if not, the step can be
    skipped with :meth:`Engine.skip_step`. ``value``: the gradient norm."""

    def __init__(self, message: str, value: float, updated: bool) -> None:
        super().__init__(message)
        self.value, self.updated = value, updated


def all_finite(tensors: Any) -> bool:
    """Whether every element of ``tensors`` is finite: one fused max-|x| per dtype and device
    (``torch._foreach_norm(·, inf)``: no overflow, NaN propagates) and one host sync."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel() and (t.is_floating_point() or t.is_complex()):
            groups.setdefault((t.dtype, t.device), []).append(t.detach())
    flags = []
    for ts in groups.values():
        try:
            norms = torch._foreach_norm(ts, math.inf)
        except (RuntimeError, TypeError, NotImplementedError):  # no fused kernel for this case
            norms = [torch.linalg.vector_norm(t, math.inf) for t in ts]
        flags.append(torch.isfinite(torch.stack(norms)).all().cpu())
    return bool(torch.stack(flags).all()) if flags else True




def build_optimizer(params: Any, cfg: TrainConfig, cpu_adam: bool = False
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and a LambdaLR schedule: linear warm-up, then constant / linear / cosine decay.

    ``cpu_adam``: DeepSpeed's vectorised ``DeepSpeedCPUAdam`` (AdamW mode) for ZeRO-Offload.
    """
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.adam_betas), adamw_mode=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=tuple(cfg.adam_betas))
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        frac = (s - warm) / max(1, total - warm)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - frac)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Engine:
    """One process (CPU or one GPU): plain autograd, clip, AdamW step."""

    backend = "plain"

    def __init__(self, model: torch.nn.Module, wrapper: CausalLMWithFusedLoss, cfg: TrainConfig,
                 device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.module, self.wrapper, self.cfg = model, wrapper, cfg
        self.device, self.rank, self.world_size = device, rank, world_size
        self.lora = lora_enabled(cfg)  # module: the peft model; only the adapters train
        self.optimizer, self.scheduler = self._make_optimizer()
        self.train_module: torch.nn.Module = wrapper

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        return build_optimizer(self.trainable_parameters(), self.cfg)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (all of them, or the adapters under LoRA)."""
        return [p for p in self.wrapper.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ one optimiser step
    def forward(self, batch: PairBatch) -> dict[str, Tensor]:
        """``loss``, ``num_tokens`` and the loss's metrics for this rank's share of one
        micro-batch (tensors on ``device``)."""
        out = self.train_module(**batch.model_inputs())
        return {k: v for k, v in out.items() if k not in _PER_SEQUENCE}

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward (DDP: no all-reduce unless last)."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, n_micro: int) -> None:
        (loss / n_micro).backward()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, step: int) -> float:
        """Check the gradient norm, clip, update, advance the schedule. Returns the pre-clip
        gradient norm. A NaN/inf norm raises :class:`NonFiniteStep` (``updated=False``) before
        anything changes (the caller stops, or skips with :meth:`skip_step`).

        ``max_grad_norm`` null or 0: no clipping (the norm is still computed and checked)."""
        params = [p for p in self.wrapper.parameters() if p.grad is not None]
        gnorm = _total_norm([p.grad for p in params])
        if not torch.isfinite(gnorm):
            raise NonFiniteStep(f"non-finite gradient norm ({float(gnorm)}) at step {step + 1}",
                                float(gnorm), updated=False)
        if self.cfg.max_grad_norm:
            _clip(params, float(self.cfg.max_grad_norm), gnorm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(gnorm)

    def skip_step(self) -> None:
        """Skip this optimiser step (``on_nonfinite=skip``): drop the gradients, leave the
        parameters and the optimizer state alone, advance the learning-rate schedule (the step
        slot is used up: the rate of step s stays a function of s)."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def parameter_tensors(self) -> list[Tensor]:
        """This rank's parameters (DeepSpeed ZeRO-3: its partitions)."""
        return [getattr(p, "ds_tensor", p) for p in self.wrapper.parameters()]

    def optimizer_tensors(self) -> list[Tensor]:
        """This rank's optimizer state tensors (and master weights where the optimizer keeps
        them)."""
        return [v for st in self.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v)]

    def parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (collective: every rank calls it)."""
        return self._all_ranks(all_finite(self.parameter_tensors()))

    def state_finite(self) -> bool:
        """Whether parameters and optimizer state are finite on every rank (collective); checked
        before a checkpoint is written."""
        return self._all_ranks(all_finite(self.parameter_tensors())
                               and all_finite(self.optimizer_tensors()))

    def _all_ranks(self, ok: bool) -> bool:
        if self.world_size == 1:
            return ok
        bad = self.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=self.device))
        return bool(bad.item() == 0)

    # ------------------------------------------------------------------ helpers
    def train(self) -> None:
        self.wrapper.train()

    def eval(self) -> None:
        self.wrapper.eval()

    @torch.no_grad()
    def sequence_logps(self, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """``Σ_t log π(y_t)`` over response tokens, no grad, fp32 ``[B]`` (ZeRO-3 safe).

        Under ZeRO-3 every rank must call it the same number of times (parameter gathers are
        collective)."""
        return sequence_logps(self.wrapper, ids.to(self.device), mask.to(self.device),
                              labels.to(self.device))

    @torch.no_grad()
    def initial_logps(self, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """:meth:`sequence_logps` of the initial policy, for reference log-probs computed
        before the first update: the same, or under LoRA the base model (peft's
        ``disable_adapter``: exactly the initial policy at any step, no second copy)."""
        with adapter_disabled(self.module):
            return self.sequence_logps(ids, mask, labels)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of the detached ``x`` over ranks (identity in one process)."""
        if self.world_size == 1:
            return x
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ persistence
    def save_state(self, path: str) -> None:
        """Model (safetensors), optimizer and scheduler into ``path`` (rank 0 writes)."""
        from safetensors.torch import save_model

        if self.rank == 0:
            if self.lora:  # the adapter only; the base weights are rebuilt from the config
                with writing(os.path.join(path, ADAPTER_WEIGHTS)):
                    save_adapter(self.module, path)
            else:
                model_file = os.path.join(path, "model.safetensors")
                with writing(model_file):
                    save_model(self.module, model_file)
            torch_save(self.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
            torch_save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_model

        if self.lora:
            load_adapter(self.module, path)
        else:
            load_model(self.module, os.path.join(path, "model.safetensors"), strict=True)
        self.optimizer.load_state_dict(_load(path, "optimizer.pt"))
        self.scheduler.load_state_dict(_load(path, "scheduler.pt"))

    def save_pretrained(self, path: str, tokenizer: Any) -> None:
        """``save_pretrained`` (safetensors) of the whole model by rank 0; if rank 0 fails
        (e.g. a full disk: :class:`~drorebel.trainer.run_dir.NoSpaceLeft`) every rank raises."""
        self._write_pretrained(path, tokenizer, None)

    def _write_pretrained(self, path: str, tokenizer: Any, state: dict | None) -> None:
        err = None
        if self.rank == 0:
            try:
                with writing(path):
                    if self.lora:  # adapter_config.json + adapter_model.safetensors
                        save_adapter(self.module, path, state)
                    else:
                        self.module.save_pretrained(path, state_dict=state,
                                                    safe_serialization=True)
                    tokenizer.save_pretrained(path)
                    if self.lora and getattr(self.cfg, "lora_save_merged", False):
                        self._write_merged(os.path.join(path, MERGED_DIR), tokenizer, state)
            except Exception as e:  # noqa: BLE001 - raised by agree() below
                err = e
        agree(self, err, path)

    def _write_merged(self, path: str, tokenizer: Any, state: dict | None) -> None:
        """Whole weights with the adapter merged in (``lora_save_merged``), in a subfolder:
        beside ``adapter_config.json`` transformers would apply the adapter a second time.
        ``state``: the peft model's gathered state dict (ZeRO-3), else the live weights."""
        inner = self.module.get_base_model()
        if state is not None:
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        merged = merged_state_dict(self.module, state)
        inner.save_pretrained(path, state_dict=merged, safe_serialization=True)
        tokenizer.save_pretrained(path)


class DDPEngine(Engine):
    """torchrun data parallel: ``DistributedDataParallel`` around the pair-loss module."""

    backend = "ddp"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self.train_module = DistributedDataParallel(self.wrapper, device_ids=ids)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.train_module.no_sync()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 (optionally CPU offload); the config's batch sizes, accumulation,
    clipping and precision are filled from :class:`TrainConfig` (:func:`deepspeed_config`)."""

    backend = "deepspeed"

    def __init__(self, model: torch.nn.Module, wrapper: CausalLMWithFusedLoss, cfg: TrainConfig,
                 device: torch.device, rank: int, world_size: int, ds_cfg: dict) -> None:
        import deepspeed

        self.ds_cfg = ds_cfg
        self.stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        super().__init__(model, wrapper, cfg, device, rank, world_size)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_cfg)
        self.train_module = self.ds
        self._last = True

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """ZeRO-Offload on CUDA: ``DeepSpeedCPUAdam`` (JIT-built; torch AdamW if that fails)."""
        offload = self.ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {})
        if offload.get("device", "none") != "none" and self.device.type == "cuda":
            try:
                return build_optimizer(self.trainable_parameters(), self.cfg, cpu_adam=True)
            except Exception as err:  # noqa: BLE001 (a missing compiler, ...)
                warnings.warn(f"DeepSpeedCPUAdam unavailable ({err}); using torch AdamW on the "
                              "offloaded optimizer states (slower)", stacklevel=2)
        return super()._make_optimizer()

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, n_micro: int) -> None:
        if n_micro != self.cfg.grad_accum:
            raise ValueError(f"DeepSpeed needs grad_accum={self.cfg.grad_accum} micro-batches "
                             f"per step, got {n_micro}")
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not self._last:
            self.ds.step()  # a micro-step: advances DeepSpeed's counter, no update

    def step(self, step: int) -> float:
        """``ds.step()`` (reduce, clip at gradient_clipping, update, scheduler). DeepSpeed skips
        a step with a NaN/inf gradient itself (its overflow check): :class:`NonFiniteStep`
        with ``updated=False``; a non-finite norm it did apply: ``updated=True``."""
        skipped = self.ds.skipped_steps
        self.ds.step()
        norm = self.ds.get_global_grad_norm()  # None when compute_grad_norm=false
        gnorm = float(norm) if norm is not None else float("nan")
        if self.ds.skipped_steps != skipped:
            raise NonFiniteStep(f"non-finite gradient norm ({gnorm}) at step {step + 1}", gnorm,
                                updated=False)
        if norm is not None and not math.isfinite(gnorm):
            raise NonFiniteStep(f"non-finite gradient norm ({gnorm}) at step {step + 1}", gnorm,
                                updated=True)
        return gnorm

    def skip_step(self) -> None:
        """DeepSpeed already dropped the gradients of the step it skipped; advance the
        schedule, which DeepSpeed does not do on a skipped step (same rule as one process)."""
        sched = getattr(self.ds, "lr_scheduler", None) or self.scheduler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sched.step()

    def optimizer_tensors(self) -> list[Tensor]:
        """The ZeRO partitions of the fp32 master weights and the optimizer state."""
        base = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        out = [p for g in base.param_groups for p in g["params"]]
        return out + [v for st in base.state.values() for v in st.values() if torch.is_tensor(v)]

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save_state(self, path: str) -> None:
        """DeepSpeed checkpoint (every rank writes its ZeRO shards; collective)."""
        self.ds.save_checkpoint(path, tag="deepspeed", save_latest=False)

    def load_state(self, path: str) -> None:
        """Restore the ZeRO shards, optimizer and scheduler (``weights_only`` unpickling)."""
        _weights_only_loads(self.ds)
        out, _ = self.ds.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if out is None:
            from drorebel.trainer.checkpoint import CheckpointError

            raise CheckpointError(f"{path!r}: no DeepSpeed state could be loaded")

    def save_pretrained(self, path: str, tokenizer: Any) -> None:
        """Whole weights under ZeRO-3 (gathered to rank 0: needs
        ``stage3_gather_16bit_weights_on_model_save``), written with ``save_pretrained``."""
        state = None
        if self.stage == 3:
            full = self.ds._zero3_consolidated_16bit_state_dict()  # collective
            if self.rank == 0:
                state = {k.removeprefix("model."): v for k, v in full.items()}
                if self.lora:  # keys of the peft model, as its save_pretrained expects
                    state = {f"base_model.model.{k}": v for k, v in state.items()}
        self._write_pretrained(path, tokenizer, state)


def _weights_only_loads(ds: Any) -> None:
    """Make DeepSpeed's checkpoint engine unpickle with ``weights_only=True`` (its default is a
    full pickle); besides tensors and containers only the DeepSpeed records found in its ZeRO
    checkpoints are allowed: the stage enum, the loss scalers and ``fragment_address``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ds.checkpoint_engine.load = load


def _load(path: str, name: str) -> Any:
    return torch.load(os.path.join(path, name), weights_only=True, map_location="cpu")


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The global L2 norm of ``grads`` (fp32 0-d tensor; 0 when there is none)."""
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads).float()
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _clip(params: list[Tensor], max_norm: float, total: Tensor) -> None:
    """Scale the gradients by ``min(1, max_norm / total)`` (torch's clip_grad_norm_ rule)."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip is not None:
        clip(params, max_norm, total)
        return
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.device))


def _distributed_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


_OWN_PROCESS_GROUP = False  # True once this module created the default process group


def _init_process_group(use_deepspeed: bool) -> None:
    global _OWN_PROCESS_GROUP
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    _OWN_PROCESS_GROUP = True


def owns_process_group() -> bool:
    """Whether :func:`create_engine` created the live default process group."""
    return _OWN_PROCESS_GROUP and dist.is_available() and dist.is_initialized()


def close_process_group(synchronise: bool = True) -> None:
    """Destroy the default process group if :func:`create_engine` created it (a group the
    caller set up is left alone).

    With ``synchronise`` the ranks first meet at a barrier, so no rank tears down its
    communicator while another still uses it. A process that exits with a live gloo group can
    abort in the communicator's destructor ("terminate called without an active exception",
    SIGABRT) after the work is done, turning a finished run into a failed launch. Call it
    with ``synchronise=False`` on an error path, where the other ranks may never arrive.
    Meant for the end of a process (``drorebel`` commands call it): DeepSpeed keeps its own
    groups built on the default one, so a later ``train`` in the same process with a
    DeepSpeed config would fail after it.
    """
    global _OWN_PROCESS_GROUP
    if not owns_process_group():
        return
    _OWN_PROCESS_GROUP = False
    if synchronise:
        dist.barrier()
    dist.destroy_process_group()


def deepspeed_config(cfg: TrainConfig, world_size: int, hidden_size: int) -> dict:
    """Load ``cfg.deepspeed`` and fill its ``"auto"`` values from the training config.

    Batch sizes (``train_micro_batch_size_per_gpu = batch_size / world``,
    ``gradient_accumulation_steps = grad_accum``, ``train_batch_size = batch_size·grad_accum``),
    ``gradient_clipping`` (``max_grad_norm``, 0 = off) and ``bf16``/``fp16`` (``dtype``) always
    follow the TrainConfig: an explicit value that disagrees is a :class:`ConfigError`. ZeRO-3
    bucket sizes marked ``"auto"`` get Hugging Face's defaults from the hidden size, and
    ``stage3_gather_16bit_weights_on_model_save`` defaults to true (whole final weights).
    """
    with open(cfg.deepspeed) as f:
        ds = json.load(f)
    fixed = {"train_micro_batch_size_per_gpu": cfg.batch_size // world_size,
             "gradient_accumulation_steps": cfg.grad_accum,
             "train_batch_size": cfg.batch_size * cfg.grad_accum,
             "gradient_clipping": float(cfg.max_grad_norm or 0.0)}
    for key, value in fixed.items():
        _fill(ds, key, value, "deepspeed")
    for key, want in (("bf16", cfg.dtype == "bfloat16"), ("fp16", cfg.dtype == "float16")):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", want, f"deepspeed {key}")
    zero = ds.setdefault("zero_optimization", {})
    autos = {"stage3_param_persistence_threshold": 10 * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "reduce_bucket_size": hidden_size * hidden_size}
    for key, value in autos.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # allow torch AdamW (CPU runs)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _fill(section: dict, key: str, value: Any, where: str) -> None:
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        raise ConfigError(f"{where}: `{key}`={have!r} disagrees with the training config "
                          f"({value!r}); set it to \"auto\"")


def create_engine(cfg: TrainConfig) -> Engine:
    """Initialise the process group if launched on several processes, load the model, wrap it.

    DeepSpeed when ``cfg.deepspeed`` is set (launch with ``deepspeed``), DDP when
    ``WORLD_SIZE > 1`` (launch with ``torchrun``), a single process otherwise.
    """
    rank, local_rank, world = _distributed_env()
    use_ds = cfg.deepspeed is not None
    if use_ds and not os.path.exists(cfg.deepspeed):
        raise ConfigError(f"`deepspeed`: config file {cfg.deepspeed!r} does not exist")
    if use_ds or world > 1:
        _init_process_group(use_ds)
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"`batch_size`={cfg.batch_size} (the global micro-batch) must be a "
                          f"multiple of the number of processes ({world})")
    device = _device(local_rank)
    if not use_ds:
        wrapper = wrap_model(load_model(cfg, device), cfg)
        if world > 1:
            return DDPEngine(policy_module(wrapper), wrapper, cfg, device, rank, world)
        return Engine(policy_module(wrapper), wrapper, cfg, device)
    ds_cfg = deepspeed_config(cfg, world, _hidden_size(cfg))
    hf_ds = None
    if ds_cfg.get("zero_optimization", {}).get("stage") == 3 and cfg.model is not None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # from_pretrained loads straight into ZeRO-3 shards
    wrapper = wrap_model(load_model(cfg, device), cfg)
    engine = DeepSpeedEngine(policy_module(wrapper), wrapper, cfg, device, rank, world, ds_cfg)
    engine.hf_ds_config = hf_ds  # transformers holds only a weakref: keep it alive
    return engine


def _hidden_size(cfg: TrainConfig) -> int:
    """Hidden size of the configured model (for DeepSpeed's "auto" bucket sizes)."""
    if cfg.model_config is not None:
        return int(cfg.model_config.get("hidden_size", 4096))
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return int(getattr(hf.get_text_config(), "hidden_size", 4096))
