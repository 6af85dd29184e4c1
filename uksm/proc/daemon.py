"""The cluster daemon: a supervisor that runs detached and takes requests.

``uksm up`` starts ``python -m uksm.proc.daemon --cluster NAME --spec JSON`` in a
new session (stdin from /dev/null, stdout and stderr to ``daemon.out`` in
the run's log folder), or runs ``run_daemon`` in its own process with
``--foreground`` (for a service manager).  The daemon

1. reserves the cluster's name by binding its control socket, the abstract
   UNIX socket ``"\\0uksm-<cluster>"`` (a second ``up`` of the same name fails
   to bind: status 2; an abstract name vanishes with its last holder, so a
   dead daemon leaves nothing on disk);
2. boots the cluster as ``uksm run`` does (``Supervisor.boot``: the shared
   memory, ksmd) and starts the initial workers;
3. listens, and loops like ``uksm run``'s foreground loop: ``poll()`` and
   ``sweep()`` every ~20 ms, the hung-task watchdog's reports kept for
   ``down``; between two rounds it serves at most one request, in this
   (the main) thread, so requests are serialised: two commands racing see
   each other's effects whole;
4. on ``down`` (or SIGTERM, SIGINT, SIGHUP) stops the workers through their
   exit paths, lets ksmd free what is left, stops ksmd, runs the final fsck,
   removes every POSIX object, answers, and exits.

Requests and answers are one JSON object per line, one request per
connection (see ``uksm.proc.control``).  Only the daemon's own user (or root) may
send requests: the peer's credentials are checked (SO_PEERCRED), since an
abstract socket has no file permissions.

Every wait inside a request is bounded and keeps the main loop's duties
going (reaping, sweeping), so that a worker dying meanwhile is recovered
and a stuck request becomes an error rather than a stuck daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import posix_ipc

from uksm.kernel import fsck
from uksm.host import shm
from uksm.host import log as ulog
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_OK, EXIT_USAGE
from uksm.proc.control import WRITABLE, not_running, sock_address, validate_knob
from uksm.kernel.layout import (A_FREE_TOP, CS_STOPPING, E_LOCK, E_SINCE, E_SPINS, E_WORD, EXIT_POLICIES, H_EXIT_POLICY,
                     H_KSMD_TASK, H_MEM_LIMIT, H_STATE, K_PAGES_TO_SCAN, K_RUN, K_SLEEP_MS, M_EXIT_PATH, M_ID, M_STATE, MM_STATES, MS_EXITING,
                     MS_FREEING, S_EXIT_FAST, S_EXIT_LEGACY, S_EXIT_SLOW, S_REAPED, T_PID, T_READY, T_STATE, TS_DEAD, TS_FREE,
                     EXIT_PATHS)
from uksm.kernel.locks import HELD, IDLE, WAIT_SLICE, WAITING, Lock
from uksm.host.exitcodes import signalled
from uksm.host.lifeline import STOP_SIGNALS, SecondSignal
from uksm.proc.scripting import ScriptOps
from uksm.kernel.writer import result_of
from uksm.proc.supervisor import Child, Supervisor

ROUND_S = 0.02            # the main loop's period (uksm run's)
LOCK_TIMEOUT_S = 30.0     # ksm_thread_mutex, for ctl run= and fsck
RUN_WAIT_S = 120.0        # the writer's run= write returning (run=2: the unmerge)
KILL_WAIT_S = 60.0        # killed workers' exits
READY_WAIT_S = 120.0      # spawn --wait
FSCK_WAIT_S = 20.0        # fsck: stopping the world, exits in flight to settle
MAX_REQUEST = 1 << 20


class DaemonSupervisor(Supervisor):
    """The Supervisor.  Each child runs in its own process group
    (``Supervisor._popen``): a Ctrl-C at the terminal of ``up --foreground``
    then reaches the daemon only (which takes it as ``down``), not ksmd and
    the workers (ksmd stopping on its own would leave the slow-path exits'
    slots unfreed); and each is on the lifeline (``uksm.host.lifeline``)."""

    def __init__(self, *args: Any, own_groups: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.own_groups = own_groups


class RequestError(shm.UksmError):
    """A request refused or failed: its message goes back to the client."""


def make_config(spec: dict[str, Any]) -> Any:
    """The cluster's Config, built as ``uksm run`` builds it, sized for
    ``max_workers`` address spaces of up to ``max_pages`` pages."""
    from uksm.proc.run import RunOptions
    from uksm.proc.run import make_config as run_make_config
    o = RunOptions(workers=spec["max_workers"], pages=spec["max_pages"], frames=spec["frames"],
                   workload=spec["workload"], seed=spec["seed"], log_dir=spec["log_dir"],
                   run=spec["run"], pages_to_scan=spec["pages_to_scan"], sleep_ms=spec["sleep_ms"],
                   exit_policy=spec["exit_policy"], oom_rule=spec.get("oom_rule", "2.6.32"),
                   hazards=list(spec["hazards"]),
                   hung_task_timeout=spec["hung_task_timeout"], churn_ms=spec["churn_ms"])
    return run_make_config(o)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        pass


class Daemon(ScriptOps):
    """One cluster's daemon: its control socket, its supervisor, the loop.
    Without a socket (``reserve`` not called) it serves ``uksm.Machine``
    in-process: ``run_request`` is then called directly."""

    def __init__(self, name: str, spec: dict[str, Any], foreground: bool) -> None:
        self.name = name
        self.spec = spec
        self.foreground = foreground
        self.log_dir: str = spec["log_dir"]
        self.sock: socket.socket | None = None
        self.sup: DaemonSupervisor | None = None
        self._log: Any = None
        self.stop_signal = 0
        self.done = False
        self.hung_seen = 0
        self.t0 = time.monotonic()

    # ---- start ------------------------------------------------------------------------
    def reserve(self) -> None:
        """Bind the control socket: the cluster's name is ours from here."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(sock_address(self.name))
        except OSError:
            s.close()
            raise shm.UksmError(f"cluster {self.name!r} is already up (its control socket is "
                                f"taken): 'uksm down --cluster {self.name}' first, or another "
                                f"--cluster", EXIT_USAGE)
        self.sock = s
        if shm.leftovers(self.name):
            raise shm.UksmError(f"cluster name {self.name!r} is in use: {not_running(self.name)}",
                                EXIT_USAGE)

    def _on_signal(self, signo: int, _frame: Any) -> None:
        """The first stop signal: ``down``; a second one while that runs:
        kill everything at once, remove every object (``_abandon``)."""
        if self.stop_signal:
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            raise SecondSignal(signo)
        self.stop_signal = signo

    def start(self) -> None:
        spec = self.spec
        self.sup = DaemonSupervisor(self.name, make_config(spec), self.log_dir, quiet=False,
                                    own_groups=self.foreground)
        self.sup.boot()
        self._log = ulog.thread_logger("ctl", self.name, self.log_dir, "daemon")
        for _ in range(spec["workers"]):
            self.sup.spawn_worker(spec["pages"], spec["workload"], spec["seed"], spec["churn_ms"])
        if self.sock is not None:
            self.sock.listen(128)
            self.sock.setblocking(False)

    # ---- the main loop ------------------------------------------------------------------
    def pump(self) -> None:
        """One round of the main loop's duties (as uksm run's drive())."""
        sup = self.sup
        assert sup is not None
        sup.poll()
        sup.sweep()
        if len(sup.hung) > self.hung_seen:
            self.hung_seen = len(sup.hung)  # reported (log, stderr) by the supervisor itself

    def serve(self) -> int:
        assert self.sock is not None
        status = EXIT_OK
        while not self.done:
            if self.stop_signal or (self.sup is not None and self.sup.given_up):
                name = (signal.Signals(self.stop_signal).name if self.stop_signal
                        else self.sup.given_up if self.sup is not None else "")
                print(f"uksm: {name}: taking the cluster down", file=sys.stderr, flush=True)
                report = self.down()
                status = report["status"]
                break
            self.pump()
            try:
                r, _, _ = select.select([self.sock], [], [], ROUND_S)
            except InterruptedError:
                continue
            if r:
                status = self.serve_one()
        self.drain()
        return status

    def serve_one(self) -> int:
        """Accept one connection, answer its request.  Returns the status of
        a ``down`` (the daemon's exit status), else 0."""
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return EXIT_OK
        status = EXIT_OK
        with conn:
            conn.settimeout(5.0)
            try:
                req = self._read(conn)
            except (OSError, ValueError) as e:
                self._reply(conn, {"ok": False, "error": f"bad request: {e}", "status": EXIT_USAGE})
                return EXIT_OK
            conn.settimeout(None)
            ans = self.handle(conn, req)
            if req.get("op") == "down" and "status" in ans and ans.get("ok"):
                status = int(ans["status"])
            conn.settimeout(10.0)
            self._reply(conn, ans)
        return status

    @staticmethod
    def _read(conn: socket.socket) -> dict[str, Any]:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise ValueError("request too large")
        req = json.loads(buf.split(b"\n", 1)[0] or b"null")
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise ValueError("expected a JSON object with an 'op'")
        return req

    @staticmethod
    def _reply(conn: socket.socket, ans: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(ans).encode() + b"\n")
        except OSError:
            pass  # the client went away; the request was done all the same

    def drain(self) -> None:
        """After down: answer every connection still queued, then let the
        name go."""
        if self.sock is None:
            return
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, OSError):
                break
            with conn:
                conn.settimeout(1.0)
                self._reply(conn, {"ok": False, "status": EXIT_ERR,
                                   "error": f"cluster {self.name!r} went down"})
        self.sock.close()
        self.sock = None

    @staticmethod
    def _peer_uid(conn: socket.socket) -> int:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)

    def handle(self, conn: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
        try:
            uid = self._peer_uid(conn)
        except OSError:
            uid = -1
        if uid not in (0, os.geteuid()):
            return {"ok": False, "status": EXIT_ERR,
                    "error": f"cluster {self.name!r}: permission denied (EPERM): uid {uid} is not "
                             f"the cluster's owner"}
        return self.run_request(req)

    def run_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Serve one request (from the socket, or from an in-process Machine)."""
        op = req["op"]
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.do_ping, "spawn": self.do_spawn, "kill": self.do_kill,
            "ctl": self.do_ctl, "fsck": self.do_fsck, "down": self.do_down,
            **self.script_handlers()}
        fn = handlers.get(op)
        if fn is None:
            return {"ok": False, "error": f"unknown request {op!r}", "status": EXIT_USAGE}
        try:
            ans = fn(req)
        except shm.UksmError as e:
            return {"ok": False, "error": str(e), "status": e.status,
                    "kind": getattr(e, "kind", "hung" if e.status == EXIT_HUNG else "")}
        except Exception as e:  # a bug: say so, keep serving
            print(f"uksm: request {op!r} failed:\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            return {"ok": False, "error": f"request {op!r} failed: {e!r} (daemon bug; see "
                                          f"{self.log_dir}/daemon.out)", "status": EXIT_ERR}
        ans.setdefault("ok", True)
        return ans

    # ---- waiting while the main loop's duties go on -------------------------------------
    def wait_until(self, pred: Callable[[], bool], timeout: float, what: str = "") -> bool:
        """Wait for ``pred`` doing the main loop's duties; False after
        ``timeout``.  A hung task reported meanwhile ends the wait with a
        RequestError (status 3) naming it: waiting on would wait forever."""
        assert self.sup is not None
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
        """``sup.cl.task.lock(lk)``, following the lock protocol of
        ``uksm.kernel.locks`` (so the watchdog and recovery see this wait), but
        bounded, and reaping and sweeping between two slices of the wait: a
        holder that dies meanwhile is then recovered instead of blocking
        the daemon."""
        assert self.sup is not None
        task = self.sup.cl.task
        if task.trylock(lk):
            return
        q = task.q
        e = task.ebase[lk.cls]
        q[e + E_LOCK] = lk.lid
        w = q[e + E_WORD]
        q[e + E_WORD] = (w & ~7) + 8 + WAITING
        q[e + E_SINCE] = time.monotonic_ns()
        end = time.monotonic() + timeout
        hung0 = len(self.sup.hung)
        while True:
            try:
                lk.sem.acquire(WAIT_SLICE)
                break
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                q[e + E_SPINS] += 1
                self.pump()
                hung = len(self.sup.hung) > hung0
                if hung or time.monotonic() > end:
                    q[e + E_SINCE] = 0
                    q[e + E_WORD] = (w & ~7) + 16 + IDLE
                    holders = self.sup.cl.holders(lk.lid)
                    why_not = "a hung task was reported" if hung else f"still held after {timeout:.0f}s"
                    raise RequestError(f"{why}: {lk.name} {why_not} (holders: pids "
                                       f"{holders or '?'}); nothing was changed",
                                       EXIT_HUNG if hung else EXIT_ERR)
        q[e + E_SINCE] = 0
        q[e + E_WORD] = (w & ~7) + 16 + HELD

    # ---- requests ---------------------------------------------------------------------------
    def do_ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        assert sup is not None
        with sup.lock:
            workers = sorted(f"w{c.worker_no}" for c in sup.children.values())
            ready = sorted(f"w{c.worker_no}" for c in sup.children.values()
                           if sup.cl.q[sup.cl.tbase(c.row) + T_READY])
        return {"cluster": self.name, "pid": os.getpid(), "log_dir": self.log_dir,
                "ksmd_pid": sup.ksmd.proc.pid if sup.ksmd is not None else 0,
                "workers": workers, "ready": ready, "hung": len(sup.hung), "hung_tasks": list(sup.hung),
                "uptime_s": round(time.monotonic() - self.t0, 3)}

    def do_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        from uksm.workers.workloads import validate as wl_validate
        sup, spec = self.sup, self.spec
        assert sup is not None
        pages = int(req.get("pages") or spec["pages"])
        workload = str(req.get("workload") or spec["workload"])
        count = int(req.get("count", 1))
        seed = int(spec["seed"] if req.get("seed") is None else req["seed"])
        churn = int(spec["churn_ms"] if req.get("churn_ms") is None else req["churn_ms"])
        if not 1 <= pages <= spec["max_pages"]:
            raise RequestError(f"--pages must be 1..{spec['max_pages']} (the cluster was started "
                               f"with --max-pages {spec['max_pages']})", EXIT_USAGE)
        if count < 1:
            raise RequestError(f"--count must be at least 1 (got {count})", EXIT_USAGE)
        if churn < 0:
            raise RequestError(f"--churn-ms must be >= 0 (got {churn})", EXIT_USAGE)
        wl_validate(workload)
        kids: list[Child] = []
        for _ in range(count):
            try:
                kids.append(sup.spawn_worker(pages, workload, seed, churn))
            except shm.UksmError as e:
                done = " ".join(f"w{c.worker_no}" for c in kids) or "none"
                raise RequestError(f"{e} (spawned {len(kids)} of {count}: {done})", e.status)
            self.pump()
        q, cl = sup.cl.q, sup.cl

        def gone(c: Child) -> bool:
            with sup.lock:
                return sup.children.get(c.row) is not c

        def ready(c: Child) -> bool:
            b = cl.tbase(c.row)
            return not gone(c) and q[b + T_PID] == c.proc.pid and bool(q[b + T_READY])
        note = ""
        if req.get("wait"):
            if not self.wait_until(lambda: all(ready(c) or gone(c) for c in kids), READY_WAIT_S,
                                   "spawn"):
                note = f"not all ready after {READY_WAIT_S:.0f}s"
        out = [{"worker": f"w{c.worker_no}", "pid": c.proc.pid, "mm": c.mm, "pages": pages,
                "workload": workload, "ready": ready(c), "exited": gone(c)} for c in kids]
        return {"spawned": out, "note": note}

    def do_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        assert sup is not None
        cl, q = sup.cl, sup.cl.q
        signame = str(req.get("signal", "TERM")).upper()
        if signame not in ("TERM", "KILL"):
            raise RequestError(f"--signal must be TERM or KILL (got {signame})", EXIT_USAGE)
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
            self._log.info("inject_kill", target_pid=c.proc.pid, mm=c.mm, signal=signame,
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
                st, path = q[cl.mbase(row) + M_STATE], q[cl.mbase(row) + M_EXIT_PATH]
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
        assert sup is not None
        with sup.lock:
            if sup.children.get(c.row) is c:
                return False
        return bool(sup.cl.q[sup.cl.tbase(c.row) + T_STATE] == TS_FREE)

    def do_ctl(self, req: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        assert sup is not None
        cl, q = sup.cl, sup.cl.q
        knobs = req.get("knobs")
        if not isinstance(knobs, list) or not knobs:
            raise RequestError("ctl: no KEY=VALUE given", EXIT_USAGE)
        todo: list[tuple[str, int | str]] = []
        for item in knobs:  # every value is checked before any is written
            name, raw = str(item[0]), item[1]
            todo.append((name, validate_knob(name, raw, cl.nframes)))
        applied = []
        for name, value in todo:
            assert name in WRITABLE
            ent: dict[str, Any] = {"name": name, "value": value}
            if name == "run":
                ent["previous"] = q[K_RUN]
                ent["wait_s"] = self.write_run(int(value))
            elif name == "pages_to_scan":
                ent["previous"] = q[K_PAGES_TO_SCAN]
                q[K_PAGES_TO_SCAN] = int(value)
            elif name == "sleep_millisecs":
                ent["previous"] = q[K_SLEEP_MS]
                q[K_SLEEP_MS] = int(value)
            elif name == "exit_policy":
                ent["previous"] = EXIT_POLICIES[q[H_EXIT_POLICY]]
                q[H_EXIT_POLICY] = EXIT_POLICIES.index(str(value))
            elif name == "mem_limit":
                ent["previous"] = q[H_MEM_LIMIT]
                q[H_MEM_LIMIT] = int(value)
            if name != "run":  # write_run logs its own, at the write
                self._log.info("ksm_knob", name=name, value=EXIT_POLICIES.index(str(value))
                               if name == "exit_policy" else value)
            applied.append(ent)
        return {"applied": applied}

    def write_run(self, value: int) -> float:
        """echo VALUE > /sys/kernel/mm/ksm/run: a writer task runs run_store
        (for 2, the whole unmerge, in its own context, as in 2.6.32); wait
        for it as the shell waits for its write, serving meanwhile.  A
        write that fails (the writer interrupted or OOM-killed: run is back
        to 0) is an error, as the shell's."""
        sup = self.sup
        assert sup is not None
        q = sup.cl.q
        self.pump()
        t0 = time.monotonic()
        ch = sup.start_run_writer(value)
        if not self.wait_until(lambda: sup.run_writer_status(ch) is not None or bool(sup.hung),
                               RUN_WAIT_S, f"run={value}"):
            raise RequestError(f"run={value} written, but the write has not returned after "
                               f"{RUN_WAIT_S:.0f}s", EXIT_ERR)
        res = result_of(sup.run_writer_status(ch)) if not sup.hung else "hung"
        if res != "done":
            raise RequestError(f"run={value}: the write failed ({res}); run is {q[K_RUN]}",
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
        assert sup is not None
        cl, q = sup.cl, sup.cl.q
        deadline = time.monotonic() + FSCK_WAIT_S
        ksmd_row = q[H_KSMD_TASK]

        def dead_pending() -> bool:
            return any(q[cl.tbase(r) + T_STATE] == TS_DEAD for r in range(cl.max_tasks)
                       if r != ksmd_row)

        def abort() -> bool:  # polled while blocked on a lock of the world
            sup.poll()        # (no sweep: it would close segments we are about to read)
            return dead_pending() or time.monotonic() > deadline
        while True:
            self.wait_until(lambda: not dead_pending(), max(0.0, deadline - time.monotonic()))
            with sup.lock:
                mms = {i: m for i, m in sup.mms.items() if q[m.base + M_ID] == i}
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
                            exiting = [i for i, m in mms.items() if q[m.base + M_ID] == i
                                       and q[m.base + M_STATE] in (MS_EXITING, MS_FREEING)]
                            used = cl.nframes - q[A_FREE_TOP]
                        finally:
                            cl.task.unlock(cl.mmlist)
                        ms = (time.monotonic() - t0) * 1000
                except fsck.Retry:
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
        self._log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        return {"clean": not errs, "errors": errs, "mms": len(mms), "frames_used": used,
                "ms": round(ms, 3), "note": note}

    def do_down(self, _req: dict[str, Any]) -> dict[str, Any]:
        report = self.down()
        return report

    def down(self) -> dict[str, Any]:
        """What ``uksm run`` does after its loop: workers out through their
        exit paths, ksmd frees what is left, stop ksmd, final fsck, teardown."""
        sup = self.sup
        assert sup is not None
        self.done = True
        sd_notify("STOPPING=1")
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


def run_daemon(name: str, spec: dict[str, Any], foreground: bool = False,
               on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Reserve the name, boot, serve until down; the exit status."""
    d = Daemon(name, spec, foreground)
    for s in STOP_SIGNALS:
        signal.signal(s, d._on_signal)
    try:
        d.reserve()
        d.start()
    except SecondSignal as e:
        return _killed(d, e)
    except shm.UksmError as e:
        print(f"uksm: {e}", file=sys.stderr, flush=True)
        _abandon(d)
        return e.status
    except BaseException as e:
        print(f"uksm: cluster {name} failed to start: {e!r}\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        _abandon(d)
        return EXIT_ERR
    ready = d.do_ping({})
    print(f"uksm: cluster {name} up: daemon pid {ready['pid']}, ksmd pid {ready['ksmd_pid']}, "
          f"{len(ready['workers'])} workers, logs in {d.log_dir}", file=sys.stderr, flush=True)
    if on_ready is not None:
        on_ready(ready)
        sys.stdout.flush()
    sd_notify(f"READY=1\nSTATUS=cluster {name} up")
    try:
        return d.serve()
    except SecondSignal as e:
        return _killed(d, e)
    except BaseException as e:
        print(f"uksm: cluster {name}: daemon failed: {e!r}\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        _abandon(d)
        return EXIT_ERR


def _killed(d: Daemon, e: SecondSignal) -> int:
    _abandon(d)
    print(f"uksm: cluster {d.name}: {e}: a second stop signal: every process killed, every "
          f"object removed", file=sys.stderr, flush=True)
    return signalled(e.signo)


def _abandon(d: Daemon) -> None:
    """Start-up failed or the daemon broke: stop what runs, remove what
    was made."""
    if d.sup is not None and d.sup.booted:
        try:
            d.sup.kill_all()
        finally:
            d.sup.teardown()
    if d.sock is not None:
        d.sock.close()
        d.sock = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uksm.proc.daemon",
                                 description="The uksm cluster daemon (started by 'uksm up').")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--spec", required=True, help="the cluster's options, as JSON (see uksm.cli.cluster.up_spec)")
    ap.add_argument("--foreground", action="store_true")
    a = ap.parse_args(argv)
    try:
        shm.check_cluster_name(a.cluster)
        spec = json.loads(a.spec)
    except (shm.UksmError, json.JSONDecodeError) as e:
        print(f"uksm: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run_daemon(a.cluster, spec, foreground=a.foreground)


if __name__ == "__main__":
    raise SystemExit(main())
