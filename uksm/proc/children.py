"""A child process of the supervisor, as its process table holds it."""
from __future__ import annotations

import socket
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
    # what a fork of this worker starts its child with (uksm.proc.forks)
    program: str = ""    # its program (uksm.workers.worker, or .scripted)
    seed: int = 0
    churn_ms: int = 0
    content_wno: int = 0  # whose pages it writes (its own number; a forked child: its parent's)
    base: int = 0        # the address of its mapping (a forked child's is its parent's)
    chan: socket.socket | None = None  # a forked programmable task's command socket, until adopted


#: a death on its way to recovery: (task row, the child, its wait status)
Death = tuple[int, Child, int]
