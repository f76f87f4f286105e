r"""Claims, plots and the Markdown report of a reproduction run.

:func:`claims` turns the summaries into rows ``{id, experiment, claim, evidence, holds,
source}``: the paper's statement, the measured evidence with its numbers, a verdict by a
rule stated in the row, and the path of every number in ``results.json``.
:func:`plot_all` writes one PNG per claim; :func:`write_report` writes ``report.md``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from ._common import MODEL_LABELS, unjson

__all__ = ["claims", "plot_all", "write_report", "method_comparisons", "resolve"]


def resolve(results: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (``a.b[2].c``) in ``results``: how a claim's ``source`` is read."""
    import re

    cur: Any = results
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if m is None:
            raise KeyError(f"malformed path component {part!r} in {path!r}")
        cur = cur[m.group(1)]
        for idx in re.findall(r"\[(\d+)\]", m.group(2)):
            cur = cur[int(idx)]
    return cur

#: the verdict thresholds, stated in the report
R2_PREDICTS = 0.8
SLOPE_TOL = 0.1
RATIO_SMALL = 0.5
REL_REMAINDER_SMALL = 0.1


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return str(f)
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 1e-3):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def _iqr(s: Mapping[str, Any]) -> str:
    return f"{_fmt(s['median'])} [{_fmt(s['q25'])}, {_fmt(s['q75'])}]"


# --------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------


