"""Tests of the synthetic tasks: layout, marker rules, targets, seeding, validation.

Every target is recomputed here from the generated inputs with a plain
per-sequence Python loop that follows the task's definition, independently of
the vectorised generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symgate._errors import ConfigError, NumericalError, SymgateError
from symgate.experiments.tasks import (
    TASKS,
    AddingTask,
    CopyTask,
    DelaySumTask,
    MovingAverageTask,
    Narma10Task,
    RecallTask,
    Task,
    get_task,
)

NAMES = ["adding", "recall", "copy", "movingavg", "delaysum", "narma10"]


# ---------------------------------------------------------------------------
# independent reference targets (naive loops over sequences and steps)


def _marks(x: np.ndarray, b: int) -> list[int]:
    """Steps where the last channel of sequence b is 1; asserts the mask is 0/1."""
    T, _, m = x.shape
    out = []
    for t in range(T):
        v = float(x[t, b, m - 1])
        assert v in (0.0, 1.0), f"mask value {v} at step {t}"
        if v == 1.0:
            out.append(t)
    return out


def ref_adding(x: np.ndarray) -> np.ndarray:
    T, B, m = x.shape
    y = np.empty((B, 1))
    for b in range(B):
        marks = _marks(x, b)
        assert len(marks) == 2, marks
        assert 0 <= marks[0] < T // 2 <= marks[1] < T, (marks, T)
        for t in range(T):
            for c in range(m - 1):
                assert 0.0 <= x[t, b, c] < 1.0
        y[b, 0] = float(x[marks[0], b, 0]) + float(x[marks[1], b, 0])
    return y


def ref_recall(x: np.ndarray, K: int) -> np.ndarray:
    T, B, m = x.shape
    L = max(K, T // 3)
    y = np.empty((B, 1))
    for b in range(B):
        marks = _marks(x, b)
        assert len(marks) == K and len(set(marks)) == K, marks
        assert all(0 <= s < L for s in marks), (marks, L)
        for t in range(T):
            for c in range(m - 1):
                assert 0.0 <= x[t, b, c] < 1.0
        y[b, 0] = math.fsum(float(x[s, b, 0]) for s in marks)
    return y


def ref_copy(x: np.ndarray, K: int) -> np.ndarray:
    T, B, m = x.shape
    y = np.empty((B, K))
    for b in range(B):
        for t in range(T):
            for c in range(m):
                v = float(x[t, b, c])
                if c == m - 1:
                    assert v == (1.0 if t == T - 1 else 0.0), (t, c, v)
                elif c == 0 and t < K:
                    assert 0.0 <= v < 1.0
                else:
                    assert v == 0.0, (t, c, v)
        for k in range(K):
            y[b, k] = x[k, b, 0]
    return y


def _check_single_channel(x: np.ndarray, hi: float = 1.0) -> None:
    T, B, m = x.shape
    for b in range(B):
        for t in range(T):
            assert 0.0 <= x[t, b, 0] < hi
            for c in range(1, m):
                assert x[t, b, c] == 0.0


def ref_movingavg(x: np.ndarray, W: int) -> np.ndarray:
    _check_single_channel(x)
    T, B, _ = x.shape
    y = np.empty((B, 1))
    for b in range(B):
        y[b, 0] = math.fsum(float(x[t, b, 0]) for t in range(T - W, T)) / W
    return y


def ref_delaysum(x: np.ndarray, delays, weights) -> np.ndarray:
    _check_single_channel(x)
    T, B, _ = x.shape
    y = np.empty((B, 1))
    for b in range(B):
        y[b, 0] = math.fsum(w * float(x[T - 1 - d, b, 0]) for d, w in zip(delays, weights))
    return y


def narma10_scalar(u: list[float]) -> float:
    """NARMA-10 typed out: y[0] = 0, y[t+1] from y[t-9..t] and u[t-9], u[t]; returns y[T]."""
    T = len(u)
    y = [0.0] * (T + 1)
    for t in range(T):
        s = 0.0
        for i in range(10):
            if t - i >= 0:
                s += y[t - i]
        uu = u[t - 9] * u[t] if t - 9 >= 0 else 0.0
        y[t + 1] = 0.3 * y[t] + 0.05 * y[t] * s + 1.5 * uu + 0.1
    return y[T]


def ref_narma10(x: np.ndarray) -> np.ndarray:
    _check_single_channel(x, hi=0.5)
    T, B, _ = x.shape
    return np.array([[narma10_scalar([float(x[t, b, 0]) for t in range(T)])] for b in range(B)])


def reference(task: Task, x: np.ndarray) -> np.ndarray:
    if task.name == "adding":
        return ref_adding(x)
    if task.name == "recall":
        return ref_recall(x, task.K)
    if task.name == "copy":
        return ref_copy(x, task.K)
    if task.name == "movingavg":
        return ref_movingavg(x, task.W)
    if task.name == "delaysum":
        return ref_delaysum(x, task.delays, task.weights)
    if task.name == "narma10":
        return ref_narma10(x)
    raise AssertionError(task.name)


def _check_layout(task: Task, x: np.ndarray, y: np.ndarray, B: int, T: int, m: int) -> None:
    assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
    assert x.shape == (T, B, m)
    assert y.shape == (B, task.outputs(m, T))
    assert x.dtype == np.float64 and y.dtype == np.float64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))


# ---------------------------------------------------------------------------
# registry


def test_registry_order_and_lookup():
    assert list(TASKS) == NAMES
    for name in NAMES:
        t = get_task(name)
        assert t is TASKS[name]
        assert t.name == name
        assert isinstance(t, Task)


def test_registry_metadata():
    assert [TASKS[n].min_m for n in NAMES] == [2, 2, 2, 1, 1, 1]
    assert [TASKS[n].min_T() for n in NAMES] == [2, 15, 6, 8, 37, 10]
    assert [TASKS[n].outputs(3, 50) for n in NAMES] == [1, 1, 5, 1, 1, 1]
    assert TASKS["recall"].K == 5 and TASKS["copy"].K == 5 and TASKS["movingavg"].W == 8
    assert TASKS["delaysum"].delays == (4, 12, 24, 36)
    assert TASKS["delaysum"].weights == (0.25, 0.25, 0.25, 0.25)


@pytest.mark.parametrize("bad", ["nope", "Adding", "", None, 3])
def test_unknown_task(bad):
    with pytest.raises(ConfigError) as e:
        get_task(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for name in NAMES:
        assert name in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, SymgateError)


def test_tasks_are_frozen():
    t = get_task("recall")
    with pytest.raises(Exception):
        t.K = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------
# targets, layout and marker rules over random sizes and seeds


@given(
    name=st.sampled_from(NAMES),
    B=st.integers(1, 5),
    extra_T=st.integers(0, 25),
    extra_m=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_targets_match_definitions(name, B, extra_T, extra_m, seed):
    task = get_task(name)
    T, m = task.min_T() + extra_T, task.min_m + extra_m
    x, y = task.batch(np.random.default_rng(seed), B, T, m)
    _check_layout(task, x, y, B, T, m)
    np.testing.assert_allclose(y, reference(task, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "task",
    [
        RecallTask(K=1),
        RecallTask(K=3),
        CopyTask(K=1),
        CopyTask(K=7),
        MovingAverageTask(W=1),
        MovingAverageTask(W=3),
        DelaySumTask(delays=(0,), weights=(2.0,)),
        DelaySumTask(delays=(0, 2, 5), weights=(1.0, -0.5, 3)),
        DelaySumTask(delays=[3, 1]),
    ],
    ids=repr,
)
@pytest.mark.parametrize("extra_T", [0, 1, 13])
def test_custom_parameters(task, extra_T):
    B, m = 4, task.min_m + 1
    T = task.min_T() + extra_T
    x, y = task.batch(np.random.default_rng(7), B, T, m)
    _check_layout(task, x, y, B, T, m)
    np.testing.assert_allclose(y, reference(task, x), rtol=1e-12, atol=1e-14)


def test_custom_parameter_metadata():
    assert RecallTask(K=3).min_T() == 9
    assert CopyTask(K=3).outputs(2, 10) == 3 and CopyTask(K=3).min_T() == 4
    assert MovingAverageTask(W=3).min_T() == 3
    d = DelaySumTask(delays=[3, 1])
    assert d.delays == (3, 1) and d.weights == (0.5, 0.5) and d.min_T() == 4
    assert DelaySumTask(delays=(0, 2), weights=[1, -2]).weights == (1.0, -2.0)
    assert RecallTask(K=np.int64(2)).K == 2 and type(RecallTask(K=np.int64(2)).K) is int


def test_adding_marker_positions_cover_each_half():
    T, B = 11, 3000
    x, _ = get_task("adding").batch(np.random.default_rng(1), B, T, 2)
    t_idx, b_idx = np.nonzero(x[:, :, 1])
    assert len(t_idx) == 2 * B
    first = np.zeros(B, dtype=int) - 1
    second = np.zeros(B, dtype=int) - 1
    for t, b in zip(t_idx, b_idx):
        if t < T // 2:
            assert first[b] == -1
            first[b] = t
        else:
            assert second[b] == -1
            second[b] = t
    assert set(first.tolist()) == set(range(T // 2))
    assert set(second.tolist()) == set(range(T // 2, T))


def test_recall_positions_are_distinct_and_cover_first_third():
    K, T, B = 5, 31, 2000  # T // 3 = 10
    x, _ = get_task("recall").batch(np.random.default_rng(2), B, T, 3)
    mask = x[:, :, 2]
    assert np.all(mask.sum(axis=0) == K)
    assert np.all(mask[T // 3 :] == 0)
    counts = mask.sum(axis=1)[: T // 3]
    # each of the 10 admissible steps is marked with probability K / 10 = 1/2
    assert np.all(np.abs(counts / B - 0.5) < 0.06), counts


def test_recall_at_minimal_length_marks_the_first_K_steps():
    task = RecallTask(K=4)
    x, y = task.batch(np.random.default_rng(3), 6, 12, 2)  # T // 3 = K
    assert np.all(x[:4, :, 1] == 1) and np.all(x[4:, :, 1] == 0)
    np.testing.assert_allclose(y[:, 0], x[:4, :, 0].sum(axis=0), rtol=1e-14)


def test_copy_structure():
    task = get_task("copy")
    T, B, m = 20, 3, 4
    x, y = task.batch(np.random.default_rng(4), B, T, m)
    assert np.all(x[T - 1, :, m - 1] == 1.0) and np.all(x[: T - 1, :, m - 1] == 0.0)
    assert np.all(x[5:, :, 0] == 0.0)
    assert np.all(x[:, :, 1 : m - 1] == 0.0)
    assert np.all(x[:5, :, 0] > 0.0)
    assert np.array_equal(y, x[:5, :, 0].T)
    # minimal delay: the cue follows the last value immediately
    x, y = task.batch(np.random.default_rng(4), B, 6, 2)
    assert np.all(x[5, :, 1] == 1.0) and np.all(x[5, :, 0] == 0.0)


def test_narma10_scalar_loop_long_sequence():
    task = get_task("narma10")
    x, y = task.batch(np.random.default_rng(5), 3, 200, 2)
    for b in range(3):
        u = [float(v) for v in x[:, b, 0]]
        assert y[b, 0] == pytest.approx(narma10_scalar(u), rel=1e-12)
        assert 0.0 <= min(u) and max(u) < 0.5
    assert np.all(x[:, :, 1] == 0.0)


def test_narma10_first_steps_by_hand():
    # before u_{t-9} exists only the constant drives: y_1 = 0.1, y_2 = 0.03 + 0.05*0.1*0.1 + 0.1, ...
    x, y = get_task("narma10").batch(np.random.default_rng(0), 2, 10, 1)
    ys = [0.0]
    for t in range(9):
        yt = ys[-1]
        ys.append(0.3 * yt + 0.05 * yt * sum(ys[max(0, t - 9) : t + 1]) + 0.1)
    # at t = 9, u_0 u_9 enters
    u = x[:, :, 0]
    expected = 0.3 * ys[9] + 0.05 * ys[9] * sum(ys[0:10]) + 1.5 * u[0] * u[9] + 0.1
    np.testing.assert_allclose(y[:, 0], expected, rtol=1e-13)
    assert ys[1] == 0.1 and ys[2] == pytest.approx(0.03 + 0.05 * 0.1 * 0.1 + 0.1)


class _HugeGenerator(np.random.Generator):
    """A Generator whose uniforms are scaled up, to drive NARMA-10 to overflow."""

    def random(self, *args, **kwargs):  # type: ignore[override]
        return 1e3 * super().random(*args, **kwargs)


def test_narma10_divergence_raises_numerical_error():
    with pytest.raises(NumericalError, match="narma10"):
        get_task("narma10").batch(_HugeGenerator(np.random.PCG64(0)), 2, 30, 1)


def test_non_finite_target_raises_numerical_error():
    class Bad(MovingAverageTask):
        def _generate(self, rng, B, T, m):
            x, y = super()._generate(rng, B, T, m)
            y[-1, 0] = np.nan
            return x, y

    with pytest.raises(NumericalError, match=r"non-finite target .*\(2, 0\)"):
        Bad().batch(np.random.default_rng(0), 3, 8, 1)


# ---------------------------------------------------------------------------
# seeding


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_batch_different_seed_different_batch(name):
    task = get_task(name)
    T, m = task.min_T() + 5, task.min_m + 1
    x1, y1 = task.batch(np.random.default_rng(123), 4, T, m)
    x2, y2 = task.batch(np.random.default_rng(123), 4, T, m)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x3, y3 = task.batch(np.random.default_rng(124), 4, T, m)
    assert not np.array_equal(x1, x3) and not np.array_equal(y1, y3)


@pytest.mark.parametrize("name", NAMES)
def test_only_the_given_generator_is_used(name):
    task = get_task(name)
    T, m = task.min_T() + 3, task.min_m
    rng = np.random.default_rng(9)
    state = rng.bit_generator.state
    legacy = np.random.get_state()
    try:
        np.random.seed(0)
        x1, y1 = task.batch(rng, 3, T, m)
        # consecutive batches differ; restoring the state reproduces the first
        x2, _ = task.batch(rng, 3, T, m)
        assert not np.array_equal(x1, x2)
        rng.bit_generator.state = state
        np.random.seed(1)  # the legacy global state plays no part
        x3, y3 = task.batch(rng, 3, T, m)
    finally:
        np.random.set_state(legacy)
    assert np.array_equal(x1, x3) and np.array_equal(y1, y3)


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("name", NAMES)
def test_m_too_small(name):
    task = get_task(name)
    with pytest.raises(ConfigError, match=rf"m of task '{name}' must be an integer >= {task.min_m}"):
        task.batch(np.random.default_rng(0), 2, task.min_T(), task.min_m - 1)


@pytest.mark.parametrize("name", NAMES)
def test_T_too_small(name):
    task = get_task(name)
    with pytest.raises(ConfigError, match=rf"T of task '{name}' must be an integer >= {task.min_T()}"):
        task.batch(np.random.default_rng(0), 2, task.min_T() - 1, task.min_m)


@pytest.mark.parametrize("which", ["B", "T", "m"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3", None])
def test_bad_sizes(which, bad):
    task = get_task("adding")
    kw = {"B": 2, "T": 10, "m": 2}
    kw[which] = bad
    with pytest.raises(ConfigError, match=which):
        task.batch(np.random.default_rng(0), **kw)


def test_numpy_integer_sizes_accepted():
    x, y = get_task("adding").batch(np.random.default_rng(0), np.int64(2), np.int32(10), np.int16(3))
    assert x.shape == (10, 2, 3) and y.shape == (2, 1)


@pytest.mark.parametrize("bad", [0, None, np.random.RandomState(0), np.random.PCG64(0), "seed"])
def test_rng_must_be_generator(bad):
    with pytest.raises(ConfigError, match="numpy.random.Generator"):
        get_task("adding").batch(bad, 2, 10, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RecallTask(K=0),
        lambda: RecallTask(K=2.0),
        lambda: RecallTask(K=True),
        lambda: CopyTask(K=0),
        lambda: CopyTask(K=-3),
        lambda: MovingAverageTask(W=0),
        lambda: MovingAverageTask(W="8"),
        lambda: DelaySumTask(delays=()),
        lambda: DelaySumTask(delays=(1, -1)),
        lambda: DelaySumTask(delays=(1.5,)),
        lambda: DelaySumTask(delays=5),
        lambda: DelaySumTask(delays=(1, 2), weights=(1.0,)),
        lambda: DelaySumTask(delays=(1,), weights=(float("nan"),)),
        lambda: DelaySumTask(delays=(1,), weights=(float("inf"),)),
        lambda: DelaySumTask(delays=(1,), weights=("a",)),
        lambda: DelaySumTask(delays=(1,), weights=3.0),
    ],
)
def test_bad_task_parameters(make):
    with pytest.raises(ConfigError):
        make()


def test_task_names_are_fixed():
    assert Narma10Task().name == "narma10" and AddingTask().name == "adding"
    with pytest.raises(TypeError):
        AddingTask(name="other")  # type: ignore[call-arg]
