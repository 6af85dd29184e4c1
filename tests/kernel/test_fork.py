"""fork's memory half, driven in-process (issue 22): dup_mmap's copy of
the VMAs and page tables (uksm.kernel.fork), ksm_fork's __ksm_enter and
where it puts the slot, copy-on-write in each task, and a fork that fails
(-ENOMEM, a pending signal) leaving the parent as it was.

The test thread is the parent (``util_machine.Space``), the new task's
row and mm are made as the supervisor makes them (``Space.fork``)."""
from __future__ import annotations

import os

import pytest

from helpers import booted, cname
from uksm.kernel import ksm
from uksm.kernel.fork import ERESTARTNOINTR
from uksm.kernel.layout import (
    FR_COUNT,
    FRAME_SIZE,
    L_SCAN_SLOT,
    M_FLAGS,
    M_KSM_MAPPED,
    M_RSS,
    M_SLOT_USED,
    MMF_VM_MERGEABLE,
    PT_OFF,
    PTE_WRITE,
    VM_LOCKED,
    VM_MERGEABLE,
)
from uksm.kernel.mm import MM
from uksm.kernel.syscalls import MADV_MERGEABLE
from util_machine import PAGE, Space, assert_fsck, frames_used, fsck_errors, set_run, wait_counts

pytestmark = pytest.mark.timeout(90)


def page(v: int) -> bytes:
    return bytes([v]) * PAGE


def count(cl, pfn: int) -> int:
    return cl.fq[pfn * FRAME_SIZE + FR_COUNT]


def test_dup_mmap_copies_vmas_and_shares_every_page_write_protected() -> None:
    with booted(cname("tforka"), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        a = Space(sup)
        base = a.mmap(6)
        other = a.mmap(3)
        a.madvise(base, 4, MADV_MERGEABLE)       # splits: [base, +4) mergeable, [+4, +6) not
        a.fill(base, [page(i + 1) for i in range(6)])
        a.write(other + PAGE, b"x" * 10)
        from uksm.kernel.syscalls import sys_mlockall
        sys_mlockall(cl, a.mm, a.alloc)          # VM_LOCKED everywhere (and the rest faulted in)
        pvmas = a.mm.vmas()
        assert all(f & VM_LOCKED for (_i, _s, _e, f) in pvmas)
        used = frames_used(cl)
        b, err = a.fork()
        assert err == 0 and b is not None
        assert frames_used(cl) == used           # copy-on-write: not a frame taken
        # the same areas with the same flags, bar VM_LOCKED ("tmp->vm_flags &= ~VM_LOCKED")
        assert [(s, e, f & ~VM_LOCKED) for (_i, s, e, f) in pvmas] == \
            [(s, e, f) for (_i, s, e, f) in b.mm.vmas()]
        assert [f & VM_MERGEABLE for (_i, _s, _e, f) in b.mm.vmas()] == [VM_MERGEABLE, 0]
        # every present page: the same frame, write-protected in both, counted twice
        for addr in [base + i * PAGE for i in range(6)] + [other + i * PAGE for i in range(3)]:
            pfn = a.pfn(addr)
            assert pfn is not None and b.pfn(addr) == pfn, hex(addr)
            assert not a.writable(addr) and not b.writable(addr)
            assert count(cl, pfn) == 2
        assert b.rss() == a.rss() == 9 and cl.q[b.mm.base + M_KSM_MAPPED] == 0
        assert b.read(base, 6 * PAGE) == b"".join(page(i + 1) for i in range(6))
        assert_fsck(sup, [a, b])
        # a write breaks COW in the writer only
        pfn = a.pfn(base + 2 * PAGE)
        b.write(base + 2 * PAGE, b"child")
        assert b.pfn(base + 2 * PAGE) != pfn and b.writable(base + 2 * PAGE)
        assert a.pfn(base + 2 * PAGE) == pfn and count(cl, pfn) == 1
        assert a.read(base + 2 * PAGE, 5) == page(3)[:5]
        # ... and the parent, alone on its page now, reuses it (do_wp_page)
        a.write(base + 2 * PAGE, b"parent")
        assert a.pfn(base + 2 * PAGE) == pfn and a.writable(base + 2 * PAGE)
        assert b.read(base + 2 * PAGE, 5) == b"child"
        assert frames_used(cl) == used + 1
        assert_fsck(sup, [a, b])
        b.exit()
        a.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)


def test_a_writable_shared_page_is_what_fsck_calls_copy_on_write_lost() -> None:
    with booted(cname("tforkw"), run=0, frames=32, va_pages=128) as sup:
        a = Space(sup)
        base = a.mmap(2)
        a.fill(base, [page(5), page(6)])
        b, _err = a.fork()
        assert b is not None
        vpn = base >> 12
        a.mm.pq[PT_OFF + vpn] |= PTE_WRITE      # planted: the parent writes into the child's page
        errs = fsck_errors(sup, [a, b])
        assert any("writable, shared by 2 mappings (copy-on-write lost)" in e for e in errs), errs
        a.mm.pq[PT_OFF + vpn] &= ~PTE_WRITE
        assert_fsck(sup, [a, b])
        b.exit()
        a.exit()


