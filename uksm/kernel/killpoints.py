"""Named kill points: places where a worker dies on request.

A *worker* point is armed in the worker's task row (T_KILL_POINT, T_KILL_SIG);
when the worker reaches it, it sends itself the signal (SIGKILL: it vanishes
right there, possibly holding locks; SIGTERM: it notices at its next safe
point and exits through its own exit path) and disarms it, so it fires once.

A *ksmd* point is armed in the control block (H_KSMD_POINT): when ksmd
(or, for the unmerge points, the run=2 writer doing ksmd's kernel-side
work) reaches it while working inside some mm, it sends the signal to that mm's
owner -- "kill the worker while ksmd scans it" -- and carries on.
"""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from uksm.host.log import NULL_LOG
from uksm.kernel import sched
from uksm.kernel.layout import H_KSMD_POINT, H_KSMD_POINT_SIG, M_OWNER_PID, T_KILL_POINT, T_KILL_SIG

if TYPE_CHECKING:
    from uksm.kernel.cluster import Cluster

POINTS: dict[str, tuple[str, str]] = {
    "fault_after_alloc": ("worker", "page fault: frame allocated, not yet installed in the PTE"),
    "cow_after_copy": ("worker", "COW fault: page copied to the new frame, PTE not yet replaced"),
    "zone_lock_held": ("worker", "holding zone_lock while freeing frames (DONTNEED)"),
    "pte_lock_held": ("worker", "holding the pte lock in the middle of a user write"),
    "madvise_mmap_sem_write": ("worker", "madvise: holding mmap_sem for write, VMA split done"),
    "ksm_enter_locked": ("worker", "__ksm_enter: holding ksm_mmlist_lock, mm_count raised, slot not linked"),
    "ksm_exit_before_down_write": ("worker", "__ksm_exit slow path: list updated, before down_write(mmap_sem)"),
    "ksm_exit_mmap_sem_write": ("worker", "__ksm_exit slow path: holding mmap_sem for write"),
    "exit_mid_zap": ("worker", "exit_mmap: half of the pages zapped"),
    "fork_before_ksm_enter": ("worker", "dup_mmap: both mmap_sems held for write (the new mm's on the new "
                                        "task's row), ksm_fork's __ksm_enter not yet run"),
    "fork_copy_locked": ("worker", "copy_page_range: holding the new task's pte lock and zone_lock, a "
                                   "page table half copied"),
    "fork_after_copy": ("worker", "dup_mmap: every VMA and page table copied, both mmap_sems still held"),
    "ksmd_scan_mmap_sem": ("ksmd", "ksmd holds the mm's mmap_sem for read in scan_get_next_rmap_item: owner killed"),
    "ksmd_between_wp_and_replace": ("ksmd", "ksmd has write-protected a page of the mm, not yet replaced it: "
                                            "owner killed"),
    "ksmd_break_cow": ("ksmd", "ksmd (unshared KSM page) or the run=2 writer (unmerge) is breaking COW "
                               "in the mm: owner killed"),
    "ksmd_scan_wrap": ("ksmd", "scan_get_next_rmap_item at ksm_mm_head: ksmd_should_run saw the list non-empty, "
                               "the list lock not yet taken (arm with a delay: CVE-2011-2183's window)"),
    "ksmd_between_unlocks": ("ksmd", "scan_get_next_rmap_item leaving an mm: between up_read and the list "
                                     "unlock, in either order (arm with a delay: the 2016 window "
                                     "under hazard up-read-after-unlock)"),
    "ksmd_break_ksm_window": ("ksmd", "break_ksm (ksmd or the run=2 writer) saw a KSM page and is about "
                                      "to fault it for write "
                                      "(arm with a delay to widen the window the seed closed)"),
    "ksmd_alloc_kpage": ("ksmd", "try_to_merge_two_pages (2.6.32) is about to alloc_page the new KSM "
                                 "page, holding ksm_thread_mutex and the mm's mmap_sem for read: owner "
                                 "killed (arm with a delay to hold ksmd there; arm to fail: "
                                 "fail_page_alloc, the allocation fails and nothing is merged)"),
    "ksmd_before_stable_insert": ("ksmd", "6.18 only: a page merged into a KSM page (a dup of a chain, "
                                          "perhaps), its rmap_item not yet appended; or a new KSM page "
                                          "mapped by both pages, not yet in the stable tree "
                                          "(stable_tree_insert, where it may become a chain's dup): the "
                                          "page's owner killed"),
    # 6.18 only (use_zero_pages): uksm.kernel.ksm618.replace_with_zero_page.  New
    # points go last: a point's code is its index (a stored schedule names codes)
    "ksmd_zero_before_count": ("ksmd", "6.18, use_zero_pages: ksmd has replaced a zero-filled page of the "
                                       "mm by the shared zero page, not yet counted it in ksm_zero_pages "
                                       "(pte lock and zone_lock held): owner killed"),
}
NAMES = list(POINTS)
# the points inside fork (uksm.kernel.fork): a task passes them when it forks
FORK_POINTS = ("fork_before_ksm_enter", "fork_copy_locked", "fork_after_copy")
INDEX = {n: i for i, n in enumerate(NAMES)}
# points an exit policy never passes: before the seed, __ksm_exit took
# ksm_thread_mutex and never mmap_sem (there was no slow path)
UNREACHABLE: dict[str, tuple[str, ...]] = {
    "legacy": ("ksm_exit_before_down_write", "ksm_exit_mmap_sem_write"),
}
# points only one kernel passes (KERNELS): 6.18's stable_tree_insert window
# (2.6.32's ksmd links its node with no call between, and no scheduling
# point there: its controlled schedules stay as they were) and 6.18's zero
# page (use_zero_pages: uksm.kernel.ksm618)
KERNEL_ONLY: dict[str, str] = {"ksmd_before_stable_insert": "6.18", "ksmd_zero_before_count": "6.18"}


