"""The shell verbs of issue 10 on a 'uksm up' cluster: uksm task ...,
uksm wait ..., uksm kill TASK --at POINT."""
from __future__ import annotations

import os

from helpers import uksm


def test_shell_verbs_drive_tasks_like_the_api(tmp_path):
    name = f"tcli{os.getpid()}"
    c = ("--cluster", name)
    up = uksm("up", *c, "--pages", "4", "--frames", "256", "--sleep-ms", "5", "--log-dir",
              str(tmp_path), timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        a = uksm("task", "new", "--pages", "4", *c, check=True).stdout.strip()
        b = uksm("task", "new", "--pages", "4", *c, check=True).stdout.strip()
        assert a.startswith("w") and b.startswith("w") and a != b
        uksm("task", "fill", a, "7", *c, check=True)
        uksm("task", "fill", b, "0x07", *c, check=True)
        out = uksm("wait", "full-scans", "2", *c, check=True).stdout.split()
        assert dict(zip(out[::2], map(int, out[1::2]))) == {
            "pages_shared": 1, "pages_sharing": 7, "pages_unshared": 0, "pages_volatile": 0}
        uksm("task", "write", a, "0x10", "hello", *c, check=True)
        assert uksm("task", "read", a, "16", "5", *c, check=True).stdout.strip() == b"hello".hex()
        assert "ksm_merging_pages 4" in uksm("task", "stat", b, *c, check=True).stdout
        for bad, text in ((("task", "fill", b, "300"), "fill value 300 is out of range"),
                          (("task", "write", b, "16384", "x"), "segfault"),
                          (("task", "madvise", b, "0", "1", "HUGE"), "unknown advice 'HUGE'"),
                          (("task", "fill", "w99", "1"), "no programmable task 'w99'"),
                          (("kill", a, "--at", "nowhere"), "unknown kill point 'nowhere'")):
            p = uksm(*bad, *c)
            assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr, \
                (bad, p.returncode, p.stderr)
        assert uksm("task", "cursor", *c, check=True).stdout.strip() in (a, b, "none")
        f = uksm("task", "fork", b, *c, check=True).stdout.strip()     # b's copy, w3
        assert f.startswith("w") and f not in (a, b)
        assert uksm("task", "read", f, "0", "2", *c, check=True).stdout.strip() == "0707"
        rows = [ln.split() for ln in uksm("task", "pagemap", f, "1", "2", *c, check=True)
                .stdout.splitlines()]
        pb = [ln.split() for ln in uksm("task", "pagemap", b, *c, check=True).stdout.splitlines()]
        assert rows[0] == ["page", "present", "frame", "ksm", "wp", "mapcount"] == pb[0]
        # pages 1 and 2 of the copy: b's frames (one KSM page), write-protected
        assert [r[:5] for r in rows[1:]] == [r[:5] for r in pb[2:4]] and rows[1][3:5] == ["1", "1"]
        p = uksm("task", "pagemap", f, "4", *c)
        assert p.returncode == 2 and "first page 4 is out of range (0..3)" in p.stderr, p.stderr
        assert uksm("task", "exit", f, *c, check=True).stdout.strip() in ("fast", "slow", "none")
        p = uksm("kill", a, "--at", "cow_after_copy", "--signal", "KILL", *c, check=True)
        assert p.stdout.strip() in ("slow", "none")
        p = uksm("task", "fill", a, "1", *c)
        assert p.returncode == 1 and "was killed (SIGKILL)" in p.stderr, p.stderr
        assert uksm("task", "verify", b, *c, check=True).stdout.startswith("4 pages verified")
        assert uksm("task", "exit", b, *c, check=True).stdout.strip() in ("fast", "slow", "none")
        p = uksm("wait", "merged", "--timeout", "0.5", *c)
        assert p.returncode == 1 and "timed out after 0.5s waiting for merging" in p.stderr
        assert "cow_after_copy" in uksm("task", "points", check=True).stdout
    finally:
        down = uksm("down", *c, timeout=100)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "0 mismatches" in down.stdout
