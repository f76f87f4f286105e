"""Origins of Jacobian terms are decided by what a path passes through.

``leak`` is the parameter-free dependence of the update on the state; a path through a
recurrent parameter of any shape (matrix, vector, scalar, or a reparametrised one such
as ``exp(theta)``) is ``candidate``, ``gate`` or ``reset``.  The expected terms below are
typed by hand from the update equations (paper-notes section 2 for the built-ins).
"""

from __future__ import annotations

import pytest
import sympy

import symgate as sg
from symgate import Constant, Input, Matrix, Scalar, State, Vector, exp, sigmoid, softplus, tanh

t_, ell_ = sg.t, sg.ell
j_ = sympy.Symbol("j", integer=True)


def window(expr: sympy.Expr) -> sympy.Expr:
    return sympy.Product(expr, (j_, t_ - ell_ + 1, t_))


def by_origin(J) -> dict[str, list]:
    out: dict[str, list] = {}
    for term in J.terms:
        out.setdefault(term.origin, []).append(term)
    return out


def diag_sum(terms) -> sympy.Expr:
    return sympy.Add(*[term.diagonal_expr() for term in terms])


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


# ----------------------------------------------------------------------------
# the two examples of the rule, and their scalar-parameter variants
# ----------------------------------------------------------------------------


@sg.cell
def vector_recurrence(h: State("n"), x: Input("m"), w: Vector("n"), U: Matrix("n", "m"), b: Vector("n"),
                      alpha: Constant(0.7)):
    phi = tanh(w * h + U @ x + b)
    return (1 - alpha) * h + alpha * phi


@sg.cell
def scalar_recurrence(h: State("n"), x: Input("m"), s: Scalar(), U: Matrix("n", "m"), alpha: Constant(0.7)):
    phi = tanh(s * h + U @ x)
    return (1 - alpha) * h + alpha * phi


@sg.cell
def vector_weight_gate(h: State("n"), x: Input("m"), v: Vector("n"), W: Matrix("n", "n"), U: Matrix("n", "m"),
                       Ug: Matrix("n", "m")):
    g = sigmoid(v * h + Ug @ x)
    phi = tanh(W @ h + U @ x)
    return (1 - g) * h + g * phi


@sg.cell
def scalar_weight_gate(h: State("n"), x: Input("m"), s: Scalar(), W: Matrix("n", "n"), U: Matrix("n", "m"),
                       Ug: Matrix("n", "m")):
    g = sigmoid(s * h + Ug @ x)
    phi = tanh(W @ h + U @ x)
    return (1 - g) * h + g * phi


def test_vector_recurrent_weight_is_candidate() -> None:
    c = vector_recurrence
    alpha, w, phi = (c.symbols[k] for k in ("alpha", "w", "phi"))
    J = sg.jacobian(c)
    assert J.origins == ("leak", "candidate")
    parts = by_origin(J)
    assert same(diag_sum(parts["leak"]), 1 - alpha)
    assert same(diag_sum(parts["candidate"]), alpha * w * (1 - phi**2))


def test_scalar_recurrent_weight_is_candidate() -> None:
    c = scalar_recurrence
    alpha, s, phi = (c.symbols[k] for k in ("alpha", "s", "phi"))
    parts = by_origin(sg.jacobian(c))
    assert set(parts) == {"leak", "candidate"}
    assert same(diag_sum(parts["leak"]), 1 - alpha)
    assert same(diag_sum(parts["candidate"]), alpha * s * (1 - phi**2))


@pytest.mark.parametrize("cell, weight", [(vector_weight_gate, "v"), (scalar_weight_gate, "s")])
def test_gate_weight_of_any_shape_is_gate(cell, weight) -> None:
    g, phi, h, v = (cell.symbols[k] for k in ("g", "phi", "h", weight))
    J = sg.jacobian(cell)
    assert J.origins == ("leak", "candidate", "gate")
    parts = by_origin(J)
    assert same(diag_sum(parts["leak"]), 1 - g)
    (cand,) = parts["candidate"]
    assert cand.matrices == ("W",)
    assert same(diag_sum(parts["gate"]), (phi - h) * g * (1 - g) * v)


