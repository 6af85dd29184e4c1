"""Fidelity to 2.6.32 (issue 11, "Corrections"): each test pins one thing
the kernel did, checked against 2.6.32.67's mm/ksm.c, mm/memory.c,
mm/oom_kill.c, kernel/exit.c and the 2009 mail thread (citations in
docs/KERNEL-MAP.md and the README)."""
from __future__ import annotations

import os

import pytest

from helpers import ROOT


def read(*path: str) -> str:
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


# ---- 1. shipped's hang is Hugh's 2009 prediction, not "the 2015 race" ---------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", ["README.md", "uksm/kernel/exit.py", "docs/DESIGN.md"])
def test_shipped_hang_is_named_for_what_it_is(path):
    """The 2015 report (linux-next only) was one task deadlocking on itself
    through the OOM path; the shipped placement's hang is the one Hugh
    predicted in 2009 and seen on 4.1 stable in 2016."""
    text = read(path)
    assert "2015 race" not in text and "fixed upstream in 2015" not in text
    if path != "docs/DESIGN.md":
        assert "mmap_sem instead" in text or "mmap_sem` instead" in text


# ---- 4. the fault-path ksm_test_exit check exists under `seed` only ---------------

def cname(tag: str) -> str:
    return f"tfid{tag}{os.getpid() % 100000}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy,installs", [("seed", False), ("shipped", True), ("legacy", True)])
def test_fault_path_exit_check_only_in_the_seed(policy, installs):
    """break_ksm faulting a zapped (pte_none) entry of an exiting mm: the
    seed's do_anonymous_page check installs nothing; 2.6.32 as shipped
    (Andrea's revert: no ksm_test_exit in 2.6.32.67's mm/memory.c) and the
    code before the seed install the page -- their exit_mmap, after
    __ksm_exit, frees it."""
    from helpers import booted
    from uksm.host.log import NULL_LOG
    from uksm.kernel.exit import mm_users_zero
    from uksm.kernel.mmu import FAULT_EXITING, FAULT_OK, handle_mm_fault
    from util_machine import Space, assert_fsck
    with booted(cname("f" + policy[:2]), run=0, frames=64, va_pages=128, exit_policy=policy) as sup:
        s = Space(sup)
        base = s.mmap(2)
        mm_users_zero(sup.cl, s.mm, NULL_LOG)       # exit began: ksm_test_exit(mm)
        sup.cl.task.lock(s.mm.sem)
        try:
            r = handle_mm_fault(sup.cl, s.alloc, s.mm, base >> 12, True, True)
        finally:
            sup.cl.task.unlock(s.mm.sem)
        assert (s.pfn(base) is not None) == installs
        assert r == (FAULT_OK if installs else FAULT_EXITING)
        s.exit()
        assert_fsck(sup)


# ---- ksmd driven from the test thread --------------------------------------------

class InProcKsmd:
    """A Ksmd run by the test thread (the supervisor's task row), one batch
    at a time under ksm_thread_mutex, while the cluster's own ksmd idles
    (run=0): its scans are then deterministic."""

    def __init__(self, sup, monkeypatch) -> None:
        from uksm.host.log import NULL_LOG
        from uksm.kernel.ksmd import Ksmd
        self.sup = sup
        self.k = Ksmd(sup.cl, NULL_LOG)
        # the test's Space shares this process's cached semaphores: a slot
        # freed here must not close them under it
        monkeypatch.setattr(sup.cl, "forget_mm", lambda _mm_id: None)

    def merged_space(self, npages: int):
        """A Space with ``npages`` equal pages, MADV_MERGEABLE, merged by
        three passes: (space, base address)."""
        from uksm.kernel.syscalls import MADV_MERGEABLE
        from util_machine import Space
        s = Space(self.sup)
        base = s.mmap(npages)
        fill_same(s, base, npages)
        s.madvise(base, npages, MADV_MERGEABLE)
        self.scan(passes=3)
        return s, base

    def scan(self, n: int = 1000, passes: int = 1) -> None:
        cl = self.sup.cl
        for _ in range(passes):
            cl.task.lock(cl.daemon)
            try:
                self.k.ksm_do_scan(n)
            finally:
                cl.task.unlock(cl.daemon)


