"""Every script under docs/examples/ runs and succeeds (each asserts its
own results: the kernel's counters, fsck, the data, the deadlock), and
the pytest plugin's ``machine`` fixture works and fails a leaking test."""
from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest

from helpers import ROOT, TESTS, failure_section, run_group

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "docs", "examples", "*.py")))


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"counter_walk.py", "kill_at_cursor.py", "oom_deadlock.py", "selftests_618.py"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path):
    p = run_group([sys.executable, path], 100)
    assert p.returncode == 0, p.stdout + p.stderr
    if path.endswith("oom_deadlock.py"):
        assert "legacy: deadlock: " in p.stdout and "ksm_thread_mutex" in p.stdout, p.stdout
        assert "seed: unmerged" in p.stdout and "status 0" in p.stdout, p.stdout
    if path.endswith("counter_walk.py"):
        assert p.stdout.count("run 1:") == 4, p.stdout
    if path.endswith("selftests_618.py"):   # each program ran its checks, the machine closed clean
        for line in ("pages_shared, pages_sharing: (1, 9)", "ksm_zero_pages: (10, 10)",
                     "child after PR_SET_MEMORY_MERGE 0: 0", "pages skipped", "status 0, fsck clean"):
            assert line in p.stdout, p.stdout


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

@pytest.mark.uksm_machine(expect_hung=True, frames=64)
def test_expects_a_hang_that_never_comes(machine):
    machine.task(pages=1).fill(1)

@pytest.mark.uksm_machine(run=0, hazards=["no-fast-path"], frames=64)
def test_fails_and_leaks(machine):
    machine.task(pages=1).fill(1)
    assert False, "the test's own failure"
'''


@pytest.mark.timeout(150)
def test_pytest_plugin_fixture(tmp_path):
    """docs/API.md's plugin: the ``machine`` fixture fails the test itself
    (FAILED, not an ERROR at teardown beside a PASSED) that leaves an object
    behind, whose task's data does not verify at the end, whose fsck fails,
    or in which a hung task was reported -- unless the test said it expects
    one (``expect_hung=True``), when no hang fails it; a test failing on its
    own also shows what its machine left."""
    (tmp_path / "test_user.py").write_text(PLUGIN_TESTS)
    shutil.copy(os.path.join(TESTS, "planter.py"), tmp_path / "planter.py")
    p = run_group([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                   str(tmp_path / "test_user.py"), "--rootdir", str(tmp_path)], 130)
    out = p.stdout + p.stderr
    assert "6 failed, 2 passed in" in out and "error" not in out.lower().split("passed in")[-1], out
    # pytest adds " - <message>" after the id when the terminal is wide enough
    failed = {ln.split(" - ", 1)[0].rsplit("::", 1)[-1] for ln in out.splitlines() if ln.startswith("FAILED ")}
    assert failed == {"test_leaks_an_mm", "test_bad_data", "test_bad_frames", "test_hangs",
                      "test_expects_a_hang_that_never_comes", "test_fails_and_leaks"}, out
    why = {t: failure_section(out, t) for t in failed}
    assert "never freed" in why["test_leaks_an_mm"], out
    assert "1 pages did not hold what their task wrote" in why["test_bad_data"], out
    assert "fsck: " in why["test_bad_frames"] and "is free but has count 1" in why["test_bad_frames"], out
    assert "hung task: " in why["test_hangs"] and "ksm_thread_mutex" in why["test_hangs"], out
    assert "no hung task was reported" in why["test_expects_a_hang_that_never_comes"], out
    assert "the test's own failure" in why["test_fails_and_leaks"], out
    assert "uksm machine" in why["test_fails_and_leaks"] and "never freed" in why["test_fails_and_leaks"], out


def _python_blocks(path: str) -> list[str]:
    text = open(os.path.join(ROOT, path)).read()
    return [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]


@pytest.mark.parametrize("path", ["README.md", "docs/API.md"])
def test_documented_example_runs(path):
    """The first Python example of the README and of docs/API.md runs as written."""
    code = next(b for b in _python_blocks(path) if "uksm.Machine(" in b)
    p = run_group([sys.executable, "-c", code], 100)
    assert p.returncode == 0, p.stdout + p.stderr
