"""ksmd: the scanner (mm/ksm.c: ksm_scan_thread, ksm_do_scan,
scan_get_next_rmap_item, cmp_and_merge_page, try_to_merge_*).

Private to this process: the rmap_items of each mm_slot, the stable tree
and the unstable tree.  In the kernel the writer of run=2 removes them too
(unmerge_and_remove_all_rmap_items, in its own context, under
ksm_thread_mutex); here that writer (``uksm.kernel.writer``) unmerges the
pages, marks the mms it finished and zeroes what their rmap_items publish,
and ksmd drops its copies (``reconcile``, H_UNMERGE_GEN) -- at its next
batch, or, when the unmerge failed part way and the counters must count
what is left, at once, on the writer's behalf, before the writer lets the
mutex go (``serve_unmerge``).  At run=0 ksmd sleeps as the kernel's does,
and takes the mutex only for such work left to it (``behind``).

The trees are hash maps keyed by a 128-bit mmh3
digest of the page; every merge still confirms the bytes are equal
(``pages_identical``) under the protocol of the kernel's
``write_protect_page`` / ``replace_page``, so a hash collision can never merge
different pages.  The digest doubles as ``oldchecksum``: a page must keep
the same content for one full scan before it may enter the unstable tree.

A new KSM page is allocated, as 2.6.32 did (``try_to_merge_two_pages``:
``alloc_page``, the first page copied and merged into it, then the
second): ksmd's own way into memory pressure and the OOM killer, holding
ksm_thread_mutex.  (2.6.33 made the first page the KSM page in place.)

Locking, per batch: ksm_thread_mutex for the whole batch; the scanned mm's
mmap_sem for read across a run of its pages (dropped to let a waiting
writer in, and dropped before another mm's is taken: ksmd never holds two);
the pte lock per page operation; zone_lock inside it for counts.  Every
time mmap_sem is (re)taken, ksm_test_exit(mm) is checked before VMAs or
PTEs are touched (the seed, and the 2023 fix).
"""
from __future__ import annotations

import signal
import sys
import time
from array import array
from typing import Any

import mmh3

from uksm.host import shm
from uksm.kernel import killpoints, oom, sched
from uksm.kernel.chains import NEVER, StableNode, StableTree618, now_ms
from uksm.kernel.cluster import Cluster, add_task_args
from uksm.kernel.ksm import break_cow, list_del, slot_next
from uksm.kernel.ksm618 import (
    SKIP_MIN_AGE,
    ZERO_KEY,
    Advisor,
    should_skip_rmap_item,
    try_to_merge_with_zero_page,
)
from uksm.kernel.layout import (
    A_FREE_TOP,
    F_ANON,
    F_KSM,
    FR_COUNT,
    FR_FLAGS,
    FR_KEY0,
    FR_KEY1,
    FRAME_SIZE,
    H_HAZARDS,
    H_KSM_UNSYNCED,
    H_KSMD_POINT,
    H_SHUTDOWN,
    H_UNMERGE_DONE,
    H_UNMERGE_GEN,
    H_UNMERGE_WAIT,
    HZ_NO_SCAN_HEAD_CHECK,
    HZ_UP_READ_AFTER_UNLOCK,
    K_FULL_SCANS,
    K_MAX_KERNEL_PAGES,
    K_PAGES_SCANNED,
    K_PAGES_SHARED,
    K_PAGES_SHARING,
    K_PAGES_SKIPPED,
    K_PAGES_TO_SCAN,
    K_PAGES_UNSHARED,
    K_PAGES_VOLATILE,
    K_RMAP_ITEMS,
    K_RUN,
    K_SLEEP_MS,
    K_SMART_SCAN,
    K_STABLE_NODE_CHAINS,
    K_STABLE_NODE_DUPS,
    K_STABLE_NODES,
    K_USE_ZERO_PAGES,
    L_HEAD_NEXT,
    L_SCAN_ADDR,
    L_SCAN_SLOT,
    L_SEQNR,
    M_FLAGS,
    M_ID,
    M_KSM_MAPPED,
    M_MERGING,
    M_RMAP_GONE,
    M_RMAP_ITEMS,
    M_SLOT_RMAP,
    M_SLOT_USED,
    M_WRITER_WAITING,
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PAGE_SIZE,
    PT_OFF,
    PTE_PRESENT,
    PTE_WRITE,
    REF_KSM,
    S_COW_KSMD,
    S_MERGES,
    S_SLOTS_FREED,
    VM_MERGEABLE,
    ZERO_PFN,
)
from uksm.kernel.memory import Allocator, OutOfMemory, free_frames
from uksm.kernel.mm import MM, VmaTableFreed, mm_attach, mmdrop
from uksm.kernel.mmu import ksm_test_exit

digest = mmh3.mmh3_x64_128_digest

class NullPointerDereference(Exception):
    """A dereference the kernel would have done through a NULL pointer."""


# struct rmap_item is not an object here but a page index (vpn) into its
# slot's arrays (SlotState): an object, a dict entry, a checksum bytes
# object and a set membership per page cost ~250 bytes (issue 14), the
# three arrays 28.  ``seen[vpn]`` is the seqnr of the last scan that met
# the page, NO_ITEM when it has no rmap_item; ``tree[vpn]`` says where the
# rmap_item is (mm/ksm.c keeps it as UNSTABLE_FLAG / STABLE_FLAG in
# rmap_item->address): NOT_IN_TREE, IN_UNSTABLE (its key is its
# oldchecksum), or the nid of its StableNode; ``csum[16*vpn:16*vpn+16]``
# is its oldchecksum, all zero for none yet (grow() zeroes a new page's,
# remove_trailing_rmap_items a freed item's).  The unstable tree names an
# rmap_item by ``row << 32 | vpn`` (item_ref).
NO_ITEM = -1
NOT_IN_TREE = -1
IN_UNSTABLE = -2
CSUM = 16          # bytes of oldchecksum (the 128-bit mmh3 digest)
NO_CSUM = bytes(CSUM)
VPN_MASK = (1 << 32) - 1


def item_ref(row: int, vpn: int) -> int:
    return row << 32 | vpn


class SlotState:
    """ksmd's private half of an mm_slot: its rmap_list, as arrays indexed
    by page number (in address order, as the kernel keeps rmap_list)."""
    __slots__ = ("row", "mm_id", "mm", "seen", "tree", "csum", "nitems", "merging", "merges",
                 "t_merge", "cows", "t_cow", "age", "skips")

    def __init__(self, row: int, mm: MM) -> None:
        self.row = row
        self.mm_id = mm.id
        self.mm = mm
        self.seen = array("i")
        self.tree = array("q")
        self.csum = bytearray()
        # 6.7's rmap_item->age and ->remaining_skips (smart scan, 6.18 only;
        # uksm.kernel.ksm618.should_skip_rmap_item): 0 for a new rmap_item
        self.age = bytearray()
        self.skips = bytearray()
        self.nitems = 0   # rmap_items of this slot (seen[v] != NO_ITEM)
        self.merging = 0
        self.merges = 0
        self.t_merge = 0
        self.cows = 0
        self.t_cow = 0

    def grow(self, end: int) -> None:
        """Make room for rmap_items of pages below ``end``."""
        k = end - len(self.seen)
        if k > 0:
            self.seen.extend(array("i", [NO_ITEM]) * k)
            self.tree.extend(array("q", [NOT_IN_TREE]) * k)
            self.csum.extend(bytes(CSUM * k))
            self.age.extend(bytes(k))
            self.skips.extend(bytes(k))

    def set_csum(self, vpn: int, key: bytes) -> None:
        self.csum[vpn * CSUM:(vpn + 1) * CSUM] = key


