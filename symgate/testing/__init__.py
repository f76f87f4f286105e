"""Verification tools for symgate cells, public so users can test their own cells.

* :func:`verify` runs the whole battery (Jacobians vs finite differences, BPTT vs
  complex step and finite differences, adjoint test, mpmath partials, float32 vs
  float64, batch of B vs B batches of one; with ``backend="compiled"`` on the
  compiled kernels, plus compiled == numpy reference) and returns a report.
* :func:`register` adds a cell to the registry that ``tests/test_battery.py`` (and
  your own suite, via :func:`battery_test_class`) parametrises over.
* Hypothesis strategies (``cells``, ``random_cells``, ``problems``, ...) are
  imported lazily, so hypothesis is needed only when you use them.
"""

from __future__ import annotations

from typing import Any

from .._cell import Cell
from ._battery import (
    C_FD as C_FD,
    C_ROUND as C_ROUND,
    CHECKS as CHECKS,
    CheckResult as CheckResult,
    Problem as Problem,
    VerificationReport as VerificationReport,
    draw_problem as draw_problem,
    verify as verify,
)
from ._random_cells import Recipe as Recipe, all_recipes as all_recipes, build as build_random_cell
from ._random_cells import random_cell_pool as random_cell_pool

_REGISTRY: dict[str, Cell] = {}
_STRATEGIES = {"builtin_cells", "random_cells", "cells", "sizes", "parameters", "inputs", "problems",
               "cached_builtin", "cached_random"}


def register(cell: Cell) -> Cell:
    """Register ``cell`` for the verification battery; returns it (usable as a decorator)."""
    if not isinstance(cell, Cell):
        from .._errors import CellSpecError

        raise CellSpecError(f"register() takes a symgate Cell, got {type(cell).__name__}")
    _REGISTRY[cell.name] = cell
    return cell


def registered_cells() -> dict[str, Cell]:
    """The registered cells (the built-ins are registered on first call)."""
    from ._strategies import cached_builtin
    from ..cells import BUILTIN

    for name in BUILTIN:
        _REGISTRY.setdefault(name, cached_builtin(name))
    return dict(_REGISTRY)


def battery_test_class(cell: Cell, *, examples: int = 3, seed: int = 0, backend: str = "reference") -> type:
    """A pytest test class with one test per battery check for ``cell``.

    ``backend="compiled"`` checks the cell's compiled kernels (and adds the
    compiled == reference check).  Each test runs its check on ``examples`` (at
    least 1) problems drawn from ``seed``.

    >>> import symgate as sg
    >>> TestLeaky = sg.testing.battery_test_class(sg.cells.leaky())   # in a test module
    """
    from ._battery import COMPILED_CHECKS, _check_backend, _check_cell, _check_int
    from ._battery import draw_problem as _draw

    _check_cell("battery_test_class", cell)
    examples = _check_int("examples", examples, 1)
    seed = _check_int("seed", seed, 0)
    _check_backend(backend)

    def make(check: str) -> Any:
        def test(self: Any) -> None:
            verify(cell, checks=[check], problems=[_draw(cell, seed * 1_000_003 + i) for i in range(examples)], backend=backend)

        test.__name__ = f"test_{check}"
        return test

    names = list(CHECKS) + (list(COMPILED_CHECKS) if backend == "compiled" else [])
    return type(f"Test_{cell.name}", (), {f"test_{c}": make(c) for c in names})


def __getattr__(name: str) -> Any:
    if name in _STRATEGIES:
        from . import _strategies

        return getattr(_strategies, name)
    raise AttributeError(f"module 'symgate.testing' has no attribute {name!r}")
