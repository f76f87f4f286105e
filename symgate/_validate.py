"""Eager argument validation for kernels: shapes, dtypes, layout, finiteness.

Policy on non-finite values: kernels *reject* NaN and infinity in parameters,
inputs and initial states with :class:`~symgate.NonFiniteError` naming the array
and the first offending index.  Inside a run, the elementwise primitives are
overflow-free (stable logistic and softplus), so finite inputs give finite
outputs unless the user's own body divides by zero or takes the log of a
non-positive number; such values propagate as IEEE NaN/inf and are not masked.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ._cell import Cell, Dim
from ._errors import DTypeError, NonFiniteError, ShapeError

__all__ = ["SUPPORTED_DTYPES", "check_dtype", "check_array", "resolve_sizes", "check_params", "check_states"]

SUPPORTED_DTYPES = (np.dtype("float32"), np.dtype("float64"), np.dtype("complex128"))


def check_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype, if supported by the kernels."""
    if dtype is None:
        raise DTypeError("dtype must be given ('float32' or 'float64'), not None")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DTypeError(f"dtype {dtype!r} is not a numpy dtype; use 'float32' or 'float64'") from None
    if dt not in SUPPORTED_DTYPES:
        raise DTypeError(f"dtype {dt} is not supported; use 'float32' or 'float64' ('complex128' for complex-step checks)")
    return dt


def check_array(name: str, a: Any, dtype: np.dtype, ndim: int) -> np.ndarray:
    """Check type, dtype, dimensionality, layout and finiteness of one array."""
    if ndim == 0 and isinstance(a, np.generic):
        a = np.asarray(a)  # a numpy scalar of the right dtype is a 0-d array
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array of dtype {dtype}, got {type(a).__module__}.{type(a).__qualname__} (wrap scalars with np.asarray)")
    if isinstance(a, np.ma.MaskedArray):  # the kernels would ignore the mask
        raise DTypeError(f"{name} is a masked array; kernels take plain arrays and would ignore the mask: "
                         f"pass {name}.filled(value)")
    if isinstance(a, np.matrix):  # a matrix changes what * and @ mean
        raise DTypeError(f"{name} is a numpy.matrix; kernels take plain arrays: pass np.asarray({name})")
    if a.dtype != dtype:
        raise DTypeError(f"{name} has dtype {a.dtype}; this kernel needs {dtype} (convert with .astype('{dtype}'))")
    if a.ndim != ndim:
        raise ShapeError(f"{name} has shape {a.shape}; expected {ndim} dimension(s)")
    if not a.flags.c_contiguous:
        raise DTypeError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise NonFiniteError(f"{name} contains a non-finite value ({a[bad]!r} at index {bad})")
    return a


class Sizes(dict):
    """Dimension name -> size, remembering where each size was read (``sources``)."""

    def __init__(self) -> None:
        super().__init__({1: 1})
        self.sources: dict[Dim, str] = {}

    def source(self, d: Dim) -> str:
        return f"{d} = {self[d]} from {self.sources[d]}" if d in self.sources else f"{d} = {self[d]}"


def _size(sizes: Sizes, d: Dim, n: int, where: str) -> None:
    if d == 1:
        if n != 1:
            raise ShapeError(f"{where}: expected size 1, got {n}")
        return
    if d in sizes and sizes[d] != n:
        raise ShapeError(f"{where}: size {n} for dimension {d!r}, but {sizes.source(d)}")
    sizes[d] = n
    sizes.sources[d] = where


