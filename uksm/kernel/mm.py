"""Address spaces: mm_struct rows, VMA tables, page tables, mmap/madvise.

An address space is a row of the mm table (``mm_struct``: ``mm_users``,
``mm_count`` as reference bits, flags, rss) plus a segment ``/uksm.C.mmN``
holding its VMA table and its page table, plus three semaphores: ``mmap_sem``
(N units, rw), its writer mutex, and the pte lock.

Who protects what:
- VMA table: ``mmap_sem`` (write to change, read to walk);
- page table entries, M_RSS, M_KSM_MAPPED: the pte lock;
- M_USERS, M_REFS, M_STATE, M_FLAGS, the slot fields: ``ksm_mmlist_lock``
  (the kernel uses atomics and bit ops for the first ones; one leaf lock
  keeps the exit protocol's tests consistent here).

VMA changes are crash-safe without a journal: a split first writes the new
row, then shrinks the old one (for an instant both cover the tail, which a
walker tolerates), so a writer SIGKILLed mid-way leaves a usable table.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from uksm.errors import SyscallError
from uksm.host import shm
from uksm.host.log import NULL_LOG
from uksm.kernel.layout import (
    F_KSM,
    F_ZERO,
    FIRST_VPN,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    H_NEXT_MM_ID,
    M_CREATED_NS,
    M_EXIT_PATH,
    M_EXIT_STAGE,
    M_FLAGS,
    M_FREER_TASK,
    M_ID,
    M_KSM_MAPPED,
    M_MERGING,
    M_OOM_VICTIM,
    M_OWNER_PID,
    M_OWNER_TASK,
    M_PAGES,
    M_REFS,
    M_RMAP_ITEMS,
    M_RSS,
    M_SLOT_RMAP,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    M_WORKER_NO,
    M_WRITER_WAITING,
    MAGIC,
    MM_SIZE,
    MMS_FREE,
    MMS_FREEING,
    MMS_LIVE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    REF_USERS,
    S_MM_FREED,
    SEG_BOOT_ID,
    SEG_ID,
    SEG_MAGIC,
    SEG_NVMA,
    SEG_PT_TOP,
    SEG_VMA_TOP,
    SEG_VMAS_FREED,
    TS_ALIVE,
    TS_REAPING,
    V_END,
    V_FLAGS,
    V_START,
    VM_MERGEABLE,
    VMA_SIZE,
    XS_MMDROP,
    max_map_count,
    vma_off,
)
from uksm.kernel.views import MmRow

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster




class VmaTableFreed(Exception):
    """A walk of a VMA table that exit_mmap has destroyed: today's kernel
    destroys the maple tree in exit_mmap, and iterating it then is the
    use-after-free "mm/ksm: fix race with VMA iteration and mm_struct
    teardown" (2023) closed.  Only a missing ksm_test_exit check reaches it."""


