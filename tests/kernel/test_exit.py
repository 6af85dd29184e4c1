"""Exit, OOM and the seed's deadlock (issue 4).

The fast and slow paths of __ksm_exit, ksmd finishing a slow-path exit,
exits while ksmd is inside the mm, the oom-unmerge scenario under each exit
policy, and each hazard caught by fsck or the leak report while the default
policy stays clean under the same test.
"""
from __future__ import annotations

import glob
import json
import os
import signal

import pytest

import uksm
from helpers import booted, pump, run_json
from helpers import echo_run as set_run
from helpers import worker_ready as ready
from uksm.host import shm
from uksm.kernel import killpoints
from uksm.kernel.layout import (
    K_FULL_SCANS,
    M_ID,
    M_RMAP_ITEMS,
    M_SLOT_RMAP,
    M_SLOT_USED,
    S_MISMATCHES,
    stats_block,
)

# cluster names are per test session: two runs of the suite at once never collide
PID = os.getpid() % 100000


def mm_objects(name: str, mm_id: int) -> list[str]:
    return [o for o in shm.leftovers(name) if f".mm{mm_id}" in o]


def finish(sup) -> dict:
    """Stop every worker through its exit path, let ksmd free what is left,
    stop ksmd, fsck."""
    assert sup.stop_workers(timeout=60), f"workers did not exit: hung={sup.hung}"
    sup.ksmdctl.wait_frees()
    sup.stop_ksmd()
    return sup.final_fsck()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rep", range(5))
def test_fast_path_when_ksmd_is_stopped(rep):
    """run=0: no rmap_items, not at the cursor: the exiting task frees its
    slot itself (fast path) and its address space is gone at once."""
    name = f"tfast{rep}p{PID}"
    with uksm.Machine(name=name, run=0, frames=1024, max_pages=64) as m:
        t = m.task(pages=64)
        t.fill(0x40 + rep)
        assert mm_objects(name, t.mm), "the address space exists while the task lives"
        assert t.exit() == "fast"
        assert m.stats()["exit_fast"] == 1 and m.stats()["exit_slow"] == 0
        assert mm_objects(name, t.mm) == [], "fast path: segment and semaphores unlinked at once"
    assert m.report["status"] == 0 and m.report["fsck"]["ok"], m.report["fsck"]["errors"]
    assert m.report["integrity"] == {"pages_verified": 64, "mismatches": 0}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rep", range(5))
def test_slow_path_leaves_the_slot_to_ksmd(rep, tmp_path):
    """ksmd holds rmap_items for the mm: slow path; the mm outlives its task
    until ksmd frees the slot and drops the last mm_count."""
    name = f"tslow{rep}p{PID}"
    with booted(name, str(tmp_path), run=1, frames=1024, va_pages=256, pages_to_scan=1000,
                sleep_ms=1) as sup:
        q = sup.cl.q
        ch = sup.spawn_worker(64, "dup:4", rep)
        pump(sup, lambda: ready(sup, ch), what="worker ready")
        mm = sup.mms[ch.mm]
        pump(sup, lambda: q[mm.base + M_RMAP_ITEMS] > 0 and q[K_FULL_SCANS] >= 2, what="rmap_items")
        set_run(sup, 0)      # ksmd keeps its rmap_items but stops scanning
        assert q[mm.base + M_SLOT_RMAP] > 0
        ch.proc.terminate()
        pump(sup, lambda: ch.row not in sup.children, what="worker reaped")
        st = stats_block(q)
        assert st["exit_slow"] == 1 and st["exit_fast"] == 0
        assert q[mm.base + M_ID] == ch.mm and q[mm.base + M_SLOT_USED], "slot left for ksmd"
        assert mm_objects(name, ch.mm), "the mm outlives its task while ksmd holds mm_count"
        set_run(sup, 1)
        pump(sup, lambda: not mm_objects(name, ch.mm), what="ksmd to free the slot (last mmdrop)")
        fs = finish(sup)
        assert fs["ok"], fs["errors"]
    events = sorted((json.loads(line) for f in glob.glob(str(tmp_path / "*.jsonl")) for line in open(f)),
                    key=lambda e: e["mono_ns"])
    freed = [e for e in events if e["event"] == "slot_freed" and e["mm"] == ch.mm]
    assert [e["role"] for e in freed] == ["ksmd"]
    gone = [e for e in events if e["event"] == "mm_freed" and e["mm"] == ch.mm]
    drops = [e for e in events if e["event"] == "mmdrop" and e["mm"] == ch.mm]
    assert len(gone) == 1 and drops[-1]["mm_count"] == 0 and drops[-1]["ref"] == "ksm"
    assert drops[-1]["role"] == "ksmd"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point,sig", [
    ("ksmd_scan_mmap_sem", signal.SIGTERM), ("ksmd_between_wp_and_replace", signal.SIGTERM),
    ("ksmd_break_cow", signal.SIGTERM), ("ksmd_break_ksm_window", signal.SIGTERM),
    ("ksmd_between_wp_and_replace", signal.SIGKILL), ("ksmd_break_cow", signal.SIGKILL)])
