"""The shell verbs of issue 10 on a 'uksm up' cluster: uksm task ...,
uksm wait ..., uksm kill TASK --at POINT, and their statuses (0 done, 2
bad input, 1 failed or timed out, 3 a hung task, 4 data: uksm/cli/task.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import planter
from helpers import ROOT, cname, uksm
from uksm.kernel.cluster import Cluster
from uksm.kernel.layout import L_SCAN_SLOT
from uksm.kernel.mm import mm_attach


def cursor_task(name: str) -> str:
    """The task whose mm holds ksmd's cursor (ksm_scan.mm_slot), read from
    the cluster's words and ``uksm status``, not through ``task cursor``."""
    cl = Cluster.attach(name)
    try:
        slot = cl.q[L_SCAN_SLOT]
        mm = None if slot == cl.head else cl.mrow(slot).id
    finally:
        cl.close()
    st = json.loads(uksm("status", "--json", "--cluster", name, check=True).stdout)
    return next((m["worker"] for m in st["mms"] if m["mm"] == mm), "none")


def test_shell_verbs_drive_tasks_like_the_api(tmp_path):
    name = cname("ttask")
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
        # --hex writes the bytes the digits spell; --raw reads them back as bytes
        uksm("task", "write", a, "0x20", "00ff10e2", "--hex", *c, check=True)
        raw = subprocess.run([sys.executable, "-m", "uksm", "task", "read", a, "0x1f", "6", "--raw", *c],
                             capture_output=True, timeout=60, cwd=ROOT)
        assert raw.returncode == 0 and raw.stdout == b"\x07\x00\xff\x10\xe2\x07", raw
        assert uksm("task", "read", a, "0x1f", "6", *c, check=True).stdout.strip() == "0700ff10e207"
        assert "ksm_merging_pages 4" in uksm("task", "stat", b, *c, check=True).stdout
        for bad, text in ((("task", "fill", b, "300"), "fill value 300 is out of range"),
                          (("task", "write", b, "16384", "x"), "segfault"),
                          (("task", "write", b, "0", "zz", "--hex"), "hex"),
                          (("task", "madvise", b, "0", "1", "HUGE"), "unknown advice 'HUGE'"),
                          (("task", "fill", "w99", "1"), "no programmable task 'w99'"),
                          (("kill", a, "--at", "nowhere"), "unknown kill point 'nowhere'")):
            p = uksm(*bad, *c)
            assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr, \
                (bad, p.returncode, p.stderr)
        # ksmd stopped (run=0 keeps the rmap_items): the cursor stays put, and
        # every exit takes the path __ksm_exit chooses, no ksmd freeing a slot first
        uksm("ctl", "run=0", *c, check=True)
        assert uksm("task", "cursor", *c, check=True).stdout.strip() == cursor_task(name)
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
        # its slot (ksm_fork), no rmap_items (ksmd stopped), not at the cursor: the fast path
        assert uksm("task", "exit", f, *c, check=True).stdout.strip() == "fast"
        p = uksm("kill", a, "--at", "cow_after_copy", "--signal", "KILL", *c, check=True)
        assert p.stdout.strip() == "slow"                 # its slot holds rmap_items
        p = uksm("task", "fill", a, "1", *c)
        assert p.returncode == 1 and "was killed (SIGKILL)" in p.stderr, p.stderr
        assert uksm("task", "verify", b, *c, check=True).stdout.startswith("4 pages verified")
        assert uksm("task", "exit", b, *c, check=True).stdout.strip() == "slow"
        uksm("ctl", "run=1", *c, check=True)              # ksmd frees the slots the exits left
        p = uksm("wait", "merged", "--timeout", "0.5", *c)
        assert p.returncode == 1 and "timed out after 0.5s waiting for merging" in p.stderr
        assert "cow_after_copy" in uksm("task", "points", check=True).stdout
    finally:
        down = uksm("down", *c, timeout=100)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "0 mismatches" in down.stdout


def test_shell_verbs_status_4_on_bad_data_and_3_on_a_hung_task(tmp_path):
    """``task verify`` of a task whose page was changed behind its back:
    status 4 (IntegrityError, one line); a request that meets a hung task
    (the legacy __ksm_exit waiting for ksm_thread_mutex, which ksmd holds
    at a delay point longer than the hung-task timeout): status 3."""
    name = cname("ttask34")
    c = ("--cluster", name)
    up = uksm("up", *c, "--pages", "4", "--frames", "256", "--sleep-ms", "5", "--exit-policy", "legacy",
              "--hung-task-timeout", "0.5", "--log-dir", str(tmp_path), timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        a = uksm("task", "new", "--pages", "4", *c, check=True).stdout.strip()
        b = uksm("task", "new", "--pages", "2", *c, check=True).stdout.strip()
        uksm("task", "write", a, "0", "unique bytes", *c, check=True)   # an ordinary page
        uksm("task", "fill", b, "3", *c, check=True)
        st = json.loads(uksm("status", "--json", *c, check=True).stdout)
        mm = next(m["mm"] for m in st["mms"] if m["worker"] == a)
        cl = Cluster.attach(name)
        try:
            fault = planter.plant_page_data(cl, {mm: mm_attach(cl, mm)}, mm)
            p = uksm("task", "verify", a, *c)
            assert p.returncode == 4, (p.stdout, p.stderr)
            assert p.stderr.count("\n") == 1 and "do not hold what was written" in p.stderr, p.stderr
            fault.undo()
        finally:
            cl.close()
        assert uksm("task", "verify", a, *c, check=True).stdout.startswith("4 pages verified")
        uksm("wait", "full-scans", "1", *c, check=True)
        uksm("task", "arm", "ksmd_scan_mmap_sem", "--delay-ms", "4000", *c, check=True)
        p = uksm("task", "kill", b, "--signal", "TERM", *c, timeout=60)
        assert p.returncode == 3, (p.stdout, p.stderr)
        first, *chain = p.stderr.splitlines()   # the error, then the chain of who waits for whom
        assert first.startswith("uksm: ") and "a hung task was reported" in first, p.stderr
        assert "ksm_thread_mutex" in first and "Traceback" not in p.stderr, p.stderr
        assert any(f"worker {b} " in ln and "held by ksmd" in ln for ln in chain), p.stderr
    finally:
        down = uksm("down", *c, timeout=100)
    assert down.returncode in (0, 3), down.stdout + down.stderr   # 3: the hung task was reported