def fill_same(s, addr: int, npages: int, byte: int = 0x42) -> None:
    for i in range(npages):
        s.write(addr + i * 4096, bytes([byte]) * 4096)


# ---- 5. ksmd calls break_cow where the kernel does -----------------------------------

@pytest.mark.timeout(60)
def test_unshared_ksm_page_goes_through_break_cow(monkeypatch):
    """ksm_do_scan replaces a now-unshared KSM page by an ordinary page with
    break_cow (down_read, ksm_test_exit, find_vma, VM_MERGEABLE, break_ksm),
    not with a bare break_ksm."""
    import uksm.kernel.ksmd as ksmd_mod
    from helpers import booted
    from uksm.kernel.ksm import break_cow as real_break_cow
    from util_machine import assert_fsck, is_ksm
    calls: list[int] = []

    def spy(cl, alloc, mm, vpn, log=None):
        calls.append(vpn)
        return real_break_cow(cl, alloc, mm, vpn, log)
    monkeypatch.setattr(ksmd_mod, "break_cow", spy)
    with booted(cname("bc"), run=0, frames=64, va_pages=128) as sup:
        k = InProcKsmd(sup, monkeypatch)
        s, base = k.merged_space(2)
        assert s.pfn(base) == s.pfn(base + 4096) and is_ksm(sup.cl, s.pfn(base)), "merged"
        s.write(base + 4096, b"x")            # COW: the KSM page keeps one mapping
        k.scan()
        assert calls == [base >> 12]
        assert not is_ksm(sup.cl, s.pfn(base)), "the unshared KSM page was broken"
        s.exit(wait=False)
        k.scan(passes=2)                       # ksmd frees the slot of the exiting mm
        assert s.freed()
        assert_fsck(sup)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("advice", ["unmergeable", "munmap"])
def test_break_cow_leaves_an_area_no_longer_mergeable(advice):
    """break_cow finds the VMA again under mmap_sem: an address unmapped or
    made UNMERGEABLE since ksmd saw it is not touched."""
    from helpers import booted
    from uksm.kernel.ksm import break_cow
    from uksm.kernel.syscalls import MADV_MERGEABLE, MADV_UNMERGEABLE
    from util_machine import Space
    with booted(cname("bv" + advice[:2]), run=0, frames=64, va_pages=128) as sup:
        s = Space(sup)
        base = s.mmap(2)
        fill_same(s, base, 2)
        s.madvise(base, 2, MADV_MERGEABLE)
        assert break_cow(sup.cl, s.alloc, s.mm, base >> 12)
        if advice == "munmap":
            s.munmap(base, 2)
        else:
            s.madvise(base, 2, MADV_UNMERGEABLE)
        assert not break_cow(sup.cl, s.alloc, s.mm, base >> 12)
        s.exit()


# ---- 6. never merge in an area made UNMERGEABLE or unmapped meanwhile ------------------

