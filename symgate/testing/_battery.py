r"""The verification battery: independent routes to the same derivatives must agree.

For one cell and one random *problem* (sizes, parameters, inputs, initial state,
readout), each check compares two routes and returns a :class:`CheckResult`
with the observed error, the tolerance, and whether it passed.

Tolerances are derived from the dtype's machine epsilon and the error order of
each method; they are stated here once and never loosened to make a check pass.
Errors are *normalised* so that cancellation in a sum cannot make a correct
result look wrong: a directional derivative is compared relative to the sum of
the absolute values of its contributions, a matrix relative to ``max(1, max|J|)``
(gradients of a loss: see *Readout cancellation* below).

=================  ===========================================  ===============================
check              routes compared                              tolerance (float64)
=================  ===========================================  ===============================
``jacobian``       structured symbolic Jacobians (state and     ``C_FD * eps**(2/3)``: central
                   immediate parameter), lambdified  vs         differences with step
                   central differences of one forward step      ``eps**(1/3) max(1,|v|)`` have
                                                                truncation ``O(h^2)`` + rounding
                                                                ``O(eps/h)``, both ``eps**(2/3)``
``bptt_cs``        BPTT gradient vs complex-step derivative     ``C_ROUND * (T+1) * eps``: the
                   of the loss (``h = 1e-30``: exact to         complex step has no truncation
                   rounding for analytic cells)                 error at this ``h``; rounding
                                                                grows with the number of steps
``bptt_fd``        BPTT gradient vs central differences of      ``C_FD * eps**(2/3)``
                   the loss along a random direction
``adjoint``        ``<J u, v>`` (forward-mode JVP) vs           ``C_ROUND * (T+1) * eps``
                   ``<u, J^T v>`` (BPTT / VJP)
``mpmath``         every local partial evaluated in float64     ``C_ROUND * eps``: one
                   from forward values vs mpmath numerical      elementwise expression of O(1)
                   differentiation at 50 digits of the          values, no accumulation
                   defining expression
``float32``        float32 kernels vs float64 kernels on the    ``C_ROUND * (T+1) * eps32``
                   same (float32-representable) problem
``batch``          a batch of B vs B batches of one (states;    ``C_ROUND * (T+1) * eps``
                   gradients average over the batch)
``compiled``       compiled kernel vs numpy reference (states,  ``C_ROUND * (T+1) * eps``
                   nodes, losses, all gradients, JVPs); only
                   with ``backend="compiled"``
=================  ===========================================  ===============================

With ``backend="compiled"`` every kernel-based check runs on the compiled kernels
(the complex-step forward pass stays the numpy reference's: complex128 is not compiled).

``C_FD = 100`` bounds the constants of the finite-difference error (third
derivatives of cells with spectrally scaled weights, ``rho <= 1.2``, are below
``(1 + rho)^3 * O(1)``); ``C_ROUND = 64`` bounds the number of rounding errors per
step and unit that accumulate into one result.

Readout cancellation
--------------------
A loss gradient starts from the cotangent ``dL/dh_t = (2/N) r_t V`` with the
residual ``r_t = V h_t - y_t``.  Both are sums (over the state's units, over the
readout's outputs) whose terms carry rounding: the forward state itself is only
known to ``C_ROUND (T+1) eps |h|`` per unit, and enters ``r`` through ``|V||h|``.
Where these sums cancel (the loss nearly stationary along ``h``: two outputs whose
``r_o V_o`` nearly cancel; for ``rc_softplus_vector_none_additive_b`` with
``n = m = B = T = 1`` about one problem in 500, failing by up to 38x) every
gradient entry, and so every contribution ``g_i d_i`` of a directional derivative,
shrinks with the cancellation while its absolute error does not: both routes then
differ from the exact derivative by ``O(eps) (|V||h| + |y|) |V| |dh|``, which no
multiple of ``sum_i |g_i d_i|`` bounds.  So the scale of a loss gradient also
counts the readout's terms absolutely: it is at least the gradient ``g_abs``
pulled back (by the float64 numpy reference) from the *absolute cotangent*
``(2/N) (|V||h_t| + |y_t|) |V|``, which bounds every term of both sums
(``|r| <= |V||h| + |y|``).  ``bptt_cs`` normalises by
``max(sum_i |g_i d_i|, sum_i |g_abs,i d_i|)``, ``float32`` by the largest entry of
``g`` or ``g_abs``.  Where nothing cancels the two scales are within a small
factor (median 2, 90% below 5 over the built-ins and random cells), so the
tolerances keep their meaning.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import sympy

from .._cell import Cell, Dim
from .._codegen import STEP_WGRAD_MIN_B
from .._derive._local import local_partials
from .._errors import CellSpecError, ConfigError, VerificationError
from .._functions import MPMATH_FUNCTIONS, NUMPY_FUNCTIONS
from .._reference import ReferenceKernel, reference_kernel
from ..losses import LastMSE, StepMSE

__all__ = [
    "Problem",
    "CheckResult",
    "VerificationReport",
    "draw_problem",
    "CHECKS",
    "check_jacobian",
    "check_bptt_complex_step",
    "check_bptt_finite_difference",
    "check_adjoint",
    "check_mpmath",
    "check_float32",
    "verify",
    "BATCH_SIZES",
    "EPS64",
    "EPS32",
    "C_FD",
    "C_ROUND",
]

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
C_FD = 100.0
C_ROUND = 64.0
TOL_FD = C_FD * EPS64 ** (2.0 / 3.0)
CS_STEP = 1e-30
#: the batch sizes :func:`draw_problem` draws from: small ones, and both sides of the batch size
#: from which compiled kernels compute input products and weight gradients step by step
#: (``STEP_WGRAD_MIN_B``), so the battery runs both strategies
BATCH_SIZES = tuple(sorted({1, 2, 3, STEP_WGRAD_MIN_B - 1, STEP_WGRAD_MIN_B, STEP_WGRAD_MIN_B + 1, 2 * STEP_WGRAD_MIN_B + 1}))


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------


def _check_int(what: str, value: Any, lo: int) -> int:
    """``value`` as a Python int, if it is an integer (not a bool) ``>= lo``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be an integer >= {lo}, got {value!r} ({type(value).__name__})")
    if int(value) < lo:
        raise ConfigError(f"{what} must be an integer >= {lo}, got {int(value)}")
    return int(value)


