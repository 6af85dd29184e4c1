"""6.18's stable tree under kernel="6.18" (issue 23): stable_node chains and
dups under max_page_sharing, pages_shared / pages_sharing as 6.18 counts
them, the pruning of stale dups, a KSM page mapped once staying one, the
fork past the limit, unmerging by FAULT_FLAG_UNSHARE -- with the numbers
the public programs assert:

- ksm_tests.c -M (10 pages of one content: 1 shared, 9 sharing);
- ksm_tests.c's check_ksm_merge with n pages and limit m: if n % m is 0 or
  1, shared == n / m and sharing == shared * (m - 1); else shared == n / m
  + 1 and sharing == n - shared;
- LTP ksm06, its max_page_sharing half on one node: n pages of one
  content, max_page_sharing = n: shared 1, sharing n - 1.

In-process (util_machine.Space; ksmd runs), each case a small cluster.
The knobs are written as words: their stores (EINVAL, EBUSY) are the
switch's (branch mode); the EBUSY rule holds here (pages_shared is 0).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from helpers import booted, cname
from uksm.kernel.layout import (
    K_MAX_PAGE_SHARING,
    K_SMART_SCAN,
    K_STABLE_NODE_CHAINS,
    K_STABLE_NODE_CHAINS_PRUNE_MS,
    K_STABLE_NODE_DUPS,
    PTE_PRESENT,
    PTE_WRITE,
    VM_READ,
)
from uksm.kernel.syscalls import MADV_DONTNEED, MADV_UNMERGEABLE, sys_mlockall, sys_mmap
from util_machine import (
    PAGE,
    Space,
    assert_fsck,
    exit_all_clean,
    frame,
    frames_used,
    is_ksm,
    ksm_stats,
    set_run,
    wait_counts,
    wait_full_scans,
)

pytestmark = pytest.mark.timeout(60)


@contextmanager
def booted618(tag: str, kernel: str = "6.18", **kw: Any) -> Iterator[Any]:
    """A 6.18 cluster with smart_scan 0, as ksm_tests.c's and LTP's runs
    and the twin's cases set it: with 6.7's smart scan on, a page left
    alone is skipped (should_skip_rmap_item takes it off the unstable
    tree: pages_volatile, not pages_unshared) in some full scans and not
    in others, and a count read after a scan depends on which."""
    with booted(cname("t618" + tag), run=1, pages_to_scan=5000, sleep_ms=0, frames=kw.pop("frames", 256),
                va_pages=kw.pop("va_pages", 256), kernel=kernel, **kw) as sup:
        if kernel == "6.18":
            sup.cl.q[K_SMART_SCAN] = 0   # before any task exists: no page was ever looked at
        yield sup


def content(n: int) -> bytes:
    return bytes([n % 255 + 1]) * PAGE


def chains(cl: Any) -> tuple[int, int]:
    """(stable_node_chains, stable_node_dups), read under ksm_thread_mutex."""
    cl.task.lock(cl.daemon)
    try:
        return cl.q[K_STABLE_NODE_CHAINS], cl.q[K_STABLE_NODE_DUPS]
    finally:
        cl.task.unlock(cl.daemon)


def merge_check(n: int, m: int) -> tuple[int, int]:
    """ksm_tests.c check_ksm_merge's expectation for n pages, limit m."""
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def same_pages(sup: Any, n: int, limit: int, prune_ms: int | None = None) -> tuple[Space, int]:
    """n pages of one content in one mm, max_page_sharing ``limit``, merged."""
    cl = sup.cl
    cl.q[K_MAX_PAGE_SHARING] = limit
    if prune_ms is not None:
        cl.q[K_STABLE_NODE_CHAINS_PRUNE_MS] = prune_ms
    s = Space(sup)
    a = s.mmap(n)
    s.fill(a, [content(0x2A)] * n)    # ksm_tests.c: memset(map, '*', ...)
    s.mergeable(a, n)
    wait_full_scans(sup, 3)
    return s, a


def frames_of(s: Space, a: int, n: int) -> dict[int, int]:
    """KSM frame -> how many of the n pages map it."""
    out: dict[int, int] = {}
    for i in range(n):
        pfn = s.pfn(a + i * PAGE)
        if pfn is not None and is_ksm(s.cl, pfn):
            out[pfn] = out.get(pfn, 0) + 1
    return out


def test_ksm_tests_M_ten_pages_one_shared_nine_sharing() -> None:
    """ksm_tests.c -M -p 10 at the default max_page_sharing (256)."""
    with booted618("M") as sup:
        s, a = same_pages(sup, 10, 256)
        k = ksm_stats(sup.cl)
        assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"], k["pages_volatile"]) == (1, 9, 0, 0)
        assert chains(sup.cl) == (0, 0)
        assert s.read(a, 10 * PAGE) == content(0x2A) * 10
        exit_all_clean(sup, s)


# n % m: 1, 2, 0, 1 (m = 2: one page left alone), 2, and one below the limit
FORMULA = [(10, 3), (11, 3), (8, 2), (5, 2), (14, 4), (3, 8)]


