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
    for the first victim instead of selecting a second (``uksm.kernel.oom``).
``legacy`` (before the seed):
    mm_users = 0 -> __ksm_exit taking ksm_thread_mutex -> exit_mmap -> mmdrop.
    Deadlocks when ksmd holds the mutex while waiting for memory.

Every step is recorded in M_EXIT_STAGE, so the supervisor's reaper can
finish the exit of a task SIGKILLed half-way, doing only what is left.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uksm.kernel import killpoints, oom, sched
from uksm.kernel.ksm import __ksm_exit
from uksm.kernel.layout import (
    EXIT_POLICIES,
    FIRST_VPN,
    H_EXIT_POLICY,
    H_SHUTDOWN,
    M_EXIT_STAGE,
    M_ID,
    M_OOM_VICTIM,
    M_OWNER_PID,
    M_REFS,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    MMS_EXITING,
    MMS_ZOMBIE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    REF_KSM,
    REF_USERS,
    SEG_NVMA,
    SEG_VMAS_FREED,
    T_EXIT_PROGRESS,
    VM_LOCKED,
    XS_KSM_EXIT,
    XS_MMDROP,
    XS_PGTABLES,
    XS_USERS0,
    XS_ZAPPED,
)
from uksm.kernel.memory import Allocator
from uksm.kernel.mm import MM, mm_attach, mmdrop
from uksm.kernel.mmu import handle_mm_fault, zap_range

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster


def _mark(cl: "Cluster", mm: MM, bit: int) -> None:
    mm.words.exit_stage |= bit


def mmput(cl: "Cluster", mm: MM, alloc: Allocator, log: Any) -> int:
    """Drop the last mm_users and tear the address space down.
    Returns the __ksm_exit path taken (layout.P_*), 0 if none."""
    q, b = cl.q, mm.base
    policy = EXIT_POLICIES[q[H_EXIT_POLICY]]
    mm_users_zero(cl, mm, log)
    if sched.ON:  # the exit's commit points (uksm.kernel.sched)
        sched.point("exit_users0", mm.id)
    path = 0
    if policy != "seed":
        path = ksm_exit(cl, mm, policy, log)
    if not q[b + M_EXIT_STAGE] & XS_ZAPPED:
        exit_mmap_unmap(cl, mm, alloc, log)
        if sched.ON:
            sched.point("exit_zapped", mm.id)
    if policy == "seed":
        path = ksm_exit(cl, mm, policy, log)
    if sched.ON:  # free_pgtables writes the VMA table and the PTEs without a lock: visible
        sched.point("free_pgtables", mm.id)
    if not q[b + M_EXIT_STAGE] & XS_PGTABLES:
        free_pgtables(cl, mm)
        if sched.ON:
            sched.point("exit_pgtables", mm.id)
    if not q[b + M_EXIT_STAGE] & XS_MMDROP:
        if q[b + M_REFS] & REF_KSM:
            q[b + M_STATE] = MMS_ZOMBIE  # waiting for ksmd to free the slot
        mmdrop(cl, mm.row, mm.id, REF_USERS, log)  # marks XS_MMDROP with the drop
    return path


def oom_kill_and_mmput(cl: "Cluster", task: Any, log: Any) -> int:
    """The OOM killer as a linux-next change of 2015 made it (hazard
    ``oom-mmput-in-task``): oom_kill_process itself ends up in mmput of the
    victim's mm, in the allocating task.  When that task is the run=2
    unmerger (here the run=2 writer task, uksm.kernel.writer) holding the
    victim's mmap_sem for read, the mmput
    runs __ksm_exit, whose slow path (the victim is at the unmerge cursor)
    does down_write on that same mmap_sem: the task deadlocks on itself.
    lockdep names it ("recursive", mmap_sem) before the hang.  (Under
    ``legacy`` the writer's own ksm_thread_mutex, which that __ksm_exit
    takes, comes first: lockdep names that one.)

    Simplified: the kernel's mmput was the last one because the victim had
    already dropped its own reference; here the killer's mmput runs the
    whole exit and the victim's own exit later finds every step done (the
    steps are idempotent).  The report was on linux-next and was fixed in
    the OOM killer, never in KSM; its thread is not in the sources this
    project can search (the issue and shared/KSM-REFERENCE.md describe it)."""
    pid = oom.out_of_memory(cl, task, log)
    if pid <= 0:
        return pid
    q = cl.q
    for r in range(cl.max_mms):
        b = cl.mbase(r)
        if q[b + M_ID] and q[b + M_OWNER_PID] == pid and q[b + M_OOM_VICTIM]:
            mm = mm_attach(cl, q[b + M_ID])
            mmput(cl, mm, Allocator(cl), log)
            break
    return pid


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
            q[b + M_STATE] = MMS_EXITING
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


