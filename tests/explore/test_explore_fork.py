"""fork under a controlled schedule (issue 21 meets issue 22).

``t.fork()``, a W+fork worker's forks, the kill points inside fork and a
parent SIGKILLed mid-fork, served by the explorer's world (copy_process's
process-table half, ``uksm.kernel.fork``'s words as the supervisor writes
them) and replayed exactly; an exploration of fork against ksmd, clean on
the fixed code; ``t.pagemap()``/``t.stat()`` under control.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import uksm
from races import steps
from uksm.kernel import sched
from uksm.kernel.killpoints import FORK_POINTS

UKSM = [sys.executable, "-m", "uksm"]


def forking_script(m: uksm.Machine) -> tuple:
    """A scripted task forks, its child breaks COW; a W+fork worker forks
    by itself; the child is killed."""
    t = m.task(pages=4)
    t.fill(7)
    c = t.fork()
    c.write(0, b"abc")
    assert (t.read(0, 3), c.read(0, 4)) == (b"\x07" * 3, b"abc\x07")
    w, = m.spawn(1, pages=8, workload="dup:2+fork:30", seed=3)
    m.wait_full_scans(2)
    seen = (t.stat(), c.stat(), c.pagemap(0, 2), t.pagemap(), m.ksm.counters(),
            sorted(x.id for x in m.tasks()))
    c.kill()
    return seen


@pytest.mark.timeout(240)
def test_fork_served_under_control_and_replayed_exactly():
    runs = []
    for kw in ({"deterministic": True, "seed": 5}, {"deterministic": True, "seed": 5}, None):
        kw = kw or {"schedule": runs[0][2]}
        with uksm.Machine(frames=256, max_pages=8, **kw) as m:
            seen = forking_script(m)
        r = m.report
        assert r["status"] == 0 and not r["findings"] and r["fsck"]["ok"], r
        runs.append((seen, r["workers"], r["schedule"], r["steps"], r["ksm"]))
    assert runs[0] == runs[1] == runs[2]
    seen, workers = runs[0][0], runs[0][1]
    # the fork's child and the worker's children ran and exited; one was killed
    assert workers["started"] > 3 and workers["exited"] == workers["started"] and workers["killed"] == 1
    # the child's page 1 is its parent's page, copy-on-write: one frame, two mappings
    assert seen[2][1]["write_protected"] and seen[2][1]["mapcount"] >= 2 and seen[2][1]["frame"] == \
        seen[3][1]["frame"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_the_fork_kill_points_under_control(sig):
    """A parent killed at each point inside fork: its reaper takes over
    the locks of both rows and undoes the half-made child (SIGKILL), or
    the fork fails -ERESTARTNOINTR and the task exits (SIGTERM); either
    way no child is left and the run is clean."""
    for at in FORK_POINTS:
        with uksm.Machine(deterministic=True, seed=2, frames=128, max_pages=4) as m:
            t, u = m.task(pages=4), m.task(pages=4)
            t.fill(7)
            u.fill(7)
            m.wait_full_scans(2)
            assert t.kill(sig, at=at) in ("fast", "slow", "none")
            assert [x.id for x in m.tasks()] == [u.id]
            st = m.stats()
            assert (st["recoveries"], st["killed"]) == ((1, 1) if sig == "KILL" else (0, 0)), (at, st)
            c = u.fork()        # the machine forks on
            assert c.verify() == 4
        r = m.report
        assert r["status"] == 0 and not r["findings"] and r["fsck"]["ok"], (at, r)


def fork_vs_ksmd(m: uksm.Machine) -> None:
    """A task with a merged page forks while ksmd scans; the child writes it."""
    a = m.task(pages=2)
    a.fill(3)
    m.wait_full_scans(2)
    assert m.ksm["pages_sharing"] == 1
    m.race()
    c = a.fork()
    c.write(0, b"x")
    assert c.read(0, 2) == b"x\x03" and a.read(0, 2) == b"\x03\x03"


@pytest.mark.timeout(240)
def test_exploration_covers_fork_against_ksmd_and_stays_clean():
    res = uksm.explore(fork_vs_ksmd, preemptions=1, keep_going=True, shrink=False)
    assert res.exhausted and not res.failures, [(f["finding"], f["detail"]) for f in res.failures]
    assert res.schedules_by_preemptions["1"] > 100
    # one of those schedules: ksmd preempts the parent inside dup_mmap (both
    # mmap_sems held) -- derived from the default run, so that it does not
    # shift with the points -- and blocks on the parent's mmap_sem until the
    # copy is done
    default = uksm.replay(fork_vs_ksmd, "uksm2:fork_vs_ksmd:seed:2.6.32:-:0:0:race:-:-1")
    st = steps(default.trace)
    asked = next(i for i, (p, x) in enumerate(st) if p == "t1" and "-> blocked on its fork's answer" in x)
    inside = next(i for i, (p, x) in enumerate(st[asked + 1:], asked + 1)
                  if p == "t1" and "-> lock ksm_mmlist_lock" in x)   # __ksm_enter, in ksm_fork
    sch = f"uksm2:fork_vs_ksmd:seed:2.6.32:-:0:0:race:{inside + 1}.0.{sched.CODE['blocked']}:-1"
    raced = uksm.replay(fork_vs_ksmd, sch, strict=False)
    assert raced.status == 0 and not raced.failures, raced.failures
    rs = steps(raced.trace)
    back = next(i for i, (p, x) in enumerate(rs[inside + 1:], inside + 1) if p == "t1")
    assert any(p == "ksmd" and "blocked mmap_sem:mm1" in x for p, x in rs[inside + 1:back]), raced.trace


def fork_or_die(m: uksm.Machine) -> None:
    a = m.task(pages=2)
    a.fill(3)
    m.wait_full_scans(1)
    m.race()
    try:
        a.fork()
    except uksm.TaskDied:
        pass   # killed in its fork: its reaper undid the child


@pytest.mark.timeout(240)
def test_kills_chosen_inside_fork_recovered():
    res = uksm.explore(fork_or_die, strategy="random", seed=4, kills=1, schedules=30, keep_going=True,
                       shrink=False)
    assert res.explored == 30 and not res.failures, [(f["finding"], f["detail"]) for f in res.failures]
    # the parent SIGKILLed once its fork has returned, before it runs again
    # (copy_process done, not yet back in user space): the child lives on,
    # nobody adopts it, and the close stops it (it once took the close's
    # exit command for its parent's shadow: an oops)
    default = uksm.replay(fork_or_die, "uksm2:fork_or_die:seed:2.6.32:-:0:1:race:-:-1")
    st = steps(default.trace)
    back = [i for i, (p, x) in enumerate(st) if p == "t1" and x.split("->")[0].endswith("its fork's answer ")]
    sch = f"uksm2:fork_or_die:seed:2.6.32:-:0:1:race:{back[-1]}.k1.{sched.CODE['blocked']}:-1"
    orphan = uksm.replay(fork_or_die, sch, strict=False)
    assert orphan.status == 0 and not orphan.failures, orphan.failures
    ts = steps(orphan.trace)
    assert any(p == "t1" and "SIGKILL at blocked on its fork's answer" in x for p, x in ts), orphan.trace
    assert any(p == "t2" and x.endswith("-> exit") for p, x in ts), orphan.trace


@pytest.mark.timeout(120)
def test_deterministic_inject_forks(tmp_path):
    """A W+fork worker under ``uksm inject --deterministic`` forks (its
    children are started, live and exit), the same run twice."""
    out = []
    for _ in range(2):
        r = subprocess.run(UKSM + ["inject", "--deterministic", "--seed", "5", "--pages", "16", "--workers", "2",
                                   "--kills", "4", "--point", "random", "--workload", "vm+fork:30", "--json",
                                   "--quiet"], capture_output=True, text=True, timeout=100, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout))
    a, b = out
    assert (a["workers"], a["ksm"], a["deterministic"]) == (b["workers"], b["ksm"], b["deterministic"])
    # 2 workers and 4 replacements; the rest are forked children
    assert a["workers"]["started"] > 6 and a["workers"]["killed"] == 4 and a["fsck"]["ok"]
