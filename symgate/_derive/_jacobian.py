r"""Structured Jacobians, assembled from local partials by the chain rule.

The chain rule through ``Linear`` nodes is structural: every path from an updated
state back to the previous state (or to a parameter) through the cell graph
contributes one *term*, a chain of factors

* ``diag(e)`` -- the partial of a per-unit quantity with respect to another of
  the same dimension (a diagonal matrix of a per-unit expression ``e``),
* ``[e]`` -- the same when a scalar (dimension-1) quantity is broadcast to units
  (a column vector),
* ``M`` -- a parameter matrix, where a path crosses a Linear node ``z = M v``.

So the derived Jacobian is a sum of chains such as
``diag(g) diag(1 - phi**2) W + diag(1 - g) + diag(phi - h) diag(g*(1 - g)) Wg``
(the vector-gate cell), never an n x n matrix of scalar entries: the symbolic
work does not depend on the hidden size.  Each term carries its *origin*, decided
by what its path passes through on the way from the update to the state:

``leak``
    no recurrent parameter on the path: the parameter-free dependence of the update
    on the state (``diag(1 - g)``, ``(1 - alpha) I``);
``candidate``
    the path enters a recurrent parameter, and the segment that leads to its first
    entry passes through no gate (``diag(g) diag(1 - phi**2) W``);
``gate``
    the segment that leads to the first entry passes through a gate (a sigmoid node,
    or a node marked with ``.as_gate()``): the gate-derivative terms;
``reset``
    the first entry is not through a gate but a later one is (GRU's reset path,
    ``W_n`` and then ``W_r`` through the reset gate ``r``).

A path *enters a recurrent parameter* where it crosses a Linear node ``z = M v``
(the matrix ``M``), and where it takes a hop from an interior node whose dependence
on the next quantity is weighted by a trained vector or scalar
(:attr:`~symgate._derive._local.LocalPartials.through`): ``w`` in
``tanh(w*h + U x)``, ``v`` in ``sigmoid(v*h + Ug x)``, ``s`` in ``tanh(s*h)``, or a
reparametrised parameter such as ``exp(theta)`` in ``tanh(exp(theta)*h)``.  So a
trained recurrent path is never the leak, whatever the shape of its weight.  Not
entries:

* the update's own coefficients: the hops out of the state update, and out of the
  arithmetic sub-expressions of the update that have a node of their own (made by
  ``.named()`` or by bounded tracing; gate-marked nodes excepted).  ``(1 - g)*h``,
  ``(1 - a)*h`` with ``a = sigmoid(theta)``, and ``s*h`` with ``s`` a Scalar (a learned
  leak coefficient) are leaks, however the update is split into nodes;
* a bias inside an elementwise function (``tanh(h + b)``): for a function node only
  the derivative of its argument is inspected (the function's slope, like ``D_t``,
  is part of every path through it);
* constants (not trainable) and time-varying quantities (``r`` in ``W (r*h)``).

A path with no entry is a leak even when it passes through nodes: in
``0.5*h + 0.5*tanh(h + U x)`` both terms are leaks, ``0.5 I + 0.5 diag(1 - phi**2)``
(nothing trained acts on the state along them), and so is the derivative term of a
gate that reads the state without a weight (``sigmoid(h + Ug x)``).  Per state block of a multi-state
cell the rule is the same (the LSTM's ``dc'/dc = diag(f)`` is a leak).  The built-in
cells' recurrent weights are all matrices, so for them the rule reduces to "a matrix
on the path".

Paths are enumerated iteratively (graphs may be thousands of nodes deep), and a
Jacobian with more than :data:`MAX_CHAINS` chains is refused with a
:class:`~symgate.CellSpecError` (their number can grow exponentially with the depth
of a graph whose levels each read the previous one twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import sympy
from sympy.matrices.expressions import Identity, KroneckerProduct, MatrixSymbol, OneMatrix, ZeroMatrix

from .._cell import Cell, Dim, UnitSymbol, dim_symbol, name_args
from .._errors import CellSpecError, ShapeError, StateIndependenceError
from .._functions import NUMPY_FUNCTIONS
from .._linalg import matmul
from ._local import LocalPartials, Owner, local_partials
from ._matexpr import UnitCol, UnitDiag, latex, sstr, unit_entry, vector_symbol
from ._stable import argument_form

__all__ = [
    "Factor",
    "Term",
    "StructuredJacobian",
    "BlockJacobian",
    "ParamJacobian",
    "jacobian",
    "parameter_jacobian",
    "parameter_jacobians",
    "ORIGINS",
]

#: The origin labels a Jacobian term can carry, in display order.
ORIGINS: tuple[str, ...] = ("leak", "candidate", "gate", "reset")


def _is_scalar_expr(e: sympy.Expr) -> bool:
    return all(not (isinstance(s, UnitSymbol) and s.dim != 1) for s in e.free_symbols)


@dataclass(frozen=True)
class Factor:
    """One factor of a chain: ``diag(expr)``, ``[expr]`` (column) or a parameter matrix."""

    kind: str  # "diag" | "col" | "matrix"
    rows: Dim
    cols: Dim
    expr: sympy.Expr | None = None
    matrix: str | None = None
    #: ``expr`` in its numerically stable form (:mod:`._stable`), what numeric evaluation uses
    value: sympy.Expr | None = field(default=None, compare=False, repr=False)

    @property
    def numeric(self) -> sympy.Expr | None:
        """The expression numeric evaluation uses (the stable form, else ``expr``)."""
        return self.value if self.value is not None else self.expr

    def matexpr(self) -> Any:
        if self.kind == "matrix":
            return MatrixSymbol(self.matrix, dim_symbol(self.rows), dim_symbol(self.cols))
        if self.kind == "diag":
            return UnitDiag(self.expr, dim_symbol(self.rows))
        return UnitCol(self.expr, dim_symbol(self.rows))

    def __str__(self) -> str:
        return str(self.matexpr())


@dataclass(frozen=True)
class Term:
    """One chain of factors with its origin.

    ``coefficient`` collects the scalar (unit-independent) parts; ``factors`` are the
    remaining matrix factors, leftmost first; ``path`` names the nodes the chain
    passes through (outermost first); ``origin`` is one of :data:`ORIGINS`.
    """

    coefficient: sympy.Expr
    factors: tuple[Factor, ...]
    path: tuple[str, ...]
    origin: str
    rows: Dim
    cols: Dim
    #: ``coefficient`` in its numerically stable form (:mod:`._stable`)
    coefficient_value: sympy.Expr | None = field(default=None, compare=False, repr=False)

    @property
    def numeric_coefficient(self) -> sympy.Expr:
        """The coefficient numeric evaluation uses (the stable form, else ``coefficient``)."""
        return self.coefficient_value if self.coefficient_value is not None else self.coefficient

    @property
    def matrices(self) -> tuple[str, ...]:
        """The parameter matrices on the chain, leftmost first."""
        return tuple(f.matrix for f in self.factors if f.kind == "matrix")  # type: ignore[misc]

    @property
    def is_diagonal(self) -> bool:
        """True when the term is a diagonal matrix (a leak term)."""
        return all(f.kind == "diag" for f in self.factors) and self.rows == self.cols

    def diagonal_expr(self) -> sympy.Expr:
        """For a diagonal term, the per-unit expression on its diagonal."""
        if not self.is_diagonal:
            raise ValueError("term is not diagonal")
        return mul_chain(self.coefficient, [f.expr for f in self.factors])  # type: ignore[misc]

    def matexpr(self) -> Any:
        mats = [f.matexpr() for f in self.factors]
        if not mats:
            if self.rows == self.cols:
                return self.coefficient * Identity(dim_symbol(self.rows))
            return self.coefficient * OneMatrix(dim_symbol(self.rows), dim_symbol(self.cols))
        if self.factors[0].rows != self.rows:  # scalar broadcast at the front: a column of ones
            mats.insert(0, OneMatrix(dim_symbol(self.rows), sympy.S.One))
        # (a chain ends with the target's dimension: a broadcast after other factors is kept, as [1])
        if self.coefficient != 1:
            mats.insert(0, self.coefficient)
        return mats[0] if len(mats) == 1 else sympy.MatMul(*mats)

    def __str__(self) -> str:
        return sstr(self.matexpr())


_FOLD = 32


def mul_chain(first: sympy.Expr, exprs: Sequence[sympy.Expr]) -> sympy.Expr:
    """``first * exprs[0] * exprs[1] * ...``, multiplied left to right.

    Past the first :data:`_FOLD` factors the rest are multiplied in one ``Mul``: a left
    fold re-sorts the growing product at every step, quadratic in the length of the
    long chains of a deep cell graph (a product of up to 32 factors is exactly the fold).
    """
    out = first
    for e in exprs[:_FOLD]:
        out = out * e
    if len(exprs) > _FOLD:
        out = sympy.Mul(out, *exprs[_FOLD:])
    return out


def _simplify_chain(chain: Sequence[Factor], rows: Dim, cols: Dim) -> tuple[sympy.Expr, tuple[Factor, ...]]:
    scalars: list[sympy.Expr] = []
    out: list[Factor] = []
    for f in chain:
        if f.kind != "matrix" and _is_scalar_expr(f.expr):  # type: ignore[arg-type]
            # a scalar factor: its value goes to the coefficient.  A broadcast [e] still maps the
            # units to one scalar (n x 1): first in the chain, the term's shape says so (a column of
            # ones in front); after other factors it stays, as the column of ones [1]
            scalars.append(f.expr)  # type: ignore[arg-type]
            if f.kind == "col" and out:
                out.append(Factor("col", f.rows, f.cols, expr=sympy.S.One))
            continue
        out.append(f)
    return sympy.factor_terms(mul_chain(sympy.S.One, scalars)), tuple(out)


class _Lambdified:
    """Numeric evaluation of per-unit expressions, lambdified once and cached."""

    def __init__(self) -> None:
        self._cache: dict[sympy.Expr, tuple[Callable[..., Any], tuple[str, ...]]] = {}

    def __call__(self, expr: sympy.Expr, values: Mapping[str, Any]) -> Any:
        hit = self._cache.get(expr)
        if hit is None:
            syms = tuple(sorted(expr.free_symbols, key=lambda s: s.name))
            fn = sympy.lambdify(syms, expr, modules=[NUMPY_FUNCTIONS, "numpy"], cse=True)
            hit = (fn, tuple(s.name for s in syms))
            self._cache[expr] = hit
        fn, names = hit
        return fn(*[values[n] for n in names])


_LAMBDIFIED = _Lambdified()


def _values_dtype(values: Mapping[str, Any]) -> np.dtype:
    """The dtype of the per-unit values: arrays only, so that Python numbers (the constants) do not
    promote float32 values to float64."""
    dtypes = [np.asarray(v).dtype for v in values.values() if not isinstance(v, (int, float))]
    return np.result_type(*dtypes) if dtypes else np.dtype(np.float64)


def _chain(factors: Sequence[Factor], values: Mapping[str, Any], params: Mapping[str, Any], batch: int,
           sizes: Mapping[Any, int]) -> tuple[str, Any]:
    """The product of a chain of factors, kept structured as long as possible.

    Returns ``(kind, value)``: ``"none"`` (empty chain), ``"diag"`` (``(B, d)``, a
    diagonal), ``"shared"`` (``(r, c)``, the same matrix for every sequence) or
    ``"dense"`` (``(B, r, c)``).  A dense accumulator times a parameter matrix is one
    GEMM over all ``B * r`` rows; diagonals are applied by broadcasting.
    """
    kind, acc = "none", None
    for f in factors:
        if f.kind == "matrix":
            M = np.asarray(params[f.matrix])
            if kind == "none":
                kind, acc = "shared", M
            elif kind == "diag":
                kind, acc = "dense", acc[:, :, None] * M[None]
            elif kind == "shared":
                acc = matmul(acc, M)
            else:
                B_, rr, cc = acc.shape
                acc = matmul(acc.reshape(B_ * rr, cc), M).reshape(B_, rr, M.shape[1])
            continue
        v = np.asarray(_LAMBDIFIED(f.numeric, values))  # type: ignore[arg-type]
        d = sizes[f.rows]
        v = np.broadcast_to(v, (batch, d)) if v.ndim else np.full((batch, d), v)
        if f.kind == "diag":
            if kind == "none":
                kind, acc = "diag", v
            elif kind == "diag":
                acc = acc * v
            elif kind == "shared":
                kind, acc = "dense", acc[None] * v[:, None, :]
            else:
                acc = acc * v[:, None, :]
        else:  # a column vector (outer-product factor), (B, d, 1)
            if kind == "none":
                kind, acc = "dense", v[:, :, None]
            elif kind == "diag":
                kind, acc = "dense", (acc * v)[:, :, None]
            elif kind == "shared":
                kind, acc = "dense", matmul(v, acc.T)[:, :, None]
            else:
                kind, acc = "dense", np.einsum("brc,bc->br", acc, v)[:, :, None]
    return kind, acc


@dataclass(frozen=True)
class StructuredJacobian:
    r"""A Jacobian as a sum of origin-tagged chains.

    ``of`` is the differentiated quantity (an updated state, ``"h'"``), ``wrt`` what
    it is differentiated with respect to.  ``expr`` is the SymPy matrix expression;
    print it, ``sympy.latex`` it, or make it explicit for a size with
    :meth:`as_explicit`.
    """

    of: str
    wrt: str
    terms: tuple[Term, ...]
    rows: Dim
    cols: Dim

    @cached_property
    def expr(self) -> Any:
        """The Jacobian as a SymPy matrix expression (sum of the terms)."""
        if not self.terms:
            return ZeroMatrix(dim_symbol(self.rows), dim_symbol(self.cols))
        parts = [t.matexpr() for t in self.terms]
        return parts[0] if len(parts) == 1 else sympy.MatAdd(*parts, evaluate=False)

    def select(self, *origins: str) -> "StructuredJacobian":
        """The sub-sum of the terms whose origin is in ``origins``."""
        bad = [o for o in origins if o not in ORIGINS]
        if bad:
            raise CellSpecError(f"unknown origin(s) {bad}; origins are {ORIGINS}")
        return StructuredJacobian(self.of, self.wrt, tuple(t for t in self.terms if t.origin in origins), self.rows, self.cols)

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o for o in ORIGINS if any(t.origin == o for t in self.terms))

    def diagonal_part(self) -> sympy.Expr:
        """Per-unit expression of the sum of the diagonal (leak) terms."""
        out: sympy.Expr = sympy.S.Zero
        for t in self.terms:
            if t.is_diagonal:
                out += t.diagonal_expr()
        return out

    def as_explicit(self, sizes: Mapping[str, int], *, inline: bool = False, cell: Cell | None = None) -> sympy.Matrix:
        """The explicit matrix for concrete sizes (e.g. ``{"n": 2}``), for checking.

        Vector symbols become ``v[i, 0]`` entries of MatrixSymbols.  With
        ``inline=True`` (and ``cell``), node symbols are replaced by their defining
        expressions in terms of leaves, so the result can be compared with a
        brute-force Jacobian of the explicit update.
        """
        dims = {d for t in self.terms for f in t.factors for d in (f.rows, f.cols)} | {self.rows, self.cols}
        needed = sorted(dims - {1}, key=str)
        missing = [d for d in needed if d not in sizes]
        if missing:
            raise ShapeError(f"as_explicit needs a size for dimension(s) {missing}; got sizes {dict(sizes)}")
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ShapeError(f"as_explicit sizes must be positive integers, got {bad}")
        sub = {dim_symbol(k): v for k, v in sizes.items()}
        m = sympy.Matrix(self.expr.subs(sub).as_explicit()) if self.terms else sympy.zeros(
            *(1 if d == 1 else sizes[d] for d in (self.rows, self.cols))  # type: ignore[index]
        )
        if inline:
            if not isinstance(cell, Cell):
                raise CellSpecError("as_explicit(inline=True) needs cell=<the Cell> to substitute node definitions")
            m = m.xreplace(explicit_node_values(cell, sizes))
        return m

    def infer_sizes(self, values: Mapping[str, Any], params: Mapping[str, Any]) -> dict[Any, int]:
        """The sizes of the named dimensions, read off ``values`` and ``params``."""
        sizes: dict[Any, int] = {1: 1}
        for t in self.terms:
            for f in t.factors:
                if f.kind == "matrix":
                    r, c = np.shape(params[f.matrix])
                    sizes.setdefault(f.rows, r)
                    sizes.setdefault(f.cols, c)
                else:
                    for sym in f.expr.free_symbols:  # type: ignore[union-attr]
                        v = values.get(sym.name)
                        if isinstance(sym, UnitSymbol) and sym.dim != 1 and v is not None and np.ndim(v) >= 1:
                            sizes.setdefault(sym.dim, np.shape(v)[-1])
        for d in (self.rows, self.cols):
            if d not in sizes:
                raise ShapeError(f"cannot infer the size of dimension {d!r}; pass sizes=")
        return sizes

    def lambdify(self) -> Callable[..., np.ndarray]:
        """A numeric function ``f(values, params) -> (B, rows, cols)``; see :meth:`evaluate`."""
        return lambda values, params: self.evaluate(values, params)

    def evaluate(self, values: Mapping[str, Any], params: Mapping[str, Any], sizes: Mapping[Any, int] | None = None) -> np.ndarray:
        """Dense numeric Jacobian ``(B, rows, cols)`` at one step.

        ``values`` maps every leaf and node name to its per-unit values ``(B, d)``
        (as produced by ``ReferenceKernel.step_values``), ``params`` the parameters;
        ``sizes`` (dimension name -> size) is inferred when omitted.  Complements of
        saturating nodes (``1 - g``, ``1 - phi**2``) are evaluated in their stable forms
        from the nodes' arguments (:mod:`symgate._derive._stable`).
        """
        needed = {sym.name for t in self.terms
                  for e in [t.numeric_coefficient, *[f.numeric for f in t.factors if f.expr is not None]]
                  for sym in e.free_symbols}
        missing = sorted(needed - set(values)) + sorted(
            {f.matrix for t in self.terms for f in t.factors if f.kind == "matrix"} - set(params))  # type: ignore[arg-type]
        if missing:
            raise ShapeError(f"evaluate() is missing values for {missing}")
        if not any(np.ndim(v) == 2 for v in values.values()):
            raise ShapeError("evaluate() needs per-unit values of shape (B, d) (see ReferenceKernel.step_values)")
        if sizes is None:
            sizes = self.infer_sizes(values, params)
        batch = next(np.shape(v)[0] for v in values.values() if np.ndim(v) == 2)
        r, c = sizes[self.rows], sizes[self.cols]
        dtype = _values_dtype(values)
        out = np.zeros((batch, r, c), dtype=dtype)
        for t in self.terms:
            coeff = np.asarray(_LAMBDIFIED(t.numeric_coefficient, values))
            coeff = coeff.reshape(coeff.shape[0], 1, 1) if coeff.ndim == 2 else coeff
            kind, acc = _chain(t.factors, values, params, batch, sizes)
            if kind == "diag" and r == c and t.factors[0].rows == t.rows and t.factors[-1].cols == t.cols:
                idx = np.arange(r)
                out[:, idx, idx] += (coeff[:, :, 0] if np.ndim(coeff) == 3 else coeff) * acc
                continue
            if kind == "none":
                acc = np.broadcast_to(np.eye(r, c, dtype=dtype) if r == c else np.ones((r, c), dtype), (batch, r, c))
            elif kind == "diag":
                acc = acc[:, :, None] * np.eye(acc.shape[1], dtype=acc.dtype)[None]
            elif kind == "shared":
                acc = acc[None]
            if t.factors and t.factors[0].rows != t.rows:  # a dimension-1 factor broadcast over rows
                acc = np.broadcast_to(acc, (acc.shape[0], r, acc.shape[2]))
            out += coeff * acc
        return out

    # -- display -------------------------------------------------------------
    def __str__(self) -> str:
        return f"d{self.of}/d{self.wrt} = " + " + ".join(str(t) for t in self.terms) if self.terms else f"d{self.of}/d{self.wrt} = 0"

    def _repr_latex_(self) -> str:
        return "$" + self.latex() + "$"

    def latex(self) -> str:
        """LaTeX of the Jacobian, terms in origin order."""
        body = " + ".join(latex(t.matexpr()) for t in self.terms) or "0"
        return rf"\frac{{\partial {_tex_name(self.of)}}}{{\partial {_tex_name(self.wrt)}}} = {body}"

    def pretty(self) -> str:
        """Unicode pretty print of ``expr``."""
        return sympy.pretty(self.expr, use_unicode=True)

    def describe(self) -> str:
        """One line per term: origin, chain."""
        lines = [f"d{self.of}/d{self.wrt}:"]
        for t in self.terms:
            lines.append(f"  [{t.origin:9s}] {t}")
        return "\n".join(lines)


def _tex_name(name: str) -> str:
    prime = name.endswith("'")
    base = name[:-1] if prime else name
    if base.startswith("vec("):
        return r"\operatorname{vec}(%s)" % sympy.latex(sympy.Symbol(base[4:-1]))
    return sympy.latex(sympy.Symbol(base)) + ("'" if prime else "")


@dataclass(frozen=True)
class BlockJacobian:
    """The block state Jacobian of a multi-state cell: ``blocks[(i, j)] = d state_i' / d state_j``."""

    states: tuple[str, ...]
    blocks: dict[tuple[str, str], StructuredJacobian]

    def __getitem__(self, key: tuple[str, str]) -> StructuredJacobian:
        return self.blocks[key]

    @cached_property
    def expr(self) -> Any:
        return sympy.BlockMatrix([[self.blocks[(a, b)].expr for b in self.states] for a in self.states])

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(t for blk in self.blocks.values() for t in blk.terms)

    def __str__(self) -> str:
        return "\n".join(str(self.blocks[(a, b)]) for a in self.states for b in self.states)

    def describe(self) -> str:
        return "\n".join(self.blocks[(a, b)].describe() for a in self.states for b in self.states)

    def latex(self) -> str:
        return "\n".join(self.blocks[(a, b)].latex() for a in self.states for b in self.states)

    def _repr_latex_(self) -> str:
        return "$" + latex(self.expr) + "$"

    def evaluate(self, values: Mapping[str, Any], params: Mapping[str, Any], sizes: Mapping[Any, int]) -> np.ndarray:
        """Dense block Jacobian ``(B, N, N)`` with ``N`` the total state size."""
        rows = [np.concatenate([self.blocks[(a, b)].evaluate(values, params, sizes) for b in self.states], axis=2) for a in self.states]
        return np.concatenate(rows, axis=1)


