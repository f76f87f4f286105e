r"""Training a cell on a task with the compiled kernels.

A :class:`Trainer` owns the parameters of a cell and of its linear readout
:math:`\hat y = V h_T`, a compiled forward + last-state-MSE + BPTT step bound to
them (:meth:`symgate.CompiledKernel.prepare`), an optimizer that updates them in
place, and the seeded stream of training batches.  One :meth:`Trainer.step` is:
draw a fresh batch, run one compiled call (forward, loss, BPTT), optionally clip,
update.

Initialisation ``"torch"`` is PyTorch's default for ``nn.Linear``: every matrix
entry :math:`\sim U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})` with
``fan_in`` the number of columns (the readout included); vectors (biases) start at 0
and scalar parameters at :math:`U(-1, 1)`.  ``"normal"`` draws every entry from
:math:`\mathcal N(0, \sigma^2)` (the appendix check uses :math:`\sigma = 0.2`).

Random streams are independent children of one seed
(``numpy.random.SeedSequence([seed, stream])``): initialisation, training data and
probe data never share a generator, so adding a probe does not change training.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._cell import Cell
from .._errors import ConfigError
from .. import losses
from .optim import Optimizer, clip_grad_norm, make_optimizer
from .tasks import Task, _check_int, get_task

__all__ = ["STREAMS", "rng_for", "resolve_dims", "init_params", "Trainer", "READOUT"]

#: the optimizer's key of the readout matrix (not an identifier, so it cannot clash with a parameter)
READOUT = "readout:V"

#: named random streams of one seed
STREAMS = {"init": 0, "train": 1, "probe": 2, "examples": 3, "pairs": 4, "jitter": 5}


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """The generator of ``stream`` (one of :data:`STREAMS`) for ``seed``."""
    if stream not in STREAMS:
        raise ConfigError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    seed = _check_int("seed", seed, 0)
    return np.random.default_rng(np.random.SeedSequence([seed, STREAMS[stream]]))


def resolve_dims(cell: Cell, n: int, m: int, dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Sizes of every named dimension of ``cell``: the first state's is ``n``, the input's
    ``m``; any other dimension must be given in ``dims``."""
    out = dict(dims or {})
    out[str(cell.states[0].dim)] = n
    out[str(cell.inputs[0].dim)] = m
    for name, v in out.items():
        out[name] = _check_int(f"dimension {name!r}", v, 1)
    missing = [d for d in cell.dims() if d not in out]
    if missing:
        raise ConfigError(f"cell {cell.name!r} uses dimension(s) {missing} that have no size; pass dims={{...}}")
    return out


