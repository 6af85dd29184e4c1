"""Tests of ``uksm logs`` (uksm.logs, uksm.cli.logs) on synthetic log folders.

Each test writes a run folder in tmp_path with ``logsynth.write_run``: a
list of events, each with its role and pid, becomes one ``<role>-<pid>.jsonl``
file per process, every file in mono_ns order and the files interleaved in
time.
"""

from __future__ import annotations

import copy
import inspect
import json
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from logsynth import CTL, KSMD, REAPER, STEP, SUP, T0, W1, W2, clean_run, ev, stamp, write_run
from uksm import logs
from uksm.cli.logs import main
from uksm.logs import check, iter_events, lock_stats, summarize, timeline

pytestmark = pytest.mark.timeout(60)

@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", clean_run())


def find(events: list[dict[str, Any]], event: str, **match: Any) -> int:
    """Index of the first event named *event* whose fields match."""
    for i, e in enumerate(events):
        if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
            return i
    raise LookupError(event, match)


# ---------------------------------------------------------------------------
# reading


def test_files_are_interleaved(run_dir: Path) -> None:
    names = sorted(p.name for p in run_dir.glob("*.jsonl"))
    assert names == [
        "ctl-300.jsonl", "ksmd-101.jsonl", "reaper-102.jsonl", "supervisor-100.jsonl",
        "worker-201.jsonl", "worker-202.jsonl", "worker-203.jsonl", "worker-204.jsonl",
    ]


def test_iter_events_merges_in_mono_order(run_dir: Path) -> None:
    got = list(iter_events(run_dir))
    assert len(got) == len(clean_run())
    monos = [e["mono_ns"] for e in got]
    assert monos == sorted(monos)
    assert [e["event"] for e in got] == [e["event"] for e in clean_run()]
    assert got[0]["cluster"] == "t1" and got[0]["level"] == "info"


def test_iter_events_is_a_generator(run_dir: Path) -> None:
    assert inspect.isgenerator(iter_events(run_dir))


def test_iter_events_checks_folder_at_once(tmp_path: Path) -> None:
    with pytest.raises(logs.LogDirError):
        iter_events(tmp_path / "missing")
    with pytest.raises(logs.LogDirError):
        iter_events(tmp_path)  # exists but holds no *.jsonl


# ---------------------------------------------------------------------------
# summary


def test_summary_counts(run_dir: Path) -> None:
    s = summarize(run_dir)
    evs = clean_run()
    assert s["events"]["worker_spawn"] == 4
    assert s["events"]["mmdrop"] == sum(e["event"] == "mmdrop" for e in evs)
    assert sum(s["events"].values()) == len(evs)
    assert s["roles"] == dict(Counter(e["role"] for e in evs))
    assert s["roles"]["reaper"] == 5 and s["roles"]["ctl"] == 1
    assert s["merges"] == 15
    assert s["cow_breaks"] == 2
    assert s["oom_kills"] == 1
    assert s["kills"] == 2  # one kill_point + one inject_kill
    assert s["hung_tasks"] == 0
    assert s["lock_recoveries"] == 1
    assert s["files"] == 8
    assert s["lines"] == len(evs)
    assert s["invalid_lines"] == 0
    assert s["clean_stop"] is True and s["status"] == 0
    # cluster_start is the first event, cluster_stop the last
    assert s["duration_s"] == pytest.approx((len(evs) - 1) * STEP / 1e9)


def test_summary_exits_by_path(run_dir: Path) -> None:
    # mm1 fast, mm2 slow, mm3 fast (reaped), mm4 never entered: none
    assert summarize(run_dir)["exits"] == {
        "fast": 2, "slow": 1, "legacy": 0, "none": 1, "reaped": 1,
    }


def test_summary_duration_without_cluster_events(tmp_path: Path) -> None:
    evs = [e for e in clean_run() if e["event"] not in ("cluster_start", "cluster_stop")]
    s = summarize(write_run(tmp_path / "r", evs))
    assert s["duration_s"] == pytest.approx((len(evs) - 1) * STEP / 1e9)
    assert s["clean_stop"] is False


