"""The gate: one process runs at a time, the others are parked.

Every process of a controlled run has a *slot*: a row of words in a shared
anonymous mapping (made before the first fork, so every child inherits it)
and a gate semaphore.  At a scheduling point (``uksm.kernel.sched``) the
process writes where it is into its slot -- the point's code and argument,
or what it is blocked on --, posts the controller's semaphore and waits on
its own gate.  The controller reads the slot, chooses the next process and
posts that one's gate.  A round trip is two semaphore operations and a few
word stores (6 us here, against ~60 us for a pipe round trip with the
pickling a message needs).

The semaphores are named only for the instant of their creation: they are
unlinked at once, every process keeps its mapping (a fork inherits it), and
nothing is left in /dev/shm whatever happens to the explorer.
"""
from __future__ import annotations

import mmap
import os
import signal
from typing import Any, Callable

import posix_ipc

from uksm.kernel import sched

MAXP = 48           # processes of one run (tasks, ksmd and its restarts, writers, reapers)
SLOT = 16           # words per slot
G_FREE = MAXP * SLOT   # the global word: 1 while the run is in its setup (no choices)
ERR = 512           # bytes of error text per slot

# slot words
S_STATE, S_CODE, S_ARG, S_BLK, S_BA, S_BB, S_K, S_PID, S_STATUS = range(9)
# states
FREE, RUNNING, PARKED, BLOCKED, EXITED = range(5)
# points that park even in the setup: a choice of the default policy
# (a yield), the explorer's own step (a signal to deliver), the start
MUST_PARK = frozenset({sched.CODE["start"], sched.CODE["signal"], *sched.YIELDS})
ZONE = 4   # layout.C_ALLOC: zone_lock's class


class Gate:
    """The slots and semaphores of one explorer (reused by every run)."""

    def __init__(self) -> None:
        words = MAXP * SLOT + 8
        self.mem = mmap.mmap(-1, words * 8 + MAXP * ERR)
        self.w = memoryview(self.mem)[:words * 8].cast("q")
        self.err = memoryview(self.mem)[words * 8:]
        tag = f"/uksm-gate.{os.getpid()}.{id(self) & 0xffffff:x}"
        self.ctl = self._sem(f"{tag}.ctl")
        self.gates = [self._sem(f"{tag}.{i}") for i in range(MAXP)]

    @staticmethod
    def _sem(name: str) -> posix_ipc.Semaphore:
        s = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
        s.unlink()  # our mapping (and every fork's) stays; no name is left behind
        return s

    def reset(self) -> None:
        """Before a run: every slot free, every semaphore at 0."""
        for i in range(len(self.w)):
            self.w[i] = 0
        self.err[:] = bytes(len(self.err))   # (a stale error would be read as this run's)
        for s in [self.ctl, *self.gates]:
            while True:
                try:
                    s.acquire(0)
                except posix_ipc.BusyError:
                    break

    def close(self) -> None:
        for s in [self.ctl, *self.gates]:
            s.close()
        self.w.release()
        self.err.release()
        self.mem.close()

    # ---- the child's side --------------------------------------------------------
    def child_hooks(self, slot: int) -> "ChildSide":
        return ChildSide(self, slot)

    # ---- the controller's side ----------------------------------------------------------
    def word(self, slot: int, f: int) -> int:
        return self.w[slot * SLOT + f]

    def set_word(self, slot: int, f: int, v: int) -> None:
        self.w[slot * SLOT + f] = v

    def error(self, slot: int) -> str:
        raw = bytes(self.err[slot * ERR:(slot + 1) * ERR])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def resume(self, slot: int) -> None:
        self.w[slot * SLOT + S_STATE] = RUNNING
        self.gates[slot].release()

    def wait_parked(self, slot: int, pid: int, alive: Callable[[], bool]) -> None:
        """Wait until the running process parks, blocks or exits.  A death
        without a word (a bug, a signal from outside) is seen by polling
        ``alive`` every second: the slot then says EXITED, status -1."""
        while True:
            try:
                self.ctl.acquire(1.0)
                return
            except posix_ipc.BusyError:
                if not alive():
                    self.w[slot * SLOT + S_STATE] = EXITED
                    self.w[slot * SLOT + S_STATUS] = -1
                    return
            except posix_ipc.SignalError:
                continue


