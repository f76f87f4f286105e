"""Forward + full BPTT of gated RNN cells: symgate's compiled kernels against the alternatives.

What it measures
----------------
For the cells ``leaky`` (alpha = 0.8), ``scalar_gate`` and ``vector_gate`` at
(n, m, B, T) in {(8,2,1,100), (32,2,32,100), (64,2,32,500), (128,8,64,200), (256,8,64,100)},
in float64 and float32, the time of one forward pass + last-state MSE loss + full BPTT
(the gradients of every parameter and of the readout V), side by side in one process:

* ``sg``      symgate's compiled kernel through ``k.prepare(...)`` (arrays bound once; the main number);
* ``sg.bwd``  the same kernel through plain ``k.backward(...)`` (argument checks and allocation per call);
* ``numpy``   symgate's numpy reference kernel (``sg.reference_kernel``);
* ``torch``   PyTorch eager autograd, a straightforward implementation of the cell
              (input projections of all steps in one matmul, a Python loop over the steps);
* ``t.comp``  the same with ``torch.compile``: by default the cell update (one step) is compiled
              once per cell and dtype with dynamic shapes (``--torch-compile step``);
              ``--torch-compile unrolled`` compiles the whole unrolled sequence per case instead
              (several times faster to run than eager, but ~50 s to compile per case at T = 100 here);
* ``jax``     ``jax.jit(jax.value_and_grad(loss_fn))`` with ``jax.lax.scan`` over the steps;
* ``C``       the hand-written C reference of ../shared/bench-ref (vector gate only), the best of
              its variants ("loops", "blas", "omp").

How
---
Parameters are drawn like PyTorch's default initialisation, U(-1/sqrt(n), 1/sqrt(n)), with a
fixed seed (the readout V too); inputs x and targets y are standard normal, h0 = 0.  The same
float64 draw is cast to float32, so both dtypes solve the same problem.

Before timing a (cell, size, dtype), every implementation's loss and gradients are compared with
the numpy reference kernel of that dtype: relative error max|g - g_ref| / max|g_ref| per
gradient (every parameter and V) and |L - L_ref| / |L_ref| for the loss, at most 1e-8 in
float64 and 1e-3 in float32 (see ``TOLERANCE``).  The script aborts if one disagrees.

Each timing is the median of at least 7 samples (3 with ``--quick``), taken after warm-up
(JIT compiles excluded; their time is reported separately); one sample times a batch of calls
long enough to last > 2 ms, so the tiny sizes get many calls per sample.  Within a case the
implementations are sampled in interleaved blocks (see ``interleaved_medians``), so a drift of
the machine's speed hits all alike.

The GFLOP/s column counts the FLOPs of matrix products only (see ``matmul_flops``) and is
compared with the machine's large-GEMM peak measured in the same run (2048 x 2048 products
through numpy and scipy.linalg.blas, the best of both).  Finally the cold compile time and the
warm (cached) load time of a *new* cell's kernel are measured in fresh subprocesses with an
empty ``SYMGATE_CACHE_DIR``.

Optional dependencies
---------------------
    pip install torch==2.13.0     # the CPU wheel (a plain "torch" would pull a multi-GB CUDA build)
    pip install jax               # CPU jaxlib
    make -f ../shared/bench-ref/Makefile OUT=build/cref PY=$(which python)   # the C reference
Whatever is missing is reported as "n/a" with the reason.

Run (from the repository root)
------------------------------
    python benchmarks/bench_kernels.py                  # everything (~8 min on 2 cores)
    python benchmarks/bench_kernels.py --quick          # smoke run: the two smallest sizes, few repeats
    python benchmarks/bench_kernels.py --dtype float64 --cells vector_gate --sizes 64,2,32,500
    python benchmarks/bench_kernels.py --no-torch --no-jax --cref-dir build/cref
Progress goes to stderr, the tables to stdout.
"""

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CREF_SOURCE = REPO.parent / "shared" / "bench-ref"  # /work/shared/bench-ref beside the repository

CELLS: tuple[str, ...] = ("leaky", "scalar_gate", "vector_gate")
SIZES: tuple[tuple[int, int, int, int], ...] = (
    (8, 2, 1, 100), (32, 2, 32, 100), (64, 2, 32, 500), (128, 8, 64, 200), (256, 8, 64, 100))
DTYPES: tuple[str, ...] = ("float64", "float32")
LEAKY_ALPHA = 0.8  # the built-in leaky cell's constant rate

# Agreement with the numpy reference kernel (relative to the largest reference entry).
# float64: 1e-8 (the implementations differ only by rounding, ~1e-14 here).
# float32: 1e-3 -- eps32 = 6e-8 accumulated over up to T = 500 steps forward and back, with
# differently ordered sums and fast-math tanh/exp; symgate's own float32 check allows
# 64 (T+1) eps32 = 1.9e-3 at T = 500.  Observed errors are ~1e-6.
TOLERANCE: dict[str, float] = {"float64": 1e-8, "float32": 1e-3}

SAMPLE_SECONDS = 2e-3  # a timing sample lasts at least this long (a batch of calls)
SETTLE_SECONDS = 0.1   # idle time before each block of samples (spinning worker threads go to sleep)
SEED = 20240917

# Columns of the tables: key, header.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("sg", "sg"), ("sg_bwd", "sg.bwd"), ("numpy", "numpy"), ("torch", "torch"),
    ("torch_compile", "t.comp"), ("jax", "jax"), ("cref", "C"))


