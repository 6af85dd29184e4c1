"""The C core of the lock protocol (uksm/kernel/_lockcore.c): built and in
use, held to the Python reference, and crash-consistent under a real
SIGKILL.

test_lock_protocol.py runs every protocol test on both ``Task`` (C) and
``PyTask`` (the reference); here: that the C core is what ships, that the
suite also passes with it switched off (``UKSM_LOCKS=python``, the Python
``Lock`` fields included), what it does with bad input, and recover()'s
count after a process running the C path is killed at random instants.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator

import posix_ipc
import pytest

from uksm.kernel import locks
from uksm.kernel.layout import C_DAEMON, C_MMAP, C_PTL, E_WORD, ESIZE, NCLASS, T_LOCKS
from uksm.kernel.locks import IDLE, Lock, PyTask, Task

pytestmark = pytest.mark.timeout(120)

ROW = 100


def _compiler() -> bool:
    """A C compiler and Python's headers are here now."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    return shutil.which(cc) is not None and headers


def built_core() -> str | None:
    """The C core the install built beside locks.py (None: it built none).
    What the build produced decides, not whether a compiler is here when
    the tests run: deploy/Containerfile removes gcc once the install has
    built the core."""
    d = os.path.dirname(os.path.abspath(locks.__file__))
    return next((os.path.join(d, "_lockcore" + sfx) for sfx in importlib.machinery.EXTENSION_SUFFIXES
                 if os.path.exists(os.path.join(d, "_lockcore" + sfx))), None)


def no_core_built() -> None:
    """Where the install built no core: a failure if a compiler is here
    (the optional build failed: every lock pair would cost 0.5 us more,
    silently), else an allowed skip (conftest.ALLOWED_SKIPS)."""
    assert not _compiler(), ("no C core was built though a compiler is here: the build failed "
                             "(pip install -e . again and read its output)")
    pytest.skip(f"no-c-core: no _lockcore{importlib.machinery.EXTENSION_SUFFIXES[0]} beside "
                f"{locks.__file__} and no C compiler here")


@pytest.fixture
def sem() -> Iterator[posix_ipc.Semaphore]:
    s = posix_ipc.Semaphore(f"/uksmtest.lkc{os.getpid()}", posix_ipc.O_CREX, mode=0o600,
                            initial_value=1)
    try:
        yield s
    finally:
        s.unlink()
        s.close()


def test_the_c_core_is_built_and_used(sem: posix_ipc.Semaphore) -> None:
    """Where the install built the C core, Task is it: a silent fall-back
    to the reference would cost every lock pair 0.5 us (the extension is
    optional only for machines without a compiler); UKSM_LOCKS=python is
    the one switch to the reference."""
    if os.environ.get("UKSM_LOCKS") == "python":
        assert locks.IMPL == "python" and Task is PyTask
        return
    if built_core() is None:
        no_core_built()
    assert locks.IMPL == "c", f"{built_core()} was built but is not in use"
    assert Task is not PyTask and issubclass(Task, PyTask)
    src = os.path.join(os.path.dirname(locks.__file__), "_lockcore.c")
    if os.path.exists(src):   # an editable install: built from the source beside it?
        with open(src, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]
        assert locks._lockcore.source == sha, "the C core is older than _lockcore.c: pip install -e . again"
    lk = Lock(sem, 1, C_DAEMON)
    assert lk.fast is True          # its semaphore mapped here: sem_trywait/sem_post in C


