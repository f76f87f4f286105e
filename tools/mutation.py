"""Mutation testing of symgate's core modules against the fast test suite.

``python tools/mutation.py`` (what ``make mutation`` runs) parses each target module
with :mod:`ast`, enumerates standard mutants, draws a fixed, seeded sample per
module, and runs the fast suite (``pytest -x -m "not slow"``) on each mutant:

* **mutants**: arithmetic, comparison and boolean operator swaps; integer constants
  ``n -> n+1`` and ``1 -> 0``; floats ``x -> x+1``; ``True``/``False`` flips; negated
  ``if``/``while``/``assert``/conditional-expression tests; unary ``-``/``not``/``~``
  removed; ``return x`` -> ``return None``; a statement replaced by ``pass``; slice
  bounds and indices off by one; one keyword argument dropped.  Never mutated:
  strings (docstrings, messages, the generator's code templates), ``__all__``, type
  annotations, imports, ``raise`` arguments and logging/warning calls, ``assert``
  messages, ``if TYPE_CHECKING`` and lines marked ``# pragma: no mutate``.
* **isolation**: the source tree (tracked and untracked, non-ignored files, plus the
  prebuilt ``symgate/_kernels/*.so``) is copied once into a temporary snapshot; every
  mutant gets its own copy of the snapshot, its own empty ``SYMGATE_CACHE_DIR`` and
  ``TMPDIR``, and runs pytest there with ``PYTHONPATH`` pointing at the copy first.
  The source tree is only read.  Before any mutant runs, the tool checks that the
  copy's modules are the ones imported, that the unmutated copy passes, and that a
  deliberately broken module of every selected group is killed.
* **speed**: a mutant runs the test files most relevant to its module (see
  :data:`RELEVANT_TESTS`) in one pytest process that stops at the first failure; with
  ``--scope full`` the rest of the fast suite follows in the same process.  The default
  is the relevant files only: a surviving mutant then costs one to three minutes
  instead of about five (the whole fast suite, with two runs sharing the machine's two
  cores), which is what keeps a useful sample within an hour.  A mutant that runs longer than
  the timeout is killed and counted as ``timeout``.  Mutants of the code generator
  change the generated source, so their kernels are compiled afresh (a few seconds
  each) in the mutant's private cache.

* **equivalent mutants**: those shown to change no behaviour are listed, each with its
  reason, in ``tools/equivalent-mutants/<group>.txt``; they are drawn like any other, not
  run, and left out of the kill rate (killed / (sampled - equivalent)).
* **targeted runs**: ``--tests FILE...`` runs only the given test files on every mutant and
  ``--only TEXT...`` keeps only the mutants whose id contains a text, to see quickly which
  mutants a new test kills.

Output: a table per module (population, mutants run, killed, timed out, survived,
kill rate), the survivors with location and diff, the total time, and a JSON report
(``build/mutation/report.json`` by default).  ``--list`` shows the population and the
sample without running anything.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import concurrent.futures
import copy
import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent

#: module group -> globs (relative to the repository) of the files it holds
MODULES: dict[str, tuple[str, ...]] = {
    "_derive": ("symgate/_derive/*.py", "symgate/_derive/**/*.py"),
    "_functions": ("symgate/_functions.py",),
    "_codegen": ("symgate/_codegen.py", "symgate/_codegen/*.py", "symgate/_codegen/**/*.py"),
    "_reference": ("symgate/_reference.py",),
    "_transport": ("symgate/_transport.py",),
    "_battery": ("symgate/testing/_battery.py",),
}

#: module group -> test files (globs under the tree) that exercise it most directly, most specific first
RELEVANT_TESTS: dict[str, tuple[str, ...]] = {
    "_derive": ("tests/test_derive_units.py", "tests/test_derive.py", "tests/test_jacobian_paper.py", "tests/test_origins*.py",
                "tests/test_expansion*.py", "tests/test_bounded*.py", "tests/test_theory.py", "tests/test_cell.py",
                "tests/test_saturation*.py", "tests/test_reference.py", "tests/test_analogies.py",
                "tests/test_argument_validation.py", "tests/test_battery*.py"),
    "_functions": ("tests/test_functions.py", "tests/test_cell.py", "tests/test_derive.py", "tests/test_jacobian_paper.py",
                   "tests/test_saturation*.py", "tests/test_battery*.py", "tests/test_reference.py"),
    "_codegen": ("tests/test_codegen_units.py", "tests/test_codegen*.py", "tests/test_compiled.py", "tests/test_differential*.py",
                 "tests/test_numerical_contract*.py", "tests/test_saturation*.py", "tests/test_build.py"),
    "_reference": ("tests/test_reference_units.py", "tests/test_reference.py", "tests/test_numerical_contract*.py", "tests/test_battery*.py",
                   "tests/test_saturation*.py", "tests/test_theory.py", "tests/test_compiled.py",
                   "tests/test_differential*.py"),
    "_transport": ("tests/test_transport.py", "tests/test_theory.py", "tests/test_saturation*.py", "tests/test_analogies.py",
                   "tests/test_experiments.py"),
    "_battery": ("tests/test_battery_units.py", "tests/test_battery*.py", "tests/test_verify*.py", "tests/test_compiled.py", "tests/test_cli.py"),
}

#: the fast suite
PYTEST_ARGS: tuple[str, ...] = ("-x", "-q", "-m", "not slow", "-p", "no:cacheprovider")

#: tests that fail on any change to the generated source, however correct: they require the built-in
#: kernels to be the prebuilt ones, which a mutated generator (or derivation) never matches (pip
#: install would rebuild them; a mutant run cannot afford to).  Run unmutated, never on mutants.
MUTANT_DESELECT: tuple[str, ...] = ("tests/test_compiled.py::test_builtin_kernels_are_compiled_ahead_of_time",)

#: mutants per module group unless --sample says otherwise (chosen for the 60-minute budget on 2 cores)
DEFAULT_SAMPLE = 30
DEFAULT_SEED = 20240521

#: a mutant may run this many times as long as the unmutated suite, plus TIMEOUT_SLACK seconds
TIMEOUT_FACTOR = 2.5
TIMEOUT_SLACK = 120.0

#: calls whose arguments are messages, never mutated (the call may still be removed as a statement)
MESSAGE_CALLS = ("print", "warnings.warn", "logging.*", "logger.*", "log.*", "_log.*", "_logger.*")

PRAGMA = re.compile(r"#\s*pragma:\s*no\s+mutate")

#: folder of the equivalent-mutant lists: one file per module group (``<group>.txt``)
EQUIVALENT_DIR = REPO / "tools" / "equivalent-mutants"

BINARY_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.MatMult: ast.Mult, ast.LShift: ast.RShift,
    ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
}
COMPARE_SWAPS: dict[type, type] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
    ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
BOOL_SWAPS: dict[type, type] = {ast.And: ast.Or, ast.Or: ast.And}

#: nodes whose replacement text needs parentheses to keep the surrounding precedence
NEEDS_PARENS = (ast.BinOp, ast.BoolOp, ast.Compare, ast.UnaryOp, ast.IfExp, ast.Lambda, ast.NamedExpr)


# --------------------------------------------------------------------------- mutants


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One change to one file: the source span ``[start, end)`` (byte offsets) replaced by ``replacement``."""

    module: str
    path: str
    line: int
    kind: str
    start: int
    end: int
    replacement: str
    original_code: str
    mutated_code: str
    scope: str = ""  # qualified name of the innermost function or class holding the change ("" at module level)

    @property
    def ident(self) -> str:
        """A name stable across runs of the same source: path, line, kind, byte offset and replacement."""
        digest = hashlib.sha1(self.replacement.encode()).hexdigest()[:6]
        return f"{self.path}:{self.line}:{self.kind}@{self.start}:{digest}"

    def apply(self, source: bytes) -> bytes:
        """The mutated file."""
        return source[: self.start] + self.replacement.encode() + source[self.end:]