@pytest.mark.timeout(120)
def test_no_merge_in_an_area_made_unmergeable_while_ksmd_scans():
    """Two mergeable areas A and B of one mm, B's pages equal to A's merged
    KSM page.  ksmd is held (a delay point: under the scheduler, a barrier
    released when nothing else can run) at the start of scan_mm with
    mmap_sem for read; MADV_UNMERGEABLE on B waits for it, ksmd lets the
    writer in, re-takes mmap_sem.  The kernel's scan_get_next_rmap_item
    does find_vma per page: B is no longer VM_MERGEABLE, nothing of it is
    merged.  (Before: ksmd went on with the area list taken before the
    drop and merged B's pages into the KSM page.)"""
    import races
    import uksm

    def script(m: uksm.Machine) -> None:
        t = m.task(pages=4, mergeable=False)
        t.fill(7)
        t.madvise(0, 2, "MERGEABLE")                        # A
        m.wait(lambda: m.ksm["pages_sharing"] == 1, what="A merged")
        m.ksm["run"] = 0
        t.madvise(2, 2, "MERGEABLE")                        # B: equal to A's KSM page
        m.arm("ksmd_scan_mmap_sem", delay_ms=600)
        m.ksm["run"] = 1                                    # ksmd's next batch: scan_mm of this mm
        m.wait(lambda: m.armed() is None, what="ksmd held with mmap_sem")
        assert t.madvise(2, 2, "UNMERGEABLE") == 0          # waits for ksmd to let the writer in
        m.wait_full_scans(2)
        assert t.stat()["ksm_merging_pages"] == 2, t.stat()  # A's two; nothing of B
    r = races.default_run(script, frames=64, max_pages=4)
    assert r.status == 0, r.failures
    st = races.steps(r.trace)
    i = races.first(st, "ksmd", "-> blocked on a delay point  [via kp:ksmd_scan_mmap_sem]")
    assert i >= 0 and any(p == "t1" and "-> blocked mmap_sem:mm1" in x for p, x in races.until(st, i, "ksmd")), \
        r.trace   # the window: ksmd held with mmap_sem, the madvise waiting for it


# ---- 7. the smaller ones ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_madv_unmergeable_interrupted_keeps_vm_mergeable(monkeypatch):
    """ksm_madvise: unmerge_ksm_pages stopped by a signal (-ERESTARTSYS)
    returns the error before "*vm_flags &= ~VM_MERGEABLE": the area keeps
    the flag (KSM pages remain in it) and madvise fails."""
    from helpers import booted
    from uksm.host.log import NULL_LOG
    from uksm.kernel.ksm import ERESTARTSYS
    from uksm.kernel.layout import VM_MERGEABLE
    from uksm.kernel.syscalls import MADV_UNMERGEABLE, KsmInterrupted, sys_madvise
    from util_machine import assert_fsck, is_ksm
    with booted(cname("mi"), run=0, frames=64, va_pages=128) as sup:
        k = InProcKsmd(sup, monkeypatch)
        s, base = k.merged_space(8)
        assert all(is_ksm(sup.cl, s.pfn(base + i * 4096)) for i in range(8))
        calls = []

        def signal_pending() -> bool:
            calls.append(1)
            return len(calls) > 3              # a signal arrives after 3 pages
        with pytest.raises(KsmInterrupted) as ei:
            sys_madvise(sup.cl, s.mm, s.alloc, base, 8 * 4096, MADV_UNMERGEABLE, NULL_LOG, signal_pending)
        assert ei.value.err == -ERESTARTSYS and ei.value.pages == 3
        vma = s.mm.find_vma(base >> 12)
        assert vma is not None and vma[3] & VM_MERGEABLE, "VM_MERGEABLE kept: KSM pages remain"
        assert is_ksm(sup.cl, s.pfn(base + 7 * 4096))
        s.madvise(base, 8, MADV_UNMERGEABLE)  # not interrupted: done, flag cleared
        assert not s.mm.find_vma(base >> 12)[3] & VM_MERGEABLE
        k.scan(passes=2)
        s.exit(wait=False)
        k.scan(passes=2)
        assert s.freed()
        assert_fsck(sup)


