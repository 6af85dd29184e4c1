"""The emulated MMU, driven in-process (issue 2): faults, zero page, user
access across pages, COW on KSM pages, segfaults, MADV_DONTNEED, munmap.

Each test boots a cluster with ``helpers.booted`` and acts, from the test
thread, as a user task with its own address space (``util_machine.Space``).
After each step fsck (with the world stopped) must be clean.
"""
from __future__ import annotations

import pytest

from helpers import booted, cname
from uksm.errors import SegFault
from uksm.kernel.layout import FIRST_VPN, M_KSM_MAPPED, M_RSS, PT_OFF, T_COW, T_FAULTS
from uksm.kernel.syscalls import MADV_DONTNEED, MADV_MERGEABLE
from util_machine import (
    PAGE,
    Space,
    assert_fsck,
    frame,
    frames_used,
    is_ksm,
    set_run,
    wait_counts,
    wait_frames_used,
)

pytestmark = pytest.mark.timeout(60)


_SRC = bytes(i % 251 + 1 for i in range(8 * PAGE))


def pattern(seed: int, n: int) -> bytes:
    """n bytes (n <= 7 pages), no zero byte, different for seeds 0..250."""
    k = seed % 251
    return _SRC[k:k + n]


def page_table(s: Space) -> list[int]:
    return list(s.mm.pq[PT_OFF:PT_OFF + s.cl.va_pages])


def test_first_touch_faults_in_a_zero_filled_frame() -> None:
    with booted(cname("tmmua"), run=0, frames=64, va_pages=256) as sup:
        s = Space(sup)
        base = s.mmap(4)
        assert s.pfn(base) is None and s.rss() == 0
        used0 = frames_used(sup.cl)
        faults0 = sup.cl.q[sup.cl.task.base + T_FAULTS]
        s.write(base + 100, b"\x5a")
        pfn = s.pfn(base)
        assert pfn is not None and s.writable(base)
        assert frame(sup.cl, pfn) == (1, 1)  # count 1, ANON
        assert s.rss() == 1
        assert frames_used(sup.cl) == used0 + 1
        assert sup.cl.q[sup.cl.task.base + T_FAULTS] == faults0 + 1
        # the rest of the frame is zero-filled; the byte is there
        data = s.read(base, PAGE)
        assert data[100] == 0x5A and data[:100] == bytes(100) and data[101:] == bytes(PAGE - 101)
        # a second write to the same page does not fault again
        s.write(base + 200, b"\x01\x02")
        assert s.pfn(base) == pfn and s.rss() == 1
        assert sup.cl.q[sup.cl.task.base + T_FAULTS] == faults0 + 1
        assert s.pfn(base + PAGE) is None  # the neighbour stays untouched
        assert_fsck(sup, [s])
        s.exit()
        assert frames_used(sup.cl) == used0
        assert_fsck(sup)


def test_read_of_untouched_page_is_zero_and_allocates_nothing() -> None:
    with booted(cname("tmmub"), run=0, frames=64, va_pages=256) as sup:
        s = Space(sup)
        base = s.mmap(8)
        used0 = frames_used(sup.cl)
        pt0 = page_table(s)
        assert s.read(base, 8 * PAGE) == bytes(8 * PAGE)
        assert s.read(base + 4000, 300) == bytes(300)  # unaligned, across a boundary
        assert frames_used(sup.cl) == used0
        assert s.rss() == 0
        assert page_table(s) == pt0
        assert_fsck(sup, [s])
        s.exit()
        assert_fsck(sup)


