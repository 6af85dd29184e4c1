"""``uksm campaign``: a fault-injection sweep, fanned out over this machine
(``--engine local``) or a Ray cluster (``--engine ray``).

A sweep is the product of its axes -- seeds (a range), kill points,
signals, exit policies, hazard sets, workloads -- at one size (kills per
run, workers, pages), given on the command line or in a TOML/JSON file
(the same names; the command line wins).  Each element is a *run*: one
``uksm inject`` (``uksm run`` when ``kills`` is 0) in its own cluster, log
folder and process group (see :mod:`uksm.faults.campaign_run`).  Its id is
a hash of its parameters, so a campaign can be resumed: ``--resume`` skips
the runs already in the output file.

Results are one JSON line per run, appended to ``--out`` as runs finish
(whatever order they finish in); at the end a summary: totals, runs per
status, and for every failing run the command that reproduces it on one
machine.  The exit status is 0 only if every run of the sweep is recorded
and clean; 1 if one is not; 2 on bad usage; 130 if interrupted (what
finished is recorded, what did not is not: ``--resume`` runs it).

Engines: ``local`` runs ``--parallel`` runs at once in threads (each
waits on its run's processes; no extra dependency).  ``ray`` makes every
run a Ray task with ``num_cpus``/``memory`` needs, retried up to
``--max-retries`` times if its worker or node is lost (a lost node is not
a failed run: a run's own failure is a result, never an exception), on
the cluster at ``--address`` or on a local Ray started for the campaign;
results stream back with ``ray.wait``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from uksm.errors import UksmError
from uksm.faults.campaign_run import CampaignLine, RunParams, execute_run, reproduce, run_id
from uksm.kernel.layout import EXIT_POLICIES, HAZARDS, KERNELS

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
ENGINES = ("local", "ray")
KEEP_LOGS = ("failed", "all", "none")
SIGNALS = ("KILL", "TERM")
#: the sweep's axes (lists) and sizes (one value), with their defaults
AXES: dict[str, list[Any]] = {"seeds": [1], "points": ["random"], "signals": ["KILL"],
                              "policies": ["seed"], "hazards": ["none"], "workloads": ["vm"]}
SIZES: dict[str, int] = {"kills": 20, "workers": 2, "pages": 128}
#: the most runs one sweep may expand to: each is a dict of its parameters
#: (and, run, a line of --out and a folder of logs); a typo such as
#: 1-100000000 must be a one-line error, not minutes of swapping before the
#: kernel's OOM killer (1M seeds were 436 MB and 16 s to expand)
MAX_RUNS = 100_000


def bad(msg: str) -> None:
    raise UksmError(msg, EXIT_USAGE)


# -- the sweep ---------------------------------------------------------------------
def parse_seeds(v: Any) -> list[range]:
    """``5``, ``"1-100"`` (inclusive), ``"1,2,7"``, or a list of those (a
    TOML or JSON list: the same rules), as ranges -- not expanded, so that
    a sweep's size is known before anything is built.  A seed is a whole
    number >= 0, whichever way it is written."""
    if isinstance(v, bool):
        bad(f"seeds: {v!r} is not a seed")
    if isinstance(v, int):
        if v < 0:
            bad(f"seeds: {v} is not a seed (seeds are whole numbers >= 0)")
        return [range(v, v + 1)]
    if isinstance(v, list):
        return [r for x in v for r in parse_seeds(x)]
    if not isinstance(v, str):
        bad(f"seeds: {v!r} is not a seed or a range like 1-100")
    out: list[range] = []
    for part in str(v).split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not (lo.isascii() and lo.isdigit()) or (dash and not (hi.isascii() and hi.isdigit())):
            bad(f"seeds: {part!r} is not a seed or a range like 1-100 (seeds are whole "
                f"numbers >= 0)")
        a, b = int(lo), int(hi) if dash else int(lo)
        if b < a:
            bad(f"seeds: empty range {part!r}")
        out.append(range(a, b + 1))
    return out


def as_list(key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    bad(f"{key}: expected a list of names or a comma-separated string, got {v!r}")
    return []


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        bad(f"--config {path}: {e.strerror}")
    try:
        if path.endswith(".json"):
            d = json.loads(raw)
        else:
            import tomllib
            d = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        bad(f"--config {path}: {e}")
    if not isinstance(d, dict):
        bad(f"--config {path}: expected a table/object of sweep keys")
    known = set(AXES) | set(SIZES) | {"kernel"}
    unknown = sorted(set(d) - known)
    if unknown:
        bad(f"--config {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return d


def sweep(spec: dict[str, Any], skipped: list[str] | None = None) -> list[RunParams]:
    """Expand a sweep into its runs (checked: a bad name is a usage error,
    before anything runs; more than MAX_RUNS runs too, before any is
    built).  Hazard sets are ``none`` or names joined by ``+``.  A kill
    point the run's exit policy never passes (legacy's __ksm_exit has no
    slow path) is no run: such combinations are left out, counted in
    ``skipped`` with why (``uksm inject`` would refuse them as usage)."""
    from uksm.kernel import killpoints
    from uksm.workers.workloads import validate as wl_validate
    seed_ranges = parse_seeds(spec.get("seeds", AXES["seeds"]))
    ax = {k: as_list(k, spec.get(k, AXES[k])) for k in AXES if k != "seeds"}
    for k in SIZES:
        v = spec.get(k, SIZES[k])
        if isinstance(v, bool) or not isinstance(v, int):
            bad(f"{k}: expected an integer, got {v!r}")
    kills, workers, pages = (int(spec.get(k, SIZES[k])) for k in ("kills", "workers", "pages"))
    if kills < 0 or workers < 1 or pages < 1:
        bad("kills must be >= 0, workers and pages >= 1")
    for pt in ax["points"]:
        if pt not in ("random", "cursor", "all") and pt not in killpoints.POINTS:
            bad(f"unknown point {pt!r}: random, cursor, all, or one of {', '.join(killpoints.NAMES)}")
    for s in ax["signals"]:
        if s not in SIGNALS:
            bad(f"unknown signal {s!r} (KILL or TERM)")
    for pol in ax["policies"]:
        if pol not in EXIT_POLICIES:
            bad(f"unknown policy {pol!r} (one of: {', '.join(EXIT_POLICIES)})")
    hsets: list[list[str]] = []
    for hs in ax["hazards"]:
        names = [] if hs == "none" else hs.split("+")
        for h in names:
            if h not in HAZARDS:
                bad(f"unknown hazard {h!r} (none, or {'+'.join(HAZARDS)} joined by +)")
        hsets.append(sorted(set(names)))
    for wl in ax["workloads"]:
        wl_validate(wl)
    kernel = spec.get("kernel", KERNELS[0])
    if kernel not in KERNELS:
        bad(f"kernel: unknown {kernel!r} (one of: {', '.join(KERNELS)})")
    if kills == 0:  # uksm run: kill point and signal mean nothing
        ax["points"], ax["signals"] = ["none"], ["none"]
    n_seeds = sum(len(r) for r in seed_ranges)
    size = n_seeds * len(ax["points"]) * len(ax["signals"]) * len(ax["policies"]) * len(hsets) \
        * len(ax["workloads"])
    if size > MAX_RUNS:
        bad(f"the sweep is {n_seeds} seeds x {len(ax['points'])} points x "
            f"{len(ax['signals'])} signals x {len(ax['policies'])} policies x {len(hsets)} hazard "
            f"sets x {len(ax['workloads'])} workloads = {size} runs, more than {MAX_RUNS}: "
            f"split it into campaigns of fewer seeds (e.g. --seeds 1-1000, then 1001-2000, "
            f"each with its own --out)")
    runs: dict[str, RunParams] = {}
    never: Counter[tuple[str, str]] = Counter()
    seeds = itertools.chain.from_iterable(seed_ranges)
    for seed, pt, sig, pol, hz, wl in itertools.product(seeds, ax["points"], ax["signals"],
                                                        ax["policies"], hsets, ax["workloads"]):
        if pt not in killpoints.reachable(pol, kernel) and pt in killpoints.NAMES:
            never[(pt, pol)] += 1
            continue
        p: RunParams = {"cmd": "inject" if kills else "run", "seed": seed, "point": pt, "signal": sig,
             "policy": pol, "hazards": hz, "workload": wl, "kills": kills, "workers": workers,
             "pages": pages}
        if kernel != KERNELS[0]:  # absent under 2.6.32: its runs keep their ids
            p["kernel"] = kernel
        runs.setdefault(run_id(p), p)  # a sweep naming a value twice runs it once
    why = [f"{n} runs at {pt} under policy {pol}: never reached there (no slow path)"
           for (pt, pol), n in never.items()]
    if skipped is not None:
        skipped.extend(why)
    if not runs:
        bad("the sweep is empty" + (f" ({'; '.join(why)})" if why else ""))
    return list(runs.values())


def spec_from_args(a: argparse.Namespace) -> dict[str, Any]:
    spec = load_file(a.config) if a.config else {}
    for k in list(AXES) + list(SIZES) + ["kernel"]:
        v = getattr(a, k)
        if v is not None:
            spec[k] = v
    return spec


# -- results -------------------------------------------------------------------------
def recorded(path: str) -> dict[str, CampaignLine]:
    """The runs already in an output file, by run id (the last line of a
    run wins).  Every line must be a result: ``repair`` has removed a torn
    last line first; any other line that is not one is refused (a file
    that is not this campaign's, or damaged: appending to it would hide
    that, and its readers, jq or DuckDB, would fail on the line)."""
    out: dict[str, CampaignLine] = {}
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    r = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    r = None
                if not isinstance(r, dict) or "run_id" not in r or "status" not in r:
                    bad(f"--out {path}: line {n} is not a campaign result: refusing to append "
                        f"to it (move the file, or remove the line)")
                out[r["run_id"]] = r
    except FileNotFoundError:
        pass
    return out


def repair(path: str) -> int:
    """A torn last line (a campaign killed while writing it: no newline at
    the end) is cut off, so that the file is whole lines again and the run
    it was is run again.  Returns the bytes removed (0: nothing torn)."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:  # back to the end of the last whole line
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        f.truncate(pos)
        return size - pos


