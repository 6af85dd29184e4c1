"""Schedules per second of ``uksm explore`` (issue 21's goal: at least 20
per second on 2 cores) for oom-unmerge and exit-vs-ksmd, with where a
schedule's time goes; and (``--exhaust``) each scenario's whole space at
bounds 1 and 2: how many schedules, how long.

Prints numbers, asserts nothing.  Every figure comes with the machine's
load (the 1-minute average, before and after) and the CPU time per
schedule (the explorer's and its processes', which a loaded machine does
not inflate the way it inflates wall time: a step is two semaphore
operations between processes, so the wall rate follows the CPUs'
contention).

    .venv/bin/python tools/bench_explore.py [--seconds 20] [--profile]
    .venv/bin/python tools/bench_explore.py --exhaust [--bound 2] [--scenario NAME ...]
"""
from __future__ import annotations

import argparse
import os
import time

from uksm.api import _script, controlled_options
from uksm.explorer.gate import Gate
from uksm.explorer.search import cpu_now, explore, pool_cpu, run_once
from uksm.explorer.strategies import ICB
from uksm.explorer.world import Default
from uksm.scenarios import SCENARIOS

GOAL = 20.0
PHASES = ("boot", "setup", "race", "close", "checks", "teardown")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def rate(name: str, seconds: float, policy: str) -> None:
    """dfs at two preemptions for ``seconds``: schedules/s and CPU each."""
    sc = SCENARIOS[name]
    o = controlled_options(name, exit_policy=policy, **sc.options)
    l0 = load()
    r = explore(_script(sc.fn, 0, 16), o, "dfs", 2, time_limit=seconds, keep_going=True, do_shrink=False)
    per_s = r.explored / r.elapsed_s if r.elapsed_s else 0.0
    cpu_ms = 1000 * r.cpu_s / r.explored if r.explored else 0.0
    print(f"{name}: {r.explored} schedules in {r.elapsed_s:.1f} s: {per_s:.1f} schedules/s "
          f"(goal {GOAL:.0f}: {'met' if per_s >= GOAL else 'NOT met'}); {cpu_ms:.2f} ms CPU per schedule "
          f"(one core's worth: {1000 / cpu_ms if cpu_ms else 0:.0f}/s); load {l0} -> {load()}")


def profile(name: str, n: int, policy: str) -> None:
    """Where a schedule's wall time goes, over the first ``n`` schedules
    of the dfs exploration: the run's phases (World.timing), the
    explorer's waits for its processes (a step's round trip and the
    process's work), the steps."""
    sc = SCENARIOS[name]
    o = controlled_options(name, exit_policy=policy, **sc.options)
    script = _script(sc.fn, 0, 16)
    gate = Gate()
    try:
        run_once(gate, script, o, Default())   # the pool forked, the imports done
        icb = ICB(2)
        tot: dict[str, float] = {}
        steps = 0
        c0, t0 = cpu_now() + pool_cpu(gate), time.perf_counter()
        done = 0
        while done < n:
            c = icb.next()
            if c is None:
                break
            out = run_once(gate, script, o, c)
            c.done()
            done += 1
            steps += len(out.steps)
            for k, v in out.timing.items():
                tot[k] = tot.get(k, 0.0) + v
        wall = time.perf_counter() - t0
        cpu = cpu_now() + pool_cpu(gate) - c0
    finally:
        gate.close()
    ms = {k: 1000 * v / done for k, v in tot.items()}
    parts = "  ".join(f"{k} {ms.get(k, 0.0):.2f}" for k in PHASES)
    print(f"{name} profile, {done} schedules, load {load()}: wall {1000 * wall / done:.2f} ms per schedule "
          f"= {parts} (ms); waiting for the processes {ms.get('waited', 0.0):.2f} ms over "
          f"{tot.get('resumes', 0) / done:.0f} resumes ({steps / done:.0f} steps); CPU {1000 * cpu / done:.2f} ms "
          f"per schedule")


def exhaust(name: str, bound: int, policy: str, limit: float) -> None:
    sc = SCENARIOS[name]
    o = controlled_options(name, exit_policy=policy, **sc.options)
    l0 = load()
    r = explore(_script(sc.fn, 0, 16), o, "dfs", bound, time_limit=limit, keep_going=True, do_shrink=False)
    by = ", ".join(f"{v} with {k}" for k, v in sorted(r.by_preemptions.items()))
    print(f"{name} bound {bound}: {r.explored} schedules ({by}), {'exhausted' if r.exhausted else 'NOT exhausted'} "
          f"in {r.elapsed_s:.1f} s ({r.explored / r.elapsed_s if r.elapsed_s else 0:.1f}/s, "
          f"{1000 * r.cpu_s / max(1, r.explored):.2f} ms CPU each), {len(r.failures)} failure(s), "
          f"{r.distinct} distinct outcomes; load {l0} -> {load()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="budget per scenario (default 20)")
    ap.add_argument("--exit-policy", default="seed")
    ap.add_argument("--scenario", action="append",
                    help="(default: oom-unmerge and exit-vs-ksmd; --exhaust: all five)")
    ap.add_argument("--profile", action="store_true", help="also: where a schedule's time goes")
    ap.add_argument("--exhaust", action="store_true", help="each scenario's whole space at bounds 1..--bound")
    ap.add_argument("--bound", type=int, default=2, help="--exhaust: up to this bound (default 2)")
    ap.add_argument("--limit", type=float, default=1800.0, help="--exhaust: at most this long each (s)")
    a = ap.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load {load()}")
    if a.exhaust:
        for name in a.scenario or list(SCENARIOS):
            for b in range(1, a.bound + 1):
                exhaust(name, b, a.exit_policy, a.limit)
        return 0
    for name in a.scenario or ["oom-unmerge", "exit-vs-ksmd"]:
        rate(name, a.seconds, a.exit_policy)
        if a.profile:
            profile(name, 300, a.exit_policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
