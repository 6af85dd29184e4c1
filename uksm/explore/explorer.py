"""The search: run schedules of a scenario, check each, shrink a failure.

``explore`` runs schedules chosen by a strategy until the space within
the bound is covered (``dfs``), a budget is spent (``--schedules``,
``--time-limit``), or a failure is found (unless ``keep_going``).  Each
failure is shrunk (``shrink``: delta debugging over its deviations,
keeping the same finding) and reported with its schedule string, its
trace, and the command that replays it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from uksm.kernel import sched
from uksm.kernel.locks import lock_name
from uksm.explore.gate import Gate
from uksm.explore.schedule import Deviation, Replay, Schedule, recorded
from uksm.explore.strategies import DFS, PCT, Random
from uksm.explore.world import KILL, Default, Options, Outcome, World

STRATEGIES = ("dfs", "pct", "random")


@dataclass
class Failure:
    schedule: str
    finding: str
    status: int
    detail: str
    chain: list[str]
    steps: int
    preemptions: int
    kills: int
    trace: list[str]
    after: int          # schedules run when it was found

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schedule": self.schedule, "finding": self.finding, "status": self.status,
                             "steps": self.steps, "preemptions": self.preemptions, "kills": self.kills,
                             "replay": f"uksm explore --replay '{self.schedule}'"}
        if self.chain:
            d["chain"] = self.chain
        d["detail"] = self.detail
        d["trace"] = self.trace
        return d


@dataclass
class Result:
    scenario: str
    strategy: str
    explored: int = 0
    distinct: int = 0
    exhausted: bool = False
    elapsed_s: float = 0.0
    first_failure_after: int | None = None
    first_failure_s: float | None = None
    failures: list[Failure] = field(default_factory=list)
    replayer: Callable[[str], "Result"] | None = None

    @property
    def schedules_per_s(self) -> float:
        return round(self.explored / self.elapsed_s, 1) if self.elapsed_s else 0.0

    @property
    def status(self) -> int:
        from uksm.explore.world import RANK
        if not self.failures:
            return 0
        return min(self.failures, key=lambda f: RANK[f.finding]).status

    def replay(self, schedule: str) -> "Result":
        """Run ``schedule`` again (its scenario, options and choices)."""
        if self.replayer is None:
            raise RuntimeError("no scenario to replay on")
        return self.replayer(schedule)

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "strategy": self.strategy, "explored": self.explored,
                "distinct": self.distinct, "distinct_counts": "distinct outcomes: counters, exit paths "
                "and findings at the end of a run", "exhausted": self.exhausted,
                "elapsed_s": round(self.elapsed_s, 3), "schedules_per_s": self.schedules_per_s,
                "first_failure_after": self.first_failure_after,
                "first_failure_s": None if self.first_failure_s is None else round(self.first_failure_s, 3),
                "failures": [f.as_json() for f in self.failures], "status": self.status}


def describe(p: str, code: int, arg: int) -> str:
    """A point, readably: ``lock mmap_sem:mm1``, ``ksmd_page 16``."""
    name = sched.POINTS[code] if 0 <= code < len(sched.POINTS) else f"point{code}"
    if name == "blocked" and arg <= 0:
        return "blocked on " + {-sched.BLK_FRAMES: "free frames", -sched.BLK_KSMD_IDLE: "work (idle)",
                                -sched.BLK_COND: "the scenario"}.get(arg, "?")
    if name in ("lock", "trylock", "unlock", "blocked"):
        return f"{name} {lock_name(arg)}"
    if name == "signal":
        return f"signal {arg & 0xff} to pid {arg >> 8}"
    return f"{name} {arg}" if arg else name


def trace(out: Outcome) -> list[str]:
    """One line per step: who ran from which point to which, and where a
    preemption or a kill fell."""
    lines = []
    for s in out.steps:
        who = out.procs[s.proc]
        mark = "   "
        if s.action[0] == KILL:
            mark = "KIL"
        elif s.explored and s.action != s.default:
            mark = "PRE" if s.preemption else "CHO"
        if s.action[0] == KILL:
            lines.append(f"{s.n:5d} {mark} {who:<14} SIGKILL at {describe(who, s.code, s.arg)}")
            continue
        end = "exit" if s.after_code == -2 else describe(who, s.after_code, s.after_arg)
        lines.append(f"{s.n:5d} {mark} {who:<14} {describe(who, s.code, s.arg)} -> {end}")
    return lines


def same(a: Outcome, kind: str) -> bool:
    w = a.worst
    return w is not None and w.kind == kind


def shrink(gate: Gate, sc: Any, o: Options, sched_: Schedule, kind: str, budget: int = 200) -> Schedule:
    """Delta debugging (Zeller's ddmin) over the schedule's deviations:
    the smallest subset whose lenient replay still ends in the same
    finding; then the schedule that replay actually took."""
    devs = list(sched_.deviations)
    runs = 0

    def fails(sub: list[Deviation]) -> bool:
        nonlocal runs
        runs += 1
        s = Schedule(sched_.scenario, sched_.exit_policy, sched_.oom_rule, sched_.hazards, sched_.seed,
                     sched_.kills, sub, -1)
        return same(World(gate, sc, o, Replay(s, strict=False)).run(), kind)

    n = 2
    while len(devs) >= 2 and runs < budget:
        chunk = max(1, len(devs) // n)
        parts = [devs[i:i + chunk] for i in range(0, len(devs), chunk)]
        reduced = False
        for i in range(len(parts)):
            comp = [d for j, p in enumerate(parts) if j != i for d in p]
            if comp and fails(comp):
                devs, n, reduced = comp, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(devs):
                break
            n = min(len(devs), n * 2)
    if len(devs) == 1 and fails([]):
        devs = []
    s = Schedule(sched_.scenario, sched_.exit_policy, sched_.oom_rule, sched_.hazards, sched_.seed,
                 sched_.kills, devs, -1)
    out = World(gate, sc, o, Replay(s, strict=False)).run()
    return recorded(o, out)


def failure_of(o: Options, out: Outcome, after: int) -> Failure:
    w = out.worst
    assert w is not None
    s = recorded(o, out)
    return Failure(str(s), w.kind, w.status, w.detail, w.chain, len(out.steps), s.preemptions,
                   sum(1 for d in s.deviations if d.kind == KILL), trace(out), after)


def explore(sc: Any, o: Options, strategy: str = "dfs", preemptions: int = 2, depth: int = 3,
            schedules: int | None = None, time_limit: float | None = None, keep_going: bool = False,
            do_shrink: bool = True, progress: Callable[[Result], None] | None = None) -> Result:
    res = Result(sc.name, strategy)
    gate = Gate()
    t0 = time.monotonic()
    seen: set[tuple] = set()
    kinds: set[str] = set()
    try:
        # the default run: k for PCT and random, and the first schedule of all
        first = World(gate, sc, o, Default()).run()
        k = sum(1 for s in first.steps if s.explored)
        if strategy == "dfs":
            chooser: Any = DFS(preemptions, o.kills)
        elif strategy == "pct":
            chooser = PCT(o.seed, depth, k, o.kills)
        else:
            chooser = Random(o.seed, o.kills, k)
        while True:
            if schedules is not None and res.explored >= schedules:
                break
            if time_limit is not None and time.monotonic() - t0 >= time_limit:
                break
            c = chooser.next()
            if c is None:
                res.exhausted = True
                break
            out = World(gate, sc, o, c).run()
            if strategy == "dfs":
                chooser.backtrack()
            res.explored += 1
            seen.add(out.signature())
            w = out.worst
            if w is not None and w.kind not in kinds:
                kinds.add(w.kind)
                if res.first_failure_after is None:
                    res.first_failure_after = res.explored
                    res.first_failure_s = time.monotonic() - t0
                f = failure_of(o, out, res.explored)
                if do_shrink:
                    small = shrink(gate, sc, o, recorded(o, out), w.kind)
                    again = World(gate, sc, o, Replay(small)).run()
                    if same(again, w.kind):
                        f = failure_of(o, again, res.explored)
                res.failures.append(f)
                if not keep_going:
                    break
            if progress is not None and res.explored % 50 == 0:
                res.elapsed_s = time.monotonic() - t0
                progress(res)
    finally:
        gate.close()
    res.distinct = len(seen)
    res.elapsed_s = time.monotonic() - t0
    return res


def replay(sc: Any, s: Schedule, log_dir: str | None = None) -> tuple[Result, Outcome]:
    """Run one schedule exactly (Diverged if it does not fit)."""
    o = s.options(log_dir=log_dir)
    gate = Gate()
    t0 = time.monotonic()
    try:
        r = Replay(s)
        out = World(gate, sc, o, r).run()
        r.check_end(out)
    finally:
        gate.close()
    res = Result(sc.name, "replay", explored=1, distinct=1, elapsed_s=time.monotonic() - t0)
    if out.worst is not None:
        res.failures.append(failure_of(o, out, 1))
        res.first_failure_after = 1
    return res, out
