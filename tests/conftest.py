"""Suite-wide guards: every test is checked for leaked processes and POSIX
objects (a leak fails the test that caused it), and has a timeout
(pytest-timeout, default in pyproject.toml) so a deadlock fails fast.

Only what this test session started counts: processes carry the
UKSM_TEST_SESSION marker in their environment (inherited from here), and a
cluster's objects belong to the session when its supervisor is this
process, a marked one, or dead.  So clusters other people run on the same
machine meanwhile are not blamed on a test."""
from __future__ import annotations

import os
import signal
import time

import pytest

from uksm import shm

MARK = f"UKSM_TEST_SESSION={os.getpid()}"
os.environ["UKSM_TEST_SESSION"] = str(os.getpid())
# lockdep on in every process the suite starts (uksm.cluster.LOCKDEP)
os.environ["UKSM_LOCKDEP"] = "1"
MARKERS = ("uksm.ksmd", "uksm.workers.worker", "uksm.daemon", "-m uksm", "bin/uksm")


def _mine(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return MARK.encode() in f.read().split(b"\0")
    except OSError:
        return False


def uksm_processes() -> dict[int, str]:
    """Live uksm processes started by this test session (by command line)."""
    out = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or "pytest" in cmd or not any(m in cmd for m in MARKERS):
            continue
        if _mine(int(d)):
            out[int(d)] = cmd.strip()
    return out


def _cluster(obj: str) -> str:
    return (obj[4:] if obj.startswith("sem.") else obj).split(".")[1]


def _foreign(cluster: str, others: dict[int, str]) -> bool:
    """A cluster whose live supervisor is not of this session, or that a
    live process of someone else's names."""
    from uksm.cli import supervisor_pid
    from uksm.cluster import pid_alive
    pid = supervisor_pid(cluster)
    if pid and pid_alive(pid):
        return not _mine(pid)
    return any(f"--cluster {cluster} " in cmd + " " for cmd in others.values())


def _all_uksm_processes() -> dict[int, str]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "uksm" in cmd and not _mine(int(d)):
            out[int(d)] = cmd
    return out


def session_objects(before: set[str]) -> list[str]:
    new = sorted(set(shm.leftovers()) - before)
    others = _all_uksm_processes() if new else {}
    foreign = {c for c in {_cluster(o) for o in new} if _foreign(c, others)}
    return [o for o in new if _cluster(o) not in foreign]


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves a uksm process or a POSIX object behind."""
    shm_before = set(shm.leftovers())
    procs_before = set(uksm_processes())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        procs = {p: c for p, c in uksm_processes().items() if p not in procs_before}
        objs = session_objects(shm_before)
        if (not procs and not objs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in procs:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in {_cluster(o) for o in objs}:
        shm.remove_all(name)
    if procs or objs:
        pytest.fail(f"test leaked processes {sorted(procs.values())} and/or POSIX objects {objs}",
                    pytrace=False)
