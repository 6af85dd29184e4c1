"""A ksmd that raises is an oops, not a loop.

An exception in kernel code is a bug, as an oops in the kernel is.  Two
tasks run kernel code in their own context: ksmd, and the writer of
/sys/kernel/mm/ksm/run (run_store; for run=2 the whole unmerge,
uksm.kernel.writer).  Either one logs it
once, with its traceback (an ``oops`` event in its log), sends a one-line
record of it to its supervisor down a pipe (the *oops channel*: fd
``UKSM_OOPS_FD``), and exits with ``OOPS_STATUS``.  The supervisor
recovers the locks the dead ksmd held (as for any death), counts the oops
by its signature (exception type and the innermost frame), and restarts
ksmd after a backoff (0.1 s, doubling, at most 2 s; the writer is not
restarted: its caller gets the oops as the write's result): the restart is a
feature (a killed ksmd is recovered), the tight loop of restarts is not.
After ``OOPS_LIMIT`` oopses in a row -- no batch published by ksmd in
between -- it gives up: no more restarts, the run ends with a clear error.

The rule (``uksm run``, ``inject``, ``down``): **any oops fails the run**,
with status ``EXIT_OOPS`` (5) unless a hung task (3) was found first; the
report lists each distinct oops once, with its count (``"oops"``), and how
often ksmd was restarted after one (``"ksmd_restarts"``).  A detector for
a hazard that makes ksmd or the writer trip (an exception on a freed mm,
say) needs nothing more than to look at ``status`` or ``oops``.

The channel, not the exit status, is the evidence: a stop signal that
reaches a task in interpreter shutdown, after it sent the record, turns
status 70 into -15.

Test hook (not in the CLI): ``UKSM_TEST_KSMD_OOPS=every`` makes every ksmd
raise in each batch; ``UKSM_TEST_KSMD_OOPS=once:PATH`` makes the first
ksmd that reaches a batch raise (it creates PATH; later ones find it).
"""
from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, TypedDict

OOPS_STATUS = 70          # ksmd's exit status after an oops (sysexits' EX_SOFTWARE)
OOPS_LIMIT = 3            # oopses in a row before the supervisor gives up
BACKOFF_S = (0.1, 2.0)    # first restart delay, the most it doubles to
FD_ENV = "UKSM_OOPS_FD"
LAST: list[str] = []      # this process's last oops: (error, where), for a controlled run's report
TEST_ENV = "UKSM_TEST_KSMD_OOPS"


def signature(e: BaseException) -> tuple[str, str]:
    """(the error, where it was raised: the innermost frame)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
    return f"{type(e).__name__}: {e}", where


# ---- in ksmd and the writer ---------------------------------------------------------------------

def report(log: Any, e: BaseException) -> int:
    """ksmd or the writer raised: log it once with its traceback (the
    ``oops`` event; its role says which task), tell the supervisor, return
    the exit status."""
    error, where = signature(e)
    LAST[:] = [error, where]
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log.error("oops", error=error, where=where, tb=tb)
    fd = os.environ.get(FD_ENV)
    if fd:
        try:
            os.write(int(fd), (json.dumps({"error": error, "where": where}) + "\n").encode())
        except (OSError, ValueError):
            pass  # the supervisor still sees OOPS_STATUS
    return OOPS_STATUS


def install_test_hook(ksmd: Any) -> None:
    """``UKSM_TEST_KSMD_OOPS``: make ksmd raise in its batches (tests only)."""
    mode = os.environ.get(TEST_ENV, "")
    if not mode:
        return
    scan = ksmd.ksm_do_scan

    def oopsing_scan(budget: int) -> int:
        if mode == "every":
            raise RuntimeError(f"test oops ({TEST_ENV}=every)")
        if mode.startswith("once:"):
            try:
                os.close(os.open(mode[5:], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return scan(budget)
            raise RuntimeError(f"test oops ({TEST_ENV}=once)")
        return scan(budget)
    ksmd.ksm_do_scan = oopsing_scan


class OopsRecord(TypedDict):
    """An entry of the report's ``oops``: one distinct oops, with its count."""
    task: str    # who oopsed so first: ksmd, writer
    error: str   # "Type: message"
    where: str   # the innermost frame: "file.py:LINE in function"
    count: int


# ---- in the supervisor ---------------------------------------------------------------------------

@dataclass
class Oopses:
    """The supervisor's record of the oopses (ksmd's and the writers')."""
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    task: dict[tuple[str, str], str] = field(default_factory=dict)  # who oopsed so first: ksmd, writer
    in_row: int = 0
    restarts: int = 0
    progress: tuple[int, int] = (-1, -1)  # ksmd's published progress at the last restart
    given_up: str = ""

    @staticmethod
    def channel() -> tuple[int, int]:
        """A new oops channel for a new ksmd: (read end, write end)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        return r, w

    @staticmethod
    def read(fd: int) -> tuple[str, str] | None:
        """What a dead ksmd sent (None: it did not oops); closes ``fd``."""
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, OSError):
            data = b""
        finally:
            os.close(fd)
        try:
            rec = json.loads(data.split(b"\n", 1)[0])
            return str(rec["error"]), str(rec["where"])
        except (ValueError, KeyError, TypeError):
            return None

    def note(self, sig: tuple[str, str], task: str = "ksmd") -> bool:
        """One more oops of ``task`` (its role) for the report; True the
        first time it is seen."""
        first = sig not in self.seen
        self.seen[sig] = self.seen.get(sig, 0) + 1
        self.task.setdefault(sig, task)
        return first

    def count(self, sig: tuple[str, str], progress: tuple[int, int]) -> tuple[bool, float]:
        """One more ksmd oops.  ``progress``: ksmd's published counters now
        (a batch published since the last restart breaks the row).  Returns
        (first time this one is seen, the restart delay; < 0: give up)."""
        first = self.note(sig)
        self.in_row = 1 if progress != self.progress else self.in_row + 1
        if self.in_row >= OOPS_LIMIT:
            self.given_up = (f"ksmd oopsed {self.in_row} times in a row ({sig[0]} at {sig[1]}): "
                             f"not restarted, the run is stopped")
            return first, -1.0
        self.restarts += 1
        return first, min(BACKOFF_S[0] * 2 ** (self.in_row - 1), BACKOFF_S[1])

    def restarted(self, progress: tuple[int, int]) -> None:
        self.progress = progress

    def block(self) -> list[OopsRecord]:
        """The report's ``oops``: each distinct oops once, with its count."""
        return [{"task": self.task.get((e, w), "ksmd"), "error": e, "where": w, "count": n}
                for (e, w), n in self.seen.items()]


__all__ = ["OOPS_LIMIT", "OOPS_STATUS", "Oopses", "OopsRecord", "install_test_hook", "report", "signature"]
