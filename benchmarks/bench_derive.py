"""Derivation cost: symgate's structured derivation vs brute-force explicit SymPy Jacobians.

Measures, side by side in one run:

1. the time to trace and derive all seven built-in cells (state Jacobians and every
   immediate parameter Jacobian), cold (fresh interpreter, imports excluded) and warm
   (median over repeats, new cell objects each time, so nothing is cached);
2. that the symbolic work does not depend on the hidden size n: the derivation never
   takes n, and the number of SymPy ``diff`` calls and of operations in the result is
   the same whatever n is substituted afterwards;
3. the alternative a user would otherwise write: ``sympy.Matrix.jacobian`` of the
   explicit n-dimensional update, whose cost grows with n (shown for n = 2, 4, 8).

Run:  python benchmarks/bench_derive.py   (or `make bench`)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import sympy

import symgate as sg
from symgate._cell import dim_symbol
from symgate._derive import explicit_update

# a fresh interpreter imports symgate (not timed), then runs derive_all() below once
COLD = "import sys; sys.path.insert(0, {here!r}); import bench_derive; print(bench_derive.derive_all())"


def derive_all() -> float:
    t = time.perf_counter()
    for name in sg.cells.BUILTIN:
        c = sg.cells.builtin(name)
        sg.jacobian(c)
        for s in c.state_names:
            sg.parameter_jacobians(c, s)
    return time.perf_counter() - t


def count_diff_calls(cell_factory) -> int:  # type: ignore[no-untyped-def]
    calls = 0
    orig = sympy.diff

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return orig(*a, **k)

    import symgate._derive._local as local

    local.sympy.diff = counting  # type: ignore[attr-defined]
    try:
        c = cell_factory()
        sg.jacobian(c)
    finally:
        local.sympy.diff = orig  # type: ignore[attr-defined]
    return calls


def brute_force(name: str, n: int) -> float:
    c = sg.cells.builtin(name)
    t = time.perf_counter()
    outs = explicit_update(c, {"n": n, "m": 2})
    for st, out in zip(c.states, outs):
        out.jacobian(sympy.Matrix(sympy.MatrixSymbol(st.name, n, 1)))
    return time.perf_counter() - t


def main() -> None:
    print("== 1. derivation of all seven built-in cells (state + parameter Jacobians)")
    here = os.path.dirname(os.path.abspath(__file__))
    cold = [float(subprocess.run([sys.executable, "-c", COLD.format(here=here)], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3)]
    warm = [derive_all() for _ in range(7)]
    print(f"   cold (fresh interpreter, median of 3): {statistics.median(cold) * 1e3:8.1f} ms")
    print(f"   warm (median of 7):                    {statistics.median(warm) * 1e3:8.1f} ms   target < 1000 ms")
    print()
    print("== 2. symbolic work is independent of n")
    n = dim_symbol("n")
    print(f"   {'cell':12s} {'diff calls':>10s} {'ops(n=2)':>9s} {'ops(n=1000)':>11s}")
    for name in sg.cells.BUILTIN:
        calls = count_diff_calls(lambda: sg.cells.builtin(name))
        J = sg.jacobian(sg.cells.builtin(name))
        ops2, ops1000 = sympy.count_ops(J.expr.subs(n, 2)), sympy.count_ops(J.expr.subs(n, 1000))
        print(f"   {name:12s} {calls:10d} {ops2:9d} {ops1000:11d}")
    print()
    print("== 3. alternative: explicit n x n SymPy Jacobian of the update (per cell), vs symgate")
    print(f"   {'cell':12s} {'symgate':>9s} {'n=2':>9s} {'n=4':>9s} {'n=8':>9s}   ratio at n=8")
    for name in ("leaky", "vector_gate", "gru"):
        sym_t = statistics.median(
            [(lambda t0: (sg.jacobian(sg.cells.builtin(name)), time.perf_counter() - t0)[1])(time.perf_counter())
             for _ in range(5)])
        bf = [brute_force(name, k) for k in (2, 4, 8)]
        print(f"   {name:12s} {sym_t * 1e3:7.1f}ms " + " ".join(f"{b * 1e3:7.1f}ms" for b in bf)
              + f"   {bf[-1] / sym_t:8.1f}x")


if __name__ == "__main__":
    main()
