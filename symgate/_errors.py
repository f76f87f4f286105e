"""The project's error types.

Every error symgate raises on bad input derives from :class:`SymgateError`, and
also from the matching built-in type (``ValueError`` or ``TypeError``), so both
``except symgate.SymgateError`` and ordinary ``except ValueError`` work.
"""

from __future__ import annotations

__all__ = [
    "SymgateError",
    "CellSpecError",
    "InvalidNameError",
    "UnsupportedFunctionError",
    "StateIndependenceError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "NumericalError",
    "VerificationError",
    "ConfigError",
    "ConcurrentUseError",
]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (the message's lines joined, cut after ``limit`` characters),
    for errors that report another exception inside their own one-line message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SymgateError(Exception):
    """Base class of every error raised by symgate."""


class CellSpecError(SymgateError, ValueError):
    """A cell specification is malformed (bad annotation, unknown symbol, ...)."""


class InvalidNameError(CellSpecError):
    """A name is not a valid identifier, is reserved, or collides with another."""


class UnsupportedFunctionError(CellSpecError):
    """A cell body uses a function symgate cannot differentiate or generate."""


class StateIndependenceError(CellSpecError):
    """A cell's update does not depend on (one of) its states."""


class ShapeError(SymgateError, ValueError):
    """An array or a ``Linear`` node has the wrong shape or dimension."""


class DTypeError(SymgateError, TypeError):
    """An array has the wrong dtype or memory layout."""


class NonFiniteError(SymgateError, ValueError):
    """An input array contains NaN or infinity."""


class NumericalError(SymgateError, FloatingPointError):
    """A computation produced NaN or infinity from finite inputs (overflow)."""


class VerificationError(SymgateError, AssertionError):
    """A verification battery found a disagreement beyond its stated tolerance."""


class ConfigError(SymgateError, ValueError):
    """An experiment setting is invalid (unknown task, optimizer or cell; a bad size or rate)."""


class ConcurrentUseError(SymgateError, RuntimeError):
    """An object that holds one call's buffers (a prepared step) was called from two threads at once."""
