"""``uksm.Machine``: program tasks, knobs, waits and kills from Python.

The public API of uksm (issue 10); ``docs/API.md`` is its manual.

::

    import uksm
    with uksm.Machine(frames=256) as m:
        a, b = m.task(pages=4), m.task(pages=4)
        a.fill(7); b.fill(7)
        m.wait_full_scans(2)
        assert m.ksm["pages_shared"] == 4 and m.ksm["pages_sharing"] == 4
        m.ksm["run"] = 2                   # returns once everything is unmerged
    print(m.report["fsck"])                # uksm run --json's report

Layers: a Machine is a client of the cluster daemon's requests
(``uksm.proc.daemon.Daemon.run_request``, with the script requests of
``uksm.proc.scripting``).  ``Machine(...)`` boots a cluster in this process and
calls the same Daemon object directly (this process is the supervisor);
``Machine.attach(name)`` sends the same requests over the socket of a
cluster started with ``uksm up``.  Reads of the knobs and counters come
straight from the cluster's shared memory, as reading /sys/kernel/mm/ksm
does not go through ksmd; everything else is a request.

Every call returns when it is done; waits pump the supervisor's duties
(reaping, recovering the locks of the dead), so a script is one thread and
needs nothing in the background.  A Machine is not thread-safe.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import errno
import itertools
import os
import signal as _signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, NamedTuple, NotRequired, TypedDict, cast, final

from uksm.errors import (
    HungTask,
    IntegrityError,
    KillPointMissed,
    MachineClosed,
    MachineError,
    SegFault,
    TaskDied,
    TaskExited,
    WaitTimeout,
)
from uksm.host import shm
from uksm.kernel import killpoints
from uksm.kernel.layout import EXIT_POLICIES, KERNELS, KSM_FIELDS, KSM_FIELDS_618, OOM_RULES, ksm_block_618
from uksm.proc import options as opts
from uksm.proc.control import (
    KnobError,
    ctl_names,
    ctl_values,
    missing_file,
    read_state,
    validate_knob,
    writable,
)

if TYPE_CHECKING:  # (uksm.proc.run and the daemon are imported on first use)
    from uksm.kernel.watchdog import HungReport
    from uksm.proc.handlers import DownReport
    from uksm.proc.run import RunReport
    from uksm.proc.supervisor import FsckResult, Snapshot

DEFAULT_WAIT_S = 60.0
_POLL_S = 0.01
_names = itertools.count(1)
# machines of this process still open: closed at interpreter exit, so that a
# script that forgets close() leaves no ksmd or task behind
_open: "weakref.WeakSet[Machine]" = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for m in list(_open):
        try:
            m.close()
        except Exception:
            pass


class KillPoint(NamedTuple):
    """A named kill point: ``where`` is ``"worker"`` (in a task) or
    ``"ksmd"``."""
    name: str
    where: str
    description: str


_KINDS: dict[str, type[Exception]] = {
    "type": TypeError, "value": ValueError, "segfault": SegFault, "unknown": KeyError,
    "exited": TaskExited, "died": TaskDied, "oom": TaskDied, "not_reached": KillPointMissed,
    "timeout": WaitTimeout, "limit": MachineError,
}


def _bad_option(e: opts.OptionError) -> Exception:
    """An option refused by ``uksm.proc.options``: the built-in exception
    a bad argument raises (TypeError for a wrong type, else ValueError)."""
    return (TypeError if e.kind == "type" else ValueError)(str(e))


def _signame(sig: Any) -> str:
    if isinstance(sig, bool):
        raise TypeError(f"signal must be 'KILL', 'TERM' or a signal number (got {sig!r})")
    if isinstance(sig, int):
        names = {int(_signal.SIGKILL): "KILL", int(_signal.SIGTERM): "TERM"}
        if int(sig) not in names:
            raise ValueError(f"signal {int(sig)}: only SIGKILL (9) and SIGTERM (15) are modelled")
        return names[int(sig)]
    if not isinstance(sig, str):
        raise TypeError(f"signal must be 'KILL', 'TERM' or a signal number (got {type(sig).__name__})")
    try:
        return opts.signal_name(opts.API, sig, "KILL")
    except opts.OptionError as e:
        raise _bad_option(e) from None


# ---- transports: the same requests, in-process or over the daemon's socket ------------------

class _SafePoints:
    """Ctrl-C in a script whose process is the supervisor, noticed at a
    safe point, as a task in the kernel notices a signal at its next one.

    While a call of the Machine blocks (a request, a wait), SIGINT only
    marks itself pending; the next round of the main loop's duties
    (``Daemon.pump``, the safe point: no cluster lock held by this
    process's main thread) raises KeyboardInterrupt there.  A
    KeyboardInterrupt landing anywhere else could leave a cluster lock
    taken by the supervisor's own row, which no recovery frees (its
    holder is alive): close() would then hang on it.  Only the main
    thread's default handler is replaced; a script's own SIGINT handler
    is left alone."""

    def __init__(self) -> None:
        self.pending = False
        self.depth = 0
        self.old: Any = None

    def _note(self, _signo: int, _frame: Any) -> None:
        self.pending = True

    def check(self) -> None:
        """The safe point: a pending Ctrl-C is raised here."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __enter__(self) -> "_SafePoints":
        if (self.depth == 0 and threading.current_thread() is threading.main_thread()
                and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
            self.old = _signal.signal(_signal.SIGINT, self._note)
        self.depth += 1
        return self

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        self.depth -= 1
        if self.depth == 0 and self.old is not None:
            _signal.signal(_signal.SIGINT, self.old)
            self.old = None
            if exc_type is None:  # noticed after the last safe point: raised on the way out
                self.check()


class _Local:
    """This process is the cluster's supervisor: an in-process Daemon
    (no socket) serves the requests."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        from uksm.proc.daemon import Daemon
        self.sp = _SafePoints()
        self.d = Daemon(name, spec, foreground=False)
        self.d.safe_point = self.sp.check
        try:
            self.d.start()
        except BaseException:
            self.abandon()
            raise
        assert self.d.sup is not None
        self.sup = self.d.sup
        self.cl = self.sup.cl

    def blocking(self) -> _SafePoints:
        return self.sp

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.sp:
            return self.d.run_request(req)

    def tick(self) -> None:
        self.d.pump()

    def hung(self) -> list[HungReport]:
        return list(self.sup.hung)

    def failed(self) -> str:
        return self.sup.failed

    def abandon(self) -> None:
        from uksm.proc.daemon import _abandon
        self.d.close_tasks()
        _abandon(self.d)


class _Remote:
    """A cluster started by ``uksm up``: requests over its socket."""

    def __init__(self, name: str) -> None:
        from uksm.proc.control import attach
        self.name = name
        self.request({"op": "ping"})  # a daemon answers, or a plain error
        self.cl = attach(name)

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        from uksm.proc.control import NotUp, call, not_running
        try:
            return call(self.name, req)
        except NotUp:
            raise MachineClosed(str(not_running(self.name)))
        except shm.UksmError as e:
            raise MachineError(str(e))

    def tick(self) -> None:
        pass

    def blocking(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # a client: Ctrl-C anywhere leaves the cluster whole

    def hung(self) -> list[HungReport]:
        ans = self.request({"op": "ping"})
        return list(ans.get("hung_tasks", [])) if ans.get("ok") else []

    def failed(self) -> str:
        return ""   # the daemon's own waits end on it (a spawn answers with the error)

    def abandon(self) -> None:
        self.cl.close()


@final
class ControlledReport(TypedDict):
    """A controlled run's report (``Machine(deterministic=True)``'s
    ``m.report``, ``_Controlled.finish``): ``uksm run --json``'s blocks as
    the explorer's world reports them (untyped there: ``Any``), its
    findings, schedule and logical time.  ``uksm.deterministic.report_of``
    makes ``uksm run --json``'s shape of it."""
    cluster: str
    ksm: Any          # Snapshot's blocks, built here
    frames: Any
    memory: Any
    workers: Any      # the world's (uksm.explorer.world.Outcome.report: dict[str, Any])
    integrity: Any
    fsck: Any
    hung_tasks: list[dict[str, Any]]   # a chain each (no pid, no seconds: not a HungReport)
    ipc_leftovers: list[str]
    errors: list[str]
    oops: list[dict[str, Any]]
    use_after_free: Any
    lockdep: Any
    status: int
    findings: list[dict[str, Any]]
    schedule: str
    steps: int
    logical_s: float
    run_store: NotRequired[Any]


