"""The generator's structural plan: how a cell's program becomes matrix products and fused loops.

From the cell's evaluation program (:mod:`symgate._derive._program`) this pass decides,
for every cell, and independently of sizes:

* **groups** -- Linear nodes that read the same source, stacked into one matrix so each
  group is one matrix product; *static* groups read no state (``U x``) and are computed
  for all steps before the time loop (or per step inside it, see :mod:`.runplan`);
* **ops** -- the static part and the time step as sequences of matrix products and
  *fused loops* (maximal runs of elementwise nodes of one dimension, computed in one loop
  over ``(b, i)`` with values kept in registers);
* **storage** -- which state-dependent values BPTT reads (stored over all steps even in
  minimal runs);
* **adjoints** -- which adjoints stay in registers (every reader is in the same fused
  loop), and which static group shares its adjoint buffer with a dynamic one
  (``tanh(W h + U x + b)``: both products see the same adjoint);
* whether a static group's adjoint rows are complete at the end of each reverse step
  (then its weight gradient may be accumulated inside the reverse loop).

Everything here is data a test can read (see :func:`structural_decisions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy

from .._cell import Cell, Dim
from .._derive._program import Step, companion_symbols, program
from .._errors import CellSpecError

__all__ = ["Group", "Op", "CellPlan", "cell_plan", "structural_decisions", "STRUCTURAL_VALUES"]


@dataclass(frozen=True)
class Group:
    """Linear nodes that read the same source: one stacked matrix, one matrix product.

    ``index`` numbers static and dynamic groups separately; ``rows`` are the members'
    output dimensions (stacked in order), ``cols`` the source's dimension.
    """

    index: int
    static: bool
    source: str
    members: tuple[str, ...]
    matrices: tuple[str, ...]
    rows: tuple[Dim, ...]
    cols: Dim


@dataclass
class Op:
    """One operation of a pass: a group's matrix product (``"gemm"``) or a fused loop (``"loop"``)."""

    kind: str
    items: list[Step]
    dim: Dim = 1
    group: Group | None = None


def _linear_groups(ready: list[Step], shape_of: dict[str, tuple[Dim, ...]], static: bool, first: int) -> list[Group]:
    by_source: dict[str, list[Step]] = {}
    for st in ready:
        by_source.setdefault(st.source, []).append(st)  # type: ignore[arg-type]
    groups = []
    for src, members in by_source.items():
        shapes = [shape_of[st.matrix] for st in members]  # type: ignore[index]
        groups.append(Group(first + len(groups), static, src, tuple(st.name for st in members),
                            tuple(st.matrix for st in members), tuple(s[0] for s in shapes), shapes[0][1]))  # type: ignore[misc]
    return groups


def _fused_loop(remaining: list[Step], done: set[str]) -> list[Step]:
    """The largest set of ready elementwise steps of one dimension (the first ready one's),
    growing it while steps become ready from the ones chosen."""
    ready = [st for st in remaining if st.kind != "linear" and st.reads <= done]
    if not ready:  # pragma: no cover - the program is topologically ordered
        raise CellSpecError("internal: cannot schedule the cell's nodes")
    d = ready[0].dim
    chosen: list[Step] = []
    names = set(done)
    grew = True
    while grew:
        grew = False
        for st in remaining:
            if st.kind != "linear" and st not in chosen and st.dim == d and st.reads <= names:
                chosen.append(st)
                names.add(st.name)
                grew = True
    return chosen


def schedule(steps: list[Step], available: set[str], shape_of: dict[str, tuple[Dim, ...]],
             static: bool) -> tuple[list[Op], list[Group]]:
    """Ops in a valid order: ready Linear nodes first, stacked by source; then maximal fused loops."""
    done = set(available)
    remaining = list(steps)
    ops: list[Op] = []
    groups: list[Group] = []
    while remaining:
        linear = [st for st in remaining if st.kind == "linear" and st.reads <= done]
        if linear:
            new = _linear_groups(linear, shape_of, static, len(groups))
            groups += new
            ops += [Op("gemm", [st for st in linear if st.name in g.members], group=g) for g in new]
            done |= {st.name for st in linear}
            remaining = [st for st in remaining if st not in linear]
            continue
        chosen = _fused_loop(remaining, done)
        ops.append(Op("loop", chosen, dim=chosen[0].dim))
        done |= {st.name for st in chosen}
        remaining = [st for st in remaining if st not in chosen]
    return ops, groups


