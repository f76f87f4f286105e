r"""Numeric evaluation of the theory on trajectories.

Given a cell, parameters and an input batch, this module evaluates what
:mod:`symgate._derive._expansion` derives:

* :func:`effective_lrs` -- :math:`\mu_{t,\ell}` for every step ``t`` and every lag
  ``0 <= ell <= max_lag``, per sequence and neuron, from log-domain cumulative sums
  (vectorised over ``t``, batch and neurons; finite at ``ell = 1000`` where the
  direct product underflows);
* :class:`JacobianProducts` -- exact products :math:`J_t\cdots J_{k+1}`, their
  zeroth- and first-order approximations for a split, :math:`F(\varepsilon)`, and the
  expansion check (remainder slope, :math:`C_2`, ratios ``||B_j|| / ||A_j||``);
* :func:`per_lag_gradients` -- the exact lag-``ell`` contributions to a BPTT gradient
  (from dense Jacobians, an independent route) and their zeroth-order prediction
  from ``mu`` (:func:`lag_weighted_gradients`).

Time convention: steps are ``1..T``; arrays are indexed by ``step - 1``.  ``J_j`` is
the Jacobian of step ``j`` (it reads ``h_{j-1}``); lag ``ell = t - k`` has ``ell``
factors; ``mu[t, 0] = w_t`` (the immediate term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import sympy

from ._cell import Cell, Dim, UnitSymbol
from ._derive import jacobian, parameter_jacobian
from ._derive._expansion import effective_lr, retention_state, split as make_split
from ._derive._jacobian import ORIGINS, StructuredJacobian, _LAMBDIFIED
from ._derive._stable import argument_form, log_abs
from ._errors import CellSpecError, DTypeError, ShapeError
from ._linalg import matmul
from ._reference import Trajectory, reference_kernel

__all__ = [
    "step_values",
    "decoupled",
    "EffectiveLRTrajectory",
    "effective_lrs",
    "JacobianProducts",
    "per_lag_gradients",
    "lag_weighted_gradients",
]


def step_values(cell: Cell, params: Mapping[str, np.ndarray], traj: Trajectory) -> dict[str, Any]:
    """Every leaf and node value at every step: per-step quantities ``(T, B, d)``,
    vector parameters ``(d,)``, scalars ``()``, constants as floats."""
    vals: dict[str, Any] = dict(cell.constants)
    for p in cell.params:
        if p.kind != "matrix":
            vals[p.name] = params[p.name]
        else:
            M = np.asarray(params[p.name])
            r, c = M.shape
            vals[f"{p.name}_diag"] = np.diagonal(M).copy() if r == c else (M[0] if r == 1 else M[:, 0])
    vals[cell.inputs[0].name] = traj.x
    for s in cell.states:
        vals[s.name] = traj.previous(s.name)
    vals.update(traj.nodes)
    return vals


def _per_unit(expr: sympy.Expr, vals: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """A per-unit expression evaluated on all steps, broadcast to ``shape`` = (T, B, d)."""
    v = np.asarray(_LAMBDIFIED(expr, vals))
    return np.broadcast_to(v, shape)


def decoupled(cell: Cell, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of ``params`` with every recurrent matrix (a Linear reading a state-dependent
    quantity) set to zero: the coupling switched off, the state Jacobian reduced to its leak."""
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    if not isinstance(params, Mapping) or not all(isinstance(v, np.ndarray) for v in params.values()):
        raise DTypeError(f"params must be a dict of numpy arrays, got {type(params).__name__}")
    dynamic: set[UnitSymbol] = {s.symbol for s in cell.states}
    recurrent: set[str] = set()
    for nd in cell.nodes:
        deps = {nd.source} if nd.kind == "linear" else nd.expr.free_symbols
        if deps & dynamic:
            dynamic.add(nd.symbol)
            if nd.kind == "linear":
                recurrent.add(nd.matrix)  # type: ignore[arg-type]
    return {k: (np.zeros_like(v) if k in recurrent else v.copy()) for k, v in params.items()}


# ----------------------------------------------------------------------------
# effective learning rates on trajectories
# ----------------------------------------------------------------------------


