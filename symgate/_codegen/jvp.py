"""Emitter of forward-mode derivatives (JVP) along tangents of the inputs, parameters and initial states.

It needs a forward pass that stored every node.  The tangent of a group's product is
``M @ (tangent of v) + (tangent of M) @ v`` (two products into the tangent rows); the
tangent of an elementwise node is the sum over what it reads of (derived local partial) x
(tangent of the source), one generated function per fused loop.  The state-independent
part runs for all ``T*B`` rows first, then the time loop.
"""

from __future__ import annotations

from .access import Emitter, source_block, tangent_block
from .elementwise import jvp_function
from .forward import stacked_weights
from .plan import Op

__all__ = ["jvp_driver"]


def _group_tangent(em: Emitter, op: Op, static: bool) -> list[str]:
    g = op.group
    assert g is not None
    ind, rows, t = ("    ", "c.T*c.B", "0") if static else ("        ", "B", "t")
    sp, ld = source_block(em, g.source, t)
    tp_, tld = tangent_block(em, g.source, t)
    c_ = f"c.{em.layout.dim_code[g.cols]}" if g.cols != 1 else "1"
    if static:
        w, tw, tb, ldw, out_, R = f"c.U{g.index}", f"c.TU{g.index}", 1, c_, f"c.TY{g.index}", f"c.RS{g.index}"
    else:
        w, tw, tb, ldw, out_, R = f"c.WT{g.index}", f"c.TWT{g.index}", 0, f"c.R{g.index}", f"c.TZ{g.index}", f"c.R{g.index}"
    role = "jvp.input_products" if static else "jvp.group"
    return [ind + em.mm(role, 0, tb, rows, R, c_, f"1, {tp_}, {tld}, {w}, {ldw}, 0, {out_}, {R}"),
            ind + em.mm(role, 0, tb, rows, R, c_, f"1, {sp}, {ld}, {tw}, {ldw}, 1, {out_}, {R}")]


def _ops(em: Emitter, funcs: list[str], ops: list[Op], static: bool) -> list[str]:
    """Tangent code for the state-independent part (all T*B rows) or one time step."""
    ind = "    " if static else "        "
    out = []
    for k, op in enumerate(ops):
        if op.kind == "loop":
            src, call = jvp_function(em, f"{'s' if static else ''}jv{k}", op, static)
            funcs.append(src)
            out.append(f"{ind}{call}")
        else:
            out += _group_tangent(em, op, static)
    return out


def jvp_driver(em: Emitter, funcs: list[str]) -> list[str]:
    """The body of the generated ``jvp`` (its loop functions appended to ``funcs``)."""
    out = ["    # stacked tangent weights"] + stacked_weights(em, tangent=True)
    out += _ops(em, funcs, em.plan.static_ops, True)
    for k, s in enumerate(em.plan.states):
        out.append(f"    memcpy(c.TS{k}, c.TH{k}, sizeof(real)*c.B*{em.layout.ctx_dim(em.plan.dim_of[s])})")
    out.append("    for t in range(T):")
    return out + _ops(em, funcs, em.plan.dynamic_ops, False)
