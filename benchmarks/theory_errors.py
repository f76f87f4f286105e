"""Worst errors and slopes of the theory properties, as measured by the test suite.

Runs tests/test_theory.py and tests/test_analogies.py under the thorough Hypothesis profile
(200 examples per property) and prints the worst figure each property recorded.

Run:  python benchmarks/theory_errors.py
"""

from __future__ import annotations

import os
import sys
import time

import pytest


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    t0 = time.time()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", root, os.path.join(root, "tests", "test_theory.py"),
                      os.path.join(root, "tests", "test_analogies.py"), "--hypothesis-profile=thorough"])
    print(f"pytest exit code {rc}, {time.time() - t0:.0f} s")
    for mod in ("test_theory", "test_analogies"):
        m = sys.modules.get(mod)
        if m is None:
            continue
        print(mod)
        for k, v in sorted(m.WORST.items()):
            print(f"   {k:64s} {v:.3e}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
