"""Bad input gets a clear symgate error: the specific subclass, and a message that
names the offending argument or value.
"""

import math
import re

import numpy as np
import pytest
import sympy

import symgate as sg
from symgate import (
    CellSpecError,
    DTypeError,
    InvalidNameError,
    NonFiniteError,
    ShapeError,
    StateIndependenceError,
    SymgateError,
    UnsupportedFunctionError,
)

SPECS = {"h": sg.State("n"), "x": sg.Input("m"), "W": sg.Matrix("n", "n"), "U": sg.Matrix("n", "m")}


def make(body, specs=None, **kw):
    return sg.make_cell(body, SPECS if specs is None else specs, **kw)


def pre(h, x, W, U):
    return W @ h + U @ x


def rx(text: str) -> str:
    return re.escape(text)


# ============================================================================
# the error hierarchy itself
# ============================================================================


@pytest.mark.parametrize(
    "err,builtin",
    [
        (CellSpecError, ValueError),
        (InvalidNameError, CellSpecError),
        (UnsupportedFunctionError, CellSpecError),
        (StateIndependenceError, CellSpecError),
        (ShapeError, ValueError),
        (DTypeError, TypeError),
        (NonFiniteError, ValueError),
    ],
)
def test_error_hierarchy(err, builtin):
    assert issubclass(err, SymgateError)
    assert issubclass(err, builtin)


# ============================================================================
# cell specs: annotations and specs
# ============================================================================


def test_argument_without_annotation():
    def f(h: sg.State("n"), x):
        return sg.tanh(h)

    with pytest.raises(CellSpecError, match=r"cell 'f': argument\(s\) \['x'\] have no spec"):
        sg.cell(f)


def test_lambda_without_any_annotation():
    with pytest.raises(CellSpecError, match=rx("['h', 'x']")):
        sg.cell(lambda h, x: h)


def test_unknown_spec_type():
    def f(h: sg.State("n"), x: int):
        return sg.tanh(h)

    with pytest.raises(CellSpecError, match=r"argument 'x' has spec <class 'int'>"):
        sg.cell(f)


def test_unknown_spec_object_through_make_cell():
    with pytest.raises(CellSpecError, match=r"argument 'x' has spec <object object"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)), {**SPECS, "x": object()})


def test_matrix_spec_class_instead_of_instance():
    # State/Input/Vector/Scalar may be given as classes (defaults); Matrix needs its shape
    with pytest.raises(CellSpecError, match=r"argument 'W' has spec <class 'symgate._cell.Matrix'>"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)), {**SPECS, "W": sg.Matrix})


def test_string_annotation_that_cannot_be_evaluated():
    # string annotations are evaluated in the defining module; a typo must be reported
    def f(h: sg.State("n"), x: "sg.Inptu('m')"):
        return sg.tanh(h)

    with pytest.raises(CellSpecError, match=r"cannot evaluate the annotations of 'f': AttributeError: .*'Inptu'"):
        sg.cell(f)


def test_string_annotation_naming_an_unknown_variable():
    def f(h: sg.State("n"), x: "Input('m')"):  # noqa: F821 - deliberately undefined here
        return sg.tanh(h)

    with pytest.raises(CellSpecError, match=r"cannot evaluate the annotations of 'f': NameError: .*'Input'"):
        sg.cell(f)


def test_string_annotation_that_is_not_a_spec():
    def f(h: sg.State("n"), x: "int"):
        return sg.tanh(h)

    with pytest.raises(CellSpecError, match=r"argument 'x' has spec <class 'int'>"):
        sg.cell(f)


def test_make_cell_missing_spec():
    with pytest.raises(CellSpecError, match=rx("['x', 'W', 'U'] have no spec")):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)), {"h": sg.State()})


def test_make_cell_spec_for_unknown_argument_with_invalid_name():
    with pytest.raises(CellSpecError, match=rx("unknown argument(s) ['x y']")):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)), {**SPECS, "x y": sg.Input()})


def test_make_cell_body_not_callable():
    with pytest.raises(CellSpecError, match="must be callable, got int"):
        sg.make_cell(3, {"h": sg.State()})


def test_star_args_rejected():
    with pytest.raises(CellSpecError, match=r"\*args/\*\*kwargs are not supported \(argument 'rest'\)"):
        sg.make_cell(lambda h, *rest: sg.tanh(h), {"h": sg.State()})


def test_no_state_argument():
    with pytest.raises(CellSpecError, match="cell 'cell' has no State argument"):
        sg.make_cell(lambda x, U: sg.tanh(U @ x), {"x": sg.Input(), "U": sg.Matrix("n", "m")})


def test_keyword_only_argument_is_supported():
    def kw(h: sg.State("n"), *, W: sg.Matrix("n", "n")):
        return sg.tanh(W @ h)

    c = sg.cell(kw)
    assert c.param_names == ("W",)


def test_make_cell_specs_not_a_mapping():
    with pytest.raises(CellSpecError, match="specs"):
        sg.make_cell(lambda h: sg.tanh(h), None)


# ============================================================================
# names
# ============================================================================


@pytest.mark.parametrize(
    "bad,why",
    [
        ("1bad", "is not a valid ASCII Python identifier"),
        ("a b", "is not a valid ASCII Python identifier"),
        ("φ", "is not a valid ASCII Python identifier"),
        ("_hidden", "starts with '_'"),
        ("exp", "is reserved"),
        ("lambda", "is reserved"),
        ("I", "is reserved"),
        ("double", "is reserved"),
    ],
)
def test_invalid_quantity_name_via_named(bad, why):
    with pytest.raises(InvalidNameError, match=rf"quantity name {rx(repr(bad))} {rx(why)}"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)).named(bad))


