"""The analogies of paper-notes section 6 / decision 6 as checked statements.

(a) schedule: at zeroth order in the coupling the BPTT gradient is a lag-weighted sum
    (weights alpha*(1-alpha)**ell for the leaky cell); the first-order correction is the
    eps-derivative of the gradient with the coupling scaled by eps; at eps = 1 it is BPTT.
(b) momentum: without coupling, BPTT *is* a heavy-ball buffer over per-step gradients
    with beta_t = lambda_t (1 - alpha for the leaky cell, data-dependent for gates).
(c) Adam: gate profiles and Adam's preconditioner compared by the anisotropy metrics,
    which are checked against their definitions here.

Each statement is checked on built-in and random cells (Hypothesis), in a fast and a
thorough tier, against quantities computed here from dense one-step Jacobians of the
reference kernel and from definitions typed in this file.

Rounding model (as in test_theory.py): U = 2**-52; a value formed by <= p roundings of
products and sums has error <= ~p*U times the *sum of absolute values* of what is
summed, so every tolerance is stated against such an absolute-value scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import symgate as sg
from symgate._derive._expansion import eligible_parameters
from symgate.testing import all_recipes, draw_problem

U = float(np.finfo(np.float64).eps)
TIERS = ["fast", pytest.param("thorough", marks=pytest.mark.slow)]
FAMILIES = ["builtin", "random"]
SIZES = {
    "fast": dict(max_n=4, max_m=2, max_B=2, max_T=6),
    "thorough": dict(max_n=6, max_m=3, max_B=3, max_T=8),
}
RECIPES = {r.name: r for r in all_recipes()}

#: worst values seen in this session (read by the maintainers' stats script; harmless otherwise)
WORST: dict[str, float] = {}


def record(key: str, value: float) -> None:
    if key not in WORST or value > WORST[key]:
        WORST[key] = float(value)


# ----------------------------------------------------------------------------
# strategies and helpers
# ----------------------------------------------------------------------------


def cell_strategy(family: str) -> st.SearchStrategy[sg.Cell]:
    return sg.testing.builtin_cells() if family == "builtin" else sg.testing.random_cells()


@st.composite
def problem_st(draw, family: str, tier: str, *, min_T: int = 1, min_n: int = 1, cells=None):
    b = SIZES[tier]
    c = draw(cells if cells is not None else cell_strategy(family))
    n = draw(st.integers(min_n, max(min_n, b["max_n"])))
    m = draw(st.integers(1, b["max_m"]))
    B = draw(st.integers(1, b["max_B"]))
    T = draw(st.integers(min_T, b["max_T"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rho = draw(st.floats(0.3, 1.2))
    prob = draw_problem(c, seed, n=n, m=m, B=B, T=T, rho=rho)
    note(prob.describe() + f" rho={rho:.3f}")
    return prob


def eligible(cell: sg.Cell) -> list[str]:
    """Parameters with a per-neuron write gain, including the scalar gate's shared-row (1, d)
    parameters wg, ug (momentum/schedule failed on them before 6e91179, see
    ``test_row_vector_gate_parameters``); [] when there is none."""
    try:
        return list(eligible_parameters(cell))
    except sg.CellSpecError:  # e.g. exp_tanh random cells without a qualifying gate parameter
        return []


def leak_is_data_dependent(cell: sg.Cell) -> bool:
    """From the cell's construction (not from symgate's derivation): the retention depends on
    the input when it is built from an input-driven gate."""
    rec = RECIPES.get(cell.name)
    if rec is None:
        return cell.name in ("scalar_gate", "vector_gate", "gru", "mgu", "lstm")
    return rec.gate in ("scalar", "vector", "logdomain") or rec.out_gate


def const_write_gain(cell: sg.Cell) -> float | None:
    """The constant write gain w of W when mu = w * (1 - alpha)**ell (leaky cell and constant-rate
    random cells), typed from the update rule; None otherwise.

    convex ``(1-a) h + a*phi``: w = a; additive ``(1-a) h + phi``: w = 1; a logistic candidate
    ``2*sigmoid - 1`` carries its factor 2 into w.  Excluded: output gates (retention
    o(1-a) + 1 - o) and the additive two-state form (retention state h, w contains o)."""
    if cell.name == "leaky":
        return cell.constants["alpha"]
    rec = RECIPES.get(cell.name)
    if rec is None or rec.gate != "const" or rec.out_gate or (rec.two_state and rec.form == "additive"):
        return None
    if rec.activation == "exp_tanh":
        return None
    a = cell.constants["alpha"]
    w = a if (rec.form == "convex" or rec.two_state) else 1.0
    return 2 * w if rec.activation == "logistic" else w


def dense_steps(cell: sg.Cell, params, x, h0, param: str, state: str):
    """Dense one-step state Jacobians J[s] (B, N, N) and immediate parameter Jacobians C[s]
    (B, n, *shape) of steps s + 1, from the reference kernel, and the state's block."""
    k = sg.reference_kernel(cell)
    traj = k.forward(params, x, h0)
    J, C = [], []
    for s in range(x.shape[0]):
        prev = {nm: (traj.h0[nm] if s == 0 else traj.states[nm][s - 1]) for nm in cell.state_names}
        J.append(k.jacobian(params, x[s], prev))
        C.append(k.parameter_jacobian(params, x[s], prev, param, of=state))
    names = cell.state_names
    off = sum(traj.states[s].shape[-1] for s in names[: names.index(state)])
    return J, C, slice(off, off + traj.states[state].shape[-1])