def test_unaligned_write_and_read_across_three_pages() -> None:
    with booted(cname("tmmuc"), run=0, frames=64, va_pages=256) as sup:
        s = Space(sup)
        base = s.mmap(6)
        # starts 100 bytes before the end of page 1, ends 100 bytes into page 3
        addr = base + 2 * PAGE - 100
        data = pattern(3, PAGE + 200)
        s.write(addr, data)
        assert s.rss() == 3
        assert [s.pfn(base + i * PAGE) is not None for i in range(6)] == \
            [False, True, True, True, False, False]
        assert s.read(addr, len(data)) == data
        # the bytes around it are still zero
        assert s.read(base + PAGE, PAGE - 100) == bytes(PAGE - 100)
        assert s.read(addr + len(data), PAGE - 100) == bytes(PAGE - 100)
        # three distinct frames, each holding its part
        pfns = [s.pfn(base + i * PAGE) for i in (1, 2, 3)]
        assert len(set(pfns)) == 3
        pool = sup.cl.pool.mv
        assert pool[pfns[1] * PAGE:(pfns[1] + 1) * PAGE].tobytes() == data[100:100 + PAGE]
        # random unaligned writes against a model of the whole range
        import random
        rng = random.Random(7)
        model = bytearray(s.read(base, 6 * PAGE))
        for k in range(200):
            off = rng.randrange(6 * PAGE)
            n = rng.randint(1, min(3 * PAGE, 6 * PAGE - off))
            chunk = pattern(k, n)
            s.write(base + off, chunk)
            model[off:off + n] = chunk
            if k % 20 == 0:
                o = rng.randrange(6 * PAGE)
                m = rng.randint(0, 6 * PAGE - o)
                assert s.read(base + o, m) == bytes(model[o:o + m])
        assert s.read(base, 6 * PAGE) == bytes(model)
        assert s.rss() == 6
        assert_fsck(sup, [s])
        s.exit()
        assert frames_used(sup.cl) == 0
        assert_fsck(sup)


def test_write_to_ksm_page_breaks_cow() -> None:
    with booted(cname("tmmud"), run=1, pages_to_scan=5000, sleep_ms=0, frames=64,
                va_pages=256) as sup:
        cl = sup.cl
        s = Space(sup)
        base = s.mmap(2)
        content = pattern(9, PAGE)
        s.fill(base, [content, content])
        s.madvise(base, 2, MADV_MERGEABLE)
        wait_counts(sup, pages_shared=1, pages_sharing=1)
        set_run(sup, 0)  # keep the merged pages, stop scanning
        kpfn = s.pfn(base)
        assert kpfn is not None and s.pfn(base + PAGE) == kpfn
        assert is_ksm(cl, kpfn) and frame(cl, kpfn)[0] == 2
        assert not s.writable(base) and not s.writable(base + PAGE)
        # ksmd gives the merged-away frame back at its next flush (it goes
        # idle on run=0); run_store itself returns before that
        wait_frames_used(sup, 1)
        assert s.field(M_KSM_MAPPED) == 2 and s.rss() == 2
        assert s.read(base, PAGE) == content  # reading does not break it
        assert s.pfn(base) == kpfn
        assert_fsck(sup, [s])

        cow0 = cl.q[cl.task.base + T_COW]
        s.write(base + 10, b"\xff")
        new = s.pfn(base)
        assert new is not None and new != kpfn and s.writable(base)
        assert not is_ksm(cl, new) and frame(cl, new)[0] == 1
        assert s.read(base, PAGE) == content[:10] + b"\xff" + content[11:]
        assert s.pfn(base + PAGE) == kpfn and s.read(base + PAGE, PAGE) == content
        assert frame(cl, kpfn)[0] == 1 and is_ksm(cl, kpfn)
        assert cl.q[cl.task.base + T_COW] == cow0 + 1
        assert s.field(M_KSM_MAPPED) == 1 and s.rss() == 2
        assert frames_used(cl) == 2
        assert_fsck(sup, [s])

        # the last mapping of the KSM page: COW copies too (2.6.32 never
        # reuses a KSM page), and the KSM frame is freed
        s.write(base + PAGE + PAGE - 1, b"\x00")
        assert s.pfn(base + PAGE) not in (None, kpfn) and s.writable(base + PAGE)
        assert frame(cl, kpfn)[0] == 0 and not is_ksm(cl, kpfn)  # being freed
        assert s.read(base + PAGE, PAGE) == content[:-1] + b"\x00"
        assert s.field(M_KSM_MAPPED) == 0
        assert_fsck(sup, [s])
        s.alloc.flush()  # the frees a task batches
        assert frame(cl, kpfn) == (0, 0) and frames_used(cl) == 2
        assert_fsck(sup, [s])
        set_run(sup, 1)  # let ksmd free the slot at exit
        s.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)