# points where an allocation can be made to fail (CONFIG_FAIL_PAGE_ALLOC's
# fail_page_alloc, once): ``arm_ksmd_fail``
FAIL_POINTS = ("ksmd_alloc_kpage",)
FAIL = 1 << 16   # H_KSMD_POINT_SIG for "fail here" (a signal is 1..64, a delay negative)


def reachable(policy: str, kernel: str = "2.6.32") -> list[str]:
    """The kill points a task can reach under exit policy ``policy`` and
    kernel ``kernel``."""
    return [n for n in NAMES if n not in UNREACHABLE.get(policy, ())
            and KERNEL_ONLY.get(n, kernel) == kernel]


# every kill point is a scheduling point of a controlled run (uksm.kernel.sched)
sched.add_points([f"kp:{n}" for n in NAMES])
WORKER_POINTS = [n for n, (who, _d) in POINTS.items() if who == "worker"]
KSMD_POINTS = [n for n, (who, _d) in POINTS.items() if who == "ksmd"]


def arm_worker(cl: "Cluster", row: int, name: str, sig: int) -> None:
    b = cl.tbase(row)
    cl.q[b + T_KILL_SIG] = sig
    cl.q[b + T_KILL_POINT] = INDEX[name]


def disarm_worker(cl: "Cluster", row: int) -> None:
    cl.trow(row).kill_point = -1


def arm_ksmd(cl: "Cluster", name: str, sig: int) -> None:
    cl.q[H_KSMD_POINT_SIG] = sig
    cl.q[H_KSMD_POINT] = INDEX[name]


def hit(cl: "Cluster", name: str, log: Any = NULL_LOG) -> None:
    """A worker passes point ``name``: die here if it is armed.  In a
    controlled run every pass is a scheduling point (a kill choice when
    the run may make one), and the signal of an armed one is delivered
    there by the scheduler (``sched.signal``)."""
    q, b = cl.q, cl.task.base
    if q[b + T_KILL_POINT] != INDEX[name]:
        if sched.ON:
            sched.point("kp:" + name)
        return
    q[b + T_KILL_POINT] = -1
    sig = q[b + T_KILL_SIG] or signal.SIGKILL
    cl.kill_points_sem.release()  # counted atomically
    log.info("kill_point", point=name, action="kill" if sig == signal.SIGKILL else "term",
             victim_pid=os.getpid())
    if sched.ON:
        sched.point("kp:" + name)
    if not sched.signal(os.getpid(), sig):
        os.kill(os.getpid(), sig)


def arm_ksmd_delay(cl: "Cluster", name: str, ms: int) -> None:
    """Make ksmd stop ``ms`` milliseconds at point ``name`` (once), to open a
    race window wide enough to hit every time."""
    cl.q[H_KSMD_POINT_SIG] = -ms
    cl.q[H_KSMD_POINT] = INDEX[name]


def arm_ksmd_fail(cl: "Cluster", name: str) -> None:
    """Make the allocation at point ``name`` fail (once), as
    fail_page_alloc does: the caller's failure path, on demand."""
    if name not in FAIL_POINTS:
        raise ValueError(f"{name}: only {', '.join(FAIL_POINTS)} can be made to fail")
    cl.q[H_KSMD_POINT_SIG] = FAIL
    cl.q[H_KSMD_POINT] = INDEX[name]


def hit_ksmd(cl: "Cluster", name: str, mm_base: int, log: Any = NULL_LOG) -> bool:
    """ksmd passes point ``name`` inside the mm at row base ``mm_base``.
    In a controlled run every pass is a scheduling point, a delay point is
    a barrier, not a sleep: ksmd waits there until nothing else can run
    (the scheduler releases it), and a kill is delivered by the scheduler
    at this step.  True when the point was armed to fail (``arm_ksmd_fail``):
    the caller fails what it was about to do."""
    q = cl.q
    if sched.ON:
        sched.point("kp:" + name)
    if q[H_KSMD_POINT] != INDEX[name]:
        return False
    if q[H_KSMD_POINT_SIG] == FAIL:
        q[H_KSMD_POINT] = -1
        log.info("kill_point", point=name, action="fail", victim_pid=0)
        return True
    if q[H_KSMD_POINT_SIG] < 0:  # a delay point
        q[H_KSMD_POINT] = -1
        log.info("kill_point", point=name, action="delay", victim_pid=0)
        if sched.ON:
            sched.blocked(sched.BLK_DELAY)
        else:
            time.sleep(-q[H_KSMD_POINT_SIG] / 1000.0)
        return False
    pid = q[mm_base + M_OWNER_PID]
    if pid <= 0:
        return False
    q[H_KSMD_POINT] = -1
    sig = q[H_KSMD_POINT_SIG] or signal.SIGKILL
    cl.kill_points_sem.release()
    log.info("kill_point", point=name, action="kill" if sig == signal.SIGKILL else "term",
             victim_pid=pid)
    if not sched.signal(pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return False
