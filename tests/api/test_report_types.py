"""The report's TypedDicts say what the report holds: the tables the
kernel reads its blocks from agree with them, and a real Machine's
report, blocks and stats have exactly their keys (mypy checks the code
that builds and reads them; this checks the types against the data)."""
from __future__ import annotations

import pytest

import uksm
from uksm.kernel.layout import KSM_FIELDS, STATS_NAMES, KsmBlock, TaskStats
from uksm.kernel.memory import FrameStats
from uksm.proc.supervisor import FsckResult, HostMemory, Integrity


def test_kernel_blocks_agree_with_their_tables() -> None:
    # ksm_block and stats_block spell their keys out (for mypy); the tables
    # uksm ctl and m.ksm read by name must name the same fields, in order
    assert list(KsmBlock.__annotations__) == [n for n, _ in KSM_FIELDS]
    assert list(TaskStats.__annotations__) == list(STATS_NAMES)


@pytest.mark.timeout(60)
def test_a_machines_report_and_stats_have_their_types_keys(tmp_path) -> None:
    with uksm.Machine(frames=256, max_pages=16, max_tasks=4, sleep_millisecs=5,
                      log_dir=str(tmp_path)) as m:
        t = m.task(pages=4)
        t.fill(1)
        m.wait_full_scans(1)
        stats = m.stats()
        assert set(stats) == set(uksm.MachineStats.__annotations__)
        assert set(m.fsck()) == set(FsckResult.__annotations__)
    r = m.report
    assert r is not None
    # run_store: the oom-unmerge scenario's only (NotRequired: under
    # `from __future__ import annotations` __required_keys__ cannot tell)
    assert set(r) == set(uksm.RunReport.__annotations__) - {"run_store"}
    for key, typ in (("ksm", KsmBlock), ("frames", FrameStats), ("memory", HostMemory),
                     ("workers", TaskStats), ("integrity", Integrity), ("fsck", FsckResult)):
        assert set(r[key]) == set(typ.__annotations__), key
    assert r["integrity"]["pages_verified"] == 4 and r["status"] == 0
