"""``uksm run --until-merged``'s convergence (``uksm.proc.run.drive``),
on a scripted cluster: each main-loop poll publishes the next state of the
counters, and the test reads at which full scan the loop stopped.

The rule: three equal samples of (pages_shared, pages_sharing,
rmap_items) at full-scan ends, every worker ready -- or, without churn,
the end of a pass begun after every worker was ready (``full_scans`` >=
its value when they were first seen ready, plus 2) with every rmap_item
stable (``merged_since``)."""
from __future__ import annotations

import queue
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest

from uksm.host.log import NULL_LOG
from uksm.kernel.layout import K_FULL_SCANS, K_PAGES_SHARED, K_PAGES_SHARING, K_PAGES_UNSHARED, K_RMAP_ITEMS, K_RUN
from uksm.proc.run import Progress, RunOptions, drive

pytestmark = pytest.mark.timeout(30)

# (full_scans, pages_shared, pages_sharing, pages_unshared, rmap_items, every worker ready)
State = tuple[int, int, int, int, int, bool]


class _Task:
    """ksm_thread_mutex, always free (ksmd is scripted)."""

    def __init__(self) -> None:
        self.locked = 0

    def lock_bounded(self, _lk: Any, _timeout: float, _between: Any) -> None:
        self.locked += 1

    def unlock(self, _lk: Any) -> None:
        pass


class ScriptedSup:
    """The supervisor's face that ``drive`` sees; ``poll`` publishes the
    script's next state (the last one stays)."""

    def __init__(self, script: list[State]) -> None:
        self.script = script
        self.step = -1
        self.cl = SimpleNamespace(q=defaultdict(int), task=_Task(), daemon=object())
        self.cl.q[K_RUN] = 1
        self.hung: list[Any] = []
        self.failed = ""    # no task failed to start
        self.ksmd = object()
        self.recovery = SimpleNamespace(dead_q=queue.Queue())
        self.log = NULL_LOG
        self.ready = False

    def poll(self) -> None:
        self.step = min(self.step + 1, len(self.script) - 1)
        q = self.cl.q
        (q[K_FULL_SCANS], q[K_PAGES_SHARED], q[K_PAGES_SHARING], q[K_PAGES_UNSHARED],
         q[K_RMAP_ITEMS], self.ready) = self.script[self.step]

    def sweep(self) -> None:
        pass

    def workers_alive(self) -> int:
        return 2

    def workers_ready(self) -> bool:
        return self.ready

    def settled(self) -> bool:
        return True


def stops_at(script: list[State], churn_ms: int = 0) -> int:
    """The full_scans value the loop stopped at."""
    sup = ScriptedSup(script)
    o = RunOptions(workers=2, pages=32, workload="dup:4", until_merged=True, max_duration=10.0,
                   churn_ms=churn_ms, quiet=True)
    hung, _extra = drive(sup, o, time.monotonic(), Progress(True), lambda: False)  # type: ignore[arg-type]
    assert not hung and sup.step < len(script) - 1, "did not converge within the script"
    return sup.cl.q[K_FULL_SCANS]


MERGED = (4, 60, 0, 64)  # every rmap_item stable: 4 KSM pages, 60 sharing them
TAIL = [(s, *MERGED, True) for s in range(7, 14)]


def test_all_stable_stops_at_the_end_of_the_first_whole_pass_after_ready():
    # ready while pass 6 runs (full_scans 5): pass 7 is the first to begin
    # after it; merged by then: stop there, not two quiet passes later (9)
    script = [(5, 0, 0, 0, 40, True), (6, 4, 50, 6, 64, True), *TAIL]
    assert stops_at(script) == 7


def test_not_before_a_whole_pass_since_ready():
    # everything stable already at full_scans 6 and 7, but the workers were
    # first seen ready at 6: pass 8 is the first whole one; the counters
    # move (a page is still being added), so only the stable rule can stop
    # it -- at 8, not 7
    script = [(5, 0, 0, 0, 40, False), (6, 4, 58, 0, 62, True), (7, 4, 59, 0, 63, True),
              (8, 4, 60, 0, 64, True), (9, 4, 61, 0, 65, True), (10, 4, 62, 0, 66, True),
              (11, 4, 63, 0, 67, True), (12, 4, 64, 0, 68, True)]
    assert stops_at(script) == 8


def test_pages_left_in_the_unstable_tree_need_three_equal_samples():
    # unique pages stay unshared: the stable rule never holds; the counters
    # unchanged over two passes (samples at 7, 8, 9) end it
    script = [(5, 0, 0, 0, 40, True), (6, 4, 40, 20, 64, True),
              *[(s, 4, 50, 10, 64, True) for s in range(7, 14)]]
    assert stops_at(script) == 9


def test_with_churn_only_three_equal_samples():
    # --churn-ms rewrites pages at any time: no short cut
    script = [(5, 0, 0, 0, 40, True), (6, 4, 50, 6, 64, True), *TAIL]
    assert stops_at(script, churn_ms=5) == 9
