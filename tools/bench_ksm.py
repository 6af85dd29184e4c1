#!/usr/bin/env python3
"""bench_ksm: how fast uksm's ksmd merges a layout, next to this machine's real KSM.

What it measures
----------------
The same layout -- N pages holding K distinct contents in total (page i
holds content i mod K) -- is merged twice, from scratch, with the same
``pages_to_scan`` and ``sleep_millisecs``:

- **uksm**: a cluster is booted in this process (``uksm.proc.supervisor``) with
  ksmd stopped (run=0); W worker processes each map N/W pages with the
  ``dup:K`` workload (page i of every worker holds content i mod K) and mark
  them mergeable.  Once every worker is ready, run=1 is set and the clock
  runs until ``pages_shared == K`` and ``pages_sharing == N - K``.
- **kernel**: one anonymous private mapping of N pages is filled the same way
  (K distinct non-zero contents), ``madvise(MADV_MERGEABLE)``-ed, and
  /sys/kernel/mm/ksm/run=1 is written; the clock runs until every page of the
  mapping is merged (``pages_shared + pages_sharing == N``).  The kernel caps
  a KSM page at ``max_page_sharing`` mappings (256 by default), so it shows
  more ``pages_shared`` than K (about K * ceil(N/K/256)): the saving is the
  same bar those few pages.  Afterwards the kernel is ALWAYS put back to
  run=2 (unmerge) then run=0, pages_to_scan=100, sleep_millisecs=20 -- also
  after an error or Ctrl-C.  Without a writable /sys/kernel/mm/ksm (no
  CONFIG_KSM, a read-only /sys in a container, not root) that half is skipped.

How to read it
--------------
- ``merge_s``: seconds from run=1 to fully merged.  Both need two full
  scans: the first records each page's checksum, the second merges (a page
  must keep its checksum for one scan before it enters the unstable tree).
- ``pages_per_s``: ``pages_scanned`` (the counter, uksm's and the kernel's)
  over ``merge_s``: the scanner's throughput while merging, about 2N / merge_s.
- ``ksmd_cpu_s`` / ``pages_per_cpu_s``: the CPU time (user + system, from
  /proc/PID/stat, 10 ms ticks) the scanner used meanwhile -- uksm's ksmd
  process, the kernel's ksmd thread -- and pages scanned per CPU-second.
  Wall times swing with the machine's load; CPU time much less: on a busy
  machine compare these.
- ``steady_pages_per_s`` (with ``--after S``): the scan rate over S more
  seconds once all is merged (every page a stable-tree hit: the cheap path).
- ``ratio``: uksm / kernel, per metric.  A time ratio of 50 means uksm
  takes 50 times as long; a rate ratio of 0.02 means it scans at 2% of the
  kernel's speed.  uksm is pure Python on POSIX shared memory: per-page cost
  of a few microseconds is expected, against well under one for the kernel.

The numbers depend on the machine's load: the uksm half runs ksmd as a
process competing with the workers' idle loops and this process's polling
(every ~2 ms) on the same cores; run it on a quiet machine.

Usage::

    python3 tools/bench_ksm.py                       # 200,000 pages, 50 contents
    python3 tools/bench_ksm.py --pages 20000 --json  # smaller, one JSON object
    python3 tools/bench_ksm.py --skip-kernel         # uksm only, /sys/kernel/mm/ksm untouched
    python3 tools/bench_ksm.py --kernel 6.18         # uksm as 6.18, against this 6.18

``--kernel 6.18`` (issue 23) boots uksm with ``kernel="6.18"`` (its
max_page_sharing 256 and smart_scan 1, as the host's own defaults) and
stops both clocks at the same point: every page merged
(``pages_shared + pages_sharing == N``), whatever the split into KSM
pages -- like with like against this machine's 6.18.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import signal
import sys
import time
from typing import Any

from hostksm import RESTORE, HostKsm, host_lock, shielded

PAGE = 4096
KSM_DIR = "/sys/kernel/mm/ksm"


# ---- signals: Ctrl-C / SIGTERM end the run, never the clean-up -------------------

def _sigterm(_s: int, _f: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")

# shielded (a clean-up a second signal cannot cut short) is hostksm's

# ---- machine ----------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0]}


def proc_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process or kernel thread has used."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def kernel_ksmd_pid() -> int | None:
    """The pid of the kernel's ksmd thread (its comm is "ksmd")."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "ksmd":
                        return int(d)
            except OSError:
                continue
    return None


