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
from ._build import CompilerNotFoundError, SymgateWarning, build_module
from ._cell import Cell, Dim
from ._codegen import BACKWARD, DEFAULT_POLICY, FORWARD, JVP, LOSS_LAST, LOSS_STEP, GeneratedSource, KernelPlan, Policy, RunOptions, Slot, cell_plan, generate, run_plan, structural_decisions
from ._errors import CellSpecError, ConcurrentUseError, DTypeError, NonFiniteError, NumericalError, ShapeError, SymgateError
from ._reference import Gradients, ReferenceKernel, Trajectory, numerical_message
from ._validate import check_dtype
from .losses import LastMSE, Loss, StepMSE

__all__ = ["CompiledKernel", "PreparedStep", "compile", "kernels"]


#: slot roles whose arrays are results handed to the caller (never taken from the workspace pool)
_RESULTS = frozenset({"grad_x", "grad_V", "carry", "grad_stack", "grad"})
#: slot roles of BPTT's arrays
_BACKWARD = frozenset({"carry", "carry2", "adj", "static_adj", "static_group_adj", "group_adj", "grad_stack", "grad_x", "grad"})


class _Run:
    """The arrays of one program run, its run plan, and the three integer vectors ``run`` takes.

    The run plan (:func:`symgate._codegen.run_plan`) decides everything that depends on the
    sizes and on what is asked; this class only allocates what the plan says and passes the
    plan's flags to the program.
    """

    def __init__(self, k: "CompiledKernel", params: Mapping[str, np.ndarray], x: np.ndarray, h0: Mapping[str, np.ndarray],
                 sizes: Mapping[Dim, int], *, store_all: bool, loss: Loss | None, cots: Mapping[str, np.ndarray] | None,
                 backward: bool, pool: dict[Any, np.ndarray] | None = None,
                 tangents: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], np.ndarray] | None = None,
                 x_grad: bool = True) -> None:
        g = k.generated
        self.kernel, self.dtype, self.pool = k, k.dtype, pool
        self.T, self.B = x.shape[0], x.shape[1]
        self.sizes = sizes
        self.step = isinstance(loss, StepMSE)
        self.o = loss.V.shape[0] if loss is not None else 1
        self.inputs = {"x": x, "params": params, "h0": h0, "loss": loss, "cots": cots, "tangents": tangents}
        options = RunOptions(loss=None if loss is None else ("step" if self.step else "last"), backward=backward,
                             jvp=tangents is not None, cotangents=cots is not None, store_all=store_all, x_grad=x_grad)
        self.plan = run_plan(g, sizes, self.T, self.B, options, o=self.o, policy=k.policy)
        if k.plan_log is not None:
            k.plan_log.append(self.plan)
        self.width = {("RS" if grp.static else "R", grp.index): sum(sizes[r] for r in grp.rows) for grp in g.groups}
        self.owned: list[np.ndarray] = []  # arrays this run allocates (workspaces and results)
        self.arrays: dict[str, np.ndarray | None] = {}
        checked: dict[str, bool] = {}
        for sl in g.slots:
            self.arrays[sl.code], checked[sl.code] = self._array(sl)
        self.loss_value = np.zeros(1, dtype=np.float64)
        ptr = [0 if a is None else a.__array_interface__["data"][0] for a in self.arrays.values()]
        ptr.append(self.loss_value.__array_interface__["data"][0])
        self.ptr = np.array(ptr, dtype=np.longlong)
        self.sz = np.array([(a.size if a is not None and (checked[sl.code] or sl.role in _RESULTS) else 0)
                            for sl, a in zip(g.slots, self.arrays.values())], dtype=np.longlong)
        self.iv = np.array([self._integer(it) for it in g.ints], dtype=np.longlong)
        self.x_grad = x_grad
        self.addr = (self.ptr.ctypes.data, self.iv.ctypes.data, self.sz.ctypes.data)
        self.what = FORWARD | (BACKWARD if backward else 0) | (JVP if tangents is not None else 0) | \
            (0 if loss is None else (LOSS_STEP if self.step else LOSS_LAST))

    # ------------------------------------------------------------------ arrays
    def _shape(self, sl: Slot) -> tuple[int, ...]:
        fixed = {"T": self.T, "T+1": self.T + 1, "B": self.B, "o": self.o}
        return tuple(fixed[tok] if isinstance(tok, str) and tok in fixed else
                     self.width[tok] if isinstance(tok, tuple) else self.sizes[tok] for tok in sl.shape)

    def _empty(self, sl: Slot, shape: tuple[int, ...]) -> np.ndarray:
        """A new array, or a workspace reused between calls (never a result handed to the caller)."""
        if self.pool is None or sl.role in _RESULTS:
            a = np.empty(shape, dtype=self.dtype)
        else:
            key = (sl.code, shape)
            if key not in self.pool:
                self.pool[key] = np.empty(shape, dtype=self.dtype)
            a = self.pool[key]
        self.owned.append(a)
        return a

    def _array(self, sl: Slot) -> tuple[np.ndarray | None, bool]:
        """The array of one slot (None: not used by this run), and whether ``run`` checks it for NaN/inf."""
        given = self._given(sl)
        if given is not None:
            return given
        plan, role = self.plan, sl.role
        if role == "node":
            full = sl.key in plan.stored_nodes
            return self._empty(sl, self._shape(sl) if full else (self.B, self.sizes[sl.shape[-1]])), False
        if role == "group":
            return self._empty(sl, self._shape(sl)[1:] if sl.key.index not in plan.stored_groups else self._shape(sl)), False
        if role in ("static_group", "group_adj") and sl.code in plan.scratch:
            return self._empty(sl, self._shape(sl)[1:]), False  # one row, rewritten every step (stride 0)
        if role == "static_group_adj" and sl.key.index in self.kernel.generated.aliases:
            return None, False  # shares the dynamic twin's adjoint buffer
        if role == "grad_x" and not (self.x_grad_requested or self.kernel.generated.x_elementwise):
            return None, False
        if role in _BACKWARD:
            return (self._empty(sl, self._shape(sl)) if plan.options.backward else None), False
        if role in ("grad_V", "loss_res"):
            return self._loss_array(sl), False
        if role.startswith("tan_"):
            return self._tangent_array(sl), False
        return self._empty(sl, self._shape(sl)), False  # state, static, stack, stack_t, static_group

    @property
    def x_grad_requested(self) -> bool:
        return self.plan.options.x_grad

    def _given(self, sl: Slot) -> tuple[np.ndarray | None, bool] | None:
        """The caller's arrays (checked for NaN/inf by ``run``), or None for the other roles."""
        inp, role = self.inputs, sl.role
        loss = inp["loss"]
        if role == "x":
            return inp["x"], True
        if role in ("param", "h0"):
            return inp["params" if role == "param" else "h0"][sl.key], True
        if role in ("loss_V", "loss_y"):
            return ((loss.V if role == "loss_V" else loss.y), True) if loss is not None else (None, False)
        if role == "cot":
            if inp["cots"] is not None:
                return inp["cots"][sl.key], True
            if self.step and sl.key == self.kernel.generated.states[0]:
                return self._empty(sl, (self.T, self.B, self.sizes[self.kernel.cell.states[0].dim])), False
            return None, False
        return None

    def _loss_array(self, sl: Slot) -> np.ndarray | None:
        if self.inputs["loss"] is None:
            return None
        if sl.role == "grad_V":
            return self._empty(sl, self._shape(sl))
        return self._empty(sl, (self.T, self.B, self.o) if self.step else (self.B, self.o))

    def _tangent_array(self, sl: Slot) -> np.ndarray | None:
        tangents = self.inputs["tangents"]
        if tangents is None:
            return None
        if sl.role == "tan_x":
            return tangents[2]
        if sl.role == "tan_param":
            return np.ascontiguousarray(tangents[0][sl.key], dtype=self.dtype).reshape(self._shape(sl))
        if sl.role == "tan_h0":
            return tangents[1][sl.key]
        if sl.role == "tan_state":
            a = np.empty(self._shape(sl), dtype=self.dtype)
            self.owned.append(a)
            return a
        return self._empty(sl, self._shape(sl))

    def _integer(self, it: tuple[Any, ...]) -> int:
        """The value of one integer parameter of ``run`` (sizes, strides, the run plan's flags)."""
        tag = it[0]
        if tag in ("T", "B", "o"):
            return {"T": self.T, "B": self.B, "o": self.o}[tag]
        if tag == "dim":
            return self.sizes[it[1]]
        if tag in ("R", "RS"):
            return self.width[(tag, it[1])]
        if tag == "stride":
            a = self.arrays[it[1]]
            return 0 if a is None or a.ndim == 2 else a.shape[1] * a.shape[2]
        if tag == "has_cot":
            return 1 if self.inputs["cots"] is not None else 0
        if tag == "flag":
            return int(bool(self.plan.input_products_per_step if it[1] == "xstep" else self.plan.wgrad_per_step))
        if tag == "route":
            return self.plan.routes[it[1]]
        raise AssertionError(f"internal: unknown integer parameter {it!r}")  # pragma: no cover

    def __call__(self) -> None:
        fill = self.kernel.workspace_fill
        if fill is not None:  # a testing aid: a value read before the program writes it shows up
            for a in self.owned:
                a.fill(fill)
        code = self.kernel.module.run(*self.addr, self.what)
        if code != 0:
            self.kernel._raise(code, self)


