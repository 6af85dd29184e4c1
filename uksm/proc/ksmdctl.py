"""ksmd's life seen from outside: started, stopped, restarted after an oops.

In the kernel ksmd never dies.  In uksm it is a process, which a bug (an
*oops*: an exception it did not expect) or a signal can end; the machine
must not hang then, and the run must fail.  So:

- ``start``: fork + exec ksmd on its task row, with the write end of an
  oops channel (``uksm.host.oops``): an oopsing ksmd writes what it raised
  there before it dies, the evidence whatever its exit status;
- ``check_dead`` (the detector thread): ksmd died while the cluster runs:
  count the oops, send its row to recovery (its locks are taken over like a
  worker's; the slots' rmap_item counts are cleared, they died with it);
  recovery calls ``lost``, which schedules a fresh ksmd after a backoff
  (``restart_if_due``, in the main loop), or gives up after a few oopses
  in a row (``given_up``: the run ends with EXIT_OOPS);
- ``wait_frees``: before shutdown stops it, ksmd frees the slots the
  slow-path exits left it (run=1);
- ``stop``: shutdown's SIGTERM, and an oops in flight as it was stopped;
- ``note_oops``: the same accounting for the run= writer (``uksm.kernel.writer``),
  the other task that runs kernel code in its own process.

``sup.ksmd`` (the child, under ``sup.lock``) is the supervisor's, as every
child is; this class owns the oops channel's read end, the oops counts and
the restart schedule.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from uksm.host.oops import Oopses
from uksm.kernel import fsck
from uksm.kernel.layout import (
    H_KSMD_PID,
    H_KSMD_TASK,
    H_SHUTDOWN,
    K_FULL_SCANS,
    K_PAGES_SCANNED,
    K_RUN,
    R_KSMD,
    TS_DEAD,
)
from uksm.proc.children import Child
from uksm.proc.reaper import own_error

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor


class KsmdCtl:
    """Starts, stops and restarts ksmd; counts its oopses (and the writer's)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.oopses = Oopses()
        self.oops_fd = -1        # the read end of ksmd's oops channel
        self.restart_at = 0.0    # when the main loop starts a new ksmd (0: no restart due)
        self.ksmd_delay = 0.0    # the backoff before the next ksmd restart

    def start(self) -> None:
        row = self.sup.alloc_row(R_KSMD)
        args = self.sup.child_args("uksm.kernel.ksmd", row)
        r, w = Oopses.channel()
        try:
            p = self.sup._popen(args, oops_fd=w)
        finally:
            os.close(w)
        self.close_oops_fd()
        self.oops_fd = r
        self.oopses.restarted(self._ksmd_progress())
        self.sup.cl.trow(row).pid = p.pid
        self.sup.cl.q[H_KSMD_TASK] = row
        self.sup.cl.q[H_KSMD_PID] = p.pid
        self.sup.ksmd = Child(row, p, "ksmd")

    def _ksmd_progress(self) -> tuple[int, int]:
        """What ksmd has published (a batch since a restart changes it)."""
        return self.sup.cl.q[K_PAGES_SCANNED], self.sup.cl.q[K_FULL_SCANS]

    def close_oops_fd(self) -> None:
        if self.oops_fd >= 0:
            os.close(self.oops_fd)
            self.oops_fd = -1

    def take_oops_fd(self, ch: Child | None = None) -> int:
        """The read end of a dead task's oops channel, taken once (the
        detector thread and stop_ksmd may both look): ksmd's, or writer
        ``ch``'s; -1 if taken already."""
        with self.sup.lock:
            if ch is None:
                fd, self.oops_fd = self.oops_fd, -1
            else:
                fd, ch.oops_fd = ch.oops_fd, -1
        return fd

    def _oops_note(self, role: str, sig: tuple[str, str], first: bool, then: str) -> None:
        if not self.sup.quiet and (first or self.given_up):
            print(f"uksm: {role} oops: {sig[0]} at {sig[1]} (traceback in its log); {then}",
                  file=sys.stderr, flush=True)

    def note_oops(self, ch: Child | None, then: str) -> None:
        """A task exited that is not restarted: the writer of run (``ch``;
        the write's caller gets its status), or ksmd as shutdown stopped it
        (None).  If it oopsed (it sent what it raised down its channel --
        the evidence, whatever its status), count the oops: the run fails
        with EXIT_OOPS."""
        fd = self.take_oops_fd(ch)
        sig = Oopses.read(fd) if fd >= 0 else None
        if sig is not None:
            with self.sup.lock:
                first = self.oopses.note(sig, ch.role if ch else "ksmd")
            self._oops_note(ch.role if ch else "ksmd", sig, first, then)

    @property
    def given_up(self) -> str:
        """Why the cluster cannot go on ('' if it can): ksmd oopsed in a row."""
        return self.oopses.given_up

    def oopsed(self, status: int) -> None:
        """ksmd died: an oops (it sent what it raised down its channel) is
        counted and restarted after a backoff, or given up after a few in
        a row (``uksm.host.oops``); any other death is an error, restarted at
        once."""
        fd = self.take_oops_fd()
        sig = Oopses.read(fd) if fd >= 0 else None
        self.ksmd_delay = 0.0
        if sig is None:
            self.sup.errors.append(f"ksmd died (status {status})")
            return
        first, self.ksmd_delay = self.oopses.count(sig, self._ksmd_progress())
        if self.given_up:
            self.sup.errors.append(self.given_up)
            self.sup.log.error("oops_loop", in_row=self.oopses.in_row, error=sig[0], where=sig[1])
        else:
            self.sup.log.warning("ksmd_restart", delay_s=self.ksmd_delay, in_row=self.oopses.in_row,
                             error=sig[0], where=sig[1])
        self._oops_note("ksmd", sig, first,
                        self.given_up or f"restarting ksmd in {self.ksmd_delay:.1f}s")

    def lost(self, row: int) -> None:
        """After a dead ksmd's locks are recovered (and the slots' rmap_item
        counts cleared: they died with it), a new ksmd takes over the list --
        including the slots that slow-path exits left it to free."""
        self.sup.free_row(row)
        if not self.sup.stop_ev.is_set() and not self.given_up and not self.sup.failed:
            with self.sup.lock:  # the main loop starts it (it owns the children), after the backoff
                self.restart_at = time.monotonic() + self.ksmd_delay

    def stop(self) -> None:
        if self.sup.ksmd is None:
            return
        self.sup.cl.q[H_SHUTDOWN] = 1
        p = self.sup.ksmd.proc
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        self.note_oops(None, "ksmd stopped")  # an oops in flight as it was stopped
        self.sup.free_row(self.sup.ksmd.row)
        self.sup.ksmd = None

    def check_dead(self) -> None:
        """ksmd died (not stopped by shutdown): count the oops, if it was
        one, and send its row to recovery, which restarts it (``lost``).
        Called by the detector thread."""
        cl, q = self.sup.cl, self.sup.cl.q
        k = self.sup.ksmd
        if k is not None and k.proc.poll() is not None and not q[H_SHUTDOWN]:
            with self.sup.lock:
                if self.sup.ksmd is not k:
                    return
                self.sup.log.error("ksmd_died", status=k.proc.returncode)
                if not cl.trow(k.row).ready and own_error(k.proc.returncode):
                    # it never started (an import error): a new one would
                    # die the same way -- the cluster fails, at once
                    self.sup.task_failed(k, k.proc.returncode, ready=False)
                # counted before ksmd is None (under the lock, as stop_ksmd
                # takes the channel): shutdown's report never misses it
                self.oopsed(k.proc.returncode)
                self.sup.ksmd = None
            # out of scope for the kernel (ksmd does not die), but the machine
            # must not hang: recover the locks it held like a worker's, then
            # start a fresh ksmd (its rmap_items and trees are gone)
            cl.trow(k.row).state = TS_DEAD
            self.sup.recovery.queue_death((k.row, k, k.proc.returncode))


    def restart_if_due(self) -> None:
        """The main loop starts the new ksmd (it owns the children), once
        the backoff after an oops has passed."""
        if self.restart_at and time.monotonic() >= self.restart_at:
            self.restart_at = 0.0
            self.sup.start_ksmd()

    def wait_frees(self, timeout: float = 20.0) -> None:
        """Let ksmd free the slots that slow-path exits left it (run=1)."""
        cl, q = self.sup.cl, self.sup.cl.q
        if q[K_RUN] != 1 or self.sup.ksmd is None:
            return

        def none_left() -> bool:
            self.sup.sweep()
            return not any((m := cl.mrow(r)).id and m.slot_used and m.users == 0
                           for r in range(cl.max_mms))
        fsck.wait_settled(none_left, timeout, 0.005)

