"""Where the time of a reproduction goes, and what the same training step costs elsewhere.

For every model of S1 and S2 at the paper's sizes this measures, in one process:

* one training iteration on symgate's compiled kernels (``Trainer.step``: batch, one
  compiled forward + last-state MSE + BPTT call, optimizer), and the kernel call alone;
* the same iteration with PyTorch eager autograd (``--no-torch`` to skip; needs torch,
  installed by ``make bench``), as a ratio;
* one probe of each experiment (S1: exact lag sensitivities and μ; S2: propagation and
  update anisotropy);

then extrapolates the cost of ``symgate reproduce all --seeds N`` in core-seconds and in
wall time on the given number of workers (jobs are independent, so wall ≈ core/workers
when the workers do not slow each other down; the measured run is in the README).

    python benchmarks/bench_experiments.py [--seeds 20] [--workers 2] [--repeat 30] [--no-torch]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from symgate.experiments import S1Settings, S2Settings
from symgate.experiments._common import model_cell
from symgate.experiments.s1 import probe as s1_probe
from symgate.experiments.s2 import _measure as s2_measure
from symgate.experiments.train import Trainer, rng_for


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _torch_step(cell: str, n: int, m: int, B: int, T: int, opt: str, lr: float, alpha: float = 0.8):
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def lin(i: int, o: int) -> torch.nn.Parameter:
        b = 1 / np.sqrt(i)
        return torch.nn.Parameter((torch.rand(o, i, generator=g, dtype=torch.float64) * 2 - 1) * b)

    P = {"W": lin(n, n), "U": lin(m, n), "V": lin(n, 1)}
    if cell == "scalar_gate":
        P.update(wg=lin(n, 1), ug=lin(m, 1))
    if cell == "vector_gate":
        P.update(Wg=lin(n, n), Ug=lin(m, n))
    params = list(P.values())
    optim = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
    x = torch.rand(T, B, m, generator=g, dtype=torch.float64)
    y = torch.rand(B, 1, generator=g, dtype=torch.float64)

    def step() -> None:
        h = torch.zeros(B, n, dtype=torch.float64)
        for t in range(T):
            a = h @ P["W"].T + x[t] @ P["U"].T
            if cell == "plain":
                h = torch.tanh(a)
            elif cell == "leaky":
                h = (1 - alpha) * h + alpha * torch.tanh(a)
            else:
                gw, gu = ("wg", "ug") if cell == "scalar_gate" else ("Wg", "Ug")
                gate = torch.sigmoid(h @ P[gw].T + x[t] @ P[gu].T)
                h = (1 - gate) * h + gate * torch.tanh(a)
        loss = torch.mean((h @ P["V"].T - y) ** 2)
        optim.zero_grad()
        loss.backward()
        optim.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401

        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
        print("(PyTorch not installed: `make bench` installs it; measuring symgate only)")

    s1, s2 = S1Settings(), S2Settings()
    rows = []
    core = {"s1": 0.0, "s2": 0.0}
    print(f"{'experiment':<10} {'model':<22} {'task':<9} {'iteration':>11} {'kernel':>9} {'torch':>9} {'ratio':>6} {'probe':>8} {'job':>8}")
    for exp, models, tasks in (("s1", [(mdl, "sgd", s1.lr) for mdl in s1.models], [s1.task]),
                               ("s2", list(s2.models), list(s2.tasks))):
        st = s1 if exp == "s1" else s2
        for cell_name, opt, lr in models:
            for task in tasks[:1] if exp == "s1" else tasks:
                cell = model_cell(cell_name, alpha=0.8)
                tr = Trainer(cell, task, n=st.n, m=st.m, B=st.B, T=st.T, optimizer=opt, lr=lr, seed=1,
                             jitter=getattr(st, "jitter", 0.0))
                it = _time(tr.step, args.repeat)
                ker = _time(tr._step, args.repeat)
                x, y = tr.task.batch(rng_for(1, "probe"), st.probe_B, st.T, st.m)
                if exp == "s1":
                    pr = _time(lambda: s1_probe(st, cell, tr, x, y, np.random.default_rng(0)), 2)
                    steps, probes = st.steps, len(st.checkpoints)
                else:
                    pr = _time(lambda: s2_measure(st, cell, tr, x, y, 1, 0), 2)
                    steps, probes = st.iterations, len(st.checkpoints)
                tt = float("nan")
                if have_torch:
                    tt = _time(_torch_step(cell_name, st.n, st.m, st.B, st.T, opt, lr), max(3, args.repeat // 5))
                job = steps * it + probes * pr
                core[exp] += job * args.seeds
                print(f"{exp:<10} {cell_name + '+' + opt:<22} {task:<9} {it * 1e3:>9.2f}ms {ker * 1e3:>7.2f}ms "
                      f"{tt * 1e3:>7.1f}ms {tt / it:>6.1f} {pr:>7.2f}s {job:>7.1f}s")
                rows.append((exp, cell_name, task, it, ker, tt, pr, job))
    total = sum(core.values())
    print(f"\nextrapolated `reproduce all --seeds {args.seeds}`: S1 {core['s1']:.0f} core-s, S2 {core['s2']:.0f} core-s; "
          f"total {total:.0f} core-s = {total / args.workers / 60:.1f} min on {args.workers} workers (appendix: seconds)")
    train = sum(r[3] * (s1.steps if r[0] == "s1" else s2.iterations) for r in rows)
    probes = sum(r[6] * (len(s1.checkpoints) if r[0] == "s1" else len(s2.checkpoints)) for r in rows)
    print(f"per seed: training {train:.0f} s, probes {probes:.0f} s "
          f"(kernel calls alone {sum(r[4] * (s1.steps if r[0] == 's1' else s2.iterations) for r in rows):.0f} s)")


if __name__ == "__main__":
    main()
