"""What a pool process runs for each role of a controlled run.

Each body attaches to the run's cluster by name, takes its task row, hooks
the lock protocol's scheduling points (``Task.sched``) and runs the same
code as the process it plays in a normal run: ksmd's ``run_ksmd``, the
writer's ``write_run``, a worker's ``Worker.run`` or a programmable task's
``ScriptedTask.run`` (its commands come through the slot instead of a
socket: ``GateChannel``).  The one role with its own code here is the
reaper: the supervisor's recovery and reaping of a SIGKILLed process, which
in a normal run are threads of the supervisor and here a scheduled process.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from uksm.explorer.gate import ChildSide
from uksm.host import log as ulog
from uksm.host import oops as host_oops
from uksm.kernel import fsck, oom, sched
from uksm.kernel.cluster import Cluster
from uksm.kernel.exit import mm_users_zero, mmput
from uksm.kernel.fork import undo_fork
from uksm.kernel.ksm import drop_orphaned_refs, repair_list
from uksm.kernel.layout import (
    C_DAEMON,
    C_MMAP,
    C_PTL,
    C_WMUTEX,
    M_ID,
    M_STATE,
    MMS_EXITING,
    MMS_FREEING,
    R_REAPER,
    S_LOCK_RECOVERIES,
    S_RECOVERIES,
    T_PID,
    TS_REAPING,
)
from uksm.kernel.locks import Lock, dead_locks, lock_name, recover
from uksm.kernel.memory import Allocator, rebuild_free_stack
from uksm.kernel.mm import finish_frees, mm_attach

Body = Callable[[dict[str, Any], ChildSide], int]


class Oops(Exception):
    """ksmd or the writer oopsed (uksm.host.oops logged it): its text goes
    to the explorer through the slot, its status stays the oops status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{host_oops.LAST[0]} (at {host_oops.LAST[1]})")
        self.status = status


def attach(job: dict[str, Any], side: ChildSide, role: str) -> tuple[Cluster, Any]:
    """This process on the run's cluster: its task row, the scheduling
    hook, lockdep (always on in a controlled run: a finding), a logger."""
    cl = Cluster.attach(job["cluster"], job["boot_id"])
    task = cl.bind(job["row"])
    hook(task, side)
    cl.q[task.base + T_PID] = os.getpid()
    log = ulog.setup(role, job["cluster"], job.get("log_dir"), boot_id=job["boot_id"],
                     **({"mm": job["mm"]} if job.get("mm") else {}))
    cl.lockdep_log = log
    return cl, log


def hook(task: Any, side: ChildSide) -> None:
    task.sched = side.lock_hook


def _ksmd(job: dict[str, Any], side: ChildSide) -> int:
    from uksm.kernel.ksmd import run_ksmd
    cl, log = attach(job, side, "ksmd")
    _lockdep(cl)
    try:
        status = run_ksmd(cl, log)
    finally:
        cl.close()
    if status == host_oops.OOPS_STATUS and host_oops.LAST:
        raise Oops(status)
    return status


def _writer(job: dict[str, Any], side: ChildSide) -> int:
    from uksm.kernel.writer import write_run
    cl, log = attach(job, side, "writer")
    _lockdep(cl)
    try:
        status = write_run(cl, job["value"], job["origin"], log)
    finally:
        cl.close()
    if status == host_oops.OOPS_STATUS and host_oops.LAST:
        raise Oops(status)
    return status


def _lockdep(cl: Cluster) -> None:
    if cl.task.lockdep is None:
        cl.task.lockdep = cl._lockdep_report


class GateChannel:
    """A scripted task's commands from its slot (``ScriptedTask``'s
    channel): a command waits parked (BLK_CMD) until the explorer puts one
    there, or a fatal signal comes."""

    def __init__(self, side: ChildSide) -> None:
        self.side = side

    def send(self, obj: dict[str, Any]) -> None:
        self.side.send(obj)

    def recv(self, dying: Callable[[], bool]) -> dict[str, Any] | None:
        while True:
            if dying():
                return None
            cmd = self.side.command()
            if cmd is not None:
                return dict(cmd)
            self.side.wait_command()


TASK_DEFAULTS = {"workload": "zero", "seed": 0, "worker_no": 0, "churn_ms": 0, "exit_after_write": False,
                 "mlock": False, "no_touch": False, "log_dir": None, "mergeable": True,
                 # uksm.workers.worker's fork options: a controlled run's task is not forked
                 "forked": False, "content_wno": 0, "exit_after_ms": 0}


