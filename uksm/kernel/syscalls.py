"""The system calls a worker makes on its address space: mmap, munmap,
madvise (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED), mlock; and,
under 6.18, prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE).

mmap/munmap/madvise(MERGEABLE|UNMERGEABLE) take mmap_sem for write, as
``madvise_need_mmap_write`` says; DONTNEED takes it for read.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.errors import SyscallError
from uksm.host.log import NULL_LOG
from uksm.kernel import killpoints, sched
from uksm.kernel.ksm import ERESTARTSYS, __ksm_enter, unmerge_ksm_pages
from uksm.kernel.layout import (
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    VM_LOCKED,
    VM_MERGEABLE,
    VM_READ,
    VM_WRITE,
)
from uksm.kernel.memory import Allocator, OutOfMemory
from uksm.kernel.mm import MM
from uksm.kernel.mmu import handle_mm_fault, zap_range

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster

class KsmInterrupted(Exception):
    """madvise(MADV_UNMERGEABLE) stopped by a pending signal (-ERESTARTSYS):
    the areas not fully unmerged keep VM_MERGEABLE."""

    def __init__(self, err: int, pages: int) -> None:
        super().__init__(f"unmerge interrupted after {pages} pages "
                         f"({'ERESTARTSYS' if err == -ERESTARTSYS else err})")
        self.err = err
        self.pages = pages


MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
# x86-64's numbers: the argument of a controlled run's syscall points
NR_MMAP, NR_MUNMAP, NR_MADVISE, NR_MLOCKALL, NR_PRCTL = 9, 11, 28, 151, 157
# include/uapi/linux/prctl.h (6.4, d7597f59d1d3 "mm: add new api to enable ksm per process")
PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68


def syscall_entry(nr: int) -> None:
    """Syscall entry: a scheduling point of a controlled run."""
    if sched.ON:
        sched.point("syscall", nr)


def syscall_return(nr: int) -> None:
    """Syscall return: a scheduling point of a controlled run."""
    if sched.ON:
        sched.point("syscall_ret", nr)


def _range(cl: "Cluster", addr: int, length: int) -> tuple[int, int]:
    """munmap's checks: an aligned start, a length > 0, inside the address
    space (EINVAL otherwise)."""
    if addr & (PAGE_SIZE - 1) or length <= 0 or addr < 0:
        raise SyscallError("EINVAL", f"invalid range {addr:#x}+{length}")
    start, end = addr >> PAGE_SHIFT, (addr + length + PAGE_SIZE - 1) >> PAGE_SHIFT
    if end > cl.va_pages:  # do_munmap: "len > TASK_SIZE-start" -> -EINVAL
        raise SyscallError("EINVAL", f"range {addr:#x}+{length} is beyond the address space")
    return start, end


def sys_mmap(cl: "Cluster", mm: MM, length: int, prot: int = VM_READ | VM_WRITE,
             log: Any = NULL_LOG) -> int:
    """mmap(NULL, length, prot, MAP_PRIVATE|MAP_ANONYMOUS); ``prot`` as VMA
    flags (0 is PROT_NONE).  Under 6.18 an mm with MMF_VM_MERGE_ANY (prctl
    PR_SET_MEMORY_MERGE) gets its new area VM_MERGEABLE at once."""
    npages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    if npages <= 0:
        raise SyscallError("EINVAL", "mmap of zero length")
    syscall_entry(NR_MMAP)
    mm.down_write()
    try:
        start = mm.get_unmapped_area(npages)
        if not mm.back_page_table(start + npages):  # the entries it maps are backed first
            raise OutOfMemory(f"no room in /dev/shm for the page table of {npages} pages")
        if cl.modern and mm.words.flags & MMF_VM_MERGE_ANY:
            # 6.17 "mm: prevent KSM from breaking VMA merging for new VMAs":
            # __mmap_region's ksm_vma_flags makes the area VM_MERGEABLE before
            # it exists (so it merges with its mergeable neighbours).  The
            # kernel keeps a live mm's slot; uksm's ksmd frees the slot of an
            # mm left with no mergeable area (its MMF_VM_MERGEABLE cleared):
            # enter it again, or the new area would never be scanned
            if not mm.words.flags & MMF_VM_MERGEABLE:
                __ksm_enter(cl, mm, log)
            prot |= VM_MERGEABLE
        mm.insert_vma(start, npages, prot)
        mm.words.pages += npages
    finally:
        mm.up_write()
    syscall_return(NR_MMAP)
    return start << PAGE_SHIFT


def sys_mlockall(cl: "Cluster", mm: MM, alloc: Allocator) -> int:
    """mlockall(MCL_CURRENT): VM_LOCKED on every VMA, and the pages of the
    accessible ones faulted in (mlock_vma_pages_range; a PROT_NONE area
    stays unpopulated).  Returns pages faulted in."""
    n = 0
    syscall_entry(NR_MLOCKALL)
    mm.down_write()
    try:
        for (i, s, e, f) in mm.vmas():
            mm.set_vma_flags(i, f | VM_LOCKED)
            if not f & (VM_READ | VM_WRITE):
                continue
            for vpn in range(s, e):
                if not mm.pq[PT_OFF + vpn] & PTE_PRESENT:
                    handle_mm_fault(cl, alloc, mm, vpn, bool(f & VM_WRITE))
                    n += 1
    finally:
        mm.up_write()
    syscall_return(NR_MLOCKALL)
    return n


def sys_munmap(cl: "Cluster", mm: MM, alloc: Allocator, addr: int, length: int) -> None:
    start, end = _range(cl, addr, length)
    syscall_entry(NR_MUNMAP)
    mm.down_write()
    try:
        idx, _holes = mm.split_range(start, end)  # do_munmap: a hole is no error
        zap_range(cl, alloc, mm, start, end)
        mm.words.pages -= sum(e - s for (s, e, _f) in map(mm.vma_at, idx))
        mm.remove_vmas(idx)
    finally:
        mm.up_write()
    syscall_return(NR_MUNMAP)


def sys_madvise(cl: "Cluster", mm: MM, alloc: Allocator, addr: int, length: int, advice: int,
                log: Any = NULL_LOG, stop: Callable[[], bool] | None = None) -> int:
    """sys_madvise (2.6.32.67 mm/madvise.c); returns pages unmerged for
    MADV_UNMERGEABLE, else 0.  Errors are SyscallError, the task lives:

    - an unaligned start, a negative length: -EINVAL; a length of 0: 0
      ("if (end == start) goto out;" with error 0);
    - a range over holes: the advice is applied to the mapped parts, then
      -ENOMEM ("If the interval [start,end) covers some unmapped address
      ranges, just ignore them, but return -ENOMEM at the end");
    - a split past max_map_count: -EAGAIN (madvise_behavior: "if (error
      == -ENOMEM) error = -EAGAIN;");
    - MADV_UNMERGEABLE stopped by a pending signal (``stop()``):
      KsmInterrupted, -ERESTARTSYS ("if (signal_pending(current)) err =
      -ERESTARTSYS;", unmerge_ksm_pages)."""
    if advice not in (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE):
        raise SyscallError("EINVAL", f"madvise advice {advice}")  # !madvise_behavior_valid
    if addr & (PAGE_SIZE - 1) or addr < 0 or length < 0:
        raise SyscallError("EINVAL", f"invalid range {addr:#x}+{length}")
    if length == 0:
        return 0
    start, asked = addr >> PAGE_SHIFT, (addr + length + PAGE_SIZE - 1) >> PAGE_SHIFT
    end = min(asked, cl.va_pages)  # above it nothing is mapped: a hole
    holes = end != asked
    syscall_entry(NR_MADVISE)
    if advice == MADV_DONTNEED:
        cl.task.lock(mm.sem)
        try:
            for (_i, s, e, _f) in mm.vmas():
                if s < end and e > start:
                    zap_range(cl, alloc, mm, max(s, start), min(e, end))
            holes = holes or _holes(mm, start, end)
        finally:
            cl.task.unlock(mm.sem)
        syscall_return(NR_MADVISE)
        if holes:
            raise SyscallError("ENOMEM", f"madvise range from {addr:#x} is not fully mapped")
        return 0
    mm.down_write()
    n = err = 0
    try:
        idx, gaps = mm.split_range(start, end, "EAGAIN")
        holes = holes or gaps
        killpoints.hit(cl, "madvise_mmap_sem_write", log)
        if advice == MADV_MERGEABLE:
            # ksm_madvise: __ksm_enter the first time, then VM_MERGEABLE
            if idx and not mm.words.flags & MMF_VM_MERGEABLE:
                __ksm_enter(cl, mm, log)
            for i in idx:
                mm.set_vma_flags(i, mm.vma_at(i)[2] | VM_MERGEABLE)
        else:
            # ksm_madvise, per VMA in address order: an area is cleared of
            # VM_MERGEABLE only once unmerge_ksm_pages finished it; on an
            # error it keeps the flag (KSM pages may remain there: "the
            # important thing is to not let VM_MERGEABLE be cleared while
            # any such pages might remain", break_ksm) and madvise fails
            for i in sorted(idx, key=lambda j: mm.vma_at(j)[0]):
                s, e, f = mm.vma_at(i)
                if not f & VM_MERGEABLE:
                    continue  # "just ignore the advice"
                k, err = unmerge_ksm_pages(cl, alloc, mm, s, e, False, stop)
                n += k
                if err:
                    break
                mm.set_vma_flags(i, f & ~VM_MERGEABLE)
        mm.merge_vmas()
    except SyscallError:
        mm.merge_vmas()  # a split that was made is joined again: the table as it was
        raise
    finally:
        mm.up_write()
    if advice == MADV_UNMERGEABLE:
        log.info("unmerge", mm=mm.id, pages=n, reason="madvise")
    syscall_return(NR_MADVISE)
    if err:
        raise KsmInterrupted(err, n)
    if holes:
        raise SyscallError("ENOMEM", f"madvise range from {addr:#x} is not fully mapped")
    return n


def sys_prctl(cl: "Cluster", mm: MM, alloc: Allocator, option: int, arg2: int = 0, arg3: int = 0,
              arg4: int = 0, arg5: int = 0, log: Any = NULL_LOG,
              stop: Callable[[], bool] | None = None) -> int:
    """prctl(2), its two KSM options as 6.18's kernel/sys.c does them (6.4,
    d7597f59d1d3 "mm: add new api to enable ksm per process"): returns 0,
    or PR_GET_MEMORY_MERGE's 0/1.  Any other option, and these under
    2.6.32 (which has neither), is SyscallError EINVAL ("default: error =
    -EINVAL;"): uksm emulates no other prctl.

    - PR_SET_MEMORY_MERGE: "if (arg3 || arg4 || arg5) return -EINVAL;",
      then under mmap_write_lock: arg2 != 0 ksm_enable_merge_any, 0
      ksm_disable_merge_any (which unmerges: 6.4, 24139c07f413 "mm/ksm:
      unmerge and clear VM_MERGEABLE when setting PR_SET_MEMORY_MERGE=0");
    - PR_GET_MEMORY_MERGE: "if (arg2 || arg3 || arg4 || arg5) return
      -EINVAL;", then "!!test_bit(MMF_VM_MERGE_ANY, &me->mm->flags)"."""
    if not cl.modern or option not in (PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE):
        raise SyscallError("EINVAL", f"prctl option {option}: not one of this kernel's"
                           + ("" if cl.modern else " (2.6.32 has no PR_SET_MEMORY_MERGE)"))
    if option == PR_GET_MEMORY_MERGE:
        if arg2 or arg3 or arg4 or arg5:
            raise SyscallError("EINVAL", "PR_GET_MEMORY_MERGE takes no argument")
        return int(bool(mm.words.flags & MMF_VM_MERGE_ANY))
    if arg3 or arg4 or arg5:
        raise SyscallError("EINVAL", "PR_SET_MEMORY_MERGE: arg3, arg4 and arg5 must be 0")
    syscall_entry(NR_PRCTL)
    mm.down_write()
    n = err = 0
    try:
        if arg2:
            ksm_enable_merge_any(cl, mm, log)
        else:
            n, err = ksm_disable_merge_any(cl, mm, alloc, log, stop)
    finally:
        mm.up_write()
    syscall_return(NR_PRCTL)
    if err:
        raise KsmInterrupted(err, n)
    return 0


def ksm_enable_merge_any(cl: "Cluster", mm: MM, log: Any = NULL_LOG) -> None:
    """ksm_enable_merge_any (6.18 mm/ksm.c): __ksm_enter if the mm is not
    in KSM yet, set MMF_VM_MERGE_ANY, ksm_add_vmas (every area: uksm's are
    all private anonymous, vma_ksm_compatible).  Caller holds mmap_sem for
    write (ksmd clears MMF_VM_MERGEABLE only under mmap_sem: the flag word's
    read-modify-write is not lost)."""
    if mm.words.flags & MMF_VM_MERGE_ANY:
        return
    if not mm.words.flags & MMF_VM_MERGEABLE:
        __ksm_enter(cl, mm, log)
    mm.words.flags |= MMF_VM_MERGE_ANY
    for (i, _s, _e, f) in mm.vmas():       # ksm_add_vmas: __ksm_add_vma each
        if not f & VM_MERGEABLE:
            mm.set_vma_flags(i, f | VM_MERGEABLE)
    mm.merge_vmas()
    log.info("ksm_merge_any", mm=mm.id, on=1)


def ksm_disable_merge_any(cl: "Cluster", mm: MM, alloc: Allocator, log: Any = NULL_LOG,
                          stop: Callable[[], bool] | None = None) -> tuple[int, int]:
    """ksm_disable_merge_any (6.18): ksm_del_vmas -- every VM_MERGEABLE area
    unmerged (unmerge_ksm_pages) and its flag cleared, MADV_MERGEABLE ones
    too --, then MMF_VM_MERGE_ANY cleared.  All or nothing: if an unmerge
    fails (a fatal signal pending: -ERESTARTSYS) ksm_add_vmas makes every
    area mergeable again and the flag stays.  Returns (pages unmerged,
    0 or -errno).  Caller holds mmap_sem for write."""
    if not mm.words.flags & MMF_VM_MERGE_ANY:
        return 0, 0
    n = err = 0
    for (i, s, e, f) in mm.vmas():         # __ksm_del_vma, in address order
        if not f & VM_MERGEABLE:
            continue
        k, err = unmerge_ksm_pages(cl, alloc, mm, s, e, False, stop)
        n += k
        if err:
            break
        mm.set_vma_flags(i, f & ~VM_MERGEABLE)
    if err:
        for (i, _s, _e, f) in mm.vmas():   # ksm_add_vmas
            mm.set_vma_flags(i, f | VM_MERGEABLE)
    else:
        mm.words.flags &= ~MMF_VM_MERGE_ANY
    mm.merge_vmas()
    log.info("unmerge", mm=mm.id, pages=n, reason="prctl")
    log.info("ksm_merge_any", mm=mm.id, on=int(bool(err)))
    return n, err


def _holes(mm: MM, start: int, end: int) -> bool:
    """Some page of [start, end) is in no VMA."""
    pos = start
    for (_i, s, e, _f) in mm.vmas():
        if s <= pos < e:
            pos = e
        if pos >= end:
            return False
    return True
