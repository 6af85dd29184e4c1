"""The OOM killer (mm/oom_kill.c: out_of_memory, select_bad_process).

Invoked by an allocating context that found no free frame.  Like the
kernel's, it kills at most one victim at a time: while a chosen victim that
still has its mm has not freed its memory (TIF_MEMDIE; here M_OOM_VICTIM
until its exit has unmapped its pages), it returns without killing, and the
allocator keeps waiting and retrying.

Which victims block a new choice depends on the kernel (``--oom-rule``):

- ``2.6.32``: exit_mm sets ``tsk->mm = NULL`` *before* mmput (kernel/exit.c),
  and select_bad_process skips "tasks which have already released their
  mm" (``if (!p->mm) continue;``) before it tests TIF_MEMDIE
  (2.6.32.67 mm/oom_kill.c).  A victim stuck inside mmput -- in
  __ksm_exit, say -- is passed over and another task is killed.  That is
  what Andrea's revert of the seed's placement counted on: "its memory
  won't be freed until a second victim has been selected".
- ``4.1``: oom_scan_process_thread (3.x to 4.1) tests TIF_MEMDIE first
  ("if (test_tsk_thread_flag(task, TIF_MEMDIE)) ... return OOM_SCAN_ABORT")
  and only then ``if (!task->mm) return OOM_SCAN_CONTINUE``; TIF_MEMDIE is
  cleared only after mmput returns.  A victim stuck in __ksm_exit blocks
  every further kill: the 4.1-stable hang of 2016.

Badness is each rule's own (``badness``): 2.6.32's starts from
``mm->total_vm`` -- the pages mapped, not what killing the task gives
back: a task whose pages are all one KSM page scores its full size --
then divides by CPU and run time and adjusts for nice and capabilities;
4.1's oom_badness counts RSS (and swap, none here).  Ties go to the first
task in the mm table (for_each_process: creation order).
"""
from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.kernel import sched
from uksm.kernel.layout import (
    A_FREE_TOP,
    H_OOM_RULE,
    MMS_LIVE,
    OOM_2632,
    R_WRITER,
    S_OOM_KILLED,
    TS_ALIVE,
    X_OOM,
    XS_ZAPPED,
)

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.locks import Task

OOM_SIGNAL = signal.SIGUSR1


def oom_killer(log: Any) -> Callable[["Cluster", "Task"], int]:
    """out_of_memory as an Allocator's ``oom_killer``, its ``oom_kill``
    event logged to ``log`` (the allocating process's logger)."""
    return lambda cl, task: out_of_memory(cl, task, log)


def children_mms(cl: "Cluster", pid: int) -> list[tuple[int, int]]:
    """(start_ns, mm row) of each child of task ``pid`` (forked by it)
    with an mm of its own still in use, oldest first (p->children's
    order).  Caller holds ksm_mmlist_lock."""
    kids = []
    for r in range(cl.max_tasks):
        t = cl.trow(r)
        if t.ppid == pid and t.state == TS_ALIVE and t.pid > 0 and t.mm:
            row = cl.mm_row(t.mm)
            if row >= 0 and cl.mrow(row).users and cl.mrow(row).owner_pid == t.pid:
                kids.append((t.start_ns, row))
    return sorted(kids)


def child_to_kill(cl: "Cluster", pid: int) -> int | None:
    """oom_kill_process's "Try to kill a child first" (2.6.32.67
    mm/oom_kill.c): the mm row of the first child of task ``pid`` (forked
    by it, oldest first: p->children's order) with an mm of its own
    still in use (oom_kill_task skips one without: "if (!p->mm) return
    1"); None when it has none.  4.1 sacrifices a child too (the one of
    highest badness): the oldest is taken under both rules.  Caller holds
    ksm_mmlist_lock."""
    kids = children_mms(cl, pid)
    return kids[0][1] if kids else None


# lib/int_sqrt.c's int_sqrt: the integer square root
def int_sqrt(x: int) -> int:
    return math.isqrt(x)


HZ = 1000           # CONFIG_HZ_1000
SHIFT_HZ = 10       # include/linux/timex.h, for HZ 1000
CAP_SYS_RAWIO, CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 17, 21, 24


