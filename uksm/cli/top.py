"""``uksm top``: a live terminal view of a cluster (curses).

Reads the cluster's shared memory directly, as ``uksm status`` does, every
``--interval`` seconds: the /sys/kernel/mm/ksm knobs and counters with
their change per second, frames used/free, the pool's host memory, the
workers' exit statistics and one row per address space.  ``q`` (or Ctrl-C)
quits; ``curses.wrapper`` leaves the terminal as it found it, also after an
error.  If the cluster goes down meanwhile, top says so and exits (0 after a
clean ``down``, 1 if the cluster died and left objects behind).
"""
from __future__ import annotations

import curses
import sys
import time
from typing import Any

from uksm.host import shm
from uksm.host.exitcodes import EXIT_ERR, EXIT_OK
from uksm.kernel.cluster import pid_alive
from uksm.kernel.layout import PAGE_SIZE
from uksm.proc.control import attach, not_running, read_state


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_status(st: dict[str, Any]) -> list[str]:
    """status as text lines (also the body of ``top``)."""
    k, fr, w = st["ksm"], st["frames"], st["workers"]
    sup = f"{st['supervisor_pid']}" + ("" if st["supervisor_alive"] else " (gone)")
    ksmd = f"{st['ksmd_pid']}" + ("" if st["ksmd_alive"] else " (not running)")
    hz = f"  hazards {','.join(st['hazards'])}" if st["hazards"] else ""
    if st.get("kernel", "2.6.32") != "2.6.32":   # said only when not the default
        hz += f"  kernel {st['kernel']}"
    out = [
        f"cluster {st['cluster']}  {st['state']}  up {st['uptime_s']:.0f}s  supervisor {sup}  "
        f"ksmd {ksmd}  exit_policy {st['exit_policy']}{hz}",
        f"ksm      run {k['run']}  pages_to_scan {k['pages_to_scan']}  sleep_millisecs "
        f"{k['sleep_millisecs']}  full_scans {k['full_scans']}  pages_scanned {k['pages_scanned']}",
        f"         pages_shared {k['pages_shared']}  pages_sharing {k['pages_sharing']}  "
        f"pages_unshared {k['pages_unshared']}  pages_volatile {k['pages_volatile']}",
        f"memory   frames used {fr['used']}  free {fr['free']}  of {fr['total']}"
        f"{'  mem_limit ' + str(st['mem_limit']) if st['mem_limit'] else ''}  pool resident "
        f"{_mib(st['memory']['host_bytes_resident'])}  saved by merging "
        f"{_mib(k['pages_sharing'] * PAGE_SIZE)}",
        f"workers  started {w['started']}  exited {w['exited']} (fast {w['exit_fast']} slow "
        f"{w['exit_slow']} legacy {w['exit_legacy']} noslot {w['exit_noslot']})  killed "
        f"{w['killed']}  oom_killed "
        f"{w['oom_killed']}  reaped {w['reaped']}",
        "",
        f"{'WORKER':<7} {'PID':>8} {'MM':>5} {'STATE':<13} {'PAGES':>6} {'RSS':>6} {'RMAP':>6} "
        f"{'MERGING':>7} {'USERS':>5} {'COUNT':>5}",
    ]
    for m in st["mms"]:
        pid = f"{m['owner_pid']}" + ("" if m["owner_alive"] else "-")
        out.append(f"{m['worker']:<7} {pid:>8} {m['mm']:>5} {m['state']:<13} {m['pages']:>6} "
                   f"{m['rss']:>6} {m['ksm_rmap_items']:>6} {m['ksm_merging_pages']:>7} "
                   f"{m['mm_users']:>5} {m['mm_count']:>5}")
    if not st["mms"]:
        out.append("(no address spaces)")
    return out


COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "pages_scanned")


class Screen:
    """addstr that never raises for text past the edge of the window."""

    def __init__(self, win: Any) -> None:
        self.win = win
        self.h, self.w = win.getmaxyx()

    def put(self, y: int, x: int, text: str, attr: int = 0) -> None:
        if y >= self.h or x >= self.w - 1:
            return
        try:
            self.win.addstr(y, x, text[:self.w - 1 - x], attr)
        except curses.error:
            pass


def _rate(now: dict[str, Any], prev: dict[str, Any] | None, key: str, dt: float) -> str:
    if prev is None or dt <= 0:
        return ""
    d = now["ksm"][key] - prev["ksm"][key]
    return f"{d / dt:+.1f}/s" if d else "0"


