"""A child process of the supervisor, as its process table holds it."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass
class Child:
    """One fork + exec'd task: a worker, ksmd or a run= writer.  ``row`` is
    its task row in the cluster's task table (``T_*`` words)."""
    row: int
    proc: subprocess.Popen
    role: str            # "worker", "ksmd" or "writer"
    mm: int = 0          # a worker's address space (mm id)
    worker_no: int = 0
    pages: int = 0
    workload: str = ""
    signalled: int = 0
    oops_fd: int = -1    # a writer's oops channel, read end (ksmd's is KsmdCtl.oops_fd)


#: a death on its way to recovery: (task row, the child, its wait status)
Death = tuple[int, Child, int]
