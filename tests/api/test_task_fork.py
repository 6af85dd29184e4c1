"""t.fork() and t.pagemap() (issue 22), and forking built-in workers.

Each Done-when line of the issue's fork and pagemap items, as a script
would check it; the kernel half is tests/kernel/test_fork.py, the kill
points inside fork are in tests/faults/test_inject.py's every point."""
from __future__ import annotations

import errno
import json
import os

import pytest

import uksm

pytestmark = pytest.mark.timeout(120)

_n = [0]


def machine(**kw):
    _n[0] += 1
    kw.setdefault("frames", 256)
    kw.setdefault("pages_to_scan", 500)
    kw.setdefault("sleep_millisecs", 0)
    return uksm.Machine(name=f"tfk{os.getpid()}x{_n[0]}", **kw)


def frames(t: uksm.Task) -> list[int | None]:
    return [p["frame"] for p in t.pagemap()]


def test_a_fork_of_a_merged_task():
    with machine() as m:
        a = m.task(pages=16)
        a.fill(7)
        assert m.wait_full_scans(3) == {"pages_shared": 1, "pages_sharing": 15,
                                        "pages_unshared": 0, "pages_volatile": 0}
        m.ksm["run"] = 0               # ksmd stopped (the pages stay merged): the state right after
        b = a.fork()
        assert b.id != a.id and b.pid not in (0, a.pid) and b.mm != a.mm
        # the child reads the parent's data, through the very same frames
        assert b.read(0, 16 * 4096) == bytes([7]) * 16 * 4096
        pa, pb = a.pagemap(), b.pagemap()
        assert frames(a) == frames(b) and len(set(frames(a))) == 1
        assert all(p["ksm"] and p["write_protected"] and p["mapcount"] == 32 for p in pa + pb)
        assert b.stat() == {"ksm_rmap_items": 0, "ksm_merging_pages": 0, "rss": 16}
        # a write in the child: its page its own, the parent unchanged
        b.write(3 * 4096, b"child's")
        assert a.read(3 * 4096, 8) == bytes([7]) * 8 and b.read(3 * 4096, 7) == b"child's"
        assert a.pagemap(3, 1) == [{**pa[3], "mapcount": 31}]   # one mapping fewer
        nb = b.pagemap(3, 1)[0]
        assert nb["frame"] != pa[3]["frame"] and not nb["ksm"] and not nb["write_protected"]
        assert nb["mapcount"] == 1
        m.ksm["run"] = 1
        # three full scans: the child's 15 untouched pages are its rmap_items on
        # the KSM page (cmp_and_merge_page's "forked" case), its page 3 unshared
        assert m.wait_full_scans(3) == {"pages_shared": 1, "pages_sharing": 30,
                                        "pages_unshared": 1, "pages_volatile": 0}
        assert b.stat() == {"ksm_rmap_items": 16, "ksm_merging_pages": 15, "rss": 16}
        assert a.stat() == {"ksm_rmap_items": 16, "ksm_merging_pages": 16, "rss": 16}
        assert m.fsck() == {"ok": True, "errors": []}
        assert b.verify() == 16 and a.verify() == 16
        assert b.exit() in ("fast", "slow", "none") and a.exit() in ("fast", "slow", "none")
    rep = m.report
    assert rep["status"] == 0 and rep["fsck"]["ok"], rep
    assert rep["workers"]["started"] == 2 and rep["workers"]["exited"] == 2
    assert rep["workers"]["killed"] == 0 and rep["integrity"]["mismatches"] == 0


def test_a_fork_of_an_unmergeable_task_never_enters_ksm():
    with machine() as m:
        k = m.task(pages=2)          # something for ksmd to scan: full scans go on
        k.fill(1)
        a = m.task(pages=8, mergeable=False)
        a.fill(9)
        b = a.fork()
        m.wait_full_scans(3)
        assert b.stat()["ksm_rmap_items"] == 0 and a.stat()["ksm_rmap_items"] == 0
        assert m.ksm["pages_sharing"] == 1    # k's two pages only
        assert all(p["mapcount"] == 2 and p["write_protected"] and not p["ksm"]
                   for p in b.pagemap())
        # its fork event says so; and its mm has no slot, no MMF_VM_MERGEABLE
        from uksm.kernel.layout import MMF_VM_MERGEABLE
        cl = m._t().cl
        row = cl.mm_row(b.mm)
        assert not cl.mrow(row).slot_used and not cl.mrow(row).flags & MMF_VM_MERGEABLE
        events = [json.loads(line) for f in os.listdir(m.log_dir) if f.endswith(".jsonl")
                  for line in open(os.path.join(m.log_dir, f))]
        forks = [e for e in events if e["event"] == "fork"]
        assert [(e["mm"], e["child_mm"], e["ksm_enter"], e["err"]) for e in forks] == \
            [(a.mm, b.mm, False, 0)]
        assert m.fsck()["ok"]


