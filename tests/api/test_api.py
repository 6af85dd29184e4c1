"""uksm.Machine (issue 10): tasks, knobs, waits, kills, bad input.

Small machines (a few pages), every test under its own cluster name."""
from __future__ import annotations

import os
import signal
import sys

import pytest

import uksm
from helpers import cname, run_group
from uksm.host import shm
from uksm.kernel.cluster import pid_alive

_n = [0]


def _name() -> str:
    _n[0] += 1
    return cname(f"tapi{_n[0]}x")


def new_machine(**kw):
    """A small Machine under a name of its own (not the plugin's ``machine`` fixture)."""
    return uksm.Machine(name=_name(), frames=kw.pop("frames", 128), **kw)


def assert_gone(m: uksm.Machine) -> None:
    assert shm.leftovers(m.name) == []
    assert [p for p in m.pids if pid_alive(p)] == []


def test_public_names_are_curated():
    assert sorted(uksm.__all__) == sorted(
        ["Machine", "Task", "KillPoint", "MachineError", "MachineClosed", "WaitTimeout",
         "HungTask", "TaskExited", "TaskDied", "SegFault", "IntegrityError", "KillPointMissed",
         "Exploration", "explore", "replay", "RunReport", "MachineStats"])
    # one hierarchy: every exported exception is a MachineError, rooted in the
    # CLI's UksmError; the emulated MMU raises the very SegFault the API exports
    from uksm.errors import UksmError
    from uksm.kernel import mmu
    errs = [getattr(uksm, n) for n in uksm.__all__
            if n not in ("Machine", "Task", "KillPoint", "Exploration", "explore", "replay",
                          "RunReport", "MachineStats")]
    assert len(errs) == 9 and all(issubclass(e, uksm.MachineError) for e in errs)
    assert issubclass(uksm.MachineError, UksmError) and mmu.SegFault is uksm.SegFault


def test_tasks_merge_counters_exit_and_report():
    with new_machine(sleep_millisecs=5) as m:
        a, b = m.task(pages=3), m.task(pages=3)
        a.fill(7)
        b.fill(7, first=0, count=2)
        b.fill(bytes(range(256)) * 16, first=2)
        c = m.wait_full_scans(2)
        # 5 pages of 7s: one KSM page, 4 sharing it (the selftests' assert_ksm_pages_count(5):
        # pages_shared 1, pages_sharing 5 - 1); b's last page unique
        assert c == {"pages_shared": 1, "pages_sharing": 4, "pages_unshared": 1, "pages_volatile": 0}
        assert a.stat() == {"ksm_rmap_items": 3, "ksm_merging_pages": 3, "rss": 3}
        assert b.read(2 * 4096 + 250, 8) == bytes([250, 251, 252, 253, 254, 255, 0, 1])
        a.write(4096 + 10, b"xyz")                      # a COW break
        assert a.read(4096 + 9, 5) == b"\x07xyz\x07"
        assert a.verify() == 3 and b.verify() == 3
        assert m.fsck() == {"ok": True, "errors": []}
        m.ksm["run"] = 2                               # returns when all is unmerged
        assert m.ksm["pages_shared"] == 0 and m.ksm["pages_sharing"] == 0
        assert b.madvise(0, 3, "UNMERGEABLE") == 0
        # run=2 dropped a's rmap_items and left ksmd's cursor on the list
        # head (unmerge_and_remove_all_rmap_items): a's slot holds nothing
        # and is not at the cursor, so its __ksm_exit takes the fast path
        assert a.exit() == "fast"
        with pytest.raises(uksm.TaskExited, match="has exited"):
            a.fill(1)
    rep = m.report
    assert rep is not None and rep["status"] == 0, rep
    assert rep["workers"]["started"] == 2 and rep["workers"]["exited"] == 2
    assert rep["integrity"] == {"pages_verified": 6, "mismatches": 0}
    # uksm run --json's keys, exactly
    assert set(rep) >= {"cluster", "workload", "duration_s", "ksm", "frames", "memory", "workers",
                        "integrity", "fsck", "hung_tasks", "ipc_leftovers", "log_dir",
                        "exit_policy", "hazards", "scenario", "errors", "status"}
    assert_gone(m)
    with pytest.raises(uksm.MachineClosed):
        m.task(pages=1)
    with pytest.raises(uksm.MachineClosed):
        m.ksm["run"]
    assert m.close() is rep  # closing twice is harmless


