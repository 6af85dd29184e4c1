"""ksmd's 6.18 parts that 2.6.32 has no trace of (mm/ksm.c of 6.18, for a
cluster made with ``kernel="6.18"``; ``uksm.kernel.ksmd`` calls them only
when ``Cluster.modern``):

- smart scan (6.7, Stefan Roesch, "mm/ksm: add "smart" page scanning
  mode" and "mm/ksm: add pages_skipped metric"): ``skip_age`` and
  ``should_skip_rmap_item``, on each rmap_item's ``age`` and
  ``remaining_skips`` (SlotState.age, SlotState.skips);
- the scan-time advisor (6.8, 4e5fa4f5eff6 "mm/ksm: add ksm advisor"):
  ``Advisor``, ``advisor_start_scan`` / ``advisor_stop_scan`` /
  ``scan_time_advisor``;
- the zero page (4.11, e86c59b1b12d "mm/ksm: improve deduplication of zero
  pages with colouring"; counted since 6.6, e2942062e01d "ksm: count all
  zero pages placed by KSM"): ``try_to_merge_with_zero_page``, whose
  replace_page maps the shared zero page (layout.ZERO_PFN) in place of an
  all-zero anonymous page.  The page-table side (unmap, COW, unmerge, fork)
  is in ``uksm.kernel.mmu`` and ``uksm.kernel.fork``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import mmh3

from uksm.kernel import killpoints
from uksm.kernel.layout import (
    F_ANON,
    F_KSM,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    K_ADVISOR_MAX_CPU,
    K_ADVISOR_MAX_PAGES_TO_SCAN,
    K_ADVISOR_MODE,
    K_ADVISOR_TARGET_SCAN_TIME,
    K_PAGES_TO_SCAN,
    M_RSS,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    ZERO_PFN,
)
from uksm.kernel.mmu import ksm_map_zero_page, ksm_test_exit

if TYPE_CHECKING:
    from uksm.kernel.ksmd import Ksmd, SlotState

#: the digest (ksmd's checksum) of an all-zero page: mm/ksm.c's zero_checksum
ZERO_KEY = mmh3.mmh3_x64_128_digest(bytes(PAGE_SIZE))
ZERO_BYTES = bytes(PAGE_SIZE)

# ---- smart scan (6.7) ------------------------------------------------------
U8_MAX = 255          # rmap_age_t is u8: the age stops there
SKIP_MIN_AGE = 3      # "if (age < 3) return false": never skip the young


def skip_age(age: int) -> int:
    """skip_age (6.7): how many scans a page of ``age`` unsuccessful
    attempts is skipped for, before it is looked at again."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


def should_skip_rmap_item(ksmd: "Ksmd", st: "SlotState", vpn: int) -> bool:
    """should_skip_rmap_item (6.7) for the rmap_item of page ``vpn``, whose
    page is not a KSM page (the caller's folio_test_ksm test): age it, and
    skip it (out of its tree, pages_skipped++) while it has skips left.
    The age is never reset while the rmap_item lives (6.18 has no reset:
    a page that merged and was unshared keeps its age); a new rmap_item
    starts at 0 (kmem_cache_zalloc), as ksmd's remove_rmap_items zeroes it."""
    age = st.age[vpn]
    if age != U8_MAX:
        st.age[vpn] = age + 1
    if age < SKIP_MIN_AGE:
        return False
    if not st.skips[vpn]:
        st.skips[vpn] = skip_age(age)
        return False
    ksmd.pages_skipped += 1
    st.skips[vpn] -= 1
    ksmd.remove_rmap_item_from_tree(st, vpn)
    return True


def lonely_page_looks(scans: int) -> int:
    """The closed form of the rule for one rmap_item met at every full
    scan from its first: how many of ``scans`` scans look at it (the
    others skip it) -- scans 1-4, 6, 9, 14, then every 9th (skip_age's
    1, 2, 4, then 8 skipped scans after each look).  LTP ksm07's case."""
    return len([k for k in (1, 2, 3, 4, 6, 9, 14) if k <= scans]) + max(0, scans - 14) // 9


