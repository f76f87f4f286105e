r"""Local partial derivatives: the only place where SymPy differentiates.

For every interior node and every updated state, the partial derivative of its
per-unit expression with respect to each symbol it reads directly.  A function
node :math:`y = F(u)` uses the rule table (:data:`~symgate._functions.DERIVATIVE_RULES`),
so :math:`\partial y/\partial s = F'(y, u)\,\partial u/\partial s` reuses the
forward value ``y`` (``1 - phi**2``, ``g*(1 - g)``).  A Linear node
:math:`z = M v` has no scalar partial: its chain rule is structural (a matrix
factor), handled by the Jacobian assembly.

Everything downstream -- structured Jacobians, numpy reference kernels,
verification -- is composed from these partials; none re-derives them.

Besides the partials, this module records which *trainable* quantities each
partial passes through (:attr:`LocalPartials.through`; the origin labels of
Jacobian terms are decided from it) and which nodes are the same at every step
(:func:`time_constant_nodes`: they depend on no state and no input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import sympy

from .._cell import Cell, Node, UnitSymbol
from .._functions import DERIVATIVE_RULES

__all__ = ["Owner", "LocalPartials", "local_partials", "time_constant_nodes", "trainable_symbols"]


@dataclass(frozen=True)
class Owner:
    """Something with a per-unit expression: an interior node, or updated state ``index``."""

    symbol: UnitSymbol | None  # the node's symbol; None for an updated state
    index: int = -1  # which updated state (when symbol is None)

    @property
    def is_output(self) -> bool:
        return self.symbol is None


@dataclass(frozen=True)
class LocalPartials:
    r"""The local partials of a cell.

    ``partials[owner]`` maps each symbol the owner reads to
    :math:`\partial(\text{owner})/\partial(\text{symbol})` (nonzero only).
    ``expr[owner]`` is the owner's defining expression.
    ``through[owner][symbol]`` names the trainable quantities
    (:func:`trainable_symbols`) that weight the dependence of the owner on the
    symbol: those in the derivative of a function node's *argument* (``w`` in
    ``tanh(w*h + b)``; the function's own slope ``1 - phi**2`` is not inspected, so a
    bias inside the function does not count), or in the partial of an arithmetic
    node or an updated state.  Sorted names; empty when none.
    """

    cell: Cell
    partials: dict[Owner, dict[UnitSymbol, sympy.Expr]]
    expr: dict[Owner, sympy.Expr]
    dim: dict[Owner, object]
    through: dict[Owner, dict[UnitSymbol, tuple[str, ...]]] = field(default_factory=dict)

    def owners(self) -> Iterator[Owner]:
        return iter(self.partials)

    def output(self, i: int) -> Owner:
        return Owner(None, i)

    def of_node(self, node: Node) -> Owner:
        return Owner(node.symbol)


def time_constant_nodes(cell: Cell) -> frozenset[UnitSymbol]:
    """The nodes that depend on no state and no input: functions of parameters and
    constants only (``a = sigmoid(theta)``), hence the same at every time step."""
    cache = cell._index
    key = ("derive", "time-constant")
    if key in cache:
        return cache[key]
    varying = {lf.symbol for lf in cell.leaves if lf.kind in ("state", "input")}
    for nd in cell.nodes:  # topological order: a node reads only leaves and earlier nodes
        reads = (nd.source,) if nd.kind == "linear" else nd.expr.free_symbols
        if any(s in varying for s in reads):
            varying.add(nd.symbol)
    out = frozenset(nd.symbol for nd in cell.nodes if nd.symbol not in varying)
    cache[key] = out
    return out


def trainable_symbols(cell: Cell) -> frozenset[UnitSymbol]:
    """Per-unit symbols that stand for trained quantities: vector and scalar parameters,
    and time-constant nodes that depend on a trained parameter (``a = sigmoid(theta)``,
    ``exp(w)``, ``M @ b``): reparametrised parameters.  Constants are not trainable."""
    cache = cell._index
    key = ("derive", "trainable")
    if key in cache:
        return cache[key]
    trained = {lf.symbol for lf in cell.leaves if lf.kind in ("vector", "scalar")}
    constant = time_constant_nodes(cell)
    for nd in cell.nodes:
        if nd.symbol not in constant:
            continue
        if nd.kind == "linear" or any(s in trained for s in nd.expr.free_symbols):
            trained.add(nd.symbol)
    out = frozenset(trained)
    cache[key] = out
    return out


def _through(weight: sympy.Expr, trained: frozenset[UnitSymbol]) -> tuple[str, ...]:
    return tuple(sorted(s.name for s in weight.free_symbols if s in trained))


def _node_partials(node: Node, trained: frozenset[UnitSymbol]) -> tuple[dict[UnitSymbol, sympy.Expr], dict[UnitSymbol, tuple[str, ...]]]:
    out: dict[UnitSymbol, sympy.Expr] = {}
    through: dict[UnitSymbol, tuple[str, ...]] = {}
    if node.kind == "fn":
        rule = DERIVATIVE_RULES[node.func]  # type: ignore[index]
        outer = rule(node.symbol, node.arg)  # type: ignore[arg-type]
        for s in sorted(node.arg.free_symbols, key=sympy.default_sort_key):  # type: ignore[union-attr]
            d = sympy.diff(node.arg, s)
            if d != 0:
                out[s] = outer * d  # type: ignore[index]
                through[s] = _through(d, trained)  # type: ignore[index]
    elif node.kind == "arith":
        for s in sorted(node.expr.free_symbols, key=sympy.default_sort_key):
            d = sympy.diff(node.expr, s)
            if d != 0:
                out[s] = d  # type: ignore[index]
                through[s] = _through(d, trained)  # type: ignore[index]
    return out, through


def local_partials(cell: Cell) -> LocalPartials:
    """The local partials of ``cell`` (derived once per cell and cached on it)."""
    cache = cell._index
    key = ("derive", "local")
    if key in cache:
        return cache[key]
    partials: dict[Owner, dict[UnitSymbol, sympy.Expr]] = {}
    exprs: dict[Owner, sympy.Expr] = {}
    dims: dict[Owner, object] = {}
    through: dict[Owner, dict[UnitSymbol, tuple[str, ...]]] = {}
    trained = trainable_symbols(cell)
    for nd in cell.nodes:
        if nd.kind == "linear":
            continue
        ow = Owner(nd.symbol)
        partials[ow], through[ow] = _node_partials(nd, trained)
        exprs[ow] = nd.expr
        dims[ow] = nd.dim
    for i, (st, o) in enumerate(zip(cell.states, cell.outputs)):
        ow = Owner(None, i)
        d: dict[UnitSymbol, sympy.Expr] = {}
        th: dict[UnitSymbol, tuple[str, ...]] = {}
        for s in sorted(o.free_symbols, key=sympy.default_sort_key):
            p = sympy.diff(o, s)
            if p != 0:
                d[s] = p  # type: ignore[index]
                th[s] = _through(p, trained)  # type: ignore[index]
        partials[ow] = d
        through[ow] = th
        exprs[ow] = o
        dims[ow] = st.dim
    lp = LocalPartials(cell, partials, exprs, dims, through)
    cache[key] = lp
    return lp