class _Controlled:
    """A controlled run (``uksm.explore``): the requests are served on its
    World, every wait is logical (steps of the schedule, never wall time).
    ``owned``: this Machine made the run (``Machine(deterministic=True)``,
    ``Machine(schedule=...)``) and ends it; else an exploration does."""

    def __init__(self, world: Any, max_pages: int, owned: bool) -> None:
        from uksm.explorer.requests import Requests
        self.world = world
        self.r = Requests(world, max_pages)
        self.owned = owned
        self.outcome: Any = None

    @property
    def cl(self) -> Any:
        return self.world.cl

    def _over(self) -> MachineError:
        """The run found itself stuck (or oopsed): what a script is told."""
        f = self.world.findings[-1] if self.world.findings else None
        if f is None:
            return MachineClosed("the controlled run is over")
        if f.kind in ("deadlock", "hung"):
            return HungTask(f"{f.kind}: {f.detail}", [{"chain": f.chain}])
        return MachineError(f"{f.kind}: {f.detail}")

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        from uksm.explorer.world import RunOver
        try:
            return self.r.request(req)
        except RunOver:
            if not self.owned:
                raise
            raise self._over() from None

    def tick(self) -> None:
        from uksm.explorer.world import RunOver
        try:
            self.r.tick()
        except RunOver:
            if not self.owned:
                raise
            raise self._over() from None

    def now_s(self) -> float:
        """The run's logical clock (ksmd's sleeps, the workers' idles)."""
        from uksm.explorer.gate import G_CLOCK
        return float(self.world.gate.w[G_CLOCK]) / 1000.0

    def hung(self) -> list[dict[str, Any]]:
        return []

    def finish(self) -> ControlledReport:
        """Every task exits, ksmd stops, the checks: the run's report, in
        ``uksm run --json``'s shape (the ksm counters and frames as they
        were before the close), with the run's findings, its schedule and
        its logical time."""
        from uksm.explorer.schedule import recorded
        from uksm.explorer.world import RunOver
        from uksm.kernel.layout import ksm_block
        from uksm.kernel.memory import frame_stats
        w = self.world
        snap: Snapshot = {"ksm": ksm_block(w.cl.q), "frames": frame_stats(w.cl),
                "memory": {"host_bytes_resident": w.cl.pool_resident_bytes()}}
        try:
            self.r.close()
        except RunOver:
            pass
        logical_s = self.now_s()
        out = self.outcome = w.outcome()
        r = out.report
        findings = [{"finding": f.kind, "detail": f.detail, "chain": f.chain} for f in out.findings]
        # (no pid, no seconds: a controlled run's deadlock is seen at once, by its chain)
        hung = [{"role": f["finding"], "pid": 0, "lock": "the chain below", "waited_s": 0,
                 "chain": f["chain"] or [f["detail"]]} for f in findings if f["finding"] in ("deadlock", "hung")]
        oops = [{"task": f["detail"].split(":")[0], "error": f["detail"], "where": "", "count": 1}
                for f in findings if f["finding"] == "oops"]
        from uksm.host import shm as _shm
        rep: ControlledReport = {"cluster": w.name, **snap, "workers": r["workers"], "integrity": r["integrity"],
               "fsck": r["fsck"], "hung_tasks": hung, "ipc_leftovers": _shm.leftovers(w.name),
               "errors": [f"{f['finding']}: {f['detail']}" for f in findings
                          if f["finding"] in ("use_after_free", "lockdep", "assertion")],
               "oops": oops, "use_after_free": r["use_after_free"], "lockdep": r["lockdep"],
               "status": out.status, "findings": findings, "schedule": str(recorded(w.o, out)),
               "steps": len(out.steps), "logical_s": round(logical_s, 3)}
        if "run_store" in r:
            rep["run_store"] = r["run_store"]
        if self.owned:
            w.gate.close()
        return rep

    def abandon(self) -> None:
        try:
            self.world.outcome()
        finally:
            if self.owned:
                self.world.gate.close()


# ---- /sys/kernel/mm/ksm ---------------------------------------------------------------------

class Ksm(MutableMapping[str, Any]):
    """``m.ksm``: the names of /sys/kernel/mm/ksm (and ``uksm ctl``), of
    the machine's kernel: 2.6.32's, or 6.18's (``Machine(kernel="6.18")``:
    no max_kernel_pages; max_page_sharing, use_zero_pages, smart_scan,
    advisor_mode -- read as sysfs prints it, "[none] scan-time" --,
    general_profit ...).  Reads come from the cluster's memory; a write is
    ``uksm ctl KEY=VALUE``: checked first as the kernel's store checks it
    (ValueError for EINVAL or ERANGE, OSError EBUSY for max_page_sharing or
    merge_across_nodes while pages are shared, PermissionError for a
    read-only counter, KeyError for a name the kernel has no file for:
    nothing written), and ``run`` returns once ksmd has acted on it (run=2:
    all unmerged)."""

    _FIELDS = dict(KSM_FIELDS)
    _FIELDS_618 = {n: w for n, w in KSM_FIELDS_618 if w >= 0 and n != "advisor_mode"}

    def __init__(self, m: "Machine") -> None:
        self._m = m

    def _modern(self) -> bool:
        return bool(self._m._t().cl.modern)

    def _name(self, key: Any) -> str:
        if not isinstance(key, str):
            raise TypeError(f"ksm knob names are strings (got {type(key).__name__})")
        modern = self._modern()
        if key not in ctl_names(modern):
            raise KeyError(missing_file(key, modern))
        return key

    def __getitem__(self, key: str) -> Any:
        key = self._name(key)
        cl = self._m._t().cl
        idx = (self._FIELDS_618 if cl.modern else self._FIELDS).get(key)
        if idx is not None:
            return int(cl.q[idx])
        if cl.modern and key in ("general_profit", "advisor_mode"):  # computed at each read, as sysfs
            return ksm_block_618(cl.q)[key]  # type: ignore[literal-required]
        return dict(ctl_values(read_state(cl)))[key]

    def __setitem__(self, key: str, value: Any) -> None:
        key = self._name(key)
        cl = self._m._t().cl
        rw = writable(cl.modern)
        if key not in rw:
            raise PermissionError(f"{key}: a read-only counter (EACCES); writable: {', '.join(rw)}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{key}: the value must be an int or a string (got {type(value).__name__})")
        try:
            validate_knob(key, value, cl.nframes, cl=cl)
        except KnobError as e:
            if e.errno_name == "EBUSY":
                raise OSError(errno.EBUSY, str(e)) from None
            raise ValueError(str(e)) from None
        self._m._request({"op": "ctl", "knobs": [[key, value]]}, f"ksm[{key!r}] = {value!r}")

    def __delitem__(self, key: str) -> None:
        raise PermissionError(f"{self._name(key)}: knobs cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(ctl_names(self._modern()))

    def __len__(self) -> int:
        return len(ctl_names(self._modern()))

    def counters(self) -> dict[str, int]:
        """The four counters the KSM tests check, read together."""
        return {k: self[k] for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                     "pages_volatile")}

    def __repr__(self) -> str:
        if self._m._tr is None:
            return f"<uksm.Ksm of machine {self._m.name}: closed>"
        return f"Ksm({dict(self)!r})"


