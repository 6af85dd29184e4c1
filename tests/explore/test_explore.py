"""uksm explore (issue 21): controlled schedules over the real processes.

The explorations here are the Done-when lines at the bounds the suite can
afford (exhaustive at bound 1, or a small budget); exhausting every
scenario at bound 2 is tools/bench_explore.py's (docs/EXPLORE.md has the
numbers).  Each hazard is found by exploring a scenario with no delay
point placed by hand; its "fixed" control replays the same choices on the
fixed code and shows from the trace that both sides met at the window
before asserting the run is clean.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import uksm
from uksm import logs
from uksm.scenarios import SCENARIOS
from uksm.testing import explore_or_fail

UKSM = [sys.executable, "-m", "uksm"]


def timeless(v: object) -> object:
    """An event without what differs between two replays of one schedule:
    times (``*_ns``, the durations, the timestamp), pids (``*pid``), the
    cluster's name and instance (``boot_id``) -- at any depth."""
    if isinstance(v, dict):
        return {k: timeless(x) for k, x in v.items()
                if not (k.endswith(("pid", "_ns")) or k in ("timestamp", "cluster", "boot_id", "ms",
                                                                  "waited_ms", "duration_s"))}
    if isinstance(v, list):
        return [timeless(x) for x in v]
    return v

# each hazard: its scenario, the finding it gives, and the window a trace shows
HAZARDS = {
    "no-scan-head-check": ("ksm05", "oops"),
    "up-read-after-unlock": ("ksm05", "use_after_free"),
    "no-unmerge-exit-check": ("run2-vs-exit", "oops"),
    "oom-mmput-in-task": ("oom-unmerge", "deadlock"),
}


def cli(*args: str, timeout: float = 240) -> tuple[dict, int]:
    r = subprocess.run(UKSM + ["explore", *args, "--json"], capture_output=True, text=True,
                       timeout=timeout)
    assert r.stdout.count("\n") == 1, (r.stdout, r.stderr)
    return json.loads(r.stdout), r.returncode


def steps(trace: list[str]) -> list[tuple[str, str]]:
    """(process, the rest of its line) per step of a trace."""
    return [(x.split()[1] if x.split()[1] not in ("PRE", "CHO", "KIL") else x.split()[2], x) for x in trace]


def window(hazard: str, trace: list[str]) -> bool:
    """Both sides of the hazard's window met in this run (its trace): the
    racing process did its part while the other was held at the window's
    point -- whether or not the code then failed."""
    st = steps(trace)

    def between(i: int, who: str) -> list[str]:   # the lines after step i until ``who`` runs again
        out = []
        for p, x in st[i + 1:]:
            if p == who:
                break
            out.append(x)
        return out
    if hazard in ("no-scan-head-check", "up-read-after-unlock"):
        kp = "kp:ksmd_scan_wrap" if hazard == "no-scan-head-check" else "kp:ksmd_between_unlocks"
        # ksmd past the window's kill point, parked; the task exits whole before ksmd goes on
        return any(p == "ksmd" and f"via {kp}" in x and any("t1" in y and y.endswith("-> exit")
                                                             for y in between(i, "ksmd"))
                   for i, (p, x) in enumerate(st))
    if hazard == "no-unmerge-exit-check":
        # the task's exit freed its page tables before the writer walks its mm under mmap_sem
        freed = next((i for i, (p, x) in enumerate(st) if p == "t1" and "free_pgtables 1 ->" in x), None)
        walk = next((i for i, (p, x) in enumerate(st) if p == "writer(2)" and "lock mmap_sem:mm1 ->" in x), None)
        return freed is not None and walk is not None and freed < walk
    # oom-mmput-in-task: the writer's OOM kill of t1 while it holds t1's mmap_sem
    took = next((i for i, (p, x) in enumerate(st) if p == "writer(2)" and "lock mmap_sem:mm1 ->" in x), None)
    kill = next((i for i, (p, x) in enumerate(st) if p == "writer(2)" and "signal 10 to t1" in x), None)
    return (took is not None and kill is not None and took < kill
            and not any(p == "writer(2)" and "unlock mmap_sem:mm1 ->" in x for p, x in st[took:kill]))


