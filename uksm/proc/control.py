"""Commands against a running cluster: ``up``, ``down``, ``spawn``, ``kill``,
``ctl``, ``status``, ``top``, ``fsck`` (issue 7).

A cluster started by ``uksm up`` is served by a detached supervisor process,
the *daemon* (``uksm.proc.daemon``).  The commands here are its clients:

- writes (spawn, kill, ctl KEY=VALUE, fsck, down) are requests over the
  daemon's control channel: a UNIX stream socket in the abstract namespace,
  ``"\\0uksm-<cluster>"`` (nothing on disk to leak), one JSON object per line,
  one request per connection.  The daemon serves them one at a time in its
  main thread, so two commands racing see each other's effects whole;
- reads (status, top, ctl with no assignment) come straight from the
  cluster's shared memory (``Cluster.attach``), as reading
  /sys/kernel/mm/ksm does not go through ksmd.

Exit status: 0 good, 1 no such cluster / dead cluster / the request failed,
2 bad usage (an invalid knob value is EINVAL: 2), 3 a hung task was found
(``down``), 4 fsck found errors (``fsck``, ``down``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import posix_ipc

from uksm.host import shm
from uksm.kernel.layout import (CS_RUNNING, CS_STARTING, CS_STOPPED, CS_STOPPING, EXIT_PATHS, EXIT_POLICIES,
                     H_CREATED_NS, H_EXIT_POLICY, H_HAZARDS, H_KSMD_PID, H_MAGIC, H_MEM_LIMIT,
                     H_STATE, H_SUPERVISOR_PID, HAZARDS, K_FULL_SCANS, K_PAGES_SCANNED,
                     K_PAGES_SHARED, K_PAGES_SHARING, K_PAGES_TO_SCAN, K_PAGES_UNSHARED,
                     K_PAGES_VOLATILE, K_RMAP_ITEMS, K_RUN, K_RUN_DONE, K_RUN_SEQ, K_SLEEP_MS,
                     K_STABLE_NODES, MAGIC, MM_STATES, PAGE_SIZE, STATS_NAMES)

from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE  # noqa: F401
#: the cluster a command acts on without --cluster: $UKSM_CLUSTER, else "default"
DEFAULT_CLUSTER = os.environ.get("UKSM_CLUSTER") or "default"
CLUSTER_STATES = {CS_STARTING: "starting", CS_RUNNING: "running", CS_STOPPING: "stopping",
                  CS_STOPPED: "stopped"}

# seconds a client waits for the daemon's answer (every daemon-side wait is
# bounded well below this: the longest, down, is about 2 minutes at worst)
REQUEST_TIMEOUT = 300.0

# ---- the /sys/kernel/mm/ksm block ------------------------------------------------

#: counters and knobs in /sys/kernel/mm/ksm order (``uksm ctl`` prints these)
KSM_FIELDS: tuple[tuple[str, int], ...] = (
    ("run", K_RUN), ("pages_to_scan", K_PAGES_TO_SCAN), ("sleep_millisecs", K_SLEEP_MS),
    ("pages_shared", K_PAGES_SHARED), ("pages_sharing", K_PAGES_SHARING),
    ("pages_unshared", K_PAGES_UNSHARED), ("pages_volatile", K_PAGES_VOLATILE),
    ("full_scans", K_FULL_SCANS), ("pages_scanned", K_PAGES_SCANNED),
)
#: every name ``uksm ctl`` prints, in order
CTL_NAMES: tuple[str, ...] = tuple(n for n, _ in KSM_FIELDS) + (
    "exit_policy", "mem_limit", "frames_total", "frames_used", "frames_free")
#: the names ``uksm ctl KEY=VALUE`` may write
WRITABLE: tuple[str, ...] = ("run", "pages_to_scan", "sleep_millisecs", "exit_policy", "mem_limit")
UINT_MAX = (1 << 31) - 1


class KnobError(shm.UksmError):
    """A knob write refused as the kernel would refuse it (status 2)."""

    def __init__(self, name: str, why: str, errno_name: str = "EINVAL") -> None:
        text = {"EINVAL": "invalid argument", "EACCES": "permission denied"}[errno_name]
        super().__init__(f"{name}: {text} ({errno_name}): {why}", EXIT_USAGE)


def _whole(name: str, raw: Any, lo: int, why: str) -> int:
    """strict_strtoul: a decimal whole number (a trailing newline is fine)."""
    s = str(raw).strip()
    if not s.isdigit():
        raise KnobError(name, why)
    v = int(s, 10)
    if v < lo or v > UINT_MAX:
        raise KnobError(name, why)
    return v


def validate_knob(name: str, raw: Any, nframes: int | None = None) -> int | str:
    """The value ``name=raw`` writes, or KnobError (EINVAL, EACCES) with the
    kernel's reasoning.  ``nframes``: the pool size, when known (mem_limit)."""
    if name == "run":
        s = str(raw).strip()
        if s not in ("0", "1", "2"):
            raise KnobError(name, "must be 0, 1 or 2")
        return int(s)
    if name == "pages_to_scan":
        return _whole(name, raw, 1, "must be a whole number greater than 0")
    if name == "sleep_millisecs":
        return _whole(name, raw, 0, "must be a whole number of milliseconds >= 0")
    if name == "exit_policy":
        s = str(raw).strip()
        if s not in EXIT_POLICIES:
            raise KnobError(name, f"must be one of {', '.join(EXIT_POLICIES)}")
        return s
    if name == "mem_limit":
        v = _whole(name, raw, 0, "must be a whole number of frames >= 0 (0: no limit)")
        if nframes is not None and v > nframes:
            raise KnobError(name, f"must be at most {nframes} (the frames in the pool; 0: no limit)")
        return v
    if name in CTL_NAMES:
        raise KnobError(name, "a read-only counter", "EACCES")
    raise shm.UksmError(f"{name}: no such knob (writable: {', '.join(WRITABLE)}; "
                        f"'uksm ctl' lists them all)", EXIT_USAGE)