@dataclass(frozen=True)
class ParamJacobian:
    r"""The immediate parameter Jacobian :math:`\partial^+ s'/\partial\theta` of one state.

    For a matrix parameter ``M`` read by Linear nodes :math:`z_k = M v_k`:
    :math:`\partial^+ s'/\partial \mathrm{vec}(M) = \sum_k v_k^\top \otimes C_k` with
    :math:`C_k = \partial s'/\partial z_k` (``pieces[k] = (C_k, v_k)``).  For a vector or
    scalar parameter, ``pieces`` has one entry ``(C, None)`` and ``C`` is the Jacobian.
    """

    of: str
    param: str
    kind: str
    pieces: tuple[tuple[StructuredJacobian, UnitSymbol | None], ...]
    rows: Dim = "n"
    shape: tuple[Dim, ...] = ()

    @cached_property
    def expr(self) -> Any:
        parts = []
        for C, v in self.pieces:
            if v is None:
                parts.append(C.expr)
            else:
                parts.append(KroneckerProduct(vector_symbol(v).T, C.expr))
        if not parts:
            cols = sympy.Mul(*[dim_symbol(d) for d in self.shape])
            return ZeroMatrix(dim_symbol(self.rows), cols)
        return parts[0] if len(parts) == 1 else sympy.MatAdd(*parts, evaluate=False)

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(t for C, _ in self.pieces for t in C.terms)

    def __str__(self) -> str:
        wrt = f"vec({self.param})" if self.kind == "matrix" else self.param
        parts = []
        for C, v in self.pieces:
            body = " + ".join(str(t) for t in C.terms)
            parts.append(body if v is None else f"{v.name}.T \u2297 ({body})")
        return f"d+{self.of}/d{wrt} = " + (" + ".join(parts) if parts else "0")

    def latex(self) -> str:
        wrt = f"vec({self.param})" if self.kind == "matrix" else self.param
        return rf"\frac{{\partial^+ {_tex_name(self.of)}}}{{\partial {_tex_name(wrt)}}} = {latex(self.expr)}"

    def _repr_latex_(self) -> str:
        return "$" + self.latex() + "$"

    def evaluate(self, values: Mapping[str, Any], params: Mapping[str, Any], sizes: Mapping[Any, int]) -> np.ndarray:
        """Dense ``(B, d_out, *param_shape)``: entry ``[b, i, ...]`` is d s'_i / d theta[...]."""
        batch = next(np.shape(v)[0] for v in values.values() if np.ndim(v) == 2)
        dtype = _values_dtype(values)
        total = np.zeros((batch, sizes[self.rows], *[sizes[d] for d in self.shape]), dtype=dtype)
        for C, v in self.pieces:
            dense = C.evaluate(values, params, sizes)  # (B, d_out, r)
            if v is not None:
                vv = np.asarray(values[v.name])
                vv = np.broadcast_to(vv, (dense.shape[0], sizes[v.dim])) if vv.ndim == 2 else np.full((dense.shape[0], sizes[v.dim]), vv)
                dense = dense[:, :, :, None] * vv[:, None, None, :]
            elif self.kind == "scalar":
                dense = dense[:, :, 0]  # a scalar parameter: (B, d_out, 1) -> (B, d_out)
            total = total + dense
        return total


