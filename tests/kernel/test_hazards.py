"""Later KSM races on a flag (issue 11): each hazard removes one fix, a
detector catches the race it reopens, and the fixed code stays clean under
the very same schedule.  The race windows are reached by a schedule
(tests/races.py: found by exploring a scenario, replayed exactly), never
by a sleep, and each fixed control shows from its trace that the window
was reached:

- no-scan-head-check (CVE-2011-2183): detector, the ksmd oops;
- up-read-after-unlock (2016): detector, use_after_free;
- no-unmerge-exit-check (2023): detector, the writer's oops.
"""
from __future__ import annotations

import os

import pytest

import races
import uksm
from helpers import booted, pump, run_json
from helpers import worker_ready as ready
from uksm import logs

# cluster names carry the session's pid: two runs of the suite never collide
PID = os.getpid() % 100000

SMALL = dict(frames=512, va_pages=128, pages_to_scan=200, sleep_ms=1)


def events(log_dir, name: str) -> list[dict]:
    return [ev for ev in logs.iter_events(log_dir) if ev["event"] == name]


def race(hazard: str, fixed: bool, log_dir) -> uksm.Exploration:
    """The hazard's schedule (or, fixed, its choices on the fixed code),
    its window reached (both sides at their points in the trace)."""
    r = races.replay(hazard, fixed, log_dir=str(log_dir))
    assert races.window(hazard, r.trace), r.trace
    return r


def assert_oops(r, log_dir, frame: str, exc: str, task: str) -> None:
    """The detector: an exception in kernel code (``task``: ksmd, or the
    run=2 writer) is an oops: the run fails with status 5, the finding
    names it, and the logs have its traceback (``oops``, rule 6 of ``logs
    check``)."""
    assert r.status == 5 and r.failures[0]["finding"] == "oops", r.failures
    assert exc in r.failures[0]["detail"] and r.failures[0]["detail"].startswith(task)
    oops = events(log_dir, "oops")
    assert len(oops) == 1 and oops[0]["role"] == task, oops
    assert exc in oops[0]["tb"] and frame in oops[0]["tb"], oops[0]["tb"]
    assert any(v.startswith("rule 6: oops") for v in logs.check(log_dir))


def assert_clean(sup, log_dir) -> None:
    end = sup.shutdown()
    assert end["status"] == 0 and not end["oops"] and not end["use_after_free"], end
    assert logs.check(log_dir) == []


def assert_clean_run(r, log_dir) -> None:
    rep = r.outcome.report
    assert r.status == 0 and not r.failures and not rep["use_after_free"] and rep["fsck"]["ok"], r.failures
    assert logs.check(log_dir) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "hazard"])
def test_cve_2011_2183_scan_reaches_the_list_head(fixed, tmp_path):
    """ksm05's task: it madvises and exits before any scan.  ksmd saw the
    list non-empty (ksmd_should_run) and stops before taking the list lock
    (kp:ksmd_scan_wrap); the task exits by the fast path, emptying the
    list; ksmd steps from the list head to ... the list head, whose mm is
    NULL.  With the 2011 re-check ksmd sees the head and stops."""
    r = race("no-scan-head-check", fixed, tmp_path)
    assert r.outcome.report["workers"]["exit_fast"] == 1   # the list emptied while ksmd was in the window
    if fixed:
        assert_clean_run(r, tmp_path)
    else:
        assert_oops(r, tmp_path, "slot_state", "NullPointerDereference", "ksmd")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "hazard"])
def test_2016_up_read_after_the_list_lock(fixed, tmp_path):
    """ksmd finishes an mm with no rmap_items and moves the cursor on under
    the list lock.  Dropping the list lock before mmap_sem lets the task
    exit by the fast path and free its mm first: ksmd's up_read is then on
    a freed mm.  With the 2016 order (up_read first) the same choices let
    the task exit only after the up_read, and nothing is flagged."""
    r = race("up-read-after-unlock", fixed, tmp_path)
    assert r.outcome.report["workers"]["exit_fast"] == 1
    if fixed:
        assert_clean_run(r, tmp_path)
        return
    assert r.status == 1 and r.failures[0]["finding"] == "use_after_free", r.failures
    assert r.outcome.report["use_after_free"] >= 1
    ev = events(tmp_path, "use_after_free")[0]
    assert ev["role"] == "ksmd" and ev["lock"].startswith("mmap_sem:") and ev["op"] == "unlock"
    assert any(v.startswith("rule 7:") for v in logs.check(tmp_path))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "hazard"])
def test_2023_unmerge_walks_a_torn_down_mm(fixed, tmp_path):
    """A task with rmap_items exits by the slow path (exit_mmap destroys
    the VMA table; its slot waits for ksmd) before run=2's unmerge reaches
    its mm: without the ksm_test_exit re-check after mmap_sem, unmerge
    iterates the destroyed VMAs.  With it, the writer skips the mm and the
    write of run is done."""
    r = race("no-unmerge-exit-check", fixed, tmp_path)
    assert r.outcome.report["workers"]["exit_slow"] >= 1
    if fixed:
        assert r.outcome.report["run_store"]["result"] == "done", r.outcome.report
        assert_clean_run(r, tmp_path)
    else:
        assert_oops(r, tmp_path, "unmerge_and_remove_all_rmap_items", "VmaTableFreed", "writer")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["seed", "shipped"])
