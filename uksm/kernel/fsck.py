"""fsck: the invariants of the emulated machine, checked and (for recovery)
rebuilt.

With every pte lock and zone_lock held ("the world stopped") a frame's
count must equal the PTEs that map it plus the frames live tasks hold in
flight; the free stack must be exactly the free frames; a KSM frame is
mapped read-only everywhere and still holds the bytes its stable-tree key
was computed from; a frame mapped more than once (a fork's copy-on-write)
is read-only in each mapping; every mm's rss and KSM mappings match its page table;
mm_count (the reference bits) matches the references that exist; the slot
list is well formed; ksmd's counters add up (read under ksm_thread_mutex,
which ksmd publishes them under).

``rebuild`` is the repair the supervisor runs after a SIGKILL: recompute
every count from the page tables, free what nothing references (a frame a
dead task had in flight, or was half-way through freeing), fix rss.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import compress
from typing import TYPE_CHECKING

import mmh3
import posix_ipc

from uksm.kernel.ksm import slot_prev, slots
from uksm.kernel.layout import (
    A_FREE_TOP,
    F_KSM,
    FR_AUX,
    FR_COUNT,
    FR_FLAGS,
    FR_KEY0,
    FR_KEY1,
    FRAME_SIZE,
    H_KSM_UNSYNCED,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    K_PAGES_UNSHARED,
    K_PAGES_VOLATILE,
    K_RMAP_ITEMS,
    M_EXIT_STAGE,
    M_ID,
    M_KSM_MAPPED,
    M_MERGING,
    M_REFS,
    M_RMAP_ITEMS,
    M_RSS,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    MS_FREEING,
    MS_ZOMBIE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    REF_KSM,
    REF_USERS,
    T_FLIGHT_MM,
    T_FLIGHT_PFN,
    T_FLIGHT_VPN,
    TS_ALIVE,
    TS_REAPING,
    XS_MMDROP,
    XS_USERS0,
)
from uksm.kernel.locks import take_raw
from uksm.kernel.memory import held_at_zero

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.mm import MM


@contextmanager
def world_stopped(cl: "Cluster", mms: dict[int, "MM"], owned_ptl: frozenset[int] | set[int] = frozenset(),
                  own_zone: bool = False, abort: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold every pte lock (in mm id order) and then zone_lock.  The
    caller is the supervisor (trusted, never killed), so these raw
    acquisitions are not recorded (``locks.take_raw``).  ``owned_*``:
    already held (taken over from a dead task).  ``abort()`` is polled
    while blocked: HolderDied if a holder died, so that its recovery can
    come first."""
    taken: list[posix_ipc.Semaphore] = []
    try:
        for mm_id in sorted(mms):
            if mm_id in owned_ptl:
                continue
            sem = mms[mm_id].ptl.sem
            take_raw(sem, abort)
            taken.append(sem)
        if not own_zone:
            take_raw(cl.zone.sem, abort)
            taken.append(cl.zone.sem)
        yield
    finally:
        for sem in reversed(taken):
            sem.release()


def live_task_rows(cl: "Cluster") -> set[int]:
    return {r for r in range(cl.max_tasks) if cl.trow(r).state in (TS_ALIVE, TS_REAPING)}


