"""A programmable task: a worker that takes its orders from a script.

It is a worker in every way that matters to the emulated kernel (the
``Worker`` of ``worker.py``: its own task row and address space, the MMU,
the system calls, the fatal-signal handling, the one exit path
``Worker.exit_task``), but instead of a canned workload it runs commands
that arrive on a socket (``--cmd-fd``, one end of a socketpair its
supervisor keeps): one JSON object per line, one answer per command.
``uksm.proc.scripting`` (the supervisor's side) validates every command before
it gets here; the API (``uksm.api``) and the shell verbs (``uksm task``)
are its users.

Addresses in commands are byte offsets into the task's one mapping of
``--pages`` pages (its ``mmap`` at ``base``).  The task keeps, in
``shadow``, what each page should hold, so ``verify`` and the exit check
its data as the built-in workers do.

Fatal signals are noticed between two commands (the safe point), as a
worker notices them between two page operations: SIGTERM then exits
through the exit path; SIGKILL leaves the exit to the supervisor's reaper.

``fork`` makes a child task (``Worker.fork``: the supervisor's new task,
``uksm.kernel.fork.dup_mm``'s copy); the answer carries this task's shadow,
which the supervisor hands the child as the first line on its own socket:
a task started ``--forked`` waits for it before it says it is ready.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import select
import socket
import sys
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from uksm.workers.worker import Worker, parser

from uksm.errors import SegFault, SyscallError, UksmError
from uksm.host import log as ulog
from uksm.host.lifeline import EXIT_ORPHAN, arm, exit_now
from uksm.kernel.cluster import StaleCluster
from uksm.kernel.fork import ERESTARTNOINTR
from uksm.kernel.killpoints import FORK_POINTS
from uksm.kernel.layout import (
    EXIT_PATHS,
    M_FLAGS,
    MMF_VM_MERGEABLE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    T_EXIT_PATH,
    T_MISMATCHES,
    T_READY,
    VM_MERGEABLE,
)
from uksm.kernel.memory import OutOfMemory
from uksm.kernel.syscalls import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    KsmInterrupted,
    sys_madvise,
    sys_mmap,
    sys_prctl,
)

ADVICE = {"MERGEABLE": MADV_MERGEABLE, "UNMERGEABLE": MADV_UNMERGEABLE, "DONTNEED": MADV_DONTNEED}
EXIT_POINTS = ("ksm_exit_before_down_write", "ksm_exit_mmap_sem_write", "exit_mid_zap")
IDLE_POLL_S = 0.05   # how often an idle task looks for a pending fatal signal


class NotReached(Exception):
    """A drive to a kill point found no way to reach it from this state."""


class ForkFailed(Exception):
    """fork returned -errno.  The task lives on, but after -ERESTARTNOINTR
    (a fatal signal is pending) it exits at its next safe point."""

    def __init__(self, err: int) -> None:
        self.errno = -err
        name = "ERESTARTNOINTR" if self.errno == ERESTARTNOINTR else errno.errorcode.get(self.errno, "?")
        why = ("a fatal signal is pending" if self.errno == ERESTARTNOINTR
               else os.strerror(self.errno))
        super().__init__(f"fork failed: {name} ({why})")


class SyscallFailed(Exception):
    """A system call the script sees as the OSError the C library's
    wrapper raises (prctl): -errno, the task lives on."""

    def __init__(self, e: SyscallError) -> None:
        self.errno = getattr(errno, e.errno_name)
        super().__init__(str(e))


class SocketChannel:
    """The supervisor's commands on a socket (``--cmd-fd``): one JSON
    object per line each way."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            pass  # the supervisor went away: the exit still runs

    def recv(self, dying: Callable[[], bool]) -> dict[str, Any] | None:
        """The next command; None at EOF (the supervisor closed its end:
        exit, as a task whose session leader went away) or when
        ``dying()`` (a fatal signal is pending)."""
        while b"\n" not in self.buf:
            if dying():
                return None
            r, _, _ = select.select([self.sock], [], [], IDLE_POLL_S)
            if not r:
                continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        cmd = json.loads(line)
        return cmd if isinstance(cmd, dict) else {}


class Channel(Protocol):
    """Where a scripted task's commands come from and its answers go: a
    socket (``SocketChannel``), or a controlled run's slot (uksm.explore)."""

    def send(self, obj: dict[str, Any]) -> None: ...

    def recv(self, dying: Callable[[], bool]) -> dict[str, Any] | None: ...


