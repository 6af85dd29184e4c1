"""The gate: one process runs at a time, the others are parked.

Every process of a controlled run sits in a *slot*: a row of words in a
shared anonymous mapping (made before the first fork, so every child
inherits it), a gate semaphore, and two byte areas -- what the explorer
asks of the process (its assignment, a task's next command) and what it
answers.  At a scheduling point (``uksm.kernel.sched``) the process
writes where it is into its slot -- the point's code and argument, or
what it is blocked on --, posts the explorer's semaphore and waits on its
own gate.  The explorer reads the slot, chooses the next process and posts
that one's gate.  A round trip is two semaphore operations and a few word
stores (6 us here, against ~60 us for a pipe round trip with the pickling
a message needs).

The slots' processes are a *pool*, reused from one run to the next.  A
pool process is a ``fork`` of the explorer (which has imported
everything); it waits for an assignment -- "be ksmd of cluster C on task
row R", "be task t2" -- attaches to that run's cluster by name, runs the
role's body, says its status in its slot and waits for the next one.  A
fresh fork costs ~1,000 copy-on-write faults in the child as it touches
the interpreter's pages (10 ms of CPU a process, measured: most of a
schedule's cost); a reused process has them private already.  A process
the run kills (a SIGKILL choice, a run that ends stuck) is replaced by a
new fork when its slot is next needed.  The pool dies with the explorer
(``PR_SET_PDEATHSIG``, as the lifeline).

Which points park is the reduction (docs/EXPLORE.md, "Why these points
suffice"): each point code has a mode -- ``VISIBLE`` (an operation another
process can tell the order of: a lock taken, a lockless shared word read
or written, a wait), ``MUST`` (parks even in the setup: a sleep, a signal
to deliver), ``KILL`` (a kill point: parks only while the run may still
choose a SIGKILL) or ``PASS`` (never parks: the process goes on).

The semaphores are named only for the instant of their creation: they are
unlinked at once, every process keeps its mapping (a fork inherits it), and
nothing is left in /dev/shm whatever happens to the explorer.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
from collections.abc import Callable
from typing import Any

import posix_ipc

from uksm.kernel import sched

MAXP = 256          # processes of one run (tasks, ksmd and its restarts, writers, reapers):
                    # a deterministic inject's replacements and reapers count (two a kill)
SLOT = 16           # words per slot
GLOBAL = MAXP * SLOT   # the global words follow the slots
G_FREE, G_KILLS, G_CLOCK, G_NSIG = range(GLOBAL, GLOBAL + 4)
G_SIGS = GLOBAL + 8      # signals sent to other processes in this step: (pid << 8 | signo) each
NSIGS = 16
ERR = 512           # bytes of error text per slot
IO = 1 << 16        # bytes each way per slot (assignments, commands, answers)

# slot words
(S_STATE, S_CODE, S_ARG, S_BLK, S_BA, S_BB, S_K, S_PID, S_STATUS, S_IN, S_INLEN, S_OUT, S_OUTLEN,
 S_SIG, S_KP) = range(15)   # S_KP: the last kill point passed in this step (the trace names windows by it)
# states: FREE (no process), IDLE (a pool process waiting for its next
# assignment), RUNNING, PARKED, BLOCKED, EXITED (its body has returned:
# it waits for an assignment again)
FREE, IDLE, RUNNING, PARKED, BLOCKED, EXITED = range(6)

# point modes
PASS, VISIBLE, MUST, KILL = range(4)
_MODE = {
    "start": PASS, "exit": PASS,
    "lock": VISIBLE, "trylock": VISIBLE, "unlock": VISIBLE, "blocked": MUST, "signal": MUST,
    "recover": VISIBLE, "ksmd_page": VISIBLE, "unmerge_page": VISIBLE, "free_pgtables": VISIBLE,
    "syscall": PASS, "syscall_ret": PASS, "fault_commit": PASS, "cow_commit": PASS,
    "exit_users0": PASS, "exit_zapped": PASS, "exit_pgtables": PASS,
}
ZONE, MMLIST = 4, 5   # layout.C_ALLOC, C_MMLIST: zone_lock's and ksm_mmlist_lock's classes


def modes() -> bytes:
    """Each point code's mode (kill points ``kp:*``: KILL)."""
    return bytes(_MODE.get(n, KILL if n.startswith("kp:") else VISIBLE) for n in sched.POINTS)


