"""numpy reference kernels: shapes, dtypes, consistency properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import symgate as sg
from symgate.testing import draw_problem


def test_forward_shapes_and_nodes(builtin_cell: sg.Cell) -> None:
    prob = draw_problem(builtin_cell, 3, n=4, m=2, B=3, T=5)
    traj = sg.reference_kernel(builtin_cell).forward(prob.params, prob.x, prob.h0)
    for s in builtin_cell.state_names:
        assert traj.states[s].shape == (5, 3, 4)
    for gate in builtin_cell.gates:
        v = traj.nodes[gate.name]
        assert v.shape[:2] == (5, 3) and np.all((v > 0) & (v < 1))


def test_default_h0_is_zero() -> None:
    c = sg.cells.leaky()
    prob = draw_problem(c, 0, n=3, m=2, B=2, T=3)
    k = sg.reference_kernel(c)
    a = k.forward(prob.params, prob.x).h
    b = k.forward(prob.params, prob.x, np.zeros((2, 3))).h
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_preserved(builtin_cell: sg.Cell, dtype: str) -> None:
    prob = draw_problem(builtin_cell, 1, n=3, m=2, B=2, T=3)
    cast = lambda a: np.array(a, dtype=dtype)  # noqa: E731
    k = sg.reference_kernel(builtin_cell, dtype)
    p = {n: cast(v) for n, v in prob.params.items()}
    h0 = {n: cast(v) for n, v in prob.h0.items()}
    loss = sg.losses.last_mse(cast(prob.V), cast(prob.y_last))
    g = k.backward(p, cast(prob.x), h0, loss=loss)
    assert all(v.dtype == np.dtype(dtype) for v in g.params.values())
    assert all(g.params[n].shape == p[n].shape for n in p)


def test_batch_consistency(builtin_cell: sg.Cell) -> None:
    """A batch of B equals B runs of batch 1 (forward and parameter gradients)."""
    prob = draw_problem(builtin_cell, 5, n=3, m=2, B=3, T=4)
    k = sg.reference_kernel(builtin_cell)
    full = k.forward(prob.params, prob.x, prob.h0)
    g = k.vjp(prob.params, prob.x, prob.h0, {s: np.ones_like(v) for s, v in full.states.items()})
    total = {n: np.zeros_like(v) for n, v in g.params.items()}
    for b in range(3):
        xb = np.ascontiguousarray(prob.x[:, b:b + 1])
        hb = {s: np.ascontiguousarray(v[b:b + 1]) for s, v in prob.h0.items()}
        one = k.forward(prob.params, xb, hb)
        for s in full.states:
            np.testing.assert_allclose(one.states[s][:, 0], full.states[s][:, b], rtol=0, atol=1e-15)
        gb = k.vjp(prob.params, xb, hb, {s: np.ones_like(v) for s, v in one.states.items()})
        for n in total:
            total[n] += gb.params[n]
    for n in total:
        np.testing.assert_allclose(total[n], g.params[n], rtol=1e-13, atol=1e-14)


def test_jvp_is_linear_in_tangents() -> None:
    c = sg.cells.gru()
    prob = draw_problem(c, 7, n=3, m=2, B=2, T=3)
    k = sg.reference_kernel(c)
    rng = np.random.default_rng(0)
    t1 = {n: rng.standard_normal(np.shape(v)) for n, v in prob.params.items()}
    t2 = {n: rng.standard_normal(np.shape(v)) for n, v in prob.params.items()}
    a = k.jvp(prob.params, prob.x, prob.h0, t1)["h"]
    b = k.jvp(prob.params, prob.x, prob.h0, t2)["h"]
    ab = k.jvp(prob.params, prob.x, prob.h0, {n: 2 * t1[n] - 3 * t2[n] for n in t1})["h"]
    np.testing.assert_allclose(ab, 2 * a - 3 * b, rtol=1e-12, atol=1e-14)


def test_zero_cotangent_gives_zero_gradient(builtin_cell: sg.Cell) -> None:
    prob = draw_problem(builtin_cell, 2, n=2, m=1, B=1, T=2)
    k = sg.reference_kernel(builtin_cell)
    g = k.vjp(prob.params, prob.x, prob.h0, {s: np.zeros((2, 1, 2)) for s in builtin_cell.state_names})
    assert all(np.all(v == 0) for v in g.params.values())


def test_dense_jacobian_of_plain_cell_by_hand() -> None:
    """Plain tanh RNN: J = diag(1 - tanh(W h + U x + b)^2) W, typed here independently."""
    c = sg.cells.plain()
    prob = draw_problem(c, 11, n=4, m=2, B=2, T=1)
    p = prob.params
    J = sg.reference_kernel(c).jacobian(p, prob.x[0], prob.h0)
    a = prob.h0["h"] @ p["W"].T + prob.x[0] @ p["U"].T + p["b"]
    expected = (1 - np.tanh(a) ** 2)[:, :, None] * p["W"][None]
    np.testing.assert_allclose(J, expected, rtol=1e-14, atol=1e-15)


def test_last_mse_value_matches_definition() -> None:
    c = sg.cells.vector_gate()
    prob = draw_problem(c, 4, n=3, m=2, B=4, T=3)
    k = sg.reference_kernel(c)
    g = k.backward(prob.params, prob.x, prob.h0, loss=prob.loss("last"))
    hT = k.forward(prob.params, prob.x, prob.h0).h[-1]
    assert g.value == pytest.approx(np.mean((hT @ prob.V.T - prob.y_last) ** 2), rel=1e-14)
    assert g.readout["V"].shape == prob.V.shape


@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 40))
def test_gates_stay_in_unit_interval_and_states_bounded(seed: int, T: int) -> None:
    """Convex gated updates keep |h| <= max(|h0|, 1) for tanh candidates."""
    c = sg.testing.cached_builtin("vector_gate")
    prob = draw_problem(c, seed, n=4, m=2, B=2, T=T, rho=3.0)
    traj = sg.reference_kernel(c).forward(prob.params, prob.x, prob.h0)
    assert np.all(np.abs(traj.h) <= max(1.0, float(np.max(np.abs(prob.h0["h"])))) + 1e-12)


def test_long_sequences_stay_finite_with_extreme_inputs() -> None:
    """Stable logistic/softplus: huge pre-activations give no overflow (warnings are errors here)."""
    c = sg.testing.build_random_cell(sg.testing.Recipe("softplus", "vector", "logdomain", "convex", True, True, False))
    prob = draw_problem(c, 0, n=3, m=2, B=2, T=50)
    x = 1e3 * prob.x
    traj = sg.reference_kernel(c).forward(prob.params, x, prob.h0)
    assert np.all(np.isfinite(traj.h))
