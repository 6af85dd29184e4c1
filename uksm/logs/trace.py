"""A run as a Chrome/Perfetto trace (``uksm logs DIR trace -o FILE.json``).

The output is the Chrome trace event format, JSON object form
(``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``):
Perfetto (ui.perfetto.dev) and ``chrome://tracing`` open it.  The mapping,
event by event, is docs/LOGS.md's table; in short:

- one process per uksm process (``pid`` is the real pid), named after its
  role (``ksmd``, ``worker w3 mm5``, ...); a reaper is a thread of the
  supervisor's process, named after the worker whose exit it runs; the
  counters are one process of their own (``ksm``, ``frames``);
- on each process's main thread, complete slices (``ph: X``): ksmd's
  batches and, nested in them, its visit of each mm (``scan_batch_end``'s
  ``mms``); every wait (a
  ``lock_wait``; a hung task's wait, still open at the end); a task's exit,
  from ``mm_exit_begin`` on;
- lock holds (``lock_acquire`` .. ``lock_release``, logged with
  ``--trace-locks``) on a thread per lock class of the process (a task holds
  at most one lock of a class at a time, so they never overlap there); a
  hold the hung-task chain names but no event records is drawn from the
  first wait for it, marked ``inferred``;
- flow arrows (``ph: s`` / ``f``) from each wait to what its holders were
  doing when it began: their hold of that lock, or their own wait (a
  deadlock's cycle is a ring of arrows);
- every other event an instant (``ph: i``) on the track of the process it
  is about (a kill on its victim's, an exit on the worker's), its fields as
  ``args``; a deadlock also a global instant.

Why JSON and not Perfetto's protobuf: docs/LOGS.md ("The format").

:func:`trace_events` takes any event stream in the log schema
(docs/EVENTS.md), from a log folder (:func:`build`) or from elsewhere (an
exploration's schedule): each event a dict with ``event``, ``mono_ns``,
``role``, ``pid`` and its fields.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uksm.logs.read import COMMON_KEYS, Event, ReadStats, iter_events, log_files

#: the pseudo-process holding the counter tracks (no real pid is this big)
COUNTER_PID = 2**31 - 2
#: extra threads of a process (reapers, lock lanes) get tids from here up
SYNTH_TID = 1 << 32
#: trace categories of the instants, by event
CATEGORY = {
    **dict.fromkeys(("inject_kill", "kill_point", "oom_kill", "signal", "interrupted"), "kill"),
    **dict.fromkeys(("mm_exit_begin", "ksm_exit", "worker_exit", "task_exit", "mmdrop", "mm_freed",
                     "slot_freed", "worker_verify"), "exit"),
    **dict.fromkeys(("recovery", "lock_recovery", "recovery_failed", "recovery_stalled",
                     "reaper_failed"), "recovery"),
    **dict.fromkeys(("oops", "lockdep", "use_after_free", "hung_task", "ksmd_died", "oops_loop",
                     "ksmd_restart", "fsck"), "bug"),
    **dict.fromkeys(("merge", "cow_break", "unmerge", "full_scan", "ksm_run", "ksm_knob",
                     "run_store", "ksm_enter"), "ksm"),
    # a controlled schedule's marks (issue 21), when its steps are fed in
    **dict.fromkeys(("preempt", "schedule_step"), "sched"),
}
#: the field whose value names an instant beside its event (``ksm_exit slow``)
DETAIL = {"ksm_exit": "path", "worker_exit": "how", "task_exit": "path", "inject_kill": "signal",
          "kill_point": "point", "mmdrop": "ref", "unmerge": "reason", "slot_freed": "by",
          "lockdep": "kind", "ksm_knob": "name", "run_store": "result", "cow_break": "by",
          "signal": "name", "hung_task": "lock"}
#: fields naming the process an event is about (its instant goes on that track)
SUBJECT = ("target_pid", "victim_pid", "worker_pid", "dead_pid", "task_pid")
#: events folded into slices and counters rather than drawn as instants
FOLDED = frozenset({"scan_batch_start", "scan_batch_end", "lock_wait", "lock_acquire",
                    "lock_release"})
ROLE_ORDER = {"supervisor": 1, "ctl": 2, "ksmd": 3, "writer": 4, "reaper": 5, "worker": 10}


class BrokenLog(Exception):
    """Events that no run writes (a lock released that was never taken, a
    batch that ends without a start, a field of the wrong type): the log was
    damaged or edited.  No trace is made of it."""


@dataclass
class TraceStats:
    """What a trace holds, against the events it was made of."""

    events: int = 0                                       # log events read
    by_event: dict[str, int] = field(default_factory=dict)
    processes: int = 0                                    # process tracks (counters aside)
    threads: int = 0
    slices: int = 0
    open_at_end: int = 0                                  # slices still open when the run ended
    instants: int = 0
    counters: int = 0
    flows: int = 0
    flows_unbound: int = 0                                # waits whose holder had no slice to point at


@dataclass
class _Slice:
    name: str
    cat: str
    start: int          # ns since the origin
    end: int | None     # None: still open
    args: dict[str, Any]
    thread: "_Thread"


@dataclass
class _Thread:
    proc: "_Process"
    key: tuple[Any, ...]
    name: str
    sort: int
    tid: int = 0
    last: int = 0                                  # its last own event (ns)
    ended: bool = False                            # the process is known gone (killed, exited)
    batch: _Slice | None = None
    exit: _Slice | None = None
    mm: int | None = None


@dataclass
class _Process:
    key: tuple[Any, ...]      # (cluster, pid)
    pid: int
    role: str
    name: str
    sort: int
    jpid: int = 0
    threads: dict[tuple[Any, ...], _Thread] = field(default_factory=dict)


def _num(v: Any) -> bool:
    return type(v) in (int, float)


class _Builder:
    """Consumes the event stream once; :meth:`finish` lays out the trace."""

    def __init__(self) -> None:
        self.origin: int | None = None
        self.end = 0
        self.procs: dict[tuple[Any, ...], _Process] = {}
        self.slices: list[_Slice] = []
        self.instants: list[dict[str, Any]] = []
        self.counters: list[dict[str, Any]] = []
        self.holds: dict[tuple[Any, ...], _Slice] = {}         # (thread key, task_row, lock) -> open hold
        # (wait, its holders, cluster, when they held it: a wait's start, a hung one's report)
        self.waits: list[tuple[_Slice, list[int], Any, int]] = []
        self.hung: dict[tuple[Any, ...], _Slice] = {}          # (thread key, lock) -> open hung wait
        self.names: dict[tuple[Any, ...], tuple[str, int | None]] = {}  # (cluster, pid) -> (worker, mm)
        self.spawn_order: dict[tuple[Any, ...], int] = {}
        self.mm_owner: dict[tuple[Any, ...], int] = {}                # (cluster, mm) -> pid
        self.stats = TraceStats()
        self.frames_total: int | None = None

    # -- tracks -----------------------------------------------------------
    def process(self, cluster: Any, pid: int, role: str) -> _Process:
        key = (cluster, pid)
        p = self.procs.get(key)
        if p is None:
            p = _Process(key, pid, role, role, ROLE_ORDER.get(role, 20))
            self.procs[key] = p
        elif p.role == "ctl" and role == "supervisor":  # uksm.Machine: one process, both roles
            p.role, p.sort = role, ROLE_ORDER[role]
        return p

    def thread(self, ev: Event) -> _Thread:
        """The track an event's emitter logs on: its process's main thread,
        or for a reaper its own thread in the supervisor's process."""
        cluster, pid, role = ev.get("cluster"), ev.get("pid"), ev.get("role")
        if type(pid) is not int:
            raise self.broken(ev, "no integer pid")
        role = role if isinstance(role, str) else "?"
        p = self.process(cluster, pid, role)
        if role == "reaper":
            dead = ev.get("dead_pid")
            key: tuple[Any, ...] = ("reaper", dead if type(dead) is int else None)
        else:
            key = ("main",)
        t = p.threads.get(key)
        if t is None:
            t = _Thread(p, key, role, 0 if key == ("main",) else 10 + len(p.threads))
            t.ended = key != ("main",)  # a reaper's thread ends with its last event
            p.threads[key] = t
        if (role == "reaper" or t.mm is None) and type(ev.get("mm")) is int:
            t.mm = ev["mm"]  # a worker's own events carry its mm
        return t

    def subject(self, cluster: Any, pid: int) -> _Thread:
        """The main thread of process ``pid`` (made if it logged nothing yet)."""
        p = self.procs.get((cluster, pid)) or self.process(cluster, pid, "worker")
        t = p.threads.get(("main",))
        if t is None:
            t = _Thread(p, ("main",), p.role, 0)
            p.threads[("main",)] = t
        return t

    # -- helpers ------------------------------------------------------------
    def t(self, ev: Event) -> int:
        return ev["mono_ns"] - (self.origin or 0)

    def broken(self, ev: Event, what: str) -> BrokenLog:
        t = (ev["mono_ns"] - (self.origin or ev["mono_ns"])) / 1e9
        return BrokenLog(f"{ev['event']} at {t:.6f}s ({ev.get('role', '?')} {ev.get('pid', '?')}): {what}")

    def slice(self, th: _Thread, name: str, cat: str, start: int, end: int | None,
              args: dict[str, Any]) -> _Slice:
        s = _Slice(name, cat, start, end, args, th)
        self.slices.append(s)
        return s

    @staticmethod
    def fields(ev: Event) -> dict[str, Any]:
        return {k: v for k, v in ev.items() if k not in COMMON_KEYS}

    # -- the stream -----------------------------------------------------------
    def feed(self, ev: Event) -> None:
        if self.origin is None:
            self.origin = ev["mono_ns"]
        name = ev["event"]
        st = self.stats
        st.events += 1
        st.by_event[name] = st.by_event.get(name, 0) + 1
        now = self.t(ev)
        self.end = max(self.end, now)
        th = self.thread(ev)
        th.last = max(th.last, now)
        handler = getattr(self, "on_" + name, None)
        folded = handler(ev, th, now) if handler is not None else None
        if name not in FOLDED and not folded:
            self.instant(ev, th, now)

    def instant(self, ev: Event, th: _Thread, now: int, target: _Thread | None = None) -> None:
        name = ev["event"]
        target = target or th
        args = self.fields(ev)
        for k in SUBJECT:
            v = ev.get(k)
            if v is None or v == 0 or isinstance(v, list) or (k == "dead_pid" and th.key[0] == "reaper"):
                continue  # 0: no victim (a delay point); a list: lock_recovery's; a reaper's own
            if type(v) is not int:
                raise self.broken(ev, f"{k} is not a pid: {v!r}")
            if v != ev.get("pid"):
                target = self.subject(ev.get("cluster"), v)
                args["by"] = f"{ev.get('role')} {ev.get('pid')}"
            break
        detail = ev.get(DETAIL.get(name, ""))
        label = f"{name} {detail}" if isinstance(detail, str) else name
        self.instants.append({"name": label, "cat": CATEGORY.get(name, "cluster"), "ts": now,
                              "thread": target, "args": args})
        if name == "hung_task" and ev.get("deadlock") is True and not any(
                i.get("scope") == "g" for i in self.instants):
            self.instants.append({"name": "deadlock", "cat": "bug", "ts": now, "thread": None,
                                  "scope": "g", "args": {"chain": ev.get("chain")}})

    # -- ksmd ---------------------------------------------------------------
    def on_scan_batch_start(self, ev: Event, th: _Thread, now: int) -> None:
        if th.batch is not None:  # a batch that scanned nothing (logs before scan_mm): no end
            th.batch.end = now
            th.batch.args["unfinished"] = True
        th.batch = self.slice(th, "batch", "ksmd", now, None, self.fields(ev))

    def on_scan_batch_end(self, ev: Event, th: _Thread, now: int) -> None:
        b = th.batch
        if b is None:
            raise self.broken(ev, "no scan_batch_start before it")
        b.end = now
        b.args.update({k: v for k, v in self.fields(ev).items() if k != "mms"})
        b.name = f"batch {ev.get('pages', '?')} pages"
        th.batch = None
        for v in ev.get("mms", []):  # ksmd's visit of each mm in the batch
            if not isinstance(v, dict) or type(v.get("start_ns")) is not int \
                    or type(v.get("end_ns")) is not int or not ev["mono_ns"] >= v["end_ns"] >= v["start_ns"]:
                raise self.broken(ev, f"mms: {v!r} is not a visit (start_ns <= end_ns <= the event)")
            self.slice(th, f"scan mm{v.get('mm')}", "ksmd", v["start_ns"] - (self.origin or 0),
                       v["end_ns"] - (self.origin or 0), dict(v))
        vals = {k: ev[k] for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
                if _num(ev.get(k))}
        if vals:
            self.counters.append({"name": "ksm", "ts": now, "args": vals, "cluster": ev.get("cluster")})
        self.frames(ev, now)

    def frames(self, ev: Event, now: int) -> None:
        if _num(ev.get("frames_used")):
            self.counters.append({"name": "frames", "ts": now, "args": {"used": ev["frames_used"]},
                                  "cluster": ev.get("cluster")})

    def on_unmerge(self, ev: Event, th: _Thread, now: int) -> None:
        self.frames(ev, now)

    def on_cluster_start(self, ev: Event, th: _Thread, now: int) -> None:
        if _num(ev.get("frames")) and ev["frames"] > 0:
            self.frames_total = ev["frames"]
            self.counters.append({"name": "frames", "ts": now, "args": {"limit": ev["frames"]},
                                  "cluster": ev.get("cluster")})

    def on_ksm_knob(self, ev: Event, th: _Thread, now: int) -> None:
        if ev.get("name") == "mem_limit" and _num(ev.get("value")):
            limit = ev["value"] or self.frames_total
            if limit:
                self.counters.append({"name": "frames", "ts": now, "args": {"limit": limit},
                                      "cluster": ev.get("cluster")})

    # -- waits and holds ----------------------------------------------------
    def on_lock_wait(self, ev: Event, th: _Thread, now: int) -> None:
        lock, ms, holders = ev.get("lock"), ev.get("waited_ms"), ev.get("holders", [])
        if not isinstance(lock, str) or not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms < 0:
            raise self.broken(ev, f"lock {lock!r} / waited_ms {ms!r}")
        if not isinstance(holders, list) or any(type(h) is not int for h in holders):
            raise self.broken(ev, f"holders {holders!r} is not a list of pids")
        w = self.slice(th, f"wait {lock}", "wait", now - round(ms * 1e6), now, self.fields(ev))
        self.waits.append((w, holders, ev.get("cluster"), w.start))

    def on_lock_acquire(self, ev: Event, th: _Thread, now: int) -> None:
        lock, mode = ev.get("lock"), ev.get("mode")
        if not isinstance(lock, str) or not isinstance(mode, str):
            raise self.broken(ev, f"lock {lock!r} / mode {mode!r}")
        key = (th.proc.key, th.key, ev.get("task_row"), lock)
        if key in self.holds:
            raise self.broken(ev, f"{lock} taken again before its lock_release")
        name = lock if mode == "mutex" else f"{lock} ({mode})"
        self.holds[key] = self.slice(th, name, "lock", now, None, self.fields(ev))

    def on_lock_release(self, ev: Event, th: _Thread, now: int) -> None:
        key = (th.proc.key, th.key, ev.get("task_row"), ev.get("lock"))
        s = self.holds.pop(key, None)
        if s is None:
            raise self.broken(ev, f"{ev.get('lock')} released, never taken (no lock_acquire)")
        s.end = now

    def on_lock_recovery(self, ev: Event, th: _Thread, now: int) -> None:
        """The dead's holds of the lock end here: the supervisor took them over."""
        dead = ev.get("dead_pid")
        dead = dead if isinstance(dead, list) else [dead]
        for key, s in list(self.holds.items()):
            if key[3] == ev.get("lock") and key[0][1] in dead and key[0][0] == ev.get("cluster"):
                s.end = now
                s.args["taken_over_by_recovery"] = True
                del self.holds[key]

    def on_hung_task(self, ev: Event, th: _Thread, now: int) -> None:
        """Each link of the chain is a wait still open at the end; its
        holders' holds, where no lock_acquire recorded them, are inferred."""
        links = ev.get("waits")
        if links is None:  # a log from before the chain had fields: the blocked task's wait
            links = [{"pid": ev.get("task_pid"), "role": ev.get("task_role"), "lock": ev.get("lock"),
                      "waited_s": ev.get("waited_s"), "holders": []}]
        if not isinstance(links, list):
            raise self.broken(ev, "waits is not a list")
        cluster = ev.get("cluster")
        for ln in links:
            if not isinstance(ln, dict) or type(ln.get("pid")) is not int or not _num(ln.get("waited_s")) \
                    or not isinstance(ln.get("lock"), str) or not isinstance(ln.get("holders", []), list):
                raise self.broken(ev, f"a link of waits is not pid/lock/waited_s/holders: {ln!r}")
            wt = self.link_thread(cluster, ln)
            key = (wt.proc.key, wt.key, ln["lock"])
            since = ln.get("since_ns")  # exact; waited_s is rounded to the ms
            start = since - (self.origin or 0) if type(since) is int and since <= ev["mono_ns"] \
                else now - round(ln["waited_s"] * 1e9)
            w = self.hung.get(key)
            if w is None:
                w = self.slice(wt, f"wait {ln['lock']}", "wait", start, None,
                               {"lock": ln["lock"], "hung": True, "holders": ln.get("holders", [])})
                self.hung[key] = w
                self.waits.append((w, [h for h in ln.get("holders", []) if type(h) is int], cluster, now))
            w.start = min(w.start, start)
            if ln["lock"] == "frames":
                continue  # no one holds frames: its holders are the OOM victims
            for h in ln.get("holders", []):
                if type(h) is not int:
                    continue
                ht = self.subject(cluster, h)
                if any(k[0] == ht.proc.key and k[3] == ln["lock"] for k in self.holds):
                    continue  # recorded by lock_acquire
                hkey = (ht.proc.key, ("inferred",), None, ln["lock"])
                s = self.holds.get(hkey)
                if s is None:
                    self.holds[hkey] = self.slice(
                        ht, ln["lock"], "lock", w.start, None,
                        {"lock": ln["lock"], "inferred": "held when the first wait for it began "
                                                        "(the hung-task chain)"})
                else:
                    s.start = min(s.start, w.start)

    def link_thread(self, cluster: Any, ln: dict[str, Any]) -> _Thread:
        """The thread of a chain link: a reaper's by its mm, else the process's main thread."""
        if ln.get("role") == "reaper":
            p = self.procs.get((cluster, ln["pid"]))
            for t in (p.threads.values() if p else ()):
                if t.key[0] == "reaper" and t.mm == ln.get("mm"):
                    return t
        return self.subject(cluster, ln["pid"])

    def on_mm_exit_begin(self, ev: Event, th: _Thread, now: int) -> bool:
        """The exit of a task (or of its reaper) is a slice from here; the
        supervisor's (recovery of a killed task) an instant on the task."""
        if th.key[0] == "reaper" or ev.get("role") == "worker":
            if th.exit is None:
                th.exit = self.slice(th, "exit", "exit", now, None, self.fields(ev))
            return True
        owner = self.mm_owner.get((ev.get("cluster"), ev.get("mm")))
        if owner is not None:
            self.instant(ev, th, now, self.subject(ev.get("cluster"), owner))
            return True
        return False

    # -- names and ends ------------------------------------------------------
    def on_worker_spawn(self, ev: Event, th: _Thread, now: int) -> None:
        self.named(ev)

    on_task_new = on_worker_spawn

    def named(self, ev: Event) -> None:
        wpid = ev.get("worker_pid")
        if type(wpid) is int:
            key = (ev.get("cluster"), wpid)
            mm = ev.get("mm") if type(ev.get("mm")) is int else None
            self.names[key] = (str(ev.get("worker")), mm)
            self.mm_owner[(ev.get("cluster"), mm)] = wpid
            self.spawn_order.setdefault(key, len(self.spawn_order))

    def on_worker_exit(self, ev: Event, th: _Thread, now: int) -> None:
        if type(ev.get("worker_pid")) is int:
            w = self.subject(ev.get("cluster"), ev["worker_pid"])
            w.ended = True
            w.last = max(w.last, now)

    def on_recovery(self, ev: Event, th: _Thread, now: int) -> None:
        if type(ev.get("dead_pid")) is int:
            self.subject(ev.get("cluster"), ev["dead_pid"]).ended = True

    def on_oops(self, ev: Event, th: _Thread, now: int) -> None:
        th.ended = True

    # -- the layout -------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        end = self.end
        # slices still open: a thread whose process is gone ends them at its
        # last event; the others run to the end of the run
        for s in self.slices:
            if s.end is None:
                th = s.thread
                if th.ended:  # closed with its process: an exit done, else cut short
                    s.end = max(s.start, th.last)
                    if s.cat != "exit":
                        s.args["ended_with_process"] = True
                    continue
                s.end = max(s.start, end)
                key = "still_held_at_end" if s.cat == "lock" else "still_waiting_at_end" \
                    if s.cat == "wait" else "unfinished"
                s.args[key] = True
                self.stats.open_at_end += 1
        self.infer_holds()
        self.name_tracks()
        out: list[dict[str, Any]] = []
        lanes = self.lay_out()
        n = 0
        for t in self.all_threads():
            if t.tid == 0:
                n += 1
                t.tid = SYNTH_TID + n
        for s in self.slices:
            th = lanes[id(s)]
            assert s.end is not None  # closed above
            out.append({"name": s.name, "cat": s.cat, "ph": "X", "ts": _us(s.start),
                        "dur": _us(s.end - s.start), "pid": th.proc.jpid, "tid": th.tid,
                        "args": s.args})
        self.stats.slices = len(self.slices)
        for i in self.instants:
            ev = {"name": i["name"], "cat": i["cat"], "ph": "i", "ts": _us(i["ts"]), "args": i["args"]}
            if i.get("scope") == "g":
                ev.update(s="g", pid=COUNTER_PID, tid=COUNTER_PID)
            else:
                ev.update(s="t", pid=i["thread"].proc.jpid, tid=i["thread"].tid)
            out.append(ev)
        self.stats.instants = len(self.instants)
        for c in self.counters:
            out.append({"name": c["name"], "cat": "counter", "ph": "C", "ts": _us(c["ts"]),
                        "pid": COUNTER_PID, "tid": COUNTER_PID, "args": c["args"]})
        self.stats.counters = len(self.counters)
        out.extend(self.flows(lanes))
        out.sort(key=lambda e: e["ts"])
        meta = self.metadata(lanes)
        return {"traceEvents": meta + out, "displayTimeUnit": "ms",
                "otherData": {"generator": "uksm logs trace", "origin_mono_ns": self.origin,
                              "duration_s": round(end / 1e9, 6)}}

    def infer_holds(self) -> None:
        """A holder named by a lock_wait that has no slice then (a task in
        a fault or a madvise: only --trace-locks records its hold) gets an
        inferred hold of the lock over the wait: it held it when the wait
        began, and let it go before the wait ended."""
        by_proc: dict[tuple[Any, ...], list[_Slice]] = {}
        for s in self.slices:
            by_proc.setdefault(s.thread.proc.key, []).append(s)
        for w, holders, cluster, at in self.waits:
            lock = w.args.get("lock")
            if w.args.get("hung") or lock == "frames" or not isinstance(lock, str):
                continue  # a hung wait's holders are inferred from the chain already
            for h in holders:
                p = self.procs.get((cluster, h))
                if p is None or any(s.start <= at <= (s.end or 0) for s in by_proc.get(p.key, [])):
                    continue
                th = p.threads.get(("main",)) or self.subject(cluster, h)
                s = self.slice(th, lock, "lock", w.start, w.end,
                               {"lock": lock, "inferred": "held when a wait for it began (lock_wait "
                                                          "holders), let go before it ended"})
                by_proc.setdefault(p.key, []).append(s)

    def name_tracks(self) -> None:
        used: set[int] = set()
        n = 0
        for p in sorted(self.procs.values(), key=lambda p: (p.sort, self.spawn_order.get(p.key, 0))):
            p.jpid = p.pid if p.pid not in used and 0 < p.pid < COUNTER_PID else (1 << 40) + n
            used.add(p.jpid)
            n += 1
            main = p.threads.get(("main",))
            worker, mm = self.names.get(p.key, (None, main.mm if main else None))
            if p.role == "worker":
                p.name = " ".join(x for x in ("worker", worker, None if mm is None else f"mm{mm}") if x)
            if len({k[0] for k in self.procs}) > 1:
                p.name += f" [{p.key[0]}]"  # several clusters in one folder
            p.sort = p.sort * 100000 + self.spawn_order.get(p.key, 0)
            for t in p.threads.values():
                if t.key == ("main",):
                    t.tid, t.name = p.jpid, p.name
                else:
                    dead = t.key[1]
                    w, mm = self.names.get((p.key[0], dead), (None, t.mm))
                    t.name = f"reaper for {w or 'pid'} {dead}" + (f" mm{mm}" if mm is not None else "")

    def lay_out(self) -> dict[int, _Thread]:
        """The thread each slice is drawn on.  Main-thread slices must nest
        (Perfetto and chrome://tracing require it): one that overlaps its
        parent by a rounding error is clipped, by more goes on an overflow
        thread.  Holds go on a thread per lock class, in lanes."""
        where: dict[int, _Thread] = {}
        extra: dict[tuple[Any, ...], _Thread] = {}

        def aux(th: _Thread, key: tuple[Any, ...], name: str, sort: int) -> _Thread:
            k = (th.proc.key, th.key, *key)
            t = extra.get(k)
            if t is None:
                t = _Thread(th.proc, k, name, sort)
                extra[k] = t
            return t
        by_thread: dict[int, list[_Slice]] = {}
        lane_ends: dict[tuple[Any, ...], list[int]] = {}
        for s in sorted(self.slices, key=lambda s: (s.start, -(s.end or 0))):
            if s.cat == "lock":
                cls = s.args.get("lock", s.name).split(":", 1)[0]
                ends = lane_ends.setdefault((s.thread.proc.key, s.thread.key, cls), [])
                lane = next((i for i, e in enumerate(ends) if e <= s.start), len(ends))
                if lane == len(ends):
                    ends.append(0)
                ends[lane] = s.end or 0
                base = s.thread.name if s.thread.key != ("main",) else ""
                label = f"{base + ': ' if base else ''}holds {cls}" + (f" #{lane + 1}" if lane else "")
                where[id(s)] = aux(s.thread, ("lock", cls, lane), label, 1000 + lane)
            else:
                by_thread.setdefault(id(s.thread), []).append(s)
        for slices in by_thread.values():
            stack: list[_Slice] = []
            overflow = 0
            for s in slices:
                while stack and stack[-1].end is not None and stack[-1].end <= s.start:
                    stack.pop()
                top = stack[-1] if stack else None
                assert s.end is not None
                if top is not None and top.end is not None and s.end > top.end:
                    if s.end - top.end <= 50_000:  # 50 us: the rounding of waited_ms / waited_s
                        s.end = top.end
                    else:
                        overflow += 1
                        where[id(s)] = aux(s.thread, ("overlap", overflow), s.thread.name
                                           + " (overlapping)", 500 + overflow)
                        continue
                where[id(s)] = s.thread
                stack.append(s)
        self.extra = extra
        return where

    def flows(self, lanes: dict[int, _Thread]) -> list[dict[str, Any]]:
        """Flow arrows (v1: ``s`` on the wait, ``f`` binding the enclosing
        slice on the holder's side) from each wait to what each holder was
        doing when it began (a hung wait: when the watchdog reported it):
        its hold of that lock, its own wait, or any slice of it then."""
        by_thread: dict[int, list[_Slice]] = {}
        for s in self.slices:
            by_thread.setdefault(id(s.thread), []).append(s)
        out: list[dict[str, Any]] = []
        fid = 0
        for w, holders, cluster, at in self.waits:
            lock = w.args.get("lock")
            for h in holders:
                p = self.procs.get((cluster, h))
                if p is None:
                    self.stats.flows_unbound += 1
                    continue
                cands = [s for t in p.threads.values() for s in by_thread.get(id(t), [])
                         if s is not w and s.start <= at <= (s.end or 0)]
                best = (next((s for s in cands if s.cat == "lock" and s.args.get("lock") == lock), None)
                        or next((s for s in cands if s.cat == "wait"), None)
                        or (max(cands, key=lambda s: s.start) if cands else None))
                if best is None:
                    self.stats.flows_unbound += 1
                    continue
                fid += 1
                src, dst = lanes[id(w)], lanes[id(best)]
                meet = max(w.start, best.start)  # where the wait meets what it waits for
                out.append({"name": "waits for", "cat": "wait", "ph": "s", "id": fid,
                            "ts": _us(_inside(w, meet)), "pid": src.proc.jpid, "tid": src.tid})
                out.append({"name": "waits for", "cat": "wait", "ph": "f", "bp": "e", "id": fid,
                            "ts": _us(_inside(best, meet)), "pid": dst.proc.jpid, "tid": dst.tid})
        self.stats.flows = fid
        return out

    def all_threads(self) -> list[_Thread]:
        return [t for p in self.procs.values() for t in p.threads.values()] + list(self.extra.values())

    def metadata(self, lanes: dict[int, _Thread]) -> list[dict[str, Any]]:
        meta: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": COUNTER_PID, "tid": COUNTER_PID,
             "args": {"name": "ksm counters"}},
            {"name": "process_sort_index", "ph": "M", "pid": COUNTER_PID, "tid": COUNTER_PID,
             "args": {"sort_index": -1}}]
        threads = self.all_threads()
        for p in self.procs.values():
            meta.append({"name": "process_name", "ph": "M", "pid": p.jpid, "tid": p.jpid,
                         "args": {"name": p.name}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": p.jpid, "tid": p.jpid,
                         "args": {"sort_index": p.sort}})
        for t in threads:
            meta.append({"name": "thread_name", "ph": "M", "pid": t.proc.jpid, "tid": t.tid,
                         "args": {"name": t.name}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": t.proc.jpid, "tid": t.tid,
                         "args": {"sort_index": t.sort}})
        self.stats.processes = len(self.procs)
        self.stats.threads = len(threads)
        return meta


