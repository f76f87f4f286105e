"""Hypothesis strategies for cells, sizes, parameters, inputs and whole problems.

Arrays are generated from a drawn integer seed (numpy's generator), which keeps
examples cheap, reproducible and shrinkable (to smaller sizes and seeds).  Cells
are built once and cached, so derivation happens once per cell per session.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .._cell import Cell
from ..cells import BUILTIN, builtin
from ._battery import BATCH_SIZES, Problem, _check_int, draw_problem
from ._random_cells import Recipe, all_recipes, build

__all__ = ["builtin_cells", "random_cells", "cells", "sizes", "parameters", "inputs", "problems", "cached_builtin", "cached_random"]

_BUILTIN: dict[str, Cell] = {}
_RANDOM: dict[Recipe, Cell] = {}


def cached_builtin(name: str) -> Cell:
    """The built-in cell ``name`` with default options, built once per process."""
    if name not in _BUILTIN:
        _BUILTIN[name] = builtin(name)
    return _BUILTIN[name]


def cached_random(recipe: Recipe) -> Cell:
    """The random cell of ``recipe``, built once per process."""
    if recipe not in _RANDOM:
        _RANDOM[recipe] = build(recipe)
    return _RANDOM[recipe]


def builtin_cells() -> st.SearchStrategy[Cell]:
    """One of the built-in cells."""
    return st.sampled_from(sorted(BUILTIN)).map(cached_builtin)


def random_cells(*, alphas: tuple[float, ...] = (0.1, 0.5, 0.8)) -> st.SearchStrategy[Cell]:
    """A randomly composed valid cell (see :mod:`symgate.testing._random_cells`)."""
    recipes = all_recipes()

    def with_alpha(r: Recipe, a: float) -> Cell:
        return cached_random(Recipe(r.activation, r.reset, r.gate, r.form, r.out_gate, r.bias, r.two_state, a))

    return st.builds(with_alpha, st.sampled_from(recipes), st.sampled_from(alphas))


def cells() -> st.SearchStrategy[Cell]:
    """A built-in or a random cell."""
    return st.one_of(builtin_cells(), random_cells())


def sizes(*, max_n: int = 5, max_m: int = 3, max_batch: int = max(BATCH_SIZES),
          max_steps: int = 6) -> st.SearchStrategy[dict[str, int]]:
    """Sizes ``{"n", "m", "B", "T"}``, small enough for dense checks.

    The batch ``B`` is one of :data:`~symgate.testing._battery.BATCH_SIZES` up to ``max_batch``
    (small batches and both sides of the compiled kernels' batch threshold), or ``max_batch``
    itself; it shrinks towards 1.
    """
    bounds = {name: _check_int(name, v, 1) for name, v in
              (("max_n", max_n), ("max_m", max_m), ("max_batch", max_batch), ("max_steps", max_steps))}
    batches = sorted({b for b in BATCH_SIZES if b <= bounds["max_batch"]} | {bounds["max_batch"]})
    return st.fixed_dictionaries({
        "n": st.integers(1, bounds["max_n"]),
        "m": st.integers(1, bounds["max_m"]),
        "B": st.sampled_from(batches),
        "T": st.integers(1, bounds["max_steps"]),
    })


def problems(cell: Cell | st.SearchStrategy[Cell] | None = None, **size_bounds: int) -> st.SearchStrategy[Problem]:
    """A whole :class:`Problem` (cell, sizes, spectrally scaled parameters, inputs, readout)."""
    cell_st = cells() if cell is None else (cell if isinstance(cell, st.SearchStrategy) else st.just(cell))

    @st.composite
    def _draw(draw: Any) -> Problem:
        c = draw(cell_st)
        sz = draw(sizes(**size_bounds))
        seed = draw(st.integers(0, 2**32 - 1))
        rho = draw(st.floats(0.3, 1.2))
        return draw_problem(c, seed, n=sz["n"], m=sz["m"], B=sz["B"], T=sz["T"], rho=rho)

    return _draw()


def parameters(cell: Cell, n: int, m: int) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Spectrally scaled parameters of ``cell`` for hidden size ``n`` and input size ``m``."""
    return st.integers(0, 2**32 - 1).map(lambda s: draw_problem(cell, s, n=n, m=m).params)


def inputs(T: int, B: int, m: int) -> st.SearchStrategy[np.ndarray]:
    """Inputs ``(T, B, m)`` drawn N(0, 1)."""
    return st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).standard_normal((T, B, m)))
