"""uksm: a userspace emulator of Linux KSM (mm/ksm.c).

The public API is ``uksm.Machine`` (``docs/API.md``); every other module
is the emulator's inside and may change.  The API is imported on first
use, so that the emulator's own processes (ksmd, workers), which import
``uksm.*`` modules, do not pay for it.
"""
from typing import TYPE_CHECKING, Any

__all__ = ["Machine", "Task", "KillPoint", "Exploration", "explore", "replay", "MachineError",
           "MachineClosed", "WaitTimeout", "HungTask", "TaskExited", "TaskDied", "SegFault",
           "IntegrityError", "KillPointMissed", "RunReport", "MachineStats"]

if TYPE_CHECKING:
    from uksm.api import (
        Exploration,
        HungTask,
        IntegrityError,
        KillPoint,
        KillPointMissed,
        Machine,
        MachineClosed,
        MachineError,
        MachineStats,
        SegFault,
        Task,
        TaskDied,
        TaskExited,
        WaitTimeout,
        explore,
        replay,
    )
    from uksm.proc.run import RunReport


def __getattr__(name: str) -> Any:
    if name == "RunReport":  # the report's type (m.report, uksm run --json)
        from uksm.proc.run import RunReport
        return RunReport
    if name in __all__:
        from uksm import api
        return getattr(api, name)
    raise AttributeError(f"module 'uksm' has no attribute {name!r}")
