r"""Cython code generation: one compiled program per cell for forward, loss and BPTT.

The generated module runs everything of a training step in compiled, ``nogil`` code:

1. **stacking** -- the Linear nodes that read the same source are one *group*; their
   matrices are copied into one stacked matrix (and its transpose), so each group is
   one matrix product;
2. **state-independent part** -- groups reading the input (``U x``) are one GEMM per
   step at the top of the time loop (batches of 8 or more, when no elementwise node
   depends on the input alone), else one GEMM over ``T*B`` rows before the time loop,
   followed by the elementwise nodes that need no state;
3. **time loop** -- per step, the state-dependent groups (one GEMM each: BLAS, or plain
   loops for tiny products) and *fused* elementwise loops: consecutive nodes of the same
   dimension are computed in one loop over ``(b, i)``, kept in registers, and stored only
   where BPTT or the caller needs them (the caller chooses per node: a ``(T, B, d)``
   trajectory or a ``(B, d)`` scratch row);
4. **losses** -- last-state and per-step MSE through a linear readout;
5. **BPTT** -- the reverse loop evaluates the derived local partials (σ' and tanh' from
   the forward values), keeps adjoints that stay inside one fused loop in registers,
   sends adjoints through each group with one GEMM, and accumulates every weight
   gradient step by step (batches of 8 or more; else one GEMM over ``T*B`` rows after
   the loop);
6. **checks** -- every input is tested for NaN/inf (by bit pattern, so ``-ffast-math``
   cannot remove the test) and so is every result.

Elementwise code is printed by :class:`KernelPrinter`, a subclass of SymPy's C99 printer
(dispatch by type; the float32/float64 choice is its type-alias table), after
deterministic common-subexpression elimination (``order='canonical'``).  Identifiers
come from a fixed scheme (``S0`` states, ``N3`` nodes, ``Z1`` group outputs, ``P0``
vectors, ``p0`` scalars, ...); a user's names appear only in comments, and they are
validated identifiers.  The same cell always gives byte-identical source.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.codegen.rewriting import create_expand_pow_optimization, optimize
from sympy.printing.c import C99CodePrinter

from ._cell import Cell, Dim
from ._derive import jacobian
from ._derive._program import program
from ._errors import CellSpecError

__all__ = ["KernelPrinter", "generate", "GeneratedSource", "Slot", "Group"]

_EXPAND_POW = [create_expand_pow_optimization(4)]

#: ``run`` flags (the ``what`` argument of the generated module's ``run``)
FORWARD, LOSS_LAST, LOSS_STEP, BACKWARD, JVP = 1, 2, 4, 8, 16

#: tiny matrix products (fewer multiply-adds than this, or one row) use plain loops, not BLAS
SMALL_GEMM = 24576


class KernelPrinter(C99CodePrinter):
    """SymPy -> C for kernel bodies: symbols print as locals or array accesses, gates as stable helpers."""

    def __init__(self, dtype: np.dtype) -> None:
        # no C macros (M_LN2, ...): Cython does not know them; constants print as expressions
        super().__init__({"type_aliases": {real: float32 if dtype == np.float32 else float64}, "math_macros": {}})
        self.access: dict[sympy.Symbol, str] = {}
        self._single = dtype == np.float32

    def _print_Float(self, f: Any) -> str:  # noqa: N802 - SymPy's dispatch name
        # Cython has no 1.0F literal: cast a double literal to the kernel's real type
        lit = super()._print_Float(f)
        return f"(<real>{lit.rstrip('F')})" if self._single else lit

    def _print_Rational(self, r: Any) -> str:  # noqa: N802
        lit = f"{int(r.p)}.0/{int(r.q)}.0"
        return f"(<real>({lit}))" if self._single else f"({lit})"

    def _print_Integer(self, k: Any) -> str:  # noqa: N802
        # Cython writes an integer literal next to a float as a double literal (1 -> 1.0), which
        # would promote float32 arithmetic to double: give integers the kernel's real type
        return f"(<real>{int(k)})" if self._single else super()._print_Integer(k)

    _print_One = _print_Zero = _print_NegativeOne = _print_Integer  # noqa: N815

    def _print_Symbol(self, s: sympy.Symbol) -> str:  # noqa: N802
        if s in self.access:
            return self.access[s]
        if s.name.startswith("_c"):  # a CSE temporary
            return s.name
        raise CellSpecError(f"internal: no code for symbol {s.name!r}")

    def _print_Sigmoid(self, e: Any) -> str:  # noqa: N802
        return f"sg_sigmoid({self._print(e.args[0])})"

    def _print_Softplus(self, e: Any) -> str:  # noqa: N802
        return f"sg_softplus({self._print(e.args[0])})"

    def _print_tanh(self, e: Any) -> str:  # noqa: N802
        return f"sg_tanh({self._print(e.args[0])})"


#: batches at least this large compute the input products of the forward pass and accumulate every
#: weight gradient step by step inside the time loops (while the step's rows are in cache); smaller
#: ones use one product over all T*B rows before/after the loop
STEP_WGRAD_MIN_B = 8

@dataclass(frozen=True)
class Slot:
    """One array the generated program reads or writes, in the order ``run`` takes pointers.

    ``shape`` holds tokens the caller resolves: ``"T"``, ``"T+1"``, ``"B"``, ``"o"``, a
    dimension name, ``1``, or ``("R", g)`` / ``("RS", g)`` (the rows of a stacked group).
    """

    code: str
    role: str
    key: Any
    shape: tuple[Any, ...]


@dataclass(frozen=True)
class Group:
    """Linear nodes that read the same source: one stacked matrix, one matrix product."""

    index: int
    static: bool
    source: str
    members: tuple[str, ...]
    matrices: tuple[str, ...]
    rows: tuple[Dim, ...]
    cols: Dim


@dataclass
class GeneratedSource:
    """Generated Cython source and the layout its ``run`` function expects."""

    source: str
    slots: list[Slot]
    ints: list[tuple[Any, ...]]
    groups: list[Group]
    dims: list[Dim]
    states: list[str]
    nodes: list[str]  # state-dependent elementwise nodes, in slot order
    static_nodes: list[str]  # state-independent elementwise nodes
    needed: set[str]  # state-dependent nodes BPTT reads (stored over T even in minimal runs)
    aliases: dict[int, int] = field(default_factory=dict)  # static group -> dynamic group sharing its adjoint
    x_elementwise: bool = False  # some elementwise node reads the input directly (its gradient is then always computed)
    scratch: frozenset[str] = frozenset()  # arrays that may be one reused row for B >= STEP_WGRAD_MIN_B (_scratch_rows)
    content_hash: str = ""


# ----------------------------------------------------------------------------- helpers


def _cse(exprs: list[sympy.Expr]) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list[sympy.Expr]]:
    repl, red = sympy.cse(exprs, symbols=sympy.numbered_symbols("_c"), order="canonical")
    return repl, red


@dataclass
class _Item:
    """A node or updated state in evaluation order (the kernel's view of a plan step)."""

    name: str
    kind: str  # fn | arith | linear | out
    dim: Dim
    static: bool
    expr: sympy.Expr | None = None
    deps: frozenset[str] = frozenset()
    partials: list[tuple[str, sympy.Expr]] = field(default_factory=list)
    matrix: str | None = None
    source: str | None = None
    state: int = -1


@dataclass
class _Op:
    kind: str  # "gemm" | "loop"
    items: list[_Item]
    dim: Dim = 1
    group: Group | None = None


class _Fn:
    """Collects the parameters of one generated elementwise function and what the caller passes."""

    def __init__(self) -> None:
        self.ptrs: dict[str, str] = {}  # parameter -> caller expression
        self.vals: dict[str, str] = {}

    def ptr(self, name: str, caller: str) -> str:
        self.ptrs.setdefault(name, caller)
        return name

    def val(self, name: str, caller: str) -> str:
        self.vals.setdefault(name, caller)
        return name


# ----------------------------------------------------------------------------- generator


class _Gen:
    def __init__(self, cell: Cell, dt: np.dtype) -> None:
        self.cell, self.dt = cell, dt
        self.printer = KernelPrinter(dt)
        self.states = [s.name for s in cell.states]
        self.xname = cell.inputs[0].name
        self.dims: list[Dim] = list(cell.dims())
        self.D: dict[Dim, str] = {d: f"D{k}" for k, d in enumerate(self.dims)}
        self.D[1] = "1"
        self.sym = cell.symbols
        self.name_of = {s: n for n, s in self.sym.items()}
        self.kind_of: dict[str, str] = {lf.name: lf.kind for lf in cell.leaves}
        self.dim_of: dict[str, Dim] = {lf.name: lf.dim for lf in cell.leaves}
        self.dim_of.update({nd.name: nd.dim for nd in cell.nodes})
        self.shape_of = {p.name: p.shape for p in cell.params}
        self.consts = cell.constants
        mats = [p.name for p in cell.params if p.kind == "matrix"]
        self.M = {nm: f"M{k}" for k, nm in enumerate(mats)}
        self.P = {p.name: f"P{k}" for k, p in enumerate(q for q in cell.params if q.kind == "vector")}
        self.p = {p.name: f"p{k}" for k, p in enumerate(q for q in cell.params if q.kind == "scalar")}
        items: list[_Item] = []
        for st in program(cell):
            it = _Item(st.name, st.kind, st.dim, st.static, matrix=st.matrix, source=st.source)
            if st.kind == "out":
                it.state = self.states.index(st.state)  # type: ignore[arg-type]
            if st.kind != "linear":
                it.expr = st.expr
                it.partials = [(nm, e) for nm, _d, e in st.partials]
            it.deps = st.reads
            items.append(it)
        self.items = {it.name: it for it in items}
        leaves = {lf.name for lf in cell.leaves if lf.kind != "state"}
        static_items = [it for it in items if it.static]
        dyn_items = [it for it in items if not it.static]
        self.static_ops, sgroups = self._schedule(static_items, leaves, static=True)
        avail = leaves | set(self.states) | {it.name for it in static_items}
        self.dyn_ops, dgroups = self._schedule(dyn_items, avail, static=False)
        self.sgroups, self.dgroups = sgroups, dgroups
        self.group_of: dict[str, tuple[Group, str]] = {}
        for g in sgroups + dgroups:
            for k, mem in enumerate(g.members):
                self.group_of[mem] = (g, self._offset(g, k))
        self.nodes = [it.name for it in dyn_items if it.kind in ("fn", "arith")]
        self.N = {nm: f"N{k}" for k, nm in enumerate(self.nodes)}
        self.static_nodes = [it.name for it in static_items if it.kind in ("fn", "arith")]
        self.Q = {nm: f"Q{k}" for k, nm in enumerate(self.static_nodes)}
        # which dynamic values BPTT reads: symbols in partials, and sources of dynamic groups
        needed: set[str] = set()
        for it in items:
            for _, e in it.partials:
                needed |= {self.name_of[s] for s in e.free_symbols}
        needed |= {g.source for g in dgroups}
        self.needed = {nm for nm in needed if nm in self.items and not self.items[nm].static}
        # readers of every value: (owner name) for elementwise owners, ("@", group) for groups
        self.readers: dict[str, list[str]] = {}
        for it in items:
            if it.kind == "linear":
                self.readers.setdefault(it.source, []).append("@" + it.name)  # type: ignore[arg-type]
            else:
                for src, _ in it.partials:
                    self.readers.setdefault(src, []).append(it.name)
        self.op_of: dict[str, tuple[str, int]] = {}
        for k, op in enumerate(self.static_ops):
            for it in op.items:
                self.op_of[it.name] = ("s", k)
        for k, op in enumerate(self.dyn_ops):
            for it in op.items:
                self.op_of[it.name] = ("d", k)
        # adjoints kept in registers: every reader is an elementwise owner of the same loop
        self.local_adj = {nm for nm in (self.nodes + self.static_nodes)
                          if all(r[0] != "@" and self.op_of.get(r) == self.op_of[nm] for r in self.readers.get(nm, []))
                          and self.readers.get(nm)}
        self.A = {nm: f"A{k}" for k, nm in enumerate(n for n in self.nodes if n not in self.local_adj)}
        # a static group whose members' adjoints equal a dynamic group's member by member (each pair
        # read only by the same owner, with the same partial: tanh(W h + U x + b)) shares its
        # adjoint buffer: one array for both weight gradients, as the algebra allows
        self.alias: dict[int, Group] = {}
        for gs in sgroups:
            for gd in dgroups:
                if gd in self.alias.values() or len(gs.members) != len(gd.members) or gs.rows != gd.rows:
                    continue
                if all(self._sole_reader(a) is not None and self._sole_reader(a) == self._sole_reader(b)
                       for a, b in zip(gs.members, gd.members)):
                    self.alias[gs.index] = gd
                    break
        self.QA = {nm: f"QA{k}" for k, nm in enumerate(n for n in self.static_nodes if n not in self.local_adj)}
        self.max_temps = 0

    def static_wgrad_in_loop(self, g: Group) -> bool:
        """Whether the weight gradient of static group ``g`` may be accumulated step by step in the
        reverse loop: its adjoint rows of step ``t`` must be complete at the end of iteration ``t``,
        i.e. shared with a dynamic group's, or written only by state-dependent owners (a reader in
        the state-independent part fills them after the loop)."""
        if g.index in self.alias:
            return True
        for mem in g.members:
            for rd in self.readers.get(mem, []):
                if rd.startswith("@") or self.items[rd].static:
                    return False
        return True

    def _sole_reader(self, nm: str) -> tuple[str, sympy.Expr] | None:
        """The only reader of ``nm`` and the partial with respect to ``nm``, if the reader is elementwise."""
        rd = self.readers.get(nm, [])
        if len(rd) != 1 or rd[0].startswith("@"):
            return None
        part = dict(self.items[rd[0]].partials).get(nm)
        return None if part is None else (rd[0], part)

    # ------------------------------------------------------------------ schedule
    def _schedule(self, items: list[_Item], avail: set[str], static: bool) -> tuple[list[_Op], list[Group]]:
        """Ops in a valid order: ready Linear nodes first, stacked by source; then maximal fused loops."""
        done = set(avail)
        rem = list(items)
        ops: list[_Op] = []
        groups: list[Group] = []
        while rem:
            lin = [it for it in rem if it.kind == "linear" and it.deps <= done]
            if lin:
                by_src: dict[str, list[_Item]] = {}
                for it in lin:
                    by_src.setdefault(it.source, []).append(it)  # type: ignore[arg-type]
                for src, members in by_src.items():
                    shapes = [self.shape_of[it.matrix] for it in members]  # type: ignore[index]
                    g = Group(len(groups), static, src, tuple(it.name for it in members), tuple(it.matrix for it in members),  # type: ignore[misc]
                              tuple(s[0] for s in shapes), shapes[0][1])
                    groups.append(g)
                    ops.append(_Op("gemm", members, group=g))
                done |= {it.name for it in lin}
                rem = [it for it in rem if it not in lin]
                continue
            ready = [it for it in rem if it.kind != "linear" and it.deps <= done]
            if not ready:  # pragma: no cover - the plan is topologically ordered
                raise CellSpecError("internal: cannot schedule the cell's nodes")
            d = ready[0].dim
            chosen: list[_Item] = []
            names = set(done)
            grew = True
            while grew:
                grew = False
                for it in rem:
                    if it.kind != "linear" and it not in chosen and it.dim == d and it.deps <= names:
                        chosen.append(it)
                        names.add(it.name)
                        grew = True
            ops.append(_Op("loop", chosen, dim=d))
            done |= {it.name for it in chosen}
            rem = [it for it in rem if it not in chosen]
        return ops, groups

    def _offset(self, g: Group, k: int) -> str:
        parts = [self.D[r] for r in g.rows[:k]]
        return " + ".join(parts) if parts else "0"

    def R(self, g: Group) -> str:
        return f"{'RS' if g.static else 'R'}{g.index}"

    def cD(self, d: Dim) -> str:
        """A dimension's size as the driver reads it (from the context struct)."""
        return "1" if d == 1 else f"c.{self.D[d]}"

    # ------------------------------------------------------------------ printing
    def code(self, e: sympy.Expr) -> str:
        return self.printer.doprint(optimize(e, _EXPAND_POW))

    @staticmethod
    def at(ptr: str, ld: str, off: str, d: Dim, i: str = "i") -> str:
        idx = "b" if ld == "1" else f"b*{ld}"
        if off != "0":
            idx += f" + {off}"
        if d != 1:
            idx += f" + {i}"
        return f"{ptr}[{idx}]"

    def value_access(self, nm: str, fn: _Fn, ctx: str, locals_: dict[str, str], tangent: bool = False) -> Any:
        """Code reading the value of ``nm`` (or, with ``tangent``, its tangent) at row ``b``, unit ``i``.

        ``ctx`` is ``"static"`` (rows are all T*B), ``"fwd"`` or ``"bwd"`` (rows of step t).
        Tangent arrays are named like the values with a ``T`` prefix; the tangents of
        state-dependent nodes and groups are per-step rows, and constants have none (None).
        """
        if nm in locals_:
            return locals_[nm]
        d = self.dim_of[nm]
        D, cD = self.D[d], self.cD(d)
        kind = self.kind_of.get(nm)
        tB = "" if ctx == "static" else " + t*B*"
        T = "T" if tangent else ""
        if kind == "constant":
            return None if tangent else self.code(sympy.Float(self.consts[nm]))
        if kind == "vector":
            return f"{fn.ptr(T + self.P[nm], 'c.' + T + self.P[nm])}[{'i' if d != 1 else '0'}]"
        if kind == "scalar":
            return fn.val(T + self.p[nm], f"c.{T}{self.p[nm]}[0]")
        if kind == "input":
            return self.at(fn.ptr(T + "X", f"c.{T}X" + (tB + cD if tB else "")), D, "0", d)
        if kind == "state":
            k = self.states.index(nm)
            return self.at(fn.ptr(f"{T}S{k}", f"c.{T}S{k} + t*B*{cD}"), D, "0", d)
        if nm in self.group_of:
            g, off = self.group_of[nm]
            R = self.R(g)
            if g.static and T:
                return self.at(fn.ptr(f"{T}Y{g.index}", f"c.{T}Y{g.index}" + (tB + "c." + R if tB else "")), R, off, d)
            if g.static:
                return self.at(fn.ptr(f"Y{g.index}", f"c.Y{g.index}" + (f" + t*c.stY{g.index}" if tB else "")), R, off, d)
            step = "" if tangent else f" + t*c.stZ{g.index}"
            return self.at(fn.ptr(f"{T}Z{g.index}", f"c.{T}Z{g.index}{step}"), R, off, d)
        if nm in self.Q:
            return self.at(fn.ptr(T + self.Q[nm], f"c.{T}{self.Q[nm]}" + (tB + cD if tB else "")), D, "0", d)
        if nm in self.N:
            step = "" if tangent else f" + t*c.st{self.N[nm]}"
            return self.at(fn.ptr(T + self.N[nm], f"c.{T}{self.N[nm]}{step}"), D, "0", d)
        raise CellSpecError(f"internal: no storage for {nm!r}")  # pragma: no cover

    # ------------------------------------------------------------------ forward
    def fwd_function(self, name: str, op: _Op, static: bool) -> tuple[str, str]:
        """An elementwise forward function for one fused loop, and the call the driver makes."""
        fn = _Fn()
        ctx = "static" if static else "fwd"
        d = op.dim
        locals_: dict[str, str] = {}
        body: list[str] = []
        for k, it in enumerate(op.items):
            pr = self.printer
            pr.access = {self.sym[nm]: self.value_access(nm, fn, ctx, locals_) for nm in sorted(it.deps)}
            repl, red = _cse([it.expr])  # type: ignore[list-item]
            self.max_temps = max(self.max_temps, len(repl))
            body.append(f"            # {it.name}")
            body += [f"            {s.name} = {self.code(e)}" for s, e in repl]
            v = f"v{k}"
            body.append(f"            {v} = {self.code(red[0])}")
            if it.kind == "out":
                sdim = self.dim_of[self.states[it.state]]
                tgt = self.at(fn.ptr(f"SN{it.state}", f"c.S{it.state} + (t + 1)*B*{self.cD(sdim)}"), self.D[sdim], "0", d)
            elif static:
                tgt = self.at(fn.ptr(self.Q[it.name], f"c.{self.Q[it.name]}"), self.D[d], "0", d)
            else:
                q = self.N[it.name]
                tgt = self.at(fn.ptr(q, f"c.{q} + t*c.st{q}"), self.D[d], "0", d)
            body.append(f"            {tgt} = {v}")
            locals_[it.name] = v
        head = self._signature(name, fn)
        loops = ["    for b in range(B):", f"        for i in range({self.D[d]}):" if d != 1 else "        for i in range(1):"]
        decl = [f"    cdef real {', '.join([f'v{k}' for k in range(len(op.items))] + self._temps())}"]
        src = "\n".join([head, "    cdef Py_ssize_t b, i", *decl, *loops, *body]) + "\n"
        return src, self._call(name, fn, "T*B" if static else "B")

    def _temps(self) -> list[str]:
        return [f"_c{k}" for k in range(max(self.max_temps, 1))]

    def _size_params(self) -> list[str]:
        return ["Py_ssize_t B"] + [f"Py_ssize_t {self.D[d]}" for d in self.dims] + \
            [f"Py_ssize_t {self.R(g)}" for g in self.sgroups + self.dgroups]

    def _size_args(self, rows: str) -> list[str]:
        return [rows] + [f"c.{self.D[d]}" for d in self.dims] + [f"c.{self.R(g)}" for g in self.sgroups + self.dgroups]

    def _signature(self, name: str, fn: _Fn) -> str:
        params = self._size_params() + [f"rp {p}" for p in fn.ptrs] + [f"real {v}" for v in fn.vals]
        return f"cdef void {name}({', '.join(params)}) noexcept nogil:"

    def _call(self, name: str, fn: _Fn, rows: str) -> str:
        return f"{name}({', '.join(self._size_args(rows) + list(fn.ptrs.values()) + list(fn.vals.values()))})"

    # ------------------------------------------------------------------ backward
    def adj_target(self, nm: str, fn: _Fn, ctx: str) -> tuple[str, str, str, Dim] | None:
        """Where the adjoint of ``nm`` accumulates: (kind, pointer, ld, offset) or a local.

        kinds: ``local``, ``step`` (per-step buffer, first write '=' then '+='), ``acc``
        (accumulated over all steps: x, vector parameters), ``scalar``.
        """
        d = self.dim_of[nm]
        D, cD = self.D[d], self.cD(d)
        kind = self.kind_of.get(nm)
        tB = "" if ctx == "static" else " + t*B*"
        if kind == "constant":
            return None
        if nm in self.local_adj:
            return ("local", f"u_{self._id(nm)}", "", "0")  # type: ignore[return-value]
        if kind == "vector":
            return ("acc", fn.ptr("G" + self.P[nm], "c.G" + self.P[nm]), "0", "0")  # type: ignore[return-value]
        if kind == "scalar":
            return ("scalar", fn.ptr("G" + self.p[nm], "c.G" + self.p[nm]), "0", "0")  # type: ignore[return-value]
        if kind == "input":
            return ("acc", fn.ptr("GX", "c.GX" + (tB + cD if tB else "")), D, "0")  # type: ignore[return-value]
        if kind == "state":
            k = self.states.index(nm)
            return ("step", fn.ptr(f"CN{k}", f"cn{k}"), D, "0")  # type: ignore[return-value]
        if nm in self.group_of:
            g, off = self.group_of[nm]
            R = self.R(g)
            if g.static and g.index in self.alias:
                return None  # the same adjoint is stored once, in the dynamic twin's buffer
            if g.static:
                return ("step", fn.ptr(f"YA{g.index}", f"c.YA{g.index}" + (tB + "c." + R if tB else "")), R, off)  # type: ignore[return-value]
            return ("step", fn.ptr(f"L{g.index}", f"c.L{g.index} + t*c.stL{g.index}"), R, off)  # type: ignore[return-value]
        if nm in self.QA:
            return ("step", fn.ptr(self.QA[nm], f"c.{self.QA[nm]}" + (tB + cD if tB else "")), D, "0")  # type: ignore[return-value]
        if nm in self.A:
            return ("step", fn.ptr(self.A[nm], f"c.{self.A[nm]}"), D, "0")  # type: ignore[return-value]
        raise CellSpecError(f"internal: no adjoint storage for {nm!r}")  # pragma: no cover

    def _id(self, nm: str) -> str:
        if nm in self.N:
            return self.N[nm]
        return self.Q[nm]

    def bwd_function(self, name: str, op: _Op, static: bool, written: set[str],
                     colsums: list[tuple[str, str, str, str, Dim]] | None = None) -> tuple[str, str]:
        fn = _Fn()
        ctx = "static" if static else "bwd"
        d = op.dim
        a_sym = sympy.Symbol("a")
        body: list[str] = []
        red_b: dict[str, str] = {}  # dim-1 targets reduced over i, per row b: target -> accumulator
        red_all: dict[str, str] = {}  # scalar parameters reduced over the whole loop
        first_in_body: set[str] = set()  # locals and per-(b,i) buffers already written in this body
        post_i: list[str] = []
        post_b: list[str] = []
        decl_u: list[str] = []
        for it in reversed(op.items):
            # the adjoint of this owner
            if it.kind == "out":
                k = it.state
                sd = self.D[self.dim_of[self.states[k]]]
                a_code = self.at(fn.ptr(f"CA{k}", f"ca{k}"), sd, "0", d)
            elif it.name in self.local_adj:
                a_code = f"u_{self._id(it.name)}"
            else:
                tgt = self.adj_target(it.name, fn, ctx)
                a_code = self.at(tgt[1], tgt[2], tgt[3], d)  # type: ignore[index]
            parts = [(src, e) for src, e in it.partials if self.adj_target(src, _Fn(), ctx) is not None]
            if not parts:
                continue
            pr = self.printer
            names = sorted({self.name_of[s] for _, e in parts for s in e.free_symbols})
            pr.access = {self.sym[nm]: self.value_access(nm, fn, ctx if ctx == "static" else "bwd", {}) for nm in names}
            pr.access[a_sym] = "a"
            repl, red = _cse([a_sym * e for _, e in parts])
            self.max_temps = max(self.max_temps, len(repl))
            body.append(f"            # pull back {it.name}")
            body.append(f"            a = {a_code}")
            body += [f"            {s.name} = {self.code(e)}" for s, e in repl]
            codes = [self.code(e) for e in red]
            # a vector parameter whose contribution equals what is stored for a sibling read only by
            # this owner (b in tanh(W h + U x + b) and the adjoint of W h): its gradient is the column
            # sum of that stored adjoint over all T*B rows, after the loop, not a sum inside it
            twins: dict[str, tuple[str, str, str]] = {}
            if colsums is not None:
                for (src, _), c in zip(parts, codes):
                    tgt = self.adj_target(src, _Fn(), ctx)
                    if tgt is not None and tgt[0] == "step" and re.fullmatch(r"(L|YA|QA)\d+", tgt[1]) \
                            and len(self.readers.get(src, [])) == 1 and self.dim_of[src] == d:
                        twins.setdefault(c, (tgt[1], tgt[2], tgt[3]))
            for (src, _), e, c in zip(parts, red, codes):
                kind, ptr, ld, off = self.adj_target(src, fn, ctx)  # type: ignore[misc]
                sdim = self.dim_of[src]
                if kind == "acc" and ld == "0" and sdim == d and c in twins and colsums is not None:
                    colsums.append((ptr, *twins[c], sdim))
                    continue
                if kind == "local":
                    if ptr in first_in_body:
                        body.append(f"            {ptr} += {c}")
                    else:
                        body.append(f"            {ptr} = {c}")
                        first_in_body.add(ptr)
                        decl_u.append(ptr)
                elif kind == "scalar":
                    acc = red_all.setdefault(ptr, f"s{len(red_all)}")
                    body.append(f"            {acc} += {c}")
                elif sdim == 1 and d != 1:  # reduce over units, then write once per row
                    key = f"{ptr}|{off}"
                    if key not in red_b:
                        red_b[key] = f"r{len(red_b)}"
                        target = self.at(ptr, ld, off, 1)
                        if kind == "acc" and ld == "0":
                            target = f"{ptr}[0]"
                        op_ = "+=" if (kind == "acc" or key in written) else "="
                        post_i.append(f"        {target} {op_} {red_b[key]}")
                        written.add(key)
                    body.append(f"            {red_b[key]} += {c}")
                else:
                    if kind == "acc" and ld == "0":  # vector parameter
                        target = f"{ptr}[{'i' if sdim != 1 else '0'}]"
                    else:
                        target = self.at(ptr, ld, off, sdim)
                    key = f"{ptr}|{off}"
                    if kind == "acc" or key in written:
                        body.append(f"            {target} += {c}")
                    else:
                        body.append(f"            {target} = {c}")
                        written.add(key)
        for key, acc in red_all.items():
            post_b.append(f"    {key}[0] += {acc}")
        head = self._signature(name, fn)
        accs = list(red_b.values()) + list(red_all.values())
        decl = [f"    cdef real {', '.join(['a'] + accs + sorted(set(decl_u)) + self._temps())}"]
        init_all = [f"    {acc} = 0" for acc in red_all.values()]
        init_b = [f"        {acc} = 0" for acc in red_b.values()]
        loop_i = f"        for i in range({self.D[d]}):" if d != 1 else "        for i in range(1):"
        src = "\n".join([head, "    cdef Py_ssize_t b, i", *decl, *init_all, "    for b in range(B):", *init_b, loop_i,
                         *body, *post_i, *post_b]) + "\n"
        return src, self._call(name, fn, "T*B" if static else "B")


    # ------------------------------------------------------------------ JVP
    def tangent_access(self, nm: str, fn: _Fn, ctx: str, locals_: dict[str, str]) -> str | None:
        """Code reading the tangent of ``nm`` at row ``b``, unit ``i`` (None: a constant, tangent 0)."""
        return self.value_access(nm, fn, ctx, locals_, tangent=True)

    def jvp_function(self, name: str, op: _Op, static: bool) -> tuple[str, str]:
        """Forward-mode tangents of one fused loop: each owner's tangent is the sum over what it
        reads of (derived local partial) x (tangent of the source)."""
        fn = _Fn()
        ctx = "static" if static else "bwd"  # values are read from stored trajectories
        d = op.dim
        locals_: dict[str, str] = {}
        body: list[str] = []
        for k, it in enumerate(op.items):
            terms = []
            tsyms = []
            for src, e in it.partials:
                ta = self.tangent_access(src, fn, ctx, locals_)
                if ta is None:
                    continue
                ts = sympy.Symbol(f"_t{len(tsyms)}")
                tsyms.append((ts, ta))
                terms.append(e * ts)
            pr = self.printer
            names = sorted({self.name_of[sy] for e in terms for sy in e.free_symbols if sy in self.name_of})
            pr.access = {self.sym[nm]: self.value_access(nm, fn, ctx, {}) for nm in names}
            pr.access.update({ts: ta for ts, ta in tsyms})
            repl, red = _cse([sympy.Add(*terms)])
            self.max_temps = max(self.max_temps, len(repl))
            body.append(f"            # tangent of {it.name}")
            body += [f"            {sy.name} = {self.code(e)}" for sy, e in repl]
            v = f"v{k}"
            body.append(f"            {v} = {self.code(red[0])}")
            if it.kind == "out":
                sdim = self.dim_of[self.states[it.state]]
                tgt = self.at(fn.ptr(f"TSN{it.state}", f"c.TS{it.state} + (t + 1)*B*{self.cD(sdim)}"), self.D[sdim], "0", d)
            elif static:
                tgt = self.at(fn.ptr("T" + self.Q[it.name], f"c.T{self.Q[it.name]}"), self.D[d], "0", d)
            else:
                tgt = self.at(fn.ptr("T" + self.N[it.name], f"c.T{self.N[it.name]}"), self.D[d], "0", d)
            body.append(f"            {tgt} = {v}")
            locals_[it.name] = v
        head = self._signature(name, fn)
        loops = ["    for b in range(B):", f"        for i in range({self.D[d]}):" if d != 1 else "        for i in range(1):"]
        decl = [f"    cdef real {', '.join([f'v{k}' for k in range(len(op.items))] + self._temps())}"]
        src = "\n".join([head, "    cdef Py_ssize_t b, i", *decl, *loops, *body]) + "\n"
        return src, self._call(name, fn, "T*B" if static else "B")


def generate(cell: Cell, dtype: Any) -> GeneratedSource:
    """The Cython source of ``cell``'s compiled program (forward, losses, BPTT) for ``dtype``."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype("float32"), np.dtype("float64")):
        raise CellSpecError(f"kernels are generated for float32 and float64, not {dt}")
    G = _Gen(cell, dt)
    funcs: list[str] = []
    slots: list[Slot] = []
    D = G.D

    def slot(code: str, role: str, key: Any, shape: tuple[Any, ...]) -> None:
        slots.append(Slot(code, role, key, shape))

    xdim = G.dim_of[G.xname]
    slot("X", "x", G.xname, ("T", "B", xdim))
    for nm, code in G.M.items():
        slot(code, "param", nm, G.shape_of[nm])
    for nm, code in G.P.items():
        slot(code, "param", nm, G.shape_of[nm])
    for nm, code in G.p.items():
        slot(code, "param", nm, ())
    for k, s in enumerate(G.states):
        slot(f"H{k}", "h0", s, ("B", G.dim_of[s]))
    slot("LV", "loss_V", None, ("o", G.dim_of[G.states[0]]))
    slot("LY", "loss_y", None, ())  # shape depends on the loss
    for k, s in enumerate(G.states):
        slot(f"C{k}", "cot", s, ("T", "B", G.dim_of[s]))
    n_inputs = len(slots)
    for k, s in enumerate(G.states):
        slot(f"S{k}", "state", s, ("T+1", "B", G.dim_of[s]))
    for nm, code in G.N.items():
        slot(code, "node", nm, ("T", "B", G.dim_of[nm]))
    for nm, code in G.Q.items():
        slot(code, "static", nm, ("T", "B", G.dim_of[nm]))
    for g in G.sgroups:
        slot(f"U{g.index}", "stack", g, (("RS", g.index), g.cols))
        slot(f"UT{g.index}", "stack_t", g, (g.cols, ("RS", g.index)))  # scratch for the weight gradient
        slot(f"Y{g.index}", "static_group", g, ("T", "B", ("RS", g.index)))
    for g in G.dgroups:
        slot(f"W{g.index}", "stack", g, (("R", g.index), g.cols))
        slot(f"WT{g.index}", "stack_t", g, (g.cols, ("R", g.index)))
        slot(f"Z{g.index}", "group", g, ("T", "B", ("R", g.index)))
    # backward
    for k, s in enumerate(G.states):
        slot(f"CA{k}", "carry", s, ("B", G.dim_of[s]))
        slot(f"CN{k}", "carry2", s, ("B", G.dim_of[s]))
    for nm, code in G.A.items():
        slot(code, "adj", nm, ("B", G.dim_of[nm]))
    for nm, code in G.QA.items():
        slot(code, "static_adj", nm, ("T", "B", G.dim_of[nm]))
    for g in G.sgroups:
        slot(f"YA{g.index}", "static_group_adj", g, ("T", "B", ("RS", g.index)))
        slot(f"GU{g.index}", "grad_stack", g, (("RS", g.index), g.cols))
    for g in G.dgroups:
        slot(f"L{g.index}", "group_adj", g, ("T", "B", ("R", g.index)))
        slot(f"GW{g.index}", "grad_stack", g, (("R", g.index), g.cols))
    slot("GX", "grad_x", None, ("T", "B", xdim))
    for nm, code in G.P.items():
        slot("G" + code, "grad", nm, G.shape_of[nm])
    for nm, code in G.p.items():
        slot("G" + code, "grad", nm, (1,))
    slot("GV", "grad_V", None, ("o", G.dim_of[G.states[0]]))
    slot("LR", "loss_res", None, ())  # residuals; shape depends on the loss
    # forward-mode tangents (JVP): inputs, then work arrays and the state tangents
    slot("TX", "tan_x", G.xname, ("T", "B", xdim))
    for nm, code in G.M.items():
        slot("T" + code, "tan_param", nm, G.shape_of[nm])
    for nm, code in G.P.items():
        slot("T" + code, "tan_param", nm, G.shape_of[nm])
    for nm, code in G.p.items():
        slot("T" + code, "tan_param", nm, (1,))
    for k, s in enumerate(G.states):
        slot(f"TH{k}", "tan_h0", s, ("B", G.dim_of[s]))
        slot(f"TS{k}", "tan_state", s, ("T+1", "B", G.dim_of[s]))
    for nm, code in G.N.items():
        slot("T" + code, "tan_node", nm, ("B", G.dim_of[nm]))
    for nm, code in G.Q.items():
        slot("T" + code, "tan_static", nm, ("T", "B", G.dim_of[nm]))
    for g in G.sgroups:
        slot(f"TU{g.index}", "tan_stack", g, (("RS", g.index), g.cols))
        slot(f"TY{g.index}", "tan_static_group", g, ("T", "B", ("RS", g.index)))
    for g in G.dgroups:
        slot(f"TW{g.index}", "tan_stack", g, (("R", g.index), g.cols))
        slot(f"TWT{g.index}", "tan_stack_t", g, (g.cols, ("R", g.index)))
        slot(f"TZ{g.index}", "tan_group", g, ("B", ("R", g.index)))
    ints: list[tuple[Any, ...]] = [("T",), ("B",), ("o",)] + [("dim", d) for d in G.dims]
    ints += [("R", g.index) for g in G.dgroups] + [("RS", g.index) for g in G.sgroups]
    ints += [("stride", G.N[nm]) for nm in G.nodes] + [("stride", f"Z{g.index}") for g in G.dgroups]
    # input products and group adjoints: (T, B, .) arrays, or one (B, .) row reused every step where
    # nothing reads them across steps (see GeneratedSource.scratch)
    ints += [("stride", f"Y{g.index}") for g in G.sgroups] + [("stride", f"L{g.index}") for g in G.dgroups]
    ints += [("has_cot", k) for k in range(len(G.states))]

    # ---------------------------------------------------------------- elementwise functions
    calls_sf: list[str] = []
    calls_df: list[str] = []
    for k, op in enumerate(G.static_ops):
        if op.kind == "loop":
            f, call = G.fwd_function(f"sfw{k}", op, static=True)
            funcs.append(f)
            calls_sf.append(call)
        else:
            calls_sf.append(op)  # type: ignore[arg-type]
    for k, op in enumerate(G.dyn_ops):
        if op.kind == "loop":
            f, call = G.fwd_function(f"fw{k}", op, static=False)
            funcs.append(f)
            calls_df.append(call)
        else:
            calls_df.append(op)  # type: ignore[arg-type]
    written: set[str] = set()
    colsums: list[tuple[str, str, str, str, Dim]] = []
    calls_db: list[Any] = []
    for k in reversed(range(len(G.dyn_ops))):
        op = G.dyn_ops[k]
        if op.kind == "loop":
            f, call = G.bwd_function(f"bw{k}", op, static=False, written=written, colsums=colsums)
            funcs.append(f)
            calls_db.append(call)
        else:
            g = op.group
            assert g is not None
            tgt = G.adj_target(g.source, _Fn(), "bwd")
            key = f"{tgt[1]}|{tgt[3]}" if tgt else ""  # type: ignore[index]
            beta = "1" if key in written else "0"
            written.add(key)
            calls_db.append((g, tgt, beta))
    step_written = set(written)
    calls_sb: list[Any] = []
    for k in reversed(range(len(G.static_ops))):
        op = G.static_ops[k]
        if op.kind == "loop":
            f, call = G.bwd_function(f"sbw{k}", op, static=True, written=written)
            funcs.append(f)
            calls_sb.append(call)
        else:
            g = op.group
            assert g is not None
            tgt = G.adj_target(g.source, _Fn(), "static")
            key = f"{tgt[1]}|{tgt[3]}" if tgt else ""  # type: ignore[index]
            beta = "1" if (key in written or (tgt is not None and tgt[0] == "acc")) else "0"
            written.add(key)
            calls_sb.append((g, tgt, beta))

    # ---------------------------------------------------------------- driver
    def src_ptr(nm: str, static: bool, t: str) -> tuple[str, str]:
        """Pointer to the (rows x c) block of values of ``nm`` starting at step ``t`` and its leading dimension."""
        d = D[G.dim_of[nm]]
        if G.kind_of.get(nm) == "input":
            return f"c.X + {t}*c.B*c.{d}" if t != "0" else "c.X", f"c.{d}"
        if G.kind_of.get(nm) == "state":
            k = G.states.index(nm)
            return f"c.S{k} + {t}*c.B*c.{d}" if t != "0" else f"c.S{k}", f"c.{d}"
        if nm in G.group_of:
            g, off = G.group_of[nm]
            R = G.R(g)
            offc = "" if off == "0" else " + " + _cexpr(off)
            base = f"c.Y{g.index}" if g.static else f"c.Z{g.index}"
            step = f"c.stY{g.index}" if g.static else f"c.stZ{g.index}"
            return (f"{base} + {t}*{step}{offc}" if t != "0" else f"{base}{offc}"), f"c.{R}"
        if nm in G.Q:
            return (f"c.{G.Q[nm]} + {t}*c.B*c.{d}" if t != "0" else f"c.{G.Q[nm]}"), f"c.{d}"
        q = G.N[nm]
        return (f"c.{q} + {t}*c.st{q}" if t != "0" else f"c.{q}"), f"c.{d}"

    def _cexpr(e: str) -> str:
        return " + ".join(f"c.{p.strip()}" if p.strip() != "1" and not p.strip().isdigit() else p.strip() for p in e.split("+"))

    def tgt_ptr(tgt: tuple[str, str, str, str], caller: dict[str, str]) -> tuple[str, str]:
        kind, ptr, ld, off = tgt
        expr = caller[ptr]
        if off != "0":
            expr += " + " + _cexpr(off)
        return expr, ("c." + ld if ld not in ("1", "0") else "1")

    fwd: list[str] = []
    fwd.append("    # stacked weights of each group (and their transposes for the time loop)")
    for g in G.sgroups + G.dgroups:
        name = f"U{g.index}" if g.static else f"W{g.index}"
        R = G.R(g)
        c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
        for k, mat in enumerate(g.matrices):
            off = G._offset(g, k)
            offc = "0" if off == "0" else _cexpr(off)
            rows = f"c.{D[g.rows[k]]}" if g.rows[k] != 1 else "1"
            fwd.append(f"    memcpy(c.{name} + ({offc})*{c_}, c.{G.M[mat]}, sizeof(real)*{rows}*{c_})")
        if not g.static:
            fwd.append(f"    transpose(c.{R}, {c_}, c.W{g.index}, c.WT{g.index})")
    # the state-independent part: when it is nothing but products (no elementwise node of
    # the input alone), they are computed step by step inside the time loop for B >= STEP_WGRAD_MIN_B,
    # so each step's rows are used while in cache (one product over all T*B rows writes and
    # rereads a T*B-row array from memory: measured about 8% of a vector-gate training step);
    # otherwise, and for smaller batches, one product over T*B rows before the loop
    static_in_loop = bool(calls_sf) and all(isinstance(it, _Op) for it in calls_sf)
    fwd.append("    # state-independent part, all steps at once" +
               (f" (for B < {STEP_WGRAD_MIN_B}; else per step in the loop)" if static_in_loop else ""))
    if static_in_loop:
        fwd.append(f"    if B < {STEP_WGRAD_MIN_B}:")
    ind = "        " if static_in_loop else "    "
    for it in calls_sf:
        if isinstance(it, _Op):
            g = it.group
            assert g is not None
            sp, ld = src_ptr(g.source, True, "0")
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            fwd.append(f"{ind}# {', '.join(g.members)} = ({', '.join(g.matrices)}) @ {g.source}")
            fwd.append(f"{ind}mm(0, 1, c.T*c.B, c.RS{g.index}, {c_}, 1, {sp}, {ld}, c.U{g.index}, {c_}, 0, c.Y{g.index}, c.RS{g.index})")
        else:
            fwd.append(f"{ind}{it}")
    for k, s in enumerate(G.states):
        fwd.append(f"    memcpy(c.S{k}, c.H{k}, sizeof(real)*c.B*c.{D[G.dim_of[s]]})")
    fwd.append("    for t in range(T):")
    if static_in_loop:
        fwd.append(f"        if B >= {STEP_WGRAD_MIN_B}:")
        for it in calls_sf:
            g = it.group
            sp, ld = src_ptr(g.source, True, "t")
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            fwd.append(f"            mm(0, 1, B, c.RS{g.index}, {c_}, 1, {sp}, {ld}, c.U{g.index}, {c_}, 0, "
                       f"c.Y{g.index} + t*c.stY{g.index}, c.RS{g.index})")
    for it in calls_df:
        if isinstance(it, _Op):
            g = it.group
            assert g is not None
            sp, ld = src_ptr(g.source, False, "t")
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            fwd.append(f"        # {', '.join(g.members)} = ({', '.join(g.matrices)}) @ {g.source}")
            fwd.append(f"        mm(0, 0, B, c.R{g.index}, {c_}, 1, {sp}, {ld}, c.WT{g.index}, c.R{g.index}, 0, c.Z{g.index} + t*c.stZ{g.index}, c.R{g.index})")
        else:
            fwd.append(f"        {it}")

    bwd: list[str] = []
    bwd.append("    if c.GX != NULL:  # the input gradient is optional (not needed to train)")
    bwd.append("        memset(c.GX, 0, sizeof(real)*c.T*c.B*c." + D[xdim] + ")")
    for nm, code in G.P.items():
        dd = G.shape_of[nm][0]
        bwd.append(f"    memset(c.G{code}, 0, sizeof(real)*{('c.' + D[dd]) if dd != 1 else '1'})")
    for nm, code in G.p.items():
        bwd.append(f"    c.G{code}[0] = 0")
    for k in range(len(G.states)):
        bwd.append(f"    ca{k} = c.CA{k}")
        bwd.append(f"    cn{k} = c.CN{k}")
    bwd.append("    for t in range(T - 1, -1, -1):")
    for k, s in enumerate(G.states):
        dd = D[G.dim_of[s]]
        bwd.append(f"        if c.has_cot{k}:")
        bwd.append(f"            axpy(B*c.{dd}, 1, c.C{k} + t*B*c.{dd}, ca{k})")
    caller_names = {f"CN{k}": f"cn{k}" for k in range(len(G.states))}
    for it in calls_db:
        if isinstance(it, tuple):
            g, tgt, beta = it
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            # the weight gradient of the group, accumulated step by step while the step's source and
            # adjoints are in cache: (source_t)^T adjoint_t into the free transposed-weights buffer
            # (measured 1.1-1.16x faster per training step than one product over all T*B rows after
            # the loop, which streams both arrays from memory, for B >= 8; for smaller batches the
            # per-step products are too thin and the single product after the loop is kept)
            sp_t, ld_t = src_ptr(g.source, False, "t")
            if g.source in G.N:
                ld_t = f"c.{D[G.dim_of[g.source]]}"
            bwd.append(f"        if B >= {STEP_WGRAD_MIN_B}: mm(1, 0, {c_}, c.R{g.index}, B, 1, {sp_t}, {ld_t}, "
                       f"c.L{g.index} + t*c.stL{g.index}, c.R{g.index}, 0 if t == T - 1 else 1, c.WT{g.index}, c.R{g.index})")
            bwd.append(f"        # send the adjoints of {', '.join(g.members)} to {g.source}")
            if tgt is None:
                continue
            kind, ptr, ld, off = tgt
            caller = {f"CN{k}": f"cn{k}" for k in range(len(G.states))}
            caller.update({v: f"c.{v}" for v in G.A.values()})
            for gg in G.dgroups:
                caller[f"L{gg.index}"] = f"c.L{gg.index} + t*c.stL{gg.index}"
            tp, tld = tgt_ptr(tgt, caller)
            bwd.append(f"        mm(0, 0, B, {c_}, c.R{g.index}, 1, c.L{g.index} + t*c.stL{g.index}, c.R{g.index}, c.W{g.index}, {c_}, {beta}, {tp}, {tld})")
        else:
            bwd.append(f"        {it}")
    def static_wgrad(g: Group) -> tuple[str, str, str, str, str]:
        """Operands of the weight gradient of static group ``g`` at step ``t``: (source^T adjoint)."""
        if g.index in G.alias:
            a = G.alias[g.index].index
            ya, yld = f"c.L{a} + t*c.stL{a}", f"c.R{a}"
        else:
            ya, yld = f"c.YA{g.index} + t*B*c.RS{g.index}", f"c.RS{g.index}"
        c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
        return c_, ya, yld, *src_ptr(g.source, True, "t")

    # the weight gradients of the static groups, step by step for B >= STEP_WGRAD_MIN_B (the step's
    # adjoints are complete at the end of its iteration), as for the dynamic groups above
    for it in calls_sb:
        if isinstance(it, tuple) and G.static_wgrad_in_loop(it[0]):
            g = it[0]
            c_, ya, yld, sp_t, ld_t = static_wgrad(g)
            bwd.append(f"        if B >= {STEP_WGRAD_MIN_B}: mm(1, 0, {c_}, c.RS{g.index}, B, 1, {sp_t}, {ld_t}, "
                       f"{ya}, {yld}, 0 if t == T - 1 else 1, c.UT{g.index}, c.RS{g.index})")
    for k, s in enumerate(G.states):
        if f"CN{k}|0" not in step_written:
            bwd.append(f"        memset(cn{k}, 0, sizeof(real)*B*c.{D[G.dim_of[s]]})")
        bwd.append(f"        tmp = ca{k}; ca{k} = cn{k}; cn{k} = tmp")
    for k, s in enumerate(G.states):
        bwd.append(f"    if ca{k} != c.CA{k}:")
        bwd.append(f"        memcpy(c.CA{k}, ca{k}, sizeof(real)*c.B*c.{D[G.dim_of[s]]})")
    for gp, buf, ld, off, dd in colsums:
        offc = "" if off == "0" else " + " + _cexpr(off)
        bwd.append(f"    colsum(c.T*c.B, {G.cD(dd)}, c.{buf}{offc}, {'c.' + ld if ld != '1' else '1'}, c.{gp})")
    bwd.append(f"    # weight gradients: accumulated in the loop (B >= {STEP_WGRAD_MIN_B}) or one product over T*B rows")
    for g in G.dgroups:
        sp, ld = src_ptr(g.source, False, "0")
        if g.source in G.N:
            ld = f"c.{D[G.dim_of[g.source]]}"
        c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
        # as the transpose (source^T adjoint: the long adjoint array is BLAS's untransposed operand,
        # measured faster), into the free transposed-weights buffer, then transposed into place
        bwd.append(f"    if B < {STEP_WGRAD_MIN_B}: mm(1, 0, {c_}, c.R{g.index}, c.T*c.B, 1, {sp}, {ld}, c.L{g.index}, c.R{g.index}, 0, "
                   f"c.WT{g.index}, c.R{g.index})")
        bwd.append(f"    transpose({c_}, c.R{g.index}, c.WT{g.index}, c.GW{g.index})")
    bwd.append(f"    # state-independent part: weight gradients (in the loop for B >= {STEP_WGRAD_MIN_B}), input adjoints")
    for it in calls_sb:
        if isinstance(it, tuple):
            g, tgt, beta = it
            sp, ld = src_ptr(g.source, True, "0")
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            ya, yld = (f"c.L{G.alias[g.index].index}", f"c.R{G.alias[g.index].index}") if g.index in G.alias else \
                (f"c.YA{g.index}", f"c.RS{g.index}")
            # the whole-sequence product: for small batches, and for groups whose adjoint rows are
            # only complete after the state-independent backward pass above (a reader outside the loop)
            guard = f"if B < {STEP_WGRAD_MIN_B}: " if G.static_wgrad_in_loop(g) else ""
            bwd.append(f"    {guard}mm(1, 0, {c_}, c.RS{g.index}, c.T*c.B, 1, {sp}, {ld}, {ya}, {yld}, 0, "
                       f"c.UT{g.index}, c.RS{g.index})")
            bwd.append(f"    transpose({c_}, c.RS{g.index}, c.UT{g.index}, c.GU{g.index})")
            if tgt is not None:
                caller = {"GX": "c.GX"}
                caller.update({v: f"c.{v}" for v in G.QA.values()})
                caller.update({f"YA{gg.index}": f"c.YA{gg.index}" for gg in G.sgroups})
                tp, tld = tgt_ptr(tgt, caller)
                guard = "if c.GX != NULL: " if tp == "c.GX" else ""
                bwd.append(f"    {guard}mm(0, 0, c.T*c.B, {c_}, c.RS{g.index}, 1, {ya}, {yld}, c.U{g.index}, {c_}, {beta}, {tp}, {tld})")
        else:
            bwd.append(f"    {it}")

    # ---------------------------------------------------------------- JVP driver
    jv: list[str] = []
    jv.append("    # stacked tangent weights")
    for g in G.sgroups + G.dgroups:
        name = f"TU{g.index}" if g.static else f"TW{g.index}"
        c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
        for k, mat in enumerate(g.matrices):
            off = G._offset(g, k)
            offc = "0" if off == "0" else _cexpr(off)
            rows = f"c.{D[g.rows[k]]}" if g.rows[k] != 1 else "1"
            jv.append(f"    memcpy(c.{name} + ({offc})*{c_}, c.T{G.M[mat]}, sizeof(real)*{rows}*{c_})")
        if not g.static:
            jv.append(f"    transpose(c.R{g.index}, {c_}, c.TW{g.index}, c.TWT{g.index})")

    def tan_src_ptr(nm: str, t: str) -> tuple[str, str] | None:
        d = D[G.dim_of[nm]]
        kind = G.kind_of.get(nm)
        if kind == "input":
            return (f"c.TX + {t}*c.B*c.{d}" if t != "0" else "c.TX"), f"c.{d}"
        if kind == "state":
            k = G.states.index(nm)
            return f"c.TS{k} + {t}*c.B*c.{d}", f"c.{d}"
        if nm in G.group_of:
            g, off = G.group_of[nm]
            offc = "" if off == "0" else " + " + _cexpr(off)
            if g.static:
                return (f"c.TY{g.index} + {t}*c.B*c.RS{g.index}{offc}" if t != "0" else f"c.TY{g.index}{offc}"), f"c.RS{g.index}"
            return f"c.TZ{g.index}{offc}", f"c.R{g.index}"
        if nm in G.Q:
            return (f"c.T{G.Q[nm]} + {t}*c.B*c.{d}" if t != "0" else f"c.T{G.Q[nm]}"), f"c.{d}"
        return f"c.T{G.N[nm]}", f"c.{d}"

    def jvp_ops(ops: list[_Op], static: bool) -> list[str]:
        """Tangent code for the state-independent part (all T*B rows) or one time step."""
        ind, rows, t = ("    ", "c.T*c.B", "0") if static else ("        ", "B", "t")
        out = []
        for k, op in enumerate(ops):
            if op.kind == "loop":
                f_, call = G.jvp_function(f"{'s' if static else ''}jv{k}", op, static=static)
                funcs.append(f_)
                out.append(f"{ind}{call}")
                continue
            g = op.group
            assert g is not None
            sp, ld = src_ptr(g.source, static, t)
            tp_, tld = tan_src_ptr(g.source, t)  # type: ignore[misc]
            c_ = f"c.{D[g.cols]}" if g.cols != 1 else "1"
            # tangent of (stacked M) @ v = M @ (tangent of v) + (tangent of M) @ v
            if static:
                w, tw, tb, ldw, out_, R = f"c.U{g.index}", f"c.TU{g.index}", 1, c_, f"c.TY{g.index}", f"c.RS{g.index}"
            else:
                w, tw, tb, ldw, out_, R = f"c.WT{g.index}", f"c.TWT{g.index}", 0, f"c.R{g.index}", f"c.TZ{g.index}", f"c.R{g.index}"
            out.append(f"{ind}mm(0, {tb}, {rows}, {R}, {c_}, 1, {tp_}, {tld}, {w}, {ldw}, 0, {out_}, {R})")
            out.append(f"{ind}mm(0, {tb}, {rows}, {R}, {c_}, 1, {sp}, {ld}, {tw}, {ldw}, 1, {out_}, {R})")
        return out

    jv += jvp_ops(G.static_ops, True)
    for k, s_ in enumerate(G.states):
        jv.append(f"    memcpy(c.TS{k}, c.TH{k}, sizeof(real)*c.B*c.{D[G.dim_of[s_]]})")
    jv.append("    for t in range(T):")
    jv += jvp_ops(G.dyn_ops, False)

    # ---------------------------------------------------------------- module text
    rt = "float" if dt == np.float32 else "double"
    f = "f" if dt == np.float32 else ""
    gemm = "sgemm" if dt == np.float32 else "dgemm"
    bits = "uint32_t" if dt == np.float32 else "uint64_t"
    expmask = "0x7f800000U" if dt == np.float32 else "0x7ff0000000000000ULL"
    ctx_fields = [f"    real* {s.code}" for s in slots] + ["    double* LOSS"]
    int_fields = []
    for it in ints:
        if it[0] == "dim":
            int_fields.append(D[it[1]])
        elif it[0] in ("R", "RS"):
            int_fields.append(f"{it[0]}{it[1]}")
        elif it[0] == "stride":
            int_fields.append(f"st{it[1]}")
        elif it[0] == "has_cot":
            int_fields.append(f"has_cot{it[1]}")
        else:
            int_fields.append(it[0])
    ctx_fields += [f"    Py_ssize_t {nm}" for nm in int_fields]
    unpack = [f"    c.{s.code} = <real*><size_t>ptr[{k}]" for k, s in enumerate(slots)]
    unpack.append(f"    c.LOSS = <double*><size_t>ptr[{len(slots)}]")
    unpack += [f"    c.{nm} = iv[{k}]" for k, nm in enumerate(int_fields)]
    # finiteness checks: every input slot (reads only; bound arrays of the run), every result
    in_checks = []
    for k, s in enumerate(slots[:n_inputs]):
        in_checks.append(f"    if c.{s.code} != NULL and not all_finite(c.{s.code}, sz[{k}]):\n        return {k + 1}")
    out_codes = ["GX", "GV"] + [f"CA{k}" for k in range(len(G.states))] + [f"GW{g.index}" for g in G.dgroups] + \
        [f"GU{g.index}" for g in G.sgroups] + ["G" + v for v in G.P.values()] + ["G" + v for v in G.p.values()]
    out_idx = [next(k for k, s in enumerate(slots) if s.code == oc) for oc in out_codes]
    temps_line = ", ".join(["tmp"] + [f"ca{k}, cn{k}" for k in range(len(G.states))])
    header = _header(cell, dt)
    body = f"""
from libc.math cimport tanh{f}, exp{f}, expm1{f}, copysign{f}, log{f}, log1p{f}, pow{f}, sqrt{f}, fabs{f}
from libc.string cimport memcpy, memset
from libc.stdint cimport {bits}{', uint64_t' if bits != 'uint64_t' else ''}
from scipy.linalg.cython_blas cimport {gemm}

ctypedef {rt} real

CONTENT_HASH = "(pending)"

cdef extern from *:
    ctypedef {rt}* rp "{rt} * __restrict__"


cdef inline real sg_sigmoid(real u) noexcept nogil:
    # exp of a non-positive number only (no overflow); branch-free, so loops vectorise
    # (literals typed as real: Cython writes a bare 1 as the double 1.0, promoting float32 to double)
    cdef real one = 1, zero = 0
    cdef real e = exp{f}(-fabs{f}(u))
    cdef real r = one / (one + e)
    return r if u >= zero else e*r


cdef inline real sg_tanh(real u) noexcept nogil:
    # tanh u = sign(u) (1 - e)/(1 + e), e = exp(-2|u|), written with em = expm1(-2|u|) in (-1, 0]
    # as -em/(2 + em): full relative accuracy for small |u| (no 1 - e cancellation), no overflow;
    # branch-free, so loops vectorise through libmvec's expm1 (2-4x faster than its tanh here)
    cdef real two = 2
    cdef real em = expm1{f}(-two*fabs{f}(u))
    return copysign{f}(-em/(two + em), u)


cdef inline real sg_softplus(real u) noexcept nogil:
    cdef real zero = 0
    return (u if u > zero else zero) + log1p{f}(exp{f}(-fabs{f}(u)))


cdef bint all_finite(const real* p, Py_ssize_t n) noexcept nogil:
    # by bit pattern: -ffast-math may assume finite floats and drop isfinite() tests
    cdef Py_ssize_t k
    cdef {bits} u, bad = 0
    for k in range(n):
        memcpy(&u, &p[k], sizeof(real))
        bad |= <{bits}>((u & {expmask}) == {expmask})
    return bad == 0


cdef bint finite_double(double v) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &v, sizeof(double))
    return (u & 0x7ff0000000000000ULL) != 0x7ff0000000000000ULL