def _proc_task(pid: int) -> tuple[int, float, int] | None:
    """(utime + stime in jiffies, seconds since it started, CapEff) of a
    real process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            cap = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) * HZ // tick       # utime + stime
    return cpu, uptime - int(fields[19]) / tick, cap              # starttime


def badness(total_vm: int, pid: int, children_vm: tuple[int, ...] = ()) -> int:
    """2.6.32's badness(p, uptime) for a task whose mm maps ``total_vm``
    pages, whose forked children with mms of their own map
    ``children_vm``, with the inputs the task's real process has
    (2.6.32.67 mm/oom_kill.c).  Left out: the cpuset test (no cpusets:
    every task's nodes overlap) and oom_adj (never set: 0).
    PF_OOM_ORIGIN's ULONG_MAX is the caller's (the run=2 writer)."""
    points = total_vm                        # "points = mm->total_vm;"
    for vm in children_vm:                   # "if (child->mm != mm && child->mm)"
        points += vm // 2 + 1                # "points += child->mm->total_vm/2 + 1;"
    t = _proc_task(pid)
    if t is None:
        return points
    jiffies, run_s, cap = t
    cpu_time = jiffies >> (SHIFT_HZ + 3)     # "CPU time is in tens of seconds"
    run_time = int(run_s) >> 10              # "and run time is in thousands of seconds"
    if cpu_time:
        points //= int_sqrt(cpu_time)
    if run_time:
        points //= int_sqrt(int_sqrt(run_time))
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) > 0:
            points *= 2                      # "Niced processes are most likely less important"
    except OSError:
        pass
    if cap & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE):
        points //= 4                         # "Superuser processes are usually more important"
    if cap & 1 << CAP_SYS_RAWIO:
        points //= 4                         # "direct hardware access"
    return points


def out_of_memory(cl: "Cluster", task: "Task", log: Any) -> int:
    """Kill the worst task unless a victim is already on its way out.
    Returns the victim's pid, or 0."""
    q = cl.q
    victim = None
    rule = q[H_OOM_RULE]
    task.lock(cl.mmlist)
    try:
        best = -1
        for r in range(cl.max_mms):
            m = cl.mrow(r)
            if not m.id:
                continue
            memdie = m.oom_victim and not m.exit_stage & XS_ZAPPED
            released = m.state != MMS_LIVE or m.users == 0  # tsk->mm == NULL
            if rule == OOM_2632:
                if released:
                    continue  # "if (!p->mm) continue;" comes first
                if memdie:
                    return 0  # a victim is still freeing its memory: wait for it
            else:
                if memdie:
                    return 0  # TIF_MEMDIE -> OOM_SCAN_ABORT, mm or not
                if released:
                    continue
            if m.owner_pid <= 0:
                continue
            if rule == OOM_2632:
                kids = tuple(cl.mrow(k).pages for _, k in children_mms(cl, m.owner_pid))
                score = badness(m.pages, m.owner_pid, kids)
            else:
                score = m.rss
            if score > best:
                best, victim = score, r
        # the writer of run=2 (uksm.kernel.writer): a user task with an mm, so a
        # candidate under both rules; TIF_MEMDIE on it blocks new kills
        # while it lives; with PF_OOM_ORIGIN it is chosen before anyone
        # (2.6.32 badness(): ULONG_MAX; 4.1: oom_task_origin -> SELECT)
        origin = -1
        chosen = 0
        for r in range(cl.max_tasks):
            t = cl.trow(r)
            if t.role != R_WRITER or t.state != TS_ALIVE or t.pid <= 0:
                continue
            if t.fatal == X_OOM:
                return 0
            if t.oom_origin:
                origin = r
        if origin >= 0:
            t = cl.trow(origin)
            t.fatal = X_OOM  # TIF_MEMDIE: its own allocations now fail
            q[S_OOM_KILLED] += 1
            pid, mm_id, rss = t.pid, 0, 0
        elif victim is None:
            return 0
        else:
            chosen = cl.mrow(victim).owner_pid
            kid = child_to_kill(cl, chosen)   # oom_kill_process: a child first
            if kid is not None:
                victim = kid
            m = cl.mrow(victim)
            m.oom_victim = 1
            q[S_OOM_KILLED] += 1
            pid, mm_id, rss = m.owner_pid, m.id, m.rss
    finally:
        task.unlock(cl.mmlist)
    log.warning("oom_kill", victim_pid=pid, victim_mm=mm_id, rss=rss, free_frames=q[A_FREE_TOP],
                **({"child_of": chosen} if origin < 0 and pid != chosen else {}))
    if sched.signal(pid, OOM_SIGNAL):  # a controlled run: delivered at this step
        return pid
    try:
        os.kill(pid, OOM_SIGNAL)
    except ProcessLookupError:
        pass
    return pid
