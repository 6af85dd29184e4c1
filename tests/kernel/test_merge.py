"""What ksmd merges, exactly (issue 3), and the kernel selftests' merge and
unmerge cases (tools/testing/selftests/mm/ksm_tests.c,
ksm_functional_tests.c) mirrored on the emulator.

Part one runs ``uksm run --json`` (until merged) and checks the counters to
the page.  Part two drives ksmd fast in-process and checks the page tables:
who maps which frame, which frames are KSM pages, what the data reads.
"""
from __future__ import annotations

import pytest

from helpers import booted, cname, pump, run_json
from uksm.kernel.layout import M_FLAGS, M_SLOT_USED, MMF_VM_MERGEABLE, VM_MERGEABLE
from uksm.kernel.syscalls import MADV_DONTNEED, MADV_UNMERGEABLE
from util_machine import (
    PAGE,
    Space,
    assert_fsck,
    exit_all_clean,
    frame,
    frames_used,
    is_ksm,
    ksm_stats,
    maps_duplicates,
    set_run,
    wait_counts,
    wait_frames_used,
    wait_full_scans,
)


def merged_run(tmp_path, workload: str, workers: int, pages: int) -> tuple[dict, dict]:
    """uksm run until merged; returns the report's ksm and frames blocks."""
    r, status = run_json("--workload", workload, "--workers", str(workers), "--pages", str(pages),
                         "--pages-to-scan", "5000", "--sleep-ms", "0", "--log-dir", str(tmp_path),
                         "--cluster", cname(f"tmerge{workload.replace(':', '')}{workers}"), timeout=100)
    assert status == 0, r
    assert r["integrity"]["mismatches"] == 0 and r["fsck"]["ok"] and r["ipc_leftovers"] == []
    return r["ksm"], r["frames"]


def assert_frames_add_up(k: dict, fr: dict) -> None:
    """Every frame in use is a KSM page, a page checked and unique, or a
    page still volatile: nothing else holds memory."""
    assert fr["used"] == k["pages_shared"] + k["pages_unshared"] + k["pages_volatile"], (k, fr)


# ---- exact counts, through uksm run --------------------------------------------------

SIZES = [(1, 64), (4, 48), (16, 32)]


@pytest.mark.timeout(110)
@pytest.mark.parametrize("workers,pages", SIZES, ids=[f"{w}x{p}" for w, p in SIZES])
@pytest.mark.parametrize("workload", ["identical", "zero"])
def test_identical_pages_merge_into_one(tmp_path, workload: str, workers: int, pages: int) -> None:
    k, fr = merged_run(tmp_path, workload, workers, pages)
    assert (k["pages_shared"], k["pages_sharing"]) == (1, workers * pages - 1), k
    assert k["pages_unshared"] == 0 and k["pages_volatile"] == 0
    assert_frames_add_up(k, fr)


@pytest.mark.timeout(110)
@pytest.mark.parametrize("workers,pages", SIZES, ids=[f"{w}x{p}" for w, p in SIZES])
def test_unique_pages_never_merge(tmp_path, workers: int, pages: int) -> None:
    k, fr = merged_run(tmp_path, "unique", workers, pages)
    assert (k["pages_shared"], k["pages_sharing"]) == (0, 0), k
    assert k["pages_unshared"] == workers * pages and k["pages_volatile"] == 0
    assert_frames_add_up(k, fr)


@pytest.mark.timeout(110)
@pytest.mark.parametrize("workers,pages,dup", [(1, 64, 5), (4, 48, 7), (16, 32, 3), (16, 32, 32),
                                               (1, 64, 32)])
def test_dup_k_merges_into_k(tmp_path, workers: int, pages: int, dup: int) -> None:
    assert dup <= pages and workers * pages >= 2 * dup
    k, fr = merged_run(tmp_path, f"dup:{dup}", workers, pages)
    assert (k["pages_shared"], k["pages_sharing"]) == (dup, workers * pages - dup), k
    assert k["pages_unshared"] == 0 and k["pages_volatile"] == 0
    assert_frames_add_up(k, fr)


