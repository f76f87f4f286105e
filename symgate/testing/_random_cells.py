r"""Randomly generated valid cells, composed from gates, leaks and candidates.

A :class:`Recipe` fixes the structure of a cell; :func:`build` turns it into a
:class:`~symgate.Cell` with the public API, the same way a user writes one.  The
recipe space covers the paper's family and goes beyond it:

* candidate activation: ``tanh``, a centred logistic ``2 sigmoid(a) - 1``, a
  centred softplus ``softplus(a) - log 2``, or ``tanh`` of ``exp``-scaled drive;
* reset: none, a per-unit reset gate (``W @ (r * h)``, GRU-like) or a scalar one;
* gate: none (plain), constant rate alpha, a learnable scalar-parameter rate
  ``sigmoid(s)``, a scalar gate, a vector gate, or a retention written in the log
  domain ``lam = exp(-softplus(.))`` (so ``1 - lam`` is the write gain);
* update form: convex (``(1-g) h + g phi``) or additive (``(1-g) h + phi``);
* optional output gate, optional biases, and a two-state (LSTM-like) family.

:func:`random_cell_pool` draws a fixed, seeded pool of distinct recipes, so a
test run's compile/derive cost is bounded and reproducible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from .._cell import Cell, Constant, Input, Matrix, Scalar, State, Vector, make_cell
from .._errors import ConfigError
from .._functions import exp, sigmoid, softplus, tanh

__all__ = ["Recipe", "build", "all_recipes", "random_cell_pool", "ACTIVATIONS", "RESETS", "GATES", "FORMS"]

ACTIVATIONS = ("tanh", "logistic", "softplus", "exp_tanh")
RESETS = ("none", "vector", "scalar")
GATES = ("none", "const", "param", "scalar", "vector", "logdomain")
FORMS = ("convex", "additive")


@dataclass(frozen=True)
class Recipe:
    """The structure of a random cell (see the module docstring)."""

    activation: str = "tanh"
    reset: str = "none"
    gate: str = "vector"
    form: str = "convex"
    out_gate: bool = False
    bias: bool = True
    two_state: bool = False
    alpha: float = 0.5

    @property
    def name(self) -> str:
        parts = ["rc", self.activation, self.reset, self.gate, self.form]
        if self.out_gate:
            parts.append("og")
        if self.bias:
            parts.append("b")
        if self.two_state:
            parts.append("2s")
        return "_".join(parts)


def _act(kind: str, a: Any) -> Any:
    if kind == "tanh":
        return tanh(a)
    if kind == "logistic":
        return 2 * sigmoid(a) - 1
    if kind == "softplus":
        return softplus(a) - sympy.log(2)
    if kind == "exp_tanh":
        return tanh(a * exp(-(a * a) / 4))
    raise ValueError(kind)


def build(r: Recipe) -> Cell:
    """The cell a recipe describes."""
    specs: dict[str, Any] = {"h": State("n")}
    if r.two_state:
        specs["c"] = State("n")
    specs.update({"x": Input("m"), "W": Matrix("n", "n"), "U": Matrix("n", "m")})
    if r.bias:
        specs["b"] = Vector("n")
    if r.reset == "vector":
        specs.update({"Wr": Matrix("n", "n"), "Ur": Matrix("n", "m")})
    elif r.reset == "scalar":
        specs.update({"wr": Matrix(1, "n"), "ur": Matrix(1, "m")})
    if r.gate == "const":
        specs["alpha"] = Constant(r.alpha)
    elif r.gate == "param":
        specs["s"] = Scalar()
    elif r.gate == "scalar":
        specs.update({"wg": Matrix(1, "n"), "ug": Matrix(1, "m")})
        if r.bias:
            specs["cg"] = Scalar()
    elif r.gate in ("vector", "logdomain"):
        specs.update({"Wg": Matrix("n", "n"), "Ug": Matrix("n", "m")})
        if r.bias:
            specs["cg"] = Vector("n")
    if r.out_gate or r.two_state:
        specs.update({"Wo": Matrix("n", "n"), "Uo": Matrix("n", "m")})
    names = list(specs)

    def body(*args: Any) -> Any:
        a = dict(zip(names, args))
        h, x = a["h"], a["x"]
        bias = a.get("b", 0)
        if r.reset == "vector":
            rg = sigmoid(a["Wr"] @ h + a["Ur"] @ x)
            drive = a["W"] @ (rg * h)
        elif r.reset == "scalar":
            rg = sigmoid(a["wr"] @ h + a["ur"] @ x)
            drive = a["W"] @ (rg * h)
        else:
            drive = a["W"] @ h
        phi = _act(r.activation, drive + a["U"] @ x + bias)
        g = None
        lam = None
        if r.gate == "const":
            g = a["alpha"]
        elif r.gate == "param":
            g = sigmoid(a["s"])
        elif r.gate == "scalar":
            g = sigmoid(a["wg"] @ h + a["ug"] @ x + a.get("cg", 0))
        elif r.gate == "vector":
            g = sigmoid(a["Wg"] @ h + a["Ug"] @ x + a.get("cg", 0))
        elif r.gate == "logdomain":
            lam = exp(-softplus(a["Wg"] @ h + a["Ug"] @ x + a.get("cg", 0))).as_gate()
        if r.two_state:
            c = a["c"]
            keep = (1 - g) if g is not None else lam
            write = g if g is not None else (1 - lam)
            c_new = keep * c + write * phi
            o = sigmoid(a["Wo"] @ h + a["Uo"] @ x)
            return o * tanh(c_new) + (0.1 * h if r.form == "additive" else 0), c_new
        if g is None and lam is None:
            new = phi + (0.5 * h if r.form == "additive" else 0)
        else:
            keep = (1 - g) if g is not None else lam
            write = g if g is not None else (1 - lam)
            new = keep * h + (write * phi if r.form == "convex" else phi)
        if r.out_gate:
            o = sigmoid(a["Wo"] @ h + a["Uo"] @ x)
            new = o * new + (1 - o) * h
        return new

    import inspect

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(nm, inspect.Parameter.POSITIONAL_OR_KEYWORD) for nm in names]
    )
    return make_cell(body, specs, name=r.name)


def all_recipes() -> list[Recipe]:
    """Every structural recipe (alpha fixed); the pool samples from these."""
    out = []
    for act, reset, gate, form, og, bias, two in itertools.product(
        ACTIVATIONS, RESETS, GATES, FORMS, (False, True), (False, True), (False, True)
    ):
        if two and (og or gate == "none"):
            continue  # a two-state cell always has its own output gate and a cell-state gate
        out.append(Recipe(act, reset, gate, form, og, bias, two))
    return out


def random_cell_pool(count: int = 200, seed: int = 0) -> list[Recipe]:
    """A fixed, seeded pool of ``count`` distinct recipes (constant rates drawn in (0.05, 0.95))."""
    recipes = all_recipes()
    rng = np.random.default_rng(seed)
    if count > len(recipes):
        raise ConfigError(f"count={count} exceeds the {len(recipes)} distinct recipes")
    idx = rng.choice(len(recipes), size=count, replace=False)
    pool = []
    for i in sorted(int(j) for j in idx):
        r = recipes[i]
        alpha = float(np.round(rng.uniform(0.05, 0.95), 3))
        pool.append(Recipe(r.activation, r.reset, r.gate, r.form, r.out_gate, r.bias, r.two_state, alpha))
    return pool
