"""Compiled kernels: the reference kernels' API, run by a generated Cython program.

:class:`CompiledKernel` is a :class:`~symgate.ReferenceKernel` whose forward pass,
losses and BPTT run in one generated, cached Cython module (see
:mod:`symgate._codegen`); argument checking, JVPs and dense Jacobians are shared with
the reference implementation (JVPs and Jacobians read the compiled forward pass).

For training loops, :meth:`CompiledKernel.prepare` validates and binds the arrays once
and returns a :class:`PreparedStep`: each call then runs forward, loss and BPTT in a
single compiled call on the *current contents* of the bound arrays.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Mapping

import numpy as np

from ._aot import load as load_aot
from ._build import SymgateWarning, build_module
from ._cell import Cell, Dim
from ._codegen import BACKWARD, FORWARD, JVP, LOSS_LAST, LOSS_STEP, STEP_WGRAD_MIN_B, GeneratedSource, Slot, generate
from ._errors import CellSpecError, NonFiniteError, NumericalError, SymgateError
from ._reference import Gradients, ReferenceKernel, Trajectory
from ._validate import check_dtype
from .losses import LastMSE, Loss, StepMSE

__all__ = ["CompiledKernel", "PreparedStep", "compile", "kernels"]


class _Run:
    """The arrays of one program run and the three integer vectors ``run`` takes."""

    def __init__(self, k: "CompiledKernel", params: Mapping[str, np.ndarray], x: np.ndarray, h0: Mapping[str, np.ndarray],
                 sizes: Mapping[Dim, int], *, store_all: bool, loss: Loss | None, cots: Mapping[str, np.ndarray] | None,
                 backward: bool, pool: dict[Any, np.ndarray] | None = None,
                 tangents: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], np.ndarray] | None = None,
                 x_grad: bool = True) -> None:
        g = k.generated
        dt = k.dtype
        T, B, _ = x.shape
        self.T, self.B = T, B
        step = isinstance(loss, StepMSE)
        o = loss.V.shape[0] if loss is not None else 1
        width = {("R" if not grp.static else "RS", grp.index): sum(sizes[r] for r in grp.rows) for grp in g.groups}
        needed = g.needed
        group_stored = {grp.index: store_all or any(m in needed for m in grp.members) for grp in g.groups if not grp.static}

        def shape(sl: Slot) -> tuple[int, ...]:
            out = []
            for tok in sl.shape:
                if tok == "T":
                    out.append(T)
                elif tok == "T+1":
                    out.append(T + 1)
                elif tok == "B":
                    out.append(B)
                elif tok == "o":
                    out.append(o)
                elif isinstance(tok, tuple):
                    out.append(width[tok])
                else:
                    out.append(sizes[tok])
            return tuple(out)

        arrays: dict[str, np.ndarray | None] = {}
        check: dict[str, bool] = {}
        results = {"grad_x", "grad_V", "carry", "grad_stack", "grad"}
        owned: list[np.ndarray] = []  # arrays this run allocates (workspaces and results)

        def empty(sl: Slot, shp: tuple[int, ...]) -> np.ndarray:
            # workspace arrays (never returned to the caller) are reused between calls
            if pool is None or sl.role in results:
                a = np.empty(shp, dtype=dt)
            else:
                key = (sl.code, shp)
                if key not in pool:
                    pool[key] = np.empty(shp, dtype=dt)
                a = pool[key]
            owned.append(a)
            return a

        # batches that take the per-step products may keep some (T, B, .) arrays as one reused row
        per_step = B >= STEP_WGRAD_MIN_B
        gx = x_grad or g.x_elementwise  # the input gradient reads every row of the adjoints
        bwd_roles = {"carry", "carry2", "adj", "static_adj", "static_group_adj", "group_adj", "grad_stack", "grad_x", "grad"}
        for sl in g.slots:
            a: np.ndarray | None
            chk = False
            if sl.role == "x":
                a, chk = x, True
            elif sl.role == "param":
                a, chk = params[sl.key], True
            elif sl.role == "h0":
                a, chk = h0[sl.key], True
            elif sl.role == "loss_V":
                a, chk = (loss.V, True) if loss is not None else (None, False)
            elif sl.role == "loss_y":
                a, chk = (loss.y, True) if loss is not None else (None, False)
            elif sl.role == "cot":
                if cots is not None:
                    a, chk = cots[sl.key], True
                elif step and sl.key == g.states[0]:
                    a = empty(sl, (T, B, sizes[k.cell.states[0].dim]))
                else:
                    a = None
            elif sl.role == "node":
                full = store_all or sl.key in needed
                a = empty(sl, shape(sl) if full else (B, sizes[sl.shape[-1]]))
            elif sl.role == "group":
                a = empty(sl, shape(sl) if group_stored[sl.key.index] else shape(sl)[1:])
            elif sl.role == "static_group" and per_step and not store_all and sl.code in g.scratch:
                a = empty(sl, shape(sl)[1:])  # one row, rewritten every step (stride 0)
            elif sl.role == "group_adj" and backward and per_step and not gx and sl.code in g.scratch:
                a = empty(sl, shape(sl)[1:])  # one row, rewritten every step (stride 0)
            elif sl.role == "static_group_adj" and sl.key.index in g.aliases:
                a = None  # shares the dynamic twin's adjoint buffer
            elif sl.role == "grad_x" and not gx:
                a = None
            elif sl.role in bwd_roles:
                a = empty(sl, shape(sl)) if backward else None
            elif sl.role == "grad_V":
                a = empty(sl, shape(sl)) if loss is not None else None
            elif sl.role == "loss_res":
                a = empty(sl, (T, B, o) if step else (B, o)) if loss is not None else None
            elif sl.role.startswith("tan_"):
                if tangents is None:
                    a = None
                elif sl.role == "tan_x":
                    a = tangents[2]
                elif sl.role == "tan_param":
                    a = np.ascontiguousarray(tangents[0][sl.key], dtype=dt).reshape(shape(sl))
                elif sl.role == "tan_h0":
                    a = tangents[1][sl.key]
                elif sl.role == "tan_state":
                    a = np.empty(shape(sl), dtype=dt)
                    owned.append(a)
                else:
                    a = empty(sl, shape(sl))
            else:  # state, static, stack, stack_t, static_group
                a = empty(sl, shape(sl))
            arrays[sl.code] = a
            check[sl.code] = chk
        self.arrays = arrays
        self.loss_value = np.zeros(1, dtype=np.float64)
        ptr = [0 if a is None else a.__array_interface__["data"][0] for a in arrays.values()]
        ptr.append(self.loss_value.__array_interface__["data"][0])
        self.ptr = np.array(ptr, dtype=np.longlong)
        self.sz = np.array([(a.size if a is not None and (check[sl.code] or sl.role in results) else 0)
                            for sl, a in zip(g.slots, arrays.values())], dtype=np.longlong)
        iv: list[int] = []
        for it in g.ints:
            if it[0] == "T":
                iv.append(T)
            elif it[0] == "B":
                iv.append(B)
            elif it[0] == "o":
                iv.append(o)
            elif it[0] == "dim":
                iv.append(sizes[it[1]])
            elif it[0] in ("R", "RS"):
                iv.append(width[(it[0], it[1])])
            elif it[0] == "stride":
                a = arrays[it[1]]
                iv.append(0 if a is None or a.ndim == 2 else a.shape[1] * a.shape[2])
            elif it[0] == "has_cot":
                iv.append(1 if cots is not None else 0)
        self.iv = np.array(iv, dtype=np.longlong)
        self.x_grad = x_grad
        self.addr = (self.ptr.ctypes.data, self.iv.ctypes.data, self.sz.ctypes.data)
        self.what = FORWARD | (BACKWARD if backward else 0) | (JVP if tangents is not None else 0) | \
            (0 if loss is None else (LOSS_STEP if step else LOSS_LAST))
        self.kernel = k
        self.owned = owned

    def __call__(self) -> None:
        fill = self.kernel.workspace_fill
        if fill is not None:  # a testing aid: a value read before the program writes it shows up
            for a in self.owned:
                a.fill(fill)
        code = self.kernel.module.run(*self.addr, self.what)
        if code != 0:
            self.kernel._raise(code, self)


class CompiledKernel(ReferenceKernel):
    """A kernel whose forward pass, losses and BPTT are one compiled program (float32 or float64)."""

    backend = "compiled"

    #: Testing aid: when set (e.g. to NaN), every array a run allocates -- workspaces reused
    #: between calls and result buffers -- is filled with this value before each call, so a
    #: value the program reads before writing it (a stale buffer) changes the result.
    workspace_fill: float | None = None

    def __init__(self, cell: Cell, dtype: Any = "float64") -> None:
        super().__init__(cell, dtype)
        if self.dtype not in (np.dtype("float32"), np.dtype("float64")):
            raise CellSpecError(f"compiled kernels are float32 or float64, not {self.dtype}")
        self.generated: GeneratedSource = generate(cell, self.dtype)
        module = load_aot(self.generated.content_hash)
        #: where the compiled module came from: "ahead-of-time" (built at install) or "cache"
        self.origin = "ahead-of-time" if module is not None else "cache"
        self.module = module if module is not None else build_module(self.generated.source, extra=(self.dtype.str,))
        self._pools = threading.local()  # per-thread workspace arrays of minimal (BPTT) runs

    def _pool(self) -> dict[Any, np.ndarray]:
        pool = getattr(self._pools, "arrays", None)
        if pool is None:
            pool = self._pools.arrays = {}
        if len(pool) > 256:  # many different shapes: start over rather than grow without bound
            pool.clear()
        return pool

    @property
    def source(self) -> str:
        """The generated Cython source."""
        return self.generated.source

    # ------------------------------------------------------------------ errors
    def _raise(self, code: int, run: _Run) -> None:
        g = self.generated
        if code > 0:
            sl = g.slots[code - 1]
            a = run.arrays[sl.code]
            what = {"x": "x", "param": f"params[{sl.key!r}]", "h0": f"h0[{sl.key!r}]", "loss_V": "loss V",
                    "loss_y": "loss y", "cot": f"cotangents[{sl.key!r}]"}.get(sl.role, sl.code)
            assert a is not None
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0]) if a.ndim else ()
            raise NonFiniteError(f"{what} contains a non-finite value ({a[bad]!r} at index {bad})")
        raise NumericalError(
            f"cell {self.cell.name!r}: the compiled computation produced a non-finite value from finite inputs "
            "(overflow: exploding states or gradients); scale the parameters or inputs down")

    # ------------------------------------------------------------------ forward
    def _forward(self, params: dict[str, np.ndarray], x: np.ndarray, h0: dict[str, np.ndarray], sizes: dict[Dim, int]) -> Trajectory:
        run = _Run(self, params, x, h0, sizes, store_all=True, loss=None, cots=None, backward=False)
        run()
        return self._trajectory(run, x, h0, sizes)

    def _trajectory(self, run: _Run, x: np.ndarray, h0: dict[str, np.ndarray], sizes: Mapping[Dim, int]) -> Trajectory:
        g = self.generated
        arr = run.arrays
        states = {s: arr[f"S{k}"][1:] for k, s in enumerate(g.states)}  # type: ignore[index]
        nodes: dict[str, np.ndarray] = {}
        dyn: dict[str, np.ndarray] = {}
        codes = {sl.key: sl.code for sl in g.slots if sl.role in ("node", "static")}
        for grp in g.groups:
            buf = arr[f"Y{grp.index}" if grp.static else f"Z{grp.index}"]
            off = 0
            for mem, r in zip(grp.members, grp.rows):
                w = sizes[r]
                (nodes if grp.static else dyn)[mem] = np.ascontiguousarray(buf[..., off:off + w])  # type: ignore[index]
                off += w
        for nm in g.static_nodes:
            nodes[nm] = arr[codes[nm]]  # type: ignore[assignment]
        for nm in g.nodes:
            dyn[nm] = arr[codes[nm]]  # type: ignore[assignment]
        order = [st.name for st in self._plan if st.kind != "out"]
        static_names = {st.name for st in self._plan if st.static}
        out = {nm: nodes[nm] for nm in order if nm in static_names}
        out.update({nm: dyn[nm] for nm in order if nm not in static_names})
        return Trajectory(states, out, h0, x, dict(sizes))

    # ------------------------------------------------------------------ BPTT
    def _gradients(self, run: _Run, sizes: Mapping[Dim, int]) -> Gradients:
        g = self.generated
        arr = run.arrays
        grads: dict[str, np.ndarray] = {}
        for p in self.cell.params:
            if p.kind == "matrix":
                grads[p.name] = np.zeros(tuple(sizes[d] for d in p.shape), dtype=self.dtype)
        for grp in g.groups:
            buf = arr[f"GU{grp.index}" if grp.static else f"GW{grp.index}"]
            off = 0
            for mat, r in zip(grp.matrices, grp.rows):
                w = sizes[r]
                grads[mat] += buf[off:off + w]  # type: ignore[index]
                off += w
        for sl in g.slots:
            if sl.role == "grad":
                a = arr[sl.code]
                grads[sl.key] = a.reshape(()).copy() if sl.shape == (1,) else a  # type: ignore[union-attr]
        grads = {p.name: grads[p.name] for p in self.cell.params}
        h0 = {s: arr[f"CA{k}"] for k, s in enumerate(g.states)}
        return Gradients(grads, h0, arr["GX"] if run.x_grad else None)  # type: ignore[arg-type]

    def backward(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *, loss: Loss) -> Gradients:
        """Full BPTT (one compiled call): the loss value and its gradient w.r.t. every parameter, ``h0``, ``x`` and the readout."""
        params, x, h0d, sizes = self._check(params, x, h0)
        if not isinstance(loss, (LastMSE, StepMSE)):
            raise CellSpecError(f"loss must be a symgate loss (symgate.losses.last_mse / step_mse), got {type(loss).__name__}")
        T, B, _ = x.shape
        loss.check(T, B, sizes[self.cell.states[0].dim], self.dtype)
        run = _Run(self, params, x, h0d, sizes, store_all=False, loss=loss, cots=None, backward=True, pool=self._pool())
        run()
        out = self._gradients(run, sizes)
        out.value = self.dtype.type(run.loss_value[0])
        out.readout = {"V": run.arrays["GV"]}  # type: ignore[dict-item]
        return out

    def vjp(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any, cotangents: Any, *, trajectory: Trajectory | None = None) -> Gradients:
        """Reverse mode (BPTT): pull per-step state cotangents ``{state: (T, B, d)}`` back to
        parameters, initial states and inputs.  (The forward pass is recomputed in compiled
        code; ``trajectory`` is accepted for API compatibility and not read.)"""
        params, x, h0d, sizes = self._check(params, x, h0)
        T, B, _ = x.shape
        cots = self._check_cot(cotangents, sizes, T, B)
        run = _Run(self, params, x, h0d, sizes, store_all=False, loss=None, cots=cots, backward=True, pool=self._pool())
        run()
        return self._gradients(run, sizes)

    def _jvp_checked(self, params: dict[str, np.ndarray], x: np.ndarray, h0: dict[str, np.ndarray], sizes: dict[Dim, int],
                     tp: Mapping[str, np.ndarray], th0: Mapping[str, np.ndarray], tx: np.ndarray) -> dict[str, np.ndarray]:
        """Forward mode in compiled code: one call runs the forward pass and the tangent recursion."""
        run = _Run(self, params, x, h0, sizes, store_all=True, loss=None, cots=None, backward=False,
                   tangents=(tp, th0, tx))
        run()
        return {s: run.arrays[f"TS{k}"][1:] for k, s in enumerate(self.generated.states)}  # type: ignore[index]

    def prepare(self, params: Mapping[str, np.ndarray], x: np.ndarray, h0: Any = None, *, loss: Loss,
                x_grad: bool = False) -> "PreparedStep":
        """Bind arrays once for repeated forward + loss + BPTT calls (a training loop).

        The arrays are checked now (shapes, dtype, layout) and bound *by reference*:
        update them in place between calls (``W -= lr * g``, ``x[...] = batch``) and each
        call sees their current contents; NaN/inf are detected on every call.  The gradient
        with respect to the inputs is computed only with ``x_grad=True`` (``grads.x`` is
        None otherwise).
        """
        params_c, x_c, h0d, sizes = self._check(params, x, h0)
        if not isinstance(loss, (LastMSE, StepMSE)):
            raise CellSpecError(f"loss must be a symgate loss (symgate.losses.last_mse / step_mse), got {type(loss).__name__}")
        T, B, _ = x_c.shape
        loss.check(T, B, sizes[self.cell.states[0].dim], self.dtype)
        for nm, a in params_c.items():
            if a is not params[nm] and not (isinstance(params[nm], np.ndarray) and np.shares_memory(a, params[nm])):
                raise CellSpecError(f"params[{nm!r}] must be a numpy array (prepare binds it by reference)")
        return PreparedStep(self, _Run(self, params_c, x_c, h0d, sizes, store_all=False, loss=loss, cots=None, backward=True,
                                       x_grad=x_grad), sizes)

    def __repr__(self) -> str:
        return f"<CompiledKernel {self.cell.name!r} {self.dtype}>"


class PreparedStep:
    """Forward + loss + BPTT on bound arrays, one compiled call per ``__call__``.

    ``step()`` returns the loss value; ``step.grads`` (a :class:`~symgate.Gradients`,
    refreshed by every call, arrays reused) holds the gradients of every parameter,
    ``h0``, ``x`` and the readout ``V``.
    """

    def __init__(self, kernel: CompiledKernel, run: _Run, sizes: Mapping[Dim, int]) -> None:
        self.kernel = kernel
        self._run = run
        self._sizes = sizes
        self._call = kernel.module.run
        with np.errstate(all="ignore"):  # the output buffers are not written yet
            self.grads = kernel._gradients(run, sizes)
        self.grads.readout = {"V": run.arrays["GV"]}  # type: ignore[dict-item]
        # matrices that appear in one group only are views of the stacked gradients; others are summed per call
        seen: dict[str, int] = {}
        for grp in kernel.generated.groups:
            for mat in grp.matrices:
                seen[mat] = seen.get(mat, 0) + 1
        self._views = all(v == 1 for v in seen.values())
        if self._views:
            for grp in kernel.generated.groups:
                buf = run.arrays[f"GU{grp.index}" if grp.static else f"GW{grp.index}"]
                off = 0
                for mat, r in zip(grp.matrices, grp.rows):
                    w = sizes[r]
                    self.grads.params[mat] = buf[off:off + w]  # type: ignore[index]
                    off += w
        self._scalars = [sl for sl in kernel.generated.slots if sl.role == "grad" and sl.shape == (1,)]

    def __call__(self) -> Any:
        r = self._run
        if self.kernel.workspace_fill is not None:
            for a in r.owned:
                a.fill(self.kernel.workspace_fill)
        code = self._call(*r.addr, r.what)
        if code != 0:
            self.kernel._raise(code, r)
        if not self._views:
            fresh = self.kernel._gradients(r, self._sizes)
            self.grads.params.update(fresh.params)
        for sl in self._scalars:
            self.grads.params[sl.key][...] = r.arrays[sl.code][0]  # type: ignore[index]
        value = r.loss_value[0]
        self.grads.value = value
        return value

    def __repr__(self) -> str:
        return f"<PreparedStep {self.kernel.cell.name!r} T={self._run.T} B={self._run.B}>"


def compile(cell: Cell, dtype: Any = "float64") -> CompiledKernel:  # noqa: A001 - the package's public name
    """Generate, compile (or load from the cache) and return the kernel of ``cell`` for ``dtype``."""
    if not isinstance(cell, Cell):
        raise CellSpecError(f"expected a symgate Cell, got {type(cell).__name__}")
    dt = check_dtype(dtype)
    key = ("kernel", "compiled", dt.str)
    if key not in cell._index:
        cell._index[key] = CompiledKernel(cell, dt)
    return cell._index[key]


def kernels(cell: Cell, dtype: Any = "float64") -> ReferenceKernel:
    """The compiled kernel when a compiler is available, else the numpy reference kernel.

    The returned object's ``backend`` says which (``"compiled"`` or ``"numpy-reference"``).
    """
    from ._reference import reference_kernel

    try:
        return compile(cell, dtype)
    except SymgateError:
        raise
    except (OSError, ImportError) as exc:  # no C compiler (or no Cython): the numpy reference still works
        warnings.warn(f"cell {cell.name!r}: no compiled kernel ({type(exc).__name__}: {exc}); using the numpy reference kernel",
                      SymgateWarning, stacklevel=2)
        return reference_kernel(cell, dtype)
