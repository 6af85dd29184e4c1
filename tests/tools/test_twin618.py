"""tools/twin618.py (issue 23 item 4): 6.18's zero pages and smart scan
give the same numbers on uksm (kernel="6.18") and on this machine's
KSM -- ksm_tests -Z with use_zero_pages 0 and 1, ksm_functional_tests'
test_unmerge_zero_pages, LTP ksm07 -- and the host's knobs are put back."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import RESTORED, ROOT, host_ksm_missing, knobs, run_group

TWIN618 = os.path.join(ROOT, "tools", "twin618.py")


def twin618(*args: str, timeout: float = 60):
    return run_group([sys.executable, TWIN618, *args], timeout)


@pytest.mark.timeout(120)
def test_twin618_agrees_with_the_host_kernel():
    why = host_ksm_missing()
    if why:
        pytest.skip(why)
    p = twin618("--json", "-q", timeout=100)
    r = json.loads(p.stdout) if p.stdout.startswith("{") else None
    assert r is not None, f"status {p.returncode}\n{p.stdout}\n{p.stderr}"
    bad = [x for x in r["rows"] if not x["agree"]]
    assert not bad and p.returncode == 0, json.dumps(bad, indent=1) + p.stderr
    got = {(x["step"], x["field"]): (x["kernel"], x["uksm"]) for x in r["rows"]}
    # the numbers the sources assert, on both sides
    assert got["Z0", "pages_shared"] == got["Z0", "frames"] == (1, 1)
    assert got["Z0", "pages_sharing"] == (9, 9)
    assert got["Z1", "pages_sharing"] == (0, 0) and got["Z1", "ksm_zero_pages"] == (10, 10)
    assert [got["unmerge-zero", f] for f in ("task ksm_zero_pages", "after unmerge of half",
                                             "after writes", "frames after")] \
        == [(512, 512), (256, 256), (0, 0), (512, 512)]
    assert got["ksm07", "ksm07 passes (skipped >= scans/2)"] == (True, True)
    assert got["ksm07", "skips as should_skip_rmap_item"] == (True, True)
    assert knobs() == {k: v for k, v in RESTORED.items() if k in knobs()}


def test_twin618_without_host_ksm_says_why_in_one_line(tmp_path):
    p = twin618("--sysfs", str(tmp_path / "no-ksm"), timeout=30)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.splitlines() == [f"twin618: no host KSM to compare with: {tmp_path}/no-ksm is "
                                     "missing (a kernel without CONFIG_KSM?)"], p.stderr


def test_twin618_bad_case_is_a_usage_error():
    p = twin618("--case", "nope", timeout=30)
    assert p.returncode == 2 and "invalid choice" in p.stderr, p.stderr


def test_not_skipped_is_the_rule():
    """twin618's formula against the rule's own code."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import twin618
    from uksm.kernel.ksm618 import should_skip_rmap_item

    class Slot:
        age, skips = bytearray(1), bytearray(1)

    class Ksmd:
        pages_skipped = 0

        def remove_rmap_item_from_tree(self, *_a: object) -> None:
            pass

    k, st = Ksmd(), Slot()
    looks = 0
    for scans in range(1, 200):
        looks += not should_skip_rmap_item(k, st, 0)  # type: ignore[arg-type]
        assert twin618.not_skipped(scans) == looks, scans
