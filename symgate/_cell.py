r"""The cell IR: a small dataflow graph over vectors, and its builder API.

A cell is written as an ordinary Python function whose arguments are annotated
with what they are (:class:`State`, :class:`Input`, :class:`Matrix`,
:class:`Vector`, :class:`Scalar`, :class:`Constant`).  symgate calls the function
once with *traced* arguments; the operators record a graph of

* **leaves** -- states (the previous values), inputs, parameters, constants;
* **Linear nodes** ``W @ v`` (a one-row matrix gives a scalar broadcast over units);
* **function nodes** ``F(u)`` for ``F`` in tanh, sigmoid, exp, log, softplus, whose
  argument ``u`` is an arithmetic expression in per-unit scalar symbols;
* **arithmetic nodes**, created where a ``Linear`` reads a compound expression.

Every vector quantity has a *dimension*: a name (``"n"``, ``"m"``) or ``1`` (a
scalar, broadcast over units).  Shapes are checked while tracing.  Local variables
of the body that hold a function application or a ``Linear`` output name that
node (``g = sigmoid(...)`` names the gate ``g``); this is how derived formulas
print with the names the author chose.

>>> import symgate as sg
>>> @sg.cell
... def leaky(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"),
...           U: sg.Matrix("n", "m"), alpha: sg.Constant(0.8)):
...     phi = sg.tanh(W @ h + U @ x)
...     return (1 - alpha) * h + alpha * phi
>>> leaky.update_equations()
["h' = alpha*phi + h*(1 - alpha)", 'phi = tanh(z_U + z_W)', 'z_W = W @ h', 'z_U = U @ x']
"""

from __future__ import annotations

import inspect
import keyword
import math
import numbers
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import sympy

from ._errors import (
    CellSpecError,
    InvalidNameError,
    ShapeError,
    StateIndependenceError,
    SymgateError,
    UnsupportedFunctionError,
)
from ._functions import DERIVATIVE_RULES, NODE_STEMS

__all__ = [
    "Dim",
    "State",
    "Input",
    "Matrix",
    "Vector",
    "Scalar",
    "Constant",
    "UnitSymbol",
    "Node",
    "Param",
    "Leaf",
    "Cell",
    "cell",
    "make_cell",
    "dim_symbol",
    "RESERVED_NAMES",
]

Dim = Union[str, int]

#: Names a user may not give to a cell argument or a named quantity.
RESERVED_NAMES: frozenset[str] = frozenset(
    set(keyword.kwlist)
    | set(keyword.softkwlist)
    | {
        # SymPy singletons and functions that would print ambiguously
        "I", "E", "S", "N", "O", "Q", "pi", "oo", "nan", "zoo",
        "exp", "log", "tanh", "sigmoid", "softplus", "sqrt", "diag", "sin", "cos",
        # names symgate itself uses in derived formulas and generated code
        "sg", "symgate", "np", "numpy", "self", "cls", "out", "params", "grads",
        # C / Cython keywords (the kernels are generated as Cython)
        "auto", "char", "const", "double", "enum", "extern", "float", "goto", "int",
        "long", "register", "short", "signed", "sizeof", "static", "struct", "switch",
        "typedef", "union", "unsigned", "void", "volatile", "cdef", "cpdef", "ctypedef",
        "cimport", "nogil", "gil", "inline", "readonly", "include", "restrict",
        "NULL", "bool",
    }
)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        raise InvalidNameError(f"{what} name {name!r} is not a valid ASCII Python identifier")
    if name in RESERVED_NAMES:
        raise InvalidNameError(f"{what} name {name!r} is reserved; choose another name")
    if name.startswith("_"):
        raise InvalidNameError(f"{what} name {name!r} starts with '_', which symgate reserves")
    return name


def name_args(**values: Any) -> None:
    """Raise :class:`CellSpecError` for any argument that should name a state, parameter or split and is not a string."""
    for arg, v in values.items():
        if v is not None and not isinstance(v, str):
            raise CellSpecError(f"{arg} must be a name (a str) or None, got {type(v).__name__}")


def _check_dim(d: Any, what: str) -> Dim:
    if isinstance(d, bool):
        raise CellSpecError(f"{what}: dimension {d!r} must be a name such as 'n' or the integer 1")
    if isinstance(d, numbers.Integral):
        if int(d) != 1:
            raise CellSpecError(
                f"{what}: fixed dimension {d!r} is not supported; use a named dimension "
                "('n', 'm', ...) or 1 for a scalar broadcast over units"
            )
        return 1
    if isinstance(d, str):
        return _check_name(d, "dimension")
    raise CellSpecError(f"{what}: dimension {d!r} must be a name such as 'n' or the integer 1")


_DIM_SYMBOLS: dict[str, sympy.Symbol] = {}


def dim_symbol(d: Dim) -> sympy.Expr:
    """The SymPy symbol (positive integer) of a named dimension, or 1."""
    if d == 1:
        return sympy.S.One
    assert isinstance(d, str)
    if d not in _DIM_SYMBOLS:
        _DIM_SYMBOLS[d] = sympy.Symbol(d, integer=True, positive=True)
    return _DIM_SYMBOLS[d]


class UnitSymbol(sympy.Symbol):
    """A per-unit scalar symbol that stands for one entry of a vector quantity.

    ``dim`` is the vector's dimension (a name, or 1 for a scalar broadcast over
    units).  Two unit symbols are equal only if name and dim are.
    """

    __slots__ = ("dim",)
    dim: Dim

    def __new__(cls, name: str, dim: Dim) -> "UnitSymbol":
        obj = sympy.Symbol.__xnew__(cls, name, real=True)
        obj.dim = dim
        return obj

    def __getnewargs_ex__(self) -> tuple[tuple[str, Dim], dict]:
        return ((self.name, self.dim), {})

    def _hashable_content(self) -> tuple:
        return sympy.Symbol._hashable_content(self) + (self.dim,)


