"""The lock protocol of uksm.kernel.locks, step by step, in-process (issue 16,
mutation survivors of locks.py): after every operation the task's entry
(E_LOCK, the word's seq/writer/state, E_HELD, E_SPINS, E_SINCE) and the
semaphore's value are exactly what the protocol in locks.py's top comment
says -- because recover() does its arithmetic on both, an extra post, a
missed word transition or a wrong E_HELD would make it mis-count a dead
holder's units.

No cluster: a task table in a bytearray and semaphores of our own, named
``/uksmtest.<name>.<what>``, outside the ``uksm.`` namespace: a concurrent
session's leak fixture takes objects with no recorded supervisor and no
process naming them for its own leftovers and unlinks them (seen while a
mutation run was going).
Every test runs on both implementations of the protocol's uncontended
operations: ``PyTask`` (locks.py, the reference) and ``Task`` (lock,
trylock and unlock in C, uksm/kernel/_lockcore.c), so the C core is held to
every word the reference writes.  tests/kernel/test_lockcore.py runs this
file again with the C core switched off (``UKSM_LOCKS=python``: the Python
``Lock`` fields too).
Contended paths are driven without threads where possible: ``Task.abort``
is polled after every timed-out slice of a blocked wait, so the test acts
from inside the wait (it checks the WAITING entry, then releases the holder's
unit or abandons the wait) -- deterministic, no timing.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import posix_ipc
import pytest

from locktable import IMPLS, NROWS, ROW, UNITS, Table
from uksm.kernel import locks
from uksm.kernel.layout import (
    C_ALLOC,
    C_DAEMON,
    C_FRAMES,
    C_MMAP,
    C_MMLIST,
    C_PTL,
    C_WMUTEX,
    E_HELD,
    E_LOCK,
    E_SINCE,
    E_SPINS,
    E_WORD,
    ESIZE,
    NCLASS,
    T_LOCKS,
)
from uksm.kernel.locks import HELD, IDLE, RELEASING, WAITING, WRITER, Lock, LockAbort, PyTask, lock_id, lock_name

pytestmark = pytest.mark.timeout(60)

@pytest.fixture(params=list(IMPLS))
def tb(request: pytest.FixtureRequest) -> Iterator[Table]:
    t = Table(f"tlkp{os.getpid()}", IMPLS[request.param])   # the full pid: dev/mutation_reap.py reads it
    try:
        yield t
    finally:
        t.close()


def value(lk: Lock) -> int:
    return int(lk.sem.value)


def test_lock_names_and_ids() -> None:
    assert lock_id(C_MMAP, 5) == (C_MMAP << 40) | 5
    assert lock_name(lock_id(C_MMAP, 5)) == "mmap_sem:mm5"
    assert lock_name(lock_id(C_DAEMON)) == "ksm_thread_mutex"
    assert lock_name(lock_id(C_MMLIST)) == "ksm_mmlist_lock"
    assert lock_name(lock_id(NCLASS)) == f"class{NCLASS}"
    assert lock_name(lock_id(NCLASS - 1, 7)).endswith(":mm7")


def test_mutex_lock_unlock_words_and_value(tb: Table) -> None:
    t = tb.task(0)
    mx = tb.lock(C_DAEMON)
    assert tb.entry(0, C_DAEMON)["state"] == IDLE and value(mx) == 1
    t.lock(mx)
    en = tb.entry(0, C_DAEMON)
    # WAITING then HELD: two transitions, the seq grew by 2
    assert en == {"lock": mx.lid, "seq": 2, "writer": 0, "state": HELD, "held": 0,
                  "spins": 0, "since": 0}
    assert value(mx) == 0 and t.holds(mx)
    t.unlock(mx)
    en = tb.entry(0, C_DAEMON)
    assert (en["seq"], en["state"], en["lock"]) == (4, IDLE, mx.lid)
    assert value(mx) == 1 and not t.holds(mx)
    # the other classes' entries were never touched
    for c in range(NCLASS):
        if c != C_DAEMON:
            assert tb.entry(0, c) == {"lock": 0, "seq": 0, "writer": 0, "state": IDLE,
                                      "held": 0, "spins": 0, "since": 0}


def test_down_read_up_read_take_and_give_one_unit(tb: Table) -> None:
    a, b = tb.task(0), tb.task(1)
    sem = tb.lock(C_MMAP, UNITS, mm=3)
    a.lock(sem)
    b.lock(sem)
    assert value(sem) == UNITS - 2
    for r in (0, 1):
        en = tb.entry(r, C_MMAP)
        assert (en["lock"], en["seq"], en["writer"], en["state"]) == (sem.lid, 2, 0, HELD)
    assert sorted(locks.holders_of(tb.q, tb.rows(0, 1, 2), sem.lid)) == [1000, 1001]
    a.unlock(sem)
    assert value(sem) == UNITS - 1
    assert tb.entry(0, C_MMAP)["state"] == IDLE and tb.entry(1, C_MMAP)["state"] == HELD
    assert locks.holders_of(tb.q, tb.rows(0, 1, 2), sem.lid) == [1001]
    b.unlock(sem)
    assert value(sem) == UNITS


def test_down_write_up_write_take_and_give_every_unit(tb: Table) -> None:
    t = tb.task(0)
    wm, sem = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=3)
    t.down_write(sem, wm)
    assert value(sem) == 0 and value(wm) == 0
    en = tb.entry(0, C_MMAP)
    assert en == {"lock": sem.lid, "seq": 2, "writer": WRITER, "state": HELD, "held": UNITS,
                  "spins": 0, "since": 0}
    assert tb.entry(0, C_WMUTEX)["state"] == HELD and tb.entry(0, C_WMUTEX)["lock"] == wm.lid
    assert t.holds(sem) and t.holds(wm)
    assert locks.holders_of(tb.q, tb.rows(0), sem.lid) == [1000]
    t.up_write(sem, wm)
    # every unit posted once, no more: an extra post lets a reader in beside a writer
    assert value(sem) == UNITS and value(wm) == 1
    en = tb.entry(0, C_MMAP)
    assert (en["seq"], en["writer"], en["state"], en["held"]) == (4, 0, IDLE, 0)
    assert tb.entry(0, C_WMUTEX)["state"] == IDLE
    # and again: the protocol is repeatable (seq keeps growing)
    t.down_write(sem, wm)
    assert value(sem) == 0 and tb.entry(0, C_MMAP)["seq"] == 6
    t.up_write(sem, wm)
    assert value(sem) == UNITS and value(wm) == 1


def test_up_write_records_each_unit_as_it_posts_it(tb: Table) -> None:
    """E_HELD goes down by one per post, so a writer killed in window B
    is counted exactly: watch the entry from inside sem.release."""
    t = tb.task(0)
    wm, sem = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=3)
    t.down_write(sem, wm)
    seen: list[tuple[int, int, int]] = []

    class Spy:
        def __init__(self, real: posix_ipc.Semaphore) -> None:
            self.real = real

        def release(self) -> None:
            en = tb.entry(0, C_MMAP)
            seen.append((en["held"], en["state"], int(self.real.value)))
            self.real.release()

        def __getattr__(self, k: str) -> Any:
            return getattr(self.real, k)

    real = sem.sem
    sem.sem = Spy(real)  # type: ignore[assignment]
    try:
        t.up_write(sem, wm)
    finally:
        sem.sem = real
    # before each post: RELEASING, E_HELD = units not yet posted
    assert seen == [(3, RELEASING, 0), (2, RELEASING, 1), (1, RELEASING, 2)]
    assert value(sem) == UNITS and tb.entry(0, C_MMAP)["held"] == 0


def test_trylock_success_and_failure(tb: Table) -> None:
    a, b = tb.task(0), tb.task(1)
    mx = tb.lock(C_MMLIST)
    assert a.trylock(mx) is True
    assert value(mx) == 0
    en = tb.entry(0, C_MMLIST)
    assert (en["lock"], en["seq"], en["state"]) == (mx.lid, 2, HELD)
    assert b.trylock(mx) is False
    en = tb.entry(1, C_MMLIST)
    # a failed trylock leaves the entry as it was (two transitions: WAITING
    # and back), no unit taken
    assert (en["lock"], en["seq"], en["state"]) == (0, 2, IDLE)
    assert value(mx) == 0
    a.unlock(mx)
    assert value(mx) == 1


def test_a_holders_failed_trylock_keeps_its_entry_held(tb: Table) -> None:
    """A holder's trylock of what it holds (lockdep's "recursive") fails
    and must leave the entry HELD: left IDLE, recover() counted the unit
    the live holder still had as a dead task's, and the semaphore ended
    one unit over (test_lockcore's random SIGKILLs, 1 run in ~50)."""
    a = tb.task(0)
    mx = tb.lock(C_MMLIST)
    a.lock(mx)
    assert a.trylock(mx) is False
    en = tb.entry(0, C_MMLIST)
    assert (en["lock"], en["seq"], en["state"]) == (mx.lid, 4, HELD)
    # b dies holding nothing: recovery finds no unit of b's
    got = locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(0), tb.rows(1), deadline_s=20)
    assert got == {mx.lid: 0} and value(mx) == 0
    a.unlock(mx)
    assert value(mx) == 1


