"""ksm.py's run_store, the slot list and run=2 against an exiting mm,
in-process (issue 16, mutation survivors of ksm.py).

- run_store: ``run`` changes only when the value does (writing 2 twice
  does not unmerge twice), K_RUN_SEQ counts the changes and K_RUN_DONE
  says the write returned; PF_OOM_ORIGIN (T_OOM_ORIGIN) is set exactly
  while run=2 unmerges, when asked, and cleared even on an error; an error
  sets run back to 0 (KSM_RUN_STOP); ksm_thread_mutex is held throughout.
- list_del: a slot whose back link a killed task left wrong is still
  unlinked (found by walking forward); one not on the list is reported.
- run=2 while an mm is exiting (mm_users 0, its pages already freed under
  the seed, __ksm_exit not run yet): the unmerge does not walk it, frees
  its slot and drops its mm_count, so the exit's ksm_exit finds no slot.

The test thread is the writer task (util_machine.Space, ksmd stopped).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from helpers import RecLog, booted, cname
from uksm.host.log import NULL_LOG
from uksm.kernel import ksm as kmod
from uksm.kernel.layout import (
    A_FREE_TOP,
    K_RUN,
    K_RUN_DONE,
    K_RUN_SEQ,
    L_SCAN_ADDR,
    L_SCAN_SLOT,
    M_EXIT_STAGE,
    M_ID,
    M_REFS,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    S_SLOTS_FREED,
    T_OOM_ORIGIN,
    XS_KSM_EXIT,
    XS_USERS0,
    XS_ZAPPED,
)
from util_machine import PAGE, Space, assert_fsck, is_ksm, ksm_stats, set_run, wait_counts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def supervisor() -> Iterator[Any]:
    """A cluster booted in this process, ksmd stopped (not the plugin's
    ``machine`` fixture: this one yields the Supervisor)."""
    with booted(cname("tkrun"), run=0, frames=64, va_pages=64,
                pages_to_scan=1000, sleep_ms=1) as sup:
        yield sup


class UnmergeSpy:
    """Stands in for unmerge_and_remove_all_rmap_items: records what the
    writer's context is while it runs, returns ``err``."""

    def __init__(self, mp: pytest.MonkeyPatch, cl: Any, err: int = 0) -> None:
        self.cl, self.err = cl, err
        self.seen: list[tuple[int, bool, int]] = []
        mp.setattr(kmod, "unmerge_and_remove_all_rmap_items", self)

    def __call__(self, cl: Any, alloc: Any, log: Any = None, stop: Any = None) -> int:
        q = cl.q
        self.seen.append((q[cl.task.base + T_OOM_ORIGIN], cl.task.holds(cl.daemon), q[K_RUN]))
        return self.err