def _check_cell(fn: str, cell: Any) -> Cell:
    if not isinstance(cell, Cell):
        raise CellSpecError(f"{fn}() takes a symgate Cell, got {type(cell).__name__}")
    return cell


def _check_backend(backend: Any) -> str:
    if backend not in ("reference", "compiled"):
        raise ConfigError(f"backend must be 'reference' or 'compiled', got {backend!r}")
    return backend


# ----------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------


@dataclass
class Problem:
    """One concrete instance on which a cell is checked (float64 arrays)."""

    cell: Cell
    sizes: dict[Dim, int]
    params: dict[str, np.ndarray]
    x: np.ndarray
    h0: dict[str, np.ndarray]
    V: np.ndarray
    y_last: np.ndarray
    y_step: np.ndarray
    seed: int = 0

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def B(self) -> int:
        return self.x.shape[1]

    def loss(self, kind: str, dtype: Any = np.float64) -> LastMSE | StepMSE:
        V = self.V.astype(dtype)
        if kind == "last":
            return LastMSE(V, self.y_last.astype(dtype))
        return StepMSE(V, self.y_step.astype(dtype))

    def describe(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items() if k != 1)
        return f"{self.cell.name} [{dims}, B={self.B}, T={self.T}, seed={self.seed}]"

    def __repr__(self) -> str:
        return f"<Problem {self.describe()}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython / Hypothesis pretty printers
        p.text(repr(self))


