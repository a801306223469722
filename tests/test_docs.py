"""The documentation is an entry point that works from a fresh clone.

* README.md stays short (at most 12 kB): the manual lives in docs/.
* Every relative markdown link in README.md and docs/*.md points to a file in the repository.
* No tracked text file points to the design brief outside the repository. The project's own
  spec is docs/design.md.
* The README's drop-in example (its first ```python block) runs on the CPU as written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_000
# spelled in pieces so that this file does not match its own check
FORBIDDEN = ("shared/" + "DESIGN", "DESIGN" + ".md")

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _link_targets(text: str) -> list[str]:
    """Link targets of a markdown text, outside code blocks and inline code."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", text))
    return _INLINE_LINK.findall(text) + _REF_LINK.findall(text)


def _is_relative(target: str) -> bool:
    return not (target.startswith("#") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target))


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (limit {README_MAX_BYTES}): move details into docs/")


def test_link_parser_finds_links_outside_code():
    text = ("[a](docs/a.md) ![img](img/x.png \"t\") [web](https://x.org) [top](#s)\n"
            "`[no](inline.md)`\n```\n[no](fenced.md)\n```\n[r]: ref/target.md\n")
    assert _link_targets(text) == ["docs/a.md", "img/x.png", "https://x.org", "#s",
                                   "ref/target.md"]
    assert [t for t in _link_targets(text) if _is_relative(t)] == [
        "docs/a.md", "img/x.png", "ref/target.md"]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in _link_targets(page.read_text(encoding="utf-8")):
        if not _is_relative(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (page.parent / path).resolve()
        inside = resolved == ROOT or ROOT in resolved.parents
        if not inside or not resolved.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve in the repository: " \
                       f"{broken}"


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_reference_to_the_external_design_brief():
    hits = []
    for path in _tracked_files():
        if not path.is_file():  # tracked but deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        hits += [f"{path.relative_to(ROOT)}: {word}" for word in FORBIDDEN if word in text]
    assert not hits, "cite docs/design.md instead: " + "; ".join(hits)


def _readme_example() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


# Runs the example as __main__; a DeprecationWarning issued by drorebel code (an old argument
# order, a renamed function) fails the run: the README must show the current API.
_RUNNER = """
import runpy, sys, warnings
_warn = warnings.warn
def _checked_warn(message, category=None, stacklevel=1, *args, **kwargs):
    caller = sys._getframe(1).f_globals.get("__name__", "")
    cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if caller.split(".")[0] == "drorebel" and issubclass(cat, DeprecationWarning):
        raise SystemExit(f"the README example uses a deprecated drorebel API: {message}")
    return _warn(message, category, stacklevel + 1, *args, **kwargs)
warnings.warn = _checked_warn
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_readme_example_runs_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the installed package, as a user has it
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "readme_example.py"
    script.write_text(_readme_example(), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README example failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
