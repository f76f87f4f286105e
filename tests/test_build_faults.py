"""The kernel cache under threads, faults and hostile state: the hostile-input catalogue of ``_build``.

Each test is one case, marked ``hostile("error")`` (ends in a clear SymgateError: the
exact class and a message fragment are checked) or ``hostile("result")`` (ends with a
working module).  Modules are tiny (``def f(): return 42`` plus a unique comment).

Speed: cases that only need *a* module to be (re)built use ``copy_compile``, which
replaces ``_build._compile`` by a copy of a module compiled once per test module (in a
subprocess, from the same source, so the copy is a genuine artifact of the same key);
cases about the build itself (threads, relative paths, compiler steps, kills) compile
for real.  Real mounts (tmpfs, read-only bind mounts) are used where this machine
permits them (we run as root, where ``chmod`` does not stop writes); such cases are
skipped, with the reason, where ``mount`` is not permitted.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.machinery
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from symgate import _build
from symgate._build import BuildError, CompilerNotFoundError, SymgateWarning, build_module, cache_key

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def source(value: int = 42, token: str | None = None) -> str:
    """A tiny module; the token (random by default) makes a new content hash."""
    return f"# token {token or uuid.uuid4().hex}\ndef f():\n    return {value}\n"


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*"))


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob(".build-*")) + sorted(root.glob(".trash-*"))


def subprocess_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "SYMGATE_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


@contextmanager
def no_hang(seconds: int = 30) -> Iterator[None]:
    """Fail (instead of blocking the suite forever) if the body blocks for ``seconds``."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mount(*args: str) -> str | None:
    """Run ``mount`` with ``args``; None on success, else why it is not permitted here."""
    try:
        r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount cannot run here: {exc}"
    return None if r.returncode == 0 else f"mount {' '.join(args)} is not permitted here: {r.stderr.strip()}"


def umount(path: Path) -> None:
    """Detach the mount at ``path`` (lazily: a module loaded from it stays mapped in this process)."""
    r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"umount -l {path}: {r.stderr}"


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root and fresh per-process state of ``_build``."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(root))
    monkeypatch.delenv("SYMGATE_LOCK_TIMEOUT", raising=False)
    monkeypatch.setattr(_build, "_LOADED", {})
    monkeypatch.setattr(_build, "_KEY_LOCKS", {})
    monkeypatch.setattr(_build, "_FALLBACK", None)
    return root


PREBUILD = textwrap.dedent("""
    import json, os, sys
    from symgate import _build
    src_a, src_b, other_root = open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3]
    key_a, key_b = _build.cache_key(src_a), _build.cache_key(src_b)
    out = {"key_a": key_a, "key_b": key_b}
    for name, src, key in (("a", src_a, key_a), ("b", src_b, key_b)):
        _build.build_module(src)
        out[name] = str(_build._valid_entry(_build._entry(_build.cache_root(), key), _build._module_name(key)))
    # b's source compiled under a's module name (b's key inside): a foreign artifact that imports as a
    os.environ["SYMGATE_CACHE_DIR"] = other_root
    mod_a = _build._module_name(key_a)
    _build._module_name = lambda key: mod_a
    _build._LOADED.clear()
    _build.build_module(src_b)
    out["b_as_a"] = str(_build._valid_entry(_build._entry(_build.cache_root(), key_b), mod_a))
    print(json.dumps(out))
""")


class Prebuilt:
    """Modules compiled once, in another process (this one never maps them): a (42), b (7), b as a."""

    def __init__(self, base: Path) -> None:
        self.src_a, self.src_b = source(42, "prebuilt-a-" + uuid.uuid4().hex), source(7, "prebuilt-b-" + uuid.uuid4().hex)
        (base / "a.pyx").write_text(self.src_a)
        (base / "b.pyx").write_text(self.src_b)
        r = subprocess.run([sys.executable, "-c", PREBUILD, str(base / "a.pyx"), str(base / "b.pyx"), str(base / "other")],
                           env=subprocess_env(base / "cache"), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        self.key_a, self.key_b = out["key_a"], out["key_b"]
        self.so_a, self.so_b, self.so_b_as_a = Path(out["a"]), Path(out["b"]), Path(out["b_as_a"])
        assert cache_key(self.src_a) == self.key_a, "this process computes another key than the subprocess"
        self.by_key = {self.key_a: self.so_a, self.key_b: self.so_b}


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory: pytest.TempPathFactory) -> Prebuilt:
    return Prebuilt(tmp_path_factory.mktemp("prebuilt"))