@pytest.mark.parametrize("how", ["read", "write"])
def test_access_outside_any_vma_segfaults_and_changes_nothing(how: str) -> None:
    with booted(cname("tmmue" + how[0]), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        s = Space(sup)
        a = s.mmap(4)
        hole = s.mmap(2)
        b = s.mmap(4)
        s.munmap(hole, 2)  # a hole between two VMAs
        s.write(a, pattern(1, PAGE))
        s.write(b, pattern(2, PAGE))
        pt0, used0, rss0 = page_table(s), frames_used(cl), s.rss()
        vmas0 = s.mm.vmas()
        bad = [0, FIRST_VPN * PAGE - 1, 5 * PAGE,          # the NULL pages
               hole, hole + PAGE + 17,                     # the hole
               b + 4 * PAGE, b + 9 * PAGE,                 # past the last VMA
               cl.va_pages * PAGE, (cl.va_pages + 5) * PAGE + 3,  # beyond the address space
               -PAGE]
        for addr in bad:
            with pytest.raises(SegFault):
                if how == "read":
                    s.read(addr, 8)
                else:
                    s.write(addr, b"12345678")
        assert page_table(s) == pt0
        assert frames_used(cl) == used0 and s.rss() == rss0
        assert s.mm.vmas() == vmas0
        assert s.read(a, PAGE) == pattern(1, PAGE) and s.read(b, PAGE) == pattern(2, PAGE)
        # system calls on the hole fail the same way
        with pytest.raises(SegFault):
            s.madvise(hole, 1, MADV_DONTNEED)
        with pytest.raises(SegFault):
            s.madvise(hole, 2, MADV_MERGEABLE)
        assert s.mm.vmas() == vmas0 and page_table(s) == pt0
        assert_fsck(sup, [s])
        s.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)


def test_madvise_past_the_end_of_the_address_space_fails_cleanly() -> None:
    """madvise of a range running past the last page of the address space:
    the advice on the mapped part, then -ENOMEM (mm/madvise.c: "just ignore
    them, but return -ENOMEM at the end"), no lock left held; munmap of it:
    -EINVAL ("len > TASK_SIZE-start"), nothing unmapped."""
    from uksm.kernel.syscalls import MADV_UNMERGEABLE
    with booted(cname("tmmui"), run=0, frames=64, va_pages=64) as sup:
        cl = sup.cl
        s = Space(sup)
        n = cl.va_pages - FIRST_VPN
        a = s.mmap(n)  # the whole address space
        s.write(a, b"keep")
        s.write(a + (n - 1) * PAGE, b"last")
        for advice in (MADV_MERGEABLE, MADV_UNMERGEABLE):
            with pytest.raises(SegFault, match="ENOMEM"):
                s.madvise(a, n + 8, advice)
            held = [lk.name for lk in (s.mm.sem, s.mm.wmx, s.mm.ptl, cl.zone, cl.mmlist)
                    if cl.task.holds(lk)]
            assert held == [], f"madvise({advice}) failed holding {held}"
        with pytest.raises(SegFault, match="EINVAL"):
            s.munmap(a, n + 8)
        assert s.read(a, 4) == b"keep" and s.read(a + (n - 1) * PAGE, 4) == b"last"
        assert s.rss() == 2
        with pytest.raises(SegFault, match="ENOMEM"):
            s.madvise(a, n + 8, MADV_DONTNEED)      # zaps the mapped part all the same
        assert s.rss() == 0 and s.read(a, 4) == bytes(4)
        assert not any(cl.task.holds(lk) for lk in (s.mm.sem, s.mm.ptl, cl.zone, cl.mmlist))
        assert_fsck(sup, [s])
        s.exit()
        assert_fsck(sup)


