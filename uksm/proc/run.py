"""``uksm run``: boot a cluster in the foreground, run workers, stop, report.

The report (``--json``) is one object; its exit status is one of
``uksm.host.exitcodes`` (0 all good, 128+N stopped by signal N).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_OK, EXIT_USAGE
from uksm.host.exitcodes import interrupted as interrupted_status
from uksm.host.lifeline import StopSignals
from uksm.kernel.cluster import Config
from uksm.kernel.ksm import slot_next, slots
from uksm.kernel.layout import (
    A_FREE_TOP,
    H_MEM_LIMIT,
    H_PENDING_FREE,
    K_FULL_SCANS,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    K_PAGES_UNSHARED,
    K_RMAP_ITEMS,
    K_RUN,
    L_SCAN_SLOT,
    ksm_block,
)
from uksm.kernel.locks import LockTimeout
from uksm.proc import options
from uksm.proc.options import CLI, Spelling
from uksm.proc.supervisor import Shutdown, Snapshot, Supervisor

SCENARIOS = ("oom-unmerge",)


class RunStore(TypedDict):
    """A scenario's write of run (``echo 2 > run``): how it ended."""
    value: int
    result: str    # uksm.kernel.writer.result_of: "ok", "-ENOMEM", ...; "hung", "running"
    run: int       # run now


class RunExtra(TypedDict, total=False):
    """The blocks a driver adds to the report."""
    run_store: RunStore


class RunReport(Snapshot, Shutdown):
    """``uksm run --json``'s object, and ``uksm.Machine.report``: the
    snapshot taken before shutdown (``ksm``, ``frames``, ``memory``),
    shutdown's blocks (``workers`` ... ``status``), and the run's own
    keys below.  ``uksm inject`` adds an ``inject`` block
    (``uksm.faults.inject.InjectReport``)."""
    cluster: str
    workload: str
    duration_s: float
    log_dir: str
    exit_policy: str
    oom_rule: str
    kernel: str                        # whose mm/ksm.c (KERNELS)
    hazards: list[str]
    scenario: str | None
    run_store: NotRequired[RunStore]   # the oom-unmerge scenario's
    interrupted: str | None            # the stop signal's name, if one ended the run


@dataclass
class RunOptions:
    workers: int = 4
    pages: int = 1024
    frames: int = 0          # 0: every page unmerged, plus slack
    workload: str = "vm"
    seed: int = 0
    duration: float | None = None
    until_merged: bool = False
    max_duration: float = 60.0
    log_dir: str | None = None
    cluster: str = ""
    run: int = 1
    pages_to_scan: int = 100
    sleep_ms: int = 20
    exit_policy: str = "seed"
    oom_rule: str = "2.6.32"
    kernel: str = "2.6.32"
    hazards: list[str] = field(default_factory=list)
    hung_task_timeout: float = 5.0
    scenario: str | None = None
    churn_ms: int = 0
    quiet: bool = False
    demo_exits: bool = False  # set by run_cluster for the plain demo: see demo_exit_away_from_cursor


def usage_error(msg: str) -> None:
    raise shm.UksmError(msg, EXIT_USAGE)


def check_cluster_options(o: Any, by: Spelling = CLI, min_workers: int = 1) -> None:
    """The options ``run``, ``inject`` and ``up`` share (any object with
    those attribute names), checked by ``uksm.proc.options``: a one-line
    error (status 2), nothing created."""
    hazards = o.hazards if hasattr(o, "hazards") else o.hazard  # (argparse's --hazard)
    options.cluster(by, frames=o.frames, run=o.run, pages_to_scan=o.pages_to_scan,
                    sleep_millisecs=o.sleep_ms, exit_policy=o.exit_policy,
                    oom_rule=o.oom_rule, kernel=o.kernel, hazards=list(hazards),
                    hung_task_timeout=o.hung_task_timeout, churn_ms=o.churn_ms,
                    workload=o.workload, workers=o.workers, min_workers=min_workers,
                    pages=o.pages)


def check_frames(frames: int, total: int, o: Any) -> None:
    """The pool: at most 16 GiB, and big enough unless ksmd can merge."""
    sized = ("" if getattr(o, "frames", 0) else
             f"--workers {o.workers} x --pages {o.pages} need {frames} frames, which")
    options.frames_fit(CLI, frames, total, o.run, o.workload, sized)


