"""Commands against a running cluster (up, down, spawn, kill, ctl, status,
top, fsck).  Filled in by the cluster-commands work; see issue 7."""
from __future__ import annotations

import argparse


def add_parsers(sub, run_args) -> None:
    return None


def dispatch(a: argparse.Namespace) -> int:
    return 2


def cmd_fsck(a: argparse.Namespace) -> int:
    return 2