def test_summary_cli_json_and_text(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "summary", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("events", "roles", "exits", "merges", "cow_breaks", "oom_kills", "kills",
                "hung_tasks", "lock_recoveries", "duration_s", "files", "lines", "invalid_lines"):
        assert key in out
    assert main([str(run_dir), "summary"]) == 0
    text = capsys.readouterr().out
    assert "merges" in text and "15" in text
    assert "fast 2  slow 1  legacy 0  none 1  reaped 1" in text


# ---------------------------------------------------------------------------
# invalid lines, user errors


BAD_LINES = [
    "this is not json",
    "[1, 2, 3]",
    '{"event": "merge"}',
    '{"mono_ns": 5}',
    '{"event": "merge", "mono_ns": "5"}',
    '{"event": "merge", "mono',  # torn last line of a killed process
]


def test_invalid_lines_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_run(tmp_path / "r", clean_run(),
                  extra_lines={"worker-201.jsonl": BAD_LINES, "junk-1.jsonl": ["", "   ", "{}"]})
    s = summarize(d)
    assert s["invalid_lines"] == len(BAD_LINES) + 1  # blank lines are not counted
    assert sum(s["events"].values()) == len(clean_run())
    assert s["lines"] == len(clean_run()) + len(BAD_LINES) + 1

    assert main([str(d), "summary", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["invalid_lines"] == 7
    assert main([str(d), "check"]) == 0
    captured = capsys.readouterr()
    assert "skipped 7 invalid lines" in captured.err
    assert "worker-201.jsonl" in captured.err


@pytest.mark.parametrize("sub", [["summary"], ["check"], ["locks"], ["timeline", "--mm", "1"]])
def test_empty_or_missing_folder_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: list[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a log\n")
    for d in (tmp_path, tmp_path / "missing"):
        assert main([str(d), *sub]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_usage_errors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "uksm logs" in capsys.readouterr().out
    assert main([str(run_dir)]) == 2  # no subcommand
    assert main([str(run_dir), "timeline"]) == 2  # no --mm
    assert main([str(run_dir), "timeline", "--mm", "x"]) == 2
    assert main([str(run_dir), "plot"]) == 2  # no -o
    capsys.readouterr()


def test_out_of_order_file_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_run(tmp_path / "r", clean_run())
    with open(d / "worker-201.jsonl", "a") as f:
        f.write(json.dumps({"event": "signal", "mono_ns": 1, "role": "worker", "pid": 201}) + "\n")
    assert main([str(d), "summary", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["out_of_order_lines"] == 1
    assert "not in mono_ns order" in cap.err


# ---------------------------------------------------------------------------
# timeline


def test_timeline_orders_events_across_files(run_dir: Path) -> None:
    rows = timeline(run_dir, 2)
    assert [r["event"] for r in rows] == [
        "worker_spawn", "ksm_enter", "merge", "cow_break", "oom_kill", "mm_exit_begin",
        "ksm_exit", "mmdrop", "worker_exit", "slot_freed", "mmdrop", "mm_freed",
    ]
    assert {r["role"] for r in rows} == {"supervisor", "worker", "ksmd"}
    times = [r["t_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0  # relative to the run's first event
    assert rows[0]["t_s"] == pytest.approx(find(clean_run(), "worker_spawn", mm=2) * STEP / 1e9)


def test_timeline_includes_victim_and_inject(run_dir: Path) -> None:
    assert "inject_kill" in [r["event"] for r in timeline(run_dir, 3)]
    assert "oom_kill" not in [r["event"] for r in timeline(run_dir, 3)]
    assert timeline(run_dir, 99) == []


def test_timeline_cli(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "timeline", "--mm", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12
    assert "ksm_exit" in lines[6] and "path=slow" in lines[6] and "worker" in lines[6]
    assert "slot_freed" in lines[9] and "ksmd" in lines[9] and "by=ksmd" in lines[9]
    stamps = [float(line.split()[0]) for line in lines]
    assert stamps == sorted(stamps)
    assert main([str(run_dir), "timeline", "--mm", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["event"] for r in rows][-1] == "mm_freed"


# ---------------------------------------------------------------------------
# check


def test_check_clean_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(run_dir) == []
    assert main([str(run_dir), "check"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main([str(run_dir), "check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["violations"] == [] and out["notes"] == []


def _drop(evs: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    del evs[find(evs, event, **match)]
    return evs


def _insert_after(evs: list[dict[str, Any]], anchor: tuple[str, dict[str, Any]],
                  new: dict[str, Any]) -> list[dict[str, Any]]:
    evs.insert(find(evs, anchor[0], **anchor[1]) + 1, new)
    return evs


def _plant_rule1_not_freed(evs):
    return _drop(evs, "ksm_exit", mm=1)


def _plant_rule1_freed_twice(evs):
    return _insert_after(evs, ("ksm_exit", {"mm": 1}), ev(KSMD, "slot_freed", mm=1, by="ksmd"))


def _plant_rule1_entered_twice(evs):
    # a second __ksm_enter of mm 1 before its slot was freed
    return _insert_after(evs, ("ksm_enter", {"mm": 1}), ev(W1, "ksm_enter", mm=1))


def _plant_rule1_fast_exit_twice(evs):
    return _insert_after(evs, ("ksm_exit", {"mm": 3}),
                         ev(REAPER, "ksm_exit", mm=3, path="legacy", policy="legacy"))


def _plant_rule2_no_slot_freed(evs):
    # ksmd frees the slot of an exiting mm from its unmerge path instead of
    # the scan: still fine; but here nobody frees it at all
    return _drop(evs, "slot_freed", mm=2)


def _plant_rule2_freed_before(evs):
    i = find(evs, "slot_freed", mm=2)
    moved = evs.pop(i)
    return _insert_after(evs, ("mm_exit_begin", {"mm": 2}), moved)


def _plant_rule3_count_not_zero(evs):
    return _drop(evs, "mmdrop", mm=1, ref="users")


def _plant_rule3_freed_twice(evs):
    return _insert_after(evs, ("mm_freed", {"mm": 4}), ev(SUP, "mm_freed", mm=4))


def _plant_rule3_no_mmdrop(evs):
    evs = _drop(evs, "mmdrop", mm=4)
    return evs


def _plant_rule4_merge_after_exit(evs):
    return _insert_after(evs, ("ksm_exit", {"mm": 2}),
                         ev(KSMD, "merge", mm=2, count=1, t_last_ns=None))


def _plant_rule5_hung_task(evs):
    return _insert_after(evs, ("oom_kill", {}), ev(
        SUP, "hung_task", pid=202, role="worker", lock="ksm_thread_mutex", waited_s=120.0,
        chain=["worker 202 waits ksm_thread_mutex", "held by ksmd 101", "ksmd 101 waits frames"]))


def _plant_rule6_oops(evs):
    return _insert_after(evs, ("oom_kill", {}), ev(
        KSMD, "oops", error="NullPointerDereference('mm = slot->mm')",
        tb="Traceback (most recent call last):\n  File \"ksmd.py\", line 1, in slot_state\n"
           "    raise NullPointerDereference\nNullPointerDereference: mm = slot->mm"))


def _plant_rule7_use_after_free(evs):
    return _insert_after(evs, ("mm_freed", {"mm": 4}),
                         ev(KSMD, "use_after_free", mm=4, lock="mmap_sem:mm4", op="unlock"))


def _plant_rule8_lockdep(evs):
    return _insert_after(evs, ("oom_kill", {}), ev(
        KSMD, "lockdep", kind="recursive", lock="mmap_sem:mm1", held="mmap_sem:mm1",
        op="down_write", chain="down_write <- ksm_exit <- mmput <- oom_kill_and_mmput"))


PLANTS = [
    ("rule 1", "mm 1", "never freed", _plant_rule1_not_freed),
    ("rule 1", "mm 1", "freed twice", _plant_rule1_freed_twice),
    ("rule 1", "mm 3", "freed twice", _plant_rule1_fast_exit_twice),
    ("rule 1", "mm 1", "was never freed", _plant_rule1_entered_twice),
    ("rule 2", "mm 2", "not followed by slot_freed", _plant_rule2_no_slot_freed),
    ("rule 2", "mm 2", "came before it", _plant_rule2_freed_before),
    ("rule 3", "mm 1", "mm_count=1", _plant_rule3_count_not_zero),
    ("rule 3", "mm 4", "freed twice", _plant_rule3_freed_twice),
    ("rule 3", "mm 4", "no mmdrop", _plant_rule3_no_mmdrop),
    ("rule 4", "mm 2", "after mm_exit_begin", _plant_rule4_merge_after_exit),
    ("rule 5", "ksm_thread_mutex", "hung task", _plant_rule5_hung_task),
    ("rule 6", "oops", "NullPointerDereference", _plant_rule6_oops),
    ("rule 7", "mm 4", "freed mm's lock", _plant_rule7_use_after_free),
    ("rule 8", "lockdep", "recursive", _plant_rule8_lockdep),
]


@pytest.mark.parametrize("rule,who,what,plant", PLANTS, ids=[f"{p[0]}-{p[3].__name__}" for p in PLANTS])
def test_check_planted_violation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str, who: str, what: str, plant
) -> None:
    d = write_run(tmp_path / "bad", plant(copy.deepcopy(clean_run())))
    violations = check(d)
    hits = [v for v in violations if v.startswith(rule) and who in v and what in v]
    assert hits, violations
    assert main([str(d), "check"]) == 4
    out = capsys.readouterr().out
    assert hits[0] in out.splitlines()


def test_check_rule4_merge_before_exit_begin_but_logged_after_is_ok(tmp_path: Path) -> None:
    evs = stamp(clean_run())
    i = find(evs, "mm_exit_begin", mm=2)
    merge = ev(KSMD, "merge", mm=2, count=1, t_last_ns=evs[i]["mono_ns"] - 10,
               mono_ns=evs[i]["mono_ns"] + 10)
    evs.insert(i + 1, merge)
    assert check(write_run(tmp_path / "r", evs)) == []


def test_check_unclean_run_not_freed_is_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A slot never freed in a run that did not stop is a note, not a
    violation; but a run with no clean stop is no evidence of a pass."""
    evs = _drop(_plant_rule1_not_freed(clean_run()), "cluster_stop")
    d = write_run(tmp_path / "r", evs)
    assert check(d) == []
    assert main([str(d), "check", "--json"]) == 6
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and out["clean_stop"] is False and out["violations"] == []
    assert any("mm 1" in n and "never freed" in n for n in out["notes"])
    assert any("no cluster_stop" in m for m in out["missing"])


def test_check_reenter_after_slot_freed_is_ok(tmp_path: Path) -> None:
    # ksmd frees the slot of an mm whose mergeable areas are all gone; the
    # worker madvises again: a second ksm_enter, then a fast exit
    evs = clean_run()
    _insert_after(evs, ("full_scan", {}), ev(KSMD, "slot_freed", mm=1, by="ksmd"))
    _insert_after(evs, ("slot_freed", {"mm": 1}), ev(W1, "ksm_enter", mm=1))
    assert check(write_run(tmp_path / "r", evs)) == []


# ---------------------------------------------------------------------------
# locks


def test_lock_stats_percentiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evs = clean_run()
    # 100 waits of 1..100 ms on mmap_sem:mm2 and 3 on ksm_thread_mutex
    waits = [ev(W2 if i % 2 else KSMD, "lock_wait", lock="mmap_sem:mm2", holders=[101],
                waited_ms=float(i)) for i in range(100, 0, -1)]
    waits += [ev(KSMD, "lock_wait", lock="ksm_thread_mutex", holders=[103], waited_ms=w)
              for w in (7.0, 1.0, 4.0)]
    evs[5:5] = waits
    d = write_run(tmp_path / "r", evs)
    ls = lock_stats(d)
    sem = ls["instances"]["mmap_sem:mm2"]
    assert (sem["count"], sem["p50"], sem["p99"], sem["max"]) == (100, 50.0, 99.0, 100.0)
    mutex = ls["classes"]["ksm_thread_mutex"]
    assert (mutex["count"], mutex["p50"], mutex["p99"], mutex["max"]) == (3, 4.0, 7.0, 7.0)
    cls = ls["classes"]["mmap_sem"]  # mm1's one wait of 2.5 ms joins the class
    assert cls["count"] == 101 and cls["max"] == 100.0
    assert list(ls["classes"])[0] == "mmap_sem"  # ranked by total wait
    longest = ls["longest"]
    assert len(longest) == 10
    assert [w["waited_ms"] for w in longest] == [float(x) for x in range(100, 90, -1)]
    assert longest[0]["holders"] == [101] and longest[0]["lock"] == "mmap_sem:mm2"

    assert main([str(d), "locks"]) == 0
    text = capsys.readouterr().out
    assert "per lock class" in text and "mmap_sem:mm2" in text and "longest waits" in text
    assert main([str(d), "locks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["mmap_sem"]["count"] == 101


def test_locks_without_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_run(tmp_path / "r", [e for e in clean_run() if e["event"] != "lock_wait"])
    assert lock_stats(d)["classes"] == {}
    assert main([str(d), "locks"]) == 0
    assert "no lock_wait events" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# plot


def test_plot_without_matplotlib(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(run_dir), "plot", "-o", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.strip() == "plot needs matplotlib: pip install 'uksm[plot]'"
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_png(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    assert main([str(run_dir), "plot", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(run_dir), "plot", "-o", str(tmp_path / "no" / "dir" / "p.png")]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# streaming


def test_summary_streams_a_large_file(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    n = 200_000
    base = {"timestamp": "2026-11-26T05:40:01.123456Z", "level": "info", "role": "ksmd",
            "pid": 101, "cluster": "t1"}
    with open(d / "ksmd-101.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({**base, "mono_ns": T0 + 2 * i, "event": "merge", "mm": i % 50,
                                "count": 1, "t_last_ns": T0 + 2 * i - 1}) + "\n")
    with open(d / "worker-201.jsonl", "w") as f:
        for i in range(0, n, 1000):
            f.write(json.dumps({**base, "role": "worker", "pid": 201, "mono_ns": T0 + 2 * i + 1,
                                "event": "cow_break", "mm": 1, "count": 1, "by": "worker",
                                "t_last_ns": T0 + 2 * i}) + "\n")
    size = sum(p.stat().st_size for p in d.iterdir())

    tracemalloc.start()
    try:
        s = summarize(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s["merges"] == n and s["cow_breaks"] == n // 1000
    assert s["lines"] == n + n // 1000
    assert size > 30_000_000
    assert peak < size / 20, (peak, size)


# ---------------------------------------------------------------------------
# evidence, and a folder of several clusters (issue 28: check passed on no
# evidence; a reused log folder mixed 26 clusters)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 16], ids=["empty", "garbage"])
def test_check_on_no_valid_event_fails_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / "supervisor-1.jsonl").write_bytes(content)
    assert main([str(tmp_path), "check"]) == 6
    out = capsys.readouterr().out
    assert "no evidence: no valid event" in out and "ok" not in out.split(), out
    assert main([str(tmp_path), "check", "--json"]) == 6
    j = json.loads(capsys.readouterr().out)
    assert j["ok"] is False and j["status"] == 6 and j["clusters"] == []


@pytest.mark.parametrize("drop", ["cluster_start", "cluster_stop"])
def test_check_without_a_start_or_a_clean_stop_fails_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], drop: str
) -> None:
    d = write_run(tmp_path / "r", _drop(clean_run(), drop))
    assert main([str(d), "check"]) == 6
    out = capsys.readouterr().out
    assert f"no evidence: no {drop}" in out, out
    assert "incomplete:" in out and "ok: all" not in out, out


def as_cluster(evs: list[dict[str, Any]], name: str, boot: int | None, t0: int) -> list[dict[str, Any]]:
    """The events of a run as cluster ``name`` booted ``boot``, from mono_ns t0."""
    out = []
    for i, e in enumerate(stamp(evs)):
        e = dict(e, cluster=name, mono_ns=t0 + i * STEP)
        if "t_last_ns" in e:
            e["t_last_ns"] = e["mono_ns"] - STEP // 2
        if boot is not None:
            e["boot_id"] = boot
        out.append(e)
    return out


def reused_folder(tmp_path: Path) -> Path:
    """One log folder, three clusters (as a reused Machine log_dir holds):
    two boots of cluster "a" (the same mm ids, the same supervisor file),
    then "b", SIGKILLed (no cluster_stop)."""
    evs = (as_cluster(clean_run(), "a", 0x1a, T0)
           + as_cluster(clean_run(), "a", 0x2b, T0 + 10**9)
           + as_cluster(_drop(clean_run(), "cluster_stop"), "b", 0x3c, T0 + 2 * 10**9))
    return write_run(tmp_path / "r", evs)


def test_check_tells_the_clusters_of_a_folder_apart(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = reused_folder(tmp_path)
    assert main([str(d), "check"]) == 6     # no violation: b did not stop cleanly
    out = capsys.readouterr().out
    assert "rule " not in out, out          # mixed, the two a's mm ids collided (freed twice...)
    assert "cluster a@1a: ok: all 8 rules hold (4 mms)" in out, out
    assert "cluster a@2b: ok: all 8 rules hold (4 mms)" in out, out
    assert "b@3c: no evidence: no cluster_stop" in out, out
    assert "3 clusters: 2 ok, 0 with violations, 1 incomplete" in out, out
    assert main([str(d), "check", "--cluster", "a@2b"]) == 0
    assert "ok: all 8 rules hold (4 mms)" in capsys.readouterr().out


def test_summary_lists_the_clusters_and_never_reads_anothers_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = reused_folder(tmp_path)
    s = summarize(d)
    assert [(c["cluster"], c["clean_stop"], c["status"]) for c in s["clusters"]] == [
        ("a@1a", True, 0), ("a@2b", True, 0), ("b@3c", False, None)]
    assert all(c["exits"]["fast"] == 2 for c in s["clusters"])
    assert s["clean_stop"] is False and s["status"] is None
    assert main([str(d), "summary", "--cluster", "b"]) == 0
    text = capsys.readouterr().out
    assert "no cluster_stop" in text and "clean stop" not in text, text
    assert main([str(d), "summary"]) == 0
    text = capsys.readouterr().out
    assert "3 clusters in" in text and "a@1a" in text and "b@3c" in text, text


def test_timeline_and_locks_of_a_folder_of_clusters_need_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = reused_folder(tmp_path)
    for sub in (["timeline", "--mm", "1"], ["locks"]):
        assert main([str(d), *sub]) == 2
        err = capsys.readouterr().err
        assert "3 clusters (a@1a, a@2b, b@3c): say which with --cluster" in err, err
        assert main([str(d), *sub, "--cluster", "a"]) == 2    # two boots of a
        capsys.readouterr()
    assert main([str(d), "timeline", "--mm", "1", "--cluster", "a@2b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["boot_id"] == 0x2b for r in rows)


def test_one_kill_at_a_point_counts_once(tmp_path: Path) -> None:
    """kill(at=) logs inject_kill (mode point) as it arms and kill_point as
    it fires: one kill.  A point armed and never reached is none."""
    evs = clean_run()
    _insert_after(evs, ("full_scan", {}),
                  ev(CTL, "inject_kill", target_pid=204, mm=4, signal="TERM", mode="point"))
    _insert_after(evs, ("full_scan", {}),
                  ev(CTL, "inject_kill", target_pid=201, mm=1, signal="KILL", mode="point"))
    assert summarize(write_run(tmp_path / "r", evs))["kills"] == 2  # as before: the random one
    # and w4's kill_point; w1's point never fired


def test_trace_and_plot_of_a_folder_of_clusters_need_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A picture of two clusters at once would draw one's mm ids and
    counters over the other's: refused before anything is written."""
    d = reused_folder(tmp_path)
    out = tmp_path / "t.json"
    for sub in (["trace", "-o", str(out)], ["plot", "-o", str(tmp_path / "p.png")]):
        assert main([str(d), *sub]) == 2
        err = capsys.readouterr().err
        assert "3 clusters (a@1a, a@2b, b@3c): say which with --cluster" in err, err
    assert not out.exists() and not (tmp_path / "p.png").exists()
    assert main([str(d), "trace", "-o", str(out), "--cluster", "a@2b"]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert json.loads(out.read_text())["traceEvents"]
