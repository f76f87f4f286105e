"""Effective learning rates on a trajectory: symgate's log-domain kernel vs the numpy a user would write.

Measures, side by side in one run, mu_{t,ell} = g_{t-ell} * prod_{j=t-ell+1}^{t} (1 - g_j) of the
vector-gate cell for n = 64 neurons, B = 32 sequences, T = 500 steps and every lag ell <= 200
(float64; the result is T x 201 x B x n = 1.6 GB):

1. symgate, log domain: ``sg.effective_lrs(cell, params, x, h0, max_lag=200, trajectory=traj)``
   gives log|mu| (running sums of log-leaks, one vectorised addition per lag: the representation
   that stays finite at any lag); and the same followed by ``.mu`` (its exponential, materialised
   as a second 1.6 GB array).  The first call is reported apart: it
   pays the page faults of fresh 1.6 GB arrays (on a Firecracker VM the first touch of guest memory
   costs ~2 s/GB; the routes timed after it reuse memory already touched, so compare the first-call
   column across routes with care); then the median of 5 repeats;
2. direct products, the straightforward numpy version: one pass per lag, ``prod = prod * lambda``
   shifted by one step (vectorised over t, b, q), times the write gain.  It must agree with
   symgate to 1e-12 relative wherever the product is a normal float (no underflow);
3. the naive ``np.cumprod`` ratio: ``P = cumprod(lambda)``, ``mu = w[t-ell] P[t] / P[t-ell]``.  As fast,
   and fine while P stays a normal float (T = 500 here), but P underflows after ~1000 steps: at
   T = 3000 (max_lag 1000, B = 4, n = 16 to fit in memory) it returns NaN (0/0), false zeros
   (x/y with only x underflowed) and subnormal-precision values, counted against symgate;
   Section 2 also compares both float64 routes with a long-double direct product (the error of
   symgate's running sums of logs is ~ell * eps * |log mu|, independent of t);
4. the symbolic derivation ``sg.effective_lr`` for every built-in cell (fresh cell objects, so
   the Jacobian is derived each time; the LSTM's retention state is c, plain has no leak).

The trajectory (forward pass) is computed once and is not timed; all routes read the gate from it.

Run:  python benchmarks/bench_mu.py   (needs ~8 GB of free memory)
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import numpy as np

import symgate as sg

N, B, T, MAX_LAG, M = 64, 32, 500, 200, 8
LONG = dict(n=16, B=4, T=3000, max_lag=1000)
REPEATS = 5
TINY = np.finfo(np.float64).tiny  # smallest normal float64


def problem(n: int, B: int, T: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The vector-gate cell (paper-1 form, no biases), random spectrally scaled weights, its trajectory."""
    cell = sg.cells.vector_gate(bias=False)
    p = sg.testing.draw_problem(cell, seed, n=n, m=M, B=B, T=T, rho=0.9)
    traj = sg.reference_kernel(cell, "float64").forward(p.params, p.x, p.h0)
    return cell, p, traj


