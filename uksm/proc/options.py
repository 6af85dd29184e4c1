"""The options of a cluster and of the tasks it starts, checked in one place.

Who checks here: the command line (``uksm run``, ``up``, ``inject``,
``spawn``, ``task new``), the daemon's requests (``uksm.proc.handlers``,
``uksm.proc.scripting``: a request is checked again where it is served,
whoever sent it) and the Python API (``uksm.Machine``, ``m.spawn``,
``m.task``).  So a range, a name or a default is written once, and every
caller refuses the same input with the same words -- except the option's
own name, which is spelt the way the caller spelt it: a flag for the
command line (``--max-pages``), a keyword for the API (``max_pages``).
A request carries its sender's spelling in ``"by"``.

What each check prevents:

- ``cluster``: the options ``run``, ``inject``, ``up`` and ``Machine``
  share (types, ranges, names), before anything is created;
- ``frames_fit``: an emulated memory above 16 GiB, or one too small for
  its pages when nothing would merge them;
- ``room``: a cluster whose objects cannot fit in /dev/shm at all (the
  pool backed frame by frame, the control block and one largest task's page
  table), refused up front in one line naming the options, rather than
  a SIGBUS or the host's OOM killer later;
- ``spawn``, ``task_pages``: a new task's options, against the cluster's
  ``max_pages``;
- ``live_tasks``: ``max_tasks`` (``--max-workers``) is how many tasks may
  live at once: a start beyond it is refused whole (a ``LimitError``,
  status 1: the request was valid, the machine is full), never half done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from uksm.errors import UksmError
from uksm.host.exitcodes import EXIT_ERR, EXIT_USAGE
from uksm.host.shm import SHM_DIR, shm_free_bytes
from uksm.kernel.layout import EXIT_POLICIES, HAZARDS, KERNELS, OOM_RULES, PAGE_SIZE

Spelling = Literal["cli", "api"]
CLI: Spelling = "cli"
API: Spelling = "api"

MAX_TASKS = 4096                 # task rows of one cluster (max_tasks / --max-workers)
MAX_PAGES = 1 << 20              # the largest address space: 4 GiB (max_pages / --max-pages)
MAX_POOL_BYTES = 16 << 30        # the emulated physical memory: 16 GiB
MIN_FRAMES = 16
UINT_MAX = (1 << 31) - 1         # pages_to_scan, sleep_millisecs: sysfs's unsigned int


@dataclass(frozen=True)
class Option:
    """One option, by its two spellings: ``keyword`` (the API's, and the
    request's field) and ``flag`` (the command line's)."""
    keyword: str
    flag: str

    def spelt(self, by: Spelling) -> str:
        return self.flag if by == CLI else self.keyword


WORKERS = Option("workers", "--workers")
PAGES = Option("pages", "--pages")
FRAMES = Option("frames", "--frames")
MAX_TASKS_OPT = Option("max_tasks", "--max-workers")
MAX_PAGES_OPT = Option("max_pages", "--max-pages")
COUNT = Option("count", "--count")
SEED = Option("seed", "--seed")
CHURN_MS = Option("churn_ms", "--churn-ms")
WORKLOAD = Option("workload", "--workload")
RUN = Option("run", "--run")
PAGES_TO_SCAN = Option("pages_to_scan", "--pages-to-scan")
SLEEP_MS = Option("sleep_millisecs", "--sleep-ms")
EXIT_POLICY = Option("exit_policy", "--exit-policy")
OOM_RULE = Option("oom_rule", "--oom-rule")
KERNEL = Option("kernel", "--kernel")
HAZARD = Option("hazards", "--hazard")
HUNG_TIMEOUT = Option("hung_task_timeout", "--hung-task-timeout")
MEM_LIMIT = Option("mem_limit", "mem_limit")  # a knob: uksm ctl mem_limit=N
TIMEOUT = Option("timeout", "--timeout")       # a wait's (uksm wait, m.wait_*)
SIGNAL = Option("signal", "--signal")          # a kill's (uksm kill, t.kill)


class OptionError(UksmError):
    """An option refused: one line naming it as its caller spelt it
    (status 2, nothing done).  ``kind``: ``type`` (not a value of the
    option's type: the API's TypeError) or ``value`` (out of range, an
    unknown name: ValueError)."""

    def __init__(self, opt: Option, by: Spelling, why: str, kind: str = "value",
                 status: int = EXIT_USAGE) -> None:
        super().__init__(f"{opt.spelt(by)}: {why}", status)
        self.option = opt
        self.kind = kind


class LimitError(UksmError):
    """A valid request the machine has no room for now (status 1: the
    API's MachineError); nothing was done."""

    kind = "limit"

    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_ERR)


