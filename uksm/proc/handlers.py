"""The cluster daemon's requests: what each one does to the cluster.

``uksm.proc.daemon.Daemon`` is the transport (its control socket, the
peer's credentials, JSON lines, signals, the main loop); ``Requests``
here is the other half, as supervisord keeps its RPC interface apart from
its process-state machine: one handler per request (``ping``, ``spawn``,
``kill``, ``ctl``, ``fsck``, ``down``, and the scripts' requests of
``uksm.proc.scripting``), each given the request's JSON object and
answering one.  The same handlers serve a ``uksm up`` cluster over its
socket and, in-process, a ``uksm.Machine`` (``uksm.api``).

Requests are served one at a time by the daemon's main thread, so two
commands racing see each other's effects whole.  Every wait inside a
request is bounded and keeps the main loop's duties going (``pump``:
reaping, sweeping), so that a worker dying meanwhile is recovered and a
stuck request becomes an error rather than a stuck daemon.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, final

from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_OK, EXIT_USAGE
from uksm.kernel import fsck
from uksm.kernel.layout import (
    A_FREE_TOP,
    CS_STOPPING,
    EXIT_PATHS,
    EXIT_POLICIES,
    H_EXIT_POLICY,
    H_KSMD_TASK,
    H_MEM_LIMIT,
    H_STATE,
    K_MAX_KERNEL_PAGES,
    K_PAGES_TO_SCAN,
    K_RUN,
    K_SLEEP_MS,
    MM_STATES,
    MMS_EXITING,
    MMS_FREEING,
    S_EXIT_FAST,
    S_EXIT_LEGACY,
    S_EXIT_SLOW,
    S_REAPED,
    TS_DEAD,
    TS_FREE,
)
from uksm.kernel.locks import HolderDied, Lock, LockTimeout
from uksm.proc import options
from uksm.proc.control import CTL_OWN, validate_knob, writable
from uksm.proc.scripting import Faults, Tasks
from uksm.proc.supervisor import Child, Shutdown, Supervisor

ROUND_S = 0.02            # the main loop's period (uksm run's); waits sleep half a round
LOCK_TIMEOUT_S = 30.0     # ksm_thread_mutex, for ctl run= and fsck
RUN_WAIT_S = 120.0        # the writer's run= write returning (run=2: the unmerge)
KILL_WAIT_S = 60.0        # killed workers' exits
READY_WAIT_S = 120.0      # spawn --wait
FSCK_WAIT_S = 20.0        # fsck: stopping the world, exits in flight to settle

Handler = Callable[[dict[str, Any]], dict[str, Any]]



@final
class DownReport(Shutdown):
    """``uksm down --json``'s object (the daemon's answer to ``down``;
    ``Machine.down()`` of an attached machine): shutdown's blocks, and the
    daemon's.  Final: a reader tells it from ``RunReport`` by a key."""
    ok: bool
    cluster: str
    pid: int             # the daemon's
    uptime_s: float
    stopped: int         # workers alive when down came
    log_dir: str

class RequestError(shm.UksmError):
    """A request refused or failed: its message goes back to the client."""


