"""A task table in a bytearray and the semaphores of one test: the lock
protocol's own tests (test_lock_protocol, test_locktrace) drive
``uksm.kernel.locks`` on it, with no cluster at all."""
from __future__ import annotations

from typing import Any

import posix_ipc

from uksm.kernel.layout import E_HELD, E_LOCK, E_SINCE, E_SPINS, E_WORD, ESIZE, T_LOCKS, T_PID
from uksm.kernel.locks import WRITER, Lock, PyTask, Task

ROW = 100          # words per task row in the fake task table
NROWS = 4
UNITS = 3          # units of the test's mmap_sem


class Table:
    """A task table of NROWS rows and the semaphores of one test."""

    def __init__(self, name: str, task_cls: type[PyTask] = Task) -> None:
        self.task_cls = task_cls
        self.buf = bytearray(8 * ROW * NROWS)
        self.q = memoryview(self.buf).cast("q")
        self.name = name
        self.sems: list[posix_ipc.Semaphore] = []
        for r in range(NROWS):
            self.q[r * ROW + T_PID] = 1000 + r

    def lock(self, cls: int, units: int = 1, mm: int = 0) -> Lock:
        sem = posix_ipc.Semaphore(f"/uksmtest.{self.name}.s{len(self.sems)}", posix_ipc.O_CREX,
                                  mode=0o600, initial_value=units)
        self.sems.append(sem)
        return Lock(sem, units, cls, mm)

    def task(self, row: int, **kw: Any) -> PyTask:
        return self.task_cls(self.q, row * ROW, row, **kw)

    def entry(self, row: int, cls: int) -> dict[str, int]:
        e = row * ROW + T_LOCKS + cls * ESIZE
        w = self.q[e + E_WORD]
        return {"lock": self.q[e + E_LOCK], "seq": w >> 3, "writer": w & WRITER,
                "state": w & 3, "held": self.q[e + E_HELD], "spins": self.q[e + E_SPINS],
                "since": self.q[e + E_SINCE]}

    def rows(self, *rows: int) -> list[tuple[int, int]]:
        return [(r, r * ROW) for r in rows]

    def close(self) -> None:
        for s in self.sems:
            s.unlink()
            s.close()


# the C core's Task when it is built, and the reference
IMPLS = {"python": PyTask} if Task is PyTask else {"c": Task, "python": PyTask}