def spelling(req: dict[str, Any]) -> Spelling:
    """The spelling a request's sender uses (its ``"by"``; the command line's by default)."""
    return API if req.get("by") == API else CLI


# ---- one value -------------------------------------------------------------------------

def whole(opt: Option, v: Any, by: Spelling, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number in lo..hi (a bool is not one)."""
    if isinstance(v, bool) or type(v) is not int:
        raise OptionError(opt, by, f"must be a whole number (got {type(v).__name__} {v!r})", "type")
    if lo is not None and v < lo:
        raise OptionError(opt, by, f"must be at least {lo} (got {v})")
    if hi is not None and v > hi:
        raise OptionError(opt, by, f"must be at most {hi} (got {v})")
    return v


def seconds(opt: Option, v: Any, by: Spelling) -> float:
    """A positive, finite number of seconds (NaN and infinity are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionError(opt, by, f"must be a number of seconds (got {type(v).__name__} {v!r})",
                          "type")
    if not (math.isfinite(v) and v > 0):
        raise OptionError(opt, by, f"must be a positive, finite number of seconds (got {v!r})")
    return float(v)


def one_of(opt: Option, v: Any, by: Spelling, names: tuple[str, ...] | list[str]) -> str:
    if not isinstance(v, str):
        raise OptionError(opt, by, f"must be a string, one of {', '.join(names)} (got {v!r})", "type")
    if v not in names:
        raise OptionError(opt, by, f"unknown {v!r} (one of: {', '.join(names)})")
    return v


def check_workload(v: Any, by: Spelling) -> str:
    from uksm.workers.workloads import validate as wl_validate
    if not isinstance(v, str):
        raise OptionError(WORKLOAD, by, f"must be a string (got {type(v).__name__})", "type")
    try:
        return wl_validate(v)
    except UksmError as e:
        raise OptionError(WORKLOAD, by, str(e)) from None


def check_hazards(v: Any, by: Spelling) -> list[str]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise OptionError(HAZARD, by, f"a list of {', '.join(HAZARDS)} (got {v!r})", "type")
    for h in v:
        one_of(HAZARD, h, by, list(HAZARDS))
    return list(v)


# ---- a cluster -----------------------------------------------------------------------------

def cluster(by: Spelling, *, frames: Any = 0, run: Any = 1, pages_to_scan: Any = 100,
            sleep_millisecs: Any = 20, exit_policy: Any = "seed", oom_rule: Any = "2.6.32",
            kernel: Any = "2.6.32",
            hazards: Any = (), hung_task_timeout: Any = 5.0, churn_ms: Any = 0,
            workload: Any = "vm", workers: Any = None, min_workers: int = 1,
            pages: Any = None, max_tasks: Any = None, max_pages: Any = None,
            mem_limit: Any = 0) -> None:
    """The options ``run``, ``inject``, ``up`` and ``Machine`` share: a
    one-line OptionError, nothing created.  ``frames`` 0 is "the default"
    on the command line (sized from the workers); the API has no such
    value.  ``None``: an option this caller does not have."""
    if workers is not None:
        whole(WORKERS, workers, by, min_workers)
    if pages is not None:
        whole(PAGES, pages, by, 1)
    fr = whole(FRAMES, frames, by, 0 if by == CLI else MIN_FRAMES)
    if 0 < fr < MIN_FRAMES:
        raise OptionError(FRAMES, by, f"must be at least {MIN_FRAMES} (got {fr})")
    if fr * PAGE_SIZE > MAX_POOL_BYTES:
        raise OptionError(FRAMES, by, f"{fr} frames are {fr * PAGE_SIZE >> 30} GiB of emulated "
                                      f"memory: at most {MAX_POOL_BYTES >> 30} GiB")
    if max_tasks is not None:
        whole(MAX_TASKS_OPT, max_tasks, by, 1, MAX_TASKS)
    if max_pages is not None:
        whole(MAX_PAGES_OPT, max_pages, by, 1)
        if max_pages > MAX_PAGES:
            raise OptionError(MAX_PAGES_OPT, by, f"at most {MAX_PAGES} (4 GiB per address space; "
                                                 f"got {max_pages})")
    if whole(RUN, run, by) not in (0, 1, 2):
        raise OptionError(RUN, by, f"must be 0, 1 or 2 (got {run}): invalid argument, as "
                                   f"/sys/kernel/mm/ksm/run")
    whole(PAGES_TO_SCAN, pages_to_scan, by, 1, UINT_MAX)
    whole(SLEEP_MS, sleep_millisecs, by, 0, UINT_MAX)
    one_of(EXIT_POLICY, exit_policy, by, EXIT_POLICIES)
    one_of(OOM_RULE, oom_rule, by, OOM_RULES)
    one_of(KERNEL, kernel, by, KERNELS)
    check_hazards(hazards, by)
    seconds(HUNG_TIMEOUT, hung_task_timeout, by)
    whole(CHURN_MS, churn_ms, by, 0)
    check_workload(workload, by)
    whole(MEM_LIMIT, mem_limit, by, 0)
    if fr and mem_limit > fr:
        raise OptionError(MEM_LIMIT, by, f"{mem_limit}: 0 (none) .. {FRAMES.spelt(by)} ({fr})")


def limits(by: Spelling, max_tasks: int, max_pages: int, workers: int, pages: int) -> None:
    """``up``'s room against its initial workers (the API starts none)."""
    if max_tasks < max(workers, 1):
        raise OptionError(MAX_TASKS_OPT, by, f"{max_tasks} is less than {WORKERS.spelt(by)} "
                                             f"{workers}")
    if max_pages < pages:
        raise OptionError(MAX_PAGES_OPT, by, f"{max_pages} is less than {PAGES.spelt(by)} {pages}")


def frames_fit(by: Spelling, frames: int, total: int, run: int, workload_name: str,
               sized_from: str = "") -> None:
    """The pool holds ``total`` pages unless ksmd can merge them (run=1,
    a mergeable workload).  ``sized_from``: how a default pool was sized,
    for the message (the command line's --workers x --pages)."""
    if frames * PAGE_SIZE > MAX_POOL_BYTES:
        what = sized_from or f"{FRAMES.spelt(by)} {frames}"
        raise OptionError(FRAMES, by, f"{what} is {frames * PAGE_SIZE >> 30} GiB of emulated "
                                      f"memory: at most {MAX_POOL_BYTES >> 30} GiB")
    from uksm.workers.workloads import split_fork
    if frames < total and (run != 1 or split_fork(workload_name)[0].split(":")[0] in ("unique",
                                                                                   "volatile")):
        raise OptionError(FRAMES, by, f"{total} pages cannot fit in {frames} frames: nothing "
                                      f"would merge them (raise {FRAMES.spelt(by)}, or use "
                                      f"{RUN.spelt(by)} 1 with a mergeable workload)")


def room(by: Spelling, cfg: Any, max_pages: int, lower: tuple[Option, ...] = ()) -> None:
    """The cluster ``cfg`` (a ``uksm.kernel.cluster.Config``) fits in
    /dev/shm: its control block and frame table, every frame of its pool
    backed, and the page table of one task of ``max_pages`` pages (task
    page tables are backed as tasks map pages: ``uksm.kernel.mm``).
    Refused up front, in one line naming the options to ``lower``
    (default: frames and max_pages), when it cannot (status 1: the host's
    state, the same options fit elsewhere)."""
    from uksm.kernel.cluster import sizes
    ctl, frames, pool = sizes(cfg)
    need = ctl + frames + pool + mm_segment_bytes(max_pages)
    free = shm_free_bytes()
    if need > free:
        names = " or ".join(o.spelt(by) for o in (lower or (FRAMES, MAX_PAGES_OPT)))
        raise OptionError(FRAMES, by, f"{cfg.frames} frames, tasks of up to {max_pages} pages: "
                                      f"the cluster does not fit in {SHM_DIR}: it needs "
                                      f"{need >> 20} MiB (every frame backed, and one largest "
                                      f"task's page table), {free >> 20} MiB are free; lower "
                                      f"{names}, or give {SHM_DIR} more room (docker --shm-size)",
                          status=EXIT_ERR)


def mm_segment_bytes(pages: int) -> int:
    """What an address space of ``pages`` pages costs in /dev/shm once
    mapped whole: its header, VMA table and page table (8 bytes a page)."""
    from uksm.kernel.layout import FIRST_VPN, PT_OFF
    return ((PT_OFF + FIRST_VPN + pages) * 8 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def signal_name(by: Spelling, v: Any, default: str) -> str:
    """A kill's signal: ``KILL`` or ``TERM`` (any case, ``SIG`` prefix allowed)."""
    if v is None:
        return default
    if not isinstance(v, str):
        raise OptionError(SIGNAL, by, f"must be KILL or TERM (got {v!r})", "value")
    return one_of(SIGNAL, v.upper().removeprefix("SIG"), by, ("KILL", "TERM"))


# ---- a task ----------------------------------------------------------------------------------

def task_pages(by: Spelling, pages: Any, max_pages: int) -> int:
    """A new task's pages: 1..the cluster's max_pages."""
    v = whole(PAGES, pages, by, 1)
    if v > max_pages:
        raise OptionError(PAGES, by, f"must be 1..{max_pages} (the machine's "
                                     f"{MAX_PAGES_OPT.spelt(by)} is {max_pages})")
    return v


@dataclass
class Spawn:
    """A checked ``spawn``: built-in workers to start."""
    count: int
    pages: int
    workload: str
    seed: int
    churn_ms: int


def spawn(by: Spelling, req: dict[str, Any], defaults: dict[str, Any]) -> Spawn:
    """``uksm spawn`` / ``m.spawn``: the request's values, a missing one
    (None) taken from ``defaults`` (the cluster's spec: ``up``'s options)."""
    def get(k: str) -> Any:
        v = req.get(k)
        return defaults[k] if v is None else v
    count = whole(COUNT, 1 if req.get("count") is None else req["count"], by, 1)
    pages = task_pages(by, get("pages"), int(defaults["max_pages"]))
    return Spawn(count, pages, check_workload(get("workload"), by), whole(SEED, get("seed"), by),
                 whole(CHURN_MS, get("churn_ms"), by, 0))


def live_tasks(by: Spelling, alive: int, count: int, max_tasks: int) -> None:
    """``max_tasks`` tasks may live at once (a task lives from its start
    until it is reaped): ``count`` more are refused whole if they do not
    all fit."""
    if alive + count > max_tasks:
        room_left = max(0, max_tasks - alive)
        what = "task" if count == 1 else f"{count} tasks"
        raise LimitError(f"{MAX_TASKS_OPT.spelt(by)} {max_tasks}: {alive} tasks are alive, "
                         f"{room_left} more may start; {what} refused, nothing started")


__all__ = ["Option", "OptionError", "LimitError", "Spelling", "CLI", "API", "spelling", "whole",
           "seconds", "one_of", "signal_name", "check_workload", "check_hazards", "cluster", "limits",
           "frames_fit", "room", "mm_segment_bytes", "task_pages", "Spawn", "spawn", "live_tasks",
           "MAX_PAGES", "MAX_TASKS"]