def test_ksm_fork_enters_a_mergeable_mms_child_behind_the_cursor() -> None:
    """__ksm_enter's list_add_tail(&mm_slot->mm_list, &ksm_scan.mm_slot->mm_list):
    the child's slot goes just before the slot ksmd scans next, so the
    area settles a whole pass before ksmd looks at it; with the cursor at
    ksm_mm_head (between passes), at the list's end."""
    with booted(cname("tforkc"), run=0, frames=64, va_pages=128) as sup:
        cl, q = sup.cl, sup.cl.q
        a, x = Space(sup), Space(sup)
        for s in (a, x):
            s.mergeable(s.mmap(2), 2)
        assert ksm.slots(cl) == [a.mm.row, x.mm.row]
        q[L_SCAN_SLOT] = x.mm.row                # ksmd is to scan x next
        b, _err = a.fork()
        assert b is not None and q[b.mm.base + M_FLAGS] & MMF_VM_MERGEABLE
        assert ksm.slots(cl) == [a.mm.row, b.mm.row, x.mm.row]
        q[L_SCAN_SLOT] = cl.head                 # between two passes
        c, _err = b.fork()
        assert c is not None and ksm.slots(cl) == [a.mm.row, b.mm.row, x.mm.row, c.mm.row]
        assert_fsck(sup, [a, x, b, c])
        for s in (c, b, x, a):
            s.exit(wait=False)
        set_run(sup, 1)                          # ksmd frees what the slow paths left it
        import helpers
        helpers.pump(sup, lambda: frames_used(cl) == 0 and not ksm.slots(cl), 30)
        assert_fsck(sup)


def test_a_fork_of_an_unmergeable_mm_never_enters_ksm() -> None:
    with booted(cname("tforku"), run=1, frames=64, va_pages=128, sleep_ms=0) as sup:
        cl, q = sup.cl, sup.cl.q
        a = Space(sup)
        base = a.mmap(4)
        a.fill(base, [page(9)] * 4)
        b, _err = a.fork()
        assert b is not None
        assert not q[b.mm.base + M_FLAGS] & MMF_VM_MERGEABLE and not q[b.mm.base + M_SLOT_USED]
        assert ksm.slots(cl) == []
        k = Space(sup)                           # something for ksmd to scan: full scans go on
        k.mergeable(k.mmap(1), 1)
        from util_machine import wait_full_scans
        wait_full_scans(sup, 3)
        assert ksm.slots(cl) == [k.mm.row] and not q[b.mm.base + M_SLOT_USED]
        assert wait_counts(sup, pages_shared=0, pages_sharing=0)["rmap_items"] == 0
        for s in (b, a, k):
            s.exit()
        assert_fsck(sup)


def test_a_fork_that_gets_no_page_table_fails_enomem_and_leaves_the_parent(monkeypatch) -> None:
    """dup_mmap's -ENOMEM (pte_alloc_map_lock failing: here /dev/shm with
    no room for the new page table): the new mm torn down
    (bad_fork_cleanup_mm), the parent's pages its own again."""
    from uksm.host import shm
    from uksm.kernel.ksm import ENOMEM
    with booted(cname("tforkn"), run=0, frames=64, va_pages=256) as sup:
        cl = sup.cl
        a = Space(sup)
        base = a.mmap(40)
        a.mergeable(base, 40)
        a.fill(base, [page(i) for i in range(1, 41)])
        pfns = [a.pfn(base + i * PAGE) for i in range(40)]
        before = set(shm.leftovers(sup.name))
        monkeypatch.setattr(MM, "back_page_table", lambda self, end: False)
        b, err = a.fork()
        monkeypatch.undo()
        assert (b, err) == (None, -ENOMEM)
        # the child's row, segment and semaphores are gone; its slot too
        assert set(shm.leftovers(sup.name)) == before
        assert ksm.slots(cl) == [a.mm.row]
        assert [a.pfn(base + i * PAGE) for i in range(40)] == pfns
        assert all(count(cl, p) == 1 for p in pfns)
        assert a.rss() == 40 and a.read(base, 40 * PAGE) == b"".join(page(i) for i in range(1, 41))
        assert_fsck(sup, [a])
        a.write(base, b"still mine")             # its own page, made writable again
        assert a.pfn(base) == pfns[0] and a.writable(base)
        a.exit()
        assert frames_used(cl) == 0
        assert_fsck(sup)