def init_params(cell: Cell, sizes: Mapping[str, int], o: int, rng: np.random.Generator, *,
                scheme: str = "torch", std: float = 0.2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Parameters of ``cell`` and the readout ``V`` ``(o, n)``, float64 (see the module docstring)."""
    if scheme not in ("torch", "normal"):
        raise ConfigError(f"unknown initialisation {scheme!r}; use 'torch' or 'normal'")
    if not (np.isfinite(std) and std > 0):
        raise ConfigError(f"std must be > 0, got {std!r}")

    def size(d: Any) -> int:
        return 1 if d == 1 else int(sizes[str(d)])

    def draw(shape: tuple[int, ...], fan_in: int, kind: str) -> np.ndarray:
        if scheme == "normal":
            return rng.normal(0.0, std, shape)
        if kind == "vector":
            return np.zeros(shape)
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    params: dict[str, np.ndarray] = {}
    for p in cell.params:
        shape = tuple(size(d) for d in p.shape)
        if p.kind == "matrix":
            params[p.name] = draw(shape, shape[1], "matrix")
        elif p.kind == "vector":
            params[p.name] = draw(shape, 1, "vector")
        else:
            params[p.name] = draw(shape, 1, "scalar")
    n = size(cell.states[0].dim)
    V = draw((o, n), n, "matrix")
    return params, np.ascontiguousarray(V)


class Trainer:
    """A cell, its readout, a task, an optimizer and a compiled training step.

    Parameters
    ----------
    cell:
        Any :class:`~symgate.Cell` (built-in or user-defined).
    task:
        A task name (see :data:`symgate.experiments.tasks.TASKS`) or a :class:`Task`.
    n, m:
        State and input sizes; ``dims`` gives any other named dimension.
    B, T:
        Batch size and sequence length.
    optimizer, lr:
        ``"sgd"``, ``"momentum"`` or ``"adam"`` and its learning rate (default per optimizer).
    seed:
        Seeds the initialisation and the training stream (see :func:`rng_for`).
    clip:
        Clip the global gradient norm to this value (None: no clipping).
    jitter:
        Standard deviation of Gaussian noise added to every training input (0: none).
    draw_ahead:
        Training batches are drawn this many at a time (one call of the task's generator
        for ``draw_ahead * B`` sequences, then used ``B`` at a time): the same stream for a
        given seed, with the generator's per-call cost (NARMA's loop over time) paid once.
    """

    def __init__(self, cell: Cell, task: str | Task, *, n: int, m: int, B: int, T: int,
                 optimizer: str = "sgd", lr: float | None = None, seed: int = 0, clip: float | None = None,
                 jitter: float = 0.0, init: str = "torch", init_std: float = 0.2, dims: Mapping[str, int] | None = None,
                 optimizer_options: Mapping[str, Any] | None = None, kernel: Any = None, draw_ahead: int = 16) -> None:
        from .._compiled import kernels as _kernels

        if not isinstance(cell, Cell):
            raise ConfigError(f"expected a symgate Cell, got {type(cell).__name__}")
        self.cell = cell
        self.task = get_task(task) if isinstance(task, str) else task
        if not isinstance(self.task, Task):
            raise ConfigError(f"task must be a task name or a Task, got {type(task).__name__}")
        for name, v in (("B", B), ("T", T), ("draw_ahead", draw_ahead)):
            _check_int(name, v, 1)
        if clip is not None and not (np.isfinite(clip) and clip > 0):
            raise ConfigError(f"clip must be a positive number or None, got {clip!r}")
        if not (np.isfinite(jitter) and jitter >= 0):
            raise ConfigError(f"jitter must be >= 0, got {jitter!r}")
        self.n, self.m, self.B, self.T = int(n), int(m), int(B), int(T)
        self.sizes = resolve_dims(cell, self.n, self.m, dims)
        self.o = self.task.outputs(self.m, self.T)
        self.seed = seed
        self.clip, self.jitter = clip, float(jitter)
        self.params, self.V = init_params(cell, self.sizes, self.o, rng_for(seed, "init"), scheme=init, std=init_std)
        self._train_rng = rng_for(seed, "train")
        self._jitter_rng = rng_for(seed, "jitter")
        self.kernel = kernel if kernel is not None else _kernels(cell, "float64")
        self.draw_ahead = int(draw_ahead)
        self._ahead: tuple[np.ndarray, np.ndarray] | None = None
        self._used = self.draw_ahead
        self.x = np.empty((self.T, self.B, self.m))
        self.y = np.empty((self.B, self.o))
        self._fill()
        self._first = True  # the batch drawn above is the first training batch
        self._step = self.kernel.prepare(self.params, self.x, None, loss=losses.last_mse(self.V, self.y)) \
            if hasattr(self.kernel, "prepare") else None
        self.opt_params = {**self.params, READOUT: self.V}
        self.optimizer: Optimizer = make_optimizer(optimizer, self.opt_params, lr, **dict(optimizer_options or {}))
        self.optimizer_name = optimizer
        self.iteration = 0
        self.losses: list[float] = []

    # -- one iteration ---------------------------------------------------------------
    def _fill(self) -> None:
        """Copy the next training batch into the bound arrays ``x``, ``y``."""
        if self._used == self.draw_ahead:
            self._ahead = self.task.batch(self._train_rng, self.B * self.draw_ahead, self.T, self.m)
            self._used = 0
        xa, ya = self._ahead  # type: ignore[misc]
        lo = self._used * self.B
        np.copyto(self.x, xa[:, lo:lo + self.B])
        np.copyto(self.y, ya[lo:lo + self.B])
        self._used += 1

    def _next_batch(self) -> None:
        if self._first:
            self._first = False
        else:
            self._fill()
        if self.jitter:
            self.x += self._jitter_rng.normal(0.0, self.jitter, self.x.shape)

    def gradients(self) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients on the current batch (no update)."""
        if self._step is not None:
            value = float(self._step())
            g = self._step.grads
            return value, {**g.params, READOUT: g.readout["V"]}
        g = self.kernel.backward(self.params, self.x, None, loss=losses.last_mse(self.V, self.y))
        return float(g.value), {**g.params, READOUT: g.readout["V"]}

    def step(self) -> float:
        """Draw a batch, compute loss and gradients, (clip,) update in place; returns the loss."""
        self._next_batch()
        value, grads = self.gradients()
        if self.clip is not None:
            clip_grad_norm(grads, self.clip)
        self.optimizer.step(grads)
        self.iteration += 1
        self.losses.append(value)
        return value

    def train(self, steps: int, *, checkpoints: Sequence[int] = (), on_checkpoint: Callable[["Trainer"], None] | None = None,
              progress: Any = None) -> list[float]:
        """Run ``steps`` iterations.  ``on_checkpoint(self)`` is called when ``self.iteration`` is in
        ``checkpoints`` (after that many updates, i.e. before the next one), including 0.
        ``progress`` is an optional callable taking the number of finished steps."""
        _check_int("steps", steps, 0)
        cps = set(int(c) for c in checkpoints)
        end = self.iteration + steps
        while True:
            if on_checkpoint is not None and self.iteration in cps:
                on_checkpoint(self)
            if self.iteration >= end:
                break
            self.step()
            if progress is not None:
                progress(1)
        return self.losses

    # -- evaluation --------------------------------------------------------------------
    def state_params(self) -> dict[str, np.ndarray]:
        """Copies of the cell parameters and the readout (key :data:`READOUT`)."""
        return {k: v.copy() for k, v in self.opt_params.items()}

    def per_example_gradients(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(M, P)``: the gradient of each example's loss (batch of one) with respect to every
        parameter, readout included, flattened in :attr:`opt_params` order."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 3 or y.ndim != 2 or x.shape[1] != y.shape[0]:
            raise ConfigError(f"x must be (T, M, m) and y (M, o), got {x.shape} and {y.shape}")
        M = x.shape[1]
        xb = np.array(x[:, :1], order="C")  # copies: the loop below writes into them
        yb = np.array(y[:1], order="C")
        P = sum(v.size for v in self.opt_params.values())
        out = np.empty((M, P))
        if hasattr(self.kernel, "prepare"):
            st = self.kernel.prepare(self.params, xb, None, loss=losses.last_mse(self.V, yb))
        for i in range(M):
            xb[:, 0] = x[:, i]
            yb[0] = y[i]
            if hasattr(self.kernel, "prepare"):
                st()
                g = st.grads
            else:
                g = self.kernel.backward(self.params, xb, None, loss=losses.last_mse(self.V, yb))
            flat = {**g.params, READOUT: g.readout["V"]}
            off = 0
            for k, v in self.opt_params.items():
                out[i, off:off + v.size] = flat[k].ravel()
                off += v.size
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> float:
        """Last-state MSE on a batch (no gradients)."""
        traj = self.kernel.forward(self.params, np.ascontiguousarray(x), None)
        r = traj.h[-1] @ self.V.T - y
        return float(np.mean(r * r))

    def __repr__(self) -> str:
        return (f"<Trainer {self.cell.name} on {self.task.name}: n={self.n} m={self.m} B={self.B} T={self.T} "
                f"{self.optimizer_name}, iteration {self.iteration}>")
