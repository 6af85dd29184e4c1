"""One controlled run: a cluster, its processes, and the scheduler's steps.

The explorer process is the supervisor and the scheduler at once.  Every
process of the run -- ksmd, a task, the writer of ``run``, a reaper -- is
a pool process of the gate (``uksm.explorer.gate``), and only one runs at a
time; between two steps every other one is parked at a scheduling point
(``uksm.kernel.sched``), so the explorer's own work -- spawning,
delivering a signal, accounting an exit, the script's next command, the
checks -- happens while the world stands still, as part of the schedule.

What the supervisor's threads do in a normal run is done here by
processes that are scheduled like any other: a SIGKILLed task's lock
recovery, repair and exit run in a *reaper* process (``bodies._reaper``),
so that the recovery's waits are waits the scheduler models like every
other.  The recovery decides from one snapshot (``locks.recover(exact=True)``):
every live process is parked at a point, outside the protocol's windows.

A run is a sequence of *steps*: at each, the *chooser* (a strategy, or a
schedule being replayed) picks one enabled process to run to its next
point, or (``kills``) a process that has just reached a point to SIGKILL.
The default choice -- keep running the current process while it is
enabled and not sleeping, else the lowest-numbered enabled one -- is what a
schedule string leaves out: it records only the steps that deviate
(``uksm.explorer.schedule``).

The run's script -- a scenario, or a user's ``Machine`` script -- drives it
from the explorer between steps: ``run_until`` steps the world until what
the script waits for holds (``uksm.explorer.requests`` serves its
requests).  Time is logical (``G_CLOCK``, milliseconds): a sleep is a
yield -- the others go first -- and when the sleeper runs again the clock
moves to the sleep's end.
"""
from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from uksm.errors import MachineError
from uksm.explorer.bodies import BODIES
from uksm.explorer.gate import (
    BLOCKED,
    EXITED,
    G_CLOCK,
    G_FREE,
    G_KILLS,
    G_NSIG,
    G_SIGS,
    KILL,
    PARKED,
    S_ARG,
    S_BA,
    S_BB,
    S_BLK,
    S_CODE,
    S_IN,
    S_KP,
    S_OUT,
    S_SIG,
    S_STATE,
    S_STATUS,
    Gate,
)
from uksm.host import log as ulog
from uksm.host import oops as host_oops
from uksm.kernel import fsck, oom, sched
from uksm.kernel.cluster import Cluster, Config, destroy, pid_alive
from uksm.kernel.fork import (
    EAGAIN,
    forget_original_parent,
    fork_adopt,
    fork_go,
    fork_refuse,
    fork_return,
    fork_room,
)
from uksm.kernel.layout import (
    CS_RUNNING,
    EXIT_PATHS,
    EXIT_POLICIES,
    EXIT_REASONS,
    FORK_ASK,
    FORK_DONE,
    H_EXIT_POLICY,
    H_FRAMES_FREED,
    H_KSM_UNSYNCED,
    H_KSMD_PID,
    H_KSMD_TASK,
    H_PENDING_FREE,
    H_SHUTDOWN,
    H_STATE,
    H_SUPERVISOR_PID,
    H_UNMERGE_DONE,
    H_UNMERGE_GEN,
    H_UNMERGE_WAIT,
    K_RUN,
    L_HEAD_NEXT,
    M_EXIT_STAGE,
    M_ID,
    M_OOM_VICTIM,
    M_OWNER_PID,
    M_STATE,
    M_USERS,
    R_KSMD,
    R_SUPERVISOR,
    R_WORKER,
    R_WRITER,
    REF_USERS,
    S_EXIT_NOSLOT,
    S_EXITED,
    S_KILLED,
    S_LOCKDEP,
    S_MISMATCHES,
    S_PAGES_VERIFIED,
    S_REAPED,
    S_STARTED,
    S_USE_AFTER_FREE,
    T_FATAL,
    T_FORK,
    T_OOM_ORIGIN,
    T_PID,
    T_ROLE,
    T_STATE,
    TASK_SIZE,
    TS_ALIVE,
    TS_DEAD,
    TS_FREE,
    X_OOM,
    X_SIGNAL,
    XS_ZAPPED,
    ksm_block,
    stats_block,
)
from uksm.kernel.locks import Lock
from uksm.kernel.memory import free_frames
from uksm.kernel.mm import MM, mm_create, mmdrop
from uksm.kernel.watchdog import Watchdog

RUN, KILLED = 0, 1
Action = tuple[int, int]          # (RUN or KILLED, process id)

# findings, worst first (the status each gives is uksm run's: host/exitcodes);
# "assertion": the run's script raised (a user's scenario checks its own)
FINDINGS = ("deadlock", "hung", "oops", "use_after_free", "lockdep", "fsck", "mismatch", "leak",
            "assertion")
STATUS = {"deadlock": 3, "hung": 3, "oops": 5, "fsck": 4, "mismatch": 4, "leak": 4,
          "use_after_free": 1, "lockdep": 1, "assertion": 1}
