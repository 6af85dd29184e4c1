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
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from uksm.kernel import fsck, killpoints, oom
from uksm.host import lifeline, shm
from uksm.host.oops import FD_ENV, Oopses
from uksm.host import log as ulog
from uksm.kernel.cluster import Cluster, Config, destroy
from uksm.kernel.exit import mm_users_zero, mmput
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_INTEGRITY, EXIT_OK, EXIT_OOPS
from uksm.kernel.ksm import repair_list
from uksm.kernel.layout import (A_FREE_TOP, C_ALLOC, C_DAEMON, C_MMAP, C_MMLIST, C_PTL, C_WMUTEX,
                     CS_RUNNING, EXIT_PATHS, EXIT_REASONS, H_KSMD_PID,
                     H_KSMD_TASK, H_NEXT_WORKER, H_SHUTDOWN, H_STATE, H_SUPERVISOR_PID,
                     K_FULL_SCANS, K_PAGES_SCANNED, K_PAGES_SHARED, K_PAGES_SHARING,
                     K_PAGES_TO_SCAN, K_PAGES_UNSHARED, K_PAGES_VOLATILE, K_RUN, K_SLEEP_MS,
                     M_EXIT_STAGE, M_FREER_TASK, M_ID, M_OWNER_PID, M_REFS, M_SLOT_RMAP, M_SLOT_USED,
                     M_STATE, M_USERS, M_WRITER_WAITING, MS_FREEING, MS_ZOMBIE,
                     R_KSMD, R_REAPER, R_SUPERVISOR, R_WORKER, R_WRITER, EXIT_POLICIES, H_EXIT_POLICY, S_EXIT_FAST, S_EXIT_LEGACY,
                     S_EXIT_NOSLOT, S_EXIT_SLOW, S_EXITED, S_LOCKDEP, S_USE_AFTER_FREE, S_KILLED,
                     S_LOCK_RECOVERIES, S_MISMATCHES,
                     S_OOM_KILLED, S_PAGES_VERIFIED, S_REAPED, S_RECOVERIES, S_STARTED,
                     T_EXIT_PATH, T_EXIT_REASON, T_FLIGHT_PFN, T_FOR_ROW, T_KILL_POINT, T_MISMATCHES, T_MM,
                     T_PAGES, T_PID, T_READY, T_ROLE, T_START_NS, T_STATE, T_VERIFIED,
                     T_WORKER_NO, TASK_SIZE, TS_ALIVE, TS_DEAD, TS_FREE, TS_REAPING,
                     XS_MMDROP)
from uksm.kernel.locks import Lock, LockAbort, dead_locks, lock_name, recover
from uksm.kernel.memory import Allocator, frame_stats, rebuild_free_stack
from uksm.kernel.mm import MM, free_mm_objects, mm_create
from uksm.kernel.watchdog import Watchdog


@dataclass
class Child:
    row: int
    proc: subprocess.Popen
    role: str
    mm: int = 0
    worker_no: int = 0
    pages: int = 0
    workload: str = ""
    signalled: int = 0
    oops_fd: int = -1   # a writer's oops channel, read end (ksmd's is Supervisor.oops_fd)


@dataclass
class RunStats:
    hung: list[dict[str, Any]] = field(default_factory=list)


