"""A cluster's shared state as one process sees it: segments, locks, rows.

``Cluster.create`` (the supervisor, at boot) makes the control segment, the
frame table, the frame pool and the global semaphores; every other process
``Cluster.attach``-es to them and gets a ``Task`` on the row the supervisor
gave it.  Address spaces and their semaphores are opened lazily and cached:
an mm's objects are unlinked at its last ``mmdrop``, but a process that
has them open keeps valid handles, as a kernel thread keeps a pointer to an
mm_struct it holds a count on.
"""
from __future__ import annotations

import functools
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import posix_ipc

from uksm.host import shm
from uksm.host.log import NULL_LOG
from uksm.kernel.layout import (
    A_FREE_TOP,
    C_ALLOC,
    C_DAEMON,
    C_MMAP,
    C_MMLIST,
    C_PTL,
    C_WMUTEX,
    CS_STARTING,
    CTL_FIXED_END,
    EXIT_POLICIES,
    F_ZERO,
    FR_COUNT,
    FR_FLAGS,
    FRAME_SIZE,
    H_BOOT_ID,
    H_CREATED_NS,
    H_EXIT_POLICY,
    H_HAZARDS,
    H_HUNG_TIMEOUT_MS,
    H_KERNEL,
    H_KSMD_POINT,
    H_LOCK_WAIT_MS,
    H_MAGIC,
    H_MAX_MMS,
    H_MAX_TASKS,
    H_NEXT_MM_ID,
    H_NFRAMES,
    H_OOM_RULE,
    H_RWSEM_N,
    H_STATE,
    H_SUPERVISOR_PID,
    H_VA_PAGES,
    H_VERSION,
    HAZARDS,
    K_ADVISOR_MAX_CPU,
    K_ADVISOR_MAX_PAGES_TO_SCAN,
    K_ADVISOR_MIN_PAGES_TO_SCAN,
    K_ADVISOR_TARGET_SCAN_TIME,
    K_MAX_KERNEL_PAGES,
    K_MAX_PAGE_SHARING,
    K_MERGE_ACROSS_NODES,
    K_PAGES_TO_SCAN,
    K_RUN,
    K_SLEEP_MS,
    K_SMART_SCAN,
    K_STABLE_NODE_CHAINS_PRUNE_MS,
    KERNELS,
    KV_618,
    L_HEAD_NEXT,
    L_HEAD_PREV,
    L_SCAN_SLOT,
    M_ID,
    MAGIC,
    MM_SIZE,
    OOM_RULES,
    PAGE_SIZE,
    S_LOCKDEP,
    S_USE_AFTER_FREE,
    T_STATE,
    TASK_SIZE,
    TS_ALIVE,
    TS_REAPING,
    VERSION,
    ZERO_PFN,
)
from uksm.kernel.locks import Lock, Task, holders_of, lock_name
from uksm.kernel.views import MmRow, TaskRow

# lockdep (locks.Task.lockdep_check) in every task: UKSM_LOCKDEP=1 (the
# test suite sets it); off by default, every lock operation pays for it
LOCKDEP = os.environ.get("UKSM_LOCKDEP") == "1"


@dataclass
class Config:
    """What a cluster is booted with (``uksm run`` / ``uksm up`` options)."""
    frames: int = 4096
    max_tasks: int = 64
    max_mms: int = 64
    rwsem_n: int = 32
    va_pages: int = 4096
    exit_policy: str = "seed"
    oom_rule: str = "2.6.32"
    kernel: str = "2.6.32"      # KERNELS: whose mm/ksm.c (H_KERNEL)
    hazards: list[str] = field(default_factory=list)
    hung_timeout_ms: int = 5000
    lock_wait_ms: int = 100
    run: int = 1
    pages_to_scan: int = 100
    sleep_ms: int = 20


def sizes(cfg: Config) -> tuple[int, int, int]:
    """Bytes of the control block, the frame table and the pool."""
    ctl = (CTL_FIXED_END + cfg.max_tasks * TASK_SIZE + cfg.max_mms * MM_SIZE) * 8
    frames = cfg.frames * (FRAME_SIZE + 1) * 8
    return ctl, frames, cfg.frames * PAGE_SIZE


