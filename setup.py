"""Build script: compiles the kernels of the built-in cells ahead of time.

Packaging metadata lives in ``pyproject.toml``.  This file adds the extension
modules: symgate's own generator (run from this source tree) writes the Cython
source of every built-in cell's kernel in float32 and float64, and each is compiled
into ``symgate._kernels.k_<content hash>`` with the flags of kernels compiled on
demand, but for a portable instruction set (``x86-64-v3`` on x86-64, see
``symgate._aot``) instead of ``-march=native``: a wheel or image built here runs on other
CPUs, and each module records the level it needs.  A user of the built-in cells then needs no compiler at run time.

Set ``SYMGATE_NO_AOT=1`` to skip them (a pure-Python install; kernels are then
compiled on first use into the cache).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class ParallelBuildExt(build_ext):
    """build_ext compiling the kernels in parallel (one job per core)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


def _ext_modules() -> list:
    if os.environ.get("SYMGATE_NO_AOT"):
        return []
    sys.path.insert(0, HERE)  # import the generator from the tree being built (this process only)
    from Cython.Build import cythonize

    from symgate._aot import aot_cflags, builtin_sources

    out_dir = os.path.join(HERE, "build", "symgate-aot")
    os.makedirs(out_dir, exist_ok=True)
    sources = builtin_sources()
    # in-place (editable) builds: drop modules of an older generator (they would never be loaded)
    current = {name.rsplit(".", 1)[1] for name, _ in sources}
    kdir = os.path.join(HERE, "symgate", "_kernels")
    for f in os.listdir(kdir):
        if f.startswith("k_") and f.split(".", 1)[0] not in current:
            os.remove(os.path.join(kdir, f))
    exts = []
    for name, source in sources:
        pyx = os.path.join(out_dir, name.rsplit(".", 1)[1] + ".pyx")
        old = open(pyx).read() if os.path.exists(pyx) else None
        if old != source:  # keep timestamps of unchanged sources: no needless rebuilds
            with open(pyx, "w") as f:
                f.write(source)
        exts.append(Extension(name, [os.path.relpath(pyx, HERE)], extra_compile_args=list(aot_cflags()), libraries=["m"]))
    return cythonize(exts, language_level=3, quiet=True, nthreads=os.cpu_count() or 1)


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": ParallelBuildExt})
