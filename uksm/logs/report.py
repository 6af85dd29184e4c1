"""Answers about a run: its summary, one address space's timeline, the
lock waits (``uksm logs summary|timeline|locks``; its pictures: ``plots``,
``trace``)."""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uksm.logs.read import (
    EXIT_PATHS,
    Event,
    ReadStats,
    _int,
    _num,
    _with_origin,
    by_cluster,
    iter_events,
    select,
)
from uksm.logs.read import label as cluster_label

# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


class _Summary:
    """The counts of one cluster instance (``summarize_events`` keeps one
    per cluster, so that nothing of two clusters is mixed: mm ids, exits,
    the stop and its status are each cluster's own)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.roles: dict[str, int] = {}
        self.exits = dict.fromkeys(EXIT_PATHS, 0)
        self.exits["reaped"] = 0
        self.ksm_exit_mms: set[int | None] = set()
        self.worker_exit_paths: list[tuple[int | None, str]] = []
        self.merges = self.cow_breaks = self.kills = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.start_ns: int | None = None
        self.stop_ns: int | None = None
        self.status: Any = None

    def feed(self, ev: Event) -> None:
        name = ev["event"]
        self.counts[name] = self.counts.get(name, 0) + 1
        role = ev.get("role")
        role = role if isinstance(role, str) else "?"
        self.roles[role] = self.roles.get(role, 0) + 1
        mono = ev["mono_ns"]
        if self.first_ns is None:
            self.first_ns = mono
        self.last_ns = mono
        if name == "merge":
            self.merges += _int(ev.get("count")) or 0
        elif name == "cow_break":
            self.cow_breaks += _int(ev.get("count")) or 0
        elif name == "ksm_exit":
            path = ev.get("path")
            if path in EXIT_PATHS:
                self.exits[path] += 1
            self.ksm_exit_mms.add(_int(ev.get("mm")))
        elif name == "worker_exit":
            if ev.get("reaped") is True:
                self.exits["reaped"] += 1
            path = ev.get("path")
            if isinstance(path, str):
                self.worker_exit_paths.append((_int(ev.get("mm")), path))
        elif name == "kill_point":
            # a kill delivered at a point (one kill(at=) logs inject_kill when it
            # arms, kill_point when it fires: counted once, here)
            if ev.get("action") != "delay":
                self.kills += 1
        elif name == "inject_kill":
            if ev.get("mode") != "point":  # a kill now; a point's is counted as it fires
                self.kills += 1
        elif name == "cluster_start":
            if self.start_ns is None:
                self.start_ns = mono
        elif name == "cluster_stop":
            self.stop_ns = mono
            self.status = ev.get("status")

    def result(self) -> dict[str, Any]:
        exits = dict(self.exits)
        # One exit per mm: ksm_exit says how the slot went; worker_exit adds the
        # mms that never reached ksm_exit (path "none": never entered KSM).
        for mm, path in self.worker_exit_paths:
            if mm not in self.ksm_exit_mms and path in EXIT_PATHS:
                exits[path] += 1
        begin = self.start_ns if self.start_ns is not None else self.first_ns
        end = self.stop_ns if self.stop_ns is not None else self.last_ns
        duration = (end - begin) / 1e9 if begin is not None and end is not None else 0.0
        counts = self.counts
        return {
            "events": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "roles": dict(sorted(self.roles.items(), key=lambda kv: (-kv[1], kv[0]))),
            "exits": exits,
            "merges": self.merges,
            "cow_breaks": self.cow_breaks,
            "oom_kills": counts.get("oom_kill", 0),
            "kills": self.kills,
            "hung_tasks": counts.get("hung_task", 0),
            "lock_recoveries": counts.get("lock_recovery", 0),
            "duration_s": round(max(duration, 0.0), 6),
            "started": self.start_ns is not None,
            "clean_stop": self.stop_ns is not None,
            "status": self.status,
            "lines": sum(counts.values()),
        }


def summarize_events(events: Iterable[Event], stats: ReadStats | None = None) -> dict[str, Any]:
    """Counts and totals over an event stream (see :func:`summarize`): the
    totals of every cluster in it, and ``clusters``, each cluster instance's
    own summary (``cluster``: its label, ``boot_id``), in the order they
    started.  ``clean_stop`` holds when every cluster stopped cleanly;
    ``status`` is the one cluster's, or with several the first that is not
    0 (None if one has no cluster_stop)."""
    per = by_cluster(events, _Summary)
    first_ns = min((a.first_ns for a in per.values() if a.first_ns is not None), default=None)
    last_ns = max((a.last_ns for a in per.values() if a.last_ns is not None), default=None)
    clusters = []
    for inst, acc in per.items():
        r = acc.result()
        clusters.append({"cluster": cluster_label(inst), "name": inst[0], "boot_id": inst[1], **r})
    stats = stats or ReadStats()

    def total(key: str) -> Any:
        return sum(c[key] for c in clusters)

    def merged(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in clusters:
            for k, v in c[key].items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
    exits = dict.fromkeys((*EXIT_PATHS, "reaped"), 0)
    for c in clusters:
        for k, v in c["exits"].items():
            exits[k] += v
    if len(clusters) == 1:
        duration, status = clusters[0]["duration_s"], clusters[0]["status"]
    else:
        duration = (round((last_ns - first_ns) / 1e9, 6) if first_ns is not None and last_ns is not None
                    else 0.0)
        sts = [c["status"] for c in clusters]
        status = None if None in sts else next((x for x in sts if x != 0), 0 if sts else None)
    return {
        "events": merged("events"),
        "roles": merged("roles"),
        "exits": exits,
        "merges": total("merges"),
        "cow_breaks": total("cow_breaks"),
        "oom_kills": total("oom_kills"),
        "kills": total("kills"),
        "hung_tasks": total("hung_tasks"),
        "lock_recoveries": total("lock_recoveries"),
        "duration_s": duration,
        "clean_stop": bool(clusters) and all(c["clean_stop"] for c in clusters),
        "status": status,
        "clusters": clusters,
        "files": stats.files,
        "lines": stats.lines,
        "invalid_lines": stats.invalid_lines,
        "out_of_order_lines": stats.out_of_order,
    }


def summarize(log_dir: str | Path) -> dict[str, Any]:
    """Counts per event and role, exits by path, totals and the run's duration.

    Keys: events, roles, exits {fast, slow, legacy, none, reaped}, merges,
    cow_breaks, oom_kills, kills, hung_tasks, lock_recoveries, duration_s,
    clean_stop, status, files, lines, invalid_lines, out_of_order_lines.
    """
    stats = ReadStats()
    return summarize_events(iter_events(log_dir, stats), stats)


# ---------------------------------------------------------------------------
# timeline
# ---------------------------------------------------------------------------


def timeline_events(events: Iterable[Event], mm: int) -> list[Event]:
    """Events concerning *mm*, each a copy with ``t_s`` (s since the run's first event)."""
    origin, stream = _with_origin(events)
    return [
        {"t_s": round((ev["mono_ns"] - origin) / 1e9, 9), **ev}
        for ev in select(stream, mm=mm)
    ]


def timeline(log_dir: str | Path, mm: int) -> list[Event]:
    """Every event of address space *mm* in mono_ns order (see timeline_events)."""
    return timeline_events(iter_events(log_dir), mm)


# ---------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _wait_stats(values: list[float]) -> dict[str, Any]:
    values.sort()
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": values[-1],
        "total": round(sum(values), 6),
    }


