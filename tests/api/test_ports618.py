"""The public 6.x KSM test programs, ported (issue 23, step 5): each case
of tools/twin618.py -- ksm_functional_tests.c test_unmerge,
test_unmerge_discarded, test_prctl, test_prctl_fork, test_prctl_unmerge;
ksm_tests.c -U and -Z (use_zero_pages 0 and 1), test_unmerge_zero_pages;
LTP ksm01 (smart_scan 0), ksm05 and ksm07 (smart_scan 1) -- runs on
``Machine(kernel="6.18")`` and must give what its source asserts.
(tools/twin.py --kernel 6.18 runs the same cases on this machine's kernel
too: docs/TWIN.md.)"""
from __future__ import annotations

import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))   # the cases live with the twin, never installed
import twin618

CASES = twin618.cases()
# what else each case must show (the numbers the kernel here gave: docs/TWIN.md)
EXACT = {
    "unmerge": {("merge", "A ksm_pages"): 512, ("merge", "A dups"): True, ("unmerge", "A ksm_pages"): 0},
    "unmerge_discarded": {("discard-unmerge", "A present"): 256, ("discard-unmerge", "A ksm_pages"): 0},
    "prctl_fork": {("fork-merge", "C ksm_pages"): 512, ("fork-merge", "A ksm_merge_any"): "yes",
                   ("fork-merge", "C ksm_merge_any"): "yes", ("clear", "A ksm_merge_any"): "no"},
    "prctl_unmerge": {("merge", "A ksm_pages"): 512, ("unmerge", "A ksm_pages"): 0,
                      ("unmerge", "A ksm_mergeable"): "no"},
    "ksm_tests-U": {("merge", "pages_shared"): 1, ("merge", "pages_sharing"): 1},
    "ksm_tests-Z0": {("merge", "A dups"): True},
    "ksm_tests-Z1": {("merge", "A dups"): True, ("merge", "A ksm_pages"): 0},   # the zero page is no KSM page
    "unmerge_zero_pages": {("merge", "ksm_zero_pages"): 512, ("write-half", "A present"): 512},
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CASES))
def test_ported_case_gives_what_its_source_asserts(name):
    case = CASES[name]
    snaps = twin618.run_uksm(case, lambda _msg: None)
    rows = twin618.judge(case, None, snaps)
    failed = [(r["step"], r["field"], r["uksm"], r["assert"]) for r in rows
              if "assert" in r and not r["uksm_holds"]]
    assert not failed, failed
    assert any("assert" in r for r in rows)
    steps = [s.name for s in case.steps]
    for (step, field), want in EXACT.get(name, {}).items():
        assert snaps[steps.index(step)][field] == want, (step, field)
