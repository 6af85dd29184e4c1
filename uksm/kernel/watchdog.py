"""khungtaskd: report a task blocked on one lock for too long, with the
wait-for chain; and a task whose exit keeps faulting without advancing (a
livelock: it is never blocked, so only its lack of progress shows).

Every blocked wait is visible in the task table: the entry of the lock
waited for is WAITING with E_SINCE set (the allocator's wait for frames is
recorded the same way, as the pseudo-lock "frames").  Holders are the
entries HELD on the same lock (or a writer's partial units).  From the
blocked task the chain follows: the lock, its holder, what that holder
waits for, ... until a task that waits for nothing, or a cycle: a deadlock.
For "frames", the holder is the OOM victim still on its way out.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NotRequired, TypedDict

from uksm.kernel.layout import (
    A_FREE_TOP,
    C_FRAMES,
    E_LOCK,
    E_SINCE,
    E_WORD,
    ESIZE,
    NCLASS,
    ROLES,
    T_EXIT_PROGRESS,
    T_FAULTS,
    T_LOCKS,
    T_MM,
    T_PID,
    XS_MMDROP,
    XS_USERS0,
    XS_ZAPPED,
)
from uksm.kernel.locks import WAITING, holders_of, lock_name

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster


class LockWait(TypedDict):
    """One link of a wait-for chain, as fields: ``uksm logs trace`` draws it."""
    pid: int
    role: str
    mm: int
    lock: str
    waited_s: float
    since_ns: int
    holders: list[int]


class HungReport(TypedDict):
    """khungtaskd's report of one blocked (or livelocked) task: the
    ``hung_task`` event, an entry of the run report's ``hung_tasks``,
    ``uksm.HungTask.reports``."""
    pid: int
    role: str
    lock: str              # "frames" for the allocator's wait, "none (livelock)"
    waited_s: float
    deadlock: bool         # the chain closes a cycle
    chain: list[str]       # its lines, for a person
    waits: NotRequired[list[LockWait]]  # its links (not for a livelock: no wait)


class Watchdog:
    def __init__(self, cl: "Cluster", timeout_s: float, report: Callable[[HungReport], None],
                 period_s: float = 0.2) -> None:
        self.cl = cl
        self.timeout_ns = int(timeout_s * 1e9)
        self.report = report
        self.period = period_s
        self.seen: set[tuple[int, int, int]] = set()
        # livelock watch: row -> (faults, exit progress, exit stage, since ns)
        self.spin: dict[int, tuple[int, int, int, int]] = {}
        self.spin_seen: set[tuple[int, int]] = set()

    def run_until(self, stop: threading.Event) -> Callable[[], None]:
        def loop() -> None:
            while not stop.wait(self.period):
                try:
                    self.check()
                except Exception:  # the cluster may be going away under us
                    pass
        return loop

    def role(self, row: int) -> str:
        """The task's role by name; "?" for a word uksm has no name for (a
        torn row must not stop the report: the loop would swallow the
        IndexError, and the hung task would never be reported)."""
        r = self.cl.trow(row).role
        return ROLES[r] if 0 <= r < len(ROLES) else "?"

    def describe(self, row: int) -> str:
        t = self.cl.trow(row)
        role = self.role(row)
        if role == "worker":
            return f"worker w{t.worker_no} (pid {t.pid}, mm{t.mm})"
        if role == "reaper":
            return f"reaper for mm{t.mm} (pid {t.pid})"
        return f"{role} (pid {t.pid})"

    def waiting_on(self, row: int, now: int) -> tuple[int, int, float, int] | None:
        """(class, lock id, seconds, since: mono_ns) of a blocked wait of this task."""
        q, b = self.cl.q, self.cl.tbase(row)
        for c in range(NCLASS):
            e = b + T_LOCKS + c * ESIZE
            since = q[e + E_SINCE]
            if q[e + E_WORD] & 3 == WAITING and since:
                return c, q[e + E_LOCK], (now - since) / 1e9, since
        return None

    def holder_rows(self, cls: int, lid: int) -> list[int]:
        cl, q = self.cl, self.cl.q
        rows = cl.live_rows()
        if cls == C_FRAMES:
            pids = [m.owner_pid for r in range(cl.max_mms)
                    if (m := cl.mrow(r)).id and m.oom_victim and not m.exit_stage & XS_ZAPPED]
        else:
            pids = holders_of(q, rows, lid)
        return [r for (r, b) in rows if q[b + T_PID] in pids and q[b + T_PID] > 0]

    def chain(self, row: int, now: int) -> tuple[list[str], bool, list[LockWait]]:
        """The wait-for chain from task ``row``: its lines for a person, whether
        it closes a cycle (a deadlock), and each link as fields (pid, role,
        lock, waited_s, holders' pids) for a program: ``uksm logs trace``
        draws the waits of a hung run from them, up to its end."""
        lines: list[str] = []
        waits: list[LockWait] = []
        seen = {row}
        cur = row
        cycle = False
        while len(lines) < 10:
            w = self.waiting_on(cur, now)
            if w is None:
                lines.append(f"{self.describe(cur)} is running (not blocked)")
                break
            cls, lid, secs, since = w
            holders = [h for h in self.holder_rows(cls, lid) if h != cur]
            if cls == C_FRAMES:
                what = f"free frames ({self.cl.q[A_FREE_TOP]} free) for {secs:.1f}s"
                by = "the OOM victim, which has not freed its memory: " if holders else "no OOM victim: "
            else:
                what = f"{lock_name(lid)} for {secs:.1f}s"
                by = "held by "
            hd = ", ".join(self.describe(h) for h in holders) or "nobody alive"
            lines.append(f"{self.describe(cur)} waits for {what}, {by}{hd}")
            q, b = self.cl.q, self.cl.tbase(cur)
            waits.append({"pid": q[b + T_PID], "role": self.role(cur),
                          "mm": q[b + T_MM],
                          "lock": "frames" if cls == C_FRAMES else lock_name(lid),
                          "waited_s": round(secs, 3), "since_ns": since,
                          "holders": [q[self.cl.tbase(h) + T_PID] for h in holders]})
            nxt = holders[0] if holders else None
            if nxt is None:
                break
            if nxt in seen:
                lines.append(f"deadlock: {self.describe(nxt)} is already in this chain")
                cycle = True
                break
            seen.add(nxt)
            cur = nxt
        return lines, cycle, waits

    def check_livelock(self, now: int) -> None:
        """A task in its exit (mm_users 0, mm not dropped) whose fault count
        grows while its exit stage and progress counter stand still for
        the hung-task timeout: reported like a hung task, lock "none
        (livelock)" -- the seed's munlock at exit (exit.munlock_vma_pages_all)."""
        cl, q = self.cl, self.cl.q
        live = cl.live_rows()
        for row in [r for r in self.spin if r not in {r for (r, _b) in live}]:
            del self.spin[row]
        for (row, b) in live:
            mrow = cl.mm_row(q[b + T_MM]) if q[b + T_MM] else -1
            stage = cl.mrow(mrow).exit_stage if mrow >= 0 else 0
            if not stage & XS_USERS0 or stage & XS_MMDROP:
                self.spin.pop(row, None)
                continue
            faults, progress = q[b + T_FAULTS], q[b + T_EXIT_PROGRESS]
            last = self.spin.get(row)
            if last is None or faults == last[0] or (progress, stage) != (last[1], last[2]):
                self.spin[row] = (faults, progress, stage, now)  # idle, blocked, or advancing
                continue
            secs = (now - last[3]) / 1e9
            key = (row, last[3])
            if secs * 1e9 < self.timeout_ns or key in self.spin_seen:
                continue
            self.spin_seen.add(key)
            line = (f"{self.describe(row)} keeps faulting in its exit without progress: "
                    f"{faults - last[0]} faults in {secs:.1f}s, exit stage {stage}, "
                    f"progress {progress} (a livelock: munlock at exit with the seed's fault-path check?)")
            self.report({"pid": q[b + T_PID], "role": self.role(row), "lock": "none (livelock)",
                         "waited_s": round(secs, 3), "deadlock": False, "chain": [line]})

    def check(self) -> None:
        now = time.monotonic_ns()
        self.check_livelock(now)
        for (row, b) in self.cl.live_rows():
            w = self.waiting_on(row, now)
            if w is None:
                continue
            cls, lid, secs, _since = w
            if secs * 1e9 < self.timeout_ns:
                continue
            key = (row, lid, self.cl.q[b + T_LOCKS + cls * ESIZE + E_SINCE])
            if key in self.seen:
                continue
            self.seen.add(key)
            lines, cycle, waits = self.chain(row, now)
            self.report({"pid": self.cl.q[b + T_PID], "role": self.role(row),
                         "lock": "frames" if cls == C_FRAMES else lock_name(lid),
                         "waited_s": round(secs, 3), "deadlock": cycle, "chain": lines,
                         "waits": waits})
