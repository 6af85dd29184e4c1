"""The exit protocol's rules, checked on a run's events (``uksm logs check``).

Each rule is one the seed's protocol promises (see docs/LOGS.md): a slot
freed once, by the right party, an mm freed after its last user, no merge
into an exiting mm, ... A violation is reported with the events that break
it; ``uksm logs check`` then exits 4 (an integrity failure)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from uksm.logs.read import Event, _int, by_cluster, format_fields, iter_events, label

# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


@dataclass
class _MmState:
    """What the checker remembers about one mm."""

    registered: str | None = None  # description of the ksm_enter not yet freed
    entered: bool = False
    last_free: str | None = None  # description of the last slot free
    pending_slow: list[str] = field(default_factory=list)  # ksm_exit(slow) awaiting slot_freed
    last_slot_freed: str | None = None
    exit_begin_ns: int | None = None
    exit_begin: str | None = None
    last_drop: tuple[int | None, str] | None = None  # (mm_count, description)
    freed: str | None = None  # description of mm_freed


@dataclass
class CheckResult:
    """What ``check`` found: the protocol's violations and notes, and
    whether the logs are evidence at all (``missing``: no valid event, no
    cluster_start, no cluster_stop -- a check that passes on nothing is
    not a pass).  ``clusters``: one result per cluster instance in the
    stream (each checked alone: mm ids, slots and stops are per cluster);
    the lists above are theirs together, each line naming its cluster when
    there are several."""
    violations: list[str]
    notes: list[str]
    mms: int
    clean_stop: bool
    missing: list[str] = field(default_factory=list)
    started: bool = True
    cluster: str = ""
    clusters: list["CheckResult"] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.missing


N_RULES = 8


class _Checker:
    """Protocol rules over one event stream; see :func:`check`."""

    def __init__(self) -> None:
        self.origin: int | None = None
        self.mms: dict[int, _MmState] = {}
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.clean_stop = False
        self.started = False
        self.handlers = {
            "ksm_enter": self._ksm_enter,
            "ksm_exit": self._ksm_exit,
            "slot_freed": self._slot_freed,
            "mmdrop": self._mmdrop,
            "mm_freed": self._mm_freed,
            "mm_exit_begin": self._mm_exit_begin,
            "merge": self._merge,
        }

    # -- helpers
    def _t(self, ns: int) -> str:
        return f"{(ns - (self.origin or 0)) / 1e9:.6f}s"

    def _desc(self, ev: Event) -> str:
        fields = format_fields(ev, skip=("mm",), origin=self.origin)
        return (
            f"{ev['event']}({fields}) at {self._t(ev['mono_ns'])} "
            f"[{ev.get('role', '?')} {ev.get('pid', '?')}]"
        )

    def _violation(self, rule: int, mm: int | None, text: str) -> None:
        who = f"mm {mm}: " if mm is not None else ""
        self.violations.append(f"rule {rule}: {who}{text}")

    # -- rule 1: a ksm_enter's slot is freed exactly once
    def _ksm_enter(self, ev: Event, mm: int, st: _MmState) -> None:
        if st.registered is not None:
            self._violation(1, mm, f"{self._desc(ev)} while the slot of {st.registered} was never freed")
        st.registered = self._desc(ev)
        st.entered = True

    def _free_slot(self, ev: Event, mm: int, st: _MmState) -> None:
        desc = self._desc(ev)
        if st.registered is not None:
            st.registered = None
            st.last_free = desc
        elif st.last_free is not None:
            self._violation(1, mm, f"slot freed twice: {st.last_free}, then {desc}")
        elif not st.entered:
            self.notes.append(f"rule 1: mm {mm}: {desc} but no ksm_enter was logged for it")
            st.last_free = desc

    def _ksm_exit(self, ev: Event, mm: int, st: _MmState) -> None:
        path = ev.get("path")
        if path in ("fast", "legacy"):
            self._free_slot(ev, mm, st)
        elif path == "slow":
            st.pending_slow.append(self._desc(ev))

    # -- rule 2: a slow ksm_exit is followed by slot_freed
    def _slot_freed(self, ev: Event, mm: int, st: _MmState) -> None:
        self._free_slot(ev, mm, st)
        st.pending_slow.clear()
        st.last_slot_freed = self._desc(ev)

    # -- rule 3: mm_freed only after mmdrop to 0, and once
    def _mmdrop(self, ev: Event, mm: int, st: _MmState) -> None:
        st.last_drop = (_int(ev.get("mm_count")), self._desc(ev))

    def _mm_freed(self, ev: Event, mm: int, st: _MmState) -> None:
        desc = self._desc(ev)
        if st.freed is not None:
            self._violation(3, mm, f"freed twice: {st.freed}, then {desc}")
        elif st.last_drop is None:
            self._violation(3, mm, f"{desc} with no mmdrop logged before it")
        elif st.last_drop[0] != 0:
            self._violation(
                3, mm, f"{desc} while the latest mmdrop left mm_count={st.last_drop[0]}: {st.last_drop[1]}"
            )
        st.freed = desc

    # -- rule 4: no merge after mm_exit_begin
    def _mm_exit_begin(self, ev: Event, mm: int, st: _MmState) -> None:
        if st.exit_begin_ns is None:
            st.exit_begin_ns = ev["mono_ns"]
            st.exit_begin = self._desc(ev)

    def _merge(self, ev: Event, mm: int, st: _MmState) -> None:
        t_last = _int(ev.get("t_last_ns"))
        if st.exit_begin_ns is not None and t_last is not None and t_last > st.exit_begin_ns:
            self._violation(
                4, mm,
                f"{self._desc(ev)}: its last merge is after {st.exit_begin}",
            )

    # -- rule 5: no hung task
    def _hung_task(self, ev: Event) -> None:
        chain = ev.get("chain")
        chain_s = " -> ".join(map(str, chain)) if isinstance(chain, list) else "?"
        self._violation(
            5, None,
            f"hung task: {ev.get('task_role', '?')} pid {ev.get('task_pid', '?')} blocked on "
            f"{ev.get('lock', '?')} for {ev.get('waited_s', '?')} s "
            f"(reported at {self._t(ev['mono_ns'])}); chain: {chain_s}",
        )

    # -- rule 6: no oops; rule 7: no use after free
    def _oops(self, ev: Event) -> None:
        tb = str(ev.get("tb", "")).strip().splitlines()
        self._violation(6, None, f"oops: {ev.get('role', '?')} pid {ev.get('pid', '?')} raised "
                                 f"{ev.get('error', '?')} (at {self._t(ev['mono_ns'])}); "
                                 f"last frame: {tb[-3].strip() if len(tb) >= 3 else '?'}")

    def _lockdep(self, ev: Event) -> None:
        self._violation(8, None, f"lockdep: {ev.get('role', '?')} pid {ev.get('pid', '?')} took "
                                 f"{ev.get('lock', '?')} ({ev.get('op', '?')}) holding {ev.get('held', '?')}: "
                                 f"{ev.get('kind', '?')} (at {self._t(ev['mono_ns'])}); chain: {ev.get('chain', '?')}")

    def _use_after_free(self, ev: Event) -> None:
        self._violation(7, _int(ev.get("mm")), f"{self._desc(ev)}: operation on a freed mm's lock")

    def feed(self, ev: Event) -> None:
        """One event of this cluster (in mono_ns order)."""
        if self.origin is None:
            self.origin = ev["mono_ns"]
        name = ev["event"]
        handler = self.handlers.get(name)
        if handler is not None:
            mm = _int(ev.get("mm"))
            if mm is None:
                self.notes.append(f"{self._desc(ev)} has no integer mm: ignored")
                return
            st = self.mms.get(mm)
            if st is None:
                st = self.mms[mm] = _MmState()
            handler(ev, mm, st)
        elif name == "hung_task":
            self._hung_task(ev)
        elif name == "oops":
            self._oops(ev)
        elif name == "use_after_free":
            self._use_after_free(ev)
        elif name == "lockdep":
            self._lockdep(ev)
        elif name == "cluster_stop":
            self.clean_stop = True
        elif name == "cluster_start":
            self.started = True

    def finish(self) -> CheckResult:
        for mm in sorted(self.mms):
            st = self.mms[mm]
            if st.registered is not None:
                text = f"{st.registered}, slot never freed (no ksm_exit fast/legacy, no slot_freed)"
                if self.clean_stop:
                    self._violation(1, mm, text)
                else:
                    self.notes.append(f"rule 1: mm {mm}: {text}; run has no cluster_stop")
            for desc in st.pending_slow:
                text = f"{desc} not followed by slot_freed"
                if st.last_slot_freed is not None:
                    text += f" (the last slot_freed came before it: {st.last_slot_freed})"
                if self.clean_stop:
                    self._violation(2, mm, text)
                else:
                    self.notes.append(f"rule 2: mm {mm}: {text}; run has no cluster_stop")
        missing = []
        if not self.started:
            missing.append("no cluster_start: the logs do not hold the cluster's start "
                           "(a folder holding part of a run?)")
        if not self.clean_stop:
            missing.append("no cluster_stop: the cluster did not stop cleanly (killed, or "
                           "its log cut short): the exits it never ran are not judged")
        return CheckResult(self.violations, self.notes, len(self.mms), self.clean_stop,
                           missing, self.started)


def check_events(events: Iterable[Event]) -> CheckResult:
    """Run the protocol rules over an event stream, each cluster instance
    (``uksm.logs.read.instance_of``) alone; see :class:`CheckResult`."""
    results = []
    for inst, c in by_cluster(events, _Checker).items():
        r = c.finish()
        r.cluster = label(inst)
        results.append(r)
    if not results:
        return CheckResult([], [], 0, False, ["no valid event: nothing to check"], False)
    if len(results) == 1:
        results[0].clusters = [results[0]]
        return results[0]

    def tag(r: CheckResult, lines: list[str]) -> list[str]:
        return [f"{r.cluster}: {x}" for x in lines]
    return CheckResult([x for r in results for x in tag(r, r.violations)],
                       [x for r in results for x in tag(r, r.notes)],
                       sum(r.mms for r in results), all(r.clean_stop for r in results),
                       [x for r in results for x in tag(r, r.missing)],
                       all(r.started for r in results), "", results)


def check(log_dir: str | Path) -> list[str]:
    """Protocol violations found in the logs alone (empty list: all rules hold).

    1. every ksm_enter's slot is freed exactly once, by ksm_exit path fast or
       legacy or by slot_freed, never both nor twice (not freed is only a note
       when the run has no cluster_stop);
    2. every ksm_exit path=slow is followed by a slot_freed for that mm;
    3. mm_freed only when the latest mmdrop of that mm left mm_count 0, at
       most once per mm;
    4. no merge whose t_last_ns is after that mm's mm_exit_begin;
    5. no hung_task event;
    6. no oops event (an unexpected exception in ksmd);
    7. no use_after_free event (an operation on a freed mm's lock);
    8. no lockdep event (a lock taken against the lock order, or twice).
    """
    return check_events(iter_events(log_dir)).violations
