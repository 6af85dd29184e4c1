"""The leak fixture of conftest.py can fail (issue 16): tests written to
leak -- an orphaned ksmd whose command line holds pytest's tmp_path, an
orphaned worker, a leftover object -- run in a nested pytest session and
must fail with the leak message, and nothing they leaked may survive it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import leakcheck
from helpers import ROOT, cluster_pids, cname, gone_or_zombie, nested_session, teardown_error
from uksm.host import shm

LEAKY = '''
import json, os, signal, subprocess, sys
from helpers import booted, wait_for
from uksm.kernel.cluster import Config
from uksm.proc.supervisor import Supervisor
from uksm.host import shm
from uksm.kernel.layout import T_READY

OUT = {out!r}
TAG = {tag!r}

def record(key, value):
    d = json.load(open(OUT)) if os.path.exists(OUT) else {{}}
    d[key] = value
    json.dump(d, open(OUT, "w"))

def test_leaks_an_orphaned_ksmd(tmp_path):
    # booted and never torn down: ksmd runs with --log-dir under tmp_path
    # (its command line holds "pytest")
    name = "lk" + TAG + "k"
    sup = Supervisor(name, Config(run=0, frames=64, va_pages=64), str(tmp_path), quiet=True)
    sup.boot()
    record("ksmd", [name, sup.ksmd.proc.pid])

def test_leaks_an_orphaned_worker(tmp_path):
    name = "lk" + TAG + "w"
    with booted(name, str(tmp_path), run=0, frames=128, va_pages=64) as sup:
        ch = sup.spawn_worker(16, "identical", 1)
        wait_for(lambda: sup.cl.q[sup.cl.tbase(ch.row) + T_READY], 60, what="worker ready")
        record("worker", [name, ch.proc.pid])
        sup.children.clear()    # the supervisor forgets it: teardown leaves it running
        sup.procs.clear()       # (every record of it: the fork's, and the /proc search)
        sup.strays = lambda: []
        sup.kill_all = lambda: None

def test_leaks_an_object():
    name = "lk" + TAG + "o"
    shm.create_segment(name, "ctl", 4096)
    record("object", [name, 0])

def test_clean(tmp_path):
    with booted("lk" + TAG + "c", str(tmp_path), run=0, frames=64, va_pages=64):
        pass
'''


@pytest.mark.timeout(150)
def test_leak_fixture_catches_and_kills_orphans(tmp_path: Path) -> None:
    tag = str(os.getpid() % 100000)
    out = tmp_path / "leaked.json"
    rc, text = nested_session(tmp_path, "test_leaky.py", LEAKY.format(out=str(out), tag=tag), 130)
    leaked = json.loads(out.read_text())
    assert rc == 1, text
    assert "4 passed, 3 errors" in text, text   # a leak fails the test at its teardown
    for test, what in [("test_leaks_an_orphaned_ksmd", "uksm.kernel.ksmd --cluster lk"),
                       ("test_leaks_an_orphaned_worker", "uksm.workers.worker --cluster lk"),
                       ("test_leaks_an_object", f"POSIX objects ['uksm.lk{tag}o.ctl']")]:
        section = teardown_error(text, test)
        assert "test leaked processes" in section and what in section, text
    # what leaked is gone: the processes killed, the objects unlinked
    for key in ("ksmd", "worker", "object"):
        name, pid = leaked[key]
        if pid:
            assert gone_or_zombie(pid), f"the orphaned {key} {pid} still runs"
        assert not shm.leftovers(name), shm.leftovers(name)


def test_session_marker_is_nested() -> None:
    """A nested session's processes carry the outer session's marker as a
    prefix: the outer fixture sees them too."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.environ['UKSM_TEST_SESSION'])"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.stdout.strip() == leakcheck.SESSION
    assert leakcheck.mine(os.getpid())


