"""The generator's passes against hand-derived expectations: plan, run plan, layout, access, printer.

Each expectation below is worked out by hand from a cell's equations and the documented
rules of the pass (module docstrings of :mod:`symgate._codegen`), never read off the
generator's output.  Most decisions of the plan change only speed (a register instead of a
buffer, a shared adjoint buffer, a bias gradient as a column sum), so the differential tests
cannot see them; these tests do.  One small cell is compiled at the end and compared with
the numpy reference (``compare_backends``) on the paths the plan tests single out.
"""

from __future__ import annotations

import hashlib
import math
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sympy

import symgate as sg
from symgate._codegen import (STEP_WGRAD_MIN_B, GemmSite, Group, KernelPlan, Policy, RunOptions, cell_plan, generate,
                              run_plan, structural_decisions)
from symgate._codegen.access import Emitter, FnParams, at, ctx_expr, target_block
from symgate._codegen.layout import Layout
from symgate._codegen.printer import CSE_PREFIX, KernelPrinter, cse
from symgate._codegen.runplan import extent
from symgate._errors import CellSpecError, ShapeError
from symgate._functions import Sech2, Sigmoid, Softplus
from symgate.testing._feature_cells import feature_cell


def _ops(ops: list) -> list[tuple[str, list[str], Any]]:
    return [(op.kind, [st.name for st in op.items], op.dim if op.kind == "loop" else None) for op in ops]


# ----------------------------------------------------------------------------- plan


def test_static_chain_plan_typed_by_hand() -> None:
    """e = tanh(U1 x + b) (dimension k), h' = tanh(W h + U2 e): two static groups (the second reads a
    static node), a static fused loop between them, the second shares the dynamic group's adjoint
    (z_U2 and z_W are read only by phi, with the same partial), the first does not (read by e)."""
    plan = cell_plan(feature_cell("fc_static_chain"))
    assert [(g.index, g.static, g.source, g.members, g.matrices, g.rows, g.cols) for g in plan.groups] == [
        (0, True, "x", ("z_U1",), ("U1",), ("k",), "m"), (1, True, "e", ("z_U2",), ("U2",), ("n",), "k"),
        (0, False, "h", ("z_W",), ("W",), ("n",), "n")]
    assert _ops(plan.static_ops) == [("gemm", ["z_U1"], None), ("loop", ["e", "1-e^2"], "k"), ("gemm", ["z_U2"], None)]
    assert _ops(plan.dynamic_ops) == [("gemm", ["z_W"], None), ("loop", ["phi", "1-phi^2", "h'"], "n")]
    assert [op.group.index for op in plan.static_ops if op.kind == "gemm"] == [0, 1]
    assert plan.nodes == ["phi", "1-phi^2"] and plan.static_nodes == ["e", "1-e^2"]
    assert plan.companions == {"1-phi^2", "1-e^2"}
    assert plan.readers == {"x": ["@z_U1"], "b": ["e"], "z_U1": ["e"], "h": ["@z_W"], "e": ["@z_U2"],
                            "z_U2": ["phi"], "z_W": ["phi"], "phi": ["h'"]}
    # BPTT reads sech2 (the partials of phi); phi itself only feeds h' with partial 1; e is static
    assert plan.needed == {"1-phi^2"}
    assert plan.register_adjoints == {"phi"}  # e is read by a product: its adjoint is a buffer
    assert {k: g.index for k, g in plan.shared_adjoint.items()} == {1: 0}
    assert plan.column_sums == {}
    assert [plan.static_wgrad_in_loop(g) for g in plan.static_groups] == [False, True]
    assert plan.input_products_in_loop() is False and plan.x_elementwise() is False
    assert [plan.scratch_input_products(g) for g in plan.static_groups] == [False, False]
    # the static twin of L0 sends its adjoint to e (not the input): all rows are kept
    assert plan.scratch_group_adjoint(plan.dynamic_groups[0]) is False
    assert plan.group_adjoint_sent_to_input(plan.dynamic_groups[0]) is False
    assert plan.op_of["e"] == ("s", 1) and plan.op_of["h'"] == ("d", 1) and plan.op_of["z_W"] == ("d", 0)


def test_static_chain_structural_decisions_typed_by_hand() -> None:
    """The full list of decisions of the plan above (kind, instance, value), each once."""
    got = structural_decisions(cell_plan(feature_cell("fc_static_chain")))
    expected = {
        ("stacked_group", "RS0"): False, ("stacked_group", "RS1"): False, ("stacked_group", "R0"): False,
        ("fused_loop", "static1"): True, ("fused_loop", "step1"): True,
        ("register_adjoint", "phi"): True, ("register_adjoint", "e"): False,
        ("shared_adjoint", "RS0"): False, ("shared_adjoint", "RS1"): True,
        ("static_adjoint_complete_in_loop", "RS0"): False, ("static_adjoint_complete_in_loop", "RS1"): True,
        ("stored_for_bptt", "phi"): False, ("stored_for_bptt", "1-phi^2"): True,
        ("static_products_only", ""): False, ("input_elementwise", ""): False,
        ("scratch_eligible", "Y0"): False, ("scratch_eligible", "Y1"): False, ("scratch_eligible", "L0"): False,
    }
    assert len(got) == len(expected)
    assert {(k, i): v for k, i, v in got} == expected


def test_scalar_gate_plan_typed_by_hand() -> None:
    """g = sigmoid(wg h + ug x + c) (one unit), h' = (1-g) h + g tanh(W h + U x): stacked groups with a
    one-row member, the one-unit loop first (the first ready node), g's adjoint a buffer (read in the
    other loop), the input products shared with the state products and only read in their step."""
    plan = cell_plan(feature_cell("fc_scalar_gate"))
    assert [(g.static, g.source, g.members, g.rows) for g in plan.groups] == [
        (True, "x", ("z_ug", "z_U"), (1, "n")), (False, "h", ("z_wg", "z_W"), (1, "n"))]
    assert _ops(plan.static_ops) == [("gemm", ["z_ug", "z_U"], None)]
    assert _ops(plan.dynamic_ops) == [("gemm", ["z_wg", "z_W"], None), ("loop", ["g", "1-g"], 1),
                                      ("loop", ["phi", "1-phi^2", "h'"], "n")]
    assert plan.register_adjoints == {"phi"}
    assert {k: g.index for k, g in plan.shared_adjoint.items()} == {0: 0}
    assert plan.column_sums == {}  # c is a scalar parameter, not a vector
    assert plan.needed == {"g", "1-g", "phi", "1-phi^2"}
    (gs,), (gd,) = plan.static_groups, plan.dynamic_groups
    assert plan.static_wgrad_in_loop(gs) is True and plan.input_products_in_loop() is True
    assert plan.scratch_input_products(gs) is True
    assert plan.scratch_group_adjoint(gd) is True and plan.group_adjoint_sent_to_input(gd) is True
    decisions = {(k, i): v for k, i, v in structural_decisions(plan)}
    assert decisions[("fused_loop", "step1")] is True and decisions[("fused_loop", "step2")] is True
    assert decisions[("register_adjoint", "g")] is False and decisions[("register_adjoint", "phi")] is True
    assert decisions[("static_products_only", "")] is True


