"""The host's KSM, /sys/kernel/mm/ksm, as the tools use it: shared by every
user of the machine, so one at a time (``flock /tmp/hostksm.lock``), and
its knobs always put back (``HostKsm.restore`` in a ``finally``, under
``shielded`` so a second Ctrl-C cannot cut the clean-up short).

Used by tools/twin.py; tools/bench_ksm.py takes ``shielded`` from here."""
from __future__ import annotations

import fcntl
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOCK = "/tmp/hostksm.lock"
#: what the host's knobs are put back to, in this order (run=2 first: unmerge
#: everything; max_page_sharing can only be written with no KSM page left)
RESTORE = (("run", "2"), ("run", "0"), ("pages_to_scan", "100"), ("sleep_millisecs", "20"),
           ("max_page_sharing", "256"), ("stable_node_chains_prune_millisecs", "2000"),
           ("use_zero_pages", "0"), ("smart_scan", "1"), ("advisor_mode", "none"))


class HostKsm:
    """/sys/kernel/mm/ksm (or a folder standing for it), read and written."""

    def __init__(self, sysfs: str) -> None:
        self.dir = sysfs

    def read(self, name: str) -> str:
        with open(os.path.join(self.dir, name)) as f:
            return f.read().strip()

    def int(self, name: str) -> int:
        return int(self.read(name))

    def write(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def unavailable(self) -> str | None:
        """Why this KSM cannot be driven (one line), or None: the twin
        also reads PFNs (root) and /proc/PID/ksm_stat."""
        if not os.path.isdir(self.dir):
            return f"{self.dir} is missing (a kernel without CONFIG_KSM?)"
        if os.geteuid() != 0:
            return "needs root (to write the KSM knobs and read PFNs in /proc/PID/pagemap)"
        for n in ("run", "pages_to_scan", "sleep_millisecs", "full_scans", "pages_shared",
                  "pages_sharing"):
            if not os.path.exists(os.path.join(self.dir, n)):
                return f"{self.dir}/{n} is missing"
        if not os.access(os.path.join(self.dir, "run"), os.W_OK):
            return f"{self.dir}/run is not writable (a read-only /sys?)"
        if not os.path.exists("/proc/self/ksm_stat"):
            return "/proc/PID/ksm_stat is missing (a kernel before 6.1)"
        if not hasattr(mmap, "MADV_MERGEABLE"):
            return "this Python's mmap has no MADV_MERGEABLE"
        return None

    def restore(self) -> list[str]:
        """RESTORE, each write tried even if one before failed (run=2 is
        retried: an unmerge interrupted by a signal or short of memory
        returns EINTR/ENOMEM).  Returns the errors."""
        errors = []
        for name, value in RESTORE:
            if not os.path.exists(os.path.join(self.dir, name)):
                continue
            for attempt in range(3):
                try:
                    self.write(name, value)
                    break
                except OSError as e:
                    if attempt == 2:
                        errors.append(f"{name}={value}: {e}")
                    time.sleep(0.1 * (attempt + 1))
        return errors


@contextmanager
def host_lock(say: Callable[[str], None], timeout: float) -> Iterator[None]:
    """flock /tmp/hostksm.lock: the one user of the host's KSM at a time."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        end, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    say(f"  kernel: waiting for {LOCK} (another user of the host's KSM)")
                    told = True
                if time.monotonic() > end:
                    raise TimeoutError(f"{LOCK} still held after {timeout:.0f}s")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)   # releases the lock


@contextmanager
def shielded() -> Iterator[None]:
    """Clean-up that a second Ctrl-C / SIGTERM must not cut short: the
    signal is remembered and raised once the block is done."""
    got: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signo, _f: got.append(signo))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            raise KeyboardInterrupt("interrupted during clean-up (clean-up completed)")
