"""The command line as a demanding user drove it (issue 28: items 4, 5
and the CLI's part of item 8): limits that are limits, a refusal that
starts nothing, kill points on the exit path, one-line errors for bad
hex, NaN timeouts and knob values, and the plain truth about a cluster a
script runs."""
from __future__ import annotations

import os
import sys

import pytest

import uksm
from helpers import Up, run_group

pytestmark = pytest.mark.timeout(150)


def one_line(p) -> str:
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    return err[0]


def live_workers(cluster: Up) -> list[str]:
    return [m["worker"] for m in cluster.json("status")["mms"]]


def test_max_workers_is_a_limit_and_a_refusal_starts_nothing(cluster: Up) -> None:
    cluster.up("--pages", "8", "--frames", "256", "--max-workers", "3", "--sleep-ms", "5")
    p = cluster("spawn", "--count", "5")
    assert p.returncode == 1, p.stderr
    assert one_line(p) == ("uksm: --max-workers 3: 0 tasks are alive, 3 more may start; "
                           "5 tasks refused, nothing started")
    assert live_workers(cluster) == []
    sp = cluster.json("spawn", "--count", "3", "--workload", "identical", "--wait")
    assert [w["worker"] for w in sp["spawned"]] == ["w1", "w2", "w3"]
    for args in (("spawn",), ("task", "new", "--pages", "2")):
        p = cluster(*args)
        assert p.returncode == 1 and "--max-workers 3: 3 tasks are alive" in one_line(p), p.stderr
    assert sorted(live_workers(cluster)) == ["w1", "w2", "w3"]
    p = cluster("task", "new", "--pages", "2000")   # (checked first: bad input is bad input)
    assert p.returncode == 2
    assert one_line(p).endswith("--pages: must be 1..1024 (the machine's --max-pages is 1024)")
    assert cluster("kill", "w1").returncode == 0
    t = cluster("task", "new", "--pages", "2").stdout.strip()
    assert t == "w4"
    # bad hex: one line of ours, not Python's ValueError, nothing written
    assert cluster("task", "fill", t, "5").returncode == 0
    p = cluster("task", "write", t, "0", "zz", "--hex")
    assert p.returncode == 2 and "not hex digits" in one_line(p) and "fromhex" not in p.stderr
    assert cluster("task", "read", t, "0", "2").stdout.strip() == "0505"
    # a wait that would never end, refused
    p = cluster("wait", "full-scans", "1", "--timeout", "nan")
    assert p.returncode == 2 and "--timeout: must be a positive, finite number" in one_line(p)
    # knob values as sysfs reads them: ASCII decimal (0x.. is for the verbs' numbers only)
    for v in ("\uff11", "0x10", "1.5"):
        p = cluster("ctl", f"pages_to_scan={v}")
        assert p.returncode == 2 and "invalid argument (EINVAL)" in one_line(p), (v, p.stderr)
    # a SIGTERM at an exit point: the exit runs to its end, and its path is the answer
    p = cluster("kill", t, "--at", "exit_mid_zap", "--signal", "TERM")
    assert p.returncode == 0 and p.stdout.strip() in ("fast", "slow", "none"), p.stderr
    rep = cluster.json("down")
    assert rep["status"] == 0 and rep["fsck"]["ok"], rep


def test_the_default_max_workers_is_a_limit(cluster: Up) -> None:
    cluster.up("--pages", "4", "--frames", "256")
    p = cluster("spawn", "--count", "33")
    assert p.returncode == 1 and "--max-workers 32: 0 tasks are alive, 32 more may start" in \
        one_line(p)
    assert live_workers(cluster) == []
    assert cluster.json("down")["status"] == 0


def test_a_spawn_failing_midway_says_what_it_did(monkeypatch, capsys) -> None:
    """The answer of a spawn that failed after starting some (e.g. /dev/shm
    filled up): the workers started are printed, the error is one line,
    status 1 (the request failed: they run on)."""
    from uksm.cli import cluster as cli_cluster
    from uksm.cli.main import main
    ans = {"ok": False, "status": 1, "partial": True,
           "spawned": [{"worker": "w1", "pid": 11, "mm": 1, "pages": 8, "workload": "vm"}],
           "error": "spawned 1 of 3 (w1; they run on), then: /dev/shm is full"}
    monkeypatch.setattr(cli_cluster, "call", lambda name, req: ans)
    assert main(["spawn", "--count", "3", "--cluster", "x"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("w1  pid 11") and err.strip() == f"uksm: {ans['error']}"


def test_a_partial_spawn_in_the_api_keeps_what_it_started(monkeypatch) -> None:
    with uksm.Machine(name=f"tpart{os.getpid() % 100000}", frames=128) as m:
        sup = m._t().sup
        real, calls = sup.spawn_worker, [0]

        def spawn_worker(*a, **kw):
            calls[0] += 1
            if calls[0] == 3:
                raise uksm.host.shm.UksmError("/dev/shm is full (planted)", 1)
            return real(*a, **kw)
        monkeypatch.setattr(sup, "spawn_worker", spawn_worker)
        with pytest.raises(uksm.MachineError, match=r"spawned 2 of 4 \(w1 w2; they run on\), then: "
                                                     r"/dev/shm is full"):
            m.spawn(4, pages=4)
        assert sorted(t.id for t in m.tasks()) == ["w1", "w2"]
        assert sorted(t.id for t in m._tasks.values()) == ["w1", "w2"]
    assert m.report is not None and m.report["status"] == 0


def test_commands_on_a_scripts_cluster_tell_the_truth(tmp_path) -> None:
    """A cluster a script runs (uksm.Machine): the cluster commands say so
    (not "started by 'uksm run'"), and nothing suggests 'uksm down', which
    cannot work there."""
    name = f"tscr{os.getpid() % 100000}"
    with uksm.Machine(name=name, frames=64, log_dir=str(tmp_path)):
        outs = []
        for args, status in ((("spawn",), 1), (("ctl", "run=0"), 1), (("up",), 2),
                             (("run", "--workers", "1"), 2)):
            p = run_group([sys.executable, "-m", "uksm", *args, "--cluster", name], 60)
            assert p.returncode == status, (args, p.stderr)
            outs.append(one_line(p))
        for line in outs:
            assert f"supervisor is process {os.getpid()}" in line and "uksm.Machine" in line, line
            assert "started by 'uksm run'" not in line and "uksm down" not in line, line
