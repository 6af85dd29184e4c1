"""Mutation testing of the lock protocol's C core (uksm/kernel/_lockcore.c),
as dev/mutation.sh does for the Python modules (mutmut cannot mutate C).

Each mutant is one small change a slip of the pen could make: a word
transition dropped, moved or with the wrong sequence step, a semaphore
operation skipped, a hook not called, a bound not checked.  For each, in a
copy of the committed tree (``git archive HEAD``, so the work tree is never
touched): apply it, compile the core there (the C compiler and flags
Python was built with, the mutant's own source hash, so that the
"built from this source" test does not kill it for free), and run the
protocol's tests in the copy.  A mutant is killed when a test fails.  The
unmutated core must pass first (the control).

Usage: ``python dev/mutation_lockcore.py [--list] [--keep] [NAME ...]``
Prints each mutant's verdict and the score; exit 0 when the control passed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

SRC = "uksm/kernel/_lockcore.c"
TESTS = ["tests/kernel/test_lock_protocol.py", "tests/kernel/test_lockcore.py"]

# name: (what it breaks, the text replaced, its replacement)
MUTANTS: dict[str, tuple[str, str, str]] = {
    "no_e_lock": ("take: E_LOCK not written",
                  "    st(ws, *e + E_LOCK, lk->lid);\n", ""),
    "no_waiting": ("take: the word never says WAITING (window A unseen)",
                   "    st(ws, *e + E_WORD, (*w & ~7LL) + 8 + WAITING);\n", ""),
    "waiting_seq": ("take: WAITING with the sequence stepped twice",
                    "(*w & ~7LL) + 8 + WAITING", "(*w & ~7LL) + 16 + WAITING"),
    "held_seq": ("lock: HELD with the sequence stepped once (equal to WAITING's)",
                 "    st(&ws, e + E_WORD, (w & ~7LL) + 16 + HELD);", "    st(&ws, e + E_WORD, (w & ~7LL) + 8 + HELD);"),
    "try_fail_waiting": ("trylock: a failed try left WAITING",
                         "(got ? HELD : IDLE)", "(got ? HELD : WAITING)"),
    "try_always": ("trylock: busy taken for success",
                   "    return PyBool_FromLong(got);", "    return PyBool_FromLong(1);"),
    "no_releasing": ("unlock: the word never says RELEASING (window B unseen)",
                     "    st(&ws, e + E_WORD, (w & ~7LL) + 8 + RELEASING);\n", ""),
    "idle_before_post": ("unlock: IDLE written before the post",
                         "    st(&ws, e + E_WORD, (w & ~7LL) + 8 + RELEASING);\n    order_before_sem();\n    if (sem_give(lk) < 0)\n        goto fail;\n    st(&ws, e + E_WORD, (w & ~7LL) + 16 + IDLE);",
                         "    st(&ws, e + E_WORD, (w & ~7LL) + 16 + IDLE);\n    if (sem_give(lk) < 0)\n        goto fail;"),
    "no_post": ("unlock: the unit never posted",
                "    if (sem_give(lk) < 0)\n        goto fail;\n", ""),
    "busy_is_taken": ("lock: a busy semaphore taken as got (no wait)",
                      "    if (!got) {\n        /* contended", "    if (0) {\n        /* contended"),
    "busy_is_error": ("sem_try: EAGAIN reported as an error",
                      "        if (errno == EAGAIN)\n            return 0;\n", ""),
    "py_busy_is_error": ("sem_try, Python path: BusyError not caught",
                         "    if (PyErr_ExceptionMatches(BusyError)) {", "    if (0) {"),
    "no_uaf": ("the use-after-free hook never called",
               "    if (t->uaf == NULL || t->uaf == Py_None || lk->mmrow < 0)\n        return 0;",
               "    return 0;"),
    "uaf_freeing": ("mm_freed: FREEING not counted as freed",
                    "state == MMS_FREEING || ", ""),
    "no_lockdep": ("lock: lockdep_check never called",
                   "    if (check && self->lockdep != NULL", "    if (0 && self->lockdep != NULL"),
    "lockdep_unchecked": ("lock: check=False ignored",
                          "    if (check && self->lockdep", "    if (self->lockdep"),
    "no_try_recursive": ("trylock: a recursive trylock not reported",
                         "        if (held) {", "        if (0) {"),
    "no_bounds": ("entry_of: an entry outside the table not refused",
                  "    if (e < 0 || e + E_WORD >= ws->n || e + E_LOCK >= ws->n || e + E_WORD < 0 || e + E_LOCK < 0) {",
                  "    if (0) {"),
    "no_layout_check": ("words_get: a core whose layout() was never called not refused",
                        "    if (E_LOCK < 0 || E_WORD < 0 || M_ID < 0 || M_STATE < 0) {", "    if (0) {"),
    "never_mapped": ("the semaphore never mapped: every operation through posix_ipc",
                     "        lk->psem = p == SEM_FAILED ? NULL : p;", "        lk->psem = NULL; (void)p;"),
    "subclass_mapped": ("a posix_ipc.Semaphore subclass mapped (its own methods bypassed)",
                        "!Py_IS_TYPE(sem, (PyTypeObject *)SemaphoreType)",
                        "!PyObject_TypeCheck(sem, (PyTypeObject *)SemaphoreType)"),
    "close_keeps_map": ("close() keeps the mapping: a closed lock still works in C",
                        "    lock_drop_psem(self);\n    return PyObject_CallMethodNoArgs", "    return PyObject_CallMethodNoArgs"),
    "mm_freed_reads_state": ("mm_freed reads M_STATE of a reused row (the reference does not)",
                             "    if (id != lk->mm)\n        return 1;", "    if (0)\n        return 1;"),
    "spy_bypassed": ("a replaced semaphore (a test's spy) still used through the old sem_t",
                     "    lock_drop_psem(lk);\n    Py_INCREF(sem);", "    Py_INCREF(sem);\n    if (lk->psem) { Py_XSETREF(lk->sem, sem); return 0; }"),
}


def compile_core(tree: str, source: str) -> str | None:
    """Build ``source`` as the copy's _lockcore; None, or the compiler's
    complaint."""
    sha = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = os.path.join(tree, SRC)
    with open(path, "w") as f:
        f.write(source)
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    out = os.path.join(tree, "uksm", "kernel", "_lockcore" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = cc + ["-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                f'-DLOCKCORE_SOURCE="{sha}"', path, "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode == 0 else p.stderr[-500:]


def _test_objects() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("uksmtest.", "sem.uksmtest."))}


def run_tests(tree: str) -> tuple[bool, str]:
    """The protocol's tests in the copy; a mutant that crashes the test
    process leaves its semaphores behind: removed after the run."""
    before = _test_objects()
    try:
        return _run_tests(tree)
    finally:
        for n in _test_objects() - before:
            try:
                os.unlink(os.path.join("/dev/shm", n))
            except FileNotFoundError:
                pass


def _run_tests(tree: str) -> tuple[bool, str]:
    env = dict(os.environ)
    env.pop("UKSM_LOCKS", None)
    env["PYTHONPATH"] = tree  # the copy's uksm, before the editable install's
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-p", "no:randomly", *TESTS], cwd=tree, env=env, capture_output=True,
                       text=True, timeout=600)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode == 0, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (default: all; --list names them)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the tree copy and print its path")
    a = ap.parse_args()
    if a.list:
        for n, (what, _o, _r) in MUTANTS.items():
            print(f"{n:20} {what}")
        return 0
    unknown = [n for n in a.names if n not in MUTANTS]
    if unknown:
        ap.error(f"no such mutant: {', '.join(unknown)} (--list names them)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True).returncode:
        ap.error(f"{root} is not a git checkout of uksm: run this from one (it mutates a copy of HEAD)")
    tree = tempfile.mkdtemp(prefix="uksm-mutation-c.")
    try:
        arch = subprocess.run(["git", "-C", root, "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tree], input=arch.stdout, check=True)
        with open(os.path.join(tree, SRC)) as f:
            original = f.read()
        err = compile_core(tree, original)
        ok, last = run_tests(tree) if err is None else (False, err)
        print(f"control (unmutated): {'passes' if ok else 'FAILS'}: {last}", flush=True)
        if not ok:
            return 1
        killed = survived = 0
        for name in a.names or list(MUTANTS):
            what, old, new = MUTANTS[name]
            if original.count(old) != 1:
                print(f"{name:20} STALE: its text is not in the source once ({original.count(old)}x)")
                continue
            t0 = time.monotonic()
            err = compile_core(tree, original.replace(old, new))
            if err is not None:
                print(f"{name:20} does not compile: {err.splitlines()[-1] if err else ''}")
                continue
            passed, last = run_tests(tree)
            killed += not passed
            survived += passed
            print(f"{name:20} {'survived' if passed else 'killed  '} {time.monotonic() - t0:5.1f}s  "
                  f"{what}  [{last}]", flush=True)
        total = killed + survived
        print(f"score: {killed}/{total} killed" + (f" ({100 * killed / total:.1f}%)" if total else ""))
        return 0
    finally:
        if a.keep:
            print(f"tree kept: {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