# ---- tasks ------------------------------------------------------------------------------------

class Task:
    """A programmable task (``m.task(...)``): a worker process with one
    address space of ``pages`` pages; each method runs inside it, through
    the emulated MMU and system calls, and returns when done.  Addresses
    are byte offsets into its pages (page i at ``i * 4096``)."""

    def __init__(self, m: "Machine", tid: str, pid: int = 0, pages: int = 0, mm: int = 0,
                 programmable: bool = True) -> None:
        self._m = m
        self.id = tid
        self.programmable = programmable    # False: a built-in worker (m.spawn)
        self.pid = pid
        self.pages = pages
        self.mm = mm
        self.path: str | None = None    # __ksm_exit path, once exited or killed

    def __repr__(self) -> str:
        state = (f"exited ({self.path})" if self.path is not None else
                 "alive" if self._m._tr is not None else "stopped (its machine is closed)")
        kind = "" if self.programmable else " built-in"
        return f"<uksm.Task {self.id}{kind} pid {self.pid} {self.pages} pages {state}>"

    def _cmd(self, cmd: str, what: str, **kw: Any) -> dict[str, Any]:
        if not self.programmable:
            raise TypeError(f"{self.id}.{what}: {self.id} is a built-in worker (m.spawn): it takes "
                            f"no commands, only kill, arm, stat and pagemap (a W+fork workload "
                            f"forks by itself)")
        return self._m._request({"op": "task", "task": self.id, "cmd": cmd, **kw},
                                f"{self.id}.{what}")

    @staticmethod
    def _b64(data: Any, what: str) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{what} must be bytes (got {type(data).__name__})")
        return base64.b64encode(bytes(data)).decode()

    def fill(self, value: int | bytes, first: int = 0, count: int | None = None) -> None:
        """Write pages first..first+count-1 (default: to the end): ``value``
        an int 0..255 (every byte) or 4096 bytes (each page)."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            self._cmd("fill", "fill", page=self._b64(value, "value"), first=first, count=count)
        else:
            self._cmd("fill", "fill", value=value, first=first, count=count)

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at byte offset ``addr`` (faults, COW breaks)."""
        self._cmd("write", "write", addr=addr, data=self._b64(data, "data"))

    def read(self, addr: int, n: int) -> bytes | None:
        """Load ``n`` bytes at byte offset ``addr`` (None inside ``with
        m.race():``, where it does not wait)."""
        ans = self._cmd("read", "read", addr=addr, n=n)
        return None if ans.get("pending") else base64.b64decode(ans["data"])

    def madvise(self, first: int, count: int, advice: str) -> int | None:
        """madvise(pages first..first+count-1, MERGEABLE | UNMERGEABLE |
        DONTNEED); returns the pages unmerged (UNMERGEABLE), else 0 (None
        inside ``with m.race():``)."""
        ans = self._cmd("madvise", "madvise", first=first, count=count, advice=advice)
        return None if ans.get("pending") else int(ans["unmerged"])

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int | None:
        """prctl(2) in the task, as the machine's kernel has it.  Under 6.18
        (6.4, d7597f59d1d3) PR_SET_MEMORY_MERGE (67): ``arg2`` 1 makes every
        area of the task mergeable, now and later (new mappings, and a
        child of ``fork()`` inherits it), 0 unmerges every area and clears
        VM_MERGEABLE on all of them (24139c07f413); PR_GET_MEMORY_MERGE
        (68) returns 0 or 1.  OSError EINVAL for arg3..arg5 not 0 (and
        arg2 for 68), for any other option, and for both under 2.6.32,
        which has no such option.  Returns 0 (or 68's answer); None inside
        ``with m.race():``."""
        ans = self._cmd("prctl", "prctl", option=option, arg2=arg2, arg3=arg3, arg4=arg4, arg5=arg5)
        return None if ans.get("pending") else int(ans["ret"])

    def fork(self) -> "Task":
        """fork(2): a new programmable task whose address space is this
        one's copy (2.6.32's dup_mmap: the same VMAs, every page shared
        copy-on-write -- write-protected in both, KSM pages mapped as they
        are --, and, if this task's mm is in KSM, the child's too: ksm_fork's
        __ksm_enter).  A write in either breaks COW for that one only.
        Returns the child once it runs.  OSError: EAGAIN when the machine
        has no room for one more task (``max_tasks``), ENOMEM when the copy
        cannot get its page table -- this task goes on as it was; TaskDied
        when a fatal signal came during the fork (-ERESTARTNOINTR: this
        task exits)."""
        ans = self._cmd("fork", "fork")
        t = Task(self._m, ans["task"], int(ans["pid"]), int(ans["pages"]), int(ans["mm"]))
        self._m._tasks[t.id] = t
        self._m._pids.append(t.pid)
        return t

    def pagemap(self, first: int = 0, count: int | None = None) -> list[dict[str, Any]]:
        """Pages first..first+count-1 (default: to the end), one dict each,
        as /proc/PID/pagemap, /proc/kpageflags and /proc/kpagecount tell
        them: ``present``, ``frame`` (the emulated PFN, None when not
        present), ``ksm`` (KPF_KSM), ``write_protected`` (the PTE is
        read-only: a KSM page, or shared copy-on-write after a fork) and
        ``mapcount`` (the PTEs mapping the frame, in every task).
        ValueError for a range outside the task's pages."""
        ans = self._m._request({"op": "task_pagemap", "task": self.id, "first": first,
                                "count": count}, f"{self.id}.pagemap")
        return list(ans["pages"])

    def stat(self) -> dict[str, Any]:
        """/proc/PID/ksm_stat of the machine's kernel, then ``rss``.  Under
        2.6.32: ksm_rmap_items, ksm_merging_pages.  Under 6.18 the file's six
        fields (fs/proc/base.c proc_pid_ksm_stat): ksm_rmap_items,
        ksm_zero_pages, ksm_merging_pages, ksm_process_profit (ints: the
        profit may be negative), ksm_merge_any and ksm_mergeable ("yes" or
        "no", as the file prints them)."""
        from uksm.kernel.ksm_stat import KSM_STAT_618, YES_NO
        ans = self._m._request({"op": "task_stat", "task": self.id}, f"{self.id}.stat")
        names = KSM_STAT_618 if "ksm_merge_any" in ans else ("ksm_rmap_items", "ksm_merging_pages")
        return {k: (str(ans[k]) if k in YES_NO else int(ans[k])) for k in (*names, "rss")}

    def verify(self) -> int:
        """Read back every page; IntegrityError if one does not hold what
        was written.  Returns the pages checked."""
        ans = self._cmd("verify", "verify")
        if ans.get("pending"):
            return 0
        if ans["mismatches"]:
            raise IntegrityError(f"task {self.id}: {ans['mismatches']} of {ans['pages']} pages do "
                                 f"not hold what was written")
        return int(ans["pages"])

    def exit(self) -> str | None:
        """Exit (verify, then exit_mm through the exit policy's path).
        Returns the __ksm_exit path: "fast", "slow", "legacy", or "none"
        (ksmd had already freed its slot).  Inside ``with m.race():`` it
        returns None at once; ``path`` is set at the block's end."""
        ans = self._cmd("exit", "exit")
        if ans.get("pending"):
            return None
        self.path = str(ans["path"])
        if ans["mismatches"]:
            raise IntegrityError(f"task {self.id}: {ans['mismatches']} pages did not hold what "
                                 f"was written at its exit")
        return self.path

    def kill(self, sig: int | str = "KILL", at: str | None = None) -> str:
        """Kill the task (SIGKILL: the supervisor recovers its locks and
        runs its exit; SIGTERM: it exits through its own path), at once or,
        with ``at``, after driving it to that kill point.  Returns once its
        exit is done, with the __ksm_exit path it took."""
        if at is not None and not isinstance(at, str):
            raise TypeError(f"at must be a kill point name (got {type(at).__name__})")
        ans = self._m._request({"op": "task_kill", "task": self.id, "signal": _signame(sig), "at": at},
                               f"{self.id}.kill")
        self.path = str(ans["path"])
        return self.path

    def arm(self, point: str, sig: int | str = "KILL") -> None:
        """Arm a task kill point without driving it there: the task dies
        when a later command passes it (that command raises TaskDied)."""
        self._m._request({"op": "arm", "point": point, "task": self.id, "signal": _signame(sig)},
                         f"{self.id}.arm")

    def disarm(self) -> None:
        self._m._request({"op": "disarm", "task": self.id}, f"{self.id}.disarm")


