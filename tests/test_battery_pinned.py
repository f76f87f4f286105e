"""The battery pinned: every check fails on a defect of 10x its tolerance and passes on 0.1x.

A check that would pass anything is worse than no check.  Here each check (and each
part of a check) gets a controlled defect in what it compares, sized in the check's
own error metric to ``k`` times its tolerance, and must report ``error / tolerance``
close to ``k``: it fails at ``k = 10`` and passes at ``k = 0.1``.

* The defect enters through the battery's substitution points: ``_kernel`` (every kernel
  a check runs) is replaced by one that returns a kernel whose output is changed in one
  entry, ``_direction`` is wrapped to read the random direction a check draws, and
  ``_float64_partial`` (the float64 route of the mpmath check) returns a shifted value.
* The tolerances are the documented formulas, written out here (``PINNED``), not read
  from the battery; so are the error metrics the defects are sized in (the normalising
  scale of each check).  Loosening a tolerance or a scale in ``_battery.py`` therefore
  makes the ``k = 10`` cases pass and these tests fail.
* "Close to ``k``": each error metric is a norm of the difference of two routes, so by
  the triangle inequality the defective error is within the defect-free error ``e0`` of
  the defect, up to the rounding of the defective run itself (the changed entry and the
  sums over compared quantities are rounded anew: numpy's pairwise sums of at most a few
  hundred terms, below ``8 eps`` of the scale); the defect also moves the normalising
  scale, by at most ``k * tol`` of it (``<= 1e-3`` for every tolerance here), hence
  ``|ratio - k| <= e0 / tol + 8 eps / tol + 1e-3 k``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

import symgate as sg
from symgate.losses import LastMSE, StepMSE
from symgate.testing import _battery
from symgate.testing import cached_builtin, draw_problem
from symgate._derive._local import local_partials

EPS = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
KS = [0.1, 10.0]
LOSSES = {"last": LastMSE, "step": StepMSE}

#: the documented tolerances (the table of the battery's module docstring)
PINNED: dict[str, Callable[[int], float]] = {
    "jacobian": lambda T: 100 * EPS ** (2 / 3),
    "bptt_cs": lambda T: 64 * (T + 1) * EPS,
    "bptt_fd": lambda T: 100 * EPS ** (2 / 3),
    "adjoint": lambda T: 64 * (T + 1) * EPS,
    "mpmath": lambda T: 64 * EPS,
    "float32": lambda T: 64 * (T + 1) * EPS32,
    "batch": lambda T: 64 * (T + 1) * EPS,
    "compiled": lambda T: 64 * (T + 1) * EPS,
}

#: problems on both sides of the compiled kernels' batch threshold
SPECS = [
    ("vector_gate", dict(n=4, m=2, B=3, T=4), 1),
    ("gru", dict(n=3, m=2, B=9, T=3), 2),
    ("lstm", dict(n=2, m=2, B=2, T=2), 3),
]
_PROBLEMS: dict[str, sg.testing.Problem] = {}


def problem(name: str) -> sg.testing.Problem:
    if name not in _PROBLEMS:
        (_, sizes, seed), = [s for s in SPECS if s[0] == name]
        _PROBLEMS[name] = draw_problem(cached_builtin(name), seed, **sizes)
    return _PROBLEMS[name]


CELLS = [s[0] for s in SPECS]
_BASELINES: dict[tuple[str, ...], _battery.CheckResult] = {}


def baseline(fn: Callable[..., _battery.CheckResult], name: str, *args: Any) -> _battery.CheckResult:
    """The defect-free result of check ``fn`` on ``name``'s problem (computed once per module)."""
    key = (fn.__name__, name) + args
    if key not in _BASELINES:
        _BASELINES[key] = fn(problem(name), *args)
    return _BASELINES[key]


# ----------------------------------------------------------------------------
# the injection machinery
# ----------------------------------------------------------------------------