class Requests:
    """The handlers of one booted cluster's requests.  ``pump`` is one
    round of the main loop's duties (the transport's), done between two
    slices of every wait; ``on_down`` is called as ``down`` begins (the
    transport stops serving, tells systemd).  ``t0``: the daemon's start,
    for the uptime."""

    def __init__(self, name: str, spec: dict[str, Any], sup: Supervisor, log: Any,
                 pump: Callable[[], None], on_down: Callable[[], None], t0: float) -> None:
        self.name = name
        self.spec = spec
        self.log_dir: str = spec["log_dir"]
        self.sup = sup
        self.log = log
        self.pump = pump
        self.on_down = on_down
        self.t0 = t0
        self.tasks = Tasks(self)
        self.faults = Faults(self, self.tasks)

    def handlers(self) -> dict[str, Handler]:
        """Every request's handler, by its ``op``."""
        return {"ping": self.do_ping, "spawn": self.do_spawn, "kill": self.do_kill,
                "ctl": self.do_ctl, "fsck": self.do_fsck, "down": self.do_down,
                **self.tasks.handlers(), **self.faults.handlers()}

    # ---- waiting while the main loop's duties go on -------------------------------------
    def wait_until(self, pred: Callable[[], bool], timeout: float, what: str = "") -> bool:
        """Wait for ``pred`` doing the main loop's duties; False after
        ``timeout``.  A hung task reported meanwhile ends the wait with a
        RequestError (status 3) naming it: waiting on would wait forever."""
        end = time.monotonic() + timeout
        hung0 = len(self.sup.hung)
        while True:
            self.pump()
            if pred():
                return True
            if len(self.sup.hung) > hung0:
                h = self.sup.hung[hung0]
                raise RequestError(f"{what or 'request'}: a hung task was reported while waiting: "
                                   f"{h['role']} pid {h['pid']} blocked on {h['lock']} for "
                                   f"{h['waited_s']}s ('uksm down' stops the cluster; the chain is "
                                   f"in the logs)", EXIT_HUNG)
            if time.monotonic() > end:
                return False
            time.sleep(ROUND_S / 2)

    def lock_pumped(self, lk: Lock, timeout: float, why: str) -> None:
        """``sup.cl.task.lock(lk)``, bounded, pumping between two slices of
        the wait (``Task.lock_bounded``: a holder that dies meanwhile is
        then recovered instead of blocking the daemon); a hung task
        reported meanwhile, or ``timeout``, makes it a RequestError."""
        sup = self.sup
        hung0 = len(sup.hung)

        def between() -> bool:
            self.pump()
            return len(sup.hung) > hung0
        try:
            sup.cl.task.lock_bounded(lk, timeout, between)
        except LockTimeout as e:
            holders = sup.cl.holders(lk.lid)
            why_not = "a hung task was reported" if e.hung else f"still held after {timeout:.0f}s"
            raise RequestError(f"{why}: {lk.name} {why_not} (holders: pids "
                               f"{holders or '?'}); nothing was changed",
                               EXIT_HUNG if e.hung else EXIT_ERR)

    # ---- requests ---------------------------------------------------------------------------
    def do_ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        with sup.lock:
            kids = list(sup.children.values())
        workers = sorted(f"w{c.worker_no}" for c in kids)
        ready = sorted(f"w{c.worker_no}" for c in kids if sup.cl.trow(c.row).ready)
        # what a client needs to make a Task of a worker it did not start
        tasks = [{"task": f"w{c.worker_no}", "pid": c.proc.pid, "pages": c.pages, "mm": c.mm,
                  "programmable": f"w{c.worker_no}" in self.tasks.chans} for c in kids]
        return {"cluster": self.name, "pid": os.getpid(), "log_dir": self.log_dir, "tasks": tasks,
                "ksmd_pid": sup.ksmd.proc.pid if sup.ksmd is not None else 0,
                "workers": workers, "ready": ready, "hung": len(sup.hung), "hung_tasks": list(sup.hung),
                "uptime_s": round(time.monotonic() - self.t0, 3)}

    def do_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start built-in workers: checked whole first (``uksm.proc.options``:
        the options, and room for them all under ``max_workers``), so that a
        refusal starts none.  A start failing midway (/dev/shm full) answers
        what it did: the workers started (they run on), the error, status 1."""
        sup, spec = self.sup, self.spec
        by = options.spelling(req)
        sp = options.spawn(by, req, spec)
        self.pump()
        options.live_tasks(by, sup.workers_alive(), sp.count, int(spec["max_workers"]))
        kids: list[Child] = []
        failed: shm.UksmError | None = None
        for _ in range(sp.count):
            try:
                kids.append(sup.spawn_worker(sp.pages, sp.workload, sp.seed, sp.churn_ms))
            except shm.UksmError as e:
                failed = e
                break
            self.pump()
        cl = sup.cl

        def gone(c: Child) -> bool:
            with sup.lock:
                return sup.children.get(c.row) is not c

        def ready(c: Child) -> bool:
            t = cl.trow(c.row)
            return not gone(c) and t.pid == c.proc.pid and bool(t.ready)
        note = ""
        if req.get("wait") and kids:
            if not self.wait_until(lambda: all(ready(c) or gone(c) for c in kids), READY_WAIT_S,
                                   "spawn"):
                note = f"not all ready after {READY_WAIT_S:.0f}s"
            # one that died of its own error (Supervisor.task_failed) fails the spawn, in its words
            self.wait_until(sup.settled, READY_WAIT_S, "spawn")
            with sup.lock:
                died = [e for e in sup.errors for c in kids if gone(c) and f"(pid {c.proc.pid})" in e]
            if died:
                raise RequestError(died[0], EXIT_ERR)
        out = [{"worker": f"w{c.worker_no}", "pid": c.proc.pid, "mm": c.mm, "pages": sp.pages,
                "workload": sp.workload, "ready": ready(c), "exited": gone(c)} for c in kids]
        if failed is not None:
            done = " ".join(f"w{c.worker_no}" for c in kids) or "none"
            self.log.warning("spawn_partial", spawned=len(out), requested=sp.count,
                             error=str(failed))
            return {"ok": False, "status": EXIT_ERR, "spawned": out, "partial": True,
                    "error": f"spawned {len(out)} of {sp.count} ({done}; they run on), then: "
                             f"{failed}"}
        return {"spawned": out, "note": note}

    def do_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        cl, q = sup.cl, sup.cl.q
        signame = options.signal_name(options.spelling(req), req.get("signal"), "TERM")
        signo = signal.SIGTERM if signame == "TERM" else signal.SIGKILL
        self.pump()
        with sup.lock:
            kids = {c.worker_no: c for c in sup.children.values()}
        if req.get("all"):
            targets = [kids[n] for n in sorted(kids)]
        else:
            targets = []
            for wid in req.get("workers") or []:
                s = str(wid)
                n = s[1:] if s[:1] in ("w", "W") else s
                if not n.isdigit() or int(n) not in kids:
                    live = " ".join(f"w{n}" for n in sorted(kids)) or "none"
                    raise RequestError(f"no worker {s!r} alive in cluster {self.name!r} "
                                       f"(alive: {live})", EXIT_ERR)
                if kids[int(n)] not in targets:
                    targets.append(kids[int(n)])
        before = {k: q[i] for k, i in (("exit_fast", S_EXIT_FAST), ("exit_slow", S_EXIT_SLOW),
                                       ("exit_legacy", S_EXIT_LEGACY), ("reaped", S_REAPED))}
        for c in targets:
            c.signalled = signo
            try:
                c.proc.send_signal(signo)
            except ProcessLookupError:
                pass
            self.log.info("inject_kill", target_pid=c.proc.pid, mm=c.mm, signal=signame,
                           mode="command")

        finished = self.finished
        all_done = self.wait_until(lambda: all(finished(c) for c in targets), KILL_WAIT_S, "kill")
        killed = []
        for c in targets:
            rc = c.proc.returncode
            if not finished(c):
                result = f"still exiting after {KILL_WAIT_S:.0f}s"
            elif rc == -signal.SIGKILL:
                result = "killed; its exit was run by the supervisor (reaped)"
            elif rc == 0:
                result = "exited through its own exit path"
            else:
                result = f"exited with status {rc}"
            row = cl.mm_row(c.mm)
            if row >= 0:
                m = cl.mrow(row)
                st, path = m.state, m.exit_path
                result += (f"; mm{c.mm} {MM_STATES[st] if 0 <= st < len(MM_STATES) else st} "
                           f"(ksm_exit {EXIT_PATHS[path] if 0 <= path < len(EXIT_PATHS) else path})")
            else:
                result += f"; mm{c.mm} freed"
            killed.append({"worker": f"w{c.worker_no}", "pid": c.proc.pid, "mm": c.mm,
                           "signal": signame, "returncode": rc, "result": result})
        after = {"exit_fast": q[S_EXIT_FAST], "exit_slow": q[S_EXIT_SLOW],
                 "exit_legacy": q[S_EXIT_LEGACY], "reaped": q[S_REAPED]}
        return {"killed": killed, "exit_paths": {k: after[k] - before[k] for k in before},
                "status": EXIT_OK if all_done else EXIT_ERR}

    def finished(self, c: Child) -> bool:
        """Reaped, and its exit accounted (by itself or by its reaper,
        which runs on the dead task's row): the row is free again.  Only
        this thread allocates rows, so it cannot be reused meanwhile."""
        sup = self.sup
        with sup.lock:
            if sup.children.get(c.row) is c:
                return False
        return bool(sup.cl.trow(c.row).state == TS_FREE)

    def do_ctl(self, req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        cl, q = sup.cl, sup.cl.q
        knobs = req.get("knobs")
        if not isinstance(knobs, list) or not knobs:
            raise RequestError("ctl: no KEY=VALUE given", EXIT_USAGE)
        todo: list[tuple[str, int | str]] = []
        for item in knobs:  # every value is checked before any is written
            name, raw = str(item[0]), item[1]
            todo.append((name, validate_knob(name, raw, cl.nframes, cl=cl)))
        applied = []
        for name, value in todo:
            assert name in writable(cl.modern)
            ent: dict[str, Any] = {"name": name, "value": value}
            if cl.modern and name not in ("run", *CTL_OWN):
                ent["previous"] = self.store_618(name, value)
            elif name == "run":
                ent["previous"] = q[K_RUN]
                ent["wait_s"] = self.write_run(int(value))
            elif name == "pages_to_scan":
                ent["previous"] = q[K_PAGES_TO_SCAN]
                q[K_PAGES_TO_SCAN] = int(value)
            elif name == "sleep_millisecs":
                ent["previous"] = q[K_SLEEP_MS]
                q[K_SLEEP_MS] = int(value)
            elif name == "max_kernel_pages":
                ent["previous"] = q[K_MAX_KERNEL_PAGES]
                q[K_MAX_KERNEL_PAGES] = int(value)
            elif name == "exit_policy":
                ent["previous"] = EXIT_POLICIES[q[H_EXIT_POLICY]]
                q[H_EXIT_POLICY] = EXIT_POLICIES.index(str(value))
            elif name == "mem_limit":
                ent["previous"] = q[H_MEM_LIMIT]
                q[H_MEM_LIMIT] = int(value)
            if name != "run":  # write_run logs its own, at the write
                self.log.info("ksm_knob", name=name, value=EXIT_POLICIES.index(str(value))
                               if name == "exit_policy" else value)
            applied.append(ent)
        return {"applied": applied}

    def store_618(self, name: str, value: int | str) -> int | str:
        """A 6.18 knob's store (uksm.proc.sysfs618.store).  max_page_sharing
        and merge_across_nodes take ksm_thread_mutex, as their stores do,
        and check pages_shared again under it: ksmd (which holds it while
        it scans) cannot have made a KSM page since the check."""
        from uksm.proc.sysfs618 import BUSY_WHILE_SHARED, StoreError, store, validate
        cl = self.sup.cl
        if name not in BUSY_WHILE_SHARED:
            return store(name, value, cl.q)
        self.lock_pumped(cl.daemon, LOCK_TIMEOUT_S, name)
        try:
            try:
                validate(name, value, cl.q)
            except StoreError as e:
                raise RequestError(f"{name}: device or resource busy ({e.errno_name}): {e.why}", EXIT_ERR)
            return store(name, value, cl.q)
        finally:
            cl.task.unlock(cl.daemon)

    def write_run(self, value: int) -> float:
        """echo VALUE > /sys/kernel/mm/ksm/run: a writer task runs run_store
        (for 2, the whole unmerge, in its own context, as in 2.6.32); wait
        for it as the shell waits for its write, serving meanwhile
        (``RunWriter.write``).  A write that fails (the writer
        interrupted or OOM-killed: run is back to 0) is an error, as the
        shell's."""
        self.pump()
        t0 = time.monotonic()
        res = self.sup.runwriter.write(value, lambda pred, timeout: self.wait_until(
            pred, timeout, f"run={value}"), RUN_WAIT_S)["result"]
        if res != "done":
            raise RequestError(f"run={value}: the write failed ({res}); run is {self.sup.cl.q[K_RUN]}",
                               EXIT_HUNG if res == "hung" else EXIT_ERR)
        return round(time.monotonic() - t0, 3)

    def do_fsck(self, _req: dict[str, Any]) -> dict[str, Any]:
        """Every invariant of the live cluster, with ksm_thread_mutex held
        (ksmd's counters are consistent under it), the world stopped (every
        pte lock, zone_lock) and ksm_mmlist_lock (a leaf: taken last).  An
        exit in flight is a legitimate intermediate state (mm_users 0 with
        the users' mm_count reference still held, ...): while errors come
        with exits in flight, let them finish and check again."""
        sup = self.sup
        cl, q = sup.cl, sup.cl.q
        deadline = time.monotonic() + FSCK_WAIT_S
        ksmd_row = q[H_KSMD_TASK]

        def dead_pending() -> bool:
            return any(cl.trow(r).state == TS_DEAD for r in range(cl.max_tasks)
                       if r != ksmd_row)

        def abort() -> bool:  # polled while blocked on a lock of the world
            sup.poll()        # (no sweep: it would close segments we are about to read)
            return dead_pending() or time.monotonic() > deadline
        while True:
            self.wait_until(lambda: not dead_pending(), max(0.0, deadline - time.monotonic()))
            with sup.lock:
                mms = sup.live_mms()
            errs: list[str] | None = None
            exiting: list[int] = []
            ms = 0.0
            used = 0
            self.lock_pumped(cl.daemon, LOCK_TIMEOUT_S, "fsck")
            try:
                try:
                    with fsck.world_stopped(cl, mms, abort=abort):
                        t0 = time.monotonic()
                        cl.task.lock(cl.mmlist)
                        try:
                            errs = fsck.check(cl, mms, counters=True)
                            exiting = [i for i, m in mms.items() if m.words.id == i
                                       and m.words.state in (MMS_EXITING, MMS_FREEING)]
                            used = cl.nframes - q[A_FREE_TOP]
                        finally:
                            cl.task.unlock(cl.mmlist)
                        ms = (time.monotonic() - t0) * 1000
                except HolderDied:
                    errs = None
            finally:
                cl.task.unlock(cl.daemon)
            late = time.monotonic() > deadline
            if errs is not None and (not errs or not exiting or late):
                break
            if errs is None and late:
                raise RequestError(f"fsck: could not stop the world within {FSCK_WAIT_S:.0f}s "
                                   f"(a task keeps a pte lock or zone_lock: busy, or blocked); "
                                   f"try again", EXIT_ERR)
            self.wait_until(lambda: False, 0.05)
        note = ""
        if errs and exiting:
            note = (f"{len(exiting)} exits still in flight after {FSCK_WAIT_S:.0f}s "
                    f"(mm{', mm'.join(map(str, exiting))}): some errors may be their intermediate state")
        self.log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        return {"clean": not errs, "errors": errs, "mms": len(mms), "frames_used": used,
                "ms": round(ms, 3), "note": note}

    def do_down(self, _req: dict[str, Any]) -> dict[str, Any]:
        return dict(self.down())

    def down(self) -> DownReport:
        """What ``uksm run`` does after its loop: workers out through their
        exit paths, ksmd frees what is left, stop ksmd, final fsck, teardown."""
        sup = self.sup
        self.on_down()
        q = sup.cl.q
        q[H_STATE] = CS_STOPPING
        self.pump()
        stopped = sup.workers_alive()
        end = sup.shutdown()
        status = end["status"]
        workers, integrity, fs, leftovers = (end["workers"], end["integrity"], end["fsck"],
                                             end["ipc_leftovers"])
        sup.log_stop(status)
        print(f"uksm: cluster {self.name} down: status {status}, fsck "
              f"{'clean' if fs['ok'] else 'FAILED'}, {len(leftovers)} objects left", file=sys.stderr,
              flush=True)
        return {"ok": True, "cluster": self.name, "pid": os.getpid(), "status": status,
                "uptime_s": round(time.monotonic() - self.t0, 3), "stopped": stopped,
                "workers": workers, "integrity": integrity, "fsck": fs,
                "hung_tasks": sup.hung, "ipc_leftovers": leftovers, "errors": sup.errors,
                "oops": end["oops"], "ksmd_restarts": end["ksmd_restarts"],
                "use_after_free": end["use_after_free"], "lockdep": end["lockdep"],
                "log_dir": self.log_dir}