def test_blocked_lock_shows_waiting_spins_then_holds(tb: Table) -> None:
    """The contended path (_block): while blocked, the entry says WAITING
    with E_SINCE set and E_SPINS bumped at every timed-out slice; once the
    holder posts, the waiter takes the unit and E_SINCE goes back to 0."""
    holder = tb.task(0)
    waits: list[tuple[str, float, list[int]]] = []
    asked: list[int] = []

    def holders(lid: int) -> list[int]:
        asked.append(lid)
        assert holder.holds(mx), "asked once the wait is over: the holder is gone by then"
        return [42]

    waiter = tb.task(1, holders=holders, wait_log_ms=0)
    waiter.on_wait = lambda name, ms, hs: waits.append((name, ms, hs))
    mx = tb.lock(C_PTL, mm=2)
    holder.lock(mx)
    inside: list[dict[str, int]] = []

    def abort() -> bool:
        inside.append(tb.entry(1, C_PTL))
        if len(inside) == 2:
            holder.unlock(mx)   # the unit the waiter takes at its next slice
        return False

    waiter.abort = abort
    waiter.lock(mx)
    assert len(inside) == 2
    for i, en in enumerate(inside):
        assert (en["lock"], en["state"], en["seq"], en["spins"]) == (mx.lid, WAITING, 1, i + 1)
        assert en["since"] > 0
    en = tb.entry(1, C_PTL)
    assert (en["state"], en["seq"], en["spins"], en["since"]) == (HELD, 2, 2, 0)
    assert value(mx) == 0 and waiter.holds(mx) and not holder.holds(mx)
    # the wait was reported once, with what holders() said of this lock while it blocked
    assert len(waits) == 1 and waits[0][0] == mx.name and waits[0][1] > 0
    assert waits[0][2] == [42] and asked == [mx.lid]
    waiter.unlock(mx)
    assert value(mx) == 1


def test_blocked_lock_abandoned_by_abort(tb: Table) -> None:
    """LockAbort: the entry goes back to IDLE (one transition past
    WAITING), E_SINCE to 0, and no unit was taken."""
    holder, waiter = tb.task(0), tb.task(1)
    mx = tb.lock(C_DAEMON)
    holder.lock(mx)
    calls: list[int] = []

    def abort() -> bool:
        calls.append(tb.entry(1, C_DAEMON)["spins"])
        assert len(calls) <= 3, "the wait went on after abort() said True"
        return len(calls) == 3

    waiter.abort = abort
    with pytest.raises(LockAbort) as ei:
        waiter.lock(mx)
    assert str(ei.value) == mx.name
    assert calls == [1, 2, 3]
    en = tb.entry(1, C_DAEMON)
    assert (en["lock"], en["state"], en["seq"], en["spins"], en["since"]) == (mx.lid, IDLE, 2, 3, 0)
    assert value(mx) == 0 and holder.holds(mx)
    assert locks.holders_of(tb.q, tb.rows(0, 1), mx.lid) == [1000]
    holder.unlock(mx)
    assert value(mx) == 1


def test_blocked_writer_holds_part_of_the_units(tb: Table) -> None:
    """down_write against a reader: the writer takes the free units one by
    one (E_HELD counts them), blocks on the reader's, and is listed among
    the holders meanwhile (a reader behind it waits for it)."""
    reader, writer = tb.task(0), tb.task(1)
    wm, sem = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=4)
    reader.lock(sem)
    inside: list[tuple[dict[str, int], list[int]]] = []

    def abort() -> bool:
        inside.append((tb.entry(1, C_MMAP), locks.holders_of(tb.q, tb.rows(0, 1), sem.lid)))
        reader.unlock(sem)
        return False

    writer.abort = abort
    writer.down_write(sem, wm)
    assert len(inside) == 1
    en, holders = inside[0]
    assert (en["state"], en["writer"], en["held"], en["spins"], en["seq"]) == \
        (WAITING, WRITER, UNITS - 1, 1, 1)
    assert sorted(holders) == [1000, 1001]
    en = tb.entry(1, C_MMAP)
    assert (en["state"], en["writer"], en["held"], en["since"]) == (HELD, WRITER, UNITS, 0)
    assert value(sem) == 0
    writer.up_write(sem, wm)
    assert value(sem) == UNITS and value(wm) == 1


