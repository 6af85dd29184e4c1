"""Later KSM races on a flag (issue 11): each hazard removes one fix, a
detector catches the race it reopens, and the fixed code stays clean under
the very same test.  The race windows are held open with ksmd delay points,
so each test hits its race every time; each runs a few times.

- no-scan-head-check (CVE-2011-2183): detector, the ksmd oops;
- up-read-after-unlock (2016): detector, use_after_free;
- no-unmerge-exit-check (2023): detector, the ksmd oops.
"""
from __future__ import annotations

import json
import os

import pytest
from test_exit import ready, set_run

from helpers import booted, pump, run_json
from uksm import logs
from uksm.kernel import killpoints
from uksm.kernel.layout import H_KSMD_POINT, K_FULL_SCANS, stats_block

# cluster names carry the session's pid: two runs of the suite never collide
PID = os.getpid() % 100000

SMALL = dict(frames=512, va_pages=128, pages_to_scan=200, sleep_ms=1)


def events(log_dir, name: str) -> list[dict]:
    return [ev for ev in logs.iter_events(log_dir) if ev["event"] == name]


def ksm05_exit_in_window(sup, point: str, ms: int, seed: int) -> None:
    """LTP ksm05's task (madvise, touch nothing) exits by the fast path
    while ksmd, started by run=1, waits at delay point ``point``."""
    q = sup.cl.q
    ch = sup.spawn_worker(8, "identical", seed, no_touch=True)
    pump(sup, lambda: ready(sup, ch), what="madvise done")
    killpoints.arm_ksmd_delay(sup.cl, point, ms)
    set_run(sup, 1)
    pump(sup, lambda: q[H_KSMD_POINT] == -1, what="ksmd in the window")
    ch.proc.terminate()
    pump(sup, lambda: ch.row not in sup.children, what="the task's exit")


def ksmd_batch_over(sup) -> None:
    """run=0 through a writer: it takes ksm_thread_mutex, which ksmd holds
    for its whole batch (the delay included)."""
    sup.write_run(0, timeout=30)


def assert_oops(sup, tmp_path, frame: str, exc: str, task: str) -> None:
    """The detector: an exception in kernel code (``task``: ksmd, or the
    run=2 writer) is an oops: the run fails with status 5, the report's
    ``oops`` names it, and the logs have its traceback (``oops``, rule 6
    of ``logs check``).  (Checked through the report's text and the log
    event only, so that it holds for either oops machinery the lead keeps.)"""
    pump(sup, lambda: events(tmp_path, "oops"), what=f"the {task}'s oops")
    end = sup.shutdown()
    assert end["status"] == 5, end
    assert exc in json.dumps(end["oops"]), end["oops"]
    oops = events(tmp_path, "oops")
    assert len(oops) == 1 and oops[0]["role"] == task, oops
    assert exc in oops[0]["tb"] and frame in oops[0]["tb"], oops[0]["tb"]
    assert any(v.startswith("rule 6: oops") for v in logs.check(tmp_path))


def assert_clean(sup, tmp_path) -> None:
    end = sup.shutdown()
    assert end["status"] == 0 and not end["oops"] and not end["use_after_free"], end
    assert logs.check(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hazards", [[], ["no-scan-head-check"]], ids=["fixed", "hazard"])
@pytest.mark.parametrize("rep", range(3))
def test_cve_2011_2183_scan_reaches_the_list_head(hazards, rep, tmp_path):
    """ksm05's task: it madvises and exits before any scan.  ksmd saw the
    list non-empty (ksmd_should_run) and stops before taking the list lock;
    the task exits by the fast path, emptying the list; ksmd steps from the
    list head to ... the list head, whose mm is NULL."""
    with booted(f"thead{rep}{len(hazards)}{PID}", str(tmp_path), run=0, hazards=hazards, **SMALL) as sup:
        q = sup.cl.q
        ksm05_exit_in_window(sup, "ksmd_scan_wrap", 2000, rep)
        assert stats_block(q)["exit_fast"] == 1  # the list is empty, ksmd still in the window
        if hazards:
            assert_oops(sup, tmp_path, "slot_state", "NullPointerDereference", "ksmd")
        else:
            ksmd_batch_over(sup)
            assert_clean(sup, tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hazards", [[], ["up-read-after-unlock"]], ids=["fixed", "hazard"])
@pytest.mark.parametrize("rep", range(3))
def test_2016_up_read_after_the_list_lock(hazards, rep, tmp_path):
    """ksmd finishes an mm with no rmap_items and moves the cursor on under
    the list lock.  Dropping the list lock before mmap_sem lets the task
    exit by the fast path and free its mm first: ksmd's up_read is then on
    a freed mm (the delay point holds the window open).  With the 2016
    order the task's exit comes after the up_read and nothing is flagged."""
    with booted(f"tuaf{rep}{len(hazards)}{PID}", str(tmp_path), run=0, hazards=hazards, **SMALL) as sup:
        q = sup.cl.q
        ksm05_exit_in_window(sup, "ksmd_between_unlocks", 1500, rep)
        ksmd_batch_over(sup)
        if hazards:
            assert stats_block(q)["exit_fast"] == 1  # (fixed: the exit waits for the list lock, then
            #                              takes the fast path or finds ksmd freed the slot)
            pump(sup, lambda: events(tmp_path, "use_after_free"), what="the use_after_free event")
            end = sup.shutdown()
            assert end["status"] == 1 and end["use_after_free"] >= 1, end
            assert any("use after free" in e for e in end["errors"])
            ev = events(tmp_path, "use_after_free")[0]
            assert ev["role"] == "ksmd" and ev["lock"].startswith("mmap_sem:") and ev["op"] == "unlock"
            assert any(v.startswith("rule 7:") for v in logs.check(tmp_path))
        else:
            assert_clean(sup, tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hazards", [[], ["no-unmerge-exit-check"]], ids=["fixed", "hazard"])
@pytest.mark.parametrize("rep", range(2))
def test_2023_unmerge_walks_a_torn_down_mm(hazards, rep, tmp_path):
    """A task with rmap_items exits by the slow path while ksmd is stopped:
    its exit completes (exit_mmap destroys the VMA table) and its slot
    waits for ksmd.  run=2 then walks it: without the ksm_test_exit
    re-check after mmap_sem, unmerge iterates the destroyed VMAs."""
    with booted(f"tvma{rep}{len(hazards)}{PID}", str(tmp_path), run=1, hazards=hazards, **SMALL) as sup:
        q = sup.cl.q
        ch = sup.spawn_worker(16, "identical", rep)
        pump(sup, lambda: ready(sup, ch) and q[K_FULL_SCANS] >= 2, what="scanned")
        set_run(sup, 0)
        ch.proc.terminate()
        pump(sup, lambda: ch.row not in sup.children, what="the task's exit")
        assert stats_block(q)["exit_slow"] == 1
        r = sup.write_run(2, timeout=30)   # the writer unmerges (run_store)
        if hazards:
            assert r["status"] == 70, r
            assert_oops(sup, tmp_path, "unmerge_and_remove_all_rmap_items", "VmaTableFreed", "writer")
        else:
            assert r["result"] == "done", r
            assert_clean(sup, tmp_path)


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
