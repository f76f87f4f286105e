"""Hostile input to the command line and to the distributed sweep.

Each test is one case of the catalogue: ``hostile("error")`` -- a clear one-line error
(exit status 2 and the message on stderr, no traceback; or the exact error class from
:func:`symgate.experiments.sweep.execute` / :func:`symgate._loading.load_cell`) -- or
``hostile("result")`` -- the correct result.  The Dask cases talk to loopback servers in
threads only: one that accepts and never answers, one that sends garbage, a closed port.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import symgate as sg
from symgate._errors import CellSpecError, ConfigError
from symgate._loading import load_cell
from symgate.cli import main
from symgate.experiments.sweep import execute, jobs_for, parse_scheduler

error = pytest.mark.hostile("error")
result = pytest.mark.hostile("result")

TINY_CELL = """
import symgate as sg

@sg.cell
def tiny(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
    return sg.tanh(W @ h + U @ x)
"""


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> str:
    """``main(argv)`` returns 2 and prints exactly one line ``symgate: error: ...`` holding ``fragment``."""
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.out, cap.err)
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symgate: error: "), cap.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


def _shell(*argv: str, timeout: float = 120, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "symgate", *argv], capture_output=True, text=True, check=False,
                          timeout=timeout, env=full_env, cwd=cwd)


def _one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("symgate: error: "), r.stderr
    assert fragment in lines[0], lines[0]


@contextlib.contextmanager
def _server(mode: str) -> Iterator[int]:
    """A loopback TCP server on a free port, in a thread: ``silent`` accepts and never
    answers; ``garbage`` sends random bytes; ``huge`` announces a 2 EiB message; ``closer``
    hangs up at once."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    stop = threading.Event()
    conns: list[socket.socket] = []
    rng = random.Random(1234)

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([lsock], [], [], 0.05)
            if not ready:
                continue
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            conns.append(c)
            try:
                if mode == "garbage":
                    c.sendall(rng.randbytes(4096))
                elif mode == "huge":
                    c.sendall(struct.pack("<Q", 2**61 + 12345) + rng.randbytes(64))
                elif mode == "closer":
                    c.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        lsock.close()


def _closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _jobs() -> list:
    from symgate.experiments.appendix import AppendixSettings

    return jobs_for("appendix", AppendixSettings.quick().replace(T=10, n=6), [0, 1])


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "seconds"}


# ---------------------------------------------------------------------------------------
# the scheduler address
# ---------------------------------------------------------------------------------------


@error
@pytest.mark.parametrize("address, fragment", [
    ("bogus", "invalid scheduler 'bogus'"),
    ("tcp://127.0.0.1:0", "invalid port '0'"),
    ("tcp://127.0.0.1:65536", "invalid port '65536'"),
    ("tcp://127.0.0.1:-5", "invalid port '-5'"),
    ("tcp://127.0.0.1:", "invalid port ''"),
    ("ftp://127.0.0.1:21", "unsupported scheduler address scheme 'ftp'"),
    ("inproc://x:1", "unsupported scheduler address scheme 'inproc'"),
    ("tcp://:8786", "invalid scheduler 'tcp://:8786'"),
    ("tcp://ho st:8786", "invalid scheduler address"),
    ("tcp://h/../x:8786", "invalid host 'h/../x'"),
    ("tcp://[::1]", "no port in the scheduler address 'tcp://[::1]'"),
])
def test_cli_rejects_a_malformed_scheduler_address_up_front(address: str, fragment: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["reproduce", "appendix", "--quick", "--out", str(tmp_path / "o"), "--scheduler", address], fragment)
    assert not (tmp_path / "o").exists()  # checked before anything is written


@error
def test_execute_rejects_a_malformed_scheduler_address() -> None:
    with pytest.raises(ConfigError, match="invalid scheduler 'bogus'"):
        execute(_jobs(), scheduler="bogus", progress=False)
    with pytest.raises(ConfigError, match=r"invalid port '99999'.*1\.\.65535"):
        execute(_jobs(), scheduler="tcp://localhost:99999", progress=False)


@result
def test_scheduler_addresses_that_are_accepted() -> None:
    assert parse_scheduler("serial") == ("serial", "", "", 0)
    assert parse_scheduler("local") == ("local", "", "", 0)
    assert parse_scheduler("127.0.0.1:8786") == ("tcp://127.0.0.1:8786", "tcp", "127.0.0.1", 8786)
    assert parse_scheduler("tls://sched.example.org:1") == ("tls://sched.example.org:1", "tls", "sched.example.org", 1)
    assert parse_scheduler("tcp://[::1]:65535") == ("tcp://[::1]:65535", "tcp", "::1", 65535)
    assert parse_scheduler("ws://node-3:8786")[1:] == ("ws", "node-3", 8786)
    assert parse_scheduler("TCP://node-3:08786")[0] == "tcp://node-3:8786"


