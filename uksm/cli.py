"""The ``uksm`` command: one subcommand per job.

Errors a user can cause are one line on stderr and a status (2 for bad
usage), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import shm
from .layout import EXIT_POLICIES, HAZARDS

EPILOG = """exit status: 0 all good, 2 bad usage, 3 a hung task was detected,
4 an integrity or fsck failure, 1 anything else."""


def _run_args(p: argparse.ArgumentParser, defaults_for_run: bool = True) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    g.add_argument("--pages", type=int, default=1024, help="pages per worker (default 1024)")
    g.add_argument("--frames", type=int, default=0,
                   help="frame pool size (default: every page unmerged, plus 1/16 slack)")
    g.add_argument("--workload", default="vm",
                   help="identical, unique, zero, dup:K, volatile, vm (default vm: like VMs "
                        "booted from one image)")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    g.add_argument("--log-dir", help="an existing folder for the JSON logs "
                                    "(default: a new one under ./uksm-logs)")
    g.add_argument("--exit-policy", default="seed", choices=EXIT_POLICIES,
                   help="__ksm_exit as in the seed fix (default), 2.6.32 as shipped, or legacy "
                        "(before the fix: takes ksm_thread_mutex)")
    g.add_argument("--hazard", action="append", default=[], choices=list(HAZARDS),
                   help="switch off one part of the fix (repeatable)")
    g.add_argument("--hung-task-timeout", type=float, default=5.0,
                   help="seconds a task may block on one lock before it is reported (default 5)")
    g.add_argument("--churn-ms", type=int, default=0,
                   help="workers also refault, COW and re-advise a page every this many ms")
    k = p.add_argument_group("ksm (as /sys/kernel/mm/ksm)")
    k.add_argument("--run", type=int, default=1, help="0 stop, 1 merge (default), 2 unmerge all")
    k.add_argument("--pages-to-scan", type=int, default=100, help="pages per batch (default 100)")
    k.add_argument("--sleep-ms", type=int, default=20, help="sleep between batches (default 20)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="uksm",
        description="uksm: a userspace emulator of Linux KSM (mm/ksm.c). Worker processes live in "
                    "POSIX shared memory through an emulated MMU; ksmd merges their identical pages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("run", help="run a cluster in the foreground and print a report",
                       description="Boot a cluster, run workers (and ksmd), stop them, check, "
                                   "tear down and report. With no options: a small demonstration "
                                   "that ends by itself within a minute.", epilog=EPILOG)
    _run_args(p)
    p.add_argument("--cluster", default="", help="cluster name (default run<pid>)")
    p.add_argument("--duration", type=float, help="run this many seconds (default: until merged)")
    p.add_argument("--until-merged", action="store_true",
                   help="stop once the counters have not changed for two full scans (the default "
                        "when --duration is not given)")
    p.add_argument("--max-duration", type=float, default=60.0,
                   help="give up waiting for convergence after this many seconds (default 60)")
    p.add_argument("--scenario", choices=["oom-unmerge"],
                   help="oom-unmerge: merge, shrink memory to the merged state, run=2 (the seed's deadlock)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    p = sub.add_parser("cleanup", help="remove the POSIX objects a dead cluster left behind")
    p.add_argument("--cluster", help="only this cluster (default: every uksm cluster with no "
                                     "live supervisor)")
    p.add_argument("--force", action="store_true", help="also remove a cluster that looks alive")

    from .control import DEFAULT_CLUSTER
    p = sub.add_parser("fsck", help="check the invariants of a live cluster")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help=f"cluster name (default $UKSM_CLUSTER or {DEFAULT_CLUSTER!r})")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inject", help="fault injection: kill workers while ksmd scans them, then check",
                       description="Run a cluster and kill workers mid-scan (at random, at ksmd's "
                                   "cursor, or at a named kill point), respawning replacements; "
                                   "then stop, check and report.", epilog=EPILOG)
    from uksm.tools.inject import add_arguments
    add_arguments(p)

    from uksm.tools.campaign import add_parser as add_campaign
    add_campaign(sub)

    sub.add_parser("logs", help="analyse a run's logs: uksm logs DIR {summary,timeline,check,locks,plot}",
                   add_help=False)
    from . import control
    control.add_parsers(sub, _run_args)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "logs":
        from . import logs
        return logs.main(argv[1:])
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd is None:
        ap.print_help()
        return 2
    try:
        return dispatch(a)
    except shm.UksmError as e:
        print(f"uksm: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("uksm: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # uksm ... | head
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "cleanup":
        return cmd_cleanup(a)
    if a.cmd == "inject":
        from uksm.tools.inject import run as inject_run
        return inject_run(a)
    if a.cmd == "campaign":
        from uksm.tools.campaign import cmd_campaign
        return cmd_campaign(a)
    if a.cmd == "fsck":
        from . import control
        return control.cmd_fsck(a)
    from . import control
    return control.dispatch(a)


def cmd_run(a: argparse.Namespace) -> int:
    from .run import RunOptions, run_cluster
    o = RunOptions(workers=a.workers, pages=a.pages, frames=a.frames, workload=a.workload,
                   seed=a.seed, duration=a.duration, until_merged=a.until_merged,
                   max_duration=a.max_duration, log_dir=a.log_dir, cluster=a.cluster, run=a.run,
                   pages_to_scan=a.pages_to_scan, sleep_ms=a.sleep_ms, exit_policy=a.exit_policy,
                   hazards=a.hazard, hung_task_timeout=a.hung_task_timeout, scenario=a.scenario,
                   churn_ms=a.churn_ms, quiet=a.quiet)
    report, status = run_cluster(o)
    if a.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return status


def print_report(r: dict[str, Any]) -> None:
    k, fr, w = r["ksm"], r["frames"], r["workers"]
    mem = r["memory"]["host_bytes_resident"]
    total_pages = fr["total"]
    saved = k["pages_sharing"]
    print(f"cluster {r['cluster']}  workload {r['workload']}  {r['duration_s']:.1f}s  "
          f"exit policy {r['exit_policy']}")
    print(f"  ksm      run {k['run']}  full_scans {k['full_scans']}  pages_scanned {k['pages_scanned']}")
    print(f"           pages_shared {k['pages_shared']}  pages_sharing {k['pages_sharing']}  "
          f"pages_unshared {k['pages_unshared']}  pages_volatile {k['pages_volatile']}")
    print(f"  memory   frames used {fr['used']} of {total_pages}; pool resident "
          f"{mem / 2**20:.1f} MiB; saved by merging {saved} pages = {saved * 4096 / 2**20:.1f} MiB")
    noslot = w["exited"] - w["exit_fast"] - w["exit_slow"] - w.get("exit_legacy", 0)
    print(f"  workers  started {w['started']}  exited {w['exited']}  __ksm_exit: fast {w['exit_fast']}  "
          f"slow {w['exit_slow']}" + (f"  legacy {w['exit_legacy']}" if w.get("exit_legacy") else "")
          + (f"  no slot left {noslot} (ksmd freed it first)" if noslot > 0 else "")
          + f"  killed {w['killed']}  oom_killed {w['oom_killed']}")
    i = r["integrity"]
    print(f"  data     {i['pages_verified']} pages verified, {i['mismatches']} mismatches")
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


def cmd_cleanup(a: argparse.Namespace) -> int:
    from .cluster import pid_alive
    names = [a.cluster] if a.cluster else shm.clusters_present()
    if a.cluster:
        shm.check_cluster_name(a.cluster)
    removed_any = False
    for name in names:
        sup = supervisor_pid(name)
        if sup and pid_alive(sup) and not a.force:
            print(f"uksm: cluster {name!r} is alive (supervisor pid {sup}): 'uksm down --cluster "
                  f"{name}', or --force", file=sys.stderr)
            continue
        removed = shm.remove_all(name)
        removed_any = removed_any or bool(removed)
        for n in removed:
            print(f"removed /dev/shm/{n}")
    if not removed_any:
        print("nothing to remove")
    return 0


def supervisor_pid(name: str) -> int:
    """The recorded supervisor pid of a cluster, 0 if unreadable."""
    from .layout import H_MAGIC, H_SUPERVISOR_PID, MAGIC
    try:
        seg = shm.attach_segment(name, "ctl")
    except shm.UksmError:
        return 0
    try:
        return seg.q[H_SUPERVISOR_PID] if seg.q[H_MAGIC] == MAGIC else 0
    finally:
        seg.close()


if __name__ == "__main__":
    raise SystemExit(main())
