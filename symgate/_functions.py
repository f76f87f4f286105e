r"""Elementwise functions a cell body may use, and their derivative rules.

symgate differentiates only elementwise bodies.  The functions allowed in a body
are listed in :data:`DERIVATIVE_RULES`, a table (data, not if-chains) that maps a
SymPy function class to its derivative written in terms of the function's own
output ``y`` where possible, so that derived forms reuse forward values:

=============  ======================  ==================================
function       forward                 derivative rule
=============  ======================  ==================================
``tanh``       :math:`y=\tanh u`       :math:`1-y^2`
``sigmoid``    :math:`y=\sigma(u)`     :math:`y(1-y)`
``exp``        :math:`y=e^u`           :math:`y`
``log``        :math:`y=\log u`        :math:`1/u`
``softplus``   :math:`y=\log(1+e^u)`   :math:`\sigma(u)`
=============  ======================  ==================================

The public wrappers (:func:`tanh`, :func:`sigmoid`, ...) accept either a traced
cell quantity (inside a cell body) or an ordinary SymPy expression.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np
import sympy

__all__ = [
    "Sigmoid",
    "Softplus",
    "Sech2",
    "DERIVATIVE_RULES",
    "NUMPY_FUNCTIONS",
    "MPMATH_FUNCTIONS",
    "sigmoid",
    "softplus",
    "tanh",
    "exp",
    "log",
]


class Sigmoid(sympy.Function):
    r"""The logistic function :math:`\sigma(u) = 1/(1+e^{-u})`."""

    nargs = 1

    @classmethod
    def eval(cls, u: sympy.Expr) -> sympy.Expr | None:
        if u.is_zero:
            return sympy.S.Half
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, u: sympy.Expr, **kwargs: Any) -> sympy.Expr:
        return 1 / (1 + sympy.exp(-u))

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self.rewrite(sympy.exp)._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _latex(self, printer: Any, exp: Any = None) -> str:
        s = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return s if exp is None else r"%s^{%s}" % (s, exp)

    def _sympystr(self, printer: Any) -> str:
        return "sigmoid(%s)" % printer._print(self.args[0])


class Softplus(sympy.Function):
    r"""The softplus function :math:`\log(1+e^{u})`."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return Sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, u: sympy.Expr, **kwargs: Any) -> sympy.Expr:
        return sympy.log(1 + sympy.exp(u))

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self.rewrite(sympy.exp)._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _latex(self, printer: Any, exp: Any = None) -> str:
        s = r"\operatorname{softplus}\left(%s\right)" % printer._print(self.args[0])
        return s if exp is None else r"%s^{%s}" % (s, exp)

    def _sympystr(self, printer: Any) -> str:
        return "softplus(%s)" % printer._print(self.args[0])


