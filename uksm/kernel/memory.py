"""Physical memory: the frame pool, the frame table and the allocator.

Emulates ``struct page`` (``_count``, ``PageAnon``, ``PageKsm``) and the buddy
allocator's order-0 path with its ``__alloc_pages_slowpath`` retry loop.

``zone_lock`` protects the free stack and every frame's count and flags.  A
frame's count is the number of PTEs that map it, plus one while a task has
it "in flight" (allocated, not yet installed: recorded in the task row's
T_FLIGHT_*, so that a SIGKILL there does not leak it).  Nobody takes a
reference without holding the pte lock of the mapping or zone_lock, so a
task holding every pte lock and zone_lock sees counts that equal the PTEs
(``fsck`` and the recovery rebuild rely on it).

A task may keep a small per-task list of free frames (``Allocator(cl,
batch=PCP_BATCH)``; the kernel's per-CPU page lists, ``rmqueue_bulk``): it
takes up to ``batch`` frames off the free stack under one zone_lock hold,
backs them with tmpfs pages in one call per run (``Segment.populate``),
and then allocates from the list without zone_lock, as the kernel takes a
page off its CPU's list without zone->lock.  A listed frame has count 0
and F_PCP, owner in FR_AUX: not free (the kernel's NR_FREE_PAGES does not
count per-CPU pages either) and not leaked while its task lives; a dead
task's are freed by ``rebuild_free_stack`` like its FREEING frames
(``held_at_zero``).  The list is drained at exit (``drain``).  Small
pools get no lists (the batch scales with the free frames, as
``zone_batchsize`` does with the zone).

Freeing gives the frame's memory back to the host: the frame is marked
FREEING (owner in FR_AUX), collected, its range punched out of the pool
(``MADV_REMOVE``) in runs, then pushed on the free stack.  A punched frame
reads back as zeros, so a new anonymous page needs no clearing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from uksm.kernel import sched
from uksm.kernel.layout import (
    A_FREE_TOP,
    C_FRAMES,
    F_ANON,
    F_FREEING,
    F_PCP,
    FR_AUX,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    H_FRAMES_FREED,
    H_MEM_LIMIT,
    H_PENDING_FREE,
    PAGE_SIZE,
    T_FATAL,
    T_FLIGHT_MM,
    T_FLIGHT_PFN,
    T_FLIGHT_VPN,
)

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.locks import Task

FLUSH_AT = 256
NO_ROOM = -2  # _take: /dev/shm could not back the frame
PCP_BATCH = 32      # frames a per-task list takes off the free stack at once
PCP_SHIFT = 12      # ... but at most 1/4096 of the free frames: none below 8192 free


def held_at_zero(flags: int, aux: int, live: set[int]) -> bool:
    """A frame at count 0, off the free stack, that a live task holds:
    it is freeing it (F_FREEING) or has it in its per-task list (F_PCP)."""
    return bool(flags & (F_FREEING | F_PCP)) and aux - 1 in live


class OutOfMemory(Exception):
    """VM_FAULT_OOM: the allocating task was chosen or told to die."""


class Allocator:
    """One per task: its pending frees and its in-flight frame."""

    def __init__(self, cl: "Cluster", batch: int = 0) -> None:
        self.cl = cl
        self.q = cl.q
        self.fq = cl.fq
        self.pending: list[int] = []
        self.batch = batch        # per-task list size (0: none, every frame off the stack)
        self.pcp: list[int] = []  # our per-task list: F_PCP frames, populated
        # out_of_memory(cl, task), invoked when the pool is empty (uksm.kernel.oom)
        self.oom_killer: Callable[["Cluster", "Task"], int] | None = None

    # -- allocation -------------------------------------------------------
    def _pop(self, mm: int, vpn: int) -> int:
        """Take a frame off the free stack (caller holds zone_lock)."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        q, fq = self.q, self.fq
        top = q[A_FREE_TOP]
        limit = q[H_MEM_LIMIT]  # mem=: frames beyond it do not exist
        if top == 0 or (limit and self.cl.nframes - top >= limit):
            return -1
        pfn = fq[self.cl.stack_off + top - 1]
        self.in_flight(mm, vpn, pfn)
        q[A_FREE_TOP] = top - 1  # commit
        return pfn

    def in_flight(self, mm: int, vpn: int, pfn: int) -> int:
        """The task's T_FLIGHT names the frame first, then the frame gets
        its count (the flight's reference) and its flags.  Returns ``pfn``.

        A frame off our list goes in flight without zone_lock (only we
        change an F_PCP frame of ours), and handle_mm_fault does it itself
        when the list has one (a call layer less on every first touch).
        Every step leaves a state fsck accepts and the recovery repairs:
        T_FLIGHT names the frame first (a count 0 F_PCP frame of a live
        task is not a leak; once its count is 1 the flight accounts for
        it), then its count, then its flags."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        q, fq = self.q, self.fq
        t = self.cl.task.base
        q[t + T_FLIGHT_MM] = mm
        q[t + T_FLIGHT_VPN] = vpn
        q[t + T_FLIGHT_PFN] = pfn
        b = pfn * FRAME_SIZE
        fq[b + FR_COUNT] = 1
        fq[b + FR_FLAGS] = F_ANON
        fq[b + FR_AUX] = 0
        return pfn

    def alloc_frame(self, mm: int, vpn: int, fatal_ok: bool = True,
                    give_up: Callable[[], bool] | None = None) -> int:
        """alloc_page(GFP_HIGHUSER_MOVABLE): a zero-filled frame with count 1,
        in flight for (mm, vpn) until ``installed``.

        When the pool is empty: free our own pending frames, invoke the OOM
        killer (at most one victim on its way out at a time, as
        out_of_memory does), wait for frames and retry -- never giving up on
        our own.  Only a task that is itself dying (a fatal signal pending:
        the OOM victim, say) gets OutOfMemory, as VM_FAULT_OOM; and a
        caller's ``give_up`` (ksmd told to stop: a wait for memory must not
        outlive the cluster) ends the wait with OutOfMemory too.
        """
        pfn = self._take(mm, vpn)
        if pfn >= 0:
            return pfn
        cl, task = self.cl, self.cl.task
        waiting = False
        try:
            while True:
                if self.pending:
                    self.flush()
                elif (fatal_ok and self.q[task.base + T_FATAL]) or (give_up is not None and give_up()):
                    raise OutOfMemory()
                else:
                    if not waiting:
                        task.wait_begin(C_FRAMES)
                        waiting = True
                    if self.oom_killer is not None and not self.q[H_PENDING_FREE]:
                        # frames on their way back (another task's pending
                        # frees) are not an OOM: wait for them
                        self.oom_killer(cl, task)
                    seq = self.q[H_FRAMES_FREED]
                    if sched.ON:
                        # a controlled run: disabled until frames are freed
                        # or what the OOM killer decides by has changed
                        sched.blocked(sched.BLK_FRAMES, seq, int(fatal_ok))
                    for _ in range(0 if sched.ON else 50):
                        if self.q[H_FRAMES_FREED] != seq or self.q[A_FREE_TOP]:
                            break
                        time.sleep(0.002)
                    task.wait_spin(C_FRAMES)
                    if pfn == NO_ROOM:  # the host's memory, not the pool's: no hurry
                        time.sleep(0.01)
                pfn = self._take(mm, vpn)
                if pfn >= 0:
                    return pfn
        finally:
            if waiting:
                task.wait_end(C_FRAMES)

    def alloc_frame_nowait(self, mm: int, vpn: int) -> int:
        """The allocation's fast path alone (get_page_from_freelist before
        the slowpath): a frame in flight for (mm, vpn), or -1 without
        waiting, flushing or invoking the OOM killer."""
        pfn = self._take(mm, vpn)
        return pfn if pfn >= 0 else -1

    def _take(self, mm: int, vpn: int) -> int:
        """A frame off the per-task list or the free stack, its page backed
        by /dev/shm; -1 if the pool is empty, NO_ROOM if /dev/shm is full
        (another cluster's, or anyone's, use of the host's memory): then it
        is given back and the allocation goes the way of an empty pool --
        the OOM killer -- rather than a SIGBUS at the first write to it."""
        if self.batch and (self.pcp or self.refill()):
            return self.in_flight(mm, vpn, self.pcp.pop())  # (handle_mm_fault's common case)
        cl, task = self.cl, self.cl.task
        task.lock(cl.zone)
        pfn = self._pop(mm, vpn)
        task.unlock(cl.zone)
        if pfn < 0 or cl.pool.populate(pfn * PAGE_SIZE, PAGE_SIZE):
            return pfn
        task.lock(cl.zone)
        self.q[task.base + T_FLIGHT_PFN] = -1  # not in flight any more: on our pending list
        self.put_frame(pfn)
        task.unlock(cl.zone)
        self.flush()
        return NO_ROOM

    def refill(self) -> bool:
        """rmqueue_bulk: up to ``batch`` frames off the free stack into our
        list (none when free frames are few), backed by /dev/shm in one
        call per run.  True if the list has frames now.

        Crash consistency: a death holding zone_lock has the recovery
        rebuild the free stack from the frame table (F_PCP frames of a dead
        task included); after the commit the frames are F_PCP, ours, and
        freed by the recovery if we die."""
        cl, task, q, fq = self.cl, self.cl.task, self.q, self.fq
        task.lock(cl.zone)
        top = q[A_FREE_TOP]
        limit = q[H_MEM_LIMIT]
        room = min(top, limit - (cl.nframes - top)) if limit else top
        n = min(self.batch, room >> PCP_SHIFT)
        if n < 2:
            task.unlock(cl.zone)
            return False
        sb, owner = cl.stack_off, task.row + 1
        got = fq[sb + top - n:sb + top].tolist()
        for pfn in got:
            b = pfn * FRAME_SIZE
            fq[b + FR_FLAGS] = F_PCP
            fq[b + FR_AUX] = owner
        q[A_FREE_TOP] = top - n  # commit
        task.unlock(cl.zone)
        got.sort()
        pool = cl.pool
        for start, count in runs(got):
            if not pool.populate(start * PAGE_SIZE, count * PAGE_SIZE):
                # /dev/shm is full: give them all back (still zeros) and
                # let the one-frame path meet the shortage
                task.lock(cl.zone)
                self._push_free(got)
                task.unlock(cl.zone)
                return False
        got.reverse()  # popped lowest first: the task's pages in address order
        self.pcp = got
        return True

    def drain(self) -> None:
        """drain_local_pages: our list back to the free stack, punched as
        any freed frame (flush).  At exit: a list left behind would be
        frames no live task holds."""
        if not self.pcp:
            return
        cl, task, fq = self.cl, self.cl.task, self.fq
        owner = task.row + 1
        task.lock(cl.zone)
        for pfn in self.pcp:
            b = pfn * FRAME_SIZE
            fq[b + FR_AUX] = owner
            fq[b + FR_FLAGS] = F_FREEING
            self.pending.append(pfn)
        self.q[H_PENDING_FREE] += len(self.pcp)
        self.pcp = []
        task.unlock(cl.zone)
        self.flush()

    def _push_free(self, pfns: list[int]) -> None:
        """Put frames (count 0, punched or never written) on the free
        stack; caller holds zone_lock.  The top moves last: the commit."""
        q, fq, sb = self.q, self.fq, self.cl.stack_off
        top = q[A_FREE_TOP]
        for pfn in pfns:
            b = pfn * FRAME_SIZE
            fq[b + FR_FLAGS] = 0
            fq[b + FR_AUX] = 0
            fq[sb + top] = pfn
            top += 1
        q[A_FREE_TOP] = top  # commit

    def installed(self) -> None:
        """The in-flight frame is in a PTE now (caller holds the pte lock)."""
        self.q[self.cl.task.base + T_FLIGHT_PFN] = -1

    # -- references ---------------------------------------------------------
    def get_frame(self, pfn: int) -> None:
        """get_page (caller holds zone_lock)."""
        self.fq[pfn * FRAME_SIZE + FR_COUNT] += 1

    def put_frame(self, pfn: int) -> bool:
        """put_page (caller holds zone_lock): True when the frame is freed."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        fq = self.fq
        b = pfn * FRAME_SIZE
        c = fq[b + FR_COUNT] - 1
        fq[b + FR_COUNT] = c
        if c:
            return False
        fq[b + FR_AUX] = self.cl.task.row + 1
        fq[b + FR_FLAGS] = F_FREEING
        self.pending.append(pfn)
        self.q[H_PENDING_FREE] += 1
        return True

    def put_frames(self, pfns: list[int]) -> None:
        """put_page on each (takes zone_lock), then flush if many are pending."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if not pfns:
            return
        task, zone = self.cl.task, self.cl.zone
        task.lock(zone)
        for pfn in pfns:
            self.put_frame(pfn)
        task.unlock(zone)
        if len(self.pending) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Punch the pending frames out of the pool and free them."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        pend = self.pending
        if not pend:
            return
        pend.sort()
        pool = self.cl.pool
        for start, count in runs(pend):
            pool.punch(start * PAGE_SIZE, count * PAGE_SIZE)
        q, task = self.q, self.cl.task
        task.lock(self.cl.zone)
        self._push_free(pend)
        q[H_PENDING_FREE] -= len(pend)
        q[H_FRAMES_FREED] += 1
        task.unlock(self.cl.zone)
        self.pending = []


def runs(pfns: list[int]) -> list[tuple[int, int]]:
    """The sorted, distinct, non-empty ``pfns`` as (first, count) runs of consecutive frames."""
    if pfns[-1] - pfns[0] == len(pfns) - 1:
        return [(pfns[0], len(pfns))]  # one run (a list refill off a fresh stack): no walk
    out = []
    start = prev = pfns[0]
    for pfn in pfns[1:]:
        if pfn != prev + 1:
            out.append((start, prev - start + 1))
            start = pfn
        prev = pfn
    out.append((start, prev - start + 1))
    return out


def free_frames(cl: "Cluster") -> int:
    """Frames an allocation could get now (the mem= limit counts)."""
    top, limit = cl.q[A_FREE_TOP], cl.q[H_MEM_LIMIT]
    return max(0, min(top, limit - (cl.nframes - top))) if limit else top


class FrameStats(TypedDict):
    """The report's ``frames``: the pool's frames, used and free."""
    total: int
    used: int
    free: int


def frame_stats(cl: "Cluster") -> FrameStats:
    top = cl.q[A_FREE_TOP]
    return {"total": cl.nframes, "used": cl.nframes - top, "free": free_frames(cl)}


def rebuild_free_stack(cl: "Cluster", live_freeing: set[int]) -> int:
    """zone_lock repair after its holder died: the free stack becomes
    exactly the frames with count 0 that no live task is freeing.
    Caller owns zone_lock.  Returns the number of free frames."""
    fq, sb = cl.fq, cl.stack_off
    top = 0
    for pfn in range(cl.nframes):
        b = pfn * FRAME_SIZE
        if fq[b + FR_COUNT] == 0:
            if held_at_zero(fq[b + FR_FLAGS], fq[b + FR_AUX], live_freeing):
                continue
            if fq[b + FR_FLAGS]:
                cl.pool.punch(pfn * PAGE_SIZE, PAGE_SIZE)
            fq[b + FR_FLAGS] = 0
            fq[b + FR_AUX] = 0
            fq[sb + top] = pfn
            top += 1
    cl.q[A_FREE_TOP] = top
    cl.q[H_PENDING_FREE] = sum(1 for pfn in range(cl.nframes)
                               if cl.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_FREEING)
    cl.q[H_FRAMES_FREED] += 1
    return top
