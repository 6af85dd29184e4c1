"""Recovery of tasks that died without running their exit (SIGKILL).

A task killed at any instruction may hold cluster locks, and may have left
what they protect half-changed.  The kernel never has this problem (a task
dies only at its own exit); uksm's machine must, or a SIGKILL would wedge
the cluster.  So, one batch of deaths at a time, in order:

1. take over every lock the dead held (``locks.recover``: their units are
   now ours) -- leaf locks first: ksm_mmlist_lock (repair the slot list:
   ``ksm.repair_list``) and zone_lock (rebuild the free stack), released
   at once;
2. make ``ksm_test_exit`` true for each dead task's mm (``mm_users_zero``)
   before anybody else can take its mmap_sem;
3. stop the world (every pte lock, zone_lock) and ``fsck.rebuild`` the
   frame table's counts from the page tables;
4. release the rest (pte locks, mmap_sems, the write mutexes,
   ksm_thread_mutex) and hand each dead worker to a reaper
   (``uksm.proc.reaper``), which runs its exit on its behalf; a dead ksmd
   is restarted (``uksm.proc.ksmdctl``), a dead writer's row freed.

Every wait in steps 2-3 gives up if its holder died meanwhile: that death
joins the batch and the loop goes round again (``_more_dead``).

Threads: ``loop`` is the recovery thread (one; it has its own task row,
``self.cl``); ``queue_death``/``submit`` are called by the reaper's poll
and detector; ``check_stall`` by the detector thread.  ``pending_deaths``
(under ``sup.lock``) counts deaths queued or being recovered, so that
``Reaper.settled`` never sees a death neither listed nor pending.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

from uksm.kernel import fsck
from uksm.kernel.cluster import Cluster
from uksm.kernel.exit import mm_users_zero
from uksm.kernel.ksm import drop_orphaned_refs, repair_list
from uksm.kernel.layout import (
    C_DAEMON,
    C_MMAP,
    C_PTL,
    C_WMUTEX,
    H_KSM_UNSYNCED,
    H_UNMERGE_WAIT,
    S_LOCK_RECOVERIES,
    S_RECOVERIES,
    T_PID,
    TS_DEAD,
)
from uksm.kernel.locks import Lock, LockAbort, dead_locks, lock_name, recover
from uksm.kernel.memory import rebuild_free_stack
from uksm.kernel.mm import MM
from uksm.proc.children import Child, Death

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor


class Recovery:
    """The recovery thread and its queue of deaths."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        # deaths; None is teardown's wake-up call (``wake``), never recovered
        self.dead_q: queue.Queue[Death | None] = queue.Queue()
        self.pending_deaths = 0      # queued or being recovered (under sup.lock)
        self.recovery_started = 0.0  # when the batch in hand began (0: none)
        self.stall_reported = 0.0
        self.cl: Cluster             # the recovery thread's own task row (start())

    def start(self, row: int) -> threading.Thread:
        """Give the recovery thread its task row ``row`` and start it."""
        self.cl = self.sup.cl.thread_view(row)
        self.cl.task.on_wait = self.sup.on_wait(self.sup.log)
        t = threading.Thread(target=self.loop, daemon=True, name="recovery")
        t.start()
        return t

    def submit(self, row: int, ch: Child, rc: int) -> None:
        """A claimed death (already counted in pending_deaths) to recovery."""
        self.sup.cl.trow(row).state = TS_DEAD
        self.dead_q.put((row, ch, rc))

    def queue_death(self, item: Death) -> None:
        with self.sup.lock:
            self.pending_deaths += 1
        self.dead_q.put(item)

    def wake(self) -> None:
        """Teardown has set ``stop_ev``: let the thread see it now rather
        than at its next 0.1 s timeout (teardown joins it; the wait was
        most of a clean run's teardown)."""
        self.dead_q.put(None)

    def loop(self) -> None:
        while True:
            try:
                first = self.dead_q.get(timeout=0.1)
            except queue.Empty:
                first = None
            if first is None:
                if self.sup.stop_ev.is_set() and self.dead_q.empty():
                    return
                continue
            batch = [first]
            self._more_dead(batch)
            self.recovery_started = time.monotonic()
            try:
                self.recover(batch)
            except Exception as e:  # a bug: say it loudly, keep the cluster going
                import traceback
                self.sup.errors.append(f"recovery failed: {e!r}")
                self.sup.log.error("recovery_failed", error=repr(e), tb=traceback.format_exc())
            finally:
                self.recovery_started = 0.0
                with self.sup.lock:
                    self.pending_deaths -= len(batch)

    def recover(self, batch: list[Death]) -> None:
        """Take over what the dead held, repair, release; then reap them."""
        owned: dict[int, int] = {}
        locks: dict[int, Lock] = {}
        try:
            self._recover(batch, owned, locks)
        except BaseException:
            # a bug in the repair: do not also wedge the cluster on the locks
            for lid, n in owned.items():
                self._post(locks[lid], n)
            raise

    def _recover(self, batch: list[Death], owned: dict[int, int],
                 locks: dict[int, Lock]) -> None:
        cl, q = self.cl, self.cl.q
        t0 = time.monotonic_ns()
        done_rows: set[int] = set()
        nrec = 0
        while True:
            # a dead parent's fork in flight: the new task's row holds the
            # new mm's locks (uksm.kernel.fork), dead with it (Reaper._claim)
            rows = [r for (r, _c, _rc) in batch]
            rows += [c - 1 for r in rows if (c := cl.trow(r).fork_child)]
            new = [(r, cl.tbase(r)) for r in rows if r not in done_rows]
            if new:
                lids = {lid for (_r, b) in new for lid in dead_locks(q, b)}
                these = {lid: cl.lock_by_id(lid) for lid in lids}
                took = recover(q, these, cl.live_rows, new, owned)
                for lid, n in took.items():
                    if n:
                        self.sup.log.warning("lock_recovery", lock=lock_name(lid), units=n,
                                         dead_pid=[q[b + T_PID] for (_r, b) in new],
                                         state="taken over")
                        owned[lid] = owned.get(lid, 0) + n
                        locks[lid] = these[lid]
                        nrec += 1
                done_rows |= {r for (r, _b) in new}
                # leaf locks first: repair what they protect and let them go
                if owned.get(cl.mmlist.lid):
                    repair_list(cl)
                    self._post(cl.mmlist, owned.pop(cl.mmlist.lid))
                drop_orphaned_refs(cl, self.sup.log)   # a slot freed, its mmdrop not yet done
                if owned.get(cl.zone.lid):
                    rebuild_free_stack(cl, fsck.live_task_rows(cl))
                    self._post(cl.zone, owned.pop(cl.zone.lid))
            owned_ptl = {lid & ((1 << 40) - 1) for lid in owned if lid >> 40 == C_PTL}
            # every wait from here on gives up if its holder died meanwhile:
            # that death joins the batch and the loop goes round again
            cl.task.abort = lambda: self._more_dead(batch)
            try:
                # ksm_test_exit must hold before anyone else can take their
                # mmap_sem: the dead tasks' mms, and a half-made child's
                dead_mms = [ch.mm for (_r, ch, _rc) in batch]
                dead_mms += [cl.trow(c - 1).mm for (r, _c, _rc) in batch
                             if (c := cl.trow(r).fork_child)]
                for mm_id in dead_mms:
                    mm0 = self.sup.mms.get(mm_id)
                    if mm0 is not None and mm0.words.id == mm_id:
                        mm_users_zero(cl, MM(cl, mm_id, mm0.row, mm0.seg), self.sup.log,
                                      ptl_held=mm_id in owned_ptl)
                for (_r, ch, _rc) in batch:
                    if ch.role == "ksmd":  # its rmap_items died with it
                        cl.task.lock(cl.mmlist)
                        for s in range(cl.max_mms):
                            cl.mrow(s).slot_rmap = 0
                        cl.task.unlock(cl.mmlist)
                mms = self.sup.live_mms()
                with fsck.world_stopped(cl, mms, owned_ptl, abort=lambda: self._more_dead(batch)):
                    fixed = fsck.rebuild(cl, mms)
                break
            except LockAbort:   # HolderDied (world_stopped) too
                continue
            finally:
                cl.task.abort = None
        for lid in owned:
            row = cl.mm_row(lid & ((1 << 40) - 1)) if lid >> 40 == C_MMAP else -1
            if row >= 0:  # a writer died waiting or holding: nobody waits now
                cl.mrow(row).writer_waiting = 0
        if cl.daemon.lid in owned and q[H_UNMERGE_WAIT]:
            # a run=2 writer died waiting for ksmd to count out what its
            # failed unmerge removed: nobody waits now, and the counters
            # wait for ksmd's next reconcile (fsck is told)
            q[H_UNMERGE_WAIT] = 0
            q[H_KSM_UNSYNCED] += 1
        for cls in (C_PTL, C_MMAP, C_WMUTEX, C_DAEMON):
            for lid in [x for x in owned if x >> 40 == cls]:
                self._post(locks[lid], owned.pop(lid))
        ms = (time.monotonic_ns() - t0) / 1e6
        q[S_RECOVERIES] += 1          # single writer: this thread
        q[S_LOCK_RECOVERIES] += nrec
        for (r, ch, rc) in batch:
            self.sup.log.warning("recovery", dead_pid=ch.proc.pid, mm=ch.mm, ms=round(ms, 3),
                             frames_fixed=fixed, status=rc)
            if ch.role == "ksmd":
                self.sup.ksmdctl.lost(r)
                continue
            if ch.role == "writer":  # no mm, no exit to run
                self.sup.free_row(r)
                continue
            self.sup.reaper.start(r, ch)

    def check_stall(self, after_s: float = 3.0) -> None:
        """A recovery should take milliseconds: one that takes seconds is
        a bug to diagnose, so say where the recovery thread is."""
        started = self.recovery_started
        if not started or time.monotonic() - started < after_s or self.stall_reported == started:
            return
        self.stall_reported = started
        import sys as _sys
        import traceback as _tb
        frames = _sys._current_frames()
        stacks = {t.name: "".join(_tb.format_stack(frames[t.ident]))
                  for t in threading.enumerate() if t.ident in frames}
        from uksm.kernel import locks as _locks
        self.sup.log.error("recovery_stalled", seconds=round(time.monotonic() - started, 3),
                       pending=self.pending_deaths, stacks=stacks, locks=dict(_locks.progress),
                       live_rows=[r for r, _b in self.sup.cl.live_rows()])

    def _more_dead(self, batch: list[Death]) -> bool:
        """Called while the recovery waits for a lock: pull in deaths that
        happened since (a dead task may hold the lock we wait for)."""
        got = False
        while True:
            try:
                d = self.dead_q.get_nowait()
            except queue.Empty:
                return got
            if d is not None:  # a wake-up call: the loop sees stop_ev at its next timeout
                batch.append(d)
                got = True

    @staticmethod
    def _post(lk: Lock, n: int) -> None:
        for _ in range(n):
            lk.sem.release()

