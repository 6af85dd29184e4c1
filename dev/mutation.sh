#!/bin/sh
# Mutation testing as a benchmark (issue 16), never in CI: how many small
# changes (mutants) of one module the tests that exercise it notice.
#
#   pip install -e '.[mutation]'
#   dev/mutation.sh [MODULE [TEST_FILE ...]]
#   dev/mutation.sh uksm/kernel/fsck.py tests/checkers/test_planted.py          (the default)
#   dev/mutation.sh uksm/kernel/locks.py tests/kernel/test_lock_protocol.py
#   dev/mutation.sh uksm/kernel/ksm.py tests/kernel/test_ksm_run.py
#   dev/mutation.sh uksm/kernel/exit.py tests/kernel/test_exit_steps.py
#
# mutmut runs in a copy of the committed tree (git archive HEAD) under a
# temporary folder, at nice 19, one mutant at a time (the machine is
# shared), so the work tree is never touched.  Prints mutmut's results
# (every surviving mutant by name: `mutmut show NAME` in the copy shows
# its diff) and the score: killed / (killed + survived + timeouts).
# MUTMUT_KEEP=1 keeps the copy and prints its path.
#
# mutmut runs a mutant against the tests that reached the mutated function
# (its stats pass records them).  It records the pytest process only; so
# the copy also records the *subprocesses* (uksm run, a worker, ksmd, the
# run= writer, a nested pytest): dev/mutation_hits.py, found by every
# process of the run on PYTHONPATH as sitecustomize, writes the functions
# each subprocess reached to a file of its own during the stats pass, and a
# hook added to the copy's conftest gives them to the test that ran while
# that process lived.  A mutant is then run against its subprocess-driven
# tests too -- the mutant's name is in MUTANT_UNDER_TEST, which every
# process inherits, and every child imports the copy's uksm
# (uksm/host/pyexec.py) -- so those tests count.  Select them by module:
# each test selected is run against each mutant it reaches, until one
# fails.  Results of two runs over the same source (mutant names are
# stable) can be united: see docs/MUTATION.md.
set -eu
MODULE=${1:-uksm/kernel/fsck.py}
[ $# -gt 0 ] && shift
TESTS=${*:-tests/checkers/test_planted.py}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=$(dirname "$PY")/mutmut
[ -x "$MUTMUT" ] || { echo "mutation.sh: no mutmut next to $PY: pip install -e '.[mutation]'" >&2; exit 2; }
[ -f "$ROOT/$MODULE" ] || { echo "mutation.sh: no such module $MODULE" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/uksm-mutation.XXXXXX")
[ "${MUTMUT_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git archive HEAD) | tar -x -C "$WORK"
sel=$(for t in $TESTS; do printf '"%s", ' "$t"; done)
cat >> "$WORK/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["uksm/"]
only_mutate = ["$MODULE"]
also_copy = ["workers/", "tools/", "dev/", "README.md", "docs/"]
pytest_add_cli_args_test_selection = [${sel%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]
EOF
cd "$WORK"
# every process of the run carries this marker (tests/conftest.py extends
# it).  A mutant's test killed on its time limit leaves its cluster's ksmd,
# workers and supervisors behind (its cleanup never ran): before each
# mutant's tests (pytest_sessionstart in the forked child, one mutant at a
# time) dev/mutation_reap.py kills what carries the marker and is not an
# ancestor, and unlinks the objects of the run's dead clusters; and once
# more at the end.  Only in the copy: the suite's conftest is not changed.
MARK="mutation$$"
PIDS="$WORK/.mutation-pids"
# the subprocesses' hits (dev/mutation_hits.py): sitecustomize for every
# process of the run; the hook below hands them to the test
HITS="$WORK/.mutation-hits"
mkdir -p "$HITS" "$WORK/.mutation-site"
cp "$WORK/dev/mutation_hits.py" "$WORK/.mutation-site/sitecustomize.py"
export UKSM_MUTMUT_HITS="$HITS"
export PYTHONPATH="$WORK/.mutation-site${PYTHONPATH:+:$PYTHONPATH}"
cat >> "$WORK/tests/conftest.py" <<EOF


def _mutation_hits():
    import importlib.util
    import sys
    if "mutation_hits" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mutation_hits", "$WORK/dev/mutation_hits.py")
        sys.modules["mutation_hits"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mutation_hits"])
    return sys.modules["mutation_hits"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    _mutation_hits().attribute(item)


def pytest_sessionstart(session):
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutation_reap", "$WORK/dev/mutation_reap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.reap("$MARK", "$PIDS")
EOF
reap() { "$PY" "$WORK/dev/mutation_reap.py" "$MARK" "$PIDS" || true; }
# MUTMUT_NAMES='GLOB ...' runs only those mutants (mutmut names, * allowed:
# 'uksm.kernel.ksm.x___ksm_exit*'), e.g. to finish what a stopped run left
# shellcheck disable=SC2086
UKSM_TEST_SESSION=$MARK nice -n 19 "$MUTMUT" run --max-children 1 ${MUTMUT_NAMES:-} >"$WORK/run.log" 2>&1 || { tail -20 "$WORK/run.log"; reap; exit 1; }
reap
"$MUTMUT" results --all true >"$WORK/results.txt" 2>&1 || true
grep -v ": killed$" "$WORK/results.txt" || true
"$PY" - "$WORK/results.txt" "$MODULE" <<'EOF'
import collections, sys
counts = collections.Counter(line.rsplit(": ", 1)[1].strip() for line in open(sys.argv[1]) if ": " in line)
k, s, t = counts["killed"], counts["survived"], counts["timeout"]
total = k + s + t
print(f"{sys.argv[2]}: {dict(counts)}; score {k}/{total} = {100 * k / max(total, 1):.1f}% "
      f"(mutants no selected test reaches are not counted)")
EOF
[ "${MUTMUT_KEEP:-0}" = 1 ] && echo "copy kept in $WORK"
exit 0
