"""/sys/kernel/mm/ksm per kernel (issue 23, step 2): under 6.18 ``m.ksm``
and ``uksm ctl`` show 6.18's files and refuse values as its ``*_store``
do; under 2.6.32 nothing changes.  The refusals are the ones this
machine's 6.18 gave for the same writes (tools/twin.py --kernel 6.18
checks the knobs against it again)."""
from __future__ import annotations

import errno
import os

import pytest

import uksm
from uksm.kernel.layout import K_RMAP_ITEMS, KSM_FIELDS, KSM_FIELDS_618, KsmBlock618
from uksm.proc.control import CTL_NAMES, CTL_OWN
from uksm.proc.sysfs618 import StoreError, validate

pytestmark = pytest.mark.timeout(120)

# (knob, value written, errno this machine's 6.18 answered, or the value it then read)
STORES = [
    ("pages_to_scan", "+5", 5), ("pages_to_scan", " 5", "EINVAL"), ("pages_to_scan", "5\n", 5),
    ("pages_to_scan", "0x10", "EINVAL"), ("pages_to_scan", "4294967296", "EINVAL"),
    ("pages_to_scan", "-1", "EINVAL"), ("pages_to_scan", "0", 0),
    ("max_page_sharing", "1", "EINVAL"), ("max_page_sharing", "-3", "EINVAL"),
    ("max_page_sharing", "-0", "EINVAL"), ("max_page_sharing", "2147483648", "ERANGE"),
    ("max_page_sharing", "abc", "EINVAL"), ("max_page_sharing", "+256", 256),
    ("max_page_sharing", "256\n\n", "EINVAL"),
    ("merge_across_nodes", "2", "EINVAL"), ("merge_across_nodes", "x", "EINVAL"),
    ("merge_across_nodes", "18446744073709551616", "ERANGE"), ("merge_across_nodes", "+1", 1),
    ("merge_across_nodes", "-0", "EINVAL"),
    ("use_zero_pages", "yes", 1), ("use_zero_pages", "2", "EINVAL"), ("use_zero_pages", "on", 1),
    ("smart_scan", "maybe", "EINVAL"), ("smart_scan", "Y", 1), ("smart_scan", "d", 0),
    ("smart_scan", "e", 1), ("smart_scan", "of", 0), ("smart_scan", "o", "EINVAL"),
    ("smart_scan", "\n", "EINVAL"),
    ("advisor_mode", "scan_time", "EINVAL"), ("advisor_mode", " none", "EINVAL"),
    ("advisor_mode", "none\n", "none"),
    ("advisor_target_scan_time", "0", "EINVAL"), ("advisor_max_cpu", "1000", 1000),
    ("advisor_max_cpu", "18446744073709551615", 4294967295), ("advisor_min_pages_to_scan", "0", 0),
    ("stable_node_chains_prune_millisecs", "0", 0),
    ("stable_node_chains_prune_millisecs", "4294967296", "EINVAL"),
    ("run", "3", "EINVAL"), ("run", "+0", 0), ("sleep_millisecs", "4294967295", 4294967295),
]


@pytest.mark.parametrize("name,raw,want", STORES)
def test_each_store_parses_as_this_machines_618(name, raw, want):
    if isinstance(want, str) and want.startswith("E"):
        with pytest.raises(StoreError) as e:
            validate(name, raw, None)
        assert e.value.errno_name == want
    else:
        assert validate(name, raw, None) == want