class Sink:
    """Appends result lines (one write and flush each, so a line is whole
    or, if the campaign dies mid-write, ignored by ``recorded``), counts,
    and prints progress on stderr."""

    def __init__(self, path: str, total: int, done: dict[str, CampaignLine], quiet: bool) -> None:
        self.f = open(path, "a")  # whole lines only: repair() ran first
        self.total, self.quiet = total, quiet
        self.results = dict(done)
        self.new = 0
        self.kills = 0
        self.failed = sum(1 for r in done.values() if r["status"] != "clean")
        self.t0 = time.monotonic()
        self.last = 0.0

    def add(self, r: CampaignLine) -> None:
        self.f.write(json.dumps(r, sort_keys=True) + "\n")
        self.f.flush()
        self.results[r["run_id"]] = r
        self.new += 1
        self.kills += r["kills"]
        if r["status"] != "clean":
            self.failed += 1
            if not self.quiet:
                print(f"campaign: run {r['run_id']} {r['status']}: {r['command']}", file=sys.stderr)
        self.progress(force=True)

    def progress(self, running: int = -1, force: bool = False) -> None:
        if self.quiet or (not force and time.monotonic() - self.last < 2.0):
            return
        self.last = time.monotonic()
        t = self.last - self.t0
        print(f"campaign: {len(self.results)}/{self.total} runs  kills {self.kills} "
              f"({self.kills / t if t > 0 else 0:.1f}/s)  failed {self.failed}"
              + (f"  running {running}" if running >= 0 else "") + f"  {t:.0f}s", file=sys.stderr)

    def close(self) -> None:
        self.f.close()