class Gate:
    """The slots, semaphores and pool of one explorer (reused by every run)."""

    def __init__(self) -> None:
        words = G_SIGS + NSIGS
        self.mem = mmap.mmap(-1, words * 8 + MAXP * (ERR + 2 * IO))
        self.w = memoryview(self.mem)[:words * 8].cast("q")
        self.err = memoryview(self.mem)[words * 8:words * 8 + MAXP * ERR]
        self.io = memoryview(self.mem)[words * 8 + MAXP * ERR:]
        tag = f"/uksm-gate.{os.getpid()}.{id(self) & 0xffffff:x}"
        self.ctl = self._sem(f"{tag}.ctl")
        self.gates = [self._sem(f"{tag}.{i}") for i in range(MAXP)]
        self.modes = modes()
        self.bodies: dict[str, Callable[[dict[str, Any], "ChildSide"], int]] = {}
        self.pid = os.getpid()
        self.used = 0   # slots ever given a process: only these have words to clear or a pid

    @staticmethod
    def _sem(name: str) -> posix_ipc.Semaphore:
        s = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
        s.unlink()  # our mapping (and every fork's) stays; no name is left behind
        return s

    def reset(self) -> None:
        """Before a run: every slot's run words cleared (its process, if
        any, stays in the pool), the globals zeroed."""
        w = self.w
        for slot in range(self.used):
            b = slot * SLOT
            pid, st = w[b + S_PID], w[b + S_STATE]
            for f in range(SLOT):
                w[b + f] = 0
            if pid and st in (IDLE, EXITED):
                w[b + S_PID], w[b + S_STATE] = pid, IDLE
            elif pid:   # a process a run left stuck: it is replaced when next needed
                self._kill(slot, pid)
            self.err[slot * ERR] = 0
        for g in (G_FREE, G_KILLS, G_CLOCK, G_NSIG):
            w[g] = 0
        while True:
            try:
                self.ctl.acquire(0)
            except posix_ipc.BusyError:
                break

    def close(self) -> None:
        for slot in range(self.used):
            pid = self.w[slot * SLOT + S_PID]
            if pid:
                self._kill(slot, pid)
        for s in [self.ctl, *self.gates]:
            s.close()
        self.w.release()
        self.err.release()
        self.io.release()
        self.mem.close()

    def _kill(self, slot: int, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        b = slot * SLOT
        self.w[b + S_PID] = 0
        self.w[b + S_STATE] = FREE
        while True:   # a post meant for the dead one must not wake its successor
            try:
                self.gates[slot].acquire(0)
            except posix_ipc.BusyError:
                break

    # ---- the explorer's side ----------------------------------------------------------------
    def word(self, slot: int, f: int) -> int:
        return self.w[slot * SLOT + f]

    def set_word(self, slot: int, f: int, v: int) -> None:
        self.w[slot * SLOT + f] = v

    def error(self, slot: int) -> str:
        raw = bytes(self.err[slot * ERR:(slot + 1) * ERR])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def put(self, slot: int, obj: Any) -> None:
        """What the explorer asks of the process (an assignment, a
        command): JSON in the slot's in-area, S_IN bumped."""
        raw = json.dumps(obj).encode()
        if len(raw) > IO:
            raise ValueError(f"a command of {len(raw)} bytes (at most {IO})")
        o = slot * 2 * IO
        self.io[o:o + len(raw)] = raw
        b = slot * SLOT
        self.w[b + S_INLEN] = len(raw)
        self.w[b + S_IN] += 1

    def answer(self, slot: int) -> Any:
        b = slot * SLOT
        o = slot * 2 * IO + IO
        return json.loads(bytes(self.io[o:o + self.w[b + S_OUTLEN]]))

    def assign(self, slot: int, role: str, args: dict[str, Any]) -> int:
        """Give ``slot``'s pool process (forked now if it has none) its
        role in this run; it runs the role's body up to its first parking
        point.  Returns its pid."""
        b = slot * SLOT
        self.used = max(self.used, slot + 1)
        if not self.w[b + S_PID]:
            self._fork(slot)
        self.put(slot, {"role": role, **args})
        self.w[b + S_STATUS] = 0
        self.err[slot * ERR] = 0
        self.resume(slot)
        return int(self.w[b + S_PID])

    def resume(self, slot: int) -> None:
        self.w[slot * SLOT + S_STATE] = RUNNING
        self.w[slot * SLOT + S_KP] = 0
        self.gates[slot].release()

    def wait_parked(self, slot: int) -> None:
        """Wait until the running process parks, blocks or exits.  A death
        without a word (a bug, a signal from outside) is seen by polling
        its pid every second: the slot then says EXITED, status -1, and
        has no process."""
        b = slot * SLOT
        while True:
            try:
                self.ctl.acquire(1.0)
                return
            except posix_ipc.BusyError:
                pid = self.w[b + S_PID]
                try:
                    got, _st = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    got = pid
                if got:
                    self.w[b + S_PID] = 0
                    self.w[b + S_STATE] = EXITED
                    self.w[b + S_STATUS] = -1
                    return
            except posix_ipc.SignalError:
                continue

    def kill(self, slot: int) -> None:
        """SIGKILL the slot's process (a kill choice): it is gone, the
        slot's next use forks another."""
        self._kill(slot, self.w[slot * SLOT + S_PID])

    def _fork(self, slot: int) -> None:
        import gc
        gc.collect()
        gc.freeze()   # the pool's collections never walk (and so never copy) the explorer's objects
        b = slot * SLOT
        self.w[b + S_STATE] = IDLE
        pid = os.fork()
        if pid:
            self.w[b + S_PID] = pid
            return
        _pool_main(self, slot)


def _pool_main(gate: Gate, slot: int) -> None:
    """A pool process: wait for an assignment, run it, say how it ended,
    wait again -- until the explorer kills it or dies."""
    status = 1
    try:
        from uksm.host.lifeline import set_pdeathsig
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != gate.pid:
            os._exit(1)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(s, signal.SIG_DFL)
        side = ChildSide(gate, slot)
        side.install()
        while True:
            side.wait_gate()
            o = slot * 2 * IO
            job = json.loads(bytes(gate.io[o:o + gate.w[slot * SLOT + S_INLEN]]))
            side.cmd_seen = gate.w[slot * SLOT + S_IN]
            status, error = 1, ""
            try:
                status = gate.bodies[job["role"]](job, side)
            except BaseException as e:
                error, status = describe_error(e)
            finally:
                side.reset()
            side.exit(status, error)
    finally:
        os._exit(status & 0xff)


def describe_error(e: BaseException) -> tuple[str, int]:
    """An exception as one line (with where it was raised) and a status."""
    import traceback
    status = getattr(e, "status", 1)
    if hasattr(e, "status"):
        return str(e), status
    error = "".join(traceback.format_exception_only(type(e), e)).strip()
    tb = traceback.extract_tb(e.__traceback__)
    if tb:
        error += f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name})"
    return error, status


