"""The supervisor's side of scripts: programmable tasks, kill points, the
scan cursor (issue 10).

Two owners, each with its own requests, both part of the daemon's
``uksm.proc.handlers.Requests`` (their ``Host``): ``Tasks``, the
programmable tasks and their commands, and ``Faults``, fault injection
(kill a task, at a kill point or now; arm and disarm kill points; ksmd's
scan cursor).  Their ``do_*`` methods are requests like ``spawn`` or
``ctl``, served one at a time by the daemon's main thread, every wait
bounded and pumping the main loop's duties (reaping, recovery, the
watchdog's reports).  The same handlers serve a ``uksm up`` cluster over
its socket and, in-process, a ``uksm.Machine`` (``uksm.api``).

A programmable task is a worker process running ``uksm.workers.scripted``;
the daemon holds one end of a socketpair to it (``TaskChan``) and forwards
each command, after checking it here (types, ranges, the task's state):
bad input is refused before it reaches the task, so it changes nothing.

Failures carry a ``kind`` (``ScriptError.kind``), which the API turns into
its exception classes: ``type``, ``value``, ``segfault``, ``unknown``,
``exited``, ``died``, ``not_reached``, ``timeout``, ``oom``.
"""
from __future__ import annotations

import base64
import json
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from uksm.errors import UksmError
from uksm.host.exitcodes import EXIT_ERR, EXIT_USAGE
from uksm.kernel import killpoints
from uksm.kernel.fork import ERESTARTNOINTR
from uksm.kernel.layout import (
    EXIT_PATHS,
    EXIT_POLICIES,
    FIRST_VPN,
    H_EXIT_POLICY,
    H_KSMD_POINT,
    H_NEXT_WORKER,
    L_SCAN_SLOT,
    PAGE_SHIFT,
    PAGE_SIZE,
    T_EXIT_PATH,
    T_KILL_POINT,
)
from uksm.proc import options
from uksm.workers.workloads import split_fork

if TYPE_CHECKING:
    from uksm.proc.supervisor import Child, Supervisor

TASK_PROGRAM = "uksm.workers.scripted"
ADVICE = ("MERGEABLE", "UNMERGEABLE", "DONTNEED")
EXIT_POINTS = ("ksm_exit_before_down_write", "ksm_exit_mmap_sem_write", "exit_mid_zap")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
COMMAND_WAIT_S = 120.0   # one command (it may wait for locks, memory, ksmd)
EXIT_WAIT_S = 60.0       # a task's exit, or its reaper's
POINT_WAIT_S = 10.0      # a built-in worker passing an armed kill point
READY_WAIT_S = 60.0      # a new task through __ksm_enter


class ScriptError(UksmError):
    """A request of a script refused or failed; ``kind`` says how."""

    def __init__(self, msg: str, kind: str, status: int = EXIT_ERR, errno: int = 0) -> None:
        super().__init__(msg, status)
        self.kind = kind
        self.errno = errno   # kind "errno": a system call's (fork's) error number


@dataclass
class TaskChan:
    """The supervisor's end of a programmable task."""
    tid: str
    child: "Child"
    sock: socket.socket
    pages: int
    base: int = 0
    buf: bytes = b""
    eof: bool = False
    gone: str = ""            # why it is no longer usable ("" while alive)
    extra: dict[str, Any] = field(default_factory=dict)


