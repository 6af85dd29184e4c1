"""The log analysis against real runs (issue 6): the counts of
`uksm logs DIR summary --json` agree with the report of the run that wrote
the logs, `check` passes on them, and catches a violation planted in a copy."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import log_events, rewrite_logs, run_group, run_json, uksm


def summary(d) -> dict:
    p = uksm("logs", str(d), "summary", "--json", check=True)
    return json.loads(p.stdout)


def check(d) -> tuple[int, str]:
    p = uksm("logs", str(d), "check")
    return p.returncode, p.stdout + p.stderr


def agree(r: dict, s: dict) -> None:
    w = r["workers"]
    assert s["exits"]["fast"] == w["exit_fast"]
    assert s["exits"]["slow"] == w["exit_slow"]
    assert s["exits"]["reaped"] == w["reaped"]
    assert s["oom_kills"] == w["oom_killed"]
    assert s["events"].get("worker_exit", 0) == w["exited"]
    assert s["events"].get("worker_spawn", 0) == w["started"]
    assert s["hung_tasks"] == len(r["hung_tasks"])


@pytest.mark.timeout(120)
def test_summary_agrees_with_run(tmp_path):
    r, status = run_json("--workers", "3", "--pages", "128", "--pages-to-scan", "1000",
                         "--sleep-ms", "2", "--log-dir", str(tmp_path), timeout=100)
    assert status == 0
    s = summary(tmp_path)
    agree(r, s)
    assert s["merges"] > 0 and s["invalid_lines"] == 0
    assert check(tmp_path)[0] == 0
    # docs/LOGS.md: `python3 -m uksm.logs DIR COMMAND` is the same as `python3 -m uksm logs
    # DIR COMMAND` (helpers.uksm), which is `uksm logs DIR COMMAND`
    for cmd in (["summary"], ["summary", "--json"], ["check"]):
        a = uksm("logs", str(tmp_path), *cmd)
        b = run_group([sys.executable, "-m", "uksm.logs", str(tmp_path), *cmd], 60)
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), (cmd, b)
    assert json.loads(run_group([sys.executable, "-m", "uksm.logs", str(tmp_path), "summary", "--json"],
                                60).stdout) == s
    bad = run_group([sys.executable, "-m", "uksm.logs", str(tmp_path / "none"), "summary"], 60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr, bad


@pytest.mark.timeout(180)
def test_summary_agrees_with_inject_and_oom(tmp_path):
    (tmp_path / "inj").mkdir()
    p = uksm("inject", "--json", "--quiet", "--kills", "10", "--signal", "KILL",
             "--log-dir", str(tmp_path / "inj"), timeout=150)
    r = json.loads(p.stdout)
    assert r["status"] == 0
    s = summary(tmp_path / "inj")
    agree(r, s)
    assert s["kills"] == r["inject"]["kills"] + r["inject"]["kill_points_hit"]
    assert s["lock_recoveries"] == r["inject"]["lock_recoveries"]
    assert check(tmp_path / "inj")[0] == 0
    (tmp_path / "oom").mkdir()
    r, status = run_json("--scenario", "oom-unmerge", "--workers", "4", "--pages", "256",
                         "--pages-to-scan", "1000", "--sleep-ms", "5", "--log-dir", str(tmp_path / "oom"))
    assert status == 0 and r["workers"]["oom_killed"] >= 1
    agree(r, summary(tmp_path / "oom"))
    assert check(tmp_path / "oom")[0] == 0


@pytest.mark.timeout(120)
def test_check_catches_violations_planted_in_a_real_log(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    r, status = run_json("--workers", "2", "--pages", "64", "--workload", "identical",
                         "--pages-to-scan", "1000", "--sleep-ms", "2", "--log-dir", str(run_dir),
                         timeout=100)
    assert status == 0 and check(run_dir)[0] == 0
    events = log_events(run_dir)
    begin = next(e for e in events if e["event"] == "mm_exit_begin")
    mm = begin["mm"]

    def into_ksmd(event: dict):
        """Add ``event`` to ksmd's file of a copy (its place in time kept)."""
        def plant(files):
            next(evs for name, evs in files.items() if name.startswith("ksmd-")).append(event)
        return plant
    # a merge into the mm after its exit began
    bad = rewrite_logs(run_dir, tmp_path / "bad_merge", into_ksmd(
        dict(begin, event="merge", role="ksmd", count=1, t_last_ns=begin["mono_ns"] + 1,
             mono_ns=begin["mono_ns"] + 2)))
    rc, out = check(bad)
    assert rc == 4, out
    assert any("merge" in line and f"mm {mm}" in line for line in out.splitlines()), out
    # a slot freed twice
    freed = [e for e in events if e["event"] in ("slot_freed", "ksm_exit") and e["mm"] == mm]
    last = max(e["mono_ns"] for e in events)
    dup = dict(freed[-1], event="slot_freed", role="ksmd", by="ksmd", mono_ns=last + 10)
    dup.pop("path", None)
    twice = rewrite_logs(run_dir, tmp_path / "twice", into_ksmd(dup))
    rc, out = check(twice)
    assert rc == 4, out
