r"""Stable forms of gate complements and saturating derivatives, as rewrite rules (data).

The derivation writes a gate's retention as ``1 - g`` (``g = sigmoid(u)``) and the tanh
derivative as ``1 - phi**2``: readable, and exact in exact arithmetic.  Evaluated from the
rounded forward values they lose every digit where the function saturates: with a gate bias
of +40, ``g`` rounds to 1.0 and ``1 - g`` gives 0 where the exact value is ``4.2e-18``;
``1 - tanh(20)**2`` gives 0 instead of ``1.7e-17``.  Products of such factors over many
steps (Jacobian products, effective learning rates, BPTT through saturated units) are then
wrong by up to 100 %.  The table :data:`COMPLEMENTS` says how to evaluate each pattern from
the node's argument instead:

=============  ====================  ==========================================
node           pattern               stable form
=============  ====================  ==========================================
``sigmoid``    ``1 - y``             ``sigmoid(-u)``
``tanh``       ``1 - y**2``          ``sech2(u) = 4 e/(1 + e)^2``, ``e = exp(-2|u|)``
=============  ====================  ==========================================

and :data:`LOG_RULES` how to take logarithms in the log domain (``log sigmoid(v) =
-softplus(-v)``, so ``log(1 - g) = -softplus(u)`` stays finite where ``1 - g`` underflows).
The rules are SymPy ``ReplaceOptim`` objects built per cell, applied with
``sympy.codegen.rewriting.optimize`` in the style of SymPy's ``optims_c99``.  They are used
three ways:

* :func:`argument_form` -- patterns as functions of the argument, for evaluating a step's
  expression where all its values are at hand (dense Jacobians, Jacobian products, the
  trajectories of effective learning rates);
* :func:`companions` / :func:`companion_form` -- for the kernels: each pattern the local
  partials use becomes a *companion value* (``1-g``, ``1-phi^2``), computed in the forward
  pass next to its node from the same argument (no extra exponential: the C compiler shares
  ``exp(-|u|)``) and stored for BPTT and JVP, whose partials read it instead of the
  pattern; companions carry no adjoint (the forward values themselves are unchanged);
* :func:`log_abs` -- ``log|expr|`` in the log domain where the rules apply.

The symbolic derivation (printing, LaTeX, expansions) keeps the readable forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
from sympy.codegen.rewriting import ReplaceOptim, optimize

from .._cell import Cell, Node, UnitSymbol
from .._functions import Sech2, Sigmoid, Softplus

__all__ = ["COMPLEMENTS", "LOG_RULES", "Companion", "companions", "companion_form", "argument_form", "log_abs"]

#: function -> [(companion name template, pattern in the node value y, stable form in the argument u)]
COMPLEMENTS: dict[type, list[tuple[str, Callable[[sympy.Expr], sympy.Expr], Callable[[sympy.Expr], sympy.Expr]]]] = {
    Sigmoid: [("1-{y}", lambda y: 1 - y, lambda u: Sigmoid(-u))],
    sympy.tanh: [("1-{y}^2", lambda y: 1 - y**2, lambda u: Sech2(u))],
}

#: log of a function application in the log domain: log F(v) -> rule(v)
LOG_RULES: dict[type, Callable[[sympy.Expr], sympy.Expr]] = {
    Sigmoid: lambda v: -Softplus(-v),
    sympy.exp: lambda v: v,
}


@dataclass(frozen=True)
class Companion:
    """A stable form of a pattern of node ``node``: ``symbol`` stands for ``pattern`` and is
    computed as ``value`` (an expression in the node's argument)."""

    name: str
    symbol: UnitSymbol
    node: Node
    pattern: sympy.Expr
    value: sympy.Expr


def _split_add(e: sympy.Expr, monomial: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr] | None:
    """For an Add with terms ``c`` and ``-c*monomial`` (a number ``c``): ``(c, the other terms)``."""
    if not e.is_Add:
        return None
    terms = [t.as_coeff_Mul() for t in e.args]
    numbers = [c for c, rest in terms if rest == 1]
    for c in numbers:
        if (-c, monomial) in terms:
            others = [t for t in e.args if t != c and t != -c * monomial]
            return c, sympy.Add(*others)
    return None


def _complement_optim(monomial: sympy.Expr, replacement: sympy.Expr) -> ReplaceOptim:
    """``c - c*monomial + rest`` -> ``c*replacement + rest``, anywhere in an expression."""
    def query(e: sympy.Expr) -> bool:
        return _split_add(e, monomial) is not None

    def value(e: sympy.Expr) -> sympy.Expr:
        c, rest = _split_add(e, monomial)  # type: ignore[misc]
        return c * replacement + rest

    return ReplaceOptim(query, value)


def _patterns(cell: Cell) -> list[Companion]:
    """Every pattern of :data:`COMPLEMENTS` the cell's nodes can produce (used or not), cached on the cell."""
    key = ("derive", "stable patterns")
    if key not in cell._index:
        out = []
        for nd in cell.nodes:
            for template, pattern, stable in COMPLEMENTS.get(nd.func, []) if nd.kind == "fn" else []:
                name = template.format(y=nd.name)
                out.append(Companion(name, UnitSymbol(name, nd.dim), nd, pattern(nd.symbol), stable(nd.arg)))
        cell._index[key] = out
    return cell._index[key]


def _rewrite(cell: Cell, expr: sympy.Expr, to_companion: bool) -> sympy.Expr:
    """Complement patterns of the nodes ``expr`` reads, as companion symbols or stable forms."""
    free = expr.free_symbols
    rules = [_complement_optim(1 - c.pattern, c.symbol if to_companion else c.value)
             for c in _patterns(cell) if c.node.symbol in free]
    return optimize(expr, rules) if rules else expr


def argument_form(cell: Cell, expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with every complement pattern replaced by its stable form in the node's argument."""
    return _rewrite(cell, expr, False)


def companion_form(cell: Cell, expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with every complement pattern replaced by its companion symbol."""
    return _rewrite(cell, expr, True)


def companions(cell: Cell, exprs: list[sympy.Expr]) -> list[Companion]:
    """The companions that the companion forms of ``exprs`` read, in the cell's node order."""
    used = set().union(*(companion_form(cell, e).free_symbols for e in exprs)) if exprs else set()
    return [c for c in _patterns(cell) if c.symbol in used]


def _log_optims() -> list[ReplaceOptim]:
    def query(e: sympy.Expr) -> bool:
        return isinstance(e, sympy.log) and type(e.args[0]) in LOG_RULES

    def value(e: sympy.Expr) -> sympy.Expr:
        inner = e.args[0]
        return LOG_RULES[type(inner)](inner.args[0])

    return [ReplaceOptim(query, value)]


def log_abs(cell: Cell, expr: sympy.Expr) -> sympy.Expr:
    r""":math:`\log|expr|` for evaluation: products and powers split into sums, complements in their
    stable forms, and logs of sigmoids and exponentials in the log domain.  (Where ``expr`` is a
    sum that no rule covers, the log of its stable value.)"""
    nodes = {nd.symbol: nd for nd in cell.nodes if nd.kind == "fn" and nd.func in LOG_RULES}
    stable = argument_form(cell, expr)
    if stable == 0:
        return sympy.S.NegativeInfinity
    parts = []
    for f in sympy.Mul.make_args(stable):
        base, power = f.as_base_exp()
        if base in nodes:  # a sigmoid or exp node: its log from the node's argument
            parts.append(power * LOG_RULES[nodes[base].func](nodes[base].arg))  # type: ignore[index]
        elif type(base) in LOG_RULES:
            parts.append(power * LOG_RULES[type(base)](base.args[0]))
        else:
            parts.append(power * sympy.log(sympy.Abs(base)))
    return optimize(sympy.Add(*parts), _log_optims())
