"""Loading a cell from a command-line style spec: a built-in name or ``path/to/file.py:name``.

Used by the command line (``symgate derive CELL``, ...) and by the experiments (model
names), so neither has to import the other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

from ._cell import Cell, cell as make_cell_from_fn
from ._errors import SymgateError
from .cells import BUILTIN, builtin

__all__ = ["load_cell"]


def load_cell(spec: str) -> Cell:
    """A built-in cell by name, or ``file.py:name`` from a user's file."""
    if spec in BUILTIN:
        return builtin(spec)
    if ":" not in spec:
        raise SymgateError(f"unknown cell {spec!r}: give a built-in ({', '.join(BUILTIN)}) or path/to/file.py:name")
    path, _, attr = spec.rpartition(":")
    if not os.path.isfile(path):
        raise SymgateError(f"cell file {path!r} does not exist")
    if not attr.isidentifier():
        raise SymgateError(f"{attr!r} is not a valid Python name in {spec!r}")
    modname = "_symgate_user_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    mspec = importlib.util.spec_from_file_location(modname, path)
    if mspec is None or mspec.loader is None:
        raise SymgateError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(module)
    except SymgateError:
        raise
    except Exception as exc:
        raise SymgateError(f"importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise SymgateError(f"{path!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, Cell):
        return obj
    if callable(obj):
        return make_cell_from_fn(obj)
    raise SymgateError(f"{spec!r} is neither a symgate Cell nor a function")
