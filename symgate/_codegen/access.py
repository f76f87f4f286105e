"""Where values and adjoints live: the code that reads a value or accumulates an adjoint.

A generated elementwise function works on the rows ``b`` and units ``i`` of one fused loop.
:class:`Emitter` knows, for every named value of the cell, the array (or local, or
argument) that holds it in each context -- ``"static"`` (rows are all ``T*B`` steps at
once), ``"fwd"`` and ``"bwd"`` (the rows of step ``t``) -- and where its adjoint
accumulates.  :class:`FnParams` collects the pointers and scalars a generated function
takes, with the expression the driver passes for each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from .._cell import Dim
from .._errors import CellSpecError
from .layout import Layout
from .plan import CellPlan
from .printer import KernelPrinter
from .runplan import GemmSite

__all__ = ["FnParams", "Emitter", "at"]


class FnParams:
    """The parameters of one generated elementwise function and what the driver passes for each."""

    def __init__(self) -> None:
        self.ptrs: dict[str, str] = {}  # pointer parameter -> caller expression
        self.vals: dict[str, str] = {}  # scalar parameter -> caller expression

    def ptr(self, name: str, caller: str) -> str:
        self.ptrs.setdefault(name, caller)
        return name

    def val(self, name: str, caller: str) -> str:
        self.vals.setdefault(name, caller)
        return name


def at(ptr: str, ld: str, off: str, d: Dim, i: str = "i") -> str:
    """``ptr[b*ld + off + i]``: unit ``i`` (none for a scalar) of row ``b`` at column offset ``off``."""
    idx = "b" if ld == "1" else f"b*{ld}"
    if off != "0":
        idx += f" + {off}"
    if d != 1:
        idx += f" + {i}"
    return f"{ptr}[{idx}]"


class Emitter:
    """Plan, layout and printer of one generation, with the accessors every emitter uses."""

    def __init__(self, plan: CellPlan, dtype: np.dtype) -> None:
        self.plan = plan
        self.dtype = dtype
        self.layout = Layout(plan)
        self.printer = KernelPrinter(dtype)
        self.symbol = plan.symbols
        self.name_of = {s: n for n, s in self.symbol.items()}
        self.constants = plan.cell.constants
        self.max_temps = 0  # CSE temporaries the largest function needs
        self.gemm_sites: list[GemmSite] = []  # every matrix product, in emission order

    def mm(self, role: str, ta: int, tb: int, M: str, N: str, K: str, rest: str) -> str:
        """A matrix product of the program (a run-plan site: plain loops or BLAS, by the ``c.rt<k>`` flag)."""
        site = GemmSite(len(self.gemm_sites), role, ta, tb, M, N, K)
        self.gemm_sites.append(site)
        return f"mm(c.rt{site.index}, {ta}, {tb}, {M}, {N}, {K}, {rest})"

    def code(self, e: sympy.Expr) -> str:
        return self.printer.code(e)

    def note_temps(self, count: int) -> None:
        self.max_temps = max(self.max_temps, count)

    def temps(self) -> list[str]:
        return [f"_c{k}" for k in range(max(self.max_temps, 1))]

    # ------------------------------------------------------------------ values
    def value(self, nm: str, fn: FnParams, ctx: str, local: dict[str, str], tangent: bool = False) -> Any:
        """Code reading the value of ``nm`` (or, with ``tangent``, its tangent) at row ``b``, unit ``i``.

        ``ctx`` is ``"static"`` (rows are all T*B), ``"fwd"`` or ``"bwd"`` (rows of step t).
        Tangent arrays are named like the values with a ``T`` prefix; the tangents of
        state-dependent nodes and groups are per-step rows, and constants have none (None).
        """
        if nm in local:
            return local[nm]
        p, lay = self.plan, self.layout
        d = p.dim_of[nm]
        D, cD = lay.dim_code[d], lay.ctx_dim(d)
        kind = p.kind_of.get(nm)
        tB = "" if ctx == "static" else " + t*B*"
        T = "T" if tangent else ""
        if kind == "constant":
            return None if tangent else self.code(sympy.Float(self.constants[nm]))
        if kind == "vector":
            code = lay.vector_code[nm]
            return f"{fn.ptr(T + code, 'c.' + T + code)}[{'i' if d != 1 else '0'}]"
        if kind == "scalar":
            return fn.val(T + lay.scalar_code[nm], f"c.{T}{lay.scalar_code[nm]}[0]")
        if kind == "input":
            return at(fn.ptr(T + "X", f"c.{T}X" + (tB + cD if tB else "")), D, "0", d)
        if kind == "state":
            k = p.states.index(nm)
            return at(fn.ptr(f"{T}S{k}", f"c.{T}S{k} + t*B*{cD}"), D, "0", d)
        if nm in p.group_of:
            return self._group_value(nm, fn, tB, T)
        if nm in lay.static_node_code:
            q = lay.static_node_code[nm]
            return at(fn.ptr(T + q, f"c.{T}{q}" + (tB + cD if tB else "")), D, "0", d)
        if nm in lay.node_code:
            q = lay.node_code[nm]
            step = "" if tangent else f" + t*c.st{q}"
            return at(fn.ptr(T + q, f"c.{T}{q}{step}"), D, "0", d)
        raise CellSpecError(f"internal: no storage for {nm!r}")  # pragma: no cover

    def _group_value(self, nm: str, fn: FnParams, tB: str, T: str) -> str:
        g, off = self.layout.member_offset(nm)
        R, d = self.layout.rows(g), self.plan.dim_of[nm]
        if g.static and T:
            return at(fn.ptr(f"{T}Y{g.index}", f"c.{T}Y{g.index}" + (tB + "c." + R if tB else "")), R, off, d)
        if g.static:
            return at(fn.ptr(f"Y{g.index}", f"c.Y{g.index}" + (f" + t*c.stY{g.index}" if tB else "")), R, off, d)
        step = "" if T else f" + t*c.stZ{g.index}"
        return at(fn.ptr(f"{T}Z{g.index}", f"c.{T}Z{g.index}{step}"), R, off, d)

    # ------------------------------------------------------------------ adjoints
    def adjoint(self, nm: str, fn: FnParams, ctx: str) -> tuple[str, str, str, str] | None:
        """Where the adjoint of ``nm`` accumulates: ``(kind, pointer, ld, offset)``, or None (no adjoint).

        kinds: ``local`` (a register), ``step`` (a per-step buffer: first write ``=``, then
        ``+=``), ``acc`` (accumulated over all steps: the input, vector parameters), ``scalar``.
        """
        p, lay = self.plan, self.layout
        d = p.dim_of[nm]
        D, cD = lay.dim_code[d], lay.ctx_dim(d)
        kind = p.kind_of.get(nm)
        tB = "" if ctx == "static" else " + t*B*"
        if kind == "constant":
            return None
        if nm in p.register_adjoints:
            return ("local", f"u_{lay.node_id(nm)}", "", "0")
        if kind == "vector":
            return ("acc", fn.ptr("G" + lay.vector_code[nm], "c.G" + lay.vector_code[nm]), "0", "0")
        if kind == "scalar":
            return ("scalar", fn.ptr("G" + lay.scalar_code[nm], "c.G" + lay.scalar_code[nm]), "0", "0")
        if kind == "input":
            return ("acc", fn.ptr("GX", "c.GX" + (tB + cD if tB else "")), D, "0")
        if kind == "state":
            k = p.states.index(nm)
            return ("step", fn.ptr(f"CN{k}", f"cn{k}"), D, "0")
        if nm in p.group_of:
            return self._group_adjoint(nm, fn, tB)
        if nm in lay.static_adjoint_code:
            qa = lay.static_adjoint_code[nm]
            return ("step", fn.ptr(qa, f"c.{qa}" + (tB + cD if tB else "")), D, "0")
        if nm in lay.adjoint_code:
            a = lay.adjoint_code[nm]
            return ("step", fn.ptr(a, f"c.{a}"), D, "0")
        raise CellSpecError(f"internal: no adjoint storage for {nm!r}")  # pragma: no cover

    def _group_adjoint(self, nm: str, fn: FnParams, tB: str) -> tuple[str, str, str, str] | None:
        g, off = self.layout.member_offset(nm)
        R = self.layout.rows(g)
        if g.static and g.index in self.plan.shared_adjoint:
            return None  # the same adjoint is stored once, in the dynamic twin's buffer
        if g.static:
            return ("step", fn.ptr(f"YA{g.index}", f"c.YA{g.index}" + (tB + "c." + R if tB else "")), R, off)
        return ("step", fn.ptr(f"L{g.index}", f"c.L{g.index} + t*c.stL{g.index}"), R, off)

    # ------------------------------------------------------------------ functions
    def _size_params(self) -> list[str]:
        lay = self.layout
        return ["Py_ssize_t B"] + [f"Py_ssize_t {lay.dim_code[d]}" for d in self.plan.dims] + \
            [f"Py_ssize_t {lay.rows(g)}" for g in self.plan.groups]

    def _size_args(self, rows: str) -> list[str]:
        lay = self.layout
        return [rows] + [f"c.{lay.dim_code[d]}" for d in self.plan.dims] + [f"c.{lay.rows(g)}" for g in self.plan.groups]

    def signature(self, name: str, fn: FnParams) -> str:
        params = self._size_params() + [f"rp {p}" for p in fn.ptrs] + [f"real {v}" for v in fn.vals]
        return f"cdef void {name}({', '.join(params)}) noexcept nogil:"

    def call(self, name: str, fn: FnParams, rows: str) -> str:
        return f"{name}({', '.join(self._size_args(rows) + list(fn.ptrs.values()) + list(fn.vals.values()))})"

    def unit_loop(self, d: Dim) -> str:
        return f"        for i in range({self.layout.dim_code[d]}):" if d != 1 else "        for i in range(1):"


def ctx_expr(e: str) -> str:
    """A size expression of generated-function parameters (``D0 + D1``) as the driver reads it (``c.D0 + c.D1``)."""
    return " + ".join(f"c.{p.strip()}" if p.strip() != "1" and not p.strip().isdigit() else p.strip() for p in e.split("+"))


def source_block(em: Emitter, nm: str, t: str) -> tuple[str, str]:
    """Pointer to the block of rows of the values of ``nm`` starting at step ``t``, and its leading dimension."""
    p, lay = em.plan, em.layout
    d = lay.dim_code[p.dim_of[nm]]
    if p.kind_of.get(nm) == "input":
        return f"c.X + {t}*c.B*{ctx_expr(d)}" if t != "0" else "c.X", ctx_expr(d)
    if p.kind_of.get(nm) == "state":
        k = p.states.index(nm)
        return f"c.S{k} + {t}*c.B*{ctx_expr(d)}" if t != "0" else f"c.S{k}", ctx_expr(d)
    if nm in p.group_of:
        g, off = lay.member_offset(nm)
        offc = "" if off == "0" else " + " + ctx_expr(off)
        base = f"c.Y{g.index}" if g.static else f"c.Z{g.index}"
        step = f"c.stY{g.index}" if g.static else f"c.stZ{g.index}"
        return (f"{base} + {t}*{step}{offc}" if t != "0" else f"{base}{offc}"), f"c.{lay.rows(g)}"
    if nm in lay.static_node_code:
        q = lay.static_node_code[nm]
        return (f"c.{q} + {t}*c.B*{ctx_expr(d)}" if t != "0" else f"c.{q}"), ctx_expr(d)
    q = lay.node_code[nm]
    return (f"c.{q} + {t}*c.st{q}" if t != "0" else f"c.{q}"), ctx_expr(d)


def tangent_block(em: Emitter, nm: str, t: str) -> tuple[str, str]:
    """Pointer to the tangents of ``nm`` at step ``t`` (per-step rows for state-dependent values), and its ld."""
    p, lay = em.plan, em.layout
    d = lay.dim_code[p.dim_of[nm]]
    kind = p.kind_of.get(nm)
    if kind == "input":
        return (f"c.TX + {t}*c.B*{ctx_expr(d)}" if t != "0" else "c.TX"), ctx_expr(d)
    if kind == "state":
        k = p.states.index(nm)
        return f"c.TS{k} + {t}*c.B*{ctx_expr(d)}", ctx_expr(d)
    if nm in p.group_of:
        g, off = lay.member_offset(nm)
        offc = "" if off == "0" else " + " + ctx_expr(off)
        if g.static:
            return (f"c.TY{g.index} + {t}*c.B*c.RS{g.index}{offc}" if t != "0" else f"c.TY{g.index}{offc}"), f"c.RS{g.index}"
        return f"c.TZ{g.index}{offc}", f"c.R{g.index}"
    if nm in lay.static_node_code:
        q = lay.static_node_code[nm]
        return (f"c.T{q} + {t}*c.B*{ctx_expr(d)}" if t != "0" else f"c.T{q}"), ctx_expr(d)
    return f"c.T{lay.node_code[nm]}", ctx_expr(d)


def target_block(tgt: tuple[str, str, str, str], caller: dict[str, str]) -> tuple[str, str]:
    """Pointer and leading dimension, in the driver, of an adjoint target of a generated function."""
    kind, ptr, ld, off = tgt
    expr = caller[ptr]
    if off != "0":
        expr += " + " + ctx_expr(off)
    return expr, ("c." + ld if ld not in ("1", "0") else "1")
