r"""numpy reference kernels, generated from a cell's derivation.

No cell has hand-written kernel code here: the forward pass evaluates each node's
expression, lambdified from the cell IR; BPTT and forward-mode JVPs evaluate the
*local partials* derived once in :mod:`symgate._derive._local`, with the chain rule
through ``Linear`` nodes done by matrix products.  Quantities that do not depend
on the state (input projections ``U @ x``, ``+ b``) are computed for all steps at
once before the time loop, and the gradients of their matrices as one product
over ``T*B`` after it.

Non-finite results: values computed from finite inputs that come out NaN or infinite (an
overflow, the log of a negative number, a division by zero) raise
:class:`~symgate.NumericalError` naming the stage (forward pass, loss, gradient, tangent),
exactly where the compiled kernels raise it; numpy's floating-point warnings are not
emitted.

Array conventions: ``x`` is ``(T, B, m)``; states are ``(B, n)``; trajectories are
``(T, B, n)`` and hold the states *after* steps ``1..T``; parameters are a dict of
arrays shaped as declared (``Matrix(r, c)`` -> ``(r, c)``, ``Vector`` -> ``(d,)``,
``Scalar`` -> ``()``).  Arrays must be C-contiguous, of the kernel's dtype, and
finite (see :mod:`symgate._validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import sympy

from ._cell import Cell, Dim
from ._derive import jacobian as _jacobian
from ._derive import parameter_jacobian as _parameter_jacobian
from ._derive._program import Step, program
from ._errors import CellSpecError, NumericalError, ShapeError
from ._functions import NUMPY_FUNCTIONS
from ._linalg import matmul
from ._validate import check_array, check_dtype, check_params, check_states, resolve_sizes
from .losses import Loss

__all__ = ["ReferenceKernel", "Trajectory", "Gradients"]


@dataclass
class Trajectory:
    """Result of a forward pass.

    ``states[s]`` is ``(T, B, d)``: the state after each step; ``nodes[name]`` the
    per-step values of every interior node (gates, candidates, pre-activations),
    ``(T, B, d)``; ``h0`` the initial states; ``sizes`` the resolved dimensions; ``aux`` the
    companion values of the derivation's stable forms (e.g. ``1-g`` as ``sigmoid(-u)``).
    """

    states: dict[str, np.ndarray]
    nodes: dict[str, np.ndarray]
    h0: dict[str, np.ndarray]
    x: np.ndarray
    sizes: dict[Dim, int]
    #: companion values (stable complements such as ``1-g``) that BPTT and JVP read, ``(T, B, d)``
    aux: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def h(self) -> np.ndarray:
        """The first state's trajectory ``(T, B, n)``."""
        return next(iter(self.states.values()))

    def previous(self, state: str) -> np.ndarray:
        """States *before* each step, ``(T, B, d)``: ``h0, h_1, ..., h_{T-1}``."""
        s = self.states[state]
        return np.concatenate([self.h0[state][None], s[:-1]], axis=0)


@dataclass
class Gradients:
    """Result of BPTT: ``params`` (same shapes as the parameters), ``h0`` (initial states),
    ``x`` (inputs, ``(T, B, m)``), ``readout`` (loss parameters) and the loss ``value``."""

    params: dict[str, np.ndarray]
    h0: dict[str, np.ndarray]
    x: np.ndarray
    value: Any = None
    readout: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.params[name]


def _lambdify(expr: sympy.Expr) -> tuple[Callable[..., Any], tuple[str, ...]]:
    syms = tuple(sorted(expr.free_symbols, key=lambda s: s.name))
    fn = sympy.lambdify(syms, expr, modules=[NUMPY_FUNCTIONS, "numpy"], cse=True)
    return fn, tuple(s.name for s in syms)


