r"""Emitters of the fused elementwise loops: forward values, BPTT pull-backs, JVP tangents.

Each fused loop of the plan becomes one ``cdef ... noexcept nogil`` function over the rows
``b`` and units ``i``.  In the forward function every node's value stays in a register
(``v0, v1, ...``) for the nodes after it in the same loop and is stored where BPTT or the
caller needs it.  In the backward function the owners are visited in reverse; each owner's
adjoint times its local partials (printed after CSE) is added to the adjoints of what it
reads -- a register, a per-step buffer, or an accumulator over all steps (inputs, vector and
scalar parameters; a scalar read by a per-unit owner is reduced over the units first).  A
vector parameter whose contribution equals the adjoint stored for a sibling read only by
the same owner (``b`` in ``tanh(W h + U x + b)``; the plan's ``column_sums``) gets its
gradient as a column sum of that stored adjoint after the reverse loop instead.  The JVP function computes each
owner's tangent as the sum over what it reads of (local partial) x (tangent of the source).
"""

from __future__ import annotations

import sympy

from .access import Emitter, FnParams, at
from .plan import Op
from .printer import cse

__all__ = ["forward_function", "backward_function", "jvp_function", "ColumnSum"]

#: a deferred bias gradient: (gradient pointer, stored adjoint buffer, its ld, its offset, dim)
ColumnSum = tuple


def _group_reads(em: Emitter, op: Op, fn: FnParams, ctx: str) -> list[str]:
    """Checks of the group outputs (matrix products) the loop reads: they are stored and returned too."""
    names = sorted({nm for st in op.items for nm in st.reads if nm in em.plan.group_of})
    return [f"            bad |= nonfinite({em.value(nm, fn, ctx, {})})" for nm in names]


def forward_function(em: Emitter, name: str, op: Op, static: bool) -> tuple[str, str]:
    """An elementwise forward function for one fused loop, and the call the driver makes.

    The function returns nonzero if any value it reads from a matrix product or writes is
    NaN or infinite (a bit test fused into the loop: every stored or returned value is checked)."""
    fn = FnParams()
    ctx = "static" if static else "fwd"
    p, lay = em.plan, em.layout
    d = op.dim
    local: dict[str, str] = {}
    body: list[str] = _group_reads(em, op, fn, ctx)
    for k, st in enumerate(op.items):
        em.printer.access = {em.symbol[nm]: em.value(nm, fn, ctx, local) for nm in sorted(st.reads)}
        repl, red = cse([st.expr])  # type: ignore[list-item]
        em.note_temps(len(repl))
        body.append(f"            # {st.name}")
        body += [f"            {s.name} = {em.code(e)}" for s, e in repl]
        v = f"v{k}"
        body.append(f"            {v} = {em.code(red[0])}")
        if st.kind == "out":
            s = p.state_index(st)
            sdim = p.dim_of[p.states[s]]
            tgt = at(fn.ptr(f"SN{s}", f"c.S{s} + (t + 1)*B*{lay.ctx_dim(sdim)}"), lay.dim_code[sdim], "0", d)
        elif static:
            q = lay.static_node_code[st.name]
            tgt = at(fn.ptr(q, f"c.{q}"), lay.dim_code[d], "0", d)
        else:
            q = lay.node_code[st.name]
            tgt = at(fn.ptr(q, f"c.{q} + t*c.st{q}"), lay.dim_code[d], "0", d)
        body.append(f"            {tgt} = {v}")
        body.append(f"            bad |= nonfinite({v})")
        local[st.name] = v
    decl = [f"    cdef real {', '.join([f'v{k}' for k in range(len(op.items))] + em.temps())}", "    cdef bits_t bad = 0"]
    head = em.signature(name, fn).replace("cdef void ", "cdef int ", 1)
    src = "\n".join([head, "    cdef Py_ssize_t b, i", *decl, "    for b in range(B):", em.unit_loop(d), *body,
                     "    return bad != 0"]) + "\n"
    return src, em.call(name, fn, "T*B" if static else "B")


