#!/usr/bin/env python3
"""profile_ksmd: run uksm's ksmd scan loop in this process, timed and under cProfile.

Boots a cluster like ``tools/bench_ksm.py`` (W workers x N/W pages of the
``dup:K`` workload, run=0 until every worker is ready) but with no ksmd
process: a Supervisor subclass only allocates ksmd's task row, and this
process attaches to the cluster on that row and runs ``uksm.kernel.ksmd.Ksmd.run()``
itself -- in the main thread, as ``uksm.kernel.ksmd.main`` does -- while a helper
thread watches the counters (and reaps children) and stops ksmd once
``pages_shared == K`` and ``pages_sharing == N - K``.

Modes (``--mode``):

- ``plain``: no profiler; per batch (``ksm_do_scan``) wall times, split into
  the first full scan (checksums only) and the second (the merges): the
  true per-page cost in microseconds.
- ``cprofile``: the same under cProfile; prints the top functions by
  tottime and by cumtime (the profiler inflates Python-call-heavy code,
  typically 2-3x: read the shares, take the absolute cost from ``plain``).
- ``both`` (default): ``plain`` then ``cprofile``, each on a fresh cluster.

``--out FILE`` keeps the cProfile stats (``python3 -m pstats FILE``).
Nothing of uksm is left running or in /dev/shm afterwards, even on Ctrl-C.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import sys
import threading
import time
from typing import Any

from uksm.host import log as ulog
from uksm.host import shm
from uksm.kernel.cluster import Cluster
from uksm.kernel.ksm import run_store
from uksm.kernel.ksmd import Ksmd
from uksm.kernel.layout import (
    H_KSMD_PID,
    H_KSMD_TASK,
    K_FULL_SCANS,
    K_PAGES_SCANNED,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    L_SEQNR,
    R_KSMD,
    T_PID,
)
from uksm.proc.supervisor import Supervisor

# the benchmark this profiles: tools/ is a folder of scripts, never installed
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from bench_ksm import (
    expected_counts,
    machine,
    shielded,
    split_pages,
    start_workers,
    uksm_config,
)


class InProcessKsmdSupervisor(Supervisor):
    """start_ksmd only reserves ksmd's task row: this process runs ksmd."""

    ksmd_row = -1

    def start_ksmd(self) -> None:
        row = self.alloc_row(R_KSMD, os.getpid())
        self.cl.q[H_KSMD_TASK] = row
        self.cl.q[H_KSMD_PID] = os.getpid()
        self.ksmd_row = row
        self.ksmd = None


class TimedKsmd(Ksmd):
    """Ksmd with each batch (ksm_do_scan) timed: (seqnr before, pages, ns)."""

    def __init__(self, cl: Cluster, log: Any) -> None:
        super().__init__(cl, log)
        self.batches: list[tuple[int, int, int]] = []
        self.flush_ns = 0
        self.flushes = 0
        flush = self.alloc.flush

        def timed_flush() -> None:  # the frees (MADV_REMOVE), after each batch
            t0 = time.perf_counter_ns()
            flush()
            self.flush_ns += time.perf_counter_ns() - t0
            self.flushes += 1
        self.alloc.flush = timed_flush  # type: ignore[method-assign]

    def ksm_do_scan(self, budget: int) -> int:
        seq = self.q[L_SEQNR]
        t0 = time.perf_counter_ns()
        n = super().ksm_do_scan(budget)
        self.batches.append((seq, n, time.perf_counter_ns() - t0))
        return n


