"""Pictures of a run (``uksm logs DIR plot``, ``uksm logs DIR trace --png``).

``plot_events``: panels on one time axis, readable at ten kills and at
thousands --

1. the KSM counters (``scan_batch_end``), as steps;
2. frames in use (``scan_batch_end``, ``unmerge``) against the limit (the
   pool, ``cluster_start``; a ``mem_limit`` knob);
3. the tasks, one lane each (alive, exiting from ``mm_exit_begin``, dead
   after ``worker_exit``) with each kill and OOM kill a short tick on its
   lane.  Past 24 tasks a lane holds one task after another (a task takes
   the lowest lane free when it is spawned), so 2,000 kills of 4 workers
   need a few lanes, not 2,000;
4. ksmd's full scans as ticks, and the hung tasks, oopses and lockdep
   reports as marks.

``plot_trace``: a trace (``uksm.logs.trace``) drawn as a timeline viewer
draws it -- a row per thread, slices as bars, instants as marks, flow
arrows -- for where no trace viewer is at hand.

matplotlib is imported only here, and only when a picture is asked for.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uksm.logs.read import Event, ReadStats, iter_events


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable("plot needs matplotlib: pip install 'uksm[plot]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: scan_batch_end counters, with their colours
COUNTERS = {"pages_shared": "tab:blue", "pages_sharing": "tab:orange",
            "pages_unshared": "tab:green", "pages_volatile": "tab:red"}
#: kill ticks: (event, signal or action) -> colour, legend
KILL_STYLE = {"KILL": ("crimson", "SIGKILL (inject_kill)"), "TERM": ("darkorange", "SIGTERM (inject_kill)"),
              "kill_point": ("saddlebrown", "kill point"), "oom": ("purple", "OOM kill")}
ALIVE, EXITING = "#8fd18f", "#f2a65a"
PER_TASK_LANES = 24


@dataclass
class _Task:
    pid: int
    name: str
    start: float
    exit_begin: float | None = None
    end: float | None = None
    lane: int = 0
    marks: list[tuple[float, str]] = field(default_factory=list)   # (t, kill style key)
    hung: list[float] = field(default_factory=list)


@dataclass
class RunData:
    """What the run plot draws, gathered from the events in one pass."""

    t: list[float] = field(default_factory=list)
    counters: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in COUNTERS})
    frames_t: list[float] = field(default_factory=list)
    frames: list[float] = field(default_factory=list)
    limit: list[tuple[float, float]] = field(default_factory=list)  # (t, limit) steps
    tasks: dict[tuple[Any, int], _Task] = field(default_factory=dict)
    scans: list[float] = field(default_factory=list)
    bugs: list[tuple[float, str]] = field(default_factory=list)    # (t, oops / lockdep / ...)
    end: float = 0.0
    kills: int = 0


def gather(events: Iterable[Event]) -> RunData:
    d = RunData()
    origin: int | None = None
    mm_owner: dict[tuple[Any, Any], int] = {}
    pool = 0

    def task(cluster: Any, pid: Any, t: float) -> _Task | None:
        if type(pid) is not int or pid <= 0:
            return None
        tk = d.tasks.get((cluster, pid))
        if tk is None:  # a process the log never saw spawned
            tk = d.tasks[(cluster, pid)] = _Task(pid, f"pid {pid}", t)
        return tk

    for ev in events:
        if origin is None:
            origin = ev["mono_ns"]
        t = (ev["mono_ns"] - origin) / 1e9
        d.end = t
        name, cl = ev["event"], ev.get("cluster")
        if name == "scan_batch_end":
            d.t.append(t)
            for k in COUNTERS:
                v = ev.get(k)
                d.counters[k].append(float(v) if isinstance(v, (int, float)) else float("nan"))
        if name in ("scan_batch_end", "unmerge") and type(ev.get("frames_used")) is int:
            d.frames_t.append(t)
            d.frames.append(ev["frames_used"])
        elif name == "cluster_start" and type(ev.get("frames")) is int:
            pool = ev["frames"]
            d.limit.append((t, pool))
        elif name == "ksm_knob" and ev.get("name") == "mem_limit" and type(ev.get("value")) is int:
            d.limit.append((t, ev["value"] or pool))
        elif name in ("worker_spawn", "task_new") and type(ev.get("worker_pid")) is int:
            d.tasks[(cl, ev["worker_pid"])] = _Task(ev["worker_pid"], str(ev.get("worker")), t)
            mm_owner[(cl, ev.get("mm"))] = ev["worker_pid"]
        elif name == "mm_exit_begin":
            tk = d.tasks.get((cl, mm_owner.get((cl, ev.get("mm")), -1)))
            if tk is not None and tk.exit_begin is None:
                tk.exit_begin = t
        elif name in ("worker_exit", "task_exit"):
            pid = ev.get("worker_pid") if name == "worker_exit" else next(
                (p for (c, p), tk in d.tasks.items() if c == cl and tk.name == ev.get("worker")), None)
            tk = task(cl, pid, t)
            if tk is not None:
                tk.end = t
        elif name == "inject_kill":
            tk = task(cl, ev.get("target_pid"), t)
            if tk is not None:
                tk.marks.append((t, "TERM" if ev.get("signal") == "TERM" else "KILL"))
                d.kills += 1
        elif name == "kill_point" and ev.get("action") in ("kill", "term"):
            tk = task(cl, ev.get("victim_pid"), t)
            if tk is not None:
                tk.marks.append((t, "kill_point"))
                d.kills += 1
        elif name == "oom_kill":
            tk = task(cl, ev.get("victim_pid"), t)
            if tk is not None:
                tk.marks.append((t, "oom"))
                d.kills += 1
        elif name == "full_scan":
            d.scans.append(t)
        elif name == "hung_task":
            tpid = ev.get("task_pid")
            tk = d.tasks.get((cl, tpid)) if type(tpid) is int else None
            if tk is not None:
                tk.hung.append(t)
            else:
                d.bugs.append((t, f"hung {ev.get('task_role', 'task')}"))
        elif name in ("oops", "lockdep", "use_after_free", "ksmd_died"):
            d.bugs.append((t, f"{name} ({ev.get('role')})" if name != "ksmd_died" else name))
    return d


BINS = 500  # past twice this many points in the window, a series is drawn as min-max bands


def _series(ax: Any, xs: list[float], ys: list[float], lo: float, hi: float, colour: str,
            label: str) -> None:
    """A step series; a dense one (thousands of batches of a long inject)
    as its range and mean per bin: a wall of spikes hides every level."""
    if len(xs) <= 2 * BINS:
        ax.step(xs, ys, where="post", label=label, color=colour, linewidth=1.3)
        return
    width = (hi - lo) / BINS
    bins: dict[int, list[float]] = {}
    for x, y in zip(xs, ys):
        if y == y:  # not NaN
            bins.setdefault(min(int((x - lo) / width), BINS - 1), []).append(y)
    idx = sorted(bins)
    mid = [lo + (i + 0.5) * width for i in idx]
    ax.fill_between(mid, [min(bins[i]) for i in idx], [max(bins[i]) for i in idx], color=colour,
                    alpha=0.18, linewidth=0)
    ax.plot(mid, [sum(bins[i]) / len(bins[i]) for i in idx], color=colour, linewidth=1.2, label=label)


def _window(xs: list[float], ys: list[list[float]], lo: float, hi: float
            ) -> tuple[list[float], list[list[float]]]:
    """The points of a step series inside lo..hi, with the last one before
    lo moved to lo (the value in force when the window opens)."""
    keep = [i for i, x in enumerate(xs) if lo <= x <= hi]
    first = next((i for i in range(len(xs) - 1, -1, -1) if xs[i] < lo), None)
    out_x = ([lo] if first is not None else []) + [xs[i] for i in keep]
    idx = ([first] if first is not None else []) + keep
    return out_x, [[y[i] for i in idx] for y in ys]


def _lanes(tasks: list[_Task], end: float) -> tuple[int, bool]:
    """Give each task its lane; (lanes, packed).  Up to PER_TASK_LANES
    tasks: one lane each; past that, the lowest lane free at its spawn."""
    tasks.sort(key=lambda tk: tk.start)
    if len(tasks) <= PER_TASK_LANES:
        for i, tk in enumerate(tasks):
            tk.lane = i
        return len(tasks), False
    free_at: list[float] = []
    for tk in tasks:
        lane = next((i for i, f in enumerate(free_at) if f <= tk.start), len(free_at))
        if lane == len(free_at):
            free_at.append(0.0)
        free_at[lane] = tk.end if tk.end is not None else end + 1
        tk.lane = lane
    return len(free_at), True


def plot_events(events: Iterable[Event], out: str | Path, title: str,
                t_from: float | None = None, t_to: float | None = None) -> RunData:
    """Draw the run's panels into ``out`` (PNG); the window ``t_from`` ..
    ``t_to`` seconds (since the run's first event) when given."""
    fig = _figure(12, 1)  # matplotlib missing: fail before the events are read
    d = gather(events)
    lo = 0.0 if t_from is None else t_from
    hi = max(d.end, lo + 1e-3) if t_to is None else t_to
    d.t, cs = _window(d.t, [d.counters[k] for k in COUNTERS], lo, hi)
    d.counters = dict(zip(COUNTERS, cs))
    d.frames_t, (d.frames,) = _window(d.frames_t, [d.frames], lo, hi)
    tasks = [tk for tk in d.tasks.values()
             if tk.start <= hi and (tk.end if tk.end is not None else d.end) >= lo]
    nlanes, packed = _lanes(tasks, d.end)
    lane_h = min(0.32, max(0.14, 5.0 / max(nlanes, 1)))
    heights = [2.8, 1.3, max(1.0, lane_h * nlanes + 0.5), 0.55]
    fig.set_size_inches(12, sum(heights) + 1.1)
    axs = fig.subplots(4, 1, sharex=True, height_ratios=heights)
    ax_c, ax_f, ax_t, ax_s = axs

    dense = len(d.t) > 2 * BINS
    for k, colour in COUNTERS.items():
        _series(ax_c, d.t, d.counters[k], lo, hi, colour, k)
    ax_c.set_ylabel("pages")
    if dense:
        ax_c.set_title(f"{len(d.t)} batches: per 1/{BINS} of the time axis, the band is the "
                       "lowest to highest value, the line the mean", fontsize="small")
    ax_c.grid(True, alpha=0.3)
    if d.t:
        ax_c.legend(loc="upper left", fontsize="small", ncol=4, framealpha=0.8)
    else:
        ax_c.text(0.5, 0.5, "no scan_batch_end: no counters", transform=ax_c.transAxes,
                  ha="center", va="center", color="grey")

    _series(ax_f, d.frames_t, d.frames, lo, hi, "tab:gray", "frames used")
    if d.limit:
        lt = [t for t, _ in d.limit] + [max(d.end, hi)]
        lv = [v for _, v in d.limit]
        ax_f.step(lt, lv + lv[-1:], where="post", color="black", linestyle="--", linewidth=1,
                  label="limit (pool, mem_limit)")
    ax_f.set_ylabel("frames")
    ax_f.set_ylim(bottom=0)
    ax_f.grid(True, alpha=0.3)
    if d.frames_t or d.limit:
        ax_f.legend(loc="upper left", fontsize="small", ncol=2, framealpha=0.8)

    _draw_tasks(ax_t, tasks, nlanes, packed, d.end)

    # thousands of ticks: faint, so that their density is the shade
    ax_s.vlines(d.scans, 0, 1, color="tab:blue", linewidth=0.6,
                alpha=min(0.8, max(0.06, 200 / max(len(d.scans), 1))))
    marks: dict[float, list[str]] = {}
    for t, what in d.bugs:  # those at one moment (a deadlock's reports) under one mark
        key = next((k for k in marks if abs(k - t) < (hi - lo) / 200), t)
        marks.setdefault(key, []).append(what)
    for t, whats in marks.items():
        ax_s.plot([t], [0.5], marker="X", color="red", markersize=9)
        ax_s.annotate(", ".join(sorted(set(whats))), (t, 0.5), xytext=(6, 0), textcoords="offset points",
                      fontsize="small", color="red", va="center",
                      bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax_s.set_yticks([])
    ax_s.set_ylim(0, 1)
    ax_s.set_ylabel("ksmd", rotation=0, ha="right", va="center")
    ax_s.set_xlabel(f"time (s since the run's first event); ticks: ksmd's {len(d.scans)} full scans")
    ax_s.set_xlim(lo, hi)

    window = "" if t_from is None and t_to is None else f", {lo:g}-{hi:g} s"
    fig.suptitle(f"{title}: {len(d.tasks)} tasks, {d.kills} kills, {len(d.scans)} full scans{window}",
                 fontsize="medium")
    fig.savefig(out, dpi=110)
    return d


def _draw_tasks(ax: Any, tasks: list[_Task], nlanes: int, packed: bool, end: float) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    # one artist per lane and kind, not per task: thousands of artists take minutes to draw
    alive: dict[int, list[tuple[float, float]]] = {}
    exiting: dict[int, list[tuple[float, float]]] = {}
    dead: list[tuple[int, float]] = []
    ticks: dict[str, tuple[list[float], list[int]]] = {}
    hung: tuple[list[float], list[int]] = ([], [])
    for tk in tasks:
        y = tk.lane
        stop = tk.end if tk.end is not None else end
        ex = tk.exit_begin if tk.exit_begin is not None else stop
        alive.setdefault(y, []).append((tk.start, max(ex - tk.start, 0)))
        if stop > ex:
            exiting.setdefault(y, []).append((ex, stop - ex))
        if not packed and tk.end is not None and tk.end < end:
            dead.append((y, tk.end))
        for t, style in tk.marks:
            xs, ys = ticks.setdefault(style, ([], []))
            xs.append(t)
            ys.append(y)
        hung[0].extend(tk.hung)
        hung[1].extend([y] * len(tk.hung))
    for bars, colour in ((alive, ALIVE), (exiting, EXITING)):
        for y, ranges in bars.items():
            ax.broken_barh(ranges, (y - 0.35, 0.7), color=colour, linewidth=0)
    if dead:
        ax.hlines([y for y, _ in dead], [t for _, t in dead], end, color="lightgrey", linewidth=1,
                  linestyle=":")
    nticks = sum(len(xs) for xs, _ in ticks.values())
    for style, (xs, ys) in ticks.items():  # the upper half of the lane: its state shows below
        ax.vlines(xs, [y - 0.48 for y in ys], [y + 0.05 for y in ys], color=KILL_STYLE[style][0],
                  linewidth=1.2 if nticks < 300 else 0.6, alpha=min(1.0, max(0.3, 300 / max(nticks, 1))))
    if hung[0]:
        ax.plot(hung[0], hung[1], marker="X", color="red", markersize=8, linestyle="")
    ax.set_ylim(max(nlanes, 1) - 0.5, -0.5)
    if not tasks:
        ax.text(0.5, 0.5, "no tasks", transform=ax.transAxes, ha="center", va="center", color="grey")
    if packed:
        ax.set_ylabel(f"tasks\n({len(tasks)} in\n{nlanes} lanes)", rotation=0, ha="right", va="center")
        ax.set_yticks(range(nlanes))
        ax.set_yticklabels([f"lane {i + 1}" for i in range(nlanes)], fontsize="x-small")
    else:
        ax.set_yticks([tk.lane for tk in tasks])
        ax.set_yticklabels([tk.name for tk in tasks], fontsize="small")
        ax.set_ylabel("tasks", rotation=0, ha="right", va="center")
    used = {s for tk in tasks for _, s in tk.marks}
    handles: list[Any] = [Patch(color=ALIVE, label="alive"), Patch(color=EXITING, label="exiting")]
    if not packed:
        handles.append(Line2D([], [], color="lightgrey", linestyle=":", label="dead"))
    handles += [Line2D([], [], color=KILL_STYLE[s][0], linewidth=1.5, label=KILL_STYLE[s][1])
                for s in KILL_STYLE if s in used]
    if any(tk.hung for tk in tasks):
        handles.append(Line2D([], [], color="red", marker="X", linestyle="", label="hung task"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small",
              framealpha=0.8)
    ax.grid(True, axis="x", alpha=0.3)


# ---------------------------------------------------------------------------
# a trace as a timeline
# ---------------------------------------------------------------------------

SLICE_COLOURS = {"ksmd": "#6fa8dc", "wait": "#e06666", "lock": "#93c47d", "exit": "#f6b26b"}
INSTANT_COLOURS = {"kill": "crimson", "exit": "darkorange", "recovery": "teal", "bug": "red",
                   "ksm": "steelblue", "sched": "magenta", "cluster": "grey"}


Row = tuple[int, int]  # (pid, tid): a thread's row in the trace


def _trace_rows(evs: list[dict[str, Any]], max_rows: int) -> tuple[list[Row], list[str], int]:
    """The rows a trace draws (processes in their sort order, at most
    ``max_rows``: the busiest), their labels, and how many were left out."""
    pname: dict[int, str] = {}
    psort: dict[int, int] = {}
    tname: dict[Row, str] = {}
    tsort: dict[Row, int] = {}
    for e in evs:
        if e["ph"] != "M":
            continue
        a = e.get("args", {})
        if e["name"] == "process_name":
            pname[e["pid"]] = a["name"]
        elif e["name"] == "process_sort_index":
            psort[e["pid"]] = a["sort_index"]
        elif e["name"] == "thread_name":
            tname[(e["pid"], e["tid"])] = a["name"]
        elif e["name"] == "thread_sort_index":
            tsort[(e["pid"], e["tid"])] = a["sort_index"]
    busy: dict[Row, int] = {}
    for e in evs:
        if e["ph"] in ("X", "i") and e.get("s") != "g":
            k = (e["pid"], e["tid"])
            busy[k] = busy.get(k, 0) + (1 if e["ph"] == "i" else 3)
    rows = sorted(busy, key=lambda k: (psort.get(k[0], 0), k[0], tsort.get(k, 0), k[1]))
    left = 0
    if len(rows) > max_rows:
        keep = set(sorted(rows, key=lambda k: -busy[k])[:max_rows])
        left = len(rows) - max_rows
        rows = [r for r in rows if r in keep]
    labels = [f"{pname.get(pid, pid)} {pid}" if pid == tid else f"  {tname.get((pid, tid), tid)}"
              for (pid, tid) in rows]
    return rows, labels, left


def _draw_counters(ax: Any, evs: list[dict[str, Any]], end: float) -> None:
    """The trace's counter tracks, each value held until the next, or the end."""
    counters: dict[str, tuple[list[float], list[float]]] = {}
    for e in evs:
        if e["ph"] == "C":
            for k, v in e["args"].items():
                xs, ys = counters.setdefault(f"{e['name']} {k}", ([], []))
                xs.append(e["ts"] / 1e6)
                ys.append(v)
    for name, (xs, ys) in sorted(counters.items()):
        style = {"color": COUNTERS.get(name.split(" ")[-1], "black" if "limit" in name else "tab:gray"),
                 "linestyle": "--" if "limit" in name else "-"}
        ax.step(xs + [end], ys + ys[-1:], where="post", label=name, linewidth=1.2, **style)
    ax.set_ylabel("counters")
    ax.grid(True, alpha=0.3)
    if counters:
        ax.legend(loc="upper left", fontsize="x-small", ncol=3, framealpha=0.8)


def _draw_slices(ax: Any, evs: list[dict[str, Any]], row_of: dict[Row, int]) -> None:
    """Slices as bars, a child thinner than its parent, hatched when open
    at the end or inferred.  One artist per row, depth and kind: tens of
    thousands of lock slices drawn one by one take minutes."""
    stacks: dict[Row, list[float]] = {}
    bars: dict[tuple[int, int, str, bool], list[tuple[float, float]]] = {}
    for e in sorted((e for e in evs if e["ph"] == "X"), key=lambda e: (e["ts"], -e["dur"])):
        k = (e["pid"], e["tid"])
        if k not in row_of:
            continue
        st = stacks.setdefault(k, [])  # ends of the enclosing slices
        while st and st[-1] <= e["ts"]:
            st.pop()
        a = e.get("args", {})
        open_ = any(x in a for x in ("still_held_at_end", "still_waiting_at_end", "unfinished",
                                     "inferred"))
        bars.setdefault((row_of[k], len(st), e["cat"], open_), []).append((e["ts"] / 1e6, e["dur"] / 1e6))
        st.append(e["ts"] + e["dur"])
    for (y, depth, cat, open_), ranges in bars.items():
        h = 0.76 * 0.62 ** depth
        ax.broken_barh(ranges, (y - h / 2, h), facecolor=SLICE_COLOURS.get(cat, "silver"),
                       edgecolor="black" if open_ else "none", hatch="///" if open_ else None,
                       linewidth=0.5)


def _draw_instants_and_flows(ax: Any, evs: list[dict[str, Any]], row_of: dict[Row, int]) -> None:
    """Instants as marks on their row (a global one as a red line across
    all rows), flows as arrows from the waiter to what it waits for."""
    imarks: dict[str, tuple[list[float], list[int]]] = {}
    flows: dict[Any, dict[str, Any]] = {}
    for e in evs:
        k = (e.get("pid", 0), e.get("tid", 0))
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], {})[e["ph"]] = e
        elif e["ph"] != "i":
            continue
        elif e.get("s") == "g":
            ax.axvline(e["ts"] / 1e6, color="red", linewidth=1.2, linestyle="--")
            ax.annotate(e["name"], (e["ts"] / 1e6, -0.5), color="red", fontsize="small",
                        xytext=(3, 3), textcoords="offset points", va="bottom")
        elif k in row_of:
            mx, my = imarks.setdefault(e["cat"], ([], []))
            mx.append(e["ts"] / 1e6)
            my.append(row_of[k])
    for cat, (mx, my) in imarks.items():
        ax.plot(mx, my, marker="v", markersize=4, linestyle="", color=INSTANT_COLOURS.get(cat, "grey"))
    for f in flows.values():
        s, t = f.get("s"), f.get("f")
        if s is None or t is None:
            continue
        ks, kt = (s["pid"], s["tid"]), (t["pid"], t["tid"])
        if ks in row_of and kt in row_of:
            ax.annotate("", xy=(t["ts"] / 1e6, row_of[kt]), xytext=(s["ts"] / 1e6, row_of[ks]),
                        arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8,
                                    "connectionstyle": "arc3,rad=0.08"})


