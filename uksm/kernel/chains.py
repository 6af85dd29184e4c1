"""6.18's stable tree: stable_node chains and dups under max_page_sharing
(kernel="6.18" only; ``Ksmd`` mixes this in, and 2.6.32 never calls it).

4.13, 2c653d0ee2ae "ksm: introduce ksm_max_page_sharing per page
deduplication limit" (Andrea Arcangeli), as 6.18's mm/ksm.c has it: a KSM
page is shared by at most ``max_page_sharing`` rmap_items
(is_page_sharing_candidate: ``rmap_hlist_len && rmap_hlist_len + offset <
ksm_max_page_sharing``).  When every KSM page of a content is full, a page
of that content waits for a twin in the unstable tree, the two make a new
KSM page, and stable_tree_insert turns the content's node into a *chain*
(alloc_stable_node_chain: ksm_stable_node_chains++) whose *dups* are the KSM
pages (stable_node_chain_add_dup: ksm_stable_node_dups++, newest first).
pages_shared counts every dup with an rmap_item, pages_sharing the rest,
exactly as for a plain node (stable_tree_append is the same code).

The tree is still the hash map on the 128-bit digest (ksmd.py): the chain
is the map's entry for its content.  Kept difference, named in
docs/KERNEL-MAP.md: the kernel's rbtree walk meets a chain on the path of
a search for *any* content, and prunes it there when it is due
(chain_prune, every stable_node_chains_prune_millisecs) or frees it when
it is empty (stable_node_dup_any); a hash map meets only its own key.  So
every batch here first meets every chain that is due or empty
(``meet_chains``) -- what the kernel does in a tree of one content (every
search passes the root) to within a batch, and more often than the
kernel in a big tree.  The clock is read once a batch (``jiffies``).

Nothing here is shared memory: the trees are ksmd's private state, and the
counters are published with the others under ksm_thread_mutex
(``Ksmd.publish``).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from uksm.kernel import sched
from uksm.kernel.layout import (
    F_KSM,
    FR_COUNT,
    FR_FLAGS,
    FR_KEY0,
    FR_KEY1,
    FRAME_SIZE,
    K_MAX_PAGE_SHARING,
    K_STABLE_NODE_CHAINS_PRUNE_MS,
)

NEVER = 1 << 62


def key_ints(key: bytes) -> tuple[int, int]:
    return (int.from_bytes(key[:8], "little", signed=True),
            int.from_bytes(key[8:], "little", signed=True))


class StableNode:
    """A KSM page in the stable tree: its frame, and how many rmap_items map
    it (``mapcount``, the kernel's rmap_hlist_len; ``rows``: how many of
    them are each slot's, so that remove_node_from_stable_tree can count
    them all out at once).  Its rmap_items name it by ``nid``, never
    reused: once the node has left the tree (Ksmd.live), an rmap_item
    naming it is in no tree -- what the kernel's
    remove_node_from_stable_tree does to each rmap_item on the node's list,
    done when the rmap_item is next looked at.

    6.18 only (4.13, 2c653d0ee2ae): a *chain* (``dups`` a list, kpfn -1,
    no rmap_items: rmap_hlist_len == STABLE_NODE_CHAIN) stands in the tree
    for a content whose KSM pages are its dups, newest first as
    hlist_add_head puts them; a dup names its chain (``chain``:
    is_stable_node_dup).  ``prune_at``: a chain's chain_prune_time (ms)."""
    __slots__ = ("nid", "kpfn", "key", "k0", "k1", "mapcount", "rows", "dups", "chain", "prune_at")

    def __init__(self, nid: int, kpfn: int, key: bytes) -> None:
        self.nid = nid
        self.kpfn = kpfn
        self.key = key
        self.k0, self.k1 = key_ints(key)
        self.mapcount = 0
        self.rows: dict[int, int] = {}
        self.dups: list[StableNode] | None = None
        self.chain: StableNode | None = None
        self.prune_at = 0


def now_ms() -> int:
    """jiffies, in ms: the run's logical clock in a controlled run."""
    return sched.now() if sched.ON else time.monotonic_ns() // 1_000_000