@pytest.fixture()
def copy_compile(monkeypatch: pytest.MonkeyPatch, prebuilt: Prebuilt) -> list[str]:
    """Make every build copy the prebuilt module of its key (a fresh file); returns the keys built."""
    built: list[str] = []

    def fake(src: str, key: str, work: Path, include_dirs: Any, root: Path) -> Path:
        built.append(key)
        so = work / f"{_build._module_name(key)}.{secrets.token_hex(8)}{SUFFIX}"
        shutil.copyfile(prebuilt.by_key[key], so)
        return so

    monkeypatch.setattr(_build, "_compile", fake)
    return built


def plant(root: Path, key: str, data: bytes, **meta: Any) -> Path:
    """An entry of ``key`` holding ``data`` as its module, with a matching manifest (fields overridable)."""
    modname = _build._module_name(key)
    entry = root / key[:2] / key
    entry.mkdir(parents=True)
    name = f"{modname}.{'0' * 16}{SUFFIX}"
    (entry / name).write_bytes(data)
    manifest = {"key": key, "module": modname, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data), "symgate": "0.1.0", **meta}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


def assert_healed(cache: Path, key: str, built: list[str], value: int = 42) -> None:
    """The module works, was built exactly once, and its entry is now valid."""
    assert built == [key]
    assert _build._valid_entry(cache / key[:2] / key, _build._module_name(key)) is not None
    assert len(entries(cache)) == 1
    assert not leftovers(cache)


# --- threads and processes ---------------------------------------------------------------------------

def build_in_threads(src: str, n: int = 4) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = []

    def work() -> None:
        barrier.wait()
        try:
            results.append(build_module(src))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@pytest.mark.hostile("result")
def test_four_threads_compile_the_same_new_source(cache: Path) -> None:
    for _ in range(3):
        src = source()
        results = build_in_threads(src)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert len(results) == 4 and len({id(m) for m in results}) == 1
        assert results[0].f() == 42
    assert len(entries(cache)) == 3
    _build._LOADED.clear()  # four threads loading one published entry at once
    results = build_in_threads(src)
    assert all(not isinstance(r, BaseException) and r.f() == 42 for r in results), results
    assert len(entries(cache)) == 3


THREADS = textwrap.dedent("""
    import sys, threading
    from symgate._build import build_module
    src = open(sys.argv[1]).read()
    barrier, out = threading.Barrier(4), []
    def work():
        barrier.wait()
        try:
            out.append(build_module(src).f())
        except BaseException as exc:
            out.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(out)
""")


@pytest.mark.hostile("result")
def test_four_threads_right_after_import(cache: Path, tmp_path: Path) -> None:
    """In a fresh interpreter (no first-call state of Python's configuration warmed up): one key, one build."""
    (tmp_path / "src.pyx").write_text(source())
    r = subprocess.run([sys.executable, "-c", THREADS, str(tmp_path / "src.pyx")], env=subprocess_env(cache),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[42, 42, 42, 42]"
    assert len(entries(cache)) == 1


WORKER = textwrap.dedent("""
    import sys
    from symgate._build import build_module
    print("ok" if build_module(open(sys.argv[1]).read()).f() == 42 else "wrong", flush=True)
""")


@pytest.mark.slow
@pytest.mark.hostile("result")
def test_sixteen_processes_build_once(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "src.pyx").write_text(source())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "src.pyx")], env=subprocess_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(16)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == ["ok"] * 16
    assert len(entries(cache)) == 1
    assert not leftovers(cache)


KILLER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from symgate import _build
    src, point = open(sys.argv[1]).read(), sys.argv[2]
    real_run = _build._run

    def run(cmd, cwd):
        step = "cython" if "cython" in cmd else ("cc" if "-c" in cmd else "ld")
        if step == point:
            subprocess.Popen(list(cmd), cwd=cwd)  # the step starts ...
            time.sleep(0.3)
            os.killpg(0, signal.SIGKILL)  # ... and the whole build dies, the step with it
        return real_run(cmd, cwd)

    def publish(work, entry):
        os.killpg(0, signal.SIGKILL)  # everything written, nothing published

    _build._run = run
    if point == "publish":
        _build._publish = publish
    _build.build_module(src)
