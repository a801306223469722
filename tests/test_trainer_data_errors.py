"""Bad data files and rows: one clear DataError line (file and line, or row and field), no
traceback, no silent change of the data (offline pairs and online prompts alike)."""

from __future__ import annotations

import gzip
import json

import pytest
from trainer_fixtures.tiny import base_overrides, build_tokenizer

from drorebel.trainer.data import (
    DataError,
    Rows,
    load_rows,
    normalise_rows,
    repeat_notice,
    tokenise_pairs,
)
from drorebel.trainer.errors import UserError
from drorebel.trainer.rollout import load_prompts

ROW = {"prompt": "the cat", "response_a": "good", "response_b": "bad",
       "reward_a": 1.0, "reward_b": 0.0}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _row(**kw):
    return {**ROW, **kw}


def _jsonl(tmp_path, *rows, name="d.jsonl", tail=""):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(p)


def _err(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, UserError)
    return msg


def _check(path):
    return normalise_rows(load_rows(path))


# ---- file-level errors ----------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path, ROW, ROW, tail='{"prompt": "a", \n' + json.dumps(ROW) + "\n")
    msg = _err(load_rows, p)
    assert msg.startswith(f"{p}, line 3: invalid JSON at column")


def test_truncated_last_line(tmp_path):
    p = _jsonl(tmp_path, ROW, tail='{"prompt": "a", "response_a": "go')
    msg = _err(load_rows, p)
    assert f"{p}, line 2: invalid JSON" in msg and "cut short" in msg


def test_a_line_that_is_not_an_object(tmp_path):
    p = _jsonl(tmp_path, ROW, [1, 2])
    assert _err(load_rows, p) == f"{p}, line 2: expected a JSON object per line, got an array"


@pytest.mark.parametrize("line, key", [
    ('{"prompt": "a", "prompt": "b", "response_a": "x"}', "prompt"),
    ('{"prompt": [{"role": "user", "content": "a", "content": "b"}]}', "content"),
])
def test_duplicate_keys_rejected(tmp_path, line, key):
    p = _jsonl(tmp_path, ROW, tail=line + "\n")
    assert _err(load_rows, p).startswith(f"{p}, line 2: duplicate key {key!r}")


def test_duplicate_key_in_a_json_document_names_its_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"prompt": "a",\n   "reward_a": 1,\n   "reward_a": 2}\n]\n')
    assert _err(load_rows, str(p)).startswith(f"{p}, line 4: duplicate key 'reward_a'")


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((json.dumps(ROW) + "\n").encode() + b'{"prompt": "\xff\xfe"}\n')
    offset = len(json.dumps(ROW)) + 1 + len('{"prompt": "')
    assert _err(load_rows, str(p)) == (f"{p}, line 2: not UTF-8 (byte 0xff at byte offset "
                                       f"{offset}); save the file as UTF-8")


def test_empty_and_blank_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("")
    assert _err(load_rows, str(p)) == f"{p}: the file is empty (no rows)"
    p.write_text("\n\n  \n")
    assert _err(load_rows, str(p)) == f"{p}: the file has only blank lines (no rows)"
    p = tmp_path / "d.json"
    p.write_text("[]")
    assert "no rows" in _err(load_rows, str(p))


@pytest.mark.parametrize("name", ["d.csv", "d.txt", "noext", "d.parquet.gz"])
def test_unsupported_extension_lists_the_formats(tmp_path, name):
    p = tmp_path / name
    p.write_text("prompt,response_a\nhi,there\n")
    msg = _err(load_rows, str(p))
    assert "unsupported file type" in msg
    assert all(f in msg for f in (".jsonl", ".json", ".parquet", "save_to_disk"))


