"""The battery's parts, one at a time: its arithmetic, the problems it draws, its results and
report text, and what each check actually feeds the two routes it compares.

``tests/test_battery_pinned.py`` sizes defects in each check's error metric; the tests here pin
down what those metrics are made of.  Every expected value is computed here, with plain numpy,
from a documented rule: the module docstring of ``symgate/testing/_battery.py`` (finite-difference
steps ``eps**(1/3) max(1, |v|)``, the complex step ``1e-30``, the *Readout cancellation* scale),
the docstring of :func:`~symgate.testing.draw_problem` (sizes, spectral norms, distributions),
the README's verification section (the batch sizes), and :mod:`symgate.losses` (the cotangent
``(2/N) r V``).  Checks are observed through the battery's substitution points (``_kernel``,
``_direction``, ``_float64_partial``), as in the pinned tests.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

import symgate as sg
from symgate.losses import LastMSE, StepMSE
from symgate.testing import _battery
from symgate.testing import cached_builtin, draw_problem
from symgate.testing._battery import CheckResult, VerificationReport

EPS = 2.0 ** -52
EPS32 = 2.0 ** -23
#: the documented tolerances (README, "Verification")
TOL_FD = 100 * EPS ** (2 / 3)


def tol_round(T: int) -> float:
    return 64 * (T + 1) * EPS


def fd_step(v: Any) -> Any:
    """The documented central-difference step: ``eps**(1/3) * max(1, |v|)``."""
    return EPS ** (1 / 3) * np.maximum(1.0, np.abs(v))


LEAKY = cached_builtin("leaky")
GRU = cached_builtin("gru")
LSTM = cached_builtin("lstm")
VECTOR_GATE = cached_builtin("vector_gate")
SCALAR_GATE = cached_builtin("scalar_gate")


# ----------------------------------------------------------------------------
# observing and tampering with the kernels a check runs
# ----------------------------------------------------------------------------


class Proxy:
    """A kernel that logs every public method call ``(method, args, kwargs)`` in ``log`` and returns
    ``edits[method](inner, output, *args, **kwargs)`` where an edit is given."""

    def __init__(self, inner: Any, log: list, edits: dict[str, Callable[..., Any]]) -> None:
        self._inner, self._log, self._edits = inner, log, edits

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            self._log.append((name, a, kw))
            out = attr(*a, **kw)
            edit = self._edits.get(name)
            return edit(self._inner, out, *a, **kw) if edit is not None else out

        return call


class Kernels:
    """Replaces ``_battery._kernel``: kernels of the selected ``(dtype, backend)`` are proxies that
    log their calls (``log[(dtype, backend)]``) and apply ``edits``; directions are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, edits: dict[tuple[str, str], dict[str, Callable[..., Any]]] | None = None,
                 direction: Callable[..., Any] | None = None) -> None:
        self.log: dict[tuple[str, str], list] = {}
        self.directions: list[tuple[dict, dict, np.ndarray]] = []
        kernel, original_direction = _battery._kernel, _battery._direction
        edits = edits or {}

        def proxied(cell: sg.Cell, dtype: str, backend: str) -> Any:
            return Proxy(kernel(cell, dtype, backend), self.log.setdefault((dtype, backend), []), edits.get((dtype, backend), {}))

        def recorded(prob: Any, rng: np.random.Generator) -> Any:
            d = original_direction(prob, rng)
            if direction is not None:
                d = direction(*d)
            self.directions.append(d)
            return d

        monkeypatch.setattr(_battery, "_kernel", proxied)
        monkeypatch.setattr(_battery, "_direction", recorded)

    def calls(self, dtype: str, backend: str, method: str) -> list[tuple[tuple, dict]]:
        return [(a, kw) for name, a, kw in self.log.get((dtype, backend), []) if name == method]


F64 = ("float64", "reference")


def directional(g: Any, dp: dict, dh: dict, dx: np.ndarray) -> tuple[float, float]:
    """``<g, d>`` and ``sum |g_i d_i|`` over parameters, initial states and inputs."""
    parts = [g.params[k] * dp[k] for k in dp] + [g.h0[k] * dh[k] for k in dh] + [g.x * dx]
    return float(sum(np.sum(p) for p in parts)), float(sum(np.sum(np.abs(p)) for p in parts))


def shift_along(g: Any, d: dict, field_: str, amount: float) -> Any:
    """``g`` with the entry of ``g.<field_>`` under the largest direction component changed so that
    ``<g, d>`` moves by ``amount``."""
    name = max(d, key=lambda n: float(np.max(np.abs(d[n]))))
    index = np.unravel_index(np.argmax(np.abs(d[name])), np.shape(d[name]))
    values = {**getattr(g, field_)}
    values[name] = np.array(values[name], dtype=float)
    values[name][index] += amount / float(d[name][index])
    return dataclasses.replace(g, **{field_: values})


def absolute_cotangent(L: LastMSE | StepMSE, h: np.ndarray) -> np.ndarray:
    """The *Readout cancellation* cotangent, typed from the module docstring:
    ``(2/N) (|V||h_t| + |y_t|) |V|``, at the last step only for the last-state loss."""
    aV = np.abs(L.V)
    out = np.zeros_like(h)
    if isinstance(L, LastMSE):
        N = L.y.size
        out[-1] = 2.0 / N * np.einsum("bo,on->bn", np.einsum("on,bn->bo", aV, np.abs(h[-1])) + np.abs(L.y), aV)
    else:
        N = L.y.size
        out[:] = 2.0 / N * np.einsum("tbo,on->tbn", np.einsum("on,tbn->tbo", aV, np.abs(h)) + np.abs(L.y), aV)
    return out


# ----------------------------------------------------------------------------
# constants and arithmetic helpers
# ----------------------------------------------------------------------------


def test_batch_sizes_are_the_documented_ones() -> None:
    """README: problems draw batches on both sides of the kernels' switch, "B in 1, 2, 3, 7, 8, 9, 17"."""
    assert _battery.BATCH_SIZES == (1, 2, 3, 7, 8, 9, 17)


def test_machine_epsilons() -> None:
    assert _battery.EPS64 == 2.0 ** -52 and _battery.EPS32 == 2.0 ** -23
    assert _battery.CS_STEP == 1e-30  # documented: "h = 1e-30: exact to rounding"


def test_fd_step_is_cube_root_eps_times_max_one_abs() -> None:
    v = np.array([0.0, 0.25, -0.9, 1.0, -2.5, 40.0])
    expected = 2.0 ** (-52 / 3) * np.array([1.0, 1.0, 1.0, 1.0, 2.5, 40.0])
    # two roundings (the power, the product) on each side: a few ulps
    np.testing.assert_allclose(_battery._fd_step(v), expected, rtol=1e-15, atol=0)


