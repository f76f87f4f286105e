"""Tests of the in-place optimizers and gradient clipping.

Expected values come from the textbook update rules typed out below with
plain Python floats, one coordinate at a time.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symgate._errors import ConfigError, DTypeError, NonFiniteError, ShapeError, SymgateError
from symgate.experiments.optim import (
    DEFAULT_LR,
    OPTIMIZERS,
    SGD,
    Adam,
    Momentum,
    Optimizer,
    clip_grad_norm,
    make_optimizer,
)

# a tiny problem: two parameters, three steps of fixed gradients
THETA0 = {"w": [1.0, -2.0, 0.5], "b": [[0.25], [-0.75]]}
GRADS = [
    {"w": [0.1, -0.4, 2.0], "b": [[-1.5], [0.3]]},
    {"w": [-0.2, -0.1, 1.0], "b": [[0.5], [0.0]]},
    {"w": [0.3, 0.6, -3.0], "b": [[-0.25], [1e-3]]},
]


def _params() -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in THETA0.items()}


def _grads(n: int) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in GRADS[n].items()}


def _flat(v) -> list[float]:
    return [float(a) for a in np.ravel(np.array(v, dtype=float))]


def _expected_series(rule) -> list[dict[str, list[float]]]:
    """Apply a scalar update rule coordinate by coordinate; returns theta after each step."""
    out = []
    state = {k: [None] * len(_flat(v)) for k, v in THETA0.items()}
    theta = {k: _flat(v) for k, v in THETA0.items()}
    for n, g in enumerate(GRADS, start=1):
        for k in theta:
            gk = _flat(g[k])
            for i in range(len(theta[k])):
                theta[k][i], state[k][i] = rule(theta[k][i], gk[i], state[k][i], n)
        out.append({k: list(v) for k, v in theta.items()})
    return out


def _assert_params(params, expected, rtol=1e-13):
    for k, v in expected.items():
        np.testing.assert_allclose(params[k].ravel(), v, rtol=rtol, atol=1e-15)


# ---------------------------------------------------------------------------
# update rules against the textbook equations


def test_sgd_matches_textbook():
    lr = 0.05

    def rule(th, g, s, n):
        return th - lr * g, s

    params = _params()
    opt = SGD(params, lr=lr)
    for n, expected in enumerate(_expected_series(rule)):
        opt.step(_grads(n))
        _assert_params(params, expected)
    assert opt.n_steps == 3


def test_momentum_matches_textbook():
    lr, beta = 0.1, 0.8

    def rule(th, g, m, n):
        m = g if m is None else beta * m + g  # m_0 = 0, so m_1 = g_1
        return th - lr * m, m

    params = _params()
    opt = Momentum(params, lr=lr, beta=beta)
    for n, expected in enumerate(_expected_series(rule)):
        opt.step(_grads(n))
        _assert_params(params, expected)


@pytest.mark.parametrize("beta1,beta2,eps", [(0.9, 0.999, 1e-8), (0.5, 0.9, 1e-3), (0.0, 0.0, 1e-8)])
def test_adam_matches_textbook_with_bias_correction(beta1, beta2, eps):
    lr = 0.01

    def rule(th, g, s, n):
        m, v = (0.0, 0.0) if s is None else s
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**n)
        v_hat = v / (1 - beta2**n)
        return th - lr * m_hat / (math.sqrt(v_hat) + eps), (m, v)

    params = _params()
    opt = Adam(params, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    for n, expected in enumerate(_expected_series(rule)):
        opt.step(_grads(n))
        _assert_params(params, expected, rtol=1e-12)


def test_adam_first_step_is_signed_lr():
    # with bias correction, step 1 moves each coordinate by lr * g/(|g| + eps) ~ lr * sign(g)
    params = _params()
    opt = Adam(params, lr=0.01)
    opt.step(_grads(0))
    for k in params:
        g = np.array(GRADS[0][k])
        np.testing.assert_allclose(params[k] - np.array(THETA0[k]), -0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_adam_buffers_and_preconditioner_steps_1_2_3():
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = _params()
    opt = Adam(params, lr=1e-3)
    with pytest.raises(ConfigError, match="at least one step"):
        opt.preconditioner()
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for n in (1, 2, 3):
        g = _grads(n - 1)
        opt.step(g)
        sd = opt.state_dict()
        assert sd["step"] == n
        pre = opt.preconditioner()
        for k in params:
            for i in range(params[k].size):
                gi = float(g[k].ravel()[i])
                m[k].ravel()[i] = b1 * m[k].ravel()[i] + (1 - b1) * gi
                v[k].ravel()[i] = b2 * v[k].ravel()[i] + (1 - b2) * gi * gi
                v_hat = v[k].ravel()[i] / (1 - b2**n)
                assert pre[k].ravel()[i] == pytest.approx(1.0 / (math.sqrt(v_hat) + eps), rel=1e-12)
            np.testing.assert_allclose(sd["m"][k], m[k], rtol=1e-14)
            np.testing.assert_allclose(sd["v"][k], v[k], rtol=1e-14)
            assert pre[k].shape == params[k].shape


def test_momentum_unrolled_identity():
    lr, beta = 0.05, 0.7
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal(4), "c": rng.standard_normal((2, 3))}
    opt = Momentum(params, lr=lr, beta=beta)
    history: list[dict[str, np.ndarray]] = []
    for n in range(1, 7):
        g = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        history.append(g)
        before = {k: p.copy() for k, p in params.items()}
        opt.step(g)
        for k in params:
            expected = -lr * sum(beta**j * history[n - 1 - j][k] for j in range(n))
            np.testing.assert_allclose(params[k] - before[k], expected, rtol=1e-12, atol=1e-15)


@given(
    beta=st.floats(0.0, 0.99),
    lr=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
)
def test_momentum_unrolled_identity_property(beta, lr, seed, n):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(5)
    opt = Momentum({"p": p}, lr=lr, beta=beta)
    gs = [rng.standard_normal(5) for _ in range(n)]
    before = p.copy()
    for g in gs:
        before = p.copy()
        opt.step({"p": g})
    expected = -lr * sum(beta**j * gs[n - 1 - j] for j in range(n))
    np.testing.assert_allclose(p - before, expected, rtol=1e-11, atol=1e-14)


@given(lr=st.floats(1e-6, 10.0), seed=st.integers(0, 2**32 - 1))
def test_sgd_property(lr, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((3, 2))
    p0 = p.copy()
    g = rng.standard_normal((3, 2))
    SGD({"p": p}, lr=lr).step({"p": g})
    for i in range(3):
        for j in range(2):
            assert p[i, j] == pytest.approx(p0[i, j] - lr * g[i, j], rel=1e-14, abs=1e-15)


# ---------------------------------------------------------------------------
# in-place semantics


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_updates_are_in_place(name):
    params = _params()
    ids = {k: id(p) for k, p in params.items()}
    views = {k: p[...] for k, p in params.items()}
    first_row = params["b"][0]  # a view into a row
    opt = make_optimizer(name, params)
    opt.step(_grads(0))
    for k, p in params.items():
        assert id(p) == ids[k]
        assert opt.params[k] is p
        assert np.array_equal(views[k], p)
        assert not np.array_equal(p, np.array(THETA0[k]))
    assert first_row[0] == params["b"][0, 0] != THETA0["b"][0][0]


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_updates_through_views_of_one_buffer(name):
    flat = np.arange(1.0, 7.0)
    params = {"u": flat[:2], "v": flat[2:].reshape(2, 2)}
    opt = make_optimizer(name, params, lr=0.1)
    opt.step({"u": np.ones(2), "v": np.ones((2, 2))})
    assert np.all(flat < np.arange(1.0, 7.0))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_float32_parameters(name):
    p64 = _params()
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    o64, o32 = make_optimizer(name, p64, lr=0.01), make_optimizer(name, p32, lr=0.01)
    for n in range(3):
        o64.step(_grads(n))
        o32.step({k: g.astype(np.float32) for k, g in _grads(n).items()})
    for k in p64:
        assert p32[k].dtype == np.float32
        np.testing.assert_allclose(p32[k], p64[k], rtol=1e-5, atol=1e-6)


def test_state_dict_is_a_copy():
    params = _params()
    opt = Momentum(params, lr=0.1, beta=0.5)
    opt.step(_grads(0))
    sd = opt.state_dict()
    assert sd["type"] == "Momentum" and sd["step"] == 1 and sd["lr"] == 0.1 and sd["beta"] == 0.5
    np.testing.assert_array_equal(sd["m"]["w"], GRADS[0]["w"])
    sd["m"]["w"][:] = 99.0
    assert not np.any(opt.state_dict()["m"]["w"] == 99.0)
    a = Adam(_params()).state_dict()
    assert a["step"] == 0 and a["beta1"] == 0.9 and a["beta2"] == 0.999 and a["eps"] == 1e-8
    assert np.all(a["m"]["w"] == 0) and np.all(a["v"]["b"] == 0)
    assert SGD(_params()).state_dict() == {"type": "SGD", "step": 0, "lr": 0.01}


def test_lr_can_change_between_steps():
    params = {"p": np.zeros(2)}
    opt = SGD(params, lr=0.1)
    opt.step({"p": np.ones(2)})
    opt.lr = 0.5
    opt.step({"p": np.ones(2)})
    np.testing.assert_allclose(params["p"], [-0.6, -0.6])
    with pytest.raises(ConfigError, match="lr"):
        opt.lr = -1.0
    assert opt.lr == 0.5


def test_step_allocates_little():
    n = 200_000  # 1.6 MB of parameters
    params = {"a": np.zeros(n), "b": np.zeros((10, 10))}
    grads = {"a": np.full(n, 1e-3), "b": np.ones((10, 10))}
    for name in OPTIMIZERS:
        opt = make_optimizer(name, params)
        opt.step(grads)
        tracemalloc.start()
        try:
            opt.step(grads)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64_000, (name, peak)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_missing_and_unknown_gradients(name):
    params = _params()
    opt = make_optimizer(name, params)
    with pytest.raises(ShapeError, match=r"missing \['b'\]"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(ShapeError, match=r"unknown entries \['extra'\]"):
        opt.step({**_grads(0), "extra": np.zeros(1)})
    with pytest.raises(ShapeError):
        opt.step([np.zeros(3), np.zeros((2, 1))])  # type: ignore[arg-type]
    assert opt.n_steps == 0


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_wrong_shape(name):
    opt = make_optimizer(name, _params())
    g = _grads(0)
    g["b"] = np.zeros(2)
    with pytest.raises(ShapeError, match=r"grads\['b'\] has shape \(2,\); parameter 'b' has shape \(2, 1\)"):
        opt.step(g)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_names_parameter_and_changes_nothing(name, bad):
    params = _params()
    opt = make_optimizer(name, params)
    g = _grads(0)
    g["b"][1, 0] = bad
    with pytest.raises(NonFiniteError, match=r"parameter 'b'.*\(1, 0\)"):
        opt.step(g)
    for k in params:  # validation precedes every update: 'w' untouched too
        np.testing.assert_array_equal(params[k], np.array(THETA0[k]))
    assert opt.n_steps == 0
    assert all(np.all(a == 0) for key, bufs in opt.state_dict().items() if key in ("m", "v") for a in bufs.values())


def test_finite_gradients_whose_sum_overflows_are_accepted():
    p = np.zeros(4)
    SGD({"p": p}, lr=1e-10).step({"p": np.full(4, 1e308)})
    np.testing.assert_allclose(p, -1e298)


def test_gradient_dtype_checked():
    opt = SGD(_params())
    g = _grads(0)
    g["w"] = np.array([1, 2, 3])
    with pytest.raises(DTypeError, match="grads\\['w'\\]"):
        opt.step(g)
    g["w"] = [0.1, 0.2, 0.3]
    with pytest.raises(DTypeError, match="grads\\['w'\\]"):
        opt.step(g)


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, float("nan"), float("inf"), True, "0.1", None])
@pytest.mark.parametrize("cls", [SGD, Momentum, Adam])
def test_bad_lr(cls, bad):
    with pytest.raises(ConfigError, match="lr"):
        cls(_params(), lr=bad)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), True, "0.9"])
def test_bad_betas(bad):
    with pytest.raises(ConfigError, match=r"beta.*\[0, 1\)"):
        Momentum(_params(), beta=bad)
    with pytest.raises(ConfigError, match=r"beta1.*\[0, 1\)"):
        Adam(_params(), beta1=bad)
    with pytest.raises(ConfigError, match=r"beta2.*\[0, 1\)"):
        Adam(_params(), beta2=bad)


@pytest.mark.parametrize("bad", [0.0, -1e-8, float("nan"), float("inf")])
def test_bad_eps(bad):
    with pytest.raises(ConfigError, match="eps"):
        Adam(_params(), eps=bad)


def test_beta_zero_allowed():
    params = {"p": np.zeros(2)}
    opt = Momentum(params, lr=1.0, beta=0.0)
    opt.step({"p": np.ones(2)})
    opt.step({"p": np.ones(2)})
    np.testing.assert_array_equal(params["p"], [-2.0, -2.0])


def test_bad_params():
    with pytest.raises(ConfigError, match="empty"):
        SGD({})
    with pytest.raises(ConfigError, match="mapping"):
        SGD([np.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"params\['i'\].*int"):
        SGD({"i": np.zeros(2, dtype=np.int64)})
    with pytest.raises(DTypeError, match=r"params\['c'\].*complex"):
        SGD({"c": np.zeros(2, dtype=np.complex128)})
    with pytest.raises(DTypeError, match=r"params\['l'\]"):
        SGD({"l": [0.0, 1.0]})  # type: ignore[dict-item]
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(DTypeError, match="read-only"):
        SGD({"r": ro})
    a = np.zeros(2)
    with pytest.raises(ConfigError, match="same array"):
        SGD({"a": a, "b": a})
    with pytest.raises(ConfigError, match="strings"):
        SGD({1: np.zeros(2)})  # type: ignore[dict-item]


def test_errors_are_symgate_and_builtin():
    with pytest.raises(ValueError):
        SGD(_params(), lr=-1)
    with pytest.raises(SymgateError):
        SGD(_params()).step({})


# ---------------------------------------------------------------------------
# factory


def test_make_optimizer_defaults():
    assert OPTIMIZERS == {"sgd": SGD, "momentum": Momentum, "adam": Adam}
    assert DEFAULT_LR == {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3}
    for name, cls in OPTIMIZERS.items():
        opt = make_optimizer(name, _params())
        assert type(opt) is cls and isinstance(opt, Optimizer)
        assert opt.lr == DEFAULT_LR[name]
    m = make_optimizer("momentum", _params())
    assert m.beta == 0.9
    a = make_optimizer("adam", _params(), lr=0.5, beta1=0.8, beta2=0.99, eps=1e-6)
    assert (a.lr, a.beta1, a.beta2, a.eps) == (0.5, 0.8, 0.99, 1e-6)
    assert "Adam(lr=0.5" in repr(a)


@pytest.mark.parametrize("bad", ["rmsprop", "SGD", "", None])
def test_make_optimizer_unknown_name(bad):
    with pytest.raises(ConfigError) as e:
        make_optimizer(bad, _params())
    for name in ("sgd", "momentum", "adam"):
        assert name in str(e.value)


def test_make_optimizer_unknown_hyperparameter():
    with pytest.raises(ConfigError, match=r"'sgd' has no hyper-parameter.*\['beta'\].*valid: lr"):
        make_optimizer("sgd", _params(), beta=0.9)
    with pytest.raises(ConfigError, match="beta1, beta2, eps"):
        make_optimizer("adam", _params(), momentum=0.9)


# ---------------------------------------------------------------------------
# gradient clipping


def _global_norm(grads) -> float:
    return math.sqrt(sum(float(v) ** 2 for g in grads.values() for v in np.ravel(g)))


def test_clip_below_threshold_leaves_gradients_alone():
    grads = _grads(0)
    copies = {k: g.copy() for k, g in grads.items()}
    ids = {k: id(g) for k, g in grads.items()}
    norm = clip_grad_norm(grads, 10.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(_global_norm(copies), rel=1e-14)
    for k in grads:
        assert id(grads[k]) == ids[k]
        np.testing.assert_array_equal(grads[k], copies[k])


def test_clip_exactly_at_threshold_is_not_scaled():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 5.0) == 5.0
    assert grads["a"][0] == 3.0 and grads["b"][0, 0] == 4.0


def test_clip_above_threshold_scales_globally_in_place():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]])}  # global norm 5, each alone < 5
    view = grads["b"][1:]
    norm = clip_grad_norm(grads, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[0.0], [0.8]], rtol=1e-15)
    assert view[0, 0] == pytest.approx(0.8)
    assert _global_norm(grads) == pytest.approx(1.0, rel=1e-14)


@given(
    seed=st.integers(0, 2**32 - 1),
    max_norm=st.floats(1e-3, 1e3),
    scale=st.floats(1e-3, 1e3),
)
def test_clip_property(seed, max_norm, scale):
    rng = np.random.default_rng(seed)
    grads = {"x": scale * rng.standard_normal(7), "y": scale * rng.standard_normal((2, 3)), "z": np.zeros(0)}
    before = {k: g.copy() for k, g in grads.items()}
    expected_norm = _global_norm(before)
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    factor = max_norm / expected_norm if expected_norm > max_norm else 1.0
    for k in grads:
        np.testing.assert_allclose(grads[k], factor * before[k], rtol=1e-12)
    assert _global_norm(grads) <= max_norm * (1 + 1e-12) or factor == 1.0


def test_clip_non_finite_returns_nan_or_inf_without_scaling():
    grads = {"a": np.array([1.0, np.nan]), "b": np.array([100.0])}
    norm = clip_grad_norm(grads, 1.0)
    assert math.isnan(norm)
    assert grads["b"][0] == 100.0
    grads = {"a": np.array([1.0, np.inf])}
    assert math.isinf(clip_grad_norm(grads, 1.0))
    assert grads["a"][0] == 1.0


def test_clip_huge_finite_gradients():
    grads = {"a": np.full(4, 1e300), "b": np.array([1e300])}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(math.sqrt(5) * 1e300, rel=1e-12)
    np.testing.assert_allclose(grads["a"], np.full(4, 1 / math.sqrt(5)), rtol=1e-12)


def test_clip_empty_and_errors():
    assert clip_grad_norm({}, 1.0) == 0.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="max_norm"):
            clip_grad_norm({"a": np.ones(2)}, bad)
    with pytest.raises(DTypeError, match=r"grads\['a'\]"):
        clip_grad_norm({"a": np.ones(2, dtype=int)}, 1.0)
    with pytest.raises(DTypeError, match=r"grads\['a'\]"):
        clip_grad_norm({"a": [1.0, 2.0]}, 1.0)
    ro = np.ones(2)
    ro.flags.writeable = False
    with pytest.raises(DTypeError, match="read-only"):
        clip_grad_norm({"a": ro}, 1.0)


def test_clip_then_step_pipeline():
    params = _params()
    opt = SGD(params, lr=1.0)
    g = _grads(2)
    n = clip_grad_norm(g, 0.5)
    assert n > 0.5
    opt.step(g)
    delta = np.sqrt(sum(float(np.sum((params[k] - np.array(THETA0[k])) ** 2)) for k in params))
    assert delta == pytest.approx(0.5, rel=1e-12)