def references(cl: "Cluster", mms: dict[int, "MM"]) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Per frame: PTEs mapping it + live in-flight holds; per mm: (rss, ksm)."""
    q, fq = cl.q, cl.fq
    refs = [0] * cl.nframes
    per_mm: dict[int, tuple[int, int]] = {}
    for mm_id, mm in mms.items():
        pq = mm.pq
        rss = ksm = 0
        for slot in range(PT_OFF, PT_OFF + mm.pt_top):  # what is backed (MS_PT_TOP)
            pte = pq[slot]
            if pte:
                pfn = pte >> 2
                if 0 <= pfn < cl.nframes:
                    refs[pfn] += 1
                    if fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
                        ksm += 1
                rss += 1
        per_mm[mm_id] = (rss, ksm)
    live = live_task_rows(cl)
    for r in live:
        b = cl.tbase(r)
        pfn = q[b + T_FLIGHT_PFN]
        if 0 <= pfn < cl.nframes and not _mapped_at(cl, mms, q[b + T_FLIGHT_MM], q[b + T_FLIGHT_VPN], pfn):
            refs[pfn] += 1
    return refs, per_mm


def _mapped_at(cl: "Cluster", mms: dict[int, "MM"], mm_id: int, vpn: int, pfn: int) -> bool:
    mm = mms.get(mm_id)
    if mm is None or not 0 <= vpn < mm.pt_top:
        return False
    pte = mm.pq[PT_OFF + vpn]
    return bool(pte) and pte >> 2 == pfn


def check(cl: "Cluster", mms: dict[int, "MM"], counters: bool = True) -> list[str]:
    """Every invariant; the caller holds the world stopped (and
    ksm_thread_mutex when ``counters``).  Returns the errors found."""
    q, fq = cl.q, cl.fq
    errs: list[str] = []
    refs, per_mm = references(cl, mms)
    live = live_task_rows(cl)
    # frames.  The free stack and the frame table are read in bulk (C
    # loops: tolist, set, compress) and only the frames that may break a
    # rule go through the per-frame checks below, in pfn order as before:
    # after a run every frame is free, and the per-frame loop over all of
    # them was most of the final fsck's 50 ms, which every run's end waits for.
    n = cl.nframes
    top = q[A_FREE_TOP]
    top_ok = 0 <= top <= n
    if not top_ok:
        # the stack holds at most every frame: a top outside is the fault,
        # and with it nothing says which frames are free -- the per-frame
        # checks below are skipped rather than report every frame
        errs.append(f"free stack top {top} outside 0..{n}")
        top = 0
    stack = fq[cl.stack_off:cl.stack_off + top].tolist()
    on_stack = set(stack)
    if len(on_stack) != top or (top and not (0 <= min(stack) and max(stack) < n)):
        on_stack = set()  # a bad stack: name each bad entry, word by word
        for i in range(top):
            pfn = fq[cl.stack_off + i]
            if not 0 <= pfn < n:
                errs.append(f"free stack[{i}] holds invalid frame {pfn}")
            elif pfn in on_stack:
                errs.append(f"frame {pfn} is on the free stack twice")
            else:
                on_stack.add(pfn)
    span = n * FRAME_SIZE
    # a free frame with a count, flags or a mapping, and every frame not free
    odd = (set(compress(range(n), fq[FR_COUNT:span:FRAME_SIZE].tolist()))
           | set(compress(range(n), fq[FR_FLAGS:span:FRAME_SIZE].tolist()))
           | set(compress(range(n), refs)))
    odd &= on_stack
    if len(on_stack) < n:
        odd |= set(range(n)).difference(on_stack)
    if not top_ok:
        odd = set()
    for pfn in sorted(odd):
        b = pfn * FRAME_SIZE
        count, flags = fq[b + FR_COUNT], fq[b + FR_FLAGS]
        if pfn in on_stack:
            if count or flags:
                errs.append(f"frame {pfn} is free but has count {count} flags {flags}")
            if refs[pfn]:
                errs.append(f"frame {pfn} is free but mapped {refs[pfn]} times")
            continue
        if count == 0:
            if held_at_zero(flags, fq[b + FR_AUX], live):
                continue  # being freed by a live task, or in its per-task list
            errs.append(f"frame {pfn} leaked: count 0, not on the free stack (flags {flags})")
            continue
        if count != refs[pfn]:
            what = "leaked (nothing maps it)" if refs[pfn] == 0 else "miscounted"
            errs.append(f"frame {pfn} {what}: count {count}, references {refs[pfn]}")
        if flags & F_KSM and count:
            p = pfn * PAGE_SIZE
            d = mmh3.mmh3_x64_128_digest(cl.pool.mv[p:p + PAGE_SIZE])
            if (int.from_bytes(d[:8], "little", signed=True) != fq[b + FR_KEY0]
                    or int.from_bytes(d[8:], "little", signed=True) != fq[b + FR_KEY1]):
                errs.append(f"KSM frame {pfn} no longer matches its stable-tree key")
    # page tables and mm rows
    for mm_id, mm in mms.items():
        pq = mm.pq
        for slot in range(PT_OFF, PT_OFF + mm.pt_top):  # what is backed (MS_PT_TOP)
            pte = pq[slot]
            if not pte:
                continue
            pfn = pte >> 2
            vpn = slot - PT_OFF
            if not pte & PTE_PRESENT or not 0 <= pfn < cl.nframes:
                errs.append(f"mm{mm_id} vpn {vpn:#x}: invalid PTE {pte:#x}")
            elif pfn in on_stack:
                errs.append(f"mm{mm_id} vpn {vpn:#x} maps free frame {pfn}")
            elif pte & PTE_WRITE and fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
                errs.append(f"mm{mm_id} vpn {vpn:#x} maps KSM frame {pfn} writable")
            elif pte & PTE_WRITE and refs[pfn] > 1:
                # fork's copy_one_pte write-protects a page in both tasks:
                # a writable mapping of a shared page writes into the other's
                errs.append(f"mm{mm_id} vpn {vpn:#x} maps frame {pfn} writable, shared by "
                            f"{refs[pfn]} mappings (copy-on-write lost)")
        b = mm.base
        if q[b + M_ID] != mm_id:
            continue
        rss, ksm = per_mm[mm_id]
        if q[b + M_RSS] != rss or q[b + M_KSM_MAPPED] != ksm:
            errs.append(f"mm{mm_id}: rss {q[b + M_RSS]} / ksm-mapped {q[b + M_KSM_MAPPED]} "
                        f"but the page table says {rss} / {ksm}")
    errs += check_mm_rows(cl)
    if counters:
        errs += check_counters(cl)
    return errs


def check_live(cl: "Cluster", mms: dict[int, "MM"]) -> list[str]:
    """fsck on a running cluster: ksm_thread_mutex first (ksmd between
    batches, its counters a consistent snapshot), then the world stopped
    (every pte lock, zone_lock), then ksm_mmlist_lock -- last: nothing is
    ever taken under it, so holding the pte locks and zone_lock here
    cannot deadlock."""
    cl.task.lock(cl.daemon)
    try:
        with world_stopped(cl, mms):
            cl.task.lock(cl.mmlist)
            try:
                return check(cl, mms, counters=True)
            finally:
                cl.task.unlock(cl.mmlist)
    finally:
        cl.task.unlock(cl.daemon)


def check_leaks(cl: "Cluster") -> list[str]:
    """After every task has gone: an mm never freed, a frame still in use."""
    q = cl.q
    errs = []
    for r in range(cl.max_mms):
        b = cl.mbase(r)
        if q[b + M_ID]:
            st = q[b + M_STATE]
            why = "held by its mm_slot, ksmd not running" if st == MS_ZOMBIE else f"state {st}"
            errs.append(f"leak: mm{q[b + M_ID]} never freed ({why}; mm_count "
                        f"{bin(q[b + M_REFS]).count('1')})")
    used = cl.nframes - q[A_FREE_TOP]
    if used:
        errs.append(f"leak: {used} frames still in use after every task exited")
    return errs


def check_counters(cl: "Cluster") -> list[str]:
    """ksmd's counters add up.  They are published together under
    ksm_thread_mutex, which the caller holds: a consistent snapshot."""
    q = cl.q
    errs = []
    rmap = q[K_RMAP_ITEMS]
    shared, sharing, unshared = q[K_PAGES_SHARED], q[K_PAGES_SHARING], q[K_PAGES_UNSHARED]
    volatile = q[K_PAGES_VOLATILE]
    if shared + sharing + unshared + volatile != rmap or volatile < 0:
        errs.append(f"counters: shared {shared} + sharing {sharing} + unshared {unshared} + "
                    f"volatile {volatile} != rmap_items {rmap}")
    if q[H_KSM_UNSYNCED]:
        # a legacy __ksm_exit freed a slot since ksmd's last batch: the
        # counters still include its rmap_items until ksmd reconciles
        return errs
    rows = [cl.mbase(r) for r in range(cl.max_mms) if (m := cl.mrow(r)).id and m.slot_used]
    for r in range(cl.max_mms):
        m = cl.mrow(r)
        if not m.id:
            continue
        if not m.slot_used and (m.rmap_items or m.merging):
            # no mm_slot, so no rmap_items: its last ones were freed with it
            errs.append(f"counters: mm{m.id} has no mm_slot but ksm_rmap_items {m.rmap_items}, "
                        f"ksm_merging_pages {m.merging}")
        elif m.merging > m.rmap_items:
            errs.append(f"counters: mm{m.id} ksm_merging_pages {m.merging} > ksm_rmap_items "
                        f"{m.rmap_items}")
    per = sum(q[b + M_RMAP_ITEMS] for b in rows)
    if per != rmap:
        errs.append(f"counters: rmap_items {rmap} but the mms' ksm_rmap_items add up to {per}")
    merging = sum(q[b + M_MERGING] for b in rows)
    if merging != shared + sharing:
        errs.append(f"counters: shared + sharing = {shared + sharing} but the mms' "
                    f"ksm_merging_pages add up to {merging}")
    return errs


def check_mm_rows(cl: "Cluster") -> list[str]:
    """mm_count against the references that exist; the slot list."""
    q = cl.q
    errs = []
    linked = slots(cl)
    # the back links along the list, each slot once: a cycle is one error
    # (not one per turn of the walk), and has no last slot for the head.
    # slots() stops after max_mms + 1 steps, so a cycle repeats a slot.
    cycle = len(set(linked)) != len(linked)
    if cycle:
        errs.append("mm_slot list does not end (a cycle)")
    prev = cl.head
    seen: set[int] = set()
    for s in linked:
        if s in seen:
            break
        seen.add(s)
        if slot_prev(cl, s) != prev:
            errs.append(f"mm_slot list: slot {s} has a wrong back link")
        prev = s
    if not cycle and slot_prev(cl, cl.head) != prev:
        errs.append("mm_slot list: ksm_mm_head has a wrong back link")
    for r in range(cl.max_mms):
        b = cl.mbase(r)
        mm_id = q[b + M_ID]
        if not mm_id or q[b + M_STATE] == MS_FREEING:
            continue
        refs = q[b + M_REFS]
        stage = q[b + M_EXIT_STAGE]
        if stage & XS_USERS0 and not stage & XS_MMDROP:
            continue  # an exit in flight (maybe a reaper finishing a killed task's): not yet settled
        if bool(refs & REF_USERS) != (q[b + M_USERS] > 0):
            errs.append(f"mm{mm_id}: mm_users {q[b + M_USERS]} but the users' mm_count reference "
                        f"is {'held' if refs & REF_USERS else 'dropped'}")
        if bool(refs & REF_KSM) != bool(q[b + M_SLOT_USED]):
            errs.append(f"mm{mm_id}: mm_slot {'present' if q[b + M_SLOT_USED] else 'absent'} but "
                        f"the slot's mm_count reference is {'held' if refs & REF_KSM else 'dropped'}")
        if q[b + M_SLOT_USED] and r not in linked:
            errs.append(f"mm{mm_id}: has an mm_slot that is not on the list")
        if not q[b + M_SLOT_USED] and r in linked:
            errs.append(f"mm{mm_id}: a freed mm_slot is still on the list")
        if not refs:
            errs.append(f"mm{mm_id}: mm_count is 0 but the mm is not freed")
    ids = [i for r in range(cl.max_mms) if (i := cl.mrow(r).id)]
    if len(ids) != len(set(ids)):
        errs.append("an mm id appears in two rows")
    return errs


def rebuild(cl: "Cluster", mms: dict[int, "MM"]) -> int:
    """After a death: make every count equal its references, free every
    frame nothing references, fix rss; the world is stopped.
    Returns the number of frames whose count was changed."""
    from uksm.kernel.memory import rebuild_free_stack
    q, fq = cl.q, cl.fq
    refs, per_mm = references(cl, mms)
    live = live_task_rows(cl)
    fixed = 0
    for pfn in range(cl.nframes):
        b = pfn * FRAME_SIZE
        if fq[b + FR_COUNT] != refs[pfn]:
            if not (refs[pfn] == 0 and held_at_zero(fq[b + FR_FLAGS], fq[b + FR_AUX], live)):
                fixed += 1
            fq[b + FR_COUNT] = refs[pfn]
    for r in range(cl.max_tasks):
        if r not in live:
            cl.trow(r).flight_pfn = -1
    for mm_id, mm in mms.items():
        b = mm.base
        if q[b + M_ID] == mm_id:
            q[b + M_RSS], q[b + M_KSM_MAPPED] = per_mm[mm_id]
    rebuild_free_stack(cl, live)
    return fixed


def wait_settled(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