def test_vector_recurrence_plan_typed_by_hand() -> None:
    """phi = tanh(w*h + U x + b), h' = (1-alpha) h + alpha phi: no state product at all; b gets
    exactly what z_U gets (same partial, z_U read by phi only): a column sum of z_U's adjoint;
    w's partial (sech2 * h) is its own, so w is accumulated in the loop."""
    plan = cell_plan(feature_cell("fc_vector_recurrence"))
    assert plan.dynamic_groups == [] and len(plan.static_groups) == 1
    assert _ops(plan.dynamic_ops) == [("loop", ["phi", "1-phi^2", "h'"], "n")]
    assert plan.column_sums == {("phi", "b"): "z_U"}
    assert plan.register_adjoints == {"phi"}
    assert plan.needed == {"phi", "1-phi^2"}
    (gs,) = plan.static_groups
    assert plan.static_wgrad_in_loop(gs) is True  # written by the state-dependent phi only
    assert plan.scratch_input_products(gs) is True
    decisions = {(k, i): v for k, i, v in structural_decisions(plan)}
    assert decisions[("column_sum", "phi:b")] is True and decisions[("column_sum", "phi:w")] is False
    assert not any(k == "fused_loop" and i.startswith("static") for k, i in decisions)


def test_matrix_first_plan_typed_by_hand() -> None:
    """g = sigmoid(Wg h), u = g*h, h' = 0.5 tanh(U x) + W u: a second state product reads the node u
    (so u is stored for BPTT), the static tanh is read in the loop (a buffer, not a register)."""
    plan = cell_plan(feature_cell("fc_matrix_first"))
    assert [(g.static, g.source) for g in plan.groups] == [(True, "x"), (False, "h"), (False, "u")]
    assert _ops(plan.dynamic_ops) == [("gemm", ["z_Wg"], None), ("loop", ["g", "1-g", "u"], "n"),
                                      ("gemm", ["z_W"], None), ("loop", ["h'"], "n")]
    assert plan.needed == {"g", "1-g", "u"}
    assert plan.register_adjoints == {"g"}
    assert plan.shared_adjoint == {} and plan.column_sums == {}
    assert plan.static_wgrad_in_loop(plan.static_groups[0]) is False  # z_U is read by the static phi
    assert [plan.scratch_group_adjoint(g) for g in plan.dynamic_groups] == [True, True]
    decisions = {(k, i): v for k, i, v in structural_decisions(plan)}
    assert decisions[("fused_loop", "step1")] is True and decisions[("fused_loop", "step3")] is False
    assert decisions[("stored_for_bptt", "u")] is True


def test_two_state_plan_typed_by_hand() -> None:
    """f = sigmoid(Wf h + Uf x + bf), c' = f c + (1-f) tanh(Wc h + Uc x), h' = sigmoid(Wo c) tanh(c'):
    both state products come before the one loop; bf's gradient is the column sum of z_Wf's
    adjoint, so L0 keeps every row while L1 (z_Wo) may be one reused row."""
    plan = cell_plan(feature_cell("fc_two_state"))
    assert [(g.static, g.source, g.members) for g in plan.groups] == [
        (True, "x", ("z_Uf", "z_Uc")), (False, "h", ("z_Wf", "z_Wc")), (False, "c", ("z_Wo",))]
    assert [k for k, _n, _d in _ops(plan.dynamic_ops)] == ["gemm", "gemm", "loop"]
    assert plan.column_sums == {("f", "bf"): "z_Wf"}
    assert plan.register_adjoints == {"f", "phi", "o", "phi2"}
    assert {k: g.index for k, g in plan.shared_adjoint.items()} == {0: 0}
    assert [plan.scratch_group_adjoint(g) for g in plan.dynamic_groups] == [False, True]
    assert [plan.state_index(plan.steps[s]) for s in ("h'", "c'")] == [0, 1]


def test_shared_node_and_input_elementwise_plans() -> None:
    """u = U x + b read by two owners in the loop: not a register, no column sum (b is read by the
    static u), no shared adjoint (z_U is read by u, z_Wg by g).  x read elementwise: no static part."""
    plan = cell_plan(feature_cell("fc_shared_node"))
    assert plan.register_adjoints == {"g", "phi"}
    assert plan.shared_adjoint == {} and plan.column_sums == {}
    assert plan.static_wgrad_in_loop(plan.static_groups[0]) is False
    assert plan.input_products_in_loop() is False
    xe = cell_plan(feature_cell("fc_input_elementwise"))
    assert xe.x_elementwise() is True and xe.static_ops == [] and xe.static_groups == []
    assert xe.input_products_in_loop() is False
    decisions = {(k, i): v for k, i, v in structural_decisions(xe)}
    assert decisions[("input_elementwise", "")] is True and ("static_products_only", "") not in decisions
    assert decisions[("fused_loop", "step1")] is True


def test_scalar_parameter_gate_plan() -> None:
    """a = sigmoid(theta) is a one-unit static loop; b's column sum reads z_W's adjoint (z_U shares it)."""
    plan = cell_plan(feature_cell("fc_scalar_param_gate"))
    assert _ops(plan.static_ops) == [("gemm", ["z_U"], None), ("loop", ["a", "1-a"], 1)]
    assert plan.column_sums == {("phi", "b"): "z_W"}
    assert {k: g.index for k, g in plan.shared_adjoint.items()} == {0: 0}
    assert plan.static_wgrad_in_loop(plan.static_groups[0]) is True
    assert plan.input_products_in_loop() is False


def test_a_step_reading_everything_available_is_scheduled() -> None:
    """h' = h*x: no parameter, no product; the one step reads every available value (x and h) and
    is still ready: one loop of one node, the input read elementwise, nothing stored for BPTT."""

    @sg.cell
    def product(h: sg.State("n"), x: sg.Input("n")):
        return h * x

    plan = cell_plan(product)
    assert plan.static_ops == [] and plan.groups == []
    assert _ops(plan.dynamic_ops) == [("loop", ["h'"], "n")]
    assert plan.needed == set() and plan.x_elementwise() is True
    assert sorted(structural_decisions(plan)) == [("fused_loop", "step0", False), ("input_elementwise", "", True)]