def _line_offsets(source: bytes) -> list[int]:
    """Byte offset of the start of every line (1-based lines: index 0 is line 1)."""
    offsets = [0]
    for i, byte in enumerate(source):
        if byte == 0x0A:
            offsets.append(i + 1)
    return offsets


def _dotted_name(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_message_call(node: ast.AST) -> bool:
    """A call whose arguments are only a message (print, warnings, logging)."""
    if not isinstance(node, ast.Call):
        return False
    name = _dotted_name(node.func)
    return any(fnmatch.fnmatch(name, pattern) for pattern in MESSAGE_CALLS)


def _is_string(node: ast.AST) -> bool:
    """A string literal or f-string."""
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))


def _is_docstring(statement: ast.stmt) -> bool:
    """An expression statement holding only a string (docstrings and bare string comments)."""
    return isinstance(statement, ast.Expr) and _is_string(statement.value)


def _assigns_all(statement: ast.stmt) -> bool:
    """``__all__ = ...`` (or ``+=``)."""
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AugAssign, ast.AnnAssign)):
        targets = [statement.target]
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING`` / ``if typing.TYPE_CHECKING``."""
    return _dotted_name(test).endswith("TYPE_CHECKING")


def _constant_replacements(value: object) -> list[object]:
    """Mutated values of a numeric or boolean constant."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1] + ([0] if value == 1 else [])
    if isinstance(value, float):
        return [value + 1.0] + ([0.0] if value == 1.0 else [])
    return []