def test_wait_begin_spin_end_and_clear_entries(tb: Table) -> None:
    t = tb.task(2)
    t.wait_begin(C_FRAMES, 9)
    en = tb.entry(2, C_FRAMES)
    assert (en["lock"], en["state"], en["seq"]) == (lock_id(C_FRAMES, 9), WAITING, 1)
    assert en["since"] > 0
    t.wait_spin(C_FRAMES)
    t.wait_spin(C_FRAMES)
    assert tb.entry(2, C_FRAMES)["spins"] == 2
    t.wait_end(C_FRAMES)
    en = tb.entry(2, C_FRAMES)
    assert (en["state"], en["seq"], en["since"], en["spins"]) == (IDLE, 2, 0, 2)
    # a writer entry keeps its writer bit across _set; clear_entries drops holdings
    wm, sem = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=1)
    t.down_write(sem, wm)
    t.clear_entries()
    for c in range(NCLASS):
        en = tb.entry(2, c)
        assert en["state"] == IDLE and en["held"] == 0 and en["since"] == 0
    assert tb.entry(2, C_MMAP)["writer"] == WRITER and tb.entry(2, C_MMAP)["seq"] == 3
    assert tb.entry(2, C_ALLOC)["seq"] == 1  # every entry made one transition
    for _ in range(UNITS):
        sem.sem.release()
    wm.sem.release()


# ---- lockdep and the use-after-free hook ---------------------------------------

def test_lockdep_reports_order_recursive_same_class(tb: Table) -> None:
    seen: list[tuple[str, str, str, str]] = []

    def task(row: int) -> PyTask:
        t = tb.task(row)
        t.lockdep = lambda kind, lk, held, op: seen.append((kind, lk.name, lock_name(held), op))
        return t

    wm, sem, ptl, ptl2 = (tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=1),
                          tb.lock(C_PTL, mm=1), tb.lock(C_PTL, mm=2))
    a = task(0)
    a.lock(sem)
    a.lock(ptl)   # in order
    assert seen == []
    a.lock(ptl2)  # a second pte lock: beyond what a row records
    assert seen == [("same_class", "pte_lock:mm2", "pte_lock:mm1", "lock")]
    seen.clear()
    b = task(1)
    b.lock(sem)
    ptl3 = tb.lock(C_PTL, mm=3)
    b.lock(ptl3)
    assert b.trylock(ptl2) is False   # a trylock is never an order report...
    assert seen == []
    ptl4 = tb.lock(C_PTL, mm=4)
    b.lock(ptl4)
    seen.clear()
    b.lock(sem)   # a second reader, under a pte lock
    assert seen == [("recursive", "mmap_sem:mm1", "mmap_sem:mm1", "lock"),
                    ("order", "mmap_sem:mm1", "pte_lock:mm4", "lock")]
    seen.clear()
    assert b.trylock(ptl4) is False   # ...but a recursive one is
    assert seen == [("recursive", "pte_lock:mm4", "pte_lock:mm4", "trylock")]
    seen.clear()
    c = task(2)
    ptl5 = tb.lock(C_PTL, mm=5)
    c.lock(ptl5)
    c.lock(wm, check=False)   # check=False: no report at all
    assert seen == []
    c.unlock(wm)
    c.lock(wm)                # the same, checked: against the order
    assert seen == [("order", "mmap_wmutex", "pte_lock:mm5", "lock")]
    assert value(sem) == UNITS - 3 and value(wm) == 0


def test_lockdep_down_write_checks_from_the_writer_mutex(tb: Table) -> None:
    t = tb.task(0)
    seen: list[tuple[str, str, str]] = []
    t.lockdep = lambda kind, lk, held, op: seen.append((kind, lock_name(held), op))
    wm, sem, ptl = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=1), tb.lock(C_PTL, mm=1)
    t.lock(sem)
    t.lockdep_check(sem, "down_write", from_cls=wm.cls)   # (down_write would deadlock)
    assert seen == [("recursive", "mmap_sem:mm1", "down_write")]
    seen.clear()
    t.unlock(sem)
    t.lock(ptl)
    t.lockdep_check(sem, "down_write", from_cls=wm.cls)
    assert seen == [("order", "pte_lock:mm1", "down_write")]
    t.unlock(ptl)
    seen.clear()
    # a writer blocked half-way (WAITING, E_HELD > 0) already holds units
    e = T_LOCKS + C_MMAP * ESIZE
    tb.q[e + E_LOCK] = sem.lid
    tb.q[e + E_WORD] = (5 << 3) | WRITER | WAITING
    tb.q[e + E_HELD] = 1
    t.lockdep_check(ptl, "lock")
    assert seen == []            # pte_lock after mmap_sem: in order
    t.lockdep_check(sem, "lock")
    assert seen == [("recursive", "mmap_sem:mm1", "lock")]
    seen.clear()
    tb.q[e + E_HELD] = 0         # a writer that has taken nothing yet holds nothing
    t.lockdep_check(sem, "lock")
    tb.q[e + E_WORD] = (5 << 3) | WAITING   # a reader waiting holds nothing
    tb.q[e + E_HELD] = 1
    t.lockdep_check(sem, "lock")
    assert seen == []
    tb.q[e + E_WORD] = 6 << 3


def test_uaf_hook_sees_every_operation_on_an_mm_lock(tb: Table) -> None:
    t = tb.task(0)
    ops: list[tuple[str, str]] = []
    t.uaf = lambda lk, op: ops.append((lk.name, op))
    glob, ptl = tb.lock(C_DAEMON), tb.lock(C_PTL, mm=3)
    ptl.mmrow = 0
    t.lock(glob)
    t.unlock(glob)
    assert t.trylock(glob)
    t.unlock(glob)
    assert ops == []   # mmrow -1: not an mm's lock
    t.lock(ptl)
    t.unlock(ptl)
    assert t.trylock(ptl)
    t.unlock(ptl)
    assert ops == [("pte_lock:mm3", "lock"), ("pte_lock:mm3", "unlock"),
                   ("pte_lock:mm3", "trylock"), ("pte_lock:mm3", "unlock")]



def test_uaf_hook_fires_only_for_a_freed_mm(tb: Table) -> None:
    """The hook is called when the lock's mm row holds another mm or is
    being freed or free (mm_freed), never for a live or exiting mm: the
    exit path still takes an exiting mm's locks."""
    from uksm.kernel.layout import M_ID, M_STATE, MMS_EXITING, MMS_FREE, MMS_FREEING, MMS_LIVE
    t = tb.task(0)
    ops: list[str] = []
    t.uaf = lambda lk, op: ops.append(op)
    ptl = tb.lock(C_PTL, mm=5)
    ptl.mmrow, ptl.mmbase = 3, 3 * ROW   # row 3's words stand for the mm row
    for mm_id, state, calls in ((5, MMS_LIVE, []), (5, MMS_EXITING, []),
                                (5, MMS_FREEING, ["lock", "unlock", "trylock", "unlock"]),
                                (5, MMS_FREE, ["lock", "unlock", "trylock", "unlock"]),
                                (6, MMS_LIVE, ["lock", "unlock", "trylock", "unlock"])):
        tb.q[3 * ROW + M_ID], tb.q[3 * ROW + M_STATE] = mm_id, state
        ops.clear()
        t.lock(ptl)
        t.unlock(ptl)
        assert t.trylock(ptl)
        t.unlock(ptl)
        assert ops == calls, (mm_id, state)
    assert value(ptl) == 1

