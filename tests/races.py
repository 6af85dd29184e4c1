"""The race windows the suite reaches by a schedule (issue 21, item 7).

Each schedule below was found by exploring a built-in scenario
(uksm/scenarios.py) with the hazard on and no delay point placed by hand:

    uksm explore --scenario SCENARIO --hazard HAZARD --preemptions 2

and is replayed here exactly (``uksm.replay``): the same steps every time,
no sleep, no timing.  A change of the kernel code that moves a scheduling
point makes a replay diverge, naming the step: run the command again and
store the new schedule.  The fixed code's control replays the same
choices leniently (the fix changes what follows) and ``window`` shows,
from the trace, that both sides of the race met at the window -- so a
clean control is a real one, not a race never reached.
"""
from __future__ import annotations

import uksm
from uksm.scenarios import SCENARIOS

# hazard -> (scenario, the schedule that reaches the window, the finding)
SCHEDULES = {
    "no-scan-head-check": ("ksm05", "uksm2:ksm05:seed:2.6.32:no-scan-head-check:0:0:race:0.2.2/3.1.5:15", "oops"),
    "up-read-after-unlock": ("ksm05", "uksm2:ksm05:seed:2.6.32:up-read-after-unlock:0:0:race:0.2.2/8.1.5:21",
                             "use_after_free"),
    "no-unmerge-exit-check": ("run2-vs-exit",
                              "uksm2:run2-vs-exit:seed:2.6.32:no-unmerge-exit-check:0:0:race:18.3.2:21", "oops"),
    "oom-mmput-in-task": ("oom-unmerge", "uksm2:oom-unmerge:seed:2.6.32:oom-mmput-in-task:0:0:race:-:22",
                          "deadlock"),
    "no-exit-checks": ("run2-vs-exit", "uksm2:run2-vs-exit:seed:2.6.32:no-exit-checks:0:0:race:8.3.2/12.0.5:49",
                       "fsck"),
}


def replay(hazard: str, fixed: bool = False, **kw: object) -> uksm.Exploration:
    """The hazard's schedule on its scenario; ``fixed``: the same choices
    on the fixed code (lenient)."""
    name, schedule, _finding = SCHEDULES[hazard]
    sc = SCENARIOS[name]
    return uksm.replay(sc.fn, schedule, strict=not fixed, hazards=() if fixed else None, name=name,
                       **{**sc.options, **kw})


DEFAULT = "uksm2:script:seed:2.6.32:-:0:0:start:-:-1"   # no deviation: the default schedule, any length


def default_run(script: object, **kw: object) -> uksm.Exploration:
    """A script on the default schedule (its trace: ``.trace``)."""
    return uksm.replay(script, DEFAULT, **kw)  # type: ignore[arg-type]


def steps(trace: list[str]) -> list[tuple[str, str]]:
    """(process, its whole line) per step of a trace."""
    out = []
    for x in trace:
        f = x.split()
        out.append((f[2] if f[1] in ("PRE", "CHO", "KIL") else f[1], x))
    return out


def until(st: list[tuple[str, str]], i: int, who: str) -> list[tuple[str, str]]:
    """The steps after step i until ``who`` runs again."""
    out = []
    for p, x in st[i + 1:]:
        if p == who:
            break
        out.append((p, x))
    return out


def held(trace: list[str], who: str, kp: str, racer: str, what: str) -> bool:
    """``who`` passed kill point ``kp`` and parked; ``racer`` then did
    ``what`` (a piece of one of its lines) before ``who`` went on."""
    st = steps(trace)
    return any(p == who and f"via {kp}" in x and any(q == racer and what in y for q, y in until(st, i, who))
               for i, (p, x) in enumerate(st))


def first(st: list[tuple[str, str]], who: str, what: str) -> int:
    return next((i for i, (p, x) in enumerate(st) if p == who and what in x), -1)


def window(hazard: str, trace: list[str]) -> bool:
    """Both sides of the hazard's race met in this run -- whether or not
    the code then failed."""
    if hazard == "no-scan-head-check":   # ksmd saw the list non-empty; the task left it empty meanwhile
        return held(trace, "ksmd", "kp:ksmd_scan_wrap", "t1", "-> exit")
    if hazard == "up-read-after-unlock":  # the cursor moved on; the task exits before ksmd's up_read
        return held(trace, "ksmd", "kp:ksmd_between_unlocks", "t1", "-> exit")
    if hazard == "no-exit-checks":        # break_ksm saw a KSM page; exit_mmap zaps before its fault
        return held(trace, "writer(2)", "kp:ksmd_break_ksm_window", "t1", "via kp:exit_mid_zap")
    st = steps(trace)
    if hazard == "no-unmerge-exit-check":  # the exit freed the page tables before run=2 walks the mm
        freed, walk = first(st, "t1", "free_pgtables 1 ->"), first(st, "writer(2)", "lock mmap_sem:mm1 ->")
        return 0 <= freed < walk
    # oom-mmput-in-task: the writer OOM-kills t1 while it holds t1's mmap_sem
    took, kill = first(st, "writer(2)", "lock mmap_sem:mm1 ->"), first(st, "writer(2)", "signal 10 to t1")
    return 0 <= took < kill and first(st[took:kill], "writer(2)", "unlock mmap_sem:mm1 ->") < 0


__all__ = ["SCHEDULES", "DEFAULT", "replay", "default_run", "window", "steps", "until", "held", "first"]