def test_non_string_quantity_name():
    with pytest.raises(InvalidNameError, match="quantity name 5 is not"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)).named(5))


@pytest.mark.parametrize(
    "bad,why",
    [
        ("bad name", "is not a valid ASCII Python identifier"),
        ("", "is not a valid ASCII Python identifier"),
        ("lambda", "is reserved"),
        ("sigmoid", "is reserved"),
        ("_priv", "starts with '_'"),
    ],
)
def test_invalid_cell_name(bad, why):
    with pytest.raises(InvalidNameError, match=rf"cell name {rx(repr(bad))} {rx(why)}"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)), name=bad)


def test_cell_function_with_reserved_name():
    def exp(h: sg.State("n"), W: sg.Matrix("n", "n")):
        return sg.tanh(W @ h)

    with pytest.raises(InvalidNameError, match="cell name 'exp' is reserved"):
        sg.cell(exp)


@pytest.mark.parametrize("argname,why", [("exp", "is reserved"), ("match", "is reserved"), ("_x", "starts with '_'"), ("I", "is reserved")])
def test_invalid_argument_name(argname, why):
    ns: dict = {"sg": sg}
    exec(f"def body(h, {argname}, W, U):\n    return sg.tanh(W @ h + U @ {argname})\n", ns)
    specs = {"h": sg.State(), argname: sg.Input(), "W": SPECS["W"], "U": SPECS["U"]}
    with pytest.raises(InvalidNameError, match=rf"argument name {rx(repr(argname))} {why}"):
        sg.make_cell(ns["body"], specs)


def test_reserved_local_variable_name_keeps_automatic_name():
    """A local named like a reserved word does not name a node (no error: locals are private)."""
    def body(h, x, W, U):
        exp = sg.tanh(pre(h, x, W, U))
        return exp

    c = make(body)
    assert "exp" not in {nd.name for nd in c.nodes} and "phi" in {nd.name for nd in c.nodes}


def test_underscore_local_variable_name_keeps_automatic_name():
    def body(h, x, W, U):
        _phi = sg.tanh(pre(h, x, W, U))
        return _phi

    c = make(body)
    assert "_phi" not in {nd.name for nd in c.nodes} and "phi" in {nd.name for nd in c.nodes}


def test_explicit_name_colliding_with_a_dimension():
    with pytest.raises(InvalidNameError, match="'n' is used twice"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)).named("n"))


def test_name_used_twice():
    with pytest.raises(InvalidNameError, match="name 'a' is used twice"):
        make(lambda h, x, W, U: sg.tanh(W @ h).named("a") + sg.tanh(U @ x).named("a"))


def test_name_collides_with_argument():
    with pytest.raises(InvalidNameError, match="name 'W' is used twice"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)).named("W"))


def test_dimension_named_like_an_argument():
    with pytest.raises(InvalidNameError, match=rx("name(s) ['n'] are used both as an argument and as a dimension")):
        sg.make_cell(lambda h, n, W: sg.tanh(W @ h), {"h": sg.State("n"), "n": sg.Input("m"), "W": SPECS["W"]})


@pytest.mark.parametrize("bad,why", [("a b", "is not a valid"), ("_n", "starts with '_'"), ("exp", "is reserved")])
def test_invalid_dimension_name(bad, why):
    with pytest.raises(InvalidNameError, match=rf"dimension name {rx(repr(bad))} {why}"):
        sg.State(bad)


# ============================================================================
# dimensions and constants
# ============================================================================


@pytest.mark.parametrize(
    "spec,dim,msg",
    [
        (sg.State, 2, "fixed dimension 2 is not supported"),
        (sg.State, 0, "fixed dimension 0 is not supported"),
        (sg.Input, np.int64(3), "fixed dimension np.int64(3) is not supported"),
        (sg.State, True, "dimension True must be a name"),
        (sg.Vector, 1.0, "dimension 1.0 must be a name"),
        (sg.Input, None, "dimension None must be a name"),
    ],
)
def test_bad_dimension(spec, dim, msg):
    with pytest.raises(CellSpecError, match=rx(msg)):
        spec(dim)


def test_bad_matrix_dimension_names_the_axis():
    with pytest.raises(CellSpecError, match=rx("Matrix cols: fixed dimension 3")):
        sg.Matrix("n", 3)
    with pytest.raises(CellSpecError, match=rx("Matrix rows: dimension True")):
        sg.Matrix(True, "n")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -math.inf, np.float64("nan"), True, "0.5", 1j, None])
def test_bad_constant(value):
    with pytest.raises(CellSpecError, match=rf"Constant value {rx(repr(value))} must be a finite real number"):
        sg.Constant(value)


def test_constant_too_large_for_float():
    with pytest.raises(CellSpecError, match="Constant value"):
        sg.Constant(10**400)


def test_builtin_with_nan_constant():
    with pytest.raises(CellSpecError, match="Constant value nan"):
        sg.cells.leaky(float("nan"))


# ============================================================================
# shapes inside the body
# ============================================================================


def test_linear_dimension_mismatch():
    with pytest.raises(ShapeError, match=rx("Linear W @ v: W has shape ('n', 'n') but v has dimension 'm'")):
        make(lambda h, x, W, U: sg.tanh(W @ x + U @ x) + h)


@pytest.mark.parametrize("op", ["+", "*", "-", "/"])
def test_combining_n_and_m_elementwise(op):
    body = eval(f"lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) {op} x")
    with pytest.raises(ShapeError, match=rf"dimension 'n' and 'm' with '{re.escape(op)}'"):
        make(body)


