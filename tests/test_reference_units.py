"""The numpy reference kernel against oracles that do not use it.

* forward passes of the built-in cells typed here in plain numpy from the paper notes
  (section 1) and the cell docstrings: every state at every step, the gates and candidates;
* complex-step derivatives of those hand-written forward passes (``Im f(p + i h e) / h``
  with ``h = 1e-30``: exact to rounding for the analytic tanh, sigmoid and products, no
  cancellation), for BPTT (``backward`` with both losses, ``vjp`` with arbitrary
  cotangents), forward mode (``jvp``) and the dense one-step Jacobians;
* central differences of the real loss as a second, cruder oracle;
* the documented argument contract: which error type, and what the message names.

Sizes are tiny (n <= 3, T <= 4) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import pytest

import symgate as sg
from symgate.testing import cached_builtin

Arrays = dict[str, np.ndarray]
Forward = Callable[[Arrays, np.ndarray, Arrays], Arrays]

#: complex step: the derivative is Im f(p + i H) / H, free of cancellation, so H can be tiny
H = 1e-30


def _sig(u: Any) -> Any:
    """Logistic function, plain formula (fine for complex arguments of moderate size)."""
    return 1.0 / (1.0 + np.exp(-u))


def _lin(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``M @ v`` for a batch of row vectors ``v`` (B, k)."""
    return v @ M.T


# ----------------------------------------------------------------- hand-written cells
# Each takes (params, x (T, B, m), h0 {state: (B, n)}) and returns {state: (T, B, n)} plus
# the interior values by the names the cells give them ("phi", "g", "z", "r", ...), all typed
# from the paper notes / the cells' docstrings, never from the reference kernel.


def _run(step: Callable[[Arrays, np.ndarray, Arrays], tuple[Arrays, Arrays]], p: Arrays, x: np.ndarray, h0: Arrays) -> Arrays:
    T = x.shape[0]
    prev = dict(h0)
    out: dict[str, list[np.ndarray]] = {}
    for t in range(T):
        new, nodes = step(p, x[t], prev)
        for k, v in {**new, **nodes}.items():
            out.setdefault(k, []).append(v)
        prev = new
    return {k: np.stack(v) for k, v in out.items()}


