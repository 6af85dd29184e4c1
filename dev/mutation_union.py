"""Unite the results of several mutation runs of one module (copies kept by
``MUTMUT_KEEP=1 dev/mutation.sh``), never in the suite.

mutmut names a mutant by its function and its index there, so two runs over
the same source (comments and docstrings aside: mutmut does not mutate
them) name the same mutants alike, whatever tests each run selected.  A
mutant is killed by the union if some run killed it, a timeout if none
killed it and some run timed out, a survivor if every run that tested it
let it live, untested if no run had a test reaching it.

    python dev/mutation_union.py uksm/kernel/locks.py COPY [COPY ...]

Prints the score as dev/mutation.sh does, killed / (killed + survived +
timeouts), then every survivor by name (``mutmut show NAME`` in a copy
gives its diff).
"""
from __future__ import annotations

import json
import signal
import sys

KILLED, SURVIVED, NO_TESTS = 1, 0, 33
TIMEOUTS = (-24, 36)   # SIGXCPU (the CPU-time limit), mutmut's own timeout code


def load(copy: str, module: str) -> dict[str, int | None]:
    with open(f"{copy}/mutants/{module}.meta") as f:
        codes: dict[str, int | None] = json.load(f)["exit_code_by_key"]
    return codes


def unite(runs: list[dict[str, int | None]]) -> dict[str, str]:
    names = sorted(set().union(*runs))
    out = {}
    for n in names:
        codes = [r.get(n) for r in runs]
        if KILLED in codes:
            out[n] = "killed"
        elif any(c in TIMEOUTS for c in codes):
            out[n] = "timeout"
        elif SURVIVED in codes:
            out[n] = "survived"
        elif NO_TESTS in codes:
            out[n] = "no tests"
        else:
            out[n] = "not run"
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: mutation_union.py MODULE COPY [COPY ...]", file=sys.stderr)
        return 2
    module, copies = argv[0], argv[1:]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `| head` ends it quietly
    try:
        res = unite([load(c, module) for c in copies])
    except (OSError, ValueError, KeyError) as e:
        print(f"mutation_union: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for v in res.values():
        counts[v] = counts.get(v, 0) + 1
    k, s, t = counts.get("killed", 0), counts.get("survived", 0), counts.get("timeout", 0)
    print(f"{module}: {counts}; score {k}/{k + s + t} = {100 * k / max(k + s + t, 1):.1f}% "
          f"over {len(copies)} run(s)")
    for n, v in res.items():
        if v == "survived":
            print(f"    {n}: survived")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
