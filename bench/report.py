"""pytest-benchmark JSON -> markdown table for the ``linear_logps`` benchmarks.

Usage::

    python bench/report.py results.json [more.json ...] [-o table.md] > table.md
    python bench/report.py part1.json part2.json --merge-into all.json -o table.md

One row per (run, device, shape, provider) with the median forward and forward+backward
times, the forward+backward throughput (6·N·H·V FLOP, tokens/s), the peak memory beyond
the inputs (bench/memory.py) and the ratios against ``torch-materialised`` *from the same
JSON file* (speed: t_materialised / t_provider, > 1 is faster; memory: peak_provider /
peak_materialised). Only the standard library is used, so it runs anywhere.

Entries of the other suites get their own tables: ``test_bench_rebel_loss.py`` (group
``rebel-loss …``) and ``test_bench_train_step.py`` (``extra_info["bench"] == "train-step"``),
one row per provider with time, tokens/s, peak memory and the ratios against
``materialised-<same divergence>`` (else ``materialised-chi2``) and against ``liger-dpo`` of
the same run and shape. ``test_bench_wasserstein.py`` entries (group ``wasserstein …``) get
a table of time / ``plain-logps`` and speed and memory against ``materialised-double-bwd``;
``test_bench_max_batch.py`` entries (``mode == "max-batch"``) a table of the largest micro-batch
each provider fits under a memory cap and its tokens/s, against ``materialised-chi2``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "torch-materialised"
PROVIDER_ORDER = ["drorebel-fused", "drorebel-fused-cache", "drorebel-chunked",
                  "drorebel-chunked-cache", BASELINE, "torch-compile", "liger"]
MODES = ("fwd", "fwdbwd")


@dataclass
class Row:
    """Results of one provider at one shape in one run (times in seconds, memory in bytes)."""

    run: str
    device_name: str
    n: int
    h: int
    v: int
    dtype: str
    provider: str
    median_s: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int | None] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.run, self.device_name, self.n, self.h, self.v, self.dtype)

    @property
    def flop_fwdbwd(self) -> int:
        return 6 * self.n * self.h * self.v


def load_rows(path: str | Path) -> list[Row]:
    """Rows of one pytest-benchmark JSON (entries without our extra_info are ignored)."""
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    rows: dict[tuple, Row] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("mode") not in MODES or "provider" not in info or _suite(bench) != "linear":
            continue
        name = info.get("device_name") or machine.get("bench_device_name", "?")
        ident = (name, info["n"], info["h"], info["v"], info["dtype"], info["provider"])
        row = rows.setdefault(ident, Row(str(path), *ident))
        row.median_s[info["mode"]] = bench["stats"]["median"]
        row.peak_bytes[info["mode"]] = info.get("peak_mem_bytes")
    return list(rows.values())


def _suite(bench: dict) -> str:
    """The suite of an entry: ``train-step``, ``max-batch``, ``rebel-loss``, ``wasserstein`` or
    ``linear``."""
    info = bench.get("extra_info", {})
    if info.get("bench") == "train-step":
        return "max-batch" if info.get("mode") == "max-batch" else "train-step"
    group = str(bench.get("group") or "")
    for suite in ("rebel-loss", "wasserstein"):
        if group.startswith(suite):
            return suite
    return "linear"


def _order(row: Row) -> tuple:
    rank = PROVIDER_ORDER.index(row.provider) if row.provider in PROVIDER_ORDER else 99
    return (*row.key, rank, row.provider)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def _mb(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(num: float | None, den: float | None, fmt: str) -> str:
    if num is None or den is None or den == 0:
        return "–"
    return fmt.format(num / den)


def _cells(row: Row, base: Row | None) -> list[str]:
    fwd, fb = row.median_s.get("fwd"), row.median_s.get("fwdbwd")
    peak_f, peak_fb = row.peak_bytes.get("fwd"), row.peak_bytes.get("fwdbwd")
    base_fb = base.median_s.get("fwdbwd") if base else None
    base_peak = base.peak_bytes.get("fwdbwd") if base else None
    return [
        f"N={row.n} H={row.h} V={row.v}",
        row.dtype,
        row.provider,
        _ms(fwd),
        _ms(fb),
        "–" if fb is None else f"{row.flop_fwdbwd / fb / 1e12:.2f}",
        "–" if fb is None else f"{row.n / fb:,.0f}",
        _mb(peak_f),
        _mb(peak_fb),
        _ratio(base_fb, fb, "{:.2f}×"),
        _ratio(peak_fb, base_peak, "{:.1%}"),
        row.device_name,
    ]


HEADER = [
    "shape",
    "dtype",
    "provider",
    "fwd ms",
    "fwd+bwd ms",
    "TFLOP/s (fwd+bwd)",
    "tokens/s (fwd+bwd)",
    "peak MiB fwd",
    "peak MiB fwd+bwd",
    "speed vs materialised",
    "memory vs materialised",
    "device",
]


def render_markdown(rows: list[Row]) -> str:
    """Markdown table of ``rows``; ratios use the baseline row of the same run and shape."""
    baselines = {r.key: r for r in rows if r.provider == BASELINE}
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|"
        + "|".join("---" if i < 3 or i == len(HEADER) - 1 else "---:" for i in range(len(HEADER)))
        + "|",
    ]
    for row in sorted(rows, key=_order):
        lines.append("| " + " | ".join(_cells(row, baselines.get(row.key))) + " |")
    notes = (
        "\nTimes are medians over the benchmark rounds; TFLOP/s counts 6·N·H·V (LM-head matmuls). "
        "Peak memory is what the op allocates beyond its inputs (outputs and gradients included). "
        "Ratios compare with torch-materialised in the same run: speed = t_materialised / t, "
        "memory = peak / peak_materialised (fwd+bwd)."
    )
    return "\n".join(lines) + "\n" + notes + "\n"


# ------------------------------------------------------- rebel-loss and train-step tables
STEP_ORDER = [f"{kind}-{div}" for kind in ("drorebel-fused", "materialised")
              for div in ("none", "chi2", "kl")] + ["liger-dpo"]
LIGER = "liger-dpo"


@dataclass
class StepRow:
    """One provider at one shape of the rebel-loss or train-step suites (seconds, bytes)."""

    run: str
    device_name: str
    shape: str
    dtype: str
    provider: str
    n: int
    median_s: float
    peak_bytes: int | None = None
    static_bytes: int | None = None
    clock: str = "wall"

    @property
    def key(self) -> tuple:
        return (self.run, self.device_name, self.shape, self.dtype)


def _step_shape(info: dict, suite: str) -> str:
    if suite == "train-step":
        return f"{info.get('model', '?')} B={info['pairs']} T={info['t']} V={info['v']}"
    if suite == "wasserstein":
        return f"N={info['n']} H={info['h']} V={info['v']}"
    return f"B={info['b']} T={info['t']} H={info['h']} V={info['v']}"


def load_step_rows(path: str | Path, suite: str) -> list[StepRow]:
    """Rows of ``suite`` (rebel-loss, train-step, wasserstein) in one pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if _suite(bench) != suite or "provider" not in info or not bench.get("stats"):
            continue
        rows.append(StepRow(
            str(path), info.get("device_name") or machine.get("bench_device_name", "?"),
            _step_shape(info, suite), info.get("dtype", "?"), info["provider"], int(info["n"]),
            bench["stats"]["median"], info.get("peak_mem_bytes"), info.get("static_mem_bytes"),
            info.get("clock", "wall"),
        ))
    return rows


