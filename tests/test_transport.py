r"""Transport on trajectories (``symgate._transport``) against brute force.

Independent expectations, shared with no symgate code path:

* the built-in cells' update equations typed from the paper notes (sections 1-2) as plain
  numpy step functions (:func:`step_vector_gate`, ...), run by our own loop;
* dense per-step Jacobians of those functions by the **complex step** (exact to rounding:
  the steps are analytic), and products of them in chain-rule order
  :math:`J_t\cdots J_{k+1}` (notes section 3);
* the effective learning rate of decision 2 (notes section 10), typed as an explicit loop:
  :math:`\mu_{t,\ell}=w_{t-\ell}\prod_{j=t-\ell+1}^{t}\lambda_j`; the S1 predictor
  :math:`\prod_{j=t-\ell}^{t}g_j`; the follow-up's :math:`\prod_{j=t-\ell+1}^{t}(1-s_j)` and its
  diagonal first-order correction :math:`\mu^{(0)}\sum_j r_j/\lambda_j` (notes section 4);
* the private windowed-sum helpers against direct sums over each window.

Tolerance model (``U = 2**-52``): a product of ``p`` factors, or a sum of ``p`` terms, has
relative error <= ~p*U; the log-domain product ``exp(sum log|f_j|)`` has relative error
<= ~U * (1 + sum_j |log f_j| * p); with at most 7 factors of modest size here, 1e-12
relative covers it with a margin of ~10x.  Complex-step Jacobians are exact to a few U.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import symgate as sg
from symgate import _transport as tr
from symgate.testing import cached_builtin

U = float(np.finfo(np.float64).eps)
RTOL = 1e-12  # see the module docstring: products/sums of <= 7 modest factors, ~10x margin
CS = 1e-30  # complex step: truncation O(CS^2) is far below rounding

# ----------------------------------------------------------------------------
# the cells' equations, typed from the paper notes (numpy, complex-safe)
# ----------------------------------------------------------------------------


def sig(u):
    return 1.0 / (1.0 + np.exp(-u))


def step_vector_gate(p, s, x):
    (h,) = s
    g = sig(h @ p["Wg"].T + x @ p["Ug"].T + p["c"])
    phi = np.tanh(h @ p["W"].T + x @ p["U"].T + p["b"])
    return ((1 - g) * h + g * phi,)


def step_scalar_gate(p, s, x):
    (h,) = s
    g = sig(h @ p["wg"].T + x @ p["ug"].T + p["c"])  # (B, 1), broadcast over units
    phi = np.tanh(h @ p["W"].T + x @ p["U"].T + p["b"])
    return ((1 - g) * h + g * phi,)


def step_gru(p, s, x):
    (h,) = s
    z = sig(h @ p["Wz"].T + x @ p["Uz"].T + p["bz"])
    r = sig(h @ p["Wr"].T + x @ p["Ur"].T + p["br"])
    cand = np.tanh((r * h) @ p["Wn"].T + x @ p["Un"].T + p["bn"])
    return ((1 - z) * h + z * cand,)


def step_lstm(p, s, x):
    h, c = s
    i = sig(h @ p["Wi"].T + x @ p["Ui"].T + p["bi"])
    f = sig(h @ p["Wf"].T + x @ p["Uf"].T + p["bf"])
    o = sig(h @ p["Wo"].T + x @ p["Uo"].T + p["bo"])
    g = np.tanh(h @ p["Wc"].T + x @ p["Uc"].T + p["bc"])
    c2 = f * c + i * g
    return (o * np.tanh(c2), c2)


STEPS: dict[str, Callable] = {"vector_gate": step_vector_gate, "scalar_gate": step_scalar_gate,
                              "gru": step_gru, "lstm": step_lstm}
N_STATES = {"vector_gate": 1, "scalar_gate": 1, "gru": 1, "lstm": 2}


def make_params(name: str, n: int, m: int, seed: int) -> dict[str, np.ndarray]:
    """Random parameters of the built-in cell ``name`` with biases, of modest size."""
    rng = np.random.default_rng(seed)
    shapes = {p.name: None for p in cached_builtin(name).params}
    out = {}
    for k in shapes:
        spec = next(p for p in cached_builtin(name).params if p.name == k)
        if spec.kind == "matrix":
            rows = 1 if k in ("wg", "ug") else n
            cols = m if k.startswith("U") or k == "ug" else n
            out[k] = 0.6 * rng.standard_normal((rows, cols))
        elif spec.kind == "vector":
            out[k] = 0.5 * rng.standard_normal(n)
        else:
            out[k] = np.float64(0.5 * rng.standard_normal())
    return out


def run(name: str, p, x, s0):
    """Our own forward loop: the states before each step, ``[(T, B, d), ...]``, and after."""
    step = STEPS[name]
    prev, after = [], []
    s = s0
    for t in range(x.shape[0]):
        prev.append(s)
        s = step(p, s, x[t])
        after.append(s)
    stack = lambda seq, i: np.stack([q[i] for q in seq])  # noqa: E731
    k = len(s0)
    return [stack(prev, i) for i in range(k)], [stack(after, i) for i in range(k)]


def cs_jacobian(name: str, p, s, x) -> np.ndarray:
    """Dense ``(B, N, N)`` state Jacobian of one step by the complex step (states stacked)."""
    sizes = [q.shape[-1] for q in s]
    flat = np.concatenate(s, axis=-1)
    B, N = flat.shape
    J = np.empty((B, N, N))
    for q in range(N):
        z = flat.astype(complex)
        z[:, q] += 1j * CS
        parts = np.split(z, np.cumsum(sizes)[:-1], axis=-1)
        out = np.concatenate(STEPS[name](p, parts, x), axis=-1)
        J[:, :, q] = out.imag / CS
    return J


def cs_param_jacobian(name: str, p, s, x, param: str) -> np.ndarray:
    """Immediate ``d+ h_k / d param`` of one step (first state), ``(B, n, *shape)``, complex step."""
    P = np.asarray(p[param], dtype=float)
    B, n = s[0].shape
    out = np.empty((B, n) + P.shape)
    for idx in np.ndindex(*P.shape) if P.shape else [()]:
        q = dict(p)
        z = P.astype(complex)
        z[idx] += 1j * CS
        q[param] = z
        out[(slice(None), slice(None)) + idx] = STEPS[name](q, s, x)[0].imag / CS
    return out


class Problem:
    """A small problem on a built-in cell, with our own trajectory and Jacobians."""

    def __init__(self, name: str, *, n: int = 3, m: int = 2, B: int = 4, T: int = 6, seed: int = 0) -> None:
        # all sizes distinct, so that an axis or a size taken from the wrong dimension shows
        rng = np.random.default_rng(seed + 100)
        self.name, self.cell = name, cached_builtin(name)
        self.p = make_params(name, n, m, seed)
        self.x = rng.standard_normal((T, B, m))
        self.s0 = tuple(0.5 * rng.standard_normal((B, n)) for _ in range(N_STATES[name]))
        self.h0 = dict(zip(self.cell.state_names, self.s0))
        self.prev, self.after = run(name, self.p, self.x, self.s0)
        self.T, self.B, self.n = T, B, n
        self.J = np.stack([cs_jacobian(name, self.p, [q[t] for q in self.prev], self.x[t]) for t in range(T)])

    def product(self, t: int, k: int) -> np.ndarray:
        """``J_t ... J_{k+1}`` (steps 1-based), ``(B, N, N)``."""
        P = np.broadcast_to(np.eye(self.J.shape[-1]), self.J.shape[1:]).copy()
        for j in range(k + 1, t + 1):
            P = np.einsum("bij,bjk->bik", self.J[j - 1], P)
        return P

    def gates(self) -> dict[str, np.ndarray]:
        """Gate and candidate values at every step for the one-state gated cells, ``(T, B, .)``."""
        p, hp = self.p, self.prev[0]
        if self.name == "vector_gate":
            g = sig(hp @ p["Wg"].T + self.x @ p["Ug"].T + p["c"])
        else:
            g = sig(hp @ p["wg"].T + self.x @ p["ug"].T + p["c"])
        phi = np.tanh(hp @ p["W"].T + self.x @ p["U"].T + p["b"])
        return {"g": g, "phi": phi}


_PROBLEMS: dict[tuple, Problem] = {}


def problem(name: str, **kw) -> Problem:
    key = (name,) + tuple(sorted(kw.items()))
    if key not in _PROBLEMS:
        _PROBLEMS[key] = Problem(name, **kw)
    return _PROBLEMS[key]


def direct_mu(w: np.ndarray, lam: np.ndarray, L: int, convention: str) -> np.ndarray:
    """mu[t-1, ell] as explicit loops over the window (notes section 10, decision 2; section 5)."""
    T = w.shape[0]
    out = np.zeros((T, L + 1) + w.shape[1:])
    for t in range(1, T + 1):
        for ell in range(L + 1):
            if t - ell < 1:
                continue
            if convention == "exact":  # w_{t-ell} * prod_{j=t-ell+1}^{t} lambda_j
                v = w[t - ell - 1].copy()
                for j in range(t - ell + 1, t + 1):
                    v = v * lam[j - 1]
            elif convention == "s1":  # prod_{j=t-ell}^{t} g_j
                v = np.ones_like(w[0])
                for j in range(t - ell, t + 1):
                    v = v * w[j - 1]
            else:  # followup: prod_{j=t-ell+1}^{t} (1 - s_j)
                v = np.ones_like(w[0])
                for j in range(t - ell + 1, t + 1):
                    v = v * lam[j - 1]
            out[t - 1, ell] = v
    return out


# ----------------------------------------------------------------------------
# private helpers: cumulative sums, lag differences, windowed sums and products
# ----------------------------------------------------------------------------


def test_cumulative_prepends_zero_and_keeps_integers_exact() -> None:
    """``C[0] = 0``, ``C[t] = sum_{j<=t} v_j`` along axis 0 (other axes untouched); integer input
    stays int64 (exact counts), float32 is accumulated in float64."""
    rng = np.random.default_rng(1)
    v = rng.integers(-3, 4, size=(5, 2, 3)).astype(np.int64)
    C = tr._cumulative(v)
    assert C.shape == (6, 2, 3) and C.dtype == np.int64
    want = np.zeros((6, 2, 3), dtype=np.int64)
    for t in range(1, 6):
        want[t] = want[t - 1] + v[t - 1]
    np.testing.assert_array_equal(C, want)
    f = rng.standard_normal((4, 3)).astype(np.float32)
    Cf = tr._cumulative(f)
    assert Cf.dtype == np.float64 and Cf.shape == (5, 3)
    np.testing.assert_allclose(Cf, np.vstack([np.zeros(3), np.cumsum(f.astype(np.float64), axis=0)]), rtol=1e-15)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("max_lag", [0, 2, 4, 7])
def test_lag_differences_brute_force(offset: int, max_lag: int) -> None:
    """``out[ell, t-1] = top[t] - bottom[t - ell - offset]`` for ``t - ell >= 1``, ``fill`` before step 1,
    for lags below, at and beyond T (exact integers)."""
    rng = np.random.default_rng(2)
    T = 5
    top = rng.integers(0, 50, size=(T + 1, 2))
    bottom = rng.integers(0, 50, size=(T + 1, 2))
    out = tr._lag_differences(top, bottom, max_lag, offset, -7)
    assert out.shape == (max_lag + 1, T, 2) and out.dtype == np.int64
    for ell in range(max_lag + 1):
        for t in range(1, T + 1):
            want = top[t] - bottom[t - ell - offset] if t - ell >= 1 else [-7, -7]
            np.testing.assert_array_equal(out[ell, t - 1], want, err_msg=f"ell={ell} t={t}")


@pytest.mark.parametrize("inclusive,with_gain", [(False, False), (False, True), (True, False)])  # as used
@pytest.mark.parametrize("max_lag", [0, 3, 6, 8])
def test_lag_sums_brute_force(inclusive: bool, with_gain: bool, max_lag: int) -> None:
    """Windowed sums ``sum_{j=t-ell+1}^{t} v_j (+ gain_{t-ell})`` or ``sum_{j=t-ell}^{t} v_j``, ``-inf``
    where ``t - ell < 1``, and the fused exponential; the input is not modified."""
    rng = np.random.default_rng(3)
    T = 6
    v = rng.standard_normal((T, 2, 3))
    gain = rng.standard_normal((T, 2, 3)) if with_gain else None
    v0 = v.copy()
    ex = np.full((max_lag + 1, T, 2, 3), np.nan)
    out = tr._lag_sums(v, max_lag, gain=gain, inclusive=inclusive, exp_out=ex)
    np.testing.assert_array_equal(v, v0)
    assert out.shape == (max_lag + 1, T, 2, 3)
    for ell in range(max_lag + 1):
        for t in range(1, T + 1):
            if t - ell < 1:
                assert np.all(np.isneginf(out[ell, t - 1])), (ell, t)
                want = np.full((2, 3), -np.inf)
            else:
                lo = t - ell if inclusive else t - ell + 1
                if inclusive and lo < 1:
                    raise AssertionError
                want = sum((v[j - 1] for j in range(lo, t + 1)), np.zeros((2, 3)))
                if with_gain and not inclusive:
                    want = want + gain[t - ell - 1]
                np.testing.assert_allclose(out[ell, t - 1], want, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(ex[ell, t - 1], np.exp(want), rtol=1e-13, atol=0)


def test_lag_sums_without_exp_out_and_integer_input() -> None:
    """Without ``exp_out`` only the sums are returned (float64 even for integer input)."""
    v = np.arange(1, 5, dtype=np.int64)[:, None]
    out = tr._lag_sums(v, 2)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out[:, :, 0], [[0, 0, 0, 0], [-np.inf, 2, 3, 4], [-np.inf, -np.inf, 5, 7]])
    # float32 input is summed in float64: 1 + 2**-30 is not representable in float32
    f = np.array([[1.0], [2.0**-30], [2.0**-30], [1.0]], dtype=np.float32)
    o = tr._lag_sums(f, 3)
    assert o.dtype == np.float64 and o[3, 3, 0] == 1.0 + 2.0**-29  # steps 2..4
    o = tr._lag_sums(f, 3, inclusive=True)
    assert o.dtype == np.float64 and o[1, 1, 0] == 1.0 + 2.0**-30  # steps 1..2



def test_log_abs_with_and_without_log_domain_values() -> None:
    """``log|v|`` with 0 where a factor is exactly zero, and the zero mask; given log-domain values
    they are used as they are (finite where ``v`` itself underflowed)."""
    v = np.array([2.0, -0.5, 0.0, 1.0])
    lv, z = tr._log_abs(v, None)
    np.testing.assert_array_equal(z, [False, False, True, False])
    np.testing.assert_allclose(lv, [np.log(2.0), np.log(0.5), 0.0, 0.0], rtol=1e-15)
    given = np.array([-800.0, 1.5, -np.inf, 0.25])
    lv2, z2 = tr._log_abs(np.zeros(4), given)
    np.testing.assert_array_equal(z2, [False, False, True, False])
    np.testing.assert_array_equal(lv2, [-800.0, 1.5, 0.0, 0.25])


def window_product(v: np.ndarray, gain, t: int, ell: int, inclusive: bool) -> np.ndarray:
    lo = t - ell if inclusive else t - ell + 1
    out = np.ones(v.shape[1:]) if (gain is None or inclusive) else gain[t - ell - 1].copy()
    for j in range(lo, t + 1):
        out = out * v[j - 1]
    return out


@pytest.mark.parametrize("inclusive,with_gain", [(False, False), (False, True), (True, False)])  # as used
def test_log_window_products_with_zeros_and_signs(inclusive: bool, with_gain: bool) -> None:
    """Log-domain windowed products agree with direct products, with exact zeros (``-inf``, and 0 in
    the fused exponential) and exact signs from counts of negative factors, in ``v`` and in the gain."""
    rng = np.random.default_rng(4)
    T, L = 7, 8
    v = rng.uniform(0.3, 1.7, size=(T, 2, 2)) * rng.choice([-1.0, 1.0], size=(T, 2, 2))
    v[2, 0, 0] = 0.0
    v[5, 1, 1] = 0.0
    gain = None
    if with_gain:
        gain = rng.uniform(0.3, 1.7, size=(T, 2, 2)) * rng.choice([-1.0, 1.0], size=(T, 2, 2))
        gain[1, 0, 1] = 0.0
        gain[4, 1, 0] = 0.0
    ex = np.full((L + 1, T, 2, 2), np.nan)
    log_prod, sign = tr._log_window_products(v, L, gain=gain, inclusive=inclusive, exp_out=ex)
    assert sign is not None
    for ell in range(L + 1):
        for t in range(1, T + 1):
            if t - ell < 1:
                assert np.all(np.isneginf(log_prod[ell, t - 1]))
                np.testing.assert_array_equal(ex[ell, t - 1], 0.0)
                continue
            want = window_product(v, gain, t, ell, inclusive)
            got = np.exp(log_prod[ell, t - 1]) * sign[ell, t - 1]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
            np.testing.assert_allclose(ex[ell, t - 1], want, rtol=RTOL, atol=0)
            np.testing.assert_array_equal(np.isneginf(log_prod[ell, t - 1]), want == 0)
            nz = want != 0
            np.testing.assert_array_equal(sign[ell, t - 1][nz], np.sign(want[nz]))


@pytest.mark.parametrize("with_gain", [False, True])
def test_log_window_products_positive_factors_have_no_sign(with_gain: bool) -> None:
    """With no negative factor the sign is None (documented), zeros still give -inf; the
    log-domain inputs are used in place of log|v| (here finite where the products underflow)."""
    rng = np.random.default_rng(5)
    T, L = 6, 5
    v = rng.uniform(0.2, 1.5, size=(T, 3))
    v[3, 1] = 0.0
    gain = rng.uniform(0.2, 1.5, size=(T, 3)) if with_gain else None
    log_prod, sign = tr._log_window_products(v, L, gain=gain)
    assert sign is None
    for ell in range(L + 1):
        for t in range(ell + 1, T + 1):
            want = window_product(v, gain, t, ell, False)
            np.testing.assert_allclose(np.exp(log_prod[ell, t - 1]), want, rtol=RTOL, atol=0)
    # log-domain factors: e^-400 per step underflows in any product of two, the logs do not
    lv = np.full((T, 3), -400.0)
    lg = np.full((T, 3), -300.0)
    log_prod, sign = tr._log_window_products(np.zeros((T, 3)), L, gain=np.zeros((T, 3)) if with_gain else None,
                                             log_v=lv, log_gain=lg if with_gain else None)
    assert sign is None
    for ell in range(L + 1):
        want = -400.0 * ell + (-300.0 if with_gain else 0.0)
        np.testing.assert_allclose(log_prod[ell, ell:], want, rtol=1e-14)
        assert np.all(np.isneginf(log_prod[ell, :ell]))


def test_log_window_products_zero_only_in_gain() -> None:
    """A zero write gain (and no zero transport factor) makes exactly the windows that start at it zero."""
    T, L = 5, 4
    v = np.full((T, 1), 0.5)
    gain = np.ones((T, 1))
    gain[1, 0] = 0.0  # step 2
    ex = np.empty((L + 1, T, 1))
    log_prod, sign = tr._log_window_products(v, L, gain=gain, exp_out=ex)
    assert sign is None
    for ell in range(L + 1):
        for t in range(ell + 1, T + 1):
            want = 0.0 if t - ell == 2 else 0.5**ell
            assert ex[ell, t - 1, 0] == pytest.approx(want, rel=RTOL, abs=0)
            assert np.isneginf(log_prod[ell, t - 1, 0]) == (want == 0.0)


# ----------------------------------------------------------------------------
# effective_lrs on trajectories
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate"])
@pytest.mark.parametrize("convention", ["exact", "s1", "followup"])
@pytest.mark.parametrize("compute_mu", [False, True])
def test_effective_lrs_match_the_definitions(name: str, convention: str, compute_mu: bool) -> None:
    """mu of ``W`` on our own trajectory: write gain ``w = g`` and leak ``lambda = 1 - g`` (notes
    section 2 / decision 2), every step, lag (past T too), sequence and neuron."""
    pr = problem(name)
    gv = pr.gates()["g"]
    g = np.broadcast_to(gv, (pr.T, pr.B, pr.n))
    L = pr.T + 1
    mu = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param="W", max_lag=L, convention=convention,
                          compute_mu=compute_mu)
    want = direct_mu(g, 1 - g, L, convention)
    assert mu.mu.shape == (pr.T, L + 1, pr.B, pr.n)
    assert mu.log_abs_mu.shape == mu.mu.shape
    np.testing.assert_allclose(mu.mu, want, rtol=RTOL, atol=0)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(mu.log_abs_mu, np.log(np.abs(want)), rtol=RTOL, atol=1e-13)
    assert mu.sign is None  # gates in (0, 1): nothing negative
    np.testing.assert_allclose(mu.write_gain, g, rtol=RTOL, atol=0)
    np.testing.assert_allclose(mu.leak, 1 - g, rtol=RTOL, atol=1e-16)
    assert (mu.param, mu.state, mu.convention) == ("W", "h", convention)
    assert mu.max_lag == L
    assert mu.first_order is None
    assert repr(mu) == f"<EffectiveLRTrajectory of W (state h, {convention}): T={pr.T}, lags 0..{L}>"


def test_effective_lrs_other_parameters_and_defaults() -> None:
    """The default parameter is ``W`` and the default max_lag 50; a gate parameter's mu has the
    gate-derivative write gain; the result follows a given trajectory rather than ``x``."""
    pr = problem("vector_gate")
    mu = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0)
    assert mu.param == "W" and mu.max_lag == 50 and mu.mu.shape == (pr.T, 51, pr.B, pr.n)
    ref = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param="W", max_lag=3)
    np.testing.assert_array_equal(mu.mu[:, :4], ref.mu)
    assert np.all(mu.mu[:, pr.T:] == 0)
    # a given trajectory is used as is: run on other inputs, pass that trajectory with the first x
    other = problem("vector_gate", seed=7)
    traj = sg.reference_kernel(pr.cell, "float64").forward(other.p, other.x, other.h0)
    mu_t = sg.effective_lrs(pr.cell, other.p, pr.x, pr.h0, max_lag=3, trajectory=traj)
    g = other.gates()["g"]
    np.testing.assert_allclose(mu_t.mu, direct_mu(g, 1 - g, 3, "exact"), rtol=RTOL, atol=0)
    # the gate parameter Wg: immediate d+h_i/dWg[i,q] = (phi_i - h_i) g_i (1 - g_i) h_q; transport 1 - g
    mg = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param="Wg", max_lag=3)
    gg = pr.gates()
    C = (gg["phi"] - pr.prev[0]) * gg["g"] * (1 - gg["g"])
    rows = tr.immediate_rows(pr.cell, pr.p, pr.x, pr.h0, "Wg")
    np.testing.assert_allclose(rows.write_gain * rows.sensitivity, C, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mg.mu[:, 0] * rows.sensitivity, C, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mg.mu, direct_mu(mg.write_gain, 1 - gg["g"], 3, "exact"), rtol=RTOL, atol=0)


def test_effective_lrs_rejects_an_unknown_convention() -> None:
    """The convention is validated (CellSpecError naming it), not silently taken as "exact"."""
    pr = problem("vector_gate")
    with pytest.raises(sg.CellSpecError, match="bogus"):
        sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=2, convention="bogus")


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", None])
def test_effective_lrs_rejects_bad_max_lag(bad) -> None:
    """max_lag must be an integer >= 0 (ShapeError naming the value); numpy integers and 0 are fine."""
    pr = problem("vector_gate")
    with pytest.raises(sg.ShapeError, match="max_lag"):
        sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=bad)
    assert sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=np.int64(2)).max_lag == 2
    m0 = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=0)
    np.testing.assert_allclose(m0.mu[:, 0], np.broadcast_to(pr.gates()["g"], m0.mu[:, 0].shape), rtol=RTOL)


@pytest.mark.parametrize("convention", ["exact", "s1", "followup"])
def test_effective_lrs_log_domain_at_saturation(convention: str) -> None:
    """Gates saturated by their bias (c = +-800): 1 - g = e^-800 and g = e^-800 underflow to 0 in
    float64, their logs do not: log(1 - g) = -softplus(z), log g = -softplus(-z), so log|mu| is
    the finite sum of the window's logs (typed with numpy's logaddexp; rtol: sums of <= 4 terms)."""
    pr = problem("vector_gate")
    p = dict(pr.p)
    p.update(Wg=np.zeros_like(p["Wg"]), Ug=np.zeros_like(p["Ug"]), c=np.array([800.0, -800.0, 3.0]))
    L = 3
    mu = sg.effective_lrs(pr.cell, p, pr.x, pr.h0, max_lag=L, convention=convention)
    z = p["c"]
    log_g, log_1mg = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)  # per unit, the same at every step
    want = np.full((pr.T, L + 1, pr.B, pr.n), -np.inf)
    for t in range(1, pr.T + 1):
        for ell in range(0, min(L, t - 1) + 1):
            if convention == "exact":
                want[t - 1, ell] = log_g + ell * log_1mg
            elif convention == "s1":
                want[t - 1, ell] = (ell + 1) * log_g
            else:
                want[t - 1, ell] = ell * log_1mg
    assert np.all(np.isfinite(mu.log_abs_mu[mu.valid()]))
    np.testing.assert_allclose(mu.log_abs_mu, want, rtol=1e-14, atol=1e-14)


def test_effective_lrs_of_another_state() -> None:
    """``state=`` selects the state whose transport is used: for the LSTM's h (no leak: h' = o tanh(c'))
    mu is the write gain at lag 0 and exactly 0 at every longer lag; Wo is eligible there, not for c."""
    pr = problem("lstm", T=5)
    mu = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param="Wo", state="h", max_lag=2)
    assert mu.state == "h" and mu.param == "Wo"
    np.testing.assert_array_equal(mu.leak, 0.0)
    np.testing.assert_array_equal(mu.mu[:, 1:], 0.0)
    np.testing.assert_allclose(mu.mu[:, 0], mu.write_gain, rtol=1e-14)
    with pytest.raises(sg.CellSpecError):
        sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param="Wo", max_lag=2)


@sg.cell
def input_gate(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
               a: sg.Matrix(1, "m")):
    """A leaky cell whose rate is read linearly from the input: any sign, exact zeros."""
    g = a @ x
    return (1 - g) * h + g * sg.tanh(W @ h + U @ x)


def input_gate_problem():
    rng = np.random.default_rng(11)
    n, m, B, T = 3, 4, 2, 7
    p = {"W": 0.5 * rng.standard_normal((n, n)), "U": rng.standard_normal((n, m)), "a": np.array([[1.0, 0.0, 0.0, 0.0]])}
    x = rng.standard_normal((T, B, m))
    # rates g = x[..., 0]: 1 (no leak), 0 (no write), negative (write < 0), > 1 (leak < 0)
    x[:, 0, 0] = [0.5, 1.0, 1.5, -0.5, 0.25, 2.0, 0.75]
    x[:, 1, 0] = [0.3, 0.6, 0.0, 1.25, 1.0, -1.0, 1.5]  # (a leak at step 1 never enters a window)
    return p, x, {"h": rng.standard_normal((B, n))}


@pytest.mark.parametrize("convention", ["exact", "s1", "followup"])
@pytest.mark.parametrize("compute_mu", [False, True])
def test_effective_lrs_signs_and_exact_zeros(convention: str, compute_mu: bool) -> None:
    """A rate of any sign: mu (its sign and exact zeros) equals the direct products of w = g and
    lambda = 1 - g; the log is -inf exactly where mu is 0."""
    p, x, h0 = input_gate_problem()
    T = x.shape[0]
    mu = sg.effective_lrs(input_gate, p, x, h0, max_lag=T, convention=convention, compute_mu=compute_mu)
    g = np.broadcast_to(x[:, :, :1], (T, 2, 3))
    want = direct_mu(g, 1 - g, T, convention)
    np.testing.assert_allclose(mu.mu, want, rtol=RTOL, atol=0)
    np.testing.assert_array_equal(np.isneginf(mu.log_abs_mu), want == 0)
    assert mu.sign is not None and mu.sign.shape == want.shape
    nz = want != 0
    np.testing.assert_array_equal(mu.sign[nz], np.sign(want[nz]))


# ----------------------------------------------------------------------------
# EffectiveLRTrajectory summaries
# ----------------------------------------------------------------------------


def test_trajectory_summaries() -> None:
    """valid(), envelope(), log_l1_mean() and mean_envelope() from their definitions on ``.mu``."""
    pr = problem("vector_gate")
    L = pr.T + 1  # includes lags with no valid step
    mu = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=L)
    M = mu.mu
    valid = np.array([[t - ell >= 1 for ell in range(L + 1)] for t in range(1, pr.T + 1)])
    np.testing.assert_array_equal(mu.valid(), valid)
    env = np.abs(M).sum(axis=-1)
    np.testing.assert_allclose(mu.envelope(), env, rtol=4 * U * pr.n, atol=0)
    lm, me, mg = mu.log_l1_mean(), mu.mean_envelope(), mu.mean_envelope(geometric=True)
    assert lm.shape == me.shape == mg.shape == (L + 1,)
    for ell in range(L + 1):
        ts = [t for t in range(pr.T) if valid[t, ell]]
        if not ts:
            assert np.isnan(lm[ell]) and np.isnan(me[ell]) and np.isnan(mg[ell])
            continue
        # per sequence: log of the time average of ||mu||_1; then the mean over sequences
        per_seq = [np.log(np.mean([env[t, ell, b] for t in ts])) for b in range(pr.B)]
        assert lm[ell] == pytest.approx(np.mean(per_seq), rel=1e-13, abs=1e-13)
        sel = M[ts, ell]
        assert me[ell] == pytest.approx(np.mean(np.abs(sel)), rel=1e-13)
        assert mg[ell] == pytest.approx(np.mean(np.log(np.abs(sel))), rel=1e-13)
    # with max_lag < T every lag, the last included, has valid steps and a finite summary
    short = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=3)
    np.testing.assert_allclose(short.log_l1_mean(), lm[:4], rtol=1e-13)
    np.testing.assert_allclose(short.mean_envelope(), me[:4], rtol=1e-13)
    np.testing.assert_allclose(short.mean_envelope(geometric=True), mg[:4], rtol=1e-13)
    assert np.all(np.isfinite(short.log_l1_mean()))


# ----------------------------------------------------------------------------
# the follow-up's diagonal first-order correction
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate", "gru"])
@pytest.mark.parametrize("convention", ["exact", "followup", "s1"])
def test_first_order_against_the_dense_diagonal(name: str, convention: str) -> None:
    """``first_order = mu0 * sum_{j=t-ell+1}^{t} r_j / lambda_j`` with ``r = diag(J_j) - lambda_j`` taken
    from our complex-step Jacobians (GRU: the reset chain included); 0 where the lag does not
    exist; none for the S1 convention.  (rtol 1e-11: sums of <= 6 ratios of O(1) quantities.)"""
    pr = problem(name)
    L = pr.T
    mu = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, max_lag=L, convention=convention, first_order=True)
    if convention == "s1":
        assert mu.first_order is None
        return
    lam = mu.leak
    diag = np.diagonal(pr.J, axis1=-2, axis2=-1)  # (T, B, n)
    ratio = (diag - lam) / lam
    want = np.zeros_like(mu.mu)
    for t in range(1, pr.T + 1):
        for ell in range(0, min(L, t - 1) + 1):
            want[t - 1, ell] = mu.mu[t - 1, ell] * ratio[t - ell:t].sum(axis=0)
    assert mu.first_order.shape == mu.mu.shape
    np.testing.assert_allclose(mu.first_order, want, rtol=1e-11, atol=1e-14)
    if name == "gru":  # the GRU's leak is 1 - z
        z = sig(pr.prev[0] @ pr.p["Wz"].T + pr.x @ pr.p["Uz"].T + pr.p["bz"])
        np.testing.assert_allclose(lam, 1 - z, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("convention", ["exact", "followup"])
def test_first_order_with_zero_and_unit_leaks(convention: str) -> None:
    """Rates read from the data: where a window contains a leak that is exactly 0, mu0 = 0 and the
    correction is exactly 0 (the project's choice, tests/test_theory.py); elsewhere, including a leak
    of exactly 1 and negative leaks, ``mu0 * sum r/lambda`` with ``r = g (1 - phi^2) W_qq`` (the
    diagonal of the candidate path, typed from the notes), computed here from our own forward pass."""
    p, x, h0 = input_gate_problem()
    T = x.shape[0]
    mu = sg.effective_lrs(input_gate, p, x, h0, max_lag=T, convention=convention, first_order=True)
    fo = mu.first_order
    g = x[:, :, :1]  # (T, B, 1)
    h, hp = h0["h"], []
    phis = []
    for t in range(T):
        hp.append(h)
        phi = np.tanh(h @ p["W"].T + x[t] @ p["U"].T)
        phis.append(phi)
        h = (1 - g[t]) * h + g[t] * phi
    phi = np.stack(phis)
    lam = np.broadcast_to(1 - g, phi.shape)
    r = g * (1 - phi**2) * np.diagonal(p["W"])
    np.testing.assert_allclose(mu.leak, lam, rtol=0, atol=1e-16)
    want = np.zeros_like(fo)
    for t in range(1, T + 1):
        for ell in range(0, t):
            win = slice(t - ell, t)  # steps t-ell+1..t
            hit = np.any(lam[win] == 0, axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):  # r/0 in windows masked by `hit`
                want[t - 1, ell] = np.where(hit, 0.0, mu.mu[t - 1, ell] * (r[win] / lam[win]).sum(axis=0))
    assert np.all(np.isfinite(fo))
    np.testing.assert_allclose(fo, want, rtol=1e-11, atol=1e-15)
    assert np.any(want != 0) and np.any((want == 0) & (mu.mu != 0))


# ----------------------------------------------------------------------------
# JacobianProducts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate", "gru", "lstm"])
def test_dense_jacobians_match_the_complex_step(name: str) -> None:
    """A + B is the step Jacobian (complex step of our own equations; states stacked h, c)."""
    pr = problem(name)
    jp = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0)
    N = pr.n * N_STATES[name]
    assert jp.A.shape == jp.B.shape == (pr.T, pr.B, N, N) and jp.T == pr.T
    np.testing.assert_allclose(jp.A + jp.B, pr.J, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate"])
def test_appendix_split_is_the_papers(name: str) -> None:
    """Appendix split (notes section 2): ``A = diag(1-g) + diag(g) D W``, ``B`` = the gate-derivative
    term ``diag(phi - h_{j-1}) g(1-g) Wg`` (rank one for the scalar gate); the coupling split has
    ``A = diag(1-g)`` only; a given trajectory is the one used."""
    pr = problem(name)
    gg = pr.gates()
    g, phi, hp = np.broadcast_to(gg["g"], (pr.T, pr.B, pr.n)), gg["phi"], pr.prev[0]
    D = 1 - phi**2
    eye = np.eye(pr.n)
    A = (1 - g)[..., None] * eye + (g * D)[..., None] * pr.p["W"]
    Wg = pr.p["Wg"] if name == "vector_gate" else np.broadcast_to(pr.p["wg"], (pr.n, pr.n))
    Bm = ((phi - hp) * g * (1 - g))[..., None] * Wg
    traj = sg.reference_kernel(pr.cell, "float64").forward(pr.p, pr.x, pr.h0)
    jp = sg.JacobianProducts(pr.cell, pr.p, np.zeros_like(pr.x), pr.h0, split="appendix", trajectory=traj)
    assert jp.trajectory is traj and jp.cell is pr.cell and jp.split.name == "appendix"
    np.testing.assert_allclose(jp.A, A, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(jp.B, Bm, rtol=1e-12, atol=1e-15)
    jc = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0, split="coupling")
    np.testing.assert_allclose(jc.A, (1 - g)[..., None] * eye, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(jc.B, pr.J - jc.A, rtol=1e-12, atol=1e-14)


def brute_first(A: np.ndarray, B: np.ndarray, t: int, k: int) -> np.ndarray:
    """``sum_i (A_t...A_{i+1}) B_i (A_{i-1}...A_{k+1})`` by explicit products."""
    N = A.shape[-1]
    out = np.zeros(A.shape[1:])
    for i in range(k + 1, t + 1):
        P = np.broadcast_to(np.eye(N), A.shape[1:]).copy()
        for j in range(k + 1, t + 1):
            F = B[j - 1] if j == i else A[j - 1]
            P = np.einsum("bij,bjk->bik", F, P)
        out = out + P
    return out


@pytest.mark.parametrize("name", ["vector_gate", "lstm"])
@pytest.mark.parametrize("t,k", [(1, 0), (4, 1), (6, 0), (6, 5), (5, 2)])
def test_products_exact_zeroth_first(name: str, t: int, k: int) -> None:
    """``exact`` = the chain-rule product of our Jacobians; ``product(eps)`` = prod (A + eps B)
    (also eps = 0 and the default eps = 1); ``zeroth`` = prod A; ``first`` = the one-insertion
    sum (rtol 1e-12: <= 6 factors of size <= 6)."""
    pr = problem(name)
    jp = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0)
    np.testing.assert_allclose(jp.exact(t, k), pr.product(t, k), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jp.product(t, k), pr.product(t, k), rtol=1e-12, atol=1e-14)
    A, Bm = jp.A, jp.B
    for eps in (0.0, 0.3, -1.7):
        want = np.broadcast_to(np.eye(A.shape[-1]), A.shape[1:]).copy()
        for j in range(k + 1, t + 1):
            want = np.einsum("bij,bjk->bik", A[j - 1] + eps * Bm[j - 1], want)
        np.testing.assert_allclose(jp.product(t, k, eps), want, rtol=1e-12, atol=1e-14)
        if eps == 0.0:
            np.testing.assert_allclose(jp.zeroth(t, k), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jp.first(t, k), brute_first(A, Bm, t, k), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t,k", [(0, 0), (3, 3), (2, 3), (7, 0), (3, -1)])
def test_products_reject_bad_windows(t: int, k: int) -> None:
    """Windows need ``0 <= k < t <= T``: ShapeError naming t and k, from every product method."""
    pr = problem("vector_gate")
    jp = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0)
    for f in (jp.product, jp.exact, jp.zeroth, jp.first):
        with pytest.raises(sg.ShapeError, match=f"t={t}, k={k}"):
            f(t, k)


def test_check_expansion_report() -> None:
    """Every entry of the expansion check recomputed from our own products of A and B (per
    sequence, median over the batch): remainders, C2, slope, ratios of spectral norms, the
    central difference, and the default eps grid of the paper's appendix (notes section 4)."""
    pr = problem("vector_gate")
    jp = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0)
    t, k = 5, 1
    A, Bm = jp.A, jp.B
    F0 = np.broadcast_to(np.eye(pr.n), A.shape[1:]).copy()
    for j in range(k + 1, t + 1):
        F0 = np.einsum("bij,bjk->bik", A[j - 1], F0)
    L = brute_first(A, Bm, t, k)
    F1 = pr.product(t, k)

    def F(e: float) -> np.ndarray:
        P = np.broadcast_to(np.eye(pr.n), A.shape[1:]).copy()
        for j in range(k + 1, t + 1):
            P = np.einsum("bij,bjk->bik", A[j - 1] + e * Bm[j - 1], P)
        return P

    fro = lambda X: np.sqrt((X**2).sum(axis=(-2, -1)))  # noqa: E731
    rep = jp.check_expansion(t, k)
    grid = np.array([1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])
    np.testing.assert_array_equal(rep["eps"], grid)
    E = np.array([np.median(fro(F(e) - F0 - e * L)) for e in grid])
    # E is a difference of O(1) matrices: absolute rounding ~ 1e-15 * ||F||; compare at 1e-13 absolute
    np.testing.assert_allclose(rep["error"], E, rtol=1e-6, atol=1e-13)
    np.testing.assert_allclose(rep["C2"] * grid**2, rep["error"], rtol=1e-14)
    big = grid >= 1e-2  # where E >> rounding, C2 is well resolved
    np.testing.assert_allclose(rep["C2"][big], E[big] / grid[big] ** 2, rtol=1e-6)
    # slope over the first 5 eps values: the remainder is O(eps^2), the fit is close to 2 ...
    ok = E[:5] > 0
    want_slope = np.polyfit(np.log(grid[:5][ok]), np.log(E[:5][ok]), 1)[0]
    assert rep["slope"] == pytest.approx(want_slope, abs=1e-3)
    assert rep["slope"] == pytest.approx(2.0, abs=0.05)
    at1 = fro(F1 - F0 - L)
    assert rep["remainder_at_1"] == pytest.approx(np.median(at1), rel=1e-10)
    assert rep["remainder_at_1_rel_F"] == pytest.approx(np.median(at1 / fro(F1)), rel=1e-10)
    assert rep["remainder_at_1_rel_F0L"] == pytest.approx(np.median(at1 / fro(F0 + L)), rel=1e-10)
    assert rep["norm_F0"] == pytest.approx(np.median(fro(F0)), rel=1e-12)
    assert rep["norm_L"] == pytest.approx(np.median(fro(L)), rel=1e-12)
    # ratios ||B_j||_2 / ||A_j||_2 over the window's steps k+1..t and the batch
    r = np.array([[np.linalg.svd(Bm[j, b], compute_uv=False)[0] / np.linalg.svd(A[j, b], compute_uv=False)[0]
                   for b in range(pr.B)] for j in range(k, t)])
    ratio = rep["ratio_B_A"]
    assert ratio["median"] == pytest.approx(np.median(r), rel=1e-12)
    assert ratio["p90"] == pytest.approx(np.percentile(r, 90), rel=1e-12)
    assert ratio["p99"] == pytest.approx(np.percentile(r, 99), rel=1e-12)
    assert ratio["max"] == pytest.approx(np.max(r), rel=1e-12)
    # L is the derivative of F at 0: a central difference (h = 1e-4, error O(h^2) * ||F'''||) agrees
    fd = (F(1e-4) - F(-1e-4)) / 2e-4
    want_cd = np.max(np.abs(fd - L)) / np.max(np.abs(L))
    assert rep["first_vs_central_difference"] == pytest.approx(want_cd, rel=1e-3, abs=1e-12)
    assert rep["first_vs_central_difference"] < 1e-6
    # fewer fit points and a custom grid
    rep3 = jp.check_expansion(t, k, eps=[1e-3, 1e-2, 1e-1, 1.0], fit_points=3)
    g3 = np.array([1e-3, 1e-2, 1e-1])
    E3 = np.array([np.median(fro(F(e) - F0 - e * L)) for e in g3])
    assert rep3["slope"] == pytest.approx(np.polyfit(np.log(g3), np.log(E3), 1)[0], abs=1e-6)
    assert rep3["eps"].dtype == np.float64 and rep3["error"].shape == (4,)
    # two fit points are enough for a slope; integer eps values are taken as floats
    rep2 = jp.check_expansion(t, k, eps=[1e-3, 1e-2, 1.0], fit_points=2)
    E2 = np.array([np.median(fro(F(e) - F0 - e * L)) for e in (1e-3, 1e-2)])
    assert rep2["slope"] == pytest.approx(np.log(E2[1] / E2[0]) / np.log(10.0), abs=1e-6)
    rep_int = jp.check_expansion(t, k, eps=[1, 2], fit_points=2)
    assert rep_int["eps"].dtype == np.float64
    np.testing.assert_allclose(rep_int["C2"], rep_int["error"] / np.array([1.0, 4.0]), rtol=1e-15)
    # by default the slope is fitted on the first 5 values only: a 6th far outside the quadratic
    # regime (eps = 100, where the degree-4 terms dominate) does not enter it
    g6 = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 100.0]
    E6 = np.array([np.median(fro(F(e) - F0 - e * L)) for e in g6])
    rep6 = jp.check_expansion(t, k, eps=g6)
    assert rep6["slope"] == pytest.approx(np.polyfit(np.log(g6[:5]), np.log(E6[:5]), 1)[0], abs=1e-6)
    assert rep6["slope"] == pytest.approx(2.0, abs=0.1)