# ----------------------------------------------------------------------------
# argument specifications (the annotations of a cell function)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """A recurrent state of dimension ``dim``; the body sees its previous value."""

    dim: Dim = "n"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _check_dim(self.dim, "State"))


@dataclass(frozen=True)
class Input:
    """An input vector of dimension ``dim`` (one per time step)."""

    dim: Dim = "m"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _check_dim(self.dim, "Input"))


@dataclass(frozen=True)
class Matrix:
    """A trainable matrix of shape ``(rows, cols)``; use it as ``W @ v``."""

    rows: Dim
    cols: Dim

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", _check_dim(self.rows, "Matrix rows"))
        object.__setattr__(self, "cols", _check_dim(self.cols, "Matrix cols"))


@dataclass(frozen=True)
class Vector:
    """A trainable vector of dimension ``dim`` used elementwise (a bias, say)."""

    dim: Dim = "n"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _check_dim(self.dim, "Vector"))


@dataclass(frozen=True)
class Scalar:
    """A trainable scalar, broadcast over units."""


@dataclass(frozen=True)
class Constant:
    """A fixed (non-trainable) scalar with a value, kept symbolic in derivations."""

    value: float

    def __post_init__(self) -> None:
        v = self.value
        try:
            fv = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan
        except OverflowError:
            fv = math.inf
        if not math.isfinite(fv):
            raise CellSpecError(f"Constant value {v!r} must be a finite real number (representable as a float)")
        object.__setattr__(self, "value", fv)


Spec = Union[State, Input, Matrix, Vector, Scalar, Constant]

# ----------------------------------------------------------------------------
# the graph
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A state, input, vector/scalar parameter or constant of a cell."""

    name: str
    kind: str  # "state" | "input" | "vector" | "scalar" | "constant"
    dim: Dim
    symbol: UnitSymbol
    value: float | None = None  # constants only


@dataclass(frozen=True)
class Param:
    """A trainable parameter: ``kind`` is "matrix", "vector" or "scalar"."""

    name: str
    kind: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class Node:
    """An interior node of the cell graph.

    ``kind`` is ``"fn"`` (``symbol = func(arg)``), ``"linear"``
    (``symbol = matrix @ source``) or ``"arith"`` (``symbol = expr``).
    ``expr`` is the defining per-unit expression (``func(arg)`` or the arithmetic
    expression; for a Linear node, the symbol itself).
    """

    name: str
    kind: str
    symbol: UnitSymbol
    dim: Dim
    expr: sympy.Expr
    func: type | None = None
    arg: sympy.Expr | None = None
    matrix: str | None = None
    source: UnitSymbol | None = None
    named_by_user: bool = False
    marked_gate: bool = False

    @property
    def is_gate(self) -> bool:
        """True for a logistic (sigmoid) node, or a node marked with ``.as_gate()``."""
        from ._functions import Sigmoid

        return self.marked_gate or (self.kind == "fn" and self.func is Sigmoid)


class _Builder:
    """Records the graph while a cell body runs."""

    def __init__(self) -> None:
        self.leaves: dict[UnitSymbol, Leaf] = {}
        self.nodes: list[Node] = []
        self.by_symbol: dict[UnitSymbol, Node] = {}
        self.counter = 0
        self.codes: set[Any] = set()  # code objects of the body (and what it wraps)
        self.frames: dict[int, Any] = {}  # id(frame) -> frame of the body, seen while tracing

    def note_frame(self) -> None:
        """Remember the body's frame (its locals name the nodes once it returns)."""
        f = sys._getframe(1)
        for _ in range(12):
            if f is None:
                return
            if f.f_code in self.codes:
                self.frames[id(f)] = f
                return
            f = f.f_back

    def new_symbol(self, dim: Dim) -> UnitSymbol:
        self.counter += 1
        return UnitSymbol(f"_t{self.counter}", dim)

    def dim_of(self, s: sympy.Symbol) -> Dim:
        return s.dim  # type: ignore[attr-defined]

    def add(self, node: Node) -> "Var":
        self.note_frame()
        self.nodes.append(node)
        self.by_symbol[node.symbol] = node
        return Var(node.symbol, node.dim, self)

    # -- bounded expressions ---------------------------------------------------
    def materialise(self, v: "Var") -> None:
        """Turn the compound quantity ``v`` into an arithmetic node, in place: ``v`` (and
        every later use of it) then reads the node's symbol."""
        node = Node(name="", kind="arith", symbol=self.new_symbol(v.dim), dim=v.dim, expr=v.expr)
        self.add(node)
        v.expr, v._size, v._parts = node.symbol, 0, None

    def bound(self, operands: Sequence[Any]) -> None:
        """Make room for an operation on ``operands`` whose result would exceed
        :data:`MAX_EXPR_OPS` operations.

        The traced expressions are trees while the body's dataflow is a DAG: a quantity
        used twice is copied twice, and ``e = (e + h) * e`` repeated doubles the tree per
        level.  So first every compound quantity that the pending operation reaches more
        than once (through the operations that built its operands) becomes a node, inner
        ones first, and the quantities built from it are rebuilt on its symbol; then, if
        the result would still be too large, the largest compound operands become nodes.
        Every node's expression stays below the limit and each shared quantity is one
        node, so derivation is linear in the number of operations.
        """
        refs: dict[int, int] = {}
        seen: set[int] = set()
        order: list[Var] = []
        stack: list[tuple[Var, bool]] = []
        for o in operands:
            if isinstance(o, Var) and o._parts is not None:
                refs[id(o)] = refs.get(id(o), 0) + 1
                stack.append((o, False))
        while stack:  # post-order over the compound quantities the operands were built from
            v, done = stack.pop()
            if done:
                order.append(v)
                continue
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.append((v, True))
            for o in v._parts[1]:  # type: ignore[index]
                if isinstance(o, Var) and o._parts is not None:
                    refs[id(o)] = refs.get(id(o), 0) + 1
                    if id(o) not in seen:
                        stack.append((o, False))
        changed: set[int] = set()
        for v in order:
            fn, ops = v._parts  # type: ignore[misc]
            if any(isinstance(o, Var) and id(o) in changed for o in ops):
                v.expr = sympy.sympify(fn(*[o.expr if isinstance(o, Var) else o for o in ops]))
                v._size = 1 + sum(o._size for o in ops if isinstance(o, Var))
                if v.expr.is_Atom:
                    v._size, v._parts = 0, None
                changed.add(id(v))
            if refs[id(v)] > 1 and v._parts is not None:
                self.materialise(v)
                changed.add(id(v))
        # still too large: the largest compound operands become nodes
        pending = [o for o in operands if isinstance(o, Var)]
        while 1 + sum(o._size for o in pending) > MAX_EXPR_OPS:
            largest = max((o for o in pending if o._parts is not None), key=lambda o: o._size)
            self.materialise(largest)


