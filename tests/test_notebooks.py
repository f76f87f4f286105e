"""Every notebook in notebooks/ runs top to bottom (code cells executed in one namespace)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what a notebook writes to a temp directory goes with the test
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    ns: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        try:
            exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - our own notebooks
        except Exception as exc:  # pragma: no cover - failure path
            raise AssertionError(f"{path.name}, cell {i} failed: {type(exc).__name__}: {exc}\n{src}") from exc
