"""The Machine API under a controlled schedule: what it serves and how.

``Machine(deterministic=True)`` serves the daemon's requests on the
explorer's world (uksm.explorer.requests); every wait is logical.
"""
from __future__ import annotations

import pytest

import uksm


@pytest.mark.timeout(120)
def test_a_wait_whose_condition_holds_still_lets_the_machine_move():
    """A free run's wait serves its duties once before it looks
    (Machine.wait's tick): a script that polls -- m.wait(lambda: True),
    m.sleep(0) -- sees the machine go on.  Under control such a wait did
    not step, and the loop spun for ever on a frozen run."""
    for poll in ("wait", "sleep"):
        with uksm.Machine(deterministic=True, seed=1, frames=64, max_pages=4) as m:
            t = m.task(pages=2)
            t.fill(3)
            start, polls = m.ksm["full_scans"], 0
            while m.ksm["full_scans"] < start + 2:
                polls += 1
                assert polls < 5000, f"m.{poll} never let the run move (full_scans {m.ksm['full_scans']})"
                if poll == "wait":
                    assert m.wait(lambda: True) is True
                else:
                    m.sleep(0)
            assert m.ksm["pages_sharing"] == 1
        assert m.report["status"] == 0, m.report["findings"]


@pytest.mark.timeout(120)
def test_a_wait_that_holds_when_nothing_can_run_is_no_hang():
    """Every process idle (ksmd with nothing to scan, run=0): a wait whose
    condition holds returns; one that cannot hold is the run's hang."""
    with uksm.Machine(deterministic=True, seed=1, frames=64, max_pages=4, run=0) as m:
        m.wait(lambda: True)
        m.sleep(0)
        with pytest.raises(uksm.HungTask, match="hung: nothing can run"):
            m.wait(lambda: m.ksm["full_scans"] > 0)
    assert m.report["findings"][0]["finding"] == "hung"


def churn_through_slots(m: uksm.Machine, capacity: int) -> tuple:
    """More processes over the run than the gate has slots: tasks that
    exit, are killed (a reaper each) and fork, one after another."""
    m._tr.world.capacity = capacity   # type: ignore[union-attr]  # the gate's 256, made small
    seen = []
    for i in range(6):
        t = m.task(pages=2)
        t.fill(i)
        if i % 3 == 0:
            seen.append(t.kill())
        elif i % 3 == 1:
            c = t.fork()
            seen += [c.verify(), t.exit(), c.exit()]
        else:
            seen.append(t.exit())
    return tuple(seen), m.stats()


@pytest.mark.timeout(120)
def test_a_controlled_run_reuses_the_slots_of_processes_reaped():
    """The gate has a fixed number of slots (256); a run that starts more
    processes than that over its life -- uksm inject --deterministic with
    many kills -- reuses the slot of one that is over (the lowest: a replay
    reuses the same), and replays exactly."""
    runs = []
    for kw in ({"deterministic": True, "seed": 4}, None):
        kw = kw or {"schedule": runs[0][2]}
        with uksm.Machine(frames=64, max_pages=4, **kw) as m:
            seen = churn_through_slots(m, 4)
        assert m.report["status"] == 0 and m.report["fsck"]["ok"], m.report["findings"]
        runs.append((seen, m.report["workers"], m.report["schedule"], m.report["steps"]))
    assert runs[0] == runs[1]
    assert runs[0][1]["started"] == 8 and runs[0][1]["killed"] == 2   # 6 tasks, 2 children; 2 reapers
    # no room at all: every slot is a live process -- one line, the run ends cleanly
    with uksm.Machine(deterministic=True, seed=4, frames=64, max_pages=4) as m:
        m._tr.world.capacity = 3   # type: ignore[union-attr]
        m.task(pages=1)
        m.task(pages=1)
        with pytest.raises(uksm.MachineError, match="room for 3 processes at once"):
            m.task(pages=1)
    assert m.report["fsck"]["ok"]


@pytest.mark.timeout(120)
def test_what_is_not_served_under_control_says_so():
    with uksm.Machine(deterministic=True, seed=1, frames=64, max_pages=4) as m:
        t = m.task(pages=2)
        t.fill(1)
        with m.race():
            with pytest.raises(ValueError, match="fork inside 'with m.race\\(\\):' is not served under a "
                                                 "controlled schedule"):
                t.fork()
        with pytest.raises(ValueError, match="'down' is not served under a controlled schedule"):
            m.down()
        assert t.fork().read(0, 2) == b"\x01\x01"   # after the block: served
    assert m.report["status"] == 0, m.report["findings"]
