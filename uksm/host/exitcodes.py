"""The exit statuses of every uksm command, defined here and nowhere else.

A signal that stops a foreground command (``uksm run``, ``uksm inject``)
gives 128 + its number, as a shell reports a process killed by it (130
SIGINT, 143 SIGTERM, 129 SIGHUP), unless the run found something worse to
say (a hung task, an integrity failure, a ksmd oops): that news wins.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERR = 1          # anything else: an error listed in the report, a leftover object
EXIT_USAGE = 2        # bad usage: a one-line error, nothing created
EXIT_HUNG = 3         # khungtaskd reported a blocked task
EXIT_INTEGRITY = 4    # data mismatches or an fsck failure
EXIT_OOPS = 5         # ksmd raised (an oops), once or in a loop: see the report's "oops"
EXIT_NO_EVIDENCE = 6  # uksm logs check: nothing to judge (no valid event, no cluster_start or stop)
EXIT_SIGNAL_BASE = 128

EPILOG = ("exit status: 0 all good, 2 bad usage, 3 a hung task was detected, 4 an integrity or "
          "fsck failure, 5 ksmd oopsed, 128+N stopped by signal N (130 SIGINT, 143 SIGTERM, "
          "129 SIGHUP), 1 anything else.")


def signalled(signo: int) -> int:
    """The status of a command stopped by signal ``signo``."""
    return EXIT_SIGNAL_BASE + signo


def interrupted(status: int, signo: int) -> int:
    """A run stopped by ``signo``: not 0, and a worse finding stays."""
    return signalled(signo) if status in (EXIT_OK, EXIT_ERR) else status


__all__ = ["EXIT_OK", "EXIT_ERR", "EXIT_USAGE", "EXIT_HUNG", "EXIT_INTEGRITY", "EXIT_OOPS",
           "EXIT_NO_EVIDENCE",
           "EPILOG", "signalled", "interrupted"]