def symgate_mu(cell, p, traj, max_lag: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sg.effective_lrs(cell, p.params, p.x, p.h0, max_lag=max_lag, trajectory=traj).mu


def symgate_log_mu(cell, p, traj, max_lag: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sg.effective_lrs(cell, p.params, p.x, p.h0, max_lag=max_lag, trajectory=traj).log_abs_mu


class _Nodes:
    """Stand-in for a trajectory holding only the gate (for sub-arrays and long doubles)."""

    def __init__(self, g: np.ndarray) -> None:
        self.nodes = {"g": g}


def direct_mu(traj, max_lag: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What a user writes: extend the product by one factor per lag (0-based step index i = t - 1)."""
    g = traj.nodes["g"]
    lam = 1.0 - g
    T = g.shape[0]
    out = np.empty((T, max_lag + 1) + g.shape[1:], dtype=g.dtype)
    prod = np.ones_like(g)  # prod[i] = prod_{j=t-ell+1}^{t} lambda_j for the current lag
    for ell in range(max_lag + 1):
        if ell > 0:
            prod[ell:] *= lam[1:T - ell + 1]  # the new factor lambda_{t-ell+1}
        out[ell:, ell] = prod[ell:] * g[:T - ell]  # times the write gain g_{t-ell}
        out[:ell, ell] = 0.0  # the lag reaches before step 1
    return out


def cumprod_mu(traj, max_lag: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The naive ratio of cumulative products: P[t] / P[t - ell] (breaks when P underflows)."""
    g = traj.nodes["g"]
    T = g.shape[0]
    P = np.cumprod(1.0 - g, axis=0)  # P[i] = prod_{j <= t} lambda_j
    out = np.empty((T, max_lag + 1) + g.shape[1:])
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        for ell in range(max_lag + 1):
            out[:ell, ell] = 0.0
            if ell == 0:
                out[:, 0] = g
            else:
                out[ell:, ell] = P[ell:] / P[:T - ell] * g[:T - ell]
    return out


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, list[float]]:
    """First call, then ``repeats`` more; results are dropped at once (only one alive at a time)."""
    out: list[float] = []
    for _ in range(repeats + 1):
        gc.collect()
        t0 = time.perf_counter()
        res = fn()
        out.append(time.perf_counter() - t0)
        del res
    return out[0], out[1:]


def relative_error(ref: np.ndarray, other: np.ndarray, valid: np.ndarray) -> tuple[float, int, int]:
    """Max |other - ref| / |ref| over valid (t, ell) with ref a normal float (lag by lag, to bound
    memory); also the number of entries compared and the number skipped as subnormal/zero."""
    worst, compared, skipped = 0.0, 0, 0
    for ell in range(ref.shape[1]):
        r, o = ref[valid[:, ell], ell], other[valid[:, ell], ell]
        normal = np.abs(r) >= TINY
        compared += int(normal.sum())
        skipped += int((~normal).sum())
        if normal.any():
            worst = max(worst, float(np.max(np.abs(o[normal] - r[normal]) / np.abs(r[normal]))))
    return worst, compared, skipped


def breakdown(sym_log: np.ndarray, naive: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """How the naive cumprod ratio fails, against symgate's log|mu| (finite wherever the lag exists;
    accurate to ~1e-11 relative here, hence the 1e-10 threshold for precision loss)."""
    c = {"entries": 0, "nan": 0, "inf": 0, "false_zero": 0, "rel_err>1e-10": 0, "symgate_nonfinite": 0}
    for ell in range(naive.shape[1]):
        lg, nv = sym_log[valid[:, ell], ell], naive[valid[:, ell], ell]
        truth = np.exp(lg)
        c["entries"] += nv.size
        c["nan"] += int(np.isnan(nv).sum())
        c["inf"] += int(np.isinf(nv).sum())
        c["false_zero"] += int(((nv == 0) & (truth >= TINY)).sum())
        ok = np.isfinite(nv) & (nv != 0) & (truth >= TINY)
        c["rel_err>1e-10"] += int((np.abs(nv[ok] - truth[ok]) / truth[ok] > 1e-10).sum())
        c["symgate_nonfinite"] += int((~np.isfinite(lg)).sum())
    return c


def valid_mask(T: int, max_lag: int) -> np.ndarray:
    return (np.arange(1, T + 1)[:, None] - np.arange(max_lag + 1)[None, :]) >= 1


def main() -> None:
    gb = T * (MAX_LAG + 1) * B * N * 8 / 1e9
    print(f"== 1. mu_(t,ell) of the vector gate: n={N}, B={B}, T={T}, ell <= {MAX_LAG}, float64 ({gb:.2f} GB per result)")
    cell, p, traj = problem(N, B, T)
    g = traj.nodes["g"]
    print(f"   gates in [{g.min():.3f}, {g.max():.3f}], mean log(1-g) = {np.mean(np.log1p(-g)):.3f} per step")
    sg.effective_lr(cell)  # derive once (symbolic work is benchmarked in section 4)
    l_first, l_later = timed(lambda: symgate_log_mu(cell, p, traj, MAX_LAG), REPEATS)
    s_first, s_later = timed(lambda: symgate_mu(cell, p, traj, MAX_LAG), REPEATS)
    d_first, d_later = timed(lambda: direct_mu(traj, MAX_LAG), REPEATS)
    c_first, c_later = timed(lambda: cumprod_mu(traj, MAX_LAG), REPEATS)
    # correctness, after the timings (so no result is held while another route is timed)
    valid = valid_mask(T, MAX_LAG)
    s_out = symgate_mu(cell, p, traj, MAX_LAG)
    d_out = direct_mu(traj, MAX_LAG)
    d_err, d_n, d_skip = relative_error(d_out, s_out, valid)
    del d_out
    gc.collect()
    c_out = cumprod_mu(traj, MAX_LAG)
    c_err, c_n, c_skip = relative_error(s_out, c_out, valid)
    c_bad = int(sum((~np.isfinite(c_out[valid[:, ell], ell])).sum() for ell in range(MAX_LAG + 1)))
    del c_out, s_out
    gc.collect()
    s_med = statistics.median(s_later)
    l_med = statistics.median(l_later)
    rows = [
        ("symgate effective_lrs (log|mu|)", l_first, l_later, "-", str(0)),
        ("symgate effective_lrs(...).mu", s_first, s_later, "-", str(0)),
        ("numpy direct product per lag", d_first, d_later, f"{d_err:.1e}", str(0)),
        ("numpy cumprod ratio P[t]/P[t-l]", c_first, c_later, f"{c_err:.1e}", str(c_bad)),
    ]
    print(f"   {'route':34s} {'first':>8s} {'median':>8s} {'min':>8s} {'vs symgate':>10s}  {'rel err vs sg':>13s}  {'nan/inf':>7s}")
    for name, first, later, err, bad in rows:
        med = statistics.median(later)
        print(f"   {name:34s} {first:7.3f}s {med:7.3f}s {min(later):7.3f}s {med / s_med:9.2f}x  {err:>13s}  {bad:>7s}")
    print(f"   (median and min of {REPEATS} repeats after the first call; relative errors over the {d_n} valid entries"
          f" that are normal floats, {d_skip} subnormal/zero skipped)")
    print("   individual repeats: " + "; ".join(f"{name.split()[0] if name.startswith('symgate') else name.split()[1]}"
                                           f" {' '.join(f'{x:.2f}' for x in later)}" for name, _, later, _, _ in rows))
    print(f"   target: < 1 s   symgate log-domain mu median {l_med:.3f} s -> {'MET' if l_med < 1.0 else 'MISSED'};"
          f" with mu materialised {s_med:.3f} s")
    print(f"   agreement symgate vs direct products: {d_err:.2e} relative -> {'OK' if d_err <= 1e-12 else 'ABOVE 1e-12'}")
    print()

    n2, B2, T2, L2 = LONG["n"], LONG["B"], LONG["T"], LONG["max_lag"]
    print(f"== 2. where the cumprod ratio breaks: T={T2}, ell <= {L2}, n={n2}, B={B2}")
    cell2, p2, traj2 = problem(n2, B2, T2, seed=1)
    P = np.cumprod(1.0 - traj2.nodes["g"], axis=0)
    first_sub = int(np.argmax((P < TINY).any(axis=(1, 2))))
    first_zero = int(np.argmax((P == 0).any(axis=(1, 2))))
    print(f"   cumprod(1-g) first subnormal at step {first_sub + 1}, first exact 0 at step {first_zero + 1}")
    del P
    t0 = time.perf_counter()
    res = sg.effective_lrs(cell2, p2.params, p2.x, p2.h0, max_lag=L2, trajectory=traj2)
    t_sym = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = cumprod_mu(traj2, L2)
    t_naive = time.perf_counter() - t0
    valid2 = valid_mask(T2, L2)
    cnt = breakdown(res.log_abs_mu, naive, valid2)
    del naive
    gc.collect()
    t0 = time.perf_counter()
    direct = direct_mu(traj2, L2)
    t_direct = time.perf_counter() - t0
    dir_err, dir_n, dir_skip = relative_error(direct, res.mu, valid2)
    dir_sub = int(sum(((direct[valid2[:, ell], ell] < TINY)).sum() for ell in range(L2 + 1)))
    del direct
    lv = res.log_abs_mu[valid2]
    # which side is inaccurate?  an extended-precision (long double) direct product on 2 sequences x 4 neurons
    ref = direct_mu(_Nodes(traj2.nodes["g"][:, :2, :4].astype(np.longdouble)), L2)
    sub = np.exp(res.log_abs_mu[:, :, :2, :4])  # mu > 0 here (res.sign is None)
    dsub = direct_mu(_Nodes(traj2.nodes["g"][:, :2, :4]), L2)
    ok = valid2[:, :, None, None] & (ref >= TINY)
    with np.errstate(invalid="ignore", divide="ignore"):
        e_sym = np.where(ok, np.abs(sub - ref) / ref, 0.0)
        e_dir = np.where(ok, np.abs(dsub - ref) / ref, 0.0)
    by_t = "  ".join(f"t<={hi}: {float(e_sym[:hi].max()):.0e}" for hi in (100, 500, 1000, 2000, T2))
    del ref, sub, dsub, ok
    print(f"   times: symgate log|mu| {t_sym:.2f} s, cumprod ratio {t_naive:.2f} s, direct products {t_direct:.2f} s")
    print(f"   valid entries {cnt['entries']}:")
    print(f"     cumprod ratio:   NaN (0/0) {cnt['nan']}, inf {cnt['inf']}, false zeros {cnt['false_zero']},"
          f" finite but rel. error > 1e-10 (subnormal P) {cnt['rel_err>1e-10']}"
          f"  -> {cnt['nan'] + cnt['inf'] + cnt['false_zero'] + cnt['rel_err>1e-10']} wrong"
          f" ({100 * (cnt['nan'] + cnt['inf'] + cnt['false_zero'] + cnt['rel_err>1e-10']) / cnt['entries']:.1f} %)")
    print(f"     direct products: no NaN; {dir_sub} subnormal/zero at the longest lags,"
          f" rel. difference from symgate {dir_err:.1e} on the {dir_n} normal entries")
    print(f"     symgate log|mu|: non-finite {cnt['symgate_nonfinite']}; range [{lv.min():.1f}, {lv.max():.2f}]"
          f" (smallest mu = 10^{lv.min() / np.log(10):.0f})")
    print("   accuracy vs a long-double direct product (2 sequences x 4 neurons, normal entries):")
    print(f"     direct products (float64): max rel. error {float(e_dir.max()):.1e}")
    print(f"     symgate (log-domain running sums): max rel. error {float(e_sym.max()):.1e}, by t: {by_t}")
    del res, lv
    gc.collect()
    print()

    print("== 3. symbolic derivation: sg.effective_lr(cell) + .mu on a fresh cell (Jacobians derived each time)")
    print("   first = first cell of its kind in this process (SymPy's global caches cold for it); median of 5 fresh")
    print(f"   {'cell':12s} {'build':>8s} {'first':>8s} {'median':>8s} {'cached':>8s}  state  param  {'isotropic':9s}  mu[t, ell]")
    totals = [0.0, 0.0]
    for name in sg.cells.BUILTIN:
        build, fresh = [], []
        for _ in range(REPEATS + 1):
            t0 = time.perf_counter()
            c = sg.cells.builtin(name)
            t1 = time.perf_counter()
            e = sg.effective_lr(c)
            mu = e.mu
            fresh.append(time.perf_counter() - t1)
            build.append(t1 - t0)
        t0 = time.perf_counter()
        sg.effective_lr(c).mu
        cached = time.perf_counter() - t0
        med = statistics.median(fresh[1:])
        totals[0] += fresh[0]
        totals[1] += med
        note = "  (no leak: 0**ell = 0 for ell >= 1)" if e.leak_unit == 0 else ""
        print(f"   {name:12s} {statistics.median(build) * 1e3:6.1f}ms {fresh[0] * 1e3:6.1f}ms {med * 1e3:6.1f}ms"
              f" {cached * 1e3:6.2f}ms  {e.state:5s}  {e.param:5s}  {str(e.isotropic):9s}  {mu}{note}")
    print(f"   all seven: first {totals[0] * 1e3:.0f} ms, median {totals[1] * 1e3:.0f} ms (cell build excluded)")


if __name__ == "__main__":
    main()
