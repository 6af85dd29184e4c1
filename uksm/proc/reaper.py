"""Reaping: the children that exited, and the exits the dead left undone.

The supervisor's ``wait4``.  A child that exited is either

- *complete*: it ran its whole exit (its mm dropped, ``XS_MMDROP``, or
  gone) and holds no lock: ``account_exit`` counts it (exited, the exit
  path it took, its verified pages) and frees its task row; or
- *dead*: killed before its exit was done (SIGKILL; a signal after
  ``exit_mm`` changes nothing).  It goes to recovery (``uksm.proc.recovery``),
  which takes over its locks and repairs what they protect, then hands it
  back here: a *reaper* thread (``start``/``_reap``) runs its ``mmput`` on
  its behalf, on its own task row (state TS_REAPING), as if the task had
  reached ``exit_mm``.  Its exit may block (the slow path's
  ``down_write(&mm->mmap_sem)``), so each reaper is a thread of its own.

Two threads look at the children: the main loop (``poll``, which also
accounts the clean exits) and the detector (``detector_loop``: it notices
a death even while the main loop is blocked on a lock the dead held).
``_claim`` takes a child off ``sup.children`` under ``sup.lock``, once, and
counts a death in ``recovery.pending_deaths`` in the same critical
section, so that ``settled`` never sees a death neither listed nor
pending.

A child that died of its own error (``own_error``: an exit status, or a
signal nobody sends a task -- not a kill, not the OOM killer, which a
worker notices and exits through ``exit_task`` with status 0) is not
"killed": ``Supervisor.task_failed`` reports it, and the run fails.

``sweep``: an mm row left MMS_FREEING by a task that died inside
``__mmdrop`` is freed here (``free_mm_objects``).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from uksm.host import log as ulog
from uksm.kernel import oom
from uksm.kernel.cluster import Cluster
from uksm.kernel.exit import mmput
from uksm.kernel.fork import forget_original_parent, undo_fork
from uksm.kernel.layout import (
    EXIT_PATHS,
    EXIT_REASONS,
    R_REAPER,
    S_EXIT_NOSLOT,
    S_EXITED,
    S_KILLED,
    S_MISMATCHES,
    S_PAGES_VERIFIED,
    S_REAPED,
    TS_DEAD,
    TS_REAPING,
    XS_MMDROP,
)
from uksm.kernel.locks import dead_locks
from uksm.kernel.memory import Allocator
from uksm.kernel.mm import MM, finish_frees
from uksm.proc.children import Child, Death

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor

#: the signals that end a task from outside: a kill (``uksm kill``, inject,
#: a kill point, the reboot button of a hung cluster), a stop signal, or the
#: OOM killer's (a task it picks before its handler is in place dies of it)
KILLS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, oom.OOM_SIGNAL})


def own_error(status: int | None) -> bool:
    """A wait status of a task that died of its own error."""
    return status is not None and (status > 0 or (status < 0 and -status not in KILLS))


class Reaper:
    """Reaps the supervisor's children and runs the dead ones' exits."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.reapers: list[threading.Thread] = []   # under sup.lock

    def start(self, row: int, ch: Child) -> None:
        """A recovered dead worker: run its exit in a reaper thread."""
        th = threading.Thread(target=self._reap, args=(row, ch), daemon=True, name=f"reaper-{row}")
        th.start()
        with self.sup.lock:
            self.reapers.append(th)

    def poll(self) -> None:
        """Reap exited children; send the unclean ones to recovery."""
        self.writers_exited()
        for row, ch, rc in self._exited():
            if self.exit_complete(row, ch):
                # it ran its whole exit (a signal after that changes nothing)
                if self._claim(row):
                    self.account_exit(row, ch, reaped=False)
            elif self._claim(row, dead=True):
                self.sup.recovery.submit(row, ch, rc)

    def writers_exited(self) -> None:
        """A writer that returned holds no lock: its row is free.  One that
        died holding a lock (SIGKILL) goes to recovery like a worker."""
        with self.sup.lock:
            done = [(r, ch, rc) for r, ch in self.sup.writers.items() if (rc := ch.proc.poll()) is not None]
        for row, ch, rc in done:
            with self.sup.lock:
                if self.sup.writers.pop(row, None) is None:
                    continue
                dead = any(dead_locks(self.sup.cl.q, self.sup.cl.tbase(row)))
                if dead:
                    self.sup.recovery.pending_deaths += 1  # counted with the claim (see _claim)
            self.sup.ksmdctl.note_oops(ch, "the write failed")
            if dead:
                self.sup.recovery.submit(row, ch, rc)
            else:
                self.sup.free_row(row)

    def _exited(self) -> list[Death]:
        """Children that have exited, with their wait status."""
        with self.sup.lock:
            items = list(self.sup.children.items())
        return [(row, ch, rc) for row, ch in items if (rc := ch.proc.poll()) is not None]

    def _claim(self, row: int, dead: bool = False) -> bool:
        """Take an exited child off the list; False if the other thread
        (poll or detect_deaths) already did.  ``dead``: it goes to recovery,
        counted in pending_deaths in the same critical section, so that
        settled() never sees it neither listed nor pending.  A fork it had
        in flight dies with it: the new task's row is dead from here (its
        locks are recovered with the parent's, its mm torn down by the
        parent's reaper, ``undo_fork``), in the critical section where
        ``Forks.finish`` would have started it (uksm.proc.forks)."""
        with self.sup.lock:
            got = self.sup.children.pop(row, None) is not None
            if got and dead:
                self.sup.recovery.pending_deaths += 1
                crow = self.sup.cl.trow(row).fork_child - 1
                if crow >= 0:
                    self.sup.cl.trow(crow).state = TS_DEAD
                    self.sup.forks.inflight.pop(row, None)
            return got

    def exit_complete(self, row: int, ch: Child) -> bool:
        """The child ran its whole exit (its mm dropped or gone) and holds no lock."""
        q = self.sup.cl.q
        mm = self.sup.mms.get(ch.mm)
        done = mm is None or mm.words.id != ch.mm or mm.words.exit_stage & XS_MMDROP
        return bool(done) and not any(dead_locks(q, self.sup.cl.tbase(row)))

    def account_exit(self, row: int, ch: Child, reaped: bool, how: str | None = None,
                      view: Cluster | None = None) -> None:
        cl = view or self.sup.cl
        q = cl.q
        tr = cl.trow(row)
        if own_error(ch.proc.returncode):
            self.sup.task_failed(ch, ch.proc.returncode, ready=bool(tr.ready))
            how = "error"
        reason = EXIT_REASONS[tr.exit_reason] if how is None else how
        path = EXIT_PATHS[tr.exit_path]
        t = cl.task
        t.lock(cl.mmlist)
        q[S_EXITED] += 1
        if path == "none":  # __ksm_exit found no slot: so that the paths add up to exited
            q[S_EXIT_NOSLOT] += 1
        q[S_PAGES_VERIFIED] += tr.verified
        q[S_MISMATCHES] += tr.mismatches
        if reaped:
            q[S_REAPED] += 1
        t.unlock(cl.mmlist)
        self.sup.log.info("worker_exit", worker=f"w{ch.worker_no}", worker_pid=ch.proc.pid, mm=ch.mm,
                      how=reason, path=path, reaped=reaped)
        forget_original_parent(cl, ch.proc.pid)   # its children go to init
        self.sup.free_row(row)

    def detect_deaths(self) -> None:
        """Send every child that died without finishing its exit to
        recovery.  Runs in its own thread, so that a death is noticed even
        while the main loop (or anybody) is blocked on a lock the dead
        holds.  Clean exits are left to poll(), which accounts them."""
        for row, ch, rc in self._exited():
            if not self.exit_complete(row, ch) and self._claim(row, dead=True):
                self.sup.recovery.submit(row, ch, rc)
        self.writers_exited()

    def detector_loop(self) -> None:
        while not self.sup.stop_ev.wait(0.01):
            try:
                self.detect_deaths()
                self.sup.ksmdctl.check_dead()
                self.sup.recovery.check_stall()
            except Exception as e:  # the cluster may be going away
                self.sup.log.error("recovery_failed", error=repr(e), tb="detector")

    def _reap(self, row: int, ch: Child) -> None:
        """Run the dead worker's exit on its behalf, on its own row."""
        q = self.sup.cl.q
        t = self.sup.cl.trow(row)
        t.kill_point = -1
        t.for_row = row
        t.role = R_REAPER
        t.pid = os.getpid()
        t.state = TS_REAPING
        view = self.sup.cl.thread_view(row)
        # dead_pid on every line: a trace's track for this reaper (its pid is the supervisor's)
        log = ulog.thread_logger("reaper", self.sup.name, self.sup.log_dir, f"r{row}-{ch.proc.pid}",
                                 dead_pid=ch.proc.pid, boot_id=self.sup.cl.boot_id)
        view.task.on_wait = self.sup.on_wait(log)
        view.lockdep_log = log  # its lockdep reports and lock events (UKSM_LOCKTRACE) are the reaper's
        mm0 = self.sup.mms.get(ch.mm)
        try:
            if t.fork_child:   # it died forking: the half-made child goes first
                self.undo_fork(t.fork_child - 1, log)
                t.fork_child = 0
            if mm0 is not None and mm0.words.id == ch.mm:
                mm = MM(view, ch.mm, mm0.row, mm0.seg)
                alloc = Allocator(view)
                alloc.oom_killer = oom.oom_killer(self.sup.log)  # the supervisor's, as ever
                mmput(view, mm, alloc, log)
                alloc.flush()
            if not own_error(ch.proc.returncode):   # (one that failed is no kill)
                view.task.lock(view.mmlist)
                q[S_KILLED] += 1
                view.task.unlock(view.mmlist)
            self.account_exit(row, ch, reaped=True, view=view,
                               how="sigkill" if ch.proc.returncode == -signal.SIGKILL
                               else EXIT_REASONS[t.exit_reason])
        except Exception as e:
            import traceback
            self.sup.errors.append(f"reaper of pid {ch.proc.pid} failed: {e!r}")
            log.error("reaper_failed", error=repr(e), tb=traceback.format_exc())

    def undo_fork(self, crow: int, log: Any) -> None:
        """bad_fork_cleanup_mm for a task whose process never ran
        (``uksm.kernel.fork.undo_fork``, on its own row), then the row is
        freed."""
        cl = self.sup.cl
        mm_id = cl.trow(crow).mm
        mm0 = self.sup.mms.get(mm_id)
        view = cl.thread_view(crow)
        view.task.on_wait = self.sup.on_wait(log)
        view.lockdep_log = log
        mm = MM(view, mm_id, mm0.row, mm0.seg) if mm0 is not None and mm0.words.id == mm_id else None
        undo_fork(view, crow, mm, os.getpid(), log, oom.oom_killer(self.sup.log))
        self.sup.free_row(crow)

    def sweep(self) -> None:
        finish_frees(self.sup.cl, self.sup.log)
        with self.sup.lock:
            # forget freed mms; their mappings go when the last user drops
            # them (the recovery thread may still hold a snapshot: no close())
            for mm_id in [i for i, mm in self.sup.mms.items() if mm.words.id != i]:
                self.sup.mms.pop(mm_id)

    def settled(self) -> bool:
        """No death waiting for recovery, none being recovered, no reaper
        still running a dead task's exit -- and no unclean death not yet
        noticed (a worker ksmd has just SIGKILLed at a kill point).  A clean
        exit not yet accounted by poll() does not count: nothing to recover."""
        with self.sup.lock:
            if self.sup.recovery.pending_deaths or any(t.is_alive() for t in self.reapers):
                return False
        return all(self.exit_complete(row, ch) for row, ch, _rc in self._exited())

