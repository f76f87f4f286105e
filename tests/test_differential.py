"""Compiled kernels against the numpy reference on every path the generator can take.

Each case runs one cell of the feature pool (``symgate.testing._feature_cells``) or a
built-in through forward, backward (both losses), vjp, jvp and a prepared training step,
on inputs drawn afresh for every call and with the compiled kernel's workspaces filled
with NaN before every call (``symgate.testing._differential``).  Batches lie on both sides
of the kernels' switch to per-step products (``STEP_WGRAD_MIN_B``), and one size makes
the matrix products large enough for BLAS (above ``SMALL_GEMM`` multiply-adds).
"""

from __future__ import annotations

import numpy as np
import pytest

import symgate as sg
from symgate._codegen import STEP_WGRAD_MIN_B
from symgate.testing._differential import compare_backends
from symgate.testing._feature_cells import FEATURES, feature_cell

BATCHES = (1, 2, STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B, STEP_WGRAD_MIN_B + 1, 17)
#: (batch, hidden size, steps): the small sizes, and one case whose products exceed SMALL_GEMM
SIZES = [(B, 3, 4) for B in BATCHES] + [(7, 40, 3), (17, 40, 3)]
FAST_SIZES = [(1, 3, 4), (STEP_WGRAD_MIN_B - 1, 3, 4), (STEP_WGRAD_MIN_B, 3, 4), (17, 40, 3)]
FAST_CELLS = ["fc_xgate", "fc_xcandidate", "fc_static_chain", "fc_matrix_first", "fc_two_state",
              "fc_functions", "fc_scalar_gate", "fc_vector_recurrence", "fc_shared_node"]


def _sizes(cell: sg.Cell, n: int) -> dict[str, int]:
    return {d: (n if d != "m" else max(2, n // 2)) for d in cell.dims()}


def _assert_agree(cell: sg.Cell, B: int, n: int, T: int, dtype: str = "float64") -> None:
    diffs = compare_backends(cell, _sizes(cell, n), T=T, B=B, seed=1000 * B + n, dtype=dtype)
    bad = [f"{d.what}: {d.error:.2e} > {d.tolerance:.2e}" for d in diffs if not d.passed]
    assert not bad, f"{cell.name} B={B} n={n} T={T} {dtype}:\n  " + "\n  ".join(bad)


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


@pytest.mark.parametrize("B, n, T", FAST_SIZES)
@pytest.mark.parametrize("name", FAST_CELLS)
def test_feature_cells_agree(name: str, B: int, n: int, T: int) -> None:
    _assert_agree(feature_cell(name), B, n, T)


@pytest.mark.slow
@pytest.mark.parametrize("B, n, T", SIZES)
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_feature_cells_agree_all_sizes(name: str, B: int, n: int, T: int) -> None:
    _assert_agree(feature_cell(name), B, n, T)


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