class Sech2(sympy.Function):
    r""":math:`\operatorname{sech}^2 u = 1 - \tanh^2 u`, evaluated without cancellation.

    Not a cell-body function: the stable form of the tanh derivative ``1 - phi**2`` (see
    :mod:`symgate._derive._stable`), accurate where ``tanh`` rounds to +-1."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return -2 * self * sympy.tanh(self.args[0])

    def _eval_rewrite_as_exp(self, u: sympy.Expr, **kwargs: Any) -> sympy.Expr:
        return 4 / (sympy.exp(u) + sympy.exp(-u)) ** 2

    def _eval_evalf(self, prec: int) -> sympy.Expr:
        return self.rewrite(sympy.exp)._eval_evalf(prec)

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _latex(self, printer: Any, exp: Any = None) -> str:
        s = r"\operatorname{sech}^{2}\left(%s\right)" % printer._print(self.args[0])
        return s if exp is None else r"\left(%s\right)^{%s}" % (s, exp)

    def _sympystr(self, printer: Any) -> str:
        return "sech2(%s)" % printer._print(self.args[0])


#: Derivative rules as data: ``rule(y, u)`` is dF/du for ``y = F(u)``.
DERIVATIVE_RULES: dict[type, Callable[[sympy.Expr, sympy.Expr], sympy.Expr]] = {
    sympy.tanh: lambda y, u: 1 - y**2,
    Sigmoid: lambda y, u: y * (1 - y),
    sympy.exp: lambda y, u: y,
    sympy.log: lambda y, u: 1 / u,
    Softplus: lambda y, u: Sigmoid(u),
}

#: Default names of the node a function application creates, by function.
NODE_STEMS: dict[type, str] = {
    sympy.tanh: "phi",
    Sigmoid: "s",
    sympy.exp: "e",
    sympy.log: "l",
    Softplus: "sp",
}


def _np_sigmoid(u: np.ndarray) -> np.ndarray:
    """Overflow-free logistic; analytic, so it also serves complex-step differentiation."""
    u = np.asarray(u)
    pos = np.real(u) >= 0
    e = np.exp(np.where(pos, -u, u))  # real part <= 0: never overflows
    return np.where(pos, 1.0 / (1.0 + e), e / (1.0 + e))


def _np_softplus(u: np.ndarray) -> np.ndarray:
    """Overflow-free softplus log(1 + e^u); analytic in each half plane."""
    u = np.asarray(u)
    pos = np.real(u) > 0
    return np.where(pos, u, 0.0) + np.log1p(np.exp(np.where(pos, -u, u)))


def _np_sech2(u: np.ndarray) -> np.ndarray:
    """1 - tanh(u)**2 as 4e/(1+e)^2 with e = exp(-2|u|): no cancellation, no overflow; analytic
    for the complex step (e = exp(-2u sign(Re u)))."""
    u = np.asarray(u)
    e = np.exp(np.where(np.real(u) >= 0, -2 * u, 2 * u))
    return 4 * e / (1 + e) ** 2


def _mp_sigmoid(u: Any) -> Any:
    import mpmath

    return 1 / (1 + mpmath.exp(-u))


def _mp_softplus(u: Any) -> Any:
    import mpmath

    return mpmath.log1p(mpmath.exp(u))  # log(1 + e^u) would round 1 + e^u to 1 for u < -(digits)*ln(10)


def _mp_sech2(u: Any) -> Any:
    import mpmath

    return mpmath.sech(u) ** 2


#: Name -> implementation, for ``sympy.lambdify(..., modules=[NUMPY_FUNCTIONS, "numpy"])``.
NUMPY_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "Sigmoid": _np_sigmoid,
    "Softplus": _np_softplus,
    "sigmoid": _np_sigmoid,
    "softplus": _np_softplus,
    "Sech2": _np_sech2,
}
#: Name -> implementation, for ``sympy.lambdify(..., modules=[MPMATH_FUNCTIONS, "mpmath"])``.
MPMATH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "Sigmoid": _mp_sigmoid,
    "Softplus": _mp_softplus,
    "sigmoid": _mp_sigmoid,
    "softplus": _mp_softplus,
    "Sech2": _mp_sech2,
}


def _apply(func: type, u: Any) -> Any:
    from ._cell import Var

    if isinstance(u, Var):
        return u._apply(func)
    if isinstance(u, (numbers.Real, sympy.Expr)) and not isinstance(u, (bool, np.bool_)):
        return func(sympy.sympify(u))
    from ._errors import CellSpecError

    raise CellSpecError(f"symgate.{getattr(func, '__name__', func).lower()} takes a quantity of a cell body or a number, "
                        f"got {type(u).__module__}.{type(u).__qualname__}")


def sigmoid(u: Any) -> Any:
    r"""Logistic function :math:`\sigma(u)=1/(1+e^{-u})`, elementwise.  A gate."""
    return _apply(Sigmoid, u)


def softplus(u: Any) -> Any:
    r"""Softplus :math:`\log(1+e^u)`, elementwise."""
    return _apply(Softplus, u)


def tanh(u: Any) -> Any:
    r"""Hyperbolic tangent, elementwise."""
    return _apply(sympy.tanh, u)


def exp(u: Any) -> Any:
    r"""Exponential, elementwise."""
    return _apply(sympy.exp, u)


def log(u: Any) -> Any:
    r"""Natural logarithm, elementwise."""
    return _apply(sympy.log, u)