def _plain(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    phi = np.tanh(_lin(p["W"], s["h"]) + _lin(p["U"], x) + p["b"])
    return {"h": phi}, {"phi": phi}


def _leaky(p: Arrays, x: np.ndarray, s: Arrays, alpha: float = 0.8) -> tuple[Arrays, Arrays]:
    phi = np.tanh(_lin(p["W"], s["h"]) + _lin(p["U"], x) + p["b"])
    return {"h": (1 - alpha) * s["h"] + alpha * phi}, {"phi": phi}


def _scalar_gate(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    g = _sig(_lin(p["wg"], s["h"]) + _lin(p["ug"], x) + p["c"])  # (B, 1): one gate for all units
    phi = np.tanh(_lin(p["W"], s["h"]) + _lin(p["U"], x) + p["b"])
    return {"h": (1 - g) * s["h"] + g * phi}, {"g": g, "phi": phi}


def _vector_gate(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    g = _sig(_lin(p["Wg"], s["h"]) + _lin(p["Ug"], x) + p["c"])
    phi = np.tanh(_lin(p["W"], s["h"]) + _lin(p["U"], x) + p["b"])
    return {"h": (1 - g) * s["h"] + g * phi}, {"g": g, "phi": phi}


def _gru(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    h = s["h"]
    z = _sig(_lin(p["Wz"], h) + _lin(p["Uz"], x) + p["bz"])
    r = _sig(_lin(p["Wr"], h) + _lin(p["Ur"], x) + p["br"])
    cand = np.tanh(_lin(p["Wn"], r * h) + _lin(p["Un"], x) + p["bn"])
    return {"h": (1 - z) * h + z * cand}, {"z": z, "r": r, "cand": cand}


def _lstm(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    h, c = s["h"], s["c"]
    i = _sig(_lin(p["Wi"], h) + _lin(p["Ui"], x) + p["bi"])
    f = _sig(_lin(p["Wf"], h) + _lin(p["Uf"], x) + p["bf"])
    o = _sig(_lin(p["Wo"], h) + _lin(p["Uo"], x) + p["bo"])
    g = np.tanh(_lin(p["Wc"], h) + _lin(p["Uc"], x) + p["bc"])
    c_new = f * c + i * g
    return {"h": o * np.tanh(c_new), "c": c_new}, {"i": i, "f": f, "o": o, "g": g}


def _mgu(p: Arrays, x: np.ndarray, s: Arrays) -> tuple[Arrays, Arrays]:
    h = s["h"]
    f = _sig(_lin(p["Wf"], h) + _lin(p["Uf"], x) + p["bf"])
    cand = np.tanh(_lin(p["Wn"], f * h) + _lin(p["Un"], x) + p["bn"])
    return {"h": (1 - f) * h + f * cand}, {"f": f, "cand": cand}


HAND: dict[str, Callable[..., tuple[Arrays, Arrays]]] = {
    "plain": _plain, "leaky": _leaky, "scalar_gate": _scalar_gate, "vector_gate": _vector_gate,
    "gru": _gru, "lstm": _lstm, "mgu": _mgu,
}


# ------------------------------------------------------------- a cell with every path
@sg.cell
def mixed(h: sg.State("n"), x: sg.Input("n"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "n"), M: sg.Matrix("n", "n"),
          ug: sg.Matrix(1, "n"), P: sg.Matrix("n", 1), d: sg.Vector("n"), a: sg.Scalar(), c: sg.Scalar(),
          k: sg.Constant(0.5)):
    """State-independent nodes reading the input elementwise, a vector and a scalar (``s``),
    a Linear of such a node (``M @ s``), a one-unit gate of the input alone read per unit
    (``e`` in ``w``, itself state-independent), constant-only nodes (``kk`` and ``k**2``, read
    by ``P``), and a state-dependent node reading the input elementwise and a scalar parameter."""
    s = sg.tanh(x) * d + c
    q = sg.sigmoid(M @ s)
    e = sg.sigmoid(ug @ x)
    w = sg.tanh(e * s)
    kk = sg.sigmoid(k)
    return (1 - q) * a * h + q * sg.tanh(W @ h + U @ x + P @ (k * k)) + kk * x * h + w


def _mixed(p: Arrays, x: np.ndarray, st: Arrays) -> tuple[Arrays, Arrays]:
    h = st["h"]
    s = np.tanh(x) * p["d"] + p["c"]
    q = _sig(_lin(p["M"], s))
    e = _sig(_lin(p["ug"], x))  # (B, 1)
    w = np.tanh(e * s)
    kk = _sig(0.5)
    new = (1 - q) * p["a"] * h + q * np.tanh(_lin(p["W"], h) + _lin(p["U"], x) + p["P"][:, 0] * 0.5**2) + kk * x * h + w
    return {"h": new}, {"u": s, "q": q, "e": e, "w": w}


HAND["mixed"] = _mixed


@sg.cell
def bottleneck(h: sg.State("n"), x: sg.Input("m"), A: sg.Matrix("k", "n"), Wb: sg.Matrix("n", "k"), U: sg.Matrix("n", "m"),
               P: sg.Matrix("n", 1), c: sg.Scalar()):
    """A node of a dimension of its own (``z``, of size k, no state or input has it) and a
    column matrix applied to a scalar parameter (``P @ c``: no node of dimension 1)."""
    z = sg.tanh(A @ h)
    return sg.tanh(Wb @ z + U @ x + P @ c)


def _bottleneck(p: Arrays, x: np.ndarray, st: Arrays) -> tuple[Arrays, Arrays]:
    z = np.tanh(_lin(p["A"], st["h"]))
    return {"h": np.tanh(_lin(p["Wb"], z) + _lin(p["U"], x) + p["P"][:, 0] * p["c"])}, {"z": z}


HAND["bottleneck"] = _bottleneck
CELLS = [*sorted(sg.cells.BUILTIN), "mixed", "bottleneck"]


def _cell(name: str) -> sg.Cell:
    return {"mixed": mixed, "bottleneck": bottleneck}.get(name) or cached_builtin(name)


def _problem(cell: sg.Cell, seed: int, *, n: int = 3, m: int = 2, B: int = 4, T: int = 5) -> tuple[Arrays, np.ndarray, Arrays]:
    """Random float64 parameters (scaled so the states stay O(1)), inputs and initial states.

    The default sizes are all different (T=5, B=4, n=3, m=2; k=2 is only read off the
    parameters), so that an axis or a size taken
    from the wrong place cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    if cell.inputs[0].dim == "n":
        m = n
    size = {"n": n, "m": m, "k": 2, 1: 1}
    params = {p.name: (0.6 / np.sqrt(n)) * rng.standard_normal(tuple(size[d] for d in p.shape)) for p in cell.params}
    x = rng.standard_normal((T, B, m))
    h0 = {s.name: rng.uniform(-0.5, 0.5, (B, size[s.dim])) for s in cell.states}
    return params, x, h0


def _hand(name: str, p: Arrays, x: np.ndarray, h0: Arrays) -> Arrays:
    return _run(HAND[name], p, x, h0)


def _entries(arrays: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, idx) for k, v in arrays.items() for idx in np.ndindex(v.shape)]


def _complex_step(f: Callable[[dict[str, np.ndarray]], complex], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """d f / d arrays[k][idx] for every entry, by the complex step on a complex copy."""
    grad = {k: np.zeros(np.shape(v)) for k, v in arrays.items()}
    for k, idx in _entries(arrays):
        pert = {kk: np.array(v, dtype=complex) for kk, v in arrays.items()}
        pert[k][idx] += 1j * H
        grad[k][idx] = np.imag(f(pert)) / H
    return grad


# ===================================================================== forward pass
@pytest.mark.parametrize("name", CELLS)
def test_forward_matches_hand_written_cell(name: str) -> None:
    """Every state at every step and the named interior nodes equal the cell typed in numpy.

    Tolerance 1e-13: both sides evaluate the same formulas in float64 on O(1) values over
    five steps; only the summation order of the small matrix products can differ (a few ulp)."""
    cell = _cell(name)
    p, x, h0 = _problem(cell, 1)
    traj = sg.reference_kernel(cell).forward(p, x, h0)
    want = _hand(name, p, x, h0)
    assert set(traj.states) == set(cell.state_names)
    for s in cell.state_names:
        assert traj.states[s].shape == want[s].shape
        np.testing.assert_allclose(traj.states[s], want[s], rtol=1e-13, atol=1e-14)
    nodes = set(want) - set(cell.state_names)
    for nd in nodes:
        v = traj.nodes[nd]
        assert v.shape[:2] == x.shape[:2]
        np.testing.assert_allclose(np.broadcast_to(v, want[nd].shape), want[nd], rtol=1e-13, atol=1e-14)
    # the first state is `h`; previous() is h0 followed by the first T-1 states
    np.testing.assert_array_equal(traj.h, traj.states[cell.state_names[0]])
    for s in cell.state_names:
        prev = traj.previous(s)
        assert prev.shape == want[s].shape
        np.testing.assert_array_equal(prev[0], h0[s])
        np.testing.assert_array_equal(prev[1:], traj.states[s][:-1])
    np.testing.assert_array_equal(traj.x, x)
    assert all(np.array_equal(traj.h0[s], h0[s]) for s in cell.state_names)


def test_forward_single_step_and_default_zero_state() -> None:
    """T = 1, and h0 omitted: the run starts from zeros (README / docstring), checked against
    the hand-written GRU step from h = 0."""
    cell = cached_builtin("gru")
    p, x, _ = _problem(cell, 2, T=1)
    traj = sg.reference_kernel(cell).forward(p, x)
    want = _hand("gru", p, x, {"h": np.zeros((4, 3))})
    np.testing.assert_allclose(traj.h, want["h"], rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(traj.previous("h"), np.zeros((1, 4, 3)))


@pytest.mark.parametrize("name", ["vector_gate", "lstm", "mixed"])
def test_float32_kernel_returns_float32_everywhere(name: str) -> None:
    """A float32 kernel returns float32 states, nodes, companion values, gradients and tangents,
    close to the float64 hand computation (rtol 2e-5: a few float32 ulp (6e-8) amplified by at
    most five steps of O(1)-gain recurrences)."""
    cell = _cell(name)
    p64, x64, h064 = _problem(cell, 3)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    p, x, h0 = {k: f32(v) for k, v in p64.items()}, f32(x64), {k: f32(v) for k, v in h064.items()}
    k32 = sg.reference_kernel(cell, "float32")
    traj = k32.forward(p, x, h0)
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    want = _hand(name, {k: f64(v) for k, v in p.items()}, f64(x), {k: f64(v) for k, v in h0.items()})
    for s in cell.state_names:
        assert traj.states[s].dtype == np.float32
        np.testing.assert_allclose(traj.states[s], want[s], rtol=2e-5, atol=2e-6)
    for arr in [*traj.nodes.values(), *traj.aux.values()]:
        assert arr.dtype == np.float32
    loss = sg.losses.step_mse(f32(np.ones((1, 3))), f32(np.zeros((5, 4, 1))))
    g = k32.backward(p, x, h0, loss=loss)
    for arr in [*g.params.values(), *g.h0.values(), g.x, *g.readout.values()]:
        assert arr.dtype == np.float32
    tan = k32.jvp(p, x, h0, {"x": np.ones_like(x)})
    assert all(v.dtype == np.float32 for v in tan.values())


# ====================================================================== gradients
def _loss_of(name: str, kind: str, V: np.ndarray, y: np.ndarray) -> Callable[[dict[str, np.ndarray]], Any]:
    """The MSE of the readout of the first state (losses module docstring), on the hand cell."""
    cell = _cell(name)
    pnames = cell.param_names

    def f(a: dict[str, np.ndarray]) -> Any:
        p = {k: a[k] for k in pnames}
        h0 = {s: a["h0:" + s] for s in cell.state_names}
        h = _hand(name, p, a["x"], h0)[cell.state_names[0]]
        if kind == "last":
            r = h[-1] @ a["V"].T - y
        else:
            r = h @ a["V"].T - y
        return np.sum(r * r) / r.size

    return f


@pytest.mark.parametrize("kind", ["last", "step"])
@pytest.mark.parametrize("name", CELLS)
def test_backward_matches_complex_step_of_the_hand_written_loss(name: str, kind: str) -> None:
    """``backward``: the loss value and its gradient w.r.t. every parameter, every initial state,
    every input and the readout, entry by entry, against the complex step of the loss of the
    hand-written cell.  Tolerance 1e-11 relative / 1e-13 absolute: both are exact to float64
    rounding (the complex step has no cancellation), and the values are O(0.01-1)."""
    cell = _cell(name)
    T, B = 5, 4
    p, x, h0 = _problem(cell, 4, T=T, B=B)
    rng = np.random.default_rng(40)
    V = rng.standard_normal((2, 3))
    y = rng.standard_normal((B, 2) if kind == "last" else (T, B, 2))
    loss = sg.losses.last_mse(V, y) if kind == "last" else sg.losses.step_mse(V, y)
    g = sg.reference_kernel(cell).backward(p, x, h0, loss=loss)
    f = _loss_of(name, kind, V, y)
    args = {**p, **{"h0:" + s: v for s, v in h0.items()}, "x": x, "V": V}
    assert g.value == pytest.approx(f(args), rel=1e-13)
    want = _complex_step(f, args)
    assert set(g.params) == set(cell.param_names)
    for k in cell.param_names:
        assert g.params[k].shape == p[k].shape
        assert g[k] is g.params[k]
        np.testing.assert_allclose(g.params[k], want[k], rtol=1e-11, atol=1e-13, err_msg=k)
    for s in cell.state_names:
        np.testing.assert_allclose(g.h0[s], want["h0:" + s], rtol=1e-11, atol=1e-13, err_msg=s)
    np.testing.assert_allclose(g.x, want["x"], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g.readout["V"], want["V"], rtol=1e-11, atol=1e-13)


def test_backward_agrees_with_central_differences() -> None:
    """A second, independent oracle on one cell: central differences of the real loss, step
    eps^(1/3) ~ 6e-6 (truncation O(h^2) ~ 4e-11 and rounding O(eps/h) ~ 4e-11 on an O(1) loss),
    so agreement to 1e-8 absolute is a safe margin."""
    name = "scalar_gate"
    cell = _cell(name)
    p, x, h0 = _problem(cell, 5, T=3, B=2)
    V, y = np.ones((1, 3)), np.full((2, 1), 0.3)
    g = sg.reference_kernel(cell).backward(p, x, h0, loss=sg.losses.last_mse(V, y))
    f = _loss_of(name, "last", V, y)
    args = {**p, "h0:h": h0["h"], "x": x, "V": V}
    step = 6e-6
    for k, idx in _entries(args):
        up = {kk: np.array(v) for kk, v in args.items()}
        dn = {kk: np.array(v) for kk, v in args.items()}
        up[k][idx] += step
        dn[k][idx] -= step
        fd = (f(up) - f(dn)) / (2 * step)
        got = g.params[k] if k in g.params else g.h0["h"] if k == "h0:h" else g.x if k == "x" else g.readout["V"]
        assert abs(got[idx] - fd) < 1e-8, (k, idx)


def _pairing(name: str, cots: Arrays) -> Callable[[dict[str, np.ndarray]], Any]:
    """<cotangents, state trajectories> of the hand cell: its gradient is what vjp returns."""
    cell = _cell(name)

    def f(a: dict[str, np.ndarray]) -> Any:
        p = {k: a[k] for k in cell.param_names}
        traj = _hand(name, p, a["x"], {s: a["h0:" + s] for s in cell.state_names})
        return sum(np.sum(cots[s] * traj[s]) for s in cots)

    return f


@pytest.mark.parametrize("name", ["lstm", "gru", "scalar_gate", "mixed", "bottleneck"])
def test_vjp_matches_complex_step_for_arbitrary_cotangents(name: str) -> None:
    """``vjp`` pulls per-step cotangents of *every* state back: the result is the gradient of
    sum_t <cot_t, state_t>, checked entry by entry by the complex step (tolerance as above)."""
    cell = _cell(name)
    p, x, h0 = _problem(cell, 6)
    rng = np.random.default_rng(60)
    cots = {s: rng.standard_normal((5, 4, 3)) for s in cell.state_names}
    k = sg.reference_kernel(cell)
    g = k.vjp(p, x, h0, cots)
    want = _complex_step(_pairing(name, cots), {**p, **{"h0:" + s: v for s, v in h0.items()}, "x": x})
    for n in cell.param_names:
        np.testing.assert_allclose(g.params[n], want[n], rtol=1e-11, atol=1e-13, err_msg=n)
    for s in cell.state_names:
        np.testing.assert_allclose(g.h0[s], want["h0:" + s], rtol=1e-11, atol=1e-13, err_msg=s)
    np.testing.assert_allclose(g.x, want["x"], rtol=1e-11, atol=1e-13)
    assert g.value is None and g.readout == {}
    # the same from a trajectory computed beforehand
    g2 = k.vjp(p, x, h0, cots, trajectory=k.forward(p, x, h0))
    for n in cell.param_names:
        np.testing.assert_array_equal(g2.params[n], g.params[n])


def test_vjp_missing_cotangent_is_zero_and_bare_array_for_one_state() -> None:
    """A state left out of the cotangent dict contributes nothing (LSTM: only ``c`` seeded
    equals seeding ``h`` with zeros); a single-state cell takes a bare array."""
    cell = cached_builtin("lstm")
    p, x, h0 = _problem(cell, 7)
    k = sg.reference_kernel(cell)
    cot_c = np.random.default_rng(70).standard_normal((5, 4, 3))
    only_c = k.vjp(p, x, h0, {"c": cot_c})
    want = _complex_step(_pairing("lstm", {"c": cot_c}), {**p, "h0:h": h0["h"], "h0:c": h0["c"], "x": x})
    for n in cell.param_names:
        np.testing.assert_allclose(only_c.params[n], want[n], rtol=1e-11, atol=1e-13, err_msg=n)
    np.testing.assert_allclose(only_c.h0["h"], want["h0:h"], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(only_c.h0["c"], want["h0:c"], rtol=1e-11, atol=1e-13)

    gcell = cached_builtin("gru")
    p, x, h0 = _problem(gcell, 8)
    kg = sg.reference_kernel(gcell)
    cot = np.random.default_rng(80).standard_normal((5, 4, 3))
    bare = kg.vjp(p, x, h0, cot)
    as_dict = kg.vjp(p, x, h0, {"h": cot})
    for n in gcell.param_names:
        np.testing.assert_array_equal(bare.params[n], as_dict.params[n])
    want = _complex_step(_pairing("gru", {"h": cot}), {**p, "h0:h": h0["h"], "x": x})
    for n in gcell.param_names:
        np.testing.assert_allclose(bare.params[n], want[n], rtol=1e-11, atol=1e-13, err_msg=n)


def test_vjp_cotangent_errors_name_the_state() -> None:
    """Cotangents: a bare array for a two-state cell, a wrong shape, a wrong dtype or a wrong
    number of dimensions are rejected, naming what is wrong."""
    cell = cached_builtin("lstm")
    p, x, h0 = _problem(cell, 9)
    k = sg.reference_kernel(cell)
    with pytest.raises(sg.ShapeError, match="dict"):
        k.vjp(p, x, h0, np.ones((5, 4, 3)))
    with pytest.raises(sg.ShapeError, match=r"cotangents\['c'\] has shape \(5, 4, 2\)"):
        k.vjp(p, x, h0, {"c": np.ones((5, 4, 2))})
    with pytest.raises(sg.ShapeError, match=r"cotangents\['h'\]"):
        k.vjp(p, x, h0, {"h": np.ones((5, 4, 3, 1))})
    with pytest.raises(sg.DTypeError, match=r"cotangents\['h'\]"):
        k.vjp(p, x, h0, {"h": np.ones((5, 4, 3), dtype=np.float32)})


# ============================================================================ JVP
def _trajectory_of(name: str) -> Callable[[dict[str, np.ndarray]], Arrays]:
    cell = _cell(name)

    def f(a: dict[str, np.ndarray]) -> Arrays:
        p = {k: a[k] for k in cell.param_names}
        return _hand(name, p, a["x"], {s: a["h0:" + s] for s in cell.state_names})

    return f


@pytest.mark.parametrize("name", ["lstm", "scalar_gate", "mgu", "mixed", "bottleneck"])
def test_jvp_matches_complex_step_along_a_direction(name: str) -> None:
    """``jvp`` along tangents of every parameter, the initial states and the inputs is the
    directional derivative of every state at every step: one complex step along the same
    direction (tolerance as for the gradients)."""
    cell = _cell(name)
    p, x, h0 = _problem(cell, 10)
    rng = np.random.default_rng(100)
    tp = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    th0 = {s: rng.standard_normal(v.shape) for s, v in h0.items()}
    tx = rng.standard_normal(x.shape)
    out = sg.reference_kernel(cell).jvp(p, x, h0, {**tp, "h0": th0, "x": tx})
    args = {**{k: p[k] + 1j * H * tp[k] for k in p}, **{"h0:" + s: h0[s] + 1j * H * th0[s] for s in h0}, "x": x + 1j * H * tx}
    want = {s: np.imag(v) / H for s, v in _trajectory_of(name)(args).items() if s in cell.state_names}
    assert set(out) == set(cell.state_names)
    for s in cell.state_names:
        assert out[s].shape == (5, 4, 3)
        np.testing.assert_allclose(out[s], want[s], rtol=1e-11, atol=1e-13, err_msg=s)


@pytest.mark.parametrize("which", ["x", "h0", "W", "b"])
def test_jvp_with_one_tangent_only(which: str) -> None:
    """Missing tangents are zero: a tangent of the inputs only, of the initial state only
    (a bare array for a one-state cell), of one matrix or of one vector only."""
    cell = cached_builtin("vector_gate")
    p, x, h0 = _problem(cell, 11)
    rng = np.random.default_rng(110)
    t = rng.standard_normal(x.shape if which == "x" else h0["h"].shape if which == "h0" else p[which].shape)
    out = sg.reference_kernel(cell).jvp(p, x, h0, {which: t})["h"]
    args = {**p, "h0:h": h0["h"], "x": x}
    key = "h0:h" if which == "h0" else which
    args = {k: (v + 1j * H * t if k == key else v.astype(complex)) for k, v in args.items()}
    want = np.imag(_trajectory_of("vector_gate")(args)["h"]) / H
    np.testing.assert_allclose(out, want, rtol=1e-11, atol=1e-13)


def test_jvp_argument_errors() -> None:
    """Tangents must be a dict of known names with the parameters' shapes (messages name the entry)."""
    cell = cached_builtin("vector_gate")
    p, x, h0 = _problem(cell, 12)
    k = sg.reference_kernel(cell)
    with pytest.raises(sg.ShapeError, match="dict"):
        k.jvp(p, x, h0, [np.ones_like(x)])
    with pytest.raises(sg.ShapeError, match="unknown entries.*'Wx'"):
        k.jvp(p, x, h0, {"W": np.ones_like(p["W"]), "Wx": np.ones((3, 3))})
    with pytest.raises(sg.ShapeError, match=r"tangents\['W'\] has shape \(3, 2\)"):
        k.jvp(p, x, h0, {"W": np.ones((3, 2))})
    with pytest.raises(sg.ShapeError, match=r"tangents\['x'\] has shape \(5, 4, 1\)"):
        k.jvp(p, x, h0, {"x": np.ones((5, 4, 1))})
    with pytest.raises(sg.ShapeError, match=r"tangents\['h0'\]"):
        k.jvp(p, x, h0, {"h0": np.ones((4, 2))})
    with pytest.raises(sg.DTypeError, match=r"tangents\['b'\]"):
        k.jvp(p, x, h0, {"b": np.ones(3, dtype=np.float32)})


# ================================================================ one-step Jacobians
@pytest.mark.parametrize("name", ["scalar_gate", "lstm", "mixed", "bottleneck"])
def test_dense_state_jacobian_matches_complex_step(name: str) -> None:
    """``jacobian(params, x_t, h_prev)`` is d(state')/d(state) of one step, states stacked in
    declaration order, per batch row: complex steps of the hand-written step."""
    cell = _cell(name)
    p, x, h0 = _problem(cell, 13, T=1, B=2)
    J = sg.reference_kernel(cell).jacobian(p, x[0], h0)
    names = cell.state_names
    n = 3
    N = n * len(names)
    assert J.shape == (2, N, N)
    for col in range(N):
        s, j = names[col // n], col % n
        hc = {k: v.astype(complex) for k, v in h0.items()}
        hc[s][:, j] += 1j * H
        new, _ = HAND[name](p, x[0].astype(complex), hc)
        want = np.concatenate([np.imag(new[r]) / H for r in names], axis=1)
        np.testing.assert_allclose(J[:, :, col], want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(("name", "param"), [("vector_gate", "Wg"), ("vector_gate", "Ug"), ("scalar_gate", "c"),
                                             ("scalar_gate", "ug"), ("bottleneck", "P"), ("bottleneck", "A")])
def test_parameter_jacobian_matches_complex_step(name: str, param: str) -> None:
    """``parameter_jacobian(..., param)`` is d h'_i / d param[j...] of one step, (B, n, *shape):
    a square and a rectangular matrix, a scalar, a one-row matrix, a one-column matrix and a
    matrix into a dimension of its own, each against complex steps of the hand-written step."""
    cell = _cell(name)
    p, x, h0 = _problem(cell, 14, T=1)
    Jp = np.asarray(sg.reference_kernel(cell).parameter_jacobian(p, x[0], h0, param))
    shape = np.shape(p[param])
    assert Jp.shape == (4, 3, *shape)
    for idx in np.ndindex(*shape):
        pc = {k: np.array(v, dtype=complex) for k, v in p.items()}
        pc[param][idx] += 1j * H
        want = np.imag(HAND[name](pc, x[0], h0)[0]["h"]) / H
        np.testing.assert_allclose(Jp[(slice(None), slice(None), *idx)], want, rtol=1e-11, atol=1e-13)


def test_step_values_are_the_first_step() -> None:
    """``step_values`` holds the inputs, the previous state and every node of one step."""
    cell = cached_builtin("gru")
    p, x, h0 = _problem(cell, 16, T=1)
    vals = sg.reference_kernel(cell).step_values(p, x[0], h0)
    _, nodes = _gru(p, x[0], h0)
    np.testing.assert_array_equal(vals["h"], h0["h"])
    np.testing.assert_array_equal(vals["x"], x[0])
    for nd, v in nodes.items():
        np.testing.assert_allclose(vals[nd], v, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("bad", [np.ones((1, 2, 2)), np.ones(2), [[0.0, 0.0], [0.0, 0.0]]])
def test_step_values_needs_a_2d_input(bad: Any) -> None:
    """``x_t`` of one step must be a (B, m) array; the message shows what was passed."""
    cell = cached_builtin("gru")
    p, _, h0 = _problem(cell, 17, T=1)
    k = sg.reference_kernel(cell)
    with pytest.raises(sg.ShapeError, match=r"x_t must be a \(B, m\) array"):
        k.step_values(p, bad, h0)
    with pytest.raises(sg.ShapeError, match=r"x_t must be a \(B, m\) array"):
        k.jacobian(p, bad, h0)


# ====================================================================== contracts
def test_constructors_reject_what_is_not_a_cell() -> None:
    """Both the class and the cached factory reject a non-Cell with CellSpecError naming its type."""
    with pytest.raises(sg.CellSpecError, match="got str"):
        sg.ReferenceKernel("leaky")  # type: ignore[arg-type]
    with pytest.raises(sg.CellSpecError, match="got function"):
        sg.reference_kernel(lambda h: h)  # type: ignore[arg-type]
    with pytest.raises(sg.DTypeError):
        sg.reference_kernel(cached_builtin("plain"), "int32")


@sg.cell
def constant_update(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
    """Reads the state, yet (h + 1)^2 - h^2 - 2h = 1: the update does not depend on it."""
    return sg.tanh(U @ x) + (h + 1) ** 2 - h**2 - 2 * h


def test_kernel_rejects_an_update_that_does_not_depend_on_the_state() -> None:
    """The kernel derives the cell when it is built, so a cell whose state Jacobian is identically
    zero is rejected there (StateIndependenceError), not at its first run."""
    with pytest.raises(sg.StateIndependenceError, match="does not depend on the state"):
        sg.ReferenceKernel(constant_update)
    with pytest.raises(sg.StateIndependenceError, match="does not depend on the state"):
        sg.reference_kernel(constant_update, "float32")


def test_reference_kernel_is_cached_per_cell_and_dtype() -> None:
    """``reference_kernel`` returns one kernel per (cell, dtype), with that dtype, named in its repr."""
    cell = cached_builtin("leaky")
    a, b = sg.reference_kernel(cell), sg.reference_kernel(cell, "float64")
    c = sg.reference_kernel(cell, "float32")
    assert a is b and a is not c
    assert a.dtype == np.float64 and c.dtype == np.float32
    assert a.cell is cell and a.backend == "numpy-reference"
    assert repr(c) == "<ReferenceKernel 'leaky' float32>"


def test_backward_rejects_a_loss_that_is_not_a_symgate_loss() -> None:
    """``loss`` must be a symgate loss: anything else is a CellSpecError naming its type."""
    cell = cached_builtin("leaky")
    p, x, h0 = _problem(cell, 18)
    with pytest.raises(sg.CellSpecError, match="got function"):
        sg.reference_kernel(cell).backward(p, x, h0, loss=lambda h: 0.0)  # type: ignore[arg-type]


def test_forward_checks_its_arguments() -> None:
    """Wrong dimensionality of x, a parameter of the wrong shape or an h0 of the wrong batch
    are rejected before anything runs."""
    cell = cached_builtin("vector_gate")
    p, x, h0 = _problem(cell, 19)
    k = sg.reference_kernel(cell)
    with pytest.raises(sg.ShapeError):
        k.forward(p, x[0], h0)
    with pytest.raises(sg.ShapeError, match=r"params\['Wg'\]"):
        k.forward({**p, "Wg": np.ones((3, 2))}, x, h0)
    with pytest.raises(sg.ShapeError, match="h0"):
        k.forward(p, x, {"h": np.ones((3, 3))})


@pytest.mark.parametrize(("name", "n", "B"), [("scalar_gate", 2, 1), ("scalar_gate", 1, 3), ("mixed", 2, 1), ("mixed", 1, 3)])
def test_backward_at_one_unit_and_one_batch_row(name: str, n: int, B: int) -> None:
    """Sizes at their edges, where a one-unit gate read by every unit (the scalar gate's ``g``,
    ``mixed``'s ``e``) must have its adjoint summed over the units, not over the batch:
    gradients against the complex step (tolerance as above)."""
    cell = _cell(name)
    T = 3
    p, x, h0 = _problem(cell, 20 + n + B, n=n, m=2, B=B, T=T)
    rng = np.random.default_rng(200)
    V, y = rng.standard_normal((2, n)), rng.standard_normal((T, B, 2))
    g = sg.reference_kernel(cell).backward(p, x, h0, loss=sg.losses.step_mse(V, y))
    args = {**p, "h0:h": h0["h"], "x": x, "V": V}
    want = _complex_step(_loss_of(name, "step", V, y), args)
    for k in cell.param_names:
        np.testing.assert_allclose(g.params[k], want[k], rtol=1e-11, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(g.h0["h"], want["h0:h"], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g.x, want["x"], rtol=1e-11, atol=1e-13)


def test_float32_vjp_with_a_missing_cotangent_stays_float32() -> None:
    """A float32 LSTM seeded through ``h`` only: the zeros standing in for ``c``'s cotangent are
    float32 too, so every gradient, ``c``'s initial-state gradient included, is float32 and
    close to the float64 result (rtol 1e-4: float32 rounding through five steps)."""
    cell = cached_builtin("lstm")
    p, x, h0 = _problem(cell, 21)
    cot = np.random.default_rng(210).standard_normal((5, 4, 3))
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    k32 = sg.reference_kernel(cell, "float32")
    g32 = k32.vjp({k: f32(v) for k, v in p.items()}, f32(x), {k: f32(v) for k, v in h0.items()}, {"h": f32(cot)})
    g64 = sg.reference_kernel(cell).vjp(p, x, h0, {"h": cot})
    for arr in [*g32.params.values(), *g32.h0.values(), g32.x]:
        assert arr.dtype == np.float32
    for s in ("h", "c"):
        np.testing.assert_allclose(g32.h0[s], g64.h0[s], rtol=1e-4, atol=1e-5)


def test_trajectory_by_hand() -> None:
    """The public Trajectory: ``h`` is the first state, ``previous`` prepends h0 and drops the
    last step, and a trajectory built without companion values has none."""
    h = np.arange(12.0).reshape(3, 2, 2)
    c = -h
    h0 = {"h": np.full((2, 2), 0.5), "c": np.full((2, 2), -0.5)}
    tr = sg.Trajectory({"h": h, "c": c}, {}, h0, np.zeros((3, 2, 1)), {"n": 2})
    assert tr.aux == {}
    assert tr.h is h
    np.testing.assert_array_equal(tr.previous("c"), np.concatenate([h0["c"][None], c[:2]]))
    np.testing.assert_array_equal(tr.previous("h")[1:], h[:2])


def test_numpy_evaluators_are_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node and partial expressions are lambdified on first use only (the _Step docstring):
    building a kernel lambdifies nothing, and a second forward and backward pass nothing more."""
    import symgate._reference as ref

    calls = []
    real = ref._lambdify
    monkeypatch.setattr(ref, "_lambdify", lambda e: calls.append(e) or real(e))
    cell = sg.cells.mgu()  # a fresh cell: nothing cached on it yet
    k = ref.ReferenceKernel(cell)
    assert calls == []
    p, x, h0 = _problem(cell, 22)
    loss = sg.losses.last_mse(np.ones((1, 3)), np.zeros((4, 1)))
    first = k.backward(p, x, h0, loss=loss)
    built = len(calls)
    assert built > 0
    again = k.backward(p, x, h0, loss=loss)
    assert len(calls) == built
    np.testing.assert_array_equal(again.params["Wf"], first.params["Wf"])


def test_complex128_bptt_is_the_analytic_continuation() -> None:
    """The complex128 kernel (accepted for complex-step checks) runs BPTT in complex arithmetic:
    Im grad(p + i H v) / H is the Hessian-vector product, which must equal central differences
    of the float64 gradient along v (step 1e-5: truncation O(h^2) ~ 1e-10, rounding O(eps/h)
    ~ 1e-11 on O(1) gradients; 1e-7 is a safe margin)."""
    cell = mixed
    p, x, h0 = _problem(cell, 23)
    rng = np.random.default_rng(230)
    v = {k: rng.standard_normal(a.shape) for k, a in p.items()}
    cot = rng.standard_normal((5, 4, 3))
    kc = sg.reference_kernel(cell, "complex128")
    kr = sg.reference_kernel(cell)
    pc = {k: p[k] + 1j * H * v[k] for k in p}
    gc = kc.vjp(pc, x.astype(complex), {"h": h0["h"].astype(complex)}, {"h": cot.astype(complex)})
    step = 1e-5
    up = kr.vjp({k: p[k] + step * v[k] for k in p}, x, h0, cot)
    dn = kr.vjp({k: p[k] - step * v[k] for k in p}, x, h0, cot)
    for k in p:
        assert gc.params[k].dtype == np.complex128
        np.testing.assert_allclose(np.imag(gc.params[k]) / H, (up.params[k] - dn.params[k]) / (2 * step), atol=1e-7, err_msg=k)
        np.testing.assert_allclose(np.real(gc.params[k]), kr.vjp(p, x, h0, cot).params[k], rtol=1e-13, atol=1e-14, err_msg=k)
    np.testing.assert_allclose(np.imag(gc.x) / H, (up.x - dn.x) / (2 * step), atol=1e-7)
    np.testing.assert_allclose(np.imag(gc.h0["h"]) / H, (up.h0["h"] - dn.h0["h"]) / (2 * step), atol=1e-7)


def test_argument_errors_name_the_offending_array() -> None:
    """x of the wrong dtype, a missing parameter, and a loss whose readout or targets do not
    fit the first state are rejected with the project's errors naming them."""
    cell = cached_builtin("lstm")
    p, x, h0 = _problem(cell, 24)
    k = sg.reference_kernel(cell)
    with pytest.raises(sg.DTypeError, match="x has dtype float32"):
        k.forward(p, x.astype(np.float32), h0)
    with pytest.raises(sg.ShapeError, match="missing.*'Uo'"):
        k.forward({n: v for n, v in p.items() if n != "Uo"}, x, h0)
    with pytest.raises(sg.ShapeError, match="loss y"):
        k.backward(p, x, h0, loss=sg.losses.last_mse(np.ones((2, 3)), np.zeros((4, 1))))
    with pytest.raises(sg.ShapeError, match="loss V"):
        k.backward(p, x, h0, loss=sg.losses.last_mse(np.ones((2, 2)), np.zeros((4, 2))))


# ============================================================= non-finite results
@sg.cell
def blowup(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m"), v: sg.Vector("n")):
    """h' = exp(v) * h + tanh(U x): from h0 = 1 and v = 40 the state is e^{40 t}, inf at t = 18."""
    return sg.exp(v) * h + sg.tanh(U @ x)


def _blowup(T: int) -> tuple[Arrays, np.ndarray, Arrays]:
    p = {"U": np.full((2, 2), 0.1), "v": np.full(2, 40.0)}
    return p, np.zeros((T, 1, 2)), {"h": np.ones((1, 2))}


def test_non_finite_results_raise_numerical_error_naming_the_stage() -> None:
    """e^{40 t} overflows float64 (max ~ e^{709.8}) at t = 18: the forward pass raises
    NumericalError naming it, without any RuntimeWarning (warnings are errors here); at T = 10
    everything is finite (e^{400}) but a loss of V = 1e100 squares past the float range, and
    cotangents of 1e300 grow by e^{40} per step back past it, as do tangents of h0."""
    k = sg.reference_kernel(blowup)
    with np.errstate(all="raise"):  # the expectation, in plain numpy: e^{40*18} is not finite
        with pytest.raises(FloatingPointError):
            np.exp(40.0 * 18)
    p, x, h0 = _blowup(18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(sg.NumericalError, match="the forward pass"):
            k.forward(p, x, h0)
        p, x, h0 = _blowup(10)
        traj = k.forward(p, x, h0)
        np.testing.assert_allclose(traj.h[-1], np.exp(400.0) * np.ones((1, 2)), rtol=1e-12)
        with pytest.raises(sg.NumericalError, match="the loss"):
            k.backward(p, x, h0, loss=sg.losses.last_mse(np.full((1, 2), 1e100), np.zeros((1, 1))))
        with pytest.raises(sg.NumericalError, match="a gradient"):
            k.vjp(p, x, h0, np.full((10, 1, 2), 1e300))
        # from h0 = 1e-300 over 17 steps the state is 1e-300 e^{680} ~ 1e-5 and the loss ~ 1e30,
        # but dL/dh0 carries the factor e^{680} ~ 1e295 times dL/dh_T ~ 1e35: past the float range
        p, x, _ = _blowup(17)
        tiny = {"h": np.full((1, 2), 1e-300)}
        with pytest.raises(sg.NumericalError, match="a gradient"):
            k.backward(p, x, tiny, loss=sg.losses.last_mse(np.full((1, 2), 1e20), np.zeros((1, 1))))
        with pytest.raises(sg.NumericalError, match="a state tangent"):
            k.jvp(p, x, h0, {"h0": np.full((1, 2), 1e300)})