def gradient_coefficients(A, B, C, cot, block):
    r"""Coefficients ``G_p`` of :math:`G(\varepsilon)=\sum_t\sum_{k\le t}\delta_t^\top
    \prod_{j=k+1}^{t}(A_j+\varepsilon B_j)\,C_k` (chain-rule order), and their absolute-value
    scales ``S_p`` (the same with |.| everywhere).  Typed from the definition: for each t the
    window grows to the right (earlier steps), ``P_p <- P_p A_k + P_{p-1} B_k``."""
    T = cot.shape[0]
    N = A.shape[-1]
    shape = C[0].shape[2:]
    G = np.zeros((T,) + shape)
    S = np.zeros((T,) + shape)
    for t in range(1, T + 1):
        P = np.zeros((T, A.shape[1], N, N))
        Pa = np.zeros_like(P)
        P[0] = Pa[0] = np.eye(N)
        for k in range(t, 0, -1):  # window steps k+1..t
            if k < t:  # extend by the factor of step k + 1 (array index k)
                newP, newPa = np.zeros_like(P), np.zeros_like(Pa)
                newP[0], newPa[0] = P[0] @ A[k], Pa[0] @ np.abs(A[k])
                for p in range(1, t - k + 1):
                    newP[p] = P[p] @ A[k] + P[p - 1] @ B[k]
                    newPa[p] = Pa[p] @ np.abs(A[k]) + Pa[p - 1] @ np.abs(B[k])
                P, Pa = newP, newPa
            for p in range(0, t - k + 1):
                row = np.einsum("bi,bij->bj", cot[t - 1], P[p][:, block, block])
                G[p] += np.einsum("bj,bj...->...", row, C[k - 1])
                rowa = np.einsum("bi,bij->bj", np.abs(cot[t - 1]), Pa[p][:, block, block])
                S[p] += np.einsum("bj,bj...->...", rowa, np.abs(C[k - 1]))
    return G, S


# ----------------------------------------------------------------------------
# (b) momentum
# ----------------------------------------------------------------------------


def _one_state_with_param(c: sg.Cell) -> bool:
    return len(c.states) == 1 and bool(eligible(c))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_momentum_identity_without_coupling(tier: str, family: str, data) -> None:
    """One-state cells with an eligible parameter (momentum() is stated for one-state cells;
    excluded: two-state cells and random cells without an eligible parameter)."""
    prob = data.draw(problem_st(family, tier, cells=cell_strategy(family).filter(_one_state_with_param)))
    cell = prob.cell
    param = data.draw(st.sampled_from(eligible(cell)), label="param")
    pd = sg.decoupled(cell, prob.params)
    loss = prob.loss("step")
    mst = sg.analogies.momentum(cell, pd, prob.x, prob.h0, loss=loss, param=param)
    assert mst.coupling == 0.0

    # the heavy-ball buffer typed here: m_t = beta_t * m_{t-1} + g_t, grad = sum_t <delta_t, m_t>,
    # with beta_t the diagonal of the (diagonal) dense Jacobian and g_t the immediate Jacobian rows
    state = cell.state_names[0]
    J, C, block = dense_steps(cell, pd, prob.x, prob.h0, param, state)
    traj = sg.reference_kernel(cell).forward(pd, prob.x, prob.h0)
    delta = loss.evaluate(traj.states[state])[1]
    T, Bsz = prob.T, prob.B
    extra = (None,) * (C[0].ndim - 2)
    m = np.zeros_like(C[0])
    ma = np.zeros_like(C[0])
    total = np.zeros(C[0].shape[2:])
    scale = np.zeros_like(total)
    for s in range(T):
        Js = J[s][:, block, block]
        beta = np.diagonal(Js, axis1=1, axis2=2)
        assert not np.any(Js - np.einsum("bi,ij->bij", beta, np.eye(beta.shape[-1]))), "J is not diagonal"
        np.testing.assert_allclose(mst.beta[s], beta, rtol=4 * U, atol=4 * U)
        m = beta[(...,) + extra] * m + C[s]
        ma = np.abs(beta)[(...,) + extra] * ma + np.abs(C[s])
        total += np.einsum("bi,bi...->...", delta[s], m)
        scale += np.einsum("bi,bi...->...", np.abs(delta[s]), ma)
    # three evaluations of sum_t sum_b sum_i delta * (sum_k prod beta * g): reverse sweep (bptt),
    # the library's buffer and this one; each within ~(2T + B*n)*U*scale of the exact value
    tol = 64 * (T + 1) * U * scale
    assert np.all(np.abs(mst.bptt - mst.momentum) <= tol), float(np.max(np.abs(mst.bptt - mst.momentum) / np.maximum(tol, 1e-300)))
    assert np.all(np.abs(total - mst.bptt) <= tol)
    record("momentum: |bptt - momentum| / (U*scale)", float(np.max(np.abs(mst.bptt - mst.momentum) / np.maximum(U * scale, 1e-300))))

    # beta: constant 1 - alpha for constant-rate cells, data-dependent for input-driven gates
    w = const_write_gain(cell)
    if w is not None:
        a = cell.constants["alpha"]
        assert np.all(mst.beta == 1 - a)
    if leak_is_data_dependent(cell) and T * Bsz >= 2:
        assert np.ptp(mst.beta) > 0, "a gate's beta should vary with the data"
    elif not leak_is_data_dependent(cell):
        assert np.ptp(mst.beta) == 0


