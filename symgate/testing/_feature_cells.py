r"""A seeded pool of cells that together use every feature of the cell language.

The built-in cells and the random recipes of :mod:`._random_cells` are all variations of
one pattern (a candidate ``tanh(W h + U x + b)`` mixed with the state by a gate).  The
kernel generator takes many other decisions for cells outside that pattern, so the
differential tests (compiled kernel against the numpy reference) run on this pool.  Each
entry names the features it exercises:

* weights that read only the input, feeding a gate (``sigmoid(Ug x)``) or a candidate
  (``tanh(U x)``), and Linear nodes reading a state-independent node (``U2 tanh(U1 x)``);
* vector and scalar parameters acting on the state (``w*h``, ``s*h``), biases, constants;
* gates from a scalar parameter (``sigmoid(theta)``), scalar gates (one-row matrices),
  gates marked with ``as_gate``;
* two states (also of different sizes: a one-unit ``State(1)``), Linear nodes reading gated states (``W (r*h)``), chains that start with a
  parameter matrix (``W (g*h)`` read directly by the update);
* matrices applied to a parameter alone (``P @ c``, ``Q @ v``);
* every elementwise function (tanh, sigmoid, exp, log, softplus) and arithmetic
  (division, powers), the input read elementwise (``x`` of the state's dimension).

:func:`feature_cells` returns them by name; they are built once per process.
"""

from __future__ import annotations

from typing import Any, Callable

from .._cell import Cell, Constant, Input, Matrix, Scalar, State, Vector, make_cell
from .._functions import exp, log, sigmoid, softplus, tanh

__all__ = ["FEATURES", "feature_cells", "feature_cell"]

_CACHE: dict[str, Cell] = {}


def _make(name: str, specs: dict[str, Any], body: Callable[..., Any]) -> Cell:
    import inspect

    names = list(specs)
    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(nm, inspect.Parameter.POSITIONAL_OR_KEYWORD) for nm in names])
    return make_cell(body, specs, name=name)


def _std(**extra: Any) -> dict[str, Any]:
    return {"h": State("n"), "x": Input("m"), **extra}


def _xgate() -> Cell:
    def body(h, x, W, Ug):  # type: ignore[no-untyped-def]
        g = sigmoid(Ug @ x)
        return (1 - g) * h + g * tanh(W @ h)
    return _make("fc_xgate", _std(W=Matrix("n", "n"), Ug=Matrix("n", "m")), body)


def _xcandidate() -> Cell:
    def body(h, x, Wg, U):  # type: ignore[no-untyped-def]
        g = sigmoid(Wg @ h)
        return (1 - g) * h + g * tanh(U @ x)
    return _make("fc_xcandidate", _std(Wg=Matrix("n", "n"), U=Matrix("n", "m")), body)


def _static_chain() -> Cell:
    def body(h, x, W, U1, U2, b):  # type: ignore[no-untyped-def]
        e = tanh(U1 @ x + b)
        return tanh(W @ h + U2 @ e)
    return _make("fc_static_chain", _std(W=Matrix("n", "n"), U1=Matrix("k", "m"), U2=Matrix("n", "k"), b=Vector("k")), body)


def _vector_recurrence() -> Cell:
    def body(h, x, w, U, b, alpha):  # type: ignore[no-untyped-def]
        phi = tanh(w * h + U @ x + b)
        return (1 - alpha) * h + alpha * phi
    return _make("fc_vector_recurrence", _std(w=Vector("n"), U=Matrix("n", "m"), b=Vector("n"), alpha=Constant(0.7)), body)


def _vector_gate_param() -> Cell:
    def body(h, x, v, W, U, Ug):  # type: ignore[no-untyped-def]
        g = sigmoid(v * h + Ug @ x)
        return (1 - g) * h + g * tanh(W @ h + U @ x)
    return _make("fc_vector_gate_param", _std(v=Vector("n"), W=Matrix("n", "n"), U=Matrix("n", "m"), Ug=Matrix("n", "m")), body)


def _scalar_recurrence() -> Cell:
    def body(h, x, s, W, U):  # type: ignore[no-untyped-def]
        return s * h + tanh(W @ h + U @ x) * 0.5
    return _make("fc_scalar_recurrence", _std(s=Scalar(), W=Matrix("n", "n"), U=Matrix("n", "m")), body)


def _scalar_param_gate() -> Cell:
    def body(h, x, theta, W, U, b):  # type: ignore[no-untyped-def]
        a = sigmoid(theta)
        return (1 - a) * h + a * tanh(W @ h + U @ x + b)
    return _make("fc_scalar_param_gate", _std(theta=Scalar(), W=Matrix("n", "n"), U=Matrix("n", "m"), b=Vector("n")), body)