def test_exit_while_ksmd_is_inside_the_mm(point, sig):
    """ksmd signals the owner while it is merging or breaking COW in its mm:
    no deadlock, no leak, the other workers' data intact."""
    name = f"tinside{PID}"
    with booted(name, run=1, frames=2048, va_pages=300, pages_to_scan=500, sleep_ms=2) as sup:
        q = sup.cl.q
        kids = [sup.spawn_worker(128, "dup:8", 1, churn_ms=5) for _ in range(3)]
        pump(sup, lambda: all(ready(sup, c) for c in kids) and q[K_FULL_SCANS] >= 2, what="merged")
        killpoints.arm_ksmd(sup.cl, point, sig)
        if point in ("ksmd_break_cow", "ksmd_break_ksm_window"):
            set_run(sup, 2)
        pump(sup, lambda: len(sup.children) < 3, what="ksmd to signal a worker at " + point)
        fs = finish(sup)
        assert fs["ok"], fs["errors"]
        assert q[S_MISMATCHES] == 0 and not sup.hung


def _oom(policy: str, tmp_path, *extra: str) -> tuple[dict, int]:
    return run_json("--scenario", "oom-unmerge", "--workers", "4", "--pages", "256",
                    "--pages-to-scan", "1000", "--sleep-ms", "5", "--exit-policy", policy,
                    "--hung-task-timeout", "2", "--log-dir", str(tmp_path), *extra, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("rep", range(3))
def test_oom_unmerge_seed_completes(rep, tmp_path):
    r, status = _oom("seed", tmp_path, "--seed", str(rep))
    assert status == 0, r
    assert r["workers"]["oom_killed"] >= 1
    assert r["hung_tasks"] == [] and r["fsck"]["ok"] and r["ipc_leftovers"] == []
    assert r["integrity"]["mismatches"] == 0
    assert r["ksm"]["pages_shared"] == r["ksm"]["pages_sharing"] == 0, "unmerging completed"
    # the seed's writer has no PF_OOM_ORIGIN: the victims are workers, the write completes
    assert r["run_store"] == {"value": 2, "result": "done", "run": 2}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("rep", range(3))
def test_oom_unmerge_legacy_deadlocks_and_is_reported(rep, tmp_path):
    r, status = _oom("legacy", tmp_path, "--seed", str(rep))
    assert status == 3, r
    assert r["ipc_leftovers"] == []
    assert r["hung_tasks"], "the watchdog reported the deadlock"
    chains = " / ".join(line for h in r["hung_tasks"] for line in h["chain"])
    assert "ksm_thread_mutex" in chains and "free frames" in chains
    assert any(h["deadlock"] for h in r["hung_tasks"])
    assert all(h["waited_s"] < 10 for h in r["hung_tasks"])
    assert r["run_store"]["result"] == "hung"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("rule", ["2.6.32", "4.1"])
def test_oom_unmerge_shipped_kills_the_writer(rule, tmp_path):
    """2.6.32 as released: run_store sets PF_OOM_ORIGIN on the writer of
    run=2, so the OOM killer picks the writer itself, under either OOM
    rule: its fault fails (-ENOMEM), run goes back to 0, the write fails;
    no worker is killed and nothing hangs.  The mms it did not reach keep
    their rmap_items: their exits leave the slots to a ksmd that no longer
    runs, and fsck reports those mm_structs pinned (as the kernel leaves
    them until run=1)."""
    r, status = _oom("shipped", tmp_path, "--oom-rule", rule)
    assert r["run_store"] == {"value": 2, "result": "oom-killed", "run": 0}, r["run_store"]
    assert r["hung_tasks"] == [] and r["ipc_leftovers"] == []
    assert r["workers"]["oom_killed"] == 1 and r["workers"]["exited"] == 4
    assert r["integrity"]["mismatches"] == 0
    assert status == 4 and r["fsck"]["errors"], r["fsck"]
    assert all("never freed" in e and "ksmd not running" in e for e in r["fsck"]["errors"])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hazard,expect_ok", [(None, True), ("no-fast-path", False)])
def test_hazard_no_fast_path_leaks_the_mm(hazard, expect_ok, tmp_path):
    """Without the fast path an exit while ksmd is stopped never frees the
    address space: the leak report catches it; the seed is clean."""
    args = ["--run", "0", "--workers", "2", "--pages", "32", "--log-dir", str(tmp_path)]
    if hazard:
        args += ["--hazard", hazard]
    r, status = run_json(*args, timeout=80)
    assert r["ipc_leftovers"] == []
    if expect_ok:
        assert status == 0 and r["fsck"]["ok"] and r["workers"]["exit_fast"] == 2
    else:
        assert status == 4 and not r["fsck"]["ok"]
        assert sum("never freed" in e for e in r["fsck"]["errors"]) == 2
        assert r["workers"]["exit_slow"] == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "hazard"])
