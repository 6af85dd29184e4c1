"""The writer of /sys/kernel/mm/ksm/run: ``echo VALUE > run`` as a task.

In 2.6.32 the task that writes ``run`` runs run_store itself: it takes
ksm_thread_mutex and, for 2, does the whole unmerge in its own context
(unmerge_and_remove_all_rmap_items), with PF_OOM_ORIGIN set so that the
OOM killer, if its own COW breaks exhaust memory, picks *it* first
(badness() returns ULONG_MAX for PF_OOM_ORIGIN, "swapoff can easily use up
all memory, so kill those first").  A fatal signal makes unmerge_ksm_pages
stop with -ERESTARTSYS; an OOM kill of the writer makes its own fault fail
(-ENOMEM); either way run_store sets ``run`` back to 0 and the write fails.

This process is that task: short-lived, started by the supervisor for
``uksm ctl run=N``, the oom-unmerge scenario and the API, with
``--oom-origin`` where the kernel had PF_OOM_ORIGIN (2.6.32 as released,
from Hugh Dickins' "ksm: unmerge is an origin of OOMs", posted 2009-09-05
after the seed: the ``shipped`` policy) and without it for the seed's own code.  Its exit
status is the result the caller gets: EXIT_DONE, EXIT_INTERRUPTED
(-ERESTARTSYS), EXIT_OOM_KILLED (-ENOMEM: chosen by the OOM killer).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from uksm.host import log as ulog
from uksm.host import oops
from uksm.host.shm import UksmError
from uksm.kernel import oom
from uksm.kernel.cluster import Cluster, add_task_args
from uksm.kernel.exit import oom_kill_and_mmput
from uksm.kernel.ksm import ENOMEM, run_store
from uksm.kernel.layout import H_HAZARDS, HZ_OOM_MMPUT_IN_TASK, T_FATAL, T_PID, X_OOM, X_SIGNAL
from uksm.kernel.memory import Allocator

EXIT_DONE, EXIT_INTERRUPTED, EXIT_OOM_KILLED = 0, 5, 6
RESULTS = {EXIT_DONE: "done", EXIT_INTERRUPTED: "interrupted", EXIT_OOM_KILLED: "oom-killed"}


def result_of(status: int | None) -> str:
    """What the caller of a write gets from the writer's wait status."""
    if status is None:
        return "running"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return RESULTS.get(status, f"failed (status {status})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uksm-writer",
                                 description="write /sys/kernel/mm/ksm/run of a cluster (run_store)")
    add_task_args(ap)
    ap.add_argument("--value", type=int, required=True, choices=(0, 1, 2))
    ap.add_argument("--oom-origin", action="store_true",
                    help="PF_OOM_ORIGIN while unmerging (2.6.32 as released)")
    a = ap.parse_args(argv)
    from uksm.host.lifeline import EXIT_ORPHAN, arm
    arm()  # die with the supervisor
    try:  # the cluster instance it was started for, or nothing is touched
        cl = Cluster.attach(a.cluster, a.boot_id)
    except UksmError as e:
        print(f"uksm-writer: run={a.value} not written: {e}", file=sys.stderr)
        return EXIT_ORPHAN
    task = cl.bind(a.task)
    cl.q[task.base + T_PID] = os.getpid()
    log = ulog.setup("writer", a.cluster, a.log_dir, boot_id=a.boot_id)
    try:
        return write_run(cl, a.value, a.oom_origin, log)
    finally:
        ulog.close()


def write_run(cl: Cluster, value: int, oom_origin: bool, log: Any) -> int:
    """This task, bound to its row in ``cl``, writes ``value`` to run:
    run_store with its signal handling and its OOM killer.  Returns the
    exit status (EXIT_DONE, EXIT_INTERRUPTED, EXIT_OOM_KILLED, or the
    oops status).  The writer's body in a normal run (``main``) and in a
    controlled one (uksm.explorer)."""
    q, task = cl.q, cl.task
    task.on_wait = lambda name, ms, holders: log.info("lock_wait", lock=name, holders=holders,
                                                       waited_ms=round(ms, 3))
    pending = {"signo": 0}

    def on_signal(signo: int, _frame: Any) -> None:  # signal_pending(current)
        pending["signo"] = signo
        if not q[task.base + T_FATAL]:
            q[task.base + T_FATAL] = X_OOM if signo == oom.OOM_SIGNAL else X_SIGNAL
    for s in (signal.SIGTERM, signal.SIGINT, oom.OOM_SIGNAL):
        signal.signal(s, on_signal)
    alloc = Allocator(cl)
    alloc.oom_killer = oom.oom_killer(log)
    if q[H_HAZARDS] & HZ_OOM_MMPUT_IN_TASK:  # the 2015 linux-next self-deadlock
        alloc.oom_killer = lambda c, t: oom_kill_and_mmput(c, t, log)
    cl.watch_use_after_free(log)
    cl.lockdep_log = log
    try:
        _seq, err = run_store(cl, value, alloc, log, stop=lambda: bool(pending["signo"]),
                              oom_origin=oom_origin)
    except Exception as e:  # an unexpected exception in kernel code: an oops
        return oops.report(log, e)  # the supervisor reads its channel
    status = (EXIT_DONE if not err else EXIT_OOM_KILLED
              if err == -ENOMEM or q[task.base + T_FATAL] == X_OOM else EXIT_INTERRUPTED)
    log.info("run_store", value=value, err=err, result=RESULTS[status], oom_origin=oom_origin)
    return status


if __name__ == "__main__":
    # run as the module uksm.kernel.writer, not as a second copy named
    # __main__ (the one copy every import sees: see uksm/kernel/ksmd.py)
    from uksm.kernel import writer as this
    raise SystemExit(this.main())
