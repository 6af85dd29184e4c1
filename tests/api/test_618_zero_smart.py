"""6.18's zero pages and smart scan on a machine (issue 23), with the
numbers the public programs assert:

- ksm_tests.c ``-Z -p 10 -z 0|1`` (check_ksm_zero_page_merge): ten zero
  pages merge into one KSM page (1 shared, 9 sharing: the max_page_sharing
  formula for n=10, m=256), or, with use_zero_pages, into the zero page
  (0 and 0, 4.11 e86c59b1b12d), counted in ksm_zero_pages (6.6);
- ksm_functional_tests.c test_unmerge_zero_pages: 2 MiB of zero pages give
  ksm_zero_pages 512; MADV_UNMERGEABLE on the first half leaves 256; a
  write to each page of the second half leaves 0; no two pages then
  share a frame;
- LTP ksm07: with smart_scan on, one lonely page is skipped in at least
  half of the full scans (here: exactly as should_skip_rmap_item says).

tools/twin618.py runs the same cases on this machine's KSM."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import uksm
from uksm.kernel.ksm618 import lonely_page_looks
from uksm.kernel.layout import ZERO_PFN

pytestmark = pytest.mark.timeout(120)


def zero_pages_of(t: uksm.Task) -> int:
    """/proc/PID/ksm_stat's ksm_zero_pages (6.6, 6080d19f0704)."""
    return int(t.stat()["ksm_zero_pages"])


def shared_sharing(n: int, m: int = 256) -> tuple[int, int]:
    """ksm_tests.c's assert_ksm_pages_count for n merged pages and
    max_page_sharing m."""
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_ksm_tests_Z(use_zero_pages):
    """ksm_tests -Z -p 10 -z N: run=2, sleep 0, ten zero pages
    MADV_MERGEABLE, run=1, full_scans + 2, then the global counters."""
    with uksm.Machine(name=f"z6Z{use_zero_pages}x{os.getpid()}", kernel="6.18", frames=256,
                      max_pages=16, sleep_millisecs=0, pages_to_scan=100, run=2) as m:
        m.ksm["use_zero_pages"] = use_zero_pages
        t = m.task(pages=10, mergeable=False)
        t.fill(0)                                  # memset(map_ptr, 0, ...)
        t.madvise(0, 10, "MERGEABLE")
        m.ksm["run"] = 1
        c = m.wait_full_scans(2)
        want = shared_sharing(0 if use_zero_pages else 10)
        assert (c["pages_shared"], c["pages_sharing"]) == want == ((0, 0) if use_zero_pages else (1, 9))
        assert m.ksm["ksm_zero_pages"] == zero_pages_of(t) == (10 if use_zero_pages else 0)
        pm = t.pagemap()
        if use_zero_pages:   # every page maps the zero page, read-only, no KSM page
            assert {(p["frame"], p["ksm"], p["write_protected"]) for p in pm} == {(ZERO_PFN, False, True)}
            assert t.read(0, 10 * 4096) == bytes(10 * 4096)
        assert m.fsck() == {"ok": True, "errors": []}
        t.exit()
        assert m.ksm["ksm_zero_pages"] == 0   # zap_pte_range's ksm_might_unmap_zero_page


@contextmanager
def zero_pages_merged(tag: str, pages: int, frames: int, pages_to_scan: int) -> Iterator[tuple]:
    """A 6.18 machine with use_zero_pages 1 and a task of ``pages`` zero
    pages, after two full scans (checksum, then the zero page)."""
    with uksm.Machine(name=f"z6{tag}{os.getpid()}", kernel="6.18", frames=frames, max_pages=pages,
                      sleep_millisecs=0, pages_to_scan=pages_to_scan) as m:
        m.ksm["use_zero_pages"] = 1
        t = m.task(pages=pages)
        t.fill(0)
        m.wait_full_scans(2)
        yield m, t


def test_unmerge_zero_pages():
    """ksm_functional_tests.c test_unmerge_zero_pages, on 2 MiB."""
    with zero_pages_merged("u", 512, 1100, 2000) as (m, t):
        assert zero_pages_of(t) == 512, "'ksm_zero_pages' updated after merging"
        t.madvise(0, 256, "UNMERGEABLE")
        assert zero_pages_of(t) == 256, "'ksm_zero_pages' updated after unmerging"
        for i in range(256, 512):                  # *((unsigned int *)&map[offs]) = offs
            t.write(i * 4096, (i * 4096).to_bytes(4, "little"))
        assert zero_pages_of(t) == 0, "'ksm_zero_pages' updated after write fault"
        frames = [p["frame"] for p in t.pagemap() if p["present"]]
        assert len(frames) == len(set(frames)) == 512, "KSM zero pages were unmerged"
        assert t.read(0, 256 * 4096) == bytes(256 * 4096)   # the unmerged half: zeros again
        assert m.ksm["ksm_zero_pages"] == 0
        assert m.fsck() == {"ok": True, "errors": []}


