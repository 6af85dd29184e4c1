"""Starting a Python child that imports the same uksm as its parent.

``python -m MODULE`` puts the current folder first on ``sys.path``: an
installed uksm started from inside a source checkout (its own project
folder) had its children import the checkout's ``uksm/`` instead -- which
has no ``uksm.workers`` (``workers/`` is installed under that name): every
worker died at once of a ModuleNotFoundError.  So every child (ksmd, a
worker, the run= writer, the daemon of ``uksm up``, a campaign's runs) is
started by ``argv``/``env`` here:

- ``-P`` (Python 3.11's safe path): nothing from the current folder or the
  script's;
- and when this process's uksm is not an installed one (an editable
  install's source tree, or ``python -m uksm`` run in a checkout), that
  tree first on ``PYTHONPATH``: the child finds the very same files,
  wherever it runs.  An installed uksm (in site-packages) needs nothing
  more: the child's ``sys.path`` has it where the parent's has.
"""
from __future__ import annotations

import os
import site
import sys

#: uksm's own folder is <root>/uksm: this module is <root>/uksm/host/pyexec.py
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _installed(path: str) -> bool:
    """``path`` is a site-packages folder of this interpreter."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return os.path.realpath(path) in {os.path.realpath(d) for d in dirs}


def argv(module: str, *args: str) -> list[str]:
    """The command line of a child running ``python -m module args``."""
    return [sys.executable, "-P", "-m", module, *args]


def env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default: this process's) with
    this uksm's source tree first on PYTHONPATH when it is not installed."""
    out = dict(os.environ if base is None else base)
    if not _installed(ROOT):
        old = out.get("PYTHONPATH")
        out["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    return out