class _TracedAttributeError(CellSpecError, AttributeError):
    """Unknown attribute of a traced quantity (an AttributeError too, so ``hasattr`` works)."""


class _SympifyTracedError(UnsupportedFunctionError, sympy.SympifyError):
    """A SymPy function was applied to a traced quantity."""

    def __init__(self, func: str | None) -> None:
        what = f"SymPy function {func!r}" if func else "SymPy functions"
        self.message = (
            f"{what} cannot be applied to a traced cell quantity; "
            "use symgate.tanh, sigmoid, exp, log or softplus"
        )
        sympy.SympifyError.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message


def _calling_sympy_function() -> str | None:
    """Name of the SymPy Function class being constructed up the stack, if any."""
    f = sys._getframe(2)
    for _ in range(10):
        if f is None:
            return None
        cls = f.f_locals.get("cls")
        if isinstance(cls, type) and issubclass(cls, sympy.Function):
            return cls.__name__
        f = f.f_back
    return None


def _check_finite(expr: sympy.Expr, op: str) -> None:
    if expr.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise CellSpecError(f"'{op}' gives a non-finite expression ({expr}); e.g. a division by zero")


def _broadcast(d1: Dim, d2: Dim, op: str) -> Dim:
    if d1 == 1:
        return d2
    if d2 == 1 or d1 == d2:
        return d1
    raise ShapeError(f"cannot combine quantities of dimension {d1!r} and {d2!r} with '{op}'")


#: The most operations one traced expression may have.  An operation whose result would
#: be larger first turns compound operands into arithmetic nodes (see
#: :meth:`_Builder.bound`), so every node's expression, its SymPy derivatives and its
#: printed form stay small, and a body that reuses quantities (``e = (e + h) * e``,
#: repeated) derives in time linear in its length instead of doubling per level.  The
#: largest expression of the built-in cells and of the random and feature cell pools has
#: 10 operations (a sum of a dozen two-factor products has 23), so hand-written bodies
#: trace exactly as without the bound.
MAX_EXPR_OPS = 64


def _is_compound(expr: sympy.Expr) -> bool:
    return not expr.is_Atom


