"""A task's program in a controlled run: a list of ops, run in order.

Ops (tuples):

- ``("map", pages, mergeable)``: mmap ``pages`` pages; MADV_MERGEABLE if asked;
- ``("fill", [v0, v1, ...])``: write page i with content ``vi`` (0: zeros);
- ``("wait_go", n)``: wait until the scenario releases the task (``World.release``);
- ``("wait_scans", n)``: wait until ksmd's full_scans reaches ``n``;
- ``("unmergeable",)``: MADV_UNMERGEABLE over the mapped pages;
- ``("dontneed", i)``: MADV_DONTNEED of page i;
- ``("write", i, v)``: write page i again (a COW break of a merged page);
- ``("exit",)``: exit now (the end of the list is an exit too).

Every op starts at a ``task_op`` point.  A fatal signal (the OOM
killer's, a SIGTERM a kill point sent) is noticed between ops and in
the waits, as the built-in worker notices TIF_SIGPENDING at its safe
points; then the task exits: it verifies what it wrote (unless OOM-killed),
and runs ``mmput`` (``uksm.workers.worker.Worker.exit_task``'s steps).
"""
from __future__ import annotations

import os
import signal
from typing import Any

from uksm.explore.child import COND_GO, COND_SCANS, bind
from uksm.kernel import oom, sched
from uksm.kernel.layout import (K_FULL_SCANS, M_OWNER_PID, PAGE_SIZE, T_EXIT_REASON, T_FATAL,
                                T_MISMATCHES, T_READY, T_VERIFIED, X_EXIT, X_OOM, X_SIGNAL)
from uksm.kernel.exit import mmput
from uksm.kernel.memory import Allocator, OutOfMemory
from uksm.kernel.mmu import MMU
from uksm.kernel.syscalls import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, sys_madvise, sys_mmap


def content(v: int) -> bytes:
    """Page content number ``v`` (0: the zero page)."""
    return bytes(PAGE_SIZE) if v == 0 else v.to_bytes(8, "little") * (PAGE_SIZE // 8)


def task_body(w: Any, p: Any, side: Any, prog: list[tuple]) -> int:
    log = bind(w, p, side, "worker")
    cl = w.cl
    q, tb = cl.q, cl.task.base
    oom.set_logger(log)
    cl.watch_use_after_free(log)
    mm = w.mms[p.mm]
    q[mm.base + M_OWNER_PID] = os.getpid()
    alloc = Allocator(cl)
    alloc.oom_killer = oom.out_of_memory
    mmu = MMU(cl, mm, alloc)

    def fatal(signo: int, _frame: Any) -> None:
        if not q[tb + T_FATAL]:
            q[tb + T_FATAL] = X_OOM if signo == oom.OOM_SIGNAL else X_SIGNAL
    for s in (signal.SIGTERM, signal.SIGINT, oom.OOM_SIGNAL):
        signal.signal(s, fatal)
    expected: dict[int, bytes] = {}
    base, npages = 0, 0
    try:
        for i, op in enumerate(prog):
            if q[tb + T_FATAL]:
                break
            sched.point("task_op", i)
            kind = op[0]
            if kind == "map":
                npages = op[1]
                base = sys_mmap(cl, mm, npages * PAGE_SIZE)
                if op[2]:
                    sys_madvise(cl, mm, alloc, base, npages * PAGE_SIZE, MADV_MERGEABLE, log)
            elif kind == "fill":
                for j, v in enumerate(op[1]):
                    expected[j] = content(v)
                    mmu.write(base + j * PAGE_SIZE, expected[j])
            elif kind == "write":
                expected[op[1]] = content(op[2])
                mmu.write(base + op[1] * PAGE_SIZE, expected[op[1]])
            elif kind == "wait_go":
                q[tb + T_READY] = 1
                sched.blocked(sched.BLK_COND, COND_GO, op[1])   # the explorer knows the barrier
            elif kind == "wait_scans":
                q[tb + T_READY] = 1
                if q[K_FULL_SCANS] < op[1]:
                    sched.blocked(sched.BLK_COND, COND_SCANS, op[1])
            elif kind == "unmergeable":
                sys_madvise(cl, mm, alloc, base, npages * PAGE_SIZE, MADV_UNMERGEABLE, log)
            elif kind == "dontneed":
                sys_madvise(cl, mm, alloc, base + op[1] * PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED, log)
                expected.pop(op[1], None)
            elif kind == "exit":
                break
            else:
                raise ValueError(f"unknown task op {op!r}")
    except OutOfMemory:
        fatal(oom.OOM_SIGNAL, None)
    # do_exit (Worker.exit_task's steps)
    reason = q[tb + T_FATAL] or X_EXIT
    if reason != X_OOM:
        bad = sum(1 for j, data in expected.items() if mmu.read(base + j * PAGE_SIZE, PAGE_SIZE) != data)
        q[tb + T_VERIFIED] = len(expected)
        q[tb + T_MISMATCHES] = bad
        log.info("worker_verify", mm=mm.id, pages_verified=len(expected), mismatches=bad)
    q[tb + T_EXIT_REASON] = reason
    alloc.drain()
    mmput(cl, mm, alloc, log)
    for s in (signal.SIGTERM, signal.SIGINT, oom.OOM_SIGNAL):
        signal.signal(s, signal.SIG_IGN)
    return 0