def draw(win: Any, st: dict[str, Any], prev: dict[str, Any] | None, dt: float, interval: float) -> None:
    s = Screen(win)
    win.erase()
    bold = curses.A_BOLD
    s.put(0, 0, f" uksm top  cluster {st['cluster']}  {st['state']}  up {st['uptime_s']:.0f}s  "
                f"{time.strftime('%H:%M:%S')}  every {interval:g}s  q quits ".ljust(s.w - 1),
          curses.A_REVERSE)
    k = st["ksm"]
    s.put(2, 0, f"run {k['run']}   pages_to_scan {k['pages_to_scan']}   sleep_millisecs "
                f"{k['sleep_millisecs']}   exit_policy {st['exit_policy']}   mem_limit "
                f"{st['mem_limit'] or 'none'}")
    s.put(4, 0, f"{'counter':<16}{'value':>12}{'change':>14}", bold)
    for i, key in enumerate(COUNTERS):
        y = 5 + i
        s.put(y, 0, key)
        s.put(y, 16, f"{k[key]:>12}")
        s.put(y, 28, f"{_rate(st, prev, key, dt):>14}")
    fr = st["frames"]
    total = max(1, fr["total"])
    bar_w = max(10, min(50, s.w - 50))
    used = round(bar_w * fr["used"] / total)
    y = 5 + len(COUNTERS) + 1
    s.put(y, 0, f"frames  [{'#' * used}{'.' * (bar_w - used)}]  used {fr['used']}  free "
                f"{fr['free']}  of {fr['total']}")
    saved = k["pages_sharing"] * PAGE_SIZE
    ratio = f"{k['pages_sharing'] / k['pages_shared']:.1f}" if k["pages_shared"] else "-"
    s.put(y + 1, 0, f"pool resident {st['memory']['host_bytes_resident'] / 2**20:.1f} MiB   "
                    f"saved by merging {saved / 2**20:.1f} MiB   sharing/shared {ratio}")
    w = st["workers"]
    s.put(y + 2, 0, f"workers started {w['started']}  exited {w['exited']} (fast {w['exit_fast']} "
                    f"slow {w['exit_slow']} legacy {w['exit_legacy']})  killed {w['killed']}  "
                    f"oom_killed {w['oom_killed']}  reaped {w['reaped']}")
    body = format_status(st)[6:]  # the address-space table
    y += 4
    for i, line in enumerate(body):
        if y + i >= s.h - 1:
            s.put(s.h - 1, 0, f"... {len(body) - i} more rows")
            break
        s.put(y + i, 0, line, bold if i == 0 else 0)
    win.refresh()


def gone(name: str, st: dict[str, Any]) -> tuple[str, int] | None:
    """('message', status) once the cluster has gone down or died."""
    if not shm.leftovers(name):
        return f"cluster {name!r} went down", EXIT_OK
    if not pid_alive(st["supervisor_pid"]):
        return str(not_running(name)), EXIT_ERR
    return None


def _loop(win: Any, cl: Any, name: str, interval: float) -> tuple[str, int]:
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    win.keypad(True)
    prev: dict[str, Any] | None = None
    t_prev = 0.0
    while True:
        st = read_state(cl)
        now = time.monotonic()
        end = gone(name, st)
        if end is not None:
            return end
        draw(win, st, prev, now - t_prev, interval)
        prev, t_prev = st, now
        deadline = now + interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            win.timeout(max(1, min(200, int(left * 1000))))
            ch = win.getch()
            if ch in (ord("q"), ord("Q")):
                return "", EXIT_OK
            if ch == curses.KEY_RESIZE:
                break


def run_top(name: str, interval: float = 1.0) -> int:
    cl = attach(name)  # a plain message (status 1) when there is no such cluster
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # before curses.wrapper: its initscr writes the terminal's set-up
        # sequences to a pipe or file before it can fail
        cl.close()
        print("uksm: top needs a terminal (stdin and stdout); 'uksm status' prints the same once",
              file=sys.stderr)
        return EXIT_ERR
    try:
        msg, status = curses.wrapper(_loop, cl, name, interval)
    except KeyboardInterrupt:
        msg, status = "", EXIT_OK
    except curses.error as e:
        print(f"uksm: top: the terminal cannot be used ({e}); try 'uksm status'", file=sys.stderr)
        return EXIT_ERR
    finally:
        cl.close()
    if msg:
        print(f"uksm: {msg}", file=sys.stderr)
    return status