def test_vector_parameter_of_other_dimension():
    with pytest.raises(ShapeError, match="dimension 'n' and 'm'"):
        sg.make_cell(lambda h, b: sg.tanh(h + b), {"h": sg.State("n"), "b": sg.Vector("m")})


def test_update_of_wrong_dimension():
    specs = {"h": sg.State(), "x": sg.Input(), "W": sg.Matrix("m", "n")}
    with pytest.raises(ShapeError, match="update of state 'h' has dimension 'm', expected 'n'"):
        sg.make_cell(lambda h, x, W: sg.tanh(W @ h + x), specs)


def test_scalar_update_of_vector_state():
    specs = {"h": sg.State(), "w": sg.Matrix(1, "n")}
    with pytest.raises(ShapeError, match="update of state 'h' is a scalar"):
        sg.make_cell(lambda h, w: sg.tanh(w @ h), specs)


# ============================================================================
# what the body returns
# ============================================================================


def test_too_many_returned_states():
    with pytest.raises(CellSpecError, match=r"declares 1 state\(s\) \(h\) but its body returns 2 value\(s\)"):
        make(lambda h, x, W, U: (sg.tanh(pre(h, x, W, U)), h))


def test_too_few_returned_states():
    specs = {"h": sg.State(), "c": sg.State(), "x": sg.Input(), "W": SPECS["W"], "U": SPECS["U"]}
    with pytest.raises(CellSpecError, match=r"declares 2 state\(s\) \(h, c\) but its body returns 1 value\(s\)"):
        sg.make_cell(lambda h, c, x, W, U: sg.tanh(W @ h + U @ x) * c, specs)


@pytest.mark.parametrize(
    "value,tname",
    [(1.0, "float"), (None, "NoneType"), (np.zeros(3), "ndarray"), (sympy.Symbol("h"), "Symbol"), ("h", "str")],
    ids=["float", "None", "ndarray", "sympy", "str"],
)
def test_returning_a_non_traced_value(value, tname):
    with pytest.raises(CellSpecError, match=rf"update of state 'h' must be a traced quantity, got {tname}"):
        make(lambda h, x, W, U: value)


def test_returning_a_list():
    with pytest.raises(CellSpecError, match="must be a traced quantity, got list"):
        make(lambda h, x, W, U: [sg.tanh(pre(h, x, W, U))])


def test_returning_a_matrix():
    with pytest.raises(CellSpecError, match="update of state 'h' is a matrix"):
        make(lambda h, x, W, U: W)


# ============================================================================
# dependence on the state, unused parameters
# ============================================================================


def test_update_independent_of_state():
    specs = {"h": sg.State(), "x": sg.Input(), "U": SPECS["U"]}
    with pytest.raises(StateIndependenceError, match="does not depend on state 'h'"):
        sg.make_cell(lambda h, x, U: sg.tanh(U @ x), specs)


def test_state_dependence_that_cancels():
    specs = {"h": sg.State(), "x": sg.Input(), "U": SPECS["U"]}
    with pytest.raises(StateIndependenceError, match="does not depend on state 'h'"):
        sg.make_cell(lambda h, x, U: sg.tanh(U @ x) + h - h, specs)


def test_second_state_unused():
    with pytest.raises(StateIndependenceError, match="does not depend on state 'c'"):
        sg.make_cell(lambda h, c: (sg.tanh(h), sg.tanh(h)), {"h": sg.State(), "c": sg.State()})


def test_unused_matrix_parameter():
    with pytest.raises(CellSpecError, match="parameter 'U' is not used by the update"):
        make(lambda h, x, W, U: sg.tanh(W @ h))


@pytest.mark.parametrize("spec", [sg.Vector("n"), sg.Scalar()], ids=["vector", "scalar"])
def test_unused_vector_or_scalar_parameter(spec):
    with pytest.raises(CellSpecError, match="parameter 'b' is not used by the update"):
        make(lambda h, x, W, U, b: sg.tanh(pre(h, x, W, U)), {**SPECS, "b": spec})


# ============================================================================
# unsupported functions, unknown symbols
# ============================================================================


@pytest.mark.parametrize("fn,name", [(np.sin, "sin"), (np.tanh, "tanh"), (np.exp, "exp"), (np.abs, "absolute")])
def test_numpy_ufunc_on_traced_quantity(fn, name):
    with pytest.raises(UnsupportedFunctionError, match=rf"numpy function '{name}' cannot be applied"):
        make(lambda h, x, W, U: fn(pre(h, x, W, U)))


def test_numpy_binary_ufunc_on_traced_quantity():
    with pytest.raises(UnsupportedFunctionError, match="numpy function 'maximum'"):
        make(lambda h, x, W, U: np.maximum(pre(h, x, W, U), 0.0))


def test_sympy_function_of_expr_returned():
    # the body escaped tracing: sympy.sin of the raw expression is not a traced quantity
    with pytest.raises(CellSpecError, match="must be a traced quantity, got sin"):
        make(lambda h, x, W, U: sympy.sin(pre(h, x, W, U).expr))


def test_raw_sympy_symbol_in_body():
    with pytest.raises(CellSpecError, match=r"unknown symbol\(s\) q in the cell body"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U) + sympy.Symbol("q")))


def test_raw_sympy_symbol_inside_symgate_function():
    with pytest.raises(CellSpecError, match=r"unknown symbol\(s\) q"):
        make(lambda h, x, W, U: sg.tanh(sympy.Symbol("q")) * sg.tanh(pre(h, x, W, U)))


