"""Shell verbs for scripts (issue 10): ``uksm task ...``, ``uksm wait ...``
and ``uksm kill TASK --at POINT``, on a cluster started with ``uksm up``.

Each verb is one call of the Python API (``uksm.Machine.attach``), so a
shell script and a Python script do the same things the same way::

    uksm up --cluster demo
    a=$(uksm task new --pages 8 --cluster demo)     # prints the task id, e.g. w1
    uksm task fill "$a" 7 --cluster demo
    uksm wait full-scans 2 --cluster demo           # prints the four counters
    uksm kill "$a" --at cow_after_copy --cluster demo
    uksm down --cluster demo

Exit status: 0 done; 2 bad input (nothing done); 1 the request failed or a
wait timed out; 3 a hung task was reported; 4 a task's data did not verify.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from uksm.cli.args import cluster_arg
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from uksm.kernel.ksm_stat import ksm_stat_text


def _int(s: str) -> int:
    """A whole number, decimal or 0x hex (the verbs' numbers: addresses,
    pages, counts, values; a knob's value is not one of them: ``uksm ctl``
    takes decimal, as sysfs does)."""
    try:
        return int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}")


def _data(a: argparse.Namespace) -> bytes:
    """``task write``'s DATA: UTF-8 text, or with --hex two hex digits a byte."""
    if not a.hex:
        return bytes(a.data.encode())
    try:
        return bytes.fromhex(a.data)
    except ValueError:
        raise ValueError(f"DATA {a.data!r} with --hex: not hex digits, two a byte (e.g. "
                         f"48690a for 'Hi\\n')") from None



