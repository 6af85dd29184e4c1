#!/bin/sh
# Mutation testing as a benchmark (issue 16), never in CI: how many small
# changes (mutants) of one module the tests that exercise it notice.
#
#   pip install -e '.[mutation]'
#   tools/mutation.sh [MODULE [TEST_FILE ...]]
#   tools/mutation.sh uksm/kernel/fsck.py tests/checkers/test_planted.py          (the default)
#   tools/mutation.sh uksm/kernel/ksm.py tests/kernel/test_exit.py tests/checkers/test_planted.py
#
# mutmut runs in a copy of the committed tree (git archive HEAD) under a
# temporary folder, at nice 19, one mutant at a time (the machine is
# shared), so the work tree is never touched.  Prints mutmut's results
# (every surviving mutant by name: `mutmut show NAME` in the copy shows
# its diff) and the score: killed / (killed + survived + timeouts).
# MUTMUT_KEEP=1 keeps the copy and prints its path.
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
also_copy = ["workers/", "tools/"]
pytest_add_cli_args_test_selection = [${sel%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]
EOF
cd "$WORK"
# every process of the run carries this marker (tests/conftest.py extends
# it): a mutant's test killed on timeout leaves its cluster's ksmd and
# workers behind, which reap() kills and cleans up at the end
MARK="mutation$$"
reap() {
    names=""
    for d in /proc/[0-9]*; do
        { tr '\0' '\n' <"$d/environ"; } 2>/dev/null | grep -q "^UKSM_TEST_SESSION=$MARK" || continue
        n=$({ tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null | sed -n 's/.*--cluster \([A-Za-z0-9_-]*\).*/\1/p')
        names="$names $n"
        kill -9 "${d#/proc/}" 2>/dev/null || true
    done
    sleep 1
    for n in $(echo $names | tr ' ' '\n' | sort -u); do "$PY" -m uksm cleanup --cluster "$n" >/dev/null 2>&1 || true; done
}
UKSM_TEST_SESSION=$MARK nice -n 19 "$MUTMUT" run --max-children 1 >"$WORK/run.log" 2>&1 || { tail -20 "$WORK/run.log"; reap; exit 1; }
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