def test_splits_follow_the_origins() -> None:
    c = vector_weight_gate
    g, phi, h, v = (c.symbols[k] for k in ("g", "phi", "h", "v"))
    coupling = sg.split(c, "coupling")
    assert coupling.A_is_diagonal and same(coupling.A.diagonal_part(), 1 - g)
    assert {t.origin for t in coupling.B.terms} == {"candidate", "gate"}
    appendix = sg.split(c, "appendix")
    assert [t.origin for t in appendix.A.terms] == ["leak", "candidate"]
    assert [t.origin for t in appendix.B.terms] == ["gate"]
    assert same(appendix.B.diagonal_part(), (phi - h) * g * (1 - g) * v)
    # the vector-recurrence cell has no gate: the appendix B is empty, the coupling A the leak alone
    c2 = vector_recurrence
    alpha, w, phi2 = (c2.symbols[k] for k in ("alpha", "w", "phi"))
    assert sg.split(c2, "appendix").B.terms == ()
    assert same(sg.split(c2, "appendix").A.diagonal_part(), 1 - alpha + alpha * w * (1 - phi2**2))
    assert same(sg.split(c2, "coupling").A.diagonal_part(), 1 - alpha)


def test_effective_lr_uses_the_leak_alone() -> None:
    alpha = vector_recurrence.symbols["alpha"]
    for param in ("U", "b", "w"):
        e = sg.effective_lr(vector_recurrence, param)
        assert same(e.mu, alpha * (1 - alpha) ** ell_), param
        assert same(e.retention, (1 - alpha) ** ell_)
    e = sg.effective_lr(scalar_recurrence, "U")
    assert same(e.mu, alpha * (1 - alpha) ** ell_)
    g = sympy.IndexedBase("g")
    for cell in (vector_weight_gate, scalar_weight_gate):
        e = sg.effective_lr(cell, "W")
        assert same(e.mu, g[t_ - ell_] * window(1 - g[j_]))
        assert e.retention == window(1 - g[j_])
    # the follow-up's diagonal correction now carries the gate weight (it was part of the leak)
    v, phi, h = (vector_weight_gate.symbols[k] for k in ("v", "phi", "h"))
    fo = sg.effective_lr(vector_weight_gate, "W").first_order
    assert fo is not None and fo.has(v)


def test_coupling_expansion_of_the_vector_recurrence() -> None:
    alpha, w = vector_recurrence.symbols["alpha"], vector_recurrence.symbols["w"]
    ex = sg.expansion(vector_recurrence, "coupling")
    assert same(ex.retention, (1 - alpha) ** ell_)
    phi = sympy.IndexedBase("phi")
    r_over_lam = alpha * w * (1 - phi[j_] ** 2) / (1 - alpha)
    expected = (1 - alpha) ** ell_ * sympy.Sum(r_over_lam, (j_, t_ - ell_ + 1, t_))
    assert same(ex.diagonal_first_order, expected)


# ----------------------------------------------------------------------------
# the update's own coefficients stay leaks
# ----------------------------------------------------------------------------


@sg.cell
def learned_leak(h: State("n"), x: Input("m"), s: Scalar(), W: Matrix("n", "n"), U: Matrix("n", "m")):
    return s * h + tanh(W @ h + U @ x)


@sg.cell
def param_gate(h: State("n"), x: Input("m"), theta: Scalar(), W: Matrix("n", "n"), U: Matrix("n", "m")):
    a = sigmoid(theta)
    return (1 - a) * h + a * tanh(W @ h + U @ x)


@sg.cell
def vector_leak(h: State("n"), x: Input("m"), v: Vector("n"), W: Matrix("n", "n"), U: Matrix("n", "m")):
    return v * h + tanh(W @ h + U @ x)


@sg.cell
def vector_leak_named(h: State("n"), x: Input("m"), v: Vector("n"), W: Matrix("n", "n"), U: Matrix("n", "m")):
    keep = (v * h).named("keep")
    return keep + tanh(W @ h + U @ x)


def test_learned_leak_coefficients_are_leaks() -> None:
    s = learned_leak.symbols["s"]
    parts = by_origin(sg.jacobian(learned_leak))
    assert set(parts) == {"leak", "candidate"}
    assert diag_sum(parts["leak"]) == s
    assert same(sg.effective_lr(learned_leak, "W").mu, s**ell_)
    a = param_gate.symbols["a"]
    parts = by_origin(sg.jacobian(param_gate))
    assert set(parts) == {"leak", "candidate"} and diag_sum(parts["leak"]) == 1 - a


def test_a_named_subexpression_of_the_update_keeps_its_origin() -> None:
    v = vector_leak.symbols["v"]
    for cell in (vector_leak, vector_leak_named):
        parts = by_origin(sg.jacobian(cell))
        assert set(parts) == {"leak", "candidate"}, cell.name
        assert diag_sum(parts["leak"]) == v
    assert vector_leak_named.node("keep").kind == "arith"


# ----------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------