@pytest.mark.timeout(60)
def test_exit_noticed_after_the_loop_frees_the_slot_now(monkeypatch):
    """scan_get_next_rmap_item checks ksm_test_exit once more after its VMA
    loop: an exit that began during the walk of the last page is treated
    as no area at all -- rmap_items removed, slot freed in this pass (by
    the call after the last page: the batch that scanned it ended there)."""
    from helpers import booted
    from uksm.host.log import NULL_LOG
    from uksm.kernel.exit import mm_users_zero
    from uksm.kernel.ksmd import Ksmd
    from uksm.kernel.layout import M_SLOT_USED
    from uksm.kernel.syscalls import MADV_MERGEABLE
    from util_machine import Space, assert_fsck
    with booted(cname("al"), run=0, frames=64, va_pages=128) as sup:
        k = InProcKsmd(sup, monkeypatch)
        s = Space(sup)
        base = s.mmap(4)
        for i in range(4):
            s.write(base + i * 4096, bytes([i + 1]) * 4096)
        s.madvise(base, 4, MADV_MERGEABLE)
        k.scan(passes=2)
        real = Ksmd.cmp_and_merge_page
        last = (base >> 12) + 3

        def cmp_then_exit(self, st, vpn, pfn):
            r = real(self, st, vpn, pfn)
            if vpn == last:               # the exit begins after the last page's checks
                mm_users_zero(sup.cl, s.mm, NULL_LOG)
            return r
        monkeypatch.setattr(Ksmd, "cmp_and_merge_page", cmp_then_exit)
        k.scan(n=4)                            # this mm's 4 pages: the batch ends on them
        assert sup.cl.q[s.mm.base + M_SLOT_USED], "the cursor stays (ksm_do_scan's budget)"
        k.scan(n=1)                            # the next call finds no page: after the loop
        assert not sup.cl.q[s.mm.base + M_SLOT_USED], "slot freed in this pass"
        assert k.k.rmap_items == 0
        s.exit()
        assert_fsck(sup)


@pytest.mark.timeout(60)
def test_full_scans_is_seqnr_and_run2_resets_it():
    """full_scans_show prints ksm_scan.seqnr, which
    unmerge_and_remove_all_rmap_items sets to 0."""
    from helpers import booted
    from uksm.kernel.layout import L_SEQNR
    from uksm.kernel.syscalls import MADV_MERGEABLE
    from util_machine import Space, ksm_stats, set_run, wait_full_scans
    with booted(cname("fs"), run=1, frames=64, va_pages=128, pages_to_scan=100, sleep_ms=1) as sup:
        s = Space(sup)
        base = s.mmap(4)
        fill_same(s, base, 4)
        s.madvise(base, 4, MADV_MERGEABLE)
        st = wait_full_scans(sup, 3)
        assert st["full_scans"] >= 3
        set_run(sup, 2)
        assert ksm_stats(sup.cl)["full_scans"] == 0 == sup.cl.q[L_SEQNR]
        s.exit(wait=False)
        set_run(sup, 1)
        from helpers import pump
        pump(sup, s.freed, what="slot freed")


@pytest.mark.timeout(60)
def test_one_batch_never_counts_two_full_scans(tmp_path):
    """ksm_do_scan returns when scan_get_next_rmap_item comes back to the
    list head (seqnr++, return NULL): however large pages_to_scan, one
    batch ends at the end of a full scan.  (uksm used to wrap on within the
    batch: dozens of full scans in a millisecond, which made "wait for two
    full scans" meaningless.)"""
    import glob
    import json

    from helpers import booted
    from uksm.kernel.syscalls import MADV_MERGEABLE
    from util_machine import Space, wait_full_scans
    with booted(cname("wrap"), str(tmp_path), run=1, frames=64, va_pages=128,
                pages_to_scan=10000, sleep_ms=5) as sup:
        s = Space(sup)
        base = s.mmap(4)
        fill_same(s, base, 4)
        s.madvise(base, 4, MADV_MERGEABLE)
        wait_full_scans(sup, 4)
    per_batch, n = [], -1
    (path,) = glob.glob(str(tmp_path / "ksmd-*.jsonl"))
    with open(path) as f:
        for line in f:
            ev = json.loads(line)["event"]
            if ev == "scan_batch_start":
                n = 0
            elif ev == "full_scan" and n >= 0:
                n += 1
            elif ev == "scan_batch_end" and n >= 0:
                per_batch.append(n)
                n = -1
    assert sum(per_batch) >= 4 and max(per_batch) == 1, per_batch