# ---- the scan-time advisor (6.8) -------------------------------------------
KSM_ADVISOR_MIN_CPU = 10
EWMA_WEIGHT = 30
ADVISOR_SCAN_TIME = 1   # KSM_ADVISOR_SCAN_TIME (ADVISOR_MODES' index)


class Advisor:
    """struct advisor_ctx and the scan-time advisor of 6.8 (4e5fa4f5eff6
    "mm/ksm: add ksm advisor"): at the end of each full scan, a new
    pages_to_scan from the scan's time and ksmd's CPU use, so that a full
    scan takes advisor_target_scan_time seconds within advisor_max_cpu
    percent.

    What differs from the kernel: ksmd here is a Python process, so its
    CPU time (``time.process_time_ns``, the kernel's
    task_sched_runtime(current)) is the interpreter's, many times a
    kernel thread's per page, and the wall clock it is set against
    includes the sleeps of a 2-core machine shared with the workers; the
    formulas, the integer arithmetic and the caps are the kernel's.  The
    context is zeroed when advisor_mode changes (set_advisor_defaults'
    "advisor_ctx = (const struct advisor_ctx){ 0 }"; the store's own
    pages_to_scan reset is the sysfs side's)."""

    def __init__(self) -> None:
        self.mode = 0
        self.start_scan = 0   # ns, monotonic
        self.scan_time = 0    # s, the previous scan's
        self.change = 0       # percent
        self.cpu_time = 0     # ns of ksmd's CPU at the previous scan's end

    def follow_mode(self, q: Any) -> None:
        """A write of advisor_mode since the last look: a fresh context."""
        mode = q[K_ADVISOR_MODE]
        if mode != self.mode:
            self.mode = mode
            self.start_scan = self.scan_time = self.change = self.cpu_time = 0

    def advisor_start_scan(self, q: Any) -> None:
        """advisor_start_scan: a full scan begins (ksm_scan at ksm_mm_head)."""
        self.follow_mode(q)
        if self.mode == ADVISOR_SCAN_TIME:
            self.start_scan = time.monotonic_ns()

    def advisor_stop_scan(self, q: Any) -> None:
        """advisor_stop_scan: a full scan ended (before ksm_scan.seqnr++)."""
        self.follow_mode(q)
        if self.mode == ADVISOR_SCAN_TIME and self.start_scan:
            self.scan_time_advisor(q, time.monotonic_ns(), time.process_time_ns())

    def scan_time_advisor(self, q: Any, now_ns: int, cpu_time: int) -> None:
        """scan_time_advisor, word for word (unsigned long arithmetic:
        every division truncates), at ``now_ns`` (ktime_get()) with ksmd's
        CPU time ``cpu_time`` (task_sched_runtime(current)), both in ns."""
        scan_time = (now_ns - self.start_scan) // 1_000_000 // 1000   # ms, then "div_s64(..., MSEC_PER_SEC)"
        scan_time = scan_time or 1
        cpu_time_diff_ms = (cpu_time - self.cpu_time) // 1000 // 1000
        cpu_percent = (cpu_time_diff_ms * 100) // (scan_time * 1000)
        cpu_percent = cpu_percent or 1
        last_scan_time = self.scan_time or scan_time   # prev_scan_time
        factor = q[K_ADVISOR_TARGET_SCAN_TIME] * 100 // scan_time
        factor = factor or 1
        change = scan_time * 100 // last_scan_time
        change = change or 1
        change = ((100 - EWMA_WEIGHT) * self.change + EWMA_WEIGHT * change) // 100   # ewma
        pages_to_scan = q[K_PAGES_TO_SCAN]
        pages = pages_to_scan * 100 // factor
        pages = pages * change // 100
        per_page_cost = pages_to_scan // cpu_percent
        per_page_cost = per_page_cost or 1
        pages = min(pages, per_page_cost * q[K_ADVISOR_MAX_CPU])
        pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
        pages = min(pages, q[K_ADVISOR_MAX_PAGES_TO_SCAN])
        self.change = change
        self.scan_time = scan_time
        self.cpu_time = cpu_time
        q[K_PAGES_TO_SCAN] = pages   # trace_ksm_advisor(scan_time, pages, cpu_percent)