class Cluster:
    def __init__(self, name: str) -> None:
        self.name = shm.check_cluster_name(name)
        self.ctl: shm.Segment
        self.frames_seg: shm.Segment
        self.pool: shm.Segment
        self.task: Task
        self._mm_locks: dict[int, tuple[Lock, Lock, Lock]] = {}

    # -- boot / attach ------------------------------------------------------
    @classmethod
    def create(cls, name: str, cfg: Config) -> "Cluster":
        self = cls(name)
        if shm.leftovers(name):
            raise shm.UksmError(f"cluster {name!r} already exists (or a dead one left objects): "
                                f"whoever runs it ends it ('uksm down --cluster {name}' for one "
                                f"started by 'uksm up'), 'uksm cleanup --cluster {name}' removes "
                                f"a dead one's", 2)
        ctl_size, fr_size, pool_size = sizes(cfg)
        shm.check_room(name, ctl_size + fr_size + pool_size)
        made: list[tuple[str, str]] = []
        try:
            self.ctl = shm.create_segment(name, "ctl", ctl_size)
            made.append(("shm", "ctl"))
            # the creator first (the supervisor, or an in-process tool), before
            # any other object exists: whoever finds this cluster's objects
            # while it is being made can tell whose they are (a concurrent
            # test session's leak fixture must not take a booting cluster
            # for one left behind); the supervisor records itself again
            self.ctl.q[H_SUPERVISOR_PID] = os.getpid()
            self.frames_seg = shm.create_segment(name, "frames", fr_size)
            made.append(("shm", "frames"))
            self.pool = shm.create_segment(name, "pool", pool_size, sparse=True)
            made.append(("shm", "pool"))
            for what in ("daemon", "mmlist", "zone"):
                shm.create_sem(name, what, 1)
                made.append(("sem", what))
            shm.create_sem(name, "killpoints", 0)
            made.append(("sem", "killpoints"))
        except BaseException:
            for kind, what in made:
                (shm.unlink_shm if kind == "shm" else shm.unlink_sem)(name, what)
            raise
        q = self.ctl.q
        q[H_VERSION] = VERSION
        q[H_NFRAMES] = cfg.frames
        q[H_MAX_TASKS] = cfg.max_tasks
        q[H_MAX_MMS] = cfg.max_mms
        q[H_RWSEM_N] = cfg.rwsem_n
        q[H_VA_PAGES] = cfg.va_pages
        q[H_STATE] = CS_STARTING
        q[H_CREATED_NS] = time.time_ns()
        q[H_NEXT_MM_ID] = 1
        q[H_EXIT_POLICY] = EXIT_POLICIES.index(cfg.exit_policy)
        q[H_OOM_RULE] = OOM_RULES.index(cfg.oom_rule)
        q[H_KERNEL] = KERNELS.index(cfg.kernel)
        q[H_HAZARDS] = sum(HAZARDS[h] for h in cfg.hazards)
        q[H_HUNG_TIMEOUT_MS] = cfg.hung_timeout_ms
        q[H_LOCK_WAIT_MS] = cfg.lock_wait_ms
        q[H_KSMD_POINT] = -1
        q[H_BOOT_ID] = new_boot_id()
        q[K_RUN] = cfg.run
        q[K_PAGES_TO_SCAN] = cfg.pages_to_scan
        q[K_SLEEP_MS] = cfg.sleep_ms
        q[K_MAX_KERNEL_PAGES] = cfg.frames // 4  # ksm_init: "ksm_max_kernel_pages = totalram_pages / 4;"
        init_618_knobs(q)
        head = cfg.max_mms
        q[L_HEAD_NEXT] = q[L_HEAD_PREV] = q[L_SCAN_SLOT] = head
        # every frame free: the free stack holds them all, lowest on top
        # (one slice assignment: a loop of word stores was ~20 ms of a
        # 200k-frame boot, before any task can start)
        sb = cfg.frames * FRAME_SIZE
        self.frames_seg.q[sb:sb + cfg.frames] = array("q", range(cfg.frames - 1, -1, -1))
        q[A_FREE_TOP] = cfg.frames
        if cfg.kernel == KERNELS[KV_618]:
            reserve_zero_page(self.frames_seg.q, q)
        self._open_globals()
        q[H_MAGIC] = MAGIC
        return self

    @classmethod
    def attach(cls, name: str, boot_id: int | None = None) -> "Cluster":
        """Map a running cluster.  ``boot_id``: the instance a child was
        started for (its ``--boot-id``).  A child outlives its cluster when
        its supervisor goes on living (a script whose Machine closed while
        the child was still starting): by the time it attaches, a newer
        cluster may have the same name -- and its run=2 writer would unmerge
        that one.  So a child checks the instance before it writes anything,
        and one of an older instance (or of one not yet made) gets
        ``StaleCluster``, having touched nothing."""
        self = cls(name)
        self.ctl = shm.attach_segment(name, "ctl")
        if self.ctl.q[H_MAGIC] != MAGIC or (boot_id is not None and self.ctl.q[H_BOOT_ID] != boot_id):
            theirs = self.ctl.q[H_BOOT_ID]
            self.ctl.close()
            if boot_id is not None:
                raise StaleCluster(f"cluster {name!r} is not the instance this task was started "
                                   f"for (boot id {boot_id}, the cluster's {theirs}): its cluster "
                                   f"is gone, and it leaves this one alone")
            raise shm.UksmError(f"cluster {name!r} is not initialised (booting, or a dead one: "
                                f"'uksm cleanup --cluster {name}')", 1)
        self.frames_seg = shm.attach_segment(name, "frames")
        self.pool = shm.attach_segment(name, "pool", sparse=True)
        self._open_globals()
        return self

    def _open_globals(self) -> None:
        q = self.ctl.q
        self.q = q
        self.boot_id = q[H_BOOT_ID]
        self.fq = self.frames_seg.q
        self.nframes = q[H_NFRAMES]
        self.max_tasks = q[H_MAX_TASKS]
        self.max_mms = q[H_MAX_MMS]
        self.rwsem_n = q[H_RWSEM_N]
        self.va_pages = q[H_VA_PAGES]
        self.head = self.max_mms
        self.kernel_index = q[H_KERNEL]
        self.task_off = CTL_FIXED_END
        self.mm_off = CTL_FIXED_END + self.max_tasks * TASK_SIZE
        self.stack_off = self.nframes * FRAME_SIZE
        self.daemon = Lock(shm.open_sem(self.name, "daemon"), 1, C_DAEMON)
        self.mmlist = Lock(shm.open_sem(self.name, "mmlist"), 1, C_MMLIST)
        self.zone = Lock(shm.open_sem(self.name, "zone"), 1, C_ALLOC)
        # kill points hit: a semaphore used as a counter, since sem_post is
        # the one atomic increment every process here has
        self.kill_points_sem = shm.open_sem(self.name, "killpoints")

    @property
    def kernel(self) -> str:
        """Whose mm/ksm.c this cluster emulates: "2.6.32" or "6.18" (H_KERNEL)."""
        return KERNELS[self.kernel_index]

    @property
    def modern(self) -> bool:
        """True under 6.18: every 6.18 difference in the code tests this."""
        return self.kernel_index == KV_618

    def kill_points_hit(self) -> int:
        return int(self.kill_points_sem.value)

    def bind(self, row: int) -> Task:
        """Use task row ``row`` for this process's (or thread's) locking."""
        task = self.new_task(row)
        self.task = task
        return task

    def new_task(self, row: int) -> Task:
        """Another Task handle (a supervisor thread) on ``row``."""
        task: Task
        if os.environ.get("UKSM_LOCKTRACE") == "1":  # uksm.kernel.locktrace: off, no cost
            from uksm.kernel.locktrace import TracedTask
            traced = TracedTask(self.q, self.tbase(row), row, holders=self.holders,
                                wait_log_ms=self.q[H_LOCK_WAIT_MS])
            traced.on_lock = functools.partial(self._lock_event, row)
            task = traced
        else:
            task = Task(self.q, self.tbase(row), row, holders=self.holders,
                        wait_log_ms=self.q[H_LOCK_WAIT_MS])
        if LOCKDEP:
            task.lockdep = self._lockdep_report
        return task

    # what lockdep reports (and lock events, UKSM_LOCKTRACE) go to: each
    # process sets its logger, a reaper its own on its thread_view
    lockdep_log: Any = NULL_LOG

    def _lock_event(self, row: int, op: str, lk: Lock, mode: str, waited_ns: int) -> None:
        """A TracedTask's lock taken (``lock_acquire``, with the time the call
        took) or about to be released (``lock_release``)."""
        log = self.lockdep_log
        if op == "acquire":
            log.info("lock_acquire", lock=lk.name, mode=mode, task_row=row,
                     waited_ms=round(waited_ns / 1e6, 3))
        else:
            log.info("lock_release", lock=lk.name, mode=mode, task_row=row)

    def _lockdep_report(self, kind: str, lk: Lock, held: int, op: str) -> None:
        """A lock taken against the order (locks.Task.lockdep_check): count
        it (S_LOCKDEP fails the run) and log ``lockdep`` with the call chain,
        as the kernel's lockdep prints the report and carries on -- into the
        deadlock, if it was one (the watchdog then reports the hang)."""
        import traceback
        self.q[S_LOCKDEP] += 1  # racy, but only zero or not matters
        # 8 frames: from the lock up to the OOM kill that ran an exit inside
        # the unmerger (oom_kill_and_mmput ... __ksm_exit_seed, down_write)
        chain = " <- ".join(f.name for f in reversed(traceback.extract_stack()[-10:-2]))
        log = self.lockdep_log
        log.error("lockdep", kind=kind, lock=lk.name, held=lock_name(held), op=op, chain=chain)

    def thread_view(self, row: int) -> "Cluster":
        """The same cluster for another thread of this process, locking as
        task ``row`` (a supervisor thread acting as a reaper)."""
        view = Cluster.__new__(Cluster)
        view.__dict__.update(self.__dict__)
        view._mm_locks = {}
        view.bind(row)
        return view

    # -- rows ---------------------------------------------------------------
    def tbase(self, row: int) -> int:
        return self.task_off + row * TASK_SIZE

    def mbase(self, row: int) -> int:
        return self.mm_off + row * MM_SIZE

    def trow(self, row: int) -> TaskRow:
        """Task ``row``'s words by name (``uksm.kernel.views``)."""
        return TaskRow(self.q, self.tbase(row))

    def mrow(self, row: int) -> MmRow:
        """mm table row ``row``'s words by name (``uksm.kernel.views``)."""
        return MmRow(self.q, self.mbase(row))

    def live_rows(self, exclude: tuple[int, ...] = ()) -> list[tuple[int, int]]:
        """Rows of live tasks (alive, or a reaper acting for a dead one)."""
        q = self.q
        out = []
        for r in range(self.max_tasks):
            b = self.tbase(r)
            if q[b + T_STATE] in (TS_ALIVE, TS_REAPING) and r not in exclude:
                out.append((r, b))
        return out

    def holders(self, lid: int) -> list[int]:
        return holders_of(self.q, self.live_rows(), lid)

    def mm_row(self, mm_id: int) -> int:
        """Row of address space ``mm_id``, or -1 once it is freed."""
        q = self.q
        for r in range(self.max_mms):
            if q[self.mm_off + r * MM_SIZE + M_ID] == mm_id:
                return r
        return -1

    # -- per-mm semaphores ---------------------------------------------------
    def mm_locks(self, mm_id: int) -> tuple[Lock, Lock, Lock]:
        """(mmap_sem, mmap_wmutex, pte_lock) of an address space."""
        lk = self._mm_locks.get(mm_id)
        if lk is None:
            lk = (Lock(shm.open_sem(self.name, f"mm{mm_id}.sem"), self.rwsem_n, C_MMAP, mm_id),
                  Lock(shm.open_sem(self.name, f"mm{mm_id}.wmx"), 1, C_WMUTEX, mm_id),
                  Lock(shm.open_sem(self.name, f"mm{mm_id}.ptl"), 1, C_PTL, mm_id))
            row = self.mm_row(mm_id)
            for x in lk:
                x.mmrow = row
                x.mmbase = self.mbase(row)
            self._mm_locks[mm_id] = lk
        return lk

    def lock_by_id(self, lid: int) -> Lock:
        """The lock whose id is ``lid`` (``locks.lock_id``: class << 40 | mm id)."""
        cls, mm = lid >> 40, lid & ((1 << 40) - 1)
        if cls == C_DAEMON:
            return self.daemon
        if cls == C_MMLIST:
            return self.mmlist
        if cls == C_ALLOC:
            return self.zone
        sem, wmx, ptl = self.mm_locks(mm)
        return {C_MMAP: sem, C_WMUTEX: wmx, C_PTL: ptl}[cls]

    def watch_use_after_free(self, log: Any) -> None:
        """Check, before every operation on an mm's lock by this task, that
        the mm is still alive (its row still holds it, not being freed):
        otherwise log ``use_after_free``, count it (S_USE_AFTER_FREE, which
        fails the run) and carry on, as KASAN reports and carries on.  The
        kernel's up_read on a freed mm_struct (the 2016 race) lands here.
        Reads of a freed mm's segment are not checked (every PTE read would
        pay for it); its locks are where the known races touched it."""
        q = self.q

        def report(lk: Lock, op: str) -> None:  # the task saw mm_freed(lk)
            q[S_USE_AFTER_FREE] += 1  # racy, but only zero or not matters
            log.error("use_after_free", mm=lk.mm, lock=lk.name, op=op)
        self.task.uaf = report

    def forget_mm(self, mm_id: int) -> None:
        lk = self._mm_locks.pop(mm_id, None)
        if lk is not None:
            for x in lk:
                try:
                    x.close()
                except posix_ipc.Error:
                    pass

    def pool_resident_bytes(self) -> int:
        return self.pool.resident_bytes()

    def close(self) -> None:
        for mm_id in list(self._mm_locks):
            self.forget_mm(mm_id)
        for obj in (self.daemon, self.mmlist, self.zone, self.kill_points_sem):
            try:
                obj.close()
            except posix_ipc.Error:
                pass
        for seg in (self.pool, self.frames_seg, self.ctl):
            seg.close()


