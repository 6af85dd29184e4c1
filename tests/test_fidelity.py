"""Fidelity to 2.6.32 (issue 11, "Corrections"): each test pins one thing
the kernel did, checked against 2.6.32.67's mm/ksm.c, mm/memory.c,
mm/oom_kill.c, kernel/exit.c and the 2009 mail thread (citations in
docs/KERNEL-MAP.md and the README)."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path: str) -> str:
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


# ---- 1. shipped's hang is Hugh's 2009 prediction, not "the 2015 race" ---------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", ["README.md", "uksm/exit.py", "docs/DESIGN.md"])
def test_shipped_hang_is_named_for_what_it_is(path):
    """The 2015 report (linux-next only) was one task deadlocking on itself
    through the OOM path; the shipped placement's hang is the one Hugh
    predicted in 2009 and seen on 4.1 stable in 2016."""
    text = read(path)
    assert "2015 race" not in text and "fixed upstream in 2015" not in text
    if path != "docs/DESIGN.md":
        assert "mmap_sem instead" in text or "mmap_sem` instead" in text
