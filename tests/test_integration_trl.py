"""drorebel's fused losses inside TRL (``drorebel.integrations.trl``), on a tiny Llama on CPU.

* ``DroRebelTRLTrainer`` trains (REBEL and χ²), changes the parameters and logs TRL's metric
  names plus drorebel's; its loss on a batch equals the public ``FusedLinearRebelLoss`` computed
  by hand on the same batch; the precomputed reference follows ``average_log_prob``.
* ``FusedDPOTrainer`` equals TRL's own sigmoid ``DPOTrainer`` (loss, gradients, metrics).
* ``import drorebel`` does not need TRL; without TRL the integration says what to install.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_path import load_module

pytest.importorskip("trl")

import drorebel  # noqa: E402
from drorebel.integrations.trl import (  # noqa: E402
    DroRebelTRLConfig,
    DroRebelTRLTrainer,
    FusedDPOTrainer,
)

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "rebel/residual_mean", "rebel/residual_sq",
           "dro/weight_max", "dro/weight_entropy")


def _example():
    return load_module(ROOT / "examples" / "trl_rebel.py", "drorebel_example_trl_rebel")


ex = _example()


def _batch(trainer, n: int = 4) -> dict:
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer._prepare_inputs(trainer.data_collator(rows))


@pytest.mark.parametrize("divergence,rho,columns", [
    ("none", None, ("score_chosen", "score_rejected")),
    ("chi2", 0.5, ("chosen_reward", "rejected_reward")),
])
def test_trains_and_logs_trl_metric_names(tmp_path, divergence, rho, columns):
    trainer = ex.make_trainer(str(tmp_path), steps=3, divergence=divergence, rho=rho,
                              dataset=ex.tiny_dataset(reward_columns=columns))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    assert all(math.isfinite(e["loss"]) for e in logs)
    for name in METRICS:
        assert all(name in e and math.isfinite(e[name]) for e in logs), name
    if divergence == "none":  # REBEL: uniform weights over the 4 pairs of a batch
        assert logs[0]["dro/weight_max"] == pytest.approx(0.25)
        assert logs[0]["dro/weight_entropy"] == pytest.approx(math.log(4), rel=1e-6)
    else:
        assert "dro/eta_star" in logs[0]
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2


def test_loss_in_trl_equals_public_loss(tmp_path):
    trainer = ex.make_trainer(str(tmp_path), steps=1, divergence="chi2", rho=0.3)
    # a reference that differs from the policy, so the log-ratios are not zero
    ref_model = ex.tiny_model(trainer.model.config.vocab_size, seed=7)
    trainer.ref_model = ref_model
    batch = _batch(trainer)
    model = trainer.model
    loss, out = trainer.compute_loss(model, batch, return_outputs=True)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = drorebel.linear_sequence_logps(ref_hidden[:, :-1], ref_model.lm_head.weight, labels)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    rewards = torch.cat([batch["chosen_reward"], batch["rejected_reward"]])
    direct = drorebel.FusedLinearRebelLoss(eta=1.0, divergence="chi2", rho=0.3)(
        hidden, model.lm_head.weight, labels, rewards, ref)
    torch.testing.assert_close(loss, direct.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.weights, direct.weights, rtol=1e-6, atol=1e-6)
    assert ref.abs().min() > 0 and (out.policy_logps_a - ref[:4]).abs().max() > 1e-3
    logged = trainer._metrics["train"]
    assert logged["rebel/residual_mean"][-1] == pytest.approx(
        float(direct.metrics["rebel/residual_mean"]), rel=1e-5, abs=1e-6)


def test_precomputed_reference_and_average_log_prob(tmp_path):
    """precompute_ref_log_probs goes through drorebel's head with the loss's settings: at the
    start the policy is the reference, so Δ_i = −(r_chosen − r_rejected) exactly."""
    tok = ex.tiny_tokenizer()
    model = ex.tiny_model(len(tok))
    args = DroRebelTRLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             bf16=False, precompute_ref_log_probs=True, average_log_prob=True,
                             eta=0.5)
    trainer = DroRebelTRLTrainer(model=model, args=args, train_dataset=ex.tiny_dataset(n=8),
                                 processing_class=tok)
    assert trainer.ref_model is None
    batch = _batch(trainer)
    loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    gap = batch["chosen_reward"] - batch["rejected_reward"]
    torch.testing.assert_close(loss, (gap * gap).mean(), rtol=1e-5, atol=1e-6)
    # the reference really is a per-token average (|mean log-prob| < log V < sum for > 1 token)
    assert batch["ref_chosen_logps"].abs().max() < math.log(len(tok)) + 1


def test_peft_lora_reference_is_the_base_model(tmp_path):
    """With a LoRA adapter and no ref_model, the reference is the model with the adapter off:
    at the start (B = 0) the policy equals it, so the loss is mean (r_chosen − r_rejected)²."""
    from peft import LoraConfig

    tok = ex.tiny_tokenizer()
    args = DroRebelTRLConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to="none", use_cpu=True,
                             bf16=False, save_strategy="no")
    trainer = DroRebelTRLTrainer(
        model=ex.tiny_model(len(tok)), args=args, train_dataset=ex.tiny_dataset(n=8),
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.ref_model is None
    batch = _batch(trainer)
    gap = batch["chosen_reward"] - batch["rejected_reward"]
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), (gap * gap).mean(),
                               rtol=1e-5, atol=1e-6)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def _dpo_trainers(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tok = ex.tiny_tokenizer()
    policy = ex.tiny_model(len(tok), seed=0)
    ref = ex.tiny_model(len(tok), seed=1)
    data = ex.tiny_dataset(n=8)
    kw = dict(report_to="none", use_cpu=True, bf16=False, beta=0.3, loss_type="sigmoid")
    theirs = DPOTrainer(model=policy, ref_model=ref, processing_class=tok, train_dataset=data,
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), **kw))
    ours = FusedDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                           processing_class=tok, train_dataset=data,
                           args=DPOConfig(output_dir=str(tmp_path / "ours"), **kw))
    return theirs, ours


def test_fused_dpo_equals_trl_sigmoid_dpo(tmp_path):
    theirs, ours = _dpo_trainers(tmp_path)
    batch = _batch(theirs, 6)
    results = []
    for trainer in (theirs, ours):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters()}
        results.append((loss.detach(), grads, dict(trainer._metrics["train"])))
    (l_trl, g_trl, m_trl), (l_ours, g_ours, m_ours) = results
    assert abs(float(l_trl) - math.log(2)) > 1e-3  # a real comparison, not both log 2
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-5, atol=1e-6)
    assert g_trl.keys() == g_ours.keys()
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert m_ours[name][-1] == pytest.approx(m_trl[name][-1], rel=1e-5, abs=1e-6), name


def test_fused_dpo_refuses_other_losses(tmp_path):
    from trl import DPOConfig

    tok = ex.tiny_tokenizer()
    with pytest.raises(ValueError, match="sigmoid"):
        FusedDPOTrainer(model=ex.tiny_model(len(tok)), processing_class=tok,
                        train_dataset=ex.tiny_dataset(n=2),
                        args=DPOConfig(output_dir=str(tmp_path), loss_type="ipo",
                                       report_to="none", use_cpu=True, bf16=False))


def test_missing_reward_columns_is_one_clear_error(tmp_path):
    data = ex.tiny_dataset(n=4).remove_columns(["chosen_reward"])
    with pytest.raises(ValueError, match="chosen_reward/rejected_reward or score_chosen"):
        ex.make_trainer(str(tmp_path), steps=1, dataset=data)


def test_import_drorebel_does_not_import_trl():
    code = "import sys, drorebel, drorebel.integrations; print('trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_without_trl_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails
    monkeypatch.delitem(sys.modules, "drorebel.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'drorebel\[trl\]'") as err:
        importlib.import_module("drorebel.integrations.trl")
    assert "\n" not in str(err.value)


_TRL_WORKER = ROOT / "tests" / "dist_workers" / "trl_worker.py"


@pytest.fixture(scope="module")
def trl_one_process(tmp_path_factory) -> dict:
    """examples/trl_rebel.py's χ² trainer, 3 steps of 4 pairs, in one process."""
    from launch import launch

    out = tmp_path_factory.mktemp("trl1") / "one.pt"
    launch([sys.executable, str(_TRL_WORKER), str(out)], out.parent)
    return torch.load(out)


