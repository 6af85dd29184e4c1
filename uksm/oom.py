"""The OOM killer (mm/oom_kill.c: out_of_memory, select_bad_process).

Invoked by an allocating context that found no free frame.  Like the
kernel's, it kills at most one victim at a time: while a chosen victim has
not yet freed its memory (TIF_MEMDIE; here M_OOM_VICTIM until its exit has
unmapped its pages), it returns without killing, and the allocator keeps
waiting and retrying.  That is exactly why the legacy exit deadlocks: the
victim never frees, nobody else is killed, the allocator waits forever.

Badness is the victim's *private* resident frames (RSS minus PTEs mapping
KSM pages): what killing it gives back.  A task being unmerged by run=2
grows there, so it is the one picked, as in the seed's scenario.
"""
from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from .layout import (A_FREE_TOP, M_EXIT_STAGE, M_ID, M_KSM_MAPPED, M_OOM_VICTIM, M_OWNER_PID,
                     M_RSS, M_STATE, M_USERS, MS_LIVE, S_OOM_KILLED, XS_ZAPPED)

if TYPE_CHECKING:
    from .cluster import Cluster
    from .locks import Task

OOM_SIGNAL = signal.SIGUSR1

_log: Any = None


def set_logger(log: Any) -> None:
    global _log
    _log = log


def out_of_memory(cl: "Cluster", task: "Task") -> int:
    """Kill the worst task unless a victim is already on its way out.
    Returns the victim's pid, or 0."""
    q = cl.q
    victim = None
    task.lock(cl.mmlist)
    try:
        best = -1
        for r in range(cl.max_mms):
            b = cl.mbase(r)
            if not q[b + M_ID]:
                continue
            if q[b + M_OOM_VICTIM] and not q[b + M_EXIT_STAGE] & XS_ZAPPED:
                return 0  # a victim is still freeing its memory: wait for it
            if q[b + M_STATE] != MS_LIVE or q[b + M_USERS] == 0 or q[b + M_OWNER_PID] <= 0:
                continue
            score = q[b + M_RSS] - q[b + M_KSM_MAPPED]
            if score > best:
                best, victim = score, r
        if victim is None:
            return 0
        b = cl.mbase(victim)
        q[b + M_OOM_VICTIM] = 1
        q[S_OOM_KILLED] += 1
        pid, mm_id, rss = q[b + M_OWNER_PID], q[b + M_ID], q[b + M_RSS]
    finally:
        task.unlock(cl.mmlist)
    if _log is not None:
        _log.warning("oom_kill", victim_pid=pid, victim_mm=mm_id, rss=rss,
                     free_frames=q[A_FREE_TOP])
    try:
        os.kill(pid, OOM_SIGNAL)
    except ProcessLookupError:
        pass
    return pid
