"""The built-in scenarios: 2-3 tasks of a few pages, small enough to
explore exhaustively at two preemptions.

Each scenario has a *setup* run under the default policy (tasks map and
write their pages, ksmd merges them: no choices) and a *race phase*, which
the strategies explore, starting at a moment the scenario names (the
run=2 write, the tasks' release to exit).  ``--from-start`` explores the
setup too.  A scenario's ``on_step`` is the explorer's script: it looks at
the shared state between two steps and acts (release a task, write run),
so the same schedule always meets the same script.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from uksm.kernel.cluster import Config
from uksm.kernel.layout import A_FREE_TOP, H_MEM_LIMIT, H_PENDING_FREE, K_FULL_SCANS, K_PAGES_SHARING
from uksm.explore.gate import EXITED
from uksm.explore.world import Options, World


def small(o: Options, **kw: Any) -> Config:
    cfg = Config(frames=64, max_tasks=16, max_mms=8, rwsem_n=2, va_pages=32,
                 pages_to_scan=8, sleep_ms=20, hung_timeout_ms=5000)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def ready(w: World) -> bool:
    return all(w.cl.trow(p.row).ready or p.state == EXITED for p in w.tasks())


def merged(w: World, sharing: int) -> bool:
    """ksmd has merged what it can: the published pages_sharing, and one
    more full scan (the counters are published at batch end)."""
    return w.cl.q[K_PAGES_SHARING] >= sharing


def writer_done(w: World) -> bool:
    return any(p.role == "writer" and p.state == EXITED for p in w.procs.values())


@dataclass
class Builtin:
    """A scenario of the table below (``SCENARIOS``)."""
    name: str
    doc: str
    progs: list[list[tuple]]
    cfg: dict[str, Any] = field(default_factory=dict)
    # (World, its state dict) -> None: the script's steps between two steps
    script: Callable[[World, dict], None] = lambda w, s: None
    finished: Callable[[World, dict], bool] = lambda w, s: True

    def config(self, o: Options) -> Config:
        return small(o, **self.cfg)

    def setup(self, w: World) -> None:
        w.extra_state = {}   # type: ignore[attr-defined]
        for prog in self.progs:
            pages = next((op[1] for op in prog if op[0] == "map"), 0)
            w.spawn_task(pages, prog)

    def on_step(self, w: World) -> None:
        self.script(w, w.extra_state)  # type: ignore[attr-defined]

    def done(self, w: World) -> bool:
        return self.finished(w, w.extra_state)  # type: ignore[attr-defined]


def _begin(w: World, s: dict, phase: str) -> None:
    """The race phase begins: from here the strategies choose."""
    s["phase"] = phase
    w.explored = True


# ---- oom-unmerge: the seed's case -----------------------------------------------------------------

def _oom_unmerge(w: World, s: dict) -> None:
    q = w.cl.q
    if "phase" not in s:
        if ready(w) and merged(w, 1) and q[K_FULL_SCANS] >= 2:
            used = w.cl.nframes - q[A_FREE_TOP] - q[H_PENDING_FREE]   # (frees on their way back)
            q[H_MEM_LIMIT] = used + w.o.extra.get("headroom", 0)   # the merged state plus a little
            w.log.info("ksm_knob", name="mem_limit", value=q[H_MEM_LIMIT])
            w.spawn_writer(2)         # echo 2 > run: the writer unmerges, short of memory
            _begin(w, s, "unmerge")
    elif s["phase"] == "unmerge" and writer_done(w):
        for t in w.tasks():
            w.release(t)          # the run's end: every task exits
        s["phase"] = "exit"


# ---- exit-vs-ksmd: the fast, slow and no-slot paths --------------------------------------------------

def _exit_vs_ksmd(w: World, s: dict) -> None:
    if "phase" not in s and ready(w) and w.cl.q[K_FULL_SCANS] >= 1:
        for t in w.tasks():
            w.release(t)
        _begin(w, s, "exit")


# ---- madvise-vs-ksmd ----------------------------------------------------------------------------------

def _madvise_vs_ksmd(w: World, s: dict) -> None:
    if "phase" not in s and ready(w) and merged(w, 1):
        for t in w.tasks():
            w.release(t)
        _begin(w, s, "madvise")


# ---- ksm05: LTP ksm05's task, which madvises and exits while ksmd starts -------------------------

def _ksm05(w: World, s: dict) -> None:
    if "phase" not in s and ready(w):
        w.spawn_writer(1)                 # echo 1 > run: ksmd wakes
        for t in w.tasks():
            w.release(t)                  # and the task exits meanwhile
        _begin(w, s, "exit")


# ---- run2-vs-exit --------------------------------------------------------------------------------------

def _run2_vs_exit(w: World, s: dict) -> None:
    q = w.cl.q
    if "phase" not in s and ready(w) and merged(w, 2) and q[K_FULL_SCANS] >= 2:
        w.spawn_writer(2)
        w.release(w.tasks()[0])           # one task exits while run=2 unmerges
        _begin(w, s, "unmerge")
    elif s.get("phase") == "unmerge" and writer_done(w):
        for t in w.tasks():
            w.release(t)
        s["phase"] = "exit"


def _all_released(w: World, s: dict) -> bool:
    return "phase" in s


MAP2 = ("map", 2, True)
SCENARIOS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("oom-unmerge",
            "the seed's case: two tasks' pages merged, memory limited to the merged state, run=2 written: the writer unmerges in its own context, short of memory, "
            "against the OOM victims' exits (exit policy decides who waits for whom)",
            [[("map", 1, True), ("fill", [1]), ("wait_go", 1), ("exit",)],
             [("map", 1, True), ("fill", [1]), ("wait_go", 1), ("exit",)]],
            script=_oom_unmerge, finished=lambda w, s: s.get("phase") == "exit"),
    Builtin("exit-vs-ksmd",
            "three tasks exit while ksmd scans: two with rmap_items (the slow path, or no slot "
            "if ksmd frees it first) and LTP ksm05's (madvised, never written: the fast path)",
            [[MAP2, ("fill", [1, 2]), ("wait_go", 1), ("exit",)],
             [MAP2, ("fill", [1, 3]), ("wait_go", 1), ("exit",)],
             [("map", 2, True), ("wait_go", 1), ("exit",)]],
            script=_exit_vs_ksmd, finished=_all_released),
    Builtin("madvise-vs-ksmd",
            "a task makes its merged pages UNMERGEABLE (down_write, break_ksm) while ksmd scans "
            "and the other task exits",
            [[MAP2, ("fill", [1, 1]), ("wait_go", 1), ("unmergeable",), ("write", 0, 5), ("exit",)],
             [MAP2, ("fill", [1, 1]), ("wait_go", 1), ("exit",)]],
            script=_madvise_vs_ksmd, finished=_all_released),
    Builtin("ksm05",
            "LTP ksm05's task: it madvises two pages it never writes and exits, while run=1 "
            "wakes ksmd (CVE-2011-2183's window, and the 2016 up_read's)",
            [[MAP2, ("wait_go", 1), ("exit",)]],
            cfg={"run": 0}, script=_ksm05, finished=_all_released),
    Builtin("run2-vs-exit",
            "two tasks' pages merged; run=2 unmerges while one of them exits (the 2023 VMA "
            "teardown race), then both exit",
            [[MAP2, ("fill", [1, 2]), ("wait_go", 1), ("exit",)],
             [MAP2, ("fill", [1, 2]), ("wait_go", 1), ("exit",)]],
            script=_run2_vs_exit, finished=lambda w, s: s.get("phase") == "exit"),
]}

