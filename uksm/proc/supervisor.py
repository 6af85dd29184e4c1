"""The supervisor: the emulated kernel's process-management side.

It boots a cluster (creates the shared objects), starts ksmd and the
workers (creating each worker's address space first, as fork/exec would),
reaps the dead, and for a task that died without running its exit (SIGKILL)
it recovers the locks it held, repairs the frame table, and runs the exit
on its behalf (a *reaper* thread using the dead task's row).  It also runs
khungtaskd (``uksm.kernel.watchdog``) and tears the cluster down.

Threads: the main loop (reap, sweep, progress), one recovery thread (deaths
are recovered one batch at a time, in order), a reaper thread per
SIGKILLed worker (its exit may block in the slow path's down_write), the
watchdog.  Each thread that takes cluster locks has its own task row.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypedDict

from uksm.host import lifeline, pyexec, shm
from uksm.host import log as ulog
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_INTEGRITY, EXIT_OK, EXIT_OOPS
from uksm.host.oops import FD_ENV, OopsRecord
from uksm.kernel import fsck, killpoints
from uksm.kernel.cluster import Cluster, Config, destroy
from uksm.kernel.layout import (
    CS_RUNNING,
    H_NEXT_WORKER,
    H_STATE,
    H_SUPERVISOR_PID,
    R_SUPERVISOR,
    R_WORKER,
    S_LOCKDEP,
    S_MISMATCHES,
    S_PAGES_VERIFIED,
    S_STARTED,
    S_USE_AFTER_FREE,
    TASK_SIZE,
    TS_ALIVE,
    TS_FREE,
    KsmBlock,
    KsmBlock618,
    TaskStats,
    ksm_block,
    stats_block,
)
from uksm.kernel.locks import LockTimeout
from uksm.kernel.memory import FrameStats, frame_stats
from uksm.kernel.mm import MM, mm_create
from uksm.kernel.watchdog import HungReport, Watchdog
from uksm.proc.childerr import StderrTee
from uksm.proc.children import Child
from uksm.proc.forks import Forks
from uksm.proc.ksmdctl import KsmdCtl
from uksm.proc.reaper import Reaper
from uksm.proc.recovery import Recovery
from uksm.proc.runwriter import RunWriter

WORKER_PROGRAM = "uksm.workers.worker"


class HostMemory(TypedDict):
    host_bytes_resident: int   # the frame pool's resident bytes (the host's RSS of it)


class Snapshot(TypedDict):
    """``Supervisor.snapshot``: the counters, frames and host memory."""
    ksm: KsmBlock | KsmBlock618     # the cluster's kernel's /sys/kernel/mm/ksm
    frames: FrameStats
    memory: HostMemory


class Integrity(TypedDict):
    """What the tasks read back at their exits."""
    pages_verified: int
    mismatches: int


class FsckResult(TypedDict):
    """fsck's verdict (the report's ``fsck``, ``m.fsck()``, inject's ``live_fsck``)."""
    ok: bool
    errors: list[str]


class Shutdown(TypedDict):
    """``Supervisor.shutdown``: the end-of-cluster blocks of the report,
    and the exit status (``uksm.host.exitcodes``)."""
    workers: TaskStats
    integrity: Integrity
    fsck: FsckResult
    hung_tasks: list[HungReport]
    ipc_leftovers: list[str]       # POSIX objects still there after teardown
    errors: list[str]
    oops: list[OopsRecord]
    ksmd_restarts: int
    use_after_free: int            # lock operations on a freed mm
    lockdep: int                   # locks taken against the lock order
    status: int