def add_parsers(sub: Any) -> None:
    p = sub.add_parser("task", help="programmable tasks on a 'uksm up' cluster (docs/API.md)",
                       description="Start and drive programmable tasks, as uksm.Task does from "
                                   "Python. Addresses are byte offsets into the task's pages.")
    ts = p.add_subparsers(dest="verb", metavar="VERB")
    ts.required = True
    q = ts.add_parser("new", help="start a task; prints its id (e.g. w3)")
    q.add_argument("--pages", type=_int, required=True, help="pages in its address space")
    q.add_argument("--no-mergeable", dest="mergeable", action="store_false",
                   help="do not madvise(MERGEABLE) (no __ksm_enter yet)")
    cluster_arg(q)
    q = ts.add_parser("fill", help="fill pages with one byte value")
    q.add_argument("task")
    q.add_argument("value", type=_int, help="byte value 0..255")
    q.add_argument("--first", type=_int, default=0)
    q.add_argument("--count", type=_int, default=None, help="default: to the last page")
    cluster_arg(q)
    q = ts.add_parser("write", help="write bytes at an address")
    q.add_argument("task")
    q.add_argument("addr", type=_int)
    q.add_argument("data", help="text (UTF-8), or hex digits with --hex")
    q.add_argument("--hex", action="store_true")
    cluster_arg(q)
    q = ts.add_parser("read", help="read bytes at an address (printed as hex)")
    q.add_argument("task")
    q.add_argument("addr", type=_int)
    q.add_argument("n", type=_int)
    q.add_argument("--raw", action="store_true", help="write the bytes themselves to stdout")
    cluster_arg(q)
    q = ts.add_parser("madvise", help="madvise pages MERGEABLE, UNMERGEABLE or DONTNEED")
    q.add_argument("task")
    q.add_argument("first", type=_int)
    q.add_argument("count", type=_int)
    q.add_argument("advice", help="MERGEABLE, UNMERGEABLE or DONTNEED")
    cluster_arg(q)
    q = ts.add_parser("prctl", help="prctl(OPTION, ARG2..ARG5) in a task; prints what it returns",
                      description="Under --kernel 6.18: 67 (PR_SET_MEMORY_MERGE) with ARG2 1 makes "
                                  "every area of the task mergeable, now and later, 0 unmerges "
                                  "them all; 68 (PR_GET_MEMORY_MERGE) prints 0 or 1. EINVAL "
                                  "(status 1) for a non-zero ARG3..ARG5, any other option, and "
                                  "under 2.6.32, which has neither.")
    q.add_argument("task")
    q.add_argument("option", type=_int)
    for n in ("arg2", "arg3", "arg4", "arg5"):
        q.add_argument(n, type=_int, nargs="?", default=0)
    cluster_arg(q)
    q = ts.add_parser("fork", help="fork a task; prints the child's id (its address space the "
                                   "parent's copy-on-write copy)")
    q.add_argument("task")
    cluster_arg(q)
    q = ts.add_parser("pagemap", help="each page's frame, KSM flag, write protection and mapcount "
                                      "(as /proc/PID/pagemap, kpageflags, kpagecount)",
                      description="One line per page: the page, present or not, the frame it maps "
                                  "(the emulated PFN), ksm (KPF_KSM), wp (the PTE is read-only: a "
                                  "KSM page, or shared copy-on-write after a fork) and mapcount (the "
                                  "PTEs mapping that frame, in every task). Works on built-in "
                                  "workers too.")
    q.add_argument("task")
    q.add_argument("first", type=_int, nargs="?", default=0, help="first page (default 0)")
    q.add_argument("count", type=_int, nargs="?", default=None,
                   help="pages (default: to the last one)")
    q.add_argument("--json", action="store_true", help="one JSON list of the pages' dicts")
    cluster_arg(q)
    for verb, what in (("stat", "/proc/PID/ksm_stat, and rss: ksm_rmap_items, ksm_merging_pages "
                                "(2.6.32); 6.18's six lines under --kernel 6.18"),
                       ("verify", "check every page holds what was written (status 4 if not)"),
                       ("exit", "exit through the exit path; prints the __ksm_exit path")):
        q = ts.add_parser(verb, help=what)
        q.add_argument("task")
        cluster_arg(q)
    q = ts.add_parser("kill", help="kill a task (or: uksm kill TASK --at POINT)")
    q.add_argument("task")
    q.add_argument("--signal", default="KILL", type=str.upper, choices=["KILL", "TERM"])
    q.add_argument("--at", metavar="POINT", help="drive it to this kill point first")
    cluster_arg(q)
    q = ts.add_parser("points", help="list the kill points (name, where, what)")
    q = ts.add_parser("cursor", help="the task ksmd's scan cursor is in ('none' if none)")
    cluster_arg(q)
    q = ts.add_parser("arm", help="arm a kill point in ksmd (or, with --task, in a task)")
    q.add_argument("point")
    q.add_argument("--task")
    q.add_argument("--signal", default="KILL", type=str.upper, choices=["KILL", "TERM"])
    q.add_argument("--delay-ms", type=_int, help="ksmd points: stop there this long instead")
    cluster_arg(q)
    q = ts.add_parser("disarm", help="disarm the ksmd point (or, with --task, a task's)")
    q.add_argument("--task")
    cluster_arg(q)

    p = sub.add_parser("wait", help="wait for ksmd: full-scans N, or merged",
                       description="Return once full_scans has advanced by N (full-scans N) or "
                                   "the counters have settled over two full scans (merged); "
                                   "prints the four counters. Status 1 on timeout, 3 if a hung "
                                   "task is reported meanwhile.")
    ws = p.add_subparsers(dest="verb", metavar="WHAT")
    ws.required = True
    q = ws.add_parser("full-scans", help="N more full scans")
    q.add_argument("n", type=_int, nargs="?", default=2)
    q.add_argument("--timeout", type=float, default=60.0)
    cluster_arg(q)
    q = ws.add_parser("merged", help="the counters unchanged over two full scans")
    q.add_argument("--timeout", type=float, default=60.0)
    cluster_arg(q)


def _print_counters(c: dict[str, int]) -> None:
    for k, v in c.items():
        print(f"{k} {v}")


