"""mm/ksm.c, the part shared by every task: mm_slots, __ksm_enter, __ksm_exit,
break_ksm, unmerge_ksm_pages.  ksmd itself (the scan, the trees, the
rmap_items) is ``uksm.ksmd``.

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

Lock order: ksm_thread_mutex -> mmap_sem -> ksm_mmlist_lock.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import killpoints
from .layout import (K_RUN, K_RUN_SEQ, T_EXIT_PATH, F_KSM, FRAME_SIZE, FR_FLAGS, H_HAZARDS, HZ_NO_FAST_PATH, L_HEAD_NEXT,
                     L_HEAD_PREV, L_SCAN_ADDR, L_SCAN_SLOT, M_EXIT_PATH, M_FLAGS, M_ID,
                     M_SLOT_NEXT, M_SLOT_PREV, M_SLOT_RMAP, M_SLOT_USED, M_REFS,
                     MMF_VM_MERGEABLE, P_FAST, P_LEGACY, P_SLOW, PT_OFF, PTE_PRESENT,
                     REF_KSM, S_EXIT_FAST, S_EXIT_LEGACY, S_EXIT_SLOW, VM_MERGEABLE)
from .memory import Allocator
from .mm import MM, mmdrop
from .mmu import FAULT_EXITING, handle_mm_fault, ksm_test_exit

if TYPE_CHECKING:
    from .cluster import Cluster
    from .locks import Lock


# ---- the mm_slot list (caller holds ksm_mmlist_lock) ----------------------------

def slot_next(cl: "Cluster", s: int) -> int:
    return cl.q[L_HEAD_NEXT] if s == cl.head else cl.q[cl.mbase(s) + M_SLOT_NEXT]


def _set_next(cl: "Cluster", s: int, v: int) -> None:
    if s == cl.head:
        cl.q[L_HEAD_NEXT] = v
    else:
        cl.q[cl.mbase(s) + M_SLOT_NEXT] = v


def _set_prev(cl: "Cluster", s: int, v: int) -> None:
    if s == cl.head:
        cl.q[L_HEAD_PREV] = v
    else:
        cl.q[cl.mbase(s) + M_SLOT_PREV] = v


def slot_prev(cl: "Cluster", s: int) -> int:
    return cl.q[L_HEAD_PREV] if s == cl.head else cl.q[cl.mbase(s) + M_SLOT_PREV]


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


# ---- __ksm_enter / __ksm_exit --------------------------------------------------

def ksm_enter(cl: "Cluster", mm: MM, log=None) -> None:
    """__ksm_enter: give the mm a slot, just behind the scan cursor (to let
    the area settle a little before ksmd looks at it), set
    MMF_VM_MERGEABLE and raise mm_count.  Caller holds mmap_sem for write."""
    q, b = cl.q, mm.base
    cl.task.lock(cl.mmlist)
    try:
        if q[b + M_SLOT_USED]:
            return
        q[b + M_SLOT_RMAP] = 0
        q[b + M_REFS] |= REF_KSM      # atomic_inc(&mm->mm_count)
        q[b + M_SLOT_USED] = 1
        killpoints.hit(cl, "ksm_enter_locked", log)
        list_add_after(cl, mm.row, slot_prev(cl, q[L_SCAN_SLOT]))  # list_add_tail(cursor)
        q[b + M_FLAGS] |= MMF_VM_MERGEABLE
    finally:
        cl.task.unlock(cl.mmlist)
    if log is not None:
        log.info("ksm_enter", mm=mm.id)


def ksm_exit(cl: "Cluster", mm: MM, legacy: bool, log=None, policy: str = "seed") -> int:
    """__ksm_exit.  Returns the path taken (P_FAST, P_SLOW, P_LEGACY) or 0
    when there was no slot (ksmd had already noticed and freed it).

    Seed (and shipped): under ksm_mmlist_lock only.  Fast path when the slot
    has no rmap_items and is not at the cursor: unlink, free, clear the
    flag, mmdrop -- not just an optimisation: with ksmd not running, the
    mm_count raised by __ksm_enter would otherwise never be dropped.
    Otherwise the slow path: move the slot just after the cursor so ksmd
    soon frees it, and down_write/up_write mmap_sem to wait out any ksmd
    or unmerge work still inside this mm (break_cow) before page tables go.

    Legacy (before the seed): take ksm_thread_mutex and remove the slot and
    (via ksmd's reconciliation) its rmap_items here -- which deadlocks when
    ksmd holds the mutex while it waits for memory this exit would free.
    """
    q, b, s = cl.q, mm.base, mm.row
    task = cl.task
    if legacy:
        task.lock(cl.daemon)
        try:
            task.lock(cl.mmlist)
            if not q[b + M_SLOT_USED] or q[b + M_ID] != mm.id:
                task.unlock(cl.mmlist)
                return 0
            if q[L_SCAN_SLOT] == s:  # remove_mm_from_lists: step the cursor off
                q[L_SCAN_SLOT] = slot_next(cl, s)
                q[L_SCAN_ADDR] = 0
            list_del(cl, s)
            q[b + M_SLOT_USED] = 0
            q[b + M_SLOT_RMAP] = 0
            q[b + M_FLAGS] &= ~MMF_VM_MERGEABLE
            q[b + M_EXIT_PATH] = P_LEGACY
            q[task.base + T_EXIT_PATH] = P_LEGACY
            q[S_EXIT_LEGACY] += 1
            task.unlock(cl.mmlist)
        finally:
            task.unlock(cl.daemon)
        if log is not None:
            log.info("ksm_exit", mm=mm.id, path="legacy", policy=policy)
        mmdrop(cl, s, mm.id, REF_KSM, log)
        return P_LEGACY

    task.lock(cl.mmlist)
    path = 0
    if q[b + M_SLOT_USED] and q[b + M_ID] == mm.id:
        at_cursor = q[L_SCAN_SLOT] == s
        if not at_cursor and q[b + M_SLOT_RMAP] == 0 and not q[H_HAZARDS] & HZ_NO_FAST_PATH:
            list_del(cl, s)
            q[b + M_SLOT_USED] = 0
            q[b + M_FLAGS] &= ~MMF_VM_MERGEABLE
            path = P_FAST
            q[S_EXIT_FAST] += 1
        else:
            if not at_cursor:  # list_move(slot, cursor)
                list_del(cl, s)
                list_add_after(cl, s, q[L_SCAN_SLOT])
            path = P_SLOW
            q[S_EXIT_SLOW] += 1
        q[b + M_EXIT_PATH] = path
        q[task.base + T_EXIT_PATH] = path  # the task's own record: the mm may go first
        if log is not None:  # logged under the lock: ordered before ksmd's slot_freed
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

def ksm_run_store(cl: "Cluster", value: int, lock: Callable[[Lock], None] | None = None) -> int:
    """run_store: set ``run`` and bump the request sequence under
    ksm_thread_mutex, as the kernel does, so ksmd (which reads both at the
    start of a batch, under the mutex) sees them together.  Returns the
    sequence number; ksmd sets K_RUN_DONE to it once it has acted (for
    run=2: once every KSM page is unmerged).  May block while ksmd holds
    the mutex, like a write to /sys/kernel/mm/ksm/run.  Every write of
    ``run`` (uksm run, inject, the daemon's ctl, the API, the tests) comes
    here; ``lock`` takes the mutex another way (the daemon's bounded wait
    that keeps reaping), default ``cl.task.lock``."""
    (lock or cl.task.lock)(cl.daemon)
    try:
        cl.q[K_RUN] = value
        seq = cl.q[K_RUN_SEQ] + 1
        cl.q[K_RUN_SEQ] = seq
    finally:
        cl.task.unlock(cl.daemon)
    return seq


# ---- breaking COW on KSM pages ----------------------------------------------------

def break_ksm(cl: "Cluster", alloc: Allocator, mm: MM, vpn: int, for_ksmd: bool) -> int:
    """break_ksm: fault the page for write while it is still a KSM page.
    Caller holds mmap_sem.  Returns FAULT_EXITING when the mm exits."""
    pq, fq = mm.pq, cl.fq
    while True:
        pte = pq[PT_OFF + vpn]
        if not pte & PTE_PRESENT or not fq[(pte >> 2) * FRAME_SIZE + FR_FLAGS] & F_KSM:
            return 0
        if for_ksmd:  # the window: exit_mmap may zap the page table right here
            killpoints.hit_ksmd(cl, "ksmd_break_ksm_window", mm.base)
        if handle_mm_fault(cl, alloc, mm, vpn, True, for_ksmd) == FAULT_EXITING:
            return FAULT_EXITING


def unmerge_ksm_pages(cl: "Cluster", alloc: Allocator, mm: MM, start: int, end: int,
                      for_ksmd: bool, stop=None) -> int:
    """unmerge_ksm_pages: break every KSM page in [start, end), stopping when
    the mm exits (ksm_test_exit, checked per page) or ``stop()`` says so
    (signal_pending).  Caller holds mmap_sem.  Returns pages broken."""
    n = 0
    pq, fq = mm.pq, cl.fq
    for vpn in range(start, end):
        if ksm_test_exit(cl, mm) or (stop is not None and stop()):
            break
        pte = pq[PT_OFF + vpn]
        if pte & PTE_PRESENT and fq[(pte >> 2) * FRAME_SIZE + FR_FLAGS] & F_KSM:
            if break_ksm(cl, alloc, mm, vpn, for_ksmd) == FAULT_EXITING:
                break
            n += 1
    return n


def break_cow(cl: "Cluster", alloc: Allocator, mm: MM, vpn: int) -> None:
    """break_cow (ksmd): down_read, ksm_test_exit, the VMA must still be
    mergeable, break_ksm, up_read."""
    task = cl.task
    task.lock(mm.sem)
    try:
        if ksm_test_exit(cl, mm):
            return
        vma = mm.find_vma(vpn)
        if vma is None or not vma[3] & VM_MERGEABLE:
            return
        killpoints.hit_ksmd(cl, "ksmd_break_cow", mm.base)
        break_ksm(cl, alloc, mm, vpn, True)
    finally:
        task.unlock(mm.sem)