def _matrix(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    a = rng.standard_normal(shape)
    s = np.linalg.norm(a, 2)
    return np.ascontiguousarray(a * (rho / s)) if s > 0 else a


def draw_problem(
    cell: Cell,
    rng: np.random.Generator | int,
    *,
    n: int | None = None,
    m: int | None = None,
    B: int | None = None,
    T: int | None = None,
    rho: float | None = None,
    outputs: int = 2,
) -> Problem:
    """A random problem for ``cell``: sizes (small by default), spectrally scaled weights.

    Unless given, ``n`` is drawn in 1..5, ``m`` in 1..3, ``T`` in 1..6 and the batch ``B``
    from :data:`BATCH_SIZES` (small batches and both sides of the compiled kernels'
    batch threshold).

    Every matrix is scaled to spectral norm ``rho * U(0.5, 1)`` (``rho`` drawn in
    [0.3, 1.2] unless given), so Jacobian products stay bounded; vectors and scalars
    are N(0, 0.5^2); inputs N(0, 1); initial states U(-0.5, 0.5).
    """
    _check_cell("draw_problem", cell)
    seed = None
    if not isinstance(rng, np.random.Generator):
        seed = _check_int("draw_problem's seed", rng, 0)
        rng = np.random.default_rng(seed)
    outputs = _check_int("outputs", outputs, 1)
    sizes: dict[Dim, int] = {1: 1}
    given = {"n": n, "m": m}
    for d in cell.dims():
        v = given.get(d)
        sizes[d] = _check_int(f"size {d}", v, 1) if v is not None else int(rng.integers(1, 6 if d != "m" else 4))
    B = _check_int("batch size B", B, 1) if B is not None else BATCH_SIZES[int(rng.integers(len(BATCH_SIZES)))]
    T = _check_int("sequence length T", T, 1) if T is not None else int(rng.integers(1, 7))
    if rho is not None and (isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho <= 0):
        raise ConfigError(f"rho must be a finite positive number, got {rho!r}")
    rho = float(rho) if rho is not None else float(rng.uniform(0.3, 1.2))
    params: dict[str, np.ndarray] = {}
    for p in cell.params:
        shape = tuple(sizes[d] for d in p.shape)
        if p.kind == "matrix":
            params[p.name] = _matrix(rng, shape, rho * float(rng.uniform(0.5, 1.0)))
        else:
            params[p.name] = np.array(0.5 * rng.standard_normal(shape))
    m_ = sizes[cell.inputs[0].dim]
    x = rng.standard_normal((T, B, m_))
    h0 = {s.name: rng.uniform(-0.5, 0.5, (B, sizes[s.dim])) for s in cell.states}
    n_out = sizes[cell.states[0].dim]
    V = rng.standard_normal((outputs, n_out)) / np.sqrt(n_out)
    y_last = rng.standard_normal((B, outputs))
    y_step = rng.standard_normal((T, B, outputs))
    return Problem(cell, sizes, params, x, h0, V, y_last, y_step, seed if seed is not None else -1)


# ----------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Outcome of one check on one problem."""

    check: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)

    @property
    def ratio(self) -> float:
        return self.error / self.tolerance if np.isfinite(self.error) else np.inf


