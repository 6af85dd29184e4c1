"""The one thing pyproject.toml cannot say: the C core of the lock protocol
(uksm/kernel/_lockcore.c).  It is optional: without a compiler the build
goes on and uksm.kernel.locks uses its Python reference (locks.IMPL says
which is in use)."""
import hashlib

from setuptools import Extension, setup

SRC = "uksm/kernel/_lockcore.c"
# the source's hash, built into the module: tests/kernel/test_lockcore.py
# checks that the core in use was built from the source beside it (an
# editable install whose rebuild failed keeps the old module silently)
with open(SRC, "rb") as f:
    SHA = hashlib.sha256(f.read()).hexdigest()[:16]

setup(ext_modules=[Extension("uksm.kernel._lockcore", [SRC], optional=True,
                             define_macros=[("LOCKCORE_SOURCE", f'"{SHA}"')],
                             extra_compile_args=["-O2", "-Wall"])])
