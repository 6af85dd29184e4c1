"""The search: run schedules of a scenario, check each, shrink a failure.

A scenario is a *script*: a function that drives one run's ``World`` (the
API layer wraps a user's ``scenario_fn(m)`` on a ``uksm.Machine``:
``uksm.explore``).  ``explore`` runs schedules chosen by a strategy until
the space within the bound is covered (``dfs``), a budget is spent
(``--schedules``, ``--time-limit``), or a failure is found (unless
``keep_going``).  Each failure is shrunk (``shrink``: delta debugging over
its deviations, keeping the same finding) and reported with its schedule
string, its trace, and the command that replays it.
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uksm.explorer.gate import Gate
from uksm.explorer.schedule import Replay, Schedule, recorded
from uksm.explorer.strategies import ICB, PCT, Random
from uksm.explorer.world import KILLED, RANK, Chooser, Default, Diverged, Options, Outcome, RunOver, World
from uksm.kernel import sched
from uksm.kernel.locks import lock_name

STRATEGIES = ("dfs", "pct", "random")
Script = Callable[[World], None]


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
    events: list[dict[str, Any]] = field(default_factory=list)   # the trace, structured

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schedule": self.schedule, "finding": self.finding, "status": self.status,
                             "steps": self.steps, "preemptions": self.preemptions, "kills": self.kills,
                             "replay": f"uksm explore --replay '{self.schedule}'"}
        if self.chain:
            d["chain"] = self.chain
        d["detail"] = self.detail
        d["trace"] = self.trace
        d["trace_events"] = self.events
        return d


@dataclass
class Result:
    scenario: str
    strategy: str
    explored: int = 0
    distinct: int = 0
    exhausted: bool = False
    elapsed_s: float = 0.0
    cpu_s: float = 0.0            # the explorer's and its processes' CPU time
    first_failure_after: int | None = None
    first_failure_s: float | None = None
    failures: list[Failure] = field(default_factory=list)
    by_preemptions: dict[int, int] = field(default_factory=dict)   # dfs: schedules run per bound
    replayer: Callable[[str], "Result"] | None = None
    outcome: Outcome | None = None   # a replay's run

    @property
    def schedules_per_s(self) -> float:
        return round(self.explored / self.elapsed_s, 1) if self.elapsed_s else 0.0

    @property
    def status(self) -> int:
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
                "schedules_by_preemptions": {str(k): v for k, v in sorted(self.by_preemptions.items())},
                "elapsed_s": round(self.elapsed_s, 3), "cpu_s": round(self.cpu_s, 3),
                "schedules_per_s": self.schedules_per_s,
                "cpu_ms_per_schedule": round(1000 * self.cpu_s / self.explored, 2) if self.explored else 0.0,
                "load": round(os.getloadavg()[0], 2),
                "first_failure_after": self.first_failure_after,
                "first_failure_s": None if self.first_failure_s is None else round(self.first_failure_s, 3),
                "failures": [f.as_json() for f in self.failures], "status": self.status}


def cpu_now() -> float:
    """CPU seconds of this process and of the children it has reaped --
    and of the gate's pool, which is never reaped while it runs: its
    processes' /proc stat (utime + stime)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def pool_cpu(gate: Gate) -> float:
    from uksm.explorer.gate import S_PID
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for slot in range(gate.used):
        pid = gate.word(slot, S_PID)
        if pid:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                total += (int(parts[11]) + int(parts[12])) / tick
            except OSError:
                pass
    return total


def run_once(gate: Gate, script: Script, o: Options, chooser: Chooser) -> Outcome:
    """One run of the scenario under ``chooser``, checked."""
    w = World(gate, o, chooser)
    w.boot()
    try:
        script(w)
    except RunOver:
        pass
    except Diverged:
        w.outcome()
        raise
    except Exception as e:
        from uksm.explorer.gate import describe_error
        w.find("assertion", f"the scenario raised {describe_error(e)[0]}")
    return w.outcome()


def describe(code: int, arg: int, names: dict[int, str]) -> str:
    """A point, readably: ``lock mmap_sem:mm1``, ``ksmd_page 16``,
    ``signal 10 to t1`` (no pid: a replay's differ)."""
    name = sched.POINTS[code] if 0 <= code < len(sched.POINTS) else f"point{code}"
    if name == "blocked" and arg < 0:
        return "blocked on " + {-sched.BLK_FRAMES: "free frames", -sched.BLK_KSMD_IDLE: "work (idle)",
                                -sched.BLK_DELAY: "a delay point", -sched.BLK_TIME: "sleep",
                                -sched.BLK_CMD: "a command",
                                -sched.BLK_UNMERGE: "ksmd's unmerge service",
                                -sched.BLK_FORK: "its fork's answer"}.get(arg, "?")
    if name in ("lock", "trylock", "unlock", "blocked"):
        return f"{name} {lock_name(arg)}"
    if name == "signal":
        return f"signal {arg & 0xff} to {names.get(arg >> 8, 'a process gone')}"
    return f"{name} {arg}" if arg else name


def trace_events(out: Outcome) -> list[dict[str, Any]]:
    """The run's steps as structured events (what ``trace`` prints, and
    what a timeline renders): the step, the process, its mark (``PRE`` a
    preemption, ``CHO`` another choice where the process had given up the
    CPU, ``KIL`` a kill, "" the default), the point it ran from and the one
    it parked at (``exit``: its body ended), the last kill point it passed,
    the signals it sent, and whether the step was a choice (``explored``).
    No pid: two replays give the same events."""
    events = []
    for s in out.steps:
        mark = ""
        if s.action[0] == KILLED:
            mark = "KIL"
        elif s.explored and s.action != s.default:
            mark = "PRE" if s.preemption else "CHO"
        to = ("SIGKILL" if s.action[0] == KILLED else "exit" if s.after_code == -2
              else describe(s.after_code, s.after_arg, out.names))
        events.append({"step": s.n, "proc": s.who or out.procs[s.proc], "mark": mark,
                       "from": describe(s.code, s.arg, out.names), "to": to,
                       "via": sched.POINTS[s.via] if s.via else "",
                       "signals": [f"signal {sig} to {out.names.get(pid, 'a process gone')}" for pid, sig in s.sent],
                       "explored": s.explored})
    return events