@pytest.mark.timeout(300)
def test_legacy_deadlock_found_shrunk_and_replayed_exactly():
    j, rc = cli("--scenario", "oom-unmerge", "--exit-policy", "legacy", "--strategy", "dfs",
                "--preemptions", "2")
    assert rc == 3 and j["failures"], j
    f = j["failures"][0]
    assert f["finding"] == "deadlock" and f["status"] == 3
    assert "ksm_thread_mutex" in f["chain"][0] and "deadlock" in f["chain"][-1], f["chain"]
    traces = []
    for _ in range(3):
        again, rc2 = cli("--replay", f["schedule"])
        g = again["failures"][0]
        assert rc2 == 3 and (g["finding"], g["steps"], g["chain"]) == (f["finding"], f["steps"], f["chain"])
        traces.append(g["trace"])
    # no pid in a trace or a chain: two replays print the same text, byte for byte
    assert traces[0] == traces[1] == traces[2] == f["trace"]
    assert "pid" not in json.dumps(f["chain"]) + json.dumps(f["trace"])


@pytest.mark.timeout(120)
def test_a_replay_logs_the_same_events_in_the_same_order(tmp_path):
    """Issue 21, item 2: a schedule replays the identical run -- the same
    events in the same order in the logs, pids, times and the cluster's
    name aside."""
    sc = SCENARIOS["oom-unmerge"]
    seen = []
    for i in range(2):
        d = tmp_path / str(i)
        d.mkdir()
        r = uksm.replay(sc.fn, "uksm2:oom-unmerge:legacy:2.6.32:-:0:0:race:-:25", log_dir=str(d),
                        name=sc.name, **sc.options)
        assert r.failures[0]["finding"] == "deadlock"
        evs = sorted(logs.iter_events(str(d)), key=lambda e: e["mono_ns"])
        seen.append([timeless(e) for e in evs])
    assert len(seen[0]) > 20 and seen[0] == seen[1]
    assert {"ksm_enter", "oom_kill", "mm_exit_begin", "explore_finding"} <= {e["event"] for e in seen[0]}


@pytest.mark.timeout(300)
def test_seed_exhausted_at_bound_1_clean_and_shipped_as_uksm_run_reports_it():
    j, rc = cli("--scenario", "oom-unmerge", "--preemptions", "1")
    assert rc == 0 and j["exhausted"] and not j["failures"], j
    by = j["schedules_by_preemptions"]
    assert set(by) == {"0", "1"} and by["1"] > by["0"] > 1 and j["explored"] == by["0"] + by["1"]
    # uksm run --exit-policy shipped: the writer OOM-killed, run back to 0, the
    # mms it did not reach pinned by their slots: a leak, status 4
    j, rc = cli("--scenario", "oom-unmerge", "--exit-policy", "shipped", "--schedules", "5")
    assert rc == 4 and j["failures"][0]["finding"] == "leak", j
    assert "never freed" in j["failures"][0]["detail"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_hazard_found_by_exploration_and_its_window_reached_by_the_fixed_code(hazard):
    name, finding = HAZARDS[hazard]
    sc = SCENARIOS[name]
    res = uksm.explore(sc.fn, name=name, preemptions=2, schedules=200, hazards=(hazard,), **sc.options)
    assert res.failures and res.failures[0]["finding"] == finding, res.json
    f = res.failures[0]
    assert window(hazard, f["trace"]), f["trace"]
    # the fixed code, the same choices: the window is reached, nothing breaks
    fixed = uksm.replay(sc.fn, f["schedule"], strict=False, hazards=(), **sc.options)
    assert window(hazard, fixed.trace), fixed.trace
    assert fixed.status == 0 and not fixed.failures, fixed.failures


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,bound", [("ksm05", 2), ("run2-vs-exit", 1), ("exit-vs-ksmd", 1),
                                        ("zero-vs-exit", 2)])
def test_fixed_code_clean_under_the_exhaustive_exploration(name, bound):
    sc = SCENARIOS[name]
    res = uksm.explore(sc.fn, name=name, preemptions=bound, keep_going=True, shrink=False, **sc.options)
    assert res.exhausted and not res.failures, [(f["finding"], f["detail"]) for f in res.failures]
    assert sum(res.schedules_by_preemptions.values()) == res.explored


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["exit-vs-ksmd", "zero-vs-exit"])
def test_kills_recovered_exactly(name):
    """SIGKILL at a chosen point: the reaper recovers the locks from one
    snapshot, runs the exit; every run ends clean (under 6.18 too, with
    kills between the zero PTE and its count: fsck.rebuild recounts)."""
    sc = SCENARIOS[name]
    res = uksm.explore(sc.fn, name=sc.name, strategy="random", seed=3, kills=1, schedules=25,
                       keep_going=True, shrink=False, **sc.options)
    assert res.explored == 25 and not res.failures, [(f["finding"], f["detail"]) for f in res.failures]


