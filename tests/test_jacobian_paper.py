"""Derived Jacobians against the paper's formulas (paper-notes section 2).

Every expected value in this file is typed from the paper notes with plain SymPy
matrices (or numpy), in terms of the same symbols symgate uses; nothing expected
is built with symgate's derivation.  Conventions of ``as_explicit({"n": N, ...})``:
a vector quantity ``v`` becomes the entries ``MatrixSymbol("v", N, 1)[i, 0]``, a
matrix parameter ``W`` the entries of ``MatrixSymbol("W", rows, cols)``, and a
scalar quantity (dimension 1: the scalar gate ``g``, the constant ``alpha``) stays
the symbol ``cell.symbols[name]``.

Paper notation -> symgate names: x_{t-1} -> h, u_t -> x, W_r -> W, W_i -> U,
W_rg / w_rg -> Wg / wg, W_ig / w_ig -> Ug / ug, phi(a_t) -> phi, D_t -> diag(1 - phi**2).
"""

import functools
import inspect
import random

import numpy as np
import pytest
import sympy
from sympy import Matrix, MatrixSymbol, eye, zeros
from sympy.matrices.expressions.matexpr import MatrixElement

import symgate as sg
from symgate._cell import dim_symbol
from symgate._derive import explicit_update

SIZES = [{"n": 2, "m": 1}, {"n": 3, "m": 2}]
SIZE_IDS = ["n2m1", "n3m2"]


# ----------------------------------------------------------------------------
# helpers: the paper's building blocks, typed by hand
# ----------------------------------------------------------------------------


def vec(name: str, d: int) -> Matrix:
    """Column of the entries name[i, 0] (a vector quantity made explicit)."""
    return Matrix(MatrixSymbol(name, d, 1))


def mat(name: str, r: int, c: int) -> Matrix:
    return Matrix(MatrixSymbol(name, r, c))


def diag_of(v: Matrix) -> Matrix:
    """diag(v) for a column v."""
    return sympy.diag(*list(v))


def emap(f, v: Matrix) -> Matrix:
    """Elementwise map of a column."""
    return v.applyfunc(f)


def assert_zero(A: Matrix) -> None:
    S = sympy.simplify(A)
    assert S == zeros(*A.shape), S


def paper_leaky(cell, n: int) -> list[Matrix]:
    # (a) J = (1 - alpha) I + alpha D W
    alpha = cell.symbols["alpha"]
    D = diag_of(emap(lambda p: 1 - p**2, vec("phi", n)))
    return [(1 - alpha) * eye(n), alpha * D * mat("W", n, n)]


def paper_scalar_gate(cell, n: int) -> list[Matrix]:
    # (b) J = g D W + (1 - g) I + g (1 - g) (phi - h) w_rg^T   (w_rg^T is the 1 x n matrix wg)
    g = cell.symbols["g"]
    phi, h = vec("phi", n), vec("h", n)
    D = diag_of(emap(lambda p: 1 - p**2, phi))
    return [g * D * mat("W", n, n), (1 - g) * eye(n), g * (1 - g) * (phi - h) * mat("wg", 1, n)]


def paper_vector_gate(cell, n: int) -> list[Matrix]:
    # (c) J = diag(g) D W + diag(1 - g) + diag(phi - h) diag(g (1 - g)) W_rg
    g, phi, h = vec("g", n), vec("phi", n), vec("h", n)
    D = diag_of(emap(lambda p: 1 - p**2, phi))
    return [
        diag_of(g) * D * mat("W", n, n),
        diag_of(emap(lambda s: 1 - s, g)),
        diag_of(phi - h) * diag_of(emap(lambda s: s * (1 - s), g)) * mat("Wg", n, n),
    ]


def paper_plain(cell, n: int) -> list[Matrix]:
    # (d) J = D W
    D = diag_of(emap(lambda p: 1 - p**2, vec("phi", n)))
    return [D * mat("W", n, n)]


def total(summands: list[Matrix]) -> Matrix:
    return sum(summands[1:], summands[0])


@functools.lru_cache(maxsize=None)
def cell_of(name: str):
    """The built-in cell without biases (as in the paper), built once per module."""
    return sg.cells.builtin(name, bias=False)


@functools.lru_cache(maxsize=None)
def explicit_jacobian(name: str, n: int, m: int) -> Matrix:
    return sg.jacobian(cell_of(name)).as_explicit({"n": n, "m": m})


