"""Schedules per second of ``uksm explore`` (issue 21's goal: at least 20
per second on 2 cores) for oom-unmerge and exit-vs-ksmd.

Prints numbers, asserts nothing.  Each scenario is explored with dfs at two
preemptions for ``--seconds`` (a fixed budget, the same for both), with
the machine's load printed beside it: every step is two semaphore
operations between processes, so the rate follows the CPUs' contention.

    .venv/bin/python tools/bench_explore.py [--seconds 20] [--exit-policy seed]
"""
from __future__ import annotations

import argparse
import os

from uksm.explore.explorer import explore
from uksm.explore.scenarios import SCENARIOS
from uksm.explore.world import Options

GOAL = 20.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="budget per scenario (default 20)")
    ap.add_argument("--exit-policy", default="seed")
    ap.add_argument("--scenario", action="append", help="(default: oom-unmerge and exit-vs-ksmd)")
    a = ap.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load before {os.getloadavg()[0]:.2f}")
    for name in a.scenario or ["oom-unmerge", "exit-vs-ksmd"]:
        r = explore(SCENARIOS[name], Options(scenario=name, exit_policy=a.exit_policy), "dfs", 2,
                    time_limit=a.seconds, keep_going=True, do_shrink=False)
        rate = r.explored / r.elapsed_s if r.elapsed_s else 0.0
        print(f"{name}: {r.explored} schedules in {r.elapsed_s:.1f} s: {rate:.1f} schedules/s "
              f"(goal {GOAL:.0f}: {'met' if rate >= GOAL else 'NOT met'}), exhausted {r.exhausted}, "
              f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
