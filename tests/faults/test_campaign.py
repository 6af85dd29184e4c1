"""``uksm campaign`` (issue 13): the local engine's results; the Ray engine
gives the same per-run results; a Ray worker killed mid-campaign costs a
retry, never a run twice or a run lost; an interrupted campaign resumes
with only what is missing.  Runs are tiny (2 workers, 32 pages, a few kills).

The tests that need Ray carry the ``ray`` marker: deselected unless asked
for (``pytest -m ray``, after ``pip install -e '.[ray]'``; the README)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, cluster_pids, cmdline, jsonl, ppid, proc_state, reaped, run_group, uksm, wait_for
from leakcheck import mine
from uksm.host import shm

TINY = ["--kills", "2", "--workers", "2", "--pages", "32"]
SWEEP = ["--seeds", "1", "--points", "random,cursor", "--signals", "KILL,TERM", *TINY]


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
        cmd = cmdline(int(d))
        if word in cmd and proc_state(int(d)) not in ("", "Z") and mine(int(d)):
            out[int(d)] = cmd
    return out


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


def local_campaign(tmp_path) -> list[dict]:
    """The sweep on the local engine (the default), two runs at a time:
    every run recorded once, clean, with its command; passing runs' logs
    dropped (--keep-logs failed), nothing else left there."""
    ids = dry_ids(*SWEEP)
    assert len(ids) == 4
    p = campaign(*SWEEP, "--out", str(tmp_path / "local.jsonl"), "--parallel", "2", timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "status   clean 4" in p.stdout
    local = jsonl(tmp_path / "local.jsonl")
    assert set(per_run(local)) == ids and len(local) == 4
    for r in local:
        assert r["status"] == "clean" and r["kills"] == 2 and r["logs"] is None, r
        assert r["fsck_ok"] and r["mismatches"] == 0, r
        assert r["command"].startswith("uksm inject --kills 2 ")
    assert os.listdir(tmp_path / "local.logs") == []
    return local


@pytest.mark.timeout(120)
def test_local_engine(tmp_path):
    local_campaign(tmp_path)


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_local_and_ray_same_results(tmp_path):
    local = local_campaign(tmp_path)
    ids = set(per_run(local))
    with NoRayLeft():
        p = campaign(*SWEEP, "--engine", "ray", "--parallel", "2", "--out",
                     str(tmp_path / "ray.jsonl"), timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    ray_rows = jsonl(tmp_path / "ray.jsonl")
    assert len(ray_rows) == 4 and set(per_run(ray_rows)) == ids
    assert per_run(local) == per_run(ray_rows)
    for r in ray_rows:
        assert r["status"] == "clean" and r["kills"] == 2 and r["logs"] is None, r
        assert r["command"].startswith("uksm inject --kills 2 ")
    assert os.listdir(tmp_path / "ray.logs") == []


def kill_a_ray_worker(args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``uksm campaign ARGS`` (on Ray), SIGKILL the Ray worker running a
    run as soon as one runs; the campaign's output and that run's cluster."""
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
    return subprocess.CompletedProcess(args, camp.returncode, out, err), cluster


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_ray_worker_killed_mid_campaign(tmp_path):
    """SIGKILL the Ray worker running a run: Ray retries the task, the
    killed attempt's guard removes its cluster (the leak fixture checks),
    and every run is recorded exactly once, clean."""
    args = ["--seeds", "1-4", "--kills", "6", "--workers", "2", "--pages", "32", "--engine", "ray",
            "--parallel", "2", "--out", str(tmp_path / "r.jsonl"), "--quiet"]
    p, cluster = kill_a_ray_worker(args)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = jsonl(tmp_path / "r.jsonl")
    assert sorted(r["run_id"] for r in rows) == sorted(dry_ids(*args[:-7]))
    assert all(r["status"] == "clean" and r["kills"] == 6 for r in rows), rows
    assert cluster not in {r["cluster"] for r in rows}, "the killed attempt is not a result"
    killed = cluster[1:13]
    assert [r["run_id"] for r in rows].count(killed) == 1


