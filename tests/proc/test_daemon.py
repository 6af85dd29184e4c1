"""The daemon of ``uksm up`` (uksm/proc/daemon.py) and the requests it
serves (handlers.py, scripting.py), over its control socket as
docs/CLUSTER.md describes it: one JSON line per connection, one JSON line
back, ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "status": N}``;
a bad request is answered (status 2) and the daemon serves on; ``ping``
says who it is; a command for a task that cannot take it says why."""
from __future__ import annotations

import json
import socket

import pytest

from helpers import Up, cluster_pids, wait_for
from uksm.proc.control import sock_address


def raw(name: str, data: bytes) -> dict:
    """Send ``data`` on a connection of its own; the answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    with s:
        s.connect(sock_address(name))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(1 << 16):
            buf += chunk
    assert buf.count(b"\n") == 1 and buf.endswith(b"\n"), buf   # one line back
    return json.loads(buf)


@pytest.mark.timeout(90)
def test_bad_requests_are_answered_and_the_daemon_serves_on(cluster: Up) -> None:
    info = cluster.up("--workers", "1", "--pages", "8")
    bad = "bad request: expected a JSON object with an 'op'"
    for data, error in ((b"not json\n", "bad request: Expecting value: line 1 column 1 (char 0)"),
                        (b"[1, 2]\n", bad), (b'{"x": 1}\n', bad), (b'{"op": 5}\n', bad),
                        (b'{"op": "nosuch"}\n', "unknown request 'nosuch'"),
                        (b'{"op": "ping", "pad": "' + b"x" * (1 << 20) + b'"}\n',
                         "bad request: request too large")):
        assert raw(cluster.name, data) == {"ok": False, "error": error, "status": 2}, data[:40]
    ping = raw(cluster.name, b'{"op": "ping"}\n')
    assert ping["ok"] and ping["pid"] == info["pid"] and ping["cluster"] == cluster.name
    assert ping["log_dir"] == str(cluster.log_dir) and ping["ksmd_pid"] in cluster_pids(cluster.name)
    assert ping["workers"] == ["w1"] and ping["hung"] == 0 and ping["hung_tasks"] == []
    wait_for(lambda: raw(cluster.name, b'{"op": "ping"}\n')["ready"] == ["w1"], 30, what="w1 ready")
    later = raw(cluster.name, b'{"op": "ping"}\n')
    assert later["uptime_s"] > ping["uptime_s"] >= 0
    assert cluster("down").returncode == 0


@pytest.mark.timeout(90)
def test_task_commands_say_why_they_cannot_be_done(cluster: Up) -> None:
    """scripting: a built-in worker takes no commands (status 2); no such
    programmable task (status 1, with the ones there are); a command of a
    task that has exited."""
    cluster.up("--workers", "1", "--pages", "8")
    ans = raw(cluster.name, b'{"op": "task", "task": "w1", "cmd": "fill", "value": 1}\n')
    assert ans == {"ok": False, "status": 2, "kind": "value", "error": (
        "w1 is a built-in worker ('uksm spawn', m.spawn): it takes no commands, only kill, arm, stat and pagemap")}
    t = raw(cluster.name, b'{"op": "task_new", "pages": 2}\n')
    assert t["ok"] and t["task"] == "w2" and t["pages"] == 2, t
    ans = raw(cluster.name, b'{"op": "task", "task": "w7", "cmd": "fill", "value": 1}\n')
    assert ans == {"ok": False, "status": 1, "kind": "unknown",
                   "error": f"no programmable task 'w7' in cluster '{cluster.name}' (tasks: w2)"}
    assert raw(cluster.name, b'{"op": "task", "task": "w2", "cmd": "exit"}\n')["ok"]
    ans = raw(cluster.name, b'{"op": "task", "task": "w2", "cmd": "fill", "value": 1}\n')
    assert not ans["ok"] and ans["kind"] == "exited" and "has exited" in ans["error"], ans
    assert cluster("down").returncode == 0