def _cumulative(v: np.ndarray) -> np.ndarray:
    """``C[t] = sum_{j <= t} v_j`` for ``t = 0..T`` (``C[0] = 0``), along axis 0."""
    out = np.empty((v.shape[0] + 1,) + v.shape[1:], dtype=np.result_type(v, np.float64) if v.dtype != np.int64 else np.int64)
    out[0] = 0
    np.cumsum(v, axis=0, out=out[1:])
    return out


def _lag_differences(top: np.ndarray, bottom: np.ndarray, max_lag: int, offset: int, fill: Any) -> np.ndarray:
    """Lag-major ``out[ell, t-1] = top[t] - bottom[t - ell - offset]`` for steps ``t = 1..T``, lags
    ``0..max_lag``, and ``fill`` where ``t - ell < 1`` (the lag reaches before step 1).  Used for
    exact integer counts (zeros, negative signs)."""
    T = top.shape[0] - 1
    out = np.empty((max_lag + 1, T) + top.shape[1:], dtype=np.result_type(top, bottom))
    for ell in range(max_lag + 1):
        if ell < T:
            np.subtract(top[ell + 1:], bottom[1 - offset:T + 1 - ell - offset], out=out[ell, ell:])
        out[ell, :min(ell, T)] = fill
    return out


def _lag_sums(v: np.ndarray, max_lag: int, *, gain: np.ndarray | None = None, inclusive: bool = False,
              exp_out: np.ndarray | None = None) -> np.ndarray:
    """Lag-major windowed sums for all steps and lags: ``out[ell, t-1]`` =
    ``sum_{j=t-ell+1}^{t} v_j`` (+ ``gain_{t-ell}``), or ``sum_{j=t-ell}^{t} v_j`` when
    ``inclusive``; ``-inf`` where ``t - ell < 1``.  With ``exp_out``, also its exponential
    (fused, while each lag's slice is in cache).

    Each lag adds one term to the previous lag's running sums (one vectorised pass over
    contiguous slices), so the rounding error grows with the lag, not with the step:
    ``|error| <= ell * eps * sum |v_j|`` over the window only.
    """
    T = v.shape[0]
    out = np.empty((max_lag + 1,) + v.shape, dtype=np.result_type(v, np.float64))
    run = v.astype(out.dtype, copy=True) if inclusive else np.zeros_like(v, dtype=out.dtype)
    for ell in range(max_lag + 1):
        if ell >= T:
            out[ell] = -np.inf
        else:
            if ell > 0:  # extend each window one step into the past
                if inclusive:
                    run[ell:] += v[:T - ell]
                else:
                    run[ell:] += v[1:T - ell + 1]
            if gain is not None:
                np.add(run[ell:], gain[:T - ell], out=out[ell, ell:])
            else:
                out[ell, ell:] = run[ell:]
            out[ell, :ell] = -np.inf
        if exp_out is not None:
            np.exp(out[ell], out=exp_out[ell])
    return out


