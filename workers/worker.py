"""A worker: a user task living in its own emulated address space.

It maps ``--pages`` pages, marks them MADV_MERGEABLE, writes its workload
through the MMU, then keeps living (rewriting its volatile pages, and with
``--churn-ms`` also dropping and refaulting pages, writing merged pages and
re-advising, so that faults, COW breaks and mmap_sem writers keep coming)
until a fatal signal: SIGTERM/SIGINT (exit normally: verify every page
against what it wrote, then the exit path) or the OOM killer's signal
(exit at once).  SIGKILL leaves the exit to the supervisor's reaper.

A ``W+fork`` worker also forks (``fork``) every so often; its children are
workers started ``--forked``: their address space is the parent's copy
(``uksm.kernel.fork``), they write the parent's contents (``--content-wno``),
and they exit on their own after ``--exit-after-ms``.

Fatal signals are noticed at safe points (between page operations, and in
the allocator's wait), as a killed task notices TIF_SIGPENDING.
"""
from __future__ import annotations

import argparse
import os
import random
import select
import signal
import sys
import time

from uksm.workers.workloads import ZERO, Workload

from uksm.host import log as ulog
from uksm.host.lifeline import EXIT_ORPHAN, arm, exit_now
from uksm.host.shm import UksmError
from uksm.kernel import oom, sched
from uksm.kernel.cluster import Cluster, StaleCluster, add_task_args
from uksm.kernel.exit import mmput
from uksm.kernel.fork import dup_mm
from uksm.kernel.layout import (
    FORK_ASK,
    FORK_DONE,
    FORK_GO,
    FORK_NONE,
    M_OWNER_PID,
    PAGE_SHIFT,
    PAGE_SIZE,
    S_SIGNALS,
    T_EXIT_REASON,
    T_FATAL,
    T_MISMATCHES,
    T_PID,
    T_READY,
    T_VERIFIED,
    X_EXIT,
    X_OOM,
    X_SIGNAL,
)
from uksm.kernel.memory import PCP_BATCH, Allocator, OutOfMemory
from uksm.kernel.mm import mm_attach
from uksm.kernel.mmu import MMU
from uksm.kernel.syscalls import MADV_DONTNEED, MADV_MERGEABLE, sys_madvise, sys_mlockall, sys_mmap

UNKNOWN = -2        # a forked child's inherited volatile page: what it holds is its parent's to know
FORK_POLL_S = 0.002  # how often a forking task looks for the supervisor's answer