def test_check_expansion_with_a_vanishing_step() -> None:
    """Plain cell, coupling split (A = 0), one sequence saturated at step 2 (tanh = +-1 exactly, so
    B_2 = diag(1 - tanh^2) W = 0): its ratio ||B||/||A|| is 0/0 and left out of the ratio summaries
    (the others are inf); its product F1 vanishes, so its relative remainders are 0/0 = NaN and
    their medians NaN -- all without a floating-point warning."""
    cell = cached_builtin("plain")
    rng = np.random.default_rng(12)
    n, m, B, T = 3, 2, 5, 4
    p = {"W": 0.7 * rng.standard_normal((n, n)), "U": np.ones((n, m)), "b": np.zeros(n)}
    x = 0.3 * rng.standard_normal((T, B, m))
    x[1, 0] = 1e3  # sequence 0, step 2: pre-activations ~ 2000
    jp = sg.JacobianProducts(cell, p, x, None, split="coupling")
    assert np.all(jp.B[1, 0] == 0) and np.all(jp.A == 0)
    rep = jp.check_expansion(3, 0)
    assert rep["ratio_B_A"]["median"] == np.inf and rep["ratio_B_A"]["max"] == np.inf
    assert np.isnan(rep["remainder_at_1_rel_F"]) and np.isnan(rep["remainder_at_1_rel_F0L"])
    assert rep["norm_F0"] == 0.0 and rep["norm_L"] == 0.0