def init_618_knobs(q: Any) -> None:
    """6.18's sysfs knobs at their mm/ksm.c initial values (reserved
    under 2.6.32 too, where no file shows them); the counters start at 0."""
    q[K_MAX_PAGE_SHARING] = 256             # 4.13, 2c653d0ee2ae: ksm_max_page_sharing = 256
    q[K_STABLE_NODE_CHAINS_PRUNE_MS] = 2000  # 4.13: ksm_stable_node_chains_prune_millisecs = 2000
    q[K_MERGE_ACROSS_NODES] = 1             # 3.9, 90bd6fd31c80: ksm_merge_across_nodes = 1
    q[K_SMART_SCAN] = 1                     # 6.7 "mm/ksm: add "smart" page scanning mode": true
    q[K_ADVISOR_MAX_CPU] = 70               # 6.8, 4e5fa4f5eff6 "mm/ksm: add ksm advisor"
    q[K_ADVISOR_TARGET_SCAN_TIME] = 200     # seconds
    q[K_ADVISOR_MIN_PAGES_TO_SCAN] = 500
    q[K_ADVISOR_MAX_PAGES_TO_SCAN] = 30000
    # use_zero_pages 0 (4.11), advisor_mode 0 (KSM_ADVISOR_NONE): the zeroed segment's


