"""Helpers shared by the tests: run the CLI, boot a cluster in-process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uksm.kernel.cluster import Cluster, Config, pid_alive
from uksm.proc.supervisor import Supervisor

#: the project's root; TESTS: this folder (the tests are in its subfolders, by subsystem)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_group(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole
    group (a supervisor's ksmd and workers too), then fail."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError(f"{' '.join(argv)}: no answer within {timeout}s (killed)")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


@contextmanager
def reaped(*procs: subprocess.Popen) -> Iterator[None]:
    """Client processes a test started itself: whatever the test's outcome,
    none outlives it (killed if still running, then waited for)."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def uksm(*args: str, timeout: float = 100, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``uksm ARGS`` as a user would (python -m uksm), capture output."""
    p = run_group([sys.executable, "-m", "uksm", *args], timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"uksm {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def run_json(*args: str, timeout: float = 100) -> tuple[dict[str, Any], int]:
    p = uksm("run", "--json", *args, timeout=timeout)
    try:
        return json.loads(p.stdout), p.returncode
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON on stdout (status {p.returncode}):\n{p.stdout}\n{p.stderr}")


_names = iter(range(1, 1 << 30))


def unique_name(prefix: str) -> str:
    """A cluster name of this test session's own: prefix, pid, a count."""
    return f"{prefix}{os.getpid() % 100000}x{next(_names)}"


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, step: float = 0.02, what: str = "") -> Any:
    """Wait for a condition (never a bare sleep): returns its value."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(step)


@contextmanager
def booted(name: str, log_dir: str | None = None, **cfg: Any) -> Iterator[Supervisor]:
    """A cluster booted in this process (supervisor + ksmd), torn down
    after the test whatever happens."""
    sup = Supervisor(name, Config(**cfg), log_dir, quiet=True)
    try:
        sup.boot()
        yield sup
    finally:
        if sup.booted:
            sup.kill_all()
            sup.teardown()


def pump(sup: Supervisor, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """wait_for, running the supervisor's main-loop duties meanwhile."""
    def step() -> Any:
        sup.poll()
        sup.sweep()
        return pred()
    return wait_for(step, timeout, what=what)


def cluster_pids(name: str) -> list[int]:
    """Every live process of cluster ``name`` (daemon, ksmd, workers)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--cluster" in argv:
            i = argv.index(b"--cluster")
            if i + 1 < len(argv) and argv[i + 1] == name.encode() and pid_alive(int(d)):
                out.append(int(d))
    return out


class Up:
    """A cluster started with ``uksm up`` for one test."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_dir = log_dir
        self.info: dict[str, Any] = {}

    def __call__(self, *args: str, timeout: float = 50) -> subprocess.CompletedProcess:
        """``uksm ARGS --cluster NAME`` (the cluster option appended)."""
        return uksm(*args, "--cluster", self.name, timeout=timeout)

    def up(self, *args: str) -> dict[str, Any]:
        p = self("up", "--json", "--log-dir", str(self.log_dir), *args)
        assert p.returncode == 0, p.stderr
        self.info = json.loads(p.stdout)
        return self.info

    def json(self, *args: str, status: int = 0) -> dict[str, Any]:
        p = self(*args, "--json")
        assert p.returncode == status, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        return json.loads(p.stdout)

    def attach(self) -> Cluster:
        return Cluster.attach(self.name)
