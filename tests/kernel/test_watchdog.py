"""uksm/kernel/watchdog.py, khungtaskd: a task blocked on one lock longer
than the hung-task timeout is reported once, with the wait-for chain --
the lock, its holder, what that holder waits for, ... -- ending at a task
that waits for nothing, at a cycle (a deadlock), or for the "frames"
pseudo-lock at the OOM victim; and a task whose exit keeps faulting
without progress is reported as a livelock.

The watchdog only reads the task table, so these tests write the words a
wait leaves there (an entry WAITING since some time, its holder's entry
HELD) in a cluster with no supervisor and no ksmd (nothing else moves);
one test makes a real wait with the lock protocol, and checks the watchdog
reads what the protocol writes."""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import cname
from uksm.kernel.cluster import Cluster, Config
from uksm.kernel.layout import (
    A_FREE_TOP,
    C_DAEMON,
    C_FRAMES,
    C_MMAP,
    C_MMLIST,
    E_LOCK,
    E_SINCE,
    E_WORD,
    ESIZE,
    R_KSMD,
    R_WORKER,
    T_LOCKS,
    TS_ALIVE,
    XS_USERS0,
)
from uksm.kernel.locks import HELD, WAITING, lock_id
from uksm.kernel.watchdog import Watchdog

pytestmark = pytest.mark.timeout(60)
TIMEOUT_S = 0.5


@pytest.fixture
def cl() -> Iterator[Cluster]:
    c = Cluster.create(cname("twdog"), Config(frames=64, max_tasks=8, max_mms=4, va_pages=64))
    try:
        yield c
    finally:
        c.close()
        from uksm.kernel.cluster import destroy
        destroy(c.name)


def task(cl: Cluster, row: int, pid: int, role: int = R_WORKER, worker_no: int = 0, mm: int = 0) -> None:
    t = cl.trow(row)
    t.pid, t.role, t.worker_no, t.mm, t.state = pid, role, worker_no, mm, TS_ALIVE


def entry(cl: Cluster, row: int, cls: int, lid: int, state: int, since_s: float = 0.0) -> None:
    """Task ``row``'s entry for lock class ``cls``: ``state`` on lock ``lid``,
    WAITING for ``since_s`` seconds."""
    e = cl.tbase(row) + T_LOCKS + cls * ESIZE
    cl.q[e + E_LOCK] = lid
    cl.q[e + E_WORD] = state
    cl.q[e + E_SINCE] = time.monotonic_ns() - int(since_s * 1e9) if state == WAITING else 0


def check(cl: Cluster) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    Watchdog(cl, TIMEOUT_S, reports.append).check()
    return reports


def test_a_long_wait_is_reported_with_its_chain_and_a_short_one_is_not(cl: Cluster) -> None:
    mutex, mmsem = lock_id(C_DAEMON), lock_id(C_MMAP, 3)
    task(cl, 0, 101, R_WORKER, 1, 3)
    task(cl, 1, 102, R_KSMD)
    task(cl, 2, 103, R_WORKER, 2, 4)
    entry(cl, 0, C_MMAP, mmsem, WAITING, since_s=2.0)    # w1 waits for mmap_sem:mm3 ...
    entry(cl, 1, C_MMAP, mmsem, HELD)                     # ... which ksmd holds,
    entry(cl, 1, C_DAEMON, mutex, WAITING, since_s=0.1)  # waiting (not long) for the mutex
    entry(cl, 2, C_DAEMON, mutex, HELD)                   # which w2 holds, running
    wd_reports: list[dict[str, Any]] = []
    wd = Watchdog(cl, TIMEOUT_S, wd_reports.append)
    wd.check()
    (r,) = wd_reports
    assert (r["pid"], r["role"], r["lock"], r["deadlock"]) == (101, "worker", "mmap_sem:mm3", False), r
    assert r["waited_s"] >= 2.0
    want = [r"worker w1 \(pid 101, mm3\) waits for mmap_sem:mm3 for 2\.\ds, held by ksmd \(pid 102\)",
            r"ksmd \(pid 102\) waits for ksm_thread_mutex for 0\.\ds, held by worker w2 \(pid 103, mm4\)",
            r"worker w2 \(pid 103, mm4\) is running \(not blocked\)"]
    assert len(r["chain"]) == 3 and all(re.fullmatch(w, c) for w, c in zip(want, r["chain"])), r["chain"]
    wd.check()
    assert len(wd_reports) == 1, "a wait is reported once"


