"""A KSM test program's counter walk, as LTP's ksm01 does it
(linux-test-project/ltp, testcases/kernel/mem/lib/mem.c at 35b846dd,
create_same_memory() and ksm_group_check(): three children,
their contents changed step by step, the counters checked after two full
scans each time with ksmd stopped for the reading, then run=2 and run=0).
The numbers are the ones LTP expects of the kernel."""
import sys

import uksm

PAGES = 8                       # per task (LTP: size MB of pages)
TOTAL = 3 * PAGES
STEPS = [  # (contents of the three tasks, pages_shared, pages_sharing, pages_unshared)
    ("caa", 2, TOTAL - 2, 0),   # LTP: {'c'}, {'a'}, {'a'}
    ("cba", 3, TOTAL - 3, 0),
    ("ddd", 1, TOTAL - 1, 0),
    ("dDd", 1, TOTAL - 2, 1),   # D: 'd' but the last byte 'e' (one unique page)
]


def check(m: uksm.Machine, want: dict) -> None:
    run = m.ksm["run"]
    m.ksm["run"] = 0            # LTP's final_group_check: stop the scan while reading
    got = {k: run if k == "run" else m.ksm[k] for k in want}
    m.ksm["run"] = run
    print(f"  run {run}: {got}")
    assert got == want, f"expected {want}, got {got}"


def main() -> int:
    with uksm.Machine(frames=4 * TOTAL, pages_to_scan=TOTAL, sleep_millisecs=0) as m:
        tasks = [m.task(pages=PAGES) for _ in range(3)]
        for n, (contents, shared, sharing, unshared) in enumerate(STEPS):
            for t, c in zip(tasks, contents):
                t.fill(ord(c.lower()))
                if c.isupper():
                    t.write(PAGES * 4096 - 1, b"e")
            m.wait_full_scans(2)
            print(f"step {n + 1} {contents}")
            check(m, {"pages_shared": shared, "pages_sharing": sharing,
                      "pages_unshared": unshared, "pages_volatile": 0})
        m.ksm["run"] = 2        # unmerge everything: returns when done
        check(m, {"run": 2, "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
                  "pages_volatile": 0})
        m.ksm["run"] = 0
        check(m, {"run": 0, "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
                  "pages_volatile": 0})
        for t in tasks:
            t.verify()
    assert m.report is not None and m.report["status"] == 0, m.report
    return 0


if __name__ == "__main__":
    sys.exit(main())
