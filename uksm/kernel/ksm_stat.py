"""/proc/PID/ksm_stat: what ``t.stat()`` and ``uksm task stat`` read.

Under 2.6.32 (which had no such file: uksm's own view of the two per-mm
counters) ``ksm_rmap_items`` and ``ksm_merging_pages``.  Under 6.18 the
file's six fields, in its order, as fs/proc/base.c's proc_pid_ksm_stat
prints them (6.1, cb4df4cae4f2 "ksm: count allocated ksm rmap_items for
each process" made the file with ksm_rmap_items; ksm_merging_pages was a
file of its own since 5.19, 7609385337a4; 6.4 d21077fbc2fc "mm: add new
KSM process and sysfs knobs" added ksm_process_profit, 6.6 e2942062e01d
ksm_zero_pages, "ksm: add ksm involvement information for each process"
the yes/no two).  ``rss`` follows, uksm's own (get_mm_rss), under both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uksm.kernel.layout import (
    KSM_RMAP_ITEM_SIZE,
    M_FLAGS,
    M_MERGING,
    M_RMAP_ITEMS,
    M_RSS,
    M_ZERO_PAGES,
    MMF_VM_MERGE_ANY,
    PAGE_SIZE,
    VM_MERGEABLE,
)

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.mm import MM

#: the fields of 6.18's /proc/PID/ksm_stat, in its order
KSM_STAT_618 = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit",
                "ksm_merge_any", "ksm_mergeable")
#: the two printed "name: yes|no" (seq_printf(m, "ksm_merge_any: %s\n", ...))
YES_NO = ("ksm_merge_any", "ksm_mergeable")


def ksm_process_profit(merging: int, zero_pages: int, rmap_items: int) -> int:
    """mm/ksm.c ksm_process_profit (6.4, d21077fbc2fc; zero pages 6.6):
    "(long)(mm->ksm_merging_pages + mm_ksm_zero_pages(mm)) * PAGE_SIZE -
    mm->ksm_rmap_items * sizeof(struct ksm_rmap_item)"."""
    return (merging + zero_pages) * PAGE_SIZE - rmap_items * KSM_RMAP_ITEM_SIZE


def process_mergeable(mm: "MM | None") -> bool:
    """ksm_process_mergeable: any VMA VM_MERGEABLE.  The kernel holds
    mmap_lock for read; this reads the VMA table without it (a torn read
    of a VMA being split is possible, as between two reads of the file),
    and an address space already torn down has none."""
    from uksm.kernel.mm import VmaTableFreed
    if mm is None or not mm.alive():
        return False
    try:
        return any(f & VM_MERGEABLE for (_i, _s, _e, f) in mm.vmas())
    except VmaTableFreed:
        return False


def ksm_stat(cl: "Cluster", row: int, mm: "MM | None") -> dict[str, Any]:
    """proc_pid_ksm_stat for the address space at mm table ``row`` (``mm``:
    its MM, for ksm_mergeable's walk): 6.18's fields under 6.18 (numbers
    as ints, the yes/no two as the strings the file prints), 2.6.32's two
    counters under 2.6.32; then ``rss``."""
    q, b = cl.q, cl.mbase(row)
    items, merging = q[b + M_RMAP_ITEMS], q[b + M_MERGING]
    if not cl.modern:
        return {"ksm_rmap_items": items, "ksm_merging_pages": merging, "rss": q[b + M_RSS]}
    zero = q[b + M_ZERO_PAGES]
    return {"ksm_rmap_items": items, "ksm_zero_pages": zero, "ksm_merging_pages": merging,
            "ksm_process_profit": ksm_process_profit(merging, zero, items),
            "ksm_merge_any": "yes" if q[b + M_FLAGS] & MMF_VM_MERGE_ANY else "no",
            "ksm_mergeable": "yes" if process_mergeable(mm) else "no",
            "rss": q[b + M_RSS]}


def ksm_stat_text(stat: dict[str, Any]) -> str:
    """The lines of the file (and ``rss N``): "name value", "name: yes"."""
    return "".join(f"{k}{':' if k in YES_NO else ''} {v}\n" for k, v in stat.items())


__all__ = ["KSM_STAT_618", "YES_NO", "ksm_process_profit", "ksm_stat", "ksm_stat_text", "process_mergeable"]