def _int(req: dict[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    v = req.get(key)
    if type(v) is not int:
        raise ScriptError(f"{what} must be an int (got {type(v).__name__} {v!r})", "type", EXIT_USAGE)
    if not lo <= v <= hi:
        raise ScriptError(f"{what} {v} is out of range ({lo}..{hi})", "value", EXIT_USAGE)
    return v


def _bytes(req: dict[str, Any], key: str, what: str) -> bytes:
    v = req.get(key)
    if not isinstance(v, str):
        raise ScriptError(f"{what} must be bytes (base64 on the wire; got {type(v).__name__})",
                          "type", EXIT_USAGE)
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise ScriptError(f"{what}: not valid base64", "value", EXIT_USAGE)


def task_command(req: dict[str, Any], pages: int) -> tuple[dict[str, Any] | None, str]:
    """A script's command for a task of ``pages`` pages, checked (types,
    ranges: bad input changes nothing) and put as the task takes it
    (``uksm.workers.scripted``): (the command, what it is called in
    errors); the command is None when there is nothing to do (an empty
    fill, write or read).  Served the same way under a controlled
    schedule (``uksm.explorer.requests``)."""
    size = pages * PAGE_SIZE
    cmd = req.get("cmd")
    if cmd == "fill":
        first = _int(req, "first", 0, pages - 1, "first page")
        count = req.get("count")
        if count is None:
            count = pages - first
        else:
            count = _int(req, "count", 0, pages - first, f"count (from page {first})")
        if "page" in req:
            page = _bytes(req, "page", "page")
            if len(page) != PAGE_SIZE:
                raise ScriptError(f"fill value: {len(page)} bytes, not {PAGE_SIZE} (one page)",
                                  "value", EXIT_USAGE)
        else:
            page = bytes([_int(req, "value", 0, 255, "fill value")]) * PAGE_SIZE
        if not count:
            return None, "fill"
        return {"cmd": "fill", "first": first, "count": count,
                "page": base64.b64encode(page).decode()}, "fill"
    if cmd in ("write", "read"):
        addr = req.get("addr")
        if type(addr) is not int:
            raise ScriptError(f"addr must be an int (got {type(addr).__name__} {addr!r})", "type",
                              EXIT_USAGE)
        if cmd == "write":
            data = _bytes(req, "data", "data")
            n = len(data)
        else:
            n = _int(req, "n", 0, 1 << 30, "n (bytes to read)")
        if addr < 0 or addr + n > size:
            raise ScriptError(f"{cmd} of {n} bytes at {addr:#x}: beyond the task's {pages} "
                              f"pages ({size:#x} bytes): segfault (nothing done, the task lives on)",
                              "segfault", EXIT_USAGE)
        if not n:
            return None, cmd
        if cmd == "write":
            return {"cmd": "write", "addr": addr, "data": base64.b64encode(data).decode()}, "write"
        return {"cmd": "read", "addr": addr, "n": n}, "read"
    if cmd == "madvise":
        first = _int(req, "first", 0, pages - 1, "first page")
        count = _int(req, "count", 1, pages - first, f"count (from page {first})")
        advice = req.get("advice")
        if not isinstance(advice, str):
            raise ScriptError(f"advice must be a string, one of {', '.join(ADVICE)} "
                              f"(got {advice!r})", "type", EXIT_USAGE)
        if advice.upper() not in ADVICE:
            raise ScriptError(f"unknown advice {advice!r} (one of: {', '.join(ADVICE)})",
                              "value", EXIT_USAGE)
        return ({"cmd": "madvise", "first": first, "count": count, "advice": advice.upper()},
                f"madvise {advice.upper()}")
    if cmd in ("verify", "exit"):
        return {"cmd": cmd}, cmd
    if cmd == "prctl":
        # prctl(option, arg2, arg3, arg4, arg5): five unsigned longs (a
        # negative int is the C cast's two's complement, as -1UL)
        vals = []
        for k in ("option", "arg2", "arg3", "arg4", "arg5"):
            v = req.get(k, 0)
            if isinstance(v, bool) or type(v) is not int:
                raise ScriptError(f"prctl {k} must be an int (got {type(v).__name__} {v!r})", "type",
                                  EXIT_USAGE)
            if not -(1 << 63) <= v < 1 << 64:
                raise ScriptError(f"prctl {k} {v} does not fit an unsigned long", "value", EXIT_USAGE)
            vals.append(v & ((1 << 64) - 1))
        return {"cmd": "prctl", "option": vals[0], "args": vals[1:]}, f"prctl {vals[0]}"
    raise ScriptError(f"unknown task command {cmd!r} (fill, write, read, madvise, prctl, verify, "
                      f"fork, exit)", "value", EXIT_USAGE)


def task_answer(cmd: str, ans: dict[str, Any]) -> dict[str, Any]:
    """What a script is told of a task's answer to ``cmd``."""
    if cmd == "read":
        return {"data": ans["data"]}
    if cmd == "madvise":
        return {"unmerged": ans.get("unmerged", 0)}
    if cmd == "prctl":
        return {"ret": ans.get("ret", 0)}
    if cmd == "verify":
        return {"pages": ans["pages"], "mismatches": ans["mismatches"]}
    if cmd == "exit":
        return {"path": ans["path"], "mismatches": ans["mismatches"]}
    return {}


class Host(Protocol):
    """What the scripts' requests use of the daemon's other requests
    (``uksm.proc.handlers.Requests``)."""

    name: str
    spec: dict[str, Any]
    log: Any

    @property
    def sup(self) -> "Supervisor": ...

    def pump(self) -> None: ...

    def wait_until(self, pred: Callable[[], bool], timeout: float, what: str = "") -> bool: ...

    def finished(self, c: "Child") -> bool: ...

    def do_kill(self, req: dict[str, Any]) -> dict[str, Any]: ...


class Tasks:
    """Programmable tasks: their channels, and the requests that start
    them, command them and read their stats (``task_new``, ``task``,
    ``task_stat``).  A task id (``w3``) names a programmable task here,
    or a built-in worker (``builtin``), which takes no commands."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.chans: dict[str, TaskChan] = {}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"task_new": self.do_task_new, "task": self.do_task, "task_stat": self.do_task_stat,
                "task_pagemap": self.do_task_pagemap}

    # ---- a task's channel ------------------------------------------------------------------
    def task(self, req: dict[str, Any], alive: bool = True) -> TaskChan:
        tid = req.get("task")
        if not isinstance(tid, str):
            raise ScriptError(f"task id must be a string like 'w3' (got {tid!r})", "type", EXIT_USAGE)
        tc = self.chans.get(tid)
        if tc is None:
            if self.builtin(req) is not None:
                raise ScriptError(f"{tid} is a built-in worker ('uksm spawn', m.spawn): it takes "
                                  f"no commands, only kill, arm, stat and pagemap", "value", EXIT_USAGE)
            if self.was_worker(tid):
                # a built-in worker gone since the caller listed it (a
                # forked child exits on its own: uksm.proc.forks)
                raise ScriptError(f"task {tid} has exited", "exited")
            known = " ".join(sorted(self.chans)) or "none"
            raise ScriptError(f"no programmable task {tid!r} in cluster {self.host.name!r} (tasks: "
                              f"{known})", "unknown", EXIT_ERR)
        self.check_gone(tc)
        if alive and tc.gone:
            raise ScriptError(f"task {tid} {tc.gone}: it can take no more commands", "exited")
        return tc

    def any_worker(self, req: dict[str, Any]) -> "Child":
        """A live worker, programmable or built-in."""
        ch = self.builtin(req)
        return ch if ch is not None else self.task(req).child

    def check_gone(self, tc: TaskChan) -> None:
        """Notice a task that died or exited between two requests."""
        if tc.gone:
            return
        sup = self.host.sup
        self.host.pump()
        with sup.lock:
            running = sup.children.get(tc.child.row) is tc.child
        if not running or tc.child.proc.poll() is not None:
            self.wait_finished(tc, "its death")
            tc.gone = self.how(tc)

    def how(self, tc: TaskChan) -> str:
        rc = tc.child.proc.returncode
        cl = self.host.sup.cl
        path = tc.extra.get("path") or EXIT_PATHS[cl.trow(tc.child.row).exit_path]
        tc.extra["path"] = path
        if rc == -signal.SIGKILL:
            return f"was killed (SIGKILL); its exit was run by the supervisor (ksm_exit {path})"
        if tc.extra.get("exited"):
            return f"has exited (ksm_exit {path})"
        return f"has exited on a fatal signal or the OOM killer (status {rc}, ksm_exit {path})"

    def wait_finished(self, tc: TaskChan, what: str) -> None:
        if not self.host.wait_until(lambda: self.host.finished(tc.child), EXIT_WAIT_S, what):
            raise ScriptError(f"task {tc.tid}: its exit did not finish within {EXIT_WAIT_S:.0f}s",
                              "timeout")
        try:
            tc.sock.close()
        except OSError:
            pass

    def _readable(self, tc: TaskChan) -> bool:
        if b"\n" in tc.buf:
            return True
        try:
            r, _, _ = select.select([tc.sock], [], [], 0)
        except (OSError, ValueError):
            r = [tc.sock]
        if r:
            try:
                chunk = tc.sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                tc.eof = True
                return True
            tc.buf += chunk
            return b"\n" in tc.buf
        return False

    def _answer(self, tc: TaskChan, what: str, timeout: float = COMMAND_WAIT_S) -> dict[str, Any]:
        """The task's answer to a command, pumping meanwhile; ScriptError
        (died) if the task died instead of answering."""
        if not self.host.wait_until(lambda: self._readable(tc), timeout, f"task {tc.tid}: {what}"):
            raise ScriptError(f"task {tc.tid}: no answer to {what} within {timeout:.0f}s", "timeout")
        if b"\n" not in tc.buf:  # EOF: the task is gone
            self.wait_finished(tc, f"task {tc.tid}'s death")
            tc.gone = self.how(tc)
            # one that died of its own error: in its words (Supervisor.task_failed)
            failed = [e for e in self.host.sup.errors if f"(pid {tc.child.proc.pid})" in e]
            raise ScriptError(f"task {tc.tid} died during {what}: "
                              + (failed[0] if failed else f"it {tc.gone}"), "died")
        line, tc.buf = tc.buf.split(b"\n", 1)
        ans: dict[str, Any] = json.loads(line)
        return ans

    def command(self, tc: TaskChan, cmd: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            tc.sock.sendall(json.dumps(cmd).encode() + b"\n")
        except OSError:
            pass  # it died: _answer finds the EOF
        ans = self._answer(tc, what)
        if not ans.get("ok"):
            kind = str(ans.get("kind", "value"))
            errno = int(ans.get("errno", 0))
            if kind == "errno" and errno == ERESTARTNOINTR:
                kind = "died"   # a fatal signal was pending: the task exits now
            if kind in ("oom", "died"):  # it is exiting: let it finish
                self.wait_finished(tc, f"task {tc.tid}'s exit")
                tc.gone = self.how(tc)
            raise ScriptError(f"task {tc.tid}: {what}: {ans.get('error')}", kind,
                              EXIT_USAGE if kind in ("value", "segfault") else EXIT_ERR, errno)
        return ans

    # ---- requests ----------------------------------------------------------------------------
    def do_task_new(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start a programmable task; answer once its mmap and (unless
        mergeable is false) its MADV_MERGEABLE, i.e. __ksm_enter, are done."""
        sup = self.host.sup
        by = options.spelling(req)
        pages = options.task_pages(by, req.get("pages"), int(self.host.spec["max_pages"]))
        mergeable = req.get("mergeable", True)
        if not isinstance(mergeable, bool):
            raise ScriptError(f"mergeable must be True or False (got {mergeable!r})", "type", EXIT_USAGE)
        self.host.pump()
        options.live_tasks(by, sup.workers_alive(), 1, int(self.host.spec["max_workers"]))
        mine, theirs = socket.socketpair()
        try:
            extra = ("--cmd-fd", str(theirs.fileno())) + (() if mergeable else ("--no-mergeable",))
            try:
                ch = sup.spawn_worker(pages, "zero", 0, program=TASK_PROGRAM, extra_args=extra,
                                      pass_fds=(theirs.fileno(),))
            except UksmError as e:  # no room (a table, /dev/shm): the machine's, not the input's
                mine.close()
                raise ScriptError(str(e), "limit", EXIT_ERR)
        finally:
            theirs.close()
        tc = TaskChan(f"w{ch.worker_no}", ch, mine, pages)
        self.chans[tc.tid] = tc
        ans = self._answer(tc, "start", READY_WAIT_S)
        if not ans.get("ok"):
            self.wait_finished(tc, f"task {tc.tid}'s exit")
            tc.gone = self.how(tc)
            raise ScriptError(f"task {tc.tid} could not start: {ans.get('error')}",
                              str(ans.get("kind", "died")))
        tc.base = int(ans["base"])
        self.host.log.info("task_new", worker=tc.tid, worker_pid=ch.proc.pid, mm=ch.mm, pages=pages)
        return {"task": tc.tid, "pid": ch.proc.pid, "mm": ch.mm, "pages": pages, "base": tc.base}

    def do_task(self, req: dict[str, Any]) -> dict[str, Any]:
        """One command for a task: fill, write, read, madvise, verify, fork, exit."""
        tc = self.task(req)
        if req.get("cmd") == "fork":   # the task forks; its child is adopted here
            return self.fork(tc)
        cmd, what = task_command(req, tc.pages)
        if cmd is None:
            return {"data": ""} if req.get("cmd") == "read" else {}
        ans = self.command(tc, cmd, what)
        if cmd["cmd"] == "exit":
            tc.extra.update(exited=True, path=ans["path"])
            self.wait_finished(tc, f"task {tc.tid}'s exit")
            tc.gone = self.how(tc)
            self.host.log.info("task_exit", worker=tc.tid, path=ans["path"], mismatches=ans["mismatches"])
        return task_answer(cmd["cmd"], ans)

    def fork(self, tc: TaskChan) -> dict[str, Any]:
        """fork(2) in a programmable task: the task forks in its own
        process (``Worker.fork``: the supervisor's half, ``uksm.proc.forks``,
        is served while this waits, by the pump); the child, started on
        its new row, is adopted here: its command socket, the parent's
        shadow as its first line, its ready answer.  -EAGAIN when the
        machine has no room for one more task (``max_tasks``), -ENOMEM when
        the copy cannot get its page table: the parent as it was."""
        sup = self.host.sup
        ans = self.command(tc, {"cmd": "fork"}, "fork")
        with sup.lock:
            ch = sup.children.get(int(ans["row"]))
        if ch is None or ch.chan is None or ch.proc.pid != int(ans["pid"]):
            raise ScriptError(f"task {tc.tid}: fork: the child (pid {ans['pid']}) died before it "
                              f"started", "died")
        child = TaskChan(f"w{ch.worker_no}", ch, ch.chan, tc.pages, tc.base)
        ch.chan = None
        self.chans[child.tid] = child
        try:
            child.sock.sendall(json.dumps({"shadow": ans["shadow"]}).encode() + b"\n")
        except OSError:
            pass  # it died: _answer finds the EOF
        ready = self._answer(child, "start", READY_WAIT_S)
        if not ready.get("ok"):
            self.wait_finished(child, f"task {child.tid}'s exit")
            child.gone = self.how(child)
            raise ScriptError(f"task {child.tid} (forked from {tc.tid}) could not start: "
                              f"{ready.get('error')}", str(ready.get("kind", "died")))
        self.host.log.info("task_fork", worker=tc.tid, child=child.tid, child_pid=ch.proc.pid,
                           mm=tc.child.mm, child_mm=ch.mm)
        return {"task": child.tid, "pid": ch.proc.pid, "mm": ch.mm, "pages": child.pages,
                "base": child.base}

    def release_child(self, row: int) -> None:
        """A forked programmable task nobody adopts: its socket closed, it
        exits (its parent's shadow never came: it checks nothing)."""
        with self.host.sup.lock:
            ch = self.host.sup.children.get(row)
        if ch is not None and ch.chan is not None:
            ch.chan.close()
            ch.chan = None

    def do_task_pagemap(self, req: dict[str, Any]) -> dict[str, Any]:
        """/proc/PID/pagemap of a task's pages first..first+count-1, with
        /proc/kpageflags' KPF_KSM and /proc/kpagecount for each frame:
        read from its page table and the frame table (``MM.pagemap``)."""
        ch = self.any_worker(req)
        tc = self.chans.get(str(req.get("task")))
        pages = ch.pages
        first = _int(req, "first", 0, pages - 1, "first page")
        count = req.get("count")
        count = pages - first if count is None else _int(req, "count", 0, pages - first,
                                                         f"count (from page {first})")
        base = tc.base if tc is not None else FIRST_VPN << PAGE_SHIFT
        sup = self.host.sup
        mm = sup.mms.get(ch.mm)
        if mm is None or not mm.alive():
            raise ScriptError(f"task w{ch.worker_no}: its address space is gone", "exited")
        return {"pages": mm.pagemap((base >> PAGE_SHIFT) + first, count), "first": first,
                "pid": ch.proc.pid, "mm": ch.mm}

    def do_task_stat(self, req: dict[str, Any]) -> dict[str, Any]:
        """/proc/PID/ksm_stat (and rss) of the cluster's kernel: read from
        the task's mm row (``uksm.kernel.ksm_stat``)."""
        from uksm.kernel.ksm_stat import ksm_stat
        ch = self.any_worker(req)
        sup = self.host.sup
        row = sup.cl.mm_row(ch.mm)
        if row < 0:
            raise ScriptError(f"task w{ch.worker_no}: its address space is gone", "exited")
        return {**ksm_stat(sup.cl, row, sup.mms.get(ch.mm)), "pid": ch.proc.pid, "mm": ch.mm}

    def was_worker(self, tid: str) -> bool:
        """``tid`` names a worker this machine started (w1..w<last>)."""
        n = tid[1:]
        return (tid[:1] == "w" and n.isascii() and n.isdigit()
                and 1 <= int(n) <= self.host.sup.cl.q[H_NEXT_WORKER])

    def builtin(self, req: dict[str, Any]) -> "Child | None":
        """A built-in worker (``spawn``) named by the request, None when
        the id names a programmable task."""
        tid = req.get("task")
        if not isinstance(tid, str) or tid in self.chans:
            return None
        sup = self.host.sup
        self.host.pump()
        with sup.lock:
            kids = {f"w{c.worker_no}": c for c in sup.children.values()}
        return kids.get(tid)

    def close_tasks(self) -> None:
        with self.host.sup.lock:   # and a forked child's not adopted (its fork's caller died)
            socks = [ch.chan for ch in self.host.sup.children.values() if ch.chan is not None]
        for sock in [tc.sock for tc in self.chans.values()] + socks:
            try:
                sock.close()
            except OSError:
                pass


class Faults:
    """Fault injection: kill a task (now, or at a kill point), arm and
    disarm kill points (a task's, or ksmd's), and where ksmd's scan
    cursor is (``task_kill``, ``arm``, ``disarm``, ``cursor``)."""

    def __init__(self, host: Host, tasks: Tasks) -> None:
        self.host = host
        self.tasks = tasks

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"task_kill": self.do_task_kill, "arm": self.do_arm, "disarm": self.do_disarm,
                "cursor": self.do_cursor}

    def _signal(self, req: dict[str, Any]) -> str:
        return options.signal_name(options.spelling(req), req.get("signal"), "KILL")

    def _point(self, req: dict[str, Any]) -> str | None:
        at = req.get("at")
        if at is None:
            return None
        if not isinstance(at, str) or at not in killpoints.POINTS:
            raise ScriptError(f"unknown kill point {at!r} (m.kill_points() / 'uksm task points' "
                              f"list them)", "value", EXIT_USAGE)
        if at in killpoints.KSMD_POINTS:
            raise ScriptError(f"{at} is a point in ksmd, not in a task: arm it with "
                              f"m.arm({at!r}) (ksmd then kills the owner of the mm it is in)",
                              "value", EXIT_USAGE)
        self._reachable(at)
        return at

    def _reachable(self, point: str) -> None:
        """Refuse, before anything is done, a point the cluster's exit
        policy never passes (``uksm inject --point`` refuses it the same
        way): legacy's __ksm_exit has no slow path, so driving a task there
        would only use it up."""
        cl = self.host.sup.cl
        policy = EXIT_POLICIES[cl.q[H_EXIT_POLICY]]
        if killpoints.KERNEL_ONLY.get(point, cl.kernel) != cl.kernel:
            raise ScriptError(f"kill point {point} is in {killpoints.KERNEL_ONLY[point]}'s code only "
                              f"(this cluster runs {cl.kernel}'s); nothing was done", "value", EXIT_USAGE)
        if point not in killpoints.reachable(policy, cl.kernel):
            raise ScriptError(f"kill point {point} is never reached under exit policy {policy} "
                              f"(its __ksm_exit has no slow path); nothing was done", "value",
                              EXIT_USAGE)

    def do_task_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        """Kill a task now, or (``at``) drive it to a kill point and let it
        die there; answer once its death is recovered and its exit run."""
        signame = self._signal(req)
        at = self._point(req)
        ch = self.tasks.builtin(req)
        if ch is not None:
            return self._kill_builtin(ch, signame, at, options.spelling(req))
        tc = self.tasks.task(req)
        sup = self.host.sup
        cl, q = sup.cl, sup.cl.q
        if at is None:
            self.host.do_kill({"workers": [tc.tid], "signal": signame})
        else:
            tb = cl.tbase(tc.child.row)
            killpoints.arm_worker(cl, tc.child.row, at, SIGNALS[signame])
            self.host.log.info("inject_kill", target_pid=tc.child.proc.pid, mm=tc.child.mm,
                           signal=signame, mode="point")
            try:
                ans = self.tasks.command(tc, {"cmd": "drive", "point": at}, f"drive to {at}")
            except ScriptError as e:
                if e.kind != "died":
                    if not tc.gone:
                        killpoints.disarm_worker(cl, tc.child.row)
                    raise ScriptError(f"kill point {at} was not reached: {e}",
                                      "not_reached" if e.kind == "not_reached" else e.kind, e.status)
                ans = {"died": True}
            passed = q[tb + T_KILL_POINT] != killpoints.INDEX[at]  # hit() disarms as it fires
            if "forked_row" in ans:   # a drive's fork that got through: its child, unadopted, exits
                self.tasks.release_child(int(ans["forked_row"]))
            if ans.get("exited"):  # an exit point: the task went through its whole exit
                tc.extra.update(exited=True, path=ans["path"])
                self.tasks.wait_finished(tc, f"task {tc.tid}'s exit")
                tc.gone = self.tasks.how(tc)
                if not passed:
                    raise ScriptError(f"kill point {at} was not reached: the task exited "
                                      f"through the {ans['path']} path of __ksm_exit, which "
                                      f"does not pass it (the task is gone)", "not_reached")
                # passed, with SIGTERM: a task already in its exit notices the signal
                # at no later safe point -- its exit runs to the end (2.6.32's
                # do_exit is past every signal check), and its path is the answer
                tc.extra["path"] = ans["path"]
            elif not ans.get("died") and not passed:
                killpoints.disarm_worker(cl, tc.child.row)
                raise ScriptError(f"kill point {at} was not reached: the drive got through "
                                  f"without passing it (disarmed; the task lives on)", "not_reached")
        self.tasks.wait_finished(tc, f"task {tc.tid}'s death")
        tc.gone = self.tasks.how(tc)
        return {"task": tc.tid, "signal": signame, "at": at, "returncode": tc.child.proc.returncode,
                "path": tc.extra["path"], "result": tc.gone}

    def _kill_builtin(self, ch: "Child", signame: str, at: str | None,
                      by: options.Spelling) -> dict[str, Any]:
        """A built-in worker (it takes no commands): killed now, or at a
        point its own work (churn) or its exit (a SIGTERM first) passes."""
        sup = self.host.sup
        cl, q = sup.cl, sup.cl.q
        tid, tb = f"w{ch.worker_no}", cl.tbase(ch.row)
        if at is None:
            self.host.do_kill({"workers": [tid], "signal": signame})
        else:
            forks = split_fork(ch.workload)[1] > 0
            if at == "ksm_enter_locked" and not forks:
                raise ScriptError(f"kill point {at} was not reached: worker {tid} is past its "
                                  f"__ksm_enter and does not fork (use a task made with "
                                  f"mergeable=False, or a W+fork workload)", "not_reached")
            if at in killpoints.FORK_POINTS and not forks:
                raise ScriptError(f"kill point {at} was not reached: worker {tid} does not fork "
                                  f"(its workload {ch.workload!r}: a W+fork workload forks; a "
                                  f"programmable task forks with t.fork())", "not_reached")
            self._reachable(at)
            hits = cl.kill_points_hit()
            killpoints.arm_worker(cl, ch.row, at, SIGNALS[signame])
            self.host.log.info("inject_kill", target_pid=ch.proc.pid, mm=ch.mm, signal=signame,
                           mode="point")
            if at in EXIT_POINTS:
                try:
                    ch.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.host.wait_until(lambda: cl.kill_points_hit() != hits or ch.proc.poll() is not None,
                            POINT_WAIT_S, f"worker {tid} to reach {at}")
            # hit() disarms the point and counts it as it fires (a reaper
            # also clears the row's point: the count says whether it fired)
            if cl.kill_points_hit() == hits:
                if ch.proc.poll() is None:
                    killpoints.disarm_worker(cl, ch.row)
                    raise ScriptError(f"kill point {at} was not reached: worker {tid} did not "
                                      f"pass it within {POINT_WAIT_S:.0f}s (is it churning? "
                                      f"{options.CHURN_MS.spelt(by)})", "not_reached")
                self.host.wait_until(lambda: self.host.finished(ch), EXIT_WAIT_S, f"worker {tid}'s exit")
                raise ScriptError(f"kill point {at} was not reached: worker {tid} exited without "
                                  f"passing it (its exit went another way)", "not_reached")
        if not self.host.wait_until(lambda: self.host.finished(ch), EXIT_WAIT_S, f"worker {tid}'s exit"):
            raise ScriptError(f"worker {tid}: its exit did not finish within {EXIT_WAIT_S:.0f}s",
                              "timeout")
        return {"task": tid, "signal": signame, "at": at, "returncode": ch.proc.returncode,
                "path": EXIT_PATHS[q[tb + T_EXIT_PATH]], "result": "killed"}

    def do_arm(self, req: dict[str, Any]) -> dict[str, Any]:
        """Arm a kill point: in ksmd (kills the owner of the mm it is in, or
        with delay_ms stops there that long), or in a task's row."""
        point = req.get("point")
        if not isinstance(point, str) or point not in killpoints.POINTS:
            raise ScriptError(f"unknown kill point {point!r}", "value", EXIT_USAGE)
        cl = self.host.sup.cl
        delay = req.get("delay_ms")
        if point not in killpoints.KSMD_POINTS:
            self._reachable(point)
        if point in killpoints.KSMD_POINTS:
            if req.get("task") is not None:
                raise ScriptError(f"{point} is a ksmd point: it takes no task", "value", EXIT_USAGE)
            if req.get("fail"):  # fail_page_alloc (ValueError at a point that allocates nothing)
                killpoints.arm_ksmd_fail(cl, point)
            elif delay is not None:
                killpoints.arm_ksmd_delay(cl, point, _int(req, "delay_ms", 1, 60_000, "delay_ms"))
            else:
                killpoints.arm_ksmd(cl, point, SIGNALS[self._signal(req)])
            return {"armed": point, "where": "ksmd"}
        if delay is not None:
            raise ScriptError(f"{point}: delays exist only at ksmd points", "value", EXIT_USAGE)
        if req.get("task") is None:
            raise ScriptError(f"{point} is a task point: say which task (t.arm(...))", "value",
                              EXIT_USAGE)
        ch = self.tasks.any_worker(req)
        killpoints.arm_worker(cl, ch.row, point, SIGNALS[self._signal(req)])
        return {"armed": point, "where": f"w{ch.worker_no}"}

    def do_disarm(self, req: dict[str, Any]) -> dict[str, Any]:
        cl = self.host.sup.cl
        if req.get("task") is not None:
            ch = self.tasks.any_worker(req)
            killpoints.disarm_worker(cl, ch.row)
            return {"disarmed": f"w{ch.worker_no}"}
        cl.q[H_KSMD_POINT] = -1
        return {"disarmed": "ksmd"}

    def do_cursor(self, _req: dict[str, Any]) -> dict[str, Any]:
        """ksm_scan.mm_slot: the task whose mm ksmd's cursor is in."""
        sup = self.host.sup
        cl, q = sup.cl, sup.cl.q
        slot = q[L_SCAN_SLOT]
        if slot == cl.head:
            return {"task": None, "mm": 0}
        mm_id = cl.mrow(slot).id
        with sup.lock:
            ch = next((c for c in sup.children.values() if c.mm == mm_id), None)
        return {"task": f"w{ch.worker_no}" if ch is not None else None, "mm": mm_id}


__all__ = ["Tasks", "Faults", "Host", "ScriptError", "TaskChan", "ADVICE", "SIGNALS", "task_command",
           "task_answer"]