def test_flat_states_stack_in_declaration_order_along_the_last_axis() -> None:
    """LSTM states ``(h, c)`` stacked as ``[h | c]`` on the last axis, for any leading axes, and unstacked
    back into C-contiguous arrays."""
    rng = np.random.default_rng(0)
    for lead in [(2,), (3, 2)]:
        h, c = rng.standard_normal(lead + (3,)), rng.standard_normal(lead + (3,))
        flat = _battery._flat_states(LSTM, {"c": c, "h": h})
        assert flat.shape == lead + (6,)
        assert np.array_equal(flat[..., :3], h) and np.array_equal(flat[..., 3:], c)
        back = _battery._unflat_states(LSTM, flat, {1: 1, "n": 3, "m": 2})
        assert set(back) == {"h", "c"}
        assert np.array_equal(back["h"], h) and np.array_equal(back["c"], c)
        assert back["h"].flags.c_contiguous and back["c"].flags.c_contiguous


def test_directional_is_the_inner_product_and_its_absolute_sum() -> None:
    g = SimpleNamespace(params={"W": np.array([[1.0, -2.0], [3.0, 4.0]]), "c": np.array(0.5)},
                        h0={"h": np.array([[2.0, -1.0]])}, x=np.array([[[1.0], [-3.0]]]))
    dp = {"W": np.array([[2.0, 1.0], [-1.0, 0.5]]), "c": np.array(-4.0)}
    dh = {"h": np.array([[1.0, 1.0]])}
    dx = np.array([[[0.5], [1.0]]])
    # W: 2 - 2 - 3 + 2 = -1;  c: -2;  h0: 2 - 1 = 1;  x: 0.5 - 3 = -2.5  ->  -4.5
    # absolute: W 2+2+3+2 = 9;  c 2;  h0 3;  x 3.5  ->  17.5
    assert _battery._directional(g, dp, dh, dx) == (-4.5, 17.5)


def test_rel_is_the_largest_difference_relative_to_max_one_and_the_reference() -> None:
    """Matrix comparisons are relative to ``max(1, max|ref|)``."""
    assert _battery._rel(np.array([1.0, 2.0]), np.array([1.5, -4.0])) == 6.0 / 4.0
    assert _battery._rel(np.array([[0.1, 0.0]]), np.array([[0.3, 0.05]])) == pytest.approx(0.2, rel=1e-15, abs=0)
    assert _battery._rel(np.array(3.0), np.array(3.0)) == 0.0


# ----------------------------------------------------------------------------
# the readout-cancellation scale
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["last", "step"])
def test_absolute_cotangent_is_the_loss_cotangent_when_no_term_cancels(kind: str) -> None:
    """With ``V >= 0``, ``h >= 0`` and ``y <= 0`` every term of ``r = V h - y`` is non-negative, so the
    absolute cotangent is the loss's own ``dL/dh`` (symgate.losses)."""
    rng = np.random.default_rng(1)
    T, B, n, o = 3, 2, 4, 3
    h = np.abs(rng.standard_normal((T, B, n)))
    V = np.abs(rng.standard_normal((o, n)))
    y = -np.abs(rng.standard_normal((B, o) if kind == "last" else (T, B, o)))
    L = LastMSE(V, y) if kind == "last" else StepMSE(V, y)
    got = _battery._absolute_cotangent(L, h)
    # same sums in another order: a few ulps of the O(1) entries
    np.testing.assert_allclose(got, L.evaluate(h)[1], rtol=1e-13, atol=1e-15)
    if kind == "last":
        assert not np.any(got[:-1])


@pytest.mark.parametrize("kind", ["last", "step"])
def test_absolute_cotangent_bounds_the_cotangent_with_every_term_absolute(kind: str) -> None:
    """Mixed signs: ``(2/N) (|V||h_t| + |y_t|) |V|`` exactly (N = B o, or T B o), which bounds ``|dL/dh|``."""
    rng = np.random.default_rng(2)
    T, B, n, o = 3, 2, 4, 3
    h = rng.standard_normal((T, B, n))
    V = rng.standard_normal((o, n))
    y = rng.standard_normal((B, o) if kind == "last" else (T, B, o))
    L = LastMSE(V, y) if kind == "last" else StepMSE(V, y)
    got = _battery._absolute_cotangent(L, h)
    np.testing.assert_allclose(got, absolute_cotangent(L, h), rtol=1e-13, atol=1e-15)  # reordered sums
    assert np.all(np.abs(L.evaluate(h)[1]) <= got * (1 + 1e-12))
    assert np.all(got[-1] > 0)