def test_a_cycle_is_a_deadlock(cl: Cluster) -> None:
    a, b = lock_id(C_DAEMON), lock_id(C_MMLIST)
    task(cl, 0, 201, R_WORKER, 1, 1)
    task(cl, 1, 202, R_WORKER, 2, 2)
    entry(cl, 0, C_DAEMON, a, HELD)
    entry(cl, 0, C_MMLIST, b, WAITING, since_s=1.0)
    entry(cl, 1, C_MMLIST, b, HELD)
    entry(cl, 1, C_DAEMON, a, WAITING, since_s=1.0)
    reports = check(cl)
    assert len(reports) == 2 and all(r["deadlock"] for r in reports), reports
    chain = next(r for r in reports if r["pid"] == 201)["chain"]
    assert chain[0].startswith("worker w1 (pid 201, mm1) waits for ksm_mmlist_lock for ")
    assert chain[0].endswith("held by worker w2 (pid 202, mm2)")
    assert chain[1].startswith("worker w2 (pid 202, mm2) waits for ksm_thread_mutex for ")
    assert chain[-1] == "deadlock: worker w1 (pid 201, mm1) is already in this chain"


def test_waiting_for_frames_points_at_the_oom_victim(cl: Cluster) -> None:
    task(cl, 0, 301, R_WORKER, 1, 1)
    task(cl, 1, 302, R_WORKER, 2, 2)
    m = cl.mrow(0)
    m.id, m.owner_pid, m.oom_victim = 2, 302, 1          # w2's mm: the OOM victim, not yet zapped
    entry(cl, 0, C_FRAMES, lock_id(C_FRAMES), WAITING, since_s=1.0)
    (r,) = check(cl)
    assert r["lock"] == "frames" and r["pid"] == 301, r
    assert r["chain"][0].startswith(f"worker w1 (pid 301, mm1) waits for free frames ({cl.q[A_FREE_TOP]} free) for ")
    assert r["chain"][0].endswith(
        "the OOM victim, which has not freed its memory: worker w2 (pid 302, mm2)"), r["chain"]
    m.oom_victim = 0                                       # no victim: said so
    entry(cl, 0, C_FRAMES, lock_id(C_FRAMES), WAITING, since_s=2.0)   # a new wait
    (r,) = check(cl)
    assert r["chain"][0].endswith("no OOM victim: nobody alive"), r["chain"]


