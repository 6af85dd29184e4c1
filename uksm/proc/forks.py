"""fork: the half of copy_process the supervisor plays (kernel/fork.c).

A task forks in its own process (``uksm.workers.worker.Worker.fork``):
it asks, in its task row (``T_FORK = FORK_ASK``), the supervisor -- the
owner of the process table -- for the new task; ``serve`` makes its row
(dup_task_struct: the row is the task_struct) and its empty mm (mm_alloc:
``Supervisor.new_task``) and answers ``FORK_GO`` with the row in
``T_FORK_CHILD``; the parent copies its address space into it
(``uksm.kernel.fork.dup_mm``: dup_mmap, ksm_fork, copy_page_range, the
new mm's locks taken on the new row) and says ``FORK_DONE`` with the
result; ``finish`` starts the child's process on that row
(wake_up_new_task) and answers with its pid -- or, after an error, frees
the row (the parent tore the mm down itself: bad_fork_cleanup_mm).  Every
answer is a word of the parent's row, so it survives anybody's death.

A fork is refused with -EAGAIN (``T_FORK`` < 0) when the machine has no
room for one more task: its live-task limit (``max_live``: the daemon's
``max_workers``, else a free row), the task or the mm table full -- as
fork fails with EAGAIN past RLIMIT_NPROC or threads-max; and after
``close`` (the machine is stopping).

A parent that dies with a fork in flight (``T_FORK_CHILD`` set: SIGKILL
at any instant of dup_mm, a kill point inside it) takes the half-made
child with it: ``uksm.proc.reaper`` marks the child's row dead when it
claims the parent, ``uksm.proc.recovery`` takes over the locks both rows
hold (the new mm's mmap_sem, its pte lock, zone_lock ...) and makes
``ksm_test_exit`` true for the new mm, and the parent's reaper tears the
new mm down (``mmput`` on the child's row) before it runs the parent's
exit.  The kernel never sees this (a task dies on its way back to user
space, after copy_process returned); its ``bad_fork_cleanup_mm`` is the
same teardown.

Threads: ``poll`` runs in the main loop (``Supervisor.poll``); the
reaper's claim runs in the main loop or the detector thread.  Both decide
under ``sup.lock`` who owns a fork in flight: ``finish`` starts the child
only if the parent is still listed (not claimed dead) with the fork
still its own, and the claim takes the fork only if ``finish`` has not.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from uksm.errors import UksmError
from uksm.kernel.fork import (
    EAGAIN,
    ERESTARTNOINTR,
    fork_adopt,
    fork_go,
    fork_refuse,
    fork_return,
    fork_room,
)
from uksm.kernel.ksm import ENOMEM
from uksm.kernel.layout import FORK_ASK, FORK_DONE
from uksm.kernel.mm import MM
from uksm.proc.children import Child
from uksm.proc.scripting import TASK_PROGRAM
from uksm.workers.workloads import fork_child

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor


class Forks:
    """The forks in flight, and the supervisor's steps of each."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.closed = False              # the machine is stopping: forks refused
        self.max_live: int | None = None  # tasks alive at once (the daemon's max_workers)
        self.inflight: dict[int, int] = {}  # parent row -> the new task's row (under sup.lock)

    def poll(self) -> None:
        """Serve the forks asked for and finish the ones copied (the
        main loop's duty, every round)."""
        cl = self.sup.cl
        with self.sup.lock:
            kids = list(self.sup.children.items())
        for row, ch in kids:
            st = cl.trow(row).fork
            if st == FORK_ASK:
                self.serve(row, ch)
            elif st == FORK_DONE:
                self.finish(row, ch)

    def room(self) -> bool:
        """One more task fits (``uksm.kernel.fork.fork_room``): the
        live-task limit, a free task row and a free mm row."""
        sup = self.sup
        with sup.lock:
            live = len(sup.children) + len(self.inflight)
        return fork_room(sup.cl, live, self.max_live)

    def serve(self, row: int, ch: Child) -> None:
        """The new task's row and empty mm, given to the parent
        (FORK_GO); or the refusal, -EAGAIN (-ENOMEM when /dev/shm has no
        room for the new mm)."""
        sup, cl = self.sup, self.sup.cl
        if self.closed or not self.room():
            self._answer(row, ch, -EAGAIN)
            return
        try:
            crow, mm, _wno = sup.new_task(ch.pages, pid=ch.proc.pid)
        except UksmError:  # the tables were checked: /dev/shm had no room for the mm
            self._answer(row, ch, -ENOMEM)
            return
        fork_adopt(cl, crow, row, ch.proc.pid)
        with sup.lock:
            alive = sup.children.get(row) is ch
            if alive:
                # from here a death of the parent takes the child (Reaper._claim);
                # the commit: the parent copies its mm into it now
                fork_go(cl, row, crow)
                self.inflight[row] = crow
        if not alive:
            sup.abandon_task(crow, mm)

    def _answer(self, row: int, ch: Child, err: int) -> None:
        fork_refuse(self.sup.cl, row, err)
        self.sup.log.info("fork_refused", worker=f"w{ch.worker_no}", mm=ch.mm, err=err)

    def finish(self, row: int, ch: Child) -> None:
        """dup_mm returned: start the child's process on its row, or (an
        error: the parent tore the mm down) free the row.  The answer is
        the pid, or -errno, in T_FORK_PID; T_FORK back to FORK_NONE is the
        fork returning."""
        sup, cl = self.sup, self.sup.cl
        t = cl.trow(row)
        err = t.fork_err
        with sup.lock:
            if sup.children.get(row) is not ch or not t.fork_child:
                return   # the parent died: its reaper undoes the fork
            crow = t.fork_child - 1
            t.fork_child = 0
            self.inflight.pop(row, None)
        ct = cl.trow(crow)
        mm = sup.mms.get(ct.mm)
        if err:   # dup_mm failed: the parent tore the new mm down itself
            sup.free_row(crow)
        elif self.closed:   # the machine stops: nobody would run it (the parent is told to stop too)
            err = -ERESTARTNOINTR
            sup.reaper.undo_fork(crow, sup.log)
        elif mm is None or not mm.alive():
            sup.free_row(crow)   # (not seen: nothing else frees a new task's mm)
            err = -ENOMEM
        else:
            try:
                t.fork_pid = self.start(ch, crow, mm).proc.pid
            except (OSError, UksmError) as e:   # the process could not be made
                sup.log.warning("fork_failed", worker=f"w{ch.worker_no}", error=str(e))
                err = -EAGAIN
                sup.reaper.undo_fork(crow, sup.log)   # its mm's exit, on its row
        fork_return(cl, row, err or t.fork_pid)

    def start(self, parent: Child, crow: int, mm: MM) -> Child:
        """The child's process (exec of the parent's program on the new
        row): a built-in worker goes on with the parent's workload minus
        ``+fork`` (a child does not fork), its contents, for CHILD_LIFE
        fork periods; a programmable task gets a command socket, which
        ``uksm.proc.scripting`` adopts."""
        sup, cl = self.sup, self.sup.cl
        ct = cl.trow(crow)
        workload, life = fork_child(parent.workload)
        if parent.program == TASK_PROGRAM:
            mine, theirs = socket.socketpair()
            try:
                ch = sup.start_worker(crow, mm, ct.worker_no, parent.pages, parent.workload,
                                      parent.seed, parent.churn_ms, TASK_PROGRAM,
                                      ("--cmd-fd", str(theirs.fileno()), "--forked"),
                                      (theirs.fileno(),), content_wno=parent.content_wno)
            except BaseException:
                mine.close()
                raise
            finally:
                theirs.close()
            ch.chan = mine
        else:
            ch = sup.start_worker(crow, mm, ct.worker_no, parent.pages, workload, parent.seed,
                                  parent.churn_ms, parent.program or "uksm.workers.worker",
                                  ("--forked", "--content-wno", str(parent.content_wno),
                                   "--exit-after-ms", str(life)), content_wno=parent.content_wno)
        ct.fork_parent = 0
        sup.log.info("fork_child", worker=f"w{parent.worker_no}", mm=parent.mm,
                     child=f"w{ch.worker_no}", child_pid=ch.proc.pid, child_mm=ch.mm)
        return ch

    def close(self) -> None:
        """The machine is stopping: no new fork (EAGAIN)."""
        self.closed = True


__all__ = ["Forks"]
