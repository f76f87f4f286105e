"""Emitter of the forward pass: stacked weights, the state-independent part, the time loop.

The driver first copies each group's matrices into one stacked matrix (and, for groups in
the time loop, its transpose).  The state-independent part -- the static groups' products
and the elementwise nodes that need no state -- runs for all ``T*B`` rows before the loop;
when it is nothing but products (no elementwise node of the input alone), the run plan may
compute them step by step at the top of the time loop instead (large batches; ``c.xstep``), so each step's rows are used
while in cache (one product over all ``T*B`` rows writes and rereads a ``T*B``-row array
from memory: measured about 8 % of a vector-gate training step).  Each step then runs the
state-dependent groups' products and fused loops in the plan's order.
"""

from __future__ import annotations

from .access import Emitter, ctx_expr, source_block
from .elementwise import forward_function
from .plan import Group, Op

__all__ = ["forward_calls", "forward_driver", "stacked_weights"]


def forward_calls(em: Emitter, funcs: list[str]) -> tuple[list[object], list[object]]:
    """The static part's and the time step's operations: a call of a generated loop function
    (its source appended to ``funcs``), or the :class:`Op` of a group's product."""
    static_calls: list[object] = []
    step_calls: list[object] = []
    for k, op in enumerate(em.plan.static_ops):
        static_calls.append(_loop_call(em, funcs, f"sfw{k}", op, True) if op.kind == "loop" else op)
    for k, op in enumerate(em.plan.dynamic_ops):
        step_calls.append(_loop_call(em, funcs, f"fw{k}", op, False) if op.kind == "loop" else op)
    return static_calls, step_calls


def _loop_call(em: Emitter, funcs: list[str], name: str, op: Op, static: bool) -> str:
    src, call = forward_function(em, name, op, static)
    funcs.append(src)
    return f"bad |= {call}"  # nonzero: a value of the loop is NaN or infinite


def stacked_weights(em: Emitter, tangent: bool = False) -> list[str]:
    """Copy every group's matrices into its stacked matrix (transposed too, for the time loop)."""
    lay = em.layout
    out = []
    for g in em.plan.groups:
        name = ("T" if tangent else "") + (f"U{g.index}" if g.static else f"W{g.index}")
        c_ = _cols(em, g)
        for k, mat in enumerate(g.matrices):
            off = lay.offset(g, k)
            offc = "0" if off == "0" else ctx_expr(off)
            rows = f"c.{lay.dim_code[g.rows[k]]}" if g.rows[k] != 1 else "1"
            src = ("c.T" if tangent else "c.") + lay.matrix_code[mat]
            out.append(f"    memcpy(c.{name} + ({offc})*{c_}, {src}, sizeof(real)*{rows}*{c_})")
        if not g.static:
            tname = f"TWT{g.index}" if tangent else f"WT{g.index}"
            out.append(f"    transpose(c.R{g.index}, {c_}, c.{name}, c.{tname})" if tangent
                       else f"    transpose(c.{lay.rows(g)}, {c_}, c.W{g.index}, c.WT{g.index})")
    return out


def _cols(em: Emitter, g: Group) -> str:
    return f"c.{em.layout.dim_code[g.cols]}" if g.cols != 1 else "1"


def _static_part(em: Emitter, static_calls: list[object], in_loop: bool) -> list[str]:
    out = ["    # state-independent part, all steps at once" +
           (" (unless the run plan computes it per step in the loop: c.xstep)" if in_loop else "")]
    if in_loop:
        out.append("    if not c.xstep:")
    ind = "        " if in_loop else "    "
    for it in static_calls:
        if isinstance(it, Op):
            g = it.group
            assert g is not None
            sp, ld = source_block(em, g.source, "0")
            c_ = _cols(em, g)
            out.append(f"{ind}# {', '.join(g.members)} = ({', '.join(g.matrices)}) @ {g.source}")
            out.append(ind + em.mm("forward.input_products", 0, 1, "c.T*c.B", f"c.RS{g.index}", c_,
                                   f"1, {sp}, {ld}, c.U{g.index}, {c_}, 0, c.Y{g.index}, c.RS{g.index}"))
        else:
            out.append(f"{ind}{it}")
    return out


def _time_step(em: Emitter, static_calls: list[object], step_calls: list[object], in_loop: bool) -> list[str]:
    out = ["    for t in range(T):"]
    if in_loop:
        out.append("        if c.xstep:")
        for it in static_calls:
            g = it.group  # type: ignore[attr-defined]
            sp, ld = source_block(em, g.source, "t")
            c_ = _cols(em, g)
            out.append("            " + em.mm("forward.input_products_step", 0, 1, "B", f"c.RS{g.index}", c_,
                                                f"1, {sp}, {ld}, c.U{g.index}, {c_}, 0, c.Y{g.index} + t*c.stY{g.index}, c.RS{g.index}"))
    for it in step_calls:
        if isinstance(it, Op):
            g = it.group
            assert g is not None
            sp, ld = source_block(em, g.source, "t")
            c_ = _cols(em, g)
            out.append(f"        # {', '.join(g.members)} = ({', '.join(g.matrices)}) @ {g.source}")
            out.append("        " + em.mm("forward.group", 0, 0, "B", f"c.R{g.index}", c_,
                                            f"1, {sp}, {ld}, c.WT{g.index}, c.R{g.index}, 0, c.Z{g.index} + t*c.stZ{g.index}, c.R{g.index}"))
        else:
            out.append(f"        {it}")
    return out


def forward_driver(em: Emitter, static_calls: list[object], step_calls: list[object]) -> list[str]:
    """The body of the generated ``forward``."""
    out = ["    # stacked weights of each group (and their transposes for the time loop)"]
    out += stacked_weights(em)
    in_loop = em.plan.input_products_in_loop()
    out += _static_part(em, static_calls, in_loop)
    for k, s in enumerate(em.plan.states):
        out.append(f"    memcpy(c.S{k}, c.H{k}, sizeof(real)*c.B*{em.layout.ctx_dim(em.plan.dim_of[s])})")
    return out + _time_step(em, static_calls, step_calls, in_loop)
