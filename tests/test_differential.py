"""Compiled kernels against the numpy reference on every path the generator can take.

Each case runs one cell of the feature pool (``symgate.testing._feature_cells``) or a
built-in through forward, backward (both losses), vjp, jvp and a prepared training step,
on inputs drawn afresh for every call and with the compiled kernel's workspaces filled
with NaN before every call (``symgate.testing._differential``).  Batches lie on both sides
of the kernels' switch to per-step products (``STEP_WGRAD_MIN_B``), one size makes the
matrix products large enough for BLAS (above ``SMALL_GEMM`` multiply-adds), and a few
cases force the other side of the run plan's thresholds (``POLICIES``).  A coverage test
requires every kind of decision of the kernels' plans to be taken both ways by the cases
of each tier.
"""

from __future__ import annotations

import numpy as np
import pytest

import symgate as sg
from symgate._codegen import (DECISION_VALUES, DEFAULT_POLICY, STEP_WGRAD_MIN_B, STRUCTURAL_VALUES, Policy, cell_plan,
                              structural_decisions)
from symgate.testing._differential import ENTRY_OPTIONS, compare_backends, planned_decisions
from symgate.testing._feature_cells import FEATURES, feature_cell

BATCHES = (1, 2, STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B, STEP_WGRAD_MIN_B + 1, 17)
#: (batch, hidden size, steps): the small sizes, and one case whose products exceed SMALL_GEMM
SIZES = [(B, 3, 4) for B in BATCHES] + [(7, 40, 3), (17, 40, 3)]
FAST_SIZES = [(1, 3, 4), (STEP_WGRAD_MIN_B - 1, 3, 4), (STEP_WGRAD_MIN_B, 3, 4), (17, 40, 3)]
FAST_CELLS = ["fc_xgate", "fc_xcandidate", "fc_static_chain", "fc_matrix_first", "fc_two_state",
              "fc_functions", "fc_scalar_gate", "fc_vector_recurrence", "fc_shared_node", "fc_input_elementwise",
              "fc_one_unit_state"]
#: run-plan policies that force one side of a size-dependent decision at any size
POLICIES = {
    "default": DEFAULT_POLICY,
    "blas": Policy(small_gemm=0),  # every product of four rows or more through BLAS
    "loops": Policy(small_gemm=10**12),  # every non-transposed product as plain loops
    "per_step": Policy(step_min_batch=1),  # per-step products and weight gradients at any batch
    "whole": Policy(step_min_batch=10**9),  # one product over all T*B rows at any batch
}
#: (cell, B, n, T, policy) of the fast tier: every fast cell at the fast sizes, and a few forced policies
FAST_CASES = [(c, B, n, T, "default") for c in FAST_CELLS for B, n, T in FAST_SIZES] + [
    ("fc_functions", 9, 5, 3, "blas"), ("fc_reset", 5, 3, 3, "blas"), ("fc_static_gate", 5, 4, 3, "per_step"),
    ("fc_static_chain", 12, 3, 3, "whole"), ("fc_two_state", 9, 4, 3, "loops"), ("fc_scalar_node", 9, 4, 3, "blas"),
    ("fc_param_product", 2, 3, 3, "default"), ("fc_param_product", 9, 3, 3, "default"),
]
THOROUGH_CASES = [(c, B, n, T, "default") for c in sorted(FEATURES) for B, n, T in SIZES] + [
    (c, B, 4, 3, pol) for c in sorted(FEATURES) for B in (2, 9) for pol in ("blas", "loops", "per_step", "whole")]