# ---- reading entries from outside, and recovery -----------------------------------

def test_entries_units_and_dead_locks(tb: Table) -> None:
    a, _b = tb.task(0), tb.task(1)
    _wm, sem, ptl = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=2), tb.lock(C_PTL, mm=2)
    a.lock(sem)
    ens = locks.read_entries(tb.q, tb.rows(0, 1, 2), C_MMAP)
    assert [(en.row, en.pid, en.lid, en.state, en.writer, en.units()) for en in ens] == \
        [(0, 1000, sem.lid, HELD, False, 1)]
    a.lock(ptl)
    assert locks.dead_locks(tb.q, 0) == [sem.lid, ptl.lid]
    assert locks.dead_locks(tb.q, ROW) == []
    a.wait_begin(C_FRAMES)   # the frames wait is not a lock
    assert locks.dead_locks(tb.q, 0) == [sem.lid, ptl.lid]
    a.wait_end(C_FRAMES)
    a.unlock(ptl)
    a.unlock(sem)
    assert locks.read_entries(tb.q, tb.rows(0, 1, 2), C_MMAP) == []
    w = locks.Entry(0, 1, sem.lid, (1 << 3) | WRITER | WAITING, 2, 0, 0)
    assert (w.units(), w.writer, w.state) == (2, True, WAITING)
    assert locks.Entry(0, 1, sem.lid, (1 << 3) | WRITER | RELEASING, 2, 0, 0).units() == 0
    assert locks.Entry(0, 1, sem.lid, (1 << 3) | WRITER | HELD, 3, 0, 0).units() == 3
    assert locks.Entry(0, 1, sem.lid, (1 << 3) | WAITING, 0, 0, 0).units() == 0
    assert locks.Entry(0, 1, sem.lid, (1 << 3) | RELEASING, 0, 0, 0).units() == 0
    assert locks.Entry(0, 1, sem.lid, (1 << 3) | HELD, 0, 0, 0).units() == 1


def _die(tb: Table, row: int, lk: Lock, state: int, take: int, writer: bool = False,
         held: int = 0) -> None:
    """Leave row's entry as a task killed at that point would: ``take``
    units really taken from the semaphore."""
    e = row * ROW + T_LOCKS + lk.cls * ESIZE
    tb.q[e + E_LOCK] = lk.lid
    tb.q[e + E_WORD] = (7 << 3) | (WRITER if writer else 0) | state
    tb.q[e + E_HELD] = held
    for _ in range(take):
        lk.sem.acquire(0)


@pytest.mark.parametrize("state,take,writer,held,dead_units", [
    (HELD, 1, False, 0, 1),          # a reader holding
    (WAITING, 1, False, 0, 1),       # window A: taken, not recorded
    (WAITING, 0, False, 0, 0),       # died waiting
    (RELEASING, 0, False, 0, 0),     # window B: posted, not recorded
    (RELEASING, 1, False, 0, 1),     # about to post
    (HELD, UNITS, True, UNITS, UNITS),      # a writer holding all
    (WAITING, 2, True, 1, 2),        # writer in window A of its second unit
    (RELEASING, 1, True, 2, 1),      # writer in window B of up_write
])
def test_recover_counts_a_dead_holders_units(tb: Table, state: int, take: int, writer: bool,
                                             held: int, dead_units: int) -> None:
    sem = tb.lock(C_MMAP, UNITS, mm=5)
    other = tb.lock(C_PTL, mm=5)
    live = tb.task(1)
    if not writer:
        live.lock(sem)   # a live reader beside the dead one
    _die(tb, 0, sem, state, take, writer, held)
    _die(tb, 0, other, HELD, 1)   # an entry on a lock not being recovered
    before = value(sem)
    got = locks.recover(tb.q, {sem.lid: sem}, lambda: tb.rows(1, 2), tb.rows(0), deadline_s=20)
    assert got == {sem.lid: dead_units}
    # the drained free units were posted back: the value is unchanged
    assert value(sem) == before
    en = tb.entry(0, C_MMAP)
    assert (en["state"], en["held"], en["since"], en["writer"], en["seq"]) == (IDLE, 0, 0, 0, 8)
    assert tb.entry(0, C_PTL)["state"] == HELD   # not this recovery's
    assert tb.entry(1, C_MMAP)["state"] == (IDLE if writer else HELD)
    assert set(locks.progress) == {sem.name}
    for _ in range(dead_units):
        sem.sem.release()
    if not writer:
        live.unlock(sem)
    assert value(sem) == UNITS


def test_recover_with_units_already_owned(tb: Table) -> None:
    sem = tb.lock(C_MMAP, UNITS, mm=5)
    sem.sem.acquire(0)              # the recoverer's, from an earlier death
    _die(tb, 0, sem, HELD, 1)
    got = locks.recover(tb.q, {sem.lid: sem}, lambda: tb.rows(1), tb.rows(0), owned={sem.lid: 1})
    assert got == {sem.lid: 1} and value(sem) == UNITS - 2


def test_recover_clears_the_dead_frames_wait(tb: Table) -> None:
    mx = tb.lock(C_ALLOC)
    _die(tb, 0, mx, HELD, 1)
    tb.task(0).wait_begin(C_FRAMES)
    assert locks.recover(tb.q, {mx.lid: mx}, lambda: [], tb.rows(0)) == {mx.lid: 1}
    assert tb.entry(0, C_FRAMES)["state"] == IDLE and tb.entry(0, C_FRAMES)["since"] == 0


def test_recover_negative_remainder_is_an_error(tb: Table) -> None:
    mx = tb.lock(C_DAEMON)
    mx.sem.acquire(0)   # taken by nobody's entry, and not declared owned
    for row in (1, 2):   # two live entries claiming the one unit
        e = row * ROW + T_LOCKS + C_DAEMON * ESIZE
        tb.q[e + E_LOCK] = mx.lid
        tb.q[e + E_WORD] = (3 << 3) | HELD
    with pytest.raises(RuntimeError, match="negative remainder -1"):
        locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(1, 2), [])
    assert value(mx) == 0 and tb.task(1).holds(mx)


def test_recover_waits_for_a_live_waiter_to_be_seen_blocked(tb: Table) -> None:
    """A live task blocked on the dead's mutex: recovery decides only on
    snapshots where the waiter's E_SPINS grew; it then owns the unit, and
    the waiter gets it once the recoverer posts it."""
    mx = tb.lock(C_DAEMON)
    _die(tb, 0, mx, HELD, 1)
    waiter = tb.task(1)
    done = threading.Event()

    def run() -> None:
        waiter.lock(mx)
        done.set()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        _wait(lambda: tb.entry(1, C_DAEMON)["spins"] >= 1)
        got = locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(1), tb.rows(0), deadline_s=20)
        assert got == {mx.lid: 1}
        assert not done.is_set()
        snaps = locks.progress[mx.name]["snapshots"]
        assert len(snaps) == 3
        spins = [s["1"][2] for s in snaps]
        assert spins[2] > spins[1]
        mx.sem.release()
        th.join(20)
        assert done.is_set() and waiter.holds(mx)
    finally:
        if not done.is_set():
            mx.sem.release()
            th.join(20)
    waiter.unlock(mx)
    assert value(mx) == 1


