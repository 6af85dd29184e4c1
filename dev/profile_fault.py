#!/usr/bin/env python3
"""profile_fault: where a first-touch fault and a mapped page write spend their CPU.

Boots a cluster like ``tools/bench_mmu.py`` (ksmd idle, a pool of 65,536
frames, so that a worker's per-task list takes 16 frames at a time, as
bench_mmu's does) and, in this process, on a worker's task row with a
per-task list, writes one page at a time through ``MMU.write``:

- first touch: every page of a fresh range (``do_anonymous_page``), the
  range zapped and the list drained between rounds (a punched frame costs
  the host as much as a new one).  Split into the list refills' host work
  (``Segment.populate``: the tmpfs pages), their Python (zone_lock, the
  frames marked F_PCP), the three lock/unlock pairs of a fault (mmap_sem,
  the pte lock to install, the pte lock for the write) and the rest: the
  Python of MMU.write, MMU.fault, handle_mm_fault and the allocator, and
  the 4 KiB copy;
- mapped page write: the same writes again, every PTE present and
  writable: one pte lock pair, the copy, the Python around them;

each piece the best of ``--repeat`` rounds, in CPU microseconds per page
(``time.process_time``: what the load on a shared machine blurs least).
The lock pairs and the copy are timed alone (timeit).  Nothing is left
running or in /dev/shm afterwards.

Usage: ``python dev/profile_fault.py [--pages 256] [--repeat 5] [--json]``
"""
from __future__ import annotations

import argparse
import json
import os
import time
import timeit
from typing import Any

PAGE = 4096


def measure(pages: int, repeat: int) -> dict[str, float]:
    from uksm.host import shm
    from uksm.host.log import NULL_LOG
    from uksm.kernel.cluster import Cluster, Config
    from uksm.kernel.exit import mmput
    from uksm.kernel.layout import R_WORKER, T_PID
    from uksm.kernel.memory import PCP_BATCH, Allocator
    from uksm.kernel.mm import mm_attach, mm_create
    from uksm.kernel.mmu import MMU
    from uksm.kernel.syscalls import MADV_DONTNEED, sys_madvise, sys_mmap
    from uksm.proc.supervisor import Supervisor

    name = f"tprof{os.getpid()}"
    sup = Supervisor(name, Config(frames=max(1 << 16, pages + 64), va_pages=pages + 64, run=0,
                                  max_tasks=16, max_mms=16), None, quiet=True)
    clock = time.process_time
    populate = shm.Segment.populate
    spent = {"refill": 0.0, "populate": 0.0, "refills": 0}

    def timed_populate(seg: shm.Segment, offset: int, length: int) -> bool:
        t = clock()
        try:
            return populate(seg, offset, length)
        finally:
            spent["populate"] += clock() - t

    class TimedAllocator(Allocator):
        def refill(self) -> bool:
            t = clock()
            try:
                return super().refill()
            finally:
                spent["refill"] += clock() - t
                spent["refills"] += 1

    out: dict[str, float] = {}
    cl = None
    try:
        sup.boot()
        row = sup.alloc_row(R_WORKER)
        mm_id = mm_create(sup.cl, row, 1000).id
        cl = Cluster.attach(name)
        cl.bind(row)
        cl.q[cl.task.base + T_PID] = os.getpid()
        mm = mm_attach(cl, mm_id)
        alloc = TimedAllocator(cl, batch=PCP_BATCH)
        mmu = MMU(cl, mm, alloc)
        base = sys_mmap(cl, mm, pages * PAGE)
        data = bytes(range(256)) * (PAGE // 256)
        rounds: list[tuple[float, float, float, int]] = []
        shm.Segment.populate = timed_populate  # type: ignore[method-assign,assignment]
        try:
            for _ in range(repeat):
                sys_madvise(cl, mm, alloc, base, pages * PAGE, MADV_DONTNEED)
                alloc.drain()
                spent.update(refill=0.0, populate=0.0, refills=0)
                t = clock()
                for i in range(pages):
                    mmu.write(base + i * PAGE, data)
                rounds.append((clock() - t, spent["refill"], spent["populate"], int(spent["refills"])))
        finally:
            shm.Segment.populate = populate  # type: ignore[method-assign]
        total, refill, host, refills = min(rounds)
        us = 1e6 / pages
        out["first_touch"] = total * us
        out["refill_host"] = host * us
        out["refill_python"] = (refill - host) * us
        out["list_size"] = pages / max(refills, 1)

        def best(stmt: str, g: dict[str, Any], n: int = 20000) -> float:
            return min(timeit.repeat(stmt, number=n, repeat=repeat, globals=g, timer=clock)) / n * 1e6

        g = {"task": cl.task, "sem": mm.sem, "ptl": mm.ptl, "s": mm.ptl.sem, "data": data,
             "plain": memoryview(bytearray(PAGE)), "mm": mm, "vpn": base // PAGE}
        out["pair_mmap_sem"] = best("task.lock(sem); task.unlock(sem)", g)
        out["pair_pte_lock"] = best("task.lock(ptl); task.unlock(ptl)", g)
        out["pair_bare_semaphore"] = best("s.acquire(0); s.release()", g)
        out["copy"] = best("plain[0:4096] = data", g)
        out["find_vma"] = best("mm.vma_base(vpn)", g)
        mapped = []
        for _ in range(repeat):
            t = clock()
            for i in range(pages):
                mmu.write(base + i * PAGE, data)
            mapped.append(clock() - t)
        out["mapped_write"] = min(mapped) * us
        out["rest_first_touch"] = (out["first_touch"] - out["refill_host"] - out["refill_python"]
                                   - out["pair_mmap_sem"] - 2 * out["pair_pte_lock"])
        out["rest_mapped_write"] = out["mapped_write"] - out["pair_pte_lock"] - out["copy"]
        alloc.drain()
        mmput(cl, mm, alloc, NULL_LOG)
        alloc.flush()
    finally:
        if cl is not None:
            cl.close()
        if sup.booted:
            sup.kill_all()
            sup.teardown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=256, help="pages written per round (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each figure is the best (default 5)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    if a.pages < 2 or a.repeat < 1:
        ap.error("--pages >= 2; --repeat >= 1")
    r = measure(a.pages, a.repeat)
    if a.json:
        print(json.dumps({"loadavg_1m": os.getloadavg()[0], **r}, indent=1))
        return 0
    print(f"profile_fault: {a.pages} pages, best of {a.repeat}, CPU us per page, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"first touch (MMU.write of a fresh page)   {r['first_touch']:6.2f}")
    print(f"  list refill, host (Segment.populate)    {r['refill_host']:6.2f}  "
          f"(lists of {r['list_size']:.0f} frames)")
    print(f"  list refill, Python and zone_lock       {r['refill_python']:6.2f}")
    print(f"  mmap_sem lock/unlock pair               {r['pair_mmap_sem']:6.2f}")
    print(f"  pte lock pair x2 (install, write)       {2 * r['pair_pte_lock']:6.2f}")
    print(f"  the rest: Python of the fault path, copy {r['rest_first_touch']:5.2f}")
    print(f"mapped page write (MMU.write)             {r['mapped_write']:6.2f}")
    print(f"  pte lock pair                           {r['pair_pte_lock']:6.2f}  "
          f"(the bare semaphore's pair: {r['pair_bare_semaphore']:.2f})")
    print(f"  4 KiB copy (a plain memoryview slice)   {r['copy']:6.2f}")
    print(f"  the rest: Python of MMU.write           {r['rest_mapped_write']:6.2f}")
    print(f"find_vma's walk (MM.vma_base)             {r['find_vma']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