def test_sympy_function_of_expr_combined_with_traced_value():
    with pytest.raises(UnsupportedFunctionError, match="sin"):
        try:
            make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + sympy.sin(h.expr))
        except CellSpecError as exc:
            assert "unknown symbol" not in str(exc), str(exc)
            raise


def test_sympy_function_of_traced_quantity():
    with pytest.raises(UnsupportedFunctionError, match="sin"):
        make(lambda h, x, W, U: sympy.sin(pre(h, x, W, U)))


def test_math_function_of_traced_quantity():
    with pytest.raises(UnsupportedFunctionError, match="tanh|math"):
        make(lambda h, x, W, U: math.tanh(pre(h, x, W, U)))


def test_abs_of_traced_quantity():
    with pytest.raises(UnsupportedFunctionError, match="abs"):
        make(lambda h, x, W, U: abs(pre(h, x, W, U)))


def test_numpy_non_ufunc_on_traced_quantity():
    try:
        make(lambda h, x, W, U: np.clip(pre(h, x, W, U), -1.0, 1.0))
    except CellSpecError as exc:
        assert isinstance(exc, UnsupportedFunctionError), type(exc)
    else:
        pytest.fail("no error")


# ============================================================================
# control flow, operators
# ============================================================================


def test_bool_branching():
    def body(h, x, W, U):
        a = pre(h, x, W, U)
        if a:
            return sg.tanh(a)
        return a

    with pytest.raises(CellSpecError, match="no truth value; cell bodies cannot branch"):
        make(body)


def test_equality_branching():
    def body(h, x, W, U):
        if h == 0:
            return h
        return sg.tanh(pre(h, x, W, U))

    with pytest.raises(CellSpecError, match="truth value|compar"):
        make(body)


def test_ordering_comparison():
    with pytest.raises(CellSpecError, match="compar|truth value"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) if h < 0 else h)


@pytest.mark.parametrize(
    "expr,msg",
    [
        ("W + h", "matrix 'W' can only be used as 'W @ v'"),
        ("h + W", "matrix 'W' can only be used as 'W @ v', not with '+'"),
        ("W * h", "matrix 'W' can only be used as 'W @ v'"),
        ("h * W", "matrix 'W' can only be used as 'W @ v', not with '*'"),
        ("-W", "matrix 'W' can only be used as 'W @ v'"),
        ("h @ W", "'@' needs a Matrix parameter on the left: write W @ v"),
        ("h @ h", "'@' needs a Matrix parameter on the left"),
        ("W @ W", "matrix products of parameters (W @ W) are not supported"),
        ("W @ 1.0", "W @ v needs a traced vector on the right, got float"),
    ],
)
def test_matrix_misuse(expr, msg):
    body = eval(f"lambda h, x, W, U: sg.tanh({expr} + U @ x)")
    with pytest.raises(ShapeError, match=rx(msg)):
        make(body)


def test_matrix_attribute():
    with pytest.raises(CellSpecError, match="matrix parameter 'W' has no attribute 'T'"):
        make(lambda h, x, W, U: sg.tanh(W.T @ h + U @ x))


@pytest.mark.parametrize(
    "operand,msg",
    [
        (float("nan"), "constant nan in a cell body must be a finite real number"),
        (float("inf"), "constant inf in a cell body must be a finite real number"),
        (1j, "constant 1j in a cell body must be a finite real number"),
        (sympy.oo, "constant oo in a cell body must be a finite real number"),
        (True, "boolean True is not a valid operand of '+'"),
        ("a", "unsupported operand of type str in '+'"),
        (np.ones(3), "unsupported operand of type ndarray in '+'"),
    ],
    ids=["nan", "inf", "complex", "sympy-oo", "bool", "str", "ndarray"],
)
def test_bad_operand(operand, msg):
    with pytest.raises(CellSpecError, match=rx(msg)):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + operand)


def test_traced_exponent():
    with pytest.raises(CellSpecError, match="exponent .* must be a finite real number"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) ** h)


def test_division_by_zero_constant():
    with pytest.raises(CellSpecError, match="zoo|finite|zero"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + h / 0)


def test_nan_exponent():
    with pytest.raises(CellSpecError, match="exponent nan"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + h ** float("nan"))


def test_constant_base_power():
    with pytest.raises(CellSpecError, match=r"\*\*"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + 2 ** h)


def test_indexing_a_traced_quantity():
    with pytest.raises(CellSpecError, match="index|subscript"):
        make(lambda h, x, W, U: sg.tanh(pre(h, x, W, U)) + h[0])


def test_attribute_of_a_traced_quantity():
    with pytest.raises(CellSpecError, match="'T'"):
        make(lambda h, x, W, U: sg.tanh(W @ h.T + U @ x))


def test_quantities_from_two_cells():
    leaked = {}

    def first(h: sg.State("n")):
        leaked["h"] = h
        return sg.tanh(h)

    sg.cell(first)

    def second(h: sg.State("n")):
        return sg.tanh(h) + leaked["h"]

    with pytest.raises(CellSpecError, match="two different cells"):
        sg.cell(second)


# ============================================================================
# derivation entry points
# ============================================================================


@pytest.mark.parametrize("fn", [sg.jacobian, sg.reference_kernel, sg.ReferenceKernel], ids=["jacobian", "reference_kernel", "ReferenceKernel"])
@pytest.mark.parametrize("obj,tname", [("vector_gate", "str"), (sg.cells.vector_gate, "function"), (None, "NoneType")])
def test_non_cell(fn, obj, tname):
    with pytest.raises(CellSpecError, match=f"expected a symgate Cell, got {tname}"):
        fn(obj)