@pytest.mark.ray
@pytest.mark.timeout(220)
def test_a_run_lost_past_max_retries_is_not_recorded_and_resume_runs_it(tmp_path):
    """--max-retries 0: the run whose Ray worker is killed is lost, not
    retried -- reported as lost, not recorded, the campaign's status 1 --
    and --resume runs it."""
    out = str(tmp_path / "r.jsonl")
    args = ["--seeds", "1-2", "--kills", "6", "--workers", "2", "--pages", "32", "--engine", "ray",
            "--parallel", "1", "--max-retries", "0", "--out", out]
    p, cluster = kill_a_ray_worker([*args, "--quiet"])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "  lost     1 runs (worker or node lost past --max-retries; --resume runs them)" in p.stdout, p.stdout
    lost = cluster[1:13]
    assert lost not in {r["run_id"] for r in jsonl(out)}
    with NoRayLeft():
        p = campaign(*args, "--resume", timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = jsonl(out)
    assert sorted(r["run_id"] for r in rows) == sorted(dry_ids(*args[:-6])) and len(rows) == 2
    assert [r["run_id"] for r in rows].count(lost) == 1 and all(r["status"] == "clean" for r in rows)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["SIGINT-group", "SIGTERM",
                                 pytest.param("ray-SIGINT", marks=pytest.mark.ray)])
