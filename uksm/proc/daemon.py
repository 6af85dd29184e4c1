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

This module is the transport (the socket, signals, the serve loop and
``pump``, one round of the main loop's duties); what each request does is
``uksm.proc.handlers``.  Every wait inside a request is bounded and keeps
the main loop's duties going (reaping, sweeping), so that a worker dying
meanwhile is recovered and a stuck request becomes an error rather than a
stuck daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from uksm.host import log as ulog
from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_OK, EXIT_USAGE, signalled
from uksm.host.lifeline import STOP_SIGNALS, SecondSignal
from uksm.proc.control import not_running, sock_address
from uksm.proc.handlers import ROUND_S, Requests
from uksm.proc.supervisor import Supervisor

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


def make_config(spec: dict[str, Any]) -> Any:
    """The cluster's Config, built as ``uksm run`` builds it, sized for
    ``max_workers`` address spaces of up to ``max_pages`` pages."""
    from uksm.proc.run import RunOptions
    from uksm.proc.run import make_config as run_make_config
    o = RunOptions(workers=spec["max_workers"], pages=spec["max_pages"], frames=spec["frames"],
                   workload=spec["workload"], seed=spec["seed"], log_dir=spec["log_dir"],
                   run=spec["run"], pages_to_scan=spec["pages_to_scan"], sleep_ms=spec["sleep_ms"],
                   exit_policy=spec["exit_policy"], oom_rule=spec.get("oom_rule", "2.6.32"),
                   kernel=spec.get("kernel", "2.6.32"),
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


class Daemon:
    """One cluster's daemon: the transport.  Its control socket (the
    abstract UNIX socket, the peer's credentials, a JSON line in, a JSON
    line out), its signals, its supervisor and the main loop; what each
    request does is ``requests`` (``uksm.proc.handlers.Requests``), made
    once the cluster is booted.  Without a socket (``reserve`` not called)
    it serves ``uksm.Machine`` in-process: ``run_request`` is then called
    directly."""

    def __init__(self, name: str, spec: dict[str, Any], foreground: bool) -> None:
        self.name = name
        self.spec = spec
        self.foreground = foreground
        self.log_dir: str = spec["log_dir"]
        self.sock: socket.socket | None = None
        self.sup: DaemonSupervisor | None = None
        self.requests: Requests | None = None
        self.stop_signal = 0
        self.done = False
        self.hung_seen = 0
        self.t0 = time.monotonic()
        # called first in every round of the main loop's duties: where an
        # in-process Machine raises a Ctrl-C noticed meanwhile (uksm.api)
        self.safe_point: Callable[[], None] = lambda: None

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
        self.sup.forks.max_live = spec["max_workers"]   # forked tasks count among them
        self.requests = Requests(self.name, spec, self.sup,
                                 ulog.thread_logger("ctl", self.name, self.log_dir, "daemon",
                                                    boot_id=self.sup.cl.boot_id),
                                 pump=self.pump, on_down=self._going_down, t0=self.t0)
        for _ in range(spec["workers"]):
            self.sup.spawn_worker(spec["pages"], spec["workload"], spec["seed"], spec["churn_ms"])
        if self.sock is not None:
            self.sock.listen(128)
            self.sock.setblocking(False)

    def _going_down(self) -> None:
        """``down`` begins: serve no more requests (the rest are refused
        by ``drain``); tell systemd."""
        self.done = True
        sd_notify("STOPPING=1")

    def close_tasks(self) -> None:
        """Close the programmable tasks' channels (an in-process Machine
        given up)."""
        if self.requests is not None:
            self.requests.tasks.close_tasks()

    # ---- the main loop ------------------------------------------------------------------
    def pump(self) -> None:
        """One round of the main loop's duties (as uksm run's drive())."""
        self.safe_point()
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
                assert self.requests is not None
                report = self.requests.down()
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
        fn = self.requests.handlers().get(op) if self.requests is not None else None
        if fn is None:
            return {"ok": False, "error": f"unknown request {op!r}", "status": EXIT_USAGE}
        try:
            ans = fn(req)
        except shm.UksmError as e:
            err = getattr(e, "errno", 0)   # a system call's (fork's) error number, when it has one
            return {"ok": False, "error": str(e), "status": e.status,
                    "kind": getattr(e, "kind", "hung" if e.status == EXIT_HUNG else ""),
                    **({"errno": err} if err else {})}
        except Exception as e:  # a bug: say so, keep serving
            print(f"uksm: request {op!r} failed:\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            return {"ok": False, "error": f"request {op!r} failed: {e!r} (daemon bug; see "
                                          f"{self.log_dir}/daemon.out)", "status": EXIT_ERR}
        ans.setdefault("ok", True)
        return ans


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
    assert d.requests is not None
    ready = d.requests.do_ping({})
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
