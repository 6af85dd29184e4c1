"""The fault planter (issue 16): corrupts exactly one thing in a live or
stopped cluster, so that a test can show that a checker sees it.

Private to the tests (the CLI cannot reach it).  Each ``plant_*`` function
writes one field (or one link: the two stores of a list_del) of the shared
memory, the way a buggy kernel path would, and returns a :class:`Fault`:
the messages fsck must report for it (regular expressions, in the order
fsck reports them) and ``undo()``, which puts the exact old values back so
that the cluster can go on and tear down clean.

Every plant assumes a quiet cluster: ksmd idle (run=0) and workers between
writes (a non-volatile workload after T_READY), or stopped; nothing else
writes the fields it changes meanwhile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uksm.kernel.ksm import slot_next, slot_prev, slots
from uksm.kernel.layout import (
    A_FREE_TOP,
    F_ANON,
    F_FREEING,
    F_KSM,
    FR_AUX,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    K_PAGES_UNSHARED,
    L_HEAD_NEXT,
    L_HEAD_PREV,
    M_EXIT_STAGE,
    M_ID,
    M_KSM_MAPPED,
    M_MERGING,
    M_OWNER_TASK,
    M_REFS,
    M_RMAP_ITEMS,
    M_RSS,
    M_SLOT_NEXT,
    M_SLOT_PREV,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    MMS_FREEING,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    REF_KSM,
    T_FLIGHT_MM,
    T_FLIGHT_PFN,
    T_FLIGHT_VPN,
    XS_USERS0,
)

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.mm import MM


@dataclass
class Fault:
    what: str
    expect: list[str]                       # regexes, one per error line, in fsck's order
    undo: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)


class Store:
    """One or a few int64 stores, remembered for undo."""

    def __init__(self) -> None:
        self.old: list[tuple[Any, int, int]] = []

    def set(self, arr: Any, i: int, v: int) -> None:
        self.old.append((arr, i, arr[i]))
        arr[i] = v

    def undo(self) -> None:
        for arr, i, v in reversed(self.old):
            arr[i] = v


# ---- finding targets --------------------------------------------------------------------------

def ptes(cl: "Cluster", mms: dict[int, "MM"], ksm: bool) -> list[tuple[int, int, int]]:
    """(mm id, page-table slot, pfn) of every present PTE mapping a KSM
    frame (``ksm``) or an ordinary anonymous one."""
    out = []
    for mm_id in sorted(mms):
        pq = mms[mm_id].pq
        for s in range(PT_OFF, PT_OFF + cl.va_pages):
            pte = pq[s]
            if pte and pte & PTE_PRESENT:
                pfn = pte >> 2
                if bool(cl.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM) == ksm:
                    out.append((mm_id, s, pfn))
    return out


def pte(cl: "Cluster", mms: dict[int, "MM"], ksm: bool) -> tuple[int, int, int]:
    found = ptes(cl, mms, ksm)
    assert found, f"no {'KSM' if ksm else 'anonymous'} page mapped: the cluster is not merged"
    return found[0]


def free_stack(cl: "Cluster") -> list[int]:
    return [cl.fq[cl.stack_off + i] for i in range(cl.q[A_FREE_TOP])]


def slot_rows(cl: "Cluster") -> list[int]:
    s = slots(cl)
    assert len(s) >= 2, f"two mm_slots on the list needed, found {s}"
    return s


def _vpn(s: int) -> str:
    return f"{s - PT_OFF:#x}"


# ---- the free stack and the frames ----------------------------------------------------------

def plant_stack_invalid(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free-stack entry past the top that holds no frame (the first
    number past the pool: the bound itself), then pushed."""
    st, top = Store(), cl.q[A_FREE_TOP]
    st.set(cl.fq, cl.stack_off + top, cl.nframes)
    st.set(cl.q, A_FREE_TOP, top + 1)
    return Fault("free-stack entry invalid", [rf"free stack\[{top}\] holds invalid frame {cl.nframes}$"],
                 st.undo)