# ----------------------------------------------------------------------------
# assembly by path enumeration
# ----------------------------------------------------------------------------


def _factor(owner_dim: Dim, sym_dim: Dim, partial: sympy.Expr) -> Factor:
    if owner_dim == sym_dim:
        return Factor("diag", owner_dim, sym_dim, expr=partial)
    if sym_dim == 1:
        return Factor("col", owner_dim, 1, expr=partial)
    raise AssertionError("a per-unit quantity cannot read a wider one")  # pragma: no cover


#: The most chains (terms) a derived Jacobian may have.  Each chain is one path through
#: the cell graph; a graph in which every level reads the previous one through two
#: nodes has exponentially many.  The built-in cells have at most a few terms per block
#: and hand-written cells a few dozen, so 1024 leaves two orders of magnitude of room
#: while keeping printing, evaluation and kernel generation (linear in the number of
#: chains) well under a second per term class.
MAX_CHAINS = 1024


@dataclass(frozen=True)
class _Path:
    factors: tuple[Factor, ...]
    nodes: tuple[str, ...]
    # one flag per entry of the path into a recurrent parameter (a matrix crossed, or
    # a hop weighted by a trainable vector/scalar): does the segment of the path that
    # leads to this entry (from the output or the previous entry) pass through a gate?
    entries: tuple[bool, ...]


