r"""Differential testing: the compiled kernel against the numpy reference, on fresh inputs.

:func:`compare_backends` runs one cell at one set of sizes through every entry point of a
compiled kernel -- ``forward``, ``backward`` (both losses), ``vjp``, ``jvp`` and a
``prepare``-d training step called several times -- and compares each result with the
numpy reference kernel of the same dtype.  Every call gets inputs drawn afresh (new
parameters, inputs, initial states, readouts and cotangents of the same shapes), so a
kernel that reads a buffer left over from an earlier call (a stale workspace) gives a
different answer from the reference.  With ``poison=True`` the compiled kernel's
workspaces and result buffers are also filled with NaN before every call
(:attr:`~symgate.CompiledKernel.workspace_fill`), so a value read before it is written, or
a result entry never written, cannot go unnoticed.

:func:`planned_decisions` says which of the kernel generator's decisions (structural, and
every call's run plan) such a comparison exercises, so a test can require that a sample of
cases takes every decision both ways.

Tolerance: both backends evaluate the same derived expressions in a different order (BLAS
and fused C loops against numpy), so results differ by rounding only.  Each value passes
through at most ``T + 1`` steps; per step it accumulates the rounding of dot products of
length ``K`` (the largest dimension) and of a few elementwise operations.  The bound is
``C_ROUND * (T + 1) * max(1, K / 8) * eps`` relative to the largest magnitude of the
compared quantity (at least 1), with ``C_ROUND = 64`` as in the battery (which uses
``K <= 5``, where the factor is 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from .._cell import Cell, Dim
from .._codegen import DEFAULT_POLICY, Policy, RunOptions, cell_plan, generate, run_plan, structural_decisions
from ..losses import LastMSE, StepMSE

__all__ = ["Difference", "compare_backends", "planned_decisions", "draw_arrays", "tolerance", "ENTRY_OPTIONS", "PARTS"]

C_ROUND = 64.0


@dataclass(frozen=True)
class Difference:
    """One compared quantity: ``what`` (e.g. ``"backward[last] d/dW"``), its relative error and tolerance."""

    what: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


def tolerance(sizes: Mapping[Any, int], T: int, dtype: Any) -> float:
    """The relative tolerance of compiled vs reference (see the module docstring)."""
    K = max(int(v) for v in sizes.values())
    return C_ROUND * (T + 1) * max(1.0, K / 8.0) * float(np.finfo(np.dtype(dtype)).eps)


def _matrix(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    a = rng.standard_normal(shape)
    s = np.linalg.norm(a, 2)
    return a * (rho / s) if s > 0 else a


def draw_arrays(cell: Cell, rng: np.random.Generator, sizes: Mapping[Any, int], T: int, B: int,
                dtype: Any = "float64") -> dict[str, Any]:
    """Fresh parameters (matrices scaled to spectral norm in [0.3, 0.9]), inputs N(0, 1), initial
    states U(-0.5, 0.5), a two-output readout with targets, and state cotangents."""
    dt = np.dtype(dtype)
    sz: dict[Dim, int] = {1: 1, **{d: int(sizes[d]) for d in cell.dims()}}
    params = {}
    for p in cell.params:
        shape = tuple(sz[d] for d in p.shape)
        a = _matrix(rng, shape, float(rng.uniform(0.3, 0.9))) if p.kind == "matrix" else 0.5 * rng.standard_normal(shape)
        params[p.name] = np.array(a, dtype=dt)  # (np.array keeps a scalar parameter 0-d)
    m = sz[cell.inputs[0].dim]
    n_out = sz[cell.states[0].dim]
    return {
        "params": params,
        "x": np.ascontiguousarray(rng.standard_normal((T, B, m)), dtype=dt),
        "h0": {s.name: np.ascontiguousarray(rng.uniform(-0.5, 0.5, (B, sz[s.dim])), dtype=dt) for s in cell.states},
        "V": np.ascontiguousarray(rng.standard_normal((2, n_out)) / np.sqrt(n_out), dtype=dt),
        "y_last": np.ascontiguousarray(rng.standard_normal((B, 2)), dtype=dt),
        "y_step": np.ascontiguousarray(rng.standard_normal((T, B, 2)), dtype=dt),
        "cot": {s.name: np.ascontiguousarray(rng.standard_normal((T, B, sz[s.dim])), dtype=dt) for s in cell.states},
        "tangents": {**{p: np.array(rng.standard_normal(np.shape(v)), dtype=dt) for p, v in params.items()},
                     "h0": {s.name: np.ascontiguousarray(rng.standard_normal((B, sz[s.dim])), dtype=dt) for s in cell.states},
                     "x": np.ascontiguousarray(rng.standard_normal((T, B, m)), dtype=dt)},
    }


def _rel(a: Any, ref: Any) -> float:
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - ref))) / max(1.0, float(np.max(np.abs(ref))))


def _grad_pairs(tag: str, gk: Any, gr: Any, with_x: bool = True) -> list[tuple[str, Any, Any]]:
    """Pairs (name, compiled, reference) of every gradient, copied (a prepared step reuses its arrays)."""
    pairs = [(f"{tag} d/d{p}", np.array(gk.params[p]), gr.params[p]) for p in gr.params]
    pairs += [(f"{tag} d/dh0[{s}]", np.array(gk.h0[s]), gr.h0[s]) for s in gr.h0]
    if with_x:
        pairs.append((f"{tag} d/dx", np.array(gk.x), gr.x))
    return pairs


def _forward_pairs(k: Any, r: Any, a: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    fk, fr = k.forward(a["params"], a["x"], a["h0"]), r.forward(a["params"], a["x"], a["h0"])
    pairs = [(f"forward state {s}", fk.states[s], fr.states[s]) for s in fr.states]
    return pairs + [(f"forward node {nd}", fk.nodes[nd], fr.nodes[nd]) for nd in fr.nodes]


def _backward_pairs(k: Any, r: Any, a: Mapping[str, Any], kind: str) -> list[tuple[str, Any, Any]]:
    loss = LastMSE(a["V"], a["y_last"]) if kind == "last" else StepMSE(a["V"], a["y_step"])
    gk, gr = k.backward(a["params"], a["x"], a["h0"], loss=loss), r.backward(a["params"], a["x"], a["h0"], loss=loss)
    tag = f"backward[{kind}]"
    pairs = [(f"{tag} loss", gk.value, gr.value), (f"{tag} d/dV", gk.readout["V"], gr.readout["V"])]
    return pairs + _grad_pairs(tag, gk, gr)


def _vjp_pairs(k: Any, r: Any, a: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    gk, gr = k.vjp(a["params"], a["x"], a["h0"], a["cot"]), r.vjp(a["params"], a["x"], a["h0"], a["cot"])
    return _grad_pairs("vjp", gk, gr)


def _jvp_pairs(k: Any, r: Any, a: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    jk = k.jvp(a["params"], a["x"], a["h0"], a["tangents"])
    jr = r.jvp(a["params"], a["x"], a["h0"], a["tangents"])
    return [(f"jvp {s}", jk[s], jr[s]) for s in jr]


def _prepared_pairs(k: Any, r: Any, cell: Cell, rng: np.random.Generator, sizes: Mapping[Any, int], T: int, B: int,
                    dtype: Any, calls: int, x_grad: bool) -> list[tuple[str, Any, Any]]:
    """A prepared step called ``calls`` times, the bound arrays overwritten in place with fresh
    values before each call (as a training loop does)."""
    a = draw_arrays(cell, rng, sizes, T, B, dtype)
    loss = LastMSE(a["V"], a["y_last"])
    step = k.prepare(a["params"], a["x"], a["h0"], loss=loss, x_grad=x_grad)
    pairs = []
    for call in range(calls):
        if call:
            fresh = draw_arrays(cell, rng, sizes, T, B, dtype)
            for p, v in fresh["params"].items():
                a["params"][p][...] = v
            a["x"][...] = fresh["x"]
            for s, v in fresh["h0"].items():
                a["h0"][s][...] = v
            a["y_last"][...] = fresh["y_last"]
        value = step()
        gr = r.backward(a["params"], a["x"], a["h0"], loss=loss)
        tag = f"prepared{'+x' if x_grad else ''} call {call}"
        pairs.append((f"{tag} loss", value, gr.value))
        pairs += _grad_pairs(tag, step.grads, gr, with_x=x_grad)
        pairs.append((f"{tag} d/dV", np.array(step.grads.readout["V"]), gr.readout["V"]))
    return pairs


#: the run options of every compiled call :func:`compare_backends` makes, by entry point
ENTRY_OPTIONS: dict[str, tuple[RunOptions, ...]] = {
    "forward": (RunOptions(store_all=True),),
    "backward": (RunOptions(loss="last", backward=True), RunOptions(loss="step", backward=True)),
    "vjp": (RunOptions(backward=True, cotangents=True),),
    "jvp": (RunOptions(jvp=True, store_all=True),),
    "prepared": (RunOptions(loss="last", backward=True, x_grad=False), RunOptions(loss="last", backward=True)),
}
PARTS = tuple(ENTRY_OPTIONS)


def planned_decisions(cell: Cell, sizes: Mapping[Any, int], *, T: int, B: int, dtype: Any = "float64",
                      policy: Policy = DEFAULT_POLICY, parts: Iterable[str] = PARTS) -> set[tuple[str, str, Any]]:
    """The decisions (kind, instance, value) the compiled kernel takes in :func:`compare_backends`
    for the same arguments: the generator's structural ones and every call's run plan.  Needs no
    compiler (the plan is computed from the generated program's description)."""
    gen = generate(cell, dtype)
    dims = {1: 1, **{d: int(sizes[d]) for d in cell.dims()}}
    out = set(structural_decisions(cell_plan(cell)))
    for part in parts:
        for opt in ENTRY_OPTIONS[part]:
            out |= set(run_plan(gen, dims, T, B, opt, o=2 if opt.loss else 1, policy=policy).decisions())
    return out


def compare_backends(cell: Cell, sizes: Mapping[Any, int], *, T: int, B: int, seed: int = 0, dtype: Any = "float64",
                     poison: bool = True, prepared_calls: int = 3, parts: Iterable[str] | None = None,
                     policy: Policy = DEFAULT_POLICY, plans: list | None = None) -> list[Difference]:
    """Compare the compiled kernel of ``cell`` with the numpy reference at ``sizes`` (dimension
    name -> size), ``T`` steps and batch ``B``, on fresh inputs for every call.

    ``parts`` selects entry points among ``"forward"``, ``"backward"``, ``"vjp"``, ``"jvp"``,
    ``"prepared"`` (all by default); ``policy`` sets the thresholds of the kernel's run plan
    (to force either side of its decisions); ``plans``, if a list, receives every run plan the
    kernel used.  Returns one :class:`Difference` per compared array.
    """
    from .._compiled import compile as _compile
    from .._reference import reference_kernel

    k, r = _compile(cell, dtype), reference_kernel(cell, dtype)
    chosen = set(parts) if parts is not None else set(PARTS)
    rng = np.random.default_rng(seed)
    fresh = lambda: draw_arrays(cell, rng, sizes, T, B, dtype)  # noqa: E731
    saved = (k.workspace_fill, k.policy, k.plan_log)
    k.workspace_fill = np.nan if poison else None
    k.policy, k.plan_log = policy, plans
    try:
        pairs: list[tuple[str, Any, Any]] = []
        if "forward" in chosen:
            pairs += _forward_pairs(k, r, fresh())
        if "backward" in chosen:
            pairs += _backward_pairs(k, r, fresh(), "last") + _backward_pairs(k, r, fresh(), "step")
            pairs += _backward_pairs(k, r, fresh(), "last")  # again, on other values: stale buffers show
        if "vjp" in chosen:
            pairs += _vjp_pairs(k, r, fresh())
        if "jvp" in chosen:
            pairs += _jvp_pairs(k, r, fresh())
        if "prepared" in chosen:
            pairs += _prepared_pairs(k, r, cell, rng, sizes, T, B, dtype, prepared_calls, x_grad=False)
            pairs += _prepared_pairs(k, r, cell, rng, sizes, T, B, dtype, 2, x_grad=True)
    finally:
        k.workspace_fill, k.policy, k.plan_log = saved
    tol = tolerance({d: sizes[d] for d in cell.dims()}, T, dtype)
    return [Difference(what, _rel(a, b), tol) for what, a, b in pairs]
