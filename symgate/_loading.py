"""Loading a cell from a command-line style spec: a built-in name or ``path/to/file.py:name``.

Used by the command line (``symgate derive CELL``, ...) and by the experiments (model
names), so neither has to import the other.  Whatever goes wrong while the user's file
runs -- an exception, ``sys.exit()`` -- is a :class:`~symgate.CellSpecError` naming the
file; only ``KeyboardInterrupt`` goes through.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys

from ._cell import Cell, cell as make_cell_from_fn
from ._errors import CellSpecError, SymgateError, one_line
from .cells import BUILTIN, builtin

__all__ = ["load_cell"]


def _shown(text: str, limit: int = 120) -> str:
    """``repr(text)``, shortened to about ``limit`` characters for a one-line message."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _describe(exc: BaseException, when: str = "while being loaded") -> str:
    """``Type: message`` on one line; a ``sys.exit()`` in the user's file said as such."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the cell file exits {when} (sys.exit({exc.code!r}))"
    return one_line(exc)


def load_cell(spec: str) -> Cell:
    """A built-in cell by name, or ``file.py:name`` from a user's file."""
    if not isinstance(spec, str) or not spec:
        raise CellSpecError(f"a cell is a built-in name or path/to/file.py:name, got {spec!r}")
    if spec in BUILTIN:
        return builtin(spec)
    if ":" not in spec:
        hint = f" (to load a cell from the file, give {spec[:80]}:name)" if os.path.isfile(spec) else ""
        raise CellSpecError(f"unknown cell {_shown(spec)}: give a built-in ({', '.join(BUILTIN)}) or path/to/file.py:name{hint}")
    path, _, attr = spec.rpartition(":")
    if os.path.isdir(path):
        raise CellSpecError(f"cell file {_shown(path)} is a directory, not a Python file")
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
        raise CellSpecError(f"cell file {_shown(path)} {what}")
    if not attr.isidentifier():
        raise CellSpecError(f"{_shown(attr)} is not a valid Python name in {_shown(spec)}")
    if not os.access(path, os.R_OK):
        raise CellSpecError(f"cell file {_shown(path)} is not readable")
    modname = "_symgate_user_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    # any file name is read as Python source (not only *.py)
    loader = importlib.machinery.SourceFileLoader(modname, path)
    mspec = importlib.util.spec_from_file_location(modname, path, loader=loader)
    if mspec is None:  # pragma: no cover - a SourceFileLoader always gives a spec
        raise CellSpecError(f"cannot import {_shown(path)} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    previous = sys.modules.get(modname)
    sys.modules[modname] = module  # dataclasses, typing.get_type_hints, pickle look the module up
    loaded = False
    try:
        loader.exec_module(module)
        loaded = True
    except SymgateError:
        raise
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt goes through
        raise CellSpecError(f"error while loading {_shown(path)}: {_describe(exc)}") from exc
    finally:
        if not loaded:
            _restore(modname, previous)
    if not hasattr(module, attr):
        raise CellSpecError(f"{_shown(path)} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, Cell):
        return obj
    if callable(obj):
        try:
            return make_cell_from_fn(obj)
        except SymgateError:
            raise
        except (Exception, SystemExit) as exc:
            why = _describe(exc, "while the cell is built")
            raise CellSpecError(f"error while building the cell {attr!r} of {_shown(path)}: {why}") from exc
    raise CellSpecError(f"{_shown(spec)} is neither a symgate Cell nor a function")


def _restore(modname: str, previous: object) -> None:
    if previous is None:
        sys.modules.pop(modname, None)
    else:
        sys.modules[modname] = previous  # type: ignore[assignment]
