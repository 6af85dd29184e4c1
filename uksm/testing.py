"""``uksm.testing``: a pytest plugin (registered as the ``uksm`` pytest11
entry point, so installing uksm enables it) for writing KSM tests the way
this repository does.

- the ``machine`` fixture: a fresh ``uksm.Machine`` per test, closed as
  the test's last step; the test fails (FAILED, not an ERROR at teardown)
  if the machine left anything behind (a POSIX object, a process), if fsck
  or a task's data check failed at the end, or if a hung task was reported
  -- unless the test expects one,
  ``@pytest.mark.uksm_machine(expect_hung=True)``, which then fails if
  none was;
- ``@pytest.mark.uksm_machine(**options)``: the Machine's options for
  that test (``frames``, ``exit_policy``, ``sleep_millisecs``, ...);
- ``@pytest.mark.uksm_explore(**options)``: the test's body, with its
  ``machine`` argument, is a scenario explored under controlled schedules
  (``uksm.explore``: ``strategy``, ``preemptions``, ``schedules``,
  ``kills`` and the Machine's options); the test fails with the first
  failing schedule -- its finding, its trace and the line that replays it
  -- if any run fails its checks or the body's own asserts;
- ``explore_or_fail(scenario_fn, **options)``: the same, called from a
  test (it returns the ``uksm.Exploration``).

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
    config.addinivalue_line("markers", "uksm_explore(**options): explore the test's body, its "
                                       "`machine` argument a controlled Machine, with uksm.explore's "
                                       "options (strategy, preemptions, schedules, kills, and the "
                                       "Machine's); fail with the first failing schedule")


def explore_or_fail(scenario_fn: Any, **options: Any) -> Any:
    """``uksm.explore(scenario_fn, **options)``; the calling test fails if
    a schedule failed (the finding, the minimal schedule, its trace, and
    the call that replays it).  Returns the Exploration."""
    import uksm
    res = uksm.explore(scenario_fn, **options)
    if res.failures:
        f = res.failures[0]
        name = getattr(scenario_fn, "__name__", "scenario")
        pytest.fail(f"uksm.explore({name}): {f['finding']} after {res.first_failure_after} schedule(s): "
                    f"{f['detail']}\n  " + "\n  ".join(f.get("chain", []))
                    + f"\nschedule: {f['schedule']}\nreplay: uksm.replay({name}, {f['schedule']!r})"
                    + "\ntrace:\n  " + "\n  ".join(f["trace"]), pytrace=False)
    return res


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: Any) -> Any:
    """A test marked ``uksm_explore``: its body is the scenario."""
    marker = pyfuncitem.get_closest_marker("uksm_explore")
    if marker is None:
        return None
    fn = pyfuncitem.obj
    args = {k: pyfuncitem.funcargs[k] for k in pyfuncitem._fixtureinfo.argnames if k != "machine"}

    def scenario(m: Any) -> None:
        fn(machine=m, **args)
    scenario.__name__ = pyfuncitem.name
    explore_or_fail(scenario, **marker.kwargs)
    return True


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


def problems_of(m: Any, expect_hung: bool) -> list[str]:
    """Close ``m`` and say what is wrong at its end: what it left behind,
    and a hung task (or, with ``expect_hung``, the absence of one)."""
    m.close()
    problems = leftovers(m)
    hung = (m.report or {}).get("hung_tasks", [])
    if hung and not expect_hung:
        problems.append("hung task: " + " / ".join(hung[0].get("chain", [])))
    if expect_hung and not hung:
        problems.append("no hung task was reported, and the test expects one "
                        "(uksm_machine(expect_hung=True))")
    return problems


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: Any) -> Any:
    """The machine is closed and checked as the test's last step, so that
    what it left behind fails the test itself (FAILED), not its teardown
    (an ERROR next to a PASSED)."""
    try:
        res = yield
    except BaseException:
        m = _checked(item)
        if m is not None and m[1]:  # the test failed anyway: say what its machine left too
            item.add_report_section("call", "uksm machine", "\n".join(m[1]))
        raise
    m = _checked(item)
    if m is not None and m[1]:
        pytest.fail(f"uksm machine {m[0].name}: " + "; ".join(m[1]), pytrace=False)
    return res


def _checked(item: Any) -> tuple[Any, list[str]] | None:
    state = getattr(item, "_uksm_machine", None)
    if state is None or state["checked"]:
        return None
    state["checked"] = True
    return state["m"], problems_of(state["m"], state["expect_hung"])


@pytest.fixture
def machine(request: Any) -> Iterator[Any]:
    """A fresh uksm.Machine for the test (options from the uksm_machine
    marker); fails the test if it leaves anything behind."""
    from uksm import Machine
    if request.node.get_closest_marker("uksm_explore") is not None:
        yield None   # the body runs on controlled machines (pytest_pyfunc_call)
        return
    marker = request.node.get_closest_marker("uksm_machine")
    opts: dict[str, Any] = dict(marker.kwargs) if marker else {}
    expect_hung = bool(opts.pop("expect_hung", False))
    opts.setdefault("name", f"pyt{os.getpid()}x{next(_seq)}")
    m = Machine(**opts)
    state = {"m": m, "expect_hung": expect_hung, "checked": False}
    request.node._uksm_machine = state
    try:
        yield m
    finally:
        m.close()
    if not state["checked"]:  # (a test that never ran its call: checked here)
        state["checked"] = True
        problems = problems_of(m, expect_hung)
        if problems:
            pytest.fail(f"uksm machine {m.name}: " + "; ".join(problems), pytrace=False)
