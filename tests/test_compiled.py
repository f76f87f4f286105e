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
from symgate._codegen import STEP_WGRAD_MIN_B
from symgate.testing import cached_builtin, cached_random, draw_problem, random_cell_pool

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

FAST = ["vector_gate", "gru"]
ALL = sorted(sg.cells.BUILTIN)
POOL = random_cell_pool(200, seed=0)[::20]  # 10 random cells


def agree(cell: sg.Cell, dtype: str, seed: int = 3) -> None:
    """Compiled vs reference, same dtype: forward states, loss, every gradient (both losses),
    for a batch on each side of the size at which the kernels switch from one product over
    all ``T*B`` rows to per-step products inside the time loops."""
    for B in (STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B + 1):
        _agree(cell, dtype, seed, B)


def _agree(cell: sg.Cell, dtype: str, seed: int, B: int) -> None:
    k, r = sg.compile(cell, dtype), sg.reference_kernel(cell, dtype)
    assert k.backend == "compiled"
    prob = draw_problem(cell, seed, n=5, m=3, B=B, T=9)
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
    code_lines = [ln.split("#")[0] for ln in src.splitlines()]  # code without its comments
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


# ----------------------------------------------------------------------------- prepared steps


def _vg_problem(dtype: str = "float64", n: int = 6, m: int = 3, B: int = 4, T: int = 7):  # type: ignore[no-untyped-def]
    cell = cached_builtin("vector_gate")
    prob = draw_problem(cell, 9, n=n, m=m, B=B, T=T)
    c = lambda a: np.array(a, dtype=dtype)  # noqa: E731
    p = {q: c(v) for q, v in prob.params.items()}
    return cell, prob, p, c(prob.x), c(prob.h0["h"]), c(prob.V), c(prob.y_last)


def test_prepared_step_equals_backward_and_sees_in_place_updates() -> None:
    cell, prob, p, x, h0, V, y = _vg_problem()
    k = sg.compile(cell, "float64")
    loss = sg.losses.last_mse(V, y)
    step = k.prepare(p, x, h0, loss=loss, x_grad=True)
    assert k.prepare(p, x, h0, loss=loss).grads.x is None  # the input gradient only on request
    for it in range(3):
        value = step()
        g = k.backward(p, x, h0, loss=loss)
        assert value == g.value  # same program, same operations: bit-identical
        for q in p:
            np.testing.assert_array_equal(step.grads.params[q], g.params[q])
        np.testing.assert_array_equal(step.grads.x, g.x)
        np.testing.assert_array_equal(step.grads.h0["h"], g.h0["h"])
        np.testing.assert_array_equal(step.grads.readout["V"], g.readout["V"])
        for q in p:  # an SGD step in place, and a fresh batch in place
            p[q] -= 0.1 * step.grads.params[q]
        x[...] = np.random.default_rng(it).standard_normal(x.shape)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_training_steps_that_reuse_one_row_buffers_match_the_reference(name: str, bias: bool) -> None:
    """A prepared training step (no input gradient) with B >= STEP_WGRAD_MIN_B keeps the input
    products and group adjoints that only their own step reads as one reused row; its loss
    and gradients must equal the numpy reference, with and without biases (a bias gradient
    sums a group adjoint over every row, so that adjoint keeps all its rows)."""
    cell = sg.cells.builtin(name, bias=bias)
    k, r = sg.compile(cell, "float64"), sg.reference_kernel(cell, "float64")
    B = STEP_WGRAD_MIN_B + 3
    prob = draw_problem(cell, 17, n=5, m=3, B=B, T=9)
    loss = sg.losses.last_mse(prob.V, prob.y_last)
    step = k.prepare(prob.params, prob.x, prob.h0, loss=loss)
    value = step()
    ref = r.backward(prob.params, prob.x, prob.h0, loss=loss)
    tol = 64 * (prob.T + 1) * np.finfo(float).eps  # as in agree(): a few ulps per operation over T steps
    assert abs(value - ref.value) <= tol * max(1.0, abs(ref.value))
    scale = max(np.max(np.abs(v)) for v in ref.params.values())
    for q in prob.params:
        assert np.max(np.abs(step.grads.params[q] - ref.params[q])) <= tol * scale, q
    # the path under test is taken: every built-in's input product fits in one row, and without
    # biases its first group adjoint too
    assert "Y0" in k.generated.scratch
    assert bias or "L0" in k.generated.scratch


def test_prepared_step_rejects_nan_bound_later_naming_the_array() -> None:
    cell, prob, p, x, h0, V, y = _vg_problem()
    step = sg.compile(cell, "float64").prepare(p, x, h0, loss=sg.losses.last_mse(V, y))
    step()
    x[2, 1, 0] = np.nan
    with pytest.raises(sg.NonFiniteError, match=r"^x contains a non-finite value .* at index \(2, 1, 0\)"):
        step()
    x[2, 1, 0] = 0.0
    p["Wg"][0, 1] = np.inf
    with pytest.raises(sg.NonFiniteError, match=r"params\['Wg'\]"):
        step()


def test_prepare_checks_arguments_once() -> None:
    cell, prob, p, x, h0, V, y = _vg_problem()
    k = sg.compile(cell, "float64")
    with pytest.raises(sg.DTypeError, match="dtype float32"):
        k.prepare(p, x.astype(np.float32), h0, loss=sg.losses.last_mse(V, y))
    with pytest.raises(sg.ShapeError, match="loss y"):
        k.prepare(p, x, h0, loss=sg.losses.last_mse(V, y[:2]))
    with pytest.raises(sg.CellSpecError, match="symgate loss"):
        k.prepare(p, x, h0, loss=object())  # type: ignore[arg-type]


