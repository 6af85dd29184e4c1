"""Suite-wide guards: every test is checked for leaked processes and POSIX
objects (a leak fails the test that caused it: ``leakcheck`` says what
counts as the session's), and has a timeout (pytest-timeout, default in
pyproject.toml) so a deadlock fails fast.

Skips: a test may skip only for a reason listed in ALLOWED_SKIPS (each
with why it cannot run there); any other skip fails the session
(``pytest_terminal_summary`` below), so nothing is skipped silently."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# lockdep on in every process the suite starts, this one included: set
# before anything imports uksm.kernel.cluster, which reads it once
os.environ["UKSM_LOCKDEP"] = "1"

import helpers
import leakcheck
from helpers import Up, cluster_pids, cmdline, cname, uksm, wait_for
from uksm.host import shm
from uksm.kernel.cluster import pid_alive

#: dev/checkers_off.py switches this fixture off (it then reports nothing),
#: to count the tests that notice
LEAK_CHECK_OFF = os.environ.get("UKSM_CHECKER_OFF") == "leak"


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The temporary directory of every process the tests start (TMPDIR)
    and of this one (tempfile) is under pytest's basetemp, which pytest
    rotates: a Machine's or inject's log folder made with mkdtemp does not
    stay in /tmp after the run (a fresh user found 1,533 uksm-* folders)."""
    import tempfile
    d = str(tmp_path_factory.mktemp("tmp"))
    old_env, old = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = d, d
    try:
        yield
    finally:
        tempfile.tempdir = old
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


#: the part of a test's timeout kept for its fixtures' teardown (a cluster
#: taken down, the leak check): its calls' budgets end before
TEARDOWN_RESERVE_S = 20.0


def test_timeout(item: pytest.Item) -> float:
    """The item's pytest-timeout: its marker's, else the ini default."""
    m = item.get_closest_marker("timeout")
    if m is not None and m.args:
        return float(m.args[0])
    return float(item.config.getini("timeout") or 0) or 300.0


_END = [0.0]   # when pytest-timeout ends the running test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The test's deadline (helpers.budget): pytest-timeout counts from its
    setup on, and so does this; the reserve is for the teardown."""
    t = test_timeout(item)
    _END[0] = time.monotonic() + t
    helpers.DEADLINE = _END[0] - min(TEARDOWN_RESERVE_S, t / 4)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    helpers.DEADLINE = _END[0] - 2.0   # the teardown has the reserve


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    helpers.DEADLINE = None


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a uksm process or a POSIX object behind
    (the ``uksm.`` objects of its clusters, and the ``uksmtest.`` objects
    named with this process's pid that the in-process lock tests make)."""
    before = leakcheck.Snapshot()
    yield
    msg = before.leaks()
    if msg and not LEAK_CHECK_OFF:
        pytest.fail(msg, pytrace=False)


def take_down(name: str) -> None:
    """``uksm down``; whatever is still there then, SIGKILLed and removed."""
    if shm.leftovers(name) or cluster_pids(name):
        try:
            uksm("down", "--cluster", name, timeout=40)
        except AssertionError:   # run_group's "no answer within 40s (killed)"
            pass
    for _ in range(3):
        pids = cluster_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # called at once, within this iteration
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, what="SIGKILLed processes")  # noqa: B023
    shm.remove_all(name)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """A cluster name for one test, driven with ``uksm up`` (``helpers.Up``).
    The test takes it down itself: if anything of it is still there a few
    seconds after the test (a process, an object), the fixture takes it
    down (``uksm down``, else SIGKILL and removal) and fails the test with
    the leak fixture's message -- cleaning up silently would hide the leak
    from the leak fixture, which runs after this one."""
    c = Up(cname(f"tc{request.node.name[5:11].replace('_', '')}{time.monotonic_ns() % 1000}"), tmp_path)
    yield c
    try:
        wait_for(lambda: not cluster_pids(c.name) and not shm.leftovers(c.name), leakcheck.SETTLE_S,
                 what=f"cluster {c.name} to be gone")
    except AssertionError:
        pass
    pids = [f"{p} {cmdline(p)}" for p in cluster_pids(c.name)]
    objs = shm.leftovers(c.name)
    if pids or objs:
        take_down(c.name)
        if not LEAK_CHECK_OFF:
            pytest.fail(leakcheck.leak_message(pids, objs, why=f"; cluster {c.name} was left up "
                                               "(the cluster fixture took it down)"), pytrace=False)


# ---- skips: only for a reason listed here ------------------------------------------------

#: The only reasons a test may skip: each skip's reason starts with one of
#: these keys (``helpers.skip_unless``), and says what its probe found.
#: Any other skip -- an importorskip, a skipif on the wrong condition -- fails
#: the session: a skip must never make a failing test look green.
ALLOWED_SKIPS = {
    "no-mount-namespace": "the test mounts a small tmpfs on /dev/shm in private mount and "
                          "network namespaces (unshare -m -n), which needs CAP_SYS_ADMIN: root "
                          "on a host, not in an unprivileged container",
    "no-setuid": "the test runs commands as user nobody (setpriv --reuid), which needs "
                 "CAP_SETUID and CAP_SETGID and a user nobody",
    "no-host-ksm": "the twin (tools/twin.py) compares uksm with the host kernel's KSM: it needs "
                   "/sys/kernel/mm/ksm (CONFIG_KSM), root to write its knobs and read PFNs, and "
                   "/proc/PID/ksm_stat (Linux 6.1 or later); CI here has all three",
    "no-c-core": "uksm was installed where no C compiler was found, so the lock protocol's "
                 "C core was never built (setup.py: optional); its own tests cannot run",
}

_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) else str(lr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def unexpected_skips() -> list[tuple[str, str]]:
    return [(n, r) for n, r in _SKIPS
            if not any(r.removeprefix("Skipped: ").startswith(k + ":") for k in ALLOWED_SKIPS)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if unexpected_skips() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    bad = unexpected_skips()
    allowed = [(n, r) for n, r in _SKIPS if (n, r) not in bad]
    if allowed:
        terminalreporter.write_sep("-", f"{len(allowed)} skipped, each for an allowed reason "
                                        "(conftest.ALLOWED_SKIPS)")
        for n, r in allowed:
            terminalreporter.write_line(f"{n}: {r}")
    if bad:
        terminalreporter.write_sep("=", f"{len(bad)} skipped for a reason not in "
                                        "conftest.ALLOWED_SKIPS: the session fails", red=True)
        for n, r in bad:
            terminalreporter.write_line(f"{n}: {r}")