def test_a_cluster_being_made_by_another_session_is_foreign() -> None:
    """A concurrent session's cluster caught half made (no MAGIC yet, no
    process naming it, no supervisor recorded by the boot yet) is not
    taken for one this session left behind: Cluster.create records its
    creator first, and the fixture asks whose that process is.  Another
    session's creator stands in as a process without this session's
    marker; this process, as our own creator."""
    from uksm.kernel.layout import H_MAGIC, H_SUPERVISOR_PID
    from uksm.proc.control import recorded_supervisor
    env = {k: v for k, v in os.environ.items() if k != "UKSM_TEST_SESSION"}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    name = cname("tlkf")
    seg = shm.create_segment(name, "ctl", 4096)
    try:
        assert seg.q[H_MAGIC] == 0                      # being made
        for creator, mine in ((other.pid, False), (os.getpid(), True)):
            seg.q[H_SUPERVISOR_PID] = creator
            assert recorded_supervisor(name) == creator
            assert leakcheck.classify({name}, leakcheck.processes()) == \
                (({name}, set()) if mine else (set(), {name}))
    finally:
        other.kill()
        other.wait()
        seg.close()
        shm.remove_all(name)


LEAKY_SEM = '''
import os, posix_ipc

def test_leaks_a_test_semaphore():
    posix_ipc.Semaphore(f"/uksmtest.lk{os.getpid()}", posix_ipc.O_CREX, mode=0o600, initial_value=1)
'''


def test_leak_fixture_catches_a_lock_tests_semaphore(tmp_path: Path) -> None:
    """The in-process lock tests name their semaphores ``uksmtest.*`` with
    their pid: one left behind fails its test, and is removed."""
    before = set(os.listdir("/dev/shm"))   # other sessions' lock tests may have theirs
    rc, text = nested_session(tmp_path, "test_leaky_sem.py", LEAKY_SEM, 90)
    assert rc == 1 and "1 passed, 1 error" in text, text
    assert "POSIX objects ['sem.uksmtest.lk" in text, text
    assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("sem.uksmtest.lk")]


LEAKY_CLUSTER = '''
def test_leaves_its_cluster_up(cluster):
    cluster.up("--workers", "1", "--pages", "8", "--frames", "64")
    open({out!r}, "w").write(cluster.name)

def test_takes_its_cluster_down(cluster):
    cluster.up("--workers", "1", "--pages", "8", "--frames", "64")
    assert cluster("down").returncode == 0
'''


@pytest.mark.timeout(150)
def test_a_test_that_leaves_its_cluster_fixture_up_fails(tmp_path: Path) -> None:
    """The ``cluster`` fixture takes down what a test left up -- and fails
    that test with the leak fixture's message, naming what it found (a
    silent clean-up there would hide the leak from the leak fixture, which
    runs after it); a test that took its cluster down passes."""
    out = tmp_path / "name"
    rc, text = nested_session(tmp_path, "test_leaky_cluster.py", LEAKY_CLUSTER.format(out=str(out)), 130)
    assert rc == 1 and "2 passed, 1 error" in text, text   # the leak fails it at its teardown
    name = out.read_text()
    section = teardown_error(text, "test_leaves_its_cluster_up")
    assert "test leaked processes" in section and f"cluster {name} was left up" in section, text
    assert "uksm.proc.daemon --cluster " + name in section, section      # what it found running
    assert f"uksm.{name}.ctl" in section, section                      # and in /dev/shm
    assert not shm.leftovers(name) and not cluster_pids(name)           # and took it down


def test_a_dead_cluster_is_the_sessions_only_if_named_by_it() -> None:
    """Objects of a cluster nobody runs (no supervisor recorded, no process
    naming it: another session's leftovers, or a leak test of another
    session about to check its own) are not this session's unless the name
    carries this session's pid: never blamed on a test here, never unlinked."""
    foreign, ours = "tlkforeign7x", cname("tlkdead")
    made = []
    try:
        for name in (foreign, ours):
            made.append(shm.create_segment(name, "ctl", 4096))
        assert leakcheck.classify({foreign, ours}, leakcheck.processes()) == ({ours}, {foreign})
    finally:
        for seg, name in zip(made, (foreign, ours)):
            seg.close()
            shm.remove_all(name)
