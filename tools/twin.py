#!/usr/bin/env python3
"""twin: one short KSM program run on uksm and on this machine's real KSM, compared step by step.

What it does
------------
A *walk* is a list of steps; each step is a few actions on tasks (private
anonymous mappings of N pages: fill, write, madvise, fork, exit) followed
by a wait for K full scans.  The walk runs twice:

- **uksm**: through the public API (``uksm.Machine``, ``m.task``,
  ``t.fill``, ``t.madvise``, ``t.fork``, ``t.exit``, ``m.wait_full_scans``),
  read back with ``m.ksm``, ``t.stat()`` and ``t.pagemap()``;
- **kernel**: each task is a child process of this one holding one
  ``mmap(MAP_PRIVATE|MAP_ANONYMOUS)`` of N pages, driven over a socket
  (a fork is a real fork(2) of that process), with the host's ksmd in
  /sys/kernel/mm/ksm; read back from /sys/kernel/mm/ksm, /proc/PID/ksm_stat,
  /proc/PID/pagemap, /proc/kpageflags and /proc/kpagecount.

After every step these are compared (docs/TWIN.md argues the choice):

- ``pages_shared``, ``pages_sharing``: the two global counters whose meaning
  has not changed since 2.6.32 (KSM pages; mappings of them past the first).
  The kernel's are taken relative to their values before the walk.
- per task, ``ksm_rmap_items`` and ``ksm_merging_pages`` of ksm_stat;
- ``frames``: which pages share a frame (pages grouped by PFN; the PFNs
  themselves are never compared), ``ksm``: which pages map a KSM page
  (KPF_KSM), ``mapcount``: each page's frame's mapcount (/proc/kpagecount).

Not compared: ``pages_unshared`` and ``pages_volatile`` (they follow where
the scan happens to be), ``full_scans``, ``pages_scanned``, and every field
newer than 2.6.32 (ksm_zero_pages, profit, stable_node_chains, ...).

The host's KSM is shared by the whole machine: its use is serialised by
``flock /tmp/hostksm.lock``; during the walk run=1, ``smart_scan=0`` (6.7's
smart scan skips pages that did not merge before: 2.6.32 scans every page),
``use_zero_pages=0``, ``advisor_mode=none``, ``max_page_sharing=256``; and
ALWAYS afterwards, also after an error or Ctrl-C, run=2 then run=0,
pages_to_scan=100, sleep_millisecs=20, max_page_sharing=256,
use_zero_pages=0, smart_scan=1, advisor_mode=none.

Usage::

    python3 tools/twin.py                  # the full walk, a table
    python3 tools/twin.py --walk merge --json
    python3 tools/twin.py --list           # the walks and their steps

Exit status: 0 all fields agree, 1 some differ, 2 bad input or no host KSM
(not root, no /sys/kernel/mm/ksm: one line saying why).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostksm import HostKsm, host_lock, shielded
from uksm.errors import UksmError

PAGE = 4096
#: the per-task ksm_stat lines both give
STAT_FIELDS = ("ksm_rmap_items", "ksm_merging_pages")
#: the largest task: no walk then maps one content more than 256 times, so
#: the kernel's max_page_sharing (4.13; 2.6.32 has no cap) never splits a
#: KSM page (the fork-unmergeable walk's task A is one content)
MAX_PAGES = 256


class BadInput(Exception):
    """A reason the twin cannot run (exit status 2)."""


# ---- the walks ----------------------------------------------------------------------------

Action = tuple[Any, ...]


@dataclass
class Step:
    name: str
    actions: list[Action]
    scans: int = 3


@dataclass
class Walk:
    name: str
    about: str
    steps: list[Step] = field(default_factory=list)


def _spawn(name: str, pages: int, blocks: int) -> list[Action]:
    """A task of ``pages`` pages in ``blocks`` runs of one byte value each
    (value 1 for the first run, 2 for the next ...), then MADV_MERGEABLE."""
    per = pages // blocks
    acts: list[Action] = [("task", name, pages)]
    acts += [("fill", name, b * per, per if b < blocks - 1 else pages - b * per, b + 1)
             for b in range(blocks)]
    acts.append(("madvise", name, 0, pages, "MERGEABLE"))
    return acts


def walks(pages: int) -> dict[str, Walk]:
    half = pages // 2
    merge = Walk("merge", "two tasks of identical pages merge, one page COW-broken",
                 [Step("merge", _spawn("A", pages, 4) + _spawn("B", pages, 4)),
                  Step("cow", [("fill", "A", 5, 1, 0xAA)])])
    full = Walk("full", "merge, COW, unmerge, fork (and a write in the child), exit, re-advise",
                [Step("merge", _spawn("A", pages, 4) + _spawn("B", pages, 4)),
                 Step("cow", [("fill", "A", 5, 1, 0xAA)]),
                 Step("unmerge-B", [("madvise", "B", 0, pages, "UNMERGEABLE")]),
                 Step("fork-A", [("fork", "A", "C")]),
                 Step("cow-C", [("fill", "C", 0, 1, 0xBB)]),
                 Step("exit-C", [("exit", "C")]),
                 Step("remerge-B-half", [("madvise", "B", 0, half, "MERGEABLE")])])
    unmergeable = Walk("fork-unmergeable", "a fork of a task that never asked for KSM",
                       [Step("spawn", [("task", "U", pages), ("fill", "U", 0, pages, 9)]
                             + _spawn("A", pages, 1)),
                        Step("fork-U", [("fork", "U", "V")])])
    return {w.name: w for w in (full, merge, unmergeable)}


# ---- one snapshot, and how two are compared ---------------------------------------------------

def pattern(maps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Which pages share a frame, which map a KSM page, each frame's
    mapcount: named by "task:page", never by PFN (two machines' frame
    numbers mean nothing to each other)."""
    by_frame: dict[Any, list[str]] = {}
    ksm, mapcount = [], {}
    for t in sorted(maps):
        for i, p in enumerate(maps[t]):
            if not p["present"]:
                continue
            where = f"{t}:{i}"
            by_frame.setdefault(p["frame"], []).append(where)
            if p["ksm"]:
                ksm.append(where)
            mapcount[where] = p["mapcount"]
    groups = sorted(sorted(g, key=_page_key) for g in by_frame.values())
    return {"frames": groups, "ksm": ksm, "mapcount": mapcount}