class MM:
    """An address space as one process sees it."""

    __slots__ = ("cl", "id", "row", "base", "seg", "pq", "sem", "wmx", "ptl", "vma_off",
                 "max_map_count")

    def __init__(self, cl: "Cluster", mm_id: int, row: int, seg: shm.Segment) -> None:
        self.cl = cl
        self.id = mm_id
        self.row = row
        self.base = cl.mbase(row)
        self.seg = seg
        self.pq = seg.q
        self.sem, self.wmx, self.ptl = cl.mm_locks(mm_id)
        self.vma_off = vma_off(cl.va_pages)
        self.max_map_count = max_map_count(cl.va_pages)

    # ---- mm_struct fields -------------------------------------------------
    @property
    def words(self) -> MmRow:
        """This mm's row of the mm table by name (``uksm.kernel.views``)."""
        return MmRow(self.cl.q, self.base)

    def users(self) -> int:
        return self.cl.q[self.base + M_USERS]

    def down_write(self) -> None:
        """down_write(&mm->mmap_sem), flagging the wait so that ksmd, which
        holds mmap_sem for read across a run of pages, steps aside."""
        q = self.cl.q
        q[self.base + M_WRITER_WAITING] = 1
        self.cl.task.down_write(self.sem, self.wmx)
        q[self.base + M_WRITER_WAITING] = 0

    def up_write(self) -> None:
        self.cl.task.up_write(self.sem, self.wmx)

    def alive(self) -> bool:
        """The row still describes this mm (not freed and reused)."""
        return self.cl.q[self.base + M_ID] == self.id

    # ---- VMAs (caller holds mmap_sem) --------------------------------------
    def vmas(self) -> list[tuple[int, int, int, int]]:
        """(index, start vpn, end vpn, flags), sorted by start."""
        pq = self.pq
        if pq[SEG_VMAS_FREED]:
            raise VmaTableFreed(f"mm{self.id}: walking the VMAs after exit_mmap freed them")
        out = []
        off = self.vma_off
        for i in range(pq[SEG_NVMA]):
            b = off + i * VMA_SIZE
            end = pq[b + V_END]
            if end:
                out.append((pq[b + V_START], end, pq[b + V_FLAGS], i))
        out.sort()
        return [(i, s, e, f) for (s, e, f, i) in out]

    def vma_base(self, vpn: int) -> int:
        """find_vma's walk: the offset in the segment of the VMA row that
        covers ``vpn`` (its words at V_START, V_END, V_FLAGS), -1 if none.
        The fault's hot path reads the flags from it: no tuple built (a
        fault's find_vma cost 0.22 us, this 0.1)."""
        pq = self.pq
        if pq[SEG_VMAS_FREED]:
            raise VmaTableFreed(f"mm{self.id}: find_vma after exit_mmap freed the VMAs")
        b = self.vma_off
        end = b + pq[SEG_NVMA] * VMA_SIZE
        while b < end:
            if pq[b + V_START] <= vpn < pq[b + V_END]:
                return b
            b += VMA_SIZE
        return -1

    def find_vma(self, vpn: int) -> tuple[int, int, int, int] | None:
        """(index, start vpn, end vpn, flags) of the VMA covering ``vpn``."""
        b = self.vma_base(vpn)
        if b < 0:
            return None
        pq = self.pq
        return ((b - self.vma_off) // VMA_SIZE, pq[b + V_START], pq[b + V_END], pq[b + V_FLAGS])

    def _new_vma(self, start: int, end: int, flags: int, errno_name: str = "ENOMEM") -> int:
        """A new row, counted once written (the commit).  Past
        max_map_count: "if (mm->map_count >= sysctl_max_map_count) return
        -ENOMEM;" (split_vma, mmap_region; madvise_behavior turns it into
        -EAGAIN), the task lives."""
        pq = self.pq
        n = pq[SEG_NVMA]
        if n >= self.max_map_count:
            raise SyscallError(errno_name, f"mm{self.id}: {n} areas, max_map_count {self.max_map_count}")
        if not self.back_vma_table(n + 1):  # vm_area_alloc failing
            raise SyscallError(errno_name, f"mm{self.id}: no room in /dev/shm for a VMA row")
        self._set_vma(n, start, end, flags)
        pq[SEG_NVMA] = n + 1  # commit
        return n

    def _set_vma(self, i: int, start: int, end: int, flags: int) -> None:
        b = self.vma_off + i * VMA_SIZE
        pq = self.pq
        pq[b + V_END] = 0
        pq[b + V_START] = start
        pq[b + V_FLAGS] = flags
        pq[b + V_END] = end  # commit

    def get_unmapped_area(self, npages: int) -> int:
        vs = self.vmas()
        start = FIRST_VPN
        for (_i, s, e, _f) in vs:
            if s - start >= npages:
                break
            start = max(start, e)
        if start + npages > self.cl.va_pages:
            raise SyscallError("ENOMEM", f"address space full: {npages} pages do not fit")
        return start

    def insert_vma(self, start: int, npages: int, flags: int) -> None:
        self._new_vma(start, start + npages, flags)

    def split_range(self, start: int, end: int, errno_name: str = "ENOMEM") -> tuple[list[int], bool]:
        """Split VMAs so that [start, end) is covered by whole VMAs
        (split_vma); return their indexes, and whether the range has holes
        (the caller's -ENOMEM, after it has done its work on the mapped
        parts, as madvise does).  A split past max_map_count raises
        SyscallError(``errno_name``) with the table as it was."""
        pq = self.pq
        for edge in (start, end):
            for (i, s, e, f) in self.vmas():
                if s < edge < e:
                    self._new_vma(edge, e, f, errno_name)
                    pq[self.vma_off + i * VMA_SIZE + V_END] = edge
        covered = [(s, e, i) for (i, s, e, _f) in self.vmas() if start <= s and e <= end]
        pos = start
        for (s, e, _i) in sorted(covered):
            if s != pos:
                break
            pos = e
        return [i for (_s, _e, i) in covered], pos != end or not covered

    def vma_at(self, i: int) -> tuple[int, int, int]:
        b = self.vma_off + i * VMA_SIZE
        return self.pq[b + V_START], self.pq[b + V_END], self.pq[b + V_FLAGS]

    def set_vma_flags(self, i: int, flags: int) -> None:
        self.pq[self.vma_off + i * VMA_SIZE + V_FLAGS] = flags

    def remove_vmas(self, idx: list[int]) -> None:
        """Remove rows, the highest first: each is overwritten by the last
        row, then the count shrinks (for an instant the last area is in
        two rows, which a walker tolerates; the removed one is gone)."""
        pq = self.pq
        for i in sorted(idx, reverse=True):
            last = pq[SEG_NVMA] - 1
            if i != last:
                s, e, f = self.vma_at(last)
                self._set_vma(i, s, e, f)
            pq[SEG_NVMA] = last  # commit

    def merge_vmas(self) -> None:
        """vma_merge: join neighbours with equal flags (keeps the table small)."""
        while True:
            vs = self.vmas()
            for a, b in zip(vs, vs[1:]):
                if a[2] == b[1] and a[3] == b[3]:
                    self.pq[self.vma_off + a[0] * VMA_SIZE + V_END] = b[2]
                    self.remove_vmas([b[0]])
                    break
            else:
                return

    def mergeable_ranges(self) -> list[tuple[int, int]]:
        return [(s, e) for (_i, s, e, f) in self.vmas() if f & VM_MERGEABLE]

    # ---- page table ---------------------------------------------------------
    def pte(self, vpn: int) -> int:
        return self.pq[PT_OFF + vpn]

    def pagemap(self, vpn: int, count: int) -> list[dict[str, Any]]:
        """What /proc/PID/pagemap (present, the PFN), /proc/kpageflags
        (KPF_KSM) and /proc/kpagecount (page_mapcount) tell of pages
        vpn..vpn+count-1, and whether the PTE is write-protected (not in
        /proc: a COW or KSM mapping): one dict per page.  Without a lock,
        as pagemap_read walks the page table under mmap_sem only (ksmd's
        replace_page runs then too): each frame's count and flags are read
        between two reads of its PTE, again if it changed meanwhile."""
        pq, fq = self.pq, self.cl.fq
        top = self.pt_top
        out = []
        for v in range(vpn, vpn + count):
            while True:
                pte = pq[PT_OFF + v] if v < top else 0
                if not pte & PTE_PRESENT:
                    out.append({"present": False, "frame": None, "ksm": False,
                                "write_protected": False, "mapcount": 0})
                    break
                pfn = pte >> 2
                b = pfn * FRAME_SIZE
                mapcount, flags = fq[b + FR_COUNT], fq[b + FR_FLAGS]
                if flags & F_ZERO:
                    mapcount -= 1  # 6.18's zero page: its reservation is no mapping
                if pq[PT_OFF + v] == pte:
                    out.append({"present": True, "frame": pfn, "ksm": bool(flags & F_KSM),
                                "write_protected": not pte & PTE_WRITE, "mapcount": mapcount})
                    break
        return out

    @property
    def pt_top(self) -> int:
        """The page table is backed (and walked whole) up to this vpn."""
        return self.pq[SEG_PT_TOP]

    def back_page_table(self, end: int) -> bool:
        """Back the page table's entries up to vpn ``end`` in /dev/shm
        (sys_mmap, with mmap_sem held for write, before the VMA exists: a
        fault can only write an entry below SEG_PT_TOP), as the kernel
        allocates page-table pages for what is used.  False if /dev/shm has
        no room for them (a write to an unbacked entry would SIGBUS): the
        kernel's pte_alloc failing, VM_FAULT_OOM."""
        top = self.pq[SEG_PT_TOP]
        if end <= top:
            return True
        hi = self._back(PT_OFF + top, PT_OFF + end)
        if hi < 0:
            return False
        self.pq[SEG_PT_TOP] = min(self.cl.va_pages, hi - PT_OFF)
        return True

    def back_vma_table(self, rows: int) -> bool:
        """Back the VMA table's first ``rows`` rows (a new row, with
        mmap_sem held for write, before it is written): False if /dev/shm
        has no room, the kernel's vm_area_alloc failing (-ENOMEM)."""
        top = self.pq[SEG_VMA_TOP]
        if rows <= top:
            return True
        off = self.vma_off
        hi = self._back(off + top * VMA_SIZE, off + rows * VMA_SIZE)
        if hi < 0:
            return False
        self.pq[SEG_VMA_TOP] = min(self.max_map_count, (hi - off) // VMA_SIZE)
        return True

    def _back(self, lo: int, hi: int) -> int:
        """Back the pages holding the segment's words [lo, hi); returns the
        word where the backed run now ends (the end of the last page), -1
        when /dev/shm has no room."""
        a = lo * 8 // PAGE_SIZE * PAGE_SIZE
        b = min(self.seg.size, -(-hi * 8 // PAGE_SIZE) * PAGE_SIZE)
        if b > a and not self.seg.populate(a, b - a):
            return -1
        return b // 8


# ---- creation and the last mmdrop ----------------------------------------------

def mm_create(cl: "Cluster", owner_row: int, worker_no: int) -> MM:
    """mm_alloc + mm_init, done by the supervisor as fork/exec would: the
    row, the segment and the semaphores exist before the worker runs, so a
    worker killed at any instant leaves nothing half-made."""
    task, q = cl.task, cl.q
    task.lock(cl.mmlist)
    try:
        row = next((r for r in range(cl.max_mms) if cl.mrow(r).id == 0), -1)
        if row < 0:
            raise shm.UksmError(f"the mm table is full ({cl.max_mms} address spaces)", 1)
        mm_id = q[H_NEXT_MM_ID]
        q[H_NEXT_MM_ID] = mm_id + 1
        b = cl.mbase(row)
        for f in range(MM_SIZE):
            q[b + f] = 0
        q[b + M_STATE] = MMS_FREEING  # reserved; made live below
        q[b + M_ID] = mm_id
    finally:
        task.unlock(cl.mmlist)
    # sized for the whole address space and the most VMA rows it can
    # have, backed only as used: the header and the first page table
    # entries (the first page) now, more page table as sys_mmap maps
    # pages (SEG_PT_TOP), VMA rows as they are made (SEG_VMA_TOP)
    size = (vma_off(cl.va_pages) + max_map_count(cl.va_pages) * VMA_SIZE) * 8
    seg = shm.create_segment(cl.name, f"mm{mm_id}", size, backed=PAGE_SIZE)
    shm.create_sem(cl.name, f"mm{mm_id}.sem", cl.rwsem_n)
    shm.create_sem(cl.name, f"mm{mm_id}.wmx", 1)
    shm.create_sem(cl.name, f"mm{mm_id}.ptl", 1)
    seg.q[SEG_ID] = mm_id
    seg.q[SEG_BOOT_ID] = cl.boot_id
    seg.q[SEG_PT_TOP] = min(cl.va_pages, (PAGE_SIZE // 8) - PT_OFF)
    seg.q[SEG_MAGIC] = MAGIC
    b = cl.mbase(row)
    q[b + M_USERS] = 1
    q[b + M_REFS] = REF_USERS
    q[b + M_OWNER_TASK] = owner_row
    q[b + M_WORKER_NO] = worker_no
    q[b + M_CREATED_NS] = time.time_ns()
    q[b + M_STATE] = MMS_LIVE
    return MM(cl, mm_id, row, seg)


def mm_attach(cl: "Cluster", mm_id: int) -> MM:
    """Map address space ``mm_id`` of this cluster instance.  Its
    segment is found by name; one made by another instance of the cluster
    (a process outliving its cluster meets a newer one of the same name)
    is refused before its semaphores are opened."""
    row = cl.mm_row(mm_id)
    if row < 0:
        raise shm.UksmError(f"address space mm{mm_id} does not exist", 1)
    seg = shm.attach_segment(cl.name, f"mm{mm_id}")
    if seg.q[SEG_BOOT_ID] != cl.boot_id:
        seg.close()
        raise shm.UksmError(f"address space mm{mm_id} belongs to another instance of cluster "
                            f"{cl.name!r}", 1)
    return MM(cl, mm_id, row, seg)


def mm_objects(mm_id: int) -> list[tuple[str, str]]:
    return [("shm", f"mm{mm_id}"), ("sem", f"mm{mm_id}.sem"),
            ("sem", f"mm{mm_id}.wmx"), ("sem", f"mm{mm_id}.ptl")]


def mmdrop(cl: "Cluster", row: int, mm_id: int, ref: int, log: Any = NULL_LOG) -> bool:
    """mmdrop: drop one reference of mm_count (REF_USERS or REF_KSM).

    Idempotent: dropping a reference already dropped does nothing, so the
    reaper may redo a killed task's drop.  The last drop frees the mm:
    its row goes FREEING under ksm_mmlist_lock, its segment and semaphores
    are unlinked, then the row is released.  Returns True if this call freed
    it.  Caller must not hold ksm_mmlist_lock.
    """
    task, q = cl.task, cl.q
    b = cl.mbase(row)
    task.lock(cl.mmlist)
    try:
        if q[b + M_ID] != mm_id:
            return False
        refs = q[b + M_REFS]
        if not refs & ref:
            return False
        refs &= ~ref
        q[b + M_REFS] = refs
        if ref == REF_USERS:  # the exit's last step, in the same critical section
            q[b + M_EXIT_STAGE] |= XS_MMDROP
        log.info("mmdrop", mm=mm_id, ref="users" if ref == REF_USERS else "ksm",
                 mm_count=bin(refs).count("1"))
        if refs:
            return False
        q[b + M_FREER_TASK] = task.row + 1
        q[b + M_STATE] = MMS_FREEING
    finally:
        task.unlock(cl.mmlist)
    free_mm_objects(cl, row, mm_id, log)
    return True


def free_mm_objects(cl: "Cluster", row: int, mm_id: int, log: Any = NULL_LOG) -> None:
    """__mmdrop's tail: unlink what the mm owned and release its row.
    Also run by the supervisor for a row left FREEING by a killed task."""
    for kind, what in mm_objects(mm_id):
        (shm.unlink_shm if kind == "shm" else shm.unlink_sem)(cl.name, what)
    cl.forget_mm(mm_id)
    task, q = cl.task, cl.q
    b = cl.mbase(row)
    task.lock(cl.mmlist)
    if q[b + M_ID] == mm_id:
        q[S_MM_FREED] += 1
        q[b + M_STATE] = MMS_FREE
        q[b + M_ID] = 0
    task.unlock(cl.mmlist)
    log.info("mm_freed", mm=mm_id)


def finish_frees(cl: "Cluster", log: Any = NULL_LOG) -> list[int]:
    """An mm row left MMS_FREEING by a task that died inside ``__mmdrop``
    (its freer, M_FREER_TASK, no longer alive): free its objects now
    (the supervisor's sweep, a controlled run's reaper).  Returns the mm
    ids freed."""
    out = []
    for r in range(cl.max_mms):
        m = cl.mrow(r)
        mm_id = m.id
        if not mm_id or m.state != MMS_FREEING or not m.freer_task:
            continue
        if cl.trow(m.freer_task - 1).state in (TS_ALIVE, TS_REAPING):
            continue
        free_mm_objects(cl, r, mm_id, log)
        out.append(mm_id)
    return out


def mm_fields(cl: "Cluster", row: int) -> dict[str, int]:
    """The row as a dict (status, report, fsck)."""
    q, b = cl.q, cl.mbase(row)
    names = {"id": M_ID, "state": M_STATE, "owner_pid": M_OWNER_PID, "owner_task": M_OWNER_TASK,
             "mm_users": M_USERS, "refs": M_REFS, "flags": M_FLAGS, "rss": M_RSS,
             "ksm_mapped": M_KSM_MAPPED, "ksm_rmap_items": M_RMAP_ITEMS,
             "ksm_merging_pages": M_MERGING, "exit_stage": M_EXIT_STAGE,
             "exit_path": M_EXIT_PATH, "oom_victim": M_OOM_VICTIM,
             "writer_waiting": M_WRITER_WAITING, "slot_used": M_SLOT_USED,
             "slot_rmap": M_SLOT_RMAP, "pages": M_PAGES, "worker_no": M_WORKER_NO}
    d = {k: q[b + f] for k, f in names.items()}
    d["mm_count"] = bin(d["refs"]).count("1")
    d["row"] = row
    return d


def live_mm_rows(cl: "Cluster") -> list[int]:
    return [r for r in range(cl.max_mms) if (m := cl.mrow(r)).id and m.state != MMS_FREE]


def pages_of(npages_or_bytes: int) -> int:
    return (npages_or_bytes + PAGE_SIZE - 1) // PAGE_SIZE


__all__ = ["MM", "mm_create", "mm_attach", "mmdrop", "free_mm_objects",
           "mm_fields", "live_mm_rows"]