cdef void small_mm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, real alpha, rp A, Py_ssize_t lda,
                   rp Bm, Py_ssize_t ldb, real beta, rp C, Py_ssize_t ldc) noexcept nogil:
    # row-major C = alpha A B + beta C (beta 0 or 1) for small products: blocks of two rows of C
    # are updated by four rows of B at a time, so each loaded row of B serves two rows of C and
    # each element of C is loaded and stored K/4 times
    cdef Py_ssize_t r, k, j
    cdef real a0, a1, a2, a3, e0, e1, e2, e3
    cdef rp c0
    cdef rp c1
    cdef rp b0
    if beta == 0:
        for r in range(M):
            for j in range(N):
                C[r*ldc + j] = 0
    r = 0
    while r + 2 <= M:
        c0 = C + r*ldc
        c1 = c0 + ldc
        k = 0
        while k + 4 <= K:
            a0 = alpha*A[r*lda + k]
            a1 = alpha*A[r*lda + k + 1]
            a2 = alpha*A[r*lda + k + 2]
            a3 = alpha*A[r*lda + k + 3]
            e0 = alpha*A[(r + 1)*lda + k]
            e1 = alpha*A[(r + 1)*lda + k + 1]
            e2 = alpha*A[(r + 1)*lda + k + 2]
            e3 = alpha*A[(r + 1)*lda + k + 3]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j] + a1*b0[ldb + j] + a2*b0[2*ldb + j] + a3*b0[3*ldb + j]
                c1[j] += e0*b0[j] + e1*b0[ldb + j] + e2*b0[2*ldb + j] + e3*b0[3*ldb + j]
            k += 4
        while k < K:
            a0 = alpha*A[r*lda + k]
            e0 = alpha*A[(r + 1)*lda + k]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j]
                c1[j] += e0*b0[j]
            k += 1
        r += 2
    if r < M:
        c0 = C + r*ldc
        k = 0
        while k + 4 <= K:
            a0 = alpha*A[r*lda + k]
            a1 = alpha*A[r*lda + k + 1]
            a2 = alpha*A[r*lda + k + 2]
            a3 = alpha*A[r*lda + k + 3]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j] + a1*b0[ldb + j] + a2*b0[2*ldb + j] + a3*b0[3*ldb + j]
            k += 4
        while k < K:
            a0 = alpha*A[r*lda + k]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j]
            k += 1