def test_a_signal_pending_after_the_copy_undoes_the_fork() -> None:
    """copy_process after copy_mm: "if (signal_pending(current)) ...
    -ERESTARTNOINTR": the copy is thrown away (mmput), whatever it held."""
    with booted(cname("tforks"), run=0, frames=32, va_pages=128) as sup:
        cl = sup.cl
        a = Space(sup)
        base = a.mmap(4)
        a.mergeable(base, 4)
        a.fill(base, [page(3)] * 4)
        used = frames_used(cl)
        b, err = a.fork(pending=lambda: True)
        assert (b, err) == (None, -ERESTARTNOINTR)
        assert ksm.slots(cl) == [a.mm.row] and frames_used(cl) == used
        assert cl.q[a.mm.base + M_RSS] == 4
        assert_fsck(sup, [a])
        a.exit()
        assert_fsck(sup)


def test_a_fork_during_run_2_is_missed_as_in_2_6_32() -> None:
    """2.6.32's __ksm_enter puts every new slot just behind the cursor
    (mm/ksm.c line 1432), run=2's cursor too: a child forked while
    unmerge_and_remove_all_rmap_items walks an earlier mm lands behind the
    walk, which never comes back to it -- the child keeps mapping KSM
    pages after run=2 returned, its parent's unmerged.  (Later kernels
    insert at the list's end under KSM_RUN_UNMERGE: "otherwise KSM pages
    in newly forked mms will be missed".)  The schedule: the fork runs as
    another task, from another thread, while the writer (this thread) is
    inside x's walk (its signal_pending check), holding x's mmap_sem."""
    import threading

    from uksm.kernel.ksm import run_store
    with booted(cname("tforkr"), run=1, frames=64, va_pages=128, sleep_ms=0) as sup:
        cl = sup.cl
        x, p = Space(sup), Space(sup)
        xb, pb = x.mmap(2), p.mmap(4)
        x.mergeable(xb, 2)                       # x first on the list: run=2 walks it first
        p.mergeable(pb, 4)
        x.fill(xb, [page(1)] * 2)
        p.fill(pb, [page(2)] * 4)
        wait_counts(sup, pages_shared=2, pages_sharing=4)
        assert ksm.slots(cl) == [x.mm.row, p.mm.row]
        assert all(q["ksm"] for q in p.mm.pagemap(pb >> 12, 4))
        frow, fmm, _wno = sup.new_task(1, pid=os.getpid())   # the forking task's row
        forked: list = []
        walked: list = []

        def stop() -> bool:   # unmerge_ksm_pages' signal_pending, once per page
            walked.append(cl.q[L_SCAN_SLOT])
            if not forked:
                def fork() -> None:
                    forked.append(p.fork(view=cl.thread_view(frow)))
                th = threading.Thread(target=fork)
                th.start()
                th.join(30)
                assert not th.is_alive(), "the fork blocked on the run=2 writer"
            return False

        _seq, err = run_store(cl, 2, stop=stop)
        assert err == 0 and forked
        c, ferr = forked[0]
        assert ferr == 0 and c is not None
        # the window was reached: the fork ran while the walk was at x, and
        # the child's slot went behind that cursor (before x), never walked
        assert walked[0] == x.mm.row and ksm.slots(cl) == [c.mm.row, x.mm.row, p.mm.row]
        assert set(walked) == {x.mm.row, p.mm.row}   # c's pages were never walked
        assert not any(q["ksm"] for q in p.mm.pagemap(pb >> 12, 4))    # the parent unmerged
        assert not any(q["ksm"] for q in x.mm.pagemap(xb >> 12, 2))
        kids = c.mm.pagemap(pb >> 12, 4)
        assert all(q["ksm"] and q["write_protected"] for q in kids)  # the child missed
        assert c.read(pb, 4 * PAGE) == page(2) * 4
        assert_fsck(sup, [x, p, c])              # consistent: only not unmerged
        c.write(pb, b"mine")                     # COW still breaks for it alone
        assert c.read(pb, 4) == b"mine" and p.read(pb, 4) == page(2)[:4]
        sup.abandon_task(frow, fmm)
        for s in (c, p, x):
            s.exit(wait=False)
        set_run(sup, 1)                          # ksmd frees what the slow paths left it
        import helpers
        helpers.pump(sup, lambda: frames_used(cl) == 0 and not ksm.slots(cl), 30)
        assert_fsck(sup)


def test_badness_adds_half_of_each_forked_childs_total_vm():
    """2.6.32's badness(): "points += child->mm->total_vm/2 + 1" for each
    child with an mm of its own, before the CPU and run time divide (a
    pid that cannot exist -- past pid_max -- : nothing divides; a pid
    that has merely exited may be reused by another process meanwhile)."""
    from uksm.kernel import oom
    with open("/proc/sys/kernel/pid_max") as f:
        gone = int(f.read()) + 1
    assert oom.badness(100, gone) == 100
    assert oom.badness(100, gone, (10, 21)) == 100 + (5 + 1) + (10 + 1)
