"""Timeouts nest (issue 16): every inner budget a test gives a helper
(``timeout=`` of uksm/run_json/run_group/inject/wait_for/pump/subprocess,
or the helper's default) is shorter than the test's own pytest timeout, so
that a hang is killed by the code meant to kill it (run_group's
process-group kill, wait_for's message) and not by pytest-timeout, which
leaves the hung processes behind.  A static reading of the test files."""
from __future__ import annotations

import ast
import inspect
import os
import tomllib

import pytest

import helpers
from helpers import nested_session

HERE = helpers.TESTS


def _default_timeout() -> float:
    with open(os.path.join(os.path.dirname(HERE), "pyproject.toml"), "rb") as f:
        return float(tomllib.load(f)["tool"]["pytest"]["ini_options"]["timeout"])


def _defaults(fn) -> float | None:
    p = inspect.signature(fn).parameters.get("timeout")
    return None if p is None or p.default is inspect.Parameter.empty else float(p.default)


def _module_helpers(tree: ast.Module) -> dict[str, float]:
    """Functions of a test module that take ``timeout=N``: their default."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                + node.args.kw_defaults
            for a, d in zip(args, defaults):
                if a.arg == "timeout" and isinstance(d, ast.Constant) and isinstance(d.value, (int, float)):
                    out[node.name] = float(d.value)
    return out


#: every test file, by its path under tests/ (the subsystem folders included)
PATHS = {f: os.path.join(d, f) for d, _dirs, files in os.walk(HERE) for f in files
         if f.startswith("test_") and f.endswith(".py")}
FILES = sorted(PATHS)
HELPERS = {n: _defaults(getattr(helpers, n)) for n in ("uksm", "run_json", "run_group", "wait_for", "pump")}


def _callable_classes(paths: list[str]) -> dict[str, float]:
    """Classes of the test files whose instances are called with a
    ``timeout`` (``Up.__call__``): class name -> the default budget."""
    out = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for name, d in _module_helpers(ast.Module(body=node.body, type_ignores=[])).items():
                    if name == "__call__":
                        out[node.name] = d
    return out


def _test_timeout(fn: ast.FunctionDef, default: float) -> float:
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "timeout" and d.args:
            v = d.args[0]
            if isinstance(v, ast.Constant):
                return float(v.value)
    return default


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


CLASSES = _callable_classes([PATHS[f] for f in FILES] + [os.path.join(HERE, "helpers.py")])


def inner_budgets(path: str) -> list[tuple[str, int, str, float, float]]:
    """(test, line, callee, inner budget, test timeout) of every call in a
    test function (or a fixture it is given, not followed) with a budget."""
    with open(path) as f:
        tree = ast.parse(f.read())
    known = {k: v for k, v in HELPERS.items() if v is not None}
    known.update(_module_helpers(tree))
    default = _default_timeout()
    out = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
            continue
        limit = _test_timeout(fn, default)
        known_here = dict(known)
        for a in fn.args.args:   # a fixture annotated with a callable class: cluster: Up
            if isinstance(a.annotation, ast.Name) and a.annotation.id in CLASSES:
                known_here[a.arg] = CLASSES[a.annotation.id]
        for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
            name = _callee(call)
            kw = {k.arg: k.value for k in call.keywords}
            budget: float | None = None
            if "timeout" in kw and isinstance(kw["timeout"], ast.Constant) \
                    and isinstance(kw["timeout"].value, (int, float)):
                budget = float(kw["timeout"].value)
            elif name in ("run_group", "wait_for", "pump") and len(call.args) >= 2 \
                    and isinstance(call.args[1], ast.Constant) and name != "pump":
                budget = float(call.args[1].value)
            elif isinstance(call.func, ast.Name) and name in known_here and "timeout" not in kw:
                budget = known_here[name]
            if budget is not None:
                out.append((fn.name, call.lineno, name, budget, limit))
    return out




@pytest.mark.timeout(60)
@pytest.mark.parametrize("fname", FILES)
def test_inner_budgets_are_shorter_than_the_test(fname: str) -> None:
    bad = [f"{fname}:{line} {test}: {callee}(timeout={b:g}) >= the test's {t:g}s"
           for (test, line, callee, b, t) in inner_budgets(PATHS[fname]) if b >= t]
    assert not bad, "\n".join(bad)


def test_the_reading_finds_budgets() -> None:
    """The static reading sees what it must (or the test above could pass
    on nothing)."""
    found = inner_budgets(PATHS["test_inject.py"])
    assert any(c == "inject" and b == 200 for (_t, _l, c, b, _lim) in found), found
    assert HELPERS["uksm"] == 100 and HELPERS["wait_for"] == 30
    assert "Up" in CLASSES
    found = inner_budgets(PATHS["test_cluster_cmds.py"])
    assert any(c == "cluster" and b == CLASSES["Up"] for (_t, _l, c, b, _lim) in found), found


SUMMED = '''
import sys
import pytest
from helpers import run_group

@pytest.mark.timeout(30)
def test_budgets_that_add_up_past_the_timeout():
    for _ in range(3):   # 3 x 20 s: each alone shorter than the test's 30 s
        run_group([sys.executable, "-c", "import time; time.sleep(100)"], 20)
'''


@pytest.mark.timeout(90)
def test_budgets_are_cut_to_the_time_the_test_has_left(tmp_path) -> None:
    """The static reading above checks each budget alone; their sum may
    exceed the test's timeout (three 20 s calls in a 30 s test).  So
    helpers.budget cuts each call's budget to the time the test has left
    (conftest sets the deadline from its pytest-timeout, less a reserve
    for the teardown): the second call is cut, and the hang is ended by
    run_group -- the group killed, its message -- not by pytest-timeout."""
    rc, text = nested_session(tmp_path, "test_summed.py", SUMMED, 80)
    assert rc == 1 and "1 failed" in text, text
    assert "no answer within" in text and "cut to what the test had left" in text, text
    assert "Timeout >" not in text, text   # pytest-timeout's "Failed: Timeout >30.0s"