def _log_abs(v: np.ndarray, log_v: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``log|v|`` (0 where a factor is exactly zero) and the zero mask; ``log_v`` if given is the
    log-domain value (finite where ``v`` itself underflows)."""
    if log_v is not None:
        zero = np.isneginf(log_v)
        return np.where(zero, 0.0, log_v), zero
    zero = v == 0
    return np.log(np.where(zero, 1.0, np.abs(v))), zero


def _log_window_products(v: np.ndarray, max_lag: int, *, gain: np.ndarray | None = None, inclusive: bool = False,
                         exp_out: np.ndarray | None = None, log_v: np.ndarray | None = None,
                         log_gain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Log-domain ``log|prod|`` and sign of windowed products of ``v`` (``(T, ...)``) for all steps and lags.

    ``inclusive=False``: :math:`\prod_{j=t-\ell+1}^{t} v_j`, times ``gain_{t-ell}`` if given;
    ``inclusive=True``: :math:`\prod_{j=t-\ell}^{t} v_j`.  Zero factors give ``-inf`` exactly
    and signs come from exact integer counts (cumulative sums of integers differ exactly);
    the sign is ``None`` when nothing is negative.  ``log_v`` / ``log_gain``, if given, are
    ``log|v|`` / ``log|gain|`` computed in the log domain (finite where a factor underflows).
    """
    logv, zero = _log_abs(v, log_v)
    loggain = None
    if gain is not None:
        loggain, gzero = _log_abs(gain, log_gain)
    log_prod = _lag_sums(logv, max_lag, gain=loggain, inclusive=inclusive, exp_out=exp_out)
    offset = 1 if inclusive else 0
    if zero.any() or (gain is not None and gzero.any()):
        Z = _cumulative(zero.astype(np.int64))
        Zb = Z.copy()
        if gain is not None:
            Zb[1:] -= gzero.astype(np.int64)
        nz = _lag_differences(Z, Zb, max_lag, offset, 0) > 0
        log_prod[nz] = -np.inf
        if exp_out is not None:
            exp_out[nz] = 0.0
    sign = None
    neg = v < 0
    if neg.any() or (gain is not None and (gain < 0).any()):
        Nn = _cumulative(neg.astype(np.int64))
        Nb = Nn.copy()
        if gain is not None:
            Nb[1:] -= (gain < 0).astype(np.int64)
        sign = 1.0 - 2.0 * (_lag_differences(Nn, Nb, max_lag, offset, 0) % 2)
        if exp_out is not None:
            exp_out *= sign
    return log_prod, sign


class EffectiveLRTrajectory:
    r"""``mu[t-1, ell, b, q]`` for steps ``t = 1..T`` and lags ``ell = 0..max_lag``.

    ``log_abs_mu`` and ``sign`` hold :math:`\mu` in log domain (``-inf`` where the lag
    reaches before step 1 or a factor is 0; ``sign`` is None when no entry is negative);
    ``mu`` is :math:`\mu` itself.  ``write_gain`` and ``leak`` are ``(T, B, n)``;
    ``first_order`` (diagonal split, optional) is :math:`\mu^{(1)}`, laid out like ``mu``.
    The arrays are stored lag-major and exposed as ``(T, L+1, B, n)`` views.
    """

    def __init__(self, param: str, state: str, convention: str, log_lm: np.ndarray, sign_lm: np.ndarray | None,
                 write_gain: np.ndarray, leak: np.ndarray, mu_lm: np.ndarray | None = None,
                 first_order_lm: np.ndarray | None = None) -> None:
        self.param, self.state, self.convention = param, state, convention
        self._log, self._sign, self._mu, self._fo = log_lm, sign_lm, mu_lm, first_order_lm
        self.write_gain, self.leak = write_gain, leak

    @property
    def log_abs_mu(self) -> np.ndarray:
        return np.moveaxis(self._log, 0, 1)

    @property
    def sign(self) -> np.ndarray | None:
        return None if self._sign is None else np.moveaxis(self._sign, 0, 1)

    @property
    def mu(self) -> np.ndarray:
        r""":math:`\mu` itself, ``(T, L+1, B, n)`` (0 where the lag does not exist or underflows)."""
        if self._mu is None:
            self._mu = np.exp(self._log)
            if self._sign is not None:
                self._mu *= self._sign
        return np.moveaxis(self._mu, 0, 1)

    @property
    def first_order(self) -> np.ndarray | None:
        return None if self._fo is None else np.moveaxis(self._fo, 0, 1)

    def __repr__(self) -> str:
        T, L1 = self.log_abs_mu.shape[:2]
        return f"<EffectiveLRTrajectory of {self.param} (state {self.state}, {self.convention}): T={T}, lags 0..{L1 - 1}>"

    @property
    def max_lag(self) -> int:
        return self.log_abs_mu.shape[1] - 1

    def valid(self) -> np.ndarray:
        """``(T, max_lag + 1)`` mask of (t, ell) with ``t - ell >= 1`` (the lag exists)."""
        T = self.log_abs_mu.shape[0]
        return (np.arange(1, T + 1)[:, None] - np.arange(self.max_lag + 1)[None, :]) >= 1

    def envelope(self) -> np.ndarray:
        r"""The follow-up's envelope :math:`f(\ell)=\lVert\mu_{t,\ell}\rVert_1` (sum over neurons), ``(T, L+1, B)``."""
        return np.abs(self.mu).sum(axis=-1)

    def log_l1_mean(self) -> np.ndarray:
        r"""The follow-up's ``log_mu_l1_mean`` per lag ``(L+1,)``: for each sequence, the log of the
        time average (over valid steps) of :math:`\lVert\mu_{t,\ell}\rVert_1`, then the mean over sequences."""
        v = self.valid()
        env = self.envelope()  # (T, L+1, B)
        out = np.full(self.max_lag + 1, np.nan)
        for ell in range(self.max_lag + 1):
            if v[:, ell].any():
                out[ell] = np.mean(np.log(env[v[:, ell], ell].mean(axis=0)))
        return out

    def mean_envelope(self, *, geometric: bool = False) -> np.ndarray:
        """Mean of ``|mu|`` over valid steps, sequences and neurons, per lag ``(L+1,)``; with
        ``geometric=True`` the mean of ``log|mu|`` (a geometric mean; for the follow-up's
        ``log_mu_l1_mean`` see :meth:`log_l1_mean`)."""
        v = self.valid()
        out = np.empty(self.max_lag + 1)
        for ell in range(self.max_lag + 1):
            sel = self.log_abs_mu[v[:, ell], ell]
            if sel.size == 0:
                out[ell] = np.nan
            else:
                out[ell] = np.mean(sel) if geometric else np.mean(np.exp(sel))
        return out


#: the most memory (bytes) ``effective_lrs`` allocates for a ``max_lag`` past ``T - 1`` (lags with no value)
LAG_MEMORY_LIMIT = 1 << 30


def _check_lag_memory(max_lag: int, T: int, B: int, n: int) -> None:
    """A lag axis longer than the sequence, too large to allocate, is a mistake: say so (not MemoryError)."""
    need = 3 * (max_lag + 1) * T * B * n * 8  # log|mu|, sign and mu, float64
    if max_lag > T - 1 and need > LAG_MEMORY_LIMIT:
        raise ShapeError(f"max_lag = {max_lag} with T = {T} steps would allocate about {need / 2**30:.3g} GiB, mostly "
                         f"lags >= T that have no value; pass max_lag <= T - 1 = {T - 1}")


def effective_lrs(
    cell: Cell,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    h0: Any = None,
    *,
    param: str | None = None,
    state: str | None = None,
    max_lag: int = 50,
    convention: str = "exact",
    first_order: bool = False,
    trajectory: Trajectory | None = None,
    compute_mu: bool = False,
) -> EffectiveLRTrajectory:
    r""":math:`\mu_{t,\ell}` of ``param`` on the trajectory of ``x`` (see :func:`symgate.effective_lr`).

    Vectorised over steps, lags, sequences and neurons; computed in log domain, so
    long lags stay finite.  ``first_order=True`` adds the diagonal-split correction
    :math:`\mu^{(1)}=\mu^{(0)}\sum_j r_j/\lambda_j` with ``r`` the exact rest of the diagonal.
    The result holds :math:`\log|\mu|` (and signs); ``.mu`` exponentiates on first use, or
    right away, fused with the log-domain pass, with ``compute_mu=True``.

    Lags of ``T`` or more reach before step 1 at every step: they hold ``-inf`` (no value).  A
    ``max_lag`` past ``T - 1`` whose result would take more than :data:`LAG_MEMORY_LIMIT` bytes
    raises :class:`~symgate.ShapeError` rather than allocating lags that have no value.
    """
    if not isinstance(max_lag, (int, np.integer)) or isinstance(max_lag, bool) or max_lag < 0:
        raise ShapeError(f"max_lag must be an integer >= 0, got {max_lag!r}")
    elr = effective_lr(cell, param, state=state, convention=convention)
    k = reference_kernel(cell, "float64")
    traj = trajectory if trajectory is not None else k.forward(params, x, h0)
    vals = step_values(cell, params, traj)
    T, B = traj.x.shape[:2]
    n = traj.states[elr.state].shape[-1]
    _check_lag_memory(int(max_lag), T, B, n)
    shape = (T, B, n)
    w, lam = (np.ascontiguousarray(_per_unit(argument_form(cell, e), vals, shape)) for e in (elr.write_gain_unit, elr.leak_unit))
    # the logs of the factors in the log domain: log(1 - g) = -softplus(u) is finite where 1 - g underflows;
    # a factor that is exactly 0 (a rate read linearly from the data) has log -inf, a value, not an error
    with np.errstate(divide="ignore"):
        log_w, log_lam = (np.ascontiguousarray(_per_unit(log_abs(cell, e), vals, shape)) for e in (elr.write_gain_unit, elr.leak_unit))
    mu_lm = np.empty((max_lag + 1, T, B, n)) if compute_mu else None
    if convention == "s1":
        log_mu, sign = _log_window_products(w, max_lag, inclusive=True, exp_out=mu_lm, log_v=log_w)
    elif convention == "followup":
        log_mu, sign = _log_window_products(lam, max_lag, exp_out=mu_lm, log_v=log_lam)
    else:
        log_mu, sign = _log_window_products(lam, max_lag, gain=w, exp_out=mu_lm, log_v=log_lam, log_gain=log_w)
    fo = None
    if first_order and convention != "s1":  # the released S1 predictor has no first-order correction
        r = _diagonal_rest(cell, params, vals, elr.state, (T, B, n))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(lam == 0, np.nan, r / np.where(lam == 0, 1.0, lam))
        S = _lag_sums(ratio, max_lag)
        S[np.isneginf(S)] = 0.0
        mu0 = np.exp(log_mu) if sign is None else sign * np.exp(log_mu)
        fo = np.where(np.isneginf(log_mu), 0.0, mu0 * S)
    return EffectiveLRTrajectory(elr.param, elr.state, convention, log_mu, sign, w, lam, mu_lm, fo)


def _diagonal_rest(cell: Cell, params: Mapping[str, np.ndarray], vals: Mapping[str, Any], state: str,
                   shape: tuple[int, int, int]) -> np.ndarray:
    """Exact diagonal of the non-leak part of dstate'/dstate at every step, ``(T, B, n)``."""
    J = jacobian(cell, state, state).select("candidate", "gate", "reset")
    T, B, n = shape
    out = np.zeros(shape)
    flat = {k: (v.reshape(T * B, -1) if isinstance(v, np.ndarray) and v.ndim == 3 else v) for k, v in vals.items()}
    for term in J.terms:
        mats = [f for f in term.factors if f.kind == "matrix"]
        if len(mats) <= 1:  # per-unit closed form: coefficient * factors with M's diagonal entries
            from ._derive._expansion import _diagonal_of_terms

            e = _diagonal_of_terms([term])
            out = out + _per_unit(e, vals, shape)  # type: ignore[arg-type]
        else:  # a longer chain (GRU's reset path): its exact diagonal from the dense chain
            dense = StructuredJacobian(J.of, J.wrt, (term,), J.rows, J.cols).evaluate(flat, params)
            out = out + np.diagonal(dense, axis1=1, axis2=2).reshape(shape)
    return out


# ----------------------------------------------------------------------------
# Jacobian products and the expansion check
# ----------------------------------------------------------------------------


class JacobianProducts:
    r"""Dense per-step Jacobians of a run, split as ``J_j = A_j + B_j``, and their products.

    ``A[j-1]``, ``B[j-1]`` are ``(B, N, N)`` for steps ``j = 1..T`` (``N`` = total state
    size; states stacked in declaration order).  Products are in chain-rule order.
    For checking and for moderate sizes: memory is ``2 T B N^2``.
    """

    def __init__(self, cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *,
                 split: str | Sequence[str] = "appendix", trajectory: Trajectory | None = None) -> None:
        sp = make_split(cell, split)  # validates the split
        self.cell = cell
        self.split = sp
        k = reference_kernel(cell, "float64")
        self.trajectory = traj = trajectory if trajectory is not None else k.forward(params, x, h0)
        vals = step_values(cell, params, traj)
        T, Bsz = traj.x.shape[:2]
        flat = {kk: (v.reshape(T * Bsz, -1) if isinstance(v, np.ndarray) and v.ndim == 3 else v) for kk, v in vals.items()}
        blocks_A, blocks_B = [], []
        names = cell.state_names
        sizes = _all_sizes(cell, traj)
        rest = tuple(o for o in ORIGINS if o not in sp.origins)
        for a in names:
            row_A, row_B = [], []
            for b in names:
                blk = jacobian(cell, a, b)
                row_A.append(blk.select(*rest).evaluate(flat, params, sizes))
                row_B.append(blk.select(*sp.origins).evaluate(flat, params, sizes))
            blocks_A.append(np.concatenate(row_A, axis=2))
            blocks_B.append(np.concatenate(row_B, axis=2))
        N = sum(traj.states[s].shape[-1] for s in names)
        self.A = np.concatenate(blocks_A, axis=1).reshape(T, Bsz, N, N)
        self.B = np.concatenate(blocks_B, axis=1).reshape(T, Bsz, N, N)
        self.T = T

    def _check(self, t: int, k: int) -> None:
        if not (0 <= k < t <= self.T):
            raise ShapeError(f"need 0 <= k < t <= T = {self.T}, got t={t}, k={k}")

    def product(self, t: int, k: int, eps: float = 1.0) -> np.ndarray:
        r""":math:`F(\varepsilon)=\prod_{j=k+1}^{t}(A_j+\varepsilon B_j)`; ``eps=1`` is the exact product."""
        self._check(t, k)
        P = np.broadcast_to(np.eye(self.A.shape[-1]), self.A.shape[1:]).copy()
        for j in range(k + 1, t + 1):  # multiply later factors on the left
            P = matmul(self.A[j - 1] + eps * self.B[j - 1], P)
        return P

    def exact(self, t: int, k: int) -> np.ndarray:
        """:math:`J_t\\cdots J_{k+1}`."""
        return self.product(t, k, 1.0)

    def zeroth(self, t: int, k: int) -> np.ndarray:
        """:math:`A_t\\cdots A_{k+1}`."""
        return self.product(t, k, 0.0)

    def first(self, t: int, k: int) -> np.ndarray:
        r"""The first-order term :math:`L=\sum_i(\prod_{j>i}A_j)B_i(\prod_{j<i}A_j)` (prefix/suffix products)."""
        self._check(t, k)
        N = self.A.shape[-1]
        eye = np.broadcast_to(np.eye(N), self.A.shape[1:])
        prefix = [eye]  # prefix[i - k - 1] = A_{i-1} ... A_{k+1}
        for j in range(k + 1, t):
            prefix.append(matmul(self.A[j - 1], prefix[-1]))
        out = np.zeros(self.A.shape[1:])
        suffix = eye.copy()  # A_t ... A_{i+1}
        for i in range(t, k, -1):
            out = out + matmul(matmul(suffix, self.B[i - 1]), prefix[i - k - 1])
            suffix = matmul(suffix, self.A[i - 1])
        return out

    def check_expansion(self, t: int, k: int, eps: Sequence[float] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
                        fit_points: int = 5) -> dict[str, Any]:
        r"""The appendix check: :math:`E(\varepsilon)=\lVert F(\varepsilon)-F_0-\varepsilon L\rVert_F`,
        :math:`C_2=E/\varepsilon^2`, the log-log slope over the first ``fit_points`` values, the
        remainder at :math:`\varepsilon=1` (absolute and relative), the ratios
        :math:`r_j=\lVert B_j\rVert_2/\lVert A_j\rVert_2`, and the first-order term against a
        central difference of :math:`F` at 0.  Norms are per sequence, then the median over the batch.
        """
        eps = np.asarray(eps, dtype=float)
        F0, L = self.zeroth(t, k), self.first(t, k)
        E = np.array([np.median(np.linalg.norm(self.product(t, k, e) - F0 - e * L, axis=(-2, -1))) for e in eps])
        m = min(fit_points, len(eps))
        ok = E[:m] > 0
        slope = float(np.polyfit(np.log(eps[:m][ok]), np.log(E[:m][ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
        F1 = self.exact(t, k)
        h = 1e-4
        fd = (self.product(t, k, h) - self.product(t, k, -h)) / (2 * h)
        nA = np.linalg.norm(self.A[k:t], ord=2, axis=(-2, -1))
        nB = np.linalg.norm(self.B[k:t], ord=2, axis=(-2, -1))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = nB / nA
        at1 = np.linalg.norm(F1 - F0 - L, axis=(-2, -1))
        with np.errstate(invalid="ignore"):  # A_j = 0 (no leak): ratios are inf
            ratio = {"median": float(np.nanmedian(r)), "p90": float(np.nanpercentile(r, 90)),
                     "p99": float(np.nanpercentile(r, 99)), "max": float(np.nanmax(r))}
        with np.errstate(divide="ignore", invalid="ignore"):  # no leak: F0 = 0 = F1 possible -> nan
            rel_F = at1 / np.linalg.norm(F1, axis=(-2, -1))
            rel_F0L = at1 / np.linalg.norm(F0 + L, axis=(-2, -1))
        return {
            "eps": eps,
            "error": E,
            "C2": E / eps**2,
            "slope": slope,
            "remainder_at_1": float(np.median(at1)),
            "remainder_at_1_rel_F": float(np.median(rel_F)),
            "remainder_at_1_rel_F0L": float(np.median(rel_F0L)),
            "first_vs_central_difference": float(np.max(np.abs(fd - L)) / max(1e-300, float(np.max(np.abs(L))))),
            "ratio_B_A": ratio,
            "norm_F0": float(np.median(np.linalg.norm(F0, axis=(-2, -1)))),
            "norm_L": float(np.median(np.linalg.norm(L, axis=(-2, -1)))),
        }


def _all_sizes(cell: Cell, traj: Trajectory) -> dict[Dim, int]:
    sizes: dict[Dim, int] = {1: 1}
    for s in cell.states:
        sizes[s.dim] = traj.states[s.name].shape[-1]
    sizes[cell.inputs[0].dim] = traj.x.shape[-1]
    for nd_name, v in traj.nodes.items():
        nd = cell.node(nd_name)
        if nd is not None:
            sizes.setdefault(nd.dim, v.shape[-1])
    return sizes


# ----------------------------------------------------------------------------
# per-lag gradient contributions
# ----------------------------------------------------------------------------


def per_lag_gradients(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, cotangents: np.ndarray,
                      param: str, max_lag: int, *, eps: float = 1.0, split: str | Sequence[str] = "coupling") -> np.ndarray:
    r"""Exact lag-``ell`` contributions :math:`G_\ell=\sum_t \delta_t^\top(\prod_{j=t-\ell+1}^{t}J_j)\,\partial^+h_{t-\ell}/\partial\theta`
    of the state named by :func:`~symgate._derive._expansion.retention_state`, ``(max_lag + 1, *shape)``.

    ``cotangents`` is :math:`\delta_t=\partial L/\partial h_t` of that state, ``(T, B, n)``.  Computed
    from dense Jacobians (an independent route from BPTT); with ``eps`` the coupling part
    ``B`` of ``split`` is scaled, ``J = A + eps*B``.  Sum over all lags = the BPTT gradient
    (for ``eps = 1`` and ``max_lag >= T - 1``).
    """
    state = retention_state(cell, None)
    jp = JacobianProducts(cell, params, x, h0, split=split)
    traj = jp.trajectory
    T, B = traj.x.shape[:2]
    names = cell.state_names
    off = sum(traj.states[s].shape[-1] for s in names[: names.index(state)])
    n = traj.states[state].shape[-1]
    k = reference_kernel(cell, "float64")
    pj = parameter_jacobian(cell, param, state)
    shape = np.shape(params[param])
    out = np.zeros((max_lag + 1,) + shape)
    PJ = []
    for step in range(1, T + 1):
        vals = k._values_at(traj, params, step - 1)
        PJ.append(pj.evaluate(vals, params, _all_sizes(cell, traj)))  # (B, n, *shape)
    sl = slice(off, off + n)
    for t in range(1, T + 1):
        P = np.broadcast_to(np.eye(jp.A.shape[-1]), jp.A.shape[1:]).copy()
        for ell in range(0, min(max_lag, t - 1) + 1):
            kk = t - ell
            if ell > 0:
                P = matmul(P, jp.A[kk] + eps * jp.B[kk])  # extend on the right: J_t ... J_{kk+1}
            blockP = P[:, sl, sl]
            row = np.einsum("bi,bij->bj", cotangents[t - 1], blockP)
            out[ell] += np.einsum("bj,bj...->...", row, PJ[kk - 1])
    return out


@dataclass
class ImmediateRows:
    """Per-step factors of a parameter's immediate Jacobian ``C = w * rho`` (per neuron), with the
    leak ``lam`` of the retention state: each ``(T, B, n)``; ``source`` is the vector the parameter
    multiplies (``(T, B, m)``, None for a bias) and ``kind`` the parameter's kind."""

    write_gain: np.ndarray
    sensitivity: np.ndarray
    leak: np.ndarray
    source: Any
    kind: str


def immediate_rows(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, param: str) -> ImmediateRows:
    """The :class:`ImmediateRows` of ``param`` on the trajectory of ``x``."""
    elr = effective_lr(cell, param)
    traj = reference_kernel(cell, "float64").forward(params, x, h0)
    vals = step_values(cell, params, traj)
    shape = traj.x.shape[:2] + (traj.states[elr.state].shape[-1],)
    return ImmediateRows(
        _per_unit(elr.write_gain_unit, vals, shape),
        _per_unit(elr.sensitivity_unit, vals, shape),
        _per_unit(elr.leak_unit, vals, shape),
        vals[elr.source] if elr.source else None,
        next(p.kind for p in cell.params if p.name == param),
    )


def lag_weighted_gradients(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, cotangents: np.ndarray,
                           param: str, max_lag: int, *, mu: EffectiveLRTrajectory | None = None) -> np.ndarray:
    r"""Zeroth-order lag-``ell`` contributions predicted by :math:`\mu`:
    :math:`\sum_t \sum_b (\delta_t\odot\mu_{t,\ell}\odot\rho_{t-\ell})\otimes v_{t-\ell}`, with
    :math:`\rho = \partial N/\partial z` the node's own sensitivity and ``v`` the vector the
    parameter multiplies; ``(max_lag + 1, *shape)``."""
    if mu is None:
        mu = effective_lrs(cell, params, x, h0, param=param, max_lag=max_lag)
    rows = immediate_rows(cell, params, x, h0, param)
    rho, src, kind = rows.sensitivity, rows.source, rows.kind
    T = rho.shape[0]
    m = mu.mu  # (T, L+1, B, n)
    out = np.zeros((max_lag + 1,) + np.shape(params[param]))
    for ell in range(max_lag + 1):
        if ell >= T:
            break
        d = cotangents[ell:] * m[ell:, ell] * rho[: T - ell]  # (T-ell, B, n): steps t = ell+1..T
        out[ell] = contract_rows(d, None if src is None else src[: T - ell], kind, out.shape[1:])
    return out


def contract_rows(d: np.ndarray, src: Any, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Sum over steps/sequences of immediate gradients with per-neuron rows ``d`` (``(..., n)``):
    ``d (x) v`` for a matrix whose rows are the neurons, summed over neurons for a parameter
    shared by all of them (a one-row matrix, a scalar)."""
    if kind == "matrix":
        v = np.broadcast_to(src, d.shape[:-1] + (np.shape(src)[-1],)).reshape(-1, np.shape(src)[-1])
        d2 = d.reshape(-1, d.shape[-1])
        if shape[0] == d.shape[-1]:
            return matmul(d2.T, v)
        return matmul(d2.sum(axis=1), v)[None, :]  # one row shared by every neuron
    if kind == "vector":
        return d.reshape(-1, d.shape[-1]).sum(axis=0) if shape[0] == d.shape[-1] else np.array([d.sum()])
    return np.asarray(d.sum())
