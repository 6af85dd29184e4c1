"""docs/EVENTS.md and the code agree on the log event names.

Scans every ``*.py`` under ``uksm/``, ``workers/``, ``tools/`` and ``dev/`` for log
calls ``log.info("name"`` (also ``.warning``, ``.error``, ``.debug``,
``.critical``, ``.exception``; through ``log``, ``self.log``, ``_log``,
``self._log`` or ``LOG``) and ``emit("name"``, and compares the names with the
first column of the events table in docs/EVENTS.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("uksm", "workers", "tools", "dev")
EVENTS_MD = ROOT / "docs" / "EVENTS.md"

LOG_CALL = re.compile(
    r"""(?<![\w])(?:(?:log|_log|LOG)\.(?:info|warning|error|debug|critical|exception)|emit)"""
    r"""\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
)

#: the events of the log contract (docs/EVENTS.md must keep all of them)
CONTRACT = {
    "cluster_start", "cluster_stop", "worker_spawn", "worker_exit", "mm_exit_begin",
    "ksm_enter", "ksm_exit", "scan_batch_start", "scan_batch_end", "full_scan", "merge",
    "cow_break", "unmerge", "slot_freed", "mmdrop", "mm_freed", "oom_kill", "signal",
    "kill_point", "inject_kill", "lock_wait", "lock_recovery", "recovery", "hung_task",
    "fsck", "worker_verify", "ksm_run", "ksm_knob",
}


def emitted_in(text: str) -> set[str]:
    return set(LOG_CALL.findall(text))


def emitted_events() -> dict[str, list[str]]:
    """Event name -> ["path:line", ...] of every log call in the scanned code."""
    found: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            for m in LOG_CALL.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.setdefault(m.group(1), []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


def documented_events() -> set[str]:
    """First-column names of the table under '## Events' in docs/EVENTS.md."""
    names: set[str] = set()
    in_events = False
    for line in EVENTS_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_events = line.strip() == "## Events"
            continue
        m = re.match(r"\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|", line)
        if in_events and m:
            names.add(m.group(1))
    return names


def test_scanner_finds_every_call_form() -> None:
    src = '''
log.info("a1", mm=1)
self.log.warning("a2")
_log.error('a3', x=1)
self._log.debug(
    "a4",
    mm=2)
LOG.critical("a5")
emit("a6", mm=3)
bus.emit("a7")
catalog.info("no1")
log.info(name)
print("log.info")
'''
    assert emitted_in(src) == {"a1", "a2", "a3", "a4", "a5", "a6", "a7"}


def test_events_md_documents_the_contract() -> None:
    documented = documented_events()
    assert CONTRACT <= documented, sorted(CONTRACT - documented)


def test_every_emitted_event_is_documented() -> None:
    emitted = emitted_events()
    missing = {name: where for name, where in emitted.items() if name not in documented_events()}
    assert not missing, "events emitted but not in docs/EVENTS.md: " + "; ".join(
        f"{name} ({', '.join(where[:3])})" for name, where in sorted(missing.items())
    )


def test_every_documented_event_is_emitted() -> None:
    emitted = emitted_events()
    assert len(emitted) > 40, "the scanner found (almost) no log call: it is broken, not the code"
    stale = documented_events() - set(emitted)
    assert not stale, f"documented in docs/EVENTS.md but emitted nowhere: {sorted(stale)}"
