#!/usr/bin/env python3
"""bench_views: what the named views (``uksm.kernel.views``) cost on fsck's
and the OOM killer's paths, against raw indexing.

Boots a cluster in this process (no workers: ``Cluster.create``), makes
``--mms`` address spaces (``mm_create``), and prints, in microseconds per
call (the best of ``--repeat`` timeit runs):

- the real functions of the installed ``uksm``: ``fsck.check``,
  ``fsck.check_leaks``, ``fsck.rebuild``, ``oom.out_of_memory`` (the 4.1
  rule, no candidate: the whole scan, no kill).  Run it with two checkouts'
  interpreters (before and after a change) to compare them;
- the loops fsck keeps raw (``# hot path``), each as it is and through a
  view: the frame table walked frame by frame (``rebuild``; ``check`` for
  the frames not free) with a ``Words`` row like ``MmRow`` made per frame,
  and a page table walked PTE by PTE with ``MM.pte(vpn)``.

Usage::

    .venv/bin/python dev/bench_views.py [--frames 4096] [--mms 32] [--repeat 7]
"""
from __future__ import annotations

import argparse
import os
import timeit

from uksm.host.log import NULL_LOG
from uksm.kernel import fsck, oom
from uksm.kernel.cluster import Cluster, Config, destroy
from uksm.kernel.layout import FR_AUX, FR_COUNT, FR_FLAGS, FRAME_SIZE, H_OOM_RULE, OOM_41, PT_OFF, TS_ALIVE
from uksm.kernel.memory import held_at_zero
from uksm.kernel.mm import MM, mm_create
from uksm.kernel.views import Word, Words


class FrameRow(Words):
    """A frame table row as a view would read it (views.py has none)."""
    __slots__ = ()
    count: Word[FrameRow] = Word(FR_COUNT)
    flags: Word[FrameRow] = Word(FR_FLAGS)
    aux: Word[FrameRow] = Word(FR_AUX)


def best_us(fn: object, number: int, repeat: int) -> float:
    """The best of ``repeat`` runs of ``number`` calls, in us per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6  # type: ignore[arg-type]


def frames_raw(cl: Cluster, refs: list[int], live: set[int]) -> int:
    """rebuild's per-frame loop, as fsck has it."""
    fq, fixed = cl.fq, 0
    for pfn in range(cl.nframes):
        b = pfn * FRAME_SIZE
        if fq[b + FR_COUNT] != refs[pfn]:
            if not (refs[pfn] == 0 and held_at_zero(fq[b + FR_FLAGS], fq[b + FR_AUX], live)):
                fixed += 1
    return fixed


def frames_view(cl: Cluster, refs: list[int], live: set[int]) -> int:
    """The same loop through a frame view."""
    fq, fixed = cl.fq, 0
    for pfn in range(cl.nframes):
        f = FrameRow(fq, pfn * FRAME_SIZE)
        if f.count != refs[pfn]:
            if not (refs[pfn] == 0 and held_at_zero(f.flags, f.aux, live)):
                fixed += 1
    return fixed


def ptes_raw(mm: MM) -> int:
    """A page-table walk, as fsck's (references, check_page_table)."""
    pq, n = mm.pq, 0
    for slot in range(PT_OFF, PT_OFF + mm.pt_top):
        if pq[slot]:
            n += 1
    return n


def ptes_view(mm: MM) -> int:
    """The same walk through MM.pte."""
    n = 0
    for vpn in range(mm.pt_top):
        if mm.pte(vpn):
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--frames", type=int, default=4096, help="the frame pool (default 4096)")
    ap.add_argument("--mms", type=int, default=32, help="address spaces made (default 32, at most 64)")
    ap.add_argument("--repeat", type=int, default=7, help="timeit runs, the best kept (default 7)")
    a = ap.parse_args()
    name = f"benchviews{os.getpid()}"
    cl = Cluster.create(name, Config(frames=a.frames, max_mms=64, max_tasks=64))
    try:
        task = cl.bind(0)
        cl.trow(0).state = TS_ALIVE
        mms = {mm.id: mm for mm in (mm_create(cl, 0, i) for i in range(a.mms))}
        for mm in mms.values():
            mm.words.owner_pid = 0  # no candidate: out_of_memory scans every row, kills none
        cl.q[H_OOM_RULE] = OOM_41
        r = a.repeat
        rows = [
            ("fsck.check", best_us(lambda: fsck.check(cl, mms, counters=True), 20, r)),
            ("fsck.check_leaks", best_us(lambda: fsck.check_leaks(cl), 200, r)),
            ("fsck.rebuild", best_us(lambda: fsck.rebuild(cl, mms), 20, r)),
            ("oom.out_of_memory", best_us(lambda: oom.out_of_memory(cl, task, NULL_LOG), 200, r)),
        ]
        # the hot loops, raw and through a view: every frame, every PTE mapped
        refs, live = [1] * cl.nframes, {0}
        mm = next(iter(mms.values()))
        for vpn in range(mm.pt_top):
            mm.pq[PT_OFF + vpn] = (vpn % cl.nframes) << 2 | 1
        rows += [
            (f"frame loop raw ({cl.nframes} frames)", best_us(lambda: frames_raw(cl, refs, live), 5, r)),
            (f"frame loop view ({cl.nframes} frames)", best_us(lambda: frames_view(cl, refs, live), 5, r)),
            (f"pte walk raw ({mm.pt_top} PTEs)", best_us(lambda: ptes_raw(mm), 50, r)),
            (f"pte walk view ({mm.pt_top} PTEs)", best_us(lambda: ptes_view(mm), 50, r)),
        ]
        print(f"# uksm from {os.path.dirname(fsck.__file__)}; {a.mms} mms, load {os.getloadavg()[0]:.2f}")
        for what, us in rows:
            print(f"{what:40s} {us:10.1f} us")
    finally:
        cl.close()
        destroy(name)


if __name__ == "__main__":
    main()