class MachineStats(TypedDict):
    """``m.stats()``: the machine's event counts (uksm's /proc/vmstat)."""
    started: int
    exited: int
    exit_fast: int
    exit_slow: int
    exit_legacy: int
    killed: int
    oom_killed: int
    reaped: int
    recoveries: int          # deaths recovered
    lock_recoveries: int     # locks taken over from the dead
    merges: int
    kill_points_hit: int


# ---- the machine ---------------------------------------------------------------------------------

class Machine:
    """A uksm cluster driven from a script.  ``Machine(...)`` boots one in
    this process (the options of ``uksm run``); leaving the ``with`` block
    (or ``close()``) stops every task through its own exit path, lets ksmd
    free what the slow paths left it, runs fsck and tears down, leaving
    nothing in /dev/shm and no process behind, also when the block
    raises.  ``m.report`` is then ``uksm run --json``'s object.

    ``kernel``: whose mm/ksm.c the machine emulates, ``"2.6.32"`` (the
    default) or ``"6.18"`` (its sysfs knobs and counters, /proc/PID/ksm_stat
    in ``t.stat()``, prctl PR_SET_MEMORY_MERGE; docs/KERNEL-MAP.md's 6.18
    column says what is emulated); ``m.kernel`` reads it back.

    ``Machine(deterministic=True, seed=S)`` runs the script on a
    controlled schedule instead (uksm.explorer): one process at a time,
    every choice drawn from ``seed``, every wait logical; the same script
    and seed give the same run.  ``Machine(schedule=...)`` replays the
    schedule an exploration or a deterministic run printed.  Both are
    small by default only in ``uksm.explore``; here the options are as
    given."""

    _tr: "_Local | _Remote | _Controlled | None"

    def __init__(self, *, frames: int = 1024, max_pages: int = 1024, max_tasks: int = 16,
                 exit_policy: str = "seed", hazards: list[str] | tuple[str, ...] = (), run: int = 1,
                 pages_to_scan: int = 100, sleep_millisecs: int = 20, mem_limit: int = 0,
                 name: str | None = None, log_dir: str | None = None,
                 hung_task_timeout: float = 5.0, oom_rule: str = "2.6.32", deterministic: bool = False,
                 seed: int = 0, schedule: str | None = None, kernel: str = "2.6.32") -> None:
        from uksm.proc.daemon import make_config
        from uksm.proc.run import RunOptions
        try:
            opts.cluster(opts.API, frames=frames, run=run, pages_to_scan=pages_to_scan,
                         sleep_millisecs=sleep_millisecs, exit_policy=exit_policy,
                         oom_rule=oom_rule, kernel=kernel, hazards=hazards,
                         hung_task_timeout=hung_task_timeout, workload="zero", max_tasks=max_tasks, max_pages=max_pages,
                         mem_limit=mem_limit)
        except opts.OptionError as e:
            raise _bad_option(e) from None
        if log_dir is not None and not os.path.isdir(log_dir):
            raise ValueError(f"log_dir {log_dir!r}: no such directory")
        self._o = RunOptions(workers=0, pages=max_pages, frames=frames, workload="script",
                             log_dir=log_dir, run=run, pages_to_scan=pages_to_scan,
                             sleep_ms=sleep_millisecs, exit_policy=exit_policy, oom_rule=oom_rule,
                             kernel=kernel, hazards=list(hazards), hung_task_timeout=float(hung_task_timeout))
        self.name = name or f"m{os.getpid()}x{next(_names)}"
        try:
            shm.check_cluster_name(self.name)
        except shm.UksmError as e:
            raise ValueError(str(e)) from None
        from uksm.proc.control import name_taken
        taken = name_taken(self.name)
        if taken is not None:
            raise ValueError(str(taken))
        if deterministic or schedule is not None:
            if type(seed) is not int:
                raise TypeError(f"seed must be an int (got {type(seed).__name__})")
            self._init()
            self._t0 = time.monotonic()
            self.log_dir = log_dir or ""
            self._boot_controlled(schedule, seed, log_dir, mem_limit, frames=frames, max_pages=max_pages,
                                  max_tasks=max_tasks, exit_policy=exit_policy, hazards=tuple(hazards),
                                  oom_rule=oom_rule, kernel=kernel, run=run, pages_to_scan=pages_to_scan,
                                  sleep_millisecs=sleep_millisecs)
            return
        spec = {"workers": 0, "pages": max_pages, "frames": frames, "workload": "zero", "seed": 0,
                "log_dir": None, "exit_policy": exit_policy, "oom_rule": oom_rule, "kernel": kernel,
                "hazards": list(hazards),
                "hung_task_timeout": float(hung_task_timeout), "churn_ms": 0, "run": run,
                "pages_to_scan": pages_to_scan, "sleep_ms": sleep_millisecs,
                "max_workers": max_tasks, "max_pages": max_pages}
        try:  # the pool and one largest task's page table fit in /dev/shm
            opts.room(opts.API, make_config(spec), max_pages)
        except opts.OptionError as e:
            raise _bad_option(e) from None
        self.log_dir = spec["log_dir"] = os.path.abspath(
            log_dir or tempfile.mkdtemp(prefix=f"uksm-{self.name}-"))
        self._init()
        self._t0 = time.monotonic()
        self._tr = _Local(self.name, spec)
        _open.add(self)
        if mem_limit:
            try:
                self.ksm["mem_limit"] = mem_limit
            except BaseException:
                self.close()
                raise

    def _boot_controlled(self, schedule: str | None, seed: int, log_dir: str | None, mem_limit: int,
                         **opts: Any) -> None:
        """This Machine's own controlled run: the schedule given (replayed
        exactly), or one drawn from ``seed`` (a seeded random choice at
        every step)."""
        from uksm.explorer.gate import Gate
        from uksm.explorer.schedule import BadSchedule, Replay, parse
        from uksm.explorer.strategies import Random
        from uksm.explorer.world import World
        if schedule is not None:
            try:
                sch = parse(schedule)
            except BadSchedule as e:
                raise ValueError(str(e)) from None
            opts.update(exit_policy=sch.exit_policy, hazards=sch.hazards, oom_rule=sch.oom_rule,
                        kernel=sch.kernel)
            chooser: Any = Replay(sch)
            o = controlled_options("script", seed=sch.seed, from_start=sch.from_start, log_dir=log_dir,
                                   kills=sch.kills, **opts)
        else:
            chooser = Random(seed).next()
            o = controlled_options("script", seed=seed, from_start=True, log_dir=log_dir, **opts)
            o.max_steps = 0   # bounded by the script's own (logical) waits
        gate = Gate()
        w = World(gate, o, chooser)
        try:
            w.boot()
        except BaseException:
            gate.close()
            raise
        self.name = w.name
        self._tr = _Controlled(w, int(opts["max_pages"]), owned=True)
        _open.add(self)
        if mem_limit:
            self.ksm["mem_limit"] = mem_limit

    @classmethod
    def _controlled(cls, world: Any, max_pages: int) -> "Machine":
        """A Machine on a run an exploration made (uksm.explore)."""
        m = cls.__new__(cls)
        m.name = world.name
        m._init()
        m._t0 = time.monotonic()
        m.log_dir = world.o.log_dir or ""
        m._tr = _Controlled(world, max_pages, owned=False)
        return m

    @property
    def kernel(self) -> str:
        """Whose mm/ksm.c this machine emulates: "2.6.32" or "6.18"
        (the cluster's header, as booted)."""
        return str(self._t().cl.kernel)

    @property
    def schedule(self) -> str | None:
        """Under a controlled schedule: the string that replays this run
        (``Machine(schedule=...)``, once it is over: after close());
        else None."""
        sched = self.report.get("schedule") if self.report is not None else None
        return sched if isinstance(sched, str) else None

    def race(self) -> "_Race":
        """Under a controlled schedule: the race phase begins here -- an
        exploration chooses from here on (``uksm.explore``), and inside
        ``with m.race():`` every call is issued without waiting for its
        operation (a task's commands still run in their order); the
        block's end waits for them all.  Failures inside the block (a task
        OOM-killed, the write of run interrupted) are not raised: the
        tasks' ``path``, the counters and ``m.report`` tell."""
        if not isinstance(self._t(), _Controlled):
            raise MachineError("race() needs a controlled schedule: Machine(deterministic=True), "
                               "Machine(schedule=...) or uksm.explore")
        self._request({"op": "race", "phase": "mark"}, "race")
        return _Race(self)

    def _init(self) -> None:
        self._tr = None
        # close()'s RunReport; an attached machine's down(): the daemon's DownReport;
        # a controlled run's: ControlledReport
        self.report: RunReport | DownReport | ControlledReport | None = None
        self.ksm = Ksm(self)
        self._tasks: dict[str, Task] = {}
        self._hung_raised = 0
        self._pids: list[int] = []
        # how errors name an option: "api" (max_pages), or "cli" (--max-pages)
        # for the shell verbs (uksm.cli.task), which are calls of this API
        self._by: opts.Spelling = opts.API

    @property
    def pids(self) -> list[int]:
        """Every process this Machine started: ksmd (and its restarts), its
        tasks and workers, and the writer tasks of ``run`` -- each ended by
        ``close()``.  (Attached: the tasks started through it.)"""
        t = self._tr
        if isinstance(t, _Local):
            self._pids = list(t.sup.started)
        return list(self._pids)

    @classmethod
    def attach(cls, name: str) -> "Machine":
        """Drive a cluster started with ``uksm up`` (its daemon serves the
        requests).  Closing detaches only: the cluster stays up (``down()``
        takes it down)."""
        if not isinstance(name, str):
            raise TypeError("the cluster name is a string")
        try:
            shm.check_cluster_name(name)
        except shm.UksmError as e:
            raise ValueError(str(e)) from None
        m = cls.__new__(cls)
        m.name = name
        m._init()
        m.log_dir = ""
        m._tr = None
        try:
            m._tr = _Remote(name)
        except shm.UksmError as e:
            raise MachineError(str(e)) from None
        return m

    # -- plumbing
    def _t(self) -> "_Local | _Remote | _Controlled":
        if self._tr is None:
            raise MachineClosed(f"machine {self.name!r} is closed")
        return self._tr

    def _request(self, req: dict[str, Any], what: str) -> dict[str, Any]:
        ans = self._t().request({**req, "by": self._by})
        if ans.get("ok"):
            return ans
        kind, msg = str(ans.get("kind", "")), str(ans.get("error", "request failed"))
        if kind == "hung":
            reports = self._t().hung()
            self._hung_raised = len(reports)  # raised here: a later wait does not raise it again
            raise HungTask(f"{what}: {msg}", reports)
        if kind == "errno":   # a system call's error (fork): the OSError os.fork would raise
            raise OSError(int(ans["errno"]), f"{what}: {msg}")
        exc = _KINDS.get(kind) or (ValueError if ans.get("status") == 2 else MachineError)
        err = exc(f"{what}: {msg}")
        err.answer = ans  # type: ignore[attr-defined]  # e.g. a partial spawn's "spawned"
        raise err

    def _check_hung(self, what: str) -> None:
        hung = self._t().hung()
        if len(hung) > self._hung_raised:
            new = hung[self._hung_raised:]
            self._hung_raised = len(hung)
            h = new[0]
            raise HungTask(f"while waiting for {what}: task {h['role']} pid {h['pid']} blocked on "
                           f"{h['lock']} for {h['waited_s']}s", new)

    # -- tasks
    def task(self, pages: int, mergeable: bool = True) -> Task:
        """Start a task with one address space of ``pages`` pages,
        MADV_MERGEABLE unless ``mergeable=False``; returns once its
        __ksm_enter is done."""
        ans = self._request({"op": "task_new", "pages": pages, "mergeable": mergeable}, "task")
        t = Task(self, ans["task"], int(ans["pid"]), int(ans["pages"]), int(ans["mm"]))
        self._tasks[t.id] = t
        self._pids.append(t.pid)
        return t

    def spawn(self, count: int = 1, pages: int = 64, workload: str = "vm", seed: int = 0,
              churn_ms: int = 0, wait: bool = True) -> list[Task]:
        """Start built-in workers (``uksm spawn``): each writes its workload
        (``identical``, ``unique``, ``zero``, ``dup:K``, ``volatile``, ``vm``)
        and keeps it alive, churning every ``churn_ms`` (refault, COW,
        re-advise).  They take no commands; ``kill`` (also ``at`` a point
        their work passes), ``arm`` and ``stat`` work.  Returns once they
        have written their pages (``wait=False``: at once)."""
        req = {"op": "spawn", "count": count, "pages": pages, "workload": workload, "seed": seed,
               "churn_ms": churn_ms, "wait": bool(wait)}
        try:  # checked here as the daemon checks it (its max_pages, on its side)
            opts.spawn(self._by, req, {"pages": pages, "workload": workload, "seed": seed,
                                       "churn_ms": churn_ms, "max_pages": opts.MAX_PAGES})
        except opts.OptionError as e:
            raise _bad_option(e) from None
        try:
            ans = self._request(req, "spawn")
        except MachineError as e:  # a partial spawn: the ones started are tasks all the same
            self._add_workers(getattr(e, "answer", {}).get("spawned", []))
            raise
        return self._add_workers(ans["spawned"])

    def _add_workers(self, spawned: list[dict[str, Any]]) -> list[Task]:
        out = [Task(self, w["worker"], int(w["pid"]), int(w["pages"]), int(w["mm"]),
                    programmable=False) for w in spawned]
        for t in out:
            self._tasks[t.id] = t
            self._pids.append(t.pid)
        return out

    def tasks(self, ready: bool = False) -> list[Task]:
        """The live tasks and workers (programmable or built-in); with
        ``ready``, only those done starting (a built-in worker: its pages
        written)."""
        ans = self._request({"op": "ping"}, "tasks")
        info = {str(t["task"]): t for t in ans.get("tasks", [])}
        return [self._handle(str(i), info.get(str(i))) for i in ans["ready" if ready else "workers"]]

    def stats(self) -> MachineStats:
        """The machine's event counts (uksm's /proc/vmstat): tasks started
        and exited, by __ksm_exit path, killed, OOM-killed, reaped; deaths
        recovered (and locks taken over), merges, kill points hit."""
        from uksm.kernel.layout import (
            S_EXIT_FAST,
            S_EXIT_LEGACY,
            S_EXIT_SLOW,
            S_EXITED,
            S_KILLED,
            S_LOCK_RECOVERIES,
            S_MERGES,
            S_OOM_KILLED,
            S_REAPED,
            S_RECOVERIES,
            S_STARTED,
        )
        cl = self._t().cl
        q = cl.q
        return MachineStats(started=int(q[S_STARTED]), exited=int(q[S_EXITED]),
                            exit_fast=int(q[S_EXIT_FAST]), exit_slow=int(q[S_EXIT_SLOW]),
                            exit_legacy=int(q[S_EXIT_LEGACY]), killed=int(q[S_KILLED]),
                            oom_killed=int(q[S_OOM_KILLED]), reaped=int(q[S_REAPED]),
                            recoveries=int(q[S_RECOVERIES]),
                            lock_recoveries=int(q[S_LOCK_RECOVERIES]), merges=int(q[S_MERGES]),
                            kill_points_hit=cl.kill_points_hit())

    def armed(self) -> str | None:
        """The ksmd point armed now (None once it has fired, or none armed)."""
        from uksm.kernel.layout import H_KSMD_POINT
        i = self._t().cl.q[H_KSMD_POINT]
        return killpoints.NAMES[i] if 0 <= i < len(killpoints.NAMES) else None

    def _handle(self, tid: str, info: dict[str, Any] | None = None) -> Task:
        """The Task for an id; one this Machine did not start (by the shell,
        on an attached machine) is made from ``info`` (ping's ``tasks``: its
        pid, pages, mm and kind), or bare: the daemon refuses what does not fit."""
        t = self._tasks.get(tid)
        if t is None and info is not None:
            t = self._tasks[tid] = Task(self, tid, int(info["pid"]), int(info["pages"]),
                                        int(info["mm"]), bool(info["programmable"]))
        return t or Task(self, tid)

    # -- waits
    def wait(self, predicate: Callable[[], Any], timeout: float = DEFAULT_WAIT_S,
             what: str | Callable[[], str] | None = None) -> Any:
        """Call ``predicate()`` until it returns something true, and return
        that.  WaitTimeout after ``timeout`` seconds (naming ``what``);
        HungTask at once if the watchdog reports a hung task meanwhile;
        MachineError at once if a task died of its own error before it was
        ready (what it wrote on stderr in the message): nothing it was to
        do will happen."""
        if not callable(predicate):
            raise TypeError("predicate must be callable (with no arguments)")
        timeout = self._timeout(timeout)
        t = self._t()
        label = what if isinstance(what, str) else getattr(predicate, "__name__", "a condition")
        if isinstance(t, _Controlled):   # logical: the run's steps and clock, no sleep
            end = t.now_s() + timeout
            while True:
                v = predicate()
                if v:
                    return v
                if t.now_s() > end:
                    detail = what() if callable(what) else label
                    raise WaitTimeout(f"timed out after {timeout}s of the run's logical time waiting "
                                      f"for {detail}")
                t.tick()
        end = time.monotonic() + timeout
        with t.blocking():
            while True:
                t.tick()
                self._check_hung(label)
                if t.failed():
                    raise MachineError(f"while waiting for {label}: {t.failed()}")
                v = predicate()
                if v:
                    return v
                if time.monotonic() > end:
                    detail = what() if callable(what) else label
                    raise WaitTimeout(f"timed out after {timeout}s waiting for {detail}")
                time.sleep(_POLL_S)

    def _timeout(self, timeout: Any) -> float:
        """A wait's timeout: a positive, finite number of seconds (NaN or
        infinity would wait for ever)."""
        try:
            return opts.seconds(opts.TIMEOUT, timeout, self._by)
        except opts.OptionError as e:
            raise _bad_option(e) from None

    def sleep(self, seconds: float) -> None:
        """Let the machine run for ``seconds`` (of the run's logical time
        under a controlled schedule), serving meanwhile."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"seconds must be a number >= 0 (got {seconds!r})")
        t = self._t()
        now: Callable[[], float] = t.now_s if isinstance(t, _Controlled) else time.monotonic
        end = now() + seconds
        self.wait(lambda: now() >= end, seconds + DEFAULT_WAIT_S, f"{seconds}s to pass")

    def now(self) -> float:
        """Seconds: the run's logical clock under a controlled schedule,
        else the monotonic clock."""
        t = self._t()
        return t.now_s() if isinstance(t, _Controlled) else time.monotonic()

    def wait_full_scans(self, n: int = 2, timeout: float = DEFAULT_WAIT_S) -> dict[str, int]:
        """Return once ``full_scans`` has advanced by ``n`` (what KSM test
        programs wait for), with the four counters then."""
        if type(n) is not int or n < 1:
            raise ValueError(f"n must be a whole number >= 1 (got {n!r})")
        timeout = self._timeout(timeout)
        self._needs_ksmd("full scans")
        start = self.ksm["full_scans"]
        self.wait(lambda: self.ksm["full_scans"] >= start + n, timeout,
                  lambda: f"{n} full scans (full_scans was {start}, is {self.ksm['full_scans']}; "
                          f"run {self.ksm['run']})")
        return self.ksm.counters()

    def wait_merged(self, timeout: float = DEFAULT_WAIT_S) -> dict[str, int]:
        """Return once the four counters have not changed over two full
        scans (merging has settled), with the counters."""
        timeout = self._timeout(timeout)
        self._needs_ksmd("merging to settle")
        samples: list[dict[str, int]] = []
        last = [-1]

        def settled() -> bool:
            fs = self.ksm["full_scans"]
            if fs != last[0]:
                last[0] = fs
                samples.append(self.ksm.counters())
            return len(samples) >= 3 and samples[-1] == samples[-2] == samples[-3]
        self.wait(settled, timeout, lambda: f"merging to settle (counters over the last full scans: "
                                            f"{samples[-3:]})")
        return samples[-1]

    def _needs_ksmd(self, what: str) -> None:
        if self.ksm["run"] != 1:
            raise MachineError(f"waiting for {what} with run={self.ksm['run']}: ksmd is not "
                               f"scanning (set m.ksm['run'] = 1)")

    # -- fault injection
    @staticmethod
    def kill_points() -> list[KillPoint]:
        """Every named kill point, with where it is (worker or ksmd)."""
        return [KillPoint(n, who, desc) for n, (who, desc) in killpoints.POINTS.items()]

    def arm(self, point: str, sig: int | str = "KILL", delay_ms: int | None = None,
            fail: bool = False) -> None:
        """Arm a ksmd point: when ksmd passes it inside some mm it kills
        that mm's owner (``sig``), or with ``delay_ms`` stops there that long
        (once), or with ``fail`` makes the allocation there fail (once, as
        the kernel's fail_page_alloc; ``ksmd_alloc_kpage`` only).  Task
        points are armed with ``Task.arm`` or ``Task.kill(at=)``."""
        req: dict[str, Any] = {"op": "arm", "point": point, "signal": _signame(sig)}
        if delay_ms is not None:
            req["delay_ms"] = delay_ms
        if fail:
            if point not in killpoints.FAIL_POINTS:
                raise ValueError(f"{point}: only {', '.join(killpoints.FAIL_POINTS)} can be made to fail")
            req["fail"] = True
        self._request(req, f"arm {point}")

    def disarm(self) -> None:
        """Disarm the ksmd point."""
        self._request({"op": "disarm"}, "disarm")

    def scan_cursor(self) -> Task | None:
        """The task whose mm ksmd's scan cursor (ksm_scan.mm_slot) is in."""
        ans = self._request({"op": "cursor"}, "scan_cursor")
        return None if ans["task"] is None else self._handle(str(ans["task"]))

    def fsck(self) -> FsckResult:
        """Every invariant of the live machine (ksm_thread_mutex held, the
        world stopped): ``{"ok": bool, "errors": [...]}``."""
        ans = self._request({"op": "fsck"}, "fsck")
        return {"ok": bool(ans["clean"]), "errors": list(ans["errors"])}

    # -- the end
    def close(self) -> RunReport | DownReport | ControlledReport | None:
        """Stop every task through its exit path, let ksmd free the slow
        paths' slots, fsck, tear down (attached: just detach).  Returns
        ``m.report``.  Closing twice is harmless."""
        t = self._tr
        if t is None:
            return self.report
        self._pids = self.pids
        self._tr = None
        _open.discard(self)
        if isinstance(t, _Remote):
            t.abandon()
            return self.report
        if isinstance(t, _Controlled):
            self.report = t.finish()
            return self.report
        from uksm.proc.run import build_report
        sup = t.sup
        try:
            t.tick()
            snap = sup.snapshot()
            end = sup.shutdown()
        except BaseException:
            t.abandon()
            raise
        finally:
            t.d.close_tasks()
            self._pids = list(sup.started)  # ksmd may have been restarted meanwhile
        self.report = report = build_report(self.name, self._o, self._t0, snap, end, self.log_dir)
        if any(isinstance(x._tr, _Local) for x in _open):
            # another machine of this process still logs: the log files are
            # the process's (uksm.host.log), closed with the last one
            sup.log.info("cluster_stop", duration_s=report["duration_s"], status=end["status"])
        else:
            sup.log_stop(end["status"])
        return report

    def down(self) -> RunReport | DownReport | ControlledReport:
        """Attached machines: take the cluster down (``uksm down``); returns
        its report.  A machine of this process: close()."""
        t = self._t()
        if isinstance(t, _Local):
            rep = self.close()
            assert rep is not None
            return rep
        # the daemon's JSON answer (handlers.DownReport): typed as it, unchecked, at the socket
        self.report = rep = cast("DownReport", self._request({"op": "down"}, "down"))
        self._tr = None
        t.abandon()
        return rep

    def __enter__(self) -> "Machine":
        self._t()
        return self

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        from uksm.host.lifeline import SecondSignal
        if exc_type is not None and issubclass(exc_type, SecondSignal) and self._tr is not None:
            # a second stop signal (uksm.host.lifeline): kill at once, remove every object
            self._pids = self.pids
            t, self._tr = self._tr, None
            _open.discard(self)
            t.abandon()
            return
        self.close()

    def __repr__(self) -> str:
        return f"<uksm.Machine {self.name} {'closed' if self._tr is None else 'running'}>"


class _Race:
    """``with m.race():`` -- the calls inside run concurrently."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def __enter__(self) -> Machine:
        self.m._request({"op": "race", "phase": "begin"}, "race")
        return self.m

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        if exc_type is None:
            ans = self.m._request({"op": "race", "phase": "end"}, "the race block")
            for tid, path in ans.get("paths", {}).items():
                if tid in self.m._tasks:
                    self.m._tasks[tid].path = path


def controlled_options(scenario: str, *, seed: int = 0, from_start: bool = False, log_dir: str | None = None,
                       kills: int = 0, frames: int = 64, max_pages: int = 16, max_tasks: int = 16,
                       exit_policy: str = "seed", hazards: tuple[str, ...] = (), oom_rule: str = "2.6.32",
                       run: int = 1, pages_to_scan: int = 8, sleep_millisecs: int = 20,
                       kernel: str = "2.6.32") -> Any:
    """A controlled run's options from a Machine's (small defaults: a run
    is repeated thousands of times)."""
    from uksm.explorer.world import Options
    try:
        opts.one_of(opts.EXIT_POLICY, exit_policy, opts.API, EXIT_POLICIES)
        opts.one_of(opts.OOM_RULE, oom_rule, opts.API, OOM_RULES)
        opts.one_of(opts.KERNEL, kernel, opts.API, KERNELS)
        opts.check_hazards(hazards, opts.API)
    except opts.OptionError as e:
        raise _bad_option(e) from None
    return Options(scenario=scenario, exit_policy=exit_policy, oom_rule=oom_rule, kernel=kernel,
                   hazards=tuple(hazards),
                   seed=seed, kills=kills, from_start=from_start, log_dir=log_dir,
                   config={"frames": frames, "va_pages": max_pages + 16, "max_tasks": max_tasks,
                           "max_mms": max_tasks + 2, "run": run, "pages_to_scan": pages_to_scan,
                           "sleep_ms": sleep_millisecs})


class Exploration:
    """What ``uksm.explore`` found: the CLI's ``--json`` fields as
    attributes (``explored``, ``distinct``, ``exhausted``, ``elapsed_s``,
    ``schedules_per_s``, ``first_failure_after``, ``failures``, ``status``)
    and ``replay(schedule)``, which runs one schedule again and returns its
    result."""

    def __init__(self, res: Any, replayer: Callable[[str], Any]) -> None:
        self._res = res
        self._replayer = replayer
        j: dict[str, Any] = res.as_json()
        self.json = j
        self.scenario: str = j["scenario"]
        self.strategy: str = j["strategy"]
        self.explored: int = j["explored"]
        self.distinct: int = j["distinct"]
        self.exhausted: bool = j["exhausted"]
        self.schedules_by_preemptions: dict[str, int] = j["schedules_by_preemptions"]
        self.elapsed_s: float = j["elapsed_s"]
        self.schedules_per_s: float = j["schedules_per_s"]
        self.cpu_ms_per_schedule: float = j["cpu_ms_per_schedule"]
        self.first_failure_after: int | None = j["first_failure_after"]
        self.failures: list[dict[str, Any]] = j["failures"]
        self.status: int = j["status"]
        self.outcome = res.outcome   # a replay's run (its steps, findings, report)
        from uksm.explorer.search import trace
        self.trace: list[str] = trace(res.outcome) if res.outcome is not None else []   # a replay's

    def replay(self, schedule: str) -> "Exploration":
        return self._replayer(schedule)

    def __repr__(self) -> str:
        return (f"<uksm.Exploration {self.scenario}: {self.explored} schedules, "
                f"{len(self.failures)} failure(s), exhausted {self.exhausted}>")


def _script(scenario_fn: Callable[[Machine], Any], mem_limit: int, max_pages: int) -> Callable[[Any], None]:
    """A scenario function as an explorer's script: a Machine on the run,
    the function, the Machine's close (every task exits, ksmd stops)."""
    def run(world: Any) -> None:
        m = Machine._controlled(world, max_pages)
        if mem_limit:
            m.ksm["mem_limit"] = mem_limit
        scenario_fn(m)
        t = m._tr
        assert isinstance(t, _Controlled)
        t.r.close()
    return run


def explore(scenario_fn: Callable[[Machine], Any], *, strategy: str = "dfs", preemptions: int = 2,
            schedules: int | None = None, kills: int | bool = False, depth: int = 3, seed: int = 0,
            time_limit: float | None = None, keep_going: bool = False, shrink: bool = True,
            from_start: bool = False, name: str | None = None, mem_limit: int = 0,
            progress: Callable[[Any], None] | None = None, **machine_options: Any) -> Exploration:
    """Explore the schedules of ``scenario_fn(m)``, a script on a
    ``uksm.Machine`` (``m.task(pages)``, ``t.fill``, ``t.madvise``,
    ``t.exit()``, ``m.ksm["run"] = 2``, ``m.wait_full_scans(n)``, ...):
    each run is a fresh machine under a controlled schedule, checked after
    the script and its close (deadlock, hung, oops, use after free,
    lockdep, fsck, data, leaks; and ``assertion``: the script raised).
    Choices begin at ``m.race()`` if the script calls it, else at once.
    ``strategy``: ``dfs`` (every schedule of at most ``preemptions``
    preemptions), ``pct`` (``depth``, ``seed``) or ``random`` (``seed``);
    ``schedules`` and ``time_limit`` bound the search; ``kills``: also
    choose SIGKILLs (True: one per schedule).  ``machine_options``: the
    Machine's (``frames``, ``exit_policy``, ``hazards``, ``oom_rule``, ``kernel``,
    ``run``, ``pages_to_scan``, ``max_pages``: small defaults).
    ``progress(result)`` is called every few seconds.  docs/EXPLORE.md."""
    from uksm.explorer.search import STRATEGIES
    from uksm.explorer.search import explore as run_explore
    if not callable(scenario_fn):
        raise TypeError("scenario_fn must be a function of a Machine")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    for k, v in (("preemptions", preemptions), ("depth", depth), ("seed", seed)):
        if type(v) is not int:
            raise TypeError(f"{k} must be an int (got {type(v).__name__})")
    label = str(name or getattr(scenario_fn, "__name__", "scenario"))
    script = _script(scenario_fn, mem_limit, int(machine_options.get("max_pages", 16)))
    o = controlled_options(label, seed=seed, from_start=from_start, kills=int(kills), **machine_options)
    res = run_explore(script, o, strategy, preemptions, depth, schedules, time_limit, keep_going, shrink,
                      progress)
    return Exploration(res, lambda text: replay(scenario_fn, text, name=label, mem_limit=mem_limit,
                                                **machine_options))


def replay(scenario_fn: Callable[[Machine], Any], schedule: str, *, log_dir: str | None = None,
           name: str | None = None, mem_limit: int = 0, strict: bool = True,
           hazards: tuple[str, ...] | list[str] | None = None, **machine_options: Any) -> Exploration:
    """Run ``scenario_fn`` once under ``schedule`` (a string an exploration
    printed), exactly: ValueError if it does not parse, or if the run
    diverges from it (naming the step).  ``log_dir``: the run's JSON logs.
    ``strict=False``: take the schedule's choices where they fit and the
    default elsewhere -- the same choices on changed code (``hazards``
    given replaces the schedule's: the fixed code's control run)."""
    from uksm.explorer.schedule import BadSchedule, parse
    from uksm.explorer.search import replay as run_replay
    from uksm.explorer.world import Diverged
    try:
        s = parse(schedule)
    except BadSchedule as e:
        raise ValueError(str(e)) from None
    if hazards is not None:
        s.hazards = tuple(hazards)
    opts = dict(machine_options, exit_policy=s.exit_policy, hazards=s.hazards, oom_rule=s.oom_rule,
                kernel=s.kernel)
    o = controlled_options(name or s.scenario, seed=s.seed, from_start=s.from_start, kills=s.kills,
                           **opts)
    script = _script(scenario_fn, mem_limit, int(machine_options.get("max_pages", 16)))
    try:
        res = run_replay(script, s, log_dir=log_dir, strict=strict, config=o.config)
    except Diverged as e:
        raise ValueError(str(e)) from None
    return Exploration(res, lambda text: replay(scenario_fn, text, log_dir=log_dir, name=name,
                                                mem_limit=mem_limit, **machine_options))


__all__ = ["Machine", "Task", "KillPoint", "Exploration", "explore", "replay", "MachineError", "MachineClosed",
           "WaitTimeout", "HungTask", "TaskExited", "TaskDied", "SegFault", "IntegrityError", "KillPointMissed",
           "MachineStats"]
