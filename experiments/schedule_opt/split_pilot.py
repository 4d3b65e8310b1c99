"""Pilot for issue 24: greedy coefficients with the guidance difference as a regressor of its own.

    python -m experiments.schedule_opt.split_pilot NFE GRIDFILE [heldout]

The learned sampler combines the guided D's (D = D_u + w·Δ, Δ = D_c − D_u). Here each step may also weigh every
Δ_k so far with a free coefficient (a separate weight for the conditional and unconditional outputs, in effect
a per-step guidance correction), fitted, as ``coef_init=greedy``, step by step by least squares to a 40-point
UniPC teacher's states on the study's VP calibration set (96 samples). Prints the calibration RMSE to the teacher
and the RMSE to the 512-sample study's reference (outputs/h512, its first ``heldout`` samples) of the plain and
the split fit on GRIDFILE's NFE grid. Not part of the tool: its figures are in docs/optimisation.md.
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from experiments.schedule_opt.__main__ import HERE
from experiments.schedule_opt.common import base_overrides
from framework.runs.schedule_file import read_schedule_file
from framework.tools.schedule_opt import (Sampler, consistent_step, fine_grid, greedy_fit, least_squares,
                                          linear_update, make_teacher, rmse, teacher_states)

REFERENCE = "outputs/h512/bundled/reference/batches/000000.safetensors"


def evaluate(s: Sampler, x: torch.Tensor, i: int, grid: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided D, Δ = D_c − D_u) at (x, grid[i])."""
    p = s.prediction(x, i, grid)
    return p.denoised, p.cond_denoised - p.uncond_denoised


def split_fit(s: Sampler, grid: list[float], targets: list[torch.Tensor]):
    """As greedy_fit (consistent, from σ_max), with Δ_0 … Δ_j as extra free columns at step j."""
    steps = len(grid) - 1
    x_T = s.start(grid[0]).x
    x, ds, dl, coefs = x_T, [], [], []
    with torch.no_grad():
        for j in range(steps):
            d_j, l_j = evaluate(s, x, j, grid)
            ds.append(d_j)
            dl.append(l_j)
            d, last = d_j.double(), j == steps - 1
            cols = ([] if last else [x_T.double() - d]) + [v.double() - d for v in ds[:-1]] + [v.double() for v in dl]
            c = least_squares(cols, targets[j].double() - d)
            free = 0 if last else 1
            n_b = len(ds) - 1
            ej, row = consistent_step(c[0] if free else 0.0, c[free:free + n_b], last, True)
            g = c[free + n_b:]
            coefs.append((ej, row, g))
            x = linear_update(x_T, ds, ej, row) + sum(w * v for w, v in zip(g, dl))
    return coefs, x


def run_split(s: Sampler, grid: list[float], coefs) -> torch.Tensor:
    x_T = s.start(grid[0]).x
    x, ds, dl = x_T, [], []
    with torch.no_grad():
        for j, (ej, row, g) in enumerate(coefs):
            d_j, l_j = evaluate(s, x, j, grid)
            ds.append(d_j)
            dl.append(l_j)
            x = linear_update(x_T, ds, ej, row) + sum(w * v for w, v in zip(g, dl))
    return x


def main(nfe: int, gridfile: str, n_held: int = 128) -> None:
    cfg = OmegaConf.load(HERE / "config.yaml")
    cal = cfg.calibration
    s = Sampler(base_overrides("bundled", "float32", list(cal.prompts), int(cal.seed), int(cal.num_samples.bundled))
                + ["solver=euler"])
    t0 = time.perf_counter()
    teacher = make_teacher(s, fine_grid(s.sigma_max, s.sigma_min, 40), "unipc", 3, 1e-5)
    grid = [float(v) for v in read_schedule_file(gridfile)["grids"][str(nfe)]["sigmas"]]
    grid[0] = teacher.fine[0]
    opts = SimpleNamespace(teacher="unipc", teacher_substeps=3, teacher_rtol=1e-5)
    targets = teacher_states(s, teacher, grid, opts)
    print(f"teacher and targets: {time.perf_counter() - t0:.0f} s; grid {[round(v, 3) for v in grid]}", flush=True)
    e, b, x_plain = greedy_fit(s, grid, targets, True)
    coefs, x_split = split_fit(s, grid, targets)
    print(f"calibration RMSE to the teacher: plain {rmse(x_plain, targets[-1]):.4f}, split {rmse(x_split, targets[-1]):.4f}")
    for j, (_, _, g) in enumerate(coefs):
        print(f"  step {j}: Δ weights {[round(v, 3) for v in g]}")
    ref = load_file(REFERENCE)
    h = Sampler(base_overrides("bundled", "float32", list(cfg.heldout.prompts), int(cfg.heldout.seed), n_held) + ["solver=euler"])
    if not torch.allclose(h.start(grid[0]).x, ref["x_T"][:n_held], rtol=1e-6):
        raise SystemExit("the held-out x_T differs from the reference's")
    plain = rmse(run_split(h, grid, [(ej, row, []) for ej, row in zip(e, b)]), ref["latents"][:n_held])
    split = rmse(run_split(h, grid, coefs), ref["latents"][:n_held])
    print(f"held-out ({n_held}) RMSE to the reference: plain {plain:.4f}, split {split:.4f} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), a[1], *(int(v) for v in a[2:3]))
