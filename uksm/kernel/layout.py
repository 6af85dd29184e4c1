"""Layout of the shared memory: every structure is a run of int64 fields.

Each process maps the segments and reads/writes fields by index through a
``memoryview.cast('q')``: an aligned 8-byte store is one instruction, so a
single field update is atomic with respect to a SIGKILL and to readers in
other processes.  Multi-field updates are ordered so that one store commits
them (see the modules that own each structure).

Segments of a cluster ``C``:

- ``/uksm.C.ctl``: header, the /sys/kernel/mm/ksm block, stats, the
  ``ksm_mm_head`` list head and the ``ksm_scan`` cursor, the task table and
  the mm table (``mm_struct`` fused with its ``mm_slot``);
- ``/uksm.C.frames``: the frame table (``struct page``) and the free stack;
- ``/uksm.C.pool``: the frames themselves (physical memory);
- ``/uksm.C.mmN``: address space N: VMA table and page table.
"""
from __future__ import annotations

from typing import Any, TypedDict

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAGIC = 0x75_6B_73_6D_00_01  # "uksm" v1
VERSION = 1

# ---- control segment: header
H_MAGIC = 0
H_VERSION = 1
H_NFRAMES = 2
H_MAX_TASKS = 3
H_MAX_MMS = 4
H_RWSEM_N = 5
H_VA_PAGES = 6
H_SUPERVISOR_PID = 7
H_STATE = 8
H_CREATED_NS = 9
H_NEXT_MM_ID = 10
H_EXIT_POLICY = 11
H_HAZARDS = 12
H_HUNG_TIMEOUT_MS = 13
H_LOCK_WAIT_MS = 14
H_KSMD_TASK = 15
H_KSMD_PID = 16
H_KSMD_POINT = 17
H_KSMD_POINT_SIG = 18
H_SHUTDOWN = 19
H_NEXT_WORKER = 20
H_CMD_SEQ = 21
H_FRAMES_FREED = 22
H_MEM_LIMIT = 23
H_PENDING_FREE = 24
H_KSM_UNSYNCED = 25   # slots a legacy __ksm_exit freed since ksmd last published (under ksm_thread_mutex)
H_OOM_RULE = 26       # index in OOM_RULES: the OOM killer's victim choice, by kernel version
H_UNMERGE_GEN = 27    # bumped by run_store's unmerge: ksmd drops the rmap_items of the mms marked M_RMAP_GONE
# this instance of the cluster: a random 48-bit id, made at boot and given to
# every child in its arguments (``--boot-id``); a child checks it before it
# acts (``Cluster.attach``), so a straggler of an older cluster of the same
# name never writes into a newer one (/proc/sys/kernel/random/boot_id's part)
H_BOOT_ID = 28
# a failed unmerge's writer, still holding ksm_thread_mutex, asks ksmd to
# free the rmap_items of the mms it finished (H_UNMERGE_WAIT: that
# H_UNMERGE_GEN, 0 for none) and waits until ksmd has, and has published
# the counters (H_UNMERGE_DONE: the last generation ksmd did so for)
H_UNMERGE_WAIT = 29
H_UNMERGE_DONE = 30
# index in KERNELS: whose mm/ksm.c the cluster emulates (Config.kernel,
# ``--kernel``); every 6.18 difference in the code tests Cluster.modern
H_KERNEL = 31
HDR_END = 32