def _page_key(name: str) -> tuple[str, int]:
    t, i = name.split(":")
    return t, int(i)


def difference(key: str, k: Any, u: Any, most: int = 3) -> str:
    """What one side has and the other has not, in a line or two."""
    if key == "frames":
        ks, us = set(map(tuple, k)), set(map(tuple, u))
        only = [(w, sorted(a - b)) for w, a, b in (("kernel", ks, us), ("uksm", us, ks))]
        return "; ".join(f"frames only in {w}: " + ", ".join(f"[{spans(list(g))}]" for g in gs[:most])
                         + (f" (+{len(gs) - most})" if len(gs) > most else "")
                         for w, gs in only if gs)
    if key == "ksm":
        kp, up = set(k), set(u)
        return "; ".join(f"KSM only in {w}: {spans(sorted(a - b, key=_page_key))}"
                         for w, a, b in (("kernel", kp, up), ("uksm", up, kp)) if a - b)
    pages = sorted(set(k) | set(u), key=_page_key)
    diff = [f"{p} {k.get(p)}/{u.get(p)}" for p in pages if k.get(p) != u.get(p)]
    return (f"mapcount kernel/uksm: {', '.join(diff[:most])}"
            + (f" (+{len(diff) - most})" if len(diff) > most else ""))


def spans(names: list[str]) -> str:
    """["A:0", "A:1", "A:2", "B:4"] -> "A0-2 B4"."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            t, a, b = run[0][0], run[0][1], run[-1][1]
            out.append(f"{t}{a}" if a == b else f"{t}{a}-{b}")

    for n in names:
        t, i = n.split(":")
        if run and run[-1][0] == t and run[-1][1] == int(i) - 1:
            run.append((t, int(i)))
        else:
            flush()
            run = [(t, int(i))]
    flush()
    return " ".join(out) or "-"


def summary(key: str, v: Any) -> str:
    if key == "frames":
        shared = [g for g in v if len(g) > 1]
        return (f"{sum(map(len, v))} present on {len(v)} frames; "
                f"{len(shared)} shared by {sum(map(len, shared))}")
    if key == "ksm":
        return spans(v)
    if key == "mapcount":
        hist: dict[int, int] = {}
        for c in v.values():
            hist[c] = hist.get(c, 0) + 1
        return " ".join(f"{n}x{c}" for c, n in sorted(hist.items())) or "-"
    return str(v)


def rows(step: str, k: dict[str, Any], u: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for f in ("pages_shared", "pages_sharing"):
        out.append({"step": step, "field": f, "kernel": k["ksm"][f], "uksm": u["ksm"][f],
                    "agree": k["ksm"][f] == u["ksm"][f]})
    for t in sorted(set(k["stat"]) | set(u["stat"])):
        for f in STAT_FIELDS:
            kv, uv = k["stat"].get(t, {}).get(f), u["stat"].get(t, {}).get(f)
            out.append({"step": step, "field": f"{t} {f}", "kernel": kv, "uksm": uv,
                        "agree": kv == uv})
    for f in ("frames", "ksm", "mapcount"):
        kv, uv = k["pagemap"][f], u["pagemap"][f]
        row = {"step": step, "field": f, "kernel": summary(f, kv), "uksm": summary(f, uv),
               "agree": kv == uv}
        if kv != uv:
            row["difference"] = difference(f, kv, uv)
        out.append(row)
    return out


# ---- uksm ---------------------------------------------------------------------------------

def run_uksm(walk: Walk, pages: int, say: Callable[[str], None],
             timeout: float) -> list[dict[str, Any]]:
    import uksm
    snaps = []
    ntasks = sum(1 for s in walk.steps for a in s.actions if a[0] in ("task", "fork"))
    with uksm.Machine(frames=max(256, 4 * pages * ntasks), max_pages=pages, max_tasks=ntasks + 2,
                      pages_to_scan=max(100, 4 * pages * ntasks), sleep_millisecs=5) as m:
        if "max_kernel_pages" in m.ksm:
            # 2.6.32's cap on KSM pages (default frames/4): 2.6.33 removed
            # it, the host has none
            m.ksm["max_kernel_pages"] = 0
        tasks: dict[str, Any] = {}
        for step in walk.steps:
            for a in step.actions:
                op, name = a[0], a[1]
                if op == "task":
                    tasks[name] = m.task(pages=a[2], mergeable=False)
                elif op == "fill":
                    tasks[name].fill(a[4], a[2], a[3])
                elif op == "madvise":
                    tasks[name].madvise(a[2], a[3], a[4])
                elif op == "fork":
                    tasks[a[2]] = tasks[name].fork()
                elif op == "exit":
                    tasks.pop(name).exit()
            m.wait_full_scans(step.scans, timeout=timeout)
            c = m.ksm.counters()
            snaps.append({"ksm": {f: c[f] for f in ("pages_shared", "pages_sharing")},
                          "stat": {n: {f: t.stat()[f] for f in STAT_FIELDS}
                                   for n, t in tasks.items()},
                          "pagemap": pattern({n: t.pagemap() for n, t in tasks.items()})})
            say(f"  uksm: {step.name}: shared {c['pages_shared']} sharing {c['pages_sharing']}")
    return snaps


# ---- the kernel: task processes --------------------------------------------------------------

def _pagemap_of(addr: int, pages: int) -> list[dict[str, Any]]:
    """This process's pages [addr, addr + pages*4096) as pagemap,
    kpageflags (KPF_KSM, bit 21) and kpagecount tell them (as root the
    PFN, bits 0-54, is visible; bit 63 is present)."""
    out = []
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf, \
            open("/proc/kpagecount", "rb") as kc:
        pm.seek(addr // PAGE * 8)
        for (e,) in struct.iter_unpack("<Q", pm.read(8 * pages)):
            present = bool(e >> 63 & 1)
            pfn = e & ((1 << 55) - 1) if present else None
            ksm, count = False, 0
            if pfn is not None:
                kf.seek(pfn * 8)
                ksm = bool(struct.unpack("<Q", kf.read(8))[0] >> 21 & 1)
                kc.seek(pfn * 8)
                count = struct.unpack("<Q", kc.read(8))[0]
            out.append({"present": present, "frame": pfn, "ksm": ksm, "mapcount": count})
    return out


def read_ksm_stat() -> dict[str, Any]:
    """/proc/self/ksm_stat: "name N" lines as ints, "name: yes|no" as strings."""
    out: dict[str, Any] = {}
    with open("/proc/self/ksm_stat") as f:
        for ln in f:
            k, v = ln.split()
            out[k.rstrip(":")] = int(v) if v.lstrip("-").isdigit() else v
    return out


def _prctl(option: int, *args: int) -> int:
    """prctl(2) through the C library: its return, or -errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    ret = int(libc.prctl(option, *(list(args) + [0] * 4)[:4]))
    return -ctypes.get_errno() if ret < 0 else ret


