"""Fused (DRO-)REBEL loss on tiny Llama / Qwen2 / GPT-2 models built from configs.

Reference path: materialised logits (``linear_logps_reference``) → per-sequence sums →
``rebel_loss``. Ground truth: the same reference path on a float64 copy of the model (the
copy holds the same, already rounded, weights). Compared: loss, weights, policy log-probs,
metrics and the gradient of every model parameter.

Criterion (docs/design.md §3, in norms because the gradients pass through a whole model), per
entry: ``‖ours − truth‖ ≤ 2·‖ref − truth‖ + TRUTH_SLACK·‖truth‖ + floor`` with ``ref`` the
same-dtype reference path, plus a direct ``‖ours − ref‖ ≤ DIRECT·‖ref‖ + floor``. Gradients add
1e-3 of the largest parameter gradient to the scale (a parameter whose gradient is ~0 is
compared in absolute terms); values derived from differences of log-probs (Δ, η*, margins) get
the absolute floor of :func:`value_floor`: the rounding of fp32 log-probs of magnitude ~30 plus
the log-probs' own discrepancy (itself held to the criterion), times the amplification.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from drorebel.losses.fused_rebel import FusedLinearRebelLoss, fused_linear_rebel_loss
from drorebel.losses.rebel import rebel_loss
from drorebel.ops.sequence import sequence_logps
from drorebel.reference.logps import linear_logps_reference

IGNORE = -100
ETA = 0.7
ARCHS = ["llama", "qwen2", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16]
MODES = {
    "none": ("none", {}),
    "chi2": ("chi2", {"rho": 0.3}),
    "kl_rho": ("kl", {"rho": 0.2}),
    "kl_tau": ("kl", {"tau": 0.5}),
}
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # unit roundoff
DIRECT = {torch.float32: 64 * EPS[torch.float32], torch.bfloat16: 6 * EPS[torch.bfloat16]}
TRUTH_SLACK = {torch.float32: 64 * EPS[torch.float32], torch.bfloat16: EPS[torch.bfloat16]}
VALUE_SLACK = 16 * EPS[torch.float32]  # the per-sequence log-probs are fp32 for every dtype
DISCRETE = {"rewards/accuracies"}  # a sign can flip within rounding: compared in fp32 only


# ----------------------------------------------------------------------------- models, batches
def make_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny causal LM from a transformers config (no download), no dropout, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(num_attention_heads=4, max_position_embeddings=64)
    if arch == "llama":  # untied head, 2 layers
        cfg = tf.LlamaConfig(vocab_size=131, hidden_size=48, intermediate_size=64,
                             num_hidden_layers=2, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # tied head, V = 257 (odd)
        cfg = tf.Qwen2Config(vocab_size=257, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_key_value_heads=2,
                             tie_word_embeddings=True, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":  # tied head, learned positions, LayerNorm
        cfg = tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def make_batch(vocab: int, n_pairs: int = 3, t: int = 10, seed: int = 0) -> dict:
    """Stacked ``[a; b]`` batch: prompts of 2–4 tokens, responses of 1..(t − prompt) tokens
    (one response has exactly one token), right padding; labels aligned to ``hidden[:, :-1]``."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    ids = torch.randint(0, vocab, (rows, t), generator=g)
    attn = torch.ones(rows, t, dtype=torch.long)
    labels = torch.full((rows, t - 1), IGNORE)
    for r in range(rows):
        prompt = 2 + r % 3
        resp = 1 if r == 1 else int(torch.randint(1, t - prompt + 1, (1,), generator=g))
        attn[r, prompt + resp:] = 0
        # hidden[:, s] predicts ids[:, s + 1]: response tokens are ids[prompt : prompt + resp]
        labels[r, prompt - 1: prompt - 1 + resp] = ids[r, prompt: prompt + resp]
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels,
        "rewards": torch.randn(rows, generator=g, dtype=torch.float64),
        "noise": torch.randn(rows, generator=g, dtype=torch.float64),
    }


