"""Process exit: mmput -> exit_mmap with ksm_exit, by exit policy.

``seed`` (the default; "ksm: fix oom deadlock"):
    mm_users = 0 (ksm_test_exit true from here) -> exit_mmap's first half,
    unmap every page and free the frames, without mmap_sem -> __ksm_exit
    (fast or slow path, never ksm_thread_mutex) -> free page tables and
    VMAs -> mmdrop.  Freeing the pages before __ksm_exit is what lets an OOM
    victim give its memory back even while ksmd (or run=2) is busy in its mm.
``shipped`` (2.6.32 as released, after the move into exit_mmap was reverted):
    mm_users = 0 -> __ksm_exit (same fast/slow paths) -> exit_mmap -> mmdrop.
    The slow path's down_write waits for ksmd's mmap_sem *before* the pages
    are freed: an OOM victim that ksmd is in waits for ksmd, which may wait
    for memory the victim has not freed.  Hugh predicted it in the 2009
    thread ("the deadlock comes on mmap_sem instead"); Andrea's revert
    accepted that "its memory won't be freed until a second victim has been
    selected"; and it was seen as a hung task on 4.1 stable in September
    2016 ("hungtask will come up when ksm enable"), whose OOM killer waited
    for the first victim instead of selecting a second (``uksm.oom``).
``legacy`` (before the seed):
    mm_users = 0 -> __ksm_exit taking ksm_thread_mutex -> exit_mmap -> mmdrop.
    Deadlocks when ksmd holds the mutex while waiting for memory.

Every step is recorded in M_EXIT_STAGE, so the supervisor's reaper can
finish the exit of a task SIGKILLed half-way, doing only what is left.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import killpoints
from .ksm import __ksm_exit
from .layout import (EXIT_POLICIES, H_EXIT_POLICY, M_EXIT_STAGE, M_ID, M_REFS, M_SLOT_USED, M_STATE,
                     M_USERS, MAX_VMAS, MS_EXITING, MS_ZOMBIE, PAGE_SIZE, PT_OFF, REF_KSM,
                     REF_USERS, VMA_OFF, VMA_SIZE, V_END, XS_KSM_EXIT, XS_MMDROP, XS_PGTABLES,
                     XS_USERS0, XS_ZAPPED, M_OOM_VICTIM)
from .memory import Allocator
from .mm import MM, mmdrop
from .mmu import zap_range

if TYPE_CHECKING:
    from .cluster import Cluster


def _mark(cl: "Cluster", mm: MM, bit: int) -> None:
    cl.q[mm.base + M_EXIT_STAGE] |= bit


def mmput(cl: "Cluster", mm: MM, alloc: Allocator, log: Any) -> int:
    """Drop the last mm_users and tear the address space down.
    Returns the __ksm_exit path taken (layout.P_*), 0 if none."""
    q, b = cl.q, mm.base
    policy = EXIT_POLICIES[q[H_EXIT_POLICY]]
    mm_users_zero(cl, mm, log)
    path = 0
    if policy != "seed":
        path = ksm_exit(cl, mm, policy, log)
    if not q[b + M_EXIT_STAGE] & XS_ZAPPED:
        exit_mmap_unmap(cl, mm, alloc, log)
    if policy == "seed":
        path = ksm_exit(cl, mm, policy, log)
    if not q[b + M_EXIT_STAGE] & XS_PGTABLES:
        free_pgtables(cl, mm)
    if not q[b + M_EXIT_STAGE] & XS_MMDROP:
        if q[b + M_REFS] & REF_KSM:
            q[b + M_STATE] = MS_ZOMBIE  # waiting for ksmd to free the slot
        mmdrop(cl, mm.row, mm.id, REF_USERS, log)  # marks XS_MMDROP with the drop
    return path


def mm_users_zero(cl: "Cluster", mm: MM, log: Any, ptl_held: bool = False) -> bool:
    """atomic_dec_and_test(&mm->mm_users) reaching 0: from here
    ksm_test_exit(mm) is true.  Done under the mm's pte lock (and the list
    lock, which guards mm_users here): ksmd re-checks ksm_test_exit under the
    pte lock before it replaces a page, so every merge into this mm is
    ordered before this point or not done at all -- and the event is logged
    inside, so the logs' order is the real one.  Returns False if already
    done (idempotent: a reaper may repeat it)."""
    q, b, task = cl.q, mm.base, cl.task
    if q[b + M_EXIT_STAGE] & XS_USERS0:
        return False
    if not ptl_held:
        task.lock(mm.ptl)
    try:
        task.lock(cl.mmlist)
        done = not q[b + M_EXIT_STAGE] & XS_USERS0 and q[b + M_ID] == mm.id
        if done:
            q[b + M_USERS] = 0
            q[b + M_STATE] = MS_EXITING
            q[b + M_EXIT_STAGE] |= XS_USERS0
        task.unlock(cl.mmlist)
        if done:
            log.info("mm_exit_begin", mm=mm.id)
    finally:
        if not ptl_held:
            task.unlock(mm.ptl)
    return done


def ksm_exit(cl: "Cluster", mm: MM, policy: str, log: Any) -> int:
    """ksm_exit: call __ksm_exit if the mm has a slot (MMF_VM_MERGEABLE)."""
    q, b = cl.q, mm.base
    if q[b + M_EXIT_STAGE] & XS_KSM_EXIT:
        return 0
    path = 0
    if q[b + M_SLOT_USED]:
        path = __ksm_exit(cl, mm, policy == "legacy", log, policy)
    _mark(cl, mm, XS_KSM_EXIT)
    return path


def exit_mmap_unmap(cl: "Cluster", mm: MM, alloc: Allocator, log: Any) -> None:
    """exit_mmap, first half: unmap every page and free its frame (no
    mmap_sem, as the kernel's).  Then the memory an OOM kill was for is
    back, and the OOM killer may pick another victim if need be."""
    half = cl.va_pages // 2
    zap_range(cl, alloc, mm, 0, half)
    killpoints.hit(cl, "exit_mid_zap", log)
    zap_range(cl, alloc, mm, half, cl.va_pages)
    _mark(cl, mm, XS_ZAPPED)
    cl.q[mm.base + M_OOM_VICTIM] = 0


def free_pgtables(cl: "Cluster", mm: MM) -> None:
    """exit_mmap, second half: free page tables and VMAs.  Page-table pages
    are dropped whole; a PTE still present here (installed after the unmap
    by a COW break that did not check ksm_test_exit) loses its frame for
    good: the leak the seed's checks prevent, and fsck reports."""
    pq = mm.pq
    for i in range(MAX_VMAS):
        pq[VMA_OFF + i * VMA_SIZE + V_END] = 0
    start = PT_OFF * 8
    first = (start + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    for i in range(PT_OFF, min(first // 8, len(pq))):
        pq[i] = 0
    if mm.seg.size > first:
        mm.seg.punch(first, mm.seg.size - first)
    _mark(cl, mm, XS_PGTABLES)
