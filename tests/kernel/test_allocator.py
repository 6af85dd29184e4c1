"""The frame allocator (uksm/kernel/memory.py) under concurrent processes, and the
host memory it gives back (issue 2).

Child processes (``python tests/util_machine.py alloc-child``, each on its
own task row from the supervisor) allocate and free thousands of frames at
once from one small pool, which runs dry now and then.  Each records what
it held and when; no frame may be held by two at once, each frame handed
out reads as zeros, and in the end every frame is free and fsck is clean.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from helpers import TESTS, booted, wait_for
from uksm.kernel.layout import (
    A_FREE_TOP,
    PAGE_SIZE,
    R_WORKER,
    T_PID,
    T_READY,
    T_STATE,
    TS_FREE,
)
from uksm.kernel.memory import Allocator
from util_machine import Space, assert_fsck, frames_used


def overlaps(results: list[dict]) -> list[str]:
    """Frames held by two holders at overlapping times."""
    by_pfn: dict[int, list[tuple[int, int, int]]] = {}
    for r in results:
        for (pfn, t_a, t_f) in r["holds"]:
            by_pfn.setdefault(pfn, []).append((t_a, t_f, r["child"]))
    bad = []
    for pfn, iv in by_pfn.items():
        iv.sort()
        for (_a0, f0, c0), (a1, _f1, c1) in itertools.pairwise(iv):
            if a1 < f0:
                bad.append(f"frame {pfn}: child {c0} held it until {f0}, child {c1} got it at {a1}")
    return bad


@pytest.mark.timeout(120)
# roomy: frees batched (256 pending before a flush), the pool seldom empty.
# dry: 4 x 16 > 61 frames and each child keeps near its 16, so the pool runs
# dry and allocators wait for each other's frees (flushed at once); never all
# at once (4 x 15 < 61): no deadlock.
@pytest.mark.parametrize("children,frames,hold,ops,child_opts,dry", [
    (4, 256, 64, 4000, [], False),
    (4, 61, 16, 6000, ["--flush-p", "1", "--alloc-p", "0.8", "--free-max", "3"], True),
], ids=["roomy", "dry"])
def test_concurrent_alloc_free_never_hands_out_a_frame_twice(tmp_path, children, frames, hold,
                                                             ops, child_opts, dry) -> None:
    name = f"talloc{children}x{os.getpid() % 100000}"
    with booted(name, run=0, frames=frames, max_tasks=16) as sup:
        cl = sup.cl
        free0 = cl.q[A_FREE_TOP]
        assert free0 == frames
        rows = [sup.alloc_row(R_WORKER) for _ in range(children)]
        procs = []
        try:
            for i, row in enumerate(rows):
                out = tmp_path / f"child{i}.json"
                procs.append((out, subprocess.Popen(
                    [sys.executable, os.path.join(TESTS, "util_machine.py"), "alloc-child",
                     "--cluster", name, "--row", str(row), "--child", str(i), "--ops", str(ops),
                     "--hold", str(hold), "--seed", str(1000 + i), *child_opts,
                     "--peers", ",".join(map(str, rows)), "--out", str(out)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            # a common start line: every child attached before any begins
            wait_for(lambda: all(cl.q[cl.tbase(r) + T_PID] for r in rows)
                     or any(p.poll() is not None for _o, p in procs), 60, what="children to attach")
            for r in rows:
                cl.q[cl.tbase(r) + T_READY] = 1
            for _out, p in procs:
                _o, err = p.communicate(timeout=90)
                assert p.returncode == 0, f"child failed ({p.returncode}):\n{err}"
        finally:
            for _out, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for row in rows:
                sup.free_row(row)
        results = [json.loads(out.read_text()) for out, _p in procs]
        # they really ran at the same time
        assert max(r["t_start"] for r in results) < min(r["t_end"] for r in results)
        print("frame waits per child:", [r["frame_waits"] for r in results],
              "ms per child:", [round((r["t_end"] - r["t_start"]) / 1e6) for r in results])
        if dry:  # the allocator's wait for frames was exercised
            assert sum(r["frame_waits"] for r in results) > 0
        allocs = sum(r["allocs"] for r in results)
        assert allocs >= children * ops // 3, allocs
        assert all(r["allocs"] for r in results)
        assert sum(len(r["holds"]) for r in results) == allocs
        assert [r["not_zero"] for r in results] == [[]] * children, "frames handed out dirty"
        assert [r["clobbered"] for r in results] == [[]] * children, \
            "a held frame was written by another holder"
        bad = overlaps(results)
        assert bad == [], f"{len(bad)} double allocations: {bad[:5]}"
        # every frame back, nothing pending, the free stack exact
        assert cl.q[A_FREE_TOP] == free0
        assert all(cl.q[cl.tbase(r) + T_STATE] == TS_FREE for r in rows)
        assert_fsck(sup)
        stack = sorted(cl.fq[cl.stack_off + i] for i in range(cl.q[A_FREE_TOP]))
        assert stack == list(range(frames))


@pytest.mark.timeout(60)
def test_freed_frames_go_back_to_the_host(tmp_path) -> None:
    n = 1024
    with booted(f"tallocmem{os.getpid() % 100000}", run=0, frames=2048) as sup:
        cl = sup.cl
        alloc = Allocator(cl)
        pool = cl.pool
        before = pool.resident_bytes()
        pfns = []
        for i in range(n):
            pfn = alloc.alloc_frame(0, i)
            alloc.installed()
            pool.mv[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = bytes([i % 255 + 1]) * PAGE_SIZE
            pfns.append(pfn)
        full = pool.resident_bytes()
        added = full - before
        assert added >= n * PAGE_SIZE, (before, full)
        assert frames_used(cl) == n
        alloc.put_frames(pfns)
        alloc.flush()
        after = pool.resident_bytes()
        assert frames_used(cl) == 0
        assert full - after >= 0.9 * added, \
            f"host memory: {before} before, {full} with {n} frames written, {after} after freeing"
        # and the same through an address space: DONTNEED and exit give it back
        s = Space(sup)
        base = s.mmap(512)
        s.fill(base, [bytes([7]) * PAGE_SIZE] * 512)
        full = pool.resident_bytes()
        assert full - after >= 512 * PAGE_SIZE
        from uksm.kernel.syscalls import MADV_DONTNEED
        s.madvise(base, 256, MADV_DONTNEED)
        assert full - pool.resident_bytes() >= 0.9 * 256 * PAGE_SIZE
        s.exit()
        assert pool.resident_bytes() - after <= 0.1 * 512 * PAGE_SIZE
        assert_fsck(sup)
