"""Every rule of `uksm logs check` fires on a REAL run's logs with one
planted event (issue 16); tests/logs/test_logs.py plants them in synthetic logs,
tests/logs/test_logs_run.py covers rules 1 (freed twice) and 4 on real ones,
tests/checkers/test_planted.py rule 5 from a real hung task.  Here: the rest, each
in a copy of one short run's log folder."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import rewrite_logs, run_json
from uksm.cli.logs import main
from uksm.logs import check

Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("real")
    r, status = run_json("--workers", "2", "--pages", "32", "--workload", "identical",
                         "--pages-to-scan", "1000", "--sleep-ms", "2", "--log-dir", str(d), timeout=100)
    assert status == 0, r
    assert check(d) == []
    return d


def _slow_mm(files: dict[str, Events]) -> int:
    return next(e["mm"] for evs in files.values() for e in evs
                if e["event"] == "ksm_exit" and e.get("path") == "slow")


def _drop(files: dict[str, Events], pred: Callable[[dict[str, Any]], bool]) -> int:
    n = 0
    for name in files:
        keep = [e for e in files[name] if not pred(e)]
        n += len(files[name]) - len(keep)
        files[name] = keep
    assert n, "nothing to drop"
    return n


def _append_copy(files: dict[str, Events], pred: Callable[[dict[str, Any]], bool], **change: Any) -> None:
    for evs in files.values():
        for e in evs:
            if pred(e):
                evs.append(dict(e, **change))
                return
    raise AssertionError("no such event")


def rule1_never_freed(files):
    mm = _slow_mm(files)
    _drop(files, lambda e: e.get("mm") == mm and e["event"] in ("ksm_exit", "slot_freed"))
    return mm


def rule2_slow_not_followed(files):
    mm = _slow_mm(files)
    _drop(files, lambda e: e.get("mm") == mm and e["event"] == "slot_freed")
    return mm


def rule3_count_not_zero(files):
    mm = _slow_mm(files)
    for evs in files.values():
        for e in evs:
            if e["event"] == "mmdrop" and e["mm"] == mm and e["mm_count"] == 0:
                e["mm_count"] = 1
    return mm


def rule3_freed_twice(files):
    mm = _slow_mm(files)
    last = max(e["mono_ns"] for evs in files.values() for e in evs)
    _append_copy(files, lambda e: e["event"] == "mm_freed" and e["mm"] == mm, mono_ns=last + 5)
    return mm


def rule3_no_mmdrop(files):
    mm = _slow_mm(files)
    _drop(files, lambda e: e.get("mm") == mm and e["event"] == "mmdrop")
    return mm


def rule5_hung_task(files):
    _append_copy(files, lambda e: e["event"] == "cluster_start", event="hung_task", level="error",
                 task_pid=4242, task_role="worker", lock="mmap_sem(mm1)", waited_s=9.0,
                 chain=["worker w1 (pid 4242, mm1) waits for mmap_sem(mm1) for 9.0s, held by ksmd"],
                 mono_ns=max(e["mono_ns"] for evs in files.values() for e in evs) + 1)
    return None


PLANTS = [(1, "never freed", rule1_never_freed),
          (2, "not followed by slot_freed", rule2_slow_not_followed),
          (3, "mm_count=1", rule3_count_not_zero),
          (3, "freed twice", rule3_freed_twice),
          (3, "with no mmdrop logged before it", rule3_no_mmdrop),
          (5, "hung task: worker pid 4242 blocked on mmap_sem(mm1)", rule5_hung_task)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rule,what,plant", PLANTS, ids=[p[2].__name__ for p in PLANTS])
def test_check_fires_on_a_real_log_with_one_planted_event(real_run, tmp_path, capsys, rule, what, plant):
    mm: list[int | None] = []
    d = rewrite_logs(real_run, tmp_path / "planted", lambda files: mm.append(plant(files)))
    who = f"mm {mm[0]}: " if mm[0] is not None else ""
    hits = [v for v in check(d) if v.startswith(f"rule {rule}: {who}") and what in v]
    assert hits, check(d)
    assert main([str(d), "check"]) == 4
    assert hits[0] in capsys.readouterr().out.splitlines()
