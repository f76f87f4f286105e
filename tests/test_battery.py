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
from symgate.testing import CHECKS, random_cell_pool, registered_cells
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
