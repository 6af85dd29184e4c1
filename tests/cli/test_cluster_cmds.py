"""The cluster commands (issue 7): ``up`` starts a daemon, the other
commands drive it from separate processes, ``down`` leaves nothing.

Every test starts its own cluster (a unique name) with ``uksm up`` and
drives it only through the CLI (``python -m uksm ...`` subprocesses); the
shared state is read back directly (``Cluster.attach``) to check what the
commands report.  The ``cluster`` fixture (conftest.py) always takes the cluster down --
``uksm down``, and if that fails, SIGKILL of every process of the cluster
and removal of its POSIX objects -- so a failing test leaks nothing (the
autouse leak checker of conftest.py would fail it otherwise).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from helpers import ROOT, Up, cluster_pids, log_events, reaped, require, uksm, wait_for
from uksm.host import shm
from uksm.kernel.cluster import pid_alive
from uksm.kernel.layout import (
    EXIT_POLICIES,
    H_EXIT_POLICY,
    H_MEM_LIMIT,
    K_PAGES_SHARING,
    K_PAGES_TO_SCAN,
    K_RUN,
    K_RUN_DONE,
    K_RUN_SEQ,
    K_SLEEP_MS,
)
from uksm.kernel.mm import live_mm_rows, mm_fields

#: docs/CLUSTER.md: ``ctl`` prints "the ten /sys/kernel/mm/ksm values" first,
#: as ``grep . /sys/kernel/mm/ksm/*`` (written out here, not read from the code)
SYSFS_KSM = ["run", "pages_to_scan", "sleep_millisecs", "max_kernel_pages", "pages_shared",
             "pages_sharing", "pages_unshared", "pages_volatile", "full_scans", "pages_scanned"]


@pytest.mark.timeout(90)
def test_up_drive_down(cluster: Up) -> None:
    info = cluster.up("--workers", "2", "--pages", "64", "--workload", "identical",
                      "--frames", "1024", "--sleep-ms", "5")
    assert info["cluster"] == cluster.name and info["log_dir"] == str(cluster.log_dir)
    daemon = info["pid"]
    assert pid_alive(daemon) and info["workers"] == ["w1", "w2"]
    # the name is taken: status 2, one line
    p = cluster("up", "--log-dir", str(cluster.log_dir))
    assert p.returncode == 2 and "already up" in p.stderr and p.stderr.count("\n") == 1

    sp = cluster.json("spawn", "--count", "2", "--pages", "48", "--workload", "identical", "--wait")
    assert [w["worker"] for w in sp["spawned"]] == ["w3", "w4"]
    assert all(w["ready"] and w["pages"] == 48 for w in sp["spawned"])

    cl = cluster.attach()
    try:
        q = cl.q
        wait_for(lambda: q[K_PAGES_SHARING] >= 200, 30, what="merging")
        # ctl reads straight from the shared memory
        p = cluster("ctl")
        assert p.returncode == 0
        lines = dict(ln.split(" ", 1) for ln in p.stdout.splitlines())
        assert list(lines)[:10] == SYSFS_KSM
        assert {"exit_policy", "mem_limit", "frames_total", "frames_used", "frames_free"} <= set(lines)
        assert lines["frames_total"] == "1024" and lines["exit_policy"] == "seed"

        # run=2: returns once ksmd has unmerged everything
        p = cluster("ctl", "run=2")
        assert p.returncode == 0, p.stderr
        assert q[K_RUN] == 2 and q[K_RUN_DONE] == q[K_RUN_SEQ]
        st = cluster.json("status")
        # what run=2 leaves, known without asking the code: everything
        # unmerged, the knobs as set at up (pages_to_scan's default 100)
        assert {k: st["ksm"][k] for k in SYSFS_KSM[:8]} == {
            "run": 2, "pages_to_scan": 100, "sleep_millisecs": 5, "max_kernel_pages": 1024 // 4,
            "pages_shared": 0,
            "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0}, st["ksm"]
        # ctl (text, another process) says the same
        ctl = dict(ln.split(" ", 1) for ln in cluster("ctl").stdout.splitlines())
        assert {k: int(ctl[k]) for k in SYSFS_KSM} == st["ksm"]
        used = 2 * 64 + 2 * 48     # every page of the four workers, unmerged again
        assert st["frames"] == {"total": 1024, "used": used, "free": 1024 - used}
        assert st["memory"]["host_bytes_resident"] >= used * 4096
        pages = {"w1": 64, "w2": 64, "w3": 48, "w4": 48}
        pids = {w["worker"]: w["pid"] for w in sp["spawned"]}
        assert sorted(m["worker"] for m in st["mms"]) == sorted(pages)
        for m in st["mms"]:
            w = m["worker"]
            assert m["state"] == "live" and m["owner_alive"] and m["pages"] == m["rss"] == pages[w], m
            assert m["owner_pid"] == pids.get(w, m["owner_pid"]) and m["owner_pid"] in cluster_pids(cluster.name)
            # run=2 dropped every rmap_item and KSM page, and kept each live
            # mm's slot (2.6.32's unmerge frees only exiting mms' slots):
            # mm_count is the users' reference and the slot's
            assert (m["ksm_rmap_items"], m["ksm_merging_pages"], m["mm_users"], m["mm_count"]) == \
                (0, 0, 1, 2), m

        # invalid values: refused with the kernel's reasoning, nothing written
        p = cluster("ctl", "run=3")
        assert p.returncode == 2
        assert p.stderr.strip() == "uksm: run: invalid argument (EINVAL): must be 0, 1 or 2"
        # (pages_to_scan=0 is valid: strict_strtoul's 0 <= UINT_MAX; 2^32 and a blank are not)
        for bad in ("pages_to_scan=4294967296", "pages_to_scan= 5", "sleep_millisecs=-1", "exit_policy=none",
                    "mem_limit=99999", "nosuch=1", "pages_shared=0", "run=", "nosuch"):
            p = cluster("ctl", bad)
            assert p.returncode == 2, (bad, p.stderr)
            assert p.stderr.startswith("uksm: ") and p.stderr.count("\n") == 1, p.stderr
        assert q[K_RUN] == 2 and q[K_PAGES_TO_SCAN] == 100 and q[H_MEM_LIMIT] == 0

        p = cluster("ctl", "run=1", "pages_to_scan=50", "sleep_millisecs=3", "exit_policy=shipped",
                    "mem_limit=1000")
        assert p.returncode == 0, p.stderr
        assert (q[K_RUN], q[K_PAGES_TO_SCAN], q[K_SLEEP_MS], q[H_MEM_LIMIT]) == (1, 50, 3, 1000)
        assert EXIT_POLICIES[q[H_EXIT_POLICY]] == "shipped"
        assert cluster("ctl", "pages_to_scan").stdout == "pages_to_scan 50\n"
        assert cluster("ctl", "exit_policy=seed", "mem_limit=0").returncode == 0
        wait_for(lambda: q[K_PAGES_SHARING] >= 200, 30, what="merging again")

        # kill: TERM runs the worker's own exit, KILL leaves it to the reaper
        kt = cluster.json("kill", "w1")
        assert kt["killed"][0]["worker"] == "w1" and kt["killed"][0]["returncode"] == 0
        kk = cluster.json("kill", "w3", "--signal", "KILL")
        assert kk["killed"][0]["returncode"] == -signal.SIGKILL and kk["exit_paths"]["reaped"] == 1
        p = cluster("kill", "w1")
        assert p.returncode == 1 and "no worker 'w1'" in p.stderr
        assert cluster("kill").returncode == 2
        st = cluster.json("status")
        live = {m["worker"] for m in st["mms"] if m["state"] == "live"}
        assert live == {"w2", "w4"}
        assert st["workers"]["killed"] == 1 and st["workers"]["exited"] == 2

        f = cluster.json("fsck")
        assert f["clean"], f["errors"]
    finally:
        cl.close()

    d = cluster.json("down")
    assert d["status"] == 0 and d["fsck"]["ok"] and d["ipc_leftovers"] == []
    assert d["stopped"] == 2 and d["workers"]["started"] == 4 and d["workers"]["exited"] == 4
    assert d["integrity"]["mismatches"] == 0
    assert not pid_alive(daemon) and not cluster_pids(cluster.name)
    assert shm.leftovers(cluster.name) == []
    # the logs say what the daemon did
    # run is written by the writer task (run_store), the other knobs by the daemon
    knobs = [(e["name"], e["value"]) for e in log_events(cluster.log_dir, "ksm_knob")
             if e["role"] in ("ctl", "writer")]
    assert ("run", 2) in knobs and ("pages_to_scan", 50) in knobs
    assert [e["signal"] for e in log_events(cluster.log_dir, "inject_kill", role="ctl")] == ["TERM", "KILL"]
    # gone: said plainly
    p = cluster("status")
    assert p.returncode == 1 and "does not exist" in p.stderr


@pytest.mark.timeout(90)
def test_races_stay_consistent(cluster: Up) -> None:
    """Two ctl at once, then down while a spawn is in progress: both are
    served whole, one after the other; the cluster stays consistent."""
    cluster.up("--workers", "3", "--pages", "64", "--workload", "dup:8", "--frames", "4096")
    base = [sys.executable, "-m", "uksm"]
    a = subprocess.Popen(base + ["ctl", "--cluster", cluster.name, "run=2"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(base + ["ctl", "--cluster", cluster.name, "run=1", "pages_to_scan=64"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(a, b):
        for p in (a, b):
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    cl = cluster.attach()
    try:
        q = cl.q
        assert q[K_RUN] in (1, 2) and q[K_PAGES_TO_SCAN] == 64
        # run_store acts on a change only: run=1 first is a no-op (run was 1)
        assert q[K_RUN_DONE] == q[K_RUN_SEQ] and q[K_RUN_SEQ] == (2 if q[K_RUN] == 1 else 1)
    finally:
        cl.close()
    f = cluster.json("fsck")
    assert f["clean"], f["errors"]
    assert cluster("ctl", "run=1").returncode == 0

    sp = subprocess.Popen(base + ["spawn", "--cluster", cluster.name, "--count", "3", "--pages",
                                  "512", "--workload", "vm", "--wait"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(sp):
        cl = cluster.attach()
        try:  # the spawn request is being served: its first worker exists
            wait_for(lambda: any(mm_fields(cl, r)["worker_no"] >= 4 for r in live_mm_rows(cl)), 30,
                     what="the spawn to start")
        finally:
            cl.close()
        d = cluster.json("down")
        out, err = sp.communicate(timeout=60)
    assert sp.returncode == 0, err  # served whole, before the down
    assert [ln.split()[0] for ln in out.splitlines()] == ["w4", "w5", "w6"]
    assert d["status"] == 0, d
    assert d["fsck"]["ok"] and d["ipc_leftovers"] == [] and d["integrity"]["mismatches"] == 0
    assert d["workers"]["started"] == d["workers"]["exited"] == 6 and d["stopped"] == 6
    wait_for(lambda: not cluster_pids(cluster.name), 10, what="every process gone")
    assert shm.leftovers(cluster.name) == []


def _read_pty(fd: int, until: bytes, timeout: float) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while until not in buf and time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


@pytest.mark.timeout(60)
def test_top_in_a_terminal(cluster: Up) -> None:
    cluster.up("--workers", "2", "--pages", "64", "--workload", "identical", "--frames", "512")
    # without a terminal: one line, status 1, nothing of curses on stdout
    # (its initscr wrote the terminal's set-up sequences first)
    p = cluster("top")
    assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)
    assert "needs a terminal" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    env = dict(os.environ, TERM="xterm", LINES="40", COLUMNS="120")
    pid, fd = pty.fork()
    if pid == 0:  # the child: uksm top on the pty
        try:
            os.chdir(ROOT)
            os.execvpe(sys.executable, [sys.executable, "-m", "uksm", "top", "--cluster",
                                        cluster.name, "--interval", "0.2"], env)
        finally:
            os._exit(127)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        screen = _read_pty(fd, b"pages_sharing", 20)
        assert b"pages_sharing" in screen, screen[-2000:]
        assert cluster.name.encode() in screen
        screen += _read_pty(fd, b"w2", 5)  # the address-space table
        assert b"w2" in screen
        os.write(fd, b"q")
        rest = _read_pty(fd, b"\0never", 10)  # until EOF: top ended
        _pid, st = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, (st, rest[-500:])
        # curses.wrapper put the terminal back: xterm's rmcup (leave the alternate screen)
        assert b"\x1b[?1049l" in rest, rest[-200:]
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert cluster("down").returncode == 0


@pytest.mark.timeout(60)
def test_missing_and_dead_clusters(cluster: Up) -> None:
    # never started: every command says so, and where to look
    for args in (("status",), ("ctl",), ("ctl", "run=1"), ("spawn",), ("kill", "--all"),
                 ("fsck",), ("down",), ("top",)):
        p = cluster(*args)
        assert p.returncode == 1, (args, p.stderr)
        assert "does not exist" in p.stderr and f"uksm cleanup --cluster {cluster.name}" in p.stderr
        assert p.stderr.count("\n") == 1
    # bad usage of up: status 2, nothing started
    for args in (("--run", "3"), ("--workload", "nope"), ("--pages", "0"), ("--workers", "-1")):
        p = cluster("up", "--log-dir", str(cluster.log_dir), *args)
        assert p.returncode == 2, (args, p.stderr)
    assert uksm("up", "--cluster", "bad name!", timeout=50).returncode == 2
    assert shm.leftovers(cluster.name) == [] and not cluster_pids(cluster.name)

    # died: SIGKILL the daemon and everything of it; the objects stay behind
    info = cluster.up("--workers", "1", "--pages", "16")
    pids = cluster_pids(cluster.name)
    assert info["pid"] in pids and len(pids) == 3
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, what="the processes to die")
    assert shm.leftovers(cluster.name)
    for args in (("status",), ("fsck",), ("ctl",), ("down",)):
        p = cluster(*args)
        assert p.returncode == 1, (args, p.stderr)
        assert "is dead" in p.stderr and f"uksm cleanup --cluster {cluster.name}" in p.stderr
    p = cluster("up", "--log-dir", str(cluster.log_dir))
    assert p.returncode == 2 and "uksm cleanup" in p.stderr
    assert cluster("cleanup").returncode == 0
    assert shm.leftovers(cluster.name) == []


@pytest.mark.timeout(60)
def test_foreground_for_a_service_manager(cluster: Up, tmp_path: Path) -> None:
    """``up --foreground`` (the systemd unit's ExecStart): READY=1 over
    NOTIFY_SOCKET once it serves, SIGTERM takes the cluster down in order."""
    import socket
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = f"\0uksm-test-notify-{os.getpid()}"
    ns.bind(addr)
    ns.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET="@" + addr[1:])
    p = subprocess.Popen([sys.executable, "-m", "uksm", "up", "--cluster", cluster.name,
                          "--foreground", "--workers", "2", "--pages", "32", "--log-dir",
                          str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        msg = ns.recv(4096).decode()
        assert msg.startswith("READY=1"), msg
        st = cluster.json("status")
        assert st["supervisor_pid"] == p.pid and len(st["mms"]) == 2
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=45)
        assert p.returncode == 0, err
        assert f"cluster {cluster.name} up" in out and "SIGTERM: taking the cluster down" in err
        assert "fsck clean, 0 objects left" in err
        assert ns.recv(4096).decode() == "STOPPING=1"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()
    assert shm.leftovers(cluster.name) == [] and not cluster_pids(cluster.name)


# ---- docs/CLUSTER.md's promises, one by one ----------------------------------------------------

def _request(name: str, req: dict) -> socket.socket:
    """Connect to the cluster's control socket and send one request; the
    answer is read later (``_answer``).  connect() returns at once: the
    connection waits in the daemon's listen queue, in connect order."""
    from uksm.proc.control import sock_address
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock_address(name))
    s.sendall(json.dumps(req).encode() + b"\n")
    return s


