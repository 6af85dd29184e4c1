"""dev/profile_fault.py runs at a tiny size and prints its breakdown of a
first-touch fault and a mapped page write (no timed assertion: the pieces
are only checked to be there and to add up)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import ROOT, run_group

TOOL = os.path.join(ROOT, "dev", "profile_fault.py")


@pytest.mark.timeout(60)
def test_the_pieces_are_there_and_add_up():
    p = run_group([sys.executable, TOOL, "--pages", "48", "--repeat", "1", "--json"], 50)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["list_size"] > 1, "the worker's list refills in batches"
    assert r["refill_host"] > 0 and r["first_touch"] > r["refill_host"] + r["pair_mmap_sem"]
    parts = (r["refill_host"] + r["refill_python"] + r["pair_mmap_sem"] + 2 * r["pair_pte_lock"]
             + r["rest_first_touch"])
    assert parts == pytest.approx(r["first_touch"])
    assert r["rest_mapped_write"] + r["pair_pte_lock"] + r["copy"] == pytest.approx(r["mapped_write"])
    assert all(r[k] > 0 for k in ("pair_pte_lock", "pair_bare_semaphore", "copy", "find_vma"))


@pytest.mark.timeout(60)
def test_text_output_and_bad_input():
    p = run_group([sys.executable, TOOL, "--pages", "16", "--repeat", "1"], 50)
    assert p.returncode == 0, p.stdout + p.stderr
    for line in ("first touch (MMU.write of a fresh page)", "list refill, host", "mapped page write"):
        assert line in p.stdout, p.stdout
    bad = run_group([sys.executable, TOOL, "--pages", "1"], 20)
    assert bad.returncode == 2 and "--pages >= 2" in bad.stderr and "Traceback" not in bad.stderr
