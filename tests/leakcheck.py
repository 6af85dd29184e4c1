"""What a test left behind: the machinery of the suite-wide leak fixture
(``no_leaks`` in conftest.py) and of the ``cluster`` fixture's check.

Only what this test session started counts, whatever its paths (a ksmd
started with ``--log-dir`` under pytest's ``tmp_path`` has "pytest" in its
command line and is still ours):

- a process is the session's when its environment carries the
  UKSM_TEST_SESSION marker of this session (inherited by everything a test
  starts; a nested pytest run extends it, ``OUTER/INNER``, so its processes
  are the outer session's too), or when its command line names
  (``--cluster NAME``) a cluster of this session;
- a cluster is the session's when its supervisor is this process or a
  marked one, or a marked process names it; a cluster whose live
  supervisor is someone else's, or that only someone else's processes
  name, is foreign: clusters other people run on the same machine meanwhile
  are not blamed on a test, and never touched;
- a cluster nobody runs any more (its supervisor dead, or none recorded:
  objects made by hand) is the session's only if its name carries the
  session's pid (``helpers.cname``: every name a test makes does) -- another
  session's leftovers, or objects it is about to check itself, appearing
  while a test runs here are neither blamed on the test nor unlinked.

On a leak the leaked processes are SIGKILLed first and waited for, then
the objects of the leaking clusters are unlinked (never those of a cluster
with a process still running: it could be using them), then the test
fails with the one message ``leak_message`` writes."""
from __future__ import annotations

import os
import re
import signal
import time

from helpers import cmdline, proc_stat
from uksm.host import shm
from uksm.kernel.cluster import pid_alive
from uksm.proc.control import recorded_supervisor

_OUTER = os.environ.get("UKSM_TEST_SESSION", "")
#: this session's marker, in the environment of everything it starts
SESSION = f"{_OUTER}/{os.getpid()}" if _OUTER else str(os.getpid())
os.environ["UKSM_TEST_SESSION"] = SESSION
SETTLE_S = 5.0     # processes and objects may take this long to go after a test
KILL_WAIT_S = 5.0  # a SIGKILLed process is gone (or a zombie) within this

Procs = dict[tuple[int, str], str]


def _marker(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"UKSM_TEST_SESSION="):
            return kv.split(b"=", 1)[1].decode(errors="replace")
    return None


def mine(pid: int) -> bool:
    """This process, or one whose environment carries this session's
    marker (or a nested session's)."""
    if pid == os.getpid():
        return True
    m = _marker(pid)
    return m is not None and (m == SESSION or m.startswith(SESSION + "/"))


def processes() -> Procs:
    """Every live (not zombie) process but this one: (pid, start time) ->
    command line.  The start time tells a reused pid from the old one."""
    out = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        st = proc_stat(int(d))
        if st is None or st[0] in ("Z", "X"):
            continue
        out[(int(d), st[19])] = cmdline(int(d))
    return out


def names_cluster(cmd: str, cluster: str) -> bool:
    return f"--cluster {cluster} " in cmd + " "


def cluster_of(obj: str) -> str:
    """The cluster a /dev/shm object belongs to (``uksm.C.ctl``, ``sem.uksm.C.daemon``)."""
    return (obj[4:] if obj.startswith("sem.") else obj).split(".")[1]


#: the pids (as cluster names carry them: mod 100000) of this session and
#: of the sessions it is nested in
SESSION_PIDS = [str(int(p) % 100000) for p in SESSION.split("/") if p.isdigit()]   # (an outer
#: marker may be a word: dev/mutation.sh's "mutationNNN")


def named_by_session(name: str) -> bool:
    return any(p in name for p in SESSION_PIDS)


def session_processes(procs: Procs, clusters: set[str]) -> Procs:
    """The session's processes among ``procs``: marked, or naming one of
    the session's ``clusters``."""
    return {k: c for k, c in procs.items()
            if mine(k[0]) or any(names_cluster(c, n) for n in clusters)}


def classify(clusters: set[str], procs: Procs) -> tuple[set[str], set[str]]:
    """Split cluster names into (the session's, foreign).  A cluster is
    the session's when its recorded supervisor (its creator, while it is
    being made: Cluster.create records it first) is a live process of this
    session; else when a process of this session names it; else when no
    process names it at all (left behind: its supervisor died)."""
    ours_, foreign = set(), set()
    for name in clusters:
        sup = recorded_supervisor(name)
        naming = [k for k, c in procs.items() if names_cluster(c, name)]
        if sup and pid_alive(sup):
            ours = mine(sup)
        elif any(mine(k[0]) for k in naming):
            ours = True
        else:
            # dead supervisor, nobody at all uses it: left behind by us, if we named it
            ours = not naming and named_by_session(name)
        (ours_ if ours else foreign).add(name)
    return ours_, foreign


def kill_and_wait(keys: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """SIGKILL, then wait until each is gone or a zombie; returns those
    still running after KILL_WAIT_S."""
    for pid, _st in keys:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + KILL_WAIT_S
    while True:
        now = processes()
        left = [k for k in keys if k in now]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


def own_test_objects() -> list[str]:
    """/dev/shm entries ``uksmtest.*`` (outside the ``uksm.`` namespace, so
    that no other session's fixture takes them) that carry this process's
    pid in their name: a lock test's semaphores."""
    me = re.compile(rf"(?<!\d){os.getpid()}(?!\d)")   # the whole number: not 12345 for 1234
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return [n for n in names if n.startswith(("uksmtest.", "sem.uksmtest.")) and me.search(n)]


def leak_message(procs: list[str], objs: list[str], still: list | None = None, why: str = "") -> str:
    """The one failure message of a leak (the leak fixture's and the
    cluster fixture's)."""
    return (f"test leaked processes {sorted(procs)} and/or POSIX objects {objs}"
            + (f"; still running after SIGKILL: {still}" if still else "") + why)


class Snapshot:
    """What existed before a test: the leak fixture compares with it."""

    def __init__(self) -> None:
        self.shm = set(shm.leftovers())
        self.own = set(own_test_objects())
        self.procs = set(processes())

    def leaks(self) -> str:
        """Wait up to SETTLE_S for what the test started to go; end and
        remove what is left of it; the failure message ("" if nothing)."""
        own = sorted(set(own_test_objects()) - self.own)
        for o in own:
            try:
                os.unlink(os.path.join("/dev/shm", o))
            except FileNotFoundError:
                pass
        deadline = time.monotonic() + SETTLE_S
        seen: dict[str, frozenset[str]] = {}
        while True:
            objs = sorted(set(shm.leftovers()) - self.shm)
            all_procs = {k: c for k, c in processes().items() if k not in self.procs}
            ours, _foreign = classify({cluster_of(o) for o in objs}, processes())
            # a leak stays put: a cluster whose objects changed since the last look
            # is being made or torn down right now (another session's, caught
            # between its ctl segment and the rest: no supervisor readable, nobody
            # naming it), and is neither blamed nor removed until it holds still
            now = {c: frozenset(o for o in objs if cluster_of(o) == c) for c in ours}
            ours = {c for c in ours if seen.get(c) == now[c]}
            seen = now
            objs = [o for o in objs if cluster_of(o) in ours]
            procs = session_processes(all_procs, ours)
            if (not procs and not objs and not now) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        still = kill_and_wait(list(procs))
        for name in sorted(ours):
            running = [k for k, c in processes().items() if names_cluster(c, name)]
            if running:   # never pull the memory from under a running process
                continue
            shm.remove_all(name)
        objs += own
        return leak_message(list(procs.values()), objs, still) if procs or objs else ""
