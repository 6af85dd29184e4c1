"""Checks of a trace against the Chrome trace event format's documented
fields (the JSON object form; the phases ``uksm logs trace`` writes), and
helpers to read one back: shared by the synthetic and the real-run tests."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

#: the phases uksm writes: complete, instant, counter, metadata, flow start / end
PHASES = {"X", "i", "C", "M", "s", "f"}
META = {"process_name", "thread_name", "process_sort_index", "thread_sort_index"}


def validate(trace: dict[str, Any]) -> None:
    """Assert every documented field of every event, that every track used
    is named, that slices nest on each thread, and that each flow has one
    start and one end, each inside a slice of its thread."""
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    assert trace["displayTimeUnit"] in ("ms", "ns")
    json.loads(json.dumps(trace))  # plain JSON: no NaN, no custom types
    named_p, named_t, used = set(), set(), set()
    flows: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    slices: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        ph = e["ph"]
        assert ph in PHASES, e
        assert isinstance(e["name"], str) and e["name"], e
        assert type(e["pid"]) is int and type(e["tid"]) is int, e
        if ph == "M":
            assert e["name"] in META and isinstance(e["args"], dict), e
            if e["name"] == "process_name":
                assert isinstance(e["args"]["name"], str) and e["args"]["name"]
                named_p.add(e["pid"])
            elif e["name"] == "thread_name":
                assert isinstance(e["args"]["name"], str) and e["args"]["name"]
                named_t.add((e["pid"], e["tid"]))
            else:
                assert type(e["args"]["sort_index"]) is int
            continue
        assert type(e["ts"]) in (int, float) and e["ts"] >= 0, e
        assert isinstance(e.get("cat"), str), e
        if ph == "X":
            assert type(e["dur"]) in (int, float) and e["dur"] >= 0, e
            assert isinstance(e["args"], dict)
            slices[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
            used.add((e["pid"], e["tid"]))
        elif ph == "i":
            assert e["s"] in ("t", "p", "g"), e
            assert isinstance(e["args"], dict)
            if e["s"] == "t":
                used.add((e["pid"], e["tid"]))
        elif ph == "C":
            assert e["args"] and all(type(v) in (int, float) for v in e["args"].values()), e
            used.add((e["pid"], None))
        else:
            assert type(e["id"]) is int, e
            if ph == "f":
                assert e["bp"] == "e", e  # binds the slice enclosing it
            flows[e["id"]].append(e)
            used.add((e["pid"], e["tid"]))
    for name in thread_names(trace).values():
        assert not name.endswith("(overlapping)"), f"slices that do not nest on {name}"
    for pid, tid in used:
        assert pid in named_p, f"process {pid} has no process_name"
        if tid is not None:
            assert (pid, tid) in named_t, f"thread {pid}/{tid} has no thread_name"
    for key, ss in slices.items():
        stack: list[float] = []
        for s, f in sorted(ss, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1] <= s:
                stack.pop()
            assert not stack or f <= stack[-1] + 0.01, f"slices overlap on {key}: {s}..{f}"
            stack.append(f)
    for fid, ends in flows.items():
        assert sorted(x["ph"] for x in ends) == ["f", "s"], (fid, ends)
        for x in ends:
            assert any(s <= x["ts"] <= f for s, f in slices[(x["pid"], x["tid"])]), \
                f"flow {fid} {x['ph']} at {x['ts']} is in no slice of its thread"


def thread_names(trace: dict[str, Any]) -> dict[tuple[int, int], str]:
    return names(trace)[1]


def names(trace: dict[str, Any]) -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    """(process names by pid, thread names by (pid, tid))."""
    p, t = {}, {}
    for e in trace["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "process_name":
            p[e["pid"]] = e["args"]["name"]
        elif e["ph"] == "M" and e["name"] == "thread_name":
            t[(e["pid"], e["tid"])] = e["args"]["name"]
    return p, t


def of(trace: dict[str, Any], ph: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == ph
            and all(e.get(k) == v for k, v in match.items())]


def flow_edges(trace: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each flow as (the slice it starts in, the slice it ends in): the
    innermost X slice of the thread containing each end."""
    xs: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in of(trace, "X"):
        xs[(e["pid"], e["tid"])].append(e)

    def inner(x: dict[str, Any]) -> dict[str, Any]:
        c = [s for s in xs[(x["pid"], x["tid"])] if s["ts"] <= x["ts"] <= s["ts"] + s["dur"]]
        return min(c, key=lambda s: s["dur"])
    ends: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for e in trace["traceEvents"]:
        if e["ph"] in ("s", "f"):
            ends[e["id"]][e["ph"]] = e
    return [(inner(v["s"]), inner(v["f"])) for v in ends.values()]


def instant_counts(trace: dict[str, Any]) -> Counter[str]:
    """Instants per log event (their name's first word)."""
    return Counter(e["name"].split(" ")[0] for e in of(trace, "i") if e["s"] == "t")
