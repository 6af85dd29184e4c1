"""Suite-wide guards: every test is checked for leaked processes and POSIX
objects (a leak fails the test that caused it), and has a timeout
(pytest-timeout, default in pyproject.toml) so a deadlock fails fast.

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
  are not blamed on a test, and never touched.

On a leak the fixture SIGKILLs the leaked processes first and waits until
they are gone, then unlinks the objects of the leaking clusters (never
those of a cluster with a process still running: it could be using them),
then fails the test."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# lockdep on in every process the suite starts, this one included: set
# before anything imports uksm.kernel.cluster, which reads it once
os.environ["UKSM_LOCKDEP"] = "1"

from helpers import Up, cluster_pids, uksm, wait_for
from uksm.host import shm
from uksm.kernel.cluster import pid_alive
from uksm.proc.control import recorded_supervisor

#: dev/checkers_off.py switches this fixture off (it then reports nothing),
#: to count the tests that notice
LEAK_CHECK_OFF = os.environ.get("UKSM_CHECKER_OFF") == "leak"
_OUTER = os.environ.get("UKSM_TEST_SESSION", "")
SESSION = f"{_OUTER}/{os.getpid()}" if _OUTER else str(os.getpid())
os.environ["UKSM_TEST_SESSION"] = SESSION
SETTLE_S = 5.0     # processes and objects may take this long to go after a test
KILL_WAIT_S = 5.0  # a SIGKILLed process is gone (or a zombie) within this


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _marker(pid: int) -> str | None:
    try:
        env = _read(f"/proc/{pid}/environ").split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"UKSM_TEST_SESSION="):
            return kv.split(b"=", 1)[1].decode(errors="replace")
    return None


def _mine(pid: int) -> bool:
    """This process, or one whose environment carries this session's
    marker (or a nested session's)."""
    if pid == os.getpid():
        return True
    m = _marker(pid)
    return m is not None and (m == SESSION or m.startswith(SESSION + "/"))


def _processes() -> dict[tuple[int, str], str]:
    """Every live (not zombie) process but this one: (pid, start time) ->
    command line.  The start time tells a reused pid from the old one."""
    out = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = _read(f"/proc/{d}/cmdline").replace(b"\0", b" ").decode(errors="replace")
            stat = _read(f"/proc/{d}/stat").decode(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] in ("Z", "X"):
            continue
        out[(int(d), stat[19])] = cmd.strip()
    return out


def _names_cluster(cmd: str, cluster: str) -> bool:
    return f"--cluster {cluster} " in cmd + " "


def _cluster(obj: str) -> str:
    return (obj[4:] if obj.startswith("sem.") else obj).split(".")[1]


def session_processes(procs: dict[tuple[int, str], str], clusters: set[str]) -> dict[tuple[int, str], str]:
    """The session's processes among ``procs``: marked, or naming one of
    the session's ``clusters``."""
    return {k: c for k, c in procs.items()
            if _mine(k[0]) or any(_names_cluster(c, n) for n in clusters)}


def classify(clusters: set[str], procs: dict[tuple[int, str], str]) -> tuple[set[str], set[str]]:
    """Split cluster names into (the session's, foreign).  A cluster is
    the session's when its recorded supervisor (its creator, while it is
    being made: Cluster.create records it first) is a live process of this
    session; else when a process of this session names it; else when no
    process names it at all (left behind: its supervisor died)."""
    from uksm.kernel.cluster import pid_alive
    mine, foreign = set(), set()
    for name in clusters:
        sup = recorded_supervisor(name)
        naming = [k for k, c in procs.items() if _names_cluster(c, name)]
        if sup and pid_alive(sup):
            ours = _mine(sup)
        elif any(_mine(k[0]) for k in naming):
            ours = True
        else:
            ours = not naming   # dead supervisor, nobody at all uses it: left behind by us
        (mine if ours else foreign).add(name)
    return mine, foreign


def _kill_and_wait(keys: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """SIGKILL, then wait until each is gone or a zombie; returns those
    still running after KILL_WAIT_S."""
    for pid, _st in keys:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + KILL_WAIT_S
    while True:
        now = _processes()
        left = [k for k in keys if k in now]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The temporary directory of every process the tests start (TMPDIR)
    and of this one (tempfile) is under pytest's basetemp, which pytest
    rotates: a Machine's or inject's log folder made with mkdtemp does not
    stay in /tmp after the run (a fresh user found 1,533 uksm-* folders)."""
    import tempfile
    d = str(tmp_path_factory.mktemp("tmp"))
    old_env, old = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = d, d
    try:
        yield
    finally:
        tempfile.tempdir = old
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


def _own_test_objects() -> list[str]:
    """/dev/shm entries ``uksmtest.*`` (outside the ``uksm.`` namespace, so
    that no other session's fixture takes them) that carry this process's
    pid in their name: a lock test's semaphores."""
    import re
    mine = re.compile(rf"(?<!\d){os.getpid()}(?!\d)")   # the whole number: not 12345 for 1234
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return [n for n in names if n.startswith(("uksmtest.", "sem.uksmtest.")) and mine.search(n)]


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves a uksm process or a POSIX object behind
    (the ``uksm.`` objects of its clusters, and the ``uksmtest.`` objects
    named with this process's pid that the in-process lock tests make)."""
    shm_before = set(shm.leftovers())
    own_before = set(_own_test_objects())
    procs_before = set(_processes())
    yield
    own = sorted(set(_own_test_objects()) - own_before)
    for o in own:
        try:
            os.unlink(os.path.join("/dev/shm", o))
        except FileNotFoundError:
            pass
    deadline = time.monotonic() + SETTLE_S
    seen: dict[str, frozenset[str]] = {}
    while True:
        objs = sorted(set(shm.leftovers()) - shm_before)
        all_procs = {k: c for k, c in _processes().items() if k not in procs_before}
        mine, foreign = classify({_cluster(o) for o in objs}, _processes())
        # a leak stays put: a cluster whose objects changed since the last look
        # is being made or torn down right now (another session's, caught
        # between its ctl segment and the rest: no supervisor readable, nobody
        # naming it), and is neither blamed nor removed until it holds still
        now = {c: frozenset(o for o in objs if _cluster(o) == c) for c in mine}
        mine = {c for c in mine if seen.get(c) == now[c]}
        seen = now
        objs = [o for o in objs if _cluster(o) in mine]
        procs = session_processes(all_procs, mine)
        if (not procs and not objs and not now) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    still = _kill_and_wait(list(procs))
    for name in sorted(mine):
        running = [k for k, c in _processes().items() if _names_cluster(c, name)]
        if running:   # never pull the memory from under a running process
            continue
        shm.remove_all(name)
    objs += own
    if (procs or objs) and not LEAK_CHECK_OFF:
        pytest.fail(f"test leaked processes {sorted(procs.values())} and/or POSIX objects {objs}"
                    + (f"; still running after SIGKILL: {still}" if still else ""), pytrace=False)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """A cluster name for one test, driven with ``uksm up`` (``helpers.Up``);
    always taken down: ``uksm down``, else SIGKILL and removal."""
    name = f"tc{os.getpid() % 10000}{request.node.name[5:11].replace('_', '')}{time.monotonic_ns() % 1000}"
    c = Up(name[:32], tmp_path)
    try:
        yield c
    finally:
        if shm.leftovers(c.name) or cluster_pids(c.name):
            try:
                uksm("down", "--cluster", c.name, timeout=40)
            except AssertionError:   # run_group's "no answer within 40s (killed)"
                pass
        for _ in range(3):
            pids = cluster_pids(c.name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # called at once, within this iteration
            wait_for(lambda: not any(pid_alive(p) for p in pids), 10, what="SIGKILLed processes")  # noqa: B023
        shm.remove_all(c.name)