def test_shared_adjoints_pair_groups_member_by_member() -> None:
    """A static group shares a dynamic group's buffer only member by member (same count, same rows),
    and each dynamic buffer serves one static group: U x (with Ug x stacked after it) cannot share
    W h's; of U x and U2 e, both read by the tanh only like W h, one shares it."""

    @sg.cell
    def stacked_first(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
                      Ug: sg.Matrix("n", "m")):
        phi = sg.tanh(W @ h + U @ x)
        g = sg.sigmoid(Ug @ x)
        return (1 - g) * h + g * phi

    plan = cell_plan(stacked_first)
    assert [(g.static, g.members) for g in plan.groups] == [(True, ("z_U", "z_Ug")), (False, ("z_W",))]
    assert plan.shared_adjoint == {}

    @sg.cell
    def two_static(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
                   U2: sg.Matrix("n", "n"), b: sg.Vector("n")):
        e = sg.tanh(b)
        return sg.tanh(W @ h + U @ x + U2 @ e)

    plan = cell_plan(two_static)
    assert sorted(g.source for g in plan.static_groups) == ["e", "x"]
    assert len(plan.shared_adjoint) == 1 and list(plan.shared_adjoint.values())[0].index == 0


def test_cell_plan_is_made_once_per_cell() -> None:
    cell = feature_cell("fc_xgate")
    assert cell_plan(cell) is cell_plan(cell)


# ----------------------------------------------------------------------------- generate


def test_generate_rejects_other_dtypes_naming_them() -> None:
    with pytest.raises(CellSpecError, match="float16"):
        generate(feature_cell("fc_xgate"), "float16")


def test_generated_source_description_typed_by_hand() -> None:
    """What generate() tells the caller, from the plans above: aliases, flags, scratch arrays."""
    sc = generate(feature_cell("fc_scalar_gate"), "float64")
    assert sc.aliases == {0: 0} and sc.x_elementwise is False and sc.input_products_in_loop is True
    assert sc.static_wgrad_in_loop == {0} and sc.scratch == {"Y0", "L0"} and sc.scratch_without_x_grad == {"L0"}
    assert sc.states == ["h"] and sc.state_dims == ["n"] and sc.dims == ["n", "m"]
    assert sc.nodes == ["g", "1-g", "phi", "1-phi^2"] and sc.static_nodes == [] and sc.needed == set(sc.nodes)
    ch = generate(feature_cell("fc_static_chain"), "float64")
    assert ch.aliases == {1: 0} and ch.static_wgrad_in_loop == {1} and ch.scratch == set()
    assert ch.input_products_in_loop is False and ch.static_nodes == ["e", "1-e^2"]
    ts = generate(feature_cell("fc_two_state"), "float64")
    assert ts.column_sums == {("f", "bf"): "z_Wf"} and ts.scratch == {"Y0", "L1"}
    assert ts.states == ["h", "c"]
    xe = generate(feature_cell("fc_input_elementwise"), "float64")
    assert xe.x_elementwise is True and xe.input_products_in_loop is False


def test_content_hash_is_the_sha256_of_the_source_before_it_is_stamped() -> None:
    g64 = generate(feature_cell("fc_xgate"), "float64")
    g32 = generate(feature_cell("fc_xgate"), "float32")
    assert re.fullmatch(r"[0-9a-f]{64}", g64.content_hash) and g64.content_hash != g32.content_hash
    pending = g64.source.replace(g64.content_hash, "(pending)")
    assert hashlib.sha256(pending.encode()).hexdigest() == g64.content_hash
    assert f'CONTENT_HASH = "{g64.content_hash}"' in g64.source
    assert generate(feature_cell("fc_xgate"), "float64").source == g64.source


def test_header_carries_the_equations_and_the_jacobian() -> None:
    """The generated module's header: the cell's update equations and its derived state Jacobian."""
    cell = feature_cell("fc_xgate")
    head = generate(cell, "float64").source.split("\ncdef ", 1)[0].splitlines()
    comments = [ln[4:] for ln in head if ln.startswith("#   ")]
    eqs, jac = list(cell.update_equations()), sg.jacobian(cell).describe().splitlines()
    assert eqs and jac and comments == eqs + jac


def test_matrix_products_of_the_static_chain_typed_by_hand() -> None:
    """Every matrix product of fc_static_chain's program, with its shape at n=5, m=3, k=4, T=6, B=7,
    R0 = RS1 = n, RS0 = k: forward (2 input products, the state product), BPTT (per-step weight
    gradient and adjoint of the state product, the shared static group's per-step weight gradient,
    the whole-sequence weight gradients, the static adjoints to e and to x), JVP (two products per
    group) and the loss (readout, its gradient, the two cotangents)."""
    gen = generate(feature_cell("fc_static_chain"), "float64")
    n, m, k, T, B, o = 5, 3, 4, 6, 7, 2
    env = {"T": T, "B": B, "o": o, "D0": n, "D1": m, "D2": k, "R0": n, "RS0": k, "RS1": n, "rows": B, "n": n}
    got = [(s.role, s.ta, s.tb, extent(s.M, env), extent(s.N, env), extent(s.K, env)) for s in gen.gemm_sites]
    TB = T * B
    expected = [
        ("forward.input_products", 0, 1, TB, k, m), ("forward.input_products", 0, 1, TB, n, k),
        ("forward.group", 0, 0, B, n, n),
        ("bptt.weight_gradient_step", 1, 0, n, n, B), ("bptt.adjoint", 0, 0, B, n, n),
        ("bptt.static_weight_gradient_step", 1, 0, k, n, B),
        ("bptt.weight_gradient", 1, 0, n, n, TB),
        ("bptt.static_weight_gradient", 1, 0, k, n, TB), ("bptt.static_adjoint", 0, 0, TB, k, n),
        ("bptt.static_weight_gradient", 1, 0, m, k, TB), ("bptt.static_adjoint", 0, 0, TB, m, k),
        ("jvp.input_products", 0, 1, TB, k, m), ("jvp.input_products", 0, 1, TB, k, m),
        ("jvp.input_products", 0, 1, TB, n, k), ("jvp.input_products", 0, 1, TB, n, k),
        ("jvp.group", 0, 0, B, n, n), ("jvp.group", 0, 0, B, n, n),
        ("loss.readout", 0, 1, B, o, n), ("loss.readout_gradient", 1, 0, o, n, B),
        ("loss.cotangent", 0, 0, B, n, o), ("loss.cotangent", 0, 0, B, n, o),
    ]
    assert got == expected
    assert [s.index for s in gen.gemm_sites] == list(range(len(expected)))
    assert gen.ints[-len(expected):] == [("route", j) for j in range(len(expected))]


