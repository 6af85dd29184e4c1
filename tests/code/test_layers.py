"""The layers import downwards only, and no module imports itself back.

docs/DESIGN.md's picture, checked from every module's imports (function-
level imports included: an import inside a function is still a
dependency, only a later one):

    cli            uksm.cli, every __main__ (uksm.__main__, uksm.logs.__main__)
    faults         uksm.faults (fault injection: inject, campaign, campaign_run)
    api            uksm.api, uksm.testing, uksm.scenarios, uksm.deterministic, uksm (the curated __init__)
    explorer       uksm.explorer (controlled schedules: the gate, the world, the strategies)
    proc           uksm.proc   (supervisor, recovery, reaper, daemon, run, control)
    workers        uksm.workers (workers/: the tasks' programs)
    logs           uksm.logs   (reads log files: only the host below it)
    kernel         uksm.kernel (the emulated mm/ksm.c)
    host           uksm.host   (shm, lifeline, log, oops, exit codes)
    errors         uksm.errors (the one exception hierarchy: imports nothing of uksm)

tools/ (the benchmarks) and dev/ (maintainer tooling) are scripts run from
a checkout, not installed modules: they are no layer.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# a package's folder in the source tree (workers/ installs as uksm.workers)
FOLDERS = {"uksm": ROOT / "uksm", "uksm.workers": ROOT / "workers"}
# what each layer may import, itself included
ALLOWED = {
    "errors": {"errors"},
    "host": {"errors", "host"},
    "kernel": {"errors", "host", "kernel"},
    "logs": {"errors", "host", "logs"},
    "workers": {"errors", "host", "kernel", "workers"},
    "proc": {"errors", "host", "kernel", "workers", "proc"},
    "explorer": {"errors", "host", "kernel", "workers", "proc", "explorer"},
    "api": {"errors", "host", "kernel", "workers", "proc", "explorer", "api"},
    "faults": {"errors", "host", "kernel", "workers", "proc", "explorer", "api", "logs", "faults"},
    "cli": {"errors", "host", "kernel", "workers", "proc", "explorer", "api", "logs", "faults", "cli"},
}


def modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package, by its dotted name."""
    out: dict[str, pathlib.Path] = {}
    for pkg, folder in FOLDERS.items():
        for p in folder.rglob("*.py"):
            rel = p.relative_to(folder).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            if pkg == "uksm" and parts and parts[0] == "workers":
                continue
            out[".".join([pkg, *parts])] = p
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    if parts[-1] == "__main__":   # an entry point (python -m uksm, python -m uksm.logs): the CLI
        return "cli"
    if len(parts) == 1 or parts[1] in ("api", "testing", "scenarios", "deterministic"):
        return "api"
    return parts[1]


def imports(mod: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The uksm modules ``mod`` imports (``from uksm.kernel import ksm``
    names the module uksm.kernel.ksm; ``from uksm.kernel.ksm import x`` too)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    # imports for annotations only (``if TYPE_CHECKING:``) never run: a
    # component may name the class that owns it in its types
    typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                   and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING"
                   for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "uksm"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "uksm":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != mod}


GRAPH = {m: imports(m, p, set(modules())) for m, p in modules().items()}


def test_the_picture_covers_every_module() -> None:
    assert len(GRAPH) > 40
    assert {layer(m) for m in GRAPH} == set(ALLOWED), "a module outside the layers"


def upward(mod: str, deps: set[str]) -> list[str]:
    """What ``mod`` imports from a layer it may not import."""
    return sorted(d for d in deps if layer(d) not in ALLOWED[layer(mod)])


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_go_downwards(mod: str) -> None:
    bad = upward(mod, GRAPH[mod])
    assert not bad, f"{mod} ({layer(mod)}) imports {bad} from above it"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_the_checks_can_fail(tmp_path: pathlib.Path) -> None:
    """The checkers themselves, on code and graphs made wrong on purpose."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    # an import from above, at function level, in a kernel module: read and refused
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from uksm.proc import supervisor\n    import uksm.cli.main\n")
    deps = imports("uksm.kernel.bad", bad, set(GRAPH))
    assert deps == {"uksm.proc.supervisor", "uksm.cli.main"}
    assert upward("uksm.kernel.bad", deps) == ["uksm.cli.main", "uksm.proc.supervisor"]
    # each layer refuses the layers above it, and only those
    order = ["errors", "host", "kernel", "workers", "proc", "api", "faults", "cli"]
    for i, lay in enumerate(order):
        assert set(order[:i + 1]) <= ALLOWED[lay] and not set(order[i + 1:]) & ALLOWED[lay], lay
    assert "logs" not in ALLOWED["kernel"] and ALLOWED["logs"] == {"errors", "host", "logs"}
    # a type-only import is no dependency
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from uksm.proc import supervisor\n")
    assert imports("uksm.kernel.typed", typed, set(GRAPH)) == set()
    # the kernel's own modules are seen, with their imports
    assert "uksm.kernel.layout" in GRAPH["uksm.kernel.ksm"]
    assert "uksm.host.shm" in GRAPH["uksm.kernel.cluster"]
    # the one exception hierarchy is below everything, the kernel's SegFault too
    assert GRAPH["uksm.errors"] == set() and "uksm.errors" in GRAPH["uksm.kernel.mmu"]
    # fault injection is seen in its own layer, under the CLI that runs it
    assert "uksm.faults.campaign_run" in GRAPH["uksm.faults.campaign"]
    assert {"uksm.faults.inject", "uksm.faults.campaign"} <= GRAPH["uksm.cli.main"]
