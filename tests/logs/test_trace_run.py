"""``uksm logs DIR trace`` on real runs (issue 24): the legacy deadlock
shows its wait cycle; a fault-injection run with ``--trace-locks`` gives a
valid trace whose every lock slice is closed or marked, whose holds are its
lock_acquire events, and whose tracks are its processes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_json, uksm
from tracecheck import flow_edges, instant_counts, names, of, validate
from uksm.logs.trace import COUNTER_PID, FOLDED


def torn_tails(d: Path) -> int:
    """Files whose last line is torn: a process SIGKILLed at the end of a
    hung run may leave one (a write that crosses a page of the page cache
    stops short on a fatal signal).  Only the last line may be torn."""
    return sum(1 for f in d.glob("*.jsonl") if (t := f.read_text()) and not t.endswith("\n"))


def events_of(d: Path) -> list[dict]:
    """Every event of the run; a torn last line of a file is left out,
    any other line that does not parse fails the test."""
    evs = []
    for f in d.glob("*.jsonl"):
        text = f.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines.pop()   # the torn tail (torn_tails)
        evs += [json.loads(line) for line in lines if line.strip()]
    return evs


def trace(d: Path, tmp_path: Path) -> dict:
    out = tmp_path / "t.json"
    p = uksm("logs", str(d), "trace", "-o", str(out), "--png", str(tmp_path / "t.png"), check=True)
    assert "wrote" in p.stdout
    torn = torn_tails(d)
    # the reader skips a torn line and says so on stderr; nothing else is said
    assert p.stderr == "" if not torn else p.stderr.startswith(f"warning: skipped {torn} invalid lines"), \
        p.stderr
    return json.loads(out.read_text())


@pytest.mark.timeout(150)
def test_legacy_deadlock_shows_its_wait_cycle(tmp_path):
    """The seed's deadlock (exit policy legacy, run=2 short of memory): the
    writer holds ksm_thread_mutex and waits for frames, which only the OOM
    victims can free; they wait for ksm_thread_mutex in __ksm_exit.  In the
    trace: the writer's hold (from its lock_acquire, --trace-locks) and every
    wait still open at the end, and flow arrows around the cycle."""
    d = tmp_path / "logs"
    d.mkdir()
    r, status = run_json("--scenario", "oom-unmerge", "--exit-policy", "legacy", "--workers", "3",
                         "--pages", "128", "--pages-to-scan", "1000", "--sleep-ms", "5",
                         "--hung-task-timeout", "1", "--trace-locks", "--log-dir", str(d), timeout=120)
    assert status == 3 and r["hung_tasks"], r
    hung = [e for e in events_of(d) if e["event"] == "hung_task"]
    assert hung and all(type(w["pid"]) is int and all(type(h) is int for h in w["holders"])
                        for e in hung for w in e["waits"])
    tr = trace(d, tmp_path)
    validate(tr)
    pn, _ = names(tr)
    writer = next(p for p, n in pn.items() if n == "writer")
    victims = {e["victim_pid"] for e in events_of(d) if e["event"] == "oom_kill"}
    # the writer's hold of ksm_thread_mutex, recorded (not inferred), never released
    hold, = [x for x in of(tr, "X", cat="lock", pid=writer) if x["name"] == "ksm_thread_mutex"
             and x["args"].get("still_held_at_end")]
    assert "inferred" not in hold["args"]
    wait_frames, = [x for x in of(tr, "X", cat="wait", pid=writer) if x["name"] == "wait frames"]
    assert wait_frames["args"]["still_waiting_at_end"]
    stuck = [x for x in of(tr, "X", cat="wait") if x["pid"] in victims
             and x["name"] == "wait ksm_thread_mutex" and x["args"].get("still_waiting_at_end")]
    assert stuck, "an OOM victim waits for ksm_thread_mutex to the end"
    edges = [(s["pid"], s["name"], t["pid"], t["name"]) for s, t in flow_edges(tr)]
    # victim -> the writer's hold, and the writer's wait -> the victim's wait: the cycle
    for w in stuck:
        assert (w["pid"], "wait ksm_thread_mutex", writer, "ksm_thread_mutex") in edges, edges
        assert (writer, "wait frames", w["pid"], "wait ksm_thread_mutex") in edges, edges
    g, = [e for e in of(tr, "i") if e["s"] == "g"]
    assert g["name"] == "deadlock" and any("deadlock" in line for line in g["args"]["chain"])
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(150)
def test_inject_with_traced_locks(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    p = uksm("inject", "--json", "--quiet", "--kills", "6", "--workers", "2", "--pages", "64",
             "--seed", "3", "--trace-locks", "--log-dir", str(d), timeout=120)
    r = json.loads(p.stdout)
    assert r["status"] == 0, p.stderr
    evs = events_of(d)
    count = Counter(e["event"] for e in evs)
    assert count["lock_acquire"] > 100 and count["lock_release"] <= count["lock_acquire"]
    tr = trace(d, tmp_path)
    validate(tr)
    # a hold per lock_acquire, each released or marked
    holds = [x for x in of(tr, "X", cat="lock") if "inferred" not in x["args"]]
    assert len(holds) == count["lock_acquire"]
    open_ = [h for h in holds if set(h["args"]) & {"still_held_at_end", "taken_over_by_recovery",
                                                    "ended_with_process"}]
    assert len(holds) - len(open_) == count["lock_release"]
    # a process per process: the cluster's, each worker, ksmd; a thread per reaper
    pn, tn = names(tr)
    pids = {e["pid"] for e in evs} | {e["worker_pid"] for e in evs if e["event"] == "worker_spawn"}
    assert set(pn) - {COUNTER_PID} == pids
    reapers = {e["dead_pid"] for e in evs if e["role"] == "reaper"}
    assert len(reapers) >= 1 and all(any(n.startswith("reaper for") and str(dp) in n
                                         for n in tn.values()) for dp in reapers)
    # instants: every event not folded into a slice, once
    folded = FOLDED | {"mm_exit_begin"}
    want = {n: c for n, c in count.items() if n not in folded}
    want["mm_exit_begin"] = sum(1 for e in evs if e["event"] == "mm_exit_begin"
                                and e["role"] not in ("worker", "reaper"))
    assert instant_counts(tr) == {n: c for n, c in want.items() if c}
    # ksmd's batches and scans
    assert len([x for x in of(tr, "X", cat="ksmd") if x["name"].startswith("batch")]) == count["scan_batch_end"]
    visits = sum(len(e["mms"]) for e in evs if e["event"] == "scan_batch_end")
    assert visits >= count["scan_batch_end"] > 0
    assert len([x for x in of(tr, "X", cat="ksmd") if x["name"].startswith("scan mm")]) == visits
    assert count["scan_batch_end"] == count["scan_batch_start"]