# ----------------------------------------------------------------------------- run plan


def _fake_gen(**kw: Any) -> SimpleNamespace:
    """A generated-program description for run_plan, with every field given explicitly."""
    base = dict(groups=[Group(0, True, "x", ("a", "b"), ("A", "Bm"), ("n", 1), "m"),
                        Group(0, False, "h", ("c",), ("C",), ("n",), "n")],
                dims=["n", "m"], state_dims=["n"], gemm_sites=[], input_products_in_loop=True,
                static_wgrad_in_loop=frozenset({0}), x_elementwise=False, scratch=frozenset({"Y0", "L0"}),
                scratch_without_x_grad=frozenset({"L0"}), nodes=["p", "q", "r"], needed={"q"})
    base.update(kw)
    return SimpleNamespace(**base)


SIZES = {1: 1, "n": 5, "m": 3}


def test_run_plan_batch_threshold_and_its_consequences() -> None:
    """Per-step products from policy.step_min_batch rows on: input products, weight gradients, the
    static group's route (only where its adjoint rows are complete in the loop)."""
    train = RunOptions(loss="last", backward=True, x_grad=False)
    small = run_plan(_fake_gen(), SIZES, 4, STEP_WGRAD_MIN_B - 1, train)
    big = run_plan(_fake_gen(), SIZES, 4, STEP_WGRAD_MIN_B, train)
    assert (small.wgrad_per_step, small.input_products_per_step, small.static_wgrad) == (False, False, {0: "whole"})
    assert (big.wgrad_per_step, big.input_products_per_step, big.static_wgrad) == (True, True, {0: "per_step"})
    assert run_plan(_fake_gen(static_wgrad_in_loop=frozenset()), SIZES, 4, 9, train).static_wgrad == {0: "whole"}
    assert run_plan(_fake_gen(input_products_in_loop=False), SIZES, 4, 9, train).input_products_per_step is None
    assert run_plan(_fake_gen(), SIZES, 4, 3, train, policy=Policy(step_min_batch=3)).wgrad_per_step is True
    assert small.options == train and small.policy == Policy()


def test_run_plan_scratch_rows() -> None:
    """Input products are one row when computed per step and no trajectory is kept; group adjoints
    when BPTT runs per step, unless the input gradient reads them after the loop."""
    gen = _fake_gen()
    B = STEP_WGRAD_MIN_B
    train = RunOptions(loss="last", backward=True, x_grad=False)
    assert run_plan(gen, SIZES, 4, B, train).scratch == {"Y0", "L0"}
    assert run_plan(gen, SIZES, 4, B, RunOptions(loss="last", backward=True, x_grad=True)).scratch == {"Y0"}
    assert run_plan(_fake_gen(x_elementwise=True), SIZES, 4, B, train).scratch == {"Y0"}  # x_grad forced
    assert run_plan(_fake_gen(scratch_without_x_grad=frozenset()), SIZES, 4, B,
                    RunOptions(loss="last", backward=True)).scratch == {"Y0", "L0"}
    assert run_plan(gen, SIZES, 4, B, RunOptions(store_all=True)).scratch == set()
    assert run_plan(gen, SIZES, 4, B, RunOptions(store_all=True, backward=True, x_grad=False)).scratch == {"L0"}
    assert run_plan(gen, SIZES, 4, B, RunOptions()).scratch == {"Y0"}  # forward only: no adjoints
    assert run_plan(gen, SIZES, 4, B - 1, train).scratch == set()
    assert run_plan(gen, SIZES, 4, B, train).scratch_candidates == {"Y0", "L0"}


def test_run_plan_stored_values() -> None:
    """Minimal runs keep the nodes BPTT reads and the groups with such a member; trajectories keep all."""
    gen = _fake_gen(groups=[Group(0, False, "h", ("c",), ("C",), ("n",), "n"),
                            Group(1, False, "q", ("d",), ("D",), ("n",), "n"),
                            Group(0, True, "x", ("e",), ("E",), ("n",), "m")], needed={"q", "d"})
    minimal = run_plan(gen, SIZES, 4, 2, RunOptions(loss="last", backward=True))
    assert minimal.stored_nodes == {"q"} and minimal.stored_groups == {1}
    full = run_plan(gen, SIZES, 4, 2, RunOptions(store_all=True))
    assert full.stored_nodes == {"p", "q", "r"} and full.stored_groups == {0, 1}


def test_run_plan_routes_read_the_sizes_of_every_extent() -> None:
    """Each site's extents are evaluated with the call's sizes: T, B, o, loss rows (T*B for the
    per-step loss), the state dimension, named dimensions and stacked widths (R0 = n, RS0 = n + 1)."""
    sites = [GemmSite(0, "r.rows", 0, 0, "rows", "c.RS0", "c.R0"), GemmSite(1, "r.o", 0, 0, "c.o", "c.D0", "n"),
             GemmSite(2, "r.t", 1, 0, "B", "B", "B"), GemmSite(3, "r.tb", 0, 1, "B", "B", "B"),
             GemmSite(4, "r.tb2", 0, 0, "c.T*c.B", "c.D1", "c.D1")]
    gen = _fake_gen(gemm_sites=sites)
    pol = Policy(small_gemm=100)
    T, B = 4, 5
    last = run_plan(gen, SIZES, T, B, RunOptions(loss="last"), o=4, policy=pol)
    step = run_plan(gen, SIZES, T, B, RunOptions(loss="step"), o=4, policy=pol)
    # rows x RS0 x R0: last 5*6*5 = 150 > 100 (BLAS), step 20*6*5 = 600 (BLAS); o rows = 4 x 5 x 5 = 100: loops
    # T*B x m x m = 20*3*3 = 180: BLAS
    assert last.routes == (0, 1, 0, 0, 0) and last.route_applies == (True, True, False, False, True)
    assert step.routes == (0, 1, 0, 0, 0)
    few = run_plan(gen, SIZES, T, B, RunOptions(loss="last"), o=3, policy=pol)  # 3 rows: loops at any size
    assert few.routes[1] == 1
    assert run_plan(gen, {1: 1, "n": 1, "m": 3}, 1, 1, RunOptions(loss="last"), o=4, policy=pol).routes[0] == 1
    assert run_plan(gen, SIZES, T, B, RunOptions(loss="last"), o=4, policy=Policy(small_gemm=10**9)).routes == (1, 1, 0, 0, 1)


