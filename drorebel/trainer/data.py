"""Offline pair data: load, normalise, validate and tokenise.

Files (:func:`load_rows`): JSON Lines (``.jsonl``: one object per line), JSON (``.json``: a
list of row objects, or JSON Lines), either optionally compressed (``.gz``, ``.bz2``, ``.xz``),
Parquet (``.parquet``, read with pyarrow), a directory written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (the split ``split``, default
``train``), a local directory of such data files laid out as ``datasets.load_dataset(path)``
reads it (``train.jsonl``, ``data/train-00000-of-00002.parquet``, ...: the files of the
split, each read as above), or a Hugging Face Hub dataset name (``owner/name``, tried only when
no such local path exists; read with ``datasets.load_dataset``). ``column_map``
(``{canonical_name: column_in_file}``) renames columns as they are read. JSON is read with
Python's :mod:`json`, not ``datasets``: every value keeps its exact type and float64 precision
(``datasets`` re-encodes a mixed-type column through pandas' ujson with 10 significant
digits), and a malformed line, a duplicate key, non-UTF-8 bytes, an empty file or an
unsupported format is a :class:`DataError` naming the file and line.

Accepted rows:

- ``prompt, response_a, response_b, reward_a, reward_b``, or
- TRL style ``prompt, chosen, rejected, chosen_reward, rejected_reward`` (one naming per row:
  a row giving both ``chosen`` and ``response_a`` is an error),

where texts are strings or chat messages (lists of ``{"role", "content"}``, rendered with the
tokenizer's chat template), rewards are finite numbers (not booleans, not strings), and
optional cached reference log-probs ``ref_logp_a, ref_logp_b`` (both or neither, in every row
or in none; a log-probability is <= 0). Every problem is reported before training as one line
naming the file, line, row and field.

Group-level DRO (``dro_over: groups``; :func:`normalise_rows` / :func:`tokenise_pairs` with
``groups=True``): every row needs a ``group``, an integer or a non-empty string (one kind per
file; booleans and floats are refused). Integers are the group ids as given; strings are
numbered 0, 1, 2, ... in the order of their first appearance in the data (rows in file order,
dropped rows included), so the ids are stable for a given file. Only equality of ids matters
to the loss. Without ``groups=True`` the column is ignored.

An empty prompt is an error, not a silent change: a causal LM predicts token ``t`` from the
tokens before it, so the first response token of a prompt without tokens would never be
scored (a tokenizer that adds a BOS token gives every prompt at least one token). Responses
longer than ``max_length`` minus their prompt are cut (losing their EOS); they are counted
(:attr:`PairBatchData.n_responses_truncated`) and the count is printed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from drorebel.trainer.config import TRL_COLUMNS, hub_dataset_name
from drorebel.trainer.errors import DataError

__all__ = ["DataError", "PairBatchData", "Rows", "SUPPORTED_FORMATS", "load_rows",
           "apply_column_map", "normalise_rows", "tokenise_pairs", "row_location", "notice",
           "repeat_notice", "group_ids"]

_TRL = TRL_COLUMNS  # {"chosen": "response_a", ...}: TRL names → ours
_REQUIRED = ("prompt", "response_a", "response_b", "reward_a", "reward_b")
_REF = ("ref_logp_a", "ref_logp_b")
_COMPRESSED = (".gz", ".bz2", ".xz")
SUPPORTED_FORMATS = ("JSON Lines (.jsonl), JSON (.json: a list of objects or one object per "
                     "line), either optionally .gz/.bz2/.xz, Parquet (.parquet), a "
                     "datasets.save_to_disk directory, a directory of such files or a Hugging "
                     "Face Hub dataset name")


@dataclass
class PairBatchData:
    """Tokenised pairs: ``ids_*``/``labels_*`` are ``[n, T]`` (labels −100 on prompt/padding).

    ``n_truncated``/``n_dropped``: rows whose prompt was over ``max_prompt_length``;
    ``n_responses_truncated``: responses (a and b counted apart) cut to fit ``max_length``.
    """

    ids_a: torch.Tensor
    labels_a: torch.Tensor
    mask_a: torch.Tensor
    ids_b: torch.Tensor
    labels_b: torch.Tensor
    mask_b: torch.Tensor
    rewards_a: torch.Tensor
    rewards_b: torch.Tensor
    ref_a: torch.Tensor | None
    ref_b: torch.Tensor | None
    n_truncated: int
    n_dropped: int
    kept: list[int] = field(default_factory=list)  # source row of each pair
    n_responses_truncated: int = 0
    groups: torch.Tensor | None = None  # [n] int64 group ids (dro_over=groups), else None

    def __len__(self) -> int:
        return self.ids_a.shape[0]


class Rows(list):
    """The rows of a data file (a list of dicts) plus where they came from: ``source`` (the
    path) and ``lines`` (the 1-based line of each row in a JSON Lines file, else None), so that
    a content error names ``FILE, line N, row I``; a plain list gives ``row I`` only. Rows read
    from several files (a data directory) carry ``locations``: each row's ``FILE[, line N]``."""

    def __init__(self, items: Any = (), source: str | None = None,
                 lines: list[int] | None = None, locations: list[str] | None = None) -> None:
        super().__init__(items)
        self.source, self.lines, self.locations = source, lines, locations