# ---- /sys/kernel/mm/ksm: knobs (written by ctl) and counters (written by ksmd)
K_RUN = HDR_END + 0
K_PAGES_TO_SCAN = HDR_END + 1
K_SLEEP_MS = HDR_END + 2
K_PAGES_SHARED = HDR_END + 3
K_PAGES_SHARING = HDR_END + 4
K_PAGES_UNSHARED = HDR_END + 5
K_PAGES_VOLATILE = HDR_END + 6
K_FULL_SCANS = HDR_END + 7
K_PAGES_SCANNED = HDR_END + 8
K_RMAP_ITEMS = HDR_END + 9
K_RUN_SEQ = HDR_END + 10
K_RUN_DONE = HDR_END + 11
K_STABLE_NODES = HDR_END + 12
# 2.6.32's ksm_max_kernel_pages: at most this many KSM pages (stable tree
# nodes), 0 for no limit; ksm_init's default is totalram_pages / 4
K_MAX_KERNEL_PAGES = HDR_END + 13
# 6.18's /sys/kernel/mm/ksm (KERNELS' "6.18"; unused under 2.6.32, where
# these files do not exist).  Defaults as mm/ksm.c of 6.18 initialises them
# (checked against this machine's 6.18 too), written at boot by Cluster.create.
# 4.13, 2c653d0ee2ae "ksm: introduce ksm_max_page_sharing per page
# deduplication limit": ksm_max_page_sharing = 256 (>= 2; EBUSY while
# pages_shared != 0), the chains/dups counters, and the prune period
K_MAX_PAGE_SHARING = HDR_END + 14
K_STABLE_NODE_CHAINS = HDR_END + 15
K_STABLE_NODE_DUPS = HDR_END + 16
K_STABLE_NODE_CHAINS_PRUNE_MS = HDR_END + 17   # ksm_stable_node_chains_prune_millisecs = 2000
# 4.11, e86c59b1b12d "mm/ksm: improve deduplication of zero pages with
# colouring": ksm_use_zero_pages (default false); 6.6, e2942062e01d "ksm:
# count all zero pages placed by KSM": ksm_zero_pages
K_USE_ZERO_PAGES = HDR_END + 18
K_ZERO_PAGES = HDR_END + 19
# 3.9, 90bd6fd31c80 "ksm: allow trees per NUMA node": ksm_merge_across_nodes
# = 1 (uksm has one node: the knob and its EBUSY rule only)
K_MERGE_ACROSS_NODES = HDR_END + 20
# 6.7, "mm/ksm: add "smart" page scanning mode": ksm_smart_scan = true,
# ksm_pages_skipped
K_SMART_SCAN = HDR_END + 21
K_PAGES_SKIPPED = HDR_END + 22
# 6.8, 4e5fa4f5eff6 "mm/ksm: add ksm advisor": ksm_advisor (ADVISOR_MODES'
# index: KSM_ADVISOR_NONE 0, KSM_ADVISOR_SCAN_TIME 1), ksm_advisor_max_cpu =
# 70, ksm_advisor_target_scan_time = 200 (s), ksm_advisor_min_pages_to_scan
# = 500, ksm_advisor_max_pages_to_scan = 30000
K_ADVISOR_MODE = HDR_END + 23
K_ADVISOR_MAX_CPU = HDR_END + 24
K_ADVISOR_TARGET_SCAN_TIME = HDR_END + 25
K_ADVISOR_MIN_PAGES_TO_SCAN = HDR_END + 26
K_ADVISOR_MAX_PAGES_TO_SCAN = HDR_END + 27
KSM_END = HDR_END + 28

# ---- stats: updated under ksm_mmlist_lock (or by their single writer)
S_STARTED = KSM_END + 0
S_EXITED = KSM_END + 1
S_EXIT_FAST = KSM_END + 2
S_EXIT_SLOW = KSM_END + 3
S_EXIT_LEGACY = KSM_END + 4
S_KILLED = KSM_END + 5
S_OOM_KILLED = KSM_END + 6
S_REAPED = KSM_END + 7
S_LOCK_RECOVERIES = KSM_END + 8
S_RECOVERIES = KSM_END + 9
S_KILL_POINTS = KSM_END + 10
S_PAGES_VERIFIED = KSM_END + 11
S_MISMATCHES = KSM_END + 12
S_MERGES = KSM_END + 13
S_COW_WORKER = KSM_END + 14
S_COW_KSMD = KSM_END + 15
S_SLOTS_FREED = KSM_END + 16
S_MM_FREED = KSM_END + 17
S_SIGNALS = KSM_END + 18
S_EXIT_NOSLOT = KSM_END + 19   # exits that found no mm_slot: ksmd freed it first, or none was made
# detectors (racy increments: only "zero or not" matters)
S_USE_AFTER_FREE = KSM_END + 20  # lock operations on a freed mm (locks.Task.uaf)
S_LOCKDEP = KSM_END + 21         # locks taken against the order, or twice (lockdep)
STATS_END = KSM_END + 22

# ---- ksm_mm_head, ksm_scan (under ksm_mmlist_lock) and the free-stack top (under zone_lock)
L_HEAD_NEXT = STATS_END + 0
L_HEAD_PREV = STATS_END + 1
L_SCAN_SLOT = STATS_END + 2
L_SCAN_ADDR = STATS_END + 3
L_SEQNR = STATS_END + 4
A_FREE_TOP = STATS_END + 5
CTL_FIXED_END = STATS_END + 6