@pytest.mark.timeout(60)
def test_writing_the_same_run_twice_does_nothing():
    """run_store: "if (ksm_run != flags)": a second run=2 is not a second
    unmerge (no new request for ksmd)."""
    from helpers import booted
    from uksm.kernel.ksm import run_store
    from uksm.kernel.layout import K_RUN_DONE, K_RUN_SEQ
    from util_machine import set_run
    with booted(cname("r2"), run=1, frames=64, va_pages=128) as sup:
        q = sup.cl.q
        set_run(sup, 2)
        seq = q[K_RUN_SEQ]
        assert run_store(sup.cl, 2) == (seq, 0) and seq == q[K_RUN_SEQ] == q[K_RUN_DONE]
        set_run(sup, 1)
        assert q[K_RUN_SEQ] == seq + 1


@pytest.mark.timeout(60)
def test_legacy_cursor_step_to_the_head_bumps_seqnr():
    """The pre-seed __ksm_exit (removed by the seed's diff): when the cursor
    steps off the exiting mm onto ksm_mm_head, "ksm_scan.seqnr++"."""
    from helpers import booted
    from uksm.kernel.layout import L_SCAN_SLOT, L_SEQNR
    from uksm.kernel.syscalls import MADV_MERGEABLE
    from util_machine import Space
    with booted(cname("lc"), run=0, frames=64, va_pages=128, exit_policy="legacy") as sup:
        q = sup.cl.q
        s = Space(sup)
        base = s.mmap(2)
        s.madvise(base, 2, MADV_MERGEABLE)
        sup.cl.task.lock(sup.cl.mmlist)
        q[L_SCAN_SLOT] = s.mm.row                # ksmd's cursor on the only mm
        sup.cl.task.unlock(sup.cl.mmlist)
        before = q[L_SEQNR]
        s.exit()
        assert q[L_SCAN_SLOT] == sup.cl.head and q[L_SEQNR] == before + 1


@pytest.mark.timeout(60)
def test_live_fsck_under_legacy_after_exit_freed_a_slot():
    """Legacy __ksm_exit frees the slot (and, in the kernel, its rmap_items)
    under ksm_thread_mutex; ksmd's published counters catch up at its next
    batch.  A live fsck in between is not an rmap_items mismatch."""
    from helpers import booted, pump
    from uksm.kernel.layout import M_RMAP_ITEMS
    from uksm.kernel.syscalls import MADV_MERGEABLE
    from util_machine import Space, fsck_errors
    with booted(cname("lf"), run=1, frames=64, va_pages=128, pages_to_scan=100, sleep_ms=1,
                exit_policy="legacy") as sup:
        s = Space(sup)
        base = s.mmap(4)
        for i in range(4):
            s.write(base + i * 4096, bytes([i + 1]) * 4096)
        s.madvise(base, 4, MADV_MERGEABLE)
        pump(sup, lambda: sup.cl.q[s.mm.base + M_RMAP_ITEMS] == 4, what="rmap_items published")
        sup.stop_ksmd()                           # the window stays open
        s.exit(wait=False)
        assert fsck_errors(sup, [s]) == []


