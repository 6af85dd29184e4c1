"""Every script under docs/examples/ runs and succeeds (each asserts its
own results: the kernel's counters, fsck, the data, the deadlock), and
the pytest plugin's ``machine`` fixture works and fails a leaking test."""
from __future__ import annotations

import glob
import os
import sys

import pytest

from helpers import ROOT, run_group

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "docs", "examples", "*.py")))


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"counter_walk.py", "kill_at_cursor.py", "oom_deadlock.py"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path):
    p = run_group([sys.executable, path], 100)
    assert p.returncode == 0, p.stdout + p.stderr
    if path.endswith("oom_deadlock.py"):
        assert "legacy: deadlock: " in p.stdout and "ksm_thread_mutex" in p.stdout, p.stdout
        assert "seed: unmerged" in p.stdout and "status 0" in p.stdout, p.stdout
    if path.endswith("counter_walk.py"):
        assert p.stdout.count("run 1:") == 4, p.stdout


PLUGIN_TESTS = '''
import pytest

def test_merges(machine):
    a, b = machine.task(pages=2), machine.task(pages=2)
    a.fill(1)
    b.fill(1)
    assert machine.wait_full_scans(2)["pages_sharing"] == 3

@pytest.mark.uksm_machine(run=0, hazards=["no-fast-path"], frames=64)
def test_leaks_an_mm(machine):
    machine.task(pages=1).fill(1)   # exits with no fast path and no ksmd: never freed

@pytest.mark.uksm_machine(expect_hung=True, frames=64)
def test_expects_a_hang_that_never_comes(machine):
    machine.task(pages=1).fill(1)

@pytest.mark.uksm_machine(run=0, hazards=["no-fast-path"], frames=64)
def test_fails_and_leaks(machine):
    machine.task(pages=1).fill(1)
    assert False, "the test's own failure"
'''


def test_pytest_plugin_fixture(tmp_path):
    """The leak fails the test that leaked (FAILED, not an ERROR at teardown
    beside a PASSED); expect_hung without a hang fails; a test failing on
    its own also shows what its machine left."""
    (tmp_path / "test_user.py").write_text(PLUGIN_TESTS)
    p = run_group([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                   str(tmp_path / "test_user.py")], 100)
    out = p.stdout + p.stderr
    assert "3 failed, 1 passed in" in out and "error" not in out.lower().split("passed in")[-1], out
    # pytest adds " - <message>" after the id when the terminal is wide enough
    failed = {ln.split(" - ", 1)[0].rsplit("::", 1)[-1] for ln in out.splitlines() if ln.startswith("FAILED ")}
    assert failed == {"test_leaks_an_mm", "test_expects_a_hang_that_never_comes",
                      "test_fails_and_leaks"}, out
    assert "never freed" in out, out
    assert "no hung task was reported" in out, out
    assert "the test's own failure" in out and "uksm machine" in out, out


def _python_blocks(path: str) -> list[str]:
    text = open(os.path.join(ROOT, path)).read()
    return [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]


@pytest.mark.parametrize("path", ["README.md", "docs/API.md"])
def test_documented_example_runs(path):
    """The first Python example of the README and of docs/API.md runs as written."""
    code = next(b for b in _python_blocks(path) if "uksm.Machine(" in b)
    p = run_group([sys.executable, "-c", code], 100)
    assert p.returncode == 0, p.stdout + p.stderr
