"""Scheduling points: where a controlled run takes the CPU away.

In a normal run nothing here does anything: ``ON`` is False and every call
site tests it first (``if sched.ON: sched.point(...)``), one module
attribute load on the paths that have a point at all (the lock protocol's
C core tests a pointer instead: ``Task.sched``, as it does for lockdep).

In a controlled run (``uksm.explore``) every emulated process -- ksmd, a
task, the writer of ``run``, the supervisor's recovery and reapers -- runs
only when the scheduler says so, one at a time.  At each point the process
publishes where it is (the point's code and an argument: a lock id, a page
number) and may park; the scheduler resumes one of the parked processes.
The scheduler lives above the kernel (``uksm.explorer.gate`` installs the
hooks below, and decides which points park: docs/EXPLORE.md); the kernel
only names its points:

- every lock operation of the lock protocol: before ``lock``, ``trylock``
  and ``unlock``; a wait that would block is not a real ``sem_wait`` but
  ``blocked(BLK_LOCK, lock id)``: the process stays parked, disabled,
  until the lock has a free unit (CHESS's model of a blocking primitive)
  -- so "every live process blocked" is a deadlock the scheduler sees at
  once;
- the other waits (``blocked``): the allocator's for free frames
  (``BLK_FRAMES``), ksmd's idle wait for work (``BLK_KSMD_IDLE``), a
  scripted task's for its next command (``BLK_CMD``), a delay point's
  barrier (``BLK_DELAY``), a forking task's for the process table's
  answer (``BLK_FORK``); and ``sleep``: ksmd's ``sleep_millisecs``, a
  worker's idle, in the run's logical time (``BLK_TIME``);
- where a word is read or written outside the lock that protects it:
  ksmd's scan and the unmerge per page (``ksmd_page``, ``unmerge_page``:
  mm_users, the PTE, the page), the exit before ``free_pgtables`` (the VMA
  table and the page tables);
- a reaper before it reads a dead task's lock entries (``recover``); a
  process about to SIGKILL itself at a kill point (``signal``);
- syscall entry and return (``syscall``, ``syscall_ret``);
- the fault's, the COW break's and the exit's commit points
  (``fault_commit``, ``cow_commit``, ``exit_users0``, ``exit_zapped``,
  ``exit_pgtables``);
- every kill point and delay point (``kp:<name>``).

Wall clocks have no meaning in a controlled run: a sleep is a yield on
the run's clock, a blocked wait has no slices and no deadline, a delay
point is a barrier, and the hung-task watchdog is replaced by the
scheduler's deadlock check (docs/EXPLORE.md).
"""
from __future__ import annotations

from collections.abc import Callable

ON = False

# the point names, by code (a schedule string and the trace carry codes;
# 0 and 1 stand for a process's start and its end)
POINTS: tuple[str, ...] = (
    "start", "exit",
    "lock", "trylock", "unlock", "blocked", "signal", "recover",
    "ksmd_page", "unmerge_page", "free_pgtables",
    "syscall", "syscall_ret", "fault_commit", "cow_commit",
    "exit_users0", "exit_zapped", "exit_pgtables",
)
CODE = {n: i for i, n in enumerate(POINTS)}


def add_points(names: list[str]) -> None:
    """More point names (``uksm.kernel.killpoints`` adds ``kp:<name>`` for
    each of its points, at its import: codes follow the list above)."""
    global POINTS
    new = [n for n in names if n not in CODE]
    for n in new:
        CODE[n] = len(POINTS) + new.index(n)
    POINTS = POINTS + tuple(new)

# what a parked, disabled process waits for (the scheduler evaluates it):
# a lock's free unit, free frames, work for ksmd, the logical clock (a
# sleep), a command (a scripted task), a delay point's barrier
# (released when nothing else can run), and ksmd's service of a failed
# run=2 (ksm.ksmd_remove_rmap_items: the writer waits, holding the mutex);
# a forking task's wait for the process table's answer in its row (T_FORK
# no longer ``a``: uksm.kernel.fork's FORK_ASK and FORK_DONE)
BLK_NONE, BLK_LOCK, BLK_FRAMES, BLK_KSMD_IDLE, BLK_TIME, BLK_CMD, BLK_DELAY, BLK_UNMERGE, BLK_FORK = range(9)

_point: Callable[[int, int], None] | None = None
_blocked: Callable[[int, int, int], None] | None = None
_signal: Callable[[int, int], bool] | None = None
_sleep: Callable[[int], None] | None = None
_clock: Callable[[], int] | None = None


def install(point_fn: Callable[[int, int], None], blocked_fn: Callable[[int, int, int], None],
            signal_fn: Callable[[int, int], bool], sleep_fn: Callable[[int], None],
            clock_fn: Callable[[], int]) -> None:
    """The controller's child side: this process is scheduled from now on."""
    global ON, _point, _blocked, _signal, _sleep, _clock
    _point, _blocked, _signal, _sleep, _clock = point_fn, blocked_fn, signal_fn, sleep_fn, clock_fn
    ON = True


def point(name: str, arg: int = 0) -> None:
    """A scheduling point: park here until the scheduler resumes us."""
    if ON and _point is not None:
        _point(CODE[name], arg)


def blocked(kind: int, a: int = 0, b: int = 0) -> None:
    """Park disabled until the condition (kind, a, b) holds; the caller
    looks again when resumed (a wait loop, as after a wake-up)."""
    if ON and _blocked is not None:
        _blocked(kind, a, b)


def sleep(ms: int) -> None:
    """Sleep ``ms`` milliseconds of the run's logical time (ksmd's
    sleep_millisecs, a worker's idle): others run meanwhile, and the clock
    moves on only when nothing else can (docs/EXPLORE.md, "Time")."""
    if ON and _sleep is not None:
        _sleep(ms)


def now() -> int:
    """The run's logical clock, in milliseconds (0 when not controlled)."""
    return _clock() if ON and _clock is not None else 0


def signal(pid: int, signo: int) -> bool:
    """Deliver ``signo`` to ``pid`` at this step (a controlled run makes
    the target's handler effect part of this step, not of whenever the host
    runs it).  False: not controlled, the caller sends it itself."""
    return bool(ON and _signal is not None and _signal(pid, signo))


__all__ = ["ON", "POINTS", "CODE", "BLK_NONE", "BLK_LOCK", "BLK_FRAMES", "BLK_KSMD_IDLE",
           "BLK_TIME", "BLK_CMD", "BLK_DELAY", "BLK_UNMERGE", "BLK_FORK", "add_points", "install", "point",
           "blocked", "sleep", "now", "signal"]
