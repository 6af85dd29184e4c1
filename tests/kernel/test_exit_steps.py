"""The exit path's steps, in-process (issue 16, mutation survivors of
exit.py): mmput runs each step of exit_mmap and ksm_exit exactly once, in
the order of the cluster's exit policy, records each in M_EXIT_STAGE, and
a second pass (the reaper finishing a task killed half-way) does only what
is left.  munlock_vma_pages_all faults in the VM_LOCKED areas' absent
pages and only those; free_pgtables destroys the VMA table and the page
table.

Each test acts from the test thread as the task (util_machine.Space), with
ksmd stopped (run=0), and spies on the steps through the module's own
names (``uksm.kernel.exit.free_pgtables`` ...), calling the real step each time.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import RecLog, booted
from uksm.host.log import NULL_LOG
from uksm.kernel import exit as xmod
from uksm.kernel.layout import (
    EXIT_POLICIES,
    H_EXIT_POLICY,
    L_SCAN_ADDR,
    L_SCAN_SLOT,
    M_EXIT_STAGE,
    M_OOM_VICTIM,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    MMS_EXITING,
    MMS_LIVE,
    MMS_ZOMBIE,
    P_FAST,
    P_LEGACY,
    P_SLOW,
    PT_OFF,
    PTE_PRESENT,
    SEG_NVMA,
    SEG_VMAS_FREED,
    T_EXIT_PROGRESS,
    VM_LOCKED,
    VMA_SIZE,
    XS_KSM_EXIT,
    XS_PGTABLES,
    XS_USERS0,
    XS_ZAPPED,
)
from util_machine import PAGE, Space, assert_fsck, frames_used, set_run

pytestmark = pytest.mark.timeout(60)

ALL = XS_USERS0 | XS_ZAPPED | XS_KSM_EXIT | XS_PGTABLES


def cname(tag: str) -> str:
    return f"txst{tag}{os.getpid() % 100000}"


class Steps:
    """Spies on exit.py's steps: (step, M_EXIT_STAGE at the call, args)."""

    def __init__(self, mp: pytest.MonkeyPatch, cl: Any) -> None:
        self.calls: list[tuple[str, int, tuple]] = []
        self.cl = cl
        for name in ("mm_users_zero", "exit_mmap_unmap", "free_pgtables", "__ksm_exit",
                     "mmdrop", "munlock_vma_pages_all"):
            mp.setattr(xmod, name, self._spy(name, getattr(xmod, name)))

    def _spy(self, name: str, real: Any) -> Any:
        def spy(cl: Any, mm: Any, *a: Any, **kw: Any) -> Any:
            stage = cl.q[cl.mbase(mm.row if hasattr(mm, "row") else mm) + M_EXIT_STAGE]
            self.calls.append((name, stage, a))
            return real(cl, mm, *a, **kw)
        return spy

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def machine() -> Iterator[Any]:
    with booted(cname(str(os.getpid() % 7)), run=0, frames=64, va_pages=64) as sup:
        yield sup


def _mergeable_space(sup: Any, npages: int = 3) -> tuple[Space, int]:
    s = Space(sup)
    a = s.mmap(npages)
    s.fill(a, [bytes([i + 1]) * PAGE for i in range(npages)])
    s.mergeable(a, npages)
    assert sup.cl.q[s.mm.base + M_SLOT_USED], "MADV_MERGEABLE gave the mm a slot"
    return s, a


def _policy(sup: Any, policy: str) -> None:
    sup.cl.q[H_EXIT_POLICY] = EXIT_POLICIES.index(policy)


