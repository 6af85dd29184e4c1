"""The system calls a worker makes on its address space: mmap, munmap,
madvise (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED), mlock.

mmap/munmap/madvise(MERGEABLE|UNMERGEABLE) take mmap_sem for write, as
``madvise_need_mmap_write`` says; DONTNEED takes it for read.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uksm.errors import SegFault
from uksm.host.log import NULL_LOG
from uksm.kernel import killpoints, sched
from uksm.kernel.ksm import ERESTARTSYS, __ksm_enter, unmerge_ksm_pages
from uksm.kernel.layout import (
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
NR_MMAP, NR_MUNMAP, NR_MADVISE, NR_MLOCKALL = 9, 11, 28, 151


def syscall_entry(nr: int) -> None:
    """Syscall entry: a scheduling point of a controlled run."""
    if sched.ON:
        sched.point("syscall", nr)


def syscall_return(nr: int) -> None:
    """Syscall return: a scheduling point of a controlled run."""
    if sched.ON:
        sched.point("syscall_ret", nr)


def _range(cl: "Cluster", addr: int, length: int) -> tuple[int, int]:
    if addr & (PAGE_SIZE - 1) or length <= 0 or addr < 0:
        raise SegFault(f"invalid range {addr:#x}+{length} (EINVAL)")
    start, end = addr >> PAGE_SHIFT, (addr + length + PAGE_SIZE - 1) >> PAGE_SHIFT
    if end > cl.va_pages:
        raise SegFault(f"range {addr:#x}+{length} is beyond the address space (ENOMEM)")
    return start, end


def _mapped(mm: MM, start: int, end: int, addr: int) -> None:
    """madvise's ENOMEM: every page of the range must be in a VMA."""
    pos = start
    for (_i, s, e, _f) in mm.vmas():
        if s <= pos < e:
            pos = e
        if pos >= end:
            return
    raise SegFault(f"madvise range from {addr:#x} is not fully mapped (ENOMEM)")


def sys_mmap(cl: "Cluster", mm: MM, length: int, prot: int = VM_READ | VM_WRITE) -> int:
    """mmap(NULL, length, prot, MAP_PRIVATE|MAP_ANONYMOUS); ``prot`` as VMA
    flags (0 is PROT_NONE)."""
    npages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    if npages <= 0:
        raise SegFault("mmap of zero length (EINVAL)")
    syscall_entry(NR_MMAP)
    mm.down_write()
    try:
        start = mm.get_unmapped_area(npages)
        if not mm.back_page_table(start + npages):  # the entries it maps are backed first
            raise OutOfMemory(f"no room in /dev/shm for the page table of {npages} pages")
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
        idx = mm.split_range(start, end)
        zap_range(cl, alloc, mm, start, end)
        for i in idx:
            mm.remove_vma(i)
        mm.words.pages -= end - start
    finally:
        mm.up_write()
    syscall_return(NR_MUNMAP)


def sys_madvise(cl: "Cluster", mm: MM, alloc: Allocator, addr: int, length: int, advice: int,
                log: Any = NULL_LOG, stop: Callable[[], bool] | None = None) -> int:
    """madvise; returns pages unmerged for MADV_UNMERGEABLE, else 0."""
    start, end = _range(cl, addr, length)
    syscall_entry(NR_MADVISE)
    if advice == MADV_DONTNEED:
        cl.task.lock(mm.sem)
        try:
            _mapped(mm, start, end, addr)
            zap_range(cl, alloc, mm, start, end)
        finally:
            cl.task.unlock(mm.sem)
        syscall_return(NR_MADVISE)
        return 0
    if advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE):
        raise SegFault(f"madvise advice {advice} (EINVAL)")
    mm.down_write()
    n = err = 0
    try:
        idx = mm.split_range(start, end)
        killpoints.hit(cl, "madvise_mmap_sem_write", log)
        if advice == MADV_MERGEABLE:
            # ksm_madvise: __ksm_enter the first time, then VM_MERGEABLE
            if not mm.words.flags & MMF_VM_MERGEABLE:
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
    finally:
        mm.up_write()
    if advice == MADV_UNMERGEABLE:
        log.info("unmerge", mm=mm.id, pages=n, reason="madvise")
    syscall_return(NR_MADVISE)
    if err:
        raise KsmInterrupted(err, n)
    return n

