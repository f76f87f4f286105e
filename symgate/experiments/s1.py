r"""S1 -- effective-learning-rate profiles during SGD training (the paper's Section VII-A).

A leaky cell (constant :math:`\alpha`), a scalar-gate and a vector-gate cell are trained
with plain SGD on a task (default: adding).  At checkpoints (after that many updates,
before the next one) a fixed probe batch is run and, for pairs ``(t, k)`` of steps,

* the **lag sensitivity** :math:`S_{t,k}=\lVert J_t\cdots J_{k+1}\rVert_2` (exact spectral norm
  of the product of the exact Jacobians, in log scale), and beside it the released code's
  estimator (5 power-iteration steps from a random start);
* the **gate product** :math:`P_{t,k}`, the mean over neurons of the derived
  :math:`\mu_{t,\ell}` (:func:`symgate.effective_lrs`), in two conventions:
  ``exact`` (:math:`w_k\prod_{j=k+1}^{t}\lambda_j`, write gain times retention) and ``s1``
  (the released predictor :math:`\prod_{j=k}^{t} g_j`, the update coefficients);

then the empirical profile :math:`\tilde\mu_{\rm eff}(h)=\mathrm{med}_{t-k=h}S/\mathrm{med}_{t-k=1}S`,
the predicted one :math:`\bar P(h)/\bar P(1)`, and the slope :math:`s` (with :math:`R^2`)
of :math:`\log S=a+s\log P`.

Pairs: every lag ``h = 1..T-1``; endpoints ``t = T, T - stride, ...`` (``stride = 1`` is
every pair, as released; the default 8 takes the same eighth of the pairs at every lag,
which keeps 20 seeds within the time budget -- see ``endpoint_stride``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .._cell import Cell
from .._errors import ConfigError
from .._transport import effective_lrs
from ._common import Settings, jsonable, lag_summary, model_cell, model_label
from .metrics import dense_jacobians, lag_profile, lag_sensitivities, loglog_fit, summary
from .tasks import get_task
from .train import Trainer, rng_for

__all__ = ["S1Settings", "run_s1", "summarize_s1", "S1_CONVENTIONS"]

#: the two zeroth-order predictors compared
S1_CONVENTIONS = ("exact", "s1")


@dataclasses.dataclass(frozen=True)
class S1Settings(Settings):
    """Settings of S1; the defaults are the paper's (paper-notes §7.1)."""

    models: tuple[str, ...] = ("leaky", "scalar_gate", "vector_gate")
    task: str = "adding"
    alpha: float = 0.8
    lr: float = 1e-2
    steps: int = 800
    checkpoints: tuple[int, ...] = (0, 50, 200, 400, 600, 800)
    T: int = 80
    B: int = 64
    probe_B: int = 12
    n: int = 64
    m: int = 4
    endpoint_stride: int = 8
    power_iters: int = 5
    trim: float = 0.01

    def __post_init__(self) -> None:
        self._positive("steps", "T", "B", "probe_B", "n", "m", "endpoint_stride", "power_iters")
        get_task(self.task)
        if not (0 < self.alpha <= 1):
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if any(c < 0 or c > self.steps for c in self.checkpoints) or not self.checkpoints:
            raise ConfigError(f"checkpoints must lie in 0..steps = {self.steps}, got {self.checkpoints}")
        if not (0 <= self.trim < 0.5):
            raise ConfigError(f"trim must be in [0, 0.5), got {self.trim!r}")
        if not self.models:
            raise ConfigError("S1 needs at least one model")

    @classmethod
    def quick(cls) -> "S1Settings":
        """A small preset that runs in seconds (same pipeline, smaller sizes)."""
        return cls(steps=120, checkpoints=(0, 60, 120), T=40, B=32, probe_B=4, n=32, endpoint_stride=4)

    @property
    def lags(self) -> list[int]:
        return list(range(1, self.T))


def _mean_log_mu(mu: np.ndarray) -> np.ndarray:
    """log of the neuron mean of mu ``(..., n)``; -inf where the mean is not positive."""
    m = mu.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m > 0, np.log(np.where(m > 0, m, 1.0)), -np.inf)