@error
def test_demo_checks_its_scheduler_before_the_long_work(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["demo", "--scheduler", "tcp://127.0.0.1:70000"], "invalid port '70000'")


# ---------------------------------------------------------------------------------------
# unreachable, silent and garbage-sending schedulers
# ---------------------------------------------------------------------------------------


@error
def test_execute_on_a_closed_port_fails_within_5_s() -> None:
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"cannot reach the Dask scheduler at 'tcp://127.0.0.1:{port}'.*refused"):
        execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False)
    assert time.monotonic() - t0 < 5


@error
def test_cli_on_a_closed_port_fails_within_5_s(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    t0 = time.monotonic()
    _fails(capsys, ["reproduce", "appendix", "--quick", "--no-progress", "--out", str(tmp_path),
                    "--scheduler", f"tcp://127.0.0.1:{port}"], f"cannot reach the Dask scheduler at 'tcp://127.0.0.1:{port}'")
    assert time.monotonic() - t0 < 5


@error
def test_execute_on_a_server_that_accepts_and_never_answers_times_out() -> None:
    before = {t.ident for t in threading.enumerate() if not t.daemon}
    with _server("silent") as port:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"no Dask scheduler answered at 'tcp://127.0.0.1:{port}' within 2 s"):
            execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False, connect_timeout=2.0)
        assert time.monotonic() - t0 < 5  # 2 s of handshake, then the client is closed
    # no thread is left that would keep the process alive at exit
    assert {t.ident for t in threading.enumerate() if not t.daemon} <= before


@error
@pytest.mark.slow
def test_execute_on_a_silent_server_fails_within_30_s_at_the_default_timeout() -> None:
    with _server("silent") as port:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"'tcp://127.0.0.1:{port}'"):
            execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False)
        assert time.monotonic() - t0 < 30


@error
@pytest.mark.slow
def test_cli_on_a_silent_server_fails_within_30_s_and_exits(tmp_path: Path) -> None:
    """A real process: one line, status 2, and nothing (no thread, no loop) keeps it alive."""
    with _server("silent") as port:
        t0 = time.monotonic()
        r = _shell("reproduce", "appendix", "--quick", "--no-progress", "--out", str(tmp_path),
                   "--scheduler", f"tcp://127.0.0.1:{port}", timeout=60)
        assert time.monotonic() - t0 < 30
    _one_line_error(r, f"no Dask scheduler answered at 'tcp://127.0.0.1:{port}'")


@error
@pytest.mark.parametrize("mode, fragment", [
    ("garbage", "did not answer as a Dask scheduler"),
    ("huge", "does not speak the Dask protocol"),
])
def test_execute_on_a_server_sending_garbage(mode: str, fragment: str) -> None:
    with _server(mode) as port:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"'tcp://127.0.0.1:{port}'") as info:
            execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False, connect_timeout=3.0)
        assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "\n" not in msg
    # garbage may also announce a size that never arrives: then the handshake times out
    assert fragment in msg or "no Dask scheduler answered" in msg


@error
def test_cli_on_a_server_announcing_a_huge_message(tmp_path: Path) -> None:
    with _server("huge") as port:
        r = _shell("reproduce", "appendix", "--quick", "--no-progress", "--out", str(tmp_path),
                   "--scheduler", f"tcp://127.0.0.1:{port}", timeout=60)
    _one_line_error(r, "does not speak the Dask protocol")
    assert "EiB" not in r.stderr or "impossible size" in r.stderr


@error
def test_execute_on_a_server_that_hangs_up_at_once() -> None:
    with _server("closer") as port:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"the server at 'tcp://127.0.0.1:{port}' did not answer as a Dask scheduler"):
            execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False, connect_timeout=5.0)
        assert time.monotonic() - t0 < 5


@error
def test_execute_on_a_host_that_does_not_resolve() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at 'tcp://no-such-host.invalid:8786'"):
        execute(_jobs(), scheduler="tcp://no-such-host.invalid:8786", progress=False)
    assert time.monotonic() - t0 < 6  # a resolver that never answers is cut off by the probe's timeout