def hidden_and_head(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states predicting the next token ``[2B, T-1, H]`` and the LM head."""
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1], model.get_output_embeddings().weight


def reference_seq_logps(weight, hidden, labels) -> torch.Tensor:
    tok = linear_logps_reference(hidden, weight, labels, ignore_index=IGNORE)
    return sequence_logps(tok, labels, ignore_index=IGNORE)


def ref_logps_for(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sequence reference log-probs: the float64 policy's own, plus noise (π_ref ≠ π_θ)."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        h, w = hidden_and_head(m64, batch)
        return reference_seq_logps(w, h, batch["labels"]) + 0.5 * batch["noise"]


# ----------------------------------------------------------------------------- runs
def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[0] // 2
    return t[:n], t[n:]


def run_reference(model, batch, ref_logps, div, kw) -> dict:
    """Materialised logits → per-sequence sums → ``rebel_loss``."""
    h, w = hidden_and_head(model, batch)
    la, lb = _halves(reference_seq_logps(w, h, batch["labels"]))
    (ra, rb), (wa, wb) = _halves(ref_logps), _halves(batch["rewards"])
    out = rebel_loss(la, lb, ra, rb, wa, wb, eta=ETA, divergence=div, **kw)
    out.policy_logps_a, out.policy_logps_b = la, lb
    return _collect(model, out)


def run_fused(model, batch, ref_logps, div, kw, impl="torch", form="functional") -> dict:
    h, w = hidden_and_head(model, batch)
    labels, rewards = batch["labels"], batch["rewards"]
    if form == "module":
        loss_fn = FusedLinearRebelLoss(ETA, div, impl=impl, **kw)
        out = loss_fn(h, w, labels, rewards, ref_logps)
    else:
        (ha, hb), (ya, yb) = _halves(h), _halves(labels)
        (ra, rb), (wa, wb) = _halves(ref_logps), _halves(rewards)
        out = fused_linear_rebel_loss(ha, hb, w, ya, yb, ra, rb, wa, wb, eta=ETA,
                                      divergence=div, impl=impl, **kw)
    return _collect(model, out)


def _collect(model: nn.Module, out) -> dict:
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "weights": out.weights.detach(),
           "logps_a": out.policy_logps_a.detach(), "logps_b": out.policy_logps_b.detach()}
    res.update({f"metric:{k}": v.detach() for k, v in out.metrics.items()})
    for name, p in model.named_parameters():
        res[f"grad:{name}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return res


def _norm(t: torch.Tensor) -> float:
    t = t.double()
    finite = torch.isfinite(t)
    return float(t[finite].norm()) if finite.any() else 0.0


def value_floor(ours: dict, other: dict, amp: float) -> float:
    """Absolute error floor of the values derived from differences of the per-sequence
    log-probs (Δ, η*, τ*, margins): their rounding (~ε32·S, S = max|log π| ≈ 30) plus their
    actual discrepancy ``max|ours − other|`` (itself held to the criterion), amplified by
    ``amp`` (REBEL: ``4(1 + max|Δ|)/η``; DPO: ``2β``)."""
    s = max(float(other["logps_a"].abs().max()), float(other["logps_b"].abs().max()))
    gap = max(float((ours[k].double() - other[k].double()).abs().max())
              for k in ("logps_a", "logps_b"))
    return amp * (VALUE_SLACK * s + gap)


def assert_matches(ours: dict, ref: dict, truth: dict | None, dtype: torch.dtype,
                   amp: float) -> None:
    """Every entry: same keys; ours close to ref; ours no worse than 2× ref against truth."""
    assert ours.keys() == ref.keys()
    grad_scale = max(_norm(v) for k, v in ref.items() if k.startswith("grad:"))
    assert grad_scale > 1e-3  # the gradient comparison is not vacuous
    vfloor = value_floor(ours, ref, amp)
    tfloor = value_floor(ours, truth, amp) if truth is not None else 0.0
    for key, o in ours.items():
        if dtype != torch.float32 and key.removeprefix("metric:") in DISCRETE:
            continue
        r = ref[key]
        assert o.shape == r.shape, key
        inf = torch.isinf(r)
        assert torch.equal(inf, torch.isinf(o)) and torch.equal(o[inf], r[inf]), key
        is_grad = key.startswith("grad:")
        gfloor = 1e-3 * grad_scale if is_grad else 0.0
        afloor, tafloor = (0.0, 0.0) if is_grad else (vfloor, tfloor)
        diff = _norm(o.double() - r.double())
        bound = DIRECT[dtype] * (_norm(r) + gfloor) + afloor
        assert diff <= bound, f"{key}: |ours - ref| = {diff:.3e} > {bound:.3e}"
        if truth is not None:
            t = truth[key]
            err_o, err_r = _norm(o.double() - t), _norm(r.double() - t)
            bound = 2 * err_r + TRUTH_SLACK[dtype] * (_norm(t) + gfloor) + tafloor
            assert err_o <= bound, f"{key}: err {err_o:.3e} > bound {bound:.3e} (ref {err_r:.3e})"


def rebel_amp(ref: dict) -> float:
    return 4 * (1 + float(ref["metric:rebel/residual_abs_max"])) / ETA


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference_path(arch: str, dtype: torch.dtype, mode: str) -> None:
    div, kw = MODES[mode]
    model = make_model(arch, dtype)
    batch = make_batch(model.config.vocab_size)
    ref_logps = ref_logps_for(model, batch)
    ours = run_fused(model, batch, ref_logps, div, kw)
    ref = run_reference(model, batch, ref_logps, div, kw)
    truth = run_reference(copy.deepcopy(model).double(), batch, ref_logps, div, kw)
    assert_matches(ours, ref, truth, dtype, rebel_amp(truth))
    if mode != "none":  # the robust weights are not uniform: the comparison can tell
        assert float(ref["weights"].max()) > 1.5 / ref["weights"].numel()


@pytest.mark.parametrize("mode", ["none", "chi2", "kl_rho"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_module_form_equals_functional_form(arch: str, mode: str) -> None:
    """Stacked ``[a; b]`` module vs the functional twin: the same maths, fp32 rounding only."""
    div, kw = MODES[mode]
    model = make_model(arch)
    batch = make_batch(model.config.vocab_size, seed=1)
    ref_logps = ref_logps_for(model, batch)
    func = run_fused(model, batch, ref_logps, div, kw, form="functional")
    mod = run_fused(model, batch, ref_logps, div, kw, form="module")
    assert_matches(mod, func, None, torch.float32, rebel_amp(func))


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_agrees_with_torch_path(dtype: torch.dtype, mode: str, form: str) -> None:
    """impl="triton" (the Triton interpreter on the CPU) vs impl="torch" vs float64 truth."""
    div, kw = MODES[mode]
    model = make_model("qwen2", dtype)
    batch = make_batch(model.config.vocab_size, n_pairs=2, t=7, seed=2)
    ref_logps = ref_logps_for(model, batch)
    tri = run_fused(model, batch, ref_logps, div, kw, impl="triton", form=form)
    cpu = run_fused(model, batch, ref_logps, div, kw, impl="torch", form=form)
    truth = run_reference(copy.deepcopy(model).double(), batch, ref_logps, div, kw)
    assert_matches(tri, cpu, truth, dtype, rebel_amp(truth))


def test_hand_worked_value_and_gradients() -> None:
    """H = 1, W = [[0], [1]], h = 1: logits (0, 1); a = token 1, b = token 0, refs 0, η = 1,
    r = (0, 0). log π(a) − log π(b) = 1, so Δ = 1, L = 1; with p = softmax(0, 1) and
    ∂L/∂logπ(a) = 2Δ/η = 2 = −∂L/∂logπ(b): dW = 2(e_1 − p) − 2(e_0 − p) = (−2, 2),
    dh_a = 2(W[1] − E_p W) = 2·p_0, dh_b = −2(W[0] − E_p W) = 2·p_1."""
    w = torch.tensor([[0.0], [1.0]], dtype=torch.float64, requires_grad=True)
    ha = torch.ones(1, 1, 1, dtype=torch.float64, requires_grad=True)
    hb = torch.ones(1, 1, 1, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    out = fused_linear_rebel_loss(ha, hb, w, torch.tensor([[1]]), torch.tensor([[0]]),
                                  zero, zero, zero, zero, eta=1.0, impl="torch")
    out.loss.backward()
    p1 = math.e / (1 + math.e)
    assert abs(out.loss.item() - 1.0) < 1e-14
    assert torch.allclose(w.grad, torch.tensor([[-2.0], [2.0]], dtype=torch.float64))
    assert abs(ha.grad.item() - 2 * (1 - p1)) < 1e-14 and abs(hb.grad.item() - 2 * p1) < 1e-14
    assert abs(out.policy_logps_a.item() - (1 - math.log1p(math.e))) < 1e-14


def test_unequal_response_lengths_float64() -> None:
    """T_a ≠ T_b (functional form): exact against the materialised path in float64."""
    g = torch.Generator().manual_seed(3)
    n, h, v = 3, 6, 23
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    hs = [torch.randn(n, t, h, generator=g, dtype=torch.float64) for t in (4, 7)]
    ys = [torch.randint(0, v, (n, t), generator=g) for t in (4, 7)]
    ys[0][:, 0] = IGNORE
    ys[1][:, -3:] = IGNORE
    ref = torch.randn(2, n, generator=g, dtype=torch.float64) - 10
    rew = torch.randn(2, n, generator=g, dtype=torch.float64)
    results = []
    for fused in (True, False):
        wq = w.clone().requires_grad_()
        hq = [x.clone().requires_grad_() for x in hs]
        if fused:
            out = fused_linear_rebel_loss(hq[0], hq[1], wq, ys[0], ys[1], ref[0], ref[1], rew[0],
                                          rew[1], eta=0.5, divergence="chi2", rho=0.4,
                                          impl="torch")
        else:
            la, lb = (reference_seq_logps(wq, x, y) for x, y in zip(hq, ys))
            out = rebel_loss(la, lb, ref[0], ref[1], rew[0], rew[1], eta=0.5,
                             divergence="chi2", rho=0.4)
        out.loss.backward()
        results.append([out.loss, out.weights, wq.grad, hq[0].grad, hq[1].grad])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_reference_hidden_states_and_reference_head() -> None:
    """``ref_hidden`` (+ ``ref_weight``) equals precomputed reference log-probs; no gradient
    reaches the reference model; ``ref_weight=None`` uses the policy head, detached."""
    policy, reference = make_model("llama", seed=0), make_model("llama", seed=1)
    batch = make_batch(policy.config.vocab_size, seed=4)
    loss_fn = FusedLinearRebelLoss(ETA, "kl", tau=0.5, impl="torch")
    h, w = hidden_and_head(policy, batch)
    ref_h, ref_w = hidden_and_head(reference, batch)
    out = loss_fn(h, w, batch["labels"], batch["rewards"], ref_hidden=ref_h, ref_weight=ref_w)
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    expected_ref = reference_seq_logps(ref_w.detach().double(), ref_h.detach().double(),
                                       batch["labels"])
    h2, w2 = hidden_and_head(policy, batch)
    out2 = loss_fn(h2, w2, batch["labels"], batch["rewards"], expected_ref)
    assert torch.allclose(out.loss, out2.loss, rtol=1e-5)
    # the reference sums are fp32 over ~T tokens (≈1e-5 absolute) and the KL weights
    # exp(ℓ/τ) amplify that; the float64 expectation is exact, so compare at 1e-4
    assert torch.allclose(out.weights, out2.weights, rtol=1e-4, atol=1e-7)
    same_head = loss_fn(h2, w2, batch["labels"], batch["rewards"], ref_hidden=ref_h)
    shared = reference_seq_logps(w2.detach().double(), ref_h.detach().double(), batch["labels"])
    same_head_expected = loss_fn(h2, w2, batch["labels"], batch["rewards"], shared)
    assert torch.allclose(same_head.loss, same_head_expected.loss, rtol=1e-5)
    assert not torch.allclose(same_head.loss, out2.loss, rtol=1e-3)  # the head mattered


def test_one_fused_call_for_both_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    """a- and b-tokens share ONE fused per-sequence call (one backward): both forms."""
    import drorebel.losses.fused_common as fc
    import drorebel.losses.fused_rebel as fr

    calls = []
    real = fc.linear_sequence_logps

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out.shape[0])  # sequences summed by this call
        return out

    monkeypatch.setattr(fc, "linear_sequence_logps", counted)  # the functional form
    monkeypatch.setattr(fr, "linear_sequence_logps", counted)  # the module form
    model = make_model("gpt2")
    batch = make_batch(model.config.vocab_size)
    ref_logps = ref_logps_for(model, batch)
    run_fused(model, batch, ref_logps, "chi2", {"rho": 0.1}, form="functional")
    run_fused(model, batch, ref_logps, "chi2", {"rho": 0.1}, form="module")
    rows = batch["labels"].shape[0]  # stacked [a; b]: every a- and b-row is one sequence
    assert calls == [rows, rows]


def test_autocast_runs_the_head_in_the_autocast_dtype() -> None:
    """Under torch.autocast(bf16) an fp32 model gives what an explicit bf16 head gives."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 16, generator=g)
    h = torch.randn(4, 5, 16, generator=g)
    y = torch.randint(0, 37, (4, 5), generator=g)
    r = torch.randn(4, generator=g, dtype=torch.float64)
    loss_fn = FusedLinearRebelLoss(1.0, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss_fn(h, w, y, r, r - 20)
    manual = loss_fn(h.bfloat16(), w.bfloat16(), y, r, r - 20)
    fp32 = loss_fn(h, w, y, r, r - 20)
    assert torch.equal(auto.loss, manual.loss) and not torch.equal(auto.loss, fp32.loss)


# ----------------------------------------------------------------------------- bad inputs
def _good(n: int = 3, t: int = 4, h: int = 8, v: int = 13) -> dict:
    """Valid inputs of ``fused_linear_rebel_loss``, keyed and ordered as its parameters."""
    g = torch.Generator().manual_seed(6)
    weight, hidden_a = torch.randn(v, h, generator=g), torch.randn(n, t, h, generator=g)
    labels_a = torch.randint(0, v, (n, t), generator=g)
    hidden_b = torch.randn(n, t, h, generator=g)
    labels_b = torch.randint(0, v, (n, t), generator=g)
    return dict(
        hidden_a=hidden_a, hidden_b=hidden_b, weight=weight, labels_a=labels_a,
        labels_b=labels_b, ref_logps_a=torch.zeros(n), ref_logps_b=torch.zeros(n),
        rewards_a=torch.zeros(n), rewards_b=torch.zeros(n),
    )


def _set(key: str, fn):
    def edit(d: dict) -> None:
        d[key] = fn(d[key])
    return edit


def _set_row(key: str, row: int, value):
    def edit(d: dict) -> None:
        d[key] = d[key].clone()
        d[key][row] = value
    return edit


BAD_INPUTS = {
    "hidden_b batch": (_set("hidden_b", lambda t: t[:2]), "hidden_b has B=2 rows"),
    "labels_a shape": (_set("labels_a", lambda t: t[:, :3]), r"labels_a must have shape \(3, 4\)"),
    "hidden_a H": (_set("hidden_a", lambda t: t[..., :5]), "hidden_a has H=5"),
    "weight 1-D": (_set("weight", lambda t: t[0]), r"weight must be a \[V, H\]"),
    "rewards_a shape": (_set("rewards_a", lambda t: torch.zeros(4)), r"rewards_a must have shape"),
    "rewards_a NaN": (_set_row("rewards_a", 1, float("nan")), "rewards_a row 1 is not finite"),
    "ref_logps_b inf": (_set_row("ref_logps_b", 2, float("-inf")), "ref_logps_b row 2 is not fin"),
    "labels_b out of vocab": (_set_row("labels_b", 2, 13), r"labels_b row 2 has a label outside"),
    "labels_a negative": (_set_row("labels_a", 0, -5), r"labels_a row 0 has a label outside"),
    "labels_a empty row": (_set_row("labels_a", 1, IGNORE), "labels_a row 1 has no response"),
    "labels float": (_set("labels_b", lambda t: t.float()), "labels_b must hold int64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_argument_and_row(case: str) -> None:
    edit, match = BAD_INPUTS[case]
    args = _good()
    edit(args)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_rebel_loss(*args.values(), eta=1.0, divergence="chi2", rho=0.1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eta=0.0), "eta must be a finite number > 0"),
        (dict(eta=-1.0), "eta must be a finite number > 0"),
        (dict(eta=1.0, divergence="chi2", rho=-0.1), "rho must be >= 0"),
        (dict(eta=1.0, divergence="kl", rho=-0.1), "rho must be >= 0"),
        (dict(eta=1.0, divergence="kl", tau=-2.0), "tau must be > 0"),
        (dict(eta=1.0, divergence="kl", tau=0.0), "tau must be > 0"),
        (dict(eta=1.0, divergence="wasserstien", rho=0.1), "divergence must be one of"),
        (dict(eta=1.0, divergence="wasserstein", rho=-0.1), "needs a finite radius rho >= 0"),
    ],
)
def test_bad_hyperparameters(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fused_linear_rebel_loss(*_good().values(), **kw)
    with pytest.raises(ValueError, match=match):
        FusedLinearRebelLoss(**kw)


def test_module_form_errors_name_stacked_arguments() -> None:
    args = _good()
    w = args["weight"]
    hidden = torch.cat([args["hidden_a"], args["hidden_b"]])
    labels = torch.cat([args["labels_a"], args["labels_b"]])
    rewards = torch.zeros(6)
    loss_fn = FusedLinearRebelLoss(1.0)
    with pytest.raises(ValueError, match=r"hidden must be stacked \[2B"):
        loss_fn(hidden[:5], w, labels[:5], rewards[:5], rewards[:5])
    nan_rewards = rewards.clone()
    nan_rewards[4] = float("nan")
    with pytest.raises(ValueError, match="rewards row 4 is not finite"):
        loss_fn(hidden, w, labels, nan_rewards, rewards)
    bad = labels.clone()
    bad[3] = IGNORE
    with pytest.raises(ValueError, match="labels row 3 has no response tokens"):
        loss_fn(hidden, w, bad, rewards, rewards)
    with pytest.raises(ValueError, match="pass ref_logps .* or ref_hidden"):
        loss_fn(hidden, w, labels, rewards)
    with pytest.raises(ValueError, match="ref_hidden must have hidden's shape"):
        loss_fn(hidden, w, labels, rewards, ref_hidden=hidden[:, :2])
