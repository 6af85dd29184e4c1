"""The code is typed: mypy finds nothing in uksm/, workers/, tools/, dev/;
and it is linted: ruff, with pyproject.toml's rules, finds nothing in the tree."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.timeout(300)
def test_mypy_clean():
    p = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "uksm", "workers",
                        "tools", "dev"], capture_output=True, text=True, cwd=ROOT, timeout=280)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_ruff_clean(tmp_path):
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--config", f"{ROOT}/pyproject.toml"]
    p = subprocess.run([*ruff, "."], capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert p.returncode == 0, p.stdout + p.stderr
    # the same rules catch a planted unsorted, unused import and an over-long line
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nX = " + "1 + " * 40 + "1\n")
    p = subprocess.run([*ruff, "--output-format", "concise", str(bad)], capture_output=True, text=True,
                       timeout=100)
    assert p.returncode == 1 and {"I001", "F401", "E501"} <= set(p.stdout.split()), p.stdout + p.stderr