def test_madv_dontneed_frees_frames() -> None:
    with booted(cname("tmmuf"), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        s = Space(sup)
        base = s.mmap(16)
        s.fill(base, [pattern(i, PAGE) for i in range(16)])
        used = frames_used(cl)
        assert used == 16 and s.rss() == 16
        s.madvise(base + 4 * PAGE, 8, MADV_DONTNEED)
        assert frames_used(cl) == 8 and s.rss() == 8
        for i in range(16):
            dropped = 4 <= i < 12
            assert (s.pfn(base + i * PAGE) is None) == dropped
            assert s.read(base + i * PAGE, PAGE) == (bytes(PAGE) if dropped else pattern(i, PAGE))
        assert frames_used(cl) == 8  # reading the dropped pages back allocated nothing
        assert_fsck(sup, [s])
        # the VMA is still there: touching again faults in fresh zero frames
        s.write(base + 5 * PAGE, b"x")
        assert s.read(base + 5 * PAGE, 2) == b"x\x00" and frames_used(cl) == 9
        assert_fsck(sup, [s])
        s.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)


def test_munmap_splits_frees_and_unmaps() -> None:
    with booted(cname("tmmug"), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        s = Space(sup)
        base = s.mmap(10)
        s.fill(base, [pattern(i, PAGE) for i in range(10)])
        assert frames_used(cl) == 10
        s.munmap(base + 3 * PAGE, 4)  # the middle: the VMA is split in two
        vmas = [(st, e) for (_i, st, e, _f) in s.mm.vmas()]
        v0 = base >> 12
        assert vmas == [(v0, v0 + 3), (v0 + 7, v0 + 10)]
        assert frames_used(cl) == 6 and s.rss() == 6
        for i in range(3, 7):
            assert s.pfn(base + i * PAGE) is None
            with pytest.raises(SegFault):
                s.read(base + i * PAGE, 1)
            with pytest.raises(SegFault):
                s.write(base + i * PAGE, b"z")
        for i in (0, 1, 2, 7, 8, 9):
            assert s.read(base + i * PAGE, PAGE) == pattern(i, PAGE)
        assert frames_used(cl) == 6
        assert_fsck(sup, [s])
        # munmap over a hole unmaps what is mapped (do_munmap: no error)
        s.munmap(base + 2 * PAGE, 3)
        assert frames_used(cl) == 5 and s.pfn(base + 2 * PAGE) is None
        s.munmap(base + 2 * PAGE, 1)                # nothing mapped there: still no error
        # mmap reuses the hole
        again = s.mmap(4)
        assert again == base + 2 * PAGE
        assert s.read(again, 4 * PAGE) == bytes(4 * PAGE)
        s.munmap(base, 10)
        assert s.mm.vmas() == [] and frames_used(cl) == 0 and s.rss() == 0
        assert all(p == 0 for p in page_table(s))
        assert_fsck(sup, [s])
        s.exit()
        assert_fsck(sup)


def test_rss_and_fault_accounting_with_several_address_spaces() -> None:
    """Two address spaces share the frame pool but never a frame (no KSM)."""
    with booted(cname("tmmuh"), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        s1, s2 = Space(sup, 901), Space(sup, 902)
        a1, a2 = s1.mmap(8), s2.mmap(8)
        assert a1 == a2  # separate address spaces: the same virtual address
        same = pattern(4, PAGE)
        s1.fill(a1, [same] * 8)
        s2.fill(a2, [same] * 8)
        p1 = {s1.pfn(a1 + i * PAGE) for i in range(8)}
        p2 = {s2.pfn(a2 + i * PAGE) for i in range(8)}
        assert len(p1) == 8 and len(p2) == 8 and not p1 & p2
        assert frames_used(cl) == 16 and s1.field(M_RSS) == 8 and s2.field(M_RSS) == 8
        s1.write(a1, b"one")
        assert s2.read(a2, 3) == same[:3]
        assert_fsck(sup, [s1, s2])
        s1.exit()
        assert frames_used(cl) == 8 and s2.read(a2, PAGE) == same
        assert_fsck(sup, [s2])
        s2.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)
