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

The package: ``read`` (the stream), ``rules`` (the exit protocol's rules: ``check``), ``report``
(summary, timeline, locks), ``trace`` (a Chrome/Perfetto trace), ``plots`` (the
run's picture, a trace's), ``campaign`` (a campaign's results as a picture);
``uksm.cli.logs`` is the command line.

Subcommands: ``summary``, ``timeline --mm N``, ``check``, ``locks``,
``trace -o FILE.json``, ``plot -o FILE.png``. Exit status: 0 fine, 2 user
error (bad folder, bad arguments, matplotlib missing for ``plot``), 4
``check`` found violations, or ``trace`` a broken log.
"""
from __future__ import annotations

from uksm.logs.plots import plot
from uksm.logs.read import Event, LogDirError, ReadStats, iter_events, select
from uksm.logs.report import lock_stats, summarize, timeline
from uksm.logs.rules import CheckResult, check, check_events
from uksm.logs.trace import BrokenLog, trace_events

__all__ = ["Event", "LogDirError", "ReadStats", "iter_events", "select", "summarize", "check",
           "check_events", "CheckResult", "lock_stats", "timeline", "plot", "trace_events",
           "BrokenLog"]
