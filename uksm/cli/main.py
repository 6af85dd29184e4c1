"""The ``uksm`` command: one subcommand per job.

Errors a user can cause are one line on stderr and a status (2 for bad
usage), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from uksm.cli.args import OneLineParser, cluster_arg
from uksm.host import shm
from uksm.host.exitcodes import EPILOG, signalled
from uksm.host.lifeline import SecondSignal
from uksm.kernel.layout import EXIT_POLICIES, HAZARDS, KERNELS, OOM_RULES

STOP_HELP = ("SIGTERM, SIGHUP or SIGINT stops it in order (workers exit, ksmd frees, fsck, "
             "teardown; the report says 'interrupted', status 128+N); a second one kills every "
             "process at once and still removes every object. Its ksmd and workers die with it, "
             "whatever kills it.")


def _run_args(p: argparse.ArgumentParser, defaults_for_run: bool = True) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    g.add_argument("--pages", type=int, default=1024, help="pages per worker (default 1024)")
    g.add_argument("--frames", type=int, default=0,
                   help="frame pool size (default: every page unmerged, plus 1/16 slack)")
    g.add_argument("--workload", default="vm",
                   help="identical, unique, zero, dup:K, volatile, vm (default vm: like VMs "
                        "booted from one image); any of them +fork or +fork:MS (vm+fork:200): "
                        "each worker also forks a child every MS ms (default 1000), which "
                        "lives two periods")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    g.add_argument("--log-dir", help="an existing folder for the JSON logs "
                                    "(default: a new one under ./uksm-logs)")
    g.add_argument("--exit-policy", default="seed", choices=EXIT_POLICIES,
                   help="__ksm_exit as in the seed fix (default), 2.6.32 as shipped, or legacy "
                        "(before the fix: takes ksm_thread_mutex)")
    g.add_argument("--oom-rule", default="2.6.32", choices=OOM_RULES,
                   help="the OOM killer's victim choice: 2.6.32 (default: a task whose mm is "
                        "released, e.g. stuck in __ksm_exit, is passed over and another killed) "
                        "or 4.1 (a victim not yet exited blocks every further kill)")
    g.add_argument("--kernel", default="2.6.32", choices=KERNELS,
                   help="whose mm/ksm.c to emulate: 2.6.32 (default) or 6.18 (its sysfs knobs and "
                        "counters, /proc/PID/ksm_stat, prctl PR_SET_MEMORY_MERGE; docs/KERNEL-MAP.md)")
    g.add_argument("--hazard", action="append", default=[], choices=list(HAZARDS),
                   help="switch off one part of the fix (repeatable)")
    g.add_argument("--hung-task-timeout", type=float, default=5.0,
                   help="seconds a task may block on one lock before it is reported (default 5)")
    g.add_argument("--churn-ms", type=int, default=0,
                   help="workers also refault, COW and re-advise a page every this many ms")
    _trace_locks_arg(g)
    k = p.add_argument_group("ksm (as /sys/kernel/mm/ksm)")
    k.add_argument("--run", type=int, default=1, help="0 stop, 1 merge (default), 2 unmerge all")
    k.add_argument("--pages-to-scan", type=int, default=100, help="pages per batch (default 100)")
    k.add_argument("--sleep-ms", type=int, default=20, help="sleep between batches (default 20)")


def _trace_locks_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--trace-locks", action="store_true",
                   help="log every lock taken and released (lock_acquire, lock_release: the "
                        "lock slices of 'uksm logs DIR trace'); slower, the log much bigger")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``only="run"``: the top level and ``run``
    alone -- what ``uksm run ...`` parses with: the other commands' parsers
    import their modules (inject, campaign, the cluster and task verbs,
    the API: 20-35 ms), which a run would pay before it boots anything."""
    ap = OneLineParser(
        prog="uksm",
        description="uksm: a userspace emulator of Linux KSM (mm/ksm.c). Worker processes live in "
                    "POSIX shared memory through an emulated MMU; ksmd merges their identical pages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("run", help="run a cluster in the foreground and print a report",
                       description="Boot a cluster, run workers (and ksmd), stop them, check, "
                                   "tear down and report. With no options: a small demonstration "
                                   "that ends by itself within a minute. " + STOP_HELP, epilog=EPILOG)
    _run_args(p)
    p.add_argument("--cluster", default="", help="cluster name (default run<pid>)")
    p.add_argument("--duration", type=float,
                   help="run this many seconds (default: until merged); with --until-merged, "
                        "at most this many: whichever comes first")
    p.add_argument("--until-merged", action="store_true",
                   help="stop once nothing is left to merge: a full scan after every worker "
                        "wrote its pages found every page in the stable tree, or the counters "
                        "did not change for two full scans (the default when --duration is not "
                        "given; --duration caps it)")
    p.add_argument("--max-duration", type=float, default=60.0,
                   help="without --duration: give up waiting for convergence after this many "
                        "seconds (default 60)")
    p.add_argument("--scenario", choices=["oom-unmerge"],
                   help="oom-unmerge: merge, shrink memory to the merged state, run=2 (the seed's deadlock)")
    p.add_argument("--deterministic", action="store_true",
                   help="run on a controlled schedule drawn from --seed: one process at a time, "
                        "every choice (the workloads, the churn, the interleaving) from the seed, "
                        "time logical (ksmd's sleeps, the churn, --duration are steps of the run's "
                        "clock): the same seed replays the same run, and the report gives the "
                        "schedule string (docs/EXPLORE.md)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    if only == "run":
        return ap

    p = sub.add_parser("cleanup", help="end a dead cluster's processes, remove its POSIX objects",
                       description="For a cluster whose supervisor is dead: end its ksmd and "
                                   "workers still alive (found in its task table, each checked "
                                   "against its command line, so a reused pid is never hit), then "
                                   "remove every object it left in /dev/shm. A live cluster is "
                                   "refused (status 1; 'uksm down' or stop its 'uksm run') unless "
                                   "--force; another user's cluster is always refused.",
                       epilog=EPILOG)
    p.add_argument("--cluster", help="only this cluster (default: every uksm cluster with no "
                                     "live supervisor)")
    p.add_argument("--force", action="store_true",
                   help="a live cluster too: SIGKILL its supervisor (no orderly shutdown, no "
                        "report), its ksmd and workers, then remove its objects")

    p = sub.add_parser("fsck", help="check the invariants of a live cluster")
    cluster_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inject", help="fault injection: kill workers while ksmd scans them, then check",
                       description="Run a cluster and kill workers mid-scan (at random, at ksmd's "
                                   "cursor, or at a named kill point), respawning replacements; "
                                   "then stop, check and report. " + STOP_HELP, epilog=EPILOG)
    from uksm.faults.inject import add_arguments
    add_arguments(p)
    _trace_locks_arg(p)

    from uksm.faults.campaign import add_parser as add_campaign
    add_campaign(sub)
    camp = sub.choices["campaign"]
    camp.epilog = (camp.epilog or "") + ("  Its results as a picture: uksm campaign report OUT "
                                         "-o FILE.png (--help).")
    from uksm.cli.explore import add_parser as add_explore
    add_explore(sub)

    sub.add_parser("logs", help="analyse a run's logs: uksm logs DIR "
                                "{summary,timeline,check,locks,trace,plot}",
                   add_help=False)
    from uksm.cli import cluster as cluster_cmds
    from uksm.cli import task as task_cli
    cluster_cmds.add_parsers(sub, _run_args)
    task_cli.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "logs":
        from uksm.cli import logs as logs_cli
        return logs_cli.main(argv[1:])
    if argv[:2] == ["campaign", "report"]:
        from uksm.cli.pictures import campaign_report_main
        return campaign_report_main(argv[2:])
    ap = build_parser("run" if argv and argv[0] == "run" else None)
    a = ap.parse_args(argv)
    if a.cmd is None:
        ap.print_help()
        return 2
    if getattr(a, "trace_locks", False):
        os.environ["UKSM_LOCKTRACE"] = "1"  # every process of the cluster inherits it (locktrace)
    try:
        return dispatch(a)
    except shm.UksmError as e:
        print(f"uksm: {e}", file=sys.stderr)
        return e.status
    except SecondSignal as e:  # uksm run/inject: killed at once, every object removed
        print(f"uksm: {e}: a second stop signal: every process of the cluster killed, its "
              f"objects removed, no report", file=sys.stderr)
        return signalled(e.signo)
    except KeyboardInterrupt:
        print("uksm: interrupted", file=sys.stderr)
        return signalled(signal.SIGINT)
    except BrokenPipeError:  # uksm ... | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "cleanup":
        return cmd_cleanup(a)
    if a.cmd == "inject":
        from uksm.faults.inject import run as inject_run
        return inject_run(a)
    if a.cmd == "campaign":
        from uksm.faults.campaign import cmd_campaign
        return cmd_campaign(a)
    if a.cmd == "explore":
        from uksm.cli.explore import cmd_explore
        return cmd_explore(a)
    if a.cmd == "fsck":
        from uksm.cli import cluster as cluster_cmds
        return cluster_cmds.cmd_fsck(a)
    if a.cmd in ("task", "wait") or (a.cmd == "kill" and getattr(a, "at", None)):
        from uksm.cli import task as task_cli
        return task_cli.run_verb(a)
    from uksm.cli import cluster as cluster_cmds
    return cluster_cmds.dispatch(a)


