"""Derivation stays bounded on large cell graphs.

* A body that reuses a quantity (``e = (e + h) * e * 0.5``, repeated) doubles its traced
  expression tree per level; tracing turns shared quantities into arithmetic nodes so
  every node's expression stays below ``MAX_EXPR_OPS`` and derivation is linear in depth.
* A graph thousands of nodes deep derives without recursion.
* A graph whose number of paths grows exponentially is refused quickly with a clear error.

The time limits are generous on purpose (30 s for work that takes well under a second to a
few seconds on an idle machine): CI runs this suite on 2 shared cores next to other jobs,
and the limits only need to separate "linear" from "exponential" (depth 60 without the
bound doubles 46 more times after depth 14, which alone took 20 s).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import sympy

import symgate as sg
from symgate import CellSpecError, Input, Matrix, State, Vector, sigmoid, tanh
from symgate._cell import MAX_EXPR_OPS
from symgate._derive import local_partials
from symgate._derive._jacobian import MAX_CHAINS

LIMIT_S = 30.0

SPECS = {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m"), "b": Vector("n")}


def repeated_square(depth: int) -> sg.Cell:
    def body(h, x, W, U, b):  # type: ignore[no-untyped-def]
        e = 0.02 + 0.02 * sigmoid(W @ h + U @ x + b)
        for _ in range(depth):
            e = (e + h) * e * 0.5
        return 0.5 * h + e

    return sg.make_cell(body, SPECS, name=f"square{depth}")


def ops(expr: sympy.Expr) -> int:
    return sympy.count_ops(expr)


def step(k, params, x_t, h):  # one step of the reference kernel: h' from h
    return k.forward(params, x_t[None], h).states["h"][0]


def problem(n: int, m: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    params = {"W": 0.3 * rng.standard_normal((n, n)), "U": 0.3 * rng.standard_normal((n, m)),
              "b": 0.1 * rng.standard_normal(n)}
    x_t = rng.standard_normal((batch, m))
    # for h near 2 the map e -> (e + h) e / 2 contracts slowly towards 0 (rate h/2; its other
    # fixed point 2 - h > 0.04 is above the start e <= 0.04), so e stays far above rounding
    # over 60 levels and the deep part of the Jacobian is a real share of it
    h = 1.85 + 0.1 * rng.random((batch, n))
    return params, x_t, h


def central_differences(k, params, x_t, h, eps: float = 1e-6) -> np.ndarray:
    B, n = h.shape
    J = np.empty((B, n, n))
    for j in range(n):
        dh = np.zeros_like(h)
        dh[:, j] = eps
        J[:, :, j] = (step(k, params, x_t, h + dh) - step(k, params, x_t, h - dh)) / (2 * eps)
    return J


def test_small_bodies_trace_without_extra_nodes() -> None:
    """Below the limit nothing is materialised: the node list is the one the body writes."""
    c = repeated_square(3)
    assert [nd.kind for nd in c.nodes] == ["linear", "linear", "fn"]
    for cell in [sg.cells.builtin(name) for name in sg.cells.BUILTIN]:
        assert all(nd.kind != "arith" or nd.named_by_user or nd.name.startswith("u") for nd in cell.nodes)
        assert max(ops(o) for o in cell.outputs) < MAX_EXPR_OPS


def test_depth_60_derives_quickly_and_stays_bounded() -> None:
    t0 = time.perf_counter()
    c = repeated_square(60)
    J = sg.jacobian(c)
    lp = local_partials(c)
    pjs = sg.parameter_jacobians(c)
    elapsed = time.perf_counter() - t0
    assert elapsed < LIMIT_S, elapsed
    # every expression is small, and the number of nodes and terms grows linearly with depth
    exprs = [nd.expr for nd in c.nodes if nd.kind != "linear"] + list(c.outputs)
    assert max(ops(e) for e in exprs) <= MAX_EXPR_OPS
    assert len(c.nodes) <= 3 + 60 + 1
    assert len(J.terms) <= 62
    assert all(ops(p) <= 2 * MAX_EXPR_OPS for parts in lp.partials.values() for p in parts.values())
    assert set(pjs) == {"W", "U", "b"}


def test_depth_60_jacobian_matches_finite_differences() -> None:
    c = repeated_square(60)
    k = sg.reference_kernel(c)
    params, x_t, h = problem(n=3, m=2, batch=2, seed=0)
    vals = k.step_values(params, x_t, h)
    got = sg.jacobian(c).evaluate(vals, params, {"n": 3, "m": 2, 1: 1})
    fd = central_differences(k, params, x_t, h)
    deep = got - 0.5 * np.eye(3)[None]
    assert np.abs(deep).max() > 1e-3  # the 60-level part is a real share of the Jacobian
    np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-9)


def test_depth_60_parameter_jacobian_matches_finite_differences() -> None:
    c = repeated_square(60)
    k = sg.reference_kernel(c)
    params, x_t, h = problem(n=3, m=2, batch=2, seed=1)
    vals = k.step_values(params, x_t, h)
    got = sg.parameter_jacobian(c, "b").evaluate(vals, params, {"n": 3, "m": 2, 1: 1})
    eps = 1e-6
    fd = np.empty_like(got)
    for j in range(3):
        p_hi = dict(params, b=params["b"] + eps * np.eye(3)[j])
        p_lo = dict(params, b=params["b"] - eps * np.eye(3)[j])
        fd[:, :, j] = (step(k, p_hi, x_t, h) - step(k, p_lo, x_t, h)) / (2 * eps)
    assert np.abs(fd).max() > 1e-4
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-10)


def test_shared_quantities_become_one_node_each() -> None:
    """The quantity reused at each level is one node read twice, not two copies."""
    c = repeated_square(60)
    arith = [nd for nd in c.nodes if nd.kind == "arith"]
    assert len(arith) >= 50
    for nd in arith[1:]:
        reads = {s.name for s in nd.expr.free_symbols}
        assert reads <= {"h"} | {a.name for a in arith}, reads
        assert len(reads - {"h"}) == 1  # one previous level


def test_1200_nested_sigmoids_derive_without_recursion_error() -> None:
    def body(h, x, W, U, b):  # type: ignore[no-untyped-def]
        e = W @ h + U @ x + b
        for _ in range(1200):
            e = sigmoid(e)
        return 0.5 * h + e

    t0 = time.perf_counter()
    c = sg.make_cell(body, SPECS, name="nested")
    J = sg.jacobian(c)
    pjs = sg.parameter_jacobians(c)
    elapsed = time.perf_counter() - t0
    assert elapsed < LIMIT_S, elapsed
    assert len(c.nodes) == 1202  # W h, U x and the 1200 sigmoids
    assert [t.origin for t in J.terms] == ["leak", "gate"]
    (gate,) = J.select("gate").terms
    assert len(gate.factors) == 1201 and gate.matrices == ("W",)
    assert len(pjs["b"].terms) == 1
    assert str(J).startswith("dh'/dh = 0.5*I + diag(")


def test_1200_nested_functions_evaluate() -> None:
    """A 1,200-node chain evaluated against finite differences.  Nested sigmoids shrink the
    deep term to 0.25**1200; alternating exp and log keeps its factors' product at 1, so
    the chain of 1,200 diagonal factors carries an O(1) share of the Jacobian."""

    def body(h, x, W, U):  # type: ignore[no-untyped-def]
        e = tanh(W @ h + U @ x)
        for _ in range(600):
            e = sg.log(sg.exp(e))
        return 0.5 * h + e

    c = sg.make_cell(body, {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m")},
                     name="nested_eval")
    assert len(c.nodes) == 1203
    k = sg.reference_kernel(c)
    rng = np.random.default_rng(3)
    params = {"W": rng.standard_normal((2, 2)), "U": rng.standard_normal((2, 2))}
    x_t, h = rng.standard_normal((1, 2)), rng.standard_normal((1, 2))
    got = sg.jacobian(c).evaluate(k.step_values(params, x_t, h), params, {"n": 2, "m": 2, 1: 1})
    assert np.abs(got - 0.5 * np.eye(2)).max() > 0.05
    np.testing.assert_allclose(got, central_differences(k, params, x_t, h), rtol=1e-7, atol=1e-10)


def diamond(levels: int) -> sg.Cell:
    def body(h, x, W, U):  # type: ignore[no-untyped-def]
        e = tanh(W @ h + U @ x)
        for _ in range(levels):
            a = tanh(e)
            s = sigmoid(e)
            e = a * s  # the next level reads this level through two nodes
        return 0.5 * h + e

    return sg.make_cell(body, {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m")},
                        name="diamond")


def test_exponential_diamond_is_refused_quickly() -> None:
    c = diamond(40)  # 2**40 paths
    t0 = time.perf_counter()
    with pytest.raises(CellSpecError, match=rf"cell 'diamond' has more than {MAX_CHAINS} chains") as err:
        sg.jacobian(c)
    assert time.perf_counter() - t0 < LIMIT_S
    assert "dh'/dh" in str(err.value)
    with pytest.raises(CellSpecError, match=rf"more than {MAX_CHAINS} chains"):
        sg.parameter_jacobian(c, "U")


def test_a_small_diamond_is_derived() -> None:
    """Below the limit the paths of a diamond are all kept: 2**5 chains through W, plus the leak."""
    c = diamond(5)
    J = sg.jacobian(c)
    assert len(J.terms) == 1 + 2**5
    k = sg.reference_kernel(c)
    rng = np.random.default_rng(4)
    params = {"W": rng.standard_normal((3, 3)), "U": rng.standard_normal((3, 2))}
    x_t, h = rng.standard_normal((2, 2)), rng.standard_normal((2, 3))
    got = J.evaluate(k.step_values(params, x_t, h), params, {"n": 3, "m": 2, 1: 1})
    np.testing.assert_allclose(got, central_differences(k, params, x_t, h), rtol=1e-7, atol=1e-10)
