"""Helpers shared by the experiments: models by name, settings, JSON, versions."""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
from typing import Any, Mapping

import numpy as np

from .._cell import Cell
from .._errors import ConfigError, SymgateError

__all__ = ["model_cell", "MODEL_LABELS", "jsonable", "versions", "Settings", "lag_summary"]

#: how the paper's models are called in plots and reports
MODEL_LABELS = {
    "plain": "plain RNN",
    "leaky": "leaky (constant α)",
    "scalar_gate": "scalar gate",
    "vector_gate": "vector gate (multi-gate)",
}


def model_cell(spec: str, *, alpha: float = 0.8) -> Cell:
    """The cell of a model name.

    The paper's models are the built-in cells without biases (``plain``, ``leaky`` with
    rate ``alpha``, ``scalar_gate``, ``vector_gate``); any other built-in name gives that
    cell with its default options, and ``path/to/file.py:name`` a user's cell.
    """
    from .. import cells
    from .._loading import load_cell

    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a model is a cell name or 'file.py:name', got {spec!r}")
    if spec == "leaky":
        return cells.leaky(alpha, bias=False)
    if spec in ("plain", "scalar_gate", "vector_gate"):
        return cells.builtin(spec, bias=False)
    try:
        return load_cell(spec)
    except ConfigError:
        raise
    except SymgateError as exc:
        raise ConfigError(str(exc)) from exc


def model_label(spec: str) -> str:
    """A model's name in summaries, claims and plots: the name itself, or for
    ``path/to/file.py:name`` just ``name`` (so that result paths stay dotted identifiers)."""
    return spec.rpartition(":")[2] if ":" in spec else spec


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays turned into Python numbers/lists and non-finite
    floats into the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has no such numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    return obj


def unjson(v: Any) -> Any:
    """Inverse of :func:`jsonable` for numbers: ``"nan"``/``"inf"``/``"-inf"`` back to floats."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return [unjson(x) for x in v]
    if isinstance(v, dict):
        return {k: unjson(x) for k, x in v.items()}
    return v


def versions() -> dict[str, str]:
    """Versions of Python, symgate and the numerical stack, and the machine."""
    import scipy
    import sympy

    from importlib.metadata import PackageNotFoundError, version

    try:
        sg_version = version("symgate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        sg_version = "unknown"
    return {"python": sys.version.split()[0], "symgate": sg_version, "numpy": np.__version__, "scipy": scipy.__version__,
            "sympy": sympy.__version__, "machine": platform.machine(), "platform": platform.platform()}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the experiments' settings: frozen dataclasses, serialisable, with checks."""

    def replace(self, **kw: Any) -> "Settings":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)} for {type(self).__name__}")
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Settings":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)} for {cls.__name__}")
        kw = {}
        for k, v in d.items():
            kw[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        return cls(**kw)

    def _positive(self, *names: str) -> None:
        from .tasks import _check_int

        for nm in names:
            _check_int(f"{type(self).__name__}.{nm}", getattr(self, nm), 1)


def lag_summary(values: np.ndarray) -> dict[str, list[float]]:
    """Median and quartiles across seeds (axis 0) of per-lag values, ignoring NaN."""
    v = np.asarray(values, dtype=float)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, med, q75 = np.nanpercentile(v, [25, 50, 75], axis=0)
    return {"median": med.tolist(), "q25": q25.tolist(), "q75": q75.tolist()}