def _loop_counters(tree: ast.AST) -> set[str]:
    """Names used as integer counters: targets of ``for i in range(...)`` and ``for i, _ in enumerate(...)``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Call):
            called = _dotted_name(node.iter.func)
            if called == "range" and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif called == "enumerate" and isinstance(node.target, ast.Tuple) and node.target.elts \
                    and isinstance(node.target.elts[0], ast.Name):
                names.add(node.target.elts[0].id)
    return names


def _swapped(node: ast.AST, field: str, swaps: dict[type, type]) -> ast.AST:
    """A copy of the node with one operator field swapped."""
    swapped = copy.deepcopy(node)
    setattr(swapped, field, swaps[type(getattr(node, field))]())
    return swapped


def _negated(test: ast.expr) -> ast.expr:
    """``not (test)``."""
    return ast.UnaryOp(ast.Not(), test)


def _is_sequence_arithmetic(node: ast.BinOp | ast.AugAssign) -> bool:
    """``+``/``*`` on strings or literal lists/tuples (concatenation, repetition): not arithmetic."""
    operands = [node.left, node.right] if isinstance(node, ast.BinOp) else [node.target, node.value]
    literal = (ast.List, ast.ListComp, ast.Tuple, ast.JoinedStr)
    return any(_is_string(o) or isinstance(o, literal) for o in operands)


def _integer_like(node: ast.expr, counters: set[str]) -> bool:
    """An index or slice bound that is an integer by its form: a loop counter, ``len(...)``,
    ``-k`` or ``x +/- k`` for an integer literal ``k`` (a literal alone is a constant mutant)."""
    if isinstance(node, ast.Name):
        return node.id in counters
    if isinstance(node, ast.Call):
        return _dotted_name(node.func) == "len"
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub) and _is_int(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return _is_int(node.left) or _is_int(node.right) or _integer_like(node.left, counters)
    return False


def _is_int(node: ast.expr) -> bool:
    """An integer literal."""
    return isinstance(node, ast.Constant) and type(node.value) is int


#: what the finder yields: (node to replace, kind of mutant, replacement node)
Found = tuple[ast.AST, str, ast.AST]


class _MutantFinder:
    """Walks one module's AST and yields ``(node, kind, replacement node)`` for every mutant."""

    def __init__(self, tree: ast.Module, pragma_lines: set[int]) -> None:
        self.tree = tree
        self.pragma_lines = pragma_lines
        self.counters = _loop_counters(tree)

    def find(self) -> Iterator[Found]:
        """Every mutant of the module."""
        yield from self._statements(self.tree.body)

    # statements ------------------------------------------------------------------------

    def _statements(self, body: list[ast.stmt]) -> Iterator[Found]:
        for statement in body:
            if statement.lineno in self.pragma_lines or _is_docstring(statement) or _assigns_all(statement):
                continue
            yield from self._statement(statement)

    def _statement(self, node: ast.stmt) -> Iterator[Found]:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Pass)):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from self._arguments(node.args)
            for decorator in node.decorator_list:
                yield from self._expression(decorator)
            yield from self._statements(node.body)
            return
        if isinstance(node, ast.ClassDef):
            for expr in [*node.bases, *node.decorator_list, *(k.value for k in node.keywords)]:
                yield from self._expression(expr)
            yield from self._statements(node.body)
            return
        if isinstance(node, ast.Raise):
            yield node, "statement->pass", ast.Pass()
            return
        if isinstance(node, ast.Expr):
            if not _is_message_call(node.value):
                yield node, "statement->pass", ast.Pass()
                yield from self._expression(node.value)
            return
        if isinstance(node, (ast.Assign, ast.AugAssign)) or (isinstance(node, ast.AnnAssign) and node.value):
            yield node, "statement->pass", ast.Pass()
            if isinstance(node, ast.AugAssign) and type(node.op) in BINARY_SWAPS and not _is_sequence_arithmetic(node):
                swapped = copy.deepcopy(node)
                swapped.op = BINARY_SWAPS[type(node.op)]()
                yield node, "augassign", swapped
            yield from self._expression(node.value)
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if target is not None:
                    yield from self._store_target(target)
            return
        if isinstance(node, (ast.Continue, ast.Break)):
            yield node, "statement->pass", ast.Pass()
            return
        if isinstance(node, ast.Return):
            if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
                yield node, "return->None", ast.Return(ast.Constant(None))
                yield from self._expression(node.value)
            return
        if isinstance(node, ast.Assert):
            yield node, "statement->pass", ast.Pass()
            yield node.test, "negate", _negated(node.test)
            yield from self._expression(node.test)
            return
        if isinstance(node, (ast.If, ast.While)):
            if not _is_type_checking(node.test):
                yield node.test, "negate", _negated(node.test)
                yield from self._expression(node.test)
            yield from self._statements(node.body)
            yield from self._statements(node.orelse)
            return
        if isinstance(node, (ast.For, ast.AsyncFor)):
            yield from self._expression(node.iter)
            yield from self._statements(node.body)
            yield from self._statements(node.orelse)
            return
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                yield from self._expression(item.context_expr)
            yield from self._statements(node.body)
            return
        if isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            yield from self._statements(node.body)
            for handler in node.handlers:
                yield from self._statements(handler.body)
            yield from self._statements(node.orelse)
            yield from self._statements(node.finalbody)
            return
        if isinstance(node, ast.Match):
            yield from self._expression(node.subject)
            for case in node.cases:
                yield from self._statements(case.body)
            return
        # anything else (Delete, ...) is left alone

    def _arguments(self, args: ast.arguments) -> Iterator[Found]:
        """Default values (never annotations)."""
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            yield from self._expression(default)

    def _store_target(self, target: ast.expr) -> Iterator[Found]:
        """Indices inside an assignment target (``a[i] = ...``), not the names assigned."""
        if isinstance(target, ast.Subscript):
            yield from self._expression(target.value)
            yield from self._subscript_index(target.slice)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                yield from self._store_target(element)

    # expressions -----------------------------------------------------------------------

    def _expression(self, node: ast.AST | None) -> Iterator[Found]:
        if node is None or _is_string(node) or getattr(node, "lineno", None) in self.pragma_lines:
            return
        yield from self._own_mutants(node)
        if isinstance(node, ast.Call):
            if _is_message_call(node):
                return
            yield from self._expression(node.func)
            for argument in node.args:
                yield from self._expression(argument)
            for keyword in node.keywords:
                yield from self._expression(keyword.value)
            return
        if isinstance(node, ast.Subscript):
            yield from self._expression(node.value)
            yield from self._subscript_index(node.slice)
            return
        if isinstance(node, ast.Lambda):
            yield from self._arguments(node.args)
            yield from self._expression(node.body)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for generator in node.generators:
                yield from self._expression(generator.iter)
                for condition in generator.ifs:
                    yield condition, "negate", _negated(condition)
                    yield from self._expression(condition)
            if isinstance(node, ast.DictComp):
                yield from self._expression(node.key)
                yield from self._expression(node.value)
            else:
                yield from self._expression(node.elt)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                yield from self._expression(child)

    def _subscript_index(self, index: ast.expr) -> Iterator[Found]:
        """Slice bounds and indices: shifted by one, then their own sub-expressions."""
        if isinstance(index, ast.Slice):
            for bound, shift in ((index.lower, ast.Add), (index.upper, ast.Sub)):
                if bound is not None:
                    if _integer_like(bound, self.counters) or _is_int(bound):
                        yield bound, "slice-off-by-one", ast.BinOp(bound, shift(), ast.Constant(1))
                    yield from self._expression(bound)
            yield from self._expression(index.step)
            return
        if isinstance(index, ast.Tuple):
            for element in index.elts:
                yield from self._subscript_index(element)
            return
        if _integer_like(index, self.counters):
            yield index, "index-off-by-one", ast.BinOp(index, ast.Add(), ast.Constant(1))
        yield from self._expression(index)

    def _own_mutants(self, node: ast.AST) -> Iterator[Found]:
        """Mutants that change this node itself (not its children)."""
        if isinstance(node, ast.Constant):
            for literal in _constant_replacements(node.value):
                yield node, "constant", ast.Constant(literal)
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY_SWAPS:
            if not _is_sequence_arithmetic(node):
                yield node, "binary-operator", _swapped(node, "op", BINARY_SWAPS)
        elif isinstance(node, ast.BoolOp):
            yield node, "boolean-operator", _swapped(node, "op", BOOL_SWAPS)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE_SWAPS:
                    swapped = copy.deepcopy(node)
                    swapped.ops[i] = COMPARE_SWAPS[type(op)]()
                    yield node, "comparison", swapped
        elif isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.UAdd):
            yield node, "unary-removed", node.operand
        elif isinstance(node, ast.IfExp):
            swapped = copy.deepcopy(node)
            swapped.test = ast.UnaryOp(ast.Not(), swapped.test)
            yield node, "negate", swapped
        elif isinstance(node, ast.Call) and not _is_message_call(node):
            for i, keyword in enumerate(node.keywords):
                if keyword.arg is not None:
                    dropped = copy.deepcopy(node)
                    del dropped.keywords[i]
                    yield node, f"drop-keyword:{keyword.arg}", dropped



