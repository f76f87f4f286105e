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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import sympy

from .._cell import Cell, Node, UnitSymbol
from .._functions import DERIVATIVE_RULES

__all__ = ["Owner", "LocalPartials", "local_partials"]


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
    """

    cell: Cell
    partials: dict[Owner, dict[UnitSymbol, sympy.Expr]]
    expr: dict[Owner, sympy.Expr]
    dim: dict[Owner, object]

    def owners(self) -> Iterator[Owner]:
        return iter(self.partials)

    def output(self, i: int) -> Owner:
        return Owner(None, i)

    def of_node(self, node: Node) -> Owner:
        return Owner(node.symbol)


def _node_partials(node: Node) -> dict[UnitSymbol, sympy.Expr]:
    out: dict[UnitSymbol, sympy.Expr] = {}
    if node.kind == "fn":
        rule = DERIVATIVE_RULES[node.func]  # type: ignore[index]
        outer = rule(node.symbol, node.arg)  # type: ignore[arg-type]
        for s in sorted(node.arg.free_symbols, key=sympy.default_sort_key):  # type: ignore[union-attr]
            d = sympy.diff(node.arg, s)
            if d != 0:
                out[s] = outer * d  # type: ignore[index]
    elif node.kind == "arith":
        for s in sorted(node.expr.free_symbols, key=sympy.default_sort_key):
            d = sympy.diff(node.expr, s)
            if d != 0:
                out[s] = d  # type: ignore[index]
    return out


def local_partials(cell: Cell) -> LocalPartials:
    """The local partials of ``cell`` (derived once per cell and cached on it)."""
    cache = cell._index
    key = ("derive", "local")
    if key in cache:
        return cache[key]
    partials: dict[Owner, dict[UnitSymbol, sympy.Expr]] = {}
    exprs: dict[Owner, sympy.Expr] = {}
    dims: dict[Owner, object] = {}
    for nd in cell.nodes:
        if nd.kind == "linear":
            continue
        ow = Owner(nd.symbol)
        partials[ow] = _node_partials(nd)
        exprs[ow] = nd.expr
        dims[ow] = nd.dim
    for i, (st, o) in enumerate(zip(cell.states, cell.outputs)):
        ow = Owner(None, i)
        d: dict[UnitSymbol, sympy.Expr] = {}
        for s in sorted(o.free_symbols, key=sympy.default_sort_key):
            p = sympy.diff(o, s)
            if p != 0:
                d[s] = p  # type: ignore[index]
        partials[ow] = d
        exprs[ow] = o
        dims[ow] = st.dim
    lp = LocalPartials(cell, partials, exprs, dims)
    cache[key] = lp
    return lp
