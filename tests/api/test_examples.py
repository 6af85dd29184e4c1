"""Every script under docs/examples/ runs and succeeds (each asserts its
own results: the kernel's counters, fsck, the data, the deadlock), and
the pytest plugin's ``machine`` fixture works and fails a leaking test."""
from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest

from helpers import ROOT, TESTS, run_group, teardown_error

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
import os, signal
import pytest
import uksm
import planter
from uksm.kernel.mm import mm_attach

def test_merges(machine):
    a, b = machine.task(pages=2), machine.task(pages=2)
    a.fill(1)
    b.fill(1)
    assert machine.wait_full_scans(2)["pages_sharing"] == 3

@pytest.mark.uksm_machine(run=0, hazards=["no-fast-path"], frames=64)
def test_leaks_an_mm(machine):
    machine.task(pages=1).fill(1)   # exits with no fast path and no ksmd: never freed

def _plant(machine, t, plant):
    cl = machine._t().cl
    return plant(cl, {t.mm: mm_attach(cl, t.mm)})

@pytest.mark.uksm_machine(run=0, frames=64)
def test_bad_data(machine):
    t = machine.task(pages=2)
    t.write(0, b"written")
    _plant(machine, t, lambda cl, mms: planter.plant_page_data(cl, mms, t.mm))   # never undone

@pytest.mark.uksm_machine(run=0, frames=64)
def test_bad_frames(machine):
    machine.task(pages=2).fill(3)
    planter.plant_free_counted(machine._t().cl, {})   # a free frame with a count: never undone

def _hang(machine):
    t = machine.task(pages=2)
    t.fill(1)
    machine.wait_full_scans(1)
    machine.arm("ksmd_scan_mmap_sem", delay_ms=4000)   # ksmd stops there, holding the mutex
    machine.wait(lambda: machine.armed() is None, timeout=30)
    os.kill(t.pid, signal.SIGTERM)                      # its legacy __ksm_exit takes the mutex
    with pytest.raises(uksm.HungTask):
        machine.wait(lambda: False, timeout=30)

@pytest.mark.uksm_machine(exit_policy="legacy", hung_task_timeout=0.5, sleep_millisecs=5)
def test_hangs(machine):
    _hang(machine)

@pytest.mark.uksm_machine(exit_policy="legacy", hung_task_timeout=0.5, sleep_millisecs=5,
                          expect_hung=True)
def test_hangs_as_expected(machine):
    _hang(machine)
'''


@pytest.mark.timeout(150)
def test_pytest_plugin_fixture(tmp_path):
    """docs/API.md's plugin: the ``machine`` fixture fails a test that
    leaves an object behind, whose task's data does not verify at the end,
    whose fsck fails, or in which a hung task was reported -- unless the
    test said it expects one (``expect_hung=True``)."""
    (tmp_path / "test_user.py").write_text(PLUGIN_TESTS)
    shutil.copy(os.path.join(TESTS, "planter.py"), tmp_path / "planter.py")
    p = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rE",
                   str(tmp_path / "test_user.py"), "--rootdir", str(tmp_path)], 130)
    out = p.stdout + p.stderr
    assert "6 passed, 4 errors" in out, out  # each failure at the fixture's teardown
    errors = {t: teardown_error(out, t) for t in ("test_leaks_an_mm", "test_bad_data",
                                                 "test_bad_frames", "test_hangs")}
    assert "never freed" in errors["test_leaks_an_mm"], out
    assert "1 pages did not hold what their task wrote" in errors["test_bad_data"], out
    assert "fsck: " in errors["test_bad_frames"] and "is free but has count 1" in errors["test_bad_frames"], out
    assert "hung task: " in errors["test_hangs"] and "ksm_thread_mutex" in errors["test_hangs"], out
    assert "ERROR at teardown of test_hangs_as_expected" not in out, out


def _python_blocks(path: str) -> list[str]:
    text = open(os.path.join(ROOT, path)).read()
    return [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]


@pytest.mark.parametrize("path", ["README.md", "docs/API.md"])
def test_documented_example_runs(path):
    """The first Python example of the README and of docs/API.md runs as written."""
    code = next(b for b in _python_blocks(path) if "uksm.Machine(" in b)
    p = run_group([sys.executable, "-c", code], 100)
    assert p.returncode == 0, p.stdout + p.stderr