@pytest.mark.parametrize("kind", ["last", "step"])
def test_absolute_readout_gradient_pulls_back_through_the_first_state(kind: str) -> None:
    """The scale's gradient is the reference VJP of the absolute cotangent on the *first* state (the
    readout's input), with the other states' cotangents zero."""
    prob = draw_problem(LSTM, 4, n=2, m=2, B=2, T=3)
    ref = sg.reference_kernel(LSTM)
    L = prob.loss(kind)
    h = ref.forward(prob.params, prob.x, prob.h0).states["h"]
    expected = ref.vjp(prob.params, prob.x, prob.h0, {"h": absolute_cotangent(L, h)})
    got = _battery._absolute_readout_gradient(LSTM, prob.params, prob.x, prob.h0, L)
    # the same pull-back of cotangents equal to a few ulps
    for name in prob.params:
        np.testing.assert_allclose(got.params[name], expected.params[name], rtol=1e-12, atol=1e-15)
    for s in ("h", "c"):
        np.testing.assert_allclose(got.h0[s], expected.h0[s], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.x, expected.x, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------
# draw_problem: shapes, sizes, seeds
# ----------------------------------------------------------------------------


def test_draw_problem_shapes_follow_the_sizes() -> None:
    prob = draw_problem(GRU, 2, n=3, m=2, B=9, T=3, outputs=4)
    assert prob.sizes == {1: 1, "n": 3, "m": 2}
    assert (prob.T, prob.B, prob.seed) == (3, 9, 2)
    for k in ("z", "r", "n"):
        assert prob.params[f"W{k}"].shape == (3, 3) and prob.params[f"U{k}"].shape == (3, 2)
        assert prob.params[f"b{k}"].shape == (3,)
    assert set(prob.params) == set(GRU.param_names)
    assert prob.x.shape == (3, 9, 2)
    assert set(prob.h0) == {"h"} and prob.h0["h"].shape == (9, 3)
    assert prob.V.shape == (4, 3) and prob.y_last.shape == (9, 4) and prob.y_step.shape == (3, 9, 4)
    assert all(a.dtype == np.float64 for a in [*prob.params.values(), prob.x, prob.h0["h"], prob.V])


def test_draw_problem_shapes_of_unit_dims_and_several_states() -> None:
    """Dimension 1 is size 1 (``wg`` of shape ``(1, n)``); a scalar parameter is 0-d; each state its own h0."""
    prob = draw_problem(SCALAR_GATE, 0, n=2, m=3, B=1, T=1)
    assert prob.params["wg"].shape == (1, 2) and prob.params["ug"].shape == (1, 3)
    assert prob.params["c"].shape == ()
    lstm = draw_problem(LSTM, 0, n=2, m=1, B=3, T=2)
    assert set(lstm.h0) == {"h", "c"} and lstm.h0["h"].shape == lstm.h0["c"].shape == (3, 2)
    assert lstm.V.shape == (2, 2)  # the readout reads the first state; two outputs by default


def test_draw_problem_accepts_the_smallest_sizes() -> None:
    prob = draw_problem(LEAKY, 0, n=1, m=1, B=1, T=1, outputs=1)
    assert prob.x.shape == (1, 1, 1) and prob.V.shape == (1, 1) and prob.y_step.shape == (1, 1, 1)


def test_draw_problem_default_sizes_cover_the_documented_ranges() -> None:
    """Unless given: n in 1..5, m in 1..3, T in 1..6, B from BATCH_SIZES; all values occur."""
    probs = [draw_problem(LEAKY, s) for s in range(300)]
    assert {p.sizes["n"] for p in probs} == {1, 2, 3, 4, 5}
    assert {p.sizes["m"] for p in probs} == {1, 2, 3}
    assert {p.T for p in probs} == {1, 2, 3, 4, 5, 6}
    assert {p.B for p in probs} == {1, 2, 3, 7, 8, 9, 17}
    assert all(p.V.shape[0] == 2 for p in probs)  # outputs=2 unless given


def test_draw_problem_given_sizes_are_kept() -> None:
    prob = draw_problem(LEAKY, 3, n=5, m=3, B=17, T=6)
    assert (prob.sizes["n"], prob.sizes["m"], prob.B, prob.T) == (5, 3, 17, 6)
    assert draw_problem(LEAKY, 3, n=2).sizes["n"] == 2 and draw_problem(LEAKY, 3, m=1).sizes["m"] == 1


def test_draw_problem_is_reproducible_from_its_seed() -> None:
    """An integer seed ``s`` draws what ``np.random.default_rng(s)`` draws; a problem drawn from a
    caller's generator has no seed to replay (-1, never a valid seed)."""
    a, b = draw_problem(GRU, 11), draw_problem(GRU, 11)
    c = draw_problem(GRU, np.random.default_rng(11))
    for other in (b, c):
        assert other.sizes == a.sizes
        assert all(np.array_equal(a.params[k], other.params[k]) for k in a.params)
        assert np.array_equal(a.x, other.x) and np.array_equal(a.h0["h"], other.h0["h"])
        assert np.array_equal(a.V, other.V) and np.array_equal(a.y_step, other.y_step)
    assert (a.seed, c.seed) == (11, -1)
    assert not np.array_equal(draw_problem(GRU, 12, n=a.sizes["n"]).h0["h"][:1], a.h0["h"][:1])


def test_draw_problem_rejects_a_non_cell_and_bad_seeds() -> None:
    with pytest.raises(sg.CellSpecError, match=r"draw_problem\(\) takes a symgate Cell, got str"):
        draw_problem("leaky", 0)  # type: ignore[arg-type]
    with pytest.raises(sg.ConfigError, match="draw_problem's seed must be an integer >= 0, got 1.5"):
        draw_problem(LEAKY, 1.5)  # type: ignore[arg-type]
    assert draw_problem(LEAKY, 0).seed == 0 and draw_problem(LEAKY, np.int64(5)).seed == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"m": 0}, "size m must be an integer >= 1, got 0"),
    ({"n": 2.0}, "size n must be an integer >= 1, got 2.0"),
    ({"T": 0}, "sequence length T must be an integer >= 1, got 0"),
    ({"B": True}, "batch size B must be an integer >= 1, got True"),
    ({"outputs": 1.0}, "outputs must be an integer >= 1, got 1.0"),
])
def test_draw_problem_rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(sg.ConfigError, match=message.replace("(", r"\(")):
        draw_problem(LEAKY, 0, **kwargs)


@pytest.mark.parametrize("rho", [True, "0.5", float("inf"), float("nan"), 0.0, -0.5, 1j])
def test_draw_problem_rejects_bad_rho(rho: Any) -> None:
    with pytest.raises(sg.ConfigError, match="rho must be a finite positive number"):
        draw_problem(LEAKY, 0, rho=rho)


@pytest.mark.parametrize("rho", [1, 0.5, np.float32(0.25), 1e-3, 2.5])
def test_draw_problem_scales_every_matrix_to_rho_times_u_half_one(rho: Any) -> None:
    """Given ``rho``, each matrix has spectral norm ``rho * U(0.5, 1)``: within ``[rho/2, rho]``, and
    both ends of the range occur."""
    norms = []
    for s in range(60):
        prob = draw_problem(VECTOR_GATE, s, rho=rho)
        norms += [np.linalg.norm(prob.params[k], 2) for k in ("W", "U", "Wg", "Ug")]
    norms = np.array(norms) / float(rho)
    # the norm of a rescaled matrix: a few ulps from rho * u
    assert norms.min() >= 0.5 * (1 - 1e-12) and norms.max() <= 1 + 1e-12
    assert norms.min() < 0.55 and norms.max() > 0.95  # 240 draws of U(0.5, 1): both ends are hit


def test_draw_problem_default_rho_spans_its_range() -> None:
    """Unless given, ``rho`` is U(0.3, 1.2), so norms lie in ``[0.15, 1.2]``.  Norms below 0.25 (probability
    6 % a matrix) and above 1.0 (4 %) both occur in 600 draws."""
    norms = []
    for s in range(300):
        prob = draw_problem(LEAKY, s)
        norms += [np.linalg.norm(prob.params[k], 2) for k in ("W", "U")]
    norms = np.array(norms)
    assert norms.min() >= 0.15 * (1 - 1e-12) and norms.max() <= 1.2 * (1 + 1e-12)
    assert norms.min() < 0.25 and norms.max() > 1.0