def _assert_same_run(a: dict, b: dict) -> None:
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["losses"]) == len(b["losses"]) == 3
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert b["weight_max"] == pytest.approx(a["weight_max"], rel=1e-5)
    assert max(a["weight_max"]) > 0.25 + 1e-3  # χ² moved weight: not the uniform 1/4
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ddp_ranks_equal_one_process(tmp_path, trl_one_process):
    # torchrun + HF Trainer/accelerate DDP: 2 ranks x 2 pairs = 1 process x 4 pairs, because the
    # χ² weights are solved over the gathered global batch and the loss is scaled so that
    # DDP's gradient mean is the global batch's gradient
    from launch import launch

    two = tmp_path / "two.pt"
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", str(_TRL_WORKER), str(two)], tmp_path, timeout=500)
    _assert_same_run(trl_one_process, torch.load(two))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_two_ranks_equal_one_process(tmp_path, trl_one_process):
    # HF Trainer with DeepSpeed ZeRO-3 (2 CPU ranks): the LM head is partitioned; it is read
    # inside the model's forward as a registered external parameter, and the loss comes back
    # as a dict, so ZeRO-3 gathers the head for the forward and again for the backward
    pytest.importorskip("deepspeed")
    from launch import BIN, launch

    z3 = tmp_path / "z3.pt"
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", str(_TRL_WORKER),
            str(z3), str(ROOT / "configs" / "ds_zero3.json")], tmp_path, timeout=500)
    _assert_same_run(trl_one_process, torch.load(z3))