def test_parameter_jacobian_non_cell():
    with pytest.raises(CellSpecError, match="expected a symgate Cell, got str"):
        sg.parameter_jacobian("vector_gate", "W")


def test_parameter_jacobians_non_cell():
    with pytest.raises(CellSpecError, match="expected a symgate Cell, got str"):
        sg.parameter_jacobians("vector_gate")


@pytest.fixture(scope="module")
def lstm():
    return sg.cells.lstm()


@pytest.mark.parametrize("of,wrt", [("q", "h"), ("h", "q")])
def test_jacobian_unknown_state(lstm, of, wrt):
    bad = of if of != "h" else wrt
    with pytest.raises(CellSpecError, match=rf"{rx(repr(bad))} is not a state of cell 'lstm'; states are \('h', 'c'\)"):
        sg.jacobian(lstm, of, wrt)


@pytest.mark.parametrize("bad", [0, np.zeros(2), ("h",)])
def test_jacobian_state_that_is_not_a_name(lstm, bad):
    with pytest.raises(CellSpecError, match=rf"wrt must be a name \(a str\) or None, got {type(bad).__name__}"):
        sg.jacobian(lstm, "h", bad)


def test_jacobian_unknown_state_single_state_cell():
    with pytest.raises(CellSpecError, match="'c' is not a state of cell 'gru'"):
        sg.jacobian(sg.cells.gru(), "c")


def test_parameter_jacobian_unknown_parameter():
    with pytest.raises(CellSpecError, match="'Wq' is not a parameter of cell 'vector_gate'"):
        sg.parameter_jacobian(sg.cells.vector_gate(), "Wq")


def test_parameter_jacobian_input_is_not_a_parameter():
    with pytest.raises(CellSpecError, match="'x' is not a parameter"):
        sg.parameter_jacobian(sg.cells.vector_gate(), "x")


def test_parameter_jacobian_unknown_state(lstm):
    with pytest.raises(CellSpecError, match="'q' is not a state of cell 'lstm'"):
        sg.parameter_jacobian(lstm, "Wi", of="q")


def test_select_unknown_origin():
    with pytest.raises(CellSpecError, match=rx("unknown origin(s) ['forget']")):
        sg.jacobian(sg.cells.gru()).select("leak", "forget")


def test_as_explicit_inline_without_cell():
    with pytest.raises(CellSpecError, match="cell"):
        sg.jacobian(sg.cells.leaky()).as_explicit({"n": 2}, inline=True)


def test_as_explicit_missing_size():
    with pytest.raises(ShapeError, match="'n'"):
        sg.jacobian(sg.cells.leaky()).as_explicit({"m": 2})


def test_builtin_unknown():
    with pytest.raises(CellSpecError, match="unknown built-in cell 'nope'; available: plain, leaky"):
        sg.cells.builtin("nope")


def test_builtin_unknown_option():
    with pytest.raises(CellSpecError, match="'foo'"):
        sg.cells.builtin("gru", foo=1)


def test_with_constants_unknown():
    with pytest.raises(CellSpecError, match=rx("unknown constant(s) ['beta']; the cell's constants are ['alpha']")):
        sg.cells.leaky().with_constants(beta=1.0)


def test_with_constants_on_cell_without_constants():
    with pytest.raises(CellSpecError, match=rx("unknown constant(s) ['alpha']; the cell's constants are []")):
        sg.cells.gru().with_constants(alpha=0.5)


def test_with_constants_nan():
    with pytest.raises(CellSpecError, match="Constant value nan"):
        sg.cells.leaky().with_constants(alpha=float("nan"))


# ============================================================================
# kernels
# ============================================================================

N, M, T, B = 3, 2, 4, 2


@pytest.fixture(scope="module")
def vg():
    return sg.cells.vector_gate()


@pytest.fixture(scope="module")
def kern(vg):
    return sg.reference_kernel(vg, "float64")


@pytest.fixture
def P():
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((N, N)),
        "U": rng.standard_normal((N, M)),
        "Wg": rng.standard_normal((N, N)),
        "Ug": rng.standard_normal((N, M)),
        "b": rng.standard_normal(N),
        "c": rng.standard_normal(N),
    }


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((T, B, M))


@pytest.fixture
def h0():
    return np.random.default_rng(2).standard_normal((B, N))


def with_(P, **kw):
    d = dict(P)
    d.update(kw)
    return d


def test_kernel_accepts_valid_input(kern, P, x, h0):
    # the baseline every case below breaks in one place
    assert kern.forward(P, x, h0).h.shape == (T, B, N)


# -- dtype ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool", "complex128"])
def test_x_wrong_dtype(kern, P, x, h0, dtype):
    with pytest.raises(DTypeError, match=rf"^x has dtype {dtype}; this kernel needs float64"):
        kern.forward(P, x.astype(dtype), h0)


@pytest.mark.parametrize("name", ["W", "U", "Wg", "Ug", "b", "c"])
def test_param_float32(kern, P, x, h0, name):
    with pytest.raises(DTypeError, match=rf"^params\['{name}'\] has dtype float32; this kernel needs float64"):
        kern.forward(with_(P, **{name: P[name].astype(np.float32)}), x, h0)


def test_param_int(kern, P, x, h0):
    with pytest.raises(DTypeError, match=r"params\['W'\] has dtype int64"):
        kern.forward(with_(P, W=np.ones((N, N), dtype=np.int64)), x, h0)


def test_h0_float32(kern, P, x, h0):
    with pytest.raises(DTypeError, match="^h0 has dtype float32"):
        kern.forward(P, x, h0.astype(np.float32))