@error
def test_execute_inside_a_running_event_loop_still_times_out() -> None:
    """From a notebook (an event loop already runs in this thread) the client gets its own loop."""
    import asyncio

    async def from_a_notebook(port: int) -> None:
        execute(_jobs(), scheduler=f"tcp://127.0.0.1:{port}", progress=False, connect_timeout=1.0)

    with _server("silent") as port:
        with pytest.raises(ConfigError, match="no Dask scheduler answered"):
            asyncio.run(from_a_notebook(port))


_SCHEDULER_SCRIPT = """
import time
from distributed import LocalCluster
c = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                 dashboard_address=":0", silence_logs=50)
print(c.scheduler_address, flush=True)
time.sleep(300)
"""


@error
@pytest.mark.slow
def test_a_scheduler_that_dies_during_the_sweep() -> None:
    from symgate.experiments.s1 import S1Settings

    jobs = jobs_for("s1", S1Settings.quick(), list(range(1, 17)))  # far more than 3 s of work
    p = subprocess.Popen([sys.executable, "-c", _SCHEDULER_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        address = p.stdout.readline().strip()
        killer = threading.Timer(3.0, p.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"lost the Dask scheduler at '{address}' during the sweep"):
            execute(jobs, scheduler=address, progress=False)
        assert time.monotonic() - t0 < 30
        killer.join()
    finally:
        p.kill()
        p.wait(30)
        if p.stdout is not None:
            p.stdout.close()


@error
def test_execute_rejects_absurd_worker_counts_and_timeouts() -> None:
    with pytest.raises(ConfigError, match=r"workers must be an integer in 1\.\.512"):
        execute(_jobs(), scheduler="local", workers=10**30, progress=False)
    with pytest.raises(ConfigError, match="connect_timeout"):
        execute(_jobs(), scheduler="tcp://127.0.0.1:1", connect_timeout=float("nan"), progress=False)
    with pytest.raises(ConfigError, match="connect_timeout"):
        execute(_jobs(), scheduler="tcp://127.0.0.1:1", connect_timeout=-1, progress=False)


# ---------------------------------------------------------------------------------------
# a real scheduler (in this process, on loopback)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_cluster() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=":0", silence_logs=40) as cluster:
        yield cluster.scheduler_address


@result
def test_a_sweep_on_a_running_scheduler_equals_the_serial_sweep(loopback_cluster: str) -> None:
    jobs = _jobs()
    serial = execute(jobs, scheduler="serial", progress=False)
    remote = execute(jobs, scheduler=loopback_cluster, progress=False)
    assert [json.dumps(_strip(a), sort_keys=True, default=str) for a in serial] == \
        [json.dumps(_strip(b), sort_keys=True, default=str) for b in remote]


@error
def test_a_failing_job_on_a_running_scheduler_raises_its_own_error(loopback_cluster: str) -> None:
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        execute([("nope", {}, ())], scheduler=loopback_cluster, progress=False)


# ---------------------------------------------------------------------------------------
# codegen output
# ---------------------------------------------------------------------------------------


@error
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_codegen_into_an_existing_unwritable_directory(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["codegen", "gru", "-o", "/proc/self"], "cannot write '/proc/self/gru_float64.pyx'")


@error
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_codegen_into_a_directory_that_cannot_be_created(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["codegen", "gru", "-o", "/proc/x"], "cannot create output directory '/proc/x'")


@error
def test_codegen_of_a_cell_with_a_300_character_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "c" * 300
    f = tmp_path / "long.py"
    f.write_text("import symgate as sg\n\n"
                 f"def {name}(h: sg.State('n'), x: sg.Input('m'), W: sg.Matrix('n', 'n'), U: sg.Matrix('n', 'm')):\n"
                 "    return sg.tanh(W @ h + U @ x)\n")
    line = _fails(capsys, ["codegen", f"{f}:{name}", "-o", str(tmp_path / "out")], "cannot write")
    assert "File name too long" in line or "name too long" in line.lower()


# ---------------------------------------------------------------------------------------
# cell files
# ---------------------------------------------------------------------------------------


@error
def test_a_cell_file_that_exits_while_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "exits.py"
    f.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(CellSpecError, match=r"error while loading .*exits\.py'.*SystemExit.*exits while being loaded"):
        load_cell(f"{f}:c")
    _fails(capsys, ["derive", f"{f}:c"], "SystemExit")
    assert capsys.readouterr().out == ""


@error
def test_a_cell_file_that_exits_from_the_shell(tmp_path: Path) -> None:
    f = tmp_path / "exits.py"
    f.write_text("import sys\nprint('partial')\nsys.exit(0)\n")
    _one_line_error(_shell("derive", f"{f}:c"), "exits while being loaded (sys.exit(0))")


@error
def test_a_cell_file_that_raises_while_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "raises.py"
    f.write_text("raise RuntimeError('first line\\nsecond line')\n")
    with pytest.raises(CellSpecError, match=r"error while loading .*: RuntimeError: first line second line"):
        load_cell(f"{f}:c")
    _fails(capsys, ["derive", f"{f}:c"], "RuntimeError: first line second line")


@error
def test_a_cell_file_with_a_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.py"
    f.write_text("def f(:\n")
    _fails(capsys, ["derive", f"{f}:f"], "SyntaxError")


@error
def test_a_keyboard_interrupt_in_a_cell_file_goes_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "kbi.py"
    f.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_cell(f"{f}:c")
    assert main(["derive", f"{f}:c"]) == 130
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""
    r = _shell("derive", f"{f}:c")
    assert r.returncode == 130 and r.stderr == "" and r.stdout == ""


@error
def test_a_function_that_exits_when_built_into_a_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "fn.py"
    f.write_text("import sys\nimport symgate as sg\n\n"
                 "def c(h: sg.State('n'), x: sg.Input('m'), W: sg.Matrix('n', 'n'), U: sg.Matrix('n', 'm')):\n"
                 "    sys.exit(3)\n")
    _fails(capsys, ["derive", f"{f}:c"], "SystemExit")


@error
def test_a_directory_as_the_cell_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "cells.py"
    d.mkdir()
    with pytest.raises(CellSpecError, match="is a directory"):
        load_cell(f"{d}:c")
    _fails(capsys, ["derive", f"{d}:c"], "is a directory")


@error
def test_a_cell_file_without_a_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.py"
    f.write_text(TINY_CELL)
    _fails(capsys, ["derive", str(f)], f"give {f}:name")
    _fails(capsys, ["derive", f"{f}:"], "is not a valid Python name")


@error
def test_a_device_as_the_cell_file(capsys: pytest.CaptureFixture[str]) -> None:
    """Not read (a FIFO would block forever): named as not a regular file."""
    _fails(capsys, ["derive", f"{os.devnull}:c"], "is not a regular file")


@error
def test_a_cell_path_of_ten_thousand_characters(capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(capsys, ["derive", "x" * 10_000 + ".py:c"], "does not exist")
    assert len(line) < 400


@error
@pytest.mark.parametrize("body, name, fragment", [
    ("c = print\n", "c", "*args/**kwargs are not supported"),
    ("class K:\n    pass\n", "K", "has no State argument"),
    ("x = 1\n", "x", "neither a symgate Cell nor a function"),
])
def test_a_name_that_is_not_a_cell(body: str, name: str, fragment: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "objs.py"
    f.write_text(body)
    _fails(capsys, ["derive", f"{f}:{name}"], fragment)


@result
def test_a_cell_file_with_a_dataclass_and_postponed_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The module is registered while it runs, as dataclasses (and pickle) expect."""
    f = tmp_path / "dc.py"
    f.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass Config:\n    n: 'int' = 4\n" + TINY_CELL)
    assert main(["derive", f"{f}:tiny"]) == 0
    assert "diag(1 - phi**2)*W" in capsys.readouterr().out


@result
def test_a_cell_file_with_another_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "cell.txt"
    f.write_text(TINY_CELL)
    assert load_cell(f"{f}:tiny").name == "tiny"


# ---------------------------------------------------------------------------------------
# counts, seeds and sizes
# ---------------------------------------------------------------------------------------


@error
@pytest.mark.parametrize("argv, fragment", [
    (["reproduce", "s1", "--seeds", str(10**30)], "--seeds must be <= 10000, got 100000000000...(31 digits)"),
    (["reproduce", "s1", "--workers", str(10**6)], "--workers must be <= 512"),
    (["reproduce", "s1", "--workers", "0"], "--workers must be >= 1"),
    (["reproduce", "s1", "--endpoint-stride", str(10**30)], "--endpoint-stride must be <="),
    (["verify", "gru", "--seed", str(2**40)], "--seed must be <= 4294967295"),
    (["verify", "gru", "--examples", str(10**30)], "--examples must be <= 100000"),
    (["demo", "--random-cells", str(10**30)], "--random-cells must be <= 100000"),
    (["demo", "--seed", str(2**64)], "--seed must be <= 4294967295"),
])
def test_huge_counts_are_one_line_errors(argv: list[str], fragment: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if argv[0] == "reproduce":
        argv = [*argv, "--out", str(tmp_path / "o"), "--scheduler", "serial"]
    _fails(capsys, argv, fragment)


@error
@pytest.mark.parametrize("argv, fragment", [
    (["codegen", "gru", "-o", "a\0b"], "cannot create output directory 'a\\x00b': embedded null byte"),
    (["reproduce", "appendix", "--quick", "--scheduler", "serial", "--out", "a\0b"],
     "cannot write to the output directory 'a\\x00b'"),
    (["reproduce", "s1", "--quick", "--scheduler", "serial", "--task", "nope", "--out", "unused"], "unknown task 'nope'"),
])
def test_paths_with_a_nul_byte_and_unknown_tasks(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, argv, fragment)


@error
def test_reproduce_api_rejects_a_huge_seed_count(tmp_path: Path) -> None:
    from symgate.experiments.reproduce import reproduce, seeds_for

    with pytest.raises(ConfigError, match=r"integer in 1\.\.10000"):
        seeds_for("s1", 10**30)
    with pytest.raises(ConfigError, match=r"integer in 1\.\.10000"):
        reproduce("appendix", quick=True, seeds=10**30, out=str(tmp_path / "o"), scheduler="serial", progress=False)
    assert not (tmp_path / "o").exists()


@error
@pytest.mark.parametrize("models, fragment", [
    (",,", "--models names no model"),
    ("leaky,leaky", "would both be reported as 'leaky'"),
    ("leaky,nope", "unknown cell 'nope'"),
    ("missing.py:c", "does not exist"),
])
def test_reproduce_checks_its_models_before_running(models: str, fragment: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["reproduce", "s1", "--quick", "--models", models, "--out", str(tmp_path / "o"), "--scheduler", "serial"],
           fragment)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------
# what main() makes of every other failure
# ---------------------------------------------------------------------------------------


@error
def test_an_unexpected_exception_is_one_line_with_a_debug_hint(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import symgate.cli as cli

    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("division by zero\nat the second line")

    monkeypatch.setattr(cli, "_print_derivation", boom)
    monkeypatch.delenv("SYMGATE_DEBUG", raising=False)
    line = _fails(capsys, ["derive", "leaky"], "unexpected ZeroDivisionError: division by zero at the second line")
    assert "SYMGATE_DEBUG=1" in line
    monkeypatch.setenv("SYMGATE_DEBUG", "1")
    assert main(["derive", "leaky"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("symgate: error: unexpected ZeroDivisionError")


@error
def test_a_build_error_shows_its_first_line_and_where_the_log_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import symgate.cli as cli
    from symgate._build import BuildError

    def fail(*a: object, **k: object) -> None:
        raise BuildError("the C compiler failed on the generated kernel", command=["cc", "x.c"],
                         log="x.c:1: error: something\nmore log", sources=tmp_path)

    monkeypatch.setattr(cli, "_print_derivation", fail)
    line = _fails(capsys, ["derive", "leaky"], "the C compiler failed on the generated kernel (the full log: ")
    log = tmp_path / "build-error.log"
    assert str(log) in line
    assert "x.c:1: error: something" in log.read_text() and "command: cc x.c" in log.read_text()


@error
def test_an_os_error_names_its_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import symgate.cli as cli

    def fail(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied", "/somewhere/results.json")

    monkeypatch.setattr(cli, "_print_derivation", fail)
    _fails(capsys, ["derive", "leaky"], "Permission denied: '/somewhere/results.json'")


@error
def test_a_foreign_sys_exit_is_not_a_silent_success(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import symgate.cli as cli

    def leave(*a: object, **k: object) -> None:
        sys.exit(0)

    monkeypatch.setattr(cli, "_print_derivation", leave)
    _fails(capsys, ["derive", "leaky"], "unexpected exit (SystemExit(0))")


@error
def test_usage_errors_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "s1", "--seeds", "10**30"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@result
def test_a_closed_stdout_pipe_ends_quietly(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "symgate", "derive", "lstm", "--latex", "--expansion"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(10)
    p.stdout.close()
    with p.stderr:
        err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc in (0, 141)


@result
def test_help_documents_the_debug_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "SYMGATE_DEBUG=1" in " ".join(capsys.readouterr().out.split())
