"""Helpers for the tests of the emulated machine and ksmd (test_mmu,
test_allocator, test_merge): an address space driven from the test process
itself, fsck with the world stopped, the ksm knobs and counters as
/sys/kernel/mm/ksm gives them, and the allocator's child process.

The test thread acts as the supervisor's task (``sup.cl`` is bound to the
supervisor's row): every address space made here is created, used and
exited by that one thread, in order, so the row's lock entries stay exact.

Run as a script (``python tests/util_machine.py alloc-child ...``) this file
is the child process of the allocator concurrency test.
"""
from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterable
from typing import Any

PAGE = 4096


# ---- an address space the test thread lives in ---------------------------------

class Space:
    """A user process's address space, emulated from the test process:
    ``mm_create`` (as fork would), an allocator and an MMU, and the system
    calls on it.  ``exit()`` runs mmput and waits until the mm is freed."""

    def __init__(self, sup: Any, worker_no: int = 900, mm: Any = None) -> None:
        from uksm.kernel.memory import Allocator
        from uksm.kernel.mm import mm_create
        from uksm.kernel.mmu import MMU
        self.sup = sup
        self.cl = sup.cl
        self.mm = mm if mm is not None else mm_create(self.cl, self.cl.task.row, worker_no)
        self.alloc = Allocator(self.cl)
        self.mmu = MMU(self.cl, self.mm, self.alloc)
        self.exited = False

    def fork(self, pending: Any = None, view: Any = None) -> tuple["Space | None", int]:
        """fork from the test thread (``uksm.kernel.fork.dup_mm``): the new
        task's row and mm made as the supervisor makes them
        (``Supervisor.new_task``).  Returns (the child's Space, 0), or
        (None, -errno) with the row freed.  The child's Space is driven by
        the test thread too (its own row keeps nothing after the fork).
        ``view``: fork as another task (``Cluster.thread_view`` of its row,
        from another thread), while this thread's task holds locks."""
        from uksm.host.log import NULL_LOG
        from uksm.kernel.fork import dup_mm
        from uksm.kernel.mm import mm_attach
        row, mm, _wno = self.sup.new_task(1, pid=os.getpid())
        if view is None:
            err = dup_mm(self.cl, self.mm, row, mm.id, NULL_LOG, pending)
        else:
            parent = mm_attach(view, self.mm.id)
            try:
                err = dup_mm(view, parent, row, mm.id, NULL_LOG, pending)
            finally:
                parent.seg.close()
                view.forget_mm(parent.id)
        self.sup.free_row(row)
        return (None, err) if err else (Space(self.sup, mm=mm), 0)

    # -- system calls
    def mmap(self, npages: int) -> int:
        from uksm.kernel.syscalls import sys_mmap
        return sys_mmap(self.cl, self.mm, npages * PAGE)

    def munmap(self, addr: int, npages: int) -> None:
        from uksm.kernel.syscalls import sys_munmap
        sys_munmap(self.cl, self.mm, self.alloc, addr, npages * PAGE)

    def madvise(self, addr: int, npages: int, advice: int) -> int:
        from uksm.kernel.syscalls import sys_madvise
        return sys_madvise(self.cl, self.mm, self.alloc, addr, npages * PAGE, advice)

    def mergeable(self, addr: int, npages: int) -> None:
        from uksm.kernel.syscalls import MADV_MERGEABLE
        self.madvise(addr, npages, MADV_MERGEABLE)

    # -- user access
    def write(self, addr: int, data: bytes) -> None:
        self.mmu.write(addr, data)

    def read(self, addr: int, n: int) -> bytes:
        return self.mmu.read(addr, n)

    def fill(self, addr: int, pages: Iterable[bytes]) -> None:
        for i, p in enumerate(pages):
            self.mmu.write(addr + i * PAGE, p)

    # -- the page table
    def pte(self, addr: int) -> int:
        return self.mm.pte(addr >> 12)

    def pfn(self, addr: int) -> int | None:
        """The frame mapped at ``addr``, or None (pte_none)."""
        from uksm.kernel.layout import PTE_PRESENT
        pte = self.pte(addr)
        return pte >> 2 if pte & PTE_PRESENT else None

    def writable(self, addr: int) -> bool:
        from uksm.kernel.layout import PTE_WRITE
        return bool(self.pte(addr) & PTE_WRITE)

    def field(self, f: int) -> int:
        return self.cl.q[self.mm.base + f]

    def rss(self) -> int:
        from uksm.kernel.layout import M_RSS
        return self.field(M_RSS)

    def freed(self) -> bool:
        """The mm's row no longer describes it (its last mmdrop ran)."""
        return not self.mm.alive()

    def exit(self, wait: bool = True, timeout: float = 30.0) -> int:
        """mmput: the exit path; then (``wait``) until the last mmdrop,
        which ksmd does when the slow path left it the slot.  Returns the
        __ksm_exit path taken."""
        import helpers
        from uksm.host.log import NULL_LOG
        from uksm.kernel.exit import mmput
        path = 0
        if not self.exited:
            self.exited = True
            path = mmput(self.cl, self.mm, self.alloc, NULL_LOG)
            self.alloc.flush()
        if wait:
            helpers.pump(self.sup, self.freed, timeout, what=f"mm{self.mm.id} to be freed")
        return path


