"""The generator's passes on their own: plan, run plan, printer, and the shape of the package.

The differential tests (``test_differential.py``) check what the kernels compute; these
tests pin what the generator decides, and the properties of the generated text that no
numerical tolerance can see (a float32 literal promoted to double changes results by far
less than any tolerance).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import symgate as sg
from symgate._codegen import SMALL_GEMM, GemmSite, Policy, RunOptions, cell_plan, generate, run_plan, structural_decisions
from symgate._codegen.runplan import extent
from symgate.testing._feature_cells import FEATURES, feature_cell

PACKAGE = pathlib.Path(sg.__file__).parent / "_codegen"
LOOP_FUNCTION = re.compile(r"^cdef (?:int|void) (s?fw|s?bw|s?jv)\d+\(")


def _elementwise_lines(source: str) -> list[str]:
    """The body lines of the generated elementwise loop functions."""
    out, inside = [], False
    for line in source.splitlines():
        if line.startswith("cdef "):
            inside = bool(LOOP_FUNCTION.match(line))
            continue
        if inside and line.startswith("            ") and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def _uncast_literals(line: str) -> list[str]:
    """Numeric literals of a line that are not cast to the kernel's real type (subscripts excluded)."""
    code = re.sub(r"\[[^\[\]]*\]", "[]", line)
    code = code.split("=", 1)[1] if "=" in code else code
    return [m.group(0) for m in re.finditer(r"(?<![\w.])\d+(\.\d*)?([eE][-+]?\d+)?[fFlL]?(?![\w.])", code)
            if not re.search(r"<real>\(*$", code[:m.start()])]


@pytest.mark.parametrize("name", sorted(FEATURES) + sorted(sg.cells.BUILTIN))
def test_float32_elementwise_code_has_no_double_literal(name: str) -> None:
    """Every literal in float32 elementwise code is cast to real: a bare ``2.0`` or ``1`` would
    promote the arithmetic around it to double (Cython prints an integer next to a float as a
    double literal), silently changing the kernel's precision."""
    cell = feature_cell(name) if name in FEATURES else sg.testing.cached_builtin(name)
    lines = _elementwise_lines(generate(cell, "float32").source)
    assert lines
    bad = [(ln, lit) for ln in lines if not ln.startswith(("bad |=", "return")) for lit in _uncast_literals(ln)]
    assert not bad, bad[:5]


def test_float64_literals_are_plain() -> None:
    lines = _elementwise_lines(generate(feature_cell("fc_arithmetic"), "float64").source)
    assert not any("<real>" in ln for ln in lines)
    assert any(_uncast_literals(ln) for ln in lines)  # the check above would see literals


def _site(ta: int = 0, tb: int = 0, M: str = "B", N: str = "c.D0", K: str = "c.D1") -> GemmSite:
    return GemmSite(0, "test", ta, tb, M, N, K)


def test_route_threshold_is_inclusive_and_four_rows_go_to_blas() -> None:
    from symgate._codegen.runplan import _route

    env = {"B": 8, "D0": 32, "D1": 96}  # 8 * 32 * 96 = 24576 = SMALL_GEMM
    assert env["B"] * env["D0"] * env["D1"] == SMALL_GEMM
    policy = Policy()
    assert _route(_site(), env, policy) == (1, True)  # at the threshold: plain loops
    assert _route(_site(), {**env, "D1": 97}, policy) == (0, True)  # one more multiply-add row: BLAS
    assert _route(_site(), {"B": 3, "D0": 1000, "D1": 1000}, policy) == (1, True)  # fewer than 4 rows
    assert _route(_site(ta=1), {"B": 1, "D0": 1, "D1": 1}, policy) == (0, False)  # transposed: BLAS, no decision
    assert _route(_site(tb=1), {"B": 1, "D0": 1, "D1": 1}, policy) == (0, False)
    assert _route(_site(), {"B": 4, "D0": 1, "D1": 1}, Policy(small_gemm=0)) == (0, True)


def test_extent_of_size_expressions() -> None:
    env = {"T": 5, "B": 7, "RS0": 12, "D1": 3}
    assert extent("c.T*c.B", env) == 35
    assert extent("B", env) == 7
    assert extent("c.RS0", env) == 12
    assert extent("1", env) == 1
    assert extent("c.D1 * 2", env) == 6


def test_batch_threshold_of_per_step_products() -> None:
    cell = sg.testing.cached_builtin("vector_gate")
    gen = generate(cell, "float64")
    sizes = {1: 1, "n": 4, "m": 2}
    train = RunOptions(loss="last", backward=True, x_grad=False)
    for B, per_step in ((7, False), (8, True)):
        rp = run_plan(gen, sizes, 5, B, train)
        assert rp.wgrad_per_step is per_step and rp.input_products_per_step is per_step
        assert (rp.static_wgrad[0] == "per_step") is per_step
        assert ("Y0" in rp.scratch) is per_step
    assert not run_plan(gen, sizes, 5, 9, RunOptions(store_all=True)).scratch  # a trajectory keeps every row
    assert run_plan(gen, sizes, 5, 9, train, policy=Policy(step_min_batch=10)).wgrad_per_step is False


def test_vector_gate_plan_typed_by_hand() -> None:
    """The structural decisions for h' = (1-g) h + g tanh(W h + U x + b), g = sigmoid(Wg h + Ug x + c)."""
    cell = sg.testing.cached_builtin("vector_gate")
    plan = cell_plan(cell)
    assert [(g.static, g.source, set(g.members)) for g in plan.groups] == [
        (True, "x", {"z_U", "z_Ug"}), (False, "h", {"z_W", "z_Wg"})]
    assert plan.shared_adjoint[0].index == 0  # U x and W h are read by the same owners with the same partials
    assert plan.column_sums == {("g", "c"): "z_Wg", ("phi", "b"): "z_W"}
    assert plan.register_adjoints == {"g", "phi"}
    assert plan.companions == {"1-g", "1-phi^2"}
    assert plan.needed >= {"g", "phi", "1-g", "1-phi^2"}
    decisions = {(kind, inst): v for kind, inst, v in structural_decisions(plan)}
    assert decisions[("static_products_only", "")] is True
    assert decisions[("scratch_eligible", "L0")] is False  # the bias column sums read the adjoints after the loop


def test_input_only_gate_keeps_its_weight_gradient_out_of_the_loop() -> None:
    """The plan decision behind the regression of test_differential: the static group of U_g x
    feeds a state-independent node, so its adjoint rows are complete only after the loop."""
    plan = cell_plan(feature_cell("fc_xgate"))
    (g,) = plan.static_groups
    assert not plan.static_wgrad_in_loop(g)
    rp = run_plan(generate(feature_cell("fc_xgate"), "float64"), {1: 1, "n": 3, "m": 2}, 4, 17,
                  RunOptions(loss="last", backward=True))
    assert rp.static_wgrad == {0: "whole"} and rp.wgrad_per_step


def test_codegen_functions_fit_on_a_screen() -> None:
    """The generator is small passes: no function of the package is over 80 lines."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
