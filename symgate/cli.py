"""Command line: ``symgate derive``, ``symgate verify``, ``symgate demo``.

``CELL`` is a built-in name (``plain``, ``leaky``, ``scalar_gate``, ``vector_gate``,
``gru``, ``lstm``, ``mgu``) or ``path/to/file.py:name`` where ``name`` is a
:class:`~symgate.Cell` (e.g. made with ``@symgate.cell``) or an annotated function.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
from typing import Sequence

from ._cell import Cell, cell as make_cell_from_fn
from ._derive import jacobian, parameter_jacobians
from ._errors import SymgateError
from .cells import BUILTIN, builtin

__all__ = ["main", "load_cell"]


def load_cell(spec: str) -> Cell:
    """A built-in cell by name, or ``file.py:name`` from a user's file."""
    if spec in BUILTIN:
        return builtin(spec)
    if ":" not in spec:
        raise SymgateError(f"unknown cell {spec!r}: give a built-in ({', '.join(BUILTIN)}) or path/to/file.py:name")
    path, _, attr = spec.rpartition(":")
    if not os.path.isfile(path):
        raise SymgateError(f"cell file {path!r} does not exist")
    if not attr.isidentifier():
        raise SymgateError(f"{attr!r} is not a valid Python name in {spec!r}")
    modname = "_symgate_user_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    mspec = importlib.util.spec_from_file_location(modname, path)
    if mspec is None or mspec.loader is None:
        raise SymgateError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(module)
    except SymgateError:
        raise
    except Exception as exc:
        raise SymgateError(f"importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise SymgateError(f"{path!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, Cell):
        return obj
    if callable(obj):
        return make_cell_from_fn(obj)
    raise SymgateError(f"{spec!r} is neither a symgate Cell nor a function")


def _print_derivation(c: Cell, latex: bool) -> None:
    print(f"== cell {c.name}")
    if latex:
        print(c.latex())
    else:
        for line in c.update_equations():
            print("   " + line)
    J = jacobian(c)
    print("-- state Jacobian (terms by origin)")
    if latex:
        print(J.latex())
    else:
        print(J.describe())
    print("-- immediate parameter Jacobians")
    for of in c.state_names:
        for name, pj in parameter_jacobians(c, of).items():
            if pj.pieces:
                print("   " + (pj.latex() if latex else str(pj)))


def _cmd_derive(args: argparse.Namespace) -> int:
    c = load_cell(args.cell)
    _print_derivation(c, args.latex)
    return 0


_COLUMNS = ("jacobian", "bptt_cs", "bptt_fd", "adjoint", "mpmath", "float32")


def _table(rows: list[tuple[str, dict, bool]]) -> str:
    head = f"{'cell':14s} " + " ".join(f"{c:>10s}" for c in _COLUMNS) + "  result"
    lines = [head, "-" * len(head)]
    for name, worst, ok in rows:
        cells = " ".join(f"{worst[c].error:10.1e}" if c in worst else f"{'-':>10s}" for c in _COLUMNS)
        lines.append(f"{name:14s} {cells}  {'pass' if ok else 'FAIL'}")
    tol = rows[0][1] if rows else {}
    if tol:
        lines.append("tolerance      " + " ".join(f"{tol[c].tolerance:10.1e}" if c in tol else f"{'-':>10s}" for c in _COLUMNS)
                     + "  (float64 unless noted; bptt_cs/adjoint/float32 scale with T)")
    return "\n".join(lines)


def _verify_rows(cells: Sequence[Cell], examples: int, seed: int) -> tuple[list[tuple[str, dict, bool]], bool]:
    from .testing import verify

    rows, all_ok = [], True
    for c in cells:
        rep = verify(c, examples=examples, seed=seed, raise_on_failure=False)
        rows.append((c.name, rep.worst, rep.passed))
        all_ok &= rep.passed
        if not rep.passed:
            print(rep.summary(), file=sys.stderr)
    return rows, all_ok


def _cmd_verify(args: argparse.Namespace) -> int:
    c = load_cell(args.cell)
    rows, ok = _verify_rows([c], args.examples, args.seed)
    print(_table(rows))
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cells = [builtin(name) for name in BUILTIN]
    for c in cells:
        _print_derivation(c, latex=False)
        print()
    t1 = time.perf_counter()
    print(f"derived {len(cells)} built-in cells in {t1 - t0:.2f} s")
    print()
    print(f"== verification battery ({args.examples} random problems per cell; worst error per oracle)")
    rows, ok = _verify_rows(cells, args.examples, args.seed)
    from .testing import build_random_cell, random_cell_pool

    pool = [build_random_cell(r) for r in random_cell_pool(args.random_cells, seed=args.seed)] if args.random_cells else []
    if pool:
        prow, pok = _verify_rows(pool, 1, args.seed)
        worst: dict = {}
        for _, w, _ in prow:
            for k, v in w.items():
                if k not in worst or v.ratio > worst[k].ratio:
                    worst[k] = v
        rows.append((f"{len(pool)} random", worst, pok))
        ok &= pok
    print(_table(rows))
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t1:.1f} s")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``symgate`` command."""
    ap = argparse.ArgumentParser(prog="symgate", description="Exact Jacobians and kernels for gated RNN cells.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="print the derived Jacobians of a cell")
    d.add_argument("cell", help="built-in name or path/to/file.py:name")
    d.add_argument("--latex", action="store_true", help="print LaTeX instead of text")
    d.set_defaults(func=_cmd_derive)
    v = sub.add_parser("verify", help="run the verification battery on a cell")
    v.add_argument("cell")
    v.add_argument("--examples", type=int, default=4)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=_cmd_verify)
    m = sub.add_parser("demo", help="derive and verify every built-in cell (and a pool of random cells)")
    m.add_argument("--examples", type=int, default=3)
    m.add_argument("--random-cells", type=int, default=50)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_demo)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except SymgateError as exc:
        print(f"symgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
