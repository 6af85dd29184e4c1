"""What the children say on stderr: passed on, and the last of it kept.

A child (ksmd, a worker, the run= writer) that dies of its own error --
an import error before it ran a line of uksm, a traceback, a one-line
``uksm-worker: ...`` -- is reported by the supervisor with what it said
(``Supervisor.task_failed``), in one line, at once.  So each child's
stderr is a pipe, read by one thread (``StderrTee``) that writes every
chunk on to this process's stderr as it comes (the user sees what the
child wrote, where it always went) and keeps the last ``TAIL`` bytes of
each child.

The thread owns the read ends: ``open`` makes a pipe and returns its write
end for Popen (the caller closes it once the child has it), ``watch``
gives the read end to the thread under the child's pid, ``tail`` waits
(briefly: the child is dead, its pipe is at EOF once read out) and
returns the last non-empty line."""
from __future__ import annotations

import os
import selectors
import threading
import time

TAIL = 4096


class StderrTee:
    def __init__(self, out_fd: int = 2) -> None:
        self.out_fd = out_fd
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()       # tails, done, pending
        self.tails: dict[int, bytearray] = {}
        self.done: set[int] = set()        # pids whose pipe reached EOF
        self.pending: list[tuple[int, int]] = []   # (read fd, pid) for the thread to register
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="stderr-tee", daemon=True)
        self.thread.start()

    def open(self) -> tuple[int, int]:
        """A pipe for one child: (read end, write end); the write end is the
        child's stderr."""
        r, w = os.pipe()
        os.set_inheritable(w, True)
        return r, w

    def watch(self, r: int, pid: int) -> None:
        """Read child ``pid``'s stderr (the read end ``r``) from now on."""
        with self.lock:
            self.tails[pid] = bytearray()
            self.pending.append((r, pid))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        while True:
            for key, _ev in self.sel.select():
                if key.data is None:               # woken: new pipes, or stop
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self.lock:
                        pending, self.pending = self.pending, []
                        stopping = self.stopping
                    for r, pid in pending:
                        self.sel.register(r, selectors.EVENT_READ, pid)
                    if stopping:
                        self._close_all()
                        return
                    continue
                self._read(key.fd, key.data)

    def _read(self, fd: int, pid: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            self.sel.unregister(fd)
            os.close(fd)
            with self.lock:
                self.done.add(pid)
            return
        try:
            os.write(self.out_fd, chunk)
        except OSError:
            pass
        with self.lock:
            t = self.tails.setdefault(pid, bytearray())
            t += chunk
            del t[:-TAIL]

    def tail(self, pid: int, timeout: float = 1.0) -> str:
        """The last non-empty line child ``pid`` wrote on stderr ("" if
        none), once its pipe is read out (or after ``timeout``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if pid in self.done or pid not in self.tails:
                    break
            time.sleep(0.005)
        with self.lock:
            text = bytes(self.tails.get(pid, b"")).decode(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def forget(self, pid: int) -> None:
        with self.lock:
            self.tails.pop(pid, None)
            self.done.discard(pid)

    def close(self) -> None:
        """Stop the thread and close every pipe still open (children that
        outlive the supervisor write to a closed pipe: they are dying)."""
        with self.lock:
            self.stopping = True
        self._wake()
        self.thread.join(timeout=5)

    def _close_all(self) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data is not None:   # what a dead child wrote last, still in its pipe
                os.set_blocking(key.fd, False)
                while True:
                    try:
                        chunk = os.read(key.fd, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    try:
                        os.write(self.out_fd, chunk)
                    except OSError:
                        pass
            self.sel.unregister(key.fd)
            os.close(key.fd)
        self.sel.close()
        os.close(self.wake_w)