def _task_main(sock: socket.socket, pages: int) -> None:
    """A task: one private anonymous mapping (no THP: each page its own, as
    uksm's), commands from the socket (one JSON datagram each, a file
    descriptor with "fork")."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # forked children reap themselves
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the driver ends us, by "exit" or EOF
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    ref = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(ref)
    del ref
    advice = {"MERGEABLE": mmap.MADV_MERGEABLE, "UNMERGEABLE": mmap.MADV_UNMERGEABLE,
              "DONTNEED": mmap.MADV_DONTNEED}
    while True:
        data, fds, _f, _a = socket.recv_fds(sock, 1 << 16, 1)
        if not data:
            return
        c = json.loads(data)
        ans: dict[str, Any] = {"ok": True}
        try:
            op = c["op"]
            if op == "fill":
                for p in range(c["first"], c["first"] + c["count"]):
                    m[p * PAGE:(p + 1) * PAGE] = bytes([c["value"]]) * PAGE
            elif op == "madvise":
                m.madvise(advice[c["advice"]], c["first"] * PAGE, c["count"] * PAGE)
            elif op == "fork":
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    sock = socket.socket(fileno=fds[0])
                    socket.send_fds(sock, [json.dumps({"ok": True}).encode()], [])
                    continue
                os.close(fds[0])
                ans["pid"] = pid
            elif op == "stat":
                ans["stat"] = read_ksm_stat()
            elif op == "write":
                m[c["offset"]] = c["value"]
            elif op == "prctl":
                ans["ret"] = _prctl(c["option"], *c["args"])
            elif op == "segv":   # LTP ksm05's child: "*(char *)NULL = 0;"
                import resource
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                ctypes.string_at(0)
            elif op == "pagemap":
                ans["pages"] = _pagemap_of(addr, pages)
            elif op == "exit":
                socket.send_fds(sock, [json.dumps(ans).encode()], [])
                return
        except (OSError, ValueError, KeyError) as e:
            ans = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        socket.send_fds(sock, [json.dumps(ans).encode()], [])


class HostTask:
    """The driver's end of a task process."""

    def __init__(self, name: str, sock: socket.socket, pid: int) -> None:
        self.name, self.sock, self.pid = name, sock, pid
        self.proc: Any = None   # a fresh task's Popen (kept: never reaped behind our back)

    def cmd(self, op: str, fds: list[int] | None = None, **kw: Any) -> dict[str, Any]:
        socket.send_fds(self.sock, [json.dumps({"op": op, **kw}).encode()], fds or [])
        data = self.sock.recv(1 << 22)
        if not data:
            raise RuntimeError(f"kernel task {self.name} (pid {self.pid}) died")
        ans = json.loads(data)
        if not ans["ok"]:
            raise RuntimeError(f"kernel task {self.name}: {op}: {ans['error']}")
        return ans


