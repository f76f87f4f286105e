"""Assembly of the generated module: header, context struct, the pass bodies, ``run`` and its checks.

The module's entry point is ``run(ptr, iv, sz, what)``: the addresses of three int64
arrays the caller keeps alive (the arrays' data pointers in slot order, the integer
parameters, and the element counts to check for NaN/inf), and the bits of ``what`` to run.
``_checked`` tests every input for NaN/inf before anything runs and every result after.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._cell import Cell
from .._derive import jacobian
from .access import Emitter
from .layout import Slot
from .prelude import prelude

__all__ = ["FORWARD", "LOSS_LAST", "LOSS_STEP", "BACKWARD", "JVP", "header", "loss_function", "module_text"]

#: ``run`` flags (the ``what`` argument of the generated module's ``run``)
FORWARD, LOSS_LAST, LOSS_STEP, BACKWARD, JVP = 1, 2, 4, 8, 16

#: the results ``run`` checks after BPTT, by identifier prefix
_RESULTS = ("GX", "GV")


def header(cell: Cell, dt: np.dtype) -> str:
    """The comment block of a generated module: version, cell, hash placeholder, equations, Jacobian."""
    from .._build import _version

    lines = [
        "# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False",
        f"# symgate {_version()} generated kernel for cell {cell.name!r} ({dt})",
        "# content hash: (pending)",
        "#",
        "# update equations:",
    ]
    lines += [f"#   {ln}" for ln in cell.update_equations()]
    lines += ["#", "# state Jacobian (terms by origin):"]
    lines += [f"#   {ln}" for ln in jacobian(cell).describe().splitlines()]
    return "\n".join(lines) + "\n"


def _ctx_struct(em: Emitter, slots: list[Slot], int_fields: list[str]) -> str:
    fields = [f"    real* {s.code}" for s in slots] + ["    double* LOSS"] + [f"    Py_ssize_t {nm}" for nm in int_fields]
    return "cdef struct Ctx:\n" + "\n".join(fields)


def loss_function(em: Emitter) -> str:
    """The generated ``loss``: MSE of the linear readout, its cotangents and the readout gradient."""
    n = em.layout.dim_code[em.plan.dim_of[em.plan.states[0]]]
    residual = em.mm("loss.readout", 0, 1, "rows", "c.o", "n", "1, H, n, c.LV, n, 1, c.LR, c.o")
    readout_grad = em.mm("loss.readout_gradient", 1, 0, "c.o", "n", "rows", "s, c.LR, c.o, H, n, 0, c.GV, n")
    step_cot = em.mm("loss.cotangent", 0, 0, "rows", "n", "c.o", "s, c.LR, c.o, c.LV, n, 0, c.C0, n")
    last_cot = em.mm("loss.cotangent", 0, 0, "rows", "n", "c.o", "s, c.LR, c.o, c.LV, n, 0, c.CA0, n")
    return f"""cdef void loss(Ctx* c, bint step) noexcept nogil:
    # MSE of the readout V h (V: o x n) against y: last state (B x o) or every step (T x B x o)
    cdef Py_ssize_t rows = c.T*c.B if step else c.B, k
    cdef real* H = c.S0 + (c.B*c.{n} if step else c.T*c.B*c.{n})
    cdef Py_ssize_t n = c.{n}
    cdef double acc = 0
    cdef real s = <real>(2.0/(rows*c.o))
    for k in range(rows*c.o):
        c.LR[k] = -c.LY[k]
    {residual}
    for k in range(rows*c.o):
        acc += (<double>c.LR[k])*c.LR[k]
    c.LOSS[0] = acc/(rows*c.o)
    {readout_grad}
    if step:
        {step_cot}
        c.has_cot0 = 1
    else:
        {last_cot}