def test_overflow_from_finite_inputs_is_an_error_not_a_silent_answer() -> None:
    @sg.cell
    def explosive(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
        return h * sg.exp(W @ h + U @ x) + 1

    k = sg.compile(explosive, "float64")
    rng = np.random.default_rng(0)
    p = {"W": np.full((3, 3), 5.0), "U": rng.standard_normal((3, 2))}
    x = rng.standard_normal((40, 2, 2))
    with pytest.raises(sg.NumericalError, match="explosive.*is infinite.*an overflow"):
        k.forward(p, x, np.ones((2, 3)))
    with pytest.raises(sg.NumericalError):
        k.backward(p, x, np.ones((2, 3)), loss=sg.losses.last_mse(np.ones((1, 3)), np.zeros((2, 1))))


def test_float32_prepared_step_agrees_with_float64() -> None:
    cell, prob, p, x, h0, V, y = _vg_problem("float32")
    s32 = sg.compile(cell, "float32").prepare(p, x, h0, loss=sg.losses.last_mse(V, y))
    up = lambda a: a.astype(np.float64)  # noqa: E731
    g64 = sg.compile(cell, "float64").backward({q: up(v) for q, v in p.items()}, up(x), up(h0), loss=sg.losses.last_mse(up(V), up(y)))
    s32()
    scale = max(float(np.max(np.abs(v))) for v in g64.params.values())
    for q in p:  # float32 rounding accumulated over T steps (the battery's float32 tolerance)
        assert np.max(np.abs(s32.grads.params[q] - g64.params[q])) <= 64 * (prob.T + 1) * EPS32 * scale


def test_builtin_kernels_are_compiled_ahead_of_time() -> None:
    """`pip install` built every built-in cell's kernel in both dtypes; they load without a compiler."""
    from symgate._aot import builtin_sources, load
    from symgate._codegen import generate

    from symgate._aot import PAPER_VARIANTS

    assert len(builtin_sources()) == 2 * len(sg.cells.BUILTIN) + len(PAPER_VARIANTS)
    for name in sorted(sg.cells.BUILTIN):
        for dt in ("float64", "float32"):
            h = generate(cached_builtin(name), dt).content_hash
            assert load(h) is not None, f"no ahead-of-time kernel for {name} {dt} (was the package installed with `pip install`?)"
            assert sg.compile(cached_builtin(name), dt).origin == "ahead-of-time"
    for name in PAPER_VARIANTS:  # the experiments' bias-free models
        c = sg.cells.builtin(name, bias=False)
        assert load(generate(c, "float64").content_hash) is not None, f"no ahead-of-time kernel for {name}(bias=False)"
        assert sg.compile(c, "float64").origin == "ahead-of-time"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_battery_on_compiled_builtin_kernels(name: str) -> None:
    sg.testing.verify(cached_builtin(name), examples=2, seed=5, backend="compiled")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(POOL)))
def test_battery_on_compiled_random_cells(index: int) -> None:
    sg.testing.verify(cached_random(POOL[index]), examples=1, seed=index, backend="compiled")


def test_battery_checks_compiled_backend_fast() -> None:
    rep = sg.testing.verify(cached_builtin("scalar_gate"), examples=1, backend="compiled",
                            checks=["compiled", "batch", "bptt_cs", "adjoint", "float32"])
    assert rep.passed and {r.check for r in rep.results} == {"compiled", "batch", "bptt_cs", "adjoint", "float32"}


def test_kernels_falls_back_to_reference_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    @sg.cell
    def needs_a_compiler(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
        return 0.5 * h + sg.tanh(W @ h + U @ x)

    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(sg.SymgateWarning, match="numpy reference"):
        k = sg.kernels(needs_a_compiler)
    assert k.backend == "numpy-reference"


def test_overflow_in_the_loss_or_gradients_is_an_error() -> None:
    """Finite states, but a readout so large that the loss and the gradients overflow."""
    cell, prob, p, x, h0, V, y = _vg_problem()
    k = sg.compile(cell, "float64")
    k.forward(p, x, h0)  # the forward pass alone is fine
    huge = sg.losses.last_mse(np.full_like(V, 1e200), y)
    with pytest.raises(sg.NumericalError):
        k.backward(p, x, h0, loss=huge)
    step = k.prepare(p, x, h0, loss=huge)
    with pytest.raises(sg.NumericalError):
        step()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_tanh_keeps_relative_accuracy_at_every_magnitude(dtype: str) -> None:
    """The kernels' tanh (expm1 form, vectorised) against the C library's, element by element:
    a few ulps relative error from subnormal-sized arguments to saturation, both signs, and an
    exact zero (a 1 - exp(-2|u|) form would lose all digits below |u| ~ 1e-8)."""
    cell = cached_builtin("plain")
    k = sg.compile(cell, dtype)
    info = np.finfo(dtype)
    mags = np.geomspace(float(info.tiny) * 4, 30.0, 600)
    u = np.concatenate([mags, -mags, [0.0]]).astype(dtype)
    n = 1
    B = u.size  # every argument is one batch row; B >= 8 takes the per-step input products
    params = {"W": np.zeros((n, n), dtype), "U": np.ones((n, 1), dtype), "b": np.zeros(n, dtype)}
    h = k.forward(params, u.reshape(1, B, 1), np.zeros((B, n), dtype)).states["h"][-1, :, 0]
    ref = np.tanh(u.astype(np.float64))
    # both are within a few ulps of the exact value; relative to the exact value, not to 1
    rel = np.abs(h.astype(np.float64) - ref) / np.maximum(np.abs(ref), float(info.tiny))
    assert np.max(rel) <= 4 * float(info.eps), (u[np.argmax(rel)], np.max(rel) / float(info.eps))
    assert h[-1] == 0 and np.all(np.sign(h) == np.sign(u))