def validate(o: RunOptions) -> None:
    """Bad input: a one-line error (UksmError, status 2), nothing created."""
    bad = usage_error
    check_cluster_options(o)
    if o.duration is not None and not (math.isfinite(o.duration) and o.duration > 0):
        bad(f"--duration must be positive (got {o.duration})")
    if not (math.isfinite(o.max_duration) and o.max_duration > 0):
        bad(f"--max-duration must be positive (got {o.max_duration})")
    if o.scenario is not None and o.scenario not in SCENARIOS:
        bad(f"unknown --scenario {o.scenario!r} (one of: {', '.join(SCENARIOS)})")
    check_frames(o.frames or default_frames(o), o.workers * o.pages, o)
    if o.log_dir is not None:
        check_log_dir(o.log_dir)
    if o.cluster:
        from uksm.proc.control import name_taken
        shm.check_cluster_name(o.cluster)
        taken = name_taken(o.cluster, "another --cluster")
        if taken is not None:
            raise taken
    options.room(CLI, make_config(o), o.pages, (options.WORKERS, options.PAGES, options.FRAMES))


def check_log_dir(path: str) -> None:
    """--log-dir: an existing folder we can write in (checked by writing:
    root's access() says yes to a read-only file system)."""
    if not os.path.isdir(path):
        usage_error(f"--log-dir {path}: no such directory")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        usage_error(f"--log-dir {path}: cannot write there ({e.strerror})")


def make_log_dir(name: str, given: str | None) -> str:
    """The run's log folder: --log-dir, else a new one under ./uksm-logs."""
    if given:
        return os.path.abspath(given)
    d = os.path.abspath(f"uksm-logs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise shm.UksmError(f"cannot create the log folder {d} ({e.strerror}): run from a "
                            f"writable folder, or give --log-dir", EXIT_ERR)
    return d


def default_frames(o: RunOptions) -> int:
    """Every worker's pages and a sixteenth more; a W+fork worker's
    children (CHILD_LIFE of them alive at a time, each may break COW on
    every page before ksmd merges it back) as much again each."""
    from uksm.workers.workloads import CHILD_LIFE, split_fork
    tasks = o.workers * (1 + CHILD_LIFE if split_fork(o.workload)[1] else 1)
    return tasks * o.pages + max(64, tasks * o.pages // 16)


def make_config(o: RunOptions) -> Config:
    n = o.workers
    return Config(frames=o.frames or default_frames(o), max_tasks=n * 2 + 32, max_mms=n * 3 + 32,
                  va_pages=o.pages + 80, exit_policy=o.exit_policy, oom_rule=o.oom_rule,
                  kernel=o.kernel, hazards=list(o.hazards),
                  hung_timeout_ms=int(o.hung_task_timeout * 1000), run=o.run,
                  pages_to_scan=o.pages_to_scan, sleep_ms=o.sleep_ms)


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, sup: Supervisor, t: float, what: str = "") -> None:
        if self.quiet or time.monotonic() - self.last < 1.0:
            return
        self.last = time.monotonic()
        k = ksm_block(sup.cl.q)
        fr = sup.snapshot()["frames"]
        print(f"uksm: {t:6.1f}s {what}workers {sup.workers_alive()}  shared {k['pages_shared']} "
              f"sharing {k['pages_sharing']} unshared {k['pages_unshared']} volatile "
              f"{k['pages_volatile']}  full_scans {k['full_scans']}  frames {fr['used']}/{fr['total']}",
              file=sys.stderr)


