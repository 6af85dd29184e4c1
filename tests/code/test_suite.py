"""The suite's own structure and its CI (issue 26), from the files.

- no test file imports another test file (or conftest): what two of them
  share lives in the shared modules beside conftest (``helpers``,
  ``util_machine``, ``planter``, ``leakcheck``), once;
- no test file defines again a function those modules define, nor reads
  /proc/PID/stat by hand (``helpers.proc_stat`` does, once);
- no test file defines a fixture named ``machine`` (the plugin's: a
  Machine, not a Supervisor);
- ``.ci/run`` runs the README's commands, and the command the README
  gives for the tests that need Ray.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

from helpers import ROOT, TESTS

SHARED = ("helpers", "util_machine", "planter", "leakcheck", "locktable", "logsynth", "tracecheck")
#: Left to branch explore (issue 21), which is rewriting these files: they
#: keep their own cluster-name helper and ``machine`` fixture until it
#: lands (only a minimal change was made here).  Each entry must still be
#: needed (checked), so it goes when the rewrite removes what it excuses.
PENDING = {"kernel/test_fidelity.py": {"cname"}, "kernel/test_exit_steps.py": {"cname", "machine"}}
TEST_FILES = sorted(os.path.join(d, f) for d, _dirs, files in os.walk(TESTS) for f in files
                    if f.startswith("test_") and f.endswith(".py"))
IDS = [os.path.relpath(p, TESTS) for p in TEST_FILES]


def tree(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), path)


def imported(t: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(t):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def shared_functions() -> dict[str, str]:
    out = {}
    for mod in SHARED:
        for node in tree(os.path.join(TESTS, f"{mod}.py")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                out[node.name] = mod
    return out


SHARED_FUNCTIONS = shared_functions()


def test_the_reading_sees_the_shared_modules():
    assert {"cname", "proc_stat", "log_events", "RecLog", "booted"} <= set(SHARED_FUNCTIONS)
    assert imported(ast.parse("import test_x\nfrom conftest import y\nfrom helpers import z")) == \
        {"test_x", "conftest", "helpers"}


@pytest.mark.parametrize("path", TEST_FILES, ids=IDS)
def test_no_test_file_imports_another(path):
    bad = sorted(m for m in imported(tree(path)) if m.startswith("test_") or m == "conftest")
    assert not bad, f"{path} imports {bad}: move what they share into {SHARED}"


def pending(path: str) -> set[str]:
    return PENDING.get(os.path.relpath(path, TESTS), set())


@pytest.mark.parametrize("path", TEST_FILES, ids=IDS)
def test_no_test_file_copies_a_shared_helper(path):
    t = tree(path)
    defined = {n.name for n in t.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    again = sorted(f"{n} (in {SHARED_FUNCTIONS[n]})" for n in defined & set(SHARED_FUNCTIONS) - pending(path))
    assert not again, f"{path} defines again {again}"
    stale = pending(path) - {"machine"} - defined
    assert not stale, f"PENDING excuses {sorted(stale)} in {path}, which no longer has them: remove them"
    with open(path) as f:
        text = f.read()
    assert not re.search(r"/stat\b['\"]", text), f"{path} reads /proc/PID/stat itself: helpers.proc_stat"


@pytest.mark.parametrize("path", TEST_FILES, ids=IDS)
def test_no_fixture_shadows_the_plugins_machine(path):
    fixtures = [n for n in ast.walk(tree(path)) if isinstance(n, ast.FunctionDef) and n.name == "machine"
                and any("fixture" in ast.unparse(d) for d in n.decorator_list)]
    if "machine" in pending(path):
        assert fixtures, f"PENDING excuses a 'machine' fixture in {path}, which has none: remove it"
        return
    assert not fixtures, f"{path}: a fixture named 'machine' shadows the pytest plugin's (uksm.testing)"


def _readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    first = text.split("```sh\n", 1)[1].split("```", 1)[0]
    ray = next(b.split("```", 1)[0] for b in text.split("```sh\n")[1:] if "-m ray" in b)
    return [ln.strip() for ln in (first + ray).splitlines() if ln.strip()]


def test_ci_runs_the_readme_commands():
    """CI is the README: the README's commands, in order, each run as
    written (the first with ``--clear``: a fresh venv), and no clean-up
    of other clusters first."""
    ci = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run"))
          if ln.strip() and not ln.startswith("#")]
    cmds = _readme_commands()
    assert len(cmds) == 3 and "pytest -q -m ray" in cmds[-1], cmds
    runs = [ln.replace("python3 -m venv --clear ", "python3 -m venv ") for ln in ci
            if ln.startswith((".venv/", "python3 "))]
    flat = " && ".join(runs)
    assert flat == " && ".join(c for c in cmds), (runs, cmds)
    assert "python3 -m venv --clear .venv" in open(os.path.join(ROOT, ".ci", "run")).read()
    assert not any("cleanup" in ln for ln in ci)
