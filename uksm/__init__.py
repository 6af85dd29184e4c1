"""uksm: a userspace emulator of Linux KSM (mm/ksm.c).

The public API is ``uksm.Machine`` (``docs/API.md``); every other module
is the emulator's inside and may change.
"""
from .api import (HungTask, IntegrityError, KillPoint, KillPointMissed, Machine, MachineClosed,
                  MachineError, SegFault, Task, TaskDied, TaskExited, WaitTimeout)

__all__ = ["Machine", "Task", "KillPoint", "MachineError", "MachineClosed", "WaitTimeout",
           "HungTask", "TaskExited", "TaskDied", "SegFault", "IntegrityError", "KillPointMissed"]
