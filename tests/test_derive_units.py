"""Unit tests of the derivation package (``symgate._derive``), each against an independent oracle.

* dense state and parameter Jacobians of small hand-written cells, whose chains take every
  shape the numeric evaluation distinguishes (a diagonal, a parameter matrix first, a column
  after a diagonal, after a matrix and after a dense product, a row first and then a diagonal,
  a chain with no factor at all),
  against complex-step derivatives of the update typed in plain numpy;
* the symbolic Jacobian of the same cells made explicit, against SymPy's brute-force
  Jacobian of the update typed by hand;
* the printers (``sstr``/``latex`` give SymPy's text), the stable rewrites (against the
  identities ``1 - sigmoid(u) = sigmoid(-u)``, ``1 - tanh(u)^2 = sech(u)^2`` in mpmath), the
  evaluation program, the local partials' bookkeeping, and the expansion objects' closed forms
  typed from paper-notes sections 4 and 10;
* the argument checks of the evaluation entry points (error type, and what the message names).
"""

from __future__ import annotations

import functools
from typing import Callable

import mpmath
import numpy as np
import pytest
import sympy
from sympy import Matrix, MatrixSymbol
from sympy.matrices.expressions.matexpr import MatrixElement

import symgate as sg
from symgate import Constant, Input, Scalar, State, Vector, sigmoid, tanh
from symgate import Matrix as MatrixSpec
from symgate._cell import dim_symbol
from symgate._derive import local_partials
from symgate._derive._jacobian import mul_chain
from symgate._errors import CellSpecError, ShapeError

# ----------------------------------------------------------------------------
# hand-written cells: every kind of chain the numeric evaluation distinguishes
# ----------------------------------------------------------------------------


def _np_sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


@sg.cell
def colmix(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), V: MatrixSpec("n", "n"),
           wg: MatrixSpec(1, "n"), U: MatrixSpec("n", "m"), b: Vector("n"), s: Scalar()):
    # a scalar gate q read by a vector function (a column after a diagonal: diag(a) [1 - phi^2] wg),
    # and by a matrix product's compound source (a column after a matrix: W [h] wg)
    q = sigmoid(wg @ h + s)
    a = sigmoid(V @ h + U @ x)
    phi = tanh(q + U @ x + b)
    return a * phi + W @ (h * q)


def colmix_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The update of ``colmix`` in numpy (complex-safe), batch ``(B, .)``."""
    q = _np_sigmoid(h @ p["wg"].T + p["s"])  # (B, 1)
    a = _np_sigmoid(h @ p["V"].T + x @ p["U"].T)
    phi = np.tanh(q + x @ p["U"].T + p["b"])
    return a * phi + (h * q) @ p["W"].T


@sg.cell
def matfirst(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), V: MatrixSpec("n", "n"),
             U: MatrixSpec("n", "m"), c: Vector("n"), k: Scalar(), alpha: Constant(0.5)):
    # chains that start with a matrix (alpha W diag(1 - phi^2) V), and parameter Jacobians with
    # no factor at all (d h'/d c = I, d h'/d k = a column of ones)
    phi = tanh(V @ h + U @ x)
    return alpha * (W @ phi) + c + k


def matfirst_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    phi = np.tanh(h @ p["V"].T + x @ p["U"].T)
    return 0.5 * (phi @ p["W"].T) + p["c"] + p["k"]


@sg.cell
def densecol(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), wg: MatrixSpec(1, "n"),
             U: MatrixSpec("n", "m")):
    # a column after a dense product: diag(1 - phi^2) W [h] wg
    q = sigmoid(wg @ h)
    phi = tanh(W @ (h * q) + U @ x)
    return phi


def densecol_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    q = _np_sigmoid(h @ p["wg"].T)
    return np.tanh((h * q) @ p["W"].T + x @ p["U"].T)


@sg.cell
def scalar_read(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), wg: MatrixSpec(1, "n"),
                U: MatrixSpec("n", "m")):
    # the update reads a scalar gate directly: a chain whose only factor is the row wg,
    # broadcast over the rows (a column of ones in front)
    q = sigmoid(wg @ h)
    return tanh(W @ h + U @ x) + q


def scalar_read_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.tanh(h @ p["W"].T + x @ p["U"].T) + _np_sigmoid(h @ p["wg"].T)


@sg.cell
def named_scalar(h: State("n"), x: Input("m"), V: MatrixSpec("n", "n"), U: MatrixSpec("n", "m"),
                 wg: MatrixSpec(1, "n"), k: Scalar()):
    # scalars read through a named node: d tmp/d q = d tmp/d k = 1 broadcast to the units, after
    # diag(a) (diag(a) [1] wg in the state Jacobian, diag(a) [1] for the scalar parameter k)
    a = sigmoid(V @ h)
    q = sigmoid(wg @ h)
    tmp = (tanh(U @ x) + q + k).named("tmp")
    return a * tmp


def named_scalar_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    a = _np_sigmoid(h @ p["V"].T)
    q = _np_sigmoid(h @ p["wg"].T)
    return a * (np.tanh(x @ p["U"].T) + q + p["k"])


@sg.cell
def chained(h: State("n"), x: Input("m"), W1: MatrixSpec("k", "n"), W2: MatrixSpec("n", "k"),
            U1: MatrixSpec("k", "m"), U2: MatrixSpec("n", "k"), Wg: MatrixSpec("n", "n"),
            V1: MatrixSpec("k", "n"), V2: MatrixSpec("n", "k")):
    # Linear nodes reading Linear nodes: a chain of two matrices ending at the state (W2 W1), at
    # the input (U2 U1) and at a gate node (V2 V1 diag(g(1-g)) Wg)
    g = sigmoid(Wg @ h)
    return 0.5 * tanh(W2 @ (W1 @ h) + U2 @ (U1 @ x)) + 0.5 * (V2 @ (V1 @ g))


def chained_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    g = _np_sigmoid(h @ p["Wg"].T)
    inner = h @ p["W1"].T @ p["W2"].T + x @ p["U1"].T @ p["U2"].T
    return 0.5 * np.tanh(inner) + 0.5 * (g @ p["V1"].T @ p["V2"].T)


@sg.cell
def rowdense(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), wg: MatrixSpec(1, "n"),
             U: MatrixSpec("n", "m")):
    # the update reads a scalar gate of a vector function of the state: a chain that starts with the
    # row wg and goes on through diag(1 - th^2), a product of one row for every sequence, broadcast
    # over the rows
    th = tanh(h)
    q = sigmoid(wg @ th)
    return tanh(W @ h + U @ x) + q


def rowdense_np(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    q = _np_sigmoid(np.tanh(h) @ p["wg"].T)
    return np.tanh(h @ p["W"].T + x @ p["U"].T) + q


CELLS: dict[str, tuple[sg.Cell, Callable]] = {
    "rowdense": (rowdense, rowdense_np),
    "chained": (chained, chained_np),
    "colmix": (colmix, colmix_np),
    "matfirst": (matfirst, matfirst_np),
    "densecol": (densecol, densecol_np),
    "scalar_read": (scalar_read, scalar_read_np),
    "named_scalar": (named_scalar, named_scalar_np),
}
N, M, B = 3, 2, 2
K = 4  # the inner width of the chained cell's matrix products (distinct from n and m)


def _problem(cell: sg.Cell, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = {"n": N, "m": M, "k": K, 1: 1}
    params = {p.name: np.asarray(rng.uniform(-0.9, 0.9, tuple(size[d] for d in p.shape))) for p in cell.params}
    return params, rng.uniform(-1, 1, (B, M)), rng.uniform(-0.9, 0.9, (B, N))


def _complex_step(f: Callable[[np.ndarray], np.ndarray], at: np.ndarray) -> np.ndarray:
    """Derivative of ``f`` at ``at`` (any shape) by the complex step: ``(*f.shape, *at.shape)``.

    Exact to rounding for analytic ``f`` (tanh, sigmoid, products): no cancellation, so
    comparisons below can use a tolerance of a few hundred ulps."""
    hstep = 1e-30
    flat = at.astype(complex).ravel()
    cols = []
    for i in range(flat.size):
        z = flat.copy()
        z[i] += 1j * hstep
        cols.append(np.imag(f(z.reshape(at.shape))) / hstep)
    return np.stack(cols, axis=-1).reshape(*np.shape(cols[0]), *at.shape)


# rounding of O(1) sums of a few products of O(1) factors: 1e-12 is ~5000 ulps, far below any
# wrong term (the entries are O(0.1) to O(1))
TOL = 1e-12


@pytest.mark.parametrize("name", list(CELLS))
def test_dense_state_jacobian_matches_complex_step(name: str) -> None:
    """J.evaluate (through the reference kernel's step values) equals d h'/d h of the numpy update."""
    cell, update = CELLS[name]
    params, x, h = _problem(cell)
    got = sg.ReferenceKernel(cell).jacobian(params, x, h)
    for bb in range(B):
        want = _complex_step(lambda hh: update(params, x[bb:bb + 1], hh[None])[0], h[bb])
        np.testing.assert_allclose(got[bb], want, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(CELLS))
def test_dense_parameter_jacobians_match_complex_step(name: str) -> None:
    """ParamJacobian.evaluate of every parameter (matrix, vector, scalar) equals d h'/d theta."""
    cell, update = CELLS[name]
    params, x, h = _problem(cell)
    kern = sg.ReferenceKernel(cell)
    for p in cell.params:
        got = kern.parameter_jacobian(params, x, h, p.name)

        def f(theta: np.ndarray, p: str = p.name) -> np.ndarray:
            return update({**params, p: theta}, x, h)

        want = _complex_step(f, np.asarray(params[p.name]))
        assert got.shape == want.shape, p.name
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=p.name)


