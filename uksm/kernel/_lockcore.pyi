# The C core of uksm.kernel.locks (uksm/kernel/_lockcore.c).
from collections.abc import Callable
from typing import Any

source: str   # the first 16 hex digits of the C file's sha256 it was built from

def layout(e_lock: int, e_word: int, m_id: int, m_state: int, mms_freeing: int, mms_free: int) -> None: ...

class LockCore:
    sem: Any
    units: int
    cls: int
    lid: int
    name: str
    mm: int
    mmrow: int
    mmbase: int
    fast: bool
    def __init__(self, sem: Any, units: int, cls: int, lid: int, name: str, mm: int = 0) -> None: ...
    def close(self) -> None: ...

class TaskCore:
    uaf: Callable[..., None] | None
    lockdep: Callable[..., None] | None
    sched: Callable[..., None] | None
    def _core_bind(self, q: memoryview, ebase: list[int]) -> None: ...
    def lock(self, lk: LockCore, check: bool = True) -> None: ...
    def trylock(self, lk: LockCore) -> bool: ...
    def unlock(self, lk: LockCore) -> None: ...
