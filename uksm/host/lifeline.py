"""Nothing outlives its cluster: the lifeline from a supervisor to its
children, and the stop signals of a command that owns a cluster.

The lifeline.  A supervisor (``uksm run``, ``uksm inject``, the daemon of
``uksm up``, a test) starts ksmd and the workers with its pid in
``UKSM_SUPERVISOR_PID``; each child calls ``arm()`` first thing, which asks
the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
as a kernel thread dies with the kernel).  Why SIGKILL and not an orderly
exit: with the supervisor gone nobody recovers the locks of a task that
dies while exiting, so an exit path could block for good on a lock a dead
peer holds; every process going at once leaves only objects, which
``uksm cleanup`` removes.

Two races, closed:
- the supervisor dies between fork and ``prctl`` (python takes ~100 ms to
  reach ``arm()``): the child has been reparented by then, so
  ``getppid()`` right after arming differs from the recorded pid, and the
  child exits at once;
- pid reuse: the death signal follows the parent *process* the kernel
  recorded (``real_parent``), not a pid, so a recycled pid cannot fool it;
  and the recorded pid cannot come back as our new parent (a subreaper or
  init existed before the supervisor died).
One rule for the supervisor: the death signal fires when the *thread*
that forked the child exits, so children are started from the main thread
(``Supervisor.poll`` restarts ksmd there, not in the recovery thread).

The stop signals.  SIGTERM (``kill``, ``timeout``, a CI job cancelled, a
container stopped), SIGHUP (the terminal closed) and SIGINT (Ctrl-C) ask a
foreground command to stop in order: the first sets ``StopSignals.signo``
and the command's loop ends, then ``Supervisor.shutdown`` runs as at a
normal end (tasks exit through their paths, ksmd frees, fsck, teardown)
and the report says it was interrupted.  A second one while that runs
raises ``SecondSignal`` in the main thread: the command kills every
process of the cluster at once and still removes every object.  Children
run in their own process groups (``Supervisor._popen``), so a Ctrl-C at
the terminal reaches the supervisor only: ksmd must not stop on its own
before it has freed the slots the exits leave it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType
from typing import Any, NoReturn

ENV = "UKSM_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
EXIT_ORPHAN = 1   # a child whose supervisor died before it could arm


def child_env(supervisor_pid: int | None = None) -> dict[str, str]:
    """The environment a supervisor starts a child with."""
    return dict(os.environ, **{ENV: str(supervisor_pid or os.getpid())})


def set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def arm() -> None:
    """In a child (ksmd, a worker), before anything else: die with the
    supervisor.  A child started by hand (no ``UKSM_SUPERVISOR_PID``) has
    no lifeline."""
    want = os.environ.get(ENV)
    if not want:
        return
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != int(want):  # it died before we armed: reparented already
        os._exit(EXIT_ORPHAN)


def exit_now(status: int) -> NoReturn:
    """A child's (ksmd's, a worker's) last act once its ``main`` has
    returned: stdout and stderr flushed, then ``_exit`` -- no interpreter
    finalization.  What the task did lives in the cluster's shared memory,
    its log files are closed, and its memory goes with it (munmap, the
    semaphores closed, by the host kernel): freeing its objects one by one
    first (ksmd's rmap_items and trees, a worker's page versions) was
    15-55 ms between a task's last act and its reaping, which the end of
    every run waits for."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class SecondSignal(BaseException):
    """A second stop signal during an orderly shutdown: kill at once.
    A BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


class StopSignals:
    """SIGTERM, SIGHUP, SIGINT for a foreground command owning a cluster
    (a context manager; the main thread's handlers, restored at exit)."""

    def __init__(self) -> None:
        self.signo = 0
        self.old: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signo).name if self.signo else ""

    def __call__(self) -> bool:
        """Was a stop asked for? (the drivers' ``interrupted()``)"""
        return bool(self.signo)

    def _handler(self, signo: int, _frame: FrameType | None) -> None:
        if not self.signo:
            self.signo = signo
            return
        for s in STOP_SIGNALS:  # the kill-at-once path must not be interrupted in turn
            signal.signal(s, signal.SIG_IGN)
        raise SecondSignal(signo)

    def __enter__(self) -> "StopSignals":
        for s in STOP_SIGNALS:
            self.old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *_exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


__all__ = ["ENV", "STOP_SIGNALS", "arm", "child_env", "SecondSignal", "StopSignals"]
