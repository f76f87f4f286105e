r"""First-order optimizers that update parameter arrays in place.

A compiled training step binds the parameter arrays by reference, so an
optimizer must never rebind them: every update writes into the original
buffer (``np.subtract(p, u, out=p)``), and a view taken before a step sees
the updated values.  Each optimizer keeps one preallocated scratch array per
parameter, so a step allocates nothing proportional to the parameter count.

With learning rate :math:`\eta`, gradient :math:`g_n` at step :math:`n = 1, 2, \dots`:

* :class:`SGD`: :math:`\theta_n = \theta_{n-1} - \eta\, g_n`;
* :class:`Momentum` (heavy ball, PyTorch's ``SGD(momentum=beta)`` with zero
  dampening): :math:`m_n = \beta m_{n-1} + g_n`, :math:`m_0 = 0`,
  :math:`\theta_n = \theta_{n-1} - \eta\, m_n`, i.e.
  :math:`\theta_n - \theta_{n-1} = -\eta \sum_{k=0}^{n-1} \beta^k g_{n-k}`;
* :class:`Adam`: :math:`m_n = \beta_1 m_{n-1} + (1-\beta_1) g_n`,
  :math:`v_n = \beta_2 v_{n-1} + (1-\beta_2) g_n^2`,
  :math:`\hat m_n = m_n / (1-\beta_1^n)`, :math:`\hat v_n = v_n / (1-\beta_2^n)`,
  :math:`\theta_n = \theta_{n-1} - \eta\, \hat m_n / (\sqrt{\hat v_n} + \varepsilon)`.

:func:`clip_grad_norm` rescales a set of gradients to a maximal global
:math:`\ell_2` norm; :func:`make_optimizer` builds an optimizer by name.
"""

from __future__ import annotations

import math
import numbers
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .._errors import ConfigError, DTypeError, NonFiniteError, ShapeError

__all__ = ["Optimizer", "SGD", "Momentum", "Adam", "clip_grad_norm", "OPTIMIZERS", "DEFAULT_LR", "make_optimizer"]


