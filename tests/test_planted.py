"""Every checker can fail (issue 16): for each fsck invariant a fault is
planted in a merged cluster (tests/planter.py) and fsck must report exactly
the errors that fault breaks -- live (the supervisor's fsck, with the world
stopped) and offline (a frozen cluster read by a fresh attach, as a
post-mortem) -- and nothing once the fault is undone.  Then a task's
changed page (verify), a task blocked behind a stopped lock holder (the
watchdog) and the statuses that `uksm run` derives from them.

One merged cluster serves every invariant (booted once per module, ksmd
idle at run=0 so that nothing moves while a fault is in place)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

import planter
from helpers import booted, pump, wait_for
from uksm import fsck
from uksm.cluster import Cluster
from uksm.layout import K_FULL_SCANS, K_PAGES_SHARING, M_ID, T_READY
from uksm.mm import mm_attach
from util_machine import set_run


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    name = f"tplant{os.getpid() % 100000}"
    log_dir = str(tmp_path_factory.mktemp("plant"))
    with booted(name, log_dir, run=1, frames=256, va_pages=96, max_mms=8, max_tasks=16,
                pages_to_scan=1000, sleep_ms=2) as sup:
        chs = [sup.spawn_worker(24, "vm", seed) for seed in (1, 2)]
        pump(sup, lambda: all(sup.cl.q[sup.cl.tbase(c.row) + T_READY] for c in chs), what="workers ready")
        q = sup.cl.q
        start = q[K_FULL_SCANS]
        pump(sup, lambda: q[K_FULL_SCANS] >= start + 3 and q[K_PAGES_SHARING] > 0, what="merged")
        set_run(sup, 0)   # ksmd idle: nothing moves while a fault is in place
        yield sup
        set_run(sup, 1)
        assert sup.stop_workers(timeout=40), sup.hung
        sup.wait_ksmd_frees()
        sup.stop_ksmd()
        fs = sup.final_fsck()
        assert fs["ok"], fs["errors"]


def mms_of(sup):
    q = sup.cl.q
    with sup.lock:
        return {i: m for i, m in sup.mms.items() if q[m.base + M_ID] == i}


def offline_fsck(sup) -> list[str]:
    """Freeze every task of the cluster (SIGSTOP), read it through a fresh
    attach with no lock taken (a post-mortem), thaw it."""
    pids = [sup.ksmd.proc.pid] + [c.proc.pid for c in sup.children.values()]
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        wait_for(lambda: all(_state(p) == "T" for p in pids), 10, what="tasks stopped")
        cl = Cluster.attach(sup.name)
        try:
            mms = {i: mm_attach(cl, i) for i in mms_of(sup)}
            return fsck.check(cl, mms, counters=True)
        finally:
            for m in mms.values():
                m.seg.close()
            cl.close()
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)


def assert_reports(errs: list[str], fault: planter.Fault) -> None:
    """fsck reported exactly the fault's errors: each expected message
    once, nothing else."""
    assert len(errs) == len(fault.expect), (fault.what, errs)
    for pat in fault.expect:
        assert len([e for e in errs if re.search(pat, e)]) == 1, (fault.what, pat, errs)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["live", "offline"])
@pytest.mark.parametrize("name,plant", planter.FSCK_PLANTS, ids=[n for n, _p in planter.FSCK_PLANTS])
def test_fsck_reports_each_planted_fault(merged, name, plant, where):
    sup = merged
    assert sup.live_fsck()["errors"] == []
    fault = plant(sup.cl, mms_of(sup))
    try:
        errs = sup.live_fsck()["errors"] if where == "live" else offline_fsck(sup)
    finally:
        fault.undo()
    assert_reports(errs, fault)
    assert sup.live_fsck()["errors"] == [], "the fault was undone"


# ---- verify, the watchdog, and the statuses `uksm run` derives from the checkers ---------------

@pytest.mark.timeout(60)
def test_verify_sees_a_changed_byte(tmp_path):
    """One byte of one ordinary page of a worker changed: its verify at exit
    counts the page (fsck checks no user data, so it stays clean), and the
    cluster's end status is 4."""
    with booted(f"tverify{os.getpid() % 100000}", str(tmp_path), run=0, frames=128, va_pages=64,
                max_tasks=8, max_mms=4) as sup:
        ch = sup.spawn_worker(12, "unique", 3)
        pump(sup, lambda: sup.cl.q[sup.cl.tbase(ch.row) + T_READY], what="worker ready")
        planter.plant_page_data(sup.cl, mms_of(sup), ch.mm)
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
    from uksm.logs import main as logs_main
    log_dir = str(tmp_path)
    with booted(f"thung{os.getpid() % 100000}", log_dir, run=1, frames=256, va_pages=64,
                max_tasks=8, max_mms=4, pages_to_scan=500, sleep_ms=2, hung_timeout_ms=300) as sup:
        ch = sup.spawn_worker(16, "dup:4", 1, churn_ms=2, kill_point="pte_lock_held",
                              kill_sig=signal.SIGSTOP)
        wait_for(lambda: _state(ch.proc.pid) == "T", 30, what="the worker to stop in its pte lock")
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
    from uksm import cli
    from uksm.supervisor import Supervisor
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
                mms = mms_of(self)
                planted.append(planter.plant_page_data(self.cl, mms, min(mms)))
            return stop_workers(self, *a, **k)
        monkeypatch.setattr(Supervisor, "stop_workers", planted_stop)
    status = cli.main(["run", "--workers", "2", "--pages", "16", "--workload", "unique", "--quiet",
                       "--log-dir", str(tmp_path), "--cluster", f"trun4{fault}{os.getpid() % 100000}",
                       "--pages-to-scan", "1000", "--sleep-ms", "5"])
    out = capsys.readouterr().out
    assert planted and status == 4, out
    if fault == "fsck":
        assert re.search(r"^  fsck     FAILED$", out, re.M), out
        assert re.search(r"^           frame \d+ is free but has count 1 flags 0$", out, re.M), out
        assert "32 pages verified, 0 mismatches" in out
    else:
        assert "32 pages verified, 1 mismatches" in out and "  fsck     clean" in out, out
