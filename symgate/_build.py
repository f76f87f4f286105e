"""Compile Cython sources into extension modules, cached on disk by content.

The cache is content-addressed: the key hashes the source, symgate's version, Cython's
version, the compiler command and flags, the NumPy C-API version, the Python ABI tag,
the platform and any extra parts (the kernel's dtype).  An entry is a directory
``<root>/<key[:2]>/<key>/`` holding the module ``<name>.<build id><ext suffix>``, its
``.pyx`` source and ``manifest.json`` (the key, the module's name, its file name,
SHA-256 and size).  The module itself carries its key (``__symgate_key__``).

The root is ``$SYMGATE_CACHE_DIR`` if set (a relative path is resolved against the
current directory at each lookup), else the user cache directory
(``platformdirs.user_cache_dir("symgate")``) + ``/kernels``.

Lookup comes before any write:

* the root is searched first, then this process's private fallback (if it has one); a
  valid entry is loaded without writing anything, so a populated read-only (site)
  cache is used as it is;
* only when a build is needed is a writable root chosen: the root, created; if it
  cannot be written, a private temporary directory ``symgate-kernels-*`` (with a
  :class:`SymgateWarning`), removed when the process exits.

An entry is valid only if ``manifest.json`` is a regular file (after following
symlinks) of at most :data:`MANIFEST_MAX_BYTES` naming this key and module, and the
module is a regular file of at most :data:`MODULE_MAX_BYTES` with the recorded size
and SHA-256.  Files are opened non-blocking and read up to their bound only, so a
FIFO, a device or a huge file in the cache can neither hang nor exhaust memory.
Anything else (missing, truncated, corrupt, foreign) is a miss: the entry is moved
aside and rebuilt.  An entry that passes these checks but does not import, or
carries another key, is moved aside and rebuilt once; if the rebuilt module fails
too, :class:`BuildError` names it.

Concurrency:

* threads: one in-process lock per key is held across lookup, build and load, so no
  thread ever sees a half-initialised module;
* processes: a per-key file lock ``<root>/locks/<key>.lock`` (``fcntl.flock``,
  released by the kernel if its holder dies) is taken to build; the holder writes its
  pid, host and start time into it, and whoever gets it re-checks the cache first;
* the wait for that lock is polled: after :data:`LOCK_NOTICE_AFTER` seconds (10) one
  line on stderr says who holds it (a line rather than a warning: under ``-W error``
  a warning would abort a wait that would have succeeded); after
  ``$SYMGATE_LOCK_TIMEOUT`` seconds (default 600; a positive finite number) a
  :class:`BuildError` names the lock, its holder and the timeout;
* a build happens in a private directory ``<root>/.build-*`` on the same filesystem
  and is published with one atomic ``os.rename``; readers take no lock and never see
  a half-written entry.  A ``.build-*`` or ``.trash-*`` directory older than an hour
  (left by a killed build) is removed when a build starts.

Failures are :class:`BuildError` (a :class:`~symgate.SymgateError`), never a raw ``OSError``:

* a failed compile carries the command, the full log and the kept sources, in
  ``<root>/failed/<module name>/`` (replaced by the next failure of the same key, so
  bounded; a private fallback root and its failures go at exit);
* a full disk (``ENOSPC`` anywhere: directories, the source, Cython's output, the
  compiler's, the manifest) says ``no space left on device at <root>``; any other
  ``OSError`` names the path and the reason;
* a missing C compiler is :class:`CompilerNotFoundError`.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

from ._errors import SymgateError

__all__ = ["BuildError", "CompilerNotFoundError", "SymgateWarning", "cache_root", "cache_key", "build_module",
           "lock_timeout", "CFLAGS"]

#: Compiler flags for generated kernels (part of the cache key, with the CPU's identity).
#: ``-ffast-math`` lets gcc vectorise tanh/exp through glibc's libmvec; it is used to
#: *compile* only: the module is linked without it, so no crtfastmath.o sets
#: flush-to-zero for the whole process.  The kernels' stable primitives use no
#: infinities or NaNs, so fast-math's assumptions hold for finite inputs.
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-fno-strict-aliasing",
                           "-Wno-unused-function", "-Wno-unreachable-code")
LDFLAGS: tuple[str, ...] = ("-shared",)

#: the largest ``manifest.json`` read (a real one is about 400 bytes)
MANIFEST_MAX_BYTES = 64 * 1024
#: the largest module file accepted (a generated kernel is a few MiB)
MODULE_MAX_BYTES = 256 * 1024 * 1024
#: seconds to wait for a build lock unless ``$SYMGATE_LOCK_TIMEOUT`` says otherwise
LOCK_TIMEOUT_DEFAULT = 600.0
#: seconds of waiting for a build lock after which one line on stderr says who holds it
LOCK_NOTICE_AFTER = 10.0
#: seconds between two attempts to take a build lock
LOCK_POLL = 0.1
#: a ``.build-*`` / ``.trash-*`` directory older than this (seconds) was left by a killed build
STALE_AFTER = 3600.0

# Python's configuration, read once at import: the first ``sysconfig.get_config_var`` call is not
# thread-safe (concurrent callers may see an empty table, so another compiler and another key)
_CONFIG_CC: str = sysconfig.get_config_vars().get("CC") or ""
_SOABI: str = sysconfig.get_config_var("SOABI") or ""
_PY_INCLUDE: str = sysconfig.get_paths()["include"]

_KEY_VERSION = "symgate-kernel-v2"
_MANIFEST = "manifest.json"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()


_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.Lock()  # guards _KEY_LOCKS and the creation of _FALLBACK
_KEY_LOCKS: dict[str, threading.Lock] = {}
_FALLBACK: Path | None = None
_PRIVATE_DIRS: list[tuple[int, Path]] = []  # (creating pid, directory) removed at exit


def _remove_private_dirs() -> None:
    for pid, path in _PRIVATE_DIRS:
        if pid == os.getpid():  # not in a forked child that exits normally
            shutil.rmtree(path, ignore_errors=True)


atexit.register(_remove_private_dirs)


class BuildError(SymgateError, RuntimeError):
    """Building or loading a generated kernel failed; carries the command, its log and the kept sources."""

    def __init__(self, message: str, *, command: Sequence[str] = (), log: str = "",
                 sources: Path | None = None) -> None:
        text = [message]
        if command:
            text.append(f"command: {' '.join(command)}")
        if sources is not None:
            text.append(f"sources kept in: {sources}")
        if log:
            text.append(f"--- log ---\n{log}")
        super().__init__("\n".join(text))
        self.message = message
        self.command = list(command)
        self.log = log
        self.sources = sources

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_error, (type(self), self.message, self.command, self.log, self.sources))


def _restore_error(cls: type[BuildError], message: str, command: list[str], log: str,
                   sources: Path | None) -> BuildError:
    return cls(message, command=command, log=log, sources=sources)


class CompilerNotFoundError(BuildError):
    """No C compiler could be run (``$CC``, Python's configured compiler, or ``cc``)."""


class SymgateWarning(UserWarning):
    """A recoverable problem symgate worked around (e.g. an unwritable cache directory)."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("symgate")
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or _CONFIG_CC or "cc"
    return cc.split() or ["cc"]


def cache_root() -> Path:
    """The cache directory, absolute (not created)."""
    env = os.environ.get("SYMGATE_CACHE_DIR")
    if env:
        try:
            return Path(os.path.abspath(os.path.expanduser(env)))
        except OSError as exc:  # the current directory was removed
            raise BuildError(f"SYMGATE_CACHE_DIR={env!r} cannot be resolved: {exc.strerror or exc}") from exc
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("symgate")) / "kernels"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "symgate" / "kernels"


def lock_timeout() -> float:
    """Seconds to wait for another process's build: ``$SYMGATE_LOCK_TIMEOUT``, default 600."""
    env = os.environ.get("SYMGATE_LOCK_TIMEOUT", "").strip()
    if not env:
        return LOCK_TIMEOUT_DEFAULT
    try:
        value = float(env)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BuildError(f"SYMGATE_LOCK_TIMEOUT must be a positive, finite number of seconds, got {env!r}")
    return value


def cache_key(source: str, extra: Sequence[str] = ()) -> str:
    """The content hash identifying a compiled module (see the module docstring)."""
    import Cython
    import numpy

    parts = [
        _KEY_VERSION,
        source,
        _version(),
        Cython.__version__,
        " ".join(_compiler()),
        " ".join(CFLAGS),
        " ".join(LDFLAGS),
        _cpu_identity(),
        numpy.__version__,
        _SOABI,
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


def _entry(root: Path, key: str) -> Path:
    return root / key[:2] / key


# --- bounded reading of the cache ---------------------------------------------------------------

def _open_regular(path: Path, limit: int) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file (symlinks followed) of at most ``limit`` bytes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)  # the file may have been swapped since the stat
        if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _read_bounded(fd: int, limit: int, sink: Any = None) -> tuple[int, bytes]:
    """Read at most ``limit + 1`` bytes of ``fd``: (count, the bytes, or b"" when ``sink`` takes them)."""
    count, chunks = 0, []
    try:
        while count <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - count))
            if not chunk:
                break
            count += len(chunk)
            sink.update(chunk) if sink is not None else chunks.append(chunk)
    except OSError:
        return -1, b""
    finally:
        os.close(fd)
    return count, b"".join(chunks)


