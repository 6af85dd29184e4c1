"""A ``uksm.Machine``'s requests, served on a controlled run.

The API (``uksm.api``) talks to a cluster in requests -- ``task_new``,
``task`` (fill, write, read, madvise, verify, exit), ``ctl``, ``task_kill``,
``arm``, ``spawn`` ... -- which a daemon serves in a normal run
(``uksm.proc.handlers``, ``uksm.proc.scripting``).  Here the same requests
are served on a ``World``: a request's wait is ``World.run_until``, so the
script's calls and the processes' steps interleave as the schedule says,
and every wait is logical (steps and the run's clock, never wall time).
The checks of a request's arguments are the daemon's own
(``scripting.task_command``, ``control.validate_knob``), so a script is
refused the same inputs either way.

``Machine.race()`` (the ``race`` request) marks the start of the explored
phase; inside ``with m.race():`` the calls do not wait for their
operation: each is issued and runs concurrently with what follows, and the
block's end waits for them all.  A task's commands still run in the order
they were given (its slot holds the queue).
"""
from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from uksm.explorer.gate import EXITED
from uksm.explorer.world import Proc, RunOver, World
from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_HUNG, EXIT_USAGE
from uksm.kernel import killpoints
from uksm.kernel.layout import (
    EXIT_POLICIES,
    H_EXIT_POLICY,
    H_KSMD_POINT,
    H_MEM_LIMIT,
    K_MAX_KERNEL_PAGES,
    K_PAGES_TO_SCAN,
    K_RUN,
    K_SLEEP_MS,
    L_SCAN_SLOT,
    T_KILL_POINT,
)
from uksm.proc.control import CTL_OWN, validate_knob
from uksm.proc.scripting import SIGNALS, ScriptError, _int, task_answer, task_command

EXIT_POINTS = ("ksm_exit_before_down_write", "ksm_exit_mmap_sem_write", "exit_mid_zap")
POINT_WAIT_MS = 10_000   # a worker driven to a kill point (scripting.POINT_WAIT_S, logical)


