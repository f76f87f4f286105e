r"""SymPy matrix expressions for per-unit quantities.

:class:`UnitDiag` is :math:`\mathrm{diag}(e)` and :class:`UnitCol` is the column
vector :math:`[e]` of a per-unit expression ``e`` (e.g. ``1 - phi**2``).  Their
entries replace each vector symbol ``v`` of ``e`` by ``v[i]``, so any derived
matrix expression can be made explicit for a concrete size with
``.subs(n, 3).as_explicit()``, while the symbolic form stays independent of n.

:func:`sstr` and :func:`latex` print like :func:`sympy.sstr` and :func:`sympy.latex`
(the same text), but in time linear in the length of a matrix product: SymPy's
printers recompute the precedence of a ``MatMul`` (which negates the whole product)
once per factor, quadratic for the long chains of a deep cell graph.
"""

from __future__ import annotations

from typing import Any

import sympy
from sympy.matrices.expressions import MatrixExpr, MatrixSymbol
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import precedence, precedence_traditional
from sympy.printing.pretty.stringpict import prettyForm
from sympy.printing.str import StrPrinter

from .._cell import UnitSymbol, dim_symbol

__all__ = ["UnitDiag", "UnitCol", "unit_entry", "vector_symbol", "sstr", "latex"]


def vector_symbol(s: UnitSymbol, size: Any = None) -> Any:
    """The column-vector MatrixSymbol a per-unit symbol stands for (itself if scalar)."""
    if s.dim == 1:
        return s
    return MatrixSymbol(s.name, dim_symbol(s.dim) if size is None else size, 1)


def unit_entry(expr: sympy.Expr, i: Any, sizes: dict[Any, Any] | None = None) -> sympy.Expr:
    """Entry ``i`` of the per-unit expression ``expr``: each vector symbol ``v`` becomes ``v[i]``."""
    rep = {}
    for s in expr.free_symbols:
        if isinstance(s, UnitSymbol) and s.dim != 1:
            size = dim_symbol(s.dim)
            if sizes is not None:
                size = sizes.get(size, size)
            rep[s] = MatrixSymbol(s.name, size, 1)[i, 0]
    return expr.xreplace(rep)


class _UnitMatrix(MatrixExpr):
    def __new__(cls, expr: Any, dim: Any) -> "_UnitMatrix":
        return sympy.Basic.__new__(cls, sympy.sympify(expr), sympy.sympify(dim))

    @property
    def unit_expr(self) -> sympy.Expr:
        return self.args[0]

    @property
    def dim(self) -> sympy.Expr:
        return self.args[1]

    def _sizes(self) -> dict:
        # when the dimension was substituted (n -> 3), index vectors with the new size
        return {s: self.dim for s in [dim_symbol(u.dim) for u in self.unit_expr.free_symbols
                                       if isinstance(u, UnitSymbol) and u.dim != 1]}

    def _eval_subs(self, old: Any, new: Any) -> Any:
        if old == self.dim or (isinstance(old, sympy.Symbol) and old in self.dim.free_symbols):
            return type(self)(self.unit_expr.subs(old, new), self.dim.subs(old, new))
        return None


class UnitDiag(_UnitMatrix):
    r""":math:`\mathrm{diag}(e)`: the diagonal matrix of a per-unit expression ``e``."""

    @property
    def shape(self) -> tuple[Any, Any]:
        return (self.dim, self.dim)

    def _entry(self, i: Any, j: Any, **kwargs: Any) -> sympy.Expr:
        return sympy.KroneckerDelta(i, j) * unit_entry(self.unit_expr, i, self._sizes())

    def _eval_transpose(self) -> "UnitDiag":
        return self

    def _sympystr(self, p: Any) -> str:
        return "diag(%s)" % p._print(self.unit_expr)

    def _latex(self, p: Any, **kw: Any) -> str:
        return r"\operatorname{diag}\left(%s\right)" % p._print(self.unit_expr)

    def _pretty(self, p: Any) -> Any:
        inner = p._print(self.unit_expr)
        return prettyForm(*prettyForm("diag").right(prettyForm(*inner.parens())))


class UnitCol(_UnitMatrix):
    r""":math:`[e]`: the column vector of a per-unit expression ``e`` (a scalar broadcast to units)."""

    @property
    def shape(self) -> tuple[Any, Any]:
        return (self.dim, sympy.S.One)

    def _entry(self, i: Any, j: Any, **kwargs: Any) -> sympy.Expr:
        return unit_entry(self.unit_expr, i, self._sizes())

    def _sympystr(self, p: Any) -> str:
        return "[%s]" % p._print(self.unit_expr)

    def _latex(self, p: Any, **kw: Any) -> str:
        return r"\left[%s\right]" % p._print(self.unit_expr)

    def _pretty(self, p: Any) -> Any:
        inner = p._print(self.unit_expr)
        return prettyForm(*inner.parens("[", "]"))


# ----------------------------------------------------------------------------
# printers: SymPy's output, linear in the length of a matrix product
# ----------------------------------------------------------------------------


class _StrPrinter(StrPrinter):
    def _print_MatMul(self, expr: Any) -> str:
        # StrPrinter._print_MatMul, with the precedence of the product computed once
        from sympy.core.mul import _keep_coeff

        c, m = expr.as_coeff_mmul()
        sign = ""
        if c.is_number:
            re, im = c.as_real_imag()
            if im.is_zero and re.is_negative:
                expr = _keep_coeff(-c, m)
                sign = "-"
            elif re.is_zero and im.is_negative:
                expr = _keep_coeff(-c, m)
                sign = "-"
        prec = precedence(expr)
        return sign + "*".join([self.parenthesize(arg, prec) for arg in expr.args])


class _LatexPrinter(LatexPrinter):
    def _print_MatMul(self, expr: Any) -> str:
        # LatexPrinter._print_MatMul, with the precedence of the product computed once
        from sympy import MatMul, Mul

        prec = precedence_traditional(expr)

        def parens(x: Any) -> str:
            if isinstance(x, Mul) and not isinstance(x, MatMul):
                return self._print(x)
            return self.parenthesize(x, prec, False)

        args = list(expr.args)
        if expr.could_extract_minus_sign():
            if args[0] == -1:
                args = args[1:]
            else:
                args[0] = -args[0]
            return "- " + " ".join(map(parens, args))
        return " ".join(map(parens, args))


def sstr(expr: Any, **settings: Any) -> str:
    """``sympy.sstr(expr)``, linear in the length of matrix products."""
    return _StrPrinter(settings).doprint(expr)


def latex(expr: Any, **settings: Any) -> str:
    """``sympy.latex(expr)``, linear in the length of matrix products."""
    return _LatexPrinter(settings).doprint(expr)