def log(msg: str) -> None:
    """Progress, to stderr."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One benchmark case: parameters in symgate's names and shapes, inputs, readout, targets."""

    cell: str
    n: int
    m: int
    B: int
    T: int
    dtype: np.dtype
    params: dict[str, np.ndarray]
    x: np.ndarray   # (T, B, m)
    h0: np.ndarray  # (B, n)
    V: np.ndarray   # (1, n)
    y: np.ndarray   # (B, 1)

    @property
    def size(self) -> tuple[int, int, int, int]:
        return (self.n, self.m, self.B, self.T)


@dataclass
class Result:
    """Loss value and gradients (every parameter, and "V") in symgate's convention (mean over B*o)."""

    loss: float
    grads: dict[str, np.ndarray]


def param_shapes(sg_cell: Any, n: int, m: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the cell's parameters, from its symbolic dimensions ("n", "m", 1)."""
    dims: dict[Any, int] = {"n": n, "m": m, 1: 1}
    return {p.name: tuple(dims[d] for d in p.shape) for p in sg_cell.params}


def make_problem(sg_cell: Any, cell: str, size: tuple[int, int, int, int], dtype: str) -> Problem:
    """A reproducible problem: U(-1/sqrt(n), 1/sqrt(n)) parameters (PyTorch's default), N(0, 1) inputs."""
    n, m, B, T = size
    seed = SEED + 1000 * CELLS.index(cell) + SIZES.index(size) if size in SIZES and cell in CELLS else SEED
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(n)
    dt = np.dtype(dtype)
    # np.array, not np.ascontiguousarray: the latter turns the 0-d scalar parameter into shape (1,)
    params = {name: np.array(rng.uniform(-bound, bound, shape), dtype=dt, order="C")
              for name, shape in param_shapes(sg_cell, n, m).items()}
    V = np.ascontiguousarray(rng.uniform(-bound, bound, (1, n)), dtype=dt)
    x = np.ascontiguousarray(rng.standard_normal((T, B, m)), dtype=dt)
    y = np.ascontiguousarray(rng.standard_normal((B, 1)), dtype=dt)
    h0 = np.zeros((B, n), dtype=dt)
    return Problem(cell, n, m, B, T, dt, params, x, h0, V, y)


# --------------------------------------------------------------------------- FLOPs and peak
def matmul_flops(cell: str, n: int, m: int, B: int, T: int, o: int = 1) -> int:
    """FLOPs of the matrix products of forward + loss + BPTT, 2*M*N*K per product.

    Let R be the rows of the stacked matrices that read the state (and, equally, the input):
    leaky R = n (W; U), scalar_gate R = n + 1 (W and the one-row wg; U and ug),
    vector_gate R = 2n (W and Wg; U and Ug).  Then
        per step  forward recurrent product   (B x n) (n x R)  2 B R n
                  backward state adjoint      (B x R) (R x n)  2 B R n   (dL/dh_{t-1}, also for t = 1)
                  recurrent weight gradient   (R x B) (B x n)  2 B R n
        all steps input projections           (TB x m) (m x R) 2 T B R m
                  input weight gradient       (R x TB) (TB x m) 2 T B R m
        readout   V h_T, dL/dh_T, dL/dV        3 x 2 B o n
    total = 6 T B R n + 4 T B R m + 6 B o n.  Not counted: elementwise work and the input
    gradient dL/dx (2 T B R m), which symgate computes but the C reference and the torch/jax
    versions do not.
    """
    rows = {"leaky": n, "scalar_gate": n + 1, "vector_gate": 2 * n}[cell]
    return 6 * T * B * rows * n + 4 * T * B * rows * m + 6 * B * o * n


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gemm_peak(dtype: str, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a size x size x size product through numpy.matmul and scipy.linalg.blas (best of repeats)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    flops = 2.0 * size ** 3
    out = {"numpy": flops / best_seconds(lambda: a @ b, repeats) / 1e9}
    try:
        from scipy.linalg import blas

        gemm = blas.dgemm if dtype == "float64" else blas.sgemm
        af, bf = np.asfortranarray(a), np.asfortranarray(b)  # no layout copies inside the call
        out["scipy"] = flops / best_seconds(lambda: gemm(1.0, af, bf), repeats) / 1e9
    except ImportError as exc:
        log(f"scipy.linalg.blas not available: {exc}")
    return out


# --------------------------------------------------------------------------- background load
@dataclass
class CpuSnapshot:
    """Busy CPU seconds of the whole machine and of this process (and its children), at a time."""

    machine_busy: float
    own_busy: float
    when: float


def cpu_snapshot() -> CpuSnapshot | None:
    """From /proc/stat (Linux); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return CpuSnapshot(busy, sum(os.times()[:4]), time.monotonic())


def background_load(a: CpuSnapshot | None, b: CpuSnapshot | None) -> float | None:
    """Fraction of all CPUs used by *other* processes between two snapshots (0 = a quiet machine)."""
    if a is None or b is None or b.when <= a.when:
        return None
    other = (b.machine_busy - a.machine_busy) - (b.own_busy - a.own_busy)
    return max(0.0, other / ((b.when - a.when) * (os.cpu_count() or 1)))


def fmt_load(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    seconds: float  # median per call
    samples: int
    batch: int      # calls per sample


@dataclass
class Budget:
    """How many samples to take: at least ``min_samples``, more while within ``seconds`` per measurement."""

    min_samples: int
    max_samples: int
    seconds: float


def calibrate(fn: Callable[[], Any], budget: Budget) -> tuple[int, int]:
    """Calls per sample (so a sample lasts > SAMPLE_SECONDS) and samples (within the budget) for ``fn``."""
    one = _timed(fn)  # a warm-up call, not a sample (the correctness check made the first call: compiles are done)
    if one < SAMPLE_SECONDS:  # a better estimate of short calls
        k = max(1, int(SAMPLE_SECONDS / max(one, 1e-7)))
        t = time.perf_counter()
        for _ in range(k):
            fn()
        one = (time.perf_counter() - t) / k
    batch = max(1, math.ceil(SAMPLE_SECONDS / max(one, 1e-9)))
    fit = int(budget.seconds / (one * batch))
    return batch, max(budget.min_samples, min(budget.max_samples, fit))


def interleaved_medians(fns: Sequence[Callable[[], Any]], budget: Budget, blocks: int) -> list[Timing]:
    """Median time per call of each function, sampled in interleaved blocks.

    The samples of each function are split into ``blocks`` blocks taken in turn (f1 f2 ... f1 f2 ...),
    so a slow drift of the machine's speed (other virtual machines, clocks) affects all alike and
    their ratios stay meaningful.  Before each block the machine idles for SETTLE_SECONDS and
    the function makes one untimed call: worker threads of the previous implementation (OpenBLAS,
    OpenMP, XLA's pool) spin for a while after their last call, and would otherwise steal the
    cores from the next one (sampling call by call in turn made symgate and torch 3x slower).
    """
    plans = [calibrate(fn, budget) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for block in range(blocks):
            for fn, (batch, samples), out in zip(fns, plans, times):
                todo = samples * (block + 1) // blocks - len(out)
                if todo <= 0:
                    continue
                time.sleep(SETTLE_SECONDS)
                fn()
                for _ in range(todo):
                    t = time.perf_counter()
                    for _ in range(batch):
                        fn()
                    out.append((time.perf_counter() - t) / batch)
    finally:
        if was_enabled:
            gc.enable()
    return [Timing(statistics.median(ts), samples, batch) for ts, (batch, samples) in zip(times, plans)]


# --------------------------------------------------------------------------- implementations
@dataclass
class Prepared:
    """A ready-to-time implementation: ``run()`` is timed; ``result()`` reads the last run's output."""

    run: Callable[[], Any]
    result: Callable[[], Result]
    variant: str = ""


class Unavailable(Exception):
    """An alternative that cannot run here (not installed, not built, failed to compile)."""


@dataclass
class Impl:
    key: str
    prepare: Callable[[Problem], Prepared]
    cells: tuple[str, ...] = CELLS


def _copy_grads(params: dict[str, np.ndarray], V: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: np.array(v, copy=True) for k, v in params.items()}
    out["V"] = np.array(V, copy=True)
    return out


def sg_impls(sg: Any, cells: dict[str, Any]) -> list[Impl]:
    """symgate compiled (prepare and backward) and the numpy reference kernel.

    ``cells`` maps names to Cell objects, one per name, so sg.compile's per-cell cache is hit."""

    def cell_of(name: str) -> Any:
        return cells[name]

    def loss_of(p: Problem) -> Any:
        return sg.losses.last_mse(p.V, p.y)

    def prepared(p: Problem) -> Prepared:
        k = sg.compile(cell_of(p.cell), str(p.dtype))
        step = k.prepare(p.params, p.x, p.h0, loss=loss_of(p))

        def result() -> Result:
            g = step.grads
            return Result(float(g.value), _copy_grads(g.params, g.readout["V"]))

        return Prepared(step, result)

    def backward_with(kernel_of: Callable[[Any, str], Any]) -> Callable[[Problem], Prepared]:
        def prep(p: Problem) -> Prepared:
            k = kernel_of(cell_of(p.cell), str(p.dtype))
            loss = loss_of(p)
            last: list[Any] = [None]

            def run() -> None:
                last[0] = k.backward(p.params, p.x, p.h0, loss=loss)

            def result() -> Result:
                g = last[0]
                return Result(float(g.value), _copy_grads(g.params, g.readout["V"]))

            return Prepared(run, result)

        return prep

    return [Impl("sg", prepared), Impl("sg_bwd", backward_with(sg.compile)),
            Impl("numpy", backward_with(sg.reference_kernel))]


# ----- PyTorch
def torch_cell_loss(cell: str, P: dict[str, Any], x: Any, h0: Any, V: Any, y: Any, step: Callable[..., Any]) -> Any:
    """Last-state MSE of the cell run over x; ``step(h, *inputs_t, *recurrent_weights)`` is one update.

    The input projections of all steps are one matmul, split with ``unbind`` (indexing
    ``zx[t]`` instead makes autograd's backward O(T^2): each select allocates a full-size gradient).
    """
    h = h0
    if cell == "leaky":
        for z_t in (x @ P["U"].T + P["b"]).unbind(0):
            h = step(h, z_t, P["W"])
    else:
        gate_in = P["Ug"] if cell == "vector_gate" else P["ug"]
        gate_rec = P["Wg"] if cell == "vector_gate" else P["wg"]
        zs = (x @ P["U"].T + P["b"]).unbind(0)
        qs = (x @ gate_in.T + P["c"]).unbind(0)
        for z_t, q_t in zip(zs, qs):
            h = step(h, z_t, q_t, P["W"], gate_rec)
    return ((h @ V.T - y) ** 2).mean()


def torch_step(cell: str) -> Callable[..., Any]:
    """One update of the cell in torch (the gate of scalar_gate is (B, 1), broadcast over units)."""
    import torch

    if cell == "leaky":
        def leaky_step(h: Any, z_t: Any, W: Any) -> Any:
            return h + LEAKY_ALPHA * (torch.tanh(h @ W.T + z_t) - h)
        return leaky_step

    def gated_step(h: Any, z_t: Any, q_t: Any, W: Any, Wg: Any) -> Any:
        g = torch.sigmoid(h @ Wg.T + q_t)
        return h + g * (torch.tanh(h @ W.T + z_t) - h)
    return gated_step


@dataclass
class TorchSetup:
    """The torch module, its thread count and the compiled step functions (one per cell)."""

    torch: Any
    threads: int
    compile_mode: str  # "step" | "unrolled" | "off"
    compiled_steps: dict[str, Callable[..., Any]] = field(default_factory=dict)


def setup_torch(compile_mode: str) -> TorchSetup:
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"PyTorch not installed ({exc}); pip install torch==2.13.0") from None
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if compile_mode != "off":
        import torch._dynamo

        torch._dynamo.config.recompile_limit = 64  # sizes x dtypes x B == 1 specialisations
    return TorchSetup(torch, threads, compile_mode)


def torch_impl(ts: TorchSetup, compiled: bool) -> Callable[[Problem], Prepared]:
    torch = ts.torch

    def prep(p: Problem) -> Prepared:
        P = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in p.params.items()}
        V = torch.from_numpy(p.V.copy()).requires_grad_()
        x, h0, y = (torch.from_numpy(a.copy()) for a in (p.x, p.h0, p.y))
        leaves = [*P.values(), V]
        loss_fn: Callable[[], Any]
        variant = ""
        if not compiled:
            step = torch_step(p.cell)
            loss_fn = lambda: torch_cell_loss(p.cell, P, x, h0, V, y, step)
        elif ts.compile_mode == "step":
            if p.cell not in ts.compiled_steps:
                ts.compiled_steps[p.cell] = torch.compile(torch_step(p.cell), dynamic=True, fullgraph=True)
            step = ts.compiled_steps[p.cell]
            loss_fn = lambda: torch_cell_loss(p.cell, P, x, h0, V, y, step)
            variant = "step"
        else:
            whole = torch.compile(lambda: torch_cell_loss(p.cell, P, x, h0, V, y, torch_step(p.cell)), dynamic=False)
            loss_fn = whole
            variant = "unrolled"
        last: list[Any] = [None]

        def run() -> None:
            for t in leaves:
                t.grad = None
            L = loss_fn()
            L.backward()
            last[0] = L

        def result() -> Result:
            grads = {k: t.grad.detach().numpy().copy() for k, t in P.items()}
            grads["V"] = V.grad.detach().numpy().copy()
            return Result(float(last[0].item()), grads)

        return Prepared(run, result, variant)

    return prep


# ----- JAX
def setup_jax() -> Any:
    try:
        import jax
    except ImportError as exc:
        raise Unavailable(f"JAX not installed ({exc}); pip install jax") from None
    jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64; float32 stay float32
    return jax


def jax_loss(cell: str, jax: Any) -> Callable[..., Any]:
    """loss_fn(P, V, x, h0, y) for the cell, the time loop as ``jax.lax.scan``."""
    jnp = jax.numpy

    def loss_fn(P: dict[str, Any], V: Any, x: Any, h0: Any, y: Any) -> Any:
        zs = x @ P["U"].T + P["b"]
        if cell == "leaky":
            def body(h: Any, z_t: Any) -> tuple[Any, None]:
                return h + LEAKY_ALPHA * (jnp.tanh(h @ P["W"].T + z_t) - h), None
            h, _ = jax.lax.scan(body, h0, zs)
        else:
            Wg, Ug = (P["Wg"], P["Ug"]) if cell == "vector_gate" else (P["wg"], P["ug"])
            qs = x @ Ug.T + P["c"]

            def gbody(h: Any, inp: tuple[Any, Any]) -> tuple[Any, None]:
                z_t, q_t = inp
                g = jax.nn.sigmoid(h @ Wg.T + q_t)
                return h + g * (jnp.tanh(h @ P["W"].T + z_t) - h), None
            h, _ = jax.lax.scan(gbody, h0, (zs, qs))
        return jnp.mean((h @ V.T - y) ** 2)

    return loss_fn


def jax_impl(jax: Any) -> Callable[[Problem], Prepared]:
    def prep(p: Problem) -> Prepared:
        f = jax.jit(jax.value_and_grad(jax_loss(p.cell, jax), argnums=(0, 1)))
        P = {k: jax.device_put(v) for k, v in p.params.items()}
        V, x, h0, y = (jax.device_put(a) for a in (p.V, p.x, p.h0, p.y))
        last: list[Any] = [None]

        def run() -> None:
            last[0] = jax.block_until_ready(f(P, V, x, h0, y))

        def result() -> Result:
            value, (gP, gV) = last[0]
            grads = {k: np.asarray(v) for k, v in gP.items()}
            grads["V"] = np.asarray(gV)
            return Result(float(value), grads)

        return Prepared(run, result)

    return prep


# ----- the hand-written C reference
CREF_VARIANTS: tuple[str, ...] = ("loops", "blas", "omp")


def cref_impl(libdir: Path, variant: str) -> Callable[[Problem], Prepared]:
    """The C reference (vector gate).  Its loss is 0.5 sum_b (V.h_T[b] - y[b])^2 with V (n,), y (B,):
    symgate's loss (mean over B, o = 1) and gradients are the C ones times 2/B."""

    def prep(p: Problem) -> Prepared:
        if not (libdir / f"libgru_{'d' if p.dtype == np.float64 else 's'}_{variant}.so").exists():
            raise Unavailable(f"not built in {libdir}")
        if str(CREF_SOURCE) not in sys.path:
            sys.path.insert(0, str(CREF_SOURCE))
        try:
            from cref import CReference  # type: ignore[import-not-found]
        except ImportError as exc:
            raise Unavailable(f"cannot import cref from {CREF_SOURCE}: {exc}") from None
        ref = CReference(str(libdir), variant=variant, dtype=str(p.dtype))
        cp = {k: np.ascontiguousarray(v) for k, v in p.params.items()}
        cp["V"] = np.ascontiguousarray(p.V[0])
        run = ref.prepare(cp, p.x, np.ascontiguousarray(p.y[:, 0]), p.h0)
        scale = 2.0 / p.B

        def result() -> Result:
            value = run()
            grads = {k: scale * np.array(v) for k, v in run.grads.items()}
            grads["V"] = grads["V"].reshape(1, -1)
            return Result(scale * float(value), grads)

        return Prepared(run, result, variant)

    return prep


# --------------------------------------------------------------------------- checking
def rel_errors(res: Result, ref: Result) -> dict[str, float]:
    """max|g - g_ref| / max|g_ref| for every gradient of the reference, and the loss's relative error."""
    errs = {"loss": abs(res.loss - ref.loss) / max(abs(ref.loss), np.finfo(np.float64).tiny)}
    for name, g_ref in ref.grads.items():
        if name not in res.grads:
            raise KeyError(f"gradient {name!r} missing")
        g = np.asarray(res.grads[name], dtype=np.float64).reshape(g_ref.shape)
        denom = float(np.max(np.abs(g_ref))) or 1.0
        errs[name] = float(np.max(np.abs(g - g_ref))) / denom
    return errs


class Disagreement(Exception):
    """An implementation's loss or gradients differ from the numpy reference beyond TOLERANCE."""


# --------------------------------------------------------------------------- one case
@dataclass
class CaseResult:
    cell: str
    size: tuple[int, int, int, int]
    dtype: str
    times: dict[str, Timing] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)
    first_call: dict[str, float] = field(default_factory=dict)  # seconds of the first call (compiles)
    errors: dict[str, float] = field(default_factory=dict)      # worst relative error per implementation
    missing: dict[str, str] = field(default_factory=dict)       # reason per implementation
    background: float | None = None  # share of the CPUs other processes used while this case ran