def _manifest(entry: Path, modname: str) -> dict[str, Any] | None:
    """The entry's manifest if it is well-formed and names this key and module."""
    fd = _open_regular(entry / _MANIFEST, MANIFEST_MAX_BYTES)
    if fd is None:
        return None
    count, raw = _read_bounded(fd, MANIFEST_MAX_BYTES)
    if not 0 < count <= MANIFEST_MAX_BYTES:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != entry.name or meta.get("module") != modname:
        return None
    file, size, digest = meta.get("file"), meta.get("size"), meta.get("sha256")
    if not (isinstance(file, str) and file.startswith(modname + ".") and file.endswith(_ext_suffix())
            and "/" not in file and os.sep not in file and "\0" not in file):
        return None
    if type(size) is not int or not 0 < size <= MODULE_MAX_BYTES or not isinstance(digest, str):
        return None
    return meta


def _valid_entry(entry: Path, modname: str) -> Path | None:
    """The module file of a complete, intact entry, or None."""
    meta = _manifest(entry, modname)
    if meta is None:
        return None
    so = entry / meta["file"]
    fd = _open_regular(so, MODULE_MAX_BYTES)
    if fd is None:
        return None
    h = hashlib.sha256()
    count, _ = _read_bounded(fd, meta["size"], h)
    return so if count == meta["size"] and h.hexdigest() == meta["sha256"] else None