def test_fork_bad_input():
    with machine(max_tasks=2) as m:
        a = m.task(pages=4)
        a.fill(2)
        b = a.fork()
        # the machine is full (max_tasks 2): fork's EAGAIN, as RLIMIT_NPROC gives it
        with pytest.raises(OSError) as ei:
            b.fork()
        assert ei.value.errno == errno.EAGAIN and "EAGAIN" in str(ei.value)
        assert b.read(0, 4) == b"\x02" * 4 and b.verify() == 4     # unharmed, goes on
        b.write(0, b"b")
        assert b.exit() in ("fast", "slow", "none")
        with pytest.raises(uksm.TaskExited, match="has exited"):
            b.fork()
        w = m.spawn(1, pages=2, workload="identical")[0]
        with pytest.raises(TypeError, match="built-in worker"):
            w.fork()
        for first, count, exc in ((4, None, ValueError), (0, 5, ValueError), (-1, 1, ValueError),
                                  (2, 3, ValueError), ("0", 1, TypeError), (0, 1.5, TypeError)):
            with pytest.raises(exc):
                a.pagemap(first, count)
        assert a.pagemap(4 - 1, 1)[0]["present"] and a.pagemap(2, 0) == []
        assert [p["present"] for p in w.pagemap()] == [True, True]   # a built-in worker's too
        # a built-in worker gone since it was listed (a forked child exits on
        # its own: uksm inject's victim): TaskExited, not "no such task"
        w.kill()
        with pytest.raises(uksm.TaskExited, match=f"task {w.id} has exited"):
            w.kill()
        with pytest.raises(uksm.TaskExited, match=f"task {w.id} has exited"):
            w.pagemap()
    assert m.report["status"] == 0, m.report


def test_a_fork_without_frames_ooms_the_child_not_the_parent():
    """2.6.32's oom_kill_process: "Try to kill a child first" -- the parent
    chosen by badness, its child (with an mm of its own) dies in its
    place.  The fork itself takes no frame (copy-on-write); the child's
    first write needs one, and there is none."""
    with machine(frames=64, run=0) as m:
        a = m.task(pages=16)
        a.fill(bytes(range(256)) * 16)
        cl = m._t().cl
        from uksm.kernel.layout import A_FREE_TOP
        m.ksm["mem_limit"] = cl.nframes - cl.q[A_FREE_TOP]    # not one frame more
        b = a.fork()
        with pytest.raises(uksm.TaskDied, match="OOM killer"):
            b.write(0, b"x")
        assert m.stats()["oom_killed"] == 1
        assert a.verify() == 16 and a.read(0, 4) == bytes(range(4))
        a.write(0, b"y")               # its page is its own again: no frame needed
        assert a.pagemap(0, 1)[0]["mapcount"] == 1 and m.fsck()["ok"]
    assert m.report["status"] == 0, m.report


def test_forking_builtin_workers_churn_through_forks():
    """W+fork: each worker forks a child every so often; a child writes its
    volatile pages and its first (COW breaks), lives two fork periods and
    exits verifying its pages.  The machine ends clean: no task killed."""
    with machine(frames=512, max_tasks=8) as m:
        m.spawn(2, pages=16, workload="vm+fork:150", churn_ms=5)
        # (a wait pumps the supervisor's duties: serving the forks among them)
        m.wait(lambda: m.stats()["exited"] >= 3, 60, "forked children to come and go")
        assert m.stats()["started"] >= 5 and m.fsck()["ok"]
    rep = m.report
    assert rep["status"] == 0, rep
    assert rep["workers"]["killed"] == 0 and rep["workers"]["oom_killed"] == 0, rep["workers"]
    assert rep["integrity"]["mismatches"] == 0 and rep["integrity"]["pages_verified"] > 32
