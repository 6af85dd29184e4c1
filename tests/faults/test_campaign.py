"""``uksm campaign`` (issue 13): the local and the Ray engine give the same
per-run results; a Ray worker killed mid-campaign costs a retry, never a
run twice or a run lost; an interrupted campaign resumes with only what is
missing.  Runs are tiny (2 workers, 32 pages, a few kills)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import _mine
from helpers import ROOT, run_group, uksm, wait_for

TINY = ["--kills", "2", "--workers", "2", "--pages", "32"]
SWEEP = ["--seeds", "1", "--points", "random,cursor", "--signals", "KILL,TERM", *TINY]


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def campaign(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-m", "uksm", "campaign", *args], timeout)


def dry_ids(*args: str) -> set[str]:
    p = uksm("campaign", "--dry-run", *args, check=True)
    return {x.split()[0] for x in p.stdout.splitlines()}


def per_run(rows: list[dict]) -> dict[str, tuple]:
    return {r["run_id"]: (r["status"], r["kills"], r["fsck_ok"], r["mismatches"]) for r in rows}


def session_procs(word: str) -> dict[int, str]:
    """This test session's live processes whose command line has ``word``."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if word in cmd and state != "Z" and _mine(int(d)):
            out[int(d)] = cmd
    return out


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class NoRayLeft:
    """Ray's processes (raylet, GCS, workers) and its /dev/shm objects
    (plasma) must not outlive the campaign that started them."""

    def __enter__(self) -> "NoRayLeft":
        self.shm = set(os.listdir("/dev/shm"))
        return self

    def __exit__(self, *exc) -> None:
        def clear() -> bool:
            # uksm's own objects (uksm.*, and test_lock_protocol's uksmtest.*)
            # are the leak fixture's to judge: only the rest can be Ray's
            return not session_procs("ray") and not [
                n for n in set(os.listdir("/dev/shm")) - self.shm if "uksm" not in n]
        try:
            wait_for(clear, timeout=20, what="Ray's processes and /dev/shm objects gone")
        finally:
            for pid in session_procs("ray"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.timeout(200)
def test_local_and_ray_same_results(tmp_path):
    pytest.importorskip("ray")
    ids = dry_ids(*SWEEP)
    assert len(ids) == 4
    p = campaign(*SWEEP, "--out", str(tmp_path / "local.jsonl"), "--parallel", "2", timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "status   clean 4" in p.stdout
    local = lines(tmp_path / "local.jsonl")
    with NoRayLeft():
        p = campaign(*SWEEP, "--engine", "ray", "--parallel", "2", "--out",
                     str(tmp_path / "ray.jsonl"), timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    ray_rows = lines(tmp_path / "ray.jsonl")
    assert len(local) == len(ray_rows) == 4
    assert set(per_run(local)) == set(per_run(ray_rows)) == ids
    assert per_run(local) == per_run(ray_rows)
    for r in local + ray_rows:
        assert r["status"] == "clean" and r["kills"] == 2 and r["logs"] is None, r
        assert r["command"].startswith("uksm inject --kills 2 ")
    # passing runs' logs dropped (--keep-logs failed), nothing else left there
    assert os.listdir(tmp_path / "local.logs") == [] and os.listdir(tmp_path / "ray.logs") == []


@pytest.mark.timeout(200)
def test_ray_worker_killed_mid_campaign(tmp_path):
    """SIGKILL the Ray worker running a run: Ray retries the task, the
    killed attempt's guard removes its cluster (the leak fixture checks),
    and every run is recorded exactly once, clean."""
    pytest.importorskip("ray")
    args = ["--seeds", "1-4", "--kills", "6", "--workers", "2", "--pages", "32", "--engine", "ray",
            "--parallel", "2", "--out", str(tmp_path / "r.jsonl"), "--quiet"]
    with NoRayLeft():
        camp = subprocess.Popen([sys.executable, "-m", "uksm", "campaign", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            def a_guard_under_ray() -> tuple[int, str] | None:
                for pid, cmd in session_procs("campaign_run --guard").items():
                    try:
                        parent = ppid(pid)
                        with open(f"/proc/{parent}/cmdline", "rb") as f:
                            if f.read().startswith(b"ray::"):
                                return parent, cmd.split("--guard ")[1].split()[1]
                    except OSError:
                        continue
                return None
            worker, cluster = wait_for(a_guard_under_ray, timeout=60, what="a run under a Ray worker")
            os.kill(worker, signal.SIGKILL)
            out, err = camp.communicate(timeout=90)
        finally:
            if camp.poll() is None:
                os.killpg(camp.pid, signal.SIGINT)
                camp.communicate(timeout=20)
    assert camp.returncode == 0, out + err
    rows = lines(tmp_path / "r.jsonl")
    assert sorted(r["run_id"] for r in rows) == sorted(dry_ids(*args[:-7]))
    assert all(r["status"] == "clean" and r["kills"] == 6 for r in rows), rows
    assert cluster not in {r["cluster"] for r in rows}, "the killed attempt is not a result"
    killed = cluster[1:13]
    assert [r["run_id"] for r in rows].count(killed) == 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["SIGINT-group", "SIGTERM", "ray-SIGINT"])
def test_resume_runs_only_what_is_missing(tmp_path, how):
    """Interrupted, a campaign records what ended, aborts what runs (no
    cluster, no process, no logs left), exits 130; --resume then runs only
    the missing runs.  On Ray, the running tasks are cancelled: their
    guards clean up the same way."""
    out = tmp_path / "c.jsonl"
    engine = ["--engine", "ray"] if how.startswith("ray") else []
    if engine:
        pytest.importorskip("ray")
    args = ["--seeds", "1-4", *TINY, "--parallel", "1", "--out", str(out)]
    with NoRayLeft():
        _interrupt(args + engine, out, how)
    first = lines(out)
    assert 1 <= len(first) < 4, "interrupted mid-campaign"
    assert all(r["status"] == "clean" for r in first), [(r["status"], r.get("stderr_tail")) for r in first]
    # nothing unfinished was recorded, and no aborted run left its logs
    assert os.listdir(tmp_path / "c.logs") == []
    p = campaign(*args, "--resume", timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{len(first)} already recorded, {4 - len(first)} to run" in p.stderr
    rows = lines(out)
    assert len(rows) == 4 and sorted(r["run_id"] for r in rows) == sorted(dry_ids(*args[:-2]))
    assert rows[:len(first)] == first
    assert os.listdir(tmp_path / "c.logs") == []
    # nothing left to do: a second --resume runs nothing
    p = campaign(*args, "--resume", timeout=30)
    assert p.returncode == 0 and "4 already recorded, 0 to run" in p.stderr
    assert len(lines(out)) == 4


def _interrupt(args: list[str], out, how: str) -> None:
    camp = subprocess.Popen([sys.executable, "-m", "uksm", "campaign", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= 1, timeout=60,
                 what="a first result")
        if how == "SIGTERM":
            os.kill(camp.pid, signal.SIGTERM)      # the campaign alone
        else:
            os.killpg(camp.pid, signal.SIGINT)     # Ctrl-C: the foreground group
        _o, err = camp.communicate(timeout=40)
    finally:
        if camp.poll() is None:
            os.killpg(camp.pid, signal.SIGKILL)
            camp.communicate()
    assert camp.returncode == 130, err


def test_failing_run_is_reported_with_its_command(tmp_path):
    """A run that fails is a result: status, exit 1, the command that
    reproduces it, its logs kept.  (A timeout of 0.05 s fails any run: a run
    starts a guard, inject, ksmd and workers, each a Python process, and
    waits for two full scans before its first kill.)"""
    p = campaign("--seeds", "3", *TINY, "--run-timeout", "0.05", "--out", str(tmp_path / "f.jsonl"),
                 timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    (r,) = lines(tmp_path / "f.jsonl")
    assert r["status"] == "timeout" and r["logs"] and os.path.isdir(r["logs"])
    assert ("timeout   " + r["run_id"] + "  uksm inject --kills 2 --point random --signal KILL "
            "--seed 3") in p.stdout


@pytest.mark.parametrize("args,msg", [
    (["--seeds", "5-1"], "empty range"), (["--seeds", "x"], "not a seed"),
    (["--points", "nowhere"], "unknown point"), (["--policies", "new"], "unknown policy"),
    (["--hazards", "no-fast-path+bogus"], "unknown hazard"), (["--signals", "HUP"], "unknown signal"),
    (["--kills", "-1"], "kills must be"), (["--workloads", "dup:x"], "dup"),
    (["--config", "/nonexistent.toml"], "--config"),
])
def test_bad_sweep_is_usage_error(args, msg, tmp_path):
    p = uksm("campaign", "--out", str(tmp_path / "x.jsonl"), *args, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and msg in p.stderr, p.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_config_file_and_existing_out(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('seeds = "1-3"\npoints = ["random", "cursor"]\nhazards = ["none", '
                   '"no-fast-path+no-exit-checks"]\nkills = 5\n')
    p = uksm("campaign", "--config", str(cfg), "--dry-run", "--seeds", "7", check=True)
    cmds = [x.split(None, 1)[1] for x in p.stdout.splitlines()]
    assert len(cmds) == 4 and all("--seed 7 " in c and "--kills 5 " in c for c in cmds)
    assert sum("--hazard no-exit-checks --hazard no-fast-path" in c for c in cmds) == 2
    (tmp_path / "o.jsonl").write_text("")
    p = uksm("campaign", "--out", str(tmp_path / "o.jsonl"), timeout=60)
    assert p.returncode == 2 and "--resume" in p.stderr


def test_torn_last_line_is_repaired_and_said(tmp_path):
    """A campaign killed mid-write leaves a torn last line: --resume cuts it
    off and says so (it was kept, alone on its line, and the docs' own jq
    recipe then failed on it), runs that run again, and the file is whole
    JSON lines.  A damaged line elsewhere is refused, not appended to."""
    out = tmp_path / "t.jsonl"
    base = ["--seeds", "1-2", "--kills", "0", "--workers", "1", "--pages", "16", "--out", str(out),
            "--parallel", "1"]
    p = campaign(*base, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n" + second[:25])          # killed while writing the second
    p = campaign(*base, "--resume", timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "its last line was torn (a campaign killed while writing it): removed it (25 bytes)" \
        in p.stderr, p.stderr
    rows = lines(out)                                    # every line is JSON again
    assert len(rows) == 2 and rows[0] == json.loads(first)
    assert {r["run_id"] for r in rows} == {json.loads(first)["run_id"], json.loads(second)["run_id"]}
    jq = subprocess.run(["jq", "-c", "select(.status != \"clean\") | .command", str(out)],
                        capture_output=True, text=True)
    assert jq.returncode == 0 and jq.stdout == "", jq.stderr  # the docs' recipe reads it
    out.write_text(first + "\nnot a result\n" + second + "\n")
    p = campaign(*base, "--resume", timeout=60)
    assert p.returncode == 2 and "line 2 is not a campaign result: refusing to append" in p.stderr
    assert out.read_text() == first + "\nnot a result\n" + second + "\n"   # untouched


def test_a_sweep_past_the_limit_is_one_line_at_once(tmp_path):
    """--seeds 1-100000000 --dry-run built 1M-run lists until the kernel
    killed it: the size is known before anything is expanded."""
    p = uksm("campaign", "--seeds", "1-100000000", "--dry-run", timeout=30)
    assert p.returncode == 2 and p.stdout == "", p.stdout[:200]
    err = p.stderr.strip()
    assert "\n" not in err and "= 100000000 runs, more than 100000: split it" in err, err
    assert len(dry_ids("--seeds", "1-1000", "--points", "random,cursor")) == 2000


@pytest.mark.parametrize("how", ["cli", "toml", "json"])
def test_a_negative_seed_is_refused_however_written(how, tmp_path):
    args = ["--seeds=-1"]
    if how != "cli":
        cfg = tmp_path / f"s.{how}"
        cfg.write_text("seeds = [-1]\n" if how == "toml" else '{"seeds": [-1]}')
        args = ["--config", str(cfg)]
    p = uksm("campaign", "--dry-run", *args, timeout=30)
    assert p.returncode == 2 and "seeds are whole numbers >= 0" in p.stderr, p.stderr


def test_legacy_runs_at_slow_path_points_are_left_out_and_said(tmp_path):
    """Under legacy the ksm_exit_* points are never reached: such a run
    was recorded as a 'usage' failure; it is no run of the sweep."""
    p = uksm("campaign", "--dry-run", "--seeds", "1-2", "--policies", "seed,legacy",
             "--points", "ksm_exit_mmap_sem_write,exit_mid_zap", timeout=30)
    assert p.returncode == 0, p.stderr
    cmds = [x.split(None, 1)[1] for x in p.stdout.splitlines()]
    assert len(cmds) == 6
    assert not [c for c in cmds if "ksm_exit_mmap_sem_write" in c and "legacy" in c], cmds
    assert ("left out of the sweep: 2 runs at ksm_exit_mmap_sem_write under policy legacy: "
            "never reached there") in p.stderr, p.stderr
    p = uksm("campaign", "--dry-run", "--policies", "legacy", "--points",
             "ksm_exit_before_down_write", timeout=30)
    assert p.returncode == 2 and "the sweep is empty (1 runs at ksm_exit_before_down_write" \
        in p.stderr, p.stderr