def test_run_store_changes_run_only_when_the_value_changes(supervisor: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cl = supervisor.cl
    q = cl.q
    spy = UnmergeSpy(monkeypatch, cl)
    seq0 = q[K_RUN_SEQ]
    assert kmod.run_store(cl, 0) == (seq0, 0)        # already 0: nothing
    assert q[K_RUN_SEQ] == seq0
    assert kmod.run_store(cl, 1) == (seq0 + 1, 0)
    assert (q[K_RUN], q[K_RUN_SEQ], q[K_RUN_DONE]) == (1, seq0 + 1, seq0 + 1)
    assert kmod.run_store(cl, 1) == (seq0 + 1, 0)
    assert spy.seen == []                            # no unmerge for 0 or 1
    assert kmod.run_store(cl, 2) == (seq0 + 2, 0)
    assert kmod.run_store(cl, 2) == (seq0 + 2, 0)    # writing 2 twice unmerges once
    assert spy.seen == [(0, True, 2)]                # not an OOM origin unless asked
    assert (q[K_RUN], q[K_RUN_DONE]) == (2, seq0 + 2)
    assert not cl.task.holds(cl.daemon)
    assert kmod.run_store(cl, 0, oom_origin=True) == (seq0 + 3, 0)
    assert len(spy.seen) == 1
    assert q[cl.task.base + T_OOM_ORIGIN] == 0


def test_run2_sets_pf_oom_origin_while_it_unmerges(supervisor: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cl = supervisor.cl
    q = cl.q
    spy = UnmergeSpy(monkeypatch, cl)
    seq, err = kmod.run_store(cl, 2, oom_origin=True)
    assert err == 0 and spy.seen == [(1, True, 2)]
    assert q[cl.task.base + T_OOM_ORIGIN] == 0       # current->flags &= ~PF_OOM_ORIGIN
    assert (q[K_RUN], q[K_RUN_DONE]) == (2, seq)


@pytest.mark.parametrize("oom_origin", [False, True])
def test_run2_error_stops_ksm_and_clears_the_flag(supervisor: Any, monkeypatch: pytest.MonkeyPatch,
                                                  oom_origin: bool) -> None:
    """-ERESTARTSYS or -ENOMEM from the unmerge: run goes back to 0
    (ksm_run = KSM_RUN_STOP), the error is returned, the write is done."""
    cl = supervisor.cl
    q = cl.q
    spy = UnmergeSpy(monkeypatch, cl, err=-kmod.ERESTARTSYS)
    seq, err = kmod.run_store(cl, 2, oom_origin=oom_origin)
    assert err == -kmod.ERESTARTSYS
    assert spy.seen == [(int(oom_origin), True, 2)]
    assert (q[K_RUN], q[K_RUN_SEQ], q[K_RUN_DONE]) == (0, seq, seq)
    assert q[cl.task.base + T_OOM_ORIGIN] == 0
    assert not cl.task.holds(cl.daemon)


def test_run_store_takes_the_mutex_the_callers_way(supervisor: Any) -> None:
    """``acquire``: the mutex taken another way (the supervisor's writer
    thread, abortable); run_store still releases it."""
    cl = supervisor.cl
    calls: list[int] = []

    def acquire() -> None:
        calls.append(1)
        cl.task.lock(cl.daemon)

    seq, err = kmod.run_store(cl, 1, acquire=acquire)
    assert calls == [1] and err == 0 and cl.q[K_RUN] == 1
    assert not cl.task.holds(cl.daemon)
    kmod.run_store(cl, 0)


def _linked(cl: Any) -> list[int]:
    return kmod.slots(cl)


def test_list_del_with_a_wrong_back_link(supervisor: Any) -> None:
    sup = supervisor
    cl = sup.cl
    sp = [Space(sup, 910 + i) for i in range(3)]
    for s in sp:
        a = s.mmap(1)
        s.write(a, b"k")
        s.mergeable(a, 1)
    rows = [s.mm.row for s in sp]
    assert _linked(cl) == rows
    mid = rows[1]
    cl.task.lock(cl.mmlist)
    try:
        kmod._set_prev(cl, mid, rows[2])         # a killed list_add left it wrong
        assert kmod.list_del(cl, mid) is True      # found by walking forward
        assert _linked(cl) == [rows[0], rows[2]]
        assert kmod.slot_prev(cl, rows[2]) == rows[0]
        assert kmod.slot_next(cl, rows[0]) == rows[2]
        assert kmod.list_del(cl, mid) is False     # no longer linked: nothing done
        assert _linked(cl) == [rows[0], rows[2]]
        kmod._set_prev(cl, rows[2], cl.head + 1)   # a back link out of range
        assert kmod.list_del(cl, rows[2]) is True
        assert _linked(cl) == [rows[0]]
        assert kmod.slot_prev(cl, cl.head) == rows[0] and kmod.slot_next(cl, rows[0]) == cl.head
        kmod.list_add_after(cl, mid, rows[0])      # put both back as they were
        kmod.list_add_after(cl, rows[2], mid)
        kmod._set_prev(cl, rows[0], rows[2])       # the first slot: its predecessor is the head
        assert kmod.list_del(cl, rows[0]) is True
        assert _linked(cl) == rows[1:] and kmod.slot_prev(cl, mid) == cl.head
        kmod.list_add_after(cl, rows[0], cl.head)
    finally:
        cl.task.unlock(cl.mmlist)
    assert _linked(cl) == rows
    assert [kmod.slot_prev(cl, r) for r in rows] == [cl.head] + rows[:2]
    assert_fsck(sup, sp)
    for s in sp:
        s.exit()
    assert_fsck(sup)


def test_run2_frees_the_slot_of_an_exiting_mm(supervisor: Any) -> None:
    sup = supervisor
    cl = sup.cl
    q = cl.q
    live, dying, addr = _merged_pair(sup, 3)
    log = NULL_LOG
    from uksm.kernel import exit as xmod
    # the dying task got as far as freeing its pages (the seed's order)
    xmod.mm_users_zero(cl, dying.mm, log)
    xmod.exit_mmap_unmap(cl, dying.mm, dying.alloc, log)
    dying.alloc.flush()
    dying.exited = True
    assert q[dying.mm.base + M_SLOT_USED]
    freed0 = q[S_SLOTS_FREED]
    seq, err = kmod.run_store(cl, 2, dying.alloc, log)
    assert err == 0
    assert not q[dying.mm.base + M_SLOT_USED], "run=2 frees an exiting mm's slot"
    assert q[S_SLOTS_FREED] == freed0 + 1
    assert _linked(cl) == [live.mm.row]
    assert q[L_SCAN_SLOT] == cl.head and q[L_SCAN_ADDR] == 0
    assert q[dying.mm.base + M_EXIT_STAGE] == XS_USERS0 | XS_ZAPPED
    # the live mm was unmerged: four pages of its own again
    pfns = [live.pfn(addr[live] + i * PAGE) for i in range(4)]
    assert None not in pfns and len(set(pfns)) == 4
    assert not any(is_ksm(cl, p) for p in pfns if p is not None)
    k = ksm_stats(cl)
    assert (k["pages_shared"], k["pages_sharing"]) == (0, 0)
    # the exit goes on: ksm_exit finds no slot, mmput frees the mm
    assert xmod.ksm_exit(cl, dying.mm, "seed", log) == 0
    assert q[dying.mm.base + M_EXIT_STAGE] & XS_KSM_EXIT
    assert xmod.mmput(cl, dying.mm, dying.alloc, log) == 0
    dying.alloc.flush()
    dying.exit()
    assert dying.freed()
    set_run(sup, 0)
    assert_fsck(sup, [live])
    live.exit()
    assert_fsck(sup)


def _merged_pair(sup: Any, tag: int) -> tuple[Space, Space, dict]:
    live, dying = Space(sup, 930 + tag), Space(sup, 940 + tag)
    addr = {}
    for s in (live, dying):
        addr[s] = a = s.mmap(4)
        s.fill(a, [b"\x44" * PAGE] * 4)
        s.mergeable(a, 4)
    set_run(sup, 1)
    wait_counts(sup, pages_shared=1, pages_sharing=7)
    set_run(sup, 0)
    return live, dying, addr


@pytest.mark.parametrize("how_far", ["zapped", "slow_path_and_pgtables"])
def test_run2_unmerge_state_and_events(supervisor: Any, how_far: str) -> None:
    """What KSM_RUN_UNMERGE leaves: ksmd's published state zeroed
    (counters, per-slot rmap counts) and H_UNMERGE_GEN bumped once for
    ksmd; H_KSM_UNSYNCED untouched (a whole walk leaves every counter 0
    and consistent: nothing for fsck to excuse, nothing to wait for); the
    live mm unmerged (the event says how many
    pages) and still registered; the exiting mm -- pages freed, or even
    its page tables and VMAs after a slow-path __ksm_exit (the 2023 fix:
    its VMAs are not walked) -- loses its slot and its mm_count."""
    from uksm.kernel import exit as xmod
    from uksm.kernel.layout import (
        H_KSM_UNSYNCED,
        H_UNMERGE_GEN,
        K_FULL_SCANS,
        K_PAGES_SHARED,
        K_PAGES_SHARING,
        K_STABLE_NODES,
        L_SEQNR,
        M_FLAGS,
        M_MERGING,
        M_RMAP_ITEMS,
        M_SLOT_RMAP,
        MMF_VM_MERGEABLE,
        P_SLOW,
    )
    sup = supervisor
    cl = sup.cl
    q = cl.q
    live, dying, addr = _merged_pair(sup, 0 if how_far == "zapped" else 1)
    assert q[live.mm.base + M_SLOT_RMAP] > 0 and q[K_STABLE_NODES] == 1
    nul = NULL_LOG
    xmod.mm_users_zero(cl, dying.mm, nul)
    xmod.exit_mmap_unmap(cl, dying.mm, dying.alloc, nul)
    dying.alloc.flush()
    dying.exited = True
    if how_far != "zapped":
        cl.task.lock(cl.mmlist)
        q[L_SCAN_SLOT] = dying.mm.row    # ksmd's cursor on it: the slow path keeps the slot
        cl.task.unlock(cl.mmlist)
        assert xmod.ksm_exit(cl, dying.mm, "seed", nul) == P_SLOW
        xmod.free_pgtables(cl, dying.mm)
    db_flags = dying.mm.base + M_FLAGS
    q[db_flags] |= 1 << 20              # another flag, kept
    # ksmd stopped (run is 0: it had nothing to do), so that nobody else
    # touches the counters; and not zero, so that "+= 1" is told from "= 1"
    sup.stop_ksmd()
    q[H_KSM_UNSYNCED], q[S_SLOTS_FREED] = 5, 40
    gen, unsynced, freed0 = q[H_UNMERGE_GEN], q[H_KSM_UNSYNCED], q[S_SLOTS_FREED]
    q[L_SCAN_ADDR] = 77
    log = RecLog()
    seq, err = kmod.run_store(cl, 2, dying.alloc, log)
    assert err == 0
    used = cl.nframes - q[A_FREE_TOP]  # each unmerge says the frames in use after it: nothing since
    assert log.events == [("ksm_knob", {"name": "run", "value": 2}),
                          ("unmerge", {"mm": live.mm.id, "pages": 4, "reason": "run2", "frames_used": used}),
                          ("unmerge", {"mm": dying.mm.id, "pages": 0, "reason": "run2", "frames_used": used}),
                          ("slot_freed", {"mm": dying.mm.id, "by": "unmerge"}),
                          ("mmdrop", {"mm": dying.mm.id, "ref": "ksm", "mm_count": 1})]
    assert (q[H_UNMERGE_GEN], q[H_KSM_UNSYNCED], q[S_SLOTS_FREED]) == (gen + 1, unsynced, freed0 + 1)
    assert (q[K_PAGES_SHARED], q[K_PAGES_SHARING], q[K_STABLE_NODES]) == (0, 0, 0)
    assert (q[K_FULL_SCANS], q[L_SEQNR]) == (0, 0)
    assert (q[L_SCAN_SLOT], q[L_SCAN_ADDR]) == (cl.head, 0)
    lb, db = live.mm.base, dying.mm.base
    assert (q[lb + M_SLOT_RMAP], q[lb + M_RMAP_ITEMS], q[lb + M_MERGING]) == (0, 0, 0)
    assert q[lb + M_SLOT_USED] == 1 and q[lb + M_FLAGS] & MMF_VM_MERGEABLE
    assert _linked(cl) == [live.mm.row]
    pfns = [live.pfn(addr[live] + i * PAGE) for i in range(4)]
    assert None not in pfns and len(set(pfns)) == 4
    assert not any(is_ksm(cl, p) for p in pfns if p is not None)
    if how_far == "zapped":
        assert q[db + M_SLOT_USED] == 0 and q[db_flags] == 1 << 20
        assert xmod.mmput(cl, dying.mm, dying.alloc, nul) == 0
    else:
        assert xmod.mmput(cl, dying.mm, dying.alloc, nul) == 0
    dying.exit()     # freed: the unmerge dropped the slot's mm_count
    assert dying.freed()
    set_run(sup, 0)
    assert_fsck(sup, [live])
    live.exit()
    assert_fsck(sup)


def test_run2_interrupted_puts_the_cursor_back(supervisor: Any) -> None:
    """A signal while run=2 unmerges (-ERESTARTSYS): the cursor goes back
    to the head, run to 0, and full_scans is left alone; stopped in the
    first mm, the unmerge removed no rmap_item: every counter as it was."""
    from uksm.kernel.layout import H_UNMERGE_GEN, K_FULL_SCANS
    sup = supervisor
    cl = sup.cl
    q = cl.q
    live, other, addr = _merged_pair(sup, 2)
    scans = q[K_FULL_SCANS]
    gen = q[H_UNMERGE_GEN]
    log = RecLog()
    seq, err = kmod.run_store(cl, 2, live.alloc, log, stop=lambda: True)
    assert err == -kmod.ERESTARTSYS
    assert (q[K_RUN], q[L_SCAN_SLOT], q[L_SCAN_ADDR]) == (0, cl.head, 0)
    assert q[K_FULL_SCANS] == scans and scans > 0
    k = ksm_stats(cl)
    assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == (1, 7, 0)
    assert q[H_UNMERGE_GEN] == gen + 1
    assert [e for e, _f in log.events] == ["ksm_knob", "unmerge"]
    assert log.events[1][1]["mm"] == live.mm.id
    assert q[live.mm.base + M_SLOT_USED] and q[other.mm.base + M_SLOT_USED]
    set_run(sup, 1)       # ksmd rebuilds and merges again
    wait_counts(sup, pages_shared=1, pages_sharing=7)
    assert_fsck(sup, [live, other])
    live.exit()           # slow paths: ksmd (running) frees the slots
    other.exit()
    set_run(sup, 0)
    assert_fsck(sup)


@pytest.mark.parametrize("ksmd", ["running", "stopped"])
def test_run2_failing_in_the_second_mm_counts_out_the_first(supervisor: Any, ksmd: str) -> None:
    """unmerge_and_remove_all_rmap_items stops at an error in the second
    mm: the first one's rmap_items were removed and counted out before
    the write returns -- by ksmd, on the writer's behalf, while the writer
    still holds ksm_thread_mutex (ksm.ksmd_remove_rmap_items) -- and the
    second keeps its four, on the one stable node: pages_shared 1,
    pages_sharing 3, as 2.6.32's remove_trailing_rmap_items leaves them.
    With ksmd stopped nobody can count them out: the counters are left
    as they were and H_KSM_UNSYNCED tells fsck."""
    from uksm.kernel.layout import H_KSM_UNSYNCED, H_UNMERGE_WAIT, K_RMAP_ITEMS, M_RMAP_ITEMS
    sup = supervisor
    cl = sup.cl
    q = cl.q
    a, b, _addr = _merged_pair(sup, 4 if ksmd == "running" else 5)
    first, second = (a, b) if _linked(cl)[0] == a.mm.row else (b, a)
    if ksmd == "stopped":
        sup.stop_ksmd()
    unsynced = q[H_KSM_UNSYNCED]
    calls = [0]

    def stop() -> bool:   # signal_pending: from the second mm's first page
        calls[0] += 1
        return calls[0] > 4
    seq, err = kmod.run_store(cl, 2, first.alloc, NULL_LOG, stop=stop)
    assert err == -kmod.ERESTARTSYS and calls[0] == 5
    assert q[first.mm.base + M_RMAP_ITEMS] == 0 and q[second.mm.base + M_RMAP_ITEMS] == 4
    assert q[H_UNMERGE_WAIT] == 0
    k = ksm_stats(cl)
    if ksmd == "running":
        assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"], q[K_RMAP_ITEMS]) == (1, 3, 0, 4)
        assert q[H_KSM_UNSYNCED] == 0
        set_run(sup, 1)       # ksmd merges the first mm's four pages again
        wait_counts(sup, pages_shared=1, pages_sharing=7)
        assert_fsck(sup, [a, b])
        a.exit()              # slow paths: ksmd (running) frees the slots
        b.exit()
        set_run(sup, 0)
    else:
        assert (k["pages_shared"], k["pages_sharing"], q[K_RMAP_ITEMS]) == (1, 7, 8)
        assert q[H_KSM_UNSYNCED] == unsynced + 1
        seq, err = kmod.run_store(cl, 2, first.alloc, NULL_LOG)   # a whole walk: all gone
        assert err == 0 and q[K_RMAP_ITEMS] == 0
        a.exit()              # fast paths: no rmap_items, the cursor at the head
        b.exit()
    assert_fsck(sup)


def test_run2_counts_every_range_and_an_exiting_mm_alone(supervisor: Any) -> None:
    """The unmerge event counts the pages of every mergeable range of an
    mm (two here: a page in the middle was left unmergeable); an unmerge
    whose only mm is exiting (nothing walked) is no error; H_UNMERGE_GEN
    grows by one per unmerge, from wherever it was."""
    from uksm.kernel import exit as xmod
    from uksm.kernel.layout import H_UNMERGE_GEN
    sup = supervisor
    cl = sup.cl
    q = cl.q
    a_sp, b_sp = Space(sup, 950), Space(sup, 951)
    a = a_sp.mmap(5)
    a_sp.fill(a, [b"\x55" * PAGE] * 5)
    a_sp.mergeable(a, 2)
    a_sp.mergeable(a + 3 * PAGE, 2)
    b = b_sp.mmap(1)
    b_sp.write(b, b"\x55" * PAGE)
    b_sp.mergeable(b, 1)
    assert len(a_sp.mm.mergeable_ranges()) == 2
    set_run(sup, 1)
    wait_counts(sup, pages_shared=1, pages_sharing=4)
    set_run(sup, 0)
    gen = q[H_UNMERGE_GEN]
    log = RecLog()
    seq, err = kmod.run_store(cl, 2, a_sp.alloc, log)
    assert err == 0 and q[H_UNMERGE_GEN] == gen + 1
    assert ("unmerge", {"mm": a_sp.mm.id, "pages": 4, "reason": "run2"}) in [
        (e, {k: v for k, v in f.items() if k != "frames_used"}) for e, f in log.events]
    set_run(sup, 0)
    a_sp.exit()
    # only an exiting mm left on the list: nothing walked, no error
    nul = NULL_LOG
    xmod.mm_users_zero(cl, b_sp.mm, nul)
    xmod.exit_mmap_unmap(cl, b_sp.mm, b_sp.alloc, nul)
    b_sp.alloc.flush()
    b_sp.exited = True
    assert _linked(cl) == [b_sp.mm.row]
    seq, err = kmod.run_store(cl, 2, b_sp.alloc, nul)
    assert err == 0 and q[K_RUN] == 2 and q[H_UNMERGE_GEN] == gen + 2
    assert _linked(cl) == []
    xmod.mmput(cl, b_sp.mm, b_sp.alloc, nul)
    b_sp.exit()
    set_run(sup, 0)
    assert_fsck(sup)


def test_run_store_unmerges_with_the_callers_allocator(supervisor: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's own allocator (its per-task frames, its pending frees)
    does the unmerge and is flushed at the end; a fresh one only if the
    caller has none."""
    from uksm.kernel.memory import Allocator
    cl = supervisor.cl
    used: list[Any] = []
    monkeypatch.setattr(kmod, "unmerge_and_remove_all_rmap_items",
                        lambda cl, alloc, log=None, stop=None: used.append(alloc) or 0)
    mine = Allocator(cl)
    flushed: list[int] = []
    monkeypatch.setattr(mine, "flush", lambda: flushed.append(1))
    kmod.run_store(cl, 2, mine)
    assert used == [mine] and flushed == [1]
    kmod.run_store(cl, 0)
    kmod.run_store(cl, 2)
    assert len(used) == 2 and isinstance(used[1], Allocator) and used[1] is not mine



def test_ksm_enter_reads_its_own_slot_word(supervisor: Any) -> None:
    """__ksm_enter returns early only if *this* mm already has a slot:
    whatever the neighbouring mm rows hold (here every word of the row
    before set), a second MADV_MERGEABLE is a no-op and a first one links
    the slot behind the cursor."""
    from uksm.kernel.layout import MM_SIZE  # every word of a row
    sup = supervisor
    cl = sup.cl
    q = cl.q
    a, b = Space(sup, 950), Space(sup, 951)
    assert b.mm.row == a.mm.row + 1
    saved = [q[a.mm.base + f] for f in range(MM_SIZE)]
    cl.task.lock(cl.mmlist)
    for f in range(MM_SIZE):          # the row before b's: no zero word to hide behind
        if f not in (M_ID, M_SLOT_USED, M_STATE, M_REFS, M_USERS):
            q[a.mm.base + f] = saved[f] or 7
    cl.task.unlock(cl.mmlist)
    try:
        addr = b.mmap(1)
        b.write(addr, b"k")
        b.mergeable(addr, 1)
        assert q[b.mm.base + M_SLOT_USED] == 1 and b.mm.row in kmod.slots(cl)
        b.mergeable(addr, 1)          # again: still one slot, linked once
        assert kmod.slots(cl).count(b.mm.row) == 1
    finally:
        cl.task.lock(cl.mmlist)
        for f in range(MM_SIZE):
            q[a.mm.base + f] = saved[f]
        cl.task.unlock(cl.mmlist)
