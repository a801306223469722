"""The layering of drorebel (docs/design.md §2), checked on the source with ``ast``.

Layers, imports only going downward::

    drorebel.distributed (torch.distributed helpers; imports nothing from drorebel)
    kernels/ (installed as drorebel.kernels) → drorebel.ops → drorebel.losses → drorebel.trainer
    drorebel.reference: test oracles, import nothing they check
    drorebel.experiments: importable only from drorebel.cli
    drorebel.integrations (other libraries' trainers, e.g. TRL): may import drorebel.losses,
        drorebel.ops, kernels and drorebel.distributed, never the trainer; imported only by the
        facade and drorebel.cli
    drorebel (the package facade) and drorebel.cli: top level

Every ``.py`` under ``drorebel/`` and ``kernels/`` is parsed; an import is any ``import`` or
``from ... import`` at any nesting level (module level, inside functions, under ``if``), relative
imports resolved, plus string literals naming a drorebel module (the targets of
``importlib.import_module`` such as the experiment table of drorebel/cli.py or the lazy names of
drorebel/__init__.py; docstrings excluded). Only imports of drorebel modules are checked.
Implicit parent-package imports (``import a.b`` runs ``a/__init__``) are not edges.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module-name prefix -> layer; the longest matching prefix wins
LAYER_PREFIXES = {
    "drorebel.distributed": "utility",
    "drorebel.kernels": "kernels",
    "drorebel.ops": "ops",
    "drorebel.losses": "losses",
    "drorebel.trainer": "trainer",
    "drorebel.reference": "reference",
    "drorebel.experiments": "experiments",
    "drorebel.integrations": "integrations",
    "drorebel.cli": "cli",
}
PRODUCTION = ("utility", "kernels", "ops", "losses", "trainer")
ALL_LAYERS = (*PRODUCTION, "reference", "experiments", "integrations", "cli", "package")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (for ``from M import name``: M.name if that is a module)
    name: str | None  # the name of ``from M import name``; None for ``import M`` and literals
    where: str  # path:line

    def __str__(self) -> str:
        what = self.target if self.name is None else f"{self.target} import {self.name}"
        return f"{self.where}: {self.source} imports {what}"


def layer_of(module: str) -> str | None:
    """Layer of a drorebel module name (None: not classified)."""
    if module == "drorebel":
        return "package"
    hits = [p for p in LAYER_PREFIXES if module == p or module.startswith(p + ".")]
    return LAYER_PREFIXES[max(hits, key=len)] if hits else None


@cache
def modules() -> dict[str, Path]:
    """Module name -> file of every module under drorebel/ and kernels/ (= drorebel.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "drorebel", ("drorebel",)),
                         (ROOT / "kernels", ("drorebel", "kernels"))):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(prefix + parts)] = path
    return out


def _is_drorebel(name: str) -> bool:
    return name == "drorebel" or name.startswith("drorebel.")