def _slot_label(sl: Slot) -> str:
    """How a caller's array is named in messages (``params['W']``, ``x``, ...); internal slots by their code."""
    return {"x": "x", "param": f"params[{sl.key!r}]", "h0": f"h0[{sl.key!r}]", "loss_V": "loss V",
            "loss_y": "loss y", "cot": f"cotangents[{sl.key!r}]"}.get(sl.role, sl.code)


#: what a negative return code of the generated ``run`` says was not finite
_STAGES = {-1: "the forward pass (a state, a node or a matrix product)", -2: "the loss",
           -3: "a state tangent (JVP)", -4: "a gradient"}


class CompiledKernel(ReferenceKernel):
    """A kernel whose forward pass, losses and BPTT are one compiled program (float32 or float64)."""

    backend = "compiled"

    #: Testing aid: when set (e.g. to NaN), every array a run allocates -- workspaces reused
    #: between calls and result buffers -- is filled with this value before each call, so a
    #: value the program reads before writing it (a stale buffer) changes the result.
    workspace_fill: float | None = None
    #: The thresholds of the run plan's size-dependent decisions (testing aid: another policy forces
    #: either side of a decision at any size; results must not change beyond rounding).
    policy: Policy = DEFAULT_POLICY
    #: Testing aid: when a list, every run appends its :class:`~symgate._codegen.RunPlan`.
    plan_log: list | None = None

    def __init__(self, cell: Cell, dtype: Any = "float64") -> None:
        super().__init__(cell, dtype)
        if self.dtype not in (np.dtype("float32"), np.dtype("float64")):
            raise DTypeError(f"compiled kernels are float32 or float64, not {self.dtype} (complex128 is a dtype of the numpy "
                             "reference kernel, for complex-step checks: symgate.reference_kernel(cell, 'complex128'))")
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

    def plan(self, sizes: Mapping[str, int], *, T: int, B: int, loss: str | None = "last", backward: bool = True,
             jvp: bool = False, cotangents: bool = False, store_all: bool = False, x_grad: bool = False,
             outputs: int = 1) -> KernelPlan:
        """Every decision this kernel takes for a call at ``sizes`` (dimension name -> size), ``T``
        steps and batch ``B``: the structural ones of the generator and the run plan's.

        The defaults describe a training step (``prepare``: last-state loss, BPTT, no input
        gradient); ``backward(...)`` computes the input gradient too (``x_grad=True``),
        ``forward`` stores every node (``loss=None, backward=False, store_all=True``).

        >>> import symgate as sg
        >>> k = sg.compile(sg.cells.vector_gate())
        >>> dict((kind, v) for kind, _, v in k.plan({"n": 64, "m": 8}, T=100, B=32).decisions())["wgrad_per_step"]
        True
        """
        dims = {d: (1 if d == 1 else int(sizes[d])) for d in [1, *self.cell.dims()]} if set(self.cell.dims()) <= set(sizes) \
            else None
        if dims is None:
            raise ShapeError(f"plan() needs a size for every dimension of cell {self.cell.name!r}: {list(self.cell.dims())}")
        options = RunOptions(loss=loss, backward=backward, jvp=jvp, cotangents=cotangents, store_all=store_all, x_grad=x_grad)
        run = run_plan(self.generated, dims, T, B, options, o=outputs, policy=self.policy)
        return KernelPlan(structural_decisions(cell_plan(self.cell)), run)

    # ------------------------------------------------------------------ errors
    def _raise(self, code: int, run: _Run) -> None:
        g = self.generated
        if code > 0:
            sl = g.slots[code - 1]
            a = run.arrays[sl.code]
            what = _slot_label(sl)
            assert a is not None
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0]) if a.ndim else ()
            raise NonFiniteError(f"{what} contains a non-finite value ({a[bad]!r} at index {bad})")
        if code == -1:  # the forward pass stops at its first non-finite value: the reference names the cause
            self._diagnose_forward(run)
        raise NumericalError(numerical_message(self.cell.name, _STAGES.get(code, "a result")))

    def _diagnose_forward(self, run: _Run) -> None:
        """Re-run the failed forward pass in the numpy reference, which raises with the cause (NaN or infinity)."""
        from ._reference import reference_kernel

        inp = run.inputs
        reference_kernel(self.cell, self.dtype).forward(inp["params"], inp["x"], inp["h0"])

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
        order = [st.name for st in self._plan if st.kind not in ("out", "aux")]
        static_names = {st.name for st in self._plan if st.static}
        out = {nm: nodes[nm] for nm in order if nm in static_names}
        out.update({nm: dyn[nm] for nm in order if nm not in static_names})
        aux = {st.name: (nodes if st.static else dyn)[st.name] for st in self._plan if st.kind == "aux"}
        return Trajectory(states, out, h0, x, dict(sizes), aux)

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
                                       x_grad=x_grad), sizes, params, loss)

    def __repr__(self) -> str:
        return f"<CompiledKernel {self.cell.name!r} {self.dtype}>"


