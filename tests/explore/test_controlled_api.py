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
