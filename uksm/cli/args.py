"""What every ``uksm`` command line shares."""
from __future__ import annotations

import argparse
from typing import NoReturn

from uksm.proc.control import DEFAULT_CLUSTER


class OneLineParser(argparse.ArgumentParser):
    """argparse's own usage errors as the CLI promises them: one line,
    ``uksm CMD: error: ...`` and where to read more, status 2 (argparse's
    default prints the whole usage block first).  Subparsers inherit the
    class (add_subparsers' parser_class defaults to the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def cluster_arg(p: argparse.ArgumentParser) -> None:
    """``--cluster NAME``, the same for every command that acts on one."""
    p.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help=f"cluster name (default: $UKSM_CLUSTER, else 'default'; now "
                        f"{DEFAULT_CLUSTER!r})")


def log_cluster_arg(p: argparse.ArgumentParser) -> None:
    """``uksm logs DIR ... --cluster NAME[@BOOT]``: the one cluster to read
    of a folder that holds several (``uksm.logs.read.only_cluster``)."""
    p.add_argument("--cluster", metavar="NAME[@BOOT]",
                   help="only this cluster, when the folder holds several (a reused log folder): "
                        "NAME, or NAME@BOOT for one boot of it (summary lists them)")
