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

The task and mm rows are read through their views (``cl.trow``,
``cl.mrow``, ``mm.words``).  The walks over every frame and every PTE stay
raw, each marked ``# hot path``: they run on every fsck (the final one
every run's end waits for, and each recovery's ``rebuild``), over as many
frames and PTEs as the cluster has, and a view there costs 2 to 3.4 times
the loop (``dev/bench_views.py``).
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
    F_ZERO,
    FR_AUX,
    FR_COUNT,
    FR_FLAGS,
    FR_KEY0,
    FR_KEY1,
    FRAME_SIZE,
    H_KSM_UNSYNCED,
    K_MAX_PAGE_SHARING,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    K_PAGES_UNSHARED,
    K_PAGES_VOLATILE,
    K_RMAP_ITEMS,
    K_STABLE_NODE_CHAINS,
    K_STABLE_NODE_DUPS,
    K_STABLE_NODES,
    K_ZERO_PAGES,
    M_ID,
    M_ZERO_PAGES,
    MMS_FREEING,
    MMS_ZOMBIE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    R_KSMD,
    REF_KSM,
    REF_USERS,
    TS_ALIVE,
    TS_REAPING,
    XS_MMDROP,
    XS_USERS0,
    ZERO_PFN,
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
    fq = cl.fq
    refs = [0] * cl.nframes
    per_mm: dict[int, tuple[int, int]] = {}
    # 6.18: the zero page's reservation is a reference (cluster.reserve_zero_page),
    # and a zero PTE is not in rss (replace_page's dec_mm_counter)
    zero = ZERO_PFN if cl.modern else -1
    if zero >= 0:
        refs[zero] += 1
    for mm_id, mm in mms.items():
        pq = mm.pq
        rss = ksm = 0
        # hot path: raw words (every PTE of every mm; through mm.pte(vpn) the
        # walk took 41 us against 20 per 504 PTEs, dev/bench_views.py, the
        # 2-core dev VM at load 2.2)
        for slot in range(PT_OFF, PT_OFF + mm.pt_top):  # what is backed (SEG_PT_TOP)
            pte = pq[slot]
            if pte:
                pfn = pte >> 2
                if 0 <= pfn < cl.nframes:
                    refs[pfn] += 1
                    if fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
                        ksm += 1
                if pfn != zero:
                    rss += 1
        per_mm[mm_id] = (rss, ksm)
    for r in live_task_rows(cl):
        t = cl.trow(r)
        pfn = t.flight_pfn
        if 0 <= pfn < cl.nframes and not _mapped_at(cl, mms, t.flight_mm, t.flight_vpn, pfn):
            refs[pfn] += 1
    return refs, per_mm


def _mapped_at(cl: "Cluster", mms: dict[int, "MM"], mm_id: int, vpn: int, pfn: int) -> bool:
    mm = mms.get(mm_id)
    if mm is None or not 0 <= vpn < mm.pt_top:
        return False
    pte = mm.pte(vpn)
    return bool(pte) and pte >> 2 == pfn


def check(cl: "Cluster", mms: dict[int, "MM"], counters: bool = True) -> list[str]:
    """Every invariant; the caller holds the world stopped (and
    ksm_thread_mutex when ``counters``).  Returns the errors found."""
    refs, per_mm = references(cl, mms)
    errs, on_stack = check_free_stack(cl)
    if on_stack is not None:
        errs += check_frames(cl, refs, on_stack)
    for mm in mms.values():
        errs += check_page_table(cl, mm, on_stack or set(), refs)
        errs += check_rss(cl, mm, per_mm[mm.id])
    if cl.modern:
        errs += check_zero_pages(cl, mms)
    errs += check_mm_rows(cl)
    if counters:
        errs += check_counters(cl)
        errs += check_ksmd_flight(cl)
    return errs


def check_ksmd_flight(cl: "Cluster") -> list[str]:
    """Outside a batch ksmd holds no frame in flight: every frame it
    allocates -- try_to_merge_two_pages' kpage (2.6.32), break_cow's
    copy -- is mapped or put back before the batch lets ksm_thread_mutex
    go, which the caller holds.  A kpage left named on ksmd's row would
    be counted as referenced after its last mapping went."""
    errs = []
    for r in live_task_rows(cl):
        t = cl.trow(r)
        if t.role == R_KSMD and t.flight_pfn >= 0:
            errs.append(f"ksmd holds frame {t.flight_pfn} in flight outside a batch")
    return errs


