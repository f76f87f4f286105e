r"""Losses for BPTT, through a linear readout of the first state.

Both losses are mean squared errors of a linear readout :math:`\hat y = V h`
(``V`` of shape ``(o, n)``), as PyTorch's ``MSELoss`` computes them:

* :class:`LastMSE` -- the paper's loss, last state only:
  :math:`L = \frac{1}{B\,o}\sum_{b}\lVert V h_T^{(b)} - y^{(b)}\rVert^2`;
* :class:`StepMSE` -- every step (sequence to sequence):
  :math:`L = \frac{1}{T\,B\,o}\sum_{t,b}\lVert V h_t^{(b)} - y_t^{(b)}\rVert^2`.

A loss gives its value, the cotangents :math:`\partial L/\partial h_t` that seed
BPTT, and the gradient of its readout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import DTypeError, ShapeError
from ._linalg import matmul
from ._validate import check_array

__all__ = ["Loss", "LastMSE", "StepMSE", "last_mse", "step_mse"]


class Loss:
    """Base class: ``evaluate(h)`` returns ``(value, dL/dh (T, B, n), readout gradients)``."""

    V: np.ndarray
    y: np.ndarray

    def check(self, T: int, B: int, n: int, dtype: np.dtype) -> None:
        raise NotImplementedError

    def evaluate(self, h: np.ndarray) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError


def _check_V(V: Any, n: int, dtype: np.dtype) -> int:
    check_array("loss V", V, dtype, 2)
    if V.shape[1] != n:
        raise ShapeError(f"loss V has shape {V.shape}; expected (o, n) with n = {n}")
    if V.shape[0] == 0:
        raise ShapeError("loss V has o = 0 outputs")
    return V.shape[0]


@dataclass
class LastMSE(Loss):
    """Mean squared error of ``V @ h_T`` against ``y`` (shape ``(B, o)``)."""

    V: np.ndarray
    y: np.ndarray

    def check(self, T: int, B: int, n: int, dtype: np.dtype) -> None:
        o = _check_V(self.V, n, dtype)
        check_array("loss y", self.y, dtype, 2)
        if self.y.shape != (B, o):
            raise ShapeError(f"loss y has shape {self.y.shape}; expected (B, o) = {(B, o)}")

    def evaluate(self, h: np.ndarray) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
        T, B, n = h.shape
        r = matmul(h[-1], self.V.T) - self.y  # (B, o)
        scale = 1.0 / r.size
        value = scale * np.sum(r * r)
        cot = np.zeros_like(h)
        cot[-1] = (2.0 * scale) * matmul(r, self.V)
        gV = (2.0 * scale) * matmul(r.T, h[-1])
        return value, cot, {"V": gV}


@dataclass
class StepMSE(Loss):
    """Mean squared error of ``V @ h_t`` against ``y[t]`` at every step (``y`` of shape ``(T, B, o)``)."""

    V: np.ndarray
    y: np.ndarray

    def check(self, T: int, B: int, n: int, dtype: np.dtype) -> None:
        o = _check_V(self.V, n, dtype)
        check_array("loss y", self.y, dtype, 3)
        if self.y.shape != (T, B, o):
            raise ShapeError(f"loss y has shape {self.y.shape}; expected (T, B, o) = {(T, B, o)}")

    def evaluate(self, h: np.ndarray) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
        r = matmul(h, self.V.T) - self.y  # (T, B, o)
        scale = 1.0 / r.size
        value = scale * np.sum(r * r)
        cot = (2.0 * scale) * matmul(r, self.V)
        gV = (2.0 * scale) * np.einsum("tbo,tbn->on", r, h)
        return value, cot, {"V": gV}


def last_mse(V: np.ndarray, y: np.ndarray) -> LastMSE:
    """:class:`LastMSE` (the paper's loss)."""
    if not isinstance(V, np.ndarray) or not isinstance(y, np.ndarray):
        raise DTypeError("last_mse(V, y) takes numpy arrays")
    return LastMSE(V, y)


def step_mse(V: np.ndarray, y: np.ndarray) -> StepMSE:
    """:class:`StepMSE` (per-step loss)."""
    if not isinstance(V, np.ndarray) or not isinstance(y, np.ndarray):
        raise DTypeError("step_mse(V, y) takes numpy arrays")
    return StepMSE(V, y)
