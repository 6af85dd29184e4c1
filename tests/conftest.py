"""Suite-wide guards: every test is checked for leaked processes and POSIX
objects (a leak fails the test that caused it), and has a timeout
(pytest-timeout, default in pyproject.toml) so a deadlock fails fast."""
from __future__ import annotations

import os
import signal
import time

import pytest

from uksm import shm

MARKERS = ("uksm.ksmd", "uksm.workers.worker", "uksm.daemon", "-m uksm", "bin/uksm")


def uksm_processes() -> dict[int, str]:
    """Processes of uksm other than this test process (by command line)."""
    out = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if any(m in cmd for m in MARKERS) and "pytest" not in cmd:
            out[int(d)] = cmd.strip()
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves a uksm process or a POSIX object behind."""
    shm_before = set(shm.leftovers())
    procs_before = set(uksm_processes())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        procs = {p: c for p, c in uksm_processes().items() if p not in procs_before}
        objs = sorted(set(shm.leftovers()) - shm_before)
        if (not procs and not objs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in procs:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in {o.split(".")[1] for o in (x[4:] if x.startswith("sem.") else x for x in objs)}:
        shm.remove_all(name)
    if procs or objs:
        pytest.fail(f"test leaked processes {sorted(procs.values())} and/or POSIX objects {objs}",
                    pytrace=False)
