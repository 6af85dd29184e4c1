"""``uksm run --deterministic``: a run on a controlled schedule.

The same run as ``uksm run``'s -- built-in workers writing their
workload, churning, ksmd merging, until merged or for ``--duration``, the
oom-unmerge scenario -- but driven as a script on
``uksm.Machine(deterministic=True, seed=S)``: one process runs at a time,
every choice of the schedule comes from the seed (uksm.explorer), and
time is logical: ksmd's sleep_millisecs, the workers' churn and idle
periods and the driver's waits are steps of the run's clock, never wall
time.  So the same seed gives the same run: the same counters, exit
paths, events.  (``uksm inject --deterministic`` is the same machinery
under the injector: ``uksm.tools.inject``.)

What a deterministic run does not have: the demonstration's staged exits
(a worker stopped away from the cursor, a late one: a wall-clock
choreography), and the host's scheduling (its speed: a controlled run is
slower than a free one, each step a round trip).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

from uksm.api import HungTask, Machine, MachineError

if TYPE_CHECKING:
    from uksm.proc.run import RunReport
from uksm.proc.run import (
    Convergence,
    RunOptions,
    all_stable,
    default_frames,
    make_log_dir,
    oom_headroom,
    validate,
)


def machine_of(o: RunOptions, max_tasks: int, prefix: str = "run") -> Machine:
    """The run's Machine: ``o``'s cluster on a schedule drawn from ``o.seed``,
    its logs in ``--log-dir`` or a new folder (as ``uksm run``'s)."""
    o.log_dir = make_log_dir(f"{prefix}-deterministic-{o.seed}", o.log_dir)
    return Machine(deterministic=True, seed=o.seed, frames=o.frames or default_frames(o), max_pages=o.pages,
                   max_tasks=max_tasks, exit_policy=o.exit_policy, oom_rule=o.oom_rule, kernel=o.kernel,
                   hazards=tuple(o.hazards), run=o.run, pages_to_scan=o.pages_to_scan,
                   sleep_millisecs=o.sleep_ms, log_dir=o.log_dir)


def drive(m: Machine, o: RunOptions) -> dict[str, Any]:
    """``uksm.proc.run.drive``'s rules on a Machine, in logical time: until
    merged (``Convergence``), at most ``--max-duration``; or ``--duration``;
    the oom-unmerge scenario's run=2 once merged.  Returns the scenario's
    report block."""
    m.spawn(o.workers, o.pages, o.workload, o.seed, o.churn_ms, wait=False)
    extra: dict[str, Any] = {}
    until_merged = o.until_merged or o.duration is None or o.scenario == "oom-unmerge"
    end = m.now() + (o.duration if o.duration is not None else o.max_duration)
    conv = Convergence(bool(o.churn_ms))
    q = m._t().cl.q

    def look() -> bool:
        if m.now() >= end or not m.tasks():
            return True
        if not until_merged or m.ksm["run"] != 1:
            return False
        ready = len(m.tasks(ready=True)) == o.workers
        conv.ready(q, ready)
        return conv.converged(q, ready, lambda scans: m.ksm["full_scans"] >= scans and all_stable(q))
    m.wait(look, end - m.now() + 1, "the run's end")
    if o.scenario == "oom-unmerge" and m.now() < end:
        m.ksm["mem_limit"] = m.ksm["frames_used"] + oom_headroom(o)
        try:
            m.ksm["run"] = 2     # the writer unmerges, short of memory
        except HungTask:
            raise
        except MachineError:
            pass                 # the write failed: run_store says how
    return extra


def run(o: RunOptions) -> tuple[RunReport, int]:
    """``uksm run --deterministic``: the report (``uksm run --json``'s
    shape, plus ``deterministic``: the seed, the schedule that replays the
    run, its steps and logical seconds) and the exit status."""
    validate(o)
    m = machine_of(o, o.workers * 2 + 8)
    if not o.quiet:
        print(f"uksm: deterministic run, seed {o.seed}: logs in {o.log_dir}", file=sys.stderr)
    extra: dict[str, Any] = {}
    with m:
        try:
            extra = drive(m, o)
        except HungTask:
            pass                 # the report's hung_tasks say it
    return report_of(m, o, extra)


def report_of(m: Machine, o: RunOptions, extra: dict[str, Any]) -> tuple[RunReport, int]:
    rep: dict[str, Any] = dict(m.report or {})
    det = {"seed": o.seed, "schedule": rep.pop("schedule", ""), "steps": rep.pop("steps", 0),
           "logical_s": rep.pop("logical_s", 0.0)}
    rep.update(workload=o.workload, duration_s=det["logical_s"], log_dir=o.log_dir,
               exit_policy=o.exit_policy, oom_rule=o.oom_rule, kernel=o.kernel, hazards=list(o.hazards),
               scenario=o.scenario,
               ksmd_restarts=0, interrupted=None, deterministic=det, **extra)
    # every RunReport key, from the ControlledReport and the options (the
    # world's blocks are untyped: the cast is not checked further)
    return cast("RunReport", rep), int(rep["status"])


__all__ = ["run", "drive", "machine_of", "report_of"]