class CellPlan:
    """The structural decisions for one cell (see the module docstring).

    Attributes: ``steps`` (by name), ``static_ops`` / ``dynamic_ops``, ``static_groups`` /
    ``dynamic_groups``, ``group_of`` (member name -> (group, position)), ``nodes`` and
    ``static_nodes`` (elementwise node names), ``needed`` (state-dependent values BPTT reads),
    ``readers`` (value -> owners reading it; ``"@" + member`` for a Linear reader),
    ``register_adjoints``, ``shared_adjoint`` (static group index -> dynamic group).
    """

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.states = [s.name for s in cell.states]
        self.xname = cell.inputs[0].name
        self.dims: list[Dim] = list(cell.dims())
        self.symbols = {**cell.symbols, **companion_symbols(cell)}  # every value's per-unit symbol, by name
        self.kind_of: dict[str, str] = {lf.name: lf.kind for lf in cell.leaves}
        self.dim_of: dict[str, Dim] = {lf.name: lf.dim for lf in cell.leaves}
        self.dim_of.update({nd.name: nd.dim for nd in cell.nodes})
        self.dim_of.update({nm: sym.dim for nm, sym in companion_symbols(cell).items()})
        self.shape_of = {p.name: p.shape for p in cell.params}
        steps = list(program(cell))
        self.steps: dict[str, Step] = {st.name: st for st in steps}
        self._schedule(cell, steps)
        self.readers = self._readers(steps)
        self.needed = self._needed(steps)
        self.op_of = self._op_positions()
        self.register_adjoints = self._register_adjoints()
        self.shared_adjoint = self._shared_adjoints()
        self.column_sums = self._column_sums()

    def _schedule(self, cell: Cell, steps: list[Step]) -> None:
        leaves = {lf.name for lf in cell.leaves if lf.kind != "state"}
        static_steps = [st for st in steps if st.static]
        dynamic_steps = [st for st in steps if not st.static]
        self.static_ops, self.static_groups = schedule(static_steps, leaves, self.shape_of, True)
        available = leaves | set(self.states) | {st.name for st in static_steps}
        self.dynamic_ops, self.dynamic_groups = schedule(dynamic_steps, available, self.shape_of, False)
        self.group_of: dict[str, tuple[Group, int]] = {}
        for g in self.static_groups + self.dynamic_groups:
            for k, mem in enumerate(g.members):
                self.group_of[mem] = (g, k)
        self.nodes = [st.name for st in dynamic_steps if st.kind in ("fn", "arith", "aux")]
        self.static_nodes = [st.name for st in static_steps if st.kind in ("fn", "arith", "aux")]
        self.companions = {st.name for st in steps if st.kind == "aux"}  # no adjoint: read by partials only

    @property
    def groups(self) -> list[Group]:
        return self.static_groups + self.dynamic_groups

    def _readers(self, steps: list[Step]) -> dict[str, list[str]]:
        readers: dict[str, list[str]] = {}
        for st in steps:
            if st.kind == "linear":
                readers.setdefault(st.source, []).append("@" + st.name)  # type: ignore[arg-type]
            else:
                for src, _dim, _e in st.partials:
                    readers.setdefault(src, []).append(st.name)
        return readers

    def _needed(self, steps: list[Step]) -> set[str]:
        """State-dependent values BPTT reads: symbols of the partials, sources of dynamic groups."""
        needed: set[str] = set()
        for st in steps:
            for _src, _dim, e in st.partials:
                needed |= {s.name for s in e.free_symbols}
        needed |= {g.source for g in self.dynamic_groups}
        return {nm for nm in needed if nm in self.steps and not self.steps[nm].static}

    def _op_positions(self) -> dict[str, tuple[str, int]]:
        where: dict[str, tuple[str, int]] = {}
        for tag, ops in (("s", self.static_ops), ("d", self.dynamic_ops)):
            for k, op in enumerate(ops):
                for st in op.items:
                    where[st.name] = (tag, k)
        return where

    def _register_adjoints(self) -> set[str]:
        """Nodes whose adjoint stays in a register: every reader is an elementwise owner of the same loop."""
        out = set()
        for nm in self.nodes + self.static_nodes:
            rd = self.readers.get(nm, [])
            if rd and all(r[0] != "@" and self.op_of.get(r) == self.op_of[nm] for r in rd):
                out.add(nm)
        return out

    def sole_reader(self, nm: str) -> tuple[str, sympy.Expr] | None:
        """The only reader of ``nm`` and the partial with respect to ``nm``, if the reader is elementwise."""
        rd = self.readers.get(nm, [])
        if len(rd) != 1 or rd[0].startswith("@"):
            return None
        part = {src: e for src, _d, e in self.steps[rd[0]].partials}.get(nm)
        return None if part is None else (rd[0], part)

    def _shared_adjoints(self) -> dict[int, Group]:
        """Static groups whose members' adjoints equal a dynamic group's member by member (each pair
        read only by the same owner, with the same partial: ``tanh(W h + U x + b)``): they share the
        dynamic group's adjoint buffer, one array for both weight gradients."""
        shared: dict[int, Group] = {}
        for gs in self.static_groups:
            for gd in self.dynamic_groups:
                if gd in shared.values() or len(gs.members) != len(gd.members) or gs.rows != gd.rows:
                    continue
                if all(self.sole_reader(a) is not None and self.sole_reader(a) == self.sole_reader(b)
                       for a, b in zip(gs.members, gd.members)):
                    shared[gs.index] = gd
                    break
        return shared

    def _has_step_buffer(self, nm: str) -> bool:
        """Whether the adjoint of ``nm`` is a per-row buffer over all steps (a group's, or a static node's)."""
        if nm in self.group_of:
            g, _ = self.group_of[nm]
            return not (g.static and g.index in self.shared_adjoint)
        return nm in self.static_nodes and nm not in self.register_adjoints

    def _column_sums(self) -> dict[tuple[str, str], str]:
        """Vector parameters whose gradient is the column sum of a stored adjoint, after the loop.

        In a state-dependent fused loop, an owner that reads a vector parameter ``p`` and a
        sibling ``s`` with the same partial, ``s`` read by this owner only and stored over all
        steps (``b`` and ``W h`` in ``tanh(W h + U x + b)``), sends ``p`` exactly what it sends
        ``s``: ``p``'s gradient is the column sum of ``s``'s adjoint.  Maps ``(owner, p)`` to ``s``.
        """
        out: dict[tuple[str, str], str] = {}
        for op in self.dynamic_ops:
            if op.kind != "loop":
                continue
            for st in op.items:
                siblings: dict[sympy.Expr, str] = {}
                for src, _d, e in st.partials:
                    if self._has_step_buffer(src) and self.readers.get(src) == [st.name] and self.dim_of[src] == op.dim:
                        siblings.setdefault(e, src)
                for src, _d, e in st.partials:
                    if self.kind_of.get(src) == "vector" and self.dim_of[src] == op.dim and e in siblings:
                        out[(st.name, src)] = siblings[e]
        return out

    def input_products_in_loop(self) -> bool:
        """Whether the static part is nothing but products (then large batches compute them per step)."""
        return bool(self.static_ops) and all(op.kind == "gemm" for op in self.static_ops)

    def _read_outside_forward(self, nm: str) -> bool:
        """Whether BPTT or JVP read the value of ``nm`` (a partial refers to it, or a product reads it)."""
        for st in self.steps.values():
            if st.kind == "linear" and st.source == nm:
                return True
            if any(s.name == nm for _src, _d, e in st.partials for s in e.free_symbols):
                return True
        return False

    def scratch_input_products(self, g: Group) -> bool:
        """Whether static group ``g``'s products may be one row reused every step, when computed per step:
        nothing reads them but the same step of the forward loop."""
        return self.input_products_in_loop() and not any(self._read_outside_forward(m) for m in g.members)

    def scratch_group_adjoint(self, g: Group) -> bool:
        """Whether dynamic group ``g``'s adjoints may be one row reused every step, when its weight
        gradient is accumulated per step: no column sum reads them after the loop, and no shared
        static group sends them to anything but the input (whose gradient is optional)."""
        if any(sib in g.members for sib in self.column_sums.values()):
            return False
        for gs_index, gd in self.shared_adjoint.items():
            if gd.index == g.index:
                gs = self.static_groups[gs_index]
                if self.kind_of.get(gs.source) != "input":
                    return False
        return True

    def group_adjoint_sent_to_input(self, g: Group) -> bool:
        """Whether a static group sharing dynamic group ``g``'s adjoints sends them to the input
        after the loop (then they are kept for every step when the input gradient is computed)."""
        return any(gd.index == g.index and self.kind_of.get(self.static_groups[gs].source) == "input"
                   for gs, gd in self.shared_adjoint.items())

    def static_wgrad_in_loop(self, g: Group) -> bool:
        """Whether the weight gradient of static group ``g`` may be accumulated step by step in the
        reverse loop: its adjoint rows of step ``t`` must be complete at the end of iteration ``t``,
        i.e. shared with a dynamic group's, or written only by state-dependent owners (a reader in
        the state-independent part fills them after the loop)."""
        if g.index in self.shared_adjoint:
            return True
        for mem in g.members:
            for rd in self.readers.get(mem, []):
                if rd.startswith("@") or self.steps[rd].static:
                    return False
        return True

    def x_elementwise(self) -> bool:
        """Whether an elementwise node reads the input directly (its gradient is then always computed)."""
        return any(src == self.xname for st in self.steps.values() for src, _d, _e in st.partials)

    def state_index(self, st: Step) -> int:
        return self.states.index(st.state)  # type: ignore[arg-type]