def step_baselines(row: StepRow, peers: dict[str, StepRow]) -> tuple[StepRow | None, ...]:
    """``(materialised, liger)`` rows to compare ``row`` with: ``materialised-<its divergence>``
    when measured, else the first ``materialised-*`` by name; ``liger-dpo``."""
    div = row.provider.rpartition("-")[2]
    mat = peers.get(f"materialised-{div}") or next(
        (peers[p] for p in sorted(peers) if p.startswith("materialised-")), None)
    return mat, peers.get(LIGER)


def _step_cells(row: StepRow, peers: dict[str, StepRow], train: bool) -> list[str]:
    mat, liger = step_baselines(row, peers)
    cells = [row.shape, row.dtype, row.provider, _ms(row.median_s),
             f"{row.n / row.median_s:,.0f}", _mb(row.peak_bytes)]
    if train:
        cells.append(_mb(row.static_bytes))
    for base in (mat, liger):
        cells.append(_ratio(base.median_s if base else None, row.median_s, "{:.2f}×"))
        cells.append(_ratio(row.peak_bytes, base.peak_bytes if base else None, "{:.1%}"))
    return [*cells, row.device_name]


def _step_order(row: StepRow) -> tuple:
    rank = STEP_ORDER.index(row.provider) if row.provider in STEP_ORDER else 99
    return (*row.key, rank, row.provider)