class Requests:
    """The requests of one Machine on one World."""

    def __init__(self, world: World, max_pages: int) -> None:
        self.w = world
        self.max_pages = max_pages
        self.by_tid: dict[str, Proc] = {}
        self.racing = 0
        self.issued: list[tuple[str, Callable[[], bool], Callable[[], None]]] = []

    @property
    def cl(self) -> Any:
        return self.w.cl

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Serve one request: its answer, or {"ok": False, "error", "kind",
        "status"} as the daemon answers (``Daemon.run_request``)."""
        fn = getattr(self, "do_" + str(req.get("op")), None)
        if fn is None:
            return {"ok": False, "error": f"{req.get('op')!r} is not served under a controlled schedule",
                    "status": EXIT_USAGE, "kind": "value"}
        try:
            ans: dict[str, Any] = fn(req)
        except shm.UksmError as e:
            return {"ok": False, "error": str(e), "status": e.status,
                    "kind": getattr(e, "kind", "hung" if e.status == EXIT_HUNG else "")}
        ans.setdefault("ok", True)
        return ans

    def tick(self) -> None:
        self.w.step("a condition of the script")

    # ---- waiting --------------------------------------------------------------------------------
    def _until(self, pred: Callable[[], bool], what: str, done: Callable[[], None] = lambda: None) -> bool:
        """Wait for ``pred`` -- unless in a race block: then the operation
        is left running and the block's end waits.  True if it is done."""
        if self.racing:
            self.issued.append((what, pred, done))
            return False
        self.w.run_until(pred, what)
        done()
        return True

    def do_race(self, req: dict[str, Any]) -> dict[str, Any]:
        """Machine.race(): the explored phase begins; ``begin``/``end``
        bracket a block whose operations run concurrently."""
        phase = req.get("phase", "mark")
        self.w.race()
        if phase == "begin":
            self.racing += 1
        elif phase == "end" and self.racing:
            self.racing -= 1
            if not self.racing:
                issued, self.issued = self.issued, []
                self.w.run_until(lambda: all(pred() for _w, pred, _d in issued),
                                 "the race block's operations")
                for _w, _p, done in issued:
                    done()
                return {"paths": {p.tid: p.extra["path"] for p in self.by_tid.values() if "path" in p.extra}}
        return {}

    # ---- tasks -----------------------------------------------------------------------------------
    def task(self, req: dict[str, Any], alive: bool = True) -> Proc:
        tid = req.get("task")
        if not isinstance(tid, str):
            raise ScriptError(f"task id must be a string like 'w3' (got {tid!r})", "type", EXIT_USAGE)
        p = self.by_tid.get(tid)
        if p is None:
            raise ScriptError(f"no task {tid!r} (tasks: {' '.join(self.by_tid) or 'none'})", "unknown")
        if alive and (p.state == EXITED or p.extra.get("exiting")):
            raise ScriptError(f"task {tid} {self.how(p)}: it can take no more commands", "exited")
        return p

    def how(self, p: Proc) -> str:
        path = p.extra.get("path", "none")
        if p.killed:
            return f"was killed (SIGKILL); its exit was run by the supervisor (ksm_exit {path})"
        if p.extra.get("exited"):
            return f"has exited (ksm_exit {path})"
        return f"has exited on a fatal signal or the OOM killer (ksm_exit {path})"

    def _gone(self, p: Proc) -> bool:
        """Its exit is over (itself, or its reaper)."""
        return p.state == EXITED and not (p.killed and (p in self.w.reap_queue or any(
            r.dead is p and r.state != EXITED for r in self.w.procs.values())))

    def _answer(self, p: Proc, what: str) -> dict[str, Any]:
        """Its answer to the last command; ScriptError (died) if it died first."""
        self.w.run_until(lambda: self.w.answered(p) or self._gone(p), f"task {p.tid}: {what}")
        if not self.w.answered(p):
            raise ScriptError(f"task {p.tid} died during {what}: it {self.how(p)}", "died")
        return self.w.take_answer(p)

    def do_task_new(self, req: dict[str, Any]) -> dict[str, Any]:
        pages = _int(req, "pages", 1, self.max_pages, "pages")
        mergeable = req.get("mergeable", True)
        if not isinstance(mergeable, bool):
            raise ScriptError(f"mergeable must be True or False (got {mergeable!r})", "type", EXIT_USAGE)
        p = self.w.spawn_task(pages, "scripted", mergeable=mergeable)
        p.extra["kind"] = "scripted"
        self.by_tid[p.tid] = p
        ans = self._answer(p, "start")
        if not ans.get("ok"):
            raise ScriptError(f"task {p.tid} could not start: {ans.get('error')}", str(ans.get("kind", "died")))
        return {"task": p.tid, "pid": p.pid, "mm": p.mm, "pages": pages, "base": ans["base"]}

    def do_task(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.task(req)
        cmd, what = task_command(req, p.pages)
        if cmd is None:
            return {"data": ""} if req.get("cmd") == "read" else {}
        if cmd["cmd"] == "exit":
            p.extra["exiting"] = True
        if self.racing:
            queue = p.extra.setdefault("queue", [])
            queue.append((cmd, what))
            if len(queue) == 1:   # first in line: sent now, the rest as it answers
                self.w.command(p, cmd)
                self.issued.append((f"task {p.tid}: {what}", self._pump_queue(p), lambda: None))
            return {"pending": True}
        self.w.command(p, cmd)
        return self._result(p, cmd, what)

    def _pump_queue(self, p: Proc) -> Callable[[], bool]:
        """A race block's commands for ``p``, in order: each answer sends
        the next (looked at before every step the block's end waits);
        done when the last is answered (an exit: and over)."""
        def pump() -> bool:
            queue = p.extra.get("queue", [])
            while queue:
                if self.w.answered(p):
                    cmd, _what = queue.pop(0)
                    self._note(p, cmd, self.w.take_answer(p))
                    if queue and not self._gone(p):
                        self.w.command(p, queue[0][0])
                    continue
                if not self._gone(p):
                    return False
                queue.clear()   # it died: the rest never runs
            return not p.extra.get("exiting") or self._gone(p)
        return pump

    def _note(self, p: Proc, cmd: dict[str, Any], ans: dict[str, Any]) -> None:
        if cmd["cmd"] == "exit" and ans.get("ok"):
            p.extra.update(exited=True, path=ans.get("path"))
        if not ans.get("ok") and ans.get("kind") not in ("oom", "died"):
            p.extra.setdefault("errors", []).append(f"task {p.tid}: {ans.get('error')}")

    def _result(self, p: Proc, cmd: dict[str, Any], what: str) -> dict[str, Any]:
        ans = self._answer(p, what)
        self._note(p, cmd, ans)
        if not ans.get("ok"):
            kind = str(ans.get("kind", "value"))
            if kind == "oom":
                p.extra["exiting"] = True
                self.w.run_until(lambda: self._gone(p), f"task {p.tid}'s exit")
            raise ScriptError(f"task {p.tid}: {what}: {ans.get('error')}", kind,
                              EXIT_USAGE if kind in ("value", "segfault") else EXIT_ERR)
        if cmd["cmd"] == "exit":
            self.w.run_until(lambda: self._gone(p), f"task {p.tid}'s exit")
        return task_answer(cmd["cmd"], ans)

    def do_task_stat(self, req: dict[str, Any]) -> dict[str, Any]:
        from uksm.kernel.ksm_stat import ksm_stat
        p = self.task(req)
        row = self.cl.mm_row(p.mm)
        if row < 0:
            raise ScriptError(f"task {p.tid}: its address space is gone", "exited")
        return {**ksm_stat(self.cl, row, self.w.mms.get(p.mm)), "pid": p.pid, "mm": p.mm}

    def do_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        """Built-in workers (their workload, churn and idle on the run's
        logical clock)."""
        from uksm.workers.workloads import validate as wl_validate
        pages, count = int(req.get("pages") or 64), int(req.get("count", 1))
        workload, seed, churn = str(req.get("workload") or "vm"), int(req.get("seed") or 0), \
            int(req.get("churn_ms") or 0)
        if not 1 <= pages <= self.max_pages:
            raise ScriptError(f"pages must be 1..{self.max_pages}", "value", EXIT_USAGE)
        wl_validate(workload)
        kids = []
        for _ in range(count):
            p = self.w.spawn_task(pages, "worker", workload=workload, seed=seed, churn_ms=churn)
            p.extra["kind"] = "worker"
            self.by_tid[p.tid] = p
            kids.append(p)
        ready = lambda p: self.cl.trow(p.row).ready or p.state == EXITED  # noqa: E731
        if req.get("wait"):
            self.w.run_until(lambda: all(ready(p) for p in kids), "the workers to write their pages")
        return {"spawned": [{"worker": p.tid, "pid": p.pid, "mm": p.mm, "pages": pages, "workload": workload,
                             "ready": bool(ready(p)), "exited": p.state == EXITED} for p in kids], "note": ""}

    def do_ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        live = [p for p in self.by_tid.values() if p.state != EXITED]
        return {"workers": sorted(p.tid for p in live),
                "ready": sorted(p.tid for p in live if self.cl.trow(p.row).ready),
                "hung": 0, "hung_tasks": []}

    # ---- knobs -----------------------------------------------------------------------------------
    def do_ctl(self, req: dict[str, Any]) -> dict[str, Any]:
        q = self.cl.q
        knobs = req.get("knobs")
        if not isinstance(knobs, list) or not knobs:
            raise ScriptError("ctl: no KEY=VALUE given", "value", EXIT_USAGE)
        todo = [(str(k), validate_knob(str(k), v, self.cl.nframes, cl=self.cl)) for k, v in knobs]
        applied = []
        for name, value in todo:
            ent: dict[str, Any] = {"name": name, "value": value}
            if self.cl.modern and name not in ("run", *CTL_OWN):
                # 6.18's stores (uksm.proc.sysfs618); one request runs at a
                # time between two scheduled steps, so the EBUSY check made
                # by validate_knob still holds here
                from uksm.proc.sysfs618 import store
                ent["previous"] = store(name, value, q)
                self.w.log.info("ksm_knob", name=name, value=value)
            elif name == "run":
                ent["previous"] = q[K_RUN]
                self._write_run(int(value))
            else:
                idx = {"pages_to_scan": K_PAGES_TO_SCAN, "sleep_millisecs": K_SLEEP_MS,
                       "max_kernel_pages": K_MAX_KERNEL_PAGES,
                       "mem_limit": H_MEM_LIMIT, "exit_policy": H_EXIT_POLICY}[name]
                ent["previous"] = q[idx] if name != "exit_policy" else EXIT_POLICIES[q[idx]]
                q[idx] = EXIT_POLICIES.index(str(value)) if name == "exit_policy" else int(value)
                self.w.log.info("ksm_knob", name=name, value=q[idx])
            applied.append(ent)
        return {"applied": applied}

    def _write_run(self, value: int) -> None:
        """echo VALUE > run: the writer task; the write fails (run back to
        0) when it is interrupted or OOM-killed, as the shell's."""
        p = self.w.spawn_writer(value)

        racing = bool(self.racing)   # (in a race block a failed write is not raised: see run_store)

        def check() -> None:
            res = p.extra.get("result", "killed" if p.killed else "?")
            if res != "done" and not racing:
                raise ScriptError(f"run={value}: the write failed ({res}); run is {self.cl.q[K_RUN]}",
                                  "value", EXIT_ERR)
        self._until(lambda: p.state == EXITED, f"run={value}", check)

    # ---- faults ------------------------------------------------------------------------------------
    def do_task_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        s = req.get("signal", "KILL")
        if not isinstance(s, str) or s.upper() not in SIGNALS:
            raise ScriptError(f"signal must be KILL or TERM (got {s!r})", "value", EXIT_USAGE)
        signame, at = s.upper(), req.get("at")
        if at is not None and (not isinstance(at, str) or at not in killpoints.POINTS):
            raise ScriptError(f"unknown kill point {at!r}", "value", EXIT_USAGE)
        if at in killpoints.KSMD_POINTS:
            raise ScriptError(f"{at} is a point in ksmd, not in a task: arm it with m.arm({at!r})",
                              "value", EXIT_USAGE)
        p = self.task(req)
        if at is None:
            self.w.deliver(p.pid, SIGNALS[signame])
        else:
            killpoints.arm_worker(self.cl, p.row, at, SIGNALS[signame])
            if p.extra.get("kind") == "scripted":
                cmd = {"cmd": "exit"} if at in EXIT_POINTS else {"cmd": "drive", "point": at}
                self.w.command(p, cmd)
            elif at in EXIT_POINTS:
                self.w.deliver(p.pid, signal.SIGTERM)
        if not self.w.run_until(lambda: self._gone(p) or (at is not None and self.w.answered(p)),
                                f"task {p.tid} to die", POINT_WAIT_MS if at is not None else None):
            killpoints.disarm_worker(self.cl, p.row)
            raise ScriptError(f"kill point {at} was not reached: {p.tid} did not pass it within "
                              f"{POINT_WAIT_MS} ms of the run's logical time", "not_reached")
        if not self._gone(p):
            ans = self.w.take_answer(p)
            killpoints.disarm_worker(self.cl, p.row)
            if ans.get("exited"):
                p.extra.update(exited=True, path=ans["path"])
                self.w.run_until(lambda: self._gone(p), f"task {p.tid}'s exit")
                raise ScriptError(f"kill point {at} was not reached: the task exited through the "
                                  f"{ans['path']} path of __ksm_exit instead (it is gone)", "not_reached")
            raise ScriptError(f"kill point {at} was not reached: {ans.get('error', 'not on the way')}",
                              "not_reached")
        path = str(p.extra.get("path", "none"))
        return {"task": p.tid, "signal": signame, "at": at, "returncode": p.status, "path": path,
                "result": self.how(p)}

    def do_arm(self, req: dict[str, Any]) -> dict[str, Any]:
        """A ksmd point: a kill of the mm's owner, or a delay -- under the
        scheduler a delay point is a barrier, released when nothing else
        can run (docs/EXPLORE.md).  A task point: in its row."""
        point = req.get("point")
        if not isinstance(point, str) or point not in killpoints.POINTS:
            raise ScriptError(f"unknown kill point {point!r}", "value", EXIT_USAGE)
        s = str(req.get("signal", "KILL")).upper()
        if point in killpoints.KSMD_POINTS:
            if req.get("fail"):  # fail_page_alloc (ValueError at a point that allocates nothing)
                killpoints.arm_ksmd_fail(self.cl, point)
            elif req.get("delay_ms") is not None:
                killpoints.arm_ksmd_delay(self.cl, point, _int(req, "delay_ms", 1, 60_000, "delay_ms"))
            else:
                killpoints.arm_ksmd(self.cl, point, SIGNALS[s])
            return {"armed": point, "where": "ksmd"}
        if req.get("delay_ms") is not None:
            raise ScriptError(f"{point}: delays exist only at ksmd points", "value", EXIT_USAGE)
        p = self.task(req)
        killpoints.arm_worker(self.cl, p.row, point, SIGNALS[s])
        return {"armed": point, "where": p.tid}

    def do_disarm(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("task") is not None:
            p = self.task(req)
            self.cl.q[self.cl.tbase(p.row) + T_KILL_POINT] = -1
            return {"disarmed": p.tid}
        self.cl.q[H_KSMD_POINT] = -1
        return {"disarmed": "ksmd"}

    def do_cursor(self, _req: dict[str, Any]) -> dict[str, Any]:
        cl = self.cl
        slot = cl.q[L_SCAN_SLOT]
        if slot == cl.head:
            return {"task": None, "mm": 0}
        mm_id = cl.mrow(slot).id
        p = next((x for x in self.by_tid.values() if x.mm == mm_id), None)
        return {"task": p.tid if p is not None else None, "mm": mm_id}

    def do_fsck(self, _req: dict[str, Any]) -> dict[str, Any]:
        """The live cluster's fsck, by a scheduled process that takes the
        locks the daemon's fsck takes (bodies._fsck)."""
        p = self.w.spawn_fsck()
        self.w.run_until(lambda: p.state == EXITED, "fsck")
        if not self.w.answered(p):
            raise ScriptError(f"fsck: {self.w.gate.error(p.id) or 'no answer'}", "value", EXIT_ERR)
        ans = self.w.take_answer(p)
        note = (f"{len(ans['exiting'])} exits in flight (mm{', mm'.join(map(str, ans['exiting']))}): "
                f"some errors may be their intermediate state" if ans["errors"] and ans["exiting"] else "")
        return {"clean": ans["clean"], "errors": ans["errors"], "mms": ans["mms"], "note": note}

    def close(self) -> None:
        """Machine.close: every task exits, ksmd stops (World.close)."""
        try:
            self.w.close()
        except RunOver:
            pass


__all__ = ["Requests"]
