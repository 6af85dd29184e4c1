"""A bounded wait for a lock (``Task.lock_bounded``, issue 15): the daemon's
requests take ksm_thread_mutex through it (``ctl``, ``fsck``), pumping the
main loop's duties between two slices of the wait.

The wait follows the lock protocol, so the watchdog and recovery see it
as any other (the entry WAITING with E_SINCE set, E_SPINS growing); it
gives up after its timeout, or when its ``between`` hook says so (a hung
task was reported), with its entry back to IDLE and no unit taken.  The
holder here is ksmd, stopped at a ksmd point while it holds the mutex.
"""
from __future__ import annotations

import os

import pytest

import uksm
from uksm.kernel.layout import E_SINCE, E_SPINS, E_WORD, H_KSMD_POINT
from uksm.kernel.locks import HELD, IDLE, WAITING, LockTimeout

HOLD_MS = 4000  # ksmd holds ksm_thread_mutex at its point this long


def _machine(**kw: object) -> uksm.Machine:
    return uksm.Machine(name=f"tlkb{os.getpid()}x{len(kw)}", frames=128, sleep_millisecs=5, **kw)


def _ksmd_holds_the_mutex(m: uksm.Machine) -> None:
    t = m.task(pages=2)
    t.fill(1)
    m.wait_full_scans(1)
    m.arm("ksmd_scan_mmap_sem", delay_ms=HOLD_MS)     # ksmd stops there, holding the mutex
    m.wait(lambda: m._t().cl.q[H_KSMD_POINT] == -1, timeout=30, what="ksmd at the point")


@pytest.mark.timeout(90)
def test_a_bounded_wait_is_seen_gives_up_after_its_timeout_then_takes_the_lock() -> None:
    with _machine() as m:
        _ksmd_holds_the_mutex(m)
        tr = m._t()
        cl = tr.cl
        task, lk = cl.task, cl.daemon
        e = task.ebase[lk.cls]
        assert tr.sup.ksmd is not None
        ksmd_pid = tr.sup.ksmd.proc.pid
        seen: list[tuple[int, bool, list[int]]] = []

        def between() -> bool:
            tr.tick()
            seen.append((cl.q[e + E_WORD] & 3, cl.q[e + E_SINCE] != 0, cl.holders(lk.lid)))
            return False
        spins = cl.q[e + E_SPINS]
        with pytest.raises(LockTimeout) as ei:
            task.lock_bounded(lk, 0.2, between)
        assert not ei.value.hung and ei.value.timeout == 0.2
        # while it waited, the entry said so, as the watchdog reads it
        assert seen and all(st == WAITING and since and holders == [ksmd_pid]
                            for st, since, holders in seen), seen
        assert cl.q[e + E_SPINS] > spins
        # given up: nothing taken, nothing waited for
        assert cl.q[e + E_WORD] & 3 == IDLE and cl.q[e + E_SINCE] == 0
        assert not task.holds(lk)
        seen.clear()
        task.lock_bounded(lk, 30.0, between)  # ksmd lets it go after its delay
        assert seen and cl.q[e + E_WORD] & 3 == HELD and task.holds(lk)
        task.unlock(lk)
        assert m.fsck()["ok"]
    assert m.report is not None and m.report["status"] == 0, m.report


@pytest.mark.timeout(90)
def test_fsck_blocked_on_the_mutex_gives_up_once_the_watchdog_reports_its_wait() -> None:
    with _machine(hung_task_timeout=0.5) as m:
        _ksmd_holds_the_mutex(m)
        cl = m._t().cl
        e = cl.task.ebase[cl.daemon.cls]
        with pytest.raises(uksm.HungTask, match="ksm_thread_mutex a hung task was reported") as ei:
            m.fsck()
        # what was reported is the daemon's own wait (this process: in-process)
        assert any(r["lock"] == "ksm_thread_mutex" and r["pid"] == os.getpid()
                   for r in ei.value.reports), ei.value.reports
        assert "nothing was changed" in str(ei.value)
        assert cl.q[e + E_WORD] & 3 == IDLE and not cl.task.holds(cl.daemon)
    assert m.report is not None and m.report["status"] == 3, m.report