def start_host_task(name: str, pages: int, fresh: bool = False) -> HostTask:
    """A task process: forked from this one, or with ``fresh`` a new
    Python (exec'd): it then shares no page with this driver.  (A forked
    task under PR_SET_MEMORY_MERGE makes every page it still shares
    copy-on-write with the driver mergeable, and KSM merges such a page in
    place: a KSM page then stays mapped in the driver after the task is
    gone, which max_page_sharing and merge_across_nodes answer with EBUSY
    until the driver exits.)"""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if fresh:
        import subprocess
        prog = ("import socket, sys; sys.path.insert(0, sys.argv[1]); import twin; "
                "twin._task_main(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]))")
        proc = subprocess.Popen([sys.executable, "-c", prog, os.path.dirname(os.path.abspath(__file__)),
                                 str(b.fileno()), str(pages)], pass_fds=[b.fileno()])
        b.close()
        t = HostTask(name, a, proc.pid)
        t.proc = proc
        return t
    pid = os.fork()
    if pid == 0:   # the task: never returns into the driver's code
        code = 0
        try:
            a.close()
            _task_main(b, pages)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    b.close()
    return HostTask(name, a, pid)


def fork_host_task(parent: HostTask, name: str) -> HostTask:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = parent.cmd("fork", [b.fileno()])["pid"]
    finally:
        b.close()
    t = HostTask(name, a, pid)
    if not json.loads(a.recv(1 << 16))["ok"]:
        raise RuntimeError(f"kernel task {name}: the fork's child did not start")
    return t