def test_momentum_leaky_beta_is_one_minus_alpha() -> None:
    for alpha in (0.1, 0.3, 0.8):
        cell = sg.cells.leaky(alpha)
        prob = draw_problem(cell, 1, n=3, m=2, B=2, T=6)
        mst = sg.analogies.momentum(cell, sg.decoupled(cell, prob.params), prob.x, prob.h0, loss=prob.loss("last"))
        a = cell.constants["alpha"]
        assert mst.beta.shape == (6, 2, 3) and np.all(mst.beta == 1 - a)
        np.testing.assert_allclose(mst.momentum, mst.bptt, rtol=1e-13, atol=1e-16)


def test_momentum_gate_beta_varies_with_the_data() -> None:
    cell = sg.cells.vector_gate()
    prob = draw_problem(cell, 2, n=3, m=2, B=2, T=6)
    pd = sg.decoupled(cell, prob.params)
    mst = sg.analogies.momentum(cell, pd, prob.x, prob.h0, loss=prob.loss("step"))
    # beta_t = 1 - sigmoid(Ug x_t + c) (W_g = 0 after decoupling), typed here
    g = 1 / (1 + np.exp(-(prob.x @ pd["Ug"].T + pd["c"])))
    np.testing.assert_allclose(mst.beta, 1 - g, rtol=8 * U, atol=8 * U)
    assert np.ptp(mst.beta) > 0.05
    other = sg.analogies.momentum(cell, pd, prob.x[::-1].copy(), prob.h0, loss=prob.loss("step"))
    assert not np.allclose(other.beta, mst.beta)  # different data, different momentum coefficients


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_momentum_raises_with_coupling(tier: str, family: str, data) -> None:
    prob = data.draw(problem_st(family, tier, cells=cell_strategy(family).filter(_one_state_with_param)))
    cell = prob.cell
    with pytest.raises(sg.ConfigError, match="not diagonal"):
        sg.analogies.momentum(cell, prob.params, prob.x, prob.h0, loss=prob.loss("step"))
    # without the requirement it reports the coupling and both sides (which then differ)
    mst = sg.analogies.momentum(cell, prob.params, prob.x, prob.h0, loss=prob.loss("step"), require_exact=False)
    assert mst.coupling > 0


@pytest.mark.parametrize("which", ["momentum", "schedule"])
def test_row_vector_gate_parameters(which: str) -> None:
    """Regression test: before 6e91179 momentum() and schedule() assumed the parameter's rows are
    the state's neurons and failed (ValueError) on the scalar gate's shared-row wg (1, n)."""
    cell = sg.testing.cached_builtin("scalar_gate")
    prob = draw_problem(cell, 0, n=3, m=2, B=2, T=4)
    if which == "momentum":
        mst = sg.analogies.momentum(cell, sg.decoupled(cell, prob.params), prob.x, prob.h0, loss=prob.loss("step"), param="wg")
        np.testing.assert_allclose(mst.momentum, mst.bptt, rtol=1e-12)
    else:
        stt = sg.analogies.schedule(cell, prob.params, prob.x, prob.h0, loss=prob.loss("step"), param="wg")
        np.testing.assert_allclose(stt.lag_weighted_sum, stt.zeroth_order_gradient, rtol=1e-12)


