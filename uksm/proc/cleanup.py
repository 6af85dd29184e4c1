"""``uksm cleanup``: end what is left of a cluster, then remove its objects.

A cluster whose supervisor died should have nothing alive (its children
are on the lifeline, ``uksm.host.lifeline``); but a child that outlived it
anyway (started by an older uksm, or by hand) would keep writing into
objects we are about to unlink, so cleanup ends the cluster's processes
first, then removes every object.

Which processes: the ones the cluster's own task table names (ksmd, the
workers, a run= writer), plus any of those whose command line names the
cluster.  A pid from the table is only signalled if its command line still
is that process's (``-m uksm.kernel.ksmd``, ``uksm.workers.worker`` or
``uksm.kernel.writer``, ``--cluster NAME``, ``--task ROW``): the process may have died long ago and its pid
gone to an unrelated one.  The supervisor itself (``--force`` on a live
cluster) must have started before the cluster was created
(``/proc/PID/stat`` start time against H_CREATED_NS), whatever its
command (any: a test may supervise from pytest): a reused pid starts after
its first owner died.
"""
from __future__ import annotations

import os
import signal
import time

from uksm.host import shm
from uksm.kernel.layout import (
    CTL_FIXED_END,
    H_CREATED_NS,
    H_MAGIC,
    H_MAX_TASKS,
    H_SUPERVISOR_PID,
    MAGIC,
    T_PID,
    T_STATE,
    TASK_SIZE,
    TS_FREE,
)

CHILD_MODULES = ("uksm.kernel.ksmd", "uksm.workers.worker", "uksm.kernel.writer")
GONE_WAIT_S = 10.0


def cmdline(pid: int) -> list[str]:
    """argv of ``pid`` ([] if it is gone, a zombie, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return []
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _arg(argv: list[str], opt: str) -> str | None:
    return argv[argv.index(opt) + 1] if opt in argv[:-1] else None


def is_child_of(argv: list[str], cluster: str, row: int | None = None) -> bool:
    """``argv`` is a ksmd or worker of ``cluster`` (on task ``row``)."""
    if "-m" not in argv[:-1] or argv[argv.index("-m") + 1] not in CHILD_MODULES:
        return False
    if _arg(argv, "--cluster") != cluster:
        return False
    return row is None or _arg(argv, "--task") == str(row)


def start_time_ns(pid: int) -> int:
    """When ``pid`` started (wall clock, ns; 0 if unknown): boot time plus
    /proc/PID/stat's starttime, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0
    return btime * 10**9 + ticks * 10**9 // os.sysconf("SC_CLK_TCK")


class Table:
    """What a cluster's control segment says about its processes."""

    def __init__(self, cluster: str) -> None:
        self.supervisor = 0
        self.created_ns = 0
        self.rows: dict[int, int] = {}   # task row -> pid
        try:
            seg = shm.attach_segment(cluster, "ctl")
        except (shm.UksmError, OSError, ValueError):
            return
        try:
            q = seg.q
            if len(q) <= CTL_FIXED_END or q[H_MAGIC] != MAGIC:
                return  # a boot that died half way: no table to trust
            self.supervisor = q[H_SUPERVISOR_PID]
            self.created_ns = q[H_CREATED_NS]
            for r in range(q[H_MAX_TASKS]):
                b = CTL_FIXED_END + r * TASK_SIZE
                if b + TASK_SIZE <= len(q) and q[b + T_STATE] != TS_FREE and q[b + T_PID] > 0:
                    self.rows[r] = q[b + T_PID]
        finally:
            seg.close()


def supervisor_is(pid: int, table: Table) -> bool:
    """``pid`` is still the cluster's supervisor, not a reused pid: it
    started before the cluster was created (a reused pid starts after its
    first owner died)."""
    started = start_time_ns(pid)
    return 0 < started <= table.created_ns + 10**9  # /proc's clock ticks: 10 ms; with margin


def cluster_children(cluster: str, table: Table) -> set[int]:
    """Live ksmd and workers of ``cluster``: from its table, each checked
    against its command line, and any other that names the cluster."""
    pids = {pid for row, pid in table.rows.items() if is_child_of(cmdline(pid), cluster, row)}
    me = os.geteuid()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in pids:
            try:
                if me and os.stat(f"/proc/{d}").st_uid != me:
                    continue
            except OSError:
                continue
            if is_child_of(cmdline(int(d)), cluster):
                pids.add(int(d))
    return pids


def end_processes(pids: set[int], timeout: float = GONE_WAIT_S) -> set[int]:
    """SIGKILL ``pids`` and wait for them to go; those still alive."""
    from uksm.kernel.cluster import pid_alive
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.02)
    return {p for p in pids if pid_alive(p)}


def cleanup(cluster: str, force: bool) -> tuple[list[str], list[int], str]:
    """End the cluster's processes, remove its objects.  Returns (objects
    removed, pids ended, why refused: '' if done)."""
    from uksm.kernel.cluster import pid_alive
    uid = shm.owner(cluster)
    if uid is not None and os.geteuid() not in (0, uid):
        return [], [], (f"cluster {cluster!r} belongs to {shm.user_name(uid)}: not yours to clean "
                        f"up (nothing done)")
    table = Table(cluster)
    sup = table.supervisor
    live_sup = bool(sup) and pid_alive(sup) and supervisor_is(sup, table)
    if live_sup and not force:
        return [], [], (f"cluster {cluster!r} is alive (supervisor pid {sup}): 'uksm down "
                        f"--cluster {cluster}' (or stop its 'uksm run'), or --force to kill it")
    ended: set[int] = set()
    if live_sup:
        ended |= {sup} - end_processes({sup})  # its children follow on the lifeline
    kids = cluster_children(cluster, table)
    left = end_processes(kids)
    ended |= kids - left
    if left:
        return [], sorted(ended), (f"cluster {cluster!r}: processes {sorted(left)} did not die "
                                   f"within {GONE_WAIT_S:.0f}s; its objects are kept")
    return shm.remove_all(cluster), sorted(ended), ""


__all__ = ["cleanup", "cluster_children", "Table", "is_child_of", "supervisor_is"]
