"""Synthetic log folders for the tests of ``uksm logs`` (test_logs,
test_trace): a run's events, each with the role and pid of the process
that wrote it, written as that run's ``<role>-<pid>.jsonl`` files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

T0 = 5_000_000_000  # mono_ns of the first event
STEP = 1_000_000  # 1 ms between consecutive events of a scenario

SUP, KSMD, REAPER, CTL = ("supervisor", 100), ("ksmd", 101), ("reaper", 102), ("ctl", 300)
W1, W2, W3, W4 = ("worker", 201), ("worker", 202), ("worker", 203), ("worker", 204)


def ev(who: tuple[str, int], event: str, **fields: Any) -> dict[str, Any]:
    """One event emitted by process *who* = (role, pid). worker_spawn and
    worker_exit carry the worker's pid in a field named pid too: the field
    wins on the line (as a structlog keyword would), the file stays the
    emitter's (``_who``)."""
    return {"_who": who, "role": who[0], "pid": who[1], "event": event, **fields}


def clean_run() -> list[dict[str, Any]]:
    """A run that obeys every rule: mm 1 fast exit, mm 2 slow exit after an
    OOM kill, mm 3 SIGKILLed and reaped, mm 4 never entered KSM. mono_ns is
    assigned in list order (1 ms apart) unless an event sets its own."""
    spawn = [
        ev(SUP, "worker_spawn", worker=f"w{i}", mm=i, pages=64, workload="dup")
        for i in (1, 2, 3, 4)
    ]
    return [
        ev(SUP, "cluster_start", workers=4, pages=64, frames=512, workload="dup",
           exit_policy="seed", hazards=[], log_dir="/tmp/x"),
        *spawn,
        ev(W1, "ksm_enter", mm=1),
        ev(W2, "ksm_enter", mm=2),
        ev(W3, "ksm_enter", mm=3),
        ev(KSMD, "ksm_run", run=1, previous=0),
        ev(KSMD, "scan_batch_start", seqnr=0, pages_to_scan=100),
        ev(KSMD, "lock_wait", lock="mmap_sem:mm1", holders=[201], waited_ms=2.5),
        ev(KSMD, "merge", mm=1, count=10, t_last_ns=None),  # t_last_ns filled below
        ev(KSMD, "merge", mm=2, count=5, t_last_ns=None),
        ev(KSMD, "scan_batch_end", pages=100, ms=3.2, seqnr=0, pages_shared=3,
           pages_sharing=12, pages_unshared=40, pages_volatile=45, full_scans=0),
        ev(W2, "cow_break", mm=2, count=2, by="worker", t_last_ns=None),
        ev(KSMD, "full_scan", seqnr=1),
        ev(W1, "worker_verify", mm=1, pages_verified=64, mismatches=0),
        ev(W1, "mm_exit_begin", mm=1),
        ev(W1, "ksm_exit", mm=1, path="fast", policy="seed"),
        ev(W1, "mmdrop", mm=1, ref="ksm", mm_count=1),
        ev(W1, "mmdrop", mm=1, ref="users", mm_count=0),
        ev(W1, "mm_freed", mm=1),
        ev(SUP, "worker_exit", worker="w1", pid=201, mm=1, how="exit", path="fast", reaped=False),
        ev(KSMD, "oom_kill", victim_pid=202, victim_mm=2, rss=40, free_frames=0),
        ev(W2, "signal", signo=9, name="SIGKILL"),
        ev(W2, "mm_exit_begin", mm=2),
        ev(W2, "ksm_exit", mm=2, path="slow", policy="seed"),
        ev(W2, "mmdrop", mm=2, ref="users", mm_count=1),
        ev(SUP, "worker_exit", worker="w2", pid=202, mm=2, how="oom", path="slow", reaped=False),
        ev(KSMD, "slot_freed", mm=2, by="ksmd"),
        ev(KSMD, "mmdrop", mm=2, ref="ksm", mm_count=0),
        ev(KSMD, "mm_freed", mm=2),
        ev(CTL, "inject_kill", target_pid=203, mm=3, signal="KILL", mode="random"),
        ev(REAPER, "mm_exit_begin", mm=3),
        ev(REAPER, "ksm_exit", mm=3, path="fast", policy="seed"),
        ev(REAPER, "mmdrop", mm=3, ref="ksm", mm_count=1),
        ev(REAPER, "mmdrop", mm=3, ref="users", mm_count=0),
        ev(REAPER, "mm_freed", mm=3),
        ev(SUP, "lock_recovery", lock="mmap_sem:mm3", dead_pid=203, units=1, state="HELD"),
        ev(SUP, "recovery", dead_pid=203, mm=3, ms=1.5),
        ev(SUP, "worker_exit", worker="w3", pid=203, mm=3, how="sigkill", path="fast", reaped=True),
        ev(W4, "kill_point", point="after_fault", action="term", victim_pid=204),
        ev(W4, "mm_exit_begin", mm=4),
        ev(W4, "mmdrop", mm=4, ref="users", mm_count=0),
        ev(W4, "mm_freed", mm=4),
        ev(SUP, "worker_exit", worker="w4", pid=204, mm=4, how="signal", path="none", reaped=False),
        ev(SUP, "fsck", ok=True, errors=0, first=[]),
        ev(SUP, "cluster_stop", duration_s=0.05, status=0),
    ]


def stamp(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each event without one a mono_ns (list order, STEP apart); fill
    merge/cow_break t_last_ns with the event's own time minus 0.5 ms."""
    out = []
    for i, e in enumerate(events):
        e = dict(e)
        e.setdefault("mono_ns", T0 + i * STEP)
        if "t_last_ns" in e and e["t_last_ns"] is None:
            e["t_last_ns"] = e["mono_ns"] - STEP // 2
        out.append(e)
    return out


def write_run(
    d: Path, events: list[dict[str, Any]], extra_lines: dict[str, list[str]] | None = None
) -> Path:
    """Write events as one <role>-<pid>.jsonl file per process (each file in
    mono_ns order); *extra_lines* maps a file name to raw lines appended."""
    d.mkdir(parents=True, exist_ok=True)
    per_file: dict[str, list[dict[str, Any]]] = {}
    for e in stamp(events):
        role, pid = e.pop("_who", (e["role"], e["pid"]))
        line = {
            "timestamp": "2026-11-26T05:40:01.123456Z",
            "level": "info",
            "cluster": "t1",
            **e,
        }
        per_file.setdefault(f"{role}-{pid}.jsonl", []).append(line)
    for name, lines in per_file.items():
        lines.sort(key=lambda x: x["mono_ns"])
        with open(d / name, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    for name, raws in (extra_lines or {}).items():
        with open(d / name, "a") as f:
            for raw in raws:
                f.write(raw + "\n")
    return d
