"""``RunWriter.write``: the one write of ``run`` through a writer task,
the caller's ``wait`` doing its main-loop duties (issue 15)."""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from helpers import PID, booted, pump
from uksm.host.shm import UksmError
from uksm.kernel.layout import K_RUN
from uksm.proc.runwriter import Wait


def pumping(sup, calls: list[int]) -> Wait:
    """A wait that reaps and sweeps between two looks, as the main loop."""
    def wait(pred: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not pred():
            calls.append(1)
            if time.monotonic() > end:
                return False
            sup.poll()
            sup.sweep()
            time.sleep(0.01)
        return True
    return wait


@pytest.mark.timeout(90)
def test_the_write_returns_through_the_callers_wait_then_a_wait_that_gives_up_is_an_error():
    with booted(f"trk{PID}", run=0, frames=64, va_pages=16, max_tasks=6, max_mms=2) as sup:
        calls: list[int] = []
        r = sup.runwriter.write(1, pumping(sup, calls), 30.0)
        assert r["value"] == 1 and r["status"] == 0 and r["result"] == "done", r
        assert sup.cl.q[K_RUN] == 1
        assert calls, "the writer cannot have returned before its first look"
        with pytest.raises(UksmError, match=r"run=0 written, but the write has not returned after 0s"):
            sup.runwriter.write(0, lambda pred, timeout: False, 0.0)
        # the write goes on without its waiter: it returns all the same
        pump(sup, lambda: sup.cl.q[K_RUN] == 0 and not sup.writers, what="the abandoned write")
