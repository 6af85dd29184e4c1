"""``uksm explore``: races on demand (docs/EXPLORE.md)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from uksm.host.exitcodes import EPILOG, EXIT_USAGE
from uksm.kernel.layout import EXIT_POLICIES, HAZARDS, KERNELS, OOM_RULES


def add_parser(sub: Any) -> None:
    from uksm.explorer.search import STRATEGIES
    from uksm.scenarios import SCENARIOS
    p = sub.add_parser(
        "explore", help="explore a scenario's schedules (controlled scheduling): find races, replay them",
        description="Run a small scenario under a controlled scheduler: every process (tasks, ksmd, "
                    "the writer of run, the supervisor's recovery and reapers) stops at scheduling "
                    "points and runs only when chosen, one at a time. A strategy chooses the "
                    "schedules; each run is checked (deadlock with its wait-for chain, hung, oops, "
                    "use after free, lockdep, fsck, data, leaks); a failing schedule is shrunk and "
                    "printed as a string that replays it exactly. docs/EXPLORE.md explains the points, "
                    "the strategies and how to read a trace. Exit status: the worst finding's, as "
                    "'uksm run' gives it; 0 when nothing was found.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=list(SCENARIOS), metavar="NAME",
                   help="one of: " + ", ".join(SCENARIOS) + " (--list-scenarios says what each does)")
    p.add_argument("--replay", metavar="SCHEDULE", help="run this schedule string exactly and report it")
    p.add_argument("--list-scenarios", action="store_true", help="list the scenarios and exit")
    p.add_argument("--exit-policy", default="seed", choices=EXIT_POLICIES,
                   help="__ksm_exit as in the seed fix (default), shipped or legacy")
    p.add_argument("--oom-rule", default="2.6.32", choices=OOM_RULES, help="the OOM killer's rule")
    p.add_argument("--kernel", default="2.6.32", choices=KERNELS,
                   help="whose mm/ksm.c: 2.6.32 (default) or 6.18 (the schedule string carries it)")
    p.add_argument("--hazard", action="append", default=[], choices=list(HAZARDS), metavar="HAZARD",
                   help="switch off one later fix (repeatable): " + ", ".join(HAZARDS))
    p.add_argument("--strategy", default="dfs", choices=STRATEGIES,
                   help="dfs: exhaustive within --preemptions (default); pct: probabilistic with "
                        "--depth; random")
    p.add_argument("--preemptions", type=int, default=2, metavar="K",
                   help="dfs: every schedule with at most K preemptions (default 2), in CHESS's "
                        "order: all with 0, then 1, ... up to K; --json's schedules_by_preemptions "
                        "counts them")
    p.add_argument("--depth", type=int, default=3, metavar="D", help="pct: bug depth d (default 3)")
    p.add_argument("--schedules", type=int, metavar="N", help="stop after N schedules")
    p.add_argument("--time-limit", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--seed", type=int, default=0, help="pct and random: the seed (default 0)")
    p.add_argument("--kills", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="also choose SIGKILLs: a task, ksmd or the writer killed at a point "
                        "(N per schedule; --kills alone: 1)")
    p.add_argument("--from-start", action="store_true",
                   help="explore the scenario's setup too (default: from its race phase, "
                        "Machine.race() in the scenario's script)")
    p.add_argument("--keep-going", action="store_true",
                   help="go on after a failure (one per kind of finding is reported)")
    p.add_argument("--no-shrink", action="store_true", help="report failures as found")
    p.add_argument("--log-dir", help="replay every reported failure with JSON logs into this folder")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _error(msg: str) -> int:
    print(f"uksm explore: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_explore(a: argparse.Namespace) -> int:
    from uksm.api import explore, replay
    from uksm.explorer.schedule import BadSchedule, parse
    from uksm.scenarios import SCENARIOS
    if a.list_scenarios:
        for name, sc in SCENARIOS.items():
            print(f"{name:16} {sc.doc}")
        return 0
    for flag, v in (("--preemptions", a.preemptions), ("--depth", a.depth)):
        if v < 0 or (flag == "--depth" and v < 1):
            return _error(f"{flag} must be {'at least 1' if flag == '--depth' else 'positive or 0'}")
    if a.schedules is not None and a.schedules < 1:
        return _error("--schedules must be at least 1")
    if a.time_limit is not None and a.time_limit <= 0:
        return _error("--time-limit must be positive")
    if a.log_dir:
        import os
        if not os.path.isdir(a.log_dir):
            return _error(f"--log-dir {a.log_dir}: not a folder")
    if a.replay:
        try:
            s = parse(a.replay)
        except BadSchedule as e:
            return _error(str(e))
        if s.scenario not in SCENARIOS:
            return _error(f"schedule: unknown scenario {s.scenario!r}")
        sc = SCENARIOS[s.scenario]
        try:
            res = replay(sc.fn, a.replay, log_dir=a.log_dir, name=sc.name, **sc.options)
        except ValueError as e:
            print(f"uksm explore: {e}", file=sys.stderr)
            return EXIT_USAGE
        return _report(a, res)
    if not a.scenario:
        return _error("--scenario NAME, --replay SCHEDULE or --list-scenarios")
    sc = SCENARIOS[a.scenario]

    def progress(r: Any) -> None:
        if not a.json:
            by = ", ".join(f"{k} preemption(s): {v}" for k, v in sorted(r.by_preemptions.items()))
            print(f"uksm explore: {r.explored} schedules, {r.elapsed_s:.1f}s "
                  f"({r.schedules_per_s}/s){'; ' + by if by else ''}", file=sys.stderr)
    res = explore(sc.fn, name=sc.name, strategy=a.strategy, preemptions=a.preemptions, depth=a.depth,
                  seed=a.seed, kills=a.kills, schedules=a.schedules, time_limit=a.time_limit,
                  keep_going=a.keep_going, shrink=not a.no_shrink, from_start=a.from_start,
                  progress=progress, exit_policy=a.exit_policy, oom_rule=a.oom_rule, kernel=a.kernel,
                  hazards=tuple(a.hazard), **sc.options)
    if a.log_dir:
        for f in res.failures:
            replay(sc.fn, f["schedule"], log_dir=a.log_dir, name=sc.name, **sc.options)
    return _report(a, res)


def _report(a: argparse.Namespace, res: Any) -> int:
    j = res.json
    if a.json:
        print(json.dumps(j))
        return int(res.status)
    by = ", ".join(f"{v} with {k}" for k, v in sorted(j["schedules_by_preemptions"].items()))
    what = "replayed" if j["strategy"] == "replay" else (
        f"{j['explored']} schedules ({j['strategy']}{': ' + by + ' preemption(s)' if by else ''}), "
        f"{j['distinct']} distinct outcomes, "
        f"{'the bound exhausted' if j['exhausted'] else 'not exhausted'}, {j['elapsed_s']:.1f}s "
        f"({j['schedules_per_s']}/s, {j['cpu_ms_per_schedule']} ms CPU each, load {j['load']})")
    print(f"{j['scenario']}: {what}")
    if not j["failures"]:
        print("no failure found")
    for f in j["failures"]:
        print(f"\nFOUND {f['finding']} (status {f['status']}) after {j['first_failure_after']} "
              f"schedule(s): {f['detail']}")
        for line in f.get("chain", []):
            print(f"  {line}")
        print(f"schedule ({f['steps']} steps, {f['preemptions']} preemption(s), {f['kills']} kill(s)):\n"
              f"  {f['schedule']}")
        print(f"replay:\n  {f['replay']}")
        print("trace (step, PRE: a preemption, CHO: another choice where the process gave up the "
              "CPU, KIL: a kill; process, from point -> to point):")
        for line in f["trace"]:
            print(f"  {line}")
    return int(res.status)
