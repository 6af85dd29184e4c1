"""max_kernel_pages, 2.6.32's limit on KSM pages (issue 22, item 4).

Default totalram/4 (here frames/4), 0 = no limit; a merge that would make
one more KSM page past the limit is refused as try_to_merge_two_pages
refused it (the page it met stays in the unstable tree); EINVAL as
max_kernel_pages_store gives it, nothing written."""
from __future__ import annotations

import os

import pytest

import uksm
from helpers import uksm as uksm_cli

pytestmark = pytest.mark.timeout(120)


def test_max_kernel_pages_limits_pages_shared_and_zero_lifts_it():
    with uksm.Machine(name=f"tmkp{os.getpid()}", frames=1024, pages_to_scan=500,
                      sleep_millisecs=0) as m:
        assert m.ksm["max_kernel_pages"] == 1024 // 4      # ksm_init: totalram_pages / 4
        m.ksm["max_kernel_pages"] = 2
        with pytest.raises(ValueError, match="EINVAL"):
            m.ksm["max_kernel_pages"] = -1
        cli = uksm_cli("ctl", "--cluster", m.name, "max_kernel_pages=-1")
        assert cli.returncode == 2 and "max_kernel_pages: invalid argument (EINVAL)" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert m.ksm["max_kernel_pages"] == 2                # nothing written
        a, b = m.task(pages=8), m.task(pages=8)
        for t in (a, b):                                     # 8 different pages, each twice
            for i in range(8):
                t.write(i * 4096, bytes([i + 1]) * 4096)
        # two KSM pages, then every other pair is refused: the first page of
        # each stays in the unstable tree, its twin in none (volatile)
        assert m.wait_full_scans(3) == {"pages_shared": 2, "pages_sharing": 2,
                                        "pages_unshared": 6, "pages_volatile": 6}
        assert uksm_cli("ctl", "--cluster", m.name, "max_kernel_pages").stdout.split() == ["max_kernel_pages", "2"]
        m.ksm["max_kernel_pages"] = 0
        assert m.wait_full_scans(3) == {"pages_shared": 8, "pages_sharing": 8,
                                        "pages_unshared": 0, "pages_volatile": 0}
        assert a.read(5 * 4096, 4096) == bytes([6]) * 4096
        assert m.fsck() == {"ok": True, "errors": []}