def _find(key: str, modname: str) -> Path | None:
    """A valid entry's module in the root or, if this process has one, the private fallback."""
    roots = [cache_root()]
    if _FALLBACK is not None and _FALLBACK not in roots:
        roots.append(_FALLBACK)
    for root in roots:
        so = _valid_entry(_entry(root, key), modname)
        if so is not None:
            return so
    return None


# --- where to write, and errors while writing ------------------------------------------------------

def _probe_writable(root: Path) -> None:
    """Create the root and a file in it; raises OSError if it cannot be written."""
    root.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True)
    probe.close()


def _writable_root() -> Path:
    """The cache root, created; a private temporary directory (with a warning) if unwritable."""
    global _FALLBACK
    root = cache_root()
    try:
        _probe_writable(root)
        return root
    except OSError as exc:
        reason = exc.strerror or str(exc)
    with _LOCK:
        if _FALLBACK is None:
            with _os_errors(Path(tempfile.gettempdir())):
                _FALLBACK = Path(tempfile.mkdtemp(prefix="symgate-kernels-"))
            _PRIVATE_DIRS.append((os.getpid(), _FALLBACK))
            warnings.warn(
                f"symgate kernel cache {str(root)!r} is not writable ({reason}); using a private temporary "
                f"cache {str(_FALLBACK)!r} for this process, removed at exit (set SYMGATE_CACHE_DIR)",
                SymgateWarning,
                stacklevel=5,
            )
        return _FALLBACK


def _os_build_error(exc: OSError, root: Path) -> BuildError:
    where = exc.filename if exc.filename is not None else root
    if exc.errno == errno.ENOSPC:
        return BuildError(f"no space left on device at {root} (while writing {where}); free some space "
                          "or point SYMGATE_CACHE_DIR to another filesystem")
    if exc.errno == errno.EDQUOT:
        return BuildError(f"disk quota exceeded at {root} (while writing {where}); free some space "
                          "or point SYMGATE_CACHE_DIR to another filesystem")
    return BuildError(f"cannot build the kernel in the cache at {root}: {exc.strerror or exc} ({where}); "
                      "check its permissions or point SYMGATE_CACHE_DIR elsewhere")


@contextmanager
def _os_errors(root: Path) -> Iterator[None]:
    """Turn an OSError into a BuildError naming the path (``no space left ...`` for ENOSPC)."""
    try:
        yield
    except OSError as exc:
        raise _os_build_error(exc, root) from exc