class StableTree618:
    """The 6.18 half of ksmd's stable tree (mixed into ``Ksmd``)."""
    q: Any
    fq: Any
    stable: dict[bytes, StableNode]
    live: dict[int, StableNode]
    chains: dict[int, StableNode]   # nid -> chain (ksm_stable_node_chains = len)
    ndups: int                      # ksm_stable_node_dups
    next_nid: int
    next_meet: int                  # meet_chains does nothing before this (ms)
    jiffies: int                    # the clock (ms), read at each batch's start

    if TYPE_CHECKING:
        def get_ksm_page(self, node: StableNode) -> bool: ...
        def remove_node_from_stable_tree(self, node: StableNode) -> None: ...

    def is_page_sharing_candidate(self, node: StableNode, offset: int = 0) -> bool:
        """__is_page_sharing_candidate: at least one rmap_item ("the
        underlying tree_page of the other sharer is going to be freed
        soon" otherwise) and room for ``offset`` + 1 more."""
        n = node.mapcount
        return bool(n) and n + offset < self.q[K_MAX_PAGE_SHARING]

    def stale(self, node: StableNode) -> bool:
        """get_ksm_page's failure: the node's page is gone, and the node
        leaves the tree (remove_node_from_stable_tree; a dup leaves its
        chain: ksm_stable_node_dups--)."""
        if self.get_ksm_page(node):
            return False
        self.remove_node_from_stable_tree(node)
        return True

    # ---- chains and dups ------------------------------------------------------
    def alloc_stable_node_chain(self, dup: StableNode) -> StableNode:
        """alloc_stable_node_chain: a chain takes the node's place in the
        tree (rb_replace_node) and the node becomes its first dup."""
        chain = StableNode(self.next_nid, -1, dup.key)
        self.next_nid += 1
        chain.dups = []
        chain.prune_at = self.jiffies   # chain->chain_prune_time = jiffies
        self.chains[chain.nid] = chain  # ksm_stable_node_chains++
        self.stable[dup.key] = chain
        self.stable_node_chain_add_dup(dup, chain)
        self.next_meet = min(self.next_meet, chain.prune_at + self.q[K_STABLE_NODE_CHAINS_PRUNE_MS])
        # (a knob write lowering the period is seen at the next meet_chains
        # that runs: next_meet is a hint, the chains' own prune_at decides)
        return chain

    def stable_node_chain_add_dup(self, dup: StableNode, chain: StableNode) -> None:
        """stable_node_chain_add_dup: hlist_add_head, ksm_stable_node_dups++."""
        assert chain.dups is not None
        dup.chain = chain
        chain.dups.insert(0, dup)
        self.ndups += 1

    def stable_node_dup_del(self, dup: StableNode) -> None:
        """__stable_node_dup_del: out of its chain, ksm_stable_node_dups--.
        The chain stays, empty, until a walk meets it (stable_node_dup_any)."""
        chain = dup.chain
        assert chain is not None and chain.dups is not None
        chain.dups.remove(dup)
        dup.chain = None
        self.ndups -= 1
        if not chain.dups:
            self.next_meet = 0   # an empty chain: the next search frees it

    def free_stable_node_chain(self, chain: StableNode) -> None:
        """free_stable_node_chain: rb_erase, ksm_stable_node_chains--."""
        if self.stable.get(chain.key) is chain:
            del self.stable[chain.key]
        self.chains.pop(chain.nid, None)

    def stable_node_dup_any(self, chain: StableNode) -> StableNode | None:
        """stable_node_dup_any: a plain node itself; an empty chain is freed
        (None: the caller searches again); else the chain's first dup."""
        if chain.dups is None:
            return chain
        if not chain.dups:
            self.free_stable_node_chain(chain)
            return None
        return chain.dups[0]

    def stable_node_dup(self, chain: StableNode, prune: bool) -> StableNode | None:
        """stable_node_dup: the fullest dup with room (the first with room
        when not pruning: the walk stops there), the stale dups met on the
        way removed.  Pruning (at most every
        stable_node_chains_prune_millisecs per chain) walks every dup; if
        just one is left, and it has room, the chain collapses into it
        (ksm_stable_node_chains--, ksm_stable_node_dups--).  A dup with room
        for one more after this merge moves to the head of the chain.
        The clock is ``jiffies``, read once a batch (``meet_chains``)."""
        dups = chain.dups
        assert dups is not None
        if prune:
            if self.jiffies >= chain.prune_at + self.q[K_STABLE_NODE_CHAINS_PRUNE_MS]:
                chain.prune_at = self.jiffies
            else:
                prune = False
        limit = self.q[K_MAX_PAGE_SHARING]
        fq = self.fq
        found: StableNode | None = None
        i = 0
        while i < len(dups):   # hlist_for_each_entry_safe: a stale dup leaves the list
            dup = dups[i]
            b = dup.kpfn * FRAME_SIZE   # get_ksm_page, inline (the scan's hot path)
            if not (fq[b + FR_FLAGS] & F_KSM and fq[b + FR_COUNT] > 0
                    and fq[b + FR_KEY0] == dup.k0 and fq[b + FR_KEY1] == dup.k1):
                self.remove_node_from_stable_tree(dup)
                continue
            i += 1
            n = dup.mapcount   # is_page_sharing_candidate, inline: the scan's hot path
            if n and n < limit and (found is None or n > found.mapcount):
                found = dup
                if not prune:
                    break
        if found is None:
            return None
        if len(dups) == 1:
            # hlist_is_singular_node(&found->hlist_dup, &stable_node->hlist),
            # pruning or not (the walk may have stopped at ``found``: the
            # list itself is what counts): "There's just one entry and it is
            # below the deduplication limit so drop the chain":
            # rb_replace_node(chain, found)
            self.chains.pop(chain.nid, None)
            dups.clear()
            found.chain = None
            self.ndups -= 1
            self.stable[found.key] = found
        elif dups[0] is not found and self.is_page_sharing_candidate(found, 1):
            dups.remove(found)
            dups.insert(0, found)
        return found

    def meet_chains(self) -> None:
        """The chains a search walks past -- in the kernel, the rbtree path
        of any search; here, at a batch's start (``Ksmd.ksm_do_scan``, once
        ``jiffies`` reaches ``next_meet``), every chain that is due for
        pruning (chain_prune) or empty (stable_node_dup_any frees it)."""
        now = self.jiffies
        ms = self.q[K_STABLE_NODE_CHAINS_PRUNE_MS]
        nxt = NEVER
        for chain in list(self.chains.values()):
            if chain.dups and now >= chain.prune_at + ms:
                self.stable_node_dup(chain, True)
            if chain.nid in self.chains and not chain.dups:
                self.free_stable_node_chain(chain)
            if chain.nid in self.chains:
                nxt = min(nxt, chain.prune_at + ms)
        self.next_meet = nxt

    # ---- search and insert ---------------------------------------------------
    def own_node(self, key: bytes, pfn: int) -> StableNode | None:
        """page_stable_node(page) for a KSM page the tree knows (a KSM page
        forked: stable_tree_search returns the page itself, and the merge
        appends the rmap_item past the limit, max_page_sharing_bypass)."""
        node = self.stable.get(key)
        if node is None:
            return None
        for n in node.dups if node.dups is not None else (node,):
            if n.kpfn == pfn:
                return n if self.get_ksm_page(n) else None
        return None

    def stable_tree_search(self, key: bytes, pfn: int, ksm: bool) -> StableNode | None:
        """stable_tree_search (6.18): the KSM page to merge page ``pfn``
        (content ``key``; ``ksm``: it is a KSM page already) into, or None
        -- no such content, or every KSM page of it is full ("we need to
        wait the scanned page to find itself a match in the unstable tree
        to create a brand new KSM page to add later to the dups of this
        stable_node chain").  A stale node met is removed and the search
        starts again ("goto again")."""
        if ksm:
            node = self.own_node(key, pfn)
            if node is not None:
                return node
        while True:
            node = self.stable.get(key)
            if node is None:
                return None
            if node.dups is None:   # __stable_node_chain on a plain node
                if self.stale(node):
                    continue
                n = node.mapcount   # is_page_sharing_candidate, inline
                return node if n and n < self.q[K_MAX_PAGE_SHARING] else None
            dup = self.stable_node_dup(node, True)   # chain_prune
            if dup is not None:
                return dup
            other = self.stable_node_dup_any(node)
            if other is None or self.stale(other):
                continue
            return None

    def stable_tree_insert(self, node: StableNode) -> None:
        """stable_tree_insert (6.18) of a new KSM page's node: alone in the
        tree, or -- an equal content is there ("need_chain") -- a dup of
        its chain, made first if the content had a plain node.  The walk
        (chain(), no pruning) removes the stale nodes it meets and starts
        again, as the kernel's."""
        while True:
            head = self.stable.get(node.key)
            if head is None:
                self.stable[node.key] = node
                break
            if head.dups is None:
                if self.stale(head):
                    continue
                self.stable_node_chain_add_dup(node, self.alloc_stable_node_chain(head))
                break
            if self.stable_node_dup(head, False) is None:
                other = self.stable_node_dup_any(head)
                if other is None or self.stale(other):
                    continue
            self.stable_node_chain_add_dup(node, head)
            break
        self.live[node.nid] = node

    def remove_all_stable_nodes(self) -> None:
        """remove_all_stable_nodes after run=2 (remove_stable_node_chain):
        every node without rmap_items leaves the tree; a chain goes when
        its dups have (a dup still used stops its chain's walk, -EBUSY)."""
        for node in list(self.stable.values()):
            if node.dups is None:
                if not node.mapcount:
                    self.remove_node_from_stable_tree(node)
                continue
            for dup in list(node.dups):
                if dup.mapcount:
                    break
                self.remove_node_from_stable_tree(dup)
            if not node.dups:
                self.free_stable_node_chain(node)