def test_recover_never_decides_on_a_waiter_that_does_not_spin(tb: Table) -> None:
    """A live entry WAITING whose E_SPINS never moves might have taken a
    unit unseen (window A): recovery must not settle, and says which lock."""
    mx = tb.lock(C_DAEMON)
    _die(tb, 0, mx, HELD, 1)
    _die(tb, 1, mx, WAITING, 0)
    with pytest.raises(TimeoutError, match="did not settle: ksm_thread_mutex"):
        locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(1), tb.rows(0), deadline_s=0.3)
    assert value(mx) == 0   # nothing drained kept (there was nothing free)
    assert tb.entry(0, C_DAEMON)["state"] == HELD   # the dead's entry untouched
    mx.sem.release()


def test_recover_never_decides_while_a_live_entry_releases(tb: Table) -> None:
    mx = tb.lock(C_DAEMON)
    _die(tb, 1, mx, RELEASING, 0)
    with pytest.raises(TimeoutError):
        locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(1), [], deadline_s=0.2)


def test_stable_needs_three_equal_snapshots() -> None:
    held = (2 << 3) | HELD
    waiting = (2 << 3) | WAITING
    assert locks._stable({}, {}, {})
    assert locks._stable({1: (held, 0, 0)}, {1: (held, 0, 0)}, {1: (held, 0, 0)})
    assert not locks._stable({1: (held, 0, 0)}, {1: (held, 0, 0)}, {})
    assert not locks._stable({}, {1: (held, 0, 0)}, {1: (held, 0, 0)})
    assert not locks._stable({1: (held, 0, 0)}, {1: (held + 8, 0, 0)}, {1: (held + 8, 0, 0)})
    assert not locks._stable({1: (held, 0, 0)}, {1: (held, 0, 0)}, {1: (held + 8, 0, 0)})
    assert locks._stable({1: (waiting, 0, 1)}, {1: (waiting, 0, 2)}, {1: (waiting, 0, 3)})
    assert not locks._stable({1: (waiting, 0, 1)}, {1: (waiting, 0, 2)}, {1: (waiting, 0, 2)})
    w = (2 << 3) | WRITER | WAITING
    assert not locks._stable({1: (w, 1, 1)}, {1: (w, 1, 2)}, {1: (w, 2, 3)})
    assert locks._stable({1: (w, 1, 1)}, {1: (w, 1, 2)}, {1: (w, 1, 3)})
    r = (2 << 3) | RELEASING
    assert not locks._stable({1: (r, 0, 0)}, {1: (r, 0, 0)}, {1: (r, 0, 0)})
    assert locks._units(held, 5) == 1 and locks._units(w, 2) == 2
    assert locks._units((2 << 3) | WRITER | HELD, 3) == 3
    assert locks._units((2 << 3) | WRITER | RELEASING, 3) == 0
    assert locks._units(waiting, 4) == 0


def _wait(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    import helpers
    helpers.wait_for(pred, timeout, what="a waiter to block")



def test_recover_a_live_post_after_the_last_snapshot(tb: Table) -> None:
    """A live reader's up_read landing between a round's snapshot and the
    drain that followed it was counted twice (drained, and held in that
    snapshot): the dead reader's unit was lost and the rwsem stayed a unit
    short for good.  recover() drains first, then snapshots (found by the
    review of the C core; the same with either implementation)."""
    dead, live = tb.task(1), tb.task(2)
    rd = tb.lock(C_MMAP, UNITS, mm=1)
    real = rd.sem
    dead.lock(rd)             # then SIGKILLed: one unit, HELD
    live.lock(rd)             # a live reader holding one unit
    twin = Lock(real, UNITS, C_MMAP, mm=1)   # the live task's own handle on the semaphore
    calls = [0]

    class Sem:
        """The semaphore, with the live up_read at recover()'s 4th trywait."""

        def acquire(self, timeout: float | None = None) -> None:
            calls[0] += 1
            if calls[0] == 4:
                live.unlock(twin)
            real.acquire(timeout)

        def release(self) -> None:
            real.release()

    rd.sem = Sem()            # type: ignore[assignment]
    try:
        got = locks.recover(tb.q, {rd.lid: rd}, lambda: tb.rows(2), tb.rows(1))
    finally:
        rd.sem = real
    assert calls[0] > 4 and got == {rd.lid: 1}
    real.release()            # the dead's unit, given back by the recoverer
    assert value(rd) == UNITS

# ---- the entry inside each semaphore operation (windows A and B) --------------------

class SemSpy:
    """A semaphore that records the task's entry at every acquire and
    release: what a task killed inside the call would leave for recover()."""

    def __init__(self, tb: Table, lk: Lock, row: int) -> None:
        self.real, self.tb, self.cls, self.row = lk.sem, tb, lk.cls, row
        self.seen: list[tuple[str, int, int, int, int, int]] = []
        lk.sem = self  # type: ignore[assignment]

        self.timeouts: list[float | None] = []

    def _note(self, op: str) -> None:
        en = self.tb.entry(self.row, self.cls)
        self.seen.append((op, en["lock"], en["seq"], en["writer"], en["state"], en["held"]))

    def acquire(self, timeout: float | None = None) -> None:
        self._note("acquire")
        self.timeouts.append(timeout)
        self.real.acquire(timeout)

    def release(self) -> None:
        self._note("release")
        self.real.release()

    @property
    def value(self) -> int:
        return int(self.real.value)


def _others(tb: Table, row: int, *classes: int) -> list[int]:
    """Every word of the task table but ``row``'s entries of ``classes``."""
    skip = {row * ROW + T_LOCKS + c * ESIZE + k for c in classes for k in range(ESIZE)}
    return [v for i, v in enumerate(tb.q) if i not in skip]


def test_lock_unlock_entry_inside_the_semaphore_calls(tb: Table) -> None:
    t = tb.task(1)
    mx = tb.lock(C_PTL, mm=2)
    spy = SemSpy(tb, mx, 1)
    before = _others(tb, 1, C_PTL)
    for n in range(2):   # twice: the seq goes on from the entry's own word
        t.lock(mx)
        t.unlock(mx)
        s0 = 4 * n
        assert spy.seen[-2:] == [("acquire", mx.lid, s0 + 1, 0, WAITING, 0),
                                 ("release", mx.lid, s0 + 3, 0, RELEASING, 0)]
        assert tb.entry(1, C_PTL)["seq"] == s0 + 4 and tb.entry(1, C_PTL)["state"] == IDLE
    assert _others(tb, 1, C_PTL) == before   # nothing else in the table written
    assert spy.value == 1


def test_trylock_entry_inside_the_semaphore_call(tb: Table) -> None:
    a, b = tb.task(1), tb.task(2)
    mx = tb.lock(C_MMLIST)
    spy = SemSpy(tb, mx, 1)
    before = _others(tb, 1, C_MMLIST)
    for n in range(2):
        assert a.trylock(mx)
        a.unlock(mx)
        assert spy.seen[-2:] == [("acquire", mx.lid, 4 * n + 1, 0, WAITING, 0),
                                 ("release", mx.lid, 4 * n + 3, 0, RELEASING, 0)]
    assert _others(tb, 1, C_MMLIST) == before
    assert a.trylock(mx)
    before = _others(tb, 2, C_MMLIST)
    spy.row = 2
    for n in range(2):   # failing, twice
        assert not b.trylock(mx)
        assert spy.seen[-1] == ("acquire", mx.lid, 2 * n + 1, 0, WAITING, 0)
        en = tb.entry(2, C_MMLIST)
        assert (en["seq"], en["state"]) == (2 * n + 2, IDLE)
    assert _others(tb, 2, C_MMLIST) == before
    assert spy.value == 0


def test_down_write_up_write_entry_inside_the_semaphore_calls(tb: Table) -> None:
    t = tb.task(1)
    wm, sem = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=3)
    spy = SemSpy(tb, sem, 1)
    before = _others(tb, 1, C_MMAP, C_WMUTEX)
    for n in range(2):
        t.down_write(sem, wm)
        s0 = 4 * n
        assert spy.seen[-UNITS:] == [("acquire", sem.lid, s0 + 1, WRITER, WAITING, i)
                                     for i in range(UNITS)]
        t.up_write(sem, wm)
        assert spy.seen[-UNITS:] == [("release", sem.lid, s0 + 3, WRITER, RELEASING, UNITS - i)
                                     for i in range(UNITS)]
        en = tb.entry(1, C_MMAP)
        assert (en["seq"], en["writer"], en["state"], en["held"]) == (s0 + 4, 0, IDLE, 0)
        assert tb.entry(1, C_WMUTEX)["seq"] == s0 + 4
    assert _others(tb, 1, C_MMAP, C_WMUTEX) == before
    assert spy.value == UNITS and value(wm) == 1