# ---- reading a cluster's state straight from shared memory -------------------------

def read_state(cl: Any) -> dict[str, Any]:
    """Knobs, counters, frames, host memory and one row per address space,
    read from the shared memory without any lock (a torn read between two
    fields is possible, as between two files of /sys/kernel/mm/ksm)."""
    from uksm.kernel.cluster import pid_alive
    from uksm.kernel.memory import frame_stats
    from uksm.kernel.mm import live_mm_rows, mm_fields
    q = cl.q
    sup_pid, ksmd_pid = q[H_SUPERVISOR_PID], q[H_KSMD_PID]
    mms: list[dict[str, Any]] = []
    for r in live_mm_rows(cl):
        f = mm_fields(cl, r)
        st = f["state"]
        mms.append({
            "worker": f"w{f['worker_no']}", "mm": f["id"], "owner_pid": f["owner_pid"],
            "owner_alive": pid_alive(f["owner_pid"]),
            "state": MM_STATES[st] if 0 <= st < len(MM_STATES) else str(st),
            "pages": f["pages"], "rss": f["rss"], "ksm_rmap_items": f["ksm_rmap_items"],
            "ksm_merging_pages": f["ksm_merging_pages"], "mm_users": f["mm_users"],
            "mm_count": f["mm_count"],
            "exit_path": EXIT_PATHS[f["exit_path"]] if 0 <= f["exit_path"] < len(EXIT_PATHS) else "?",
        })
    mms.sort(key=lambda m: m["mm"])
    pol = q[H_EXIT_POLICY]
    return {
        "cluster": cl.name,
        "state": CLUSTER_STATES.get(q[H_STATE], str(q[H_STATE])),
        "supervisor_pid": sup_pid, "supervisor_alive": pid_alive(sup_pid),
        "ksmd_pid": ksmd_pid, "ksmd_alive": pid_alive(ksmd_pid),
        "uptime_s": round(max(0, time.time_ns() - q[H_CREATED_NS]) / 1e9, 3),
        "ksm": {n: q[i] for n, i in KSM_FIELDS},
        "ksm_internal": {"rmap_items": q[K_RMAP_ITEMS], "stable_nodes": q[K_STABLE_NODES],
                         "run_seq": q[K_RUN_SEQ], "run_done": q[K_RUN_DONE]},
        "exit_policy": EXIT_POLICIES[pol] if 0 <= pol < len(EXIT_POLICIES) else str(pol),
        "hazards": [h for h, bit in HAZARDS.items() if q[H_HAZARDS] & bit],
        "mem_limit": q[H_MEM_LIMIT],
        "frames": frame_stats(cl),
        "memory": {"host_bytes_resident": cl.pool.resident_bytes()},
        "workers": {n: q[i] for n, i in STATS_NAMES.items()},
        "mms": mms,
    }


