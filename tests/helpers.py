"""Helpers shared by the tests: names, processes, the CLI, a cluster
booted in-process or with ``uksm up``, a run's events.

The one place for what more than one test file needs (no test file
imports another: tests/code/test_suite.py checks it).  The other shared
modules beside it: ``util_machine`` (an address space driven from the
test thread), ``planter`` (faults planted for the checkers to find),
``leakcheck`` (what a test left behind: the suite-wide leak fixture),
``locktable`` (a task table in a bytearray, for the lock protocol),
``logsynth`` (synthetic log folders) and ``tracecheck`` (a trace's checks)."""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uksm.kernel.cluster import Cluster, Config, pid_alive
from uksm.proc.control import process_line
from uksm.proc.supervisor import Supervisor

#: the project's root; TESTS: this folder (the tests are in its subfolders, by subsystem)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
#: this test session's pid, short: in every cluster name a test makes, so
#: that two sessions on one machine never collide
PID = os.getpid() % 100000


def cname(word: str) -> str:
    """A cluster name for this session: ``word`` and the session's pid."""
    return f"{word}{PID}"


# ---- /proc ------------------------------------------------------------------------------

def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (``state`` is
    [0], ``ppid`` [1], ``pgrp`` [2], ``starttime`` [19]), or None if the
    process is gone.  The name may hold spaces and parentheses: split after
    its last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode(errors="replace").split()
    except (OSError, IndexError):
        return None


def proc_state(pid: int) -> str:
    """R, S, D, T (stopped), Z (zombie), ...; "" once gone."""
    st = proc_stat(pid)
    return st[0] if st else ""


def gone_or_zombie(pid: int) -> bool:
    return proc_state(pid) in ("", "Z", "X")


def ppid(pid: int) -> int:
    st = proc_stat(pid)
    return int(st[1]) if st else 0


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[0] not in ("Z", "X") and int(st[2]) == pgid:
                out.append(int(d))
    return out


def cmdline(pid: int) -> str:
    """The command line, words joined by spaces ("" once gone)."""
    return process_line(pid)


# ---- a pytest session inside a test -------------------------------------------------------

#: what a nested session needs of this folder: the fixtures and their modules
SUPPORT = ("conftest.py", "helpers.py", "leakcheck.py")


def nested_session(tmp_path: Path, name: str, source: str, timeout: float,
                   *args: str) -> tuple[int, str]:
    """Run the test file ``source`` in a pytest session of its own, with
    this suite's conftest (a nested session: its marker extends ours, its
    leak fixture and skip rules are ours); its status and output."""
    import shutil
    import textwrap
    d = tmp_path / "inner"
    d.mkdir(exist_ok=True)
    for f in SUPPORT:
        shutil.copy(os.path.join(TESTS, f), d / f)
    (d / name).write_text(textwrap.dedent(source))
    p = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                   "--timeout", str(int(timeout - 20)), *args, str(d / name), "--rootdir", str(d)],
                  timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def teardown_error(text: str, test: str) -> str:
    """The message of ``test``'s error at teardown in a session's output."""
    section = text.split(f"ERROR at teardown of {test} ", 1)[1].split("\n", 1)[1]
    return section.split("\n_", 1)[0].split("\n===", 1)[0]


def failure_section(text: str, test: str) -> str:
    """What a session's output says under ``test``'s failure header
    (``____ test ____``, with its captured sections), up to the next test's."""
    head = re.search(rf"\n_+ {re.escape(test)} _+\n", text)
    assert head, f"no failure section for {test}"
    rest = text[head.end():]
    nxt = re.search(r"\n_{3,} \S+ _{3,}\n|\n={3,} ", rest)
    return rest[:nxt.start()] if nxt else rest


# ---- capabilities a test needs: probed, never assumed from the euid -----------------------

PROBES = {
    # private mount and network namespaces, a tmpfs on /dev/shm (test_lifecycle's
    # in_private_shm; a `default` cluster of its own: test_cluster_cmds)
    "no-mount-namespace": ["unshare", "-m", "-n", "--propagation", "private", "sh", "-c",
                           "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
    # a command as user nobody (test_lifecycle's other user)
    "no-setuid": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "true"],
}