def _explicit_sympy_update(name: str, n: int, m: int, k: int = 3) -> tuple[Matrix, Matrix]:
    """The update typed by hand with SymPy matrices, and the column of the state entries."""
    h = Matrix(MatrixSymbol("h", n, 1))
    x = Matrix(MatrixSymbol("x", m, 1))

    def mat(nm: str, r: int, c: int) -> Matrix:
        return Matrix(MatrixSymbol(nm, r, c))

    def vec(nm: str) -> Matrix:
        return Matrix(MatrixSymbol(nm, n, 1))

    sig = lambda v: 1 / (1 + sympy.exp(-v))  # noqa: E731
    if name == "colmix":
        s = colmix.symbols["s"]
        q = sig((mat("wg", 1, n) * h)[0, 0] + s)
        a = (mat("V", n, n) * h + mat("U", n, m) * x).applyfunc(sig)
        phi = (sympy.ones(n, 1) * q + mat("U", n, m) * x + vec("b")).applyfunc(sympy.tanh)
        out = a.multiply_elementwise(phi) + mat("W", n, n) * (h * q)
    elif name == "matfirst":
        phi = (mat("V", n, n) * h + mat("U", n, m) * x).applyfunc(sympy.tanh)
        out = sympy.Rational(1, 2) * mat("W", n, n) * phi + vec("c") + sympy.ones(n, 1) * matfirst.symbols["k"]
    elif name == "densecol":
        q = sig((mat("wg", 1, n) * h)[0, 0])
        out = (mat("W", n, n) * (h * q) + mat("U", n, m) * x).applyfunc(sympy.tanh)
    elif name == "chained":
        g = (mat("Wg", n, n) * h).applyfunc(sig)
        inner = mat("W2", n, k) * (mat("W1", k, n) * h) + mat("U2", n, k) * (mat("U1", k, m) * x)
        out = sympy.Rational(1, 2) * inner.applyfunc(sympy.tanh) + sympy.Rational(1, 2) * (mat("V2", n, k) * (mat("V1", k, n) * g))
    elif name == "named_scalar":
        a = (mat("V", n, n) * h).applyfunc(sig)
        q = sig((mat("wg", 1, n) * h)[0, 0])
        tmp = (mat("U", n, m) * x).applyfunc(sympy.tanh) + sympy.ones(n, 1) * (q + named_scalar.symbols["k"])
        out = a.multiply_elementwise(tmp)
    elif name == "rowdense":
        q = sig((mat("wg", 1, n) * h.applyfunc(sympy.tanh))[0, 0])
        out = (mat("W", n, n) * h + mat("U", n, m) * x).applyfunc(sympy.tanh) + sympy.ones(n, 1) * q
    else:
        q = sig((mat("wg", 1, n) * h)[0, 0])
        out = (mat("W", n, n) * h + mat("U", n, m) * x).applyfunc(sympy.tanh) + sympy.ones(n, 1) * q
    return out, h


def _flat(expr: Matrix) -> Matrix:
    """Entries ``W[i, j]`` of matrix symbols and per-unit scalars as plain symbols, named alike on both sides."""
    rep = {e: sympy.Symbol(f"{e.parent.name}[{e.i},{e.j}]") for e in expr.atoms(MatrixElement)}
    out = expr.xreplace(rep)
    return out.xreplace({s: sympy.Symbol(s.name) for s in out.free_symbols})


def _numeric(expr: Matrix, seed: int, fixed: dict[str, float]) -> np.ndarray:
    """Evaluate an explicit matrix at random values of its symbols (``fixed`` values by name)."""
    rng = np.random.default_rng(seed)
    atoms = sorted(expr.free_symbols, key=str)
    rep = {a: sympy.Float(fixed.get(a.name, rng.uniform(-0.9, 0.9))) for a in atoms}
    return np.array(expr.xreplace(rep).evalf(), dtype=float)


@pytest.mark.parametrize("name", list(CELLS))
def test_symbolic_jacobian_made_explicit_matches_sympy(name: str) -> None:
    """as_explicit(inline=True) equals SymPy's Jacobian of the hand-typed update (n=2, m=1, k=3)."""
    cell, _ = CELLS[name]
    n, m, k = 2, 1, 3
    out, h = _explicit_sympy_update(name, n, m, k)
    want = _flat(out.jacobian(h))
    sizes = {"n": n, "m": m, "k": k} if name == "chained" else {"n": n, "m": m}
    got = _flat(sg.jacobian(cell).as_explicit(sizes, inline=True, cell=cell))
    assert got.shape == want.shape == (n, n)
    # at one random point (a wrong or missing term is O(0.1) there with probability 1): values of a
    # dozen O(1) products, 1e-12 of rounding at most
    np.testing.assert_allclose(_numeric(got - want, 0, {"alpha": 0.5}), 0, atol=1e-12)


# ----------------------------------------------------------------------------
# argument checks of the evaluation entry points
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _vg_values() -> tuple[dict, dict]:
    """Step values and parameters of the vector-gate cell (n=3, m=2, B=2)."""
    cell = sg.cells.vector_gate()
    params, x, h = _problem(cell, 1)
    return sg.ReferenceKernel(cell).step_values(params, x, h), params


@pytest.mark.parametrize("sizes, names", [
    ({"n": 0}, "'n': 0"), ({"n": True}, "'n': True"), ({"n": 2.0}, "'n': 2.0"), ({"n": -1}, "'n': -1"),
])
def test_as_explicit_rejects_sizes_that_are_not_positive_integers(sizes: dict, names: str) -> None:
    """A size must be a positive int (not a bool, not a float): ShapeError naming the size."""
    with pytest.raises(ShapeError, match=f"positive integers, got {{{names}}}"):
        sg.jacobian(sg.cells.leaky()).as_explicit(sizes)


def test_as_explicit_of_a_zero_block_is_a_zero_matrix_of_the_block_shape() -> None:
    """A Jacobian with no term made explicit is the zero matrix of its shape (a scalar dimension
    is 1 wide); a parameter Jacobian with no piece is the zero matrix of d_out x prod(shape)."""
    n = dim_symbol("n")
    assert sg.jacobian(VG).select().as_explicit({"n": 3}) == sympy.zeros(3, 3)
    C = sg.parameter_jacobian(sg.cells.scalar_gate(), "c").pieces[0][0]
    assert (C.rows, C.cols) == ("n", 1)
    assert C.select().as_explicit({"n": 3}) == sympy.zeros(3, 1)
    P = sg.parameter_jacobian(sg.cells.lstm(), "Wo", "c")
    assert P.pieces == () and P.terms == () and P.expr.shape == (n, n**2)


def test_evaluate_names_the_missing_values() -> None:
    """evaluate() without a node value or a parameter matrix: ShapeError naming both."""
    vals, params = _vg_values()
    J = sg.jacobian(sg.cells.vector_gate())
    partial = {k: v for k, v in vals.items() if k != "phi"}
    with pytest.raises(ShapeError, match=r"missing values for \['phi', 'Wg'\]"):
        J.evaluate(partial, {k: v for k, v in params.items() if k != "Wg"})


def test_evaluate_needs_per_unit_values() -> None:
    """Values without any (B, d) array (e.g. one unbatched step) are refused with ShapeError."""
    vals, params = _vg_values()
    J = sg.jacobian(sg.cells.vector_gate())
    flat = {k: np.asarray(v)[0] if np.ndim(v) == 2 else v for k, v in vals.items()}
    with pytest.raises(ShapeError, match=r"shape \(B, d\)"):
        J.evaluate(flat, params)


def test_infer_sizes_reads_dimensions_off_values_and_parameters() -> None:
    """Sizes come from the matrices' shapes and the per-unit values' last axis."""
    vals, params = _vg_values()
    J = sg.jacobian(sg.cells.vector_gate())
    assert J.infer_sizes(vals, params) == {1: 1, "n": N}
    # the candidate chain of the scalar gate has a 1 x n row wg: its rows are the scalar dimension
    sv = sg.cells.scalar_gate()
    p, x, h = _problem(sv, 2)
    v = sg.ReferenceKernel(sv).step_values(p, x, h)
    assert sg.jacobian(sv).infer_sizes(v, p) == {1: 1, "n": N}


