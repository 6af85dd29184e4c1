"""The built-in scenarios of ``uksm explore``: scripts on a ``uksm.Machine``.

Each is what a user would write for ``uksm.explore``: a few tasks of one or
two pages set up with no choices made (written, merged by ksmd), then
``m.race()`` -- from there the strategies choose -- and the operations that
race, issued together inside ``with m.race():``.  The script's end is the
Machine's close: every task still alive exits through its path, ksmd frees
what the exits leave it and stops; then the run is checked.  Small enough
to explore exhaustively at two preemptions (docs/EXPLORE.md has each
one's space and time).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uksm.api import Machine


def merged(m: Machine, sharing: int, scans: int) -> None:
    """Wait until ksmd has merged ``sharing`` pages and made ``scans``
    full scans (the counters are published at a batch's end)."""
    m.wait(lambda: m.ksm["pages_sharing"] >= sharing and m.ksm["full_scans"] >= scans,
           what=f"{sharing} pages merged and {scans} full scans")


def oom_unmerge(m: Machine) -> None:
    """The seed's case: two tasks' pages merged, memory limited to the
    merged state, run=2 written: the writer unmerges in its own context,
    short of memory, against the OOM victims' exits (the exit policy
    decides who waits for whom)."""
    a, b = m.task(pages=1), m.task(pages=1)
    a.fill(1)
    b.fill(1)
    merged(m, 1, 2)
    m.ksm["mem_limit"] = m.ksm["frames_used"]   # the merged state, no headroom
    with m.race():
        m.ksm["run"] = 2


def oom_merge(m: Machine) -> None:
    """2.6.32's try_to_merge_two_pages allocates the new KSM page: two
    tasks' equal pages, checksummed by one full scan and not merged yet,
    memory limited to what they use; the next scan's merge finds no
    frame for the KSM page while ksmd holds ksm_thread_mutex, and
    OOM-kills a task, whose exit the exit policy decides (the seed's first
    sentence: under ``legacy`` the victim waits for that mutex in
    __ksm_exit)."""
    a, b = m.task(pages=1), m.task(pages=1)
    a.fill(1)
    b.fill(1)
    m.wait_full_scans(1)   # rmap_items and checksums: the next pass merges
    m.ksm["mem_limit"] = m.ksm["frames_used"]   # the two pages, no headroom
    with m.race():
        m.wait_full_scans(1)


def exit_vs_ksmd(m: Machine) -> None:
    """Two tasks exit while ksmd scans: one with an rmap_item (the slow
    path, or no slot if ksmd frees it first) and LTP ksm05's (madvised,
    never written: the fast path)."""
    t1, t2 = m.task(pages=1), m.task(pages=1)
    t1.fill(1)
    m.wait_full_scans(1)
    with m.race():
        t1.exit()
        t2.exit()


def madvise_vs_ksmd(m: Machine) -> None:
    """A task makes its merged pages UNMERGEABLE (down_write, break_ksm)
    and writes one, while ksmd scans and the other task exits."""
    t1, t2 = m.task(pages=2), m.task(pages=2)
    t1.fill(1)
    t2.fill(1)
    merged(m, 1, 1)
    with m.race():
        t1.madvise(0, 2, "UNMERGEABLE")
        t1.write(0, b"\5" * 64)
        t2.exit()


def ksm05(m: Machine) -> None:
    """LTP ksm05's task: it madvises two pages it never writes and exits,
    while run=1 wakes ksmd (CVE-2011-2183's window, and the 2016 up_read's)."""
    t = m.task(pages=2)
    with m.race():
        m.ksm["run"] = 1
        t.exit()


def run2_vs_exit(m: Machine) -> None:
    """Two tasks' pages merged; run=2 unmerges while one of them exits (the
    2023 VMA teardown race); the other exits at the end."""
    t1, t2 = m.task(pages=2), m.task(pages=2)
    t1.fill(1, 0, 1)
    t1.fill(2, 1, 1)
    t2.fill(1, 0, 1)
    t2.fill(2, 1, 1)
    merged(m, 2, 2)
    with m.race():
        m.ksm["run"] = 2
        t1.exit()


def zero_vs_exit(m: Machine) -> None:
    """6.18, use_zero_pages: ksmd maps a task's two zero pages to the zero
    page (the PTE store, then ksm_zero_pages: 6.18's new commit point)
    while the task writes one of them (COW of the zero page) and exits
    (zap: ksm_might_unmap_zero_page); fsck wants the count to match the
    zero PTEs, and 0 at the end."""
    m.ksm["use_zero_pages"] = 1
    t = m.task(pages=2)
    t.fill(0)
    m.wait_full_scans(1)    # the checksums are stable: the next look merges
    with m.race():
        t.write(0, b"\1")
        t.exit()


@dataclass
class Scenario:
    name: str
    fn: Callable[[Machine], Any]
    options: dict[str, Any] = field(default_factory=dict)   # the Machine's (uksm.api.controlled_options)

    @property
    def doc(self) -> str:
        return " ".join((self.fn.__doc__ or "").split())


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("oom-unmerge", oom_unmerge),
    Scenario("oom-merge", oom_merge),
    Scenario("exit-vs-ksmd", exit_vs_ksmd),
    Scenario("madvise-vs-ksmd", madvise_vs_ksmd),
    Scenario("ksm05", ksm05, {"run": 0}),
    Scenario("run2-vs-exit", run2_vs_exit),
    Scenario("zero-vs-exit", zero_vs_exit, {"kernel": "6.18"}),
]}

__all__ = ["SCENARIOS", "Scenario", "oom_unmerge", "oom_merge", "exit_vs_ksmd", "madvise_vs_ksmd", "ksm05",
           "run2_vs_exit", "zero_vs_exit"]