def test_block_that_raises_still_cleans_up():
    with pytest.raises(RuntimeError, match="boom"):
        with new_machine() as m:
            t = m.task(pages=2)
            t.fill(3)
            raise RuntimeError("boom")
    assert m.report is not None and m.report["status"] == 0
    assert m.report["workers"]["exited"] == 1  # through its own exit path (SIGTERM)
    assert m.report["integrity"]["pages_verified"] == 2
    assert_gone(m)


def test_ksm_mapping_like_sysfs():
    with new_machine(run=0) as m:
        assert m.ksm["run"] == 0 and set(m.ksm) >= {"pages_shared", "full_scans", "mem_limit"}
        assert len(dict(m.ksm)) == len(m.ksm)
        with pytest.raises(ValueError, match="EINVAL"):
            m.ksm["run"] = 3
        with pytest.raises(ValueError, match="EINVAL"):
            m.ksm["pages_to_scan"] = " 7"
        with pytest.raises(PermissionError, match="read-only"):
            m.ksm["pages_shared"] = 1
        with pytest.raises(KeyError, match="no such knob"):
            m.ksm["nonsense"] = 1
        with pytest.raises(KeyError):
            m.ksm["nonsense"]
        with pytest.raises(TypeError):
            m.ksm["run"] = 1.0
        with pytest.raises(PermissionError):
            del m.ksm["run"]
        assert m.ksm["run"] == 0 and m.ksm["pages_to_scan"] == 100   # nothing half-written
        m.ksm["pages_to_scan"] = 7
        m.ksm["sleep_millisecs"] = "3\n"                 # as echo writes it
        assert (m.ksm["pages_to_scan"], m.ksm["sleep_millisecs"]) == (7, 3)
        with pytest.raises(uksm.MachineError, match="run=0"):
            m.wait_full_scans(1, timeout=1)
        m.ksm["run"] = 1
        m.task(pages=1)
        m.wait_full_scans(1, timeout=30)
    assert m.report is not None and m.report["status"] == 0


def test_bad_input_names_the_problem_and_changes_nothing():
    with new_machine() as m:
        t = m.task(pages=2)
        t.fill(9)
        bad = [
            (lambda: m.task(pages=0), ValueError, "pages: must be at least 1"),
            (lambda: m.task(pages="2"), TypeError, "pages: must be a whole number"),
            (lambda: m.task(pages=2, mergeable="yes"), TypeError, "mergeable"),
            (lambda: t.fill(256), ValueError, "fill value 256"),
            (lambda: t.fill(1.5), TypeError, "fill value must be an int"),
            (lambda: t.fill(b"short"), ValueError, "not 4096"),
            (lambda: t.fill(1, first=2), ValueError, "first page 2 is out of range"),
            (lambda: t.fill(1, first=1, count=2), ValueError, "count"),
            (lambda: t.write(2 * 4096 - 1, b"ab"), uksm.SegFault, "beyond the task's 2 pages"),
            (lambda: t.write(-1, b"a"), uksm.SegFault, "segfault"),
            (lambda: t.write(0, "text"), TypeError, "data must be bytes"),
            (lambda: t.read(0, 3 * 4096), uksm.SegFault, "beyond"),
            (lambda: t.read("0", 1), TypeError, "addr must be an int"),
            (lambda: t.madvise(0, 1, "HUGEPAGE"), ValueError, "unknown advice 'HUGEPAGE'"),
            (lambda: t.madvise(0, 3, "DONTNEED"), ValueError, "count"),
            (lambda: t.madvise(0, 1, 12), TypeError, "advice must be a string"),
            (lambda: t.kill("HUP"), ValueError, "KILL"),
            (lambda: t.kill(signal.SIGHUP), ValueError, "only SIGKILL"),
            (lambda: t.kill("KILL", at="nowhere"), ValueError, "unknown kill point 'nowhere'"),
            (lambda: t.kill("KILL", at="ksmd_break_cow"), ValueError, "a point in ksmd"),
            (lambda: m.arm("exit_mid_zap"), ValueError, "task point"),
            (lambda: m.wait(lambda: False, timeout=0), ValueError, "timeout"),
            (lambda: m.wait(42), TypeError, "callable"),
            (lambda: m.wait_full_scans(0), ValueError, "n must be"),
        ]
        for fn, exc, text in bad:
            with pytest.raises(exc, match=text):
                fn()
        assert t.read(0, 4) == b"\t\t\t\t" and t.verify() == 2   # the task lives on, unchanged
        assert m.fsck()["ok"]
        with pytest.raises(uksm.WaitTimeout, match="waiting for nothing ever"):
            m.wait(lambda: False, timeout=0.2, what="nothing ever")
    for kw, exc in (({"frames": "x"}, TypeError), ({"exit_policy": "new"}, ValueError),
                    ({"hazards": ["bogus"]}, ValueError), ({"run": 5}, ValueError),
                    ({"mem_limit": 10**6}, ValueError), ({"name": "a/b"}, ValueError)):
        with pytest.raises(exc):
            uksm.Machine(**kw)
    assert m.report is not None and m.report["status"] == 0