# ---- frames and fsck ----------------------------------------------------------------

def frame(cl: Any, pfn: int) -> tuple[int, int]:
    """(count, flags) of a frame."""
    from uksm.kernel.layout import FR_COUNT, FR_FLAGS, FRAME_SIZE
    b = pfn * FRAME_SIZE
    return cl.fq[b + FR_COUNT], cl.fq[b + FR_FLAGS]


def is_ksm(cl: Any, pfn: int) -> bool:
    from uksm.kernel.layout import F_KSM
    return bool(frame(cl, pfn)[1] & F_KSM)


def frames_used(cl: Any) -> int:
    """Frames off the free stack, less 6.18's shared zero page: reserved at
    boot (cluster.reserve_zero_page) and never freed, it is no task's."""
    from uksm.kernel.layout import A_FREE_TOP
    return cl.nframes - cl.q[A_FREE_TOP] - (1 if cl.modern else 0)


def wait_frames_used(sup: Any, n: int, timeout: float = 30.0) -> None:
    """Wait until exactly ``n`` frames are in use: a task (ksmd after a
    merge) batches its frees and gives them back at its next flush."""
    import helpers
    try:
        helpers.pump(sup, lambda: frames_used(sup.cl) == n, timeout)
    except AssertionError:
        raise AssertionError(f"frames in use: {frames_used(sup.cl)}, expected {n}") from None


def live_mms(sup: Any, spaces: Iterable[Space] = ()) -> dict[int, Any]:
    """Every address space still in the mm table: the supervisor's
    workers' and the test's own."""
    from uksm.kernel.layout import M_ID
    q = sup.cl.q
    with sup.lock:
        mms = {i: m for i, m in sup.mms.items() if q[m.base + M_ID] == i}
    for s in spaces:
        if s.mm.alive():
            mms[s.mm.id] = s.mm
    return mms


def fsck_errors(sup: Any, spaces: Iterable[Space] = (), counters: bool = True) -> list[str]:
    """uksm.kernel.fsck.check with the world stopped (every pte lock, zone_lock)
    and, for the ksm counters, ksm_thread_mutex held (ksmd publishes them
    under it) -- taken first, as the lock order says."""
    from uksm.kernel import fsck
    cl = sup.cl
    mms = live_mms(sup, spaces)
    if counters:
        cl.task.lock(cl.daemon)
    try:
        with fsck.world_stopped(cl, mms):
            return fsck.check(cl, mms, counters=counters)
    finally:
        if counters:
            cl.task.unlock(cl.daemon)