@pytest.mark.timeout(180)
def test_bad_input_one_line_status_2():
    for args, words in [(["--scenario", "nope"], "invalid choice"),
                        (["--scenario", "ksm05", "--hazard", "nope"], "invalid choice"),
                        (["--scenario", "ksm05", "--strategy", "nope"], "invalid choice"),
                        (["--replay", "garbage"], "not a schedule"),
                        (["--replay", "uksm1:ksm05:seed:2.6.32:-:0:0:-:10"], "an older uksm"),
                        (["--replay", "uksm2:ksm05:seed:2.6.32:-:0:0:race:3.7.2:10"], "diverged at step 3")]:
        r = subprocess.run(UKSM + ["explore", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr


# ---- the Python API ----------------------------------------------------------------------------

def merge_then_race(m: uksm.Machine) -> None:
    """A user's scenario: two tasks merge a page, then one writes it while
    the other exits; the script checks what it expects of every schedule."""
    a, b = m.task(pages=1), m.task(pages=1)
    a.fill(3)
    b.fill(3)
    m.wait_full_scans(2)
    assert m.ksm["pages_sharing"] == 1
    with m.race():
        a.exit()
        b.write(0, b"x")
    assert b.read(0, 1) == b"x"


def wrong_claim(m: uksm.Machine) -> None:
    a, b = m.task(pages=1), m.task(pages=1)
    a.fill(3)
    b.fill(3)
    with m.race():
        a.exit()
    assert m.ksm["pages_sharing"] == 1   # ksmd may not have merged them yet


@pytest.mark.timeout(240)
def test_explore_a_users_scenario_and_replay_its_failure():
    res = explore_or_fail(merge_then_race, preemptions=1)
    assert res.exhausted and res.explored > 10
    bad = uksm.explore(wrong_claim, preemptions=1)
    assert bad.status == 1 and bad.failures[0]["finding"] == "assertion", bad.json
    assert "AssertionError" in bad.failures[0]["detail"] and "wrong_claim" in bad.failures[0]["detail"]
    again = bad.replay(bad.failures[0]["schedule"])
    assert again.failures[0]["finding"] == "assertion" and again.trace == bad.failures[0]["trace"]
    with pytest.raises(ValueError, match="not a schedule"):
        bad.replay("nonsense")


@pytest.mark.uksm_explore(preemptions=1)
def test_the_pytest_marker_explores_a_tests_body(machine):
    merge_then_race(machine)


def deterministic_script(m: uksm.Machine) -> tuple:
    ws = m.spawn(2, pages=8, workload="dup:3", seed=4, churn_ms=5)
    m.wait_full_scans(3)
    ws[0].kill()
    m.sleep(0.1)
    return m.ksm.counters(), m.stats()


@pytest.mark.timeout(240)
def test_machine_deterministic_twice_the_same_and_its_schedule_replays():
    runs = []
    for _ in range(2):
        with uksm.Machine(deterministic=True, seed=11, frames=64, max_pages=8) as m:
            seen = deterministic_script(m)
        runs.append((seen, m.report["ksm"], m.report["workers"], m.report["schedule"], m.report["steps"]))
    assert runs[0] == runs[1]
    assert runs[0][2]["killed"] == 1 and runs[0][2]["exited"] == 2 and m.report["status"] == 0, m.report
    with uksm.Machine(schedule=runs[0][3], frames=64, max_pages=8) as m:
        seen = deterministic_script(m)
    assert (seen, m.report["ksm"], m.report["workers"], m.report["steps"]) == \
        (runs[0][0], runs[0][1], runs[0][2], runs[0][4])
    with uksm.Machine(deterministic=True, seed=12, frames=64, max_pages=8) as m:
        deterministic_script(m)
    assert m.report["schedule"] != runs[0][3]   # another seed, another schedule


@pytest.mark.timeout(240)
def test_a_delay_point_is_a_barrier_released_when_nothing_else_can_run():
    """Under the scheduler ksmd waits at an armed delay point until every
    other process is blocked or gone: the task's whole exit runs inside
    the window, on every schedule."""
    def script(m: uksm.Machine) -> None:
        t = m.task(pages=2)                 # LTP ksm05's task: ksmd is idle (run=0)
        m.arm("ksmd_scan_wrap", delay_ms=50)
        m.ksm["run"] = 1                    # ksmd wakes: held at the point
        with m.race():
            t.exit()
    res = uksm.explore(script, preemptions=1, run=0, keep_going=True, shrink=False)
    assert res.exhausted and not res.failures, res.failures
    one = uksm.replay(script, "uksm2:script:seed:2.6.32:-:0:0:race:-:-1", run=0)   # the default schedule
    st = steps(one.trace)
    held = next(i for i, (p, x) in enumerate(st) if p == "ksmd" and "-> blocked on a delay point" in x)
    gone = next(i for i, (p, x) in enumerate(st) if p == "t1" and x.endswith("-> exit"))
    assert held < gone and not any(p == "ksmd" for p, _x in st[held + 1:gone]), one.trace


@pytest.mark.timeout(300)
@pytest.mark.timeout(120)
def test_deterministic_inject_goes_on_when_no_task_is_ready(tmp_path):
    """Every task killed and its replacement not yet ready: the driver
    must let the controlled run move (it once spun for ever, the run
    frozen between its steps), and a run of many kills has room for its
    replacements and reapers."""
    for extra in (["--workers", "1", "--kills", "3"], ["--workers", "2", "--kills", "30"]):
        r = subprocess.run(UKSM + ["inject", "--deterministic", "--seed", "5", "--pages", "16", "--point",
                                   "random", "--json", "--quiet", *extra],
                           capture_output=True, text=True, timeout=100, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        j = json.loads(r.stdout)
        assert j["inject"]["kills"] == int(extra[-1]) and j["workers"]["killed"] == int(extra[-1])


@pytest.mark.parametrize("cmd", ["inject", "run"])
def test_deterministic_run_and_inject_twice_identical(cmd, tmp_path):
    extra = (["--kills", "6", "--point", "random"] if cmd == "inject" else ["--duration", "0.5"])
    out = []
    for _ in range(2):
        r = subprocess.run(UKSM + [cmd, "--deterministic", "--seed", "7", "--workers", "3", "--pages", "16",
                                   "--churn-ms", "5", "--json", "--quiet", *extra],
                           capture_output=True, text=True, timeout=100, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout))
    a, b = out
    assert (a["workers"], a["ksm"]) == (b["workers"], b["ksm"])
    assert a["deterministic"] == b["deterministic"] and a["deterministic"]["seed"] == 7
    if cmd == "inject":
        assert a["inject"]["kills"] == 6 and a["workers"]["killed"] == 6 and a["inject"] == b["inject"]
    assert a["ksm"]["full_scans"] >= 2 and a["fsck"]["ok"]


@pytest.mark.timeout(300)
def test_explore_under_618_carries_the_kernel_in_its_schedule():
    """--kernel 6.18 (issue 23): the exploration runs 6.18's machine, and
    the schedule string it prints carries the kernel (an eleventh field,
    absent under 2.6.32) so that a replay boots the same kernel; a
    kernel the schedule does not know is one line, status 2."""
    r, status = cli("--kernel", "6.18", "--scenario", "ksm05", "--hazard", "no-scan-head-check", timeout=60)
    assert status == 5 and r["failures"], r
    sched = r["failures"][0]["schedule"]
    assert sched.startswith("uksm2:ksm05:") and sched.endswith(":6.18"), sched
    again, status2 = cli("--replay", sched, timeout=60)
    assert status2 == 5 and again["failures"][0]["schedule"] == sched
    clean, status3 = cli("--kernel", "6.18", "--scenario", "ksm05", "--schedules", "10", timeout=60)
    assert status3 == 0 and clean["explored"] == 10 and not clean["failures"]
    plain = cli("--scenario", "ksm05", "--hazard", "no-scan-head-check", timeout=60)[0]
    assert ":6.18" not in plain["failures"][0]["schedule"]
    bad = subprocess.run(UKSM + ["explore", "--replay", sched[:-4] + "5.0"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unknown kernel '5.0'" in bad.stderr, bad.stderr
