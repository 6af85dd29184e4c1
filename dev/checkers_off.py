"""checkers_off: switch each checker off in turn and count the tests that notice.

uksm's promise rests on its checkers -- fsck (the frames, page tables,
slots and counters agree), each task's verify (no data lost), ``uksm logs
check`` (the exit protocol's rules held), the watchdog (no task hung) and
the suite's leak fixture (nothing left behind).  If one of them silently
stopped seeing anything, a suite that ends every test with "fsck clean,
0 mismatches" would stay green.  So (issue 16): replace each checker by one
that reports nothing, run the tests, and count the failures; a checker that
no test misses is a checker nobody tests.

How a checker is switched off: a ``sitecustomize`` module, put first on
PYTHONPATH, patches it in *every* Python process of the run -- pytest's,
and the clusters' supervisors, ksmds, workers and daemons it starts --
as the process starts:

    fsck      fsck.check and fsck.check_leaks return no error
    verify    a worker's verify records every page verified, 0 mismatches,
              without reading them (caught as its class is built: a
              worker runs as __main__, out of an import hook's sight)
    logs      logs.rules.check_events reports no violation
    watchdog  Watchdog.check looks at nothing
    leak      the suite's leak fixture (tests/conftest.py) reports nothing

``none`` runs the same tests with every checker on: the control, which
must show no failure, so that the failures above are the checkers' own.

Usage: python dev/checkers_off.py [--checker NAME ...] [--tests PATH ...]
Prints one line per checker: tests run, tests failed, and their names with
``-v``.  Slow (a pytest run per checker): minutes, not a CI test.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKERS = ("none", "fsck", "verify", "logs", "watchdog", "leak")
DEFAULT_TESTS = ("tests/checkers", "tests/logs")

SITECUSTOMIZE = r'''
"""Written by dev/checkers_off.py: switch one uksm checker off in this process."""
import os
import sys

OFF = os.environ.get("UKSM_CHECKER_OFF", "")


def _blind_verify(self):
    from uksm.kernel.layout import T_MISMATCHES, T_VERIFIED
    self.q[self.tb + T_VERIFIED] = self.a.pages
    self.q[self.tb + T_MISMATCHES] = 0


def _verify_off():
    """A worker runs as ``python -m uksm.workers.worker``: its Worker class
    is built in __main__, which no import sees, and used at once.  So catch
    the class as it is built, there and when imported."""
    import builtins
    build = builtins.__build_class__

    def build_class(func, name, *bases, **kw):
        cls = build(func, name, *bases, **kw)
        if name == "Worker" and "verify" in cls.__dict__ and "uksm" in (cls.__module__ + str(
                getattr(sys.modules.get(cls.__module__), "__spec__", None))):
            cls.verify = _blind_verify
        return cls
    builtins.__build_class__ = build_class


# patched now, before anything else imports them: pytest loads uksm's
# modules through its own assertion-rewriting importer (uksm.testing is a
# plugin), ahead of any import hook of ours
if OFF == "fsck":
    import uksm.kernel.fsck as _m
    _m.check = lambda *a, **k: []
    _m.check_leaks = lambda *a, **k: []
elif OFF == "logs":
    import uksm.logs.rules as _m
    _m.check_events = lambda events: _m.CheckResult([], [], 0, True)
elif OFF == "watchdog":
    import uksm.kernel.watchdog as _m
    _m.Watchdog.check = lambda self: None
elif OFF == "verify":
    _verify_off()
'''


def run(checker: str, tests: list[str], site: str, extra: list[str]) -> tuple[int, int, list[str], float]:
    """One pytest run with ``checker`` off: (tests run, failed, failed ids, seconds)."""
    # UKSM_LOCKDEP: as the suite sets it, before sitecustomize imports the kernel
    # PYTEST_ADDOPTS: sitecustomize imports uksm before pytest can mark it
    # for assertion rewriting; its warning would change the inner pytest
    # runs' output (tests/checkers/test_leak_fixture.py reads it)
    env = dict(os.environ, UKSM_CHECKER_OFF=checker, UKSM_LOCKDEP="1",
               PYTEST_ADDOPTS="-W ignore::pytest.PytestAssertRewriteWarning",
               PYTHONPATH=os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                        *extra, *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.monotonic() - t0
    # -rfE: "FAILED id - message" (an id may hold spaces: a parameter's)
    failed = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$",
                                                       p.stdout, re.M)})
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", p.stdout)}
    ran = counts.get("passed", 0) + counts.get("failed", 0)
    if not ran:
        raise SystemExit(f"checkers_off: pytest ran nothing with {checker} off:\n{p.stdout[-2000:]}"
                         f"{p.stderr[-2000:]}")
    return ran, len(failed), failed, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="checkers_off", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--checker", action="append", choices=CHECKERS,
                    help="a checker to switch off (repeatable; default: none, then each)")
    ap.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS),
                    help=f"test paths (default: {' '.join(DEFAULT_TESTS)})")
    ap.add_argument("-v", "--verbose", action="store_true", help="name the failing tests")
    ap.add_argument("--pytest-arg", action="append", default=[], help="passed on to pytest")
    a = ap.parse_args(argv)
    checkers = a.checker or list(CHECKERS)
    with tempfile.TemporaryDirectory(prefix="uksm-checkers-off.") as site:
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        print(f"{'checker off':<12} {'tests':>6} {'failed':>7} {'seconds':>8}   ({' '.join(a.tests)})",
              flush=True)
        bad = False
        for c in checkers:
            ran, nfail, failed, secs = run(c, a.tests, site, a.pytest_arg)
            print(f"{c:<12} {ran:>6} {nfail:>7} {secs:>8.0f}", flush=True)
            if a.verbose:
                for t in failed:
                    print(f"    {t}")
            # the control must be clean; a checker nobody misses is a finding
            bad |= (c == "none") == bool(nfail)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