def assert_fsck(sup: Any, spaces: Iterable[Space] = (), counters: bool = True) -> None:
    errs = fsck_errors(sup, spaces, counters)
    assert errs == [], "fsck: " + "; ".join(errs[:10])


def exit_all_clean(sup: Any, *spaces: Space) -> None:
    """fsck with ``spaces`` live, each exits, every frame comes back, fsck
    again: the end of every in-process merge test."""
    assert_fsck(sup, spaces)
    for sp in spaces:
        sp.exit()
    wait_frames_used(sup, 0)
    assert_fsck(sup)


def maps_duplicates(spaces: Iterable[tuple[Space, int, int]]) -> list[tuple[int, list]]:
    """range_maps_duplicates (ksm_functional_tests.c) over several ranges
    (space, addr, npages): the frames mapped more than once."""
    seen: dict[int, list] = {}
    for (s, addr, n) in spaces:
        for i in range(n):
            pfn = s.pfn(addr + i * PAGE)
            if pfn is not None:
                seen.setdefault(pfn, []).append((s.mm.id, i))
    return [(pfn, where) for pfn, where in seen.items() if len(where) > 1]


# ---- /sys/kernel/mm/ksm -------------------------------------------------------------

def ksm_stats(cl: Any) -> dict[str, int]:
    """The counters as one consistent snapshot (read under
    ksm_thread_mutex, which ksmd publishes them under)."""
    from uksm.kernel.layout import K_RMAP_ITEMS, ksm_block
    cl.task.lock(cl.daemon)
    try:
        return {**ksm_block(cl.q), "rmap_items": cl.q[K_RMAP_ITEMS]}
    finally:
        cl.task.unlock(cl.daemon)


def set_run(sup: Any, run: int, timeout: float = 30.0) -> None:
    """echo RUN > /sys/kernel/mm/ksm/run: written under ksm_thread_mutex
    (as run_store does), then wait until ksmd has acted on it (for 2: the
    unmerge is complete)."""
    import helpers
    from uksm.kernel.ksm import run_store
    from uksm.kernel.layout import K_RUN_DONE
    cl, q = sup.cl, sup.cl.q
    seq, err = run_store(cl, run)   # this thread is the writer: for 2 it unmerges
    assert err == 0, f"run={run}: error {err}"
    helpers.pump(sup, lambda: q[K_RUN_DONE] == seq, timeout, what=f"ksmd to act on run={run}")


def wait_counts(sup: Any, timeout: float = 30.0, **want: int) -> dict[str, int]:
    """Wait until every named counter has the wanted value; on timeout the
    assertion shows the last counters."""
    import helpers
    last: dict[str, int] = {}

    def ok() -> bool:
        last.clear()
        last.update(ksm_stats(sup.cl))
        return all(last[k] == v for k, v in want.items())
    try:
        helpers.pump(sup, ok, timeout)
    except AssertionError:
        raise AssertionError(f"ksm counters never reached {want}: last {last}") from None
    return dict(last)


def wait_full_scans(sup: Any, n: int, timeout: float = 30.0) -> dict[str, int]:
    """Wait for ``n`` more full scans (ksm_merge() of the selftests waits
    for two), return the counters then."""
    import helpers
    start = ksm_stats(sup.cl)["full_scans"]
    helpers.pump(sup, lambda: ksm_stats(sup.cl)["full_scans"] >= start + n, timeout,
                 what=f"{n} full scans")
    return ksm_stats(sup.cl)


# ---- the allocator's child process ---------------------------------------------------

