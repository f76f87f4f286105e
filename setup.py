"""Build script.

Packaging metadata lives in ``pyproject.toml``.  This file exists because the
build of symgate is more than metadata: the kernel-generation stage hooks in
here to generate and compile the Cython kernels of the built-in cells at
install time.  Until compiled kernels exist the package is pure Python and
``ext_modules`` is empty; the numpy reference kernels are used everywhere.
"""

from setuptools import setup


def _ext_modules() -> list:
    """Extension modules of the built-in cells (none yet: pure-Python build)."""
    return []


setup(ext_modules=_ext_modules())
