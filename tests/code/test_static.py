"""The code is typed: mypy finds nothing in uksm/, workers/, tools/, dev/."""
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
