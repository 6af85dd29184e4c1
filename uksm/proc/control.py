"""The client side of a running cluster's daemon (issue 7).

A cluster started by ``uksm up`` is served by a detached supervisor process,
the *daemon* (``uksm.proc.daemon``).  This module is what its clients share
(the cluster commands in ``uksm.cli.cluster``, ``uksm.Machine.attach``):

- writes (spawn, kill, ctl KEY=VALUE, fsck, down) are requests over the
  daemon's control channel: a UNIX stream socket in the abstract namespace,
  ``"\\0uksm-<cluster>"`` (nothing on disk to leak), one JSON object per line,
  one request per connection (``call``, ``request``).  The daemon serves them
  one at a time in its main thread, so two commands racing see each other's
  effects whole;
- reads (status, top, ctl with no assignment) come straight from the
  cluster's shared memory (``attach``, ``read_state``), as reading
  /sys/kernel/mm/ksm does not go through ksmd;
- a knob's value is checked here as the kernel's sysfs store functions
  check it (``validate_knob``), so every client refuses the same inputs.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import posix_ipc

from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_USAGE
from uksm.kernel.layout import (
    CS_RUNNING,
    CS_STARTING,
    CS_STOPPED,
    CS_STOPPING,
    EXIT_PATHS,
    EXIT_POLICIES,
    H_CREATED_NS,
    H_EXIT_POLICY,
    H_HAZARDS,
    H_KSMD_PID,
    H_MAGIC,
    H_MEM_LIMIT,
    H_STATE,
    H_SUPERVISOR_PID,
    HAZARDS,
    K_RMAP_ITEMS,
    K_RUN_DONE,
    K_RUN_SEQ,
    K_STABLE_NODES,
    KSM_FIELDS,
    KSM_FIELDS_618,
    MAGIC,
    MM_STATES,
    ksm_block,
    stats_block,
)

#: the cluster a command acts on without --cluster: $UKSM_CLUSTER, else "default"
DEFAULT_CLUSTER = os.environ.get("UKSM_CLUSTER") or "default"
CLUSTER_STATES = {CS_STARTING: "starting", CS_RUNNING: "running", CS_STOPPING: "stopping",
                  CS_STOPPED: "stopped"}

# seconds a client waits for the daemon's answer (every daemon-side wait is
# bounded well below this: the longest, down, is about 2 minutes at worst)
REQUEST_TIMEOUT = 300.0

# ---- the /sys/kernel/mm/ksm block ------------------------------------------------

#: uksm's own names after the kernel's (the emulation's knobs and the frame pool)
CTL_OWN: tuple[str, ...] = ("exit_policy", "mem_limit", "frames_total", "frames_used", "frames_free")
#: every name ``uksm ctl`` prints under 2.6.32, in order
CTL_NAMES: tuple[str, ...] = tuple(n for n, _ in KSM_FIELDS) + CTL_OWN
#: ... and under 6.18 (KSM_FIELDS_618: no max_kernel_pages, 6.18's files)
CTL_NAMES_618: tuple[str, ...] = tuple(n for n, _ in KSM_FIELDS_618) + CTL_OWN
#: the names ``uksm ctl KEY=VALUE`` may write under 2.6.32
WRITABLE: tuple[str, ...] = ("run", "pages_to_scan", "sleep_millisecs", "max_kernel_pages", "exit_policy",
                             "mem_limit")
#: ... and under 6.18 (its rw files, uksm.proc.sysfs618)
WRITABLE_618: tuple[str, ...] = ("run", "pages_to_scan", "sleep_millisecs", "merge_across_nodes",
                                 "max_page_sharing", "stable_node_chains_prune_millisecs", "use_zero_pages",
                                 "smart_scan", "advisor_mode", "advisor_max_cpu",
                                 "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                                 "advisor_target_scan_time", "exit_policy", "mem_limit")


def ctl_names(modern: bool) -> tuple[str, ...]:
    """What ``uksm ctl`` and ``m.ksm`` show for a cluster (``Cluster.modern``: 6.18)."""
    return CTL_NAMES_618 if modern else CTL_NAMES


def writable(modern: bool) -> tuple[str, ...]:
    return WRITABLE_618 if modern else WRITABLE


def missing_file(name: str, modern: bool) -> str:
    """Why ``name`` is not a knob of this cluster's kernel, as a missing
    sysfs file: one of the other kernel's, or none at all."""
    kernel, other = ("6.18", "2.6.32") if modern else ("2.6.32", "6.18")
    if name in ctl_names(not modern):
        return (f"{name!r}: no such file in {kernel}'s /sys/kernel/mm/ksm (it is {other}'s: a "
                f"cluster booted with --kernel {other}, Machine(kernel={other!r}))")
    return f"{name!r}: no such knob or counter (one of: {', '.join(ctl_names(modern))})"
