"""Kill points on the exit path, as a user drives them (issue 28, item 4
and the legacy kill points of item 8).

``t.kill("TERM", at=POINT)`` at an exit point: the task is exiting when
it passes the point, so the SIGTERM it sends itself changes nothing; the
exit runs to its end and the call returns the __ksm_exit path (it raised
KillPointMissed, naming the path, although the point was hit).  Under
``legacy`` the slow-path points do not exist: refused up front, the task
untouched (it was driven into its exit and used up)."""
from __future__ import annotations

import pytest

import uksm
from helpers import unique_name

pytestmark = pytest.mark.timeout(120)

def machine(**kw):
    return uksm.Machine(name=unique_name("texp"), frames=128, sleep_millisecs=5, **kw)


def merged(m: uksm.Machine, n: int = 3) -> list[uksm.Task]:
    ts = [m.task(pages=4) for _ in range(n)]
    for t in ts:
        t.fill(5)
    m.wait_full_scans(2)   # each task has rmap_items: its exit takes the slow path
    return ts


@pytest.mark.parametrize("point, paths", [("ksm_exit_before_down_write", ("slow",)),
                                          ("ksm_exit_mmap_sem_write", ("slow",)),
                                          ("exit_mid_zap", ("fast", "slow", "none"))])
def test_term_at_an_exit_point_returns_the_exit_path(point, paths):
    """ksmd is stopped across the exit: under the seed's placement
    __ksm_exit runs after exit_mmap's unmap, and a batch in between sees
    ksm_test_exit, frees the slot first, and the exit takes no path
    (the slow-path points missed).  run=0, written under ksm_thread_mutex,
    keeps every batch out of that window; run=1 then lets ksmd free the
    slot the slow path left it."""
    with machine() as m:
        ts = merged(m)
        hits = m.stats()["kill_points_hit"]
        m.ksm["run"] = 0
        assert ts[0].kill("TERM", at=point) in paths
        m.ksm["run"] = 1
        assert m.stats()["kill_points_hit"] == hits + 1       # it was passed, once
        assert ts[0].path in paths
        with pytest.raises(uksm.TaskExited):
            ts[0].verify()
        assert ts[1].verify() == 4 and m.fsck()["ok"]
    assert m.report is not None and m.report["status"] == 0, m.report


def test_a_missed_exit_point_names_the_point_and_the_path():
    """A task with no rmap_items exits by the fast path, which has no
    down_write: the message says which point, and which path it took."""
    with machine(run=0) as m:
        t = m.task(pages=2)
        t.fill(1)
        with pytest.raises(uksm.KillPointMissed) as ei:
            t.kill("TERM", at="ksm_exit_mmap_sem_write")
        msg = str(ei.value)
        assert "ksm_exit_mmap_sem_write was not reached" in msg and "fast path" in msg, msg


@pytest.mark.parametrize("point", ["ksm_exit_before_down_write", "ksm_exit_mmap_sem_write"])
def test_legacy_refuses_the_slow_path_points_and_keeps_the_task(point):
    with machine(exit_policy="legacy") as m:
        t = merged(m, 2)[0]
        for sig in ("KILL", "TERM"):
            with pytest.raises(ValueError, match=f"{point} is never reached under exit policy "
                                                 f"legacy"):
                t.kill(sig, at=point)
        with pytest.raises(ValueError, match="never reached"):
            t.arm(point)
        assert t.verify() == 4 and t.path is None           # untouched, alive
        assert t.kill("KILL", at="exit_mid_zap") in ("legacy", "none")
    assert m.report is not None and m.report["status"] == 0, m.report
