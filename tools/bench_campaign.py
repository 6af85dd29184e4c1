"""Kills per second of ``uksm campaign`` with 1, 2 and N runs at once.

Each measurement is a real campaign (``uksm campaign --engine local`` in a
subprocess, a fresh output file) of ``--runs-per-slot`` x P runs of
``--kills`` kills each, P the parallelism; it prints the wall time, the
kills delivered (read from the results) and kills/s.  Nothing is asserted:
on a shared or loaded machine the figures say what this machine gave at
that moment.

    python tools/bench_campaign.py [--parallel 1,2,4] [--kills 30] [--engine local|ray]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(parallel: int, a: argparse.Namespace, tmp: str) -> tuple[float, int, int, int]:
    out = os.path.join(tmp, f"p{parallel}.jsonl")
    runs = a.runs_per_slot * parallel
    argv = [sys.executable, "-m", "uksm", "campaign", "--seeds", f"1-{runs}", "--points", a.points,
            "--kills", str(a.kills), "--workers", str(a.workers), "--pages", str(a.pages),
            "--parallel", str(parallel), "--engine", a.engine, "--keep-logs", "none",
            "--out", out, "--quiet"]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True)
    wall = time.monotonic() - t0
    with open(out) as f:
        rows = [json.loads(x) for x in f]
    if p.returncode not in (0, 1):
        sys.exit(f"campaign failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, sum(r["kills"] for r in rows), len(rows), sum(r["status"] != "clean" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", default=f"1,2,{max(4, 2 * (os.cpu_count() or 1))}",
                    help="parallelisms to measure (default 1,2,max(4, 2 x CPUs))")
    ap.add_argument("--runs-per-slot", type=int, default=3)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--points", default="random")
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    a = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"runs of {a.kills} kills, {a.workers} workers x {a.pages} pages, engine {a.engine}")
    print(f"{'parallel':>8} {'runs':>5} {'kills':>6} {'wall s':>8} {'kills/s':>8} {'failed':>6}")
    with tempfile.TemporaryDirectory(prefix="bench_campaign") as tmp:
        for n in (int(x) for x in a.parallel.split(",")):
            wall, kills, runs, failed = measure(n, a, tmp)
            print(f"{n:>8} {runs:>5} {kills:>6} {wall:>8.1f} {kills / wall:>8.1f} {failed:>6}",
                  flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
