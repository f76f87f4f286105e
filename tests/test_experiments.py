"""Experiments: trainer, exact measurements, the three experiments, sweeps and the report.

Expected values are typed here from their definitions (paper-notes §4, §5, §7), not taken
from the code under test.  Tolerances: float64 round-off accumulated over at most a few
hundred operations on O(1) numbers, so 1e-12 relative unless stated otherwise.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import symgate as sg
from symgate.experiments import metrics as M
from symgate.experiments._common import jsonable, model_cell, unjson
from symgate.experiments.appendix import AppendixSettings, released_outliers, run_appendix
from symgate.experiments.report import _more, claims, resolve
from symgate.experiments.s1 import S1Settings, run_s1, summarize_s1
from symgate.experiments.s2 import S2Settings, run_s2
from symgate.experiments.sweep import execute, jobs_for
from symgate.experiments.train import READOUT, Trainer, init_params, resolve_dims, rng_for


def _strip(obj):
    """A job result without its wall time (the only entry allowed to differ between runs)."""
    return {k: v for k, v in obj.items() if k != "seconds"}


# ---------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------


def test_torch_default_initialisation_bounds_and_spread() -> None:
    cell = model_cell("vector_gate")
    p, V = init_params(cell, resolve_dims(cell, 64, 6), 1, rng_for(3, "init"))
    for name, fan_in in (("W", 64), ("U", 6), ("Wg", 64), ("Ug", 6)):
        b = 1 / np.sqrt(fan_in)
        assert np.all(np.abs(p[name]) <= b)
        # U(-b, b) has variance b^2/3; 384+ entries: the sample variance is within 20 % (>5 sigma)
        assert abs(p[name].var() / (b * b / 3) - 1) < 0.2
    assert V.shape == (1, 64) and np.all(np.abs(V) <= 1 / 8)


def test_one_sgd_step_is_theta_minus_lr_times_the_reference_gradient() -> None:
    cell = model_cell("scalar_gate")
    tr = Trainer(cell, "adding", n=8, m=3, B=5, T=12, optimizer="sgd", lr=0.05, seed=2)
    before = tr.state_params()
    x, y = tr.x.copy(), tr.y.copy()  # the first training batch
    ref = sg.reference_kernel(cell).backward({k: before[k] for k in tr.params}, x, None,
                                             loss=sg.losses.last_mse(before[READOUT], y))
    tr.step()
    for k in tr.params:
        np.testing.assert_allclose(tr.params[k], before[k] - 0.05 * ref.params[k], rtol=0, atol=1e-13)
    np.testing.assert_allclose(tr.V, before[READOUT] - 0.05 * ref.readout["V"], rtol=0, atol=1e-13)
    assert tr.losses[0] == pytest.approx(float(ref.value), rel=1e-12)


def test_training_is_deterministic_per_seed_and_learns() -> None:
    kw = dict(n=16, m=2, B=32, T=16, optimizer="adam", lr=1e-2)
    a = Trainer(model_cell("vector_gate"), "adding", seed=1, **kw)
    b = Trainer(model_cell("vector_gate"), "adding", seed=1, **kw)
    c = Trainer(model_cell("vector_gate"), "adding", seed=2, **kw)
    la, lb, lc = a.train(300), b.train(300), c.train(300)
    assert la == lb and la != lc
    # the adding task's variance of y is 2/12 ~ 0.17; a trained model does much better than at the start
    assert np.mean(la[-30:]) < 0.5 * np.mean(la[:30])


def test_per_example_gradients_average_to_the_batch_gradient() -> None:
    cell = model_cell("vector_gate")
    tr = Trainer(cell, "delaysum", n=8, m=2, B=4, T=40, seed=5)
    x, y = tr.task.batch(np.random.default_rng(0), 6, 40, 2)
    G = tr.per_example_gradients(x, y)
    g = sg.reference_kernel(cell).backward(tr.params, x, None, loss=sg.losses.last_mse(tr.V, y))
    flat = np.concatenate([*(g.params[k].ravel() for k in tr.params), g.readout["V"].ravel()])
    # the batch loss is the mean over examples, so its gradient is the mean of theirs
    np.testing.assert_allclose(G.mean(axis=0), flat, rtol=1e-10, atol=1e-14)


def test_gradient_clipping_bounds_the_update() -> None:
    tr = Trainer(model_cell("plain"), "narma10", n=8, m=1, B=4, T=20, optimizer="sgd", lr=1.0, clip=1e-3, seed=0)
    before = tr.state_params()
    tr.step()
    step = np.sqrt(sum(np.sum((tr.opt_params[k] - before[k]) ** 2) for k in before))
    assert step <= 1e-3 * (1 + 1e-12)


def test_a_user_defined_cell_trains() -> None:
    @sg.cell
    def softleak(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "n"), U: sg.Matrix("n", "m"),
                 wg: sg.Matrix(1, "n")):
        g = sg.sigmoid(wg @ h) * 0.5
        return (1 - g) * h + g * sg.tanh(W @ h + U @ x)

    tr = Trainer(softleak, "movingavg", n=8, m=1, B=16, T=12, optimizer="momentum", lr=0.05, seed=0)
    losses = tr.train(60)
    assert all(np.isfinite(losses)) and tr.iteration == 60


@pytest.mark.parametrize("kw, match", [
    (dict(B=0), "B must be"), (dict(task="nope"), "unknown task"), (dict(optimizer="rmsprop"), "rmsprop"),
    (dict(clip=-1.0), "clip"), (dict(jitter=float("nan")), "jitter"),
])
def test_trainer_rejects_bad_settings(kw, match) -> None:
    args = dict(task="adding", n=4, m=2, B=2, T=8)
    args.update(kw)
    task = args.pop("task")
    with pytest.raises(sg.ConfigError, match=match):
        Trainer(model_cell("leaky"), task, **args)


def test_unknown_dimension_needs_a_size() -> None:
    @sg.cell
    def wide(h: sg.State("n"), x: sg.Input("m"), W: sg.Matrix("n", "k"), A: sg.Matrix("k", "n"), U: sg.Matrix("n", "m")):
        return sg.tanh(W @ sg.tanh(A @ h) + U @ x)

    with pytest.raises(sg.ConfigError, match="'k'"):
        Trainer(wide, "adding", n=4, m=2, B=2, T=8)
    tr = Trainer(wide, "adding", n=4, m=2, B=2, T=8, dims={"k": 3})
    assert tr.params["A"].shape == (3, 4)


def test_model_names() -> None:
    assert model_cell("leaky").constants == {"alpha": 0.8}
    assert "b" not in model_cell("vector_gate").param_names  # the paper's models have no biases
    with pytest.raises(sg.ConfigError, match="unknown cell"):
        model_cell("nonexistent")


# ---------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------


def _run(name: str, n: int = 6, m: int = 2, T: int = 9, B: int = 3, seed: int = 0):
    cell = model_cell(name) if name in ("plain", "leaky", "scalar_gate", "vector_gate") else sg.cells.builtin(name)
    p, _ = init_params(cell, resolve_dims(cell, n, m), 1, rng_for(seed, "init"), scheme="normal", std=0.5)
    x = np.random.default_rng(seed).normal(size=(T, B, m))
    return cell, p, x, sg.compile(cell).forward(p, x, None)


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate", "leaky", "lstm", "gru"])
def test_dense_jacobians_match_the_kernel_jacobian_at_every_step(name) -> None:
    cell, p, x, traj = _run(name)
    J = M.dense_jacobians(cell, p, traj)
    k = sg.reference_kernel(cell)
    for t in (1, 4, 9):
        prev = {s: traj.previous(s)[t - 1] for s in cell.state_names}
        np.testing.assert_allclose(J[t - 1], k.jacobian(p, x[t - 1], prev), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["vector_gate", "scalar_gate", "lstm", "gru"])
def test_structured_application_equals_dense_products(name) -> None:
    cell, p, x, traj = _run(name)
    J = M.dense_jacobians(cell, p, traj)
    steps = M._Steps(cell, p, traj)
    N = J.shape[-1]
    X = np.random.default_rng(1).normal(size=(N, 4, 5))
    t, b = np.array([1, 5, 9, 3]), np.array([0, 2, 1, 1])
    Y = M.apply_jacobians(steps, X, t, b)
    for i in range(4):
        np.testing.assert_allclose(Y[:, i], J[t[i] - 1, b[i]] @ X[:, i], rtol=1e-12, atol=1e-14)


def test_lag_sensitivities_are_exact_spectral_norms_in_chain_rule_order() -> None:
    rng = np.random.default_rng(0)
    T, B, N = 7, 2, 5
    J = rng.normal(size=(T, B, N, N)) / np.sqrt(N)
    r = M.lag_sensitivities(J, stride=1, power_iters=None)
    assert r["lag"].size == B * T * (T + 1) // 2  # every pair 0 <= k < t <= T
    for i in rng.choice(r["lag"].size, 12, replace=False):
        b, t, k = r["b"][i], r["t"][i], r["k"][i]
        P = np.eye(N)
        for j in range(k + 1, t + 1):
            P = J[j - 1, b] @ P  # later factors on the left
        assert r["log_S"][i] == pytest.approx(np.log(np.linalg.norm(P, 2)), rel=1e-12, abs=1e-12)


def test_spectral_norms_equal_the_largest_singular_value_at_every_scale() -> None:
    rng = np.random.default_rng(4)
    # square, tall and wide; graded spectra (condition 1e12) and a rank-one matrix; scaled by
    # 1e-200 .. 1e200 (a Gram matrix of the unscaled entries would under/overflow); zeros
    P = rng.normal(size=(24, 9, 9)) @ np.diag(np.geomspace(1, 1e-12, 9))
    P[3] = np.outer(rng.normal(size=9), rng.normal(size=9))
    P *= (10.0 ** rng.uniform(-200, 200, size=24))[:, None, None]
    P[5] = 0.0
    for A in (P, P[:, :, :4], P[:, :4, :]):
        ref = np.array([np.linalg.svd(a, compute_uv=False)[0] for a in A])
        got = M.spectral_norms(A)
        # both are backward stable: relative error a small multiple of N * eps
        np.testing.assert_allclose(got, ref, rtol=20 * 9 * np.finfo(float).eps, atol=0)
        assert got[5] == 0.0
    with pytest.raises(sg.ShapeError, match="K, M, N"):
        M.spectral_norms(P[0])


def test_lag_sensitivities_stay_exact_where_the_product_underflows() -> None:
    # J_j = c Q_j with Q_j orthogonal: ||J_t ... J_{k+1}||_2 = c^(t-k) exactly; c^80 = 1e-400 underflows float64
    rng = np.random.default_rng(1)
    T, N, c = 80, 4, 1e-5
    Q = np.linalg.qr(rng.normal(size=(T, 1, N, N)))[0]
    r = M.lag_sensitivities(c * Q, stride=1, power_iters=5, rng=np.random.default_rng(0))
    np.testing.assert_allclose(r["log_S"], r["lag"] * np.log(c), rtol=1e-12)
    # the released estimator (normalising by ||v|| + 1e-12) collapses once the norm is below ~1e-12
    tiny = r["lag"] * np.log(c) < np.log(1e-13)
    assert np.all(r["log_S_power"][tiny] < r["log_S"][tiny] - 1)
    big = r["lag"] == 1  # norm 1e-5: the estimator is exact for an orthogonal multiple
    np.testing.assert_allclose(r["log_S_power"][big], np.log(c), rtol=1e-6)


def test_endpoint_stride_takes_every_sth_endpoint() -> None:
    J = np.tile(np.eye(3), (20, 1, 1, 1))
    r = M.lag_sensitivities(J, stride=4, power_iters=None, first_k=1)
    assert sorted(set(r["t"])) == [4, 8, 12, 16, 20]
    assert np.all(r["k"] >= 1) and r["lag"].size == sum(t - 1 for t in (4, 8, 12, 16, 20))


def test_loglog_fit_and_profile_on_known_data() -> None:
    rng = np.random.default_rng(2)
    logP = rng.uniform(-10, 0, 500)
    f = M.loglog_fit(logP, 1.5 + 0.4 * logP, trim=0.01)
    assert f["slope"] == pytest.approx(0.4, rel=1e-12) and f["R2"] == pytest.approx(1.0, abs=1e-12)
    assert f["pairs"] < 500  # the 1 % tails of P are trimmed
    lag = np.array([1, 1, 1, 2, 2, 3])
    logv = np.log([4.0, 2.0, 8.0, 1.0, 3.0, 0.5])
    np.testing.assert_allclose(np.exp(M.lag_profile(lag, logv, [1, 2, 3])), [1.0, 2.0 / 4.0, 0.5 / 4.0])


def test_spectrum_indices_typed_from_their_definitions() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0])
    ind = M.spectrum_indices(s, r=2, top=3)
    assert ind["AI"] == pytest.approx(2.0)
    assert ind["CE"] == pytest.approx((16 + 4) / 22)
    assert ind["CE_top"] == pytest.approx((16 + 4) / 21)
    assert ind["PR"] == pytest.approx(22**2 / (256 + 16 + 1 + 1))
    p = s / 8
    assert ind["erank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))


def test_propagation_anisotropy_of_an_isotropic_transport() -> None:
    # leaky cell with W = 0: J_j = (1 - alpha) I, every product is a multiple of I
    cell = model_cell("leaky")
    n = 12
    p = {"W": np.zeros((n, n)), "U": np.random.default_rng(0).normal(size=(n, 2))}
    x = np.random.default_rng(1).normal(size=(30, 4, 2))
    traj = sg.compile(cell).forward(p, x, None)
    res = M.propagation_anisotropy(cell, p, traj, [1, 5, 20], 8, np.random.default_rng(0), r=4, top=8)
    for row in res["per_lag"]:
        assert row["AI"]["median"] == pytest.approx(1.0, rel=1e-12)
        assert row["CE"]["median"] == pytest.approx(4 / n, rel=1e-12)
        assert row["CE_top"]["median"] == pytest.approx(4 / 8, rel=1e-12)
        assert row["PR"]["median"] == pytest.approx(n, rel=1e-12)


def test_gradient_anisotropy_follows_its_definition() -> None:
    rng = np.random.default_rng(3)
    G = rng.normal(size=(40, 7)) @ np.diag([5, 3, 1, 1, 0.5, 0.1, 0.0])
    res = M.gradient_anisotropy(G, r=3, top=5)
    X = G / np.linalg.norm(G, axis=1, keepdims=True)
    X = X - X.mean(axis=0)
    X = X[:, np.linalg.norm(X, axis=0) > 1e-10 * np.sqrt(40)]  # the all-zero column goes
    s = np.linalg.svd(X, compute_uv=False)
    assert res["columns"] == 6
    assert res["AI"] == pytest.approx(s[0] / s[2], rel=1e-9)
    assert res["CE"] == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s**2), rel=1e-9)
    with pytest.raises(sg.ShapeError):
        M.gradient_anisotropy(np.zeros((3, 4)))


# ---------------------------------------------------------------------------------------
# experiments
# ---------------------------------------------------------------------------------------


def test_s1_predicted_profiles_of_the_leaky_cell_are_the_closed_forms() -> None:
    s = S1Settings.quick().replace(steps=10, checkpoints=(0, 10))
    r = unjson(run_s1(s, "leaky", 1))
    alpha = s.alpha
    h = np.arange(1, s.T)
    for cp in r["checkpoints"]:
        # derived mu = alpha (1-alpha)^h; released predictor = alpha^(h+1); both normalised at h = 1
        np.testing.assert_allclose(cp["predicted"]["exact"], (h - 1) * np.log(1 - alpha), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cp["predicted"]["s1"], (h - 1) * np.log(alpha), rtol=1e-12, atol=1e-12)
        assert cp["profile"]["exact_norm"][0] == 0.0
        assert np.all(np.diff(cp["profile"]["exact_norm"]) < 0.5)  # the exact profile decays with the lag
        # the two conventions differ by a change of log scale only: slopes in ratio log(1-a)/log(a), same R^2
        fe, fs = cp["fit"]["exact"]["exact_norm"], cp["fit"]["s1"]["exact_norm"]
        assert fs["slope"] == pytest.approx(fe["slope"] * np.log(1 - alpha) / np.log(alpha), rel=1e-9)
        assert fs["R2"] == pytest.approx(fe["R2"], rel=1e-9)
    assert len(r["loss"]) == 10


def test_s1_summary_and_claims() -> None:
    s = S1Settings.quick().replace(models=("scalar_gate",), steps=20, checkpoints=(0, 20))
    runs = [run_s1(s, "scalar_gate", seed) for seed in (1, 2)]
    summ = summarize_s1(s, runs)
    cp = summ["scalar_gate"]["checkpoints"][-1]
    assert cp["slope_exact_exact_norm"]["per_seed"] == [r["checkpoints"][-1]["fit"]["exact"]["exact_norm"]["slope"] for r in runs]
    results = {"experiments": {"s1": {"settings": s.as_dict(), "summary": summ}}}
    rows = claims(results)
    assert {r["id"] for r in rows} == {"S1-lag-scalar_gate", "S1-predict-scalar_gate"}
    for row in rows:
        for path in row["source"]:
            resolve(results, path)  # every number of the evidence is found in the results


def test_s2_job_measures_both_kinds_of_anisotropy() -> None:
    s = S2Settings.quick().replace(iterations=10, checkpoints=(0, 10), lags=(1, 3), pairs_per_lag=6, probe_B=4,
                                   grad_examples=10, n=8, T=40)
    r = unjson(run_s2(s, "delaysum", 0, 1))  # plain + Adam
    assert r["model"] == "plain+adam" and len(r["checkpoints"]) == 2
    cp0, cp1 = r["checkpoints"]
    assert "adam_updates" not in cp0["updates"]  # no Adam statistics before the first step
    assert "adam_updates" in cp1["updates"]
    assert [row["lag"] for row in cp1["propagation"]["per_lag"]] == [1, 3]
    for row in cp1["propagation"]["per_lag"]:
        assert row["AI"]["median"] >= 1 and 0 < row["CE"]["median"] <= row["CE_top"]["median"] <= 1
    g = unjson(run_s2(s, "delaysum", 2, 1))
    assert g["model"] == "vector_gate+sgd" and "adam_updates" not in g["checkpoints"][1]["updates"]


def test_appendix_expansion_is_second_order_for_any_cell() -> None:
    s = AppendixSettings.quick().replace(T=20, n=8)
    for cell in ("vector_gate", "scalar_gate", "gru"):
        r = run_appendix(s, cell, 0)
        assert abs(r["slope"] - 2) < 0.05, (cell, r["slope"])
        assert r["first_vs_central_difference"] < 1e-6  # L1 is the derivative of F at 0 (central difference, O(h^2))


def test_released_outlier_rule() -> None:
    assert released_outliers([1.0, 1.1, 0.9, 1.05, 10.0]) == [4]
    assert released_outliers([1.0, 1.0, 1.0]) == []


def test_claim_verdicts() -> None:
    a = {"median": 5.0, "q25": 4.0, "q75": 6.0}
    assert _more(a, {"median": 4.0, "q25": 3.5, "q75": 4.5}, True) == "exceeds"
    assert _more(a, {"median": 5.5, "q25": 5.2, "q75": 7.0}, True) == "matches"
    assert _more(a, {"median": 9.0, "q25": 8.0, "q75": 10.0}, True) == "no"
    assert _more(a, {"median": 9.0, "q25": 8.0, "q75": 10.0}, False) == "exceeds"  # lower is more anisotropic


@pytest.mark.parametrize("cls, kw, match", [
    (S1Settings, dict(task="zzz"), "unknown task"), (S1Settings, dict(checkpoints=(0, 900)), "checkpoints"),
    (S1Settings, dict(alpha=1.5), "alpha"), (S2Settings, dict(lags=(0,)), "lags"),
    (S2Settings, dict(models=(("plain", "adam"),)), "model"), (AppendixSettings, dict(eps=(1.0,)), "eps"),
    (S1Settings, dict(T=0), "T must"),
])
def test_settings_are_checked(cls, kw, match) -> None:
    with pytest.raises(sg.ConfigError, match=match):
        cls(**kw)


def test_json_of_non_finite_numbers_round_trips() -> None:
    obj = {"a": np.array([1.0, np.nan, -np.inf]), "b": np.float64(np.inf), "c": np.int64(3)}
    text = json.dumps(jsonable(obj), allow_nan=False)
    back = unjson(json.loads(text))
    assert np.isnan(back["a"][1]) and back["a"][2] == -np.inf and back["b"] == np.inf and back["c"] == 3


# ---------------------------------------------------------------------------------------
# sweeps and the report
# ---------------------------------------------------------------------------------------


def _tiny_jobs() -> list:
    s1 = S1Settings.quick().replace(models=("vector_gate",), steps=6, checkpoints=(0, 6), T=12, n=8, probe_B=2)
    s2 = S2Settings.quick().replace(tasks=("narma10",), iterations=6, checkpoints=(6,), T=16, n=8, lags=(1, 2),
                                    pairs_per_lag=4, probe_B=3, grad_examples=6)
    ap = AppendixSettings.quick().replace(T=10, n=6)
    return jobs_for("s1", s1, [1, 2]) + jobs_for("s2", s2, [1]) + jobs_for("appendix", ap, [0])


def test_a_sweep_on_a_dask_local_cluster_equals_the_serial_sweep_bit_for_bit() -> None:
    jobs = _tiny_jobs()
    serial = execute(jobs, scheduler="serial", progress=False)
    dask = execute(jobs, scheduler="local", workers=2, progress=False)
    assert len(serial) == len(dask) == len(jobs)
    for a, b in zip(serial, dask):
        # json text equality: every float identical to the last bit (repr round-trips doubles)
        assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


def _worker_env() -> dict:
    import os

    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}


def test_local_cluster_workers_are_single_threaded_and_keep_the_adaptive_malloc(monkeypatch) -> None:
    from distributed import Client

    from symgate.experiments.sweep import local_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_cluster(1) as cluster, Client(cluster) as client:
        envs = list(client.run(_worker_env).values())
    assert envs == [{"MALLOC_TRIM_THRESHOLD_": None, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}]


def test_execute_rejects_bad_schedulers() -> None:
    with pytest.raises(sg.ConfigError, match="scheduler"):
        execute(_tiny_jobs()[:1], scheduler="")
    with pytest.raises(sg.ConfigError, match="workers"):
        execute(_tiny_jobs()[:1], scheduler="local", workers=0)
    with pytest.raises(sg.ConfigError, match="cannot reach"):
        execute(_tiny_jobs()[:1], scheduler="tcp://127.0.0.1:9", progress=False, connect_timeout=1.0)
    with pytest.raises(sg.ConfigError, match="unknown experiment"):
        jobs_for("s3", S1Settings(), [1])


def test_reproduce_quick_writes_a_traceable_report(tmp_path) -> None:
    from symgate.experiments import reproduce

    res = reproduce("all", quick=True, seeds=2, out=str(tmp_path), scheduler="serial", progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["experiments"]) == {"s1", "s2", "appendix"}
    assert on_disk["meta"]["versions"]["numpy"] == np.__version__
    assert len(on_disk["experiments"]["s2"]["runs"]) == 4 * 3 * 2
    ids = {c["id"] for c in on_disk["claims"]}
    assert {"S1-lag-leaky", "S2-vector_gate-vs-adam-narma10", "A-slope-vector_gate"} <= ids
    for c in on_disk["claims"] + on_disk["method_comparisons"]:
        assert c["source"], c
        for path in c["source"]:
            resolve(on_disk, path)
    for c in on_disk["claims"]:
        assert c["holds"] in ("yes", "no", "partly", "n/a")
    report = (tmp_path / "report.md").read_text()
    for c in on_disk["claims"]:
        assert c["id"] in report
    for p in res["paths"]["plots"]:
        assert os.path.getsize(p) > 10_000, p
        assert os.path.basename(p) in report


def test_reproduce_refuses_an_unwritable_output_directory(tmp_path) -> None:
    from symgate.experiments import reproduce

    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(sg.ConfigError, match="cannot write"):
        reproduce("appendix", quick=True, out=str(target / "sub"), scheduler="serial", progress=False)
    with pytest.raises(sg.ConfigError, match="unknown experiment"):
        reproduce("s9", quick=True, out=str(tmp_path), scheduler="serial")


def test_cli_reproduce(tmp_path, capsys) -> None:
    from symgate.cli import main

    rc = main(["reproduce", "appendix", "--quick", "--seeds", "2", "--out", str(tmp_path), "--scheduler", "serial",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "A-slope-vector_gate" in out and "report.md" in out
    assert (tmp_path / "appendix_expansion.png").exists()
    assert main(["reproduce", "s1", "--quick", "--seeds", "0", "--out", str(tmp_path), "--scheduler", "serial"]) == 2


def test_cli_reproduce_runs_a_users_cell_from_a_file(tmp_path, capsys) -> None:
    from symgate.cli import main

    f = tmp_path / "mycell.py"
    f.write_text(
        "import symgate as sg\n"
        "@sg.cell\n"
        "def halfgate(h: sg.State('n'), x: sg.Input('m'), W: sg.Matrix('n', 'n'), U: sg.Matrix('n', 'm'),\n"
        "             Wg: sg.Matrix('n', 'n')):\n"
        "    g = 0.5 * sg.sigmoid(Wg @ h)\n"
        "    return (1 - g) * h + g * sg.tanh(W @ h + U @ x)\n")
    out = tmp_path / "out"
    rc = main(["reproduce", "all", "--quick", "--seeds", "1", "--out", str(out), "--scheduler", "serial", "--no-progress",
               "--models", f"{f}:halfgate,leaky"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in res["experiments"]["s1"]["runs"]} == {f"{f}:halfgate", "leaky"}
    ids = {c["id"]: c for c in res["claims"]}
    assert "S1-predict-halfgate" in ids
    assert ids["A-slope-halfgate"]["holds"] == "yes"  # its gate terms expand to second order
    assert ids["A-slope-leaky"]["holds"] == "n/a"  # a constant rate has no gate terms


def test_the_committed_20_seed_report_is_traceable() -> None:
    """docs/reproduction holds the measured paper-settings run: every number of its claims resolves."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs" / "reproduction"
    res = json.loads((root / "results.json").read_text())
    report = (root / "report.md").read_text()
    assert res["meta"]["preset"] == "paper" and res["meta"]["seeds"] == 20
    for c in res["claims"] + res["method_comparisons"]:
        for path in c["source"]:
            resolve(res, path)
    for c in res["claims"]:
        assert c["id"] in report
    for plots in res["plots"].values():
        for p in plots:
            assert (root / p).exists() and p in report
