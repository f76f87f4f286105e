"""Forward + full BPTT of the vector-gate cell: compiled kernel vs numpy reference vs hand-written C.

A first, partial version of the kernel benchmark: it times symgate's compiled kernel and
its numpy reference side by side with the hand-written C reference of ../shared/bench-ref
(built with its Makefile into build/cref), float64, median of repeats, reported as ratios.
PyTorch and JAX columns, float32, the other cells and GFLOP/s are not in it yet.

The C reference's loss is 0.5 * sum_b (V . h_T - y)^2; symgate's last-state MSE is the mean
over B, so symgate's gradients are checked after scaling by B / 2.

Run:  make -f ../shared/bench-ref/Makefile OUT=build/cref PY=.venv/bin/python
      python benchmarks/bench_kernels_prelim.py [build/cref]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

import symgate as sg

SIZES = [(8, 2, 1, 100), (32, 2, 32, 100), (64, 2, 32, 500), (128, 8, 64, 200), (256, 8, 64, 100)]
NAMES = {"W": "W", "U": "U", "b": "b", "Wg": "Wg", "Ug": "Ug", "c": "c"}


def median_time(fn, repeats: int = 7) -> float:  # type: ignore[no-untyped-def]
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    libdir = sys.argv[1] if len(sys.argv) > 1 else "build/cref"
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "shared", "bench-ref"))
    cref = None
    try:
        from cref import CReference  # type: ignore[import-not-found]

        cref = CReference(libdir, variant="blas", dtype="float64")
    except Exception as exc:  # noqa: BLE001 - the C reference is optional here
        print(f"(C reference not available: {exc})")
    cell = sg.cells.vector_gate()
    kc, kr = sg.compile(cell, "float64"), sg.reference_kernel(cell, "float64")
    print(f"{'(n,m,B,T)':>16s} {'compiled':>10s} {'numpy ref':>10s} {'C ref':>10s} {'ref/comp':>9s} {'comp/C':>8s}  grad check vs C")
    for n, m, B, T in SIZES:
        rng = np.random.default_rng(0)
        p = {"W": rng.standard_normal((n, n)) / np.sqrt(n), "U": rng.standard_normal((n, m)), "b": 0.1 * rng.standard_normal(n),
             "Wg": rng.standard_normal((n, n)) / np.sqrt(n), "Ug": rng.standard_normal((n, m)), "c": 0.1 * rng.standard_normal(n)}
        x = rng.standard_normal((T, B, m))
        h0 = np.zeros((B, n))
        V = rng.standard_normal((1, n)) / np.sqrt(n)
        y = rng.standard_normal((B, 1))
        loss = sg.losses.last_mse(V, y)
        tc = median_time(lambda: kc.backward(p, x, h0, loss=loss))
        tr = median_time(lambda: kr.backward(p, x, h0, loss=loss), repeats=3)
        line = f"{str((n, m, B, T)):>16s} {tc * 1e3:8.2f}ms {tr * 1e3:8.2f}ms"
        if cref is not None:
            cp = {**{k: np.ascontiguousarray(v) for k, v in p.items()}, "V": np.ascontiguousarray(V[0])}
            run = cref.prepare(cp, x, np.ascontiguousarray(y[:, 0]), h0)
            tcr = median_time(run)
            g = kc.backward(p, x, h0, loss=loss)
            scale = B / 2.0  # mean over B -> 0.5 * sum
            err = max(np.max(np.abs(g.params[k] * scale - run.grads[k])) / np.max(np.abs(run.grads[k])) for k in NAMES)
            line += f" {tcr * 1e3:8.2f}ms {tr / tc:8.1f}x {tc / tcr:7.2f}x  {err:.1e}"
        else:
            line += f" {'-':>10s} {tr / tc:8.1f}x {'-':>8s}"
        print(line)


if __name__ == "__main__":
    main()
