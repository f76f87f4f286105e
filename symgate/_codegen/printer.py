"""Elementwise printing: SymPy per-unit expressions as Cython, through a C99 printer subclass.

Symbols print as whatever the caller binds them to (a local, or an array access for the
current row ``b`` and unit ``i``); the cell's functions print as the kernel's stable
primitives (``sg_sigmoid``, ``sg_softplus``, ``sg_tanh``, and ``sg_sech2`` for the stable
tanh derivative).  float32 and float64 differ
only by the printer's type-alias table and by casting every literal to ``real``, so no
arithmetic is silently promoted to double in float32 kernels.  Expressions are simplified
for printing by SymPy's optimisation passes (small integer powers as products) and split
by deterministic common-subexpression elimination.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.codegen.rewriting import create_expand_pow_optimization, optimize
from sympy.printing.c import C99CodePrinter

from .._errors import CellSpecError

__all__ = ["KernelPrinter", "cse", "CSE_PREFIX"]

#: integer powers up to this exponent print as products (``x**3`` -> ``x*x*x``)
_EXPAND_POW = [create_expand_pow_optimization(4)]

#: names of common-subexpression temporaries (``_c0``, ``_c1``, ...)
CSE_PREFIX = "_c"


def cse(exprs: list[sympy.Expr]) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list[sympy.Expr]]:
    """Common subexpressions of ``exprs`` (canonical order: the same cell gives the same code)."""
    return sympy.cse(exprs, symbols=sympy.numbered_symbols(CSE_PREFIX), order="canonical")


class KernelPrinter(C99CodePrinter):
    """SymPy -> C for kernel bodies: symbols print as locals or array accesses, gates as stable helpers.

    ``access`` maps each symbol of the expression being printed to its code; :meth:`code`
    prints an expression after the printing optimisations.
    """

    def __init__(self, dtype: np.dtype) -> None:
        # no C macros (M_LN2, ...): Cython does not know them; constants print as expressions
        super().__init__({"type_aliases": {real: float32 if dtype == np.float32 else float64}, "math_macros": {}})
        self.access: dict[sympy.Symbol, str] = {}
        self._single = dtype == np.float32

    def code(self, e: sympy.Expr) -> str:
        """The C code of ``e`` with the current ``access`` bindings."""
        return self.doprint(optimize(e, _EXPAND_POW))

    def _print_Float(self, f: Any) -> str:  # noqa: N802 - SymPy's dispatch name
        # Cython has no 1.0F literal: cast a double literal to the kernel's real type
        lit = super()._print_Float(f)
        return f"(<real>{lit.rstrip('F')})" if self._single else lit

    def _print_Rational(self, r: Any) -> str:  # noqa: N802
        lit = f"{int(r.p)}.0/{int(r.q)}.0"
        return f"(<real>({lit}))" if self._single else f"({lit})"

    def _print_Integer(self, k: Any) -> str:  # noqa: N802
        # Cython writes an integer literal next to a float as a double literal (1 -> 1.0), which
        # would promote float32 arithmetic to double: give integers the kernel's real type
        return f"(<real>{int(k)})" if self._single else super()._print_Integer(k)

    _print_One = _print_Zero = _print_NegativeOne = _print_Integer  # noqa: N815

    def _print_Symbol(self, s: sympy.Symbol) -> str:  # noqa: N802
        if s in self.access:
            return self.access[s]
        if s.name.startswith(CSE_PREFIX):  # a CSE temporary
            return s.name
        raise CellSpecError(f"internal: no code for symbol {s.name!r}")

    def _print_Sigmoid(self, e: Any) -> str:  # noqa: N802
        return f"sg_sigmoid({self._print(e.args[0])})"

    def _print_Softplus(self, e: Any) -> str:  # noqa: N802
        return f"sg_softplus({self._print(e.args[0])})"

    def _print_tanh(self, e: Any) -> str:  # noqa: N802
        return f"sg_tanh({self._print(e.args[0])})"

    def _print_Sech2(self, e: Any) -> str:  # noqa: N802
        return f"sg_sech2({self._print(e.args[0])})"