def test_the_block_of_each_kernel_and_its_keyerrors():
    assert list(KsmBlock618.__annotations__) == [n for n, _ in KSM_FIELDS_618]
    with uksm.Machine(name=f"s618{os.getpid()}", kernel="6.18", frames=256, max_pages=16,
                      pages_to_scan=500, sleep_millisecs=0) as m:
        assert m.kernel == "6.18"
        assert list(m.ksm) == [n for n, _ in KSM_FIELDS_618] + list(CTL_OWN)
        assert "max_kernel_pages" not in list(m.ksm)
        with pytest.raises(KeyError, match="no such file in 6.18"):
            m.ksm["max_kernel_pages"]
        with pytest.raises(KeyError):
            m.ksm["max_kernel_pages"] = 5
        # the initial values of 6.18's mm/ksm.c (and of this machine's sysfs)
        assert {k: m.ksm[k] for k in ("max_page_sharing", "stable_node_chains_prune_millisecs",
                                      "merge_across_nodes", "use_zero_pages", "smart_scan",
                                      "advisor_mode", "advisor_max_cpu", "advisor_target_scan_time",
                                      "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")} == {
            "max_page_sharing": 256, "stable_node_chains_prune_millisecs": 2000,
            "merge_across_nodes": 1, "use_zero_pages": 0, "smart_scan": 1,
            "advisor_mode": "[none] scan-time", "advisor_max_cpu": 70,
            "advisor_target_scan_time": 200, "advisor_min_pages_to_scan": 500,
            "advisor_max_pages_to_scan": 30000}
        with pytest.raises(PermissionError):
            m.ksm["general_profit"] = 1
        # set_advisor_defaults: scan-time starts pages_to_scan at the minimum,
        # and refuses writes to it; none puts back DEFAULT_PAGES_TO_SCAN
        m.ksm["advisor_mode"] = "scan-time"
        assert (m.ksm["advisor_mode"], m.ksm["pages_to_scan"]) == ("none [scan-time]", 500)
        with pytest.raises(ValueError, match="EINVAL"):
            m.ksm["pages_to_scan"] = 1000
        assert m.ksm["pages_to_scan"] == 500
        m.ksm["advisor_mode"] = "none"
        assert m.ksm["pages_to_scan"] == 100
        m.ksm["pages_to_scan"] = 500
        m.ksm["smart_scan"] = 0            # (smart_scan would skip pages)
        a, b = m.task(pages=8), m.task(pages=8)
        a.fill(7)
        b.fill(7)
        k = m.wait_full_scans(3)
        assert k["pages_shared"] == 1 and k["pages_sharing"] == 15
        items = m._t().cl.q[K_RMAP_ITEMS]
        # general_profit_show: (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64
        assert m.ksm["general_profit"] == (15 + m.ksm["ksm_zero_pages"]) * 4096 - items * 64
        for knob, value in (("max_page_sharing", 10), ("merge_across_nodes", 0)):
            with pytest.raises(OSError) as e:
                m.ksm[knob] = value
            assert e.value.errno == errno.EBUSY
        assert (m.ksm["max_page_sharing"], m.ksm["merge_across_nodes"]) == (256, 1)
        m.ksm["max_page_sharing"] = 256    # its own value: no EBUSY ("== knob) return count;")
        m.ksm["run"] = 2
        m.ksm["max_page_sharing"] = 10     # no KSM page left
        assert m.ksm["max_page_sharing"] == 10
    # the report's block is 6.18's too
    assert m.report is not None and m.report["kernel"] == "6.18"
    assert list(m.report["ksm"]) == [n for n, _ in KSM_FIELDS_618]


def test_2632_shows_its_own_files_and_none_of_618s():
    with uksm.Machine(name=f"s26{os.getpid()}", frames=64, max_pages=16) as m:
        assert m.kernel == "2.6.32"
        assert list(m.ksm) == list(CTL_NAMES) == [n for n, _ in KSM_FIELDS] + list(CTL_OWN)
        for knob in ("max_page_sharing", "smart_scan", "general_profit", "advisor_mode"):
            with pytest.raises(KeyError, match="no such file in 2.6.32"):
                m.ksm[knob]
            with pytest.raises(KeyError):
                m.ksm[knob] = 1
        assert m.ksm["max_kernel_pages"] == 16
        with pytest.raises(ValueError):    # 2.6.32's strict_strtoul: no '+'
            m.ksm["pages_to_scan"] = "+5"
