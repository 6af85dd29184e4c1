"""``uksm.testing``: a pytest plugin (registered as the ``uksm`` pytest11
entry point, so installing uksm enables it) for writing KSM tests the way
this repository does.

- the ``machine`` fixture: a fresh ``uksm.Machine`` per test, closed after
  it; the test fails if the machine left anything behind (a POSIX object,
  a process), if fsck or a task's data check failed at the end, or if a
  hung task was reported (unless the test expected it:
  ``@pytest.mark.uksm_machine(expect_hung=True)``);
- ``@pytest.mark.uksm_machine(**options)``: the Machine's options for
  that test (``frames``, ``exit_policy``, ``sleep_millisecs``, ...).

Nothing of uksm is imported until a test asks for the fixture.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

_seq = itertools.count(1)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "uksm_machine(**options): options of the `machine` "
                                       "fixture's uksm.Machine (expect_hung=True: a hung task "
                                       "is what the test is about)")


def leftovers(m: Any) -> list[str]:
    """What a closed Machine left behind, and what went wrong at its end."""
    from uksm.host import shm
    from uksm.kernel.cluster import pid_alive
    rep = m.report or {}
    out = [f"POSIX object /dev/shm/{o}" for o in shm.leftovers(m.name)]
    out += [f"process {p} still running" for p in m.pids if pid_alive(p)]
    if rep.get("integrity", {}).get("mismatches"):
        out.append(f"{rep['integrity']['mismatches']} pages did not hold what their task wrote")
    if not rep.get("hung_tasks") and not rep.get("fsck", {}).get("ok", False):
        out.append(f"fsck: {'; '.join(rep.get('fsck', {}).get('errors', [])[:5])}")
    out += [f"error: {e}" for e in rep.get("errors", [])]
    return out


@pytest.fixture
def machine(request: Any) -> Iterator[Any]:
    """A fresh uksm.Machine for the test (options from the uksm_machine
    marker); fails the test if it leaves anything behind."""
    from uksm import Machine
    marker = request.node.get_closest_marker("uksm_machine")
    opts: dict[str, Any] = dict(marker.kwargs) if marker else {}
    expect_hung = bool(opts.pop("expect_hung", False))
    opts.setdefault("name", f"pyt{os.getpid()}x{next(_seq)}")
    m = Machine(**opts)
    try:
        yield m
    finally:
        m.close()
    problems = leftovers(m)
    hung = (m.report or {}).get("hung_tasks", [])
    if hung and not expect_hung:
        problems.append("hung task: " + " / ".join(hung[0].get("chain", [])))
    if problems:
        pytest.fail(f"uksm machine {m.name}: " + "; ".join(problems), pytrace=False)
