"""uksm/proc/cleanup.py (``uksm cleanup``): what it may end and what it
may remove, by its module's own rules -- a pid from the cluster's task
table is signalled only if its command line is still that cluster's ksmd,
worker or writer on that row (never a reused pid); the supervisor only if
it started before the cluster was created; a half-made cluster's table is
not trusted; a live cluster is refused unless ``--force``.  (End to end,
with real orphans and a real reused pid: tests/proc/test_lifecycle.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import cname, reaped
from uksm.host import shm
from uksm.kernel.cluster import Cluster, Config, destroy
from uksm.kernel.layout import H_CREATED_NS, H_SUPERVISOR_PID, R_WORKER, TS_ALIVE
from uksm.proc import cleanup

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("argv,cluster,row,ok", [
    (["python", "-P", "-m", "uksm.kernel.ksmd", "--cluster", "c1", "--task", "3"], "c1", 3, True),
    (["python", "-m", "uksm.workers.worker", "--cluster", "c1", "--task", "4", "--mm", "1"], "c1", 4, True),
    (["python", "-m", "uksm.kernel.writer", "--cluster", "c1", "--task", "5"], "c1", None, True),
    (["python", "-m", "uksm.kernel.ksmd", "--cluster", "c1", "--task", "3"], "c2", 3, False),    # another cluster
    (["python", "-m", "uksm.kernel.ksmd", "--cluster", "c1", "--task", "3"], "c1", 4, False),    # another row
    (["python", "-m", "uksm.proc.daemon", "--cluster", "c1"], "c1", None, False),             # not a child
    (["python", "-c", "uksm.kernel.ksmd --cluster c1"], "c1", None, False),
    (["sleep", "90"], "c1", None, False),
    (["python", "-m"], "c1", None, False),
    ([], "c1", None, False),
])
def test_is_child_of(argv, cluster, row, ok):
    assert cleanup.is_child_of(argv, cluster, row) is ok


@pytest.fixture
def made():
    """A cluster's objects, made by this process (no supervisor runs it)."""
    name = cname("tclean")
    cl = Cluster.create(name, Config(frames=16, max_tasks=4, max_mms=2, va_pages=16))
    try:
        yield cl
    finally:
        cl.close()
        destroy(name)


def test_a_reused_pid_in_the_table_is_never_signalled(made):
    """The task table names a pid now held by an unrelated process (a
    decoy): cleanup neither counts it a child nor kills it, and removes
    the objects of the dead cluster."""
    decoy = subprocess.Popen(["sleep", "90"])
    with reaped(decoy):
        t = made.trow(1)
        t.pid, t.role, t.state = decoy.pid, R_WORKER, TS_ALIVE
        made.q[H_SUPERVISOR_PID] = 2**22 + 7          # a pid no process has: the supervisor is dead
        table = cleanup.Table(made.name)
        assert table.rows.get(1) == decoy.pid
        assert cleanup.cluster_children(made.name, table) == set()
        removed, ended, why = cleanup.cleanup(made.name, force=False)
        assert why == "" and ended == [] and decoy.poll() is None
        assert f"uksm.{made.name}.ctl" in removed and shm.leftovers(made.name) == []


def test_a_live_supervisor_is_refused_unless_force_and_must_predate_the_cluster(made):
    """The recorded supervisor alive and started before the cluster was
    created: a live cluster, refused in one line; a process started after
    the creation time with the supervisor's pid is a reused pid, not it."""
    made.q[H_SUPERVISOR_PID] = os.getpid()            # this test made it: its supervisor
    removed, ended, why = cleanup.cleanup(made.name, force=False)
    assert removed == [] and ended == []
    assert why == (f"cluster {made.name!r} is alive (supervisor pid {os.getpid()}): 'uksm down "
                   f"--cluster {made.name}' (or stop its 'uksm run'), or --force to kill it")
    assert shm.leftovers(made.name)
    table = cleanup.Table(made.name)
    assert cleanup.supervisor_is(os.getpid(), table)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with reaped(later):
        made.q[H_CREATED_NS] = time.time_ns() - 5 * 10**9   # the cluster is older than `later`
        assert not cleanup.supervisor_is(later.pid, cleanup.Table(made.name))


def test_a_half_made_clusters_table_is_not_trusted():
    """A boot that died before writing MAGIC: its table names nobody."""
    name = cname("tcleanhalf")
    seg = shm.create_segment(name, "ctl", 1 << 16)
    try:
        seg.q[100] = os.getpid()
        table = cleanup.Table(name)
        assert (table.supervisor, table.created_ns, table.rows) == (0, 0, {})
        removed, ended, why = cleanup.cleanup(name, force=False)
        assert why == "" and ended == [] and removed == [f"uksm.{name}.ctl"]
    finally:
        seg.close()
        shm.remove_all(name)