class ScriptedTask(Worker):
    def __init__(self, a: Any, chan: Channel) -> None:
        super().__init__(a)
        self.chan = chan
        self.shadow = bytearray(a.pages * PAGE_SIZE)
        self.known = not a.forked   # a forked task knows its pages once its parent's shadow came
        self.exited = False

    # what page i should hold: the script's writes (Worker.verify reads this)
    def expected(self, i: int) -> bytes | None:
        if not self.known:
            return None   # a forked task whose parent's shadow never came: nothing to check
        return bytes(self.shadow[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    def send(self, obj: dict[str, Any]) -> None:
        self.chan.send(obj)

    def recv(self) -> dict[str, Any] | None:
        return self.chan.recv(self.dying)

    # ---- the commands --------------------------------------------------------------------
    def _madvise(self, first: int, count: int, advice: int) -> int:
        # a pending fatal signal interrupts an unmerge (-ERESTARTSYS)
        n = sys_madvise(self.cl, self.mm, self.alloc, self.base + first * PAGE_SIZE,
                        count * PAGE_SIZE, advice, self.log, stop=self.dying)
        if advice == MADV_DONTNEED:  # the pages read as zeros from now on
            self.shadow[first * PAGE_SIZE:(first + count) * PAGE_SIZE] = bytes(count * PAGE_SIZE)
        return n

    def _write(self, off: int, data: bytes) -> None:
        self.mmu.write(self.base + off, data)
        self.shadow[off:off + len(data)] = data

    def _rewrite(self, first: int, count: int = 1) -> None:
        """Write pages back with what they hold (a fault, a COW break)."""
        self._write(first * PAGE_SIZE, bytes(self.shadow[first * PAGE_SIZE:(first + count) * PAGE_SIZE]))

    def _pte(self, i: int) -> int:
        return self.mm.pq[PT_OFF + (self.base // PAGE_SIZE) + i]

    def do(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("cmd")
        if op == "fill":
            page = base64.b64decode(cmd["page"])
            for i in range(cmd["first"], cmd["first"] + cmd["count"]):
                self._write(i * PAGE_SIZE, page)
            return {}
        if op == "write":
            self._write(cmd["addr"], base64.b64decode(cmd["data"]))
            return {}
        if op == "read":
            data = self.mmu.read(self.base + cmd["addr"], cmd["n"])
            return {"data": base64.b64encode(data).decode()}
        if op == "madvise":
            return {"unmerged": self._madvise(cmd["first"], cmd["count"], ADVICE[cmd["advice"]])}
        if op == "verify":
            self.verify()
            return {"pages": self.a.pages, "mismatches": self.q[self.tb + T_MISMATCHES]}
        if op == "exit":
            return self.exit_now()
        if op == "drive":
            return self.drive(cmd["point"])
        if op == "fork":
            return self.fork_cmd()
        if op == "prctl":
            try:   # a pending fatal signal interrupts PR_SET_MEMORY_MERGE 0's unmerge
                a2, a3, a4, a5 = cmd["args"]
                return {"ret": sys_prctl(self.cl, self.mm, self.alloc, cmd["option"], a2, a3, a4, a5,
                                         log=self.log, stop=self.dying)}
            except KsmInterrupted:
                raise
            except SyscallError as e:
                raise SyscallFailed(e) from None
        raise ValueError(f"unknown command {op!r}")

    def fork_cmd(self) -> dict[str, Any]:
        """fork: the child's pid and task row, and our shadow for it (what
        each page holds: the child's pages are ours)."""
        pid, crow = self.fork()
        if pid < 0:
            raise ForkFailed(pid)
        return {"pid": pid, "row": crow,
                "shadow": base64.b64encode(zlib.compress(bytes(self.shadow), 1)).decode()}

    def exit_now(self) -> dict[str, Any]:
        self.exit_task()
        self.exited = True
        q = self.q
        return {"exited": True, "path": EXIT_PATHS[q[self.tb + T_EXIT_PATH]],
                "mismatches": q[self.tb + T_MISMATCHES]}

    def drive(self, point: str) -> dict[str, Any]:
        """Do what passes kill point ``point`` (armed in this task's row by
        the supervisor just before): the task dies there (SIGKILL), or
        notices the signal at its next safe point (SIGTERM).  Returns when
        it got through alive: the point was not on the way."""
        n = self.a.pages
        if point in EXIT_POINTS:
            return self.exit_now()
        if point == "fault_after_alloc":       # a write fault on a page not present
            if self._pte(0) & PTE_PRESENT:
                self._madvise(0, 1, MADV_DONTNEED)
            self._rewrite(0)
        elif point == "cow_after_copy":        # a write to a write-protected (KSM) page
            ro = [i for i in range(n) if self._pte(i) & PTE_PRESENT and not self._pte(i) & PTE_WRITE]
            if not ro:
                raise NotReached("no write-protected (merged) page to break COW on: wait until "
                                 "ksmd has merged some of its pages")
            self._rewrite(ro[0])
        elif point == "zone_lock_held":        # DONTNEED frees present frames under zone_lock
            if not self._pte(0) & PTE_PRESENT:
                self._rewrite(0)
            keep = bytes(self.shadow[:PAGE_SIZE])
            self._madvise(0, 1, MADV_DONTNEED)
            self._write(0, keep)
        elif point == "pte_lock_held":         # a user write across two present pages
            if n < 2:
                raise NotReached("needs a task of at least 2 pages (a write across two pages)")
            self._rewrite(0)
            self._rewrite(1)
            self._rewrite(0, 2)
        elif point == "madvise_mmap_sem_write":  # madvise on one page (a VMA split), no change
            vma = self.mm.find_vma(self.base // PAGE_SIZE)
            merg = vma is not None and bool(vma[3] & VM_MERGEABLE)
            self._madvise(0, 1, MADV_MERGEABLE if merg else MADV_UNMERGEABLE)
        elif point in FORK_POINTS:              # a fork (inside dup_mm), with a page to copy
            if not self._pte(0) & PTE_PRESENT:
                self._rewrite(0)
            pid, crow = self.fork()
            if pid < 0:
                return {"reached": False}   # SIGTERM there: the fork was undone (ERESTARTNOINTR)
            return {"reached": False, "forked_row": crow}   # got through: a child nobody adopts
        elif point == "ksm_enter_locked":       # the first MADV_MERGEABLE
            if self.q[self.mm.base + M_FLAGS] & MMF_VM_MERGEABLE:
                raise NotReached("the task went through __ksm_enter already (it was made "
                                 "mergeable); create it with mergeable=False")
            self._madvise(0, n, MADV_MERGEABLE)
        else:
            raise NotReached(f"{point} is not a point a task passes")
        return {"reached": False}

    # ---- the life of the task ---------------------------------------------------------------
    def run(self) -> int:
        try:
            if self.a.forked:  # our parent's copy: its shadow comes first
                self.base = self.mapping_base()
                first = self.recv()
                if first is None:
                    return self.exit_task()
                self.shadow[:] = zlib.decompress(base64.b64decode(first["shadow"]))
                self.known = True
            else:
                self.base = sys_mmap(self.cl, self.mm, self.a.pages * PAGE_SIZE)
                if self.a.mergeable:
                    sys_madvise(self.cl, self.mm, self.alloc, self.base, self.a.pages * PAGE_SIZE,
                                MADV_MERGEABLE, self.log)
        except OutOfMemory:
            self.send({"ok": False, "kind": "oom", "error": "out of memory while starting"})
            return self.exit_task()
        self.q[self.tb + T_READY] = 1
        self.send({"ok": True, "base": self.base})
        while not self.exited:
            cmd = self.recv()
            if cmd is None:
                break
            try:
                ans = {"ok": True, **self.do(cmd)}
            except SegFault as e:
                ans = {"ok": False, "kind": "segfault", "error": str(e)}
            except KsmInterrupted as e:  # the signal is pending: the task dies at once
                ans = {"ok": False, "kind": "segfault", "error": f"madvise: {e}"}
            except NotReached as e:
                ans = {"ok": False, "kind": "not_reached", "error": str(e)}
            except (ForkFailed, SyscallFailed) as e:
                ans = {"ok": False, "kind": "errno", "errno": e.errno, "error": str(e)}
            except OutOfMemory:
                self._fatal_oom()
                ans = {"ok": False, "kind": "oom", "error": "killed by the OOM killer"}
            except (KeyError, ValueError, TypeError) as e:
                ans = {"ok": False, "kind": "value", "error": f"bad command: {e!r}"}
            self.send(ans)
        if not self.exited:
            self.exit_task()
        return 0

    def _fatal_oom(self) -> None:
        from uksm.kernel import oom
        self._fatal(oom.OOM_SIGNAL, None)


def main(argv: list[str] | None = None) -> int:
    ap = parser("uksm-task", "a programmable task (started by the supervisor for a script)")
    ap.add_argument("--cmd-fd", type=int, required=True, help="the command socket")
    ap.add_argument("--no-mergeable", dest="mergeable", action="store_false")
    a = ap.parse_args(argv)
    arm()  # die with the supervisor
    chan = socket.socket(fileno=a.cmd_fd)
    try:
        return ScriptedTask(a, SocketChannel(chan)).run()
    except StaleCluster as e:
        print(f"uksm-task: {e}", file=sys.stderr)
        return EXIT_ORPHAN
    except UksmError as e:
        print(f"uksm-task: {e}", file=sys.stderr)
        return 1
    finally:
        chan.close()
        ulog.close()


if __name__ == "__main__":
    exit_now(main())  # uksm.host.lifeline: no finalization
