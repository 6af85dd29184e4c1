"""``uksm logs DIR trace`` and ``plot`` (issue 24) on synthetic log folders:
the trace is valid in the documented format, every lock slice is closed or
marked as held at the end, its tracks and events match the log's counts, a
deadlock's wait cycle is a ring of flow arrows, a broken log is refused;
the plot stays small at thousands of tasks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from logsynth import CTL, KSMD, SUP, T0, W1, W2, W3, clean_run, ev, stamp, write_run
from tracecheck import flow_edges, instant_counts, names, of, validate
from uksm.cli.logs import main
from uksm.logs import BrokenLog, trace_events
from uksm.logs.plots import _lanes, gather, plot_events
from uksm.logs.trace import COUNTER_PID, FOLDED, TraceStats

pytestmark = pytest.mark.timeout(60)


def locked_run() -> list[dict[str, Any]]:
    """clean_run with lock events (as --trace-locks logs them) and ksmd's
    visits of two mms in its batch (scan_batch_end's mms): ksmd holds ksm_thread_mutex over the batch and
    mmap_sem:mm1 over its scan of mm 1; worker 203 is SIGKILLed holding
    mmap_sem:mm3 (read), which the recovery takes over."""
    out = []
    for e in clean_run():
        if e["event"] == "worker_spawn":
            e["worker_pid"] = 200 + e["mm"]
        if e["event"] == "scan_batch_start":
            out += [ev(KSMD, "lock_acquire", lock="ksm_thread_mutex", mode="mutex", task_row=1,
                       waited_ms=0.01), e]
            out += [ev(W3, "lock_acquire", lock="mmap_sem:mm3", mode="read", task_row=4, waited_ms=0.0)]
            out += [ev(KSMD, "lock_acquire", lock="mmap_sem:mm1", mode="read", task_row=1, waited_ms=2.5)]
            continue
        if e["event"] == "scan_batch_end":
            out += [ev(KSMD, "lock_release", lock="mmap_sem:mm1", mode="read", task_row=1),
                    ev(KSMD, "lock_release", lock="ksm_thread_mutex", mode="mutex", task_row=1),
                    dict(e, mms=[])]
            continue
        out.append(e)
    out = stamp(out)
    i = next(i for i, e in enumerate(out) if e["event"] == "scan_batch_end")
    # ksmd's visits: mm 1 from before its mmap_sem was taken to its release, then mm 2
    out[i]["mms"] = [{"mm": 1, "start_ns": out[i - 8]["mono_ns"] + 10, "end_ns": out[i - 2]["mono_ns"],
                      "pages": 80, "done": True},
                     {"mm": 2, "start_ns": out[i - 2]["mono_ns"] + 10, "end_ns": out[i - 1]["mono_ns"],
                      "pages": 20, "done": False}]
    return out


def trace_of(tmp_path: Path, events: list[dict[str, Any]], *args: str) -> dict[str, Any]:
    d = write_run(tmp_path / "run", events)
    out = tmp_path / "t.json"
    assert main([str(d), "trace", "-o", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_trace_is_valid_and_matches_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = locked_run()
    tr = trace_of(tmp_path, events)
    validate(tr)
    assert "wrote" in capsys.readouterr().out
    logged = {e["event"] for e in events}
    # a process track per process (counters aside), named after its role
    pn, tn = names(tr)
    assert sorted(p for p in pn if p != COUNTER_PID) == sorted({e["pid"] for e in events})
    assert pn[101] == "ksmd" and pn[100] == "supervisor" and pn[201] == "worker w1 mm1"
    # every event not folded into a slice is one instant; a task's (or its
    # reaper's) mm_exit_begin is the start of its exit slice
    counts = {n: sum(1 for e in events if e["event"] == n) for n in logged}
    exits = sum(1 for e in events if e["event"] == "mm_exit_begin" and e["role"] in ("worker", "reaper"))
    assert exits == 4 and len(of(tr, "X", cat="exit")) == exits
    assert instant_counts(tr) == {n: c for n, c in counts.items()
                                  if n not in FOLDED and n != "mm_exit_begin"}
    # slices: a batch per batch, a scan per visit, a wait per lock_wait, a hold per acquire
    xs = of(tr, "X")
    assert len([x for x in xs if x["name"].startswith("batch")]) == counts["scan_batch_end"]
    assert [x["name"] for x in xs if x["name"].startswith("scan mm")] == ["scan mm1", "scan mm2"]
    assert len([x for x in xs if x["cat"] == "wait"]) == counts["lock_wait"]
    holds = [x for x in xs if x["cat"] == "lock" and "inferred" not in x["args"]]
    assert len(holds) == counts["lock_acquire"]
    # each closed, or marked: the killed worker's, by the recovery that took it over
    for h in holds:
        marks = set(h["args"]) & {"still_held_at_end", "taken_over_by_recovery", "ended_with_process"}
        released = h["args"]["lock"] != "mmap_sem:mm3"
        assert (not marks) == released, h
    assert next(h for h in holds if h["args"]["lock"] == "mmap_sem:mm3")["args"]["taken_over_by_recovery"]
    # named after the lock and its mode, on a thread per lock class
    assert {h["name"] for h in holds} == {"ksm_thread_mutex", "mmap_sem:mm1 (read)", "mmap_sem:mm3 (read)"}
    assert {tn[(h["pid"], h["tid"])] for h in holds} == {"holds ksm_thread_mutex", "holds mmap_sem"}
    # ksmd's wait for mmap_sem:mm1 points at its holder, worker 201, whose
    # hold no lock_acquire recorded: inferred over the wait
    (src, dst), = flow_edges(tr)
    assert src["name"] == "wait mmap_sem:mm1" and src["pid"] == 101
    assert (dst["pid"], dst["name"], dst["ts"], dst["dur"]) == (201, "mmap_sem:mm1", src["ts"], src["dur"])
    assert "inferred" in dst["args"]
    # the reaper is a thread of its own, its exit a slice; the counters are counter events
    assert [x["name"] for x in xs if x["pid"] == 102] == ["exit"]
    assert {c["name"] for c in of(tr, "C")} == {"ksm", "frames"}


def test_every_lock_slice_closed_or_marked_held(tmp_path: Path) -> None:
    """A hold with no release: held at the end; a release with no acquire: refused."""
    events = locked_run()
    i = next(i for i, e in enumerate(events) if e["event"] == "lock_release"
             and e["lock"] == "ksm_thread_mutex")
    held = events[:i] + events[i + 1:]
    tr = trace_of(tmp_path, held)
    validate(tr)
    h = next(x for x in of(tr, "X", cat="lock") if x["name"] == "ksm_thread_mutex")
    assert h["args"]["still_held_at_end"] is True
    assert h["ts"] + h["dur"] == pytest.approx(max(e["ts"] for e in tr["traceEvents"] if "ts" in e))


def deadlock(with_acquires: bool) -> list[dict[str, Any]]:
    """An ABBA deadlock: worker 201 holds ksm_thread_mutex and waits for
    mmap_sem:mm2, which worker 202 holds (write) while it waits for
    ksm_thread_mutex; the watchdog's hung_task reports, with the chain."""
    spawn = [ev(SUP, "worker_spawn", worker=f"w{i}", worker_pid=200 + i, mm=i, pages=8, workload="dup")
             for i in (1, 2)]
    acq = [ev(W1, "lock_acquire", lock="ksm_thread_mutex", mode="mutex", task_row=2, waited_ms=0.0),
           ev(W2, "lock_acquire", lock="mmap_sem:mm2", mode="write", task_row=3, waited_ms=0.0)]
    links = [{"pid": 201, "role": "worker", "mm": 1, "lock": "mmap_sem:mm2", "waited_s": 0.004,
              "holders": [202]},
             {"pid": 202, "role": "worker", "mm": 2, "lock": "ksm_thread_mutex", "waited_s": 0.003,
              "holders": [201]}]
    chain = ["w1 waits for mmap_sem:mm2, held by w2", "w2 waits for ksm_thread_mutex, held by w1",
             "deadlock: w1 is already in this chain"]
    return [ev(SUP, "cluster_start", workers=2, pages=8, frames=64, workload="dup",
               exit_policy="seed", hazards=[], log_dir="x"), *spawn,
            *(acq if with_acquires else []),
            ev(W1, "ksm_enter", mm=1), ev(W2, "ksm_enter", mm=2),
            ev(KSMD, "full_scan", seqnr=1), ev(KSMD, "full_scan", seqnr=2),
            ev(KSMD, "full_scan", seqnr=3), ev(KSMD, "full_scan", seqnr=4),
            ev(SUP, "hung_task", task_pid=201, task_role="worker", lock="mmap_sem:mm2", waited_s=0.004,
               chain=chain, deadlock=True, waits=links),
            ev(SUP, "cluster_stop", duration_s=0.01, status=3)]


@pytest.mark.parametrize("with_acquires", [True, False], ids=["traced", "inferred"])
def test_deadlock_is_a_ring_of_waits(tmp_path: Path, with_acquires: bool) -> None:
    events = stamp(deadlock(with_acquires))
    tr = trace_of(tmp_path, events)
    validate(tr)
    waits = of(tr, "X", cat="wait")
    holds = of(tr, "X", cat="lock")
    assert {(w["pid"], w["name"]) for w in waits} == {(201, "wait mmap_sem:mm2"),
                                                      (202, "wait ksm_thread_mutex")}
    assert all(w["args"]["still_waiting_at_end"] for w in waits)
    assert {(h["pid"], h["name"]) for h in holds} == {
        (201, "ksm_thread_mutex"), (202, "mmap_sem:mm2" + (" (write)" if with_acquires else ""))}
    assert all(h["args"]["still_held_at_end"] for h in holds)
    assert all(("inferred" in h["args"]) != with_acquires for h in holds)
    # each wait points at the other's hold: the cycle 201 -> 202 -> 201
    edges = {(s["pid"], s["name"], d["pid"], d["name"].split(" (")[0]) for s, d in flow_edges(tr)}
    assert edges == {(201, "wait mmap_sem:mm2", 202, "mmap_sem:mm2"),
                     (202, "wait ksm_thread_mutex", 201, "ksm_thread_mutex")}
    g, = [e for e in of(tr, "i") if e["s"] == "g"]
    assert g["name"] == "deadlock" and len(g["args"]["chain"]) == 3
    # the waits begin when the chain says (waited_s before the report)
    hung = next(e["mono_ns"] for e in events if e["event"] == "hung_task") - T0
    w1 = next(w for w in waits if w["pid"] == 201)
    assert w1["ts"] == pytest.approx((hung - 4_000_000) / 1000)


@pytest.mark.parametrize("damage", ["release_without_acquire", "end_without_start", "waited_not_number",
                                    "holders_not_pids", "visit_ends_before_start"])
def test_broken_log_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    events = locked_run()
    if damage == "release_without_acquire":
        events = [e for e in events if not (e["event"] == "lock_acquire" and e["lock"] == "mmap_sem:mm1")]
        why = "mmap_sem:mm1 released, never taken"
    elif damage == "end_without_start":
        events = [e for e in events if e["event"] != "scan_batch_start"]
        why = "no scan_batch_start before it"
    elif damage == "waited_not_number":
        next(e for e in events if e["event"] == "lock_wait")["waited_ms"] = "slow"
        why = "waited_ms 'slow'"
    elif damage == "holders_not_pids":
        next(e for e in events if e["event"] == "lock_wait")["holders"] = "201"
        why = "is not a list of pids"
    else:
        v = next(e for e in events if e["event"] == "scan_batch_end")["mms"][0]
        v["start_ns"] = v["end_ns"] + 1
        why = "is not a visit"
    d = write_run(tmp_path / "run", events)
    out = tmp_path / "t.json"
    assert main([str(d), "trace", "-o", str(out)]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken log" in err and why in err, err
    assert not out.exists() and not list(tmp_path.glob(".t.json*"))
    with pytest.raises(BrokenLog):
        trace_events(e for e in sorted(events, key=lambda e: e["mono_ns"]))


def test_torn_line_empty_folder_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_run(tmp_path / "run", locked_run(),
                  extra_lines={"worker-201.jsonl": ['{"event": "merge", "mono_']})
    out = tmp_path / "t.json"
    assert main([str(d), "trace", "-o", str(out)]) == 0
    assert "skipped 1 invalid lines" in capsys.readouterr().err
    validate(json.loads(out.read_text()))
    assert main([str(d), "plot", "-o", str(tmp_path / "p.png")]) == 0
    assert "skipped 1 invalid lines" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "trace", "-o", str(out)]) == 0
    assert "no *.jsonl log files" in capsys.readouterr().err
    empty = json.loads(out.read_text())
    validate(empty)
    assert [e["ph"] for e in empty["traceEvents"]] == ["M", "M"]  # the counters' name alone
    assert main([str(tmp_path / "empty"), "plot", "-o", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "no *.jsonl log files" in capsys.readouterr().err
    for cmd in (["trace", "-o", str(tmp_path / "x.json")], ["plot", "-o", str(tmp_path / "x.png")]):
        assert main([str(out), *cmd]) == 2
        err = capsys.readouterr().err
        assert err == f"uksm logs: not a folder: {out}\n"


def test_window_crops_trace_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = locked_run()
    lo, hi = 0.008, 0.020
    tr = trace_of(tmp_path, events, "--from", str(lo), "--to", str(hi))
    validate(tr)
    for e in tr["traceEvents"]:
        if e["ph"] == "X":
            assert lo * 1e6 <= e["ts"] and e["ts"] + e["dur"] <= hi * 1e6 + 0.01
        elif e["ph"] in ("i", "s", "f", "C"):
            assert lo * 1e6 <= e["ts"] <= hi * 1e6
    assert any(e["args"].get("cropped") for e in of(tr, "X"))
    d = tmp_path / "run"
    assert main([str(d), "plot", "-o", str(tmp_path / "w.png"), "--from", "0.01", "--to", "0.02"]) == 0
    assert main([str(d), "plot", "-o", str(tmp_path / "w.png"), "--from", "0.02", "--to", "0.01"]) == 2
    assert "--from 0.02 is not before --to 0.01" in capsys.readouterr().err


def test_trace_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_run(tmp_path / "run", deadlock(True))
    assert main([str(d), "trace", "-o", str(tmp_path / "t.json"), "--png", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote " + str(tmp_path / "t.png") in capsys.readouterr().out


def many_kills(n: int) -> list[dict[str, Any]]:
    """n tasks, 4 alive at a time: each killed (SIGKILL) then reaped, its
    replacement spawned: an inject of n kills."""
    out: list[dict[str, Any]] = [ev(SUP, "cluster_start", workers=4, pages=8, frames=64,
                                     workload="dup", exit_policy="seed", hazards=[], log_dir="x")]
    for i in range(n + 4):
        pid = 1000 + i
        out.append(ev(SUP, "worker_spawn", worker=f"w{i}", worker_pid=pid, mm=i + 1, pages=8, workload="dup"))
        if i >= 4:
            victim = 1000 + i - 4
            out += [ev(CTL, "inject_kill", target_pid=victim, mm=i - 3, signal="KILL", mode="random"),
                    ev(SUP, "mm_exit_begin", mm=i - 3),
                    ev(SUP, "worker_exit", worker=f"w{i - 4}", worker_pid=victim, mm=i - 3, how="sigkill",
                       path="fast", reaped=True)]
        if i % 3 == 0:
            out += [ev(KSMD, "scan_batch_start", seqnr=i, pages_to_scan=10),
                    ev(KSMD, "scan_batch_end", pages=10, ms=0.5, seqnr=i, pages_shared=i % 7,
                       pages_sharing=i % 11, pages_unshared=3, pages_volatile=1, full_scans=i,
                       frames_used=30 + i % 5),
                    ev(KSMD, "full_scan", seqnr=i)]
    return stamp(out)


def test_plot_lanes_stay_few_at_thousands_of_kills(tmp_path: Path) -> None:
    events = many_kills(2000)
    d = gather(iter(events))
    assert d.kills == 2000 and len(d.tasks) == 2004
    tasks = list(d.tasks.values())
    lanes, packed = _lanes(tasks, d.end)
    assert packed and lanes <= 5, lanes  # 4 alive at a time: a lane is freed and taken again
    for tk in tasks:  # every kill tick on its own task's lane
        assert all(abs(t - tk.end) < 0.01 for t, _ in tk.marks) if tk.marks else tk.end is None
    out = tmp_path / "p.png"
    plot_events(iter(events), out, "many")
    assert out.read_bytes()[:4] == b"\x89PNG"
    small = gather(iter(many_kills(10)))
    assert _lanes(list(small.tasks.values()), small.end) == (14, False)  # a lane each


def test_trace_stats_count_what_it_holds(tmp_path: Path) -> None:
    st = TraceStats()
    tr = trace_events(iter(locked_run()), st)
    assert st.events == len(locked_run())
    assert st.slices == len(of(tr, "X")) and st.instants == len([e for e in of(tr, "i")])
    assert st.counters == len(of(tr, "C")) and st.flows == len(of(tr, "s")) == 1


def test_any_event_stream_renders(tmp_path: Path) -> None:
    """An exploration's schedule (issue 21), fed as events in the log's
    schema: unknown events are instants on their emitter's track, its
    preemptions in category sched."""
    steps = [{"event": "schedule_step", "mono_ns": T0 + i * 1000, "role": role, "pid": pid,
              "cluster": "x", "step": i, "op": op}
             for i, (role, pid, op) in enumerate([("worker", 11, "lock mmap_sem:mm1"),
                                                   ("ksmd", 12, "lock ksm_thread_mutex"),
                                                   ("worker", 11, "unlock mmap_sem:mm1")])]
    steps.insert(2, {"event": "preempt", "mono_ns": T0 + 1500, "role": "ksmd", "pid": 12,
                     "cluster": "x", "step": 2})
    tr = trace_events(iter(steps))
    validate(tr)
    got = [(e["name"], e["cat"], e["pid"], e["args"]["step"]) for e in of(tr, "i")]
    assert got == [("schedule_step", "sched", 11, 0), ("schedule_step", "sched", 12, 1),
                   ("preempt", "sched", 12, 2), ("schedule_step", "sched", 11, 2)]
