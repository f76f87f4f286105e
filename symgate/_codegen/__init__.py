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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._cell import Cell, Dim
from .._errors import CellSpecError
from .access import Emitter
from .assemble import BACKWARD, FORWARD, JVP, LOSS_LAST, LOSS_STEP, loss_function, module_text
from .backward import backward_calls, backward_driver
from .forward import forward_calls, forward_driver
from .jvp import jvp_driver
from .layout import Slot
from .plan import STRUCTURAL_VALUES, CellPlan, Group, cell_plan, structural_decisions
from .prelude import SMALL_GEMM
from .runplan import DECISION_VALUES, DEFAULT_POLICY, STEP_WGRAD_MIN_B, GemmSite, KernelPlan, Policy, RunOptions, RunPlan, run_plan
from .printer import KernelPrinter

__all__ = ["KernelPrinter", "generate", "GeneratedSource", "Slot", "Group", "CellPlan", "cell_plan",
           "FORWARD", "LOSS_LAST", "LOSS_STEP", "BACKWARD", "JVP", "SMALL_GEMM", "STEP_WGRAD_MIN_B", "GemmSite", "Policy", "DEFAULT_POLICY", "RunOptions", "RunPlan", "run_plan",
           "KernelPlan", "structural_decisions", "STRUCTURAL_VALUES", "DECISION_VALUES"]


@dataclass
class GeneratedSource:
    """Generated Cython source and what the caller needs to run it: the slots and integer
    parameters of ``run``, the structural decisions the run plan builds on, the content hash."""

    source: str
    slots: list[Slot]
    ints: list[tuple[Any, ...]]
    groups: list[Group]
    dims: list[Dim]
    states: list[str]
    state_dims: list[Dim]
    nodes: list[str]  # state-dependent elementwise nodes, in slot order
    static_nodes: list[str]  # state-independent elementwise nodes
    needed: set[str]  # state-dependent nodes BPTT reads (stored over T even in minimal runs)
    gemm_sites: list[GemmSite]  # every matrix product (the run plan routes each to loops or BLAS)
    aliases: dict[int, int] = field(default_factory=dict)  # static group -> dynamic group sharing its adjoint
    x_elementwise: bool = False  # some elementwise node reads the input directly (its gradient is then always computed)
    input_products_in_loop: bool = False  # the static part is products only (per step for large batches)
    static_wgrad_in_loop: frozenset[int] = frozenset()  # static groups whose adjoint rows are complete in the loop
    scratch: frozenset[str] = frozenset()  # arrays that may be one reused row when computed per step
    scratch_without_x_grad: frozenset[str] = frozenset()  # ... only when the input gradient is not computed
    column_sums: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, vector param) -> sibling
    content_hash: str = ""


def generate(cell: Cell, dtype: Any) -> GeneratedSource:
    """The Cython source of ``cell``'s compiled program (forward, losses, BPTT, JVP) for ``dtype``."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype("float32"), np.dtype("float64")):
        raise CellSpecError(f"kernels are generated for float32 and float64, not {dt}")
    plan = cell_plan(cell)
    em = Emitter(plan, dt)
    slots, n_inputs = em.layout.slots()
    funcs: list[str] = []
    static_fwd, step_fwd = forward_calls(em, funcs)
    step_bwd, static_bwd, step_written, colsums = backward_calls(em, funcs)
    fwd = forward_driver(em, static_fwd, step_fwd)
    bwd = backward_driver(em, step_bwd, static_bwd, step_written, colsums)
    jv = jvp_driver(em, funcs)
    loss = loss_function(em)
    ints = em.layout.ints(len(em.gemm_sites))
    source = module_text(em, slots, n_inputs, ints, funcs, fwd, loss, bwd, jv)
    h = hashlib.sha256(source.encode()).hexdigest()
    source = source.replace("# content hash: (pending)", f"# content hash: {h}")
    source = source.replace('CONTENT_HASH = "(pending)"', f'CONTENT_HASH = "{h}"')
    return GeneratedSource(
        source, slots, ints, plan.groups, plan.dims, plan.states, [plan.dim_of[s] for s in plan.states], plan.nodes,
        plan.static_nodes, plan.needed, list(em.gemm_sites), aliases={k: g.index for k, g in plan.shared_adjoint.items()},
        x_elementwise=plan.x_elementwise(), input_products_in_loop=plan.input_products_in_loop(),
        static_wgrad_in_loop=frozenset(g.index for g in plan.static_groups if plan.static_wgrad_in_loop(g)),
        scratch=_scratch(plan), scratch_without_x_grad=frozenset(
            f"L{g.index}" for g in plan.dynamic_groups if plan.group_adjoint_sent_to_input(g)),
        column_sums=dict(plan.column_sums), content_hash=h)


def _scratch(plan: CellPlan) -> frozenset[str]:
    """Arrays that may be one row reused every step, when their products are per step (:mod:`.runplan`)."""
    ys = {f"Y{g.index}" for g in plan.static_groups if plan.scratch_input_products(g)}
    return frozenset(ys | {f"L{g.index}" for g in plan.dynamic_groups if plan.scratch_group_adjoint(g)})