def test_check_expansion_without_gate_terms() -> None:
    """The leaky cell has no gate-derivative terms: with the appendix split B = 0, so F(eps) = F0 and
    L = 0 exactly; every remainder is 0, the slope undefined (NaN: no positive error to fit, and no
    warning), the ratios ||B||/||A|| are 0."""
    cell = cached_builtin("leaky")
    rng = np.random.default_rng(8)
    n, m, B, T = 3, 2, 5, 4
    p = {"W": 0.7 * rng.standard_normal((n, n)), "U": rng.standard_normal((n, m)), "b": 0.3 * rng.standard_normal(n)}
    jp = sg.JacobianProducts(cell, p, rng.standard_normal((T, B, m)), None)
    assert np.all(jp.B == 0)
    rep = jp.check_expansion(4, 1)
    np.testing.assert_array_equal(rep["error"], 0.0)
    assert np.isnan(rep["slope"])
    assert rep["remainder_at_1"] == 0.0 and rep["remainder_at_1_rel_F"] == 0.0 and rep["remainder_at_1_rel_F0L"] == 0.0
    assert rep["ratio_B_A"] == {"median": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    assert rep["norm_L"] == 0.0 and rep["norm_F0"] > 0


def test_check_expansion_without_leak_reports_infinite_ratios() -> None:
    """The plain cell has no leak: with the coupling split A = 0, so F0 = L = 0 (for windows of two or
    more steps), the ratios ||B||/||A|| are inf and the remainder relative to F0 + L is inf — reported
    as such, without a floating-point warning (warnings are errors here)."""
    cell = cached_builtin("plain")
    rng = np.random.default_rng(9)
    n, m, B, T = 3, 2, 5, 4
    p = {"W": 0.7 * rng.standard_normal((n, n)), "U": rng.standard_normal((n, m)), "b": 0.3 * rng.standard_normal(n)}
    x = rng.standard_normal((T, B, m))
    jp = sg.JacobianProducts(cell, p, x, None, split="coupling")
    rep = jp.check_expansion(3, 0)
    assert rep["ratio_B_A"]["median"] == np.inf and rep["ratio_B_A"]["max"] == np.inf
    assert rep["norm_F0"] == 0.0 and rep["norm_L"] == 0.0
    assert rep["remainder_at_1_rel_F0L"] == np.inf
    assert rep["remainder_at_1_rel_F"] == pytest.approx(1.0, rel=1e-14)  # F1 - F0 - L = F1
    assert rep["slope"] == pytest.approx(3.0, abs=1e-9)  # E(eps) = ||F(eps)|| = eps^3 ||F1|| exactly


# ----------------------------------------------------------------------------
# per-lag gradient contributions
# ----------------------------------------------------------------------------


def brute_per_lag(pr: Problem, cot: np.ndarray, param: str, L: int, eps: float = 1.0,
                  A: np.ndarray | None = None, Bm: np.ndarray | None = None) -> np.ndarray:
    """``G_ell = sum_t sum_b delta_t^T (prod_{j=t-ell+1}^t J_j) d+h_{t-ell}/dtheta`` with our Jacobians."""
    shape = np.shape(pr.p[param])
    PJ = [cs_param_jacobian(pr.name, pr.p, [q[k] for q in pr.prev], pr.x[k], param) for k in range(pr.T)]
    J = pr.J if A is None else A + eps * Bm
    n = pr.n
    out = np.zeros((L + 1,) + shape)
    for t in range(1, pr.T + 1):
        for ell in range(0, min(L, t - 1) + 1):
            k = t - ell
            P = np.broadcast_to(np.eye(J.shape[-1]), J.shape[1:]).copy()
            for j in range(k + 1, t + 1):
                P = np.einsum("bij,bjk->bik", J[j - 1], P)
            row = np.einsum("bi,bij->bj", cot[t - 1], P[:, :n, :n])
            out[ell] += np.einsum("bj,bj...->...", row, PJ[k - 1])
    return out


@pytest.mark.parametrize("name,param", [("vector_gate", "W"), ("vector_gate", "U"), ("vector_gate", "b"),
                                        ("scalar_gate", "wg"), ("scalar_gate", "c")])
def test_per_lag_gradients_brute_force(name: str, param: str) -> None:
    """Exact lag-ell contributions from our own Jacobians and complex-step parameter Jacobians; lags
    beyond T - 1 are zero; with eps the coupling part is scaled (coupling split: A = leak)."""
    pr = problem(name)
    rng = np.random.default_rng(21)
    cot = rng.standard_normal((pr.T, pr.B, pr.n))
    L = pr.T + 1
    G = sg.per_lag_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, param, L)
    want = brute_per_lag(pr, cot, param, L)
    assert G.shape == (L + 1,) + np.shape(pr.p[param])
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(G, want, rtol=1e-11, atol=1e-13 * scale)
    assert np.all(G[pr.T:] == 0)
    G0 = sg.per_lag_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, param, 3, eps=0.25)
    jc = sg.JacobianProducts(pr.cell, pr.p, pr.x, pr.h0, split="coupling")
    want0 = brute_per_lag(pr, cot, param, 3, eps=0.25, A=jc.A, Bm=jc.B)
    np.testing.assert_allclose(G0, want0, rtol=1e-11, atol=1e-13 * scale)


