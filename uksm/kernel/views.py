"""Named views over the shared words: ``cl.trow(r).state`` for
``q[cl.tbase(r) + T_STATE]``, ``cl.mrow(r).users`` for
``q[cl.mbase(r) + M_USERS]``.

A view is the pair (words, base) and one property per field of the row in
``uksm.kernel.layout``; reading or writing through it is the same single
aligned int64 load or store as the raw index (so every crash-consistency
note about one store committing a change holds word for word), for the
price of a descriptor call: 56 ns a read against 20 ns raw, 148 ns with
the view made (timeit, the 2-core dev VM, Python 3.11).  That is nothing
on the supervisor's paths (reaping, recovery, fsck, reports, the daemon)
and too much on the hot ones, which keep raw indexing, each marked
``# hot path: raw words``: ksmd's scan loop (``uksm.kernel.ksmd``), the
MMU's fault and access paths (``uksm.kernel.mmu``), the frame allocator
(``uksm.kernel.memory``), the lock protocol (``uksm.kernel.locks``) and
fsck's walks over every frame and every PTE (``uksm.kernel.fsck``).
"""
from __future__ import annotations

from typing import Any, Generic, TypeVar, overload

from uksm.kernel.layout import (
    M_CREATED_NS,
    M_EXIT_PATH,
    M_EXIT_STAGE,
    M_FLAGS,
    M_FREER_TASK,
    M_ID,
    M_KSM_MAPPED,
    M_MERGING,
    M_OOM_VICTIM,
    M_OWNER_PID,
    M_OWNER_TASK,
    M_PAGES,
    M_REFS,
    M_RMAP_GONE,
    M_RMAP_ITEMS,
    M_RSS,
    M_SLOT_NEXT,
    M_SLOT_PREV,
    M_SLOT_RMAP,
    M_SLOT_USED,
    M_STATE,
    M_USERS,
    M_WORKER_NO,
    M_WRITER_WAITING,
    M_ZERO_PAGES,
    T_COW,
    T_EXIT_PATH,
    T_EXIT_PROGRESS,
    T_EXIT_REASON,
    T_FATAL,
    T_FAULTS,
    T_FLIGHT_MM,
    T_FLIGHT_PFN,
    T_FLIGHT_VPN,
    T_FOR_ROW,
    T_FORK,
    T_FORK_CHILD,
    T_FORK_ERR,
    T_FORK_PARENT,
    T_FORK_PID,
    T_KILL_POINT,
    T_KILL_SIG,
    T_MISMATCHES,
    T_MM,
    T_OOM_ORIGIN,
    T_PAGES,
    T_PID,
    T_PPID,
    T_READY,
    T_ROLE,
    T_SEED,
    T_START_NS,
    T_STATE,
    T_VERIFIED,
    T_WORKER_NO,
    T_WORKLOAD,
)

V = TypeVar("V", bound="Words")


class Word(Generic[V]):
    """One int64 field at offset ``off`` of a view's row."""
    __slots__ = ("off",)

    def __init__(self, off: int) -> None:
        self.off = off

    @overload
    def __get__(self, view: None, owner: type) -> Word[V]: ...
    @overload
    def __get__(self, view: V, owner: type) -> int: ...

    def __get__(self, view: V | None, owner: type) -> int | Word[V]:
        if view is None:
            return self
        return view.q[view.base + self.off]

    def __set__(self, view: V, value: int) -> None:
        view.q[view.base + self.off] = value


class Words:
    """A row of int64 words at ``base`` in ``q`` (a ``memoryview.cast('q')``)."""
    __slots__ = ("q", "base")

    def __init__(self, q: Any, base: int) -> None:
        self.q = q
        self.base = base


