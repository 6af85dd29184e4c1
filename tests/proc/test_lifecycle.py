"""Nothing outlives its cluster (issue 12), with real signals to real
processes: SIGTERM/SIGHUP/SIGINT stop ``uksm run`` and ``uksm inject`` in
order, a second one kills at once; SIGKILL to a supervisor takes its ksmd
and workers along (the lifeline); ``uksm cleanup`` ends what is left of a
dead cluster -- never a reused pid -- and refuses a live one unless
``--force``.  Each test ends with no process of its cluster alive and
nothing of it in /dev/shm."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from helpers import ROOT, cluster_pids, cname, log_events, require, uksm, wait_for
from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_OOPS, signalled
from uksm.host.oops import OOPS_LIMIT
from uksm.kernel.cluster import Cluster, pid_alive
from uksm.kernel.layout import R_WORKER, T_READY, T_ROLE

SMALL = ("--workers", "2", "--pages", "32", "--quiet")


def start(*argv: str) -> subprocess.Popen:
    """A foreground command in its own session (a terminal's job)."""
    return subprocess.Popen([sys.executable, "-m", "uksm", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def workers_ready(cluster: str) -> int:
    """Workers of ``cluster`` that have written their pages (their signal
    handlers are in place: a SIGTERM before that kills them outright)."""
    try:
        cl = Cluster.attach(cluster)
    except shm.UksmError:
        return 0
    try:
        q = cl.q
        return sum(1 for r, b in cl.live_rows() if q[b + T_ROLE] == R_WORKER and q[b + T_READY])
    finally:
        cl.close()


def wait_up(p: subprocess.Popen, cluster: str, workers: int = 2) -> list[int]:
    """Until ksmd and ``workers`` workers of ``cluster`` run; their pids."""
    wait_for(lambda: len([x for x in cluster_pids(cluster) if x != p.pid]) >= workers + 1
             and workers_ready(cluster) >= workers or p.poll() is not None, 60,
             what=f"cluster {cluster} up")
    assert p.poll() is None, p.communicate()
    return [x for x in cluster_pids(cluster) if x != p.pid]


# what each cluster had left when force_clean came to it: nothing_left
# asserts it was nothing (the safety net must not hide what the test checks)
LEFT: dict[str, tuple[list[int], list[str]]] = {}


def force_clean(cluster: str) -> None:
    """The safety net: note what of ``cluster`` is still there after a
    bounded wait for its processes to go by themselves (LEFT), then
    SIGKILL them and remove its objects."""
    try:
        wait_for(lambda: not cluster_pids(cluster), 10, what="the cluster's processes to go")
    except AssertionError:
        pass
    LEFT[cluster] = (cluster_pids(cluster), shm.leftovers(cluster))
    for pid in cluster_pids(cluster):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not cluster_pids(cluster), 10, what="the cluster's processes to die")
    shm.remove_all(cluster)


def finish(p: subprocess.Popen, cluster: str, timeout: float = 60) -> tuple[str, str]:
    """The command's output; whatever happens, nothing of ``cluster`` left."""
    try:
        return p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        force_clean(cluster)


def report(out: str, err: str) -> dict[str, Any]:
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON report:\n{out}\n{err}")


def ended(log_dir) -> str:
    """Why ``uksm run``'s loop ended (its ``run_end`` event), not how long it took."""
    (e,) = log_events(log_dir, "run_end")
    return e["reason"]


def nothing_left(cluster: str, pids: list[int]) -> None:
    """The test's cluster was gone before the safety net came (LEFT), and
    is gone now."""
    assert LEFT.pop(cluster, ([], [])) == ([], []), "left for the safety net (pids, objects)"
    wait_for(lambda: not any(pid_alive(x) for x in pids), 10, what="the cluster's processes to go")
    assert not cluster_pids(cluster)
    assert shm.leftovers(cluster) == []


# ---- 1. stop signals -----------------------------------------------------------------------

@pytest.mark.timeout(100)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_to_run_stops_in_order(sig: int, tmp_path) -> None:
    cl = cname(f"tlcrun{sig}")
    p = start("run", "--cluster", cl, "--duration", "80", "--json", "--log-dir", str(tmp_path), *SMALL)
    try:
        kids = wait_up(p, cl)
        p.send_signal(sig)
    finally:
        out, err = finish(p, cl)
    r = report(out, err)
    assert p.returncode == signalled(sig) == r["status"], err
    assert r["interrupted"] == signal.Signals(sig).name
    # in order: every worker out through its exit path, ksmd freed, fsck clean
    w = r["workers"]
    assert w["started"] == w["exited"] == 2 and w["killed"] == 0, w
    assert w["exit_fast"] + w["exit_slow"] + w["exit_legacy"] + w["exit_noslot"] == 2, w
    assert r["fsck"]["ok"] and r["integrity"]["mismatches"] == 0 and r["ipc_leftovers"] == [], r
    assert ended(tmp_path) == "stop signal"
    nothing_left(cl, kids)
    events = [e["event"] for e in log_events(tmp_path, role="supervisor")]
    assert "interrupted" in events and events[-1] == "cluster_stop"


@pytest.mark.timeout(100)
def test_stop_signal_text_report_says_interrupted(tmp_path) -> None:
    cl = cname("tlctext")
    p = start("run", "--cluster", cl, "--duration", "80", "--log-dir", str(tmp_path), *SMALL)
    try:
        kids = wait_up(p, cl)
        p.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(p, cl)
    assert p.returncode == signalled(signal.SIGTERM), err
    assert "INTERRUPTED by SIGTERM" in out and "fsck     clean" in out, out
    assert "Traceback" not in err
    nothing_left(cl, kids)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_to_inject_mid_run(sig: int, tmp_path) -> None:
    cl = cname(f"tlcinj{sig}")
    p = start("inject", "--cluster", cl, "--kills", "100000", "--workers", "2", "--pages", "32",
              "--json", "--quiet", "--log-dir", str(tmp_path))
    try:
        wait_up(p, cl)
        # mid-run: kills delivered, replacements spawned (mm3 and on)
        wait_for(lambda: f"uksm.{cl}.mm4" in shm.leftovers(cl) or p.poll() is not None, 60,
                 what="kills and respawns")
        kids = [x for x in cluster_pids(cl) if x != p.pid]
        p.send_signal(sig)
    finally:
        out, err = finish(p, cl, 90)
    r = report(out, err)
    assert p.returncode == signalled(sig) == r["status"], err
    assert r["interrupted"] == signal.Signals(sig).name
    assert r["inject"]["kills"] < 100000
    assert r["fsck"]["ok"] and r["ipc_leftovers"] == [], r
    w = r["workers"]
    assert w["started"] == w["exited"]
    # every exit path named, SIGKILLed workers' (run by their reapers) too
    assert w["exit_fast"] + w["exit_slow"] + w["exit_legacy"] + w["exit_noslot"] == w["exited"], w
    nothing_left(cl, kids)


@pytest.mark.timeout(100)
@pytest.mark.parametrize("cmd", ["run", "up"])
def test_second_signal_kills_at_once_and_removes_everything(cmd: str, tmp_path) -> None:
    """``uksm run``, and the daemon of ``up --foreground`` (a service being
    stopped twice)."""
    cl = cname(f"tlctwice{cmd}")
    argv = (("run", "--duration", "80", *SMALL) if cmd == "run" else
            ("up", "--foreground", "--workers", "2", "--pages", "16"))
    p = start(*argv, "--cluster", cl, "--log-dir", str(tmp_path))
    try:
        kids = wait_up(p, cl)
        # two different signals back to back: python runs both handlers
        # (two of the same may coalesce into one)
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGHUP)
    finally:
        out, err = finish(p, cl)
    # python runs pending handlers in signal-number order: either is "second"
    assert p.returncode in (signalled(signal.SIGHUP), signalled(signal.SIGTERM)), (out, err)
    assert "second stop signal" in err and "Traceback" not in err, err
    nothing_left(cl, kids)


# ---- 2. the lifeline -----------------------------------------------------------------------

@pytest.mark.timeout(100)
def test_sigkill_to_run_supervisor_takes_its_children_along(tmp_path) -> None:
    cl = cname("tlckill")
    p = start("run", "--cluster", cl, "--duration", "80", "--log-dir", str(tmp_path), *SMALL)
    try:
        kids = wait_up(p, cl)
        p.kill()  # the supervisor only: its ksmd and workers are in their own groups
        p.wait(timeout=30)
        # "within a second or two": generous here, the machine is shared
        wait_for(lambda: not any(pid_alive(x) for x in kids), 10, what="ksmd and workers to die")
        assert shm.leftovers(cl)  # a SIGKILLed supervisor removes nothing...
        r = uksm("cleanup", "--cluster", cl, timeout=60)
        assert r.returncode == 0 and "ended" not in r.stdout, (r.stdout, r.stderr)  # ...found dead
        assert f"removed /dev/shm/uksm.{cl}.ctl" in r.stdout
    finally:
        finish(p, cl)
    nothing_left(cl, kids)


@pytest.mark.timeout(100)
def test_sigkill_to_daemon_takes_its_children_along(tmp_path) -> None:
    cl = cname("tlcup")
    r = uksm("up", "--cluster", cl, "--workers", "2", "--pages", "16", "--json", "--log-dir",
             str(tmp_path), timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        daemon = json.loads(r.stdout)["pid"]
        kids = [x for x in cluster_pids(cl) if x != daemon]
        assert len(kids) == 3, kids  # ksmd, two workers
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(x) for x in kids), 10, what="ksmd and workers to die")
        c = uksm("cleanup", "--cluster", cl, timeout=60)
        assert c.returncode == 0 and "ended" not in c.stdout, (c.stdout, c.stderr)
    finally:
        force_clean(cl)
    nothing_left(cl, kids)