class Worker:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        # the cluster instance it was started for (StaleCluster: nothing touched)
        self.cl = Cluster.attach(a.cluster, a.boot_id)
        self.task = self.cl.bind(a.task)
        self.q = self.cl.q
        self.tb = self.task.base
        self.q[self.tb + T_PID] = os.getpid()
        self.log = ulog.setup("worker", a.cluster, a.log_dir, mm=a.mm, boot_id=a.boot_id)
        self.cl.watch_use_after_free(self.log)
        self.cl.lockdep_log = self.log
        self.task.on_wait = lambda name, ms, holders: self.log.info(
            "lock_wait", lock=name, holders=holders, waited_ms=round(ms, 3))
        self.mm = mm_attach(self.cl, a.mm)
        self.q[self.mm.base + M_OWNER_PID] = os.getpid()
        self.alloc = Allocator(self.cl, batch=PCP_BATCH)  # a per-task list of free frames
        self.alloc.oom_killer = oom.oom_killer(self.log)
        self.mmu = MMU(self.cl, self.mm, self.alloc)
        # a forked child writes its parent's contents (--content-wno)
        self.wl = Workload(a.workload, a.seed, a.content_wno or a.worker_no)
        self.version = [-1] * a.pages  # -1: never written, reads as zeros; UNKNOWN: inherited
        self.base = 0
        self.cows_logged = 0
        self.signo = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._fatal)
        signal.signal(oom.OOM_SIGNAL, self._fatal)
        # ``idle`` waits on this pipe: SIGTERM/SIGINT's handler writes it
        # (see ``idle``)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # the supervisor starts us with them blocked (Supervisor.start_worker):
        # one sent while we started is noticed now, at our first safe point
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def _fatal(self, signo: int, _frame: object) -> None:
        if not self.q[self.tb + T_FATAL]:
            self.q[self.tb + T_FATAL] = X_OOM if signo == oom.OOM_SIGNAL else X_SIGNAL
            self.signo = signo
        if signo != oom.OOM_SIGNAL:
            try:
                os.write(self.wake_w, b"\0")
            except BlockingIOError:
                pass

    @staticmethod
    def now() -> float:
        """Seconds, for the churn's period: the run's logical clock in a
        controlled run (uksm.kernel.sched), else the monotonic clock."""
        return sched.now() / 1000.0 if sched.ON else time.monotonic()

    def dying(self) -> bool:
        return bool(self.q[self.tb + T_FATAL])

    def idle(self, seconds: float) -> None:
        """Sleep between rounds of rewrites, cut short by SIGTERM/SIGINT:
        a plain sleep resumes after the handler ran (PEP 475), which made
        every worker stopped at the end of a run wait out the rest of its
        20 ms before its exit began.  The OOM killer's signal does not cut
        it short: the victim notices it at its next safe point, after the
        sleep, as before -- the killer's own steps that follow the kill
        (hazard oom-mmput-in-task: its mmput of the victim's mm) keep the
        head start the fault-injection scenarios were built on (woken at
        once, the victim's own exit won that race one run in six)."""
        if sched.ON:  # a controlled run: logical time (uksm.kernel.sched)
            sched.sleep(int(seconds * 1000))
            return
        select.select([self.wake_r], [], [], seconds)
        try:
            os.read(self.wake_r, 256)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Let go of the cluster and the wake pipe (a process that lives on
        after this worker: a controlled run's pool, uksm.explore)."""
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.cl.close()

    def expected(self, i: int) -> bytes | None:
        """What page i holds, None if only the parent knew (UNKNOWN)."""
        v = self.version[i]
        return None if v == UNKNOWN else ZERO if v < 0 else self.wl.content(i, v)

    def write_page(self, i: int, n: int = 1) -> None:
        """Write pages i..i+n-1 (one MMU write: it may span pages)."""
        for j in range(i, i + n):
            self.version[j] = max(self.version[j], 0)
        data = b"".join(self.wl.content(j, self.version[j]) if self.version[j] >= 0 else ZERO
                        for j in range(i, i + n))
        self.mmu.write(self.base + i * PAGE_SIZE, data)

    def run(self) -> int:
        a = self.a
        try:
            if a.forked:
                self.inherit()
            else:
                self.base = sys_mmap(self.cl, self.mm, a.pages * PAGE_SIZE)
                sys_madvise(self.cl, self.mm, self.alloc, self.base, a.pages * PAGE_SIZE,
                            MADV_MERGEABLE, self.log)
            for i in range(a.pages):
                if self.dying() or a.no_touch or a.forked:
                    break
                self.write_page(i)
            if a.mlock:  # mlockall, with a PROT_NONE area mlock cannot populate
                sys_mmap(self.cl, self.mm, 4 * PAGE_SIZE, prot=0)
                sys_mlockall(self.cl, self.mm, self.alloc)
            self.q[self.tb + T_READY] = 1
            vol = [i for i in range(a.pages) if self.wl.volatile(i)]
            rng = random.Random(a.seed * 7919 + a.worker_no)
            next_churn = self.now()
            fork_s = 0.0 if a.forked else self.wl.fork_ms / 1000.0  # a child does not fork
            # (the clock read only when used: in a controlled run each read is a step)
            next_fork = self.now() + fork_s if fork_s else 0.0
            born = self.now() if a.exit_after_ms else 0.0
            while not self.dying():
                for i in vol:
                    if self.dying():
                        break
                    self.version[i] = max(self.version[i], 0) + 1
                    self.write_page(i)
                if a.churn_ms and self.now() >= next_churn:
                    self.churn(rng)
                    next_churn = self.now() + a.churn_ms / 1000.0
                if fork_s and self.now() >= next_fork:
                    self.fork()
                    next_fork = self.now() + fork_s
                if a.exit_after_write or (a.exit_after_ms and
                                          self.now() - born >= a.exit_after_ms / 1000.0):
                    break
                self.idle(0.002 if vol else 0.02)
        except OutOfMemory:
            self._fatal(oom.OOM_SIGNAL, None)
        return self.exit_task()

    def inherit(self) -> None:
        """A forked child's start: its address space is the parent's copy
        (dup_mm did it before this process ran), mapped where the parent's
        was.  The parent's contents are known but for its volatile pages,
        which it rewrote at its own pace: UNKNOWN until this child writes
        them, first thing (COW breaks: the pages become its own), with its
        first page."""
        self.base = self.mapping_base()
        for i in range(self.a.pages):
            self.version[i] = UNKNOWN if self.wl.volatile(i) else 0
        for i in range(self.a.pages):
            if self.dying():
                return
            if self.version[i] == UNKNOWN or i == 0:
                self.version[i] = max(self.version[i], 0)
                self.write_page(i)

    def mapping_base(self) -> int:
        """Where our one mapping starts (a forked child's: where its
        parent's was, the lowest VMA of the copy)."""
        self.task.lock(self.mm.sem)
        try:
            return self.mm.vmas()[0][1] << PAGE_SHIFT
        finally:
            self.task.unlock(self.mm.sem)

    def fork(self) -> tuple[int, int]:
        """fork(2), the parent's side: ask the supervisor for the new task
        (T_FORK: uksm.proc.forks), copy our address space into it
        (``uksm.kernel.fork.dup_mm``), wait for the fork to return.
        Returns (the child's pid, or -errno; the child's task row, -1 if
        none was made).  A fatal signal pending fails it (-ERESTARTNOINTR)."""
        t = self.cl.trow(self.task.row)
        t.fork_pid = 0
        t.fork = FORK_ASK
        self.fork_wait(FORK_ASK)
        st = t.fork
        if st != FORK_GO:       # refused: -EAGAIN (no room), -ENOMEM
            t.fork = FORK_NONE
            return st, -1
        crow = t.fork_child - 1
        t.fork_err = dup_mm(self.cl, self.mm, crow, self.cl.trow(crow).mm, self.log,
                            pending=self.dying)
        t.fork = FORK_DONE
        self.fork_wait(FORK_DONE)
        return t.fork_pid, crow

    def fork_wait(self, state: int) -> None:
        """Wait until the owner of the process table answers (T_FORK moves
        on from ``state``): polled in a normal run; in a controlled run a
        modelled wait (BLK_FORK), which the explorer's world answers as
        the step that asked ends (uksm.explorer.world)."""
        t = self.cl.trow(self.task.row)
        while t.fork == state:
            if sched.ON:
                sched.blocked(sched.BLK_FORK, state)
            else:
                time.sleep(FORK_POLL_S)

    def exit_task(self) -> int:
        """do_exit: note the fatal signal, verify the data (unless OOM
        killed: it exits at once), then exit_mm (mmput).  Every worker,
        built-in or programmable, leaves through here."""
        reason = self.q[self.tb + T_FATAL] or X_EXIT
        if self.signo:  # noticed at this safe point, as TIF_SIGPENDING would be
            self.log.info("signal", signo=self.signo, name=signal.Signals(self.signo).name)
        if reason != X_OOM:
            self.verify()
        self.q[self.tb + T_EXIT_REASON] = reason
        if reason == X_SIGNAL:
            self.cl.task.lock(self.cl.mmlist)
            self.q[S_SIGNALS] += 1
            self.cl.task.unlock(self.cl.mmlist)
        self.log_cows()
        self.alloc.drain()  # before the exit counts as done: nothing may hold frames after it
        mmput(self.cl, self.mm, self.alloc, self.log)
        for s in (signal.SIGTERM, signal.SIGINT, oom.OOM_SIGNAL):
            signal.signal(s, signal.SIG_IGN)  # exited: nothing left to kill
        return 0

    def churn(self, rng: random.Random) -> None:
        """Keep the kernel busy: refault a page, write a (maybe merged)
        page with its own content (a COW break), re-advise the range."""
        a = self.a
        i = rng.randrange(a.pages)
        addr = self.base + i * PAGE_SIZE
        sys_madvise(self.cl, self.mm, self.alloc, addr, PAGE_SIZE, MADV_DONTNEED, self.log)
        self.write_page(i)
        j = rng.randrange(a.pages - 1) if a.pages > 1 else 0
        if not self.wl.volatile(j) and (a.pages == 1 or not self.wl.volatile(j + 1)):
            self.write_page(j, min(2, a.pages - j))  # a write across two (maybe merged) pages
        if rng.random() < 0.2:
            sys_madvise(self.cl, self.mm, self.alloc, self.base, a.pages * PAGE_SIZE,
                        MADV_MERGEABLE, self.log)
        self.log_cows()

    def log_cows(self) -> None:
        from uksm.kernel.layout import T_COW
        n = self.q[self.tb + T_COW]
        if n > self.cows_logged:
            self.log.info("cow_break", mm=self.mm.id, count=n - self.cows_logged, by="worker",
                          t_last_ns=time.monotonic_ns())
            self.cows_logged = n

    def verify(self) -> None:
        """Read back every page and compare with what was written."""
        bad = checked = 0
        for i in range(self.a.pages):
            want = self.expected(i)
            if want is None:
                continue   # inherited, not yet rewritten: only the parent knew it
            checked += 1
            if self.mmu.read(self.base + i * PAGE_SIZE, PAGE_SIZE) != want:
                bad += 1
        self.q[self.tb + T_VERIFIED] = checked
        self.q[self.tb + T_MISMATCHES] = bad
        self.log.info("worker_verify", mm=self.mm.id, pages_verified=checked, mismatches=bad)


def parser(prog: str = "uksm-worker",
           description: str = "a worker process (started by the supervisor)") -> argparse.ArgumentParser:
    """The worker's command line (the supervisor's spawn_worker writes it)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_task_args(ap)
    ap.add_argument("--mm", type=int, required=True)
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--workload", default="vm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker-no", type=int, default=0)
    ap.add_argument("--churn-ms", type=int, default=0)
    ap.add_argument("--exit-after-write", action="store_true")
    ap.add_argument("--mlock", action="store_true",
                    help="mlockall after writing, with a 4-page PROT_NONE area (which munlock "
                         "at exit faults in)")
    ap.add_argument("--no-touch", action="store_true",
                    help="madvise the area and never write it (LTP ksm05's task): "
                         "ksmd finds no page, the slot has no rmap_items")
    ap.add_argument("--forked", action="store_true",
                    help="a forked child: the address space is the parent's copy (no mmap, "
                         "no madvise, no first write)")
    ap.add_argument("--content-wno", type=int, default=0,
                    help="write the contents of this worker number (a forked child: its parent's)")
    ap.add_argument("--exit-after-ms", type=int, default=0,
                    help="exit (verify, the exit path) after this long (a forked child's life)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    arm()  # die with the supervisor
    try:
        w = Worker(a)
        return w.run()
    except StaleCluster as e:
        print(f"uksm-worker: {e}", file=sys.stderr)
        return EXIT_ORPHAN
    except UksmError as e:
        print(f"uksm-worker: {e}", file=sys.stderr)
        return 1
    finally:
        ulog.close()


if __name__ == "__main__":
    exit_now(main())  # uksm.host.lifeline: no finalization