def test_run_plan_decisions_list() -> None:
    """decisions(): one entry per decision, transposed products left out (always BLAS)."""
    sites = [GemmSite(0, "forward.group", 0, 0, "B", "c.R0", "c.D0"), GemmSite(1, "bptt.weight_gradient", 1, 0, "B", "B", "B")]
    rp = run_plan(_fake_gen(gemm_sites=sites), SIZES, 4, 9, RunOptions(loss="last", backward=True, x_grad=False))
    assert rp.decisions() == [("wgrad_per_step", "", True), ("input_products_per_step", "", True),
                              ("static_wgrad", "RS0", "per_step"), ("route:forward.group", "#0", "loops"),
                              ("scratch_row", "L0", True), ("scratch_row", "Y0", True)]
    none = run_plan(_fake_gen(input_products_in_loop=False, gemm_sites=sites), SIZES, 4, 2, RunOptions())
    assert [k for k, _i, _v in none.decisions()] == ["wgrad_per_step", "static_wgrad", "route:forward.group",
                                                     "scratch_row", "scratch_row"]
    kp = KernelPlan([("fused_loop", "step1", True)], rp)
    assert kp.decisions() == [("fused_loop", "step1", True)] + rp.decisions()
    lines = str(kp).splitlines()
    assert len(lines) == len(kp.decisions())
    assert lines[0].split() == ["fused_loop", "step1", "True"] and lines[1].split() == ["wgrad_per_step", "True"]


def test_run_plan_of_a_real_program() -> None:
    """fc_static_chain at B = 9: its static part has a loop, so no per-step input products; RS1
    (shared adjoint) accumulates per step, RS0 (read by the static e) over the whole sequence."""
    gen = generate(feature_cell("fc_static_chain"), "float64")
    rp = run_plan(gen, {1: 1, "n": 5, "m": 3, "k": 4}, 6, 9, RunOptions(loss="step", backward=True))
    assert rp.input_products_per_step is None and rp.static_wgrad == {0: "whole", 1: "per_step"}
    assert rp.stored_nodes == {"1-phi^2"} and rp.stored_groups == set() and rp.scratch == set()


def test_run_plan_default_readout_has_one_output() -> None:
    """Without ``o``, the readout has one row: a B x o x n product is 5 x 1 x 5 = 25 multiply-adds."""
    gen = _fake_gen(gemm_sites=[GemmSite(0, "r", 0, 0, "B", "c.o", "n")])
    assert run_plan(gen, SIZES, 4, 5, RunOptions(loss="last"), policy=Policy(small_gemm=25)).routes == (1,)
    assert run_plan(gen, SIZES, 4, 5, RunOptions(loss="last"), o=2, policy=Policy(small_gemm=25)).routes == (0,)


def test_options_policies_and_sites_are_values() -> None:
    """RunOptions() is a forward-only call (the input gradient wanted once BPTT runs); options,
    policies and sites are immutable values (usable as keys, never changed under a kernel)."""
    import dataclasses

    assert RunOptions() == RunOptions(loss=None, backward=False, jvp=False, cotangents=False, store_all=False, x_grad=True)
    assert Policy() == Policy(step_min_batch=STEP_WGRAD_MIN_B)
    site = GemmSite(0, "r", 0, 0, "B", "B", "B")
    from symgate._codegen import Slot

    for value in (RunOptions(), Policy(), site, Group(0, True, "x", ("a",), ("A",), ("n",), "m"), Slot("X", "x", "x", ("T",))):
        assert hash(value) == hash(dataclasses.replace(value))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)


def test_decision_tables_list_exactly_the_values_taken() -> None:
    """STRUCTURAL_VALUES and DECISION_VALUES say which values each kind of decision takes: every
    value the hand-analysed cells and run plans above take is listed, and every listed value is taken."""
    from symgate._codegen import DECISION_VALUES, STRUCTURAL_VALUES

    seen: dict[str, set] = {}
    for name in ("fc_static_chain", "fc_scalar_gate", "fc_vector_recurrence", "fc_matrix_first", "fc_input_elementwise"):
        for kind, _i, value in structural_decisions(cell_plan(feature_cell(name))):
            seen.setdefault(kind, set()).add(value)
    assert {k: set(v) for k, v in STRUCTURAL_VALUES.items()} == seen
    sites = [GemmSite(0, "forward.group", 0, 0, "B", "c.D0", "c.D0")]
    runs = [run_plan(_fake_gen(gemm_sites=sites), SIZES, 4, B, RunOptions(loss="last", backward=True, x_grad=False),
                     policy=pol) for B in (2, 9) for pol in (Policy(small_gemm=0), Policy())]
    seen = {}
    for rp in runs:
        for kind, _i, value in rp.decisions():
            seen.setdefault(kind.split(":")[0], set()).add(value)
    assert {k: set(v) for k, v in DECISION_VALUES.items()} == seen


def test_extent_rejects_unknown_sizes() -> None:
    assert extent("c.T * c.B * 3", {"T": 2, "B": 5}) == 30
    with pytest.raises(ShapeError, match="Q"):
        extent("c.Q", {"T": 2})


# ----------------------------------------------------------------------------- layout


