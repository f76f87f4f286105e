r"""S2 -- joint anisotropy of gates and optimizers (the paper's Section VII-B).

Three models are trained separately on each task: a plain RNN with Adam, a scalar-gate
and a vector-gate (multi-gate) cell with plain SGD.  At checkpoints (after that many
updates) two kinds of anisotropy are measured:

* **propagation** -- ``pairs_per_lag`` starts ``(b, k)`` of a fixed probe batch, each
  followed through every lag ``h`` of a grid; the full singular spectrum of
  :math:`J_{k+h}\cdots J_{k+1}` gives
  :math:`\mathrm{AI}_r=\sigma_1/\sigma_r`, :math:`\mathrm{CE}_r` over the whole spectrum and over
  the top 16 only (the released variant), participation ratio and effective rank; medians
  over pairs;
* **updates** -- ``grad_examples`` per-example gradients (batches of one, fresh seeded data)
  form :math:`G`; its rows are normalised and columns centred, and the same indices are
  taken of its singular values.  For Adam the per-example *updates*
  :math:`P\odot g` (with Adam's preconditioner at that point) are measured too.

The paper's claim, "multi-gate + SGD matches or exceeds the anisotropy of plain + Adam",
is evaluated per task and index by :func:`claims_s2` (see :mod:`symgate.experiments.report`).
Every training iteration draws a fresh batch (the released code's one fixed batch is not
reproduced) with :math:`10^{-6}` Gaussian input jitter, as released.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .._errors import ConfigError
from ._common import Settings, jsonable, lag_summary, model_cell, unjson
from .metrics import gradient_anisotropy, propagation_anisotropy, summary
from .optim import Adam
from .tasks import get_task
from .train import READOUT, Trainer, rng_for

__all__ = ["S2Settings", "run_s2", "summarize_s2", "INDICES", "MORE_ANISOTROPIC"]

#: anisotropy indices and whether a larger value means more anisotropic
MORE_ANISOTROPIC = {"AI": "higher", "CE": "higher", "CE_top": "higher", "PR": "lower", "erank": "lower"}
INDICES = tuple(MORE_ANISOTROPIC)


@dataclasses.dataclass(frozen=True)
class S2Settings(Settings):
    """Settings of S2; the defaults are the paper's (paper-notes §7.2, decisions §10)."""

    tasks: tuple[str, ...] = ("adding", "movingavg", "delaysum", "narma10")
    models: tuple[tuple[str, str, float], ...] = (("plain", "adam", 1e-3), ("scalar_gate", "sgd", 1e-2),
                                                  ("vector_gate", "sgd", 1e-2))
    iterations: int = 1200
    checkpoints: tuple[int, ...] = (0, 400, 800, 1200)
    T: int = 120
    B: int = 64
    n: int = 64
    m: int = 6
    lags: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 40)
    pairs_per_lag: int = 64
    probe_B: int = 64
    grad_examples: int = 256
    r: int = 10
    top: int = 16
    jitter: float = 1e-6

    def __post_init__(self) -> None:
        self._positive("iterations", "T", "B", "n", "m", "pairs_per_lag", "probe_B", "grad_examples", "r", "top")
        for tk in self.tasks:
            get_task(tk)
        if not self.tasks or not self.models:
            raise ConfigError("S2 needs at least one task and one model")
        for mdl in self.models:
            if len(mdl) != 3:
                raise ConfigError(f"an S2 model is (cell, optimizer, lr), got {mdl!r}")
        if any(c < 0 or c > self.iterations for c in self.checkpoints) or not self.checkpoints:
            raise ConfigError(f"checkpoints must lie in 0..iterations = {self.iterations}, got {self.checkpoints}")
        if any(h < 1 or h > self.T for h in self.lags):
            raise ConfigError(f"lags must lie in 1..T = {self.T}, got {self.lags}")

    @classmethod
    def quick(cls) -> "S2Settings":
        """A small preset that runs in seconds (same pipeline, smaller sizes)."""
        return cls(iterations=150, checkpoints=(0, 75, 150), T=48, B=32, n=32, lags=(1, 2, 4, 8, 16, 24),
                   pairs_per_lag=24, probe_B=16, grad_examples=48)

    def label(self, i: int) -> str:
        cell, opt, _ = self.models[i]
        return f"{cell}+{opt}"