class Supervisor:
    """The process table (children, writers, ksmd, their mms) and the main
    loop's duties; reaping (``Reaper``), recovery (``Recovery``) and ksmd's
    restarts (``KsmdCtl``) are each their own owner.

    ``self.lock`` (a thread lock of this process only) guards the maps
    below and task-row allocation; it is never held while waiting for a
    cluster lock (no cluster lock is taken under it), so no cross-process
    wait can end up behind it."""

    def __init__(self, name: str, cfg: Config, log_dir: str | None, quiet: bool = False) -> None:
        self.name = name
        self.cfg = cfg
        self.log_dir = log_dir
        self.quiet = quiet
        self.cl: Cluster
        self.children: dict[int, Child] = {}
        self.writers: dict[int, Child] = {}  # run_store tasks (uksm.kernel.writer) not yet settled
        self.mms: dict[int, MM] = {}
        self.stop_ev = threading.Event()
        self.lock = threading.RLock()   # children/writers/mms maps, row allocation
        self.hung: list[HungReport] = []
        self.threads: list[threading.Thread] = []
        self.ksmd: Child | None = None    # under self.lock
        self.errors: list[str] = []
        # the first task that died of its own error before it was ready
        # (task_failed): the cluster cannot do what it was asked, and every
        # wait ends on it at once
        self.failed = ""
        self._failures_said: set[tuple[str, str, str]] = set()
        self.stderr: StderrTee | None = None   # the children's stderr (boot starts it)
        self.booted = False
        self.reaper = Reaper(self)
        self.recovery = Recovery(self)
        self.ksmdctl = KsmdCtl(self)
        self.runwriter = RunWriter(self)
        self.forks = Forks(self)
        self.t0 = time.monotonic()
        # every process started (_popen), registered or not: their pids (the
        # API's m.pids), and those not yet seen exited, which teardown makes
        # sure are gone before it unlinks anything
        self.started: list[int] = []
        self.procs: list[subprocess.Popen] = []

    # ---- boot ---------------------------------------------------------------
    def boot(self) -> None:
        self.cl = Cluster.create(self.name, self.cfg)
        self.booted = True
        self.stderr = StderrTee()
        q = self.cl.q
        q[H_SUPERVISOR_PID] = os.getpid()
        row = self.alloc_row(R_SUPERVISOR, os.getpid())
        self.cl.bind(row)
        self.log = ulog.setup("supervisor", self.name, self.log_dir, boot_id=self.cl.boot_id)
        self.cl.lockdep_log = self.log
        self.cl.task.on_wait = self.on_wait(self.log)
        self.log.info("cluster_start", workers=0, pages=0, frames=self.cfg.frames,
                      workload="", exit_policy=self.cfg.exit_policy, hazards=self.cfg.hazards,
                      log_dir=self.log_dir or "")
        self.start_ksmd()
        q[H_STATE] = CS_RUNNING
        self.threads.append(self.recovery.start(self.alloc_row(R_SUPERVISOR, os.getpid())))
        self.wd = Watchdog(self.cl, self.cfg.hung_timeout_ms / 1000.0, self._on_hung)
        for fn in (self.reaper.detector_loop, self.wd.run_until(self.stop_ev)):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def on_wait(self, log: Any) -> Callable[[str, float, list[int]], None]:
        """A task's ``on_wait`` hook: its long lock waits as lock_wait events."""
        return lambda name, ms, holders: log.info("lock_wait", lock=name, holders=holders,
                                                  waited_ms=round(ms, 3))

    def alloc_row(self, role: int, pid: int = 0) -> int:
        q, cl = self.cl.q, self.cl
        with self.lock:
            for r in range(cl.max_tasks):
                t = cl.trow(r)
                if t.state == TS_FREE:
                    for f in range(TASK_SIZE):
                        q[t.base + f] = 0
                    t.flight_pfn = -1
                    t.kill_point = -1
                    t.role = role
                    t.pid = pid
                    t.start_ns = time.monotonic_ns()
                    t.state = TS_ALIVE      # last: the row is taken
                    return r
        raise shm.UksmError(f"the task table is full ({cl.max_tasks} rows)", EXIT_ERR)

    def free_row(self, row: int) -> None:
        t = self.cl.trow(row)
        t.pid = 0
        t.state = TS_FREE

    def child_args(self, program: str, row: int) -> list[str]:
        """The command line of a child task (``uksm.kernel.cluster.add_task_args``):
        its program, the cluster and the instance it belongs to (the boot
        id it checks before acting), its row, the log folder."""
        args = [program, "--cluster", self.name, "--boot-id", str(self.cl.boot_id),
                "--task", str(row)]
        return args + (["--log-dir", self.log_dir] if self.log_dir else [])

    def _popen(self, args: list[str], pass_fds: tuple[int, ...] = (),
               oops_fd: int = -1) -> subprocess.Popen:
        """fork + exec a child on the lifeline (``uksm.host.lifeline``: it dies
        with this process), in its own process group (a Ctrl-C at the
        terminal is the supervisor's to handle, not ksmd's).  ``pass_fds``:
        descriptors the child inherits (a scripted task's command socket);
        ``oops_fd``: ksmd's end of its oops channel (``uksm.host.oops``).
        The child imports the same uksm as this process (``uksm.host.pyexec``);
        its stderr goes through ``self.stderr`` (what it says, kept)."""
        env = pyexec.env(lifeline.child_env())
        if oops_fd >= 0:
            env[FD_ENV] = str(oops_fd)
            pass_fds = (*pass_fds, oops_fd)
        assert self.stderr is not None
        err_r, err_w = self.stderr.open()
        try:
            p = subprocess.Popen(pyexec.argv(*args), stdin=subprocess.DEVNULL, stderr=err_w,
                                 env=env, process_group=0, pass_fds=pass_fds)
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(err_w)
        self.stderr.watch(err_r, p.pid)
        self.started.append(p.pid)
        self.procs = [x for x in self.procs if x.returncode is None] + [p]
        return p

    def task_failed(self, ch: Child, status: int, ready: bool) -> None:
        """``ch`` died of its own error (an exit status, or a signal nobody
        sent it: not a kill, not the OOM killer): the run fails (status 1),
        the error in its report, said at once in one line with the last
        line the task wrote on stderr.  One that died before it was ready
        (``ready`` False) fails the cluster: ``failed`` ends every wait."""
        who = f"{ch.role} w{ch.worker_no}" if ch.role == "worker" else ch.role
        how = (f"status {status}" if status >= 0
               else f"signal {signal.Signals(-status).name}" if -status in signal.valid_signals()
               else f"signal {-status}")
        said = self.stderr.tail(ch.proc.pid) if self.stderr is not None else ""
        msg = (f"{who} (pid {ch.proc.pid}) died of its own error"
               + ("" if ready else " before it was ready") + f" ({how})" + (f": {said}" if said else ""))
        with self.lock:
            self.errors.append(msg)
            if not ready and not self.failed:
                self.failed = msg
            # said once per kind of failure: sixteen workers dying of one
            # import error are one line, not sixteen
            new = (ch.role, how, said) not in self._failures_said
            self._failures_said.add((ch.role, how, said))
        self.log.error("task_failed", task_pid=ch.proc.pid, task_role=ch.role, status=status,
                       ready=ready, stderr=said)
        if new and not self.quiet:   # one write: the children's stderr goes to the same file
            sys.stderr.write(f"uksm: {msg}\n")
            sys.stderr.flush()

    def spawn_worker(self, pages: int, workload: str, seed: int, churn_ms: int = 0,
                     kill_point: str | None = None, kill_sig: int = signal.SIGKILL,
                     exit_after_write: bool = False, no_touch: bool = False, mlock: bool = False,
                     program: str = WORKER_PROGRAM, extra_args: tuple[str, ...] = (),
                     pass_fds: tuple[int, ...] = ()) -> Child:
        """fork + exec a worker: its row and address space first
        (``new_task``), then its process (``start_worker``).
        ``program``: another worker program taking the same options and
        ``extra_args`` (a programmable task: uksm.workers.scripted)."""
        row, mm, wno = self.new_task(pages)
        if kill_point:
            killpoints.arm_worker(self.cl, row, kill_point, kill_sig)
        flags = [f for f, on in (("--exit-after-write", exit_after_write), ("--no-touch", no_touch),
                                 ("--mlock", mlock)) if on]
        try:
            return self.start_worker(row, mm, wno, pages, workload, seed, churn_ms, program,
                                     (*flags, *extra_args), pass_fds)
        except BaseException:
            self.abandon_task(row, mm)
            raise

    def new_task(self, pages: int, pid: int = 0) -> tuple[int, MM, int]:
        """A new task's row (dup_task_struct's part: the row is the
        task_struct), its worker number and its empty address space
        (mm_alloc): the half of fork and exec before the process runs.
        ``pid``: who acts on the row meanwhile (a forking parent)."""
        cl, q = self.cl, self.cl.q
        row = self.alloc_row(R_WORKER, pid)
        with self.lock:
            wno = q[H_NEXT_WORKER] = q[H_NEXT_WORKER] + 1
        try:
            mm = mm_create(cl, row, wno)
        except BaseException:
            self.free_row(row)
            raise
        t = cl.trow(row)
        t.mm = mm.id
        t.worker_no = wno
        t.pages = pages
        with self.lock:
            self.mms[mm.id] = mm
        return row, mm, wno

    def abandon_task(self, row: int, mm: MM) -> None:
        """A task made by ``new_task`` whose process never ran: its mm
        dropped (nothing mapped, no slot: the last mmdrop frees it), its row
        freed."""
        from uksm.kernel.layout import REF_USERS
        from uksm.kernel.mm import mmdrop
        mmdrop(self.cl, mm.row, mm.id, REF_USERS, self.log)
        self.free_row(row)

    def start_worker(self, row: int, mm: MM, wno: int, pages: int, workload: str, seed: int,
                     churn_ms: int, program: str = WORKER_PROGRAM, extra_args: tuple[str, ...] = (),
                     pass_fds: tuple[int, ...] = (), content_wno: int = 0, base: int = 0) -> Child:
        """exec the worker on a row and mm of ``new_task`` (wake_up_new_task)."""
        cl, q = self.cl, self.cl.q
        t = cl.trow(row)
        args = self.child_args(program, row) + [
            "--mm", str(mm.id), "--pages", str(pages), "--workload", workload,
            "--seed", str(seed), "--worker-no", str(wno), "--churn-ms", str(churn_ms)]
        # started with SIGTERM and SIGINT blocked, which the worker unblocks
        # once its handlers are in (uksm.workers.worker): a stop that finds
        # it starting -- a fork's child, a replacement -- is then an exit
        # through its own path, never a death before it could take one
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            p = self._popen(args + list(extra_args), pass_fds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        t.pid = p.pid
        mm.words.owner_pid = p.pid
        child = Child(row, p, "worker", mm.id, wno, pages, workload, program=program, seed=seed,
                      churn_ms=churn_ms, content_wno=content_wno or wno, base=base)
        with self.lock:
            self.children[row] = child
        cl.task.lock(cl.mmlist)
        q[S_STARTED] += 1
        cl.task.unlock(cl.mmlist)
        self.log.info("worker_spawn", worker=f"w{wno}", worker_pid=p.pid, mm=mm.id, pages=pages,
                      workload=workload)
        return child

    # ---- the writer of /sys/kernel/mm/ksm/run (uksm.proc.runwriter) ---------------------
    def start_run_writer(self, value: int, oom_origin: bool | None = None) -> Child:
        return self.runwriter.start(value, oom_origin)

    def run_writer_status(self, ch: Child) -> int | None:
        return self.runwriter.status(ch)

    def write_run(self, value: int, oom_origin: bool | None = None,
                  timeout: float = 120.0) -> dict[str, Any]:
        return self.runwriter.write(value, timeout=timeout, oom_origin=oom_origin)

    # ---- the main loop's duties: their owners do them ---------------------------------
    def poll(self) -> None:
        """Start a ksmd whose restart is due; reap the exited children (the
        unclean ones go to recovery)."""
        self.ksmdctl.restart_if_due()
        self.reaper.poll()
        self.forks.poll()

    def sweep(self) -> None:
        self.reaper.sweep()

    def settled(self) -> bool:
        return self.reaper.settled()

    def start_ksmd(self) -> None:
        """The hook a subclass overrides to run ksmd elsewhere (dev/profile_ksmd.py)."""
        self.ksmdctl.start()

    def stop_ksmd(self) -> None:
        self.ksmdctl.stop()

    @property
    def given_up(self) -> str:
        """Why the cluster cannot go on ('' if it can): ksmd oopsed in a row."""
        return self.ksmdctl.given_up

    def live_mms(self) -> dict[int, MM]:
        """The address spaces not yet freed, by id (a snapshot of ``mms``)."""
        with self.lock:
            return {i: m for i, m in self.mms.items() if m.words.id == i}

    # ---- the watchdog's report ------------------------------------------------------
    def _on_hung(self, report: HungReport) -> None:
        self.hung.append(report)
        self.log.error("hung_task", task_pid=report["pid"], task_role=report["role"],
                       lock=report["lock"], waited_s=report["waited_s"], chain=report["chain"],
                       deadlock=report["deadlock"], waits=report.get("waits", []))
        if not self.quiet:
            print(f"uksm: INFO: task {report['role']} pid {report['pid']} blocked for more than "
                  f"{report['waited_s']:.1f} seconds", file=sys.stderr)
            for line in report["chain"]:
                print(f"uksm:   {line}", file=sys.stderr)

    # ---- state -----------------------------------------------------------------------
    def workers_alive(self) -> int:
        with self.lock:
            return len(self.children)

    def workers_ready(self) -> bool:
        with self.lock:
            return all(self.cl.trow(r).ready for r in self.children)

    def snapshot(self) -> Snapshot:
        """Counters, frames, host memory.  The counters are read under
        ksm_thread_mutex (a consistent publish) unless ksmd keeps it for
        more than a second (a deadlocked cluster): then as they are."""
        cl = self.cl
        locked = False
        if self.ksmd is not None:
            try:
                cl.task.lock_bounded(cl.daemon, 1.0, lambda: self.ksmd is None)
                locked = True
            except LockTimeout:
                pass
        try:
            ksm = ksm_block(cl.q)
        finally:
            if locked:
                cl.task.unlock(cl.daemon)
        # the host's bytes first, then the frames: ksmd flushes the frames a
        # batch freed after it drops the mutex (Ksmd.run), and a flush landing
        # between the two reads then lowers frames used, never the bytes
        # below what the frames counted need (resident >= used, as a reader expects)
        resident = cl.pool_resident_bytes()
        return {"ksm": ksm, "frames": frame_stats(cl), "memory": {"host_bytes_resident": resident}}

    # ---- teardown ------------------------------------------------------------------------
    def kill_all(self) -> None:
        """A hung cluster: SIGKILL every process (the reboot button)."""
        self.stop_ev.set()
        self.forks.close()
        with self.lock:
            procs = [c.proc for c in self.children.values()] + [c.proc for c in self.writers.values()]
        if self.ksmd is not None:
            procs.append(self.ksmd.proc)
        for p in procs:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def stop_writers(self, timeout: float = 60.0) -> bool:
        """SIGTERM every run= writer still running and wait until each has
        returned and is settled.  A write its caller gave up on (a Ctrl-C in
        ``m.ksm["run"] = 2``) is a pending signal to the writing task:
        run_store stops with -ERESTARTSYS and puts run back to 0, as 2.6.32's
        does; a writer still starting dies of the SIGTERM before it attaches.
        Either way none outlives the cluster to write into another.  A
        stray (``strays``) gets the same SIGTERM, and is waited for too."""
        strays = self.strays()
        self.end_strays(strays, signal.SIGTERM, 0)
        ok = self._stop(self.writers, timeout, signal.SIGTERM)
        return self.end_strays(strays, 0, timeout) and ok

    def strays(self) -> list[int]:
        """Children of this process started for this cluster (their command
        line holds its boot id) that the process table does not hold: one
        forked as its caller was interrupted -- a KeyboardInterrupt raised
        inside Popen after the fork loses the Popen, and with it the child.
        Found in /proc, by parent and command line."""
        me, needle = os.getpid(), f"\0--boot-id\0{self.cl.boot_id}\0".encode()
        with self.lock:
            known = {c.proc.pid for c in (*self.children.values(), *self.writers.values())}
            if self.ksmd is not None:
                known.add(self.ksmd.proc.pid)
        out = []
        for pid in _children(me):
            if pid in known:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(pid)
            except OSError:
                continue
        return out

    def end_strays(self, pids: list[int], sig: int, timeout: float) -> bool:
        """Signal the strays ``pids`` (``sig`` 0: none) and reap them, for up
        to ``timeout`` seconds; True once every one is reaped.  Each is
        added to ``started`` (m.pids): it was started."""
        for pid in pids:
            if pid not in self.started:
                self.started.append(pid)
            if sig:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        left = list(pids)
        end = time.monotonic() + timeout
        while left:
            for pid in list(left):
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    left.remove(pid)
            if not left or time.monotonic() >= end:
                break
            time.sleep(0.005)
        return not left

    def stop_workers(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> bool:
        """Tell every worker to exit and wait for their exits (and reapers)."""
        return self._stop(self.children, timeout, sig)

    def _stop(self, table: dict[int, Child], timeout: float, sig: int) -> bool:
        """Signal every task of ``table`` (``children`` or ``writers``, under
        ``self.lock``) and wait until reaping has emptied it and every death
        is settled; False on a hung task or after ``timeout``."""
        if table is self.children:
            self.forks.close()   # no new task from here (a fork asked now: EAGAIN)
        told: set[int] = set()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            # every task of the table, also one a fork in flight started
            # since (its parent, told already, could not take it back)
            with self.lock:
                kids = [ch for ch in table.values() if ch.proc.pid not in told]
            for ch in kids:
                told.add(ch.proc.pid)
                try:
                    ch.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            self.poll()
            self.sweep()
            if self.hung:
                return False
            with self.lock:
                alive = bool(table)
            if not alive and self.settled():
                return True
            time.sleep(0.005)  # the exits are seen within 5 ms: the run's end waits on this loop
        return False

    def live_fsck(self) -> FsckResult:
        """fsck on the running cluster (``fsck.check_live``).  Called from
        the main loop's thread."""
        errs = fsck.check_live(self.cl, self.live_mms())
        self.log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        return {"ok": not errs, "errors": errs}

    def final_fsck(self) -> FsckResult:
        """After every task has gone: the invariants, and the leak report."""
        self.sweep()
        errs = fsck.check(self.cl, self.live_mms(), counters=False) + fsck.check_leaks(self.cl)
        self.log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        return {"ok": not errs, "errors": errs}

    def shutdown(self) -> Shutdown:
        """What every cluster does at its end (``uksm run``, ``inject``,
        ``down``): workers out through their own exit paths, ksmd frees what
        the slow paths left it, ksmd stops, the final fsck, teardown; or, if
        a task hung, SIGKILL everything (the reboot button) and tear down.
        Returns the report's blocks and the exit status (``uksm.host.exitcodes``:
        3 a hung task, 5 a ksmd oops, 4 an integrity or fsck failure, 1
        anything else)."""
        q = self.cl.q
        status = EXIT_OK
        fs: FsckResult = {"ok": False,
                              "errors": ["not checked: the cluster was stopped after a hung task"]}
        try:
            if self.hung:
                status = EXIT_HUNG
                self.kill_all()
            elif not self.stop_writers() or not self.stop_workers():
                status = EXIT_HUNG if self.hung else EXIT_ERR
                if not self.hung:
                    self.errors.append("workers did not exit in time")
                self.kill_all()
            else:
                self.ksmdctl.wait_frees()
                self.stop_ksmd()
                fs = self.final_fsck()
            workers = stats_block(q)
            integrity: Integrity = {"pages_verified": q[S_PAGES_VERIFIED], "mismatches": q[S_MISMATCHES]}
            uaf, lockdep = q[S_USE_AFTER_FREE], q[S_LOCKDEP]
        except BaseException:
            self.kill_all()
            self.teardown()
            raise
        leftovers = self.teardown()
        if uaf:
            self.errors.append(f"use after free: {uaf} lock operations on a freed mm "
                               "(use_after_free events)")
        if lockdep:
            self.errors.append(f"lockdep: {lockdep} locks taken against the lock order "
                               "(lockdep events)")
        if status == EXIT_OK:
            if self.ksmdctl.oopses.seen:  # the rule: any oops fails the run (uksm.host.oops)
                status = EXIT_OOPS
            elif integrity["mismatches"] or not fs["ok"]:
                status = EXIT_INTEGRITY
            elif leftovers or self.errors:
                status = EXIT_ERR
        return {"workers": workers, "integrity": integrity, "fsck": fs, "hung_tasks": self.hung,
                "ipc_leftovers": leftovers, "errors": self.errors, "oops": self.ksmdctl.oopses.block(),
                "ksmd_restarts": self.ksmdctl.oopses.restarts, "use_after_free": uaf, "lockdep": lockdep,
                "status": status}

    def teardown(self) -> list[str]:
        """Unlink every object; return what is still there.  Any process
        started and still running here (one started as its caller was
        interrupted, before it was registered; a stray) is SIGKILLed and
        waited for first: nothing this cluster started outlives it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self.booted:
            self.end_strays(self.strays(), signal.SIGKILL, 10)
        self.stop_ev.set()
        self.recovery.wake()
        for t in self.threads:
            t.join(timeout=5)
        try:
            self.cl.close()
        except Exception:
            pass
        self.ksmdctl.close_oops_fd()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        destroy(self.name)
        with self.lock:
            writers = list(self.writers.values())
        for ch in writers:  # writers nobody polled (a kill_all)
            fd = self.ksmdctl.take_oops_fd(ch)
            if fd >= 0:
                os.close(fd)
        return shm.leftovers(self.name)

    def log_stop(self, status: int) -> None:
        self.log.info("cluster_stop", duration_s=round(time.monotonic() - self.t0, 3), status=status)
        ulog.close()


def _children(pid: int) -> list[int]:
    """The children of process ``pid``: each of its threads' /proc children
    list (CONFIG_PROC_CHILDREN), else every process whose parent it is."""
    try:
        out: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        return out
    except FileNotFoundError:
        pass
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                if d.isdigit() and int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


__all__ = ["Supervisor", "Child", "Config", "Snapshot", "Shutdown", "FsckResult", "Integrity",
           "HostMemory"]