def test_an_exit_faulting_without_progress_is_a_livelock(cl: Cluster) -> None:
    """A task in its exit (mm_users 0) whose fault count grows while its
    exit stage and progress stand still, for the timeout: reported once,
    lock "none (livelock)"; one whose exit progresses is not."""
    task(cl, 0, 401, R_WORKER, 1, 1)
    m = cl.mrow(0)
    m.id, m.exit_stage = 1, XS_USERS0
    t = cl.trow(0)
    reports: list[dict[str, Any]] = []
    wd = Watchdog(cl, TIMEOUT_S, reports.append)
    s = 10**9                               # the watchdog's clock, given (check_livelock's ``now``)
    t.faults = 10
    wd.check_livelock(1 * s)                # first seen in its exit: the clock starts
    t.faults = 20
    wd.check_livelock(1 * s + s // 4)       # faulting, no progress, not yet the timeout
    assert reports == []
    t.faults = 40
    wd.check_livelock(2 * s)                # past it
    assert reports == [{"pid": 401, "role": "worker", "lock": "none (livelock)", "waited_s": 1.0,
                        "deadlock": False, "chain": [
                            "worker w1 (pid 401, mm1) keeps faulting in its exit without progress: 30 faults "
                            "in 1.0s, exit stage 1, progress 0 (a livelock: munlock at exit with the seed's "
                            "fault-path check?)"]}]
    t.faults = 50
    wd.check_livelock(3 * s)
    assert len(reports) == 1                # reported once
    t.exit_progress = 1                     # progress now: no livelock, the clock restarts
    t.faults = 60
    wd.check_livelock(5 * s)
    t.exit_progress = 2
    t.faults = 70
    wd.check_livelock(9 * s)
    assert len(reports) == 1


def test_a_real_wait_reads_as_the_protocol_writes_it(cl: Cluster) -> None:
    """A thread of this process (task row 1) blocks on ksm_thread_mutex,
    which the test thread (row 0) holds: the watchdog reports the waiter,
    held by the test's task."""
    import os
    task(cl, 0, os.getpid(), R_WORKER, 1, 0)
    task(cl, 1, os.getpid() + 0, R_WORKER, 2, 0)
    cl.bind(0)
    other = cl.thread_view(1)
    cl.task.lock(cl.daemon)
    done = threading.Event()

    def waiter() -> None:
        other.task.lock(other.daemon)
        other.task.unlock(other.daemon)
        done.set()
    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    try:
        reports: list[dict[str, Any]] = []
        wd = Watchdog(cl, 0.2, reports.append)
        end = time.monotonic() + 20
        while not reports and time.monotonic() < end:
            wd.check()
            time.sleep(0.05)
        (r,) = reports
        assert r["lock"] == "ksm_thread_mutex" and r["chain"][0].startswith("worker w2 (pid ")
        assert "held by worker w1" in r["chain"][0], r["chain"]
    finally:
        cl.task.unlock(cl.daemon)
        th.join(10)
    assert done.is_set()


NOW = 50 * 10**9   # the watchdog's clock in the tests below (time.monotonic_ns, given)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The watchdog's clock, given: NOW, or what the test sets ``clock[0]`` to."""
    import uksm.kernel.watchdog as wd
    now = [NOW]
    monkeypatch.setattr(wd.time, "monotonic_ns", lambda: now[0])
    return now


def waiting_since(cl: Cluster, row: int, cls: int, lid: int, ns: int) -> None:
    """As ``entry``, WAITING for exactly ``ns`` nanoseconds at NOW."""
    entry(cl, row, cls, lid, WAITING)
    cl.q[cl.tbase(row) + T_LOCKS + cls * ESIZE + E_SINCE] = NOW - ns


def test_the_report_exactly(cl: Cluster, clock: list[int]) -> None:
    """The whole report, to the millisecond: who, the lock, how long
    (rounded to 1 ms), no deadlock, the chain; a wait of exactly the
    timeout is reported, one a nanosecond shorter is not."""
    lid = lock_id(C_MMAP, 2)
    task(cl, 0, 501, R_WORKER, 1, 2)
    task(cl, 1, 502, R_WORKER, 2, 2)
    entry(cl, 1, C_MMAP, lid, HELD)
    waiting_since(cl, 0, C_MMAP, lid, int(TIMEOUT_S * 1e9) - 1)
    assert check(cl) == []
    waiting_since(cl, 0, C_MMAP, lid, int(TIMEOUT_S * 1e9))
    assert check(cl) == [{"pid": 501, "role": "worker", "lock": "mmap_sem:mm2", "waited_s": 0.5,
                          "deadlock": False, "chain": [
                              "worker w1 (pid 501, mm2) waits for mmap_sem:mm2 for 0.5s, held by worker w2 "
                              "(pid 502, mm2)",
                              "worker w2 (pid 502, mm2) is running (not blocked)"],
                          "waits": [{"pid": 501, "role": "worker", "mm": 2, "lock": "mmap_sem:mm2",
                                     "waited_s": 0.5, "since_ns": NOW - int(TIMEOUT_S * 1e9),
                                     "holders": [502]}]}]
    waiting_since(cl, 0, C_MMAP, lid, 1_234_567_890)
    (r,) = check(cl)
    assert r["waited_s"] == 1.235 and "for 1.2s" in r["chain"][0], r


def test_several_holders_a_reaper_and_an_unknown_role(cl: Cluster, clock: list[int]) -> None:
    """Readers holding an rw lock together are all named; a reaper is named
    for the mm it exits; a row of a role uksm does not know is '?'; a
    holder row with no pid yet is nobody."""
    from uksm.kernel.layout import R_REAPER
    lid = lock_id(C_MMAP, 7)
    task(cl, 0, 601, R_WORKER, 1, 7)
    task(cl, 1, 602, R_WORKER, 2, 7)
    task(cl, 2, 603, R_REAPER, 0, 7)
    task(cl, 3, 0, R_WORKER, 4, 7)            # started, pid not yet written
    task(cl, 4, 604, 99, 0, 0)                # a role uksm has no name for
    for r in (1, 2, 3):
        entry(cl, r, C_MMAP, lid, HELD)
    waiting_since(cl, 0, C_MMAP, lid, 2 * 10**9)
    waiting_since(cl, 4, C_MMLIST, lock_id(C_MMLIST), 2 * 10**9)
    reports = {r["pid"]: r for r in check(cl)}
    assert reports[601]["chain"][0] == ("worker w1 (pid 601, mm7) waits for mmap_sem:mm7 for 2.0s, held by "
                                        "worker w2 (pid 602, mm7), reaper for mm7 (pid 603)")
    assert reports[601]["chain"][1] == "worker w2 (pid 602, mm7) is running (not blocked)"
    assert reports[604]["chain"] == ["? (pid 604) waits for ksm_mmlist_lock for 2.0s, held by nobody alive"]


def test_a_chain_is_cut_at_ten_lines(clock: list[int]) -> None:
    """Twelve tasks, each waiting for what the next holds: the chain
    reported stops at ten lines (no end, no cycle found within them)."""
    from uksm.kernel.cluster import destroy
    big = Cluster.create(cname("twdog12"), Config(frames=64, max_tasks=16, max_mms=4, va_pages=64))
    try:
        n = 12
        for r in range(n):
            task(big, r, 900 + r, R_WORKER, r + 1, 0)
        for r in range(n - 1):           # r waits for lock r, which r+1 holds (classes alternate)
            cls = C_MMAP if r % 2 == 0 else C_MMLIST
            waiting_since(big, r, cls, lock_id(cls, r + 1), 2 * 10**9)
            entry(big, r + 1, cls, lock_id(cls, r + 1), HELD)
        chain = next(r for r in check(big) if r["pid"] == 900)["chain"]
        assert len(chain) == 10 and not chain[-1].endswith("is running (not blocked)"), chain
        assert chain[9].startswith("worker w10 (pid 909, mm0) waits for "), chain
    finally:
        big.close()
        destroy(big.name)


def test_a_task_with_no_mm_is_never_a_livelock(cl: Cluster) -> None:
    """ksmd (no mm of its own) faulting away while some mm is exiting:
    the exiting mm is not ksmd's -- no livelock is reported for ksmd."""
    task(cl, 0, 801, R_KSMD)
    task(cl, 1, 802, R_WORKER, 1, 1)
    m = cl.mrow(1)
    m.id, m.exit_stage = 1, XS_USERS0      # row 1's mm exiting (its owner's is mm row 1)
    reports: list[dict[str, Any]] = []
    wd = Watchdog(cl, TIMEOUT_S, reports.append)
    t = cl.trow(0)
    for i in range(5):
        t.faults = 10 * (i + 1)
        wd.check_livelock(i * 10**9)
    assert reports == []


def test_check_watches_for_livelocks_too(cl: Cluster, clock: list[int]) -> None:
    """check(), the watchdog's round, runs the livelock watch with its clock."""
    task(cl, 0, 451, R_WORKER, 1, 1)
    m = cl.mrow(0)
    m.id, m.exit_stage = 1, XS_USERS0
    reports: list[dict[str, Any]] = []
    wd = Watchdog(cl, TIMEOUT_S, reports.append)
    cl.trow(0).faults = 5
    wd.check()
    clock[0] += 10**9
    cl.trow(0).faults = 9
    wd.check()
    assert [(r["pid"], r["lock"], r["waited_s"]) for r in reports] == [(451, "none (livelock)", 1.0)]
