"""The verification battery on every registered cell and on random cells.

Registering a cell (``symgate.testing.register``) is all it takes to get these
tests: the built-ins are registered by default.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy
from hypothesis import given

import symgate as sg
from symgate.testing import CHECKS, all_recipes, random_cell_pool, registered_cells
from symgate.testing._battery import check_adjoint, check_bptt_complex_step, check_jacobian, check_mpmath

REGISTERED = registered_cells()
TIERS = ["fast", pytest.param("thorough", marks=pytest.mark.slow)]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_cell_passes_check(name: str, check: str) -> None:
    report = sg.testing.verify(REGISTERED[name], examples=2, checks=[check], raise_on_failure=False)
    assert report.passed, report.summary()
    assert len(report.results) == 2


@pytest.mark.parametrize("tier", TIERS)
@given(prob=sg.testing.problems(sg.testing.builtin_cells()))
def test_builtin_problems_jacobian_and_adjoint(tier: str, prob: sg.testing.Problem) -> None:
    for r in (check_jacobian(prob), check_adjoint(prob), check_bptt_complex_step(prob, "step")):
        assert r.passed, f"{r.check}: {r.error:.3e} > {r.tolerance:.3e}; {r.detail}"


@pytest.mark.parametrize("tier", TIERS)
@given(prob=sg.testing.problems(sg.testing.random_cells()))
def test_random_cell_problems_full_battery(tier: str, prob: sg.testing.Problem) -> None:
    for name, check in CHECKS.items():
        r = check(prob)
        assert r.passed, f"{name}: {r.error:.3e} > {r.tolerance:.3e}; {r.detail}"


POOL = random_cell_pool(200, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(POOL)))
def test_random_cell_pool(index: int) -> None:
    """200 distinct random cells (a fixed, seeded pool) pass the whole battery."""
    cell = sg.testing.cached_random(POOL[index])
    report = sg.testing.verify(cell, examples=1, seed=index, raise_on_failure=False)
    assert report.passed, report.summary()


def test_pool_is_distinct_and_deterministic() -> None:
    assert len(set(POOL)) == 200
    assert random_cell_pool(200, seed=0) == POOL
    assert random_cell_pool(200, seed=1) != POOL


def test_battery_catches_a_wrong_derivative_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation test: with tanh' = 1 - y (instead of 1 - y**2) the battery must fail."""
    from symgate import _functions

    monkeypatch.setitem(_functions.DERIVATIVE_RULES, sympy.tanh, lambda y, u: 1 - y)
    broken = sg.cells.vector_gate()  # a fresh cell object: derived with the broken rule
    report = sg.testing.verify(broken, examples=2, raise_on_failure=False)
    failed = {r.check for r in report.failures()}
    assert {"jacobian", "bptt_cs", "bptt_fd", "mpmath"} <= failed
    with pytest.raises(sg.VerificationError, match="vector_gate"):
        report.raise_if_failed()