# ---- task table row: one per process (or supervisor thread); lock entries follow
T_PID = 0
T_ROLE = 1
T_STATE = 2
T_MM = 3
T_START_NS = 4
T_WORKER_NO = 5
T_PAGES = 6
T_VERIFIED = 7
T_MISMATCHES = 8
T_EXIT_REASON = 9
T_KILL_POINT = 10
T_KILL_SIG = 11
T_FLIGHT_PFN = 12
T_FLIGHT_MM = 13
T_FLIGHT_VPN = 14
T_FATAL = 15
T_READY = 16
T_COW = 17
T_FAULTS = 18
T_FOR_ROW = 19
T_WORKLOAD = 20
T_SEED = 21
T_EXIT_PATH = 22
T_OOM_ORIGIN = 23    # PF_OOM_ORIGIN: the run=2 writer while it unmerges (the OOM killer's first choice)
T_EXIT_PROGRESS = 24  # bumped at every step of this task's exit (the livelock watchdog's clock)
# fork (uksm.kernel.fork, uksm.proc.forks): the parent's request to the
# supervisor, which plays copy_process's process-table half (the new task's
# row, its mm, its process), and the parent's dup_mm in between:
# T_FORK: FORK_ASK (the parent asks), FORK_GO (the new task's row is
# T_FORK_CHILD - 1, its mm made), FORK_DONE (dup_mm returned T_FORK_ERR),
# 0 again once the fork returned (T_FORK_PID: the child's pid, or the
# negative errno); a refusal (-EAGAIN) in place of FORK_GO
T_FORK = 25
T_FORK_CHILD = 26     # 1 + the row of the task being made, while the fork is in flight
T_FORK_ERR = 27       # dup_mm's result: 0 or -errno
T_FORK_PID = 28       # what fork returned: the child's pid, or -errno
T_FORK_PARENT = 29    # in the new task's row, until its process runs: 1 + the parent's row
# the parent's pid (task->real_parent: the OOM killer's children of a task),
# 1 (init) once the parent is gone, 0 for a task the supervisor started
T_PPID = 30
T_FIXED = 31

# ---- mm table row: mm_struct fused with its mm_slot (slot index == row index)
M_ID = 0
M_STATE = 1
M_OWNER_PID = 2
M_OWNER_TASK = 3
M_USERS = 4
M_REFS = 5
M_FLAGS = 6
M_RSS = 7
M_KSM_MAPPED = 8
M_RMAP_ITEMS = 9
M_MERGING = 10
M_EXIT_STAGE = 11
M_EXIT_PATH = 12
M_OOM_VICTIM = 13
M_WRITER_WAITING = 14
M_SLOT_USED = 15
M_SLOT_NEXT = 16
M_SLOT_PREV = 17
M_SLOT_RMAP = 18
M_PAGES = 19
M_CREATED_NS = 20
M_FREER_TASK = 21
M_WORKER_NO = 22
# the unmerge generation (H_UNMERGE_GEN) whose run=2 removed this mm's
# rmap_items (remove_trailing_rmap_items): ksmd frees its copies
M_RMAP_GONE = 23
# 6.6, e2942062e01d "ksm: count all zero pages placed by KSM":
# mm->ksm_zero_pages, the zero pages KSM placed in this mm (use_zero_pages)
M_ZERO_PAGES = 24
MM_SIZE = 25

STATS_NAMES = {
    "started": S_STARTED, "exited": S_EXITED, "exit_fast": S_EXIT_FAST,
    "exit_slow": S_EXIT_SLOW, "exit_legacy": S_EXIT_LEGACY, "exit_noslot": S_EXIT_NOSLOT,
    "killed": S_KILLED,
    "oom_killed": S_OOM_KILLED, "reaped": S_REAPED,
}

#: /sys/kernel/mm/ksm's knobs and counters, in its order, by their word
KSM_FIELDS: tuple[tuple[str, int], ...] = (
    ("run", K_RUN), ("pages_to_scan", K_PAGES_TO_SCAN), ("sleep_millisecs", K_SLEEP_MS),
    ("max_kernel_pages", K_MAX_KERNEL_PAGES),
    ("pages_shared", K_PAGES_SHARED), ("pages_sharing", K_PAGES_SHARING),
    ("pages_unshared", K_PAGES_UNSHARED), ("pages_volatile", K_PAGES_VOLATILE),
    ("full_scans", K_FULL_SCANS), ("pages_scanned", K_PAGES_SCANNED),
)

