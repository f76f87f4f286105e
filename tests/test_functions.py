"""The elementwise function table (``symgate._functions``) against independent references.

Every expected value here comes from mpmath at 50 significant digits, evaluated from an
identity that is *not* the formula the module uses (``sigma(u) = (1 + tanh(u/2))/2``,
``softplus(u) = log1p(e^u)``, ``sech^2 u = 1/cosh^2 u``), from ``mpmath.diff`` (derivatives),
or from plain numpy for a hand-written forward step.

Tolerance model: ``U = 2**-52``.  Each numpy implementation is a handful of correctly
rounded operations (``exp``, ``log1p``, ``+``, ``/``, ``**2``), none of which cancels
(that is what the stable forms are for), so the relative error is a few ``U``; we allow
``16 U`` (a 4x margin over the ~4 roundings of the longest form).  mpmath results are
compared at ``1e-40`` relative: 50 digits minus a generous 10 for the evaluation.
"""

from __future__ import annotations

from typing import Callable

import mpmath
import numpy as np
import pytest
import sympy

import symgate as sg
from symgate._functions import (
    DERIVATIVE_RULES,
    MPMATH_FUNCTIONS,
    NUMPY_FUNCTIONS,
    Sech2,
    Sigmoid,
    Softplus,
)

U = float(np.finfo(np.float64).eps)
RTOL = 16 * U  # a few correctly rounded, non-cancelling operations (module docstring)
MP_RTOL = mpmath.mpf("1e-40")  # 50-digit evaluation, 10 digits of margin

mpmath.mp.dps = 50

# Points on both sides of every branch (u < 0, u = 0, u > 0), inside (0, 1) where a wrong
# threshold would move the branch, and far out where a naive formula overflows or cancels.
# |u| <= 700 keeps sigma(-u), softplus(-u) and e^(-2*350) normal (no underflow to 0).
POINTS = [-700.0, -40.0, -5.5, -1.25, -0.3, -1e-8, 0.0, 1e-8, 0.3, 0.75, 1.25, 5.5, 40.0, 700.0]
SECH_POINTS = [u for u in POINTS if abs(u) <= 350.0] + [-350.0, 350.0]

x = sympy.Symbol("x")
y = sympy.Symbol("y")
r = sympy.Symbol("r", real=True)


# ----------------------------------------------------------------------------
# independent references (mpmath, 50 digits)
# ----------------------------------------------------------------------------


def ref_sigmoid(u: mpmath.mpf) -> mpmath.mpf:
    """sigma(u) = (1 + tanh(u/2)) / 2, an identity of the logistic function.  For u << 0 the sum
    cancels (tanh(-350) = -1 + 2e-304), so it is evaluated with 400 digits, then rounded to 50."""
    with mpmath.workdps(400):
        v = (1 + mpmath.tanh(mpmath.mpf(u) / 2)) / 2
    return +v


def ref_softplus(u: mpmath.mpf) -> mpmath.mpf:
    """softplus(u) = log1p(e^u)."""
    return mpmath.log1p(mpmath.exp(mpmath.mpf(u)))


def ref_sech2(u: mpmath.mpf) -> mpmath.mpf:
    """sech^2(u) = 1 / cosh(u)^2."""
    return 1 / mpmath.cosh(mpmath.mpf(u)) ** 2


REFS: dict[str, Callable[[mpmath.mpf], mpmath.mpf]] = {
    "sigmoid": ref_sigmoid,
    "softplus": ref_softplus,
    "sech2": ref_sech2,
}
#: table key(s) in NUMPY_FUNCTIONS / MPMATH_FUNCTIONS -> reference
KEYS = [("Sigmoid", "sigmoid"), ("sigmoid", "sigmoid"), ("Softplus", "softplus"), ("softplus", "softplus"),
        ("Sech2", "sech2")]


def points_for(ref: str) -> list[float]:
    return SECH_POINTS if ref == "sech2" else POINTS


def as_float(v: mpmath.mpf) -> float:
    return float(v)


# ----------------------------------------------------------------------------
# numpy implementations
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("key,ref", KEYS)
def test_numpy_values_match_mpmath(key: str, ref: str) -> None:
    """Each numpy implementation gives the correctly rounded value to a few ulps on both
    branches, at 0, and where the naive formula overflows (|u| = 700 or 350)."""
    u = np.array(points_for(ref))
    got = NUMPY_FUNCTIONS[key](u)
    want = np.array([as_float(REFS[ref](v)) for v in u])
    assert got.shape == u.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("key,ref", KEYS)
