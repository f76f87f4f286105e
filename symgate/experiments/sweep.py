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

import asyncio
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from .._errors import ConfigError, one_line

__all__ = ["Job", "jobs_for", "run_job", "execute", "local_cluster", "parse_scheduler", "SCHEDULERS", "MAX_WORKERS",
           "ADDRESS_SCHEMES"]

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


#: the largest worker count of a local cluster (each worker is a process)
MAX_WORKERS = 512

#: the address schemes of a running Dask scheduler that a sweep accepts (``host:port`` means ``tcp://host:port``)
ADDRESS_SCHEMES = ("tcp", "tls", "ws", "wss")

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}))$")

#: seconds to wait for the TCP connection of a remote scheduler (a refused connection fails at once)
PROBE_TIMEOUT = 4.0


def parse_scheduler(scheduler: Any) -> tuple[str, str, str, int]:
    """``scheduler`` checked: ``("serial" | "local", "", "", 0)`` or ``(address, scheme, host, port)``
    of a Dask scheduler address ``scheme://host:port`` (``scheme`` one of :data:`ADDRESS_SCHEMES`;
    a bare ``host:port`` is TCP; an IPv6 host in brackets).  Anything else is a :class:`ConfigError`."""
    hint = "give 'serial', 'local' or a Dask scheduler address such as tcp://host:8786"
    if not isinstance(scheduler, str) or not scheduler:
        raise ConfigError(f"scheduler must be 'serial', 'local' or a Dask address, got {scheduler!r}")
    if scheduler in SCHEDULERS:
        return scheduler, "", "", 0
    if len(scheduler) > 300 or not scheduler.isprintable() or any(ch.isspace() for ch in scheduler):
        raise ConfigError(f"invalid scheduler address {scheduler[:80]!r}{'...' if len(scheduler) > 80 else ''}: {hint}")
    scheme, sep, rest = scheduler.partition("://")
    if not sep:
        scheme, rest = "tcp", scheduler
    scheme = scheme.lower()
    if scheme not in ADDRESS_SCHEMES:
        raise ConfigError(f"unsupported scheduler address scheme {scheme!r} in {scheduler!r}: "
                          f"use {', '.join(s + '://' for s in ADDRESS_SCHEMES)}, 'serial' or 'local'")
    if rest.startswith("[") and "]" in rest:  # an IPv6 host: [addr]:port
        close = rest.index("]") + 1
        host, colon, port_text = rest[:close], rest[close:close + 1], rest[close + 1:]
        if colon != ":":
            raise ConfigError(f"no port in the scheduler address {scheduler!r}: give {scheme}://{host}:PORT")
    else:
        host, colon, port_text = rest.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"invalid scheduler {scheduler!r}: {hint}")
    if not _HOST.match(host) or (not host.startswith("[") and ":" in host):
        raise ConfigError(f"invalid host {host!r} in the scheduler address {scheduler!r}: {hint}")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid port {port_text!r} in the scheduler address {scheduler!r}: a port is an integer in 1..65535")
    port = int(port_text)
    return f"{scheme}://{host}:{port}", scheme, host.strip("[]"), port


def _probe(address: str, host: str, port: int, timeout: float) -> None:
    """A raw TCP connection to ``host:port`` within ``timeout`` s, closed at once; a
    :class:`ConfigError` naming ``address`` when nothing answers.  Name resolution runs in
    a daemon thread, so a resolver that never answers cannot hold the caller (or the exit)."""
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)

    t = threading.Thread(target=attempt, name="symgate-scheduler-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r}: no answer within {timeout:g} s")
    exc = result[0]
    if exc is None:
        return
    if isinstance(exc, ConnectionRefusedError):
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r}: connection refused (nothing is listening)")
    if isinstance(exc, socket.gaierror):
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r}: unknown host {host!r} ({exc.strerror or exc})")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r}: no answer within {timeout:g} s")
    if isinstance(exc, OSError):
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r}: {exc.strerror or exc}")
    raise exc