# ----------------------------------------------------------------------------
# (a) schedule
# ----------------------------------------------------------------------------


def _has_param(c: sg.Cell) -> bool:
    return bool(eligible(c))


def _window(c: np.ndarray, a: np.ndarray, gamma: float, delta: float = 0.01):
    """eps window for a polynomial remainder sum_{p>=2} eps^p G_p (see test_theory.eps_window):
    higher orders <= delta (1 %) at the top, rounding <= 0.1 % at the bottom, >= 1 decade."""
    deg = len(c) - 1
    ps = next((p for p in range(2, deg + 1) if c[p] > 1e3 * gamma * a[p]), None)
    if ps is None:
        return None, None
    hi = 1.0
    for p in range(ps + 1, deg + 1):
        if c[p] > 0:
            hi = min(hi, (delta / deg * c[ps] / c[p]) ** (1.0 / (p - ps)))
    scan = np.geomspace(1e-14, hi, 400)
    ok = np.array([e**ps * c[ps] >= 1e3 * gamma * sum(e**p * a[p] for p in range(deg + 1)) for e in scan])
    if not ok[-1]:
        return ps, None
    lo = float(scan[0] if ok.all() else scan[len(ok) - int(np.argmin(ok[::-1]))])
    lo = max(lo, hi / 100)
    return (ps, np.geomspace(lo, hi, 5)) if hi / lo >= 10 else (ps, None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_schedule_statement(tier: str, family: str, data) -> None:
    """Zeroth order == lag-weighted sum; first order == d/deps of the gradient; eps = 1 == BPTT;
    remainder O(eps^2).  Excluded: random cells without an eligible parameter; the comparison with the reference kernel's BPTT is for one-state cells (for
    two-state cells the statement transports only the retention state's block)."""
    prob = data.draw(problem_st(family, tier, min_T=3, cells=cell_strategy(family).filter(_has_param)))
    cell = prob.cell
    param = data.draw(st.sampled_from(eligible(cell)), label="param")
    state = sg.effective_lr(cell, param).state
    T = prob.T
    if state == cell.state_names[0]:
        stt = sg.analogies.schedule(cell, prob.params, prob.x, prob.h0, loss=prob.loss("step"), param=param)
    else:  # the loss reads h; pass the retention state's cotangents directly
        cot = np.random.default_rng(prob.seed).standard_normal((T, prob.B, prob.h0[state].shape[-1]))
        stt = sg.analogies.schedule(cell, prob.params, prob.x, prob.h0, cotangents=cot, param=param)
    cot = stt.cotangents
    jp = stt.products  # split "coupling": A = the leak, B = the rest
    G, S = gradient_coefficients(jp.A, jp.B, stt.immediate, cot, stt.block)
    N = jp.A.shape[-1]
    # one evaluation of G(eps) or of a coefficient: products of <= T-1 factors (N-term inner
    # products), contracted with delta and C (n- and B-term sums), summed over <= T^2 windows
    gamma = 4 * (T * (N + 2) + T * T) * U

    # zeroth order: the library's backward recursion, its lag-weighted mu sum, and G_0 typed here
    tol0 = 64 * (T + 1) * U * S[0]
    assert np.all(np.abs(stt.zeroth_order_gradient - stt.lag_weighted_sum) <= tol0)
    assert np.all(np.abs(stt.zeroth_order_gradient - G[0]) <= tol0)
    assert np.all(np.abs(stt.gradient_at(0.0) - G[0]) <= gamma * S[0])
    record("schedule: |zeroth - lag_weighted_sum| / (U*S0)",
           float(np.max(np.abs(stt.zeroth_order_gradient - stt.lag_weighted_sum) / np.maximum(U * S[0], 1e-300))))
    # first order: the library's prefix/suffix sum == coefficient G_1
    assert np.all(np.abs(stt.first_order_correction - G[1]) <= gamma * S[1])

    # central difference of gradient_at at 0: truncation sum_{odd p>=3} h^(p-1) |G_p| (G is a
    # polynomial in eps), rounding gamma * sum_p h^p S_p / h (the O(U/h) term) + gamma*S_1
    h = 1e-4
    fd = (stt.gradient_at(h) - stt.gradient_at(-h)) / (2 * h)
    trunc = sum(h ** (p - 1) * np.abs(G[p]) for p in range(3, T, 2))
    tol = 2 * (trunc + gamma * sum(h**p * S[p] for p in range(T)) / h + gamma * S[1])
    err = np.abs(fd - stt.first_order_correction)
    assert np.all(err <= tol), float(np.max(err / tol))
    record("schedule: |central difference - first order| / tol", float(np.max(err / tol)))
    nz = np.abs(stt.first_order_correction).max()
    if nz > 0:
        record("schedule: max|fd - first| / max|first|", float(err.max() / nz))

    # eps = 1: the whole gradient; for one-state cells the reference kernel's BPTT
    g1 = stt.gradient_at(1.0)
    assert np.all(np.abs(g1 - G.sum(axis=0)) <= gamma * S.sum(axis=0))
    if len(cell.states) == 1:
        ref = sg.reference_kernel(cell).vjp(prob.params, prob.x, prob.h0, {state: cot}).params[param]
        assert np.all(np.abs(g1 - ref) <= 64 * (T + 1) * U * S.sum(axis=0) + gamma * S.sum(axis=0))
        record("schedule: |gradient_at(1) - BPTT| / (U*S)", float(np.max(np.abs(g1 - ref) / np.maximum(U * S.sum(axis=0), 1e-300))))

    # weights: alpha*(1-alpha)**ell for the leaky cell (w*(1-alpha)**ell for constant-rate cells)
    w = const_write_gain(cell)
    if w is not None:
        a_ = cell.constants["alpha"]
        for ell in range(T):
            # exp of a difference of prefix sums of <= T logs: relative error <= ~2(T+1)*U*ell*|log(1-a)|
            tol_w = U * (16 + 4 * (T + 1) * (ell + 1) * max(1.0, abs(math.log(1 - a_))))
            assert stt.weights[ell] == pytest.approx(w * (1 - a_) ** ell, rel=tol_w, abs=0)

    # remainder slope: R(eps) = G(eps) - G0 - eps*G1 = sum_{p>=2} eps^p G_p.  One-state cells: p* = 2
    # (windows of two factors exist for T >= 3, B_2 B_1 reaches the state directly).  Two-state
    # cells transport the retention state's block only: c -> c with two coupling insertions needs
    # c -> h -> h -> c, so for short runs G_2 (even every G_p, p >= 2) can vanish structurally.
    c = np.sqrt((G.reshape(T, -1) ** 2).sum(axis=1))
    a = np.sqrt((S.reshape(T, -1) ** 2).sum(axis=1))
    ps, grid = _window(c, a, gamma)
    G0 = stt.gradient_at(0.0)
    if len(cell.states) == 1:
        assert ps == 2, f"leading order {ps}: ||G_p|| = {c}"
    if ps is None:  # G is affine in eps: the remainder is rounding only
        for e in (1e-2, 1.0):
            R = stt.gradient_at(e) - G0 - e * stt.first_order_correction
            assert np.all(np.abs(R) <= 2 * gamma * sum(e**p * S[p] for p in range(T)))
        return
    assume(grid is not None)
    E = np.array([np.linalg.norm(stt.gradient_at(e) - G0 - e * stt.first_order_correction) for e in grid])
    slope = float(np.polyfit(np.log(grid), np.log(E), 1)[0])
    assert abs(slope - ps) <= 0.1, f"slope {slope} (expected {ps}) on [{grid[0]:.2e}, {grid[-1]:.2e}]"
    record("schedule: |slope - p*|", abs(slope - ps))


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_schedule_leaky_weights(alpha: float) -> None:
    cell = sg.cells.leaky(alpha)
    prob = draw_problem(cell, 4, n=3, m=2, B=2, T=8)
    stt = sg.analogies.schedule(cell, prob.params, prob.x, prob.h0, loss=prob.loss("step"))
    a = cell.constants["alpha"]
    expected = np.array([a * (1 - a) ** ell for ell in range(8)])
    # log-domain weights: relative error <= (16 + 36*(ell+1)*|log(1-a)|)*U, here < 1e-13
    np.testing.assert_allclose(stt.weights, expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(stt.lag_weighted_sum, stt.zeroth_order_gradient, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------
# (c) Adam: metrics against their definitions
# ----------------------------------------------------------------------------


def metrics_by_definition(values, r: int) -> dict[str, float]:
    """AI = s_1/s_r, CE = sum_{i<=r} s_i^2 / sum s^2, PR = (sum s^2)^2 / sum s^4,
    erank = exp(-sum p log p) with p = s / sum s (0 log 0 = 0); s = sorted |values| descending,
    r clipped to len(values).  Exact-sum (math.fsum) Python floats."""
    s = sorted((abs(float(v)) for v in values), reverse=True)
    r = min(r, len(s))
    s2 = [v * v for v in s]
    tot = math.fsum(s)
    p = [v / tot for v in s if v > 0]
    return {
        "AI": s[0] / s[r - 1] if s[r - 1] > 0 else math.inf,
        "CE": math.fsum(s2[:r]) / math.fsum(s2),
        "PR": math.fsum(s2) ** 2 / math.fsum(v * v for v in s2),
        "erank": math.exp(-math.fsum(q * math.log(q) for q in p)),
        "r": float(r),
    }


def test_spectrum_metrics_hand_made() -> None:
    m = sg.analogies.spectrum_metrics(np.array([3.0, -4.0, 1.0, 0.0, 2.0]), r=2)
    # s = 4, 3, 2, 1, 0: sum s^2 = 30, sum s^4 = 256 + 81 + 16 + 1 = 354, p = .4 .3 .2 .1
    erank = math.exp(-(0.4 * math.log(0.4) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)))
    expected = {"AI": 4 / 3, "CE": 25 / 30, "PR": 900 / 354, "erank": erank, "r": 2.0}
    for key, v in expected.items():
        assert m[key] == pytest.approx(v, rel=8 * U), key
    assert sg.analogies.spectrum_metrics(np.array([3.0, -4.0, 1.0, 0.0, 2.0]))["AI"] == math.inf  # r -> 5, s_5 = 0
    iso = sg.analogies.spectrum_metrics(np.full(7, 0.3), r=3)
    assert iso["AI"] == 1.0 and iso["CE"] == pytest.approx(3 / 7, rel=8 * U)
    assert iso["PR"] == pytest.approx(7, rel=8 * U) and iso["erank"] == pytest.approx(7, rel=8 * U)
    one = sg.analogies.spectrum_metrics(np.array([0.0, 5.0, 0.0]), r=1)
    assert one["AI"] == 1.0 and one["CE"] == 1.0 and one["PR"] == 1.0 and one["erank"] == 1.0
    with pytest.raises(sg.ShapeError):
        sg.analogies.spectrum_metrics(np.zeros(3))


finite_values = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))