def test_numpy_accepts_array_likes(key: str, ref: str) -> None:
    """A list (or a Python float) is accepted like an array, as numpy's own functions do;
    lambdified expressions pass such values for constants."""
    pts = [-2.5, 0.0, 0.5, 3.0]
    got = NUMPY_FUNCTIONS[key](pts)
    np.testing.assert_allclose(got, [as_float(REFS[ref](v)) for v in pts], rtol=RTOL, atol=0)
    np.testing.assert_allclose(NUMPY_FUNCTIONS[key](-2.5), as_float(REFS[ref](-2.5)), rtol=RTOL, atol=0)


@pytest.mark.parametrize("key,ref", KEYS)
def test_numpy_is_analytic_for_the_complex_step(key: str, ref: str) -> None:
    """The documented use for complex-step differentiation: Im f(u + i h) / h equals f'(u)
    (mpmath.diff of the reference) and Re f(u + i h) equals f(u).  With h = 1e-30 the
    O(h^2) truncation is far below rounding, so the same 16 U relative tolerance applies."""
    h = 1e-30
    u = np.array([v for v in points_for(ref) if abs(v) <= 40.0])
    got = NUMPY_FUNCTIONS[key](u + 1j * h)
    d_want = np.array([as_float(mpmath.diff(REFS[ref], mpmath.mpf(v))) for v in u])
    want = np.array([as_float(REFS[ref](v)) for v in u])
    # The complex step differentiates the formula as evaluated: where f' is small next to f (sech^2
    # near 0, whose derivative carries a factor 1 - e^{-2|u|}; softplus for u << 0, through numpy's
    # complex log1p, which adds 1 + z directly), complex arithmetic leaves an absolute error of a
    # few U times max|f| ~ 1 instead of a relative one: atol = 4 U.
    np.testing.assert_allclose(got.imag / h, d_want, rtol=RTOL, atol=4 * U)
    np.testing.assert_allclose(got.real, want, rtol=RTOL, atol=4 * U)


