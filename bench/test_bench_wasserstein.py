"""Benchmarks of the Wasserstein DRO-REBEL penalty (docs/design.md §1, §4 target: ≤ 3× plain
``linear_logps`` forward + backward).

    L_W = (1/n) Σ ℓ_i + ρ sqrt((1/n) Σ_i ‖∇_z ℓ_i‖²)          (arXiv 2509.19104)

Providers, each a full loss forward + backward over a pair batch of N tokens (N/2 per side,
``T_RESP`` tokens per response):

* ``plain-logps``          ``linear_logps`` fwd+bwd on the same tokens (the yardstick;
                              ``impl="auto"``: Triton on CUDA, chunked torch on the CPU)
* ``fused-hidden``            ``fused_linear_wasserstein_rebel_loss`` (z = hidden states),
                              chunked PyTorch path (``impl="torch"``)
* ``fused-hidden-triton``     the same loss on the Triton kernels (CUDA only)
* ``materialised-double-bwd`` logits materialised, penalty by double backward (the oracle)
* ``embedding-penalty``       ``embedding_wasserstein_rebel_loss`` on a tiny HF Llama whose
                              head has the shape's H and V (z = input embeddings)

The ratio to ``plain-logps`` is stored in ``extra_info["ratio_vs_plain"]`` by reading the
plain provider's median from the same session (run the whole module).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

PROVIDERS = ["plain-logps", "fused-hidden", "fused-hidden-triton", "materialised-double-bwd",
             "embedding-penalty"]
T_RESP = 64
_MEDIANS: dict[str, float] = {}


def _pair_inputs(shape: Any, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    b = max(1, shape.n // (2 * T_RESP))
    mk = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    w = (mk(shape.v, shape.h) * shape.h**-0.5).to(shape.dtype).requires_grad_()
    ha, hb = (mk(b, T_RESP, shape.h).to(shape.dtype).requires_grad_() for _ in range(2))
    ya, yb = (torch.randint(0, shape.v, (b, T_RESP), generator=gen, device=device)
              for _ in range(2))
    return {"w": w, "ha": ha, "hb": hb, "ya": ya, "yb": yb, "ref_a": mk(b) - 300,
            "ref_b": mk(b) - 300, "ra": mk(b), "rb": mk(b)}


def _plain(x):
    from drorebel.ops.linear_logps import linear_logps

    h = x["w"].shape[1]
    tok = linear_logps(torch.cat([x["ha"].reshape(-1, h), x["hb"].reshape(-1, h)]), x["w"],
                       torch.cat([x["ya"].reshape(-1), x["yb"].reshape(-1)]), impl="auto")
    return tok.sum()


def _fused(x, impl="torch"):
    from drorebel.losses.wasserstein import fused_linear_wasserstein_rebel_loss

    return fused_linear_wasserstein_rebel_loss(
        x["ha"], x["hb"], x["w"], x["ya"], x["yb"], x["ref_a"], x["ref_b"], x["ra"], x["rb"],
        eta=1.0, rho=0.5, impl=impl).loss


def _materialised(x):
    from drorebel.losses.rebel import rebel_residuals
    from drorebel.reference.wasserstein import wasserstein_rebel_objective

    lp = [(hid @ x["w"].t()).float().log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1)
          for hid, y in ((x["ha"], x["ya"]), (x["hb"], x["yb"]))]
    resid = rebel_residuals(lp[0], lp[1], x["ref_a"], x["ref_b"], x["ra"], x["rb"], 1.0)
    return wasserstein_rebel_objective(resid * resid, [x["ha"], x["hb"]], 0.5)


@functools.cache
def _tiny_llama(h: int, v: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=v,
                      max_position_embeddings=4 * T_RESP, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _embedding(x):
    from drorebel.losses.wasserstein_embeddings import embedding_wasserstein_rebel_loss

    model = _tiny_llama(x["w"].shape[1], x["w"].shape[0])
    return embedding_wasserstein_rebel_loss(
        model, x["ya"], x["yb"], None, None, x["ya"], x["yb"], x["ref_a"], x["ref_b"], x["ra"],
        x["rb"], eta=1.0, rho=0.5).loss


FNS = {"plain-logps": _plain, "fused-hidden": _fused,
       "fused-hidden-triton": functools.partial(_fused, impl="triton"),
       "materialised-double-bwd": _materialised, "embedding-penalty": _embedding}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wasserstein_fwdbwd(benchmark, measure_memory, shape, provider, device, rounds,
                            env_info) -> None:
    if provider == "fused-hidden-triton" and device.type != "cuda":
        pytest.skip("Triton kernels: CUDA only (the CPU interpreter is not a benchmark)")
    if provider == "embedding-penalty" and device.type != "cpu":
        pytest.skip("the tiny-model embedding penalty is a CPU comparison")
    if provider == "materialised-double-bwd" and shape.n * shape.v * 4 > 2**31:
        pytest.skip("materialised logits too large for this machine")
    x = _pair_inputs(shape, device)
    fn = FNS[provider]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [x["w"], x["ha"], x["hb"]]
    if provider == "embedding-penalty":
        params = list(_tiny_llama(shape.h, shape.v).parameters())

    def setup() -> None:
        for p in params:
            p.grad = None
        sync()

    def step() -> None:
        fn(x).backward()
        sync()

    benchmark.group = f"wasserstein fwdbwd {shape.id}"
    n_rounds, warmup = rounds
    benchmark.pedantic(step, setup=setup, rounds=n_rounds, warmup_rounds=warmup, iterations=1)
    setup()
    mem = measure_memory(step, device)
    info = benchmark.extra_info
    info.update(provider=provider, mode="fwdbwd", n=shape.n, h=shape.h, v=shape.v,
                dtype=shape.dtype_name, **env_info)
    info["peak_mem_bytes"] = None if mem is None else mem.peak_bytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _MEDIANS[f"{shape.id}/{provider}"] = stats.stats.median
        plain = _MEDIANS.get(f"{shape.id}/plain-logps")
        info["ratio_vs_plain"] = None if plain is None else stats.stats.median / plain