def test_draw_problem_distributions() -> None:
    """Vectors N(0, 0.5^2), inputs and targets N(0, 1), initial states U(-0.5, 0.5), readout
    ``N(0, 1) / sqrt(n)``.  Sample moments over >= 1000 values: the bounds are >= 4 standard errors."""
    probs = [draw_problem(GRU, s, n=4, m=2, B=3, T=4) for s in range(80)]
    vec = np.concatenate([p.params[b].ravel() for p in probs for b in ("bz", "br", "bn")])  # 960
    assert abs(vec.mean()) < 0.07 and 0.45 < vec.std() < 0.55
    x = np.concatenate([p.x.ravel() for p in probs])  # 1920
    assert abs(x.mean()) < 0.1 and 0.92 < x.std() < 1.08
    y = np.concatenate([np.r_[p.y_last.ravel(), p.y_step.ravel()] for p in probs])  # 2400
    assert abs(y.mean()) < 0.1 and 0.92 < y.std() < 1.08
    V = np.concatenate([p.V.ravel() for p in probs]) * np.sqrt(4)  # 640
    assert abs(V.mean()) < 0.16 and 0.88 < V.std() < 1.12
    h0 = np.concatenate([p.h0["h"].ravel() for p in probs])  # 960
    assert h0.min() >= -0.5 and h0.max() <= 0.5
    assert h0.min() < -0.48 and h0.max() > 0.48 and abs(h0.mean()) < 0.04


def test_draw_problem_rescales_even_small_raw_matrices() -> None:
    """Even 1x1 matrices (whose raw draws are often below 1 in norm) are rescaled to ``rho * U(0.5, 1)``."""
    for s in range(50):
        prob = draw_problem(LEAKY, s, n=1, m=1, rho=0.3)
        for k in ("W", "U"):
            assert 0.15 * (1 - 1e-12) <= abs(float(prob.params[k][0, 0])) <= 0.3 * (1 + 1e-12)


# ----------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------


def test_problem_describe_repr_and_pretty() -> None:
    """The text every check's detail ends with names the cell, the named sizes, B, T and the seed."""
    from hypothesis.vendor.pretty import pretty

    prob = draw_problem(GRU, 2, n=3, m=2, B=9, T=3)
    assert prob.describe() == "gru [n=3, m=2, B=9, T=3, seed=2]"
    assert repr(prob) == "<Problem gru [n=3, m=2, B=9, T=3, seed=2]>"
    assert pretty(prob) == repr(prob)
    # dimension 1 is not a named size
    assert draw_problem(SCALAR_GATE, 0, n=2, m=1, B=1, T=1).describe() == "scalar_gate [n=2, m=1, B=1, T=1, seed=0]"
    assert _battery.check_adjoint(prob).detail == prob.describe()


def test_problem_losses() -> None:
    prob = draw_problem(LEAKY, 5, n=3, m=2, B=2, T=4)
    last, step = prob.loss("last"), prob.loss("step")
    assert isinstance(last, LastMSE) and isinstance(step, StepMSE)
    assert np.array_equal(last.V, prob.V) and np.array_equal(last.y, prob.y_last)
    assert np.array_equal(step.V, prob.V) and np.array_equal(step.y, prob.y_step)
    last32 = prob.loss("last", np.float32)
    assert last32.V.dtype == np.float32 and last32.y.dtype == np.float32
    assert np.array_equal(last32.V, prob.V.astype(np.float32))
    step128 = prob.loss("step", np.complex128)
    assert step128.y.dtype == np.complex128 and np.array_equal(step128.y.real, prob.y_step)


def test_a_problem_built_by_hand_has_seed_zero() -> None:
    """``Problem(...)`` without a seed is checked exactly as the same arrays drawn with seed 0 (the checks'
    random directions derive from the seed)."""
    drawn = draw_problem(LEAKY, 0, n=2, m=1, B=2, T=2)
    hand = _battery.Problem(drawn.cell, drawn.sizes, drawn.params, drawn.x, drawn.h0, drawn.V, drawn.y_last, drawn.y_step)
    assert hand.seed == 0
    assert _battery.check_adjoint(hand).error == _battery.check_adjoint(drawn).error
    other = dataclasses.replace(drawn, seed=1)
    assert _battery.check_adjoint(other).error != _battery.check_adjoint(drawn).error


# ----------------------------------------------------------------------------
# results and reports
# ----------------------------------------------------------------------------


def test_check_result_passes_up_to_its_tolerance() -> None:
    """A check fails when ``error > tolerance`` (the failure message's words) or the error is not finite."""
    assert CheckResult("jacobian", 0.0, 1e-3).passed
    assert CheckResult("jacobian", 1e-3, 1e-3).passed
    assert not CheckResult("jacobian", np.nextafter(1e-3, 1.0), 1e-3).passed
    assert not CheckResult("jacobian", float("nan"), 1e-3).passed
    assert not CheckResult("jacobian", float("inf"), 1e-3).passed
    assert isinstance(CheckResult("jacobian", 0.0, 1e-3).passed, bool)
    assert CheckResult("jacobian", 0.0, 1e-3).detail == ""


def test_check_result_ratio() -> None:
    assert CheckResult("adjoint", 3e-3, 1e-3).ratio == pytest.approx(3.0, rel=1e-15, abs=0)
    assert CheckResult("adjoint", 0.0, 1e-3).ratio == 0.0
    assert CheckResult("adjoint", float("nan"), 1e-3).ratio == np.inf
    assert CheckResult("adjoint", float("inf"), 1e-3).ratio == np.inf


def _report() -> VerificationReport:
    rep = VerificationReport("cellname")
    rep.results += [
        CheckResult("jacobian", 5e-4, 1e-3, "first jacobian"),
        CheckResult("adjoint", 2e-16, 1e-14, "first adjoint"),
        CheckResult("jacobian", 9e-4, 1e-3, "second jacobian"),
        CheckResult("adjoint", 1e-16, 1e-14, "second adjoint"),
    ]
    return rep


def test_report_worst_is_the_result_closest_to_failing_per_check() -> None:
    rep = _report()
    worst = rep.worst
    assert list(worst) == ["jacobian", "adjoint"]  # in the order the checks ran
    assert worst["jacobian"].detail == "second jacobian" and worst["adjoint"].detail == "first adjoint"
    rep.results.append(CheckResult("adjoint", float("nan"), 1e-14, "nan adjoint"))
    assert rep.worst["adjoint"].detail == "nan adjoint"  # a non-finite error is the worst


def test_report_passes_only_when_every_result_passes() -> None:
    rep = _report()
    assert rep.passed and rep.failures() == []
    rep.raise_if_failed()  # no error
    bad = CheckResult("jacobian", 2e-3, 1e-3, "bad jacobian")
    rep.results.insert(1, bad)
    assert not rep.passed and rep.failures() == [bad]
    assert VerificationReport("empty").results == [] and VerificationReport("empty").passed
    a, b = VerificationReport("a"), VerificationReport("b")
    a.results.append(bad)
    assert b.results == []  # each report has its own list


