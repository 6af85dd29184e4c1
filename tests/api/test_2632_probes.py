"""2.6.32 as a script sees it (issue 27): each test is the Machine API probe
of one difference found by reading uksm beside 2.6.32.67 (mm/ksm.c,
mm/oom_kill.c, mm/madvise.c, mm/mmap.c, lib/vsprintf.c), pinned to what
the kernel does; the kernel line is cited in each.

Batches are stepped from the script with a long ``sleep_millisecs``: ksmd
runs one batch when run=1 is written, then sleeps (schedule_timeout: a
write of run does not wake it).  A test that leaves a task at the cursor
ends with run=2, which frees what a slow exit left (no ksmd needed)."""
from __future__ import annotations

import os

import pytest

import uksm

_n = [0]
ASLEEP = 600_000   # sleep_millisecs: ksmd runs one batch, then waits out the test


def machine(**kw):
    _n[0] += 1
    kw.setdefault("frames", 128)
    return uksm.Machine(name=f"t27x{os.getpid()}x{_n[0]}", **kw)


# ---- 1. the batch ends on the budget; the cursor stays on a finished mm -----------

@pytest.mark.timeout(90)
def test_batch_ends_after_its_last_page_and_the_cursor_stays():
    """scan_get_next_rmap_item returns right after the page; ksm_do_scan's
    "while (scan_npages--)" ends the batch: the cursor stays on the first
    task, although it has no page left.  The second task has no rmap_items
    and is not at the cursor: __ksm_exit's fast path ("if (mm_slot &&
    ksm_scan.mm_slot != mm_slot) { if (list_empty(&mm_slot->rmap_list))")."""
    with machine(run=0, pages_to_scan=2, sleep_millisecs=ASLEEP) as m:
        a, b = m.task(2), m.task(2)
        a.fill(1)
        b.fill(2)
        m.ksm["run"] = 1
        m.wait(lambda: m.ksm["pages_scanned"] >= 2, timeout=30, what="one batch")
        assert m.ksm["pages_scanned"] == 2 and m.ksm["full_scans"] == 0
        assert m.scan_cursor() is a
        assert b.exit() == "fast"
        assert a.stat()["ksm_rmap_items"] == 2
        assert a.exit() == "slow"                 # at the cursor
        m.ksm["run"] = 2                          # frees its slot (ksm_test_exit)
    assert m.report["status"] == 0, m.report["fsck"]


@pytest.mark.timeout(90)
def test_a_pass_that_fills_the_budget_ends_with_an_empty_batch(tmp_path):
    """pages_to_scan == the pages of the pass: the batch that scans the
    last page does not count the full scan; the next one finds no page,
    finishes the mm, seqnr++ and returns: two batches per full scan."""
    import glob
    import json
    # the pages are written before ksmd runs: a pass over a half-written
    # task finds fewer present pages than its budget, and ends the mm (and
    # counts the full scan) inside a batch that scanned pages -- as 2.6.32's
    # would, follow_page skipping the holes (failed once under load)
    with machine(run=0, pages_to_scan=4, sleep_millisecs=2, log_dir=str(tmp_path)) as m:
        t = m.task(4)
        t.fill(3)
        m.ksm["run"] = 1
        m.wait_full_scans(4)
        m.ksm["run"] = 0
    batches = []
    (path,) = glob.glob(str(tmp_path / "ksmd-*.jsonl"))
    with open(path) as f:
        for line in f:
            ev = json.loads(line)
            if ev["event"] == "scan_batch_start":
                batches.append([0, 0])
            elif ev["event"] == "full_scan" and batches:
                batches[-1][1] += 1
            elif ev["event"] == "scan_batch_end" and batches:
                batches[-1][0] = ev["pages"]
    # a batch that scanned pages ends on its budget: never with the full scan
    assert all(full == 0 for pages, full in batches if pages), batches
    assert sum(full for _, full in batches) >= 4


# ---- 2. a failed run=2 leaves what it had not reached ---------------------------------