def test_scalar_read_through_a_named_node_keeps_its_broadcast() -> None:
    """d h'/d k = diag(a) 1_n = the column a (n x 1) when k reaches the update through a named node:
    the chain keeps the column of ones, so its matrix expression has the shape n x 1, and the
    write gain of k is a (its sensitivity d tmp/d k is 1)."""
    n = dim_symbol("n")
    pj = sg.parameter_jacobian(named_scalar, "k")
    (C, _), = pj.pieces
    assert C.expr.shape == (n, 1) and str(pj) == "d+h'/dk = diag(a)*[1]"
    explicit = C.as_explicit({"n": 2})
    a = MatrixSymbol("a", 2, 1)
    assert explicit == Matrix([a[0, 0], a[1, 0]])
    e = sg.effective_lr(named_scalar, "k")
    assert e.write_gain_unit == named_scalar.symbols["a"] and e.sensitivity_unit == 1


def test_infer_sizes_without_any_size_source_names_the_dimension() -> None:
    """A Jacobian whose only term has no factor (matfirst's d h'/d c = I) cannot infer n."""
    C = sg.parameter_jacobian(matfirst, "c").pieces[0][0]
    with pytest.raises(ShapeError, match="dimension 'n'"):
        C.infer_sizes({}, {})


def test_evaluate_infers_sizes_like_explicit_sizes() -> None:
    """evaluate() with sizes omitted gives the same dense Jacobian as with sizes given."""
    vals, params = _vg_values()
    J = sg.jacobian(sg.cells.vector_gate())
    np.testing.assert_array_equal(J.evaluate(vals, params), J.evaluate(vals, params, {1: 1, "n": N}))
    np.testing.assert_array_equal(J.lambdify()(vals, params), J.evaluate(vals, params))


