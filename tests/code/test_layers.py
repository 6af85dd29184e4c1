"""The layers import downwards only, and no module imports itself back.

docs/DESIGN.md's picture, checked from every module's imports (function-
level imports included: an import inside a function is still a
dependency, only a later one):

    cli            uksm.cli, uksm.__main__
    faults         uksm.faults (fault injection: inject, campaign, campaign_run)
    api            uksm.api, uksm.testing, uksm (the curated __init__)
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
    "api": {"errors", "host", "kernel", "workers", "proc", "api"},
    "faults": {"errors", "host", "kernel", "workers", "proc", "api", "logs", "faults"},
    "cli": {"errors", "host", "kernel", "workers", "proc", "api", "logs", "faults", "cli"},
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
    if len(parts) == 1 or parts[1] in ("api", "testing"):
        return "api"
    if parts[1] == "__main__":
        return "cli"
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


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_go_downwards(mod: str) -> None:
    bad = sorted(d for d in GRAPH[mod] if layer(d) not in ALLOWED[layer(mod)])
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


def test_the_checks_can_fail() -> None:
    """The checkers themselves, on graphs made wrong on purpose."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "host" not in ALLOWED["host"] - {"host"} and "proc" not in ALLOWED["kernel"]
    # the kernel's own modules are seen, with their imports
    assert "uksm.kernel.layout" in GRAPH["uksm.kernel.ksm"]
    assert "uksm.host.shm" in GRAPH["uksm.kernel.cluster"]
    # the one exception hierarchy is below everything, the kernel's SegFault too
    assert GRAPH["uksm.errors"] == set() and "uksm.errors" in GRAPH["uksm.kernel.mmu"]
    # fault injection is seen in its own layer, under the CLI that runs it
    assert "uksm.faults.campaign_run" in GRAPH["uksm.faults.campaign"]
    assert {"uksm.faults.inject", "uksm.faults.campaign"} <= GRAPH["uksm.cli.main"]
