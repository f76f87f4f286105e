"""No silent numbers: both backends raise NumericalError where a result is NaN or infinite.

Every value a kernel returns or stores -- all steps of all states, every node and matrix
product, the loss, every gradient, every state tangent -- is checked.  Finite inputs that
give a non-finite value raise :class:`symgate.NumericalError` naming the stage, in the
compiled kernels and in the numpy reference alike (no numpy RuntimeWarning, no NaN handed
back).
"""

from __future__ import annotations

import numpy as np
import pytest

import symgate as sg

BACKENDS = ["reference", "compiled"]


def _kernel(cell: sg.Cell, backend: str) -> sg.ReferenceKernel:
    return sg.compile(cell) if backend == "compiled" else sg.reference_kernel(cell)


@sg.cell
def second_state_overflows(h: sg.State("n"), c: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"),
                           U: sg.Matrix("n", "m")):
    """The first state stays bounded; the second grows by e^30 per step (inf after ~24 steps)."""
    return sg.tanh(W @ h + U @ x), c * sg.exp(30 + 0.01 * (U @ x)) + h


@sg.cell
def reciprocal(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
    """h' = 1/h: from a subnormal h0, inf at steps 1, 3, 5 and 0 at steps 2, 4, 6 (finite at the end)."""
    return (1 / h) * (1 + 1e-20 * sg.tanh(U @ x))


@sg.cell
def infinite_node(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
    """e = exp(exp(12 + ...)) is infinite while the state 0.5 h + 1/(1 + e) stays finite."""
    e = sg.exp(sg.exp(12 + 0.1 * sg.tanh(W @ h + U @ x)))
    return 0.5 * h + 1 / (1 + e)


@sg.cell
def log_of_negative(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
    """log(z) of a pre-activation that takes negative values."""
    return 0.5 * h + 0.1 * sg.log(W @ h + U @ x)


@sg.cell
def doubling(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
    """Jacobian 2 I: finite forward pass, but cotangents of 1e300 overflow after a few steps back."""
    return 2 * h + sg.tanh(U @ x)


def _arrays(cell: sg.Cell, T: int = 6, B: int = 3, n: int = 2, m: int = 2, seed: int = 0) -> tuple[dict, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    params = {p.name: rng.standard_normal(tuple(n if d == "n" else m for d in p.shape)) for p in cell.params}
    x = rng.standard_normal((T, B, m))
    h0 = {s.name: rng.uniform(0.1, 0.5, (B, n)) for s in cell.states}
    return params, x, h0


def _loss(B: int = 3, n: int = 2) -> sg.losses.LastMSE:
    return sg.losses.last_mse(np.ones((1, n)), np.zeros((B, 1)))


def _all_entry_points(k: sg.ReferenceKernel, params: dict, x: np.ndarray, h0: dict) -> list:
    T, B, m = x.shape
    cot = {s: np.ones_like(v[None].repeat(T, 0)) for s, v in h0.items()}
    tangents = {"x": np.ones_like(x)}
    calls = [lambda: k.forward(params, x, h0), lambda: k.backward(params, x, h0, loss=_loss(B)),
             lambda: k.vjp(params, x, h0, cot), lambda: k.jvp(params, x, h0, tangents)]
    if k.backend == "compiled":
        calls.append(lambda: k.prepare(params, x, h0, loss=_loss(B))())
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_state_overflow_is_reported(backend: str) -> None:
    cell = second_state_overflows
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell, T=40)
    for call in _all_entry_points(k, params, x, h0):
        with pytest.raises(sg.NumericalError, match="forward pass"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_infinite_at_intermediate_steps_is_reported(backend: str) -> None:
    cell = reciprocal
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell, T=6)
    h0 = {"h": np.full((3, 2), 1e-310)}  # subnormal: 1/h0 overflows
    with np.errstate(all="ignore"):  # the expectation, by plain numpy
        h, seen = h0["h"], []
        for _ in range(6):
            h = 1 / h
            seen.append(bool(np.all(np.isfinite(h))))
    assert seen == [False, True, False, True, False, True]  # finite at the last step
    for call in _all_entry_points(k, params, x, h0):
        with pytest.raises(sg.NumericalError, match="forward pass"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_node_is_reported(backend: str) -> None:
    cell = infinite_node
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell)
    for call in _all_entry_points(k, params, x, h0):
        with pytest.raises(sg.NumericalError, match="forward pass"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_of_a_negative_number_is_reported(backend: str) -> None:
    cell = log_of_negative
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell)
    for call in _all_entry_points(k, params, x, h0):
        with pytest.raises(sg.NumericalError):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_loss_is_reported(backend: str) -> None:
    cell = sg.cells.vector_gate()
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell)
    params["b"], params["c"] = np.zeros(2), np.zeros(2)
    loss = sg.losses.last_mse(np.full((1, 2), 1e200), np.zeros((3, 1)))
    with pytest.raises(sg.NumericalError, match="loss"):
        k.backward(params, x, h0, loss=loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_gradient_is_reported(backend: str) -> None:
    cell = doubling
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell, T=30)
    k.forward(params, x, h0)  # the forward pass is finite: 2^30 at most
    cot = {"h": np.full((30, 3, 2), 1e300)}
    with pytest.raises(sg.NumericalError, match="gradient"):
        k.vjp(params, x, h0, cot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_tangent_is_reported(backend: str) -> None:
    cell = doubling
    k = _kernel(cell, backend)
    params, x, h0 = _arrays(cell, T=30)
    with pytest.raises(sg.NumericalError, match="tangent"):
        k.jvp(params, x, h0, {"h0": {"h": np.full((3, 2), 1e300)}})


def test_reference_emits_no_floating_point_warning() -> None:
    """The suite turns warnings into errors: a RuntimeWarning would fail here instead of the NumericalError."""
    import warnings

    k = sg.reference_kernel(log_of_negative)
    params, x, h0 = _arrays(log_of_negative)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(sg.NumericalError):
            k.forward(params, x, h0)


def test_finite_results_pass_both_backends() -> None:
    """The checks do not reject finite results: the same cells with tame inputs run on both backends."""
    for cell in (second_state_overflows, infinite_node, doubling):
        params, x, h0 = _arrays(cell, T=3)
        if cell is infinite_node:
            continue  # infinite by construction
        for backend in BACKENDS:
            k = _kernel(cell, backend)
            for call in _all_entry_points(k, params, x, h0):
                call()