#: 6.18's /sys/kernel/mm/ksm, by their word: run, pages_to_scan and
#: sleep_millisecs first (as KSM_FIELDS), then 6.18 mm/ksm.c's ksm_attrs
#: order; max_kernel_pages is gone (2.6.33, "ksm: remove unswappable
#: max_kernel_pages").  Two are not words: general_profit (computed at each
#: read, as general_profit_show does: -1 here) and advisor_mode (the word is
#: the ADVISOR_MODES index; it reads as sysfs prints it, "[none] scan-time")
KSM_FIELDS_618: tuple[tuple[str, int], ...] = (
    ("run", K_RUN), ("pages_to_scan", K_PAGES_TO_SCAN), ("sleep_millisecs", K_SLEEP_MS),
    ("pages_scanned", K_PAGES_SCANNED), ("pages_shared", K_PAGES_SHARED),
    ("pages_sharing", K_PAGES_SHARING), ("pages_unshared", K_PAGES_UNSHARED),
    ("pages_volatile", K_PAGES_VOLATILE), ("pages_skipped", K_PAGES_SKIPPED),
    ("ksm_zero_pages", K_ZERO_PAGES), ("full_scans", K_FULL_SCANS),
    ("merge_across_nodes", K_MERGE_ACROSS_NODES), ("max_page_sharing", K_MAX_PAGE_SHARING),
    ("stable_node_chains", K_STABLE_NODE_CHAINS), ("stable_node_dups", K_STABLE_NODE_DUPS),
    ("stable_node_chains_prune_millisecs", K_STABLE_NODE_CHAINS_PRUNE_MS),
    ("use_zero_pages", K_USE_ZERO_PAGES), ("general_profit", -1), ("smart_scan", K_SMART_SCAN),
    ("advisor_mode", K_ADVISOR_MODE), ("advisor_max_cpu", K_ADVISOR_MAX_CPU),
    ("advisor_min_pages_to_scan", K_ADVISOR_MIN_PAGES_TO_SCAN),
    ("advisor_max_pages_to_scan", K_ADVISOR_MAX_PAGES_TO_SCAN),
    ("advisor_target_scan_time", K_ADVISOR_TARGET_SCAN_TIME),
)
#: sizeof(struct ksm_rmap_item) on 64-bit 6.18: what general_profit and
#: ksm_process_profit charge per rmap_item (6.4, d21077fbc2fc "mm: add new
#: KSM process and sysfs knobs")
KSM_RMAP_ITEM_SIZE = 64


class KsmBlock(TypedDict):
    """/sys/kernel/mm/ksm: the knobs and counters of KSM_FIELDS, in its order."""
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_kernel_pages: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int


class KsmBlock618(TypedDict):
    """6.18's /sys/kernel/mm/ksm: the fields of KSM_FIELDS_618, in its order."""
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    pages_scanned: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    pages_skipped: int
    ksm_zero_pages: int
    full_scans: int
    merge_across_nodes: int
    max_page_sharing: int
    stable_node_chains: int
    stable_node_dups: int
    stable_node_chains_prune_millisecs: int
    use_zero_pages: int
    general_profit: int
    smart_scan: int
    advisor_mode: str
    advisor_max_cpu: int
    advisor_min_pages_to_scan: int
    advisor_max_pages_to_scan: int
    advisor_target_scan_time: int


class TaskStats(TypedDict):
    """The tasks' counters of STATS_NAMES (the report's ``workers``)."""
    started: int
    exited: int
    exit_fast: int
    exit_slow: int
    exit_legacy: int
    exit_noslot: int
    killed: int
    oom_killed: int
    reaped: int


def ksm_block(q: Any) -> KsmBlock | KsmBlock618:
    """The /sys/kernel/mm/ksm block of the cluster's kernel (H_KERNEL),
    read from its words ``q`` (the one place it is built: reports, ``uksm
    ctl``, the API): 2.6.32's (KsmBlock), or 6.18's (KsmBlock618)."""
    if q[H_KERNEL] == KV_618:
        return ksm_block_618(q)
    return ksm_block_2632(q)


