"""Matrix products on validated, finite operands."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["matmul"]


def matmul(a: Any, b: Any) -> np.ndarray:
    """``a @ b`` on finite operands.

    Some OpenBLAS builds leave a spurious "invalid" floating-point flag after GEMM on
    finite inputs (numpy issues #13173, #24067), which numpy reports as a RuntimeWarning;
    symgate's operands are checked finite on entry, so only that flag is ignored.  An
    overflow still warns, and a NaN produced by one shows in the results.
    """
    with np.errstate(invalid="ignore"):
        return a @ b
