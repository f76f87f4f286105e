r"""The analogies between gates and optimisers, as checked statements (paper-notes §10, decision 6).

Each function returns *both sides* of a statement, computed by independent routes,
so a test (or a reader) can see where they agree -- exactly, or to first order --
and where they do not.

(a) **Learning-rate schedule** (:func:`schedule`).  At zeroth order in the coupling
    (the state Jacobian replaced by its leak), the BPTT gradient of a candidate
    parameter is a lag-weighted sum of per-lag terms with weights :math:`\mu_{t,\ell}`;
    for the leaky cell :math:`\mu_{t,\ell}=\alpha(1-\alpha)^\ell`, a fixed schedule over lags.
    The first-order correction is the expansion's first-order term inserted in the
    BPTT sum.

(b) **Momentum** (:func:`momentum`).  When the state Jacobian is exactly diagonal
    (e.g. the leaky cell with ``W_r = 0``), BPTT *is* a heavy-ball buffer over the
    per-step gradients, :math:`m_t=\beta_t\odot m_{t-1}+g_t` with :math:`\beta=1-\alpha`
    (leaky) or :math:`\beta_t=1-g_t` (a gate: data-dependent momentum), read out by the
    loss: :math:`\nabla L=\sum_t\delta_t\odot m_t`.

(c) **Adam** (:func:`adam_comparison`).  A vector gate rescales the rows of the
    candidate's parameters per neuron (by :math:`\mu`); Adam rescales every coordinate
    by :math:`1/(\sqrt{\hat v}+\epsilon)`.  The comparison puts the two diagonal
    preconditioners side by side (row-aggregated for Adam): anisotropy index
    :math:`\sigma_1/\sigma_r`, top-``r`` energy fraction, participation ratio,
    effective rank, and their alignment (Spearman rank correlation across neurons).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ._cell import Cell
from ._derive import jacobian, parameter_jacobian
from ._derive._expansion import effective_lr, retention_state
from ._errors import CellSpecError, ConfigError, ShapeError
from ._reference import reference_kernel
from ._transport import (
    JacobianProducts,
    _all_sizes,
    contract_rows,
    effective_lrs,
    immediate_rows,
    lag_weighted_gradients,
    step_values,
)
from .losses import Loss

__all__ = [
    "ScheduleStatement",
    "schedule",
    "MomentumStatement",
    "momentum",
    "adam_preconditioner",
    "row_aggregate",
    "spectrum_metrics",
    "rank_alignment",
    "gate_profile",
    "AdamComparison",
    "adam_comparison",
]


def _cotangents(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, loss: Loss | None,
                cotangents: np.ndarray | None) -> tuple[str, np.ndarray]:
    state = retention_state(cell)
    if (loss is None) == (cotangents is None):
        raise CellSpecError("give exactly one of loss= or cotangents=")
    if cotangents is not None:
        return state, np.asarray(cotangents, dtype=float)
    if state != cell.state_names[0]:
        raise CellSpecError(
            f"the loss reads state {cell.state_names[0]!r} but the retention state is {state!r}; pass cotangents= for {state!r}"
        )
    k = reference_kernel(cell, "float64")
    T, B, _ = x.shape
    loss.check(T, B, k.forward(params, x, h0).states[state].shape[-1], np.dtype("float64"))  # type: ignore[union-attr]
    traj = k.forward(params, x, h0)
    return state, loss.evaluate(traj.states[state])[1]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------
# (a) schedule
# ----------------------------------------------------------------------------


@dataclass
class ScheduleStatement:
    r"""Both sides of the schedule statement for one parameter.

    ``zeroth_order_gradient`` -- BPTT with every :math:`J_j` replaced by its leak
    (a backward recursion); ``lag_terms`` -- the per-lag terms weighted by
    :math:`\mu`, ``(T, *shape)``, whose sum (``lag_weighted_sum``) is the other side;
    ``weights`` -- the mean :math:`\mu_{t,\ell}` per lag; ``exact_gradient`` -- the BPTT
    gradient from dense Jacobians; ``first_order_correction`` -- the expansion's
    first-order term inserted in the BPTT sum (split ``"coupling"``, ``A`` = leak).
    :meth:`gradient_at` evaluates the gradient with the coupling scaled by ``eps``.
    """

    param: str
    zeroth_order_gradient: np.ndarray
    lag_terms: np.ndarray
    weights: np.ndarray
    first_order_correction: np.ndarray
    products: JacobianProducts
    immediate: list[np.ndarray]  # immediate[k - 1]: dense d+h_k/dtheta, (B, n, *shape)
    cotangents: np.ndarray
    block: slice

    @property
    def lag_weighted_sum(self) -> np.ndarray:
        return self.lag_terms.sum(axis=0)

    @property
    def exact_gradient(self) -> np.ndarray:
        return self.gradient_at(1.0)

    def gradient_at(self, eps: float) -> np.ndarray:
        r""":math:`\sum_t\sum_{k\le t}\delta_t^\top\prod_{j=k+1}^{t}(A_j+\varepsilon B_j)\,\partial^+h_k/\partial\theta`."""
        jp = self.products
        out = np.zeros(self.first_order_correction.shape)
        for t in range(1, jp.T + 1):
            for k in range(1, t + 1):
                row = self.cotangents[t - 1]
                if k < t:
                    row = np.einsum("bi,bij->bj", row, jp.product(t, k, eps)[:, self.block, self.block])
                out += np.einsum("bj,bj...->...", row, self.immediate[k - 1])
        return out


def schedule(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *,
             loss: Loss | None = None, cotangents: np.ndarray | None = None, param: str | None = None) -> ScheduleStatement:
    """Both sides of the schedule statement (a) for ``param`` (default: the candidate's ``W``)."""
    elr = effective_lr(cell, param)
    param = elr.param
    state, cot = _cotangents(cell, params, x, h0, loss, cotangents)
    T, B = x.shape[:2]
    rows = immediate_rows(cell, params, x, h0, param)
    w, rho, lam, src, kind = rows.write_gain, rows.sensitivity, rows.leak, rows.source, rows.kind
    # zeroth-order BPTT: a_t = delta_t + lambda_{t+1} * a_{t+1}
    a = np.zeros_like(cot)
    carry = np.zeros_like(cot[0])
    for step in range(T, 0, -1):
        carry = cot[step - 1] + (lam[step] * carry if step < T else 0.0)
        a[step - 1] = carry
    zeroth = contract_rows(a * w * rho, src, kind, np.shape(params[param]))
    mu = effective_lrs(cell, params, x, h0, param=param, max_lag=T - 1)
    terms = lag_weighted_gradients(cell, params, x, h0, cot, param, T - 1, mu=mu)
    valid = mu.valid()
    weights = np.array([np.mean(mu.mu[valid[:, ell], ell]) for ell in range(T)])
    # first order, from dense Jacobians (split "coupling": A = leak)
    jp = JacobianProducts(cell, params, x, h0, split="coupling")
    traj = jp.trajectory
    names = cell.state_names
    off = sum(traj.states[s].shape[-1] for s in names[: names.index(state)])
    block = slice(off, off + traj.states[state].shape[-1])
    k = reference_kernel(cell, "float64")
    pj = parameter_jacobian(cell, param, state)
    immediate = [pj.evaluate(k._values_at(traj, params, s), params, _all_sizes(cell, traj)) for s in range(T)]
    first = np.zeros(np.shape(params[param]))
    for t in range(1, T + 1):
        for kk in range(1, t):
            L1 = jp.first(t, kk)[:, block, block]
            first += np.einsum("bj,bj...->...", np.einsum("bi,bij->bj", cot[t - 1], L1), immediate[kk - 1])
    return ScheduleStatement(param, zeroth, terms, weights, first, jp, immediate, cot, block)


# ----------------------------------------------------------------------------
# (b) momentum
# ----------------------------------------------------------------------------


@dataclass
class MomentumStatement:
    r"""Both sides of the momentum statement: ``bptt`` (the reference kernel's gradient) and
    ``momentum`` (:math:`\sum_t\delta_t\odot m_t` with :math:`m_t=\beta_t\odot m_{t-1}+g_t`);
    ``beta`` is :math:`\beta_t=\lambda_t`, ``(T, B, n)``; ``coupling`` the largest entry of the
    non-leak part of the Jacobian (0 when the statement is exact)."""

    param: str
    bptt: np.ndarray
    momentum: np.ndarray
    beta: np.ndarray
    coupling: float


def momentum(cell: Cell, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *,
             loss: Loss, param: str | None = None, require_exact: bool = True) -> MomentumStatement:
    """Both sides of the momentum statement (b).  It is an identity when the state Jacobian is
    diagonal; with ``require_exact`` (default) a non-zero coupling raises ``ConfigError`` (a ``ValueError``)."""
    elr = effective_lr(cell, param)
    param = elr.param
    if len(cell.states) != 1:
        raise CellSpecError("the momentum statement is stated for one-state cells")
    k = reference_kernel(cell, "float64")
    T, B = x.shape[:2]
    g = k.backward(params, x, h0, loss=loss)
    traj = k.forward(params, x, h0)
    _, cot, _ = loss.evaluate(traj.h)
    vals = step_values(cell, params, traj)
    flat = {kk: (v.reshape(T * B, -1) if isinstance(v, np.ndarray) and v.ndim == 3 else v) for kk, v in vals.items()}
    rest = jacobian(cell).select("candidate", "gate", "reset")
    coupling = float(np.max(np.abs(rest.evaluate(flat, params, _all_sizes(cell, traj))))) if rest.terms else 0.0
    if require_exact and coupling != 0.0:
        raise ConfigError(
            f"the state Jacobian of {cell.name!r} is not diagonal for these parameters (coupling up to {coupling:.3g}); "
            "the momentum statement is exact only without coupling (e.g. symgate.decoupled(cell, params))"
        )
    rows = immediate_rows(cell, params, x, h0, param)
    w, rho, lam, src, kind = rows.write_gain, rows.sensitivity, rows.leak, rows.source, rows.kind
    shape = np.shape(params[param])
    n = traj.h.shape[-1]
    # one buffer row per neuron: (B, n, m) for a matrix parameter, (B, n) otherwise
    m = np.zeros((B, n, np.shape(src)[-1]) if kind == "matrix" else (B, n))
    total = np.zeros(shape)
    for step in range(1, T + 1):
        gt = (w * rho)[step - 1]  # (B, n): per-step immediate gradient rows
        if kind == "matrix":
            gt = gt[:, :, None] * np.broadcast_to(src[step - 1], (B, np.shape(src)[-1]))[:, None, :]
            m = lam[step - 1][:, :, None] * m + gt
            read = cot[step - 1][:, :, None] * m  # (B, n, m)
            total += read.sum(axis=0) if shape[0] == n else read.sum(axis=(0, 1))[None, :]
        else:
            m = lam[step - 1] * m + gt
            total += contract_rows(cot[step - 1] * m, None, kind, shape)
    return MomentumStatement(param, g.params[param], total, lam, coupling)


# ----------------------------------------------------------------------------
# (c) Adam
# ----------------------------------------------------------------------------


def adam_preconditioner(grads: Sequence[np.ndarray], *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    r"""Adam's diagonal preconditioner :math:`1/(\sqrt{\hat v_N}+\epsilon)` after the gradients ``grads``
    (:math:`v_n=\beta_2 v_{n-1}+(1-\beta_2)g_n^2`, :math:`\hat v_N=v_N/(1-\beta_2^N)`)."""
    if len(grads) == 0:
        raise ShapeError("adam_preconditioner needs at least one gradient")
    v = np.zeros_like(np.asarray(grads[0], dtype=float))
    for g in grads:
        g = np.asarray(g, dtype=float)
        if g.shape != v.shape:
            raise ShapeError(f"gradients must all have shape {v.shape}, got {g.shape}")
        v = beta2 * v + (1 - beta2) * g * g
    vhat = v / (1 - beta2 ** len(grads))
    return 1.0 / (np.sqrt(vhat) + eps)


def row_aggregate(P: np.ndarray) -> np.ndarray:
    """Per-row mean of a parameter-shaped preconditioner (rows = neurons of the candidate)."""
    P = np.asarray(P, dtype=float)
    return P.reshape(P.shape[0], -1).mean(axis=1) if P.ndim > 1 else P


def spectrum_metrics(values: np.ndarray, r: int = 10) -> dict[str, float]:
    r"""Anisotropy of a diagonal preconditioner with entries ``values`` (its singular values
    are ``|values|``): ``AI`` :math:`=\sigma_1/\sigma_r`, ``CE`` :math:`=\sum_{i\le r}\sigma_i^2/\sum\sigma_i^2`,
    ``PR`` :math:`=(\sum\sigma^2)^2/\sum\sigma^4`, ``erank`` = exp(entropy of :math:`\sigma/\sum\sigma`)."""
    s = np.sort(np.abs(np.asarray(values, dtype=float)).ravel())[::-1]
    if s.size == 0 or s[0] == 0:
        raise ShapeError("spectrum_metrics needs at least one non-zero value")
    r = min(r, s.size)
    s2 = s * s
    p = s / s.sum()
    nz = p[p > 0]
    return {
        "AI": float(s[0] / s[r - 1]) if s[r - 1] > 0 else float("inf"),
        "CE": float(s2[:r].sum() / s2.sum()),
        "PR": float(s2.sum() ** 2 / (s2 * s2).sum()),
        "erank": float(np.exp(-(nz * np.log(nz)).sum())),
        "r": float(r),
    }


def rank_alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two per-neuron profiles."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if a.shape != b.shape:
        raise ShapeError(f"profiles must have the same length, got {a.shape} and {b.shape}")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")  # a constant profile has no ranking
    return float(spearmanr(a, b).statistic)


def gate_profile(mu: Any, lag: int | None = None) -> np.ndarray:
    r"""Per-neuron gate preconditioner from an :class:`~symgate.EffectiveLRTrajectory`: the mean over
    valid steps and sequences of :math:`\mu_{t,\ell}` at ``lag``, or of :math:`\sum_\ell\mu_{t,\ell}`.

    Note that summed over all lags the exact convention telescopes,
    :math:`\sum_{\ell}g_{t-\ell}\prod_{j}(1-g_j)=1-\prod(1-g_j)\approx 1` for every neuron: a gate
    redistributes one unit of step over lags, so its anisotropy shows per lag (pass ``lag``).
    """
    m = mu.mu  # (T, L+1, B, n); 0 where the lag does not exist
    if lag is None:
        return m.sum(axis=1).mean(axis=(0, 1))
    v = mu.valid()[:, lag]
    return m[v, lag].mean(axis=(0, 1)) if v.any() else np.full(m.shape[-1], np.nan)


@dataclass
class AdamComparison:
    """Both sides of (c): metrics of the gate's per-neuron profile and of Adam's row-aggregated
    preconditioner, and their rank alignment across neurons."""

    gate: dict[str, float]
    adam: dict[str, float]
    alignment: float
    gate_profile: np.ndarray
    adam_profile: np.ndarray


def adam_comparison(gate: np.ndarray, adam: np.ndarray, *, r: int = 10) -> AdamComparison:
    """Put a gate profile (``(n,)``, e.g. :func:`gate_profile`) and Adam's preconditioner
    (parameter-shaped, row-aggregated here, or already ``(n,)``) side by side."""
    g = np.ravel(np.asarray(gate, dtype=float))
    a = row_aggregate(adam)
    if g.shape != a.shape:
        raise ShapeError(f"gate profile has {g.size} neurons but Adam's preconditioner has {a.size} rows")
    return AdamComparison(spectrum_metrics(g, r), spectrum_metrics(a, r), rank_alignment(g, a), g, a)
