"""POSIX objects of a cluster: names, creation, attachment, removal.

Every shared-memory segment and named semaphore of a cluster carries the
cluster's name in its own name, ``/uksm.<cluster>.<what>``, so several
clusters live side by side and a crashed one's leftovers are found by a
glob on /dev/shm (shared memory appears there as ``uksm.<cluster>.<what>``,
semaphores as ``sem.uksm.<cluster>.<what>``).
"""
from __future__ import annotations

import errno
import mmap
import os
import re

import posix_ipc

# shm.UksmError, the name most of uksm raises it by: the class is uksm.errors'
from uksm.errors import UksmError

SHM_DIR = "/dev/shm"
# back a range with tmpfs pages now, failing (EFAULT/ENOMEM) where a write
# would have raised SIGBUS (Linux 5.14; python's mmap knows it from 3.13)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# Segment.populate: runs of this many pages or more are written with zeros
# and mapped by MADV_POPULATE_READ (see there)
BULK_MIN = 4
_ZEROS: list[memoryview] = []


def _zeros() -> memoryview:
    """128 KiB of zeros to pwrite from: a private anonymous mapping never
    written, so it costs no memory (its pages are the host's zero page),
    mapped at once by MADV_POPULATE_READ (~30 us, once per process: the
    first pwrites' read faults cost 40-60 us)."""
    if not _ZEROS:
        m = mmap.mmap(-1, 32 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            m.madvise(MADV_POPULATE_READ)
        except OSError:
            pass  # (before Linux 5.14) the pwrites fault the zero page in
        _ZEROS.append(memoryview(m))
    return _ZEROS[0]


CLUSTER_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def check_cluster_name(name: str) -> str:
    if not CLUSTER_RE.match(name):
        raise UksmError(f"invalid cluster name {name!r}: use 1-32 of [A-Za-z0-9_-]", 2)
    return name


def obj_name(cluster: str, what: str) -> str:
    return f"/uksm.{cluster}.{what}"


class Segment:
    """A mapped POSIX shared-memory segment, viewed as an int64 array ``q``
    (and as bytes ``mv``)."""

    __slots__ = ("name", "size", "map", "mv", "q", "path", "fd")

    def __init__(self, name: str, size: int, create: bool, sparse: bool = False) -> None:
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=size if create else 0)
        self.fd = -1  # kept open for a sparse segment only: populate's pwrite
        try:
            self.size = size if create else shm.size
            self.map = mmap.mmap(shm.fd, self.size)
            if sparse:
                self.fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        self.name = name
        self.path = os.path.join(SHM_DIR, name.lstrip("/"))
        self.mv = memoryview(self.map)
        self.q = self.mv.cast("q")

    def resident_bytes(self) -> int:
        """Host memory the segment really uses (tmpfs blocks allocated)."""
        try:
            return os.stat(self.path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def populate(self, offset: int, length: int) -> bool:
        """Back the range with tmpfs pages now: False if /dev/shm has no
        room for them.  A write to a page tmpfs cannot back kills the
        writer with SIGBUS, which python cannot survive (its handler runs
        after the faulting instruction, which faults again); asking first
        turns a full /dev/shm into an error we can handle.  A kernel
        without MADV_POPULATE_WRITE (EINVAL) is not checked.

        A run of BULK_MIN pages or more of a sparse segment (the frame
        pool's per-task list refills) is written with zeros through the
        file (pwrite: tmpfs allocates the blocks, ENOSPC here rather than
        SIGBUS later), then mapped with MADV_POPULATE_READ, whose fault
        around maps 16 pages a fault -- writable, the mapping being shared:
        1.8-1.9 us a page, its first write included, against 2.4-2.5 for
        MADV_POPULATE_WRITE, whose faults allocate one page each, and 2.1
        for fallocate + MADV_POPULATE_WRITE (tmpfs, runs of 16-64; below 4
        pages the second system call costs more than it saves).  The pages
        were zeros already (free frames are punched), so nobody sees the
        write."""
        if self.fd >= 0 and length >= BULK_MIN * mmap.PAGESIZE:
            zeros = _zeros()
            pos, end = offset, offset + length
            try:
                while pos < end:
                    n = os.pwrite(self.fd, zeros[:end - pos], pos)
                    if n <= 0:
                        return False
                    pos += n
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    return False
                raise
            try:
                self.map.madvise(MADV_POPULATE_READ, offset, length)
            except OSError:
                pass  # the blocks are there: a first write maps its page itself
            return True
        try:
            self.map.madvise(MADV_POPULATE_WRITE, offset, length)
        except OSError as e:
            return e.errno == errno.EINVAL
        return True

    def punch(self, offset: int, length: int) -> None:
        """Give the range's memory back to the host (a hole in the tmpfs
        file, as MADV_REMOVE does); it reads back as zeros."""
        self.map.madvise(mmap.MADV_REMOVE, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.q.release()
            self.mv.release()
            self.map.close()
        except (BufferError, ValueError):
            pass  # a view still exported; the mapping goes with the process


def create_segment(cluster: str, what: str, size: int, sparse: bool = False,
                   backed: int | None = None) -> Segment:
    """A new segment.  ``backed``: how many bytes from its start are backed
    by tmpfs pages now (default: all, unless ``sparse``: the frame pool,
    backed as frames are allocated), so that no write to them can SIGBUS
    later; the rest is backed by whoever uses it, through ``populate``
    (an address space's page table: ``uksm.kernel.syscalls.sys_mmap``)."""
    try:
        seg = Segment(obj_name(cluster, what), size, True, sparse)
    except posix_ipc.ExistentialError:
        raise UksmError(f"cluster {cluster!r} already exists ({what}); "
                        f"use another --cluster or 'uksm cleanup --cluster {cluster}'", 2)
    n = (0 if sparse else size) if backed is None else min(size, backed)
    if n and not seg.populate(0, n):
        seg.close()
        unlink_shm(cluster, what)
        raise no_room(f"cluster {cluster!r}: {what} ({n >> 10} KiB)")
    return seg


def no_room(what: str) -> UksmError:
    free = shm_free_bytes()
    return UksmError(f"{SHM_DIR} is full: no room for {what} ({free >> 20} MiB free); use fewer "
                     f"or smaller workers, or a bigger {SHM_DIR} (docker --shm-size)", 1)


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_room(cluster: str, need: int) -> None:
    """At boot: the cluster's objects, every frame backed, fit in /dev/shm."""
    free = shm_free_bytes()
    if need > free:
        raise UksmError(f"cluster {cluster!r} does not fit in {SHM_DIR}: it needs {need >> 20} MiB "
                        f"(every frame of the pool backed), {free >> 20} MiB are free; use fewer or "
                        f"smaller workers (--workers, --pages, --frames), or a bigger {SHM_DIR} "
                        f"(docker --shm-size)", 1)


def owner(cluster: str) -> int | None:
    """The uid owning the cluster's objects (None: it has none)."""
    for n in leftovers(cluster):
        try:
            return os.stat(os.path.join(SHM_DIR, n)).st_uid
        except OSError:
            continue
    return None


def user_name(uid: int | None) -> str:
    import pwd
    try:
        return "user " + pwd.getpwuid(uid).pw_name if uid is not None else "another user"
    except KeyError:
        return f"uid {uid}"


def not_yours(cluster: str) -> UksmError:
    """Another user's cluster: every object is created 0600."""
    return UksmError(f"cluster {cluster!r} belongs to {user_name(owner(cluster))}: permission "
                     f"denied (EACCES); only its owner (or root) may look at it or drive it", 1)


def attach_segment(cluster: str, what: str, sparse: bool = False) -> Segment:
    """Map an existing segment (``sparse``: the frame pool, backed as frames
    are allocated: Segment.populate)."""
    try:
        return Segment(obj_name(cluster, what), 0, False, sparse)
    except posix_ipc.PermissionsError:
        raise not_yours(cluster)
    except posix_ipc.ExistentialError:
        raise UksmError(f"cluster {cluster!r} is not running (no {what}); "
                        f"'uksm cleanup --cluster {cluster}' removes a dead one's leftovers", 1)


def create_sem(cluster: str, what: str, value: int) -> None:
    """Make a named semaphore (its users open it by name: ``open_sem``).
    The creator's own handle is closed at once: an open handle is a
    mapping, and a supervisor that makes thousands of address spaces
    (a long-lived cluster, an exploration) would run out of them."""
    try:
        posix_ipc.Semaphore(obj_name(cluster, what), posix_ipc.O_CREX, mode=0o600,
                            initial_value=value).close()
    except posix_ipc.ExistentialError:
        raise UksmError(f"cluster {cluster!r} already exists (semaphore {what})", 2)
    except OSError as e:  # a named semaphore is a file in /dev/shm too
        if e.errno == errno.ENOSPC:
            raise no_room(f"cluster {cluster!r}: semaphore {what}")
        raise


def open_sem(cluster: str, what: str) -> posix_ipc.Semaphore:
    try:
        return posix_ipc.Semaphore(obj_name(cluster, what))
    except posix_ipc.PermissionsError:
        raise not_yours(cluster)


def unlink_shm(cluster: str, what: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(obj_name(cluster, what))
        return True
    except posix_ipc.ExistentialError:
        return False


def unlink_sem(cluster: str, what: str) -> bool:
    try:
        posix_ipc.unlink_semaphore(obj_name(cluster, what))
        return True
    except posix_ipc.ExistentialError:
        return False


def leftovers(cluster: str | None = None) -> list[str]:
    """The cluster's (or every cluster's) POSIX objects present in /dev/shm."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return out
    for n in names:
        base = n[4:] if n.startswith("sem.") else n
        if not base.startswith("uksm."):
            continue
        if cluster is not None and base.split(".")[1] != cluster:
            continue
        out.append(n)
    return out


def clusters_present() -> list[str]:
    return sorted({(n[4:] if n.startswith("sem.") else n).split(".")[1] for n in leftovers()})


def remove_all(cluster: str | None) -> list[str]:
    """Unlink every POSIX object of the cluster (all clusters when None)."""
    removed = []
    for n in leftovers(cluster):
        base = n[4:] if n.startswith("sem.") else n
        try:
            if n.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + base)
            else:
                posix_ipc.unlink_shared_memory("/" + base)
            removed.append(n)
        except posix_ipc.ExistentialError:
            pass
    return removed