def test_resume_runs_only_what_is_missing(tmp_path, how):
    """Interrupted, a campaign records what ended, aborts what runs (no
    cluster, no process, no logs left), exits 130; --resume then runs only
    the missing runs.  On Ray, the running tasks are cancelled: their
    guards clean up the same way."""
    out = tmp_path / "c.jsonl"
    engine = ["--engine", "ray"] if how.startswith("ray") else []
    args = ["--seeds", "1-4", *TINY, "--parallel", "1", "--out", str(out)]
    with NoRayLeft():
        _interrupt(args + engine, out, how)
    first = jsonl(out)
    assert 1 <= len(first) < 4, "interrupted mid-campaign"
    assert all(r["status"] == "clean" for r in first), [(r["status"], r.get("stderr_tail")) for r in first]
    # nothing unfinished was recorded, and no aborted run left its logs
    assert os.listdir(tmp_path / "c.logs") == []
    p = campaign(*args, "--resume", timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{len(first)} already recorded, {4 - len(first)} to run" in p.stderr
    rows = jsonl(out)
    assert len(rows) == 4 and sorted(r["run_id"] for r in rows) == sorted(dry_ids(*args[:-2]))
    assert rows[:len(first)] == first
    assert os.listdir(tmp_path / "c.logs") == []
    # nothing left to do: a second --resume runs nothing
    p = campaign(*args, "--resume", timeout=30)
    assert p.returncode == 0 and "4 already recorded, 0 to run" in p.stderr
    assert len(jsonl(out)) == 4


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
    (r,) = jsonl(tmp_path / "f.jsonl")
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
    rows = jsonl(out)                                    # every line is JSON again
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


# ---- docs/CAMPAIGN.md's promises ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_kills_0_runs_uksm_run_and_keep_logs_all_keeps_a_clean_runs_logs(tmp_path):
    """``kills = 0``: each run is a ``uksm run`` (no kills); ``--keep-logs
    all`` keeps every run's log folder, a clean one's too."""
    out = tmp_path / "k0.jsonl"
    p = campaign("--seeds", "1", "--kills", "0", "--workers", "2", "--pages", "32", "--keep-logs", "all",
                 "--out", str(out), timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    (r,) = jsonl(out)
    assert r["cmd"] == "run" and r["kills"] == 0 and r["status"] == "clean", r
    assert r["command"] == "uksm run --seed 1 --exit-policy seed --workload vm --workers 2 --pages 32", r
    assert r["pages_verified"] == 64 and r["fsck_ok"], r
    assert r["logs"] == str(tmp_path / "k0.logs" / r["run_id"]) and os.listdir(r["logs"]), r


@pytest.mark.timeout(120)
def test_keep_logs_none_drops_even_a_failing_runs_logs(tmp_path):
    out = tmp_path / "n.jsonl"
    p = campaign("--seeds", "3", *TINY, "--run-timeout", "0.05", "--keep-logs", "none", "--out", str(out),
                 timeout=100)
    assert p.returncode == 1, p.stdout + p.stderr
    (r,) = jsonl(out)
    assert r["status"] == "timeout" and r["logs"] is None, r
    assert os.listdir(tmp_path / "n.logs") == []


@pytest.mark.timeout(200)
def test_several_sweeps_share_one_out_and_each_counts_its_own(tmp_path):
    """Two sweeps append to one --out (the second with --resume: the file
    exists); each one's summary and exit status count only its own runs (a
    failing run of the other does not fail it), and --resume of either
    runs nothing again."""
    out = str(tmp_path / "both.jsonl")
    a = ["--seeds", "1", *TINY, "--points", "random", "--signals", "KILL"]
    b = ["--seeds", "5", *TINY, "--points", "random", "--signals", "KILL", "--run-timeout", "0.05"]
    p = campaign(*a, "--out", out, timeout=80)
    assert p.returncode == 0 and "status   clean 1" in p.stdout, p.stdout + p.stderr
    p = campaign(*b, "--out", out, "--resume", timeout=80)
    assert "0 already recorded, 1 to run" in p.stderr, p.stderr
    assert p.returncode == 1 and "status   timeout 1" in p.stdout and "clean" not in p.stdout, p.stdout
    rows = jsonl(out)
    assert [r["status"] for r in rows] == ["clean", "timeout"] and rows[0]["seed"] == 1, rows
    p = campaign(*a, "--out", out, "--resume", timeout=60)
    assert p.returncode == 0 and "1 already recorded, 0 to run" in p.stderr, p.stdout + p.stderr
    assert "status   clean 1" in p.stdout and "timeout" not in p.stdout, p.stdout
    assert len(jsonl(out)) == 2


@pytest.mark.timeout(120)
def test_a_sigkilled_local_campaign_leaves_nothing(tmp_path):
    """The campaign itself SIGKILLed mid-run (it cannot clean up): each
    run's guard sees its parent die, kills the run's process group, removes
    its cluster's objects and its log folder."""
    out = tmp_path / "k.jsonl"
    camp = subprocess.Popen([sys.executable, "-m", "uksm", "campaign", "--seeds", "1", "--kills", "100000",
                             "--workers", "2", "--pages", "32", "--parallel", "1", "--out", str(out),
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    with reaped(camp):
        def a_run() -> str | None:      # a run's cluster, its workers up
            guards = session_procs("campaign_run --guard")
            return next((c.split("--guard ")[1].split()[1] for c in guards.values()
                         if f"uksm.{c.split('--guard ')[1].split()[1]}.mm2" in shm.leftovers()), None)
        name = wait_for(a_run, 60, what="a run with its workers")
        logs = os.path.join(str(tmp_path / "k.logs"), name[1:13])
        assert os.path.isdir(logs)
        camp.kill()                      # the campaign alone, by SIGKILL
        camp.wait(timeout=30)
        wait_for(lambda: not shm.leftovers(name) and not cluster_pids(name), 30,
                 what="the guard to end the run and remove its cluster")
        wait_for(lambda: not session_procs("campaign_run --guard"), 30, what="the guard to exit")
        assert not os.path.exists(logs), "the aborted run's logs are removed"
    assert not out.exists() or jsonl(out) == []


def ray_head_processes(temp: str) -> list[int]:
    """The processes of a Ray head started with --temp-dir ``temp``: their
    command line names the folder, or their environment the head's raylet
    (Ray's agents rename themselves and drop the session marker)."""
    mine = [int(d) for d in os.listdir("/proc") if d.isdigit() and temp in cmdline(int(d))]
    raylets = {str(p) for p in mine if "raylet" in cmdline(p) or proc_state(p) == "Z"}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in mine:
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if any(kv.startswith(b"RAY_RAYLET_PID=") and kv[15:].decode() in raylets for kv in env):
                mine.append(int(d))
    return [p for p in mine if proc_state(p) not in ("", "Z")]


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_ray_address_from_the_environment_is_joined(tmp_path):
    """$RAY_ADDRESS (as set for a Ray job's driver) is the cluster to join:
    the campaign starts no Ray of its own there.  The head is this test's
    own (a port and a temporary folder of its own; `ray stop` would stop
    every Ray of the machine's users), ended by the test."""
    import shutil
    import socket
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="uray", dir="/tmp")   # short: Ray's socket paths live in it
    try:
        # the test's own throw-away head on 127.0.0.1: no token (Ray's default keeps it in ~/.ray)
        plain = dict(os.environ, RAY_AUTH_MODE="disabled")
        head = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}",
                               "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                               "--disable-usage-stats"], env=plain, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stdout + head.stderr
        env = dict(plain, RAY_ADDRESS=f"127.0.0.1:{port}")
        p = subprocess.run([sys.executable, "-m", "uksm", "campaign", "--seeds", "1", *TINY, "--engine",
                            "ray", "--out", str(tmp_path / "r.jsonl")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=150)
        raylets = [x for x in ray_head_processes(temp) if "raylet" in cmdline(x)]
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"to run on ray at 127.0.0.1:{port};" in p.stderr, p.stderr   # joined: no Ray of its own
        assert len(raylets) == 1, raylets                                      # the head's only
        assert [r["status"] for r in jsonl(tmp_path / "r.jsonl")] == ["clean"]
    finally:
        # every process of the head, remembered as found: Ray's agents are
        # found through their raylet's pid (ray_head_processes), and once the
        # raylet is killed and reaped they no longer are -- yet they outlive
        # it a moment (a CI run's leak check caught ray::DashboardAgent and
        # ray::RuntimeEnvAgent so), so each round kills all seen till none lives
        seen: set[int] = set()

        def head_gone() -> bool:
            seen.update(ray_head_processes(temp))
            alive = [pid for pid in seen if proc_state(pid) not in ("", "Z")]
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not alive
        wait_for(head_gone, 30, what="the Ray head's processes gone")
        shutil.rmtree(temp, ignore_errors=True)


CAMPAIGN_SH = os.path.join(ROOT, "deploy", "campaign.sh")


def campaign_sh(cwd, *args: str, opts: str = "", timeout: float = 100) -> subprocess.CompletedProcess:
    """deploy/campaign.sh ARGS, with this checkout's uksm ($UKSM) and
    $UKSM_CAMPAIGN_OPTS, in ``cwd``."""
    env = dict(os.environ, UKSM=f"{sys.executable} -m uksm", UKSM_CAMPAIGN_OPTS=opts)
    return subprocess.run(["bash", CAMPAIGN_SH, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_deploy_campaign_sh_expands_every_mode_and_signal(tmp_path):
    """deploy/campaign.sh [OUT] [KILLS] [SEEDS...]: every mode (random,
    cursor, all) and signal for each seed, 4 workers x 256 pages, results in
    OUT/campaign.jsonl; by default OUT campaign-<date>-<time>, 200 kills,
    seeds 1 2 3 ($UKSM_CAMPAIGN_OPTS --dry-run: the runs' commands only)."""
    p = campaign_sh(tmp_path, "out", "7", "4", "5", opts="--dry-run", timeout=60)
    assert p.returncode == 0, p.stderr
    cmds = sorted(x.split(None, 1)[1] for x in p.stdout.splitlines())
    assert len(cmds) == 12 and os.path.isdir(tmp_path / "out"), p.stdout
    want = sorted(f"uksm inject --kills 7 --point {pt} --signal {sg} --seed {s} --exit-policy seed "
                  f"--workload vm --workers 4 --pages 256"
                  for s in (4, 5) for pt in ("random", "cursor", "all") for sg in ("KILL", "TERM"))
    assert cmds == want
    p = campaign_sh(tmp_path, opts="--dry-run", timeout=60)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 18, p.stdout
    assert all(" --kills 200 " in x for x in p.stdout.splitlines())
    assert {x.split("--seed ")[1].split()[0] for x in p.stdout.splitlines()} == {"1", "2", "3"}
    (default,) = [d for d in os.listdir(tmp_path) if d.startswith("campaign-")]
    assert re.fullmatch(r"campaign-\d{8}-\d{6}", default), default


@pytest.mark.timeout(200)
def test_deploy_campaign_sh_fails_if_a_run_was_not_clean(tmp_path):
    small = "--workers 2 --pages 32 --points random --signals KILL --parallel 2"
    p = campaign_sh(tmp_path, "ok", "2", "1", opts=small, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["status"] for r in jsonl(tmp_path / "ok" / "campaign.jsonl")] == ["clean"]
    p = campaign_sh(tmp_path, "bad", "2", "1", opts=small + " --run-timeout 0.05", timeout=100)
    assert p.returncode == 1, p.stdout + p.stderr
    assert [r["status"] for r in jsonl(tmp_path / "bad" / "campaign.jsonl")] == ["timeout"]