def run_cluster(o: RunOptions) -> tuple[RunReport, int]:
    """``uksm run``: the foreground loop is ``drive``."""
    if o.scenario == "oom-unmerge":
        o.until_merged = True
    # the plain demo shows every __ksm_exit path: the last worker starts
    # after ksmd's first full scan, so its slot goes just behind the cursor
    # (a whole pass away), writes its pages and exits before ksmd reaches
    # it: fast path; at convergence one worker away from the
    # cursor exits alone: slow path (ksmd has its rmap_items); the rest exit
    # together at the end, and ksmd, freeing exiting slots without spending
    # its batch on them, often frees theirs before their __ksm_exit: no slot
    # (the default workload only: runs of the other workloads keep exact
    # end-of-run counters, all workers present)
    o.demo_exits = (o.workload == "vm" and o.scenario is None and o.duration is None and o.run == 1
                    and o.workers >= 3)
    return run_with(o, lambda sup, t0, progress, interrupted: drive(sup, o, t0, progress, interrupted))


Driver = Callable[[Supervisor, float, "Progress", Callable[[], bool]], tuple[bool, RunExtra]]


def run_with(o: RunOptions, driver: Driver, prefix: str = "run") -> tuple[RunReport, int]:
    """Boot a cluster with ``o``'s workers, let ``driver`` run it (it
    returns whether a task hung, and extra report blocks), then stop the
    workers through their exit paths, let ksmd free what they left, stop
    ksmd, fsck, tear down, and build the report.  Shared by run and inject."""
    validate(o)
    name = o.cluster or f"{prefix}{os.getpid()}"
    log_dir = make_log_dir(name, o.log_dir)
    if not o.quiet:
        print(f"uksm: cluster {name}: logs in {log_dir}", file=sys.stderr)
    sup = Supervisor(name, make_config(o), log_dir, quiet=o.quiet)
    t0 = time.monotonic()
    progress = Progress(o.quiet)
    # SIGTERM/SIGHUP/SIGINT: the loop ends, the shutdown below runs in order;
    # a second one raises SecondSignal: kill at once, remove every object
    with StopSignals() as stop:
        try:
            sup.boot()
            from uksm.workers.workloads import CHILD_LIFE
            sup.forks.max_live = o.workers * (1 + CHILD_LIFE)  # a W+fork worker's children
            sup.log.info("run_options", workers=o.workers, pages=o.pages, workload=o.workload,
                         seed=o.seed, scenario=o.scenario)
            for _ in range(o.workers - 1 if o.demo_exits else o.workers):
                if stop():
                    break
                sup.spawn_worker(o.pages, o.workload, o.seed, o.churn_ms)
            # the loop ends on a stop signal, or when ksmd oopsed in a row (uksm.host.oops)
            _hung, extra = driver(sup, t0, progress, lambda: stop() or bool(sup.given_up))
            if stop():
                sup.log.warning("interrupted", signal=stop.name)
                if not o.quiet:
                    print(f"uksm: {stop.name}: stopping cluster {name} in order (workers exit, "
                          f"ksmd frees, fsck, teardown); again to kill it at once", file=sys.stderr)
            snap = sup.snapshot()
            end = sup.shutdown()
        except BaseException:
            if sup.booted:
                sup.kill_all()
                sup.teardown()
            raise
    status = end["status"]
    if o.workers and not end["integrity"]["pages_verified"] and not o.scenario:
        # no task did its work to the end (each died, was killed or OOM-killed
        # before verifying its pages): that is no success -- unless a
        # scenario asked for it (oom-unmerge's writer may OOM-kill every worker)
        w = end["workers"]
        end["errors"].append(f"no page was verified: of {w['started']} workers, {w['killed']} killed, "
                             f"{w['oom_killed']} OOM-killed, none verified its pages")
        if status == EXIT_OK:
            status = EXIT_ERR
    if stop():
        status = interrupted_status(status, stop.signo)
    report = build_report(name, o, t0, snap, end, log_dir, extra, interrupted=stop.name or None,
                          status=status)
    sup.log_stop(status)
    return report, status