@functools.cache
def lacking(key: str) -> str:
    """Why this machine cannot do what the probe ``PROBES[key]`` tries
    ("" if it can): the probe's own error, in one line."""
    try:
        p = subprocess.run(PROBES[key], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(PROBES[key][:1])}: {e}"
    if p.returncode == 0:
        return ""
    err = " ".join(p.stderr.split()) or f"status {p.returncode}"
    return f"`{' '.join(PROBES[key])}` failed: {err}"


def require(key: str) -> None:
    """Skip the test, with the probe's answer as the reason, if this
    machine lacks the capability ``key`` (one of conftest.ALLOWED_SKIPS)."""
    import pytest
    why = lacking(key)
    if why:
        pytest.skip(f"{key}: {why}")


# ---- a run's logs -----------------------------------------------------------------------

def log_events(log_dir: str | Path, *names: str, role: str | None = None) -> list[dict[str, Any]]:
    """The events of a run's log folder in time order (``uksm.logs.iter_events``),
    those named ``names`` (all if none) written by processes of ``role``
    (all if None)."""
    from uksm.logs import iter_events
    return [e for e in iter_events(log_dir)
            if (not names or e["event"] in names) and (role is None or e.get("role") == role)]


def rewrite_logs(src: str | Path, dst: str | Path, plant: Callable[[dict[str, list[dict[str, Any]]]], Any]
                 ) -> Path:
    """A copy of log folder ``src`` at ``dst`` in which ``plant`` edited the
    events of each file (file name -> its events), each file written back
    in mono_ns order, as a process writes it.  Returns ``dst``."""
    import shutil
    shutil.copytree(src, dst)
    d = Path(dst)
    files = {f.name: [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
             for f in d.glob("*.jsonl")}
    plant(files)
    for name, evs in files.items():
        evs.sort(key=lambda e: e["mono_ns"])
        (d / name).write_text("".join(json.dumps(e) + "\n" for e in evs))
    return d


def jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file that is not a log (a
    campaign's --out), blank lines skipped."""
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


class RecLog:
    """A logger for in-process tests that keeps what was logged: the
    events as (event, fields), whatever the level."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def __getattr__(self, _name: str) -> Any:
        return self.info


# ---- budgets: every wait ends before the test's own timeout ---------------------------------

#: when the running test's time is up for its body (conftest sets it from
#: the test's pytest-timeout, less a reserve for its fixtures' teardown);
#: None outside a test
DEADLINE: float | None = None


def budget(timeout: float) -> float:
    """``timeout``, cut to the time the running test has left: the budgets
    of a test's calls may add up to more than its timeout (each is what one
    call may take), and a hang is still ended by the call that waits on it
    (run_group kills the process group, wait_for says what it waited for),
    never by pytest-timeout, which leaves the hung processes behind."""
    if DEADLINE is None:
        return timeout
    return max(0.5, min(timeout, DEADLINE - time.monotonic()))


def run_group(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole
    group (a supervisor's ksmd and workers too), then fail."""
    t = budget(timeout)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=t)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        why = "" if t == timeout else f" (its budget {timeout}s cut to what the test had left)"
        raise AssertionError(f"{' '.join(argv)}: no answer within {t:.1f}s{why} (killed)")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


@contextmanager
def reaped(*procs: subprocess.Popen) -> Iterator[None]:
    """Client processes a test started itself: whatever the test's outcome,
    none outlives it (killed if still running, then waited for)."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def uksm(*args: str, timeout: float = 100, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``uksm ARGS`` as a user would (python -m uksm), capture output."""
    p = run_group([sys.executable, "-m", "uksm", *args], timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"uksm {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def run_json(*args: str, timeout: float = 100) -> tuple[dict[str, Any], int]:
    p = uksm("run", "--json", *args, timeout=timeout)
    try:
        return json.loads(p.stdout), p.returncode
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON on stdout (status {p.returncode}):\n{p.stdout}\n{p.stderr}")


_names = iter(range(1, 1 << 30))


def unique_name(prefix: str) -> str:
    """A cluster name of this test session's own: prefix, pid, a count."""
    return f"{prefix}{os.getpid() % 100000}x{next(_names)}"


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, step: float = 0.02, what: str = "") -> Any:
    """Wait for a condition (never a bare sleep): returns its value."""
    timeout = budget(timeout)
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(step)