def alloc_child(cluster: str, row: int, child: int, ops: int, hold: int, seed: int,
                flush_p: float = 0.1, alloc_p: float = 0.55, free_max: int = 16,
                peers: list[int] | None = None) -> dict:
    """Attach, bind ``row``, and allocate/free ``ops`` frames at random,
    holding at most ``hold`` at a time: each step allocates
    with probability ``alloc_p`` (while under ``hold``), else frees 1 to
    ``free_max`` of its frames, then flushes its pending frees with
    probability ``flush_p``.  Every frame handed out must read
    back as zeros, is stamped with (child, sequence) over its whole page
    while held, and must still carry the stamp when freed: another holder
    would have overwritten it.  Returns the holds as (pfn, t_alloc_ns,
    t_free_ns) -- the interval is inside the true ownership, so two
    overlapping intervals of one frame are a double allocation -- and how
    often it had to wait for free frames."""
    import time

    from uksm.kernel.cluster import Cluster
    from uksm.kernel.layout import C_FRAMES, E_SPINS, ESIZE, T_LOCKS, T_PID, T_READY
    from uksm.kernel.memory import Allocator
    cl = Cluster.attach(cluster)
    task = cl.bind(row)
    cl.q[task.base + T_PID] = os.getpid()
    ready_by = time.monotonic() + 60
    while not cl.q[task.base + T_READY]:  # the start line: every child attached
        if time.monotonic() > ready_by:   # the test gave up on us (or died): do not spin on
            raise SystemExit(f"alloc-child {child}: no start signal within 60 s")
        time.sleep(0.001)
    t_start = time.monotonic_ns()
    cl.q[task.base + T_READY] = 2
    peers = peers or []
    give_up = t_start + 60 * 10**9
    alloc = Allocator(cl)
    pool = cl.pool.mv
    rng = random.Random(seed)
    zero = bytes(PAGE)
    held: dict[int, tuple[int, bytes]] = {}
    holds: list[tuple[int, int, int]] = []
    not_zero: list[int] = []
    clobbered: list[int] = []
    now = time.monotonic_ns
    seq = 0

    def free(pfns: list[int]) -> None:
        for pfn in pfns:
            t_a, stamp = held.pop(pfn)
            if pool[pfn * PAGE:(pfn + 1) * PAGE].tobytes() != stamp:
                clobbered.append(pfn)
            holds.append((pfn, t_a, now()))
        alloc.put_frames(pfns)

    n, all_started = 0, False
    while n < ops or not all_started:
        n += 1
        if not all_started and not n & 63:
            all_started = all(cl.q[cl.tbase(p) + T_READY] == 2 for p in peers) \
                or time.monotonic_ns() > give_up
        if len(held) < hold and (not held or rng.random() < alloc_p):
            pfn = alloc.alloc_frame(0, seq)
            t_a = now()
            alloc.installed()
            if pool[pfn * PAGE:(pfn + 1) * PAGE].tobytes() != zero:
                not_zero.append(pfn)
            stamp = (child.to_bytes(4, "little") + seq.to_bytes(4, "little")) * (PAGE // 8)
            pool[pfn * PAGE:(pfn + 1) * PAGE] = stamp
            seq += 1
            if pfn in held:
                clobbered.append(pfn)
            held[pfn] = (t_a, stamp)
        else:
            k = rng.randint(1, min(len(held), free_max))
            free(rng.sample(sorted(held), k))
            if rng.random() < flush_p:
                alloc.flush()
    free(sorted(held))
    alloc.flush()
    waits = cl.q[task.base + T_LOCKS + C_FRAMES * ESIZE + E_SPINS]
    cl.close()
    return {"child": child, "allocs": seq, "holds": holds, "not_zero": not_zero,
            "clobbered": clobbered, "frame_waits": waits, "t_start": t_start, "t_end": now()}


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["alloc-child"])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--row", type=int, required=True)
    ap.add_argument("--child", type=int, required=True)
    ap.add_argument("--ops", type=int, default=3000)
    ap.add_argument("--hold", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flush-p", type=float, default=0.1)
    ap.add_argument("--alloc-p", type=float, default=0.55)
    ap.add_argument("--free-max", type=int, default=16)
    ap.add_argument("--peers", default="", help="rows of the sibling children")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = alloc_child(a.cluster, a.row, a.child, a.ops, a.hold, a.seed, a.flush_p, a.alloc_p,
                      a.free_max, [int(p) for p in a.peers.split(",") if p])
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
