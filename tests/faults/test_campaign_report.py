"""``uksm campaign report RESULTS -o PNG`` (issue 24): a campaign's results
as a picture; the result lines carry what it needs (``ended``, the lock
recoveries by lock, counted from the run's log before it is dropped)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import run_group, uksm
from uksm.faults.campaign_run import _result, run_id
from uksm.logs.campaign import lock_recoveries_by_lock, read_results

PNG = b"\x89PNG\r\n\x1a\n"


def params(**kw) -> dict:
    p = {"cmd": "inject", "seed": 1, "point": "random", "signal": "KILL", "policy": "seed",
         "hazards": [], "workload": "vm", "kills": 20, "workers": 2, "pages": 32}
    p.update(kw)
    return p


def result(i: int, **kw) -> dict:
    p = params(seed=i, **{k: v for k, v in kw.items() if k in ("point", "signal", "policy", "hazards")})
    r = {"run_id": run_id(p), **p, "status": kw.get("status", "clean"), "kills": 20,
         "recoveries": 20, "lock_recoveries": 2, "duration_s": 10.0, "ended": 1000.0 + 5 * i,
         "lock_recoveries_by_lock": {"mmap_sem": 1, "pte_lock": 1}}
    return r


@pytest.mark.timeout(60)
def test_report_draws_a_results_file(tmp_path: Path) -> None:
    rows = [result(i, point=pt, signal=sg, policy=pol, hazards=hz,
                   status="clean" if i % 5 else "hung")
            for i, (pt, sg, pol, hz) in enumerate(
                (pt, sg, pol, hz) for pt in ("random", "cursor", "ksmd_break_cow")
                for sg in ("KILL", "TERM") for pol in ("seed", "legacy")
                for hz in ([], ["no-fast-path"]))]
    old = dict(result(99), run_id="0ld")
    del old["ended"], old["lock_recoveries_by_lock"]  # a result from before those fields
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [*rows, old]) + '{"run_id": "x", "sta')
    res, bad = read_results(f)
    assert len(res) == len(rows) + 1 and bad == 1
    out = tmp_path / "c.png"
    p = uksm("campaign", "report", str(f), "-o", str(out), timeout=40)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"wrote {out}: {len(rows) + 1} runs\n"
    assert "skipped 1 lines" in p.stderr
    assert out.read_bytes()[:8] == PNG
    # bad input: one line, status 2
    for args, msg in ((["report", str(tmp_path / "none.jsonl"), "-o", str(out)], "no such file"),
                      (["report", str(tmp_path), "-o", str(out)], "not a file"),
                      (["report", str(f)], "-o")):
        p = uksm("campaign", *args, timeout=40)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) <= 2, p.stderr
        assert "Traceback" not in p.stderr
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert uksm("campaign", "report", str(empty), "-o", str(tmp_path / "e.png"), timeout=40).returncode == 0
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG


def test_result_line_counts_lock_recoveries_by_lock(tmp_path: Path) -> None:
    logs = tmp_path / "run"
    logs.mkdir()
    lines = [{"event": "lock_recovery", "lock": "mmap_sem:mm3", "dead_pid": [5], "mono_ns": 1},
             {"event": "lock_recovery", "lock": "mmap_sem:mm4", "dead_pid": [6], "mono_ns": 2},
             {"event": "lock_recovery", "lock": "zone_lock", "dead_pid": [6], "mono_ns": 3},
             {"event": "recovery", "lock": "zone_lock", "mono_ns": 4}]
    (logs / "supervisor-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "lock_rec')
    assert lock_recoveries_by_lock(logs) == {"mmap_sem": 2, "zone_lock": 1}
    res = _result(params(), 0, json.dumps({"inject": {"kills": 3}}), 1.5, "c1", str(logs), "none")
    assert res["lock_recoveries_by_lock"] == {"mmap_sem": 2, "zone_lock": 1}
    assert type(res["ended"]) is float and res["logs"] is None and not logs.exists()


@pytest.mark.timeout(200)
def test_report_of_a_real_campaign(tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    p = run_group([sys.executable, "-m", "uksm", "campaign",
                   "--seeds", "1-2", "--kills", "3", "--workers", "2", "--pages", "32",
                   "--parallel", "2", "--out", str(out), "--quiet"], 160)
    assert p.returncode == 0, p.stdout + p.stderr
    res, bad = read_results(out)
    assert len(res) == 2 and bad == 0
    assert all(type(r["ended"]) is float and isinstance(r["lock_recoveries_by_lock"], dict) for r in res)
    assert all(sum(r["lock_recoveries_by_lock"].values()) == r["lock_recoveries"] for r in res)
    png = tmp_path / "c.png"
    assert uksm("campaign", "report", str(out), "-o", str(png), timeout=30).returncode == 0
    assert png.read_bytes()[:8] == PNG