def test_kill_at_points_recovered_and_exited():
    with new_machine(sleep_millisecs=5) as m:
        ts = [m.task(pages=3) for _ in range(3)]
        for t in ts:
            t.fill(5)
        m.wait_full_scans(2)
        assert {p.name for p in m.kill_points()} >= {"cow_after_copy", "ksmd_break_cow"}
        # ksmd stopped (run=0 keeps the rmap_items): no ksmd frees a slot
        # first, so each exit's path is the one __ksm_exit chooses
        m.ksm["run"] = 0
        assert ts[0].kill("KILL", at="cow_after_copy") == "slow"   # its slot holds rmap_items
        assert ts[1].kill("TERM", at="pte_lock_held") == "slow"
        with pytest.raises(uksm.KillPointMissed, match="__ksm_enter already"):
            ts[2].kill("KILL", at="ksm_enter_locked")
        ts[2].verify()                                   # still alive and whole
        fresh = m.task(pages=2, mergeable=False)
        # killed in __ksm_enter, its slot just added behind the cursor, empty: the fast path
        assert fresh.kill(9, at="ksm_enter_locked") == "fast"
        m.ksm["run"] = 1                                 # ksmd frees the slow paths' slots
        ts[2].arm("pte_lock_held")
        with pytest.raises(uksm.TaskDied, match="SIGKILL"):
            ts[2].write(0, b"z" * 8192)                  # passes the armed point
        assert m.fsck()["ok"]
    rep = m.report
    assert rep is not None and rep["status"] == 0, rep
    assert rep["workers"]["killed"] == 3 and rep["workers"]["reaped"] == 3


def test_hung_task_raises_from_a_wait_with_the_chain():
    from uksm.kernel.layout import H_KSMD_POINT
    with new_machine(exit_policy="legacy", hung_task_timeout=0.5, sleep_millisecs=5) as m:
        t = m.task(pages=2)
        t.fill(1)
        m.wait_full_scans(1)
        m.arm("ksmd_scan_mmap_sem", delay_ms=4000)      # ksmd stops there, holding the mutex
        m.wait(lambda: m._t().cl.q[H_KSMD_POINT] == -1, timeout=30, what="ksmd at the point")
        os.kill(t.pid, signal.SIGTERM)                  # its legacy __ksm_exit takes the mutex
        with pytest.raises(uksm.HungTask) as ei:
            m.wait(lambda: False, timeout=30, what="forever")
        assert "ksm_thread_mutex" in str(ei.value)
        assert any("ksm_thread_mutex" in line for line in ei.value.chain)
    assert m.report is not None and m.report["status"] == 3 and m.report["hung_tasks"]
    assert_gone(m)


def test_attach_to_a_cluster_started_with_up(tmp_path):
    name = _name()
    up = run_group([sys.executable, "-m", "uksm", "up", "--cluster", name, "--pages", "4",
                    "--frames", "256", "--sleep-ms", "5", "--log-dir", str(tmp_path)], 60)
    try:
        assert up.returncode == 0, up.stderr
        m = uksm.Machine.attach(name)
        t = m.task(pages=2)
        t.fill(4)
        u = m.task(pages=2)
        u.fill(4)
        assert m.wait_merged(timeout=30)["pages_sharing"] == 3
        m.ksm["run"] = 0                                 # the cursor stays where it is now
        assert m.scan_cursor() is cursor_task(m, (t, u))
        assert t.kill("KILL") == "slow"                  # rmap_items, ksmd stopped
        m.ksm["run"] = 1
        m.close()                                        # detaches; the cluster stays up
        m2 = uksm.Machine.attach(name)
        # the second attach sees the cluster as it is: u's two pages merged
        m2.wait(lambda: (m2.ksm["pages_shared"], m2.ksm["pages_sharing"]) == (1, 1), 30,
                "u's two identical pages merged, seen through the second attach")
        rep = m2.down()
        assert rep["status"] == 0 and rep["fsck"]["ok"], rep
    finally:
        run_group([sys.executable, "-m", "uksm", "down", "--cluster", name], 60)
    with pytest.raises(uksm.MachineError, match="does not exist"):
        uksm.Machine.attach(name)