def test_static_chain_slots_follow_the_identifier_scheme() -> None:
    """Slots of fc_static_chain (params W, U1, U2, b; nodes phi, 1-phi^2; static nodes e, 1-e^2;
    static groups 0 (x), 1 (e); state group 0 (h)), in run's order, from the layout's scheme."""
    slots, n_inputs = Layout(cell_plan(feature_cell("fc_static_chain"))).slots()
    RS0, RS1, R0 = ("RS", 0), ("RS", 1), ("R", 0)
    expected = [
        ("X", "x", ("T", "B", "m")), ("M0", "param", ("n", "n")), ("M1", "param", ("k", "m")),
        ("M2", "param", ("n", "k")), ("P0", "param", ("k",)), ("H0", "h0", ("B", "n")), ("LV", "loss_V", ("o", "n")),
        ("LY", "loss_y", ()), ("C0", "cot", ("T", "B", "n")),
        # forward
        ("S0", "state", ("T+1", "B", "n")), ("N0", "node", ("T", "B", "n")), ("N1", "node", ("T", "B", "n")),
        ("Q0", "static", ("T", "B", "k")), ("Q1", "static", ("T", "B", "k")),
        ("U0", "stack", (RS0, "m")), ("UT0", "stack_t", ("m", RS0)), ("Y0", "static_group", ("T", "B", RS0)),
        ("U1", "stack", (RS1, "k")), ("UT1", "stack_t", ("k", RS1)), ("Y1", "static_group", ("T", "B", RS1)),
        ("W0", "stack", (R0, "n")), ("WT0", "stack_t", ("n", R0)), ("Z0", "group", ("T", "B", R0)),
        # backward: phi's adjoint is a register, 1-phi^2 a companion: no A*; e's adjoint is QA0
        ("CA0", "carry", ("B", "n")), ("CN0", "carry2", ("B", "n")), ("QA0", "static_adj", ("T", "B", "k")),
        ("YA0", "static_group_adj", ("T", "B", RS0)), ("GU0", "grad_stack", (RS0, "m")),
        ("YA1", "static_group_adj", ("T", "B", RS1)), ("GU1", "grad_stack", (RS1, "k")),
        ("L0", "group_adj", ("T", "B", R0)), ("GW0", "grad_stack", (R0, "n")),
        ("GX", "grad_x", ("T", "B", "m")), ("GP0", "grad", ("k",)), ("GV", "grad_V", ("o", "n")), ("LR", "loss_res", ()),
        # tangents
        ("TX", "tan_x", ("T", "B", "m")), ("TM0", "tan_param", ("n", "n")), ("TM1", "tan_param", ("k", "m")),
        ("TM2", "tan_param", ("n", "k")), ("TP0", "tan_param", ("k",)), ("TH0", "tan_h0", ("B", "n")),
        ("TS0", "tan_state", ("T+1", "B", "n")), ("TN0", "tan_node", ("B", "n")), ("TN1", "tan_node", ("B", "n")),
        ("TQ0", "tan_static", ("T", "B", "k")), ("TQ1", "tan_static", ("T", "B", "k")),
        ("TU0", "tan_stack", (RS0, "m")), ("TY0", "tan_static_group", ("T", "B", RS0)),
        ("TU1", "tan_stack", (RS1, "k")), ("TY1", "tan_static_group", ("T", "B", RS1)),
        ("TW0", "tan_stack", (R0, "n")), ("TWT0", "tan_stack_t", ("n", R0)), ("TZ0", "tan_group", ("B", R0)),
    ]
    assert [(s.code, s.role, s.shape) for s in slots] == expected
    assert n_inputs == 9
    keys = {s.code: s.key for s in slots}
    assert (keys["M1"], keys["P0"], keys["N1"], keys["Q0"], keys["QA0"], keys["C0"]) == ("U1", "b", "1-phi^2", "e", "e", "h")
    assert keys["Y1"].source == "e" and keys["Z0"].source == "h" and keys["GX"] is None


def test_scalar_slots_and_one_unit_nodes() -> None:
    """fc_scalar_gate: the scalar c is p0 (shape ()), its gradient and tangent one element; g (one
    unit, a buffer adjoint) is A0 of shape (B, 1); one-row matrices keep their 1."""
    slots, _ = Layout(cell_plan(feature_cell("fc_scalar_gate"))).slots()
    shape = {s.code: s.shape for s in slots}
    assert (shape["M0"], shape["M1"], shape["p0"], shape["Gp0"], shape["Tp0"]) == ((1, "n"), (1, "m"), (), (1,), (1,))
    assert shape["N0"] == ("T", "B", 1) and shape["A0"] == ("B", 1) and shape["TN0"] == ("B", 1)
    assert not any(s.code.startswith(("P", "GP", "TP", "Q", "QA")) for s in slots)
    assert [s.code for s in slots if s.role == "adj"] == ["A0"]


def test_integer_parameters_and_their_fields() -> None:
    """ints(): sizes, stacked widths, strides of every (T, B, .) array a run may shrink to one row,
    the cotangent flags, the two run-plan flags, one route per site; int_field names each."""
    lay = Layout(cell_plan(feature_cell("fc_static_chain")))
    ints = lay.ints(2)
    assert ints == [("T",), ("B",), ("o",), ("dim", "n"), ("dim", "m"), ("dim", "k"), ("R", 0), ("RS", 0), ("RS", 1),
                    ("stride", "N0"), ("stride", "N1"), ("stride", "Z0"), ("stride", "Y0"), ("stride", "Y1"),
                    ("stride", "L0"), ("has_cot", 0), ("flag", "xstep"), ("flag", "wstep"), ("route", 0), ("route", 1)]
    assert [lay.int_field(it) for it in ints] == ["T", "B", "o", "D0", "D1", "D2", "R0", "RS0", "RS1", "stN0", "stN1",
                                                  "stZ0", "stY0", "stY1", "stL0", "has_cot0", "xstep", "wstep", "rt0", "rt1"]
    two = Layout(cell_plan(feature_cell("fc_two_state")))
    assert [it for it in two.ints(0) if it[0] == "has_cot"] == [("has_cot", 0), ("has_cot", 1)]


def test_layout_offsets_and_sizes_evaluate_to_the_stacked_positions() -> None:
    """Member k of a stacked group starts after the rows of the members before it."""
    plan = cell_plan(feature_cell("fc_scalar_gate"))
    lay = Layout(plan)
    env = {"D0": 5, "D1": 3}
    (gs,), (gd,) = plan.static_groups, plan.dynamic_groups
    assert [eval(lay.offset(gd, k), {}, env) for k in range(2)] == [0, 1]  # rows (1, n)
    two = Layout(cell_plan(feature_cell("fc_two_state")))
    g0 = two.plan.dynamic_groups[0]
    assert [eval(two.offset(g0, k), {}, env) for k in range(2)] == [0, 5]
    assert two.member_offset("z_Wc") == (g0, "D0") and two.member_offset("z_Wf") == (g0, "0")
    assert (lay.rows(gs), lay.rows(gd)) == ("RS0", "R0")
    assert lay.ctx_dim(1) == "1" and lay.ctx_dim("m") == "c.D1" and lay.dim_code[1] == "1"
    assert lay.node_id("g") == "N0" and lay.node_id("phi") == "N2"
    assert Layout(cell_plan(feature_cell("fc_static_chain"))).node_id("e") == "Q0"


# ----------------------------------------------------------------------------- access


def _index_value(code: str, **env: int) -> tuple[str, int]:
    """Pointer name and the value of the index of ``ptr[index]``."""
    m = re.fullmatch(r"(\w+)\[(.*)\]", code)
    assert m, code
    return m.group(1), eval(m.group(2), {}, env)