def test_hazard_no_exit_checks_leaks_a_frame(fixed):
    """The run=2 writer's break_ksm sees a KSM page; before it faults,
    exit_mmap zaps the page table (the window, kp:ksmd_break_ksm_window,
    reached by a schedule: tests/races.py).  With the seed's ksm_test_exit
    check the fault installs nothing; without it, it reinstates a page
    that the page-table teardown then loses: fsck finds the leaked frame."""
    import races
    r = races.replay("no-exit-checks", fixed)
    assert races.window("no-exit-checks", r.trace), r.trace
    fs = r.outcome.report["fsck"]
    leaked = [e for e in fs["errors"] if "leaked" in e]
    if fixed:
        assert fs["ok"] and r.status == 0, fs["errors"]
    else:
        assert leaked and r.status == 4 and r.failures[0]["finding"] == "fsck", fs["errors"]


@pytest.mark.timeout(60)
def test_main_loop_blocked_on_a_dead_tasks_lock_recovers():
    """A worker dies holding ksm_mmlist_lock (SIGKILL inside __ksm_enter),
    and the supervisor's main thread then needs that lock (creating the
    next address space) without ever polling: the death must still be
    noticed and recovered, or this deadlocks."""
    name = f"tdeadlist{PID}"
    with booted(name, run=1, frames=1024, va_pages=256, pages_to_scan=500, sleep_ms=2) as sup:
        ch = sup.spawn_worker(32, "dup:4", 1, kill_point="ksm_enter_locked",
                              kill_sig=signal.SIGKILL)
        ch.proc.wait(timeout=30)            # dead, holding the list lock; nobody polled
        other = sup.spawn_worker(32, "dup:4", 2)   # mm_create takes ksm_mmlist_lock
        pump(sup, lambda: ready(sup, other), what="the next worker")
        fs = finish(sup)
        assert fs["ok"], fs["errors"]
        assert sup.cl.q[S_MISMATCHES] == 0
