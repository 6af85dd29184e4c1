"""twin --kernel 6.18: the public 6.x KSM test programs, run on uksm under
``kernel="6.18"`` and on this machine's 6.18 KSM, compared case by case.

Each *case* is a port of one test of a public program -- the kernel's
selftests (tools/testing/selftests/mm/ksm_functional_tests.c, ksm_tests.c)
and LTP (testcases/kernel/mem/ksm/ksm01.c, ksm05.c, ksm07.c), with the
zero-page cases (ksm_tests -Z, test_unmerge_zero_pages) -- as steps of actions
on tasks (``tools/twin.py``'s task processes on the host; ``m.task`` on
uksm), each followed by a wait for full scans, and the *assertions its
source makes* (``Case.asserts``).  After each step both sides are read the
same way (``snapshot``); a row compares one field of one step:

- ``exact`` fields must be equal (the counters the source checks, the
  pages of the task's area that map a KSM page, whether two of them share
  a frame -- the selftests' ``range_maps_duplicates`` --, prctl's returns);
- an asserted field agrees when the source's assertion holds on both (a
  number the source checks only as ``> 0``, e.g. ``ksm_merging_pages`` of a
  process under PR_SET_MEMORY_MERGE, where the host's count takes in the
  Python interpreter's own memory, every area of which merge_any made
  mergeable).

``tests/api/test_ports618.py`` runs the uksm side of every case and checks
the sources' assertions; ``python3 tools/twin.py --kernel 6.18`` runs both
sides (docs/TWIN.md has the table).
"""
from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAGE = 4096
PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68
#: LTP ksm01 scaled: three tasks of this many pages (LTP: 128 MB each)
LTP_PAGES = 32
LTP_TOTAL = 3 * LTP_PAGES
#: LTP ksm05's children (LTP: as many as fit in its runtime, >= 10 s)
KSM05_CHILDREN = 10
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "stable_node_chains", "stable_node_dups")
#: the fields the stable-tree cases compare (stable_cases)
TREE = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
#: read too, the host's relative to the case's start (full_scans as it is:
#: the cases that use it begin with run=2, which resets it on both sides)
SCAN_COUNTERS = ("ksm_zero_pages", "full_scans", "pages_skipped", "pages_scanned")
#: LTP ksm07: full scans waited for (LTP waits "at least 3", in fact many more)
KSM07_SCANS = 30

Action = tuple[Any, ...]


@dataclass
class Step:
    name: str
    actions: list[Action]
    scans: int = 2          # full scans waited after the actions (0: read at once)
    paused: bool = False    # LTP's ksm_group_check: run=0 while reading, then back


@dataclass
class Case:
    name: str
    source: str
    steps: list[Step]
    exact: list[tuple[str, str]]                  # (step, field) compared for equality
    asserts: list[tuple[str, str, str, Any]] = field(default_factory=list)  # (step, field, op, value)
    knobs: dict[str, str] = field(default_factory=dict)   # set before the case (both sides)


def _merge_steps(task: str, pages: int, value: int, how: str) -> list[Action]:
    """__mmap_and_merge_range: ksm_stop (run=2), the area filled with one
    value, MADV_MERGEABLE or PR_SET_MEMORY_MERGE, ksm_start (run=1; the step
    waits two full scans)."""
    acts: list[Action] = [("run", 2), ("task", task, pages), ("fill", task, 0, pages, value)]
    acts.append(("madvise", task, 0, pages, "MERGEABLE") if how == "madvise"
                else ("prctl", task, PR_SET_MEMORY_MERGE, 1))
    return acts + [("run", 1)]


def _ltp_fill(contents: str) -> list[Action]:
    """LTP ksm01's children write their contents: a letter per child; an
    upper case one is the letter with the last byte 'e'."""
    acts: list[Action] = []
    for t, c in zip("ABC", contents):
        acts.append(("fill", t, 0, LTP_PAGES, ord(c.lower())))
        if c.isupper():
            acts.append(("write", t, LTP_PAGES * PAGE - 1, ord("e")))
    return acts