# ---- from any starting word; stale fields; lockdep in down_write --------------------

def _junk(tb: Table, row: int, seq: int, *classes: int) -> None:
    """Fill the table with distinct non-zero words (so that a write to the
    wrong word shows), then give ``row``'s entries of ``classes`` an idle
    word of sequence ``seq`` (odd: after an abandoned wait) and a stale
    E_HELD, as an earlier aborted writer would leave them."""
    for i in range(len(tb.q)):
        tb.q[i] = 1_000_000 + i
    for c in classes:
        e = row * ROW + T_LOCKS + c * ESIZE
        tb.q[e + E_WORD] = seq << 3
        tb.q[e + E_HELD] = 7
        tb.q[e + E_SPINS] = 0
        tb.q[e + E_SINCE] = 0


@pytest.mark.parametrize("seq", [5, 9])
def test_every_op_from_an_odd_seq_with_stale_fields(tb: Table, seq: int) -> None:
    t = tb.task(1)
    wm, sem, mx = tb.lock(C_WMUTEX), tb.lock(C_MMAP, UNITS, mm=3), tb.lock(C_PTL, mm=3)
    _junk(tb, 1, seq, C_WMUTEX, C_MMAP, C_PTL)
    ssem, smx = SemSpy(tb, sem, 1), SemSpy(tb, mx, 1)
    before = _others(tb, 1, C_WMUTEX, C_MMAP, C_PTL)
    t.down_write(sem, wm)
    assert ssem.seen == [("acquire", sem.lid, seq + 1, WRITER, WAITING, i) for i in range(UNITS)]
    assert ssem.timeouts == [0] * UNITS       # never a blocking try outside _block
    en = tb.entry(1, C_MMAP)
    assert (en["seq"], en["writer"], en["state"], en["held"]) == (seq + 2, WRITER, HELD, UNITS)
    t.up_write(sem, wm)
    assert ssem.seen[-1] == ("release", sem.lid, seq + 3, WRITER, RELEASING, 1)
    en = tb.entry(1, C_MMAP)
    assert (en["seq"], en["writer"], en["state"], en["held"]) == (seq + 4, 0, IDLE, 0)
    assert tb.entry(1, C_WMUTEX)["seq"] == seq + 4
    t.lock(mx)
    assert smx.seen == [("acquire", mx.lid, seq + 1, 0, WAITING, 7)]
    assert smx.timeouts == [0]
    t.unlock(mx)
    assert tb.entry(1, C_PTL)["seq"] == seq + 4
    assert t.trylock(mx)
    assert smx.seen[-1] == ("acquire", mx.lid, seq + 5, 0, WAITING, 7)
    assert tb.entry(1, C_PTL)["seq"] == seq + 6
    t.unlock(mx)
    assert _others(tb, 1, C_WMUTEX, C_MMAP, C_PTL) == before
    assert ssem.value == UNITS and smx.value == 1 and value(wm) == 1


def test_abort_from_an_odd_seq(tb: Table) -> None:
    holder, waiter = tb.task(0), tb.task(1)
    mx = tb.lock(C_DAEMON)
    _junk(tb, 1, 5, C_DAEMON)
    holder.lock(mx)
    before = _others(tb, 1, C_DAEMON)
    waiter.abort = lambda: True
    with pytest.raises(LockAbort):
        waiter.lock(mx)
    en = tb.entry(1, C_DAEMON)
    assert (en["state"], en["seq"], en["spins"], en["since"]) == (IDLE, 7, 1, 0)
    assert _others(tb, 1, C_DAEMON) == before
    holder.unlock(mx)


class FakeClock:
    """time for uksm.kernel.locks: monotonic_ns steps by ``step`` at each call."""

    def __init__(self, step: int) -> None:
        self.now, self.step = 10**12, step

    def monotonic_ns(self) -> int:
        self.now += self.step
        return self.now

    def __getattr__(self, k: str) -> Any:
        import time
        return getattr(time, k)


@pytest.mark.parametrize("log_ms,reported", [(3, True), (4, False)])
def test_lock_wait_reported_at_the_threshold_in_ms(tb: Table, monkeypatch: pytest.MonkeyPatch,
                                                   log_ms: int, reported: bool) -> None:
    """on_wait gets the wait in milliseconds, from the clock the wait
    started on, once it reaches the threshold; no holders() -> []."""
    holder = tb.task(0)
    waiter = tb.task(1, wait_log_ms=log_ms)
    waits: list[tuple[str, float, list[int]]] = []
    waiter.on_wait = lambda name, ms, hs: waits.append((name, ms, hs))
    mx = tb.lock(C_DAEMON)
    holder.lock(mx)

    def abort() -> bool:
        holder.unlock(mx)
        return False

    waiter.abort = abort
    monkeypatch.setattr(locks, "time", FakeClock(3_000_000))   # 3 ms between the two readings
    waiter.lock(mx)
    monkeypatch.undo()
    assert waits == ([(mx.name, 3.0, [])] if reported else [])
    waiter.unlock(mx)