@pytest.mark.timeout(120)
def test_failed_unmerge_keeps_the_rmap_items_it_had_not_removed():
    """unmerge_and_remove_all_rmap_items stops at its error ("goto
    error"): the mm being unmerged and every later mm keep their
    rmap_items and the counters keep counting them; run=1 then merges
    again only what was broken (2.6.32.67 mm/ksm.c)."""
    with machine(frames=256, max_pages=64, exit_policy="shipped", pages_to_scan=200,
                 sleep_millisecs=5) as m:
        ts = [m.task(32) for _ in range(3)]
        for t in ts:
            t.fill(7)
        assert m.wait_merged() == {"pages_shared": 1, "pages_sharing": 95, "pages_unshared": 0,
                                   "pages_volatile": 0}
        merges = m.stats()["merges"]
        m.ksm["mem_limit"] = m.ksm["frames_used"] + 8     # the first mm's unmerge runs out
        with pytest.raises(uksm.MachineError, match="oom-killed"):
            m.ksm["run"] = 2
        assert m.ksm["run"] == 0
        assert m.ksm.counters() == {"pages_shared": 1, "pages_sharing": 95, "pages_unshared": 0,
                                    "pages_volatile": 0}
        assert [t.stat()["ksm_rmap_items"] for t in ts] == [32, 32, 32]
        m.ksm["mem_limit"] = 0
        m.ksm["run"] = 1
        assert m.wait_merged()["pages_sharing"] == 95
        again = m.stats()["merges"] - merges
        assert 0 < again <= 8, again               # the pages the writer broke, no more
    assert m.report["status"] == 0, m.report["fsck"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ksmd", ["waiting", "asleep"])
def test_failed_unmerge_frees_the_rmap_items_of_the_mms_it_finished(ksmd):
    """The mms finished before the error lost their rmap_items
    (remove_trailing_rmap_items): they exit by the fast path, and the
    counters count only the others' -- when the write returns, as the
    kernel's writer counted them out before it let ksm_thread_mutex go,
    whether ksmd was waiting for that mutex or asleep for the ten
    minutes of its sleep_millisecs."""
    with machine(frames=256, max_pages=64, exit_policy="shipped", pages_to_scan=200,
                 sleep_millisecs=5) as m:
        small = m.task(4)
        big = m.task(40)
        small.fill(5)
        big.fill(5)
        m.wait_merged()
        if ksmd == "asleep":
            m.ksm["run"] = 0
            m.ksm["sleep_millisecs"] = ASLEEP
            n = m.ksm["full_scans"]
            m.ksm["run"] = 1                              # one pass, then ksmd sleeps
            m.wait(lambda: m.ksm["full_scans"] > n, timeout=30, what="one full scan")
        m.ksm["mem_limit"] = m.ksm["frames_used"] + 12   # small fits, big does not
        with pytest.raises(uksm.MachineError, match="oom-killed"):
            m.ksm["run"] = 2
        assert small.stat()["ksm_rmap_items"] == 0 and big.stat()["ksm_rmap_items"] == 40
        c = m.ksm.counters()
        assert c["pages_shared"] == 1 and c["pages_sharing"] == 39, c
        assert small.exit() == "fast"
        m.ksm["mem_limit"] = 0
        if ksmd == "asleep":
            m.ksm["run"] = 2          # a whole walk: nothing left for the sleeper
        else:
            m.ksm["run"] = 1
            m.wait_merged()
    assert m.report["status"] == 0, m.report["fsck"]


# ---- 3. oldchecksum is lost in the stable tree -------------------------------------------

@pytest.mark.timeout(90)
def test_page_that_left_the_stable_tree_waits_a_pass():
    """rmap_item's "union { oldchecksum; next; }": entering the stable tree
    overwrites the checksum, leaving it sets next = NULL.  Two merged pages
    rewritten with the same content (COW: the KSM page goes) are not merged
    again by the next full scan, only by the one after."""
    with machine(run=1, pages_to_scan=100, sleep_millisecs=2) as m:
        a, b = m.task(1), m.task(1)
        a.fill(9)
        b.fill(9)
        assert m.wait_merged()["pages_sharing"] == 1
        m.ksm["run"] = 0                         # every batch of 2 pages ends at the head
        m.ksm["sleep_millisecs"] = ASLEEP
        a.fill(9)
        b.fill(9)                                # both COW-broken: the KSM page is freed
        n = m.ksm["full_scans"]
        m.ksm["run"] = 1
        m.wait(lambda: m.ksm["full_scans"] == n + 1, timeout=30, what="one full scan")
        c = m.ksm.counters()
        assert c["pages_shared"] == 0 and c["pages_sharing"] == 0, c
        m.ksm["run"] = 2


# ---- 5. stale rmap_items are freed as the scan passes them -------------------------

@pytest.mark.timeout(90)
def test_stale_rmap_items_freed_as_the_scan_passes():
    """get_next_rmap_item frees the rmap_items below the address it is
    asked for ("if (rmap_item->address > addr) break; ... free_rmap_item"),
    not at the end of the mm: after DONTNEED of the first 2 of 4 pages, a
    one-page batch leaves 2 rmap_items, 2 unshared."""
    with machine(run=1, pages_to_scan=5, sleep_millisecs=2) as m:
        t = m.task(4)
        for i in range(4):
            t.fill(i + 1, first=i, count=1)
        m.wait(lambda: m.ksm["pages_unshared"] == 4, timeout=30, what="4 pages unshared")
        m.ksm["run"] = 0                         # a batch of 5 is a whole pass: at the head
        m.ksm["sleep_millisecs"] = ASLEEP
        m.ksm["pages_to_scan"] = 1
        t.madvise(0, 2, "DONTNEED")
        n = m.ksm["pages_scanned"]
        m.ksm["run"] = 1
        m.wait(lambda: m.ksm["pages_scanned"] == n + 1, timeout=30, what="a one-page batch")
        assert t.stat()["ksm_rmap_items"] == 2
        assert m.ksm["pages_unshared"] == 2
        m.ksm["run"] = 2
    assert m.report["status"] == 0, m.report["fsck"]


# ---- 7. knobs parse as strict_strtoul --------------------------------------------------

@pytest.mark.timeout(60)
def test_knobs_parse_as_strict_strtoul():
    """pages_to_scan_store, sleep_millisecs_store, run_store:
    "err = strict_strtoul(buf, 10, &val); if (err || val > UINT_MAX)
    return -EINVAL;" -- decimal digits and at most one trailing newline
    (lib/vsprintf.c), 0 allowed, UINT_MAX the 32-bit one; simple_strtoul
    does not check overflow (the value wraps at 2^64)."""
    with machine(run=0) as m:
        for value, expect in ((0, 0), ("0", 0), (2**32 - 1, 2**32 - 1), ("12\n", 12),
                              ("007", 7), (2**64 + 5, 5)):
            m.ksm["pages_to_scan"] = value
            assert m.ksm["pages_to_scan"] == expect, value
        for bad in (2**32, " 5", "5 ", "5\n\n", "+5", "-1", -1, "", "\n", "0x10", "5\t"):
            with pytest.raises(ValueError, match="EINVAL"):
                m.ksm["pages_to_scan"] = bad
            with pytest.raises(ValueError, match="EINVAL"):
                m.ksm["sleep_millisecs"] = bad
        assert m.ksm["pages_to_scan"] == 5
        m.ksm["sleep_millisecs"] = 2**32 - 1
        m.ksm["run"] = "01"
        assert m.ksm["run"] == 1
        m.ksm["run"] = "00\n"
        for bad in ("3", " 1", "1 ", 2**32 + 1):
            with pytest.raises(ValueError, match="EINVAL"):
                m.ksm["run"] = bad
        assert m.ksm["run"] == 0


# ---- 4. the OOM killer's badness starts from total_vm ----------------------------------

@pytest.mark.timeout(120)
def test_oom_badness_starts_from_total_vm():
    """badness(): "points = mm->total_vm;" (2.6.32.67 mm/oom_kill.c),
    then CPU time, run time, nice and capabilities, equal here.  A 64-page
    task whose pages are all one KSM page is killed before a 32-page task
    of private pages, though killing it gives back one frame."""
    with machine(frames=96, max_pages=64, pages_to_scan=200, sleep_millisecs=2) as m:
        big = m.task(64)
        big.fill(7)
        m.wait_merged()
        mid = m.task(32)
        mid.fill(bytes(range(256)) * 16)
        for i in range(32):
            mid.write(i * 4096, i.to_bytes(4, "little"))      # 32 private pages
        small = m.task(16)
        m.ksm["mem_limit"] = m.ksm["frames_used"] + 8
        m.ksm["run"] = 0
        try:
            for i in range(16):
                small.write(i * 4096, (1000 + i).to_bytes(4, "little"))
        except uksm.TaskExited:
            # 2.6.32's select_bad_process passes over a victim that has
            # released its mm ("if (!p->mm) continue;") before its memory is
            # back: under load mid and then the allocating task may follow
            pass
        with pytest.raises(uksm.TaskExited):
            big.stat()          # the first victim: a ranking by RSS would never kill it
        assert m.stats()["oom_killed"] >= 1


# ---- 8. a VMA table for every page, and -EAGAIN, not a dead task -------------------

@pytest.mark.timeout(120)
def test_every_page_its_own_area():
    """2.6.32 allows max_map_count (65530) areas; uksm's table holds one
    per page (the most a task can make).  A 200-page task with every
    other page made UNMERGEABLE has 200 areas, and lives."""
    with machine(run=0, max_pages=200, frames=512) as m:
        t = m.task(200)
        t.fill(4)
        for i in range(0, 200, 2):
            assert t.madvise(i, 1, "UNMERGEABLE") == 0
        assert t.verify() == 200
        t.write(199 * 4096, b"still here")
        assert t.exit() in ("fast", "slow")
    assert m.report["status"] == 0, m.report["fsck"]