@dataclass
class VerificationReport:
    """All check results for one cell; ``worst[check]`` is the result closest to failing."""

    cell: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def worst(self) -> dict[str, CheckResult]:
        out: dict[str, CheckResult] = {}
        for r in self.results:
            if r.check not in out or r.ratio > out[r.check].ratio:
                out[r.check] = r
        return out

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        lines = [f"{self.cell}: {'PASS' if self.passed else 'FAIL'}"]
        for name, r in self.worst.items():
            lines.append(f"  {name:10s} worst error {r.error:.2e}  (tolerance {r.tolerance:.1e})  {r.detail}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            lines = [f"{r.check}: error {r.error:.3e} > tolerance {r.tolerance:.3e}; {r.detail}" for r in self.failures()]
            raise VerificationError(f"cell {self.cell!r} failed verification:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


# Substitution points.  Every kernel a check runs comes from _kernel, every random direction
# from _direction, and every float64 local partial of the mpmath check from _float64_partial,
# looked up at call time: the battery's own tests (tests/test_battery_pinned.py) replace them
# to inject defects of a known size into what a check compares.


def _kernel(cell: Cell, dtype: str, backend: str) -> ReferenceKernel:
    """The kernel a check runs: numpy reference, or compiled (complex128 is reference-only)."""
    if _check_backend(backend) == "compiled" and dtype != "complex128":
        from .._compiled import compile as _compile

        return _compile(cell, dtype)
    return reference_kernel(cell, dtype)


def _flat_states(cell: Cell, st: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([st[s.name] for s in cell.states], axis=-1)


def _unflat_states(cell: Cell, v: np.ndarray, sizes: Mapping[Dim, int]) -> dict[str, np.ndarray]:
    out, o = {}, 0
    for s in cell.states:
        d = sizes[s.dim]
        out[s.name] = np.ascontiguousarray(v[..., o:o + d])
        o += d
    return out


def _random_like(rng: np.random.Generator, tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(rng.standard_normal(np.shape(v))) for k, v in tree.items()}


def _fd_step(v: np.ndarray) -> np.ndarray:
    return EPS64 ** (1.0 / 3.0) * np.maximum(1.0, np.abs(v))


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------


def check_jacobian(prob: Problem, backend: str = "reference") -> CheckResult:
    """Structured state and parameter Jacobians (lambdified) vs central differences of one step."""
    cell, k = prob.cell, _kernel(prob.cell, "float64", backend)
    x1 = np.ascontiguousarray(prob.x[:1])

    def step(params: Mapping[str, np.ndarray], h0: Mapping[str, np.ndarray]) -> np.ndarray:
        return _flat_states(cell, {s: v[0] for s, v in k.forward(params, x1, h0).states.items()})

    worst, where = 0.0, ""
    J = k.jacobian(prob.params, prob.x[0], prob.h0)
    flat = _flat_states(cell, prob.h0)
    Jfd = np.empty_like(J)
    for j in range(flat.shape[1]):
        hstep = _fd_step(flat[:, j])
        e = np.zeros_like(flat)
        e[:, j] = hstep
        up = step(prob.params, _unflat_states(cell, flat + e, prob.sizes))
        dn = step(prob.params, _unflat_states(cell, flat - e, prob.sizes))
        Jfd[:, :, j] = (up - dn) / (2 * hstep[:, None])
    err = float(np.max(np.abs(J - Jfd)) / max(1.0, float(np.max(np.abs(J)))))
    worst, where = err, "state Jacobian"
    for p in cell.params:
        for of in cell.state_names:
            Pj = k.parameter_jacobian(prob.params, prob.x[0], prob.h0, p.name, of)
            theta = prob.params[p.name]
            fd = np.empty_like(Pj)
            idx_state = cell.state_names.index(of)
            off = sum(prob.sizes[s.dim] for s in cell.states[:idx_state])
            d_of = prob.sizes[cell.states[idx_state].dim]
            for idx in np.ndindex(theta.shape):
                hstep = float(_fd_step(np.asarray(theta[idx])))
                tp, tm = theta.copy(), theta.copy()
                tp[idx] += hstep
                tm[idx] -= hstep
                up = step({**prob.params, p.name: tp}, prob.h0)[:, off:off + d_of]
                dn = step({**prob.params, p.name: tm}, prob.h0)[:, off:off + d_of]
                fd[(slice(None), slice(None)) + idx] = (up - dn) / (2 * hstep)
            e = float(np.max(np.abs(Pj - fd)) / max(1.0, float(np.max(np.abs(Pj)))))
            if e > worst:
                worst, where = e, f"d{of}'/d{p.name}"
    return CheckResult("jacobian", worst, TOL_FD, f"worst at {where}; {prob.describe()}")


def _direction(prob: Problem, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    return _random_like(rng, prob.params), _random_like(rng, prob.h0), rng.standard_normal(prob.x.shape)


def _directional(g: Any, dp: Mapping[str, np.ndarray], dh: Mapping[str, np.ndarray], dx: np.ndarray) -> tuple[float, float]:
    """<grad, direction> and the sum of absolute contributions (for normalising)."""
    parts = [g.params[k] * dp[k] for k in dp] + [g.h0[k] * dh[k] for k in dh] + [g.x * dx]
    return float(sum(np.sum(p) for p in parts)), float(sum(np.sum(np.abs(p)) for p in parts))


def _absolute_cotangent(L: LastMSE | StepMSE, h: np.ndarray) -> np.ndarray:
    """``dL/dh_t = (2/N) (V h_t - y_t) V`` with every term taken absolutely: ``(2/N) (|V||h_t| + |y_t|) |V|``."""
    aV = np.abs(L.V)
    if isinstance(L, LastMSE):
        mag = np.abs(h[-1]) @ aV.T + np.abs(L.y)  # (B, o)
        out = np.zeros_like(h)
        out[-1] = (2.0 / mag.size) * (mag @ aV)
        return out
    mag = np.abs(h) @ aV.T + np.abs(L.y)  # (T, B, o)
    return (2.0 / mag.size) * (mag @ aV)


def _absolute_readout_gradient(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Mapping[str, np.ndarray],
                               L: LastMSE | StepMSE) -> Any:
    """The gradient pulled back from :func:`_absolute_cotangent` by the float64 numpy reference: the scale of a
    loss gradient with the readout's sums counted absolutely (see *Readout cancellation*)."""
    r = _kernel(cell, "float64", "reference")
    traj = r.forward(params, x, h0)
    cot = {cell.states[0].name: _absolute_cotangent(L, traj.h)}
    return r.vjp(params, x, h0, cot, trajectory=traj)


def check_bptt_complex_step(prob: Problem, loss: str = "last", backend: str = "reference") -> CheckResult:
    """BPTT gradient vs the complex-step derivative of the loss along a random direction
    (the complex forward pass is always the numpy reference's)."""
    k, kc = _kernel(prob.cell, "float64", backend), _kernel(prob.cell, "complex128", "reference")
    rng = np.random.default_rng(abs(prob.seed) + 17)
    dp, dh, dx = _direction(prob, rng)
    g = k.backward(prob.params, prob.x, prob.h0, loss=prob.loss(loss))
    an, scale = _directional(g, dp, dh, dx)
    g_abs = _absolute_readout_gradient(prob.cell, prob.params, prob.x, prob.h0, prob.loss(loss))
    scale = max(scale, _directional(g_abs, dp, dh, dx)[1])
    pc = {n: prob.params[n] + 1j * CS_STEP * dp[n] for n in prob.params}
    hc = {n: prob.h0[n] + 1j * CS_STEP * dh[n] for n in prob.h0}
    xc = prob.x + 1j * CS_STEP * dx
    traj = kc.forward(pc, xc, hc)
    val = prob.loss(loss, np.complex128).evaluate(traj.h)[0]
    cs = float(np.imag(val)) / CS_STEP
    err = abs(an - cs) / max(scale, np.finfo(float).tiny)
    return CheckResult("bptt_cs", err, C_ROUND * (prob.T + 1) * EPS64, f"{loss}-state loss; {prob.describe()}")


def check_bptt_finite_difference(prob: Problem, loss: str = "last", backend: str = "reference") -> CheckResult:
    """BPTT gradient vs central differences of the loss along a random direction."""
    k = _kernel(prob.cell, "float64", backend)
    rng = np.random.default_rng(abs(prob.seed) + 29)
    dp, dh, dx = _direction(prob, rng)
    L = prob.loss(loss)
    g = k.backward(prob.params, prob.x, prob.h0, loss=L)
    an, scale = _directional(g, dp, dh, dx)
    size = max([1.0] + [float(np.max(np.abs(v))) for v in [*prob.params.values(), *prob.h0.values(), prob.x]])
    dirmax = max(float(np.max(np.abs(v))) for v in [*dp.values(), *dh.values(), dx])
    hstep = EPS64 ** (1.0 / 3.0) * size / dirmax

    def f(s: float) -> float:
        p = {n: prob.params[n] + s * dp[n] for n in prob.params}
        h = {n: prob.h0[n] + s * dh[n] for n in prob.h0}
        return float(L.evaluate(k.forward(p, prob.x + s * dx, h).h)[0])

    fd = (f(hstep) - f(-hstep)) / (2 * hstep)
    err = abs(an - fd) / max(scale, abs(g.value) * size / dirmax, np.finfo(float).tiny)
    return CheckResult("bptt_fd", err, TOL_FD, f"{loss}-state loss; {prob.describe()}")


def check_adjoint(prob: Problem, backend: str = "reference") -> CheckResult:
    """Dot-product test between forward mode (JVP) and reverse mode (BPTT/VJP)."""
    k = _kernel(prob.cell, "float64", backend)
    rng = np.random.default_rng(abs(prob.seed) + 41)
    dp, dh, dx = _direction(prob, rng)
    cot = {s.name: rng.standard_normal((prob.T, prob.B, prob.sizes[s.dim])) for s in prob.cell.states}
    tangents: dict[str, Any] = dict(dp)
    tangents["h0"] = dh
    tangents["x"] = dx
    jv = k.jvp(prob.params, prob.x, prob.h0, tangents)
    lhs_parts = [jv[s] * cot[s] for s in cot]
    lhs = float(sum(np.sum(p) for p in lhs_parts))
    g = k.vjp(prob.params, prob.x, prob.h0, cot)
    rhs, scale = _directional(g, dp, dh, dx)
    scale = max(scale, float(sum(np.sum(np.abs(p)) for p in lhs_parts)), np.finfo(float).tiny)
    return CheckResult("adjoint", abs(lhs - rhs) / scale, C_ROUND * (prob.T + 1) * EPS64, prob.describe())


def _float64_partial(label: str, symbols: Sequence[sympy.Symbol], partial: sympy.Expr) -> Callable[..., Any]:
    """The float64 route of the mpmath check: the local partial ``label`` (``"dq/dv"``) lambdified for numpy."""
    return sympy.lambdify(symbols, partial, modules=[NUMPY_FUNCTIONS, "numpy"])


def check_mpmath(prob: Problem, points: int = 2, backend: str = "reference") -> CheckResult:
    """Each local partial, in float64 from forward values, vs mpmath 50-digit numerical differentiation."""
    import mpmath

    cell = prob.cell
    k = _kernel(cell, "float64", backend)
    vals = k.step_values(prob.params, prob.x[0], prob.h0)
    lp = local_partials(cell)
    rng = np.random.default_rng(abs(prob.seed) + 53)
    worst, where = 0.0, ""
    with mpmath.workdps(50):
        for owner, parts in lp.partials.items():
            expr = lp.expr[owner]
            syms = sorted(expr.free_symbols, key=lambda s: s.name)
            f_mp = sympy.lambdify(syms, expr, modules=[MPMATH_FUNCTIONS, "mpmath"])
            for sym, partial in parts.items():
                psyms = sorted(partial.free_symbols, key=lambda s: s.name)
                label = f"d{'out' if owner.symbol is None else owner.symbol.name}/d{sym.name}"
                f64 = _float64_partial(label, psyms, partial)
                for _ in range(points):
                    b = int(rng.integers(prob.B))

                    def at(name: str, unit: int) -> float:
                        v = np.asarray(vals[name])
                        if v.ndim == 0:
                            return float(v)
                        v = v.reshape(-1) if v.ndim == 1 else v[b]
                        return float(v[unit % v.shape[-1]])

                    d = prob.sizes[lp.dim[owner]]
                    unit = int(rng.integers(d))
                    point = {s.name: at(s.name, unit) for s in set(syms) | set(psyms)}
                    x0 = mpmath.mpf(point[sym.name])

                    def fun(t: Any, _syms: Sequence[Any] = syms, _s: Any = sym) -> Any:
                        return f_mp(*[t if s == _s else mpmath.mpf(point[s.name]) for s in _syms])

                    true = mpmath.diff(fun, x0)
                    got = float(f64(*[point[s.name] for s in psyms]))
                    e = abs(float(true) - got) / max(1.0, abs(got))
                    if e > worst:
                        worst, where = e, label
    return CheckResult("mpmath", worst, C_ROUND * EPS64, f"worst at {where}; {prob.describe()}")


def check_float32(prob: Problem, backend: str = "reference") -> CheckResult:
    """float32 kernels vs float64 kernels on the same float32-representable problem."""
    cell = prob.cell
    k64, k32 = _kernel(cell, "float64", backend), _kernel(cell, "float32", backend)
    f32 = lambda a: np.array(a, dtype=np.float32)  # noqa: E731  (np.array keeps 0-d arrays 0-d)
    p32 = {n: f32(v) for n, v in prob.params.items()}
    h32 = {n: f32(v) for n, v in prob.h0.items()}
    x32 = f32(prob.x)
    p64 = {n: v.astype(np.float64) for n, v in p32.items()}
    h64 = {n: v.astype(np.float64) for n, v in h32.items()}
    x64 = x32.astype(np.float64)
    L32 = LastMSE(f32(prob.V), f32(prob.y_last))
    L64 = LastMSE(f32(prob.V).astype(np.float64), f32(prob.y_last).astype(np.float64))
    t32, t64 = k32.forward(p32, x32, h32), k64.forward(p64, x64, h64)
    worst, where = 0.0, ""
    for s in cell.state_names:
        e = float(np.max(np.abs(t32.states[s] - t64.states[s])) / max(1.0, float(np.max(np.abs(t64.states[s])))))
        if e > worst:
            worst, where = e, f"state {s}"
    g32, g64 = k32.backward(p32, x32, h32, loss=L32), k64.backward(p64, x64, h64, loss=L64)
    g_abs = _absolute_readout_gradient(cell, p64, x64, h64, L64)
    gscale = max([1e-300] + [float(np.max(np.abs(v))) for g in (g64, g_abs) for v in g.params.values()])
    for n in g64.params:
        e = float(np.max(np.abs(g32.params[n] - g64.params[n]))) / gscale
        if e > worst:
            worst, where = e, f"gradient {n}"
    return CheckResult("float32", worst, C_ROUND * (prob.T + 1) * EPS32, f"worst at {where}; {prob.describe()}")


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref))) / max(1.0, float(np.max(np.abs(ref))))


def check_compiled(prob: Problem, backend: str = "compiled") -> CheckResult:
    """Compiled kernel vs numpy reference, float64: forward states and nodes; loss value and the
    gradients of every parameter, ``h0``, ``x`` and the readout, for both losses; JVPs.

    Same operations in another order (BLAS and C vs numpy): a few ulps per operation,
    accumulated over the steps, hence ``C_ROUND * (T+1) * eps`` relative to each quantity's
    largest magnitude (at least 1)."""
    cell = prob.cell
    k, r = _kernel(cell, "float64", "compiled"), _kernel(cell, "float64", "reference")
    worst, where = 0.0, ""
    fk, fr = k.forward(prob.params, prob.x, prob.h0), r.forward(prob.params, prob.x, prob.h0)
    pairs = [(f"state {s}", fk.states[s], fr.states[s]) for s in cell.state_names]
    pairs += [(f"node {n}", fk.nodes[n], fr.nodes[n]) for n in fr.nodes]
    for loss in ("last", "step"):
        gk = k.backward(prob.params, prob.x, prob.h0, loss=prob.loss(loss))
        gr = r.backward(prob.params, prob.x, prob.h0, loss=prob.loss(loss))
        pairs.append((f"{loss} loss value", np.asarray(gk.value), np.asarray(gr.value)))
        pairs += [(f"{loss} loss d/d{n}", gk.params[n], gr.params[n]) for n in gr.params]
        pairs += [(f"{loss} loss d/dh0[{s}]", gk.h0[s], gr.h0[s]) for s in gr.h0]
        pairs += [(f"{loss} loss d/dx", gk.x, gr.x), (f"{loss} loss d/dV", gk.readout["V"], gr.readout["V"])]
    rng = np.random.default_rng(abs(prob.seed) + 67)
    dp, dh, dx = _direction(prob, rng)
    tangents: dict[str, Any] = dict(dp)
    tangents.update(h0=dh, x=dx)
    jk, jr = k.jvp(prob.params, prob.x, prob.h0, tangents), r.jvp(prob.params, prob.x, prob.h0, tangents)
    pairs += [(f"JVP of {s}", jk[s], jr[s]) for s in jr]
    for name, a, b in pairs:
        e = _rel(a, b)
        if e > worst:
            worst, where = e, name
    return CheckResult("compiled", worst, C_ROUND * (prob.T + 1) * EPS64, f"worst at {where}; {prob.describe()}")


def check_batch(prob: Problem, backend: str = "reference") -> CheckResult:
    """Batch of B vs B batches of one: the same states, and gradients that average.

    The last-state loss is a mean over the batch, so the batch gradient is the mean of the
    single-sequence gradients; tolerance ``C_ROUND * (T+1) * eps`` as for reordered sums."""
    cell = prob.cell
    k = _kernel(cell, "float64", backend)
    full_t = k.forward(prob.params, prob.x, prob.h0)
    full_g = k.backward(prob.params, prob.x, prob.h0, loss=prob.loss("last"))
    V, y = prob.V, prob.y_last
    worst, where = 0.0, ""
    acc = {n: np.zeros_like(v) for n, v in full_g.params.items()}
    for b in range(prob.B):
        xb = np.ascontiguousarray(prob.x[:, b:b + 1])
        hb = {s: np.ascontiguousarray(v[b:b + 1]) for s, v in prob.h0.items()}
        tb = k.forward(prob.params, xb, hb)
        for s in cell.state_names:
            e = _rel(tb.states[s][:, 0], full_t.states[s][:, b])
            if e > worst:
                worst, where = e, f"state {s}, sequence {b}"
        gb = k.backward(prob.params, xb, hb, loss=LastMSE(V, np.ascontiguousarray(y[b:b + 1])))
        for n in acc:
            acc[n] += gb.params[n] / prob.B
        for s in cell.state_names:
            e = _rel(gb.h0[s][0] / prob.B, full_g.h0[s][b])
            if e > worst:
                worst, where = e, f"d/dh0[{s}], sequence {b}"
    for n in acc:
        e = _rel(acc[n], full_g.params[n])
        if e > worst:
            worst, where = e, f"mean gradient d/d{n}"
    return CheckResult("batch", worst, C_ROUND * (prob.T + 1) * EPS64, f"worst at {where}; {prob.describe()}")


def _both_losses(check: Callable[..., CheckResult]) -> Callable[[Problem, str], CheckResult]:
    return lambda p, backend="reference": max((check(p, "last", backend), check(p, "step", backend)), key=lambda r: r.ratio)


CHECKS: dict[str, Callable[..., CheckResult]] = {
    "jacobian": check_jacobian,
    "bptt_cs": _both_losses(check_bptt_complex_step),
    "bptt_fd": _both_losses(check_bptt_finite_difference),
    "adjoint": check_adjoint,
    "mpmath": check_mpmath,
    "float32": check_float32,
    "batch": check_batch,
}

#: checks that only exist for compiled kernels
COMPILED_CHECKS: dict[str, Callable[..., CheckResult]] = {"compiled": check_compiled}


def verify(
    cell: Cell,
    *,
    examples: int = 4,
    seed: int = 0,
    checks: Iterable[str] | None = None,
    raise_on_failure: bool = True,
    problems: Iterable[Problem] | None = None,
    backend: str = "reference",
) -> VerificationReport:
    """Run the verification battery on ``cell`` and return a :class:`VerificationReport`.

    ``backend="compiled"`` runs the checks on the cell's compiled kernels (generated and
    compiled on first use) and adds the ``compiled`` check (compiled == numpy reference);
    the complex-step forward pass is always the numpy reference's.

    ``examples`` random problems are drawn from ``seed`` (or pass ``problems``, drawn
    for this very cell); ``checks`` selects checks by name (default: all).  A call
    that would run no check (``examples < 1``, an empty ``problems`` or ``checks``)
    raises :class:`~symgate.ConfigError` rather than report a pass.
    With ``raise_on_failure`` (the default) a failed check raises
    :class:`~symgate.VerificationError` listing every failure, so the call can sit
    directly in a user's test suite:

    >>> import symgate as sg
    >>> sg.testing.verify(sg.cells.leaky(), examples=1).passed
    True
    """
    _check_cell("verify", cell)
    _check_backend(backend)
    examples = _check_int("examples", examples, 1)
    seed = _check_int("seed", seed, 0)
    table = dict(CHECKS, **COMPILED_CHECKS) if backend == "compiled" else CHECKS
    if checks is None:
        names = list(table)
    elif isinstance(checks, str):
        names = [checks]
    elif hasattr(checks, "__iter__"):
        names = list(checks)
    else:
        raise ConfigError(f"checks must be None or check names, got {checks!r} ({type(checks).__name__})")
    if not names:
        raise ConfigError(f"checks is empty: no check would run; give None (all) or some of {list(table)}")
    unknown = [c for c in names if not isinstance(c, str) or c not in table]
    if unknown:
        raise ConfigError(f"unknown check(s) {unknown} for backend {backend!r}; available: {list(table)}")
    if problems is None:
        problems = [draw_problem(cell, seed * 1_000_003 + i) for i in range(examples)]
    elif not hasattr(problems, "__iter__"):
        raise ConfigError(f"problems must be None or Problems, got {problems!r} ({type(problems).__name__})")
    else:
        problems = list(problems)
        if not problems:
            raise ConfigError("problems is empty: no check would run; give None (draw `examples` problems) or some Problems")
        for i, prob in enumerate(problems):
            if not isinstance(prob, Problem):
                raise ConfigError(f"problems[{i}] is a {type(prob).__name__}, not a symgate.testing.Problem")
            if prob.cell is not cell:
                raise ConfigError(f"problems[{i}] was drawn for cell {prob.cell.name!r}, "
                                  f"not for the cell {cell.name!r} being verified")
    report = VerificationReport(cell.name)
    for prob in problems:
        for c in names:
            report.results.append(table[c](prob, backend=backend))
    if raise_on_failure:
        report.raise_if_failed()
    return report