@dataclass
class Checked:
    """An implementation that ran and agreed with the reference, ready to be timed."""

    column: str
    label: str
    prep: Prepared


def check_all(p: Problem, impls: dict[str, list[Impl]], ref: Result, case: CaseResult) -> list[Checked]:
    """Run every implementation once (its first call: JIT compiles), compare it with the reference.

    Implementations that cannot run are recorded in ``case.missing``; one that disagrees aborts.
    """
    tol = TOLERANCE[str(p.dtype)]
    ready: list[Checked] = []
    for column, candidates in impls.items():
        reasons = []
        for impl in candidates:
            if p.cell not in impl.cells:
                reasons.append("vector gate only")
                continue
            try:
                prep = impl.prepare(p)
                t0 = time.perf_counter()
                prep.run()
                first = time.perf_counter() - t0
                res = prep.result()
            except Unavailable as exc:
                reasons.append(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - an alternative failing is a result, not a crash
                reasons.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
                continue
            errs = rel_errors(res, ref)
            worst_name = max(errs, key=errs.__getitem__)
            label = column + (f"[{prep.variant}]" if prep.variant else "")
            log(f"    {label:<24s} worst rel. error {errs[worst_name]:.1e} ({worst_name}); first call {fmt_time(first)}")
            if not errs[worst_name] <= tol:
                raise Disagreement(
                    f"ABORT: {label} disagrees with the numpy reference on {p.cell} {p.size} {p.dtype}: "
                    f"relative error of {worst_name} is {errs[worst_name]:.3e} > {tol:.0e}\n"
                    f"all errors: {', '.join(f'{k}={v:.2e}' for k, v in errs.items())}")
            case.errors[column] = max(case.errors.get(column, 0.0), errs[worst_name])
            case.first_call[label] = first
            ready.append(Checked(column, label, prep))
        if not any(c.column == column for c in ready):
            case.missing[column] = "; ".join(dict.fromkeys(reasons)) or "not run"
    return ready


def run_case(p: Problem, impls: dict[str, list[Impl]], reference: Impl, budget: Budget) -> CaseResult:
    """Check every implementation against the numpy reference, then time them all, interleaved."""
    case = CaseResult(p.cell, p.size, str(p.dtype))
    start = cpu_snapshot()
    ref_prep = reference.prepare(p)
    ref_prep.run()
    ref = ref_prep.result()
    ref.grads = {k: np.asarray(v, dtype=np.float64) for k, v in ref.grads.items()}
    ready = check_all(p, impls, ref, case)
    log(f"    timing {len(ready)} implementations, interleaved in {budget.min_samples} blocks")
    timings = interleaved_medians([c.prep.run for c in ready], budget, blocks=budget.min_samples)
    for c, timing in zip(ready, timings):
        if c.label != c.column:
            log(f"      {c.label}: {fmt_time(timing.seconds)}")
        if c.column not in case.times or timing.seconds < case.times[c.column].seconds:  # best variant
            case.times[c.column] = timing
            case.variants[c.column] = c.prep.variant
    case.background = background_load(start, cpu_snapshot())
    return case


# --------------------------------------------------------------------------- formatting
def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale or unit == "µs":
            v = s / scale
            digits = 2 if v < 10 else 1 if v < 100 else 0
            return f"{v:.{digits}f} {unit}"
    raise AssertionError


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:.0f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(f"\n{title}")
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def size_str(size: tuple[int, int, int, int]) -> str:
    return "(" + ",".join(str(v) for v in size) + ")"


def print_dtype_tables(dtype: str, cases: list[CaseResult], peak: dict[str, float]) -> None:
    peak_best = max(peak.values()) if peak else float("nan")
    header = ["cell", "(n,m,B,T)"] + [h for _, h in COLUMNS] + ["sg GFLOP/s", "% peak", "max err", "other load"]
    rows = []
    for c in cases:
        row = [c.cell, size_str(c.size)]
        for key, _ in COLUMNS:
            if key in c.times:
                cell_txt = fmt_time(c.times[key].seconds)
                if key == "cref" and c.variants.get(key):
                    cell_txt += f" ({c.variants[key]})"
                row.append(cell_txt)
            else:
                row.append("n/a")
        if "sg" in c.times:
            gflops = matmul_flops(c.cell, *c.size) / c.times["sg"].seconds / 1e9
            row += [f"{gflops:.2f}", f"{100 * gflops / peak_best:.1f}"]
        else:
            row += ["n/a", "n/a"]
        row.append(f"{max(c.errors.values()):.0e}" if c.errors else "n/a")
        row.append(fmt_load(c.background))
        rows.append(row)
    peak_txt = ", ".join(f"{k} {v:.1f}" for k, v in peak.items())
    print_table(f"== {dtype}: forward + BPTT, median time per call (peak GEMM GFLOP/s: {peak_txt}; "
                f"% of the best, {peak_best:.1f}) ==", header, rows)

    ratio_cols = [(k, h) for k, h in COLUMNS if k != "sg"]
    header = ["cell", "(n,m,B,T)"] + [f"{h}/sg" for _, h in ratio_cols] + ["sg/C"]
    rows = []
    for c in cases:
        sg_t = c.times.get("sg")
        row = [c.cell, size_str(c.size)]
        for key, _ in ratio_cols:
            row.append(fmt_ratio(c.times[key].seconds / sg_t.seconds) if sg_t and key in c.times else "n/a")
        row.append(fmt_ratio(sg_t.seconds / c.times["cref"].seconds) if sg_t and "cref" in c.times else "n/a")
        rows.append(row)
    print_table(f"== {dtype}: ratios alternative / symgate-prepared (> 1: symgate faster); sg/C (< 1: symgate faster) ==",
                header, rows)


def print_notes(cases: list[CaseResult], global_missing: dict[str, str]) -> None:
    print("\nNotes")
    for key, reason in global_missing.items():
        print(f"  {dict(COLUMNS)[key]}: n/a -- {reason}")
    seen: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        for key, reason in c.missing.items():
            if key in global_missing:
                continue
            seen.setdefault((key, reason), []).append(f"{c.cell} {size_str(c.size)} {c.dtype}")
    for (key, reason), where in seen.items():
        shown = ", ".join(where[:4]) + (f" (+{len(where) - 4} more)" if len(where) > 4 else "")
        print(f"  {dict(COLUMNS)[key]}: n/a -- {reason} [{shown}]")
    slow_first = sorted(((v, k, c) for c in cases for k, v in c.first_call.items()
                         if k.startswith(("torch_compile", "jax"))), key=lambda t: -t[0])[:6]
    if slow_first:
        print("  first-call (compile) times excluded from the timings, the longest:")
        for v, k, c in slow_first:
            print(f"    {k:<24s} {c.cell} {size_str(c.size)} {c.dtype}: {v:.1f} s")
    samples = [t.samples for c in cases for t in c.times.values()]
    if samples:
        print(f"  samples per median: {min(samples)}..{max(samples)}; each sample >= {SAMPLE_SECONDS * 1e3:.0f} ms of batched calls")


# --------------------------------------------------------------------------- compile time of a new cell
def new_cell(sg: Any, kval: float) -> Any:
    """A cell no cache has seen: the constant ``k`` (drawn per run) scales the gate's pre-activation."""

    @sg.cell
    # symgate's annotations are specs, not types (hence the type: ignore for mypy)
    def bench_new_gate(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"),  # type: ignore[valid-type]
                       U: sg.Matrix("n", "m"), Wg: sg.Matrix("n", "n"), b: sg.Vector("n"),  # type: ignore[valid-type]
                       c: sg.Vector("n"), k: sg.Constant(kval)) -> Any:  # type: ignore[valid-type]
        g = sg.sigmoid(k * (Wg @ h) + c)
        phi = sg.tanh(W @ h + U @ x + b)
        return (1 - g) * h + g * phi

    return bench_new_gate


def compile_child(kval: float) -> None:
    """Runs in a fresh subprocess: time ``sg.compile`` of the new cell (the import is not timed)."""
    t0 = time.perf_counter()
    import symgate as sg

    t_import = time.perf_counter() - t0
    # a compiled kernel links SciPy's BLAS through scipy.linalg.cython_blas; its first import in a
    # process (scipy.linalg) is paid once, by whichever kernel loads first: time it separately
    t0 = time.perf_counter()
    import scipy.linalg.cython_blas  # noqa: F401

    t_blas = time.perf_counter() - t0
    cell = new_cell(sg, kval)
    t1 = time.perf_counter()
    kernel = sg.compile(cell, "float64")
    t_compile = time.perf_counter() - t1
    # the same again in this process (a new Cell object): one-time imports and warm-up are done now
    again = new_cell(sg, kval)
    t2 = time.perf_counter()
    sg.compile(again, "float64")
    t_again = time.perf_counter() - t2
    print(json.dumps({"compile_s": t_compile, "again_s": t_again, "import_s": t_import, "blas_import_s": t_blas,
                      "backend": kernel.backend}))


def measure_compile_times() -> dict[str, Any]:
    """Cold (empty cache) and warm (filled cache) ``sg.compile`` of a new cell, each in a fresh subprocess."""
    kval = round(random.SystemRandom().uniform(0.5, 2.0), 9)
    out: dict[str, Any] = {"k": kval}
    with tempfile.TemporaryDirectory(prefix="sgbench-cache-") as cache:
        env = dict(os.environ, SYMGATE_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        for label in ("cold", "warm"):
            log(f"  {label}: sg.compile(new cell) in a fresh subprocess, SYMGATE_CACHE_DIR={cache}")
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compile-child", repr(kval)],
                                  check=False, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                out[label] = None
                out[f"{label}_error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
                continue
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            out[f"{label}_entries"] = sum(1 for p in Path(cache).rglob("manifest.json"))
    return out


def print_compile_times(ct: dict[str, Any]) -> None:
    print(f"\n== compile time of a new cell (bench_new_gate, k = {ct['k']}; float64; fresh subprocesses) ==")
    for label, target in (("cold", 10.0), ("warm", 0.050)):
        r = ct.get(label)
        if r is None:
            print(f"  {label}: failed -- {ct.get(f'{label}_error', 'not run')}")
            continue
        verdict = "OK" if r["compile_s"] < target else "MISSED"
        what = "empty cache: generate + Cython + C compile" if label == "cold" else "cache filled by the cold run: generate + load"
        print(f"  {label:<4s} sg.compile: {fmt_time(r['compile_s']):>10s}   target < {fmt_time(target)}: {verdict}   "
              f"({what}; cache entries after: {ct.get(f'{label}_entries')}; import symgate {fmt_time(r['import_s'])}, not included)")
    warm = ct.get("warm")
    if warm is not None:
        print(f"  (both exclude the first import of scipy.linalg.cython_blas in a fresh process, SciPy's BLAS, paid once per "
              f"process by whichever kernel loads first: {fmt_time(warm['blas_import_s'])})")
        print(f"  warm sg.compile of another new Cell object in the same process: {fmt_time(warm['again_s'])}")


# --------------------------------------------------------------------------- main
def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = [int(v) for v in text.replace("(", "").replace(")", "").split(",")]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be n,m,B,T with positive integers, got {text!r}")
    return (parts[0], parts[1], parts[2], parts[3])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time forward + BPTT of symgate's compiled kernels against alternatives.")
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes, few repeats (a smoke run)")
    ap.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    ap.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    ap.add_argument("--sizes", nargs="+", type=parse_size, metavar="n,m,B,T", help="default: the five standard sizes")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch (eager and compiled)")
    ap.add_argument("--no-jax", action="store_true", help="skip JAX")
    ap.add_argument("--torch-compile", choices=("step", "unrolled", "off"),
                    help="torch.compile variant: the cell update compiled once per cell (default), the whole "
                         "unrolled sequence per case (slow to compile), or none (default with --quick)")
    ap.add_argument("--cref-dir", type=Path, default=REPO / "build" / "cref",
                    help="folder of the built C reference libraries (default: build/cref)")
    ap.add_argument("--no-compile-time", action="store_true", help="skip the cold/warm compile measurement")
    ap.add_argument("--compile-child", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def make_budget(quick: bool) -> Budget:
    """Samples per median: at least 7 (3 with --quick); fast calls get up to 41 within ~1.5 s."""
    return Budget(3, 5, 0.2) if quick else Budget(7, 41, 1.5)


def machine_info(sg: Any) -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scipy

    return (f"{cpu}; {os.cpu_count()} cores; Python {platform.python_version()}; numpy {np.__version__}; "
            f"scipy {scipy.__version__}; symgate from {Path(sg.__file__).parent}")


def build_impls(args: argparse.Namespace, sg: Any, cells: dict[str, Any]
                ) -> tuple[dict[str, list[Impl]], Impl, dict[str, str], list[str]]:
    """Implementations per column, the reference, columns unavailable everywhere (with reasons), version notes."""
    sg_list = sg_impls(sg, cells)
    impls: dict[str, list[Impl]] = {i.key: [i] for i in sg_list}
    reference = sg_list[2]
    missing: dict[str, str] = {}
    versions: list[str] = []
    compile_mode = args.torch_compile or ("off" if args.quick else "step")
    if args.no_torch:
        missing["torch"] = missing["torch_compile"] = "--no-torch"
    else:
        try:
            ts = setup_torch(compile_mode)
            impls["torch"] = [Impl("torch", torch_impl(ts, compiled=False))]
            versions.append(f"torch {ts.torch.__version__} ({ts.threads} threads; torch.compile: {compile_mode})")
            if compile_mode == "off":
                missing["torch_compile"] = ("skipped with --quick (use --torch-compile step)" if args.quick and not args.torch_compile
                                            else "--torch-compile off")
            else:
                impls["torch_compile"] = [Impl("torch_compile", torch_impl(ts, compiled=True))]
        except Unavailable as exc:
            missing["torch"] = missing["torch_compile"] = str(exc)
    if args.no_jax:
        missing["jax"] = "--no-jax"
    else:
        try:
            jax = setup_jax()
            impls["jax"] = [Impl("jax", jax_impl(jax))]
            versions.append(f"jax {jax.__version__} ({jax.devices()[0].platform})")
        except Unavailable as exc:
            missing["jax"] = str(exc)
    libdir = args.cref_dir if args.cref_dir.is_absolute() else (Path.cwd() / args.cref_dir)
    if not (CREF_SOURCE / "cref.py").exists():
        missing["cref"] = f"{CREF_SOURCE}/cref.py not found"
    elif not any(libdir.glob("libgru_*.so")):
        missing["cref"] = (f"not built in {libdir}: make -f {CREF_SOURCE}/Makefile OUT={libdir} PY={sys.executable}")
    else:
        impls["cref"] = [Impl("cref", cref_impl(libdir, v), cells=("vector_gate",)) for v in CREF_VARIANTS]
        versions.append(f"C reference from {libdir} (variants {', '.join(CREF_VARIANTS)}; best shown)")
    return impls, reference, missing, versions


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_child is not None:
        compile_child(args.compile_child)
        return 0
    import symgate as sg

    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    sizes = list(args.sizes) if args.sizes else list(SIZES[:2] if args.quick else SIZES)
    cells = {name: sg.cells.builtin(name) for name in args.cells}
    impls, reference, global_missing, versions = build_impls(args, sg, cells)
    budget = make_budget(args.quick)
    print(f"symgate kernel benchmark: forward + last-state MSE + full BPTT\nmachine: {machine_info(sg)}")
    for v in versions:
        print(f"  {v}")

    before = cpu_snapshot()
    time.sleep(1.0)
    idle_load = background_load(before, cpu_snapshot())
    print(f"  other processes' CPU use before the run: {fmt_load(idle_load)} of {os.cpu_count()} CPUs")
    run_start = cpu_snapshot()
    t_start = time.perf_counter()
    results: dict[str, list[CaseResult]] = {}
    peaks: dict[str, dict[str, float]] = {}
    n_cases = len(dtypes) * len(args.cells) * len(sizes)
    done = 0
    try:
        for dtype in dtypes:
            log(f"measuring the {dtype} GEMM peak (2048^3, numpy and scipy.linalg.blas)")
            peaks[dtype] = gemm_peak(dtype)
            log("  " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks[dtype].items()))
            for cell in args.cells:
                sg_cell = cells[cell]
                log(f"compiling {cell} {dtype} (cached on disk)")
                t0 = time.perf_counter()
                sg.compile(sg_cell, dtype)
                log(f"  {fmt_time(time.perf_counter() - t0)}")
                for size in sizes:
                    done += 1
                    log(f"[{done}/{n_cases}] {cell} {size_str(size)} {dtype}  ({time.perf_counter() - t_start:.0f} s elapsed)")
                    p = make_problem(sg_cell, cell, size, dtype)
                    active = {k: v for k, v in impls.items() if k not in global_missing}
                    results.setdefault(dtype, []).append(run_case(p, active, reference, budget))
    except Disagreement as exc:
        print(str(exc), file=sys.stderr)
        return 1

    print("\nTimes: median per call of forward + loss + BPTT (all parameter gradients and the readout's).")
    print("sg = symgate compiled via prepare (main), sg.bwd = via backward(), numpy = symgate's numpy reference,")
    print("torch = PyTorch eager autograd, t.comp = torch.compile, jax = jit(value_and_grad) over lax.scan,")
    print("C = hand-written C reference (vector gate; best variant in parentheses).  GFLOP/s: matrix-product")
    print("FLOPs only (matmul_flops: 6 T B R n + 4 T B R m + 6 B n, R = n | n+1 | 2n) / symgate-prepared time.")
    print(f"Gradients checked against the numpy reference: float64 <= {TOLERANCE['float64']:.0e}, "
          f"float32 <= {TOLERANCE['float32']:.0e} relative (max err column = worst over implementations).")
    for dtype in dtypes:
        print_dtype_tables(dtype, results.get(dtype, []), peaks.get(dtype, {}))
    print_notes([c for d in dtypes for c in results.get(d, [])], global_missing)

    run_load = background_load(run_start, cpu_snapshot())
    if not args.no_compile_time:
        log("compile time of a new cell")
        print_compile_times(measure_compile_times())
    print(f"\ntotal run time {time.perf_counter() - t_start:.0f} s; other processes used {fmt_load(run_load)} "
          f"of the CPUs during the timings")
    if run_load is not None and run_load > 0.1:
        print("WARNING: the machine was not quiet (see the 'other load' column): timings of multi-threaded "
              "code (BLAS, torch, XLA) are inflated where other processes competed for the cores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