# ---- 2. the OOM killer's victim choice, by version ---------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule,second_kill", [("2.6.32", True), ("4.1", False)])
def test_oom_victim_stuck_in_mmput_by_rule(rule, second_kill, monkeypatch):
    """A victim whose exit has begun (mm released: 2.6.32's exit_mm set
    tsk->mm = NULL before mmput) but has not freed its pages, stuck as in
    __ksm_exit.  2.6.32's select_bad_process skips it ("if (!p->mm)
    continue;" before the TIF_MEMDIE test) and kills another task; 4.1's
    oom_scan_process_thread sees TIF_MEMDIE first and kills nobody."""
    from helpers import booted
    from uksm.host.log import NULL_LOG
    from uksm.kernel import oom
    from uksm.kernel.exit import mm_users_zero
    from uksm.kernel.layout import M_OOM_VICTIM, M_OWNER_PID, stats_block
    from util_machine import Space
    sent: list[int] = []
    from types import SimpleNamespace
    monkeypatch.setattr(oom, "os", SimpleNamespace(kill=lambda pid, sig: sent.append(pid)))
    with booted(cname("oo" + rule[0]), run=0, frames=64, va_pages=128, oom_rule=rule) as sup:
        q = sup.cl.q
        stuck, other = Space(sup), Space(sup)
        for s, n in ((stuck, 6), (other, 2)):
            base = s.mmap(n)
            for i in range(n):
                s.write(base + i * 4096, b"\x01")
        q[stuck.mm.base + M_OWNER_PID] = 999_001
        q[other.mm.base + M_OWNER_PID] = 999_002
        assert oom.out_of_memory(sup.cl, sup.cl.task, sup.log) == 999_001   # the biggest first
        assert q[stuck.mm.base + M_OOM_VICTIM]
        mm_users_zero(sup.cl, stuck.mm, NULL_LOG)                   # its exit began, pages not freed
        got = oom.out_of_memory(sup.cl, sup.cl.task, sup.log)
        assert got == (999_002 if second_kill else 0)
        assert sent == ([999_001, 999_002] if second_kill else [999_001])
        assert stats_block(q)["oom_killed"] == (2 if second_kill else 1)
        for s in (stuck, other):
            q[s.mm.base + M_OWNER_PID] = 0
            s.exit()


# ---- 3. the writer of run unmerges, and can be interrupted -------------------------------

@pytest.mark.timeout(120)
def test_run2_writer_interrupted_sets_run_back():
    """run_store in the writer's context: a signal while it unmerges (the
    writer held at kp:ksmd_break_ksm_window: a barrier under the
    scheduler) makes unmerge_ksm_pages return -ERESTARTSYS; run goes back
    to 0 and the write fails ("interrupted").  Then run=1 merges again."""
    import signal

    import races
    import uksm

    def script(m: uksm.Machine) -> None:
        t = m.task(pages=4)
        t.fill(7)
        m.wait(lambda: m.ksm["pages_sharing"] == 3, what="merged")
        m.arm("ksmd_break_ksm_window", delay_ms=500)
        with m.race():
            m.ksm["run"] = 2                                  # the writer unmerges
            m.wait(lambda: m.armed() is None, what="the writer in the window")
            w = m._tr.world                                   # (the supervisor's view)
            writer = next(p for p in w.procs.values() if p.role == "writer" and not p.status)
            w.deliver(writer.pid, signal.SIGTERM)             # a signal for the writer
        assert m.ksm["run"] == 0
        m.ksm["run"] = 1
        m.wait(lambda: m.ksm["pages_sharing"] == 3, what="merged again")
    r = races.default_run(script, frames=64, max_pages=4)
    assert r.status == 0, r.failures
    assert r.outcome.report["run_store"] == {"value": 1, "result": "done", "run": 1}
    st = races.steps(r.trace)
    assert races.first(st, "writer(2)", "-> blocked on a delay point  [via kp:ksmd_break_ksm_window]") >= 0
    assert races.first(st, "writer(2)", "-> exit") > races.first(st, "writer(2)", "delay point")