class Var:
    """A traced vector quantity inside a cell body (supports + - * / ** and functions).

    A compound quantity (the result of an arithmetic operation) also records its size
    (the number of operations in its expression tree, counted as traced) and how it was
    built (the operation and its operands), so that shared parts can be made nodes
    when an expression would grow past :data:`MAX_EXPR_OPS`.
    """

    __slots__ = ("expr", "dim", "_b", "_size", "_parts")
    __array_priority__ = 1000

    def __init__(self, expr: sympy.Expr, dim: Dim, builder: _Builder, size: int = 0,
                 parts: tuple[Callable[..., Any], tuple[Any, ...]] | None = None) -> None:
        self.expr = expr
        self.dim = dim
        self._b = builder
        if parts is None or not _is_compound(expr):
            size, parts = 0, None
        self._size = size
        self._parts = parts

    def _combine(self, f: Callable[..., Any], operands: tuple[Any, ...], dim: Dim, op: str) -> "Var":
        """The quantity ``f(*operands)`` (operands: traced quantities or SymPy numbers)."""
        size = 1 + sum(o._size for o in operands if isinstance(o, Var))
        if size > MAX_EXPR_OPS:
            self._b.bound(operands)
            size = 1 + sum(o._size for o in operands if isinstance(o, Var))
        expr = sympy.sympify(f(*[o.expr if isinstance(o, Var) else o for o in operands]))
        _check_finite(expr, op)
        return Var(expr, dim, self._b, size, (f, operands))

    # -- operands ------------------------------------------------------------
    def _coerce(self, other: Any, op: str) -> tuple[sympy.Expr, Dim]:
        if isinstance(other, Var):
            if other._b is not self._b:
                raise CellSpecError("cannot combine quantities from two different cells")
            return other.expr, other.dim
        if isinstance(other, MatVar):
            raise ShapeError(f"matrix {other.name!r} can only be used as '{other.name} @ v', not with '{op}'")
        if isinstance(other, bool):
            raise CellSpecError(f"boolean {other!r} is not a valid operand of '{op}'")
        if isinstance(other, numbers.Number):
            if isinstance(other, complex) or not math.isfinite(float(other)):  # type: ignore[arg-type]
                raise CellSpecError(f"constant {other!r} in a cell body must be a finite real number")
            return sympy.nsimplify(other) if isinstance(other, float) and float(other).is_integer() else sympy.sympify(other), 1
        if isinstance(other, sympy.Basic):
            funcs = sorted({type(f).__name__ for f in other.atoms(sympy.Function) if type(f) not in DERIVATIVE_RULES})
            if funcs:
                raise UnsupportedFunctionError(
                    f"function(s) {', '.join(funcs)} are not supported in a cell body; "
                    "use symgate.tanh, sigmoid, exp, log or softplus on traced quantities"
                )
            if isinstance(other, sympy.Expr) and other.is_number and other.is_real and other.is_finite:
                return other, 1
            free = sorted(str(s) for s in other.free_symbols)
            own = {s.name for s in [*self._b.leaves, *self._b.by_symbol]}
            if free and set(free) <= own:
                raise CellSpecError(
                    f"a raw SymPy expression of the cell's symbols ({other}) cannot be used in a body; "
                    "operate on the traced quantities themselves (h, not h.expr)"
                )
            if free:
                raise CellSpecError(
                    f"unknown symbol(s) {', '.join(free)} in the cell body; every symbol must be an argument of the cell function"
                )
            raise CellSpecError(f"unsupported operand {other!r} in '{op}'")
        raise CellSpecError(f"unsupported operand of type {type(other).__name__} in '{op}'")

    def _bin(self, other: Any, op: str, f: Callable[[Any, Any], Any], reflected: bool = False) -> "Var":
        oe, od = self._coerce(other, op)
        dim = _broadcast(self.dim, od, op)
        o = other if isinstance(other, Var) else oe
        return self._combine(f, (o, self) if reflected else (self, o), dim, op)

    def __add__(self, o: Any) -> "Var":
        return self._bin(o, "+", lambda a, b: a + b)

    def __radd__(self, o: Any) -> "Var":
        return self._bin(o, "+", lambda a, b: a + b, True)

    def __sub__(self, o: Any) -> "Var":
        return self._bin(o, "-", lambda a, b: a - b)

    def __rsub__(self, o: Any) -> "Var":
        return self._bin(o, "-", lambda a, b: a - b, True)

    def __mul__(self, o: Any) -> "Var":
        return self._bin(o, "*", lambda a, b: a * b)

    def __rmul__(self, o: Any) -> "Var":
        return self._bin(o, "*", lambda a, b: a * b, True)

    def __truediv__(self, o: Any) -> "Var":
        return self._bin(o, "/", lambda a, b: a / b)

    def __rtruediv__(self, o: Any) -> "Var":
        return self._bin(o, "/", lambda a, b: a / b, True)

    def __neg__(self) -> "Var":
        return self._combine(operator.neg, (self,), self.dim, "-")

    def __pos__(self) -> "Var":
        return self

    def __pow__(self, p: Any) -> "Var":
        if isinstance(p, Var) or not isinstance(p, numbers.Real) or isinstance(p, bool) or not math.isfinite(float(p)):
            raise CellSpecError(f"exponent {p!r} must be a finite real number (v ** p with a constant p)")
        q = sympy.nsimplify(p)
        return self._combine(lambda a: a ** q, (self,), self.dim, "**")

    def __rpow__(self, base: Any) -> Any:
        raise CellSpecError(f"{base!r} ** (traced quantity) is not supported; write symgate.exp(v * log(base))")

    def __matmul__(self, o: Any) -> Any:
        raise ShapeError("'@' needs a Matrix parameter on the left: write W @ v")

    def __bool__(self) -> bool:
        raise CellSpecError("a traced cell quantity has no truth value; cell bodies cannot branch on values")

    def _no_compare(self, other: Any) -> Any:
        raise CellSpecError("traced cell quantities cannot be compared (==, <, ...); cell bodies cannot branch on values")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _no_compare  # type: ignore[assignment]
    __hash__ = object.__hash__

    def _no_scalar(self, *a: Any) -> Any:
        raise UnsupportedFunctionError(
            "a traced cell quantity is not a number (math functions, float(), abs() ... do not apply); "
            "use symgate.tanh, sigmoid, exp, log or softplus"
        )

    __float__ = __int__ = __complex__ = __index__ = __abs__ = __round__ = _no_scalar  # type: ignore[assignment]

    def _sympy_(self) -> Any:
        # SymPy asks for this when a SymPy function or operator meets a traced quantity.
        # Raising a SympifyError lets SymPy's binary operators return NotImplemented (so
        # ours take over); a SymPy *function* applied to a traced quantity gets this error.
        raise _SympifyTracedError(_calling_sympy_function())

    def __getitem__(self, item: Any) -> Any:
        raise CellSpecError("a traced quantity is a per-unit vector: indexing (v[i]) is not supported; use a Matrix to mix units")

    def __iter__(self) -> Any:
        raise CellSpecError("a traced quantity cannot be iterated over; cell bodies work on whole vectors")

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        raise _TracedAttributeError(
            f"a traced cell quantity has no attribute {item!r} (transposes and reshapes are not part of a cell body)"
        )

    def __array__(self, *a: Any, **k: Any) -> Any:
        raise UnsupportedFunctionError("numpy functions cannot be applied to traced cell quantities; use symgate.tanh, symgate.sigmoid, ...")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        import numpy as np

        ops = {np.add: "__add__", np.subtract: "__sub__", np.multiply: "__mul__", np.true_divide: "__truediv__"}
        if method == "__call__" and ufunc in ops and len(inputs) == 2 and not kwargs:
            a, b2 = inputs
            if a is self:
                return getattr(self, ops[ufunc])(b2)
            return getattr(self, "__r" + ops[ufunc][2:])(a)
        raise UnsupportedFunctionError(
            f"numpy function {getattr(ufunc, '__name__', ufunc)!r} cannot be applied to a traced cell quantity; "
            "use symgate.tanh, symgate.sigmoid, symgate.exp, symgate.log or symgate.softplus"
        )

    def __repr__(self) -> str:
        return f"<symgate traced quantity {self.expr} (dim {self.dim!r})>"

    # -- functions -----------------------------------------------------------
    def _apply(self, func: type) -> "Var":
        if func not in DERIVATIVE_RULES:
            raise UnsupportedFunctionError(f"function {func!r} is not supported in a cell body")
        b = self._b
        sym = b.new_symbol(self.dim)
        node = Node(name=sym.name, kind="fn", symbol=sym, dim=self.dim, expr=func(self.expr), func=func, arg=self.expr)
        return b.add(node)

    def as_gate(self) -> "Var":
        """Mark this quantity as a gate (sigmoid nodes are gates already).

        Gates decide the origin labels of Jacobian terms: a path that reaches the
        recurrent weights through a gate is a ``gate`` term.  Use this for gates
        written another way, e.g. a retention ``exp(-softplus(a))``.
        """
        b = self._b
        if not (isinstance(self.expr, UnitSymbol) and self.expr in b.by_symbol):
            v = b.add(Node(name="", kind="arith", symbol=b.new_symbol(self.dim), dim=self.dim, expr=self.expr))
        else:
            v = self
        b.gate_marks = getattr(b, "gate_marks", set())  # type: ignore[attr-defined]
        b.gate_marks.add(v.expr)  # type: ignore[attr-defined]
        return v

    def named(self, name: str) -> "Var":
        """Give this quantity a display name (same as assigning it to a local)."""
        _check_name(name, "quantity")
        b = self._b
        if not (isinstance(self.expr, UnitSymbol) and self.expr in b.by_symbol):
            node = Node(name=name, kind="arith", symbol=b.new_symbol(self.dim), dim=self.dim, expr=self.expr)
            v = b.add(node)
        else:
            v = self
        b._explicit_names = getattr(b, "_explicit_names", {})  # type: ignore[attr-defined]
        b._explicit_names[v.expr] = name  # type: ignore[attr-defined]
        return v