# -- engines -------------------------------------------------------------------------
class Stop:
    """SIGINT/SIGTERM: stop submitting, abort what runs, record nothing
    unfinished (the second signal is the default: immediate)."""

    def __init__(self) -> None:
        self.signum = 0
        self.old: dict[int, Any] = {}

    def __enter__(self) -> "Stop":
        for s in (signal.SIGINT, signal.SIGTERM):
            self.old[s] = signal.signal(s, self.on)
        return self

    def on(self, signum: int, _f: Any) -> None:
        self.signum = signum
        for s, h in self.old.items():
            signal.signal(s, h)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)

    def __bool__(self) -> bool:
        return bool(self.signum)


def record_or_drop(r: CampaignLine, sink: "Sink", stop: Stop) -> None:
    """Record a finished run, except a failure while stopping: it may be
    the stop's doing (a run interrupted by its guard), so it is neither
    recorded nor kept (its logs go too: --resume runs it again)."""
    logs = r.get("logs")
    if r["status"] == "clean" or (r["status"] != "aborted" and not stop):
        sink.add(r)
    elif logs:
        shutil.rmtree(logs, ignore_errors=True)


def run_local(todo: list[RunParams], a: argparse.Namespace, sink: Sink, stop: Stop) -> None:
    """A pool of --parallel threads, each waiting on one run's guard."""
    from uksm.faults.campaign_run import abort_all
    it = iter(todo)
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        running: set[Future[CampaignLine]] = set()
        while True:
            while not stop and len(running) < a.parallel:
                p = next(it, None)
                if p is None:
                    break
                running.add(pool.submit(execute_run, p, a.logs, a.keep_logs, run_timeout(a, p)))
            if not running:
                break
            if stop:  # again each round: a thread may have started its guard since
                abort_all()
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                record_or_drop(fut.result(), sink, stop)
            sink.progress(len(running))


