"""6.18's smart scan rule and scan-time advisor (uksm.kernel.ksm618), on
their own: the numbers of mm/ksm.c's should_skip_rmap_item / skip_age
(6.7, "mm/ksm: add "smart" page scanning mode") and scan_time_advisor
(6.8, 4e5fa4f5eff6 "mm/ksm: add ksm advisor"), worked by hand from the
source.  The machine-level cases are tests/api/test_618_zero_smart.py."""
from __future__ import annotations

from array import array

import pytest

from uksm.kernel.ksm618 import U8_MAX, Advisor, lonely_page_looks, should_skip_rmap_item, skip_age
from uksm.kernel.layout import (
    K_ADVISOR_MAX_CPU,
    K_ADVISOR_MAX_PAGES_TO_SCAN,
    K_ADVISOR_MODE,
    K_ADVISOR_TARGET_SCAN_TIME,
    K_PAGES_TO_SCAN,
    KSM_END,
)

pytestmark = pytest.mark.timeout(30)


class _Slot:
    def __init__(self) -> None:
        self.age = bytearray(1)
        self.skips = bytearray(1)


class _Ksmd:
    """What should_skip_rmap_item touches of ksmd: pages_skipped and
    remove_rmap_item_from_tree (a skipped page leaves its tree)."""

    def __init__(self) -> None:
        self.pages_skipped = 0
        self.removed = 0

    def remove_rmap_item_from_tree(self, _st: object, _vpn: int) -> None:
        self.removed += 1


def test_skip_age_steps():
    # "if (age <= 3) return 1; if (age <= 5) return 2; if (age <= 8) return 4; return 8;"
    assert [skip_age(a) for a in range(12)] == [1, 1, 1, 1, 2, 2, 4, 4, 4, 8, 8, 8]
    assert skip_age(U8_MAX) == 8


def test_one_lonely_page_is_skipped_by_the_rule():
    """One rmap_item met at every full scan: scans 1-3 (ages 0-2) never
    skip; then one look and 1 skip, one look and 2, one and 4, then one
    look in every 9 for ever.  Each skip takes it out of its tree."""
    ksmd, st = _Ksmd(), _Slot()
    skipped = [should_skip_rmap_item(ksmd, st, 0) for _ in range(40)]  # type: ignore[arg-type]
    looked = [k + 1 for k, s in enumerate(skipped) if not s]
    assert looked == [1, 2, 3, 4, 6, 9, 14, 23, 32]
    assert ksmd.pages_skipped == ksmd.removed == 31
    # LTP ksm07's check over any window of a few scans past the start
    assert ksmd.pages_skipped >= 40 * 50 // 100


def test_lonely_page_looks_is_the_rule():
    """The closed form (LTP ksm07's expectation in tools/twin618.py and
    the machine tests) against the rule's own code, over 300 scans."""
    ksmd, st = _Ksmd(), _Slot()
    looks = 0
    for scans in range(1, 300):
        looks += not should_skip_rmap_item(ksmd, st, 0)  # type: ignore[arg-type]
        assert lonely_page_looks(scans) == looks, scans


def test_age_stops_at_u8_max():
    ksmd, st = _Ksmd(), _Slot()
    for _ in range(300):
        should_skip_rmap_item(ksmd, st, 0)  # type: ignore[arg-type]
    assert st.age[0] == U8_MAX


def _q() -> array:
    q = array("q", bytes(8 * KSM_END))
    q[K_PAGES_TO_SCAN] = 500          # set_advisor_defaults: ksm_advisor_min_pages_to_scan
    q[K_ADVISOR_TARGET_SCAN_TIME] = 200
    q[K_ADVISOR_MAX_CPU] = 70
    q[K_ADVISOR_MAX_PAGES_TO_SCAN] = 30000
    q[K_ADVISOR_MODE] = 1
    return q


def test_scan_time_advisor_by_hand():
    """Three full scans through scan_time_advisor's integer arithmetic:
    the CPU floor (KSM_ADVISOR_MIN_CPU 10 x per-page cost) holds the first
    two, the ewma'd change carries over, the max_cpu cap the third."""
    q, adv = _q(), Advisor()
    adv.follow_mode(q)
    # 2.5 s, 400 ms of CPU: scan_time 2, cpu 20%, factor 10000, change
    # ewma(0, 100) = 30, pages 500*100/10000*30/100 = 1, per-page cost
    # 500/20 = 25: max(1, 25*10) = 250
    adv.start_scan = 1_000_000_000
    adv.scan_time_advisor(q, 3_500_000_000, 400_000_000)
    assert (q[K_PAGES_TO_SCAN], adv.scan_time, adv.change, adv.cpu_time) == (250, 2, 30, 400_000_000)
    # 1.2 s, 100 ms: scan_time 1, cpu 10%, change ewma(30, 50) = 36, pages 0, cost 25: 250
    adv.start_scan = 10_000_000_000
    adv.scan_time_advisor(q, 11_200_000_000, 500_000_000)
    assert (q[K_PAGES_TO_SCAN], adv.scan_time, adv.change) == (250, 1, 36)
    # a 1 s target, 3 s and 2.7 s of CPU: cpu 90%, factor 33, change
    # ewma(36, 300) = 115, pages 757*115/100 = 870, cost 250/90 = 2: min(870, 140) = 140
    q[K_ADVISOR_TARGET_SCAN_TIME] = 1
    adv.start_scan = 20_000_000_000
    adv.scan_time_advisor(q, 23_000_000_000, 3_200_000_000)
    assert (q[K_PAGES_TO_SCAN], adv.scan_time, adv.change) == (140, 3, 115)


def test_advisor_mode_change_zeroes_the_context():
    q, adv = _q(), Advisor()
    adv.follow_mode(q)
    adv.start_scan = 1_000_000_000
    adv.scan_time_advisor(q, 3_500_000_000, 400_000_000)
    q[K_ADVISOR_MODE] = 0
    adv.follow_mode(q)
    assert (adv.scan_time, adv.change, adv.cpu_time, adv.start_scan) == (0, 0, 0, 0)
    before = q[K_PAGES_TO_SCAN]
    adv.advisor_start_scan(q)
    adv.advisor_stop_scan(q)       # advisor none: pages_to_scan is left alone
    assert q[K_PAGES_TO_SCAN] == before