def execute(jobs: Iterable[Job], *, scheduler: str = "local", workers: int | None = None, progress: bool = True,
            desc: str = "jobs", connect_timeout: float = 20.0) -> list[dict]:
    """Run ``jobs`` and return their results in order.

    ``scheduler``: ``"serial"`` (this process), ``"local"`` (a Dask ``LocalCluster`` of
    ``workers`` single-threaded processes, default one per core, at most :data:`MAX_WORKERS`)
    or the address of a running Dask scheduler (see :func:`parse_scheduler`).  A scheduler
    must accept the TCP connection within :data:`PROBE_TIMEOUT` s (a refused connection fails
    at once) and finish the Dask handshake within ``connect_timeout`` s of the start;
    otherwise, or when the server does not speak Dask's protocol, a :class:`ConfigError`
    names the address.
    """
    jobs = list(jobs)
    address, scheme, host, port = parse_scheduler(scheduler)
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS):
        raise ConfigError(f"workers must be an integer in 1..{MAX_WORKERS}, got {workers!r}")
    if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) \
            or not (0 < connect_timeout <= 3600):
        raise ConfigError(f"connect_timeout must be a number of seconds in (0, 3600], got {connect_timeout!r}")
    if not jobs:
        return []
    bar = _progress(len(jobs), desc, progress)
    try:
        if address == "serial":
            out = []
            for j in jobs:
                out.append(run_job(j))
                bar.update(1)
            return out
        if address == "local":
            return _execute_local(jobs, workers, bar)
        start = time.monotonic()
        _probe(address, host, port, min(PROBE_TIMEOUT, float(connect_timeout)))
        remaining = max(float(connect_timeout) - (time.monotonic() - start), 0.5)
        _distributed()
        return _run_coroutine(lambda: _execute_remote(jobs, address, bar, remaining, float(connect_timeout)))
    finally:
        bar.close()


def _execute_local(jobs: list[Job], workers: int | None, bar: Any) -> list[dict]:
    """The jobs on a local Dask cluster of ``workers`` single-threaded processes (one per core by default)."""
    _distributed()
    from distributed import Client, as_completed

    cluster = local_cluster(workers or os.cpu_count() or 1)
    client = Client(cluster)
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
        cluster.close()


def _distributed() -> None:
    """Import ``distributed`` (and its logging setup), or a :class:`ConfigError` saying it is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:  # pragma: no cover - distributed is a dependency of the experiments
        raise ConfigError("Dask sweeps need `distributed` (pip install 'symgate[experiments]'); "
                          "use scheduler='serial' to run in this process") from exc


def _run_coroutine(make: Callable[[], Any]) -> Any:
    """``asyncio.run(make())`` here, or in a fresh thread when this thread already runs an
    event loop (a notebook); the loop and everything on it end before this returns."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, asyncio.run(make())))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append((False, exc))

    t = threading.Thread(target=run, name="symgate-dask-client")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


#: seconds given to closing a client whose scheduler stopped answering
_CLOSE_TIMEOUT = 3.0


async def _close(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(timeout=_CLOSE_TIMEOUT), _CLOSE_TIMEOUT + 1.0)
    except Exception:  # noqa: BLE001 - the client is abandoned either way
        pass


async def _execute_remote(jobs: list[Job], address: str, bar: Any, timeout: float, shown: float) -> list[dict]:
    """The jobs on the scheduler at ``address``: the client connects and finishes the
    handshake within ``timeout`` s (Dask's own timeout covers only the TCP connect;
    ``shown`` is the whole connection time allowed, for the message).  Dask's client logs
    are muted meanwhile: what goes wrong is the one ConfigError raised here."""
    quiet = [logging.getLogger(n) for n in ("distributed.client", "distributed.comm", "distributed.core")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        return await _remote_session(jobs, address, bar, timeout, shown)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)


async def _remote_session(jobs: list[Job], address: str, bar: Any, timeout: float, shown: float) -> list[dict]:
    from distributed import Client, as_completed  # imported by _distributed() before the loop started

    client = None
    try:
        client = Client(address, asynchronous=True, timeout=f"{timeout}s", set_as_default=False)
        await asyncio.wait_for(client, timeout)
    except BaseException as exc:
        if client is not None:
            await _close(client)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            raise ConfigError(f"no Dask scheduler answered at {address!r} within {shown:g} s "
                              "(the connection was accepted but the handshake did not finish)") from None
        if isinstance(exc, MemoryError):
            raise ConfigError(f"the server at {address!r} does not speak the Dask protocol "
                              f"(its reply announced an impossible size: {one_line(exc, 200)})") from None
        if isinstance(exc, Exception) and not isinstance(exc, ConfigError):
            # anything else the handshake raises is about the server
            raise ConfigError(f"the server at {address!r} did not answer as a Dask scheduler ({one_line(exc, 200)})") from None
        raise
    try:
        futures = client.map(run_job, jobs, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(jobs)
        async for fut in as_completed(futures, loop=client.loop):
            try:
                out[index[fut.key]] = await fut
            except Exception as exc:
                if fut.status == "error":
                    raise  # the job's own error, as raised on the worker
                raise ConfigError(f"lost the Dask scheduler at {address!r} during the sweep ({one_line(exc, 200)})") from None
            bar.update(1)
        return out
    finally:
        await _close(client)
