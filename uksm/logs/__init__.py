"""Read a uksm run's logs back and answer questions about it (``uksm logs``).

What it reads
-------------
A run's log folder holds one JSON-lines file per process, ``<role>-<pid>.jsonl``
(supervisor, ksmd, worker, reaper, ctl). Every line is one JSON object with at
least ``event`` (str) and ``mono_ns`` (int, CLOCK_MONOTONIC nanoseconds, so
comparable across processes), and each file is written in increasing
``mono_ns``. The event names and their fields are documented in
``docs/EVENTS.md``; how to use this tool (and jq / DuckDB) is in
``docs/LOGS.md``.

Why it reads them this way
--------------------------
The files of a run are merged into one stream in ``mono_ns`` order with
:func:`heapq.merge` over one generator per file: nothing is loaded whole, so
a run of millions of lines is analysed in constant memory (apart from small
per-mm and per-lock tables). Every subcommand is a consumer of that one
stream (:func:`iter_events`), narrowed when needed by the one filter
(:func:`select`).

Lines that are not a JSON object with a string ``event`` and an integer
``mono_ns`` are skipped and counted (a process killed by SIGKILL may leave a
torn last line); blank lines are ignored. The count is reported by
``summary`` (``invalid_lines``) and as a warning on stderr by the other
subcommands.

Subcommands: ``summary``, ``timeline --mm N``, ``check``, ``locks``,
``plot -o FILE.png``. Exit status: 0 fine, 2 user error (bad folder, bad
arguments, matplotlib missing for ``plot``), 4 ``check`` found violations.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import operator
import os
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "LogDirError",
    "ReadStats",
    "iter_events",
    "select",
    "summarize",
    "check",
    "lock_stats",
    "timeline",
    "main",
]

Event = dict[str, Any]

from uksm.host.exitcodes import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
EXIT_VIOLATIONS = EXIT_INTEGRITY  # the rules a log breaks: an integrity failure

#: Keys present on every line; left out when the "other fields" of an event
#: are shown (timeline, check messages).
COMMON_KEYS = frozenset(
    {"timestamp", "mono_ns", "event", "level", "role", "pid", "cluster"}
)

EXIT_PATHS = ("fast", "slow", "legacy", "none")


class LogDirError(Exception):
    """A user error about the log folder (missing, not a folder, no logs)."""


# ---------------------------------------------------------------------------
# Reading: one iterator over all files, one filter
# ---------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What reading a log folder saw; filled in while the stream is consumed."""

    files: int = 0
    #: non-blank lines read (valid and invalid)
    lines: int = 0
    invalid_lines: int = 0
    #: valid lines whose mono_ns is lower than the previous line of the same
    #: file (the contract says this never happens; the merge is then inexact)
    out_of_order: int = 0
    #: up to 5 "file:line: reason" examples of invalid lines
    invalid_examples: list[str] = field(default_factory=list)

    def _invalid(self, path: Path, lineno: int, reason: str) -> None:
        self.invalid_lines += 1
        if len(self.invalid_examples) < 5:
            self.invalid_examples.append(f"{path.name}:{lineno}: {reason}")


def log_files(log_dir: str | Path) -> list[Path]:
    """The ``*.jsonl`` files of a run folder, sorted by name.

    Raises :class:`LogDirError` when the folder is missing or holds no
    ``*.jsonl`` file.
    """
    d = Path(log_dir)
    if not d.exists():
        raise LogDirError(f"log folder not found: {d}")
    if not d.is_dir():
        raise LogDirError(f"not a folder: {d}")
    files = sorted(p for p in d.glob("*.jsonl") if p.is_file())
    if not files:
        raise LogDirError(f"no *.jsonl log files in {d}")
    return files


