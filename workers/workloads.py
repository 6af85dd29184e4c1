"""Workloads: what each worker writes into its pages, deterministic from
(workload, seed, worker number, page index, version).

- ``identical``: every page of every worker holds the same non-zero content;
- ``unique``: no two pages anywhere are equal;
- ``zero``: every page is written with zeros;
- ``dup:K``: page i of every worker holds content number (i mod K);
- ``volatile``: every page is rewritten continuously (never stable);
- ``vm`` (default): like guests booted from one image -- most pages from a
  shared base image, some zero, some unique, some volatile.

Any of them with ``+fork`` (``vm+fork``, ``dup:8+fork:500``): the worker
also forks a child every ``FORK_MS`` milliseconds (or the number given),
as a shell or a server does -- the child maps the parent's pages
copy-on-write, rewrites its volatile ones, churns like its parent, and
exits after ``CHILD_LIFE`` periods; a child does not fork.  A fork the
machine has no room for (its task limit) fails with EAGAIN and the worker
goes on.  So a run, ``uksm inject`` or a campaign goes through forks too:
the kill points inside fork, a kill at any instant of one.
"""
from __future__ import annotations

import struct

from uksm.host.shm import UksmError
from uksm.kernel.layout import PAGE_SIZE

NAMES = ("identical", "unique", "zero", "dup:K", "volatile", "vm")
FORK = "+fork"
FORK_MS = 1000     # a W+fork worker's fork period, by default
CHILD_LIFE = 2     # a forked child lives this many fork periods, then exits
ZERO = bytes(PAGE_SIZE)
_pack = struct.Struct("<QQ").pack
M64 = (1 << 64) - 1

# content kinds
K_SAME, K_UNIQUE, K_DUP, K_VOL, K_BASE = 1, 2, 3, 4, 5
DUP_CACHE = 1024  # dup:K with K up to this keeps its K pages made (4 MiB at most)


def _mix(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def page(kind: int, seed: int, a: int, b: int = 0, version: int = 0) -> bytes:
    """4096 bytes, never all zero, equal iff the arguments are equal."""
    h = _mix(_mix(kind << 48 ^ seed) ^ a)
    return _pack(h | 1, (b << 24 | version) & M64) * (PAGE_SIZE // 16)


class Workload:
    """Page i's content for worker ``wno``: ``content(i, version)``;
    ``volatile(i)``: the page is rewritten every round."""

    def __init__(self, spec: str, seed: int, wno: int) -> None:
        self.spec = spec
        self.seed = seed
        self.wno = wno
        self.k = 0
        spec, self.fork_ms = split_fork(spec)
        name = spec
        if spec.startswith("dup:"):
            name = "dup"
            try:
                self.k = int(spec[4:])
            except ValueError:
                raise UksmError(f"bad workload {spec!r}: dup:K needs a whole number K >= 1", 2)
            if self.k < 1:
                raise UksmError(f"bad workload {spec!r}: dup:K needs K >= 1", 2)
        elif spec not in ("identical", "unique", "zero", "volatile", "vm"):
            raise UksmError(f"unknown workload {spec!r} (one of: {', '.join(NAMES)}; any of "
                            f"them {FORK} or {FORK}:MS)", 2)
        self.name = name
        # dup:K's pages, made once (a page costs ~1 us to make, ~10 to fault in)
        self.dup_pages = [page(K_DUP, seed, r) for r in range(self.k)] if 0 < self.k <= DUP_CACHE else []

    def _vm_class(self, i: int) -> int:
        r = _mix(self.seed * 1_000_003 + i) % 100
        return 0 if r < 55 else 1 if r < 70 else 2 if r < 92 else 3  # base, zero, unique, volatile

    def volatile(self, i: int) -> bool:
        return self.name == "volatile" or (self.name == "vm" and self._vm_class(i) == 3)

    def content(self, i: int, version: int = 0) -> bytes:
        n, s = self.name, self.seed
        if n == "identical":
            return page(K_SAME, s, 0)
        if n == "zero":
            return ZERO
        if n == "unique":
            return page(K_UNIQUE, s, self.wno, i)
        if n == "dup":
            return self.dup_pages[i % self.k] if self.dup_pages else page(K_DUP, s, i % self.k)
        if n == "volatile":
            return page(K_VOL, s, self.wno, i, version)
        c = self._vm_class(i)
        if c == 0:
            return page(K_BASE, s, i)
        if c == 1:
            return ZERO
        if c == 2:
            return page(K_UNIQUE, s, self.wno, i)
        return page(K_VOL, s, self.wno, i, version)


def split_fork(spec: str) -> tuple[str, int]:
    """``W+fork`` or ``W+fork:MS``: (W, the fork period in ms); (spec, 0)
    for a workload that does not fork."""
    base, plus, tail = spec.partition(FORK)
    if not plus:
        return spec, 0
    if not tail:
        return base, FORK_MS
    ms = tail[1:]
    if tail[:1] != ":" or not (ms.isascii() and ms.isdigit()) or int(ms) < 1:
        raise UksmError(f"bad workload {spec!r}: {FORK} or {FORK}:MS, MS a whole number of "
                        f"milliseconds >= 1", 2)
    return base, int(ms)



def fork_child(spec: str) -> tuple[str, int]:
    """What a ``W+fork:MS`` worker's forked child runs: W (a child does
    not fork), and its life in ms (``CHILD_LIFE`` fork periods, then it
    exits on its own)."""
    workload, fork_ms = split_fork(spec)
    return workload, CHILD_LIFE * fork_ms

def validate(spec: str) -> str:
    Workload(spec, 0, 0)
    return spec
