"""The supervisor's children (issue 26): they import the same uksm as
their parent, wherever it runs from; one that dies of its own error is a
failure of the run, said at once in one line with what it wrote on
stderr; a run in which no page was verified is no success.

Found by a user trying an installed uksm from inside the project's own
folder: ``python -m uksm.workers.worker`` put that folder's ``uksm/`` first
on ``sys.path``, every worker died at once of a ModuleNotFoundError, and
``uksm run`` said status 0 with 0 pages verified, ``uksm inject`` waited
120 s and ended in a WaitTimeout traceback.

A decoy ``uksm/`` package in the current folder stands for the checkout
(importing it fails); a ``sitecustomize`` on PYTHONPATH makes a chosen
child die as that worker did, before it is ready."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

import uksm
from helpers import cname, log_events, run_group

UKSM = os.path.join(os.path.dirname(sys.executable), "uksm")   # the installed command

SITE = '''
import os, sys
if os.environ.get("UKSM_SUPERVISOR_PID"):      # a child of a supervisor
    with open("/proc/self/cmdline", "rb") as f:
        if os.environ["FAIL_CHILD"].encode() in f.read():
            print("ModuleNotFoundError: No module named 'uksm.workers'", file=sys.stderr, flush=True)
            os._exit(1)
'''
SAID = "ModuleNotFoundError: No module named 'uksm.workers'"


def decoy(tmp_path) -> str:
    """A folder holding a ``uksm`` package that must never be imported."""
    d = tmp_path / "checkout"
    (d / "uksm").mkdir(parents=True)
    (d / "uksm" / "__init__.py").write_text('raise ImportError("the decoy uksm in the current folder")\n')
    return str(d)


def in_dir(cwd: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError(f"{argv}: no answer within {timeout}s (killed)")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def failing(tmp_path, child: str) -> dict[str, str]:
    """The environment in which ``child`` (a module's name) dies at its start."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    return dict(os.environ, PYTHONPATH=str(site), FAIL_CHILD=child)


@pytest.mark.timeout(120)
def test_the_installed_uksm_works_from_a_folder_holding_another_uksm(tmp_path):
    """Run from inside a checkout (here: a decoy uksm/ in the current
    folder), the installed command's ksmd, workers and daemon import the
    installed uksm, as the command itself does."""
    cwd = decoy(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    p = in_dir(cwd, [UKSM, "run", "--workers", "2", "--pages", "32", "--until-merged", "--json",
                     "--cluster", cname("tchild"), "--log-dir", str(logs)], 90)
    r = json.loads(p.stdout)
    assert p.returncode == r["status"] == 0, p.stderr
    assert r["integrity"] == {"pages_verified": 64, "mismatches": 0} and r["workers"]["killed"] == 0, r
    assert "decoy" not in p.stderr
    name = cname("tchildup")
    p = in_dir(cwd, [UKSM, "up", "--cluster", name, "--workers", "1", "--pages", "16", "--log-dir",
                     str(logs)], 60)
    try:
        assert p.returncode == 0, p.stderr
        assert in_dir(cwd, [UKSM, "spawn", "--cluster", name, "--pages", "8", "--wait"], 60).returncode == 0
    finally:
        d = in_dir(cwd, [UKSM, "down", "--cluster", name, "--json"], 60)
    assert d.returncode == 0 and json.loads(d.stdout)["integrity"]["pages_verified"] == 24, d


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_start_fails_the_run_at_once_in_one_line(tmp_path):
    """Every worker dies of an import error before it is ready: ``uksm run``
    ends at once (its run_end: "a task failed", not its 60 s), status 1,
    the error in one line with what the worker said, counted as no kill;
    ``uksm inject`` fails the same way at its first spawn, in one line --
    no 120 s wait, no WaitTimeout traceback."""
    env = failing(tmp_path, "uksm.workers.worker")
    logs = tmp_path / "run"
    logs.mkdir()
    p = in_dir(str(tmp_path), [UKSM, "run", "--workers", "2", "--pages", "32", "--duration", "60",
                               "--json", "--cluster", cname("tchildf"), "--log-dir", str(logs)], 90, env)
    r = json.loads(p.stdout)
    assert p.returncode == r["status"] == 1, p.stderr
    assert [e["reason"] for e in log_events(logs, "run_end")] == ["a task failed"]
    said = [ln for ln in p.stderr.splitlines() if "died of its own error" in ln]
    assert len(said) == 1 and said[0].startswith("uksm: worker w") and \
        said[0].endswith(f"died of its own error before it was ready (status 1): {SAID}"), p.stderr
    # the first death ends the run; the other worker is reported too if it
    # died before the shutdown's SIGTERM reached it (else it is stopped)
    n = sum("died of its own error before it was ready (status 1)" in e for e in r["errors"])
    assert 1 <= n <= 2, r
    # a failed one is no kill (a stopped one, SIGTERMed before its handler was in place, is)
    assert r["workers"]["killed"] == 2 - n and r["integrity"]["pages_verified"] == 0, r
    assert f"no page was verified: of 2 workers, {2 - n} killed, 0 OOM-killed, none verified its pages" \
        in r["errors"], r["errors"]
    failed = log_events(logs, "task_failed")
    assert len(failed) == n and all(e["stderr"] == SAID and e["status"] == 1 and not e["ready"] for e in failed)
    p = in_dir(str(tmp_path), [UKSM, "inject", "--kills", "30", "--workers", "2", "--pages", "32",
                               "--cluster", cname("tchildi"), "--log-dir", str(logs)], 90, env)
    assert p.returncode == 1, (p.stdout, p.stderr)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("uksm: ") and f"before it was ready (status 1): {SAID}" in last, p.stderr
    assert "Traceback" not in p.stderr and "timed out" not in p.stderr, p.stderr


@pytest.mark.timeout(90)
def test_a_ksmd_that_cannot_start_fails_the_run_and_is_not_restarted(tmp_path):
    env = failing(tmp_path, "uksm.kernel.ksmd")
    p = in_dir(str(tmp_path), [UKSM, "run", "--workers", "1", "--pages", "16", "--duration", "60",
                               "--json", "--cluster", cname("tchildk"), "--log-dir", str(tmp_path)], 80, env)
    r = json.loads(p.stdout)
    assert p.returncode == r["status"] == 1, p.stderr
    assert any(e.startswith("ksmd (pid ") and e.endswith(f"before it was ready (status 1): {SAID}")
               for e in r["errors"]), r["errors"]
    assert len(log_events(tmp_path, "ksmd_died")) == 1          # tried once: not in a loop
    assert [e["reason"] for e in log_events(tmp_path, "run_end")] == ["a task failed"]


def test_a_programmable_task_that_cannot_start_says_why(tmp_path):
    code = (f"import uksm\nm = uksm.Machine(name={cname('tchildm')!r}, frames=64)\n"
            "try:\n    m.task(pages=2)\nexcept uksm.MachineError as e:\n    print(e)\n"
            "finally:\n    m.close()\nprint(m.report['status'])\n")
    p = in_dir(str(tmp_path), [sys.executable, "-c", code], 60, failing(tmp_path, "uksm.workers.scripted"))
    msg, status = p.stdout.strip().splitlines()
    assert "task w1 died during start: worker w1 (pid " in msg and msg.endswith(SAID), p.stdout + p.stderr
    assert status == "1"


def test_a_task_killed_by_its_own_fault_later_is_a_failure_not_a_kill():
    """A worker that dies of a signal nobody sends a task (SIGSEGV) after
    it was ready: the run fails (status 1), it is no kill."""
    with uksm.Machine(name=cname("tchilds"), frames=128) as m:
        w, v = m.spawn(count=2, pages=8, workload="unique")
        os.kill(w.pid, signal.SIGSEGV)
        m.wait(lambda: m.stats()["exited"] == 1, 30, "the worker's death accounted")
        assert m.stats()["killed"] == 0
    rep = m.report
    assert rep["status"] == 1 and rep["workers"]["killed"] == 0, rep
    assert rep["errors"] == [f"worker w1 (pid {w.pid}) died of its own error (signal SIGSEGV)"], rep
    assert rep["integrity"]["pages_verified"] == 8   # the other verified its pages


@pytest.mark.timeout(90)
def test_a_run_that_verified_no_page_says_so_and_fails(tmp_path):
    """``uksm run --frames 16`` (the least it takes; the issue's ``--frames
    3`` is now refused as bad input): every worker OOM-killed before it
    could verify; the report says so plainly, and the status is 1, not 0."""
    p = run_group([sys.executable, "-m", "uksm", "run", "--frames", "16", "--cluster", cname("tchild3"),
                   "--log-dir", str(tmp_path)], 80)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "  data     0 pages verified, 0 mismatches" in p.stdout, p.stdout
    n = re.search(r"  error    no page was verified: of (\d+) workers, 0 killed, (\d+) OOM-killed, "
                  r"none verified its pages", p.stdout)
    assert n and n[1] == n[2] and int(n[1]) >= 3, p.stdout   # (an OOM-killed worker may be started again)