def _display(source: bytes, offsets: list[int], start: int, end: int, replacement: str) -> tuple[str, str]:
    """The original and mutated source lines around a span (whitespace-collapsed for the report)."""
    first = bisect.bisect_right(offsets, start) - 1
    last = bisect.bisect_right(offsets, max(start, end - 1)) - 1
    line_end = offsets[last + 1] - 1 if last + 1 < len(offsets) else len(source)
    before = source[offsets[first]:line_end].decode()
    after = (source[offsets[first]:start] + replacement.encode() + source[end:line_end]).decode()
    return " ".join(before.split()), " ".join(after.split())


def _replacement_text(new: ast.AST) -> str:
    """Source for a replacement node, parenthesised where the surrounding precedence needs it."""
    text = ast.unparse(ast.fix_missing_locations(new))
    return f"({text})" if isinstance(new, NEEDS_PARENS) else text


def _normalised(code: str) -> str:
    """The AST dump of a statement or parenthesised expression (to spot mutants that change nothing)."""
    return ast.dump(ast.parse(code.strip()))


def _scopes(tree: ast.Module) -> list[tuple[int, int, str]]:
    """``(first line, last line, qualified name)`` of every function and class, outermost first."""
    out: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _scope_of(scopes: list[tuple[int, int, str]], line: int) -> str:
    """The innermost function or class holding ``line``."""
    inside = [(first, name) for first, last, name in scopes if first <= line <= last]
    return max(inside)[1] if inside else ""


def mutants_of_file(module: str, root: Path, relpath: str) -> list[Mutant]:
    """Every mutant of one file that changes its AST; duplicates dropped.

    Replacements are unparsed AST nodes (statements, or expressions in parentheses where
    precedence needs them), so every mutated file parses; :func:`check_compiles` confirms
    it for the mutants that are run.
    """
    source = (root / relpath).read_bytes()
    tree = ast.parse(source, filename=relpath)
    text_lines = source.decode().splitlines()
    pragma_lines = {i + 1 for i, line in enumerate(text_lines) if PRAGMA.search(line)}
    offsets = _line_offsets(source)
    scopes = _scopes(tree)
    seen: set[tuple[int, int, str]] = set()
    mutants = []
    for node, kind, new in _MutantFinder(tree, pragma_lines).find():
        if node.lineno in pragma_lines:
            continue
        replacement = _replacement_text(new)
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        if (start, end, replacement) in seen or _normalised(replacement) == _normalised(ast.unparse(node)):
            continue
        seen.add((start, end, replacement))
        before, after = _display(source, offsets, start, end, replacement)
        mutants.append(Mutant(module, relpath, node.lineno, kind, start, end, replacement, before, after,
                              _scope_of(scopes, node.lineno)))
    return mutants


def check_compiles(root: Path, mutants: Iterable[Mutant]) -> None:
    """Every mutated file compiles (a failure is a bug of this tool, not a killed mutant)."""
    for m in mutants:
        mutated = m.apply((root / m.path).read_bytes())
        compile(mutated, m.path, "exec", dont_inherit=True)


def module_files(root: Path, modules: Iterable[str]) -> dict[str, list[str]]:
    """The files (relative paths, sorted) each module group holds in this tree."""
    files: dict[str, list[str]] = {}
    for module in modules:
        found = {p.relative_to(root).as_posix() for pattern in MODULES[module] for p in root.glob(pattern)
                 if p.is_file() and "__pycache__" not in p.parts}
        files[module] = sorted(found)
    return files


def seeded_sample(mutants: list[Mutant], size: int | None, seed: int, module: str) -> list[Mutant]:
    """A fixed sample of ``size`` mutants (all of them if ``size`` is None or larger), in source order."""
    if size is None or size >= len(mutants):
        return list(mutants)
    rng = random.Random(f"{seed}:{module}")
    chosen = rng.sample(range(len(mutants)), size)
    return [mutants[i] for i in sorted(chosen)]


@dataclasses.dataclass(frozen=True)
class Equivalent:
    """A mutant shown to change no behaviour, with the reason: it is drawn like any other but not run,
    and the kill rate is of the others (killed / (sampled - equivalent))."""

    path: str
    before: str
    after: str
    why: str
    scope: str | None = None  # ``in:``: the function or class it is in, where the same line occurs elsewhere

    def matches(self, mutant: Mutant) -> bool:
        same = (mutant.path, mutant.original_code, mutant.mutated_code) == (self.path, self.before, self.after)
        return same and (self.scope is None or mutant.scope == self.scope)