# ---- the zero page (4.11; counted since 6.6) --------------------------------
def try_to_merge_with_zero_page(ksmd: "Ksmd", st: "SlotState", vpn: int, pfn: int) -> bool:
    """try_to_merge_with_zero_page for an rmap_item whose checksum is the
    zero page's and did not change since the last pass (the caller's
    tests: ksm_use_zero_pages, oldchecksum == zero_checksum): find the area
    (find_mergeable_vma), then try_to_merge_one_page(vma, page,
    ZERO_PAGE): write_protect_page, pages_identical, replace_page.  True
    when done with the page -- merged, or its area is gone ("If the vma is
    out of date, we do not need to continue") --, False when the merge
    failed and cmp_and_merge_page goes on with the trees.  Caller holds
    the mm's mmap_sem for read."""
    cl, task, fq = ksmd.cl, ksmd.cl.task, ksmd.fq
    mm = st.mm
    if ksm_test_exit(cl, mm) or not ksmd.vma_mergeable(mm, vpn):
        return True
    pq, slot, b = mm.pq, PT_OFF + vpn, pfn * FRAME_SIZE
    task.lock(mm.ptl)
    try:
        pte = pq[slot]
        if pte >> 2 != pfn or not pte & PTE_PRESENT or fq[b + FR_COUNT] != 1 \
                or fq[b + FR_FLAGS] & (F_KSM | F_ANON) != F_ANON:
            return False
        if pte & PTE_WRITE:  # write_protect_page
            pte &= ~PTE_WRITE
            pq[slot] = pte
        p = pfn * PAGE_SIZE
        if ksmd.poolmap[p:p + PAGE_SIZE] != ZERO_BYTES:  # pages_identical(page, ZERO_PAGE)
            return False
        if ksm_test_exit(cl, mm):
            # uksm's own re-check, under the pte lock (mm_users goes to 0
            # under it, DESIGN.md): an exiting mm is done with, as "vma out
            # of date" is -- never sent on into the trees
            return True
        return replace_with_zero_page(ksmd, mm, vpn, pfn)
    finally:
        task.unlock(mm.ptl)


def replace_with_zero_page(ksmd: "Ksmd", mm: Any, vpn: int, pfn: int) -> bool:
    """replace_page with kpage = ZERO_PAGE (the is_zero_pfn branch):
    "newpte = pte_mkdirty(pte_mkspecial(pfn_pte(...)))", ksm_map_zero_page,
    dec_mm_counter(mm, MM_ANONPAGES), then the old page put.  Caller holds
    the pte lock; zone_lock is taken here for the counts.

    Crash consistency: the PTE store is the commit point.  The counts
    follow under the same pte lock and zone_lock, so every other task
    (a zap, a COW, fork's copy, fsck's stopped world) sees the zero PTE
    with its count or neither; the kill point ``ksmd_zero_before_count``
    (between the two) kills the mm's owner there, whose exit waits for the
    pte lock and then unmaps the page as counted.  Only ksmd's own death
    between the store and the count leaves them apart: the recovery's
    rebuild (``fsck.rebuild``) recounts ksm_zero_pages from the PTEs."""
    cl, task, fq, q = ksmd.cl, ksmd.cl.task, ksmd.fq, ksmd.q
    task.lock(cl.zone)
    try:
        fq[ZERO_PFN * FRAME_SIZE + FR_COUNT] += 1
        mm.pq[PT_OFF + vpn] = (ZERO_PFN << 2) | PTE_PRESENT   # set_pte_at(newpte)
        killpoints.hit_ksmd(cl, "ksmd_zero_before_count", mm.base, ksmd.log)
        ksm_map_zero_page(q, mm.base)
        q[mm.base + M_RSS] -= 1          # dec_mm_counter(mm, MM_ANONPAGES)
        ksmd.alloc.put_frame(pfn)        # folio_put: the anonymous page goes
        ksmd.t_last_merge = time.monotonic_ns()
    finally:
        task.unlock(cl.zone)
    return True