def cursor_task(m: uksm.Machine, tasks) -> uksm.Task | None:
    """The task whose mm holds ksmd's cursor, read from the cluster itself
    (ksm_scan.mm_slot's word and the slot's mm), not from scan_cursor."""
    from uksm.kernel.cluster import Cluster
    from uksm.kernel.layout import L_SCAN_SLOT
    cl = Cluster.attach(m.name)
    try:
        slot = cl.q[L_SCAN_SLOT]
        mm = None if slot == cl.head else cl.mrow(slot).id
    finally:
        cl.close()
    return next((t for t in tasks if t.mm == mm), None)


def test_a_forgotten_machine_is_closed_at_exit():
    name = _name()
    code = (f"import uksm\nm = uksm.Machine(name={name!r}, frames=64)\nt = m.task(pages=2)\n"
            f"t.fill(3)\nprint(' '.join(map(str, m.pids)))\n")
    p = run_group([sys.executable, "-c", code], 60)
    assert p.returncode == 0, p.stderr
    pids = [int(x) for x in p.stdout.split()]
    assert len(pids) == 2 and not [x for x in pids if pid_alive(x)]
    assert shm.leftovers(name) == []


def test_two_machines_in_one_process():
    with new_machine() as a:
        with new_machine() as b:
            t, u = a.task(pages=2), b.task(pages=2)
            t.fill(1)
            u.fill(1)
            assert b.wait_full_scans(2)["pages_sharing"] == 1
        t.fill(3)                        # a still runs (and logs) after b closed
        assert a.wait_full_scans(2)["pages_sharing"] == 1 and t.verify() == 2
    assert a.report["status"] == 0 and b.report["status"] == 0
    assert_gone(a)
    assert_gone(b)


def test_spawn_tasks_arm_disarm_and_integrity_as_documented():
    """docs/API.md's promises no other test drove except through inject:
    ``m.spawn`` (built-in workers that take no commands), ``m.tasks()``
    (with ``ready``), ``m.arm``/``m.armed()``/``m.disarm()`` (a ksmd point,
    armed, disarmed, and None once it has fired), ``t.arm``/``t.disarm``
    (a disarmed task point lets the command through), and IntegrityError
    from ``t.verify()`` and ``t.exit()``."""
    import planter
    from uksm.kernel.mm import mm_attach
    with new_machine(frames=256, sleep_millisecs=5) as m:
        t = m.task(pages=4)
        t.fill(5)
        ws = m.spawn(count=2, pages=16, workload="dup:4", seed=3)
        assert [w.id for w in ws] == ["w2", "w3"] and all(w.pages == 16 for w in ws)
        assert {x.id for x in m.tasks()} == {x.id for x in m.tasks(ready=True)} == {"w1", "w2", "w3"}
        with pytest.raises(TypeError):
            ws[0].fill(1)                                # a built-in worker takes no commands
        assert ws[0].stat()["rss"] == 16
        assert m.stats()["started"] == 3
        assert m.spawn(count=1, pages=8, workload="unique", wait=False)[0].id == "w4"
        m.wait(lambda: len(m.tasks(ready=True)) == 4, 30, "w4 ready")
        # a ksmd point: armed, disarmed; armed with a delay, None once ksmd has passed it
        assert m.armed() is None
        m.arm("ksmd_break_cow")
        assert m.armed() == "ksmd_break_cow"
        m.disarm()
        assert m.armed() is None
        m.arm("ksmd_scan_mmap_sem", delay_ms=20)
        assert m.armed() == "ksmd_scan_mmap_sem"
        m.wait(lambda: m.armed() is None, 30, "ksmd to pass its armed point")
        # a task point armed then disarmed: the command that passes it lives
        t.arm("pte_lock_held")
        t.disarm()
        t.write(0, b"z" * 8192)
        assert t.read(0, 2) == b"zz" and m.stats()["killed"] == 0
        # a page changed behind the task's back: verify and exit say so
        cl = m._t().cl
        u = m.task(pages=2, mergeable=False)
        u.write(0, b"mine")
        planter.plant_page_data(cl, {u.mm: mm_attach(cl, u.mm)}, u.mm)
        with pytest.raises(uksm.IntegrityError, match=r"task w5: 1 of 2 pages do not hold what was written"):
            u.verify()
        with pytest.raises(uksm.IntegrityError, match=r"task w5: 1 pages did not hold what was written at its exit"):
            u.exit()
        assert isinstance(uksm.IntegrityError("x"), uksm.MachineError)
    rep = m.report
    assert rep is not None and rep["integrity"]["mismatches"] == 1 and rep["status"] == 4, rep