def load_equivalents(folder: Path, modules: Iterable[str]) -> dict[str, list[Equivalent]]:
    """The equivalent mutants of each group, from ``<folder>/<group>.txt``: blocks of four lines
    ``path:``, ``before:``, ``after:`` (the whitespace-collapsed lines of the report) and ``why:``,
    and optionally ``in:`` (the qualified name of the function or class holding the line, for a
    line whose text occurs in several places), separated by blank lines; ``#`` starts a comment line."""
    found: dict[str, list[Equivalent]] = {}
    for module in modules:
        path = folder / f"{module}.txt"
        blocks = path.read_text().split("\n\n") if path.exists() else []
        entries = []
        for block in blocks:
            fields = {}
            for line in block.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition(":")
                    if key.strip() in fields:
                        raise SystemExit(f"{path}: {key.strip()!r} twice in one entry (entries are separated "
                                         f"by a blank line): {block!r}")
                    fields[key.strip()] = value.strip()
            if not fields:
                continue
            if set(fields) - {"in"} != {"path", "before", "after", "why"} or not fields["why"]:
                raise SystemExit(f"{path}: each entry needs path, before, after and why (and may name in): {block!r}")
            entries.append(Equivalent(fields["path"], fields["before"], fields["after"], fields["why"], fields.get("in")))
        found[module] = entries
    return found


def warn_stale(equivalents: dict[str, list[Equivalent]], population: dict[str, list[Mutant]]) -> None:
    """Print every listed entry that matches no mutant of its group (its line changed since)."""
    for module, entries in equivalents.items():
        for entry in entries:
            if not any(entry.matches(m) for m in population[module]):
                print(f"warning: equivalent-mutant entry matches no mutant of {module} (stale?): "
                      f"{entry.path}: {entry.before[:80]}")


def equivalent_reason(mutant: Mutant, equivalents: dict[str, list[Equivalent]]) -> str | None:
    """Why ``mutant`` is listed as equivalent, or None."""
    for entry in equivalents.get(mutant.module, ()):
        if entry.matches(mutant):
            return entry.why
    return None


# --------------------------------------------------------------------------- isolated trees


def tree_files(repo: Path) -> list[str]:
    """Tracked and untracked, non-ignored files of the working tree, plus the prebuilt kernels."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout.decode().split("\0")
    kernels = [p.relative_to(repo).as_posix() for p in (repo / "symgate" / "_kernels").glob("k_*.so")]
    return sorted({f for f in listed if f and (repo / f).is_file()} | set(kernels))


def make_snapshot(repo: Path, destination: Path, rev: str | None) -> None:
    """Copy the working tree (or commit ``rev``, plus the working tree's prebuilt kernels) into ``destination``."""
    destination.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=repo, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
        files = [f for f in tree_files(repo) if f.startswith("symgate/_kernels/k_")]
    else:
        files = tree_files(repo)
    for relpath in files:
        target = destination / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relpath, target)


def missing_prebuilt_kernels(snapshot: Path) -> list[str]:
    """Built-in kernels the snapshot's generator produces that no prebuilt module in the snapshot holds."""
    code = ("import json; from symgate._aot import builtin_sources; "
            "print(json.dumps([name for name, _ in builtin_sources()]))")
    env = {**os.environ, "PYTHONPATH": str(snapshot), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=snapshot, env=env, check=True, capture_output=True,
                         text=True, timeout=600).stdout
    names = json.loads(out.strip().splitlines()[-1])
    kernels = snapshot / "symgate" / "_kernels"
    return [n for n in names if not list(kernels.glob(n.rsplit(".", 1)[1] + ".*.so"))]


def rebuild_prebuilt_kernels(snapshot: Path) -> None:
    """Compile the snapshot's built-in kernels in place, as ``pip install`` does (``setup.py build_ext``).

    Needed when the prebuilt modules of the source tree come from another version of the
    generator (e.g. ``--rev``, or an edited generator not yet reinstalled): without them the
    tests that expect ahead-of-time kernels fail on the unmutated tree.
    """
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=snapshot, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)