# A walk state: (owner, at_update_level, targets).  ``at_update_level`` is true for the
# update itself and for the (non-gate) arithmetic nodes reached from it through
# arithmetic nodes only: sub-expressions of the update that were given a node of their
# own (by ``.named()``, or when tracing bounds expression sizes).  Hops out of them
# are the update's own coefficients (a learned leak ``s*h`` stays a leak), so the
# origin of a path does not depend on how the update was split into nodes.
_Key = tuple  # (Owner, bool, frozenset[UnitSymbol])


def _linear_chain(cell: Cell, nd: Any, targets: frozenset) -> tuple[tuple[Any, ...], Any]:
    """The Linear nodes a hop into ``nd`` passes through: ``nd``, then its source while that is
    another Linear node (``U2 @ (U1 @ x)``) and not a target; and the symbol the chain reads."""
    chain = [nd]
    src = nd.source
    while src not in targets and cell.node(src) is not None and cell.node(src).kind == "linear":
        chain.append(cell.node(src))
        src = chain[-1].source
    return tuple(chain), src


def _hops(lp: LocalPartials, key: _Key) -> Iterable[tuple[UnitSymbol, sympy.Expr, Any, Any]]:
    """The hops out of a walk state: ``(symbol, partial, node, child)`` with ``child`` the
    walk state the path continues in, or None when the hop reaches a target (directly,
    or through a Linear node whose source is a target)."""
    owner, top, targets = key
    cell = lp.cell
    for sym, partial in lp.partials[owner].items():
        if sym in targets:
            yield sym, partial, None, None
            continue
        nd = cell.node(sym)
        if nd is None:
            continue  # a leaf that is not a target
        if nd.kind == "linear":
            _, src = _linear_chain(cell, nd, targets)
            if src in targets:
                yield sym, partial, nd, None
                continue
            if cell.node(src) is None:
                continue
            yield sym, partial, nd, (Owner(src), False, targets)
        else:
            yield sym, partial, nd, (Owner(sym), top and nd.kind == "arith" and not nd.is_gate, targets)