TINY = [("unique", 1, (0, 0, 1)), ("identical", 2, (1, 1, 0)), ("dup:1", 3, (1, 2, 0))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workload,pages,expect", TINY, ids=[f"{w}-{p}" for w, p, _e in TINY])
def test_tiny_address_space(tmp_path, workload: str, pages: int, expect: tuple) -> None:
    """One worker with 1 to 3 pages: a batch of 5000 pages is then a
    couple of thousand full scans, and "until merged" must still wait for
    the counters ksmd publishes, not stop on the ones before it."""
    k, fr = merged_run(tmp_path, workload, 1, pages)
    assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == expect, k
    assert k["pages_scanned"] >= pages, k
    assert_frames_add_up(k, fr)


@pytest.mark.timeout(60)
def test_volatile_pages_never_merge_at_the_default_rate(tmp_path) -> None:
    r, status = run_json("--workload", "volatile", "--workers", "2", "--pages", "64",
                         "--pages-to-scan", "100", "--sleep-ms", "20", "--duration", "4",
                         "--log-dir", str(tmp_path), "--cluster", cname("tmergevol"), timeout=50)
    assert status == 0, r
    assert r["integrity"]["mismatches"] == 0 and r["fsck"]["ok"] and r["ipc_leftovers"] == []
    k = r["ksm"]
    assert k["pages_shared"] == 0 and k["pages_sharing"] == 0, k
    assert k["pages_volatile"] > 0, k
    assert k["full_scans"] >= 2, k  # it did look at them, more than once
    assert r["frames"]["used"] == 128


# ---- the selftests, in-process ---------------------------------------------------------

def booted_fast(tag: str, **kw):
    return booted(cname("tmerge" + tag), run=1, pages_to_scan=5000, sleep_ms=0, frames=kw.pop("frames", 256),
                  va_pages=kw.pop("va_pages", 256), **kw)


def content(n: int) -> bytes:
    return bytes([n % 255 + 1]) * PAGE


@pytest.mark.timeout(60)
def test_merge_within_and_across_address_spaces() -> None:
    """check_ksm_merge: N identical pages -> shared 1, sharing N-1."""
    with booted_fast("m") as sup:
        cl = sup.cl
        s1, s2 = Space(sup, 901), Space(sup, 902)
        a1, a2 = s1.mmap(20), s2.mmap(12)
        s1.fill(a1, [content(0xCF)] * 20)
        s2.fill(a2, [content(0xCF)] * 12)
        assert frames_used(cl) == 32
        s1.mergeable(a1, 20)
        s2.mergeable(a2, 12)
        k = wait_counts(sup, pages_shared=1, pages_sharing=31)
        assert k["pages_unshared"] == 0 and k["pages_volatile"] == 0
        kp = {s1.pfn(a1 + i * PAGE) for i in range(20)} | {s2.pfn(a2 + i * PAGE) for i in range(12)}
        assert len(kp) == 1
        kpfn = kp.pop()
        assert is_ksm(cl, kpfn) and frame(cl, kpfn)[0] == 32
        assert not any(s1.writable(a1 + i * PAGE) for i in range(20))
        wait_frames_used(sup, 1)
        assert s1.read(a1, 20 * PAGE) == content(0xCF) * 20
        assert s2.read(a2, 12 * PAGE) == content(0xCF) * 12
        # two more full scans change nothing (ksm_merge() waits for two)
        k2 = wait_full_scans(sup, 2)
        assert (k2["pages_shared"], k2["pages_sharing"]) == (1, 31)
        assert_fsck(sup, [s1, s2])
        s1.exit()
        wait_counts(sup, pages_shared=1, pages_sharing=11)
        assert_fsck(sup, [s2])
        s2.exit()
        wait_counts(sup, pages_shared=0, pages_sharing=0, rmap_items=0)
        wait_frames_used(sup, 0)
        assert_fsck(sup)


@pytest.mark.timeout(60)
def test_unmerge_after_write() -> None:
    """check_ksm_unmerge: two merged pages, one byte written into each,
    one more scan: both counters back to 0."""
    with booted_fast("w") as sup:
        cl = sup.cl
        s = Space(sup)
        a = s.mmap(2)
        s.fill(a, [content(7)] * 2)
        s.mergeable(a, 2)
        wait_counts(sup, pages_shared=1, pages_sharing=1)
        kpfn = s.pfn(a)
        s.write(a, b"-")
        s.write(a + PAGE, b"+")
        assert s.pfn(a) != kpfn and s.pfn(a + PAGE) != kpfn and s.pfn(a) != s.pfn(a + PAGE)
        assert s.writable(a) and s.writable(a + PAGE)
        assert s.read(a, 1) == b"-" and s.read(a + PAGE, 1) == b"+"
        assert s.read(a + 1, PAGE - 1) == content(7)[1:]
        k = wait_full_scans(sup, 2)
        assert (k["pages_shared"], k["pages_sharing"]) == (0, 0), k
        s.alloc.flush()
        assert frame(cl, kpfn) == (0, 0)  # the KSM page is gone
        wait_frames_used(sup, 2)
        exit_all_clean(sup, s)


@pytest.mark.timeout(60)
def test_unmerge_all_with_run_2() -> None:
    """run=2: every KSM page broken, no two mapped pages share a frame,
    counters 0, data intact, registrations kept: run=1 merges again."""
    with booted_fast("r") as sup:
        cl = sup.cl
        s1, s2 = Space(sup, 901), Space(sup, 902)
        a1, a2 = s1.mmap(24), s2.mmap(24)
        pages1 = [content(i % 3) for i in range(24)]
        pages2 = [content(i % 4) for i in range(20)] + [content(100 + i) for i in range(4)]
        s1.fill(a1, pages1)
        s2.fill(a2, pages2)
        s1.mergeable(a1, 24)
        s2.mergeable(a2, 24)
        # contents 0..3 shared by 44 pages; 4 unique pages
        wait_counts(sup, pages_shared=4, pages_sharing=40, pages_unshared=4)
        wait_frames_used(sup, 8)
        assert maps_duplicates([(s1, a1, 24), (s2, a2, 24)])
        set_run(sup, 2)
        assert maps_duplicates([(s1, a1, 24), (s2, a2, 24)]) == []
        for s, a in ((s1, a1), (s2, a2)):
            for i in range(24):
                pfn = s.pfn(a + i * PAGE)
                assert pfn is not None and not is_ksm(cl, pfn) and frame(cl, pfn)[0] == 1
        k = ksm_stats(cl)
        assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"],
                k["pages_volatile"], k["rmap_items"]) == (0, 0, 0, 0, 0), k
        assert frames_used(cl) == 48  # run=2 gave back its frees before it was done
        assert [s1.read(a1 + i * PAGE, PAGE) for i in range(24)] == pages1
        assert [s2.read(a2 + i * PAGE, PAGE) for i in range(24)] == pages2
        # still registered: the slots and VM_MERGEABLE stay
        for s in (s1, s2):
            assert s.field(M_SLOT_USED) == 1 and s.field(M_FLAGS) & MMF_VM_MERGEABLE
            assert all(f & VM_MERGEABLE for (_i, _s, _e, f) in s.mm.vmas())
        assert_fsck(sup, [s1, s2])
        set_run(sup, 1)
        wait_counts(sup, pages_shared=4, pages_sharing=40, pages_unshared=4)
        exit_all_clean(sup, s1, s2)