def _answer(s: socket.socket) -> dict:
    buf = b""
    with s:
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


@pytest.mark.timeout(90)
def test_requests_queued_behind_down_are_answered_went_down(cluster: Up) -> None:
    """"Requests still queued when `down` finishes are answered `went
    down`": the daemon frozen (SIGSTOP), a down and a ctl queued behind it
    in that order, the daemon thawed."""
    daemon = cluster.up("--workers", "1", "--pages", "16")["pid"]
    os.kill(daemon, signal.SIGSTOP)
    try:
        down = _request(cluster.name, {"op": "down"})
        late = _request(cluster.name, {"op": "ctl", "set": {"pages_to_scan": 7}})
    finally:
        os.kill(daemon, signal.SIGCONT)
    d = _answer(down)
    assert d["ok"] and d["status"] == 0, d
    assert _answer(late) == {"ok": False, "status": 1, "error": f"cluster {cluster.name!r} went down"}
    wait_for(lambda: not cluster_pids(cluster.name), 10, what="the daemon to exit")


def _top(name: str) -> tuple[int, int]:
    """``uksm top`` on a pseudo-terminal: (pid, the pty's fd), once it shows the cluster."""
    env = dict(os.environ, TERM="xterm", LINES="40", COLUMNS="120")
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(ROOT)
            os.execvpe(sys.executable, [sys.executable, "-m", "uksm", "top", "--cluster", name,
                                        "--interval", "0.2"], env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    assert name.encode() in _read_pty(fd, name.encode(), 20)
    return pid, fd


def _top_status(pid: int, fd: int) -> int:
    """top's exit status once it ends by itself (its pty read to EOF)."""
    try:
        _read_pty(fd, b"\0never", 20)        # until EOF: top has ended
        _pid, st = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(st)
    finally:
        os.close(fd)


@pytest.mark.timeout(90)
def test_top_exits_by_itself_when_the_cluster_goes_down_or_dies(cluster: Up) -> None:
    """CLUSTER.md: top "exits by itself if the cluster goes down (0) or
    dies (1)"."""
    cluster.up("--workers", "1", "--pages", "16")
    pid, fd = _top(cluster.name)
    with reaped_pid(pid):
        assert cluster("down").returncode == 0
        assert _top_status(pid, fd) == 0
    cluster.up("--workers", "1", "--pages", "16")
    pid, fd = _top(cluster.name)
    with reaped_pid(pid):
        for p in cluster_pids(cluster.name):   # the daemon, ksmd, the worker: not top
            if p != pid:
                os.kill(p, signal.SIGKILL)
        assert _top_status(pid, fd) == 1
    assert cluster("cleanup").returncode == 0


@contextlib.contextmanager
def reaped_pid(pid: int):
    """A child forked by the test: never outlives it."""
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.timeout(90)
def test_status_uptime_owner_alive_and_a_daemon_that_does_not_answer(cluster: Up) -> None:
    """status --json: ``uptime_s`` grows; ``owner_alive`` is false for an
    address space whose owner has gone (a slow-path exit waiting for ksmd);
    ``daemon`` is null when the daemon does not answer within a second
    (here: stopped), and the rest of status still comes from the shared
    memory; ``spawn --pages`` beyond ``--max-pages`` is refused, status 2."""
    info = cluster.up("--workers", "2", "--pages", "16", "--workload", "identical", "--max-pages", "32",
                      "--sleep-ms", "5")
    p = cluster("spawn", "--pages", "33")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "uksm: --pages: must be 1..32 (the machine's --max-pages is 32)"
    st1 = cluster.json("status")
    assert st1["daemon"] == {"pid": info["pid"], "log_dir": str(cluster.log_dir), "hung_tasks": []}
    cl = cluster.attach()
    try:
        wait_for(lambda: cl.q[K_PAGES_SHARING] == 31, 30, what="both workers' pages merged")
    finally:
        cl.close()
    assert cluster("ctl", "run=0").returncode == 0      # ksmd keeps the rmap_items, frees nothing
    k = cluster.json("kill", "w1")["killed"][0]
    assert k["result"] == "exited through its own exit path; mm1 waiting-ksmd (ksm_exit slow)", k
    st2 = cluster.json("status")
    assert st2["uptime_s"] > st1["uptime_s"] >= 0
    w1 = next(m for m in st2["mms"] if m["worker"] == "w1")
    w2 = next(m for m in st2["mms"] if m["worker"] == "w2")
    assert (w1["state"], w1["owner_alive"]) == ("waiting-ksmd", False), w1
    assert (w2["state"], w2["owner_alive"]) == ("live", True), w2
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        st3 = cluster.json("status")
        assert st3["daemon"] is None and st3["supervisor_pid"] == info["pid"], st3
        assert st3["uptime_s"] >= st2["uptime_s"] and len(st3["mms"]) == 2
        text = cluster("status").stdout
        assert "daemon: not answering (busy with a request, or a 'uksm run' cluster)" in text, text
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    assert cluster("ctl", "run=1").returncode == 0
    assert cluster("down").returncode == 0


@pytest.mark.timeout(90)
def test_the_default_cluster_name(tmp_path) -> None:
    """Without --cluster and without $UKSM_CLUSTER, every command means the
    cluster named ``default`` -- tried in private mount and network
    namespaces (a /dev/shm and abstract sockets of its own), never beside
    another user's ``default``."""
    require("no-mount-namespace")
    env = {k: v for k, v in os.environ.items() if k != "UKSM_CLUSTER"}
    script = (f"mount -t tmpfs -o size=64m tmpfs /dev/shm || exit 99\n"
              f"PY={sys.executable}\n"
              f"$PY -m uksm up --workers 1 --pages 8 --log-dir {tmp_path} --json > {tmp_path}/up.json\n"
              f"$PY -m uksm status --json > {tmp_path}/st.json\n"
              f"$PY -m uksm down --json > {tmp_path}/down.json; echo down $?\n"
              f"echo left $(ls -A /dev/shm | wc -l)\n")
    p = subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", script], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=80)
    assert p.stdout.endswith("down 0\nleft 0\n"), (p.stdout, p.stderr)
    for f in ("up.json", "st.json", "down.json"):
        assert json.loads((tmp_path / f).read_text())["cluster"] == "default", f