def zero_ptes(cl: "Cluster", mms: dict[int, "MM"]) -> dict[int, int]:
    """6.18: per mm, the PTEs that map the zero page (every one KSM-placed:
    is_ksm_zero_pte)."""
    want = ZERO_PFN << 2 | PTE_PRESENT
    return {mm_id: mm.pq[PT_OFF:PT_OFF + mm.pt_top].tolist().count(want) for mm_id, mm in mms.items()}


def check_zero_pages(cl: "Cluster", mms: dict[int, "MM"]) -> list[str]:
    """6.18's ksm_zero_pages (6.6, e2942062e01d; per mm 6080d19f0704)
    against the page tables: each mm's count is its zero PTEs, and the
    global one all of them (a fork adds its copies: fork.copy_page_range).
    The counts change under the mm's pte lock and zone_lock, with the PTE
    (ksm618.replace_with_zero_page, mmu.ksm_might_unmap_zero_page)."""
    errs = []
    per = zero_ptes(cl, mms)
    for mm_id, mm in mms.items():
        have = cl.q[mm.base + M_ZERO_PAGES]
        if cl.q[mm.base + M_ID] == mm_id and have != per[mm_id]:
            errs.append(f"mm{mm_id}: ksm_zero_pages {have} but the page table maps the zero page "
                        f"{per[mm_id]} times")
    want = sum(per.values())
    if cl.q[K_ZERO_PAGES] != want:
        errs.append(f"ksm_zero_pages {cl.q[K_ZERO_PAGES]} but the page tables map the zero page "
                    f"{want} times")
    return errs


def check_free_stack(cl: "Cluster") -> tuple[list[str], set[int] | None]:
    """The free stack (the buddy allocator's free lists' stand-in): its top
    in range, each entry a frame, none twice.  Returns the errors and the
    frames on it, or None for a top outside the stack: then nothing says
    which frames are free, and the per-frame checks are skipped rather
    than report every frame."""
    fq, n = cl.fq, cl.nframes
    top = cl.q[A_FREE_TOP]
    if not 0 <= top <= n:
        # the stack holds at most every frame: a top outside is the fault
        return [f"free stack top {top} outside 0..{n}"], None
    errs: list[str] = []
    # read in bulk (C loops: tolist, set); word by word only when bad
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
    return errs, on_stack


def check_frames(cl: "Cluster", refs: list[int], on_stack: set[int]) -> list[str]:
    """Each frame (struct page) against what references it: a free frame
    has no count, flags or mapping; a frame in use has page_count equal to
    its references (PTEs, live in-flight holds), or is held at count 0 by a
    live task freeing it; a KSM frame still holds its stable-tree key's bytes.

    The frame table is read in bulk (C loops: tolist, set, compress) and
    only the frames that may break a rule go through the per-frame checks,
    in pfn order: after a run every frame is free, and the per-frame loop
    over all of them was most of the final fsck's 50 ms, which every run's
    end waits for."""
    fq, n = cl.fq, cl.nframes
    errs: list[str] = []
    live = live_task_rows(cl)
    span = n * FRAME_SIZE
    # a free frame with a count, flags or a mapping, and every frame not free
    odd = (set(compress(range(n), fq[FR_COUNT:span:FRAME_SIZE].tolist()))
           | set(compress(range(n), fq[FR_FLAGS:span:FRAME_SIZE].tolist()))
           | set(compress(range(n), refs)))
    odd &= on_stack
    if len(on_stack) < n:
        odd |= set(range(n)).difference(on_stack)
    # hot path: raw words (every frame in use: a frame view made per frame,
    # a Words row like MmRow, took the loop from 326 us to 1108 per 4096
    # frames, dev/bench_views.py, the 2-core dev VM at load 2.2)
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
        if flags & F_KSM and stable_key_stale(cl, pfn):
            errs.append(f"KSM frame {pfn} no longer matches its stable-tree key")
    return errs