def test_directory_rejected_unless_saved_dataset(tmp_path):
    import datasets

    msg = _err(load_rows, str(tmp_path), "train_file")
    assert msg.startswith(f"`train_file`: {tmp_path}: is a directory, not a data file")
    datasets.Dataset.from_list([ROW, _row(reward_a=0.1 + 0.2)]).save_to_disk(str(tmp_path / "s"))
    assert [r["reward_a"] for r in _check(str(tmp_path / "s"))] == [1.0, 0.1 + 0.2]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROW])}).save_to_disk(
        str(tmp_path / "dd"))
    assert len(load_rows(str(tmp_path / "dd"))) == 1


def test_supported_formats_keep_values_exact(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"role": "user", "content": "the cat"}]
    rows = [_row(prompt=chat, reward_a=0.1 + 0.2, reward_b=-1 / 3), _row(prompt=chat, reward_a=7)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    (tmp_path / "c.json").write_text(json.dumps(cols, indent=1))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps(r) + "\r\n" for r in rows).encode())
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.parquet", "a.json", "l.json", "c.json", "bom.jsonl", "z.jsonl.gz"):
        got = _check(str(tmp_path / name))
        assert [r["reward_a"] for r in got] == [0.1 + 0.2, 7], name
        assert got[0]["reward_b"] == -1 / 3 and got[1]["prompt"] == chat, name


def test_pretty_printed_single_row_json_is_explained(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROW, indent=2))
    assert "one JSON object over several lines" in _err(load_rows, str(p))


# ---- row-level errors -----------------------------------------------------------------------


def test_one_string_reward_is_an_error_and_changes_nothing(tmp_path):
    """``datasets`` turned the column into JSON text re-encoded with 10 significant digits."""
    p = _jsonl(tmp_path, _row(reward_a=0.12345678901234567), ROW, _row(reward_a="1.5"))
    rows = load_rows(p)
    assert rows[0]["reward_a"] == 0.12345678901234567 and rows[2]["reward_a"] == "1.5"
    assert _err(normalise_rows, rows) == (f"{p}, line 3, row 2: field 'reward_a' must be a "
                                          "number, got '1.5'")


@pytest.mark.parametrize("text, field, what", [
    ('"reward_b": NaN', "reward_b", "is not finite (nan)"),
    ('"reward_b": Infinity', "reward_b", "is not finite (inf)"),
    ('"reward_b": -Infinity', "reward_b", "is not finite (-inf)"),
    ('"reward_b": true', "reward_b", "must be a number, got True"),
    ('"reward_b": 1' + "0" * 400, "reward_b", "is not finite"),
    ('"reward_b": null', "reward_b", "missing field(s) ['reward_b']"),
])
def test_bad_reward_values_from_a_file(tmp_path, text, field, what):
    line = json.dumps(ROW).replace('"reward_b": 0.0', text)
    p = _jsonl(tmp_path, ROW, tail="\n" + line + "\n")  # a blank line: line 3 is row 1
    msg = _err(_check, p)
    assert msg.startswith(f"{p}, line 3, row 1: ") and what in msg and field in msg


def test_reference_log_probs_come_in_pairs(tmp_path):
    msg = _err(normalise_rows, [_row(ref_logp_a=-3.0)])
    assert msg == ("row 0: field 'ref_logp_a' is given without 'ref_logp_b' (cached reference "
                   "log-probs come in pairs: give both or neither)")
    assert "'ref_logp_b' is given without 'ref_logp_a'" in _err(
        normalise_rows, [_row(ref_logp_b=-3.0, ref_logp_a=None)])
    p = _jsonl(tmp_path, _row(ref_logp_a=-1.0, ref_logp_b=-2.0), ROW)
    assert _err(_check, p) == (f"{p}, line 2, row 1: ref_logp_a/ref_logp_b missing, but row 0 "
                               "has them (give them in every row or in none)")
    # a file in which no row has both (the old code then tokenised and hit a KeyError)
    p = _jsonl(tmp_path, _row(ref_logp_a=-1.0), _row(ref_logp_a=-2.0), name="e.jsonl")
    assert "ref_logp_a' is given without 'ref_logp_b'" in _err(_check, p)