def test_lockdep_in_down_write(tb: Table) -> None:
    """down_write checks once, as down_write, from the writer mutex's
    class; its own mutex is then taken unchecked."""
    t = tb.task(0)
    seen: list[tuple[str, str, str, str]] = []
    t.lockdep = lambda kind, lk, held, op: seen.append((kind, lk.name, lock_name(held), op))
    wm, sem, ptl = tb.lock(C_WMUTEX, mm=1), tb.lock(C_MMAP, UNITS, mm=1), tb.lock(C_PTL, mm=1)
    t.lock(ptl)
    t.down_write(sem, wm)
    assert seen == [("order", "mmap_sem:mm1", "pte_lock:mm1", "down_write")]
    t.up_write(sem, wm)
    t.unlock(ptl)
    seen.clear()
    wm2 = tb.lock(C_WMUTEX, mm=2)
    t.lock(wm2)          # another mm's writer mutex: seen only from the mutex's class
    t.down_write(sem, wm)
    assert seen == [("order", "mmap_sem:mm1", "mmap_wmutex:mm2", "down_write")]


def test_holders_of_only_that_lock_and_writers_with_units(tb: Table) -> None:
    a = tb.task(0)
    p1, p2 = tb.lock(C_PTL, mm=1), tb.lock(C_PTL, mm=2)
    a.lock(p1)
    assert locks.holders_of(tb.q, tb.rows(0, 1, 2), p1.lid) == [1000]
    assert locks.holders_of(tb.q, tb.rows(0, 1, 2), p2.lid) == []
    sem = tb.lock(C_MMAP, UNITS, mm=1)
    for row, word, held in ((1, WRITER | WAITING, 0), (2, WRITER | WAITING, 1)):
        e = row * ROW + T_LOCKS + C_MMAP * ESIZE
        tb.q[e + E_LOCK] = sem.lid
        tb.q[e + E_WORD] = (1 << 3) | word
        tb.q[e + E_HELD] = held
    # a writer waiting with nothing taken yet holds nothing; with one unit, it does
    assert locks.holders_of(tb.q, tb.rows(0, 1, 2), sem.lid) == [1002]


def test_wait_begin_default_is_the_frames_wait(tb: Table) -> None:
    t = tb.task(3)
    t.wait_begin()
    assert tb.entry(3, C_FRAMES)["lock"] == lock_id(C_FRAMES, 0)
    assert tb.entry(3, C_FRAMES)["state"] == WAITING
    t.wait_end()
    assert tb.entry(3, C_FRAMES)["state"] == IDLE


def test_recover_that_does_not_settle_gives_the_free_units_back(tb: Table) -> None:
    """recover() drains every free unit while it decides; when it gives up
    (TimeoutError) or finds the books do not add up (RuntimeError), those
    units are posted back: a stalled recovery must not leave the lock
    short of units for good (the supervisor reports it and goes on)."""
    mx = tb.lock(C_DAEMON)
    _die(tb, 1, mx, RELEASING, 0)        # a live entry that never settles
    assert value(mx) == 1
    with pytest.raises(TimeoutError):
        locks.recover(tb.q, {mx.lid: mx}, lambda: tb.rows(1), [], deadline_s=0.2)
    assert value(mx) == 1
    sem = tb.lock(C_MMAP, UNITS, mm=1)
    for row in (2, 3):                   # two live readers claiming more than was taken
        e = row * ROW + T_LOCKS + C_MMAP * ESIZE
        tb.q[e + E_LOCK] = sem.lid
        tb.q[e + E_WORD] = (3 << 3) | HELD
    sem.sem.acquire(0)
    with pytest.raises(RuntimeError, match="negative remainder"):
        locks.recover(tb.q, {sem.lid: sem}, lambda: tb.rows(2, 3), [], owned={sem.lid: 1})
    assert value(sem) == UNITS - 1


# ---- what other modules read of a Lock, a Task, an Entry, recover()'s progress --------

def test_lock_and_task_fields(tb: Table, monkeypatch: pytest.MonkeyPatch) -> None:
    sem = posix_ipc.Semaphore(f"/uksmtest.{tb.name}.g", posix_ipc.O_CREX, mode=0o600, initial_value=1)
    try:
        g = Lock(sem, 1, C_DAEMON)       # a global lock: no mm
        assert (g.mm, g.lid, g.name, g.mmrow, g.units, g.cls) == (0, lock_id(C_DAEMON), "ksm_thread_mutex", -1, 1,
                                                                  C_DAEMON)
    finally:
        sem.unlink()
        sem.close()
    t = tb.task(2)
    assert (t.row, t.base, t.uaf, t.lockdep, t.abort, t.on_wait) == (2, 2 * ROW, None, None, None, None)
    assert t.wait_log_ns == 100 * 1_000_000
    ptl = tb.lock(C_PTL, mm=4)
    ptl.mmrow = 3                         # an mm's lock, no uaf hook set: nothing called
    t.lock(ptl)
    assert t.trylock(ptl) is False
    t.unlock(ptl)


def test_trylock_never_blocks_and_fails_from_an_odd_seq(tb: Table) -> None:
    a, b = tb.task(1), tb.task(2)
    mx = tb.lock(C_PTL, mm=3)
    _junk(tb, 2, 5, C_PTL)
    spy = SemSpy(tb, mx, 2)
    a.lock(mx)
    before = _others(tb, 2, C_PTL)
    assert b.trylock(mx) is False
    assert spy.timeouts[-1] == 0                  # a trylock never waits
    en = tb.entry(2, C_PTL)
    assert (en["seq"], en["state"]) == (7, IDLE)
    assert _others(tb, 2, C_PTL) == before
    a.unlock(mx)
    assert b.trylock(mx) is True
    assert spy.timeouts[-1] == 0


def test_read_entries_reports_every_field(tb: Table) -> None:
    e = ROW + T_LOCKS + C_MMAP * ESIZE
    lid = lock_id(C_MMAP, 6)
    tb.q[e + E_LOCK], tb.q[e + E_WORD], tb.q[e + E_HELD] = lid, (4 << 3) | WRITER | WAITING, 2
    tb.q[e + E_SPINS], tb.q[e + E_SINCE] = 11, 123456789
    (en,) = locks.read_entries(tb.q, tb.rows(0, 1), C_MMAP)
    assert (en.row, en.pid, en.lid, en.word, en.held, en.spins, en.since) == \
        (1, 1001, lid, (4 << 3) | WRITER | WAITING, 2, 11, 123456789)