def cases() -> dict[str, Case]:
    n = 512   # ksm_functional_tests: "const unsigned int size = 2 * MiB;"
    merged = [("merge", "A ksm_merging_pages", ">", 0)]   # "No pages got merged" otherwise
    out = [
        Case("unmerge", "ksm_functional_tests.c test_unmerge",
             [Step("merge", _merge_steps("A", n, 0xCF, "madvise")),
              Step("unmerge", [("madvise", "A", 0, n, "UNMERGEABLE")], scans=0)],
             [("merge", "A ksm_merging_pages"), ("merge", "A ksm_pages"), ("merge", "A dups"),
              ("unmerge", "A ksm_pages"), ("unmerge", "A dups")],
             merged + [("unmerge", "A dups", "==", False)]),
        Case("unmerge_discarded", "ksm_functional_tests.c test_unmerge_discarded",
             [Step("merge", _merge_steps("A", n, 0xCF, "madvise")),
              Step("discard-unmerge", [("madvise", "A", 0, n // 2, "DONTNEED"),
                                       ("madvise", "A", 0, n, "UNMERGEABLE")], scans=0)],
             [("merge", "A ksm_pages"), ("discard-unmerge", "A present"),
              ("discard-unmerge", "A ksm_pages"), ("discard-unmerge", "A dups")],
             merged + [("discard-unmerge", "A dups", "==", False)]),
        Case("prctl", "ksm_functional_tests.c test_prctl (and kernel/sys.c's EINVAL)",
             [Step("set-get", [("task", "A", 1), ("prctl", "A", PR_SET_MEMORY_MERGE, 1),
                               ("prctl", "A", PR_GET_MEMORY_MERGE),
                               ("prctl", "A", PR_SET_MEMORY_MERGE, 0),
                               ("prctl", "A", PR_GET_MEMORY_MERGE),
                               ("prctl", "A", PR_SET_MEMORY_MERGE, 1, 1),
                               ("prctl", "A", PR_GET_MEMORY_MERGE, 1)], scans=0)],
             [("set-get", f"A prctl#{i}") for i in range(6)],
             [("set-get", "A prctl#0", "==", 0), ("set-get", "A prctl#1", "==", 1),
              ("set-get", "A prctl#2", "==", 0), ("set-get", "A prctl#3", "==", 0),
              ("set-get", "A prctl#4", "==", -22), ("set-get", "A prctl#5", "==", -22)]),
        Case("prctl_fork", "ksm_functional_tests.c test_prctl_fork (test_child_ksm)",
             [Step("fork-merge", [("run", 2), ("task", "A", n), ("prctl", "A", PR_SET_MEMORY_MERGE, 1),
                                  ("fork", "A", "C"), ("prctl", "C", PR_GET_MEMORY_MERGE),
                                  ("fill", "C", 0, n, 0xCF), ("run", 1)]),
              Step("clear", [("prctl", "A", PR_SET_MEMORY_MERGE, 0)], scans=0)],
             [("fork-merge", "C prctl#0"), ("fork-merge", "C ksm_pages"), ("fork-merge", "C dups"),
              ("clear", "A prctl#1")],
             [("fork-merge", "C prctl#0", "==", 1), ("fork-merge", "C ksm_merging_pages", ">", 0),
              ("clear", "A prctl#1", "==", 0)]),
        Case("prctl_unmerge", "ksm_functional_tests.c test_prctl_unmerge",
             [Step("merge", _merge_steps("A", n, 0xCF, "prctl")),
              Step("unmerge", [("prctl", "A", PR_SET_MEMORY_MERGE, 0)], scans=0)],
             [("merge", "A ksm_pages"), ("merge", "A dups"), ("unmerge", "A ksm_pages"),
              ("unmerge", "A dups")],
             merged + [("unmerge", "A dups", "==", False)]),
        Case("ksm_tests-U", "ksm_tests.c -U (check_ksm_unmerge)",
             [Step("merge", [("run", 2), ("task", "A", 2), ("fill", "A", 0, 2, ord("*")),
                             ("madvise", "A", 0, 2, "MERGEABLE"), ("run", 1)]),
              Step("write", [("write", "A", 0, ord("-")), ("write", "A", PAGE, ord("+"))], scans=1)],
             [("merge", "pages_shared"), ("merge", "pages_sharing"), ("write", "pages_shared"),
              ("write", "pages_sharing")],
             [("write", "pages_shared", "==", 0), ("write", "pages_sharing", "==", 0)]),
    ]
    out += [ksm01(), ksm05()] + stable_cases() + zero_page_cases() + [ksm07()]
    return {c.name: c for c in out}


def merge_check(n: int, m: int) -> tuple[int, int]:
    """ksm_tests.c check_ksm_merge's expectation for n pages of one content
    and max_page_sharing m: "if (page_count % max_page_sharing == 0 ||
    page_count % max_page_sharing == 1)" shared = n / m, sharing = shared *
    (m - 1); else shared = n / m + 1, sharing = n - shared."""
    if n % m in (0, 1):
        return n // m, n // m * (m - 1)
    return n // m + 1, n - (n // m + 1)


def _tree_case(name: str, source: str, limit: int, steps: list[Step], asserts: dict[str, tuple[int, ...]],
               prune_ms: int = 2000) -> Case:
    """6.18's stable tree (4.13, 2c653d0ee2ae): one task, max_page_sharing
    ``limit``, each step's TREE fields compared; ``asserts``: step ->
    (shared, sharing[, chains, dups]) the source asserts."""
    exact = [(s.name, f) for s in steps for f in TREE]
    checks = [(step, f, "==", v) for step, vals in asserts.items() for f, v in zip(TREE, vals)]
    knobs = {"smart_scan": "0", "max_page_sharing": str(limit),
             "stable_node_chains_prune_millisecs": str(prune_ms)}
    return Case(name, source, steps, exact, checks, knobs)


def _same(n: int) -> list[Action]:
    """n pages of '*' (ksm_tests.c: memset(map, '*', ...)), MADV_MERGEABLE."""
    return [("run", 1), ("task", "A", n), ("fill", "A", 0, n, ord("*")), ("madvise", "A", 0, n, "MERGEABLE")]


def stable_cases() -> list[Case]:
    """ksm_tests.c -M, check_ksm_merge's max_page_sharing formula, LTP ksm06's
    one-node half, and what 6.18 does with a KSM page mapped once, stale
    dups, an emptied chain and a forked KSM page (tests/kernel/test_stable_618.py
    checks the same on uksm alone).  The tree-* cases' numbers are no
    program's: they are what 6.18's mm/ksm.c gives (stable_node_dup,
    chain_prune, stable_node_dup_any, max_page_sharing_bypass), as this
    machine's 6.18 gave them (docs/TWIN.md)."""
    out = [_tree_case("ksm_tests-M", "ksm_tests.c -M -p 10", 256,
                      [Step("merge", _same(10), scans=3)], {"merge": (1, 9, 0, 0)})]
    for n, m in ((10, 3), (11, 3), (8, 2), (5, 2)):
        shared, sharing = merge_check(n, m)
        out.append(_tree_case(f"merge-{n}-{m}", f"ksm_tests.c check_ksm_merge, {n} pages, max_page_sharing {m}",
                              m, [Step("merge", _same(n), scans=3)], {"merge": (shared, sharing, 1, shared)}))
    out.append(_tree_case("ksm06", "LTP ksm06, merge_across_nodes=1 on one node: 100 pages, max 100", 100,
                          [Step("merge", _same(100), scans=3)], {"merge": (1, 99, 0, 0)}))
    out.append(_tree_case("tree-once", "6.18's ksm_do_scan: a KSM page mapped once stays one", 256,
                          [Step("merge", _same(2), scans=3), Step("write", [("fill", "A", 1, 1, 0x31)], scans=3)],
                          {"write": (1, 0, 0, 0)}))
    out.append(_tree_case("tree-prune", "chain_prune: max 2, 0 ms; pages 0-1 discarded, page 3 written", 2,
                          [Step("merge", _same(4), scans=3),
                           Step("discard", [("madvise", "A", 0, 2, "DONTNEED"), ("fill", "A", 3, 1, 0x33)],
                                scans=3)], {"merge": (2, 2, 1, 2), "discard": (1, 0, 0, 0)}, prune_ms=0))
    out.append(_tree_case("tree-empty", "stable_node_dup_any: max 2, 5 pages; 4 written, 0-3 discarded", 2,
                          [Step("merge", _same(5), scans=3),
                           Step("discard", [("fill", "A", 4, 1, 0x34), ("madvise", "A", 0, 4, "DONTNEED")],
                                scans=3)], {"merge": (2, 2, 1, 2), "discard": (0, 0, 0, 0)}))
    out.append(_tree_case("tree-fork", "max_page_sharing_bypass: max 2, 2 pages merged, then a fork", 2,
                          [Step("merge", _same(2), scans=3), Step("fork", [("fork", "A", "B")], scans=3)],
                          {"fork": (1, 3, 0, 0)}))
    return out





def zero_page_cases() -> list[Case]:
    """use_zero_pages (4.11, e86c59b1b12d) and ksm_zero_pages (6.6):
    ksm_tests.c -Z -p 10 -z 0|1 (check_ksm_zero_page_merge: 1 shared and
    9 sharing, or 0 and 0, each through assert_ksm_pages_count's
    max_page_sharing formula), and ksm_functional_tests.c
    test_unmerge_zero_pages (512, then 256 after MADV_UNMERGEABLE of the
    first half, then 0 after a write to each page of the second half --
    a different byte of each, so that none merges again meanwhile -- and
    no two pages on one frame)."""
    out = []
    for use, (shared, sharing, zero) in ((0, (1, 9, 0)), (1, (0, 0, 10))):
        asserts = [("merge", "pages_shared", "==", shared), ("merge", "pages_sharing", "==", sharing),
                   ("merge", "ksm_zero_pages", "==", zero), ("merge", "A ksm_zero_pages", "==", zero)]
        out.append(Case(f"ksm_tests-Z{use}", f"ksm_tests.c -Z -p 10 -z {use} (check_ksm_zero_page_merge)",
                        [Step("merge", _merge_steps("A", 10, 0, "madvise"))],
                        [(s, f) for (s, f, _o, _v) in asserts] + [("merge", "A dups")], asserts,
                        {"use_zero_pages": str(use)}))
    n = 512
    writes: list[Action] = [("write", "A", i * PAGE + i - n // 2, 1) for i in range(n // 2, n)]
    asserts = [("merge", "A ksm_zero_pages", "==", n), ("unmerge-half", "A ksm_zero_pages", "==", n // 2),
               ("write-half", "A ksm_zero_pages", "==", 0), ("write-half", "A dups", "==", False)]
    out.append(Case("unmerge_zero_pages", "ksm_functional_tests.c test_unmerge_zero_pages",
                    [Step("merge", _merge_steps("A", n, 0, "madvise")),
                     Step("unmerge-half", [("madvise", "A", 0, n // 2, "UNMERGEABLE")], scans=0),
                     Step("write-half", writes, scans=0)],
                    [(s, f) for (s, f, _o, _v) in asserts] + [("merge", "ksm_zero_pages")], asserts,
                    {"use_zero_pages": "1"}))
    return out


def ksm07() -> Case:
    """LTP ksm07 (6.7's smart scan): one page of 'a', pages_to_scan 100,
    sleep 0, smart_scan 1; read after KSM07_SCANS full scans with ksmd
    paused.  LTP checks pages_skipped >= half the full scans; the rule
    (should_skip_rmap_item) gives the exact split for one page met at every
    full scan since run=2 reset them (uksm.kernel.ksm618.lonely_page_looks)."""
    steps = [Step("scan", [("run", 2), ("task", "A", 1), ("fill", "A", 0, 1, ord("a")),
                           ("madvise", "A", 0, 1, "MERGEABLE"), ("run", 1)], scans=KSM07_SCANS, paused=True)]
    asserts = [("scan", "skipped >= scans/2", "==", True), ("scan", "looks as should_skip_rmap_item", "==", True)]
    return Case("ksm07", "LTP ksm07 (smart_scan 1)", steps, [(s, f) for (s, f, _o, _v) in asserts], asserts,
                {"smart_scan": "1", "pages_to_scan": "100", "sleep_millisecs": "0"})


def scan_facts(snap: dict[str, Any]) -> dict[str, Any]:
    """ksm07's two checks from a snapshot's full_scans, pages_skipped and
    pages_scanned."""
    from uksm.kernel.ksm618 import lonely_page_looks
    scans, skipped, scanned = snap["full_scans"], snap["pages_skipped"], snap["pages_scanned"]
    return {"skipped >= scans/2": skipped >= scans * 50 // 100,
            "looks as should_skip_rmap_item": scanned == lonely_page_looks(scans) and skipped + scanned == scans}


def ksm01() -> Case:
    """LTP ksm01 (create_same_memory, ksm_group_check; smart_scan 0 and
    max_page_sharing = every page, as LTP sets them): the counters after 3
    full scans of each step, read with ksmd paused; then run=2."""
    t = LTP_TOTAL
    table = [("caa", 2, t - 2, 0), ("cba", 3, t - 3, 0), ("ddd", 1, t - 1, 0), ("dDd", 1, t - 2, 1)]
    setup: list[Action] = [("run", 2), ("knob", "max_page_sharing", str(t)), ("run", 1)]
    for name in "ABC":
        setup += [("task", name, LTP_PAGES), ("madvise", name, 0, LTP_PAGES, "MERGEABLE")]
    steps = [Step(c, (setup if i == 0 else []) + _ltp_fill(c), scans=3, paused=True)
             for i, (c, _s, _g, _u) in enumerate(table)]
    steps.append(Step("run=2", [("run", 2)], scans=0))
    asserts = []
    for c, shared, sharing, unshared in table + [("run=2", 0, 0, 0)]:
        asserts += [(c, "pages_shared", "==", shared), (c, "pages_sharing", "==", sharing),
                    (c, "pages_unshared", "==", unshared), (c, "pages_volatile", "==", 0)]
    return Case("ksm01", "LTP ksm01 (smart_scan 0), three tasks of 32 pages", steps,
                [(s, f) for (s, f, _o, _v) in asserts], asserts, {"smart_scan": "0"})


def ksm05() -> Case:
    """LTP ksm05 (CVE-2011-2183): children madvise a page MERGEABLE and
    die of SIGSEGV; the kernel (ksmd) survives: it goes on scanning."""
    # a task that stays: ksmd sleeps while no mm is in KSM (ksmd_should_run),
    # so that its full scans show it alive after the children
    acts: list[Action] = [("run", 1), ("task", "A", 2), ("fill", "A", 0, 2, 5),
                          ("madvise", "A", 0, 2, "MERGEABLE")]
    for i in range(KSM05_CHILDREN):
        acts += [("task", f"S{i}", 1), ("madvise", f"S{i}", 0, 1, "MERGEABLE"), ("segv", f"S{i}")]
    return Case("ksm05", "LTP ksm05 (CVE-2011-2183)", [Step("segv", acts, scans=2)],
                [("segv", "fatal"), ("segv", "alive")],
                [("segv", "fatal", "==", KSM05_CHILDREN), ("segv", "alive", "==", True)])


# ---- what a snapshot holds, and how a case is judged -----------------------------------------

def area_facts(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """A task's area from its pagemap: pages present, pages mapping a KSM
    page, and whether two present pages share a frame (range_maps_duplicates)."""
    frames = [p["frame"] for p in pages if p["present"]]
    return {"present": len(frames), "ksm_pages": sum(1 for p in pages if p["present"] and p["ksm"]),
            "dups": len(set(frames)) != len(frames)}


def holds(op: str, got: Any, want: Any) -> bool:
    return bool(got == want if op == "==" else got is not None and got > want)


def judge(case: Case, k: list[dict[str, Any]] | None, u: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The case's rows: each exact field (agree: equal) and each asserted
    one (agree: the source's assertion holds on both); ``k`` None: uksm only."""
    names = [s.name for s in case.steps]
    rows: list[dict[str, Any]] = []
    checks = {(s, f): (o, v) for (s, f, o, v) in case.asserts}
    for step, f in dict.fromkeys(case.exact + [(s, f) for (s, f, _o, _v) in case.asserts]):
        i = names.index(step)
        uv = u[i].get(f)
        kv = k[i].get(f) if k is not None else None
        row: dict[str, Any] = {"case": case.name, "step": step, "field": f, "kernel": kv, "uksm": uv}
        if (step, f) in checks:
            o, v = checks[(step, f)]
            row["assert"] = f"{o} {v}"
            row["uksm_holds"] = holds(o, uv, v)
            row["kernel_holds"] = holds(o, kv, v) if k is not None else None
        exact = (step, f) in case.exact
        row["agree"] = None if k is None else (kv == uv if exact else
                                               bool(row["uksm_holds"] and row["kernel_holds"]))
        rows.append(row)
    return rows


# ---- uksm ---------------------------------------------------------------------------------

def run_uksm(case: Case, say: Callable[[str], None], timeout: float = 60.0) -> list[dict[str, Any]]:
    """The case on a uksm Machine(kernel="6.18")."""
    import uksm
    tasks: dict[str, Any] = {}
    pages = max(a[2] for s in case.steps for a in s.actions if a[0] == "task")
    ntasks = sum(1 for s in case.steps for a in s.actions if a[0] in ("task", "fork"))
    snaps: list[dict[str, Any]] = []
    res: dict[str, Any] = {"fatal": 0}
    with uksm.Machine(kernel="6.18", frames=max(256, 3 * pages * min(ntasks, 4)), max_pages=pages,
                      max_tasks=ntasks + 4, pages_to_scan=5000, sleep_millisecs=5) as m:
        for k, v in case.knobs.items():
            m.ksm[k] = v
        for step in case.steps:
            for a in step.actions:
                _uksm_action(m, tasks, res, a)
            if step.scans:
                m.wait_full_scans(step.scans, timeout=timeout)
            run = m.ksm["run"]
            if step.paused and run == 1:
                m.ksm["run"] = 0
            snap = {**res, **{c: m.ksm[c] for c in COUNTERS + SCAN_COUNTERS}, "alive": True}
            snap.update(scan_facts(snap))
            for name, t in tasks.items():
                snap.update({f"{name} {f}": v for f, v in area_facts(t.pagemap()).items()})
                snap.update({f"{name} {f}": v for f, v in t.stat().items()})
            if step.paused and run == 1:
                m.ksm["run"] = 1
            snaps.append(snap)
            say(f"  uksm: {case.name}/{step.name}: shared {snap['pages_shared']} "
                f"sharing {snap['pages_sharing']}")
    return snaps


def _uksm_action(m: Any, tasks: dict[str, Any], res: dict[str, Any], a: Action) -> None:
    op = a[0]
    if op == "run":
        m.ksm["run"] = a[1]
    elif op == "knob":
        m.ksm[a[1]] = a[2]
    elif op == "task":
        tasks[a[1]] = m.task(pages=a[2], mergeable=False)
    elif op == "fill":
        tasks[a[1]].fill(a[4], a[2], a[3])
    elif op == "write":
        tasks[a[1]].write(a[2], bytes([a[3]]))
    elif op == "madvise":
        tasks[a[1]].madvise(a[2], a[3], a[4])
    elif op == "prctl":
        n = sum(1 for k in res if k.startswith(f"{a[1]} prctl#"))
        try:
            res[f"{a[1]} prctl#{n}"] = tasks[a[1]].prctl(*a[2:])
        except OSError as e:
            res[f"{a[1]} prctl#{n}"] = -(e.errno or 0)
    elif op == "fork":
        tasks[a[2]] = tasks[a[1]].fork()
    elif op == "segv":   # a fatal signal: the task's exit runs as a killed task's
        tasks.pop(a[1]).kill("KILL")
        res["fatal"] += 1


# ---- the kernel ------------------------------------------------------------------------------

def run_kernel(case: Case, host: Any, say: Callable[[str], None], timeout: float = 60.0) -> list[dict[str, Any]]:
    """The case on this machine's KSM, under the host lock, knobs restored."""
    from hostksm import host_lock
    from twin import clean_up, wait_host_scans
    snaps: list[dict[str, Any]] = []
    with host_lock(say, timeout):
        base = {f: host.int(f) for f in ("pages_shared", "pages_sharing", "ksm_zero_pages", "pages_skipped",
                                         "pages_scanned")}
        tasks: dict[str, Any] = {}
        alive: list[Any] = []
        res: dict[str, Any] = {"fatal": 0}
        try:
            host.write("run", "0")
            for name, value in (("pages_to_scan", "5000"), ("sleep_millisecs", "5"),
                                ("use_zero_pages", "0"), ("advisor_mode", "none"),
                                ("max_page_sharing", "256"), ("smart_scan", "1"), *case.knobs.items()):
                if host.read(name).split()[0] != value:
                    host.write(name, value)
            for step in case.steps:
                for a in step.actions:
                    _kernel_action(host, tasks, alive, res, a)
                wait_host_scans(host, step.scans, timeout, f"{case.name}/{step.name}")
                snaps.append(_kernel_snapshot(host, tasks, res, base, step.paused))
                say(f"  kernel: {case.name}/{step.name}: shared {snaps[-1]['pages_shared']} "
                    f"sharing {snaps[-1]['pages_sharing']}")
        finally:
            clean_up(host, alive, say)
    return snaps


def _kernel_snapshot(host: Any, tasks: dict[str, Any], res: dict[str, Any], base: dict[str, int],
                     paused: bool) -> dict[str, Any]:
    run = host.read("run")
    if paused and run == "1":
        host.write("run", "0")
    snap = {**res, **{c: host.int(c) - base.get(c, 0) for c in COUNTERS + SCAN_COUNTERS}, "alive": True}
    snap.update(scan_facts(snap))
    for name, t in tasks.items():
        snap.update({f"{name} {f}": v for f, v in area_facts(t.cmd("pagemap")["pages"]).items()})
        snap.update({f"{name} {f}": v for f, v in t.cmd("stat")["stat"].items()})
    if paused and run == "1":
        host.write("run", "1")
    return snap


def _kernel_action(host: Any, tasks: dict[str, Any], alive: list[Any], res: dict[str, Any],
                   a: Action) -> None:
    from twin import fork_host_task, start_host_task
    op = a[0]
    if op in ("run", "knob"):
        name, value = ("run", str(a[1])) if op == "run" else (a[1], a[2])
        for attempt in range(20):
            try:
                host.write(name, value)
                break
            except OSError as e:
                # max_page_sharing's EBUSY: remove_all_stable_nodes could not
                # remove a stale stable node yet (its folio busy): a moment later it can
                if e.errno != errno.EBUSY or attempt == 19:
                    state = {k: host.read(k) for k in ("run", "pages_shared", "pages_sharing",
                                                       "stable_node_chains", "stable_node_dups")}
                    raise OSError(e.errno, f"{name}={value}: {e.strerror} ({state})") from None
                time.sleep(0.05)
    elif op == "task":
        tasks[a[1]] = start_host_task(a[1], a[2], fresh=True)
        alive.append(tasks[a[1]])
    elif op == "fill":
        tasks[a[1]].cmd("fill", first=a[2], count=a[3], value=a[4])
    elif op == "write":
        tasks[a[1]].cmd("write", offset=a[2], value=a[3])
    elif op == "madvise":
        tasks[a[1]].cmd("madvise", first=a[2], count=a[3], advice=a[4])
    elif op == "prctl":
        n = sum(1 for k in res if k.startswith(f"{a[1]} prctl#"))
        res[f"{a[1]} prctl#{n}"] = tasks[a[1]].cmd("prctl", option=a[2], args=list(a[3:]))["ret"]
    elif op == "fork":
        tasks[a[2]] = fork_host_task(tasks[a[1]], a[2])
        alive.append(tasks[a[2]])
    elif op == "segv":
        t = tasks.pop(a[1])
        alive.remove(t)
        import json
        import socket
        socket.send_fds(t.sock, [json.dumps({"op": "segv"}).encode()], [])
        _pid, status = os.waitpid(t.pid, 0)
        t.sock.close()
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV:
            res["fatal"] += 1


__all__ = ["Case", "Step", "area_facts", "cases", "judge", "run_kernel", "run_uksm"]
