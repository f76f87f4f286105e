"""The cell IR and its builder API."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

import symgate as sg
from symgate import Constant, Input, Matrix, Scalar, State, Vector


def test_decorator_names_nodes_from_locals() -> None:
    @sg.cell
    def my_gate(h: State("n"), x: Input("m"), W: Matrix("n", "n"), U: Matrix("n", "m"),
                b: Vector("n"), wg: Matrix(1, "n"), ug: Matrix(1, "m")):
        g = sg.sigmoid(wg @ h + ug @ x)
        cand = sg.tanh(W @ h + U @ x + b)
        return (1 - g) * h + g * cand

    assert my_gate.name == "my_gate"
    assert my_gate.param_names == ("W", "U", "b", "wg", "ug")
    names = {nd.name for nd in my_gate.nodes}
    assert {"g", "cand"} <= names
    g = my_gate.node("g")
    assert g.dim == 1 and g.is_gate
    assert my_gate.node("cand").dim == "n" and not my_gate.node("cand").is_gate
    assert my_gate.update_equations()[0] == "h' = cand*g + h*(1 - g)"


def test_unnamed_nodes_get_stems_and_linear_names() -> None:
    c = sg.cells.plain(bias=False)
    assert [nd.name for nd in c.nodes if nd.kind == "linear"] == ["z_W", "z_U"]
    assert c.node("phi").kind == "fn"


def test_reset_path_creates_arithmetic_node_for_linear_input() -> None:
    c = sg.cells.gru()
    lin = c.node("z_Wn")
    src = c.node(lin.source)
    assert src.kind == "arith" and src.expr == c.symbols["h"] * c.symbols["r"]


def test_constants_are_symbols_with_values() -> None:
    c = sg.cells.leaky(0.3)
    assert c.constants == {"alpha": 0.3}
    c2 = c.with_constants(alpha=0.9)
    assert c2.constants == {"alpha": 0.9} and c.constants == {"alpha": 0.3}
    # the derivation keeps alpha symbolic
    assert c.symbols["alpha"] in sg.jacobian(c).expr.free_symbols


def test_multi_state_cell_returns_tuple() -> None:
    c = sg.cells.lstm()
    assert c.state_names == ("h", "c")
    assert len(c.outputs) == 2


def test_bias_option() -> None:
    assert "b" in sg.cells.vector_gate().param_names
    assert "b" not in sg.cells.vector_gate(bias=False).param_names
    assert set(sg.cells.scalar_gate().param_names) >= {"b", "c"}


def test_explicit_names_and_gate_marks() -> None:
    @sg.cell
    def logdomain(h: State(), x: Input(), W: Matrix("n", "n"), U: Matrix("n", "m"), Wg: Matrix("n", "n")):
        lam = sg.exp(-sg.softplus(Wg @ h)).as_gate()
        pre = (W @ h + U @ x).named("pre")
        return lam * h + (1 - lam) * sg.tanh(pre)

    assert logdomain.node("lam").is_gate
    assert logdomain.node("pre").kind == "arith"
    origins = [t.origin for t in sg.jacobian(logdomain).terms]
    assert "gate" in origins and "candidate" in origins and "leak" in origins


def test_fingerprint_is_deterministic_and_distinguishes_cells() -> None:
    assert sg.cells.gru().fingerprint() == sg.cells.gru().fingerprint()
    assert sg.cells.leaky(0.5).fingerprint() != sg.cells.leaky(0.6).fingerprint()
    assert sg.cells.gru().fingerprint() != sg.cells.mgu().fingerprint()


def test_numpy_scalars_and_floats_in_bodies() -> None:
    @sg.cell
    def scaled(h: State(), x: Input(), W: Matrix("n", "n"), U: Matrix("n", "m"), s: Scalar(), a: Constant(0.25)):
        return np.float64(0.5) * h + a * sg.tanh(W @ h + U @ x) * s

    out = scaled.outputs[0]
    assert sympy.Float(0.5) * scaled.symbols["h"] in sympy.Add.make_args(out)


def test_make_cell_programmatic() -> None:
    def body(h, x, W, U):  # type: ignore[no-untyped-def]
        return sg.tanh(W @ h + U @ x)

    c = sg.make_cell(body, {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m")}, name="prog")
    assert c.name == "prog" and c.param_names == ("W", "U")


def test_repr_and_latex() -> None:
    c = sg.cells.vector_gate()
    assert "vector_gate" in repr(c)
    assert r"\sigma" in c.latex() and r"\tanh" in c.latex()
    assert c._repr_latex_().startswith("$")


def test_tracing_leaves_profilers_and_tracers_alone() -> None:
    """Names come from the body's frame, not from a profiler hook: an active profiler is kept."""
    import sys

    calls: list[str] = []

    def prof(frame, event, arg):  # type: ignore[no-untyped-def]
        calls.append(event)

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        c = sg.cells.gru()
        assert sys.getprofile() is prof
    finally:
        sys.setprofile(old)
    assert calls  # the profiler kept receiving events while tracing
    assert {"z", "r", "cand"} <= {nd.name for nd in c.nodes if nd.named_by_user}