def end_host_tasks(tasks: list[HostTask]) -> None:
    """Every task process ends: "exit", else SIGKILL; the driver's own
    children are reaped (forked ones by their parent, SIGCHLD ignored)."""
    for t in tasks:
        try:
            t.sock.settimeout(5)
            t.cmd("exit")
        except (OSError, RuntimeError, ValueError):
            try:
                os.kill(t.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t.sock.close()
    for t in tasks:
        try:
            os.waitpid(t.pid, 0)
        except ChildProcessError:   # a fork's child: its parent reaps it
            end = time.monotonic() + 5
            while time.monotonic() < end and os.path.exists(f"/proc/{t.pid}"):
                time.sleep(0.01)


def run_kernel(walk: Walk, host: HostKsm, say: Callable[[str], None],
               timeout: float) -> list[dict[str, Any]]:
    snaps: list[dict[str, Any]] = []
    with host_lock(say, timeout):
        base = {f: host.int(f) for f in ("pages_shared", "pages_sharing")}
        if any(base.values()):
            say(f"  kernel: KSM pages before the walk {base}: counters are taken relative")
        tasks: dict[str, HostTask] = {}
        alive: list[HostTask] = []
        try:
            host.write("run", "0")
            for name, value in (("pages_to_scan", "5000"), ("sleep_millisecs", "5"),
                                ("use_zero_pages", "0"), ("smart_scan", "0"),
                                ("advisor_mode", "none"), ("max_page_sharing", "256")):
                if os.path.exists(os.path.join(host.dir, name)) and host.read(name) != value:
                    host.write(name, value)
            host.write("run", "1")
            for step in walk.steps:
                for a in step.actions:
                    op, name = a[0], a[1]
                    if op == "task":
                        tasks[name] = start_host_task(name, a[2])
                        alive.append(tasks[name])
                    elif op == "fill":
                        tasks[name].cmd("fill", first=a[2], count=a[3], value=a[4])
                    elif op == "madvise":
                        tasks[name].cmd("madvise", first=a[2], count=a[3], advice=a[4])
                    elif op == "fork":
                        tasks[a[2]] = fork_host_task(tasks[name], a[2])
                        alive.append(tasks[a[2]])
                    elif op == "exit":
                        t = tasks.pop(name)
                        alive.remove(t)
                        end_host_tasks([t])
                wait_host_scans(host, step.scans, timeout, step.name)
                ksm = {f: host.int(f) - base[f] for f in base}
                snaps.append({"ksm": ksm,
                              "stat": {n: t.cmd("stat")["stat"] for n, t in tasks.items()},
                              "pagemap": pattern({n: t.cmd("pagemap")["pages"]
                                                  for n, t in tasks.items()})})
                say(f"  kernel: {step.name}: shared {ksm['pages_shared']} "
                    f"sharing {ksm['pages_sharing']}")
        finally:
            clean_up(host, alive, say)
    return snaps


def wait_host_scans(host: HostKsm, n: int, timeout: float, step: str) -> None:
    """Until the host's full_scans has advanced by ``n`` (0: at once)."""
    s0, end = host.int("full_scans"), time.monotonic() + timeout
    while host.int("full_scans") < s0 + n:
        if time.monotonic() > end:
            raise TimeoutError(f"kernel: {n} full scans not done in {timeout:.0f}s (step {step})")
        time.sleep(0.002)


def clean_up(host: HostKsm, alive: list[HostTask], say: Callable[[str], None]) -> None:
    """The task processes ended, the knobs restored: a second signal cannot cut it short."""
    with shielded():
        end_host_tasks(alive)
        errors = host.restore()
        if errors:
            say(f"  kernel: WARNING: knobs not all restored: {errors}")


def print_steps(title: str, steps: list[Any], scans: bool = False) -> None:
    """--list: a walk's or a case's steps, one line each."""
    print(title)
    for s in steps:
        print(f"  {s.name}{f' (+{s.scans} scans)' if scans else ''}: "
              + "; ".join(" ".join(map(str, x)) for x in s.actions))


# ---- the command line -----------------------------------------------------------------------

def table(rs: list[dict[str, Any]]) -> str:
    head = ("step", "field", "kernel", "uksm", "agree")
    cells = [head] + [(r["step"], r["field"], str(r["kernel"]), str(r["uksm"]),
                       "yes" if r["agree"] else "NO") for r in rs]
    w = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = [" | ".join(c[i].ljust(w[i]) for i in range(5)).rstrip() for c in cells]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)