PAPER = {
    "leaky": (functools.partial(cell_of, "leaky"), paper_leaky),
    "scalar_gate": (functools.partial(cell_of, "scalar_gate"), paper_scalar_gate),
    "vector_gate": (functools.partial(cell_of, "vector_gate"), paper_vector_gate),
    "plain": (functools.partial(cell_of, "plain"), paper_plain),
}


# ----------------------------------------------------------------------------
# state Jacobians (a)-(d)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("name", list(PAPER))
def test_state_jacobian_equals_paper_formula(name, sizes):
    factory, paper = PAPER[name]
    cell = factory()
    derived = explicit_jacobian(name, sizes["n"], sizes["m"])
    expected = total(paper(cell, sizes["n"]))
    assert derived.shape == expected.shape == (sizes["n"], sizes["n"])
    assert_zero(derived - expected)


@pytest.mark.parametrize("name", list(PAPER))
def test_every_paper_summand_is_needed(name):
    """The comparison is not vacuous: leaving out any one summand of the paper formula breaks it."""
    factory, paper = PAPER[name]
    cell = factory()
    n = 2
    derived = explicit_jacobian(name, n, 1)
    summands = paper(cell, n)
    for i in range(len(summands)):
        assert sympy.simplify(derived - total(summands) + summands[i]) != zeros(n, n), i


@pytest.mark.parametrize("name", ["scalar_gate", "vector_gate"])
def test_appendix_split_A_plus_B_matches_origins(name):
    """Paper appendix split J = A + B: A = leak + candidate terms, B = the gate-derivative term."""
    factory, _ = PAPER[name]
    cell = factory()
    n = 3
    J = sg.jacobian(cell)
    A = J.select("leak", "candidate").as_explicit({"n": n, "m": 2})
    B = J.select("gate").as_explicit({"n": n, "m": 2})
    phi, h, W = vec("phi", n), vec("h", n), mat("W", n, n)
    D = diag_of(emap(lambda p: 1 - p**2, phi))
    d = phi - h
    if name == "vector_gate":
        g = vec("g", n)
        A_paper = diag_of(emap(lambda s: 1 - s, g)) + diag_of(g) * D * W
        B_paper = diag_of(d) * diag_of(emap(lambda s: s * (1 - s), g)) * mat("Wg", n, n)
    else:  # scalar gate: J^g = sbar 1 w_rg^T, sbar = g (1 - g)
        g = cell.symbols["g"]
        A_paper = (1 - g) * eye(n) + g * D * W
        B_paper = diag_of(d) * (g * (1 - g)) * Matrix.ones(n, 1) * mat("wg", 1, n)
    assert_zero(A - A_paper)
    assert_zero(B - B_paper)


@pytest.mark.parametrize("name", ["scalar_gate", "vector_gate"])
def test_follow_up_per_neuron_diagonal(name):
    """Follow-up's per-neuron diagonal: (1 - s_q) + s_q phi'_q W_qq + (phi_q - h_q) s'_q (U_s)_qq."""
    factory, _ = PAPER[name]
    cell = factory()
    n = 3
    J = explicit_jacobian(name, n, 2)
    phi, h, W = vec("phi", n), vec("h", n), mat("W", n, n)
    for q in range(n):
        if name == "vector_gate":
            s = vec("g", n)[q]
            us_qq = mat("Wg", n, n)[q, q]
        else:
            s = cell.symbols["g"]
            us_qq = mat("wg", 1, n)[0, q]
        expected = (1 - s) + s * (1 - phi[q] ** 2) * W[q, q] + (phi[q] - h[q]) * s * (1 - s) * us_qq
        assert sympy.expand(J[q, q] - expected) == 0


def test_gru_diagonal_vs_follow_up_rdiag():
    """The follow-up's GRU rdiag keeps only the k = q term of the reset path.

    Paper notes: diag(J)_q = (1 - z) + (g - h) z' Uz_qq + z g' Uh_qq (r + h r' Ur_qq).
    The exact diagonal of the reset path is sum_k z_q g'_q Uh[q, k] h_k r'_k Ur[k, q];
    symgate's exact Jacobian must equal the notes' formula plus the k != q terms.
    (symgate names: candidate g -> cand, U_z/U_h/U_r -> Wz/Wn/Wr.)
    """
    n = 2
    J = explicit_jacobian("gru", n, 1)
    z, r, cand, h = vec("z", n), vec("r", n), vec("cand", n), vec("h", n)
    Wz, Wr, Wn = mat("Wz", n, n), mat("Wr", n, n), mat("Wn", n, n)
    for q in range(n):
        zp, gp = z[q] * (1 - z[q]), 1 - cand[q] ** 2
        notes = (1 - z[q]) + (cand[q] - h[q]) * zp * Wz[q, q] + z[q] * gp * Wn[q, q] * (
            r[q] + h[q] * r[q] * (1 - r[q]) * Wr[q, q]
        )
        off = sum(z[q] * gp * Wn[q, k] * h[k] * r[k] * (1 - r[k]) * Wr[k, q] for k in range(n) if k != q)
        assert sympy.expand(J[q, q] - notes - off) == 0
        assert sympy.expand(J[q, q] - notes) != 0  # the notes' rdiag is not the exact diagonal


