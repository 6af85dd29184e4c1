"""fork, the part of it that is the memory manager's (kernel/fork.c:
copy_mm, dup_mm, dup_mmap; mm/memory.c: copy_page_range, copy_one_pte;
include/linux/ksm.h: ksm_fork).

The parent runs it, in its own process, as the kernel runs copy_process
in the parent's context.  The rest of copy_process -- the new task_struct
(its task row), mm_alloc (its mm row and segment), the new process and
wake_up_new_task -- is the supervisor's (``uksm.proc.forks``), which owns
the process table: it makes the row and the empty mm before ``dup_mm``
and starts the child process after.

2.6.32's dup_mmap (kernel/fork.c, lines 279-402 of 2.6.32.67) in order:

1. ``down_write(&oldmm->mmap_sem)``, then ``down_write_nested(&mm->mmap_sem,
   SINGLE_DEPTH_NESTING)`` on the new mm: "Not linked in yet - no deadlock
   potential".  Here the new mm's lock is taken on the *new task's* row
   (``ccl``): a task row records one lock per class, and the nesting is
   exactly lockdep's subclass -- two mmap_sems, one each.  If the parent
   dies mid-fork, recovery takes over the locks of both rows
   (``uksm.proc.recovery``).
2. ``retval = ksm_fork(mm, oldmm)`` (line 305), *before* any VMA is
   copied: the child's mm_slot is on ksm_mm_head's list while its VMAs and
   page tables are still being copied, placed by ``__ksm_enter`` just
   behind the scan cursor (2.6.32.67 mm/ksm.c line 1432:
   ``list_add_tail(&mm_slot->mm_list, &ksm_scan.mm_slot->mm_list)``).  A ksmd reaching it meanwhile blocks
   in its down_read of the new mm's mmap_sem, held for write here.
3. Per VMA, in address order: a copy with ``tmp->vm_flags &= ~VM_LOCKED``
   (mlock is not inherited), ``mm->map_count++``, then ``copy_page_range``
   (line 380).
4. ``up_write`` of both.

``copy_page_range`` -> ``copy_pte_range`` copies one page-table page at a
time (PTRS_PER_PTE entries) under the new mm's pte lock (and, nested, the
old mm's).  ``copy_one_pte`` for a private writable mapping
(``is_cow_mapping``): ``ptep_set_wrprotect(src_mm, ...)`` and
``pte_wrprotect(pte)`` -- the page is write-protected in both --,
``get_page``, ``page_dup_rmap``, and the new mm's rss.  A KSM page is
mapped as it is (read-only already), one more mapping of it.

The old mm's pte lock is not taken here: a task is one thread, and the
old mm's mmap_sem held for write keeps every other writer of its PTEs out
(faults, ksmd's write_protect_page/replace_page, break_cow and run=2 all
take it for read; munmap and madvise for write).  The new mm's pte lock
and zone_lock are held across each page-table page, so that a run of
copied PTEs, the old ones it write-protected and the counts it raised are
seen by fsck (which stops the world with every pte lock and zone_lock)
all or not at all.  The new mm's pte lock is the first lock taken, on the
new task's row, then zone_lock: the lock order holds on both rows.

A fork allocates no frame: every page is shared copy-on-write (2.6.32's
``copy_one_pte``).  What it allocates is the new page table (the kernel's
``pte_alloc_map_lock``: -ENOMEM when it fails), here the new mm's segment
backed in /dev/shm for what it maps (``MM.back_page_table``).

Errors are as copy_process has them: ``-ENOMEM`` from dup_mmap, and
``-ERESTARTNOINTR`` when a fatal signal is pending once it returned
("recalc_sigpending(); if (signal_pending(current))"); either way the new
mm is torn down with ``mmput`` (``bad_fork_cleanup_mm``) and the parent
goes on as before the call.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.errors import SyscallError
from uksm.host.log import NULL_LOG
from uksm.kernel import killpoints
from uksm.kernel.exit import mmput
from uksm.kernel.ksm import ENOMEM, __ksm_enter
from uksm.kernel.layout import (
    F_KSM,
    F_ZERO,
    FORK_GO,
    FORK_NONE,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    K_ZERO_PAGES,
    M_FLAGS,
    M_KSM_MAPPED,
    M_RSS,
    M_ZERO_PAGES,
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PT_OFF,
    PTE_WRITE,
    TS_FREE,
    TS_REAPING,
    VM_LOCKED,
)
from uksm.kernel.memory import Allocator, OutOfMemory
from uksm.kernel.mm import MM, mm_attach

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster

ERESTARTNOINTR = 513   # copy_process: a signal arrived during the fork
EAGAIN = 11            # no task row or mm row for the new task (RLIMIT_NPROC, threads-max)
PTRS_PER_PTE = 512     # PTEs per page-table page: copy_pte_range's unit


def ksm_fork(cl: "Cluster", child: MM, parent: MM, log: Any = NULL_LOG) -> bool:
    """ksm_fork (include/linux/ksm.h, 2.6.32): "if (test_bit(MMF_VM_MERGEABLE,
    &oldmm->flags)) return __ksm_enter(mm);".  The caller holds both
    mmap_sems for write.  True if the child entered KSM.  Under 6.18 the
    child also inherits MMF_VM_MERGE_ANY (prctl PR_SET_MEMORY_MERGE): 6.4,
    d7597f59d1d3 "mm: add new api to enable ksm per process" copies it in
    ksm_fork; since 6.7, 3c6f33b7273a "mm/ksm: support fork/exec for
    prctl", MMF_INIT_MASK carries it.  (This machine's 6.18 does not reset
    the child's ksm_rmap_items / ksm_merging_pages at fork -- the later
    "fork-counter" fix; uksm's child starts at 0, as that fix does.)"""
    if cl.modern and cl.q[parent.base + M_FLAGS] & MMF_VM_MERGE_ANY:
        child.words.flags |= MMF_VM_MERGE_ANY   # (the child is not yet visible: no racing writer)
    if not cl.q[parent.base + M_FLAGS] & MMF_VM_MERGEABLE:
        return False
    __ksm_enter(cl, child, log)
    return True


