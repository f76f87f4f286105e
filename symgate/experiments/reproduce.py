"""``symgate reproduce``: run the experiments, gather the results, write the report.

:func:`reproduce` runs S1, S2 and the appendix check (any subset) at the paper's
settings or the ``quick`` presets, as independent jobs through :func:`~symgate.experiments.sweep.execute`
(a local Dask cluster by default), and writes into ``out``:

* ``results.json`` -- every number: settings, seeds, versions, every run, the summaries,
  the claims with the path of their evidence;
* one PNG per claim (matplotlib);
* ``report.md`` -- the claims table, the released-vs-symgate method comparisons, the plots.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

from .._errors import ConfigError
from ._common import jsonable, versions
from .appendix import AppendixSettings, summarize_appendix
from .report import claims, method_comparisons, plot_all, write_report
from .s1 import S1Settings, summarize_s1
from .s2 import S2Settings, summarize_s2
from .sweep import execute, jobs_for, parse_scheduler

__all__ = ["reproduce", "EXPERIMENTS", "default_settings", "seeds_for", "MAX_SEEDS"]

EXPERIMENTS = ("s1", "s2", "appendix")


def default_settings(experiment: str, quick: bool = False) -> Any:
    """The settings of ``experiment``: the paper's, or the quick preset."""
    cls = {"s1": S1Settings, "s2": S2Settings, "appendix": AppendixSettings}.get(experiment)
    if cls is None:
        raise ConfigError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    return cls.quick() if quick else cls()


#: the most seeds per configuration (the paper used 20)
MAX_SEEDS = 10_000


def seeds_for(experiment: str, n: int) -> list[int]:
    """Seeds as released: 1..n for S1 and S2, 0..n-1 for the appendix check."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SEEDS:
        shown = repr(n) if len(repr(n)) <= 40 else repr(n)[:30] + "..."
        raise ConfigError(f"the number of seeds must be an integer in 1..{MAX_SEEDS}, got {shown}")
    return list(range(n)) if experiment == "appendix" else list(range(1, n + 1))


def _summarize(experiment: str, settings: Any, runs: Sequence[dict]) -> dict:
    return {"s1": summarize_s1, "s2": summarize_s2, "appendix": summarize_appendix}[experiment](settings, runs)


def _writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-", delete=True):
            pass
    except (OSError, ValueError, TypeError) as exc:  # ValueError: a NUL byte; TypeError: not a path
        raise ConfigError(f"cannot write to the output directory {out!r}: {exc}") from exc


def reproduce(which: str | Sequence[str] = "all", *, quick: bool = False, seeds: int | None = None, out: str = "reproduction",
              scheduler: str = "local", workers: int | None = None, progress: bool = True,
              settings: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the experiments ``which`` (``"s1"``, ``"s2"``, ``"appendix"``, ``"all"`` or a list)
    and write ``results.json``, the plots and ``report.md`` into ``out``.

    ``seeds`` defaults to 5 (the released runner's default; the paper used 20) and to 2
    with ``quick``.  ``settings`` may override an experiment's settings object.  Returns
    the results dict (as written to ``results.json``) with ``"paths"`` added.
    """
    names = list(EXPERIMENTS) if which == "all" else ([which] if isinstance(which, str) else list(which))
    for nm in names:
        if nm not in EXPERIMENTS:
            raise ConfigError(f"unknown experiment {nm!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
    n = seeds if seeds is not None else (2 if quick else 5)
    seeds_for(names[0] if names else "s1", n)
    parse_scheduler(scheduler)
    _writable(out)
    chosen = {nm: (settings or {}).get(nm) or default_settings(nm, quick) for nm in names}
    jobs = []
    spans = {}
    for nm in names:
        js = jobs_for(nm, chosen[nm], seeds_for(nm, n))
        spans[nm] = (len(jobs), len(jobs) + len(js))
        jobs += js
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    runs = execute(jobs, scheduler=scheduler, workers=workers, progress=progress, desc="reproduce " + "+".join(names))
    total = time.perf_counter() - t0
    # per-experiment time: each job's own wall time, summed (the jobs of all experiments share the workers)
    results: dict[str, Any] = {
        "meta": {
            "command": command or "symgate.experiments.reproduce(" + repr(which) + ")",
            "preset": "quick" if quick else "paper",
            "seeds": n,
            "scheduler": scheduler,
            "workers": workers,
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "seconds": {"total": total},
        },
        "experiments": {},
    }
    for nm in names:
        lo, hi = spans[nm]
        part = runs[lo:hi]
        results["meta"]["seconds"][f"{nm} (sum of job times)"] = float(sum(r.get("seconds", 0.0) for r in part))
        results["experiments"][nm] = {"settings": chosen[nm].as_dict(), "seeds": seeds_for(nm, n), "runs": part,
                                      "summary": _summarize(nm, chosen[nm], part)}
    results["claims"] = claims(results)
    results["method_comparisons"] = method_comparisons(results)
    plots = plot_all(results, out)
    results["plots"] = plots
    path_json = os.path.join(out, "results.json")
    tmp = path_json + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(jsonable(results), fh, indent=1, allow_nan=False)
    os.replace(tmp, path_json)
    report = write_report(results, out, plots)
    results["paths"] = {"results": path_json, "report": report, "plots": [os.path.join(out, p) for ps in plots.values() for p in ps]}
    return results


def main_summary(results: dict[str, Any], stream: Any = None) -> None:
    """Print the claims table and where the report is."""
    stream = sys.stdout if stream is None else stream
    print(f"\n{'claim':<34} {'holds':<8} evidence", file=stream)
    for c in results["claims"]:
        ev = c["evidence"]
        print(f"{c['id']:<34} {c['holds']:<8} {ev[:110]}{'…' if len(ev) > 110 else ''}", file=stream)
    p = results["paths"]
    print(f"\nreport:  {p['report']}\nresults: {p['results']}\nplots:   {', '.join(p['plots'])}", file=stream)