"""


def _run(slots: list[Slot], int_fields: list[str]) -> str:
    unpack = [f"    c.{s.code} = <real*><size_t>ptr[{k}]" for k, s in enumerate(slots)]
    unpack.append(f"    c.LOSS = <double*><size_t>ptr[{len(slots)}]")
    unpack += [f"    c.{nm} = iv[{k}]" for k, nm in enumerate(int_fields)]
    return f'''def run(size_t ptr_addr, size_t iv_addr, size_t sz_addr, int what):
    """Run the program.  The three arguments are addresses of int64 arrays the caller keeps
    alive: the data pointers of the arrays in slot order (then the loss value's), the sizes
    (``ints`` of the generator) and the element counts to check for NaN/inf (0: unchecked).

    ``what``: 1 forward, 2 last-state loss, 4 per-step loss, 8 BPTT, 16 JVP (bits).  Returns 0,
    or k > 0 if input slot k-1 holds a NaN/inf, or, for NaN/inf computed from finite inputs:
    -1 a value of the forward pass (a state, a node, a matrix product), -2 the loss,
    -3 a state tangent (JVP), -4 a gradient.
    """
    cdef const long long* ptr = <const long long*>ptr_addr
    cdef const long long* iv = <const long long*>iv_addr
    cdef const long long* szp = <const long long*>sz_addr
    cdef Ctx c
    cdef int k
{chr(10).join(unpack)}
    with nogil:
        k = _checked(&c, szp, what)
    return k
'''


def _result_slots(em: Emitter, slots: list[Slot]) -> list[int]:
    p, lay = em.plan, em.layout
    codes = ["GX", "GV"] + [f"CA{k}" for k in range(len(p.states))] + [f"GW{g.index}" for g in p.dynamic_groups] + \
        [f"GU{g.index}" for g in p.static_groups] + ["G" + v for v in lay.vector_code.values()] + \
        ["G" + v for v in lay.scalar_code.values()]
    return [next(k for k, s in enumerate(slots) if s.code == oc) for oc in codes]


def _checked(em: Emitter, slots: list[Slot], n_inputs: int) -> str:
    p, lay = em.plan, em.layout
    dim = {s: lay.ctx_dim(p.dim_of[s]) for s in p.states}
    in_checks = [f"    if c.{s.code} != NULL and not all_finite(c.{s.code}, sz[{k}]):\n        return {k + 1}"
                 for k, s in enumerate(slots[:n_inputs])]
    zero_carry = [f"        memset(c.CA{k}, 0, sizeof(real)*c.B*{dim[st]})" for k, st in enumerate(p.states)]
    tangent_checks = [f"        if not all_finite(c.TS{k}, (c.T + 1)*c.B*{dim[st]}):\n            return -3"
                      for k, st in enumerate(p.states)]
    result_checks = [f"        if c.{slots[k].code} != NULL and not all_finite(c.{slots[k].code}, sz[{k}]):\n            return -4"
                     for k in _result_slots(em, slots)]
    return f"""cdef int _checked(Ctx* c, const long long* sz, int what) noexcept nogil:
{chr(10).join(in_checks)}
    if what & {FORWARD}:
        if forward(c):
            return -1
    if what & {BACKWARD}:
{chr(10).join(zero_carry)}
    if what & {LOSS_LAST}:
        loss(c, 0)
    if what & {LOSS_STEP}:
        loss(c, 1)
    if what & {LOSS_LAST | LOSS_STEP} and not finite_double(c.LOSS[0]):
        return -2
    if what & {JVP}:  # before BPTT, which reuses the transposed-weights buffers as scratch
        jvp(c)
{chr(10).join(tangent_checks)}
    if what & {BACKWARD}:
        backward(c)
{chr(10).join(result_checks)}
    return 0
"""


def module_text(em: Emitter, slots: list[Slot], n_inputs: int, ints: list[tuple[Any, ...]], funcs: list[str],
                forward: list[str], loss: str, backward: list[str], jvp: list[str]) -> str:
    """The whole generated module (with the content hash still pending)."""
    int_fields = [em.layout.int_field(it) for it in ints]
    temps = ", ".join(["tmp"] + [f"ca{k}, cn{k}" for k in range(len(em.plan.states))])
    body = prelude(em.dtype) + f"""{_ctx_struct(em, slots, int_fields)}


{chr(10).join(funcs)}

cdef int forward(Ctx* c) noexcept nogil:
    # returns nonzero if a value it computed is NaN or infinite (checked inside the loops)
    cdef Py_ssize_t t, T = c.T, B = c.B
    cdef int bad = 0
{chr(10).join(forward)}
    return bad


{loss}

cdef void jvp(Ctx* c) noexcept nogil:
    # forward mode along the tangents TX, TM*, TP*, Tp*, TH* (needs a forward pass that stored every node)
    cdef Py_ssize_t t, T = c.T, B = c.B
{chr(10).join(jvp)}


cdef void backward(Ctx* c) noexcept nogil:
    cdef Py_ssize_t t, T = c.T, B = c.B
    cdef real* {temps.replace(', ', ', *')}
{chr(10).join(backward)}


{_run(slots, int_fields)}

{_checked(em, slots, n_inputs)}"""
    return header(em.plan.cell, em.dtype) + body
