"""Structured derivation: origins, independence of n, caching, printing."""

from __future__ import annotations

import pytest
import sympy

import symgate as sg
from symgate._cell import dim_symbol
from symgate._derive import local_partials


def test_derivation_is_cached_per_cell() -> None:
    c = sg.cells.vector_gate()
    assert sg.jacobian(c) is sg.jacobian(c)
    assert sg.parameter_jacobian(c, "W") is sg.parameter_jacobian(c, "W")


def test_partials_reuse_forward_values() -> None:
    c = sg.cells.vector_gate()
    lp = local_partials(c)
    g, phi = c.symbols["g"], c.symbols["phi"]
    gate_partials = lp.partials[lp.of_node(c.node("g"))]
    assert set(gate_partials.values()) == {g * (1 - g)}
    cand = lp.partials[lp.of_node(c.node("phi"))]
    assert set(cand.values()) == {1 - phi**2}


@pytest.mark.parametrize("name, origins", [
    ("plain", ("candidate",)),
    ("leaky", ("leak", "candidate")),
    ("scalar_gate", ("leak", "candidate", "gate")),
    ("vector_gate", ("leak", "candidate", "gate")),
    ("gru", ("leak", "candidate", "gate", "reset")),
    ("mgu", ("leak", "candidate", "gate", "reset")),
])
def test_origins(name: str, origins: tuple[str, ...]) -> None:
    assert sg.jacobian(sg.cells.builtin(name)).origins == origins


def test_gru_reset_term_chain() -> None:
    J = sg.jacobian(sg.cells.gru())
    (reset,) = J.select("reset").terms
    assert reset.matrices == ("Wn", "Wr")
    assert [f.kind for f in reset.factors] == ["diag", "diag", "matrix", "diag", "diag", "matrix"]


def test_lstm_block_structure() -> None:
    J = sg.jacobian(sg.cells.lstm())
    assert isinstance(J, sg._derive.BlockJacobian)
    assert J[("c", "c")].origins == ("leak",)
    f = sg.cells.lstm().symbols["f"]
    assert J[("c", "c")].diagonal_part() == f
    assert J.expr.shape == (2 * dim_symbol("n"), 2 * dim_symbol("n"))


def test_symbolic_work_does_not_depend_on_n() -> None:
    """The derivation never sees n: the same object serves n = 2 and n = 1000."""
    J = sg.jacobian(sg.cells.vector_gate())
    n = dim_symbol("n")
    assert J.expr.shape == (n, n)
    big, small = J.expr.subs(n, 1000), J.expr.subs(n, 2)
    assert sympy.count_ops(big) == sympy.count_ops(small)
    assert big.shape == (1000, 1000)


def test_scalar_gate_term_is_rank_one_structure() -> None:
    J = sg.jacobian(sg.cells.scalar_gate())
    (gate,) = J.select("gate").terms
    kinds = [f.kind for f in gate.factors]
    assert kinds == ["col", "matrix"] and gate.matrices == ("wg",)


def test_parameter_jacobian_kron_form() -> None:
    pj = sg.parameter_jacobian(sg.cells.vector_gate(), "W")
    assert pj.kind == "matrix" and len(pj.pieces) == 1
    C, v = pj.pieces[0]
    assert v.name == "h"
    assert "\u2297" in str(pj) and r"\otimes" in pj.latex()


def test_printing_forms() -> None:
    J = sg.jacobian(sg.cells.leaky(bias=False))
    s = str(J)
    assert "(1 - alpha)*I" in s and "alpha*diag(1 - phi**2)*W" in s
    assert r"\operatorname{diag}" in J.latex()
    assert "diag" in J.pretty()
    assert "[leak" in J.describe()


def test_zero_block_when_independent() -> None:
    assert str(sg.parameter_jacobian(sg.cells.lstm(), "Wo", "c")).endswith("= 0")