def row_location(rows: Any, i: int) -> str:
    """``"FILE, line N, row I"`` (JSON Lines), ``"FILE, row I"`` or ``"row I"`` (rows 0-based)."""
    locations = getattr(rows, "locations", None)
    if locations is not None and i < len(locations):
        return f"{locations[i]}, row {i}"
    source = getattr(rows, "source", None)
    if source is None:
        return f"row {i}"
    lines = getattr(rows, "lines", None)
    if lines is not None and i < len(lines):
        return f"{source}, line {lines[i]}, row {i}"
    return f"{source}, row {i}"


def notice(message: str) -> None:
    """Print ``[drorebel] message`` once (rank 0 of a launcher, or a single process)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[drorebel] {message}", flush=True)


def repeat_notice(n: int, per_step: int, what: str, setting: str) -> str | None:
    """Print and return a one-line notice when ``n`` items are fewer than the ``per_step`` a
    step takes: items then repeat within a step (legitimate, as epochs are, but made visible).
    ``setting`` names where ``per_step`` comes from (e.g. ``"batch_size x grad_accum"``)."""
    if n >= per_step:
        return None
    message = (f"notice: {n} {what} < {per_step} per step ({setting}): the same {what} repeat "
               f"within a step ({per_step / n:.2g} epochs per step)")
    notice(message)
    return message


# ---- reading files ---------------------------------------------------------------------------


def load_rows(path: str, setting: str | None = None, split: str | None = None,
              column_map: dict[str, str] | None = None) -> Rows:
    """Read a data file, dataset directory or hub dataset into a list of dicts (formats: the
    module docstring).

    :class:`DataError` (one line, naming the file and line) for a directory that is neither a
    ``save_to_disk`` dataset nor a directory of supported data files, an unsupported extension,
    an unreadable file, non-UTF-8 bytes, invalid JSON, a duplicate key in an object, a line
    that is not an object, an empty file or one of blank lines only, a split the dataset does
    not have, a hub dataset that cannot be loaded, a ``column_map`` column the data lacks.
    ``setting`` (e.g. ``"train_file"``) names the config field in the messages about the path
    itself (its split setting is ``train_split`` / ``prompt_split``); ``split`` (None:
    ``train``) picks the split of a dataset that has several.
    """
    path = os.fspath(path)
    label = f"`{setting}`: {path}" if setting else path
    if os.path.isdir(path):
        rows = _load_dir(path, label, split, setting)
    elif not os.path.exists(path):
        if not hub_dataset_name(path):
            raise DataError(f"{label}: no such file")
        rows = _load_hub(path, label, split, setting)
    else:
        if split not in (None, "train"):
            raise DataError(f"{_split_label(setting, split)}: {path} is a single file, which "
                            "has one split only (train); splits come from a save_to_disk "
                            "DatasetDict, a data directory or a hub dataset")
        rows = _load_file(path, label)
    return apply_column_map(rows, column_map, setting) if column_map else rows


def _load_file(path: str, label: str) -> Rows:
    lower = path.lower()
    base = next((lower[: -len(c)] for c in _COMPRESSED if lower.endswith(c)), lower)
    if lower.endswith(".parquet"):
        return _load_parquet(path)
    if base.endswith((".jsonl", ".json")):
        return _load_json(path, document=base.endswith(".json"))
    ext = "".join(os.path.splitext(os.path.basename(path))[1:]) or "(none)"
    raise DataError(f"{label}: unsupported file type {ext!r}; the supported formats are "
                    f"{SUPPORTED_FORMATS}")


def _split_label(setting: str | None, split: str | None) -> str:
    name = setting.replace("_file", "_split") if setting else "split"
    return f"`{name}`={split or 'train'!r}"


def _file_kind(path: str) -> str | None:
    """``jsonl`` / ``json`` / ``parquet`` (a compressed JSON file as its JSON kind), else None."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    base = next((lower[: -len(c)] for c in _COMPRESSED if lower.endswith(c)), lower)
    return next((k for k in ("jsonl", "json") if base.endswith("." + k)), None)


