"""uksm/proc/recovery.py: a task that dies holding cluster locks (SIGKILL
mid-madvise) has exactly those locks taken over and released once what
they protect is repaired; the death is noticed, and recovered, even while
the supervisor's main thread is itself blocked on a lock the dead holds
(the detector and recovery threads do it: the main thread's own loop is
stuck).  Each test boots a cluster in this process."""
from __future__ import annotations

import signal
import threading

import pytest

from helpers import booted, cname, log_events, proc_state, pump, wait_for
from uksm.kernel.layout import C_MMAP, E_LOCK, E_WORD, ESIZE, S_LOCK_RECOVERIES, S_RECOVERIES, T_LOCKS, T_READY
from uksm.kernel.locks import WAITING

pytestmark = pytest.mark.timeout(90)
CFG = dict(run=0, frames=256, va_pages=64, max_tasks=12, max_mms=6)


def test_a_killed_tasks_locks_are_taken_over_exactly(tmp_path):
    """A worker SIGKILLed at madvise_mmap_sem_write holds its mm's
    mmap_wmutex and mmap_sem (for write): recovery logs the take-over of
    those two and no other, counts one recovery, the reaper runs its exit;
    the cluster stays consistent and the other worker's data whole."""
    with booted(cname("trecov"), str(tmp_path), **CFG) as sup:
        other = sup.spawn_worker(16, "dup:4", 1)
        ch = sup.spawn_worker(16, "unique", 2, kill_point="madvise_mmap_sem_write")
        pump(sup, lambda: ch.row not in sup.children and sup.settled(), what="the victim recovered and reaped")
        pump(sup, lambda: sup.cl.q[sup.cl.tbase(other.row) + T_READY], what="the other worker ready")
        q = sup.cl.q
        assert (q[S_RECOVERIES], q[S_LOCK_RECOVERIES]) == (1, 2)
        assert sup.live_fsck()["ok"]
        end = sup.shutdown()
        sup.log_stop(end["status"])
    assert end["status"] == 0 and end["integrity"] == {"pages_verified": 16, "mismatches": 0}, end
    assert end["workers"]["killed"] == 1 and end["workers"]["reaped"] == 1, end["workers"]
    taken = {e["lock"] for e in log_events(tmp_path, "lock_recovery") if ch.proc.pid in e["dead_pid"]}
    assert taken == {f"mmap_wmutex:mm{ch.mm}", f"mmap_sem:mm{ch.mm}"}, taken
    (rec,) = [e for e in log_events(tmp_path, "recovery") if e["dead_pid"] == ch.proc.pid]
    assert rec["mm"] == ch.mm and rec["status"] == -signal.SIGKILL, rec


def test_a_death_is_recovered_while_the_main_thread_waits_on_its_lock(tmp_path):
    """The victim stops (SIGSTOP at its kill point) holding its mmap_sem for
    write; the test thread -- the supervisor's main thread -- then waits for
    that mmap_sem; only once it is seen WAITING in the task table is the
    victim SIGKILLed.  The main thread's loop is blocked: the detector and
    recovery threads notice the death, take over the lock and release it,
    and the main thread's wait ends."""
    with booted(cname("trecovw"), str(tmp_path), **CFG) as sup:
        ch = sup.spawn_worker(16, "unique", 2, kill_point="madvise_mmap_sem_write",
                              kill_sig=signal.SIGSTOP)
        wait_for(lambda: proc_state(ch.proc.pid) == "T", 30, what="the victim stopped holding mmap_sem")
        mm = sup.mms[ch.mm]
        cl, q = sup.cl, sup.cl.q
        e = cl.task.base + T_LOCKS + C_MMAP * ESIZE

        seen_waiting: list[bool] = []

        def kill_once_waiting() -> None:
            wait_for(lambda: q[e + E_WORD] & 3 == WAITING and q[e + E_LOCK] == mm.sem.lid, 30,
                     what="the main thread waiting for the victim's mmap_sem")
            seen_waiting.append(True)     # the window: the main thread blocked, the holder alive
            ch.proc.send_signal(signal.SIGKILL)
        killer = threading.Thread(target=kill_once_waiting, daemon=True)
        killer.start()
        cl.task.lock(mm.sem)          # blocks: the victim holds it for write
        cl.task.unlock(mm.sem)
        killer.join(10)
        assert seen_waiting == [True]
        pump(sup, lambda: ch.row not in sup.children and sup.settled(), what="the victim reaped")
        assert q[S_RECOVERIES] == 1 and sup.live_fsck()["ok"]
    assert [e["dead_pid"] for e in log_events(tmp_path, "recovery")] == [ch.proc.pid]