""")


@pytest.mark.slow
@pytest.mark.hostile("result")
@pytest.mark.parametrize("point", ["cython", "cc", "publish"])
def test_killed_build_then_next_build_succeeds_and_sweeps(cache: Path, tmp_path: Path, point: str) -> None:
    src = source()
    (tmp_path / "src.pyx").write_text(src)
    p = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path / "src.pyx"), point], env=subprocess_env(cache),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    assert not entries(cache)  # nothing half-written was published
    (stale,) = cache.glob(".build-*")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert build_module(src).f() == 42  # the dead build's lock is gone
    assert len(entries(cache)) == 1
    assert not stale.exists() and not leftovers(cache)


@pytest.mark.hostile("result")
def test_stale_build_dirs_are_swept_young_ones_kept(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    cache.mkdir()
    old = time.time() - 2 * 3600
    for name in (".build-0123456789ab-old", ".trash-old"):
        (cache / name).mkdir()
        (cache / name / "x.c").write_text("left by a killed build")
        os.utime(cache / name, (old, old))
    (cache / ".build-0123456789ab-young").mkdir()  # another process may be building right now
    assert build_module(prebuilt.src_a).f() == 42
    assert [p.name for p in leftovers(cache)] == [".build-0123456789ab-young"]


# --- hostile entries -------------------------------------------------------------------------------

@pytest.mark.hostile("result")
def test_module_with_flipped_bytes_is_rebuilt(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    data = bytearray(prebuilt.so_a.read_bytes())
    entry = plant(cache, prebuilt.key_a, bytes(data))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    next(entry.glob("*" + SUFFIX)).write_bytes(bytes(data))  # same size, other hash
    assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
def test_truncated_module_is_rebuilt(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    entry = plant(cache, prebuilt.key_a, prebuilt.so_a.read_bytes())
    so = next(entry.glob("*" + SUFFIX))
    os.truncate(so, so.stat().st_size // 3)
    assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
def test_garbage_module_with_matching_manifest_heals(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    entry = plant(cache, prebuilt.key_a, b"\x7fELF" + os.urandom(8192))  # passes the hash check, cannot import
    garbage = next(entry.glob("*" + SUFFIX))
    assert build_module(prebuilt.src_a).f() == 42
    assert not garbage.exists()
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("error")
def test_rebuilt_module_that_still_does_not_import(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def garbage_compile(src: str, key: str, work: Path, include_dirs: Any, root: Path) -> Path:
        so = work / f"{_build._module_name(key)}.{secrets.token_hex(8)}{SUFFIX}"
        so.write_bytes(b"not a shared object")
        return so

    monkeypatch.setattr(_build, "_compile", garbage_compile)
    with pytest.raises(BuildError) as info:
        build_module(source())
    assert type(info.value) is BuildError
    assert "does not load either" in str(info.value) and "ImportError" in str(info.value)
    assert str(next(iter(entries(cache)))) in str(info.value)  # names the rebuilt module


@pytest.mark.hostile("result")
def test_foreign_module_under_a_matching_manifest(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    """Another source's module (another module name inside) placed in the entry: it does not import; rebuilt."""
    plant(cache, prebuilt.key_a, prebuilt.so_b.read_bytes())
    m = build_module(prebuilt.src_a)
    assert m.f() == 42 and m.__symgate_key__ == prebuilt.key_a
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
def test_foreign_module_with_the_same_module_name(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    """A module that imports under this name but was built for another key (its marker says so): rebuilt."""
    plant(cache, prebuilt.key_a, prebuilt.so_b_as_a.read_bytes())
    m = build_module(prebuilt.src_a)
    assert m.f() == 42 and m.__symgate_key__ == prebuilt.key_a
    assert sys.modules[_build._module_name(prebuilt.key_a)] is m
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
def test_manifest_is_a_fifo(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    entry = plant(cache, prebuilt.key_a, prebuilt.so_a.read_bytes())
    (entry / "manifest.json").unlink()
    os.mkfifo(entry / "manifest.json")  # reading it would block forever
    with no_hang():
        assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
@pytest.mark.parametrize("size", [0, 4096])
def test_module_is_a_symlink_to_dev_zero(cache: Path, copy_compile: list[str], prebuilt: Prebuilt, size: int) -> None:
    entry = plant(cache, prebuilt.key_a, b"", size=size, sha256=hashlib.sha256(bytes(size)).hexdigest())
    so = next(entry.glob("*" + SUFFIX))
    so.unlink()
    so.symlink_to("/dev/zero")  # endless zeros: hashing it would never end
    with no_hang():
        assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
@pytest.mark.parametrize("kind", ["padded", "sparse"])
def test_huge_manifest(cache: Path, copy_compile: list[str], prebuilt: Prebuilt, kind: str) -> None:
    entry = plant(cache, prebuilt.key_a, prebuilt.so_a.read_bytes())
    man = entry / "manifest.json"
    if kind == "padded":  # valid JSON, right fields, 128 KiB
        meta = json.loads(man.read_text())
        man.write_text(json.dumps({**meta, "pad": "x" * 128 * 1024}))
    else:  # a 1 TiB sparse file: reading it whole would exhaust memory
        os.truncate(man, 1 << 40)
    with no_hang():
        assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


BAD_MANIFESTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "binary": lambda m: b"\x00\xff\xfe not json {",
    "deep nesting": lambda m: b"[" * 60000,
    "a list": lambda m: json.dumps([m]).encode(),
    "another key": lambda m: json.dumps({**m, "key": "0" * 64}).encode(),
    "path outside the entry": lambda m: json.dumps({**m, "file": "../../" + m["file"]}).encode(),
    "size as text": lambda m: json.dumps({**m, "size": str(m["size"])}).encode(),
    "size true": lambda m: json.dumps({**m, "size": True}).encode(),
    "empty": lambda m: b"",
}


@pytest.mark.hostile("result")
@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_malformed_manifest(cache: Path, copy_compile: list[str], prebuilt: Prebuilt, kind: str) -> None:
    entry = plant(cache, prebuilt.key_a, prebuilt.so_a.read_bytes())
    man = entry / "manifest.json"
    man.write_bytes(BAD_MANIFESTS[kind](json.loads(man.read_text())))
    assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, prebuilt.key_a, copy_compile)


