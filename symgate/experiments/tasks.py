r"""Seeded synthetic sequence tasks for training recurrent cells.

Every task produces a batch in the kernels' time-major layout:

* inputs ``x`` of shape ``(T, B, m)``, float64, C-contiguous;
* targets ``y`` of shape ``(B, o)``, float64, C-contiguous, to be read out
  from the *last* state :math:`h_{T}` (the loss of :class:`symgate.losses.LastMSE`).

Steps are numbered :math:`t = 0, \dots, T-1` and channels
:math:`c = 0, \dots, m-1`; :math:`x_{t,c}` denotes one sequence of the batch.
Everything random is drawn from the generator passed to :meth:`Task.batch`
and from nothing else, so the same generator state gives the same batch.  The
draws are vectorised over the batch (only the NARMA recursion loops over time).

The registry :data:`TASKS` holds one instance of each task with the default
parameters, in the order ``adding, recall, copy, movingavg, delaysum, narma10``;
:func:`get_task` looks a task up by name.  Other parameter values are obtained by
constructing the task class directly, e.g. ``RecallTask(K=3)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import ConfigError, NumericalError

__all__ = [
    "Task",
    "AddingTask",
    "RecallTask",
    "CopyTask",
    "MovingAverageTask",
    "DelaySumTask",
    "Narma10Task",
    "TASKS",
    "get_task",
]


def _check_int(what: str, value: Any, lo: int) -> int:
    """``value`` as a Python int, if it is an integer (not a bool) ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be an integer >= {lo}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < lo:
        raise ConfigError(f"{what} must be an integer >= {lo}, got {value}")
    return value


def _check_real(what: str, value: Any) -> float:
    """``value`` as a finite Python float (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a finite real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite real number, got {value}")
    return value


@dataclass(frozen=True)
class Task:
    r"""A synthetic task: a seeded generator of ``(x, y)`` batches.

    Attributes
    ----------
    name : str
        The registry name of the task.
    min_m : int
        The smallest input dimension :math:`m` the task accepts.

    Notes
    -----
    Subclasses implement :meth:`_generate`; :meth:`batch` validates the
    arguments, calls it and checks the result.  ``outputs(m, T)`` is the readout
    size :math:`o` and ``min_T()`` the shortest admissible sequence.
    """

    name: str
    min_m: int

    def outputs(self, m: int, T: int) -> int:
        """The readout size :math:`o` of the target ``y`` (``(B, o)``)."""
        return 1

    def min_T(self) -> int:
        """The smallest sequence length :math:`T` the task accepts."""
        return 1

    def batch(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw one batch.

        Parameters
        ----------
        rng : numpy.random.Generator
            The only source of randomness; the same state gives the same batch.
        B : int
            Batch size, ``>= 1``.
        T : int
            Sequence length, ``>= min_T()``.
        m : int
            Input dimension, ``>= min_m``.

        Returns
        -------
        x : numpy.ndarray
            Inputs, shape ``(T, B, m)``, float64, C-contiguous.
        y : numpy.ndarray
            Targets, shape ``(B, outputs(m, T))``, float64, C-contiguous.

        Raises
        ------
        ConfigError
            If ``rng`` is not a :class:`numpy.random.Generator`, or ``B``, ``T``
            or ``m`` is not an integer in its range.
        NumericalError
            If a generated target is not finite.
        """
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), got {type(rng).__name__}"
            )
        B = _check_int("batch size B", B, 1)
        m = _check_int(f"input dimension m of task {self.name!r}", m, self.min_m)
        T = _check_int(f"sequence length T of task {self.name!r}", T, self.min_T())
        x, y = self._generate(rng, B, T, m)
        if not np.all(np.isfinite(y)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(y))[0])
            raise NumericalError(f"task {self.name!r} produced a non-finite target ({float(y[bad])} at index {bad})")
        return np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64)

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"task {self.name!r} does not implement _generate")


@dataclass(frozen=True)
class AddingTask(Task):
    r"""The adding problem.

    Channels :math:`0, \dots, m-2` carry i.i.d. :math:`\mathcal U(0, 1)` values; the
    last channel is a mask with exactly two ones, one at a step :math:`i_1` drawn
    uniformly from :math:`[0, \lfloor T/2 \rfloor)` and one at :math:`i_2` drawn
    uniformly from :math:`[\lfloor T/2 \rfloor, T)`, zeros elsewhere.  The target is

    .. math:: y = x_{i_1, 0} + x_{i_2, 0}, \qquad o = 1.

    Requires :math:`m \ge 2` and :math:`T \ge 2`.
    """

    name: str = field(default="adding", init=False)
    min_m: int = field(default=2, init=False)

    def min_T(self) -> int:
        return 2

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((T, B, m))
        x[:, :, : m - 1] = rng.random((T, B, m - 1))
        half = T // 2
        i1 = rng.integers(0, half, size=B)
        i2 = rng.integers(half, T, size=B)
        b = np.arange(B)
        x[i1, b, m - 1] = 1.0
        x[i2, b, m - 1] = 1.0
        y = (x[i1, b, 0] + x[i2, b, 0])[:, None]
        return x, y