def build_report(name: str, o: RunOptions, t0: float, snap: Snapshot, end: Shutdown,
                 log_dir: str, extra: RunExtra | None = None, interrupted: str | None = None,
                 status: int | None = None) -> RunReport:
    """``uksm run --json``'s object (also ``uksm.Machine.report``): the
    snapshot taken before shutdown, and shutdown's blocks.  ``interrupted``:
    the stop signal's name, if one ended the run; ``status``: the run's
    (default: shutdown's)."""
    return {"cluster": name, "workload": o.workload, "duration_s": round(time.monotonic() - t0, 3),
            **snap, "workers": end["workers"], "integrity": end["integrity"], "fsck": end["fsck"],
            "hung_tasks": end["hung_tasks"], "ipc_leftovers": end["ipc_leftovers"],
            "log_dir": log_dir, "exit_policy": o.exit_policy, "oom_rule": o.oom_rule, "kernel": o.kernel,
            "hazards": o.hazards,
            "scenario": o.scenario, **(extra or {}), "errors": end["errors"],
            "oops": end["oops"], "ksmd_restarts": end["ksmd_restarts"],
            "use_after_free": end["use_after_free"], "lockdep": end["lockdep"], "interrupted": interrupted,
            "status": end["status"] if status is None else status}


def print_report(r: RunReport) -> None:
    """build_report's dict for a human (``uksm run`` without --json, ``uksm inject``)."""
    k, fr, w = r["ksm"], r["frames"], r["workers"]
    mem = r["memory"]["host_bytes_resident"]
    total_pages = fr["total"]
    saved = k["pages_sharing"]
    print(f"cluster {r['cluster']}  workload {r['workload']}  {r['duration_s']:.1f}s  "
          f"exit policy {r['exit_policy']}  oom rule {r.get('oom_rule', '2.6.32')}"
          + (f"  kernel {r['kernel']}" if r.get("kernel", "2.6.32") != "2.6.32" else ""))
    print(f"  ksm      run {k['run']}  full_scans {k['full_scans']}  pages_scanned {k['pages_scanned']}")
    print(f"           pages_shared {k['pages_shared']}  pages_sharing {k['pages_sharing']}  "
          f"pages_unshared {k['pages_unshared']}  pages_volatile {k['pages_volatile']}")
    if "run_store" in r:   # a scenario's write of run: how it ended
        rs = r["run_store"]
        print(f"           run_store {rs['value']}: {rs['result']} (run now {rs['run']})")
    print(f"  memory   frames used {fr['used']} of {total_pages}; pool resident "
          f"{mem / 2**20:.1f} MiB; saved by merging {saved} pages = {saved * 4096 / 2**20:.1f} MiB")
    print(f"  workers  started {w['started']}  exited {w['exited']}  __ksm_exit: fast {w['exit_fast']}  "
          f"slow {w['exit_slow']}" + (f"  legacy {w['exit_legacy']}" if w.get("exit_legacy") else "")
          + f"  no slot {w['exit_noslot']} (ksmd freed it first, or none)"
          + f"  killed {w['killed']}  oom_killed {w['oom_killed']}")
    print("           (fast: no rmap_items, not at ksmd's cursor, the task freed its slot itself; "
          "slow: slot moved behind the cursor, down_write/up_write of mmap_sem, ksmd frees it; "
          "no slot: ksmd saw ksm_test_exit first and freed the slot)")
    i = r["integrity"]
    none = " (no worker verified its pages)" if not i["pages_verified"] and w["started"] else ""
    print(f"  data     {i['pages_verified']} pages verified, {i['mismatches']} mismatches{none}")
    print(f"  fsck     {'clean' if r['fsck']['ok'] else 'FAILED'}")
    for e in r["fsck"]["errors"][:10]:
        print(f"           {e}")
    for h in r["hung_tasks"]:
        print(f"  HUNG     {h['role']} pid {h['pid']} blocked on {h['lock']} for {h['waited_s']}s")
        for line in h["chain"]:
            print(f"           {line}")
    print(f"  leftover POSIX objects: {len(r['ipc_leftovers'])}  logs: {r['log_dir']}")
    for e in r.get("errors", []):
        print(f"  error    {e}")
    for o in r.get("oops", []):
        print(f"  OOPS     {o.get('task', 'ksmd')}: {o['error']} at {o['where']}  x{o['count']} "
              f"(its traceback: the task's log)")
    if r.get("interrupted"):
        print(f"  INTERRUPTED by {r['interrupted']}: stopped early, in order (status {r['status']})")


