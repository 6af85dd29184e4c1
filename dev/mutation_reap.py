"""Reap what a mutant's tests left behind, between two mutants of a mutation
run (dev/mutation.sh), never in the suite.

mutmut runs each mutant's tests in a child it forks, and kills that child
on its CPU-time limit: the test's own cleanup (the ``booted`` context, the
leak fixture) never runs, so the mutant's ksmd, workers and supervisors
keep running -- spinning on a lock the dead test held -- and their POSIX
objects stay in /dev/shm.  mutation.sh therefore hooks this into the copy's
``pytest_sessionstart``: with one mutant at a time, whatever still carries
the run's marker (``UKSM_TEST_SESSION`` starts with the run's own mark) and
is not this process or one of its ancestors belongs to a previous mutant.

Only what is provably the run's is touched (other developers' clusters run
on the same machine): a process carrying the marker, and a cluster that
such a process names (``--cluster NAME``) or whose recorded supervisor is a
pid of the run (a mutant's child or a reaped process, listed in the run's
pid file) -- and a cluster's objects only once no process names it and its
supervisor is dead.

    python dev/mutation_reap.py MARK PIDFILE     (mutation.sh, at the end)
"""
from __future__ import annotations

import os
import re
import sys

import posix_ipc

KILL_WAIT_S = 5.0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
        if ")" not in stat:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _running(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return ")" in stat and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def marked(mark: str) -> dict[int, str]:
    """Running processes whose environment carries the run's marker:
    pid -> command line."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        for kv in _read(f"/proc/{d}/environ").split(b"\0"):
            if kv.startswith(b"UKSM_TEST_SESSION="):
                m = kv.split(b"=", 1)[1].decode(errors="replace")
                if (m == mark or m.startswith(mark + "/")) and _running(int(d)):
                    out[int(d)] = _read(f"/proc/{d}/cmdline").replace(b"\0", b" ").decode(errors="replace")
                break
    return out


def _naming(name: str) -> list[int]:
    pat = f"--cluster {name} "
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _running(int(d))
            and pat in _read(f"/proc/{d}/cmdline").replace(b"\0", b" ").decode(errors="replace") + " "]


def reap(mark: str, pidfile: str) -> list[str]:
    """Kill the run's leftover processes, unlink its dead clusters' objects;
    returns the clusters cleaned.  Records this process in ``pidfile``."""
    from uksm.host import shm
    from uksm.proc.cleanup import end_processes
    from uksm.proc.control import recorded_supervisor as supervisor_pid
    me = _ancestors()
    left = {p: c for p, c in marked(mark).items() if p not in me}
    names = {m for c in left.values() for m in re.findall(r"--cluster ([A-Za-z0-9_-]+)", c)}
    end_processes(set(left), KILL_WAIT_S)
    with open(pidfile, "a") as f:
        f.write("".join(f"{p}\n" for p in [os.getpid(), *left]))
    known = {int(x) for x in _read(pidfile).split() if x.isdigit()} - {os.getpid()}
    cleaned = []
    for name in shm.clusters_present():
        sup = supervisor_pid(name)
        if name not in names and sup not in known:
            continue   # not provably the run's
        if (sup and _running(sup)) or _naming(name):
            continue   # never pull the memory from under a running process
        shm.remove_all(name)
        cleaned.append(name)
    # test_lock_protocol's own semaphores (outside the uksm. namespace, no
    # cluster): /uksmtest.tlkp<pid>.<n>, the pid of the pytest that made them
    for n in os.listdir(shm.SHM_DIR):
        m = re.fullmatch(r"sem\.(uksmtest\.[a-z]+(\d+)\.\w+)", n)
        if m and int(m.group(2)) in known and not _running(int(m.group(2))):
            try:
                posix_ipc.unlink_semaphore("/" + m.group(1))
                cleaned.append(m.group(1))
            except posix_ipc.ExistentialError:
                pass
    return cleaned


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: mutation_reap.py MARK PIDFILE", file=sys.stderr)
        return 2
    cleaned = reap(argv[0], argv[1])
    if cleaned:
        print("mutation_reap: cleaned " + " ".join(cleaned))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