def stable_key_stale(cl: "Cluster", pfn: int) -> bool:
    """A KSM frame's bytes no longer hash to the key its stable-tree node
    was made with (FR_KEY0, FR_KEY1): written behind the write protection."""
    fq, p = cl.fq, pfn * PAGE_SIZE
    d = mmh3.mmh3_x64_128_digest(cl.pool.mv[p:p + PAGE_SIZE])
    return (int.from_bytes(d[:8], "little", signed=True) != fq[pfn * FRAME_SIZE + FR_KEY0]
            or int.from_bytes(d[8:], "little", signed=True) != fq[pfn * FRAME_SIZE + FR_KEY1])


def check_page_table(cl: "Cluster", mm: "MM", on_stack: set[int], refs: list[int]) -> list[str]:
    """Every present PTE of ``mm`` maps a frame in use, and a KSM frame
    only read-only (write_protect_page's rule: a write must fault and
    break_cow), and a frame of ``refs`` mappings > 1 too (fork's COW)."""
    fq, pq = cl.fq, mm.pq
    errs: list[str] = []
    # hot path: raw words (every PTE: through mm.pte(vpn), 41 us against 20
    # per 504 PTEs, dev/bench_views.py, the 2-core dev VM at load 2.2)
    for slot in range(PT_OFF, PT_OFF + mm.pt_top):  # what is backed (SEG_PT_TOP)
        pte = pq[slot]
        if not pte:
            continue
        pfn = pte >> 2
        vpn = slot - PT_OFF
        if not pte & PTE_PRESENT or not 0 <= pfn < cl.nframes:
            errs.append(f"mm{mm.id} vpn {vpn:#x}: invalid PTE {pte:#x}")
        elif pfn in on_stack:
            errs.append(f"mm{mm.id} vpn {vpn:#x} maps free frame {pfn}")
        elif pte & PTE_WRITE and fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
            errs.append(f"mm{mm.id} vpn {vpn:#x} maps KSM frame {pfn} writable")
        elif pte & PTE_WRITE and refs[pfn] > 1:
            # fork's copy_one_pte write-protects a page in both tasks:
            # a writable mapping of a shared page writes into the other's
            errs.append(f"mm{mm.id} vpn {vpn:#x} maps frame {pfn} writable, shared by "
                        f"{refs[pfn]} mappings (copy-on-write lost)")
    return errs


def check_rss(cl: "Cluster", mm: "MM", counted: tuple[int, int]) -> list[str]:
    """``mm``'s rss (2.6.32's anon_rss) and KSM mappings against
    ``counted``, what its page table maps (``references``); nothing for a
    row that no longer holds ``mm``."""
    m = mm.words
    if m.id != mm.id:
        return []
    rss, ksm = counted
    if m.rss != rss or m.ksm_mapped != ksm:
        return [f"mm{mm.id}: rss {m.rss} / ksm-mapped {m.ksm_mapped} "
                f"but the page table says {rss} / {ksm}"]
    return []


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
    errs = []
    for r in range(cl.max_mms):
        m = cl.mrow(r)
        if m.id:
            st = m.state
            why = "held by its mm_slot, ksmd not running" if st == MMS_ZOMBIE else f"state {st}"
            errs.append(f"leak: mm{m.id} never freed ({why}; mm_count {bin(m.refs).count('1')})")
    used = cl.nframes - cl.q[A_FREE_TOP]
    if cl.modern:
        # 6.18: the zero page is reserved for ever (cluster.reserve_zero_page),
        # its count back to the reservation alone, and nothing counted in it
        used -= 1
        zb = ZERO_PFN * FRAME_SIZE
        if cl.fq[zb + FR_COUNT] != 1 or not cl.fq[zb + FR_FLAGS] & F_ZERO:
            errs.append(f"leak: the zero page's count is {cl.fq[zb + FR_COUNT]} after every task exited")
        if cl.q[K_ZERO_PAGES]:
            errs.append(f"ksm_zero_pages is {cl.q[K_ZERO_PAGES]} after every task exited")
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
    errs += check_chains(cl)
    if q[H_KSM_UNSYNCED]:
        # a legacy __ksm_exit freed a slot since ksmd's last batch: the
        # counters still include its rmap_items until ksmd reconciles
        return errs
    rows = [m for r in range(cl.max_mms) if (m := cl.mrow(r)).id and m.slot_used]
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
    per = sum(m.rmap_items for m in rows)
    if per != rmap:
        errs.append(f"counters: rmap_items {rmap} but the mms' ksm_rmap_items add up to {per}")
    merging = sum(m.merging for m in rows)
    if merging != shared + sharing:
        errs.append(f"counters: shared + sharing = {shared + sharing} but the mms' "
                    f"ksm_merging_pages add up to {merging}")
    return errs