def expected_counts(pages: int, distinct: int, per_region: list[int]) -> tuple[int, int]:
    """(pages_shared, pages_sharing) when fully merged, no sharing cap:
    one KSM page per content present."""
    contents = min(distinct, max(per_region))
    return contents, pages - contents


# ---- uksm -------------------------------------------------------------------------

def split_pages(pages: int, workers: int) -> list[int]:
    base, extra = divmod(pages, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def uksm_config(pages: int, workers: int, pages_to_scan: int, sleep_ms: int, run: int = 0,
                kernel: str = "2.6.32"):
    from uksm.kernel.cluster import Config
    per = split_pages(pages, workers)
    return Config(frames=pages + max(64, pages // 16), max_tasks=workers * 2 + 32,
                  max_mms=workers * 3 + 32, va_pages=max(per) + 80, run=run,
                  pages_to_scan=pages_to_scan, sleep_ms=sleep_ms, hung_timeout_ms=30_000,
                  kernel=kernel)


def start_workers(sup: Any, pages: int, distinct: int, workers: int, seed: int,
                  timeout: float, say: Any) -> float:
    """Spawn the workers and wait until every one has written its pages.
    Returns the seconds it took."""
    t0 = time.monotonic()
    for n in split_pages(pages, workers):
        sup.spawn_worker(n, f"dup:{distinct}", seed)
    last = 0.0
    while True:
        sup.poll()
        if sup.errors:
            raise RuntimeError("; ".join(sup.errors))
        if sup.workers_alive() < workers:
            raise RuntimeError("a worker exited before it was ready")
        if sup.workers_ready():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"workers not ready after {timeout:.0f}s")
        if time.monotonic() - last > 5:
            last = time.monotonic()
            say(f"  uksm: waiting for {workers} workers to write {pages} pages "
                f"({time.monotonic() - t0:.0f}s)")
        time.sleep(0.02)


def wait_merged(sup: Any, t0: float, shared: int, sharing: int, timeout: float, say: Any,
                label: str, tick: Any = None, any_split: bool = False) -> float:
    """Poll the cluster (every ~2 ms) until ``pages_shared == shared`` and
    ``pages_sharing == sharing`` (``any_split``: until their sum is, as the
    kernel's side waits: --kernel 6.18); ``tick(now)`` at every poll.
    Returns the seconds since ``t0``; RuntimeError on a cluster error or
    the timeout."""
    from uksm.kernel.layout import K_PAGES_SCANNED, K_PAGES_SHARED, K_PAGES_SHARING
    q = sup.cl.q
    scanned0, last = q[K_PAGES_SCANNED], t0
    while True:
        sup.poll()
        now = time.monotonic()
        if (q[K_PAGES_SHARED] + q[K_PAGES_SHARING] == shared + sharing if any_split
                else q[K_PAGES_SHARED] == shared and q[K_PAGES_SHARING] == sharing):
            return now - t0
        if sup.errors:
            raise RuntimeError("; ".join(sup.errors))
        if now - t0 > timeout:
            raise RuntimeError(f"{label} not merged after {timeout:.0f}s: shared "
                               f"{q[K_PAGES_SHARED]} sharing {q[K_PAGES_SHARING]}")
        if tick is not None:
            tick(now)
        if now - last > 5:
            last = now
            say(f"  {label}: {now - t0:.0f}s shared {q[K_PAGES_SHARED]} sharing "
                f"{q[K_PAGES_SHARING]} scanned {q[K_PAGES_SCANNED] - scanned0}")
        time.sleep(0.002)


def run_uksm(pages: int, distinct: int, workers: int, pages_to_scan: int, sleep_ms: int,
             after: float, timeout: float, seed: int, log_dir: str | None, say: Any,
             kernel: str = "2.6.32") -> dict[str, Any]:
    from uksm.host import log as ulog
    from uksm.host import shm
    from uksm.kernel.ksm import run_store
    from uksm.kernel.layout import (
        K_FULL_SCANS,
        K_PAGES_SCANNED,
        K_PAGES_SHARED,
        K_PAGES_SHARING,
    )
    from uksm.proc.supervisor import Supervisor

    name = f"bench{os.getpid()}"
    per = split_pages(pages, workers)
    exp_shared, exp_sharing = expected_counts(pages, distinct, per)
    sup = Supervisor(name, uksm_config(pages, workers, pages_to_scan, sleep_ms, kernel=kernel), log_dir,
                     quiet=True)
    res: dict[str, Any] = {"cluster": name, "workers": workers, "pages_per_worker": per[0],
                           "expected_shared": exp_shared, "expected_sharing": exp_sharing}
    clean = False
    try:
        sup.boot()
        q = sup.cl.q
        res["workers_ready_s"] = round(start_workers(sup, pages, distinct, workers, seed, timeout,
                                                     say), 3)
        say(f"  uksm: {workers} workers ready ({res['workers_ready_s']}s); run=1")
        scanned0, scans0 = q[K_PAGES_SCANNED], q[K_FULL_SCANS]
        kpid = sup.ksmd.proc.pid if sup.ksmd is not None else None
        cpu0 = proc_cpu_s(kpid)
        t0 = time.monotonic()
        run_store(sup.cl, 1)
        dt = wait_merged(sup, t0, exp_shared, exp_sharing, timeout, say, "uksm",
                         any_split=kernel != "2.6.32")
        cpu1 = proc_cpu_s(kpid)
        scanned = q[K_PAGES_SCANNED] - scanned0
        if cpu0 is not None and cpu1 is not None:
            res["ksmd_cpu_s"] = round(cpu1 - cpu0, 3)
            res["pages_per_cpu_s"] = round(scanned / (cpu1 - cpu0)) if cpu1 > cpu0 else None
        res.update(merge_s=round(dt, 4), pages_scanned=scanned,
                   pages_per_s=round(scanned / dt) if dt else None,
                   full_scans=q[K_FULL_SCANS] - scans0,
                   pages_shared=q[K_PAGES_SHARED], pages_sharing=q[K_PAGES_SHARING])
        if after > 0:
            s0, t1 = q[K_PAGES_SCANNED], time.monotonic()
            while time.monotonic() - t1 < after:
                sup.poll()
                time.sleep(0.01)
            s1, t2 = q[K_PAGES_SCANNED], time.monotonic()
            res["steady_pages_per_s"] = round((s1 - s0) / (t2 - t1))
        with shielded():
            run_store(sup.cl, 0)
            clean = sup.stop_workers(timeout=120)
            sup.stop_ksmd()
    finally:
        with shielded():
            if sup.booted:
                sup.kill_all()
                res["leftovers"] = sup.teardown()
            ulog.close()
            res["leftovers"] = res.get("leftovers", []) + [
                x for x in shm.leftovers(name) if x not in res.get("leftovers", [])]
    res["clean_stop"] = clean
    return res


# ---- the kernel ---------------------------------------------------------------------

def kread(name: str) -> str | None:
    try:
        with open(os.path.join(KSM_DIR, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def kint(name: str) -> int | None:
    v = kread(name)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def kwrite(name: str, value: str) -> None:
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(value)


def kernel_unavailable() -> str | None:
    if not os.path.isdir(KSM_DIR):
        return f"{KSM_DIR} is missing (kernel without CONFIG_KSM?)"
    for n in ("run", "pages_to_scan", "sleep_millisecs"):
        if not os.access(os.path.join(KSM_DIR, n), os.W_OK):
            return f"{KSM_DIR}/{n} is not writable (not root, or a read-only /sys)"
    if not hasattr(mmap, "MADV_MERGEABLE"):
        return "this Python's mmap has no MADV_MERGEABLE"
    return None


def restore_kernel() -> dict[str, Any]:
    """Every knob put back as tools/hostksm.py's RESTORE has it (run=2,
    then run=0, pages_to_scan=100, sleep_millisecs=20, max_page_sharing=256,
    use_zero_pages=0, smart_scan=1, advisor_mode=none), each write tried even
    if one before failed: the twin and this bench leave the host alike."""
    errors = HostKsm(KSM_DIR).restore()
    want = [(n, v) for n, v in RESTORE if n != "run" and os.path.exists(os.path.join(KSM_DIR, n))]
    want.append(("run", "0"))
    now = {n: kread(n) for n, _v in want}
    ok = all(now[n] == v or (n == "advisor_mode" and f"[{v}]" in (now[n] or "")) for n, v in want)
    return {"restored": ok, "now": now, "errors": errors}


def fill_region(m: mmap.mmap, pages: int, distinct: int) -> None:
    """Page i holds content i mod distinct: distinct pages of non-zero bytes."""
    pats = []
    for c in range(distinct):
        d = hashlib.blake2b(c.to_bytes(8, "little"), digest_size=64).digest()
        d = bytes(b or 1 for b in d)
        pats.append(d * (PAGE // len(d)))
    block = b"".join(pats)  # `distinct` consecutive pages
    off, end = 0, pages * PAGE
    while off < end:
        n = min(len(block), end - off)
        m[off:off + n] = block[:n]
        off += n


def run_kernel(pages: int, distinct: int, pages_to_scan: int, sleep_ms: int, after: float,
               timeout: float, say: Any) -> dict[str, Any]:
    """The host's ksmd on the same pages: one user of the host's KSM at a
    time (flock /tmp/hostksm.lock, as tools/twin.py takes it)."""
    with host_lock(say, timeout=600):
        return _run_kernel(pages, distinct, pages_to_scan, sleep_ms, after, timeout, say)


def _run_kernel(pages: int, distinct: int, pages_to_scan: int, sleep_ms: int, after: float,
                timeout: float, say: Any) -> dict[str, Any]:
    why = kernel_unavailable()
    if why:
        return {"skipped": why}
    before = {n: kread(n) for n in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared",
                                    "pages_sharing", "max_page_sharing", "advisor_mode",
                                    "smart_scan", "use_zero_pages")}
    res: dict[str, Any] = {"before": before}
    warnings = []
    if before["run"] != "0":
        warnings.append(f"KSM was running (run={before['run']}); it is left at run=0")
    if kint("pages_shared") or kint("pages_sharing"):
        warnings.append("other KSM pages existed before (counts below are deltas)")
    adv = before.get("advisor_mode") or ""
    if adv and "[none]" not in adv:
        warnings.append(f"advisor_mode is {adv}: it overrides pages_to_scan")
    mps = kint("max_page_sharing") or 0
    per_content = -(-pages // distinct)
    res["max_page_sharing"] = mps
    res["expected_shared"] = min(distinct, pages) * (-(-per_content // mps) if mps else 1)
    res["expected_sharing"] = pages - res["expected_shared"]
    t_nothing = time.monotonic()
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        t = time.monotonic()
        fill_region(m, pages, distinct)
        res["fill_s"] = round(time.monotonic() - t, 3)
        try:
            m.madvise(mmap.MADV_MERGEABLE)
        except OSError as e:
            return {**res, "skipped": f"madvise(MADV_MERGEABLE) failed: {e}"}
        shared0, sharing0 = kint("pages_shared") or 0, kint("pages_sharing") or 0
        scanned0, scans0 = kint("pages_scanned"), kint("full_scans") or 0
        try:
            kwrite("pages_to_scan", str(pages_to_scan))
            kwrite("sleep_millisecs", str(sleep_ms))
            say("  kernel: run=1")
            kpid = kernel_ksmd_pid()
            cpu0 = proc_cpu_s(kpid)
            t0 = time.monotonic()
            kwrite("run", "1")
            last = t0
            while True:
                sh = (kint("pages_shared") or 0) - shared0
                sg = (kint("pages_sharing") or 0) - sharing0
                now = time.monotonic()
                if sh + sg >= pages:
                    break
                if now - t0 > timeout:
                    raise RuntimeError(f"kernel not merged after {timeout:.0f}s: shared {sh} "
                                       f"sharing {sg}")
                if now - last > 5:
                    last = now
                    say(f"  kernel: {now - t0:.0f}s shared {sh} sharing {sg}")
                time.sleep(0.0005)
            dt = now - t0
            cpu1 = proc_cpu_s(kpid)
            scans = (kint("full_scans") or 0) - scans0
            if scanned0 is not None:
                scanned = (kint("pages_scanned") or 0) - scanned0
                res["pages_scanned_source"] = "pages_scanned"
            else:  # older kernels: no counter; full scans done, times the pages
                scanned = scans * pages
                res["pages_scanned_source"] = "full_scans * pages (lower bound)"
            if cpu0 is not None and cpu1 is not None:
                res["ksmd_cpu_s"] = round(cpu1 - cpu0, 3)
                res["pages_per_cpu_s"] = round(scanned / (cpu1 - cpu0)) if cpu1 > cpu0 else None
            res.update(merge_s=round(dt, 4), e2e_s=round(now - t_nothing, 3), pages_scanned=scanned,
                       pages_per_s=round(scanned / dt) if dt else None, full_scans=scans,
                       pages_shared=sh, pages_sharing=sg)
            if after > 0 and scanned0 is not None:
                s0, t1 = kint("pages_scanned") or 0, time.monotonic()
                time.sleep(after)
                s1, t2 = kint("pages_scanned") or 0, time.monotonic()
                res["steady_pages_per_s"] = round((s1 - s0) / (t2 - t1))
        finally:
            with shielded():
                res["restore"] = restore_kernel()
    finally:
        m.close()
    if warnings:
        res["warnings"] = warnings
    return res


# ---- goal 2: `uksm run` from nothing ---------------------------------------------

def merged_at(log_dir: str, shared: int, sharing: int) -> int | None:
    """CLOCK_MONOTONIC ns at which the run's ksmd made the last merge that
    brought its counters to ``shared`` / ``sharing``: the ``t_last_ns`` of
    the ``merge`` events logged for the first batch that published them
    (that batch's ``scan_batch_end`` time if it logged none).  The moment
    the cluster was merged, judged as the kernel's side is (its counters
    move with each merge and are read every 0.5 ms), not by the command's
    convergence rule -- nor at the batch's end event, which a batch ending
    a full scan logs only after flushing the merged-away frames (~0.1 s)."""
    import glob
    best = None
    for path in glob.glob(os.path.join(log_dir, "ksmd-*.jsonl")):
        t: int | None = None
        merges: list[int] = []
        with open(path) as f:
            for line in f:
                if t is None:
                    if '"scan_batch_end"' in line:
                        ev = json.loads(line)
                        if ev.get("pages_shared") == shared and ev.get("pages_sharing") == sharing:
                            t = ev["mono_ns"]
                    continue
                if '"scan_batch_' in line:
                    break  # the next batch: that one's merges are all read
                ev = json.loads(line)
                if ev.get("event") == "merge" and ev.get("t_last_ns"):
                    merges.append(ev["t_last_ns"])
        if t is not None:
            t = max(merges) if merges else t
            best = t if best is None else min(best, t)
    return best


def run_cli(pages: int, distinct: int, workers: int, pages_to_scan: int, sleep_ms: int,
            timeout: float, say: Any, kernel: str = "2.6.32") -> dict[str, Any]:
    """``uksm run --until-merged`` as a user types it, timed from the
    command's start to its exit (``e2e_s``, goal 2): boot, workers filling
    their pages, ksmd merging, the rule that tells it nothing is left to
    merge (``uksm.proc.run.drive``: a pass begun after the fill with every
    rmap_item stable, seen at the end of that pass, or three like samples
    of the counters), shutdown (every worker verifies its pages and exits),
    fsck and teardown -- the kernel's side has none of the shutdown.  Also
    ``merged_s``: from the command's start to its ksmd's last merge before
    it published the expected counters (``merged_at``, from its log), the
    kernel side's own criterion, so the two "merged" can be compared like
    for like.  Needs
    ``pages`` divisible by ``workers`` (``--pages`` is per worker)."""
    import subprocess
    import tempfile
    name = f"benchrun{os.getpid()}"
    per = pages // workers
    with tempfile.TemporaryDirectory(prefix="bench_ksm_") as logs:
        cmd = [sys.executable, "-m", "uksm", "run", "--cluster", name, "--workers", str(workers),
               "--pages", str(per), "--workload", f"dup:{distinct}", "--pages-to-scan",
               str(pages_to_scan), "--sleep-ms", str(sleep_ms), "--until-merged",
               "--max-duration", str(int(timeout)), "--log-dir", logs, "--json", "--quiet",
               "--kernel", kernel]
        say(f"  uksm run: {workers} workers x {per} pages, dup:{distinct}, until merged")
        t0_ns = time.monotonic_ns()
        t0 = t0_ns / 1e9
        try:
            p = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=timeout + 60)
        except BaseException as e:
            # timeout, Ctrl-C, SIGTERM: subprocess.run has SIGKILLed it; its
            # lifeline takes its ksmd and workers down with it, and the
            # objects it leaves are removed by name (ours alone)
            with shielded():
                subprocess.run([sys.executable, "-m", "uksm", "cleanup", "--cluster", name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            if isinstance(e, subprocess.TimeoutExpired):
                raise RuntimeError(f"uksm run did not finish in {timeout + 60:.0f}s") from None
            raise
        dt = time.monotonic() - t0
        try:
            rep = json.loads(p.stdout)
        except ValueError:
            rep = {}
        want = expected_counts(per * workers, distinct, [per])
        k = rep.get("ksm") or {}
        if kernel != "2.6.32" and k.get("pages_shared", 0) + k.get("pages_sharing", 0) == pages:
            want = (k["pages_shared"], k["pages_sharing"])   # 6.18: any split into KSM pages
        m_ns = merged_at(logs, *want)
    if p.returncode != 0:
        raise RuntimeError(f"uksm run exited with status {p.returncode}: "
                           f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    ksm = rep.get("ksm") or {}
    res = {"e2e_s": round(dt, 3), "cli_duration_s": rep.get("duration_s"),
           "merged_s": None if m_ns is None else round((m_ns - t0_ns) / 1e9, 3),
           "pages_shared": ksm.get("pages_shared"), "pages_sharing": ksm.get("pages_sharing"),
           "fsck": rep.get("fsck")}
    if (res["pages_shared"], res["pages_sharing"]) != want:
        raise RuntimeError(f"uksm run ended unmerged: shared {res['pages_shared']} sharing "
                           f"{res['pages_sharing']}, expected {want[0]} and {want[1]}")
    return res


# ---- goals (issue 14) -------------------------------------------------------------

# (goal, what, side, its key, key in the kernel's result, target ratio, "<=" or ">=")
GOALS = (("1", "ksmd time to full merge", "uksm", "merge_s", "merge_s", 2.0, "<="),
         ("1", "pages per ksmd CPU-second", "uksm", "pages_per_cpu_s", "pages_per_cpu_s", 0.5, ">="),
         ("2", "`uksm run` from nothing to merged (s)", "uksm_run", "e2e_s", "e2e_s", 2.5, "<="),
         # like for like: both sides stop at the expected counters (the
         # kernel side's criterion); uksm run's convergence rule and its
         # shutdown (verify, exits, fsck, teardown) left out
         ("2*", "`uksm run` start to the expected counters (s), as the kernel's side",
          "uksm_run", "merged_s", "e2e_s", 2.5, "<="))


def goals(runs: dict[str, list[dict[str, Any]]], report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal's ratio uksm / kernel (of the median runs) against its
    target, with the range of the per-round ratios (each round runs both
    sides back to back, so a round's ratio sees one load)."""
    out = []
    k = report.get("kernel") or {}
    for goal, what, side, key, kkey, target, op in GOALS:
        u = report.get(side) or {}
        uv, kv = u.get(key), k.get(kkey)
        ratio = round(uv / kv, 3) if uv and kv else None
        per_round = [round(a[key] / b[kkey], 3) for a, b in zip(runs.get(side, []), runs.get("kernel", []))
                     if a.get(key) and b.get(kkey)]
        met = None if ratio is None else (ratio <= target if op == "<=" else ratio >= target)
        out.append({"goal": goal, "what": what, "uksm": uv, "kernel": kv, "ratio": ratio,
                    "target": f"{op} {target:g}", "met": met, "ratio_per_round": per_round})
    return out


def goal_lines(gs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for g in gs:
        def num(v: Any) -> str:
            return "-" if v is None else (f"{v:,.0f}" if v >= 1000 else f"{v:.3f}")
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        rng = ""
        if len(g["ratio_per_round"]) > 1:
            rng = (f" (rounds {min(g['ratio_per_round']):.3g}-{max(g['ratio_per_round']):.3g})")
        lines.append(f"goal {g['goal']}: {g['what']}: uksm {num(g['uksm'])}, kernel "
                     f"{num(g['kernel'])}, ratio {'-' if g['ratio'] is None else format(g['ratio'], '.3g')}"
                     f"{rng}, target {g['target']}: {verdict}")
    return lines


# ---- report -------------------------------------------------------------------------

def median_run(rs: list[dict[str, Any]], key: str = "merge_s") -> dict[str, Any]:
    """The run with the median ``key`` (of those that have it), with every
    run's ``key`` / ksmd_cpu_s listed; the last run (an error) if none has."""
    ok = sorted((r for r in rs if key in r), key=lambda r: r[key])
    if not ok:
        return rs[-1]
    med = dict(ok[(len(ok) - 1) // 2])
    if len(rs) > 1:
        med[f"runs_{key}"] = [r.get(key) for r in rs]
        if key == "merge_s":
            med["runs_ksmd_cpu_s"] = [r.get("ksmd_cpu_s") for r in rs]
        med["runs_failed"] = len(rs) - len(ok)
    if any("leftovers" in r for r in rs):
        med["leftovers"] = sorted({x for r in rs for x in r.get("leftovers", [])})
    return med

def ratios(u: dict[str, Any], k: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("merge_s", "pages_per_s", "ksmd_cpu_s", "pages_per_cpu_s", "steady_pages_per_s",
                "e2e_s"):
        if u.get(key) and k.get(key):
            out[key] = round(u[key] / k[key], 4)
    return out


def table(r: dict[str, Any]) -> str:
    u, k, ra = r.get("uksm") or {}, r.get("kernel") or {}, r.get("ratio") or {}
    rows = [("time to full merge (s)", "merge_s", "{:.3f}"),
            ("pages scanned per second", "pages_per_s", "{:,.0f}"),
            ("ksmd CPU seconds to merge", "ksmd_cpu_s", "{:.2f}"),
            ("pages per ksmd CPU-second", "pages_per_cpu_s", "{:,.0f}"),
            ("steady scan rate (pages/s)", "steady_pages_per_s", "{:,.0f}"),
            ("pages scanned to merge", "pages_scanned", "{:,}"),
            ("full scans to merge", "full_scans", "{}"),
            ("pages_shared", "pages_shared", "{:,}"),
            ("pages_sharing", "pages_sharing", "{:,}")]

    def cell(d: dict[str, Any], key: str, fmt: str) -> str:
        if "skipped" in d or d.get("error"):
            return "-"
        v = d.get(key)
        return "-" if v is None else fmt.format(v)
    lines = [f"{'':28} {'uksm':>14} {'kernel':>14} {'uksm/kernel':>12}"]
    for label, key, fmt in rows:
        rv = ra.get(key)
        lines.append(f"{label:28} {cell(u, key, fmt):>14} {cell(k, key, fmt):>14} "
                     f"{format(rv, '.4g') if rv is not None else '':>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench_ksm", description=(__doc__ or "").split("\n\n")[0],
        epilog="See the module docstring (python3 -m pydoc tools/bench_ksm.py) for how to "
               "read the numbers.")
    ap.add_argument("--pages", type=int, default=200_000, help="pages in total (default 200000)")
    ap.add_argument("--distinct", type=int, default=50,
                    help="distinct page contents in total (default 50)")
    ap.add_argument("--workers", type=int, default=4, help="uksm worker processes (default 4)")
    ap.add_argument("--pages-to-scan", type=int, default=10_000, help="default 10000")
    ap.add_argument("--sleep-ms", type=int, default=0, help="sleep_millisecs (default 0)")
    ap.add_argument("--after", type=float, default=0.0,
                    help="also measure the steady scan rate for this many seconds once merged")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="give up on a side after this many seconds (default 600)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each side this many times and report the median run (by merge_s)")
    ap.add_argument("--seed", type=int, default=0, help="uksm workload seed")
    ap.add_argument("--log-dir", help="uksm JSON logs here (default: none, as fast as possible)")
    ap.add_argument("--skip-uksm", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true",
                    help="leave /sys/kernel/mm/ksm alone (no kernel figures, no ratios)")
    ap.add_argument("--skip-run", action="store_true",
                    help="skip goal 2's `uksm run --until-merged` from nothing")
    ap.add_argument("--kernel", default="2.6.32", choices=("2.6.32", "6.18"),
                    help="uksm's kernel (default 2.6.32); 6.18: like with like against this 6.18, "
                         "both clocks stopped once every page is merged")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = ap.parse_args(argv)
    if a.pages < 1 or a.distinct < 1 or a.workers < 1 or a.pages_to_scan < 1 or a.sleep_ms < 0:
        ap.error("--pages, --distinct, --workers, --pages-to-scan must be >= 1, --sleep-ms >= 0")
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    if a.workers > a.pages:
        ap.error("--workers must not exceed --pages")
    if not a.skip_run and a.pages % a.workers:
        ap.error("--pages must be a multiple of --workers (uksm run's --pages is per worker), "
                 "or --skip-run")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _sigterm)
    report: dict[str, Any] = {
        "machine": machine(),
        "layout": {"pages": a.pages, "distinct": a.distinct, "workers": a.workers,
                   "pages_to_scan": a.pages_to_scan, "sleep_millisecs": a.sleep_ms,
                   "uksm_kernel": a.kernel},
    }
    status = 0
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rnd in range(a.repeat):
            tag = f" (run {rnd + 1}/{a.repeat})" if a.repeat > 1 else ""
            sides = []
            if not a.skip_uksm:
                sides.append(("uksm", lambda: run_uksm(
                    a.pages, a.distinct, a.workers, a.pages_to_scan, a.sleep_ms, a.after,
                    a.timeout, a.seed, a.log_dir, say, a.kernel)))
            if not a.skip_run:
                sides.append(("uksm_run", lambda: run_cli(
                    a.pages, a.distinct, a.workers, a.pages_to_scan, a.sleep_ms, a.timeout, say,
                    a.kernel)))
            if not a.skip_kernel and "skipped" not in (runs.get("kernel") or [{}])[-1]:
                sides.append(("kernel", lambda: run_kernel(
                    a.pages, a.distinct, a.pages_to_scan, a.sleep_ms, a.after, a.timeout, say)))
            for side, fn in sides:
                who = {"uksm": "uksm", "uksm_run": "uksm run", "kernel": "kernel"}[side]
                say(f"{who}{tag}: {a.pages} pages, {a.distinct} contents"
                    + ("" if side == "kernel" else f", {a.workers} workers"))
                try:
                    runs.setdefault(side, []).append(fn())
                except (RuntimeError, OSError) as e:
                    runs.setdefault(side, []).append({"error": str(e)})
                    status = 1
        for side, rs in runs.items():
            report[side] = median_run(rs, "e2e_s" if side == "uksm_run" else "merge_s")
        if not a.skip_kernel:
            k = report["kernel"]
            if "skipped" in k:
                say(f"kernel: skipped: {k['skipped']}")
            if any(r.get("restore") and not r["restore"]["restored"] for r in runs["kernel"]):
                say("kernel: WARNING: settings not restored: "
                    f"{[r['restore'] for r in runs['kernel'] if r.get('restore')]}")
                status = 1
    except KeyboardInterrupt:
        say("interrupted: cleaned up")
        return 130
    report["ratio"] = ratios(report.get("uksm") or {}, report.get("kernel") or {})
    report["goals"] = goals(runs, report)
    if a.json:
        print(json.dumps(report, indent=None))
    else:
        mc = report["machine"]
        print(f"machine: {mc['nproc']} cpus, {mc['cpu_model']}, {mc['mem_gib']} GiB, "
              f"Linux {mc['kernel']}, Python {mc['python']}, load {mc['loadavg_1m']:.2f}")
        lay = report["layout"]
        print(f"layout: {lay['pages']:,} pages, {lay['distinct']} distinct contents, "
              f"pages_to_scan {lay['pages_to_scan']}, sleep_millisecs {lay['sleep_millisecs']} "
              f"(uksm: {lay['workers']} workers, kernel {lay['uksm_kernel']})")
        print(table(report))
        ur = report.get("uksm_run") or {}
        if "e2e_s" in ur:
            print(f"uksm run from nothing to merged: {ur['e2e_s']:.2f} s to its exit, "
                  f"{ur.get('merged_s')} s to the expected counters (its own duration_s "
                  f"{ur.get('cli_duration_s')}; fsck {ur.get('fsck')})"
                  + (f"; runs {ur['runs_e2e_s']}" if "runs_e2e_s" in ur else ""))
        if "e2e_s" in (report.get("kernel") or {}):
            print(f"kernel from nothing (mmap, fill, madvise, merge): {report['kernel']['e2e_s']:.2f} s")
        for line in goal_lines(report["goals"]):
            print(line)
        for side in ("uksm", "uksm_run", "kernel"):
            d = report.get(side) or {}
            if "runs_merge_s" in d:
                print(f"{side}: median of {len(d['runs_merge_s'])} runs; merge_s "
                      f"{d['runs_merge_s']}, ksmd_cpu_s {d['runs_ksmd_cpu_s']}")
            if "error" in d:
                print(f"{side}: ERROR: {d['error']}")
            if "skipped" in d:
                print(f"{side}: skipped: {d['skipped']}")
            for w in d.get("warnings", []):
                print(f"{side}: warning: {w}")
        k = report.get("kernel") or {}
        if k.get("max_page_sharing"):
            ours = (report.get("uksm") or {}).get("expected_shared", "-")
            # uksm caps mappings per KSM page only as 6.18 (chains and dups, 4.13)
            cap = "as 6.18, chains and dups" if report["layout"]["uksm_kernel"] == "6.18" else "2.6.32: no cap"
            print(f"kernel: max_page_sharing {k['max_page_sharing']}: expect pages_shared "
                  f"{k['expected_shared']:,} (uksm, {cap}: {ours})")
        if k.get("restore"):
            print(f"kernel settings after: {k['restore']['now']}")
        u = report.get("uksm") or {}
        if "leftovers" in u:
            print(f"uksm: /dev/shm leftovers: {u['leftovers'] or 'none'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
