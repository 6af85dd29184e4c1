"""mm/ksm.c, the part shared by every task: mm_slots, __ksm_enter, __ksm_exit,
break_ksm, break_cow, unmerge_ksm_pages, and run_store with
unmerge_and_remove_all_rmap_items (run by the task writing ``run``:
``uksm.kernel.writer``).  ksmd itself (the scan, the trees, the rmap_items) is
``uksm.kernel.ksmd``; docs/KERNEL-MAP.md maps every kernel function.

The mm_slot list and the ksm_scan cursor live in shared memory under
``ksm_mmlist_lock`` (a leaf lock), with each slot's rmap_item count
(M_SLOT_RMAP), so that an exiting task can decide between the fast and the
slow path of __ksm_exit without asking ksmd -- and without ever taking
``ksm_thread_mutex``, which ksmd may hold while it waits for memory that
only this exit would free (the deadlock "ksm: fix oom deadlock" removed).

ksmd publishes M_SLOT_RMAP of a slot under ksm_mmlist_lock whenever its
cursor leaves that slot.  rmap_items are only ever created for the slot at
the cursor, and an exiting mm at the cursor takes the slow path anyway, so
"M_SLOT_RMAP == 0 and not at the cursor" really means "ksmd holds nothing
of this mm": the fast path may free the slot at once.

The list is a doubly-linked list of mm-table rows (slot == row) headed by
``ksm_mm_head`` (row index ``cl.head``).  Forward links are authoritative:
an insert or a delete is committed by the one store to the predecessor's
``next``; ``repair_list`` rebuilds the back links after a SIGKILL.

Lock order (uksm/kernel/locks.py states it whole): ksm_thread_mutex ->
mmap_wmutex -> mmap_sem -> pte lock -> zone_lock; ksm_mmlist_lock is a
leaf, taken under any of them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.host.log import NULL_LOG
from uksm.kernel import killpoints, sched
from uksm.kernel.cluster import pid_alive
from uksm.kernel.layout import (
    A_FREE_TOP,
    F_KSM,
    F_ZERO,
    FR_FLAGS,
    FRAME_SIZE,
    H_HAZARDS,
    H_KSM_UNSYNCED,
    H_KSMD_PID,
    H_SHUTDOWN,
    H_UNMERGE_DONE,
    H_UNMERGE_GEN,
    H_UNMERGE_WAIT,
    HZ_NO_FAST_PATH,
    HZ_NO_UNMERGE_EXIT_CHECK,
    K_FULL_SCANS,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    K_PAGES_UNSHARED,
    K_PAGES_VOLATILE,
    K_RMAP_ITEMS,
    K_RUN,
    K_RUN_DONE,
    K_RUN_SEQ,
    K_STABLE_NODE_CHAINS,
    K_STABLE_NODE_DUPS,
    K_STABLE_NODES,
    L_HEAD_NEXT,
    L_HEAD_PREV,
    L_SCAN_ADDR,
    L_SCAN_SLOT,
    L_SEQNR,
    M_FLAGS,
    M_ID,
    M_REFS,
    M_SLOT_RMAP,
    M_SLOT_USED,
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    P_FAST,
    P_LEGACY,
    P_SLOW,
    PT_OFF,
    PTE_PRESENT,
    REF_KSM,
    S_EXIT_FAST,
    S_EXIT_LEGACY,
    S_EXIT_SLOW,
    S_SLOTS_FREED,
    T_OOM_ORIGIN,
    VM_MERGEABLE,
)
from uksm.kernel.memory import Allocator, OutOfMemory
from uksm.kernel.mm import MM, mm_attach, mmdrop
from uksm.kernel.mmu import FAULT_EXITING, handle_mm_fault, ksm_test_exit

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster


# ---- the mm_slot list (caller holds ksm_mmlist_lock) ----------------------------

def slot_next(cl: "Cluster", s: int) -> int:
    return cl.q[L_HEAD_NEXT] if s == cl.head else cl.mrow(s).slot_next


def _set_next(cl: "Cluster", s: int, v: int) -> None:
    if s == cl.head:
        cl.q[L_HEAD_NEXT] = v
    else:
        cl.mrow(s).slot_next = v


def _set_prev(cl: "Cluster", s: int, v: int) -> None:
    if s == cl.head:
        cl.q[L_HEAD_PREV] = v
    else:
        cl.mrow(s).slot_prev = v


def slot_prev(cl: "Cluster", s: int) -> int:
    return cl.q[L_HEAD_PREV] if s == cl.head else cl.mrow(s).slot_prev


def slots(cl: "Cluster") -> list[int]:
    """The list in order, from ksm_mm_head (bounded: a corrupt list ends)."""
    out: list[int] = []
    s = slot_next(cl, cl.head)
    while s != cl.head and len(out) <= cl.max_mms:
        out.append(s)
        s = slot_next(cl, s)
    return out


def list_add_after(cl: "Cluster", s: int, p: int) -> None:
    """list_add(s, p): link s just after p."""
    n = slot_next(cl, p)
    _set_next(cl, s, n)
    _set_prev(cl, s, p)
    _set_next(cl, p, s)  # commit
    _set_prev(cl, n, s)


def list_del(cl: "Cluster", s: int) -> bool:
    """list_del(s); False if s was not linked (a killed task's half-done op)."""
    p = slot_prev(cl, s)
    if not (0 <= p <= cl.head) or slot_next(cl, p) != s:
        p = next((x for x in [cl.head] + slots(cl) if slot_next(cl, x) == s), -1)
        if p < 0:
            return False
    n = slot_next(cl, s)
    _set_next(cl, p, n)  # commit
    _set_prev(cl, n, p)
    return True


def repair_list(cl: "Cluster") -> list[int]:
    """After a task died holding ksm_mmlist_lock: rebuild the back links
    from the forward ones, and put the cursor back on the list."""
    order = slots(cl)
    prev = cl.head
    for s in order:
        _set_prev(cl, s, prev)
        prev = s
    _set_prev(cl, cl.head, prev)
    q = cl.q
    if q[L_SCAN_SLOT] != cl.head and q[L_SCAN_SLOT] not in order:
        q[L_SCAN_SLOT] = cl.head
        q[L_SCAN_ADDR] = 0
    return order


def drop_orphaned_refs(cl: "Cluster", log: Any = NULL_LOG) -> list[int]:
    """After a death: the mm_count reference of a slot already freed.
    Whoever frees a slot -- ksmd at an exiting mm, __ksm_exit's fast and
    legacy paths, run=2's unmerge -- unlinks it under ksm_mmlist_lock and
    then, the lock dropped, mmdrop(REF_KSM)s; killed between the two, it
    leaves REF_KSM held with no slot, and nobody would ever drop it (the
    mm is never freed: fsck's "mm_slot absent but the slot's mm_count
    reference is held").  Drop it for the dead (mmdrop is idempotent: a
    live freer still on its way finds it dropped).  Caller must not hold
    ksm_mmlist_lock.  Returns the mm ids dropped for.  (Found by uksm
    explore --kills: ksmd SIGKILLed just before its mmdrop.)"""
    q, task = cl.q, cl.task
    task.lock(cl.mmlist)
    try:
        orphans = [(r, q[cl.mbase(r) + M_ID]) for r in range(cl.max_mms)
                   if q[cl.mbase(r) + M_ID] and q[cl.mbase(r) + M_REFS] & REF_KSM
                   and not q[cl.mbase(r) + M_SLOT_USED]]
    finally:
        task.unlock(cl.mmlist)
    for r, mm_id in orphans:
        mmdrop(cl, r, mm_id, REF_KSM, log)
    return [mm_id for _r, mm_id in orphans]


# ---- __ksm_enter / __ksm_exit --------------------------------------------------

def __ksm_enter(cl: "Cluster", mm: MM, log: Any = NULL_LOG) -> None:
    """__ksm_enter: give the mm a slot, just behind the scan cursor (to let
    the area settle a little before ksmd looks at it; "when fork is
    followed by immediate exec, we don't want ksmd to waste time setting
    up and tearing down an rmap_list"), set MMF_VM_MERGEABLE and raise
    mm_count.  Caller holds mmap_sem for write (madvise's, or dup_mmap's
    of the new mm: ksm_fork).

    The place is 2.6.32.67 mm/ksm.c line 1432, unconditionally:
    ``list_add_tail(&mm_slot->mm_list, &ksm_scan.mm_slot->mm_list)`` --
    just before the slot ksmd scans next, so a new mm (a fork's child
    included) waits a whole pass; with the cursor at ksm_mm_head (between
    passes), at the list's end.  (Later kernels add a KSM_RUN_UNMERGE case,
    inserting at the list's end so that run=2 does not miss a child's
    KSM pages; 2.6.32 has only this line.)"""
    q, b = cl.q, mm.base
    cl.task.lock(cl.mmlist)
    try:
        if q[b + M_SLOT_USED]:
            return
        q[b + M_SLOT_RMAP] = 0
        q[b + M_REFS] |= REF_KSM      # atomic_inc(&mm->mm_count)
        q[b + M_SLOT_USED] = 1
        killpoints.hit(cl, "ksm_enter_locked", log)
        list_add_after(cl, mm.row, slot_prev(cl, q[L_SCAN_SLOT]))  # mm/ksm.c:1432 list_add_tail
        q[b + M_FLAGS] |= MMF_VM_MERGEABLE
    finally:
        cl.task.unlock(cl.mmlist)
    log.info("ksm_enter", mm=mm.id)


def __ksm_exit(cl: "Cluster", mm: MM, legacy: bool, log: Any = NULL_LOG, policy: str = "seed") -> int:
    """__ksm_exit.  Returns the path taken (P_FAST, P_SLOW, P_LEGACY) or 0
    when there was no slot (ksmd had already noticed and freed it).

    ``legacy``: the code before the seed (``__ksm_exit_legacy``); else the
    seed's, which 2.6.32 shipped too (``__ksm_exit_seed``: the policies
    ``seed`` and ``shipped`` differ in where exit_mmap calls it, not in it;
    ``policy`` is only logged)."""
    if legacy:
        return __ksm_exit_legacy(cl, mm, log, policy)
    return __ksm_exit_seed(cl, mm, log, policy)


def __ksm_exit_legacy(cl: "Cluster", mm: MM, log: Any, policy: str) -> int:
    """__ksm_exit before the seed: take ksm_thread_mutex and remove the
    slot and (via ksmd's reconciliation) its rmap_items here -- which
    deadlocks when ksmd holds the mutex while it waits for memory this exit
    would free.  Returns P_LEGACY, or 0 when there was no slot."""
    q, w, s = cl.q, mm.words, mm.row
    task = cl.task
    task.lock(cl.daemon)
    try:
        task.lock(cl.mmlist)
        if not w.slot_used or w.id != mm.id:
            task.unlock(cl.mmlist)
            return 0
        if q[L_SCAN_SLOT] == s:  # step the cursor off, as the pre-seed __ksm_exit did
            q[L_SCAN_SLOT] = slot_next(cl, s)
            q[L_SCAN_ADDR] = 0
            if q[L_SCAN_SLOT] == cl.head:  # "if (ksm_scan.mm_slot == &ksm_mm_head)
                q[L_SEQNR] += 1            #      ksm_scan.seqnr++;" (removed by the seed)
        list_del(cl, s)
        w.slot_used = 0
        w.slot_rmap = 0
        w.flags &= ~MMF_VM_MERGEABLE
        w.exit_path = P_LEGACY
        cl.trow(task.row).exit_path = P_LEGACY
        q[S_EXIT_LEGACY] += 1
        # the kernel's legacy exit removed the rmap_items here and
        # updated the counters; ksmd's are private to it, so they stay
        # as last published until its next batch: say so to fsck
        q[H_KSM_UNSYNCED] += 1
        task.unlock(cl.mmlist)
    finally:
        task.unlock(cl.daemon)
    log.info("ksm_exit", mm=mm.id, path="legacy", policy=policy)
    mmdrop(cl, s, mm.id, REF_KSM, log)
    return P_LEGACY


def __ksm_exit_seed(cl: "Cluster", mm: MM, log: Any, policy: str) -> int:
    """__ksm_exit of the seed (and of 2.6.32 as shipped): under
    ksm_mmlist_lock only.  Fast path when the slot has no rmap_items and is
    not at the cursor: unlink, free, clear the flag, mmdrop -- not just an
    optimisation: with ksmd not running, the mm_count raised by
    __ksm_enter would otherwise never be dropped.  Otherwise the slow path:
    move the slot just after the cursor so ksmd soon frees it, and
    down_write/up_write mmap_sem to wait out any ksmd or unmerge work still
    inside this mm (break_cow) before page tables go.  Returns P_FAST,
    P_SLOW, or 0 when there was no slot."""
    q, w, s = cl.q, mm.words, mm.row
    task = cl.task
    task.lock(cl.mmlist)
    path = 0
    if w.slot_used and w.id == mm.id:
        at_cursor = q[L_SCAN_SLOT] == s
        if not at_cursor and w.slot_rmap == 0 and not q[H_HAZARDS] & HZ_NO_FAST_PATH:
            list_del(cl, s)
            w.slot_used = 0
            # 6.18's easy_to_free also clears MMF_VM_MERGE_ANY (6.4,
            # d7597f59d1d3); never set under 2.6.32
            w.flags &= ~(MMF_VM_MERGEABLE | MMF_VM_MERGE_ANY)
            path = P_FAST
            q[S_EXIT_FAST] += 1
        else:
            if not at_cursor:  # list_move(slot, cursor)
                list_del(cl, s)
                list_add_after(cl, s, q[L_SCAN_SLOT])
            path = P_SLOW
            q[S_EXIT_SLOW] += 1
        w.exit_path = path
        cl.trow(task.row).exit_path = path  # the task's own record: the mm may go first
        # logged under the lock: ordered before ksmd's slot_freed
        log.info("ksm_exit", mm=mm.id, path="fast" if path == P_FAST else "slow", policy=policy)
    task.unlock(cl.mmlist)
    if path == P_FAST:
        mmdrop(cl, s, mm.id, REF_KSM, log)
    elif path == P_SLOW:
        killpoints.hit(cl, "ksm_exit_before_down_write", log)
        mm.down_write()
        killpoints.hit(cl, "ksm_exit_mmap_sem_write", log)
        mm.up_write()
    return path

# ---- /sys/kernel/mm/ksm/run ---------------------------------------------------

def run_store(cl: "Cluster", value: int, alloc: "Allocator | None" = None, log: Any = NULL_LOG,
                  stop: "Callable[[], bool] | None" = None, oom_origin: bool = False,
                  acquire: "Callable[[], None] | None" = None) -> tuple[int, int]:
    """run_store (echo VALUE > /sys/kernel/mm/ksm/run), in the writing
    task's own context -- the one place ``run`` is written.

    Under ksm_thread_mutex, and only if ``run`` changes ("if (ksm_run !=
    flags)": writing 2 twice does not unmerge twice): set run, bump the
    request sequence; for 2, unmerge everything *here*, in the writer, with
    PF_OOM_ORIGIN set when ``oom_origin`` (2.6.32's run_store: the OOM
    killer's first choice; the seed's code had no such flag).  An error
    (-ERESTARTSYS: ``stop()`` says a signal is pending; -ENOMEM: this task
    was OOM-killed) sets run back to 0 ("ksm_run = KSM_RUN_STOP") and is
    returned.  K_RUN_DONE is set to the sequence when the write returns.
    Returns (sequence, 0 or -errno).  May block while ksmd holds the mutex,
    as the write does (``acquire`` takes it another way)."""
    q, task = cl.q, cl.task
    if acquire is None:
        task.lock(cl.daemon)
    else:
        acquire()
    err = 0
    try:
        if q[K_RUN] == value:
            return q[K_RUN_SEQ], 0
        q[K_RUN] = value
        seq = q[K_RUN_SEQ] + 1
        q[K_RUN_SEQ] = seq
        log.info("ksm_knob", name="run", value=value)
        if value == 2:
            a = Allocator(cl) if alloc is None else alloc
            if oom_origin:
                q[task.base + T_OOM_ORIGIN] = 1   # current->flags |= PF_OOM_ORIGIN
            try:
                err = unmerge_and_remove_all_rmap_items(cl, a, log, stop)
            finally:
                q[task.base + T_OOM_ORIGIN] = 0   # current->flags &= ~PF_OOM_ORIGIN
                a.flush()
            if err:
                q[K_RUN] = 0                      # ksm_run = KSM_RUN_STOP
        q[K_RUN_DONE] = seq
    finally:
        task.unlock(cl.daemon)
    return seq, err


def unmerge_and_remove_all_rmap_items(cl: "Cluster", alloc: Allocator, log: Any = NULL_LOG,
                                      stop: "Callable[[], bool] | None" = None) -> int:
    """KSM_RUN_UNMERGE, by the writer of run (caller holds ksm_thread_mutex):
    walk every mm with the cursor (so an exiting mm sees it and takes the
    slow path), under its mmap_sem for read break every KSM page of its
    VM_MERGEABLE areas (stopping at ksm_test_exit), remove its rmap_items,
    free the slot of an exiting mm.  The registrations stay.

    An error stops the walk where it is ("goto error"): the mm being
    unmerged and every mm after it keep their rmap_items, in the trees and
    in the counters (2.6.32.67 mm/ksm.c), and the next run=1 merges again
    only the pages that were broken.

    rmap_items and the trees are ksmd's private state here: the writer
    marks each mm whose rmap_items it removed (M_RMAP_GONE, this walk's
    H_UNMERGE_GEN) and zeroes what they publish (its per-mm counts);
    ksmd frees its copies.  The counters are right before the mutex is
    released, as the kernel's, whose remove_trailing_rmap_items counted
    each rmap_item out as it freed it: after a whole walk every rmap_item
    is gone and they are 0, set here; after an error the writer has ksmd
    count out the finished mms' rmap_items while it still holds the mutex
    (``ksmd_remove_rmap_items``).
    Returns 0 or -errno; on an error the cursor goes back to the head."""
    q, task = cl.q, cl.task
    task.lock(cl.mmlist)
    s = slot_next(cl, cl.head)
    q[L_SCAN_SLOT] = s
    q[L_SCAN_ADDR] = 0
    task.unlock(cl.mmlist)
    err = 0
    removed = False   # some mm finished had rmap_items: the counters change
    gen = q[H_UNMERGE_GEN] + 1
    q[H_UNMERGE_GEN] = gen
    while s != cl.head:
        mm = mm_attach(cl, cl.mrow(s).id)
        try:
            task.lock(mm.sem)
            err = unmerge_vmas(cl, alloc, mm, log, stop)
            if err:
                task.unlock(mm.sem)
                task.lock(cl.mmlist)
                q[L_SCAN_SLOT] = cl.head   # error: ksm_scan.mm_slot = &ksm_mm_head
                q[L_SCAN_ADDR] = 0
                task.unlock(cl.mmlist)
                break
            s, had_items = unmerge_next_mm(cl, mm, s, gen, log)
            removed = removed or had_items
        finally:
            mm.seg.close()
    if not err:
        # every rmap_item removed: the counters are 0 now, as the kernel's
        for f in (K_PAGES_SHARED, K_PAGES_SHARING, K_PAGES_UNSHARED, K_PAGES_VOLATILE,
                  K_RMAP_ITEMS, K_STABLE_NODES,
                  # 6.18: remove_all_stable_nodes freed every chain and dup (4.13)
                  K_STABLE_NODE_CHAINS, K_STABLE_NODE_DUPS):
            q[f] = 0
        q[L_SEQNR] = 0            # ksm_scan.seqnr = 0
        q[K_FULL_SCANS] = 0       # full_scans_show prints seqnr
    elif removed:
        ksmd_remove_rmap_items(cl, gen)
    return err


def unmerge_vmas(cl: "Cluster", alloc: Allocator, mm: MM, log: Any = NULL_LOG,
                 stop: "Callable[[], bool] | None" = None) -> int:
    """unmerge_and_remove_all_rmap_items' walk of one mm, "for (vma =
    mm->mmap; vma; vma = vma->vm_next)": unmerge_ksm_pages over each
    VM_MERGEABLE area, stopping at ksm_test_exit.  Caller holds mmap_sem
    for read.  Returns 0 or -errno (the caller's "goto error")."""
    q = cl.q
    err = 0
    pages = 0
    try:
        # "mm/ksm: fix race with VMA iteration and mm_struct teardown"
        # (2023): ksm_test_exit before walking the VMAs, which an
        # exit_mmap may already have destroyed (free_pgtables marks
        # the table; mm.vmas() then oopses).  Hazard
        # no-unmerge-exit-check drops only this check.
        walk = q[H_HAZARDS] & HZ_NO_UNMERGE_EXIT_CHECK or not ksm_test_exit(cl, mm)
        for (start, end) in (mm.mergeable_ranges() if walk else []):
            if ksm_test_exit(cl, mm):
                break
            killpoints.hit_ksmd(cl, "ksmd_break_cow", mm.base, log)
            k, err = unmerge_ksm_pages(cl, alloc, mm, start, end, False, stop, points=True)
            pages += k
            if err:
                break
    except OutOfMemory:
        err = -ENOMEM   # break_ksm: VM_FAULT_OOM -> -ENOMEM (this task is the victim)
    log.info("unmerge", mm=mm.id, pages=pages, reason="run2",
             frames_used=cl.nframes - q[A_FREE_TOP])
    return err


def unmerge_next_mm(cl: "Cluster", mm: MM, s: int, gen: int, log: Any = NULL_LOG) -> tuple[int, bool]:
    """unmerge_and_remove_all_rmap_items' end of one mm whose walk
    succeeded, at slot ``s`` (caller holds its mmap_sem for read, released here):
    remove_trailing_rmap_items(mm_slot, all) -- here the mm marked as walk
    ``gen``'s (M_RMAP_GONE) and its published counts zeroed: ksmd frees its
    copies --, the cursor on to the next slot under ksm_mmlist_lock, and
    the slot freed if the mm exits.  Returns (the next slot, whether the
    mm had rmap_items)."""
    q, task = cl.q, cl.task
    task.lock(cl.mmlist)
    nxt = slot_next(cl, s)
    q[L_SCAN_SLOT] = nxt
    had_items = bool(mm.words.rmap_items or mm.words.slot_rmap)
    mm.words.slot_rmap = 0          # remove_trailing_rmap_items(mm_slot, all)
    mm.words.rmap_items = 0
    mm.words.merging = 0
    mm.words.rmap_gone = gen
    if ksm_test_exit(cl, mm):
        list_del(cl, s)
        mm.words.slot_used = 0
        mm.words.flags &= ~(MMF_VM_MERGEABLE | MMF_VM_MERGE_ANY)  # (MERGE_ANY: 6.18's, as __ksm_exit)
        q[S_SLOTS_FREED] += 1
        task.unlock(cl.mmlist)
        task.unlock(mm.sem)
        log.info("slot_freed", mm=mm.id, by="unmerge")
        mmdrop(cl, s, mm.id, REF_KSM, log)
    else:
        # uksm's order: up_read before the list unlock, as the 2016
        # fix ("ksm: fix conflict between mmput and
        # scan_get_next_rmap_item") ordered scan_get_next_rmap_item;
        # 2.6.32's unmerge unlocked the list first, leaving the same
        # window (a fast-path exit freeing the mm before the up_read)
        task.unlock(mm.sem)
        task.unlock(cl.mmlist)
    return nxt, had_items


def ksmd_remove_rmap_items(cl: "Cluster", gen: int) -> bool:
    """The rest of remove_trailing_rmap_items for the mms a failed unmerge
    finished (walk ``gen``), before the writer releases ksm_thread_mutex
    (caller holds it): ksmd, which owns the rmap_items, frees them and
    publishes the counters (``Ksmd.serve_unmerge``), from wherever it waits
    outside a batch -- for this mutex, or asleep -- on the writer's
    behalf, and the writer waits for that.  Only a failed walk needs it:
    after a whole one every counter is 0.  Counted out one by one in the
    kernel, they are known only to ksmd here: how many stable nodes the
    rmap_items left behind still hold (pages_shared against
    pages_sharing) is in its trees.

    Returns False, the counters left as they were (H_KSM_UNSYNCED tells
    fsck), when no ksmd runs (its rmap_items died with it: recovery
    cleared the per-mm counts, and the next ksmd publishes its own) or the
    cluster is shutting down."""
    q = cl.q
    q[H_UNMERGE_WAIT] = gen
    try:
        while q[H_UNMERGE_DONE] != gen:
            if q[H_SHUTDOWN] or not pid_alive(q[H_KSMD_PID]):
                q[H_KSM_UNSYNCED] += 1
                return False
            if sched.ON:  # parked until ksmd has served it (World.enabled, BLK_UNMERGE)
                sched.blocked(sched.BLK_UNMERGE, gen)
            else:
                time.sleep(0.002)
        return True
    finally:
        q[H_UNMERGE_WAIT] = 0


# ---- breaking COW on KSM pages ----------------------------------------------------

def break_ksm(cl: "Cluster", alloc: Allocator, mm: MM, vpn: int, for_ksmd: bool,
              points: bool | None = None) -> int:
    """break_ksm: fault the page for write while it is still a KSM page.
    Caller holds mmap_sem.  Returns FAULT_EXITING when the mm exits.
    ``points``: the unmerger's kill points (ksmd, or the run=2 writer:
    default ``for_ksmd``); a killable writer faults with for_ksmd False.

    6.18 (6.2, series "mm/ksm: break_ksm() cleanups and fixes": 6cce3314b928
    "mm/ksm: fix KSM COW breaking with userfaultfd-wp via
    FAULT_FLAG_UNSHARE", "mm/ksm: convert break_ksm() to use
    walk_page_range_vma()"): an unshare fault, not a fake write -- a
    read-only area is unmerged too (2.6.32's write fault here is a SIGSEGV
    in uksm's fault path), and the copy is mapped read-only and clean: the
    first write after the unmerge faults again and reuses the page.  The
    walk skips pte_none entries, as 2.6.32's follow_page did."""
    pq, fq = mm.pq, cl.fq
    unshare = cl.modern
    while True:
        pte = pq[PT_OFF + vpn]
        # 6.18 also unshares a KSM-placed zero page (6.6, 1a8e84305783 "ksm:
        # support unsharing KSM-placed zero pages": is_ksm_zero_pte); F_ZERO
        # is never set under 2.6.32
        if not pte & PTE_PRESENT or not fq[(pte >> 2) * FRAME_SIZE + FR_FLAGS] & (F_KSM | F_ZERO):
            return 0
        if for_ksmd if points is None else points:  # the window: exit_mmap may zap the page table here
            killpoints.hit_ksmd(cl, "ksmd_break_ksm_window", mm.base)
        if handle_mm_fault(cl, alloc, mm, vpn, True, for_ksmd, unshare) == FAULT_EXITING:
            return FAULT_EXITING


ERESTARTSYS = 512
ENOMEM = 12


def unmerge_ksm_pages(cl: "Cluster", alloc: Allocator, mm: MM, start: int, end: int,
                      for_ksmd: bool, stop=None, points: bool | None = None) -> tuple[int, int]:
    """unmerge_ksm_pages: break every KSM page in [start, end), stopping
    when the mm exits (ksm_test_exit, checked per page: not an error) or
    ``stop()`` says a signal is pending (-ERESTARTSYS).  Caller holds
    mmap_sem.  Returns (pages broken, 0 or -errno).  A task whose own fault
    finds no memory (it was OOM-killed: TIF_MEMDIE allocations fail) gets
    OutOfMemory raised through here, the kernel's -ENOMEM."""
    n = 0
    pq, fq = mm.pq, cl.fq
    for vpn in range(start, end):
        if sched.ON:  # a controlled run's point per page: mm_users, the PTE are lockless here
            sched.point("unmerge_page", vpn)
        if ksm_test_exit(cl, mm):
            break
        if stop is not None and stop():
            return n, -ERESTARTSYS
        pte = pq[PT_OFF + vpn]
        if pte & PTE_PRESENT and fq[(pte >> 2) * FRAME_SIZE + FR_FLAGS] & (F_KSM | F_ZERO):  # 6.6: zero too
            if break_ksm(cl, alloc, mm, vpn, for_ksmd, points) == FAULT_EXITING:
                break
            n += 1
    return n, 0


def break_cow(cl: "Cluster", alloc: Allocator, mm: MM, vpn: int, log: Any = NULL_LOG) -> bool:
    """break_cow (ksmd): down_read(mmap_sem), ksm_test_exit, find_vma: the
    address must still be in a VM_MERGEABLE area (the application may have
    unmapped it, or made it UNMERGEABLE, since ksmd last held mmap_sem),
    then break_ksm, up_read.  Caller must not hold mm's mmap_sem (ksmd
    drops it first, as scan_get_next_rmap_item had).  Returns True if it
    got as far as break_ksm."""
    task = cl.task
    task.lock(mm.sem)
    try:
        if ksm_test_exit(cl, mm):
            return False
        vma = mm.find_vma(vpn)
        if vma is None or not vma[3] & VM_MERGEABLE:
            return False
        killpoints.hit_ksmd(cl, "ksmd_break_cow", mm.base, log)
        break_ksm(cl, alloc, mm, vpn, True)
        return True
    finally:
        task.unlock(mm.sem)
