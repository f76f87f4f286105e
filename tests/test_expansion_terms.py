"""The symbolic expansion terms, compared with values computed independently.

* ``Expansion.first`` (and ``zeroth``) evaluated at concrete per-step values against the
  first-order term computed by numpy from per-step ``A_j``, ``B_j`` typed from the paper
  (paper-notes section 4): ``L = sum_i (prod_{j>i} A_j) B_i (prod_{j<i} A_j)``, chain-rule
  order;
* the time indices of :func:`at_step` (states at ``step - 1``; inputs and nodes at
  ``step``; parameters, constants and time-constant nodes unindexed);
* the origins of the named splits, and the appendix split's ``A``/``B`` typed by hand;
* closed forms for factors constant in time (``a = sigmoid(theta)``);
* a Jacobian chain that starts with a parameter matrix, against finite differences.

The per-step values are random and need not come from a trajectory: the expansion is an
algebraic identity in them, so any values test it (and each step's values differ, so a
wrong time index shows).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy
from sympy import Indexed, IndexedBase, Matrix, MatrixSymbol
from sympy.matrices.expressions import Identity, MatAdd, MatMul, OneMatrix, ZeroMatrix

import symgate as sg
from symgate import Input, Matrix as MatrixSpec, Scalar, State, sigmoid, tanh
from symgate._derive import UnitCol, UnitDiag
from symgate._derive._expansion import SPLITS, FirstOrderSum, OrderedProduct, at_step

t_, ell_ = sg.t, sg.ell
i_ = sympy.Symbol("i", integer=True)
j_ = sympy.Symbol("j", integer=True)
T = 5  # per-step values for steps 0..T


# ----------------------------------------------------------------------------
# an evaluator of the formal expansion objects at concrete steps
# ----------------------------------------------------------------------------


class Values:
    """Random per-step values of a cell's time-indexed quantities, and its parameters."""

    def __init__(self, cell: sg.Cell, n: int, seed: int, params: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(seed)
        self.cell, self.n, self.params = cell, n, params
        self.steps: dict[str, np.ndarray] = {}
        for name, sym in cell.symbols.items():
            d = 1 if sym.dim == 1 else n
            lf = cell.leaf(name)
            if lf is not None and lf.kind in ("vector", "scalar", "constant"):
                continue
            if name in {nd.name for nd in cell.gates}:
                self.steps[name] = rng.uniform(0.05, 0.95, (T + 1, d))
            else:
                self.steps[name] = rng.uniform(-0.9, 0.9, (T + 1, d))

    def at(self, name: str, step: int) -> np.ndarray:
        return self.steps[name][step]

    def units(self, expr: sympy.Expr, env: dict) -> np.ndarray:
        """Per-unit values (n,) of a timed per-unit expression at concrete steps."""
        e = sympy.sympify(expr).xreplace(env).doit()
        out = np.empty(self.n)
        for q in range(self.n):
            rep = {}
            for ix in e.atoms(Indexed):
                v = self.steps[str(ix.base.label)][int(ix.indices[0])]
                rep[ix] = sympy.Float(v[0] if v.shape[0] == 1 else v[q])
            eq = sympy.sympify(e).xreplace(rep)
            rep = {}
            for s in eq.free_symbols:
                if s.name in self.cell.constants:
                    rep[s] = self.cell.constants[s.name]
                elif s.name.endswith("_diag"):
                    rep[s] = float(np.asarray(self.params[s.name[:-5]])[q, q])
                else:
                    v = np.atleast_1d(self.params[s.name])
                    rep[s] = float(v[0] if v.shape[0] == 1 else v[q])
            out[q] = float(eq.xreplace(rep))
        return out

    def matrix(self, M, env: dict) -> np.ndarray:
        n = self.n
        if isinstance(M, FirstOrderSum):
            term, idx, lo, hi = M.args
            lo, hi = int(lo.xreplace(env)), int(hi.xreplace(env))
            return sum((self.matrix(term, {**env, idx: k}) for k in range(lo, hi + 1)), np.zeros((n, n)))
        if isinstance(M, OrderedProduct):
            term, idx, lo, hi = M.args
            lo, hi = int(lo.xreplace(env)), int(hi.xreplace(env))
            out = np.eye(n)
            for k in range(hi, lo - 1, -1):  # M_hi ... M_lo, leftmost first
                out = out @ self.matrix(term, {**env, idx: k})
            return out
        if isinstance(M, MatAdd):
            return sum((self.matrix(a, env) for a in M.args), np.zeros((n, n)))
        if isinstance(M, MatMul):
            scale, out = 1.0, None
            for a in M.args:
                v = self.matrix(a, env)
                if isinstance(v, float):
                    scale *= v
                else:
                    out = v if out is None else out @ v
            return scale * out
        if isinstance(M, UnitDiag):
            return np.diag(self.units(M.unit_expr, env))
        if isinstance(M, UnitCol):
            return self.units(M.unit_expr, env)[:, None]
        if isinstance(M, MatrixSymbol):
            return np.asarray(self.params[M.name], dtype=float)
        if isinstance(M, Identity):
            return np.eye(n)
        if isinstance(M, OneMatrix):
            return np.ones(tuple(1 if d == 1 else n for d in M.shape))
        if isinstance(M, ZeroMatrix):
            return np.zeros((n, n))
        return float(self.units(M, env)[0])  # a scalar coefficient


def first_order(A: dict[int, np.ndarray], B: dict[int, np.ndarray], t: int, ell: int, n: int) -> np.ndarray:
    """L = sum_{i=k+1}^{t} (A_t ... A_{i+1}) B_i (A_{i-1} ... A_{k+1}), k = t - ell (paper-notes section 4)."""
    k = t - ell
    L = np.zeros((n, n))
    for i in range(k + 1, t + 1):
        left = np.eye(n)
        for j in range(t, i, -1):
            left = left @ A[j]
        right = np.eye(n)
        for j in range(i - 1, k, -1):
            right = right @ A[j]
        L += left @ B[i] @ right
    return L


def zeroth_order(A: dict[int, np.ndarray], t: int, ell: int, n: int) -> np.ndarray:
    out = np.eye(n)
    for j in range(t, t - ell, -1):
        out = out @ A[j]
    return out


# ----------------------------------------------------------------------------
# per-step A_j, B_j typed from the paper's Jacobians (paper-notes section 2)
# ----------------------------------------------------------------------------


def D(vals: Values, name: str, j: int) -> np.ndarray:
    return np.diag(1 - vals.at(name, j) ** 2)


def dg(v: np.ndarray) -> np.ndarray:
    return np.diag(v)


def vector_gate_parts(vals: Values, j: int) -> dict[str, np.ndarray]:
    P = vals.params
    g, phi, h = vals.at("g", j), vals.at("phi", j), vals.at("h", j - 1)
    return {
        "leak": dg(1 - g),
        "candidate": dg(g) @ D(vals, "phi", j) @ P["W"],
        "gate": dg(phi - h) @ dg(g * (1 - g)) @ P["Wg"],
    }


def scalar_gate_parts(vals: Values, j: int) -> dict[str, np.ndarray]:
    P = vals.params
    g, phi, h = float(vals.at("g", j)[0]), vals.at("phi", j), vals.at("h", j - 1)
    return {
        "leak": (1 - g) * np.eye(vals.n),
        "candidate": g * D(vals, "phi", j) @ P["W"],
        "gate": g * (1 - g) * (phi - h)[:, None] @ P["wg"],
    }


def leaky_parts(vals: Values, j: int) -> dict[str, np.ndarray]:
    alpha = vals.cell.constants["alpha"]
    return {"leak": (1 - alpha) * np.eye(vals.n), "candidate": alpha * D(vals, "phi", j) @ vals.params["W"]}


def gru_parts(vals: Values, j: int) -> dict[str, np.ndarray]:
    P = vals.params
    z, r, c, h = vals.at("z", j), vals.at("r", j), vals.at("cand", j), vals.at("h", j - 1)
    Dc = D(vals, "cand", j)
    return {
        "leak": dg(1 - z),
        "candidate": dg(z) @ Dc @ P["Wn"] @ dg(r),
        "gate": dg(c - h) @ dg(z * (1 - z)) @ P["Wz"],
        "reset": dg(z) @ Dc @ P["Wn"] @ dg(h) @ dg(r * (1 - r)) @ P["Wr"],
    }


CASES = {
    "vector_gate": (lambda: sg.cells.vector_gate(bias=False), vector_gate_parts),
    "scalar_gate": (lambda: sg.cells.scalar_gate(bias=False), scalar_gate_parts),
    "leaky": (lambda: sg.cells.leaky(0.7, bias=False), leaky_parts),
    "gru": (lambda: sg.cells.gru(bias=False), gru_parts),
}


def random_params(cell: sg.Cell, n: int, m: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    size = {"n": n, "m": m, 1: 1}
    return {p.name: 0.6 * rng.standard_normal(tuple(size[d] for d in p.shape)) for p in cell.params}


#: the origins that form B, typed from paper-notes section 10 (decision 3) -- not read from SPLITS
B_ORIGINS = {"appendix": ("gate", "reset"), "coupling": ("candidate", "gate", "reset")}


@pytest.mark.parametrize("ell", [1, 2, 3])
@pytest.mark.parametrize("how", ["appendix", "coupling"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_first_order_term_matches_numpy(name: str, how: str, ell: int) -> None:
    factory, parts = CASES[name]
    cell = factory()
    n = 3
    params = random_params(cell, n, 2, seed=ell)
    vals = Values(cell, n, seed=10 * ell + len(how), params=params)
    ex = sg.expansion(cell, how)
    A, B = {}, {}
    for j in range(1, T + 1):
        p = parts(vals, j)
        A[j] = sum((M for o, M in p.items() if o not in B_ORIGINS[how]), np.zeros((n, n)))
        B[j] = sum((M for o, M in p.items() if o in B_ORIGINS[how]), np.zeros((n, n)))
    t = T
    env = {t_: t, ell_: ell}
    got_L = vals.matrix(ex.first, env)
    np.testing.assert_allclose(got_L, first_order(A, B, t, ell, n), rtol=1e-12, atol=1e-12)
    got_F0 = vals.matrix(ex.zeroth, env)
    np.testing.assert_allclose(got_F0, zeroth_order(A, t, ell, n), rtol=1e-12, atol=1e-12)
    # the check is not vacuous: B is nonzero wherever the cell has terms of those origins
    if name != "leaky" or how == "coupling":
        assert np.abs(got_L).max() > 1e-3


@pytest.mark.parametrize("ell", [1, 3])
def test_diagonal_first_order_matches_numpy(ell: int) -> None:
    """The follow-up's mu1 = prod(lambda) * sum(r / lambda), r = the rest of diag(J)."""
    cell = sg.cells.vector_gate(bias=False)
    n = 3
    params = random_params(cell, n, 2, seed=7)
    vals = Values(cell, n, seed=8, params=params)
    ex = sg.expansion(cell, "diagonal")
    t, k = T, T - ell
    lam = {j: 1 - vals.at("g", j) for j in range(1, T + 1)}
    r = {j: np.diag(vector_gate_parts(vals, j)["candidate"] + vector_gate_parts(vals, j)["gate"]) for j in lam}
    expected = np.prod([lam[j] for j in range(k + 1, t + 1)], axis=0) * sum(r[j] / lam[j] for j in range(k + 1, t + 1))
    got = vals.units(ex.diagonal_first_order, {t_: t, ell_: ell})
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# ----------------------------------------------------------------------------
# time indices
# ----------------------------------------------------------------------------


def test_at_step_time_indices() -> None:
    cell = sg.cells.vector_gate()  # with biases b, c (vector parameters)
    s = cell.symbols
    step = sympy.Symbol("k", integer=True)
    expr = s["h"] * s["x"] * s["g"] * s["phi"] * s["b"] + s["c"]
    H, X, G, PHI = (IndexedBase(nm) for nm in ("h", "x", "g", "phi"))
    assert at_step(cell, expr, step) == H[step - 1] * X[step] * G[step] * PHI[step] * s["b"] + s["c"]
    leaky = sg.cells.leaky(bias=False)
    ls = leaky.symbols
    assert at_step(leaky, ls["alpha"] * ls["h"], t_) == ls["alpha"] * IndexedBase("h")[t_ - 1]
    # a node of a Linear (z_W, state-dependent) is per step
    assert at_step(leaky, ls["z_W"], t_) == IndexedBase("z_W")[t_]


@sg.cell
def param_gate(h: State("n"), x: Input("m"), theta: Scalar(), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m")):
    a = sigmoid(theta)
    return (1 - a) * h + a * tanh(W @ h + U @ x)


def test_time_constant_nodes_stay_unindexed() -> None:
    a, phi = param_gate.symbols["a"], param_gate.symbols["phi"]
    assert at_step(param_gate, a * phi, t_) == a * IndexedBase("phi")[t_]


def test_constant_gate_closed_forms() -> None:
    a = param_gate.symbols["a"]
    e = sg.effective_lr(param_gate)
    assert e.param == "W"
    assert sympy.simplify(e.mu - a * (1 - a) ** ell_) == 0
    assert sympy.simplify(e.retention - (1 - a) ** ell_) == 0
    assert sympy.simplify(e.write_gain - a) == 0
    assert sympy.simplify(sg.effective_lr(param_gate, convention="s1").mu - a ** (ell_ + 1)) == 0
    assert sympy.simplify(sg.effective_lr(param_gate, convention="followup").mu - (1 - a) ** ell_) == 0
    assert sympy.simplify(sg.expansion(param_gate, "coupling").retention - (1 - a) ** ell_) == 0
    assert "Product" not in str(e)


def test_leaky_and_vector_gate_closed_forms_unchanged() -> None:
    alpha = sg.cells.leaky(bias=False).symbols["alpha"]
    e = sg.effective_lr(sg.cells.leaky(bias=False))
    assert sympy.simplify(e.mu - alpha * (1 - alpha) ** ell_) == 0
    g = IndexedBase("g")
    e = sg.effective_lr(sg.cells.vector_gate())
    assert e.mu == g[t_ - ell_] * sympy.Product(1 - g[j_], (j_, t_ - ell_ + 1, t_))
    assert e.retention == sympy.Product(1 - g[j_], (j_, t_ - ell_ + 1, t_))


# ----------------------------------------------------------------------------
# the named splits, typed by hand
# ----------------------------------------------------------------------------


def test_named_split_origins() -> None:
    assert SPLITS["appendix"] == ("gate", "reset")
    assert SPLITS["coupling"] == ("candidate", "gate", "reset")
    assert SPLITS["diagonal"] == ("candidate", "gate", "reset")
    gru = sg.split(sg.cells.gru(), "appendix")
    assert gru.origins == ("gate", "reset")
    assert [t.origin for t in gru.B.terms] == ["gate", "reset"]
    assert [t.origin for t in gru.A.terms] == ["leak", "candidate"]


def vec(name: str, d: int) -> Matrix:
    return Matrix(MatrixSymbol(name, d, 1))


def mat(name: str, r: int, c: int) -> Matrix:
    return Matrix(MatrixSymbol(name, r, c))


def diag_of(v: Matrix) -> Matrix:
    return sympy.diag(*list(v))


def one_minus(v: Matrix) -> Matrix:
    return v.applyfunc(lambda s: 1 - s)


def slope(v: Matrix) -> Matrix:
    return diag_of(v.applyfunc(lambda s: 1 - s**2))


def logistic_slope(v: Matrix) -> Matrix:
    return diag_of(v.applyfunc(lambda s: s * (1 - s)))


def assert_same(A: Matrix, B: Matrix) -> None:
    assert sympy.simplify(A - B) == sympy.zeros(*A.shape)


@pytest.mark.parametrize("bias", [True, False])
def test_appendix_split_of_the_vector_gate(bias: bool) -> None:
    n, sizes = 3, {"n": 3, "m": 2}
    sp = sg.split(sg.cells.vector_gate(bias=bias), "appendix")
    g, phi, h = vec("g", n), vec("phi", n), vec("h", n)
    A = diag_of(one_minus(g)) + diag_of(g) * slope(phi) * mat("W", n, n)
    B = diag_of(phi - h) * logistic_slope(g) * mat("Wg", n, n)
    assert_same(sp.A.as_explicit(sizes), A)
    assert_same(sp.B.as_explicit(sizes), B)


@pytest.mark.parametrize("bias", [True, False])
def test_appendix_split_of_the_gru(bias: bool) -> None:
    n, sizes = 3, {"n": 3, "m": 2}
    sp = sg.split(sg.cells.gru(bias=bias), "appendix")
    z, r, c, h = vec("z", n), vec("r", n), vec("cand", n), vec("h", n)
    Wn, Wz, Wr = mat("Wn", n, n), mat("Wz", n, n), mat("Wr", n, n)
    A = diag_of(one_minus(z)) + diag_of(z) * slope(c) * Wn * diag_of(r)
    B = diag_of(c - h) * logistic_slope(z) * Wz + diag_of(z) * slope(c) * Wn * diag_of(h) * logistic_slope(r) * Wr
    assert_same(sp.A.as_explicit(sizes), A)
    assert_same(sp.B.as_explicit(sizes), B)


# ----------------------------------------------------------------------------
# a chain that starts with a parameter matrix
# ----------------------------------------------------------------------------


@sg.cell
def matrix_first(h: State("n"), x: Input("m"), U: MatrixSpec("n", "m"), Wg: MatrixSpec("n", "n"),
                 W: MatrixSpec("n", "n")):
    g = sigmoid(Wg @ h)
    return 0.5 * tanh(U @ x) + W @ (g * h)


def test_chain_starting_with_a_matrix_matches_finite_differences() -> None:
    cell = matrix_first
    J = sg.jacobian(cell)
    assert all(t.factors[0].kind == "matrix" and t.factors[0].matrix == "W" for t in J.terms)
    k = sg.reference_kernel(cell)
    rng = np.random.default_rng(5)
    n, m, batch = 3, 2, 4
    params = {"U": rng.standard_normal((n, m)), "Wg": rng.standard_normal((n, n)), "W": rng.standard_normal((n, n))}
    x_t, h = rng.standard_normal((batch, m)), rng.standard_normal((batch, n))
    got = J.evaluate(k.step_values(params, x_t, h), params, {"n": n, "m": m, 1: 1})

    def step(hh: np.ndarray) -> np.ndarray:
        return k.forward(params, x_t[None], hh).states["h"][0]

    eps = 1e-6
    fd = np.empty((batch, n, n))
    for j in range(n):
        dh = np.zeros_like(h)
        dh[:, j] = eps
        fd[:, :, j] = (step(h + dh) - step(h - dh)) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-9)
    # and each term on its own, typed by hand: W diag(g) and W diag(h) diag(g(1-g)) Wg
    vals = k.step_values(params, x_t, h)
    g = vals["g"]
    by = {t.origin: t for t in J.terms}
    W, Wg = params["W"], params["Wg"]
    cand = sg._derive.StructuredJacobian(J.of, J.wrt, (by["candidate"],), J.rows, J.cols).evaluate(vals, params)
    np.testing.assert_allclose(cand, W[None] * g[:, None, :], rtol=1e-13)
    reset = sg._derive.StructuredJacobian(J.of, J.wrt, (by["reset"],), J.rows, J.cols).evaluate(vals, params)
    np.testing.assert_allclose(reset, np.einsum("ij,bj,jk->bik", W, h * g * (1 - g), Wg), rtol=1e-12)