def test_report_summary_lists_each_checks_worst() -> None:
    rep = _report()
    lines = rep.summary().splitlines()
    assert lines[0] == "cellname: PASS"
    assert len(lines) == 3
    jac = next(line for line in lines if "jacobian" in line)
    assert "9.00e-04" in jac and "1.0e-03" in jac and "second jacobian" in jac and "first jacobian" not in jac
    adj = next(line for line in lines if "adjoint" in line)
    assert "2.00e-16" in adj and "1.0e-14" in adj and "first adjoint" in adj
    rep.results.append(CheckResult("adjoint", 3e-14, 1e-14, "bad adjoint"))
    summary = rep.summary()
    assert summary.splitlines()[0] == "cellname: FAIL" and "bad adjoint" in summary and "3.00e-14" in summary


def test_raise_if_failed_names_the_cell_and_every_failing_check() -> None:
    rep = _report()
    rep.results += [CheckResult("adjoint", 3e-14, 1e-14, "bad adjoint"),
                    CheckResult("mpmath", float("nan"), 1e-14, "nan mpmath")]
    with pytest.raises(sg.VerificationError) as info:
        rep.raise_if_failed()
    msg = str(info.value)
    assert msg.startswith("cell 'cellname' failed verification:")
    assert "adjoint: error 3.000e-14 > tolerance 1.000e-14; bad adjoint" in msg
    assert "mpmath: error nan > tolerance 1.000e-14; nan mpmath" in msg
    assert "first" not in msg and "second" not in msg  # passing results are not listed


# ----------------------------------------------------------------------------
# kernels and backends
# ----------------------------------------------------------------------------


def test_kernel_backends() -> None:
    """``reference`` runs the numpy reference; ``compiled`` the compiled kernels, except complex128
    (the complex-step forward pass), which only the reference has."""
    from symgate._compiled import CompiledKernel
    from symgate._reference import ReferenceKernel

    for dtype in ("float64", "float32", "complex128"):
        k = _battery._kernel(LEAKY, dtype, "reference")
        assert isinstance(k, ReferenceKernel) and not isinstance(k, CompiledKernel) and k.dtype == np.dtype(dtype)
    assert not isinstance(_battery._kernel(LEAKY, "complex128", "compiled"), CompiledKernel)
    for dtype in ("float64", "float32"):
        k = _battery._kernel(LEAKY, dtype, "compiled")
        assert isinstance(k, CompiledKernel) and k.dtype == np.dtype(dtype)
    with pytest.raises(sg.ConfigError, match="backend must be 'reference' or 'compiled', got 'gpu'"):
        _battery._kernel(LEAKY, "float64", "gpu")


# ----------------------------------------------------------------------------
# what each check feeds its routes
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_leaky() -> None:
    sg.compile(LEAKY)  # the built-ins are compiled ahead of time: loaded once


def test_every_check_reports_its_documented_tolerance(compiled_leaky: None) -> None:
    """README table: ``100 eps^(2/3)`` for finite differences, ``64 (T+1) eps`` for accumulated rounding
    (``eps32`` for float32), ``64 eps`` for the elementwise mpmath partials; each check by its own name."""
    prob = draw_problem(LEAKY, 15, n=2, m=1, B=2, T=4)
    documented = {"jacobian": TOL_FD, "bptt_cs": tol_round(4), "bptt_fd": TOL_FD, "adjoint": tol_round(4),
                  "mpmath": 64 * EPS, "float32": 64 * 5 * EPS32, "batch": tol_round(4), "compiled": tol_round(4)}
    table = dict(_battery.CHECKS, **_battery.COMPILED_CHECKS)
    assert set(table) == set(documented)
    # abs=0: pytest.approx's default absolute margin (1e-12) exceeds these tolerances themselves
    for name, check in table.items():
        r = check(prob, backend="compiled")
        assert r.check == name and r.tolerance == pytest.approx(documented[name], rel=1e-12, abs=0), name
        assert r.passed and r.detail.endswith(prob.describe()), r.detail