class _Backward:
    """The state of one backward function while its owners are visited (see the module docstring)."""

    def __init__(self, em: Emitter, fn: FnParams, ctx: str, d: object, written: set[str], colsums: list | None) -> None:
        self.em, self.fn, self.ctx, self.d = em, fn, ctx, d
        self.written = written  # buffers already written in this pass ("ptr|offset"): '=' first, then '+='
        self.colsums = colsums
        self.body: list[str] = []
        self.per_row: dict[str, str] = {}  # dim-1 targets reduced over i, per row b: target -> accumulator
        self.per_loop: dict[str, str] = {}  # scalar parameters reduced over the whole loop
        self.first_local: set[str] = set()  # registers already written in this body
        self.after_units: list[str] = []
        self.after_rows: list[str] = []
        self.registers: list[str] = []

    def owner_adjoint(self, st: object) -> str:
        em, p = self.em, self.em.plan
        if st.kind == "out":  # type: ignore[attr-defined]
            k = p.state_index(st)  # type: ignore[arg-type]
            sd = em.layout.dim_code[p.dim_of[p.states[k]]]
            return at(self.fn.ptr(f"CA{k}", f"ca{k}"), sd, "0", self.d)  # type: ignore[arg-type]
        if st.name in p.register_adjoints:  # type: ignore[attr-defined]
            return f"u_{em.layout.node_id(st.name)}"  # type: ignore[attr-defined]
        tgt = em.adjoint(st.name, self.fn, self.ctx)  # type: ignore[attr-defined]
        return at(tgt[1], tgt[2], tgt[3], self.d)  # type: ignore[index,arg-type]

    def write(self, owner: str, src: str, c: str) -> None:
        """Add contribution ``c`` of ``owner`` to the adjoint of ``src``."""
        kind, ptr, ld, off = self.em.adjoint(src, self.fn, self.ctx)  # type: ignore[misc]
        sdim = self.em.plan.dim_of[src]
        sibling = self.em.plan.column_sums.get((owner, src)) if self.colsums is not None else None
        if sibling is not None:  # the gradient is the column sum of the sibling's stored adjoint
            _kind, buf, buf_ld, buf_off = self.em.adjoint(sibling, FnParams(), self.ctx)  # type: ignore[misc]
            self.colsums.append((ptr, buf, buf_ld, buf_off, sdim))  # type: ignore[union-attr]
        elif kind == "local":
            self._write_register(ptr, c)
        elif kind == "scalar":
            acc = self.per_loop.setdefault(ptr, f"s{len(self.per_loop)}")
            self.body.append(f"            {acc} += {c}")
        elif sdim == 1 and self.d != 1:
            self._write_reduced(kind, ptr, ld, off, c)
        else:
            self._write_direct(kind, ptr, ld, off, sdim, c)

    def _write_register(self, ptr: str, c: str) -> None:
        if ptr in self.first_local:
            self.body.append(f"            {ptr} += {c}")
        else:
            self.body.append(f"            {ptr} = {c}")
            self.first_local.add(ptr)
            self.registers.append(ptr)

    def _write_reduced(self, kind: str, ptr: str, ld: str, off: str, c: str) -> None:
        """A scalar read by a per-unit owner: reduce over units, then write once per row."""
        key = f"{ptr}|{off}"
        if key not in self.per_row:
            self.per_row[key] = f"r{len(self.per_row)}"
            target = f"{ptr}[0]" if kind == "acc" and ld == "0" else at(ptr, ld, off, 1)
            op_ = "+=" if (kind == "acc" or key in self.written) else "="
            self.after_units.append(f"        {target} {op_} {self.per_row[key]}")
            self.written.add(key)
        self.body.append(f"            {self.per_row[key]} += {c}")

    def _write_direct(self, kind: str, ptr: str, ld: str, off: str, sdim: object, c: str) -> None:
        target = f"{ptr}[{'i' if sdim != 1 else '0'}]" if kind == "acc" and ld == "0" else at(ptr, ld, off, sdim)  # type: ignore[arg-type]
        key = f"{ptr}|{off}"
        if kind == "acc" or key in self.written:
            self.body.append(f"            {target} += {c}")
        else:
            self.body.append(f"            {target} = {c}")
            self.written.add(key)

    def pull_back(self, st: object) -> None:
        """The code adding one owner's adjoint times its partials to what it reads."""
        em = self.em
        if st.kind == "aux":  # type: ignore[attr-defined]  # a companion value: read by partials, no adjoint
            return
        a_code = self.owner_adjoint(st)
        parts = [(src, e) for src, _d, e in st.partials if em.adjoint(src, FnParams(), self.ctx) is not None]  # type: ignore[attr-defined]
        if not parts:
            return
        a_sym = sympy.Symbol("a")
        names = sorted({em.name_of[s] for _, e in parts for s in e.free_symbols})
        em.printer.access = {em.symbol[nm]: em.value(nm, self.fn, self.ctx, {}) for nm in names}
        em.printer.access[a_sym] = "a"
        repl, red = cse([a_sym * e for _, e in parts])
        em.note_temps(len(repl))
        self.body.append(f"            # pull back {st.name}")  # type: ignore[attr-defined]
        self.body.append(f"            a = {a_code}")
        self.body += [f"            {s.name} = {em.code(e)}" for s, e in repl]
        for (src, _), e in zip(parts, red):
            self.write(st.name, src, em.code(e))  # type: ignore[attr-defined]