class Ksmd(StableTree618):
    def __init__(self, cl: Cluster, log: Any) -> None:
        self.cl = cl
        self.q = cl.q
        self.fq = cl.fq
        self.pool = cl.pool.mv
        self.poolmap = cl.pool.map  # slicing the mmap: one copy per page, cheapest compare
        self.log = log
        self.alloc = Allocator(cl)
        self.alloc.oom_killer = oom.oom_killer(log)
        self.stable: dict[bytes, StableNode] = {}
        self.live: dict[int, StableNode] = {}   # nid -> node, for every node in the stable tree
        self.next_nid = 0
        self.unstable: dict[bytes, int] = {}    # key -> item_ref
        # 6.18's stable tree (kernel="6.18", Cluster.modern): chains and dups
        # under max_page_sharing (uksm.kernel.chains: 4.13, 2c653d0ee2ae);
        # 2.6.32 has none
        self.modern = cl.modern
        self.chains: dict[int, StableNode] = {}   # nid -> chain: ksm_stable_node_chains
        self.ndups = 0                            # ksm_stable_node_dups
        self.next_meet = NEVER
        self.jiffies = 0
        self.slots: dict[int, SlotState] = {}
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.rmap_items = 0
        self.pages_scanned = 0
        # 6.18 (Cluster.modern): the zero page's frame (-1: none, so the
        # scan's test of every PTE against it never holds under 2.6.32),
        # pages_skipped, the advisor, and the batch's smart_scan and
        # use_zero_pages (read at each batch's start)
        self.modern = cl.modern
        self.zero_pfn = ZERO_PFN if self.modern else -1
        self.pages_skipped = cl.q[K_PAGES_SKIPPED] if self.modern else 0   # a restarted ksmd goes on counting
        self.advisor = Advisor()
        self.smart_scan = False
        self.use_zero_pages = False
        self.merges = 0
        self.t_last_merge = 0
        self.stop = False
        self.last_run = -1
        self.unmerge_gen = cl.q[H_UNMERGE_GEN]
        self.visits: list[dict[str, Any]] = []  # this batch's visits of mms (scan_batch_end)

    # ---- the daemon loop (ksm_scan_thread) ---------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._sigterm)
        signal.signal(signal.SIGINT, self._sigterm)
        cl, q, task = self.cl, self.q, self.cl.task
        # a failed unmerge's writer waits, holding the mutex, for ksmd to
        # free rmap_items: served at every slice of ksmd's wait for it
        task.abort = self.serve_unmerge
        while not self.stop and not q[H_SHUTDOWN]:
            if not self.ksmd_should_run() and not self.behind():
                self.wait_event()
                continue
            scanned = 0
            batch = False
            t0 = time.monotonic_ns()
            scans_before = q[K_FULL_SCANS]
            task.lock(cl.daemon)
            try:
                self.reconcile()
                run = q[K_RUN]  # run_store (the writer) sets it, and unmerges, under this mutex
                if run != self.last_run:
                    self.log.info("ksm_run", run=run, previous=self.last_run)
                    self.last_run = run
                batch = run == 1 and q[L_HEAD_NEXT] != cl.head
                if batch:
                    if self.modern:
                        self.smart_scan = bool(q[K_SMART_SCAN])
                        self.use_zero_pages = bool(q[K_USE_ZERO_PAGES])
                    n = q[K_PAGES_TO_SCAN]
                    self.log.info("scan_batch_start", seqnr=q[L_SEQNR], pages_to_scan=n)
                    self.visits = []
                    scanned = self.ksm_do_scan(n)
                self.publish()
                # every unmerge reconciled above and published: a request
                # left by a writer killed while it waited is no longer one
                q[H_UNMERGE_DONE] = self.unmerge_gen
                # after the publish (a lockless reader sees the merges at
                # once) and before the unlock: whoever reads under the
                # mutex -- a report's snapshot, a run's convergence test --
                # finds the frames these merges freed free, as the
                # kernel's replace_page had freed each one at once
                if self.should_flush(run, q[K_FULL_SCANS] != scans_before):
                    self.alloc.flush()
            finally:
                task.unlock(cl.daemon)
            if batch:  # every scan_batch_start has its end (a trace's batch slice), 0 pages too
                self.log.info("scan_batch_end", pages=scanned, ms=(time.monotonic_ns() - t0) / 1e6,
                              seqnr=q[L_SEQNR], pages_shared=q[K_PAGES_SHARED],
                              pages_sharing=q[K_PAGES_SHARING], pages_unshared=q[K_PAGES_UNSHARED],
                              pages_volatile=q[K_PAGES_VOLATILE], full_scans=q[K_FULL_SCANS],
                              frames_used=cl.nframes - q[A_FREE_TOP], mms=self.visits)
            self.log_activity()
            if run == 1 and q[L_HEAD_NEXT] != cl.head:
                self.schedule_timeout(q[K_SLEEP_MS])
        self.alloc.flush()

    def ksmd_should_run(self) -> bool:
        """ksmd_should_run: run=1 and an mm_slot on the list (a racy look,
        as the kernel's: the batch reads both again under the mutex)."""
        return self.q[K_RUN] == 1 and self.q[L_HEAD_NEXT] != self.cl.head

    def behind(self) -> bool:
        """Something to do under the mutex though ksmd should not scan: run
        changed since the last look (logged, and the frames a batch gave
        back flushed), or another task did what the kernel's does
        synchronously and left ksmd its half -- a legacy __ksm_exit freed
        a slot (H_KSM_UNSYNCED), run=2 unmerged (H_UNMERGE_GEN) -- which
        ``reconcile`` finishes.  Anything else ksmd leaves alone while it
        should not run, as the kernel's ksmd sleeps: a slot freed by a
        fast-path exit costs nothing until the next batch."""
        q = self.q
        return (q[K_RUN] != self.last_run or q[H_UNMERGE_GEN] != self.unmerge_gen
                or q[H_KSM_UNSYNCED] != 0)

    def wait_event(self) -> None:
        """wait_event_interruptible(ksm_thread_wait, ksmd_should_run() ||
        kthread_should_stop()): idle, looking every 10 ms, serving a failed
        unmerge's writer meanwhile."""
        self.serve_unmerge()
        if sched.ON:
            # a controlled run: parked until run or the list changes, or
            # something is behind (World.enabled, BLK_KSMD_IDLE)
            sched.blocked(sched.BLK_KSMD_IDLE, self.q[K_RUN], self.unmerge_gen)
        else:
            time.sleep(0.01)

    def schedule_timeout(self, ms: int) -> None:
        """schedule_timeout_interruptible(msecs_to_jiffies(sleep_millisecs)):
        sleep between batches.  Nothing but kthread_stop ends it early (a
        write of run or sleep_millisecs does not), so it is cut short only
        by the stop: a SIGTERM, or the cluster's shutdown.  A failed
        unmerge's writer is served meanwhile (``serve_unmerge``).  A
        controlled run sleeps in logical time: a yield, others go first."""
        if sched.ON:
            sched.sleep(ms)
            self.serve_unmerge()
            return
        if ms <= 0:
            time.sleep(0)
            return
        end = time.monotonic() + ms / 1000.0
        while not self.stop and not self.q[H_SHUTDOWN]:
            self.serve_unmerge()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

    def serve_unmerge(self) -> bool:
        """A failed run=2's writer holds ksm_thread_mutex and waits for the
        rmap_items of the mms it finished to be freed and counted out
        (``ksm.ksmd_remove_rmap_items``): do that -- ``reconcile``, then
        ``publish`` -- on its behalf and under its mutex, from a place
        where ksmd is outside a batch (asleep, or waiting for that mutex:
        this is ksmd's ``Task.abort`` hook, polled at every slice of a
        blocked wait, and it never abandons one).  Never inside a batch,
        where ksmd holds the mutex itself and a request left by a writer
        killed while waiting is no longer one."""
        q = self.q
        gen = q[H_UNMERGE_WAIT]
        if gen and gen != q[H_UNMERGE_DONE] and not self.cl.task.holds(self.cl.daemon):
            self.reconcile()
            self.publish()
            q[H_UNMERGE_DONE] = gen
        return False

    def should_flush(self, run: int, full_scan_done: bool) -> bool:
        """Give merged-away frames back (punch them out of the pool) in big
        runs rather than after every batch: at the end of a full scan, when
        many are pending, when memory runs low, or when ksmd goes idle.
        Until then they are counted in H_PENDING_FREE, which keeps the OOM
        killer from firing for memory that is on its way back."""
        n = len(self.alloc.pending)
        if not n:
            return False
        cl = self.cl
        return (full_scan_done or run != 1 or n >= cl.nframes // 2
                or free_frames(cl) < cl.nframes // 16 or self.q[K_SLEEP_MS] >= 20)

    def _sigterm(self, _signo: int, _frame: Any) -> None:
        self.stop = True

    def log_activity(self) -> None:
        for st in self.slots.values():
            if st.merges:
                self.log.info("merge", mm=st.mm_id, count=st.merges, t_last_ns=st.t_merge)
                st.merges = 0
            if st.cows:
                self.log.info("cow_break", mm=st.mm_id, count=st.cows, by="ksmd", t_last_ns=st.t_cow)
                st.cows = 0

    def publish(self) -> None:
        """The /sys/kernel/mm/ksm counters and per-mm ksm_stat, as one
        consistent snapshot (written under ksm_thread_mutex)."""
        q = self.q
        q[K_PAGES_SHARED] = self.pages_shared
        q[K_PAGES_SHARING] = self.pages_sharing
        q[K_PAGES_UNSHARED] = self.pages_unshared
        q[K_PAGES_VOLATILE] = max(0, self.rmap_items - self.pages_shared
                                  - self.pages_sharing - self.pages_unshared)
        q[K_RMAP_ITEMS] = self.rmap_items
        q[K_PAGES_SCANNED] = self.pages_scanned
        if self.modern:
            q[K_PAGES_SKIPPED] = self.pages_skipped   # 6.7 "mm/ksm: add pages_skipped metric"
        q[K_FULL_SCANS] = q[L_SEQNR]  # full_scans_show: "ksm_scan.seqnr" (so run=2 resets it)
        q[S_MERGES] = self.merges
        q[H_KSM_UNSYNCED] = 0  # reconcile() dropped the slots legacy exits freed
        q[K_STABLE_NODES] = len(self.stable)
        if self.modern:
            # 4.13, 2c653d0ee2ae: stable_node_chains, stable_node_dups (a
            # chain is no KSM page: K_STABLE_NODES counts the dups instead)
            q[K_STABLE_NODE_CHAINS] = len(self.chains)
            q[K_STABLE_NODE_DUPS] = self.ndups
            q[K_STABLE_NODES] = len(self.stable) - len(self.chains) + self.ndups
        for row, st in self.slots.items():
            b = self.cl.mbase(row)
            if q[b + M_ID] == st.mm_id:
                q[b + M_RMAP_ITEMS] = st.nitems
                q[b + M_MERGING] = st.merging

    # ---- slots -----------------------------------------------------------
    def slot_state(self, row: int) -> SlotState:
        if row == self.cl.head:  # ksm_mm_head.mm is NULL: mm = slot->mm; down_read(&mm->mmap_sem)
            raise NullPointerDereference("mm = slot->mm: slot is ksm_mm_head, its mm is NULL")
        st = self.slots.get(row)
        mm_id = self.q[self.cl.mbase(row) + M_ID]
        if st is not None and st.mm_id == mm_id:
            return st
        if st is not None:
            self.drop_slot(st)
        st = SlotState(row, mm_attach(self.cl, mm_id))
        self.slots[row] = st
        return st

    def drop_slot(self, st: SlotState) -> None:
        """Forget a slot: remove its rmap_items from the trees, unmap the mm.
        The mm's ksm_stat follows its rmap_items (each free decrements
        mm->ksm_rmap_items in the kernel): 0 now, or a slot freed when no
        VM_MERGEABLE area was left would show its last counts for ever
        (publish writes only the slots ksmd still has)."""
        self.remove_all_rmap_items(st)
        b = self.cl.mbase(st.row)
        if self.q[b + M_ID] == st.mm_id:
            self.q[b + M_RMAP_ITEMS] = st.nitems
            self.q[b + M_MERGING] = st.merging
        if self.slots.get(st.row) is st:
            del self.slots[st.row]
        if st.merges or st.cows:
            self.log_activity()
        st.mm.seg.close()
        self.cl.forget_mm(st.mm_id)

    def reconcile(self) -> None:
        """Drop the private state of slots freed behind ksmd's back: the
        legacy __ksm_exit removes the slot itself (under this mutex), and a
        killed task's slot may be freed by its reaper on the fast path.
        After run_store's unmerge (H_UNMERGE_GEN moved), free the
        rmap_items of the mms it finished (M_RMAP_GONE newer than the last
        unmerge seen here: remove_trailing_rmap_items, done in the writer
        in the kernel); a failed unmerge leaves the others theirs.  The
        unstable tree goes too (the unmerge left the cursor at the head:
        the next batch resets it anyway)."""
        q = self.q
        if q[H_UNMERGE_GEN] != self.unmerge_gen:
            for st in self.slots.values():
                if q[self.cl.mbase(st.row) + M_RMAP_GONE] > self.unmerge_gen:
                    self.remove_all_rmap_items(st)
            self.unmerge_gen = q[H_UNMERGE_GEN]
            if self.modern:
                self.remove_all_stable_nodes()  # chains too (remove_stable_node_chain)
            for node in [n for n in self.stable.values() if not n.mapcount and n.dups is None]:
                self.remove_node_from_stable_tree(node)  # rb_erase of its last rmap_item
            self.unstable.clear()
        for row, st in list(self.slots.items()):
            b = self.cl.mbase(row)
            if q[b + M_ID] != st.mm_id or not q[b + M_SLOT_USED]:
                self.drop_slot(st)

    # ---- trees -------------------------------------------------------------
    def remove_rmap_item_from_tree(self, st: SlotState, vpn: int) -> None:
        """remove_rmap_item_from_tree: the rmap_item of page ``vpn`` of
        ``st`` leaves the stable or the unstable tree, and the counts."""
        tree = st.tree
        where = tree[vpn]
        if where == NOT_IN_TREE:
            return
        tree[vpn] = NOT_IN_TREE
        if where >= 0:
            node = self.live.get(where)
            if node is None:
                return  # remove_node_from_stable_tree counted it out already
            if self.modern and self.stale(node):
                # 6.18's remove_rmap_item_from_tree takes the page first
                # (get_ksm_page(stable_node, GET_KSM_PAGE_LOCK)): a page gone
                # removes the node, every rmap_item counted out and a dup
                # out of its chain (stable_node_dups drops) -- 2.6.32 had no
                # stable_node (the rmap_item was the tree node)
                return
            node.mapcount -= 1
            rows, row = node.rows, st.row
            left = rows[row] - 1
            if left:
                rows[row] = left
            else:
                del rows[row]
            if node.mapcount:
                self.pages_sharing -= 1
            else:
                self.pages_shared -= 1
                if node.chain is None and self.stable.get(node.key) is not node:
                    del self.live[where]  # replaced in the tree meanwhile: nothing maps it now
            st.merging -= 1
        else:
            key = bytes(st.csum[vpn * CSUM:(vpn + 1) * CSUM])  # its key: oldchecksum
            if self.unstable.get(key) == item_ref(st.row, vpn):  # not if the tree was reset since
                del self.unstable[key]
            self.pages_unshared -= 1

    def remove_ref_from_tree(self, ref: int) -> None:
        """remove_rmap_item_from_tree for an unstable tree entry."""
        st = self.slots.get(ref >> 32)
        if st is not None:
            self.remove_rmap_item_from_tree(st, ref & VPN_MASK)

    def remove_all_rmap_items(self, st: SlotState) -> None:
        """Every rmap_item of the slot out of the trees, then freed."""
        tree = st.tree
        for v in [v for v, w in enumerate(tree) if w != NOT_IN_TREE]:
            self.remove_rmap_item_from_tree(st, v)
        self.rmap_items -= st.nitems
        st.nitems = 0
        del st.seen[:], st.tree[:], st.csum[:], st.age[:], st.skips[:]

    def stable_tree_append(self, st: SlotState, vpn: int, node: StableNode) -> None:
        if node.mapcount:
            self.pages_sharing += 1
        else:
            self.pages_shared += 1
        node.mapcount += 1
        node.rows[st.row] = node.rows.get(st.row, 0) + 1
        st.tree[vpn] = node.nid
        st.merging += 1
        # struct rmap_item: "union { unsigned int oldchecksum; /* when
        # unstable */ struct rmap_item *next; /* when stable */ }" -- in the
        # stable tree the checksum is gone, and remove_rmap_item_from_tree's
        # "rmap_item->next = NULL" leaves it 0: a page that leaves the
        # stable tree waits one more pass before the unstable tree
        st.set_csum(vpn, NO_CSUM)

    def remove_node_from_stable_tree(self, node: StableNode) -> None:
        """Every rmap_item on the node leaves the tree (counted out here;
        each one's tree[] entry names a node no longer live), then the
        node."""
        if self.live.pop(node.nid, None) is not None and node.mapcount:
            self.pages_shared -= 1
            self.pages_sharing -= node.mapcount - 1
            for row, k in node.rows.items():
                self.slots[row].merging -= k
            node.mapcount = 0
            node.rows.clear()
        if node.chain is not None:
            self.stable_node_dup_del(node)   # 6.18: a dup leaves its chain (stable_node_dup_del)
        elif self.stable.get(node.key) is node:
            del self.stable[node.key]

    def get_ksm_page(self, node: StableNode) -> bool:
        """The node's frame is still that KSM page (not freed, not reused)."""
        b = node.kpfn * FRAME_SIZE
        fq = self.fq
        return bool(fq[b + FR_FLAGS] & F_KSM and fq[b + FR_COUNT] > 0
                    and fq[b + FR_KEY0] == node.k0 and fq[b + FR_KEY1] == node.k1)

    # ---- the scan (ksm_do_scan + scan_get_next_rmap_item) --------------------
    def ksm_do_scan(self, budget: int) -> int:
        """ksm_do_scan(scan_npages) with scan_get_next_rmap_item's walk of
        the mm_slot list: scan at most ``budget`` pages.  Returns the pages
        scanned.

        The batch ends when the budget runs out, right after a page
        ("while (scan_npages--)"): the cursor stays on that mm, at the next
        address, even after its last page -- the next batch finds nothing
        more there, finishes the mm and moves on (goto next_mm).  It also
        ends when the walk comes back to the list head (seqnr++, return
        NULL): so a pass whose pages fill the budget exactly ends with one
        empty batch, as in 2.6.32."""
        cl, q, task = self.cl, self.q, self.cl.task
        head = cl.head
        scanned = 0
        if self.modern:   # 6.18: jiffies for this batch; the chains a search would pass
            self.jiffies = now_ms()
            if self.chains and self.jiffies >= self.next_meet:
                self.meet_chains()
        while budget > 0:
            slot = q[L_SCAN_SLOT]
            if slot == head:
                if self.modern:
                    self.advisor.advisor_start_scan(q)   # 6.8, 4e5fa4f5eff6
                self.unstable.clear()  # root_unstable_tree = RB_ROOT
                # the window of CVE-2011-2183: ksmd_should_run saw the list
                # non-empty, and the last mm may leave before the lock
                killpoints.hit_ksmd(cl, "ksmd_scan_wrap", cl.mbase(q[L_HEAD_NEXT] % head), self.log)
                task.lock(cl.mmlist)
                slot = slot_next(cl, head)
                q[L_SCAN_SLOT] = slot
                q[L_SCAN_ADDR] = 0
                task.unlock(cl.mmlist)
                # "ksm: fix NULL pointer dereference in scan_get_next_rmap_item()"
                # (2011, CVE-2011-2183): the last mm left meanwhile, and the
                # list head has no mm.  Hazard no-scan-head-check drops it.
                if slot == head and not q[H_HAZARDS] & HZ_NO_SCAN_HEAD_CHECK:
                    break
            st = self.slot_state(slot)
            t_mm = time.monotonic_ns()
            n, done = self.scan_mm(st, budget)
            # the visit of this mm, for scan_batch_end (a trace's slice): no
            # log line of its own, the batch's end carries them all
            self.visits.append({"mm": st.mm_id, "start_ns": t_mm, "end_ns": time.monotonic_ns(),
                                "pages": n, "done": done})
            scanned += n
            budget -= n
            if not done or q[L_SCAN_SLOT] == head:
                # the budget ran out (the cursor stays), or a full scan
                # ended: scan_get_next_rmap_item returns NULL after
                # ksm_scan.seqnr++, and ksm_do_scan returns -- one batch
                # never counts two full scans (full_scans is what KSM test
                # programs wait on)
                break
        self.pages_scanned += scanned
        return scanned

    def next_mergeable(self, mm: MM, addr: int) -> tuple[int, int] | None:
        """find_vma(mm, addr) and on to the first VM_MERGEABLE area: the
        VMA table as it is now (caller holds mmap_sem)."""
        for (start, end) in mm.mergeable_ranges():
            if end > addr:
                return start, end
        return None

    def scan_mm(self, st: SlotState, budget: int) -> tuple[int, bool]:
        """scan_get_next_rmap_item for the mm at the cursor, called until
        ``budget`` pages are scanned: down_read(mmap_sem) and ksm_test_exit
        before find_vma, then the walk of its VM_MERGEABLE areas from
        ksm_scan.address (``scan_get_next_rmap_item``), then either the
        cursor kept or the end of the mm (``next_mm``).  Returns (pages
        scanned, whether the mm is finished: then the cursor has moved on).

        The budget is checked before the next page is looked for, as
        ksm_do_scan's "while (scan_npages--)" does: after its last page the
        mm is not finished yet, the cursor stays, and only the next call
        (the next batch) finds no page, removes the trailing rmap_items and
        moves on.

        The kernel takes mmap_sem and calls find_vma(mm, ksm_scan.address)
        for every page.  Here mmap_sem is held across a run of pages (the
        VMA table cannot change while it is held), and the area is looked
        up again after every re-take of mmap_sem -- a writer let in,
        a merge into another mm, break_cow -- so ksmd never walks an area
        that was unmapped or made UNMERGEABLE meanwhile."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        cl, q, task = self.cl, self.q, self.cl.task
        mm = st.mm
        seqnr = q[L_SEQNR]
        task.lock(mm.sem)
        killpoints.hit_ksmd(cl, "ksmd_scan_mmap_sem", mm.base, self.log)
        exiting = ksm_test_exit(cl, mm)
        start_addr = q[L_SCAN_ADDR]
        n, addr, lo, found, exiting = self.scan_get_next_rmap_item(st, start_addr, budget, seqnr, exiting)
        if n >= budget and not exiting:
            # ksm_do_scan's budget ran out right after a page: the cursor
            # stays here, at the next address, however few pages are left
            q[L_SCAN_ADDR] = addr
            task.unlock(mm.sem)
            return n, False
        self.next_mm(st, exiting, lo, start_addr == 0 and not found, seqnr)
        return n, True

    def scan_get_next_rmap_item(self, st: SlotState, addr: int, budget: int, seqnr: int,
                                exiting: bool) -> tuple[int, int, int, bool, bool]:
        """scan_get_next_rmap_item's walk, "for (; vma; vma = vma->vm_next)"
        and "while (ksm_scan.address < vma->vm_end)", with ksm_do_scan's body
        for each page found: every page present in a VM_MERGEABLE area from
        ``addr`` gets its rmap_item (get_next_rmap_item, which frees the
        ones passed) and goes to cmp_and_merge_page, or, a KSM page of the
        stable tree mapped once, to ``replace_unshared_ksm_page``.  Caller
        holds mmap_sem for read (dropped and re-taken here: the area is
        found again and ksm_test_exit re-checked after each re-take).  Stops
        after ``budget`` pages, when the mm exits (``exiting``: from the
        start too) or past its last area.  Returns (pages scanned, the next
        address, ``lo`` -- the rmap_items below it are the ones this pass
        met --, whether a VM_MERGEABLE area was met, exiting)."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        cl, q, task = self.cl, self.q, self.cl.task
        mm = st.mm
        pq, fq, live = mm.pq, self.fq, self.live
        zero_pfn, smart = self.zero_pfn, self.smart_scan
        # ksm_scan.rmap_item: the rmap_items below ``lo`` are the ones this
        # pass has met (every page below ksm_scan.address that got one)
        lo = addr
        n = 0
        found = False   # met a VM_MERGEABLE area (the kernel's ksm_scan.address != 0)
        last_yield = -1
        wait_flag = mm.base + M_WRITER_WAITING
        while not exiting and n < budget:
            rng = self.next_mergeable(mm, addr)  # find_vma(mm, ksm_scan.address)
            if rng is None:
                break
            start, end = rng
            found = True
            v = max(addr, start)
            relook = False
            st.grow(end)
            seen, tree, ages = st.seen, st.tree, st.age
            while v < end and n < budget:
                if not n & 63 and n != last_yield and q[wait_flag]:
                    # a writer (madvise, munmap, exit) waits: let it in
                    last_yield = n
                    task.unlock(mm.sem)
                    if sched.ON:  # a controlled run: a yield, the others go first
                        sched.sleep(0)
                    else:
                        time.sleep(0.0005)
                    task.lock(mm.sem)
                    relook = True
                    break
                if sched.ON:
                    # a controlled run's point per page: what follows reads
                    # words others write without a lock ksmd holds (mm_users,
                    # the PTE, the page), so another process may go first
                    sched.point("ksmd_page", v)
                if ksm_test_exit(cl, mm):
                    exiting = True
                    break
                pte = pq[PT_OFF + v]
                if not pte & PTE_PRESENT:
                    v += 1
                    continue
                pfn = pte >> 2
                if pfn == zero_pfn:  # 6.18: a zero PTE has no folio: no rmap_item (the old one is passed)
                    v += 1
                    continue
                vpn = v
                if vpn != lo:
                    self.remove_rmap_items(st, lo, vpn)  # get_next_rmap_item: the ones passed
                lo = vpn + 1
                if seen[vpn] == NO_ITEM:  # get_next_rmap_item: a new rmap_item (csum zero)
                    st.nitems += 1
                    self.rmap_items += 1
                seen[vpn] = seqnr
                if smart and not fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
                    # 6.7 smart scan (should_skip_rmap_item): the young only age (inline); a
                    # skipped page is "goto next_page": not in pages_scanned, nor the budget
                    age = ages[vpn]
                    if age < SKIP_MIN_AGE:
                        ages[vpn] = age + 1
                    elif should_skip_rmap_item(self, st, vpn):
                        v += 1
                        continue
                n += 1
                v += 1
                where = tree[vpn]
                node = live.get(where) if where >= 0 else None
                if node is not None and node.kpfn == pfn and fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
                    # 2.6.32's "Replace now-unshared ksm page by ordinary
                    # page"; gone since 2.6.33 (its ksm_do_scan: "if
                    # (!PageKsm(page) || !in_stable_tree(rmap_item))
                    # cmp_and_merge_page"), and 6.18's cmp_and_merge_page
                    # returns at "rmap_item->head == stable_node": a KSM
                    # page mapped once stays one (pages_shared 1, sharing 0)
                    if fq[pfn * FRAME_SIZE + FR_COUNT] == 1 and not self.modern:
                        self.replace_unshared_ksm_page(st, vpn)
                        relook = True
                        break
                    continue
                if not self.cmp_and_merge_page(st, vpn, pfn):
                    relook = True  # mmap_sem was dropped (merge with another mm)
                    break
            addr = v
            if relook and ksm_test_exit(cl, mm):  # re-check after every re-take
                exiting = True
        return n, addr, lo, found, exiting

    def replace_unshared_ksm_page(self, st: SlotState, vpn: int) -> None:
        """ksm_do_scan's "Replace now-unshared ksm page by ordinary page"
        (the rmap_item is in the stable tree and its KSM page is mapped
        once): break_cow (which takes mmap_sem itself), then
        remove_rmap_item_from_tree and "rmap_item->oldchecksum =
        calc_checksum(page)".  Caller holds mmap_sem for read, dropped and
        taken again here: it must find the area again."""
        self.up_read_break_cow(st, vpn)
        self.remove_rmap_item_from_tree(st, vpn)
        npte = st.mm.pq[PT_OFF + vpn]
        if npte & PTE_PRESENT:  # "rmap_item->oldchecksum = calc_checksum(page)"
            p = (npte >> 2) * PAGE_SIZE
            st.set_csum(vpn, digest(self.pool[p:p + PAGE_SIZE]))

    def remove_rmap_items(self, st: SlotState, lo: int, hi: int) -> None:
        """Free the rmap_items of pages lo..hi-1 (get_next_rmap_item's loop
        over the ones the scan passed: their page went away, or their area
        is no longer mergeable): out of the tree, then freed."""
        seen = st.seen
        hi = min(hi, len(seen))
        gone = [v for v in range(lo, hi) if seen[v] != NO_ITEM]
        for v in gone:
            self.remove_rmap_item_from_tree(st, v)
            seen[v] = NO_ITEM
            st.set_csum(v, NO_CSUM)
            st.age[v] = st.skips[v] = 0
        st.nitems -= len(gone)
        self.rmap_items -= len(gone)

    def remove_trailing_rmap_items(self, st: SlotState, lo: int) -> None:
        """remove_trailing_rmap_items: every rmap_item above the last one
        this pass met (all of them when the mm exits)."""
        if lo == 0:
            self.remove_all_rmap_items(st)
        else:
            self.remove_rmap_items(st, lo, len(st.seen))

    def next_mm(self, st: SlotState, exiting: bool, lo: int, no_vmas: bool, seqnr: int) -> None:
        """The end of scan_get_next_rmap_item's walk of one mm, after its
        VMA loop (caller holds its mmap_sem for read, released here): the
        last ksm_test_exit (exiting: "ksm_scan.address = 0; ksm_scan.rmap_item
        = list_entry(&slot->rmap_list...)"), remove_trailing_rmap_items
        above ``lo``, then the cursor on to the next slot under
        ksm_mmlist_lock; when ksm_scan.address is 0 (the mm exits, or
        ``no_vmas``: a walk from address 0 met no VM_MERGEABLE area) do
        what __ksm_exit would.  Back at the list head: ksm_scan.seqnr++."""
        cl, q, task = self.cl, self.q, self.cl.task
        mm = st.mm
        if not exiting and ksm_test_exit(cl, mm):
            exiting = True  # scan_get_next_rmap_item's check after the loop
        if exiting:
            lo = 0  # ksm_scan.address = 0, rmap_item = the list head
        self.remove_trailing_rmap_items(st, lo)
        task.lock(cl.mmlist)
        nxt = slot_next(cl, st.row)
        q[L_SCAN_SLOT] = nxt
        q[L_SCAN_ADDR] = 0
        b = mm.base
        q[b + M_SLOT_RMAP] = st.nitems
        if exiting or no_vmas:
            # no VM_MERGEABLE area left (exit, or all unmapped): do what
            # __ksm_exit would, holding mmap_sem throughout.  The slot's
            # mm_count reference (dropped by our mmdrop below) keeps the mm
            # alive, so the order of the two unlocks does not matter here.
            list_del(cl, st.row)
            q[b + M_SLOT_USED] = 0
            q[b + M_SLOT_RMAP] = 0
            # an exiting mm loses MMF_VM_MERGE_ANY too, as 6.18's scan frees
            # its slot (6.4, d7597f59d1d3); a live one left with no mergeable
            # area keeps it: its next mmap enters KSM again (sys_mmap)
            q[b + M_FLAGS] &= ~(MMF_VM_MERGEABLE | (MMF_VM_MERGE_ANY if exiting else 0))
            q[S_SLOTS_FREED] += 1
            task.unlock(mm.sem)
            task.unlock(cl.mmlist)
            self.log.info("slot_freed", mm=st.mm_id, by="ksmd")
            self.drop_slot(st)
            mmdrop(cl, st.row, st.mm_id, REF_KSM, self.log)
        elif q[H_HAZARDS] & HZ_UP_READ_AFTER_UNLOCK:
            # before "ksm: fix conflict between mmput and scan_get_next_rmap_item"
            # (2016): once the list lock is dropped with the cursor moved on,
            # the task may exit by the fast path and free its mm before
            # this up_read -- an up_read on freed memory
            task.unlock(cl.mmlist)
            killpoints.hit_ksmd(cl, "ksmd_between_unlocks", b, self.log)
            task.unlock(mm.sem)
        else:
            # up_read before the list lock is dropped (the 2016 fix): with the
            # cursor moved on and no rmap_items, nothing else keeps the mm
            # from __ksm_exit's fast path and the last mmdrop
            task.unlock(mm.sem)
            killpoints.hit_ksmd(cl, "ksmd_between_unlocks", b, self.log)
            task.unlock(cl.mmlist)
        if nxt == cl.head:
            if self.modern:
                self.advisor.advisor_stop_scan(q)   # 6.8, 4e5fa4f5eff6: before seqnr++
            q[L_SEQNR] = seqnr + 1  # published as full_scans at batch end
            self.log.info("full_scan", seqnr=seqnr + 1)

    def up_read_break_cow(self, st: SlotState, vpn: int) -> None:
        """break_cow from the scan, whose caller holds the mm's mmap_sem for
        read: up_read (break_cow takes it itself, as the kernel's ksmd calls
        it without), break_cow, down_read again -- the caller must find the
        area again.  Counts the COW broken."""
        task = self.cl.task
        task.unlock(st.mm.sem)
        if break_cow(self.cl, self.alloc, st.mm, vpn, self.log):
            st.cows += 1
            st.t_cow = time.monotonic_ns()
            self.q[S_COW_KSMD] += 1
        task.lock(st.mm.sem)

    # ---- cmp_and_merge_page ---------------------------------------------------
    def cmp_and_merge_page(self, st: SlotState, vpn: int, pfn: int) -> bool:
        """cmp_and_merge_page for the rmap_item of page ``vpn`` of ``st``.
        Returns False if it had to drop the scanned mm's mmap_sem."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        if st.tree[vpn] != NOT_IN_TREE:
            self.remove_rmap_item_from_tree(st, vpn)
        p = pfn * PAGE_SIZE
        key = digest(self.pool[p:p + PAGE_SIZE])
        if self.use_zero_pages and key == ZERO_KEY and self.zero_page_first(st, vpn, pfn, key):
            return True
        if self.modern:  # chains, dups, max_page_sharing (4.13, 2c653d0ee2ae)
            node = self.stable_tree_search(key, pfn, bool(self.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM))
            if node is not None:   # a live KSM page with room (or this very page, forked)
                if node.kpfn == pfn or self.try_to_merge_one_page(st.mm, vpn, pfn, node):
                    # merged, its rmap_item not yet on the node (the dup it
                    # chose counts it only from stable_tree_append on)
                    killpoints.hit_ksmd(self.cl, "ksmd_before_stable_insert", st.mm.base, self.log)
                    self.stable_tree_append(st, vpn, node)
                    self._merged(st)
                return True
        elif (node := self.stable.get(key)) is not None:
            if self.get_ksm_page(node):
                if node.kpfn == pfn or self.try_to_merge_one_page(st.mm, vpn, pfn, node):
                    self.stable_tree_append(st, vpn, node)
                    self._merged(st)
                return True
            self.remove_node_from_stable_tree(node)
        if self.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
            # a KSM page outside the stable tree (its node went, or a break
            # failed earlier): cmp_and_merge_page's break_cow, "try again now"
            self.up_read_break_cow(st, vpn)
            return False
        o = vpn * CSUM
        if not st.csum.startswith(key, o):  # no copy: csum[o:o + CSUM] != key
            st.csum[o:o + CSUM] = key  # volatile: changed since the last pass
            return True
        ref = item_ref(st.row, vpn)
        tree_ref = self.unstable.get(key)  # unstable_tree_search_insert
        if tree_ref is not None and tree_ref != ref:
            tpfn = self.get_mergeable_page(tree_ref)
            if tpfn < 0:
                # "page2[0] = get_mergeable_page(tree_rmap_item); if
                # (!page2[0]) return NULL;": a dead entry ends the search
                # and nothing is inserted (2.6.32.67 mm/ksm.c); the page
                # waits for the next pass, when the tree has been reset
                return True
            if tpfn == pfn:
                return True  # "if (page == page2[0]) ... return NULL;"
            p = tpfn * PAGE_SIZE
            if not self.fq[tpfn * FRAME_SIZE + FR_FLAGS] & F_KSM \
                    and digest(self.pool[p:p + PAGE_SIZE]) == key:
                return self.try_to_merge_two_pages(st, vpn, pfn, tree_ref)
            # its page changed since it was filed (or became a KSM page):
            # the kernel's memcmp walk would pass that node by and insert
            # beside it; a hash map has one entry per key, so it is replaced
            self.remove_ref_from_tree(tree_ref)
        self.unstable[key] = ref
        st.tree[vpn] = IN_UNSTABLE
        self.pages_unshared += 1
        return True

    def zero_page_first(self, st: SlotState, vpn: int, pfn: int, key: bytes) -> bool:
        """6.18's cmp_and_merge_page for an all-zero page under
        use_zero_pages (added in 4.11, e86c59b1b12d, where the zero-page
        merge came after stable_tree_search; 6.18's order -- the checksum
        test first ("if (rmap_item->oldchecksum != checksum) ... return"),
        then try_to_merge_with_zero_page, both before the stable tree
        search -- is a later reorder, not cited here by its commit; uksm
        applies it to zero pages only, docs/KERNEL-MAP.md).
        True when the page is done with; False to go on to the trees (the
        merge failed: a page not really empty, or busy)."""
        if self.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_KSM:
            return False   # page_stable_node(page): 6.18 takes the KSM branch
        o = vpn * CSUM
        if not st.csum.startswith(key, o):
            st.csum[o:o + CSUM] = key
            return True
        if try_to_merge_with_zero_page(self, st, vpn, pfn):
            self._merged(st)
            return True
        return False

    def _merged(self, st: SlotState) -> None:
        st.merges += 1
        st.t_merge = self.t_last_merge
        self.merges += 1  # S_MERGES is published at batch end

    def get_mergeable_page(self, ref: int) -> int:
        """get_mergeable_page for an unstable-tree item: its page frame, or
        -1 when it is gone -- the mm exits, the address is in no
        VM_MERGEABLE area, no page is present, or it is not anonymous.
        A racy read: ksmd holds only the scanned mm's mmap_sem (never two),
        where the kernel takes this mm's for read; the merge confirms under
        the pte lock, and a VMA table freed by exit_mmap meanwhile is a
        page gone."""
        st = self.slots.get(ref >> 32)
        if st is None or ksm_test_exit(self.cl, st.mm):
            return -1
        vpn = ref & VPN_MASK
        try:
            if not self.vma_mergeable(st.mm, vpn):  # !(vma->vm_flags & VM_MERGEABLE)
                return -1
        except VmaTableFreed:
            return -1
        pte = st.mm.pq[PT_OFF + vpn]
        if not pte & PTE_PRESENT:  # follow_page: no page
            return -1
        pfn = pte >> 2
        if not self.fq[pfn * FRAME_SIZE + FR_FLAGS] & F_ANON:  # !PageAnon(page)
            return -1
        return pfn

    def try_to_merge_two_pages(self, st: SlotState, vpn: int, pfn: int, tree_ref: int) -> bool:
        """try_to_merge_two_pages as 2.6.32 did it (2.6.32.67 mm/ksm.c
        822-871): a new KSM page is allocated (``alloc_kpage``), this page
        is copied into it and merged into it (``merge_into_kpage``), then
        the unstable tree item's page is merged into it too; when that
        fails the KSM page has one pte: break_cow on this page.  A failed
        allocation merges nothing (-EFAULT): this page enters no tree.
        Past max_kernel_pages nothing is done (lines 831-833: "The number
        of nodes in the stable tree is the number of kernel pages that we
        hold."), the tree item stays where it is and this page enters no
        tree (2.6.33 removed the knob).  Caller holds st's mmap_sem for
        read; returns False if it was dropped meanwhile (the caller finds
        the area again).

        2.6.33's in-place form ("ksm: share anon page without allocating":
        this page itself made the KSM page) is not kept: it differs only
        in never allocating, which is what 2.6.32 must show -- ksmd meeting
        memory pressure and the OOM killer while it holds
        ksm_thread_mutex (the seed's first sentence).

        Crash consistency, a SIGKILL of ksmd at each step (its recovery
        rebuilds every frame count from the page tables and in-flight
        frames of live tasks, and the restarted ksmd has empty trees):
        before the allocation nothing is changed; with kpage allocated and
        not mapped (in flight on ksmd's row) the rebuild finds no
        reference and frees it; with kpage mapped by this page alone it is
        a KSM page outside any stable tree, which the next ksmd meets and
        breaks (cmp_and_merge_page's break_cow), fsck counting it as any
        mapped frame; with both pages mapped it is such a page mapped
        twice, left as it is until the pages are written or unmerged."""
        limit = self.q[K_MAX_KERNEL_PAGES]
        if limit and limit <= self.pages_shared and not self.modern:  # 6.18: no such knob
            return True
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        task = self.cl.task
        mm = st.mm
        kpfn, kept = self.alloc_kpage(mm, vpn)
        if kpfn < 0:  # "if (!kpage) return err;" (line 839)
            return kept
        node = self.merge_into_kpage(mm, vpn, pfn, kpfn) if kept or self.still_mapped(mm, vpn, pfn) else None
        if node is None:  # "out: put_page(kpage);" (line 869): it was mapped nowhere
            self.put_kpage(kpfn)
            return kept
        # "err = try_to_merge_with_ksm_page(mm2, addr2, page2, kpage);" (line 858)
        tst, tvpn = self.slots[tree_ref >> 32], tree_ref & VPN_MASK  # get_mergeable_page saw it
        tmm = tst.mm
        other = tmm is not mm
        if other:
            task.unlock(mm.sem)  # ksmd never holds two mm's mmap_sem
            task.lock(tmm.sem)
        tpte = tmm.pq[PT_OFF + tvpn]
        ok = (not ksm_test_exit(self.cl, tmm) and bool(tpte & PTE_PRESENT)
              and self.try_to_merge_one_page(tmm, tvpn, tpte >> 2, node))
        if other:
            task.unlock(tmm.sem)
            task.lock(mm.sem)
        if ok:
            self.remove_rmap_item_from_tree(tst, tvpn)
            if self.modern:
                # the new KSM page is mapped twice and not in the tree yet:
                # 6.18's stable_tree_insert may make it a chain's dup here
                killpoints.hit_ksmd(self.cl, "ksmd_before_stable_insert", tmm.base, self.log)
                self.stable_tree_insert(node)
            else:
                self.stable[node.key] = node
                self.live[node.nid] = node
            self.stable_tree_append(st, vpn, node)
            self.stable_tree_append(tst, tvpn, node)
            self._merged(tst)
            return kept and not other
        # "If that fails, we have a ksm page with only one pte pointing to
        # it: so break it." (lines 860-865): up_read, break_cow(mm1, addr1)
        self.up_read_break_cow(st, vpn)
        return False

    def alloc_kpage(self, mm: MM, vpn: int) -> tuple[int, bool]:
        """"kpage = alloc_page(GFP_HIGHUSER);" (2.6.32.67 mm/ksm.c 838), in
        ksmd, holding ksm_thread_mutex for the whole batch: the frame, in
        flight on ksmd's row for (mm, vpn), or -1 when it failed; and
        whether the caller's mmap_sem stayed held throughout.

        The kernel's ksmd holds no mmap_sem here (scan_get_next_rmap_item
        dropped it).  This one does, across a run of pages: the fast path
        (a free frame, no wait) is taken with it held -- nothing there
        waits for anyone -- and for the slow path it is dropped first, so
        that what the OOM killer's victim must take to exit (its own
        mmap_sem, in exit_mmap or the slow __ksm_exit) is not held by the
        allocating ksmd: only ksm_thread_mutex is, as in the kernel -- the
        seed's deadlock under the ``legacy`` exit policy (the victim waits
        for that mutex in __ksm_exit, ksmd for the victim's memory), none
        under ``seed`` and ``shipped``.  ksmd is never an OOM victim (a
        kernel thread has no mm), so order-0's slowpath retries for ever;
        it fails only when armed to (kill point ``ksmd_alloc_kpage``: the
        kernel's fail_page_alloc) or when ksmd is told to stop."""
        cl, task = self.cl, self.cl.task
        if killpoints.hit_ksmd(cl, "ksmd_alloc_kpage", mm.base, self.log):
            return -1, True
        kpfn = self.alloc.alloc_frame_nowait(mm.id, vpn)
        if kpfn >= 0:
            return kpfn, True
        task.unlock(mm.sem)
        try:
            kpfn = self.alloc.alloc_frame(mm.id, vpn, False, lambda: self.stop or bool(self.q[H_SHUTDOWN]))
        except OutOfMemory:
            kpfn = -1
        self.log.info("ksmd_alloc", mm=mm.id, got=kpfn >= 0, free_frames=free_frames(self.cl))
        task.lock(mm.sem)  # the caller finds the area again (returns False)
        return kpfn, False

    def still_mapped(self, mm: MM, vpn: int, pfn: int) -> bool:
        """After mmap_sem was re-taken: "down_read(&mm1->mmap_sem); if
        (ksm_test_exit(mm1)) ..." (2.6.32.67 mm/ksm.c 842-846), before any
        VMA or PTE is looked at; the page must still be there."""
        if ksm_test_exit(self.cl, mm):
            return False
        return mm.pq[PT_OFF + vpn] >> 2 == pfn

    def put_kpage(self, kpfn: int) -> None:
        """put_page(kpage) of a kpage mapped nowhere: its last reference,
        freed.  Off ksmd's row first: a SIGKILL between the two leaves a
        frame at count 1 that nothing references, which the recovery's
        rebuild frees."""
        cl, task = self.cl, self.cl.task
        task.lock(cl.zone)
        self.alloc.installed()  # not in flight any more
        self.alloc.put_frame(kpfn)
        task.unlock(cl.zone)

    @staticmethod
    def vma_mergeable(mm: MM, vpn: int) -> bool:
        """try_to_merge_one_page's first test: the page's area is still
        VM_MERGEABLE (find_vma under the mmap_sem the caller holds)."""
        vma = mm.find_vma(vpn)
        return vma is not None and bool(vma[3] & VM_MERGEABLE)

    def merge_into_kpage(self, mm: MM, vpn: int, pfn: int, kpfn: int) -> StableNode | None:
        """"copy_user_highpage(kpage, page1, addr1, vma); err =
        try_to_merge_one_page(vma, page1, kpage);" (2.6.32.67 mm/ksm.c
        852-853): the copy, then under the pte lock write_protect_page,
        pages_identical (the page may have changed before it was
        write-protected) and replace_page, whose page_add_ksm_rmap makes
        kpage a KSM page.  The PTE takes over the allocation's reference
        (the kernel's get_page in replace_page and put_page at the end of
        try_to_merge_two_pages, netted).  Caller holds mmap_sem (read) and
        has checked ksm_test_exit.  The node, not yet in the tree; None if
        nothing was merged (kpage still in flight)."""
        cl, task, fq, pq, pool = self.cl, self.cl.task, self.fq, mm.pq, self.poolmap
        if not self.vma_mergeable(mm, vpn):  # "vma = find_vma(mm1, addr1); if (!vma ..."
            return None
        p, kp = pfn * PAGE_SIZE, kpfn * PAGE_SIZE
        self.pool[kp:kp + PAGE_SIZE] = self.pool[p:p + PAGE_SIZE]  # copy_user_highpage
        slot = PT_OFF + vpn
        task.lock(mm.ptl)
        try:
            pte = pq[slot]
            b = pfn * FRAME_SIZE
            if pte >> 2 != pfn or not pte & PTE_PRESENT or fq[b + FR_COUNT] != 1 \
                    or fq[b + FR_FLAGS] & (F_KSM | F_ANON) != F_ANON or ksm_test_exit(cl, mm):
                return None
            if pte & PTE_WRITE:  # write_protect_page
                pte &= ~PTE_WRITE
                pq[slot] = pte
            if pool[p:p + PAGE_SIZE] != pool[kp:kp + PAGE_SIZE]:  # pages_identical
                return None
            key = digest(self.pool[kp:kp + PAGE_SIZE])  # kpage is ksmd's alone: stable
            old = self.stable.get(key)
            if old is not None and not self.modern and self.get_ksm_page(old):
                # raced with an equal KSM page: next pass merges it (6.18:
                # stable_tree_insert makes the new page a dup instead)
                return None
            node = StableNode(self.next_nid, kpfn, key)
            self.next_nid += 1
            kb = kpfn * FRAME_SIZE
            fq[kb + FR_KEY0] = node.k0
            fq[kb + FR_KEY1] = node.k1
            task.lock(cl.zone)
            try:
                fq[kb + FR_FLAGS] |= F_KSM  # page_add_ksm_rmap: PageKsm
                pq[slot] = (kpfn << 2) | PTE_PRESENT  # replace_page
                self.alloc.installed()
                self.alloc.put_frame(pfn)
                self.t_last_merge = time.monotonic_ns()  # under the pte lock: see mm_users_zero
            finally:
                task.unlock(cl.zone)
            self.q[mm.base + M_KSM_MAPPED] += 1
            return node
        finally:
            task.unlock(mm.ptl)

    def try_to_merge_one_page(self, mm: MM, vpn: int, pfn: int, node: StableNode) -> bool:
        """try_to_merge_one_page: the area must still be VM_MERGEABLE and
        the page anonymous (the kernel's first two tests), then
        write_protect_page, pages_identical, replace_page.
        Caller holds mm's mmap_sem (read) and has checked ksm_test_exit.

        The kernel drops the pte lock between write_protect_page and
        replace_page (the page lock and ksmd's reference keep the page).
        Here one hold of the pte lock covers the three steps -- the byte
        compare costs less than a lock round trip -- except when the kill
        point there is armed: then the window is open as in the kernel, and
        replace_page's pte_same check is what saves the merge."""
        # hot path: raw words (uksm.kernel.views: a view read is 56 ns against 20 raw)
        cl, task, fq, pq = self.cl, self.cl.task, self.fq, mm.pq
        kpfn = node.kpfn
        if pfn == kpfn:
            return True
        if not self.vma_mergeable(mm, vpn):  # !(vma->vm_flags & VM_MERGEABLE)
            return False
        slot = PT_OFF + vpn
        b = pfn * FRAME_SIZE
        task.lock(mm.ptl)
        try:
            pte = pq[slot]
            if pte >> 2 != pfn or not pte & PTE_PRESENT or fq[b + FR_COUNT] != 1 \
                    or fq[b + FR_FLAGS] & (F_KSM | F_ANON) != F_ANON:  # !PageAnon, or KSM already
                return False
            if pte & PTE_WRITE:  # write_protect_page
                pte &= ~PTE_WRITE
                pq[slot] = pte
            if self.q[H_KSMD_POINT] >= 0:
                task.unlock(mm.ptl)
                try:
                    killpoints.hit_ksmd(cl, "ksmd_between_wp_and_replace", mm.base, self.log)
                finally:
                    task.lock(mm.ptl)
            pool = self.poolmap  # pages_identical
            if pool[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] != pool[kpfn * PAGE_SIZE:(kpfn + 1) * PAGE_SIZE]:
                return False
            if pq[slot] != pte:  # replace_page: !pte_same
                return False
            if ksm_test_exit(cl, mm):  # exit began since the caller's check
                return False
            task.lock(cl.zone)
            try:
                if not self.get_ksm_page(node):  # freed meanwhile (get_page_unless_zero)
                    return False
                fq[kpfn * FRAME_SIZE + FR_COUNT] += 1
                pq[slot] = (kpfn << 2) | PTE_PRESENT
                self.alloc.put_frame(pfn)
                self.t_last_merge = time.monotonic_ns()  # under the pte lock: see mm_users_zero
            finally:
                task.unlock(cl.zone)
            self.q[mm.base + M_KSM_MAPPED] += 1
            return True
        finally:
            task.unlock(mm.ptl)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from uksm.host import log as ulog
    from uksm.kernel.layout import T_PID, T_READY
    ap = argparse.ArgumentParser(prog="uksm-ksmd", description="the ksmd process of a cluster")
    add_task_args(ap)
    a = ap.parse_args(argv)
    from uksm.host.lifeline import EXIT_ORPHAN, arm
    arm()  # die with the supervisor
    try:  # the cluster instance it was started for, or nothing is touched
        cl = Cluster.attach(a.cluster, a.boot_id)
    except shm.UksmError as e:
        print(f"uksm-ksmd: {e}", file=sys.stderr)
        return EXIT_ORPHAN
    cl.bind(a.task)
    import os
    cl.q[cl.tbase(a.task) + T_PID] = os.getpid()
    cl.q[cl.tbase(a.task) + T_READY] = 1   # started: a death from now on is no failure to start
    log = ulog.setup("ksmd", a.cluster, a.log_dir, boot_id=a.boot_id)
    try:
        return run_ksmd(cl, log)
    finally:
        ulog.close()


def run_ksmd(cl: Cluster, log: Any) -> int:
    """This process, bound to ksmd's row in ``cl``, is ksmd until it is
    stopped (0) or oopses (the oops status, uksm.host.oops): its body in a
    normal run (``main``) and in a controlled one (uksm.explorer)."""
    from uksm.host import oops
    cl.watch_use_after_free(log)
    cl.lockdep_log = log
    cl.task.on_wait = lambda name, ms, holders: log.info("lock_wait", lock=name, holders=holders,
                                                          waited_ms=round(ms, 3))
    try:
        ksmd = Ksmd(cl, log)
        oops.install_test_hook(ksmd)
        ksmd.run()
    except Exception as e:  # a bug: an oops, logged once, not a traceback loop (uksm.host.oops)
        return oops.report(log, e)
    return 0


if __name__ == "__main__":
    # `python -m uksm.kernel.ksmd` runs this file as __main__: run it as the
    # module uksm.kernel.ksmd instead, the one copy every other import sees
    # (and the one a mutation run's mutants live in: dev/mutation.sh)
    from uksm.host.lifeline import exit_now
    from uksm.kernel import ksmd as this
    exit_now(this.main())  # uksm.host.lifeline: no finalization