RANK = {k: i for i, k in enumerate(FINDINGS)}
LOCK_CODES = frozenset({sched.CODE["lock"]})


class Diverged(Exception):
    """A replayed schedule does not fit its scenario: names the step."""


class RunOver(BaseException):
    """The run cannot go on (a finding ended it): unwinds the script.  A
    BaseException, so that a script's ``except Exception`` does not hold
    it."""


@dataclass
class Proc:
    id: int                 # its slot, and its number in a schedule
    role: str               # ksmd, task, writer, reaper
    name: str               # "ksmd", "t1", "writer(2)", "reaper(t1)"
    row: int
    pid: int = 0
    mm: int = 0
    state: int = PARKED
    status: int | None = None
    killed: bool = False
    stop: bool = False      # ksmd asked to stop (SIGTERM delivered)
    fresh: bool = True      # parked at a point no kill choice was offered at yet
    answers: int = 0        # a task's answers read (S_OUT)
    reused: bool = False    # its slot went to another process (World._slot): nothing of it is read there
    oom_view: Any = None    # what the OOM killer saw when it blocked for frames
    dead: "Proc | None" = None   # a reaper's dead process
    tid: str = ""           # a task's id for the script (w1, w2, ...)
    pages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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
    after_code: int = -1    # where it parked (-2: it exited, -3: killed)
    after_arg: int = 0
    explored: bool = True   # a step of the explored phase (a choice)
    via: int = 0            # the last kill point it passed on the way (0: none)
    sent: tuple[tuple[int, int], ...] = ()   # the signals it sent: (pid, signo)
    who: str = ""           # its name (a slot may be another process's later: World._slot)

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
    names: dict[int, str] = field(default_factory=dict)   # pid -> process name (this run's)
    raced: bool = False      # the script marked a race phase (Machine.race)
    timing: dict[str, float] = field(default_factory=dict)   # World.timing

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

    __slots__ = ("n", "enabled", "current", "current_yields", "killable", "explored", "procs", "codes")

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
        sleeping; else the lowest-numbered enabled one (after the current,
        round robin, when the current sleeps)."""
        cur, en = self.current, self.enabled
        if cur in en and not self.current_yields:
            return (RUN, cur)
        if self.current_yields:
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
    """The default policy, no choices."""

    def choose(self, v: View) -> Action:
        return v.default()


@dataclass
class Options:
    scenario: str = "oom-unmerge"
    exit_policy: str = "seed"
    oom_rule: str = "2.6.32"
    kernel: str = "2.6.32"     # KERNELS: whose mm/ksm.c
    hazards: tuple[str, ...] = ()
    seed: int = 0
    kills: int = 0              # SIGKILL choices a run may make
    max_steps: int = 20000      # a run longer than this is a livelock (0: no bound)
    from_start: bool = False    # choices from the start (else from the script's Machine.race())
    log_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)   # the cluster's (Config's) options


def config_of(o: Options) -> Config:
    """A controlled run's cluster: small, unless the script asks more."""
    cfg = Config(frames=64, max_tasks=16, max_mms=8, rwsem_n=2, va_pages=32, pages_to_scan=8,
                 sleep_ms=20, hung_timeout_ms=5000)
    for k, v in o.config.items():
        setattr(cfg, k, v)
    cfg.hazards = list(o.hazards)
    cfg.exit_policy = o.exit_policy
    cfg.oom_rule = o.oom_rule
    cfg.kernel = o.kernel
    return cfg


_runs = 0


