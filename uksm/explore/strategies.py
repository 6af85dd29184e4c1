"""The search strategies: which schedule to run next.

- ``random``: at every step of the race phase, a uniformly random enabled
  process (seeded); with kills, one SIGKILL at a random step.
- ``pct``: probabilistic concurrency testing (Burckhardt, Kothari,
  Musuvathi, Nagarakatte, ASPLOS 2010): random distinct priorities per
  process, the highest-priority enabled process runs, and at d-1 random
  steps (of k, the race phase's length in the default run) the running
  process's priority drops below every other.  For a bug of depth d
  (d ordering constraints), each run finds it with probability at least
  1/(n * k^(d-1)), n processes.
- ``dfs``: depth-first search over the choices with a preemption bound
  (iterative context bounding, Musuvathi and Qadeer, PLDI 2007; CHESS),
  stateless: every schedule re-runs from the start.  Within the bound it
  is exhaustive: when it ends (``exhausted``) every schedule with at most
  K preemptions (and the allowed kills) has run once.

Preemptions are counted as CHESS counts them: switching away from the
running process while it could go on; switching at a block, an exit or a
yield (ksmd's sleep, an idle task) is free, and every enabled process is
a choice there too.  No pruning beyond the bound: see docs/EXPLORE.md for
what we considered (sleep sets, DPOR, state caching) and why not.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from uksm.explore.world import KILL, RUN, Action, View

@dataclass
class Level:
    alts: list[Action]
    costs: list[int]  # preemptions each costs
    idx: int
    preempts: int     # used before this step
    kills: int


def alternatives(v: View, bound_left: int, kills_left: int) -> list[Action]:
    """This step's choices, the default first, within what is left."""
    d = v.default()
    out = [d]
    for p in v.enabled:
        a = (RUN, p)
        if a != d and v.cost(a) <= bound_left:
            out.append(a)
    if kills_left > 0:
        out += [(KILL, p) for p in v.killable]
    return out


class DFS:
    """Preemption-bounded depth-first search, one chooser per schedule."""

    def __init__(self, bound: int, kills: int = 0) -> None:
        self.bound = bound
        self.kills = kills
        self.stack: list[Level] = []
        self.depth = 0
        self.done = False

    def next(self) -> "DFS | None":
        if self.done:
            return None
        self.depth = 0
        return self

    def choose(self, v: View) -> Action:
        i = self.depth
        self.depth += 1
        if i < len(self.stack):
            lv = self.stack[i]
            a = lv.alts[lv.idx]
            if a not in [*((RUN, p) for p in v.enabled), *((KILL, p) for p in v.killable)]:
                raise RuntimeError(f"dfs: the run is not deterministic (step {v.n})")
            return a
        pre = kl = 0
        if self.stack:
            last = self.stack[-1]
            pre = last.preempts + last.costs[last.idx]
            kl = last.kills + (last.alts[last.idx][0] == KILL)
        alts = alternatives(v, self.bound - pre, self.kills - kl)
        self.stack.append(Level(alts, [v.cost(a) for a in alts], 0, pre, kl))
        return alts[0]

    def backtrack(self) -> None:
        """After a run: the next schedule's prefix, or done."""
        del self.stack[self.depth:]
        while self.stack:
            lv = self.stack[-1]
            if lv.idx + 1 < len(lv.alts):
                lv.idx += 1
                return
            self.stack.pop()
        self.done = True


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
            return (KILL, self.rng.choice(v.killable))
        return (RUN, self.rng.choice(v.enabled))


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
            return (KILL, self.rng.choice(v.killable))
        best = max(v.enabled, key=lambda p: self.prio[p])
        if i in self.changes:
            # the priority change point: the running process drops below all
            self.prio[best] = self.d - 1 - self.changes.index(i) + self.rng.random() * 0.5
            best = max(v.enabled, key=lambda p: self.prio[p])
        return (RUN, best)