UINT_MAX = (1 << 32) - 1
ULONG_MAX = (1 << 64) - 1


class KnobError(shm.UksmError):
    """A knob write refused as the kernel would refuse it (status 2; EBUSY,
    a refusal of the cluster's state, not of the value: status 1)."""

    def __init__(self, name: str, why: str, errno_name: str = "EINVAL") -> None:
        text = {"EINVAL": "invalid argument", "EACCES": "permission denied",
                "ERANGE": "numerical result out of range", "EBUSY": "device or resource busy"}[errno_name]
        super().__init__(f"{name}: {text} ({errno_name}): {why}",
                         EXIT_ERR if errno_name == "EBUSY" else EXIT_USAGE)
        self.errno_name = errno_name


class NoSuchKnob(shm.UksmError):
    """A name this cluster's kernel has no file for (status 2; the API's KeyError)."""


def strict_strtoul(raw: Any) -> int | None:
    """lib/vsprintf.c's strict_strtoul(cp, 10, &res), None for -EINVAL:
    decimal digits (simple_strtoul: no sign, no blank, no overflow check --
    the value wraps at ULONG_MAX + 1), then the end of the string or one
    newline ("(len == (size_t)(tail - cp) + 1) && (*tail == '\\n')")."""
    s = str(raw)
    digits = s[:-1] if s.endswith("\n") else s
    if not digits or not all("0" <= c <= "9" for c in digits):  # ASCII: not a full-width "１", no "²"
        return None
    return int(digits, 10) & ULONG_MAX


def _uint(name: str, raw: Any, why: str) -> int:
    """The kernel's knob stores: "err = strict_strtoul(buf, 10, &val);
    if (err || val > UINT_MAX) return -EINVAL;" (2.6.32.67 mm/ksm.c)."""
    v = strict_strtoul(raw)
    if v is None or v > UINT_MAX:
        raise KnobError(name, why)
    return v


def _whole(name: str, raw: Any, lo: int, why: str) -> int:
    """uksm's own knobs (mem_limit): a decimal whole number, as the
    kernel's (``_uint``), at least ``lo``."""
    v = _uint(name, raw, why)
    if v < lo:
        raise KnobError(name, why)
    return v


