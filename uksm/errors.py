"""uksm's exceptions: one hierarchy, defined here and nowhere else.

::

    UksmError                  a user-facing error: one line, an exit status
     ├─ MachineError           what a Machine could not do (the public API's base)
     │   ├─ MachineClosed
     │   ├─ WaitTimeout        (also a TimeoutError)
     │   ├─ HungTask
     │   ├─ TaskExited ── TaskDied
     │   ├─ SegFault           an access outside any VMA (the emulated MMU's too)
     │   │   └─ SyscallError   a system call failed with -errno; the task lives
     │   ├─ IntegrityError
     │   └─ KillPointMissed
     └─ (the process side's own: RequestError, KnobError, ScriptError, OptionError and
         LimitError of uksm.proc.options, StaleCluster of uksm.kernel.cluster)

``UksmError`` is what the CLI prints as ``uksm: MESSAGE`` and exits with
its ``status``; ``MachineError`` is what ``uksm.Machine`` raises (its
subclasses are exported by ``uksm``).  Bad arguments raise the built-in
TypeError, ValueError, KeyError or PermissionError instead.  This module
imports nothing of uksm: every layer, the emulated kernel included, may
raise these.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class UksmError(Exception):
    """A user-facing error: printed as one line, never as a traceback."""

    def __init__(self, msg: str, status: int = 1) -> None:
        super().__init__(msg)
        self.status = status


class MachineError(UksmError):
    """Something a Machine could not do (the base of the public API's
    exceptions).  Bad arguments raise the built-in TypeError, ValueError,
    KeyError or PermissionError instead, and change nothing."""


class MachineClosed(MachineError):
    """The Machine was closed (or its cluster went down)."""


class WaitTimeout(MachineError, TimeoutError):
    """A wait ran out of time; the message names what it waited for."""


class HungTask(MachineError):
    """The hung-task watchdog reported a task blocked too long.
    ``reports``: the watchdog's reports (role, pid, lock, waited_s, and the
    wait-for ``chain``, one line per link)."""

    def __init__(self, msg: str, reports: Sequence[Mapping[str, Any]]) -> None:
        chain = [line for r in reports[:1] for line in r.get("chain", [])]
        super().__init__(msg + ("\n  " + "\n  ".join(chain) if chain else ""))
        self.reports = list(reports)  # uksm.kernel.watchdog.HungReport each
        self.chain = chain


class TaskExited(MachineError):
    """The task has exited (or was killed): it takes no more commands."""


class TaskDied(TaskExited):
    """The task died while running the command (a kill point, the OOM
    killer, a signal); its death was recovered and its exit run."""


class SegFault(MachineError):
    """An access outside any VMA, or a write to a read-only one: the
    emulated MMU and syscalls raise it (handle_mm_fault's VM_FAULT_SIGSEGV,
    madvise's ENOMEM/EINVAL).  Through the API nothing was done and the
    task lives on (uksm reports a segfault to the script instead of
    killing the task, so the script can go on with it)."""


class SyscallError(SegFault):
    """A system call that fails with -errno (mmap, munmap, madvise:
    EINVAL, ENOMEM, EAGAIN); the task lives on.  ``errno_name`` names the
    errno; a script sees it as the SegFault it is, naming the errno."""

    def __init__(self, errno_name: str, msg: str) -> None:
        super().__init__(f"{msg} ({errno_name})")
        self.errno_name = errno_name


class IntegrityError(MachineError):
    """A task's pages do not hold what it wrote (verify, exit)."""


class KillPointMissed(MachineError):
    """A task was driven towards a kill point and got through without
    passing it (the point is disarmed again; see the message for why)."""


__all__ = ["UksmError", "MachineError", "MachineClosed", "WaitTimeout", "HungTask", "TaskExited",
           "TaskDied", "SegFault", "SyscallError", "IntegrityError", "KillPointMissed"]