def one_run(a: argparse.Namespace, profile: bool, say: Any) -> dict[str, Any]:
    name = f"prof{os.getpid()}{'p' if profile else 'n'}"
    per = split_pages(a.pages, a.workers)
    exp_shared, exp_sharing = expected_counts(a.pages, a.distinct, per)
    sup = InProcessKsmdSupervisor(name, uksm_config(a.pages, a.workers, a.pages_to_scan,
                                                    a.sleep_ms), None, quiet=True)
    res: dict[str, Any] = {"mode": "cprofile" if profile else "plain"}
    kcl: Cluster | None = None
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup.boot()
        q = sup.cl.q
        res["workers_ready_s"] = round(start_workers(sup, a.pages, a.distinct, a.workers, a.seed,
                                                     a.timeout, say), 3)
        kcl = Cluster.attach(name)
        kcl.bind(sup.ksmd_row)
        kcl.q[kcl.tbase(sup.ksmd_row) + T_PID] = os.getpid()
        ksmd = TimedKsmd(kcl, ulog.NULL_LOG)
        done: dict[str, Any] = {}

        def watch() -> None:
            t0 = done["t0"]
            while not ksmd.stop:
                sup.poll()
                if q[K_PAGES_SHARED] == exp_shared and q[K_PAGES_SHARING] == exp_sharing:
                    done["t"] = time.monotonic() - t0
                    break
                if sup.errors or time.monotonic() - t0 > a.timeout:
                    done["error"] = "; ".join(sup.errors) or f"not merged after {a.timeout}s"
                    break
                time.sleep(0.005)
            ksmd.stop = True

        say(f"  {res['mode']}: workers ready ({res['workers_ready_s']}s); run=1, ksmd in-process")
        scanned0 = q[K_PAGES_SCANNED]
        done["t0"] = time.monotonic()
        run_store(sup.cl, 1)
        th = threading.Thread(target=watch, daemon=True)
        th.start()
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.runcall(ksmd.run)
        else:
            ksmd.run()
        wall = time.perf_counter() - t0
        for s, h in old.items():
            signal.signal(s, h)
        th.join(timeout=10)
        if "error" in done:
            raise RuntimeError(done["error"])
        run_store(sup.cl, 0)
        scanned = q[K_PAGES_SCANNED] - scanned0
        res.update(merge_s=round(done.get("t", wall), 4), ksmd_run_s=round(wall, 4),
                   pages_scanned=scanned, full_scans=q[K_FULL_SCANS])
        # per pass, from the batch timings (each batch lies within one pass
        # when pages_to_scan divides the pages of every worker)
        passes: dict[int, list[int]] = {}
        for seq, n, ns in ksmd.batches:
            p = passes.setdefault(seq, [0, 0, 0])
            p[0] += n
            p[1] += ns
            p[2] += 1
        res["passes"] = [{"seqnr": s, "pages": p[0], "batches": p[2], "s": round(p[1] / 1e9, 4),
                          "us_per_page": round(p[1] / 1e3 / p[0], 3) if p[0] else None}
                         for s, p in sorted(passes.items())]
        scan_ns = sum(ns for _s, _n, ns in ksmd.batches)
        res["scan_s"] = round(scan_ns / 1e9, 4)
        res["us_per_page"] = round(scan_ns / 1e3 / max(1, sum(n for _s, n, _ns in ksmd.batches)), 3)
        res["flush_s"] = round(ksmd.flush_ns / 1e9, 4)
        res["flushes"] = ksmd.flushes
        if prof is not None:
            res["stats"] = prof
        with shielded():
            sup.stop_workers(timeout=120)
    finally:
        with shielded():
            for s, h in old.items():
                signal.signal(s, h)
            if sup.booted:
                sup.kill_all()
                if sup.ksmd_row >= 0:
                    sup.free_row(sup.ksmd_row)
                if kcl is not None:
                    kcl.close()
                res["leftovers"] = sup.teardown()
            ulog.close()
            res["leftovers"] = sorted(set(res.get("leftovers", [])) | set(shm.leftovers(name)))
    return res


def print_stats(prof: cProfile.Profile, top: int, out: str | None) -> None:
    if out:
        prof.dump_stats(out)
        print(f"cProfile stats saved to {out}")
    for key in ("tottime", "cumtime"):
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats(key).print_stats(top)
        text = s.getvalue()
        # keep the table, drop the preamble pstats prints before it
        i = text.find("   ncalls")
        print(f"--- top {top} by {key} ---")
        print(text[i:] if i >= 0 else text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="profile_ksmd", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=200_000)
    ap.add_argument("--distinct", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--pages-to-scan", type=int, default=10_000)
    ap.add_argument("--sleep-ms", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--mode", choices=("plain", "cprofile", "both"), default="both")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", help="save the cProfile stats to this file")
    a = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    mc = machine()
    print(f"machine: {mc['nproc']} cpus, {mc['cpu_model']}, Linux {mc['kernel']}, "
          f"Python {mc['python']}, load {mc['loadavg_1m']:.2f}")
    print(f"layout: {a.pages:,} pages, {a.distinct} contents, {a.workers} workers, "
          f"pages_to_scan {a.pages_to_scan}, sleep_millisecs {a.sleep_ms}")
    modes = ("plain", "cprofile") if a.mode == "both" else (a.mode,)
    status = 0
    try:
        for mode in modes:
            r = one_run(a, mode == "cprofile", say)
            print(f"\n[{mode}] merged in {r['merge_s']}s (ksmd.run {r['ksmd_run_s']}s, in "
                  f"ksm_do_scan {r['scan_s']}s), {r['pages_scanned']:,} pages scanned, "
                  f"{r['us_per_page']} us/page overall")
            print(f"  outside ksm_do_scan: Allocator.flush (MADV_REMOVE of freed frames) "
                  f"{r['flush_s']}s in {r['flushes']} calls; the rest of ksmd.run "
                  f"{round(r['ksmd_run_s'] - r['scan_s'] - r['flush_s'], 4)}s")
            for p in r["passes"]:
                print(f"  pass seqnr={p['seqnr']}: {p['pages']:,} pages in {p['batches']} batches, "
                      f"{p['s']}s, {p['us_per_page']} us/page")
            print(f"  /dev/shm leftovers: {r['leftovers'] or 'none'}")
            if r["leftovers"]:
                status = 1
            if "stats" in r:
                print_stats(r["stats"], a.top, a.out)
    except KeyboardInterrupt:
        say("interrupted: cleaned up")
        return 130
    return status


if __name__ == "__main__":
    raise SystemExit(main())