class Supervisor:
    def __init__(self, name: str, cfg: Config, log_dir: str | None, quiet: bool = False) -> None:
        self.name = name
        self.cfg = cfg
        self.log_dir = log_dir
        self.quiet = quiet
        self.cl: Cluster
        self.children: dict[int, Child] = {}
        self.writers: dict[int, Child] = {}  # run_store tasks (uksm.kernel.writer) not yet settled
        self.mms: dict[int, MM] = {}
        self.dead_q: queue.Queue[tuple[int, Child, int]] = queue.Queue()
        self.stop_ev = threading.Event()
        self.lock = threading.RLock()   # children/mms maps, row allocation
        self.hung: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        self.reapers: list[threading.Thread] = []
        self.ksmd: Child | None = None
        self.errors: list[str] = []
        self.booted = False
        self.restart_at = 0.0    # when the main loop starts a new ksmd (0: no restart due)
        self.oopses = Oopses()
        self.oops_fd = -1        # the read end of ksmd's oops channel
        self.pending_deaths = 0  # queued or being recovered (under self.lock)
        self.recovery_started = 0.0
        self.stall_reported = 0.0
        self.ksmd_delay = 0.0      # the backoff before the next ksmd restart
        self.t0 = time.monotonic()

    # ---- boot ---------------------------------------------------------------
    def boot(self) -> None:
        self.cl = Cluster.create(self.name, self.cfg)
        self.booted = True
        q = self.cl.q
        q[H_SUPERVISOR_PID] = os.getpid()
        row = self._alloc_row(R_SUPERVISOR, os.getpid())
        self.cl.bind(row)
        self.log = ulog.setup("supervisor", self.name, self.log_dir)
        self.cl.lockdep_log = self.log
        oom.set_logger(self.log)
        self.cl.task.on_wait = self._on_wait(self.log)
        self.log.info("cluster_start", workers=0, pages=0, frames=self.cfg.frames,
                      workload="", exit_policy=self.cfg.exit_policy, hazards=self.cfg.hazards,
                      log_dir=self.log_dir or "")
        self.start_ksmd()
        q[H_STATE] = CS_RUNNING
        rec_row = self._alloc_row(R_SUPERVISOR, os.getpid())
        self.rec_cl = self.cl.thread_view(rec_row)
        self.rec_cl.task.on_wait = self._on_wait(self.log)
        self.wd = Watchdog(self.cl, self.cfg.hung_timeout_ms / 1000.0, self._on_hung)
        for fn in (self._recovery_loop, self._detector_loop, self.wd.run_until(self.stop_ev)):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def _on_wait(self, log: Any):
        return lambda name, ms, holders: log.info("lock_wait", lock=name, holders=holders,
                                                  waited_ms=round(ms, 3))

    def _alloc_row(self, role: int, pid: int = 0) -> int:
        q, cl = self.cl.q, self.cl
        with self.lock:
            for r in range(cl.max_tasks):
                b = cl.tbase(r)
                if q[b + T_STATE] == TS_FREE:
                    for f in range(TASK_SIZE):
                        q[b + f] = 0
                    q[b + T_FLIGHT_PFN] = -1
                    q[b + T_KILL_POINT] = -1
                    q[b + T_ROLE] = role
                    q[b + T_PID] = pid
                    q[b + T_START_NS] = time.monotonic_ns()
                    q[b + T_STATE] = TS_ALIVE
                    return r
        raise shm.UksmError(f"too many tasks (max {cl.max_tasks})", 2)

    def _free_row(self, row: int) -> None:
        b = self.cl.tbase(row)
        self.cl.q[b + T_PID] = 0
        self.cl.q[b + T_STATE] = TS_FREE

    def _popen(self, args: list[str], pass_fds: tuple[int, ...] = (),
               oops_fd: int = -1) -> subprocess.Popen:
        """fork + exec a child on the lifeline (``uksm.host.lifeline``: it dies
        with this process), in its own process group (a Ctrl-C at the
        terminal is the supervisor's to handle, not ksmd's).  ``pass_fds``:
        descriptors the child inherits (a scripted task's command socket);
        ``oops_fd``: ksmd's end of its oops channel (``uksm.host.oops``)."""
        env = lifeline.child_env()
        if oops_fd >= 0:
            env[FD_ENV] = str(oops_fd)
            pass_fds = (*pass_fds, oops_fd)
        return subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL,
                                env=env, process_group=0, pass_fds=pass_fds)

    def start_ksmd(self) -> None:
        row = self._alloc_row(R_KSMD)
        args = ["uksm.kernel.ksmd", "--cluster", self.name, "--task", str(row)]
        if self.log_dir:
            args += ["--log-dir", self.log_dir]
        r, w = Oopses.channel()
        try:
            p = self._popen(args, oops_fd=w)
        finally:
            os.close(w)
        self._close_oops_fd()
        self.oops_fd = r
        self.oopses.restarted(self._ksmd_progress())
        self.cl.q[self.cl.tbase(row) + T_PID] = p.pid
        self.cl.q[H_KSMD_TASK] = row
        self.cl.q[H_KSMD_PID] = p.pid
        self.ksmd = Child(row, p, "ksmd")

    def _ksmd_progress(self) -> tuple[int, int]:
        """What ksmd has published (a batch since a restart changes it)."""
        return self.cl.q[K_PAGES_SCANNED], self.cl.q[K_FULL_SCANS]

    def _close_oops_fd(self) -> None:
        if self.oops_fd >= 0:
            os.close(self.oops_fd)
            self.oops_fd = -1

    def _take_oops_fd(self, ch: Child | None = None) -> int:
        """The read end of a dead task's oops channel, taken once (the
        detector thread and stop_ksmd may both look): ksmd's, or writer
        ``ch``'s; -1 if taken already."""
        with self.lock:
            if ch is None:
                fd, self.oops_fd = self.oops_fd, -1
            else:
                fd, ch.oops_fd = ch.oops_fd, -1
        return fd

    def _oops_note(self, role: str, sig: tuple[str, str], first: bool, then: str) -> None:
        if not self.quiet and (first or self.given_up):
            print(f"uksm: {role} oops: {sig[0]} at {sig[1]} (traceback in its log); {then}",
                  file=sys.stderr, flush=True)

    def note_oops(self, ch: Child | None, then: str) -> None:
        """A task exited that is not restarted: the writer of run (``ch``;
        the write's caller gets its status), or ksmd as shutdown stopped it
        (None).  If it oopsed (it sent what it raised down its channel --
        the evidence, whatever its status), count the oops: the run fails
        with EXIT_OOPS."""
        fd = self._take_oops_fd(ch)
        sig = Oopses.read(fd) if fd >= 0 else None
        if sig is not None:
            with self.lock:
                first = self.oopses.note(sig)
            self._oops_note(ch.role if ch else "ksmd", sig, first, then)

    @property
    def given_up(self) -> str:
        """Why the cluster cannot go on ('' if it can): ksmd oopsed in a row."""
        return self.oopses.given_up

    def spawn_worker(self, pages: int, workload: str, seed: int, churn_ms: int = 0,
                     kill_point: str | None = None, kill_sig: int = signal.SIGKILL,
                     exit_after_write: bool = False, no_touch: bool = False, mlock: bool = False,
                     program: str = "uksm.workers.worker", extra_args: tuple[str, ...] = (),
                     pass_fds: tuple[int, ...] = ()) -> Child:
        """fork + exec a worker: its row and address space first.
        ``program``: another worker program taking the same options and
        ``extra_args`` (a programmable task: uksm.workers.scripted)."""
        cl, q = self.cl, self.cl.q
        row = self._alloc_row(R_WORKER)
        with self.lock:
            wno = q[H_NEXT_WORKER] = q[H_NEXT_WORKER] + 1
        try:
            mm = mm_create(cl, row, wno)
        except BaseException:
            self._free_row(row)
            raise
        b = cl.tbase(row)
        q[b + T_MM] = mm.id
        q[b + T_WORKER_NO] = wno
        q[b + T_PAGES] = pages
        if kill_point:
            killpoints.arm_worker(cl, row, kill_point, kill_sig)
        args = [program, "--cluster", self.name, "--task", str(row),
                "--mm", str(mm.id), "--pages", str(pages), "--workload", workload,
                "--seed", str(seed), "--worker-no", str(wno), "--churn-ms", str(churn_ms)]
        if exit_after_write:
            args.append("--exit-after-write")
        if no_touch:
            args.append("--no-touch")
        if mlock:
            args.append("--mlock")
        if self.log_dir:
            args += ["--log-dir", self.log_dir]
        p = self._popen(args + list(extra_args), pass_fds)
        q[b + T_PID] = p.pid
        q[mm.base + M_OWNER_PID] = p.pid
        child = Child(row, p, "worker", mm.id, wno, pages, workload)
        with self.lock:
            self.children[row] = child
            self.mms[mm.id] = mm
        cl.task.lock(cl.mmlist)
        q[S_STARTED] += 1
        cl.task.unlock(cl.mmlist)
        self.log.info("worker_spawn", worker=f"w{wno}", worker_pid=p.pid, mm=mm.id, pages=pages,
                      workload=workload)
        return child

    # ---- the writer of /sys/kernel/mm/ksm/run ---------------------------------------
    def start_run_writer(self, value: int, oom_origin: bool | None = None) -> Child:
        """``echo VALUE > /sys/kernel/mm/ksm/run``: a short-lived task
        (uksm.kernel.writer) runs run_store -- for 2, the whole unmerge -- in its
        own context.  ``oom_origin`` (PF_OOM_ORIGIN while unmerging):
        by default as the exit policy's kernel had it -- 2.6.32 as released
        (``shipped``) did; the seed (and ``legacy``, before it) did not."""
        cl, q = self.cl, self.cl.q
        if oom_origin is None:
            oom_origin = EXIT_POLICIES[q[H_EXIT_POLICY]] == "shipped"
        row = self._alloc_row(R_WRITER)
        args = ["uksm.kernel.writer", "--cluster", self.name, "--task", str(row), "--value", str(value)]
        if oom_origin:
            args.append("--oom-origin")
        if self.log_dir:
            args += ["--log-dir", self.log_dir]
        r, w = Oopses.channel()
        try:
            p = self._popen(args, oops_fd=w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        q[cl.tbase(row) + T_PID] = p.pid
        ch = Child(row, p, "writer", oops_fd=r)
        with self.lock:
            self.writers[row] = ch
        return ch

    def run_writer_status(self, ch: Child) -> int | None:
        """The writer's wait status once it has exited and its row is
        settled (its locks recovered if it died holding one), else None."""
        rc = ch.proc.poll()
        if rc is None:
            return None
        self._writers_exited()
        with self.lock:
            if ch.row in self.writers:
                return None
        return rc if self.settled() else None

    def write_run(self, value: int, oom_origin: bool | None = None,
                  timeout: float = 120.0) -> dict[str, Any]:
        """Write ``run`` through a writer task and wait for the write to
        return, as the shell would: {"value", "status", "result"}, the
        result "done", "interrupted" (-ERESTARTSYS), "oom-killed", "killed
        by SIG..." or "hung" (the watchdog reported a hung task meanwhile)."""
        from uksm.kernel.writer import result_of
        ch = self.start_run_writer(value, oom_origin)
        end = time.monotonic() + timeout
        while True:
            rc = self.run_writer_status(ch)
            if rc is not None:
                return {"value": value, "status": rc, "result": result_of(rc)}
            self.sweep()
            if self.hung:
                return {"value": value, "status": None, "result": "hung"}
            if time.monotonic() > end:
                raise shm.UksmError(f"run={value}: the writer did not return within {timeout:.0f}s", 1)
            time.sleep(0.01)

    # ---- reaping ---------------------------------------------------------------
    def poll(self) -> None:
        """Reap exited children; send the unclean ones to recovery."""
        if self.restart_at and time.monotonic() >= self.restart_at:
            self.restart_at = 0.0
            self.start_ksmd()
        self._writers_exited()
        for row, ch, rc in self._exited():
            if self.exit_complete(row, ch):
                # it ran its whole exit (a signal after that changes nothing)
                if self._claim(row):
                    self._account_exit(row, ch, reaped=False)
            elif self._claim(row, dead=True):
                self._to_recovery(row, ch, rc)

    def _writers_exited(self) -> None:
        """A writer that returned holds no lock: its row is free.  One that
        died holding a lock (SIGKILL) goes to recovery like a worker."""
        with self.lock:
            done = [(r, ch, rc) for r, ch in self.writers.items() if (rc := ch.proc.poll()) is not None]
        for row, ch, rc in done:
            with self.lock:
                if self.writers.pop(row, None) is None:
                    continue
                dead = any(dead_locks(self.cl.q, self.cl.tbase(row)))
                if dead:
                    self.pending_deaths += 1  # counted with the claim (see _claim)
            self.note_oops(ch, "the write failed")
            if dead:
                self._to_recovery(row, ch, rc)
            else:
                self._free_row(row)

    def _exited(self) -> list[tuple[int, Child, int]]:
        """Children that have exited, with their wait status."""
        with self.lock:
            items = list(self.children.items())
        return [(row, ch, rc) for row, ch in items if (rc := ch.proc.poll()) is not None]

    def _claim(self, row: int, dead: bool = False) -> bool:
        """Take an exited child off the list; False if the other thread
        (poll or detect_deaths) already did.  ``dead``: it goes to recovery,
        counted in pending_deaths in the same critical section, so that
        settled() never sees it neither listed nor pending."""
        with self.lock:
            got = self.children.pop(row, None) is not None
            if got and dead:
                self.pending_deaths += 1
            return got

    def exit_complete(self, row: int, ch: Child) -> bool:
        """The child ran its whole exit (its mm dropped or gone) and holds no lock."""
        q = self.cl.q
        mm = self.mms.get(ch.mm)
        done = mm is None or q[mm.base + M_ID] != ch.mm or q[mm.base + M_EXIT_STAGE] & XS_MMDROP
        return bool(done) and not any(dead_locks(q, self.cl.tbase(row)))

    def _to_recovery(self, row: int, ch: Child, rc: int) -> None:
        """A claimed death (already counted in pending_deaths) to recovery."""
        self.cl.q[self.cl.tbase(row) + T_STATE] = TS_DEAD
        self.dead_q.put((row, ch, rc))

    def _account_exit(self, row: int, ch: Child, reaped: bool, how: str | None = None,
                      view: Cluster | None = None) -> None:
        cl = view or self.cl
        q = cl.q
        b = cl.tbase(row)
        reason = EXIT_REASONS[q[b + T_EXIT_REASON]] if how is None else how
        path = EXIT_PATHS[q[b + T_EXIT_PATH]]
        t = cl.task
        t.lock(cl.mmlist)
        q[S_EXITED] += 1
        if path == "none":  # __ksm_exit found no slot: so that the paths add up to exited
            q[S_EXIT_NOSLOT] += 1
        q[S_PAGES_VERIFIED] += q[b + T_VERIFIED]
        q[S_MISMATCHES] += q[b + T_MISMATCHES]
        if reaped:
            q[S_REAPED] += 1
        t.unlock(cl.mmlist)
        self.log.info("worker_exit", worker=f"w{ch.worker_no}", worker_pid=ch.proc.pid, mm=ch.mm,
                      how=reason, path=path, reaped=reaped)
        self._free_row(row)

    # ---- recovery after a death ---------------------------------------------------
    def _recovery_loop(self) -> None:
        while True:
            try:
                first = self.dead_q.get(timeout=0.1)
            except queue.Empty:
                if self.stop_ev.is_set() and self.dead_q.empty():
                    return
                continue
            batch = [first]
            while True:
                try:
                    batch.append(self.dead_q.get_nowait())
                except queue.Empty:
                    break
            self.recovery_started = time.monotonic()
            try:
                self.recover(batch)
            except Exception as e:  # a bug: say it loudly, keep the cluster going
                import traceback
                self.errors.append(f"recovery failed: {e!r}")
                self.log.error("recovery_failed", error=repr(e), tb=traceback.format_exc())
            finally:
                self.recovery_started = 0.0
                with self.lock:
                    self.pending_deaths -= len(batch)

    def lock_for(self, cl: Cluster, lid: int) -> Lock:
        cls, mm = lid >> 40, lid & ((1 << 40) - 1)
        if cls == C_DAEMON:
            return cl.daemon
        if cls == C_MMLIST:
            return cl.mmlist
        if cls == C_ALLOC:
            return cl.zone
        sem, wmx, ptl = cl.mm_locks(mm)
        return {C_MMAP: sem, C_WMUTEX: wmx, C_PTL: ptl}[cls]

    def recover(self, batch: list[tuple[int, Child, int]]) -> None:
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

    def _recover(self, batch: list[tuple[int, Child, int]], owned: dict[int, int],
                 locks: dict[int, Lock]) -> None:
        cl, q = self.rec_cl, self.rec_cl.q
        t0 = time.monotonic_ns()
        done_rows: set[int] = set()
        nrec = 0
        while True:
            new = [(r, cl.tbase(r)) for (r, _c, _rc) in batch if r not in done_rows]
            if new:
                lids = {lid for (_r, b) in new for lid in dead_locks(q, b)}
                these = {lid: self.lock_for(cl, lid) for lid in lids}
                took = recover(q, these, cl.live_rows, new, owned)
                for lid, n in took.items():
                    if n:
                        self.log.warning("lock_recovery", lock=lock_name(lid), units=n,
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
                if owned.get(cl.zone.lid):
                    rebuild_free_stack(cl, fsck.live_task_rows(cl))
                    self._post(cl.zone, owned.pop(cl.zone.lid))
            owned_ptl = {lid & ((1 << 40) - 1) for lid in owned if lid >> 40 == C_PTL}
            # every wait from here on gives up if its holder died meanwhile:
            # that death joins the batch and the loop goes round again
            cl.task.abort = lambda: self._more_dead(batch)
            try:
                # ksm_test_exit must hold before anyone else can take their mmap_sem
                for (r, ch, _rc) in batch:
                    mm0 = self.mms.get(ch.mm)
                    if mm0 is not None and q[mm0.base + M_ID] == ch.mm:
                        mm_users_zero(cl, MM(cl, ch.mm, mm0.row, mm0.seg), self.log,
                                      ptl_held=ch.mm in owned_ptl)
                    if ch.role == "ksmd":  # its rmap_items died with it
                        cl.task.lock(cl.mmlist)
                        for s in range(cl.max_mms):
                            q[cl.mbase(s) + M_SLOT_RMAP] = 0
                        cl.task.unlock(cl.mmlist)
                with self.lock:
                    mms = {i: m for i, m in self.mms.items() if q[m.base + M_ID] == i}
                with fsck.world_stopped(cl, mms, owned_ptl, abort=lambda: self._more_dead(batch)):
                    fixed = fsck.rebuild(cl, mms)
                break
            except (fsck.Retry, LockAbort):
                continue
            finally:
                cl.task.abort = None
        for lid in owned:
            row = cl.mm_row(lid & ((1 << 40) - 1)) if lid >> 40 == C_MMAP else -1
            if row >= 0:  # a writer died waiting or holding: nobody waits now
                q[cl.mbase(row) + M_WRITER_WAITING] = 0
        for cls in (C_PTL, C_MMAP, C_WMUTEX, C_DAEMON):
            for lid in [x for x in owned if x >> 40 == cls]:
                self._post(locks[lid], owned.pop(lid))
        ms = (time.monotonic_ns() - t0) / 1e6
        q[S_RECOVERIES] += 1          # single writer: this thread
        q[S_LOCK_RECOVERIES] += nrec
        for (r, ch, rc) in batch:
            self.log.warning("recovery", dead_pid=ch.proc.pid, mm=ch.mm, ms=round(ms, 3),
                             frames_fixed=fixed, status=rc)
            if ch.role == "ksmd":
                self._ksmd_lost(r)
                continue
            if ch.role == "writer":  # no mm, no exit to run
                self._free_row(r)
                continue
            th = threading.Thread(target=self._reap, args=(r, ch), daemon=True)
            th.start()
            with self.lock:
                self.reapers.append(th)

    def _ksmd_lost(self, row: int) -> None:
        """After a dead ksmd's locks are recovered (and the slots' rmap_item
        counts cleared: they died with it), a new ksmd takes over the list --
        including the slots that slow-path exits left it to free."""
        self._free_row(row)
        if not self.stop_ev.is_set() and not self.given_up:
            with self.lock:  # the main loop starts it (it owns the children), after the backoff
                self.restart_at = time.monotonic() + self.ksmd_delay

    def detect_deaths(self) -> None:
        """Send every child that died without finishing its exit to
        recovery.  Runs in its own thread, so that a death is noticed even
        while the main loop (or anybody) is blocked on a lock the dead
        holds.  Clean exits are left to poll(), which accounts them."""
        cl, q = self.cl, self.cl.q
        for row, ch, rc in self._exited():
            if not self.exit_complete(row, ch) and self._claim(row, dead=True):
                self._to_recovery(row, ch, rc)
        self._writers_exited()
        k = self.ksmd
        if k is not None and k.proc.poll() is not None and not q[H_SHUTDOWN]:
            with self.lock:
                if self.ksmd is not k:
                    return
                self.log.error("ksmd_died", status=k.proc.returncode)
                # counted before ksmd is None (under the lock, as stop_ksmd
                # takes the channel): shutdown's report never misses it
                self.ksmd_oopsed(k.proc.returncode)
                self.ksmd = None
            # out of scope for the kernel (ksmd does not die), but the machine
            # must not hang: recover the locks it held like a worker's, then
            # start a fresh ksmd (its rmap_items and trees are gone)
            q[cl.tbase(k.row) + T_STATE] = TS_DEAD
            self._queue_death((k.row, k, k.proc.returncode))

    def ksmd_oopsed(self, status: int) -> None:
        """ksmd died: an oops (it sent what it raised down its channel) is
        counted and restarted after a backoff, or given up after a few in
        a row (``uksm.host.oops``); any other death is an error, restarted at
        once."""
        fd = self._take_oops_fd()
        sig = Oopses.read(fd) if fd >= 0 else None
        self.ksmd_delay = 0.0
        if sig is None:
            self.errors.append(f"ksmd died (status {status})")
            return
        first, self.ksmd_delay = self.oopses.count(sig, self._ksmd_progress())
        if self.given_up:
            self.errors.append(self.given_up)
            self.log.error("oops_loop", in_row=self.oopses.in_row, error=sig[0], where=sig[1])
        else:
            self.log.warning("ksmd_restart", delay_s=self.ksmd_delay, in_row=self.oopses.in_row,
                             error=sig[0], where=sig[1])
        self._oops_note("ksmd", sig, first,
                        self.given_up or f"restarting ksmd in {self.ksmd_delay:.1f}s")

    def _detector_loop(self) -> None:
        while not self.stop_ev.wait(0.01):
            try:
                self.detect_deaths()
                self.check_recovery_stall()
            except Exception as e:  # the cluster may be going away
                self.log.error("recovery_failed", error=repr(e), tb="detector")

    def check_recovery_stall(self, after_s: float = 3.0) -> None:
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
        self.log.error("recovery_stalled", seconds=round(time.monotonic() - started, 3),
                       pending=self.pending_deaths, stacks=stacks, locks=dict(_locks.progress),
                       live_rows=[r for r, _b in self.cl.live_rows()])

    def _queue_death(self, item: tuple[int, Child, int]) -> None:
        with self.lock:
            self.pending_deaths += 1
        self.dead_q.put(item)

    def _more_dead(self, batch: list[tuple[int, Child, int]]) -> bool:
        """Called while the recovery waits for a lock: pull in deaths that
        happened since (a dead task may hold the lock we wait for)."""
        got = False
        while True:
            try:
                batch.append(self.dead_q.get_nowait())
                got = True
            except queue.Empty:
                return got

    @staticmethod
    def _post(lk: Lock, n: int) -> None:
        for _ in range(n):
            lk.sem.release()

    def _reap(self, row: int, ch: Child) -> None:
        """Run the dead worker's exit on its behalf, on its own row."""
        q = self.cl.q
        b = self.cl.tbase(row)
        q[b + T_KILL_POINT] = -1
        q[b + T_FOR_ROW] = row
        q[b + T_ROLE] = R_REAPER
        q[b + T_PID] = os.getpid()
        q[b + T_STATE] = TS_REAPING
        view = self.cl.thread_view(row)
        log = ulog.thread_logger("reaper", self.name, self.log_dir, f"r{row}-{ch.proc.pid}")
        view.task.on_wait = self._on_wait(log)
        mm0 = self.mms.get(ch.mm)
        try:
            if mm0 is not None and q[mm0.base + M_ID] == ch.mm:
                mm = MM(view, ch.mm, mm0.row, mm0.seg)
                alloc = Allocator(view)
                alloc.oom_killer = oom.out_of_memory
                mmput(view, mm, alloc, log)
                alloc.flush()
            view.task.lock(view.mmlist)
            q[S_KILLED] += 1
            view.task.unlock(view.mmlist)
            self._account_exit(row, ch, reaped=True, view=view,
                               how="sigkill" if ch.proc.returncode == -signal.SIGKILL
                               else EXIT_REASONS[q[b + T_EXIT_REASON]])
        except Exception as e:
            import traceback
            self.errors.append(f"reaper of pid {ch.proc.pid} failed: {e!r}")
            log.error("reaper_failed", error=repr(e), tb=traceback.format_exc())

    # ---- mm rows left FREEING by a task that died in __mmdrop ---------------------
    def sweep(self) -> None:
        cl, q = self.cl, self.cl.q
        for r in range(cl.max_mms):
            b = cl.mbase(r)
            mm_id = q[b + M_ID]
            if not mm_id or q[b + M_STATE] != MS_FREEING or not q[b + M_FREER_TASK]:
                continue
            freer = q[b + M_FREER_TASK] - 1
            if q[cl.tbase(freer) + T_STATE] in (TS_ALIVE, TS_REAPING):
                continue
            free_mm_objects(cl, r, mm_id, self.log)
        with self.lock:
            # forget freed mms; their mappings go when the last user drops
            # them (the recovery thread may still hold a snapshot: no close())
            for mm_id in [i for i, m in self.mms.items() if q[m.base + M_ID] != i]:
                self.mms.pop(mm_id)

    # ---- the watchdog's report ------------------------------------------------------
    def _on_hung(self, report: dict[str, Any]) -> None:
        self.hung.append(report)
        self.log.error("hung_task", task_pid=report["pid"], task_role=report["role"],
                       lock=report["lock"], waited_s=report["waited_s"], chain=report["chain"])
        if not self.quiet:
            print(f"uksm: INFO: task {report['role']} pid {report['pid']} blocked for more than "
                  f"{report['waited_s']:.1f} seconds", file=sys.stderr)
            for line in report["chain"]:
                print(f"uksm:   {line}", file=sys.stderr)

    # ---- state -----------------------------------------------------------------------
    def settled(self) -> bool:
        """No death waiting for recovery, none being recovered, no reaper
        still running a dead task's exit -- and no unclean death not yet
        noticed (a worker ksmd has just SIGKILLed at a kill point).  A clean
        exit not yet accounted by poll() does not count: nothing to recover."""
        with self.lock:
            if self.pending_deaths or any(t.is_alive() for t in self.reapers):
                return False
        return all(self.exit_complete(row, ch) for row, ch, _rc in self._exited())

    def workers_alive(self) -> int:
        with self.lock:
            return len(self.children)

    def workers_ready(self) -> bool:
        q = self.cl.q
        with self.lock:
            return all(q[self.cl.tbase(r) + T_READY] for r in self.children)

    def ksm_block(self) -> dict[str, int]:
        q = self.cl.q
        return {"run": q[K_RUN], "pages_to_scan": q[K_PAGES_TO_SCAN], "sleep_millisecs": q[K_SLEEP_MS],
                "pages_shared": q[K_PAGES_SHARED], "pages_sharing": q[K_PAGES_SHARING],
                "pages_unshared": q[K_PAGES_UNSHARED], "pages_volatile": q[K_PAGES_VOLATILE],
                "full_scans": q[K_FULL_SCANS], "pages_scanned": q[K_PAGES_SCANNED]}

    def snapshot(self) -> dict[str, Any]:
        """Counters, frames, host memory.  The counters are read under
        ksm_thread_mutex (a consistent publish) unless ksmd keeps it for
        more than a second (a deadlocked cluster): then as they are."""
        cl = self.cl
        locked = False
        end = time.monotonic() + 1.0
        while self.ksmd is not None and time.monotonic() < end:
            if cl.task.trylock(cl.daemon):
                locked = True
                break
            time.sleep(0.005)
        try:
            ksm = self.ksm_block()
        finally:
            if locked:
                cl.task.unlock(cl.daemon)
        return {"ksm": ksm, "frames": frame_stats(cl),
                "memory": {"host_bytes_resident": cl.pool_resident_bytes()}}

    def workers_block(self) -> dict[str, int]:
        q = self.cl.q
        return {"started": q[S_STARTED], "exited": q[S_EXITED], "exit_fast": q[S_EXIT_FAST],
                "exit_slow": q[S_EXIT_SLOW], "exit_legacy": q[S_EXIT_LEGACY],
                "exit_noslot": q[S_EXIT_NOSLOT],
                "killed": q[S_KILLED], "oom_killed": q[S_OOM_KILLED], "reaped": q[S_REAPED]}

    # ---- teardown ------------------------------------------------------------------------
    def kill_all(self) -> None:
        """A hung cluster: SIGKILL every process (the reboot button)."""
        self.stop_ev.set()
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

    def stop_workers(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> bool:
        """Tell every worker to exit and wait for their exits (and reapers)."""
        with self.lock:
            kids = list(self.children.values())
        for ch in kids:
            try:
                ch.proc.send_signal(sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.poll()
            self.sweep()
            if self.hung:
                return False
            with self.lock:
                alive = bool(self.children)
            if not alive and self.settled():
                return True
            time.sleep(0.02)
        return False

    def wait_ksmd_frees(self, timeout: float = 20.0) -> None:
        """Let ksmd free the slots that slow-path exits left it (run=1)."""
        cl, q = self.cl, self.cl.q
        if q[K_RUN] != 1 or self.ksmd is None:
            return

        def none_left() -> bool:
            self.sweep()
            return not any(q[cl.mbase(r) + M_ID] and q[cl.mbase(r) + M_SLOT_USED]
                           and q[cl.mbase(r) + M_USERS] == 0 for r in range(cl.max_mms))
        fsck.wait_settled(none_left, timeout, 0.02)

    def stop_ksmd(self) -> None:
        if self.ksmd is None:
            return
        self.cl.q[H_SHUTDOWN] = 1
        p = self.ksmd.proc
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        self.note_oops(None, "ksmd stopped")  # an oops in flight as it was stopped
        self._free_row(self.ksmd.row)
        self.ksmd = None

    def live_fsck(self) -> dict[str, Any]:
        """fsck on the running cluster: ksm_thread_mutex (ksmd between
        batches, its counters a consistent snapshot), then the world
        stopped.  Called from the main loop's thread."""
        cl, q = self.cl, self.cl.q
        cl.task.lock(cl.daemon)
        try:
            with self.lock:
                mms = {i: m for i, m in self.mms.items() if q[m.base + M_ID] == i}
            with fsck.world_stopped(cl, mms):
                # the list lock last: nothing is ever taken under it, so
                # holding pte locks and zone_lock here cannot deadlock
                cl.task.lock(cl.mmlist)
                try:
                    errs = fsck.check(cl, mms, counters=True)
                finally:
                    cl.task.unlock(cl.mmlist)
        finally:
            cl.task.unlock(cl.daemon)
        self.log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        return {"ok": not errs, "errors": errs}

    def final_fsck(self) -> dict[str, Any]:
        """After every task has gone: the invariants, and the leak report
        (an mm never freed, a frame still in use)."""
        cl, q = self.cl, self.cl.q
        self.sweep()
        with self.lock:
            mms = {i: m for i, m in self.mms.items() if q[m.base + M_ID] == i}
        errs = fsck.check(cl, mms, counters=False)
        for r in range(cl.max_mms):
            b = cl.mbase(r)
            if q[b + M_ID]:
                st = q[b + M_STATE]
                why = "held by its mm_slot, ksmd not running" if st == MS_ZOMBIE else f"state {st}"
                errs.append(f"leak: mm{q[b + M_ID]} never freed ({why}; mm_count "
                            f"{bin(q[b + M_REFS]).count('1')})")
        used = cl.nframes - q[A_FREE_TOP]
        if used:
            errs.append(f"leak: {used} frames still in use after every task exited")
        ok = not errs
        self.log.info("fsck", ok=ok, errors=len(errs), first=errs[:5])
        return {"ok": ok, "errors": errs}

    def shutdown(self) -> dict[str, Any]:
        """What every cluster does at its end (``uksm run``, ``inject``,
        ``down``): workers out through their own exit paths, ksmd frees what
        the slow paths left it, ksmd stops, the final fsck, teardown; or, if
        a task hung, SIGKILL everything (the reboot button) and tear down.
        Returns the report's blocks and the exit status (``uksm.host.exitcodes``:
        3 a hung task, 5 a ksmd oops, 4 an integrity or fsck failure, 1
        anything else)."""
        q = self.cl.q
        status = EXIT_OK
        fs: dict[str, Any] = {"ok": False,
                              "errors": ["not checked: the cluster was stopped after a hung task"]}
        try:
            if self.hung:
                status = EXIT_HUNG
                self.kill_all()
            elif not self.stop_workers():
                status = EXIT_HUNG if self.hung else EXIT_ERR
                if not self.hung:
                    self.errors.append("workers did not exit in time")
                self.kill_all()
            else:
                self.wait_ksmd_frees()
                self.stop_ksmd()
                fs = self.final_fsck()
            workers = self.workers_block()
            integrity = {"pages_verified": q[S_PAGES_VERIFIED], "mismatches": q[S_MISMATCHES]}
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
            if self.oopses.seen:  # the rule: any oops fails the run (uksm.host.oops)
                status = EXIT_OOPS
            elif integrity["mismatches"] or not fs["ok"]:
                status = EXIT_INTEGRITY
            elif leftovers or self.errors:
                status = EXIT_ERR
        return {"workers": workers, "integrity": integrity, "fsck": fs, "hung_tasks": self.hung,
                "ipc_leftovers": leftovers, "errors": self.errors, "oops": self.oopses.block(),
                "ksmd_restarts": self.oopses.restarts, "use_after_free": uaf, "lockdep": lockdep,
                "status": status}

    def teardown(self) -> list[str]:
        """Unlink every object; return what is still there."""
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=5)
        try:
            self.cl.close()
        except Exception:
            pass
        self._close_oops_fd()
        destroy(self.name)
        with self.lock:
            writers = list(self.writers.values())
        for ch in writers:  # writers nobody polled (a kill_all)
            fd = self._take_oops_fd(ch)
            if fd >= 0:
                os.close(fd)
        return shm.leftovers(self.name)

    def log_stop(self, status: int) -> None:
        self.log.info("cluster_stop", duration_s=round(time.monotonic() - self.t0, 3), status=status)
        ulog.close()


__all__ = ["Supervisor", "Child", "Config"]