# ----------------------------------------------------------------------------
# immediate parameter Jacobians
# ----------------------------------------------------------------------------


def explicit_param_jacobian(cell, param: str, n: int, m: int) -> Matrix:
    nn, mm = dim_symbol("n"), dim_symbol("m")
    return Matrix(sg.parameter_jacobian(cell, param).expr.subs({nn: n, mm: m}).as_explicit())


def vec_index(j: int, k: int, rows: int) -> int:
    """Column of entry (j, k) in vec(M): vec stacks the columns (d/dvec(M) = v^T kron C)."""
    return k * rows + j


@pytest.mark.parametrize("param", ["W", "U", "Wg", "Ug"])
def test_vector_gate_parameter_jacobian_entries(param):
    cell = sg.cells.vector_gate(bias=False)
    n, m = 3, 2
    PJ = explicit_param_jacobian(cell, param, n, m)
    g, phi, h, x = vec("g", n), vec("phi", n), vec("h", n), vec("x", m)
    src = {"W": h, "U": x, "Wg": h, "Ug": x}[param]
    cols = len(src)
    assert PJ.shape == (n, n * cols)
    for i in range(n):
        if param in ("W", "U"):  # g_i phi'(a_i) v_k
            coeff = g[i] * (1 - phi[i] ** 2)
        else:  # (phi_i - h_i) sigma'_i v_k
            coeff = (phi[i] - h[i]) * g[i] * (1 - g[i])
        for j in range(n):
            for k in range(cols):
                expected = coeff * src[k] if i == j else 0
                assert sympy.expand(PJ[i, vec_index(j, k, n)] - expected) == 0, (i, j, k)


@pytest.mark.parametrize("param", ["W", "U", "wg", "ug"])
def test_scalar_gate_parameter_jacobian_entries(param):
    cell = sg.cells.scalar_gate(bias=False)
    n, m = 3, 2
    PJ = explicit_param_jacobian(cell, param, n, m)
    g = cell.symbols["g"]
    phi, h, x = vec("phi", n), vec("h", n), vec("x", m)
    src = {"W": h, "U": x, "wg": h, "ug": x}[param]
    cols = len(src)
    rows = n if param in ("W", "U") else 1
    assert PJ.shape == (n, rows * cols)
    for i in range(n):
        for j in range(rows):
            for k in range(cols):
                if param in ("W", "U"):
                    expected = g * (1 - phi[i] ** 2) * src[k] if i == j else 0
                else:  # every state coordinate depends on every entry of w_rg: sigma'(z) (phi - h) v^T
                    expected = g * (1 - g) * (phi[i] - h[i]) * src[k]
                assert sympy.expand(PJ[i, vec_index(j, k, rows)] - expected) == 0, (i, j, k)


@pytest.mark.parametrize("param", ["W", "U"])
def test_leaky_parameter_jacobian_entries(param):
    cell = sg.cells.leaky(bias=False)
    n, m = 3, 2
    PJ = explicit_param_jacobian(cell, param, n, m)
    alpha = cell.symbols["alpha"]
    phi = vec("phi", n)
    src = vec("h", n) if param == "W" else vec("x", m)
    for i in range(n):
        for j in range(n):
            for k in range(len(src)):
                expected = alpha * (1 - phi[i] ** 2) * src[k] if i == j else 0
                assert sympy.expand(PJ[i, vec_index(j, k, n)] - expected) == 0


def _np_sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


NUMERIC_CASES = [("vector_gate", "W"), ("vector_gate", "Wg"), ("vector_gate", "Ug"),
                 ("scalar_gate", "wg"), ("scalar_gate", "U"), ("leaky", "W")]