def test_at_is_row_times_leading_dimension_plus_offset_plus_unit() -> None:
    assert _index_value(at("p", "D0", "0", "n"), b=3, i=2, D0=5) == ("p", 17)
    assert _index_value(at("p", "R0", "D1", "n"), b=3, i=2, R0=9, D1=4) == ("p", 33)
    assert _index_value(at("p", "R0", "D1", 1), b=3, i=2, R0=9, D1=4) == ("p", 31)  # one unit: no i
    assert _index_value(at("p", "1", "0", 1), b=3, i=2) == ("p", 3)
    assert _index_value(at("p", "D0", "0", "n", "j"), b=1, j=4, D0=5) == ("p", 9)


def test_ctx_expr_reads_sizes_from_the_context_struct() -> None:
    c = SimpleNamespace(D0=5, D1=3)
    assert eval(ctx_expr("D0 + D1 + 1 + 2"), {"c": c}) == 11
    assert eval(ctx_expr("D1"), {"c": c}) == 3
    assert target_block(("step", "L0", "R0", "D0"), {"L0": "c.L0 + t"}) == ("c.L0 + t + c.D0", "c.R0")
    assert target_block(("acc", "GX", "D1", "0"), {"GX": "c.GX"}) == ("c.GX", "c.D1")
    assert target_block(("acc", "GP0", "0", "0"), {"GP0": "c.GP0"})[1] == "1"


def test_where_each_adjoint_accumulates() -> None:
    """Adjoint kinds by what a value is: registers, per-step buffers, accumulators over all steps,
    scalars, none for constants and for a static group sharing its twin's buffer."""
    em = Emitter(cell_plan(feature_cell("fc_scalar_gate")), np.dtype("float64"))
    fn = FnParams()
    kinds = {nm: (em.adjoint(nm, fn, "bwd") or (None,))[0] for nm in ("phi", "g", "h", "x", "c", "z_W", "z_U")}
    assert kinds == {"phi": "local", "g": "step", "h": "step", "x": "acc", "c": "scalar", "z_W": "step", "z_U": None}
    assert em.adjoint("h", FnParams(), "bwd")[1:] == ("CN0", "D0", "0")
    assert em.adjoint("z_W", FnParams(), "bwd")[2:] == ("R0", "1")  # after the one-row member
    vr = Emitter(cell_plan(feature_cell("fc_vector_recurrence")), np.dtype("float64"))
    assert vr.adjoint("alpha", FnParams(), "bwd") is None and vr.adjoint("b", FnParams(), "bwd")[0] == "acc"
    assert float(vr.value("alpha", FnParams(), "fwd", {})) == 0.7  # a constant prints as its value
    assert vr.value("alpha", FnParams(), "fwd", {}, tangent=True) is None
    ch = Emitter(cell_plan(feature_cell("fc_static_chain")), np.dtype("float64"))
    assert ch.adjoint("e", FnParams(), "static")[:2] == ("step", "QA0")
    assert ch.adjoint("z_U2", FnParams(), "static") is None and ch.adjoint("z_U1", FnParams(), "static")[1] == "YA0"


def test_value_accessors_pass_the_step_rows() -> None:
    """In a time step, values are read at row t*B (inputs, static arrays) or t*stride (nodes, groups)."""
    em = Emitter(cell_plan(feature_cell("fc_static_chain")), np.dtype("float64"))
    fn = FnParams()
    assert em.value("b", fn, "static", {}) == "P0[i]"
    assert em.value("phi", fn, "fwd", {"phi": "v0"}) == "v0"
    code = em.value("z_W", fn, "fwd", {})
    assert _index_value(code, b=2, i=1, R0=5) == ("Z0", 11)
    assert fn.ptrs["Z0"] == "c.Z0 + t*c.stZ0" and fn.ptrs["P0"] == "c.P0"
    fs = FnParams()
    em.value("e", fs, "fwd", {})
    em.value("z_U1", fs, "static", {})
    assert fs.ptrs == {"Q0": "c.Q0 + t*B*c.D2", "Y0": "c.Y0"}
    sg_ = Emitter(cell_plan(feature_cell("fc_scalar_gate")), np.dtype("float64"))
    fp = FnParams()
    assert sg_.value("c", fp, "fwd", {}) == "p0" and fp.vals == {"p0": "c.p0[0]"}


# ----------------------------------------------------------------------------- printer

U, V = sympy.symbols("u v")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


PY_FUNCTIONS = {"sg_sigmoid": _sigmoid, "sg_tanh": math.tanh, "sg_softplus": lambda x: math.log1p(math.exp(x)),
                "sg_sech2": lambda x: 1.0 / math.cosh(x) ** 2, "exp": math.exp, "expf": math.exp, "log": math.log,
                "logf": math.log, "pow": math.pow, "powf": math.pow, "sqrt": math.sqrt, "sqrtf": math.sqrt}


def _run_c(code: str, **env: float) -> float:
    """A printed C expression evaluated in Python (the same operators; casts to real removed)."""
    return float(eval(code.replace("<real>", ""), dict(PY_FUNCTIONS), env))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_printed_expressions_evaluate_to_the_formula(dtype: str) -> None:
    """Printed code computes the expression: gates as the kernel's helpers, rationals as real
    divisions (not C integer division), small powers and large ones, constants."""
    pr = KernelPrinter(np.dtype(dtype))
    pr.access = {U: "uu", V: "vv"}
    e = (Sigmoid(U) * sympy.tanh(V) + sympy.Rational(1, 3) * U**3 - 2 * U / V + Sech2(V) + Softplus(U)
         + sympy.Float(0.25) * V**2 + sympy.exp(U) - sympy.log(1 + V**2) + U**7 + sympy.Rational(-2, 3))
    u, v = 0.3, -1.7
    want = (_sigmoid(u) * math.tanh(v) + u**3 / 3 - 2 * u / v + 1 / math.cosh(v) ** 2 + math.log1p(math.exp(u))
            + 0.25 * v**2 + math.exp(u) - math.log(1 + v**2) + u**7 - 2 / 3)
    # both are double evaluations of the same formula in a different order: a few ulps of the terms (~10)
    assert _run_c(pr.code(e), uu=u, vv=v) == pytest.approx(want, rel=1e-13)
    for k, val in ((0, 0.0), (1, 1.0), (-1, -1.0), (3, 3.0)):
        assert _run_c(pr.code(sympy.Integer(k))) == val
    assert _run_c(pr.code(sympy.Rational(1, 2) * U), uu=3.0) == 1.5