@pytest.mark.timeout(60)
def test_unmerge_discarded() -> None:
    """test_unmerge_discarded: merge, MADV_DONTNEED the first half (pte_none
    entries), MADV_UNMERGEABLE the whole range: no duplicates left."""
    with booted_fast("d") as sup:
        cl = sup.cl
        s = Space(sup)
        n = 32
        a = s.mmap(n)
        s.fill(a, [content(0xCF)] * n)
        s.mergeable(a, n)
        wait_counts(sup, pages_shared=1, pages_sharing=n - 1)
        kpfn = s.pfn(a)
        s.madvise(a, n // 2, MADV_DONTNEED)
        assert all(s.pfn(a + i * PAGE) is None for i in range(n // 2))
        assert frame(cl, kpfn)[0] == n // 2 and is_ksm(cl, kpfn)
        wait_frames_used(sup, 1)
        # ksmd's next pass drops the discarded pages' rmap_items
        wait_counts(sup, pages_shared=1, pages_sharing=n // 2 - 1, rmap_items=n // 2)
        broken = s.madvise(a, n, MADV_UNMERGEABLE)
        assert broken == n // 2
        assert maps_duplicates([(s, a, n)]) == []
        assert all(s.pfn(a + i * PAGE) is None for i in range(n // 2))
        for i in range(n // 2, n):
            pfn = s.pfn(a + i * PAGE)
            assert pfn is not None and not is_ksm(cl, pfn) and s.writable(a + i * PAGE)
        assert s.read(a, n // 2 * PAGE) == bytes(n // 2 * PAGE)
        assert s.read(a + n // 2 * PAGE, n // 2 * PAGE) == content(0xCF) * (n // 2)
        assert not any(f & VM_MERGEABLE for (_i, _s, _e, f) in s.mm.vmas())
        s.alloc.flush()
        wait_frames_used(sup, n // 2)
        # ksmd finds no mergeable area left: it drops the items and the slot
        wait_counts(sup, pages_shared=0, pages_sharing=0, rmap_items=0)
        exit_all_clean(sup, s)


@pytest.mark.timeout(60)
def test_merge_and_unmerge_by_madvise() -> None:
    """test_unmerge: MADV_UNMERGEABLE breaks every KSM page of the range
    (and only of the range: a part of a VMA splits it)."""
    with booted_fast("u") as sup:
        cl = sup.cl
        s = Space(sup)
        n = 24
        a = s.mmap(n)
        pages = [content(i % 2) for i in range(n)]
        s.fill(a, pages)
        s.mergeable(a, n)
        wait_counts(sup, pages_shared=2, pages_sharing=n - 2)
        wait_frames_used(sup, 2)
        # unmerge the middle third: the VMA splits in three
        lo, hi = 8, 16
        broken = s.madvise(a + lo * PAGE, hi - lo, MADV_UNMERGEABLE)
        assert broken == hi - lo
        vmas = [(st, e, bool(f & VM_MERGEABLE)) for (_i, st, e, f) in s.mm.vmas()]
        v0 = a >> 12
        assert vmas == [(v0, v0 + lo, True), (v0 + lo, v0 + hi, False), (v0 + hi, v0 + n, True)]
        for i in range(n):
            pfn = s.pfn(a + i * PAGE)
            assert is_ksm(cl, pfn) == (not lo <= i < hi), i
        assert maps_duplicates([(s, a + lo * PAGE, hi - lo)]) == []
        assert [s.read(a + i * PAGE, PAGE) for i in range(n)] == pages
        assert_fsck(sup, [s])
        # ksmd forgets the unmergeable part; the rest stays merged
        k = wait_counts(sup, pages_shared=2, pages_sharing=n - (hi - lo) - 2)
        assert k["rmap_items"] == n - (hi - lo)
        # all of it: nothing KSM is left, every page its own frame
        broken = s.madvise(a, n, MADV_UNMERGEABLE)
        assert broken == n - (hi - lo)
        assert maps_duplicates([(s, a, n)]) == []
        assert not any(is_ksm(cl, s.pfn(a + i * PAGE)) for i in range(n))
        assert all(s.writable(a + i * PAGE) for i in range(n))
        assert [(st, e, f) for (_i, st, e, f) in s.mm.vmas()] == [(v0, v0 + n, 3)]  # merged back
        assert [s.read(a + i * PAGE, PAGE) for i in range(n)] == pages
        s.alloc.flush()
        wait_frames_used(sup, n)
        wait_counts(sup, pages_shared=0, pages_sharing=0, pages_unshared=0, rmap_items=0)
        assert_fsck(sup, [s])
        # and merge again
        s.mergeable(a, n)
        wait_counts(sup, pages_shared=2, pages_sharing=n - 2)
        wait_frames_used(sup, 2)
        exit_all_clean(sup, s)


@pytest.mark.timeout(60)
def test_merged_page_survives_its_mappers_leaving() -> None:
    """The KSM page lives while one mapping is left; a page written back
    with the shared content merges again."""
    with booted_fast("l") as sup:
        cl = sup.cl
        spaces = [Space(sup, 910 + i) for i in range(3)]
        addrs = [s.mmap(4) for s in spaces]
        for s, a in zip(spaces, addrs):
            s.fill(a, [content(42)] * 4)
            s.mergeable(a, 4)
        wait_counts(sup, pages_shared=1, pages_sharing=11)
        kpfn = spaces[0].pfn(addrs[0])
        s0 = spaces[0]
        s0.write(addrs[0] + 5, b"!")  # COW out of the KSM page
        assert s0.pfn(addrs[0]) != kpfn
        s0.write(addrs[0] + 5, content(42)[:1])  # ... and back to the shared content
        pump(sup, lambda: s0.pfn(addrs[0]) == kpfn, 30, what="the page to merge again")
        wait_counts(sup, pages_shared=1, pages_sharing=11)
        spaces[1].exit()
        spaces[2].exit()
        k = wait_counts(sup, pages_shared=1, pages_sharing=3)
        assert frame(cl, kpfn)[0] == 4 and k["pages_unshared"] == 0
        assert s0.read(addrs[0], 4 * PAGE) == content(42) * 4
        exit_all_clean(sup, s0)