def table_618(rs: list[dict[str, Any]]) -> str:
    """--kernel 6.18's rows: case, step, field, what the source asserts,
    the kernel's value, uksm's, agree."""
    head = ("case", "step", "field", "source asserts", "kernel", "uksm", "agree")
    cells = [head] + [(r["case"], r["step"], r["field"], r.get("assert", "-"), str(r["kernel"]),
                       str(r["uksm"]), "yes" if r["agree"] else "NO") for r in rs]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [" | ".join(c[i].ljust(w[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)


def main_618(a: argparse.Namespace) -> int:
    """``--kernel 6.18``: every case (or --case) on uksm, then on the host."""
    import twin618
    cs = twin618.cases()
    if a.list:
        for c in cs.values():
            print_steps(f"{c.name}: {c.source}", c.steps, scans=True)
        return 0
    unknown = [n for n in a.case if n not in cs]
    if unknown:
        raise BadInput(f"--case: no case {', '.join(unknown)} (cases: {', '.join(cs)})")
    host = HostKsm(a.sysfs)
    why = host.unavailable()
    if why:
        raise BadInput(f"no host KSM to compare with: {why}")

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _sigterm)
    rs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for c in (cs[n] for n in (a.case or list(cs))):
        say(f"twin: case {c.name} ({c.source})")
        u = twin618.run_uksm(c, say, a.timeout)
        k = twin618.run_kernel(c, host, say, a.timeout)
        rs += twin618.judge(c, k, u)
    ok = all(r["agree"] for r in rs)
    if a.json:
        print(json.dumps({"kernel_mode": "6.18", "kernel": platform.release(), "agree": ok,
                          "elapsed_s": round(time.monotonic() - t0, 2), "rows": rs}, indent=1))
    else:
        print(table_618(rs))
        print(f"{len({r['case'] for r in rs})} cases: {sum(bool(r['agree']) for r in rs)}/{len(rs)} "
              f"rows agree (kernel {platform.release()}, {time.monotonic() - t0:.1f} s)")
    return 0 if ok else 1


def _sigterm(_s: int, _f: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="twin.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one short KSM program on uksm and on this machine's real KSM "
                    "(/sys/kernel/mm/ksm, needs root) and compare, step by step, "
                    "pages_shared, pages_sharing, each task's ksm_stat "
                    "(ksm_rmap_items, ksm_merging_pages) and which pages share a frame.",
        epilog="Exit status: 0 all agree, 1 some field differs, 2 bad input or no host KSM. "
               "The host's KSM knobs are always restored (run=2, run=0, pages_to_scan=100, "
               "sleep_millisecs=20, max_page_sharing=256, use_zero_pages=0, smart_scan=1, "
               "advisor_mode=none). See docs/TWIN.md.")
    ap.add_argument("--kernel", default="2.6.32", choices=("2.6.32", "6.18"),
                    help="2.6.32 (default): the walks, uksm as 2.6.32; 6.18: the ported 6.x test "
                         "programs (tools/twin618.py: ksm_functional_tests, ksm_tests -U, LTP ksm01 "
                         "and ksm05) on uksm with kernel=\"6.18\" and on this kernel")
    ap.add_argument("--case", action="append", default=[],
                    help="with --kernel 6.18: only this case (repeatable; --list shows them)")
    ap.add_argument("--walk", default="full",
                    help="which walk (default: full; --list shows them and their steps)")
    ap.add_argument("--pages", type=int, default=32,
                    help=f"pages per task, 8..{MAX_PAGES} (default 32; at most 256 mappings of "
                         f"one KSM page, the kernel's max_page_sharing)")
    ap.add_argument("--scans", type=int, default=None,
                    help="full scans waited for after each step, 2..20 (default 3: the first "
                         "may have begun before the step)")
    ap.add_argument("--sysfs", default="/sys/kernel/mm/ksm", help="the host's KSM folder")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds each wait may take (default 60)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--list", action="store_true", help="list the walks and exit")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    try:
        if not 8 <= a.pages <= MAX_PAGES:
            raise BadInput(f"--pages: 8 .. {MAX_PAGES} (got {a.pages}; more would map one KSM "
                           f"page more than max_page_sharing=256 times, a cap since 4.13)")
        if a.scans is not None and not 2 <= a.scans <= 20:
            raise BadInput(f"--scans: 2 .. 20 (got {a.scans})")
        if not 1 <= a.timeout <= 3600:
            raise BadInput(f"--timeout: 1 .. 3600 seconds (got {a.timeout})")
        if a.kernel == "6.18":
            return main_618(a)
        if a.case:
            raise BadInput("--case is for --kernel 6.18 (the 2.6.32 twin has --walk)")
        ws = walks(a.pages)
        if a.list:
            for w in ws.values():
                print_steps(f"{w.name}: {w.about}", w.steps)
            return 0
        if a.walk not in ws:
            raise BadInput(f"--walk: no walk {a.walk!r} (walks: {', '.join(ws)})")
        host = HostKsm(a.sysfs)
        why = host.unavailable()
        if why:
            raise BadInput(f"no host KSM to compare with: {why}")
    except BadInput as e:
        print(f"twin: {e}", file=sys.stderr)
        return 2
    walk = ws[a.walk]
    if a.scans is not None:
        for s in walk.steps:
            s.scans = a.scans

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.monotonic()
    say(f"twin: walk {walk.name}, {a.pages} pages a task: uksm")
    u = run_uksm(walk, a.pages, say, a.timeout)
    t1 = time.monotonic()
    say("twin: kernel")
    k = run_kernel(walk, host, say, a.timeout)
    t2 = time.monotonic()
    rs = [r for s, ks, us in zip(walk.steps, k, u) for r in rows(s.name, ks, us)]
    ok = all(r["agree"] for r in rs)
    if a.json:
        print(json.dumps({"walk": walk.name, "pages": a.pages, "kernel": platform.release(),
                          "agree": ok, "uksm_s": round(t1 - t0, 2), "kernel_s": round(t2 - t1, 2),
                          "rows": rs}, indent=1))
    else:
        print(table(rs))
        for r in rs:
            if "difference" in r:
                print(f"{r['step']}: {r['difference']}")
        print(f"walk {walk.name}: {sum(r['agree'] for r in rs)}/{len(rs)} agree "
              f"(uksm {t1 - t0:.1f} s, kernel {platform.release()} {t2 - t1:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("twin: interrupted (the host's KSM knobs were restored)", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, TimeoutError, UksmError) as e:
        print(f"twin: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