class MatVar:
    """A traced matrix parameter; supports only ``W @ v``."""

    __slots__ = ("name", "rows", "cols", "_b")

    def __init__(self, name: str, rows: Dim, cols: Dim, builder: _Builder) -> None:
        self.name, self.rows, self.cols, self._b = name, rows, cols, builder

    def __matmul__(self, v: Any) -> Var:
        if isinstance(v, MatVar):
            raise ShapeError(f"matrix products of parameters ({self.name} @ {v.name}) are not supported; apply matrices to vectors")
        if not isinstance(v, Var):
            raise ShapeError(f"{self.name} @ v needs a traced vector on the right, got {type(v).__name__}")
        if v._b is not self._b:
            raise CellSpecError("cannot combine quantities from two different cells")
        if v.dim != self.cols:
            raise ShapeError(
                f"Linear {self.name} @ v: {self.name} has shape ({self.rows!r}, {self.cols!r}) "
                f"but v has dimension {v.dim!r}"
            )
        b = self._b
        src = v.expr
        reads_rows = isinstance(src, UnitSymbol) and (
            src in b.by_symbol or (src in b.leaves and b.leaves[src].kind in ("state", "input")))
        if not reads_rows:
            # an expression, or a parameter or constant on its own (P @ c): a node of its own, so
            # every Linear reads per-row values (a state, the input or a node)
            if src.is_number:
                raise CellSpecError(f"{self.name} @ (constant) is not supported; use a Vector parameter instead")
            node = Node(name="", kind="arith", symbol=b.new_symbol(v.dim), dim=v.dim, expr=src)
            src = b.add(node).expr
        sym = b.new_symbol(self.rows)
        node = Node(name="", kind="linear", symbol=sym, dim=self.rows, expr=sym, matrix=self.name, source=src)  # type: ignore[arg-type]
        return b.add(node)

    def __rmatmul__(self, v: Any) -> Any:
        raise ShapeError(f"write {self.name} @ v (matrix on the left), not v @ {self.name}")

    def __getattr__(self, item: str) -> Any:
        raise CellSpecError(f"matrix parameter {self.name!r} has no attribute {item!r}; only '{self.name} @ v' is supported")

    def _op(self, *a: Any) -> Any:
        raise ShapeError(f"matrix {self.name!r} can only be used as '{self.name} @ v'")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __neg__ = _op  # type: ignore[assignment]