cdef void mm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, real alpha, real* A, Py_ssize_t lda,
             real* Bm, Py_ssize_t ldb, real beta, real* C, Py_ssize_t ldc) noexcept nogil:
    # row-major C (M x N) = alpha op(A) op(B) + beta C, through column-major BLAS on the transposes
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef int m_ = <int>N, n_ = <int>M, k_ = <int>K, la = <int>lda, lb = <int>ldb, lc = <int>ldc
    if M == 0 or N == 0:
        return
    if not ta and not tb and (M < 4 or M*N*K <= {SMALL_GEMM}):
        small_mm(M, N, K, alpha, A, lda, Bm, ldb, beta, C, ldc)
        return
    {gemm}(&cb, &ca, &m_, &n_, &k_, &alpha, Bm, &lb, A, &la, &beta, C, &lc)


cdef void transpose(Py_ssize_t R, Py_ssize_t C, const real* A, real* AT) noexcept nogil:
    cdef Py_ssize_t r, j
    for r in range(R):
        for j in range(C):
            AT[j*R + r] = A[r*C + j]


cdef void colsum(Py_ssize_t rows, Py_ssize_t n, const real* A, Py_ssize_t lda, real* out) noexcept nogil:
    # out += the column sums of the rows x n block A (leading dimension lda)
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(n):
            out[j] += A[r*lda + j]