def _walk(lp: LocalPartials, owner: Owner, targets: frozenset[UnitSymbol], memo: dict, what: str) -> list[_Path]:
    """Every path from ``owner`` (an updated state) to ``targets``, as chains of factors.

    Iterative (the graph may be thousands of nodes deep): the walk states reachable from
    the root are put in post-order, the number of paths is counted by dynamic programming
    (so an exponential number is refused before any is built: more than
    :data:`MAX_CHAINS` raises :class:`CellSpecError`), then the paths are assembled from
    the leaves up.  ``memo`` is shared between walks of one cell.
    """
    cell = lp.cell
    root: _Key = (owner, True, targets)
    paths_memo: dict = memo.setdefault("paths", {})
    count_memo: dict = memo.setdefault("count", {})
    if root in paths_memo:
        return paths_memo[root]
    # post-order of the walk states not derived yet (a DAG: no state is its own descendant)
    order: list[_Key] = []
    seen: set = set()
    stack: list[tuple[_Key, bool]] = [(root, False)]
    while stack:
        key, expanded = stack.pop()
        if expanded:
            order.append(key)
            continue
        if key in seen or key in paths_memo:
            continue
        seen.add(key)
        stack.append((key, True))
        for _, _, _, child in _hops(lp, key):
            if child is not None and child not in seen and child not in paths_memo:
                stack.append((child, False))
    cap = MAX_CHAINS + 1
    for key in order:
        if key in count_memo:
            continue
        count_memo[key] = min(cap, sum(1 if child is None else count_memo[child] for _, _, _, child in _hops(lp, key)))
    if count_memo[root] > MAX_CHAINS:
        raise CellSpecError(
            f"{what} of cell {cell.name!r} has more than {MAX_CHAINS} chains (terms): the cell graph has "
            "too many distinct paths from the update to the state (nodes that each read the previous "
            "level more than once multiply them); give shared quantities fewer readers"
        )
    for key in order:
        paths_memo[key] = _paths_of(lp, key, paths_memo)
    return paths_memo[root]


