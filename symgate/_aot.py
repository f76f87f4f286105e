"""Kernels of the built-in cells compiled ahead of time, at ``pip install``.

``setup.py`` calls :func:`builtin_sources` to generate the Cython source of every
built-in cell (float32 and float64) and compiles each into the extension module
``symgate._kernels.k_<content hash>``.  At run time :func:`load` finds such a module
by the content hash of the source the generator produces *now*: a module built from
an older generator has another hash and is simply not found (the kernel is then
compiled on demand into the cache instead), so a prebuilt module can never be
paired with a different cell or dtype.

**Portable instruction set.**  Kernels compiled on demand use ``-march=native`` (the CPU's
identity is part of their cache key).  Prebuilt kernels travel (wheels, container images, Dask
workers), so on x86-64 they are compiled for the baseline :data:`AOT_ISA` (``x86-64-v3``: AVX2,
FMA, BMI1/2, F16C, LZCNT, MOVBE; every x86-64 CPU since 2013-2015), measured by
``benchmarks/bench_isa.py``.  Each module carries the marker ``symgate-isa=<level>;`` as a C
string in its binary, and :func:`load` reads it from the file and checks the running CPU's
features (``/proc/cpuinfo``, else NumPy's ``__cpu_features__``) *before* importing the module:
on a CPU that lacks a feature, or for a module without a marker, the prebuilt module is not
loaded; the kernel is then compiled natively on demand (or, with no compiler,
:func:`symgate.kernels` falls back to the numpy reference), with one :class:`SymgateWarning`.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

__all__ = ["module_name", "builtin_sources", "load", "AOT_ISA", "aot_cflags", "cpu_flags", "missing_features"]

#: the instruction-set level of the prebuilt kernels on x86-64 (gcc's -march name)
AOT_ISA = "x86-64-v3"
#: the CPU flags (as /proc/cpuinfo names them) each x86-64 level needs
ISA_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64": ("sse2",),
    "x86-64-v2": ("sse2", "cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"),
    "x86-64-v3": ("sse2", "cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
                  "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
}
#: NumPy's names of the flags it reports (used where /proc/cpuinfo is not readable)
_NUMPY_NAMES = {"sse2": "SSE2", "popcnt": "POPCNT", "pni": "SSE3", "ssse3": "SSSE3", "sse4_1": "SSE41",
                "sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "f16c": "F16C", "fma": "FMA3"}
#: the marker written into each prebuilt module's binary (a C string) and read before importing it
MARKER = b"symgate-isa="
_X86 = ("x86_64", "amd64", "x86-64")
_WARNED: set[str] = set()

#: dtypes compiled ahead of time
DTYPES = ("float64", "float32")

#: the paper's models (no biases) used by the experiments, compiled ahead of time in float64
PAPER_VARIANTS = ("plain", "leaky", "scalar_gate", "vector_gate")


def module_name(content_hash: str) -> str:
    """The extension module that holds the kernel with this content hash."""
    return f"symgate._kernels.k_{content_hash[:24]}"


def target_isa(machine: str | None = None) -> str:
    """The level prebuilt kernels are compiled for on ``machine`` (this one by default): :data:`AOT_ISA` on
    x86-64, the compiler's default target (``"baseline"``) elsewhere."""
    return AOT_ISA if (machine or platform.machine()).lower() in _X86 else "baseline"


def aot_cflags(machine: str | None = None) -> tuple[str, ...]:
    """The compiler flags of the prebuilt kernels: those of kernels compiled on demand, with
    ``-march=native`` replaced by the portable target (dropped where there is no x86-64 level)."""
    from ._build import CFLAGS

    isa = target_isa(machine)
    return tuple(f for f in CFLAGS if f != "-march=native") + ((f"-march={isa}",) if isa != "baseline" else ())


def isa_marker(isa: str) -> str:
    """Cython text that puts the marker ``symgate-isa=<isa>;`` into the module's binary (kept by the linker)."""
    return (f'\ncdef extern from *:\n    """\n    __attribute__((used)) static const char symgate_isa_marker[] = '
            f'"{MARKER.decode()}{isa};";\n    """\n\nISA = "{isa}"\n')


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The running CPU's feature flags, as /proc/cpuinfo names them (from NumPy's view where it is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats  # type: ignore[attr-defined,no-redef]
    have = {ours for ours, theirs in _NUMPY_NAMES.items() if feats.get(theirs)}
    if "avx2" in have:  # NumPy does not report these; every AVX2 CPU has them
        have |= {"bmi1", "bmi2", "abm", "movbe", "xsave", "cx16", "lahf_lm"}
    return frozenset(have)


def missing_features(isa: str, flags: frozenset[str] | None = None) -> list[str]:
    """The CPU features a module built for ``isa`` needs and this CPU (or ``flags``) lacks."""
    if isa == "baseline":
        return []
    if isa not in ISA_FEATURES:
        return [f"(unknown instruction set {isa!r})"]
    have = cpu_flags() if flags is None else flags
    return [f for f in ISA_FEATURES[isa] if f not in have]


def module_isa(path: str | Path) -> str | None:
    """The level recorded in a prebuilt module's binary, or None (no marker: built otherwise)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    at = data.find(MARKER)
    if at < 0:
        return None
    end = data.find(b";", at, at + 64)
    return data[at + len(MARKER):end].decode("ascii", "replace") if end > 0 else None


def _runnable(origin: str | None) -> bool:
    """Whether the prebuilt module at ``origin`` may be imported on this CPU (warns once if not)."""
    isa = module_isa(origin) if origin else None
    lacking = ["(no instruction-set marker in the module)"] if isa is None else missing_features(isa)
    if not lacking:
        return True
    if "cpu" not in _WARNED:
        _WARNED.add("cpu")
        from ._build import SymgateWarning

        warnings.warn(f"symgate's prebuilt kernels need {isa or 'an unrecorded instruction set'} and this CPU lacks "
                      f"{', '.join(lacking)}: kernels are compiled for this CPU on first use instead",
                      SymgateWarning, stacklevel=4)
    return False


def builtin_sources() -> list[tuple[str, str]]:
    """``(module name, Cython source)`` of every built-in cell's kernel, in both dtypes."""
    from . import cells
    from ._codegen import generate

    mark = isa_marker(target_isa())
    out = []
    for name in sorted(cells.BUILTIN):
        cell = cells.builtin(name)
        for dt in DTYPES:
            g = generate(cell, dt)
            out.append((module_name(g.content_hash), g.source + mark))
    for name in PAPER_VARIANTS:
        g = generate(cells.builtin(name, bias=False), "float64")
        out.append((module_name(g.content_hash), g.source + mark))
    return out


def load(content_hash: str) -> ModuleType | None:
    """The prebuilt module for this content hash, or None if none was built or this CPU cannot run it."""
    name = module_name(content_hash)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not _runnable(spec.origin):
        return None
    module = importlib.import_module(name)
    if getattr(module, "CONTENT_HASH", None) != content_hash:  # pragma: no cover - defensive
        return None
    return module
