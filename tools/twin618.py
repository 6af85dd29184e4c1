#!/usr/bin/env python3
"""twin618: 6.18's stable tree -- chains and dups under max_page_sharing --
run on uksm with kernel="6.18" and on this machine's real KSM, compared.

What it does
------------
Each *case* is a few steps in tools/twin.py's style (tasks holding one
private anonymous mapping; fill, madvise, fork; then a wait for K full
scans), run twice:

- **uksm**: ``uksm.Machine(kernel="6.18")`` through the public API, with
  ``m.ksm["max_page_sharing"]`` and ``m.ksm["stable_node_chains_prune_millisecs"]``
  set as the case says;
- **kernel**: the host's KSM (/sys/kernel/mm/ksm), the same knobs, the
  tasks as twin.py makes them (child processes driven over a socket).

After every step ``pages_shared``, ``pages_sharing``, ``stable_node_chains``
and ``stable_node_dups`` are compared (the kernel's relative to their
values before the case: needs root, the host's KSM otherwise idle), next to
the number the case's source asserts where it has one:

- ``ksm-M``: ksm_tests.c ``-M -p 10`` (10 pages of '*': 1 shared, 9 sharing);
- ``merge-N-M``: ksm_tests.c check_ksm_merge's formula with N pages and
  max_page_sharing M;
- ``ksm06-N``: LTP ksm06's max_page_sharing half on one node (N pages,
  max_page_sharing N: 1 shared, N - 1 sharing);
- ``once``, ``prune``, ``empty``, ``fork``: what 6.18's mm/ksm.c does with
  a KSM page mapped once, stale dups, an emptied chain, a forked KSM page.

The host's KSM is used only under ``flock /tmp/hostksm.lock``; its knobs
are ALWAYS put back afterwards (tools/hostksm.py RESTORE: run=2, run=0,
pages_to_scan=100, sleep_millisecs=20, max_page_sharing=256,
stable_node_chains_prune_millisecs=2000, use_zero_pages=0, smart_scan=1,
advisor_mode=none).  During a case smart_scan=0 (6.7's smart scan would
skip pages a few scans) and use_zero_pages=0.

Usage::

    python3 tools/twin618.py             # every case, a table
    python3 tools/twin618.py --case prune --json
    python3 tools/twin618.py --list

Exit status: 0 all agree, 1 some differ, 2 bad input or no host KSM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hostksm import HostKsm, host_lock, shielded
from twin import BadInput, HostTask, end_host_tasks, fork_host_task, start_host_task

FIELDS = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
Action = tuple[Any, ...]   # ("task", name, pages) | ("fill", name, first, count, value)
#                            | ("madvise", name, first, count, advice) | ("fork", name, child)


@dataclass
class Case:
    name: str
    about: str
    limit: int                     # max_page_sharing
    prune_ms: int                  # stable_node_chains_prune_millisecs
    steps: list[tuple[str, list[Action], dict[str, int]]]   # (step, actions, what the source asserts)


def merge_check(n: int, m: int) -> dict[str, int]:
    """ksm_tests.c check_ksm_merge for n pages and max_page_sharing m."""
    if n % m in (0, 1):
        return {"pages_shared": n // m, "pages_sharing": n // m * (m - 1)}
    return {"pages_shared": n // m + 1, "pages_sharing": n - (n // m + 1)}


def _same(n: int) -> list[Action]:
    return [("task", "A", n), ("fill", "A", 0, n, 0x2A), ("madvise", "A", 0, n, "MERGEABLE")]


def cases() -> dict[str, Case]:
    cs = [Case("ksm-M", "ksm_tests.c -M -p 10", 256, 2000, [("merge", _same(10), merge_check(10, 256))])]
    for n, m in ((10, 3), (11, 3), (8, 2), (5, 2)):
        cs.append(Case(f"merge-{n}-{m}", f"check_ksm_merge, {n} pages, max_page_sharing {m}", m, 2000,
                       [("merge", _same(n), merge_check(n, m))]))
    cs.append(Case("ksm06-100", "LTP ksm06, one node, 100 pages, max_page_sharing 100", 100, 2000,
                   [("merge", _same(100), {"pages_shared": 1, "pages_sharing": 99})]))
    cs.append(Case("once", "two pages merged, one written: the KSM page stays, mapped once", 256, 2000,
                   [("merge", _same(2), {}), ("write-1", [("fill", "A", 1, 1, 0x31)], {})]))
    cs.append(Case("prune", "max 2, 4 pages (2 dups); pages 0-1 discarded, page 3 written", 2, 0,
                   [("merge", _same(4), {}),
                    ("discard-write", [("madvise", "A", 0, 2, "DONTNEED"), ("fill", "A", 3, 1, 0x33)], {})]))
    cs.append(Case("empty", "max 2, 5 pages; page 4 written, pages 0-3 discarded", 2, 2000,
                   [("merge", _same(5), {}),
                    ("discard", [("fill", "A", 4, 1, 0x34), ("madvise", "A", 0, 4, "DONTNEED")], {})]))
    cs.append(Case("fork", "max 2, 2 pages merged, then a fork: past the limit, no dup", 2, 2000,
                   [("merge", _same(2), {}), ("fork", [("fork", "A", "B")], {})]))
    return {c.name: c for c in cs}


# ---- uksm ----------------------------------------------------------------------------------

def run_uksm(case: Case, timeout: float) -> list[dict[str, int]]:
    import uksm
    snaps = []
    with uksm.Machine(kernel="6.18", frames=1024, max_pages=256, pages_to_scan=5000,
                      sleep_millisecs=5) as m:
        m.ksm["max_page_sharing"] = case.limit
        m.ksm["stable_node_chains_prune_millisecs"] = case.prune_ms
        if "smart_scan" in m.ksm:
            m.ksm["smart_scan"] = 0
        tasks: dict[str, Any] = {}
        for _step, actions, _want in case.steps:
            for a in actions:
                op, name = a[0], a[1]
                if op == "task":
                    tasks[name] = m.task(pages=a[2], mergeable=False)
                elif op == "fill":
                    tasks[name].fill(a[4], a[2], a[3])
                elif op == "madvise":
                    tasks[name].madvise(a[2], a[3], a[4])
                elif op == "fork":
                    tasks[a[2]] = tasks[name].fork()
            m.wait_full_scans(3, timeout=timeout)
            snaps.append({f: int(m.ksm[f]) for f in FIELDS})
    return snaps


# ---- the kernel ------------------------------------------------------------------------------

def run_kernel(case: Case, host: HostKsm, say: Callable[[str], None], timeout: float) -> list[dict[str, int]]:
    snaps: list[dict[str, int]] = []
    with host_lock(say, timeout):
        alive: list[HostTask] = []
        try:
            host.write("run", "2")   # no KSM page left: max_page_sharing is EBUSY otherwise
            host.write("run", "0")
            base = {f: host.int(f) for f in FIELDS}
            for name, value in (("pages_to_scan", "5000"), ("sleep_millisecs", "5"), ("use_zero_pages", "0"),
                                ("smart_scan", "0"), ("advisor_mode", "none"),
                                ("max_page_sharing", str(case.limit)),
                                ("stable_node_chains_prune_millisecs", str(case.prune_ms))):
                host.write(name, value)
            host.write("run", "1")
            tasks: dict[str, HostTask] = {}
            for step, actions, _want in case.steps:
                for a in actions:
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
                s0, end = host.int("full_scans"), time.monotonic() + timeout
                while host.int("full_scans") < s0 + 3:
                    if time.monotonic() > end:
                        raise TimeoutError(f"kernel: 3 full scans not done in {timeout:.0f}s ({step})")
                    time.sleep(0.002)
                host.write("run", "0")   # read a still snapshot (LTP's ksm_group_check does too)
                snaps.append({f: host.int(f) - base[f] for f in FIELDS})
                host.write("run", "1")
        finally:
            with shielded():
                end_host_tasks(alive)
                errors = host.restore()
                if errors:
                    say(f"  kernel: WARNING: knobs not all restored: {errors}")
    return snaps


def compare(case: Case, k: list[dict[str, int]], u: list[dict[str, int]]) -> list[dict[str, Any]]:
    rows = []
    for (step, _a, want), ks, us in zip(case.steps, k, u):
        for f in FIELDS:
            row = {"case": case.name, "step": step, "field": f, "kernel": ks[f], "uksm": us[f],
                   "source": want.get(f, ""), "agree": ks[f] == us[f] and want.get(f, us[f]) == us[f]}
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "step", "field", "source", "kernel", "uksm", "agree")
    cells = [head] + [tuple(str(r[h] if h != "agree" else ("yes" if r["agree"] else "NO")) for h in head)
                      for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(w[i]) for i in range(len(head))).rstrip() for c in cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="6.18's stable tree (chains, dups, max_page_sharing) on uksm "
                                 "kernel=6.18 and on this machine's KSM (needs root), compared")
    ap.add_argument("--case", action="append", help="a case (repeatable; default every case)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--json", action="store_true", help="the rows as JSON")
    ap.add_argument("--sysfs", default="/sys/kernel/mm/ksm", help="the host's KSM folder")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per wait (default 120)")
    a = ap.parse_args(argv)
    cs = cases()
    if a.list:
        print("\n".join(f"{c.name:12} {c.about}" for c in cs.values()))
        return 0
    try:
        chosen = [cs[n] for n in (a.case or list(cs))]
    except KeyError as e:
        print(f"twin618: unknown case {e} (--list shows them)", file=sys.stderr)
        return 2
    host = HostKsm(a.sysfs)
    why = host.unavailable()
    if why is None and not os.path.exists(os.path.join(a.sysfs, "stable_node_dups")):
        why = f"{a.sysfs}/stable_node_dups is missing (a kernel before 4.13)"
    if why:
        print(f"twin618: no host KSM to compare with: {why}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    try:
        for c in chosen:
            u = run_uksm(c, a.timeout)
            k = run_kernel(c, host, lambda s: print(s, file=sys.stderr), a.timeout)
            rows += compare(c, k, u)
    except (BadInput, TimeoutError, RuntimeError, OSError) as e:
        print(f"twin618: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if a.json else table(rows))
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
