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


# ---- 4. the fault-path ksm_test_exit check exists under `seed` only ---------------

def cname(tag: str) -> str:
    return f"tfid{tag}{os.getpid() % 100000}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy,installs", [("seed", False), ("shipped", True), ("legacy", True)])
def test_fault_path_exit_check_only_in_the_seed(policy, installs):
    """break_ksm faulting a zapped (pte_none) entry of an exiting mm: the
    seed's do_anonymous_page check installs nothing; 2.6.32 as shipped
    (Andrea's revert: no ksm_test_exit in 2.6.32.67's mm/memory.c) and the
    code before the seed install the page -- their exit_mmap, after
    __ksm_exit, frees it."""
    from helpers import booted
    from util_machine import Space, assert_fsck

    from uksm.exit import mm_users_zero
    from uksm.log import _Null
    from uksm.mmu import FAULT_EXITING, FAULT_OK, handle_mm_fault
    with booted(cname("f" + policy[:2]), run=0, frames=64, va_pages=128, exit_policy=policy) as sup:
        s = Space(sup)
        base = s.mmap(2)
        mm_users_zero(sup.cl, s.mm, _Null())       # exit began: ksm_test_exit(mm)
        sup.cl.task.lock(s.mm.sem)
        try:
            r = handle_mm_fault(sup.cl, s.alloc, s.mm, base >> 12, True, True)
        finally:
            sup.cl.task.unlock(s.mm.sem)
        assert (s.pfn(base) is not None) == installs
        assert r == (FAULT_OK if installs else FAULT_EXITING)
        s.exit()
        assert_fsck(sup)