@pytest.mark.parametrize("policy", EXIT_POLICIES)
def test_mmput_steps_in_the_policys_order(machine: Any, policy: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """seed: pages freed before __ksm_exit (the OOM fix); shipped and
    legacy: __ksm_exit first; legacy's __ksm_exit takes ksm_thread_mutex
    (its ``legacy`` argument).  Every step once; mmdrop last, with every
    other step recorded."""
    sup = machine
    _policy(sup, policy)
    s, a = _mergeable_space(sup)
    used = frames_used(sup.cl)
    st = Steps(monkeypatch, sup.cl)
    log = RecLog()
    s.exited = True
    path = xmod.mmput(sup.cl, s.mm, s.alloc, log)
    s.alloc.flush()
    s.exit()
    # each step logged with this logger (mmdrop: the slot's, then the users')
    assert [e for e, _f in log.events] == ["mm_exit_begin", "ksm_exit", "mmdrop", "mmdrop", "mm_freed"]
    assert [f.get("ref") for _e, f in log.events[2:4]] == ["ksm", "users"]
    ksm_first = policy != "seed"
    order = (["mm_users_zero", "__ksm_exit", "exit_mmap_unmap", "munlock_vma_pages_all"] if ksm_first
             else ["mm_users_zero", "exit_mmap_unmap", "munlock_vma_pages_all", "__ksm_exit"])
    assert st.names() == order + ["free_pgtables", "mmdrop"]
    stage = {n: sg for n, sg, _a in st.calls}
    args = {n: a for n, _sg, a in st.calls}
    assert stage["mm_users_zero"] == 0
    # under the seed the pages are gone when __ksm_exit runs
    assert stage["__ksm_exit"] == (XS_USERS0 if ksm_first else XS_USERS0 | XS_ZAPPED)
    assert args["__ksm_exit"][0] is (policy == "legacy")
    assert args["__ksm_exit"][2] == policy
    assert stage["free_pgtables"] == XS_USERS0 | XS_ZAPPED | XS_KSM_EXIT
    assert stage["mmdrop"] == ALL
    assert path == (P_LEGACY if policy == "legacy" else P_FAST)
    assert frames_used(sup.cl) == used - 3 and s.freed()
    assert_fsck(sup)


def test_ksm_exit_runs_once_and_only_with_a_slot(machine: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """ksm_exit is recorded (XS_KSM_EXIT) and not repeated: after a slow
    path the slot is still there (ksmd frees it), so a second __ksm_exit
    would move it and take mmap_sem again."""
    sup = machine
    cl = sup.cl
    s, a = _mergeable_space(sup)
    cl.task.lock(cl.mmlist)
    cl.q[L_SCAN_SLOT] = s.mm.row     # ksmd's cursor is on this mm: the slow path
    cl.q[L_SCAN_ADDR] = 0
    cl.task.unlock(cl.mmlist)
    st = Steps(monkeypatch, cl)
    log = NULL_LOG
    assert xmod.mm_users_zero(cl, s.mm, log) is True
    assert xmod.mm_users_zero(cl, s.mm, log) is False      # idempotent
    assert xmod.ksm_exit(cl, s.mm, "seed", log) == P_SLOW
    assert cl.q[s.mm.base + M_EXIT_STAGE] == XS_USERS0 | XS_KSM_EXIT
    assert cl.q[s.mm.base + M_SLOT_USED], "the slow path leaves the slot to ksmd"
    assert xmod.ksm_exit(cl, s.mm, "seed", log) == 0        # done: not again
    assert st.names().count("__ksm_exit") == 1
    # the rest of the exit does only what is left
    s.exited = True
    assert xmod.mmput(cl, s.mm, s.alloc, log) == 0
    s.alloc.flush()
    assert st.names().count("__ksm_exit") == 1
    assert st.names()[-2:] == ["free_pgtables", "mmdrop"]
    assert cl.q[s.mm.base + M_STATE] == MMS_ZOMBIE   # waiting for ksmd to free the slot
    set_run(sup, 1)                 # ksmd frees the slot, drops the last mm_count
    s.exit()
    set_run(sup, 0)
    # an mm that never had a slot: ksm_exit marks the step, __ksm_exit is not called
    t = Space(sup)
    t.write(t.mmap(1), b"x")
    assert not cl.q[t.mm.base + M_SLOT_USED]
    n = st.names().count("__ksm_exit")
    assert t.exit() == 0
    assert st.names().count("__ksm_exit") == n
    assert_fsck(sup)


@pytest.mark.parametrize("done", [XS_USERS0, XS_USERS0 | XS_ZAPPED,
                                  XS_USERS0 | XS_ZAPPED | XS_KSM_EXIT, ALL])
def test_mmput_after_a_half_done_exit_does_only_what_is_left(machine: Any, done: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper's second pass: the steps a killed task finished are
    recorded and skipped, the others run once."""
    sup = machine
    s, a = _mergeable_space(sup)
    log = NULL_LOG
    cl, mm = sup.cl, s.mm
    xmod.mm_users_zero(cl, mm, log)
    if done & XS_ZAPPED:
        xmod.exit_mmap_unmap(cl, mm, s.alloc, log)
    if done & XS_KSM_EXIT:
        xmod.ksm_exit(cl, mm, "seed", log)
    if done & XS_PGTABLES:
        xmod.free_pgtables(cl, mm)
    assert cl.q[mm.base + M_EXIT_STAGE] == done
    st = Steps(monkeypatch, cl)
    s.exit()
    names = st.names()
    assert names.count("exit_mmap_unmap") == (0 if done & XS_ZAPPED else 1)
    assert names.count("__ksm_exit") == (0 if done & XS_KSM_EXIT else 1)
    assert names.count("free_pgtables") == (0 if done & XS_PGTABLES else 1)
    assert names.count("mmdrop") == 1 and s.freed()
    assert_fsck(sup)


def test_exit_mmap_unmap_and_free_pgtables(machine: Any) -> None:
    """The two halves of exit_mmap, each checked for what it leaves."""
    sup = machine
    cl = sup.cl
    s = Space(sup)
    a, b = s.mmap(3), s.mmap(2)
    s.fill(a, [b"\x07" * PAGE] * 3)
    s.write(b, b"y")
    used = frames_used(cl)
    cl.q[s.mm.base + M_OOM_VICTIM] = 1
    log = NULL_LOG
    xmod.mm_users_zero(cl, s.mm, log)
    xmod.exit_mmap_unmap(cl, s.mm, s.alloc, log)
    s.alloc.flush()
    assert cl.q[s.mm.base + M_EXIT_STAGE] == XS_USERS0 | XS_ZAPPED
    assert cl.q[s.mm.base + M_OOM_VICTIM] == 0   # the memory it was killed for is back
    assert frames_used(cl) == used - 4 and s.rss() == 0
    assert not any(s.mm.pq[PT_OFF + v] & PTE_PRESENT for v in range(cl.va_pages))
    assert len(s.mm.vmas()) == 2                 # VMAs stay until free_pgtables
    s.mm.pq[PT_OFF + 5] = 1234                   # a stray PTE is dropped with the table
    xmod.ksm_exit(cl, s.mm, "seed", log)
    xmod.free_pgtables(cl, s.mm)
    pq = s.mm.pq
    assert cl.q[s.mm.base + M_EXIT_STAGE] == ALL
    assert pq[SEG_VMAS_FREED] == 1
    assert pq[SEG_NVMA] == 0                      # mm->map_count: no area left
    assert all(pq[PT_OFF + v] == 0 for v in range(cl.va_pages))
    s.exit()
    assert s.freed()


def test_munlock_faults_in_only_the_locked_areas(machine: Any) -> None:
    """munlock_vma_pages_all: each absent page of a VM_LOCKED area is
    faulted in for read (get_user_pages; a read-only area too),
    T_EXIT_PROGRESS bumped once per page, the flag cleared; an area that
    is not locked is left alone."""
    from uksm.kernel.layout import VM_READ
    from uksm.kernel.syscalls import sys_mmap
    sup = machine
    cl = sup.cl
    s = Space(sup)
    locked, plain = s.mmap(3), s.mmap(2)
    ro = sys_mmap(cl, s.mm, 2 * PAGE, VM_READ)
    s.write(locked + PAGE, b"z")        # one page of the locked area present already
    vmas = {st: (i, f) for (i, st, _e, f) in s.mm.vmas()}
    for a in (locked, ro):
        i, f = vmas[a >> 12]
        s.mm.set_vma_flags(i, f | VM_LOCKED)
    prog = cl.q[cl.task.base + T_EXIT_PROGRESS]
    xmod.munlock_vma_pages_all(cl, s.mm, s.alloc)
    assert [s.pfn(locked + k * PAGE) is not None for k in range(3)] == [True] * 3
    assert [s.pfn(ro + k * PAGE) is not None for k in range(2)] == [True] * 2
    assert [s.pfn(plain + k * PAGE) for k in range(2)] == [None, None]
    assert cl.q[cl.task.base + T_EXIT_PROGRESS] == prog + 5
    flags = {st: f for (_i, st, _e, f) in s.mm.vmas()}
    for a in (locked, ro):
        assert flags[a >> 12] == vmas[a >> 12][1]   # VM_LOCKED gone, nothing else changed
    assert s.read(locked + PAGE, 1) == b"z"
    # done: a second pass has nothing locked left
    xmod.munlock_vma_pages_all(cl, s.mm, s.alloc)
    assert cl.q[cl.task.base + T_EXIT_PROGRESS] == prog + 5
    s.exit()
    assert_fsck(sup)


def test_mm_users_zero(machine: Any) -> None:
    """atomic_dec_and_test(&mm->mm_users): mm_users 0, the mm EXITING,
    XS_USERS0, the event logged once; the pte lock and the list lock
    given back (or the caller's pte lock kept); a freed or reused row
    (another mm id) is not touched."""
    sup = machine
    cl = sup.cl
    q = cl.q
    s = Space(sup)
    s.write(s.mmap(1), b"u")
    b = s.mm.base
    assert q[b + M_USERS] >= 1 and q[b + M_STATE] == MMS_LIVE
    log = RecLog()
    # a stale MM whose row now holds another mm id: nothing done
    real_id = s.mm.id
    s.mm.id = real_id + 1000
    try:
        assert xmod.mm_users_zero(cl, s.mm, log) is False
    finally:
        s.mm.id = real_id
    assert q[b + M_STATE] == MMS_LIVE and q[b + M_EXIT_STAGE] == 0 and log.events == []
    assert not cl.task.holds(s.mm.ptl) and not cl.task.holds(cl.mmlist)
    ptl_value = s.mm.ptl.sem.value
    held_inside: list[bool] = []

    class PtlLog(RecLog):
        def info(self, event: str, **fields: Any) -> None:
            held_inside.append(cl.task.holds(s.mm.ptl))
            super().info(event, **fields)

    log = PtlLog()
    assert xmod.mm_users_zero(cl, s.mm, log) is True
    assert held_inside == [True], "the event is logged under the mm's pte lock"
    assert (q[b + M_USERS], q[b + M_STATE], q[b + M_EXIT_STAGE]) == (0, MMS_EXITING, XS_USERS0)
    assert log.events == [("mm_exit_begin", {"mm": real_id})]
    assert s.mm.ptl.sem.value == ptl_value and cl.mmlist.sem.value == 1
    assert not cl.task.holds(s.mm.ptl) and not cl.task.holds(cl.mmlist)
    assert xmod.mm_users_zero(cl, s.mm, log) is False
    assert len(log.events) == 1
    s.exit()
    # with the caller holding the pte lock (ptl_held): it stays held
    t = Space(sup)
    t.write(t.mmap(1), b"v")
    cl.task.lock(t.mm.ptl)
    try:
        assert xmod.mm_users_zero(cl, t.mm, log, ptl_held=True) is True
        assert cl.task.holds(t.mm.ptl) and t.mm.ptl.sem.value == 0
    finally:
        cl.task.unlock(t.mm.ptl)
    assert t.mm.ptl.sem.value == 1
    assert [e for e, _f in log.events] == ["mm_exit_begin", "mm_exit_begin"]
    t.exit()
    assert_fsck(sup)


def test_free_pgtables_clears_a_multi_page_table() -> None:
    """With 1024 pages the page table runs past the segment's first page:
    the words up to that page are zeroed, the rest punched; every PTE
    reads 0 after, whatever was there."""
    with booted(cname("big"), run=0, frames=64, va_pages=1024) as sup:
        cl = sup.cl
        s = Space(sup)
        a = s.mmap(8)
        s.fill(a, [b"\x09" * PAGE] * 8)
        log = NULL_LOG
        xmod.mm_users_zero(cl, s.mm, log)
        xmod.exit_mmap_unmap(cl, s.mm, s.alloc, log)
        s.alloc.flush()
        xmod.ksm_exit(cl, s.mm, "seed", log)
        pq = s.mm.pq
        assert len(pq) == s.mm.vma_off + s.mm.max_map_count * VMA_SIZE and len(pq) * 8 > PAGE
        for i in range(PT_OFF, len(pq)):   # whatever a buggy COW break left
            pq[i] = 3 + (i << 2)
        head = list(pq[:PT_OFF])
        xmod.free_pgtables(cl, s.mm)
        assert [i for i in range(PT_OFF, len(pq)) if pq[i]] == []
        assert list(pq[:SEG_NVMA]) == head[:SEG_NVMA] and pq[SEG_NVMA] == 0 and pq[SEG_VMAS_FREED] == 1
        assert cl.q[s.mm.base + M_EXIT_STAGE] == ALL
        s.exit()
        assert_fsck(sup)


def test_exit_of_a_locked_area_under_shipped(machine: Any) -> None:
    """exit_mmap munlocks first: under ``shipped`` (no ksm_test_exit in
    the fault path) the locked area's absent pages are faulted in with
    the exiting task's allocator, then freed with the rest."""
    sup = machine
    _policy(sup, "shipped")
    s = Space(sup)
    a = s.mmap(2)
    s.write(a, b"L")
    (i, _st, _e, f), = [v for v in s.mm.vmas() if v[1] == a >> 12]
    s.mm.set_vma_flags(i, f | VM_LOCKED)
    used = frames_used(sup.cl)
    prog = sup.cl.q[sup.cl.task.base + T_EXIT_PROGRESS]
    s.exit()
    assert sup.cl.q[sup.cl.task.base + T_EXIT_PROGRESS] == prog + 2
    assert frames_used(sup.cl) == used - 1 and s.freed()
    assert_fsck(sup)


def test_legacy_ksm_exit_removes_the_slot_and_steps_the_cursor(machine: Any) -> None:
    """__ksm_exit before the seed (legacy, under ksm_thread_mutex): the
    slot is unlinked and freed there and then (M_SLOT_USED, M_SLOT_RMAP,
    MMF_VM_MERGEABLE cleared; the path recorded in the mm and the task;
    S_EXIT_LEGACY counted); a cursor on it steps to the next slot, and to
    the head with ``ksm_scan.seqnr++`` when it was the last.  An mm with
    no slot: 0, nothing changed, both locks given back."""
    from uksm.kernel import ksm as kmod
    from uksm.kernel.layout import (
        H_KSM_UNSYNCED,
        L_SEQNR,
        M_EXIT_PATH,
        M_FLAGS,
        M_SLOT_RMAP,
        MMF_VM_MERGEABLE,
        S_EXIT_LEGACY,
        T_EXIT_PATH,
    )
    sup = machine
    cl = sup.cl
    q = cl.q
    sup.stop_ksmd()    # run is 0: nothing for it to do; and nobody else publishes the counters
    sp = [_mergeable_space(sup, 1)[0] for _ in range(3)]
    rows = [s.mm.row for s in sp]
    assert kmod.slots(cl) == rows
    nul = NULL_LOG
    steps = ((1, rows[2], 0, [rows[0], rows[2]]), (2, cl.head, 1, [rows[0]]))
    for k, (victim, nxt, bump, left) in enumerate(steps):
        s = sp[victim]
        b = s.mm.base
        cl.task.lock(cl.mmlist)
        q[L_SCAN_SLOT] = s.mm.row
        q[L_SCAN_ADDR] = 77
        q[L_SEQNR] = 5 + k
        q[b + M_SLOT_RMAP] = 3          # rmap_items ksmd had
        cl.task.unlock(cl.mmlist)
        q[b + M_FLAGS] |= 1 << 20       # another flag, kept
        flags = q[b + M_FLAGS]
        assert flags & MMF_VM_MERGEABLE
        q[H_KSM_UNSYNCED] = 7 + k       # not zero: "+= 1" is told from "= 1"
        seqnr, legacy0 = q[L_SEQNR], q[S_EXIT_LEGACY]
        q[cl.task.base + T_EXIT_PATH] = 0
        xmod.mm_users_zero(cl, s.mm, nul)
        assert kmod.__ksm_exit(cl, s.mm, True, nul, "legacy") == P_LEGACY
        assert (q[L_SCAN_SLOT], q[L_SCAN_ADDR], q[L_SEQNR]) == (nxt, 0, seqnr + bump)
        assert kmod.slots(cl) == left
        assert (q[b + M_SLOT_USED], q[b + M_SLOT_RMAP]) == (0, 0)
        assert q[b + M_FLAGS] == flags & ~MMF_VM_MERGEABLE
        assert q[b + M_EXIT_PATH] == P_LEGACY and q[cl.task.base + T_EXIT_PATH] == P_LEGACY
        assert q[S_EXIT_LEGACY] == legacy0 + 1
        # ksmd's published counters now miss the rmap_items the exit dropped
        assert q[H_KSM_UNSYNCED] == 8 + k
        assert not cl.task.holds(cl.daemon) and not cl.task.holds(cl.mmlist)
        q[b + M_FLAGS] &= ~(1 << 20)
        s.exited = True
        _policy(sup, "legacy")
        xmod.mmput(cl, s.mm, s.alloc, nul)
        _policy(sup, "seed")
        s.exit()
        assert k < 2
    # no slot: nothing to do
    t = Space(sup)
    t.write(t.mmap(1), b"n")
    legacy0 = q[S_EXIT_LEGACY]
    assert kmod.__ksm_exit(cl, t.mm, True, nul, "legacy") == 0
    assert q[S_EXIT_LEGACY] == legacy0
    assert not cl.task.holds(cl.daemon) and not cl.task.holds(cl.mmlist)
    t.exit()
    sp[0].exit()
    assert_fsck(sup)


def test_ksm_enter_and_exit_events_and_an_mm_without_a_slot(machine: Any) -> None:
    """__ksm_enter gives a slot once (MMF_VM_MERGEABLE added to the other
    flags) and logs ksm_enter; __ksm_exit logs its path and the policy;
    the seed's __ksm_exit of an mm with no slot does nothing and says 0."""
    from uksm.kernel import ksm as kmod
    from uksm.kernel.layout import M_FLAGS, MMF_VM_MERGEABLE, S_EXIT_FAST, S_EXIT_SLOW
    sup = machine
    cl = sup.cl
    q = cl.q
    for policy, legacy, path in (("seed", False, "fast"), ("legacy", True, "legacy")):
        s = Space(sup)
        s.write(s.mmap(1), b"e")
        b = s.mm.base
        q[b + M_FLAGS] |= 1 << 20
        log = RecLog()
        kmod.__ksm_enter(cl, s.mm, log)
        kmod.__ksm_enter(cl, s.mm, log)          # already has a slot: nothing
        assert log.events == [("ksm_enter", {"mm": s.mm.id})]
        assert q[b + M_FLAGS] == (1 << 20) | MMF_VM_MERGEABLE and q[b + M_SLOT_USED] == 1
        assert kmod.slots(cl) == [s.mm.row]
        xmod.mm_users_zero(cl, s.mm, NULL_LOG)
        log.events.clear()
        kmod.__ksm_exit(cl, s.mm, legacy, log, policy)
        assert log.events[0] == ("ksm_exit", {"mm": s.mm.id, "path": path, "policy": policy})
        # the slot is gone, the flag cleared, the other flags kept (the mm
        # lives on: only the slot's mm_count was dropped)
        assert q[b + M_SLOT_USED] == 0 and q[b + M_FLAGS] == 1 << 20
        q[b + M_FLAGS] &= ~(1 << 20)
        s.exited = True
        _policy(sup, policy)
        xmod.mmput(cl, s.mm, s.alloc, NULL_LOG)
        _policy(sup, "seed")
        s.exit()
    t = Space(sup)
    t.write(t.mmap(1), b"f")
    fast, slow = q[S_EXIT_FAST], q[S_EXIT_SLOW]
    assert kmod.__ksm_exit(cl, t.mm, False, NULL_LOG, "seed") == 0
    assert (q[S_EXIT_FAST], q[S_EXIT_SLOW]) == (fast, slow) and not cl.task.holds(cl.mmlist)
    t.exit()
    assert_fsck(sup)


def test_seed_ksm_exit_counts_and_records_its_path(machine: Any) -> None:
    """The seed's __ksm_exit, fast then slow: each path counted once in its
    own counter (bumped, from non-zero starts), recorded in the mm and in
    the task's row, and named in its event.  The fast path is taken on the
    mm's *own* rmap count, whatever the row before it holds (a live mm)."""
    from uksm.kernel.layout import M_EXIT_PATH, S_EXIT_FAST, S_EXIT_SLOW, T_EXIT_PATH
    sup = machine
    cl = sup.cl
    q = cl.q
    before, fast = _mergeable_space(sup)[0], _mergeable_space(sup)[0]
    assert fast.mm.row == before.mm.row + 1
    cl.task.lock(cl.mmlist)
    q[S_EXIT_FAST], q[S_EXIT_SLOW] = 10, 20
    q[L_SCAN_SLOT], q[L_SCAN_ADDR] = cl.head, 0     # the cursor on neither
    cl.task.unlock(cl.mmlist)
    try:
        for s, path, name in ((fast, P_FAST, "fast"), (before, P_SLOW, "slow")):
            if path == P_SLOW:
                cl.task.lock(cl.mmlist)
                q[L_SCAN_SLOT] = s.mm.row           # ksmd's cursor on it: the slow path
                cl.task.unlock(cl.mmlist)
            q[cl.task.base + T_EXIT_PATH] = 0
            log = RecLog()
            xmod.mm_users_zero(cl, s.mm, log)
            assert xmod.ksm_exit(cl, s.mm, "seed", log) == path
            assert (q[S_EXIT_FAST], q[S_EXIT_SLOW]) == ((11, 20) if path == P_FAST else (11, 21))
            assert q[s.mm.base + M_EXIT_PATH] == path and q[cl.task.base + T_EXIT_PATH] == path
            assert ("ksm_exit", {"mm": s.mm.id, "path": name, "policy": "seed"}) in log.events
            s.exited = True
            assert xmod.mmput(cl, s.mm, s.alloc, log) == 0
            s.alloc.flush()
    finally:
        cl.task.lock(cl.mmlist)
        q[S_EXIT_FAST] -= 10
        q[S_EXIT_SLOW] -= 20
        cl.task.unlock(cl.mmlist)
    set_run(sup, 1)                 # ksmd frees the slow path's slot
    before.exit()
    fast.exit()
    set_run(sup, 0)
    assert_fsck(sup)
