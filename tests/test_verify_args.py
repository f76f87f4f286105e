"""Argument validation of the verification battery: a call that would run no check is an error.

A report with no result is a vacuous pass (``all([]) is True``), so ``verify`` and
``battery_test_class`` refuse every input that would check nothing, and name it.
"""

from __future__ import annotations

import numpy as np
import pytest

import symgate as sg
from symgate.testing import draw_problem

CELL = sg.testing.cached_builtin("leaky")


@pytest.mark.parametrize("examples", [0, -3])
def test_verify_rejects_examples_below_one(examples: int) -> None:
    with pytest.raises(sg.ConfigError, match=rf"examples must be an integer >= 1, got {examples}"):
        sg.testing.verify(CELL, examples=examples)


@pytest.mark.parametrize("examples", [True, 2.0, "2", None, 1.5])
def test_verify_rejects_non_integer_examples(examples: object) -> None:
    with pytest.raises(sg.ConfigError, match=r"examples must be an integer >= 1, got .*\(" + type(examples).__name__):
        sg.testing.verify(CELL, examples=examples)  # type: ignore[arg-type]


def test_verify_errors_are_value_errors() -> None:
    """``except ValueError`` keeps working for callers written before the project error types."""
    with pytest.raises(ValueError):
        sg.testing.verify(CELL, examples=0)
    with pytest.raises(ValueError, match="backend"):
        sg.testing.verify(CELL, backend="gpu")


def test_verify_accepts_numpy_integers() -> None:
    rep = sg.testing.verify(CELL, examples=np.int64(1), checks=["adjoint"])
    assert len(rep.results) == 1 and rep.passed


@pytest.mark.parametrize("seed", [-1, 1.0, False])
def test_verify_rejects_bad_seeds(seed: object) -> None:
    with pytest.raises(sg.ConfigError, match="seed must be an integer >= 0"):
        sg.testing.verify(CELL, examples=1, seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_verify_rejects_empty_checks(empty: object) -> None:
    with pytest.raises(sg.ConfigError, match="checks is empty: no check would run"):
        sg.testing.verify(CELL, checks=empty)  # type: ignore[arg-type]


def test_verify_rejects_unknown_and_non_string_checks() -> None:
    with pytest.raises(sg.ConfigError, match=r"unknown check\(s\) \['jacobain'\]"):
        sg.testing.verify(CELL, checks=["jacobain"])
    with pytest.raises(sg.ConfigError, match=r"unknown check\(s\) \[3\]"):
        sg.testing.verify(CELL, checks=[3])  # type: ignore[list-item]
    with pytest.raises(sg.ConfigError, match="checks must be None or check names"):
        sg.testing.verify(CELL, checks=3)  # type: ignore[arg-type]
    with pytest.raises(sg.ConfigError, match=r"unknown check\(s\) \['compiled'\] for backend 'reference'"):
        sg.testing.verify(CELL, checks=["compiled"])


def test_verify_takes_one_check_name_as_a_string() -> None:
    rep = sg.testing.verify(CELL, examples=2, checks="adjoint")
    assert [r.check for r in rep.results] == ["adjoint", "adjoint"]


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_verify_rejects_empty_problems(empty: object) -> None:
    with pytest.raises(sg.ConfigError, match="problems is empty: no check would run"):
        sg.testing.verify(CELL, problems=empty)  # type: ignore[arg-type]


def test_verify_rejects_foreign_problems() -> None:
    other = sg.testing.cached_builtin("plain")
    with pytest.raises(sg.ConfigError, match=r"problems\[1\] was drawn for cell 'plain', not for the cell 'leaky'"):
        sg.testing.verify(CELL, problems=[draw_problem(CELL, 0), draw_problem(other, 0)])
    with pytest.raises(sg.ConfigError, match=r"problems\[0\] is a dict, not a symgate.testing.Problem"):
        sg.testing.verify(CELL, problems=[{}])  # type: ignore[list-item]
    with pytest.raises(sg.ConfigError, match="problems must be None or Problems"):
        sg.testing.verify(CELL, problems=7)  # type: ignore[arg-type]


def test_verify_with_given_problems_runs_every_check_on_each() -> None:
    probs = (draw_problem(CELL, s) for s in range(2))  # any iterable, consumed once
    rep = sg.testing.verify(CELL, problems=probs, checks=["adjoint", "batch"])
    assert [r.check for r in rep.results] == ["adjoint", "batch", "adjoint", "batch"]


def test_verify_rejects_a_non_cell() -> None:
    with pytest.raises(sg.CellSpecError, match="verify\\(\\) takes a symgate Cell, got str"):
        sg.testing.verify("leaky")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, message", [
    ({"examples": 0}, "examples must be an integer >= 1, got 0"),
    ({"examples": -1}, "examples must be an integer >= 1, got -1"),
    ({"examples": True}, "examples must be an integer >= 1, got True"),
    ({"seed": -2}, "seed must be an integer >= 0, got -2"),
    ({"backend": "numpy"}, "backend must be 'reference' or 'compiled', got 'numpy'"),
])
def test_battery_test_class_rejects_settings_that_check_nothing(kwargs: dict, message: str) -> None:
    """The error comes when the class is made (at collection), not as a vacuous pass later."""
    with pytest.raises(sg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sg.testing.battery_test_class(CELL, **kwargs)


def test_battery_test_class_rejects_a_non_cell() -> None:
    with pytest.raises(sg.CellSpecError, match="battery_test_class"):
        sg.testing.battery_test_class(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "size n must be an integer >= 1, got 0"),
    ({"B": 0}, "batch size B must be an integer >= 1, got 0"),
    ({"T": 2.5}, "sequence length T must be an integer >= 1, got 2.5"),
    ({"rho": -1.0}, "rho must be a finite positive number"),
    ({"rho": float("nan")}, "rho must be a finite positive number"),
    ({"outputs": 0}, "outputs must be an integer >= 1, got 0"),
])
def test_draw_problem_rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(sg.ConfigError, match=message):
        draw_problem(CELL, 0, **kwargs)


def test_draw_problem_rejects_a_negative_seed() -> None:
    with pytest.raises(sg.ConfigError, match="seed must be an integer >= 0, got -1"):
        draw_problem(CELL, -1)