def _load_dir(path: str, label: str, split: str | None, setting: str | None) -> Rows:
    """A ``save_to_disk`` directory, or a directory of data files with ``datasets``' layout
    conventions (split names in file or folder names; otherwise every file is ``train``);
    the split's files must all be of one supported kind and are read with this module's
    readers (exact values; errors name the file and line)."""
    if any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        return _load_saved(path, label, split, setting)
    from datasets.data_files import DataFilesList, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(path)
    except EmptyDatasetError:
        raise DataError(f"{label}: is a directory, not a data file: it holds no data files and "
                        f"is not a save_to_disk dataset; the supported formats are "
                        f"{SUPPORTED_FORMATS}") from None
    want = split or "train"
    splits = {str(k): v for k, v in patterns.items()}
    if want not in splits:
        raise DataError(f"{_split_label(setting, split)}: the data directory {path} has the "
                        f"split(s) {sorted(splits)}")
    files = sorted(str(f) for f in DataFilesList.from_patterns(splits[want], base_path=path))
    rel = [os.path.relpath(f, path) for f in files]
    kinds = [_file_kind(f) for f in files]
    if None in kinds:
        odd = rel[kinds.index(None)]
        raise DataError(f"{label}: a directory of data files, but {odd!r} (split {want!r}) is "
                        "not a supported data file (.jsonl, .json, .parquet; JSON optionally "
                        ".gz/.bz2/.xz); point the setting at the data file or a folder of data "
                        "files only")
    if len(set(kinds)) > 1:
        by_kind = {k: rel[kinds.index(k)] for k in kinds}
        raise DataError(f"{label}: the directory's split {want!r} mixes file kinds ("
                        f"{', '.join(f'{k}: {f}' for k, f in sorted(by_kind.items()))}); one "
                        "split's files must be of one kind")
    try:
        parts = [load_rows(f) for f in files]
    except DataError as err:  # the file's own message (file, line), under the setting's name
        raise DataError(f"`{setting}`: {err}" if setting else str(err)) from None
    if len(parts) == 1:
        return parts[0]
    rows: list[dict[str, Any]] = []
    locations: list[str] = []
    for part in parts:
        for i in range(len(part)):
            line = part.lines[i] if part.lines is not None else None
            locations.append(f"{part.source}, line {line}" if line else f"{part.source}")
        rows.extend(part)
    return Rows(rows, source=path, locations=locations)


