"""Cross-process locks on POSIX semaphores that survive a SIGKILLed holder.

A POSIX semaphore has no owner: when its holder dies it stays taken.  So every
task (process, or supervisor thread) has a row in the shared task table, with
one *lock entry* per lock class (see ``layout.LOCK_CLASSES``), and follows
this protocol around every semaphore operation::

    acquire:  E_LOCK = lock; word -> WAITING      (before sem_wait)
              sem_wait ... [window A] ...
              word -> HELD                        (writer: E_HELD += 1 per unit)
    release:  word -> RELEASING
              sem_post ... [window B] ...
              word -> IDLE                        (writer: E_HELD -= 1 per unit)

A waiter that must block waits in slices of ``WAIT_SLICE`` and bumps
``E_SPINS`` after every slice that timed out, so that "blocked" is visible
from outside.  ``word`` is ``seq << 3 | writer << 2 | state`` and ``seq`` grows
at every transition, so two equal words mean "no transition in between".

After a task died, ``recover()`` works out exactly how many units of each
lock the dead held -- including a death inside window A (taken, not yet
recorded) or window B (posted, not yet recorded) -- without ever guessing:

1. drain: take every free unit of the lock (trywait until it fails);
2. snapshot the live entries on the lock; repeat drain/snapshot;
3. decide on three consecutive snapshots S1, S2, S3 where every live entry
   kept its word (no transition, so nobody posted: the value stayed 0 after
   the first drain), no live entry is RELEASING, and every live WAITING
   entry bumped E_SPINS between S2 and S3 with E_HELD unchanged (it was
   blocked then, and with no free unit since, it cannot have taken one);
4. then ``N = drained + sum(live holdings) + dead holdings`` exactly, and the
   dead's units are the remainder.  They become the recoverer's: it repairs
   what the lock protects, then posts them.

A read/write ``mmap_sem`` is one semaphore of N units: a reader takes one, a
writer takes all N one at a time under a writer mutex (``mmap_wmutex``), so
``N - value`` is what the holders hold and the arithmetic above is unchanged.

Lock order (as mm/ksm.c's): ksm_thread_mutex -> mmap_wmutex -> mmap_sem ->
pte_lock -> zone_lock.  ksm_mmlist_lock is a leaf: it may be taken under
any lock (ksm_thread_mutex, mmap_sem, the pte lock in mm_users_zero), and
nothing is taken under it -- which is
why fsck, stopping the world, may take it last, after every pte lock and
zone_lock.  What each lock protects: docs/DESIGN.md.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import posix_ipc

from uksm.kernel.layout import (
    C_FRAMES,
    E_HELD,
    E_LOCK,
    E_SINCE,
    E_SPINS,
    E_WORD,
    ESIZE,
    LOCK_CLASSES,
    M_ID,
    M_STATE,
    MMS_FREE,
    MMS_FREEING,
    NCLASS,
    T_LOCKS,
    T_PID,
)

try:
    # the uncontended path in C (uksm/kernel/_lockcore.c), unless
    # UKSM_LOCKS=python asks for the reference (or it was not built)
    if os.environ.get("UKSM_LOCKS") == "python":
        raise ImportError("UKSM_LOCKS=python")
    from uksm.kernel import _lockcore
except ImportError:
    _lockcore = None  # type: ignore[assignment]
else:
    _lockcore.layout(E_LOCK, E_WORD, M_ID, M_STATE, MMS_FREEING, MMS_FREE)
IMPL = "python" if _lockcore is None else "c"   # which one Task is

IDLE, WAITING, HELD, RELEASING = 0, 1, 2, 3
STATE_NAMES = ("idle", "waiting", "held", "releasing")
WRITER = 4
WAIT_SLICE = 0.02  # seconds a blocked waiter sleeps before it bumps E_SPINS


def lock_id(cls: int, mm: int = 0) -> int:
    return (cls << 40) | mm


def lock_name(lid: int) -> str:
    cls, mm = lid >> 40, lid & ((1 << 40) - 1)
    name = LOCK_CLASSES[cls] if 0 <= cls < NCLASS else f"class{cls}"
    return f"{name}:mm{mm}" if mm else name


class LockAbort(Exception):
    """A blocked wait was abandoned by the task's ``abort`` hook (the
    supervisor's recovery thread, when the holder it waits for has died)."""


