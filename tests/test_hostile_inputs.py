"""Hostile input to the API: cell specs, arrays, prepared steps, threads, dtypes and numerics.

Each test is one case of the hostile-input catalogue (with ``tests/test_build_faults.py``,
the cache, and ``tests/test_hostile_cli.py``, the command line and Dask): ``hostile("error")``
-- a clear :class:`~symgate.SymgateError`, the exact class and a fragment of its message
checked -- or ``hostile("result")`` -- the correct result, compared with a serial or
reference computation.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest
import sympy

import symgate as sg
from symgate.testing import cached_builtin

error = pytest.mark.hostile("error")
result = pytest.mark.hostile("result")

N, M, B, T = 5, 3, 4, 12


def _problem(cell: sg.Cell, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    sizes = {"n": N, "m": M}
    params = {p.name: 0.4 * rng.standard_normal(tuple(1 if d == 1 else sizes[d] for d in p.shape))
              for p in cell.params}
    x = rng.standard_normal((T, B, M))
    loss = sg.losses.last_mse(rng.standard_normal((1, N)), rng.standard_normal((B, 1)))
    return params, x, loss


@pytest.fixture(scope="module")
def vg() -> sg.Cell:
    return cached_builtin("vector_gate")


@pytest.fixture
def prepared(vg: sg.Cell) -> tuple[Any, dict[str, np.ndarray], np.ndarray, Any, float]:
    k = sg.compile(vg)
    params, x, loss = _problem(vg)
    want = float(k.backward(params, x, loss=loss).value)
    return k.prepare(params, x, loss=loss), params, x, loss, want


def _in_threads(fn: Callable[[int], Any], n: int = 4) -> list[Any]:
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out[i] = exc

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    return out


# --------------------------------------------------------------------------- threads
@result
def test_compile_of_one_new_cell_from_four_threads_gives_one_working_kernel(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(tmp_path / "cache"))

    @sg.cell
    def fresh_threads(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
        return 0.7 * h + 0.3 * sg.tanh(W @ h + U @ x)  # a cell no other test compiles: a cold cache key

    kernels = _in_threads(lambda i: sg.compile(fresh_threads))
    assert all(k is kernels[0] for k in kernels), kernels
    params, x, loss = _problem(fresh_threads)
    ref = sg.reference_kernel(fresh_threads).backward(params, x, loss=loss)
    got = kernels[0].backward(params, x, loss=loss)
    assert got.value == pytest.approx(float(ref.value), rel=1e-12)


@result
def test_backward_of_one_kernel_from_four_threads_agrees_with_serial(vg: sg.Cell) -> None:
    k = sg.compile(vg)
    problems = [_problem(vg, seed=s) for s in range(4)]
    want = [float(k.backward(p, x, loss=lo).value) for p, x, lo in problems]
    got = _in_threads(lambda i: [float(k.backward(*problems[i][:2], loss=problems[i][2]).value) for _ in range(50)])
    for i, values in enumerate(got):
        assert values == [want[i]] * 50, f"thread {i}: {values if not isinstance(values, list) else set(values)}"


@error
def test_a_prepared_step_called_while_another_thread_runs_it_raises(prepared: Any) -> None:
    step = prepared[0]
    assert step._busy.acquire()  # a call in progress (as another thread would hold it)
    try:
        with pytest.raises(sg.ConcurrentUseError, match="called from two threads at once.*one step per thread"):
            step()
    finally:
        step._busy.release()
    assert step() == pytest.approx(prepared[4], rel=1e-12)  # and it still works afterwards


@result
def test_a_prepared_step_shared_by_racing_threads_never_returns_a_wrong_loss(prepared: Any) -> None:
    step, want = prepared[0], prepared[4]

    def hammer(_: int) -> tuple[int, list[float]]:
        refused, wrong = 0, []
        for _ in range(200):
            try:
                v = float(step())
            except sg.ConcurrentUseError:
                refused += 1
                continue
            if v != pytest.approx(want, rel=1e-12):
                wrong.append(v)
        return refused, wrong

    out = _in_threads(hammer, n=2)
    assert all(not isinstance(o, BaseException) for o in out), out
    assert [w for _, w in out] == [[], []]


@result
def test_one_prepared_step_per_thread_gives_every_thread_its_own_correct_values(vg: sg.Cell) -> None:
    k = sg.compile(vg)
    problems = [_problem(vg, seed=10 + s) for s in range(4)]
    want = [float(k.backward(p, x, loss=lo).value) for p, x, lo in problems]

    def run(i: int) -> set[float]:
        step = k.prepare(*problems[i][:2], loss=problems[i][2])
        return {float(step()) for _ in range(100)}

    assert _in_threads(run) == [{w} for w in want]


# --------------------------------------------------------------------------- prepared-step bindings
@error
def test_x_resized_after_prepare_is_refused(prepared: Any) -> None:
    step, _, x, _, _ = prepared
    x.resize((T + 5, B, M), refcheck=False)
    with pytest.raises(sg.ShapeError, match=r"x was resized or reallocated after prepare\(\)"):
        step()


@error
def test_a_parameter_resized_after_prepare_is_refused(prepared: Any) -> None:
    step, params, *_ = prepared
    params["W"].resize((N + 1, N + 1), refcheck=False)
    with pytest.raises(sg.ShapeError, match=r"params\['W'\] was resized"):
        step()


@error
def test_a_parameter_rebound_after_prepare_is_refused(prepared: Any) -> None:
    step, params, *_ = prepared
    params["W"] = params["W"] * 2.0
    with pytest.raises(sg.CellSpecError, match=r"params\['W'\] was rebound.*params\['W'\]\[\.\.\.\] = new"):
        step()


@error
def test_a_parameter_deleted_after_prepare_is_refused(prepared: Any) -> None:
    step, params, *_ = prepared
    del params["U"]
    with pytest.raises(sg.CellSpecError, match=r"params\['U'\] was rebound"):
        step()


@error
def test_the_loss_target_rebound_after_prepare_is_refused(prepared: Any) -> None:
    step, _, _, loss, _ = prepared
    loss.y = loss.y.copy()
    with pytest.raises(sg.CellSpecError, match="loss's V or y was rebound"):
        step()


@result
def test_arrays_updated_in_place_after_prepare_are_what_the_next_call_reads(vg: sg.Cell, prepared: Any) -> None:
    step, params, x, loss, _ = prepared
    rng = np.random.default_rng(99)
    x[...] = rng.standard_normal(x.shape)
    params["W"] -= 0.1
    want = sg.reference_kernel(vg).backward(params, x, loss=loss)
    assert step() == pytest.approx(float(want.value), rel=1e-12)
    np.testing.assert_allclose(step.grads["W"], want["W"], rtol=1e-10, atol=1e-13)


@result
def test_read_only_inputs_are_accepted_by_a_prepared_step(vg: sg.Cell) -> None:
    params, x, loss = _problem(vg, seed=3)
    for a in (*params.values(), x):
        a.flags.writeable = False
    k = sg.compile(vg)
    assert k.prepare(params, x, loss=loss)() == pytest.approx(float(k.backward(params, x, loss=loss).value), rel=1e-12)


# --------------------------------------------------------------------------- arrays
def _kernel_and_problem(vg: sg.Cell, backend: str) -> tuple[Any, dict[str, np.ndarray], np.ndarray, Any]:
    k = sg.compile(vg) if backend == "compiled" else sg.reference_kernel(vg)
    return (k, *_problem(vg))


BACKENDS = pytest.mark.parametrize("backend", ["compiled", "reference"])


@error
@BACKENDS
def test_a_masked_input_is_refused_not_its_mask_ignored(vg: sg.Cell, backend: str) -> None:
    k, params, x, loss = _kernel_and_problem(vg, backend)
    mx = np.ma.masked_array(x, mask=np.arange(x.size).reshape(x.shape) % 3 == 0)
    with pytest.raises(sg.DTypeError, match=r"x is a masked array.*ignore the mask.*filled"):
        k.backward(params, mx, loss=loss)


@error
@BACKENDS
def test_a_masked_parameter_is_refused(vg: sg.Cell, backend: str) -> None:
    k, params, x, loss = _kernel_and_problem(vg, backend)
    params["W"] = np.ma.masked_array(params["W"], mask=np.eye(N, dtype=bool))
    with pytest.raises(sg.DTypeError, match=r"params\['W'\] is a masked array"):
        k.forward(params, x)


@error
@BACKENDS
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_numpy_matrix_parameter_is_refused(vg: sg.Cell, backend: str) -> None:
    k, params, x, loss = _kernel_and_problem(vg, backend)
    params["W"] = np.matrix(params["W"])
    with pytest.raises(sg.DTypeError, match=r"params\['W'\] is a numpy.matrix.*np.asarray"):
        k.backward(params, x, loss=loss)


@error
@pytest.mark.parametrize("make, exc, fragment", [
    (lambda x: x.tolist(), sg.DTypeError, "x must be a numpy array"),
    (lambda x: x.astype(np.float32), sg.DTypeError, "x has dtype float32"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), sg.NonFiniteError, "x contains a non-finite"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, -np.inf, x), sg.NonFiniteError, "-inf"),
    (lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)), sg.ShapeError, "loss y has shape"),  # (B, T, m)
    (lambda x: x[::2], None, None),  # strided in time: not C-contiguous
    (lambda x: x[:0], sg.ShapeError, "T = 0"),
    (lambda x: x[:, :0], sg.ShapeError, "B = 0"),
    (lambda x: x[0], sg.ShapeError, "expected (T, B, m)"),
    (lambda x: x.astype(np.complex128), sg.DTypeError, "complex128"),
], ids=["list", "float32", "nan", "neg-inf", "transposed", "strided", "no-steps", "no-batch", "2-d", "complex"])
def test_bad_input_arrays_are_named(vg: sg.Cell, make: Callable[[np.ndarray], Any], exc: Any, fragment: str) -> None:
    k, params, x, loss = _kernel_and_problem(vg, "compiled")
    bad = make(x)
    if exc is None:  # a strided view: refused as not C-contiguous
        exc, fragment = sg.DTypeError, "not C-contiguous"
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        k.backward(params, bad, loss=loss)


@error
@pytest.mark.parametrize("edit, exc, fragment", [
    (lambda p: p.pop("W"), sg.ShapeError, "W"),
    (lambda p: p.update(extra=np.zeros(3)), sg.ShapeError, "extra"),
    (lambda p: p.update(W=np.zeros((N, N + 1))), sg.ShapeError, "W"),
    (lambda p: p.update(W=np.zeros((N, N), dtype=np.int64)), sg.DTypeError, "int64"),
], ids=["missing", "unknown", "wrong-shape", "integer"])
def test_bad_parameter_dicts_are_named(vg: sg.Cell, edit: Callable[[dict], Any], exc: Any, fragment: str) -> None:
    k, params, x, loss = _kernel_and_problem(vg, "compiled")
    edit(params)
    with pytest.raises(sg.SymgateError, match=fragment) as info:
        k.backward(params, x, loss=loss)
    assert isinstance(info.value, (sg.ShapeError, sg.DTypeError, sg.CellSpecError)), type(info.value)


@error
def test_an_initial_state_of_the_wrong_width_is_named(vg: sg.Cell) -> None:
    k, params, x, loss = _kernel_and_problem(vg, "compiled")
    with pytest.raises(sg.ShapeError, match="initial state 'h'"):
        k.backward(params, x, np.zeros((B, N + 2)), loss=loss)


@error
def test_a_huge_max_lag_is_refused_before_allocating(vg: sg.Cell) -> None:
    params, x, _ = _problem(vg)
    with pytest.raises(sg.ShapeError, match=r"max_lag = 100000000 with T = 5 steps .* GiB.*max_lag <= T - 1 = 4"):
        sg.effective_lrs(vg, params, x[:5], max_lag=10**8)


@result
def test_a_max_lag_past_the_sequence_of_modest_size_gives_lags_without_value(vg: sg.Cell) -> None:
    params, x, _ = _problem(vg)
    mu = sg.effective_lrs(vg, params, x[:5], max_lag=9)
    assert mu.max_lag == 9 and np.all(np.isneginf(mu.log_abs_mu[:, 5:]))


@error
@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_a_bad_max_lag_is_named(vg: sg.Cell, bad: Any) -> None:
    params, x, _ = _problem(vg)
    with pytest.raises(sg.ShapeError, match="max_lag must be an integer >= 0"):
        sg.effective_lrs(vg, params, x, max_lag=bad)


# --------------------------------------------------------------------------- cell specs
@result
def test_a_one_unit_state_compiles_and_agrees_with_the_reference() -> None:
    @sg.cell
    def one_unit(h: sg.State("n"), s: sg.State(1), x: sg.Input("m"), W: sg.Matrix("n", "n"),
                 U: sg.Matrix("n", "m"), ws: sg.Vector("n"), wg: sg.Matrix(1, "n"), k: sg.Scalar()):
        return sg.tanh(W @ h + U @ x + ws * s), sg.tanh(k * s + wg @ h)

    params, x, loss = _problem(one_unit)
    h0 = {"h": np.zeros((B, N)), "s": np.full((B, 1), 0.3)}
    got = sg.compile(one_unit).backward(params, x, h0, loss=loss)
    want = sg.reference_kernel(one_unit).backward(params, x, h0, loss=loss)
    assert got.value == pytest.approx(float(want.value), rel=1e-12)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.h0["s"], want.h0["s"], rtol=1e-10, atol=1e-13)


def _cell_from(body: Callable[..., Any]) -> sg.Cell:
    return sg.cell(body)


@error
def test_sympy_piecewise_on_a_traced_quantity_is_a_cell_spec_error() -> None:
    def pw(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return sympy.Piecewise((h, True)) + sg.tanh(U @ x)
    with pytest.raises(sg.CellSpecError, match=r"body of cell 'pw' raised TypeError.*not SymPy or NumPy functions"):
        _cell_from(pw)


@error
def test_sympy_piecewise_of_a_free_symbol_is_an_unsupported_function() -> None:
    def pw2(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return h + sg.tanh(U @ x) * sympy.Piecewise((1, sympy.Symbol("a") > 0), (2, True))
    with pytest.raises(sg.UnsupportedFunctionError, match="Piecewise"):
        _cell_from(pw2)


@error
def test_numpy_where_in_a_body_is_a_cell_spec_error() -> None:
    def npw(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return np.where(h, h, sg.tanh(U @ x))
    with pytest.raises(sg.CellSpecError):
        _cell_from(npw)


@error
def test_a_body_that_raises_is_reported_with_its_cause() -> None:
    def divides(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return h / 0 + sg.tanh(U @ x) if False else 1 / 0  # noqa: B018 - the user's own bug
    with pytest.raises(sg.CellSpecError, match=r"body of cell 'divides' raised ZeroDivisionError") as info:
        _cell_from(divides)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@error
def test_branching_on_a_traced_value_is_a_cell_spec_error() -> None:
    def branches(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return h if h > 0 else sg.tanh(U @ x)
    with pytest.raises(sg.CellSpecError, match="cannot be compared"):
        _cell_from(branches)


@error
@pytest.mark.parametrize("dim", [2, 0, -1, 1.5, None, "1n"])
def test_a_state_of_a_fixed_or_malformed_dimension_is_refused(dim: Any) -> None:
    with pytest.raises(sg.CellSpecError, match="dimension"):
        sg.State(dim)


@error
def test_a_body_returning_too_few_states_is_named() -> None:
    def two(h: sg.State("n"), c: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return sg.tanh(U @ x) + h + c
    with pytest.raises(sg.CellSpecError, match="2"):
        _cell_from(two)


@error
def test_a_non_finite_constant_in_a_body_is_refused() -> None:
    def nanc(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return float("nan") * h + sg.tanh(U @ x)
    with pytest.raises(sg.CellSpecError, match="finite|nan|NaN"):
        _cell_from(nanc)


# --------------------------------------------------------------------------- dtypes
@error
@pytest.mark.parametrize("dtype, fragment", [
    ("complex128", "complex128 is a dtype of the numpy reference kernel"),
    ("int32", "int32 is not supported"),
    (None, "not None"),
    ("float128-ish", "not a numpy dtype"),
])
def test_compile_with_a_bad_dtype_is_a_dtype_error(vg: sg.Cell, dtype: Any, fragment: str) -> None:
    with pytest.raises(sg.DTypeError, match=fragment):
        sg.compile(vg, dtype)


@error
def test_compile_of_something_that_is_not_a_cell_is_named() -> None:
    with pytest.raises(sg.CellSpecError, match="expected a symgate Cell, got function"):
        sg.compile(lambda h: h)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- numerics
def _domain_cell(kind: str) -> sg.Cell:
    if kind == "log":
        def log_neg(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
            return 0.5 * h + sg.log(U @ x)
        return sg.cell(log_neg)

    def sqrt_neg(h: sg.State("n"), x: sg.Input("m"), U: sg.Matrix("n", "m")):
        return 0.5 * h + (U @ x) ** 0.5
    return sg.cell(sqrt_neg)


@error
@BACKENDS
@pytest.mark.parametrize("kind", ["log", "sqrt"])
def test_a_domain_error_is_named_as_one_not_as_an_overflow(backend: str, kind: str) -> None:
    cell = _domain_cell(kind)
    k = sg.compile(cell) if backend == "compiled" else sg.reference_kernel(cell)
    x = -np.abs(np.random.default_rng(0).standard_normal((T, B, M))) - 0.1
    with pytest.raises(sg.NumericalError, match=r"is NaN although every input is finite: a domain error") as info:
        k.forward({"U": np.ones((N, M))}, x, np.zeros((B, N)))
    assert "overflow" not in str(info.value)


@error
@BACKENDS
def test_an_overflow_is_named_as_one(backend: str) -> None:
    def blows_up(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
        return h * sg.exp(W @ h + U @ x) + 1
    cell = sg.cell(blows_up)
    k = sg.compile(cell) if backend == "compiled" else sg.reference_kernel(cell)
    x = np.random.default_rng(0).standard_normal((40, 2, M))
    with pytest.raises(sg.NumericalError, match=r"is infinite although every input is finite: an overflow"):
        k.forward({"W": np.full((N, N), 5.0), "U": np.ones((N, M))}, x, np.ones((2, N)))


# --------------------------------------------------------------------------- no compiler
@result
def test_kernels_without_a_compiler_falls_back_to_the_reference_with_a_warning(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))

    @sg.cell
    def no_cc(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
        return 0.6 * h + 0.4 * sg.tanh(W @ h + U @ x)

    with pytest.raises(sg.CompilerNotFoundError, match="no C compiler found"):
        sg.compile(no_cc)
    with pytest.warns(sg.SymgateWarning, match="no compiled kernel .*no C compiler found.*numpy reference"):
        k = sg.kernels(no_cc)
    assert k.backend == "numpy-reference"
    params, x, loss = _problem(no_cc)
    assert float(k.backward(params, x, loss=loss).value) > 0
    # a built-in cell needs no compiler: its prebuilt kernel loads
    assert sg.kernels(cached_builtin("gru")).backend == "compiled"


# --------------------------------------------------------------------------- symbolic API arguments
@error
@pytest.mark.parametrize("call, fragment", [
    (lambda c: sg.jacobian(c, np.zeros(3)), "of must be a name"),
    (lambda c: sg.parameter_jacobian(c, ["W"]), "param must be a name"),
    (lambda c: sg.parameter_jacobians(c, of=3), "of must be a name"),
    (lambda c: sg.effective_lr(c, {"W": 1}), "param must be a name"),
    (lambda c: sg.split(c, 3), "how must be a named split"),
    (lambda c: sg.expansion(c, None), "how must be a named split"),
    (lambda c: sg.decoupled(c, None), "params must be a dict of numpy arrays"),
    (lambda c: sg.tanh([1.0, 2.0]), "symgate.tanh takes a quantity of a cell body or a number, got builtins.list"),
    (lambda c: sg.sigmoid(None), "symgate.sigmoid takes"),
    (lambda c: sg.log(c), "symgate.log takes"),
], ids=["jacobian-of", "pjac-param", "pjacs-of", "elr-param", "split-how", "expansion-how", "decoupled", "tanh-list",
        "sigmoid-none", "log-cell"])
def test_symbolic_api_arguments_of_the_wrong_type_are_named(vg: sg.Cell, call: Callable[[sg.Cell], Any],
                                                            fragment: str) -> None:
    with pytest.raises(sg.CellSpecError if "dict of numpy" not in fragment else sg.DTypeError, match=fragment):
        call(vg)