def isolated_env(tree: Path, scratch: Path, single_threaded_blas: bool) -> dict[str, str]:
    """Environment of a run in ``tree``: the copy first on the path, a private kernel cache and temp dir."""
    cache, tmp = scratch / "kernel-cache", scratch / "tmp"
    cache.mkdir(parents=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["SYMGATE_CACHE_DIR"] = str(cache)
    env["TMPDIR"] = str(tmp)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MPLBACKEND"] = "Agg"
    if single_threaded_blas:
        env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def import_paths(tree: Path, env: dict[str, str], module_paths: Sequence[str]) -> dict[str, str]:
    """Where a process started with ``env`` in ``tree`` imports each module file from."""
    names = [p[:-3].replace("/", ".").removesuffix(".__init__") for p in module_paths]
    code = "import importlib, json, sys; print(json.dumps({n: importlib.import_module(n).__file__ for n in sys.argv[1:]}))"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tree, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    """What the fast suite did with one mutant."""

    status: str  # killed | timeout | survived | error | equivalent (listed, not run)
    seconds: float
    detail: str = ""


def tests_for(tree: Path, module: str, scope: str, given: Sequence[str] = ()) -> list[str]:
    """Test files for a mutant of ``module``: the relevant ones first, then (scope "full") the rest;
    ``given`` (``--tests``) replaces them all."""
    if given:
        return list(given)
    relevant: list[str] = []
    for pattern in RELEVANT_TESTS[module]:
        for path in sorted(tree.glob(pattern)):
            name = path.relative_to(tree).as_posix()
            if name not in relevant:
                relevant.append(name)
    if scope == "relevant":
        return relevant
    rest = sorted(p.relative_to(tree).as_posix() for p in tree.glob("tests/test_*.py"))
    return relevant + [name for name in rest if name not in relevant]


def _first_failure(output: str) -> str:
    """The first failing test or error line of a pytest run (for the report)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:200]
    for line in reversed(output.splitlines()):
        if "Error" in line or "error" in line:
            return line.strip()[:200]
    return ""


#: process groups of the pytest runs in flight (each run is its own session), ended on an interrupt
_RUNNING: set[int] = set()
_RUNNING_LOCK = threading.Lock()


def run_pytest(tree: Path, env: dict[str, str], tests: Sequence[str], timeout: float,
               deselect: Sequence[str] = ()) -> Outcome:
    """Run the given test files in ``tree``; killed if they fail, timeout if they outlast ``timeout``."""
    command = [sys.executable, "-m", "pytest", *PYTEST_ARGS, "--rootdir", str(tree),
               *(f"--deselect={test}" for test in deselect), *tests]
    started = time.monotonic()
    with tempfile.TemporaryFile(mode="w+", dir=env["TMPDIR"]) as log:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(process.pid)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait()
            return Outcome("timeout", time.monotonic() - started, f"no result after {timeout:.0f} s")
        finally:
            _kill_group(process.pid)  # whatever the run left behind in its session (e.g. Dask workers)
            with _RUNNING_LOCK:
                _RUNNING.discard(process.pid)
        log.seek(0)
        output = log.read()
    seconds = time.monotonic() - started
    if code == 0:
        return Outcome("survived", seconds)
    if code != 5:  # 1 failed, 2 collection error, 3 internal error, 4 conftest import error: the baseline ran
        return Outcome("killed", seconds, _first_failure(output) or f"pytest exit {code}")
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Outcome("error", seconds, f"pytest exit {code}: {tail}"[:400])


def _kill_group(group: int) -> None:
    """End the processes of one run's session (its group id is the pid of the pytest it started)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_running() -> None:
    """End every pytest run still in flight (on an interrupt)."""
    with _RUNNING_LOCK:
        groups = list(_RUNNING)
    for group in groups:
        _kill_group(group)


class Workspace:
    """A temporary directory holding the pristine snapshot and one scratch copy per run."""

    def __init__(self, repo: Path, rev: str | None, single_threaded_blas: bool, tests: Sequence[str] = ()) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="symgate-mutation-"))
        self.tests = tuple(tests)
        self.snapshot = self.root / "snapshot"
        self.single_threaded_blas = single_threaded_blas
        make_snapshot(repo, self.snapshot, rev)
        self._counter = 0
        self._lock = threading.Lock()

    def ensure_prebuilt_kernels(self) -> None:
        """Compile the snapshot's built-in kernels unless the copied prebuilt modules already match its generator."""
        missing = missing_prebuilt_kernels(self.snapshot)
        if missing:
            print(f"prebuilt kernels: {len(missing)} of the snapshot's built-in kernels are not prebuilt; "
                  "compiling them into the snapshot", flush=True)
            started = time.monotonic()
            rebuild_prebuilt_kernels(self.snapshot)
            still = missing_prebuilt_kernels(self.snapshot)
            if still:
                raise SystemExit(f"could not build the prebuilt kernels {still}")
            print(f"prebuilt kernels: compiled in {time.monotonic() - started:.0f} s", flush=True)

    def fresh_copy(self) -> tuple[Path, Path, dict[str, str]]:
        """``(tree, scratch dir, environment)`` of a new private copy of the snapshot."""
        with self._lock:
            self._counter += 1
            scratch = self.root / f"run-{self._counter:05d}"
        tree = scratch / "tree"
        shutil.copytree(self.snapshot, tree, symlinks=True)
        return tree, scratch, isolated_env(tree, scratch, self.single_threaded_blas)

    def run(self, module: str, change: Callable[[Path], None] | None, scope: str, timeout: float) -> Outcome:
        """Apply ``change`` to a fresh copy, run the tests for ``module`` there, remove the copy."""
        tree, scratch, env = self.fresh_copy()
        try:
            if change is not None:
                change(tree)
            deselect = MUTANT_DESELECT if change is not None else ()
            return run_pytest(tree, env, tests_for(tree, module, scope, self.tests), timeout, deselect)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remove(self) -> None:
        """Delete everything this workspace created."""
        shutil.rmtree(self.root, ignore_errors=True)


def write_mutant(mutant: Mutant) -> Callable[[Path], None]:
    """A change that writes the mutated file into a copy."""
    def change(tree: Path) -> None:
        path = tree / mutant.path
        path.write_bytes(mutant.apply(path.read_bytes()))
    return change


def break_module(relpath: str) -> Callable[[Path], None]:
    """A change that makes a module raise on import (what every working setup must detect)."""
    def change(tree: Path) -> None:
        path = tree / relpath
        text = path.read_text()
        tree_ast = ast.parse(text)
        body = tree_ast.body
        index = 1 if body and _is_docstring(body[0]) else 0
        while index < len(body) and isinstance(body[index], ast.ImportFrom) and body[index].module == "__future__":
            index += 1
        lines = text.splitlines(keepends=True)
        at = body[index].lineno - 1 if index < len(body) else len(lines)
        lines.insert(at, "raise RuntimeError('deliberately broken module (mutation sanity check)')\n")
        path.write_text("".join(lines))
    return change


# --------------------------------------------------------------------------- the whole run


def collect(root: Path, modules: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, list[Mutant]]]:
    """Files and full mutant population of every selected module group."""
    files = module_files(root, modules)
    population = {m: [mut for f in files[m] for mut in mutants_of_file(m, root, f)] for m in modules}
    return files, population


def check_imports(workspace: Workspace, files: dict[str, list[str]]) -> list[str]:
    """Every target module imports from a private copy, not from the source tree; returns their names."""
    tree, scratch, env = workspace.fresh_copy()
    try:
        imported = import_paths(tree, env, [f for fs in files.values() for f in fs])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outside = {name: path for name, path in imported.items() if not Path(path).resolve().is_relative_to(tree.resolve())}
    if outside:
        raise SystemExit(f"isolation failed: modules imported from outside the copy: {outside}")
    print(f"isolation: all {len(imported)} target modules import from the private copy")
    return sorted(imported)


