"""dev/checkers_off.py switches a checker off in every process of a
pytest run; the tests that fail then are the ones that would notice it
gone (issue 16).  Here, on the two tests of `uksm run`'s verify."""
from __future__ import annotations

import re
import sys

import pytest

from helpers import run_group


@pytest.mark.timeout(200)
def test_verify_off_fails_the_verify_tests_and_the_control_is_clean():
    p = run_group([sys.executable, "dev/checkers_off.py", "--checker", "none", "--checker", "verify",
                   "--tests", "tests/checkers/test_planted_run.py", "-v"], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^(none|verify)\s+(\d+)\s+(\d+)\s", p.stdout, re.M)}
    assert rows["none"][1] == 0 and rows["none"][0] == rows["verify"][0] >= 4, p.stdout
    assert rows["verify"][1] == 2, p.stdout
    assert "test_verify_sees_a_changed_byte" in p.stdout and "[verify]" in p.stdout