def probe(settings: S1Settings, cell: Any, trainer: Trainer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Every S1 measurement at the trainer's current parameters on the probe batch ``x``."""
    s = settings
    params = trainer.params
    traj = trainer.kernel.forward(params, x, None)
    J = dense_jacobians(cell, params, traj)
    sens = lag_sensitivities(J, stride=s.endpoint_stride, power_iters=s.power_iters, rng=rng, first_k=1)
    lag, b, t = sens["lag"], sens["b"], sens["t"]
    lags = s.lags
    out: dict[str, Any] = {
        "iteration": trainer.iteration,
        "probe_loss": float(np.mean((traj.h[-1] @ trainer.V.T - y) ** 2)),
        "pairs": int(lag.size),
        "profile": {"exact_norm": lag_profile(lag, sens["log_S"], lags).tolist(),
                    "power_iteration": lag_profile(lag, sens["log_S_power"], lags).tolist()},
        "predicted": {},
        "fit": {},
    }
    for conv in S1_CONVENTIONS:
        mu = effective_lrs(cell, params, x, None, max_lag=s.T - 1, convention=conv, trajectory=traj, compute_mu=True).mu
        logP = _mean_log_mu(mu[t - 1, lag, b])  # (pairs,)
        out["predicted"][conv] = lag_profile(lag, logP, lags).tolist()
        out["fit"][conv] = {
            "exact_norm": loglog_fit(logP, sens["log_S"], trim=s.trim),
            "power_iteration": loglog_fit(logP, sens["log_S_power"], trim=s.trim),
        }
    return out


def run_s1(settings: S1Settings | dict, model: "str | Cell", seed: int) -> dict[str, Any]:
    """One S1 job: train ``model`` (a model name, ``file.py:name`` or any :class:`~symgate.Cell`)
    with SGD for ``settings.steps`` iterations from ``seed``, probing at the checkpoints.
    Returns a JSON-able dict (its ``"model"`` is the name, or the cell's name)."""
    s = settings if isinstance(settings, S1Settings) else S1Settings.from_dict(settings)
    cell = model if isinstance(model, Cell) else model_cell(model, alpha=s.alpha)
    model = cell.name if isinstance(model, Cell) else model
    task = get_task(s.task)
    tr = Trainer(cell, task, n=s.n, m=s.m, B=s.B, T=s.T, optimizer="sgd", lr=s.lr, seed=seed)
    x_probe, y_probe = task.batch(rng_for(seed, "probe"), s.probe_B, s.T, s.m)
    power_rng = rng_for(seed, "pairs")
    checkpoints: list[dict[str, Any]] = []
    tr.train(s.steps, checkpoints=s.checkpoints,
             on_checkpoint=lambda trainer: checkpoints.append(probe(s, cell, trainer, x_probe, y_probe, power_rng)))
    return jsonable({"experiment": "s1", "model": model, "seed": seed, "cell": cell.name, "task": s.task,
                     "loss": tr.losses, "checkpoints": checkpoints})


def summarize_s1(settings: S1Settings, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds, per model and checkpoint: median and quartiles of every profile, and the
    slopes (both conventions, both norm estimators) with mean, std, median and quartiles."""
    from ._common import unjson

    out: dict[str, Any] = {}
    models = list(settings.models) + [r["model"] for r in results if r["model"] not in settings.models]
    for model in dict.fromkeys(models):
        runs = [unjson(r) for r in results if r["model"] == model]
        if not runs:
            continue
        seeds = [r["seed"] for r in runs]
        per_cp = []
        for i, cp in enumerate(settings.checkpoints):
            cps = [r["checkpoints"][i] for r in runs]
            row: dict[str, Any] = {"iteration": cp, "seeds": seeds}
            for est in ("exact_norm", "power_iteration"):
                row[f"profile_{est}"] = lag_summary([c["profile"][est] for c in cps])
            for conv in S1_CONVENTIONS:
                row[f"predicted_{conv}"] = lag_summary([c["predicted"][conv] for c in cps])
                for est in ("exact_norm", "power_iteration"):
                    sl = np.array([c["fit"][conv][est]["slope"] for c in cps], dtype=float)
                    r2 = np.array([c["fit"][conv][est]["R2"] for c in cps], dtype=float)
                    row[f"slope_{conv}_{est}"] = {**summary(sl), "std": float(np.nanstd(sl)) if np.isfinite(sl).any() else float("nan"),
                                                  "per_seed": sl.tolist()}
                    row[f"R2_{conv}_{est}"] = {**summary(r2), "per_seed": r2.tolist()}
            row["probe_loss"] = summary([c["probe_loss"] for c in cps])
            per_cp.append(row)
        losses = np.array([r["loss"] for r in runs], dtype=float)
        out[model_label(model)] = {"seeds": seeds, "checkpoints": per_cp, "loss": lag_summary(losses), "model": model}
    return jsonable(out)