def _ensure_fd_limit(n_files: int) -> None:
    """heapq.merge keeps every file open: make sure the fd limit allows it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Linux
        return
    need = n_files + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise LogDirError(
                f"{n_files} log files exceed the open-file limit ({hard}); "
                "raise it with ulimit -n"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


_DECODER = json.JSONDecoder()


def _read_file(path: Path, stats: ReadStats) -> Iterator[Event]:
    """Yield the valid events of one file, counting the invalid lines."""
    decode = _DECODER.decode  # json.loads minus its per-call overhead
    last_ns: int | None = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            stats.lines += 1
            try:
                obj = decode(raw.decode("utf-8"))
            except (ValueError, RecursionError):  # JSON or UTF-8 error
                stats._invalid(path, lineno, "not valid JSON")
                continue
            if type(obj) is not dict:
                stats._invalid(path, lineno, "not a JSON object")
                continue
            if type(obj.get("event")) is not str or type(obj.get("mono_ns")) is not int:
                stats._invalid(path, lineno, "no string 'event' or integer 'mono_ns'")
                continue
            mono = obj["mono_ns"]
            if last_ns is not None and mono < last_ns:
                stats.out_of_order += 1
            last_ns = mono
            yield obj


def iter_events(log_dir: str | Path, stats: ReadStats | None = None) -> Iterator[Event]:
    """Stream every event of every ``*.jsonl`` file of *log_dir* in mono_ns order.

    The folder is checked at once (:class:`LogDirError`); the files are read
    lazily as the returned generator is consumed. Pass a :class:`ReadStats` to
    learn how many lines were read and skipped (final once consumed).
    """
    files = log_files(log_dir)
    if stats is None:
        stats = ReadStats()
    stats.files = len(files)
    _ensure_fd_limit(len(files))
    return heapq.merge(
        *(_read_file(p, stats) for p in files), key=operator.itemgetter("mono_ns")
    )


def _int(value: Any) -> int | None:
    """*value* if it is a real int (not a bool), else None."""
    return value if type(value) is int else None


def _num(value: Any) -> float | None:
    """*value* if it is an int or float (not a bool), else None."""
    return value if type(value) in (int, float) else None


def concerns_mm(ev: Event, mm: int) -> bool:
    """True when the event is about address space *mm* (its mm or victim_mm)."""
    return _int(ev.get("mm")) == mm or _int(ev.get("victim_mm")) == mm


def select(
    events: Iterable[Event],
    *,
    names: Collection[str] | None = None,
    mm: int | None = None,
) -> Iterator[Event]:
    """The one filter: keep events named in *names* and/or concerning *mm*."""
    for ev in events:
        if names is not None and ev["event"] not in names:
            continue
        if mm is not None and not concerns_mm(ev, mm):
            continue
        yield ev


def _with_origin(events: Iterable[Event]) -> tuple[int | None, Iterator[Event]]:
    """(mono_ns of the run's first event, the same stream unchanged)."""
    it = iter(events)
    first = next(it, None)
    if first is None:
        return None, it
    return first["mono_ns"], itertools.chain((first,), it)


def format_fields(ev: Event, skip: Collection[str] = (), origin: int | None = None) -> str:
    """The event's own fields (not the common keys) as compact ``k=v`` pairs.

    With *origin*, integer ``*_ns`` fields (e.g. t_last_ns) are shown as
    seconds since *origin*, like the event times (``t_last=0.041500s``).
    """
    parts = []
    for k, v in ev.items():
        if k in COMMON_KEYS or k in skip:
            continue
        if origin is not None and k.endswith("_ns") and type(v) is int:
            parts.append(f"{k[:-3]}={(v - origin) / 1e9:.6f}s")
        elif isinstance(v, str):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={json.dumps(v, separators=(',', ':'))}")
    return " ".join(parts)


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


def summarize_events(events: Iterable[Event], stats: ReadStats | None = None) -> dict[str, Any]:
    """Counts and totals over an event stream (see :func:`summarize`)."""
    counts: dict[str, int] = {}
    roles: dict[str, int] = {}
    exits = dict.fromkeys(EXIT_PATHS, 0)
    exits["reaped"] = 0
    ksm_exit_mms: set[int | None] = set()
    worker_exit_paths: list[tuple[int | None, str]] = []
    merges = cow_breaks = 0
    first_ns = last_ns = start_ns = stop_ns = None
    status = None

    for ev in events:
        name = ev["event"]
        counts[name] = counts.get(name, 0) + 1
        role = ev.get("role")
        role = role if isinstance(role, str) else "?"
        roles[role] = roles.get(role, 0) + 1
        mono = ev["mono_ns"]
        if first_ns is None:
            first_ns = mono
        last_ns = mono

        if name == "merge":
            merges += _int(ev.get("count")) or 0
        elif name == "cow_break":
            cow_breaks += _int(ev.get("count")) or 0
        elif name == "ksm_exit":
            path = ev.get("path")
            if path in EXIT_PATHS:
                exits[path] += 1
            ksm_exit_mms.add(_int(ev.get("mm")))
        elif name == "worker_exit":
            if ev.get("reaped") is True:
                exits["reaped"] += 1
            path = ev.get("path")
            if isinstance(path, str):
                worker_exit_paths.append((_int(ev.get("mm")), path))
        elif name == "cluster_start":
            if start_ns is None:
                start_ns = mono
        elif name == "cluster_stop":
            stop_ns = mono
            status = ev.get("status")

    # One exit per mm: ksm_exit says how the slot went; worker_exit adds the
    # mms that never reached ksm_exit (path "none": never entered KSM).
    for mm, path in worker_exit_paths:
        if mm not in ksm_exit_mms and path in EXIT_PATHS:
            exits[path] += 1

    begin = start_ns if start_ns is not None else first_ns
    end = stop_ns if stop_ns is not None else last_ns
    duration = (end - begin) / 1e9 if begin is not None and end is not None else 0.0
    stats = stats or ReadStats()
    return {
        "events": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "roles": dict(sorted(roles.items(), key=lambda kv: (-kv[1], kv[0]))),
        "exits": exits,
        "merges": merges,
        "cow_breaks": cow_breaks,
        "oom_kills": counts.get("oom_kill", 0),
        "kills": counts.get("kill_point", 0) + counts.get("inject_kill", 0),
        "hung_tasks": counts.get("hung_task", 0),
        "lock_recoveries": counts.get("lock_recovery", 0),
        "duration_s": round(max(duration, 0.0), 6),
        "clean_stop": stop_ns is not None,
        "status": status,
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
# check
# ---------------------------------------------------------------------------


@dataclass
class _MmState:
    """What the checker remembers about one mm."""

    registered: str | None = None  # description of the ksm_enter not yet freed
    entered: bool = False
    last_free: str | None = None  # description of the last slot free
    pending_slow: list[str] = field(default_factory=list)  # ksm_exit(slow) awaiting slot_freed
    last_slot_freed: str | None = None
    exit_begin_ns: int | None = None
    exit_begin: str | None = None
    last_drop: tuple[int | None, str] | None = None  # (mm_count, description)
    freed: str | None = None  # description of mm_freed


@dataclass
class CheckResult:
    violations: list[str]
    notes: list[str]
    mms: int
    clean_stop: bool


N_RULES = 8


class _Checker:
    """Protocol rules over one event stream; see :func:`check`."""

    def __init__(self) -> None:
        self.origin: int | None = None
        self.mms: dict[int, _MmState] = {}
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.clean_stop = False
        self.handlers = {
            "ksm_enter": self._ksm_enter,
            "ksm_exit": self._ksm_exit,
            "slot_freed": self._slot_freed,
            "mmdrop": self._mmdrop,
            "mm_freed": self._mm_freed,
            "mm_exit_begin": self._mm_exit_begin,
            "merge": self._merge,
        }

    # -- helpers
    def _t(self, ns: int) -> str:
        return f"{(ns - (self.origin or 0)) / 1e9:.6f}s"

    def _desc(self, ev: Event) -> str:
        fields = format_fields(ev, skip=("mm",), origin=self.origin)
        return (
            f"{ev['event']}({fields}) at {self._t(ev['mono_ns'])} "
            f"[{ev.get('role', '?')} {ev.get('pid', '?')}]"
        )

    def _violation(self, rule: int, mm: int | None, text: str) -> None:
        who = f"mm {mm}: " if mm is not None else ""
        self.violations.append(f"rule {rule}: {who}{text}")

    # -- rule 1: a ksm_enter's slot is freed exactly once
    def _ksm_enter(self, ev: Event, mm: int, st: _MmState) -> None:
        if st.registered is not None:
            self._violation(1, mm, f"{self._desc(ev)} while the slot of {st.registered} was never freed")
        st.registered = self._desc(ev)
        st.entered = True

    def _free_slot(self, ev: Event, mm: int, st: _MmState) -> None:
        desc = self._desc(ev)
        if st.registered is not None:
            st.registered = None
            st.last_free = desc
        elif st.last_free is not None:
            self._violation(1, mm, f"slot freed twice: {st.last_free}, then {desc}")
        elif not st.entered:
            self.notes.append(f"rule 1: mm {mm}: {desc} but no ksm_enter was logged for it")
            st.last_free = desc

    def _ksm_exit(self, ev: Event, mm: int, st: _MmState) -> None:
        path = ev.get("path")
        if path in ("fast", "legacy"):
            self._free_slot(ev, mm, st)
        elif path == "slow":
            st.pending_slow.append(self._desc(ev))

    # -- rule 2: a slow ksm_exit is followed by slot_freed
    def _slot_freed(self, ev: Event, mm: int, st: _MmState) -> None:
        self._free_slot(ev, mm, st)
        st.pending_slow.clear()
        st.last_slot_freed = self._desc(ev)

    # -- rule 3: mm_freed only after mmdrop to 0, and once
    def _mmdrop(self, ev: Event, mm: int, st: _MmState) -> None:
        st.last_drop = (_int(ev.get("mm_count")), self._desc(ev))

    def _mm_freed(self, ev: Event, mm: int, st: _MmState) -> None:
        desc = self._desc(ev)
        if st.freed is not None:
            self._violation(3, mm, f"freed twice: {st.freed}, then {desc}")
        elif st.last_drop is None:
            self._violation(3, mm, f"{desc} with no mmdrop logged before it")
        elif st.last_drop[0] != 0:
            self._violation(
                3, mm, f"{desc} while the latest mmdrop left mm_count={st.last_drop[0]}: {st.last_drop[1]}"
            )
        st.freed = desc

    # -- rule 4: no merge after mm_exit_begin
    def _mm_exit_begin(self, ev: Event, mm: int, st: _MmState) -> None:
        if st.exit_begin_ns is None:
            st.exit_begin_ns = ev["mono_ns"]
            st.exit_begin = self._desc(ev)

    def _merge(self, ev: Event, mm: int, st: _MmState) -> None:
        t_last = _int(ev.get("t_last_ns"))
        if st.exit_begin_ns is not None and t_last is not None and t_last > st.exit_begin_ns:
            self._violation(
                4, mm,
                f"{self._desc(ev)}: its last merge is after {st.exit_begin}",
            )

    # -- rule 5: no hung task
    def _hung_task(self, ev: Event) -> None:
        chain = ev.get("chain")
        chain_s = " -> ".join(map(str, chain)) if isinstance(chain, list) else "?"
        self._violation(
            5, None,
            f"hung task: {ev.get('task_role', '?')} pid {ev.get('task_pid', '?')} blocked on "
            f"{ev.get('lock', '?')} for {ev.get('waited_s', '?')} s "
            f"(reported at {self._t(ev['mono_ns'])}); chain: {chain_s}",
        )

    # -- rule 6: no oops; rule 7: no use after free
    def _oops(self, ev: Event) -> None:
        tb = str(ev.get("tb", "")).strip().splitlines()
        self._violation(6, None, f"oops: {ev.get('role', '?')} pid {ev.get('pid', '?')} raised "
                                 f"{ev.get('error', '?')} (at {self._t(ev['mono_ns'])}); "
                                 f"last frame: {tb[-3].strip() if len(tb) >= 3 else '?'}")

    def _lockdep(self, ev: Event) -> None:
        self._violation(8, None, f"lockdep: {ev.get('role', '?')} pid {ev.get('pid', '?')} took "
                                 f"{ev.get('lock', '?')} ({ev.get('op', '?')}) holding {ev.get('held', '?')}: "
                                 f"{ev.get('kind', '?')} (at {self._t(ev['mono_ns'])}); chain: {ev.get('chain', '?')}")

    def _use_after_free(self, ev: Event) -> None:
        self._violation(7, _int(ev.get("mm")), f"{self._desc(ev)}: operation on a freed mm's lock")

    def feed(self, events: Iterable[Event]) -> None:
        self.origin, stream = _with_origin(events)
        handlers = self.handlers
        for ev in stream:
            name = ev["event"]
            handler = handlers.get(name)
            if handler is not None:
                mm = _int(ev.get("mm"))
                if mm is None:
                    self.notes.append(f"{self._desc(ev)} has no integer mm: ignored")
                    continue
                st = self.mms.get(mm)
                if st is None:
                    st = self.mms[mm] = _MmState()
                handler(ev, mm, st)
            elif name == "hung_task":
                self._hung_task(ev)
            elif name == "oops":
                self._oops(ev)
            elif name == "use_after_free":
                self._use_after_free(ev)
            elif name == "lockdep":
                self._lockdep(ev)
            elif name == "cluster_stop":
                self.clean_stop = True

    def finish(self) -> CheckResult:
        for mm in sorted(self.mms):
            st = self.mms[mm]
            if st.registered is not None:
                text = f"{st.registered}, slot never freed (no ksm_exit fast/legacy, no slot_freed)"
                if self.clean_stop:
                    self._violation(1, mm, text)
                else:
                    self.notes.append(f"rule 1: mm {mm}: {text}; run has no cluster_stop")
            for desc in st.pending_slow:
                text = f"{desc} not followed by slot_freed"
                if st.last_slot_freed is not None:
                    text += f" (the last slot_freed came before it: {st.last_slot_freed})"
                if self.clean_stop:
                    self._violation(2, mm, text)
                else:
                    self.notes.append(f"rule 2: mm {mm}: {text}; run has no cluster_stop")
        return CheckResult(self.violations, self.notes, len(self.mms), self.clean_stop)


def check_events(events: Iterable[Event]) -> CheckResult:
    """Run the protocol rules over an event stream; violations and notes."""
    checker = _Checker()
    checker.feed(events)
    return checker.finish()


def check(log_dir: str | Path) -> list[str]:
    """Protocol violations found in the logs alone (empty list: all rules hold).

    1. every ksm_enter's slot is freed exactly once, by ksm_exit path fast or
       legacy or by slot_freed, never both nor twice (not freed is only a note
       when the run has no cluster_stop);
    2. every ksm_exit path=slow is followed by a slot_freed for that mm;
    3. mm_freed only when the latest mmdrop of that mm left mm_count 0, at
       most once per mm;
    4. no merge whose t_last_ns is after that mm's mm_exit_begin;
    5. no hung_task event;
    6. no oops event (an unexpected exception in ksmd);
    7. no use_after_free event (an operation on a freed mm's lock);
    8. no lockdep event (a lock taken against the lock order, or twice).
    """
    return check_events(iter_events(log_dir)).violations


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


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------

#: scan_batch_end counters drawn as lines, with their colours
PLOT_SERIES = {
    "pages_shared": "tab:blue",
    "pages_sharing": "tab:orange",
    "pages_unshared": "tab:green",
    "pages_volatile": "tab:red",
}
#: worker_exit markers (solid vertical lines), coloured by how
EXIT_COLOURS = {"exit": "tab:cyan", "signal": "tab:olive", "oom": "tab:purple", "sigkill": "black"}
#: kill markers (dashed vertical lines)
KILL_MARKERS = {"kill_point": "tab:brown", "inject_kill": "tab:pink", "oom_kill": "tab:gray"}


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def plot(log_dir: str | Path, out: str | Path) -> ReadStats:
    """Draw the KSM page counters over time with exit/kill markers into *out*."""
    stats = ReadStats()
    events = iter_events(log_dir, stats)  # folder errors first, then matplotlib
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable("plot needs matplotlib: pip install 'uksm[plot]'") from exc

    origin, stream = _with_origin(events)
    t: list[float] = []
    series: dict[str, list[float]] = {k: [] for k in PLOT_SERIES}
    marks: list[tuple[float, str, str]] = []  # (t_s, colour, label)
    names = ("scan_batch_end", "worker_exit", *KILL_MARKERS)
    for ev in select(stream, names=names):
        ts = (ev["mono_ns"] - (origin or 0)) / 1e9
        name = ev["event"]
        if name == "scan_batch_end":
            t.append(ts)
            for k in PLOT_SERIES:
                series[k].append(_num(ev.get(k)) or 0)
        elif name == "worker_exit":
            how = str(ev.get("how"))
            marks.append((ts, EXIT_COLOURS.get(how, "grey"), f"worker_exit {how}"))
        else:
            marks.append((ts, KILL_MARKERS[name], name))

    fig = Figure(figsize=(11, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, colour in PLOT_SERIES.items():
        ax.plot(t, series[k], label=k, color=colour, linewidth=1.2)
    seen: set[str] = set()
    for ts, colour, label in marks:
        dashed = not label.startswith("worker_exit")
        ax.axvline(
            ts, color=colour, alpha=0.7, linewidth=0.9, linestyle="--" if dashed else "-",
            label=None if label in seen else label,
        )
        seen.add(label)
    ax.set_xlabel("time (s since the run's first event)")
    ax.set_ylabel("pages")
    ax.set_title(f"KSM pages: {Path(log_dir).name}")
    ax.grid(True, alpha=0.3)
    if t or marks:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.savefig(out, dpi=110)
    return stats


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _table(
    rows: list[tuple[Any, ...]],
    out: TextIO,
    header: tuple[str, ...] | None = None,
    right: bool = True,
) -> None:
    """Print rows as an aligned table: first column left, the others right
    (or left too when not *right*, for key/value lists)."""
    cells = [tuple(str(c) for c in r) for r in ([header] if header else []) + rows]
    if not cells:
        return
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        line = "  ".join(
            c.rjust(w) if i and right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        print(line.rstrip(), file=out)


def _print_summary(s: dict[str, Any], log_dir: str, out: TextIO) -> None:
    ex = s["exits"]
    stop = f"clean stop, status {s['status']}" if s["clean_stop"] else "no cluster_stop"
    _table(
        [
            ("run", log_dir),
            ("files", s["files"]),
            ("lines", s["lines"]),
            ("invalid_lines", s["invalid_lines"]),
            ("duration_s", f"{s['duration_s']:.3f} ({stop})"),
            ("merges", s["merges"]),
            ("cow_breaks", s["cow_breaks"]),
            ("oom_kills", s["oom_kills"]),
            ("kills", s["kills"]),
            ("hung_tasks", s["hung_tasks"]),
            ("lock_recoveries", s["lock_recoveries"]),
            ("exits", "  ".join(f"{k} {ex[k]}" for k in (*EXIT_PATHS, "reaped"))),
        ],
        out,
        right=False,
    )
    print(file=out)
    _table(list(s["roles"].items()), out, header=("role", "lines"))
    print(file=out)
    _table(list(s["events"].items()), out, header=("event", "count"))


def _print_timeline(rows: list[Event], out: TextIO) -> None:
    for ev in rows:
        origin = ev["mono_ns"] - round(ev["t_s"] * 1e9)
        fields = format_fields(ev, skip=("mm", "t_s"), origin=origin)
        print(
            f"{ev['t_s']:12.6f}  {str(ev.get('role', '?')):<10} {str(ev.get('pid', '?')):>7}  "
            f"{ev['event']:<16} {fields}".rstrip(),
            file=out,
        )


def _print_locks(ls: dict[str, Any], out: TextIO, top: int = 10) -> None:
    header = ("lock", "count", "p50_ms", "p99_ms", "max_ms", "total_ms")

    def rows(d: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (k, v["count"], f"{v['p50']:.3f}", f"{v['p99']:.3f}", f"{v['max']:.3f}", f"{v['total']:.3f}")
            for k, v in d.items()
        ]

    if not ls["classes"]:
        print("no lock_wait events", file=out)
        return
    print("per lock class", file=out)
    _table(rows(ls["classes"]), out, header)
    inst = {k: v for k, v in ls["instances"].items() if lock_class(k) != k}
    if inst:
        print(f"\ntop lock instances (by total wait, {min(top, len(inst))} of {len(inst)})", file=out)
        _table(rows(dict(itertools.islice(inst.items(), top))), out, header)
    print("\nlongest waits", file=out)
    _table(
        [
            (f"{w['t_s']:.6f}", f"{w['waited_ms']:.3f}", w["lock"], f"{w['role']} {w['pid']}",
             ",".join(map(str, w["holders"] or [])) if isinstance(w["holders"], list) else w["holders"])
            for w in ls["longest"]
        ],
        out,
        header=("t_s", "waited_ms", "lock", "waiter", "holders"),
    )


def _warn_invalid(stats: ReadStats, log_dir: str, invalid: bool = True) -> None:
    """Warnings on stderr about skipped (if *invalid*) and out-of-order lines."""
    if invalid and stats.invalid_lines:
        ex = "; ".join(stats.invalid_examples[:3])
        print(f"warning: skipped {stats.invalid_lines} invalid lines in {log_dir} ({ex})", file=sys.stderr)
    if stats.out_of_order:
        print(
            f"warning: {stats.out_of_order} lines not in mono_ns order within their file; "
            "event order may be inexact",
            file=sys.stderr,
        )


def _dump_json(obj: Any, out: TextIO) -> None:
    json.dump(obj, out, indent=2)
    out.write("\n")


def build_parser() -> argparse.ArgumentParser:
    from uksm.cli.main import OneLineParser
    parser = OneLineParser(
        prog="uksm logs",
        description=(
            "Read a uksm run's log folder (one <role>-<pid>.jsonl file per process, "
            "merged in mono_ns order) and answer questions about the run. "
            "Invalid lines are skipped and counted. Exit status: 0 ok, 2 user "
            "error, 4 check found violations."
        ),
        epilog="Event names and fields: docs/EVENTS.md. Examples with jq and DuckDB: docs/LOGS.md.",
    )
    parser.add_argument("dir", metavar="DIR", help="the run's log folder (holds *.jsonl files)")
    json_opt = OneLineParser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "summary", parents=[json_opt],
        help="counts per event and role, exits by path, merges, kills, duration",
        description=(
            "Counts per event and per role; exits by path (one per mm: the ksm_exit path, "
            "or the worker_exit path for mms that never reached ksm_exit) and reaped "
            "workers; merged pages, COW breaks, OOM kills, kills, hung tasks, lock "
            "recoveries; the run's duration (cluster_start to cluster_stop, else first "
            "to last line); files, lines, invalid lines."
        ),
    )
    tl = sub.add_parser(
        "timeline", parents=[json_opt],
        help="every event of one address space, in time order",
        description=(
            "Every event whose mm (or oom_kill victim_mm) is N, in mono_ns order: time in "
            "seconds since the run's first event, role, pid, event, other fields."
        ),
    )
    tl.add_argument("--mm", type=int, required=True, metavar="N", help="the address space id")
    sub.add_parser(
        "check", parents=[json_opt],
        help="protocol checks from the logs alone (exit 4 on violations)",
        description=(
            "Rules: (1) every ksm_enter's slot is freed exactly once, by ksm_exit "
            "path=fast/legacy or by slot_freed, never both nor twice (a missing free is "
            "only a note when the run has no cluster_stop); (2) every ksm_exit path=slow is "
            "followed by a slot_freed for that mm; (3) mm_freed only when the latest mmdrop "
            "of the mm left mm_count 0, at most once; (4) no merge whose t_last_ns is after "
            "the mm's mm_exit_begin; (5) no hung_task. Exit 0 when all hold, 4 otherwise, "
            "one violation per line."
        ),
    )
    sub.add_parser(
        "locks", parents=[json_opt],
        help="lock-wait statistics (count, p50, p99, max) and the longest waits",
        description=(
            "From lock_wait events: per lock class (mmap_sem:mmN grouped as mmap_sem) and "
            "per lock instance, count and nearest-rank p50/p99/max/total of waited_ms; the "
            "10 longest waits with waiter and holder pids."
        ),
    )
    pl = sub.add_parser(
        "plot",
        help="PNG of pages_shared/sharing/unshared/volatile over time (needs matplotlib)",
        description=(
            "Plot pages_shared, pages_sharing, pages_unshared and pages_volatile from "
            "scan_batch_end over time, with vertical lines for worker_exit (colour by how) "
            "and dashed lines for kill_point, inject_kill and oom_kill. Needs matplotlib "
            "(pip install 'uksm[plot]')."
        ),
    )
    pl.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image file to write")
    return parser


def _run(args: argparse.Namespace, out: TextIO) -> int:
    log_dir: str = args.dir
    stats = ReadStats()
    if args.command == "plot":
        stats = plot(log_dir, args.output)
        _warn_invalid(stats, log_dir)
        print(f"wrote {args.output}", file=out)
        return EXIT_OK

    events = iter_events(log_dir, stats)
    if args.command == "summary":
        s = summarize_events(events, stats)
        _warn_invalid(stats, log_dir, invalid=False)  # summary shows invalid_lines itself
        if args.json:
            _dump_json(s, out)
        else:
            _print_summary(s, log_dir, out)
        return EXIT_OK

    if args.command == "timeline":
        rows = timeline_events(events, args.mm)
        _warn_invalid(stats, log_dir)
        if args.json:
            _dump_json(rows, out)
        elif rows:
            _print_timeline(rows, out)
        else:
            print(f"no events for mm {args.mm}", file=sys.stderr)
        return EXIT_OK

    if args.command == "check":
        res = check_events(events)
        _warn_invalid(stats, log_dir)
        if args.json:
            _dump_json(
                {"ok": not res.violations, "violations": res.violations, "notes": res.notes,
                 "mms": res.mms, "clean_stop": res.clean_stop, "invalid_lines": stats.invalid_lines},
                out,
            )
        else:
            for v in res.violations:
                print(v, file=out)
            for n in res.notes:
                print(f"note: {n}", file=out)
            if not res.violations:
                print(f"ok: all {N_RULES} rules hold ({res.mms} mms)", file=out)
            else:
                print(f"{len(res.violations)} violations ({res.mms} mms)", file=out)
        return EXIT_VIOLATIONS if res.violations else EXIT_OK

    if args.command == "locks":
        ls = lock_stats_events(events)
        _warn_invalid(stats, log_dir)
        if args.json:
            _dump_json(ls, out)
        else:
            _print_locks(ls, out)
        return EXIT_OK

    raise AssertionError(args.command)  # pragma: no cover - argparse prevents it


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``uksm logs``; *argv* is what follows ``uksm logs``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _run(args, sys.stdout)
    except PlotUnavailable as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except LogDirError as exc:
        print(f"uksm logs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # pragma: no cover - output piped into head
        # keep Python from complaining again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # unreadable log file, unwritable plot output
        where = f": {exc.filename}" if exc.filename else ""
        print(f"uksm logs: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