def ctl_values(st: dict[str, Any]) -> list[tuple[str, Any]]:
    """``uksm ctl``'s ``name value`` pairs from a read_state()."""
    fr = st["frames"]
    return [*st["ksm"].items(), ("exit_policy", st["exit_policy"]), ("mem_limit", st["mem_limit"]),
            ("frames_total", fr["total"]), ("frames_used", fr["used"]), ("frames_free", fr["free"])]


# ---- finding a cluster ---------------------------------------------------------------

def sock_address(name: str) -> str:
    """The daemon's control socket: abstract namespace, nothing on disk."""
    return "\0uksm-" + name


def recorded_supervisor(name: str) -> int:
    """The supervisor pid the cluster's header records (0: none readable)."""
    try:
        seg = shm.attach_segment(name, "ctl")
    except (shm.UksmError, OSError, ValueError):
        return 0
    try:
        return seg.q[H_SUPERVISOR_PID] if len(seg.q) > H_MAGIC and seg.q[H_MAGIC] == MAGIC else 0
    finally:
        seg.close()


def not_running(name: str) -> shm.UksmError:
    """The plain explanation when no daemon answers for ``name`` (status 1)."""
    from uksm.kernel.cluster import pid_alive
    left = shm.leftovers(name)
    if not left:
        return shm.UksmError(f"cluster {name!r} does not exist (no daemon answers, nothing of it in "
                             f"/dev/shm): 'uksm up --cluster {name}' starts one; if it died, "
                             f"'uksm cleanup --cluster {name}' removes what it left", EXIT_ERR)
    sup = recorded_supervisor(name)
    if sup and pid_alive(sup):
        return shm.UksmError(f"cluster {name!r} is alive (supervisor pid {sup}) but has no control "
                             f"daemon: it was started by 'uksm run', which cannot be driven from "
                             f"here (status and top still read it)", EXIT_ERR)
    who = f"supervisor pid {sup} is gone" if sup else "no supervisor recorded"
    return shm.UksmError(f"cluster {name!r} is dead ({who}; {len(left)} POSIX objects left in "
                         f"/dev/shm): 'uksm cleanup --cluster {name}' removes them", EXIT_ERR)


class NotUp(Exception):
    """Nobody listens on the cluster's control socket."""


