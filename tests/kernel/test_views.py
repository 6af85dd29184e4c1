"""The named views (uksm.kernel.views) read and write the words their
names say: each field ``x`` of TaskRow is T_X, of MmRow M_X, and a store
through a view is the one store to that word, nothing else."""
from __future__ import annotations

import pytest

from uksm.kernel import layout
from uksm.kernel.views import MmRow, TaskRow, Word, Words


def fields(cls: type[Words]) -> dict[str, int]:
    return {n: w.off for n, w in vars(cls).items() if isinstance(w, Word)}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cls,prefix,size", [(TaskRow, "T_", layout.T_FIXED),
                                             (MmRow, "M_", layout.MM_SIZE)])
def test_each_field_is_the_word_of_its_name(cls, prefix, size):
    f = fields(cls)
    assert f, cls
    for name, off in f.items():
        assert getattr(layout, prefix + name.upper()) == off, name
    # every word of the row has its field (the lock entries after T_FIXED are locks.py's)
    assert sorted(f.values()) == list(range(size)), sorted(set(range(size)) - set(f.values()))


@pytest.mark.timeout(10)
def test_a_store_through_a_view_is_that_word_alone():
    q = [0] * 200
    base = 37
    t = TaskRow(q, base)
    t.exit_path = 5
    assert q[base + layout.T_EXIT_PATH] == 5 and sum(q) == 5
    q[base + layout.T_PID] = 4242
    assert t.pid == 4242
    m = MmRow(q, 100)
    m.users += 2
    assert q[100 + layout.M_USERS] == 2 and m.users == 2