@pytest.mark.hostile("result")
def test_entry_is_a_regular_file(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    key = prebuilt.key_a
    (cache / key[:2]).mkdir(parents=True)
    (cache / key[:2] / key).write_text("not a directory")
    assert build_module(prebuilt.src_a).f() == 42
    assert_healed(cache, key, copy_compile)


@pytest.mark.hostile("error")
def test_lock_file_is_a_directory(cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    lock = cache / "locks" / f"{prebuilt.key_a}.lock"
    lock.mkdir(parents=True)
    with pytest.raises(BuildError) as info:
        build_module(prebuilt.src_a)
    assert type(info.value) is BuildError
    assert "cannot build the kernel in the cache at" in str(info.value) and str(lock) in str(info.value)
    assert not copy_compile


# --- read-only caches and the fallback ---------------------------------------------------------------

@pytest.mark.hostile("result")
def test_read_only_populated_cache_is_used(cache: Path, monkeypatch: pytest.MonkeyPatch, prebuilt: Prebuilt) -> None:
    """A populated cache that cannot be written: loaded as it is, no fallback, no warning, no build.

    Tests run as root, where chmod does not stop writes: the writability probe is made to
    fail instead (the next test uses a real read-only bind mount).
    """
    plant(cache, prebuilt.key_a, prebuilt.so_a.read_bytes())

    def read_only(root: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(root))

    def no_build(*args: Any) -> Path:
        raise AssertionError("a build was attempted")

    monkeypatch.setattr(_build, "_probe_writable", read_only)
    monkeypatch.setattr(_build, "_compile", no_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_module(prebuilt.src_a).f() == 42
    assert _build._FALLBACK is None


@pytest.mark.hostile("result")
def test_read_only_bind_mount_populated_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      prebuilt: Prebuilt, cache: Path) -> None:
    populated, ro = tmp_path / "populated", tmp_path / "ro"
    plant(populated, prebuilt.key_a, prebuilt.so_a.read_bytes())
    ro.mkdir()
    why = mount("--bind", str(populated), str(ro))
    if why is not None:
        pytest.skip(why)
    try:
        why = mount("-o", "remount,bind,ro", str(ro))
        if why is not None:
            pytest.skip(why)
        with pytest.raises(OSError):
            (ro / "probe").write_text("")  # really read-only, even for root
        monkeypatch.setenv("SYMGATE_CACHE_DIR", str(ro))
        monkeypatch.setattr(_build, "_compile", lambda *a: pytest.fail("a build was attempted"))
        assert build_module(prebuilt.src_a).f() == 42
        assert _build._FALLBACK is None
    finally:
        umount(ro)


@pytest.mark.hostile("result")
def test_unwritable_empty_cache_falls_back_and_looks_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           cache: Path, copy_compile: list[str], prebuilt: Prebuilt) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache's parent directory should be")  # unwritable even for root
    monkeypatch.setenv("SYMGATE_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(SymgateWarning, match="not writable.*removed at exit"):
        assert build_module(prebuilt.src_a).f() == 42
    fallback = _build._FALLBACK
    assert fallback is not None and len(entries(fallback)) == 1
    _build._LOADED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_module(prebuilt.src_a).f() == 42  # found in the fallback: no new build, no new warning
    assert copy_compile == [prebuilt.key_a]


FALLBACK = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    from symgate import _build
    src = Path(sys.argv[1]).read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _build.build_module(src).f() == 42
    print(_build._FALLBACK)
    for w in caught:
        print(w.category.__name__, w.message)
""")


@pytest.mark.hostile("result")
def test_fallback_cache_is_removed_at_exit(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "src.pyx").write_text(source())
    r = subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path / "src.pyx")], env=subprocess_env(blocker / "cache"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fallback, *caught = r.stdout.strip().splitlines()
    assert Path(fallback).name.startswith("symgate-kernels-")
    assert len(caught) == 1 and caught[0].startswith("SymgateWarning") and "not writable" in caught[0], caught
    assert not Path(fallback).exists()


# --- full disks and other write errors -------------------------------------------------------------

SPACE_LOG = "OSError: [Errno 28] No space left on device\n"


def inject_enospc(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the build run out of space at ``point``."""
    real_mkdtemp, real_write = tempfile.mkdtemp, _build._write_file

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        if str(kwargs.get("prefix", "")).startswith(".build-"):
            raise enospc(kwargs.get("dir"))
        return real_mkdtemp(*args, **kwargs)

    def write(path: Path, text: str) -> None:
        if (point == "pyx" and path.suffix == ".pyx") or (point == "manifest" and path.name == "manifest.json"):
            raise enospc(path)
        real_write(path, text)

    def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        step = "cython" if "cython" in cmd else ("cc" if "-c" in cmd else "ld")
        if step == point:
            return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: {SPACE_LOG}")
        return subprocess.CompletedProcess(cmd, 0, "", "")  # pretend the earlier steps worked

    def publish(work: Path, entry: Path) -> None:
        raise enospc(entry)

    if point == "mkdtemp":
        monkeypatch.setattr(_build.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(_build, "_write_file", write)
    if point in ("cython", "cc", "ld"):
        monkeypatch.setattr(_build, "_run", run)
    if point == "publish":
        monkeypatch.setattr(_build, "_publish", publish)


@pytest.mark.hostile("error")
@pytest.mark.parametrize("point", ["mkdtemp", "pyx", "cython", "cc", "ld", "manifest", "publish"])
def test_full_disk_injected(cache: Path, monkeypatch: pytest.MonkeyPatch, prebuilt: Prebuilt, point: str) -> None:
    if point in ("manifest", "publish"):  # after the compile: copy the prebuilt module instead of compiling
        monkeypatch.setattr(_build, "_compile", lambda src, key, work, inc, root: Path(
            shutil.copyfile(prebuilt.so_a, work / f"{_build._module_name(key)}.{secrets.token_hex(8)}{SUFFIX}")))
    inject_enospc(point, monkeypatch)
    with pytest.raises(BuildError) as info:
        build_module(prebuilt.src_a)
    assert type(info.value) is BuildError and not isinstance(info.value, OSError)
    assert f"no space left on device at {cache}" in str(info.value)
    assert not entries(cache) and not leftovers(cache)
    assert not (cache / "failed").exists()  # no room to keep sources in


@pytest.mark.hostile("error")
@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_other_write_error_names_the_path(cache: Path, copy_compile: list[str], prebuilt: Prebuilt,
                                          monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    real_write = _build._write_file

    def write(path: Path, text: str) -> None:
        if path.name == "manifest.json":
            raise OSError(err, os.strerror(err), str(path))
        real_write(path, text)

    monkeypatch.setattr(_build, "_write_file", write)
    with pytest.raises(BuildError) as info:
        build_module(prebuilt.src_a)
    assert type(info.value) is BuildError and not isinstance(info.value, OSError)
    msg = str(info.value)
    assert f"cannot build the kernel in the cache at {cache}: {os.strerror(err)}" in msg and "manifest.json" in msg
    assert not entries(cache) and not leftovers(cache)


@pytest.mark.slow
@pytest.mark.hostile("error")
def test_full_disk_real_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    why = mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small))
    if why is not None:
        pytest.skip(why)
    try:
        monkeypatch.setenv("SYMGATE_CACHE_DIR", str(small / "cache"))
        with pytest.raises(BuildError) as info:
            build_module(source())  # Cython's C file alone is larger than 64 KiB
        assert type(info.value) is BuildError
        assert f"no space left on device at {small / 'cache'}" in str(info.value)
        assert not entries(small / "cache") and not leftovers(small / "cache")
    finally:
        umount(small)


# --- paths, locks, settings, compilers -------------------------------------------------------------

@pytest.mark.hostile("result")
def test_relative_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYMGATE_CACHE_DIR", "relcache")
    assert _build.cache_root() == tmp_path / "relcache"
    assert build_module(source()).f() == 42  # Cython and the compiler run in the build directory
    assert len(entries(tmp_path / "relcache")) == 1


HOLDER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from symgate import _build
    with _build._file_lock(Path(sys.argv[1]), 5):
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
""")


@pytest.mark.hostile("error")
def test_stopped_lock_holder_times_out_naming_it(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = source()
    lock = cache / "locks" / f"{cache_key(src)}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], env=subprocess_env(cache),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SYMGATE_LOCK_TIMEOUT", "3")
        monkeypatch.setattr(_build, "LOCK_NOTICE_AFTER", 1.0)
        t = time.monotonic()
        with pytest.raises(BuildError) as info:
            build_module(src)
        waited = time.monotonic() - t
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert 2.9 <= waited < 5
    assert type(info.value) is BuildError
    msg = str(info.value)
    assert f"timed out after 3 s waiting for the kernel cache lock {lock}, held by pid {holder.pid} (stopped) on " in msg
    err = capsys.readouterr().err
    assert err.count("symgate: waiting for the kernel cache lock") == 1 and f"held by pid {holder.pid}" in err
    assert not entries(cache)


@pytest.mark.hostile("error")
@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf", "1e400", "10s"])
def test_bad_lock_timeout(cache: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SYMGATE_LOCK_TIMEOUT", value)
    with pytest.raises(BuildError, match=f"SYMGATE_LOCK_TIMEOUT must be a positive, finite number of seconds, got {value!r}"):
        build_module(source())
    assert not cache.exists()


@pytest.mark.hostile("error")
def test_missing_compiler(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(CompilerNotFoundError) as info:
        build_module(source())
    assert isinstance(info.value, BuildError)
    assert "no C compiler found (looked for '/nonexistent/cc', from $CC); install gcc or set CC" in str(info.value)
    assert not entries(cache) and not leftovers(cache)


@pytest.mark.hostile("error")
def test_compiler_vanishing_during_the_build(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = _build._run

    def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        if "-c" in cmd:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd[0])
        return real_run(cmd, cwd)

    monkeypatch.setattr(_build, "_run", run)
    with pytest.raises(CompilerNotFoundError, match="no C compiler found"):
        build_module(source())
    assert not entries(cache) and not leftovers(cache)


@pytest.mark.hostile("error")
def test_failed_builds_do_not_accumulate(cache: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("symgate-failed-*"))
    src = source().replace("return 42", "return undefined_name +* 2")
    for _ in range(2):
        with pytest.raises(BuildError) as info:
            build_module(src)
        assert type(info.value) is BuildError
        assert str(info.value).startswith("Cython could not translate the generated kernel")
        assert info.value.sources == cache / "failed" / _build._module_name(cache_key(src))
        assert f"sources kept in: {info.value.sources}" in str(info.value)
    assert [p.name for p in (cache / "failed").iterdir()] == [info.value.sources.name]
    assert sorted(p.name for p in info.value.sources.iterdir() if p.suffix in (".pyx", ".log")) == sorted([
        "build.log", info.value.sources.name + ".pyx"])
    assert set(Path(tempfile.gettempdir()).glob("symgate-failed-*")) == before
    assert not entries(cache) and not leftovers(cache)