def test_battery_catches_a_wrong_backward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation test: dropping the gate-derivative term from BPTT breaks the gradient checks only."""
    from symgate import _reference

    cell = sg.cells.vector_gate()
    k = sg.reference_kernel(cell)
    orig = k._backward

    def broken_backward(params, traj, cots):  # type: ignore[no-untyped-def]
        g = orig(params, traj, cots)
        g.params["Wg"] = 0.5 * g.params["Wg"]
        return g

    monkeypatch.setattr(k, "_backward", broken_backward)
    report = sg.testing.verify(cell, examples=2, checks=["bptt_cs", "bptt_fd", "adjoint"], raise_on_failure=False)
    assert {r.check for r in report.failures()} == {"bptt_cs", "bptt_fd", "adjoint"}


def test_battery_test_class_factory() -> None:
    cls = sg.testing.battery_test_class(sg.cells.leaky(0.3), examples=1)
    tests = [m for m in dir(cls) if m.startswith("test_")]
    assert sorted(tests) == sorted(f"test_{c}" for c in CHECKS)
    for m in tests:
        getattr(cls(), m)()


def test_register_user_cell() -> None:
    @sg.testing.register
    @sg.cell
    def user_leaky_gate(h: sg.State(), x: sg.Input(), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
                        Wg: sg.Matrix("n", "n")):
        g = sg.sigmoid(Wg @ h)
        return (1 - g) * h + g * sg.tanh(W @ h + U @ x)

    assert sg.testing.registered_cells()["user_leaky_gate"] is user_leaky_gate
    assert sg.testing.verify(user_leaky_gate, examples=1).passed


def test_report_worst_and_summary() -> None:
    rep = sg.testing.verify(sg.cells.plain(), examples=2)
    assert set(rep.worst) == set(CHECKS)
    assert "PASS" in rep.summary()
    assert all(r.error >= 0 and np.isfinite(r.error) for r in rep.results)


# draws where the readout nearly cancels (n = m = B = T = 1): the loss is almost stationary along h,
# so every gradient contribution shrinks while its rounding does not (see "Readout cancellation" in
# symgate/testing/_battery.py); before the readout counted in the scale, these failed by up to 38x
READOUT_CANCELLATION = [
    ("bptt_cs", 847355203, 0.8096989040054037),
    ("bptt_cs", 3877181465, 0.4523814235088619),
    ("float32", 3274844750, 1.035258070337586),
    ("float32", 3192996208, 0.6676473583337632),
]


@pytest.mark.parametrize("check, seed, rho", READOUT_CANCELLATION)
def test_readout_cancellation_is_not_an_error(check: str, seed: int, rho: float) -> None:
    from symgate.testing import Recipe
    from symgate.testing._battery import _absolute_readout_gradient, _direction, _directional, check_float32

    cell = sg.testing.cached_random(Recipe("softplus", "vector", "none", "additive", False, True, False))
    prob = sg.testing.draw_problem(cell, seed, n=1, m=1, B=1, T=1, rho=rho)
    k = sg.reference_kernel(cell)
    if check == "bptt_cs":
        loss = prob.loss("last")
        dp, dh, dx = _direction(prob, np.random.default_rng(seed + 17))
        g = k.backward(prob.params, prob.x, prob.h0, loss=loss)
        contributions = _directional(g, dp, dh, dx)[1]
        readout = _directional(_absolute_readout_gradient(cell, prob.params, prob.x, prob.h0, loss), dp, dh, dx)[1]
        r = check_bptt_complex_step(prob, "last")
        absolute_error = r.error * readout  # |BPTT - complex step|
    else:
        f = lambda a: np.array(a, dtype=np.float32)  # noqa: E731
        p, x, h0 = {n: f(v) for n, v in prob.params.items()}, f(prob.x), {n: f(v) for n, v in prob.h0.items()}
        p64, x64, h64 = {n: v.astype(float) for n, v in p.items()}, x.astype(float), {n: v.astype(float) for n, v in h0.items()}
        loss = sg.losses.LastMSE(f(prob.V).astype(float), f(prob.y_last).astype(float))
        g64 = k.backward(p64, x64, h64, loss=loss)
        g32 = sg.reference_kernel(cell, "float32").backward(p, x, h0, loss=sg.losses.LastMSE(f(prob.V), f(prob.y_last)))
        contributions = max(float(np.max(np.abs(v))) for v in g64.params.values())
        readout = max(float(np.max(np.abs(v))) for v in _absolute_readout_gradient(cell, p64, x64, h64, loss).params.values())
        r = check_float32(prob)
        absolute_error = max(float(np.max(np.abs(g32.params[n] - g64.params[n]))) for n in g64.params)
    assert readout > 50 * contributions  # the case is one of cancellation in the readout
    assert r.passed, f"{r.check}: {r.error:.3e} > {r.tolerance:.3e}; {r.detail}"
    assert absolute_error > r.tolerance * contributions  # normalised by the contributions alone it fails


def test_drawn_batches_cross_the_compiled_kernels_threshold() -> None:
    """Unless B is given, problems have batches on both sides of the compiled kernels' switch to
    per-step products (B >= STEP_WGRAD_MIN_B), so the battery runs both strategies."""
    from symgate._codegen import STEP_WGRAD_MIN_B
    from symgate.testing._battery import BATCH_SIZES

    assert {STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B, STEP_WGRAD_MIN_B + 1} <= set(BATCH_SIZES)
    assert min(BATCH_SIZES) == 1 and max(BATCH_SIZES) > 2 * STEP_WGRAD_MIN_B
    cell = sg.testing.cached_builtin("gru")
    drawn = {sg.testing.draw_problem(cell, s).B for s in range(100)}
    assert drawn == set(BATCH_SIZES)
    assert sg.testing.draw_problem(cell, 0, B=5).B == 5


def test_sizes_strategy_draws_batches_across_the_threshold() -> None:
    from hypothesis import find

    from symgate._codegen import STEP_WGRAD_MIN_B
    from symgate.testing._battery import BATCH_SIZES

    for b in (STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B, max(BATCH_SIZES)):
        assert find(sg.testing.sizes(), lambda s, b=b: s["B"] == b)["B"] == b
    assert find(sg.testing.sizes(), lambda s: True)["B"] == 1  # shrinks to the smallest batch


@given(sz=sg.testing.sizes(max_batch=5))
def test_sizes_strategy_keeps_max_batch(sz: dict) -> None:
    assert sz["B"] in (1, 2, 3, 5)


def test_sizes_strategy_rejects_bad_bounds() -> None:
    with pytest.raises(sg.ConfigError, match="max_batch must be an integer >= 1, got 0"):
        sg.testing.sizes(max_batch=0)


def test_pool_larger_than_the_recipes_is_a_config_error() -> None:
    """Asking for more distinct recipes than exist is a ConfigError naming both counts."""
    n = len(all_recipes())
    with pytest.raises(sg.ConfigError, match=f"count={n + 1} exceeds the {n} distinct recipes"):
        random_cell_pool(n + 1)