# ---- issue 27, 6: a dead unstable-tree entry ends the search ---------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("advice", ["dontneed", "unmergeable"])
def test_dead_unstable_entry_ends_the_search_nothing_inserted(monkeypatch, advice):
    """unstable_tree_search_insert: "page2[0] = get_mergeable_page(
    tree_rmap_item); if (!page2[0]) return NULL;" -- nothing inserted.
    Three equal pages a, b, c in one pass; a's entry dies between a and b:
    b is not inserted, so c finds a's dead entry too and nothing merges
    this pass; the next pass merges b and c.  The entry dies by DONTNEED
    (no page: follow_page) or by MADV_UNMERGEABLE, which leaves a's page
    in place but its area no longer VM_MERGEABLE: get_mergeable_page's
    "if (!vma || !(vma->vm_flags & VM_MERGEABLE)) goto out"."""
    from helpers import booted
    from uksm.kernel.layout import S_COW_KSMD
    from uksm.kernel.syscalls import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE
    from util_machine import Space
    with booted(cname(f"dead{advice[0]}"), run=0, frames=64, va_pages=128) as sup:
        k = InProcKsmd(sup, monkeypatch)
        spaces = []
        for _ in range(3):
            s = Space(sup)
            base = s.mmap(1)
            fill_same(s, base, 1)
            s.madvise(base, 1, MADV_MERGEABLE)
            spaces.append((s, base))
        k.scan(passes=2)                          # checksums; then a, b, c: a and b merge
        a, _ = spaces[0]
        assert k.k.pages_shared == 1 and k.k.pages_sharing == 2
        for s, base in spaces:                    # COW-break all three: the KSM page goes
            s.write(base, bytes([0x42]) * 4096)
        k.scan()                                  # out of the stable tree: checksums again
        k.scan(n=1)                               # the wrap, then a: into the unstable tree
        assert k.k.pages_unshared >= 1
        s, base = spaces[0]
        s.madvise(base, 1, MADV_DONTNEED if advice == "dontneed" else MADV_UNMERGEABLE)
        cows = sup.cl.q[S_COW_KSMD]
        k.scan(n=2)                               # b, c: each meets a's dead entry
        assert k.k.pages_shared == 0 and k.k.pages_sharing == 0
        # no merge tried, none undone: a merge into a's page would fail in
        # try_to_merge_one_page and break_cow b's page back
        assert sup.cl.q[S_COW_KSMD] == cows
        k.scan(passes=2)                          # the pass ends; the next merges b and c
        assert k.k.pages_shared == 1 and k.k.pages_sharing == 1
        for s, _ in spaces:
            s.exit(wait=False)
        k.scan(passes=2)                          # ksmd frees what the slow paths left it
        for s, _ in spaces:
            assert s.freed()


# ---- issue 27, 8 and 9: max_map_count and madvise's edge cases -------------------------

@pytest.mark.timeout(60)
def test_split_past_max_map_count_is_eagain_and_the_task_lives():
    """split_vma: "if (mm->map_count >= sysctl_max_map_count) return
    -ENOMEM;", which madvise_behavior returns as -EAGAIN and munmap as
    -ENOMEM; the table is as it was, the task goes on."""
    from helpers import booted
    from uksm.errors import SyscallError
    from uksm.kernel.syscalls import MADV_MERGEABLE, MADV_UNMERGEABLE
    from util_machine import Space
    with booted(cname("mmc"), run=0, frames=64, va_pages=128) as sup:
        s = Space(sup)
        base = s.mmap(8)
        s.madvise(base, 8, MADV_MERGEABLE)
        assert s.mm.max_map_count == 128
        s.mm.max_map_count = 3
        s.madvise(base + 2 * 4096, 1, MADV_UNMERGEABLE)      # 3 areas
        before = s.mm.vmas()
        with pytest.raises(SyscallError, match="EAGAIN") as ei:
            s.madvise(base + 5 * 4096, 1, MADV_UNMERGEABLE)
        assert ei.value.errno_name == "EAGAIN" and s.mm.vmas() == before
        with pytest.raises(SyscallError, match="ENOMEM"):
            s.munmap(base + 6 * 4096, 1)
        assert s.mm.vmas() == before
        s.write(base + 7 * 4096, b"alive")
        s.exit()


