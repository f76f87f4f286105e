"""Sweeps: every (experiment, model, task, seed) is an independent job.

:func:`jobs_for` lists the jobs of an experiment; :func:`execute` runs a list of jobs
serially in this process, on a local Dask cluster of worker processes (the default),
or on an existing Dask cluster (``scheduler="tcp://host:port"``), with a progress bar,
and returns the results in job order.  A job is a plain tuple ``(experiment, settings
dict, args)`` run by :func:`run_job`, so a worker needs nothing but symgate installed.
Each job seeds its own generators, so its result does not depend on where, when or
next to what it runs: a sweep on a cluster equals the serial sweep bit for bit.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Sequence

from .._errors import ConfigError

__all__ = ["Job", "jobs_for", "run_job", "execute", "local_cluster", "SCHEDULERS"]

#: (experiment, settings as a dict, positional arguments after the settings)
Job = tuple[str, dict, tuple]

#: the special scheduler names (anything else is a Dask scheduler address)
SCHEDULERS = ("local", "serial")


def _runners() -> dict[str, Callable[..., dict]]:
    from .appendix import run_appendix
    from .s1 import run_s1
    from .s2 import run_s2

    return {"s1": run_s1, "s2": run_s2, "appendix": run_appendix}


def jobs_for(experiment: str, settings: Any, seeds: Sequence[int]) -> list[Job]:
    """The jobs of ``experiment`` (``"s1"``, ``"s2"``, ``"appendix"``) for ``seeds``."""
    d = settings.as_dict()
    if experiment == "s1":
        return [("s1", d, (model, seed)) for model in settings.models for seed in seeds]
    if experiment == "s2":
        return [("s2", d, (task, i, seed)) for task in settings.tasks for i in range(len(settings.models)) for seed in seeds]
    if experiment == "appendix":
        return [("appendix", d, (cell, seed)) for cell in settings.cells for seed in seeds]
    raise ConfigError(f"unknown experiment {experiment!r}; known: s1, s2, appendix")


def run_job(job: Job) -> dict:
    """Run one job (in any process); its result gets the job's wall time as ``"seconds"``
    (the only entry that differs between two runs of the same job)."""
    import time

    experiment, settings, args = job
    runners = _runners()
    if experiment not in runners:
        raise ConfigError(f"unknown experiment {experiment!r}")
    t0 = time.perf_counter()
    out = runners[experiment](settings, *args)
    out["seconds"] = time.perf_counter() - t0
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the experiments
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...

        return _Null()
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit="job", dynamic_ncols=True)


def _single_threaded_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def local_cluster(workers: int) -> Any:
    """A Dask ``LocalCluster`` of ``workers`` single-threaded worker processes for sweeps.

    Each worker gets one BLAS thread (jobs are the unit of parallelism).  Dask's nanny
    also exports ``MALLOC_TRIM_THRESHOLD_=65536`` to its workers by default; setting it
    turns off glibc's adaptive mmap threshold, so every multi-megabyte array a training
    step allocates is mapped and unmapped afresh (page faults on every call): about 18%
    slower per job here.  The workers are started without it (an explicit
    ``MALLOC_TRIM_THRESHOLD_`` in this process's environment is still passed on).
    """
    import dask
    from distributed import LocalCluster

    env = _single_threaded_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # worker processes inherit it: one BLAS thread each
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                silence_logs=40)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(jobs: Iterable[Job], *, scheduler: str = "local", workers: int | None = None, progress: bool = True,
            desc: str = "jobs", connect_timeout: float = 20.0) -> list[dict]:
    """Run ``jobs`` and return their results in order.

    ``scheduler``: ``"serial"`` (this process), ``"local"`` (a Dask ``LocalCluster`` of
    ``workers`` single-threaded processes, default one per core) or the address of a
    running Dask scheduler (reached within ``connect_timeout`` seconds).
    """
    jobs = list(jobs)
    if not isinstance(scheduler, str) or not scheduler:
        raise ConfigError(f"scheduler must be 'serial', 'local' or a Dask address, got {scheduler!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    if not jobs:
        return []
    bar = _progress(len(jobs), desc, progress)
    try:
        if scheduler == "serial":
            out = []
            for j in jobs:
                out.append(run_job(j))
                bar.update(1)
            return out
        return _execute_dask(jobs, scheduler, workers, bar, connect_timeout)
    finally:
        bar.close()


def _execute_dask(jobs: list[Job], scheduler: str, workers: int | None, bar: Any, connect_timeout: float) -> list[dict]:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - distributed is a dependency of the experiments
        raise ConfigError("Dask sweeps need `distributed` (pip install 'symgate[experiments]'); "
                          "use scheduler='serial' to run in this process") from exc
    cluster = None
    if scheduler == "local":
        cluster = local_cluster(workers or os.cpu_count() or 1)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout=f"{connect_timeout}s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from exc
    try:
        futures = client.map(run_job, jobs, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(jobs)
        for fut in as_completed(futures):
            out[index[fut.key]] = fut.result()
            bar.update(1)
        return out
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
