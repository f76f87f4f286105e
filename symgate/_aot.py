"""Kernels of the built-in cells compiled ahead of time, at ``pip install``.

``setup.py`` calls :func:`builtin_sources` to generate the Cython source of every
built-in cell (float32 and float64) and compiles each into the extension module
``symgate._kernels.k_<content hash>``.  At run time :func:`load` finds such a module
by the content hash of the source the generator produces *now*: a module built from
an older generator has another hash and is simply not found (the kernel is then
compiled on demand into the cache instead), so a prebuilt module can never be
paired with a different cell or dtype.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["module_name", "builtin_sources", "load"]

#: dtypes compiled ahead of time
DTYPES = ("float64", "float32")

#: the paper's models (no biases) used by the experiments, compiled ahead of time in float64
PAPER_VARIANTS = ("plain", "leaky", "scalar_gate", "vector_gate")


def module_name(content_hash: str) -> str:
    """The extension module that holds the kernel with this content hash."""
    return f"symgate._kernels.k_{content_hash[:24]}"


def builtin_sources() -> list[tuple[str, str]]:
    """``(module name, Cython source)`` of every built-in cell's kernel, in both dtypes."""
    from . import cells
    from ._codegen import generate

    out = []
    for name in sorted(cells.BUILTIN):
        cell = cells.builtin(name)
        for dt in DTYPES:
            g = generate(cell, dt)
            out.append((module_name(g.content_hash), g.source))
    for name in PAPER_VARIANTS:
        g = generate(cells.builtin(name, bias=False), "float64")
        out.append((module_name(g.content_hash), g.source))
    return out


def load(content_hash: str) -> ModuleType | None:
    """The prebuilt module for this content hash, or None if none was built."""
    name = module_name(content_hash)
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    module = importlib.import_module(name)
    if getattr(module, "CONTENT_HASH", None) != content_hash:  # pragma: no cover - defensive
        return None
    return module