def ksm_block_2632(q: Any) -> KsmBlock:
    """2.6.32's block.  Spelled out, not a loop over KSM_FIELDS, so that
    mypy checks the keys against KsmBlock (tests/api/test_report_types.py
    checks the two agree)."""
    return KsmBlock(run=q[K_RUN], pages_to_scan=q[K_PAGES_TO_SCAN], sleep_millisecs=q[K_SLEEP_MS],
                    max_kernel_pages=q[K_MAX_KERNEL_PAGES],
                    pages_shared=q[K_PAGES_SHARED], pages_sharing=q[K_PAGES_SHARING],
                    pages_unshared=q[K_PAGES_UNSHARED], pages_volatile=q[K_PAGES_VOLATILE],
                    full_scans=q[K_FULL_SCANS], pages_scanned=q[K_PAGES_SCANNED])


def general_profit(q: Any) -> int:
    """6.18's general_profit_show: "(ksm_pages_sharing +
    atomic_long_read(&ksm_zero_pages)) * PAGE_SIZE - ksm_rmap_items *
    sizeof(struct ksm_rmap_item)" (6.4, d21077fbc2fc; ksm_zero_pages added
    in 6.6, e2942062e01d), a signed long: negative while rmap_items cost
    more than the merging saves."""
    return (q[K_PAGES_SHARING] + q[K_ZERO_PAGES]) * PAGE_SIZE - q[K_RMAP_ITEMS] * KSM_RMAP_ITEM_SIZE


def advisor_mode_text(mode: int) -> str:
    """advisor_mode_show: the modes with the current one in brackets."""
    return " ".join(f"[{m}]" if i == mode else m for i, m in enumerate(ADVISOR_MODES))


def ksm_block_618(q: Any) -> KsmBlock618:
    """6.18's block, spelled out as ksm_block_2632 is (KsmBlock618)."""
    return KsmBlock618(
        run=q[K_RUN], pages_to_scan=q[K_PAGES_TO_SCAN], sleep_millisecs=q[K_SLEEP_MS],
        pages_scanned=q[K_PAGES_SCANNED], pages_shared=q[K_PAGES_SHARED],
        pages_sharing=q[K_PAGES_SHARING], pages_unshared=q[K_PAGES_UNSHARED],
        pages_volatile=q[K_PAGES_VOLATILE], pages_skipped=q[K_PAGES_SKIPPED],
        ksm_zero_pages=q[K_ZERO_PAGES], full_scans=q[K_FULL_SCANS],
        merge_across_nodes=q[K_MERGE_ACROSS_NODES], max_page_sharing=q[K_MAX_PAGE_SHARING],
        stable_node_chains=q[K_STABLE_NODE_CHAINS], stable_node_dups=q[K_STABLE_NODE_DUPS],
        stable_node_chains_prune_millisecs=q[K_STABLE_NODE_CHAINS_PRUNE_MS],
        use_zero_pages=q[K_USE_ZERO_PAGES], general_profit=general_profit(q),
        smart_scan=q[K_SMART_SCAN], advisor_mode=advisor_mode_text(q[K_ADVISOR_MODE]),
        advisor_max_cpu=q[K_ADVISOR_MAX_CPU], advisor_min_pages_to_scan=q[K_ADVISOR_MIN_PAGES_TO_SCAN],
        advisor_max_pages_to_scan=q[K_ADVISOR_MAX_PAGES_TO_SCAN],
        advisor_target_scan_time=q[K_ADVISOR_TARGET_SCAN_TIME])


def stats_block(q: Any) -> TaskStats:
    """The tasks' counters (started, exited, each exit path, killed, ...),
    spelled out as ksm_block is."""
    return TaskStats(started=q[S_STARTED], exited=q[S_EXITED], exit_fast=q[S_EXIT_FAST],
                     exit_slow=q[S_EXIT_SLOW], exit_legacy=q[S_EXIT_LEGACY],
                     exit_noslot=q[S_EXIT_NOSLOT], killed=q[S_KILLED], oom_killed=q[S_OOM_KILLED],
                     reaped=q[S_REAPED])

# lock classes: the index of the lock entry in a task row.  A task holds at
# most one lock of each class at a time (ksmd drops one mm's mmap_sem before
# it takes another's, as the kernel does).  "frames" is not a lock: it is
# the allocator's wait for free frames, recorded the same way so that the
# hung-task watchdog can follow a chain through it.
LOCK_CLASSES = ("ksm_thread_mutex", "mmap_wmutex", "mmap_sem", "pte_lock",
                "zone_lock", "ksm_mmlist_lock", "frames")