def test_parameter_free_path_through_a_node_is_a_leak() -> None:
    @sg.cell
    def half(h: State("n"), x: Input("m"), U: Matrix("n", "m")):
        phi = tanh(h + U @ x)
        return 0.5 * h + 0.5 * phi

    phi = half.symbols["phi"]
    J = sg.jacobian(half)
    assert J.origins == ("leak",)
    assert same(J.diagonal_part(), sympy.Rational(1, 2) + (1 - phi**2) / 2)
    assert sg.split(half, "coupling").B.terms == ()


def test_gate_without_a_recurrent_weight_contributes_a_leak() -> None:
    @sg.cell
    def free_gate(h: State("n"), x: Input("m"), W: Matrix("n", "n"), Ug: Matrix("n", "m")):
        g = sigmoid(h + Ug @ x)
        phi = tanh(W @ h)
        return (1 - g) * h + g * phi

    g, phi, h = (free_gate.symbols[k] for k in ("g", "phi", "h"))
    parts = by_origin(sg.jacobian(free_gate))
    assert set(parts) == {"leak", "candidate"}
    assert same(diag_sum(parts["leak"]), 1 - g + (phi - h) * g * (1 - g))


def test_bias_inside_a_function_is_not_an_entry() -> None:
    @sg.cell
    def biased(h: State("n"), x: Input("m"), b: Vector("n"), c: Vector("n"), U: Matrix("n", "m")):
        return 0.5 * h + 0.25 * tanh(h + U @ x + b) + 0.25 * softplus(h + c)

    assert sg.jacobian(biased).origins == ("leak",)


def test_named_preactivation_and_compound_linear_source() -> None:
    @sg.cell
    def named_pre(h: State("n"), x: Input("m"), w: Vector("n"), U: Matrix("n", "m")):
        pre = (w * h + U @ x).named("pre")
        return 0.5 * h + 0.5 * tanh(pre)

    w, phi = named_pre.symbols["w"], named_pre.symbols["phi"]
    parts = by_origin(sg.jacobian(named_pre))
    assert set(parts) == {"leak", "candidate"}
    assert same(diag_sum(parts["candidate"]), w * (1 - phi**2) / 2)

    @sg.cell
    def weighted_source(h: State("n"), x: Input("m"), w: Vector("n"), W: Matrix("n", "n"), U: Matrix("n", "m")):
        return 0.5 * h + 0.5 * tanh(W @ (w * h) + U @ x)

    parts = by_origin(sg.jacobian(weighted_source))
    assert set(parts) == {"leak", "candidate"}
    (cand,) = parts["candidate"]
    assert cand.matrices == ("W",)


def test_reparametrised_parameter_is_an_entry() -> None:
    @sg.cell
    def positive_weight(h: State("n"), x: Input("m"), theta: Vector("n"), U: Matrix("n", "m")):
        k = exp(theta)
        return 0.5 * h + 0.5 * tanh(k * h + U @ x)

    k, phi = positive_weight.symbols["k"], positive_weight.symbols["phi"]
    parts = by_origin(sg.jacobian(positive_weight))
    assert set(parts) == {"leak", "candidate"}
    assert same(diag_sum(parts["candidate"]), k * (1 - phi**2) / 2)


def test_constant_weight_is_not_an_entry() -> None:
    @sg.cell
    def const_weight(h: State("n"), x: Input("m"), U: Matrix("n", "m"), k: Constant(0.3)):
        return 0.5 * h + 0.5 * tanh(k * h + U @ x)

    assert sg.jacobian(const_weight).origins == ("leak",)


def test_marked_gate_with_a_vector_weight_is_gate() -> None:
    @sg.cell
    def keep_gate(h: State("n"), x: Input("m"), v: Vector("n"), W: Matrix("n", "n"), Ug: Matrix("n", "m")):
        keep = (1 / (1 + exp(v * h + Ug @ x))).as_gate()
        return keep * h + (1 - keep) * tanh(W @ h)

    assert keep_gate.node("keep").is_gate and keep_gate.node("keep").kind == "arith"
    keep = keep_gate.symbols["keep"]
    parts = by_origin(sg.jacobian(keep_gate))
    assert set(parts) == {"leak", "candidate", "gate"}
    assert diag_sum(parts["leak"]) == keep
    (gate,) = parts["gate"]
    assert gate.matrices == () and gate.path[0] == "keep"  # through the marked gate, weighted by v

    # a gate written as arithmetic that reads the state itself: its own weighted hop is a
    # gate entry (a marked node is a quantity of its own, not a sub-expression of the update)
    @sg.cell
    def rational_gate(h: State("n"), x: Input("m"), v: Vector("n"), W: Matrix("n", "n")):
        keep = (1 / (1 + v * h * h)).as_gate()
        return keep * h + (1 - keep) * tanh(W @ h)

    keep, v, h, phi = (rational_gate.symbols[k] for k in ("keep", "v", "h", "phi"))
    parts = by_origin(sg.jacobian(rational_gate))
    assert set(parts) == {"leak", "candidate", "gate"}
    assert diag_sum(parts["leak"]) == keep
    assert same(diag_sum(parts["gate"]), (h - phi) * (-2 * v * h) / (1 + v * h * h) ** 2)


