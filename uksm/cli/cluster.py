"""The commands against a running cluster: ``up``, ``down``, ``spawn``,
``kill``, ``ctl``, ``status``, ``top``, ``fsck`` (issue 7).

Each is a client of the cluster's daemon (``uksm.proc.control``): writes
are requests over its socket, reads come from the shared memory.

Exit status: 0 good, 1 no such cluster / dead cluster / the request failed,
2 bad usage (an invalid knob value is EINVAL: 2), 3 a hung task was found
(``down``), 4 fsck found errors (``fsck``, ``down``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from uksm.cli.args import cluster_arg
from uksm.cli.top import format_status, run_top
from uksm.host import pyexec, shm
from uksm.host.exitcodes import EPILOG, EXIT_ERR, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from uksm.proc import options
from uksm.proc.control import (
    NotUp,
    attach,
    call,
    ctl_names,
    ctl_values,
    missing_file,
    name_taken,
    not_running,
    read_state,
    request,
    validate_knob,
)

if TYPE_CHECKING:
    from uksm.proc.handlers import DownReport

# ---- argparse ----------------------------------------------------------------------------


def add_parsers(sub: Any, run_args: Callable[..., None]) -> None:
    """The subcommands of issue 7 (``uksm.cli.main`` calls this)."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("up", help="start a cluster in the background, driven by the other commands",
                       description="Start a cluster served by a detached supervisor (the daemon): "
                                   "it boots the shared memory and ksmd, starts --workers workers "
                                   "(default 0) and serves spawn, kill, ctl, fsck and down. Prints "
                                   "the cluster's name and log folder once it answers.",
                       epilog=EPILOG, formatter_class=fmt)
    cluster_arg(p)
    run_args(p)
    p.set_defaults(workers=0)
    up_help = {"workers": "workers to start with (default 0; 'uksm spawn' adds more)",
               "pages": "pages per worker, also spawn's default (default 1024)",
               "frames": "frame pool size (default: every page of max(--workers, 4) workers "
                         "unmerged, plus 1/16 slack)",
               "churn_ms": "workers also refault, COW and re-advise a page every this many ms "
                           "(also spawn's default)"}
    for act in p._actions:  # run's help, where up differs
        act.help = up_help.get(act.dest, act.help)
    p.add_argument("--max-workers", type=int, default=0,
                   help="address spaces the cluster has room for (default: max(--workers, 32))")
    p.add_argument("--max-pages", type=int, default=0,
                   help="largest address space 'spawn --pages' may ask for "
                        "(default: max(--pages, 1024))")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process (for a service manager) instead of detaching")
    p.add_argument("--json", action="store_true", help="print one JSON object once up")

    p = sub.add_parser("down", help="stop a cluster: workers exit, ksmd frees, fsck, teardown",
                       description="Workers exit through their exit paths, ksmd frees the slots "
                                   "left to it, ksmd stops, the final fsck runs, every POSIX "
                                   "object is removed, and the daemon exits. Status 4 if fsck "
                                   "found errors, 3 after a hung task, 1 if anything was left "
                                   "behind.", epilog=EPILOG, formatter_class=fmt)
    cluster_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    p = sub.add_parser("spawn", help="start workers in a running cluster",
                       description="Start workers (each its own address space); defaults are "
                                   "the ones the cluster was started with.", epilog=EPILOG)
    cluster_arg(p)
    p.add_argument("--pages", type=int, help="pages per worker (default: up's --pages)")
    p.add_argument("--workload", help="identical, unique, zero, dup:K, volatile, vm "
                                      "(default: up's --workload)")
    p.add_argument("--count", type=int, default=1, help="how many (default 1)")
    p.add_argument("--seed", type=int, help="workload seed (default: up's --seed)")
    p.add_argument("--churn-ms", type=int, help="churn period in ms (default: up's --churn-ms)")
    p.add_argument("--wait", action="store_true",
                   help="return once the new workers have written all their pages")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("kill", help="send a fatal signal to workers",
                       description="TERM: the worker runs its own exit path at its next safe "
                                   "point. KILL: no chance; the supervisor recovers its locks and "
                                   "runs the exit on its behalf. Returns once the exits are done.",
                       epilog=EPILOG)
    cluster_arg(p)
    p.add_argument("workers", nargs="*", metavar="WORKER", help="worker ids, e.g. w3")
    p.add_argument("--all", action="store_true", help="every worker")
    p.add_argument("--signal", default="TERM", type=str.upper, choices=["TERM", "KILL"],
                   help="TERM (default) or KILL")
    p.add_argument("--at", metavar="POINT",
                   help="one programmable task ('uksm task new'): drive it to this kill point "
                        "and signal it there (with --signal: KILL dies there holding what it "
                        "holds, TERM exits at its next safe point)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ctl", help="read or write the knobs, as /sys/kernel/mm/ksm",
                       description="With no argument: every knob and counter, 'name value' per "
                                   "line. KEY: one value. KEY=VALUE ...: write knobs (run 0/1/2 "
                                   "is written by a writer task running run_store, and returns when "
                                   "its write does (for 2: the unmerge done, or failed); "
                                   "pages_to_scan > 0; sleep_millisecs >= 0; max_kernel_pages KSM pages, "
                                   "0 = no limit; exit_policy "
                                   "seed|shipped|legacy; mem_limit frames, 0 = none). A cluster "
                                   "up with --kernel 6.18 has 6.18's files instead (no "
                                   "max_kernel_pages; max_page_sharing, merge_across_nodes, "
                                   "use_zero_pages, smart_scan, advisor_*, general_profit ...), each "
                                   "write refused as 6.18's store refuses it (EINVAL, ERANGE; EBUSY "
                                   "for max_page_sharing and merge_across_nodes while pages_shared "
                                   "is not 0).",
                       epilog=EPILOG, formatter_class=fmt)
    cluster_arg(p)
    p.add_argument("assign", nargs="*", metavar="KEY[=VALUE]")

    p = sub.add_parser("status", help="knobs, counters, memory and address spaces of a cluster")
    cluster_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("top", help="a live view of a cluster (q or Ctrl-C quits)")
    cluster_arg(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")


def dispatch(a: argparse.Namespace) -> int:
    cmds: dict[str, Callable[[argparse.Namespace], int]] = {
        "up": cmd_up, "down": cmd_down, "spawn": cmd_spawn, "kill": cmd_kill, "ctl": cmd_ctl,
        "status": cmd_status, "top": cmd_top, "fsck": cmd_fsck}
    fn = cmds.get(a.cmd)
    if fn is None:
        print(f"uksm: unknown command {a.cmd!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return fn(a)
    except BrokenPipeError:  # 'uksm status | head': the reader left, not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERR


# ---- up -----------------------------------------------------------------------------------

def up_spec(a: argparse.Namespace) -> dict[str, Any]:
    """Validate ``up``'s options (``uksm.proc.options``: status 2, nothing
    started) and return the spec the daemon boots from."""
    from uksm.proc.daemon import make_config
    from uksm.proc.run import check_cluster_options, check_frames, check_log_dir
    shm.check_cluster_name(a.cluster)
    check_cluster_options(a, min_workers=0)
    max_workers = a.max_workers or max(a.workers, 32)
    max_pages = a.max_pages or max(a.pages, 1024)
    options.cluster(options.CLI, max_tasks=max_workers, max_pages=max_pages)
    options.limits(options.CLI, max_workers, max_pages, a.workers, a.pages)
    base = max(a.workers, 4) * a.pages
    frames = a.frames or base + max(64, base // 16)
    check_frames(frames, a.workers * a.pages, a)
    log_dir = a.log_dir
    if log_dir is not None:
        check_log_dir(log_dir)
    spec = {"workers": a.workers, "pages": a.pages, "frames": frames, "workload": a.workload,
            "seed": a.seed, "log_dir": os.path.abspath(log_dir) if log_dir else None,
            "exit_policy": a.exit_policy, "oom_rule": a.oom_rule, "kernel": a.kernel,
            "hazards": list(a.hazard),
            "hung_task_timeout": a.hung_task_timeout, "churn_ms": a.churn_ms, "run": a.run,
            "pages_to_scan": a.pages_to_scan, "sleep_ms": a.sleep_ms,
            "max_workers": max_workers, "max_pages": max_pages}
    options.room(options.CLI, make_config(spec), max_pages)
    return spec


def name_in_use(name: str) -> shm.UksmError | None:
    """Why ``up --cluster name`` must not start (status 2), or None."""
    return name_taken(name, "another --cluster")


def _print_up(ans: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"cluster": ans["cluster"], "pid": ans["pid"], "log_dir": ans["log_dir"],
                          "workers": ans["workers"]}))
    else:
        print(f"cluster {ans['cluster']} up: daemon pid {ans['pid']}, ksmd pid {ans['ksmd_pid']}, "
              f"{len(ans['workers'])} workers")
        print(f"logs {ans['log_dir']}")


def cmd_up(a: argparse.Namespace) -> int:
    spec = up_spec(a)
    name = a.cluster
    err = name_in_use(name)
    if err is not None:
        raise err
    from uksm.proc.run import make_log_dir
    spec["log_dir"] = make_log_dir(name, spec["log_dir"])
    if a.foreground:
        from uksm.proc.daemon import run_daemon
        return run_daemon(name, spec, foreground=True,
                          on_ready=lambda ans: _print_up(ans, a.json))
    out_path = os.path.join(spec["log_dir"], "daemon.out")
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(pyexec.argv("uksm.proc.daemon", "--cluster", name,
                                            "--spec", json.dumps(spec)), env=pyexec.env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True, cwd="/")
    deadline = time.monotonic() + 60.0
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                msg = _last_error(out_path) or f"the daemon exited with status {rc}"
                print(msg if msg.startswith("uksm:") else f"uksm: {msg}", file=sys.stderr)
                print(f"uksm: see {out_path}", file=sys.stderr)
                return rc or EXIT_ERR
            try:
                ans = call(name, {"op": "ping"}, timeout=5)
                if ans.get("ok") and ans.get("pid") == proc.pid:
                    _print_up(ans, a.json)
                    return EXIT_OK
            except NotUp:
                pass
            except shm.UksmError:
                pass
            if time.monotonic() > deadline:
                proc.terminate()
                print(f"uksm: cluster {name!r} did not answer within 60s; stopped it "
                      f"(see {out_path})", file=sys.stderr)
                return EXIT_ERR
            time.sleep(0.05)
    except KeyboardInterrupt:
        proc.terminate()  # the daemon takes SIGTERM as 'down'
        raise


def _last_error(path: str) -> str:
    """The daemon's last line of output: why it did not come up."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("uksm:"):
            return ln
    return lines[-1] if lines else ""


# ---- down, spawn, kill, fsck ------------------------------------------------------------------

def cmd_down(a: argparse.Namespace) -> int:
    from uksm.kernel.cluster import pid_alive
    # the daemon's JSON answer (handlers.DownReport): typed as it, unchecked, at the socket
    ans = cast("DownReport", request(a.cluster, {"op": "down"}))
    pid = int(ans.get("pid", 0))
    end = time.monotonic() + 15.0
    while pid and pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    if pid and pid_alive(pid):
        ans.setdefault("errors", []).append(f"the daemon (pid {pid}) had not exited 15s after down")
        if ans["status"] == EXIT_OK:
            ans["status"] = EXIT_ERR
    if a.json:
        print(json.dumps(ans))
    else:
        print_down(ans)
    return int(ans["status"])


def print_down(r: DownReport) -> None:
    w = r["workers"]
    print(f"cluster {r['cluster']} down after {r['uptime_s']:.1f}s")
    print(f"  workers  {r['stopped']} stopped now; over the cluster's life: started "
          f"{w['started']}, exited {w['exited']} (ksm_exit fast {w['exit_fast']}, slow "
          f"{w['exit_slow']}, legacy {w['exit_legacy']}, no slot {w['exit_noslot']}), killed "
          f"{w['killed']}, oom_killed "
          f"{w['oom_killed']}, reaped {w['reaped']}")
    i = r["integrity"]
    print(f"  data     {i['pages_verified']} pages verified, {i['mismatches']} mismatches")
    fs = r["fsck"]
    print(f"  fsck     {'clean' if fs['ok'] else 'FAILED'}")
    for e in fs["errors"][:10]:
        print(f"           {e}")
    for h in r["hung_tasks"]:
        print(f"  HUNG     {h['role']} pid {h['pid']} blocked on {h['lock']} for {h['waited_s']}s")
        for line in h["chain"]:   # who holds what it waits for (as uksm run's report)
            print(f"           {line}")
    left = r["ipc_leftovers"]
    print(f"  leftover POSIX objects: {len(left)}{': ' + ' '.join(left[:8]) if left else ''}")
    for e in r.get("errors", []):
        print(f"  error    {e}")
    print(f"  logs     {r['log_dir']}")


def cmd_spawn(a: argparse.Namespace) -> int:
    req = {"op": "spawn", "pages": a.pages, "workload": a.workload, "count": a.count,
           "seed": a.seed, "churn_ms": a.churn_ms, "wait": a.wait, "by": options.CLI}
    # what does not depend on the cluster is refused before asking it (the
    # daemon checks the rest, with the same code): a stand-in for its defaults
    options.spawn(options.CLI, req, {"pages": 1, "workload": "vm", "seed": 0, "churn_ms": 0,
                                     "max_pages": options.MAX_PAGES})
    shm.check_cluster_name(a.cluster)
    try:
        ans = call(a.cluster, req)
    except NotUp:
        raise not_running(a.cluster)
    spawned = ans.get("spawned", [])
    if a.json:
        print(json.dumps(ans))
    else:
        for w in spawned:
            ready = "  ready" if w.get("ready") else ""
            print(f"{w['worker']}  pid {w['pid']}  mm{w['mm']}  {w['pages']} pages  "
                  f"{w['workload']}{ready}")
    if not ans.get("ok"):  # refused (nothing started), or a partial spawn (those printed run on)
        raise shm.UksmError(str(ans.get("error", "spawn failed")), int(ans.get("status", EXIT_ERR)))
    return EXIT_OK


def cmd_kill(a: argparse.Namespace) -> int:
    if a.all and a.workers:
        raise shm.UksmError("kill: give worker ids or --all, not both", EXIT_USAGE)
    if not a.all and not a.workers:
        raise shm.UksmError("kill: which workers? (ids like w3, or --all)", EXIT_USAGE)
    ans = request(a.cluster, {"op": "kill", "workers": a.workers, "all": a.all,
                              "signal": a.signal})
    if a.json:
        print(json.dumps(ans))
        return int(ans.get("status", EXIT_OK))
    if not ans["killed"]:
        print("no workers")
    for k in ans["killed"]:
        print(f"{k['worker']}  pid {k['pid']}  SIG{k['signal']}  -> {k['result']}")
    d = ans["exit_paths"]
    print(f"ksm_exit paths taken meanwhile: fast {d['exit_fast']}, slow {d['exit_slow']}, "
          f"legacy {d['exit_legacy']}; reaped by the supervisor {d['reaped']}")
    return int(ans.get("status", EXIT_OK))


def cmd_fsck(a: argparse.Namespace) -> int:
    name = a.cluster
    ans = request(name, {"op": "fsck"})
    if getattr(a, "json", False):
        print(json.dumps(ans))
    else:
        print(f"fsck {name}: {'clean' if ans['clean'] else 'FAILED'} ({ans['mms']} address spaces, "
              f"{ans['frames_used']} frames in use, {ans['ms']:.0f} ms with the world stopped)")
        for e in ans["errors"][:50]:
            print(f"  {e}")
        if ans.get("note"):
            print(f"  note: {ans['note']}")
    return EXIT_OK if ans["clean"] else EXIT_INTEGRITY


# ---- ctl ----------------------------------------------------------------------------------------

def cmd_ctl(a: argparse.Namespace) -> int:
    name = a.cluster
    shm.check_cluster_name(name)
    writes = [x for x in a.assign if "=" in x]
    reads = [x for x in a.assign if "=" not in x]
    if writes and reads:
        raise shm.UksmError("ctl: either KEY ... (read) or KEY=VALUE ... (write), not both", EXIT_USAGE)
    if writes:
        knobs: list[list[Any]] = []
        for w in writes:
            k, _, v = w.partition("=")
            knobs.append([k.strip(), v])
        cl = attach(name)  # its kernel's names and stores (the daemon checks again)
        try:
            for k, v in knobs:
                validate_knob(k, v, cl.nframes, cl=cl)  # refuse at once, before asking the cluster
        finally:
            cl.close()
        ans = request(name, {"op": "ctl", "knobs": knobs})
        for ap in ans["applied"]:
            extra = f"; run_store done in {ap['wait_s']:.2f}s" if "wait_s" in ap else ""
            print(f"{ap['name']} {ap['value']} (was {ap['previous']}{extra})")
        return EXIT_OK
    cl = attach(name)
    try:
        names = ctl_names(cl.modern)
        for k in reads:
            if k not in names:
                raise shm.UksmError(missing_file(k, cl.modern), EXIT_USAGE)
        vals = dict(ctl_values(read_state(cl)))
    finally:
        cl.close()
    for k in reads or list(names):
        print(f"{k} {vals[k]}")
    return EXIT_OK


# ---- status and top ------------------------------------------------------------------------------

def daemon_info(name: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The daemon's ping answer (its pid, hung tasks), None when there is no
    daemon (a 'uksm run' cluster) or it is busy serving a long request."""
    try:
        ans = call(name, {"op": "ping"}, timeout=timeout)
    except (NotUp, shm.UksmError, OSError):
        return None
    return ans if ans.get("ok") else None


def cmd_status(a: argparse.Namespace) -> int:
    cl = attach(a.cluster)
    try:
        st = read_state(cl)
    finally:
        cl.close()
    d = daemon_info(a.cluster)
    st["daemon"] = None if d is None else {"pid": d["pid"], "log_dir": d["log_dir"],
                                           "hung_tasks": d.get("hung_tasks", [])}
    if a.json:
        print(json.dumps(st))
    else:
        print("\n".join(format_status(st)))
        if d is None:
            print("daemon: not answering (busy with a request, or a 'uksm run' cluster)")
        else:
            print(f"daemon pid {d['pid']}  logs {d['log_dir']}")
            for h in d.get("hung_tasks", []):
                print(f"HUNG  {h['role']} pid {h['pid']} blocked on {h['lock']} for {h['waited_s']}s")
                for line in h.get("chain", []):
                    print(f"      {line}")
        if any(not m["owner_alive"] for m in st["mms"]):
            print("(PID-: the owner has exited; the address space waits for ksmd or its reaper)")
    return EXIT_OK


def cmd_top(a: argparse.Namespace) -> int:
    if not a.interval > 0:
        raise shm.UksmError(f"--interval must be positive (got {a.interval})", EXIT_USAGE)
    return run_top(a.cluster, a.interval)


__all__ = ["add_parsers", "dispatch", "cmd_fsck"]
