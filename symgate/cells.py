r"""Built-in cells, written with the same public API a user has.

Each factory returns a :class:`~symgate.Cell`.  ``bias`` adds a bias vector to
every pre-activation.  Notation follows the paper notes: the gate ``g`` is the
*update* coefficient (it multiplies the candidate ``phi``), ``1 - g`` is the
retention of the previous state.

============  ==============================================================
cell          update
============  ==============================================================
plain         :math:`h' = \tanh(W h + U x [+ b])`
leaky         :math:`h' = (1-\alpha) h + \alpha \tanh(W h + U x [+ b])`
scalar_gate   :math:`g = \sigma(w_g h + u_g x [+ c])` (scalar), :math:`h' = (1-g) h + g\phi`
vector_gate   :math:`g = \sigma(W_g h + U_g x [+ c])` (per unit), :math:`h' = (1-g)\odot h + g\odot\phi`
gru           :math:`z, r` gates; candidate :math:`\tilde h = \tanh(W_n (r\odot h) + U_n x)` (``cand``); :math:`h' = (1-z) h + z \tilde h`
lstm          :math:`i, f, o` gates; :math:`c' = f c + i \tanh(\cdot)`; :math:`h' = o \tanh(c')`
mgu           :math:`f = \sigma(W_f h + U_f x)`; :math:`\tilde h = \tanh(W_n (f\odot h) + U_n x)`; :math:`h' = (1-f) h + f\tilde h`
============  ==============================================================
"""

from __future__ import annotations

from typing import Callable

from ._cell import Cell, Constant, Input, Matrix, State, Vector, make_cell
from ._errors import CellSpecError
from ._functions import sigmoid, tanh

__all__ = ["plain", "leaky", "scalar_gate", "vector_gate", "gru", "lstm", "mgu", "BUILTIN", "builtin"]


def _specs(base: dict, bias_names: tuple[str, ...], bias: bool) -> dict:
    specs = dict(base)
    if bias:
        for b in bias_names:
            specs[b] = Vector("n")
    return specs


def _bias(biases: dict, name: str) -> object:
    return biases.get(name, 0)


def plain(*, bias: bool = True) -> Cell:
    """Plain tanh RNN: ``h' = tanh(W h + U x + b)``; Jacobian ``diag(1 - phi^2) W``."""

    def plain(h, x, W, U, **b):  # type: ignore[no-untyped-def]
        phi = tanh(W @ h + U @ x + _bias(b, "b"))
        return phi

    spec = {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m")}
    return _build(plain, _specs(spec, ("b",), bias))


def leaky(alpha: float = 0.8, *, bias: bool = True) -> Cell:
    """Leaky integrator with constant rate ``alpha``: ``h' = (1-alpha) h + alpha tanh(W h + U x + b)``."""

    def leaky(h, x, W, U, alpha, **b):  # type: ignore[no-untyped-def]
        phi = tanh(W @ h + U @ x + _bias(b, "b"))
        return (1 - alpha) * h + alpha * phi

    spec = {"h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m"), "alpha": Constant(alpha)}
    return _build(leaky, _specs(spec, ("b",), bias))


def scalar_gate(*, bias: bool = True) -> Cell:
    """One gate shared by all units: ``g = sigmoid(wg h + ug x + c)`` (a scalar), ``h' = (1-g) h + g phi``."""

    def scalar_gate(h, x, W, U, wg, ug, **b):  # type: ignore[no-untyped-def]
        g = sigmoid(wg @ h + ug @ x + _bias(b, "c"))
        phi = tanh(W @ h + U @ x + _bias(b, "b"))
        return (1 - g) * h + g * phi

    spec = {
        "h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m"),
        "wg": Matrix(1, "n"), "ug": Matrix(1, "m"),
    }
    specs = dict(spec)
    if bias:
        specs["b"] = Vector("n")
        from ._cell import Scalar

        specs["c"] = Scalar()
    return _build(scalar_gate, specs)


def vector_gate(*, bias: bool = True) -> Cell:
    """Per-unit gate (the paper's multi-gate): ``g = sigmoid(Wg h + Ug x + c)``, ``h' = (1-g) h + g phi``."""

    def vector_gate(h, x, W, U, Wg, Ug, **b):  # type: ignore[no-untyped-def]
        g = sigmoid(Wg @ h + Ug @ x + _bias(b, "c"))
        phi = tanh(W @ h + U @ x + _bias(b, "b"))
        return (1 - g) * h + g * phi

    spec = {
        "h": State("n"), "x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m"),
        "Wg": Matrix("n", "n"), "Ug": Matrix("n", "m"),
    }
    return _build(vector_gate, _specs(spec, ("b", "c"), bias))


