"""``uksm logs DIR {summary,timeline,check,locks,trace,plot}``: the command
line over ``uksm.logs`` (the pictures: ``uksm.cli.pictures``)."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from uksm.cli import pictures
from uksm.cli.args import OneLineParser, log_cluster_arg
from uksm.host.exitcodes import EXIT_INTEGRITY, EXIT_NO_EVIDENCE, EXIT_OK, EXIT_USAGE
from uksm.logs.plots import PlotUnavailable
from uksm.logs.read import (
    EXIT_PATHS,
    Clusters,
    Event,
    LogDirError,
    ReadStats,
    format_fields,
    iter_events,
    only_cluster,
)
from uksm.logs.report import lock_class, lock_stats_events, summarize_events, timeline_events
from uksm.logs.rules import N_RULES, CheckResult, check_events


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


def _stop(c: dict[str, Any]) -> str:
    return f"clean stop, status {c['status']}" if c["clean_stop"] else "no cluster_stop"


def _print_summary(s: dict[str, Any], log_dir: str, out: TextIO) -> None:
    ex = s["exits"]
    clusters = s["clusters"]
    if len(clusters) > 1:
        print(f"{len(clusters)} clusters in {log_dir}, each on its own (mm ids, exits and stops "
              f"are per cluster; pick one with --cluster):", file=out)
        _table([(c["cluster"], f"{c['duration_s']:.3f}s", c["lines"], _stop(c)) for c in clusters],
               out, header=("cluster", "duration", "lines", "stop"))
        print(f"\ntotals over the {len(clusters)} clusters", file=out)
        stop = f"{sum(c['clean_stop'] for c in clusters)} of {len(clusters)} stopped cleanly"
    else:
        stop = _stop(s)
    _table(
        [
            ("run", log_dir),
            *([("cluster", clusters[0]["cluster"])] if len(clusters) == 1 else []),
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
    parser = OneLineParser(
        prog="uksm logs",
        description=(
            "Read a uksm run's log folder (one <role>-<pid>.jsonl file per process, "
            "merged in mono_ns order) and answer questions about the run. "
            "Invalid lines are skipped and counted. A folder holding several clusters "
            "(a reused log folder) is read cluster by cluster, never mixed. Exit status: 0 ok, "
            "2 user error, 4 check found violations or trace was given a broken log, 6 check "
            "found no evidence to judge."
        ),
        epilog="Event names and fields: docs/EVENTS.md. Examples with jq and DuckDB: docs/LOGS.md.",
    )
    parser.add_argument("dir", metavar="DIR", help="the run's log folder (holds *.jsonl files)")
    json_opt = OneLineParser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    one = OneLineParser(add_help=False)
    log_cluster_arg(one)
    json_opt = OneLineParser(add_help=False, parents=[json_opt, one])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "summary", parents=[json_opt],
        help="counts per event and role, exits by path, merges, kills, duration",
        description=(
            "The clusters the folder holds (a reused log folder holds several: each is "
            "summarised on its own, never mixed, then the totals). "
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
            "the mm's mm_exit_begin; (5) no hung_task; (6) no oops; (7) no use_after_free; "
            "(8) no lockdep. Each cluster of the folder is checked on its own. Evidence is "
            "required: no valid event, a cluster with no cluster_start, or one with no "
            "cluster_stop (it did not stop cleanly) fails with status 6, said in the output. "
            "Exit 0 when all rules hold on complete logs, 4 on violations (one per line), "
            "6 on missing evidence, 2 on a usage error."
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
    pictures.add_parsers(sub)
    return parser


def _print_check(res: CheckResult, stats: ReadStats, log_dir: str, out: TextIO) -> None:
    several = len(res.clusters) > 1
    if not res.clusters:
        print(f"no evidence: no valid event in {log_dir} ({stats.lines} lines read, "
              f"{stats.invalid_lines} invalid): nothing was checked", file=out)
        return
    for r in res.clusters:
        head = f"{r.cluster}: " if several else ""
        for v in r.violations:
            print(f"{head}{v}", file=out)
        for n in r.notes:
            print(f"{head}note: {n}", file=out)
        for m in r.missing:
            print(f"{head}no evidence: {m}", file=out)
        who = f"cluster {r.cluster}: " if several or r.cluster else ""
        if r.violations:
            print(f"{who}{len(r.violations)} violations ({r.mms} mms)", file=out)
        elif r.missing:
            print(f"{who}incomplete: the {N_RULES} rules hold on what is there ({r.mms} mms), "
                  f"but the logs lack the evidence (above)", file=out)
        else:
            print(f"{who}ok: all {N_RULES} rules hold ({r.mms} mms)", file=out)
    if several:
        bad = sum(1 for r in res.clusters if r.violations)
        short = sum(1 for r in res.clusters if not r.violations and r.missing)
        print(f"{len(res.clusters)} clusters: {len(res.clusters) - bad - short} ok, {bad} with "
              f"violations, {short} incomplete", file=out)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    log_dir: str = args.dir
    stats = ReadStats()
    want = getattr(args, "cluster", None)
    if args.command in ("trace", "plot"):
        return pictures.run(args, out, _warn_invalid)

    events: Iterable[Event] = iter_events(log_dir, stats)
    if want:
        events = only_cluster(events, want)
    seen = Clusters()
    events = seen.watch(events)
    if args.command == "summary":
        s = summarize_events(events, stats)
        _warn_invalid(stats, log_dir, invalid=False)  # summary shows invalid_lines itself
        if want and not s["clusters"]:
            raise LogDirError(f"no cluster {want!r} in {log_dir}")
        if args.json:
            _dump_json(s, out)
        else:
            _print_summary(s, log_dir, out)
        return EXIT_OK

    if args.command == "timeline":
        rows = timeline_events(events, args.mm)
        seen.one(f"timeline --mm {args.mm}")  # mm ids are per cluster
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
        status = EXIT_INTEGRITY if res.violations else EXIT_NO_EVIDENCE if not res.ok else EXIT_OK
        if args.json:
            _dump_json(
                {"ok": res.ok, "status": status, "violations": res.violations,
                 "notes": res.notes, "missing": res.missing, "mms": res.mms,
                 "clean_stop": res.clean_stop, "invalid_lines": stats.invalid_lines,
                 "clusters": [{"cluster": r.cluster, "ok": r.ok, "violations": r.violations,
                               "notes": r.notes, "missing": r.missing, "mms": r.mms,
                               "started": r.started, "clean_stop": r.clean_stop}
                              for r in res.clusters]},
                out,
            )
        else:
            _print_check(res, stats, log_dir, out)
        return status

    if args.command == "locks":
        ls = lock_stats_events(events)
        seen.one("locks")  # lock names (mmap_sem:mmN) are per cluster
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
