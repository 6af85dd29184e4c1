"""The fsck rules added with 2.6.32's allocating merge and 6.18 (issues 22,
23) fire on a planted fault, name it, and are quiet once it is undone:

- check_ksmd_flight: ksmd named a frame in flight outside a batch;
- check_zero_pages: an mm's ksm_zero_pages, or the global one, is not
  what its page table maps of the zero page;
- check_leaks' 6.18 rules: the zero page's count back to its
  reservation, ksm_zero_pages 0, once every task has gone;
- check_chains: negative counters, more dups than the tree's KSM pages.

Each cluster is booted in this process with ksmd stopped (run=0), so no
other process changes what is planted; every plant is undone before the
cluster is torn down."""
from __future__ import annotations

from typing import Any

import pytest

from helpers import booted, cname
from uksm.kernel.fsck import check_chains, check_ksmd_flight, check_leaks, live_task_rows
from uksm.kernel.layout import (
    FR_COUNT,
    FRAME_SIZE,
    K_STABLE_NODE_CHAINS,
    K_STABLE_NODE_DUPS,
    K_STABLE_NODES,
    K_ZERO_PAGES,
    M_ZERO_PAGES,
    R_KSMD,
    ZERO_PFN,
)
from util_machine import Space, assert_fsck, exit_all_clean, fsck_errors


def ksmd_row(cl: Any) -> int:
    rows = [r for r in live_task_rows(cl) if cl.trow(r).role == R_KSMD]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.timeout(60)
def test_ksmd_flight_fires_on_a_frame_left_named():
    with booted(cname("fkflight"), run=0, frames=64, va_pages=64) as sup:
        cl = sup.cl
        assert check_ksmd_flight(cl) == []
        t = cl.trow(ksmd_row(cl))
        t.flight_pfn = 7
        try:
            assert check_ksmd_flight(cl) == ["ksmd holds frame 7 in flight outside a batch"]
        finally:
            t.flight_pfn = -1
        assert check_ksmd_flight(cl) == []


@pytest.mark.timeout(60)
def test_zero_page_counts_fire_per_mm_and_globally():
    with booted(cname("fkzero"), run=0, frames=64, va_pages=64, kernel="6.18") as sup:
        q = sup.cl.q
        s = Space(sup)
        s.mmap(4)
        assert_fsck(sup, [s])
        q[s.mm.base + M_ZERO_PAGES] += 1          # one more than the page table maps
        q[K_ZERO_PAGES] += 1
        try:
            errs = fsck_errors(sup, [s])
            assert f"mm{s.mm.id}: ksm_zero_pages 1 but the page table maps the zero page 0 times" in errs
            assert "ksm_zero_pages 1 but the page tables map the zero page 0 times" in errs
        finally:
            q[s.mm.base + M_ZERO_PAGES] -= 1
            q[K_ZERO_PAGES] -= 1
        exit_all_clean(sup, s)


@pytest.mark.timeout(60)
def test_leaks_fire_on_the_zero_page_count_and_ksm_zero_pages():
    with booted(cname("fkzleak"), run=0, frames=64, va_pages=64, kernel="6.18") as sup:
        cl, q = sup.cl, sup.cl.q
        assert check_leaks(cl) == []
        zb = ZERO_PFN * FRAME_SIZE
        cl.fq[zb + FR_COUNT] += 1                  # a zero PTE never counted out
        try:
            assert check_leaks(cl) == ["leak: the zero page's count is 2 after every task exited"]
        finally:
            cl.fq[zb + FR_COUNT] -= 1
        q[K_ZERO_PAGES] = 3
        try:
            assert check_leaks(cl) == ["ksm_zero_pages is 3 after every task exited"]
        finally:
            q[K_ZERO_PAGES] = 0
        assert check_leaks(cl) == []


@pytest.mark.timeout(60)
def test_chains_fire_on_negative_counts_and_dups_past_the_nodes():
    with booted(cname("fkchain"), run=0, frames=64, va_pages=64, kernel="6.18") as sup:
        q = sup.cl.q
        saved = q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES]
        try:
            q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES] = -1, 0, 0
            assert check_chains(sup.cl) == ["counters: stable_node_dups 0 with stable_node_chains -1"]
            q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES] = 1, 4, 3
            assert check_chains(sup.cl) == ["counters: stable_node_dups 4 or pages_shared 0 > the stable "
                                            "tree's KSM pages 3"]
        finally:
            q[K_STABLE_NODE_CHAINS], q[K_STABLE_NODE_DUPS], q[K_STABLE_NODES] = saved
        assert check_chains(sup.cl) == []
