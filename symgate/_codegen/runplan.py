"""The run plan: every decision a compiled kernel takes for one call, from the sizes and what is asked.

One generated program serves every size; the choices that depend on the sizes are taken
here, in Python, and passed to the program as integer flags, so what the kernel does is
exactly what this plan says (the program decides nothing itself):

``input_products_per_step``
    the static groups' products (``U x``) one product per step at the top of the time
    loop, for large batches (each step's rows used while in cache), else one product over
    all ``T*B`` rows before the loop; only for cells whose static part is nothing but
    products;
``wgrad_per_step``
    weight gradients accumulated per step inside the reverse loop (large batches), else
    one product over all ``T*B`` rows after it; a static group takes the per-step route
    only if its adjoint rows are complete in the loop (``static_wgrad``);
``routes``
    for every matrix product of the program (a *site*), plain loops or BLAS: tiny products
    (fewer than four rows, or at most ``small_gemm`` multiply-adds) are faster as loops;
    transposed operands always go to BLAS;
``scratch``
    the ``(T, B, .)`` arrays that are one ``(B, .)`` row reused every step: input products
    read only at their own step, group adjoints whose weight gradient is accumulated per
    step and that nothing reads after the loop;
``stored_nodes`` / ``stored_groups``
    the state-dependent values kept for every step (BPTT reads them, or the caller asked
    for the trajectory); the others are one row rewritten every step.

:class:`Policy` holds the two thresholds; tests may pass another to force either side of
every decision at small sizes.  :meth:`RunPlan.decisions` lists every decision; with the
structural ones (:func:`~.plan.structural_decisions`) they make a kernel's
:class:`KernelPlan` (``CompiledKernel.plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .._cell import Dim
from .._errors import ShapeError
from .prelude import SMALL_GEMM

__all__ = ["STEP_WGRAD_MIN_B", "Policy", "DEFAULT_POLICY", "GemmSite", "RunOptions", "RunPlan", "KernelPlan", "run_plan",
           "extent", "DECISION_VALUES"]

#: the values each kind of decision can take (a route kind is "route:<role>")
DECISION_VALUES: dict[str, tuple[Any, ...]] = {
    "wgrad_per_step": (False, True),
    "input_products_per_step": (False, True),
    "static_wgrad": ("whole", "per_step"),
    "route": ("blas", "loops"),
    "scratch_row": (False, True),
}

#: batches at least this large compute the input products of the forward pass and accumulate every
#: weight gradient step by step inside the time loops (while the step's rows are in cache); smaller
#: ones use one product over all T*B rows before/after the loop
STEP_WGRAD_MIN_B = 8


@dataclass(frozen=True)
class Policy:
    """Thresholds of the size-dependent decisions: per-step products from ``step_min_batch``
    sequences; plain loops for products of at most ``small_gemm`` multiply-adds (or < 4 rows)."""

    step_min_batch: int = STEP_WGRAD_MIN_B
    small_gemm: int = SMALL_GEMM


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class GemmSite:
    """One matrix product of the generated program: ``C (M x N) = op(A) op(B)`` with ``K`` inner terms.

    ``role`` says which product it is (``"forward.group"``, ``"bptt.adjoint"``, ...); the
    extents are the C expressions of the program (products of size names: ``c.T*c.B``,
    ``c.R0``, ``c.D1``, ``B``, ...), evaluated by :func:`extent`.
    """

    index: int
    role: str
    ta: int
    tb: int
    M: str
    N: str
    K: str


@dataclass(frozen=True)
class RunOptions:
    """What one call computes: the forward pass always; ``loss`` (``"last"``, ``"step"`` or
    None), ``backward`` (BPTT), ``jvp``, ``cotangents`` (given state cotangents), ``store_all``
    (every node's trajectory kept, as ``forward`` returns it), ``x_grad`` (the input gradient)."""

    loss: str | None = None
    backward: bool = False
    jvp: bool = False
    cotangents: bool = False
    store_all: bool = False
    x_grad: bool = True


def extent(expr: str, env: Mapping[str, int]) -> int:
    """The value of a size expression of the generated program (a product of names and integers)."""
    value = 1
    for tok in expr.replace(" ", "").split("*"):
        name = tok[2:] if tok.startswith("c.") else tok
        if name.isdigit():
            value *= int(name)
        elif name in env:
            value *= int(env[name])
        else:  # pragma: no cover - every extent the emitters write is a product of known sizes
            raise ShapeError(f"internal: unknown size {tok!r} in {expr!r}")
    return value


@dataclass
class RunPlan:
    """The decisions of one call (see the module docstring)."""

    options: RunOptions
    policy: Policy
    input_products_per_step: bool | None  # None: the cell's static part is not products only
    wgrad_per_step: bool
    static_wgrad: dict[int, str]  # static group -> "per_step" | "whole"
    routes: tuple[int, ...]  # per gemm site: 1 plain loops, 0 BLAS
    route_applies: tuple[bool, ...]  # per site: False where the operands are transposed (always BLAS)
    scratch: frozenset[str]
    stored_nodes: frozenset[str]
    stored_groups: frozenset[int]
    sites: tuple[GemmSite, ...] = field(default_factory=tuple)
    scratch_candidates: frozenset[str] = frozenset()

    def decisions(self) -> list[tuple[str, str, Any]]:
        """Every decision of this run as ``(kind, instance, value)``, e.g.
        ``("route:forward.group", "#2", "loops")``, ``("wgrad_per_step", "", True)``."""
        out: list[tuple[str, str, Any]] = [("wgrad_per_step", "", self.wgrad_per_step)]
        if self.input_products_per_step is not None:
            out.append(("input_products_per_step", "", self.input_products_per_step))
        out += [("static_wgrad", f"RS{g}", how) for g, how in sorted(self.static_wgrad.items())]
        out += [(f"route:{site.role}", f"#{site.index}", "loops" if route else "blas")
                for site, route, applies in zip(self.sites, self.routes, self.route_applies) if applies]
        out += [("scratch_row", code, code in self.scratch) for code in sorted(self.scratch_candidates)]
        return out


def _env(sizes: Mapping[Dim, int], dims: list[Dim], widths: Mapping[str, int], T: int, B: int, o: int,
         loss_rows: int, state_dim: int) -> dict[str, int]:
    env = {"T": T, "B": B, "o": o, "rows": loss_rows, "n": state_dim}
    env.update({f"D{k}": int(sizes[d]) for k, d in enumerate(dims)})
    env.update(widths)
    return env


def _route(site: GemmSite, env: Mapping[str, int], policy: Policy) -> tuple[int, bool]:
    if site.ta or site.tb:
        return 0, False
    M, N, K = (extent(e, env) for e in (site.M, site.N, site.K))
    return int(M < 4 or M * N * K <= policy.small_gemm), True


def run_plan(gen: Any, sizes: Mapping[Dim, int], T: int, B: int, options: RunOptions, *, o: int = 1,
             policy: Policy = DEFAULT_POLICY) -> RunPlan:
    """The run plan of generated program ``gen`` (a :class:`~symgate._codegen.GeneratedSource`)."""
    per_step = B >= policy.step_min_batch
    widths = {("RS" if g.static else "R") + str(g.index): sum(int(sizes[r]) for r in g.rows) for g in gen.groups}
    loss_rows = T * B if options.loss == "step" else B
    env = _env(sizes, gen.dims, widths, T, B, o, loss_rows, int(sizes[gen.state_dims[0]]))
    routed = [_route(site, env, policy) for site in gen.gemm_sites]
    x_products = per_step if gen.input_products_in_loop else None
    static_wgrad = {g.index: ("per_step" if per_step and g.index in gen.static_wgrad_in_loop else "whole")
                    for g in gen.groups if g.static}
    x_grad = options.x_grad or gen.x_elementwise
    scratch = set()
    if x_products and not options.store_all:
        scratch |= {c for c in gen.scratch if c.startswith("Y")}
    if options.backward and per_step:
        scratch |= {c for c in gen.scratch if c.startswith("L") and not (x_grad and c in gen.scratch_without_x_grad)}
    stored_nodes = frozenset(gen.nodes) if options.store_all else frozenset(n for n in gen.nodes if n in gen.needed)
    stored_groups = frozenset(g.index for g in gen.groups if not g.static and
                              (options.store_all or any(m in gen.needed for m in g.members)))
    return RunPlan(options, policy, x_products, per_step, static_wgrad, tuple(r for r, _ in routed),
                   tuple(a for _, a in routed), frozenset(scratch), stored_nodes, stored_groups,
                   tuple(gen.gemm_sites), frozenset(gen.scratch))


@dataclass
class KernelPlan:
    """Everything a compiled kernel decides for one call: the cell's structural decisions
    (sizes do not matter) and the run plan's."""

    structural: list[tuple[str, str, Any]]
    run: RunPlan

    def decisions(self) -> list[tuple[str, str, Any]]:
        """All decisions as ``(kind, instance, value)``."""
        return list(self.structural) + self.run.decisions()

    def __str__(self) -> str:
        return "\n".join(f"{kind:34s} {inst:12s} {value}" for kind, inst, value in self.decisions())