cdef void axpy(Py_ssize_t n, real s, const real* x, real* y) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        y[k] += s*x[k]


cdef struct Ctx:
{chr(10).join(ctx_fields)}


{chr(10).join(funcs)}

cdef void forward(Ctx* c) noexcept nogil:
    cdef Py_ssize_t t, T = c.T, B = c.B
{chr(10).join(fwd)}


cdef void loss(Ctx* c, bint step) noexcept nogil:
    # MSE of the readout V h (V: o x n) against y: last state (B x o) or every step (T x B x o)
    cdef Py_ssize_t rows = c.T*c.B if step else c.B, k
    cdef real* H = c.S0 + (c.B*c.{D[G.dim_of[G.states[0]]]} if step else c.T*c.B*c.{D[G.dim_of[G.states[0]]]})
    cdef Py_ssize_t n = c.{D[G.dim_of[G.states[0]]]}
    cdef double acc = 0
    cdef real s = <real>(2.0/(rows*c.o))
    for k in range(rows*c.o):
        c.LR[k] = -c.LY[k]
    mm(0, 1, rows, c.o, n, 1, H, n, c.LV, n, 1, c.LR, c.o)
    for k in range(rows*c.o):
        acc += (<double>c.LR[k])*c.LR[k]
    c.LOSS[0] = acc/(rows*c.o)
    mm(1, 0, c.o, n, rows, s, c.LR, c.o, H, n, 0, c.GV, n)
    if step:
        mm(0, 0, rows, n, c.o, s, c.LR, c.o, c.LV, n, 0, c.C0, n)
        c.has_cot0 = 1
    else:
        mm(0, 0, rows, n, c.o, s, c.LR, c.o, c.LV, n, 0, c.CA0, n)


