"""Fault injection: kill workers while ksmd scans them, and check that the
emulated kernel survives every kill with nothing lost.

``uksm inject`` (or ``python -m uksm.faults.inject``) boots a cluster whose
workers churn (refault, COW, re-advise) so that every code path is busy,
then delivers ``--kills`` kills, one at a time, choosing the victim by
``--point``:

- ``random``: a random live worker, at a random instant;
- ``cursor``: the worker whose address space is at ksmd's scan cursor now
  (``ksm_scan.mm_slot``), i.e. one ksmd is working in;
- a kill-point name (``uksm inject --list-points``): the point is armed in a
  worker (or in ksmd, which then kills the owner of the mm it is inside)
  and the worker dies there, possibly holding locks.

With ``--signal KILL`` the worker vanishes and the supervisor recovers its
locks, repairs the frame table and runs its exit on its behalf; with
``--signal TERM`` it exits through its own path at its next safe point.
A replacement is spawned after each kill so that scanning goes on.  After
the last kill the run waits until ksmd has merged new work again, then
stops every worker (each verifies its data), lets ksmd free what the slow
paths left, runs fsck and tears down.  The report is ``uksm run``'s plus an
``inject`` block.  The victims, instants and points come from ``--seed``;
the interleaving from the host's scheduler -- unless ``--deterministic``:
then the same driver runs on a ``uksm.Machine(deterministic=True)``, every
choice of the schedule from the seed too and every wait logical (the
instants between kills, the waits for ksmd, the points' budget), so a seed
replays the whole run (docs/EXPLORE.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import TypedDict

import uksm
from uksm.api import MachineStats
from uksm.errors import UksmError
from uksm.host.exitcodes import interrupted as interrupted_status
from uksm.host.lifeline import StopSignals
from uksm.kernel import killpoints
from uksm.kernel.layout import HAZARDS, KERNELS
from uksm.proc.run import EXIT_USAGE, RunOptions, RunReport, default_frames, validate
from uksm.proc.supervisor import FsckResult

SIGNALS = ("KILL", "TERM")
# a worker point reached only by a task still to go through __ksm_enter:
# a programmable task made with mergeable=False takes it
SPAWN_POINTS = ("ksm_enter_locked",)
# ksmd points reached while ksmd breaks COW: run=2, then back to 1
COW_POINTS = ("ksmd_break_cow", "ksmd_break_ksm_window")
# a kill that did not happen (the victim exited meanwhile, the point was not
# on its way): counted as missed; a hung task or a closed machine ends the run
FATAL = (uksm.HungTask, uksm.MachineClosed)
# a point not reached for this long is given up (counted in the report's
# "unreached"), so that the run always ends: --point all goes on to the
# next point; a single point ends the kills (a ksmd that oopsed for good
# never puts its cursor on a task again)
POINT_BUDGET_S = 30.0


class InjectExits(TypedDict):
    """The __ksm_exit paths taken, over the run (``m.stats()``'s)."""
    fast: int
    slow: int
    legacy: int
    reaped: int


class InjectBlock(TypedDict):
    """The report's ``inject``: the kills and what the cluster did about them."""
    kills: int                     # delivered
    requested: int
    signal: str
    mode: str                      # --point: random, cursor, all, or a kill point
    by_signal: dict[str, int]
    by_point: dict[str, int]
    missed_attempts: int
    unreached: dict[str, int]      # points given up after --point-budget
    kill_points_hit: int
    respawned: int
    exits: InjectExits
    lock_recoveries: int
    recoveries: int
    merges_after_kills: int
    live_fsck: FsckResult          # fsck of the running cluster after the kills
    full_scans_after_kills: int


class InjectReport(RunReport):
    """``uksm inject --json``'s object: ``uksm run``'s report and the ``inject`` block."""
    inject: InjectBlock


class RunOutput(RunReport, total=False):
    """What a campaign's run prints (``uksm.faults.campaign_run``): an
    InjectReport, or ``uksm run``'s RunReport (no kills: no ``inject``)."""
    inject: InjectBlock


class Injector:
    """The kills, one at a time, on a uksm.Machine: a script among others."""

    def __init__(self, o: RunOptions, kills: int, sig: str, point: str, seed: int,
                 deterministic: bool = False, point_budget_s: float = POINT_BUDGET_S) -> None:
        self.o = o
        self.deterministic = deterministic
        self.point_budget_s = point_budget_s
        self.gave_up = False  # a single --point not reached: the kills ended early
        self.kills = kills
        self.sig = sig
        self.point = point
        self.rng = random.Random(seed)
        self.delivered = 0
        self.by_point: dict[str, int] = {}
        self.missed = 0
        self.respawned = 0
        self.at_last: dict[str, int] = {"merges": 0, "full_scans": 0}
        self.live: FsckResult = {"ok": False, "errors": ["not run"]}
        self.interrupted: Callable[[], bool] = lambda: False  # a stop signal (uksm.host.lifeline)
        self.unreached: dict[str, int] = {}  # --point all: points given up after POINT_BUDGET_S
        self.hung = False

    # -- helpers ---------------------------------------------------------------
    def top_up(self, m: uksm.Machine) -> None:
        """Respawn replacements so that --workers stay alive and scanned."""
        missing = self.o.workers - len(m.tasks())
        if missing > 0:
            o = self.o
            m.spawn(missing, o.pages, o.workload, o.seed, o.churn_ms, wait=False)
            self.respawned += missing

    # -- one kill ----------------------------------------------------------------
    def kill_random(self, m: uksm.Machine) -> bool:
        kids = m.tasks(ready=True)
        if not kids:
            return False
        victim = self.rng.choice(kids)
        m.sleep(self.rng.random() * 0.03)
        victim.kill(self.sig)
        return True

    def kill_cursor(self, m: uksm.Machine) -> bool:
        victim = m.scan_cursor()
        if victim is None:
            return False
        victim.kill(self.sig)
        return True

    def kill_at_point(self, m: uksm.Machine, name: str) -> bool:
        if name in SPAWN_POINTS or name in killpoints.FORK_POINTS:
            # a programmable task, driven there: its first MADV_MERGEABLE, or a fork
            m.task(pages=min(self.o.pages, 16), mergeable=name not in SPAWN_POINTS).kill(
                self.sig, at=name)
            self.respawned += 1
            return True
        if name in killpoints.KSMD_POINTS:
            exited = m.stats()["exited"]
            m.arm(name, self.sig)
            if name in COW_POINTS:
                m.ksm["run"] = 2
                m.ksm["run"] = 1
            try:
                m.wait(lambda: m.armed() is None, 10, f"ksmd to pass {name}")
            except uksm.WaitTimeout:
                m.disarm()
                return False
            # ksmd signalled the owner of the mm it was in: wait until that
            # exit is accounted (recovered, if SIGKILLed), so that the
            # counters read after the last kill include it (under load they
            # did not, 1 run in 12); the owner may have been dead already:
            # then this just times out
            try:
                m.wait(lambda: m.stats()["exited"] > exited, 5, f"the death at {name}")
            except uksm.WaitTimeout:
                pass
            return True
        kids = m.tasks(ready=True)
        if not kids:
            return False
        self.rng.choice(kids).kill(self.sig, at=name)
        return True

    # -- the drive loop ---------------------------------------------------------------
    def drive(self, m: uksm.Machine, quiet: bool) -> None:
        t0 = last = time.monotonic()
        m.spawn(self.o.workers, self.o.pages, self.o.workload, self.o.seed, self.o.churn_ms)
        m.wait_full_scans(2, timeout=120)
        points = killpoints.reachable(self.o.exit_policy, self.o.kernel) if self.point == "all" else [self.point]
        if "ksmd_zero_before_count" in points:
            # 6.18's zero-page merge runs only with use_zero_pages (off by
            # default): on, so that ksmd passes the point (the vm workload's
            # zero pages)
            m.ksm["use_zero_pages"] = 1
        i = 0
        since = m.now()  # trying this point since (the run's clock: logical when deterministic)
        while self.delivered < self.kills and not self.interrupted():
            self.top_up(m)
            mode = points[i % len(points)]
            try:
                if mode == "random":
                    done = self.kill_random(m)
                elif mode == "cursor":
                    done = self.kill_cursor(m)
                else:
                    done = self.kill_at_point(m, mode)
            except uksm.MachineError as e:
                if isinstance(e, FATAL):
                    raise
                done = False
            if done:
                self.delivered += 1
                self.by_point[mode] = self.by_point.get(mode, 0) + 1
                i += 1
                since = m.now()
            else:
                self.missed += 1
                if m.now() - since > self.point_budget_s:
                    # not reached (the workload does not go there, or ksmd
                    # is gone): on to the next point rather than round this
                    # one for ever; with one point, the kills end here
                    self.unreached[mode] = self.unreached.get(mode, 0) + 1
                    if self.point != "all":
                        self.gave_up = True
                        break
                    i += 1
                    since = m.now()
                if self.deterministic:
                    # a controlled run moves only while the script waits:
                    # let it, or the replacements never become ready and
                    # the logical clock never reaches the point budget (a
                    # free run's processes go on by themselves)
                    m.sleep(0.001)
                else:
                    m.wait(lambda: True, 1)  # reap meanwhile, and hear about a hung task
            if not quiet and time.monotonic() - last >= 1.0:
                last = time.monotonic()
                print(f"uksm: {last - t0:6.1f}s [kills {self.delivered}/{self.kills}] "
                      + "  ".join(f"{k} {v}" for k, v in m.ksm.counters().items()), file=sys.stderr)
        st = m.stats()
        self.at_last = {"merges": st["merges"], "full_scans": m.ksm["full_scans"]}
        if self.interrupted():
            return  # a stop signal: straight to the orderly close
        if self.gave_up:
            # the point is not reached any more (ksmd gone, or the workload
            # never goes there): no new work to wait for, only the check
            self.live = m.fsck()
            return
        self.top_up(m)
        # the last replacements started and scanned (mergeable), so that
        # every worker the close stops verifies its data -- and a worker
        # still starting is not stopped by the close's SIGTERM, which the
        # report would count with the kills (a fresh user saw killed 203
        # after --kills 200, and one worker's pages verified)
        try:
            m.wait(lambda: len(m.tasks(ready=True)) >= self.o.workers, 60,
                   "the last replacements to start")
        except uksm.WaitTimeout:
            pass  # the report's started/exited/killed say what became of them
        st = m.stats()
        self.at_last = {"merges": st["merges"], "full_scans": m.ksm["full_scans"]}
        # ksmd still merging: new work merged after the last kill
        try:
            m.wait(lambda: m.stats()["merges"] > self.at_last["merges"]
                   and m.ksm["full_scans"] >= self.at_last["full_scans"] + 2, 60,
                   "ksmd to merge new work after the kills")
        except uksm.WaitTimeout:
            pass  # reported: merges_after_kills 0
        self.live = m.fsck()

    def block(self, st: MachineStats, full_scans: int) -> InjectBlock:
        return {"kills": self.delivered, "requested": self.kills, "signal": self.sig,
                "mode": self.point, "by_signal": {self.sig: self.delivered},
                "by_point": dict(self.by_point), "missed_attempts": self.missed,
                "unreached": dict(self.unreached),
                "kill_points_hit": st["kill_points_hit"], "respawned": self.respawned,
                "exits": {"fast": st["exit_fast"], "slow": st["exit_slow"],
                          "legacy": st["exit_legacy"], "reaped": st["reaped"]},
                "lock_recoveries": st["lock_recoveries"], "recoveries": st["recoveries"],
                "merges_after_kills": st["merges"] - self.at_last["merges"],
                "live_fsck": self.live,
                "full_scans_after_kills": full_scans - self.at_last["full_scans"]}

    def run(self) -> InjectReport:
        """Boot a Machine, drive the kills, close it; the report (uksm
        run's, with an ``inject`` block)."""
        o = self.o
        # SIGTERM/SIGHUP/SIGINT: the kills end, the machine closes in order;
        # a second one raises SecondSignal: killed at once, every object removed
        with StopSignals() as stop:
            self.interrupted = stop
            if self.deterministic:
                from uksm.deterministic import machine_of
                m = machine_of(o, o.workers + 8, "inject")
                m.log_dir = o.log_dir or ""
            else:
                m = uksm.Machine(frames=default_frames(o), max_pages=o.pages,
                                 max_tasks=o.workers + 8, exit_policy=o.exit_policy, hazards=o.hazards,
                                 kernel=o.kernel,
                                 pages_to_scan=o.pages_to_scan, sleep_millisecs=o.sleep_ms,
                                 name=o.cluster or f"inject{os.getpid()}", log_dir=o.log_dir,
                                 hung_task_timeout=o.hung_task_timeout)
            if not o.quiet:
                print(f"uksm: cluster {m.name}: logs in {m.log_dir}", file=sys.stderr)
            with m:
                try:
                    self.drive(m, o.quiet)
                except uksm.HungTask:
                    self.hung = True
                st, fs = m.stats(), m.ksm["full_scans"]
        block = self.block(st, fs)
        if self.deterministic:  # the controlled run's report, in uksm run's shape
            from uksm.deterministic import report_of
            rep = report_of(m, o, {"inject": block})[0]
            return {**rep, "inject": block}
        # a Machine of this process: its report is build_report's (not a
        # daemon's DownReport, nor a controlled run's)
        assert m.report is not None and "duration_s" in m.report
        report: InjectReport = {**m.report, "inject": block}
        if stop():
            report["interrupted"] = stop.name
            report["status"] = interrupted_status(report["status"], stop.signo)
        report["workload"] = o.workload
        return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kills", type=int, default=20, help="kills to deliver (default 20)")
    p.add_argument("--signal", default="KILL", choices=SIGNALS,
                   help="KILL: vanish (the supervisor recovers); TERM: exit at the next safe point")
    p.add_argument("--point", default="random",
                   help="random, cursor, a kill point name, or all (cycle through every point); "
                        "see --list-points")
    p.add_argument("--list-points", action="store_true", help="list the kill points and exit")
    p.add_argument("--point-budget", type=float, default=POINT_BUDGET_S, metavar="S",
                   help="seconds to keep trying a point not reached before giving it up (counted "
                        "in the report's unreached): --point all goes on to the next point, a "
                        f"single point ends the kills (default {POINT_BUDGET_S:g})")
    p.add_argument("--workers", type=int, default=4,
                   help="workers kept alive: a replacement is spawned after each kill (default 4)")
    p.add_argument("--pages", type=int, default=256, help="pages each worker maps (default 256)")
    p.add_argument("--workload", default="vm",
                   help="what the workers write, as for 'uksm run --workload' (default vm)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the victims' choice and the workloads (default 0); with "
                        "--deterministic the schedule too: the whole run replays")
    p.add_argument("--deterministic", action="store_true",
                   help="run on a controlled schedule drawn from --seed: one process at a time, "
                        "every wait logical; the same seed gives the same run (the same counters, "
                        "exit paths and kills)"),
    p.add_argument("--churn-ms", type=int, default=5, help="worker activity period (default 5)")
    p.add_argument("--pages-to-scan", type=int, default=500, help="ksmd's pages_to_scan (default 500)")
    p.add_argument("--sleep-ms", type=int, default=5, help="ksmd's sleep_millisecs (default 5)")
    p.add_argument("--exit-policy", default="seed", choices=["seed", "shipped", "legacy"],
                   help="which __ksm_exit the workers run: the seed's fix (default), as shipped "
                        "in 2.6.32, or before it")
    p.add_argument("--hazard", action="append", default=[], choices=list(HAZARDS),
                   help="switch off one part of the fix (repeatable)")
    p.add_argument("--kernel", default="2.6.32", choices=KERNELS,
                   help="whose mm/ksm.c: 2.6.32 (default) or 6.18")
    p.add_argument("--hung-task-timeout", type=float, default=10.0,
                   help="seconds a task may wait for a lock before the watchdog reports it (default 10)")
    p.add_argument("--cluster", default="", help="the cluster's name (default inject<pid>)")
    p.add_argument("--log-dir", help="where every process writes its JSON log (default: a new "
                                     "folder in the temporary directory, printed at start)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def list_points() -> str:
    w = max(len(n) for n in killpoints.NAMES)
    return "\n".join(f"{n:<{w}}  {who:6}  {desc}" for n, (who, desc) in killpoints.POINTS.items())


def run(a: argparse.Namespace) -> int:
    if a.list_points:
        print(list_points())
        return 0
    if a.point not in ("random", "cursor", "all") and a.point not in killpoints.POINTS:
        raise UksmError(f"unknown --point {a.point!r}: random, cursor, all, or one of "
                        f"{', '.join(killpoints.NAMES)}", EXIT_USAGE)
    if a.point in killpoints.UNREACHABLE.get(a.exit_policy, ()):
        raise UksmError(f"--point {a.point}: never reached under --exit-policy {a.exit_policy} "
                        f"(its __ksm_exit has no slow path)", EXIT_USAGE)
    if killpoints.KERNEL_ONLY.get(a.point, a.kernel) != a.kernel:
        raise UksmError(f"--point {a.point}: only kernel {killpoints.KERNEL_ONLY[a.point]} passes it "
                        f"(--kernel {a.kernel})", EXIT_USAGE)
    if a.kills < 0:
        raise UksmError("--kills must be >= 0", EXIT_USAGE)
    if not a.point_budget > 0:
        raise UksmError("--point-budget must be > 0 seconds", EXIT_USAGE)
    o = RunOptions(workers=a.workers, pages=a.pages, workload=a.workload, seed=a.seed,
                   log_dir=a.log_dir, cluster=a.cluster, pages_to_scan=a.pages_to_scan,
                   sleep_ms=a.sleep_ms, exit_policy=a.exit_policy, hazards=a.hazard, kernel=a.kernel,
                   hung_task_timeout=a.hung_task_timeout, churn_ms=a.churn_ms,
                   quiet=a.quiet)
    validate(o)
    report = Injector(o, a.kills, a.signal, a.point, a.seed, a.deterministic, a.point_budget).run()
    status = report["status"]
    if status == 0 and not report["inject"]["live_fsck"]["ok"] and not report["interrupted"]:
        status = report["status"] = 4  # the running cluster failed fsck
    if a.json:
        print(json.dumps(report))
    else:
        from uksm.proc.run import print_report
        print_report(report)
        i = report.get("inject", {})
        print(f"  inject   {i.get('kills')} kills ({a.signal}, {a.point}); recoveries "
              f"{i.get('recoveries')} (locks {i.get('lock_recoveries')}); merges after the kills "
              f"{i.get('merges_after_kills')}")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uksm inject", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    try:
        return run(ap.parse_args(argv))
    except UksmError as e:
        print(f"uksm: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    raise SystemExit(main())