def test_recover_counts_a_live_writers_units_and_reports_progress(tb: Table) -> None:
    sem = tb.lock(C_MMAP, UNITS, mm=2)
    wm = tb.lock(C_WMUTEX, mm=2)
    live = tb.task(1)
    live.down_write(sem, wm)                      # a live writer holds every unit
    _die(tb, 0, sem, WAITING, 0)                  # the dead was waiting behind it
    assert locks.recover(tb.q, {sem.lid: sem}, lambda: tb.rows(1), tb.rows(0)) == {sem.lid: 0}
    p = locks.progress[sem.name]
    assert p["drained"] == 0 and len(p["snapshots"]) == 3
    live.up_write(sem, wm)
    mx = tb.lock(C_DAEMON)
    mx.sem.acquire(0)
    assert locks.recover(tb.q, {mx.lid: mx}, lambda: [], []) == {mx.lid: 1}
    assert locks.progress[mx.name]["drained"] == 0
    mx.sem.release()
    assert locks.recover(tb.q, {mx.lid: mx}, lambda: [], []) == {mx.lid: 0}
    assert locks.progress[mx.name]["drained"] == 1 and value(mx) == 1


def test_recover_that_does_not_settle_names_every_lock_and_keeps_three_snapshots(tb: Table) -> None:
    a, b = tb.lock(C_DAEMON), tb.lock(C_MMLIST)
    for lk in (a, b):
        _die(tb, 1, lk, RELEASING, 0)
    with pytest.raises(TimeoutError, match="did not settle: (ksm_thread_mutex, ksm_mmlist_lock"
                                           "|ksm_mmlist_lock, ksm_thread_mutex)$"):
        locks.recover(tb.q, {a.lid: a, b.lid: b}, lambda: tb.rows(1), [], deadline_s=0.2)
    assert len(locks.progress[a.name]["snapshots"]) == 3


# ---- the bounded wait, the raw wait, the use-after-free test (this session's) ----

def test_lock_bounded_takes_a_free_lock_at_once(tb: Table) -> None:
    t = tb.task(0)
    mx = tb.lock(C_DAEMON)
    calls: list[int] = []
    t.lock_bounded(mx, 1.0, lambda: bool(calls.append(1)))
    en = tb.entry(0, C_DAEMON)
    # the trylock's two transitions (WAITING, HELD), nothing else
    assert (en["seq"], en["state"], en["lock"], value(mx), calls) == (2, HELD, mx.lid, 0, [])
    t.unlock(mx)


def test_lock_bounded_checks_the_lock_order(tb: Table) -> None:
    """The daemon's bounded wait for ksm_thread_mutex under a pte lock is an
    order violation, reported as lock's is (its trylock checks recursion
    only: the review of this session found the order unchecked)."""
    t = tb.task(0)
    seen: list[tuple[str, str, str]] = []
    t.lockdep = lambda kind, lk, held, op: seen.append((kind, lk.name, lock_name(held)))
    ptl, mx = tb.lock(C_PTL, mm=1), tb.lock(C_DAEMON)
    t.lock(ptl)
    t.lock_bounded(mx, 1.0, lambda: False)
    assert seen == [("order", "ksm_thread_mutex", "pte_lock:mm1")]
    t.unlock(mx)
    t.unlock(ptl)


def test_lock_bounded_gives_up_after_its_timeout_with_the_entry_idle(tb: Table) -> None:
    holder, t = tb.task(1), tb.task(0)
    mx = tb.lock(C_DAEMON)
    holder.lock(mx)
    seen: list[dict[str, int]] = []

    def between() -> bool:
        seen.append(tb.entry(0, C_DAEMON))
        return False
    with pytest.raises(locks.LockTimeout) as ei:
        t.lock_bounded(mx, 0.1, between)
    assert ei.value.hung is False and ei.value.timeout == 0.1 and str(ei.value) == mx.name
    # seen waiting meanwhile, as the watchdog and recover() see any wait: the
    # failed trylock's two transitions, then WAITING (seq 3), spinning, timed
    w = seen[0]
    assert (w["seq"], w["state"], w["lock"]) == (3, WAITING, mx.lid) and w["since"] > 0
    assert w["spins"] >= 1 and seen[-1]["spins"] >= w["spins"]
    en = tb.entry(0, C_DAEMON)
    assert (en["seq"], en["state"], en["since"]) == (4, IDLE, 0)
    assert value(mx) == 0 and not t.holds(mx)   # no unit taken
    holder.unlock(mx)
    assert value(mx) == 1


def test_lock_bounded_gives_up_at_once_when_between_says_so(tb: Table) -> None:
    holder, t = tb.task(1), tb.task(0)
    mx = tb.lock(C_DAEMON)
    holder.lock(mx)
    with pytest.raises(locks.LockTimeout) as ei:
        t.lock_bounded(mx, 30.0, lambda: True)
    assert ei.value.hung is True and tb.entry(0, C_DAEMON)["state"] == IDLE
    holder.unlock(mx)


def test_lock_bounded_gets_the_lock_its_holder_gives_back_meanwhile(tb: Table) -> None:
    holder, t = tb.task(1), tb.task(0)
    mx = tb.lock(C_DAEMON)
    holder.lock(mx)
    calls: list[int] = []

    def between() -> bool:
        calls.append(1)
        if len(calls) == 2:
            holder.unlock(mx)          # the daemon's pump reaping: the unit comes back
        return False
    t.lock_bounded(mx, 30.0, between)
    en = tb.entry(0, C_DAEMON)
    assert len(calls) >= 2 and (en["seq"], en["state"], en["since"]) == (4, HELD, 0)
    assert value(mx) == 0
    t.unlock(mx)
    assert value(mx) == 1


def test_take_raw_takes_a_unit_or_gives_up_when_a_holder_died(tb: Table) -> None:
    zone = tb.lock(C_ALLOC)
    locks.take_raw(zone.sem, lambda: pytest.fail("no wait for a free unit"))
    assert value(zone) == 0                     # taken, and no task entry written
    assert all(tb.entry(r, C_ALLOC)["seq"] == 0 for r in range(NROWS))
    with pytest.raises(locks.HolderDied):
        locks.take_raw(zone.sem, lambda: True, slice_s=0.01)
    assert value(zone) == 0
    posted: list[int] = []

    def abort() -> bool:                        # a unit comes back while we wait
        if not posted:
            posted.append(1)
            zone.sem.release()
        return False
    locks.take_raw(zone.sem, abort, slice_s=0.01)
    assert posted and value(zone) == 0
    zone.sem.release()


def test_mm_freed_is_a_row_reused_or_being_freed() -> None:
    from uksm.kernel.layout import M_ID, M_STATE, MMS_EXITING, MMS_FREE, MMS_FREEING, MMS_LIVE
    q = memoryview(bytearray(8 * 64)).cast("q")
    lk = Lock(None, 1, C_PTL, mm=5)            # type: ignore[arg-type]  (no semaphore needed)
    lk.mmbase = 16
    q[16 + M_ID], q[16 + M_STATE] = 5, MMS_LIVE
    assert not locks.mm_freed(q, lk)
    q[16 + M_STATE] = MMS_EXITING                # exiting is not freed: its locks are still used
    assert not locks.mm_freed(q, lk)
    for st in (MMS_FREEING, MMS_FREE):
        q[16 + M_STATE] = st
        assert locks.mm_freed(q, lk)
    q[16 + M_ID], q[16 + M_STATE] = 6, MMS_LIVE  # the row now holds another mm
    assert locks.mm_freed(q, lk)