class TaskRow(Words):
    """A task table row (``T_*``): one per process or supervisor thread that
    takes cluster locks; its lock entries follow (``uksm.kernel.locks``)."""
    __slots__ = ()
    pid: Word[TaskRow] = Word(T_PID)
    role: Word[TaskRow] = Word(T_ROLE)
    state: Word[TaskRow] = Word(T_STATE)             # TS_FREE, TS_ALIVE, TS_DEAD, TS_REAPING
    mm: Word[TaskRow] = Word(T_MM)
    start_ns: Word[TaskRow] = Word(T_START_NS)
    worker_no: Word[TaskRow] = Word(T_WORKER_NO)
    pages: Word[TaskRow] = Word(T_PAGES)
    verified: Word[TaskRow] = Word(T_VERIFIED)
    mismatches: Word[TaskRow] = Word(T_MISMATCHES)
    exit_reason: Word[TaskRow] = Word(T_EXIT_REASON)
    kill_point: Word[TaskRow] = Word(T_KILL_POINT)
    kill_sig: Word[TaskRow] = Word(T_KILL_SIG)
    flight_pfn: Word[TaskRow] = Word(T_FLIGHT_PFN)   # a frame in flight (popped, not yet mapped)
    flight_mm: Word[TaskRow] = Word(T_FLIGHT_MM)
    flight_vpn: Word[TaskRow] = Word(T_FLIGHT_VPN)
    fatal: Word[TaskRow] = Word(T_FATAL)             # a fatal signal pending (TIF_MEMDIE's stand-in)
    ready: Word[TaskRow] = Word(T_READY)
    cow: Word[TaskRow] = Word(T_COW)
    faults: Word[TaskRow] = Word(T_FAULTS)
    for_row: Word[TaskRow] = Word(T_FOR_ROW)         # a reaper: the dead task's row
    workload: Word[TaskRow] = Word(T_WORKLOAD)
    seed: Word[TaskRow] = Word(T_SEED)
    exit_path: Word[TaskRow] = Word(T_EXIT_PATH)
    oom_origin: Word[TaskRow] = Word(T_OOM_ORIGIN)   # PF_OOM_ORIGIN
    exit_progress: Word[TaskRow] = Word(T_EXIT_PROGRESS)
    fork: Word[TaskRow] = Word(T_FORK)               # FORK_ASK, FORK_GO, FORK_DONE, or -errno
    fork_child: Word[TaskRow] = Word(T_FORK_CHILD)   # 1 + the new task's row, a fork in flight
    fork_err: Word[TaskRow] = Word(T_FORK_ERR)
    fork_pid: Word[TaskRow] = Word(T_FORK_PID)
    fork_parent: Word[TaskRow] = Word(T_FORK_PARENT)  # a task being made: 1 + its parent's row
    ppid: Word[TaskRow] = Word(T_PPID)               # its parent's pid (1: reparented to init)


class MmRow(Words):
    """An mm table row (``M_*``): ``mm_struct``'s counts and state, and its
    ``mm_slot`` (the slot links are under ksm_mmlist_lock)."""
    __slots__ = ()
    id: Word[MmRow] = Word(M_ID)
    state: Word[MmRow] = Word(M_STATE)               # MMS_FREE, MMS_LIVE, MMS_EXITING, MMS_ZOMBIE, MMS_FREEING
    owner_pid: Word[MmRow] = Word(M_OWNER_PID)
    owner_task: Word[MmRow] = Word(M_OWNER_TASK)
    users: Word[MmRow] = Word(M_USERS)               # mm_users
    refs: Word[MmRow] = Word(M_REFS)                 # mm_count, as REF_USERS | REF_KSM bits
    flags: Word[MmRow] = Word(M_FLAGS)               # MMF_VM_MERGEABLE, MMF_VM_MERGE_ANY (6.18)
    rss: Word[MmRow] = Word(M_RSS)
    ksm_mapped: Word[MmRow] = Word(M_KSM_MAPPED)
    rmap_items: Word[MmRow] = Word(M_RMAP_ITEMS)
    merging: Word[MmRow] = Word(M_MERGING)
    exit_stage: Word[MmRow] = Word(M_EXIT_STAGE)     # XS_* bits: the exit steps done
    exit_path: Word[MmRow] = Word(M_EXIT_PATH)
    oom_victim: Word[MmRow] = Word(M_OOM_VICTIM)
    writer_waiting: Word[MmRow] = Word(M_WRITER_WAITING)
    slot_used: Word[MmRow] = Word(M_SLOT_USED)
    slot_next: Word[MmRow] = Word(M_SLOT_NEXT)
    slot_prev: Word[MmRow] = Word(M_SLOT_PREV)
    slot_rmap: Word[MmRow] = Word(M_SLOT_RMAP)       # the slot's rmap_item count
    pages: Word[MmRow] = Word(M_PAGES)
    created_ns: Word[MmRow] = Word(M_CREATED_NS)
    freer_task: Word[MmRow] = Word(M_FREER_TASK)     # 1 + the row of the task freeing it
    zero_pages: Word[MmRow] = Word(M_ZERO_PAGES)     # mm->ksm_zero_pages (6.6; 6.18 only)
    worker_no: Word[MmRow] = Word(M_WORKER_NO)
    rmap_gone: Word[MmRow] = Word(M_RMAP_GONE)       # the run=2 that removed its rmap_items


__all__ = ["Word", "Words", "TaskRow", "MmRow"]
