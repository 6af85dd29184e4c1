"""The search strategies: which schedule to run next.

- ``dfs``: iterative context bounding (Musuvathi and Qadeer, "Iterative
  context bounding for systematic testing of multithreaded programs",
  PLDI 2007; CHESS, OSDI 2008): every schedule with 0 preemptions, then
  every one with exactly 1, then 2, up to the bound -- so a bug that needs
  one preemption is found before the search goes deep.  Stateless: each
  schedule re-runs from the start.  Within the bound it is exhaustive:
  when it ends (``exhausted``) every schedule with at most K preemptions
  (and the allowed kills) has run exactly once.
- ``pct``: probabilistic concurrency testing (Burckhardt, Kothari,
  Musuvathi, Nagarakatte, ASPLOS 2010): random distinct priorities per
  process, the highest-priority enabled process runs, and at d-1 random
  steps (of k, the race phase's length in the default run) the running
  process's priority drops below every other.  For a bug of depth d
  (d ordering constraints), each run finds it with probability at least
  1/(n * k^(d-1)), n processes.
- ``random``: at every step of the race phase, a uniformly random enabled
  process (seeded); with kills, one SIGKILL at a random step.

Preemptions are counted as CHESS counts them: switching away from the
running process while it could go on; switching at a block, an exit or a
sleep (ksmd's sleep_millisecs, an idle worker) is free, and every enabled
process is a choice there too.

The schedules of ``dfs`` form a tree: a schedule is its list of
deviations from the default policy (``uksm.explorer.schedule``), and its
children are itself plus one more deviation at a later step of its run
(each alternative that run met there).  Every deviation list is made
once, from its own prefix: no schedule runs twice.  A child costs its
parent's preemptions plus the new deviation's (0 or 1): the cheap ones
join the current round, the others wait for the next.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import NamedTuple

from uksm.explorer.schedule import Deviation, fits
from uksm.explorer.world import KILLED, RUN, Action, View


class Node(NamedTuple):
    devs: tuple[Deviation, ...]
    preempts: int
    kills: int

    @property
    def last(self) -> int:
        return self.devs[-1].step if self.devs else -1


class ICB:
    """Iterative context bounding over the tree of schedules."""

    def __init__(self, bound: int, kills: int = 0) -> None:
        self.bound = bound
        self.kills = kills
        self.levels: dict[int, list[Node]] = {0: [Node((), 0, 0)]}
        self.level = 0
        self.ran: Counter[int] = Counter()   # schedules run, by their preemptions

    def next(self) -> "NodeRun | None":
        while self.level <= self.bound:
            stack = self.levels.get(self.level)
            if stack:
                return NodeRun(self, stack.pop())
            self.level += 1
        return None

    def pending(self) -> int:
        return sum(len(v) for k, v in self.levels.items() if k <= self.bound)


class NodeRun:
    """One schedule of the tree: its deviations, the default elsewhere;
    after the last deviation it notes each step's alternatives."""

    def __init__(self, icb: ICB, node: Node) -> None:
        self.icb = icb
        self.node = node
        self.devs = {d.step: d for d in node.devs}
        self.alts: list[tuple[Deviation, int]] = []

    def choose(self, v: View) -> Action:
        node, icb = self.node, self.icb
        d = self.devs.get(v.n)
        if d is not None:
            if not fits(d, v):
                raise RuntimeError(f"dfs: the run is not deterministic (step {v.n} differs from its "
                                   f"first run)")
            return (d.kind, d.proc)
        a = v.default()
        if v.n > node.last:
            left = icb.bound - node.preempts
            for p in v.enabled:
                if (RUN, p) != a:
                    c = v.cost((RUN, p))
                    if c <= left:
                        self.alts.append((Deviation(v.n, RUN, p, v.codes[p]), c))
            if node.kills < icb.kills:
                for p in v.killable:
                    self.alts.append((Deviation(v.n, KILLED, p, v.codes[p]), 0))
        return a

    def done(self) -> None:
        """The run is over: its children join their rounds (last step
        first on the stack, so the earliest deviation runs next)."""
        node, icb = self.node, self.icb
        icb.ran[node.preempts] += 1
        for d, c in reversed(self.alts):
            child = Node(node.devs + (d,), node.preempts + c, node.kills + (d.kind == KILLED))
            icb.levels.setdefault(child.preempts, []).append(child)


class Random:
    def __init__(self, seed: int, kills: int = 0, k: int = 100) -> None:
        self.rng = random.Random(seed)
        self.kills = kills
        self.k = max(1, k)

    def next(self) -> "Random":
        self.i = 0
        self.kill_at = self.rng.randrange(self.k) if self.kills else -1
        return self

    def choose(self, v: View) -> Action:
        self.i += 1
        if self.i - 1 == self.kill_at and v.killable:
            return (KILLED, self.rng.choice(v.killable))
        return (RUN, self.rng.choice(v.enabled))

    def done(self) -> None:
        pass


class PCT:
    """PCT with depth ``d``: k is the race phase's steps in the default run."""

    def __init__(self, seed: int, depth: int, k: int, kills: int = 0) -> None:
        self.rng = random.Random(seed)
        self.d = max(1, depth)
        self.k = max(1, k)
        self.kills = kills

    def next(self) -> "PCT":
        self.prio: dict[int, float] = {}
        self.i = 0
        self.changes = sorted(self.rng.sample(range(self.k), min(self.d - 1, self.k)))
        self.kill_at = self.rng.randrange(self.k) if self.kills else -1
        return self

    def choose(self, v: View) -> Action:
        i = self.i
        self.i += 1
        for p in v.enabled:
            if p not in self.prio:   # a new process: a random priority above the d low ones
                self.prio[p] = self.d + self.rng.random()
        if i == self.kill_at and v.killable:
            return (KILLED, self.rng.choice(v.killable))
        best = max(v.enabled, key=lambda p: self.prio[p])
        if i in self.changes:
            # the priority change point: the running process drops below all
            self.prio[best] = self.d - 1 - self.changes.index(i) + self.rng.random() * 0.5
            best = max(v.enabled, key=lambda p: self.prio[p])
        return (RUN, best)

    def done(self) -> None:
        pass