class ChildSide:
    """A scheduled process's end of its slot: the hooks ``sched.install``
    and the task's lock protocol call."""

    def __init__(self, gate: Gate, slot: int) -> None:
        self.gate = gate
        self.slot = slot
        self.b = slot * SLOT
        self.my_gate = gate.gates[slot]

    def _park(self, state: int) -> None:
        w, b = self.gate.w, self.b
        w[b + S_K] += 1
        w[b + S_STATE] = state
        self.gate.ctl.release()
        while True:
            try:
                self.my_gate.acquire()
                return
            except posix_ipc.SignalError:  # a handler ran (the scheduler's signal): wait on
                continue

    def point(self, code: int, arg: int) -> None:
        w, b = self.gate.w, self.b
        if w[G_FREE] and code not in MUST_PARK:
            # the setup: no choice is made here, and the default goes on
            # with the running process -- pass the point without parking
            w[b + S_K] += 1
            return
        w[b + S_CODE] = code
        w[b + S_ARG] = arg
        w[b + S_BLK] = sched.BLK_NONE
        self._park(PARKED)

    def blocked(self, kind: int, a: int, bb: int) -> None:
        w, b = self.gate.w, self.b
        w[b + S_CODE] = sched.CODE["blocked"]
        w[b + S_ARG] = a if kind == sched.BLK_LOCK else -kind   # (the trace: what it waits for)
        w[b + S_BLK] = kind
        w[b + S_BA] = a
        w[b + S_BB] = bb
        self._park(BLOCKED)

    def signal(self, pid: int, signo: int) -> bool:
        """The scheduler delivers it at this point (see World.deliver)."""
        self.point(sched.CODE["signal"], pid << 8 | signo)
        return True

    def lock_hook(self, op: str, lk: Any) -> None:
        """Task.sched: the lock protocol's points.  zone_lock's are passed
        without parking: its critical sections hold no scheduling point
        but the kill point zone_lock_held, so no process ever finds it
        taken, and a switch just before or after one is the same as a
        switch at the process's previous point (docs/EXPLORE.md)."""
        if op == "blocked":
            self.blocked(sched.BLK_LOCK, lk.lid, 0)
        elif lk.cls == ZONE:
            self.gate.w[self.b + S_K] += 1
        else:
            self.point(sched.CODE[op], lk.lid)

    def install(self) -> None:
        sched.install(self.point, self.blocked, self.signal)

    def exit(self, status: int, error: str = "") -> None:
        """The last word: the status, the error text; then the caller _exits."""
        w, b = self.gate.w, self.b
        if error:
            raw = error.encode(errors="replace")[:ERR - 1] + b"\0"
            self.gate.err[self.slot * ERR:self.slot * ERR + len(raw)] = raw
        w[b + S_STATUS] = status
        w[b + S_STATE] = EXITED
        self.gate.ctl.release()


def fork_child(gate: Gate, slot: int, body: Callable[[ChildSide], int]) -> int:
    """fork a scheduled process on ``slot``; it parks at its "start" point
    before ``body`` runs, and says its status in its slot before _exit.
    The parent dies, the child dies (PR_SET_PDEATHSIG, as the lifeline):
    a controlled run's processes never outlive their explorer."""
    gate.w[slot * SLOT + S_STATE] = RUNNING
    pid = os.fork()
    if pid:
        gate.w[slot * SLOT + S_PID] = pid
        return pid
    status, error = 1, ""
    side = gate.child_hooks(slot)
    try:
        from uksm.host.lifeline import set_pdeathsig
        set_pdeathsig(signal.SIGKILL)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(s, signal.SIG_DFL)
        side.install()
        side.point(sched.CODE["start"], 0)
        status = body(side)
    except BaseException as e:  # noqa: BLE001 -- reported to the controller as this task's end
        import traceback
        error = str(e) if hasattr(e, "status") else "".join(
            traceback.format_exception_only(type(e), e)).strip()
        tb = traceback.extract_tb(e.__traceback__)
        if tb and not hasattr(e, "status"):
            error += f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name})"
        status = getattr(e, "status", 1)
    finally:
        try:
            side.exit(status, error)
        finally:
            os._exit(status & 0xff)
    raise AssertionError("unreachable")