def test_per_lag_gradients_of_the_lstm_cell_state() -> None:
    """For the LSTM the retention state is c (leak f): the lag-ell contribution is the docstring's
    ``sum_t delta_t^T [J_t...J_{t-ell+1}]_{cc} d+c_{t-ell}/dWf`` -- the c block of the full (h, c)
    product (paths through h inside the window included), with our complex-step Jacobians
    (rtol 1e-11: sums of ~T^2 products of <= 3 factors of size 8).  T, B < n: a block size taken from
    another axis would select other rows."""
    pr = problem("lstm", n=4, B=2, T=3)
    assert sg.effective_lr(pr.cell, "Wf").state == "c"
    rng = np.random.default_rng(5)
    cot = rng.standard_normal((pr.T, pr.B, pr.n))
    G = sg.per_lag_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, "Wf", pr.T - 1)
    n = pr.n
    want = np.zeros((pr.T,) + pr.p["Wf"].shape)
    for k in range(1, pr.T + 1):
        P_ = pr.p["Wf"]
        C = np.empty((pr.B, n) + P_.shape)  # d+c_k/dWf by the complex step
        for idx in np.ndindex(*P_.shape):
            q = dict(pr.p)
            z = P_.astype(complex)
            z[idx] += 1j * CS
            q["Wf"] = z
            C[(slice(None), slice(None)) + idx] = step_lstm(q, [s[k - 1] for s in pr.prev], pr.x[k - 1])[1].imag / CS
        for t in range(k, pr.T + 1):
            block = pr.product(t, k)[:, n:, n:]
            row = np.einsum("bi,bij->bj", cot[t - 1], block)
            want[t - k] += np.einsum("bj,bjpq->pq", row, C)
    np.testing.assert_allclose(G, want, rtol=1e-11, atol=1e-13 * np.abs(want).max())


