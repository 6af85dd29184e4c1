"""The leak fixture of conftest.py can fail (issue 16): tests written to
leak -- an orphaned ksmd whose command line holds pytest's tmp_path, an
orphaned worker, a leftover object -- run in a nested pytest session and
must fail with the leak message, and nothing they leaked may survive it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT, TESTS, run_group
from uksm.host import shm
from uksm.kernel.cluster import pid_alive

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
    d = tmp_path / "inner"
    d.mkdir()
    for f in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(TESTS, f), d / f)
    out = tmp_path / "leaked.json"
    (d / "test_leaky.py").write_text(textwrap.dedent(LEAKY.format(out=str(out), tag=tag)))
    p = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                   "--timeout", "100", str(d / "test_leaky.py"), "--rootdir", str(d)], timeout=130)
    text = p.stdout + p.stderr
    leaked = json.loads(out.read_text())
    assert p.returncode == 1, text
    assert "4 passed, 3 errors" in text, text   # a leak fails the test at its teardown
    for test, what in [("test_leaks_an_orphaned_ksmd", "uksm.kernel.ksmd --cluster lk"),
                       ("test_leaks_an_orphaned_worker", "uksm.workers.worker --cluster lk"),
                       ("test_leaks_an_object", f"POSIX objects ['uksm.lk{tag}o.ctl']")]:
        section = text.split(f"ERROR at teardown of {test} ", 1)[1].split("\n", 1)[1]
        section = section.split("\n_", 1)[0].split("\n===", 1)[0]
        assert "test leaked processes" in section and what in section, text
    # what leaked is gone: the processes killed, the objects unlinked
    for key in ("ksmd", "worker", "object"):
        name, pid = leaked[key]
        if pid:
            assert not pid_alive(pid) or _zombie(pid), f"the orphaned {key} {pid} still runs"
        assert not shm.leftovers(name), shm.leftovers(name)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_session_marker_is_nested() -> None:
    """A nested session's processes carry the outer session's marker as a
    prefix: the outer fixture sees them too."""
    import conftest
    p = subprocess.run([sys.executable, "-c", "import os; print(os.environ['UKSM_TEST_SESSION'])"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.stdout.strip() == conftest.SESSION
    assert conftest._mine(os.getpid())


def test_a_cluster_being_made_by_another_session_is_foreign() -> None:
    """A concurrent session's cluster caught half made (no MAGIC yet, no
    process naming it, no supervisor recorded by the boot yet) is not
    taken for one this session left behind: Cluster.create records its
    creator first, and the fixture asks whose that process is.  Another
    session's creator stands in as a process without this session's
    marker; this process, as our own creator."""
    import conftest
    from uksm.kernel.layout import H_MAGIC, H_SUPERVISOR_PID
    from uksm.proc.control import recorded_supervisor
    env = {k: v for k, v in os.environ.items() if k != "UKSM_TEST_SESSION"}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    name = f"tlkf{os.getpid()}"
    seg = shm.create_segment(name, "ctl", 4096)
    try:
        assert seg.q[H_MAGIC] == 0                      # being made
        for creator, mine in ((other.pid, False), (os.getpid(), True)):
            seg.q[H_SUPERVISOR_PID] = creator
            assert recorded_supervisor(name) == creator
            assert conftest.classify({name}, conftest._processes()) == \
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
    d = tmp_path / "inner"
    d.mkdir()
    for f in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(TESTS, f), d / f)
    (d / "test_leaky_sem.py").write_text(LEAKY_SEM)
    before = set(os.listdir("/dev/shm"))   # other sessions' lock tests may have theirs
    p = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                   "--timeout", "60", str(d / "test_leaky_sem.py"), "--rootdir", str(d)], timeout=90)
    text = p.stdout + p.stderr
    assert p.returncode == 1 and "1 passed, 1 error" in text, text
    assert "POSIX objects ['sem.uksmtest.lk" in text, text
    assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("sem.uksmtest.lk")]