def test_positive_reference_log_prob(tmp_path):
    p = _jsonl(tmp_path, _row(ref_logp_a=-1.0, ref_logp_b=-2.0),
               _row(ref_logp_a=0.5, ref_logp_b=-1.0))
    assert _err(_check, p) == (f"{p}, line 2, row 1: field 'ref_logp_a' must be <= 0 (a "
                               "log-probability), got 0.5")
    assert normalise_rows([_row(ref_logp_a=0.0, ref_logp_b=-0.0)])[0]["ref_logp_a"] == 0.0


def test_trl_and_native_names_together(tmp_path):
    p = _jsonl(tmp_path, ROW, _row(chosen="nice"))
    msg = _err(_check, p)
    assert msg.startswith(f"{p}, line 2, row 1: both 'chosen' (TRL name) and 'response_a'")
    assert "both 'rejected_reward' (TRL name) and 'reward_b'" in _err(
        normalise_rows, [_row(rejected_reward=2.0)])
    # a null column (parquet/arrow fill a column a row lacks with null) overrides nothing
    rows = normalise_rows([{**ROW, "chosen": None, "chosen_reward": None},
                           {"prompt": "p", "chosen": "good", "rejected": "bad",
                            "chosen_reward": 2, "rejected_reward": -1,
                            "response_a": None, "reward_a": None}])
    assert (rows[0]["response_a"], rows[0]["reward_a"]) == ("good", 1.0)
    assert (rows[1]["response_a"], rows[1]["reward_a"]) == ("good", 2)


def test_long_values_are_shortened_in_messages():
    msg = _err(normalise_rows, [_row(reward_a="x" * 1000)])
    assert len(msg) < 150 and msg.endswith("...")


# ---- tokenising ------------------------------------------------------------------------------


def test_empty_prompt_is_an_error_naming_the_row(tok, tmp_path):
    p = _jsonl(tmp_path, ROW, _row(prompt=""))
    msg = _err(tokenise_pairs, _check(p), tok, 16, 8, "truncate")
    assert msg.startswith(f"{p}, line 2, row 1: field 'prompt' has no tokens, so the first "
                          "response token could not be predicted")


def test_empty_prompt_fine_with_a_tokenizer_that_adds_bos(tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    bos_tok = AutoTokenizer.from_pretrained(build_tokenizer(str(tmp_path / "tok")))
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos_tok.bos_token_id)])
    data = tokenise_pairs(normalise_rows([_row(prompt="")]), bos_tok, 16, 8, "truncate")
    good, eos = bos_tok.convert_tokens_to_ids(["good", "<eos>"])
    assert data.ids_a[0].tolist() == [bos_tok.bos_token_id, good, eos]
    assert data.labels_a[0].tolist() == [-100, good, eos]


def test_truncated_responses_counted_and_printed(tok, capsys):
    rows = normalise_rows([_row(response_a="good " * 10), ROW, _row(response_b="bad " * 20)])
    data = tokenise_pairs(rows, tok, 8, 4, "truncate")
    assert data.n_responses_truncated == 2 and (data.n_truncated, data.n_dropped) == (0, 0)
    assert data.labels_a[0].tolist()[-1] == tok.convert_tokens_to_ids("good")  # EOS cut off
    assert ("[drorebel] responses over max_length=8 minus their prompt: 2 of 6 cut"
            in capsys.readouterr().out)
    tokenise_pairs(rows[1:2], tok, 8, 4, "truncate")
    assert tokenise_pairs(rows[1:2], tok, 8, 4, "truncate").n_responses_truncated == 0
    assert "responses over" not in capsys.readouterr().out


def test_small_dataset_repeats_with_a_notice(tok, capsys):
    rows = normalise_rows([ROW, ROW, ROW])
    tokenise_pairs(rows, tok, 16, 8, "truncate", pairs_per_step=8)
    assert ("[drorebel] notice: 3 pairs < 8 per step (batch_size x grad_accum): the same pairs "
            "repeat within a step (2.7 epochs per step)") in capsys.readouterr().out
    tokenise_pairs(rows, tok, 16, 8, "truncate", pairs_per_step=3)
    assert repeat_notice(4, 4, "pairs", "x") is None and "notice" not in capsys.readouterr().out