class _Step:
    """One step of the cell's program (:mod:`symgate._derive._program`) with numpy evaluators.

    The SymPy expressions of the value and the local partials are lambdified on first use
    only, so kernels that never run the numpy loops (compiled kernels) do not pay for it."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.name, self.kind, self.dim, self.static = step.name, step.kind, step.dim, step.static
        self.expr, self.matrix, self.source, self.state = step.expr, step.matrix, step.source, step.state
        self._value: tuple[Callable[..., Any], tuple[str, ...]] | None = None
        self._partials: list[tuple[str, Dim, Callable[..., Any], tuple[str, ...]]] | None = None

    @property
    def value(self) -> tuple[Callable[..., Any], tuple[str, ...]] | None:
        if self._value is None and self.expr is not None:
            self._value = _lambdify(self.expr)
        return self._value

    @property
    def partials(self) -> list[tuple[str, Dim, Callable[..., Any], tuple[str, ...]]]:
        if self._partials is None:
            self._partials = [(name, dim, *_lambdify(e)) for name, dim, e in self.step.partials]
        return self._partials


def numerical_message(cell: str, what: str, arrays: Any = None) -> str:
    """The message of the :class:`~symgate.NumericalError` both backends raise.

    With the offending ``arrays`` it names the cause: NaN only is a domain error (the log or a
    fractional power of a negative number, 0/0, inf - inf); an infinity is an overflow or a
    division by zero.  Without them it lists both.
    """
    nan = inf = False
    for a in arrays or ():
        if a is not None:
            nan = nan or bool(np.any(np.isnan(a)))
            inf = inf or bool(np.any(np.isinf(a)))
    domain = "a domain error (the log or a fractional power such as sqrt of a negative number, 0/0 or inf - inf)"
    overflow = "an overflow (exploding states or gradients) or a division by zero"
    if nan and not inf:
        return f"cell {cell!r}: {what} is NaN although every input is finite: {domain}; check the cell's body"
    if inf:
        return (f"cell {cell!r}: {what} is infinite although every input is finite: {overflow}; scale the "
                "parameters or inputs down, or check the cell's body")
    return (f"cell {cell!r}: {what} is NaN or infinite although every input is finite: {domain}, or {overflow}; "
            "check the cell's body, or scale the parameters or inputs down")


def require_finite(cell: str, what: str, arrays: Any) -> None:
    """Raise :class:`~symgate.NumericalError` if any of ``arrays`` holds NaN or infinity."""
    arrays = list(arrays)
    for a in arrays:
        if a is not None and not np.all(np.isfinite(a)):
            raise NumericalError(numerical_message(cell, what, arrays))


def _gradient_arrays(g: "Gradients") -> list[Any]:
    return [*g.params.values(), *g.h0.values(), g.x, *g.readout.values()]


def _evaluate(st: _Step, vals: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> Any:
    """Value of one node or output from the values it reads."""
    if st.kind == "linear":
        return matmul(vals[st.source], params[st.matrix].T)  # type: ignore[index]
    fn, names = st.value  # type: ignore[misc]
    return fn(*[vals[n] for n in names])


def _pull_back(st: _Step, a: np.ndarray, vals: Mapping[str, Any], params: Mapping[str, np.ndarray],
               adj: dict[str, np.ndarray]) -> None:
    """Add the contributions of adjoint ``a`` of one node or output to the adjoints of what it reads.

    Elementwise nodes use their derived local partials; a scalar (dimension-1) quantity
    read by a per-unit one receives the sum over units.  A Linear node ``z = M v`` sends
    ``a @ M`` to ``v`` (its matrix gradient is accumulated by the caller).
    """
    if st.kind == "linear":
        contrib = matmul(a, params[st.matrix])  # type: ignore[index]
        adj[st.source] = adj[st.source] + contrib if st.source in adj else contrib  # type: ignore[index]
        return
    for sname, sdim, fn, names in st.partials:
        contrib = a * fn(*[vals[n] for n in names])
        if sdim == 1 and contrib.shape[-1] != 1:
            contrib = contrib.sum(axis=-1, keepdims=True)
        adj[sname] = adj[sname] + contrib if sname in adj else contrib


class ReferenceKernel:
    """Forward, BPTT and JVP for any cell, in numpy; the reference every other route is checked against.

    ``dtype`` is ``"float64"`` or ``"float32"``; ``"complex128"`` is also accepted, for
    complex-step differentiation of the forward pass.

    >>> import numpy as np, symgate as sg
    >>> k = sg.reference_kernel(sg.cells.leaky(), dtype="float64")
    >>> rng = np.random.default_rng(0)
    >>> p = {"W": 0.3 * rng.standard_normal((3, 3)), "U": rng.standard_normal((3, 2)), "b": np.zeros(3)}
    >>> k.forward(p, rng.standard_normal((5, 4, 2))).h.shape
    (5, 4, 3)
    """

    backend = "numpy-reference"

    def __init__(self, cell: Cell, dtype: Any = "float64") -> None:
        if not isinstance(cell, Cell):
            raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
        self.cell = cell
        self.dtype = check_dtype(dtype)
        _jacobian(cell)  # derive (and check state dependence) up front
        self._plan = self._make_plan()
        self._constants = {k: v for k, v in cell.constants.items()}

    # ------------------------------------------------------------------ plan
    def _make_plan(self) -> list[_Step]:
        return [_Step(st) for st in program(self.cell)]

    # ------------------------------------------------------------- checking
    def _check(self, params: Any, x: Any, h0: Any) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], dict[Dim, int]]:
        sizes = resolve_sizes(self.cell, params, x, h0)
        x = check_array("x", x, self.dtype, 3)
        params = check_params(self.cell, params, sizes, self.dtype)
        h0 = check_states(self.cell, h0, sizes, x.shape[1], self.dtype)
        return params, x, h0, sizes

    def _leaf_values(self, params: Mapping[str, np.ndarray]) -> dict[str, Any]:
        vals: dict[str, Any] = dict(self._constants)
        for p in self.cell.params:
            if p.kind != "matrix":
                vals[p.name] = params[p.name]
        return vals

    @staticmethod
    def _shape(v: Any, lead: tuple[int, ...], d: int, dtype: np.dtype) -> np.ndarray:
        v = np.asarray(v, dtype=dtype) if not isinstance(v, np.ndarray) or v.dtype != dtype else v
        return np.broadcast_to(v, lead + (d,))

    # --------------------------------------------------------------- forward
    def _static(self, params: Mapping[str, np.ndarray], x: np.ndarray, sizes: Mapping[Dim, int]) -> dict[str, np.ndarray]:
        """Values of state-independent nodes for all steps at once, ``(T, B, d)``."""
        T, B, _ = x.shape
        vals = self._leaf_values(params)
        vals[self.cell.inputs[0].name] = x
        out: dict[str, np.ndarray] = {}
        for st in self._plan:
            if not st.static:
                continue
            v = self._shape(_evaluate(st, vals, params), (T, B), sizes[st.dim], self.dtype)
            vals[st.name] = v
            out[st.name] = v
        return out

    def forward(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None) -> Trajectory:
        """Run the cell over ``x`` (``(T, B, m)``) from ``h0`` (zeros if omitted)."""
        params, x, h0d, sizes = self._check(params, x, h0)
        return self._forward(params, x, h0d, sizes)

    def _forward(self, params: dict[str, np.ndarray], x: np.ndarray, h0: dict[str, np.ndarray], sizes: dict[Dim, int]) -> Trajectory:
        cell = self.cell
        T, B, _ = x.shape
        dt = self.dtype
        with np.errstate(all="ignore"):  # non-finite values are reported below, as the compiled kernels do
            static = self._static(params, x, sizes)
            node_traj = {st.name: np.empty((T, B, sizes[st.dim]), dtype=dt) for st in self._plan if st.kind != "out" and not st.static}
            states = {s.name: np.empty((T, B, sizes[s.dim]), dtype=dt) for s in cell.states}
            self._forward_loop(params, x, h0, static, node_traj, states, sizes)
        nodes = dict(static)
        nodes.update(node_traj)
        require_finite(cell.name, "the forward pass (a state, a node or a matrix product)", [*states.values(), *nodes.values()])
        aux = {st.name: nodes.pop(st.name) for st in self._plan if st.kind == "aux"}
        return Trajectory(states, nodes, h0, x, sizes, aux)

    def _forward_loop(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Mapping[str, np.ndarray],
                      static: Mapping[str, np.ndarray], node_traj: dict[str, np.ndarray], states: dict[str, np.ndarray],
                      sizes: Mapping[Dim, int]) -> None:
        """The time loop of the forward pass: fills ``node_traj`` (state-dependent nodes) and ``states``."""
        T, B, _ = x.shape
        base = self._leaf_values(params)
        xname = self.cell.inputs[0].name
        prev = dict(h0)
        for t in range(T):
            vals = dict(base)
            vals[xname] = x[t]
            vals.update(prev)
            for k, v in static.items():
                vals[k] = v[t]
            for st in self._plan:
                if st.static:
                    continue
                v = self._shape(_evaluate(st, vals, params), (B,), sizes[st.dim], self.dtype)
                if st.kind == "out":
                    states[st.state][t] = v  # type: ignore[index]
                else:
                    node_traj[st.name][t] = v
                    vals[st.name] = node_traj[st.name][t]
            prev = {s: states[s][t] for s in states}

    def _values_at(self, traj: Trajectory, params: Mapping[str, np.ndarray], t: int) -> dict[str, Any]:
        vals = self._leaf_values(params)
        vals[self.cell.inputs[0].name] = traj.x[t]
        for s in self.cell.states:
            vals[s.name] = traj.h0[s.name] if t == 0 else traj.states[s.name][t - 1]
        for k, v in traj.nodes.items():
            vals[k] = v[t]
        for k, v in traj.aux.items():
            vals[k] = v[t]
        return vals

    def step_values(self, params: Mapping[str, np.ndarray], x_t: np.ndarray, h_prev: Any) -> dict[str, Any]:
        """Every leaf and node value at one step (inputs ``(B, m)``, states ``(B, d)``)."""
        if not isinstance(x_t, np.ndarray) or x_t.ndim != 2:
            raise ShapeError(f"x_t must be a (B, m) array, got {getattr(x_t, 'shape', type(x_t).__name__)}")
        traj = self.forward(params, np.ascontiguousarray(x_t[None]), h_prev)
        return self._values_at(traj, params, 0)

    # -------------------------------------------------------------- jacobians
    def jacobian(self, params: Mapping[str, np.ndarray], x_t: np.ndarray, h_prev: Any) -> np.ndarray:
        """Dense state Jacobian ``(B, N, N)`` of one step, from the *structured* derivation
        (states stacked in declaration order).  For checking at small sizes."""
        vals = self.step_values(params, x_t, h_prev)
        sizes = self._sizes_from(vals)
        J = _jacobian(self.cell)
        return J.evaluate(vals, params, sizes)

    def parameter_jacobian(self, params: Mapping[str, np.ndarray], x_t: np.ndarray, h_prev: Any, param: str, of: str | None = None) -> np.ndarray:
        """Dense immediate parameter Jacobian ``(B, d_out, *shape)`` of one step (structured derivation)."""
        vals = self.step_values(params, x_t, h_prev)
        return _parameter_jacobian(self.cell, param, of).evaluate(vals, params, self._sizes_from(vals))

    def _sizes_from(self, vals: Mapping[str, Any]) -> dict[Dim, int]:
        sizes: dict[Dim, int] = {1: 1}
        for lf in [*self.cell.states, *self.cell.inputs]:
            sizes[lf.dim] = np.shape(vals[lf.name])[-1]
        for nd in self.cell.nodes:
            sizes.setdefault(nd.dim, np.shape(vals[nd.name])[-1])
        return sizes

    # ------------------------------------------------------------------- BPTT
    def vjp(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, cotangents: Any, *, trajectory: Trajectory | None = None) -> Gradients:
        """Reverse mode (BPTT): pull per-step state cotangents ``{state: (T, B, d)}`` back to
        parameters, initial states and inputs."""
        params, x, h0d, sizes = self._check(params, x, h0)
        T, B, _ = x.shape
        cots = self._check_cot(cotangents, sizes, T, B)
        traj = trajectory if trajectory is not None else self._forward(params, x, h0d, sizes)
        with np.errstate(all="ignore"):
            g = self._backward(params, traj, cots)
        require_finite(self.cell.name, "a gradient", _gradient_arrays(g))
        return g

    def _check_cot(self, cot: Any, sizes: Mapping[Dim, int], T: int, B: int) -> dict[str, np.ndarray]:
        if not isinstance(cot, Mapping):
            if len(self.cell.states) > 1:
                raise ShapeError(f"cotangents must be a dict {{state: (T, B, d)}} for states {self.cell.state_names}")
            cot = {self.cell.states[0].name: cot}
        out = {}
        for s in self.cell.states:
            a = cot.get(s.name)
            if a is None:
                out[s.name] = np.zeros((T, B, sizes[s.dim]), dtype=self.dtype)
                continue
            a = check_array(f"cotangents[{s.name!r}]", a, self.dtype, 3)
            if a.shape != (T, B, sizes[s.dim]):
                raise ShapeError(f"cotangents[{s.name!r}] has shape {a.shape}; expected {(T, B, sizes[s.dim])}")
            out[s.name] = a
        return out

    def backward(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *, loss: Loss) -> Gradients:
        """Full BPTT: the loss value and its gradient w.r.t. every parameter, ``h0``, ``x`` and the readout."""
        params, x, h0d, sizes = self._check(params, x, h0)
        if not isinstance(loss, Loss):
            raise CellSpecError(f"loss must be a symgate loss (symgate.losses.last_mse / step_mse), got {type(loss).__name__}")
        T, B, _ = x.shape
        first = self.cell.states[0]
        loss.check(T, B, sizes[first.dim], self.dtype)
        traj = self._forward(params, x, h0d, sizes)
        with np.errstate(all="ignore"):
            value, cot, readout = loss.evaluate(traj.states[first.name])
        require_finite(self.cell.name, "the loss", [np.asarray(value)])
        cots = {s.name: (cot if s is first else np.zeros_like(traj.states[s.name])) for s in self.cell.states}
        with np.errstate(all="ignore"):
            g = self._backward(params, traj, cots)
        g.value = value
        g.readout = readout
        require_finite(self.cell.name, "a gradient", _gradient_arrays(g))
        return g

    def _backward(self, params: Mapping[str, np.ndarray], traj: Trajectory, cots: Mapping[str, np.ndarray]) -> Gradients:
        cell = self.cell
        x = traj.x
        T, B, _ = x.shape
        sizes = traj.sizes
        dt = self.dtype
        xname = cell.inputs[0].name
        leaf_kind = {lf.name: lf.kind for lf in cell.leaves}
        grads = {p.name: np.zeros(tuple(sizes[d] for d in p.shape), dtype=dt) for p in cell.params}
        gx = np.zeros_like(x)
        static_adj = {nm: np.zeros((T, B, sizes[st.dim]), dtype=dt) for st in self._plan if st.static for nm in [st.name]}
        lin_adj = {st.name: np.zeros((T, B, sizes[st.dim]), dtype=dt) for st in self._plan if st.kind == "linear" and not st.static}
        carry = {s.name: np.zeros((B, sizes[s.dim]), dtype=dt) for s in cell.states}
        dynamic = [st for st in self._plan if not st.static]

        carry = self._backward_loop(params, traj, cots, carry, static_adj, lin_adj, grads, gx)
        # recurrent weight gradients: one product over T*B per Linear node
        for st in dynamic:
            if st.kind == "linear":
                # a state-dependent Linear reads a state-dependent node or a previous state
                src = traj.nodes[st.source] if st.source in traj.nodes else traj.previous(st.source)  # type: ignore[index,arg-type]
                a = lin_adj[st.name]
                grads[st.matrix] += matmul(a.reshape(T * B, -1).T, np.broadcast_to(src, a.shape[:2] + src.shape[2:]).reshape(T * B, -1))  # type: ignore[index]
        # the state-independent part, for all steps at once
        vals = self._leaf_values(params)
        vals[xname] = x
        vals.update(traj.nodes)
        vals.update(traj.aux)
        adj = {k: v for k, v in static_adj.items()}
        for st in reversed([s for s in self._plan if s.static]):
            a = adj.pop(st.name, None)
            if a is None:
                continue
            if st.kind == "linear":
                src = vals[st.source]  # type: ignore[index]
                src = np.broadcast_to(src, a.shape[:2] + (np.shape(src)[-1],))
                grads[st.matrix] += matmul(a.reshape(T * B, -1).T, src.reshape(T * B, -1))  # type: ignore[index]
            _pull_back(st, a, vals, params, adj)
        for name, a in adj.items():
            if name == xname:
                gx += a
            elif leaf_kind.get(name) == "vector":
                grads[name] += a.reshape(-1, a.shape[-1]).sum(axis=0)
            elif leaf_kind.get(name) == "scalar":
                grads[name] += a.sum()
        return Gradients(grads, carry, gx)

    def _backward_loop(self, params: Mapping[str, np.ndarray], traj: Trajectory, cots: Mapping[str, np.ndarray],
                       carry: dict[str, np.ndarray], static_adj: dict[str, np.ndarray], lin_adj: dict[str, np.ndarray],
                       grads: dict[str, np.ndarray], gx: np.ndarray) -> dict[str, np.ndarray]:
        """The reverse time loop of BPTT: fills the adjoints of state-independent nodes, of
        state-dependent Linear outputs (for one weight-gradient product afterwards), of
        inputs read elementwise and of vector/scalar parameters; returns the adjoint of ``h0``."""
        cell = self.cell
        T, B, _ = traj.x.shape
        sizes = traj.sizes
        dt = self.dtype
        xname = cell.inputs[0].name
        leaf_kind = {lf.name: lf.kind for lf in cell.leaves}
        static_names = set(static_adj)
        dynamic = [st for st in self._plan if not st.static]
        for t in range(T - 1, -1, -1):
            vals = self._values_at(traj, params, t)
            adj: dict[str, np.ndarray] = {}
            for s in cell.states:
                adj[s.name + "'"] = cots[s.name][t] + carry[s.name]
            for st in reversed(dynamic):
                a = adj.pop(st.name, None)
                if a is None:
                    continue
                if st.kind == "linear":
                    lin_adj[st.name][t] = a  # its matrix gradient: one product over T*B below
                _pull_back(st, a, vals, params, adj)
            carry = {}
            for s in cell.states:
                v = adj.pop(s.name, None)
                carry[s.name] = np.zeros((B, sizes[s.dim]), dtype=dt) if v is None else np.broadcast_to(v, (B, sizes[s.dim])).copy()
            for name, a in adj.items():
                if name in static_names:
                    static_adj[name][t] += a
                elif name == xname:
                    gx[t] += a
                elif leaf_kind.get(name) in ("vector", "scalar"):
                    grads[name] += a.sum(axis=0) if leaf_kind[name] == "vector" else a.sum()
                # constants: not trainable
        return carry

    # -------------------------------------------------------------------- JVP
    def jvp(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, tangents: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Forward mode: the derivative of the state trajectory along ``tangents``.

        ``tangents`` may hold parameter tangents (by parameter name), ``"h0"`` (initial
        state tangents, an array or a dict by state) and ``"x"`` (``(T, B, m)``); missing
        entries are zero.  Returns ``{state: (T, B, d)}``.
        """
        params, x, h0d, sizes = self._check(params, x, h0)
        T, B, _ = x.shape
        if not isinstance(tangents, Mapping):
            raise ShapeError("tangents must be a dict (parameter names, 'h0', 'x')")
        unknown = [k for k in tangents if k not in (*self.cell.param_names, "h0", "x")]
        if unknown:
            raise ShapeError(f"tangents has unknown entries {unknown}")
        tp = {}
        for p in self.cell.params:
            a = tangents.get(p.name)
            tp[p.name] = np.zeros_like(params[p.name]) if a is None else check_array(f"tangents[{p.name!r}]", a, self.dtype, len(p.shape))
            if tp[p.name].shape != params[p.name].shape:
                raise ShapeError(f"tangents[{p.name!r}] has shape {tp[p.name].shape}; expected {params[p.name].shape}")
        th0 = check_states(self.cell, tangents.get("h0"), sizes, B, self.dtype, what="tangents['h0']")
        tx = tangents.get("x")
        tx = np.zeros_like(x) if tx is None else check_array("tangents['x']", tx, self.dtype, 3)
        if tx.shape != x.shape:
            raise ShapeError(f"tangents['x'] has shape {tx.shape}; expected {x.shape}")
        return self._jvp_checked(params, x, h0d, sizes, tp, th0, tx)

    def _jvp_checked(self, params: dict[str, np.ndarray], x: np.ndarray, h0: dict[str, np.ndarray], sizes: dict[Dim, int],
                     tp: Mapping[str, np.ndarray], th0: Mapping[str, np.ndarray], tx: np.ndarray) -> dict[str, np.ndarray]:
        traj = self._forward(params, x, h0, sizes)
        with np.errstate(all="ignore"):
            out = self._jvp(params, traj, tp, th0, tx)
        require_finite(self.cell.name, "a state tangent (JVP)", list(out.values()))
        return out

    def _jvp(self, params: Mapping[str, np.ndarray], traj: Trajectory, tp: Mapping[str, np.ndarray],
             th0: Mapping[str, np.ndarray], tx: np.ndarray) -> dict[str, np.ndarray]:
        cell = self.cell
        T, B, _ = traj.x.shape
        sizes = traj.sizes
        xname = cell.inputs[0].name
        zero = np.zeros((), dtype=self.dtype)

        def tangent_of_step(st: _Step, vals: Mapping[str, Any], tan: dict[str, Any]) -> Any:
            if st.kind == "linear":
                src = st.source
                return matmul(tan.get(src, zero), params[st.matrix].T) + matmul(vals[src], tp[st.matrix].T)  # type: ignore[index]
            acc: Any = zero
            for sname, _sdim, fn, names in st.partials:
                ts = tan.get(sname)
                if ts is not None:
                    acc = acc + fn(*[vals[n] for n in names]) * ts
            return acc

        base_t: dict[str, Any] = {p.name: tp[p.name] for p in cell.params if p.kind != "matrix"}
        # static nodes for all steps
        vals_all = self._leaf_values(params)
        vals_all[xname] = traj.x
        vals_all.update(traj.nodes)
        vals_all.update(traj.aux)
        tan_static: dict[str, Any] = dict(base_t)
        tan_static[xname] = tx
        for st in self._plan:
            if st.static:
                tan_static[st.name] = np.broadcast_to(tangent_of_step(st, vals_all, tan_static), (T, B, sizes[st.dim]))
        out = {s.name: np.empty((T, B, sizes[s.dim]), dtype=self.dtype) for s in cell.states}
        prev = dict(th0)
        for t in range(T):
            vals = self._values_at(traj, params, t)
            tan: dict[str, Any] = dict(base_t)
            tan[xname] = tx[t]
            tan.update(prev)
            for st in self._plan:
                if st.static:
                    tan[st.name] = tan_static[st.name][t]
                    continue
                v = np.broadcast_to(tangent_of_step(st, vals, tan), (B, sizes[st.dim]))
                if st.kind == "out":
                    out[st.state][t] = v  # type: ignore[index]
                else:
                    tan[st.name] = v
            prev = {s: out[s][t] for s in out}
        return out

    def __repr__(self) -> str:
        return f"<ReferenceKernel {self.cell.name!r} {self.dtype}>"


def reference_kernel(cell: Cell, dtype: Any = "float64") -> ReferenceKernel:
    """The numpy reference kernel of ``cell`` (cached per cell and dtype)."""
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    dt = check_dtype(dtype)
    key = ("kernel", "reference", dt.str)
    cache = cell._index
    if key not in cache:
        cache[key] = ReferenceKernel(cell, dt)
    return cache[key]