def _load_hub(name: str, label: str, split: str | None, setting: str | None) -> Rows:
    """``datasets.load_dataset(name, split=split)``; any failure (no network, no such dataset
    or split) is one line naming the setting."""
    import datasets

    want = split or "train"
    try:
        ds = datasets.load_dataset(name, split=want)
    except Exception as err:  # noqa: BLE001 - network, hub and builder errors of many kinds
        raise DataError(f"{label}: no such local file or directory, and loading it as a "
                        f"Hugging Face Hub dataset ({_split_label(setting, split)}) failed: "
                        f"{_first_line(err)}") from None
    if len(ds) == 0:
        raise DataError(f"{label}: the hub dataset's split {want!r} has no rows")
    return Rows(ds.to_list(), source=name)


def apply_column_map(rows: Rows, column_map: dict[str, str], setting: str | None = None
                     ) -> Rows:
    """Rows with the columns of ``column_map`` (``{canonical_name: column_in_file}``) renamed
    to their canonical names. A mapped column that no row has, or a row that also holds the
    canonical name as another column (which one would be meant?), is a :class:`DataError`; a
    row lacking a mapped column keeps the field missing (reported by the row checks)."""
    where = getattr(rows, "source", None) or "the dataset"
    label = f"`{setting}`: {where}" if setting else where
    present = {k for row in rows if isinstance(row, dict) for k in row}
    for name, column in column_map.items():
        if column not in present:
            raise DataError(f"{label}: `column_map` maps {name!r} to column {column!r}, which the "
                            f"data does not have (columns: {sorted(present)})")
        if name != column and name in present and name not in column_map.values():
            raise DataError(f"{label}: `column_map` maps {name!r} to column {column!r}, but the "
                            f"data also has a column {name!r}; rename or drop one of them")
    rename = {column: name for name, column in column_map.items()}
    out = [{rename.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row
           for row in rows]
    return Rows(out, source=getattr(rows, "source", None), lines=getattr(rows, "lines", None),
                locations=getattr(rows, "locations", None))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_bytes(path: str) -> bytes:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(
        os.path.splitext(path.lower())[1], open)
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path}: cannot read the file ({_first_line(err)})") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice (``json`` would keep the last one)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _load_json(path: str, document: bool) -> Rows:
    data = _read_bytes(path)
    if not data:
        raise DataError(f"{path}: the file is empty (no rows)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at byte "
                        f"offset {err.start}); save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    if not text.strip():
        raise DataError(f"{path}: the file has only blank lines (no rows)")
    head = text.lstrip()
    if document and (head.startswith("[") or (head.startswith("{") and "\n" in text.strip())):
        rows = _load_document(path, text)
        if rows is not None:
            return rows
    return _load_lines(path, text)


def _load_lines(path: str, text: str) -> Rows:
    """JSON Lines: one object per non-blank line."""
    rows, lines = [], []
    physical = text.split("\n")  # not splitlines(): U+2028 may sit unescaped inside a string
    for n, line in enumerate(physical, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as err:
            raise DataError(f"{path}, line {n}: duplicate key {err.key!r} in a JSON object "
                            "(a reader would keep only one of the values); give it once") from None
        except json.JSONDecodeError as err:
            cut = ("; the last line has no newline: was the file cut short?"
                   if n == len(physical) and not text.endswith("\n") else "")
            raise DataError(f"{path}, line {n}: invalid JSON at column {err.colno}: "
                            f"{err.msg.removesuffix(' starting at')}{cut}") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}, line {n}: invalid JSON ({_first_line(err)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object per line, got "
                            f"{_json_type(obj)}")
        rows.append(obj)
        lines.append(n)
    return Rows(rows, source=path, lines=lines)


def _load_document(path: str, text: str) -> Rows | None:
    """A ``.json`` document: an array of row objects, or one object of equal-length columns.
    None: not one document (then the file is read as JSON Lines)."""
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        key, line = _locate_duplicate(text)
        raise DataError(f"{path}, line {line}: duplicate key {key!r} in a JSON object "
                        "(a reader would keep only one of the values); give it once") from None
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("["):
            return None
        cut = ("; the file ends early: was it cut short?"
               if err.pos >= len(text.rstrip()) else "")
        raise DataError(f"{path}, line {err.lineno}: invalid JSON at column {err.colno}: "
                        f"{err.msg.removesuffix(' starting at')}{cut}") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: invalid JSON ({_first_line(err)})") from None
    if isinstance(doc, dict):
        cols = list(doc.values())
        if not cols or not all(isinstance(c, list) and len(c) == len(cols[0]) for c in cols):
            raise DataError(f"{path}: one JSON object over several lines; a .json file holds an "
                            "array of row objects, one object per line, or an object of "
                            "equal-length column arrays")
        doc = [dict(zip(doc, values)) for values in zip(*cols)]
    if not doc:
        raise DataError(f"{path}: the JSON document holds no rows")
    for i, obj in enumerate(doc):
        if not isinstance(obj, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {_json_type(obj)}")
    return Rows(doc, source=path)


def _locate_duplicate(text: str) -> tuple[str, int]:
    """(key, line) of the first duplicate key of a JSON document (the pure-Python scanner,
    which knows where each object starts; only run once a duplicate is known to exist)."""
    import re
    from json import decoder, scanner

    found: list[tuple[str, int]] = []

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None,
                     _w=decoder.WHITESPACE.match, _ws=decoder.WHITESPACE_STR):
        s, start = s_and_end
        pairs, end = decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo, _w, _ws)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not found:
                hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:",
                                                       s[start:end])]
                at = start + (hits[1] if len(hits) > 1 else 0)
                found.append((key, s.count("\n", 0, at) + 1))
            seen.add(key)
        return dict(pairs), end

    dec = json.JSONDecoder()
    dec.parse_object = parse_object
    dec.scan_once = scanner.py_make_scanner(dec)
    try:
        dec.decode(text)
    except (ValueError, RecursionError):
        pass
    return found[0] if found else ("?", 1)


