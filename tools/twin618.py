#!/usr/bin/env python3
"""twin618: 6.18's zero pages and smart scan, on uksm (kernel="6.18") and on
this machine's KSM, case by case (issue 23 item 4; tools/twin.py's style
and its task processes).

The cases, with what their sources assert:

- ``Z0``, ``Z1``: ksm_tests.c ``-Z -p 10 -z 0|1`` (check_ksm_zero_page_merge):
  ten zero pages, MADV_MERGEABLE, run=1, full_scans + 2: pages_shared 1,
  pages_sharing 9 with use_zero_pages 0; 0 and 0 with 1, where the pages
  map the kernel's zero page instead (ksm_zero_pages 10, 6.6);
- ``unmerge-zero``: ksm_functional_tests.c test_unmerge_zero_pages: 512
  zero pages merged (the task's ksm_zero_pages 512), MADV_UNMERGEABLE on
  the first half (256), a distinct write to each page of the second half
  (0), and then no two pages on one frame.  ksmd is stopped (run=0) after
  the merge on both sides, so that nothing merges again meanwhile;
- ``ksm07``: LTP ksm07: smart_scan 1, one page of 'a', pages_to_scan 100,
  sleep 0; after at least 30 full scans run=0: pages_skipped grew by at
  least half the full scans (LTP's check), and exactly as
  should_skip_rmap_item says for one page met at every full scan (the
  pages scanned are its looks: scans 1-4, 6, 9, 14, then every 9th).

Compared per case: the global counters (relative to before the case on
the host), the task's ksm_zero_pages (/proc/PID/ksm_stat), how many
distinct frames the task's pages map, and ksm07's two checks.  The host's
KSM is used under ``flock /tmp/hostksm.lock`` and its knobs ALWAYS
restored (tools/hostksm.py: run=2, run=0, pages_to_scan=100,
sleep_millisecs=20, max_page_sharing=256, use_zero_pages=0, smart_scan=1,
advisor_mode=none).

Usage::

    python3 tools/twin618.py            # every case, a table
    python3 tools/twin618.py --case Z1 --json

Exit status: 0 all agree, 1 some field differs, 2 bad input or no host KSM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from hostksm import HostKsm, host_lock, shielded
from twin import HostTask, _sigterm, end_host_tasks, start_host_task, table

CASES = ("Z0", "Z1", "unmerge-zero", "ksm07")
KSM07_SCANS = 30
PAGE = 4096


def not_skipped(scans: int) -> int:
    """The looks should_skip_rmap_item (6.7) gives one page in ``scans``
    full scans: 1-4, 6, 9, 14, then every 9th (tests/api/test_618_zero_smart.py)."""
    return len([k for k in (1, 2, 3, 4, 6, 9, 14) if k <= scans]) + max(0, scans - 14) // 9


def distinct_frames(pages: list[dict[str, Any]]) -> int:
    return len({p["frame"] for p in pages if p["present"]})


def ksm07_fields(scans: int, skipped: int, scanned: int) -> dict[str, Any]:
    return {"ksm07 passes (skipped >= scans/2)": skipped >= scans * 50 // 100,
            "skips as should_skip_rmap_item": scanned == not_skipped(scans) and skipped + scanned == scans}


# ---- uksm ---------------------------------------------------------------------------------------

def run_uksm(case: str, timeout: float) -> dict[str, Any]:
    import uksm
    from uksm.kernel.layout import M_ID, M_ZERO_PAGES

    def zero_pages(m: Any, t: Any) -> int:
        cl = m._t().cl
        return next(int(cl.q[cl.mbase(r) + M_ZERO_PAGES]) for r in range(cl.max_mms)
                    if cl.q[cl.mbase(r) + M_ID] == t.mm)

    pages = 512 if case == "unmerge-zero" else 10
    with uksm.Machine(kernel="6.18", frames=2 * pages + 64, max_pages=pages, sleep_millisecs=0,
                      pages_to_scan=100 if case == "ksm07" else 5000, run=0) as m:
        if case == "ksm07":
            t = m.task(pages=1)
            t.fill(ord("a"))
            m.ksm["run"] = 1
            m.wait_full_scans(KSM07_SCANS, timeout=timeout)
            m.ksm["run"] = 0
            return ksm07_fields(m.ksm["full_scans"], m.ksm["pages_skipped"], m.ksm["pages_scanned"])
        m.ksm["use_zero_pages"] = 0 if case == "Z0" else 1
        t = m.task(pages=pages, mergeable=False)
        t.fill(0)
        t.madvise(0, pages, "MERGEABLE")
        m.ksm["run"] = 1
        c = m.wait_full_scans(2, timeout=timeout)
        out: dict[str, Any] = {"pages_shared": c["pages_shared"], "pages_sharing": c["pages_sharing"],
                               "ksm_zero_pages": m.ksm["ksm_zero_pages"],
                               "task ksm_zero_pages": zero_pages(m, t), "frames": distinct_frames(t.pagemap())}
        if case == "unmerge-zero":
            m.ksm["run"] = 0
            t.madvise(0, pages // 2, "UNMERGEABLE")
            out["after unmerge of half"] = zero_pages(m, t)
            for i in range(pages // 2, pages):
                t.write(i * PAGE, (i * PAGE).to_bytes(4, "little"))
            out["after writes"] = zero_pages(m, t)
            out["frames after"] = distinct_frames(t.pagemap())
        return out


# ---- the kernel ---------------------------------------------------------------------------------

def proc_zero_pages(pid: int) -> int:
    with open(f"/proc/{pid}/ksm_stat") as f:
        return next(int(ln.split()[1]) for ln in f if ln.split()[0] == "ksm_zero_pages")


def wait_scans(host: HostKsm, n: int, timeout: float) -> None:
    s0, end = host.int("full_scans"), time.monotonic() + timeout
    while host.int("full_scans") < s0 + n:
        if time.monotonic() > end:
            raise TimeoutError(f"kernel: {n} full scans not done in {timeout:.0f}s")
        time.sleep(0.002)


def run_kernel(case: str, host: HostKsm, say: Callable[[str], None], timeout: float) -> dict[str, Any]:
    tasks: list[HostTask] = []
    with host_lock(say, timeout):
        try:
            host.write("run", "2")          # ksm_tests' main: unmerge everything first
            host.write("run", "0")
            knobs = {"sleep_millisecs": "0", "advisor_mode": "none", "max_page_sharing": "256",
                     "smart_scan": "1", "pages_to_scan": "100" if case == "ksm07" else "5000",
                     "use_zero_pages": "0" if case in ("Z0", "ksm07") else "1"}
            for name, value in knobs.items():
                host.write(name, value)
            if case == "ksm07":
                t = start_host_task("A", 1)
                tasks.append(t)
                t.cmd("fill", first=0, count=1, value=ord("a"))
                t.cmd("madvise", first=0, count=1, advice="MERGEABLE")
                b = {f: host.int(f) for f in ("full_scans", "pages_skipped", "pages_scanned")}
                host.write("run", "1")
                wait_scans(host, KSM07_SCANS, timeout)
                host.write("run", "0")
                d = {f: host.int(f) - b[f] for f in b}
                return ksm07_fields(d["full_scans"], d["pages_skipped"], d["pages_scanned"])
            pages = 512 if case == "unmerge-zero" else 10
            base = {f: host.int(f) for f in ("pages_shared", "pages_sharing", "ksm_zero_pages")}
            t = start_host_task("A", pages)
            tasks.append(t)
            t.cmd("fill", first=0, count=pages, value=0)
            t.cmd("madvise", first=0, count=pages, advice="MERGEABLE")
            host.write("run", "1")
            wait_scans(host, 2, timeout)
            out: dict[str, Any] = {f: host.int(f) - base[f] for f in base}
            out["task ksm_zero_pages"] = proc_zero_pages(t.pid)
            out["frames"] = distinct_frames(t.cmd("pagemap")["pages"])
            if case == "unmerge-zero":
                host.write("run", "0")
                t.cmd("madvise", first=0, count=pages // 2, advice="UNMERGEABLE")
                out["after unmerge of half"] = proc_zero_pages(t.pid)
                for i in range(pages // 2, pages):   # a different value in each page
                    t.cmd("fill", first=i, count=1, value=1 + i % 255)
                out["after writes"] = proc_zero_pages(t.pid)
                out["frames after"] = distinct_frames(t.cmd("pagemap")["pages"])
            return out
        finally:
            with shielded():
                end_host_tasks(tasks)
                errors = host.restore()
                if errors:
                    say(f"  kernel: WARNING: knobs not all restored: {errors}")


def rows(case: str, k: dict[str, Any], u: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"step": case, "field": f, "kernel": k[f], "uksm": u.get(f), "agree": k[f] == u.get(f)}
            for f in k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="twin618.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run ksm_tests -Z (use_zero_pages 0 and 1), ksm_functional_tests' "
                    "test_unmerge_zero_pages and LTP ksm07 on uksm (kernel 6.18) and on this "
                    "machine's KSM (needs root), and compare their numbers.",
        epilog="Exit status: 0 all agree, 1 some field differs, 2 bad input or no host KSM. "
               "The host's KSM knobs are always restored.")
    ap.add_argument("--case", action="append", choices=CASES,
                    help="a case (repeatable; default: all)")
    ap.add_argument("--sysfs", default="/sys/kernel/mm/ksm", help="the host's KSM folder")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds each wait may take (default 60)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    host = HostKsm(a.sysfs)
    why = host.unavailable()
    if why is None and not os.path.exists(os.path.join(a.sysfs, "smart_scan")):
        why = f"{a.sysfs}/smart_scan is missing (a kernel before 6.7)"
    if why:
        print(f"twin618: no host KSM to compare with: {why}", file=sys.stderr)
        return 2
    if not 1 <= a.timeout <= 3600:
        print(f"twin618: --timeout: 1 .. 3600 seconds (got {a.timeout})", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _sigterm)
    rs: list[dict[str, Any]] = []
    for case in a.case or CASES:
        say(f"twin618: {case}: uksm")
        u = run_uksm(case, a.timeout)
        say(f"twin618: {case}: kernel")
        k = run_kernel(case, host, say, a.timeout)
        rs += rows(case, k, u)
    ok = all(r["agree"] for r in rs)
    if a.json:
        print(json.dumps({"kernel": platform.release(), "agree": ok, "rows": rs}, indent=1))
    else:
        print(table(rs))
        print(f"{sum(r['agree'] for r in rs)}/{len(rs)} agree (kernel {platform.release()})")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("twin618: interrupted (the host's KSM knobs were restored)", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, TimeoutError) as e:
        print(f"twin618: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
