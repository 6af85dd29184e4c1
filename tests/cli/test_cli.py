"""``uksm run`` and ``uksm cleanup`` as a user runs them (issue 2): every
workload with 1 and 16 workers, the JSON report's keys, bad input, cleanup
after a crashed run, the default demonstration."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, booted, cname, group_alive, log_events, run_json, uksm, wait_for
from uksm.host import shm

WORKLOADS = ["identical", "unique", "zero", "dup:3", "volatile", "vm"]

# issue 2: the report has (at least) these keys
REPORT_KEYS = {
    "cluster": None, "workload": None, "duration_s": None,
    "ksm": {"run", "pages_to_scan", "sleep_millisecs", "max_kernel_pages", "pages_shared", "pages_sharing",
            "pages_unshared", "pages_volatile", "full_scans", "pages_scanned"},
    "frames": {"total", "used", "free"},
    "memory": {"host_bytes_resident"},
    "workers": {"started", "exited", "exit_fast", "exit_slow", "exit_legacy", "exit_noslot", "killed",
                "oom_killed"},
    "integrity": {"pages_verified", "mismatches"},
    "fsck": {"ok", "errors"},
    "hung_tasks": None, "ipc_leftovers": None,
}


def merges(workload: str, workers: int, pages: int, seed: int = 0) -> tuple[int, int]:
    """(pages_shared, pages_sharing) once everything is merged, from the
    pages' contents alone: every content held by two or more stable pages
    is one KSM page, and each of its other holders a sharer (volatile pages
    never merge).  The contents are the workload's (its input), never
    ksmd's answer."""
    from collections import Counter

    from uksm.workers.workloads import Workload
    held: Counter[bytes] = Counter()
    for w in range(1, workers + 1):
        wl = Workload(workload, seed, w)
        held.update(wl.content(i) for i in range(pages) if not wl.volatile(i))
    groups = [n for n in held.values() if n >= 2]
    return len(groups), sum(groups) - len(groups)


def expected_merges(workload: str, workers: int, pages: int) -> set[tuple[int, int]]:
    """What ``uksm run`` (until merged) reports: ``merges`` of every
    worker -- or, for the demonstration (the vm workload, three workers or
    more: uksm/proc/run.py, ``demo_exits``), of all but the two that exit on
    their own before the end (the report's counters may be read before or
    after ksmd has dropped the second one's pages)."""
    if workload == "vm" and workers >= 3:
        return {merges(workload, n, pages) for n in (workers - 2, workers - 1)}
    return {merges(workload, workers, pages)}


def check_keys(r: dict) -> None:
    missing = sorted(set(REPORT_KEYS) - set(r))
    assert not missing, f"report lacks {missing}"
    for k, sub in REPORT_KEYS.items():
        if sub is not None:
            assert isinstance(r[k], dict), k
            lacks = sorted(sub - set(r[k]))
            assert not lacks, f"report[{k!r}] lacks {lacks}"
    for k in ("ksm", "frames", "memory", "workers", "integrity"):
        for f, v in r[k].items():
            assert isinstance(v, int) and not isinstance(v, bool) and v >= 0, (k, f, v)
    assert isinstance(r["fsck"]["ok"], bool) and isinstance(r["fsck"]["errors"], list)
    assert isinstance(r["hung_tasks"], list) and isinstance(r["ipc_leftovers"], list)
    assert isinstance(r["duration_s"], (int, float)) and r["duration_s"] >= 0


def assert_clean_run(r: dict, status: int, workers: int, pages: int) -> None:
    assert status == 0, r
    check_keys(r)
    assert r["integrity"]["mismatches"] == 0
    assert r["integrity"]["pages_verified"] == workers * pages
    assert r["fsck"]["ok"] is True and r["fsck"]["errors"] == []
    assert r["ipc_leftovers"] == []
    assert r["hung_tasks"] == []
    w = r["workers"]
    assert w["started"] == w["exited"] == workers
    # every exit path named: they add up (issue 12)
    assert w["exit_fast"] + w["exit_slow"] + w["exit_legacy"] + w["exit_noslot"] == w["exited"], w
    assert w["killed"] == w["oom_killed"] == 0
    fr = r["frames"]
    assert fr["used"] + fr["free"] == fr["total"]
    assert shm.leftovers(r["cluster"]) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 16])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_run_every_workload(tmp_path, workload: str, workers: int) -> None:
    pages = 64
    r, status = run_json("--workload", workload, "--workers", str(workers), "--pages", str(pages),
                         "--pages-to-scan", "2000", "--sleep-ms", "0", "--log-dir", str(tmp_path),
                         "--cluster", cname(f"tcliw{workers}{workload.replace(':', '')}"), timeout=80)
    assert_clean_run(r, status, workers, pages)
    assert r["workload"] == workload
    k = r["ksm"]
    assert k["run"] == 1 and k["pages_to_scan"] == 2000 and k["sleep_millisecs"] == 0
    assert k["full_scans"] >= 2 and k["pages_scanned"] >= workers * pages
    assert (k["pages_shared"], k["pages_sharing"]) in expected_merges(workload, workers, pages), k
    assert r["memory"]["host_bytes_resident"] >= r["frames"]["used"] * 4096 * 0.9