def _measure(s: S2Settings, cell: Any, tr: Trainer, x_probe: np.ndarray, y_probe: np.ndarray, seed: int, cp: int) -> dict[str, Any]:
    traj = tr.kernel.forward(tr.params, x_probe, None)
    prop = propagation_anisotropy(cell, tr.params, traj, s.lags, s.pairs_per_lag,
                                  np.random.default_rng(np.random.SeedSequence([seed, 4, cp])), r=s.r, top=s.top)
    ex_rng = np.random.default_rng(np.random.SeedSequence([seed, 3, cp]))
    x_ex, y_ex = tr.task.batch(ex_rng, s.grad_examples, s.T, s.m)
    G = tr.per_example_gradients(x_ex, y_ex)
    out: dict[str, Any] = {
        "iteration": tr.iteration,
        "probe_loss": float(np.mean((traj.h[-1] @ tr.V.T - y_probe) ** 2)),
        "propagation": prop,
        "updates": {"gradients": gradient_anisotropy(G, r=s.r, top=s.top)},
    }
    if isinstance(tr.optimizer, Adam) and tr.optimizer.n_steps > 0:
        pre = tr.optimizer.preconditioner()
        P = np.concatenate([pre[k].ravel() for k in tr.opt_params])
        out["updates"]["adam_updates"] = gradient_anisotropy(G * P[None, :], r=s.r, top=s.top)
    return out


def run_s2(settings: S2Settings | dict, task: str, model: int, seed: int) -> dict[str, Any]:
    """One S2 job: model ``settings.models[model]`` on ``task`` from ``seed``."""
    s = settings if isinstance(settings, S2Settings) else S2Settings.from_dict(settings)
    cell_name, opt, lr = s.models[model]
    cell = model_cell(cell_name)
    tk = get_task(task)
    tr = Trainer(cell, tk, n=s.n, m=s.m, B=s.B, T=s.T, optimizer=opt, lr=lr, seed=seed, jitter=s.jitter)
    x_probe, y_probe = tk.batch(rng_for(seed, "probe"), s.probe_B, s.T, s.m)
    cps: list[dict[str, Any]] = []
    tr.train(s.iterations, checkpoints=s.checkpoints,
             on_checkpoint=lambda t: cps.append(_measure(s, cell, t, x_probe, y_probe, seed, t.iteration)))
    return jsonable({"experiment": "s2", "task": task, "model": s.label(model), "cell": cell.name, "optimizer": opt,
                     "lr": lr, "seed": seed, "loss": tr.losses, "checkpoints": cps,
                     "parameters": int(sum(v.size for k, v in tr.opt_params.items())), "readout_key": READOUT})


def per_seed_indices(cp: dict[str, Any]) -> dict[str, float]:
    """The scalar indices of one checkpoint: propagation indices aggregated over the lag grid
    (geometric mean of the per-lag medians for AI, PR and erank; arithmetic for CE) and the
    update indices of the per-example gradients."""
    out: dict[str, float] = {}
    rows = cp["propagation"]["per_lag"]
    for ix in INDICES:
        v = np.array([r_[ix]["median"] for r_ in rows], dtype=float)
        if ix.startswith("CE"):
            out[f"prop_{ix}"] = float(np.mean(v))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"prop_{ix}"] = float(np.exp(np.mean(np.log(v))))
    for ix in INDICES:
        out[f"grad_{ix}"] = float(cp["updates"]["gradients"][ix])
    return out


def summarize_s2(settings: S2Settings, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per task and model: per-lag medians/quartiles across seeds of every propagation index at
    every checkpoint, the aggregated indices per seed, and the loss curves."""
    out: dict[str, Any] = {}
    for task in settings.tasks:
        out[task] = {}
        for i in range(len(settings.models)):
            label = settings.label(i)
            runs = [unjson(r) for r in results if r["task"] == task and r["model"] == label]
            if not runs:
                continue
            per_cp = []
            for j, cp in enumerate(settings.checkpoints):
                cps = [r["checkpoints"][j] for r in runs]
                row: dict[str, Any] = {"iteration": cp}
                for ix in INDICES:
                    row[f"prop_{ix}_by_lag"] = lag_summary([[r_[ix]["median"] for r_ in c["propagation"]["per_lag"]] for c in cps])
                agg = [per_seed_indices(c) for c in cps]
                row["indices"] = {k: {**summary([a[k] for a in agg]), "per_seed": [a[k] for a in agg]} for k in agg[0]}
                if all("adam_updates" in c["updates"] for c in cps):
                    row["adam_updates"] = {ix: summary([c["updates"]["adam_updates"][ix] for c in cps]) for ix in INDICES}
                row["probe_loss"] = summary([c["probe_loss"] for c in cps])
                per_cp.append(row)
            out[task][label] = {"seeds": [r["seed"] for r in runs], "checkpoints": per_cp,
                                "loss": lag_summary(np.array([r["loss"] for r in runs], dtype=float))}
    return jsonable(out)
