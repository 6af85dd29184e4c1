"""tools/twin.py (issue 22 item 7): the same walk on uksm and on this
machine's KSM agrees field by field, and the host's knobs are put back.
Where the host has no KSM the twin itself says so in one line (status 2),
checked here against a sysfs folder that does not exist."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import HOST_KSM, RESTORED, ROOT, host_ksm_missing, knobs, require, run_group

TWIN = os.path.join(ROOT, "tools", "twin.py")
def twin(*args: str, timeout: float = 60):
    return run_group([sys.executable, TWIN, *args], timeout)


def twin618_rows(cases: list[str], timeout: float) -> dict[tuple[str, str, str], tuple[object, object]]:
    """``twin.py --kernel 6.18`` on ``cases``: every row agrees and the
    status is 0; returns (case, step, field) -> (kernel, uksm)."""
    p = twin("--kernel", "6.18", *(a for c in cases for a in ("--case", c)), "--json", "-q", timeout=timeout)
    r = json.loads(p.stdout) if p.stdout.startswith("{") else None
    assert r is not None, f"status {p.returncode}\n{p.stdout}\n{p.stderr}"
    bad = [x for x in r["rows"] if not x["agree"]]
    assert not bad and p.returncode == 0, json.dumps(bad, indent=1) + p.stderr
    return {(x["case"], x["step"], x["field"]): (x["kernel"], x["uksm"]) for x in r["rows"]}


@pytest.mark.timeout(90)
def test_twin_agrees_with_the_host_kernel():
    why = host_ksm_missing()
    if why:
        pytest.skip(why)
    p = twin("--json", "-q", timeout=70)
    r = json.loads(p.stdout) if p.stdout.startswith("{") else None
    assert r is not None, f"status {p.returncode}\n{p.stdout}\n{p.stderr}"
    bad = [x for x in r["rows"] if not x["agree"]]
    assert not bad and p.returncode == 0, json.dumps(bad, indent=1) + p.stderr
    got = {(x["step"], x["field"]): (x["kernel"], x["uksm"]) for x in r["rows"]}
    # the walk did what it says, on both: merged, COW, unmerged, forked, exited
    assert got["merge", "pages_sharing"] == (60, 60)
    assert got["cow", "A ksm_merging_pages"] == (31, 31)
    assert got["unmerge-B", "B ksm_rmap_items"] == (0, 0)
    assert got["fork-A", "C ksm_merging_pages"] == (31, 31)
    assert got["fork-A", "pages_sharing"] == (58, 58)
    assert got["exit-C", "pages_sharing"] == (27, 27)
    assert "C0-4" in got["fork-A", "ksm"][0] and "C0" not in got["cow-C", "ksm"][0]
    assert knobs() == {k: v for k, v in RESTORED.items() if k in knobs()}


@pytest.mark.timeout(90)
def test_twin_618_cases_agree_with_the_host_kernel():
    """--kernel 6.18 (issue 23): two of the ported cases (the prctl rules,
    ksm_tests -U) on Machine(kernel="6.18") and on this kernel, row by row;
    the knobs put back.  (The full run, every case: docs/TWIN.md.)"""
    why = host_ksm_missing()
    if why:
        pytest.skip(why)
    got = twin618_rows(["prctl", "ksm_tests-U"], timeout=70)
    assert got["prctl", "set-get", "A prctl#1"] == (1, 1)
    assert got["prctl", "set-get", "A prctl#4"] == (-22, -22)       # arg3 != 0: EINVAL
    assert got["ksm_tests-U", "write", "pages_sharing"] == (0, 0)
    assert knobs() == {k: v for k, v in RESTORED.items() if k in knobs()}
    p = twin("--kernel", "6.18", "--case", "nope", timeout=30)
    assert p.returncode == 2 and "--case: no case nope" in p.stderr, p.stderr


@pytest.mark.timeout(90)
def test_twin_618_zero_pages_and_smart_scan_agree_with_the_host_kernel():
    """--kernel 6.18's zero-page and smart-scan cases (issue 23): ksm_tests
    -Z with use_zero_pages 1, test_unmerge_zero_pages and LTP ksm07, row by
    row against this kernel; the knobs put back (use_zero_pages 0)."""
    why = host_ksm_missing()
    if why:
        pytest.skip(why)
    got = twin618_rows(["ksm_tests-Z1", "unmerge_zero_pages", "ksm07"], timeout=80)
    assert got["ksm_tests-Z1", "merge", "pages_sharing"] == (0, 0)
    assert got["ksm_tests-Z1", "merge", "A ksm_zero_pages"] == (10, 10)
    assert [got["unmerge_zero_pages", s, "A ksm_zero_pages"] for s in ("merge", "unmerge-half", "write-half")] \
        == [(512, 512), (256, 256), (0, 0)]
    assert got["ksm07", "scan", "looks as should_skip_rmap_item"] == (True, True)
    assert knobs() == {k: v for k, v in RESTORED.items() if k in knobs()}


def test_twin_without_host_ksm_says_why_in_one_line(tmp_path):
    p = twin("--sysfs", str(tmp_path / "no-ksm"), timeout=30)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.splitlines() == [f"twin: no host KSM to compare with: {tmp_path}/no-ksm is "
                                     "missing (a kernel without CONFIG_KSM?)"], p.stderr


@pytest.mark.parametrize("args,msg", [(["--walk", "nope"], "--walk: no walk 'nope'"),
                                      (["--pages", "300"], "--pages: 8 .. 256 (got 300; more would map"),
                                      (["--scans", "1"], "--scans: 2 .. 20 (got 1)")])
def test_twin_bad_input_is_one_line(args, msg):
    p = twin(*args, timeout=30)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and msg in p.stderr, p.stderr


def test_twin_lists_its_walks():
    p = twin("--list", timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("full: "), p.stdout + p.stderr
    assert "  fork-A: fork A C" in p.stdout and "fork-unmergeable:" in p.stdout


def test_twin_rows_say_no_where_the_two_differ():
    """The comparison itself, on two made-up snapshots: a counter, a
    ksm_stat line and the frame sharing that differ are each a NO row
    with what differs; what is equal is a yes."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import twin as tw

    def snap(sharing: int, rmap_b: int, split: bool) -> dict:
        page = {"present": True, "ksm": True, "mapcount": 4}
        maps = {t: [{**page, "frame": 7 if not (split and t == "B") else 8 + i} for i in range(2)]
                for t in "AB"}
        return {"ksm": {"pages_shared": 1, "pages_sharing": sharing},
                "stat": {"A": {"ksm_rmap_items": 2, "ksm_merging_pages": 2},
                         "B": {"ksm_rmap_items": rmap_b, "ksm_merging_pages": 2}},
                "pagemap": tw.pattern(maps)}

    same = tw.rows("s", snap(3, 2, False), snap(3, 2, False))
    assert all(r["agree"] for r in same) and len(same) == 9
    diff = {r["field"]: r for r in tw.rows("s", snap(3, 0, False), snap(1, 2, True))}
    assert [f for f, r in diff.items() if not r["agree"]] == ["pages_sharing", "B ksm_rmap_items",
                                                              "frames"]
    assert diff["frames"]["difference"] == ("frames only in kernel: [A0-1 B0-1]; "
                                            "frames only in uksm: [A0-1], [B0], [B1]")
    assert diff["pages_shared"]["agree"] and diff["ksm"]["agree"] and diff["mapcount"]["agree"]


def test_twin_as_another_user_says_why_in_one_line():
    """Not root: refused before anything is touched (the host's knobs are
    root's), in one line with status 2."""
    require("no-setuid")
    p = run_group(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                   sys.executable, TWIN], 30)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    reason = ("needs root" if os.path.isdir(HOST_KSM) else "is missing")
    assert len(p.stderr.splitlines()) == 1 and reason in p.stderr, p.stderr
