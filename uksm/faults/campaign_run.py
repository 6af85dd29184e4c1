"""One run of a campaign: a ``uksm inject`` (or ``uksm run`` when it has
no kills) in its own cluster, its own log folder and its own process group,
turned into one result line.

The same function, :func:`execute_run`, is what both engines execute: a
thread of the local pool calls it, and a Ray task calls it on whichever
node Ray picked.  It does not run ``uksm inject`` itself but through a
*guard* (``python -m uksm.faults.campaign_run --guard``), a small process
that owns the run's lifetime:

- the run is started in a new session (its own process group: the
  supervisor, ksmd and the workers), so a crash or a hang of the run is
  contained, and the whole group can be killed at once;
- the guard asks the kernel for ``PR_SET_PDEATHSIG``: if the process that
  started it dies (a Ray worker killed, its node drained, the campaign
  interrupted), the guard gets SIGTERM, kills the run's group, removes the
  run's POSIX objects (``uksm cleanup --cluster``) and its log folder, so a
  retry of the run elsewhere starts from nothing and nothing is left here;
- a run that outlives its timeout is killed the same way and reported as
  ``timeout``, with its logs kept.

The command that reproduces a run on one machine is the ``uksm`` command
the guard ran, minus ``--cluster``/``--log-dir``/``--json``/``--quiet``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from uksm.host import pyexec
from uksm.logs.campaign import lock_recoveries_by_lock

if TYPE_CHECKING:  # (the guard process does not import the supervisor's side)
    from uksm.faults.inject import InjectExits, RunOutput
    from uksm.proc.supervisor import FsckResult

#: the parameters that define a run (and its id); the order is the order
#: of the options in its command
PARAMS = ("cmd", "seed", "point", "signal", "policy", "hazards", "workload", "kills",
          "workers", "pages", "kernel")

#: what a run's exit status means (uksm's statuses, plus the guard's own)
STATUS_NAMES = {0: "clean", 1: "error", 2: "usage", 3: "hung", 4: "integrity",
                124: "timeout", 143: "aborted"}
EXIT_TIMEOUT, EXIT_ABORTED = 124, 143
PR_SET_PDEATHSIG = 1


class RunParams(TypedDict):
    """A run of a campaign: the keys of PARAMS (``campaign.sweep`` makes them)."""
    cmd: str             # inject, or run (no kills)
    seed: int
    point: str           # "none" for a run
    signal: str          # "none" for a run
    policy: str
    hazards: list[str]
    workload: str
    kills: int           # requested
    workers: int
    pages: int
    kernel: NotRequired[str]   # "6.18"; absent under 2.6.32 (its run ids as before)


class CampaignLine(RunParams):
    """One line of a campaign's output file (``execute_run``): the run's
    parameters, what became of it, and how to reproduce it.  ``kills`` is
    the kills delivered (the parameter's, requested, is in ``command``)."""
    run_id: str
    status: str          # STATUS_NAMES'
    exit_code: int
    recoveries: int
    lock_recoveries: int
    exits: InjectExits
    fsck_ok: bool        # the final fsck and the live one after the kills
    fsck_errors: list[str]
    mismatches: int
    pages_verified: int
    hung_tasks: int
    leftovers: int
    errors: list[str]
    duration_s: float
    command: str
    # set once the guard has returned (not for a run aborted in this process)
    node: NotRequired[str]
    cluster: NotRequired[str]
    ended: NotRequired[float]
    lock_recoveries_by_lock: NotRequired[dict[str, int]]
    stderr_tail: NotRequired[str]       # a run not clean: its stderr's end
    logs: NotRequired[str | None]       # its log folder, if kept


def run_id(params: RunParams) -> str:
    """A stable id from the parameters alone (not from the campaign, the
    order or the engine): the key of ``--resume``."""
    canon = json.dumps({k: v for k, v in params.items() if k in PARAMS}, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha1(canon.encode()).hexdigest()[:12]


def uksm_args(params: RunParams) -> list[str]:
    """The ``uksm`` arguments of a run (without cluster, logs and output)."""
    p = params
    args = [p["cmd"]]
    if p["cmd"] == "inject":
        args += ["--kills", str(p["kills"]), "--point", p["point"], "--signal", p["signal"]]
    args += ["--seed", str(p["seed"]), "--exit-policy", p["policy"], "--workload", p["workload"],
             "--workers", str(p["workers"]), "--pages", str(p["pages"])]
    for h in p["hazards"]:
        args += ["--hazard", h]
    if "kernel" in p:
        args += ["--kernel", p["kernel"]]
    return args


def reproduce(params: RunParams) -> str:
    """The one-machine command that reproduces the run."""
    return " ".join(["uksm", *uksm_args(params)])


# -- the guard (a process of its own) --------------------------------------------
def guard_main(argv: list[str]) -> int:
    """``--guard PARENT_PID CLUSTER LOG_DIR TIMEOUT -- uksm ARGS...``:
    run ``uksm ARGS`` in a new session, stdout passed through, stderr into
    LOG_DIR/stderr.txt; see the module docstring.

    Two processes: a *stub*, the child of whoever started the guard, that
    only waits, and the guard proper, its child.  Ray SIGKILLs a worker's
    direct children when the worker exits (``kill_child_processes_on_
    worker_exit``, on by default): that kills the stub, and the stub's
    death (PDEATHSIG SIGTERM) tells the guard to abort the run and clean
    up.  The stub dies with its own parent (PDEATHSIG SIGKILL) and passes
    SIGTERM/SIGINT/SIGHUP on to the guard."""
    parent, cluster, log_dir, timeout = int(argv[0]), argv[1], argv[2], float(argv[3])
    cmd = argv[argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    stub = os.getpid()
    child = os.fork()
    if child:  # the stub
        def forward(signum: int, _f: Any) -> None:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, forward)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the prctl
            os.kill(child, signal.SIGTERM)
        while True:
            try:
                return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                continue
    aborted = False

    def on_term(_s: int, _f: Any) -> None:
        nonlocal aborted
        aborted = True
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_term)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != stub:  # the stub died before the prctl
        aborted = True
    with open(os.path.join(log_dir, "stderr.txt"), "wb") as err:
        proc = subprocess.Popen(pyexec.argv("uksm", *cmd), stdout=sys.stdout.fileno(),
                                stderr=err, start_new_session=True, env=pyexec.env())
    end = time.monotonic() + timeout
    status = None
    while status is None and not aborted and time.monotonic() < end:
        try:
            status = proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    if status is not None:
        return status
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor, ksmd and every worker
    except ProcessLookupError:
        pass
    proc.wait()
    from uksm.host import shm
    shm.remove_all(cluster)
    if aborted:  # the run will be retried (or resumed) from nothing: drop what it wrote
        shutil.rmtree(log_dir, ignore_errors=True)
        return EXIT_ABORTED
    return EXIT_TIMEOUT


# -- one run, as both engines execute it ----------------------------------------------
#: the guards this process is waiting on (the local engine runs several in threads)
_guards: set[int] = set()
_lock = threading.Lock()


def abort_all() -> None:
    """SIGTERM every guard of this process: each kills its run's process
    group, removes its cluster and its logs, and exits ``aborted``."""
    with _lock:
        pids = list(_guards)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def execute_run(params: RunParams, log_root: str, keep_logs: str,
                timeout: float) -> CampaignLine:
    """Run one campaign run to its end and return its result line.  A run
    that fails is a result (a status), never an exception: only the loss
    of this process (or its node) makes the engine retry it."""
    rid = run_id(params)
    # the cluster name carries this process's pid: a retry on the same node
    # never collides with what a killed attempt's guard is still removing
    cluster = f"c{rid}-{os.getpid()}"
    log_dir = os.path.join(os.path.abspath(log_root), rid)
    shutil.rmtree(log_dir, ignore_errors=True)  # a lost attempt's
    os.makedirs(log_dir)
    argv = [*uksm_args(params), "--cluster", cluster, "--log-dir", log_dir, "--json", "--quiet"]
    t0 = time.monotonic()
    g = subprocess.Popen(pyexec.argv("uksm.faults.campaign_run", "--guard",
                                     str(os.getpid()), cluster, log_dir, str(timeout), "--", *argv),
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=pyexec.env(),
                         start_new_session=True)  # a terminal's Ctrl-C is the campaign's to handle
    with _lock:
        _guards.add(g.pid)
    try:
        out = _wait(g)
        res = _result(params, g.returncode, out, time.monotonic() - t0, cluster, log_dir, keep_logs)
    except KeyboardInterrupt:
        # ray.cancel() raises KeyboardInterrupt in the task (between bytecodes:
        # hence _wait's short waits): the guard aborts the run (its cluster,
        # its logs); the run is not a result, whatever point it had reached
        g.send_signal(signal.SIGTERM)
        g.communicate()
        shutil.rmtree(log_dir, ignore_errors=True)
        res = result_line(params, EXIT_ABORTED, None, time.monotonic() - t0)
    finally:
        with _lock:
            _guards.discard(g.pid)
    return res


def _wait(g: subprocess.Popen[str]) -> str:
    """The guard's stdout, once it exits; in short waits, so that an
    asynchronous exception (a cancel) is seen while the run goes on."""
    while True:
        try:
            out, _ = g.communicate(timeout=0.5)
            return out
        except subprocess.TimeoutExpired:
            continue


def _result(params: RunParams, code: int, out: str, duration: float, cluster: str,
            log_dir: str, keep_logs: str) -> CampaignLine:
    report: RunOutput | None
    try:  # (the run's JSON, trusted to be its report: json.loads is untyped)
        report = json.loads(out) or None
    except json.JSONDecodeError:
        report = None
    # the guard killed by a signal: the run was stopped from outside, not a result
    res = result_line(params, EXIT_ABORTED if code < 0 else code, report, duration)
    res["node"], res["cluster"] = socket.gethostname(), cluster
    # for uksm campaign report: when it ended, and its lock recoveries by lock (from its log)
    res["ended"] = round(time.time(), 3)
    res["lock_recoveries_by_lock"] = lock_recoveries_by_lock(log_dir)
    if res["status"] != "clean":
        try:
            with open(os.path.join(log_dir, "stderr.txt"), errors="replace") as f:
                res["stderr_tail"] = f.read()[-2000:]
        except OSError:
            pass
    if keep_logs == "all" or (keep_logs == "failed" and res["status"] != "clean"):
        res["logs"] = log_dir
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
        res["logs"] = None
    return res


def result_line(params: RunParams, code: int, r: RunOutput | None, duration: float) -> CampaignLine:
    """The result of a run from its exit status and its JSON report (None
    when the run produced none: crashed, timed out).  Each block is read
    with a default: a report missing one still gives a line."""
    inj = r.get("inject") if r is not None else None
    w = r.get("workers") if r is not None else None
    integrity = r.get("integrity") if r is not None else None
    fsck: FsckResult = (r.get("fsck") if r is not None else None) or {"ok": False, "errors": []}
    live: FsckResult = (inj.get("live_fsck") if inj else None) or {"ok": True, "errors": []}
    status = STATUS_NAMES.get(code, "error")
    if code == 0 and not r:
        status = "error"  # exit 0 but no report: not a clean run
    return {
        "run_id": run_id(params), **params,
        "status": status, "exit_code": code,
        "kills": inj.get("kills", 0) if inj else 0,
        "recoveries": inj.get("recoveries", 0) if inj else 0,
        "lock_recoveries": inj.get("lock_recoveries", 0) if inj else 0,
        "exits": {"fast": w.get("exit_fast", 0) if w else 0, "slow": w.get("exit_slow", 0) if w else 0,
                  "legacy": w.get("exit_legacy", 0) if w else 0, "reaped": w.get("reaped", 0) if w else 0},
        "fsck_ok": bool(fsck.get("ok")) and bool(live.get("ok")),
        "fsck_errors": (fsck.get("errors", []) + live.get("errors", []))[:10],
        "mismatches": integrity.get("mismatches", 0) if integrity else 0,
        "pages_verified": integrity.get("pages_verified", 0) if integrity else 0,
        "hung_tasks": len(r.get("hung_tasks", [])) if r else 0,
        "leftovers": len(r.get("ipc_leftovers", [])) if r else 0,
        "errors": r.get("errors", [])[:10] if r else [],
        "duration_s": round(duration, 3),
        "command": reproduce(params),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guard"]:
        raise SystemExit(guard_main(sys.argv[2:]))
    print("usage: python -m uksm.faults.campaign_run --guard PARENT_PID CLUSTER LOG_DIR TIMEOUT -- "
          "uksm ARGS... (run by uksm campaign)", file=sys.stderr)
    raise SystemExit(2)