@pytest.mark.parametrize("n,m", FORMULA, ids=[f"n{n}m{m}" for n, m in FORMULA])
def test_max_page_sharing_merge_check_formula(n: int, m: int) -> None:
    """ksm_tests.c check_ksm_merge's formula; each KSM page is shared by at
    most m pages; past one KSM page its content is a chain of dups."""
    with booted618(f"f{n}x{m}") as sup:
        s, a = same_pages(sup, n, m)
        shared, sharing = merge_check(n, m)
        k = ksm_stats(sup.cl)
        assert (k["pages_shared"], k["pages_sharing"]) == (shared, sharing), k
        left = n - shared - sharing    # the one page left alone waits in the unstable tree
        assert (k["pages_unshared"], k["pages_volatile"]) == (left, 0), k
        assert chains(sup.cl) == ((1, shared) if shared > 1 else (0, 0))
        per = frames_of(s, a, n)
        assert len(per) == shared and all(2 <= c <= m for c in per.values()), per
        assert frames_used(sup.cl) >= shared + left
        assert_fsck(sup, [s])
        # nothing moves on more scans
        k2 = wait_full_scans(sup, 2)
        assert (k2["pages_shared"], k2["pages_sharing"]) == (shared, sharing)
        exit_all_clean(sup, s)


@pytest.mark.parametrize("n", [10, 100])
def test_ltp_ksm06_max_page_sharing_one_node(n: int) -> None:
    """LTP ksm06, merge_across_nodes=1 on one node: n pages of one content
    with max_page_sharing = n: one KSM page, shared 1, sharing n - 1."""
    with booted618(f"l{n}", frames=256) as sup:
        s, a = same_pages(sup, n, n)
        k = ksm_stats(sup.cl)
        assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == (1, n - 1, 0), k
        assert chains(sup.cl) == (0, 0)
        assert len(frames_of(s, a, n)) == 1
        exit_all_clean(sup, s)


@pytest.mark.parametrize("kernel,after", [("6.18", (1, 0)), ("2.6.32", (0, 0))])
def test_a_ksm_page_mapped_once_stays_one_under_618(kernel: str, after: tuple[int, int]) -> None:
    """Two pages merged, one written: 2.6.32's ksmd breaks the KSM page
    left with one mapping ("Replace now-unshared ksm page"); 6.18 keeps
    it -- pages_shared 1, pages_sharing 0 -- a KSM page still."""
    with booted618("u" + kernel.replace(".", ""), kernel=kernel) as sup:
        s = Space(sup)
        a = s.mmap(2)
        s.fill(a, [content(7)] * 2)
        s.mergeable(a, 2)
        wait_counts(sup, pages_shared=1, pages_sharing=1)
        kpfn = s.pfn(a)
        s.write(a + PAGE, b"+")
        k = wait_full_scans(sup, 3)
        assert (k["pages_shared"], k["pages_sharing"]) == after, k
        if kernel == "6.18":
            assert s.pfn(a) == kpfn and is_ksm(sup.cl, kpfn)
        else:
            assert not is_ksm(sup.cl, s.pfn(a) or 0)
        assert s.read(a, PAGE) == content(7)
        assert_fsck(sup, [s])
        exit_all_clean(sup, s)


def test_stale_dups_pruned_and_the_chain_collapses() -> None:
    """max_page_sharing 2, 4 pages: dups A (pages 0, 1) and B (2, 3) in one
    chain.  Pages 0 and 1 discarded (A's page freed), page 3 written:
    A's rmap_items find its page gone and free the dup (stable_node_dups
    drops); page 3's search passes the chain, due for pruning (0 ms),
    finds B alone with room and collapses the chain into it."""
    with booted618("p") as sup:
        cl = sup.cl
        s, a = same_pages(sup, 4, 2, prune_ms=0)
        k = ksm_stats(cl)
        assert (k["pages_shared"], k["pages_sharing"]) == (2, 2) and chains(cl) == (1, 2)
        assert s.pfn(a) == s.pfn(a + PAGE) != s.pfn(a + 2 * PAGE) == s.pfn(a + 3 * PAGE)
        s.madvise(a, 2, MADV_DONTNEED)
        s.write(a + 3 * PAGE, b"3")
        k = wait_full_scans(sup, 3)
        assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == (1, 0, 1), k
        assert chains(cl) == (0, 0)
        assert is_ksm(cl, s.pfn(a + 2 * PAGE) or 0)
        assert_fsck(sup, [s])
        exit_all_clean(sup, s)


def test_an_emptied_chain_is_freed_by_the_next_search() -> None:
    """Every page of a chain's dups discarded: both dups go when their
    rmap_items find the pages gone (stable_node_dups 0); the empty chain
    goes at the next search that passes it (stable_node_dup_any), here
    the scan of another page in the same mm."""
    with booted618("e") as sup:
        cl = sup.cl
        s, a = same_pages(sup, 5, 2)
        assert chains(cl) == (1, 2)
        s.write(a + 4 * PAGE, b"x")   # the page left alone: another content, scanned every pass
        s.madvise(a, 4, MADV_DONTNEED)
        k = wait_full_scans(sup, 3)
        assert (k["pages_shared"], k["pages_sharing"]) == (0, 0), k
        assert chains(cl) == (0, 0)
        exit_all_clean(sup, s)