@dataclass(frozen=True)
class RecallTask(Task):
    r"""Summed recall of ``K`` marked values from the start of the sequence.

    Channels :math:`0, \dots, m-2` carry i.i.d. :math:`\mathcal U(0, 1)` values; the
    last channel is a mask equal to 1 at :math:`K` distinct steps
    :math:`S = \{s_1, \dots, s_K\}`, a uniformly random :math:`K`-subset of
    :math:`[0, L)` with :math:`L = \max(K, \lfloor T/3 \rfloor)`, and 0 elsewhere.
    The target is

    .. math:: y = \sum_{s \in S} x_{s, 0}, \qquad o = 1.

    (This is the task some reference code calls "copy".)  Requires
    :math:`m \ge 2` and :math:`T \ge 3K`.

    Parameters
    ----------
    K : int
        Number of marked steps, ``>= 1`` (default 5).
    """

    name: str = field(default="recall", init=False)
    min_m: int = field(default=2, init=False)
    K: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", _check_int("recall K", self.K, 1))

    def min_T(self) -> int:
        return 3 * self.K

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        K = self.K
        x = np.zeros((T, B, m))
        x[:, :, : m - 1] = rng.random((T, B, m - 1))
        L = max(K, T // 3)
        # the first K entries of a uniformly random permutation of [0, L): a uniform K-subset
        pos = np.argsort(rng.random((B, L)), axis=1, kind="stable")[:, :K]
        b = np.repeat(np.arange(B), K)
        s = pos.ravel()
        x[s, b, m - 1] = 1.0
        y = x[s, b, 0].reshape(B, K).sum(axis=1)[:, None]
        return x, y


@dataclass(frozen=True)
class CopyTask(Task):
    r"""Copy ``K`` values across a delay and reproduce them at a cue.

    Channel 0 carries :math:`v_1, \dots, v_K \sim \mathcal U(0, 1)` (i.i.d.) at steps
    :math:`0, \dots, K-1` and 0 afterwards; the last channel is a "go" cue equal
    to 1 at the final step :math:`T-1` only; every other entry is 0.  The target,
    read from the last state, is the stored sequence

    .. math:: y = (v_1, \dots, v_K), \qquad o = K,

    after a delay of :math:`T - K` steps.  Requires :math:`m \ge 2` and
    :math:`T \ge K + 1`.

    Parameters
    ----------
    K : int
        Length of the copied sequence, ``>= 1`` (default 5).
    """

    name: str = field(default="copy", init=False)
    min_m: int = field(default=2, init=False)
    K: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", _check_int("copy K", self.K, 1))

    def outputs(self, m: int, T: int) -> int:
        return self.K

    def min_T(self) -> int:
        return self.K + 1

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        K = self.K
        v = rng.random((K, B))
        x = np.zeros((T, B, m))
        x[:K, :, 0] = v
        x[T - 1, :, m - 1] = 1.0
        return x, np.ascontiguousarray(v.T)


@dataclass(frozen=True)
class MovingAverageTask(Task):
    r"""Mean of the last ``W`` inputs.

    Channel 0 carries i.i.d. :math:`u_t \sim \mathcal U(0, 1)`; the other channels
    are 0.  The target is

    .. math:: y = \frac{1}{W} \sum_{t=T-W}^{T-1} u_t, \qquad o = 1.

    Requires :math:`m \ge 1` and :math:`T \ge W`.

    Parameters
    ----------
    W : int
        Window length, ``>= 1`` (default 8).
    """

    name: str = field(default="movingavg", init=False)
    min_m: int = field(default=1, init=False)
    W: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "W", _check_int("movingavg window W", self.W, 1))

    def min_T(self) -> int:
        return self.W

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((T, B, m))
        x[:, :, 0] = rng.random((T, B))
        y = x[T - self.W :, :, 0].mean(axis=0)[:, None]
        return x, y