def cmd_run(a: argparse.Namespace) -> int:
    from uksm.proc.run import RunOptions, print_report, run_cluster
    o = RunOptions(workers=a.workers, pages=a.pages, frames=a.frames, workload=a.workload,
                   seed=a.seed, duration=a.duration, until_merged=a.until_merged,
                   max_duration=a.max_duration, log_dir=a.log_dir, cluster=a.cluster, run=a.run,
                   pages_to_scan=a.pages_to_scan, sleep_ms=a.sleep_ms, exit_policy=a.exit_policy,
                   oom_rule=a.oom_rule, kernel=a.kernel, hazards=a.hazard, hung_task_timeout=a.hung_task_timeout,
                   scenario=a.scenario,
                   churn_ms=a.churn_ms, quiet=a.quiet)
    if a.deterministic:
        from uksm.deterministic import run as run_deterministic
        report, status = run_deterministic(o)
    else:
        report, status = run_cluster(o)
    if a.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return status


def cmd_cleanup(a: argparse.Namespace) -> int:
    """End a dead cluster's processes, then remove its objects (uksm.proc.cleanup)."""
    from uksm.proc.cleanup import cleanup
    if a.cluster:
        shm.check_cluster_name(a.cluster)
    names = [a.cluster] if a.cluster else shm.clusters_present()
    removed_any, status = False, 0
    for name in names:
        if not a.cluster and shm.owner(name) not in (None, os.geteuid()) and os.geteuid() != 0:
            continue  # every cluster: every cluster of ours
        removed, ended, refused = cleanup(name, a.force)
        if ended:
            print(f"ended cluster {name}'s processes: {' '.join(map(str, ended))}")
        if refused:
            print(f"uksm: {refused}", file=sys.stderr)
            status = 1
        removed_any = removed_any or bool(removed)
        for n in removed:
            print(f"removed /dev/shm/{n}")
    if not removed_any and not status:
        print("nothing to remove")
    return status




if __name__ == "__main__":
    raise SystemExit(main())
