"""Compiled kernels: the reference kernels' API with generated Cython time loops.

:class:`CompiledKernel` is a :class:`~symgate.ReferenceKernel` whose two time loops
(forward, and the reverse loop of BPTT) run in a generated, cached Cython module;
everything else (argument checking, state-independent projections, weight-gradient
products, JVPs, Jacobians) is shared with the reference implementation.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ._build import build_module
from ._cell import Cell, Dim
from ._codegen import generate
from ._errors import CellSpecError, SymgateError
from ._reference import ReferenceKernel, Trajectory
from ._validate import check_dtype

__all__ = ["CompiledKernel", "compile", "kernels"]


class CompiledKernel(ReferenceKernel):
    """A kernel whose time loops are compiled (float32 or float64)."""

    backend = "compiled"

    def __init__(self, cell: Cell, dtype: Any = "float64") -> None:
        super().__init__(cell, dtype)
        if self.dtype not in (np.dtype("float32"), np.dtype("float64")):
            raise CellSpecError(f"compiled kernels are float32 or float64, not {self.dtype}")
        self.generated = generate(cell, self.dtype)
        self.module = build_module(self.generated.source, extra=(self.dtype.str,))

    @property
    def source(self) -> str:
        """The generated Cython source."""
        return self.generated.source

    def _common_args(self, params: Mapping[str, np.ndarray], x: np.ndarray, S: list[np.ndarray],
                     nodes: Mapping[str, np.ndarray], static: Mapping[str, np.ndarray], sizes: Mapping[Dim, int]) -> list[Any]:
        g = self.generated
        T, B, _ = x.shape
        args: list[Any] = [T, B] + [sizes[d] for d in g.dims]
        args += S
        args += [nodes[nm] for nm in g.dynamic_nodes]
        args += [np.ascontiguousarray(static[nm]) for nm in g.static_nodes]
        args += [x]
        args += [params[nm] for nm in g.matrices]
        args += [params[nm] for nm in g.vectors]
        args += [float(params[nm]) for nm in g.scalars]
        return args

    def _forward_loop(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Mapping[str, np.ndarray],
                      static: Mapping[str, np.ndarray], node_traj: dict[str, np.ndarray], states: dict[str, np.ndarray],
                      sizes: Mapping[Dim, int]) -> None:
        T, B, _ = x.shape
        S = []
        for s in self.generated.states:
            buf = np.empty((T + 1,) + h0[s].shape, dtype=self.dtype)
            buf[0] = h0[s]
            S.append(buf)
        self.module.forward(*self._common_args(params, x, S, node_traj, static, sizes))
        for s, buf in zip(self.generated.states, S):
            states[s][...] = buf[1:]

    def _backward_loop(self, params: Mapping[str, np.ndarray], traj: Trajectory, cots: Mapping[str, np.ndarray],
                       carry: dict[str, np.ndarray], static_adj: dict[str, np.ndarray], lin_adj: dict[str, np.ndarray],
                       grads: dict[str, np.ndarray], gx: np.ndarray) -> dict[str, np.ndarray]:
        g = self.generated
        x = traj.x
        T, B, _ = x.shape
        dt = self.dtype
        S = [np.ascontiguousarray(np.concatenate([traj.h0[s][None], traj.states[s]], axis=0)) for s in g.states]
        args = self._common_args(params, x, S, traj.nodes, {k: traj.nodes[k] for k in g.static_nodes}, traj.sizes)
        dummy = np.empty((1, 1, 1), dtype=dt)
        CA = [np.ascontiguousarray(carry[s]) for s in g.states]
        args += [np.ascontiguousarray(cots[s]) for s in g.states]
        args += CA + [np.empty_like(c) for c in CA]
        args += [np.empty((B, traj.nodes[nm].shape[-1]), dtype=dt) for nm in g.dynamic_nodes]
        args += [lin_adj.get(nm, dummy) for nm in g.dynamic_nodes]
        args += [static_adj[nm] for nm in g.static_nodes]
        args += [gx] + [grads[nm] for nm in g.vectors]
        scal = [np.zeros(1, dtype=dt) for _ in g.scalars]
        args += scal
        self.module.backward(*args)
        for nm, buf in zip(g.scalars, scal):
            grads[nm][...] += buf[0]
        return {s: CA[k] for k, s in enumerate(g.states)}

    def __repr__(self) -> str:
        return f"<CompiledKernel {self.cell.name!r} {self.dtype}>"


def compile(cell: Cell, dtype: Any = "float64") -> CompiledKernel:  # noqa: A001 - the package's public name
    """Generate, compile (or load from the cache) and return the kernel of ``cell`` for ``dtype``."""
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    dt = check_dtype(dtype)
    key = ("kernel", "compiled", dt.str)
    if key not in cell._index:
        cell._index[key] = CompiledKernel(cell, dt)
    return cell._index[key]


def kernels(cell: Cell, dtype: Any = "float64") -> ReferenceKernel:
    """The compiled kernel when a compiler is available, else the numpy reference kernel.

    The returned object's ``backend`` says which (``"compiled"`` or ``"numpy-reference"``).
    """
    from ._reference import reference_kernel

    try:
        return compile(cell, dtype)
    except SymgateError:
        raise
    except (OSError, ImportError):
        return reference_kernel(cell, dtype)
