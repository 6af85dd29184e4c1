"""prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE) and /proc/PID/ksm_stat
under 6.18 (issue 23, steps 3 and 4), from the test thread
(``util_machine.Space``): the VMA flags, MMF_VM_MERGE_ANY, new mappings,
fork, and the EINVAL rules of kernel/sys.c; under 2.6.32 neither exists."""
from __future__ import annotations

import pytest

from helpers import booted, cname
from uksm.errors import SyscallError
from uksm.kernel.ksm_stat import ksm_stat, ksm_stat_text
from uksm.kernel.layout import M_FLAGS, MMF_VM_MERGE_ANY, MMF_VM_MERGEABLE, VM_MERGEABLE
from uksm.kernel.syscalls import MADV_MERGEABLE, PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE, sys_prctl
from util_machine import PAGE, Space

pytestmark = pytest.mark.timeout(60)


def prctl(s: Space, *args: int) -> int:
    return sys_prctl(s.cl, s.mm, s.alloc, *args)


def mergeable_areas(s: Space) -> list[bool]:
    return [bool(f & VM_MERGEABLE) for (_i, _s, _e, f) in s.mm.vmas()]


def test_merge_any_now_and_later_then_all_unmerged_and_inherited():
    with booted(cname("tpr6"), run=0, frames=64, va_pages=256, kernel="6.18") as sup:
        s = Space(sup)
        a = s.mmap(4)
        b = s.mmap(4)
        s.mergeable(b, 4)               # one area by madvise, one not
        assert mergeable_areas(s) == [False, True] or mergeable_areas(s) == [True, False]
        assert prctl(s, PR_GET_MEMORY_MERGE) == 0
        for bad in ((PR_SET_MEMORY_MERGE, 1, 1), (PR_SET_MEMORY_MERGE, 1, 0, 0, 7),
                    (PR_GET_MEMORY_MERGE, 1), (PR_GET_MEMORY_MERGE, 0, 0, 1), (66, 1), (69,)):
            with pytest.raises(SyscallError) as e:
                prctl(s, *bad)
            assert e.value.errno_name == "EINVAL"
        assert prctl(s, PR_SET_MEMORY_MERGE, 1) == 0
        assert prctl(s, PR_GET_MEMORY_MERGE) == 1
        assert s.field(M_FLAGS) & (MMF_VM_MERGE_ANY | MMF_VM_MERGEABLE) == MMF_VM_MERGE_ANY | MMF_VM_MERGEABLE
        # every area mergeable now (the two, alike, are one area again), and later
        assert mergeable_areas(s) == [True]
        s.mmap(2)
        assert mergeable_areas(s) and all(mergeable_areas(s))
        stat = ksm_stat(s.cl, s.mm.row, s.mm)
        assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == ("yes", "yes")
        s.write(a, b"x")
        # a child inherits MMF_VM_MERGE_ANY (ksm_fork, 6.4; MMF_INIT_MASK since 6.7)
        child, err = s.fork()
        assert err == 0 and child is not None
        assert prctl(child, PR_GET_MEMORY_MERGE) == 1 and all(mergeable_areas(child))
        child.exit()
        # 0: every area unmerged and not mergeable any more, the madvised one too
        assert prctl(s, PR_SET_MEMORY_MERGE, 0) == 0
        assert prctl(s, PR_GET_MEMORY_MERGE) == 0 and not any(mergeable_areas(s))
        s.mmap(1)
        assert not any(mergeable_areas(s))
        assert prctl(s, PR_SET_MEMORY_MERGE, 0) == 0    # again: nothing to do, no error
        stat = ksm_stat(s.cl, s.mm.row, s.mm)
        assert list(stat) == ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages",
                              "ksm_process_profit", "ksm_merge_any", "ksm_mergeable", "rss"]
        assert ksm_stat_text(stat).splitlines()[4:6] == ["ksm_merge_any: no", "ksm_mergeable: no"]
        s.exit()


def test_2632_has_no_such_option_and_its_stat_is_as_before():
    with booted(cname("tpr2"), run=0, frames=64, va_pages=64) as sup:
        s = Space(sup)
        a = s.mmap(2)
        s.madvise(a, 2, MADV_MERGEABLE)
        for opt in (PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE):
            with pytest.raises(SyscallError, match="2.6.32 has no PR_SET_MEMORY_MERGE"):
                prctl(s, opt, 1 if opt == PR_SET_MEMORY_MERGE else 0)
        assert not s.field(M_FLAGS) & MMF_VM_MERGE_ANY
        assert list(ksm_stat(s.cl, s.mm.row, s.mm)) == ["ksm_rmap_items", "ksm_merging_pages", "rss"]
        s.write(a, b"y" * PAGE)
        s.exit()
