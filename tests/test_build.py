"""The on-disk kernel cache: content addressing, atomic publishing, recovery, fallbacks.

Each test compiles small Cython modules (about 2 s each) into a private cache
directory; the concurrency and crash tests are in the slow tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from symgate import _build
from symgate._build import BuildError, SymgateWarning, build_module, cache_key


def source(token: str, body: str = "return x * 2") -> str:
    """A tiny, unique module (the token changes the content hash)."""
    return textwrap.dedent(f"""
        # token {token}
        def f(double x):
            {body}
    """)


WORKER = textwrap.dedent("""
    import sys, time
    from symgate._build import build_module
    src = open(sys.argv[1]).read()
    m = build_module(src)
    assert m.f(2.0) == 4.0
    print("ok", flush=True)
""")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(root))
    monkeypatch.setattr(_build, "_LOADED", {})
    monkeypatch.setattr(_build, "_FALLBACK", None)
    return root


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if p.is_dir())


def test_build_load_and_reuse(cache: Path) -> None:
    src = source(uuid.uuid4().hex)
    m = build_module(src)
    assert m.f(3.0) == 6.0
    (entry,) = entries(cache)
    meta = json.loads((entry / "manifest.json").read_text())
    assert entry.name == cache_key(src) and meta["key"] == entry.name
    assert build_module(src) is m  # in-process cache
    _build._LOADED.clear()
    t = time.perf_counter()
    m2 = build_module(src)  # warm load from disk: no compile
    assert time.perf_counter() - t < 1.0
    assert m2.f(1.5) == 3.0
    assert len(entries(cache)) == 1


def test_key_depends_on_content_and_extra() -> None:
    a, b = source("a"), source("b")
    assert cache_key(a) == cache_key(a)
    assert cache_key(a) != cache_key(b)
    assert cache_key(a, ("float32",)) != cache_key(a, ("float64",))


def build_in_subprocess(src: str, cache: Path, tmp_path: Path) -> None:
    """Build (and publish) in another process, so this one never maps the module file."""
    src_file = tmp_path / f"{uuid.uuid4().hex}.pyx"
    src_file.write_text(src)
    env = {**os.environ, "SYMGATE_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", WORKER, str(src_file)], env=env, check=True, capture_output=True, timeout=300)


def test_corrupt_entry_is_rebuilt(cache: Path, tmp_path: Path) -> None:
    src = source(uuid.uuid4().hex)
    build_in_subprocess(src, cache, tmp_path)  # truncating a module mapped by this process would crash it
    (entry,) = entries(cache)
    so = next(entry.glob("*.so"))
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])  # truncated artifact
    m = build_module(src)
    assert m.f(2.0) == 4.0
    assert _build._valid_entry(entry, _build._module_name(entry.name)) is not None


def test_missing_manifest_is_a_miss(cache: Path) -> None:
    src = source(uuid.uuid4().hex)
    build_module(src)
    (entry,) = entries(cache)
    (entry / "manifest.json").unlink()
    _build._LOADED.clear()
    assert build_module(src).f(1.0) == 2.0
    assert (entry / "manifest.json").exists()


def test_unwritable_cache_falls_back_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(_build, "_LOADED", {})
    monkeypatch.setattr(_build, "_FALLBACK", None)
    with pytest.warns(SymgateWarning, match="not writable"):
        m = build_module(source(uuid.uuid4().hex))
    assert m.f(1.0) == 2.0
    assert _build._FALLBACK is not None and _build._FALLBACK.is_dir()


def test_compile_error_carries_command_log_and_sources(cache: Path) -> None:
    with pytest.raises(BuildError) as info:
        build_module(source(uuid.uuid4().hex, body="return undefined_name +* 2"))
    err = info.value
    assert "cython" in " ".join(err.command)
    assert err.log.strip()
    assert err.sources.is_dir() and any(err.sources.glob("*.pyx"))
    assert not entries(cache)  # nothing published




@pytest.mark.slow
def test_eight_processes_build_once(cache: Path, tmp_path: Path) -> None:
    src_file = tmp_path / "src.pyx"
    src_file.write_text(source(uuid.uuid4().hex))
    env = {**os.environ, "SYMGATE_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(src_file)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all(o[0].strip() == "ok" for o in outs)
    assert len(entries(cache)) == 1  # exactly one published artifact
    assert not list(cache.glob(".build-*"))  # no leftover build directories


@pytest.mark.slow
def test_killed_build_does_not_poison_the_cache(cache: Path, tmp_path: Path) -> None:
    src_file = tmp_path / "src.pyx"
    src_file.write_text(source(uuid.uuid4().hex))
    env = {**os.environ, "SYMGATE_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(src_file)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(cache.glob(".build-*")) and time.time() < deadline:  # wait until it is mid-build
        time.sleep(0.01)
    assert list(cache.glob(".build-*")), "the worker never started building"
    os.killpg(p.pid, signal.SIGKILL)  # the worker and its cython/cc children
    p.wait()
    assert not entries(cache)  # nothing half-written was published
    m = build_module(src_file.read_text())  # the next call succeeds (the dead worker's lock is gone)
    assert m.f(2.0) == 4.0
    assert len(entries(cache)) == 1


KERNEL_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import symgate as sg

    @sg.cell
    def fresh(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"), k: sg.Constant(float(sys.argv[1]))):
        return (1 - k) * h + k * sg.tanh(W @ h + U @ x)

    kern = sg.compile(fresh, "float64")
    assert kern.origin == "cache"
    rng = np.random.default_rng(0)
    p = {"W": 0.5 * rng.standard_normal((3, 3)), "U": rng.standard_normal((3, 2))}
    x = rng.standard_normal((4, 2, 2))
    ok = np.allclose(kern.forward(p, x).h, sg.reference_kernel(fresh).forward(p, x).h, rtol=0, atol=1e-14)
    print("ok" if ok else "mismatch", flush=True)
""")


@pytest.mark.slow
def test_eight_processes_compile_the_same_new_kernel(cache: Path, tmp_path: Path) -> None:
    """8 processes ask for the same never-seen cell's kernel at once: one build, eight working kernels."""
    token = str(0.25 + 0.5 * (uuid.uuid4().int % 10**6) / 10**6)  # a new constant: a new content hash
    env = {**os.environ, "SYMGATE_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", KERNEL_WORKER, token], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == ["ok"] * 8
    assert len(entries(cache)) == 1
    assert not list(cache.glob(".build-*"))
