"""Sizes, limits and the smaller promises of the API, as a demanding user
met them (issue 28: items 2 and 5, and the API's part of item 8).

- a Machine's options are checked by the one options module, its errors
  naming them as the API spells them (``max_pages``, not ``--max-pages``);
- a task's address space costs /dev/shm what it maps, not ``max_pages``;
- ``max_tasks`` is how many tasks may live at once;
- waits refuse NaN and infinity; a full machine is a MachineError;
  ``repr`` after close; ``tasks()`` of an attached machine."""
from __future__ import annotations

import math
import os
import sys

import pytest

import uksm
from helpers import run_group, unique_name
from uksm.host import shm

pytestmark = pytest.mark.timeout(120)

def _name() -> str:
    return unique_name("tlim")


def machine(**kw):
    return uksm.Machine(name=_name(), frames=kw.pop("frames", 128), **kw)


def shm_bytes(name: str) -> int:
    """What the cluster's objects use of /dev/shm (tmpfs blocks)."""
    total = 0
    for n in shm.leftovers(name):
        try:
            total += os.stat(os.path.join(shm.SHM_DIR, n)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


@pytest.mark.parametrize("max_pages", [10**7, 10**9])
def test_max_pages_beyond_the_limit_is_refused_in_one_line_naming_it(max_pages):
    with pytest.raises(ValueError) as ei:
        uksm.Machine(name=_name(), max_pages=max_pages)
    msg = str(ei.value)
    assert msg.startswith("max_pages: at most 1048576") and "\n" not in msg, msg
    assert "--" not in msg                      # the API's spelling, not the CLI's


def test_the_options_are_named_as_the_api_spells_them():
    for kw, exc, text in (({"max_tasks": 0}, ValueError, "max_tasks: must be at least 1"),
                          ({"max_tasks": 5000}, ValueError, "max_tasks: must be at most 4096"),
                          ({"frames": 8}, ValueError, "frames: must be at least 16"),
                          ({"sleep_millisecs": -1}, ValueError, "sleep_millisecs: must be at least 0"),
                          ({"pages_to_scan": 0}, ValueError, "pages_to_scan: must be at least 1"),
                          ({"hung_task_timeout": math.nan}, ValueError, "hung_task_timeout"),
                          ({"max_pages": 2.0}, TypeError, "max_pages: must be a whole number"),
                          ({"exit_policy": "x"}, ValueError, "exit_policy: unknown 'x'")):
        with pytest.raises(exc, match=text) as ei:
            uksm.Machine(name=_name(), **kw)
        assert "--" not in str(ei.value), ei.value
    with machine() as m:
        with pytest.raises(ValueError, match=r"^spawn: pages: must be 1\.\.1024 \(the machine's "
                                             r"max_pages is 1024\)"):
            m.spawn(1, pages=5000)
        with pytest.raises(ValueError, match=r"^task: pages: must be 1\.\.1024"):
            m.task(pages=5000)
        with pytest.raises(ValueError, match="count: must be at least 1"):
            m.spawn(0)


def test_a_task_costs_dev_shm_what_it_maps_not_max_pages():
    """Eight 1-page tasks of a machine whose tasks may have 2^20 pages: each
    address space's page table was backed whole, 8 MiB a task (64 MiB);
    now a page table is backed as its task maps, a few KiB a task."""
    with machine(max_pages=1 << 20, max_tasks=8, frames=64) as m:
        base = shm_bytes(m.name)
        ts = [m.task(pages=1) for _ in range(8)]
        for t in ts:
            t.fill(1)
        grown = shm_bytes(m.name) - base
        assert grown < 32 << 20, f"/dev/shm grew by {grown >> 20} MiB for 8 one-page tasks"
        assert m.fsck()["ok"]
    assert m.report is not None and m.report["status"] == 0


def test_a_large_task_still_works_and_costs_its_own_size():
    """A task of many pages backs its page table as it maps (8 bytes a
    page), and fsck, the exit's zap and verify see all of it."""
    with machine(max_pages=1 << 20, frames=4096) as m:
        base = shm_bytes(m.name)
        t = m.task(pages=3000)
        t.fill(7, first=2990)
        assert t.read(2999 * 4096, 3) == b"\x07\x07\x07"
        assert shm_bytes(m.name) - base < 2 << 20
        assert m.fsck()["ok"] and t.verify() == 3000
        assert t.exit() in ("fast", "slow", "none")
    assert m.report is not None and m.report["status"] == 0, m.report


def test_max_tasks_is_how_many_tasks_may_live_at_once():
    with machine(max_tasks=2) as m:
        a, b = m.task(pages=1), m.task(pages=1)
        with pytest.raises(uksm.MachineError, match=r"max_tasks 2: 2 tasks are alive, 0 more may "
                                                     r"start") as ei:
            m.task(pages=1)
        assert not isinstance(ei.value, ValueError)      # a full machine, not bad input
        with pytest.raises(uksm.MachineError, match="max_tasks 2"):
            m.spawn(1, pages=4)
        assert len(m.tasks()) == 2
        a.exit()
        c = m.task(pages=1)                              # room again
        with pytest.raises(uksm.MachineError, match="3 tasks refused, nothing started"):
            m.spawn(3, pages=4)
        assert sorted(t.id for t in m.tasks()) == sorted([b.id, c.id])
    assert m.report is not None and m.report["status"] == 0


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1, 0])
def test_a_wait_never_waits_for_ever(timeout):
    with machine() as m:
        for wait in (lambda: m.wait(lambda: False, timeout=timeout),
                     lambda: m.wait_full_scans(1, timeout=timeout),
                     lambda: m.wait_merged(timeout=timeout)):
            with pytest.raises(ValueError, match="timeout: must be a positive, finite number"):
                wait()


def test_repr_after_close_says_closed():
    m = machine()
    t = m.task(pages=1)
    assert "alive" in repr(t) and "pages_shared" in repr(m.ksm)
    m.close()
    assert "closed" in repr(m.ksm) and "closed" in repr(m)
    assert "alive" not in repr(t) and "machine is closed" in repr(t)


def test_attached_tasks_show_their_pid_and_pages(tmp_path):
    name = _name()
    up = run_group([sys.executable, "-m", "uksm", "up", "--cluster", name, "--workers", "2",
                    "--pages", "8", "--frames", "128", "--log-dir", str(tmp_path)], 60)
    try:
        assert up.returncode == 0, up.stderr
        m = uksm.Machine.attach(name)
        t = m.task(pages=3)
        m.close()
        m2 = uksm.Machine.attach(name)
        ts = {x.id: x for x in m2.tasks()}
        assert len(ts) == 3
        assert all(x.pid > 0 for x in ts.values()), ts
        assert sorted(x.pages for x in ts.values()) == [3, 8, 8], ts
        assert ts[t.id].programmable and sum(not x.programmable for x in ts.values()) == 2
        assert "built-in" in repr(next(x for x in ts.values() if not x.programmable))
        rep = m2.down()
        assert rep["status"] == 0, rep
    finally:
        run_group([sys.executable, "-m", "uksm", "down", "--cluster", name], 60)
