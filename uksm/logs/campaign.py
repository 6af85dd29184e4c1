"""A campaign's results as a picture (``uksm campaign report c.jsonl -o c.png``).

The results file (``uksm campaign --out``) has one JSON object per run
(docs/CAMPAIGN.md, "Results").  Four panels:

- kills per kill point, a bar per signal;
- runs per exit policy and hazard set, stacked by status (clean, hung, ...);
- lock recoveries by lock class (``lock_recoveries_by_lock``, counted from
  each run's log before it is dropped; results written before that field
  only have the total, drawn as such);
- kills per second over the campaign's wall-clock time, each run's kills
  spread over its run (``ended`` - ``duration_s`` .. ``ended``; results
  without ``ended`` are drawn per run, in the order they ended).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from uksm.logs.plots import _figure

STATUS_COLOURS = {"clean": "#6aa84f", "hung": "#cc0000", "integrity": "#e69138", "error": "#674ea7",
                  "timeout": "#999999", "usage": "#3d85c6", "aborted": "#bbbbbb"}


class ResultsError(Exception):
    """The results file cannot be read (missing, a folder)."""


def read_results(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(the runs' results, lines that are not one): a result is an object
    with a string ``status`` and a ``run_id``; the last result of a run id
    counts (a --resume may record it again)."""
    p = Path(path)
    if not p.exists():
        raise ResultsError(f"no such file: {p}")
    if not p.is_file():
        raise ResultsError(f"not a file: {p}")
    runs: dict[str, dict[str, Any]] = {}
    bad = 0
    with open(p, "rb") as f:
        for raw in f:
            if raw.isspace():
                continue
            try:
                r = json.loads(raw)
            except (ValueError, RecursionError):
                bad += 1
                continue
            if not isinstance(r, dict) or not isinstance(r.get("status"), str) \
                    or not isinstance(r.get("run_id"), str):
                bad += 1
                continue
            runs[r["run_id"]] = r
    return list(runs.values()), bad


def lock_recoveries_by_lock(log_dir: str | Path) -> dict[str, int]:
    """``lock_recovery`` events of a run's log folder, by lock class
    (``mmap_sem:mm3`` counts as ``mmap_sem``): what a campaign records of
    each run before it drops the run's logs."""
    out: Counter[str] = Counter()
    for f in Path(log_dir).glob("*.jsonl"):
        try:
            with open(f, "rb") as fh:
                for raw in fh:
                    if b'"lock_recovery"' not in raw:
                        continue
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(ev, dict) and ev.get("event") == "lock_recovery" \
                            and isinstance(ev.get("lock"), str):
                        out[ev["lock"].split(":", 1)[0]] += 1
        except OSError:
            continue
    return dict(out)


def _num(v: Any) -> float:
    return v if type(v) in (int, float) else 0


def plot_campaign(runs: list[dict[str, Any]], out: str | Path, title: str) -> None:
    fig = _figure(13, 8.5)
    (ax_k, ax_s), (ax_l, ax_r) = fig.subplots(2, 2)
    if not runs:
        fig.suptitle(f"{title}: no runs recorded", fontsize="medium")
        for ax in (ax_k, ax_s, ax_l, ax_r):
            ax.set_axis_off()
        fig.savefig(out, dpi=110)
        return
    _kills(ax_k, runs)
    _status(ax_s, runs)
    _locks(ax_l, runs)
    _rate(ax_r, runs)
    kills = sum(_num(r.get("kills")) for r in runs)
    failed = sum(1 for r in runs if r["status"] != "clean")
    fig.suptitle(f"{title}: {len(runs)} runs, {int(kills)} kills, {failed} not clean", fontsize="medium")
    fig.savefig(out, dpi=110)


