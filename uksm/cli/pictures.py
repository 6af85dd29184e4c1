"""``uksm logs DIR trace`` and ``uksm logs DIR plot``: a run as pictures
(``uksm.logs.trace``, ``uksm.logs.plots``), and ``uksm campaign report``
(``uksm.logs.campaign``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from uksm.cli.args import OneLineParser, log_cluster_arg
from uksm.host.exitcodes import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from uksm.logs.read import Clusters, Event, LogDirError, ReadStats, iter_events, only_cluster


def _window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="t_from", type=float, metavar="S",
                   help="from S seconds since the run's first event (default: its start)")
    p.add_argument("--to", dest="t_to", type=float, metavar="S",
                   help="up to S seconds since the run's first event (default: its end)")


def add_parsers(sub: Any) -> None:
    """The ``trace`` and ``plot`` subcommands of ``uksm logs DIR``."""
    tr = sub.add_parser(
        "trace", help="the run as a Chrome/Perfetto trace (JSON), to open in ui.perfetto.dev",
        description=(
            "Write the run as a trace in the Chrome trace event format (JSON), which Perfetto "
            "(ui.perfetto.dev, 'Open trace file') and chrome://tracing open: a process per uksm "
            "process, ksmd's batches and per-mm scans, waits and lock holds as slices, kills, "
            "exits, recoveries, oopses and lockdep reports as instants, the KSM counters and "
            "frames as counter tracks, an arrow from each wait to what its holder was doing. "
            "Lock holds are in the logs only of runs made with --trace-locks. A log no run "
            "could write (a lock released that was never taken, ...) is refused, status 4. "
            "The mapping: docs/LOGS.md."))
    tr.add_argument("-o", "--output", required=True, metavar="FILE.json", help="trace file to write")
    log_cluster_arg(tr)
    tr.add_argument("--png", metavar="FILE.png",
                    help="also draw the trace as a timeline picture (needs matplotlib)")
    _window_args(tr)
    pl = sub.add_parser(
        "plot", help="PNG: counters, frames, a lane per task with its kills, ksmd's scans",
        description=(
            "Draw the run in panels sharing the time axis: pages_shared/sharing/unshared/volatile "
            "(scan_batch_end); frames used against the limit; a lane per task (alive, exiting, "
            "dead) with each kill and OOM kill a tick on it -- past 24 tasks a lane holds one "
            "task after another; ksmd's full scans as ticks, hung tasks, oopses and lockdep "
            "reports as marks. Needs matplotlib (pip install 'uksm[plot]')."))
    pl.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image file to write")
    log_cluster_arg(pl)
    _window_args(pl)


def _check_window(a: argparse.Namespace) -> None:
    if a.t_from is not None and a.t_to is not None and a.t_from >= a.t_to:
        raise LogDirError(f"--from {a.t_from:g} is not before --to {a.t_to:g}")


def _empty(log_dir: str) -> bool:
    """An existing folder with no logs: its pictures are empty, with a warning."""
    d = Path(log_dir)
    if d.is_dir() and not any(p.is_file() for p in d.glob("*.jsonl")):
        print(f"warning: no *.jsonl log files in {log_dir}: nothing to draw", file=sys.stderr)
        return True
    return False


def run(a: argparse.Namespace, out: TextIO, warn: Callable[[ReadStats, str], None]) -> int:
    """``trace`` or ``plot`` for the parsed arguments; ``warn`` reports the
    skipped lines on stderr."""
    from uksm.logs import plots
    from uksm.logs import trace as traces
    _check_window(a)
    log_dir: str = a.dir
    stats = ReadStats()
    events: Iterable[Event] = iter(()) if _empty(log_dir) else iter_events(log_dir, stats)
    if a.cluster:
        events = only_cluster(events, a.cluster)
    # one cluster's picture: a folder of several (a reused log folder) is
    # refused before anything is written, unless --cluster says which
    events = Clusters().only_one(events, a.command)
    title = Path(log_dir).resolve().name + (f" ({a.cluster})" if a.cluster else "")
    if a.command == "plot":
        plots.plot_events(events, a.output, title, a.t_from, a.t_to)
        warn(stats, log_dir)
        print(f"wrote {a.output}", file=out)
        return EXIT_OK
    ts = traces.TraceStats()
    try:
        trace = traces.trace_events(events, ts)
    except traces.BrokenLog as exc:
        warn(stats, log_dir)
        print(f"uksm logs: {log_dir}: broken log: {exc}; no trace written", file=sys.stderr)
        return EXIT_INTEGRITY
    warn(stats, log_dir)
    if a.t_from is not None or a.t_to is not None:
        trace = traces.crop(trace, a.t_from, a.t_to)
    traces.write(trace, a.output)
    print(f"wrote {a.output}: {ts.processes} processes, {ts.threads} threads, {ts.slices} slices "
          f"({ts.open_at_end} open at the end), {ts.instants} instants, {ts.counters} counter "
          f"samples, {ts.flows} flows, from {ts.events} events", file=out)
    if a.png:
        left = plots.plot_trace(trace, a.png, title)
        print(f"wrote {a.png}" + (f" ({left} quieter rows not drawn)" if left else ""), file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------
# uksm campaign report
# ---------------------------------------------------------------------------

def campaign_report_main(argv: list[str]) -> int:
    """``uksm campaign report RESULTS.jsonl -o FILE.png``."""
    from uksm.logs import campaign
    from uksm.logs.plots import PlotUnavailable
    p = OneLineParser(
        prog="uksm campaign report",
        description=(
            "Draw a campaign's results (uksm campaign --out FILE.jsonl) as one picture: kills per "
            "point and signal, runs clean or failed per exit policy and hazard set, lock "
            "recoveries by lock, kills/s over the campaign's time. Lines that are not a run's "
            "result (a torn last line) are skipped and counted. Needs matplotlib."),
        epilog="docs/CAMPAIGN.md, 'Results'.")
    p.add_argument("results", metavar="RESULTS.jsonl", help="the campaign's --out file")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image file to write")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        res, bad = campaign.read_results(a.results)
        if bad:
            print(f"warning: skipped {bad} lines of {a.results} that are not a run's result",
                  file=sys.stderr)
        campaign.plot_campaign(res, a.output, Path(a.results).name)
    except (campaign.ResultsError, PlotUnavailable) as exc:
        print(f"uksm campaign report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"uksm campaign report: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {a.output}: {len(res)} runs")
    return EXIT_OK