def _sizes(cell: sg.Cell, n: int) -> dict[str, int]:
    return {d: (n if d != "m" else max(2, n // 2)) for d in cell.dims()}


def _assert_agree(cell: sg.Cell, B: int, n: int, T: int, dtype: str = "float64", policy: str = "default") -> None:
    diffs = compare_backends(cell, _sizes(cell, n), T=T, B=B, seed=1000 * B + n, dtype=dtype, policy=POLICIES[policy])
    bad = [f"{d.what}: {d.error:.2e} > {d.tolerance:.2e}" for d in diffs if not d.passed]
    assert not bad, f"{cell.name} B={B} n={n} T={T} {dtype} policy={policy}:\n  " + "\n  ".join(bad)


def _exercised(cases: list[tuple[str, int, int, int, str]]) -> dict[str, set]:
    """Every decision kind and the values the cases' kernels take for it."""
    seen: dict[str, set] = {}
    for name, B, n, T, pol in cases:
        cell = feature_cell(name)
        for kind, _inst, value in planned_decisions(cell, _sizes(cell, n), T=T, B=B, policy=POLICIES[pol]):
            seen.setdefault(kind, set()).add(value)
    return seen


def _expected_values(kind: str) -> set:
    base = kind.split(":")[0]
    table = dict(STRUCTURAL_VALUES, **DECISION_VALUES)
    return set(table[base])


@pytest.mark.parametrize("tier", ["fast", pytest.param("thorough", marks=pytest.mark.slow)])
def test_every_generator_decision_is_exercised_both_ways(tier: str) -> None:
    """Coverage of the kernels' plans: across the differential cases of a tier, every kind of
    decision the generator and the run plan take (each matrix-product role's route included)
    takes each of its values at least once."""
    seen = _exercised(FAST_CASES if tier == "fast" else THOROUGH_CASES)
    kinds = set(STRUCTURAL_VALUES) | set(DECISION_VALUES) - {"route"}
    missing_kinds = sorted(k for k in kinds if k not in seen)
    assert not missing_kinds, f"decision kinds never taken: {missing_kinds}"
    one_sided = {k: sorted(map(str, _expected_values(k) - v)) for k, v in seen.items() if _expected_values(k) - v}
    assert not one_sided, f"decisions taken one way only (values never seen): {one_sided}"


def test_planned_decisions_are_what_the_kernel_runs() -> None:
    """The coverage above is computed from plans: they must be the plans the compiled calls use."""
    cell = feature_cell("fc_shared_node")
    sizes = _sizes(cell, 3)
    plans: list = []
    compare_backends(cell, sizes, T=3, B=9, seed=5, plans=plans, prepared_calls=1)
    used = set(structural_decisions(cell_plan(cell))) | {d for p in plans for d in p.decisions()}
    assert used == planned_decisions(cell, sizes, T=3, B=9)
    assert {p.options for p in plans} == {opt for opts in ENTRY_OPTIONS.values() for opt in opts}


def test_input_only_gate_weight_gradient_regression() -> None:
    """A weight feeding a node of the input alone: the compiled gradient was uninitialised
    memory for B >= 8 (the per-step weight gradient read the group's adjoint before the
    state-independent backward pass wrote it), right for B <= 7."""

    @sg.cell
    def xgate(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), Ug: sg.Matrix("n", "m")):
        g = sg.sigmoid(Ug @ x)
        return (1 - g) * h + g * sg.tanh(W @ h)

    rng = np.random.default_rng(1)
    n, m, T = 5, 3, 7
    p = {"W": rng.standard_normal((n, n)) / np.sqrt(n), "Ug": rng.standard_normal((n, m)) / np.sqrt(m)}
    for B in (7, 8, 17):
        x = rng.standard_normal((T, B, m))
        h0 = rng.standard_normal((B, n))
        loss = sg.losses.last_mse(rng.standard_normal((1, n)), rng.standard_normal((B, 1)))
        r = sg.reference_kernel(xgate).backward(p, x, h0, loss=loss)
        c = sg.compile(xgate).backward(p, x, h0, loss=loss)
        scale = max(1.0, float(np.max(np.abs(r["Ug"]))))
        assert np.max(np.abs(r["Ug"] - c["Ug"])) <= 64 * (T + 1) * np.finfo(float).eps * scale, B
    # in a training loop, the result must be right at every step, not only on a repeated call
    B = 9
    x, h0 = rng.standard_normal((T, B, m)), rng.standard_normal((B, n))
    loss = sg.losses.last_mse(rng.standard_normal((1, n)), rng.standard_normal((B, 1)))
    step = sg.compile(xgate).prepare(p, x, h0, loss=loss)
    for _ in range(3):
        x[...] = rng.standard_normal(x.shape)
        step()
        r = sg.reference_kernel(xgate).backward(p, x, h0, loss=loss)
        assert np.allclose(step.grads["Ug"], r["Ug"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, B, n, T, policy", FAST_CASES)
def test_feature_cells_agree(name: str, B: int, n: int, T: int, policy: str) -> None:
    _assert_agree(feature_cell(name), B, n, T, policy=policy)


@pytest.mark.slow
@pytest.mark.parametrize("name, B, n, T, policy", [c for c in THOROUGH_CASES if c not in FAST_CASES])
def test_feature_cells_agree_thorough(name: str, B: int, n: int, T: int, policy: str) -> None:
    _assert_agree(feature_cell(name), B, n, T, policy=policy)


@pytest.mark.slow
@pytest.mark.parametrize("B, n, T", [(2, 3, 4), (STEP_WGRAD_MIN_B + 1, 3, 4), (17, 40, 3)])
@pytest.mark.parametrize("name", sorted(sg.cells.BUILTIN))
def test_builtin_cells_agree(name: str, B: int, n: int, T: int) -> None:
    _assert_agree(sg.testing.cached_builtin(name), B, n, T)


@pytest.mark.slow
@pytest.mark.parametrize("B", [3, STEP_WGRAD_MIN_B + 1])
@pytest.mark.parametrize("name", ["fc_xgate", "fc_static_chain", "fc_functions", "fc_two_state", "fc_scalar_gate"])
def test_feature_cells_agree_float32(name: str, B: int) -> None:
    _assert_agree(feature_cell(name), B, 3, 4, dtype="float32")


@sg.cell
def static_node_read_twice(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U1: sg.Matrix("n", "m"),
                           U2: sg.Matrix("n", "n")):
    # e reads only the input and is read twice: by a matrix product (U2 e, state-independent) and
    # elementwise in the time loop (e*h), so its adjoint collects the loop's contributions first
    # and the product's backward must add to them, not overwrite them
    e = sg.tanh(U1 @ x)
    return 0.5 * sg.tanh(W @ h + U2 @ e) + 0.5 * e * h


@pytest.mark.parametrize("B", [2, 9])
def test_static_node_read_by_a_product_and_in_the_loop(B: int) -> None:
    """The gradient of U1 sums both readers of e (compiled against the numpy reference)."""
    _assert_agree(static_node_read_twice, B, 3, 4)