def _paths_of(lp: LocalPartials, key: _Key, paths_memo: dict) -> list[_Path]:
    """The paths of one walk state, from the paths of the states it continues in."""
    owner, top, targets = key
    cell = lp.cell
    owner_dim = lp.dim[owner]
    owner_node = cell.node(owner.symbol) if owner.symbol is not None else None
    owner_is_gate = bool(owner_node is not None and owner_node.is_gate)
    through = lp.through.get(owner, {})
    paths: list[_Path] = []
    for sym, partial, nd, child in _hops(lp, key):
        f = _factor(owner_dim, sym.dim, partial)  # type: ignore[arg-type]
        # a hop from inside the cell weighted by a trained vector/scalar enters a recurrent parameter
        weighted = not top and bool(through.get(sym))
        if nd is None:  # the target itself
            paths.append(_Path((f,), (), (owner_is_gate,) if weighted else ()))
            continue
        if nd.kind == "linear":
            chain, src = _linear_chain(cell, nd, targets)
            mats = tuple(Factor("matrix", c.dim, c.source.dim, matrix=c.matrix) for c in chain)
            names = tuple(c.name for c in chain)
            if child is None:
                paths.append(_Path((f,) + mats, names, (owner_is_gate,)))
                continue
            for rest in paths_memo[child]:
                paths.append(_Path((f,) + mats + rest.factors, names + (cell.node(src).name,) + rest.nodes,
                                   (owner_is_gate,) + rest.entries))
            continue
        for rest in paths_memo[child]:
            entries = rest.entries
            if weighted:
                entries = (owner_is_gate,) + entries
            elif entries and owner_is_gate:
                entries = (True,) + entries[1:]
            paths.append(_Path((f,) + rest.factors, (nd.name,) + rest.nodes, entries))
    return paths


