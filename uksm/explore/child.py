"""What every scheduled process does first, in the forked child."""
from __future__ import annotations

import os
from typing import Any

from uksm.host import log as ulog
from uksm.kernel.layout import T_PID

# a task's waits on the scenario (BLK_COND's first argument)
COND_GO, COND_SCANS, COND_RUN_DONE = 1, 2, 3


def bind(w: Any, p: Any, side: Any, role: str) -> Any:
    """This child's own task row, its hooks, its logger."""
    cl = w.cl
    task = cl.bind(p.row)
    task.sched = side.lock_hook
    cl.q[cl.tbase(p.row) + T_PID] = os.getpid()
    log = ulog.setup(role, w.name, w.o.log_dir, **({"mm": p.mm} if p.mm else {})) if w.o.log_dir \
        else ulog._Null()
    cl.lockdep_log = log
    if task.lockdep is None:
        task.lockdep = cl._lockdep_report
    return log