BAD = [
    (["--workload", "nope"], "workload"),
    (["--workload", "dup:x"], "dup"),
    (["--workers", "0"], "--workers"),
    (["--pages", "-1"], "--pages"),
    (["--workload", "unique", "--workers", "2", "--pages", "64", "--frames", "100"], "frames"),
    (["--workload", "volatile", "--workers", "1", "--pages", "64", "--frames", "63"], "frames"),
    (["--max-duration", "0"], "--max-duration"),
    (["--workers", "100000"], "--workers 100000 x --pages 1024 need"),
]


def assert_usage_error(p: subprocess.CompletedProcess, word: str) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].strip(), p.stderr
    assert word in lines[0], lines[0]
    assert p.stdout == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,word", BAD, ids=[" ".join(a) for a, _w in BAD])
def test_bad_input_is_one_line_and_status_2(tmp_path, args: list[str], word: str) -> None:
    cl = cname("tclibad")
    p = uksm("run", "--cluster", cl, "--log-dir", str(tmp_path), *args, timeout=50)
    assert_usage_error(p, word)
    assert shm.leftovers(cl) == []
    assert os.listdir(tmp_path) == []  # no logs either: nothing started


@pytest.mark.timeout(60)
def test_bad_input_missing_log_dir(tmp_path) -> None:
    cl = cname("tclinolog")
    missing = tmp_path / "not" / "there"
    p = uksm("run", "--cluster", cl, "--log-dir", str(missing), "--workers", "1", "--pages", "8",
             timeout=50)
    assert_usage_error(p, str(missing))
    assert shm.leftovers(cl) == [] and not missing.exists()


@pytest.mark.timeout(60)
def test_bad_input_cluster_name_in_use(tmp_path) -> None:
    cl = cname("tclibusy")
    with booted(cl, run=0, frames=16) as sup:
        mine = shm.leftovers(cl)
        assert mine
        p = uksm("run", "--cluster", cl, "--log-dir", str(tmp_path), "--workers", "1",
                 "--pages", "8", "--duration", "1", timeout=50)
        assert_usage_error(p, cl)
        # the running cluster is untouched
        assert shm.leftovers(cl) == mine
        assert sup.ksmd is not None and sup.ksmd.proc.poll() is None
    assert shm.leftovers(cl) == []
    p = uksm("run", "--cluster", "bad/name", "--log-dir", str(tmp_path), timeout=50)
    assert_usage_error(p, "cluster name")