def call(name: str, req: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """One request, one answer.  NotUp if no daemon listens; UksmError if
    the daemon closed the connection without answering."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_address(name))
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise NotUp(str(e))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise shm.UksmError(f"cluster {name!r}: no answer to {req.get('op')!r} within {timeout:.0f}s "
                            f"(the daemon is busy or stuck; its log folder says more)", EXIT_ERR)
    except (ConnectionResetError, BrokenPipeError):
        buf = b""
    finally:
        s.close()
    if not buf.strip():
        raise shm.UksmError(f"cluster {name!r} closed the connection without answering "
                            f"(it is going down, or its daemon died)", EXIT_ERR)
    try:
        ans = json.loads(buf)
    except json.JSONDecodeError:
        raise shm.UksmError(f"cluster {name!r}: unreadable answer from the daemon", EXIT_ERR)
    if not isinstance(ans, dict):
        raise shm.UksmError(f"cluster {name!r}: unreadable answer from the daemon", EXIT_ERR)
    return ans


def request(name: str, req: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """call() with the plain explanations: a cluster that does not exist or
    died, or a refused request (its message and status)."""
    shm.check_cluster_name(name)
    try:
        ans = call(name, req, timeout)
    except NotUp:
        raise not_running(name)
    if not ans.get("ok"):
        raise shm.UksmError(str(ans.get("error", "request failed")), int(ans.get("status", EXIT_ERR)))
    return ans


def attach(name: str) -> Any:
    """Cluster.attach for reading, with the plain explanations."""
    from uksm.kernel.cluster import Cluster, pid_alive
    shm.check_cluster_name(name)
    if not shm.leftovers(name):
        raise not_running(name)
    if shm.owner(name) not in (None, os.geteuid()) and os.geteuid() != 0:
        raise shm.not_yours(name)  # its objects are 0600: say so, not "dead"
    sup = recorded_supervisor(name)
    if not sup or not pid_alive(sup):
        raise not_running(name)
    try:
        return Cluster.attach(name)
    except shm.UksmError:
        raise not_running(name)
    except (OSError, posix_ipc.Error) as e:  # unlinked under us: going down
        raise shm.UksmError(f"cluster {name!r} is going down ({e})", EXIT_ERR)


# ---- argparse ----------------------------------------------------------------------------

def _cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help=f"cluster name (default: $UKSM_CLUSTER, else 'default'; now "
                        f"{DEFAULT_CLUSTER!r})")


def add_parsers(sub: Any, run_args: Callable[..., None]) -> None:
    """The subcommands of issue 7 (``uksm.cli.main`` calls this)."""
    from uksm.cli.main import EPILOG
    fmt = argparse.RawDescriptionHelpFormatter
    fsck = getattr(sub, "choices", {}).get("fsck")
    if fsck is not None:  # cli.py's own 'fsck' parser: the same default cluster as ours
        fsck.set_defaults(cluster=DEFAULT_CLUSTER)

    p = sub.add_parser("up", help="start a cluster in the background, driven by the other commands",
                       description="Start a cluster served by a detached supervisor (the daemon): "
                                   "it boots the shared memory and ksmd, starts --workers workers "
                                   "(default 0) and serves spawn, kill, ctl, fsck and down. Prints "
                                   "the cluster's name and log folder once it answers.",
                       epilog=EPILOG, formatter_class=fmt)
    _cluster_arg(p)
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
    _cluster_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    p = sub.add_parser("spawn", help="start workers in a running cluster",
                       description="Start workers (each its own address space); defaults are "
                                   "the ones the cluster was started with.", epilog=EPILOG)
    _cluster_arg(p)
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
    _cluster_arg(p)
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
                                   "pages_to_scan > 0; sleep_millisecs >= 0; exit_policy "
                                   "seed|shipped|legacy; mem_limit frames, 0 = none).",
                       epilog=EPILOG, formatter_class=fmt)
    _cluster_arg(p)
    p.add_argument("assign", nargs="*", metavar="KEY[=VALUE]")

    p = sub.add_parser("status", help="knobs, counters, memory and address spaces of a cluster")
    _cluster_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("top", help="a live view of a cluster (q or Ctrl-C quits)")
    _cluster_arg(p)
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
    """Validate ``up``'s options (status 2, nothing started) and return the
    spec the daemon boots from."""
    from uksm.proc.run import check_cluster_options, check_frames, check_log_dir, usage_error as bad
    shm.check_cluster_name(a.cluster)
    check_cluster_options(a, min_workers=0)
    max_workers = a.max_workers or max(a.workers, 32)
    max_pages = a.max_pages or max(a.pages, 1024)
    if max_workers < max(a.workers, 1):
        bad(f"--max-workers {max_workers} is less than --workers {a.workers}")
    if max_pages < a.pages:
        bad(f"--max-pages {max_pages} is less than --pages {a.pages}")
    if max_workers > 4096:
        bad("--max-workers: at most 4096")
    if max_pages > 1 << 20:
        bad("--max-pages: at most 1048576 (4 GiB per address space)")
    base = max(a.workers, 4) * a.pages
    frames = a.frames or base + max(64, base // 16)
    check_frames(frames, a.workers * a.pages, a)
    log_dir = a.log_dir
    if log_dir is not None:
        check_log_dir(log_dir)
    return {"workers": a.workers, "pages": a.pages, "frames": frames, "workload": a.workload,
            "seed": a.seed, "log_dir": os.path.abspath(log_dir) if log_dir else None,
            "exit_policy": a.exit_policy, "oom_rule": a.oom_rule, "hazards": list(a.hazard),
            "hung_task_timeout": a.hung_task_timeout, "churn_ms": a.churn_ms, "run": a.run,
            "pages_to_scan": a.pages_to_scan, "sleep_ms": a.sleep_ms,
            "max_workers": max_workers, "max_pages": max_pages}


def name_in_use(name: str) -> shm.UksmError | None:
    """Why ``up --cluster name`` must not start (status 2), or None."""
    try:
        ans = call(name, {"op": "ping"}, timeout=10)
        return shm.UksmError(f"cluster {name!r} is already up (daemon pid {ans.get('pid')}, logs in "
                             f"{ans.get('log_dir')}): 'uksm down --cluster {name}' first, or "
                             f"another --cluster", EXIT_USAGE)
    except NotUp:
        pass
    except shm.UksmError:
        return shm.UksmError(f"cluster {name!r} is already up (its control socket is taken)", EXIT_USAGE)
    if shm.leftovers(name):
        e = not_running(name)
        return shm.UksmError(f"cluster name {name!r} is in use: {e}", EXIT_USAGE)
    return None


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
        proc = subprocess.Popen([sys.executable, "-m", "uksm.proc.daemon", "--cluster", name,
                                 "--spec", json.dumps(spec)],
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
    ans = request(a.cluster, {"op": "down"})
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


def print_down(r: dict[str, Any]) -> None:
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
    left = r["ipc_leftovers"]
    print(f"  leftover POSIX objects: {len(left)}{': ' + ' '.join(left[:8]) if left else ''}")
    for e in r.get("errors", []):
        print(f"  error    {e}")
    print(f"  logs     {r['log_dir']}")


def cmd_spawn(a: argparse.Namespace) -> int:
    if a.count < 1:
        raise shm.UksmError(f"--count must be at least 1 (got {a.count})", EXIT_USAGE)
    if a.pages is not None and a.pages < 1:
        raise shm.UksmError(f"--pages must be at least 1 (got {a.pages})", EXIT_USAGE)
    if a.churn_ms is not None and a.churn_ms < 0:
        raise shm.UksmError(f"--churn-ms must be >= 0 (got {a.churn_ms})", EXIT_USAGE)
    if a.workload is not None:
        from uksm.workers.workloads import validate as wl_validate
        wl_validate(a.workload)
    req = {"op": "spawn", "pages": a.pages, "workload": a.workload, "count": a.count,
           "seed": a.seed, "churn_ms": a.churn_ms, "wait": a.wait}
    ans = request(a.cluster, req)
    if a.json:
        print(json.dumps(ans))
    else:
        for w in ans["spawned"]:
            ready = "  ready" if w.get("ready") else ""
            print(f"{w['worker']}  pid {w['pid']}  mm{w['mm']}  {w['pages']} pages  "
                  f"{w['workload']}{ready}")
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
            k = k.strip()
            validate_knob(k, v)  # refuse at once, before asking the cluster
            knobs.append([k, v])
        ans = request(name, {"op": "ctl", "knobs": knobs})
        for ap in ans["applied"]:
            extra = f"; ksmd done in {ap['wait_s']:.2f}s" if "wait_s" in ap else ""
            print(f"{ap['name']} {ap['value']} (was {ap['previous']}{extra})")
        return EXIT_OK
    for k in reads:
        if k not in CTL_NAMES:
            raise shm.UksmError(f"{k}: no such knob or counter (one of: {', '.join(CTL_NAMES)})",
                                EXIT_USAGE)
    cl = attach(name)
    try:
        vals = dict(ctl_values(read_state(cl)))
    finally:
        cl.close()
    for k in reads or list(CTL_NAMES):
        print(f"{k} {vals[k]}")
    return EXIT_OK


# ---- status and top ------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_status(st: dict[str, Any]) -> list[str]:
    """status as text lines (also the body of ``top``)."""
    k, fr, w = st["ksm"], st["frames"], st["workers"]
    sup = f"{st['supervisor_pid']}" + ("" if st["supervisor_alive"] else " (gone)")
    ksmd = f"{st['ksmd_pid']}" + ("" if st["ksmd_alive"] else " (not running)")
    hz = f"  hazards {','.join(st['hazards'])}" if st["hazards"] else ""
    out = [
        f"cluster {st['cluster']}  {st['state']}  up {st['uptime_s']:.0f}s  supervisor {sup}  "
        f"ksmd {ksmd}  exit_policy {st['exit_policy']}{hz}",
        f"ksm      run {k['run']}  pages_to_scan {k['pages_to_scan']}  sleep_millisecs "
        f"{k['sleep_millisecs']}  full_scans {k['full_scans']}  pages_scanned {k['pages_scanned']}",
        f"         pages_shared {k['pages_shared']}  pages_sharing {k['pages_sharing']}  "
        f"pages_unshared {k['pages_unshared']}  pages_volatile {k['pages_volatile']}",
        f"memory   frames used {fr['used']}  free {fr['free']}  of {fr['total']}"
        f"{'  mem_limit ' + str(st['mem_limit']) if st['mem_limit'] else ''}  pool resident "
        f"{_mib(st['memory']['host_bytes_resident'])}  saved by merging "
        f"{_mib(k['pages_sharing'] * PAGE_SIZE)}",
        f"workers  started {w['started']}  exited {w['exited']} (fast {w['exit_fast']} slow "
        f"{w['exit_slow']} legacy {w['exit_legacy']} noslot {w['exit_noslot']})  killed "
        f"{w['killed']}  oom_killed "
        f"{w['oom_killed']}  reaped {w['reaped']}",
        "",
        f"{'WORKER':<7} {'PID':>8} {'MM':>5} {'STATE':<13} {'PAGES':>6} {'RSS':>6} {'RMAP':>6} "
        f"{'MERGING':>7} {'USERS':>5} {'COUNT':>5}",
    ]
    for m in st["mms"]:
        pid = f"{m['owner_pid']}" + ("" if m["owner_alive"] else "-")
        out.append(f"{m['worker']:<7} {pid:>8} {m['mm']:>5} {m['state']:<13} {m['pages']:>6} "
                   f"{m['rss']:>6} {m['ksm_rmap_items']:>6} {m['ksm_merging_pages']:>7} "
                   f"{m['mm_users']:>5} {m['mm_count']:>5}")
    if not st["mms"]:
        out.append("(no address spaces)")
    return out


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
    from uksm.cli.top import run_top
    return run_top(a.cluster, a.interval)


__all__ = ["add_parsers", "dispatch", "cmd_fsck", "read_state", "validate_knob", "request", "call",
           "sock_address", "attach", "not_running", "format_status", "KSM_FIELDS", "CTL_NAMES",
           "WRITABLE", "KnobError", "NotUp"]