class LockTimeout(LockAbort):
    """A bounded wait (``Task.lock_bounded``) gave up, no unit taken:
    ``hung`` when its ``between`` hook asked to (the daemon: a hung task
    was reported meanwhile), else after its ``timeout``."""

    def __init__(self, name: str, hung: bool, timeout: float) -> None:
        super().__init__(name)
        self.hung = hung
        self.timeout = timeout


class HolderDied(LockAbort):
    """A raw wait (``take_raw``) given up: its ``abort()`` said a holder
    died, so that holder's recovery must come first."""


def take_raw(sem: posix_ipc.Semaphore, abort: Callable[[], bool] | None = None,
             slice_s: float = 0.05) -> None:
    """Take one unit of ``sem`` without recording it in any task row: the
    supervisor stopping the world (``fsck.world_stopped``) is trusted --
    never killed -- so no entry is needed for a recovery to read.  It waits
    in slices; between two, ``abort()`` returning True (a holder it may be
    waiting for has died) raises HolderDied, no unit taken."""
    while True:
        try:
            sem.acquire(slice_s)
            return
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            if abort is not None and abort():
                raise HolderDied()


class _LockFields:
    """A lock's fields, in Python (the C core's ``LockCore`` when it is
    built: the same fields, and the semaphore mapped for the C path)."""

    __slots__ = ("sem", "units", "cls", "lid", "name", "mm", "mmrow", "mmbase")

    def __init__(self, sem: posix_ipc.Semaphore, units: int, cls: int, lid: int, name: str,
                 mm: int = 0) -> None:
        self.sem = sem
        self.units = units
        self.cls = cls
        self.lid = lid
        self.name = name
        self.mm = mm          # the address space whose lock this is (0: a global lock)
        self.mmrow = -1       # its mm-table row, for the use-after-free check
        self.mmbase = -1      # that row's offset in the control block

    def close(self) -> None:
        """This process is done with the semaphore."""
        self.sem.close()


if TYPE_CHECKING or _lockcore is None:
    _LockBase = _LockFields
else:
    _LockBase = _lockcore.LockCore


class Lock(_LockBase):
    """One semaphore of ``units`` units (1: a mutex; N: an rw semaphore)."""

    __slots__ = ()

    def __init__(self, sem: posix_ipc.Semaphore, units: int, cls: int, mm: int = 0) -> None:
        lid = lock_id(cls, mm)
        super().__init__(sem, units, cls, lid, lock_name(lid), mm)


def mm_freed(q: memoryview, lk: Lock) -> bool:
    """The address space whose lock ``lk`` is has been freed: its row holds
    another mm now, or it is being freed (Task.uaf's test, inline in the
    lock operations: a hook called on every mm lock operation cost ksmd
    0.43 us per lock/unlock pair)."""
    b = lk.mmbase
    return q[b + M_ID] != lk.mm or q[b + M_STATE] in (MMS_FREEING, MMS_FREE)