def _scalar_gate_input() -> Cell:
    def body(h, x, wg, ug, W, U, c):  # type: ignore[no-untyped-def]
        g = sigmoid(wg @ h + ug @ x + c)
        return (1 - g) * h + g * tanh(W @ h + U @ x)
    return _make("fc_scalar_gate", _std(wg=Matrix(1, "n"), ug=Matrix(1, "m"), W=Matrix("n", "n"), U=Matrix("n", "m"), c=Scalar()), body)


def _reset() -> Cell:
    def body(h, x, Wz, Uz, Wr, Ur, Wn, Un, bn):  # type: ignore[no-untyped-def]
        z = sigmoid(Wz @ h + Uz @ x)
        r = sigmoid(Wr @ h + Ur @ x)
        cand = tanh(Wn @ (r * h) + Un @ x + bn)
        return (1 - z) * h + z * cand
    specs = _std(Wz=Matrix("n", "n"), Uz=Matrix("n", "m"), Wr=Matrix("n", "n"), Ur=Matrix("n", "m"),
                 Wn=Matrix("n", "n"), Un=Matrix("n", "m"), bn=Vector("n"))
    return _make("fc_reset", specs, body)


def _matrix_first_chain() -> Cell:
    def body(h, x, U, Wg, W):  # type: ignore[no-untyped-def]
        g = sigmoid(Wg @ h)
        return 0.5 * tanh(U @ x) + W @ (g * h)
    return _make("fc_matrix_first", _std(U=Matrix("n", "m"), Wg=Matrix("n", "n"), W=Matrix("n", "n")), body)


def _two_state() -> Cell:
    def body(h, c, x, Wf, Uf, Wc, Uc, Wo, bf):  # type: ignore[no-untyped-def]
        f = sigmoid(Wf @ h + Uf @ x + bf)
        c_new = f * c + (1 - f) * tanh(Wc @ h + Uc @ x)
        o = sigmoid(Wo @ c)
        return o * tanh(c_new), c_new
    specs = {"h": State("n"), "c": State("n"), "x": Input("m"), "Wf": Matrix("n", "n"), "Uf": Matrix("n", "m"),
             "Wc": Matrix("n", "n"), "Uc": Matrix("n", "m"), "Wo": Matrix("n", "n"), "bf": Vector("n")}
    return _make("fc_two_state", specs, body)


def _one_unit_state() -> Cell:
    def body(h, s, x, W, U, ws, wg, k):  # type: ignore[no-untyped-def]
        # a one-unit state s (State(1)) broadcast into the vector state's update, and read back by wg @ h
        return tanh(W @ h + U @ x + ws * s), tanh(k * s + wg @ h)
    specs = {"h": State("n"), "s": State(1), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m"),
             "ws": Vector("n"), "wg": Matrix(1, "n"), "k": Scalar()}
    return _make("fc_one_unit_state", specs, body)


def _functions() -> Cell:
    def body(h, x, W, U, Wg, b):  # type: ignore[no-untyped-def]
        a = W @ h + U @ x + b
        sp = softplus(a)
        g = sigmoid(Wg @ h)
        e = exp(-sp)
        l = log(1 + g * g)
        return (1 - g) * h + g * tanh(a) * e + 0.1 * l
    return _make("fc_functions", _std(W=Matrix("n", "n"), U=Matrix("n", "m"), Wg=Matrix("n", "n"), b=Vector("n")), body)


def _arithmetic() -> Cell:
    def body(h, x, W, U, Wg):  # type: ignore[no-untyped-def]
        g = sigmoid(Wg @ h)
        phi = tanh(W @ h + U @ x)
        return (h + g * phi ** 3) / (1 + g * g) + 0.25 * h ** 2 * phi
    return _make("fc_arithmetic", _std(W=Matrix("n", "n"), U=Matrix("n", "m"), Wg=Matrix("n", "n")), body)


def _log_domain_gate() -> Cell:
    def body(h, x, Wg, Ug, W, U):  # type: ignore[no-untyped-def]
        lam = exp(-softplus(Wg @ h + Ug @ x)).as_gate()
        return lam * h + (1 - lam) * tanh(W @ h + U @ x)
    return _make("fc_log_domain", _std(Wg=Matrix("n", "n"), Ug=Matrix("n", "m"), W=Matrix("n", "n"), U=Matrix("n", "m")), body)


def _input_elementwise() -> Cell:
    def body(h, x, W, Wg):  # type: ignore[no-untyped-def]
        g = sigmoid(Wg @ h + x)
        return (1 - g) * h + g * tanh(W @ h + 0.5 * x)
    return _make("fc_input_elementwise", {"h": State("n"), "x": Input("n"), "W": Matrix("n", "n"), "Wg": Matrix("n", "n")}, body)