def test_vector_weight_after_a_reset_gate_is_reset() -> None:
    @sg.cell
    def vector_reset(h: State("n"), x: Input("m"), z0: Vector("n"), Wr: Matrix("n", "n"), w: Vector("n"),
                     U: Matrix("n", "m"), Uz: Matrix("n", "m")):
        z = sigmoid(z0 * h + Uz @ x)
        r = sigmoid(Wr @ h)
        cand = tanh(w * (r * h) + U @ x)
        return (1 - z) * h + z * cand

    z, r, cand, h, w = (vector_reset.symbols[k] for k in ("z", "r", "cand", "h", "w"))
    parts = by_origin(sg.jacobian(vector_reset))
    assert set(parts) == {"leak", "candidate", "gate", "reset"}
    assert diag_sum(parts["leak"]) == 1 - z
    assert same(diag_sum(parts["candidate"]), z * (1 - cand**2) * w * r)
    (reset,) = parts["reset"]
    assert reset.matrices == ("Wr",)


def test_two_state_cell_with_a_peephole() -> None:
    @sg.cell
    def peephole(h: State("n"), c: State("n"), x: Input("m"), pf: Vector("n"), Uf: Matrix("n", "m"),
                 Wi: Matrix("n", "n"), Wo: Matrix("n", "n"), W: Matrix("n", "n"), U: Matrix("n", "m")):
        f = sigmoid(pf * c + Uf @ x)
        i = sigmoid(Wi @ h)
        o = sigmoid(Wo @ h)
        c_new = f * c + i * tanh(W @ h + U @ x)
        return o * tanh(c_new), c_new

    f, c, pf, o = (peephole.symbols[k] for k in ("f", "c", "pf", "o"))
    J = sg.jacobian(peephole)
    cc = by_origin(J[("c", "c")])
    assert set(cc) == {"leak", "gate"}
    assert diag_sum(cc["leak"]) == f
    assert same(diag_sum(cc["gate"]), c * f * (1 - f) * pf)
    hc = by_origin(J[("h", "c")])
    assert set(hc) == {"leak", "gate"}
    assert sg.effective_lr(peephole, "U").state == "c"
    fg = sympy.IndexedBase("f")
    assert sg.effective_lr(peephole, "U").retention == window(fg[j_])


# ----------------------------------------------------------------------------
# built-in cells: exactly their previous origins, term by term
# ----------------------------------------------------------------------------

BUILTIN_TERMS = {
    "plain": {("h", "h"): [("candidate", ("W",))]},
    "leaky": {("h", "h"): [("leak", ()), ("candidate", ("W",))]},
    "scalar_gate": {("h", "h"): [("leak", ()), ("candidate", ("W",)), ("gate", ("wg",))]},
    "vector_gate": {("h", "h"): [("leak", ()), ("candidate", ("W",)), ("gate", ("Wg",))]},
    "gru": {("h", "h"): [("leak", ()), ("candidate", ("Wn",)), ("gate", ("Wz",)), ("reset", ("Wn", "Wr"))]},
    "mgu": {("h", "h"): [("leak", ()), ("candidate", ("Wn",)), ("gate", ("Wf",)), ("reset", ("Wn", "Wf"))]},
    "lstm": {
        ("h", "h"): [("candidate", ("Wc",)), ("gate", ("Wo",)), ("gate", ("Wf",)), ("gate", ("Wi",))],
        ("h", "c"): [("leak", ())],
        ("c", "h"): [("candidate", ("Wc",)), ("gate", ("Wf",)), ("gate", ("Wi",))],
        ("c", "c"): [("leak", ())],
    },
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(BUILTIN_TERMS))
def test_builtin_origins_unchanged(name: str, bias: bool) -> None:
    cell = sg.cells.builtin(name, bias=bias)
    for (a, b), expected in BUILTIN_TERMS[name].items():
        J = sg.jacobian(cell, a, b)
        assert [(t.origin, t.matrices) for t in J.terms] == expected, (a, b)