# ----------------------------------------------------------------------------
# the Cell
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Cell:
    """A traced recurrent cell: the IR every other part of symgate consumes.

    Attributes
    ----------
    name:
        The cell's name (a valid identifier).
    states, inputs, constants, vectors:
        Leaves of the graph, in declaration order.
    params:
        The trainable parameters, in declaration order.
    nodes:
        Interior nodes in topological order.
    outputs:
        One per-unit expression per state: the updated state.
    """

    name: str
    states: tuple[Leaf, ...]
    inputs: tuple[Leaf, ...]
    params: tuple[Param, ...]
    leaves: tuple[Leaf, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[sympy.Expr, ...]
    source: str = ""
    _index: dict = field(default_factory=dict, repr=False)

    # -- lookups -------------------------------------------------------------
    @property
    def symbols(self) -> dict[str, UnitSymbol]:
        """Every named symbol of the cell: leaves and nodes."""
        d = {lf.name: lf.symbol for lf in self.leaves}
        d.update({nd.name: nd.symbol for nd in self.nodes})
        return d

    def node(self, symbol_or_name: Any) -> Node | None:
        """The node with this symbol or name (None for leaves)."""
        idx = self._index
        return idx.get(symbol_or_name)

    def leaf(self, symbol_or_name: Any) -> Leaf | None:
        return self._index.get(("leaf", symbol_or_name))

    @property
    def constants(self) -> dict[str, float]:
        """Fixed constants and their values."""
        return {lf.name: float(lf.value) for lf in self.leaves if lf.kind == "constant"}  # type: ignore[arg-type]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def gates(self) -> tuple[Node, ...]:
        """The gate (sigmoid) nodes."""
        return tuple(nd for nd in self.nodes if nd.is_gate)

    def dims(self) -> tuple[str, ...]:
        """The named dimensions the cell uses."""
        out: list[str] = []
        for s in [*self.states, *self.inputs]:
            if s.dim != 1 and s.dim not in out:
                out.append(s.dim)  # type: ignore[arg-type]
        for p in self.params:
            for d in p.shape:
                if d != 1 and d not in out:
                    out.append(d)  # type: ignore[arg-type]
        return tuple(out)

    def with_constants(self, **values: float) -> "Cell":
        """A copy of the cell with some constants' values changed."""
        unknown = set(values) - set(self.constants)
        if unknown:
            raise CellSpecError(f"unknown constant(s) {sorted(unknown)}; the cell's constants are {sorted(self.constants)}")
        leaves = []
        for lf in self.leaves:
            if lf.name in values:
                lf = Leaf(lf.name, lf.kind, lf.dim, lf.symbol, Constant(values[lf.name]).value)
            leaves.append(lf)
        return _assemble(self.name, self.states, self.inputs, self.params, tuple(leaves), self.nodes, self.outputs, self.source)

    # -- display -------------------------------------------------------------
    def update_equations(self) -> list[str]:
        """The cell's equations as text: updated states first, then nodes (outputs to leaves)."""
        lines = [f"{s.name}' = {sympy.sstr(o)}" for s, o in zip(self.states, self.outputs)]
        for nd in reversed(self.nodes):
            if nd.kind == "linear":
                lines.append(f"{nd.name} = {nd.matrix} @ {nd.source}")
            else:
                lines.append(f"{nd.name} = {sympy.sstr(nd.expr)}")
        return lines

    def latex(self) -> str:
        """The update equations as a LaTeX ``aligned`` block."""
        rows = [f"{sympy.latex(s.symbol)}' &= {sympy.latex(o)}" for s, o in zip(self.states, self.outputs)]
        for nd in reversed(self.nodes):
            if nd.kind == "linear":
                rows.append(rf"{sympy.latex(nd.symbol)} &= {sympy.latex(sympy.Symbol(nd.matrix))} {sympy.latex(nd.source)}")
            else:
                rows.append(f"{sympy.latex(nd.symbol)} &= {sympy.latex(nd.expr)}")
        return "\\begin{aligned}" + " \\\\ ".join(rows) + "\\end{aligned}"

    def __repr__(self) -> str:
        return f"<symgate Cell {self.name!r}: " + "; ".join(self.update_equations()) + ">"

    def __str__(self) -> str:
        return "\n".join([f"cell {self.name}"] + ["  " + ln for ln in self.update_equations()])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython / Hypothesis pretty printers
        p.text(repr(self))

    def _repr_latex_(self) -> str:
        return "$" + self.latex() + "$"

    def fingerprint(self) -> str:
        """A deterministic text that identifies the cell's mathematics (for hashing)."""
        parts = [self.name]
        parts += [f"state {s.name}:{s.dim}" for s in self.states]
        parts += [f"input {s.name}:{s.dim}" for s in self.inputs]
        parts += [f"param {p.name}:{p.kind}:{p.shape}" for p in self.params]
        parts += [f"const {k}={v!r}" for k, v in self.constants.items()]
        for nd in self.nodes:
            if nd.kind == "linear":
                parts.append(f"{nd.name}:{nd.dim} = {nd.matrix} @ {nd.source}")
            else:
                parts.append(f"{nd.name}:{nd.dim} = {sympy.srepr(nd.expr)}")
        parts += [sympy.srepr(o) for o in self.outputs]
        return "\n".join(parts)


def _assemble(
    name: str,
    states: tuple[Leaf, ...],
    inputs: tuple[Leaf, ...],
    params: tuple[Param, ...],
    leaves: tuple[Leaf, ...],
    nodes: tuple[Node, ...],
    outputs: tuple[sympy.Expr, ...],
    source: str,
) -> Cell:
    index: dict[Any, Any] = {}
    for nd in nodes:
        index[nd.symbol] = nd
        index[nd.name] = nd
    for lf in leaves:
        index[("leaf", lf.symbol)] = lf
        index[("leaf", lf.name)] = lf
    return Cell(name, states, inputs, params, leaves, nodes, outputs, source, index)


def _body_codes(fn: Callable[..., Any]) -> set[Any]:
    """Code objects of the body and of the functions it wraps (``__wrapped__``)."""
    codes = set()
    f: Any = fn
    while f is not None:
        code = getattr(f, "__code__", None)
        if code is not None:
            codes.add(code)
        f = getattr(f, "__wrapped__", None)
    return codes


def _capture_locals(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], b: "_Builder") -> tuple[Any, dict[str, Any]]:
    """Call the body and return its result and its local variables at return.

    The traced operations note the body's frame as they run; a frame that has
    returned keeps its locals, which name the nodes.  No profiler or trace hook is
    installed, so tracing works under debuggers, coverage and profilers.
    """
    b.codes = _body_codes(fn)
    try:
        result = fn(*args, **kwargs)
    except SymgateError:
        raise
    except Exception as exc:  # the user's body failed on a traced quantity: say so, keep the cause chained
        hint = ("; a cell body may use arithmetic, '@' and symgate's functions (symgate.tanh, sigmoid, ...) on its "
                "arguments, not SymPy or NumPy functions such as sympy.Piecewise or np.where") \
            if "sympy" in type(exc).__module__ or "Basic" in str(exc) or "Var" in str(exc) else ""
        raise CellSpecError(f"the body of cell {getattr(fn, '__name__', '?')!r} raised {type(exc).__name__}: {exc}{hint}") from exc
    captured: dict[str, Any] = {}
    for frame in b.frames.values():
        captured.update(frame.f_locals)
    b.frames.clear()
    return result, captured


