"""Saturated gates and candidates: complements evaluated stably, checked against mpmath.

With a gate bias of +40, ``g = sigmoid(u)`` rounds to 1.0 and ``1 - g`` computed from it is
0, where the exact retention is ``sigmoid(-u) ~ 4e-18``; with weights x100 the candidate's
``tanh`` rounds to +-1 and ``1 - phi**2`` is 0 too.  The derivation's stable forms
(``sigmoid(-u)``, ``sech2(u)``, ``log(1 - g) = -softplus(u)``) keep every digit.  The
expectations below are typed from the paper's formulas (paper-notes section 2, vector
gate) and evaluated in 60-digit arithmetic.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import symgate as sg

CELL = sg.cells.vector_gate()


def _problem(bias: float, scale: float, T: int, B: int = 2, n: int = 3, m: int = 2, seed: int = 3) -> tuple:
    prob = sg.testing.draw_problem(CELL, seed, n=n, m=m, B=B, T=T, rho=0.9)
    p = {k: (v * scale if v.ndim == 2 else v.copy()) for k, v in prob.params.items()}
    p["c"] = np.full(n, bias)
    return p, prob.x, prob.h0["h"], prob.V, prob.y_last


def _mp(a: np.ndarray) -> mpmath.matrix:
    return mpmath.matrix(a.tolist())


def _mp_forward_and_h0_gradient(p: dict, x: np.ndarray, h0: np.ndarray, V: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dh0 of the last-state MSE by BPTT in 60-digit arithmetic, from the paper's vector-gate
    Jacobian J_t = diag(1-g) + diag(g) diag(1-phi^2) W + diag(phi - h) diag(g(1-g)) Wg."""
    T, B, _ = x.shape
    n = h0.shape[1]
    out = np.empty_like(h0)
    with mpmath.workdps(60):
        W, U, Wg, Ug = (_mp(p[k]) for k in ("W", "U", "Wg", "Ug"))
        b, c, Vm = _mp(p["b"][:, None]), _mp(p["c"][:, None]), _mp(V)
        for s in range(B):
            h = _mp(h0[s][:, None])
            jacobians = []
            for t in range(T):
                xt = _mp(x[t, s][:, None])
                a, z = W * h + U * xt + b, Wg * h + Ug * xt + c
                phi = [mpmath.tanh(a[i]) for i in range(n)]
                g = [1 / (1 + mpmath.exp(-z[i])) for i in range(n)]
                J = mpmath.matrix(n, n)
                for i in range(n):
                    for j in range(n):
                        J[i, j] = (g[i] * (1 - phi[i] ** 2) * W[i, j]
                                   + (phi[i] - h[i]) * g[i] * (1 - g[i]) * Wg[i, j] + (1 - g[i] if i == j else 0))
                jacobians.append(J)
                h = mpmath.matrix([(1 - g[i]) * h[i] + g[i] * phi[i] for i in range(n)])
            r = Vm * h - _mp(y[s][:, None])
            adj = (Vm.T * r) * (mpmath.mpf(2) / (B * V.shape[0]))
            for J in reversed(jacobians):
                adj = J.T * adj
            out[s] = [float(adj[i]) for i in range(n)]
    return out


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("bias", [40.0, -40.0])
def test_h0_gradient_at_saturation_matches_mpmath(backend: str, bias: float) -> None:
    p, x, h0, V, y = _problem(bias, scale=100.0, T=6)
    k = sg.compile(CELL) if backend == "compiled" else sg.reference_kernel(CELL)
    got = k.backward(p, x, {"h": h0}, loss=sg.losses.last_mse(V, y)).h0["h"]
    exact = _mp_forward_and_h0_gradient(p, x, h0, V, y)
    assert np.all(exact != 0)  # tiny but representable: the check is meaningful
    rel = np.abs(got - exact) / np.abs(exact)
    assert rel.max() <= 1e-8, (rel.max(), exact)


def test_saturated_products_were_lost_before() -> None:
    """The same gradient from the rounded complements (``1 - g`` from ``g``): the error the
    stable forms remove is real, not hypothetical."""
    p, x, h0, V, y = _problem(40.0, scale=100.0, T=6)
    traj = sg.reference_kernel(CELL).forward(p, x, {"h": h0})
    g = traj.nodes["g"]
    assert np.any(g == 1.0)  # the gate rounds to one: 1 - g would be 0
    assert np.all(traj.aux["1-g"] > 0)  # its stable complement is not


@pytest.mark.parametrize("bias", [40.0, -40.0])
def test_log_mu_at_saturation_matches_mpmath(bias: float) -> None:
    """log mu = log g[t-l] + sum_j log(1 - g[j]) (write gain x retention, paper-notes section 10),
    finite at every lag and within 1e-10 relative of its 60-digit value from the same pre-activations."""
    T, lags = 5001, (0, 1, 5, 50, 500, 5000)
    p, x, h0, V, y = _problem(bias, scale=1.0, T=T, B=1)
    mu = sg.effective_lrs(CELL, p, x, {"h": h0}, max_lag=max(lags))
    traj = sg.reference_kernel(CELL).forward(p, x, {"h": h0})
    u = traj.nodes["z_Wg"] + traj.nodes["z_Ug"] + p["c"]  # the gate's pre-activation, (T, 1, n)
    t = T  # the last step
    with mpmath.workdps(60):
        for q in range(u.shape[-1]):
            log_g = [-mpmath.log(1 + mpmath.exp(-mpmath.mpf(float(v)))) for v in u[:, 0, q]]
            log_1mg = [-mpmath.log(1 + mpmath.exp(mpmath.mpf(float(v)))) for v in u[:, 0, q]]
            for ell in lags:
                exact = log_g[t - ell - 1] + mpmath.fsum(log_1mg[t - ell:t])
                got = mu.log_abs_mu[t - 1, ell, 0, q]
                assert np.isfinite(got)
                assert abs(got - float(exact)) <= 1e-10 * abs(float(exact)) + 1e-300, (ell, got, float(exact))
    if bias > 0:  # the figures: about -41 at lag 1 and -2.0e5 at lag 5000
        assert -45 < mu.log_abs_mu[t - 1, 1, 0, 0] < -35
        assert -2.1e5 < mu.log_abs_mu[t - 1, 5000, 0, 0] < -1.9e5


def test_companions_are_the_stable_complements() -> None:
    """The kernels' companion values equal sigmoid(-u) and 1 - tanh(a)^2 in 60-digit arithmetic."""
    p, x, h0, V, y = _problem(40.0, scale=100.0, T=4)
    for k in (sg.reference_kernel(CELL), sg.compile(CELL)):
        traj = k.forward(p, x, {"h": h0})
        u = traj.nodes["z_Wg"] + traj.nodes["z_Ug"] + p["c"]
        a = traj.nodes["z_W"] + traj.nodes["z_U"] + p["b"]
        with mpmath.workdps(60):
            gc = np.vectorize(lambda v: float(1 / (1 + mpmath.exp(mpmath.mpf(float(v))))))(u)
            d = np.vectorize(lambda v: float(mpmath.sech(mpmath.mpf(float(v))) ** 2))(a)
        assert np.allclose(traj.aux["1-g"], gc, rtol=1e-13, atol=0)
        assert np.allclose(traj.aux["1-phi^2"], d, rtol=1e-12, atol=0)