def test_float32_literals_are_cast_and_float64_literals_are_not() -> None:
    p32, p64 = KernelPrinter(np.dtype("float32")), KernelPrinter(np.dtype("float64"))
    for e in (sympy.Integer(2), sympy.Float(2.5), sympy.Rational(2, 3), sympy.S.One, sympy.S.Zero, sympy.S.NegativeOne):
        assert p32.code(e).startswith("(<real>") and "<real>" not in p64.code(e)
    assert "F" not in p32.code(sympy.Float(2.5))  # Cython knows no 2.5F literal
    p32.access = p64.access = {U: "uu"}
    assert p32.code(sympy.exp(U)) == "expf(uu)" and p64.code(sympy.exp(U)) == "exp(uu)"  # the type-alias table


def test_small_integer_powers_print_as_products() -> None:
    """Powers up to the fourth are multiplications (no pow call in the loop), higher ones pow()."""
    pr = KernelPrinter(np.dtype("float64"))
    pr.access = {U: "uu"}
    for k in (2, 3, 4):
        code = pr.code(U**k)
        assert "pow" not in code and code.count("uu") == k and _run_c(code, uu=1.5) == 1.5**k
    assert "pow(" in pr.code(U**5) and _run_c(pr.code(U**5), uu=1.5) == 1.5**5


def test_printer_symbols() -> None:
    """Bound symbols print as their code, CSE temporaries as their names, others are an error."""
    pr = KernelPrinter(np.dtype("float64"))
    pr.access = {U: "X[b]"}
    t = sympy.Symbol(CSE_PREFIX + "3")
    assert pr.code(U + t) in ("X[b] + _c3", "_c3 + X[b]")
    with pytest.raises(CellSpecError, match="'v'"):
        pr.code(U + V)
    repl, red = cse([sympy.exp(U) * V + sympy.exp(U), sympy.exp(U)])
    assert [s.name for s, _ in repl] == ["_c0"] and repl[0][1] == sympy.exp(U)
    assert red == [repl[0][0] * V + repl[0][0], repl[0][0]]


# ----------------------------------------------------------------------------- compiled


@sg.cell
def omnibus(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"), Ug: sg.Matrix("n", "m"),
            bg: sg.Vector("n"), wr: sg.Matrix(1, "n"), s: sg.Scalar(), theta: sg.Scalar(), v: sg.Vector("n"),
            b: sg.Vector("n")):
    """Paths the feature pool's fast cases take rarely, in one cell: a one-unit static loop of a scalar
    parameter, a static gate with a bias read in the loop, a one-unit gate of the state feeding a
    product of the gated state, a vector parameter on the state, a scalar on the state, a division,
    a bias whose gradient is the column sum of the second member of a stacked group."""
    a = sg.sigmoid(theta)
    g = sg.sigmoid(Ug @ x + bg)
    r = sg.sigmoid(wr @ h)
    phi = sg.tanh(W @ (r * h) + U @ x + v * h + b)
    return (1 - g) * s * h + g * a * phi / (1 + phi * phi)


def test_omnibus_plan_typed_by_hand() -> None:
    """The static part is the stacked input products then two loops (one unit, then n units); the
    step is r's product, r's one-unit loop, u = r*h, u's product, the loop of phi and h'.  Only phi's
    adjoint is a register; RS0 (two members) cannot share R1's (one member); v's partial is its own,
    b's (sech2) is that of z_U and z_W, both read by phi only: a column sum of one of their adjoints."""
    plan = cell_plan(omnibus)
    assert _ops(plan.static_ops) == [("gemm", ["z_Ug", "z_U"], None), ("loop", ["a", "1-a"], 1), ("loop", ["g", "1-g"], "n")]
    assert _ops(plan.dynamic_ops) == [("gemm", ["z_wr"], None), ("loop", ["r", "1-r"], 1), ("loop", ["u"], "n"),
                                      ("gemm", ["z_W"], None), ("loop", ["phi", "1-phi^2", "h'"], "n")]
    assert plan.register_adjoints == {"phi"} and plan.shared_adjoint == {}
    assert set(plan.column_sums) == {("phi", "b")} and plan.column_sums[("phi", "b")] in ("z_U", "z_W")
    assert plan.needed == {"r", "1-r", "u", "phi", "1-phi^2"}
    assert plan.static_wgrad_in_loop(plan.static_groups[0]) is False


@pytest.mark.parametrize("B, policy", [(2, Policy()), (STEP_WGRAD_MIN_B + 1, Policy(small_gemm=0))])
def test_omnibus_compiled_agrees_with_the_reference(B: int, policy: Policy) -> None:
    """Every entry point (forward, both losses, vjp, jvp, prepared steps), workspaces poisoned with NaN,
    a small batch (whole-sequence products, plain loops) and a large one (per-step products, BLAS)."""
    from symgate.testing._differential import compare_backends

    diffs = compare_backends(omnibus, {"n": 3, "m": 2}, T=4, B=B, seed=B, policy=policy, prepared_calls=2)
    # the tolerance is the differential tests' rounding bound (symgate.testing._differential)
    bad = [f"{d.what}: {d.error:.2e} > {d.tolerance:.2e}" for d in diffs if not d.passed]
    assert diffs and not bad, bad


@sg.cell
def chained(h: sg.State("n"), x: sg.Input("m"), W1: sg.Matrix("k", "n"), W2: sg.Matrix("n", "k"), U1: sg.Matrix("k", "m"),
            U2: sg.Matrix("n", "k")):
    """Products of products: a group whose source is another group's member, in the static part
    (U2 (U1 x)) and in the time step (W2 (W1 h)).  Planned only: ``jacobian()`` (which the
    generated module's header prints) does not handle a Linear node reading a Linear node yet."""
    return sg.tanh(W2 @ (W1 @ h) + U2 @ (U1 @ x))


def test_chained_products_plan_typed_by_hand() -> None:
    """Four one-member groups, each reading the previous product; the static part is products only,
    so it may run per step, but U1 x is read by BPTT (the weight gradient of U2 needs it at every
    step): only U2 (U1 x), read by the forward step alone, may be one reused row.  U2's adjoint is
    W2's (both products are read by the tanh only, with the same partial)."""
    plan = cell_plan(chained)
    assert [(g.static, g.source, g.members) for g in plan.groups] == [
        (True, "x", ("z_U1",)), (True, "z_U1", ("z_U2",)), (False, "h", ("z_W1",)), (False, "z_W1", ("z_W2",))]
    assert [op.kind for op in plan.static_ops] == ["gemm", "gemm"] and plan.input_products_in_loop() is True
    assert [plan.scratch_input_products(g) for g in plan.static_groups] == [False, True]
    assert {k: g.index for k, g in plan.shared_adjoint.items()} == {1: 1}
    assert plan.needed == {"1-phi^2", "z_W1"}  # the source of W2's product, and the tanh's partial
    assert [plan.static_wgrad_in_loop(g) for g in plan.static_groups] == [False, True]
