"""Promises of the CLI that no other test held it to (issue 16): `uksm
fsck` and `down` exit 4 on a planted fault, `down`'s statuses 3 and 1,
`cleanup` refusing a live cluster, `ctl` checking every value before it
writes any, $UKSM_CLUSTER, and argparse's own errors as one line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

import planter
from helpers import ROOT, Up, gone_or_zombie, proc_state, run_group, wait_for
from uksm.host import shm
from uksm.kernel import fsck, killpoints
from uksm.kernel.layout import (
    H_KSMD_PID,
    K_PAGES_TO_SCAN,
    K_SLEEP_MS,
    R_WORKER,
    T_PID,
    T_READY,
    T_ROLE,
    T_STATE,
    TS_ALIVE,
)


def worker_rows(cl) -> list[int]:
    q = cl.q
    return [r for r in range(cl.max_tasks) if q[cl.tbase(r) + T_ROLE] == R_WORKER
            and q[cl.tbase(r) + T_STATE] == TS_ALIVE and q[cl.tbase(r) + T_READY]]


@pytest.mark.timeout(100)
def test_fsck_and_down_exit_4_on_a_planted_fault(cluster: Up) -> None:
    cluster.up("--workers", "2", "--pages", "24", "--workload", "vm", "--frames", "256",
               "--sleep-ms", "5")
    cl = cluster.attach()
    try:
        wait_for(lambda: len(worker_rows(cl)) == 2, 30, what="workers ready")
        assert cluster("fsck").returncode == 0
        # a free frame given a count, under zone_lock (the allocator's lock)
        with fsck.world_stopped(cl, {}):
            fault = planter.plant_free_counted(cl, {})
        p = cluster("fsck")
        assert p.returncode == 4, p.stdout + p.stderr
        assert "FAILED" in p.stdout and "is free but has count 1 flags 0" in p.stdout, p.stdout
        with fsck.world_stopped(cl, {}):
            fault.undo()
        assert cluster("fsck").returncode == 0
        # a free frame lost from the free stack: still lost after every exit
        with fsck.world_stopped(cl, {}):
            lost = planter.plant_stack_lost(cl, {})
    finally:
        cl.close()
    p = cluster("down", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 4 and r["status"] == 4, p.stdout + p.stderr
    pfn = lost.info["pfn"]
    assert f"frame {pfn} leaked: count 0, not on the free stack (flags 0)" in r["fsck"]["errors"], r["fsck"]
    # and check_leaks' count of frames in use once every task has exited
    assert "leak: 1 frames still in use after every task exited" in r["fsck"]["errors"], r["fsck"]
    assert not shm.leftovers(cluster.name)


@pytest.mark.timeout(100)
def test_down_exits_3_after_a_hung_task(cluster: Up) -> None:
    """A worker stopped (SIGSTOP at pte_lock_held) in its pte lock, ksmd
    blocked behind it: down reports the hung task and exits 3."""
    cluster.up("--workers", "1", "--pages", "16", "--workload", "dup:4", "--frames", "128",
               "--sleep-ms", "2", "--pages-to-scan", "500", "--churn-ms", "2",
               "--hung-task-timeout", "0.3")
    cl = cluster.attach()
    try:
        row = wait_for(lambda: worker_rows(cl), 30, what="worker ready")[0]
        pid = cl.q[cl.tbase(row) + T_PID]
        killpoints.arm_worker(cl, row, "pte_lock_held", signal.SIGSTOP)
        wait_for(lambda: proc_state(pid) == "T", 30, what="the worker to stop in its pte lock")
    finally:
        cl.close()
    p = cluster("down")
    assert p.returncode == 3, p.stdout + p.stderr
    # the report names the hung task: ksmd, blocked on the stopped worker's pte lock
    assert re.search(r"^  HUNG     ksmd pid \d+ blocked on pte_lock\S* for [\d.]+s$", p.stdout, re.M), p.stdout
    assert f"held by worker w1 (pid {pid}, mm" in p.stdout, p.stdout
    assert gone_or_zombie(pid)


@pytest.mark.timeout(100)
def test_down_exits_1_after_ksmd_died(cluster: Up) -> None:
    """ksmd SIGKILLed: recovered and restarted, the cluster stays clean,
    but down reports the death ("anything else": status 1)."""
    cluster.up("--workers", "1", "--pages", "16", "--workload", "dup:4", "--frames", "128")
    cl = cluster.attach()
    try:
        wait_for(lambda: worker_rows(cl), 30, what="worker ready")
        ksmd = cl.q[H_KSMD_PID]
        os.kill(ksmd, signal.SIGKILL)
        wait_for(lambda: cl.q[H_KSMD_PID] not in (0, ksmd), 30, what="a new ksmd")
    finally:
        cl.close()
    p = cluster("down", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 1 and r["status"] == 1, p.stdout + p.stderr
    assert r["fsck"]["ok"] and any("ksmd died" in e for e in r["errors"]), r


@pytest.mark.timeout(100)
def test_cleanup_refuses_a_live_cluster_and_ctl_checks_all_first(cluster: Up, tmp_path,
                                                                 monkeypatch) -> None:
    cluster.up("--workers", "0", "--frames", "64", "--pages", "16")
    before = shm.leftovers(cluster.name)
    # docs/CLUSTER.md: cleanup "refuses a live one" (status 0 there; branch
    # lifecycle reworks cleanup/--force: the status is not pinned here)
    p = cluster("cleanup")
    assert "alive" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert shm.leftovers(cluster.name) == before, "cleanup removed a live cluster's objects"
    # ctl: a bad value anywhere refuses the whole write, nothing changed
    cl = cluster.attach()
    try:
        old = (cl.q[K_PAGES_TO_SCAN], cl.q[K_SLEEP_MS])
        p = cluster("ctl", "pages_to_scan=77", "sleep_millisecs=-5")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
        p = cluster("ctl", "sleep_millisecs=9", "nosuchknob=1")
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert (cl.q[K_PAGES_TO_SCAN], cl.q[K_SLEEP_MS]) == old
        # $UKSM_CLUSTER names the cluster when --cluster is not given
        env = dict(os.environ, UKSM_CLUSTER=cluster.name)
        q = subprocess.run([sys.executable, "-m", "uksm", "ctl", "pages_to_scan=77"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert q.returncode == 0, q.stderr
        assert cl.q[K_PAGES_TO_SCAN] == 77
        q = subprocess.run([sys.executable, "-m", "uksm", "fsck"], env=env, capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        assert q.returncode == 0 and f"fsck {cluster.name}: clean" in q.stdout, q.stdout + q.stderr
    finally:
        cl.close()
    assert cluster("down").returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,word", [
    (["run", "--workers", "many"], "--workers"),
    (["run", "--nosuch"], "--nosuch"),
    (["nosuchcommand"], "nosuchcommand"),
    (["ctl", "--cluster"], "--cluster"),
    (["inject", "--signal", "HUP"], "--signal"),
])
def test_argparse_errors_are_one_line(args, word) -> None:
    """argparse's own errors: `uksm: error: ...` and a hint, one line, status 2."""
    p = run_group([sys.executable, "-m", "uksm", *args], 50)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("uksm") and "error:" in p.stderr and word in p.stderr, p.stderr
    assert "--help" in p.stderr and "usage:" not in p.stderr, p.stderr