def reserve_zero_page(fq: Any, q: Any) -> None:
    """6.18: the shared zero page (layout.ZERO_PFN, F_ZERO) off the free
    stack, where it is on top (the lowest frame), before any task runs:
    count 1, its reservation, never dropped (4.11, e86c59b1b12d "mm/ksm:
    improve deduplication of zero pages with colouring": ksmd maps it)."""
    b = ZERO_PFN * FRAME_SIZE
    fq[b + FR_COUNT] = 1
    fq[b + FR_FLAGS] = F_ZERO
    q[A_FREE_TOP] -= 1


class StaleCluster(shm.UksmError):
    """A child's cluster instance is gone (``Cluster.attach``'s boot id)."""


def new_boot_id() -> int:
    """A random, non-zero 48-bit id (exact as a JSON number in jq too)."""
    return int.from_bytes(os.urandom(6), "little") or 1


def add_task_args(ap: Any) -> None:
    """The arguments every child task (ksmd, a worker, the run writer)
    is started with (``Supervisor.child_args``)."""
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--boot-id", type=int, required=True,
                    help="the cluster instance (its header's boot id): checked before acting")
    ap.add_argument("--task", type=int, required=True)
    ap.add_argument("--log-dir")


def destroy(name: str) -> list[str]:
    """Unlink every object of the cluster (teardown, or cleanup)."""
    return shm.remove_all(name)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


__all__ = ["Cluster", "Config", "StaleCluster", "add_task_args", "destroy", "init_618_knobs", "new_boot_id",
           "pid_alive", "sizes"]