class PyTask:
    """This task's row in the task table, and the lock protocol on it,
    all in Python: the protocol's reference (``Task`` is this class with
    lock, trylock and unlock in C when the C core is built).

    ``on_wait(lock_name, waited_s)`` is called once a wait passes the
    lock-wait threshold (for the ``lock_wait`` event) and ``on_spin`` at
    every slice of a blocked wait (kill points, fatal-signal checks).
    """

    def __init__(self, q: memoryview, row_base: int, row: int,
                 holders: Callable[[int], list[int]] | None = None,
                 wait_log_ms: int = 100) -> None:
        self.q = q
        self.row = row
        self.base = row_base
        self.ebase = [row_base + T_LOCKS + c * ESIZE for c in range(NCLASS)]
        self.holders = holders
        self.wait_log_ns = wait_log_ms * 1_000_000
        self.on_wait: Callable[[str, float, list[int]], None] | None = None
        # polled at every slice of a blocked wait; True abandons the wait
        # (the entry goes back to IDLE: no unit was taken) with LockAbort
        self.abort: Callable[[], bool] | None = None
        # called before an operation on an mm's lock whose mm is freed
        # (mm_freed; Cluster.watch_use_after_free): a use after free
        self.uaf: Callable[[Lock, str], None] | None = None
        # lockdep (Cluster.watch_lock_order): called with (kind, lock taken,
        # lock id held, operation) for every lock taken against the order
        self.lockdep: Callable[[str, Lock, int, str], None] | None = None
        # a controlled run's scheduling point (uksm.kernel.sched): called
        # with ("lock"|"trylock"|"unlock", lk) before the operation, and
        # ("blocked", lk) instead of every slice of a blocked wait
        self.sched: Callable[[str, Lock], None] | None = None

    # -- lockdep ----------------------------------------------------------
    def lockdep_check(self, lk: Lock, op: str, from_cls: int = -1) -> None:
        """The lock order is the class order (layout.LOCK_CLASSES):
        ksm_thread_mutex -> mmap_wmutex -> mmap_sem -> pte_lock -> zone_lock
        -> ksm_mmlist_lock (a leaf).  Taking ``lk`` while this task holds a
        lock of its class or a later one is reported: ``recursive`` (that
        very lock: a self-deadlock for anything but a second reader),
        ``same_class`` (two locks of one class: also beyond what a task
        row records), ``order`` (against the order: an ABBA deadlock
        waiting for a partner).  ``from_cls``: check from that class on
        (down_write: from the writer mutex, for the semaphore's identity).
        A check of this task's own entries only: cheap, no global graph."""
        if self.lockdep is None:
            return
        q = self.q
        for c in range(lk.cls if from_cls < 0 else from_cls, C_FRAMES):
            e = self.ebase[c]
            w = q[e + E_WORD]
            st = w & 3
            if not (st == HELD or (w & WRITER and st == WAITING and q[e + E_HELD] > 0)):
                continue
            held = q[e + E_LOCK]
            kind = "recursive" if held == lk.lid else "same_class" if c == lk.cls else "order"
            self.lockdep(kind, lk, held, op)

    # -- the protocol -----------------------------------------------------
    def _set(self, e: int, state: int) -> None:
        q = self.q
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + (w & WRITER) + state

    def _block(self, lk: Lock, e: int, give_up: Callable[[], LockAbort | None] | None = None) -> None:
        """Wait for one unit of ``lk`` (the entry says WAITING).  After
        every slice, the task's ``abort`` hook, then ``give_up``
        (``lock_bounded``'s), may end the wait: the entry goes back to
        IDLE (no unit was taken) and their exception is raised."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        q = self.q
        t0 = time.monotonic_ns()
        q[e + E_SINCE] = t0
        acquire = lk.sem.acquire
        if self.sched is not None:
            # a controlled run: blocking is modelled, never real -- parked,
            # disabled until the lock has a free unit (the entry stays
            # WAITING, as a blocked waiter's); no slices, no deadline.
            # Woken without one, the abort hook has its look, as after a
            # slice (ksmd serving a failed unmerge's writer)
            while True:
                self.sched("blocked", lk)
                try:
                    acquire(0)
                    break
                except posix_ipc.BusyError:
                    q[e + E_SPINS] += 1
                    if self.abort is not None and self.abort():
                        q[e + E_SINCE] = 0
                        w = q[e + E_WORD]
                        q[e + E_WORD] = (w & ~7) + 8 + IDLE
                        raise LockAbort(lk.name) from None
            q[e + E_SINCE] = 0
            return
        holders: list[int] | None = None
        while True:
            try:
                acquire(WAIT_SLICE)
                break
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                q[e + E_SPINS] += 1
                if holders is None and self.holders is not None and self.on_wait is not None:
                    # who blocks it, read while it is blocked (once it has the
                    # lock they are gone): the lock_wait event's holders
                    holders = self.holders(lk.lid)
                stop = (LockAbort(lk.name) if self.abort is not None and self.abort()
                        else give_up() if give_up is not None else None)
                if stop is not None:
                    q[e + E_SINCE] = 0
                    w = q[e + E_WORD]
                    q[e + E_WORD] = (w & ~7) + 8 + IDLE
                    raise stop
        q[e + E_SINCE] = 0
        waited = time.monotonic_ns() - t0
        if give_up is None and waited >= self.wait_log_ns and self.on_wait is not None:
            self.on_wait(lk.name, waited / 1e6, holders or [])

    def lock(self, lk: Lock, check: bool = True) -> None:
        """mutex_lock / down_read: take one unit."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if self.sched is not None:
            self.sched("lock", lk)
        if self.uaf is not None and lk.mmrow >= 0 and mm_freed(self.q, lk):
            self.uaf(lk, "lock")
        if check and self.lockdep is not None:
            self.lockdep_check(lk, "lock")
        e, w, got = self._take_try(lk)
        if not got:
            self._block(lk, e)
        self.q[e + E_WORD] = (w & ~7) + 16 + HELD

    def _take_try(self, lk: Lock) -> tuple[int, int, bool]:
        """The first half of lock and trylock (the C core's take_try):
        E_LOCK, the word -> WAITING, one trywait [window A].  Returns the
        entry's offset, its word before, and whether a unit was taken."""
        q = self.q
        e = self.ebase[lk.cls]
        q[e + E_LOCK] = lk.lid
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + WAITING
        try:
            lk.sem.acquire(0)
        except posix_ipc.BusyError:
            return e, w, False
        return e, w, True

    def trylock(self, lk: Lock) -> bool:
        """mutex_trylock / down_read_trylock (cannot deadlock: only a
        recursive trylock is reported)."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if self.sched is not None:
            self.sched("trylock", lk)
        if self.uaf is not None and lk.mmrow >= 0 and mm_freed(self.q, lk):
            self.uaf(lk, "trylock")
        if self.lockdep is not None and self.holds(lk):
            self.lockdep("recursive", lk, lk.lid, "trylock")
        q = self.q
        prev = q[self.ebase[lk.cls] + E_LOCK]
        e, w, got = self._take_try(lk)
        if got:
            q[e + E_WORD] = (w & ~7) + 16 + HELD
        else:
            # busy: the entry back as it was (lock and state).  A holder's
            # trylock of what it holds (lockdep's "recursive") left it
            # IDLE, and recover() then counted the unit it still held as
            # a dead task's (test_lockcore's random SIGKILLs, 1 run in ~50)
            q[e + E_LOCK] = prev
            q[e + E_WORD] = (w & ~7) + 16 + (w & 7)
        return got

    def lock_bounded(self, lk: Lock, timeout: float, between: Callable[[], bool]) -> None:
        """mutex_lock for a task that has other duties while it waits (the
        daemon's requests: its main loop reaps, recovers, reports hung
        tasks): ``trylock``, else the protocol's WAITING entry -- so the
        watchdog and recovery see this wait as any other -- and
        ``between()`` after every slice of it.  A holder that dies
        meanwhile is then recovered by ``between`` (the caller's reaping),
        whose posting of its units ends the wait, instead of blocking the
        caller for ever.  ``between()`` returning True (a hung task was
        reported: waiting on would wait for ever), or ``timeout`` seconds
        passing, gives up: the entry goes back to IDLE, no unit taken, and
        LockTimeout says which.  Unlike ``lock``: no ``lock_wait`` event
        (``on_wait``)."""
        if self.lockdep is not None:
            # its trylock checks recursion only: the order, as lock does
            self.lockdep_check(lk, "lock")
        if self.trylock(lk):
            return
        q = self.q
        e = self.ebase[lk.cls]
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + WAITING
        end = time.monotonic() + timeout

        def give_up() -> LockAbort | None:
            hung = between()
            return LockTimeout(lk.name, hung, timeout) if hung or time.monotonic() > end else None
        self._block(lk, e, give_up)
        q[e + E_WORD] = (w & ~7) + 16 + HELD

    def unlock(self, lk: Lock) -> None:
        """mutex_unlock / up_read."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if self.sched is not None:
            self.sched("unlock", lk)
        if self.uaf is not None and lk.mmrow >= 0 and mm_freed(self.q, lk):
            self.uaf(lk, "unlock")
        q = self.q
        e = self.ebase[lk.cls]
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + RELEASING
        lk.sem.release()
        q[e + E_WORD] = (w & ~7) + 16 + IDLE

    def down_write(self, sem: Lock, wmutex: Lock) -> None:
        """down_write: the writer mutex, then every unit of ``sem``."""
        if self.lockdep is not None:
            self.lockdep_check(sem, "down_write", from_cls=wmutex.cls)
        self.lock(wmutex, check=False)
        q = self.q
        e = self.ebase[sem.cls]
        q[e + E_LOCK] = sem.lid
        q[e + E_HELD] = 0
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + WRITER + WAITING
        acquire = sem.sem.acquire
        for i in range(sem.units):
            try:
                acquire(0)
            except posix_ipc.BusyError:
                self._block(sem, e)
            q[e + E_HELD] = i + 1
        q[e + E_WORD] = (w & ~7) + 16 + WRITER + HELD

    def up_write(self, sem: Lock, wmutex: Lock) -> None:
        q = self.q
        e = self.ebase[sem.cls]
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + WRITER + RELEASING
        release = sem.sem.release
        for i in range(sem.units - 1, -1, -1):
            release()
            q[e + E_HELD] = i
        q[e + E_WORD] = (w & ~7) + 16 + IDLE
        self.unlock(wmutex)

    def holds(self, lk: Lock) -> bool:
        e = self.ebase[lk.cls]
        return self.q[e + E_LOCK] == lk.lid and (self.q[e + E_WORD] & 3) == HELD

    # -- waits that are not on a semaphore (the allocator's) ---------------
    def wait_begin(self, cls: int = C_FRAMES, what: int = 0) -> None:
        e = self.ebase[cls]
        self.q[e + E_LOCK] = lock_id(cls, what)
        self.q[e + E_SINCE] = time.monotonic_ns()
        self._set(e, WAITING)

    def wait_spin(self, cls: int = C_FRAMES) -> None:
        self.q[self.ebase[cls] + E_SPINS] += 1

    def wait_end(self, cls: int = C_FRAMES) -> None:
        """The wait is over; a long one is a ``lock_wait`` (on "frames"), as
        a long wait on a semaphore is (no holders: frames have none)."""
        e = self.ebase[cls]
        since = self.q[e + E_SINCE]
        self.q[e + E_SINCE] = 0
        self._set(e, IDLE)
        if since and self.on_wait is not None:
            waited = time.monotonic_ns() - since
            if waited >= self.wait_log_ns:
                self.on_wait(lock_name(self.q[e + E_LOCK]), waited / 1e6, [])

    def clear_entries(self) -> None:
        """Forget every entry (after recovery took over what they held)."""
        for e in self.ebase:
            self._set(e, IDLE)
            self.q[e + E_HELD] = 0
            self.q[e + E_SINCE] = 0


if TYPE_CHECKING or _lockcore is None:
    Task = PyTask
else:
    class Task(_lockcore.TaskCore, PyTask):
        """PyTask with its uncontended operations (lock, trylock, unlock)
        in C (uksm/kernel/_lockcore.c): the same word transitions in the
        same order; a blocked wait, down_write/up_write, the hooks and
        recover() are PyTask's."""

        def __init__(self, q: memoryview, row_base: int, row: int,
                     holders: Callable[[int], list[int]] | None = None,
                     wait_log_ms: int = 100) -> None:
            PyTask.__init__(self, q, row_base, row, holders, wait_log_ms)
            self._core_bind(q, self.ebase)


# ---- reading entries from outside (recovery, watchdog, fsck) --------------

class Entry:
    """A snapshot of one task's entry on one lock."""

    __slots__ = ("row", "pid", "lid", "word", "held", "spins", "since")

    def __init__(self, row: int, pid: int, lid: int, word: int, held: int,
                 spins: int, since: int) -> None:
        self.row, self.pid, self.lid = row, pid, lid
        self.word, self.held, self.spins, self.since = word, held, spins, since

    @property
    def state(self) -> int:
        return self.word & 3

    @property
    def writer(self) -> bool:
        return bool(self.word & WRITER)

    def units(self) -> int:
        """What a live entry holds on a stable snapshot (no window)."""
        st = self.state
        if self.writer:
            return self.held if st in (WAITING, HELD) else 0
        return 1 if st == HELD else 0


def read_entries(q: memoryview, rows: Iterable[tuple[int, int]], cls: int) -> list[Entry]:
    """Entries of class ``cls`` that are not idle, for (row, row_base) pairs."""
    out = []
    for row, base in rows:
        e = base + T_LOCKS + cls * ESIZE
        word = q[e + E_WORD]
        if word & 3 == IDLE:
            continue
        out.append(Entry(row, q[base + T_PID], q[e + E_LOCK], word, q[e + E_HELD],
                         q[e + E_SPINS], q[e + E_SINCE]))
    return out


def recover(q: memoryview, locks: dict[int, Lock],
            live_rows: Callable[[], list[tuple[int, int]]],
            dead_rows: list[tuple[int, int]], owned: dict[int, int] | None = None,
            deadline_s: float = 30.0, exact: bool = False) -> dict[int, int]:
    """Take over the units that dead tasks hold of each lock in ``locks``.

    ``live_rows()`` is asked again at every round: a task that dies while
    we wait stops counting as live (its entry would never settle).
    ``owned``: units the caller already holds (taken over from earlier
    deaths), which no entry records.  Returns {lock id: units now owned by
    the caller on the dead's behalf}; the caller repairs what each lock
    protects and then posts them.  The free units drained on the way are
    posted back before returning.

    ``exact``: every live task is parked at a scheduling point of a
    controlled run (``uksm.kernel.sched``), and a point is never inside
    window A or B: no live entry is in a transition, no post can come
    while we look.  Then one drain and one snapshot decide, with the same
    arithmetic -- the three-snapshot rule above only stands in for that
    knowledge when the tasks run freely.
    """
    owned = owned or {}
    progress.clear()
    drained = {lid: 0 for lid in locks}
    hist: dict[int, list[dict[int, tuple[int, int, int]]]] = {lid: [] for lid in locks}
    result: dict[int, int] = {}
    pending = set(locks)
    t_end = time.monotonic() + deadline_s
    while pending:
        rows = live_rows()
        for lid in list(pending):
            lk = locks[lid]
            cls = lid >> 40
            # drain, then snapshot: every unit posted before a snapshot is
            # drained before the next one, and a post after the last
            # snapshot of a decision is not drained by it (snapshot, then
            # drain, counted a live holder's unit posted between the two
            # twice: as drained and as held in that snapshot)
            while True:
                try:
                    lk.sem.acquire(0)
                    drained[lid] += 1
                except posix_ipc.BusyError:
                    break
            snap = {en.row: (en.word, en.held, en.spins)
                    for en in read_entries(q, rows, cls) if en.lid == lid}
            h = hist[lid]
            h.append(snap)
            progress[lk.name] = {"drained": drained[lid],
                                 "snapshots": [{str(r): list(v) for r, v in x.items()} for x in h[-3:]]}
            if (exact and not any(w & 3 == RELEASING for (w, _h, _s) in snap.values())) \
                    or (len(h) >= 3 and _stable(h[-3], h[-2], h[-1])):
                live = sum(_units(w, held) for (w, held, _s) in h[-1].values())
                dead = lk.units - drained[lid] - live - owned.get(lid, 0)
                if dead < 0:  # cannot happen if every task follows the protocol
                    _give_back(locks, drained)
                    raise RuntimeError(f"lock recovery of {lk.name}: negative remainder {dead}")
                result[lid] = dead
                pending.discard(lid)
        if pending:
            if time.monotonic() > t_end:
                _give_back(locks, drained)
                raise TimeoutError("lock recovery did not settle: "
                                   + ", ".join(locks[lid].name for lid in pending))
            waiting = any(w & 3 == WAITING for lid in pending for (w, _h, _s) in hist[lid][-1].values())
            time.sleep(WAIT_SLICE * 1.5 if waiting else 0.001)
    _give_back(locks, drained)
    for _row, base in dead_rows:
        for c in range(NCLASS):
            e = base + T_LOCKS + c * ESIZE
            if (q[e + E_LOCK] in locks) or c == C_FRAMES:
                w = q[e + E_WORD]
                q[e + E_WORD] = (w & ~7) + 8
                q[e + E_HELD] = 0
                q[e + E_SINCE] = 0
    return result


def _give_back(locks: dict[int, Lock], drained: dict[int, int]) -> None:
    """Post the free units recover() drained while it decided -- also when
    it gives up (TimeoutError) or its books do not add up (RuntimeError):
    the supervisor reports those and goes on, and a lock left short of
    those units would wedge every later taker."""
    for lid, n in drained.items():
        for _ in range(n):
            locks[lid].sem.release()


# what the last recover() saw of each lock (for a stalled recovery's report)
progress: dict[str, dict] = {}


def _units(word: int, held: int) -> int:
    st = word & 3
    if word & WRITER:
        return held if st in (WAITING, HELD) else 0
    return 1 if st == HELD else 0


def _stable(s1: dict, s2: dict, s3: dict) -> bool:
    if not (s1.keys() == s2.keys() == s3.keys()):
        return False
    for row, (w3, h3, sp3) in s3.items():
        w1, _h1, _sp1 = s1[row]
        w2, h2, sp2 = s2[row]
        if not (w1 == w2 == w3) or w3 & 3 == RELEASING:
            return False
        if w3 & 3 == WAITING and not (sp3 > sp2 and h3 == h2):
            return False
    return True


def dead_locks(q: memoryview, base: int) -> list[int]:
    """Lock ids a dead task's entries mention (not idle; not the frames wait)."""
    out = []
    for c in range(NCLASS):
        if c == C_FRAMES:
            continue
        e = base + T_LOCKS + c * ESIZE
        if q[e + E_WORD] & 3 != IDLE:
            out.append(q[e + E_LOCK])
    return out


def holders_of(q: memoryview, rows: Iterable[tuple[int, int]], lid: int) -> list[int]:
    """PIDs of live tasks holding (part of) ``lid``: for lock_wait and the
    hung-task chain."""
    cls = lid >> 40
    return [en.pid for en in read_entries(q, rows, cls)
            if en.lid == lid and (en.state in (HELD, RELEASING)
                                  or (en.writer and en.held > 0))]


__all__ = ["Lock", "LockAbort", "LockTimeout", "Task", "PyTask", "IMPL", "Entry", "recover", "read_entries",
           "dead_locks", "holders_of", "lock_id", "lock_name", "IDLE", "WAITING", "HELD",
           "RELEASING", "STATE_NAMES", "WAIT_SLICE"]
