"""Compile Cython sources into extension modules, cached on disk by content.

The cache is content-addressed: the key hashes the source, symgate's version, Cython's
version, the compiler command and flags, the NumPy C-API version, the Python ABI tag,
the platform and any extra parts (the kernel's dtype).  An entry is a directory
``<root>/<key[:2]>/<key>/`` holding the module and ``manifest.json`` (the module's
SHA-256 and size).

Concurrency and failure safety:

* a build happens in a private temporary directory on the same filesystem and is
  published with one atomic ``os.rename``; readers take no lock and never see a
  half-written entry;
* a per-key file lock (``fcntl.flock``, released by the kernel if the process dies)
  only avoids duplicate work; whoever gets it re-checks the cache first;
* a missing, truncated or corrupt entry (module hash differs from the manifest) is a
  cache miss: it is moved aside and rebuilt;
* a cache directory that cannot be written falls back to a private temporary one,
  with a :class:`SymgateWarning`;
* a failed compile raises :class:`BuildError` with the command, the full log and the
  path of the kept sources.

The root is ``$SYMGATE_CACHE_DIR`` if set, else the user cache directory
(``platformdirs.user_cache_dir("symgate")``) + ``/kernels``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

from ._errors import SymgateError

__all__ = ["BuildError", "SymgateWarning", "cache_root", "cache_key", "build_module", "CFLAGS"]

#: Compiler flags for generated kernels (part of the cache key, with the CPU's identity).
#: ``-ffast-math`` lets gcc vectorise tanh/exp through glibc's libmvec; it is used to
#: *compile* only: the module is linked without it, so no crtfastmath.o sets
#: flush-to-zero for the whole process.  The kernels' stable primitives use no
#: infinities or NaNs, so fast-math's assumptions hold for finite inputs.
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-fno-strict-aliasing",
                           "-Wno-unused-function", "-Wno-unreachable-code")
LDFLAGS: tuple[str, ...] = ("-shared",)


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()

_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.Lock()
_FALLBACK: Path | None = None


class BuildError(SymgateError, RuntimeError):
    """Compiling a generated kernel failed; carries the command, its log and the kept sources."""

    def __init__(self, message: str, *, command: Sequence[str], log: str, sources: Path) -> None:
        super().__init__(f"{message}\ncommand: {' '.join(command)}\nsources kept in: {sources}\n--- log ---\n{log}")
        self.command = list(command)
        self.log = log
        self.sources = sources


class SymgateWarning(UserWarning):
    """A recoverable problem symgate worked around (e.g. an unwritable cache directory)."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("symgate")
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def cache_root() -> Path:
    """The cache directory (not created)."""
    env = os.environ.get("SYMGATE_CACHE_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("symgate")) / "kernels"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "symgate" / "kernels"


def cache_key(source: str, extra: Sequence[str] = ()) -> str:
    """The content hash identifying a compiled module (see the module docstring)."""
    import Cython
    import numpy

    parts = [
        "symgate-kernel-v1",
        source,
        _version(),
        Cython.__version__,
        " ".join(_compiler()),
        " ".join(CFLAGS),
        " ".join(LDFLAGS),
        _cpu_identity(),
        numpy.__version__,
        sysconfig.get_config_var("SOABI") or "",
        sys.implementation.cache_tag or "",
        platform.platform(),
        platform.machine(),
        *extra,
    ]
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_name(key: str) -> str:
    return f"_sgk_{key[:24]}"


def _ext_suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def _valid_entry(entry: Path, modname: str) -> Path | None:
    """The module file of a complete, intact entry, or None."""
    so = entry / (modname + _ext_suffix())
    man = entry / "manifest.json"
    try:
        meta = json.loads(man.read_text())
        if so.stat().st_size != meta["size"] or _sha256(so) != meta["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return so


def _writable_root() -> Path:
    """The cache root, created; a private temporary directory (with a warning) if unwritable."""
    global _FALLBACK
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True)
        probe.close()
        return root
    except OSError as exc:
        if _FALLBACK is None:
            _FALLBACK = Path(tempfile.mkdtemp(prefix="symgate-kernels-"))
            warnings.warn(
                f"symgate kernel cache {str(root)!r} is not writable ({exc.strerror or exc}); "
                f"using a private temporary cache {str(_FALLBACK)!r} for this process (set SYMGATE_CACHE_DIR)",
                SymgateWarning,
                stacklevel=3,
            )
        return _FALLBACK


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load(so: Path, modname: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(modname, so)
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        raise SymgateError(f"cannot load compiled module {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(source: str, modname: str, workdir: Path, include_dirs: Sequence[str]) -> Path:
    pyx = workdir / f"{modname}.pyx"
    pyx.write_text(source)
    c_file = workdir / f"{modname}.c"
    cy_cmd = [sys.executable, "-m", "cython", "-3", "--fast-fail", str(pyx), "-o", str(c_file)]
    for inc in include_dirs:
        cy_cmd[4:4] = ["-I", inc]
    r = subprocess.run(cy_cmd, capture_output=True, text=True, cwd=workdir)
    if r.returncode != 0:
        keep = Path(tempfile.mkdtemp(prefix=f"symgate-failed-{modname}-"))
        shutil.copy(pyx, keep)
        raise BuildError("Cython could not translate the generated kernel", command=cy_cmd,
                         log=r.stdout + r.stderr, sources=keep)
    so = workdir / (modname + _ext_suffix())
    obj = workdir / f"{modname}.o"
    cc_cmd = [*_compiler(), "-c", *CFLAGS, f"-I{sysconfig.get_paths()['include']}",
              *[f"-I{d}" for d in include_dirs], str(c_file), "-o", str(obj)]
    ld_cmd = [*_compiler(), *LDFLAGS, str(obj), "-o", str(so), "-lm"]
    for cmd in (cc_cmd, ld_cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        if r.returncode != 0:
            keep = Path(tempfile.mkdtemp(prefix=f"symgate-failed-{modname}-"))
            for f in (pyx, c_file):
                if f.exists():
                    shutil.copy(f, keep)
            raise BuildError("the C compiler failed on the generated kernel", command=cmd,
                             log=r.stdout + r.stderr, sources=keep)
    return so


def build_module(source: str, *, extra: Sequence[str] = (), include_dirs: Sequence[str] = ()) -> ModuleType:
    """Compile (or load from the cache) the Cython module with this source; returns the module.

    Safe to call from several processes at once: one builds, the others wait for its
    per-key lock and then load the published entry.
    """
    key = cache_key(source, tuple(extra) + tuple(include_dirs))
    modname = _module_name(key)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
    root = _writable_root()
    entry = root / key[:2] / key
    so = _valid_entry(entry, modname)
    if so is None:
        with _file_lock(root / "locks" / f"{key}.lock"):
            so = _valid_entry(entry, modname)  # published while we waited?
            if so is None:
                if entry.exists():  # truncated or corrupt: move aside, then rebuild
                    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
                    os.rename(entry, trash / "entry")
                    shutil.rmtree(trash, ignore_errors=True)
                entry.parent.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
                try:
                    built = _compile(source, modname, work, include_dirs)
                    for f in list(work.iterdir()):
                        if f != built and f.name != f"{modname}.pyx":
                            f.unlink()
                    meta = {"sha256": _sha256(built), "size": built.stat().st_size, "module": modname,
                            "symgate": _version(), "key": key}
                    (work / "manifest.json").write_text(json.dumps(meta, indent=1))
                    for f in work.iterdir():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                    os.rename(work, entry)  # atomic publish
                finally:
                    if work.exists():
                        shutil.rmtree(work, ignore_errors=True)
                so = _valid_entry(entry, modname)
                if so is None:  # pragma: no cover - defensive
                    raise SymgateError(f"kernel cache entry {entry} is not valid right after publishing")
    module = _load(so, modname)
    with _LOCK:
        _LOADED.setdefault(key, module)
        return _LOADED[key]