def validate_knob(name: str, raw: Any, nframes: int | None = None, cl: Any = None) -> int | str:
    """The value ``name=raw`` writes, or KnobError (EINVAL, EACCES; under
    6.18 also ERANGE, EBUSY) with the kernel's reasoning.  ``nframes``: the
    pool size, when known (mem_limit).  ``cl``: the cluster, when known:
    its kernel's names and stores (6.18's: uksm.proc.sysfs618, checked
    against the cluster's state), else 2.6.32's names and values."""
    modern = cl is not None and bool(cl.modern)
    if cl is not None and name not in ctl_names(modern):
        raise NoSuchKnob(missing_file(name, modern), EXIT_USAGE)
    if modern and name in WRITABLE_618 and name not in CTL_OWN:
        from uksm.proc.sysfs618 import StoreError, validate
        try:
            return validate(name, raw, cl.q)
        except StoreError as e:
            raise KnobError(name, e.why, e.errno_name) from None
    if name == "run":
        v = _uint(name, raw, "must be 0, 1 or 2")
        if v > 2:  # "if (flags > KSM_RUN_UNMERGE) return -EINVAL;"
            raise KnobError(name, "must be 0, 1 or 2")
        return v
    if name == "pages_to_scan":
        return _uint(name, raw, f"must be a whole number 0..{UINT_MAX}")
    if name == "sleep_millisecs":
        return _uint(name, raw, f"must be a whole number of milliseconds 0..{UINT_MAX}")
    if name == "max_kernel_pages":
        # max_kernel_pages_store: "err = strict_strtoul(buf, 10, &nr_pages);
        # if (err) return -EINVAL;" -- an unsigned long, no UINT_MAX test
        pages = strict_strtoul(raw)
        if pages is None:
            raise KnobError(name, "must be a whole number of KSM pages (0: no limit)")
        return pages
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
    if name in ctl_names(modern):
        raise KnobError(name, "a read-only counter", "EACCES")
    raise shm.UksmError(f"{name}: no such knob (writable: {', '.join(writable(modern))}; "
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
        "ksm": ksm_block(q),
        "ksm_internal": {"rmap_items": q[K_RMAP_ITEMS], "stable_nodes": q[K_STABLE_NODES],
                         "run_seq": q[K_RUN_SEQ], "run_done": q[K_RUN_DONE]},
        "kernel": cl.kernel,      # whose mm/ksm.c (H_KERNEL): its ksm block's fields
        "exit_policy": EXIT_POLICIES[pol] if 0 <= pol < len(EXIT_POLICIES) else str(pol),
        "hazards": [h for h, bit in HAZARDS.items() if q[H_HAZARDS] & bit],
        "mem_limit": q[H_MEM_LIMIT],
        "frames": frame_stats(cl),
        "memory": {"host_bytes_resident": cl.pool.resident_bytes()},
        "workers": stats_block(q),
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
    """The supervisor pid the cluster's header records (0: none readable).
    While the cluster is being made (no MAGIC yet) it is the creator's,
    which Cluster.create records first."""
    try:
        seg = shm.attach_segment(name, "ctl")
    except (shm.UksmError, OSError, ValueError):
        return 0
    try:
        return seg.q[H_SUPERVISOR_PID] if len(seg.q) > H_MAGIC and seg.q[H_MAGIC] in (MAGIC, 0) else 0
    finally:
        seg.close()


def process_line(pid: int) -> str:
    """A process's command line, for a message ('' if unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


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
        line = process_line(sup)
        return shm.UksmError(f"cluster {name!r} is alive but has no control daemon: its supervisor "
                             f"is process {sup}" + (f" ({line})" if line else "")
                             + ", a 'uksm run', 'uksm inject' or a script's uksm.Machine, which "
                               "drives it itself: it cannot be driven from here, and it ends when "
                               "that process ends it (status and top still read it)", EXIT_ERR)
    who = f"supervisor pid {sup} is gone" if sup else "no supervisor recorded"
    return shm.UksmError(f"cluster {name!r} is dead ({who}; {len(left)} POSIX objects left in "
                         f"/dev/shm): 'uksm cleanup --cluster {name}' removes them", EXIT_ERR)


def name_taken(name: str, flag: str = "another name") -> shm.UksmError | None:
    """Why a new cluster may not take ``name`` (status 2), or None: a
    cluster of ``uksm up`` answers (``uksm down`` ends it), or another
    process's cluster (``uksm run``, a script: only that process ends it),
    or a dead one's objects (``uksm cleanup``).  ``flag``: how the caller
    names its choice of name, for the advice."""
    try:
        ans = call(name, {"op": "ping"}, timeout=10)
        if not ans.get("ok"):  # another user's daemon: EPERM
            return shm.UksmError(f"cluster name {name!r} is in use: {ans.get('error')}; {flag}",
                                 EXIT_USAGE)
        return shm.UksmError(f"cluster {name!r} is already up (daemon pid {ans.get('pid')}, logs in "
                             f"{ans.get('log_dir')}): 'uksm down --cluster {name}' first, or "
                             f"{flag}", EXIT_USAGE)
    except NotUp:
        pass
    except shm.UksmError:
        return shm.UksmError(f"cluster {name!r} is already up (its control socket is taken): "
                             f"{flag}", EXIT_USAGE)
    if shm.leftovers(name):
        mine = shm.owner(name) in (None, os.geteuid()) or os.geteuid() == 0
        why = not_running(name) if mine else shm.not_yours(name)
        return shm.UksmError(f"cluster name {name!r} is in use: {why}; or {flag}", EXIT_USAGE)
    return None


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
    except TimeoutError:
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