def sanity_checks(workspace: Workspace, files: dict[str, list[str]], scope: str,
                  jobs: int) -> tuple[dict[str, object], dict[str, float]]:
    """Before any mutant: the copy imports its own modules, a deliberately broken module of every
    group is killed, and the unmutated tests pass (once for the whole suite with scope "full", else
    each group's relevant files).  Returns the findings and each group's unmutated wall time."""
    imported = check_imports(workspace, files)
    groups = [m for m, fs in files.items() if fs]
    baseline_groups = groups if scope == "relevant" else groups[:1]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        baselines = {m: pool.submit(workspace.run, m, None, scope, 3600.0) for m in baseline_groups}
        broken = {files[m][0]: pool.submit(workspace.run, m, break_module(files[m][0]), scope, 600.0) for m in groups}
        broken_outcomes = {path: f.result() for path, f in broken.items()}
        baseline_outcomes = {m: f.result() for m, f in baselines.items()}
    for path, outcome in broken_outcomes.items():
        print(f"sanity: deliberately broken {path}: {outcome.status} in {outcome.seconds:.0f} s ({outcome.detail})")
        if outcome.status != "killed":
            raise SystemExit(f"isolation failed: a deliberately broken {path} was not killed")
    for module, outcome in baseline_outcomes.items():
        what = "the fast suite" if scope == "full" else f"{module}'s test files"
        print(f"sanity: unmutated, {what}: {'passed' if outcome.status == 'survived' else outcome.status} "
              f"in {outcome.seconds:.0f} s")
        if outcome.status != "survived":
            raise SystemExit(f"the unmutated tree fails its tests ({what}): {outcome.detail}")
    seconds = {m: baseline_outcomes[m if m in baseline_outcomes else baseline_groups[0]].seconds for m in groups}
    report = {"imported_from_copy": imported,
              "broken_module_killed": {p: dataclasses.asdict(o) for p, o in broken_outcomes.items()},
              "unmutated": {m: dataclasses.asdict(o) for m, o in baseline_outcomes.items()}}
    return report, seconds