@pytest.mark.parametrize("tier", TIERS)
@given(values=st.lists(finite_values, min_size=1, max_size=40).filter(lambda v: any(x != 0 for x in v)),
       r=st.integers(1, 12), data=st.data())
def test_spectrum_metrics_definitions(tier: str, values, r: int, data) -> None:
    v = np.array(values)
    m = sg.analogies.spectrum_metrics(v, r=r)
    ref = metrics_by_definition(values, r)
    n = len(values)
    # sums of <= n terms, a square, a division: relative error <= (2n + 4)*U; exp(entropy) adds
    # |entropy| <= log n times that
    rel = (2 * n + 4) * U * (1 + math.log(n) + 1)
    for key in ("CE", "PR", "erank", "r"):
        assert m[key] == pytest.approx(ref[key], rel=rel, abs=0), key
    assert m["AI"] == ref["AI"] if math.isinf(ref["AI"]) else m["AI"] == pytest.approx(ref["AI"], rel=4 * U)
    # invariances: permutation and scaling by a power of two (exact in floating point)
    perm = data.draw(st.permutations(list(range(n))), label="perm")
    m2 = sg.analogies.spectrum_metrics(8.0 * v[perm], r=r)
    for key in ("AI", "CE", "PR", "erank"):
        assert m2[key] == pytest.approx(m[key], rel=rel), key
    assert 1 <= m["PR"] <= n * (1 + rel) and 1 - rel <= m["erank"] <= n * (1 + rel) and 0 < m["CE"] <= 1 + rel


