"""Kill any worker at any instant (issue 5): every kill point with both
signals, random and cursor kills; each time fsck clean, nothing leaked,
survivors' data intact, ksmd still merging, no hung task."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, run_group
from uksm import killpoints


def inject(*args: str, timeout: float = 240) -> tuple[dict, int]:
    p = run_group([sys.executable, "-m", "uksm", "inject", "--json", "--quiet", *args], timeout)
    try:
        return json.loads(p.stdout), p.returncode
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON (status {p.returncode}):\n{p.stdout}\n{p.stderr}")


def assert_clean(r: dict, status: int, kills: int) -> None:
    i = r["inject"]
    assert status == 0, (r["fsck"], r["inject"]["live_fsck"], r["errors"], r["hung_tasks"])
    assert i["kills"] == kills
    assert r["fsck"]["ok"], r["fsck"]["errors"]
    assert r["ipc_leftovers"] == []
    assert r["hung_tasks"] == []
    assert r["integrity"]["mismatches"] == 0 and r["integrity"]["pages_verified"] > 0
    assert i["merges_after_kills"] > 0, "ksmd still merges new work after the kills"
    assert i["live_fsck"]["ok"], i["live_fsck"]["errors"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", ["KILL", "TERM"])
@pytest.mark.parametrize("point", killpoints.NAMES)
def test_every_kill_point(point, sig, tmp_path):
    r, status = inject("--point", point, "--signal", sig, "--kills", "2", "--workers", "3",
                       "--pages", "128", "--log-dir", str(tmp_path))
    assert_clean(r, status, 2)
    assert r["inject"]["kill_points_hit"] >= 2
    if sig == "KILL":
        assert r["workers"]["reaped"] >= 1 and r["inject"]["recoveries"] >= 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,sig,seed", [("random", "KILL", 1), ("random", "TERM", 2),
                                           ("cursor", "KILL", 3), ("cursor", "TERM", 4)])
def test_kills_mid_scan(mode, sig, seed, tmp_path):
    r, status = inject("--point", mode, "--signal", sig, "--kills", "25", "--seed", str(seed),
                       "--log-dir", str(tmp_path))
    assert_clean(r, status, 25)


def test_list_points():
    p = subprocess.run([sys.executable, "-m", "uksm", "inject", "--list-points"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0
    assert set(line.split()[0] for line in p.stdout.splitlines()) == set(killpoints.NAMES)


def test_bad_point_is_usage_error():
    p = subprocess.run([sys.executable, "-m", "uksm", "inject", "--point", "nowhere"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "nowhere" in p.stderr