# ---- 3. cleanup ----------------------------------------------------------------------------

# A supervisor as uksm had them before the lifeline: its children outlive it.
ORPHANING_SUPERVISOR = textwrap.dedent("""
    import subprocess, sys, time
    from uksm.kernel.cluster import Config
    from uksm.kernel.layout import T_PID, T_STATE, TS_ALIVE
    from uksm.proc.supervisor import Supervisor

    class NoLifeline(Supervisor):
        def _popen(self, args, pass_fds=(), oops_fd=-1):
            return subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL,
                                    start_new_session=True,
                                    pass_fds=(*pass_fds, oops_fd) if oops_fd >= 0 else pass_fds)

    sup = NoLifeline(sys.argv[1], Config(frames=256, va_pages=64, max_tasks=16, max_mms=8), None,
                     quiet=True)
    sup.boot()
    for _ in range(2):
        sup.spawn_worker(16, "dup:2", 1)
    # a row whose pid was reused by an unrelated process (the decoy): never to be hit
    row = sup.alloc_row(3, int(sys.argv[2]))
    print("up", flush=True)
    time.sleep(120)
""")


@pytest.mark.timeout(100)
def test_cleanup_ends_orphans_never_a_reused_pid(tmp_path) -> None:
    cl = cname("tlcorph")
    decoy = subprocess.Popen(["sleep", "90"])
    p = subprocess.Popen([sys.executable, "-c", ORPHANING_SUPERVISOR, cl, str(decoy.pid)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "up\n"
        kids = wait_for(lambda: [x for x in cluster_pids(cl) if x != p.pid]
                        if len(cluster_pids(cl)) >= 3 else None, 30, what="ksmd and workers")
        p.kill()
        p.wait(timeout=30)
        assert all(pid_alive(x) for x in kids)  # orphans: no lifeline
        r = uksm("cleanup", "--cluster", cl, timeout=60)
        assert r.returncode == 0, r.stderr
        ended = r.stdout.split("processes:", 1)[1].split("\n", 1)[0].split()
        assert sorted(map(int, ended)) == sorted(kids), r.stdout
        assert not any(pid_alive(x) for x in kids)
        assert decoy.poll() is None  # the reused pid in the table was left alone
    finally:
        decoy.kill()
        decoy.wait()
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()
        force_clean(cl)
    nothing_left(cl, kids)


@pytest.mark.timeout(100)
def test_cleanup_refuses_a_live_cluster_unless_force(tmp_path) -> None:
    cl = cname("tlclive")
    p = start("run", "--cluster", cl, "--duration", "80", "--log-dir", str(tmp_path), *SMALL)
    try:
        kids = wait_up(p, cl)
        before = shm.leftovers(cl)
        r = uksm("cleanup", "--cluster", cl, timeout=60)
        assert r.returncode == EXIT_ERR and "is alive" in r.stderr and "--force" in r.stderr, r
        assert r.stderr.count("\n") == 1 and shm.leftovers(cl) == before
        assert all(pid_alive(x) for x in kids + [p.pid])
        r = uksm("cleanup", "--cluster", cl, "--force", timeout=60)
        assert r.returncode == 0, r.stderr
        assert str(p.pid) in r.stdout.split("processes:", 1)[1].split("\n", 1)[0].split()
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
    finally:
        finish(p, cl)
    nothing_left(cl, kids)


# ---- 4. a ksmd oops ------------------------------------------------------------------------

def run_text(env: dict[str, str], *argv: str, timeout: float = 90) -> tuple[str, int, str]:
    """``uksm run ARGV`` with ``env``: its stdout, status and stderr."""
    p = subprocess.Popen([sys.executable, "-m", "uksm", "run", *argv], cwd=ROOT, text=True,
                         env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    cl = argv[argv.index("--cluster") + 1]
    out, err = finish(p, cl, timeout)
    return out, p.returncode, err


def run_env(env: dict[str, str], *argv: str, timeout: float = 90) -> tuple[dict[str, Any], int, str]:
    out, status, err = run_text(env, "--json", *argv, timeout=timeout)
    return report(out, err), status, err


@pytest.mark.timeout(100)
def test_ksmd_oopsing_every_batch_ends_the_run(tmp_path) -> None:
    cl = cname("tlcoopsloop")
    r, status, err = run_env({"UKSM_TEST_KSMD_OOPS": "every"}, "--cluster", cl, "--duration", "60",
                             "--log-dir", str(tmp_path), "--workers", "1", "--pages", "16")
    assert status == r["status"] == EXIT_OOPS, err
    assert ended(tmp_path) == "ksmd oopsed in a row"   # not by --duration
    assert r["oops"] == [{"task": "ksmd", "error": "RuntimeError: test oops (UKSM_TEST_KSMD_OOPS=every)",
                          "where": r["oops"][0]["where"], "count": OOPS_LIMIT}], r["oops"]
    assert r["ksmd_restarts"] == OOPS_LIMIT - 1
    assert any("oopsed 3 times in a row" in e for e in r["errors"])
    assert r["ipc_leftovers"] == [] and "Traceback" not in err
    assert err.count("ksmd oops:") == 2  # the first of its kind, and the giving up
    # each oops logged once, with its traceback, by the ksmd that raised it
    oopses = log_events(tmp_path, "oops", role="ksmd")
    assert len(oopses) == OOPS_LIMIT and all("Traceback" in e["tb"] for e in oopses)
    sup = [e["event"] for e in log_events(tmp_path, role="supervisor")]
    assert sup.count("ksmd_restart") == OOPS_LIMIT - 1 and sup.count("oops_loop") == 1
    assert shm.leftovers(cl) == [] and not cluster_pids(cl)


@pytest.mark.timeout(100)
def test_a_single_ksmd_oops_fails_the_run(tmp_path) -> None:
    cl = cname("tlcoops1")
    r, status, err = run_env({"UKSM_TEST_KSMD_OOPS": f"once:{tmp_path}/oopsed"}, "--cluster", cl,
                             "--log-dir", str(tmp_path), "--workers", "2", "--pages", "32",
                             "--workload", "identical", "--max-duration", "60")
    # ksmd restarted and merged after it; the run still fails, by the rule
    assert status == r["status"] == EXIT_OOPS, err
    assert [o["count"] for o in r["oops"]] == [1] and r["ksmd_restarts"] == 1
    k = r["ksm"]   # merged to the end (2 x 32 identical pages): one KSM page, 63 sharing it
    assert (k["pages_shared"], k["pages_sharing"]) == (1, 63) and r["fsck"]["ok"], r
    assert r["ipc_leftovers"] == [] and not cluster_pids(cl)


@pytest.mark.timeout(100)
def test_an_oops_in_the_text_report(tmp_path) -> None:
    """The text report names the oops, its task and count, and the run
    exits 5 (a fresh user's try found the report dying on a KeyError at
    any oops, status 1: it read fields the oops block never had)."""
    cl = cname("tlcoopstxt")
    out, status, err = run_text({"UKSM_TEST_KSMD_OOPS": "every"}, "--cluster", cl, "--duration", "60",
                                "--log-dir", str(tmp_path), "--workers", "1", "--pages", "16")
    assert status == EXIT_OOPS, out + err
    assert "Traceback" not in out + err
    assert "OOPS     ksmd: RuntimeError: test oops (UKSM_TEST_KSMD_OOPS=every) at " in out, out
    assert f"x{OOPS_LIMIT} (its traceback: the task's log)" in out, out
    assert shm.leftovers(cl) == [] and not cluster_pids(cl)


@pytest.mark.timeout(100)
def test_the_text_report_says_how_run_store_ended(tmp_path) -> None:
    """A scenario's write of run=2 is in the text report too, not only in
    --json (a fresh user looked for it there, as the README says)."""
    cl = cname("tlcrstxt")
    out, status, err = run_text({}, "--cluster", cl, "--scenario", "oom-unmerge",
                                "--log-dir", str(tmp_path))
    assert status == 0, out + err
    assert "           run_store 2: done (run now 2)" in out, out
    assert shm.leftovers(cl) == [] and not cluster_pids(cl)


# ---- 5. --duration caps --until-merged -------------------------------------------------------

@pytest.mark.timeout(100)
def test_duration_caps_until_merged(tmp_path) -> None:
    # converges long before the cap: ends there (before issue 12, --duration
    # switched --until-merged off and this ran the full 60 s)
    cl = cname("tlcum")
    (tmp_path / "um").mkdir()
    r, status, err = run_env({}, "--cluster", cl, "--until-merged", "--duration", "60", "--log-dir",
                             str(tmp_path / "um"), "--workers", "1", "--pages", "16", "--workload", "identical")
    assert status == 0, err
    assert ended(tmp_path / "um") == "converged" and r["ksm"]["pages_sharing"] == 15, r
    # cannot converge in 2 s (once the worker is ready, a full scan takes 16
    # batches of one page, 0.3 s apart, and convergence three full scans
    # alike): the cap ends it, not --max-duration's 60 s
    cl = cname("tlccap")
    (tmp_path / "cap").mkdir()
    r, status, err = run_env({}, "--cluster", cl, "--until-merged", "--duration", "2", "--log-dir",
                             str(tmp_path / "cap"), "--workers", "1", "--pages", "16", "--pages-to-scan", "1",
                             "--sleep-ms", "300", "--max-duration", "60")
    assert status == 0, err
    assert ended(tmp_path / "cap") == "--duration", r
    assert shm.leftovers(cl) == [] and not cluster_pids(cl)


# ---- 7. out of room, bad environment -------------------------------------------------------

def in_private_shm(script: str, size: str = "8m", timeout: float = 80) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace with a small tmpfs
    on /dev/shm: POSIX shm always lives there, so this is how a cluster
    meets a full /dev/shm without filling the machine's.  Everything of it
    (objects, processes) goes with the namespace; the script prints what
    is left in its /dev/shm on its last line.  Skips (an allowed reason)
    where no private mount namespace can be made: its probe says why."""
    require("no-mount-namespace")
    body = (f"mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 99\n"
            f"PY={sys.executable}\n{script}\necho left $(ls -A /dev/shm | wc -l)\n")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", body],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(100)
def test_cluster_too_big_for_dev_shm_fails_in_one_line(tmp_path) -> None:
    p = in_private_shm(f'$PY -m uksm run --cluster tlcbig --workload unique --workers 1 --pages 4096 '
                       f'--log-dir {tmp_path} --quiet; echo status $?')
    assert "status 1" in p.stdout and p.stdout.endswith("left 0\n"), (p.stdout, p.stderr)
    err = [ln for ln in p.stderr.splitlines() if ln]
    assert len(err) == 1 and "does not fit in /dev/shm" in err[0] and "MiB are free" in err[0], err


@pytest.mark.timeout(100)
def test_dev_shm_filling_up_mid_run_is_an_oom_not_a_sigbus(tmp_path) -> None:
    # the cluster fits at boot; then something else takes every free byte of
    # /dev/shm, and the churning workers keep allocating frames: without the
    # MADV_POPULATE_WRITE check their next write to a new frame is a SIGBUS
    p = in_private_shm(textwrap.dedent(f"""
        $PY -m uksm run --cluster tlcfill --workload unique --workers 2 --pages 256 --churn-ms 1 \\
            --duration 4 --json --log-dir {tmp_path} --quiet > {tmp_path}/r.json &
        P=$!
        while [ ! -e /dev/shm/uksm.tlcfill.mm2 ]; do sleep 0.01; done
        fallocate -l $(df -B1 --output=avail /dev/shm | tail -1) /dev/shm/filler
        sleep 2
        rm /dev/shm/filler
        wait $P; echo status $?"""))
    assert p.stdout.endswith("left 0\n"), (p.stdout, p.stderr)
    r = json.loads(open(tmp_path / "r.json").read())
    w = r["workers"]
    assert w["oom_killed"] >= 1 and w["started"] == w["exited"], w  # the host's memory ran out
    assert r["fsck"]["ok"] and r["integrity"]["mismatches"] == 0 and r["ipc_leftovers"] == [], r
    assert "SIGBUS" not in p.stderr and f"status {r['status']}" in p.stdout
    # status 0 -- unless the OOM killer took every worker before it could
    # verify: a run that verified no page is no success (status 1, said so)
    if r["integrity"]["pages_verified"]:
        assert r["status"] == 0 and r["errors"] == [], (r["errors"], p.stderr)
    else:
        assert r["status"] == 1 and r["errors"] == [
            f"no page was verified: of {w['started']} workers, {w['killed']} killed, "
            f"{w['oom_killed']} OOM-killed, none verified its pages"], (r["errors"], p.stderr)


@pytest.mark.timeout(60)
def test_unwritable_log_dir_fails_in_one_line(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    p = in_private_shm(f"mount -t tmpfs -o ro tmpfs {ro}\n"
                       f"$PY -m uksm run --cluster tlcro --log-dir {ro} --quiet; echo status $?", timeout=50)
    assert "status 2" in p.stdout and p.stdout.endswith("left 0\n"), (p.stdout, p.stderr)
    assert p.stderr.strip().count("\n") == 0 and "cannot write there" in p.stderr, p.stderr


@pytest.mark.timeout(120)
def test_two_runs_side_by_side_and_the_same_name_refused(tmp_path) -> None:
    a, b = cname("tlcsideA"), cname("tlcsideB")
    # slow scans (a full scan ~1.6 s, convergence takes three): A still runs
    # when the same name is tried
    argv = ("--until-merged", "--duration", "60", "--workers", "2", "--pages", "32", "--json",
            "--quiet", "--workload", "dup:4", "--pages-to-scan", "8", "--sleep-ms", "200")
    pa = start("run", "--cluster", a, "--log-dir", str(tmp_path), "--seed", "1", *argv)
    pb = start("run", "--cluster", b, "--log-dir", str(tmp_path), "--seed", "2", *argv)
    try:
        wait_up(pa, a)
        # the same name while A runs: refused in one line, A undisturbed
        r = uksm("run", "--cluster", a, "--workers", "1", "--pages", "8", "--quiet", "--log-dir",
                 str(tmp_path), timeout=60)
        assert pa.poll() is None, "A ended before its name was tried again: make it slower"
        assert r.returncode == 2 and "is in use" in r.stderr and "uksm run" in r.stderr, r
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    finally:
        outs = [finish(pa, a, 90), finish(pb, b, 90)]
    for (out, err), cl in zip(outs, (a, b)):
        r = report(out, err)
        assert r["status"] == 0 and r["cluster"] == cl, (r, err)
        assert r["workers"]["started"] == r["workers"]["exited"] == 2  # its own two, no more
        assert r["fsck"]["ok"] and r["integrity"]["pages_verified"] == 64
        assert r["integrity"]["mismatches"] == 0     # dup:4, 2 x 32 pages: 4 KSM pages, 60 sharing
        assert (r["ksm"]["pages_shared"], r["ksm"]["pages_sharing"]) == (4, 60), r["ksm"]
        assert r["ipc_leftovers"] == [] and not cluster_pids(cl)


# ---- 8. other users stay out ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_another_user_is_refused_and_changes_nothing(tmp_path) -> None:
    """As ``nobody``: every command on root's cluster is refused in one
    clear line, and so is the Python API's ``Machine.attach``; the cluster
    is exactly as it was."""
    require("no-setuid")
    cl = cname("tlcuser")
    r = uksm("up", "--cluster", cl, "--workers", "1", "--pages", "16", "--json", "--log-dir",
             str(tmp_path), timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        daemon = json.loads(r.stdout)["pid"]

        def state() -> tuple[Any, ...]:
            st = json.loads(uksm("status", "--cluster", cl, "--json", timeout=30, check=True).stdout)
            return (st["ksm"]["run"], st["ksm"]["pages_to_scan"], st["workers"]["started"],
                    st["workers"]["exited"], sorted(m["mm"] for m in st["mms"]),
                    sorted(cluster_pids(cl)), shm.leftovers(cl))
        before = state()
        for args in (("status",), ("ctl",), ("ctl", "run=0"), ("ctl", "pages_to_scan=7"),
                     ("kill", "--all"), ("kill", "w1", "--signal", "KILL"), ("spawn",), ("fsck",),
                     ("down",), ("cleanup",), ("cleanup", "--force"), ("top",), ("run", "--quiet")):
            p = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                sys.executable, "-m", "uksm", *args, "--cluster", cl], cwd="/",
                               capture_output=True, text=True, timeout=60)
            assert p.returncode in (1, 2), (args, p.returncode, p.stdout, p.stderr)
            assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
            assert any(w in p.stderr for w in ("belongs to user root", "not the cluster's owner",
                                               "already in use", "is in use")), (args, p.stderr)
        # the Python API: Machine.attach raises MachineError naming the owner
        attach = ("import sys, uksm\n"
                  "try:\n    uksm.Machine.attach(sys.argv[1])\n"
                  "except uksm.MachineError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n")
        p = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            sys.executable, "-c", attach, cl], cwd="/",
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "belongs to user root" in p.stderr, (p.returncode, p.stderr)
        assert state() == before and pid_alive(daemon)
    finally:
        d = uksm("down", "--cluster", cl, timeout=90)
    assert d.returncode == 0, d.stderr
    assert shm.leftovers(cl) == [] and not cluster_pids(cl)