def copy_page_range(cl: "Cluster", ccl: "Cluster", child: MM, parent: MM, start: int,
                    end: int, log: Any = NULL_LOG) -> int:
    """copy_page_range for the area [start, end): copy_pte_range over each
    page-table page, copy_one_pte for each present entry.  ``cl`` is the
    parent's view, ``ccl`` the new task's (whose row takes the new mm's pte
    lock and zone_lock).  Returns the PTEs copied; OutOfMemory when the
    new page table cannot be had (pte_alloc_map_lock's -ENOMEM)."""
    # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
    if not child.back_page_table(end):
        raise OutOfMemory(f"no room in /dev/shm for the page table of mm{child.id}")
    q, fq, ppq, cpq = cl.q, cl.fq, parent.pq, child.pq
    task = ccl.task
    copied = 0
    lo = start
    while lo < end:
        hi = min(end, (lo // PTRS_PER_PTE + 1) * PTRS_PER_PTE)
        task.lock(child.ptl)      # dst_ptl (see the module's note on src_ptl)
        task.lock(ccl.zone)       # the counts raised here (get_page)
        try:
            rss = ksm = zero = 0
            for slot in range(PT_OFF + lo, PT_OFF + hi):
                pte = ppq[slot]
                if not pte:
                    continue
                if pte & PTE_WRITE:  # is_cow_mapping: ptep_set_wrprotect(src), pte_wrprotect(pte)
                    pte &= ~PTE_WRITE
                    ppq[slot] = pte
                b = (pte >> 2) * FRAME_SIZE
                fq[b + FR_COUNT] += 1          # get_page (page_dup_rmap)
                flags = fq[b + FR_FLAGS]
                if flags & F_KSM:
                    ksm += 1
                cpq[slot] = pte
                if flags & F_ZERO:
                    zero += 1  # 6.18: a KSM-placed zero PTE, copied as is; not in rss
                else:
                    rss += 1
                if rss == 1:
                    # the parent dies holding the new task's pte lock and
                    # zone_lock, a page table half copied
                    killpoints.hit(cl, "fork_copy_locked", log)
            q[child.base + M_RSS] += rss       # add_mm_rss
            q[child.base + M_KSM_MAPPED] += ksm
            if zero:
                # 6.18: dup_mm's memcpy gives the child the parent's
                # mm->ksm_zero_pages, which counts exactly these PTEs, and
                # ksm_fork adds them to the global ksm_zero_pages (Donet
                # Tom, "mm/ksm: fix incorrect KSM counter handling in
                # mm_struct during fork": else each child's exit took its
                # copies off a count that never had them).  This machine's
                # 6.18 does: 10 zero pages, fork, global 20, child exit 10.
                # Under zone_lock, as ksm_map_zero_page's updates.
                q[child.base + M_ZERO_PAGES] += zero
                q[K_ZERO_PAGES] += zero
            copied += rss + zero
        finally:
            task.unlock(ccl.zone)
            task.unlock(child.ptl)
        lo = hi
    return copied


def dup_mmap(cl: "Cluster", ccl: "Cluster", child: MM, parent: MM,
             log: Any = NULL_LOG) -> tuple[int, bool]:
    """dup_mmap (kernel/fork.c, 2.6.32): both mmap_sems for write (the
    new mm's on the new task's row, ``ccl``), ksm_fork, then every VMA
    and its page table, in address order.  Returns (PTEs copied, whether
    the child entered KSM); OutOfMemory as dup_mmap's -ENOMEM (the locks
    are released, what was copied stays for the caller's mmput)."""
    copied = 0
    parent.down_write()                   # down_write(&oldmm->mmap_sem)
    try:
        child.down_write()                # down_write_nested(&mm->mmap_sem, SINGLE_DEPTH_NESTING)
        try:
            killpoints.hit(cl, "fork_before_ksm_enter", log)
            entered = ksm_fork(cl, child, parent, log)   # line 305: before the VMAs
            for (_i, start, end, flags) in parent.vmas():
                child.insert_vma(start, end - start, flags & ~VM_LOCKED)  # *tmp = *mpnt
                child.words.pages += end - start
                copied += copy_page_range(cl, ccl, child, parent, start, end, log)
            killpoints.hit(cl, "fork_after_copy", log)
        finally:
            child.up_write()
    finally:
        parent.up_write()
    return copied, entered


def dup_mm(cl: "Cluster", parent: MM, child_row: int, child_mm: int, log: Any = NULL_LOG,
           pending: Callable[[], bool] | None = None) -> int:
    """copy_mm -> dup_mm, in the parent (``cl`` bound to its row): the new
    task's row ``child_row`` and its empty mm ``child_mm`` are the
    supervisor's (copy_process's dup_task_struct and mm_alloc).  Returns 0,
    or -errno with the new mm torn down (bad_fork_cleanup_mm: mmput) and
    the parent as it was, bar its PTEs now write-protected (a later write
    reuses its page: do_wp_page).  ``pending()``: a fatal signal is pending
    (copy_process's check after copy_mm: -ERESTARTNOINTR)."""
    t0 = time.monotonic_ns()
    ccl = cl.thread_view(child_row)       # the new task_struct's row
    ccl.task.uaf = cl.task.uaf            # its lock operations checked, waits logged, as ours
    ccl.task.on_wait = cl.task.on_wait
    # scheduled as ours in a controlled run (uksm.kernel.sched): a wait for
    # the new mm's pte lock -- held by a live fsck stopping the world -- is
    # then a modelled wait, never a real one the scheduler cannot see
    ccl.task.sched = cl.task.sched
    child = mm_attach(ccl, child_mm)
    err = copied = 0
    entered = False
    try:
        try:
            copied, entered = dup_mmap(cl, ccl, child, parent, log)
        except (OutOfMemory, SyscallError):   # a page table or a VMA row (vm_area_alloc)
            err = -ENOMEM
        if not err and pending is not None and pending():
            err = -ERESTARTNOINTR
        if err:
            alloc = Allocator(ccl)
            mmput(ccl, child, alloc, log)     # bad_fork_cleanup_mm
            alloc.flush()
    finally:
        child.seg.close()
        ccl.forget_mm(child.id)
    log.info("fork", mm=parent.id, child_mm=child_mm, child_row=child_row, ptes=copied,
             ksm_enter=entered, err=err, ms=round((time.monotonic_ns() - t0) / 1e6, 3))
    return err


# ---- copy_process's process-table words (the owner of the process table's half) ----------------
# A forking task asks in its own row (T_FORK = FORK_ASK) and waits; the
# owner of the process table -- the supervisor in a normal run
# (uksm.proc.forks), the explorer's world in a controlled one
# (uksm.explorer.world) -- answers in the same row.  What those answers
# write is the same for both, and is here; how each makes the row, the mm
# and the child's process is its own.

def fork_room(cl: "Cluster", live: int, max_live: int | None = None) -> bool:
    """One more task fits (copy_process's RLIMIT_NPROC / threads-max
    check): fewer than ``max_live`` (default: the task table) tasks alive
    or being made, a free task row and a free mm row (a new task takes one
    of each)."""
    if live >= (max_live or cl.max_tasks):
        return False
    return (any(cl.trow(r).state == TS_FREE for r in range(cl.max_tasks))
            and any(cl.mrow(r).id == 0 for r in range(cl.max_mms)))


def fork_adopt(cl: "Cluster", crow: int, row: int, ppid: int) -> None:
    """The new task's row (dup_task_struct) belongs to the parent's fork
    until its process runs; its real_parent (the OOM killer's children of
    a task) is the parent's pid."""
    ct = cl.trow(crow)
    ct.fork_parent = row + 1
    ct.ppid = ppid


def fork_go(cl: "Cluster", row: int, crow: int) -> None:
    """The parent may copy its mm into the new task's (FORK_GO).  From
    here a death of the parent takes the half-made child with it
    (T_FORK_CHILD: its recovery takes over both rows' locks, its reaper
    runs ``undo_fork``)."""
    t = cl.trow(row)
    t.fork_child = crow + 1
    t.fork_err = 0
    t.fork = FORK_GO


def fork_refuse(cl: "Cluster", row: int, err: int) -> None:
    """The fork fails before any copy (-EAGAIN, -ENOMEM): no new task."""
    t = cl.trow(row)
    t.fork_pid = err
    t.fork = err


def fork_return(cl: "Cluster", row: int, result: int) -> None:
    """The fork returns: the child's pid, or -errno (T_FORK back to
    FORK_NONE is the parent's fork(2) returning)."""
    t = cl.trow(row)
    t.fork_pid = result
    t.fork = FORK_NONE


def undo_fork(view: "Cluster", crow: int, mm: MM | None, pid: int, log: Any = NULL_LOG,
              oom_killer: Any = None) -> None:
    """bad_fork_cleanup_mm for a task whose process never ran (its parent
    died forking, or its process could not be made): the exit of its mm
    ``mm`` (attached through ``view``, which is bound to ``crow``'s row:
    the exit runs on the new task's own row), ``mmput`` -- what the copy
    mapped is unmapped, a slot ksm_fork gave it goes by __ksm_exit.  Idempotent: a mmput the parent began (its
    own bad_fork_cleanup_mm, when it died in it) is finished.  ``pid``:
    who acts on the row now.  The caller frees the row."""
    t = view.trow(crow)
    t.kill_point = -1
    t.pid = pid
    t.state = TS_REAPING
    if mm is not None:
        alloc = Allocator(view)
        alloc.oom_killer = oom_killer
        mmput(view, mm, alloc, log)
        alloc.flush()
    log.info("fork_undone", child_row=crow, child_mm=t.mm)


def forget_original_parent(cl: "Cluster", pid: int) -> None:
    """forget_original_parent (kernel/exit.c): a task's children go to
    init once it has exited."""
    for r in range(cl.max_tasks):
        if cl.trow(r).ppid == pid:
            cl.trow(r).ppid = 1


__all__ = ["dup_mm", "dup_mmap", "copy_page_range", "ksm_fork", "ERESTARTNOINTR", "EAGAIN",
           "PTRS_PER_PTE", "fork_room", "fork_adopt", "fork_go", "fork_refuse", "fork_return",
           "undo_fork", "forget_original_parent"]