def cell_plan(cell: Cell) -> CellPlan:
    """The structural plan of ``cell`` (made once per cell and cached on it)."""
    key = ("codegen", "plan")
    if key not in cell._index:
        cell._index[key] = CellPlan(cell)
    return cell._index[key]


#: the values each kind of structural decision can take
STRUCTURAL_VALUES: dict[str, tuple[bool, ...]] = {
    "stacked_group": (False, True),
    "fused_loop": (False, True),
    "register_adjoint": (False, True),
    "shared_adjoint": (False, True),
    "column_sum": (False, True),
    "static_adjoint_complete_in_loop": (False, True),
    "stored_for_bptt": (False, True),
    "static_products_only": (False, True),
    "input_elementwise": (False, True),
    "scratch_eligible": (False, True),
}


def _vector_reads(plan: CellPlan) -> list[tuple[str, str]]:
    """(owner, vector parameter) pairs read in the time step's fused loops."""
    return [(st.name, src) for op in plan.dynamic_ops if op.kind == "loop" for st in op.items
            for src, _d, _e in st.partials if plan.kind_of.get(src) == "vector"]


def structural_decisions(plan: CellPlan) -> list[tuple[str, str, bool]]:
    """The plan's decisions as ``(kind, instance, value)`` (see the module docstring)."""
    out: list[tuple[str, str, bool]] = []
    out += [("stacked_group", f"{'RS' if g.static else 'R'}{g.index}", len(g.members) > 1) for g in plan.groups]
    for tag, ops in (("static", plan.static_ops), ("step", plan.dynamic_ops)):
        out += [("fused_loop", f"{tag}{k}", len(op.items) > 1) for k, op in enumerate(ops) if op.kind == "loop"]
    out += [("register_adjoint", nm, nm in plan.register_adjoints) for nm in plan.nodes + plan.static_nodes
            if nm not in plan.companions]
    out += [("shared_adjoint", f"RS{g.index}", g.index in plan.shared_adjoint) for g in plan.static_groups]
    out += [("column_sum", f"{owner}:{p}", (owner, p) in plan.column_sums) for owner, p in _vector_reads(plan)]
    out += [("static_adjoint_complete_in_loop", f"RS{g.index}", plan.static_wgrad_in_loop(g)) for g in plan.static_groups]
    out += [("stored_for_bptt", nm, nm in plan.needed) for nm in plan.nodes]
    if plan.static_ops:
        out.append(("static_products_only", "", plan.input_products_in_loop()))
    out.append(("input_elementwise", "", plan.x_elementwise()))
    out += [("scratch_eligible", f"Y{g.index}", plan.scratch_input_products(g)) for g in plan.static_groups]
    out += [("scratch_eligible", f"L{g.index}", plan.scratch_group_adjoint(g)) for g in plan.dynamic_groups]
    return out