class Tampered:
    """A kernel whose method ``name`` returns ``edits[name](inner, output, *args, **kwargs)``."""

    def __init__(self, inner: Any, edits: dict[str, Callable[..., Any]]) -> None:
        self._inner, self._edits = inner, edits

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        edit = self._edits.get(name)
        if edit is None:
            return attr
        return lambda *a, **kw: edit(self._inner, attr(*a, **kw), *a, **kw)


class Injector:
    """Installs tampered kernels for the (dtype, backend) pairs a test selects; records directions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directions: list[tuple[dict, dict, np.ndarray]] = []
        self.tampered: list[tuple[Callable[[str, str], bool], dict[str, Callable[..., Any]]]] = []
        kernel, direction = _battery._kernel, _battery._direction

        def tampered_kernel(cell: sg.Cell, dtype: str, backend: str) -> Any:
            k = kernel(cell, dtype, backend)
            for select, edits in self.tampered:
                if select(dtype, backend):
                    return Tampered(k, edits)
            return k

        def recorded_direction(prob: Any, rng: np.random.Generator) -> Any:
            d = direction(prob, rng)
            self.directions.append(d)
            return d

        monkeypatch.setattr(_battery, "_kernel", tampered_kernel)
        monkeypatch.setattr(_battery, "_direction", recorded_direction)

    def tamper(self, select: Callable[[str, str], bool], **edits: Callable[..., Any]) -> None:
        self.tampered.append((select, edits))

    @property
    def direction(self) -> tuple[dict, dict, np.ndarray]:
        return self.directions[-1]


def float64_reference(dtype: str, backend: str) -> bool:
    return dtype == "float64" and backend == "reference"


def bump(a: np.ndarray, index: tuple[int, ...], amount: float, dtype: Any = None) -> np.ndarray:
    """A copy of ``a`` (as ``dtype``) with ``amount`` added at ``index``."""
    out = np.array(a, dtype=dtype if dtype is not None else np.asarray(a).dtype)
    out[index] += amount
    return out


def last_index(a: np.ndarray) -> tuple[int, ...]:
    return tuple(s - 1 for s in np.shape(a))


def relative_size(a: np.ndarray) -> float:
    """The normaliser of a matrix comparison, ``max(1, max|a|)``."""
    return max(1.0, float(np.max(np.abs(a))))


def directional_parts(g: Any, dp: dict, dh: dict, dx: np.ndarray) -> tuple[float, float]:
    """``<g, d>`` and ``sum |g_i d_i|`` over parameters, initial states and inputs."""
    parts = [g.params[k] * dp[k] for k in dp] + [g.h0[k] * dh[k] for k in dh] + [g.x * dx]
    return float(sum(np.sum(p) for p in parts)), float(sum(np.sum(np.abs(p)) for p in parts))


def absolute_readout_gradient(cell: sg.Cell, params: dict, x: np.ndarray, h0: dict, L: LastMSE | StepMSE) -> Any:
    """The gradient pulled back from the loss's cotangent with every term absolute,
    ``(2/N) (|V||h_t| + |y_t|) |V|`` (the battery's *Readout cancellation* scale), here written
    independently of the battery."""
    ref = sg.reference_kernel(cell)
    h = ref.forward(params, x, h0).h
    aV = np.abs(L.V)
    cot = np.zeros_like(h)
    if isinstance(L, LastMSE):
        mag = np.abs(h[-1]) @ aV.T + np.abs(L.y)
        cot[-1] = 2.0 / mag.size * (mag @ aV)
    else:
        mag = np.abs(h) @ aV.T + np.abs(L.y)
        cot[:] = 2.0 / mag.size * (mag @ aV)
    return ref.vjp(params, x, h0, {cell.states[0].name: cot})


def shift_directional(g: Any, dp: dict, amount: float) -> Any:
    """``g`` with one parameter entry changed so that ``<g, d>`` moves by ``amount`` (the entry
    with the largest direction component, so the change is as small as it can be)."""
    name, index = max(((n, np.unravel_index(np.argmax(np.abs(v)), np.shape(v))) for n, v in dp.items()),
                      key=lambda t: abs(dp[t[0]][t[1]]))
    params = dict(g.params)
    params[name] = bump(g.params[name], index, amount / float(dp[name][index]))
    return dataclasses.replace(g, params=params)


def assert_pinned(r: _battery.CheckResult, check: str, prob: sg.testing.Problem, k: float, base: _battery.CheckResult) -> None:
    tol = PINNED[check](prob.T)
    assert r.check == check
    assert r.tolerance == pytest.approx(tol, rel=1e-12, abs=0), f"{check}: tolerance {r.tolerance:.3e}, documented {tol:.3e}"
    e0 = base.error / tol
    assert e0 <= 0.5, f"{check}: the defect-free error is already {e0:.2f} of the tolerance; pick another problem"
    ratio = r.error / tol
    assert abs(ratio - k) <= e0 + 8 * EPS / tol + 1e-3 * k, \
        f"{check}: error/tolerance = {ratio:.4g} for a defect of {k} x tolerance; {r.detail}"
    assert r.passed == (k < 1), f"{check}: passed={r.passed} with a defect of {k} x tolerance"


# ----------------------------------------------------------------------------
# tolerances
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CELLS)
def test_tolerances_are_the_documented_ones(name: str) -> None:
    prob = problem(name)
    table = dict(_battery.CHECKS, **_battery.COMPILED_CHECKS)
    for check, fn in table.items():
        r = fn(prob, backend="compiled")
        assert r.tolerance == pytest.approx(PINNED[check](prob.T), rel=1e-12, abs=0), check
        assert r.passed, f"{check}: {r.error:.3e} > {r.tolerance:.3e}; {r.detail}"
    assert set(PINNED) == set(table)


# ----------------------------------------------------------------------------
# jacobian: the state part and every parameter part
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", CELLS)
def test_jacobian_state_part(name: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    base = baseline(_battery.check_jacobian, name)
    amount = k * PINNED["jacobian"](prob.T)
    inj = Injector(monkeypatch)
    inj.tamper(float64_reference, jacobian=lambda inner, J, *a, **kw: bump(J, last_index(J), amount * relative_size(J)))
    r = _battery.check_jacobian(prob)
    assert_pinned(r, "jacobian", prob, k, base)
    assert "state Jacobian" in r.detail or k < 1


def _parameter_parts(name: str) -> list[tuple[str, str, str]]:
    c = cached_builtin(name)
    return [(name, p.name, s) for p in c.params for s in c.state_names]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name, param, of", [t for n in CELLS for t in _parameter_parts(n)])
def test_jacobian_parameter_part(name: str, param: str, of: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each immediate parameter Jacobian d(state)/d(param) is compared, not only the first or the state one."""
    prob = problem(name)
    base = baseline(_battery.check_jacobian, name)
    amount = k * PINNED["jacobian"](prob.T)

    def edit(inner: Any, P: np.ndarray, params: Any, x_t: Any, h_prev: Any, p: str, o: str | None = None) -> np.ndarray:
        return bump(P, last_index(P), amount * relative_size(P)) if (p, o) == (param, of) else P

    inj = Injector(monkeypatch)
    inj.tamper(float64_reference, parameter_jacobian=edit)
    r = _battery.check_jacobian(prob)
    assert_pinned(r, "jacobian", prob, k, base)
    if k > 1:
        assert f"d{of}'/d{param}" in r.detail


# ----------------------------------------------------------------------------
# gradients along a random direction: complex step, finite differences, adjoint
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("loss", ["last", "step"])
@pytest.mark.parametrize("name", CELLS)
def test_bptt_complex_step(name: str, loss: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect is in the gradient of one loss only: the registered check must run both."""
    prob, which = problem(name), loss
    base = baseline(_battery.check_bptt_complex_step, name, loss)
    tol = PINNED["bptt_cs"](prob.T)
    inj = Injector(monkeypatch)

    def edit(inner: Any, g: Any, params: Any, x: Any, h0: Any, *, loss: Any) -> Any:
        if not isinstance(loss, LOSSES[which]):
            return g
        dp, dh, dx = inj.direction
        scale = max(directional_parts(g, dp, dh, dx)[1],
                    directional_parts(absolute_readout_gradient(prob.cell, params, x, h0, loss), dp, dh, dx)[1])
        return shift_directional(g, dp, k * tol * scale)

    inj.tamper(float64_reference, backward=edit)
    assert_pinned(_battery.check_bptt_complex_step(prob, loss), "bptt_cs", prob, k, base)
    assert _battery.CHECKS["bptt_cs"](prob).passed == (k < 1)  # the registered check runs this loss too


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("loss", ["last", "step"])
@pytest.mark.parametrize("name", CELLS)
def test_bptt_finite_difference(name: str, loss: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob, which = problem(name), loss
    base = baseline(_battery.check_bptt_finite_difference, name, loss)
    tol = PINNED["bptt_fd"](prob.T)
    inj = Injector(monkeypatch)

    def edit(inner: Any, g: Any, params: Any, x: Any, h0: Any, *, loss: Any) -> Any:
        if not isinstance(loss, LOSSES[which]):
            return g
        dp, dh, dx = inj.direction
        size = max([1.0] + [float(np.max(np.abs(v))) for v in [*params.values(), *h0.values(), x]])
        dirmax = max(float(np.max(np.abs(v))) for v in [*dp.values(), *dh.values(), dx])
        scale = max(directional_parts(g, dp, dh, dx)[1], abs(float(g.value)) * size / dirmax)
        return shift_directional(g, dp, k * tol * scale)

    inj.tamper(float64_reference, backward=edit)
    assert_pinned(_battery.check_bptt_finite_difference(prob, loss), "bptt_fd", prob, k, base)
    assert _battery.CHECKS["bptt_fd"](prob).passed == (k < 1)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", CELLS)
def test_adjoint(name: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    base = baseline(_battery.check_adjoint, name)
    tol = PINNED["adjoint"](prob.T)
    inj = Injector(monkeypatch)

    def edit(inner: Any, g: Any, params: Any, x: Any, h0: Any, cot: Any, **kw: Any) -> Any:
        dp, dh, dx = inj.direction
        jv = inner.jvp(params, x, h0, {**dp, "h0": dh, "x": dx})
        scale = max(directional_parts(g, dp, dh, dx)[1], float(sum(np.sum(np.abs(jv[s] * cot[s])) for s in cot)))
        return shift_directional(g, dp, k * tol * scale)

    inj.tamper(float64_reference, vjp=edit)
    assert_pinned(_battery.check_adjoint(prob), "adjoint", prob, k, base)


# ----------------------------------------------------------------------------
# mpmath: every local partial
# ----------------------------------------------------------------------------


def _partials(name: str) -> list[tuple[str, str]]:
    lp = local_partials(cached_builtin(name))
    return [(name, f"d{'out' if ow.symbol is None else ow.symbol.name}/d{sym.name}")
            for ow, parts in lp.partials.items() for sym in parts]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name, label", [t for n in CELLS for t in _partials(n)])
def test_mpmath_every_partial(name: str, label: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    base = baseline(_battery.check_mpmath, name)
    amount = k * PINNED["mpmath"](prob.T)
    partial = _battery._float64_partial
    seen = []

    def shifted(lbl: str, symbols: Any, expr: Any) -> Callable[..., Any]:
        f = partial(lbl, symbols, expr)
        seen.append(lbl)
        if lbl != label:
            return f

        def g(*args: Any) -> float:
            v = float(f(*args))
            return v + amount * max(1.0, abs(v))

        return g

    monkeypatch.setattr(_battery, "_float64_partial", shifted)
    r = _battery.check_mpmath(prob)
    assert label in seen
    assert_pinned(r, "mpmath", prob, k, base)
    if k > 1:
        assert f"worst at {label};" in r.detail


# ----------------------------------------------------------------------------
# float32: states and gradients
# ----------------------------------------------------------------------------


def _float32_problem(prob: sg.testing.Problem) -> tuple[dict, np.ndarray, dict, LastMSE]:
    """The float32-representable problem the float32 check compares on, in float64."""
    r = lambda a: np.array(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    return ({n: r(v) for n, v in prob.params.items()}, r(prob.x), {n: r(v) for n, v in prob.h0.items()},
            LastMSE(r(prob.V), r(prob.y_last)))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name, state", [(n, s) for n in CELLS for s in cached_builtin(n).state_names])
def test_float32_states(name: str, state: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    base = baseline(_battery.check_float32, name)
    amount = k * PINNED["float32"](prob.T)

    def edit(inner: Any, traj: Any, *a: Any, **kw: Any) -> Any:
        s = traj.states[state]
        changed = bump(s, last_index(s), amount * relative_size(s), np.float64)
        return dataclasses.replace(traj, states={**traj.states, state: changed})

    inj = Injector(monkeypatch)
    inj.tamper(lambda dtype, backend: dtype == "float32", forward=edit)
    r = _battery.check_float32(prob)
    assert_pinned(r, "float32", prob, k, base)
    if k > 1:
        assert f"state {state}" in r.detail


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name, param", [(n, cached_builtin(n).param_names[i]) for n in CELLS for i in (0, -1)])
def test_float32_gradients(name: str, param: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    base = baseline(_battery.check_float32, name)
    p64, x64, h64, L64 = _float32_problem(prob)
    g64 = sg.reference_kernel(prob.cell).backward(p64, x64, h64, loss=L64)
    g_abs = absolute_readout_gradient(prob.cell, p64, x64, h64, L64)
    gscale = max(float(np.max(np.abs(v))) for g in (g64, g_abs) for v in g.params.values())
    amount = k * PINNED["float32"](prob.T) * gscale

    def edit(inner: Any, g: Any, *a: Any, **kw: Any) -> Any:
        v = g.params[param]
        return dataclasses.replace(g, params={**g.params, param: bump(v, last_index(v), amount, np.float64)})

    inj = Injector(monkeypatch)
    inj.tamper(lambda dtype, backend: dtype == "float32", backward=edit)
    r = _battery.check_float32(prob)
    assert_pinned(r, "float32", prob, k, base)
    if k > 1:
        assert f"gradient {param}" in r.detail


# ----------------------------------------------------------------------------
# batch: states, initial-state gradients, mean parameter gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("part", ["state", "h0", "param"])
@pytest.mark.parametrize("name", CELLS)
def test_batch(name: str, part: str, k: float, monkeypatch: pytest.MonkeyPatch) -> None:
    prob = problem(name)
    assert prob.B > 1  # the full batch is told apart from the batches of one by its size
    base = baseline(_battery.check_batch, name)
    amount = k * PINNED["batch"](prob.T)
    cell = prob.cell
    b = prob.B - 1
    state, param = cell.state_names[-1], cell.param_names[-1]

    def full(x: np.ndarray) -> bool:
        return x.shape[1] == prob.B

    def forward(inner: Any, traj: Any, params: Any, x: np.ndarray, *a: Any, **kw: Any) -> Any:
        if part != "state" or not full(x):
            return traj
        s = traj.states[state]
        changed = bump(s, (prob.T - 1, b, 0), amount * relative_size(s[:, b]))
        return dataclasses.replace(traj, states={**traj.states, state: changed})

    def backward(inner: Any, g: Any, params: Any, x: np.ndarray, *a: Any, **kw: Any) -> Any:
        if not full(x) or part == "state":
            return g
        if part == "h0":
            v = g.h0[state]
            return dataclasses.replace(g, h0={**g.h0, state: bump(v, (b, 0), amount * relative_size(v[b]))})
        v = g.params[param]
        return dataclasses.replace(g, params={**g.params, param: bump(v, last_index(v), amount * relative_size(v))})

    inj = Injector(monkeypatch)
    inj.tamper(float64_reference, forward=forward, backward=backward)
    r = _battery.check_batch(prob)
    assert_pinned(r, "batch", prob, k, base)
    if k > 1:
        assert {"state": f"state {state}, sequence {b}", "h0": f"d/dh0[{state}], sequence {b}",
                "param": f"mean gradient d/d{param}"}[part] in r.detail


# ----------------------------------------------------------------------------
# compiled: every quantity it compares
# ----------------------------------------------------------------------------


def _compiled_parts(name: str) -> list[tuple[str, ...]]:
    c = cached_builtin(name)
    traj = sg.reference_kernel(c).forward(problem(name).params, problem(name).x, problem(name).h0)
    parts: list[tuple[str, ...]] = [("forward", "state", s) for s in c.state_names]
    parts += [("forward", "node", n) for n in traj.nodes]
    for loss in ("last", "step"):
        parts += [("backward", loss, "value", ""), ("backward", loss, "x", ""), ("backward", loss, "V", "")]
        parts += [("backward", loss, "param", p) for p in c.param_names]
        parts += [("backward", loss, "h0", s) for s in c.state_names]
    parts += [("jvp", s) for s in c.state_names]
    return [(name,) + p for p in parts]


def _compiled_label(part: tuple[str, ...]) -> str:
    if part[0] == "forward":
        return f"{part[1]} {part[2]}"
    if part[0] == "jvp":
        return f"JVP of {part[1]}"
    loss, what, which = part[1:]
    return {"value": f"{loss} loss value", "x": f"{loss} loss d/dx", "V": f"{loss} loss d/dV",
            "param": f"{loss} loss d/d{which}", "h0": f"{loss} loss d/dh0[{which}]"}[what]


@pytest.fixture(scope="module")
def compiled_kernels() -> None:
    for name in CELLS:
        sg.compile(cached_builtin(name))  # compiled (or loaded from the cache) once for the module


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name, part", [(t[0], t[1:]) for n in CELLS for t in _compiled_parts(n)],
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_compiled_every_quantity(name: str, part: tuple[str, ...], k: float, compiled_kernels: None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each quantity the compiled check compares comes from the compiled kernel: a defect in any
    one of them shows (a check that compared the reference with itself would not see it)."""
    prob = problem(name)
    base = baseline(_battery.check_compiled, name)
    amount = k * PINNED["compiled"](prob.T)

    def bumped(a: Any) -> np.ndarray:
        a = np.asarray(a)
        return bump(a, last_index(a), amount * relative_size(a))

    def forward(inner: Any, traj: Any, *a: Any, **kw: Any) -> Any:
        if part[0] != "forward":
            return traj
        field_ = "states" if part[1] == "state" else "nodes"
        d = getattr(traj, field_)
        return dataclasses.replace(traj, **{field_: {**d, part[2]: bumped(d[part[2]])}})

    def backward(inner: Any, g: Any, *a: Any, loss: Any, **kw: Any) -> Any:
        if part[0] != "backward" or part[1] != ("last" if isinstance(loss, LastMSE) else "step"):
            return g
        what, which = part[2], part[3]
        if what == "value":
            return dataclasses.replace(g, value=float(bumped(g.value)))
        if what == "x":
            return dataclasses.replace(g, x=bumped(g.x))
        if what == "V":
            return dataclasses.replace(g, readout={**g.readout, "V": bumped(g.readout["V"])})
        d = g.params if what == "param" else g.h0
        return dataclasses.replace(g, **{"params" if what == "param" else "h0": {**d, which: bumped(d[which])}})

    def jvp(inner: Any, out: Any, *a: Any, **kw: Any) -> Any:
        return {**out, part[1]: bumped(out[part[1]])} if part[0] == "jvp" else out

    inj = Injector(monkeypatch)
    inj.tamper(lambda dtype, backend: backend == "compiled", forward=forward, backward=backward, jvp=jvp)
    r = _battery.check_compiled(prob)
    assert_pinned(r, "compiled", prob, k, base)
    if k > 1:
        assert f"worst at {_compiled_label(part)};" in r.detail