def test_a_fork_maps_past_the_limit_without_a_new_dup() -> None:
    """A forked KSM page: the child's rmap_items join the parent's KSM
    page whatever the limit ("If it's a KSM fork, allow it to go over the
    sharing limit without warnings": max_page_sharing_bypass)."""
    with booted618("k") as sup:
        cl = sup.cl
        s, a = same_pages(sup, 2, 2)
        kpfn = s.pfn(a)
        assert (ksm_stats(cl)["pages_shared"], ksm_stats(cl)["pages_sharing"]) == (1, 1)
        child, err = s.fork()
        assert err == 0 and child is not None
        k = wait_counts(sup, pages_shared=1, pages_sharing=3)
        assert k["pages_unshared"] == 0 and chains(cl) == (0, 0)
        assert child.pfn(a) == child.pfn(a + PAGE) == kpfn and frame(cl, kpfn)[0] == 4
        exit_all_clean(sup, child, s)


def test_run2_frees_every_chain_and_dup() -> None:
    with booted618("r") as sup:
        cl = sup.cl
        s, a = same_pages(sup, 7, 3)     # 7 % 3 == 1: two KSM pages of 3, one page alone
        assert chains(cl) == (1, 2)
        set_run(sup, 2)
        k = ksm_stats(cl)
        assert (k["pages_shared"], k["pages_sharing"]) == (0, 0) and chains(cl) == (0, 0)
        assert not frames_of(s, a, 7)
        set_run(sup, 1)
        wait_counts(sup, pages_shared=2, pages_sharing=4)
        assert chains(cl) == (1, 2)
        exit_all_clean(sup, s)


def test_unmerge_by_unshare_maps_the_copy_read_only() -> None:
    """6.2's break_ksm faults with FAULT_FLAG_UNSHARE: the copy is mapped
    read-only (no fake write), the next write reuses it in place (no new
    frame); an area mapped read-only is unmerged too."""
    with booted618("s") as sup:
        cl = sup.cl
        s, a = same_pages(sup, 4, 256)
        s.madvise(a, 4, MADV_UNMERGEABLE)
        pfns = [s.pfn(a + i * PAGE) for i in range(4)]
        assert len(set(pfns)) == 4 and not any(is_ksm(cl, p or 0) for p in pfns)
        assert not any(s.writable(a + i * PAGE) for i in range(4))
        used = frames_used(cl)
        s.write(a, b"w")
        assert s.pfn(a) == pfns[0] and s.writable(a) and frames_used(cl) == used
        # a read-only area: populated (mlockall faults it in for read), merged, unmerged
        ro = sys_mmap(cl, s.mm, 3 * PAGE, VM_READ)
        assert sys_mlockall(cl, s.mm, s.alloc) == 3
        s.mergeable(ro, 3)
        wait_counts(sup, pages_shared=1, pages_sharing=2)
        s.madvise(ro, 3, MADV_UNMERGEABLE)
        ptes = [s.pte(ro + i * PAGE) for i in range(3)]
        assert all(p & PTE_PRESENT and not p & PTE_WRITE for p in ptes)
        assert len({p >> 2 for p in ptes}) == 3 and s.read(ro, 3 * PAGE) == bytes(3 * PAGE)
        assert_fsck(sup, [s])
        exit_all_clean(sup, s)


@pytest.mark.parametrize("kernel", ["6.18", "2.6.32"])
def test_fsck_checks_the_chain_counters(kernel: str) -> None:
    """fsck's chain invariants: a dup only in a chain, no more dups or
    shared pages than the tree's KSM pages, max_page_sharing >= 2; no
    chain at all under 2.6.32."""
    from uksm.kernel.fsck import check_chains
    from uksm.kernel.layout import K_PAGES_SHARED, K_STABLE_NODES
    with booted(cname("t618c" + kernel.replace(".", "")), run=0, kernel=kernel, frames=64,
                va_pages=64) as sup:
        cl, q = sup.cl, sup.cl.q
        assert check_chains(cl) == []
        q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES] = 1, 2, 3
        q[K_PAGES_SHARED] = 3
        assert (check_chains(cl) == []) == (kernel == "6.18")
        if kernel == "6.18":
            q[K_STABLE_NODE_CHAINS] = 0
            assert "stable_node_dups 2 with stable_node_chains 0" in check_chains(cl)[0]
            q[K_STABLE_NODE_CHAINS], q[K_PAGES_SHARED] = 1, 4
            assert "pages_shared 4 >" in check_chains(cl)[0]
            q[K_PAGES_SHARED], q[K_MAX_PAGE_SHARING] = 3, 1
            assert check_chains(cl) == ["knob: max_page_sharing 1 < 2"]
            q[K_MAX_PAGE_SHARING] = 256
        q[K_STABLE_NODE_CHAINS] = q[K_STABLE_NODE_DUPS] = q[K_STABLE_NODES] = q[K_PAGES_SHARED] = 0