def munlock_vma_pages_all(cl: "Cluster", mm: MM, alloc: Allocator) -> None:
    """exit_mmap's first step when the mm has VM_LOCKED areas: munlock each.
    2.6.32's munlock goes through get_user_pages, which (as "ksm: fix
    deadlock with munlock in exit_mmap", Andrea Arcangeli, 2009, says:
    "stupidly") faults in the absent pages of the area -- a PROT_NONE
    area that mlock could not populate, say -- and retries until each page
    is there.  With the seed's ksm_test_exit check in the fault path
    (mm_users is 0 by now) the fault backs out without installing
    anything, and this loop never ends: the livelock that made Andrea
    revert the seed's placement and its fault-path checks.  ``shipped``
    faults without the check and goes on.  Each page done bumps
    T_EXIT_PROGRESS; a retry that installs nothing does not, so the
    watchdog sees faults without progress.  (H_SHUTDOWN ends the loop:
    the machine is being torn down, the livelock already reported.)"""
    q, task = cl.q, cl.task
    for (i, s, e, f) in mm.vmas():
        if not f & VM_LOCKED:
            continue
        for vpn in range(s, e):
            while not mm.pq[PT_OFF + vpn] & PTE_PRESENT and not q[H_SHUTDOWN]:
                handle_mm_fault(cl, alloc, mm, vpn, False)  # follow_page failed: fault, retry
            q[task.base + T_EXIT_PROGRESS] += 1
        mm.set_vma_flags(i, f & ~VM_LOCKED)


def exit_mmap_unmap(cl: "Cluster", mm: MM, alloc: Allocator, log: Any) -> None:
    """exit_mmap, first half: munlock the VM_LOCKED areas, unmap every
    page and free its frame (no mmap_sem, as the kernel's).  Then the memory
    an OOM kill was for is back, and the OOM killer may pick another victim
    if need be."""
    munlock_vma_pages_all(cl, mm, alloc)
    top = mm.pt_top  # no entry is set above it (sys_mmap backs what it maps)
    half = min(top, FIRST_VPN + mm.words.pages // 2)  # the middle of what it mapped
    zap_range(cl, alloc, mm, 0, half)
    killpoints.hit(cl, "exit_mid_zap", log)
    zap_range(cl, alloc, mm, half, top)
    _mark(cl, mm, XS_ZAPPED)
    mm.words.oom_victim = 0


def free_pgtables(cl: "Cluster", mm: MM) -> None:
    """exit_mmap, second half: free page tables and VMAs.  Page-table pages
    are dropped whole; a PTE still present here (installed after the unmap
    by a COW break that did not check ksm_test_exit) loses its frame for
    good: the leak the seed's checks prevent, and fsck reports."""
    pq = mm.pq
    pq[SEG_VMAS_FREED] = 1  # the VMA table is destroyed: walking it is a bug (mm.VmaTableFreed)
    pq[SEG_NVMA] = 0        # its rows go with the page-table pages punched below
    start = PT_OFF * 8
    first = (start + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    for i in range(PT_OFF, min(first // 8, len(pq))):
        pq[i] = 0
    if mm.seg.size > first:
        mm.seg.punch(first, mm.seg.size - first)
    _mark(cl, mm, XS_PGTABLES)