def _kills(ax: Any, runs: list[dict[str, Any]]) -> None:
    by: Counter[tuple[str, str]] = Counter()
    for r in runs:
        by[(str(r.get("point")), str(r.get("signal")))] += int(_num(r.get("kills")))
    points = sorted({p for p, _ in by})
    signals = sorted({s for _, s in by})
    width = 0.8 / max(len(signals), 1)
    for i, s in enumerate(signals):
        xs = [j + (i - (len(signals) - 1) / 2) * width for j in range(len(points))]
        ax.bar(xs, [by[(p, s)] for p in points], width, label=f"SIG{s}" if s in ("KILL", "TERM") else s)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels(points, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("kills delivered")
    ax.set_title("kills per kill point and signal", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)


def _status(ax: Any, runs: list[dict[str, Any]]) -> None:
    def group(r: dict[str, Any]) -> str:
        hz = r.get("hazards")
        hz = "+".join(hz) if isinstance(hz, list) and hz else (hz if isinstance(hz, str) and hz else "none")
        return f"{r.get('policy')}\n{hz}"
    by: Counter[tuple[str, str]] = Counter((group(r), r["status"]) for r in runs)
    groups = sorted({g for g, _ in by})
    statuses = sorted({s for _, s in by}, key=lambda s: (s != "clean", s))
    bottom = [0] * len(groups)
    for s in statuses:
        vals = [by[(g, s)] for g in groups]
        ax.bar(range(len(groups)), vals, 0.7, bottom=bottom, label=s,
               color=STATUS_COLOURS.get(s, "black"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize="small")
    ax.set_ylabel("runs")
    ax.set_title("runs per exit policy and hazard set, by status", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)


def _locks(ax: Any, runs: list[dict[str, Any]]) -> None:
    by: Counter[str] = Counter()
    counted = 0
    old_total = 0
    for r in runs:
        d = r.get("lock_recoveries_by_lock")
        if isinstance(d, dict):
            counted += 1
            for k, v in d.items():
                by[str(k)] += int(_num(v))
        else:
            old_total += int(_num(r.get("lock_recoveries")))
    if old_total:
        by["(by lock not recorded)"] += old_total
    names = sorted(by, key=lambda k: -by[k])
    ax.barh(range(len(names)), [by[k] for k in names], color="teal")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("lock recoveries (a lock held by a killed task, taken over)")
    recov = int(sum(_num(r.get("recoveries")) for r in runs))
    ax.set_title(f"lock recoveries by lock ({recov} recoveries in all; by lock for "
                 f"{counted} of {len(runs)} runs)", fontsize="medium")
    if not names:
        ax.text(0.5, 0.5, "no lock recovery", transform=ax.transAxes, ha="center", color="grey")
    ax.grid(True, axis="x", alpha=0.3)


def _rate(ax: Any, runs: list[dict[str, Any]]) -> None:
    timed = [r for r in runs if type(r.get("ended")) in (int, float) and _num(r.get("duration_s")) > 0]
    if not timed:
        ax.bar(range(len(runs)), [_num(r.get("kills")) for r in runs], color="steelblue")
        ax.set_xlabel("run, in the order they ended (these results have no 'ended' time)")
        ax.set_ylabel("kills")
        ax.set_title("kills per run", fontsize="medium")
        return
    t0 = min(r["ended"] - r["duration_s"] for r in timed)
    t1 = max(r["ended"] for r in timed)
    nb = max(10, min(120, int((t1 - t0) / 5) or 10))
    w = (t1 - t0) / nb or 1.0
    rate = [0.0] * nb
    for r in timed:
        a, b = r["ended"] - r["duration_s"] - t0, r["ended"] - t0
        k = _num(r.get("kills")) / (b - a)  # kills/s while it ran
        for i in range(int(a // w), min(nb, int(b // w) + 1)):
            lo, hi = max(a, i * w), min(b, (i + 1) * w)
            if hi > lo:
                rate[i] += k * (hi - lo) / w
    ax.step([i * w for i in range(nb)] + [nb * w], rate + rate[-1:], where="post", color="steelblue")
    ax.fill_between([i * w for i in range(nb)] + [nb * w], rate + rate[-1:], step="post", alpha=0.2,
                    color="steelblue")
    ax.set_xlabel("seconds since the first run began")
    ax.set_ylabel("kills/s")
    ax.set_title(f"kills per second over the campaign ({len(timed)} runs timed)", fontsize="medium")
    ax.grid(True, alpha=0.3)


__all__ = ["ResultsError", "read_results", "lock_recoveries_by_lock", "plot_campaign"]
