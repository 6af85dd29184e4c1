"""Fault injection: SIGKILL the task ksmd is scanning while it is inside
__ksm_exit (holding its mmap_sem for write, on the slow path), then check
the machine with fsck and every other task's data, and that ksmd still
merges.  The supervisor recovers the dead task's locks and finishes its
exit on its behalf; ksmd frees its mm_slot."""
import sys

import uksm


def main() -> int:
    with uksm.Machine(frames=512, pages_to_scan=8, sleep_millisecs=5) as m:
        tasks = [m.task(pages=16) for _ in range(4)]
        for i, t in enumerate(tasks):
            t.fill(0x11 * (1 + i % 2))
        m.wait_full_scans(2)
        victim = m.wait(m.scan_cursor, what="ksmd's cursor to be in a task")
        path = victim.kill("KILL", at="ksm_exit_mmap_sem_write")
        print(f"killed {victim.id} (ksmd was scanning it) inside __ksm_exit: path {path}")
        assert path == "slow", path
        fs = m.fsck()
        assert fs["ok"], fs["errors"]
        survivors = [t for t in tasks if t is not victim]
        for t in survivors:
            t.verify()
        survivors[0].fill(0x33)             # new work: ksmd still merges it
        survivors[1].fill(0x33)
        print("after the kill:", m.wait_merged())
        assert m.ksm["pages_sharing"] >= 16
    assert m.report is not None
    print("report:", m.report["status"], m.report["workers"], "fsck", m.report["fsck"]["ok"])
    assert m.report["status"] == 0 and m.report["workers"]["reaped"] == 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
