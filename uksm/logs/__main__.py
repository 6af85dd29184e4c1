"""``python -m uksm.logs DIR COMMAND``: the same as ``uksm logs DIR COMMAND``
(docs/LOGS.md).  An entry point, as ``uksm/__main__.py`` is: the command
line's layer (tests/code/test_layers.py), above the reading it drives."""
from uksm.cli.logs import main

if __name__ == "__main__":
    raise SystemExit(main())