def run_verb(a: argparse.Namespace) -> int:
    """One verb through uksm.Machine.attach; API errors become one line
    and a status."""
    import uksm
    if a.cmd == "task" and a.verb == "points":
        for kp in uksm.Machine.kill_points():
            print(f"{kp.name:<28} {kp.where:<6} {kp.description}")
        return EXIT_OK
    statuses: tuple[tuple[Any, int], ...] = (
        (uksm.HungTask, EXIT_HUNG), (uksm.IntegrityError, EXIT_INTEGRITY),
        ((ValueError, TypeError, KeyError, uksm.SegFault), EXIT_USAGE), (uksm.MachineError, EXIT_ERR),
        (OSError, EXIT_ERR))   # a fork's EAGAIN or ENOMEM
    m = None
    try:
        if a.cmd == "task" and a.verb == "write":
            _data(a)  # bad input is refused before the cluster is asked
        m = uksm.Machine.attach(a.cluster)
        m._by = "cli"  # errors name the options as flags (--timeout, --pages)
        return _verb(m, a)
    except Exception as e:
        status = next((st for cls, st in statuses if isinstance(e, cls)), None)
        if status is None:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"uksm: {msg}", file=sys.stderr)
        return status
    finally:
        if m is not None:
            m.close()


def _verb(m: Any, a: argparse.Namespace) -> int:
    if a.cmd == "kill":  # uksm kill TASK --at POINT
        if a.all or len(a.workers) != 1:
            raise ValueError("kill --at: exactly one task id (and no --all)")
        print(m._handle(a.workers[0]).kill(a.signal, at=a.at))
        return EXIT_OK
    if a.cmd == "wait":
        c = m.wait_full_scans(a.n, a.timeout) if a.verb == "full-scans" else m.wait_merged(a.timeout)
        _print_counters(c)
        return EXIT_OK
    v = a.verb
    if v == "new":
        print(m.task(pages=a.pages, mergeable=a.mergeable).id)
        return EXIT_OK
    if v == "cursor":
        t = m.scan_cursor()
        print(t.id if t is not None else "none")
        return EXIT_OK
    if v == "arm":
        if a.task:
            if a.delay_ms is not None:
                raise ValueError("--delay-ms: delays exist only at ksmd points")
            m._handle(a.task).arm(a.point, a.signal)
        else:
            m.arm(a.point, a.signal, a.delay_ms)
        return EXIT_OK
    if v == "disarm":
        m._handle(a.task).disarm() if a.task else m.disarm()
        return EXIT_OK
    t = m._handle(a.task)
    verbs: dict[str, Callable[[], Any]] = {
        "fill": lambda: t.fill(a.value, a.first, a.count),
        "write": lambda: t.write(a.addr, _data(a)),
        "madvise": lambda: t.madvise(a.first, a.count, a.advice),
        "verify": lambda: print(f"{t.verify()} pages verified"),
        "exit": lambda: print(t.exit()),
        "fork": lambda: print(t.fork().id),
        "prctl": lambda: print(t.prctl(a.option, a.arg2, a.arg3, a.arg4, a.arg5)),
        "kill": lambda: print(t.kill(a.signal, at=a.at)),
        "stat": lambda: print(ksm_stat_text(t.stat()), end=""),
    }
    if v == "pagemap":
        pages = t.pagemap(a.first, a.count)
        if a.json:
            print(json.dumps(pages))
            return EXIT_OK
        print(f"{'page':>7} {'present':>7} {'frame':>8} {'ksm':>3} {'wp':>2} {'mapcount':>8}")
        for i, p in enumerate(pages, a.first):
            frame = "-" if p["frame"] is None else str(p["frame"])
            print(f"{i:>7} {int(p['present']):>7} {frame:>8} {int(p['ksm']):>3} "
                  f"{int(p['write_protected']):>2} {p['mapcount']:>8}")
        return EXIT_OK
    if v == "read":
        data = t.read(a.addr, a.n)
        if a.raw:
            sys.stdout.buffer.write(data)
        else:
            print(data.hex())
        return EXIT_OK
    verbs[v]()
    return EXIT_OK


__all__ = ["add_parsers", "run_verb"]