def _us(ns: int) -> float:
    """ns -> the format's microseconds (float: ns precision kept)."""
    return round(ns / 1000, 3)


def _inside(s: _Slice, t: int) -> int:
    """A time inside slice ``s``, as near ``t`` as can be (a flow end binds
    the slice enclosing it)."""
    end = s.end if s.end is not None else s.start
    eps = min(1000, (end - s.start) // 2)
    return min(max(t, s.start + eps), end - eps)


def trace_events(events: Iterable[Event], stats: TraceStats | None = None) -> dict[str, Any]:
    """The Chrome trace (JSON object form) of an event stream in mono_ns
    order.  Raises :class:`BrokenLog` for events no run writes.  Pass a
    :class:`TraceStats` to learn what the trace holds."""
    b = _Builder()
    if stats is not None:
        b.stats = stats
    for ev in events:
        b.feed(ev)
    return b.finish()


def crop(trace: dict[str, Any], t_from: float | None, t_to: float | None) -> dict[str, Any]:
    """The trace between ``t_from`` and ``t_to`` seconds (since its first
    event): slices cut at the edges (``args.cropped``), instants, flows and
    counters in the window, each counter's last value before it kept at its
    start."""
    lo = -float("inf") if t_from is None else t_from * 1e6
    hi = float("inf") if t_to is None else t_to * 1e6
    out: list[dict[str, Any]] = []
    before: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in trace["traceEvents"]:
        ph = e["ph"]
        if ph == "M":
            out.append(e)
        elif ph == "X":
            s, f = e["ts"], e["ts"] + e["dur"]
            if f < lo or s > hi:
                continue
            if s < lo or f > hi:
                e = dict(e, ts=max(s, lo), dur=round(min(f, hi) - max(s, lo), 3),
                         args={**e.get("args", {}), "cropped": True})
            out.append(e)
        elif ph == "C" and e["ts"] < lo:
            before[(e["name"], tuple(e["args"]))] = dict(e, ts=lo)
        elif lo <= e["ts"] <= hi:
            out.append(e)
    ids: dict[Any, int] = {}
    for e in out:
        if e["ph"] in ("s", "f"):
            ids[e["id"]] = ids.get(e["id"], 0) + 1
    out = [e for e in out if e["ph"] not in ("s", "f") or ids[e["id"]] == 2]
    return dict(trace, traceEvents=list(before.values()) + out)


def build(log_dir: str | Path, stats: ReadStats | None = None,
          tstats: TraceStats | None = None) -> dict[str, Any]:
    """The trace of a run's log folder.  A folder with no ``*.jsonl`` gives
    an empty trace (the caller warns); a missing one, or a file, raises
    :class:`LogDirError`."""
    d = Path(log_dir)
    if d.is_dir() and not any(p.is_file() for p in d.glob("*.jsonl")):
        return trace_events((), tstats)
    log_files(d)  # the folder's errors, one line each
    return trace_events(iter_events(d, stats), tstats)


def write(trace: dict[str, Any], out: str | Path) -> None:
    """Write the trace to ``out`` whole or not at all (a temporary file renamed)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(out.parent))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(trace, f, separators=(",", ":"))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["BrokenLog", "TraceStats", "trace_events", "crop", "build", "write", "COUNTER_PID"]