def plant_stack_twice(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free frame pushed a second time (a double free_page)."""
    st, top = Store(), cl.q[A_FREE_TOP]
    pfn = cl.fq[cl.stack_off]
    st.set(cl.fq, cl.stack_off + top, pfn)
    st.set(cl.q, A_FREE_TOP, top + 1)
    return Fault("frame on the free stack twice", [rf"frame {pfn} is on the free stack twice$"], st.undo)


def plant_stack_lost(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """The top of the free stack dropped without handing its frame to
    anybody: the frame leaks."""
    st, top = Store(), cl.q[A_FREE_TOP]
    pfn = cl.fq[cl.stack_off + top - 1]
    st.set(cl.q, A_FREE_TOP, top - 1)
    return Fault("free frame lost", [rf"frame {pfn} leaked: count 0, not on the free stack \(flags 0\)$"],
                 st.undo, {"pfn": pfn})


def plant_free_counted(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free frame's count raised (a get_page on a freed page)."""
    st = Store()
    pfn = free_stack(cl)[0]
    st.set(cl.fq, pfn * FRAME_SIZE + FR_COUNT, 1)
    return Fault("free frame with a count", [rf"frame {pfn} is free but has count 1 flags 0$"], st.undo)


def plant_free_flagged(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free frame's flags set (PageAnon left on a freed page)."""
    st = Store()
    pfn = free_stack(cl)[0]
    st.set(cl.fq, pfn * FRAME_SIZE + FR_FLAGS, F_ANON)
    return Fault("free frame with flags", [rf"frame {pfn} is free but has count 0 flags {F_ANON}$"],
                 st.undo)


def plant_stack_negative(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free-stack entry below the pool (-1), then pushed."""
    st, top = Store(), cl.q[A_FREE_TOP]
    st.set(cl.fq, cl.stack_off + top, -1)
    st.set(cl.q, A_FREE_TOP, top + 1)
    return Fault("free-stack entry negative", [rf"free stack\[{top}\] holds invalid frame -1$"], st.undo)


def plant_stack_top(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """The free stack's top past the pool (more free frames than frames)."""
    st = Store()
    st.set(cl.q, A_FREE_TOP, cl.nframes + 1)
    return Fault("free-stack top past the pool",
                 [rf"free stack top {cl.nframes + 1} outside 0\.\.{cl.nframes}$"], st.undo)


def plant_count(cl: "Cluster", mms: dict[int, "MM"], ksm: bool = False) -> Fault:
    """A mapped frame's count one too high (a missing put_page)."""
    st = Store()
    _mm, _s, pfn = pte(cl, mms, ksm)
    b = pfn * FRAME_SIZE + FR_COUNT
    c = cl.fq[b]
    st.set(cl.fq, b, c + 1)
    return Fault("frame count", [rf"frame {pfn} miscounted: count {c + 1}, references {c}$"], st.undo)


def plant_ksm_bytes(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """One byte of a KSM frame changed behind the stable tree's back (a
    write through a PTE that should have been read-only)."""
    _mm, _s, pfn = pte(cl, mms, True)
    off = pfn * PAGE_SIZE + 123
    mv = cl.pool.mv
    old = mv[off]
    mv[off] = old ^ 0x5A

    def undo() -> None:
        mv[off] = old
    return Fault("KSM frame bytes", [rf"KSM frame {pfn} no longer matches its stable-tree key$"], undo)


def plant_page_data(cl: "Cluster", mms: dict[int, "MM"], mm_id: int) -> Fault:
    """One byte of an ordinary (not KSM) page of ``mm_id`` changed: only the
    task's own verify can see it (fsck checks no user data)."""
    pq = mms[mm_id].pq
    for s in range(PT_OFF, PT_OFF + cl.va_pages):
        p = pq[s]
        if p and not cl.fq[(p >> 2) * FRAME_SIZE + FR_FLAGS] & F_KSM:
            off = (p >> 2) * PAGE_SIZE + 77
            mv = cl.pool.mv
            old = mv[off]
            mv[off] = old ^ 0xFF

            def undo() -> None:
                mv[off] = old  # noqa: B023 -- returned at once: the loop goes no further
            return Fault("page data", [], undo, {"pfn": p >> 2})
    raise AssertionError(f"mm{mm_id} maps no ordinary page")


# ---- page tables --------------------------------------------------------------------------------

def plant_pte_not_present(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    st = Store()
    mm, s, pfn = pte(cl, mms, False)
    v = mms[mm].pq[s] & ~PTE_PRESENT
    st.set(mms[mm].pq, s, v)
    return Fault("PTE not present", [rf"mm{mm} vpn {_vpn(s)}: invalid PTE {v:#x}$"], st.undo)


def plant_pte_past_pool(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A present PTE whose frame number is the first past the pool (the
    bound itself): invalid, and its old frame lost a reference."""
    st = Store()
    mm, s, old = pte(cl, mms, False)
    p = mms[mm].pq[s]
    v = cl.nframes << 2 | (p & 3)
    st.set(mms[mm].pq, s, v)
    c = cl.fq[old * FRAME_SIZE + FR_COUNT]
    return Fault("PTE past the pool", [
        rf"frame {old} (miscounted|leaked \(nothing maps it\)): count {c}, references {c - 1}$",
        rf"mm{mm} vpn {_vpn(s)}: invalid PTE {v:#x}$"], st.undo)


def plant_ksm_writable(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """The write bit set on a PTE that maps a KSM frame (write_protect_page
    undone)."""
    st = Store()
    mm, s, pfn = pte(cl, mms, True)
    st.set(mms[mm].pq, s, mms[mm].pq[s] | PTE_WRITE)
    return Fault("KSM frame writable", [rf"mm{mm} vpn {_vpn(s)} maps KSM frame {pfn} writable$"], st.undo)


def plant_pte_free_frame(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A PTE pointed at a free frame (a use after free): the free frame is
    mapped, the PTE maps a free frame, the old frame loses its reference."""
    st = Store()
    mm, s, old = pte(cl, mms, False)
    new = free_stack(cl)[0]
    p = mms[mm].pq[s]
    st.set(mms[mm].pq, s, new << 2 | (p & 3))
    c = cl.fq[old * FRAME_SIZE + FR_COUNT]
    return Fault("PTE maps a free frame", [
        rf"frame {new} is free but mapped 1 times$",
        rf"frame {old} (miscounted|leaked \(nothing maps it\)): count {c}, references {c - 1}$",
        rf"mm{mm} vpn {_vpn(s)} maps free frame {new}$"], st.undo)


def plant_rss(cl: "Cluster", mms: dict[int, "MM"], field_: int = M_RSS) -> Fault:
    st = Store()
    mm = min(mms)
    b = mms[mm].base
    rss, ksm = cl.q[b + M_RSS], cl.q[b + M_KSM_MAPPED]
    st.set(cl.q, b + field_, cl.q[b + field_] + 1)
    now = (rss + 1, ksm) if field_ == M_RSS else (rss, ksm + 1)
    return Fault("rss" if field_ == M_RSS else "ksm-mapped",
                 [rf"mm{mm}: rss {now[0]} / ksm-mapped {now[1]} but the page table says {rss} / {ksm}$"],
                 st.undo)


# ---- ksmd's counters ----------------------------------------------------------------------------

def plant_counter_sum(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    st = Store()
    st.set(cl.q, K_PAGES_UNSHARED, cl.q[K_PAGES_UNSHARED] + 1)
    return Fault("pages_unshared", [r"counters: shared \d+ \+ sharing \d+ \+ unshared \d+ \+ "
                                    r"volatile \d+ != rmap_items \d+$"], st.undo)


def plant_mm_counter(cl: "Cluster", mms: dict[int, "MM"], field_: int) -> Fault:
    st = Store()
    b = mms[min(mms)].base
    st.set(cl.q, b + field_, cl.q[b + field_] + 1)
    if field_ == M_RMAP_ITEMS:
        msg = r"counters: rmap_items \d+ but the mms' ksm_rmap_items add up to \d+$"
    else:
        msg = r"counters: shared \+ sharing = \d+ but the mms' ksm_merging_pages add up to \d+$"
    expect = [msg]
    if cl.q[b + M_MERGING] > cl.q[b + M_RMAP_ITEMS]:   # every rmap_item of the mm merged
        expect.append(r"counters: mm\d+ ksm_merging_pages \d+ > ksm_rmap_items \d+$")
    return Fault("mm counter", expect, st.undo)


# ---- the mm_slot list and mm_count --------------------------------------------------------------

def plant_slot_cycle(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """The last slot's next link points back at the first slot: the list
    never comes back to ksm_mm_head."""
    st = Store()
    s = slot_rows(cl)
    st.set(cl.q, cl.mbase(s[-1]) + M_SLOT_NEXT, s[0])
    return Fault("slot list cycle", [r"mm_slot list does not end \(a cycle\)$"], st.undo)


def plant_slot_prev(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    st = Store()
    s = slot_rows(cl)
    st.set(cl.q, cl.mbase(s[1]) + M_SLOT_PREV, s[1])
    return Fault("slot back link", [rf"mm_slot list: slot {s[1]} has a wrong back link$"], st.undo)


def plant_head_prev(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    st = Store()
    s = slot_rows(cl)
    st.set(cl.q, L_HEAD_PREV, s[0])
    return Fault("head back link", [r"mm_slot list: ksm_mm_head has a wrong back link$"], st.undo)


def _row_of(cl: "Cluster", mm_id: int) -> int:
    return next(r for r in range(cl.max_mms) if cl.q[cl.mbase(r) + M_ID] == mm_id)


def plant_slot_unlinked(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """list_del of a slot that stays in use (its mm_slot is lost to ksmd's
    scan, its mm_count reference still held)."""
    st = Store()
    s = slot_rows(cl)[0]
    prev, nxt = slot_prev(cl, s), slot_next(cl, s)
    st.set(cl.q, L_HEAD_NEXT if prev == cl.head else cl.mbase(prev) + M_SLOT_NEXT, nxt)
    st.set(cl.q, L_HEAD_PREV if nxt == cl.head else cl.mbase(nxt) + M_SLOT_PREV, prev)
    mm = cl.q[cl.mbase(s) + M_ID]
    return Fault("slot unlinked", [rf"mm{mm}: has an mm_slot that is not on the list$"], st.undo)


def plant_users(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """mm_users dropped to 0 without the users' mm_count reference."""
    st = Store()
    mm = min(mms)
    b = mms[mm].base
    users = cl.q[b + M_USERS]
    st.set(cl.q, b + M_USERS, 0)
    return Fault("mm_users", [rf"mm{mm}: mm_users 0 but the users' mm_count reference is held$"],
                 st.undo, {"users": users})


def plant_mm_count_slot(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """The slot's mm_count reference dropped while the slot lives (an
    mmdrop too many)."""
    st = Store()
    mm = cl.q[cl.mbase(slot_rows(cl)[0]) + M_ID]
    b = cl.mbase(_row_of(cl, mm))
    st.set(cl.q, b + M_REFS, cl.q[b + M_REFS] & ~REF_KSM)
    return Fault("mm_count", [rf"mm{mm}: mm_slot present but the slot's mm_count reference is dropped$"],
                 st.undo)


def plant_mm_count_zero(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    st = Store()
    mm = cl.q[cl.mbase(slot_rows(cl)[0]) + M_ID]
    b = cl.mbase(_row_of(cl, mm))
    st.set(cl.q, b + M_REFS, 0)
    return Fault("mm_count 0", [
        rf"mm{mm}: mm_users {cl.q[b + M_USERS]} but the users' mm_count reference is dropped$",
        rf"mm{mm}: mm_slot present but the slot's mm_count reference is dropped$",
        rf"mm{mm}: mm_count is 0 but the mm is not freed$"], st.undo)


def plant_slot_freed_listed(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """M_SLOT_USED cleared on a slot still on the list (free_mm_slot without
    its list_del): the slot's reference is still held, ksmd's per-mm
    counters of that mm no longer count, and an mm without a slot that
    counts rmap_items is wrong on its own."""
    st = Store()
    r = slot_rows(cl)[0]
    b = cl.mbase(r)
    mm = cl.q[b + M_ID]
    st.set(cl.q, b + M_SLOT_USED, 0)
    expect = [rf"mm{mm}: mm_slot absent but the slot's mm_count reference is held$",
              rf"mm{mm}: a freed mm_slot is still on the list$"]
    if cl.q[b + M_RMAP_ITEMS]:
        expect.insert(0, r"counters: rmap_items \d+ but the mms' ksm_rmap_items add up to \d+$")
    if cl.q[b + M_MERGING]:
        expect.insert(1 if cl.q[b + M_RMAP_ITEMS] else 0,
                      r"counters: shared \+ sharing = \d+ but the mms' ksm_merging_pages add up to \d+$")
    if cl.q[b + M_RMAP_ITEMS] or cl.q[b + M_MERGING]:   # and the slotless mm still counts some
        expect.append(rf"counters: mm{mm} has no mm_slot but ksm_rmap_items \d+, ksm_merging_pages \d+$")
    return Fault("slot freed but listed", expect, st.undo)


def plant_mm_id_twice(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A free mm row given the id of a live mm (two mm_structs one id)."""
    st = Store()
    mm = min(mms)
    free = next(r for r in range(cl.max_mms) if not cl.q[cl.mbase(r) + M_ID])
    st.set(cl.q, cl.mbase(free) + M_ID, mm)
    return Fault("mm id twice", [rf"mm{mm}: mm_count is 0 but the mm is not freed$",
                                 r"an mm id appears in two rows$"], st.undo)


# ---- legal states fsck must accept (no error): what a live task has in flight -------------------

def _owner_row(cl: "Cluster", mms: dict[int, "MM"]) -> tuple[int, int]:
    """(mm id, task row) of a live worker."""
    mm = min(mms)
    return mm, cl.q[mms[mm].base + M_OWNER_TASK]


def plant_in_flight(cl: "Cluster", mms: dict[int, "MM"], installed: bool) -> Fault:
    """A frame a live task holds in flight (T_FLIGHT_*, as Allocator._pop
    leaves it): allocated, count 1, not yet in a PTE (``installed`` False:
    the hold is the frame's one reference), or already installed and the
    hold not yet cleared (the PTE is the one reference: not counted twice)."""
    st = Store()
    mm, s, pfn = pte(cl, mms, False)
    row = cl.q[mms[mm].base + M_OWNER_TASK]
    t = cl.tbase(row)
    if installed:
        vpn = s - PT_OFF
    else:
        top = cl.q[A_FREE_TOP]
        pfn = cl.fq[cl.stack_off + top - 1]
        st.set(cl.fq, pfn * FRAME_SIZE + FR_COUNT, 1)
        st.set(cl.fq, pfn * FRAME_SIZE + FR_FLAGS, F_ANON)
        st.set(cl.q, A_FREE_TOP, top - 1)
        vpn = next(s for s in range(PT_OFF, PT_OFF + cl.va_pages) if not mms[mm].pq[s]) - PT_OFF
    st.set(cl.q, t + T_FLIGHT_MM, mm)
    st.set(cl.q, t + T_FLIGHT_VPN, vpn)
    st.set(cl.q, t + T_FLIGHT_PFN, pfn)
    return Fault("in flight" + (", installed" if installed else ""), [], st.undo)


def plant_being_freed(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """A frame a live task is freeing (put_frame: count 0, F_FREEING, its
    row + 1 in FR_AUX, not yet pushed back): not a leak."""
    st = Store()
    _mm, row = _owner_row(cl, mms)
    top = cl.q[A_FREE_TOP]
    pfn = cl.fq[cl.stack_off + top - 1]
    st.set(cl.fq, pfn * FRAME_SIZE + FR_FLAGS, F_FREEING)
    st.set(cl.fq, pfn * FRAME_SIZE + FR_AUX, row + 1)
    st.set(cl.q, A_FREE_TOP, top - 1)
    return Fault("being freed", [], st.undo)


def plant_exit_in_flight(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """An exit in flight: mm_users dropped to 0 (XS_USERS0 marked), the
    users' mm_count reference not yet (mmdrop comes later, or a reaper
    finishes a killed task's exit): not settled, not an error."""
    st = Store()
    b = mms[min(mms)].base
    st.set(cl.q, b + M_USERS, 0)
    st.set(cl.q, b + M_EXIT_STAGE, cl.q[b + M_EXIT_STAGE] | XS_USERS0)
    return Fault("exit in flight", [], st.undo)


def plant_mm_freeing(cl: "Cluster", mms: dict[int, "MM"]) -> Fault:
    """An mm row being freed (MMS_FREEING: mm_count 0, its objects going):
    not a live mm with a zero mm_count."""
    st = Store()
    free = next(r for r in range(cl.max_mms) if not cl.q[cl.mbase(r) + M_ID])
    st.set(cl.q, cl.mbase(free) + M_STATE, MMS_FREEING)
    st.set(cl.q, cl.mbase(free) + M_ID, 999)
    return Fault("mm being freed", [], st.undo)


# every fsck invariant: (name, planter); the counters ones need counters=True
FSCK_PLANTS: list[tuple[str, Callable[["Cluster", dict[int, "MM"]], Fault]]] = [
    ("stack_invalid", plant_stack_invalid),
    ("stack_twice", plant_stack_twice),
    ("stack_lost", plant_stack_lost),
    ("free_counted", plant_free_counted),
    ("free_flagged", plant_free_flagged),
    ("stack_negative", plant_stack_negative),
    ("stack_top", plant_stack_top),
    ("count_anon", lambda cl, mms: plant_count(cl, mms, False)),
    ("count_ksm", lambda cl, mms: plant_count(cl, mms, True)),
    ("ksm_bytes", plant_ksm_bytes),
    ("pte_not_present", plant_pte_not_present),
    ("pte_free_frame", plant_pte_free_frame),
    ("pte_past_pool", plant_pte_past_pool),
    ("ksm_writable", plant_ksm_writable),
    ("rss", plant_rss),
    ("ksm_mapped", lambda cl, mms: plant_rss(cl, mms, M_KSM_MAPPED)),
    ("counter_sum", plant_counter_sum),
    ("mm_rmap_items", lambda cl, mms: plant_mm_counter(cl, mms, M_RMAP_ITEMS)),
    ("mm_merging", lambda cl, mms: plant_mm_counter(cl, mms, M_MERGING)),
    ("slot_cycle", plant_slot_cycle),
    ("slot_prev", plant_slot_prev),
    ("head_prev", plant_head_prev),
    ("slot_unlinked", plant_slot_unlinked),
    ("mm_users", plant_users),
    ("mm_count_slot", plant_mm_count_slot),
    ("mm_count_zero", plant_mm_count_zero),
    ("slot_freed_listed", plant_slot_freed_listed),
    ("mm_id_twice", plant_mm_id_twice),
    # legal: no error
    ("ok_in_flight", lambda cl, mms: plant_in_flight(cl, mms, False)),
    ("ok_in_flight_installed", lambda cl, mms: plant_in_flight(cl, mms, True)),
    ("ok_being_freed", plant_being_freed),
    ("ok_exit_in_flight", plant_exit_in_flight),
    ("ok_mm_freeing", plant_mm_freeing),
]
