"""Per-mm counters that follow the scan (issue 22, item 1).

/proc/PID/ksm_stat's ksm_rmap_items and ksm_merging_pages change where
the rmap_items are linked and freed: an mm made UNMERGEABLE loses them
all as the scan passes (scan_get_next_rmap_item finds no VM_MERGEABLE
area: remove_trailing_rmap_items, and the slot freed), and a later
MADV_MERGEABLE enters it again.  fsck checks that an mm without a slot
counts none."""
from __future__ import annotations

import os

import pytest

import uksm

pytestmark = pytest.mark.timeout(120)


def test_unmergeable_mm_counts_no_rmap_items_and_merging_brings_them_back():
    with uksm.Machine(name=f"tks{os.getpid()}", frames=1024, pages_to_scan=500,
                      sleep_millisecs=0) as m:
        a, b = m.task(pages=128), m.task(pages=128)
        a.fill(7)
        b.fill(7)
        assert m.wait_full_scans(3)["pages_sharing"] == 255
        assert a.stat() == {"ksm_rmap_items": 128, "ksm_merging_pages": 128, "rss": 128}
        a.madvise(0, 128, "UNMERGEABLE")
        assert m.wait_full_scans(3) == {"pages_shared": 1, "pages_sharing": 127,
                                        "pages_unshared": 0, "pages_volatile": 0}
        assert a.stat() == {"ksm_rmap_items": 0, "ksm_merging_pages": 0, "rss": 128}
        assert b.stat() == {"ksm_rmap_items": 128, "ksm_merging_pages": 128, "rss": 128}
        assert m.fsck() == {"ok": True, "errors": []}
        a.madvise(0, 64, "MERGEABLE")
        assert m.wait_full_scans(3)["pages_sharing"] == 191
        assert a.stat() == {"ksm_rmap_items": 64, "ksm_merging_pages": 64, "rss": 128}
        assert m.fsck() == {"ok": True, "errors": []}