def trace(out: Outcome) -> list[str]:
    """One line per step: who ran from which point to which, and where a
    preemption or a kill fell (``trace_events``, as text)."""
    lines = []
    for e in trace_events(out):
        mark = e["mark"] or "   "
        if e["mark"] == "KIL":
            lines.append(f"{e['step']:5d} {mark} {e['proc']:<14} SIGKILL at {e['from']}")
            continue
        notes = ([f"via {e['via']}"] if e["via"] else []) + e["signals"]
        lines.append(f"{e['step']:5d} {mark} {e['proc']:<14} {e['from']} -> {e['to']}"
                     + (f"  [{'; '.join(notes)}]" if notes else ""))
    return lines


def same(a: Outcome, kind: str) -> bool:
    w = a.worst
    return w is not None and w.kind == kind


def shrink(gate: Gate, script: Script, o: Options, sched_: Schedule, kind: str, budget: int = 200) -> Schedule:
    """Delta debugging (Zeller's ddmin) over the schedule's deviations:
    the smallest subset whose lenient replay still ends in the same
    finding; then the schedule that replay actually took."""
    devs = list(sched_.deviations)
    runs = 0

    def fails(sub: list[Any]) -> bool:
        nonlocal runs
        runs += 1
        return same(run_once(gate, script, o, Replay(sched_.with_deviations(sub), strict=False)), kind)

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
    out = run_once(gate, script, o, Replay(sched_.with_deviations(devs), strict=False))
    return recorded(o, out)


def failure_of(o: Options, out: Outcome, after: int) -> Failure:
    w = out.worst
    assert w is not None
    s = recorded(o, out)
    return Failure(str(s), w.kind, w.status, w.detail, w.chain, len(out.steps), s.preemptions,
                   sum(1 for d in s.deviations if d.kind == KILLED), trace(out), after, trace_events(out))


def explore(script: Script, o: Options, strategy: str = "dfs", preemptions: int = 2, depth: int = 3,
            schedules: int | None = None, time_limit: float | None = None, keep_going: bool = False,
            do_shrink: bool = True, progress: Callable[[Result], None] | None = None,
            gate: Gate | None = None) -> Result:
    res = Result(o.scenario, strategy)
    own = gate is None
    g = gate or Gate()
    t0, c0 = time.monotonic(), cpu_now() + pool_cpu(g)
    seen: set[tuple] = set()
    kinds: set[str] = set()
    try:
        # the default run: does the script mark a race phase (else choices
        # start at the first step), and k, the explored steps, for PCT and random
        first = run_once(g, script, o, Default())
        if not first.raced and not o.from_start:
            o.from_start = True
            first = run_once(g, script, o, Default())
        k = sum(1 for s in first.steps if s.explored)
        if strategy == "dfs":
            chooser: Any = ICB(preemptions, o.kills)
        elif strategy == "pct":
            chooser = PCT(o.seed, depth, k, o.kills)
        else:
            chooser = Random(o.seed, o.kills, k)
        last_progress = time.monotonic()
        while True:
            if schedules is not None and res.explored >= schedules:
                break
            if time_limit is not None and time.monotonic() - t0 >= time_limit:
                break
            c = chooser.next()
            if c is None:
                res.exhausted = True
                break
            out = run_once(g, script, o, c)
            c.done()
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
                    small = shrink(g, script, o, recorded(o, out), w.kind)
                    again = run_once(g, script, o, Replay(small))
                    if same(again, w.kind):
                        f = failure_of(o, again, res.explored)
                res.failures.append(f)
                if not keep_going:
                    break
            if progress is not None and time.monotonic() - last_progress >= 5.0:
                last_progress = time.monotonic()
                res.elapsed_s = time.monotonic() - t0
                if isinstance(chooser, ICB):
                    res.by_preemptions = dict(chooser.ran)
                progress(res)
        if isinstance(chooser, ICB):
            res.by_preemptions = dict(chooser.ran)
        res.cpu_s = cpu_now() + pool_cpu(g) - c0
    finally:
        if own:
            g.close()
    res.distinct = len(seen)
    res.elapsed_s = time.monotonic() - t0
    return res


def replay(script: Script, s: Schedule, log_dir: str | None = None, gate: Gate | None = None,
           strict: bool = True, **options: Any) -> Result:
    """Run one schedule exactly (Diverged if it does not fit); not
    ``strict``: the deviations that fit, the default elsewhere (the same
    choices on changed code: a fixed control)."""
    o = s.options(log_dir=log_dir, **options)
    g = gate or Gate()
    t0 = time.monotonic()
    try:
        r = Replay(s, strict)
        out = run_once(g, script, o, r)
        r.check_end(out)
    finally:
        if gate is None:
            g.close()
    res = Result(s.scenario, "replay", explored=1, distinct=1, elapsed_s=time.monotonic() - t0, outcome=out)
    if out.worst is not None:
        res.failures.append(failure_of(o, out, 1))
        res.first_failure_after = 1
    return res


__all__ = ["explore", "replay", "run_once", "shrink", "trace", "trace_events", "describe", "Result", "Failure",
           "Script", "STRATEGIES"]