def _shared_node() -> Cell:
    def body(h, x, W, U, Wg, Ug, b):  # type: ignore[no-untyped-def]
        u = (U @ x + b).named("u")
        g = sigmoid(Wg @ h + Ug @ x + u)
        phi = tanh(W @ h + u)
        return (1 - g) * h + g * phi * phi
    specs = _std(W=Matrix("n", "n"), U=Matrix("n", "m"), Wg=Matrix("n", "n"), Ug=Matrix("n", "m"), b=Vector("n"))
    return _make("fc_shared_node", specs, body)


def _scalar_state_readout() -> Cell:
    def body(h, x, W, U, wq, uq):  # type: ignore[no-untyped-def]
        q = tanh(wq @ h + uq @ x)  # a scalar node read by every unit
        return tanh(W @ h + U @ x) * (1 + 0.5 * q) * 0.5 + 0.3 * h * q
    return _make("fc_scalar_node", _std(W=Matrix("n", "n"), U=Matrix("n", "m"), wq=Matrix(1, "n"), uq=Matrix(1, "m")), body)


def _static_gate_node() -> Cell:
    def body(h, x, W, U, Ug, bg):  # type: ignore[no-untyped-def]
        g = sigmoid(Ug @ x + bg)  # state-independent gate, read in the time loop
        phi = tanh(W @ h + U @ x)
        return (1 - g) * h + g * phi
    return _make("fc_static_gate", _std(W=Matrix("n", "n"), U=Matrix("n", "m"), Ug=Matrix("n", "m"), bg=Vector("n")), body)


def _param_products() -> Cell:
    def body(h, x, W, U, Pc, c, Pv, v):  # type: ignore[no-untyped-def]
        # matrices applied to parameters alone: constant in time and over the batch
        return 0.5 * h + 0.5 * tanh(W @ h + U @ x + Pc @ c + Pv @ v)
    specs = _std(W=Matrix("n", "n"), U=Matrix("n", "m"), Pc=Matrix("n", 1), c=Scalar(), Pv=Matrix("n", "k"), v=Vector("k"))
    return _make("fc_param_product", specs, body)


#: name -> (builder, features it exercises)
FEATURES: dict[str, tuple[Callable[[], Cell], tuple[str, ...]]] = {
    "fc_xgate": (_xgate, ("input-only weight in a gate",)),
    "fc_xcandidate": (_xcandidate, ("input-only weight in a candidate",)),
    "fc_static_chain": (_static_chain, ("Linear reading a state-independent node", "second dimension k")),
    "fc_vector_recurrence": (_vector_recurrence, ("vector parameter on the state", "constant")),
    "fc_vector_gate_param": (_vector_gate_param, ("vector parameter on the state in a gate",)),
    "fc_scalar_recurrence": (_scalar_recurrence, ("scalar parameter on the state",)),
    "fc_scalar_param_gate": (_scalar_param_gate, ("scalar-parameter gate",)),
    "fc_scalar_gate": (_scalar_gate_input, ("one-row matrices (scalar gate)", "scalar bias")),
    "fc_reset": (_reset, ("Linear reading a gated state",)),
    "fc_matrix_first": (_matrix_first_chain, ("chain starting with a parameter matrix",)),
    "fc_two_state": (_two_state, ("two states",)),
    "fc_one_unit_state": (_one_unit_state, ("one-unit state (State(1))", "two states of different sizes")),
    "fc_functions": (_functions, ("softplus", "exp", "log")),
    "fc_arithmetic": (_arithmetic, ("division", "powers")),
    "fc_log_domain": (_log_domain_gate, ("as_gate", "exp of softplus")),
    "fc_input_elementwise": (_input_elementwise, ("input read elementwise",)),
    "fc_shared_node": (_shared_node, ("node read by several owners", "named arithmetic node")),
    "fc_scalar_node": (_scalar_state_readout, ("scalar node broadcast over units",)),
    "fc_static_gate": (_static_gate_node, ("state-independent elementwise node read in the loop",)),
    "fc_param_product": (_param_products, ("Linear reading a scalar or vector parameter alone",)),
}


def feature_cell(name: str) -> Cell:
    """The pool cell ``name``, built once per process."""
    if name not in _CACHE:
        _CACHE[name] = FEATURES[name][0]()
    return _CACHE[name]


def feature_cells() -> dict[str, Cell]:
    """Every cell of the pool, by name."""
    return {name: feature_cell(name) for name in FEATURES}