def _task(job: dict[str, Any], side: ChildSide) -> int:
    """A worker (``kind`` "worker": a built-in workload) or a programmable
    task (``kind`` "scripted"), on its row and address space."""
    from uksm.workers.scripted import ScriptedTask
    from uksm.workers.worker import Worker
    a = argparse.Namespace(**{**TASK_DEFAULTS, **{k: v for k, v in job.items() if k != "role"}})
    a.cluster, a.task = job["cluster"], job["row"]
    w = ScriptedTask(a, GateChannel(side)) if job["kind"] == "scripted" else Worker(a)
    hook(w.task, side)
    _lockdep(w.cl)
    try:
        return w.run()
    finally:
        w.close()


def _reaper(job: dict[str, Any], side: ChildSide) -> int:
    """The supervisor's recovery and reaper for a SIGKILLed process, as one
    scheduled process (uksm.proc.recovery and uksm.proc.reaper in a normal
    run): take over what it held (exactly: every other process is parked
    at a point, outside the lock protocol's windows), repair, stop the
    world to rebuild the frame counts, release; then run a dead task's
    exit on its row.  A dead ksmd is restarted by the explorer."""
    cl, log = attach(job, side, "reaper")
    cl.task.lockdep = None         # the supervisor is trusted: it takes every pte lock at once
    try:
        return _recover_and_reap(cl, log, side, job)
    finally:
        cl.close()


def _recover_and_reap(cl: Cluster, log: Any, side: ChildSide, job: dict[str, Any]) -> int:
    task, q = cl.task, cl.q
    dead_row, dead_mm, dead_role = job["dead_row"], job["dead_mm"], job["dead_role"]
    # a dead parent's fork in flight: the new task's row holds the new mm's
    # locks (uksm.kernel.fork), dead with it (World.deliver)
    child_row, child_mm = job.get("child_row", -1), job.get("child_mm", 0)
    sched.point("recover", dead_row)
    rows = [(r, cl.tbase(r)) for r in (dead_row, child_row) if r >= 0]
    these = {lid: cl.lock_by_id(lid) for lid in {x for (_r, b) in rows for x in dead_locks(q, b)}}
    took = recover(q, these, cl.live_rows, rows, {}, exact=True)
    owned = {lid: n for lid, n in took.items() if n}
    for lid, n in owned.items():
        log.warning("lock_recovery", lock=lock_name(lid), units=n, dead=job["dead_name"], state="taken over")
    if owned.get(cl.mmlist.lid):
        repair_list(cl)
        _post(cl.mmlist, owned.pop(cl.mmlist.lid))
    drop_orphaned_refs(cl, log)   # a slot freed, its mmdrop not yet done
    finish_frees(cl, log)         # an mm the dead was freeing (the supervisor's sweep)
    if owned.get(cl.zone.lid):
        rebuild_free_stack(cl, fsck.live_task_rows(cl))
        _post(cl.zone, owned.pop(cl.zone.lid))
    owned_ptl = {lid & ((1 << 40) - 1) for lid in owned if lid >> 40 == C_PTL}
    live = {}
    for r in range(cl.max_mms):
        b = cl.mbase(r)
        if q[b + M_ID] and q[b + M_STATE] != MMS_FREEING:   # (a freeing mm's objects are unlinked)
            live[q[b + M_ID]] = mm_attach(cl, q[b + M_ID])
    try:
        # ksm_test_exit must hold before anyone else can take their
        # mmap_sem: the dead task's mm, and a half-made child's
        for mm_id in (dead_mm, child_mm):
            if mm_id and mm_id in live:
                mm_users_zero(cl, live[mm_id], log, ptl_held=mm_id in owned_ptl)
        if dead_role == "ksmd":
            task.lock(cl.mmlist)
            for s in range(cl.max_mms):
                cl.mrow(s).slot_rmap = 0
            task.unlock(cl.mmlist)
        with world_stopped(cl, live, owned_ptl):
            fixed = fsck.rebuild(cl, live)
        for lid in owned:
            row = cl.mm_row(lid & ((1 << 40) - 1)) if lid >> 40 == C_MMAP else -1
            if row >= 0:
                cl.mrow(row).writer_waiting = 0
        for cls in (C_PTL, C_MMAP, C_WMUTEX, C_DAEMON):
            for lid in [x for x in owned if x >> 40 == cls]:
                _post(cl.lock_by_id(lid), owned.pop(lid))
        q[S_RECOVERIES] += 1
        q[S_LOCK_RECOVERIES] += len(took)
        log.warning("recovery", dead=job["dead_name"], mm=dead_mm, frames_fixed=fixed, status=-9)
        if child_row >= 0:   # it died forking: the half-made child goes first (bad_fork_cleanup_mm)
            hook(cl.bind(child_row), side)
            _lockdep(cl)
            undo_fork(cl, child_row, live.get(child_mm), os.getpid(), log, oom.oom_killer(log))
        mm0 = live.get(dead_mm) if dead_mm else None
        if dead_role != "task" or mm0 is None or q[mm0.base + M_ID] != dead_mm:
            return 0
        _exit_dead(cl, log, side, dead_row, mm0)
        return 0
    finally:
        for mm in live.values():
            mm.seg.close()