def run_ray(todo: list[RunParams], a: argparse.Namespace, sink: Sink, stop: Stop) -> list[str]:
    """Every run a Ray task; returns the ids of runs lost more often than
    --max-retries (not failed: not recorded, --resume runs them again)."""
    try:
        import ray
    except ImportError:
        bad("--engine ray needs Ray: pip install 'uksm[ray]'")
    from ray.exceptions import RayError, TaskCancelledError
    address = a.address    # --address, else $RAY_ADDRESS (cmd_campaign)
    started = not address
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=a.parallel, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 << 20)
    lost: list[str] = []
    aborted: list[str] = []   # runs cancelled by the stop: their guards clean up
    pending: dict[Any, RunParams] = {}
    try:
        task = ray.remote(_ray_run).options(num_cpus=a.num_cpus, memory=a.memory_mib << 20,
                                            max_retries=a.max_retries, retry_exceptions=False)
        window = max(a.parallel, 2 * int(ray.cluster_resources().get("CPU", 1) / a.num_cpus))
        it = iter(todo)
        cancelled: set[Any] = set()
        stopped_at = 0.0
        while True:
            if stop and not stopped_at:
                stopped_at = time.monotonic()
            while not stop and len(pending) < window:
                p = next(it, None)
                if p is None:
                    break
                pending[task.remote(p, a.logs, a.keep_logs, run_timeout(a, p))] = p
            if not pending:
                break
            if stop:
                # a cancelled task's guard aborts its run (removes its cluster
                # and logs); force (the worker killed, the guard's stub with
                # it: the same clean-up) if that takes too long
                force = time.monotonic() - stopped_at > 30
                for ref in pending:
                    if force or ref not in cancelled:
                        ray.cancel(ref, force=force)
                        cancelled.add(ref)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                p = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except TaskCancelledError:
                    aborted.append(run_id(p))
                    continue
                except RayError as e:  # lost past its retries: no result
                    if not stop:
                        lost.append(run_id(p))
                        print(f"campaign: run {run_id(p)} lost ({type(e).__name__}), "
                              f"not recorded", file=sys.stderr)
                    continue
                record_or_drop(r, sink, stop)
            sink.progress(len(pending))
    finally:
        if started:
            ray.shutdown()
        if stop:
            guards_done(a.logs, aborted)
    return lost


def guards_done(log_root: str, rids: list[str], timeout: float = 30.0) -> None:
    """A cancelled Ray task's reference is ready as soon as the task is
    stopped, and a Ctrl-C reaches the Ray workers too: the guard of its
    run (``campaign_run``) may still be aborting it when the campaign is
    about to exit -- killing its processes, removing its cluster, then, last,
    its logs.  So wait for those logs to go (every guard done), then remove
    what a guard that died too left."""
    end = time.monotonic() + timeout
    left = [d for d in (os.path.join(log_root, r) for r in rids) if os.path.exists(d)]
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = [d for d in left if os.path.exists(d)]
    for d in left:
        shutil.rmtree(d, ignore_errors=True)


def _ray_run(params: RunParams, log_root: str, keep_logs: str, timeout: float) -> CampaignLine:
    """The Ray task: one run on the node Ray chose.  It needs room in that
    node's /dev/shm for its frame pool and address spaces: a node without
    is an error of the node (the task fails, the run is reported lost and
    not recorded), not a failed run."""
    need = 2 * params["workers"] * params["pages"] * 4096 + (1 << 20)
    st = os.statvfs("/dev/shm")
    if st.f_bavail * st.f_frsize < need:
        raise RuntimeError(f"{os.uname().nodename}: /dev/shm has less than {need >> 20} MiB free")
    return execute_run(params, log_root, keep_logs, timeout)