def gru(*, bias: bool = True) -> Cell:
    """GRU with update gate ``z`` and reset gate ``r`` (reset applied before ``W_n``)."""

    def gru(h, x, Wz, Uz, Wr, Ur, Wn, Un, **b):  # type: ignore[no-untyped-def]
        z = sigmoid(Wz @ h + Uz @ x + _bias(b, "bz"))
        r = sigmoid(Wr @ h + Ur @ x + _bias(b, "br"))
        cand = tanh(Wn @ (r * h) + Un @ x + _bias(b, "bn"))
        return (1 - z) * h + z * cand

    spec = {"h": State("n"), "x": Input("m")}
    for k in ("z", "r", "n"):
        spec[f"W{k}"] = Matrix("n", "n")
        spec[f"U{k}"] = Matrix("n", "m")
    return _build(gru, _specs(spec, ("bz", "br", "bn"), bias))


def lstm(*, bias: bool = True) -> Cell:
    """LSTM with states ``(h, c)``: ``c' = f c + i g``, ``h' = o tanh(c')``."""

    def lstm(h, c, x, Wi, Ui, Wf, Uf, Wo, Uo, Wc, Uc, **b):  # type: ignore[no-untyped-def]
        i = sigmoid(Wi @ h + Ui @ x + _bias(b, "bi"))
        f = sigmoid(Wf @ h + Uf @ x + _bias(b, "bf"))
        o = sigmoid(Wo @ h + Uo @ x + _bias(b, "bo"))
        g = tanh(Wc @ h + Uc @ x + _bias(b, "bc"))
        c_new = f * c + i * g
        tc = tanh(c_new)
        return o * tc, c_new

    spec = {"h": State("n"), "c": State("n"), "x": Input("m")}
    for k in ("i", "f", "o", "c"):
        spec[f"W{k}"] = Matrix("n", "n")
        spec[f"U{k}"] = Matrix("n", "m")
    return _build(lstm, _specs(spec, ("bi", "bf", "bo", "bc"), bias))


def mgu(*, bias: bool = True) -> Cell:
    """Minimal gated unit: one forget gate ``f`` acting as both update and reset."""

    def mgu(h, x, Wf, Uf, Wn, Un, **b):  # type: ignore[no-untyped-def]
        f = sigmoid(Wf @ h + Uf @ x + _bias(b, "bf"))
        cand = tanh(Wn @ (f * h) + Un @ x + _bias(b, "bn"))
        return (1 - f) * h + f * cand

    spec = {"h": State("n"), "x": Input("m"), "Wf": Matrix("n", "n"), "Uf": Matrix("n", "m"),
            "Wn": Matrix("n", "n"), "Un": Matrix("n", "m")}
    return _build(mgu, _specs(spec, ("bf", "bn"), bias))


def _build(fn: Callable, specs: dict) -> Cell:
    import inspect

    # the body takes its biases as keyword arguments: give make_cell a signature that lists them
    names = list(specs)

    def body(*args):  # type: ignore[no-untyped-def]
        kw = dict(zip(names, args))
        fixed = [p for p in inspect.signature(fn).parameters if p != "b"]
        pos = [kw.pop(p) for p in fixed]
        return fn(*pos, **kw)

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    body.__name__ = fn.__name__
    body.__wrapped__ = fn  # type: ignore[attr-defined]  # so local names (g, phi, ...) are captured
    return make_cell(body, specs, name=fn.__name__)


#: Factories of the built-in cells, by name.
BUILTIN: dict[str, Callable[..., Cell]] = {
    "plain": plain,
    "leaky": leaky,
    "scalar_gate": scalar_gate,
    "vector_gate": vector_gate,
    "gru": gru,
    "lstm": lstm,
    "mgu": mgu,
}


def builtin(name: str, **options: object) -> Cell:
    """The built-in cell ``name`` (see :data:`BUILTIN`), built with ``options``."""
    try:
        factory = BUILTIN[name]
    except KeyError:
        raise CellSpecError(f"unknown built-in cell {name!r}; available: {', '.join(BUILTIN)}") from None
    import inspect

    allowed = list(inspect.signature(factory).parameters)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise CellSpecError(f"built-in cell {name!r} has no option(s) {unknown}; its options are {allowed}")
    return factory(**options)  # type: ignore[arg-type]