def test_float64_arrays_to_float32_kernel(vg, P, x, h0):
    k32 = sg.reference_kernel(vg, "float32")
    with pytest.raises(DTypeError, match="x has dtype float64; this kernel needs float32"):
        k32.forward({k: v.astype(np.float32) for k, v in P.items()}, x, h0.astype(np.float32))


@pytest.mark.parametrize("dtype,msg", [("int32", "dtype int32 is not supported"), ("float16", "dtype float16 is not supported"),
                                       (np.int64, "dtype int64 is not supported"), ("foo", "dtype 'foo' is not a numpy dtype")])
def test_unsupported_kernel_dtype(vg, dtype, msg):
    with pytest.raises(DTypeError, match=rx(msg)):
        sg.reference_kernel(vg, dtype)


# -- containers and layout -------------------------------------------------------


def test_x_list(kern, P, x, h0):
    with pytest.raises(DTypeError, match="x must be a numpy array of shape \\(T, B, m\\), got list"):
        kern.forward(P, x.tolist(), h0)


def test_param_list(kern, P, x, h0):
    with pytest.raises(DTypeError, match=r"params\['W'\] must be a numpy array of dtype float64, got builtins.list"):
        kern.forward(with_(P, W=P["W"].tolist()), x, h0)


def test_param_none(kern, P, x, h0):
    with pytest.raises(DTypeError, match=r"params\['U'\] must be a numpy array .* got builtins.NoneType"):
        kern.forward(with_(P, U=None), x, h0)


def test_h0_list(kern, P, x, h0):
    with pytest.raises(DTypeError, match="h0 must be a numpy array of dtype float64, got builtins.list"):
        kern.forward(P, x, h0.tolist())


@pytest.mark.parametrize("params", [[], None], ids=["list", "None"])
def test_params_not_a_dict(kern, x, h0, params):
    with pytest.raises(DTypeError, match=f"params must be a dict of numpy arrays, got {type(params).__name__}"):
        kern.forward(params, x, h0)


def test_scalar_parameter_as_python_float():
    cell = sg.cells.scalar_gate()
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((N, N)), "U": rng.standard_normal((N, M)), "wg": rng.standard_normal((1, N)),
              "ug": rng.standard_normal((1, M)), "b": np.zeros(N), "c": 0.5}
    with pytest.raises(DTypeError, match=r"params\['c'\] must be a numpy array .* got builtins.float"):
        sg.reference_kernel(cell).forward(params, np.zeros((T, B, M)), np.zeros((B, N)))


def test_x_non_contiguous(kern, P, h0):
    wide = np.random.default_rng(3).standard_normal((T, B, 2 * M))
    with pytest.raises(DTypeError, match=rx("x is not C-contiguous; pass np.ascontiguousarray(x)")):
        kern.forward(P, wide[:, :, ::2], h0)


def test_x_fortran_order(kern, P, x, h0):
    with pytest.raises(DTypeError, match="x is not C-contiguous"):
        kern.forward(P, np.asfortranarray(x), h0)


@pytest.mark.parametrize("make_bad", [lambda a: a.T, np.asfortranarray], ids=["transposed", "fortran"])
def test_param_non_contiguous(kern, P, x, h0, make_bad):
    with pytest.raises(DTypeError, match=rx("params['W'] is not C-contiguous")):
        kern.forward(with_(P, W=make_bad(P["W"])), x, h0)


def test_h0_non_contiguous(kern, P, x):
    with pytest.raises(DTypeError, match="h0 is not C-contiguous"):
        kern.forward(P, x, np.ones((B, 2 * N))[:, ::2])


# -- non-finite values -------------------------------------------------------------


def put(a, idx, v):
    a = a.copy()
    a[idx] = v
    return a


@pytest.mark.parametrize(
    "name,idx,value",
    [("W", (1, 2), np.nan), ("U", (0, 1), np.inf), ("Wg", (2, 0), -np.inf), ("Ug", (1, 1), np.nan), ("b", (2,), np.inf), ("c", (0,), np.nan)],
)
def test_non_finite_param(kern, P, x, h0, name, idx, value):
    with pytest.raises(NonFiniteError, match=rf"^params\['{name}'\] contains a non-finite value \(.*{rx(repr(float(value)))}.* at index {rx(str(idx))}\)"):
        kern.forward(with_(P, **{name: put(P[name], idx, value)}), x, h0)


@pytest.mark.parametrize("idx,value", [((3, 1, 0), np.nan), ((0, 0, 1), -np.inf)])
def test_non_finite_x(kern, P, x, h0, idx, value):
    with pytest.raises(NonFiniteError, match=rf"^x contains a non-finite value .* at index {rx(str(idx))}"):
        kern.forward(P, put(x, idx, value), h0)


def test_non_finite_h0(kern, P, x, h0):
    with pytest.raises(NonFiniteError, match=r"^h0 contains a non-finite value \(np.float64\(nan\) at index \(1, 1\)\)"):
        kern.forward(P, x, put(h0, (1, 1), np.nan))


def test_non_finite_scalar_param():
    cell = sg.cells.scalar_gate()
    params = {"W": np.eye(N), "U": np.ones((N, M)), "wg": np.ones((1, N)), "ug": np.ones((1, M)), "b": np.zeros(N),
              "c": np.array(np.inf)}
    with pytest.raises(NonFiniteError, match=r"params\['c'\] contains a non-finite value .* at index \(\)"):
        sg.reference_kernel(cell).forward(params, np.zeros((T, B, M)), np.zeros((B, N)))