class PreparedStep:
    """Forward + loss + BPTT on bound arrays, one compiled call per ``__call__``.

    ``step()`` returns the loss value; ``step.grads`` (a :class:`~symgate.Gradients`,
    refreshed by every call, arrays reused) holds the gradients of every parameter,
    ``h0``, ``x`` and the readout ``V``.

    **Bindings.** The step keeps references to the arrays it bound and checks on every call
    (a few hundred nanoseconds) that each still has the data pointer, shape and strides it had:
    an array resized after ``prepare`` (``a.resize(..., refcheck=False)``) raises
    :class:`~symgate.ShapeError`, and a ``params`` entry or the loss's ``V``/``y`` rebound to
    another object raises :class:`~symgate.CellSpecError` (update arrays in place, or prepare
    again).

    **Threads.** A step owns one set of buffers, ``step.grads`` included, so it is not shared
    between threads: a call while another thread's call on the same step is running raises
    :class:`~symgate.ConcurrentUseError` (nothing is computed).  Prepare one step per thread;
    the kernel itself (``backward``, ``forward``, ``prepare``) may be used from many threads.
    """

    def __init__(self, kernel: CompiledKernel, run: _Run, sizes: Mapping[Dim, int], params: Mapping[str, np.ndarray],
                 loss: Loss) -> None:
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
        self._bind(params, loss)
        self._busy = threading.Lock()

    # ------------------------------------------------------------------ bindings
    def _bind(self, params: Mapping[str, np.ndarray], loss: Loss) -> None:
        """Keep references to the bound arrays and what ``run`` was told about them (pointer, shape, strides)."""
        r = self._run
        self._user_params = params
        self._user_objs = {nm: params[nm] for nm in self.kernel.cell.param_names}
        self._loss, self._loss_arrays = loss, (loss.V, loss.y)
        bound = [sl for sl in self.kernel.generated.slots
                 if sl.role in ("x", "param", "h0", "loss_V", "loss_y") and r.arrays[sl.code] is not None]
        self._bound_names = [_slot_label(sl) for sl in bound]
        self._bound = tuple(r.arrays[sl.code] for sl in bound)
        expect: list[int] = []
        for a in self._bound:
            expect += [a.__array_interface__["data"][0], a.ndim, *a.shape, *a.strides]
        self._expect = np.array(expect, dtype=np.longlong)
        self._moved = self.kernel.module.bindings_moved

    def _check_bindings(self) -> None:
        """Raise if a bound array was resized or reallocated, or a ``params`` entry rebound, since ``prepare``."""
        i = self._moved(self._bound, self._expect)
        if i >= 0:
            a = self._bound[i]
            raise ShapeError(f"{self._bound_names[i]} was resized or reallocated after prepare() (now shape {a.shape}); "
                             "a prepared step reads the memory it bound: update arrays in place, or call prepare() again")
        for nm, obj in self._user_objs.items():
            if self._user_params.get(nm) is not obj:
                raise CellSpecError(f"params[{nm!r}] was rebound to another object after prepare(); a prepared step keeps "
                                    f"the array it bound: update it in place (params[{nm!r}][...] = new), or call prepare() again")
        if self._loss.V is not self._loss_arrays[0] or self._loss.y is not self._loss_arrays[1]:
            raise CellSpecError("the loss's V or y was rebound after prepare(); update them in place, or call prepare() again")

    def __call__(self) -> Any:
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(f"{self!r} was called from two threads at once: a prepared step owns one set of "
                                     "buffers (and step.grads); prepare one step per thread")
        try:
            return self._step()
        finally:
            self._busy.release()

    def _step(self) -> Any:
        self._check_bindings()
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
        with cell._index.setdefault(("lock",) + key, threading.Lock()):  # one kernel per cell and dtype, across threads
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
    except CompilerNotFoundError as exc:  # no C compiler: the numpy reference still works
        why = exc.args[0].splitlines()[0]
    except SymgateError:
        raise
    except (OSError, ImportError) as exc:  # no Cython: the numpy reference still works
        why = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"cell {cell.name!r}: no compiled kernel ({why}); using the numpy reference kernel", SymgateWarning, stacklevel=2)
    return reference_kernel(cell, dtype)
