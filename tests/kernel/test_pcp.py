"""Per-task frame lists (issue 14; ``Allocator(batch=...)``, the kernel's
per-CPU page lists): a worker takes frames off the free stack in batches
and allocates from its list without zone_lock.  Every frame must stay
accounted for: held (not leaked) while the worker lives, given back when
it exits, and given back by the recovery when it dies holding its list --
also at the fault's kill point, with a frame in flight besides."""
from __future__ import annotations

import os
import signal

import pytest

from helpers import PID, booted, pump
from uksm.kernel.layout import F_PCP, FR_AUX, FR_COUNT, FR_FLAGS, FRAME_SIZE, T_READY
from util_machine import assert_fsck, frames_used

FRAMES = 1 << 15  # free frames >> PCP_SHIFT: lists of up to 8 frames
PAGES = 100


def listed(cl, row: int) -> list[int]:
    """The frames in task ``row``'s list (F_PCP, owner row + 1)."""
    fq = cl.fq
    return [pfn for pfn in range(cl.nframes)
            if fq[pfn * FRAME_SIZE + FR_FLAGS] & F_PCP and fq[pfn * FRAME_SIZE + FR_AUX] == row + 1]


def ready(sup, ch) -> bool:
    return bool(sup.cl.q[sup.cl.tbase(ch.row) + T_READY])


def finish(sup) -> dict:
    assert sup.stop_workers(timeout=30), f"workers did not exit: hung={sup.hung}"
    sup.stop_ksmd()
    return sup.final_fsck()


@pytest.mark.timeout(90)
def test_a_live_list_is_held_and_the_exit_gives_it_back(tmp_path):
    with booted(f"tpcp{PID}", str(tmp_path), run=0, frames=FRAMES, va_pages=PAGES + 64) as sup:
        ch = sup.spawn_worker(PAGES, "dup:4", 1)
        pump(sup, lambda: ready(sup, ch), what="worker ready")
        held = listed(sup.cl, ch.row)
        assert held, "a worker with many free frames around keeps a list"
        assert all(sup.cl.fq[p * FRAME_SIZE + FR_COUNT] == 0 for p in held)
        assert frames_used(sup.cl) == PAGES + len(held), "listed frames are not free"
        assert_fsck(sup)  # count 0, off the stack, held by a live task: not a leak
        ch.proc.terminate()
        pump(sup, lambda: ch.row not in sup.children, what="worker reaped")
        assert listed(sup.cl, ch.row) == [] and frames_used(sup.cl) == 0, "drained at exit"
        fs = finish(sup)
        assert fs["ok"], fs["errors"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("point", [None, "fault_after_alloc"])
def test_a_worker_killed_holding_its_list_leaks_nothing(point, tmp_path):
    """SIGKILL after the fill (the list held), or at the first fault's
    kill point (the list just taken, one frame of it in flight)."""
    with booted(f"tpck{PID}", str(tmp_path), run=0, frames=FRAMES, va_pages=PAGES + 64) as sup:
        ch = sup.spawn_worker(PAGES, "dup:4", 2, kill_point=point)
        if point is None:
            pump(sup, lambda: ready(sup, ch), what="worker ready")
            assert listed(sup.cl, ch.row)
            os.kill(ch.proc.pid, signal.SIGKILL)
        pump(sup, lambda: ch.row not in sup.children and sup.settled(), what="worker dead and recovered")
        # it died of that SIGKILL, there (not of something else before it)
        assert ch.proc.returncode == -signal.SIGKILL, ch.proc.returncode
        assert sup.cl.kill_points_hit() == (0 if point is None else 1)
        assert [p for p in range(sup.cl.nframes) if sup.cl.fq[p * FRAME_SIZE + FR_FLAGS] & F_PCP] == []
        assert frames_used(sup.cl) == 0, "the recovery gave back the list and the address space"
        fs = finish(sup)
        assert fs["ok"], fs["errors"]


@pytest.mark.timeout(60)
def test_a_list_dev_shm_cannot_back_goes_back_whole(monkeypatch):
    """/dev/shm full when the list is backed: every frame of the batch goes
    back on the free stack, and the allocation takes the one-frame path."""
    from uksm.kernel.layout import A_FREE_TOP
    from uksm.kernel.memory import PCP_BATCH
    from util_machine import Space
    with booted(f"tpcf{PID}", run=0, frames=FRAMES, va_pages=PAGES + 64) as sup:
        cl = sup.cl
        s = Space(sup)
        s.alloc.batch = PCP_BATCH
        base = s.mmap(4)
        calls = []
        seg = type(cl.pool)
        real = seg.populate

        def full_once(self, offset: int, length: int) -> bool:
            calls.append(length)
            return real(self, offset, length) if len(calls) > 1 else False
        monkeypatch.setattr(seg, "populate", full_once)
        top = cl.q[A_FREE_TOP]
        s.write(base, b"x" * 4096)
        assert calls[0] > 4096 and calls[1:] == [4096], "the batch, then one frame"
        assert s.alloc.pcp == [] and cl.q[A_FREE_TOP] == top - 1, "the batch is back, one frame used"
        assert [p for p in range(cl.nframes) if cl.fq[p * FRAME_SIZE + FR_FLAGS] & F_PCP] == []
        assert s.read(base, 4096) == b"x" * 4096
        assert_fsck(sup, [s])
        s.exit()