def render_step_markdown(rows: list[StepRow], train: bool) -> str:
    """Markdown table of rebel-loss (``train=False``) or train-step rows with their ratios."""
    by_key: dict[tuple, dict[str, StepRow]] = {}
    for row in rows:
        by_key.setdefault(row.key, {})[row.provider] = row
    header = ["shape", "dtype", "provider", "step ms" if train else "fwd+bwd ms", "tokens/s",
              "peak MiB"] + (["static MiB"] if train else [])
    header += ["speed vs materialised", "memory vs materialised", "speed vs Liger",
               "memory vs Liger", "device"]
    align = ["---" if i < 3 or i == len(header) - 1 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in sorted(rows, key=_step_order):
        lines.append("| " + " | ".join(_step_cells(row, by_key[row.key], train)) + " |")
    what = ("one training step: model forward, loss, backward, AdamW step; tokens = 2·B·T "
            "through the model. Peak = bytes allocated in the step beyond the parameters and "
            "optimiser state (static MiB)" if train else
            "loss forward + backward from hidden states; tokens = 2·B·T. Peak = bytes allocated "
            "beyond the inputs")
    notes = (f"\nMedians over the rounds; {what}. Speed = t_baseline / t (> 1: faster), memory = "
             "peak / peak_baseline; baselines from the same run and shape: materialised logits "
             "with the same divergence, and Liger's chunked DPO loss (DPO, not REBEL).")
    if any(r.clock == "process" for r in rows):
        notes += (" Times are CPU seconds of the benchmark process (`--clock process`, "
                  "interleaved rounds), not wall time: the work done, whatever the machine's load.")
    return "\n".join(lines) + "\n" + notes + "\n"


WASSERSTEIN_PLAIN = "plain-logps"
WASSERSTEIN_ORACLE = "materialised-double-bwd"


def render_wasserstein_markdown(rows: list[StepRow]) -> str:
    """Wasserstein penalty table: time / plain ``linear_logps`` fwd+bwd (docs/design.md §4 target
    ≤ 3×) and speed and memory against the materialised double-backward oracle."""
    by_key: dict[tuple, dict[str, StepRow]] = {}
    for row in rows:
        by_key.setdefault(row.key, {})[row.provider] = row
    header = ["shape", "dtype", "provider", "fwd+bwd ms", "peak MiB", "time / plain-logps",
              "speed vs double-bwd", "memory vs double-bwd", "device"]
    align = ["---" if i < 3 or i == len(header) - 1 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in sorted(rows, key=lambda r: (*r.key, r.provider)):
        plain = by_key[row.key].get(WASSERSTEIN_PLAIN)
        oracle = by_key[row.key].get(WASSERSTEIN_ORACLE)
        cells = [row.shape, row.dtype, row.provider, _ms(row.median_s), _mb(row.peak_bytes),
                 _ratio(row.median_s, plain.median_s if plain else None, "{:.2f}×"),
                 _ratio(oracle.median_s if oracle else None, row.median_s, "{:.2f}×"),
                 _ratio(row.peak_bytes, oracle.peak_bytes if oracle else None, "{:.1%}"),
                 row.device_name]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nMedians over the rounds; loss forward + backward. time / plain-logps = t / "
             "t_plain (the docs/design.md §4 target is ≤ 3×); speed vs double-bwd = "
             "t_oracle / t; memory = peak / peak_oracle; all from the same run and shape.")
    return "\n".join(lines) + "\n" + notes + "\n"


MAX_BATCH_BASELINE = "materialised-chi2"


@dataclass
class CapRow:
    """One provider's largest micro-batch under a memory cap and the step time there."""

    run: str
    device_name: str
    shape: str
    cap_bytes: int
    provider: str
    pairs: int
    n: int
    median_s: float | None
    total_bytes: int | None
    at_limit: bool = False  # B* is the search's upper limit: more pairs may fit

    @property
    def key(self) -> tuple:
        return (self.run, self.device_name, self.shape, self.cap_bytes)

    @property
    def tokens_per_s(self) -> float | None:
        return self.n / self.median_s if self.median_s else None


def load_cap_rows(path: str | Path) -> list[CapRow]:
    """``max-batch`` entries (bench/test_bench_max_batch.py) of one pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if _suite(bench) != "max-batch" or "provider" not in info:
            continue
        stats = bench.get("stats") or {}
        peak, static = info.get("peak_mem_bytes"), info.get("static_mem_bytes")
        rows.append(CapRow(
            str(path), info.get("device_name") or machine.get("bench_device_name", "?"),
            f"{info.get('model', '?')} T={info['t']} V={info['v']} {info.get('dtype', '?')}",
            int(info["cap_bytes"]), info["provider"], int(info["pairs"]), int(info["n"]),
            stats.get("median"), None if peak is None or static is None else peak + static,
            int(info["pairs"]) == info.get("b_max")))
    return rows


def render_cap_markdown(rows: list[CapRow]) -> str:
    """Largest micro-batch table: pairs that fit under the cap, tokens/s at that micro-batch,
    and both as ratios to ``materialised-chi2`` of the same run, shape and cap."""
    base = {r.key: r for r in rows if r.provider == MAX_BATCH_BASELINE}
    header = ["shape", "cap GiB", "provider", "pairs", "step ms", "tokens/s", "used GiB",
              "pairs vs materialised", "tokens/s vs materialised", "device"]
    align = ["---" if i < 3 or i == len(header) - 1 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    order = {p: i for i, p in enumerate(STEP_ORDER)}
    for row in sorted(rows, key=lambda r: (*r.key, order.get(r.provider, 99), r.provider)):
        b = base.get(row.key)
        tps = row.tokens_per_s
        cells = [row.shape, f"{row.cap_bytes / 2**30:g}", row.provider,
                 f"≥ {row.pairs}" if row.at_limit else str(row.pairs),
                 _ms(row.median_s), "–" if tps is None else f"{tps:,.0f}",
                 "–" if row.total_bytes is None else f"{row.total_bytes / 2**30:.2f}",
                 _ratio(row.pairs, b.pairs if b else None, "{:.2f}×"),
                 _ratio(tps, b.tokens_per_s if b else None, "{:.2f}×"), row.device_name]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nPairs = the largest micro-batch (pairs of two T-token sequences) whose training "
             "step (gradient checkpointing on, AdamW) stays under the cap, found by measuring "
             "the step's memory and verified at the boundary; used = parameters + AdamW state + "
             "the step's peak at that micro-batch; tokens/s = 2·pairs·T / median step time. "
             "Ratios against materialised-chi2 of the same run, shape and cap; ≥ B: the "
             "search's upper limit B fits, more pairs may.")
    return "\n".join(lines) + "\n" + notes + "\n"


def _sources(paths: list[str]) -> str:
    out = []
    for path in paths:
        machine = json.loads(Path(path).read_text()).get("machine_info", {})
        libs = ", ".join(f"{k} {machine[k]}" for k in ("torch", "triton", "cuda") if k in machine)
        out.append(f"- `{path}`: {machine.get('bench_device_name', '?')}; {libs}")
    return "\n".join(out)


def merge_json(paths: list[str], target: str | Path) -> None:
    """Concatenate the ``benchmarks`` of several JSONs of one machine into ``target``
    (machine/commit info from the first file; missing or unreadable files are skipped)."""
    merged: dict | None = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report.py: skipping {path}: {exc}", file=sys.stderr)
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    Path(target).write_text(json.dumps(merged or {"benchmarks": []}, indent=2))


def render_report(paths: list[str]) -> str:
    """The markdown report of the JSON files: one section per suite that has results."""
    rows = [row for path in paths for row in load_rows(path)]
    rebel = [row for path in paths for row in load_step_rows(path, "rebel-loss")]
    train = [row for path in paths for row in load_step_rows(path, "train-step")]
    wass = [row for path in paths for row in load_step_rows(path, "wasserstein")]
    caps = [row for path in paths for row in load_cap_rows(path)]
    text = "## Benchmarks\n\n" + _sources(paths) + "\n"
    if rows or not (rebel or train or wass or caps):
        text += "\n### linear_logps\n\n" + render_markdown(rows)
    if rebel:
        text += "\n### REBEL loss (forward + backward)\n\n" + render_step_markdown(rebel, False)
    if train:
        text += "\n### Training step\n\n" + render_step_markdown(train, True)
    if caps:
        text += ("\n### Largest micro-batch under a memory cap\n\n"
                 + render_cap_markdown(caps))
    if wass:
        text += "\n### Wasserstein penalty\n\n" + render_wasserstein_markdown(wass)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    parser.add_argument("--merge-into", help="first merge the JSONs into this file, report it")
    args = parser.parse_args(argv)
    if args.merge_into:
        merge_json(args.json, args.merge_into)
        args.json = [args.merge_into]
    text = render_report(args.json)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
