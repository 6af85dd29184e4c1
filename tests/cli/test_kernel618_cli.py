"""``uksm up --kernel 6.18`` from the shell (issue 23): ``uksm ctl`` lists
6.18's files and refuses as 6.18's stores (status 2 for EINVAL and a
missing file, 1 for EBUSY), ``uksm task stat`` prints /proc/PID/ksm_stat's
six lines, ``uksm task prctl`` sets and reads PR_SET_MEMORY_MERGE."""
from __future__ import annotations

import pytest

from helpers import cname, uksm
from uksm.kernel.layout import KSM_FIELDS_618


@pytest.mark.timeout(120)
def test_a_618_cluster_from_the_shell(tmp_path):
    name = cname("tk618")
    c = ("--cluster", name)
    up = uksm("up", *c, "--kernel", "6.18", "--pages", "4", "--frames", "256", "--sleep-ms", "0",
              "--pages-to-scan", "500", "--log-dir", str(tmp_path), timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        names = [ln.split(" ", 1)[0] for ln in uksm("ctl", *c, check=True).stdout.splitlines()]
        assert names[:len(KSM_FIELDS_618)] == [n for n, _ in KSM_FIELDS_618]
        assert uksm("ctl", "advisor_mode", *c, check=True).stdout == "advisor_mode [none] scan-time\n"
        assert "kernel 6.18" in uksm("status", *c, check=True).stdout.splitlines()[0]
        for bad, status, text in ((("max_kernel_pages",), 2, "no such file in 6.18"),
                                  (("max_kernel_pages=5",), 2, "no such file in 6.18"),
                                  (("max_page_sharing=1",), 2, "EINVAL"),
                                  (("smart_scan=maybe",), 2, "EINVAL"),
                                  (("general_profit=1",), 2, "EACCES")):
            p = uksm("ctl", *bad, *c)
            assert p.returncode == status and text in p.stderr and "Traceback" not in p.stderr, \
                (bad, p.returncode, p.stderr)
        a = uksm("task", "new", "--pages", "4", "--no-mergeable", *c, check=True).stdout.strip()
        b = uksm("task", "new", "--pages", "4", "--no-mergeable", *c, check=True).stdout.strip()
        for t in (a, b):
            uksm("task", "fill", t, "9", *c, check=True)
            assert uksm("task", "prctl", t, "68", *c, check=True).stdout == "0\n"
            assert uksm("task", "prctl", t, "67", "1", *c, check=True).stdout == "0\n"
        assert uksm("task", "prctl", a, "68", *c, check=True).stdout == "1\n"
        p = uksm("task", "prctl", a, "67", "1", "0", "1", *c)
        assert p.returncode == 1 and "EINVAL" in p.stderr, p.stderr
        uksm("wait", "full-scans", "3", *c, check=True)
        assert uksm("task", "stat", a, *c, check=True).stdout.splitlines() == [
            "ksm_rmap_items 4", "ksm_zero_pages 0", "ksm_merging_pages 4",
            f"ksm_process_profit {4 * 4096 - 4 * 64}", "ksm_merge_any: yes", "ksm_mergeable: yes",
            "rss 4"]
        p = uksm("ctl", "max_page_sharing=10", *c)      # pages_shared is 1
        assert p.returncode == 1 and "EBUSY" in p.stderr, p.stderr
    finally:
        down = uksm("down", *c, timeout=100)
    assert down.returncode == 0, down.stdout + down.stderr