def run_timeout(a: argparse.Namespace, p: RunParams) -> float:
    if a.run_timeout:
        return float(a.run_timeout)
    # generous: a hang is the watchdog's to report (status hung); this is the last resort
    return 300.0 + 6.0 * p["kills"] + p["workers"] * p["pages"] / 100


def default_memory_mib(runs: list[RunParams]) -> int:
    """What one run needs: a Python process each (supervisor, ksmd,
    workers, the guard), plus its frame pool in /dev/shm."""
    return max((r["workers"] + 3) * 60 + r["workers"] * r["pages"] * 2 * 4096 // 2**20 + 16
               for r in runs)


# -- the summary ----------------------------------------------------------------------
def summary(runs: list[RunParams], sink: Sink, lost: list[str], elapsed: float) -> bool:
    """Print the summary on stdout; True if every run is recorded and clean."""
    res = [sink.results[run_id(p)] for p in runs if run_id(p) in sink.results]
    missing = len(runs) - len(res)
    kills = sum(r["kills"] for r in res)
    by = Counter(r["status"] for r in res)
    print(f"campaign: {len(runs)} runs, {len(res)} recorded ({sink.new} now, "
          f"{len(res) - sink.new} before), {kills} kills; this time {sink.kills} kills in "
          f"{elapsed:.1f}s ({sink.kills / elapsed if elapsed > 0 else 0:.1f} kills/s)")
    print("  status   " + "  ".join(f"{k} {v}" for k, v in sorted(by.items())))
    print("  totals   " + "  ".join(f"{k} {sum(r[k] for r in res)}" for k in (
        "recoveries", "lock_recoveries", "mismatches", "hung_tasks", "leftovers")))
    if lost:
        print(f"  lost     {len(lost)} runs (worker or node lost past --max-retries; --resume runs them)")
    if missing:
        print(f"  missing  {missing} runs not recorded (--resume runs them)")
    bad_runs = [r for r in res if r["status"] != "clean"]
    if bad_runs:
        print("  failing runs, each reproduced on one machine by:")
        for r in bad_runs:
            where = f"  (logs {r.get('node', '')}:{r['logs']})" if r.get("logs") else ""
            print(f"    {r['status']:<9} {r['run_id']}  {r['command']}{where}")
    return not bad_runs and not missing


# -- the command ----------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "campaign", help="a fault-injection sweep over many runs, on this machine or on Ray",
        description="Expand a sweep (the product of seeds, points, signals, policies, hazards and "
                    "workloads, at one size) into runs, each one 'uksm inject' ('uksm run' with "
                    "--kills 0) in its own cluster, log folder and process group; run them here "
                    "(--engine local) or as Ray tasks (--engine ray); append one JSON line per "
                    "run to --out as they finish; print a summary with the command that "
                    "reproduces every failing run.",
        epilog="exit status: 0 every run recorded and clean, 1 a run failed or is missing, "
               "2 bad usage, 130 interrupted.  Read the results with DuckDB: duckdb -c \"select "
               "status, count(*), sum(kills) from read_json_auto('OUT') group by 1\" "
               "(see docs/CAMPAIGN.md).")
    s = p.add_argument_group("the sweep (lists are comma-separated; the command line overrides --config)")
    s.add_argument("--config", help="a TOML or JSON file with the keys below (seeds, points, ...)")
    s.add_argument("--seeds", help="seeds: 7, 1-100, or 1,5,9 (default 1)")
    s.add_argument("--points", help="random, cursor, all, or kill point names (default random; "
                                    "uksm inject --list-points)")
    s.add_argument("--signals", help="KILL, TERM (default KILL)")
    s.add_argument("--policies", help=f"exit policies: {', '.join(EXIT_POLICIES)} (default seed)")
    s.add_argument("--hazards", help=f"hazard sets: none, or {'+'.join(HAZARDS)} joined by + "
                                     "(default none)")
    s.add_argument("--workloads", help="workloads (default vm)")
    s.add_argument("--kills", type=int, help=f"kills per run (default {SIZES['kills']}; 0: uksm run)")
    s.add_argument("--workers", type=int, help=f"workers per run (default {SIZES['workers']})")
    s.add_argument("--pages", type=int, help=f"pages per worker (default {SIZES['pages']})")
    s.add_argument("--kernel", choices=KERNELS,
                   help="whose mm/ksm.c every run emulates: 2.6.32 (default) or 6.18")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="campaign.jsonl", help="results, one JSON line per run, "
                                                           "appended (default campaign.jsonl)")
    o.add_argument("--logs", help="runs' log folders go under this (default OUT without .jsonl, "
                                  "plus .logs)")
    o.add_argument("--keep-logs", choices=KEEP_LOGS, default="failed",
                   help="which runs keep their logs (default failed)")
    o.add_argument("--resume", action="store_true",
                   help="run only the runs OUT does not record yet (OUT may not exist yet)")
    o.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: a pool of processes here (default); ray: one Ray task per run")
    e.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                   help="runs at once (local; for a local Ray, its CPUs) (default: CPUs)")
    e.add_argument("--address", help="ray: the cluster to join, e.g. auto or HOST:6379 (default: "
                                     "$RAY_ADDRESS, else start a local Ray for the campaign)")
    e.add_argument("--num-cpus", type=float, default=1.0, help="ray: CPUs per run (default 1)")
    e.add_argument("--memory-mib", type=int, default=0,
                   help="ray: memory per run in MiB (default: estimated from workers and pages)")
    e.add_argument("--max-retries", type=int, default=3,
                   help="ray: retries of a run whose worker or node is lost (default 3)")
    e.add_argument("--run-timeout", type=float, default=0.0,
                   help="kill a run after this many seconds: status timeout "
                        "(default 300 s + 6 s per kill)")


