"""The command line interface."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from symgate.cli import main


def test_derive_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "vector_gate"]) == 0
    out = capsys.readouterr().out
    assert "dh'/dh:" in out and "[gate     ] diag(-h + phi)*diag(g*(1 - g))*Wg" in out


def test_derive_latex(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "leaky", "--latex"]) == 0
    out = capsys.readouterr().out
    assert r"\operatorname{diag}" in out and r"\frac{\partial h'}{\partial h}" in out


def test_derive_user_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "mycell.py"
    f.write_text(textwrap.dedent("""
        import symgate as sg

        @sg.cell
        def my_gate(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"),
                    U: sg.Matrix("n", "m"), wg: sg.Matrix(1, "n")):
            g = sg.sigmoid(wg @ h)
            return (1 - g) * h + g * sg.tanh(W @ h + U @ x)

        def undecorated(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m")):
            return sg.tanh(W @ h + U @ x)
    """))
    assert main(["derive", f"{f}:my_gate"]) == 0
    assert "[gate     ]" in capsys.readouterr().out
    assert main(["derive", f"{f}:undecorated"]) == 0
    assert "diag(1 - phi**2)*W" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown cell"),
    ("missing.py:cell", "does not exist"),
])
def test_bad_cell_spec(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", spec]) == 2
    assert message in capsys.readouterr().err


def test_bad_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.py"
    f.write_text("x = 1\n")
    assert main(["derive", f"{f}:cell"]) == 2
    assert "no attribute 'cell'" in capsys.readouterr().err
    assert main(["derive", f"{f}:x"]) == 2
    assert "neither" in capsys.readouterr().err


def test_verify_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "leaky", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "leaky" in out and "pass" in out


def test_module_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "symgate", "derive", "plain"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "diag(1 - phi**2)*W" in r.stdout


def test_derive_expansion_and_effective_lr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "leaky", "--expansion", "--split", "coupling", "--effective-lr"]) == 0
    out = capsys.readouterr().out
    assert "F0 = diag((1 - alpha)**ell)" in out
    assert "mu[t, ell]   = alpha*(1 - alpha)**ell" in out


def test_derive_effective_lr_latex_and_cell_without_leak(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "vector_gate", "--effective-lr", "--latex"]) == 0
    assert r"\mu_{t,\ell}" in capsys.readouterr().out
    assert main(["derive", "plain", "--effective-lr"]) == 0
    assert "0**ell" in capsys.readouterr().out  # no leak: only the immediate term (ell = 0) survives


def test_codegen_writes_readable_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codegen", "gru", "-o", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gru_float32.pyx", "gru_float64.pyx"]
    src = (tmp_path / "out" / "gru_float64.pyx").read_text()
    assert src.startswith("# cython:") and "cdef int forward(" in src and "cdef void backward(" in src and "def run(" in src
    assert "[reset    ]" in src  # the derived Jacobian in the header


def test_codegen_output_dir_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["codegen", "leaky", "-o", str(blocker / "sub")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_load_cell_lives_outside_the_cli(tmp_path: Path) -> None:
    """The experiments load user cells without importing the command line module."""
    import symgate._loading
    import symgate.cli

    assert symgate.cli.load_cell is symgate._loading.load_cell
    f = tmp_path / "c.py"
    f.write_text("import symgate as sg\n\n@sg.cell\n"
                 "def tiny(h: sg.State(), x: sg.Input(), W: sg.Matrix('n', 'n'), U: sg.Matrix('n', 'm')):\n"
                 "    return sg.tanh(W @ h + U @ x)\n")
    code = ("import sys\nfrom symgate.experiments._common import model_cell\n"
            f"assert model_cell({str(f) + ':tiny'!r}).name == 'tiny'\nassert 'symgate.cli' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv, message", [
    (["verify", "gru", "--examples", "0"], "--examples must be >= 1, got 0"),
    (["verify", "gru", "--examples", "-3"], "--examples must be >= 1, got -3"),
    (["verify", "gru", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["demo", "--examples", "0"], "--examples must be >= 1, got 0"),
    (["demo", "--random-cells", "-1"], "--random-cells must be >= 0, got -1"),
    (["demo", "--compiled-random", "-2"], "--compiled-random must be >= 0, got -2"),
])
def test_verify_that_would_check_nothing_is_an_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No pass is reported without a check: a one-line error and exit status 2 instead."""
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == f"symgate: error: {message}\n"


def test_verify_examples_zero_exit_status_from_the_shell() -> None:
    r = subprocess.run([sys.executable, "-m", "symgate", "verify", "gru", "--examples", "0"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["symgate: error: --examples must be >= 1, got 0"]