def _origin(p: _Path) -> str:
    if not p.entries:
        return "leak"
    if p.entries[0]:
        return "gate"
    return "reset" if any(p.entries[1:]) else "candidate"


def _with_stable_forms(cell: Cell, coeff: sympy.Expr, factors: tuple[Factor, ...]) -> tuple[sympy.Expr, tuple[Factor, ...]]:
    """The stable numeric forms of a chain's coefficient and factors (complements of saturating nodes)."""
    out = tuple(f if f.expr is None else Factor(f.kind, f.rows, f.cols, f.expr, f.matrix, argument_form(cell, f.expr))
                for f in factors)
    return argument_form(cell, coeff), out


def _to_structured(of: str, wrt: str, rows: Dim, cols: Dim, paths: Iterable[_Path], cell: Cell) -> StructuredJacobian:
    terms = []
    for p in paths:
        coeff, factors = _simplify_chain(p.factors, rows, cols)
        if coeff == 0:
            continue
        stable_coeff, factors = _with_stable_forms(cell, coeff, factors)
        terms.append(Term(coeff, factors, p.nodes, _origin(p), rows, cols, stable_coeff))
    terms.sort(key=lambda t: ORIGINS.index(t.origin))
    return StructuredJacobian(of, wrt, tuple(terms), rows, cols)


def _state_block(cell: Cell, i: int, j: int, memo: dict) -> StructuredJacobian:
    lp = local_partials(cell)
    out_state, in_state = cell.states[i], cell.states[j]
    what = f"the state Jacobian d{out_state.name}'/d{in_state.name}"
    paths = _walk(lp, Owner(None, i), frozenset([in_state.symbol]), memo, what)
    return _to_structured(out_state.name + "'", in_state.name, out_state.dim, in_state.dim, paths, cell)


def jacobian(cell: Cell, of: str | None = None, wrt: str | None = None) -> Any:
    r"""The exact state Jacobian :math:`\partial s'/\partial s` of ``cell``.

    For a one-state cell, a :class:`StructuredJacobian`; for a multi-state cell, a
    :class:`BlockJacobian` (or one block, given ``of`` and ``wrt`` state names).
    Derived once per cell and cached.

    >>> import symgate as sg
    >>> print(sg.jacobian(sg.cells.leaky(bias=False)))
    dh'/dh = (1 - alpha)*I + alpha*diag(1 - phi**2)*W
    """
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    name_args(of=of, wrt=wrt)
    names = cell.state_names
    for nm in (of, wrt):
        if nm is not None and nm not in names:
            raise CellSpecError(f"{nm!r} is not a state of cell {cell.name!r}; states are {names}")
    cache = cell._index
    key = ("derive", "jacobian")
    if key not in cache:
        memo: dict = {}
        blocks = {(a.name, b.name): _state_block(cell, i, j, memo) for i, a in enumerate(cell.states) for j, b in enumerate(cell.states)}
        if all(not blk.terms for blk in blocks.values()):
            raise StateIndependenceError(f"cell {cell.name!r}: the update does not depend on the state")
        cache[key] = BlockJacobian(names, blocks)
    bj: BlockJacobian = cache[key]
    if of is not None or wrt is not None:
        return bj[(of or names[0], wrt or names[0])]
    if len(names) == 1:
        return bj[(names[0], names[0])]
    return bj