def _trace_legend(ax: Any) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles: list[Any] = [Patch(facecolor=c, label={"ksmd": "ksmd batch / scan mmN", "wait": "wait",
                                                    "lock": "lock held", "exit": "exit"}[k])
                          for k, c in SLICE_COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="open at the end / inferred"))
    handles += [Line2D([], [], marker="v", linestyle="", color=c, label=k)
                for k, c in INSTANT_COLOURS.items()]
    handles.append(Line2D([], [], color="black", label="waits for (flow)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="x-small")


def plot_trace(trace: dict[str, Any], out: str | Path, title: str, max_rows: int = 40) -> int:
    """Draw a trace as a viewer shows it: the counters on top, then a row
    per thread (processes in their sort order, at most ``max_rows``: the
    busiest), its slices as bars (hatched: open at the end, or inferred),
    instants as marks, flows as arrows.  Returns the rows left out."""
    fig = _figure(13, 1)
    evs = trace["traceEvents"]
    rows, labels, left = _trace_rows(evs, max_rows)
    row_of = {k: i for i, k in enumerate(rows)}
    end = max((e["ts"] + e.get("dur", 0) for e in evs if "ts" in e), default=0) / 1e6
    fig.set_size_inches(13, 2.2 + 0.27 * len(rows) + 1.0)
    ax_c, ax = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 0.27 * len(rows) + 0.4])
    _draw_counters(ax_c, evs, end)
    _draw_slices(ax, evs, row_of)
    _draw_instants_and_flows(ax, evs, row_of)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize="x-small")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("time (s since the run's first event)" + (f"; {left} quieter rows not drawn" if left else ""))
    _trace_legend(ax)
    fig.suptitle(title, fontsize="medium")
    fig.savefig(out, dpi=110)
    return left


def plot(log_dir: str | Path, out: str | Path, t_from: float | None = None,
         t_to: float | None = None) -> ReadStats:
    """The run plot of a log folder (:func:`plot_events`) into ``out``."""
    stats = ReadStats()
    plot_events(iter_events(log_dir, stats), out, Path(log_dir).resolve().name, t_from, t_to)
    return stats


__all__ = ["PlotUnavailable", "plot", "plot_events", "plot_trace", "gather", "RunData"]