def test_jacobian_check_differences_each_state_and_parameter_entry_with_the_documented_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Central differences of one step: each state unit (each column of the stacked states) and each
    parameter entry moved alone by ``+-eps**(1/3) max(1, |v|)``, on the first input step."""
    prob = draw_problem(VECTOR_GATE, 3, n=2, m=1, B=2, T=3)
    prob = dataclasses.replace(prob, h0={"h": prob.h0["h"] * 5.0})  # some |h| > 1: the step grows with |v|
    ks = Kernels(monkeypatch)
    assert _battery.check_jacobian(prob).passed
    calls = ks.calls(*F64, "forward")
    h = prob.h0["h"]
    state_calls = [a for a, _ in calls if all(a[0][k] is prob.params[k] for k in prob.params)]
    assert len(state_calls) == 2 * h.shape[1]
    for j in range(h.shape[1]):
        for sign, (params, x, h0) in zip((1, -1), state_calls[2 * j:2 * j + 2]):
            assert np.array_equal(x, prob.x[:1])
            expected = np.zeros_like(h)
            expected[:, j] = sign * fd_step(h[:, j])
            # (v + s) - v is s to within an ulp of v
            np.testing.assert_allclose(h0["h"] - h, expected, rtol=0, atol=4 * EPS * np.max(np.abs(h)) + 1e-300)
    param_calls = [a for a, _ in calls if not all(a[0][k] is prob.params[k] for k in prob.params)]
    assert len(param_calls) == 2 * sum(v.size for v in prob.params.values())
    i = 0
    for name, theta in prob.params.items():
        for idx in np.ndindex(theta.shape):
            for sign in (1, -1):
                params, x, h0 = param_calls[i]
                i += 1
                assert h0 is prob.h0 and np.array_equal(x, prob.x[:1])
                expected = np.zeros_like(theta)
                expected[idx] = sign * fd_step(theta[idx])
                np.testing.assert_allclose(params[name] - theta, expected, rtol=0, atol=4 * EPS * max(1.0, abs(theta[idx])))
                assert all(params[k] is prob.params[k] for k in prob.params if k != name)


def test_jacobian_check_compares_on_the_first_input_step(monkeypatch: pytest.MonkeyPatch) -> None:
    prob = draw_problem(VECTOR_GATE, 3, n=2, m=1, B=2, T=3)
    ks = Kernels(monkeypatch)
    _battery.check_jacobian(prob)
    for method in ("jacobian", "parameter_jacobian"):
        calls = ks.calls(*F64, method)
        assert calls and all(np.array_equal(a[1], prob.x[0]) and a[2] is prob.h0 for a, _ in calls)
    pj = ks.calls(*F64, "parameter_jacobian")
    assert sorted((a[3], a[4]) for a, _ in pj) == sorted((p, "h") for p in prob.params)


@pytest.mark.parametrize("part, w_scale, h_scale", [("state", 1.0, 1.0), ("state", 6.0, 1.0), ("W", 1.0, 1.0), ("W", 1.0, 6.0)])
def test_jacobian_check_error_is_relative_to_max_one_and_the_jacobian(part: str, w_scale: float, h_scale: float,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The Jacobian error is ``max|J - J_fd| / max(1, max|J|)``: with small Jacobians (all entries below 1)
    the floor 1 applies; with ``W`` scaled by 6 (the state part) or ``h`` by 6 (``dh'/dW = alpha phi' h``)
    the largest entry (1.8, 2.3); a defect of ``k`` times the tolerance in that metric gives
    ``error / tolerance = k``."""
    prob = draw_problem(LEAKY, 14, n=3, m=2, B=2, T=2, rho=0.5)
    prob = dataclasses.replace(prob, params={**prob.params, "W": prob.params["W"] * w_scale}, h0={"h": prob.h0["h"] * h_scale})
    ref = sg.reference_kernel(LEAKY)
    J = ref.jacobian(prob.params, prob.x[0], prob.h0) if part == "state" else \
        ref.parameter_jacobian(prob.params, prob.x[0], prob.h0, "W", "h")
    assert (float(np.max(np.abs(J))) > 1.5) == (max(w_scale, h_scale) > 1)
    base = _battery.check_jacobian(prob)
    assert base.error < 0.1 * TOL_FD
    for k in (0.1, 10.0):
        amount = k * TOL_FD * max(1.0, float(np.max(np.abs(J))))

        def bump(inner: Any, out: np.ndarray, *a: Any, **kw: Any) -> np.ndarray:
            if part != "state" and a[3] != part:
                return out
            out = np.array(out)
            out[(0,) * out.ndim] += amount
            return out

        with monkeypatch.context() as mp:
            Kernels(mp, edits={F64: {"jacobian" if part == "state" else "parameter_jacobian": bump}})
            r = _battery.check_jacobian(prob)
        # triangle inequality (the pinned tests' bound): the defect-free error, the rounding of the bumped
        # entry (8 eps) and the defect's move of the scale (at most k TOL_FD < 1e-3 k of it)
        assert r.tolerance == pytest.approx(TOL_FD, rel=1e-12, abs=0)
        assert abs(r.error / TOL_FD - k) <= base.error / TOL_FD + 8 * EPS / TOL_FD + 1e-3 * k, r.detail
        assert r.passed == (k < 1)
        if k > 1:
            assert ("state Jacobian" if part == "state" else "dh'/dW") in r.detail


def _fd_problem(scale_x: float) -> sg.testing.Problem:
    prob = draw_problem(LEAKY, 7, n=3, m=2, B=2, T=3, rho=0.5)
    return dataclasses.replace(prob, x=prob.x * scale_x)