def test_rows_location_survives_normalise(tmp_path):
    p = _jsonl(tmp_path, ROW, ROW)
    rows = normalise_rows(load_rows(p))
    assert isinstance(rows, Rows) and (rows.source, rows.lines) == (p, [1, 2])
    assert all(isinstance(r, dict) for r in rows)


# ---- the online prompt file -----------------------------------------------------------------


def test_prompt_file_errors(tok, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "the cat"}\n{"prompt": "a dog", "prompt": "x"}\n')
    assert _err(load_prompts, str(p), tok, 8, "truncate").startswith(
        f"{p}, line 2: duplicate key 'prompt'")
    p.write_text('{"prompt": "the cat"}\n{"prompt": "a do')
    assert "line 2: invalid JSON" in _err(load_prompts, str(p), tok, 8, "truncate")
    p.write_text('{"prompt": "the cat"}\n\n{"prompt": ""}\n')
    assert _err(load_prompts, str(p), tok, 8, "truncate").startswith(
        f"{p}, line 3, row 1: field 'prompt' has no tokens")
    p.write_text("")
    assert "empty" in _err(load_prompts, str(p), tok, 8, "truncate")
    assert "`prompt_file`" in _err(load_prompts, str(tmp_path), tok, 8, "truncate",
                                   setting="prompt_file")
    c = tmp_path / "p.csv"
    c.write_text("prompt\nthe cat\n")
    assert "unsupported file type '.csv'" in _err(load_prompts, str(c), tok, 8, "truncate")


def test_prompt_columns_exact_and_unioned(tok, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "the cat", "bonus": 0.12345678901234567}\n'
                 '{"prompt": "a dog", "bonus": "high", "tag": 3}\n')
    ps = load_prompts(str(p), tok, 8, "truncate", rollout_batch_size=4)
    assert ps.columns == {"bonus": [0.12345678901234567, "high"], "tag": [None, 3]}
    assert "notice: 2 prompts < 4 per step (rollout_batch_size)" in capsys.readouterr().out


# ---- end to end through the CLI --------------------------------------------------------------


def _cli(tmp_path, capsys, **kw):
    from drorebel.cli import main

    cfg = base_overrides(str(tmp_path))
    cfg.update(kw)
    mc = "model_config={" + ", ".join(f"{k}: {v}" for k, v in cfg["model_config"].items()) + "}"
    args = ["train", mc] + [f"{k}={v}" for k, v in cfg.items() if k != "model_config"]
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def test_cli_malformed_line_is_one_line_exit_2(tmp_path, capsys):
    bad = _jsonl(tmp_path, *[ROW] * 5, tail='{"prompt": "a", \n')
    rc, lines = _cli(tmp_path, capsys, train_file=bad)
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"drorebel train: error: {bad}, line 6: invalid JSON")
    assert not (tmp_path / "run").exists()  # before the model loads


def test_cli_string_reward_and_online_prompt_file(tmp_path, capsys):
    bad = _jsonl(tmp_path, *[ROW] * 3, _row(reward_b="0.5"))
    rc, lines = _cli(tmp_path, capsys, train_file=bad)
    assert rc == 2 and lines == [f"drorebel train: error: {bad}, line 4, row 3: field "
                                 "'reward_b' must be a number, got '0.5'"]
    pf = tmp_path / "prompts.jsonl"
    pf.write_bytes(b'{"prompt": "the cat"}\n{"prompt": "\xff"}\n')
    rc, lines = _cli(tmp_path, capsys, mode="online", prompt_file=str(pf),
                     reward_fn="trainer_fixtures.online_rewards:good_fraction",
                     rollout_batch_size=4, max_new_tokens=4, train_file="null")
    assert rc == 2 and len(lines) == 1 and f"{pf}, line 2: not UTF-8" in lines[0]