def check_chains(cl: "Cluster") -> list[str]:
    """The stable tree's chain invariants, on the published counters (one
    snapshot, under ksm_thread_mutex).  6.18 (4.13, 2c653d0ee2ae): a dup
    lives only in a chain (a chain may be empty a while: freed when a
    search meets it), every dup and every plain node is one KSM page
    (K_STABLE_NODES counts them), pages_shared counts the ones with an
    rmap_item, and max_page_sharing is at least 2
    (max_page_sharing_store).  2.6.32 has no chains."""
    q = cl.q
    chains, dups, nodes = q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES]
    if not cl.modern:
        return [f"counters: stable_node_chains {chains}, stable_node_dups {dups} under 2.6.32"] \
            if chains or dups else []
    errs = []
    if chains < 0 or dups < 0 or (dups and not chains):
        errs.append(f"counters: stable_node_dups {dups} with stable_node_chains {chains}")
    if dups > nodes or q[K_PAGES_SHARED] > nodes:
        errs.append(f"counters: stable_node_dups {dups} or pages_shared {q[K_PAGES_SHARED]} > the "
                    f"stable tree's KSM pages {nodes}")
    if q[K_MAX_PAGE_SHARING] < 2:
        errs.append(f"knob: max_page_sharing {q[K_MAX_PAGE_SHARING]} < 2")
    return errs


def check_mm_rows(cl: "Cluster") -> list[str]:
    """mm_count against the references that exist; the slot list."""
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
        m = cl.mrow(r)
        mm_id = m.id
        if not mm_id or m.state == MMS_FREEING:
            continue
        refs = m.refs
        stage = m.exit_stage
        if stage & XS_USERS0 and not stage & XS_MMDROP:
            continue  # an exit in flight (maybe a reaper finishing a killed task's): not yet settled
        users, slot_used = m.users, m.slot_used
        if bool(refs & REF_USERS) != (users > 0):
            errs.append(f"mm{mm_id}: mm_users {users} but the users' mm_count reference "
                        f"is {'held' if refs & REF_USERS else 'dropped'}")
        if bool(refs & REF_KSM) != bool(slot_used):
            errs.append(f"mm{mm_id}: mm_slot {'present' if slot_used else 'absent'} but "
                        f"the slot's mm_count reference is {'held' if refs & REF_KSM else 'dropped'}")
        if slot_used and r not in linked:
            errs.append(f"mm{mm_id}: has an mm_slot that is not on the list")
        if not slot_used and r in linked:
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
    fq = cl.fq
    refs, per_mm = references(cl, mms)
    live = live_task_rows(cl)
    fixed = 0
    # hot path: raw words (every frame: a frame view made per frame took
    # this loop from 326 us to 1108 per 4096 frames, dev/bench_views.py, the
    # 2-core dev VM at load 2.2)
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
        m = mm.words
        if m.id == mm_id:
            m.rss, m.ksm_mapped = per_mm[mm_id]
    if cl.modern:  # a task (ksmd) killed between a zero PTE and its count: recount
        per = zero_ptes(cl, mms)
        for mm_id, mm in mms.items():
            if cl.q[mm.base + M_ID] == mm_id:
                cl.q[mm.base + M_ZERO_PAGES] = per[mm_id]
        cl.q[K_ZERO_PAGES] = sum(per.values())
    rebuild_free_stack(cl, live)
    return fixed


def wait_settled(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