@contextmanager
def booted(name: str, log_dir: str | None = None, **cfg: Any) -> Iterator[Supervisor]:
    """A cluster booted in this process (supervisor + ksmd), torn down
    after the test whatever happens."""
    sup = Supervisor(name, Config(**cfg), log_dir, quiet=True)
    try:
        sup.boot()
        yield sup
    finally:
        if sup.booted:
            sup.kill_all()
            sup.teardown()


def worker_ready(sup: Supervisor, ch: Any) -> bool:
    """Worker ``ch`` of an in-process supervisor has written its pages."""
    from uksm.kernel.layout import T_READY
    return bool(sup.cl.q[sup.cl.tbase(ch.row) + T_READY])


def echo_run(sup: Supervisor, value: int) -> None:
    """echo VALUE > run, by a writer task (for 2: it unmerges), as 2.6.32's
    run_store; the write done (util_machine.set_run: the test thread writes)."""
    r = sup.write_run(value, timeout=60)
    assert r["result"] == "done", r


def pump(sup: Supervisor, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """wait_for, running the supervisor's main-loop duties meanwhile."""
    def step() -> Any:
        sup.poll()
        sup.sweep()
        return pred()
    return wait_for(step, timeout, what=what)


def cluster_pids(name: str) -> list[int]:
    """Every live process of cluster ``name`` (daemon, ksmd, workers)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--cluster" in argv:
            i = argv.index(b"--cluster")
            if i + 1 < len(argv) and argv[i + 1] == name.encode() and pid_alive(int(d)):
                out.append(int(d))
    return out


class Up:
    """A cluster started with ``uksm up`` for one test."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_dir = log_dir
        self.info: dict[str, Any] = {}

    def __call__(self, *args: str, timeout: float = 50) -> subprocess.CompletedProcess:
        """``uksm ARGS --cluster NAME`` (the cluster option appended)."""
        return uksm(*args, "--cluster", self.name, timeout=timeout)

    def up(self, *args: str) -> dict[str, Any]:
        p = self("up", "--json", "--log-dir", str(self.log_dir), *args)
        assert p.returncode == 0, p.stderr
        self.info = json.loads(p.stdout)
        return self.info

    def json(self, *args: str, status: int = 0) -> dict[str, Any]:
        p = self(*args, "--json")
        assert p.returncode == status, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        return json.loads(p.stdout)

    def attach(self) -> Cluster:
        return Cluster.attach(self.name)


# ---- the host's KSM (tools/twin.py, tools/twin618.py) -------------------------------------

HOST_KSM = "/sys/kernel/mm/ksm"
#: what the twins must leave behind (the brief's defaults for the shared host)
RESTORED = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "max_page_sharing": "256",
            "stable_node_chains_prune_millisecs": "2000",
            "use_zero_pages": "0", "smart_scan": "1", "advisor_mode": "[none] scan-time"}


def host_ksm_missing() -> str | None:
    if not os.path.isdir(HOST_KSM):
        return f"no-host-ksm: {HOST_KSM} is missing (a kernel without CONFIG_KSM)"
    if os.geteuid() != 0:
        return "no-host-ksm: not root"
    if not os.path.exists("/proc/self/ksm_stat"):
        return "no-host-ksm: no /proc/PID/ksm_stat (a kernel before 6.1)"
    return None


def knobs() -> dict[str, str]:
    """The host's knobs, read under the lock every user of them takes."""
    with open("/tmp/hostksm.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        out = {}
        for k in RESTORED:
            if os.path.exists(os.path.join(HOST_KSM, k)):
                with open(os.path.join(HOST_KSM, k)) as g:
                    out[k] = g.read().strip()
        return out
