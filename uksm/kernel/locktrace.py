"""Lock tracing: every lock taken and released, as events (UKSM_LOCKTRACE=1).

A lock hold is not logged by default: ksmd takes the pte lock and zone_lock
for every merge, and a log line costs more than the merge.  With
``UKSM_LOCKTRACE=1`` in the environment (``uksm run --trace-locks``,
``uksm inject --trace-locks``) every task of the cluster is a
:class:`TracedTask`, which reports each outermost ``lock`` / ``trylock`` that
succeeded / ``down_write`` / ``lock_bounded`` after it returns and each
``unlock`` / ``up_write`` before it, to ``on_lock``: the cluster logs them as
``lock_acquire`` and ``lock_release`` (docs/EVENTS.md), and ``uksm logs DIR
trace`` draws each pair as a slice.  Switched off, nothing of this runs:
``Cluster.new_task`` makes a plain ``Task`` (the C core's fast path).

The report follows the lock, not its implementation: ``down_write`` is one
hold of ``mmap_sem`` in ``write`` mode, not also one of ``mmap_wmutex``
(its inner ``lock``), and ``lock_bounded``'s inner ``trylock`` is not a
second acquire -- the depth counter keeps inner operations quiet.  A task
takes at most one lock of each class at a time (layout.LOCK_CLASSES), so
a task row's holds of one class never overlap: a trace lays them on one
row.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from uksm.kernel.locks import Lock, Task

#: on_lock(op, lock, mode, waited_ns): op "acquire" or "release"; mode
#: "mutex", "read" (one unit of an rw semaphore) or "write" (all of them)
OnLock = Callable[[str, Lock, str, int], None]


def mode_of(lk: Lock) -> str:
    """``read`` for a unit of an rw semaphore (mmap_sem), else ``mutex``."""
    return "read" if lk.units > 1 else "mutex"


class LockTracing:
    """The tracing half of :class:`TracedTask`, over any Task class (the
    tests put it over ``PyTask`` too)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.on_lock: OnLock | None = None
        self._depth = 0  # >0 inside a traced operation: its inner ones are not reported

    def _acquired(self, lk: Lock, mode: str, t0: int) -> None:
        if not self._depth and self.on_lock is not None:
            self.on_lock("acquire", lk, mode, time.monotonic_ns() - t0)

    def _releasing(self, lk: Lock, mode: str) -> None:
        if not self._depth and self.on_lock is not None:
            self.on_lock("release", lk, mode, 0)

    def lock(self, lk: Lock, check: bool = True) -> None:
        t0 = time.monotonic_ns()
        self._depth += 1
        try:
            super().lock(lk, check)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._acquired(lk, mode_of(lk), t0)

    def trylock(self, lk: Lock) -> bool:
        t0 = time.monotonic_ns()
        self._depth += 1
        try:
            got: bool = super().trylock(lk)  # type: ignore[misc]
        finally:
            self._depth -= 1
        if got:
            self._acquired(lk, mode_of(lk), t0)
        return got

    def lock_bounded(self, lk: Lock, timeout: float, between: Callable[[], bool]) -> None:
        t0 = time.monotonic_ns()
        self._depth += 1
        try:
            super().lock_bounded(lk, timeout, between)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._acquired(lk, mode_of(lk), t0)

    def unlock(self, lk: Lock) -> None:
        self._releasing(lk, mode_of(lk))
        self._depth += 1
        try:
            super().unlock(lk)  # type: ignore[misc]
        finally:
            self._depth -= 1

    def down_write(self, sem: Lock, wmutex: Lock) -> None:
        t0 = time.monotonic_ns()
        self._depth += 1
        try:
            super().down_write(sem, wmutex)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._acquired(sem, "write", t0)

    def up_write(self, sem: Lock, wmutex: Lock) -> None:
        self._releasing(sem, "write")
        self._depth += 1
        try:
            super().up_write(sem, wmutex)  # type: ignore[misc]
        finally:
            self._depth -= 1


class TracedTask(LockTracing, Task):
    """Task whose lock operations are reported to ``on_lock``."""


__all__ = ["TracedTask", "LockTracing", "OnLock", "mode_of"]
