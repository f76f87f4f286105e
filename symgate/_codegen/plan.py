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
from .._derive._program import Step, program
from .._errors import CellSpecError

__all__ = ["Group", "Op", "CellPlan", "cell_plan"]


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
        self.kind_of: dict[str, str] = {lf.name: lf.kind for lf in cell.leaves}
        self.dim_of: dict[str, Dim] = {lf.name: lf.dim for lf in cell.leaves}
        self.dim_of.update({nd.name: nd.dim for nd in cell.nodes})
        self.shape_of = {p.name: p.shape for p in cell.params}
        steps = list(program(cell))
        self.steps: dict[str, Step] = {st.name: st for st in steps}
        self._schedule(cell, steps)
        self.readers = self._readers(steps)
        self.needed = self._needed(steps)
        self.op_of = self._op_positions()
        self.register_adjoints = self._register_adjoints()
        self.shared_adjoint = self._shared_adjoints()

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
        self.nodes = [st.name for st in dynamic_steps if st.kind in ("fn", "arith")]
        self.static_nodes = [st.name for st in static_steps if st.kind in ("fn", "arith")]

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