def demo_exit_away_from_cursor(sup: Supervisor, timeout: float = 20.0) -> None:
    """SIGTERM one worker whose slot is neither at ksmd's cursor nor next
    after it, and wait until it has exited: ksmd holds rmap_items of it and
    is busy elsewhere, so its __ksm_exit takes the slow path."""
    cl, q = sup.cl, sup.cl.q
    cl.task.lock(cl.mmlist)
    try:
        cur = q[L_SCAN_SLOT]
        near = {cur, slot_next(cl, cur)}
        rows = [s for s in slots(cl) if s not in near]
        mm_ids = {cl.mrow(s).id for s in rows}
    finally:
        cl.task.unlock(cl.mmlist)
    with sup.lock:
        ch = next((c for c in sup.children.values() if c.mm in mm_ids), None)
    if ch is None:
        return
    ch.proc.terminate()
    end = time.monotonic() + timeout
    while time.monotonic() < end and not sup.hung:
        sup.poll()
        sup.sweep()
        with sup.lock:
            if ch.row not in sup.children:
                return
        time.sleep(0.01)


def oom_headroom(o: RunOptions) -> int:
    """--scenario oom-unmerge: frames left above the merged state."""
    return max(8, o.pages // 2)


def all_stable(q: Any) -> bool:
    """Every rmap_item is in the stable tree: no page in the unstable tree
    (pages_unshared), none waiting for its checksum to settle
    (pages_volatile = rmap_items - shared - sharing - unshared)."""
    return q[K_PAGES_UNSHARED] == 0 and q[K_PAGES_SHARED] + q[K_PAGES_SHARING] == q[K_RMAP_ITEMS]


def merged_since(sup: Supervisor, scans: int) -> bool:
    """``--until-merged``'s short cut: ``full_scans`` has reached ``scans``
    (a whole pass that began after every worker had written its pages) and
    every rmap_item is stable, so no page is left that ksmd could still
    merge -- the counters cannot move again until a task writes.  Read
    under ksm_thread_mutex (ksmd publishes the counters under it, one
    batch at a time: unlocked reads could mix two batches); a ksmd that
    keeps it more than a second, or is gone, means not yet."""
    cl, q = sup.cl, sup.cl.q
    if q[K_FULL_SCANS] < scans or not all_stable(q):  # the cheap look first
        return False
    try:
        cl.task.lock_bounded(cl.daemon, 1.0, lambda: bool(sup.hung) or sup.ksmd is None)
    except LockTimeout:
        return False
    try:
        return q[K_FULL_SCANS] >= scans and all_stable(q)
    finally:
        cl.task.unlock(cl.daemon)


class Convergence:
    """``--until-merged``'s rule, fed at each look (``drive``, and the
    deterministic run's driver, ``uksm.deterministic``): the counters
    (pages_shared, pages_sharing, rmap_items) sampled at three full-scan
    ends in a row, every worker ready, are equal; or, without churn,
    ``stable_since(ready_scan + 2)`` (``merged_since``)."""

    def __init__(self, churn: bool) -> None:
        self.churn = churn
        self.samples: list[tuple[int, int, int]] = []
        self.last_scan = -1
        # full_scans when every worker was first seen ready (None: one is
        # not): the pass then in progress may have begun before the last
        # write, the one after it (ending at ready_scan + 2) cannot have
        self.ready_scan: int | None = None

    def ready(self, q: Any, all_ready: bool) -> None:
        if all_ready:
            if self.ready_scan is None:
                self.ready_scan = q[K_FULL_SCANS]
        else:
            self.ready_scan = None

    def converged(self, q: Any, all_ready: bool, stable_since: Callable[[int], bool]) -> bool:
        """Looked at once per full scan (False in between)."""
        if q[K_FULL_SCANS] == self.last_scan:
            return False
        self.last_scan = q[K_FULL_SCANS]
        if all_ready:
            self.samples.append((q[K_PAGES_SHARED], q[K_PAGES_SHARING], q[K_RMAP_ITEMS]))
        s = self.samples
        return ((len(s) >= 3 and s[-1] == s[-2] == s[-3])
                or (self.ready_scan is not None and not self.churn and stable_since(self.ready_scan + 2)))


def drive(sup: Supervisor, o: RunOptions, t0: float, progress: Progress,
          interrupted: Callable[[], bool]) -> tuple[bool, RunExtra]:
    """The foreground loop: until the duration, convergence, or the
    scenario's end.  Returns whether a hung task was reported, and the
    scenario's report block (the run=2 write's result).

    Converged (``--until-merged``) means nothing is left to merge: either
    the counters (pages_shared, pages_sharing, rmap_items) sampled at three
    full-scan ends in a row, every worker ready (its pages written), are
    equal -- two quiet passes: a page rewritten just after ksmd passed it
    keeps the counters still for one pass (its checksum is recorded) and
    moves them in the next (it enters a tree) --; or, sooner and without
    churn (``--churn-ms`` rewrites pages at any time), ``merged_since``:
    a whole pass begun after every worker was ready, and every rmap_item
    in the stable tree (nothing in the unstable tree, nothing volatile) --
    the end of the pass that merged the last page, where the rule of three
    waits two more passes to see nothing move."""
    from uksm.kernel.writer import result_of
    q = sup.cl.q
    writer = None
    extra: RunExtra = {}
    late = o.demo_exits  # the demo's last worker is still to start
    conv = Convergence(bool(o.churn_ms))
    phase = "merge"
    # --duration caps --until-merged (it does not switch it off): whichever comes first
    until_merged = o.until_merged or o.duration is None
    deadline = t0 + (o.duration if o.duration is not None else o.max_duration)
    # why the loop ended (the run_end event): a test reads it, never the clock
    ended = "--duration" if o.duration is not None else "--max-duration"
    while time.monotonic() < deadline:
        if interrupted():
            ended = "ksmd oopsed in a row" if sup.given_up else "stop signal"
            break
        sup.poll()
        sup.sweep()
        if sup.hung or sup.failed:   # (a task that failed to start: said at once, in the report)
            ended = "hung task" if sup.hung else "a task failed"
            break
        t = time.monotonic() - t0
        progress(sup, t, f"[{phase}] " if o.scenario else "")
        if sup.workers_alive() == 0 and sup.recovery.dead_q.empty() and writer is None and sup.settled():
            # (every death accounted: one of its own error is a failure)
            ended = "a task failed" if sup.failed else "no worker left"
            break  # (a run=2 writer still unmerging is waited for below: its result is the report's)
        conv.ready(q, sup.workers_ready())
        if until_merged:
            if phase == "unmerge":
                rc = sup.run_writer_status(writer) if writer is not None else 0
                if rc is not None:
                    extra["run_store"] = {"value": 2, "result": result_of(rc), "run": q[K_RUN]}
                    ended = "run_store returned"
                    break
            elif q[K_RUN] != 1:
                if sup.workers_ready():
                    ended = f"nothing to merge (run {q[K_RUN]})"
                    break
            elif late and q[K_FULL_SCANS] >= 1 and sup.workers_ready():
                sup.spawn_worker(o.pages, o.workload, o.seed, o.churn_ms, exit_after_write=True)
                late = False
            elif conv.converged(q, sup.workers_ready(), lambda scans: merged_since(sup, scans)):
                if o.scenario == "oom-unmerge" and phase == "merge":
                    phase = "unmerge"
                    # the merged state: frames merged away but still on
                    # their way back (ksmd flushes them just after the
                    # batch that freed them) are not in it
                    used = sup.cl.nframes - q[A_FREE_TOP] - q[H_PENDING_FREE]
                    q[H_MEM_LIMIT] = used + oom_headroom(o)
                    sup.log.info("ksm_knob", name="mem_limit", value=q[H_MEM_LIMIT])
                    writer = sup.start_run_writer(2)  # echo 2 > run, PF_OOM_ORIGIN as the policy's kernel
                    conv.samples.clear()
                elif not o.scenario:
                    if o.demo_exits:
                        demo_exit_away_from_cursor(sup)
                    ended = "converged"
                    break
        time.sleep(0.005)  # a few cheap looks (waitpid, the ready flags): convergence seen within 5 ms
    sup.log.info("run_end", reason=ended, full_scans=q[K_FULL_SCANS])
    if writer is not None and "run_store" not in extra:
        extra["run_store"] = {"value": 2, "result": "hung" if sup.hung else "running", "run": q[K_RUN]}
    return bool(sup.hung), extra