C_DAEMON, C_WMUTEX, C_MMAP, C_PTL, C_ALLOC, C_MMLIST, C_FRAMES = range(7)
NCLASS = len(LOCK_CLASSES)
# a lock entry: which lock; word = seq << 3 | writer << 2 | state; units a
# writer holds; timeouts spent waiting; when the wait began (ns)
E_LOCK, E_WORD, E_HELD, E_SPINS, E_SINCE = range(5)
ESIZE = 5
T_LOCKS = T_FIXED
TASK_SIZE = T_LOCKS + NCLASS * ESIZE

ROLES = ("none", "supervisor", "ksmd", "worker", "reaper", "ctl", "writer")
R_NONE, R_SUPERVISOR, R_KSMD, R_WORKER, R_REAPER, R_CTL, R_WRITER = range(7)
# task states
TS_FREE, TS_ALIVE, TS_DEAD, TS_REAPING = range(4)
# why a worker exited (T_EXIT_REASON)
EXIT_REASONS = ("none", "exit", "signal", "oom", "sigkill")
X_NONE, X_EXIT, X_SIGNAL, X_OOM, X_SIGKILL = range(5)

# M_STATE: the mm states, MMS_ as the task states are TS_ and the cluster's
# CS_.  (They were MS_, the prefix the address-space segment's header words
# had too, so MS_FREEING == MS_VMAS_FREED == 4 and a state stored in a header
# word, or the reverse, read as right; the header words are SEG_ now.)
MM_STATES = ("free", "live", "exiting", "waiting-ksmd", "freeing")
MMS_FREE, MMS_LIVE, MMS_EXITING, MMS_ZOMBIE, MMS_FREEING = range(5)
# M_REFS: mm_count as a set of references, so that dropping one is an
# idempotent single store (a reaper may redo the drop of a killed task):
# REF_USERS is the one count all mm_users hold together, REF_KSM the mm_slot's
# (raised by __ksm_enter, dropped by whoever frees the slot).
REF_USERS, REF_KSM = 1, 2
MMF_VM_MERGEABLE = 1
# 6.4, d7597f59d1d3 "mm: add new api to enable ksm per process":
# prctl(PR_SET_MEMORY_MERGE, 1) sets MMF_VM_MERGE_ANY: every compatible VMA,
# now and later, is VM_MERGEABLE (6.18 only)
MMF_VM_MERGE_ANY = 2
# M_EXIT_STAGE: the exit steps done, as bits; each step is idempotent, so a
# reaper finishing a SIGKILLed task's exit does only the steps not marked.
XS_USERS0, XS_ZAPPED, XS_KSM_EXIT, XS_PGTABLES, XS_MMDROP = 1, 2, 4, 8, 16
EXIT_PATHS = ("none", "fast", "slow", "legacy")
# T_FORK's states (a negative value is the supervisor's refusal, -errno)
FORK_NONE, FORK_ASK, FORK_GO, FORK_DONE = range(4)
P_NONE, P_FAST, P_SLOW, P_LEGACY = range(4)

# ---- frame table (struct page) and free stack
FR_COUNT, FR_FLAGS, FR_AUX, FR_KEY0, FR_KEY1 = range(5)
FRAME_SIZE = 5
F_ANON, F_KSM, F_FREEING = 1, 2, 4
F_PCP = 8  # count 0, in the per-task list of task FR_AUX - 1 (uksm.kernel.memory)
# 6.18 only: the emulated shared zero page (ZERO_PAGE(0), my_zero_pfn).  4.11,
# e86c59b1b12d "mm/ksm: improve deduplication of zero pages with colouring":
# with use_zero_pages ksmd maps an all-zero page to it (replace_page with
# kpage = ZERO_PAGE) instead of merging it into a KSM page.  Cluster.create
# takes frame ZERO_PFN off the free stack before anything runs and keeps it
# for ever: count 1 (a reservation, as the kernel's zero page is
# PageReserved) plus one per PTE that maps it (the kernel's zero PTE is
# pte_special and takes no reference: uksm counts it so that fork's
# get_page, fsck's "count equals references" and the recovery rebuild stay
# one rule for every frame).  Every zero PTE of uksm is KSM-placed (a read
# of an untouched page maps nothing), so each is what 6.6's
# is_ksm_zero_pte (zero pfn and pte_dirty) names.
F_ZERO = 16
ZERO_PFN = 0

