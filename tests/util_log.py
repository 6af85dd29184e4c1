"""A logger for in-process tests that keeps what was logged."""
from __future__ import annotations

from typing import Any


class RecLog:
    """Keeps the events as (event, fields), whatever the level."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def __getattr__(self, _name: str) -> Any:
        return self.info
