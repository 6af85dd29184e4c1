"""uksm/proc/reaper.py, the supervisor's wait4: a child that ran its whole
exit is accounted as it left (exit path, pages verified, not reaped); one
SIGKILLed before its exit goes to recovery, then a reaper thread runs its
``mmput`` on its behalf (reaped, "sigkill", its __ksm_exit path); the
exit paths add up to the exits; a task that died of its own error is no
kill (``own_error``).  Each test boots a cluster in this process."""
from __future__ import annotations

import signal

import pytest

from helpers import booted, cname, log_events, pump
from uksm.kernel.layout import K_FULL_SCANS, M_RMAP_ITEMS, T_READY, stats_block
from uksm.kernel.oom import OOM_SIGNAL
from uksm.proc.reaper import own_error
from util_machine import set_run

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("status,error", [
    (0, False), (1, True), (70, True),
    (-signal.SIGKILL, False), (-signal.SIGTERM, False), (-signal.SIGINT, False), (-signal.SIGHUP, False),
    (-OOM_SIGNAL, False),                                 # the OOM killer's, before the handler is in
    (-signal.SIGSEGV, True), (-signal.SIGBUS, True), (-signal.SIGABRT, True),
    (None, False),                                        # still running
])
def test_own_error(status, error):
    assert own_error(status) is error


def test_a_clean_exit_and_a_sigkilled_one_are_each_accounted_as_they_left(tmp_path):
    """Two workers merged, ksmd stopped with their rmap_items (run=0): one
    SIGTERMed exits by itself (accounted by poll: not reaped, "signal",
    its pages verified), one SIGKILLed has its exit run by a reaper
    (reaped, "sigkill", counted killed); both take the slow path (ksmd
    holds their rmap_items), and the paths add up."""
    with booted(cname("treap"), str(tmp_path), run=1, frames=256, va_pages=64, max_tasks=12, max_mms=6,
                pages_to_scan=1000, sleep_ms=2) as sup:
        a, b = sup.spawn_worker(16, "dup:4", 1), sup.spawn_worker(16, "dup:4", 2)
        q = sup.cl.q
        pump(sup, lambda: all(q[sup.cl.tbase(c.row) + T_READY] for c in (a, b)), what="ready")
        start = q[K_FULL_SCANS]
        pump(sup, lambda: q[K_FULL_SCANS] >= start + 2 and all(q[sup.mms[c.mm].base + M_RMAP_ITEMS] for c in (a, b)),
             what="both merged")
        set_run(sup, 0)
        a.proc.send_signal(signal.SIGTERM)
        b.proc.send_signal(signal.SIGKILL)
        pump(sup, lambda: not sup.children and sup.settled(), what="both exits accounted")
        st = stats_block(q)
        assert (st["exited"], st["exit_slow"], st["killed"], st["reaped"]) == (2, 2, 1, 1), st
        assert st["exit_fast"] + st["exit_slow"] + st["exit_legacy"] + st["exit_noslot"] == st["exited"]
        set_run(sup, 1)
        end = sup.shutdown()
        sup.log_stop(end["status"])
    assert end["status"] == 0 and end["integrity"] == {"pages_verified": 16, "mismatches": 0}, end
    exits = {e["worker_pid"]: e for e in log_events(tmp_path, "worker_exit")}
    ea, eb = exits[a.proc.pid], exits[b.proc.pid]
    assert (ea["how"], ea["path"], ea["reaped"]) == ("signal", "slow", False), ea
    assert (eb["how"], eb["path"], eb["reaped"]) == ("sigkill", "slow", True), eb
    # the reaper logged the dead task's exit, as the task itself would have
    (ksm_exit,) = [e for e in log_events(tmp_path, "ksm_exit") if e["mm"] == b.mm]
    assert ksm_exit["role"] == "reaper" and ksm_exit["path"] == "slow", ksm_exit