# ---- address-space segment: header, page table, VMA table
# SEG_: the header words of /uksm.C.mmN, named for the segment they head (the
# control segment's are H_); indexed in the segment's own words (``mm.pq``),
# never in the cluster's ``q`` as the M_ and T_ rows are
# SEG_NVMA: mm->map_count, the VMA rows in use (rows 0..map_count-1: a new
# row is written, then counted; a removed row is overwritten by the last)
SEG_MAGIC, SEG_ID, SEG_OWNER_PID, SEG_NVMA = range(4)
# set by exit_mmap's free_pgtables: the VMA table is destroyed (a walk oopses)
SEG_VMAS_FREED = 4
# the page table is backed (in /dev/shm) up to this vpn: sys_mmap backs the
# entries of what it maps, before the VMA exists, and every walk of the
# whole table stops here -- a task's table costs what it maps, not the
# address space's size (a read of a tmpfs hole would allocate it)
SEG_PT_TOP = 5
SEG_BOOT_ID = 6    # the cluster instance that made this address space (H_BOOT_ID)
# the VMA table is backed up to this row (MM.back_vma_table): a new row
# past it backs the next page first, as vm_area_alloc allocates
SEG_VMA_TOP = 7
V_START, V_END, V_FLAGS = range(3)
VMA_SIZE = 3
PT_OFF = 8
# sysctl_max_map_count's default (include/linux/mm.h, 2.6.32:
# DEFAULT_MAX_MAP_COUNT = 65536 - MAPCOUNT_ELF_CORE_MARGIN(5) - 1)
DEFAULT_MAX_MAP_COUNT = 65530


def max_map_count(va_pages: int) -> int:
    """The VMA rows of an address space of ``va_pages`` pages: one per
    page (every page its own area, the most a task can make), at most
    sysctl_max_map_count, as split_vma and mmap check it."""
    return min(va_pages, DEFAULT_MAX_MAP_COUNT)


def vma_off(va_pages: int) -> int:
    """The VMA table's first word: after the page table."""
    return PT_OFF + va_pages
VM_READ, VM_WRITE, VM_MERGEABLE, VM_LOCKED = 1, 2, 4, 8
# PTE: pfn << 2 | write << 1 | present; 0 is pte_none
PTE_PRESENT, PTE_WRITE = 1, 2
FIRST_VPN = 16  # the first pages of every address space stay unmapped (NULL)

# ---- exit policies and hazards
EXIT_POLICIES = ("seed", "shipped", "legacy")
POL_SEED, POL_SHIPPED, POL_LEGACY = range(3)
# Each hazard removes one later fix (or restores one early bug); README.md
# lists them with the commit that fixed each.
HAZARDS = {"no-fast-path": 1, "no-exit-checks": 2, "no-scan-head-check": 4,
           "up-read-after-unlock": 8, "no-unmerge-exit-check": 16, "oom-mmput-in-task": 32}
HZ_NO_FAST_PATH, HZ_NO_EXIT_CHECKS, HZ_NO_SCAN_HEAD_CHECK = 1, 2, 4
HZ_UP_READ_AFTER_UNLOCK, HZ_NO_UNMERGE_EXIT_CHECK, HZ_OOM_MMPUT_IN_TASK = 8, 16, 32
# the OOM killer of: 2.6.32 (select_bad_process skips a task without an mm
# before it looks at TIF_MEMDIE) or 4.1 (oom_scan_process_thread: TIF_MEMDIE
# first, so a victim stuck in its exit blocks every further kill)
OOM_RULES = ("2.6.32", "4.1")
OOM_2632, OOM_41 = range(2)
# whose mm/ksm.c the cluster emulates (H_KERNEL): 2.6.32 (the default), or
# 6.18's, for what a user can see (docs/KERNEL-MAP.md's 6.18 column)
KERNELS = ("2.6.32", "6.18")
KV_2632, KV_618 = range(2)
# 6.8's advisor_mode, as sysfs spells them (KSM_ADVISOR_NONE, KSM_ADVISOR_SCAN_TIME)
ADVISOR_MODES = ("none", "scan-time")

# cluster states
CS_STARTING, CS_RUNNING, CS_STOPPING, CS_STOPPED = range(4)
