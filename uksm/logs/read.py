"""Reading a run's logs: one iterator over every file, one filter.

The files of a run are merged into one stream in ``mono_ns`` order with
:func:`heapq.merge` over one generator per file: nothing is loaded whole, so
a run of millions of lines is analysed in constant memory.  Every question
(``uksm.logs.report``, ``uksm.logs.rules``) is a consumer of that one stream
(:func:`iter_events`), narrowed when needed by the one filter (:func:`select`).

Lines that are not a JSON object with a string ``event`` and an integer
``mono_ns`` are skipped and counted in :class:`ReadStats` (a process killed
by SIGKILL may leave a torn last line); blank lines are ignored.
"""
from __future__ import annotations

import heapq
import itertools
import json
import operator
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

Event = dict[str, Any]

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


# ---------------------------------------------------------------------------
# Clusters: a folder may hold several (a reused log_dir), never mixed
# ---------------------------------------------------------------------------

#: one cluster instance: its name, and the boot id of that boot (``boot_id``
#: on every line, uksm.kernel.layout.H_BOOT_ID; None in logs older than it).
#: Two clusters of one name at different times are two instances: their mm
#: ids, slots and stops are their own.
Instance = tuple[str, int | None]


def instance_of(ev: Event) -> Instance:
    name = ev.get("cluster")
    return (name if isinstance(name, str) else "?", _int(ev.get("boot_id")))


def label(inst: Instance) -> str:
    """How a cluster instance is named to the user: ``NAME@BOOT`` (the boot
    id in hex), or ``NAME`` for logs without boot ids."""
    name, boot = inst
    return name if boot is None else f"{name}@{boot:x}"


class Clusters:
    """The cluster instances a stream holds, in the order their first
    event came (filled while the stream is consumed: ``watch``)."""

    def __init__(self) -> None:
        self.seen: dict[Instance, int] = {}

    def watch(self, events: Iterable[Event]) -> Iterator[Event]:
        seen = self.seen
        for ev in events:
            inst = instance_of(ev)
            if inst not in seen:
                seen[inst] = ev["mono_ns"]
            yield ev

    def labels(self) -> list[str]:
        return [label(i) for i in self.seen]

    def only_one(self, events: Iterable[Event], what: str) -> Iterator[Event]:
        """``watch``, refusing the stream (LogDirError) at the first event of
        a second cluster, before its consumer has written anything: the
        rest is read to name every cluster in the message."""
        for ev in self.watch(events):
            if len(self.seen) > 1:
                for _ in self.watch(events):
                    pass
                self.one(what)
            yield ev

    def one(self, what: str) -> None:
        """``what`` mixes nothing: LogDirError if the stream held several
        clusters (the user says which with ``--cluster``)."""
        if len(self.seen) > 1:
            raise LogDirError(f"{what}: the folder holds {len(self.seen)} clusters "
                              f"({', '.join(self.labels())}): say which with --cluster")


class Feedable(Protocol):
    def feed(self, ev: Event) -> None: ...


A = TypeVar("A", bound=Feedable)


def by_cluster(events: Iterable[Event], make: Callable[[], A]) -> dict[Instance, A]:
    """Route each event, in order, to its cluster's own accumulator (made by
    ``make()`` at the cluster's first event): the one way the questions
    that must not mix clusters (check, summary) read a stream."""
    per: dict[Instance, A] = {}
    for ev in events:
        inst = instance_of(ev)
        acc = per.get(inst)
        if acc is None:
            acc = per[inst] = make()
        acc.feed(ev)
    return per


def only_cluster(events: Iterable[Event], want: str) -> Iterator[Event]:
    """The events of the cluster(s) ``want`` names: ``NAME`` (every boot of
    that name) or ``NAME@BOOT`` (one boot)."""
    name, _, boot = want.partition("@")
    for ev in events:
        c, b = instance_of(ev)
        if c == name and (not boot or (b is not None and f"{b:x}" == boot.lower())):
            yield ev


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
