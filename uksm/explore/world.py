"""One controlled run: a cluster, its processes, and the scheduler's loop.

The explorer process is the supervisor and the scheduler at once, and the
fork server: it has imported everything, and each process of the run --
ksmd, a task, the writer of ``run``, a reaper -- is a ``fork`` of it that
parks at its first point (``uksm.explore.gate``).  Only one process runs at
a time; between two steps every other process is parked at a scheduling
point (``uksm.kernel.sched``), so the explorer's own work -- spawning,
delivering a signal, accounting an exit, the checks -- happens while the
world stands still, as a step of the schedule.

What the supervisor's threads do in a normal run is done here by
processes that are scheduled like any other: a SIGKILLed task's lock
recovery, repair and exit run in a *reaper* process (its own task row for
the recovery, then the dead task's row for its ``mmput``), so that the
recovery's waits (the world stopped, a pte lock a live task holds) are
waits the scheduler models like every other.  The recovery decides from
one snapshot (``locks.recover(exact=True)``): every live process is parked
at a point, outside the protocol's windows.

A run is a sequence of *steps*: at each, the *chooser* (a strategy, or a
schedule being replayed) picks one enabled process to run to its next
point, or (``kills``) a parked process to SIGKILL.  The default choice --
keep running the current process while it is enabled and not yielding,
else the lowest-numbered enabled one -- is what a schedule string leaves
out: it records only the steps that deviate (``uksm.explore.schedule``).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from uksm.host import log as ulog
from uksm.host import oops as host_oops
from uksm.kernel import fsck, oom, sched
from uksm.kernel.cluster import Cluster, Config, destroy
from uksm.kernel.exit import mm_users_zero, mmput
from uksm.kernel.ksm import repair_list
from uksm.kernel.layout import (A_FREE_TOP, C_ALLOC, C_DAEMON, C_MMAP, C_MMLIST, C_PTL, C_WMUTEX,
                                EXIT_PATHS, H_FRAMES_FREED, H_KSMD_PID, H_KSMD_TASK, H_PENDING_FREE,
                                H_SHUTDOWN, H_STATE, H_SUPERVISOR_PID, CS_RUNNING, K_RUN, L_HEAD_NEXT,
                                M_EXIT_STAGE, M_ID, M_OOM_VICTIM, M_OWNER_PID, M_STATE, M_USERS,
                                R_KSMD, R_REAPER, R_SUPERVISOR, R_WORKER, R_WRITER, S_EXIT_NOSLOT,
                                S_EXITED, S_KILLED, S_LOCK_RECOVERIES, S_LOCKDEP, S_MISMATCHES,
                                S_PAGES_VERIFIED, S_RECOVERIES, S_REAPED, S_STARTED, S_USE_AFTER_FREE,
                                T_EXIT_PATH, T_EXIT_REASON, T_FATAL, T_FOR_ROW, T_MISMATCHES,
                                T_OOM_ORIGIN, T_PID, T_ROLE, T_STATE, T_VERIFIED, TASK_SIZE, TS_ALIVE,
                                TS_DEAD, TS_FREE, TS_REAPING, X_OOM, X_SIGNAL, XS_ZAPPED, EXIT_REASONS,
                                ksm_block, stats_block)
from uksm.kernel.locks import Lock, dead_locks, lock_name, recover
from uksm.kernel.memory import Allocator, free_frames, rebuild_free_stack
from uksm.kernel.mm import MM, mm_create
from uksm.kernel.watchdog import Watchdog

from uksm.explore.programs import task_body
from uksm.explore.child import COND_GO, COND_RUN_DONE, COND_SCANS, bind as _bind
from uksm.explore.gate import (BLOCKED, EXITED, G_FREE, PARKED, S_BA, S_BB, S_BLK, S_CODE, S_ARG, S_K,
                               S_STATE, S_STATUS, Gate, fork_child)

RUN, KILL = 0, 1
Action = tuple[int, int]          # (RUN or KILL, process id)

# findings, worst first (the status each gives is uksm run's: host/exitcodes)
FINDINGS = ("deadlock", "hung", "oops", "use_after_free", "lockdep", "fsck", "mismatch", "leak")
STATUS = {"deadlock": 3, "hung": 3, "oops": 5, "fsck": 4, "mismatch": 4, "leak": 4,
          "use_after_free": 1, "lockdep": 1}
RANK = {"deadlock": 0, "hung": 1, "oops": 2, "fsck": 3, "mismatch": 4, "leak": 5,
        "use_after_free": 6, "lockdep": 7}



class Diverged(Exception):
    """A replayed schedule does not fit its scenario: names the step."""


@dataclass
class Proc:
    id: int                 # its slot, and its number in a schedule
    role: str               # ksmd, task, writer, reaper
    name: str               # "ksmd", "t1", "writer", "reaper(t1)"
    row: int
    pid: int = 0
    mm: int = 0
    state: int = PARKED
    status: int | None = None
    killed: bool = False
    stop: bool = False      # ksmd asked to stop (SIGTERM delivered)
    go: int = 0             # the scenario's barrier for a task (COND_GO)
    oom_view: Any = None    # what the OOM killer saw when it blocked for frames
    dead: "Proc | None" = None   # a reaper's dead task
    body: Callable[..., int] | None = None
    pages: int = 0


@dataclass
class Step:
    """One step of a run, as the strategies and the trace need it."""
    n: int
    enabled: tuple[int, ...]
    current: int
    current_yields: bool
    killable: tuple[int, ...]
    action: Action
    default: Action
    proc: int               # who ran (or was killed)
    code: int               # its point when chosen
    arg: int
    after_code: int = -1    # where it parked (or EXITED: -2)
    after_arg: int = 0
    explored: bool = True   # a step of the explored phase (a choice)

    @property
    def preemption(self) -> bool:
        a, p = self.action
        return a == RUN and p != self.current and self.current in self.enabled and not self.current_yields


@dataclass
class Finding:
    kind: str
    detail: str
    chain: list[str] = field(default_factory=list)
    step: int = 0

    @property
    def status(self) -> int:
        return STATUS[self.kind]


@dataclass
class Outcome:
    steps: list[Step]
    findings: list[Finding]
    report: dict[str, Any]
    procs: list[str]

    @property
    def worst(self) -> Finding | None:
        return min(self.findings, key=lambda f: RANK[f.kind]) if self.findings else None

    @property
    def status(self) -> int:
        w = self.worst
        return w.status if w else 0

    def signature(self) -> tuple:
        """What two runs must share to count as the same outcome (the
        ``distinct`` count): counters, exit paths, findings."""
        r = self.report
        return (tuple(sorted(r.get("ksm", {}).items())), tuple(sorted(r.get("workers", {}).items())),
                tuple((f.kind, f.detail) for f in self.findings))


class View:
    """What a chooser sees at a step."""

    def __init__(self, n: int, enabled: tuple[int, ...], current: int, current_yields: bool,
                 killable: tuple[int, ...], explored: bool, procs: dict[int, Proc], codes: dict[int, int]):
        self.n = n
        self.enabled = enabled
        self.current = current
        self.current_yields = current_yields
        self.killable = killable
        self.explored = explored
        self.procs = procs
        self.codes = codes

    def default(self) -> Action:
        """Keep running the current process while it is enabled and not
        yielding; else the lowest-numbered enabled one (after the current,
        round robin, when the current yields)."""
        cur, en = self.current, self.enabled
        if cur in en and not self.current_yields:
            return (RUN, cur)
        if cur in en and self.current_yields and len(en) > 1:
            later = [p for p in en if p > cur]
            return (RUN, later[0] if later else en[0])
        return (RUN, en[0])

    def cost(self, a: Action) -> int:
        """Preemptions ``a`` costs: switching away from a current process
        that could go on (a kill is counted apart)."""
        kind, p = a
        return int(kind == RUN and p != self.current and self.current in self.enabled
                   and not self.current_yields)


class Chooser(Protocol):
    def choose(self, v: View) -> Action: ...


class Default:
    """The default policy, no choices (a deterministic run)."""

    def choose(self, v: View) -> Action:
        return v.default()


@dataclass
class Options:
    scenario: str = "oom-unmerge"
    exit_policy: str = "seed"
    oom_rule: str = "2.6.32"
    hazards: tuple[str, ...] = ()
    seed: int = 0
    kills: int = 0              # SIGKILL choices a run may make
    max_steps: int = 20000
    from_start: bool = False    # explore the scenario's setup too (default: from its race phase)
    log_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # scenario parameters (the Python API's)


class Scenario(Protocol):
    name: str

    def config(self, o: Options) -> Config: ...
    def setup(self, w: "World") -> None: ...
    def on_step(self, w: "World") -> None: ...
    def done(self, w: "World") -> bool: ...


_runs = 0


class World:
    """One controlled run of ``scenario`` under ``chooser``."""

    def __init__(self, gate: Gate, scenario: Scenario, o: Options, chooser: Chooser) -> None:
        global _runs
        _runs += 1
        self.gate = gate
        self.sc = scenario
        self.o = o
        self.chooser = chooser
        self.name = f"x{os.getpid()}n{_runs}"
        self.procs: dict[int, Proc] = {}
        self.mms: dict[int, MM] = {}
        self.steps: list[Step] = []
        self.findings: list[Finding] = []
        self.current = -1
        self.explored = o.from_start
        self.kills_left = o.kills
        self.reap_queue: list[Proc] = []
        self.ksmd: Proc | None = None
        self.extra: dict[str, Any] = {}
        self.ended = False
        self.log: Any = ulog._Null()

    # ---- processes ----------------------------------------------------------------------------
    def alloc_row(self, role: int, pid: int = 0) -> int:
        cl, q = self.cl, self.cl.q
        for r in range(cl.max_tasks):
            b = cl.tbase(r)
            if q[b + T_STATE] == TS_FREE:
                for f in range(TASK_SIZE):
                    q[b + f] = 0
                t = cl.trow(r)
                t.flight_pfn = -1
                t.kill_point = -1
                t.role = role
                t.pid = pid
                t.state = TS_ALIVE
                return r
        raise RuntimeError("too many tasks for the scenario's cluster")

    def free_row(self, row: int) -> None:
        t = self.cl.trow(row)
        t.pid = 0
        t.state = TS_FREE

    def _spawn(self, role: str, name: str, row: int, body: Callable[..., int], **kw: Any) -> Proc:
        pid_slot = len(self.procs)
        p = Proc(pid_slot, role, name, row, body=body, **kw)
        self.procs[p.id] = p
        world = self

        def child(side: Any) -> int:
            return body(world, p, side)
        p.pid = fork_child(self.gate, p.id, child)
        self.cl.q[self.cl.tbase(row) + T_PID] = p.pid
        self.gate.wait_parked(p.id, p.pid, lambda: _alive(p.pid))
        p.state = self.gate.word(p.id, S_STATE)
        return p

    def start_ksmd(self) -> Proc:
        row = self.alloc_row(R_KSMD)
        self.cl.q[H_KSMD_TASK] = row
        p = self._spawn("ksmd", "ksmd", row, _ksmd_body)
        self.cl.q[H_KSMD_PID] = p.pid
        self.ksmd = p
        return p

    def spawn_task(self, pages: int, prog: list[tuple], name: str = "") -> Proc:
        """A task (a user process): its row and address space first, as
        fork/exec would; ``prog``: its ops (``uksm.explore.programs``)."""
        cl, q = self.cl, self.cl.q
        row = self.alloc_row(R_WORKER)
        n = sum(1 for p in self.procs.values() if p.role == "task") + 1
        mm = mm_create(cl, row, n)
        t = cl.trow(row)
        t.mm = mm.id
        t.worker_no = n
        t.pages = pages
        self.mms[mm.id] = mm
        q[S_STARTED] += 1
        p = self._spawn("task", name or f"t{n}", row, lambda w, pr, side: task_body(w, pr, side, prog),
                        mm=mm.id, pages=pages)
        mm.words.owner_pid = p.pid
        return p

    def spawn_writer(self, value: int, oom_origin: bool | None = None) -> Proc:
        """echo VALUE > run: the writer task (run_store in its own
        context; PF_OOM_ORIGIN as the policy's kernel had it)."""
        origin = self.o.exit_policy == "shipped" if oom_origin is None else oom_origin
        row = self.alloc_row(R_WRITER)
        self.cl.q[self.cl.tbase(row) + T_OOM_ORIGIN] = 0
        return self._spawn("writer", f"writer({value})", row,
                           lambda w, pr, side: _writer_body(w, pr, side, value, origin))

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.state != EXITED]

    def tasks(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "task"]

    def release(self, p: Proc, go: int = 1) -> None:
        """The scenario's barrier: task ``p`` may go past its wait_go op."""
        p.go = go

    # ---- enabled ---------------------------------------------------------------------------------
    def lock_by_id(self, lid: int) -> Lock:
        cl = self.cl
        cls, mm = lid >> 40, lid & ((1 << 40) - 1)
        if cls == C_DAEMON:
            return cl.daemon
        if cls == C_MMLIST:
            return cl.mmlist
        if cls == C_ALLOC:
            return cl.zone
        sem, wmx, ptl = cl.mm_locks(mm)
        return {C_MMAP: sem, C_WMUTEX: wmx, C_PTL: ptl}[cls]

    def oom_view(self) -> tuple:
        """What out_of_memory decides by: the mm rows' and writers' states."""
        cl, q = self.cl, self.cl.q
        mms = tuple((q[b + M_ID], q[b + M_STATE], q[b + M_USERS], q[b + M_OOM_VICTIM],
                     q[b + M_EXIT_STAGE] & XS_ZAPPED, q[b + M_OWNER_PID])
                    for b in (cl.mbase(r) for r in range(cl.max_mms)) if q[b + M_ID])
        ws = tuple((q[b + T_STATE], q[b + T_FATAL], q[b + T_OOM_ORIGIN])
                   for b in (cl.tbase(r) for r in range(cl.max_tasks)) if q[b + T_ROLE] == R_WRITER)
        return mms, ws, q[H_PENDING_FREE]

    def enabled(self, p: Proc) -> bool:
        if p.state == PARKED:
            return True
        if p.state != BLOCKED:
            return False
        g, q = self.gate, self.cl.q
        kind, a, b = g.word(p.id, S_BLK), g.word(p.id, S_BA), g.word(p.id, S_BB)
        fatal = q[self.cl.tbase(p.row) + T_FATAL]
        if kind == sched.BLK_LOCK:
            return self.lock_by_id(a).sem.value > 0
        if kind == sched.BLK_FRAMES:
            return (q[H_FRAMES_FREED] != a or free_frames(self.cl) > 0 or bool(b and fatal)
                    or self.oom_view() != p.oom_view)
        if kind == sched.BLK_KSMD_IDLE:
            return (p.stop or bool(q[H_SHUTDOWN]) or q[K_RUN] != a
                    or (q[K_RUN] == 1 and q[L_HEAD_NEXT] != self.cl.head))
        if kind == sched.BLK_COND:
            if fatal:
                return True
            if a == COND_GO:
                return p.go >= b
            if a == COND_SCANS:
                return q[ksm_field("full_scans")] >= b
            if a == COND_RUN_DONE:
                return q[ksm_field("run")] == b
        return False

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> Outcome:
        o = self.o
        cfg = self.sc.config(o)
        cfg.hazards = list(o.hazards)
        cfg.exit_policy = o.exit_policy
        cfg.oom_rule = o.oom_rule
        self.gate.reset()
        self.cl = Cluster.create(self.name, cfg)
        try:
            q = self.cl.q
            q[H_SUPERVISOR_PID] = os.getpid()
            self.cl.bind(self.alloc_row(R_SUPERVISOR, os.getpid()))
            if o.log_dir:
                self.log = ulog.setup("supervisor", self.name, o.log_dir)
                self.log.info("explore_start", scenario=self.sc.name, exit_policy=o.exit_policy,
                              hazards=list(o.hazards), seed=o.seed)
            q[H_STATE] = CS_RUNNING
            self.start_ksmd()
            self.sc.setup(self)
            self._loop()
            report = self._final()
        finally:
            self._teardown()
        return Outcome(self.steps, self.findings, report, [p.name for p in self.procs.values()])

    def _loop(self) -> None:
        n = 0
        while not self.ended:
            self.sc.on_step(self)
            self._start_reaper()
            live = self.live()
            en = tuple(p.id for p in live if self.enabled(p))
            if not en:
                if self._quiescent(live):
                    break
                continue
            if n >= self.o.max_steps:
                self._livelock(n)
                break
            cur = self.current
            cy = cur in self.procs and self.gate.word(cur, S_CODE) in sched.YIELDS
            if cy and len(en) > 1:
                # a yield (ksmd's sleep_millisecs, an idle task) lets every
                # other runnable process go first: no strategy may starve
                # the others by running a sleeper on
                en = tuple(i for i in en if i != cur)
            killable = (tuple(p.id for p in live if p.role in ("task", "ksmd", "writer")
                              and not p.stop) if self.kills_left and self.explored else ())
            v = View(n, en, cur, cy, killable, self.explored, self.procs,
                     {p.id: self.gate.word(p.id, S_CODE) for p in live})
            self.gate.w[G_FREE] = 0 if self.explored else 1
            a = self.chooser.choose(v) if self.explored else v.default()
            d = v.default()
            kind, pid = a
            p = self.procs.get(pid)
            if p is None or (kind == RUN and pid not in en) or (kind == KILL and pid not in killable):
                raise Diverged(f"step {n}: the schedule chooses "
                               f"{'to kill' if kind == KILL else 'to run'} process {pid}, "
                               f"which is not {'killable' if kind == KILL else 'enabled'} there "
                               f"(enabled: {', '.join(self.procs[i].name for i in en)})")
            st = Step(n, en, cur, cy, killable, a, d, pid, self.gate.word(pid, S_CODE),
                      self.gate.word(pid, S_ARG), explored=self.explored)
            if kind == KILL:
                self.kills_left -= 1
                self.deliver(p.pid, signal.SIGKILL)
                st.after_code = -3
            else:
                self.current = pid
                self._run_one(p)
                st.after_code = self.gate.word(pid, S_CODE) if p.state != EXITED else -2
                st.after_arg = self.gate.word(pid, S_ARG)
            self.steps.append(st)
            n += 1

    def _run_one(self, p: Proc) -> None:
        g = self.gate
        g.resume(p.id)
        g.wait_parked(p.id, p.pid, lambda: _alive(p.pid))
        p.state = g.word(p.id, S_STATE)
        if p.state == EXITED:
            self._exited(p)
            return
        if p.state == BLOCKED and g.word(p.id, S_BLK) == sched.BLK_FRAMES:
            p.oom_view = self.oom_view()
        code = g.word(p.id, S_CODE)
        if code == sched.CODE["signal"]:
            arg = g.word(p.id, S_ARG)
            self.deliver(arg >> 8, arg & 0xff)

    def deliver(self, pid: int, sig: int) -> None:
        """A signal, delivered at this step: SIGKILL ends the process here
        (its recovery and exit go to a reaper); another signal's effect on
        the task row (TIF_MEMDIE, a pending fatal signal) is made now, and
        the process's own handler runs before its next step."""
        p = next((x for x in self.procs.values() if x.pid == pid and x.state != EXITED), None)
        if p is None:
            return
        q = self.cl.q
        if sig == signal.SIGKILL:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            p.state, p.status, p.killed = EXITED, -signal.SIGKILL, True
            self.log.info("explore_kill", task=p.name, pid=pid)
            if p.role == "reaper":
                return
            q[self.cl.tbase(p.row) + T_STATE] = TS_DEAD
            self.reap_queue.append(p)
            return
        b = self.cl.tbase(p.row)
        if p.role in ("task", "writer") and not q[b + T_FATAL] and sig in (oom.OOM_SIGNAL, signal.SIGTERM,
                                                                           signal.SIGINT):
            q[b + T_FATAL] = X_OOM if sig == oom.OOM_SIGNAL else X_SIGNAL
        if p.role == "ksmd" and sig in (signal.SIGTERM, signal.SIGINT):
            p.stop = True
        os.kill(pid, sig)

    def _exited(self, p: Proc) -> None:
        """A process said its last word: reap it and account for it."""
        try:
            _pid, st = os.waitpid(p.pid, 0)
            p.status = os.waitstatus_to_exitcode(st)
        except ChildProcessError:
            p.status = self.gate.word(p.id, S_STATUS)
        q, cl = self.cl.q, self.cl
        if p.status == host_oops.OOPS_STATUS and p.role in ("ksmd", "writer"):
            self.find("oops", f"{p.name}: {self.gate.error(p.id) or 'an oops'}")
            self.ended = True
            return
        if p.status not in (0, None) and p.role in ("task", "reaper") or self.gate.error(p.id):
            self.find("oops", f"{p.name} failed: {self.gate.error(p.id) or f'status {p.status}'}")
            self.ended = True
            return
        if p.role == "task":
            self.account_exit(p.row, reaped=False)
        elif p.role == "writer":
            self.extra["run_store"] = {"result": _writer_result(p.status), "run": q[K_RUN]}
            self.free_row(p.row)
        elif p.role == "reaper":
            d = p.dead
            assert d is not None
            if d.role == "task":
                self.account_exit(d.row, reaped=True, how="sigkill")
            elif d.role == "ksmd":
                self.free_row(d.row)
                self.start_ksmd()
            else:
                self.free_row(d.row)
            self.free_row(p.row)
        elif p.role == "ksmd":
            self.free_row(p.row)
        del cl

    def account_exit(self, row: int, reaped: bool, how: str | None = None) -> None:
        """Reaper.account_exit's books, kept while the world stands still."""
        q, cl = self.cl.q, self.cl
        tr = cl.trow(row)
        path = EXIT_PATHS[tr.exit_path]
        q[S_EXITED] += 1
        if path == "none":
            q[S_EXIT_NOSLOT] += 1
        q[S_PAGES_VERIFIED] += tr.verified
        q[S_MISMATCHES] += tr.mismatches
        if reaped:
            q[S_REAPED] += 1
            q[S_KILLED] += 1
        self.log.info("worker_exit", mm=tr.mm, how=how or EXIT_REASONS[tr.exit_reason], path=path,
                      reaped=reaped)
        self.free_row(row)

    def _start_reaper(self) -> None:
        """One recovery at a time, in order of death (as the recovery
        thread takes one batch at a time)."""
        if not self.reap_queue or any(p.role == "reaper" and p.state != EXITED for p in self.procs.values()):
            return
        dead = self.reap_queue.pop(0)
        row = self.alloc_row(R_SUPERVISOR, os.getpid())
        p = self._spawn("reaper", f"reaper({dead.name})", row,
                        lambda w, pr, side: _reaper_body(w, pr, side, dead))
        p.dead = dead

    def _quiescent(self, live: list[Proc]) -> bool:
        """Nobody can run.  The scenario's end (only ksmd, idle, left:
        stop it), or a deadlock / a task that waits for ever.  True: the
        run is over."""
        others = [p for p in live if p.role != "ksmd"]
        k = self.ksmd if self.ksmd is not None and self.ksmd.state != EXITED else None
        if not others and not self.reap_queue and self.sc.done(self):
            if k is None:
                return True
            if not k.stop:
                self.deliver(k.pid, signal.SIGTERM)   # ksmdctl.stop: it frees what it must, then stops
                return False
        self._stuck(live)
        return True

    def _stuck(self, live: list[Proc]) -> None:
        wd = Watchdog(self.cl, 0, lambda r: None)
        now = time.monotonic_ns()
        on_locks = [p for p in live if self.gate.word(p.id, S_BLK) in (sched.BLK_LOCK, sched.BLK_FRAMES)]
        if on_locks:
            first = next((p for p in on_locks if p.role in ("task", "writer", "reaper")), on_locks[0])
            lines, cycle = wd.chain(first.row, now)
            lines = [_no_seconds(x) for x in lines]
            self.find("deadlock", f"every live process is blocked ({len(live)}): {lines[0]}", lines)
        else:
            names = ", ".join(f"{p.name} ({_blk_name(self.gate.word(p.id, S_BLK))})" for p in live)
            self.find("hung", f"nothing can run: {names}")

    def _livelock(self, n: int) -> None:
        counts: dict[int, int] = {}
        for s in self.steps[-1000:]:
            counts[s.proc] = counts.get(s.proc, 0) + 1
        busiest = max(counts, key=lambda i: counts[i]) if counts else -1
        who = self.procs[busiest].name if busiest in self.procs else "?"
        self.find("hung", f"no end after {n} steps (a livelock: {who} ran {counts.get(busiest, 0)} of "
                          f"the last {min(n, 1000)})")

    def find(self, kind: str, detail: str, chain: list[str] | None = None) -> None:
        self.findings.append(Finding(kind, detail, chain or [], len(self.steps)))
        self.log.error("explore_finding", finding=kind, detail=detail, chain=chain or [])

    # ---- the end ---------------------------------------------------------------------------------------
    def _final(self) -> dict[str, Any]:
        cl, q = self.cl, self.cl.q
        stuck = any(f.kind in ("deadlock", "hung", "oops") for f in self.findings)
        fs: dict[str, Any] = {"ok": True, "errors": []}
        if not stuck:
            mms = {i: m for i, m in self.mms.items() if m.words.id == i}
            errs = fsck.check(cl, mms, counters=False)
            leaks = fsck.check_leaks(cl)
            fs = {"ok": not (errs or leaks), "errors": errs + leaks}
            if errs:
                self.find("fsck", errs[0])
            elif leaks:
                self.find("leak", leaks[0])
            if q[S_MISMATCHES]:
                self.find("mismatch", f"{q[S_MISMATCHES]} pages did not read back as written")
        if q[S_USE_AFTER_FREE]:
            self.find("use_after_free", f"{q[S_USE_AFTER_FREE]} lock operations on a freed mm")
        if q[S_LOCKDEP]:
            self.find("lockdep", f"{q[S_LOCKDEP]} locks taken against the lock order")
        return {"ksm": ksm_block(q), "workers": stats_block(q),
                "integrity": {"pages_verified": q[S_PAGES_VERIFIED], "mismatches": q[S_MISMATCHES]},
                "fsck": fs, **self.extra}

    def _teardown(self) -> None:
        for p in self.procs.values():
            if p.state != EXITED and p.pid:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                    os.waitpid(p.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                p.state = EXITED
        try:
            self.cl.close()
        except Exception:
            pass
        destroy(self.name)
        if self.o.log_dir:
            ulog.close()


def ksm_field(name: str) -> int:
    from uksm.kernel.layout import K_FULL_SCANS
    return {"full_scans": K_FULL_SCANS, "run": K_RUN}[name]


def _alive(pid: int) -> bool:
    try:
        got, _st = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return got == 0


def _no_seconds(line: str) -> str:
    """The watchdog's chain without its wall-clock seconds (a controlled
    run's time is logical: the same schedule gives the same chain)."""
    import re
    return re.sub(r" for \d+\.\d+s", "", line)


def _blk_name(kind: int) -> str:
    return {sched.BLK_NONE: "parked", sched.BLK_LOCK: "lock", sched.BLK_FRAMES: "frames",
            sched.BLK_KSMD_IDLE: "ksmd idle", sched.BLK_COND: "waits for the scenario"}.get(kind, "?")


def _writer_result(status: int | None) -> str:
    from uksm.kernel.writer import result_of
    return result_of(status)


# ---- the processes' bodies (in the forked child) ---------------------------------------------------

class _Oops(Exception):
    """ksmd or the writer oopsed (uksm.host.oops logged it): its text goes
    to the explorer through the slot, its status stays the oops status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{host_oops.LAST[0]} (at {host_oops.LAST[1]})")
        self.status = status


def _ksmd_body(w: World, p: Proc, side: Any) -> int:
    from uksm.kernel.ksmd import run_ksmd
    status = run_ksmd(w.cl, _bind(w, p, side, "ksmd"))
    if status == host_oops.OOPS_STATUS and host_oops.LAST:
        raise _Oops(status)
    return status


def _writer_body(w: World, p: Proc, side: Any, value: int, origin: bool) -> int:
    from uksm.kernel.writer import write_run
    status = write_run(w.cl, value, origin, _bind(w, p, side, "writer"))
    if status == host_oops.OOPS_STATUS and host_oops.LAST:
        raise _Oops(status)
    return status


def _reaper_body(w: World, p: Proc, side: Any, dead: Proc) -> int:
    """The supervisor's recovery and reaper for ``dead``, as one scheduled
    process: take over what it held (exactly: everybody is parked),
    repair, stop the world to rebuild the frame counts, release; then run
    its exit on its row (a task), or leave the restart to the explorer
    (ksmd)."""
    cl = w.cl
    task = cl.bind(p.row)
    task.sched = side.lock_hook
    task.lockdep = None            # the supervisor is trusted: it takes every pte lock at once
    q = cl.q
    log = ulog.setup("reaper", w.name, w.o.log_dir) if w.o.log_dir else ulog._Null()
    sched.point("recover", dead.row)
    base = cl.tbase(dead.row)
    lids = set(dead_locks(q, base))
    these = {lid: w.lock_by_id(lid) for lid in lids}
    took = recover(q, these, cl.live_rows, [(dead.row, base)], {}, exact=True)
    owned = {lid: n for lid, n in took.items() if n}
    for lid, n in owned.items():
        log.warning("lock_recovery", lock=lock_name(lid), units=n, dead_pid=dead.pid, state="taken over")
    if owned.get(cl.mmlist.lid):
        repair_list(cl)
        _post(cl.mmlist, owned.pop(cl.mmlist.lid))
    if owned.get(cl.zone.lid):
        rebuild_free_stack(cl, fsck.live_task_rows(cl))
        _post(cl.zone, owned.pop(cl.zone.lid))
    owned_ptl = {lid & ((1 << 40) - 1) for lid in owned if lid >> 40 == C_PTL}
    mm0 = w.mms.get(dead.mm) if dead.mm else None
    if mm0 is not None and mm0.words.id == dead.mm:
        mm_users_zero(cl, MM(cl, dead.mm, mm0.row, mm0.seg), log, ptl_held=dead.mm in owned_ptl)
    if dead.role == "ksmd":
        task.lock(cl.mmlist)
        for s in range(cl.max_mms):
            cl.mrow(s).slot_rmap = 0
        task.unlock(cl.mmlist)
    mms = {i: m for i, m in w.mms.items() if m.words.id == i}
    taken = []
    for mm_id in sorted(mms):      # the world stopped: every pte lock, then zone_lock
        if mm_id not in owned_ptl:
            task.lock(mms[mm_id].ptl)
            taken.append(mms[mm_id].ptl)
    task.lock(cl.zone)
    fixed = fsck.rebuild(cl, mms)
    task.unlock(cl.zone)
    for lk in reversed(taken):
        task.unlock(lk)
    for lid in owned:
        row = cl.mm_row(lid & ((1 << 40) - 1)) if lid >> 40 == C_MMAP else -1
        if row >= 0:
            cl.mrow(row).writer_waiting = 0
    for cls in (C_PTL, C_MMAP, C_WMUTEX, C_DAEMON):
        for lid in [x for x in owned if x >> 40 == cls]:
            _post(w.lock_by_id(lid), owned.pop(lid))
    q[S_RECOVERIES] += 1
    q[S_LOCK_RECOVERIES] += len(took)
    log.warning("recovery", dead_pid=dead.pid, mm=dead.mm, frames_fixed=fixed, status=-9)
    if dead.role != "task" or mm0 is None or mm0.words.id != dead.mm:
        return 0
    sched.point("reap", dead.row)
    t = cl.trow(dead.row)
    t.kill_point = -1
    t.for_row = dead.row
    t.role = R_REAPER
    t.pid = os.getpid()
    t.state = TS_REAPING
    rtask = cl.bind(dead.row)      # the dead task's exit, on its row (lockdep as any task's)
    rtask.sched = side.lock_hook
    mm = MM(cl, dead.mm, mm0.row, mm0.seg)
    alloc = Allocator(cl)
    alloc.oom_killer = oom.out_of_memory
    mmput(cl, mm, alloc, log)
    alloc.flush()
    return 0


def _post(lk: Lock, n: int) -> None:
    for _ in range(n):
        lk.sem.release()


__all__ = ["World", "Options", "Outcome", "Finding", "Step", "View", "Default", "Diverged",
           "RUN", "KILL", "COND_GO", "COND_SCANS", "COND_RUN_DONE", "FINDINGS", "STATUS"]
