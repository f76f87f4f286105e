"""Test configuration: Hypothesis profiles and shared fixtures.

Profiles: ``fast`` (default; few examples, the suite runs in about a minute) and
``thorough`` (``--hypothesis-profile=thorough``; what ``make test`` uses for the
slow-marked tests).  Cells are built once per session (derivation and
lambdification are cached on the cell object), never inside ``@given``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import symgate as sg
from symgate.testing import cached_builtin

# compiled kernels of this test session go to a private cache (tests of the cache set their own),
# removed at the end of the session
_SESSION_CACHE: str | None = None
if not os.environ.get("SYMGATE_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="symgate-test-cache-")
    os.environ["SYMGATE_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# the hostile-input catalogue (tests marked hostile("error") or hostile("result")): counted by outcome
_HOSTILE: dict[str, str] = {}
_HOSTILE_FAILED: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker("hostile")
        if mark is not None:
            if mark.args not in (("error",), ("result",)):
                raise pytest.UsageError(f"{item.nodeid}: hostile() takes 'error' or 'result', got {mark.args}")
            _HOSTILE[item.nodeid] = mark.args[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid in _HOSTILE and report.failed:
        _HOSTILE_FAILED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _HOSTILE:
        return
    passed = {r.nodeid for r in terminalreporter.stats.get("passed", [])}
    counts = {kind: sum(1 for n, k in _HOSTILE.items() if k == kind and n in passed) for kind in ("error", "result")}
    terminalreporter.write_line(
        f"hostile-input catalogue: {counts['error'] + counts['result']} cases passed ({counts['error']} end in a clear "
        f"SymgateError, {counts['result']} in the correct result), {len(_HOSTILE_FAILED)} failed")


settings.register_profile(
    "fast", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("fast")

BUILTIN_NAMES = sorted(sg.cells.BUILTIN)


@pytest.fixture(scope="session", params=BUILTIN_NAMES)
def builtin_cell(request: pytest.FixtureRequest) -> sg.Cell:
    """Each built-in cell, built (and derived) once per session."""
    return cached_builtin(request.param)