def adam_textbook(grads, beta1: float, beta2: float, eps: float) -> np.ndarray:
    """Kingma & Ba (2015), Algorithm 1, element by element in Python floats; returns the
    preconditioner 1 / (sqrt(v_hat_N) + eps) after the N gradients."""
    shape = np.shape(grads[0])
    flat = [np.asarray(g, dtype=float).ravel().tolist() for g in grads]
    out = []
    for i in range(len(flat[0])):
        m = v = 0.0
        for n, g in enumerate(flat, start=1):
            m = beta1 * m + (1 - beta1) * g[i]
            v = beta2 * v + (1 - beta2) * g[i] * g[i]
        v_hat = v / (1 - beta2**n)
        out.append(1.0 / (math.sqrt(v_hat) + eps))
    return np.array(out).reshape(shape)


@pytest.mark.parametrize("tier", TIERS)
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 30), rows=st.integers(1, 5), cols=st.integers(1, 4),
       beta2=st.floats(0.5, 0.9999), eps=st.sampled_from([1e-8, 1e-3, 1.0]), spread=st.floats(0.0, 6.0))
def test_adam_preconditioner_is_textbook_adam(tier: str, seed: int, N: int, rows: int, cols: int, beta2: float,
                                              eps: float, spread: float) -> None:
    rng = np.random.default_rng(seed)
    row_scale = 10.0 ** rng.uniform(-spread, 0, size=(rows, 1))  # heterogeneous magnitudes per row
    grads = [rng.standard_normal((rows, cols)) * row_scale for _ in range(N)]
    P = sg.analogies.adam_preconditioner(grads, beta1=0.9, beta2=beta2, eps=eps)
    ref = adam_textbook(grads, 0.9, beta2, eps)
    # N-step recursion of sums of non-negative terms, a power, a sqrt and a division:
    # relative error <= (2N + 6)*U
    np.testing.assert_allclose(P, ref, rtol=(2 * N + 6) * U, atol=0)
    record("adam: rel err / U", float(np.max(np.abs(P / ref - 1)) / U))


