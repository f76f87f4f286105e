"""Layout: the arrays of a generated program, their identifiers, and where each value lives.

Identifiers follow a fixed scheme, so a user's names never enter the generated code (they
appear only in comments, and are validated identifiers there):

=========  =====================================================================
``X``      the inputs ``(T, B, m)``; ``S0, S1`` the states ``(T+1, B, d)``
``M0..``   parameter matrices; ``P0..`` vector and ``p0..`` scalar parameters
``N0..``   state-dependent elementwise nodes; ``Q0..`` state-independent ones
``Z0..``   outputs of state-dependent groups; ``Y0..`` of state-independent groups
``W0/U0``  stacked matrices of a group (``WT0/UT0`` their transposes, or scratch)
``A0..``   adjoints of nodes; ``QA0..`` of static nodes; ``L0``/``YA0`` of groups
``G*``     gradients (``GX`` inputs, ``GV`` readout, ``GW0/GU0`` stacked weights,
           ``GP0``/``Gp0`` vector/scalar parameters); ``CA0/CN0`` carried adjoints
``T*``     forward-mode tangents of the arrays of the same name
``D0..``   sizes of the named dimensions; ``R0``/``RS0`` stacked rows of a group
=========  =====================================================================

A :class:`Slot` is one array in the order the program's ``run`` takes pointers; its
``shape`` holds tokens the caller resolves (``"T"``, ``"T+1"``, ``"B"``, ``"o"``, a
dimension name, ``1``, or ``("R", g)`` / ``("RS", g)``, the stacked rows of a group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._cell import Dim
from .plan import CellPlan, Group

__all__ = ["Slot", "Layout"]


@dataclass(frozen=True)
class Slot:
    """One array the generated program reads or writes, in the order ``run`` takes pointers."""

    code: str
    role: str
    key: Any
    shape: tuple[Any, ...]


class Layout:
    """Identifiers of a cell's arrays and sizes (see the module docstring)."""

    def __init__(self, plan: CellPlan) -> None:
        cell = plan.cell
        self.plan = plan
        self.dim_code: dict[Dim, str] = {d: f"D{k}" for k, d in enumerate(plan.dims)}
        self.dim_code[1] = "1"
        self.matrix_code = {p.name: f"M{k}" for k, p in enumerate(q for q in cell.params if q.kind == "matrix")}
        self.vector_code = {p.name: f"P{k}" for k, p in enumerate(q for q in cell.params if q.kind == "vector")}
        self.scalar_code = {p.name: f"p{k}" for k, p in enumerate(q for q in cell.params if q.kind == "scalar")}
        self.node_code = {nm: f"N{k}" for k, nm in enumerate(plan.nodes)}
        self.static_node_code = {nm: f"Q{k}" for k, nm in enumerate(plan.static_nodes)}
        stored = [nm for nm in plan.nodes if nm not in plan.register_adjoints and nm not in plan.companions]
        self.adjoint_code = {nm: f"A{k}" for k, nm in enumerate(stored)}
        stored_static = [nm for nm in plan.static_nodes if nm not in plan.register_adjoints and nm not in plan.companions]
        self.static_adjoint_code = {nm: f"QA{k}" for k, nm in enumerate(stored_static)}

    # ------------------------------------------------------------------ sizes
    def rows(self, g: Group) -> str:
        """The identifier of a group's stacked row count (``R0`` or ``RS0``)."""
        return f"{'RS' if g.static else 'R'}{g.index}"

    def ctx_dim(self, d: Dim) -> str:
        """A dimension's size as the driver reads it (from the context struct)."""
        return "1" if d == 1 else f"c.{self.dim_code[d]}"

    def offset(self, g: Group, k: int) -> str:
        """Column offset of member ``k`` in the stacked rows of ``g`` (sizes of the members before it)."""
        parts = [self.dim_code[r] for r in g.rows[:k]]
        return " + ".join(parts) if parts else "0"

    def member_offset(self, nm: str) -> tuple[Group, str]:
        g, k = self.plan.group_of[nm]
        return g, self.offset(g, k)

    def node_id(self, nm: str) -> str:
        """The identifier of a node (state-dependent ``N*`` or static ``Q*``)."""
        return self.node_code[nm] if nm in self.node_code else self.static_node_code[nm]

    # ------------------------------------------------------------------ slots
    def slots(self) -> tuple[list[Slot], int]:
        """Every array in ``run``'s pointer order, and how many of them are inputs."""
        out: list[Slot] = []
        out += self._input_slots()
        n_inputs = len(out)
        out += self._forward_slots() + self._backward_slots() + self._tangent_slots()
        return out, n_inputs

    def _input_slots(self) -> list[Slot]:
        p = self.plan
        out = [Slot("X", "x", p.xname, ("T", "B", p.dim_of[p.xname]))]
        out += [Slot(code, "param", nm, p.shape_of[nm]) for nm, code in self.matrix_code.items()]
        out += [Slot(code, "param", nm, p.shape_of[nm]) for nm, code in self.vector_code.items()]
        out += [Slot(code, "param", nm, ()) for nm, code in self.scalar_code.items()]
        out += [Slot(f"H{k}", "h0", s, ("B", p.dim_of[s])) for k, s in enumerate(p.states)]
        out.append(Slot("LV", "loss_V", None, ("o", p.dim_of[p.states[0]])))
        out.append(Slot("LY", "loss_y", None, ()))  # shape depends on the loss
        out += [Slot(f"C{k}", "cot", s, ("T", "B", p.dim_of[s])) for k, s in enumerate(p.states)]
        return out

    def _forward_slots(self) -> list[Slot]:
        p = self.plan
        out = [Slot(f"S{k}", "state", s, ("T+1", "B", p.dim_of[s])) for k, s in enumerate(p.states)]
        out += [Slot(code, "node", nm, ("T", "B", p.dim_of[nm])) for nm, code in self.node_code.items()]
        out += [Slot(code, "static", nm, ("T", "B", p.dim_of[nm])) for nm, code in self.static_node_code.items()]
        for g in p.static_groups:
            out.append(Slot(f"U{g.index}", "stack", g, (("RS", g.index), g.cols)))
            out.append(Slot(f"UT{g.index}", "stack_t", g, (g.cols, ("RS", g.index))))  # scratch for the weight gradient
            out.append(Slot(f"Y{g.index}", "static_group", g, ("T", "B", ("RS", g.index))))
        for g in p.dynamic_groups:
            out.append(Slot(f"W{g.index}", "stack", g, (("R", g.index), g.cols)))
            out.append(Slot(f"WT{g.index}", "stack_t", g, (g.cols, ("R", g.index))))
            out.append(Slot(f"Z{g.index}", "group", g, ("T", "B", ("R", g.index))))
        return out

    def _backward_slots(self) -> list[Slot]:
        p = self.plan
        out: list[Slot] = []
        for k, s in enumerate(p.states):
            out.append(Slot(f"CA{k}", "carry", s, ("B", p.dim_of[s])))
            out.append(Slot(f"CN{k}", "carry2", s, ("B", p.dim_of[s])))
        out += [Slot(code, "adj", nm, ("B", p.dim_of[nm])) for nm, code in self.adjoint_code.items()]
        out += [Slot(code, "static_adj", nm, ("T", "B", p.dim_of[nm])) for nm, code in self.static_adjoint_code.items()]
        for g in p.static_groups:
            out.append(Slot(f"YA{g.index}", "static_group_adj", g, ("T", "B", ("RS", g.index))))
            out.append(Slot(f"GU{g.index}", "grad_stack", g, (("RS", g.index), g.cols)))
        for g in p.dynamic_groups:
            out.append(Slot(f"L{g.index}", "group_adj", g, ("T", "B", ("R", g.index))))
            out.append(Slot(f"GW{g.index}", "grad_stack", g, (("R", g.index), g.cols)))
        out.append(Slot("GX", "grad_x", None, ("T", "B", p.dim_of[p.xname])))
        out += [Slot("G" + code, "grad", nm, p.shape_of[nm]) for nm, code in self.vector_code.items()]
        out += [Slot("G" + code, "grad", nm, (1,)) for nm, code in self.scalar_code.items()]
        out.append(Slot("GV", "grad_V", None, ("o", p.dim_of[p.states[0]])))
        out.append(Slot("LR", "loss_res", None, ()))  # residuals; shape depends on the loss
        return out

    def _tangent_slots(self) -> list[Slot]:
        """Forward-mode tangents (JVP): inputs, then work arrays and the state tangents."""
        p = self.plan
        out = [Slot("TX", "tan_x", p.xname, ("T", "B", p.dim_of[p.xname]))]
        out += [Slot("T" + code, "tan_param", nm, p.shape_of[nm]) for nm, code in self.matrix_code.items()]
        out += [Slot("T" + code, "tan_param", nm, p.shape_of[nm]) for nm, code in self.vector_code.items()]
        out += [Slot("T" + code, "tan_param", nm, (1,)) for nm, code in self.scalar_code.items()]
        for k, s in enumerate(p.states):
            out.append(Slot(f"TH{k}", "tan_h0", s, ("B", p.dim_of[s])))
            out.append(Slot(f"TS{k}", "tan_state", s, ("T+1", "B", p.dim_of[s])))
        out += [Slot("T" + code, "tan_node", nm, ("B", p.dim_of[nm])) for nm, code in self.node_code.items()]
        out += [Slot("T" + code, "tan_static", nm, ("T", "B", p.dim_of[nm])) for nm, code in self.static_node_code.items()]
        for g in p.static_groups:
            out.append(Slot(f"TU{g.index}", "tan_stack", g, (("RS", g.index), g.cols)))
            out.append(Slot(f"TY{g.index}", "tan_static_group", g, ("T", "B", ("RS", g.index))))
        for g in p.dynamic_groups:
            out.append(Slot(f"TW{g.index}", "tan_stack", g, (("R", g.index), g.cols)))
            out.append(Slot(f"TWT{g.index}", "tan_stack_t", g, (g.cols, ("R", g.index))))
            out.append(Slot(f"TZ{g.index}", "tan_group", g, ("B", ("R", g.index))))
        return out

    def ints(self, n_sites: int) -> list[tuple[Any, ...]]:
        """The integer parameters of ``run``, in order: sizes, strides, the run plan's flags and
        the route (plain loops or BLAS) of each of the ``n_sites`` matrix products."""
        p = self.plan
        ints: list[tuple[Any, ...]] = [("T",), ("B",), ("o",)] + [("dim", d) for d in p.dims]
        ints += [("R", g.index) for g in p.dynamic_groups] + [("RS", g.index) for g in p.static_groups]
        ints += [("stride", self.node_code[nm]) for nm in p.nodes] + [("stride", f"Z{g.index}") for g in p.dynamic_groups]
        # input products and group adjoints: (T, B, .) arrays, or one (B, .) row reused every step where
        # nothing reads them across steps (see the run plan's scratch rows)
        ints += [("stride", f"Y{g.index}") for g in p.static_groups] + [("stride", f"L{g.index}") for g in p.dynamic_groups]
        ints += [("has_cot", k) for k in range(len(p.states))]
        ints += [("flag", "xstep"), ("flag", "wstep")]
        return ints + [("route", k) for k in range(n_sites)]

    def int_field(self, it: tuple[Any, ...]) -> str:
        """The context-struct field of one integer parameter."""
        if it[0] == "dim":
            return self.dim_code[it[1]]
        if it[0] in ("R", "RS"):
            return f"{it[0]}{it[1]}"
        if it[0] == "stride":
            return f"st{it[1]}"
        if it[0] == "has_cot":
            return f"has_cot{it[1]}"
        if it[0] == "flag":
            return it[1]
        if it[0] == "route":
            return f"rt{it[1]}"
        return it[0]