def _claims_s1(settings: Mapping[str, Any], summ: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    h = max(1, settings["T"] // 4)
    last = len(settings["checkpoints"]) - 1
    for model, m in summ.items():
        cp = m["checkpoints"][last]
        prof = cp["profile_exact_norm"]
        med, q75 = unjson(prof["median"][h - 1]), unjson(prof["q75"][h - 1])
        holds = bool(np.isfinite(q75) and q75 < 0)
        rows.append({
            "id": f"S1-lag-{model}", "experiment": "s1",
            "claim": f"Effective learning rates are lag-dependent ({MODEL_LABELS.get(model, model)}): the sensitivity of the "
                     "update to a step h back decays with h.",
            "evidence": f"after {cp['iteration']} SGD steps, median over {len(m['seeds'])} seeds of μ̃_eff({h}) = "
                        f"{_fmt(np.exp(med))} (upper quartile {_fmt(np.exp(q75))}); exact spectral norms.",
            "rule": f"holds if the upper quartile of μ̃_eff({h}) is below 1",
            "holds": "yes" if holds else "no",
            "source": [f"experiments.s1.summary.{model}.checkpoints[{last}].profile_exact_norm.median[{h - 1}]",
                       f"experiments.s1.summary.{model}.checkpoints[{last}].profile_exact_norm.q75[{h - 1}]"],
            "note": "profiles are stored as natural logs",
        })
        r2 = cp["R2_exact_exact_norm"]
        sl = cp["slope_exact_exact_norm"]
        r2s1 = cp["R2_s1_exact_norm"]
        rows.append({
            "id": f"S1-predict-{model}", "experiment": "s1",
            "claim": f"The zeroth-order gate product predicts the lag profile ({MODEL_LABELS.get(model, model)}): "
                     "log S ≈ a + s log P.",
            "evidence": f"R² = {_iqr(r2)} with the derived μ (write gain × retention), slope s = {_iqr(sl)}; "
                        f"with the released predictor ∏g: R² = {_iqr(r2s1)}, s = {_iqr(cp['slope_s1_exact_norm'])} "
                        "(median [IQR] over seeds, final checkpoint).",
            "rule": f"holds if the median R² (derived μ) is at least {R2_PREDICTS}",
            "holds": "yes" if unjson(r2["median"]) >= R2_PREDICTS else "no",
            "source": [f"experiments.s1.summary.{model}.checkpoints[{last}].{k}"
                       for k in ("R2_exact_exact_norm", "slope_exact_exact_norm", "R2_s1_exact_norm", "slope_s1_exact_norm")],
        })
    return rows


def _more(a: Mapping[str, Any], b: Mapping[str, Any], higher: bool) -> str:
    """'exceeds' if a's median is more anisotropic than b's, 'matches' if their IQRs overlap, else 'no'."""
    am, bm = unjson(a["median"]), unjson(b["median"])
    if not (np.isfinite(am) and np.isfinite(bm)):
        return "no"
    if (am >= bm) if higher else (am <= bm):
        return "exceeds"
    overlap = unjson(a["q75"]) >= unjson(b["q25"]) and unjson(b["q75"]) >= unjson(a["q25"])
    return "matches" if overlap else "no"


S2_CLAIM_INDICES = (("prop_AI", True), ("prop_CE", True), ("prop_CE_top", True), ("prop_PR", False),
                    ("grad_AI", True), ("grad_CE", True), ("grad_PR", False))


def _claims_s2(settings: Mapping[str, Any], summ: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    labels = [f"{c}+{o}" for c, o, _ in settings["models"]]
    adam = next((lb for lb in labels if lb.endswith("+adam")), None)
    gated = [lb for lb in labels if lb.startswith("vector_gate")] + [lb for lb in labels if lb.startswith("scalar_gate")]
    if adam is None or not gated:
        return rows
    last = len(settings["checkpoints"]) - 1
    for gate in gated:
        for task, per_model in summ.items():
            if adam not in per_model or gate not in per_model:
                continue
            a = per_model[adam]["checkpoints"][last]["indices"]
            g = per_model[gate]["checkpoints"][last]["indices"]
            verdicts = {ix: _more(g[ix], a[ix], hi) for ix, hi in S2_CLAIM_INDICES}
            ok = sum(v != "no" for v in verdicts.values())
            ev = "; ".join(f"{ix}: {_fmt(g[ix]['median'])} vs {_fmt(a[ix]['median'])} → {verdicts[ix]}" for ix, _ in S2_CLAIM_INDICES)
            rows.append({
                "id": f"S2-{gate.split('+')[0]}-vs-adam-{task}", "experiment": "s2",
                "claim": f"{'Multi-gate' if gate.startswith('vector') else 'Scalar-gate'} + SGD matches or exceeds the "
                         f"anisotropy of plain + Adam ({task}).",
                "evidence": f"medians over seeds after {settings['checkpoints'][last]} iterations, {gate} vs {adam}: {ev}",
                "rule": "per index: 'exceeds' if the gated median is more anisotropic (AI, CE higher; PR lower), "
                        "'matches' if the IQRs overlap; the claim holds if every index matches or exceeds",
                "holds": "yes" if ok == len(verdicts) else ("partly" if ok else "no"),
                "per_index": verdicts,
                "source": [f"experiments.s2.summary.{task}.{lb}.checkpoints[{last}].indices.{ix}"
                           for lb in (gate, adam) for ix, _ in S2_CLAIM_INDICES],
            })
    return rows


def _claims_appendix(settings: Mapping[str, Any], summ: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cell, c in summ.items():
        slopes = np.asarray(unjson(c["slope"]["per_seed"]), dtype=float)
        if unjson(c["norm_L"]["max"]) == 0:  # no term of the split: F(eps) = F0, nothing to check
            rows.append({
                "id": f"A-slope-{cell}", "experiment": "appendix",
                "claim": f"The first-order expansion of ∏(A_j + εB_j) is exact to first order ({cell}).",
                "evidence": f"the cell has no terms of the split {settings['split']!r} (B_j = 0, L₁ = 0): nothing to expand.",
                "rule": "not applicable", "holds": "n/a", "source": [f"experiments.appendix.summary.{cell}.norm_L"],
            })
            continue
        rows.append({
            "id": f"A-slope-{cell}", "experiment": "appendix",
            "claim": f"The first-order expansion of ∏(A_j + εB_j) is exact to first order: the remainder is O(ε²) ({cell}).",
            "evidence": f"log-log slope of E(ε) = {_iqr(c['slope'])} over {slopes.size} seeds "
                        f"(min {_fmt(np.min(slopes))}, max {_fmt(np.max(slopes))}).",
            "rule": f"holds if every seed's slope is within {SLOPE_TOL} of 2",
            "holds": "yes" if bool(np.all(np.abs(slopes - 2) <= SLOPE_TOL)) else "no",
            "source": [f"experiments.appendix.summary.{cell}.slope"],
        })
        rows.append({
            "id": f"A-small-{cell}", "experiment": "appendix",
            "claim": f"Gate-induced corrections are small relative to the leak-and-candidate part: ‖B_j‖₂/‖A_j‖₂ ({cell}).",
            "evidence": f"median over steps of ‖B_j‖/‖A_j‖: {_iqr(c['ratio_B_A_median'])} (median [IQR] over seeds); "
                        f"largest over all steps and seeds {_fmt(c['ratio_B_A_max']['max'])}.",
            "rule": f"holds if the median ratio is below {RATIO_SMALL}",
            "holds": "yes" if unjson(c["ratio_B_A_median"]["median"]) < RATIO_SMALL else "no",
            "source": [f"experiments.appendix.summary.{cell}.ratio_B_A_median", f"experiments.appendix.summary.{cell}.ratio_B_A_max"],
        })
        rel = c["remainder_at_1_rel_F"]
        rows.append({
            "id": f"A-eps1-{cell}", "experiment": "appendix",
            "claim": f"At ε = 1 (the true product) F₀ + L₁ is an accurate approximation ({cell}).",
            "evidence": f"‖F(1) − F₀ − L₁‖_F / ‖F(1)‖_F = {_iqr(rel)}; absolute {_iqr(c['remainder_at_1'])}; "
                        f"‖F₀‖ = {_fmt(c['norm_F0']['median'])}, ‖L₁‖ = {_fmt(c['norm_L']['median'])}.",
            "rule": f"holds if the median relative remainder is below {REL_REMAINDER_SMALL}",
            "holds": "yes" if unjson(rel["median"]) < REL_REMAINDER_SMALL else "no",
            "source": [f"experiments.appendix.summary.{cell}.{k}" for k in ("remainder_at_1_rel_F", "remainder_at_1", "norm_F0", "norm_L")],
        })
    return rows


def claims(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every claim row of the experiments present in ``results`` (the results.json dict)."""
    ex = results["experiments"]
    rows: list[dict[str, Any]] = []
    if "s1" in ex:
        rows += _claims_s1(ex["s1"]["settings"], ex["s1"]["summary"])
    if "s2" in ex:
        rows += _claims_s2(ex["s2"]["settings"], ex["s2"]["summary"])
    if "appendix" in ex:
        rows += _claims_appendix(ex["appendix"]["settings"], ex["appendix"]["summary"])
    return rows


def method_comparisons(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Where a method choice of the released code changes a headline number: both values,
    computed here, side by side."""
    ex = results["experiments"]
    rows: list[dict[str, Any]] = []
    if "s1" in ex:
        last = len(ex["s1"]["settings"]["checkpoints"]) - 1
        for model, m in ex["s1"]["summary"].items():
            cp = m["checkpoints"][last]
            rows.append({
                "experiment": "s1", "quantity": f"slope s, released predictor ∏g ({model})",
                "released_method": "5 power-iteration steps", "released_value": _iqr(cp["slope_s1_power_iteration"]),
                "symgate_method": "exact spectral norm", "symgate_value": _iqr(cp["slope_s1_exact_norm"]),
                "source": [f"experiments.s1.summary.{model}.checkpoints[{last}].slope_s1_power_iteration",
                           f"experiments.s1.summary.{model}.checkpoints[{last}].slope_s1_exact_norm"],
            })
    if "s2" in ex:
        last = len(ex["s2"]["settings"]["checkpoints"]) - 1
        for task, per_model in ex["s2"]["summary"].items():
            for label, m in per_model.items():
                ind = m["checkpoints"][last]["indices"]
                rows.append({
                    "experiment": "s2", "quantity": f"CE_r of lag products ({task}, {label})",
                    "released_method": "top-16 singular values", "released_value": _iqr(ind["prop_CE_top"]),
                    "symgate_method": "whole spectrum", "symgate_value": _iqr(ind["prop_CE"]),
                    "source": [f"experiments.s2.summary.{task}.{label}.checkpoints[{last}].indices.prop_CE_top",
                               f"experiments.s2.summary.{task}.{label}.checkpoints[{last}].indices.prop_CE"],
                })
    if "appendix" in ex:
        for cell, c in ex["appendix"]["summary"].items():
            dropped = c["released_rule_drops_seeds"]
            rows.append({
                "experiment": "appendix", "quantity": f"remainder at ε = 1 ({cell})",
                "released_method": f"seeds outside 1.5 IQR dropped ({len(dropped)} dropped: {dropped})",
                "released_value": _iqr(c["remainder_at_1"]["released_rule"]),
                "symgate_method": "every seed", "symgate_value": _iqr(c["remainder_at_1"]),
                "source": [f"experiments.appendix.summary.{cell}.remainder_at_1.released_rule",
                           f"experiments.appendix.summary.{cell}.remainder_at_1",
                           f"experiments.appendix.summary.{cell}.released_rule_drops_seeds"],
            })
    return rows


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, x: Sequence[float], s: Mapping[str, Any], *, log: bool, label: str, **kw: Any) -> None:
    med = np.asarray(unjson(s["median"]), dtype=float)
    lo = np.asarray(unjson(s["q25"]), dtype=float)
    hi = np.asarray(unjson(s["q75"]), dtype=float)
    f = np.exp if log else (lambda v: v)
    line, = ax.plot(x, f(med), label=label, **kw)
    ax.fill_between(x, f(lo), f(hi), color=line.get_color(), alpha=0.2, linewidth=0)


def _plots_s1(settings: Mapping[str, Any], summ: Mapping[str, Any], out: str) -> list[str]:
    plt = _plt()
    files = []
    models = list(summ)
    lags = np.arange(1, settings["T"])
    last = len(settings["checkpoints"]) - 1
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        cp = summ[model]["checkpoints"][last]
        _band(ax, lags, cp["profile_exact_norm"], log=True, label="empirical, exact ‖·‖₂")
        _band(ax, lags, cp["profile_power_iteration"], log=True, label="empirical, 5-step power it.", linestyle="--")
        ax.plot(lags, np.exp(np.asarray(unjson(cp["predicted_exact"]["median"]), float)), ":", label="predicted: w·∏λ (derived μ)")
        ax.plot(lags, np.exp(np.asarray(unjson(cp["predicted_s1"]["median"]), float)), "-.", label="predicted: ∏g (released)")
        s = unjson(cp["slope_exact_exact_norm"]["median"])
        if np.isfinite(s):
            ax.plot(lags, np.exp(s * np.asarray(unjson(cp["predicted_exact"]["median"]), float)), color="k", lw=0.8,
                    label=f"fit [P̄(h)/P̄(1)]^s, s={s:.2f}")
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 2)
        ax.set_xlabel("lag h (steps)")
        ax.set_title(f"{MODEL_LABELS.get(model, model)}, iteration {cp['iteration']}", fontsize=10)
    axes[0][0].set_ylabel("μ̃_eff(h) = med S(h) / med S(1)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("S1: lag profile of the effective learning rate (median and IQR over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s1_profiles.png"))

    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        M = np.array([np.asarray(unjson(cp["profile_exact_norm"]["median"]), float) / np.log(10)
                      for cp in summ[model]["checkpoints"]])
        im = ax.imshow(M, aspect="auto", origin="lower", cmap="viridis", vmin=max(-12, np.nanmin(M[np.isfinite(M)]) if np.isfinite(M).any() else -12), vmax=0,
                       extent=(0.5, settings["T"] - 0.5, -0.5, len(settings["checkpoints"]) - 0.5))
        ax.set_yticks(range(len(settings["checkpoints"])), [str(c) for c in settings["checkpoints"]])
        ax.set_xlabel("lag h (steps)")
        ax.set_ylabel("training iteration")
        ax.set_title(MODEL_LABELS.get(model, model), fontsize=10)
        fig.colorbar(im, ax=ax, label="log₁₀ μ̃_eff(h)")
    fig.suptitle("S1: effective-learning-rate profile across training (median over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s1_heatmap.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, title) in zip(axes, (("slope_exact_exact_norm", "derived μ (w·∏λ), exact spectral norm"),
                                       ("slope_s1_power_iteration", "released: ∏g, 5-step power iteration"))):
        for model in models:
            its = [cp["iteration"] for cp in summ[model]["checkpoints"]]
            mean = np.array([unjson(cp[key]["mean"]) for cp in summ[model]["checkpoints"]], float)
            std = np.array([unjson(cp[key]["std"]) for cp in summ[model]["checkpoints"]], float)
            line, = ax.plot(its, mean, marker="o", ms=3, label=MODEL_LABELS.get(model, model))
            ax.fill_between(its, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("training iteration")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("fitted slope s (log S = a + s log P)")
    axes[0].legend(fontsize=8)
    fig.suptitle("S1: slope s across training (mean ± std over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s1_slope.png"))
    return files


def _plots_s2(settings: Mapping[str, Any], summ: Mapping[str, Any], out: str) -> list[str]:
    plt = _plt()
    files = []
    tasks = list(summ)
    lags = settings["lags"]
    last = len(settings["checkpoints"]) - 1
    idx = (("AI", "AI₁₀ = σ₁/σ₁₀"), ("CE", "CE₁₀ (whole spectrum)"), ("CE_top", "CE₁₀ (top 16, released)"),
           ("PR", "participation ratio"))
    fig, axes = plt.subplots(len(idx), len(tasks), figsize=(3.8 * len(tasks), 2.7 * len(idx)), squeeze=False, sharex=True)
    for j, task in enumerate(tasks):
        for i, (ix, lab) in enumerate(idx):
            ax = axes[i][j]
            for label, m in summ[task].items():
                _band(ax, lags, m["checkpoints"][last][f"prop_{ix}_by_lag"], log=False, label=label, marker="o", ms=3)
            if ix in ("AI", "PR"):
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(task, fontsize=10)
            if j == 0:
                ax.set_ylabel(lab, fontsize=9)
            if i == len(idx) - 1:
                ax.set_xlabel("lag h (steps)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"S2: propagation anisotropy of lag-h Jacobian products after {settings['checkpoints'][last]} iterations "
                 "(median, IQR over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s2_propagation.png"))

    gidx = (("grad_AI", "AI₁₀", True), ("grad_CE", "CE₁₀", False), ("grad_PR", "participation ratio", True))
    fig, axes = plt.subplots(1, len(gidx), figsize=(4.8 * len(gidx), 3.6), squeeze=False)
    labels = list(next(iter(summ.values())))
    width = 0.8 / max(1, len(labels))
    for ax, (ix, lab, logy) in zip(axes[0], gidx):
        for k, label in enumerate(labels):
            med, lo, hi = [], [], []
            for task in tasks:
                s = summ[task][label]["checkpoints"][last]["indices"][ix]
                med.append(unjson(s["median"]))
                lo.append(unjson(s["median"]) - unjson(s["q25"]))
                hi.append(unjson(s["q75"]) - unjson(s["median"]))
            ax.bar(np.arange(len(tasks)) + k * width, med, width, yerr=[lo, hi], label=label, capsize=2)
        ax.set_xticks(np.arange(len(tasks)) + width * (len(labels) - 1) / 2, tasks, fontsize=8)
        ax.set_ylabel(lab)
        if logy:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("S2: update anisotropy of per-example gradients (median, IQR over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s2_updates.png"))

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, m in summ[task].items():
            loss = m["loss"]
            x = np.arange(1, len(loss["median"]) + 1)
            _band(ax, x, loss, log=False, label=label, lw=0.8)
        ax.set_yscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("training loss (MSE)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("S2: training loss (median, IQR over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "s2_loss.png"))
    return files


def _plots_appendix(settings: Mapping[str, Any], summ: Mapping[str, Any], out: str) -> list[str]:
    plt = _plt()
    files = []
    eps = np.asarray(settings["eps"], float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for cell, c in summ.items():
        e = c["error_by_eps"]
        line, = axes[0].loglog(eps, unjson(e["median"]), marker="o", ms=3, label=cell)
        axes[0].fill_between(eps, unjson(e["q25"]), unjson(e["q75"]), color=line.get_color(), alpha=0.2, linewidth=0)
        axes[1].loglog(eps, unjson(c["C2_by_eps"]["median"]), marker="o", ms=3, label=cell)
    e0 = np.asarray(unjson(next(iter(summ.values()))["error_by_eps"]["median"]), float)
    axes[0].loglog(eps, e0[0] * (eps / eps[0]) ** 2, "k:", lw=0.8, label="slope 2")
    axes[0].set_xlabel("ε")
    axes[0].set_ylabel("E(ε) = ‖F(ε) − F₀ − εL₁‖_F")
    axes[1].set_xlabel("ε")
    axes[1].set_ylabel("C₂(ε) = E(ε)/ε²")
    axes[0].legend(fontsize=8)
    fig.suptitle("Appendix: first-order expansion of the Jacobian product (median, IQR over seeds)")
    fig.tight_layout()
    files.append(_save(fig, out, "appendix_expansion.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, (cell, c) in enumerate(summ.items()):
        v = np.asarray(unjson(c["remainder_at_1"]["per_seed"]), float)
        seeds = c["seeds"]
        drop = set(c["released_rule_drops_seeds"])
        ax.scatter(np.asarray(seeds) + 0.15 * k, v, s=14, label=cell)
        for sd, val in zip(seeds, v):
            if sd in drop:
                ax.scatter([sd + 0.15 * k], [val], s=60, facecolors="none", edgecolors="r")
    ax.set_xlabel("seed")
    ax.set_ylabel("‖F(1) − F₀ − L₁‖_F")
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Appendix: remainder at ε = 1, every seed\n(red circles: seeds the released 1.5·IQR rule drops)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out, "appendix_seeds.png"))
    return files


def _save(fig: Any, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def plot_all(results: Mapping[str, Any], out: str) -> dict[str, list[str]]:
    """Every plot of the experiments in ``results``; returns the file names per experiment."""
    ex = results["experiments"]
    files: dict[str, list[str]] = {}
    if "s1" in ex:
        files["s1"] = _plots_s1(ex["s1"]["settings"], ex["s1"]["summary"], out)
    if "s2" in ex:
        files["s2"] = _plots_s2(ex["s2"]["settings"], ex["s2"]["summary"], out)
    if "appendix" in ex:
        files["appendix"] = _plots_appendix(ex["appendix"]["settings"], ex["appendix"]["summary"], out)
    return files


# --------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------

_TITLES = {"s1": "S1 — effective-learning-rate profiles", "s2": "S2 — joint anisotropy of gates and optimizers",
           "appendix": "Appendix — first-order expansion of the Jacobian product"}


def write_report(results: Mapping[str, Any], out: str, plots: Mapping[str, Sequence[str]]) -> str:
    """Write ``report.md`` into ``out``; returns its path."""
    L: list[str] = []
    meta = results["meta"]
    L.append("# symgate reproduction report")
    L.append("")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Preset: **{meta['preset']}**; seeds: {meta['seeds']}; scheduler: {meta['scheduler']}; "
             f"finished {meta['finished']}.  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "platform") + ".  ")
    times = meta.get("seconds", {})
    if times:
        L.append("Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ".")
    L.append("")
    L.append("Every number below is in `results.json` (the `source` column gives its path); "
             "the verdict of each claim follows the rule stated in its row.")
    L.append("")
    L.append("## Claims")
    L.append("")
    L.append("| id | claim | evidence | rule | holds | source in results.json |")
    L.append("|---|---|---|---|---|---|")
    for c in results["claims"]:
        src = "<br>".join(f"`{p}`" for p in c["source"])
        L.append(f"| {c['id']} | {c['claim']} | {c['evidence']} | {c['rule']} | **{c['holds']}** | {src} |")
    L.append("")
    if results.get("method_comparisons"):
        L.append("## Released method choices vs symgate's, side by side")
        L.append("")
        L.append("Both columns are computed by symgate on the same runs (median [IQR] over seeds).")
        L.append("")
        L.append("| experiment | quantity | released method | value | symgate | value | source in results.json |")
        L.append("|---|---|---|---|---|---|---|")
        for r in results["method_comparisons"]:
            src = "<br>".join(f"`{p}`" for p in r["source"])
            L.append(f"| {r['experiment']} | {r['quantity']} | {r['released_method']} | {r['released_value']} | "
                     f"{r['symgate_method']} | {r['symgate_value']} | {src} |")
        L.append("")
    for name, ex in results["experiments"].items():
        L.append(f"## {_TITLES.get(name, name)}")
        L.append("")
        L.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in ex["settings"].items()) + ".")
        L.append("")
        for p in plots.get(name, []):
            L.append(f"![{p}]({p})")
            L.append("")
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))
    return path
