"""pytest-benchmark JSON -> markdown table for the ``linear_logprobs`` benchmarks.

Usage::

    python bench/report.py results.json [more.json ...] [-o table.md] > table.md
    python bench/report.py part1.json part2.json --merge-into all.json -o table.md

One row per (run, device, shape, provider) with the median forward and forward+backward
times, the forward+backward throughput (6·N·H·V FLOP, tokens/s), the peak memory beyond
the inputs (bench/memory.py) and the ratios against ``torch-materialised`` *from the same
JSON file* (speed: t_materialised / t_provider, > 1 is faster; memory: peak_provider /
peak_materialised). Only the standard library is used, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "torch-materialised"
PROVIDER_ORDER = ["drorebel-fused", "drorebel-chunked", BASELINE, "torch-compile", "liger"]
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
        if info.get("mode") not in MODES or "provider" not in info:
            continue
        name = info.get("device_name") or machine.get("bench_device_name", "?")
        ident = (name, info["n"], info["h"], info["v"], info["dtype"], info["provider"])
        row = rows.setdefault(ident, Row(str(path), *ident))
        row.median_s[info["mode"]] = bench["stats"]["median"]
        row.peak_bytes[info["mode"]] = info.get("peak_mem_bytes")
    return list(rows.values())


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    parser.add_argument("--merge-into", help="first merge the JSONs into this file, report it")
    args = parser.parse_args(argv)
    if args.merge_into:
        merge_json(args.json, args.merge_into)
        args.json = [args.merge_into]
    rows = [row for path in args.json for row in load_rows(path)]
    text = (
        "## linear_logprobs benchmarks\n\n" + _sources(args.json) + "\n\n" + render_markdown(rows)
    )
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
