r"""Cython code generation: one compiled program per cell for forward, loss, BPTT and JVP.

The generator is a pipeline of small passes, each a module:

1. :mod:`.plan` -- the structural decisions from the cell's derivation: groups of Linear
   nodes stacked into one product, the static part (no state) and the time step as matrix
   products and fused elementwise loops, what BPTT reads, register-held and shared adjoints;
2. :mod:`.layout` -- the arrays and their identifiers (a fixed scheme: a user's names appear
   only in comments), the slots ``run`` takes;
3. :mod:`.printer` -- SymPy per-unit expressions as C, a subclass of SymPy's C99 printer
   (float32/float64 is its type-alias table), after deterministic CSE;
4. emitters -- :mod:`.elementwise` (the fused loops' functions), :mod:`.forward`,
   :mod:`.backward` (BPTT), :mod:`.jvp`, with :mod:`.access` saying where each value and
   adjoint lives;
5. :mod:`.assemble` -- the module text: header, context struct, losses, ``run`` and its
   NaN/inf checks of every input and result.

The same cell always gives byte-identical source; its SHA-256 is the kernel's content hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._cell import Cell, Dim
from .._errors import CellSpecError
from .access import Emitter
from .assemble import BACKWARD, FORWARD, JVP, LOSS_LAST, LOSS_STEP, module_text
from .backward import backward_calls, backward_driver
from .forward import STEP_WGRAD_MIN_B, forward_calls, forward_driver
from .jvp import jvp_driver
from .layout import Slot
from .plan import CellPlan, Group, cell_plan
from .prelude import SMALL_GEMM
from .printer import KernelPrinter

__all__ = ["KernelPrinter", "generate", "GeneratedSource", "Slot", "Group", "CellPlan", "cell_plan",
           "FORWARD", "LOSS_LAST", "LOSS_STEP", "BACKWARD", "JVP", "SMALL_GEMM", "STEP_WGRAD_MIN_B"]


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


def generate(cell: Cell, dtype: Any) -> GeneratedSource:
    """The Cython source of ``cell``'s compiled program (forward, losses, BPTT, JVP) for ``dtype``."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype("float32"), np.dtype("float64")):
        raise CellSpecError(f"kernels are generated for float32 and float64, not {dt}")
    plan = cell_plan(cell)
    em = Emitter(plan, dt)
    slots, n_inputs = em.layout.slots()
    ints = em.layout.ints()
    funcs: list[str] = []
    static_fwd, step_fwd = forward_calls(em, funcs)
    step_bwd, static_bwd, step_written, colsums = backward_calls(em, funcs)
    fwd = forward_driver(em, static_fwd, step_fwd)
    bwd = backward_driver(em, step_bwd, static_bwd, step_written, colsums)
    jv = jvp_driver(em, funcs)
    source = module_text(em, slots, n_inputs, ints, funcs, fwd, bwd, jv)
    scratch = _scratch_rows(plan, fwd, bwd, jv)
    h = hashlib.sha256(source.encode()).hexdigest()
    source = source.replace("# content hash: (pending)", f"# content hash: {h}")
    source = source.replace('CONTENT_HASH = "(pending)"', f'CONTENT_HASH = "{h}"')
    return GeneratedSource(source, slots, ints, plan.groups, plan.dims, plan.states, plan.nodes, plan.static_nodes,
                           plan.needed, aliases={k: g.index for k, g in plan.shared_adjoint.items()},
                           x_elementwise=plan.x_elementwise(), scratch=scratch, content_hash=h)


def _scratch_rows(plan: CellPlan, fwd: list[str], bwd: list[str], jv: list[str]) -> frozenset[str]:
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
    for g in plan.static_groups:
        c = f"Y{g.index}"
        if only_per_step(c, fwd, f"st{c}") and not any(re.search(rf"c\.{c}\b", ln) for ln in bwd + jv):
            out.add(c)
    for g in plan.dynamic_groups:
        c = f"L{g.index}"
        if only_per_step(c, bwd, f"st{c}") and not any(re.search(rf"c\.{c}\b", ln) for ln in fwd + jv):
            out.add(c)
    return frozenset(out)