def _out_of_space(log: str, path: Path) -> bool:
    """Whether a failed step's log or the filesystem of ``path`` says the disk is full."""
    if "No space left on device" in log:
        return True
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_blocks > 0 and st.f_bavail * st.f_frsize < 4096


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _discard(path: Path, root: Path) -> None:
    """Move ``path`` (an entry, a file, a link) aside within ``root`` and delete it."""
    if not os.path.lexists(path):
        return
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
    os.rename(path, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _sweep_stale(root: Path) -> None:
    """Remove build and trash directories older than STALE_AFTER (left by killed processes)."""
    now = time.time()
    for pattern in (".build-*", ".trash-*"):
        for p in root.glob(pattern):
            try:
                if now - p.lstat().st_mtime > STALE_AFTER:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


# --- the per-key file lock -------------------------------------------------------------------------

def _holder(fd: int) -> str:
    """Who holds the lock, from what its holder wrote into it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        pid, host, since = int(info["pid"]), str(info["host"]), str(info["since"])
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return "an unknown process (the lock file names no holder)"
    state = ""
    if host == socket.gethostname():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            line = next((ln for ln in status.splitlines() if ln.startswith("State:")), "")
            state = f" ({line.partition('(')[2].rstrip(')') or line[6:].strip()})" if line else ""
        except FileNotFoundError:
            state = " (no longer running)"
        except OSError:
            pass
    return f"pid {pid}{state} on {host} since {since}"


def _acquire(fd: int, path: Path, timeout: float) -> None:
    import fcntl

    start, noticed = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if waited >= timeout:
            raise BuildError(f"timed out after {timeout:g} s waiting for the kernel cache lock {path}, held by "
                             f"{_holder(fd)}; end that process if it is stuck, or raise SYMGATE_LOCK_TIMEOUT")
        if not noticed and waited >= LOCK_NOTICE_AFTER:
            noticed = True
            print(f"symgate: waiting for the kernel cache lock {path}, held by {_holder(fd)} "
                  f"(waited {waited:.0f} s, giving up after {timeout:g} s)", file=sys.stderr, flush=True)
        time.sleep(max(0.0, min(LOCK_POLL, timeout - waited)))


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:  # best effort: the lock holds without it
        pass


@contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock on ``path``, waiting at most ``timeout`` seconds for another process."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    try:
        _acquire(fd, path, timeout)
        _write_holder(fd)
        try:
            yield
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _key_lock(key: str, timeout: float) -> Iterator[None]:
    """The in-process lock of one key (threads of this process)."""
    with _LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    if not lock.acquire(timeout=timeout):
        raise BuildError(f"timed out after {timeout:g} s waiting for another thread of this process "
                         f"to build kernel {_module_name(key)}; raise SYMGATE_LOCK_TIMEOUT")
    try:
        yield
    finally:
        lock.release()


# --- compiling -------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, encoding="utf-8", errors="replace",
                          cwd=cwd, stdin=subprocess.DEVNULL)


def _no_compiler(cc: str) -> CompilerNotFoundError:
    origin = "$CC" if os.environ.get("CC") else "Python's build configuration"
    return CompilerNotFoundError(f"no C compiler found (looked for {cc!r}, from {origin}); install gcc or set CC")


def _keep_failed(work: Path, root: Path, modname: str, log: str) -> Path | None:
    """Move a failed build's directory to ``<root>/failed/<modname>`` (replacing an older one)."""
    dest = root / "failed" / modname
    try:
        for f in work.iterdir():
            if f.suffix == ".o" or f.name.endswith(_ext_suffix()):
                f.unlink()
        try:
            _write_file(work / "build.log", log)
        except OSError:
            pass
        dest.parent.mkdir(exist_ok=True)
        _discard(dest, root)
        os.rename(work, dest)
    except OSError:
        return None
    return dest


def _step(cmd: Sequence[str], work: Path, root: Path, modname: str, what: str, *, compiler: bool = False) -> None:
    """Run one build command; a failure is a BuildError (disk full, missing compiler or ``what``)."""
    try:
        r = _run(cmd, work)
    except FileNotFoundError as exc:
        if compiler:
            raise _no_compiler(cmd[0]) from exc
        raise
    if r.returncode == 0:
        return
    log = r.stdout + r.stderr
    if _out_of_space(log, work):
        raise BuildError(f"no space left on device at {root}", command=cmd, log=log)
    sources = _keep_failed(work, root, modname, log)
    if sources is None:
        what += " (its sources could not be kept)"
    raise BuildError(what, command=cmd, log=log, sources=sources)


def _compile(source: str, key: str, work: Path, include_dirs: Sequence[str], root: Path) -> Path:
    """Translate and compile ``source`` in ``work``; returns the module file (named after a fresh build id)."""
    modname = _module_name(key)
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        raise _no_compiler(cc[0])
    pyx = work / f"{modname}.pyx"
    _write_file(pyx, f"{source}\n\n__symgate_key__ = {key!r}\n")
    c_file = work / f"{modname}.c"
    cy_cmd = [sys.executable, "-m", "cython", "-3", "--fast-fail", str(pyx), "-o", str(c_file)]
    for inc in include_dirs:
        cy_cmd[4:4] = ["-I", inc]
    _step(cy_cmd, work, root, modname, "Cython could not translate the generated kernel")
    so = work / f"{modname}.{secrets.token_hex(8)}{_ext_suffix()}"
    obj = work / f"{modname}.o"
    cc_cmd = [*cc, "-c", *CFLAGS, f"-I{_PY_INCLUDE}",
              *[f"-I{d}" for d in include_dirs], str(c_file), "-o", str(obj)]
    ld_cmd = [*cc, *LDFLAGS, str(obj), "-o", str(so), "-lm"]
    for cmd in (cc_cmd, ld_cmd):
        _step(cmd, work, root, modname, "the C compiler failed on the generated kernel", compiler=True)
    for f in (c_file, obj):
        f.unlink()
    return so


def _write_manifest(work: Path, so: Path, key: str) -> None:
    meta = {"key": key, "module": _module_name(key), "file": so.name, "sha256": _sha256(so),
            "size": so.stat().st_size, "symgate": _version()}
    _write_file(work / _MANIFEST, json.dumps(meta, indent=1))
    for f in work.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _publish(work: Path, entry: Path) -> None:
    os.rename(work, entry)  # atomic: readers see the whole entry or none


def _build_into(source: str, key: str, root: Path, include_dirs: Sequence[str]) -> Path:
    """Build the entry of ``key`` under ``root`` (lock held, old entry gone); returns its module."""
    entry = _entry(root, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
    try:
        so = _compile(source, key, work, include_dirs, root)
        _write_manifest(work, so, key)
        _publish(work, entry)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    published = _valid_entry(entry, _module_name(key))
    if published is None:  # pragma: no cover - defensive
        raise BuildError(f"kernel cache entry {entry} is not valid right after publishing")
    return published


def _build_entry(source: str, key: str, include_dirs: Sequence[str], timeout: float, bad: Path | None = None) -> Path:
    """Build (under the key's file lock) in a writable root; returns a valid module other than ``bad``."""
    root = _writable_root()
    entry = _entry(root, key)
    with _os_errors(root), _file_lock(root / "locks" / f"{key}.lock", timeout):
        so = _valid_entry(entry, _module_name(key))  # published while we waited?
        if so is not None and so != bad:
            return so
        _sweep_stale(root)
        _discard(entry, root)  # missing, truncated, corrupt or foreign
        return _build_into(source, key, root, include_dirs)


# --- loading ---------------------------------------------------------------------------------------

def _load(so: Path, modname: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(modname, so)
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        raise ImportError(f"cannot load compiled module {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try_load(so: Path, key: str) -> tuple[ModuleType | None, str]:
    """The module at ``so`` if it imports and carries ``key``; else (None, why not)."""
    modname = _module_name(key)
    try:
        module = _load(so, modname)
    except Exception as exc:  # a broken artifact: ImportError, or whatever its init raised
        sys.modules.pop(modname, None)
        return None, f"{type(exc).__name__}: {exc}"
    found = getattr(module, "__symgate_key__", None)
    if found != key:
        sys.modules.pop(modname, None)
        return None, f"it was built for another key ({found!r})"
    return module, ""


def _find_or_build(source: str, key: str, include_dirs: Sequence[str], timeout: float) -> ModuleType:
    """Load the cached module, building it if needed; an entry that fails to load is rebuilt once."""
    so = _find(key, _module_name(key)) or _build_entry(source, key, include_dirs, timeout)
    module, why = _try_load(so, key)
    if module is not None:
        return module
    rebuilt = _build_entry(source, key, include_dirs, timeout, bad=so)
    module, why_again = _try_load(rebuilt, key)
    if module is None:
        raise BuildError(f"the kernel module {rebuilt}, rebuilt because {so} did not load ({why}), "
                         f"does not load either: {why_again}")
    return module


def build_module(source: str, *, extra: Sequence[str] = (), include_dirs: Sequence[str] = ()) -> ModuleType:
    """Compile (or load from the cache) the Cython module with this source; returns the module.

    Safe to call from several threads and processes at once: one builds, the others
    wait for its per-key lock (at most ``$SYMGATE_LOCK_TIMEOUT`` seconds) and then load
    the published entry.  Raises :class:`BuildError` (see the module docstring).
    """
    key = cache_key(source, tuple(extra) + tuple(include_dirs))
    module = _LOADED.get(key)
    if module is not None:
        return module
    timeout = lock_timeout()
    with _key_lock(key, timeout):
        module = _LOADED.get(key)
        if module is None:
            module = _find_or_build(source, key, include_dirs, timeout)
            _LOADED[key] = module
        return module
