r"""The evaluation program of a cell: its nodes and updated states in order, with their partials.

Both backends -- the numpy reference kernels and the generated Cython kernels -- run
this one program, derived once per cell:

* every interior node and every updated state is a :class:`Step`, in an order where
  each step comes after everything it reads;
* a step is *static* when it depends on no state (``U x``, ``U x + b``, a gate of the
  input alone): it can be computed for all time steps at once, before the time loop,
  and its backward pass after the reverse loop;
* each elementwise step carries its local partials (from :mod:`._local`), keyed by the
  name of what it reads; a Linear step ``z = M v`` carries its matrix and source;
* the partials are in their numerically stable forms (:mod:`._stable`): a complement such
  as ``1 - g`` of a gate or ``1 - phi**2`` of a tanh is a *companion* value, an ``"aux"``
  step computed right after its node from the node's argument (``sigmoid(-u)``,
  ``sech2(u)``) and read by the partials; it has no partials itself (no adjoint flows
  through it: the forward values are unchanged).

>>> import symgate as sg
>>> from symgate._derive._program import program
>>> [(s.name, s.kind, s.static) for s in program(sg.cells.leaky(bias=False))]
[('z_W', 'linear', False), ('z_U', 'linear', True), ('phi', 'fn', False), ('1-phi^2', 'aux', False), ("h'", 'out', False)]
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .._cell import Cell, Dim, UnitSymbol
from ._local import Owner, local_partials
from ._stable import companion_form, companions

__all__ = ["Step", "program", "state_dependent", "companion_symbols"]


@dataclass(frozen=True)
class Step:
    """One node or updated state of a cell, in evaluation order.

    ``kind`` is ``"fn"``, ``"arith"``, ``"linear"``, ``"out"`` (an updated state, named
    ``state + "'"``, with ``state`` the state's name) or ``"aux"`` (a companion value,
    see the module docstring).  ``expr`` is the defining per-unit
    expression (None for a Linear step); ``partials`` are ``(source name, source dim,
    partial expression)`` for every symbol the expression reads (empty for a Linear step,
    whose chain rule is the matrix ``matrix`` applied to ``source``).
    """

    name: str
    kind: str
    dim: Dim
    static: bool
    expr: sympy.Expr | None = None
    partials: tuple[tuple[str, Dim, sympy.Expr], ...] = ()
    matrix: str | None = None
    source: str | None = None
    state: str | None = None

    @property
    def reads(self) -> frozenset[str]:
        """Names of the values this step reads."""
        if self.kind == "linear":
            return frozenset([self.source])  # type: ignore[list-item]
        return frozenset(s.name for s in self.expr.free_symbols)  # type: ignore[union-attr]


def state_dependent(cell: Cell) -> set[UnitSymbol]:
    """Symbols of the states and of every node that depends on a state."""
    dynamic: set[UnitSymbol] = {s.symbol for s in cell.states}
    for nd in cell.nodes:
        deps = {nd.source} if nd.kind == "linear" else nd.expr.free_symbols
        if deps & dynamic:
            dynamic.add(nd.symbol)
    return dynamic


def _partials(cell: Cell, owner: Owner) -> tuple[tuple[str, Dim, sympy.Expr], ...]:
    """The owner's local partials, complements replaced by their companion values."""
    return tuple((sym.name, sym.dim, companion_form(cell, p)) for sym, p in local_partials(cell).partials[owner].items())


def program(cell: Cell) -> tuple[Step, ...]:
    """The steps of ``cell`` in evaluation order (derived once per cell and cached on it)."""
    key = ("derive", "program")
    cache = cell._index
    if key in cache:
        return cache[key]
    dynamic = state_dependent(cell)
    steps: list[Step] = []
    for nd in cell.nodes:
        static = nd.symbol not in dynamic
        if nd.kind == "linear":
            steps.append(Step(nd.name, nd.kind, nd.dim, static, matrix=nd.matrix, source=nd.source.name))  # type: ignore[union-attr]
        else:
            steps.append(Step(nd.name, nd.kind, nd.dim, static, nd.expr, _partials(cell, Owner(nd.symbol))))
    for i, s in enumerate(cell.states):
        steps.append(Step(s.name + "'", "out", s.dim, False, cell.outputs[i], _partials(cell, Owner(None, i)), state=s.name))
    cache[key] = tuple(_with_companions(cell, steps))
    return cache[key]


def _with_companions(cell: Cell, steps: list[Step]) -> list[Step]:
    """``steps`` with a companion step after each node whose complement the partials read."""
    used = companions(cell, [e for st in steps for _src, _d, e in st.partials])
    after: dict[str, list[Step]] = {}
    for c in used:
        node_step = next(st for st in steps if st.name == c.node.name)
        after.setdefault(c.node.name, []).append(Step(c.name, "aux", c.node.dim, node_step.static, c.value))
    return [x for st in steps for x in [st, *after.get(st.name, [])]]


def companion_symbols(cell: Cell) -> dict[str, UnitSymbol]:
    """The symbols of the cell's companion values, by name."""
    prog = program(cell)
    return {c.name: c.symbol for c in companions(cell, [e for st in prog for _s, _d, e in st.partials])}