class ChildSide:
    """A scheduled process's end of its slot: the hooks ``sched.install``
    and the task's lock protocol call."""

    def __init__(self, gate: Gate, slot: int) -> None:
        self.gate = gate
        self.slot = slot
        self.b = slot * SLOT
        self.my_gate = gate.gates[slot]
        self.modes = gate.modes
        self.cmd_seen = 0
        self.released = False   # ksm_mmlist_lock released since this process last parked

    def wait_gate(self) -> None:
        while True:
            try:
                self.my_gate.acquire()
                break
            except posix_ipc.SignalError:  # wait on
                continue
        sig = self.gate.w[self.b + S_SIG]
        if sig:
            # a signal the explorer delivered at this step: its handler runs
            # now, before this process does anything else (a real signal's
            # handler would run at some later bytecode: not a schedule)
            self.gate.w[self.b + S_SIG] = 0
            h = signal.getsignal(sig)
            if callable(h):
                h(sig, None)

    def _park(self, state: int) -> None:
        w, b = self.gate.w, self.b
        self.released = False
        w[b + S_K] += 1
        w[b + S_STATE] = state
        self.gate.ctl.release()
        self.wait_gate()

    def point(self, code: int, arg: int) -> None:
        w, b = self.gate.w, self.b
        mode = self.modes[code]
        if mode != MUST and (mode == PASS or w[G_FREE] or (mode == KILL and not w[G_KILLS])):
            # no choice is made here: the process goes on (docs/EXPLORE.md)
            w[b + S_K] += 1
            if mode == KILL:
                w[b + S_KP] = code
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

    def sleep(self, ms: int) -> None:
        """A sleep of ``ms`` of the run's logical time: a yield (the others
        go first); when this process is chosen again the clock moves to the
        sleep's end (World._run_one)."""
        self.blocked(sched.BLK_TIME, self.gate.w[G_CLOCK] + max(0, ms), ms)

    def signal(self, pid: int, signo: int) -> bool:
        """The explorer delivers it (World.deliver) as this step ends, before
        anyone else runs: a signal is part of its sender's step.  To this
        process itself (a kill point's SIGKILL): it parks here, to die here."""
        w = self.gate.w
        if pid == os.getpid():
            self.point(sched.CODE["signal"], pid << 8 | signo)
            return True
        n = w[G_NSIG]
        if n >= NSIGS:
            raise RuntimeError("too many signals in one step of a controlled run")
        w[G_SIGS + n] = pid << 8 | signo
        w[G_NSIG] = n + 1
        return True

    def lock_hook(self, op: str, lk: Any) -> None:
        """Task.sched: the lock protocol's points -- before every lock and
        trylock (an acquisition is visible), a blocked wait; an unlock
        passes (a release commutes with everything up to the next
        acquisition), and so does zone_lock, whose sections hold no point
        (docs/EXPLORE.md, "Why these points suffice")."""
        if op == "blocked":
            self.blocked(sched.BLK_LOCK, lk.lid, 0)
        elif op == "unlock":
            # the release of an mm's lock first reads the mm's row without a
            # lock (the use-after-free check); the row is written (the mm
            # freed) only under ksm_mmlist_lock, so after a release of that
            # lock in this step the read is a visible operation of its own
            if lk.mmrow >= 0 and self.released:
                self.point(sched.CODE["unlock"], lk.lid)
            if lk.cls == MMLIST:
                self.released = True
            self.gate.w[self.b + S_K] += 1
        elif lk.cls == ZONE:
            self.gate.w[self.b + S_K] += 1
        else:
            self.point(sched.CODE[op], lk.lid)

    def install(self) -> None:
        sched.install(self.point, self.blocked, self.signal, self.sleep, self.clock)

    def clock(self) -> int:
        return int(self.gate.w[G_CLOCK])

    # ---- commands (a task's) ----------------------------------------------------------------
    def command(self) -> Any:
        """The explorer's next command for this process, or None when none
        has come since the last one."""
        w, b = self.gate.w, self.b
        if w[b + S_IN] == self.cmd_seen:
            return None
        self.cmd_seen = w[b + S_IN]
        o = self.slot * 2 * IO
        return json.loads(bytes(self.gate.io[o:o + w[b + S_INLEN]]))

    def wait_command(self) -> None:
        """Park until a command comes (or a fatal signal: the caller looks)."""
        self.blocked(sched.BLK_CMD, self.cmd_seen, 0)

    def send(self, obj: Any) -> None:
        raw = json.dumps(obj).encode()[:IO]
        o = self.slot * 2 * IO + IO
        self.gate.io[o:o + len(raw)] = raw
        w, b = self.gate.w, self.b
        w[b + S_OUTLEN] = len(raw)
        w[b + S_OUT] += 1

    def reset(self) -> None:
        """Between two runs: default signal handlers, this run's log files
        closed (a body closes its own cluster)."""
        from uksm.host import log as ulog
        from uksm.kernel import oom
        for s in (signal.SIGINT, signal.SIGTERM, oom.OOM_SIGNAL):
            signal.signal(s, signal.SIG_DFL)
        ulog.close()

    def exit(self, status: int, error: str = "") -> None:
        """The body's last word: the status, the error text; then the
        process waits for its next assignment."""
        w, b = self.gate.w, self.b
        if error:
            raw = error.encode(errors="replace")[:ERR - 1] + b"\0"
            self.gate.err[self.slot * ERR:self.slot * ERR + len(raw)] = raw
        w[b + S_STATUS] = status
        w[b + S_STATE] = EXITED
        self.gate.ctl.release()
