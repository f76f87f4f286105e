"""The speed cost of the prebuilt kernels' portable instruction set.

Prebuilt (ahead-of-time) kernels are compiled for ``x86-64-v3`` (``symgate._aot.AOT_ISA``)
so that a wheel, an image or a Dask worker runs on other x86-64 CPUs; kernels compiled on
demand use ``-march=native``.  This script compiles the same generated kernels with each
``-march`` in one run -- ``native``, ``x86-64-v3``, ``x86-64-v2`` and ``x86-64`` (the
SSE2 baseline) -- and times forward + last-state MSE + full BPTT through ``k.prepare(...)``
at the standard sizes of ``bench_kernels.py``, sampled in interleaved blocks so a drift of the
machine's speed hits all variants alike.  Reported: the median time per call of ``native`` and
the ratio of each other variant to it (> 1: slower than native).

Every variant's loss and gradients are checked against the ``native`` one first (relative
error at most 1e-12 in float64, 1e-3 in float32 as in ``bench_kernels.py``: the variants differ
only in instruction selection, i.e. in the rounding of fused multiply-adds and vectorised exp).

Run (from the repository root; ~4 min on 2 cores):
    python benchmarks/bench_isa.py
    python benchmarks/bench_isa.py --quick --cells vector_gate --dtypes float64
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (the problems, sizes and the interleaved timer)

VARIANTS = ("native", "x86-64-v3", "x86-64-v2", "x86-64")
#: float64: the variants differ only in instruction selection (FMA contraction, vectorised exp), ~1e-15 here;
#: float32: bench_kernels.py's bound (eps32 accumulated over T steps forward and back, ~2e-5 seen here)
TOLERANCE = {"float64": 1e-12, "float32": bk.TOLERANCE["float32"]}


def kernel_with(sg: Any, cell: Any, dtype: str, march: str) -> Any:
    """The compiled kernel of ``cell`` with its module built for ``-march=<march>``."""
    from symgate import _build

    base = sg.compile(cell, dtype)
    saved = _build.CFLAGS
    _build.CFLAGS = tuple(f if f != "-march=native" else f"-march={march}" for f in saved)
    try:
        module = _build.build_module(base.generated.source, extra=(base.dtype.str,))
    finally:
        _build.CFLAGS = saved
    k = copy.copy(base)
    k.module = module
    return k


def results(step: Any) -> list[np.ndarray]:
    step()
    return [np.asarray(step.grads.value), *[np.array(g) for g in step.grads.params.values()],
            np.array(step.grads.readout["V"])]


def check_agree(ref: list[np.ndarray], got: list[np.ndarray], dtype: str, what: str) -> None:
    for a, b in zip(ref, got):
        scale = max(float(np.max(np.abs(a))), 1e-300)
        err = float(np.max(np.abs(a - b))) / scale
        if err > TOLERANCE[dtype]:
            raise SystemExit(f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")


def run_case(sg: Any, cell_name: str, dtype: str, size: tuple[int, int, int, int], kernels: dict[str, Any],
             budget: Any, blocks: int) -> list[float]:
    p = bk.make_problem(kernels["native"].cell, cell_name, size, dtype)
    steps = {}
    for v, k in kernels.items():
        params = {nm: a.copy() for nm, a in p.params.items()}
        steps[v] = k.prepare(params, p.x, p.h0, loss=sg.losses.last_mse(p.V, p.y))
    ref = results(steps["native"])
    for v, st in steps.items():
        check_agree(ref, results(st), dtype, f"{cell_name} {dtype} {size} {v}")
    timings = bk.interleaved_medians([steps[v] for v in VARIANTS], budget, blocks)
    return [t.seconds for t in timings]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time kernels compiled for each x86-64 level against -march=native.")
    ap.add_argument("--cells", default="leaky,scalar_gate,vector_gate")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes, fewer samples")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"not an x86-64 machine ({platform.machine()}): prebuilt kernels use the compiler's default target")
        return 0
    cache = tempfile.mkdtemp(prefix="symgate-bench-isa-")
    os.environ["SYMGATE_CACHE_DIR"] = cache
    try:
        return measure(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def measure(args: argparse.Namespace) -> int:
    import symgate as sg
    from symgate import _aot

    sizes = bk.SIZES[:2] if args.quick else bk.SIZES
    budget = bk.Budget(3, 15, 1.0) if args.quick else bk.Budget(9, 60, 3.0)
    print(f"prebuilt kernels: -march={_aot.AOT_ISA}; CPU: {bk.platform.processor() or platform.machine()}")
    print(f"{'cell':<12} {'dtype':<8} {'n,m,B,T':<16} {'native':>10} " + " ".join(f"{v:>10}" for v in VARIANTS[1:]))
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
    for cell_name in args.cells.split(","):
        cell = sg.cells.builtin(cell_name)  # as bench_kernels.py builds them
        for dtype in args.dtypes.split(","):
            kernels = {v: kernel_with(sg, cell, dtype, v) for v in VARIANTS}
            for size in sizes:
                med = run_case(sg, cell_name, dtype, size, kernels, budget, blocks=3)
                for v, t in zip(VARIANTS[1:], med[1:]):
                    ratios[v].append(t / med[0])
                print(f"{cell_name:<12} {dtype:<8} {','.join(map(str, size)):<16} {med[0] * 1e3:>8.3f}ms "
                      + " ".join(f"{t / med[0]:>10.3f}" for t in med[1:]), flush=True)
    print("geometric mean of time / native: " + ", ".join(
        f"{v} {float(np.exp(np.mean(np.log(r)))):.3f} (range {min(r):.2f}-{max(r):.2f})" for v, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