@pytest.mark.parametrize("rep", range(2))
def test_munlock_at_exit_livelocks_under_the_seed(policy, rep, tmp_path):
    """"ksm: fix deadlock with munlock in exit_mmap" (2009): a task with
    mlocked areas, one of them PROT_NONE (never populated), exits.  exit_mmap
    munlocks first, faulting the absent pages in; the seed's fault-path
    ksm_test_exit check (mm_users is 0 by then) backs every fault out, so
    under ``seed`` the exit faults forever -- the watchdog reports it like a
    hung task -- and under ``shipped`` (check reverted) it exits."""
    with booted(f"tmlock{policy}{rep}{PID}", str(tmp_path), run=0, exit_policy=policy,
                hung_timeout_ms=1500, **SMALL) as sup:
        ch = sup.spawn_worker(8, "identical", 1, mlock=True)
        pump(sup, lambda: ready(sup, ch), what="mlockall done")
        ch.proc.terminate()
        if policy == "seed":
            pump(sup, lambda: sup.hung, what="the livelock report")
            end = sup.shutdown()
            assert end["status"] == 3, end
            h = end["hung_tasks"][0]
            assert h["lock"] == "none (livelock)" and h["pid"] == ch.proc.pid
            assert "keeps faulting in its exit without progress" in h["chain"][0]
            assert any(v.startswith("rule 5: hung task") for v in logs.check(tmp_path))
        else:
            pump(sup, lambda: ch.row not in sup.children, what="the task's exit")
            assert_clean(sup, tmp_path)


@pytest.mark.timeout(60)
def test_lockdep_names_a_lock_taken_against_the_order(tmp_path):
    """The checker is on in the suite (conftest sets UKSM_LOCKDEP=1): zone_lock
    under ksm_mmlist_lock (a leaf) is against the order, a trylock of a
    mutex the task holds is recursive; both are counted and logged, and
    the run fails."""
    with booted(f"tlockdep{PID}", str(tmp_path), run=0, **SMALL) as sup:
        cl = sup.cl
        cl.task.lock(cl.mmlist)
        cl.task.lock(cl.zone)
        cl.task.unlock(cl.zone)
        cl.task.unlock(cl.mmlist)
        cl.task.lock(cl.daemon)
        assert not cl.task.trylock(cl.daemon)
        cl.task.unlock(cl.daemon)
        cl.task.lock(cl.daemon)  # in order, released in order: not reported
        cl.task.lock(cl.mmlist)
        cl.task.unlock(cl.mmlist)
        cl.task.unlock(cl.daemon)
        end = sup.shutdown()
        assert end["lockdep"] == 2 and end["status"] == 1, end
    evs = events(tmp_path, "lockdep")
    assert [(e["kind"], e["lock"], e["held"]) for e in evs] == [
        ("order", "zone_lock", "ksm_mmlist_lock"), ("recursive", "ksm_thread_mutex", "ksm_thread_mutex")]
    assert "test_lockdep_names" in evs[0]["chain"]
    assert sum(v.startswith("rule 8: lockdep") for v in logs.check(tmp_path)) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hazards", [[], ["oom-mmput-in-task"]], ids=["fixed", "hazard"])
def test_2015_oom_mmput_in_the_unmerging_task(hazards, tmp_path):
    """The 2015 linux-next self-deadlock, in the oom-unmerge scenario: the
    unmerger (the run=2 writer) holds the victim's mmap_sem for read; its
    allocation's OOM kill runs the victim's mmput in the unmerger itself,
    and __ksm_exit's slow path takes down_write on that same semaphore.
    lockdep names it; the watchdog then reports the hang.  Without the
    hazard the same scenario completes with no lockdep report.

    The window is the OOM victim being the mm the writer is unmerging.
    2.6.32's badness() ranks by total_vm, which ties between equal
    workers, and the tie goes to the first task -- not necessarily the
    first mm on the slot list, whose order depends on where ksmd's cursor
    stood at each __ksm_enter.  One worker is the schedule that makes the
    mm being unmerged the victim; its 256 identical pages (one KSM page)
    need more than mem_limit leaves to unmerge."""
    args = ["--scenario", "oom-unmerge", "--workers", "1", "--workload", "identical", "--pages", "256",
            "--pages-to-scan", "1000", "--sleep-ms", "5", "--hung-task-timeout", "2",
            "--log-dir", str(tmp_path)]
    for h in hazards:
        args += ["--hazard", h]
    r, status = run_json(*args, timeout=100)
    if hazards:
        assert status == 3 and r["lockdep"] >= 1 and r["hung_tasks"], r
        ev = events(tmp_path, "lockdep")[0]
        assert ev["role"] == "writer" and ev["kind"] == "recursive" and ev["op"] == "down_write"
        assert ev["lock"] == ev["held"] and ev["lock"].startswith("mmap_sem:")
        assert "oom_kill_and_mmput" in ev["chain"] and "ksm_exit" in ev["chain"]
        # the window: the victim's mmap_sem is the one the writer holds
        assert ev["lock"] == f"mmap_sem:mm{events(tmp_path, 'oom_kill')[0]['victim_mm']}"
    else:
        assert status == 0 and r["lockdep"] == 0 and r["workers"]["oom_killed"] >= 1, r
        assert events(tmp_path, "lockdep") == []
        # the window was reached: the victim was the mm being unmerged
        assert events(tmp_path, "oom_kill")[0]["victim_mm"] == events(tmp_path, "unmerge")[0]["mm"]
