"""Data by name: save_to_disk folders, local folders of data files, hub names, splits and
`column_map`; every failure is one line naming the setting, path, row or field."""

from __future__ import annotations

import json
import os

import pytest
from trainer_fixtures.tiny import base_overrides, build_tokenizer

from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.data import DataError, load_rows, normalise_rows
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl
from drorebel.trainer.rollout import load_prompts


def _row(i: int, **kw) -> dict:
    return {"prompt": "the cat is", "response_a": "good " * (1 + i % 3),
            "response_b": "bad", "reward_a": 1.0 + i / 10, "reward_b": -0.5, **kw}


def _jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _err(fn, *args, **kw) -> str:
    with pytest.raises((DataError, ConfigError)) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_save_to_disk_dataset_dict_and_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([_row(0), _row(1)]),
                               "test": datasets.Dataset.from_list([_row(2)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["reward_a"] for r in load_rows(str(tmp_path / "dd"), "train_file")] == [1.0, 1.1]
    assert [r["reward_a"] for r in load_rows(str(tmp_path / "dd"), "train_file", "test")] == [1.2]
    msg = _err(load_rows, str(tmp_path / "dd"), "train_file", "validation")
    assert msg.startswith("`train_split`='validation'") and "['test', 'train']" in msg
    datasets.Dataset.from_list([_row(0)]).save_to_disk(str(tmp_path / "one"))
    assert "`prompt_split`='test'" in _err(load_rows, str(tmp_path / "one"), "prompt_file", "test")
    # a single file has one split
    f = _jsonl(tmp_path / "f.jsonl", [_row(0)])
    assert _err(load_rows, f, "train_file", "test").startswith("`train_split`='test': ")


def test_local_folder_of_data_files(tmp_path):
    d = tmp_path / "ds"
    _jsonl(d / "data" / "train-00000-of-00002.jsonl", [_row(0), _row(1)])
    _jsonl(d / "data" / "train-00001-of-00002.jsonl", [_row(2)])
    _jsonl(d / "data" / "test-00000-of-00001.jsonl", [_row(5)])
    (d / "README.md").write_text("# my pairs\n")
    rows = load_rows(str(d), "train_file")
    assert [r["reward_a"] for r in rows] == [1.0, 1.1, 1.2]  # shards in order, README ignored
    assert [r["reward_a"] for r in load_rows(str(d), "train_file", "test")] == [1.5]
    assert "`train_split`='dev'" in _err(load_rows, str(d), "train_file", "dev")
    # a bad row names its shard, line and (dataset) row
    _jsonl(d / "data" / "train-00001-of-00002.jsonl", [_row(2), _row(3, reward_b="x")])
    msg = _err(normalise_rows, load_rows(str(d), "train_file"))
    assert msg.startswith(f"{d}/data/train-00001-of-00002.jsonl, line 2, row 3: field "
                          "'reward_b' must be a number")
    # parquet shards, no split names: everything is train
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "pq"
    p.mkdir()
    pq.write_table(pa.Table.from_pylist([_row(0)]), str(p / "part-a.parquet"))
    pq.write_table(pa.Table.from_pylist([_row(1)]), str(p / "part-b.parquet"))
    assert len(load_rows(str(p), "train_file")) == 2


def test_folders_that_are_not_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _err(load_rows, str(empty), "train_file").startswith(
        f"`train_file`: {empty}: is a directory, not a data file")
    mixed = tmp_path / "mixed"  # e.g. a run folder: a data file next to a tokenizer
    _jsonl(mixed / "pairs.jsonl", [_row(0)])
    (mixed / "tok").mkdir()
    (mixed / "tok" / "tokenizer.json").write_text("{}")
    msg = _err(load_rows, str(mixed), "train_file")
    assert msg.startswith(f"`train_file`: {mixed}: the directory's split 'train' mixes file kinds")
    (mixed / "tok" / "template.jinja").write_text("x")
    msg = _err(load_rows, str(mixed), "train_file")
    assert "'tok/template.jinja'" in msg and "not a supported data file" in msg
    bad = tmp_path / "bad"
    _jsonl(bad / "train.jsonl", [])
    assert _err(load_rows, str(bad), "prompt_file") == \
        f"`prompt_file`: {bad}/train.jsonl: the file is empty (no rows)"


def test_hub_name_is_tried_only_when_not_local(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here anyway
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = _err(load_rows, "someone/pairs-dataset", "train_file", "test")
    assert msg.startswith("`train_file`: someone/pairs-dataset: no such local file or directory, "
                          "and loading it as a Hugging Face Hub dataset (`train_split`='test') "
                          "failed")
    # config: a hub name passes the path check, a missing local file does not
    tiny = base_overrides(str(tmp_path))
    TrainConfig.from_dict({**tiny, "train_file": "someone/pairs-dataset"}).check_paths()
    for missing in ("pairs.jsonl", "./someone/pairs", str(tmp_path / "nope")):
        assert "does not exist" in _err(TrainConfig.from_dict({**tiny, "train_file": missing})
                                        .check_paths)
    assert _err(load_rows, "pairs.jsonl", "train_file") == "`train_file`: pairs.jsonl: no such file"


def test_column_map_renames_and_is_checked(tmp_path):
    rows = [{"question": "the cat", "good": "nice", "bad_one": "awful", "s_good": 1.0,
             "s_bad": 0.0}]
    f = _jsonl(tmp_path / "odd.jsonl", rows)
    cmap = {"prompt": "question", "chosen": "good", "rejected": "bad_one",
            "chosen_reward": "s_good", "rejected_reward": "s_bad"}
    out = normalise_rows(load_rows(f, "train_file", column_map=cmap))
    assert out[0]["prompt"] == "the cat" and out[0]["response_a"] == "nice"
    assert out[0]["reward_b"] == 0.0
    # a mapped column the data lacks; the canonical name present as another column too
    msg = _err(load_rows, f, "train_file", column_map={"prompt": "query"})
    assert "`column_map` maps 'prompt' to column 'query', which the data does not have" in msg
    g = _jsonl(tmp_path / "both.jsonl", [{**rows[0], "prompt": "x"}])
    assert "also has a column 'prompt'" in _err(load_rows, g, "train_file", column_map=cmap)
    # config-level errors: unknown canonical name, TRL + native name, one column twice,
    # a name that the mode does not read
    for cm, fragment in [({"answer": "x"}, "'answer' is not a column the trainer reads"),
                         ({"chosen": "a", "response_a": "b"}, "both 'chosen' (TRL name)"),
                         ({"prompt": "q", "chosen": "q"}, "several fields to the column(s)"),
                         ({"prompt": ""}, "must map to a column name"),
                         ({"prompt": 3}, "must map to a column name")]:
        assert fragment in _err(TrainConfig, model="m", column_map=cm)
    online = dict(mode="online", prompt_file="p.jsonl", reward_fn="m:f")
    assert "mode=online" in _err(TrainConfig, model="m", column_map={"chosen": "a"}, **online)
    assert "must be dict" in _err(TrainConfig.from_dict, {"model": "m", "column_map": ["a"]})


def test_prompts_by_split_and_column_map(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(str(tmp_path / "tok")))
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"question": "the cat", "bonus": 1.0}]),
        "eval": datasets.Dataset.from_list([{"question": "a dog is", "bonus": 2.0}] * 2)})
    dd.save_to_disk(str(tmp_path / "prompts"))
    ps = load_prompts(str(tmp_path / "prompts"), tok, 8, "truncate", setting="prompt_file",
                      split="eval", column_map={"prompt": "question"})
    assert ps.texts == ["a dog is"] * 2 and ps.columns == {"bonus": [2.0, 2.0]}


def test_offline_run_from_a_saved_dataset_with_split_and_column_map(tmp_path):
    import datasets

    renamed = [{"q": r["prompt"], "a": r["response_a"], "b": r["response_b"],
                "ra": r["reward_a"], "rb": r["reward_b"]} for r in map(_row, range(8))]
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(renamed)}).save_to_disk(
        str(tmp_path / "saved"))
    cfg = TrainConfig.from_dict(base_overrides(
        str(tmp_path), train_file=str(tmp_path / "saved"), train_split="dev", max_steps=2,
        column_map={"prompt": "q", "response_a": "a", "response_b": "b", "reward_a": "ra",
                    "reward_b": "rb"}))
    rows = read_jsonl(train(cfg).metrics_path)
    assert [r["step"] for r in rows] == [1, 2]
    default = TrainConfig.from_dict(base_overrides(str(tmp_path)))
    assert cfg.fingerprint() != default.fingerprint()  # the data changed


def test_example_config_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "offline_by_name.yaml"
    cfg = TrainConfig.from_yaml(str(path))
    assert cfg.train_split and cfg.column_map