@pytest.mark.parametrize("scale_x", [1.0, 0.1])
def test_bptt_fd_check_steps_the_largest_entry_by_the_documented_step(scale_x: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss is differenced at ``+-s`` along the direction, ``s = eps**(1/3) max(1, max|v|) / max|d|``
    (no entry of parameters, initial state and input moves by more than the documented step of the
    largest value).  With inputs scaled by 0.1 every value is below 1 and the floor ``max(1, .)`` applies."""
    prob = _fd_problem(scale_x)
    size = max([1.0] + [float(np.max(np.abs(v))) for v in [*prob.params.values(), prob.h0["h"], prob.x]])
    assert (size == 1.0) == (scale_x < 1)
    ks = Kernels(monkeypatch)
    assert _battery.check_bptt_finite_difference(prob, "last").passed
    dp, dh, dx = ks.directions[-1]
    dirmax = max(float(np.max(np.abs(v))) for v in [*dp.values(), dh["h"], dx])
    s = EPS ** (1 / 3) * size / dirmax
    calls = ks.calls(*F64, "forward")
    assert len(calls) == 2
    for sign, (a, _) in zip((1, -1), calls):
        params, x, h0 = a
        # the step from a least-squares fit of (v + s d) - v against d: relative error ~ eps / s
        for got, base, d in [*((params[k], prob.params[k], dp[k]) for k in dp), (h0["h"], prob.h0["h"], dh["h"]), (x, prob.x, dx)]:
            fitted = float(np.sum((got - base) * d) / np.sum(d * d))
            assert fitted == pytest.approx(sign * s, rel=1e-8, abs=0)


def test_bptt_fd_check_scale_counts_the_loss_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the gradient is small against the loss (a readout 1000x smaller), the difference quotient's
    rounding is ``eps |L| / s``, so the error is normalised by ``|L| max(1, max|v|) / max|d|``: a defect of
    ``k`` times the tolerance in that metric gives ``error / tolerance = k``."""
    prob = _fd_problem(1.0)
    prob = dataclasses.replace(prob, V=prob.V * 1e-3)
    size = max([1.0] + [float(np.max(np.abs(v))) for v in [*prob.params.values(), prob.h0["h"], prob.x]])
    base = _battery.check_bptt_finite_difference(prob, "last")
    for k in (0.1, 10.0):
        box: dict[str, Any] = {}

        def edit(inner: Any, g: Any, *a: Any, **kw: Any) -> Any:
            dp, dh, dx = box["d"]
            dirmax = max(float(np.max(np.abs(v))) for v in [*dp.values(), dh["h"], dx])
            value_scale = abs(float(g.value)) * size / dirmax
            box["dominates"] = value_scale > 3 * directional(g, dp, dh, dx)[1]
            return shift_along(g, dp, "params", k * TOL_FD * max(value_scale, directional(g, dp, dh, dx)[1]))

        with monkeypatch.context() as mp:
            Kernels(mp, edits={F64: {"backward": edit}}, direction=lambda dp, dh, dx: box.setdefault("d", (dp, dh, dx)))
            r = _battery.check_bptt_finite_difference(prob, "last")
        assert box["dominates"]
        # triangle inequality: within the defect-free error, plus the defect's move of the scale (1e-3 k)
        # and the rounding of the shifted sum (a few eps of the scale: eps / TOL_FD ~ 1e-7)
        assert r.tolerance == pytest.approx(TOL_FD, rel=1e-12, abs=0)
        assert abs(r.error / TOL_FD - k) <= base.error / TOL_FD + 1e-3 * k + 1e-6


def test_bptt_cs_check_perturbs_every_input_by_an_imaginary_step_along_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The complex-step route runs the reference's complex128 forward pass on ``v + 1e-30 i d`` for
    parameters, initial states and inputs."""
    prob = draw_problem(GRU, 5, n=2, m=2, B=2, T=2)
    ks = Kernels(monkeypatch)
    assert _battery.check_bptt_complex_step(prob, "step").passed
    dp, dh, dx = ks.directions[-1]
    (a, _), = ks.calls("complex128", "reference", "forward")
    pc, xc, hc = a
    # 1e-30 * d rounded once on both sides
    for got, base, d in [*((pc[k], prob.params[k], dp[k]) for k in dp), (hc["h"], prob.h0["h"], dh["h"]), (xc, prob.x, dx)]:
        assert got.dtype == np.complex128 and np.array_equal(got.real, base)
        np.testing.assert_allclose(got.imag, 1e-30 * d, rtol=1e-15, atol=0)
    assert not ks.calls("complex128", "compiled", "forward")


def _stationary(prob: sg.testing.Problem) -> sg.testing.Problem:
    """``prob`` with targets equal to the readout of its own trajectory: both losses are stationary in
    ``h``, so every gradient contribution is rounding while the readout's terms are O(1)."""
    h = sg.reference_kernel(prob.cell).forward(prob.params, prob.x, prob.h0).h
    return dataclasses.replace(prob, y_last=h[-1] @ prob.V.T, y_step=h @ prob.V.T)


@pytest.mark.parametrize("loss", ["last", "step"])
def test_bptt_cs_check_scale_is_the_readout_where_the_loss_is_stationary(loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """*Readout cancellation*: the complex-step error is normalised by ``sum_i |g_abs,i d_i|`` when the
    contributions ``sum_i |g_i d_i|`` vanish; a defect of ``k`` times the tolerance in that metric gives
    ``error / tolerance = k``."""
    prob = _stationary(draw_problem(GRU, 6, n=3, m=2, B=2, T=3))
    L = prob.loss(loss)
    ref = sg.reference_kernel(GRU)
    g_abs = ref.vjp(prob.params, prob.x, prob.h0, {"h": absolute_cotangent(L, ref.forward(prob.params, prob.x, prob.h0).h)})
    tol = tol_round(prob.T)
    base = _battery.check_bptt_complex_step(prob, loss)
    assert base.error < 0.1 * tol
    for k in (0.1, 10.0):
        box: dict[str, Any] = {}

        def edit(inner: Any, g: Any, *a: Any, **kw: Any) -> Any:
            dp, dh, dx = box["d"]
            readout = directional(g_abs, dp, dh, dx)[1]
            box["ratio"] = directional(g, dp, dh, dx)[1] / readout
            return shift_along(g, dp, "params", k * tol * max(readout, directional(g, dp, dh, dx)[1]))

        with monkeypatch.context() as mp:
            Kernels(mp, edits={F64: {"backward": edit}}, direction=lambda dp, dh, dx: box.setdefault("d", (dp, dh, dx)))
            r = _battery.check_bptt_complex_step(prob, loss)
        assert box["ratio"] < 1e-6  # the contributions have cancelled
        assert r.tolerance == pytest.approx(tol, rel=1e-12, abs=0)
        assert abs(r.error / tol - k) <= base.error / tol + 8 * EPS / tol + 1e-3 * k, r.detail
        assert r.passed == (k < 1)


def test_adjoint_check_scale_counts_the_forward_mode_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a direction in the initial state only, ``<J u, v>`` sums ``T B n`` terms and ``<u, J^T v>`` only
    ``B n`` (each a sum over steps): the error is normalised by the larger absolute sum, the forward one."""
    prob = draw_problem(LEAKY, 12, n=2, m=1, B=2, T=6)
    tol = tol_round(prob.T)
    ref = sg.reference_kernel(LEAKY)

    def h0_only(dp: dict, dh: dict, dx: np.ndarray) -> tuple:
        return {k: np.zeros_like(v) for k, v in dp.items()}, dh, np.zeros_like(dx)

    with monkeypatch.context() as mp:
        Kernels(mp, direction=h0_only)
        base = _battery.check_adjoint(prob)
    for k in (0.1, 10.0):
        box: dict[str, Any] = {}

        def edit(inner: Any, g: Any, params: Any, x: Any, h0: Any, cot: Any, **kw: Any) -> Any:
            dp, dh, dx = box["d"]
            jv = ref.jvp(params, x, h0, {**dp, "h0": dh, "x": dx})
            forward_terms = float(sum(np.sum(np.abs(jv[s] * cot[s])) for s in cot))
            box["ratio"] = forward_terms / directional(g, dp, dh, dx)[1]
            return shift_along(g, dh, "h0", k * tol * max(forward_terms, directional(g, dp, dh, dx)[1]))

        def record(dp: dict, dh: dict, dx: np.ndarray) -> tuple:
            return box.setdefault("d", h0_only(dp, dh, dx))

        with monkeypatch.context() as mp:
            Kernels(mp, edits={F64: {"vjp": edit}}, direction=record)
            r = _battery.check_adjoint(prob)
        assert box["ratio"] > 3  # the forward-mode terms are the larger scale (6.7x here)
        assert r.tolerance == pytest.approx(tol, rel=1e-12, abs=0)
        assert abs(r.error / tol - k) <= base.error / tol + 8 * EPS / tol + 1e-3 * k, r.detail
        assert r.passed == (k < 1)


def test_mpmath_check_evaluates_each_partial_at_two_points_of_one_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each local partial is evaluated at ``points=2`` points, each point the forward values of one
    (sequence, unit) of the first step; over the check, several sequences and units are visited."""
    prob = draw_problem(VECTOR_GATE, 9, n=4, m=3, B=3, T=2)
    vals = sg.reference_kernel(VECTOR_GATE).step_values(prob.params, prob.x[0], prob.h0)
    partial = _battery._float64_partial
    calls: list[tuple[str, list[str], tuple]] = []

    def recorded(label: str, symbols: Any, expr: Any) -> Callable[..., Any]:
        f = partial(label, symbols, expr)

        def g(*args: Any) -> Any:
            calls.append((label, [s.name for s in symbols], args))
            return f(*args)

        return g

    monkeypatch.setattr(_battery, "_float64_partial", recorded)
    assert _battery.check_mpmath(prob).passed
    labels = [c[0] for c in calls]
    assert labels and all(labels.count(lbl) == 2 for lbl in set(labels))

    def value(name: str, b: int, u: int) -> float:
        v = np.asarray(vals[name])
        if v.ndim == 0:
            return float(v)
        v = v if v.ndim == 1 else v[b]
        return float(v[u % v.shape[-1]])

    seen_b, seen_u = set(), set()
    for label, names, args in calls:
        fits = [(b, u) for b in range(prob.B) for u in range(4)
                if all(value(nm, b, u) == float(a) for nm, a in zip(names, args))]
        assert fits, f"{label}: the point is not one (sequence, unit) of the forward values"
        if len({b for b, _ in fits}) == 1:
            seen_b |= {fits[0][0]}
        if len({u for _, u in fits}) == 1:
            seen_u |= {fits[0][1]}
    assert len(seen_b) >= 2 and len(seen_u) >= 2


def test_float32_check_runs_float32_kernels_on_the_rounded_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 kernels get float32 arrays; the float64 kernels the same values (float32-representable)."""
    prob = draw_problem(GRU, 10, n=2, m=2, B=2, T=2)
    ks = Kernels(monkeypatch)
    assert _battery.check_float32(prob).passed
    (a32, _), = ks.calls("float32", "reference", "forward")
    a64 = ks.calls("float64", "reference", "forward")[0][0]  # (then the readout scale's forward pass)
    for k in prob.params:
        assert a32[0][k].dtype == np.float32 and a64[0][k].dtype == np.float64
        assert np.array_equal(a64[0][k], a32[0][k].astype(np.float64))
        assert np.array_equal(a32[0][k], prob.params[k].astype(np.float32))
    assert np.array_equal(a64[1], prob.x.astype(np.float32).astype(np.float64))
    (b32, kw32), = ks.calls("float32", "reference", "backward")
    assert kw32["loss"].V.dtype == np.float32 and np.array_equal(kw32["loss"].y, prob.y_last.astype(np.float32))


def test_batch_check_splits_the_batch_into_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    prob = draw_problem(LSTM, 11, n=2, m=2, B=3, T=2)
    ks = Kernels(monkeypatch)
    assert _battery.check_batch(prob).passed
    singles = [a for a, _ in ks.calls(*F64, "forward") if a[1].shape[1] == 1]
    assert len(singles) == prob.B
    for b, (params, x, h0) in enumerate(singles):
        assert np.array_equal(x[:, 0], prob.x[:, b])
        assert all(np.array_equal(h0[s][0], prob.h0[s][b]) for s in ("h", "c"))
    losses = [kw["loss"] for a, kw in ks.calls(*F64, "backward") if a[1].shape[1] == 1]
    assert [np.array_equal(L.y[0], prob.y_last[b]) for b, L in enumerate(losses)] == [True] * prob.B


@pytest.mark.parametrize("dropped", ["h0", "x"])
def test_compiled_check_catches_a_jvp_that_ignores_a_tangent(dropped: str, compiled_leaky: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled check compares JVPs along the initial states and the inputs too: a compiled JVP that
    drops the ``h0`` or ``x`` tangent fails it (and the adjoint check on the compiled backend)."""
    prob = draw_problem(LEAKY, 12, n=3, m=2, B=2, T=3)

    def edit(inner: Any, out: Any, params: Any, x: Any, h0: Any, tangents: Any) -> Any:
        return inner.jvp(params, x, h0, {k: v for k, v in tangents.items() if k != dropped})

    assert _battery.check_compiled(prob).passed
    ks = Kernels(monkeypatch, edits={("float64", "compiled"): {"jvp": edit}})
    r = _battery.check_compiled(prob)
    assert not r.passed and "worst at JVP of h" in r.detail
    (a, _), = ks.calls("float64", "compiled", "jvp")
    assert set(a[3]) == {*prob.params, "h0", "x"}
    assert not _battery.check_adjoint(prob, backend="compiled").passed


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------


def test_verify_defaults_to_four_problems_from_seed_zero() -> None:
    rep = sg.testing.verify(LEAKY, checks=["adjoint"])
    assert len(rep.results) == 4
    explicit = sg.testing.verify(LEAKY, checks=["adjoint"], examples=4, seed=0)
    assert [r.detail for r in rep.results] == [r.detail for r in explicit.results]
    assert [r.error for r in rep.results] == [r.error for r in explicit.results]
    assert len({r.detail for r in rep.results}) == 4  # four distinct problems


def test_verify_and_the_test_factory_draw_the_same_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one seed, ``verify`` and ``battery_test_class`` check the same problems, so a failing test of the
    factory is replayed by ``verify(cell, seed=...)``; other seeds draw other problems."""
    seeds: list[int] = []
    draw = _battery.draw_problem
    monkeypatch.setattr(_battery, "draw_problem", lambda cell, rng, **kw: (seeds.append(rng), draw(cell, rng, **kw))[1])
    sg.testing.verify(LEAKY, seed=3, examples=2, checks=["adjoint"])
    by_verify = list(seeds)
    seeds.clear()
    sg.testing.battery_test_class(LEAKY, seed=3, examples=2)().test_adjoint()
    assert seeds == by_verify and len(set(by_verify)) == 2
    seeds.clear()
    sg.testing.verify(LEAKY, seed=4, examples=2, checks=["adjoint"])
    assert not set(seeds) & set(by_verify)


def _broken_vjp(inner: Any, g: Any, *a: Any, **kw: Any) -> Any:
    """A VJP whose parameter gradients are 1 % off: far outside the adjoint tolerance."""
    return dataclasses.replace(g, params={k: v * 1.01 for k, v in g.params.items()})


def test_verify_raises_on_failure_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    Kernels(monkeypatch, edits={F64: {"vjp": _broken_vjp}})
    with pytest.raises(sg.VerificationError, match=r"cell 'leaky' failed verification:\n  adjoint: error"):
        sg.testing.verify(LEAKY, examples=1, checks=["adjoint"])
    rep = sg.testing.verify(LEAKY, examples=1, checks=["adjoint", "batch"], raise_on_failure=False)
    assert [r.check for r in rep.failures()] == ["adjoint"] and not rep.passed


def test_verify_runs_the_checks_on_the_chosen_backend(compiled_leaky: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in the compiled kernels fails ``backend="compiled"`` and not the reference backend."""
    Kernels(monkeypatch, edits={("float64", "compiled"): {"vjp": _broken_vjp}})
    assert sg.testing.verify(LEAKY, examples=1, checks=["adjoint"]).passed
    rep = sg.testing.verify(LEAKY, examples=1, checks=["adjoint"], backend="compiled", raise_on_failure=False)
    assert not rep.passed
    rep = sg.testing.verify(LEAKY, examples=1, checks=["compiled"], backend="compiled")
    assert [r.check for r in rep.results] == ["compiled"] and rep.passed
