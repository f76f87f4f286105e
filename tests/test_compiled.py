"""Compiled kernels: generated Cython time loops agree with the numpy reference and the oracles.

Kernels are compiled once per session (``sg.compile`` caches them on the cell and on
disk); the fast tier compiles two cells, the thorough tier every built-in cell in both
dtypes and a slice of the random-cell pool.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import symgate as sg
from symgate.testing import cached_builtin, cached_random, draw_problem, random_cell_pool

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

FAST = ["vector_gate", "gru"]
ALL = sorted(sg.cells.BUILTIN)
POOL = random_cell_pool(200, seed=0)[::20]  # 10 random cells


def agree(cell: sg.Cell, dtype: str, seed: int = 3) -> None:
    """Compiled vs reference, same dtype: forward states, loss, every gradient (both losses)."""
    k, r = sg.compile(cell, dtype), sg.reference_kernel(cell, dtype)
    assert k.backend == "compiled"
    prob = draw_problem(cell, seed, n=5, m=3, B=4, T=9)
    cast = lambda a: np.array(a, dtype=dtype)  # noqa: E731
    p = {q: cast(v) for q, v in prob.params.items()}
    x, h0 = cast(prob.x), {s: cast(v) for s, v in prob.h0.items()}
    # same operations in a different order (BLAS vs numpy, C vs numpy ufuncs): a few ulps per
    # operation, accumulated over T steps; relative to the largest magnitude of each quantity
    eps = EPS32 if dtype == "float32" else EPS64
    tol = 64 * (prob.T + 1) * eps
    fk, fr = k.forward(p, x, h0), r.forward(p, x, h0)
    for s in cell.state_names:
        assert np.max(np.abs(fk.states[s] - fr.states[s])) <= tol * max(1.0, np.max(np.abs(fr.states[s])))
    for loss in (sg.losses.last_mse(cast(prob.V), cast(prob.y_last)), sg.losses.step_mse(cast(prob.V), cast(prob.y_step))):
        gk, gr = k.backward(p, x, h0, loss=loss), r.backward(p, x, h0, loss=loss)
        assert abs(gk.value - gr.value) <= tol * max(1.0, abs(gr.value))
        scale = max(np.max(np.abs(v)) for v in gr.params.values())
        for q in p:
            assert np.max(np.abs(gk.params[q] - gr.params[q])) <= tol * scale, q
        for s in cell.state_names:
            assert np.max(np.abs(gk.h0[s] - gr.h0[s])) <= tol * max(scale, np.max(np.abs(gr.h0[s])))
        assert np.max(np.abs(gk.x - gr.x)) <= tol * max(scale, np.max(np.abs(gr.x)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", FAST)
def test_compiled_matches_reference(name: str, dtype: str) -> None:
    agree(cached_builtin(name), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_compiled_matches_reference_all_builtins(name: str, dtype: str) -> None:
    agree(cached_builtin(name), dtype, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(POOL)))
def test_compiled_matches_reference_random_cells(index: int) -> None:
    cell = cached_random(POOL[index])
    agree(cell, "float64", seed=index)


def test_compiled_passes_gradient_oracles() -> None:
    """Compiled BPTT vs complex step of the reference forward (analytic cell: exact to rounding)."""
    cell = cached_builtin("vector_gate")
    k = sg.compile(cell, "float64")
    prob = draw_problem(cell, 5, n=4, m=2, B=3, T=6)
    rng = np.random.default_rng(0)
    d = {q: rng.standard_normal(np.shape(v)) for q, v in prob.params.items()}
    g = k.backward(prob.params, prob.x, prob.h0, loss=prob.loss("step"))
    an = sum(float(np.sum(g.params[q] * d[q])) for q in d)
    S = sum(float(np.sum(np.abs(g.params[q] * d[q]))) for q in d)
    h = 1e-30
    kc = sg.reference_kernel(cell, "complex128")
    traj = kc.forward({q: prob.params[q] + 1j * h * d[q] for q in d}, prob.x.astype(complex),
                      {s: v.astype(complex) for s, v in prob.h0.items()})
    cs = float(np.imag(prob.loss("step", np.complex128).evaluate(traj.h)[0])) / h
    assert abs(an - cs) <= 64 * (prob.T + 1) * EPS64 * S


def test_batch_one_equals_batch_b() -> None:
    cell = cached_builtin("gru")
    k = sg.compile(cell, "float64")
    prob = draw_problem(cell, 2, n=4, m=2, B=3, T=5)
    full = k.forward(prob.params, prob.x, prob.h0).h
    for b in range(3):
        one = k.forward(prob.params, np.ascontiguousarray(prob.x[:, b:b + 1]),
                        {s: np.ascontiguousarray(v[b:b + 1]) for s, v in prob.h0.items()}).h
        np.testing.assert_allclose(one[:, 0], full[:, b], rtol=0, atol=1e-15)


def test_generated_source_is_deterministic_across_processes() -> None:
    """Golden test: the same cell gives byte-identical source (same hash) in another process."""
    from symgate._codegen import generate

    here = generate(cached_builtin("lstm"), "float64")
    code = ("import symgate as sg; from symgate._codegen import generate; "
            "print(generate(sg.cells.lstm(), 'float64').content_hash)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == here.content_hash
    assert here.source.startswith("# cython:") and "content hash: " + here.content_hash in here.source
    assert "h' = o*tc" in here.source  # the update equations are in the header


def test_generated_identifiers_never_carry_user_names() -> None:
    @sg.cell
    def with_odd_names(h: sg.State("n"), x: sg.Input("m"), weights: sg.Matrix("n", "n"), inp: sg.Matrix("n", "m")):
        nogate = sg.tanh(weights @ h + inp @ x)
        return nogate

    src = sg.compile(with_odd_names, "float64").source
    code_lines = [ln for ln in src.splitlines() if not ln.lstrip().startswith("#")]
    for name in ("weights", "inp", "nogate", "with_odd_names"):
        assert all(re.search(rf"\b{name}\b", ln) is None for ln in code_lines), name


def test_kernels_picks_compiled_and_says_so() -> None:
    k = sg.kernels(cached_builtin("leaky"), "float64")
    assert k.backend == "compiled"
    assert sg.reference_kernel(cached_builtin("leaky")).backend == "numpy-reference"


def test_loading_kernels_keeps_subnormals() -> None:
    """Kernels are compiled with -ffast-math but linked without it: no process-wide flush-to-zero."""
    k = sg.compile(cached_builtin("vector_gate"), "float64")
    prob = draw_problem(k.cell, 0, n=3, m=2, B=1, T=2)
    k.forward(prob.params, prob.x, prob.h0)
    tiny = np.array([1e-310])
    assert (tiny * 1.0)[0] == 1e-310 and (tiny / 2)[0] > 0
