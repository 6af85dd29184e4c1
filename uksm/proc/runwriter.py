"""``echo VALUE > /sys/kernel/mm/ksm/run``, as the shell does it.

In 2.6.32 ``run_store`` runs in the writer's own context: for run=2 the
whole unmerge (``unmerge_and_remove_all_rmap_items``) happens inside the
write(2), under ``ksm_thread_mutex``, and can be OOM-killed or interrupted
(-ERESTARTSYS) there.  So uksm runs each write in a short-lived task of its
own (``uksm.kernel.writer``, which calls ``ksm.run_store``: the one code
that writes ``run``), and this class starts it, says when it has returned,
and waits for it.  A writer killed while holding a lock is recovered like
a worker (``Reaper.writers_exited``), and its oops counted (``KsmdCtl``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR
from uksm.host.oops import Oopses
from uksm.kernel.layout import EXIT_POLICIES, H_EXIT_POLICY, R_WRITER
from uksm.kernel.writer import result_of
from uksm.proc.children import Child

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor

#: wait(pred, timeout): True once pred() holds, False after timeout seconds,
#: doing the caller's main-loop duties in between
Wait = Callable[[Callable[[], bool], float], bool]


class RunWriter:
    """Starts the writer tasks of ``run`` and waits for them."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def start(self, value: int, oom_origin: bool | None = None) -> Child:
        """``echo VALUE > /sys/kernel/mm/ksm/run``: a short-lived task
        (uksm.kernel.writer) runs run_store -- for 2, the whole unmerge -- in its
        own context.  ``oom_origin`` (PF_OOM_ORIGIN while unmerging):
        by default as the exit policy's kernel had it -- 2.6.32 as released
        (``shipped``) did; the seed (and ``legacy``, before it) did not."""
        cl, q = self.sup.cl, self.sup.cl.q
        if oom_origin is None:
            oom_origin = EXIT_POLICIES[q[H_EXIT_POLICY]] == "shipped"
        row = self.sup.alloc_row(R_WRITER)
        args = self.sup.child_args("uksm.kernel.writer", row) + ["--value", str(value)]
        if oom_origin:
            args.append("--oom-origin")
        r, w = Oopses.channel()
        try:
            p = self.sup._popen(args, oops_fd=w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        cl.trow(row).pid = p.pid
        ch = Child(row, p, "writer", oops_fd=r)
        with self.sup.lock:
            self.sup.writers[row] = ch
        return ch

    def status(self, ch: Child) -> int | None:
        """The writer's wait status once it has exited and its row is
        settled (its locks recovered if it died holding one), else None."""
        rc = ch.proc.poll()
        if rc is None:
            return None
        self.sup.reaper.writers_exited()
        with self.sup.lock:
            if ch.row in self.sup.writers:
                return None
        return rc if self.sup.settled() else None

    def write(self, value: int, wait: Wait | None = None, timeout: float = 120.0,
              oom_origin: bool | None = None) -> dict[str, Any]:
        """Start the writer of ``run=value`` and ``wait`` for its write to
        return: {"value", "status", "result"}, the result "done",
        "interrupted" (-ERESTARTSYS), "oom-killed", "killed by SIG..." (the
        writer's exit status through ``writer.result_of``) or "hung" (status
        None: the watchdog has reported a hung task, so waiting on would
        wait for ever).  A write still not returned after ``timeout`` is an
        UksmError (EXIT_ERR).

        Whoever waits (the daemon's ``ctl run=``, ``uksm run``, the API,
        the tests) must keep the main loop's duties going meanwhile: the
        writer may block on a lock whose holder dies, and only reaping
        and recovery free it.  So the waiting is the caller's ``wait``
        (default: sweeping, as ``uksm run``'s main loop does)."""
        sup = self.sup
        ch = self.start(value, oom_origin)
        if not (wait or self.sweeping)(lambda: self.status(ch) is not None or bool(sup.hung), timeout):
            raise shm.UksmError(f"run={value} written, but the write has not returned after "
                                f"{timeout:.0f}s", EXIT_ERR)
        if sup.hung:
            return {"value": value, "status": None, "result": "hung"}
        rc = self.status(ch)
        return {"value": value, "status": rc, "result": result_of(rc)}

    def sweeping(self, pred: Callable[[], bool], timeout: float) -> bool:
        """The default wait: sweep between two looks."""
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                return False
            self.sup.sweep()
            time.sleep(0.01)
        return True