cdef void jvp(Ctx* c) noexcept nogil:
    # forward mode along the tangents TX, TM*, TP*, Tp*, TH* (needs a forward pass that stored every node)
    cdef Py_ssize_t t, T = c.T, B = c.B
{chr(10).join(jv)}


cdef void backward(Ctx* c) noexcept nogil:
    cdef Py_ssize_t t, T = c.T, B = c.B
    cdef real* {temps_line.replace(', ', ', *')}
{chr(10).join(bwd)}


def run(size_t ptr_addr, size_t iv_addr, size_t sz_addr, int what):
    \"\"\"Run the program.  The three arguments are addresses of int64 arrays the caller keeps
    alive: the data pointers of the arrays in slot order (then the loss value's), the sizes
    (``ints`` of the generator) and the element counts to check for NaN/inf (0: unchecked).

    ``what``: 1 forward, 2 last-state loss, 4 per-step loss, 8 BPTT, 16 JVP (bits).  Returns 0,
    or k > 0 if input slot k-1 holds a NaN/inf, or -1 if a result is not finite.
    \"\"\"
    cdef const long long* ptr = <const long long*>ptr_addr
    cdef const long long* iv = <const long long*>iv_addr
    cdef const long long* szp = <const long long*>sz_addr
    cdef Ctx c
    cdef int k
{chr(10).join(unpack)}
    with nogil:
        k = _checked(&c, szp, what)
    return k


cdef int _checked(Ctx* c, const long long* sz, int what) noexcept nogil:
{chr(10).join(in_checks)}
    if what & {FORWARD}:
        forward(c)
        if not all_finite(c.S0 + c.T*c.B*c.{D[G.dim_of[G.states[0]]]}, c.B*c.{D[G.dim_of[G.states[0]]]}):
            return -1
    if what & {BACKWARD}:
{chr(10).join(f"        memset(c.CA{k}, 0, sizeof(real)*c.B*c.{D[G.dim_of[st]]})" for k, st in enumerate(G.states))}
    if what & {LOSS_LAST}:
        loss(c, 0)
    if what & {LOSS_STEP}:
        loss(c, 1)
    if what & {LOSS_LAST | LOSS_STEP} and not finite_double(c.LOSS[0]):
        return -1
    if what & {JVP}:  # before BPTT, which reuses the transposed-weights buffers as scratch
        jvp(c)
{chr(10).join(f"        if not all_finite(c.TS{k} + c.T*c.B*c.{D[G.dim_of[st]]}, c.B*c.{D[G.dim_of[st]]}):{chr(10)}            return -1" for k, st in enumerate(G.states))}
    if what & {BACKWARD}:
        backward(c)
{chr(10).join(f"        if c.{slots[k].code} != NULL and not all_finite(c.{slots[k].code}, sz[{k}]):{chr(10)}            return -1" for k in out_idx)}
    return 0
"""
    source = header + body
    scratch = _scratch_rows(G, fwd, bwd, jv)
    h = hashlib.sha256(source.encode()).hexdigest()
    source = source.replace("# content hash: (pending)", f"# content hash: {h}")
    source = source.replace('CONTENT_HASH = "(pending)"', f'CONTENT_HASH = "{h}"')
    return GeneratedSource(source, slots, ints, G.sgroups + G.dgroups, G.dims, G.states, G.nodes, G.static_nodes,
                           G.needed, aliases={k: g.index for k, g in G.alias.items()},
                           x_elementwise=any(src == G.xname for it in G.items.values() for src, _ in it.partials),
                           scratch=scratch, content_hash=h)


def _scratch_rows(G: Any, fwd: list[str], bwd: list[str], jv: list[str]) -> frozenset[str]:
    """The (T, B, .) arrays that may be a single (B, .) row reused every step (stride 0) when
    the batch takes the per-step products (``B >= STEP_WGRAD_MIN_B``): an input product ``Y``
    read only at its own step of the forward loop, and a group adjoint ``L`` read only at
    its own step of the BPTT loop.  Read off the driver code: every other reference must sit
    on a line that runs only for small batches (``if B < ...``) or only when the input
    gradient is requested (``if c.GX != NULL``), in which cases the caller keeps every row."""
    small = f"if B < {STEP_WGRAD_MIN_B}"

    def only_per_step(code: str, lines: list[str], stride: str) -> bool:
        pat = re.compile(rf"c\.{code}\b(?! \+ t\*c\.{stride}\b)")
        in_small_block = False
        for ln in lines:
            stripped = ln.strip()
            if stripped.startswith(small + ":") and stripped.endswith(":"):
                in_small_block = True  # a block of its own: the indented lines below it
                continue
            if in_small_block and ln.startswith(" " * 8):
                continue
            in_small_block = False
            if stripped.startswith(small) or stripped.startswith("if c.GX != NULL"):
                continue
            if pat.search(ln):
                return False
        return True

    out = set()
    for g in G.sgroups:
        c = f"Y{g.index}"
        if only_per_step(c, fwd, f"st{c}") and not any(re.search(rf"c\.{c}\b", ln) for ln in bwd + jv):
            out.add(c)
    for g in G.dgroups:
        c = f"L{g.index}"
        if only_per_step(c, bwd, f"st{c}") and not any(re.search(rf"c\.{c}\b", ln) for ln in fwd + jv):
            out.add(c)
    return frozenset(out)


def _header(cell: Cell, dt: np.dtype) -> str:
    from ._build import _version

    lines = [
        "# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False",
        f"# symgate {_version()} generated kernel for cell {cell.name!r} ({dt})",
        "# content hash: (pending)",
        "#",
        "# update equations:",
    ]
    lines += [f"#   {ln}" for ln in cell.update_equations()]
    J = jacobian(cell)
    lines += ["#", "# state Jacobian (terms by origin):"]
    lines += [f"#   {ln}" for ln in J.describe().splitlines()]
    return "\n".join(lines) + "\n"
