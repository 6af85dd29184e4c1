"""The emulated MMU: user reads and writes by virtual address, page faults.

``handle_mm_fault`` emulates ``do_anonymous_page`` (first touch: a fresh
zero-filled frame) and ``do_wp_page`` (write to a write-protected PTE: reuse
the page if it is an ordinary anonymous page mapped once, else copy it to a
new frame -- a KSM page is always copied, as in 2.6.32).  As in the kernel,
the frame is allocated with the pte lock dropped, and installed only if the
PTE is still what the fault saw (``pte_same``).

The seed's check, under the ``seed`` exit policy only: a fault run for
``break_ksm`` must not reinstate a PTE in an mm whose pages ``exit_mmap``
has already zapped (``ksm_test_exit``), or the new frame would be leaked
when the page tables are freed.  The seed put it in ``do_anonymous_page``
and ``__do_fault`` -- the paths of a fault on a zapped (pte_none) entry --
not in ``do_wp_page``, where ``pte_same`` already fails if the zap came
first.  Andrea's "ksm: fix deadlock with munlock in exit_mmap" removed both
checks with the move of ksm_exit back before exit_mmap (2.6.32.67's
mm/memory.c has no ksm_test_exit), so ``shipped`` and ``legacy`` fault
without it: their __ksm_exit slow path, before exit_mmap, is what keeps
ksmd out.  The hazard ``no-exit-checks`` removes it under ``seed``, to show
the leak.

User access is serialised with page-table changes by the pte lock: a write
holds it across the copy, so ksmd's ``write_protect_page``/``replace_page``
(which take it too) can never lose a write into a frame being replaced.
Reads are optimistic: read the PTE, the bytes, the PTE again, and retry if
it changed (a replaced frame may be freed and reused at any time).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uksm.errors import SegFault
from uksm.kernel import killpoints, sched
from uksm.kernel.layout import (
    F_KSM,
    F_ZERO,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    H_EXIT_POLICY,
    H_HAZARDS,
    HZ_NO_EXIT_CHECKS,
    K_ZERO_PAGES,
    M_KSM_MAPPED,
    M_RSS,
    M_USERS,
    M_ZERO_PAGES,
    PAGE_SHIFT,
    PAGE_SIZE,
    POL_SEED,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    T_COW,
    T_FAULTS,
    T_KILL_POINT,
    V_FLAGS,
    VM_WRITE,
)
from uksm.kernel.memory import Allocator, OutOfMemory
from uksm.kernel.mm import MM

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster

PW = PTE_PRESENT | PTE_WRITE
ZERO_PAGE = bytes(PAGE_SIZE)

FAULT_OK, FAULT_EXITING = 0, 1


def ksm_test_exit(cl: "Cluster", mm: MM) -> bool:
    """ksm_test_exit(mm): mm_users is 0, exit_mmap may be tearing it down.
    The hazard ``no-exit-checks`` makes every such check answer False."""
    if cl.q[H_HAZARDS] & HZ_NO_EXIT_CHECKS:
        return False
    return cl.q[mm.base + M_USERS] == 0


def ksm_map_zero_page(q: Any, mbase: int) -> None:
    """ksm_map_zero_page (6.6, e2942062e01d "ksm: count all zero pages
    placed by KSM"; 6080d19f0704 per mm): one more KSM-placed zero page,
    globally and in the mm at ``mbase``.  Caller holds the mm's pte lock
    (which orders the per-mm count with every unmap of its PTEs) and
    zone_lock, which makes the global count's update atomic: 6.10's
    "mm/ksm: fix ksm_zero_pages accounting" (Chengming Zhou) made both
    atomic_long_t, because ksmd's ++ and the page-table side's -- raced
    and users read -1."""
    q[K_ZERO_PAGES] += 1
    q[mbase + M_ZERO_PAGES] += 1


def ksm_might_unmap_zero_page(q: Any, mbase: int) -> None:
    """ksm_might_unmap_zero_page (include/linux/ksm.h, 6.6): a KSM-placed
    zero PTE of the mm at ``mbase`` is unmapped or replaced.  Caller holds
    that mm's pte lock and zone_lock (see ksm_map_zero_page)."""
    q[K_ZERO_PAGES] -= 1
    q[mbase + M_ZERO_PAGES] -= 1


def handle_mm_fault(cl: "Cluster", alloc: Allocator, mm: MM, vpn: int, write: bool,
                    for_ksmd: bool = False, unshare: bool = False) -> int:
    """Fault page ``vpn`` of ``mm`` in (for write: make it writable).

    ``unshare`` (with ``write``; 6.2, "mm: add FAULT_FLAG_UNSHARE", used by
    6.18's break_ksm): copy a shared page without the write's side effects
    -- the area need not be writable, and the copy is mapped read-only
    (wp_page_copy: no maybe_mkwrite), so the next write reuses it.

    Caller holds ``mm``'s mmap_sem (read or write).  Raises SegFault outside
    a VMA, OutOfMemory when the faulting task is dying.  Returns
    FAULT_EXITING when the mm is exiting and nothing was installed.
    """
    # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
    pq = mm.pq
    vb = mm.vma_base(vpn)  # find_vma
    if vb < 0:
        raise SegFault(f"segfault at {vpn << PAGE_SHIFT:#x} (mm{mm.id}): no VMA")
    if write and not unshare and not pq[vb + V_FLAGS] & VM_WRITE:
        raise SegFault(f"segfault at {vpn << PAGE_SHIFT:#x} (mm{mm.id}): VMA is read-only")
    task, q, fq = cl.task, cl.q, cl.fq
    tb = task.base
    slot = PT_OFF + vpn
    # handle_pte_fault: ``entry = *pte`` without the pte lock (2.6.32.67
    # mm/memory.c, handle_pte_fault: ``entry = *pte;`` before
    # ``spin_lock(ptl)``).  An empty entry goes to do_anonymous_page, which
    # takes the lock only to install and looks again there (``if
    # (!pte_none(*page_table)) goto release;``: the check below catches a
    # racing fault or zap); a present one is looked at again under the
    # lock, as handle_pte_fault's ``pte_same(*pte, entry)`` does.
    pte = pq[slot]
    if pte:
        task.lock(mm.ptl)
        pte = pq[slot]
        if pte & PTE_PRESENT and (not write or pte & PTE_WRITE):
            task.unlock(mm.ptl)
            return FAULT_OK  # raced with another fault: nothing to do
        old = pte >> 2
        if pte and write and not fq[old * FRAME_SIZE + FR_FLAGS] & F_KSM \
                and fq[old * FRAME_SIZE + FR_COUNT] == 1:
            # do_wp_page, reuse: ours alone (ksmd write-protected it for a merge
            # that has not replaced it yet): make it writable again; ksmd's
            # replace_page will see the PTE changed and back out.
            pq[slot] = pte | PTE_WRITE
            task.unlock(mm.ptl)
            return FAULT_OK
        task.unlock(mm.ptl)
    old = pte >> 2
    q[tb + T_FAULTS] += 1
    pcp = alloc.pcp
    # the common case without alloc_frame's call layers (0.06 us of a
    # first touch): a frame off the task's list, in flight (see in_flight)
    new = alloc.in_flight(mm.id, vpn, pcp.pop()) if pcp else alloc.alloc_frame(mm.id, vpn, not for_ksmd)
    if not for_ksmd and (q[tb + T_KILL_POINT] >= 0 or sched.ON):  # armed (the call only then: 0.05 us)
        killpoints.hit(cl, "fault_after_alloc")
    if pte:
        # copy before installing: the old frame is write-protected (a KSM
        # page's content never changes), the new one still private to us
        pool = cl.pool.mv
        pool[new * PAGE_SIZE:(new + 1) * PAGE_SIZE] = pool[old * PAGE_SIZE:(old + 1) * PAGE_SIZE]
        if not for_ksmd:
            killpoints.hit(cl, "cow_after_copy")
    b = mm.base
    task.lock(mm.ptl)
    # (ksm_test_exit is called only at mm_users 0, its own test: a call on
    # every first touch cost 0.07 us)
    if pq[slot] != pte or (not pte and q[H_EXIT_POLICY] == POL_SEED and not q[b + M_USERS]
                           and ksm_test_exit(cl, mm)):
        # pte_same failed, or (the seed's check in do_anonymous_page)
        # exit_mmap zapped this mm: never reinstate a page there
        exiting = pq[slot] == pte
        alloc.installed()
        task.lock(cl.zone)
        alloc.put_frame(new)
        task.unlock(cl.zone)
        task.unlock(mm.ptl)
        alloc.flush()
        return FAULT_EXITING if exiting else FAULT_OK
    pq[slot] = (new << 2) | (PTE_PRESENT if unshare else PW)
    alloc.installed()
    if pte:
        task.lock(cl.zone)
        oflags = fq[old * FRAME_SIZE + FR_FLAGS]
        if oflags & F_KSM:
            q[b + M_KSM_MAPPED] -= 1
        elif oflags & F_ZERO:
            # 6.18 (6.6, 6080d19f0704 "ksm: add ksm zero pages for each
            # process"): wp_page_copy replacing a KSM-placed zero page,
            # ksm_might_unmap_zero_page; the new page is anonymous again
            # (replace_page's dec_mm_counter undone).  break_ksm's
            # FAULT_FLAG_UNSHARE of a zero PTE (unmerge) comes here too
            ksm_might_unmap_zero_page(q, b)
            q[b + M_RSS] += 1
        alloc.put_frame(old)
        task.unlock(cl.zone)
        q[task.base + T_COW] += 1
    else:
        q[b + M_RSS] += 1
    if sched.ON:  # the fault's commit point (uksm.kernel.sched), the pte lock held
        sched.point("cow_commit" if pte else "fault_commit", vpn)
    task.unlock(mm.ptl)
    if alloc.pending and not for_ksmd:
        alloc.flush()  # a freed KSM page: give it back now (ksmd flushes in runs)
    return FAULT_OK


def zap_range(cl: "Cluster", alloc: Allocator, mm: MM, start: int, end: int) -> int:
    """zap_page_range: unmap [start, end) and drop the frames' counts.
    Caller holds mmap_sem, or is exit_mmap.  Returns pages unmapped."""
    task, q, fq, pq = cl.task, cl.q, cl.fq, mm.pq
    n = 0
    step = 512  # hold the pte lock for a bounded run of PTEs
    if not 0 <= start <= end <= cl.va_pages:
        raise SegFault(f"zap of pages {start:#x}-{end:#x} outside the address space")
    for lo in range(start, end, step):
        hi = min(end, lo + step)
        task.lock(mm.ptl)
        task.lock(cl.zone)
        for slot in range(PT_OFF + lo, PT_OFF + hi):
            pte = pq[slot]
            if not pte:
                continue
            pq[slot] = 0
            pfn = pte >> 2
            flags = fq[pfn * FRAME_SIZE + FR_FLAGS]
            if flags & F_KSM:
                q[mm.base + M_KSM_MAPPED] -= 1
            if flags & F_ZERO:
                # 6.18: zap_present_pte's ksm_might_unmap_zero_page (6.6),
                # munmap, DONTNEED and exit_mmap alike; not in rss
                ksm_might_unmap_zero_page(q, mm.base)
            else:
                q[mm.base + M_RSS] -= 1
            alloc.put_frame(pfn)
            n += 1
            if n == 1:
                killpoints.hit(cl, "zone_lock_held")
        task.unlock(cl.zone)
        task.unlock(mm.ptl)
    alloc.flush()
    return n


class MMU:
    """A user process's view of its own address space."""

    def __init__(self, cl: "Cluster", mm: MM, alloc: Allocator) -> None:
        self.cl = cl
        self.mm = mm
        self.alloc = alloc
        self.pool = cl.pool.mv
        self.pq = mm.pq
        # the hot paths' objects, looked up once, not per access: the task
        # the cluster is bound to (an MMU is made after Cluster.bind), the
        # pte lock, the address space's size
        self.task = cl.task
        self.ptl = mm.ptl
        self.va_pages = cl.va_pages

    def fault(self, vpn: int, write: bool) -> None:
        """The page-fault exception: down_read(mmap_sem), handle_mm_fault, up_read."""
        task, mm = self.task, self.mm
        task.lock(mm.sem)
        try:
            handle_mm_fault(self.cl, self.alloc, mm, vpn, write)
        finally:
            task.unlock(mm.sem)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        """Store ``data`` at virtual address ``addr`` (may cross pages)."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if addr < 0:
            raise SegFault(f"segfault at {addr:#x}")
        task, ptl, pq, pool = self.task, self.ptl, self.pq, self.pool
        n = len(data)
        off = addr & (PAGE_SIZE - 1)
        if 0 < n <= PAGE_SIZE - off:
            # fast path: a write within one page, without the loop's
            # bookkeeping (a one-page write has no kill point inside).  The
            # same steps as the loop: the pte lock held across the copy; a
            # PTE not writable: drop it, fault, take it, look again.
            vpn = addr >> PAGE_SHIFT
            if vpn >= self.va_pages:
                raise SegFault(f"segfault at {addr:#x}: beyond the address space")
            slot = PT_OFF + vpn
            if pq[slot] & PW != PW:
                # the hardware's page walk, without the pte lock: a
                # fault at once, not a lock round trip to see the PTE
                # empty (or read-only) first
                self.fault(vpn, True)
            while True:
                task.lock(ptl)
                try:
                    pte = pq[slot]
                    if pte & PW == PW:
                        p = (pte >> 2) * PAGE_SIZE + off
                        pool[p:p + n] = data
                        return
                finally:
                    task.unlock(ptl)
                self.fault(vpn, True)  # changed since the fault: again (it sees a raced one done)
        mv = memoryview(data)
        done, n = 0, len(mv)
        task.lock(ptl)
        try:
            while done < n:
                a = addr + done
                vpn = a >> PAGE_SHIFT
                off = a & (PAGE_SIZE - 1)
                chunk = min(n - done, PAGE_SIZE - off)
                pte = pq[PT_OFF + vpn] if vpn < self.va_pages else 0
                if pte & PW == PW:
                    p = (pte >> 2) * PAGE_SIZE + off
                    pool[p:p + chunk] = mv[done:done + chunk]
                    done += chunk
                    if done < n:
                        killpoints.hit(self.cl, "pte_lock_held")
                    continue
                task.unlock(ptl)
                try:
                    if vpn >= self.va_pages:
                        raise SegFault(f"segfault at {a:#x}: beyond the address space")
                    self.fault(vpn, True)
                finally:
                    task.lock(ptl)
        finally:
            task.unlock(ptl)

    def read(self, addr: int, n: int) -> bytes:
        """Load ``n`` bytes from virtual address ``addr``.  A page never
        touched reads as zeros (the zero page) and is not allocated."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if addr < 0:
            raise SegFault(f"segfault at {addr:#x}")
        pq, pool, out = self.pq, self.pool, []
        done = 0
        while done < n:
            a = addr + done
            vpn = a >> PAGE_SHIFT
            off = a & (PAGE_SIZE - 1)
            chunk = min(n - done, PAGE_SIZE - off)
            if vpn >= self.va_pages:
                raise SegFault(f"segfault at {a:#x}: beyond the address space")
            slot = PT_OFF + vpn
            pte = pq[slot]
            if not pte & PTE_PRESENT:
                if self.mm.find_vma(vpn) is None:
                    raise SegFault(f"segfault at {a:#x} (mm{self.mm.id}): no VMA")
                out.append(ZERO_PAGE[:chunk])
                done += chunk
                continue
            p = (pte >> 2) * PAGE_SIZE + off
            data = pool[p:p + chunk].tobytes()
            if pq[slot] != pte:
                continue  # the frame was replaced under us: read again
            out.append(data)
            done += chunk
        return b"".join(out)


__all__ = ["MMU", "handle_mm_fault", "zap_range", "ksm_test_exit", "OutOfMemory",
           "ksm_map_zero_page", "ksm_might_unmap_zero_page",
           "FAULT_OK", "FAULT_EXITING"]
