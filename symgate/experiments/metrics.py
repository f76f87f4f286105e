r"""The measurements of the paper's simulations, computed exactly.

* :func:`dense_jacobians` -- the exact state Jacobians :math:`J_t=\partial h_t/\partial h_{t-1}`
  of a run, ``(T, B, N, N)``, evaluated from the derived structured Jacobian.
* :func:`lag_sensitivities` -- :math:`S_{t,k}=\lVert J_t\cdots J_{k+1}\rVert_2` for many
  ``(t, k)`` pairs, by the exact spectral norm (:func:`spectral_norms`) of products kept in
  log scale (no underflow at long lags), and beside it the released code's estimator
  (5 power-iteration steps from a random start, normalising by
  :math:`\lVert v\rVert+10^{-12}`), so their difference can be shown.
* :func:`lag_profile`, :func:`loglog_fit` -- the empirical profile
  :math:`\tilde\mu_{\rm eff}(h)=\mathrm{med}_{t-k=h}S/\mathrm{med}_{t-k=1}S`, the predicted
  one from a gate product :math:`P_{t,k}`, and the OLS slope :math:`s` of
  :math:`\log S=a+s\log P` with :math:`R^2`.
* :func:`spectrum_indices` -- anisotropy of singular-value spectra: :math:`\mathrm{AI}_r=\sigma_1/\sigma_r`,
  :math:`\mathrm{CE}_r=\sum_{i\le r}\sigma_i^2/\sum_i\sigma_i^2` over the whole spectrum and over
  the top 16 only (the released variant), participation ratio
  :math:`\mathrm{PR}=(\sum\sigma^2)^2/\sum\sigma^4` and effective rank
  :math:`\exp(-\sum p_i\log p_i)`, :math:`p=\sigma/\sum\sigma`.
* :func:`propagation_anisotropy` -- those indices for lag-``h`` Jacobian products of
  sampled ``(b, t, k)`` pairs; :func:`gradient_anisotropy` -- for the matrix of
  per-example gradients (rows normalised to unit norm, columns centred).

No constant is ever added to a norm or a denominator: a quantity that is exactly 0
stays 0 (its log is ``-inf`` and it is left out of fits, counted in the output).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .._cell import Cell
from .._derive import jacobian
from .._derive._jacobian import _LAMBDIFIED, StructuredJacobian, Term
from .._errors import ConfigError, ShapeError
from .._reference import Trajectory
from .._transport import _all_sizes, step_values

__all__ = [
    "dense_jacobians",
    "lag_sensitivities",
    "spectral_norms",
    "lag_profile",
    "loglog_fit",
    "spectrum_indices",
    "apply_jacobians",
    "propagation_anisotropy",
    "gradient_anisotropy",
    "summary",
]

#: below this magnitude a running product is rescaled (its log scale is tracked separately)
_RESCALE = 1e-100


def dense_jacobians(cell: Cell, params: Mapping[str, np.ndarray], trajectory: Trajectory) -> np.ndarray:
    r"""Exact :math:`J_t=\partial h_t/\partial h_{t-1}` at every step of ``trajectory``:
    ``J[t-1, b]`` is ``(N, N)`` with ``N`` the total state size (states stacked in order)."""
    st = _Steps(cell, params, trajectory)
    T, B = st.T, st.B
    N = sum(st.dims)
    offs = np.cumsum([0, *st.dims])
    out = np.empty((T * B, N, N))
    chunk = max(1, 2**19 // (N * N))  # rows per evaluation: keeps the temporaries in cache
    for lo in range(0, T * B, chunk):
        part = st.rows(slice(lo, lo + chunk))
        for ia, a in enumerate(st.names):
            for ib, b in enumerate(st.names):
                out[lo:lo + chunk, offs[ia]:offs[ia + 1], offs[ib]:offs[ib + 1]] = \
                    st.blocks[(a, b)].evaluate(part, params, st.sizes)
    return out.reshape(T, B, N, N)


def spectral_norms(P: np.ndarray) -> np.ndarray:
    r"""The largest singular value :math:`\sigma_1` of each matrix of ``P`` ``(K, M, N)``, exactly.

    Each matrix is scaled by its largest entry :math:`m`, its Gram matrix
    :math:`G=(P/m)^\top(P/m)` formed, and only the largest eigenvalue of :math:`G` computed
    (LAPACK ``dsyevr``: tridiagonal reduction, then bisection for one eigenvalue):
    :math:`\sigma_1=m\sqrt{\lambda_{\max}(G)}`.  Weyl's inequality bounds the error of
    :math:`\lambda_{\max}` by :math:`\lVert\Delta G\rVert\approx N\varepsilon\,\sigma_1^2`, a relative
    error of order :math:`N\varepsilon` in :math:`\sigma_1` -- the same order as a values-only SVD,
    which also computes every other singular value (about 1.4x slower at ``N = 64``).
    """
    from scipy.linalg import lapack

    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3:
        raise ShapeError(f"P must be (K, M, N), got {P.shape}")
    K, M, N = P.shape
    out = np.zeros(K)
    if K == 0 or M == 0 or N == 0:
        return out
    m = np.max(np.abs(P), axis=(1, 2))
    live = np.flatnonzero(m > 0)
    Q = P[live] / m[live, None, None]
    G = np.matmul(Q.transpose(0, 2, 1), Q) if N <= M else np.matmul(Q, Q.transpose(0, 2, 1))
    n = G.shape[-1]
    for j, i in enumerate(live):
        w, _, _, _, info = lapack.dsyevr(G[j], compute_v=0, range="I", il=n, iu=n, overwrite_a=1)
        lam = w[0] if info == 0 else np.linalg.svd(Q[j], compute_uv=False)[0] ** 2
        out[i] = m[i] * np.sqrt(max(lam, 0.0))
    return out


def _released_power_norm(P: np.ndarray, log_scale: np.ndarray, rng: np.random.Generator, iters: int) -> np.ndarray:
    r"""log of the released estimator on ``P_true = exp(log_scale) * P`` (``P`` ``(K, N, N)``):
    ``v <- P v / (||P v|| + 1e-12)`` ``iters`` times from ``v ~ N(0, I)``, then ``||P v||``."""
    K, N, _ = P.shape
    with np.errstate(over="ignore"):
        tiny = 1e-12 * np.exp(-log_scale)  # the additive 1e-12 seen at the true scale (inf when it swamps)
    v = rng.standard_normal((K, N))
    v /= (np.linalg.norm(v, axis=1) + 1e-12)[:, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(iters):
            w = np.einsum("kij,kj->ki", P, v)
            v = w / (np.linalg.norm(w, axis=1) + tiny)[:, None]
            v[~np.isfinite(v)] = 0.0
        s = np.linalg.norm(np.einsum("kij,kj->ki", P, v), axis=1)
        return np.where(s > 0, np.log(s) + log_scale, -np.inf)


def lag_sensitivities(J: np.ndarray, *, stride: int = 1, max_lag: int | None = None, power_iters: int | None = 5,
                      rng: np.random.Generator | None = None, first_k: int = 0) -> dict[str, np.ndarray]:
    r""":math:`\log S_{t,k}` for the pairs ``t - k = h`` with endpoints ``t = T, T - stride, ...``.

    ``stride = 1`` gives every pair ``0 <= k < t <= T`` (the released S1 probe); a stride
    ``s`` keeps every ``s``-th endpoint, a subsample that takes the same fraction of the
    pairs at every lag.  For each endpoint the products
    :math:`P_{t,k}=P_{t,k+1}J_{k+1}` are built backwards in ``k``, rescaled whenever they
    shrink below 1e-100 (the scale is kept as a log), and their largest singular value is
    computed exactly (:func:`spectral_norms`).  With ``power_iters`` the released estimator is
    evaluated on the same products (``rng`` draws its start vectors).  Only starts ``k >= first_k`` are
    used (``first_k = 1`` keeps the pairs whose start step ``k`` exists, so that a gate
    product :math:`P_{t,k}` involving step ``k`` is defined).

    Returns ``b, t, k, lag`` (int arrays), ``log_S`` (exact) and ``log_S_power``.
    """
    J = np.asarray(J, dtype=np.float64)
    if J.ndim != 4 or J.shape[-1] != J.shape[-2]:
        raise ShapeError(f"J must be (T, B, N, N), got {J.shape}")
    from .tasks import _check_int

    _check_int("stride", stride, 1)
    T, B, N, _ = J.shape
    L = T if max_lag is None else int(max_lag)
    if power_iters is not None and rng is None:
        rng = np.random.default_rng(0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("b", "t", "k", "log_S", "log_S_power")}
    eye = np.eye(N)
    for b in range(B):
        mats, scales, ts, ks = [], [], [], []
        for t in range(T, 0, -stride):
            Q = eye
            logc = 0.0
            for k in range(t - 1, max(first_k - 1, t - 1 - L), -1):
                Q = Q @ J[k, b]  # J[k] is J_{k+1}: Q = J_t ... J_{k+1}
                m = np.max(np.abs(Q))
                if 0 < m < _RESCALE or m > 1 / _RESCALE:
                    Q = Q / m
                    logc += np.log(m)
                mats.append(Q)
                scales.append(logc)
                ts.append(t)
                ks.append(k)
        if not mats:
            continue
        P = np.stack(mats)
        sc = np.asarray(scales)
        s1 = spectral_norms(P)
        with np.errstate(divide="ignore"):
            out["log_S"].append(np.where(s1 > 0, np.log(s1) + sc, -np.inf))
        if power_iters is not None:
            out["log_S_power"].append(_released_power_norm(P, sc, rng, power_iters))  # type: ignore[arg-type]
        out["b"].append(np.full(len(ts), b))
        out["t"].append(np.asarray(ts))
        out["k"].append(np.asarray(ks))
    res = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in out.items()}
    for k in ("b", "t", "k"):
        res[k] = res[k].astype(np.int64)
    res["lag"] = res["t"] - res["k"]
    if power_iters is None:
        res.pop("log_S_power")
    return res


def lag_profile(lag: np.ndarray, log_value: np.ndarray, lags: Sequence[int]) -> np.ndarray:
    r"""``log`` of the lag-wise median of ``exp(log_value)``, normalised by its value at lag 1
    (the first of ``lags``): :math:`\log\tilde\mu(h)`.  NaN where a lag has no pair."""
    lag = np.asarray(lag)
    lv = np.asarray(log_value, dtype=float)
    med = np.full(len(lags), np.nan)
    for i, h in enumerate(lags):
        med[i] = log_median(lv[lag == h])
    with np.errstate(invalid="ignore"):
        return med - med[0]


def log_median(log_values: np.ndarray) -> float:
    """``log(median(exp(log_values)))`` without leaving the log domain (no underflow): the
    middle value, or for an even count the log of the mean of the two middle values."""
    v = np.sort(np.asarray(log_values, dtype=float).ravel())
    if v.size == 0:
        return float("nan")
    mid = v.size // 2
    if v.size % 2:
        return float(v[mid])
    return float(np.logaddexp(v[mid - 1], v[mid]) - np.log(2.0))


def loglog_fit(log_P: np.ndarray, log_S: np.ndarray, *, trim: float = 0.01) -> dict[str, float]:
    r"""OLS of :math:`\log S=a+s\log P` over pairs with finite logs and ``P`` inside its
    ``[trim, 1 - trim]`` quantiles (the released S1 fit): slope ``s``, intercept ``a``, ``R2``,
    the number of pairs used and the number left out for a zero/non-finite value."""
    x = np.asarray(log_P, dtype=float)
    y = np.asarray(log_S, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    res = {"slope": float("nan"), "intercept": float("nan"), "R2": float("nan"), "pairs": 0,
           "excluded_nonfinite": int((~ok).sum())}
    if ok.sum() < 3:
        return res
    lo, hi = np.quantile(x[ok], [trim, 1 - trim])
    sel = ok & (x >= lo) & (x <= hi)
    if sel.sum() < 3 or np.ptp(x[sel]) == 0:
        return res
    xs, ys = x[sel], y[sel]
    A = np.stack([np.ones_like(xs), xs], axis=1)
    coef, *_ = np.linalg.lstsq(A, ys, rcond=None)
    resid = ys - A @ coef
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    res.update(slope=float(coef[1]), intercept=float(coef[0]), pairs=int(sel.sum()),
               R2=float(1 - np.sum(resid**2) / ss_tot) if ss_tot > 0 else float("nan"))
    return res


def spectrum_indices(s: np.ndarray, r: int = 10, top: int = 16) -> dict[str, np.ndarray]:
    r"""Anisotropy indices of singular-value spectra ``s`` (``(..., K)``, any order; a leading
    batch of spectra is allowed): ``AI`` (:math:`\sigma_1/\sigma_r`, inf if :math:`\sigma_r=0`),
    ``CE`` (whole spectrum), ``CE_top`` (top ``top`` only, the released variant), ``PR`` and ``erank``."""
    s = np.sort(np.abs(np.asarray(s, dtype=float)), axis=-1)[..., ::-1]
    K = s.shape[-1]
    if K == 0:
        raise ShapeError("spectrum_indices needs at least one singular value")
    r = min(r, K)
    top = min(top, K)
    s2 = s * s
    tot = s2.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ai = np.where(s[..., r - 1] > 0, s[..., 0] / s[..., r - 1], np.inf)
        ce = s2[..., :r].sum(axis=-1) / tot
        ce_top = s2[..., :r].sum(axis=-1) / s2[..., :top].sum(axis=-1)
        pr = tot**2 / (s2 * s2).sum(axis=-1)
        p = s / s.sum(axis=-1, keepdims=True)
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)
    return {"AI": ai, "CE": ce, "CE_top": ce_top, "PR": pr, "erank": np.exp(ent)}


def summary(v: np.ndarray) -> dict[str, float]:
    """Median, quartiles, mean, min, max and count of the finite entries of ``v`` (and the
    count of non-finite ones): every robust summary next to the raw extremes."""
    v = np.asarray(v, dtype=float).ravel()
    f = v[np.isfinite(v)]
    if f.size == 0:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "mean": float("nan"),
                "min": float("nan"), "max": float("nan"), "n": 0, "nonfinite": int(v.size)}
    q25, med, q75 = np.percentile(f, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "mean": float(f.mean()),
            "min": float(f.min()), "max": float(f.max()), "n": int(f.size), "nonfinite": int(v.size - f.size)}


class _Steps:
    """Per-step values of a run, flattened to rows ``(t - 1) * B + b``, for structured products."""

    def __init__(self, cell: Cell, params: Mapping[str, np.ndarray], trajectory: Trajectory) -> None:
        T, B = trajectory.x.shape[:2]
        self.T, self.B = T, B
        vals = step_values(cell, params, trajectory)
        self.flat = {k: (v.reshape(T * B, -1) if isinstance(v, np.ndarray) and v.ndim == 3 else v) for k, v in vals.items()}
        self.sizes = _all_sizes(cell, trajectory)
        self.names = cell.state_names
        self.dims = [int(trajectory.states[s].shape[-1]) for s in self.names]
        self.blocks = {(a, b): jacobian(cell, a, b) for a in self.names for b in self.names}
        self.params = params

    def rows(self, rows: np.ndarray | slice) -> dict[str, Any]:
        """Every value at the given flat rows (an index array or a slice)."""
        n = self.T * self.B
        return {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[0] == n else v) for k, v in self.flat.items()}


def _apply_term(term: Term, vals: Mapping[str, Any], params: Mapping[str, np.ndarray], X: np.ndarray,
                sizes: Mapping[Any, int]) -> np.ndarray:
    """``term @ X`` for every pair at once; ``X`` is ``(c, K, n)`` (row dimension first, so a
    parameter matrix acts on all pairs with one GEMM), the result ``(r, K, n)``."""
    K = X.shape[1]
    r = sizes[term.rows]
    Y = X
    if not term.factors:
        if term.rows != term.cols:
            Y = np.broadcast_to(Y.sum(axis=0, keepdims=True), (r, *Y.shape[1:]))
    else:
        if term.factors[-1].cols != term.cols:  # the chain times a row of ones
            Y = Y.sum(axis=0, keepdims=True)
        for f in reversed(term.factors):
            if f.kind == "matrix":
                M = np.asarray(params[f.matrix])
                c_, _, n = Y.shape
                Y = (M @ np.ascontiguousarray(Y).reshape(c_, K * n)).reshape(M.shape[0], K, n)
            else:  # diag (d, d) or column (d, 1): both scale row i of pair k by v[k, i]
                v = np.asarray(_LAMBDIFIED(f.numeric, vals))  # type: ignore[arg-type]
                d = sizes[f.rows]
                v = np.broadcast_to(v, (K, d)) if v.ndim else np.full((K, d), float(v))
                Y = v.T[:, :, None] * Y
        if term.factors[0].rows != term.rows:
            Y = np.broadcast_to(Y, (r, *Y.shape[1:]))
    if term.coefficient == 1:
        return Y
    coeff = np.asarray(_LAMBDIFIED(term.numeric_coefficient, vals))
    if coeff.ndim:
        coeff = np.broadcast_to(coeff.reshape(coeff.shape[0], -1)[:, 0], (K,))[None, :, None]
    return coeff * Y


def _apply_block(blk: StructuredJacobian, vals: Mapping[str, Any], params: Mapping[str, np.ndarray], X: np.ndarray,
                 sizes: Mapping[Any, int]) -> np.ndarray:
    out = np.zeros((sizes[blk.rows], X.shape[1], X.shape[2]))
    for term in blk.terms:
        out += _apply_term(term, vals, params, X, sizes)
    return out


def apply_jacobians(steps: "_Steps", X: np.ndarray, t: np.ndarray, b: np.ndarray) -> np.ndarray:
    r""":math:`J_{t_k}X_k` for pairs ``k`` (sequence ``b[k]``, step ``t[k]``), from the derived
    structured Jacobian without forming it: ``X`` and the result are ``(N, K, n)``."""
    rows = (np.asarray(t) - 1) * steps.B + np.asarray(b)
    vals = steps.rows(rows)
    offs = np.cumsum([0, *steps.dims])
    out = np.empty_like(X)
    for ia, a in enumerate(steps.names):
        acc = np.zeros((steps.dims[ia], X.shape[1], X.shape[2]))
        for ib, bname in enumerate(steps.names):
            acc += _apply_block(steps.blocks[(a, bname)], vals, steps.params, X[offs[ib]:offs[ib + 1]], steps.sizes)
        out[offs[ia]:offs[ia + 1]] = acc
    return out


def propagation_anisotropy(cell: Cell, params: Mapping[str, np.ndarray], trajectory: Trajectory, lags: Sequence[int],
                           pairs_per_lag: int, rng: np.random.Generator, *, r: int = 10, top: int = 16) -> dict[str, Any]:
    r"""Anisotropy of lag-``h`` products :math:`J_{k+h}\cdots J_{k+1}` for every lag of the grid.

    ``pairs_per_lag`` starts ``(b, k)`` are drawn uniformly (with replacement) with
    ``0 <= k <= T - max(lags)``; each start is followed for ``max(lags)`` steps and its
    product is read off at every lag of the grid, so one chain serves all lags (the
    released code draws separate pairs per lag, at 3.5 times the cost for the paper's grid).
    The chains of all starts advance together by applying the structured Jacobian
    (:func:`apply_jacobians`: each parameter matrix is one GEMM over every chain) and are
    rescaled per chain at every step (every index is scale-invariant); full spectra come
    from SVDs.  Returns per lag the summary (median, quartiles, ...) of every index of
    :func:`spectrum_indices` and the median spectrum normalised by :math:`\sigma_1`.
    """
    steps = _Steps(cell, params, trajectory)
    T, B = steps.T, steps.B
    N = sum(steps.dims)
    lags = [int(h) for h in lags]
    if not lags or min(lags) < 1 or max(lags) > T:
        raise ConfigError(f"lags must lie in 1..T = {T}, got {lags}")
    H = max(lags)
    K = int(pairs_per_lag)
    bs = rng.integers(0, B, K)
    ks = rng.integers(0, T - H + 1, K)
    X = np.repeat(np.eye(N)[:, None, :], K, axis=1)  # (N, K, N): identity per chain
    spectra: dict[int, np.ndarray] = {}
    for h in range(1, H + 1):
        X = apply_jacobians(steps, X, ks + h, bs)  # J_{k+h} (J_{k+h-1} ... J_{k+1})
        m = np.max(np.abs(X), axis=(0, 2))
        m[m == 0] = 1.0
        X /= m[None, :, None]
        if h in lags:
            spectra[h] = np.linalg.svd(np.ascontiguousarray(X.transpose(1, 0, 2)), compute_uv=False)
    per_lag: list[dict[str, Any]] = []
    for h in lags:
        s = spectra[h]
        ind = spectrum_indices(s, r, top)
        row: dict[str, Any] = {"lag": h}
        for name, v in ind.items():
            row[name] = summary(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = s / s[:, :1]
        row["spectrum_median"] = np.nanmedian(rel, axis=0).tolist()
        per_lag.append(row)
    return {"lags": lags, "pairs_per_lag": K, "per_lag": per_lag}


def gradient_anisotropy(G: np.ndarray, *, r: int = 10, top: int = 16) -> dict[str, Any]:
    r"""Update anisotropy of per-example gradients ``G`` ``(M, P)``: rows scaled to unit
    :math:`\ell_2` norm (zero rows are dropped and counted), columns centred, columns whose
    norm is at most :math:`10^{-10}\sqrt M` dropped (as released); then the indices of the
    singular values (equivalently of the eigen-spectrum of :math:`G^\top G`).  No jitter is added."""
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2:
        raise ShapeError(f"G must be (M, P), got {G.shape}")
    norms = np.linalg.norm(G, axis=1)
    keep = norms > 0
    if not keep.any():
        raise ShapeError("gradient_anisotropy: every per-example gradient is zero")
    X = G[keep] / norms[keep, None]
    X = X - X.mean(axis=0, keepdims=True)
    M = X.shape[0]
    cols = np.linalg.norm(X, axis=0) > 1e-10 * np.sqrt(max(M, 1))
    X = X[:, cols]
    if X.size == 0:
        raise ShapeError("gradient_anisotropy: every per-example gradient is zero")
    # singular values from the eigenvalues of the M x M Gram matrix (M << P): the leading
    # ones to full relative accuracy, the trailing ones to ~1e-8 sigma_1 absolute
    lam = np.linalg.eigvalsh(X @ X.T)[::-1]
    s = np.sqrt(np.clip(lam, 0.0, None))
    ind = {k: float(v) for k, v in spectrum_indices(s, r, top).items()}
    ind.update(examples=int(M), dropped_zero_rows=int((~keep).sum()), columns=int(cols.sum()),
               spectrum=(s[: min(64, s.size)] / s[0]).tolist())
    return ind
