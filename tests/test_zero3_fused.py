"""DeepSpeed ZeRO-3 (2 CPU ranks, gloo) with the fused loss == one process with the reference.

The fused op saves the gathered LM-head weight for its backward; under ZeRO-3 that is only
correct when the loss runs inside a module forward that registered the head as an external
parameter (``drorebel.losses.zero3.CausalLMWithFusedLoss``). A tiny Llama (untied head) and a
tiny GPT-2 (tied embeddings) train 3 SGD steps with χ²- and KL-REBEL; the rank-averaged loss
curve and the updated parameters must match a single process that trains the same model on
the union batch with the materialised reference loss (plain PyTorch, no DeepSpeed).
The first run JIT-builds DeepSpeed's small shm communication op (~1 min).
"""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path

import pytest
import torch
from launch import BIN, launch
from test_fused_rebel_loss import hidden_and_head, make_batch, make_model, reference_seq_logps

from drorebel.losses.rebel import rebel_loss

WORKER = Path(__file__).parent / "dist_workers" / "zero3_worker.py"
STEPS, LR = 3, 1e-4
CASES = {
    "llama-chi2": ("llama", dict(eta=0.7, divergence="chi2", rho=0.3)),
    "gpt2-tied-kl": ("gpt2", dict(eta=0.7, divergence="kl", tau=1.0)),
}
RTOL = 2e-5  # fp32: reduction order differs (sharded reduce-scatter, fused vs materialised)


def _case(arch: str, loss: dict) -> dict:
    model = make_model(arch).train()
    batch = make_batch(model.config.vocab_size, n_pairs=4, t=10, seed=11)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:] = batch["labels"]  # HF layout: the wrapper shifts
    with torch.no_grad():
        h, w = hidden_and_head(copy.deepcopy(model).double(), batch)
        ref = reference_seq_logps(w, h, batch["labels"]).float() + 0.3 * batch["noise"].float()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "labels": labels, "rewards": batch["rewards"].float(), "ref_logps": ref}
    return {"model": model, "loss": loss, "batch": inputs, "steps": STEPS, "lr": LR,
            "shifted": batch}


def single_process(case: dict) -> dict:
    """Plain PyTorch, union batch, materialised logits + ``rebel_loss``."""
    model = copy.deepcopy(case["model"])
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"])
    b, n = case["batch"], case["batch"]["rewards"].shape[0] // 2
    losses, weights = [], []
    for _ in range(case["steps"]):
        h, w = hidden_and_head(model, case["shifted"])
        logps = reference_seq_logps(w, h, case["shifted"]["labels"])
        out = rebel_loss(logps[:n], logps[n:], b["ref_logps"][:n], b["ref_logps"][n:],
                         b["rewards"][:n], b["rewards"][n:], **case["loss"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        weights.append(out.weights)
    return {"losses": losses, "weights": weights,
            "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("deepspeed")
    # deepspeed is a hard dependency: its launcher sits beside this interpreter even when
    # the venv is not on PATH (CI calls .venv/bin/pytest directly), so a miss is a failure.
    launcher = BIN / "deepspeed"
    assert launcher.exists(), f"deepspeed launcher not found beside {sys.executable}"
    tmp = tmp_path_factory.mktemp("zero3")
    cases = {name: _case(arch, loss) for name, (arch, loss) in CASES.items()}
    torch.save({k: {kk: vv for kk, vv in c.items() if kk != "shifted"} for k, c in cases.items()},
               tmp / "in.pt")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(WORKER),
           str(tmp / "in.pt"), str(tmp / "out.pt")]
    launch(cmd, tmp, timeout=420)
    ds = torch.load(tmp / "out.pt", weights_only=False)
    return {name: (ds[name], single_process(case), case) for name, case in cases.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", list(CASES))
def test_zero3_matches_single_process(runs: dict, name: str) -> None:
    ds, ref, case = runs[name]
    # the head really is partitioned: outside a forward a rank holds an empty shard
    assert ds["seen"]["partitioned"] and ds["seen"]["numel_outside_forward"] == 0
    assert ds["seen"]["ds_numel"] == case["model"].get_output_embeddings().weight.numel()
    assert ds["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    assert ref["losses"][-1] < ref["losses"][0]  # training moved
    for wd, wr in zip(ds["weights"], ref["weights"]):
        assert torch.allclose(wd, wr, rtol=1e-4, atol=1e-6)
    init = dict(case["model"].named_parameters())
    assert ds["params"].keys() == ref["params"].keys()
    for key, p_ref in ref["params"].items():
        step_ref = p_ref - init[key].detach()
        step_ds = ds["params"][key] - init[key].detach()
        assert _rel(ds["params"][key], p_ref) < RTOL, key
        if step_ref.norm() > 1e-6:  # the update itself matches (not just the unchanged bulk)
            assert _rel(step_ds, step_ref) < 1e-3, (key, _rel(step_ds, step_ref))


# ----------------------------------------------------------------------------- no DeepSpeed
def test_wrapper_without_deepspeed_equals_functional_loss() -> None:
    """``CausalLMWithFusedLoss`` (HF labels, shifted inside) == the fused loss on hidden states."""
    from test_fused_rebel_loss import ref_logps_for

    from drorebel.losses.fused_dpo import FusedLinearDPOLoss
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss
    from drorebel.losses.zero3 import CausalLMWithFusedLoss

    case = _case("qwen2", {})
    model, b, shifted = case["model"], case["batch"], case["shifted"]
    ref = ref_logps_for(model, shifted).float()
    for loss in (FusedLinearRebelLoss(0.7, "chi2", rho=0.2), FusedLinearDPOLoss(beta=0.3)):
        wrapper = CausalLMWithFusedLoss(model, loss)
        out = wrapper(b["input_ids"], b["attention_mask"], b["labels"], b["rewards"], ref)
        h, w = hidden_and_head(model, shifted)
        args = (h, w, shifted["labels"]) + ((b["rewards"],) if "Rebel" in type(loss).__name__
                                           else ())
        direct = loss(*args, ref)
        assert torch.allclose(out["loss"], direct.loss, rtol=1e-6)
        assert torch.allclose(out["weights"], direct.weights)
        assert set(direct.metrics) <= set(out)
    with pytest.raises(TypeError, match="loss must be a FusedLinearRebelLoss"):
        CausalLMWithFusedLoss(model, torch.nn.MSELoss())
    with pytest.raises(ValueError, match="rewards"):
        CausalLMWithFusedLoss(model, FusedLinearRebelLoss(1.0))(
            b["input_ids"], b["attention_mask"], b["labels"], ref_logps=ref)


def test_empty_zero3_shard_gets_a_clear_error() -> None:
    """Reading a partitioned head outside a forward gives an empty shard: say what to do."""
    from test_fused_rebel_loss import _good

    from drorebel.losses.fused_rebel import fused_linear_rebel_loss

    args = _good()
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_id = 7  # what DeepSpeed attaches to a ZeRO-3 parameter
    args["weight"] = shard
    with pytest.raises(ValueError, match="empty DeepSpeed ZeRO-3 shard.*CausalLMWithFusedLoss"):
        fused_linear_rebel_loss(*args.values(), eta=1.0)
