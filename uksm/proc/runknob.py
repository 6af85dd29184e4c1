"""``echo VALUE > /sys/kernel/mm/ksm/run``, as the shell does it.

A writer task (``uksm.kernel.writer``) runs ``run_store`` -- for 2, the
whole unmerge, in the writer's own context, as in 2.6.32 -- and the
writing side waits for it as the shell waits for its write(2) to return.
Whoever waits (the daemon's ``ctl run=``, ``Supervisor.write_run`` for
``uksm run`` and the tests) must keep the main loop's duties going
meanwhile (reaping, sweeping): the writer may block on a lock whose holder
dies, and only those duties recover it.  So the waiting is the caller's
``wait`` and the rest is here, once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from uksm.host.exitcodes import EXIT_ERR
from uksm.host.shm import UksmError
from uksm.kernel.writer import result_of

if TYPE_CHECKING:
    from uksm.proc.supervisor import Supervisor

# wait(pred, timeout): True once pred() holds, False after timeout seconds,
# doing the caller's main-loop duties in between
Wait = Callable[[Callable[[], bool], float], bool]


def write_run(sup: "Supervisor", value: int, wait: Wait, timeout: float,
              oom_origin: bool | None = None) -> dict[str, Any]:
    """Start the writer of ``run=value`` and ``wait`` for its write to
    return: {"value", "status", "result"}, the result "done",
    "interrupted" (-ERESTARTSYS), "oom-killed", "killed by SIG..." (the
    writer's exit status through ``writer.result_of``) or "hung" (status
    None: the watchdog has reported a hung task, so waiting on would wait
    for ever).  A write still not returned after ``timeout`` is an
    UksmError (EXIT_ERR)."""
    ch = sup.start_run_writer(value, oom_origin)
    if not wait(lambda: sup.run_writer_status(ch) is not None or bool(sup.hung), timeout):
        raise UksmError(f"run={value} written, but the write has not returned after "
                        f"{timeout:.0f}s", EXIT_ERR)
    if sup.hung:
        return {"value": value, "status": None, "result": "hung"}
    rc = sup.run_writer_status(ch)
    return {"value": value, "status": rc, "result": result_of(rc)}


__all__ = ["write_run", "Wait"]
