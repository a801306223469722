"""Every trainer setting is checked before any model loads: a bad one is ONE line, a
ConfigError naming the setting, the value and what is allowed (the CLI prints it, exit 2).

Covers :meth:`TrainConfig.validate` (types, finite numbers in range, choices, settings with no
effect for the chosen loss), :meth:`TrainConfig.check_paths` (output_dir, resume, DeepSpeed file,
WORLD_SIZE), the config file itself (YAML syntax, UTF-8, duplicate keys, missing/unreadable),
the two reliability fields (``overwrite_output_dir``, ``on_nonfinite``) and, end to end, that
``drorebel train`` exits 2 with one stderr line and never loads a model.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from drorebel.trainer.config import GROUPS, ConfigError, TrainConfig, read_yaml_mapping
from drorebel.trainer.config_aliases import SAME_AS_HF, load_yaml

ONLINE = ["mode=online", "prompt_file=p.jsonl", "reward_fn=m:f", "max_length=64",
          "max_prompt_length=16"]


def _cfg(*overrides: str) -> TrainConfig:
    base = [] if any(o.startswith("model=") for o in overrides) else ["model=m"]
    return TrainConfig.from_yaml(None, [*base, *overrides])


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


# (overrides, a fragment of the one-line message): the setting, the value, what is allowed
BAD = [
    # clipping: null or 0 = off, > 0 = clip, the rest refused (-1 would ascend the gradient)
    (["max_grad_norm=-1"], "`max_grad_norm` must be > 0 to clip, or 0 / null for no clipping "
                           "(negative, NaN and inf are refused), got -1"),
    (["max_grad_norm=.nan"], "`max_grad_norm` must be > 0 to clip"),
    (["max_grad_norm=.inf"], "got inf"),
    (["max_grad_norm=true"], "`max_grad_norm` must be float | None, got True"),
    # REBEL eta, DPO beta, the log-prob temperature
    (["eta=.inf"], "`eta` must be > 0 and finite (REBEL's eta), got inf"),
    (["eta=0"], "`eta` must be > 0"),
    (["eta=.nan"], "`eta` must be > 0 and finite"),
    (["loss=dpo", "beta=0"], "`beta` must be > 0 and finite (DPO beta), got 0"),
    (["loss=dpo", "beta=.inf"], "`beta` must be > 0 and finite"),
    (["loss=dpo", "beta=-1"], "`beta` must be > 0"),
    (["temperature=0"], "`temperature` must be > 0 and finite"),
    (["temperature=.inf"], "`temperature` must be > 0 and finite"),
    (["temperature=-1"], "`temperature` must be > 0"),
    # divergence radius / temperature: values and the combinations that mean nothing
    (["rho=0.5"], "`rho`=0.5 has no effect with divergence='none' (uniform weights): set "
                  "divergence to chi2, kl or wasserstein, or remove `rho`"),
    (["tau=1.0"], "`tau`=1.0 has no effect with divergence='none'"),
    (["loss=dpo", "rho=0.1"], "`rho`=0.1 has no effect with divergence='none' (uniform "
                              "weights, loss=dpo)"),
    (["divergence=chi2", "rho=0.1", "tau=1.0"], "`tau`=1.0 is used by divergence='kl' only"),
    (["divergence=wasserstein", "rho=0.1", "tau=1.0"], "takes `rho` (the radius), not `tau`"),
    (["divergence=kl", "rho=0.1", "tau=1.0"], "divergence='kl' takes exactly one of `rho` (the "
                                              "radius) or `tau` (a fixed temperature), got "
                                              "rho=0.1 and tau=1.0"),
    (["divergence=kl"], "divergence='kl' needs `rho` (or `tau` for kl)"),
    (["divergence=chi2", "rho=-0.1"], "`rho` must be >= 0 and finite (the radius), got -0.1"),
    (["divergence=chi2", "rho=.nan"], "`rho` must be >= 0 and finite"),
    (["divergence=chi2", "rho=.inf"], "`rho` must be >= 0 and finite"),
    (["divergence=chi2", "rho=true"], "`rho` must be float | None, got True"),
    (["divergence=kl", "tau=0"], "`tau` must be > 0 and finite (the KL temperature), got 0"),
    (["divergence=kl", "tau=-1"], "`tau` must be > 0"),
    (["divergence=kl", "tau=.inf"], "`tau` must be > 0 and finite"),
    (["divergence=kl", "tau=false"], "`tau` must be float | None, got False"),
    (["divergence=chi2", "rho=0.1", "w_target=embeddings"],
     "`w_target`='embeddings' applies to divergence='wasserstein' only"),
    (["divergence=tv", "rho=0.1"], "`divergence` must be one of ('none', 'chi2', 'kl', "
                                   "'wasserstein'), got 'tv'"),
    # optimiser
    (["lr=.nan"], "`lr` must be > 0 and finite (the peak AdamW learning rate), got nan"),
    (["lr=.inf"], "`lr` must be > 0 and finite"),
    (["lr=-1e-3"], "`lr` must be > 0"),
    (["lr=0"], "`lr` must be > 0"),
    (["lr=nan"], "`lr` must be > 0 and finite"),  # YAML 1.1: the string "nan", read as float
    (["lr=true"], "`lr` must be float, got True"),
    (["adam_betas=[0.9, 1.0]"], "`adam_betas` must be two numbers [beta1, beta2], each in "
                                "[0, 1), got [0.9, 1.0]"),
    (["adam_betas=[0.9, 1.5]"], "`adam_betas` must be two numbers"),
    (["adam_betas=[-0.1, 0.9]"], "each in [0, 1)"),
    (["adam_betas=[.nan, 0.9]"], "each in [0, 1)"),
    (["adam_betas=[0.9]"], "`adam_betas` must be two numbers"),
    (["adam_betas=[0.9, 0.99, 0.999]"], "`adam_betas` must be two numbers"),
    (["adam_betas=[true, 0.9]"], "`adam_betas` must be two numbers"),
    (["adam_betas=[0.9, x]"], "`adam_betas` must be two numbers"),
    (["adam_betas=0.9"], "`adam_betas` must be list[float], got 0.9"),
    (["weight_decay=-0.1"], "`weight_decay` must be >= 0 and finite, got -0.1"),
    (["weight_decay=.inf"], "`weight_decay` must be >= 0 and finite"),
    (["warmup_steps=-1"], "`warmup_steps` must be >= 0, got -1"),
    (["max_steps=0"], "`max_steps` must be >= 1, got 0"),
    (["stop_at_step=0"], "`stop_at_step` must be >= 1 (or null), got 0"),
    (["batch_size=0"], "`batch_size` (the GLOBAL micro-batch: pairs over all ranks, not per "
                       "GPU) must be >= 1, got 0"),
    (["batch_size=4.0"], "`batch_size` must be int, got 4.0"),
    (["grad_accum=0"], "`grad_accum` must be >= 1, got 0"),
    (["seed=-1"], "`seed` must be an integer in [0, 4294967295] (numpy's seed range), got -1"),
    ([f"seed={2**32}"], "`seed` must be an integer in [0, 4294967295]"),
    (["seed=1.5"], "`seed` must be int, got 1.5"),
    (["on_nonfinite=ignore"], "`on_nonfinite` must be one of ('stop', 'skip'), got 'ignore'"),
    # model / lengths
    (["dtype=float64"], "`dtype` must be one of ('float32', 'bfloat16', 'float16'), got "
                        "'float64'; float64 is not supported: use float32"),
    (["max_prompt_length=64"], "`max_prompt_length` must be < `max_length` (max_length counts "
                               "prompt + response tokens), got max_prompt_length=64 and "
                               "max_length=64"),
    (["max_length=0"], "`max_length` must be >= 1, got 0"),
    (["max_prompt_length=0"], "`max_prompt_length` must be >= 1, got 0"),
    (["model=null", "model_config={hidden_size: 32}", "tokenizer=t"],
     "`model_config` needs a `model_type`"),
    (["model=''"], "`model` must not be empty"),
    (["attn_implementation=''"], "`attn_implementation` must not be empty"),
    (["trust_remote_code=1"], "`trust_remote_code` must be bool, got 1"),
    # checkpoints / logging
    (["log_steps=0"], "`log_steps` must be >= 1, got 0"),
    (["save_steps=-1"], "`save_steps` must be >= 0, got -1"),
    (["save_total_limit=-1"], "`save_total_limit` must be >= 0 (or null), got -1"),
    (["output_dir=''"], "`output_dir` must not be empty"),
    (["resume=''"], "`resume` must not be empty, got '' (null: unset)"),
    (["overwrite_output_dir=1"], "`overwrite_output_dir` must be bool, got 1"),
    (["progress=maybe"], "`progress` must be bool, got 'maybe'"),
    # online ranges (checked in every mode: such a value is never meaningful)
    (["top_p=0"], "`top_p` must be in (0, 1] (1: off), got 0"),
    (["top_p=1.5"], "`top_p` must be in (0, 1]"),
    (["top_p=.nan"], "`top_p` must be in (0, 1]"),
    (["top_k=-1"], "`top_k` must be >= 0, got -1"),
    (["max_new_tokens=0"], "`max_new_tokens` must be >= 1, got 0"),
    (["num_passes=0"], "`num_passes` must be >= 1, got 0"),
    (["rollout_batch_size=0"], "`rollout_batch_size` must be >= 1, got 0"),
    (["generation_batch_size=0"], "`generation_batch_size` must be >= 1 (or null), got 0"),
    (["reward_weights=[1.0, .nan]"], "`reward_weights` must be a non-empty list of finite "
                                     "numbers, got [1.0, nan]"),
    (["reward_weights=[]"], "`reward_weights` must be a non-empty list"),
    (["reward_weights=[1, true]"], "`reward_weights` must be a non-empty list"),
    # online consistency (mode=online only)
    ([*ONLINE, "rollout_batch_size=6"], "`rollout_batch_size`=6 must be a multiple of "
                                        "batch_size*grad_accum=4"),
    ([*ONLINE, "generation_batch_size=3"], "must be a multiple of `generation_batch_size`=3"),
    ([*ONLINE, "max_new_tokens=60"], "max_prompt_length + max_new_tokens = 76 exceeds "
                                     "`max_length`=64"),
    ([*ONLINE[:2], "reward_fn=nocolon"], "`reward_fn` must look like 'module:function'"),
    # the command line itself
    (["lr=1e-3", "lr=2e-3"], "override `lr` is given twice with different values ('lr=1e-3' "
                             "and 'lr=2e-3'); give it once"),
    (["lr=[1,"], "override 'lr=[1,': the value is not valid YAML"),
]


@pytest.mark.parametrize("overrides, fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_one_line_naming_setting_value_and_rule(overrides, fragment):
    assert fragment in _error(*overrides)


GOOD = [
    (["max_grad_norm=0"], "max_grad_norm", 0),  # no clipping, on every engine
    (["max_grad_norm=null"], "max_grad_norm", None),
    (["max_grad_norm=0.5"], "max_grad_norm", 0.5),
    (["divergence=chi2", "rho=0"], "rho", 0),  # radius 0: uniform weights
    (["divergence=kl", "tau=0.5"], "tau", 0.5),
    (["divergence=kl", "rho=0.1"], "rho", 0.1),
    (["divergence=wasserstein", "rho=0"], "rho", 0),
    (["beta=0.5"], "beta", 0.5),  # loss=rebel ignores beta (documented; not refused)
    (["adam_betas=[0, 0.5]"], "adam_betas", [0, 0.5]),
    (["seed=0"], "seed", 0),
    ([f"seed={2**32 - 1}"], "seed", 2**32 - 1),
    (["on_nonfinite=skip"], "on_nonfinite", "skip"),
    (["overwrite_output_dir=true"], "overwrite_output_dir", True),
    (["lr=1e-5", "lr=1.0e-5"], "lr", 1e-5),  # the same value twice is fine
    (["resume=auto"], "resume", "auto"),
    (["warmup_steps=50", "max_steps=10"], "warmup_steps", 50),
    ([*ONLINE, "generation_batch_size=4"], "generation_batch_size", 4),
]


@pytest.mark.parametrize("overrides, name, want", GOOD, ids=[" ".join(o) for o, _, _ in GOOD])
def test_allowed_values(overrides, name, want):
    assert getattr(_cfg(*overrides), name) == want


def test_defaults_and_shipped_configs_are_valid():
    cfg = TrainConfig(model="m")
    assert (cfg.overwrite_output_dir, cfg.on_nonfinite) == (False, "stop")
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml") and name != "preference_shift_gpu.yaml":
            TrainConfig.from_yaml(os.path.join(root, name))


@pytest.mark.parametrize("kw, fragment", [
    (dict(divergence="chi2", rho=True), "`rho` must be float | None, got True"),
    (dict(batch_size=4.0), "`batch_size` must be int, got 4.0"),
    (dict(lr=float("nan")), "`lr` must be > 0 and finite"),
    (dict(max_grad_norm=-1.0), "`max_grad_norm` must be > 0 to clip"),
    (dict(adam_betas=(0.9, 1.0)), "`adam_betas` must be two numbers"),
    (dict(seed=-1), "`seed` must be an integer in [0, 4294967295]"),
    (dict(eta=float("inf")), "`eta` must be > 0 and finite"),
    (dict(reward_weights=[1.0, float("inf")]), "`reward_weights`"),
])
def test_configs_built_in_python_are_checked_too(kw, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model="m", **kw)
    assert fragment in str(err.value)


def test_adam_betas_tuple_from_python_is_accepted():
    assert TrainConfig(model="m", adam_betas=(0.8, 0.99)).adam_betas == [0.8, 0.99]


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="top_p"):
        dataclasses.replace(TrainConfig(model="m"), top_p=0.0)


# ---- the two reliability fields --------------------------------------------------------------

# fingerprint of TrainConfig(model="m") before overwrite_output_dir / on_nonfinite existed:
# checkpoints written then must keep resuming
OLD_DEFAULT_FINGERPRINT = "0df2f740a28906dc"


def test_new_fields_have_help_group_and_do_not_move_the_fingerprint():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert fields["overwrite_output_dir"].metadata["group"] == "checkpoints/logging"
    assert fields["on_nonfinite"].metadata["group"] == "optimisation"
    assert {f.metadata["group"] for f in fields.values()} <= set(GROUPS)
    assert "stop" in fields["on_nonfinite"].metadata["help"]
    assert "skip" in fields["on_nonfinite"].metadata["help"]
    assert "resume" in fields["overwrite_output_dir"].metadata["help"]
    assert "overwrite_output_dir" in SAME_AS_HF  # Hugging Face's name and meaning
    base = TrainConfig(model="m")
    assert base.fingerprint() == OLD_DEFAULT_FINGERPRINT
    assert TrainConfig(model="m", on_nonfinite="skip",
                       overwrite_output_dir=True).fingerprint() == OLD_DEFAULT_FINGERPRINT


# ---- the config file -------------------------------------------------------------------------

def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1e-3\nmax_steps: 2\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:2:10: invalid YAML: while parsing a flow sequence "
                              "expected ',' or ']'")
    assert "\n" not in message
    path.write_text("model: m\n\tlr: 1\n")  # a tab
    with pytest.raises(ConfigError, match=rf"^{path}:2:1: invalid YAML: .*'\\t'"):
        TrainConfig.from_yaml(str(path))


def test_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nmodel: m\nlr: 2.0e-3\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(str(path))
    assert str(err.value) == (f"{path}:3:1: invalid YAML: the key 'lr' is given twice (first "
                              "on line 1); give it once")
    path.write_text("model_config: {model_type: llama, hidden_size: 32, hidden_size: 64}\n")
    with pytest.raises(ConfigError, match="'hidden_size' is given twice"):
        read_yaml_mapping(str(path))
    # a merge key's values may be overridden (that is what merging is for)
    assert load_yaml("a: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n", "f.yaml")["c"] == {"x": 3, "y": 2}


def test_not_utf8_missing_unreadable_and_not_a_mapping(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: m\nlr: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config file '.*bin\.yaml' is not UTF-8 text \(line 2, "
                                          r"byte 13: invalid start byte\)"):
        TrainConfig.from_yaml(str(binary))
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        TrainConfig.from_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=rf"cannot read config file '{tmp_path}': "):
        TrainConfig.from_yaml(str(tmp_path))  # a directory
    listing = tmp_path / "list.yaml"
    listing.write_text("- model: m\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping .*list"):
        TrainConfig.from_yaml(str(listing))
    falsy = tmp_path / "false.yaml"
    falsy.write_text("false\n")  # used to read as an empty config
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        read_yaml_mapping(str(falsy))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert read_yaml_mapping(str(empty)) == {}
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffmodel: m\nlr: 1.0e-3\n".encode())
    assert TrainConfig.from_yaml(str(bom)).lr == 1e-3


# ---- paths: checked before the model loads ----------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "response_a": "b", "response_b": "c", "reward_a": 1, '
                    '"reward_b": 0}\n')
    return str(path)


def _paths_cfg(data_file: str, **kw) -> TrainConfig:
    return TrainConfig(model="m", train_file=data_file, **kw)


def test_output_dir_that_is_a_file_is_refused(tmp_path, data_file):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"^`output_dir`: '{blocker}' exists and is not a "
                                          r"directory$"):
        _paths_cfg(data_file, output_dir=str(blocker)).check_paths()
    with pytest.raises(ConfigError, match=rf"cannot create '{blocker}/run': '{blocker}' is not "
                                          "a directory"):
        _paths_cfg(data_file, output_dir=str(blocker / "run")).check_paths()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="is a broken symbolic link"):
        _paths_cfg(data_file, output_dir=str(dangling)).check_paths()
    # only the training outputs: precompute-ref may skip them
    _paths_cfg(data_file, output_dir=str(blocker)).check_paths(outputs=False)
    # a directory that does not exist yet, or an existing one, is fine
    _paths_cfg(data_file, output_dir=str(tmp_path / "a" / "b")).check_paths()
    _paths_cfg(data_file, output_dir=str(tmp_path)).check_paths()


def test_output_dir_not_writable_is_refused(tmp_path, data_file, monkeypatch):
    """The rule, with os.access answering as for a non-root user."""
    real_access = os.access
    locked = str(tmp_path / "locked")
    os.makedirs(locked)
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == locked
                        else real_access(p, mode))
    with pytest.raises(ConfigError, match=rf"`output_dir`: directory '{locked}' is not writable"):
        _paths_cfg(data_file, output_dir=locked).check_paths()
    with pytest.raises(ConfigError, match=rf"cannot create '{locked}/run': directory '{locked}' "
                                          "is not writable"):
        _paths_cfg(data_file, output_dir=os.path.join(locked, "run")).check_paths()


def test_read_only_output_dir_for_real(tmp_path, data_file):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a read-only directory is "
                        "still writable, so there is nothing to refuse; the rule is tested with "
                        "a patched os.access in test_output_dir_not_writable_is_refused")
        with pytest.raises(ConfigError, match="is not writable"):
            _paths_cfg(data_file, output_dir=str(locked)).check_paths()
    finally:
        locked.chmod(stat.S_IRWXU)


def test_resume_path_must_exist(tmp_path, data_file):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "run" / "checkpoint-9")
    with pytest.raises(ConfigError, match=rf"^`resume`: checkpoint '{missing}' does not exist "
                                          r"\(give a checkpoint-<step> directory, auto"):
        _paths_cfg(data_file, output_dir=out, resume=missing).check_paths()
    a_file = tmp_path / "ckpt.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        _paths_cfg(data_file, output_dir=out, resume=str(a_file)).check_paths()
    _paths_cfg(data_file, output_dir=out, resume="auto").check_paths()  # nothing saved: fresh
    os.makedirs(missing)
    _paths_cfg(data_file, output_dir=out, resume=missing).check_paths()


def test_deepspeed_file_must_exist(tmp_path, data_file):
    with pytest.raises(ConfigError, match=r"`deepspeed`: config file '.*ds\.json' does not "
                                          "exist"):
        _paths_cfg(data_file, output_dir=str(tmp_path / "r"),
                   deepspeed=str(tmp_path / "ds.json")).check_paths()


def test_world_size_must_split_the_batch(tmp_path, data_file, monkeypatch):
    out = str(tmp_path / "r")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"`batch_size`=4 \(the GLOBAL micro-batch\) must be a "
                                          "multiple of WORLD_SIZE=3"):
        _paths_cfg(data_file, output_dir=out).check_paths()
    monkeypatch.setenv("WORLD_SIZE", "2")
    _paths_cfg(data_file, output_dir=out).check_paths()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    online = dict(mode="online", prompt_file=str(prompts), reward_fn="m:f", max_length=64,
                  max_prompt_length=16, rollout_batch_size=8, generation_batch_size=8)
    with pytest.raises(ConfigError, match=r"`generation_batch_size`=8 must divide each rank's "
                                          r"share of the rollout \(4 prompts on 2 ranks\)"):
        TrainConfig(model="m", output_dir=out, **online).check_paths()


# ---- end to end: drorebel train ------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model or tokenizer would load."""
    import drorebel.trainer.engine as engine
    import drorebel.trainer.loop as loop
    import drorebel.trainer.model as model
    import drorebel.trainer.online as online

    def boom(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the config error was reported")

    for module in (model, engine, online):
        monkeypatch.setattr(module, "load_model", boom)
    for module in (model, loop, online):
        monkeypatch.setattr(module, "load_tokenizer", boom)
    monkeypatch.delenv("DROREBEL_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _cli_cases(tmp_path, data_file):
    out = str(tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nlr: [1e-3\nmax_steps: 2\n")
    base = ["model=m", f"train_file={data_file}"]
    return [
        ([*base, f"output_dir={out}", "max_grad_norm=-1"], "`max_grad_norm` must be > 0"),
        ([*base, f"output_dir={out}", "eta=.inf"], "`eta` must be > 0 and finite"),
        ([*base, f"output_dir={out}", "rho=0.5"], "`rho`=0.5 has no effect"),
        ([*base, f"output_dir={blocker}"], "`output_dir`: "),
        ([*base, f"output_dir={out}", f"resume={tmp_path / 'checkpoint-9'}"],
         "checkpoint-9' does not exist"),
        ([str(bad)], f"{bad}:3:10: invalid YAML"),
    ]


def test_cli_config_error_exits_2_with_one_line_and_loads_no_model(tmp_path, data_file,
                                                                   no_model, capsys):
    from drorebel.cli import main

    for argv, fragment in _cli_cases(tmp_path, data_file):
        assert main(["train", *argv]) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith("drorebel train: error: ") and fragment in lines[0], lines[0]