def test_the_protocol_tests_pass_on_the_python_reference() -> None:
    """test_lock_protocol.py with the C core switched off: the reference
    alone (PyTask, the Python Lock fields) passes every test too."""
    env = dict(os.environ, UKSM_LOCKS="python")
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_lock_protocol.py")],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout
    chk = subprocess.run([sys.executable, "-c", "from uksm.kernel import locks; "
                          "print(locks.IMPL, locks.Task is locks.PyTask, "
                          "type(locks.Lock.__mro__[1]).__module__, locks.Lock.__mro__[1].__name__)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert chk.stdout.split() == ["python", "True", "builtins", "_LockFields"], chk.stderr


def c_core() -> bool:
    """The C core is in use (True), or the test skips: only where the
    install built none (no compiler), never where it was switched off."""
    if Task is PyTask:
        if built_core() is not None:
            assert os.environ.get("UKSM_LOCKS") == "python", f"{built_core()} was built but is not in use"
            pytest.skip("no-c-core: switched off (UKSM_LOCKS=python)")
        no_core_built()
    return True


def test_the_core_built_is_used_where_no_compiler_is_left(tmp_path) -> None:
    """deploy/Containerfile's case: the install built the core, then gcc
    was removed.  The test above passes there (it used to assert the
    reference was in use wherever no compiler was found, and failed)."""
    if built_core() is None:
        no_core_built()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PATH=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        os.path.join(here, "test_lockcore.py") + "::test_the_c_core_is_built_and_used"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0 and "1 passed" in p.stdout and "skipped" not in p.stdout, p.stdout + p.stderr


def test_c_core_bad_input(sem: posix_ipc.Semaphore) -> None:
    if not c_core():
        return
    q = memoryview(bytearray(8 * ROW * 2)).cast("q")
    t = Task(q, ROW, 1)
    with pytest.raises(TypeError, match="expected a Lock"):
        t.lock(object())            # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lock"):
        t.lock()                    # type: ignore[call-arg]
    with pytest.raises(TypeError, match="int64"):
        Task(memoryview(bytearray(800)), ROW, 1)   # bytes, not int64 words
    with pytest.raises(ValueError, match="class"):
        Lock(sem, 1, 99)
    from uksm.kernel.layout import E_LOCK, E_WORD, M_ID, M_STATE, MMS_FREE, MMS_FREEING
    locks._lockcore.layout(-1, -1, -1, -1, 0, 0)      # as if locks.py had not given the offsets
    try:
        with pytest.raises(RuntimeError, match="layout"):
            t.lock(Lock(sem, 1, C_PTL, mm=1))
    finally:
        locks._lockcore.layout(E_LOCK, E_WORD, M_ID, M_STATE, MMS_FREEING, MMS_FREE)
    short = Task(memoryview(bytearray(8 * 10)).cast("q"), 0, 0)   # the row does not fit
    lk = Lock(sem, 1, C_PTL, mm=1)
    with pytest.raises(IndexError):
        short.lock(lk)
    assert sem.value == 1           # nothing taken on the way to the error


def test_c_core_follows_a_replaced_semaphore(sem: posix_ipc.Semaphore) -> None:
    """``lk.sem`` set to a stand-in (a test's spy) goes through its Python
    methods; set back, the C path maps it again."""
    if not c_core():
        return
    lk = Lock(sem, 1, C_DAEMON)
    calls: list[str] = []

    class Spy:
        def acquire(self, timeout: float | None = None) -> None:
            calls.append(f"acquire {timeout}")
            sem.acquire(timeout)

        def release(self) -> None:
            calls.append("release")
            sem.release()

    q = memoryview(bytearray(8 * ROW * 2)).cast("q")
    t = Task(q, ROW, 1)
    lk.sem = Spy()                  # type: ignore[assignment]
    assert lk.fast is False
    t.lock(lk)
    assert t.trylock(lk) is False
    t.unlock(lk)
    assert calls == ["acquire 0", "acquire 0", "release"]
    lk.sem = sem
    assert lk.fast is True
    t.lock(lk)
    t.unlock(lk)
    assert calls == ["acquire 0", "acquire 0", "release"] and sem.value == 1


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("seed", range(2))
def test_sigkill_at_random_instants_of_the_protocol(sem: posix_ipc.Semaphore, seed: int, impl: str) -> None:
    """A process loops over the protocol's uncontended and contended paths
    (lock, a failing trylock, down_read, trylock, up_read, unlock) beside a
    live partner doing the same (so that waits block: PyTask._block), and
    is SIGKILLed at a random instant, 30 times: recover(), with the partner
    live and running, must find exactly the units the dead held -- the
    semaphores end full once the partner stops, never over, never short --
    whichever word transition or semaphore operation the kill landed in."""
    task_cls = PyTask if impl == "python" else Task
    rng = random.Random(seed)
    rw = posix_ipc.Semaphore(f"/uksmtest.lkr{os.getpid()}", posix_ipc.O_CREX, mode=0o600,
                             initial_value=3)
    buf = mmap.mmap(-1, 8 * ROW * 4, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    q = memoryview(buf).cast("q")
    stop = 3 * ROW    # a word the partner polls
    mx, rd = Lock(sem, 1, C_DAEMON), Lock(rw, 3, C_MMAP, mm=1)

    def loop(row: int, nap: float) -> None:
        t = task_cls(q, row * ROW, row)
        while not q[stop]:
            t.lock(mx)
            t.trylock(mx)           # busy: a failed trylock's words
            t.lock(rd)
            if t.trylock(rd):
                t.unlock(rd)
            t.unlock(rd)
            t.unlock(mx)
            if nap:
                time.sleep(nap)

    partner = pid = -1
    try:
        partner = os.fork()
        if partner == 0:
            try:
                loop(2, 0.0002)
            finally:
                os._exit(0)
        kills = {"held": 0, "idle": 0, "window": 0}
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                try:
                    loop(1, 0)
                finally:
                    os._exit(1)
            time.sleep(rng.uniform(0.0005, 0.008))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pid = -1          # reaped: never signalled again (its number may be reused)
            for lk in (mx, rd):
                st = q[ROW + T_LOCKS + lk.cls * ESIZE + E_WORD] & 3
                kills["held" if st == locks.HELD else "idle" if st == IDLE else "window"] += 1
            got = locks.recover(q, {mx.lid: mx, rd.lid: rd}, lambda: [(2, 2 * ROW)], [(1, ROW)])
            for lid, lk in ((mx.lid, mx), (rd.lid, rd)):
                for _u in range(got[lid]):
                    lk.sem.release()
            assert all(q[ROW + T_LOCKS + c * ESIZE + E_WORD] & 3 == IDLE for c in range(NCLASS))
        q[stop] = 1
        _pid, status = os.waitpid(partner, 0)
        partner = -1
        assert status == 0          # the partner never met an error or a lost unit
        assert (sem.value, rw.value) == (1, 3), kills
        # the kills did land inside the protocol (holding, waiting, or in a window)
        assert kills["held"] + kills["window"] > 0, kills
    finally:
        q[stop] = 1
        for child in (pid, partner):   # interrupted mid-run (a timeout): neither outlives it
            if child > 0:
                try:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        q.release()
        buf.close()
        rw.unlink()
        rw.close()


def test_c_core_edges(sem: posix_ipc.Semaphore) -> None:
    """What the review of the C core found at its edges: a Lock never
    initialised raises instead of crashing the interpreter; a subclass of
    posix_ipc.Semaphore keeps its own methods; a closed Lock raises as the
    reference does (the mapping is dropped with it); lock() takes ``lk=``;
    a cycle through a stand-in semaphore is collected."""
    if not c_core():
        return
    import gc
    import weakref
    q = memoryview(bytearray(8 * ROW * 2)).cast("q")
    t = Task(q, ROW, 1)
    bare = Lock.__new__(Lock)
    assert bare.sem is None and bare.mmrow == -1
    with pytest.raises(AttributeError):
        t.lock(bare)          # None has no acquire: an exception, not a crash

    class Sub(posix_ipc.Semaphore):      # type: ignore[misc]
        calls = 0

        def acquire(self, timeout: float | None = None) -> None:
            Sub.calls += 1
            super().acquire(timeout)

    sub = Sub(sem.name)
    lk = Lock(sub, 1, C_DAEMON)
    assert lk.fast is False
    t.lock(lk)
    t.unlock(lk)
    assert Sub.calls == 1
    sub.close()

    lk = Lock(posix_ipc.Semaphore(sem.name), 1, C_DAEMON)
    t.lock(lk=lk, check=False)
    t.unlock(lk)
    lk.close()
    assert lk.fast is False
    with pytest.raises(posix_ipc.ExistentialError):
        t.lock(lk)
    assert sem.value == 1

    class Spy:
        def __init__(self, lock: Lock) -> None:
            self.lock = lock

    cyc = Lock(sem, 1, C_DAEMON)
    spy = Spy(cyc)
    cyc.sem = spy             # type: ignore[assignment]
    gone = weakref.ref(spy)
    del cyc, spy
    gc.collect()
    assert gone() is None
