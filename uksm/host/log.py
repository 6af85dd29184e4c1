"""Structured logs: one JSON-lines file per process, events with fields.

``setup()`` is called once in each process after it starts (never inherited
across fork): it opens ``<log_dir>/<role>-<pid>.jsonl`` and returns a bound
structlog logger.  Every line carries ``timestamp`` (ISO 8601 UTC),
``mono_ns`` (CLOCK_MONOTONIC, comparable across processes, for ordering),
``event``, ``level``, ``role``, ``pid``, ``cluster``.  Event names and
their fields are listed in docs/EVENTS.md (a test keeps the two in step).

Hot paths never log per page: ksmd and the workers count merges and COW
breaks and log one event per mm per batch.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_files: list[TextIO] = []


def _stamp(_logger: Any, method: str, ev: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ev["timestamp"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    ev["mono_ns"] = time.monotonic_ns()
    ev["level"] = method
    return ev


def _drop(_logger: Any, _method: str, _ev: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    raise structlog.DropEvent


#: The logger where none is wanted (no --log-dir, an in-process test or
#: benchmark): structlog's own, so that a logger is always present and no
#: caller checks for None.  Filtering at CRITICAL makes every method below
#: it a no-op (debug..error cost a call), and the one processor drops the
#: rest; it writes nowhere, whatever structlog.configure() said.
NULL_LOG: Any = structlog.wrap_logger(
    structlog.ReturnLogger(), processors=[_drop],
    wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
).bind()


def setup(role: str, cluster: str, log_dir: str | None, **fields: Any) -> Any:
    """Configure structlog for this process and return its logger."""
    if not log_dir:
        return NULL_LOG
    os.makedirs(log_dir, exist_ok=True)
    f = open(os.path.join(log_dir, f"{role}-{os.getpid()}.jsonl"), "a", buffering=1)
    _files.append(f)
    structlog.configure(
        processors=[_stamp, structlog.processors.JSONRenderer(sort_keys=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=f),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(role=role, pid=os.getpid(), cluster=cluster, **fields)


def thread_logger(role: str, cluster: str, log_dir: str | None, tag: str, **fields: Any) -> Any:
    """A logger for a supervisor thread acting in another role (reaper):
    its own file ``<role>-<pid>-<tag>.jsonl`` (one writer per file keeps each
    file in mono_ns order), same configuration."""
    if not log_dir:
        return NULL_LOG
    f = open(os.path.join(log_dir, f"{role}-{os.getpid()}-{tag}.jsonl"), "a", buffering=1)
    _files.append(f)
    return structlog.wrap_logger(
        structlog.WriteLogger(file=f),
        processors=[_stamp, structlog.processors.JSONRenderer(sort_keys=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    ).bind(role=role, pid=os.getpid(), cluster=cluster, **fields)


def close() -> None:
    for f in _files:
        try:
            f.close()
        except OSError:
            pass
    _files.clear()