def backward_function(em: Emitter, name: str, op: Op, static: bool, written: set[str],
                      colsums: list | None = None) -> tuple[str, str]:
    """The backward function of one fused loop (owners in reverse), and the driver's call."""
    fn = FnParams()
    bw = _Backward(em, fn, "static" if static else "bwd", op.dim, written, colsums)
    for st in reversed(op.items):
        bw.pull_back(st)
    after_rows = [f"    {key}[0] += {acc}" for key, acc in bw.per_loop.items()]
    accs = list(bw.per_row.values()) + list(bw.per_loop.values())
    decl = [f"    cdef real {', '.join(['a'] + accs + sorted(set(bw.registers)) + em.temps())}"]
    init_loop = [f"    {acc} = 0" for acc in bw.per_loop.values()]
    init_row = [f"        {acc} = 0" for acc in bw.per_row.values()]
    src = "\n".join([em.signature(name, fn), "    cdef Py_ssize_t b, i", *decl, *init_loop, "    for b in range(B):", *init_row,
                     em.unit_loop(op.dim), *bw.body, *bw.after_units, *after_rows]) + "\n"
    return src, em.call(name, fn, "T*B" if static else "B")


def jvp_function(em: Emitter, name: str, op: Op, static: bool) -> tuple[str, str]:
    """Forward-mode tangents of one fused loop, and the driver's call."""
    fn = FnParams()
    ctx = "static" if static else "bwd"  # values are read from stored trajectories
    p, lay = em.plan, em.layout
    d = op.dim
    local: dict[str, str] = {}
    body: list[str] = []
    for k, st in enumerate(op.items):
        if st.kind == "aux":  # companion values have no tangent (they are read by the partials only)
            continue
        terms, tangent_syms = [], []
        for src, _d, e in st.partials:
            ta = em.value(src, fn, ctx, local, tangent=True)
            if ta is None:
                continue
            ts = sympy.Symbol(f"_t{len(tangent_syms)}")
            tangent_syms.append((ts, ta))
            terms.append(e * ts)
        names = sorted({em.name_of[sy] for e in terms for sy in e.free_symbols if sy in em.name_of})
        em.printer.access = {em.symbol[nm]: em.value(nm, fn, ctx, {}) for nm in names}
        em.printer.access.update({ts: ta for ts, ta in tangent_syms})
        repl, red = cse([sympy.Add(*terms)])
        em.note_temps(len(repl))
        body.append(f"            # tangent of {st.name}")
        body += [f"            {sy.name} = {em.code(e)}" for sy, e in repl]
        v = f"v{k}"
        body.append(f"            {v} = {em.code(red[0])}")
        if st.kind == "out":
            s = p.state_index(st)
            sdim = p.dim_of[p.states[s]]
            tgt = at(fn.ptr(f"TSN{s}", f"c.TS{s} + (t + 1)*B*{lay.ctx_dim(sdim)}"), lay.dim_code[sdim], "0", d)
        elif static:
            q = lay.static_node_code[st.name]
            tgt = at(fn.ptr("T" + q, f"c.T{q}"), lay.dim_code[d], "0", d)
        else:
            q = lay.node_code[st.name]
            tgt = at(fn.ptr("T" + q, f"c.T{q}"), lay.dim_code[d], "0", d)
        body.append(f"            {tgt} = {v}")
        local[st.name] = v
    decl = [f"    cdef real {', '.join([f'v{k}' for k in range(len(op.items))] + em.temps())}"]
    src = "\n".join([em.signature(name, fn), "    cdef Py_ssize_t b, i", *decl, "    for b in range(B):", em.unit_loop(d), *body]) + "\n"
    return src, em.call(name, fn, "T*B" if static else "B")