def _load_parquet(path: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
    names = table.column_names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: duplicate column(s) {dup}")
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    return Rows(table.to_pylist(), source=path)


def _load_saved(path: str, label: str, split: str | None = None, setting: str | None = None
                ) -> Rows:
    """A ``datasets`` ``save_to_disk`` directory (a ``DatasetDict``: its split ``split``,
    default ``train``)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path, keep_in_memory=True)
    except (OSError, ValueError) as err:
        raise DataError(f"{label}: cannot load the save_to_disk dataset "
                        f"({_first_line(err)})") from None
    want = split or "train"
    if isinstance(ds, datasets.DatasetDict):
        if want not in ds:
            raise DataError(f"{_split_label(setting, split)}: the DatasetDict at {path} has the "
                            f"split(s) {sorted(ds)}")
        ds = ds[want]
    elif want != "train":
        raise DataError(f"{_split_label(setting, split)}: {path} is a single save_to_disk "
                        "Dataset (no splits; it is the train split)")
    if len(ds) == 0:
        raise DataError(f"{label}: the dataset has no rows")
    return Rows(ds.to_list(), source=path)


# ---- checking rows ---------------------------------------------------------------------------


def normalise_rows(rows: list[dict[str, Any]], groups: bool = False) -> Rows:
    """Map TRL names to ours and check every field; :class:`DataError` on the first bad one.

    The result keeps the location of ``rows`` (a :class:`Rows` from :func:`load_rows`), so
    later errors still name the file and line. ``groups``: every row needs a ``group`` (an
    integer or a non-empty string, one kind per file; ``dro_over: groups``).
    """
    if not rows:
        where = getattr(rows, "source", None)
        raise DataError(f"{where}: the dataset is empty" if where else "the dataset is empty")
    out = Rows(source=getattr(rows, "source", None), lines=getattr(rows, "lines", None),
               locations=getattr(rows, "locations", None))
    with_ref = without_ref = None  # first row with / without the cached reference columns
    for i, raw in enumerate(rows):
        where = row_location(rows, i)
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object of fields, got {type(raw).__name__}")
        row = _rename(raw, where)
        missing = [k for k in _REQUIRED if row.get(k) is None]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} (have {sorted(row)})")
        for key in ("prompt", "response_a", "response_b"):
            _check_text(where, key, row[key], allow_empty=key == "prompt")
        for key in ("reward_a", "reward_b"):
            _check_number(where, key, row[key])
        given = [k for k in _REF if row.get(k) is not None]
        if len(given) == 1:
            other = _REF[1 - _REF.index(given[0])]
            raise DataError(f"{where}: field '{given[0]}' is given without '{other}' (cached "
                            "reference log-probs come in pairs: give both or neither)")
        for key in given:
            _check_number(where, key, row[key])
            if row[key] > 0:
                raise DataError(f"{where}: field '{key}' must be <= 0 (a log-probability), "
                                f"got {row[key]!r}")
        if given and with_ref is None:
            with_ref = i
        if not given and without_ref is None:
            without_ref = i
        if groups:
            _check_group(where, row.get("group"))
        out.append(row)
    if with_ref is not None and without_ref is not None:
        raise DataError(f"{row_location(rows, without_ref)}: ref_logp_a/ref_logp_b missing, but "
                        f"row {with_ref} has them (give them in every row or in none)")
    if groups:
        kinds = [isinstance(r["group"], str) for r in out]
        if any(kinds) and not all(kinds):
            i = kinds.index(not kinds[0])
            kind = ("an integer", "a string")
            raise DataError(f"{row_location(rows, i)}: field 'group' is {kind[kinds[i]]} "
                            f"({_short(out[i]['group'])}) but row 0 has {kind[kinds[0]]}; give "
                            "every group as an integer or every group as a string")
    return out


_INT64 = (-(2**63), 2**63 - 1)


def _check_group(where: str, value: Any) -> None:
    """A pair's group (``dro_over: groups``): an integer (int64) or a non-empty string."""
    need = "dro_over=groups needs a group per pair: an integer or a non-empty string"
    if value is None:
        raise DataError(f"{where}: field 'group' is missing ({need})")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'group' is empty ({need})")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field 'group' must be an integer or a non-empty string, got "
                        f"{_short(value)}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise DataError(f"{where}: field 'group' {value} does not fit in int64")


def group_ids(rows: list[dict[str, Any]]) -> list[int]:
    """The group id of every row: integers as given, strings numbered by first appearance."""
    first: dict[Any, int] = {}
    out = []
    for row in rows:
        g = row["group"]
        if isinstance(g, str):
            g = first.setdefault(g, len(first))
        out.append(int(g))
    return out


def _rename(row: dict[str, Any], where: str) -> dict[str, Any]:
    """TRL names to ours; a row giving both names of one field is an error (a null counts as
    not given, so a column that is null in this row never overrides the other name)."""
    for trl, ours in _TRL.items():
        if row.get(trl) is not None and row.get(ours) is not None:
            raise DataError(f"{where}: both '{trl}' (TRL name) and '{ours}' are given; keep one "
                            "naming (prompt/chosen/rejected/chosen_reward/rejected_reward or "
                            "prompt/response_a/response_b/reward_a/reward_b)")
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = _TRL.get(key, key)
        if value is not None or name not in out:
            out[name] = value
    return out


def _check_text(where: str, key: str, value: Any, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(f"{where}: field '{key}' is empty")
        return
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DataError(f"{where}: field '{key}' must be a string or chat messages (a list of "
                        f"{{'role', 'content'}}), got {_short(value)}")
    if not allow_empty and not any(m["content"].strip() for m in value):
        raise DataError(f"{where}: field '{key}' is empty")


def _check_number(where: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field '{key}' must be a number, got {_short(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        raise DataError(f"{where}: field '{key}' is not finite ({_short(value)})")


# ---- tokenising ------------------------------------------------------------------------------


def _encode(tokenizer: Any, prompt: Any, response: Any, where: str
            ) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (chat: template split at the prompt)."""
    if isinstance(prompt, str) and isinstance(response, str):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return list(p), list(r) + ([eos] if eos is not None else [])
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    r_msgs = (response if isinstance(response, list)
              else [{"role": "assistant", "content": response}])
    p = _ids(tokenizer.apply_chat_template(p_msgs, tokenize=True, add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=True))
    if full[: len(p)] != p:
        raise DataError(f"{where}: the chat template does not extend the prompt; cannot split "
                        "the response")
    return p, full[len(p):]


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def tokenise_pairs(rows: list[dict[str, Any]], tokenizer: Any, max_length: int,
                   max_prompt_length: int, overlong: str,
                   pairs_per_step: int | None = None, groups: bool = False) -> PairBatchData:
    """Tokenise normalised rows into padded tensors; over-long prompts truncated (left) or dropped.

    A prompt without tokens is an error (its first response token could not be predicted).
    Responses are cut to ``max_length − len(prompt)`` (a cut response loses its EOS); the cut
    ones are counted in ``n_responses_truncated`` and the count is printed. A response left
    without tokens is an error. With ``pairs_per_step`` (``batch_size x grad_accum``), fewer
    kept pairs than that prints a notice (:func:`repeat_notice`). ``groups``: also the
    ``[n]`` int64 group ids of the kept pairs (:func:`group_ids` over all rows; rows checked by
    :func:`normalise_rows` with ``groups=True``).
    """
    seqs: list[tuple[list[int], list[int], list[int]]] = []
    keep, kept_idx, n_trunc, n_drop, n_resp = [], [], 0, 0, 0
    for i, row in enumerate(rows):
        where = row_location(rows, i)
        p, ra = _encode(tokenizer, row["prompt"], row["response_a"], where)
        _, rb = _encode(tokenizer, row["prompt"], row["response_b"], where)
        if not p:
            raise DataError(f"{where}: field 'prompt' has no tokens, so the first response token "
                            "could not be predicted (a causal LM scores token t from the tokens "
                            "before it); give a non-empty prompt or a tokenizer that adds BOS")
        if len(p) > max_prompt_length:
            if overlong == "drop":
                n_drop += 1
                continue
            p, n_trunc = p[-max_prompt_length:], n_trunc + 1
        for key, r in (("response_a", ra), ("response_b", rb)):
            if not r:
                raise DataError(f"{where}: field '{key}' has no tokens")
        room = max_length - len(p)
        n_resp += (len(ra) > room) + (len(rb) > room)
        seqs.append((p, ra[:room], rb[:room]))
        keep.append(row)
        kept_idx.append(i)
    if not keep:
        raise DataError(f"all {len(rows)} rows were dropped (prompt longer than max_prompt_length)")
    if n_resp:
        notice(f"responses over max_length={max_length} minus their prompt: {n_resp} of "
               f"{2 * len(keep)} cut (a cut response loses its EOS)")
    if pairs_per_step is not None:
        repeat_notice(len(keep), pairs_per_step, "pairs", "batch_size x grad_accum")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_a, lab_a, m_a = _pad([(p, ra) for p, ra, _ in seqs], pad)
    ids_b, lab_b, m_b = _pad([(p, rb) for p, _, rb in seqs], pad)
    f64 = torch.float64
    has_ref = keep[0].get("ref_logp_a") is not None
    gids = torch.tensor(group_ids(rows), dtype=torch.long)[kept_idx] if groups else None
    return PairBatchData(
        ids_a, lab_a, m_a, ids_b, lab_b, m_b,
        torch.tensor([r["reward_a"] for r in keep], dtype=f64),
        torch.tensor([r["reward_b"] for r in keep], dtype=f64),
        torch.tensor([r["ref_logp_a"] for r in keep], dtype=f64) if has_ref else None,
        torch.tensor([r["ref_logp_b"] for r in keep], dtype=f64) if has_ref else None,
        n_trunc, n_drop, kept_idx, n_resp, gids,
    )


def _pad(pairs: list[tuple[list[int], list[int]]], pad: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt+response; labels are the response tokens, −100 elsewhere."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[j, :n] = torch.tensor(p + r)
        labels[j, len(p):n] = torch.tensor(r)
        mask[j, :n] = 1
    return ids, labels, mask
