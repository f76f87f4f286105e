r"""The paper's simulations on the compiled kernels.

* :mod:`~symgate.experiments.tasks` -- seeded data generators (adding, recall, copy,
  movingavg, delaysum, narma10);
* :mod:`~symgate.experiments.optim` -- SGD, heavy-ball momentum, Adam, gradient clipping;
* :mod:`~symgate.experiments.train` -- :class:`Trainer`: any cell, a linear readout,
  last-state MSE, one compiled forward + BPTT call per iteration;
* :mod:`~symgate.experiments.metrics` -- exact lag sensitivities, profiles and fits,
  anisotropy of Jacobian products and of per-example gradients;
* :mod:`~symgate.experiments.s1`, :mod:`~symgate.experiments.s2`,
  :mod:`~symgate.experiments.appendix` -- the three experiments;
* :mod:`~symgate.experiments.sweep` -- jobs, run serially or on Dask;
* :mod:`~symgate.experiments.reproduce` -- everything, with ``results.json``, plots and
  ``report.md`` (the CLI's ``symgate reproduce``).
"""

from .appendix import AppendixSettings, run_appendix
from .optim import SGD, Adam, Momentum, clip_grad_norm, make_optimizer
from .reproduce import reproduce
from .s1 import S1Settings, run_s1
from .s2 import S2Settings, run_s2
from .sweep import execute, jobs_for, run_job
from .tasks import TASKS, Task, get_task
from .train import Trainer, init_params

__all__ = [
    "AppendixSettings", "run_appendix", "SGD", "Adam", "Momentum", "clip_grad_norm", "make_optimizer", "reproduce",
    "S1Settings", "run_s1", "S2Settings", "run_s2", "execute", "jobs_for", "run_job", "TASKS", "Task", "get_task",
    "Trainer", "init_params",
]