# ----------------------------------------------------------------------------
# lag-weighted gradients (zeroth order) and their rows
# ----------------------------------------------------------------------------


def immediate_coefficient(pr: Problem, param: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``C`` (T, B, n) and ``v`` with ``d+h_{k,i}/dtheta = C_{k,i} v_k`` (notes section 2)."""
    gg = pr.gates()
    g = np.broadcast_to(gg["g"], (pr.T, pr.B, pr.n))
    phi, hp = gg["phi"], pr.prev[0]
    if param in ("W", "U", "b"):
        C = g * (1 - phi**2)
    else:  # gate parameters
        C = (phi - hp) * g * (1 - g)
    v = {"W": hp, "U": pr.x, "b": None, "Wg": hp, "Ug": pr.x, "c": None, "wg": hp, "ug": pr.x}[param]
    return C, v


@pytest.mark.parametrize("name,param", [("vector_gate", "W"), ("vector_gate", "U"), ("vector_gate", "b"),
                                        ("vector_gate", "Ug"), ("scalar_gate", "wg"), ("scalar_gate", "ug"),
                                        ("scalar_gate", "c"), ("scalar_gate", "W")])
def test_lag_weighted_gradients_formula(name: str, param: str) -> None:
    """``sum_t sum_b (delta_t * prod lambda * C_{t-ell}) (x) v_{t-ell}`` with C, v the immediate Jacobian's
    per-neuron coefficient and source; rows shared by all neurons (one-row matrices, the scalar c)
    sum over neurons.  A given ``mu`` (here of the follow-up convention times w) is the one used."""
    pr = problem(name)
    rng = np.random.default_rng(31)
    cot = rng.standard_normal((pr.T, pr.B, pr.n))
    L = pr.T + 1
    g = np.broadcast_to(pr.gates()["g"], (pr.T, pr.B, pr.n))
    C, v = immediate_coefficient(pr, param)
    ret = direct_mu(np.ones_like(g), 1 - g, L, "followup")  # prod_{j=t-ell+1}^{t} (1 - g_j)
    shape = np.shape(pr.p[param])
    want = np.zeros((L + 1,) + shape)
    for ell in range(L + 1):
        for t in range(ell + 1, pr.T + 1):
            d = cot[t - 1] * ret[t - 1, ell] * C[t - ell - 1]  # (B, n)
            if v is None:
                want[ell] += d.sum(axis=0) if shape == (pr.n,) else d.sum()
            elif shape[0] == pr.n:
                want[ell] += d.T @ v[t - ell - 1]
            else:
                want[ell] += (d.sum(axis=1) @ v[t - ell - 1])[None, :]
    got = sg.lag_weighted_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, param, L)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14 * np.abs(want).max())
    short = sg.lag_weighted_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, param, 2)  # fewer lags than steps
    np.testing.assert_allclose(short, want[:3], rtol=1e-11, atol=1e-14 * np.abs(want).max())
    # with a precomputed mu (another convention: the retention alone), that mu is used
    mu_f = sg.effective_lrs(pr.cell, pr.p, pr.x, pr.h0, param=param, max_lag=L, convention="followup")
    got_f = sg.lag_weighted_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, param, L, mu=mu_f)
    rho = tr.immediate_rows(pr.cell, pr.p, pr.x, pr.h0, param).sensitivity
    want_f = np.zeros_like(want)
    for ell in range(L + 1):
        for t in range(ell + 1, pr.T + 1):
            d = cot[t - 1] * ret[t - 1, ell] * rho[t - ell - 1]
            if v is None:
                want_f[ell] += d.sum(axis=0) if shape == (pr.n,) else d.sum()
            elif shape[0] == pr.n:
                want_f[ell] += d.T @ v[t - ell - 1]
            else:
                want_f[ell] += (d.sum(axis=1) @ v[t - ell - 1])[None, :]
    np.testing.assert_allclose(got_f, want_f, rtol=1e-11, atol=1e-14 * np.abs(want_f).max())


def test_lag_weighted_gradients_beyond_fifty_lags() -> None:
    """Lags past the default 50 of effective_lrs are computed when asked (T = 53, max_lag = 52):
    the last lags follow the same formula (one window each)."""
    pr = problem("vector_gate", n=2, m=1, B=1, T=53)
    rng = np.random.default_rng(3)
    cot = rng.standard_normal((pr.T, pr.B, pr.n))
    L = pr.T - 1
    got = sg.lag_weighted_gradients(pr.cell, pr.p, pr.x, pr.h0, cot, "b", L)
    g = pr.gates()["g"]
    C, _ = immediate_coefficient(pr, "b")
    for ell in (L - 1, L):
        want = np.zeros(pr.n)
        for t in range(ell + 1, pr.T + 1):
            want += (cot[t - 1] * np.prod(1 - g[t - ell:t], axis=0) * C[t - ell - 1]).sum(axis=0)
        np.testing.assert_allclose(got[ell], want, rtol=1e-11, atol=1e-300)


def test_immediate_rows() -> None:
    """The rows of W for the vector gate: w = g, rho = 1 - phi^2, leak = 1 - g, source h_{t-1}, kind
    matrix; for the bias b the source is None and the kind vector."""
    pr = problem("vector_gate")
    gg = pr.gates()
    rows = tr.immediate_rows(pr.cell, pr.p, pr.x, pr.h0, "W")
    np.testing.assert_allclose(rows.write_gain, gg["g"], rtol=1e-14)
    np.testing.assert_allclose(rows.sensitivity, 1 - gg["phi"] ** 2, rtol=1e-13)
    np.testing.assert_allclose(rows.leak, 1 - gg["g"], rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(rows.source, pr.prev[0], rtol=1e-14)
    assert rows.kind == "matrix"
    rb = tr.immediate_rows(pr.cell, pr.p, pr.x, pr.h0, "b")
    assert rb.source is None and rb.kind == "vector"


def test_contract_rows_by_kind() -> None:
    """Per-neuron rows d (x) v summed over steps and sequences: a full matrix, a one-row matrix (summed
    over neurons), a per-neuron vector, a one-entry vector and a scalar."""
    rng = np.random.default_rng(41)
    d = rng.standard_normal((4, 2, 3))
    v = rng.standard_normal((4, 2, 5))
    full = sum(np.outer(d[t, b], v[t, b]) for t in range(4) for b in range(2))
    np.testing.assert_allclose(tr.contract_rows(d, v, "matrix", (3, 5)), full, rtol=1e-13)
    shared = sum(d[t, b].sum() * v[t, b] for t in range(4) for b in range(2))[None, :]
    np.testing.assert_allclose(tr.contract_rows(d, v, "matrix", (1, 5)), shared, rtol=1e-13)
    np.testing.assert_allclose(tr.contract_rows(d, v[0, 0], "matrix", (3, 5)),
                               np.outer(d.sum(axis=(0, 1)), v[0, 0]), rtol=1e-13)
    np.testing.assert_allclose(tr.contract_rows(d, None, "vector", (3,)), d.sum(axis=(0, 1)), rtol=1e-13)
    np.testing.assert_allclose(tr.contract_rows(d, None, "vector", (1,)), [d.sum()], rtol=1e-13)
    s = tr.contract_rows(d, None, "scalar", ())
    assert np.shape(s) == () and float(s) == pytest.approx(d.sum(), rel=1e-13)


# ----------------------------------------------------------------------------
# decoupled parameters and per-step values
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,recurrent", [
    ("vector_gate", {"W", "Wg"}), ("scalar_gate", {"W", "wg"}), ("gru", {"Wz", "Wr", "Wn"}),
    ("lstm", {"Wi", "Wf", "Wo", "Wc"}), ("leaky", {"W"}), ("mgu", {"Wf", "Wn"}),
])
def test_decoupled_zeroes_exactly_the_recurrent_matrices(name: str, recurrent: set[str]) -> None:
    """The matrices that read the state (directly or through a state-dependent node: the GRU's
    ``Wn`` reads ``r*h``) are zero, everything else an equal copy (not the same array)."""
    cell = cached_builtin(name)
    rng = np.random.default_rng(51)
    params = {p.name: rng.standard_normal((3, 3)) if p.kind == "matrix" else rng.standard_normal(3)
              for p in cell.params}
    out = sg.decoupled(cell, params)
    assert set(out) == set(params)
    for k, v in out.items():
        if k in recurrent:
            assert np.all(v == 0) and v.shape == params[k].shape, k
        else:
            np.testing.assert_array_equal(v, params[k])
            assert v is not params[k]
            v[...] = 0
            assert np.any(params[k] != 0), "decoupled() must copy, not alias"


def test_step_values() -> None:
    """Per-step values: constants, vector and scalar parameters as given, matrices by their diagonal
    (square), their row (one row), the input, the states *before* each step, and the nodes."""
    pr = problem("scalar_gate")
    traj = sg.reference_kernel(pr.cell, "float64").forward(pr.p, pr.x, pr.h0)
    vals = tr.step_values(pr.cell, pr.p, traj)
    np.testing.assert_array_equal(vals["W_diag"], np.diagonal(pr.p["W"]))
    np.testing.assert_array_equal(vals["wg_diag"], pr.p["wg"][0])
    np.testing.assert_array_equal(vals["ug_diag"], pr.p["ug"][0])
    np.testing.assert_array_equal(vals["b"], pr.p["b"])
    assert float(vals["c"]) == float(pr.p["c"])
    np.testing.assert_array_equal(vals["x"], pr.x)
    np.testing.assert_allclose(vals["h"], pr.prev[0], rtol=1e-13, atol=1e-15)
    for k, v in traj.nodes.items():
        np.testing.assert_array_equal(vals[k], v)
    leaky = sg.cells.leaky(0.3)
    rng = np.random.default_rng(2)
    pl = {"W": rng.standard_normal((2, 2)), "U": rng.standard_normal((2, 3)), "b": np.zeros(2)}
    tl = sg.reference_kernel(leaky, "float64").forward(pl, rng.standard_normal((4, 1, 3)))
    vl = tr.step_values(leaky, pl, tl)
    assert float(vl["alpha"]) == 0.3
    np.testing.assert_array_equal(vl["h"][0], 0.0)  # zero initial state before step 1
    np.testing.assert_array_equal(vl["h"][1], tl.h[0])


@sg.cell
def column_gate(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
                wg: sg.Matrix(1, "n"), v: sg.Matrix("n", 1)):
    """A scalar gate fed back through a column matrix ``v`` (n x 1): its diagonal reads ``v[:, 0]``."""
    s = sg.sigmoid(wg @ h)
    return 0.5 * h + 0.5 * sg.tanh(W @ h + U @ x + v @ s)


def test_step_values_column_matrix_and_first_order() -> None:
    """An n x 1 matrix enters the diagonal by its column: first_order matches the complex-step diagonal."""
    rng = np.random.default_rng(61)
    n, m, B, T = 3, 2, 5, 4
    p = {"W": 0.5 * rng.standard_normal((n, n)), "U": rng.standard_normal((n, m)),
         "wg": rng.standard_normal((1, n)), "v": rng.standard_normal((n, 1))}
    x = rng.standard_normal((T, B, m))
    h0 = rng.standard_normal((B, n))
    traj = sg.reference_kernel(column_gate, "float64").forward(p, x, {"h": h0})
    vals = tr.step_values(column_gate, p, traj)
    np.testing.assert_array_equal(vals["v_diag"], p["v"][:, 0])

    def step(q, s, xt):
        (h,) = s
        sg_ = sig(h @ q["wg"].T)
        return (0.5 * h + 0.5 * np.tanh(h @ q["W"].T + xt @ q["U"].T + sg_ @ q["v"].T),)

    prev = np.concatenate([h0[None], traj.h[:-1]])
    diag = np.empty((T, B, n))
    for t in range(T):
        for q in range(n):
            z = prev[t].astype(complex)
            z[:, q] += 1j * CS
            diag[t, :, q] = step(p, (z,), x[t])[0][:, q].imag / CS
    mu = sg.effective_lrs(column_gate, p, x, {"h": h0}, max_lag=3, first_order=True)
    ratio = (diag - 0.5) / 0.5
    for t in range(1, T + 1):
        for ell in range(0, min(3, t - 1) + 1):
            want = mu.mu[t - 1, ell] * ratio[t - ell:t].sum(axis=0)
            np.testing.assert_allclose(mu.first_order[t - 1, ell], want, rtol=1e-11, atol=1e-14)


@sg.cell
def hidden_layer(h: sg.State("n"), x: sg.Input("m"), Wk: sg.Matrix("k", "n"), W2: sg.Matrix("n", "k"),
                 U: sg.Matrix("n", "m")):
    """A leaky cell with a hidden layer of its own size k (known only from a node)."""
    u = sg.tanh(Wk @ h)
    return 0.5 * h + 0.5 * sg.tanh(W2 @ u + U @ x)


def test_jacobian_products_with_a_hidden_dimension() -> None:
    """The state Jacobian through a hidden layer of size k (neither a state, an input nor 1):
    A + B is the complex-step Jacobian of the same equations (rtol: a few roundings)."""
    rng = np.random.default_rng(71)
    n, k, m, B, T = 3, 5, 2, 4, 3
    p = {"Wk": 0.5 * rng.standard_normal((k, n)), "W2": 0.5 * rng.standard_normal((n, k)), "U": rng.standard_normal((n, m))}
    x = rng.standard_normal((T, B, m))
    h0 = rng.standard_normal((B, n))

    def step(h, xt):
        return 0.5 * h + 0.5 * np.tanh(np.tanh(h @ p["Wk"].T) @ p["W2"].T + xt @ p["U"].T)

    jp = sg.JacobianProducts(hidden_layer, p, x, {"h": h0}, split="coupling")
    h = h0
    for t in range(T):
        J = np.empty((B, n, n))
        for q in range(n):
            z = h.astype(complex)
            z[:, q] += 1j * CS
            J[:, :, q] = step(z, x[t]).imag / CS
        np.testing.assert_allclose(jp.A[t] + jp.B[t], J, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(jp.A[t], np.broadcast_to(0.5 * np.eye(n), (B, n, n)), rtol=0, atol=0)
        h = step(h, x[t])