def test_block_jacobian_evaluate_stacks_the_blocks() -> None:
    """BlockJacobian.evaluate of the LSTM is [[dh'/dh, dh'/dc], [dc'/dh, dc'/dc]] (states in order),
    checked against complex-step derivatives of the LSTM update typed in numpy."""
    cell = sg.cells.lstm()
    params, x, h = _problem(cell, 3)
    c = np.random.default_rng(4).uniform(-0.9, 0.9, (B, N))

    def update(hc: np.ndarray, bb: int) -> np.ndarray:
        hh, cc = hc[:N], hc[N:]
        xx = x[bb]
        pre = {k: params[f"W{k}"] @ hh + params[f"U{k}"] @ xx + params[f"b{k}"] for k in "ifoc"}
        i, f, o = (_np_sigmoid(pre[k]) for k in "ifo")
        cn = f * cc + i * np.tanh(pre["c"])
        return np.concatenate([o * np.tanh(cn), cn])

    got = sg.ReferenceKernel(cell).jacobian(params, x, {"h": h, "c": c})
    assert got.shape == (B, 2 * N, 2 * N)
    for bb in range(B):
        want = _complex_step(lambda v: update(v, bb), np.concatenate([h[bb], c[bb]]))
        np.testing.assert_allclose(got[bb], want, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------
# products of many factors; printers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 70])
def test_mul_chain_is_the_full_product(count: int) -> None:
    """mul_chain(first, es) == first * prod(es) for any length (the fold past 32 factors included)."""
    syms = sympy.symbols(f"a0:{count}") if count else ()
    first = sympy.Symbol("c")
    assert mul_chain(first, list(syms)) == sympy.Mul(first, *syms)


def _matrix_expressions() -> list:
    A, Bm, C = (MatrixSymbol(nm, 3, 3) for nm in "ABC")
    x = sympy.Symbol("x")
    J = sg.jacobian(sg.cells.gru())
    return [
        sympy.MatMul(-2, A, Bm), sympy.MatMul(-1, A, Bm, C), sympy.MatMul(-sympy.I, A, Bm), sympy.MatMul(3, A, Bm),
        sympy.MatMul(x, A, Bm), sympy.MatMul(-x, A, Bm), sympy.MatMul(A + Bm, C), sympy.MatMul(2 * sympy.I, A, Bm),
        sympy.MatMul(A, Bm).T, J.expr, sg.jacobian(sg.cells.leaky(bias=False)).expr,
        sg.jacobian(sg.cells.scalar_gate()).expr,
    ]


@pytest.mark.parametrize("k", range(12))
def test_sstr_and_latex_print_like_sympy(k: int) -> None:
    """The linear-time printers give exactly SymPy's text (documented contract), signs included."""
    from symgate._derive._matexpr import latex, sstr

    e = _matrix_expressions()[k]
    assert sstr(e) == sympy.sstr(e)
    assert latex(e) == sympy.latex(e)


def test_jacobian_text_forms_name_the_terms() -> None:
    """str/latex/describe/pretty of the scalar gate's Jacobian show its three chains, origins in
    order: (1 - g) I (leak), g diag(1 - phi^2) W (candidate), g (1 - g) [phi - h] wg (gate)."""
    J = sg.jacobian(sg.cells.scalar_gate(bias=False))
    s = str(J)
    assert s.startswith("dh'/dh = ")
    assert s.index("(1 - g)*I") < s.index("diag(1 - phi**2)*W") < s.index("[-h + phi]*wg")
    assert J.latex().startswith(r"\frac{\partial h'}{\partial h} = ")
    lines = J.describe().splitlines()
    assert lines[0] == "dh'/dh:" and [ln.split("]")[0].strip(" [") for ln in lines[1:]] == ["leak", "candidate", "gate"]
    assert "wg" in J.pretty() and J._repr_latex_() == "$" + J.latex() + "$"
    zero = J.select()
    assert str(zero) == "dh'/dh = 0" and zero.latex().endswith("= 0") and zero.expr.shape == J.expr.shape


def test_parameter_jacobian_text_forms() -> None:
    """d+h'/dvec(W) = h.T (x) (alpha diag(1 - phi^2)) for the leaky cell; a vector parameter prints
    without vec() and a zero parameter Jacobian prints 0."""
    pj = sg.parameter_jacobian(sg.cells.leaky(), "W")
    assert str(pj) == "d+h'/dvec(W) = h.T \u2297 (alpha*diag(1 - phi**2))"
    assert pj.latex().startswith(r"\frac{\partial^+ h'}{\partial \operatorname{vec}(W)} = ")
    assert pj._repr_latex_() == "$" + pj.latex() + "$"
    pb = sg.parameter_jacobian(sg.cells.leaky(), "b")
    assert str(pb) == "d+h'/db = alpha*diag(1 - phi**2)"
    assert pb.latex().startswith(r"\frac{\partial^+ h'}{\partial b} = ")
    assert str(sg.parameter_jacobian(sg.cells.lstm(), "Wo", "c")) == "d+c'/dvec(Wo) = 0"


def test_block_jacobian_text_forms_list_every_block() -> None:
    """The LSTM's block Jacobian prints its four blocks in state order (h, c)."""
    J = sg.jacobian(sg.cells.lstm())
    heads = [ln.split(" = ")[0] for ln in str(J).splitlines()]
    assert heads == ["dh'/dh", "dh'/dc", "dc'/dh", "dc'/dc"]
    assert [ln for ln in J.describe().splitlines() if ln.endswith(":")] == ["dh'/dh:", "dh'/dc:", "dc'/dh:", "dc'/dc:"]
    assert len(J.latex().splitlines()) == 4 and J.latex().splitlines()[3].startswith(r"\frac{\partial c'}{\partial c}")
    assert J._repr_latex_().startswith("$") and J.expr.shape == (2 * dim_symbol("n"), 2 * dim_symbol("n"))
    assert len(J.terms) == sum(len(J[k].terms) for k in J.blocks)


# ----------------------------------------------------------------------------
# stable rewrites: 1 - sigmoid(u) = sigmoid(-u), 1 - tanh(u)^2 = sech(u)^2, logs in the log domain
# ----------------------------------------------------------------------------

VG = sg.cells.vector_gate()


def _float_eval(expr: sympy.Expr, values: dict[str, float]) -> float:
    """expr evaluated in float64 by numpy (the symgate functions by their numpy forms)."""
    from symgate._functions import NUMPY_FUNCTIONS

    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    fn = sympy.lambdify(syms, expr, modules=[NUMPY_FUNCTIONS, "numpy"])
    with np.errstate(all="ignore"):
        return float(fn(*[np.float64(values[s.name]) for s in syms]))


def _arg_values(node: str, u: float, **extra: float) -> dict[str, float]:
    """Values for the symbols of node's argument that make it equal u (first symbol u, others 0)."""
    syms = sorted(VG.node(node).arg.free_symbols, key=lambda s: s.name)
    vals = {s.name: 0.0 for s in syms}
    vals[syms[0].name] = u
    vals.update(extra)
    return vals


@pytest.mark.parametrize("u", [-3.0, 0.5, 40.0])
def test_argument_form_of_the_gate_complement_is_accurate(u: float) -> None:
    """(1 - g) and 3 h (1 - g) in the argument form equal 1 - sigmoid(u) to a few ulps (mpmath,
    50 digits), also at u = 40 where 1 - g computed from g is 0."""
    from symgate._derive._stable import argument_form

    g, h = VG.symbols["g"], VG.symbols["h"]
    with mpmath.workdps(50):
        exact = 1 / (1 + mpmath.exp(u))
        for expr, want in [(1 - g, exact), (h * (3 - 3 * g), 3 * 0.25 * exact)]:
            stable = argument_form(VG, expr)
            assert g not in stable.free_symbols
            got = _float_eval(stable, _arg_values("g", u, h=0.25))
            assert got == pytest.approx(float(want), rel=4e-16 * 8)  # a few roundings of exp and 1/(1+e)


@pytest.mark.parametrize("u", [-2.0, 0.3, 20.0])
def test_argument_form_of_the_tanh_derivative_is_accurate(u: float) -> None:
    """1 - phi**2 in the argument form equals sech(u)^2 (mpmath) to a few ulps, also at u = 20."""
    from symgate._derive._stable import argument_form

    phi = VG.symbols["phi"]
    stable = argument_form(VG, 1 - phi**2)
    assert phi not in stable.free_symbols
    with mpmath.workdps(50):
        want = float(mpmath.sech(u) ** 2)
    assert _float_eval(stable, _arg_values("phi", u)) == pytest.approx(want, rel=4e-16 * 8)


def test_argument_form_keeps_the_other_terms_of_a_sum() -> None:
    """c - c*g + rest -> c*sigmoid(-u) + rest: the rest of the sum is kept unchanged."""
    from symgate._derive._stable import argument_form
    from symgate._functions import Sigmoid

    g, h, phi = (VG.symbols[k] for k in ("g", "h", "phi"))
    u = VG.node("g").arg
    assert sympy.simplify(argument_form(VG, 2 - 2 * g + h * phi) - (2 * Sigmoid(-u) + h * phi)) == 0
    # an expression without a complement pattern, or of no saturating node, is returned as is
    assert argument_form(VG, g * phi + h) == g * phi + h
    assert argument_form(VG, 1 - h) == 1 - h


def test_companion_forms_and_companions() -> None:
    """companion_form names each pattern by its companion value ('1-g', '1-phi^2'); companions lists
    the ones a set of expressions reads, in node order, each computed from its node's argument."""
    from symgate._derive._stable import companion_form, companions
    from symgate._functions import Sech2, Sigmoid

    g, h, phi = (VG.symbols[k] for k in ("g", "h", "phi"))
    e = companion_form(VG, (1 - g) * h + g * (1 - phi**2))
    names = {s.name for s in e.free_symbols}
    assert names == {"1-g", "h", "g", "1-phi^2"}
    used = companions(VG, [g * (1 - phi**2), (1 - g) * h])
    assert [c.name for c in used] == ["1-g", "1-phi^2"]
    assert used[0].value == Sigmoid(-VG.node("g").arg) and used[1].value == Sech2(VG.node("phi").arg)
    assert used[0].pattern == 1 - g and used[1].pattern == 1 - phi**2
    assert used[0].node.name == "g" and used[0].symbol.dim == "n"
    assert companions(VG, [g * h]) == [] and companions(VG, []) == []


def test_log_abs_in_the_log_domain() -> None:
    """log|g (1 - g) phi| at u = 800 (where g(1 - g) underflows) equals the mpmath value
    log sigmoid(u) + log sigmoid(-u) + log|phi|; a power multiplies its log."""
    from symgate._derive._stable import log_abs

    g, phi = VG.symbols["g"], VG.symbols["phi"]
    vals = _arg_values("g", 800.0, phi=-0.5)
    with mpmath.workdps(50):
        lg, l1g = mpmath.log(1 / (1 + mpmath.exp(-800))), mpmath.log(1 / (1 + mpmath.exp(800)))
        want = float(lg + l1g + mpmath.log(0.5))
        want3 = float(3 * lg + 2 * l1g)
    # a sum of three logs of O(800): a few ulps of 800
    assert _float_eval(log_abs(VG, g * (1 - g) * phi), vals) == pytest.approx(want, rel=1e-15)
    assert _float_eval(log_abs(VG, g**3 * (1 - g) ** 2), vals) == pytest.approx(want3, rel=1e-15)


def test_log_abs_of_exponentials_and_of_zero() -> None:
    """log|exp(v)| = v for an exp node and an exp of any expression; log 0 = -inf, also for a
    difference that is zero once its complement is in the stable form."""
    from symgate._derive._stable import log_abs
    from symgate._functions import Sigmoid

    @sg.cell
    def expcell(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m")):
        e = sg.exp(W @ h)
        phi = tanh(U @ x)
        return e * phi

    e, h = expcell.symbols["e"], expcell.symbols["h"]
    zw = expcell.node("e").arg
    assert sympy.simplify(log_abs(expcell, e**2) - 2 * zw) == 0
    assert log_abs(expcell, sympy.exp(h)) == h
    assert log_abs(expcell, sympy.S.Zero) == -sympy.oo
    g = VG.symbols["g"]
    assert log_abs(VG, 1 - g - Sigmoid(-VG.node("g").arg)) == -sympy.oo


# ----------------------------------------------------------------------------
# the evaluation program
# ----------------------------------------------------------------------------


@sg.cell
def inputgate(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m"),
              Ug: MatrixSpec("n", "m")):
    # a gate of the input alone: static, and so is its companion 1 - g
    g = sigmoid(Ug @ x)
    phi = tanh(W @ h + U @ x)
    return (1 - g) * h + g * phi


def test_program_of_the_vector_gate() -> None:
    """Steps in order, static where no state is read, a companion right after its node, and the
    update's partials (1 - g)*h + g*phi: d/dh = 1-g (its companion), d/dg = phi - h, d/dphi = g."""
    from symgate._derive._program import program

    cell = sg.cells.vector_gate(bias=False)
    prog = program(cell)
    assert [(s.name, s.kind, s.static) for s in prog] == [
        ("z_Wg", "linear", False), ("z_Ug", "linear", True), ("g", "fn", False), ("1-g", "aux", False),
        ("z_W", "linear", False), ("z_U", "linear", True), ("phi", "fn", False), ("1-phi^2", "aux", False),
        ("h'", "out", False),
    ]
    out = prog[-1]
    assert out.state == "h" and out.dim == "n" and out.expr == cell.outputs[0]
    g, h, phi = (cell.symbols[k] for k in ("g", "h", "phi"))
    partials = {nm: e for nm, _d, e in out.partials}
    assert set(partials) == {"g", "h", "phi"}
    assert partials["g"] == phi - h and partials["phi"] == g
    assert {s.name for s in partials["h"].free_symbols} == {"1-g"}
    lin = prog[0]
    assert lin.matrix == "Wg" and lin.source == "h" and lin.reads == frozenset({"h"}) and lin.partials == ()
    assert prog[2].reads == frozenset({"z_Wg", "z_Ug"})
    # every step reads only leaves and earlier steps
    seen = {lf.name for lf in cell.leaves}
    for st in prog:
        assert st.reads <= seen, st.name
        seen.add(st.name)


def test_program_static_gate_and_its_companion() -> None:
    """A gate of the input alone, and its companion, are static; the state-dependent set holds the
    state and the nodes that read it."""
    from symgate._derive._program import companion_symbols, program, state_dependent

    static = {s.name: s.static for s in program(inputgate)}
    assert static["z_Ug"] and static["g"] and static["1-g"] and static["z_U"]
    assert not static["z_W"] and not static["phi"] and not static["1-phi^2"] and not static["h'"]
    assert {s.name for s in state_dependent(inputgate)} == {"h", "z_W", "phi"}
    comp = companion_symbols(inputgate)
    assert set(comp) == {"1-g", "1-phi^2"} and all(s.dim == "n" for s in comp.values())


def test_program_is_cached() -> None:
    """The program is derived once per cell."""
    from symgate._derive._program import program

    assert program(inputgate) is program(inputgate)


# ----------------------------------------------------------------------------
# local partials: time-constant and trainable quantities, what a partial passes through
# ----------------------------------------------------------------------------


@sg.cell
def reparam(h: State("n"), x: Input("m"), theta: Vector("n"), beta: Constant(0.3), M: MatrixSpec("n", "n"),
            bv: Vector("n"), U: MatrixSpec("n", "m"), w: Vector("n")):
    a = sigmoid(theta)  # a reparametrised parameter: time-constant and trainable
    e = sg.exp(beta)  # a function of a constant: time-constant, not trainable
    zb = M @ bv  # a matrix times a parameter vector: time-constant and trainable
    phi = tanh(w * h + U @ x + zb)
    return (1 - a) * h + a * e * phi


def test_time_constant_and_trainable_symbols() -> None:
    """Nodes of parameters and constants only are time-constant; those of a trained parameter are
    trainable (with the vector and scalar parameters); constants never are."""
    from symgate._derive._local import time_constant_nodes, trainable_symbols

    # M @ bv reads bv through a node of its own (every Linear reads per-row values): that node
    # is time-constant and trainable like zb
    (zb,) = [nd for nd in reparam.nodes if nd.name == "zb"]
    bv_node = reparam.node(zb.source)
    assert bv_node is not None and bv_node.expr == reparam.symbols["bv"]
    assert {s.name for s in time_constant_nodes(reparam)} == {"a", "e", "zb", bv_node.name}
    assert {s.name for s in trainable_symbols(reparam)} == {"theta", "bv", "w", "a", "zb", bv_node.name}
    assert time_constant_nodes(reparam) is time_constant_nodes(reparam)
    assert trainable_symbols(reparam) is trainable_symbols(reparam)


def test_partials_record_the_trained_quantities_they_pass_through() -> None:
    """phi = tanh(w h + U x + zb): d phi/d h passes through w (d phi/d zb through nothing); the update
    (1 - a) h + a e phi: d/dh through a, d/dphi through a (e is a constant's function)."""
    lp = local_partials(reparam)
    sym = reparam.symbols
    phi = lp.of_node(reparam.node("phi"))
    assert lp.through[phi][sym["h"]] == ("w",)
    assert lp.through[phi][sym["zb"]] == ()
    assert lp.through[phi][sym["w"]] == ()
    out = lp.output(0)
    assert out.is_output and not phi.is_output
    assert lp.through[out][sym["h"]] == ("a",) and lp.through[out][sym["phi"]] == ("a",)
    assert lp.through[out][sym["e"]] == ("a",)
    # the partials themselves, typed from the expressions
    assert lp.partials[out][sym["h"]] == 1 - sym["a"]
    assert sympy.simplify(lp.partials[phi][sym["h"]] - (1 - sym["phi"] ** 2) * sym["w"]) == 0
    assert lp.expr[out] == reparam.outputs[0] and lp.dim[out] == "n" and lp.dim[phi] == "n"
    assert set(lp.owners()) == set(lp.partials)
    # a Linear node has no scalar partials of its own
    assert all(o.symbol is None or reparam.node(o.symbol).kind != "linear" for o in lp.owners())


# ----------------------------------------------------------------------------
# splits, expansions and effective learning rates (paper-notes sections 4, 5 and 10)
# ----------------------------------------------------------------------------

t_, ell_ = sg.t, sg.ell
j_, i_ = sympy.Symbol("j", integer=True), sympy.Symbol("i", integer=True)
LEAKY = sg.cells.leaky(bias=False)


@sg.cell
def unit_leak(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m")):
    # the leak is the identity: its retention product is 1 at every lag
    return h + tanh(W @ h + U @ x)


@sg.cell
def leak_only(h: State("n"), x: Input("m"), U: MatrixSpec("n", "m"), alpha: Constant(0.5)):
    # nothing but a leak: the coupling part B is empty
    return alpha * h + tanh(U @ x)


@sg.cell
def linear_only(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m")):
    # no parameter has a write gain: d h'/d z_W = I has no per-unit factor
    return W @ h + U @ x


def test_split_names_and_parts() -> None:
    """A tuple of origins names the split by them ('none' when empty); A + B is the whole Jacobian."""
    J = sg.jacobian(VG)
    s = sg.split(VG, ("candidate", "gate"))
    assert s.name == "candidate+gate" and s.state == "h" and s.origins == ("candidate", "gate")
    assert [t.origin for t in s.A.terms] == ["leak"] and [t.origin for t in s.B.terms] == ["candidate", "gate"]
    assert s.A_is_diagonal
    empty = sg.split(VG, ())
    assert empty.name == "none" and empty.B.terms == () and empty.A.terms == J.terms
    assert not sg.split(VG, "appendix").A_is_diagonal
    assert str(sg.split(LEAKY, "coupling")) == (
        "split 'coupling' of dh'/dh:\n  A = (1 - alpha)*I\n  B = alpha*diag(1 - phi**2)*W")
    assert str(sg.split(LEAKY, ("gate",))).endswith("B = 0")


def test_split_and_expansion_argument_checks() -> None:
    """Unknown split, unknown origin, unknown state, non-cell: CellSpecError naming the value."""
    with pytest.raises(CellSpecError, match="unknown split 'forget'"):
        sg.split(VG, "forget")
    with pytest.raises(CellSpecError, match=r"unknown origin\(s\) \['forget'\]"):
        sg.split(VG, ("gate", "forget"))
    with pytest.raises(CellSpecError, match="'q' is not a state"):
        sg.split(VG, "appendix", state="q")
    with pytest.raises(CellSpecError, match="expected a symgate Cell, got str"):
        sg.split("vector_gate")
    with pytest.raises(CellSpecError, match="expected a symgate Cell, got str"):
        sg.expansion("vector_gate")


def test_retention_state() -> None:
    """The given state, else the first state with a leak (c for the LSTM), else the first state."""
    from symgate._derive._expansion import retention_state

    lstm = sg.cells.lstm()
    assert retention_state(lstm) == "c" and retention_state(lstm, "h") == "h"
    assert retention_state(sg.cells.plain()) == "h"
    with pytest.raises(CellSpecError, match="'z' is not a state"):
        retention_state(lstm, "z")


def test_expansion_with_a_non_diagonal_zeroth_order_is_formal() -> None:
    """Appendix split of the vector gate: F0 = prod_{j=t-ell+1}^{t} A_j and
    L = sum_{i=t-ell+1}^{t} (prod_{j=i+1}^{t} A_j) B_i (prod_{j=t-ell+1}^{i-1} A_j) (paper-notes §4)."""
    from symgate._derive._expansion import FirstOrderSum, OrderedProduct

    ex = sg.expansion(VG, "appendix")
    assert ex.retention is None and ex.leak is None and ex.diagonal_first_order is None
    F0 = ex.zeroth
    assert isinstance(F0, OrderedProduct) and F0.args[1:] == (j_, t_ - ell_ + 1, t_)
    L = ex.first
    assert isinstance(L, FirstOrderSum) and L.args[1:] == (i_, t_ - ell_ + 1, t_)
    left, Bi, right = L.args[0].args
    assert left.args[1:] == (j_, i_ + 1, t_) and right.args[1:] == (j_, t_ - ell_ + 1, i_ - 1)
    assert left.args[0] == ex.A_j and Bi == ex.B_i and F0.shape == (dim_symbol("n"),) * 2
    text = str(ex).splitlines()
    assert text[-2] == "  F0 = Prod[j=t..-ell + t + 1](" + sympy.sstr(ex.A_j) + ")"
    assert text[-1].startswith("  L  = Sum[i=-ell + t + 1..t](")
    tex = ex.latex()
    assert tex.startswith(r"\begin{aligned}F_0 &= \prod_{j=- \ell + t + 1}^{t\,\leftarrow}")
    assert r"L &= \sum_{i=- \ell + t + 1}^{t}" in tex and r"\mu^{(1)}" not in tex
    assert ex._repr_latex_() == "$" + tex + "$"
    assert ex.pretty().splitlines()[0] == "F0 =" and "L =" in ex.pretty().splitlines()


def test_expansion_with_a_diagonal_zeroth_order_has_closed_forms() -> None:
    """Coupling split of the leaky cell: F0 = diag((1-alpha)^ell), L's outer factors are the leak
    products (1-alpha)^(t-i) and (1-alpha)^(i-1-(t-ell)), and mu1 = (1-alpha)^ell sum r_j/(1-alpha)."""
    ex = sg.expansion(LEAKY, "coupling")
    alpha, phi = LEAKY.symbols["alpha"], sympy.IndexedBase("phi")
    n = dim_symbol("n")
    assert ex.leak == 1 - alpha
    assert ex.zeroth.unit_expr == (1 - alpha) ** ell_ and ex.zeroth.shape == (n, n)
    left, Bi, right = ex.first.args[0].args
    assert sympy.simplify(left.unit_expr - (1 - alpha) ** (t_ - i_)) == 0
    assert sympy.simplify(right.unit_expr - (1 - alpha) ** (i_ - 1 - t_ + ell_)) == 0
    r = alpha * (1 - phi[j_] ** 2) * sympy.Symbol("W_diag")
    want = (1 - alpha) ** ell_ * sympy.Sum(r / (1 - alpha), (j_, t_ - ell_ + 1, t_))
    got = ex.diagonal_first_order.xreplace({s: sympy.Symbol(s.name) for s in ex.diagonal_first_order.free_symbols
                                            if s.name == "W_diag"})
    assert sympy.simplify((got - want).doit()) == 0
    assert "  diagonal mu1 = " in str(ex) and r"\mu^{(1)} &= " in ex.latex()


def test_expansion_special_leaks() -> None:
    """A unit leak gives F0 = I; a cell with nothing but a leak has mu1 = 0; a cell without a
    leak, or with a chain of two matrices (GRU reset), has no diagonal first order."""
    from sympy.matrices.expressions import Identity

    ex = sg.expansion(unit_leak, "coupling")
    assert ex.retention == 1 and ex.zeroth == Identity(dim_symbol("n"))
    assert sg.expansion(leak_only, "diagonal").diagonal_first_order == 0
    assert sg.expansion(sg.cells.plain(), "diagonal").diagonal_first_order is None
    assert sg.expansion(sg.cells.gru(), "diagonal").diagonal_first_order is None


def test_effective_lr_first_order_and_envelope_of_the_leaky_cell() -> None:
    """mu = alpha (1-alpha)^ell: envelope n |mu|, its mean |mu|; the first order is the write gain
    alpha times mu1 (exact), mu1 alone (followup), absent (s1)."""
    alpha = LEAKY.symbols["alpha"]
    n = dim_symbol("n")
    e = sg.effective_lr(LEAKY)
    assert e.param == "W" and e.state == "h" and e.source == "h" and e.convention == "exact"
    assert sympy.simplify(e.envelope - n * abs(alpha * (1 - alpha) ** ell_)) == 0
    assert sympy.simplify(e.normalised_envelope - abs(alpha * (1 - alpha) ** ell_)) == 0
    mu1 = sg.expansion(LEAKY, "diagonal").diagonal_first_order
    assert sympy.simplify(e.first_order - alpha * mu1) == 0
    assert sg.effective_lr(LEAKY, convention="followup").first_order == mu1
    assert sg.effective_lr(LEAKY, convention="s1").first_order is None
    s = str(e).splitlines()
    assert s[0] == "effective learning rate of W (state h, convention 'exact', isotropic):"
    assert s[1] == "  mu[t, ell]   = " + sympy.sstr(e.mu) and s[4].startswith("  first order  = ")
    assert len(str(sg.effective_lr(LEAKY, convention="s1")).splitlines()) == 4
    assert e.latex().count(r"\\") == 3 and sg.effective_lr(LEAKY, convention="s1").latex().count(r"\\") == 2
    assert e._repr_latex_() == "$" + e.latex() + "$" and e.pretty() == sympy.pretty(e.mu)


def test_effective_lr_envelope_of_the_vector_gate_sums_over_neurons() -> None:
    """Anisotropic mu: the envelope is sum_q |mu_q| with every time-indexed gate indexed by neuron q."""
    e = sg.effective_lr(VG)
    env = e.envelope
    assert isinstance(env, sympy.Sum)
    (q, lo, hi), = env.limits
    assert lo == 1 and hi == dim_symbol("n")
    g = sympy.IndexedBase("g")
    summand = env.function
    indices = {tuple(sympy.expand(k) for k in ix.indices) for ix in summand.atoms(sympy.Indexed) if ix.base == g}
    assert indices == {(t_ - ell_, q), (j_, q)}
    assert "per neuron (anisotropic)" in str(e).splitlines()[0]


def test_effective_lr_argument_checks() -> None:
    """Unknown convention, a parameter without a write gain (it names the eligible ones), a cell
    with none, a non-cell: CellSpecError."""
    with pytest.raises(CellSpecError, match="unknown convention 'bptt'"):
        sg.effective_lr(VG, convention="bptt")
    with pytest.raises(CellSpecError, match=r"parameter 'Wr' .*eligible: \["):
        sg.effective_lr(sg.cells.gru(), "Wr")
    with pytest.raises(CellSpecError, match="has no parameter with a per-neuron write gain"):
        sg.effective_lr(linear_only)
    with pytest.raises(CellSpecError, match="expected a symgate Cell, got str"):
        sg.effective_lr("leaky")


def test_eligible_parameters_candidate_first_then_gates() -> None:
    """Parameters entering through the candidate come before those entering through a gate."""
    from symgate._derive._expansion import eligible_parameters

    assert list(eligible_parameters(VG)) == ["W", "U", "b", "Wg", "Ug", "c"]
    assert "Wr" not in eligible_parameters(sg.cells.gru())
    assert eligible_parameters(linear_only) == {}


@sg.cell
def named_pre(h: State("n"), x: Input("m"), w: Vector("n"), U: MatrixSpec("n", "m"), alpha: Constant(0.5)):
    pre = (w * h + alpha * (U @ x)).named("pre")  # an arithmetic node of its own
    return tanh(pre)


def test_arithmetic_node_partials_record_what_they_pass_through() -> None:
    """pre = w h + alpha z_U: d pre/d h = w passes through w; d pre/d z_U = alpha through nothing
    (a constant is not trained); so d h'/d h is a candidate term, not a leak."""
    lp = local_partials(named_pre)
    sym = named_pre.symbols
    pre = lp.of_node(named_pre.node("pre"))
    zu = next(s for s in lp.partials[pre] if s.name.startswith("z_"))
    assert lp.partials[pre][sym["h"]] == sym["w"] and lp.through[pre][sym["h"]] == ("w",)
    assert lp.partials[pre][zu] == sym["alpha"] and lp.through[pre][zu] == ()
    assert sg.jacobian(named_pre).origins == ("candidate",)


def test_more_than_max_chains_is_refused_at_the_bound() -> None:
    """A diamond of 10 levels has 2**10 = 1024 chains through W, plus the leak: 1025 > MAX_CHAINS
    = 1024 chains, refused (the limit is documented as 1024)."""
    def body(h, x, W, U):  # type: ignore[no-untyped-def]
        e = tanh(W @ h + U @ x)
        for _ in range(10):
            e = tanh(e) * sigmoid(e)  # the next level reads this level through two nodes
        return 0.5 * h + e

    c = sg.make_cell(body, {"h": State("n"), "x": Input("m"), "W": MatrixSpec("n", "n"), "U": MatrixSpec("n", "m")},
                     name="diamond10")
    with pytest.raises(CellSpecError, match="more than 1024 chains"):
        sg.jacobian(c)


# ----------------------------------------------------------------------------
# per-unit matrices, terms and factors
# ----------------------------------------------------------------------------


def test_unit_matrices_entries_and_pretty_forms() -> None:
    """diag(e)[i, j] = delta_ij e_i and [e][i, 0] = e_i, with each vector symbol v -> v[i, 0] of the
    size substituted; their pretty forms are diag(e) and [e]."""
    from symgate._derive import UnitCol, UnitDiag

    g, h, alpha = VG.symbols["g"], VG.symbols["h"], LEAKY.symbols["alpha"]
    n = dim_symbol("n")
    D = UnitDiag(1 - g * h, n).subs(n, 3)
    gm, hm = MatrixSymbol("g", 3, 1), MatrixSymbol("h", 3, 1)
    assert D.shape == (3, 3) and D.unit_expr == 1 - g * h and D.dim == 3
    assert sympy.Matrix(D.as_explicit()) == sympy.diag(*[1 - gm[i, 0] * hm[i, 0] for i in range(3)])
    C = UnitCol(alpha * g, n).subs(n, 2)
    assert C.shape == (2, 1)
    assert sympy.Matrix(C.as_explicit()) == Matrix([alpha * MatrixSymbol("g", 2, 1)[i, 0] for i in range(2)])
    assert D.T == D
    assert sympy.pretty(UnitDiag(1 - g, n), use_unicode=False) == "diag(1 - g)"
    assert sympy.pretty(UnitCol(g, n), use_unicode=False) == "[g]"
    assert sympy.latex(UnitCol(g, n)) == r"\left[g\right]"
    assert sympy.latex(UnitDiag(g, n)) == r"\operatorname{diag}\left(g\right)"


def test_vector_symbol_and_unit_entry() -> None:
    """A vector per-unit symbol stands for an n x 1 MatrixSymbol, a scalar for itself; unit_entry
    indexes vector symbols only, at the size given."""
    from symgate._derive._matexpr import unit_entry, vector_symbol

    sg_cell = sg.cells.scalar_gate()
    g, h = sg_cell.symbols["g"], sg_cell.symbols["h"]
    assert vector_symbol(g) is g
    assert vector_symbol(h) == MatrixSymbol("h", dim_symbol("n"), 1)
    assert vector_symbol(h, 4) == MatrixSymbol("h", 4, 1)
    assert unit_entry(g * h, 2) == g * MatrixSymbol("h", dim_symbol("n"), 1)[2, 0]
    assert unit_entry(g * h, 1, {dim_symbol("n"): 5}) == g * MatrixSymbol("h", 5, 1)[1, 0]


def test_terms_and_factors_of_the_vector_gate() -> None:
    """The vector gate's three terms: the leak diag(1 - g) (diagonal, no matrix), the candidate
    diag(g) diag(1 - phi^2) W and the gate term diag(phi - h) diag(g (1 - g)) Wg; their
    numeric forms evaluate the complements stably."""
    from symgate._functions import Sigmoid

    J = sg.jacobian(VG)
    g, h, phi = (VG.symbols[k] for k in ("g", "h", "phi"))
    leak, cand, gate = J.terms
    assert (leak.origin, cand.origin, gate.origin) == ("leak", "candidate", "gate")
    assert leak.is_diagonal and not cand.is_diagonal and not gate.is_diagonal
    assert leak.diagonal_expr() == 1 - g and J.diagonal_part() == 1 - g
    assert leak.matrices == () and cand.matrices == ("W",) and gate.matrices == ("Wg",)
    assert [f.expr for f in gate.factors[:2]] == [phi - h, g * (1 - g)]
    assert gate.factors[1].numeric == g * Sigmoid(-VG.node("g").arg)
    assert leak.factors[0].numeric == Sigmoid(-VG.node("g").arg)
    assert cand.factors[2].numeric is None and str(cand.factors[2]) == "W"
    assert str(leak.factors[0]) == "diag(1 - g)" and str(leak) == "diag(1 - g)"
    assert leak.numeric_coefficient == 1 and leak.path == ()
    assert cand.path == ("phi", "z_W") and gate.path == ("g", "z_Wg")
    with pytest.raises(ValueError, match="not diagonal"):
        cand.diagonal_expr()
    assert J.origins == ("leak", "candidate", "gate") and J.select("gate").terms == (gate,)
    assert J.select("leak", "gate").origins == ("leak", "gate")


def test_step_and_lag_symbols_are_integers() -> None:
    """t and ell are integer symbols (ell a nonnegative lag): expressions a user types with
    Symbol('t', integer=True) compare equal to the derived ones."""
    assert sg.t == sympy.Symbol("t", integer=True)
    assert sg.ell == sympy.Symbol("ell", integer=True, nonnegative=True)


def test_jacobian_blocks_by_state_names() -> None:
    """jacobian(cell, of, wrt) is the block d of'/d wrt; a missing name defaults to the first state."""
    lstm = sg.cells.lstm()
    J = sg.jacobian(lstm)
    assert sg.jacobian(lstm, "c") is J[("c", "h")]
    assert sg.jacobian(lstm, wrt="c") is J[("h", "c")]
    assert sg.jacobian(lstm, "c", "c") is J[("c", "c")]
    assert J[("c", "c")].of == "c'" and J[("c", "c")].wrt == "c"
    assert sg.jacobian(VG) is sg.jacobian(VG, "h", "h")


def test_parameter_jacobians_of_every_parameter() -> None:
    """parameter_jacobians gives parameter_jacobian for each parameter, in declaration order, of the
    first state unless told; a matrix read by two Linear nodes has one Kronecker piece per node."""
    lstm = sg.cells.lstm()
    pjs = sg.parameter_jacobians(lstm)
    assert list(pjs) == list(lstm.param_names)
    assert all(pj is sg.parameter_jacobian(lstm, p) and pj.of == "h'" for p, pj in pjs.items())
    assert all(pj.of == "c'" for pj in sg.parameter_jacobians(lstm, "c").values())
    pu = sg.parameter_jacobian(colmix, "U")
    assert [v.name for _, v in pu.pieces] == ["x", "x"] and pu.kind == "matrix" and pu.shape == ("n", "m")
    assert pu.latex().count(r"\otimes") == 2 and str(pu).count("x.T \u2297") == 2
    ps = sg.parameter_jacobian(colmix, "s")
    assert ps.kind == "scalar" and ps.shape == () and [v for _, v in ps.pieces] == [None]


@pytest.mark.parametrize("name", ["colmix", "matfirst"])
def test_dense_jacobians_keep_the_values_dtype(name: str) -> None:
    """float32 step values give float32 dense Jacobians (state and parameter), equal to the float64
    ones to float32 rounding (entries O(1), a few roundings each: 1e-5 is ~100 ulps of float32)."""
    cell, _ = CELLS[name]
    params, x, h = _problem(cell)
    k64, k32 = sg.ReferenceKernel(cell), sg.ReferenceKernel(cell, "float32")
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    x32, h32 = x.astype(np.float32), h.astype(np.float32)
    J32 = k32.jacobian(p32, x32, h32)
    assert J32.dtype == np.float32
    np.testing.assert_allclose(J32, k64.jacobian(params, x, h), rtol=0, atol=1e-5)
    for p in cell.params:
        P32 = k32.parameter_jacobian(p32, x32, h32, p.name)
        assert P32.dtype == np.float32, p.name
        np.testing.assert_allclose(P32, k64.parameter_jacobian(params, x, h, p.name), rtol=0, atol=1e-5)


def test_infer_sizes_from_per_unit_values_alone() -> None:
    """Without a matrix factor the size of n is the last axis of a per-unit value, (B, d) or (d,)."""
    leak = sg.jacobian(VG).select("leak")
    assert leak.infer_sizes({"g": np.zeros((2, 5))}, {}) == {1: 1, "n": 5}
    assert leak.infer_sizes({"g": np.zeros(4)}, {}) == {1: 1, "n": 4}
    with pytest.raises(ShapeError, match="dimension 'n'"):
        leak.infer_sizes({"g": 0.5}, {})


def test_log_abs_takes_inner_logs_of_sigmoids_in_the_log_domain() -> None:
    """log|h log sigmoid(v)| with v = -800: log sigmoid(-800) = -800 - log(1 + e^-800) in the log
    domain (the direct form underflows to log 0), so the result is log|h| + log 800 (mpmath)."""
    from symgate._derive._stable import log_abs
    from symgate._functions import Sigmoid

    h, v = VG.symbols["h"], sympy.Symbol("v")
    e = log_abs(VG, h * sympy.log(Sigmoid(v)))
    with mpmath.workdps(50):
        want = float(mpmath.log(0.25) + mpmath.log(abs(mpmath.log(1 / (1 + mpmath.exp(800))))))
    assert _float_eval(e, {"h": 0.25, "v": -800.0}) == pytest.approx(want, rel=1e-15)


def test_cached_derivation_objects_are_immutable() -> None:
    """What the derivation caches on a cell and hands to both backends (program steps, partials,
    Jacobians, their terms and factors, companions, splits, expansions, effective learning rates)
    cannot be changed by a caller: assigning an attribute raises FrozenInstanceError."""
    import dataclasses

    from symgate._derive._jacobian import _Path
    from symgate._derive._program import program
    from symgate._derive._stable import companions

    J = sg.jacobian(VG)
    objects = [
        program(VG)[0], local_partials(VG), local_partials(VG).output(0), J, J.terms[0], J.terms[0].factors[0],
        sg.jacobian(sg.cells.lstm()), sg.parameter_jacobian(VG, "W"), companions(VG, [1 - VG.symbols["g"]])[0],
        sg.split(VG), sg.expansion(VG), sg.effective_lr(VG), _Path((), (), ()),
    ]
    for obj in objects:
        field = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)


def test_parameter_jacobian_of_a_matrix_applied_to_a_parameter_vector() -> None:
    """zb = M bv with bv a Vector parameter (values (n,), not (B, n)): d h'/d M of reparam's
    update (1 - a) h + a e phi, phi = tanh(w h + U x + M bv), equals complex-step derivatives."""
    params, x, h = _problem(reparam, 5)

    def update(p: dict) -> np.ndarray:
        a = _np_sigmoid(p["theta"])
        phi = np.tanh(p["w"] * h + x @ p["U"].T + p["M"] @ p["bv"])
        return (1 - a) * h + a * np.exp(0.3) * phi

    kern = sg.ReferenceKernel(reparam)
    for name in ("M", "bv", "theta"):
        got = kern.parameter_jacobian(params, x, h, name)
        want = _complex_step(lambda v, name=name: update({**params, name: v}), params[name])
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


# ----------------------------------------------------------------------------
# the time-indexed forms of an expansion; equality of terms; the order of a sum's terms
# ----------------------------------------------------------------------------


def test_expansion_of_the_scalar_gate_indexes_every_per_unit_quantity_by_step() -> None:
    """Appendix split of the scalar gate (paper-notes §4): A_j = (1 - g_j) I + g_j diag(1 - phi_j^2) W
    and B_i = g_i (1 - g_i) [phi_i - h_{i-1}] wg, the scalar gate g in the coefficients indexed like
    the per-unit quantities inside diag(.) and [.] (the state at the previous step), the parameters W,
    wg unindexed; F0 and L print these forms (the text str(expansion) shows, typed by hand)."""
    ex = sg.expansion(sg.cells.scalar_gate(bias=False), "appendix")
    a_text = "(1 - g[j])*I + g[j]*diag(1 - phi[j]**2)*W"
    b_text = "((1 - g[i])*g[i])*[-h[i - 1] + phi[i]]*wg"
    assert sympy.sstr(ex.A_j) == a_text and sympy.sstr(ex.B_i) == b_text
    lines = str(ex).splitlines()
    assert lines[-2] == f"  F0 = Prod[j=t..-ell + t + 1]({a_text})"
    assert lines[-1] == (f"  L  = Sum[i=-ell + t + 1..t](Prod[j=t..i + 1]({a_text})*({b_text})"
                         f"*Prod[j=i - 1..-ell + t + 1]({a_text}))")
    # no per-unit quantity is left unindexed (the coefficient's scalar gate included)
    from symgate._cell import UnitSymbol

    for e in (ex.A_j, ex.B_i):
        assert not [s for s in e.free_symbols if isinstance(s, UnitSymbol)]


def test_terms_and_factors_compare_by_their_symbolic_content() -> None:
    """Equality, hashing and repr of terms and factors are those of the chain as printed: the scalar
    gate with and without bias has the same three chains, whose stable numeric forms differ (they
    are written in the nodes' arguments, c + z_wg + z_ug vs z_wg + z_ug); a term typed from its
    symbolic fields alone equals the derived one and evaluates its coefficient as typed."""
    from symgate._derive import Factor, Term

    sgate = sg.cells.scalar_gate()
    with_b, without_b = sg.jacobian(sgate), sg.jacobian(sg.cells.scalar_gate(bias=False))
    g = sgate.symbols["g"]
    for t1, t0 in zip(with_b.terms, without_b.terms, strict=True):
        assert t1 == t0 and hash(t1) == hash(t0) and repr(t1) == repr(t0)
        for f1, f0 in zip(t1.factors, t0.factors, strict=True):
            assert f1 == f0 and hash(f1) == hash(f0) and repr(f1) == repr(f0)
    leak1, cand1 = with_b.terms[0], with_b.terms[1]
    assert leak1.numeric_coefficient != without_b.terms[0].numeric_coefficient
    assert cand1.factors[0].numeric != without_b.terms[1].factors[0].numeric
    typed = Term(1 - g, (), (), "leak", "n", "n")
    assert typed == leak1 and len({typed, leak1}) == 1 and typed.numeric_coefficient == 1 - g
    assert Factor("diag", "n", "n", cand1.factors[0].expr) == cand1.factors[0]


def test_matrix_expressions_sum_the_terms_in_their_order() -> None:
    """J.expr is the sum of the terms' matrix expressions in origin order, as str(J) lists them (the
    pretty form starts with the leak diag(1 - g), then the candidate ...W, then the gate ...Wg); a
    parameter Jacobian's expr is sum_k v_k.T (x) C_k in the order of its pieces."""
    from sympy.matrices.expressions import KroneckerProduct

    J = sg.jacobian(VG)
    assert J.expr.args == tuple(t.matexpr() for t in J.terms)
    base = J.pretty().splitlines()[1]
    assert base.startswith("diag(1 - g) + diag(g)") and base.index("\u22c5W ") < base.index("\u22c5Wg")
    pj = sg.parameter_jacobian(colmix, "U")
    x = MatrixSymbol("x", dim_symbol("m"), 1)
    assert len(pj.pieces) == 2
    assert pj.expr.args == tuple(KroneckerProduct(x.T, C.expr) for C, _ in pj.pieces)


def test_mul_chain_past_the_fold_is_one_product() -> None:
    """Up to 32 factors mul_chain is the left fold ((first*e0)*e1)*...; past 32 the rest are
    multiplied in one Mul with the fold's result (documented).  SymPy distributes a number over a sum
    in a product of two, so the two groupings print differently: with 32 factors -1*(a - b) is folded
    into b - a; with 34, (-1) then (a - b)*(a - b) in one Mul gives -(a - b)**2."""
    a, b = sympy.symbols("a b")
    ones = [sympy.S.One] * 30
    assert mul_chain(sympy.S.NegativeOne, ones + [sympy.S.One, a - b]) == b - a
    assert mul_chain(sympy.S.One, [sympy.S.NegativeOne, *ones, sympy.S.One, a - b, a - b]) == -(a - b) ** 2
    assert mul_chain(sympy.S.One, [sympy.S.NegativeOne, *ones, sympy.S.One, a - b, a - b]) != (b - a) * (a - b)


def test_a_one_term_jacobian_is_that_term() -> None:
    """With one chain, J.expr is the chain itself, not a sum of one term: the plain cell's
    dh'/dh = diag(1 - phi^2) W, the leaky cell's d+h'/dvec(W) = h.T (x) alpha diag(1 - phi^2) and
    d+h'/db = alpha diag(1 - phi^2) (typed from paper-notes' leaky and plain cells)."""
    from sympy.matrices.expressions import KroneckerProduct

    from symgate._derive import UnitDiag

    n = dim_symbol("n")
    plain = sg.cells.plain(bias=False)
    phi = plain.symbols["phi"]
    assert sg.jacobian(plain).expr == sympy.MatMul(UnitDiag(1 - phi**2, n), MatrixSymbol("W", n, n))
    leaky = sg.cells.leaky()
    alpha, phi = leaky.symbols["alpha"], leaky.symbols["phi"]
    C = sympy.MatMul(alpha, UnitDiag(1 - phi**2, n))
    assert sg.parameter_jacobian(leaky, "W").expr == KroneckerProduct(MatrixSymbol("h", n, 1).T, C)
    assert sg.parameter_jacobian(leaky, "b").expr == C


def test_exactly_max_chains_are_derived() -> None:
    """A diamond of 10 levels without the leak has 2**10 = 1024 = MAX_CHAINS chains, all through W:
    derived, one term per chain (each level reads the previous one through two nodes, so the
    number of paths doubles per level)."""
    def body(h, x, W, U):  # type: ignore[no-untyped-def]
        e = tanh(W @ h + U @ x)
        for _ in range(10):
            e = tanh(e) * sigmoid(e)
        return e

    c = sg.make_cell(body, {"h": State("n"), "x": Input("m"), "W": MatrixSpec("n", "n"), "U": MatrixSpec("n", "m")},
                     name="diamond10_noleak")
    J = sg.jacobian(c)
    assert len(J.terms) == 2**10 and all(t.matrices == ("W",) for t in J.terms)


def test_diagonal_first_order_of_the_scalar_gate_reads_per_unit_matrix_diagonals() -> None:
    """Diagonal split of the scalar gate (paper-notes §10): lambda_j = 1 - g_j and
    mu1 = prod_j (1 - g_j) sum_j r_j / (1 - g_j), r_j = g_j (1 - phi_j^2) W[q, q]
    + g_j (1 - g_j) (phi_j - h_{j-1}) wg[0, q]: the diagonals of the square W and of the row wg are
    both per-unit quantities (dimension n)."""
    from symgate._cell import UnitSymbol

    ex = sg.expansion(sg.cells.scalar_gate(bias=False), "diagonal")
    g, phi, h = (sympy.IndexedBase(k) for k in ("g", "phi", "h"))
    w_diag, wg_diag = UnitSymbol("W_diag", "n"), UnitSymbol("wg_diag", "n")
    r = g[j_] * (1 - phi[j_] ** 2) * w_diag + g[j_] * (1 - g[j_]) * (phi[j_] - h[j_ - 1]) * wg_diag
    want = sympy.Product(1 - g[j_], (j_, t_ - ell_ + 1, t_)) * sympy.Sum(r / (1 - g[j_]), (j_, t_ - ell_ + 1, t_))
    got = ex.diagonal_first_order
    assert {s for s in got.free_symbols if isinstance(s, UnitSymbol)} == {w_diag, wg_diag}
    assert sympy.simplify((got - want).doit()) == 0


@sg.cell
def gated_source(h: State("n"), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m"), v: Vector("n")):
    # the source of W is a gate-marked node whose dependence on h is weighted by the trained v
    return tanh(W @ (v * h).as_gate() + U @ x)


def test_a_weighted_hop_out_of_a_gate_marked_matrix_source_is_a_reset_path() -> None:
    """tanh(W s + U x), s = (v h) marked as a gate: the chain diag(1 - phi^2) W diag(v) enters W
    (not through a gate) and then v, from inside the cell and through the gate s: origin reset
    (module docstring: a later entry through a gate); the dense Jacobian is that chain
    (complex-step of the numpy update)."""
    J = sg.jacobian(gated_source)
    assert [t.origin for t in J.terms] == ["reset"] and J.terms[0].matrices == ("W",)
    params, x, h = _problem(gated_source, 6)
    got = sg.ReferenceKernel(gated_source).jacobian(params, x, h)
    for bb in range(B):
        want = _complex_step(lambda hh: np.tanh(params["W"] @ (params["v"] * hh) + params["U"] @ x[bb]), h[bb])
        np.testing.assert_allclose(got[bb], want, rtol=0, atol=TOL)


def test_explicit_update_of_the_leaky_cell() -> None:
    """explicit_update gives each state as an explicit column of its n entries: the leaky cell's
    (1 - alpha) h_i + alpha tanh(sum_j W_ij h_j + U_i0 x_0 + b_i), typed from paper-notes (n=2, m=1)."""
    from symgate._derive._jacobian import explicit_update

    leaky = sg.cells.leaky()
    alpha = leaky.symbols["alpha"]
    W, U, b = MatrixSymbol("W", 2, 2), MatrixSymbol("U", 2, 1), MatrixSymbol("b", 2, 1)
    h, x = MatrixSymbol("h", 2, 1), MatrixSymbol("x", 1, 1)
    want = Matrix([(1 - alpha) * h[i, 0] + alpha * sympy.tanh(W[i, 0] * h[0, 0] + W[i, 1] * h[1, 0]
                                                               + U[i, 0] * x[0, 0] + b[i, 0]) for i in range(2)])
    (got,) = explicit_update(leaky, {"n": 2, "m": 1})
    assert got.shape == (2, 1) and sympy.simplify(got - want) == sympy.zeros(2, 1)


@sg.cell
def two_widths(h: State("n"), s: State(1), x: Input("m"), W: MatrixSpec("n", "n"), U: MatrixSpec("n", "m"),
               wg: MatrixSpec(1, "n"), k: Scalar()):
    # a vector state and a scalar (one-unit) state
    return tanh(W @ h + U @ x), tanh(k * s + wg @ h)


def test_explicit_update_of_a_scalar_state_is_one_entry() -> None:
    """A one-unit state's explicit update is a 1 x 1 column, tanh(k s + sum_j wg_0j h_j), next to the
    vector state's n entries (typed by hand, n=2, m=1)."""
    from symgate._derive._jacobian import explicit_update

    k, s = two_widths.symbols["k"], two_widths.symbols["s"]
    wg, h = MatrixSymbol("wg", 1, 2), MatrixSymbol("h", 2, 1)
    got_h, got_s = explicit_update(two_widths, {"n": 2, "m": 1})
    assert got_h.shape == (2, 1)
    want = Matrix([sympy.tanh(k * s + wg[0, 0] * h[0, 0] + wg[0, 1] * h[1, 0])])
    assert got_s.shape == (1, 1) and sympy.simplify(got_s - want) == sympy.zeros(1, 1)
