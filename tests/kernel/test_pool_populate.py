"""Backing the frame pool (uksm/host/shm.py, Segment.populate; issue 14):
a run of BULK_MIN pages or more of the sparse pool is written with zeros
through the file and mapped by MADV_POPULATE_READ, a shorter one by
MADV_POPULATE_WRITE.  Either way the range is backed by tmpfs blocks when
populate says True, reads as zeros, and a full /dev/shm is a False, never
a SIGBUS at the first write."""
from __future__ import annotations

import errno
import os

import pytest

from helpers import PID
from uksm.host import shm

PAGE = 4096


@pytest.fixture
def pool():
    name = f"tpop{PID}"
    seg = shm.create_segment(name, "pool", 256 * PAGE, sparse=True)
    try:
        yield seg
    finally:
        seg.close()
        shm.unlink_shm(name, "pool")


def blocks(seg: shm.Segment) -> int:
    return seg.resident_bytes() // PAGE


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pages", [1, shm.BULK_MIN - 1, shm.BULK_MIN, 32])
def test_a_run_is_backed_and_reads_zeros(pool, pages):
    assert pool.fd >= 0, "the pool keeps its file open for populate's pwrite"
    assert blocks(pool) == 0
    assert pool.populate(16 * PAGE, pages * PAGE)
    assert blocks(pool) == pages, "exactly the run is backed"
    assert bytes(pool.mv[16 * PAGE:(16 + pages) * PAGE]) == bytes(pages * PAGE)
    pool.mv[16 * PAGE:(16 + pages) * PAGE] = b"\x5a" * (pages * PAGE)  # no SIGBUS
    assert blocks(pool) == pages


@pytest.mark.timeout(30)
def test_the_bulk_path_writes_through_the_file_and_the_short_one_does_not(pool, monkeypatch):
    calls = []
    real = os.pwrite

    def pwrite(fd, data, off):
        calls.append((fd, len(data), off))
        return real(fd, data, off)
    monkeypatch.setattr(os, "pwrite", pwrite)
    assert pool.populate(0, (shm.BULK_MIN - 1) * PAGE)
    assert calls == [], "a short run: MADV_POPULATE_WRITE alone"
    assert pool.populate(64 * PAGE, 40 * PAGE)
    assert [c[0] for c in calls] == [pool.fd] * len(calls)
    assert sum(c[1] for c in calls) == 40 * PAGE and calls[0][2] == 64 * PAGE, calls
    assert len(calls) == 2, "in chunks of the 32-page zero buffer"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["enospc", "short", "enomem"])
def test_a_full_dev_shm_is_false(pool, monkeypatch, how):
    """pwrite failing (ENOSPC, ENOMEM) or writing nothing more: False."""
    real = os.pwrite
    seen = []

    def pwrite(fd, data, off):
        seen.append(off)
        if how == "short" and len(seen) == 1:
            return real(fd, data[:PAGE], off)  # one page, then no room
        if how == "short":
            return 0
        raise OSError(errno.ENOSPC if how == "enospc" else errno.ENOMEM, "no room")
    monkeypatch.setattr(os, "pwrite", pwrite)
    assert pool.populate(0, 8 * PAGE) is False
    assert seen[0] == 0 and (how != "short" or seen[1] == PAGE), seen


@pytest.mark.timeout(30)
def test_another_error_is_raised_not_taken_for_a_full_dev_shm(pool, monkeypatch):
    def pwrite(fd, data, off):
        raise OSError(errno.EBADF, "bad fd")
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError):
        pool.populate(0, 8 * PAGE)


@pytest.mark.timeout(30)
def test_only_a_sparse_segment_keeps_its_fd_and_close_closes_it():
    name = f"tpoq{PID}"
    ctl = shm.create_segment(name, "ctl", 4 * PAGE)
    pool = shm.create_segment(name, "pool", 4 * PAGE, sparse=True)
    attached = shm.attach_segment(name, "pool", sparse=True)
    try:
        assert ctl.fd == -1 and pool.fd >= 0 and attached.fd >= 0
        fds = (pool.fd, attached.fd)
    finally:
        for seg in (ctl, pool, attached):
            seg.close()
        shm.unlink_shm(name, "ctl")
        shm.unlink_shm(name, "pool")
    assert pool.fd == attached.fd == -1
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