def run_mutants(workspace: Workspace, mutants: Sequence[Mutant], scope: str, jobs: int,
                timeouts: dict[str, float]) -> dict[str, Outcome]:
    """Run every mutant on ``jobs`` workers; prints one line per finished mutant."""
    outcomes: dict[str, Outcome] = {}
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(workspace.run, m.module, write_mutant(m), scope, timeouts[m.module]): m
                   for m in mutants}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            mutant = futures[future]
            outcome = future.result()
            outcomes[mutant.ident] = outcome
            elapsed = time.monotonic() - started
            print(f"[{done:>3}/{len(mutants)} {elapsed:6.0f} s] {outcome.status:<8} {outcome.seconds:5.0f} s  "
                  f"{mutant.path}:{mutant.line} {mutant.kind}", flush=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    pool.shutdown()
    return outcomes


def interleave(groups: dict[str, list[Mutant]]) -> list[Mutant]:
    """Mutants of all groups, round-robin, so every group progresses (and the slowest do not come last)."""
    queues = [list(ms) for ms in groups.values()]
    order: list[Mutant] = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def summary_rows(files: dict[str, list[str]], population: dict[str, list[Mutant]], sample: dict[str, list[Mutant]],
                 outcomes: dict[str, Outcome]) -> list[dict[str, object]]:
    """One row per file and one per module group: population, run, killed, timeout, survived, error, kill rate."""
    def row(module: str, path: str, pop: list[Mutant], run: list[Mutant]) -> dict[str, object]:
        counts = {s: sum(outcomes[m.ident].status == s for m in run if m.ident in outcomes)
                  for s in ("killed", "timeout", "survived", "error", "equivalent")}
        judged = counts["killed"] + counts["timeout"] + counts["survived"]
        rate = (counts["killed"] + counts["timeout"]) / judged if judged else None
        return {"module": module, "file": path, "population": len(pop), "run": len(run), **counts, "kill_rate": rate}

    rows = []
    for module in files:
        if len(files[module]) > 1:
            for path in files[module]:
                rows.append(row(module, path, [m for m in population[module] if m.path == path],
                                [m for m in sample[module] if m.path == path]))
        rows.append(row(module, "(all)" if len(files[module]) > 1 else (files[module] or ["-"])[0],
                        population[module], sample[module]))
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    """The per-module table."""
    header = f"{'module':<11} {'file':<34} {'population':>10} {'run':>4} {'killed':>6} {'timeout':>7} " \
             f"{'survived':>8} {'error':>5} {'equiv.':>6} {'kill rate':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = "-" if r["kill_rate"] is None else f"{100 * r['kill_rate']:.0f} %"
        print(f"{r['module']:<11} {r['file']:<34} {r['population']:>10} {r['run']:>4} {r['killed']:>6} "
              f"{r['timeout']:>7} {r['survived']:>8} {r['error']:>5} {r['equivalent']:>6} {rate:>9}")


def print_survivors(mutants: Sequence[Mutant], outcomes: dict[str, Outcome]) -> None:
    """Location and diff of every surviving mutant (and of errors, which need a look)."""
    for status in ("survived", "error", "equivalent"):
        chosen = [m for m in mutants if m.ident in outcomes and outcomes[m.ident].status == status]
        if not chosen:
            continue
        print(f"\n{status} ({len(chosen)}):")
        for m in chosen:
            print(f"  {m.path}:{m.line}  [{m.kind}]  in {m.scope or '(module)'}")
            print(f"    - {m.original_code[:160]}")
            print(f"    + {m.mutated_code[:160]}")
            if outcomes[m.ident].detail:
                print(f"    ({outcomes[m.ident].detail})")


def list_population(files: dict[str, list[str]], population: dict[str, list[Mutant]],
                    sample: dict[str, list[Mutant]], verbose: bool) -> None:
    """``--list``: population and sample size per module; with ``--verbose`` every mutant (``*`` = sampled)."""
    for module, mutants in population.items():
        chosen = {m.ident for m in sample[module]}
        print(f"{module}: {len(mutants)} mutants, {len(chosen)} sampled ({', '.join(files[module]) or 'no files'})")
        kinds: dict[str, int] = {}
        for m in mutants:
            kinds[m.kind.split(":")[0]] = kinds.get(m.kind.split(":")[0], 0) + 1
        print("   " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        for m in mutants if verbose else sample[module]:
            mark = "*" if m.ident in chosen else " "
            width = None if verbose else 70
            print(f" {mark} {m.path}:{m.line} [{m.kind}] in {m.scope or '(module)'}  {m.original_code[:width]!s}  ->  "
                  f"{m.mutated_code[:width]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULES), default=list(MODULES),
                        help="module groups to mutate (default: all)")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                        help=f"mutants drawn per module group (default {DEFAULT_SAMPLE}; 0 = all)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--scope", choices=("relevant", "full"), default="relevant",
                        help="relevant: only the test files mapped to the module (RELEVANT_TESTS; default);\n"
                             "full: those first, then the rest of the fast suite (several minutes per survivor)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds per mutant (default {TIMEOUT_FACTOR} x the unmutated tests + {TIMEOUT_SLACK:.0f})")
    parser.add_argument("--rev", default=None, help="mutate this commit instead of the working tree")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "mutation" / "report.json",
                        help="JSON report (default build/mutation/report.json)")
    parser.add_argument("--tests", nargs="+", default=[], metavar="FILE",
                        help="run only these test files (or node ids) on every mutant, e.g. to see\n"
                             "which mutants a new test file kills (the kill rate then is of that file alone)")
    parser.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                        help="keep only the sampled mutants whose id contains one of these texts\n"
                             "(e.g. symgate/_functions.py:120; with --sample 0 to pick from every mutant)")
    parser.add_argument("--list", action="store_true", help="show the population and the sample; run nothing")
    parser.add_argument("--verbose", action="store_true", help="with --list: every mutant, not only the sample")
    parser.add_argument("--keep-blas-threads", action="store_true",
                        help="leave BLAS threading alone (default with --jobs > 1: one BLAS thread per run)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.sample < 0:
        parser.error("--jobs must be >= 1 and --sample >= 0")
    return args


def describe_scope(tree: Path, modules: Sequence[str], scope: str, given: Sequence[str] = ()) -> str:
    """What each group's mutants are tested against (printed before the run and kept in the report)."""
    if given:
        return f"each mutant: only the given test files (-x): {' '.join(given)}"
    if scope == "full":
        return "each mutant: its module's relevant test files first, then the rest of the fast suite (-x)"
    lines = ["each mutant: only its module's relevant test files (-x); the rest of the fast suite is not run"
             " (--scope full runs it, at several minutes per surviving mutant)"]
    for module in modules:
        lines.append(f"  {module}: {' '.join(tests_for(tree, module, 'relevant'))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Enumerate, sample, check isolation, run, report."""
    args = parse_args(argv)
    started = time.monotonic()
    size = args.sample or None
    commit = _git_commit(args.rev)
    workspace = Workspace(REPO, args.rev, single_threaded_blas=args.jobs > 1 and not args.keep_blas_threads,
                          tests=args.tests)
    try:
        files, population = collect(workspace.snapshot, args.modules)
        sample = {m: seeded_sample(population[m], size, args.seed, m) for m in args.modules}
        if args.only:
            sample = {m: [mut for mut in ms if any(text in mut.ident for text in args.only)] for m, ms in sample.items()}
        check_compiles(workspace.snapshot, [m for ms in sample.values() for m in ms])
        # the lists of the tree that is mutated (the snapshot), read and checked before any test runs
        equivalents = load_equivalents(workspace.snapshot / EQUIVALENT_DIR.relative_to(REPO), args.modules)
        warn_stale(equivalents, population)
        if args.list:
            list_population(files, population, sample, args.verbose)
            return 0
        total = sum(len(s) for s in sample.values())
        scope_text = describe_scope(workspace.snapshot, args.modules, args.scope, args.tests)
        print(f"mutation testing: {total} of {sum(len(p) for p in population.values())} mutants "
              f"(seed {args.seed}, {size or 'all'} per module), {args.jobs} jobs, scope {args.scope}")
        print(scope_text)
        workspace.ensure_prebuilt_kernels()
        sanity, unmutated_seconds = sanity_checks(workspace, files, args.scope, args.jobs)
        timeouts = {m: args.timeout or TIMEOUT_FACTOR * t + TIMEOUT_SLACK for m, t in unmutated_seconds.items()}
        print("timeout per mutant: " + ", ".join(f"{m} {t:.0f} s" for m, t in timeouts.items()))
        order = interleave(sample)
        reasons = {m.ident: equivalent_reason(m, equivalents) for m in order}
        outcomes = {ident: Outcome("equivalent", 0.0, why) for ident, why in reasons.items() if why}
        print(f"equivalent (listed in {EQUIVALENT_DIR.relative_to(REPO)}, not run): {len(outcomes)}")
        outcomes.update(run_mutants(workspace, [m for m in order if m.ident not in outcomes], args.scope,
                                    args.jobs, timeouts))
    finally:
        workspace.remove()
    rows = summary_rows(files, population, sample, outcomes)
    elapsed = time.monotonic() - started
    print()
    print_table(rows)
    print_survivors(order, outcomes)
    print(f"\nscope: {args.scope}; total time: {elapsed:.0f} s ({elapsed / 60:.1f} min) on {args.jobs} jobs")
    report = {
        "settings": {"modules": args.modules, "sample": size, "seed": args.seed, "jobs": args.jobs,
                     "scope": args.scope, "scope_description": scope_text, "tests": args.tests,
                     "only": args.only, "timeouts_s": timeouts, "rev": args.rev,
                     "pytest_args": list(PYTEST_ARGS), "commit": commit,
                     "working_tree": args.rev is None, "deselected_on_mutants": list(MUTANT_DESELECT),
                     "files": files},
        "sanity": sanity,
        "modules": rows,
        "mutants": [{**dataclasses.asdict(m), "id": m.ident, **dataclasses.asdict(outcomes[m.ident])}
                    for m in order],
        "total_seconds": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {args.out}")
    return 0


def _git_commit(rev: str | None) -> str:
    """The commit mutated: ``rev``, or the one the working tree is at (which may differ from it)."""
    result = subprocess.run(["git", "rev-parse", rev or "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
