"""The functions a mutation run's *subprocesses* reach, for mutmut's stats
pass (dev/mutation.sh), never in the suite.

mutmut records which mutated functions each test reaches (its "stats"
pass, ``MUTANT_UNDER_TEST=stats``) in the pytest process only; a test
that drives uksm through a subprocess (``uksm run``, a worker, ksmd, the
run= writer) reached nothing, as far as mutmut knew, and was never run
against a mutant however well it would kill it.  Two halves:

- as ``sitecustomize`` (mutation.sh copies this file onto PYTHONPATH, so
  every process of the run imports it at start), in any process but
  mutmut's own: mutmut's hit recorder is replaced by one appending each
  function's name, once per process, to ``$UKSM_MUTMUT_HITS/<pid>`` (a
  line at a time: workers and ksmd end with ``os._exit``, no atexit);
- ``attribute(item)``, from a hook in the copy's conftest after each test's
  teardown: the names in the files of processes that wrote during the test
  or still live (a module-scoped cluster's ksmd serves several tests) are
  given to the test, as mutmut's own collector does for in-process hits.
  A test may so be given a function it did not reach this time: it is then
  run against that function's mutants for nothing, which costs time, never
  a kill.
"""
from __future__ import annotations

import os
import sys
import time

_t0 = [time.time()]


def _install() -> None:
    where = os.environ.get("UKSM_MUTMUT_HITS")
    if (not where or os.environ.get("MUTANT_UNDER_TEST") != "stats"
            or any("mutmut" in os.path.basename(a) for a in sys.orig_argv[:2])):
        return
    try:
        from mutmut.mutation import trampoline
    except ImportError:
        return
    path = os.path.join(where, str(os.getpid()))
    seen: set[str] = set()
    argv = sys.orig_argv
    main = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""

    def hit(name: str, caller: str | None = None) -> None:
        if main and name.startswith("__main__."):   # a module run with -m (before it re-imports itself)
            name = main + name[len("__main__"):]
        if name not in seen:
            seen.add(name)
            with open(path, "a") as f:
                f.write(name + "\n")
    trampoline.record_trampoline_hit = hit   # type: ignore[assignment]


def attribute(item) -> None:
    from mutmut.state import state
    where = os.environ.get("UKSM_MUTMUT_HITS")
    if not where or os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return
    since, _t0[0] = _t0[0], time.time()
    names: set[str] = set()
    for f in os.listdir(where):
        p = os.path.join(where, f)
        try:
            alive = f.isdigit() and os.path.exists(f"/proc/{f}")
            if alive or os.path.getmtime(p) >= since - 1:
                with open(p) as fh:
                    names.update(ln.strip() for ln in fh if ln.strip())
        except OSError:
            continue
    node = item.nodeid.removeprefix("mutants/")
    for n in names:
        state().tests_by_mangled_function_name[n].add(node)


if __name__ == "sitecustomize":
    _install()