def test_non_finite_everywhere_else(kern, P, x, h0):
    """vjp cotangents, jvp tangents, the one-step Jacobian's x_t: all checked."""
    with pytest.raises(NonFiniteError, match=r"cotangents\['h'\] contains a non-finite value .* at index \(0, 1, 2\)"):
        kern.vjp(P, x, h0, put(np.zeros((T, B, N)), (0, 1, 2), np.nan))
    with pytest.raises(NonFiniteError, match=r"tangents\['W'\] contains a non-finite value .* at index \(2, 2\)"):
        kern.jvp(P, x, h0, {"W": put(np.zeros((N, N)), (2, 2), np.inf)})
    with pytest.raises(NonFiniteError, match="x contains a non-finite value"):
        kern.jacobian(P, put(x[0], (1, 0), np.nan), h0)


# -- shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,msg",
    [
        ("W", (N, N + 1), "params['W'] has shape (3, 4); expected ('n', 'n') = (3, 3)"),
        ("W", (N,), "params['W'] has shape (3,); expected 2 dimension(s)"),
        ("U", (N, M + 1), "params['U'] has shape (3, 3); expected ('n', 'm') = (3, 2)"),
        ("U", (N + 1, M), "params['U'] has shape (4, 2); expected ('n', 'm') = (3, 2)"),
        ("Wg", (N, N - 1), "params['Wg'] has shape (3, 2); expected ('n', 'n') = (3, 3)"),
        ("Ug", (M, N), "params['Ug'] has shape (2, 3); expected ('n', 'm') = (3, 2)"),
        ("b", (N + 1,), "params['b'] has shape (4,); expected ('n') = (3,)"),
        ("b", (1, N), "params['b'] has shape (1, 3); expected 1 dimension(s)"),
        ("c", (N - 1,), "params['c'] has shape (2,); expected ('n') = (3,)"),
    ],
)
def test_param_wrong_shape(kern, P, x, h0, name, shape, msg):
    bad = np.zeros(shape)
    with pytest.raises(ShapeError, match="^" + rx(msg)):
        kern.forward(with_(P, **{name: bad}), x, h0)


def test_wrong_square_matrix_is_blamed(kern, P, x, h0):
    with pytest.raises(ShapeError, match=r"params\['W'\]"):
        kern.forward(with_(P, W=np.zeros((N + 1, N + 1))), x, h0)


@pytest.mark.parametrize(
    "shape,msg",
    [
        ((B + 1, N), "h0 has shape (3, 3); expected (B, 'n') = (2, 3)"),
        # the conflict is reported with both arrays: the parameter and where n came from
        ((B, N + 1), "params['W'] has shape (3, 3); expected ('n', 'n') = (4, 4) (n = 4 from initial state 'h' (shape (2, 4)))"),
        ((N,), "h0 has shape (3,); expected 2 dimension(s)"),
    ],
)
def test_h0_wrong_shape(kern, P, x, shape, msg):
    with pytest.raises(ShapeError, match="^" + rx(msg)):
        kern.forward(P, x, np.zeros(shape))


def test_h0_dict_unknown_and_missing_state(kern, P, x, h0):
    with pytest.raises(ShapeError, match=rx("h0 has unknown states ['q']; states are ('h',)")):
        kern.forward(P, x, {"h": h0, "q": h0})
    with pytest.raises(ShapeError, match="h0 is missing state 'h'"):
        kern.forward(P, x, {"q": h0})


def test_multi_state_h0(lstm):
    params = {p.name: np.zeros(tuple({"n": N, "m": M}[d] for d in p.shape)) for p in lstm.params}
    k = sg.reference_kernel(lstm)
    with pytest.raises(ShapeError, match=rx("h0 must be a dict {state: array} for cell 'lstm' with states ('h', 'c')")):
        k.forward(params, np.zeros((T, B, M)), np.zeros((B, N)))
    with pytest.raises(ShapeError, match="h0 is missing state 'c'"):
        k.forward(params, np.zeros((T, B, M)), {"h": np.zeros((B, N))})


def test_x_wrong_input_size(kern, P, h0):
    # x fixes m = 3; the parameters that read x disagree
    with pytest.raises(ShapeError, match=rx("expected ('n', 'm') = (3, 3)")):
        kern.forward(P, np.zeros((T, B, M + 1)), h0)


def test_missing_parameter(kern, P, x, h0):
    del P["Ug"]
    with pytest.raises(ShapeError, match=rx("params is missing ['Ug'] (cell 'vector_gate' has parameters ['W', 'U', 'Wg', 'Ug', 'b', 'c'])")):
        kern.forward(P, x, h0)


def test_extra_parameter(kern, P, x, h0):
    with pytest.raises(ShapeError, match=rx("params has unknown entries ['V']")):
        kern.forward(with_(P, V=np.zeros(N)), x, h0)


def test_zero_time_steps(kern, P, h0):
    with pytest.raises(ShapeError, match="x has T = 0 time steps; a run needs T >= 1"):
        kern.forward(P, np.zeros((0, B, M)), h0)


def test_zero_batch(kern, P):
    with pytest.raises(ShapeError, match="x has batch size B = 0; a run needs B >= 1"):
        kern.forward(P, np.zeros((T, 0, M)), np.zeros((0, N)))


def test_zero_hidden_units(kern, x):
    params = {"W": np.zeros((0, 0)), "U": np.zeros((0, M)), "Wg": np.zeros((0, 0)), "Ug": np.zeros((0, M)),
              "b": np.zeros(0), "c": np.zeros(0)}
    with pytest.raises(ShapeError, match="'n'"):
        kern.forward(params, x, np.zeros((B, 0)))


