"""Command line: ``symgate derive``, ``symgate verify``, ``symgate demo``.

``CELL`` is a built-in name (``plain``, ``leaky``, ``scalar_gate``, ``vector_gate``,
``gru``, ``lstm``, ``mgu``) or ``path/to/file.py:name`` where ``name`` is a
:class:`~symgate.Cell` (e.g. made with ``@symgate.cell``) or an annotated function.

Every failure ends in one line on stderr, ``symgate: error: <message>``, and exit
status 2 (argparse's usage errors too); ``KeyboardInterrupt`` exits with 130 and a
closed output pipe with 141, quietly.  ``SYMGATE_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Sequence

from ._cell import Cell
from ._derive import jacobian, parameter_jacobians
from ._errors import ConfigError, SymgateError, one_line
from ._loading import load_cell as load_cell
from .cells import BUILTIN, builtin

__all__ = ["main", "load_cell"]


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


def _print_expansion(c: Cell, latex: bool, how: str) -> None:
    from ._derive._expansion import expansion

    print(f"-- first-order expansion of the Jacobian product (split {how!r}), F(eps) = prod_j (A_j + eps B_j)")
    ex = expansion(c, how)
    print(ex.latex() if latex else str(ex))


def _print_effective_lr(c: Cell, latex: bool) -> None:
    from ._derive._expansion import effective_lr

    print("-- effective learning rate mu[t, ell] (zeroth order in the coupling)")
    try:
        elr = effective_lr(c)
    except SymgateError as exc:
        print(f"   (none: {exc})")
        return
    print(elr.latex() if latex else str(elr))


def _cmd_derive(args: argparse.Namespace) -> int:
    c = load_cell(args.cell)
    _print_derivation(c, args.latex)
    if args.expansion:
        _print_expansion(c, args.latex, args.split)
    if args.effective_lr:
        _print_effective_lr(c, args.latex)
    return 0


_COLUMNS = ("jacobian", "bptt_cs", "bptt_fd", "adjoint", "mpmath", "float32", "batch", "compiled")


def _table(rows: list[tuple[str, dict, bool]]) -> str:
    head = f"{'cell':24s} " + " ".join(f"{c:>10s}" for c in _COLUMNS) + "  result"
    lines = [head, "-" * len(head)]
    for name, worst, ok in rows:
        cells = " ".join(f"{worst[c].error:10.1e}" if c in worst else f"{'-':>10s}" for c in _COLUMNS)
        lines.append(f"{name:24s} {cells}  {'pass' if ok else 'FAIL'}")
    tol: dict = {}
    for _, worst, _ in rows:
        for c, r in worst.items():
            tol.setdefault(c, r)
    if tol:
        lines.append(f"{'tolerance':24s} " + " ".join(f"{tol[c].tolerance:10.1e}" if c in tol else f"{'-':>10s}" for c in _COLUMNS)
                     + "  (float64 unless noted; bptt_cs/adjoint/float32 scale with T)")
    return "\n".join(lines)


def _print_mu_table(cells: Sequence[Cell], seed: int) -> None:
    """Numeric mu on a random problem: mean over steps, sequences and neurons, per lag."""
    from ._transport import effective_lrs
    from .testing import draw_problem

    lags = (0, 1, 2, 5, 10, 20, 40)
    n, B, T = 16, 8, 60
    print(f"== effective learning rates on a random problem (n={n}, B={B}, T={T}): mean mu[t, ell] over t, b, neurons")
    print(f"{'cell':14s} {'param':6s} {'state':5s} " + " ".join(f"{'ell=' + str(l):>9s}" for l in lags) + "  spread over neurons at ell=5")
    for c in cells:
        prob = draw_problem(c, seed, n=n, m=2, B=B, T=T, rho=0.9)
        try:
            mu = effective_lrs(c, prob.params, prob.x, prob.h0, max_lag=max(lags))
        except SymgateError as exc:
            print(f"{c.name:14s} (no effective learning rate: {exc})")
            continue
        means = mu.mean_envelope()
        v = mu.valid()[:, 5]
        per_neuron = mu.mu[v, 5].mean(axis=(0, 1))
        spread = f"max/min = {per_neuron.max() / per_neuron.min():.3g}" if per_neuron.min() > 0 else "n/a (no leak: mu = 0)"
        print(f"{c.name:14s} {mu.param:6s} {mu.state:5s} " + " ".join(f"{means[l]:9.2e}" for l in lags) + f"  {spread}")


def _verify_rows(cells: Sequence[Cell], examples: int, seed: int, backend: str) -> tuple[list[tuple[str, dict, bool]], bool]:
    from .testing import verify

    rows, all_ok = [], True
    for c in cells:
        rep = verify(c, examples=examples, seed=seed, raise_on_failure=False, backend=backend)
        rows.append((f"{c.name} [{'compiled' if backend == 'compiled' else 'numpy'}]", rep.worst, rep.passed))
        all_ok &= rep.passed
        if not rep.passed:
            print(rep.summary(), file=sys.stderr)
    return rows, all_ok


def _at_least(flag: str, value: int, lo: int, hi: int | None = None) -> None:
    """A one-line :class:`ConfigError` naming the flag when an integer option is below ``lo``
    (or above ``hi``)."""
    if value < lo:
        raise ConfigError(f"{flag} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}...({len(str(value))} digits)"
        raise ConfigError(f"{flag} must be <= {hi}, got {shown}")


#: upper bounds of the command line's counts (a larger one is a typo, not a plan)
MAX_EXAMPLES = 100_000
MAX_RANDOM_CELLS = 100_000
MAX_SEED = 2**32 - 1


def _check_scheduler(scheduler: str) -> None:
    from .experiments.sweep import parse_scheduler

    parse_scheduler(scheduler)


def _cmd_verify(args: argparse.Namespace) -> int:
    _at_least("--examples", args.examples, 1, MAX_EXAMPLES)
    _at_least("--seed", args.seed, 0, MAX_SEED)
    c = load_cell(args.cell)
    rows, ok = _verify_rows([c], args.examples, args.seed, args.backend)
    print(_table(rows))
    return 0 if ok else 1


def _cmd_codegen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._codegen import generate

    c = load_cell(args.cell)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise SymgateError(f"cannot create output directory {str(out)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    for dt in dtypes:
        path = out / f"{c.name}_{dt}.pyx"  # the cell name is a validated identifier
        source = generate(c, dt).source
        try:
            path.write_text(source)
        except OSError as exc:
            raise SymgateError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _at_least("--examples", args.examples, 1, MAX_EXAMPLES)
    _at_least("--random-cells", args.random_cells, 0, MAX_RANDOM_CELLS)
    _at_least("--compiled-random", args.compiled_random, 0, MAX_RANDOM_CELLS)
    _at_least("--seed", args.seed, 0, MAX_SEED)
    if not args.no_reproduce:
        _check_scheduler(args.scheduler)  # before minutes of work, not after
    t0 = time.perf_counter()
    cells = [builtin(name) for name in BUILTIN]
    for c in cells:
        _print_derivation(c, latex=False)
        _print_effective_lr(c, latex=False)
        print()
    t1 = time.perf_counter()
    print(f"derived {len(cells)} built-in cells in {t1 - t0:.2f} s")
    print()
    _print_mu_table(cells, args.seed)
    print()
    print(f"== verification battery on the compiled kernels ({args.examples} random problems per cell; worst error per oracle)")
    rows, ok = _verify_rows(cells, args.examples, args.seed, "compiled")
    from .testing import build_random_cell, random_cell_pool

    pool = [build_random_cell(r) for r in random_cell_pool(max(args.random_cells, args.compiled_random), seed=args.seed)]
    for label, part, backend in ((f"{args.compiled_random} random [compiled]", pool[:args.compiled_random], "compiled"),
                                 (f"{args.random_cells} random [numpy]", pool[:args.random_cells], "reference")):
        if not part:
            continue
        if backend == "compiled":
            print(f"(compiling {len(part)} random cells' kernels on first use; cached afterwards)", flush=True)
        prow, pok = _verify_rows(part, 1, args.seed, backend)
        worst: dict = {}
        for _, w, _ in prow:
            for k, v in w.items():
                if k not in worst or v.ratio > worst[k].ratio:
                    worst[k] = v
        rows.append((label, worst, pok))
        ok &= pok
    print(_table(rows))
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t1:.1f} s")
    if args.no_reproduce:
        return 0 if ok else 1
    print("\n== quick reproduction of the paper's simulations (S1, S2, appendix; `symgate reproduce all` for the paper's settings)",
          flush=True)
    rc = _cmd_reproduce(argparse.Namespace(experiment="all", quick=True, seeds=None, out=args.out, scheduler=args.scheduler,
                                           workers=None, no_progress=False, task=None, endpoint_stride=None, models=None))
    return (0 if ok else 1) or rc


def _check_reproduce_args(args: argparse.Namespace, models: list[str]) -> None:
    """The options of ``reproduce`` checked before any work starts (one-line ConfigErrors)."""
    from .experiments._common import model_cell, model_label
    from .experiments.reproduce import MAX_SEEDS
    from .experiments.sweep import MAX_WORKERS

    if args.seeds is not None:
        _at_least("--seeds", args.seeds, 1, MAX_SEEDS)
    if args.workers is not None:
        _at_least("--workers", args.workers, 1, MAX_WORKERS)
    if args.endpoint_stride is not None:
        _at_least("--endpoint-stride", args.endpoint_stride, 1, 1_000_000)
    _check_scheduler(args.scheduler)
    labels: dict[str, str] = {}
    for m in models:
        model_cell(m)
        label = model_label(m)
        if label in labels:
            raise ConfigError(f"--models: {m!r} and {labels[label]!r} would both be reported as {label!r}; "
                              "give each model once, under distinct names")
        labels[label] = m


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.reproduce import default_settings, main_summary, reproduce

    settings = {}
    raw_models = getattr(args, "models", None)
    models = [m.strip() for m in (raw_models or "").split(",") if m.strip()]
    if raw_models is not None and not models:
        raise ConfigError(f"--models names no model: {raw_models!r}")
    _check_reproduce_args(args, models)
    if args.task is not None or args.endpoint_stride is not None or models:
        s1 = default_settings("s1", args.quick)
        if args.task is not None:
            s1 = s1.replace(task=args.task)
        if args.endpoint_stride is not None:
            s1 = s1.replace(endpoint_stride=args.endpoint_stride)
        if models:
            s1 = s1.replace(models=tuple(models))
            settings["appendix"] = default_settings("appendix", args.quick).replace(cells=tuple(models))
        settings["s1"] = s1
    cmd = "symgate reproduce " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["reproduce"] else \
        f"symgate reproduce {args.experiment}{' --quick' if args.quick else ''}"
    t0 = time.perf_counter()
    res = reproduce(args.experiment, quick=args.quick, seeds=args.seeds, out=args.out, scheduler=args.scheduler,
                    workers=args.workers, progress=not args.no_progress, settings=settings, command=cmd)
    main_summary(res)
    print(f"finished in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``symgate`` command."""
    ap = argparse.ArgumentParser(
        prog="symgate", description="Exact Jacobians and kernels for gated RNN cells.",
        epilog="Errors are reported on one line ('symgate: error: ...', exit status 2); set SYMGATE_DEBUG=1 to see "
               "the traceback as well.  Ctrl-C exits with status 130.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="print the derived Jacobians of a cell")
    d.add_argument("cell", help="built-in name or path/to/file.py:name")
    d.add_argument("--latex", action="store_true", help="print LaTeX instead of text")
    d.add_argument("--expansion", action="store_true", help="also print the first-order expansion of Jacobian products")
    d.add_argument("--split", default="appendix", choices=["appendix", "coupling", "diagonal"],
                   help="which terms form the perturbation B in --expansion (default: appendix = gate terms)")
    d.add_argument("--effective-lr", action="store_true", help="also print the per-lag effective learning rate")
    d.set_defaults(func=_cmd_derive)
    v = sub.add_parser("verify", help="run the verification battery on a cell")
    v.add_argument("cell")
    v.add_argument("--examples", type=int, default=4)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--backend", choices=["compiled", "reference"], default="compiled",
                   help="check the compiled kernels (default; compiled on first use) or the numpy reference")
    v.set_defaults(func=_cmd_verify)
    g = sub.add_parser("codegen", help="write the generated Cython kernel source of a cell")
    g.add_argument("cell")
    g.add_argument("-o", "--out", default=".", help="output directory (default: .)")
    g.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    g.set_defaults(func=_cmd_codegen)
    m = sub.add_parser("demo", help="derive and verify every built-in cell (and a pool of random cells)")
    m.add_argument("--examples", type=int, default=3)
    m.add_argument("--random-cells", type=int, default=50, help="random cells checked on the numpy reference")
    m.add_argument("--compiled-random", type=int, default=2, help="random cells also compiled and checked")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-reproduce", action="store_true", help="skip the quick reproduction of the simulations")
    m.add_argument("--out", default="reproduction-quick", help="where the quick reproduction writes its report")
    m.add_argument("--scheduler", default="local", help="'local' (Dask processes), 'serial' or a Dask scheduler address")
    m.set_defaults(func=_cmd_demo)
    r = sub.add_parser("reproduce", help="reproduce the paper's simulations: results.json, plots and report.md",
                       description="Run S1 (effective-LR profiles), S2 (anisotropy of gates vs Adam) and the appendix "
                                   "expansion check at the paper's settings (or --quick), as independent jobs on Dask.")
    r.add_argument("experiment", choices=["s1", "s2", "appendix", "all"])
    r.add_argument("--quick", action="store_true", help="small presets that finish in seconds")
    r.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 5; 2 with --quick; the paper used 20)")
    r.add_argument("--out", default="reproduction", help="output directory (default: ./reproduction)")
    r.add_argument("--scheduler", default="local",
                   help="'local' (a Dask LocalCluster of processes, default), 'serial', or tcp://host:port of a running cluster")
    r.add_argument("--workers", type=int, default=None, help="worker processes of the local cluster (default: one per core)")
    r.add_argument("--task", default=None, help="S1's task (default adding; also recall, copy, movingavg, delaysum, narma10)")
    r.add_argument("--endpoint-stride", type=int, default=None,
                   help="S1 pairs: every k-th endpoint (1 = every pair, as released; default 8)")
    r.add_argument("--models", default=None,
                   help="comma-separated cells for S1 and the appendix check: model names (leaky, scalar_gate, "
                        "vector_gate, plain, any built-in) or path/to/file.py:name (default: the paper's)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_reproduce)
    args = ap.parse_args(argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except SymgateError as exc:
        failure: BaseException = exc
        line = _error_line(exc)
    except OSError as exc:
        failure = exc
        line = _os_error_line(exc)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported on one line, traceback on request
        failure = exc
        line = f"unexpected {_describe(exc)} (rerun with {DEBUG_ENV}=1 to see the traceback)"
    if debug:
        traceback.print_exception(failure, file=sys.stderr)
    _print_error(line)
    return 2


#: set to 1 to get the traceback of an error as well as its one-line message
DEBUG_ENV = "SYMGATE_DEBUG"


def _describe(exc: BaseException) -> str:
    return f"exit (SystemExit({exc.code!r}))" if isinstance(exc, SystemExit) else one_line(exc)


def _error_line(exc: SymgateError) -> str:
    """The first line of a SymgateError's message; a BuildError's whole log goes to a file named in the line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0].strip() if lines else type(exc).__name__
    if len(lines) <= 1:
        return first
    from ._build import BuildError

    if isinstance(exc, BuildError):
        log = _save_log(str(exc), getattr(exc, "sources", None))
        return f"{first} (the full log: {log})" if log else f"{first} (sources kept in {exc.sources})"
    return first


def _save_log(text: str, where: object) -> str | None:
    """``text`` written to ``build-error.log`` in ``where`` (or a new temporary file); its path."""
    import tempfile

    if where:
        path = os.path.join(str(where), "build-error.log")
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            return path
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix="symgate-build-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        return path
    except OSError:
        return None


def _os_error_line(exc: OSError) -> str:
    """An OSError on one line, naming its file(s) when it has one."""
    if exc.filename is None:
        return f"unexpected {_describe(exc)} (rerun with {DEBUG_ENV}=1 to see the traceback)"
    what = exc.strerror or type(exc).__name__
    names = repr(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else repr(exc.filename)
    if exc.filename2 is not None:
        names += f" -> {os.fsdecode(exc.filename2)!r}" if isinstance(exc.filename2, (str, bytes)) else f" -> {exc.filename2!r}"
    return f"{what}: {names}"


def _print_error(line: str) -> None:
    try:
        print(f"symgate: error: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # pragma: no cover - stderr itself is gone
        pass


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the exit's flush cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