@pytest.mark.timeout(90)
def test_cleanup_after_a_crashed_run(tmp_path) -> None:
    cl = cname("tclicrash")
    p = subprocess.Popen([sys.executable, "-m", "uksm", "run", "--cluster", cl, "--duration", "60",
                          "--workers", "2", "--pages", "64", "--log-dir", str(tmp_path), "--quiet"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        # up and running: the workers' address spaces exist
        wait_for(lambda: {f"uksm.{cl}.mm1", f"uksm.{cl}.mm2"} <= set(shm.leftovers(cl))
                 or p.poll() is not None, 60, what="the cluster's objects")
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the crash: supervisor, ksmd, workers
        p.wait(timeout=30)
        wait_for(lambda: not group_alive(p.pid), 30, what="the killed processes to go")
        if p.stderr:
            p.stderr.close()
    left = shm.leftovers(cl)
    assert f"uksm.{cl}.ctl" in left and f"sem.uksm.{cl}.daemon" in left
    r = uksm("cleanup", "--cluster", cl, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    said = sorted(line.split("/dev/shm/", 1)[1] for line in r.stdout.splitlines()
                  if line.startswith("removed /dev/shm/"))
    assert said == sorted(left), r.stdout
    assert shm.leftovers(cl) == []
    # again: nothing left to remove
    r = uksm("cleanup", "--cluster", cl, timeout=60)
    assert r.returncode == 0 and "removed" not in r.stdout and r.stdout.strip(), r.stdout


@pytest.mark.timeout(60)
def test_run_help() -> None:
    p = uksm("run", "--help", timeout=50)
    assert p.returncode == 0
    for opt in ("--workers", "--pages", "--workload", "--json", "--duration", "--pages-to-scan",
                "--sleep-ms", "--log-dir", "--cluster", "--frames"):
        assert opt in p.stdout, opt
    assert p.stderr == ""


@pytest.mark.timeout(100)
def test_default_run_ends_by_itself_and_saves_memory(tmp_path) -> None:
    r, status = run_json("--log-dir", str(tmp_path), timeout=90)
    assert status == 0, r
    check_keys(r)
    assert [e["reason"] for e in log_events(tmp_path, "run_end")] == ["converged"]   # by itself
    assert r["workload"] == "vm"
    k = r["ksm"]
    assert (k["pages_shared"], k["pages_sharing"]) in expected_merges("vm", 4, 1024), k
    assert r["frames"]["used"] < r["workers"]["started"] * 1024  # memory saved
    assert r["integrity"]["mismatches"] == 0 and r["fsck"]["ok"] and r["ipc_leftovers"] == []
    assert shm.leftovers(r["cluster"]) == []
    # the demo shows the seed's exit paths (issue 11): one task exits before
    # ksmd reaches it (fast), one away from the cursor while ksmd holds its
    # rmap_items (slow); the rest at the end (slow, or no slot left)
    w = r["workers"]
    assert w["exit_fast"] >= 1 and w["exit_slow"] >= 1, w


@pytest.mark.timeout(100)
def test_readme_first_command_prints_its_report(tmp_path) -> None:
    """The README's first command as a user sees it: the plain-text report,
    line by line (the JSON one: the test above)."""
    p = uksm("run", "--log-dir", str(tmp_path), timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    m = re.match(r"cluster (\S+)  workload vm  ([\d.]+)s  exit policy seed  oom rule \S+\n", out)
    assert m, out
    assert [e["reason"] for e in log_events(tmp_path, "run_end")] == ["converged"]   # by itself
    ksm = dict(re.findall(r"(\w+) (\d+)", "".join(out.splitlines(True)[1:3])))
    assert set(ksm) == {"run", "full_scans", "pages_scanned", "pages_shared", "pages_sharing",
                        "pages_unshared", "pages_volatile"}, out
    assert ksm["run"] == "1" and int(ksm["full_scans"]) >= 2
    assert (int(ksm["pages_shared"]), int(ksm["pages_sharing"])) in expected_merges("vm", 4, 1024), ksm
    mem = re.search(r"^  memory   frames used (\d+) of (\d+); pool resident [\d.]+ MiB; saved by merging "
                    r"(\d+) pages = [\d.]+ MiB$", out, re.M)
    assert mem and int(mem.group(3)) == int(ksm["pages_sharing"]), out
    w = re.search(r"^  workers  started (\d+)  exited (\d+)  __ksm_exit: fast (\d+)  slow (\d+)"
                  r"(  no slot (left )?\d+ \([^)]*\))?  killed 0  oom_killed 0$", out, re.M)
    assert w and w.group(1) == w.group(2) and int(w.group(3)) >= 1 and int(w.group(4)) >= 1, out
    assert re.search(r"^           \(fast: .*slow: .*no slot: .*\)$", out, re.M), out
    assert int(mem.group(1)) < int(w.group(1)) * 1024  # memory saved
    assert re.search(rf"^  data     {int(w.group(1)) * 1024} pages verified, 0 mismatches$", out, re.M), out
    assert re.search(r"^  fsck     clean$", out, re.M), out
    assert re.search(rf"^  leftover POSIX objects: 0  logs: {re.escape(str(tmp_path))}$", out, re.M), out
    assert "HUNG" not in out and "  error " not in out
    assert shm.leftovers(m.group(1)) == []


@pytest.mark.timeout(120)
def test_default_log_folders_are_new_and_never_removed(tmp_path) -> None:
    """README: without --log-dir, ``uksm run`` and ``uksm up`` log into a new
    ``./uksm-logs/<cluster>-<time>`` and ``uksm inject`` into a new
    ``uksm-<cluster>-*`` in $TMPDIR; uksm never removes a log folder (a
    failing run's least of all)."""
    cwd, tmp = tmp_path / "here", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))

    def uksm_here(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "uksm", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=80)

    a, b, c, d = cname("tclilogA"), cname("tclilogB"), cname("tclilogC"), cname("tclilogD")
    p = uksm_here("run", "--cluster", a, "--workers", "1", "--pages", "8", "--quiet")
    assert p.returncode == 0, p.stderr
    (da,) = (cwd / "uksm-logs").glob(f"{a}-*")
    assert re.fullmatch(rf"{a}-\d{{8}}-\d{{6}}", da.name) and f"logs: {da}" in p.stdout, p.stdout
    files_a = sorted(f.name for f in da.iterdir())
    assert any(f.startswith("supervisor-") for f in files_a) and any(f.startswith("ksmd-") for f in files_a)
    p = uksm_here("run", "--cluster", b, "--frames", "16", "--quiet")         # fails: nothing verified
    assert p.returncode == 1, p.stdout
    (db,) = (cwd / "uksm-logs").glob(f"{b}-*")
    assert uksm_here("up", "--cluster", c, "--workers", "1", "--pages", "8").returncode == 0
    assert uksm_here("down", "--cluster", c).returncode == 0
    (dc,) = (cwd / "uksm-logs").glob(f"{c}-*")
    p = uksm_here("inject", "--cluster", d, "--kills", "1", "--workers", "2", "--pages", "16", "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    (dd,) = tmp.glob(f"uksm-{d}-*")
    # every folder is still there, with what it held
    assert sorted(f.name for f in da.iterdir()) == files_a
    for folder in (db, dc, dd):
        assert any(f.name.startswith("supervisor-") for f in folder.iterdir()), folder
    assert sorted(x.name for x in (cwd / "uksm-logs").iterdir()) == sorted([da.name, db.name, dc.name])