def _exit_dead(cl: Cluster, log: Any, side: ChildSide, dead_row: int, mm0: Any) -> None:
    """The dead task's exit, on its row (lockdep as any task's): mmput."""
    t = cl.trow(dead_row)
    t.kill_point = -1
    t.for_row = dead_row
    t.role = R_REAPER
    t.pid = os.getpid()
    t.state = TS_REAPING
    hook(cl.bind(dead_row), side)
    _lockdep(cl)
    alloc = Allocator(cl)
    alloc.oom_killer = oom.oom_killer(log)
    mmput(cl, mm0, alloc, log)
    alloc.flush()


@contextmanager
def world_stopped(cl: Cluster, mms: dict[int, Any],
                  owned_ptl: set[int] | frozenset[int] = frozenset()) -> Iterator[None]:
    """``fsck.world_stopped`` as a scheduled process does it: every pte
    lock in mm id order, then zone_lock, through the lock protocol -- so
    each is a point and a wait is a modelled wait (the supervisor's raw
    acquisitions would block for real, out of the scheduler's sight)."""
    taken = []
    try:
        for mm_id in sorted(mms):
            if mm_id not in owned_ptl:
                cl.task.lock(mms[mm_id].ptl)
                taken.append(mms[mm_id].ptl)
        cl.task.lock(cl.zone)
        taken.append(cl.zone)
        yield
    finally:
        for lk in reversed(taken):
            cl.task.unlock(lk)


def _fsck(job: dict[str, Any], side: ChildSide) -> int:
    """``uksm fsck`` / ``Machine.fsck()`` of the live cluster
    (``Requests.do_fsck`` of the daemon, as a scheduled process):
    ksm_thread_mutex (ksmd's counters are consistent under it), the world
    stopped, ksm_mmlist_lock last; the errors go back through the slot."""
    cl, log = attach(job, side, "fsck")
    cl.task.lockdep = None         # the supervisor: every pte lock at once
    live = {}
    try:
        cl.task.lock(cl.daemon)
        try:
            q = cl.q
            for r in range(cl.max_mms):
                b = cl.mbase(r)
                if q[b + M_ID] and q[b + M_STATE] != MMS_FREEING:
                    live[q[b + M_ID]] = mm_attach(cl, q[b + M_ID])
            with world_stopped(cl, live):
                cl.task.lock(cl.mmlist)
                try:
                    errs = fsck.check(cl, live, counters=True)
                    exiting = [i for i, m in live.items() if m.words.state == MMS_EXITING]
                finally:
                    cl.task.unlock(cl.mmlist)
        finally:
            cl.task.unlock(cl.daemon)
        log.info("fsck", ok=not errs, errors=len(errs), first=errs[:5])
        side.send({"clean": not errs, "errors": errs, "mms": len(live), "exiting": exiting})
        return 0
    finally:
        for mm in live.values():
            mm.seg.close()
        cl.close()


def _post(lk: Lock, n: int) -> None:
    for _ in range(n):
        lk.sem.release()


BODIES: dict[str, Body] = {"ksmd": _ksmd, "writer": _writer, "task": _task, "reaper": _reaper, "fsck": _fsck}

__all__ = ["BODIES", "GateChannel", "Oops"]
