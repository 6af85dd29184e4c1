"""A kernel oops: an unexpected exception in a task running kernel code
(ksmd, or the run=2 writer in run_store).

The task logs ``oops`` once with the traceback, writes the traceback to the
file the supervisor gave it (``--oops-file``), and exits with OOPS_STATUS.
The supervisor then recovers the locks it held like any dead task's,
reports the traceback (the report's ``oops``), starts no new ksmd, and the
run ends with status 5.
"""
from __future__ import annotations

import traceback
from typing import Any

OOPS_STATUS = 70  # EX_SOFTWARE


def oops(e: BaseException, log: Any, oops_file: str | None) -> int:
    """Report ``e`` as an oops; returns the exit status to use."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log.critical("oops", error=repr(e), tb=tb)
    if oops_file:
        with open(oops_file, "w") as f:
            f.write(tb)
    return OOPS_STATUS
