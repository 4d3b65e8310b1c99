"""Pilot for issue 24: can learned solver *coefficients* (not only σ grids) beat the best stock sampler
by 30 % at NFE 5? ``python -m experiments.schedule_opt.coefficients_pilot [bundled|bundled_flow] [steps] [adam_iters]``

On the stock grid of the budget (the bundled model's ``leading`` grid from σ_0 = 5.13 with
x_T = √(1+σ_0²)·ε, where Euler is the stock best; the flow model's ``flow_match`` grid from σ = ∞), the
sampler is a general linear multistep method in the model's guided denoiser outputs D_j:

    x_{i+1} = e_i · x_T + Σ_{j ≤ i} b_ij · D_j        (Euler, DDIM, DPM-Solver++ are special cases)

with scalar coefficients shared by all samples, fitted on the study's calibration set (24 prompts,
seed 1000, 32 samples) and scored on its held-out set (8 other prompts, seed 0) against a UniPC
teacher of 25 substeps per interval from the same x_T, as RMSE ratio to Euler on the same grid:

- *greedy*: step by step, least squares to the teacher's state at σ_{i+1} given the student's own
  past (closed form, i + 2 unknowns per step);
- *joint* (``adam_iters`` > 0): all coefficients by Adam on the final calibration error, through the
  model (starting from Euler's coefficients).

Not part of the tool: its figures are in the issue's notes and docs/optimisation.md.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

from framework.tools.schedule_opt import Sampler, leading_grid, rmse, stock_grid, teacher_solver


def make_sampler(model: str, prompts: list[str], seed: int) -> Sampler:
    ov = [f"model={model}", "solver=euler", f"seed={seed}", "num_samples=32", "batch_size=32", "save_images=false",
          "callback=[]", "prompts=[" + ",".join(f"'{p}'" for p in prompts) + "]"]
    return Sampler(ov + (["schedule=flow_match"] if model == "bundled_flow" else []))


def teacher_states(s: Sampler, grid: list[float], sub: int = 25) -> list[torch.Tensor]:
    """The teacher's state at each grid point: UniPC on ``sub`` log-uniform substeps per interval
    (from ∞: its limit step to σ_max, then 3·``sub`` to the first finite point; the last interval
    to σ_min, then D there)."""
    fine: list[float] = []
    for a, b in zip(grid[:-1], grid[1:]):
        if math.isinf(a):
            fine.append(a)
            fine += [float(v) for v in np.exp(np.linspace(math.log(s.sigma_max), math.log(b), 3 * sub + 1))[:-1]]
        elif b == 0:
            if a > s.sigma_min * 1.0001:
                fine += [float(v) for v in np.exp(np.linspace(math.log(a), math.log(s.sigma_min), sub + 1))[:-1]]
            fine.append(s.sigma_min)
        else:
            fine += [float(v) for v in np.exp(np.linspace(math.log(a), math.log(b), sub + 1))[:-1]]
    fine.append(0.0)
    for g in grid:  # the grid's own points exactly
        j = min(range(len(fine)), key=lambda k: 0.0 if fine[k] == g else
                (abs(fine[k] - g) if math.isfinite(g) and math.isfinite(fine[k]) else math.inf))
        fine[j] = g
    at = {n.sigma: n.x for n in s.trajectory(fine, teacher_solver("unipc", 1e-6))}
    return [at[g] for g in grid]


def greedy(s: Sampler, grid: list[float], targets: list[torch.Tensor] | None, coefs: list | None = None):
    """Fit (``targets`` given) or apply the per-step least-squares coefficients; (final x, coefficients)."""
    x_t = x = s.start(grid[0]).x
    ds, fitted = [], []
    for i in range(len(grid) - 1):
        with torch.no_grad():
            ds.append(s.denoised(x, i, grid))
        basis = torch.stack([x_t] + ds, -1).double().reshape(-1, len(ds) + 1)
        c = torch.linalg.lstsq(basis, targets[i + 1].double().reshape(-1, 1)).solution[:, 0] if targets else coefs[i]
        fitted.append(c)
        x = (basis @ c).reshape(x_t.shape).to(x_t.dtype)
    return x, fitted


def roll(s: Sampler, grid: list[float], a: list, b: list, grad: bool = True) -> torch.Tensor:
    x = s.start(grid[0]).x
    ds = []
    with torch.set_grad_enabled(grad):
        for i in range(len(grid) - 1):
            ds.append(s.denoised(x, i, grid))
            x = a[i] * x + sum(b[i][j] * ds[j] for j in range(i + 1))
    return x


def main(argv: list[str]) -> None:
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    model = argv[0] if argv else "bundled"
    steps = int(argv[1]) if len(argv) > 1 else 5
    iters = int(argv[2]) if len(argv) > 2 else 0
    study = OmegaConf.load("experiments/schedule_opt/config.yaml")
    t0 = time.time()
    cal = make_sampler(model, list(study.calibration.prompts), study.calibration.seed)
    held = make_sampler(model, list(study.heldout.prompts), study.heldout.seed)
    if model == "bundled_flow":
        grid = [math.inf] + [float(g) for g in stock_grid("flow_match", cal.model, steps)[1:]]
    else:
        grid = leading_grid(cal.model, steps)
        cal.vp_start = held.vp_start = True
    tc, th = teacher_states(cal, grid), teacher_states(held, grid)
    euler = rmse(held.trajectory(grid)[-1].x, th[-1])
    print(f"grid {[round(g, 4) for g in grid]}; teachers {time.time() - t0:.0f} s; Euler held-out RMSE {euler:.4f}")
    x, coefs = greedy(cal, grid, tc)
    got = rmse(greedy(held, grid, None, coefs)[0], th[-1])
    print(f"greedy: calibration {rmse(x, tc[-1]):.4f}, held-out {got:.4f}, ratio {got / euler:.3f}")
    if iters:
        r = [grid[i + 1] / grid[i] if math.isfinite(grid[i]) else 0.0 for i in range(steps)]
        a = [torch.tensor(v, requires_grad=True) for v in r]
        b = [[torch.tensor(1 - r[i] if j == i else 0.0, requires_grad=True) for j in range(i + 1)] for i in range(steps)]
        opt = torch.optim.Adam(a + [v for row in b for v in row], lr=0.01)
        for it in range(iters):
            opt.zero_grad()
            loss = (roll(cal, grid, a, b) - tc[-1]).pow(2).mean()
            loss.backward()
            opt.step()
            if it % 10 == 9 or it == iters - 1:
                got = rmse(roll(held, grid, a, b, grad=False), th[-1])
                print(f"joint {it + 1}: calibration {float(loss.detach().sqrt()):.4f}, held-out {got:.4f}, ratio {got / euler:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