def make_cell(
    body: Callable[..., Any],
    specs: Mapping[str, Spec],
    *,
    name: str | None = None,
) -> Cell:
    """Trace ``body`` into a :class:`Cell`, with argument specs given explicitly.

    ``specs`` maps each argument name of ``body`` (in order) to its spec.  This is
    what :func:`cell` does with a function's annotations; use it to build cells
    programmatically.

    ``body`` returns the updated state (one state) or a tuple of updated states
    in the order the :class:`State` arguments are declared.
    """
    if not callable(body):
        raise CellSpecError(f"a cell body must be callable, got {type(body).__name__}")
    if not isinstance(specs, Mapping):
        raise CellSpecError(f"specs must be a dict {{argument name: spec}}, got {type(specs).__name__}")
    cname = name if name is not None else getattr(body, "__name__", "cell")
    if cname == "<lambda>":
        cname = "cell"
    _check_name(cname, "cell")
    try:
        sig = inspect.signature(body)
    except (TypeError, ValueError) as exc:
        raise CellSpecError(f"cannot read the signature of {body!r}: {exc}") from None
    argnames = list(sig.parameters)
    for pname, prm in sig.parameters.items():
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            raise CellSpecError(f"cell {cname!r}: *args/**kwargs are not supported (argument {pname!r})")
    missing = [a for a in argnames if a not in specs]
    if missing:
        raise CellSpecError(
            f"cell {cname!r}: argument(s) {missing} have no spec; annotate each with "
            "symgate.State, Input, Matrix, Vector, Scalar or Constant"
        )
    extra = [a for a in specs if a not in argnames]
    if extra:
        raise CellSpecError(f"cell {cname!r}: spec(s) for unknown argument(s) {extra}")

    b = _Builder()
    args: list[Any] = []
    states: list[Leaf] = []
    inputs: list[Leaf] = []
    params: list[Param] = []
    leaves: list[Leaf] = []
    for a in argnames:
        spec = specs[a]
        _check_name(a, "argument")
        if isinstance(spec, type) and spec in (State, Input, Vector, Scalar):
            spec = spec()
        if isinstance(spec, State):
            lf = Leaf(a, "state", spec.dim, UnitSymbol(a, spec.dim))
            states.append(lf)
        elif isinstance(spec, Input):
            lf = Leaf(a, "input", spec.dim, UnitSymbol(a, spec.dim))
            inputs.append(lf)
        elif isinstance(spec, Vector):
            lf = Leaf(a, "vector", spec.dim, UnitSymbol(a, spec.dim))
            params.append(Param(a, "vector", (spec.dim,)))
        elif isinstance(spec, Scalar):
            lf = Leaf(a, "scalar", 1, UnitSymbol(a, 1))
            params.append(Param(a, "scalar", ()))
        elif isinstance(spec, Constant):
            lf = Leaf(a, "constant", 1, UnitSymbol(a, 1), spec.value)
        elif isinstance(spec, Matrix):
            params.append(Param(a, "matrix", (spec.rows, spec.cols)))
            args.append(MatVar(a, spec.rows, spec.cols, b))
            continue
        else:
            raise CellSpecError(
                f"cell {cname!r}: argument {a!r} has spec {spec!r}; expected symgate.State, Input, "
                "Matrix, Vector, Scalar or Constant"
            )
        leaves.append(lf)
        b.leaves[lf.symbol] = lf
        args.append(Var(lf.symbol, lf.dim, b))
    if not states:
        raise CellSpecError(f"cell {cname!r} has no State argument")
    dimnames = {d for lf in leaves for d in [lf.dim] if d != 1} | {d for p in params for d in p.shape if d != 1}
    clash = sorted(dimnames & set(argnames))
    if clash:
        raise InvalidNameError(f"cell {cname!r}: name(s) {clash} are used both as an argument and as a dimension")

    kwonly = [a for a, prm in sig.parameters.items() if prm.kind == prm.KEYWORD_ONLY]
    npos = len(argnames) - len(kwonly)
    result, local_vars = _capture_locals(body, args[:npos], dict(zip(kwonly, args[npos:])), b)

    # -- outputs -------------------------------------------------------------
    outs = result if isinstance(result, tuple) else (result,)
    if len(outs) != len(states):
        raise CellSpecError(
            f"cell {cname!r} declares {len(states)} state(s) ({', '.join(s.name for s in states)}) "
            f"but its body returns {len(outs)} value(s)"
        )
    out_exprs: list[sympy.Expr] = []
    for s, o in zip(states, outs):
        if isinstance(o, MatVar):
            raise CellSpecError(f"cell {cname!r}: the update of state {s.name!r} is a matrix")
        if not isinstance(o, Var):
            raise CellSpecError(
                f"cell {cname!r}: the update of state {s.name!r} must be a traced quantity, got {type(o).__name__}"
            )
        if o._b is not b:
            raise CellSpecError(f"cell {cname!r}: the update of state {s.name!r} comes from another cell")
        if o.dim != s.dim and o.dim != 1:
            raise ShapeError(f"cell {cname!r}: the update of state {s.name!r} has dimension {o.dim!r}, expected {s.dim!r}")
        if o.dim == 1 and s.dim != 1:
            raise ShapeError(
                f"cell {cname!r}: the update of state {s.name!r} is a scalar (dimension 1); "
                f"a state of dimension {s.dim!r} needs a per-unit update"
            )
        out_exprs.append(o.expr)

    # -- names -------------------------------------------------------------
    chosen: dict[UnitSymbol, str] = {}
    taken = set(argnames) | dimnames  # a node named like a dimension would print ambiguously
    explicit = getattr(b, "_explicit_names", {})
    for sym, nm in explicit.items():
        if nm in taken:
            raise InvalidNameError(f"cell {cname!r}: name {nm!r} is used twice")
        chosen[sym] = nm
        taken.add(nm)
    for var, val in local_vars.items():
        if var in argnames or not isinstance(val, Var) or val._b is not b:
            continue
        sym = val.expr
        if isinstance(sym, UnitSymbol) and sym in b.by_symbol and sym not in chosen:
            if var in taken or var.startswith("_") or var in RESERVED_NAMES:
                continue  # keeps its automatic name
            chosen[sym] = var
            taken.add(var)
    linear_count: dict[str, int] = {}
    for nd in b.nodes:
        if nd.symbol in chosen:
            continue
        if nd.kind == "linear":
            linear_count[nd.matrix] = linear_count.get(nd.matrix, 0) + 1  # type: ignore[index]
            stem = f"z_{nd.matrix}"
        elif nd.kind == "fn":
            stem = NODE_STEMS[nd.func]  # type: ignore[index]
        else:
            stem = "u"
        cand, k = stem, 1
        while cand in taken:
            k += 1
            cand = f"{stem}{k}"
        chosen[nd.symbol] = cand
        taken.add(cand)

    # rename, and keep only nodes the outputs depend on
    rename = {old: UnitSymbol(nm, old.dim) for old, nm in chosen.items()}
    out_exprs = [o.xreplace(rename) for o in out_exprs]
    renamed: list[Node] = []
    for nd in b.nodes:
        sym = rename[nd.symbol]
        renamed.append(
            Node(
                name=sym.name,
                kind=nd.kind,
                symbol=sym,
                dim=nd.dim,
                expr=sym if nd.kind == "linear" else nd.expr.xreplace(rename),
                func=nd.func,
                arg=None if nd.arg is None else nd.arg.xreplace(rename),
                matrix=nd.matrix,
                source=None if nd.source is None else rename.get(nd.source, nd.source),
                marked_gate=nd.symbol in getattr(b, "gate_marks", ()),
                named_by_user=nd.symbol in explicit or any(
                    isinstance(v, Var) and v.expr == nd.symbol for k, v in local_vars.items() if k not in argnames
                ),
            )
        )
    by_sym = {nd.symbol: nd for nd in renamed}
    live: set[UnitSymbol] = set()
    stack = [s for o in out_exprs for s in o.free_symbols]
    while stack:
        s = stack.pop()
        if s in live:
            continue
        live.add(s)  # type: ignore[arg-type]
        nd = by_sym.get(s)  # type: ignore[arg-type]
        if nd is None:
            continue
        deps = [nd.source] if nd.kind == "linear" else list(nd.expr.free_symbols)
        stack.extend(deps)
    nodes = tuple(nd for nd in renamed if nd.symbol in live)

    used_mats = {nd.matrix for nd in nodes if nd.kind == "linear"}
    for p in params:
        used = p.name in used_mats if p.kind == "matrix" else any(lf.symbol in live for lf in leaves if lf.name == p.name)
        if not used:
            raise CellSpecError(f"cell {cname!r}: parameter {p.name!r} is not used by the update")
    for s in states:
        if s.symbol not in live:
            raise StateIndependenceError(
                f"cell {cname!r}: the update does not depend on state {s.name!r}; "
                "a recurrent cell must read its previous state"
            )
    try:
        src = inspect.getsource(body)
    except (OSError, TypeError):
        src = ""
    return _assemble(cname, tuple(states), tuple(inputs), tuple(params), tuple(leaves), nodes, tuple(out_exprs), src)


def cell(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Decorator: trace an annotated function into a :class:`Cell`.

    >>> import symgate as sg
    >>> @sg.cell
    ... def plain(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
    ...     return sg.tanh(W @ h + U @ x)
    >>> plain.param_names
    ('W', 'U')
    """

    def wrap(f: Callable[..., Any]) -> Cell:
        try:
            # string annotations (``from __future__ import annotations``) are evaluated
            # in the function's module namespace, as typing.get_type_hints would
            hints = dict(inspect.get_annotations(f, eval_str=True))
        except Exception as exc:
            raise CellSpecError(
                f"cannot evaluate the annotations of {getattr(f, '__name__', f)!r}: {type(exc).__name__}: {exc}"
            ) from None
        hints.pop("return", None)
        return make_cell(f, hints, name=name)

    if fn is None:
        return wrap
    return wrap(fn)
