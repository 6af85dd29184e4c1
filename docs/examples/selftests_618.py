"""Four of today's KSM test programs, written as a user's script on a 6.18
machine (``uksm.Machine(kernel="6.18")``), each with the numbers its
source asserts of the kernel:

- ksm_tests.c ``-M -p 10`` (check_ksm_merge): 10 pages of '*' merge into
  1 KSM page shared by 9 more mappings;
- ksm_tests.c ``-Z -p 10 -z 1`` (check_ksm_zero_page_merge): with
  use_zero_pages (4.11) ten zero pages map the zero page: 0 shared, 0
  sharing, ksm_zero_pages 10 (6.6);
- ksm_functional_tests.c test_prctl_fork: PR_SET_MEMORY_MERGE (6.4) is
  inherited over fork, and PR_SET_MEMORY_MERGE 0 clears it;
- LTP ksm07 (6.7's smart scan): a lonely page is skipped in at least half
  of the full scans.

tools/twin.py --kernel 6.18 runs the same programs (and more) here and on
the machine's own KSM, side by side (docs/TWIN.md)."""
import errno
import sys

import uksm

PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68


def expect(what: str, got: object, want: object) -> None:
    print(f"  {what}: {got}")
    assert got == want, f"{what}: expected {want}, got {got}"


def ksm_tests_M(m: uksm.Machine) -> None:
    print("ksm_tests -M -p 10")
    t = m.task(pages=10, mergeable=False)
    t.fill(ord("*"))
    t.madvise(0, 10, "MERGEABLE")
    k = m.wait_full_scans(3)
    expect("pages_shared, pages_sharing", (k["pages_shared"], k["pages_sharing"]), (1, 9))
    t.exit()


def ksm_tests_Z1(m: uksm.Machine) -> None:
    print("ksm_tests -Z -p 10 -z 1")
    m.ksm["run"] = 2                      # ksm_tests' ksm_stop: no KSM page left ...
    m.ksm["use_zero_pages"] = 1           # ... before the knob is written
    m.ksm["run"] = 1
    t = m.task(pages=10, mergeable=False)
    t.fill(0)
    t.madvise(0, 10, "MERGEABLE")
    k = m.wait_full_scans(3)
    expect("pages_shared, pages_sharing", (k["pages_shared"], k["pages_sharing"]), (0, 0))
    expect("ksm_zero_pages", (m.ksm["ksm_zero_pages"], t.stat()["ksm_zero_pages"]), (10, 10))
    expect("frames mapped", len({p["frame"] for p in t.pagemap()}), 1)   # the zero page
    t.exit()
    m.ksm["use_zero_pages"] = 0


def test_prctl_fork(m: uksm.Machine) -> None:
    print("ksm_functional_tests test_prctl_fork")
    t = m.task(pages=4, mergeable=False)
    t.prctl(PR_SET_MEMORY_MERGE, 1)
    expect("parent PR_GET_MEMORY_MERGE", t.prctl(PR_GET_MEMORY_MERGE), 1)
    c = t.fork()
    expect("child PR_GET_MEMORY_MERGE", c.prctl(PR_GET_MEMORY_MERGE), 1)
    c.prctl(PR_SET_MEMORY_MERGE, 0)
    expect("child after PR_SET_MEMORY_MERGE 0", c.prctl(PR_GET_MEMORY_MERGE), 0)
    try:
        t.prctl(PR_SET_MEMORY_MERGE, 1, 1)         # arg3 must be 0
    except OSError as e:
        expect("arg3 != 0", errno.errorcode[e.errno or 0], "EINVAL")
    else:
        raise AssertionError("PR_SET_MEMORY_MERGE with arg3 1 did not fail")
    c.exit()
    t.exit()


def ltp_ksm07(m: uksm.Machine) -> None:
    print("LTP ksm07 (smart_scan 1)")
    m.ksm["run"] = 2
    t = m.task(pages=1, mergeable=False)
    t.fill(ord("a"))
    t.madvise(0, 1, "MERGEABLE")
    skipped0, scans0 = m.ksm["pages_skipped"], m.ksm["full_scans"]   # ksmd stopped (run=2)
    m.ksm["run"] = 1
    m.wait_full_scans(20)
    m.ksm["run"] = 0                      # LTP reads with ksmd stopped
    scans, skipped = m.ksm["full_scans"] - scans0, m.ksm["pages_skipped"] - skipped0
    print(f"  {scans} full scans, {skipped} pages skipped")
    assert skipped >= scans // 2, f"pages_skipped {skipped} < half of {scans} full scans"
    m.ksm["run"] = 1                      # ksmd frees the slot of the exit below (its slow path)
    t.exit()


def main() -> int:
    with uksm.Machine(kernel="6.18", frames=256, pages_to_scan=100, sleep_millisecs=0) as m:
        m.ksm["smart_scan"] = 0               # ksm_tests run with it off, as LTP's ksm01 sets it
        ksm_tests_M(m)
        ksm_tests_Z1(m)
        test_prctl_fork(m)
        m.ksm["smart_scan"] = 1
        ltp_ksm07(m)
    assert m.report is not None
    print(f"status {m.report['status']}, fsck {'clean' if m.report['fsck']['ok'] else m.report['fsck']}")
    return m.report["status"]


if __name__ == "__main__":
    sys.exit(main())
