"""Lock tracing (uksm.kernel.locktrace, UKSM_LOCKTRACE=1): every hold is
reported once, as the lock it is -- down_write one write hold of mmap_sem,
not also its writer mutex; lock_bounded one acquire, not also its trylock;
a failed trylock nothing -- on both implementations of the protocol."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from locktable import IMPLS, Table
from uksm.kernel.layout import C_DAEMON, C_MMAP, C_PTL, C_WMUTEX
from uksm.kernel.locks import LockAbort
from uksm.kernel.locktrace import LockTracing

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=list(IMPLS))
def tb(request: pytest.FixtureRequest) -> Iterator[Table]:
    cls = type(f"Traced{request.param}", (LockTracing, IMPLS[request.param]), {})
    t = Table(f"tltr{os.getpid()}", cls)
    try:
        yield t
    finally:
        t.close()


def traced(tb: Table, row: int) -> tuple[Any, list[tuple[str, str, str, int]]]:
    seen: list[tuple[str, str, str, int]] = []
    t = tb.task(row)
    t.on_lock = lambda op, lk, mode, ns: seen.append((op, lk.name, mode, ns))
    return t, seen


def test_each_hold_once_as_the_lock_it_is(tb: Table) -> None:
    t, seen = traced(tb, 0)
    mx, sem, wmx = tb.lock(C_DAEMON), tb.lock(C_MMAP, units=3, mm=4), tb.lock(C_WMUTEX, mm=4)
    t.lock(mx)
    t.lock(sem)
    t.unlock(sem)
    t.unlock(mx)
    t.down_write(sem, wmx)
    t.up_write(sem, wmx)
    assert t.trylock(mx)
    t.unlock(mx)
    t.lock_bounded(mx, 1.0, lambda: False)
    t.unlock(mx)
    assert [(op, name, mode) for op, name, mode, _ in seen] == [
        ("acquire", "ksm_thread_mutex", "mutex"), ("acquire", "mmap_sem:mm4", "read"),
        ("release", "mmap_sem:mm4", "read"), ("release", "ksm_thread_mutex", "mutex"),
        ("acquire", "mmap_sem:mm4", "write"), ("release", "mmap_sem:mm4", "write"),
        ("acquire", "ksm_thread_mutex", "mutex"), ("release", "ksm_thread_mutex", "mutex"),
        ("acquire", "ksm_thread_mutex", "mutex"), ("release", "ksm_thread_mutex", "mutex")]
    assert all(ns >= 0 for _, _, _, ns in seen)


def test_failed_trylock_and_abandoned_wait_report_nothing(tb: Table) -> None:
    holder, _ = traced(tb, 0)
    t, seen = traced(tb, 1)
    mx = tb.lock(C_PTL, mm=2)
    holder.lock(mx)
    assert not t.trylock(mx)
    t.abort = lambda: True  # the wait is abandoned at its first slice
    with pytest.raises(LockAbort):
        t.lock(mx)
    holder.unlock(mx)
    assert seen == []


def test_a_blocked_lock_reports_how_long_it_waited(tb: Table) -> None:
    holder, _ = traced(tb, 0)
    t, seen = traced(tb, 1)
    mx = tb.lock(C_PTL, mm=2)
    holder.lock(mx)
    slices = []

    def abort() -> bool:
        slices.append(1)
        holder.unlock(mx)  # the waiter takes the unit at its next slice
        return False
    t.abort = abort
    t.lock(mx)
    (op, name, mode, ns), = seen
    assert (op, name, mode) == ("acquire", mx.name, "mutex") and slices == [1]
    assert ns >= 20_000_000  # at least the one slice it slept (WAIT_SLICE, 20 ms)
    t.unlock(mx)