def test_adam_preconditioner_hand_made() -> None:
    # one gradient: v_hat = g^2 exactly, P = 1/(|g| + eps); two: v_hat = (b2 g1^2 + g2^2)/(1 + b2)
    g = np.array([[3.0, -4.0]])
    np.testing.assert_allclose(sg.analogies.adam_preconditioner([g], eps=0.0), [[1 / 3, 1 / 4]], rtol=4 * U)
    b2 = 0.999
    P = sg.analogies.adam_preconditioner([np.array([1.0]), np.array([2.0])], beta2=b2, eps=0.0)
    # the library forms (1 - b2) and (1 - b2**2) in floating point: each carries a relative error
    # ~U/(1 - b2) from the cancellation (b2 is not exactly representable), so rtol = 4U/(1 - b2)
    np.testing.assert_allclose(P, [1 / math.sqrt((b2 * 1 + 4) / (1 + b2))], rtol=4 * U / (1 - b2))
    with pytest.raises(sg.ShapeError):
        sg.analogies.adam_preconditioner([])
    with pytest.raises(sg.ShapeError):
        sg.analogies.adam_preconditioner([np.zeros(2), np.zeros(3)])


def test_row_aggregate_and_rank_alignment_hand_made() -> None:
    P = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 9.0]])
    np.testing.assert_array_equal(sg.analogies.row_aggregate(P), [2.0, 2.0, 4.5])
    np.testing.assert_array_equal(sg.analogies.row_aggregate(np.array([1.0, 5.0])), [1.0, 5.0])
    assert sg.analogies.rank_alignment([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=4 * U)
    assert sg.analogies.rank_alignment([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=4 * U)
    # Spearman: ranks (1,2,3,4) vs (2,1,4,3): 1 - 6*sum d^2/(n(n^2-1)) = 1 - 6*4/60 = 0.6
    assert sg.analogies.rank_alignment([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6, abs=8 * U)
    assert math.isnan(sg.analogies.rank_alignment([1, 1, 1], [1, 2, 3]))


# --- gate profiles against Adam on the same runs ------------------------------


def _scalar_gate_like(c: sg.Cell) -> bool:
    """Cells whose mu for W is isotropic by construction: the built-in scalar gate, and random
    cells with a scalar gate, no output gate and not the additive two-state form (exp_tanh
    excluded: W has no write gain there)."""
    if c.name == "scalar_gate":
        return True
    rec = RECIPES.get(c.name)
    return (rec is not None and rec.gate == "scalar" and not rec.out_gate and rec.activation != "exp_tanh"
            and not (rec.two_state and rec.form == "additive"))


def _anisotropic(c: sg.Cell) -> bool:
    """Cells with a per-neuron gate on the retention: built-in vector_gate, gru, mgu, lstm; random
    cells with a vector or log-domain gate or an output gate (exp_tanh excluded: no W write gain)."""
    if c.name in ("vector_gate", "gru", "mgu", "lstm"):
        return True
    rec = RECIPES.get(c.name)
    return rec is not None and rec.activation != "exp_tanh" and (rec.gate in ("vector", "logdomain") or rec.out_gate)


def _param_W(cell: sg.Cell) -> str:
    e = sg.effective_lr(cell)  # built-ins: W (Wc for the LSTM, Wn for GRU/MGU)
    return "W" if "W" in [p.name for p in cell.params] else e.param


def _adam_grads(prob, param: str, K: int = 6) -> list[np.ndarray]:
    """BPTT gradients of ``param`` on K fresh input batches (same parameters): what Adam sees."""
    k = sg.reference_kernel(prob.cell)
    rng = np.random.default_rng(prob.seed + 7)
    return [k.backward(prob.params, rng.standard_normal(prob.x.shape), prob.h0, loss=prob.loss("step")).params[param]
            for _ in range(K)]


def random_cells_where(pred) -> st.SearchStrategy[sg.Cell]:
    """Random cells (the same recipes and builder as ``sg.testing.random_cells()``) restricted to
    those satisfying ``pred``, sampled directly instead of filtered (a filter with ~1/6
    acceptance would waste most draws)."""
    from symgate.testing._random_cells import Recipe

    pool = [r for r in all_recipes() if pred(sg.testing.cached_random(r))]
    return st.builds(lambda r, a: sg.testing.cached_random(Recipe(*[getattr(r, f) for f in (
        "activation", "reset", "gate", "form", "out_gate", "bias", "two_state")], a)),
        st.sampled_from(pool), st.sampled_from((0.1, 0.5, 0.8)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_scalar_gate_profile_is_isotropic_adam_is_not(tier: str, family: str, data) -> None:
    cells = st.just(sg.testing.cached_builtin("scalar_gate")) if family == "builtin" else random_cells_where(_scalar_gate_like)
    prob = data.draw(problem_st(family, tier, min_n=2, min_T=2, cells=cells))
    cell = prob.cell
    param = _param_W(cell)
    n = prob.h0[sg.effective_lr(cell, param).state].shape[-1]
    mu = sg.effective_lrs(cell, prob.params, prob.x, prob.h0, param=param, max_lag=prob.T - 1)
    for lag in (None, 1):
        gp = sg.analogies.gate_profile(mu, lag=lag)
        assert gp.shape == (n,)
        assume(np.all(gp > 0))  # mu may underflow to 0 only for extreme gates
        gm = sg.analogies.spectrum_metrics(gp, r=n)
        # the same scalar for every neuron: AI exactly 1, PR = n up to the rounding of n-term sums
        assert gm["AI"] == 1.0 and gm["PR"] == pytest.approx(n, rel=4 * n * U) and gm["erank"] == pytest.approx(n, rel=4 * n * U)
    P = sg.analogies.adam_preconditioner(_adam_grads(prob, param))
    cmp = sg.analogies.adam_comparison(sg.analogies.gate_profile(mu), P, r=n)
    assert math.isnan(cmp.alignment)  # a constant profile has no ranking to align with
    assert cmp.gate["AI"] == 1.0
    # Adam's row-aggregated preconditioner on these heterogeneous gradients is anisotropic
    assert cmp.adam["AI"] > 1.0 and cmp.adam["PR"] < n
    record("adam AI on scalar-gate runs (min)", -float(cmp.adam["AI"]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_adam_agrees_with_gate_on_constructed_gradients(tier: str, family: str, data) -> None:
    """Gradient rows with magnitude proportional to 1/mu_q: Adam's row-aggregated
    preconditioner (eps = 0) is proportional to mu, so the rank alignment is 1 and the
    scale-invariant metrics coincide."""
    cells = sg.testing.builtin_cells().filter(_anisotropic) if family == "builtin" else random_cells_where(_anisotropic)
    prob = data.draw(problem_st(family, tier, min_n=2, min_T=2, cells=cells))
    cell = prob.cell
    param = _param_W(cell)
    mu = sg.effective_lrs(cell, prob.params, prob.x, prob.h0, param=param, max_lag=prob.T - 1)
    lag = data.draw(st.sampled_from([None, 1]), label="lag")
    gp = sg.analogies.gate_profile(mu, lag=lag)
    n = gp.size
    assume(np.all(gp > 0))
    srt = np.sort(gp)
    assume(np.all(np.diff(srt) > 1e-9 * srt[1:]))  # distinct neurons: ranks are not decided by rounding
    assert sg.analogies.spectrum_metrics(gp, r=n)["AI"] > 1.0  # anisotropic gate profile
    rng = np.random.default_rng(prob.seed)
    K, cols = 5, 3
    col = np.exp(rng.uniform(-1, 1, cols))  # the same column pattern in every row
    grads = [rng.choice([-1.0, 1.0]) * math.exp(rng.uniform(-2, 2)) * np.outer(1 / gp, col) for _ in range(K)]
    P = sg.analogies.adam_preconditioner(grads, eps=0.0)  # P[q, j] = gp[q] / (c * col[j])
    cmp = sg.analogies.adam_comparison(gp, P, r=n)
    assert cmp.alignment == pytest.approx(1.0, abs=4 * U)
    # the two profiles are proportional up to ~(2K + 8) roundings per entry; AI/CE/PR/erank are
    # scale invariant and move by <= ~4x a relative perturbation of the entries
    rel = 4 * (2 * K + 8 + 2 * n) * U
    for key in ("AI", "CE", "PR", "erank"):
        assert cmp.adam[key] == pytest.approx(cmp.gate[key], rel=rel), key
        record(f"constructed agreement: |{key} adam/gate - 1| / U", abs(cmp.adam[key] / cmp.gate[key] - 1) / U)
