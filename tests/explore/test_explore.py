"""uksm explore (issue 21): controlled schedules over the real processes.

Each hazard's window is reached by a schedule -- found by exploring a
scenario with no delay point placed by hand, stored here as its string and
replayed -- never by a sleep; each "fixed" control replays the same
choices on the fixed code and shows from the trace that the window was
reached (both sides at the window's points) before asserting it is clean.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from uksm.explore.explorer import explore, replay
from uksm.explore.scenarios import SCENARIOS
from uksm.explore.schedule import Replay, parse
from uksm.explore.world import Options

UKSM = [sys.executable, "-m", "uksm"]

# found by `uksm explore` (the strategy and budget in docs/EXPLORE.md)
FOUND = {
    "no-scan-head-check": "uksm1:ksm05:seed:2.6.32:no-scan-head-check:0:0:15.2.0/21.1.2:34",
    "up-read-after-unlock": "uksm1:ksm05:seed:2.6.32:up-read-after-unlock:0:0:2.2.0/4.0.5/13.1.5:42",
    "no-unmerge-exit-check": "uksm1:run2-vs-exit:seed:2.6.32:no-unmerge-exit-check:0:0:30.3.0:36",
    "oom-mmput-in-task": "uksm1:oom-unmerge:seed:2.6.32:oom-mmput-in-task:0:0:-:42",
}


def cli(*args: str, timeout: float = 240) -> tuple[dict, int]:
    r = subprocess.run(UKSM + ["explore", *args, "--json"], capture_output=True, text=True,
                       timeout=timeout)
    assert r.stdout.count("\n") == 1, (r.stdout, r.stderr)
    return json.loads(r.stdout), r.returncode


@pytest.mark.timeout(300)
def test_legacy_deadlock_found_shrunk_and_replayed_exactly():
    j, rc = cli("--scenario", "oom-unmerge", "--exit-policy", "legacy", "--strategy", "dfs",
                "--preemptions", "2")
    assert rc == 3 and j["failures"], j
    f = j["failures"][0]
    assert f["finding"] == "deadlock" and f["status"] == 3
    assert "ksm_thread_mutex" in f["chain"][0] and "deadlock" in f["chain"][-1], f["chain"]
    for _ in range(3):
        again, rc2 = cli("--replay", f["schedule"])
        g = again["failures"][0]
        assert rc2 == 3 and (g["finding"], g["steps"], g["chain"][0].split(" (pid")[0]) == \
            (f["finding"], f["steps"], f["chain"][0].split(" (pid")[0])


@pytest.mark.timeout(300)
def test_seed_clean_and_shipped_as_uksm_run_reports_it():
    r = explore(SCENARIOS["oom-unmerge"], Options(scenario="oom-unmerge"), "dfs", 1, schedules=60)
    assert r.explored == 60 and not r.failures, [f.detail for f in r.failures]
    j, rc = cli("--scenario", "oom-unmerge", "--exit-policy", "shipped", "--schedules", "5")
    # uksm run --exit-policy shipped: the writer OOM-killed, run back to 0, the
    # mms it did not reach pinned by their slots: fsck fails, status 4
    assert rc == 4 and j["failures"][0]["finding"] == "leak", j
    assert "never freed" in j["failures"][0]["detail"]


def _window(hazard: str) -> tuple[str, str]:
    """The window's two sides: (a point of the racing side, the point
    the other side is held at) -- in the trace as 'proc point -> point'."""
    return {"no-scan-head-check": ("t1", "kp:ksmd_scan_wrap"),
            "up-read-after-unlock": ("t1", "unlock ksm_mmlist_lock"),
            "no-unmerge-exit-check": ("t1", "exit_pgtables"),
            "oom-mmput-in-task": ("writer(2)", "signal")}[hazard]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("hazard", list(FOUND))
@pytest.mark.parametrize("fixed", [False, True], ids=["hazard", "fixed"])
def test_hazard_reached_by_a_schedule(hazard, fixed):
    s = parse(FOUND[hazard])
    if fixed:
        s.hazards = ()
    sc = SCENARIOS[s.scenario]
    if fixed:   # the same choices on the fixed code (lenient: the fix changes what follows)
        from uksm.explore.explorer import trace
        from uksm.explore.gate import Gate
        from uksm.explore.world import World
        g = Gate()
        try:
            out = World(g, sc, s.options(), Replay(s, strict=False)).run()
        finally:
            g.close()
        lines = trace(out)
        assert out.worst is None, [f.detail for f in out.findings]
    else:
        res, out = replay(sc, s)
        lines = res.failures[0].trace
        assert res.failures[0].finding == {"no-scan-head-check": "oops", "up-read-after-unlock":
                                           "use_after_free", "no-unmerge-exit-check": "oops",
                                           "oom-mmput-in-task": "deadlock"}[hazard]
    other, held = _window(hazard)
    # the window was reached: one side parked at its point while the other ran
    at = [i for i, x in enumerate(lines) if f"-> {held}" in x]
    assert at, lines
    assert any(other in x.split()[1:3] or other in x for x in lines[at[0] + 1:]), lines


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario,strategy,budget", [("ksm05", "dfs", 140), ("run2-vs-exit", "pct", 20)])
def test_fixed_code_clean_under_the_same_exploration(scenario, strategy, budget):
    r = explore(SCENARIOS[scenario], Options(scenario=scenario), strategy, 2, schedules=budget,
                keep_going=True, do_shrink=False)
    assert r.explored == budget and not r.failures, [f.detail for f in r.failures]


@pytest.mark.timeout(240)
def test_kills_recovered_exactly():
    """SIGKILL at a chosen point: the reaper recovers the locks from one
    snapshot, runs the exit; every run ends clean."""
    r = explore(SCENARIOS["exit-vs-ksmd"], Options(scenario="exit-vs-ksmd", kills=1, seed=3), "random",
                schedules=25, keep_going=True, do_shrink=False)
    assert r.explored == 25 and not r.failures, [(f.finding, f.detail) for f in r.failures]


@pytest.mark.timeout(60)
def test_bad_input_one_line_status_2():
    for args, words in [(["--scenario", "nope"], "invalid choice"),
                        (["--scenario", "ksm05", "--hazard", "nope"], "invalid choice"),
                        (["--scenario", "ksm05", "--strategy", "nope"], "invalid choice"),
                        (["--replay", "garbage"], "not a schedule"),
                        (["--replay", "uksm1:ksm05:seed:2.6.32:-:0:0:3.7.2:10"], "diverged at step 3")]:
        r = subprocess.run(UKSM + ["explore", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