def parameter_jacobian(cell: Cell, param: str, of: str | None = None) -> ParamJacobian:
    r"""The immediate Jacobian :math:`\partial^+ s'/\partial\theta` of a state update w.r.t. a parameter.

    "Immediate" means the previous state is held fixed (no propagation through time).

    >>> import symgate as sg
    >>> print(sg.parameter_jacobian(sg.cells.leaky(bias=False), "W"))
    d+h'/dvec(W) = KroneckerProduct(h.T, alpha*diag(1 - phi**2))
    """
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    name_args(param=param, of=of)
    if param not in cell.param_names:
        raise CellSpecError(f"{param!r} is not a parameter of cell {cell.name!r}; parameters are {cell.param_names}")
    names = cell.state_names
    of = of or names[0]
    if of not in names:
        raise CellSpecError(f"{of!r} is not a state of cell {cell.name!r}; states are {names}")
    cache = cell._index
    key = ("derive", "param", param, of)
    if key in cache:
        return cache[key]
    i = names.index(of)
    st = cell.states[i]
    lp = local_partials(cell)
    memo: dict = {}
    p = next(pp for pp in cell.params if pp.name == param)
    pieces: list[tuple[StructuredJacobian, UnitSymbol | None]] = []
    if p.kind == "matrix":
        for nd in cell.nodes:
            if nd.kind == "linear" and nd.matrix == param:
                # paths to the Linear node's output (treated as a leaf)
                paths = _walk(lp, Owner(None, i), frozenset([nd.symbol]), memo,
                              f"the parameter Jacobian d+{of}'/d{param} (through {nd.name})")
                C = _to_structured(of + "'", nd.name, st.dim, nd.dim, paths, cell)
                if C.terms:
                    pieces.append((C, nd.source))
    else:
        lf = cell.leaf(param)
        paths = _walk(lp, Owner(None, i), frozenset([lf.symbol]), memo,  # type: ignore[union-attr]
                      f"the parameter Jacobian d+{of}'/d{param}")
        C = _to_structured(of + "'", param, st.dim, lf.dim, paths, cell)  # type: ignore[union-attr]
        if C.terms:
            pieces.append((C, None))
    pj = ParamJacobian(of + "'", param, p.kind, tuple(pieces), st.dim, p.shape)
    cache[key] = pj
    return pj


def parameter_jacobians(cell: Cell, of: str | None = None) -> dict[str, ParamJacobian]:
    """:func:`parameter_jacobian` for every parameter, by name."""
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    name_args(of=of)
    return {p: parameter_jacobian(cell, p, of) for p in cell.param_names}


def explicit_node_values(cell: Cell, sizes: Mapping[str, int]) -> dict[Any, sympy.Expr]:
    """Map each node entry ``v[i, 0]`` (explicit, concrete sizes) to its value in terms of leaves."""
    size_of = {k: v for k, v in sizes.items()}

    def vec(sym: UnitSymbol) -> Any:
        if sym.dim == 1:
            return sympy.Matrix([[sym]])
        return sympy.Matrix(MatrixSymbol(sym.name, size_of[sym.dim], 1))  # type: ignore[index]

    values: dict[UnitSymbol, sympy.Matrix] = {}
    for lf in cell.leaves:
        values[lf.symbol] = vec(lf.symbol)

    def entrywise(expr: sympy.Expr, dim: Dim) -> sympy.Matrix:
        d = 1 if dim == 1 else size_of[dim]  # type: ignore[index]
        rows = []
        for i in range(d):
            rep = {s: (values[s][i, 0] if values[s].shape[0] > 1 else values[s][0, 0]) for s in expr.free_symbols}
            rows.append(expr.xreplace(rep))
        return sympy.Matrix(rows)

    for nd in cell.nodes:
        if nd.kind == "linear":
            M = sympy.Matrix(MatrixSymbol(nd.matrix, *[1 if d == 1 else size_of[d] for d in  # type: ignore[index]
                                                      next(p.shape for p in cell.params if p.name == nd.matrix)]))
            values[nd.symbol] = M * values[nd.source]  # type: ignore[index]
        else:
            values[nd.symbol] = entrywise(nd.expr, nd.dim)
    rep: dict[Any, sympy.Expr] = {}
    for nd in cell.nodes:
        v = values[nd.symbol]
        if nd.dim == 1:
            rep[nd.symbol] = v[0, 0]
        else:
            for i in range(v.shape[0]):
                rep[MatrixSymbol(nd.name, size_of[nd.dim], 1)[i, 0]] = v[i, 0]  # type: ignore[index]
    return rep


def explicit_update(cell: Cell, sizes: Mapping[str, int]) -> list[sympy.Matrix]:
    """The updated states as explicit column matrices in terms of leaves (for checking)."""
    rep = explicit_node_values(cell, sizes)
    outs = []
    for st, o in zip(cell.states, cell.outputs):
        d = 1 if st.dim == 1 else sizes[st.dim]  # type: ignore[index]
        # rep maps node entries to expressions in leaves only, so one substitution suffices
        col = [unit_entry(o, i, {dim_symbol(k): v for k, v in sizes.items()}).xreplace(rep) for i in range(d)]
        outs.append(sympy.Matrix(col))
    return outs