def test_numpy_stable_forms_do_not_overflow() -> None:
    """Far outside the range of exp (|u| = 1e4) the stable forms still give the limits with
    no floating-point warning (warnings are errors in this suite): sigma -> 0 / 1,
    softplus -> 0 / u, sech^2 -> 0."""
    u = np.array([-1e4, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_array_equal(NUMPY_FUNCTIONS["sigmoid"](np.array([1e4])), [1.0])
        np.testing.assert_array_equal(NUMPY_FUNCTIONS["softplus"](np.array([1e4])), [1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = NUMPY_FUNCTIONS["sigmoid"](u)
        sp = NUMPY_FUNCTIONS["softplus"](u)
        se = NUMPY_FUNCTIONS["Sech2"](u)
    np.testing.assert_array_equal(s, [0.0, 1.0])
    np.testing.assert_array_equal(sp, [0.0, 1e4])
    np.testing.assert_array_equal(se, [0.0, 0.0])


# ----------------------------------------------------------------------------
# mpmath implementations
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("key,ref", KEYS)
def test_mpmath_values_match_identities(key: str, ref: str) -> None:
    """The mpmath implementations agree with the independent identities to 40 digits,
    including at |u| = 700 (no overflow in mpmath)."""
    for v in points_for(ref):
        u = mpmath.mpf(v)
        got = MPMATH_FUNCTIONS[key](u)
        want = REFS[ref](u)
        assert abs(got - want) <= MP_RTOL * abs(want), (key, v, got, want)


# ----------------------------------------------------------------------------
# the SymPy classes
# ----------------------------------------------------------------------------


def plain(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with the module's classes replaced by explicit exp/cosh formulas (SymPy only)."""
    return expr.replace(Sigmoid, lambda a: 1 / (1 + sympy.exp(-a))).replace(
        Softplus, lambda a: sympy.log(1 + sympy.exp(a))).replace(Sech2, lambda a: 1 / sympy.cosh(a) ** 2)


def mp_value(expr: sympy.Expr, at: float) -> mpmath.mpf:
    """``expr(x = at)`` at 50 digits, with no class of the module left in ``expr``."""
    assert not expr.has(Sigmoid, Softplus, Sech2)
    return mpmath.mpf(sympy.N(expr.subs(x, sympy.Float(at, 60)), 50))


DIFF_POINTS = [-3.0, -0.4, 0.0, 0.6, 2.5]


@pytest.mark.parametrize("cls,ref", [(Sigmoid, ref_sigmoid), (Softplus, ref_softplus), (Sech2, ref_sech2)])
def test_symbolic_derivative_matches_mpmath_diff(cls: type, ref: Callable) -> None:
    """``sympy.diff(F(x), x)`` (the class's ``fdiff``) is the derivative: at several points it
    equals mpmath.diff of the independent reference; also through the chain rule (F(2x))."""
    for expr, scale in ((cls(x), 1), (cls(2 * x), 2)):
        d = plain(sympy.diff(expr, x))
        for v in DIFF_POINTS:
            want = scale * mpmath.diff(ref, scale * mpmath.mpf(v))
            got = mp_value(d, v)
            assert abs(got - want) <= MP_RTOL * max(1, abs(want)), (cls, v, got, want)


@pytest.mark.parametrize("cls,ref", [(Sigmoid, ref_sigmoid), (Softplus, ref_softplus), (Sech2, ref_sech2)])
def test_rewrite_as_exp_and_evalf(cls: type, ref: Callable) -> None:
    """``rewrite(sympy.exp)`` gives an expression free of the class with the same value, and
    ``evalf`` / ``float`` evaluate a numeric argument (to 40 digits / to rounding)."""
    e = cls(x).rewrite(sympy.exp)
    assert not e.has(cls)
    for v in (-2.0, 0.0, 0.5, 3.0):
        want = ref(v)
        assert abs(mp_value(plain(e), v) - want) <= MP_RTOL * abs(want)
        third = sympy.Rational(1, 3) + sympy.Rational(str(v))
        got40 = mpmath.mpf(sympy.N(cls(third), 45))
        want40 = ref(mpmath.mpf(1) / 3 + v)
        assert abs(got40 - want40) <= MP_RTOL * abs(want40)
        assert float(cls(sympy.Float(v))) == pytest.approx(float(want), rel=RTOL, abs=0)


def test_sigmoid_of_zero_is_one_half() -> None:
    """sigma(0) = 1/2 exactly (automatic evaluation); other arguments stay unevaluated."""
    assert Sigmoid(0) is sympy.S.Half
    assert Sigmoid(sympy.Integer(0)) == sympy.Rational(1, 2)
    for arg in (x, sympy.Integer(1), x + 1):
        e = Sigmoid(arg)
        assert isinstance(e, Sigmoid) and e.args == (arg,)


@pytest.mark.parametrize("cls", [Sigmoid, Softplus, Sech2])
def test_exactly_one_argument(cls: type) -> None:
    """Each class takes exactly one argument (``nargs = 1``): zero or two raise TypeError."""
    assert cls(x).args == (x,)
    assert cls.nargs == sympy.FiniteSet(1)
    with pytest.raises(TypeError):
        cls(x, y)
    with pytest.raises(TypeError):
        cls()


@pytest.mark.parametrize("cls", [Sigmoid, Softplus, Sech2])
def test_realness_follows_the_argument(cls: type) -> None:
    """F(u) is real exactly when u is known real; unknown for an unrestricted symbol."""
    assert cls(r).is_real is True
    assert cls(2 * r + 1).is_real is True
    assert cls(x).is_real is None
    assert cls(sympy.I).is_real is False


@pytest.mark.parametrize("cls,name,tex", [
    (Sigmoid, "sigmoid", r"\sigma\left(%s\right)"),
    (Softplus, "softplus", r"\operatorname{softplus}\left(%s\right)"),
    (Sech2, "sech2", r"\operatorname{sech}^{2}\left(%s\right)"),
])
def test_printing(cls: type, name: str, tex: str) -> None:
    """``str`` prints the public lower-case name of the argument; LaTeX shows the usual symbol
    of the argument, and a power as a superscript of the whole application."""
    assert str(cls(x + y)) == f"{name}(x + y)"
    assert sympy.latex(cls(x + y)) == tex % "x + y"
    power = sympy.latex(cls(x) ** 2)
    if cls is Sech2:  # sech^2 already carries an exponent: the power brackets the application
        assert power == r"\left(%s\right)^{2}" % (tex % "x")
    else:
        assert power == r"%s^{2}" % (tex % "x")


def test_str_round_trips_through_the_public_functions() -> None:
    """``str`` of an expression is valid Python with the public wrappers (sg.sigmoid, ...)."""
    e = Sigmoid(x) * Softplus(2 * x) + sympy.tanh(x)
    ns = {"sigmoid": sg.sigmoid, "softplus": sg.softplus, "tanh": sg.tanh, "x": x}
    assert eval(str(e), ns) == e


# ----------------------------------------------------------------------------
# the derivative table
# ----------------------------------------------------------------------------

MP_FORWARD: dict[type, Callable[[mpmath.mpf], mpmath.mpf]] = {
    sympy.tanh: mpmath.tanh,
    Sigmoid: ref_sigmoid,
    sympy.exp: mpmath.exp,
    sympy.log: mpmath.log,
    Softplus: ref_softplus,
}


def test_derivative_table_covers_the_body_functions() -> None:
    """The table has a rule for every function a cell body may use, and nothing else."""
    assert set(DERIVATIVE_RULES) == {sympy.tanh, Sigmoid, sympy.exp, sympy.log, Softplus}


@pytest.mark.parametrize("func", [sympy.tanh, Sigmoid, sympy.exp, sympy.log, Softplus])
def test_derivative_rules_are_derivatives(func: type) -> None:
    """``rule(y, u)`` with ``y = F(u)`` is dF/du: evaluated at y = F(u0) (an mpmath value),
    it equals mpmath.diff of F at u0, at points with |F|, |F'| in general position."""
    for u0 in (0.37, 1.3, 2.9):  # positive: log is defined; tanh/sigmoid away from symmetric points
        u = mpmath.mpf(u0)
        yv = MP_FORWARD[func](u)
        got = DERIVATIVE_RULES[func](sympy.Float(yv, 50), sympy.Float(u, 50))
        got = mpmath.mpf(sympy.N(plain(sympy.sympify(got)), 50))
        want = mpmath.diff(MP_FORWARD[func], u)
        assert abs(got - want) <= MP_RTOL * abs(want), (func, u0, got, want)


@pytest.mark.parametrize("func", [sympy.tanh, Sigmoid, sympy.exp, sympy.log, Softplus])
def test_derivative_rules_agree_with_sympy_diff(func: type) -> None:
    """The table's rule and ``sympy.diff`` (the classes' fdiff, SymPy's own for tanh/exp/log)
    are the same function of u."""
    rule = DERIVATIVE_RULES[func](func(x), x)
    d = sympy.diff(func(x), x)
    for v in (0.2, 1.7):
        a, b = mp_value(plain(rule), v), mp_value(plain(d), v)
        assert abs(a - b) <= MP_RTOL * abs(b)


# ----------------------------------------------------------------------------
# the public wrappers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper,func", [(sg.sigmoid, Sigmoid), (sg.softplus, Softplus), (sg.tanh, sympy.tanh),
                                          (sg.exp, sympy.exp), (sg.log, sympy.log)])
def test_wrappers_on_sympy_expressions(wrapper: Callable, func: type) -> None:
    """On an ordinary SymPy expression (or a number, sympified) a wrapper is the function itself."""
    assert wrapper(x + 1) == func(x + 1)
    assert wrapper(2) == func(sympy.Integer(2))


@sg.cell
def all_functions(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
    """A cell whose body uses every public wrapper on traced quantities."""
    a = W @ h
    b = U @ x
    g = sg.sigmoid(a)
    sp = sg.softplus(b)
    return g * sg.tanh(a + b) + 0.25 * sg.log(sp) * sg.exp(-sp)


def test_wrappers_inside_a_cell_body() -> None:
    """Inside a cell body the wrappers record nodes: one forward step of the numpy reference
    kernel equals the same update written in plain numpy (rtol: ~20 roundings, 1e-13)."""
    rng = np.random.default_rng(3)
    n, m, B = 3, 2, 2
    p = {"W": 0.5 * rng.standard_normal((n, n)), "U": rng.standard_normal((n, m))}
    xs = rng.standard_normal((1, B, m))
    h0 = rng.standard_normal((B, n))
    traj = sg.reference_kernel(all_functions, "float64").forward(p, xs, {"h": h0})
    a = h0 @ p["W"].T
    b = xs[0] @ p["U"].T
    sp = np.log1p(np.exp(b))
    want = np.tanh(a + b) / (1 + np.exp(-a)) + 0.25 * np.log(sp) * np.exp(-sp)
    np.testing.assert_allclose(traj.h[0], want, rtol=1e-13, atol=1e-15)