def parse_imports(source: str, module: str, is_package: bool, known: set[str],
                  filename: str = "<string>") -> list[Import]:
    """The drorebel imports of one module's source (see the module docstring)."""
    tree = ast.parse(source, filename=filename)
    package = module if is_package else module.rpartition(".")[0]
    docstrings = {
        id(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name, node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings and "." in node.value and node.value in known):
            found.append((node.value, None, node.lineno))
    out = []
    for target, name, line in found:
        if not _is_drorebel(target):
            continue
        if name is not None and f"{target}.{name}" in known:
            target = f"{target}.{name}"  # ``from package import submodule``
        out.append(Import(module, target, name, f"{filename}:{line}"))
    return out


@cache
def all_imports() -> tuple[Import, ...]:
    known = set(modules())
    out: list[Import] = []
    for module, path in modules().items():
        out += parse_imports(path.read_text(encoding="utf-8"), module,
                             path.name == "__init__.py", known,
                             filename=str(path.relative_to(ROOT)))
    return tuple(out)


def imports_from(layer: str) -> list[Import]:
    return [imp for imp in all_imports() if layer_of(imp.source) == layer]


def _report(bad: list[Import], rule: str) -> str:
    return f"{rule}:\n" + "\n".join(f"  {imp}" for imp in bad)


def _allowed_only(layer: str, allowed: set[str], rule: str) -> None:
    bad = [imp for imp in imports_from(layer) if layer_of(imp.target) not in allowed]
    assert not bad, _report(bad, rule)


def _forbidden(layer: str, forbidden: set[str], rule: str) -> None:
    bad = [imp for imp in imports_from(layer) if layer_of(imp.target) in forbidden]
    assert not bad, _report(bad, rule)


# ---- the parser itself -------------------------------------------------------------------------


def test_parser_sees_nested_relative_and_literal_imports():
    src = '''
"""Docstring naming drorebel.ops.chunked is not an import."""
import os
from drorebel.ops import chunked
from . import sibling
from ..losses.dpo import dpo_loss as _renamed


def f():
    if True:
        from drorebel.kernels.linear_logps import _private_helper
    import drorebel.reference.wasserstein
    return importlib.import_module("drorebel.trainer.loop")
'''
    known = {"drorebel", "drorebel.ops", "drorebel.ops.chunked", "drorebel.ops.sibling",
             "drorebel.losses.dpo", "drorebel.kernels.linear_logps",
             "drorebel.reference.wasserstein", "drorebel.trainer.loop"}
    got = {(imp.target, imp.name) for imp in
           parse_imports(src, "drorebel.ops.thing", False, known)}
    assert got == {
        ("drorebel.ops.chunked", "chunked"),
        ("drorebel.ops.sibling", "sibling"),
        ("drorebel.losses.dpo", "dpo_loss"),
        ("drorebel.kernels.linear_logps", "_private_helper"),
        ("drorebel.reference.wasserstein", None),
        ("drorebel.trainer.loop", None),
    }


def test_modules_are_found_and_classified():
    mods = modules()
    for expected in ("drorebel", "drorebel.kernels", "drorebel.kernels.linear_logps",
                     "drorebel.ops.chunked", "drorebel.losses.rebel", "drorebel.trainer.loop",
                     "drorebel.reference.wasserstein", "drorebel.distributed", "drorebel.cli"):
        assert expected in mods, expected
    unclassified = sorted(m for m in mods if layer_of(m) is None)
    assert not unclassified, f"modules without a layer (add them to LAYER_PREFIXES): {unclassified}"
    # the function-level kernel imports of the ops are seen
    assert any(imp.source == "drorebel.ops.linear_logps"
               and imp.target == "drorebel.kernels.linear_logps" for imp in all_imports())


# ---- layers: imports only go downward ----------------------------------------------------------


def test_distributed_utility_imports_nothing_from_drorebel():
    _allowed_only("utility", set(), "drorebel.distributed is below every layer")


def test_kernels_import_only_kernels():
    _allowed_only("kernels", {"kernels"},
                  "kernels/ (drorebel.kernels) imports nothing from drorebel outside itself")


def test_ops_import_only_kernels_and_ops():
    _allowed_only("ops", {"kernels", "ops", "utility"},
                  "drorebel.ops imports only drorebel.kernels, drorebel.ops, drorebel.distributed")


def test_losses_do_not_import_trainer_or_above():
    _forbidden("losses", {"trainer", "experiments", "cli", "package"},
               "drorebel.losses never imports the trainer, experiments, cli or the package facade")


def test_trainer_does_not_import_experiments_or_above():
    _forbidden("trainer", {"experiments", "cli", "package"},
               "drorebel.trainer never imports experiments, cli or the package facade")


@pytest.mark.parametrize("layer", [
    "utility", "kernels", "ops",
    "losses", "trainer", "integrations",
])
def test_production_never_imports_reference(layer):
    _forbidden(layer, {"reference"}, f"production code ({layer}) never imports drorebel.reference")


def test_reference_imports_nothing_it_checks():
    _allowed_only("reference", {"reference", "utility"},
                  "the oracles of drorebel.reference import nothing they check "
                  "(only drorebel.reference and drorebel.distributed)")


def test_integrations_import_only_losses_ops_and_below():
    _allowed_only("integrations", {"integrations", "losses", "ops", "kernels", "utility"},
                  "drorebel.integrations imports only drorebel.losses, drorebel.ops, "
                  "drorebel.kernels and drorebel.distributed (never the trainer)")


def test_integrations_imported_only_by_facade_and_cli():
    bad = [imp for imp in all_imports() if layer_of(imp.target) == "integrations"
           and layer_of(imp.source) not in ("integrations", "package", "cli")]
    assert not bad, _report(bad, "drorebel.integrations is imported only by the drorebel "
                                 "facade and drorebel.cli")


def test_experiments_imported_only_by_cli():
    bad = [imp for imp in all_imports() if layer_of(imp.target) == "experiments"
           and layer_of(imp.source) not in ("experiments", "cli")]
    assert not bad, _report(bad, "drorebel.experiments is imported only by drorebel.cli")


# ---- private names stay private ----------------------------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("layer", [
    "utility", "kernels", "ops", "reference", "cli", "package",
    "losses", "trainer", "experiments", "integrations",
])
def test_no_private_names_imported_from_other_modules(layer):
    """``from M import _name`` reaches into another module's privates; ``from M._mod import
    name`` is fine (a ``_`` module may export public names)."""
    bad = [imp for imp in imports_from(layer)
           if imp.name is not None and _is_private(imp.name)]
    assert not bad, _report(bad, f"{layer} imports private names of other modules")


# ---- no import cycles --------------------------------------------------------------------------


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    where: dict[tuple[str, str], str] = {}
    for imp in all_imports():
        if imp.target in mods and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            where.setdefault((imp.source, imp.target), imp.where)
    return graph, where


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _a_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle ``[a, b, ..., a]`` inside a strongly connected component."""
    members = set(comp)
    start = comp[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first: the shortest cycle back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]  # v, parent(v), ..., start
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a strongly connected component")


def import_cycles() -> list[str]:
    graph, where = _graph()
    reports = []
    for comp in _strongly_connected(graph):
        cycle = _a_cycle(graph, comp)
        steps = [f"{a} -> {b} ({where[a, b]})" for a, b in zip(cycle, cycle[1:])]
        reports.append(f"cycle among {comp}:\n    " + "\n    ".join(steps))
    return reports


@pytest.mark.parametrize("layer", ALL_LAYERS)
def test_no_import_cycles(layer):
    """No cycle among drorebel modules through a module of ``layer`` (module-level and
    function-level imports both count)."""
    graph, _ = _graph()
    cycles = [c for comp, c in zip(_strongly_connected(graph), import_cycles())
              if any(layer_of(m) == layer for m in comp)]
    assert not cycles, "\n".join(cycles)