def resolve_sizes(cell: Cell, params: Mapping[str, Any], x: Any, h0: Any) -> dict[Dim, int]:
    """Infer every named dimension from ``x``, ``h0`` and ``params``; check they agree."""
    sizes = Sizes()
    if not isinstance(x, np.ndarray):
        raise DTypeError(f"x must be a numpy array of shape (T, B, m), got {type(x).__name__}")
    if x.ndim != 3:
        raise ShapeError(f"x has shape {x.shape}; expected (T, B, {cell.inputs[0].dim if cell.inputs else 'm'})")
    T, B, m = x.shape
    if T == 0:
        raise ShapeError("x has T = 0 time steps; a run needs T >= 1")
    if B == 0:
        raise ShapeError("x has batch size B = 0; a run needs B >= 1")
    if len(cell.inputs) != 1:
        raise ShapeError(f"cell {cell.name!r} has {len(cell.inputs)} inputs; kernels support exactly one input")
    _size(sizes, cell.inputs[0].dim, m, "x.shape[2]")
    if h0 is not None:
        for s in cell.states:
            a = h0.get(s.name) if isinstance(h0, Mapping) else h0
            if isinstance(a, np.ndarray) and a.ndim == 2:
                _size(sizes, s.dim, a.shape[1], f"initial state {s.name!r} (shape {a.shape})")
    # parameters fill in what x and h0 do not fix; check_params then reports any mismatch by name
    if isinstance(params, Mapping):
        for p in cell.params:
            a = params.get(p.name)
            if isinstance(a, np.ndarray) and a.ndim == len(p.shape):
                for k, d in enumerate(p.shape):
                    if d != 1 and d not in sizes:
                        sizes[d] = a.shape[k]
                        sizes.sources[d] = f"params[{p.name!r}] (shape {a.shape})"
    for s in cell.states:
        if s.dim not in sizes:
            raise ShapeError(f"cannot infer dimension {s.dim!r} of state {s.name!r}: pass h0 or parameters that use it")
    for d, v in sizes.items():
        if v == 0:
            raise ShapeError(f"dimension {d!r} has size 0; every dimension needs at least one unit")
    return sizes


def check_params(cell: Cell, params: Any, sizes: Mapping[Dim, int], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Check the parameter dict: every parameter present, nothing extra, right shapes."""
    if not isinstance(params, Mapping):
        raise DTypeError(f"params must be a dict of numpy arrays, got {type(params).__name__}")
    names = cell.param_names
    missing = [p for p in names if p not in params]
    if missing:
        raise ShapeError(f"params is missing {missing} (cell {cell.name!r} has parameters {list(names)})")
    extra = [k for k in params if k not in names]
    if extra:
        raise ShapeError(f"params has unknown entries {extra} (cell {cell.name!r} has parameters {list(names)})")
    out: dict[str, np.ndarray] = {}
    for p in cell.params:
        a = check_array(f"params[{p.name!r}]", params[p.name], dtype, len(p.shape))
        want = tuple(sizes[d] for d in p.shape)
        if a.shape != want:
            spec = "(" + ", ".join(repr(d) for d in p.shape) + ")"
            why = "; ".join(sizes.source(d) for d in dict.fromkeys(p.shape) if d != 1) if isinstance(sizes, Sizes) else ""
            raise ShapeError(f"params[{p.name!r}] has shape {a.shape}; expected {spec} = {want}" + (f" ({why})" if why else ""))
        out[p.name] = a
    return out


def check_states(cell: Cell, h0: Any, sizes: Mapping[Dim, int], batch: int, dtype: np.dtype, what: str = "h0") -> dict[str, np.ndarray]:
    """Check (or default to zeros) the initial states; returns ``{state: (B, d)}``."""
    out: dict[str, np.ndarray] = {}
    if h0 is None:
        return {s.name: np.zeros((batch, sizes[s.dim]), dtype=dtype) for s in cell.states}
    if len(cell.states) > 1 and not isinstance(h0, Mapping):
        if isinstance(h0, (tuple, list)) and len(h0) == len(cell.states):
            h0 = dict(zip(cell.state_names, h0))
        else:
            raise ShapeError(f"{what} must be a dict {{state: array}} for cell {cell.name!r} with states {cell.state_names}")
    for s in cell.states:
        a = h0.get(s.name) if isinstance(h0, Mapping) else h0
        if a is None:
            raise ShapeError(f"{what} is missing state {s.name!r}")
        label = f"{what}[{s.name!r}]" if isinstance(h0, Mapping) else what
        a = check_array(label, a, dtype, 2)
        want = (batch, sizes[s.dim])
        if a.shape != want:
            why = f" ({sizes.source(s.dim)})" if isinstance(sizes, Sizes) else ""
            raise ShapeError(f"{label} has shape {a.shape}; expected (B, {s.dim!r}) = {want}{why}")
        out[s.name] = a
    if isinstance(h0, Mapping):
        extra = [k for k in h0 if k not in cell.state_names]
        if extra:
            raise ShapeError(f"{what} has unknown states {extra}; states are {cell.state_names}")
    return out
