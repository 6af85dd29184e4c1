"""Structured logs: one JSON-lines file per process, events with fields.

``setup()`` is called once in each process after it starts (never inherited
across fork): it opens ``<log_dir>/<role>-<pid>.jsonl`` and returns a bound
logger.  Every line carries ``timestamp`` (ISO 8601 UTC), ``mono_ns``
(CLOCK_MONOTONIC, comparable across processes, for ordering), ``event``,
``level``, ``role``, ``pid``, ``cluster``.  Event names and their fields
are listed in docs/EVENTS.md (a test keeps the two in step).

The logger is this module's, not structlog's: it writes the lines
structlog wrote with the configuration uksm used (the bound fields, then
the call's keywords -- a keyword overrides a bound field in its place --,
then ``event``, ``timestamp``, ``mono_ns``, ``level``; ``json.dumps`` with
``repr`` for what JSON cannot hold), but importing structlog cost every
process ~29 ms of its start (asyncio, its stdlib integration, ...), six
processes per ``uksm run`` on the critical path from nothing to merged.

Hot paths never log per page: ksmd and the workers count merges and COW
breaks and log one event per mm per batch.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from typing import Any, TextIO

_files: list[TextIO] = []
_UTC = _dt.timezone.utc


def _stamp() -> str:
    return _dt.datetime.now(_UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class _Sink:
    """One open log file; the lock keeps a line whole when several threads
    of the process log to it (the supervisor's main loop, recovery, the
    watchdog), as structlog's WriteLogger did."""

    def __init__(self, f: TextIO) -> None:
        self.f = f
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.f.write(line)
            self.f.flush()


class Logger:
    """A bound logger: ``log.info("ksm_exit", path="slow", mm=3)`` writes
    one JSON line of the bound fields, the keywords, the event and its
    stamps; ``bind(**fields)`` returns a logger with more bound fields."""

    def __init__(self, sink: _Sink, context: dict[str, Any]) -> None:
        self._sink = sink
        self._context = context

    def bind(self, **fields: Any) -> "Logger":
        return Logger(self._sink, {**self._context, **fields})

    def _emit(self, level: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        ev = self._context.copy()
        ev.update(kw)
        ev["event"] = event % args if args else event
        ev["timestamp"] = _stamp()
        ev["mono_ns"] = time.monotonic_ns()
        ev["level"] = level
        self._sink.write(json.dumps(ev, default=repr) + "\n")

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._emit("debug", event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._emit("info", event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._emit("warning", event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._emit("error", event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        self._emit("critical", event, args, kw)

    warn = warning
    msg = info


class _Null:
    """A logger that drops everything (no --log-dir, or logging off)."""

    def __getattr__(self, _name: str) -> Any:
        return self._drop

    def _drop(self, *_a: Any, **_k: Any) -> None:
        return None

    def bind(self, **_k: Any) -> "_Null":
        return self


def _open(log_dir: str, fname: str) -> _Sink:
    f = open(os.path.join(log_dir, fname), "a", buffering=1)
    _files.append(f)
    return _Sink(f)


def setup(role: str, cluster: str, log_dir: str | None, **fields: Any) -> Any:
    """Open this process's log file and return its logger."""
    if not log_dir:
        return _Null()
    os.makedirs(log_dir, exist_ok=True)
    return Logger(_open(log_dir, f"{role}-{os.getpid()}.jsonl"),
                  {"role": role, "pid": os.getpid(), "cluster": cluster, **fields})


def thread_logger(role: str, cluster: str, log_dir: str | None, tag: str, **fields: Any) -> Any:
    """A logger for a supervisor thread acting in another role (reaper):
    its own file ``<role>-<pid>-<tag>.jsonl`` (one writer per file keeps each
    file in mono_ns order), same format."""
    if not log_dir:
        return _Null()
    return Logger(_open(log_dir, f"{role}-{os.getpid()}-{tag}.jsonl"),
                  {"role": role, "pid": os.getpid(), "cluster": cluster, **fields})


def close() -> None:
    for f in _files:
        try:
            f.close()
        except OSError:
            pass
    _files.clear()
