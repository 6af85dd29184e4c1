"""Fault injection: kill workers while ksmd scans them, and check that the
emulated kernel survives every kill with nothing lost.

``uksm inject`` (or ``python -m uksm.tools.inject``) boots a cluster whose
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
``inject`` block.  Deterministic from ``--seed`` (victims, instants,
points), up to the scheduler.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from typing import Any, Callable

from uksm import killpoints
from uksm.ksm import ksm_run_store
from uksm.layout import (HAZARDS, H_KSMD_POINT, K_FULL_SCANS, K_RUN_DONE, L_SCAN_SLOT,
                         M_ID, M_OWNER_PID, S_EXIT_FAST, S_EXIT_LEGACY, S_EXIT_SLOW,
                         S_LOCK_RECOVERIES, S_MERGES, S_RECOVERIES, S_REAPED,
                         T_READY)
from uksm.run import EXIT_USAGE, Progress, RunOptions, run_with
from uksm.shm import UksmError
from uksm.supervisor import Child, Supervisor

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
# worker points reached only while the worker exits: arm, then SIGTERM it
EXIT_POINTS = ("ksm_exit_before_down_write", "ksm_exit_mmap_sem_write", "exit_mid_zap")
SPAWN_POINTS = ("ksm_enter_locked",)


class Injector:
    def __init__(self, o: RunOptions, kills: int, sig: str, point: str, seed: int) -> None:
        self.o = o
        self.kills = kills
        self.signame = sig
        self.sig = SIGNALS[sig]
        self.point = point
        self.rng = random.Random(seed)
        self.delivered = 0
        self.by_point: dict[str, int] = {}
        self.missed = 0
        self.respawned = 0
        self.merges_at_last = 0
        self.scans_at_last = 0
        self.live: dict[str, Any] = {"ok": False, "errors": ["not run"]}

    # -- helpers ---------------------------------------------------------------
    def ready_workers(self, sup: Supervisor) -> list[Child]:
        q = sup.cl.q
        with sup.lock:
            kids = list(sup.children.values())
        return [c for c in kids if q[sup.cl.tbase(c.row) + T_READY] and c.proc.poll() is None]

    def top_up(self, sup: Supervisor) -> None:
        """Respawn replacements so that --workers stay alive and scanned."""
        while sup.workers_alive() < self.o.workers:
            sup.spawn_worker(self.o.pages, self.o.workload, self.o.seed, self.o.churn_ms)
            self.respawned += 1

    def wait(self, sup: Supervisor, pred: Callable[[], Any], timeout: float) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            sup.poll()
            sup.sweep()
            if sup.hung:
                return None
            v = pred()
            if v:
                return v
            time.sleep(0.005)
        return None

    def log_kill(self, sup: Supervisor, ch: Child | None, mode: str, pid: int = 0, mm: int = 0) -> None:
        sup.log.info("inject_kill", target_pid=ch.proc.pid if ch else pid, mm=ch.mm if ch else mm,
                     signal=self.signame, mode=mode)

    # -- one kill ----------------------------------------------------------------
    def send(self, sup: Supervisor, ch: Child, mode: str) -> bool:
        """Deliver the signal and wait until the supervisor has reaped the
        victim, so that every kill lands on a distinct live worker."""
        self.log_kill(sup, ch, mode)
        try:
            ch.proc.send_signal(self.sig)
        except ProcessLookupError:
            return False
        self.wait(sup, lambda: ch.row not in sup.children, 30)
        return True

    def kill_random(self, sup: Supervisor) -> bool:
        kids = self.ready_workers(sup)
        if not kids:
            return False
        ch = self.rng.choice(kids)
        time.sleep(self.rng.random() * 0.03)
        return self.send(sup, ch, "random")

    def kill_cursor(self, sup: Supervisor) -> bool:
        cl, q = sup.cl, sup.cl.q
        slot = q[L_SCAN_SLOT]
        if slot == cl.head:
            return False
        mm_id, pid = q[cl.mbase(slot) + M_ID], q[cl.mbase(slot) + M_OWNER_PID]
        with sup.lock:
            ch = next((c for c in sup.children.values() if c.mm == mm_id), None)
        if ch is None or ch.proc.poll() is not None or pid != ch.proc.pid:
            return False
        return self.send(sup, ch, "cursor")

    def kill_at_point(self, sup: Supervisor, name: str) -> bool:
        cl, q = sup.cl, sup.cl.q
        before = cl.kill_points_hit()
        if name in SPAWN_POINTS:
            ch = sup.spawn_worker(self.o.pages, self.o.workload, self.o.seed, self.o.churn_ms,
                                  kill_point=name, kill_sig=self.sig)
            self.respawned += 1
        elif name in killpoints.KSMD_POINTS:
            killpoints.arm_ksmd(cl, name, self.sig)
            if name in ("ksmd_break_cow", "ksmd_break_ksm_window"):  # reached breaking COW: run=2, then 1
                seq = ksm_run_store(cl, 2)
                self.wait(sup, lambda: q[K_RUN_DONE] >= seq, 30)
                ksm_run_store(cl, 1)
            ok = self.wait(sup, lambda: q[H_KSMD_POINT] == -1, 10)
            if not ok:
                q[H_KSMD_POINT] = -1
                return False
            self.log_kill(sup, None, "point")
            return True
        else:
            kids = self.ready_workers(sup)
            if not kids:
                return False
            ch = self.rng.choice(kids)
            killpoints.arm_worker(cl, ch.row, name, self.sig)
            if name in EXIT_POINTS:
                try:
                    ch.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    return False
        ok = self.wait(sup, lambda: cl.kill_points_hit() != before or ch.proc.poll() is not None, 10)
        if not ok or cl.kill_points_hit() == before:
            if ch.proc.poll() is None:
                killpoints.disarm_worker(cl, ch.row)
            return False
        self.log_kill(sup, ch, "point")
        self.wait(sup, lambda: ch.row not in sup.children, 30)
        return True

    # -- the drive loop ---------------------------------------------------------------
    def drive(self, sup: Supervisor, t0: float, progress: Progress,
              interrupted: Callable[[], bool]) -> tuple[bool, dict[str, Any]]:
        q = sup.cl.q
        if not self.wait(sup, lambda: sup.workers_ready() and q[K_FULL_SCANS] >= 2, 120):
            return bool(sup.hung), self.block(sup)
        points = killpoints.NAMES if self.point == "all" else [self.point]
        i = 0
        while self.delivered < self.kills and not interrupted():
            sup.poll()
            sup.sweep()
            if sup.hung:
                return True, self.block(sup)
            self.top_up(sup)
            mode = points[i % len(points)]
            if mode == "random":
                done = self.kill_random(sup)
            elif mode == "cursor":
                done = self.kill_cursor(sup)
            else:
                done = self.kill_at_point(sup, mode)
            if done:
                self.delivered += 1
                self.by_point[mode] = self.by_point.get(mode, 0) + 1
                i += 1
            else:
                self.missed += 1
                time.sleep(0.005)
            progress(sup, time.monotonic() - t0, f"[kills {self.delivered}/{self.kills}] ")
        self.merges_at_last = q[S_MERGES]
        self.scans_at_last = q[K_FULL_SCANS]
        self.top_up(sup)
        # ksmd still merging: new work merged after the last kill
        self.wait(sup, lambda: q[S_MERGES] > self.merges_at_last
                  and q[K_FULL_SCANS] >= self.scans_at_last + 2 and sup.workers_ready(), 60)
        # no exit in flight (a reaper finishing a killed worker's), then fsck
        # the running cluster, counters included
        self.wait(sup, sup.settled, 60)
        if not sup.hung:
            self.live = sup.live_fsck()
        return bool(sup.hung), self.block(sup)

    def block(self, sup: Supervisor) -> dict[str, Any]:
        q = sup.cl.q
        return {"inject": lambda: {
            "kills": self.delivered, "requested": self.kills, "signal": self.signame,
            "mode": self.point, "by_signal": {self.signame: self.delivered},
            "by_point": dict(self.by_point), "missed_attempts": self.missed,
            "kill_points_hit": sup.cl.kill_points_hit(), "respawned": self.respawned,
            "exits": {"fast": q[S_EXIT_FAST], "slow": q[S_EXIT_SLOW], "legacy": q[S_EXIT_LEGACY],
                      "reaped": q[S_REAPED]},
            "lock_recoveries": q[S_LOCK_RECOVERIES], "recoveries": q[S_RECOVERIES],
            "merges_after_kills": q[S_MERGES] - self.merges_at_last,
            "live_fsck": self.live,
            "full_scans_after_kills": q[K_FULL_SCANS] - self.scans_at_last}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kills", type=int, default=20, help="kills to deliver (default 20)")
    p.add_argument("--signal", default="KILL", choices=list(SIGNALS),
                   help="KILL: vanish (the supervisor recovers); TERM: exit at the next safe point")
    p.add_argument("--point", default="random",
                   help="random, cursor, a kill point name, or all (cycle through every point); "
                        "see --list-points")
    p.add_argument("--list-points", action="store_true", help="list the kill points and exit")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--workload", default="vm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--churn-ms", type=int, default=5, help="worker activity period (default 5)")
    p.add_argument("--pages-to-scan", type=int, default=500)
    p.add_argument("--sleep-ms", type=int, default=5)
    p.add_argument("--exit-policy", default="seed", choices=["seed", "shipped", "legacy"])
    p.add_argument("--hazard", action="append", default=[], choices=list(HAZARDS),
                   help="switch off one part of the fix (repeatable)")
    p.add_argument("--hung-task-timeout", type=float, default=10.0)
    p.add_argument("--cluster", default="")
    p.add_argument("--log-dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")


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
    if a.kills < 0:
        raise UksmError("--kills must be >= 0", EXIT_USAGE)
    o = RunOptions(workers=a.workers, pages=a.pages, workload=a.workload, seed=a.seed,
                   log_dir=a.log_dir, cluster=a.cluster, pages_to_scan=a.pages_to_scan,
                   sleep_ms=a.sleep_ms, exit_policy=a.exit_policy, hazards=a.hazard,
                   hung_task_timeout=a.hung_task_timeout, churn_ms=a.churn_ms,
                   quiet=a.quiet)
    inj = Injector(o, a.kills, a.signal, a.point, a.seed)
    report, status = run_with(o, inj.drive, prefix="inject")
    if status == 0 and not report["inject"]["live_fsck"]["ok"]:
        status = report["status"] = 4  # the running cluster failed fsck
    if a.json:
        print(json.dumps(report))
    else:
        from uksm.cli import print_report
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
