"""Killing ksmd is out of scope for the kernel model, but the machine must
not hang: the supervisor recovers the locks ksmd held, starts a new ksmd,
and the cluster still stops cleanly and leaves nothing behind; the report
says what happened."""
from __future__ import annotations

import signal

import pytest

from helpers import PID, booted, pump
from uksm.host import shm
from uksm.kernel.layout import T_READY, stats_block


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rep", range(3))
def test_ksmd_killed_cluster_still_tears_down(rep):
    name = f"tksmdkill{rep}p{PID}"
    with booted(name, run=1, frames=1024, va_pages=256, pages_to_scan=1000, sleep_ms=1) as sup:
        kids = [sup.spawn_worker(64, "dup:4", 1) for _ in range(2)]
        pump(sup, lambda: all(sup.cl.q[sup.cl.tbase(c.row) + T_READY] for c in kids), what="ready")
        sup.ksmd.proc.send_signal(signal.SIGKILL)
        old = sup.ksmd.proc.pid
        pump(sup, lambda: sup.ksmd is not None and sup.ksmd.proc.pid != old, what="a new ksmd")
        assert any("ksmd died" in e for e in sup.errors)
        assert sup.stop_workers(timeout=60), f"workers did not exit: hung={sup.hung}"
        sup.ksmdctl.wait_frees()
        sup.stop_ksmd()
        fs = sup.final_fsck()
        assert fs["ok"], fs["errors"]
        assert stats_block(sup.cl.q)["exited"] == 2 and not sup.children
    assert shm.leftovers(name) == []