def _check_rate(what: str, value: Any) -> float:
    """A finite real number ``> 0`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{what} must be a finite number > 0, got {value}")
    return value


def _check_beta(what: str, value: Any) -> float:
    """A real number in ``[0, 1)`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value}")
    return value


def _is_real_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


def _first_nonfinite(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])


def _all_finite(a: np.ndarray) -> bool:
    """Whether every entry of ``a`` is finite.

    A sum is finite only if every term is (an infinity or NaN makes it inf or
    NaN), so a finite sum settles the question without a temporary; only a sum
    that overflowed from finite terms needs the elementwise test.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.sum(a))):
            return True
    return bool(np.isfinite(a).all())


class Optimizer:
    r"""Base class: holds the parameters and the learning rate, checks gradients.

    Parameters
    ----------
    params : Mapping[str, numpy.ndarray]
        Name to parameter array.  The arrays must be writeable, real floating
        point (float32 or float64) and distinct objects; they are updated in place
        and never replaced.
    lr : float
        Learning rate :math:`\eta`, finite and ``> 0``.  It may be changed
        between steps by assigning :attr:`lr` (e.g. for a schedule).

    Raises
    ------
    ConfigError
        On an empty ``params`` mapping, a non-string name, the same array
        under two names, or an invalid ``lr``.
    DTypeError
        If a parameter is not a writeable real floating-point numpy array.
    """

    #: the keyword hyper-parameters of the constructor besides ``lr``
    hyperparameters: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        if not isinstance(params, Mapping):
            raise ConfigError(f"params must be a mapping name -> numpy array, got {type(params).__name__}")
        if len(params) == 0:
            raise ConfigError("params is empty; an optimizer needs at least one parameter array")
        checked: dict[str, np.ndarray] = {}
        seen: dict[int, str] = {}
        for name, p in params.items():
            if not isinstance(name, str):
                raise ConfigError(f"parameter names must be strings, got {name!r}")
            if not isinstance(p, np.ndarray):
                raise DTypeError(f"params[{name!r}] must be a numpy array, got {type(p).__name__}")
            if not _is_real_float(p):
                raise DTypeError(f"params[{name!r}] has dtype {p.dtype}; parameters must be float32 or float64")
            if not p.flags.writeable:
                raise DTypeError(f"params[{name!r}] is read-only; the optimizer updates parameters in place")
            if id(p) in seen:
                raise ConfigError(f"params[{name!r}] is the same array as params[{seen[id(p)]!r}]; it would be updated twice")
            seen[id(p)] = name
            checked[name] = p
        self._params = checked
        self._scratch = {k: np.empty_like(p) for k, p in checked.items()}
        self.lr = lr
        self.n_steps = 0

    @property
    def lr(self) -> float:
        r"""The learning rate :math:`\eta` (finite, ``> 0``)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_rate("learning rate lr", value)

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """The parameter arrays (read-only mapping of the very arrays passed in)."""
        return MappingProxyType(self._params)

    def _check_grads(self, grads: Mapping[str, np.ndarray]) -> None:
        if not isinstance(grads, Mapping):
            raise ShapeError(f"grads must be a mapping name -> numpy array, got {type(grads).__name__}")
        names = list(self._params)
        missing = [k for k in names if k not in grads]
        if missing:
            raise ShapeError(f"grads is missing {missing} (the optimizer has parameters {names})")
        extra = [k for k in grads if k not in self._params]
        if extra:
            raise ShapeError(f"grads has unknown entries {extra} (the optimizer has parameters {names})")
        for k, p in self._params.items():
            g = grads[k]
            if not isinstance(g, np.ndarray):
                raise DTypeError(f"grads[{k!r}] must be a numpy array, got {type(g).__name__}")
            if not _is_real_float(g):
                raise DTypeError(f"grads[{k!r}] has dtype {g.dtype}; gradients must be float32 or float64")
            if g.shape != p.shape:
                raise ShapeError(f"grads[{k!r}] has shape {g.shape}; parameter {k!r} has shape {p.shape}")
            if not _all_finite(g):
                bad = _first_nonfinite(g)
                raise NonFiniteError(f"gradient of parameter {k!r} contains a non-finite value ({float(g[bad])} at index {bad})")

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Apply one update in place.

        Parameters
        ----------
        grads : Mapping[str, numpy.ndarray]
            One gradient per parameter: the same keys (no more, no fewer) and
            the same shapes.  Nothing is updated unless every gradient passes.

        Raises
        ------
        ShapeError
            If a key is missing or unknown, or a shape differs.
        DTypeError
            If a gradient is not a real floating-point numpy array.
        NonFiniteError
            If a gradient contains NaN or infinity; the message names the parameter.
        """
        self._check_grads(grads)
        self.n_steps += 1
        for k, p in self._params.items():
            self._update(k, p, grads[k], self._scratch[k])

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, tmp: np.ndarray) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """A copy of the optimizer state: step count, hyper-parameters and buffers."""
        out: dict[str, Any] = {"type": type(self).__name__, "step": self.n_steps, "lr": self.lr}
        for h in self.hyperparameters:
            out[h] = getattr(self, h)
        return out

    def __repr__(self) -> str:
        hp = "".join(f", {h}={getattr(self, h)!r}" for h in self.hyperparameters)
        return f"{type(self).__name__}(lr={self.lr!r}{hp}; {len(self._params)} parameters, {self.n_steps} steps)"


class SGD(Optimizer):
    r"""Plain gradient descent: :math:`\theta \leftarrow \theta - \eta\, g`.

    Parameters
    ----------
    params : Mapping[str, numpy.ndarray]
        The parameters, updated in place.
    lr : float
        Learning rate :math:`\eta > 0` (default ``1e-2``).
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-2) -> None:
        super().__init__(params, lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, tmp: np.ndarray) -> None:
        np.multiply(g, self._lr, out=tmp)
        np.subtract(p, tmp, out=p)


class Momentum(Optimizer):
    r"""Heavy-ball momentum.

    .. math::

        m_n = \beta\, m_{n-1} + g_n, \quad m_0 = 0, \qquad
        \theta_n = \theta_{n-1} - \eta\, m_n ,

    so the first step is plain SGD and
    :math:`\theta_n - \theta_{n-1} = -\eta \sum_{k=0}^{n-1} \beta^k g_{n-k}`
    (PyTorch's ``SGD(momentum=beta, dampening=0)``).

    Parameters
    ----------
    params : Mapping[str, numpy.ndarray]
        The parameters, updated in place.
    lr : float
        Learning rate :math:`\eta > 0` (default ``1e-2``).
    beta : float
        Momentum coefficient :math:`\beta \in [0, 1)` (default 0.9).
    """

    hyperparameters = ("beta",)

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-2, beta: float = 0.9) -> None:
        self.beta = _check_beta("momentum beta", beta)
        super().__init__(params, lr)
        self._m = {k: np.zeros_like(p) for k, p in self._params.items()}

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, tmp: np.ndarray) -> None:
        m = self._m[name]
        m *= self.beta
        m += g
        np.multiply(m, self._lr, out=tmp)
        np.subtract(p, tmp, out=p)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["m"] = {k: v.copy() for k, v in self._m.items()}
        return out


class Adam(Optimizer):
    r"""Adam with bias correction (Kingma & Ba, 2015).

    .. math::

        m_n &= \beta_1 m_{n-1} + (1-\beta_1)\, g_n, &
        v_n &= \beta_2 v_{n-1} + (1-\beta_2)\, g_n^2, \\
        \hat m_n &= m_n / (1-\beta_1^n), &
        \hat v_n &= v_n / (1-\beta_2^n), \\
        \theta_n &= \theta_{n-1} - \eta\, \hat m_n / (\sqrt{\hat v_n} + \varepsilon), &&

    with :math:`m_0 = v_0 = 0`; the square and the root act elementwise.

    Parameters
    ----------
    params : Mapping[str, numpy.ndarray]
        The parameters, updated in place.
    lr : float
        Learning rate :math:`\eta > 0` (default ``1e-3``).
    beta1, beta2 : float
        Decay rates in :math:`[0, 1)` (defaults 0.9 and 0.999).
    eps : float
        :math:`\varepsilon > 0` (default ``1e-8``).
    """

    hyperparameters = ("beta1", "beta2", "eps")

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        self.beta1 = _check_beta("adam beta1", beta1)
        self.beta2 = _check_beta("adam beta2", beta2)
        self.eps = _check_rate("adam eps", eps)
        super().__init__(params, lr)
        self._m = {k: np.zeros_like(p) for k, p in self._params.items()}
        self._v = {k: np.zeros_like(p) for k, p in self._params.items()}

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, tmp: np.ndarray) -> None:
        m, v = self._m[name], self._v[name]
        n = self.n_steps
        bc1 = 1.0 - self.beta1**n
        bc2 = 1.0 - self.beta2**n
        # m <- beta1 m + (1 - beta1) g
        m *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        # v <- beta2 v + (1 - beta2) g^2
        v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        # theta <- theta - lr * (m / bc1) / (sqrt(v / bc2) + eps)
        np.divide(v, bc2, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= self._lr / bc1
        np.subtract(p, tmp, out=p)

    def preconditioner(self) -> dict[str, np.ndarray]:
        r"""The current diagonal preconditioner :math:`1/(\sqrt{\hat v_n} + \varepsilon)`.

        The effective per-coordinate learning rate is :math:`\eta` times this
        (applied to :math:`\hat m_n`).  Returns new arrays, one per parameter.

        Raises
        ------
        ConfigError
            Before the first step, when :math:`\hat v` is undefined.
        """
        if self.n_steps == 0:
            raise ConfigError("Adam.preconditioner() needs at least one step (v-hat is undefined before the first step)")
        bc2 = 1.0 - self.beta2**self.n_steps
        return {k: 1.0 / (np.sqrt(v / bc2) + self.eps) for k, v in self._v.items()}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["m"] = {k: a.copy() for k, a in self._m.items()}
        out["v"] = {k: a.copy() for k, a in self._v.items()}
        return out


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> float:
    r"""Rescale gradients in place to a global :math:`\ell_2` norm of at most ``max_norm``.

    The global norm is :math:`\lVert g \rVert = \big(\sum_k \sum_i g_{k,i}^2\big)^{1/2}`
    over every array :math:`g_k` of ``grads``.  If :math:`\lVert g \rVert > c`
    (:math:`c` = ``max_norm``) every array is multiplied in place by
    :math:`c / \lVert g \rVert`; otherwise nothing changes.  This is
    ``torch.nn.utils.clip_grad_norm_`` without its :math:`10^{-6}` in the
    denominator.  A non-finite norm (from NaN or infinite gradients) is returned
    without any rescaling, for the optimizer's step to reject.

    Parameters
    ----------
    grads : Mapping[str, numpy.ndarray]
        Writeable real floating-point arrays.
    max_norm : float
        The bound :math:`c`, finite and ``> 0``.

    Returns
    -------
    float
        The global norm before clipping.

    Raises
    ------
    ConfigError
        If ``max_norm`` is not a finite number ``> 0``.
    DTypeError
        If an entry is not a writeable real floating-point numpy array.
    """
    c = _check_rate("max_norm", max_norm)
    if not isinstance(grads, Mapping):
        raise DTypeError(f"grads must be a mapping name -> numpy array, got {type(grads).__name__}")
    arrays = []
    for k, g in grads.items():
        if not isinstance(g, np.ndarray) or not _is_real_float(g):
            what = f"dtype {g.dtype}" if isinstance(g, np.ndarray) else type(g).__name__
            raise DTypeError(f"grads[{k!r}] must be a float32 or float64 numpy array, got {what}")
        if not g.flags.writeable:
            raise DTypeError(f"grads[{k!r}] is read-only; clipping rescales gradients in place")
        arrays.append(g)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = math.fsum(float(np.vdot(g, g)) for g in arrays)
        norm = math.sqrt(sq) if sq == sq else math.nan
        if math.isinf(norm) and all(_all_finite(g) for g in arrays):
            # the squares overflowed: compute the norm of the gradients scaled by their largest entry
            s = max(float(np.max(np.abs(g))) for g in arrays if g.size)
            norm = s * math.sqrt(math.fsum(float(np.vdot(g / s, g / s)) for g in arrays))
    if math.isfinite(norm) and norm > c:
        scale = c / norm
        for g in arrays:
            g *= scale
    return norm


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "momentum": Momentum, "adam": Adam}
"""Optimizer classes by name."""

DEFAULT_LR: dict[str, float] = {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3}
"""The learning rate :func:`make_optimizer` uses when none is given."""


def make_optimizer(name: str, params: Mapping[str, np.ndarray], lr: float | None = None, **kw: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` in :data:`OPTIMIZERS`.

    Parameters
    ----------
    name : str
        ``'sgd'``, ``'momentum'`` or ``'adam'``.
    params : Mapping[str, numpy.ndarray]
        The parameters, updated in place.
    lr : float, optional
        Learning rate; default ``DEFAULT_LR[name]`` (1e-2, 1e-2, 1e-3).
    **kw
        The optimizer's other hyper-parameters (``beta`` for momentum;
        ``beta1``, ``beta2``, ``eps`` for Adam).

    Raises
    ------
    ConfigError
        On an unknown name or hyper-parameter (the message lists the valid
        ones) and on any invalid setting.
    """
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; known optimizers are {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    unknown = [k for k in kw if k not in cls.hyperparameters]
    if unknown:
        valid = ", ".join(("lr",) + cls.hyperparameters)
        raise ConfigError(f"optimizer {name!r} has no hyper-parameter(s) {unknown}; valid: {valid}")
    return cls(params, DEFAULT_LR[name] if lr is None else lr, **kw)