def cmd_campaign(a: argparse.Namespace) -> int:
    skipped: list[str] = []
    runs = sweep(spec_from_args(a), skipped)
    if skipped and not a.quiet:
        print(f"campaign: left out of the sweep: {'; '.join(skipped)}", file=sys.stderr)
    if a.parallel < 1:
        bad("--parallel must be at least 1")
    if a.num_cpus <= 0 or a.memory_mib < 0 or a.max_retries < 0 or a.run_timeout < 0:
        bad("--num-cpus must be positive, --memory-mib, --max-retries and --run-timeout >= 0")
    if a.address and a.engine != "ray":
        bad("--address is for --engine ray")
    if a.engine == "ray" and not a.address:
        # a Ray job's driver (ray job submit, a KubeRay RayJob) finds its cluster in RAY_ADDRESS
        a.address = os.environ.get("RAY_ADDRESS") or None
    a.memory_mib = a.memory_mib or default_memory_mib(runs)
    if a.dry_run:
        for p in runs:
            print(f"{run_id(p)}  {reproduce(p)}")
        return 0
    out = a.out
    if os.path.exists(out) and not a.resume:
        bad(f"{out} exists: --resume to complete that campaign, or another --out")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        bad(f"--out {out}: no such directory {out_dir}")
    a.logs = os.path.abspath(a.logs or (out[:-6] if out.endswith(".jsonl") else out) + ".logs")
    os.makedirs(a.logs, exist_ok=True)
    ids = {run_id(p) for p in runs}
    if a.resume:
        cut = repair(out)
        if cut:
            print(f"campaign: --out {out}: its last line was torn (a campaign killed while "
                  f"writing it): removed it ({cut} bytes); that run runs again", file=sys.stderr)
    done = {k: v for k, v in recorded(out).items() if k in ids} if a.resume else {}
    todo = [p for p in runs if run_id(p) not in done]
    if not a.quiet:
        print(f"campaign: {len(runs)} runs, {len(runs) - len(todo)} already recorded, "
              f"{len(todo)} to run on {a.engine}"
              + (f" ({a.parallel} at once)" if a.engine == "local" or not a.address
                 else f" at {a.address}")
              + f"; results in {out}, "
              f"logs under {a.logs}", file=sys.stderr)
    sink = Sink(out, len(runs), {k: v for k, v in done.items()}, a.quiet)
    t0 = time.monotonic()
    lost: list[str] = []
    try:
        with Stop() as stop:
            if a.engine == "ray":
                lost = run_ray(todo, a, sink, stop)
            else:
                run_local(todo, a, sink, stop)
    finally:
        sink.close()
    clean = summary(runs, sink, lost, time.monotonic() - t0)
    if stop:
        print("campaign: interrupted; --resume runs what is missing", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uksm")
    add_parser(ap.add_subparsers(dest="cmd"))
    try:
        return cmd_campaign(ap.parse_args(["campaign", *(sys.argv[1:] if argv is None else argv)]))
    except UksmError as e:
        print(f"uksm: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    raise SystemExit(main())
