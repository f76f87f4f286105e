r"""First-order expansion of Jacobian products and per-lag effective learning rates.

Splits
------
Every derived Jacobian is a sum of origin-tagged terms, so it splits as
:math:`J_j = A_j + \varepsilon B_j` by choosing which origins form the perturbation
``B`` (paper-notes §10, decision 3):

``"appendix"`` (default)
    ``B`` = the gate-derivative terms (origins ``gate`` and ``reset``), as in the
    paper's appendix; ``A`` = leak + candidate path.
``"coupling"``
    ``B`` = everything but the leak; ``A = diag(lambda)`` is the leak alone.  This is
    the split behind the effective learning rate (decision 2).
``"diagonal"``
    the follow-up's per-neuron expansion: ``lambda`` = leak, ``r`` = the rest of the
    diagonal of ``J``; :math:`\prod(\lambda+r)\approx\prod\lambda\,(1+\sum r/\lambda)`.

Products are in chain-rule order, :math:`F = J_t J_{t-1}\cdots J_{k+1}`, ``k = t - ell``
(``ell`` factors).  The first-order term is
:math:`L = \sum_i (\prod_{j>i} A_j)\, B_i\, (\prod_{j<i} A_j)`.  Where ``A`` is diagonal,
per-neuron closed forms come out as SymPy ``Product``/``Sum`` objects in the symbolic
lag ``ell`` (the leaky cell's product evaluates to :math:`(1-\alpha)^\ell`, and so
does a product of anything that is the same at every step: parameters, constants, and
nodes that read neither a state nor an input, e.g. :math:`\prod (1-a) = (1-a)^\ell`
for a gate ``a = sigmoid(theta)`` of a scalar parameter).  A non-diagonal product is
kept as a formal ordered product, never unrolled.

Effective learning rates
------------------------
For a parameter that enters through a node ``N`` read directly by the state update
(``W``, ``U``, ``b`` of the candidate), the immediate parameter Jacobian factors as
``C = w * dN/dz`` with ``w`` the *write gain* (``alpha``, ``g``).  At zeroth order in
the coupling, the lag-``ell`` contribution to the update is scaled per neuron by

.. math:: \mu_{t,\ell} = w_{t-\ell}\odot\prod_{j=t-\ell+1}^{t}\lambda_j .

``convention="s1"`` gives the released S1 predictor :math:`\prod_{j=t-\ell}^{t} w_j`
(inclusive, update coefficient) and ``convention="followup"`` the follow-up's
:math:`\mu^{(0)}=\prod_{j=t-\ell+1}^{t}\lambda_j`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import sympy
from sympy import IndexedBase, Product, Sum
from sympy.matrices.expressions import MatrixExpr

from .._cell import Cell, UnitSymbol, dim_symbol, name_args
from .._errors import CellSpecError
from ._jacobian import ORIGINS, StructuredJacobian, Term, jacobian, mul_chain, parameter_jacobian
from ._local import time_constant_nodes
from ._matexpr import latex, sstr

__all__ = [
    "t",
    "ell",
    "SPLITS",
    "Split",
    "split",
    "Expansion",
    "expansion",
    "EffectiveLR",
    "effective_lr",
    "at_step",
    "retention_state",
    "eligible_parameters",
    "OrderedProduct",
    "FirstOrderSum",
]

#: The current step and the lag (``k = t - ell``); ``j`` and ``i`` are product/sum indices.
t = sympy.Symbol("t", integer=True)
ell = sympy.Symbol("ell", integer=True, nonnegative=True)
_j = sympy.Symbol("j", integer=True)
_i = sympy.Symbol("i", integer=True)

#: Named splits: the origins that form the perturbation ``B``.
SPLITS: dict[str, tuple[str, ...]] = {
    "appendix": ("gate", "reset"),
    "coupling": ("candidate", "gate", "reset"),
    "diagonal": ("candidate", "gate", "reset"),
}

CONVENTIONS = ("exact", "s1", "followup")


def at_step(cell: Cell, expr: sympy.Expr, step: sympy.Expr) -> sympy.Expr:
    """The per-unit expression ``expr`` of step ``step``: states read at ``step - 1``
    (the previous state), inputs and nodes at ``step``; parameters, constants and the
    nodes that depend on neither a state nor an input (``a = sigmoid(theta)``: the same
    at every step) unindexed, so products over steps of them have closed forms."""
    constant = time_constant_nodes(cell)
    rep = {}
    for s in expr.free_symbols:
        if not isinstance(s, UnitSymbol):
            continue
        leaf = cell.leaf(s)
        if leaf is None and (cell.node(s) is None or s in constant):
            continue  # not a per-step quantity (the diagonal of a parameter matrix, a time-constant node)
        if leaf is not None and leaf.kind in ("vector", "scalar", "constant"):
            continue
        shift = -1 if (leaf is not None and leaf.kind == "state") else 0
        rep[s] = IndexedBase(s.name)[step + shift]
    return expr.xreplace(rep)


# ----------------------------------------------------------------------------
# formal ordered products and sums of matrices (printable; never unrolled)
# ----------------------------------------------------------------------------


class _FormalIndexed(MatrixExpr):
    """A matrix-valued term indexed over ``lo..hi``, kept formal (printed, never expanded)."""

    def __new__(cls, term: Any, index: sympy.Symbol, lo: Any, hi: Any) -> "_FormalIndexed":
        return sympy.Basic.__new__(cls, term, index, sympy.sympify(lo), sympy.sympify(hi))

    @property
    def shape(self) -> tuple[Any, Any]:
        return self.args[0].shape


class OrderedProduct(_FormalIndexed):
    r""":math:`\prod_{j=lo}^{hi} M_j` in chain-rule order (``M_hi`` leftmost), kept formal."""

    def _sympystr(self, p: Any) -> str:
        term, j, lo, hi = self.args
        return f"Prod[{p._print(j)}={p._print(hi)}..{p._print(lo)}]({p._print(term)})"

    def _latex(self, p: Any, **kw: Any) -> str:
        term, j, lo, hi = self.args
        return r"\prod_{%s=%s}^{%s\,\leftarrow} \left(%s\right)" % (p._print(j), p._print(lo), p._print(hi), p._print(term))


class FirstOrderSum(_FormalIndexed):
    r""":math:`\sum_{i=lo}^{hi} X_i` of matrix terms, kept formal."""

    def _sympystr(self, p: Any) -> str:
        term, i, lo, hi = self.args
        return f"Sum[{p._print(i)}={p._print(lo)}..{p._print(hi)}]({p._print(term)})"

    def _latex(self, p: Any, **kw: Any) -> str:
        term, i, lo, hi = self.args
        return r"\sum_{%s=%s}^{%s} %s" % (p._print(i), p._print(lo), p._print(hi), p._print(term))


# ----------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------


def retention_state(cell: Cell, state: str | None = None) -> str:
    """The state whose retention defines the effective learning rate: ``state`` if given,
    else the first state with a leak term (``c`` for the LSTM), else the first state."""
    names = cell.state_names
    name_args(state=state)
    if state is not None:
        if state not in names:
            raise CellSpecError(f"{state!r} is not a state of cell {cell.name!r}; states are {names}")
        return state
    for s in names:
        if jacobian(cell, s, s).select("leak").terms:
            return s
    return names[0]


@dataclass(frozen=True)
class Split:
    """``J = A + eps*B`` for one state block; ``origins`` are the origins that form ``B``."""

    name: str
    state: str
    origins: tuple[str, ...]
    A: StructuredJacobian
    B: StructuredJacobian

    @property
    def A_is_diagonal(self) -> bool:
        return all(t.is_diagonal for t in self.A.terms)

    def __str__(self) -> str:
        return f"split {self.name!r} of d{self.state}'/d{self.state}:\n  A = {_sum_str(self.A)}\n  B = {_sum_str(self.B)}"


def _sum_str(J: StructuredJacobian) -> str:
    return " + ".join(str(t) for t in J.terms) or "0"


def split(cell: Cell, how: str | Sequence[str] = "appendix", *, state: str | None = None) -> Split:
    """Split the state Jacobian of ``state`` into ``A + eps*B`` (see the module docstring).

    ``how`` is a named split (``"appendix"``, ``"coupling"``, ``"diagonal"``) or a
    collection of origins that form ``B``.
    """
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    if isinstance(how, str):
        if how not in SPLITS:
            raise CellSpecError(f"unknown split {how!r}; named splits are {sorted(SPLITS)} (or pass a tuple of origins)")
        name, origins = how, SPLITS[how]
    else:
        if not isinstance(how, (list, tuple, set, frozenset)) or not all(isinstance(o, str) for o in how):
            raise CellSpecError(f"how must be a named split {sorted(SPLITS)} or a tuple of origin names, got {how!r}")
        origins = tuple(how)
        bad = [o for o in origins if o not in ORIGINS]
        if bad:
            raise CellSpecError(f"unknown origin(s) {bad}; origins are {ORIGINS}")
        name = "+".join(origins) or "none"
    s = retention_state(cell, state)
    J = jacobian(cell, s, s)
    rest = tuple(o for o in ORIGINS if o not in origins)
    return Split(name, s, tuple(origins), J.select(*rest), J.select(*origins))


# ----------------------------------------------------------------------------
# expansion
# ----------------------------------------------------------------------------


def _timed_matexpr(cell: Cell, J: StructuredJacobian, step: sympy.Expr) -> Any:
    """The matrix expression of ``J`` at time ``step`` (indexed per-unit quantities)."""
    from ._matexpr import UnitCol, UnitDiag

    expr = J.expr

    def timed(e: Any) -> Any:
        if isinstance(e, (UnitDiag, UnitCol)):
            return type(e)(at_step(cell, e.unit_expr, step), e.dim)
        if isinstance(e, sympy.Expr) and not isinstance(e, MatrixExpr):
            return at_step(cell, e, step)
        if not e.args:
            return e
        return e.func(*[timed(a) for a in e.args])

    return timed(expr)


@dataclass(frozen=True)
class Expansion:
    r"""First-order expansion of :math:`F(\varepsilon)=\prod_{j=k+1}^{t}(A_j+\varepsilon B_j)`, ``k = t - ell``.

    ``zeroth`` is :math:`\prod A_j`, ``first`` the first-order term ``L``; both are SymPy
    objects.  When ``A`` is diagonal, ``retention`` is the per-neuron closed form of
    :math:`\prod\lambda_j` and, for the diagonal split, ``diagonal_first_order`` is
    :math:`\prod\lambda_j \sum_j r_j/\lambda_j`.
    """

    cell: Cell
    split: Split

    @cached_property
    def A_j(self) -> Any:
        return _timed_matexpr(self.cell, self.split.A, _j)

    @cached_property
    def B_i(self) -> Any:
        return _timed_matexpr(self.cell, self.split.B, _i)

    @cached_property
    def leak(self) -> sympy.Expr | None:
        """Per-unit diagonal of ``A`` at step ``j`` (when ``A`` is diagonal)."""
        if not self.split.A_is_diagonal:
            return None
        return at_step(self.cell, self.split.A.diagonal_part(), _j)

    @cached_property
    def retention(self) -> sympy.Expr | None:
        r"""Per-neuron :math:`\prod_{j=t-\ell+1}^{t}\lambda_j` (evaluated where SymPy can: ``(1-alpha)**ell``)."""
        lam = self.leak
        if lam is None:
            return None
        return _product(lam, t - ell + 1, t)

    @cached_property
    def zeroth(self) -> Any:
        """The zeroth-order product: per-neuron closed form (as ``diag``) or a formal ordered product."""
        if self.retention is not None:
            from ._matexpr import UnitDiag

            n = dim_symbol(self.cell.leaf(self.split.state).dim)  # type: ignore[union-attr]
            return UnitDiag(self.retention, n) if self.retention != 1 else sympy.Identity(n)
        return OrderedProduct(self.A_j, _j, t - ell + 1, t)

    @cached_property
    def first(self) -> Any:
        r"""The first-order term :math:`L=\sum_i(\prod_{j>i}A_j)B_i(\prod_{j<i}A_j)`."""
        if self.retention is not None:
            from ._matexpr import UnitDiag

            n = dim_symbol(self.cell.leaf(self.split.state).dim)  # type: ignore[union-attr]
            left = UnitDiag(_product(self.leak, _i + 1, t), n)  # type: ignore[arg-type]
            right = UnitDiag(_product(self.leak, t - ell + 1, _i - 1), n)  # type: ignore[arg-type]
            term = sympy.MatMul(left, self.B_i, right)
        else:
            left = OrderedProduct(self.A_j, _j, _i + 1, t)
            right = OrderedProduct(self.A_j, _j, t - ell + 1, _i - 1)
            term = sympy.MatMul(left, self.B_i, right)
        return FirstOrderSum(term, _i, t - ell + 1, t)

    @cached_property
    def diagonal_first_order(self) -> sympy.Expr | None:
        r"""Follow-up's per-neuron :math:`\mu^{(1)}=\prod_j\lambda_j\,\sum_j r_j/\lambda_j`, ``r`` = rest of the diagonal.

        Defined when every non-leak term has a per-unit diagonal (one matrix per chain);
        ``diag(M)`` of a parameter matrix appears as the per-unit symbol ``M_diag``.
        """
        if self.retention is None:
            return None
        r = _diagonal_of_terms(self.split.B.terms)
        if r is None or self.leak == 0:
            return None
        if r == 0:
            return sympy.S.Zero
        rj = at_step(self.cell, r, _j)
        return self.retention * Sum(rj / self.leak, (_j, t - ell + 1, t))  # type: ignore[operator]

    def __str__(self) -> str:
        lines = [str(self.split)]
        lines.append(f"  F0 = {sstr(self.zeroth)}")
        lines.append(f"  L  = {sstr(self.first)}")
        if self.diagonal_first_order is not None:
            lines.append(f"  diagonal mu1 = {sstr(self.diagonal_first_order)}")
        return "\n".join(lines)

    def pretty(self) -> str:
        """Unicode rendering of the zeroth- and first-order terms."""
        parts = ["F0 =", sympy.pretty(self.zeroth), "L =", sympy.pretty(self.first)]
        return "\n".join(parts)

    def latex(self) -> str:
        rows = [rf"F_0 &= {latex(self.zeroth)}", rf"L &= {latex(self.first)}"]
        if self.diagonal_first_order is not None:
            rows.append(rf"\mu^{{(1)}} &= {latex(self.diagonal_first_order)}")
        return "\\begin{aligned}" + r" \\ ".join(rows) + "\\end{aligned}"

    def _repr_latex_(self) -> str:
        return "$" + self.latex() + "$"


def _product(expr: sympy.Expr, lo: Any, hi: Any) -> sympy.Expr:
    p = Product(expr, (_j, lo, hi))
    return p.doit() if not expr.has(sympy.Indexed) else p


def _diagonal_of_terms(terms: Sequence[Term]) -> sympy.Expr | None:
    """Per-unit diagonal of a sum of chains with at most one matrix each (else None)."""
    total: sympy.Expr = sympy.S.Zero
    for term in terms:
        mats = [f for f in term.factors if f.kind == "matrix"]
        if len(mats) > 1:
            return None
        # the entries of M on the chain's diagonal: M[q, q], or M[0, q] for a row, M[q, 0] for a column
        e = mul_chain(term.coefficient, [UnitSymbol(f"{f.matrix}_diag", f.cols if f.rows == 1 else f.rows)
                                         if f.kind == "matrix" else f.expr for f in term.factors])  # type: ignore[misc]
        total += e
    return total


def expansion(cell: Cell, how: str | Sequence[str] = "appendix", *, state: str | None = None) -> Expansion:
    """The first-order expansion of the Jacobian product of ``cell`` for a split (see :func:`split`).

    >>> import symgate as sg
    >>> print(sg.expansion(sg.cells.leaky(bias=False), "coupling").zeroth)
    diag((1 - alpha)**ell)
    """
    return Expansion(cell, split(cell, how, state=state))


# ----------------------------------------------------------------------------
# effective learning rates
# ----------------------------------------------------------------------------


def eligible_parameters(cell: Cell, state: str | None = None) -> dict[str, Term]:
    """Parameters with a per-neuron write gain for ``state``: their immediate Jacobian is a
    single diagonal chain ``w * dN/dz`` (they enter through a node the update reads)."""
    s = retention_state(cell, state)
    out: dict[str, Term] = {}
    entry_is_gate: dict[str, bool] = {}
    for p in cell.params:
        pj = parameter_jacobian(cell, p.name, s)
        if len(pj.pieces) != 1:
            continue
        C, _ = pj.pieces[0]
        if len(C.terms) == 1 and all(f.kind in ("diag", "col") for f in C.terms[0].factors) and C.terms[0].factors:
            out[p.name] = C.terms[0]
            node = cell.node(C.terms[0].path[-1]) if C.terms[0].path else None
            entry_is_gate[p.name] = bool(node is not None and node.is_gate)
    # parameters that enter through the candidate first (W, U, b), then through gates
    return dict(sorted(out.items(), key=lambda kv: entry_is_gate[kv[0]]))


@dataclass(frozen=True)
class EffectiveLR:
    r"""Per-lag, per-neuron effective learning rate of one parameter (symbolic).

    ``write_gain`` is :math:`w_{t-\ell}`, ``retention`` the product of leaks
    :math:`\prod_{j=t-\ell+1}^{t}\lambda_j`, ``mu`` the quantity of the chosen
    ``convention``, ``first_order`` the follow-up's diagonal correction (or None),
    ``isotropic`` whether it is the same for every neuron.
    """

    cell: Cell
    param: str
    state: str
    convention: str
    write_gain_unit: sympy.Expr  # per-unit w (untimed)
    leak_unit: sympy.Expr  # per-unit lambda (untimed)
    sensitivity_unit: sympy.Expr  # per-unit dN/dz (untimed)
    source: str  # the vector the parameter multiplies (for matrices)

    @property
    def write_gain(self) -> sympy.Expr:
        return at_step(self.cell, self.write_gain_unit, t - ell)

    @property
    def retention(self) -> sympy.Expr:
        return _product(at_step(self.cell, self.leak_unit, _j), t - ell + 1, t)

    @property
    def mu(self) -> sympy.Expr:
        if self.convention == "exact":
            return self.write_gain * self.retention
        if self.convention == "followup":
            return self.retention
        return _product(at_step(self.cell, self.write_gain_unit, _j), t - ell, t)

    @property
    def first_order(self) -> sympy.Expr | None:
        """Diagonal-split first-order correction of the retention product, times the write gain."""
        if self.convention == "s1":
            return None  # the released S1 predictor has no first-order correction
        ex = Expansion(self.cell, split(self.cell, "diagonal", state=self.state))
        d = ex.diagonal_first_order
        if d is None:
            return None
        return self.write_gain * d if self.convention == "exact" else d

    @property
    def isotropic(self) -> bool:
        """True when mu is the same for every neuron (no per-unit vector quantity in it)."""
        syms = (self.write_gain_unit * self.leak_unit).free_symbols
        return all(not (isinstance(s, UnitSymbol) and s.dim != 1) for s in syms)

    @property
    def envelope(self) -> sympy.Expr:
        r"""The follow-up's envelope :math:`f(\ell)=\lVert\mu_{t,\ell}\rVert_1` (sum over neurons)."""
        q = sympy.Symbol("q", integer=True)
        n = dim_symbol(self.cell.leaf(self.state).dim)  # type: ignore[union-attr]
        if self.isotropic:
            return n * sympy.Abs(self.mu)
        return Sum(sympy.Abs(_per_neuron(self.mu, q)), (q, 1, n))

    @property
    def normalised_envelope(self) -> sympy.Expr:
        r"""The envelope divided by the number of neurons: the mean :math:`|\mu|` over neurons."""
        return self.envelope / dim_symbol(self.cell.leaf(self.state).dim)  # type: ignore[union-attr]

    def pretty(self) -> str:
        """Unicode rendering of mu."""
        return sympy.pretty(self.mu)

    def __str__(self) -> str:
        iso = "isotropic" if self.isotropic else "per neuron (anisotropic)"
        lines = [
            f"effective learning rate of {self.param} (state {self.state}, convention {self.convention!r}, {iso}):",
            f"  mu[t, ell]   = {sstr(self.mu)}",
            f"  write gain   = {sstr(self.write_gain)}",
            f"  retention    = {sstr(self.retention)}",
        ]
        fo = self.first_order
        if fo is not None:
            lines.append(f"  first order  = {sstr(fo)}")
        return "\n".join(lines)

    def latex(self) -> str:
        rows = [rf"\mu_{{t,\ell}} &= {latex(self.mu)}",
                rf"w_{{t-\ell}} &= {latex(self.write_gain)}",
                rf"\textstyle\prod_j \lambda_j &= {latex(self.retention)}"]
        fo = self.first_order
        if fo is not None:
            rows.append(rf"\mu^{{(1)}}_{{t,\ell}} &= {latex(fo)}")
        return "\\begin{aligned}" + r" \\ ".join(rows) + "\\end{aligned}"

    def _repr_latex_(self) -> str:
        return "$" + self.latex() + "$"