def test_zero_pages_fork_run2_and_exit_keep_the_count():
    """A fork copies the zero PTEs and adds them to the global count (this
    machine's 6.18: 10, fork, 20); run=2 unshares them all; exit takes
    what is left; fsck agrees at each step."""
    with zero_pages_merged("f", 10, 256, 100) as (m, t):
        assert m.ksm["ksm_zero_pages"] == 10
        c = t.fork()
        assert (m.ksm["ksm_zero_pages"], zero_pages_of(c), zero_pages_of(t)) == (20, 10, 10)
        assert m.fsck() == {"ok": True, "errors": []}
        c.exit()
        assert m.ksm["ksm_zero_pages"] == 10
        m.ksm["run"] = 2
        assert (m.ksm["ksm_zero_pages"], zero_pages_of(t)) == (0, 0)
        assert t.read(0, 10 * 4096) == bytes(10 * 4096)
        assert m.fsck() == {"ok": True, "errors": []}


def test_without_use_zero_pages_nothing_maps_the_zero_page():
    """use_zero_pages 0 (the default): zero pages merge as any other page;
    the zero frame stays reserved and unmapped."""
    with uksm.Machine(name=f"z6n{os.getpid()}", kernel="6.18", frames=256, max_pages=16,
                      sleep_millisecs=0, pages_to_scan=100) as m:
        t = m.task(pages=10)
        t.fill(0)
        m.wait_full_scans(2)
        assert ZERO_PFN not in {p["frame"] for p in t.pagemap()}
        assert m.ksm["ksm_zero_pages"] == 0
        assert m.ksm["frames_used"] == 2   # the KSM page and the reserved zero page


def test_2632_has_no_zero_page():
    """Under 2.6.32 frame 0 is an ordinary frame: nothing is reserved."""
    with uksm.Machine(name=f"z6o{os.getpid()}", frames=64, max_pages=16) as m:
        assert m.ksm["frames_used"] == 0
        with pytest.raises(KeyError):
            m.ksm["ksm_zero_pages"]


def test_ltp_ksm07_smart_scan_skips_a_lonely_page():
    """LTP ksm07: one page of 'a', pages_to_scan 100, sleep 0, smart_scan
    on; then run=0 and the counters.  One batch is one full scan here
    (one page), so the page met exactly full_scans scans: pages_skipped and
    pages_scanned split them as the rule says, and ksm07's "at least 50%"
    holds."""
    with uksm.Machine(name=f"z6s{os.getpid()}", kernel="6.18", frames=64, max_pages=16,
                      sleep_millisecs=0, pages_to_scan=100, run=0) as m:
        assert m.ksm["smart_scan"] == 1          # 6.7: on by default
        t = m.task(pages=1)
        t.fill(ord("a"))
        m.ksm["run"] = 1
        m.wait_full_scans(30)
        m.ksm["run"] = 0
        scans, skipped, scanned = m.ksm["full_scans"], m.ksm["pages_skipped"], m.ksm["pages_scanned"]
        assert scans >= 30
        assert scanned == lonely_page_looks(scans) and skipped == scans - scanned
        assert skipped >= scans * 50 // 100       # ksm07's check
        assert t.stat()["ksm_rmap_items"] == 1    # a skipped page keeps its rmap_item


def test_smart_scan_off_scans_every_page():
    with uksm.Machine(name=f"z6S{os.getpid()}", kernel="6.18", frames=64, max_pages=16,
                      sleep_millisecs=0, pages_to_scan=100, run=0) as m:
        m.ksm["smart_scan"] = 0
        t = m.task(pages=1)
        t.fill(ord("a"))
        m.ksm["run"] = 1
        m.wait_full_scans(20)
        m.ksm["run"] = 0
        assert m.ksm["pages_skipped"] == 0
        assert m.ksm["pages_scanned"] == m.ksm["full_scans"]


def test_scan_time_advisor_sets_pages_to_scan():
    """advisor_mode scan-time: the store starts pages_to_scan at
    advisor_min_pages_to_scan (500); at each full scan's end the advisor
    sets it, at most advisor_max_pages_to_scan -- under 40 here, the
    KSM_ADVISOR_MIN_CPU floor (per-page cost x 10, at least 50 from 500)
    is cut to 40 at the first scan."""
    with uksm.Machine(name=f"z6a{os.getpid()}", kernel="6.18", frames=64, max_pages=16,
                      sleep_millisecs=0, run=0) as m:
        t = m.task(pages=4)
        t.fill(ord("b"))
        m.ksm["advisor_max_pages_to_scan"] = 40
        m.ksm["advisor_mode"] = "scan-time"
        assert m.ksm["pages_to_scan"] == 500
        m.ksm["run"] = 1
        m.wait_full_scans(3)
        m.ksm["run"] = 0
        assert 1 <= m.ksm["pages_to_scan"] <= 40
        m.ksm["advisor_mode"] = "none"            # set_advisor_defaults: 100 again
        assert m.ksm["pages_to_scan"] == 100
