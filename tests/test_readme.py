"""The README's Python examples run, in order, as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the project's own documentation
    # the training-loop example took 100 SGD steps on bound arrays: the loss went down
    step = ns["step"]
    first = step()
    assert np.isfinite(first)
    assert ns["k"].backend == "compiled" and ns["k"].cell.name == "my_cell"