@pytest.mark.parametrize("name,param", NUMERIC_CASES, ids=[f"{a}-{b}" for a, b in NUMERIC_CASES])
def test_parameter_jacobian_numeric_vs_paper_and_finite_differences(name, param):
    """Kernel's dense immediate parameter Jacobian vs the paper formula (numpy) and central differences."""
    cell = PAPER[name][0]()
    n, m, B = 3, 2, 2
    rng = np.random.default_rng(7)
    params = {}
    for p in cell.params:
        shape = tuple({"n": n, "m": m, 1: 1}[d] for d in p.shape)
        params[p.name] = 0.6 * rng.standard_normal(shape)
    x = rng.standard_normal((B, m))
    h = rng.standard_normal((B, n))
    kern = sg.reference_kernel(cell, "float64")
    dense = kern.parameter_jacobian(params, x, h, param)  # (B, n, *shape)

    # the paper's formula, in numpy
    W, U = params["W"], params["U"]
    phi = np.tanh(h @ W.T + x @ U.T)
    if name == "vector_gate":
        g = _np_sigmoid(h @ params["Wg"].T + x @ params["Ug"].T)
    elif name == "scalar_gate":
        g = _np_sigmoid(h @ params["wg"].T + x @ params["ug"].T)  # (B, 1)
    else:
        g = np.full((B, 1), cell.constants["alpha"])
    src = h if param in ("W", "Wg", "wg") else x
    if param in ("W", "U"):
        rowfac = g * (1 - phi**2)  # (B, n)
    else:
        rowfac = (phi - h) * g * (1 - g)
    rows = params[param].shape[0]
    expected = np.zeros((B, n) + params[param].shape)
    for i in range(n):
        if rows == 1:  # scalar gate: every coordinate depends on the single row
            expected[:, i, 0, :] = rowfac[:, i, None] * src
        else:
            expected[:, i, i, :] = rowfac[:, i, None] * src
    np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=1e-13)

    # central differences of one step of the forward pass
    eps = 1e-6
    fd = np.zeros_like(expected)
    for idx in np.ndindex(*params[param].shape):
        hs = []
        for sgn in (1.0, -1.0):
            pp = {k: v.copy() for k, v in params.items()}
            pp[param][idx] += sgn * eps
            hs.append(kern.forward(pp, np.ascontiguousarray(x[None]), h).h[0])
        fd[(slice(None), slice(None)) + idx] = (hs[0] - hs[1]) / (2 * eps)
    np.testing.assert_allclose(dense, fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# all seven built-ins: structured Jacobian vs brute force on the explicit update
# ----------------------------------------------------------------------------

#: sizes for the brute-force check; the multi-path gated cells at the smallest size
#: that still has off-diagonal entries (inline explicit forms grow fast with n).
BRUTE_SIZES = {
    "plain": {"n": 3, "m": 2},
    "leaky": {"n": 3, "m": 2},
    "scalar_gate": {"n": 3, "m": 2},
    "vector_gate": {"n": 2, "m": 2},
    "gru": {"n": 2, "m": 1},
    "lstm": {"n": 2, "m": 1},
    "mgu": {"n": 2, "m": 1},
}


def leaf_atoms(A: Matrix) -> set:
    """Every free scalar of an explicit matrix: matrix entries and scalar symbols."""
    return set(A.atoms(MatrixElement)) | set(A.atoms(sympy.Symbol))


def random_point(atoms, seed: int) -> dict:
    rng = random.Random(seed)
    out = {}
    for a in sorted(atoms, key=sympy.default_sort_key):
        num = 0
        while num == 0:
            num = rng.randint(-97, 97)
        out[a] = sympy.Rational(num, 101)
    return out


#: Both sides are evaluated with 30 significant digits from the same exact rational
#: point; entries are O(1) (|entry| < 10), so each side carries a rounding error below
#: ~1e-28.  A genuine formula error changes an entry by an amount of the order of the
#: random inputs (>= 1e-2), so 1e-25 separates the two by many orders of magnitude.
TOL = sympy.Float("1e-25", 30)


def max_abs(A: Matrix):
    return max(abs(v) for v in A)


def brute_force_blocks(cell, sizes):
    updates = explicit_update(cell, sizes)
    out = {}
    for i, s_out in enumerate(cell.states):
        for s_in in cell.states:
            state_vec = Matrix(MatrixSymbol(s_in.name, sizes[s_in.dim], 1))
            out[(s_out.name, s_in.name)] = updates[i].jacobian(state_vec)
    return out


@pytest.mark.parametrize("name", list(sg.cells.BUILTIN))
def test_structured_jacobian_equals_brute_force(name):
    cell = cell_of(name)
    sizes = BRUTE_SIZES[name]
    brute = brute_force_blocks(cell, sizes)
    assert len(brute) == len(cell.states) ** 2
    for (of, wrt), BF in brute.items():
        derived = sg.jacobian(cell, of, wrt).as_explicit(sizes, inline=True, cell=cell)
        assert derived.shape == BF.shape
        # inlined: only leaves remain (no node entries such as phi[i, 0])
        node_names = {nd.name for nd in cell.nodes}
        assert not {a for a in derived.atoms(MatrixElement) if str(a.parent.name) in node_names}
        assert not {a for a in derived.atoms(sympy.Symbol) if a.name in node_names}
        point = random_point(leaf_atoms(derived) | leaf_atoms(BF), seed=list(sg.cells.BUILTIN).index(name))
        d = derived.xreplace(point).evalf(30)
        b = BF.xreplace(point).evalf(30)
        assert max_abs(d - b) < TOL, (of, wrt, d - b)
        assert max_abs(b) > 1e-2  # the block is not trivially zero at this point


def test_brute_force_comparison_detects_each_gru_term():
    """Every GRU term (incl. the reset path) contributes: omitting any one breaks the equality."""
    from symgate._derive import explicit_node_values

    cell = cell_of("gru")
    sizes = BRUTE_SIZES["gru"]
    BF = brute_force_blocks(cell, sizes)[("h", "h")]
    point = random_point(leaf_atoms(BF), seed=3)
    # node entries (z[i, 0], cand[i, 0], ...) evaluated at the same point
    nodes = {k: v.xreplace(point).evalf(30) for k, v in explicit_node_values(cell, sizes).items()}
    dsub = {dim_symbol(k): v for k, v in sizes.items()}
    parts = {}
    for t in sg.jacobian(cell).terms:
        P = Matrix(t.matexpr().subs(dsub).as_explicit()).xreplace(nodes).xreplace(point)
        parts[t.origin] = P.evalf(30)
    assert set(parts) == {"leak", "candidate", "gate", "reset"}
    bf = BF.xreplace(point).evalf(30)
    total = sum(parts.values(), zeros(*BF.shape))
    assert max_abs(total - bf) < TOL
    for origin, P in parts.items():
        assert max_abs(total - P - bf) > 1e-4, origin


# ----------------------------------------------------------------------------
# origins
# ----------------------------------------------------------------------------


def test_origins_leaky():
    J = sg.jacobian(sg.cells.leaky(bias=False))
    assert J.origins == ("leak", "candidate")
    assert [t.origin for t in J.terms] == ["leak", "candidate"]
    assert [t.matrices for t in J.terms] == [(), ("W",)]


def test_origins_plain():
    J = sg.jacobian(sg.cells.plain(bias=False))
    assert J.origins == ("candidate",)


@pytest.mark.parametrize("name,gate_matrix", [("vector_gate", "Wg"), ("scalar_gate", "wg")])
def test_origins_gated(name, gate_matrix):
    J = sg.jacobian(PAPER[name][0]())
    assert J.origins == ("leak", "candidate", "gate")
    by_origin = {t.origin: t for t in J.terms}
    assert len(by_origin) == len(J.terms) == 3
    assert by_origin["leak"].matrices == ()
    assert by_origin["leak"].is_diagonal
    assert by_origin["candidate"].matrices == ("W",)
    assert by_origin["gate"].matrices == (gate_matrix,)


def test_gru_reset_term_passes_through_Wn_then_Wr():
    J = sg.jacobian(sg.cells.gru(bias=False))
    assert J.origins == ("leak", "candidate", "gate", "reset")
    reset = [t for t in J.terms if t.origin == "reset"]
    assert len(reset) == 1
    assert reset[0].matrices == ("Wn", "Wr")
    assert "r" in reset[0].path and "cand" in reset[0].path
    gate = [t for t in J.terms if t.origin == "gate"]
    assert [t.matrices for t in gate] == [("Wz",)]


def test_mgu_reset_term_passes_through_Wn_then_Wf():
    J = sg.jacobian(sg.cells.mgu(bias=False))
    assert J.origins == ("leak", "candidate", "gate", "reset")
    assert [t.matrices for t in J.terms if t.origin == "reset"] == [("Wn", "Wf")]


def test_lstm_blocks_and_origins():
    cell = sg.cells.lstm(bias=False)
    BJ = sg.jacobian(cell)
    assert BJ.states == ("h", "c")
    assert set(BJ.blocks) == {("h", "h"), ("h", "c"), ("c", "h"), ("c", "c")}
    assert sg.jacobian(cell, "c", "c").origins == ("leak",)
    assert sg.jacobian(cell, "h", "c").origins == ("leak",)
    assert sg.jacobian(cell, "c", "h").origins == ("candidate", "gate")
    assert sorted(t.matrices for t in sg.jacobian(cell, "h", "h").terms) == [("Wc",), ("Wf",), ("Wi",), ("Wo",)]
    # the c -> c block is diag(f): the forget gate, typed from the paper (c_t = f c_{t-1} + i g)
    D = sg.jacobian(cell, "c", "c").as_explicit({"n": 3, "m": 2})
    assert D == diag_of(vec("f", 3))


# ----------------------------------------------------------------------------
# the derivation is symbolic in n
# ----------------------------------------------------------------------------


def test_jacobian_takes_no_size():
    assert list(inspect.signature(sg.jacobian).parameters) == ["cell", "of", "wrt"]


@pytest.mark.parametrize("name", list(sg.cells.BUILTIN))
def test_derivation_is_symbolic_in_n(name):
    cell = sg.cells.builtin(name, bias=False)
    n = dim_symbol("n")
    J = sg.jacobian(cell)
    assert sg.jacobian(cell) is J  # derived once, reused for every size
    blocks = J.blocks.values() if isinstance(J, sg._derive.BlockJacobian) else [J]
    for blk in blocks:
        assert blk.expr.shape == (n, n)
        assert n in blk.expr.free_symbols
        # no explicit n x n scalar entries anywhere: only matrix symbols and diag/column factors
        assert not blk.expr.atoms(MatrixElement)
        for t in blk.terms:
            assert all(f.kind in ("diag", "col", "matrix") for f in t.factors)


def test_same_derivation_serves_every_n():
    cell = cell_of("vector_gate")
    J = sg.jacobian(cell)
    expr_before = J.expr
    for n in (2, 3):
        # entries are polynomials in the symbols: expand decides equality exactly
        diff = J.as_explicit({"n": n, "m": 1}) - total(paper_vector_gate(cell, n))
        assert diff.shape == (n, n)
        assert diff.applyfunc(sympy.expand) == zeros(n, n)
    assert sg.jacobian(cell) is J
    assert J.expr is expr_before
    assert J.expr.shape == (dim_symbol("n"), dim_symbol("n"))
    # a freshly traced copy of the cell derives the same (structurally equal) expression
    assert sg.jacobian(sg.cells.vector_gate(bias=False)).expr == J.expr


# ----------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------


def test_printing_leaky():
    J = sg.jacobian(sg.cells.leaky(bias=False))
    s = str(J)
    assert s.startswith("dh'/dh = ")
    assert "(1 - alpha)*I" in s
    assert "alpha*diag(1 - phi**2)*W" in s
    tex = J.latex()
    assert tex.startswith(r"\frac{\partial h'}{\partial h} = ")
    assert r"\left(1 - \alpha\right) \mathbb{I}" in tex
    assert r"\operatorname{diag}\left(1 - \phi^{2}\right) W" in tex
    tex2 = sympy.latex(J.expr)
    assert r"\operatorname{diag}\left(1 - \phi^{2}\right)" in tex2 and r"\alpha" in tex2
    pretty = J.pretty()
    assert "diag" in pretty and "α" in pretty and "φ" in pretty
    assert J._repr_latex_() == "$" + tex + "$"


def test_printing_vector_gate_and_lstm():
    J = sg.jacobian(sg.cells.vector_gate(bias=False))
    s = str(J)
    assert "diag(1 - g)" in s
    assert "diag(g)*diag(1 - phi**2)*W" in s
    assert "diag(-h + phi)*diag(g*(1 - g))*Wg" in s
    assert "[gate     ]" in J.describe()
    BJ = sg.jacobian(sg.cells.lstm(bias=False))
    text = str(BJ)
    for block in ("dh'/dh = ", "dh'/dc = ", "dc'/dh = ", "dc'/dc = diag(f)"):
        assert block in text
    assert BJ.latex().count(r"\frac{\partial") == 4
    assert r"\operatorname{diag}" in sympy.latex(BJ.expr)