@dataclass(frozen=True)
class DelaySumTask(Task):
    r"""A weighted sum of the input at several fixed delays.

    Channel 0 carries i.i.d. :math:`u_t \sim \mathcal U(0, 1)`; the other channels
    are 0.  With delays :math:`d_1, \dots, d_k` and weights :math:`w_1, \dots, w_k`
    the target is

    .. math:: y = \sum_{i=1}^{k} w_i \, u_{T-1-d_i}, \qquad o = 1.

    Requires :math:`m \ge 1` and :math:`T \ge \max_i d_i + 1`.

    Parameters
    ----------
    delays : tuple of int
        The delays :math:`d_i \ge 0`, at least one (default ``(4, 12, 24, 36)``).
    weights : tuple of float, optional
        Finite weights, one per delay; default :math:`w_i = 1/k`.
    """

    name: str = field(default="delaysum", init=False)
    min_m: int = field(default=1, init=False)
    delays: tuple[int, ...] = (4, 12, 24, 36)
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        try:
            delays = tuple(self.delays)
        except TypeError:
            raise ConfigError(f"delaysum delays must be a sequence of integers >= 0, got {self.delays!r}") from None
        if not delays:
            raise ConfigError("delaysum delays must contain at least one delay")
        delays = tuple(_check_int(f"delaysum delays[{i}]", d, 0) for i, d in enumerate(delays))
        if self.weights is None:
            weights = (1.0 / len(delays),) * len(delays)
        else:
            try:
                weights = tuple(self.weights)
            except TypeError:
                raise ConfigError(f"delaysum weights must be a sequence of finite numbers, got {self.weights!r}") from None
            if len(weights) != len(delays):
                raise ConfigError(f"delaysum has {len(delays)} delays but {len(weights)} weights; give one weight per delay")
            weights = tuple(_check_real(f"delaysum weights[{i}]", w) for i, w in enumerate(weights))
        object.__setattr__(self, "delays", delays)
        object.__setattr__(self, "weights", weights)

    def min_T(self) -> int:
        return max(self.delays) + 1

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((T, B, m))
        x[:, :, 0] = rng.random((T, B))
        idx = np.array([T - 1 - d for d in self.delays])
        w = np.array(self.weights, dtype=np.float64)
        y = (w @ x[idx, :, 0])[:, None]
        return x, y


@dataclass(frozen=True)
class Narma10Task(Task):
    r"""The tenth-order nonlinear autoregressive moving average (NARMA-10) system.

    Channel 0 carries i.i.d. :math:`u_t = \tfrac12 r_t`, :math:`r_t \sim \mathcal U(0, 1)`;
    the other channels are 0.  With :math:`y_0 = 0` and every term of negative
    index taken as 0, for :math:`t = 0, \dots, T-1`

    .. math::

        y_{t+1} = 0.3\, y_t + 0.05\, y_t \sum_{i=0}^{9} y_{t-i} + 1.5\, u_{t-9}\, u_t + 0.1 ,

    and the target is :math:`y = y_T` (:math:`o = 1`).  Requires :math:`m \ge 1`
    and :math:`T \ge 10`.

    For a few input sequences (about 5 in :math:`10^5` at :math:`T = 120`) the quadratic
    term makes the recursion run away to infinity, while every other path stays below 1.3;
    a sequence whose path leaves :math:`[-2, 2]` has its inputs redrawn (from the same
    generator, so batches stay reproducible).  Raises :class:`~symgate.NumericalError`
    (from :meth:`batch`) if a target is still not finite.
    """

    name: str = field(default="narma10", init=False)
    min_m: int = field(default=1, init=False)

    ORDER = 10
    #: a path that leaves [-BOUND, BOUND] is diverging; its inputs are redrawn
    BOUND = 2.0
    MAX_REDRAWS = 100

    def min_T(self) -> int:
        return self.ORDER

    def _generate(self, rng: np.random.Generator, B: int, T: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        u = 0.5 * rng.random((T, B))
        yy = self._recursion(u)
        # a few input sequences make the quadratic term run away (about 5 in 10^5 at T = 120;
        # every other path stays below 1.3): their inputs are redrawn
        for _ in range(self.MAX_REDRAWS):
            with np.errstate(invalid="ignore"):
                bad = ~np.all(np.abs(yy) <= self.BOUND, axis=0)
            if not bad.any():
                break
            u[:, bad] = 0.5 * rng.random((T, int(bad.sum())))
            yy[:, bad] = self._recursion(u[:, bad])
        x = np.zeros((T, B, m))
        x[:, :, 0] = u
        return x, yy[T + self.ORDER - 1][:, None]

    def _recursion(self, u: np.ndarray) -> np.ndarray:
        n = self.ORDER
        T, B = u.shape
        # yy[k + n - 1] holds y_k; the n - 1 leading rows are the zero history y_{-9..-1}
        yy = np.zeros((T + n, B))
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(T):
                yt = yy[t + n - 1]
                window = yy[t : t + n].sum(axis=0)  # y_{t-9} + ... + y_t
                drive = u[t - (n - 1)] * u[t] if t >= n - 1 else 0.0
                yy[t + n] = 0.3 * yt + 0.05 * yt * window + 1.5 * drive + 0.1
        return yy


TASKS: dict[str, Task] = {
    t.name: t
    for t in (AddingTask(), RecallTask(), CopyTask(), MovingAverageTask(), DelaySumTask(), Narma10Task())
}
"""Every task, by name, with its default parameters."""


def get_task(name: str) -> Task:
    """The task registered under ``name`` in :data:`TASKS`.

    Raises
    ------
    ConfigError
        If ``name`` is not a known task; the message lists the known names.
    """
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    raise ConfigError(f"unknown task {name!r}; known tasks are {', '.join(TASKS)}")
