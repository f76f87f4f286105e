r"""Cython code generation for the time loops of any cell.

The generated module has two functions, ``forward`` and ``backward``, that run the
*state-dependent* part of a cell over all time steps in compiled, ``nogil`` code:
Linear nodes as BLAS GEMMs (``scipy.linalg.cython_blas``), elementwise nodes and
local partials printed from SymPy by :class:`KernelPrinter` (a subclass of SymPy's
C99 printer: dispatch by type, float32/float64 from its type-alias table), with
deterministic common-subexpression elimination.  The state-independent part (input
projections for all steps in one GEMM, biases) and the weight gradients (one GEMM
over ``T*B``) stay in numpy, shared with the reference kernels.

Every identifier in generated code comes from a fixed scheme (``S0`` states, ``N3``
nodes, ``Q1`` state-independent nodes, ``M2`` matrices, ``P0`` vectors, ``p0``
scalars, ``D0`` sizes); user names appear only in comments, and they are validated
identifiers.  The same cell always gives byte-identical source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.codegen.rewriting import create_expand_pow_optimization, optimize
from sympy.printing.c import C99CodePrinter

from ._cell import Cell, Dim
from ._derive import jacobian
from ._derive._local import Owner, local_partials
from ._errors import CellSpecError

__all__ = ["KernelPrinter", "generate", "GeneratedSource"]

_EXPAND_POW = [create_expand_pow_optimization(4)]


class KernelPrinter(C99CodePrinter):
    """SymPy -> C for kernel bodies: symbols print as array accesses, gates as stable helpers."""

    def __init__(self, dtype: np.dtype, access: dict[sympy.Symbol, str]) -> None:
        # no C macros (M_LN2, ...): Cython does not know them; constants print as expressions
        super().__init__({"type_aliases": {real: float32 if dtype == np.float32 else float64}, "math_macros": {}})
        self._access = access
        self._single = dtype == np.float32

    def _print_Float(self, f: Any) -> str:  # noqa: N802
        # Cython has no 1.0F literal: cast a double literal to the kernel's real type
        lit = super()._print_Float(f)
        return f"(<real>{lit.rstrip('F')})" if self._single else lit

    def _print_Rational(self, r: Any) -> str:  # noqa: N802
        lit = f"{int(r.p)}.0/{int(r.q)}.0"
        return f"(<real>({lit}))" if self._single else f"({lit})"

    def _print_Symbol(self, s: sympy.Symbol) -> str:  # noqa: N802 - SymPy's dispatch name
        if s in self._access:
            return self._access[s]
        if s.name.startswith("_c"):  # a CSE temporary
            return s.name
        raise CellSpecError(f"internal: no code for symbol {s.name!r}")

    def _print_Sigmoid(self, e: Any) -> str:  # noqa: N802
        return f"sg_sigmoid({self._print(e.args[0])})"

    def _print_Softplus(self, e: Any) -> str:  # noqa: N802
        return f"sg_softplus({self._print(e.args[0])})"


@dataclass
class GeneratedSource:
    """Generated Cython source and the argument layout the wrapper must follow."""

    source: str
    states: list[str]
    dynamic_nodes: list[str]
    static_nodes: list[str]
    matrices: list[str]
    vectors: list[str]
    scalars: list[str]
    dims: list[Dim]
    reads_x: bool
    content_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _cse(exprs: list[sympy.Expr]) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list[sympy.Expr]]:
    temps = sympy.numbered_symbols("_c")
    repl, red = sympy.cse(exprs, symbols=temps, order="canonical")
    return repl, red


def generate(cell: Cell, dtype: Any) -> GeneratedSource:
    """The Cython source of ``cell``'s forward and BPTT time loops for ``dtype``."""
    from ._reference import reference_kernel

    dt = np.dtype(dtype)
    if dt not in (np.dtype("float32"), np.dtype("float64")):
        raise CellSpecError(f"kernels are generated for float32 and float64, not {dt}")
    plan = reference_kernel(cell, "float64")._plan
    lp = local_partials(cell)
    dyn = [st for st in plan if not st.static]
    dims: list[Dim] = list(cell.dims())
    D = {d: f"D{k}" for k, d in enumerate(dims)}
    D[1] = "1"
    states = [s.name for s in cell.states]
    S = {name: f"S{k}" for k, name in enumerate(states)}
    dyn_nodes = [st.name for st in dyn if st.kind != "out"]
    N = {name: f"N{k}" for k, name in enumerate(dyn_nodes)}
    static_nodes = [st.name for st in plan if st.static]
    Q = {name: f"Q{k}" for k, name in enumerate(static_nodes)}
    mats = [p.name for p in cell.params if p.kind == "matrix"]
    M = {name: f"M{k}" for k, name in enumerate(mats)}
    vecs = [p.name for p in cell.params if p.kind == "vector"]
    P = {name: f"P{k}" for k, name in enumerate(vecs)}
    scals = [p.name for p in cell.params if p.kind == "scalar"]
    p_ = {name: f"p{k}" for k, name in enumerate(scals)}
    consts = cell.constants
    xname = cell.inputs[0].name
    dim_of = {lf.name: lf.dim for lf in cell.leaves}
    dim_of.update({nd.name: nd.dim for nd in cell.nodes})
    sym_of = cell.symbols

    def idx(name: str) -> str:
        return "i" if dim_of[name] != 1 else "0"

    def fwd_access() -> dict[sympy.Symbol, str]:
        acc: dict[sympy.Symbol, str] = {}
        for name, sym in sym_of.items():
            ii = idx(name)
            if name in S:
                acc[sym] = f"{S[name]}[t, b, {ii}]"
            elif name in N:
                acc[sym] = f"{N[name]}[t, b, {ii}]"
            elif name in Q:
                acc[sym] = f"{Q[name]}[t, b, {ii}]"
            elif name == xname:
                acc[sym] = f"X[t, b, {ii}]"
            elif name in P:
                acc[sym] = f"{P[name]}[{ii}]"
            elif name in p_:
                acc[sym] = p_[name]
            elif name in consts:
                acc[sym] = repr(float(consts[name]))
        return acc

    def adj_target(name: str) -> str | None:
        ii = idx(name)
        if name in S:
            return f"CN{states.index(name)}[b, {ii}]"
        if name in N:
            return f"AD{dyn_nodes.index(name)}[b, {ii}]"
        if name in Q:
            return f"QA{static_nodes.index(name)}[t, b, {ii}]"
        if name == xname:
            return f"GX[t, b, {ii}]"
        if name in P:
            return f"GP{vecs.index(name)}[{ii}]"
        if name in p_:
            return f"Gp{scals.index(name)}[0]"
        return None  # a constant

    printer = KernelPrinter(dt, fwd_access())
    max_temps = 0

    def code(e: sympy.Expr) -> str:
        return printer.doprint(optimize(e, _EXPAND_POW))

    def block(exprs: list[sympy.Expr], targets: list[str], ops: list[str], indent: str) -> list[str]:
        nonlocal max_temps
        repl, red = _cse(exprs)
        max_temps = max(max_temps, len(repl))
        lines = [f"{indent}{sym.name} = {code(e)}" for sym, e in repl]
        lines += [f"{indent}{tgt} {op}({code(e)})" for tgt, op, e in zip(targets, ops, red)]
        return lines

    # ---------------------------------------------------------------- forward
    fwd: list[str] = []
    for st in dyn:
        if st.kind == "linear":
            src = st.source
            src_ptr = f"&{S[src]}[t, 0, 0]" if src in S else f"&{N[src]}[t, 0, 0]"
            r, c = (D[d] for d in next(p.shape for p in cell.params if p.name == st.matrix))
            fwd.append(f"            # {st.name} = {st.matrix} @ {src}")
            fwd.append(f"            gemm_nt(B, {r}, {c}, {src_ptr}, <real*>&{M[st.matrix]}[0, 0], &{N[st.name]}[t, 0, 0], 0)")
            continue
        owner_expr = cell.outputs[states.index(st.state)] if st.kind == "out" else cell.node(st.name).expr  # type: ignore[union-attr]
        target = f"{S[st.state]}[t + 1, b, {'i' if st.dim != 1 else '0'}]" if st.kind == "out" else f"{N[st.name]}[t, b, {'i' if st.dim != 1 else '0'}]"
        fwd.append(f"            # {st.name}")
        fwd.append("            for b in range(B):")
        fwd.append(f"                for i in range({D[st.dim]}):")
        fwd += block([owner_expr], [target], ["= "], "                    ")

    # --------------------------------------------------------------- backward
    bwd: list[str] = []
    for k, s in enumerate(states):
        sd = D[dim_of[s]]
        bwd.append("            for b in range(B):")
        bwd.append(f"                for i in range({sd}):")
        bwd.append(f"                    CN{k}[b, i] = 0")
    for k, nm in enumerate(dyn_nodes):
        bwd.append("            for b in range(B):")
        bwd.append(f"                for i in range({D[dim_of[nm]]}):")
        bwd.append(f"                    AD{k}[b, i] = 0")
    for st in reversed(dyn):
        if st.kind == "linear":
            kk = dyn_nodes.index(st.name)
            src = st.source
            tgt_ptr = f"&CN{states.index(src)}[0, 0]" if src in S else f"&AD{dyn_nodes.index(src)}[0, 0]"  # type: ignore[arg-type]
            r, c = (D[d] for d in next(p.shape for p in cell.params if p.name == st.matrix))
            bwd.append(f"            # {st.name} = {st.matrix} @ {src}: keep its adjoint, send it to {src}")
            bwd.append("            for b in range(B):")
            bwd.append(f"                for i in range({r}):")
            bwd.append(f"                    LA{kk}[t, b, i] = AD{kk}[b, i]")
            bwd.append(f"            gemm_nn(B, {c}, {r}, &AD{kk}[0, 0], <real*>&{M[st.matrix]}[0, 0], {tgt_ptr}, 1)")
            continue
        if st.kind == "out":
            k = states.index(st.state)  # type: ignore[arg-type]
            owner = Owner(None, k)
            a_expr = f"C{k}[t, b, i] + CA{k}[b, i]"
        else:
            owner = Owner(cell.node(st.name).symbol)  # type: ignore[union-attr]
            a_expr = f"AD{dyn_nodes.index(st.name)}[b, {'i' if st.dim != 1 else '0'}]"
        parts = [(sym, e) for sym, e in lp.partials[owner].items() if adj_target(sym.name) is not None]
        if not parts:
            continue
        bwd.append(f"            # pull back {st.name}")
        bwd.append("            for b in range(B):")
        bwd.append(f"                for i in range({D[st.dim]}):")
        bwd.append(f"                    a = {a_expr}")
        bwd += block([e for _, e in parts], [adj_target(sym.name) for sym, _ in parts],  # type: ignore[misc]
                     ["+= a * "] * len(parts), "                    ")
    for k, s in enumerate(states):
        bwd.append("            for b in range(B):")
        bwd.append(f"                for i in range({D[dim_of[s]]}):")
        bwd.append(f"                    CA{k}[b, i] = CN{k}[b, i]")

    real_t = "float" if dt == np.float32 else "double"
    gemm = "sgemm" if dt == np.float32 else "dgemm"
    f = "f" if dt == np.float32 else ""
    arr3 = "real[:, :, ::1]"
    arr2 = "real[:, ::1]"
    arr1 = "real[::1]"
    dim_args = ", ".join(f"int {D[d]}" for d in dims)
    common = ["int T", "int B"] + ([dim_args] if dim_args else [])
    common += [f"{arr3} {S[s]}" for s in states]
    common += [f"{arr3} {N[nm]}" for nm in dyn_nodes]
    common += [f"const {arr3} {Q[nm]}" for nm in static_nodes]  # read-only inputs may be read-only arrays
    common += [f"const {arr3} X"]
    common += [f"const {arr2} {M[nm]}" for nm in mats]
    common += [f"const {arr1} {P[nm]}" for nm in vecs]
    common += [f"real {p_[nm]}" for nm in scals]
    bargs = [f"const {arr3} C{k}" for k in range(len(states))]
    bargs += [f"{arr2} CA{k}" for k in range(len(states))] + [f"{arr2} CN{k}" for k in range(len(states))]
    bargs += [f"{arr2} AD{k}" for k in range(len(dyn_nodes))]
    bargs += [f"{arr3} LA{k}" for k in range(len(dyn_nodes))]
    bargs += [f"{arr3} QA{k}" for k in range(len(static_nodes))]
    bargs += [f"{arr3} GX"] + [f"{arr1} GP{k}" for k in range(len(vecs))] + [f"{arr1} Gp{k}" for k in range(len(scals))]
    temps = ", ".join([f"_c{k}" for k in range(max_temps)] + ["a"])
    header = _header(cell, dt)
    body = f"""
from libc.math cimport tanh{f}, exp{f}, log{f}, log1p{f}, pow{f}, sqrt{f}, fabs{f}
from scipy.linalg.cython_blas cimport {gemm}

ctypedef {real_t} real


cdef inline real sg_sigmoid(real u) noexcept nogil:
    # exp of a non-positive number only (no overflow); branch-free, so loops vectorise
    cdef real e = exp{f}(-fabs{f}(u))
    return (1 / (1 + e)) if u >= 0 else (e / (1 + e))


cdef inline real sg_softplus(real u) noexcept nogil:
    return (u if u > 0 else 0) + log1p{f}(exp{f}(-fabs{f}(u)))


cdef inline void gemm_nt(int Mr, int Nc, int K, real* A, real* W, real* C, real beta) noexcept nogil:
    # row-major C (Mr x Nc) = A (Mr x K) @ W.T (W: Nc x K) + beta * C
    cdef char ta = b'T'
    cdef char tb = b'N'
    cdef real one = 1
    {gemm}(&ta, &tb, &Nc, &Mr, &K, &one, W, &K, A, &K, &beta, C, &Nc)


cdef inline void gemm_nn(int Mr, int Nc, int K, real* A, real* W, real* C, real beta) noexcept nogil:
    # row-major C (Mr x Nc) = A (Mr x K) @ W (K x Nc) + beta * C
    cdef char tn = b'N'
    cdef real one = 1
    {gemm}(&tn, &tn, &Nc, &Mr, &K, &one, W, &Nc, A, &K, &beta, C, &Nc)


def forward({", ".join(common)}):
    cdef Py_ssize_t t, b, i
    cdef real {temps}
    with nogil:
        for t in range(T):
{chr(10).join(fwd)}


def backward({", ".join(common + bargs)}):
    cdef Py_ssize_t t, b, i
    cdef real {temps}
    with nogil:
        for t in range(T - 1, -1, -1):
{chr(10).join(bwd)}
"""
    source = header + body
    h = hashlib.sha256(source.encode()).hexdigest()
    source = source.replace("# content hash: (pending)", f"# content hash: {h}")
    return GeneratedSource(source, states, dyn_nodes, static_nodes, mats, vecs, scals, dims,
                           reads_x=any(cell.symbols[xname] in lp.partials[ow] for ow in lp.partials), content_hash=h)


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
