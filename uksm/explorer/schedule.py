"""A schedule as a string, and the choosers that replay one.

::

    uksm2:oom-unmerge:legacy:2.6.32:-:0:0:race:40.2.5/57.k1.9:168
    uksm2:oom-unmerge:seed:2.6.32:-:0:0:race:-:168:6.18

Fields, ``:``-separated: the format's version; the scenario; the exit
policy; the OOM rule; the hazards (``-`` for none, else ``,``-joined); the
seed; the SIGKILL choices allowed; where the choices begin (``race``: at
the script's ``Machine.race()``, ``start``: from the first step); the
*deviations*; the run's number of steps; and, for a kernel other than
2.6.32, the kernel (``--kernel 6.18``: an eleventh field, so that every
2.6.32 schedule reads as it always did).  A deviation ``STEP.PROC.CODE``
says: at step STEP, run process PROC, which is parked at point CODE
(``uksm.kernel.sched.POINTS``); ``STEP.kPROC.CODE``: SIGKILL it there.
Every other step takes the default choice (``World.View.default``), so a
schedule is as long as its preemptions and kills, and each deviation
checks that the replay is where the recording was: the first step that
does not fit is named (``Diverged``), and so is a run that ends at another
step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from uksm.explorer.world import KILLED, RUN, Action, Diverged, Options, Outcome, View
from uksm.kernel import sched
from uksm.kernel.layout import EXIT_POLICIES, HAZARDS, KERNELS, OOM_RULES

VERSION = "uksm2"
_DEV = re.compile(r"^(\d+)\.(k?)(\d+)\.(\d+)$")
FROM = ("race", "start")


class BadSchedule(ValueError):
    """A schedule string that does not parse (one line, status 2)."""


@dataclass(frozen=True)
class Deviation:
    step: int
    kind: int       # RUN or KILLED
    proc: int
    code: int

    def __str__(self) -> str:
        return f"{self.step}.{'k' if self.kind == KILLED else ''}{self.proc}.{self.code}"


@dataclass
class Schedule:
    scenario: str
    exit_policy: str = "seed"
    oom_rule: str = "2.6.32"
    hazards: tuple[str, ...] = ()
    seed: int = 0
    kills: int = 0
    from_start: bool = False
    deviations: list[Deviation] = field(default_factory=list)
    steps: int = -1
    kernel: str = "2.6.32"     # KERNELS: an eleventh field when not 2.6.32

    def __str__(self) -> str:
        return ":".join([VERSION, self.scenario, self.exit_policy, self.oom_rule,
                         ",".join(self.hazards) or "-", str(self.seed), str(self.kills),
                         FROM[self.from_start],
                         "/".join(str(d) for d in self.deviations) or "-", str(self.steps)]
                        + ([self.kernel] if self.kernel != KERNELS[0] else []))

    def options(self, **kw: object) -> Options:
        return Options(scenario=self.scenario, exit_policy=self.exit_policy, oom_rule=self.oom_rule,
                       kernel=self.kernel, hazards=self.hazards, seed=self.seed, kills=self.kills,
                       from_start=self.from_start, **kw)  # type: ignore[arg-type]

    def with_deviations(self, devs: list[Deviation], steps: int = -1) -> "Schedule":
        return Schedule(self.scenario, self.exit_policy, self.oom_rule, self.hazards, self.seed,
                        self.kills, self.from_start, list(devs), steps, self.kernel)

    @property
    def preemptions(self) -> int:
        return sum(1 for d in self.deviations if d.kind == RUN)


def parse(text: str) -> Schedule:
    f = text.strip().split(":")
    if len(f) not in (10, 11) or f[0] != VERSION:
        old = " (a schedule of an older uksm: its points are numbered otherwise)" \
            if f and f[0] == "uksm1" else ""
        raise BadSchedule(f"not a schedule: {text.strip()[:60]!r} (expected {VERSION}:SCENARIO:POLICY:"
                          f"OOM_RULE:HAZARDS:SEED:KILLS:FROM:DEVIATIONS:STEPS[:KERNEL]){old}")
    _v, scen, pol, rule, hz, seed, kills, frm, devs, steps = f[:10]
    kernel = f[10] if len(f) == 11 else KERNELS[0]
    if kernel not in KERNELS:
        raise BadSchedule(f"schedule: unknown kernel {kernel!r} (one of: {', '.join(KERNELS)})")
    if pol not in EXIT_POLICIES:
        raise BadSchedule(f"schedule: unknown exit policy {pol!r}")
    if rule not in OOM_RULES:
        raise BadSchedule(f"schedule: unknown OOM rule {rule!r}")
    hazards = () if hz == "-" else tuple(hz.split(","))
    for h in hazards:
        if h not in HAZARDS:
            raise BadSchedule(f"schedule: unknown hazard {h!r}")
    if frm not in FROM:
        raise BadSchedule(f"schedule: where the choices begin must be race or start (got {frm!r})")
    if not (seed.lstrip("-").isdigit() and kills.isdigit() and steps.lstrip("-").isdigit()):
        raise BadSchedule("schedule: seed, kills and steps must be whole numbers")
    out: list[Deviation] = []
    for tok in ([] if devs == "-" else devs.split("/")):
        m = _DEV.match(tok)
        if not m:
            raise BadSchedule(f"schedule: bad deviation {tok!r} (STEP.PROC.CODE or STEP.kPROC.CODE)")
        d = Deviation(int(m[1]), KILLED if m[2] else RUN, int(m[3]), int(m[4]))
        if d.code >= len(sched.POINTS):
            raise BadSchedule(f"schedule: point code {d.code} unknown")
        if out and d.step <= out[-1].step:
            raise BadSchedule(f"schedule: deviations out of order at {tok!r}")
        out.append(d)
    return Schedule(scen, pol, rule, hazards, int(seed), int(kills), frm == "start", out, int(steps),
                    kernel)


def recorded(o: Options, out: Outcome) -> Schedule:
    """The schedule a run took: its steps that left the default."""
    devs = [Deviation(s.n, s.action[0], s.action[1], s.code) for s in out.steps
            if s.explored and s.action != s.default]
    return Schedule(o.scenario, o.exit_policy, o.oom_rule, tuple(o.hazards), o.seed, o.kills,
                    o.from_start, devs, len(out.steps), o.kernel)


def fits(d: Deviation, v: View) -> bool:
    """Deviation ``d`` can be taken at step ``v``: its process there, at its point."""
    return (d.proc in v.enabled if d.kind == RUN else d.proc in v.killable) \
        and v.codes.get(d.proc, -1) == d.code


class Replay:
    """Follow a schedule's deviations, the default elsewhere.  ``strict``:
    a deviation that does not fit raises Diverged naming its step;
    lenient (shrinking): it is skipped."""

    def __init__(self, s: Schedule, strict: bool = True) -> None:
        self.devs = {d.step: d for d in s.deviations}
        self.strict = strict
        self.steps = s.steps

    def choose(self, v: View) -> Action:
        d = self.devs.get(v.n)
        if d is None:
            return v.default()
        if fits(d, v):
            return (d.kind, d.proc)
        if not self.strict:
            return v.default()
        code = v.codes.get(d.proc, -1)
        procs = v.procs
        where = sched.POINTS[code] if 0 <= code < len(sched.POINTS) else "not parked"
        want = sched.POINTS[d.code]
        who = procs[d.proc].name if d.proc in procs else f"process {d.proc}"
        raise Diverged(f"the schedule diverged at step {v.n}: it {'kills' if d.kind == KILLED else 'runs'} "
                       f"{who} at point {want}, but {who} is "
                       f"{'at ' + where if code >= 0 else 'not there'}"
                       f"{'' if d.proc in v.enabled or d.kind == KILLED else ' and not enabled'}")

    def check_end(self, out: Outcome) -> None:
        if self.strict and self.steps >= 0 and len(out.steps) != self.steps:
            raise Diverged(f"the schedule diverged: the run ended at step {len(out.steps)}, "
                           f"the recorded one at step {self.steps}")