def _per_neuron(expr: sympy.Expr, q: sympy.Symbol) -> sympy.Expr:
    """Index every time-indexed vector quantity by neuron ``q`` too (for the envelope's sum)."""
    rep = {}
    for ix in expr.atoms(sympy.Indexed):
        rep[ix] = IndexedBase(ix.base.label)[ix.indices + (q,)]
    return expr.xreplace(rep)


def effective_lr(cell: Cell, param: str | None = None, *, state: str | None = None, convention: str = "exact") -> EffectiveLR:
    r"""The per-lag effective learning rate :math:`\mu_{t,\ell}` of ``param`` (symbolic; see the module docstring).

    ``param`` defaults to the first parameter with a per-neuron write gain (``W`` for
    the built-ins); ``state`` to the state with a leak (``c`` for the LSTM).

    >>> import symgate as sg
    >>> print(sg.effective_lr(sg.cells.leaky(bias=False)).mu)
    alpha*(1 - alpha)**ell
    """
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    name_args(param=param, convention=convention)  # state: checked by retention_state
    if convention not in CONVENTIONS:
        raise CellSpecError(f"unknown convention {convention!r}; conventions are {CONVENTIONS}")
    s = retention_state(cell, state)
    eligible = eligible_parameters(cell, s)
    if not eligible:
        raise CellSpecError(f"cell {cell.name!r} has no parameter with a per-neuron write gain for state {s!r}")
    if param is None:
        param = next(iter(eligible))
    if param not in eligible:
        raise CellSpecError(
            f"parameter {param!r} of cell {cell.name!r} has no per-neuron write gain for state {s!r} "
            f"(it reaches the state through another matrix); eligible: {sorted(eligible)}"
        )
    term = eligible[param]
    w = mul_chain(term.coefficient, [f.expr for f in term.factors[:-1]])  # type: ignore[misc]
    sens = term.factors[-1].expr
    lam = jacobian(cell, s, s).select("leak").diagonal_part()
    pj = parameter_jacobian(cell, param, s)
    src = pj.pieces[0][1]
    return EffectiveLR(cell, param, s, convention, sympy.sympify(w), sympy.sympify(lam), sens,  # type: ignore[arg-type]
                       src.name if src is not None else "")