class World:
    """One controlled run under ``chooser``."""

    def __init__(self, gate: Gate, o: Options, chooser: Chooser) -> None:
        global _runs
        _runs += 1
        self.gate = gate
        gate.bodies = BODIES
        self.o = o
        self.chooser = chooser
        self.name = f"x{os.getpid()}n{_runs}"
        self.procs: dict[int, Proc] = {}   # by slot: the process there now
        self.every: list[Proc] = []        # every process of the run, in order of start
        self.capacity = len(gate.gates)
        self.mms: dict[int, MM] = {}
        self.steps: list[Step] = []
        self.findings: list[Finding] = []
        self.current = -1
        self.explored = o.from_start
        self.raced = False
        self.kills_left = o.kills
        self.reap_queue: list[Proc] = []
        self.ksmd: Proc | None = None
        self.extra: dict[str, Any] = {}
        self.ended = False
        self.log: Any = ulog.NULL_LOG
        self.workers = 0
        self.by_tid: dict[str, Proc] = {}   # the tasks, by their id for the script (w1, w2, ...)
        self.locks: dict[int, Lock] = {}
        self.cl: Cluster
        # where the run's time went (tools/bench_explore.py --profile): the
        # phases' wall seconds, and the explorer's waits for its processes
        self.timing: dict[str, float] = {}
        self._mark = time.perf_counter()
        self.waited = 0.0
        self.resumes = 0

    # ---- boot and the end ----------------------------------------------------------------------
    def boot(self) -> None:
        o = self.o
        self.gate.reset()
        self.cl = Cluster.create(self.name, config_of(o))
        try:
            self._boot()
        except BaseException:
            self._teardown()
            raise
        self.lap("boot")

    def lap(self, phase: str) -> None:
        """The time since the last lap goes to ``phase``."""
        now = time.perf_counter()
        self.timing[phase] = self.timing.get(phase, 0.0) + now - self._mark
        self._mark = now

    def _boot(self) -> None:
        o = self.o
        q = self.cl.q
        q[H_SUPERVISOR_PID] = os.getpid()
        self.cl.bind(self.alloc_row(R_SUPERVISOR, os.getpid()))
        if o.log_dir:
            self.log = ulog.setup("supervisor", self.name, o.log_dir, boot_id=self.cl.boot_id)
            self.log.info("explore_start", scenario=o.scenario, exit_policy=o.exit_policy,
                          hazards=list(o.hazards), seed=o.seed)
        q[H_STATE] = CS_RUNNING
        self._phase()
        self.start_ksmd()

    def race(self) -> None:
        """The script's race phase begins: from here the chooser chooses."""
        self.raced = True
        self.lap("setup")
        if not self.explored:
            self.explored = True
            self._phase()

    def _phase(self) -> None:
        self.gate.w[G_FREE] = 0 if self.explored else 1
        self.gate.w[G_KILLS] = self.kills_left if self.explored else 0

    def outcome(self) -> Outcome:
        """The checks at the end (unless the run ended stuck), the report,
        and the teardown."""
        self.lap("race" if self.raced else "setup")
        try:
            report = self._final()
            self.lap("checks")
        finally:
            self._teardown()
            self.lap("teardown")
        names = {p.pid: p.name for p in self.every}
        self.timing["waited"] = self.waited
        self.timing["resumes"] = self.resumes
        return Outcome(self.steps, self.findings, report, [p.name for p in self.procs.values()],
                       names, self.raced, self.timing)

    # ---- processes -----------------------------------------------------------------------------
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
        raise RuntimeError("too many tasks for the run's cluster")

    def free_row(self, row: int) -> None:
        t = self.cl.trow(row)
        t.pid = 0
        t.state = TS_FREE

    def _slot(self) -> int:
        """The slot for a new process: the next never used; once all of
        the gate's are, the lowest whose process is over and forgotten
        (``_reusable``) -- the lowest, so that a replay reuses the same.
        Reuse begins only when the gate is full: a run that fits keeps
        its process numbers, and so do the schedules recorded before."""
        if len(self.procs) < self.capacity:
            return len(self.procs)
        slot = next((i for i, q in sorted(self.procs.items()) if self._reusable(q)), -1)
        if slot < 0:
            raise MachineError(f"a controlled run has room for {self.capacity} processes at once (tasks, "
                               f"their reapers, ksmd, writers): this one needs more")
        return slot

    def _reusable(self, q: Proc) -> bool:
        """``q`` is over and nothing will look at its slot again: exited,
        its answers taken, not waiting for its reaper (a dead task or
        ksmd), not the reaper of a death still being accounted."""
        if q.state != EXITED or q.reused or q is self.ksmd or q in self.reap_queue:
            return False
        if q.role in ("task", "fsck") and self.answered(q):
            return False
        return not any(r.dead is q and r.state != EXITED for r in self.procs.values())

    def _spawn(self, role: str, name: str, row: int, job: dict[str, Any], **kw: Any) -> Proc:
        slot = self._slot()
        if slot in self.procs:   # reused
            self.procs[slot].reused = True
            self.gate.set_word(slot, S_SIG, 0)   # nothing meant for the old one reaches the new
        p = Proc(slot, role, name, row, **kw)
        p.answers = self.gate.word(slot, S_OUT)   # (a reused slot's count goes on)
        self.procs[slot] = p
        self.every.append(p)
        job = {"cluster": self.name, "boot_id": self.cl.boot_id, "row": row, "log_dir": self.o.log_dir,
               **job}
        p.pid = self.gate.assign(slot, role, job)
        self.cl.q[self.cl.tbase(row) + T_PID] = p.pid
        self._wait(p)
        return p

    def start_ksmd(self) -> Proc:
        row = self.alloc_row(R_KSMD)
        self.cl.q[H_KSMD_TASK] = row
        p = self._spawn("ksmd", "ksmd", row, {})
        self.cl.q[H_KSMD_PID] = p.pid
        self.ksmd = p
        return p

    def new_task(self, pages: int, pid: int = 0) -> tuple[int, MM, int]:
        """A new task's row and empty address space (dup_task_struct and
        mm_alloc: the half of fork and exec before the process runs), and
        its number.  ``pid``: who acts on the row meanwhile (a forking
        parent)."""
        cl = self.cl
        row = self.alloc_row(R_WORKER, pid)
        self.workers += 1
        n = self.workers
        mm = mm_create(cl, row, n)
        t = cl.trow(row)
        t.mm = mm.id
        t.worker_no = n
        t.pages = pages
        self.mms[mm.id] = mm
        return row, mm, n

    def spawn_task(self, pages: int, kind: str = "scripted", **job: Any) -> Proc:
        """A task (a user process): its row and address space first, as
        fork/exec would; ``kind``: "scripted" (commands from the script)
        or "worker" (a built-in workload)."""
        row, mm, n = self.new_task(pages)
        return self._start_task(row, mm, n, pages, {"kind": kind, **job})

    def _start_task(self, row: int, mm: MM, n: int, pages: int, job: dict[str, Any]) -> Proc:
        """The task's process on its row and mm (wake_up_new_task)."""
        try:
            self._slot()   # room for its process, or none made (Supervisor.abandon_task)
        except MachineError:
            mmdrop(self.cl, mm.row, mm.id, REF_USERS, self.log)
            self.free_row(row)
            raise
        self.cl.q[S_STARTED] += 1
        job = {"mm": mm.id, "pages": pages, "worker_no": n, **job}
        p = self._spawn("task", f"t{n}", row, job, mm=mm.id, pages=pages, tid=f"w{n}")
        p.extra.update(kind=job["kind"], job=job)
        mm.words.owner_pid = p.pid
        self.by_tid[p.tid] = p
        return p

    # ---- fork: copy_process's process-table half (uksm.proc.forks in a normal run) ------------
    def _fork_answer(self, p: Proc) -> None:
        """Task ``p`` waits for its fork's answer (BLK_FORK, in its row's
        T_FORK): given now, as the step that asked ends, while the world
        stands still (the supervisor's ``Forks.poll`` in a normal run)."""
        st = self.cl.q[self.cl.tbase(p.row) + T_FORK]
        if st == FORK_ASK:
            self._fork_serve(p)
        elif st == FORK_DONE:
            self._fork_finish(p)

    def _fork_serve(self, p: Proc) -> None:
        """The new task's row and empty mm, given to the parent (FORK_GO),
        or -EAGAIN when the run's tables have no room (Forks.serve)."""
        cl = self.cl
        live = [x for x in self.tasks() if x.state != EXITED]
        inflight = sum(1 for x in live if cl.trow(x.row).fork_child)
        if not fork_room(cl, len(live) + inflight):
            fork_refuse(cl, p.row, -EAGAIN)
            self.log.info("fork_refused", worker=p.tid, mm=p.mm, err=-EAGAIN)
            return
        crow, _mm, _n = self.new_task(p.pages, pid=p.pid)
        fork_adopt(cl, crow, p.row, p.pid)
        fork_go(cl, p.row, crow)

    def _fork_finish(self, p: Proc) -> None:
        """dup_mm returned: the child's process on its row -- a scripted
        task's child takes commands (its parent's shadow first), a
        built-in worker's goes on with the parent's workload minus
        ``+fork`` for its life (Forks.start) --, or (an error: the parent
        tore the mm down) the row freed.  Then the fork returns."""
        from uksm.workers.workloads import fork_child
        cl = self.cl
        t = cl.trow(p.row)
        crow = t.fork_child - 1
        t.fork_child = 0
        if t.fork_err:
            self.free_row(crow)
            fork_return(cl, p.row, t.fork_err)
            return
        ct = cl.trow(crow)
        ct.fork_parent = 0
        pj = p.extra["job"]
        job = {k: pj[k] for k in ("kind", "workload", "seed", "churn_ms") if k in pj}
        job.update(forked=True, content_wno=pj.get("content_wno") or pj["worker_no"])
        if job["kind"] == "worker":
            job["workload"], job["exit_after_ms"] = fork_child(str(pj.get("workload", "vm")))
        c = self._start_task(crow, self.mms[ct.mm], ct.worker_no, p.pages, job)
        c.extra["parent"] = p.tid
        self.log.info("fork_child", worker=p.tid, mm=p.mm, child=c.tid, child_mm=c.mm)
        fork_return(cl, p.row, c.pid)

    def spawn_writer(self, value: int, oom_origin: bool | None = None) -> Proc:
        """echo VALUE > run: the writer task (run_store in its own
        context; PF_OOM_ORIGIN as the policy's kernel had it)."""
        q = self.cl.q
        origin = EXIT_POLICIES[q[H_EXIT_POLICY]] == "shipped" if oom_origin is None else oom_origin
        row = self.alloc_row(R_WRITER)
        self.cl.q[self.cl.tbase(row) + T_OOM_ORIGIN] = 0
        p = self._spawn("writer", f"writer({value})", row, {"value": value, "origin": bool(origin)})
        p.extra["value"] = value
        return p

    def spawn_fsck(self) -> Proc:
        """A live fsck (Machine.fsck()): a scheduled process of the
        supervisor's, which stops the world through the lock protocol."""
        return self._spawn("fsck", "fsck", self.alloc_row(R_SUPERVISOR, os.getpid()), {})

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.state != EXITED]

    def tasks(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "task"]

    def command(self, p: Proc, cmd: dict[str, Any]) -> None:
        """A command for scripted task ``p`` (it takes it when it next runs)."""
        self.gate.put(p.id, cmd)

    def answered(self, p: Proc) -> bool:
        return not p.reused and self.gate.word(p.id, S_OUT) != p.answers

    def take_answer(self, p: Proc) -> dict[str, Any]:
        p.answers = self.gate.word(p.id, S_OUT)
        ans: dict[str, Any] = self.gate.answer(p.id)
        return ans

    # ---- enabled ---------------------------------------------------------------------------------
    def lock(self, lid: int) -> Lock:
        lk = self.locks.get(lid)
        if lk is None:
            lk = self.locks[lid] = self.cl.lock_by_id(lid)
        return lk

    def oom_view(self) -> tuple:
        """What out_of_memory decides by: the mm rows' and writers' states."""
        cl, q = self.cl, self.cl.q
        mms = tuple((q[b + M_ID], q[b + M_STATE], q[b + M_USERS], q[b + M_OOM_VICTIM],
                     q[b + M_EXIT_STAGE] & XS_ZAPPED, q[b + M_OWNER_PID])
                    for b in (cl.mbase(r) for r in range(cl.max_mms)) if q[b + M_ID])
        ws = tuple((q[b + T_STATE], q[b + T_FATAL], q[b + T_OOM_ORIGIN])
                   for b in (cl.tbase(r) for r in range(cl.max_tasks)) if q[b + T_ROLE] == R_WRITER)
        return mms, ws, q[H_PENDING_FREE]

    def unmerge_waits(self) -> bool:
        """A failed run=2's writer waits for ksmd to free the rmap_items of
        the mms it finished (ksm.ksmd_remove_rmap_items)."""
        q = self.cl.q
        return q[H_UNMERGE_WAIT] != 0 and q[H_UNMERGE_WAIT] != q[H_UNMERGE_DONE]

    def enabled(self, p: Proc) -> bool:
        g = self.gate
        if p.state == PARKED:
            return g.word(p.id, S_CODE) not in LOCK_CODES or self.lock(g.word(p.id, S_ARG)).sem.value > 0
        if p.state != BLOCKED:
            return False
        q = self.cl.q
        kind, a, b = g.word(p.id, S_BLK), g.word(p.id, S_BA), g.word(p.id, S_BB)
        if kind == sched.BLK_LOCK:
            # ksmd waiting for the mutex a failed run=2's writer holds is
            # woken to serve it (Ksmd.serve_unmerge, its Task.abort hook)
            return self.lock(a).sem.value > 0 or (p.role == "ksmd" and self.unmerge_waits())
        if kind == sched.BLK_TIME:
            return True   # a sleep is a yield: see step (the others first) and _run_one (the clock)
        fatal = q[self.cl.tbase(p.row) + T_FATAL]
        if kind == sched.BLK_CMD:
            return bool(fatal) or g.word(p.id, S_IN) != a
        if kind == sched.BLK_FRAMES:
            return (q[H_FRAMES_FREED] != a or free_frames(self.cl) > 0 or bool(b and fatal)
                    or self.oom_view() != p.oom_view)
        if kind == sched.BLK_KSMD_IDLE:  # ksmd_should_run, or Ksmd.behind (b: its unmerge_gen)
            return (p.stop or bool(q[H_SHUTDOWN]) or q[K_RUN] != a
                    or (q[K_RUN] == 1 and q[L_HEAD_NEXT] != self.cl.head)
                    or q[H_UNMERGE_GEN] != b or q[H_KSM_UNSYNCED] != 0 or self.unmerge_waits())
        if kind == sched.BLK_FORK:   # answered as the step that asked ends (_fork_answer)
            return q[self.cl.tbase(p.row) + T_FORK] != a
        if kind == sched.BLK_UNMERGE:  # ksm.ksmd_remove_rmap_items: served, or no ksmd to serve it
            return q[H_UNMERGE_DONE] == a or bool(q[H_SHUTDOWN]) or not pid_alive(q[H_KSMD_PID])
        return False   # BLK_DELAY: looked at in _enabled

    def _enabled(self, live: list[Proc]) -> tuple[int, ...]:
        en = tuple(p.id for p in live if self.enabled(p))
        if not en:
            # a delay point is a barrier: released when nothing else can run
            en = tuple(p.id for p in live if p.state == BLOCKED
                       and self.gate.word(p.id, S_BLK) == sched.BLK_DELAY)[:1]
        return en

    # ---- the steps -------------------------------------------------------------------------------
    def run_until(self, pred: Callable[[], Any], what: str = "", budget_ms: int | None = None) -> Any:
        """Step until ``pred()`` holds; returns its value (or, with a
        ``budget_ms`` of logical time spent first, False).  RunOver when
        the run cannot go on (its finding is recorded)."""
        end = None if budget_ms is None else self.gate.w[G_CLOCK] + budget_ms
        while True:
            v = pred()
            if v:
                return v
            if end is not None and self.gate.w[G_CLOCK] > end:
                return False
            self.step(what)

    def now_ms(self) -> int:
        """The run's logical clock."""
        return int(self.gate.w[G_CLOCK])

    def can_step(self) -> bool:
        """A step would run something (a reaper to start, an enabled
        process): ``step`` would not find the run stuck."""
        return not self.ended and bool(self.reap_queue or self._enabled(self.live()))

    def step(self, what: str = "") -> None:
        """One step (or, when nothing can run: the run found stuck, and over)."""
        if self.ended:
            raise RunOver()
        self._start_reaper()
        live = self.live()
        en = self._enabled(live)
        if not en:
            self._stuck(live, what)
            self.ended = True
            raise RunOver()
        n = len(self.steps)
        if self.o.max_steps and n >= self.o.max_steps:
            self._livelock(n)
            self.ended = True
            raise RunOver()
        g = self.gate
        cur = self.current
        cp = self.procs.get(cur)
        cy = cp is not None and cp.state == BLOCKED and g.word(cur, S_BLK) == sched.BLK_TIME
        if cy and len(en) > 1:
            # a sleep lets every other runnable process go first: no strategy
            # may starve the others by running a sleeper on
            en = tuple(i for i in en if i != cur)
        if cp is not None and cp.state == PARKED and cur in en and g.modes[g.word(cur, S_CODE)] == KILL:
            en = (cur,)   # a kill point: the choice is to kill it there or go on, no other
        killable = (tuple(p.id for p in live if p.fresh and p.role in ("task", "ksmd", "writer")
                          and not p.stop) if self.kills_left and self.explored else ())
        v = View(n, en, cur, cy, killable, self.explored, self.procs,
                 {p.id: g.word(p.id, S_CODE) for p in live})
        a = self.chooser.choose(v) if self.explored else v.default()
        d = v.default()
        kind, pid = a
        p = self.procs.get(pid)
        if p is None or (kind == RUN and pid not in en) or (kind == KILLED and pid not in killable):
            raise Diverged(f"step {n}: the schedule chooses "
                           f"{'to kill' if kind == KILLED else 'to run'} process {pid}, "
                           f"which is not {'killable' if kind == KILLED else 'enabled'} there "
                           f"(enabled: {', '.join(self.procs[i].name for i in en)})")
        st = Step(n, en, cur, cy, killable, a, d, pid, g.word(pid, S_CODE), g.word(pid, S_ARG),
                  explored=self.explored, who=p.name)
        for i in killable:
            self.procs[i].fresh = False
        self.steps.append(st)
        if kind == KILLED:
            self.kills_left -= 1
            self._phase()
            st.after_code = -3
            self.deliver(p.pid, signal.SIGKILL)
            return
        self.current = pid
        self._run_one(p, st)
        st.after_code = g.word(pid, S_CODE) if p.state != EXITED else -2
        st.after_arg = g.word(pid, S_ARG)
        st.via = g.word(pid, S_KP)
        if self.o.log_dir:   # the schedule in the logs: 'uksm logs DIR trace' draws its steps (category sched)
            role = {"task": "worker"}.get(p.role, p.role)
            if st.preemption:
                self.log.info("preempt", step=n, role=role, pid=p.pid, proc=p.name)
            self.log.info("schedule_step", step=n, role=role, pid=p.pid, proc=p.name,
                          op=f"{sched.POINTS[st.code]} -> " + ("exit" if st.after_code == -2
                                                              else sched.POINTS[st.after_code]))

    def _run_one(self, p: Proc, st: Step | None = None) -> None:
        g = self.gate
        if p.state == BLOCKED and g.word(p.id, S_BLK) == sched.BLK_TIME:
            g.w[G_CLOCK] = max(g.w[G_CLOCK], g.word(p.id, S_BA))
        while True:
            g.resume(p.id)
            self._wait(p, st)
            if p.state == PARKED and g.word(p.id, S_CODE) in LOCK_CODES and not self.enabled(p):
                continue   # a lock that is taken: it blocks on it now, in this step (CHESS)
            return

    def _wait(self, p: Proc, st: Step | None = None) -> None:
        """The running process parked, blocked or exited: what it left us."""
        g = self.gate
        t0 = time.perf_counter()
        g.wait_parked(p.id)
        self.waited += time.perf_counter() - t0
        self.resumes += 1
        p.state = g.word(p.id, S_STATE)
        p.fresh = True
        if g.w[G_NSIG]:   # the signals its step sent to others
            sent = tuple((g.w[G_SIGS + i] >> 8, g.w[G_SIGS + i] & 0xff) for i in range(g.w[G_NSIG]))
            g.w[G_NSIG] = 0
            if st is not None:
                st.sent += sent
            for pid, sig in sent:
                self.deliver(pid, sig)
        if p.state == EXITED:
            self._exited(p)
            return
        if p.state == BLOCKED and g.word(p.id, S_BLK) == sched.BLK_FRAMES:
            p.oom_view = self.oom_view()
        if p.state == BLOCKED and g.word(p.id, S_BLK) == sched.BLK_FORK:
            self._fork_answer(p)
        if g.word(p.id, S_CODE) == sched.CODE["signal"] and p.state == PARKED:
            arg = g.word(p.id, S_ARG)
            self.deliver(arg >> 8, arg & 0xff)

    def deliver(self, pid: int, sig: int) -> None:
        """A signal, delivered at this step: SIGKILL ends the process here
        (its recovery and exit go to a reaper); another signal's effect on
        the task row (TIF_MEMDIE, a pending fatal signal) is made now, and
        the process's own handler runs as it next resumes."""
        p = next((x for x in self.procs.values() if x.pid == pid and x.state != EXITED), None)
        if p is None:
            return
        q = self.cl.q
        if sig == signal.SIGKILL:
            self.gate.kill(p.id)
            p.state, p.status, p.killed = EXITED, -signal.SIGKILL, True
            self.log.info("explore_kill", task=p.name)
            if p.role == "reaper":
                return
            q[self.cl.tbase(p.row) + T_STATE] = TS_DEAD
            crow = self.cl.trow(p.row).fork_child - 1
            if crow >= 0:   # a fork in flight dies with its parent (Reaper._claim)
                self.cl.trow(crow).state = TS_DEAD
            self.reap_queue.append(p)
            return
        b = self.cl.tbase(p.row)
        if p.role in ("task", "writer") and not q[b + T_FATAL] and sig in (oom.OOM_SIGNAL, signal.SIGTERM,
                                                                           signal.SIGINT):
            q[b + T_FATAL] = X_OOM if sig == oom.OOM_SIGNAL else X_SIGNAL
        if p.role == "ksmd" and sig in (signal.SIGTERM, signal.SIGINT):
            p.stop = True
        self.gate.set_word(p.id, S_SIG, sig)

    def _exited(self, p: Proc) -> None:
        """A process's body returned: account for it."""
        p.status = self.gate.word(p.id, S_STATUS)
        q = self.cl.q
        err = self.gate.error(p.id)
        if p.status == host_oops.OOPS_STATUS and p.role in ("ksmd", "writer"):
            self.find("oops", f"{p.name}: {err or 'an oops'}")
            self.ended = True
            return
        if (p.status not in (0, None) and p.role in ("task", "reaper")) or err:
            self.find("oops", f"{p.name} failed: {err or f'status {p.status}'}")
            self.ended = True
            return
        if p.role == "task":
            self.account_exit(p, reaped=False)
        elif p.role == "writer":
            from uksm.kernel.writer import result_of
            self.extra["run_store"] = {"value": p.extra.get("value"), "result": result_of(p.status),
                                       "run": q[K_RUN]}
            p.extra["result"] = result_of(p.status)
            self.free_row(p.row)
        elif p.role == "reaper":
            d = p.dead
            assert d is not None
            if p.extra.get("child_row", -1) >= 0:
                self.free_row(p.extra["child_row"])   # the half-made child, undone (undo_fork)
            if d.role == "task":
                self.account_exit(d, reaped=True, how="sigkill")
            elif d.role == "ksmd":
                self.free_row(d.row)
                self.start_ksmd()
            else:
                self.free_row(d.row)
            self.free_row(p.row)
        elif p.role in ("ksmd", "fsck"):
            self.free_row(p.row)

    def account_exit(self, p: Proc, reaped: bool, how: str | None = None) -> None:
        """Reaper.account_exit's books, kept while the world stands still."""
        q, cl, row = self.cl.q, self.cl, p.row
        tr = cl.trow(row)
        path = EXIT_PATHS[tr.exit_path]
        p.extra["path"] = path
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
        forget_original_parent(cl, p.pid)   # its children go to init
        self.free_row(row)

    def _start_reaper(self) -> None:
        """One recovery at a time, in order of death (as the recovery
        thread takes one batch at a time)."""
        if not self.reap_queue or any(p.role == "reaper" and p.state != EXITED for p in self.procs.values()):
            return
        dead = self.reap_queue.pop(0)
        row = self.alloc_row(R_SUPERVISOR, os.getpid())
        crow = self.cl.trow(dead.row).fork_child - 1   # its fork in flight: undone by its reaper
        p = self._spawn("reaper", f"reaper({dead.name})", row,
                        {"dead_row": dead.row, "dead_mm": dead.mm, "dead_role": dead.role,
                         "dead_name": dead.name, "child_row": crow,
                         "child_mm": self.cl.trow(crow).mm if crow >= 0 else 0}, dead=dead)
        p.dead = dead
        p.extra["child_row"] = crow

    def _stuck(self, live: list[Proc], what: str) -> None:
        """No process can run, and the script waits for ``what``: a
        deadlock (some wait for a lock or for frames: the watchdog's
        wait-for chain) or a hang."""
        g = self.gate
        for p in live:   # a lock taken meanwhile: let its waiter say so (CHESS's disabled try)
            if p.state == PARKED and g.word(p.id, S_CODE) in LOCK_CODES:
                st = Step(len(self.steps), (), self.current, False, (), (RUN, p.id), (RUN, p.id), p.id,
                          g.word(p.id, S_CODE), g.word(p.id, S_ARG), explored=False, who=p.name)
                self.steps.append(st)
                g.resume(p.id)
                self._wait(p)
                st.after_code = g.word(p.id, S_CODE) if p.state != EXITED else -2
                st.after_arg = g.word(p.id, S_ARG)
        live = self.live()
        on_locks = [p for p in live if p.state == BLOCKED
                    and g.word(p.id, S_BLK) in (sched.BLK_LOCK, sched.BLK_FRAMES)]
        if on_locks:
            wd = Watchdog(self.cl, 0, lambda r: None)
            first = next((p for p in on_locks if p.role in ("task", "writer", "reaper")), on_locks[0])
            lines, _cycle, _links = wd.chain(first.row, 0)
            lines = [self.unpid(_no_seconds(x)) for x in lines]
            self.find("deadlock", f"every live process is blocked ({len(live)}): {lines[0]}", lines)
        else:
            names = ", ".join(f"{p.name} ({_blk_name(g.word(p.id, S_BLK))})" for p in live)
            self.find("hung", f"nothing can run{' while the script waits for ' + what if what else ''}: "
                              f"{names or 'no process left'}")

    def unpid(self, line: str) -> str:
        """A line with this run's pids replaced by process names (a
        replay's pids differ: its text must not)."""
        names = {p.pid: p.name for p in self.every if p.pid}
        return re.sub(r"\bpid (\d+)", lambda m: names.get(int(m[1]), "pid ?"), line)

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
    def close(self) -> None:
        """Machine.close under the scheduler: every task exits through its
        path (a command, or it is exiting already), the reapers finish,
        ksmd frees what the exits left it and goes idle; then it stops."""
        self.lap("race" if self.raced else "setup")
        for p in self.tasks():
            orphan = "parent" in p.extra and not p.extra.get("adopted")
            if p.state == EXITED:
                continue
            if p.extra.get("kind") == "scripted" and not p.extra.get("exiting") and not orphan:
                p.extra["exiting"] = True
                self.command(p, {"cmd": "exit"})
            elif p.extra.get("kind") == "worker" or (orphan and not p.extra.get("exiting")):
                # a scripted child nobody adopted (its fork's caller died before
                # its answer) waits for its parent's shadow: told to stop, as
                # the supervisor's close_tasks closes its socket
                p.extra["exiting"] = True
                self.deliver(p.pid, signal.SIGTERM)
        self.run_until(self._settled, "every task's exit")
        k = self.ksmd
        if k is not None and k.state != EXITED:
            self.deliver(k.pid, signal.SIGTERM)   # ksmdctl.stop: it frees what it must, then stops
            self.run_until(lambda: k.state == EXITED, "ksmd to stop")
        self.lap("close")

    def _settled(self) -> bool:
        """Every task and reaper done, and ksmd idle (nothing left for it)."""
        if self.reap_queue or any(p.state != EXITED for p in self.procs.values() if p.role != "ksmd"):
            return False
        k = self.ksmd
        return k is None or k.state == EXITED or not self.enabled(k)

    def _final(self) -> dict[str, Any]:
        cl, q = self.cl, self.cl.q
        stuck = any(f.kind in ("deadlock", "hung", "oops", "assertion") for f in self.findings)
        fs: dict[str, Any] = {"ok": False, "errors": ["not checked: the run ended stuck (a deadlock, a "
                                                      "hang, an oops, or the script raised)"]}
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
                "fsck": fs, "use_after_free": q[S_USE_AFTER_FREE], "lockdep": q[S_LOCKDEP], **self.extra}

    def _teardown(self) -> None:
        for p in self.procs.values():
            if p.state != EXITED:
                self.gate.kill(p.id)
                p.state = EXITED
        for lk in self.locks.values():
            try:
                lk.close()
            except Exception:
                pass
        for mm in self.mms.values():
            try:
                mm.seg.close()
            except Exception:
                pass
        try:
            self.cl.close()
        except Exception:
            pass
        destroy(self.name)
        if self.o.log_dir:
            ulog.close()


def _no_seconds(line: str) -> str:
    """The watchdog's chain without its wall-clock seconds (a controlled
    run's time is logical: the same schedule gives the same chain)."""
    return re.sub(r" for -?\d+\.\d+s", "", line)


def _blk_name(kind: int) -> str:
    return {sched.BLK_NONE: "parked", sched.BLK_LOCK: "lock", sched.BLK_FRAMES: "frames",
            sched.BLK_KSMD_IDLE: "ksmd idle",
            sched.BLK_TIME: "asleep", sched.BLK_CMD: "waits for a command",
            sched.BLK_DELAY: "a delay point", sched.BLK_UNMERGE: "ksmd's unmerge service",
            sched.BLK_FORK: "its fork's answer"}.get(kind, "?")


__all__ = ["World", "Options", "Outcome", "Finding", "Step", "View", "Default", "Diverged", "RunOver",
           "RUN", "KILLED", "FINDINGS", "STATUS", "RANK"]
