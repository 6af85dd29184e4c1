"""Every checker can fail (issue 16), continued: a task's changed page
(verify), a task blocked behind a stopped lock holder (the watchdog), and
the statuses `uksm run` derives from them.  Each boots its own small
cluster (in this process: one at a time, the log is process-wide)."""
from __future__ import annotations

import re
import signal

import pytest

import planter
from helpers import booted, cname, proc_state, pump, wait_for
from uksm.kernel.layout import T_READY
from util_machine import live_mms


@pytest.mark.timeout(60)
def test_verify_sees_a_changed_byte(tmp_path):
    """One byte of one ordinary page of a worker changed: its verify at exit
    counts the page (fsck checks no user data, so it stays clean), and the
    cluster's end status is 4."""
    with booted(cname("tverify"), str(tmp_path), run=0, frames=128, va_pages=64,
                max_tasks=8, max_mms=4) as sup:
        ch = sup.spawn_worker(12, "unique", 3)
        pump(sup, lambda: sup.cl.q[sup.cl.tbase(ch.row) + T_READY], what="worker ready")
        planter.plant_page_data(sup.cl, live_mms(sup), ch.mm)
        end = sup.shutdown()
    assert end["integrity"] == {"pages_verified": 12, "mismatches": 1}, end
    assert end["fsck"]["ok"], end["fsck"]
    assert end["status"] == 4


@pytest.mark.timeout(60)
def test_watchdog_reports_a_task_blocked_behind_a_stopped_holder(tmp_path):
    """A worker stops itself (SIGSTOP at kill point pte_lock_held) holding
    its pte lock; ksmd, scanning that mm, blocks on it.  The watchdog
    reports ksmd with the chain to the stopped holder; the cluster's end
    status is 3, and `uksm logs check` finds the hung task in the logs."""
    from uksm.cli.logs import main as logs_main
    log_dir = str(tmp_path)
    with booted(cname("thung"), log_dir, run=1, frames=256, va_pages=64,
                max_tasks=8, max_mms=4, pages_to_scan=500, sleep_ms=2, hung_timeout_ms=300) as sup:
        ch = sup.spawn_worker(16, "dup:4", 1, churn_ms=2, kill_point="pte_lock_held",
                              kill_sig=signal.SIGSTOP)
        wait_for(lambda: proc_state(ch.proc.pid) == "T", 30, what="the worker to stop in its pte lock")
        h = wait_for(lambda: sup.hung, 30, what="the hung-task report")[0]
        end = sup.shutdown()
        sup.log_stop(end["status"])
    assert h["role"] == "ksmd" and h["lock"].startswith("pte_lock"), h
    assert h["waited_s"] >= 0.3 and not h["deadlock"], h
    assert re.match(rf"ksmd \(pid \d+\) waits for {re.escape(h['lock'])} for [\d.]+s, held by worker w1 "
                    rf"\(pid {ch.proc.pid}, mm{ch.mm}\)$", h["chain"][0]), h["chain"]
    assert h["chain"][1] == f"worker w1 (pid {ch.proc.pid}, mm{ch.mm}) is running (not blocked)", h["chain"]
    assert end["status"] == 3, end
    assert logs_main([log_dir, "check"]) == 4


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["fsck", "verify"])
def test_run_exits_4_on_a_planted_fault(fault, tmp_path, monkeypatch, capsys):
    """`uksm run` (in this process, plain-text report) with a fault planted
    just before its final fsck (a free frame with a count) or before its
    workers verify (a changed byte): status 4, and the report says why."""
    from uksm.cli import main as cli
    from uksm.proc.supervisor import Supervisor
    planted: list[planter.Fault] = []
    if fault == "fsck":
        final_fsck = Supervisor.final_fsck

        def planted_fsck(self):
            planted.append(planter.plant_free_counted(self.cl, {}))
            return final_fsck(self)
        monkeypatch.setattr(Supervisor, "final_fsck", planted_fsck)
    else:
        stop_workers = Supervisor.stop_workers

        def planted_stop(self, *a, **k):
            if not planted:
                mms = live_mms(self)
                planted.append(planter.plant_page_data(self.cl, mms, min(mms)))
            return stop_workers(self, *a, **k)
        monkeypatch.setattr(Supervisor, "stop_workers", planted_stop)
    status = cli.main(["run", "--workers", "2", "--pages", "16", "--workload", "unique", "--quiet",
                       "--log-dir", str(tmp_path), "--cluster", cname(f"trun4{fault}"),
                       "--pages-to-scan", "1000", "--sleep-ms", "5"])
    out = capsys.readouterr().out
    assert planted and status == 4, out
    if fault == "fsck":
        assert re.search(r"^  fsck     FAILED$", out, re.M), out
        assert re.search(r"^           frame \d+ is free but has count 1 flags 0$", out, re.M), out
        assert "32 pages verified, 0 mismatches" in out
    else:
        assert "32 pages verified, 1 mismatches" in out and "  fsck     clean" in out, out