def lock_class(name: str) -> str:
    """"mmap_sem:mm3" -> "mmap_sem"; names without an instance stay as they are."""
    return name.split(":", 1)[0]


def lock_stats_events(events: Iterable[Event], top: int = 10) -> dict[str, Any]:
    """Wait statistics from lock_wait events (see :func:`lock_stats`)."""
    origin, stream = _with_origin(events)
    by_instance: dict[str, list[float]] = {}
    longest: list[tuple[float, int, Event]] = []  # min-heap of the top waits
    for seq, ev in enumerate(select(stream, names=("lock_wait",))):
        lock = ev.get("lock")
        waited = _num(ev.get("waited_ms"))
        if not isinstance(lock, str) or waited is None:
            continue
        by_instance.setdefault(lock, []).append(waited)
        item = (waited, -seq, ev)
        if len(longest) < top:
            heapq.heappush(longest, item)
        elif item[:2] > longest[0][:2]:
            heapq.heapreplace(longest, item)

    by_class: dict[str, list[float]] = {}
    for lock, values in by_instance.items():
        by_class.setdefault(lock_class(lock), []).extend(values)
    classes = {k: _wait_stats(v) for k, v in by_class.items()}
    instances = {k: _wait_stats(v) for k, v in by_instance.items()}
    order = lambda kv: (-kv[1]["total"], kv[0])  # noqa: E731
    return {
        "classes": dict(sorted(classes.items(), key=order)),
        "instances": dict(sorted(instances.items(), key=order)),
        "longest": [
            {
                "t_s": round((ev["mono_ns"] - (origin or 0)) / 1e9, 6),
                "lock": ev["lock"],
                "waited_ms": waited,
                "role": ev.get("role"),
                "pid": ev.get("pid"),
                "holders": ev.get("holders"),
            }
            for waited, _, ev in sorted(longest, key=lambda it: (-it[0], -it[1]))
        ],
    }


def lock_stats(log_dir: str | Path) -> dict[str, Any]:
    """Per lock class ("mmap_sem:mm3" counted as "mmap_sem") and per lock
    instance: count, p50, p99, max and total waited_ms (nearest-rank
    percentiles), sorted by total wait; plus the 10 longest waits with the
    waiter and the holder pids. Keys: classes, instances, longest.
    """
    return lock_stats_events(iter_events(log_dir))