@pytest.mark.timeout(60)
def test_vma_rows_are_backed_as_they_are_made(monkeypatch):
    """The VMA table, sized for one row per page, costs /dev/shm the rows in
    use (SEG_VMA_TOP): every row made is backed first, a page at a time; a
    row /dev/shm has no room for is -ENOMEM (vm_area_alloc), -EAGAIN from
    madvise, and the table is as it was."""
    from helpers import booted
    from uksm.errors import SyscallError
    from uksm.kernel.layout import SEG_NVMA, SEG_VMA_TOP, VMA_SIZE
    from uksm.kernel.syscalls import MADV_MERGEABLE, MADV_UNMERGEABLE
    from util_machine import Space
    with booted(cname("vmab"), run=0, frames=512, va_pages=1024) as sup:
        s = Space(sup)
        pq = s.mm.pq
        assert pq[SEG_VMA_TOP] == 0                          # nothing made, nothing backed
        base = s.mmap(900)
        per_page = 4096 // (VMA_SIZE * 8)
        assert 1 == pq[SEG_NVMA] <= pq[SEG_VMA_TOP] <= per_page + 1
        s.madvise(base, 900, MADV_MERGEABLE)
        i = 0
        while i < 400:                                      # 400 areas: three pages of rows
            s.madvise(base + i * 4096, 1, MADV_UNMERGEABLE)
            assert pq[SEG_NVMA] <= pq[SEG_VMA_TOP]
            i += 2
        assert pq[SEG_NVMA] == 400 and pq[SEG_VMA_TOP] < 400 + per_page + 1
        top = pq[SEG_VMA_TOP]
        seg_t, off0 = type(s.mm.seg), s.mm.vma_off * 8
        orig = seg_t.populate                               # /dev/shm full for VMA rows
        monkeypatch.setattr(seg_t, "populate", lambda seg, off, n: off < off0 and orig(seg, off, n))
        with pytest.raises(SyscallError, match="EAGAIN"):   # the backed rows used, then a split fails
            while i < 900:
                before = s.mm.vmas()
                s.madvise(base + i * 4096, 1, MADV_UNMERGEABLE)
                i += 2
        assert pq[SEG_VMA_TOP] == top and s.mm.vmas() == before and top - 1 <= pq[SEG_NVMA] <= top
        with pytest.raises(SyscallError, match="ENOMEM"):
            for _ in range(2):
                s.mmap(1)
        assert pq[SEG_NVMA] == top
        monkeypatch.undo()
        s.write(base, b"alive")
        s.exit()


@pytest.mark.timeout(60)
def test_madvise_over_a_hole_and_of_length_zero():
    """sys_madvise: over a hole the advice goes to the mapped parts, then
    -ENOMEM; a length of 0 returns 0 (2.6.32.67 mm/madvise.c)."""
    from helpers import booted
    from uksm.errors import SyscallError
    from uksm.kernel.layout import VM_MERGEABLE
    from uksm.kernel.syscalls import MADV_DONTNEED, MADV_MERGEABLE, sys_madvise
    from util_machine import Space
    with booted(cname("hole"), run=0, frames=64, va_pages=128) as sup:
        s = Space(sup)
        base = s.mmap(6)
        s.munmap(base + 2 * 4096, 2)                         # a hole: pages 2, 3
        assert sys_madvise(sup.cl, s.mm, s.alloc, base, 0, MADV_MERGEABLE) == 0
        with pytest.raises(SyscallError, match="EINVAL"):
            sys_madvise(sup.cl, s.mm, s.alloc, base + 1, 4096, MADV_MERGEABLE)
        with pytest.raises(SyscallError, match="ENOMEM"):
            s.madvise(base, 6, MADV_MERGEABLE)
        assert [f & VM_MERGEABLE for (_i, _s, _e, f) in s.mm.vmas()] == [VM_MERGEABLE] * 2
        s.write(base + 5 * 4096, b"x")
        with pytest.raises(SyscallError, match="ENOMEM"):
            s.madvise(base, 6, MADV_DONTNEED)
        assert s.pfn(base + 5 * 4096) is None                 # zapped all the same
        s.exit()
