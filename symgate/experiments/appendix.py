r"""Appendix check -- the first-order (Fréchet) expansion of the Jacobian product.

For an untrained cell (every weight :math:`\sim\mathcal N(0, 0.2^2)`, float64) driven by
noisy sinusoids, the per-step Jacobians are split as :math:`J_j=A_j+B_j` (``split``; the
default ``"appendix"`` puts the gate-derivative terms in :math:`B`) and

.. math::

    F(\varepsilon)=\prod_{j}(A_j+\varepsilon B_j),\qquad
    E(\varepsilon)=\lVert F(\varepsilon)-F(0)-\varepsilon L_1\rVert_F,\qquad
    C_2(\varepsilon)=E(\varepsilon)/\varepsilon^2,

with :math:`L_1=\sum_i(\prod_{j>i}A_j)B_i(\prod_{j<i}A_j)`, over the ε grid; the log-log
slope of :math:`E` on the first five ε (expected 2), the remainder at ε = 1 (absolute and
relative to :math:`\lVert F(1)\rVert` and :math:`\lVert F_0+L_1\rVert`) and the ratios
:math:`r_j=\lVert B_j\rVert_2/\lVert A_j\rVert_2`.  Works for any cell (``cells``).

Input: :math:`u_k(t)=\sin(f_k t+\varphi_k)+0.05\,\xi`, :math:`t\in\mathrm{linspace}(0,12,T)`,
:math:`f_k\in\mathrm{linspace}(0.03,0.09,m)`, :math:`\varphi_k\sim\mathcal N(0,1)`.
Every seed is reported; the released code's rule (drop seeds whose :math:`E(1)` lies
outside 1.5 IQR) is shown beside the full summary, never applied silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .._errors import ConfigError
from .._transport import JacobianProducts
from ._common import Settings, jsonable, model_cell, model_label, unjson
from .metrics import summary
from .train import init_params, resolve_dims, rng_for

__all__ = ["AppendixSettings", "run_appendix", "summarize_appendix", "sinusoid_input", "released_outliers"]

EPS_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclasses.dataclass(frozen=True)
class AppendixSettings(Settings):
    """Settings of the appendix check; defaults are the paper's (paper-notes §4)."""

    cells: tuple[str, ...] = ("scalar_gate", "vector_gate")
    T: int = 100
    n: int = 64
    m: int = 3
    std: float = 0.2
    eps: tuple[float, ...] = EPS_GRID
    fit_points: int = 5
    split: str = "appendix"

    def __post_init__(self) -> None:
        self._positive("T", "n", "m", "fit_points")
        if not self.cells:
            raise ConfigError("the appendix check needs at least one cell")
        if not (np.isfinite(self.std) and self.std > 0):
            raise ConfigError(f"std must be > 0, got {self.std!r}")
        if len(self.eps) < 2 or any(not (e > 0) for e in self.eps):
            raise ConfigError(f"eps must hold at least two positive values, got {self.eps}")

    @classmethod
    def quick(cls) -> "AppendixSettings":
        return cls(T=40, n=32)


def sinusoid_input(rng: np.random.Generator, T: int, m: int) -> np.ndarray:
    """The appendix input ``(T, 1, m)`` (see the module docstring)."""
    tt = np.linspace(0.0, 12.0, T)
    f = np.linspace(0.03, 0.09, m)
    phase = rng.normal(size=m)
    u = np.sin(f[None, :] * tt[:, None] + phase[None, :]) + 0.05 * rng.normal(size=(T, m))
    return np.ascontiguousarray(u[:, None, :])


def run_appendix(settings: AppendixSettings | dict, cell: str, seed: int) -> dict[str, Any]:
    """One appendix job: the expansion check of ``cell`` at ``seed``."""
    s = settings if isinstance(settings, AppendixSettings) else AppendixSettings.from_dict(settings)
    c = model_cell(cell)
    sizes = resolve_dims(c, s.n, s.m)
    params, _ = init_params(c, sizes, 1, rng_for(seed, "init"), scheme="normal", std=s.std)
    x = sinusoid_input(rng_for(seed, "probe"), s.T, s.m)
    jp = JacobianProducts(c, params, x, None, split=s.split)
    res = jp.check_expansion(s.T, 0, eps=s.eps, fit_points=s.fit_points)
    return jsonable({"experiment": "appendix", "cell": cell, "seed": seed, **res})


def released_outliers(values: Sequence[float]) -> list[int]:
    """Indices the released wrapper would drop: outside ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]``."""
    v = np.asarray(values, dtype=float)
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    return [int(i) for i in np.flatnonzero((v < q1 - 1.5 * iqr) | (v > q3 + 1.5 * iqr))]


def summarize_appendix(settings: AppendixSettings, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: every seed's numbers, their summaries, and the summaries after the released
    outlier rule, side by side."""
    out: dict[str, Any] = {}
    for cell in settings.cells:
        runs = [unjson(r) for r in results if r["cell"] == cell]
        if not runs:
            continue
        seeds = [r["seed"] for r in runs]
        E = np.array([r["error"] for r in runs], dtype=float)
        at1 = [r["remainder_at_1"] for r in runs]
        drop = released_outliers(at1)
        keep = [i for i in range(len(runs)) if i not in drop]
        fields = ("slope", "remainder_at_1", "remainder_at_1_rel_F", "remainder_at_1_rel_F0L", "norm_F0", "norm_L",
                  "first_vs_central_difference")
        row: dict[str, Any] = {"seeds": seeds, "eps": list(settings.eps)}
        for f in fields:
            v = [r[f] for r in runs]
            row[f] = {**summary(v), "per_seed": v, "released_rule": summary([v[i] for i in keep])}
        row["ratio_B_A_median"] = {**summary([r["ratio_B_A"]["median"] for r in runs]),
                                   "per_seed": [r["ratio_B_A"]["median"] for r in runs]}
        row["ratio_B_A_max"] = summary([r["ratio_B_A"]["max"] for r in runs])
        with np.errstate(divide="ignore", invalid="ignore"):  # E = 0 (a cell without terms of the split): log = -inf
            logE = np.log(E)
            row["error_by_eps"] = {"median": np.exp(np.median(logE, axis=0)).tolist(),
                                   "q25": np.exp(np.percentile(logE, 25, axis=0)).tolist(),
                                   "q75": np.exp(np.percentile(logE, 75, axis=0)).tolist()}
            row["C2_by_eps"] = {"median": (np.exp(np.median(logE, axis=0)) / np.asarray(settings.eps) ** 2).tolist()}
        row["released_rule_drops_seeds"] = [seeds[i] for i in drop]
        row["cell"] = cell
        out[model_label(cell)] = row
    return jsonable(out)
