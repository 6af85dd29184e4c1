"""workers/workloads.py (uksm.workers.workloads): what each worker writes,
as the README describes the workloads -- ``identical``: one non-zero
content everywhere; ``unique``: no two pages equal anywhere; ``zero``;
``dup:K``: page i holds content i mod K in every worker; ``volatile``:
rewritten all the time; ``vm``: most pages from a shared base image, some
zero, some unique, some volatile -- deterministic from (workload, seed,
worker, page, version), and bad names refused in one line."""
from __future__ import annotations

from collections import Counter

import pytest
from uksm.workers.workloads import ZERO, Workload, page, validate

from uksm.host.shm import UksmError

PAGES = 64
W = (1, 2, 3)


def contents(spec: str, seed: int = 0, version: int = 0) -> dict[int, list[bytes]]:
    return {w: [Workload(spec, seed, w).content(i, version) for i in range(PAGES)] for w in W}


def test_identical_unique_zero():
    same = contents("identical")
    assert len({p for ps in same.values() for p in ps}) == 1 and same[1][0] != ZERO
    uniq = contents("unique")
    assert len({p for ps in uniq.values() for p in ps}) == len(W) * PAGES
    assert all(p == ZERO for ps in contents("zero").values() for p in ps)
    for spec in ("identical", "unique", "zero"):
        assert not any(Workload(spec, 0, 1).volatile(i) for i in range(PAGES))


@pytest.mark.parametrize("k", [1, 5, 64, 2000])
def test_dup_k_is_i_mod_k_in_every_worker(k: int):
    """Page i holds content number i mod K, the same in every worker
    (cached for K up to 1024, made on the fly above: the same bytes)."""
    c = contents(f"dup:{k}")
    for i in range(PAGES):
        assert c[1][i] == c[2][i] == c[3][i]
        assert c[1][i] == c[1][i % k]
    assert len(set(c[1])) == min(k, PAGES) and ZERO not in c[1]
    assert Workload(f"dup:{k}", 0, 1).content(3) == page(3, 0, 3 % k)   # kind K_DUP = 3


def test_volatile_pages_change_with_every_version():
    wl = Workload("volatile", 0, 1)
    assert all(wl.volatile(i) for i in range(PAGES))
    v0, v1 = contents("volatile", version=0), contents("volatile", version=1)
    assert all(a != b for a, b in zip(v0[1], v1[1]))
    assert len({p for ps in v0.values() for p in ps}) == len(W) * PAGES   # and no two alike


def test_vm_like_guests_of_one_image():
    """vm: about 55% base-image pages (the same in every worker, different
    from each other), 15% zero, 22% unique, 8% volatile; the split is the
    seed's, the same in every worker."""
    n = 2000
    wl = [Workload("vm", 7, w) for w in W]
    kinds: Counter[str] = Counter()
    for i in range(n):
        vol = wl[0].volatile(i)
        assert all(x.volatile(i) == vol for x in wl)
        ps = [x.content(i) for x in wl]
        if vol:
            kinds["volatile"] += 1
            assert len(set(ps)) == len(W) and wl[0].content(i, 1) != ps[0]
        elif ps[0] == ZERO:
            kinds["zero"] += 1
            assert set(ps) == {ZERO}
        elif ps[0] == ps[1] == ps[2]:
            kinds["base"] += 1
        else:
            kinds["unique"] += 1
            assert len(set(ps)) == len(W)
    share = {k: v / n for k, v in kinds.items()}
    assert share["base"] == pytest.approx(0.55, abs=0.04) and share["zero"] == pytest.approx(0.15, abs=0.03)
    assert share["unique"] == pytest.approx(0.22, abs=0.03) and share["volatile"] == pytest.approx(0.08, abs=0.02)
    base = [wl[0].content(i) for i in range(n) if not wl[0].volatile(i) and wl[0].content(i) == wl[1].content(i)
            and wl[0].content(i) != ZERO]
    assert len(set(base)) == len(base)     # each base page its own content
    # another seed, another split and other contents; the same seed, the same
    other = Workload("vm", 8, 1)
    assert [other.volatile(i) for i in range(n)] != [wl[0].volatile(i) for i in range(n)]
    assert [Workload("vm", 7, 1).content(i) for i in range(50)] == [wl[0].content(i) for i in range(50)]


def test_pages_are_never_all_zero_and_equal_only_for_equal_arguments():
    made = {page(k, s, a, b, v) for k in (1, 2) for s in (0, 1) for a in (0, 5) for b in (0, 9) for v in (0, 3)}
    assert len(made) == 32 and ZERO not in made and all(len(p) == 4096 for p in made)


@pytest.mark.parametrize("spec,msg", [
    ("nope", "unknown workload 'nope' (one of: identical, unique, zero, dup:K, volatile, vm; "
             "any of them +fork or +fork:MS)"),
    ("vm+fork:x", "bad workload 'vm+fork:x': +fork or +fork:MS, MS a whole number of "
                  "milliseconds >= 1"),
    ("vm+fork:0", "bad workload 'vm+fork:0': +fork or +fork:MS, MS a whole number of "
                  "milliseconds >= 1"),
    ("dup:x", "bad workload 'dup:x': dup:K needs a whole number K >= 1"),
    ("dup:0", "bad workload 'dup:0': dup:K needs K >= 1"),
    ("dup:-3", "bad workload 'dup:-3': dup:K needs K >= 1"),
])
def test_bad_workloads_are_refused_in_one_line(spec: str, msg: str):
    with pytest.raises(UksmError) as e:
        validate(spec)
    assert str(e.value) == msg and e.value.status == 2
    assert validate("dup:3") == "dup:3"