@pytest.mark.parametrize("shape", [(B, M), (1, T, B, M), (T * B * M,)])
def test_x_not_3d(kern, P, h0, shape):
    with pytest.raises(ShapeError, match=rx(f"x has shape {shape}; expected (T, B, m)")):
        kern.forward(P, np.zeros(shape), h0)


def test_kernel_needs_exactly_one_input():
    def two_in(h: sg.State("n"), x: sg.Input("m"), y: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
               V: sg.Matrix("n", "m")):
        return sg.tanh(W @ h + U @ x + V @ y)

    k = sg.reference_kernel(sg.cell(two_in))
    with pytest.raises(ShapeError, match="cell 'two_in' has 2 inputs; kernels support exactly one input"):
        k.forward({"W": np.eye(2), "U": np.ones((2, 2)), "V": np.ones((2, 2))}, np.ones((1, 1, 2)))


def test_vjp_jvp_and_step_shapes(kern, P, x, h0):
    with pytest.raises(ShapeError, match=rx("cotangents['h'] has shape (4, 2, 4); expected (4, 2, 3)")):
        kern.vjp(P, x, h0, np.zeros((T, B, N + 1)))
    with pytest.raises(ShapeError, match=rx("tangents has unknown entries ['Wq']")):
        kern.jvp(P, x, h0, {"Wq": np.zeros((N, N))})
    with pytest.raises(ShapeError, match=rx("tangents['W'] has shape (3, 4); expected (3, 3)")):
        kern.jvp(P, x, h0, {"W": np.zeros((N, N + 1))})
    with pytest.raises(ShapeError, match="tangents must be a dict"):
        kern.jvp(P, x, h0, np.zeros((N, N)))
    with pytest.raises(ShapeError, match=rx("x_t must be a (B, m) array, got (4, 2, 2)")):
        kern.jacobian(P, x, h0)
    with pytest.raises(CellSpecError, match="'Wq' is not a parameter"):
        kern.parameter_jacobian(P, x[0], h0, "Wq")


# -- losses -------------------------------------------------------------------------


@pytest.fixture
def V():
    return np.random.default_rng(4).standard_normal((1, N))


@pytest.fixture
def y():
    return np.random.default_rng(5).standard_normal((B, 1))


def test_loss_valid_baseline(kern, P, x, h0, V, y):
    g = kern.backward(P, x, h0, loss=sg.losses.last_mse(V, y))
    assert np.isfinite(g.value)


@pytest.mark.parametrize(
    "Vshape,msg",
    [((1, N + 1), "loss V has shape (1, 4); expected (o, n) with n = 3"), ((N,), "loss V has shape (3,); expected 2 dimension(s)")],
)
def test_loss_V_wrong_shape(kern, P, x, h0, y, Vshape, msg):
    with pytest.raises(ShapeError, match="^" + rx(msg)):
        kern.backward(P, x, h0, loss=sg.losses.last_mse(np.zeros(Vshape), y))


def test_loss_V_no_outputs(kern, P, x, h0):
    with pytest.raises(ShapeError, match="loss V has o = 0 outputs"):
        kern.backward(P, x, h0, loss=sg.losses.last_mse(np.zeros((0, N)), np.zeros((B, 0))))


@pytest.mark.parametrize(
    "loss_fn,yshape,msg",
    [
        (sg.losses.last_mse, (B + 1, 1), "loss y has shape (3, 1); expected (B, o) = (2, 1)"),
        (sg.losses.last_mse, (B,), "loss y has shape (2,); expected 2 dimension(s)"),
        (sg.losses.step_mse, (B, 1), "loss y has shape (2, 1); expected 3 dimension(s)"),
        (sg.losses.step_mse, (T + 1, B, 1), "loss y has shape (5, 2, 1); expected (T, B, o) = (4, 2, 1)"),
    ],
)
def test_loss_y_wrong_shape(kern, P, x, h0, V, loss_fn, yshape, msg):
    with pytest.raises(ShapeError, match="^" + rx(msg)):
        kern.backward(P, x, h0, loss=loss_fn(V, np.zeros(yshape)))


def test_loss_dtype_and_finiteness(kern, P, x, h0, V, y):
    with pytest.raises(DTypeError, match="loss V has dtype float32"):
        kern.backward(P, x, h0, loss=sg.losses.last_mse(V.astype(np.float32), y))
    with pytest.raises(NonFiniteError, match=rx("loss V contains a non-finite value (np.float64(nan) at index (0, 1))")):
        kern.backward(P, x, h0, loss=sg.losses.last_mse(put(V, (0, 1), np.nan), y))
    with pytest.raises(NonFiniteError, match=r"loss y contains a non-finite value .* at index \(1, 0\)"):
        kern.backward(P, x, h0, loss=sg.losses.last_mse(V, put(y, (1, 0), np.inf)))


@pytest.mark.parametrize("fn", [sg.losses.last_mse, sg.losses.step_mse])
def test_loss_lists(fn, V):
    with pytest.raises(DTypeError, match=rf"{fn.__name__}\(V, y\) takes numpy arrays"):
        fn(V.tolist(), np.zeros((B, 1)))


@pytest.mark.parametrize("loss,tname", [(lambda h: 0.0, "function"), (None, "NoneType"), ("mse", "str")])
def test_loss_not_a_loss(kern, P, x, h0, loss, tname):
    with pytest.raises(CellSpecError, match=rf"loss must be a symgate loss .* got {tname}"):
        kern.backward(P, x, h0, loss=loss)
