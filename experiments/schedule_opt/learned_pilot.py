"""Pilot for issue 24: a learned linear multistep sampler on a fixed grid, fitted on a large calibration set.

    python -m experiments.schedule_opt.learned_pilot NFE [iters] [n_cal] [n_held] [grid] [lr]

The sampler takes NFE evaluations of the guided denoiser D_j = D(x_j, σ_j) on the grid σ_0 = σ_max > σ_1 > … and
builds each state from x_T and every evaluation so far,

    x_{j+1} = e_j · x_T + Σ_{k ≤ j} b_jk · D_k        (x_T = σ_max·ε; the last state is the sample)

— Euler, DDIM and DPM-Solver++(2M) on any grid are special cases (S4S / bespoke-solver style).
Starting point: Euler on ``grid`` (a key of the study's record, ``ld3/euler`` by default, or ``karras``). The coefficients are fitted by Adam on the final calibration RMSE to the reference, through the
model (autograd in x); the grid stays (the tool's ``method=learned`` is this, against its teacher).
Calibration: the study's 24 calibration prompts, seed 1000, ``n_cal`` samples; held-out: its 8 held-out prompts,
seed 0, ``n_held`` samples (the first 32 are the study's); both against the study's reference (UniPC order 3, 100
exponential steps from σ_max, then D at σ_min). Prints the held-out RMSE, the ratio of the median per-sample errors
and wins against Euler on the same grid and against the stock best of ``heldout128_vp.json``."""
from __future__ import annotations

import json
import math
import sys
import time

import torch

from framework.maths.multistep import euler_as_linear, linear_update
from framework.tools.schedule_opt import Sampler, stock_grid


def sampler(prompts: list[str], seed: int, n: int, solver: list[str]) -> Sampler:
    quoted = ",".join("'" + p + "'" for p in prompts)
    return Sampler(["model=bundled", *solver, f"seed={seed}", f"num_samples={n}", f"batch_size={n}", "save_images=false",
                    "callback=[]", f"prompts=[{quoted}]"])


def reference(s: Sampler) -> torch.Tensor:
    grid = [float(v) for v in stock_grid("exponential", s.model, 100)]
    return s.trajectory(grid)[-1].x


def roll(s: Sampler, sig: list[float], e, b, grad: bool) -> torch.Tensor:
    x_t = s.start(sig[0]).x
    grid = list(sig) + [0.0]
    x, ds = x_t, []
    with torch.set_grad_enabled(grad):
        for j in range(len(sig)):
            ds.append(s.denoised(x, j, grid))
            x = linear_update(x_t, ds, e[j], b[j])
    return x


def per_sample(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1).sqrt()


def rms(v: torch.Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def main(argv: list[str]) -> dict:
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    nfe = int(argv[0])
    iters = int(argv[1]) if len(argv) > 1 else 40
    n_cal = int(argv[2]) if len(argv) > 2 else 96
    n_held = int(argv[3]) if len(argv) > 3 else 128
    start = argv[4] if len(argv) > 4 else "ld3/euler"
    lr = float(argv[5]) if len(argv) > 5 else 0.003
    study = OmegaConf.load("experiments/schedule_opt/config.yaml")
    t0 = time.time()
    ref_solver = ["solver=unipc", "solver.order=3"]
    cal = sampler(list(study.calibration.prompts), int(study.calibration.seed), n_cal, ref_solver)
    held = sampler(list(study.heldout.prompts), int(study.heldout.seed), n_held, ref_solver)
    rc, rh = reference(cal), reference(held)
    print(f"references {time.time() - t0:.0f} s", flush=True)
    if start == "karras":
        grid = [float(v) for v in stock_grid("karras", cal.model, nfe)]
    else:
        rec = json.loads(open("experiments/schedule_opt/results.json").read())["results"]["bundled"]
        grid = [float(v) for v in rec["grids"][start][str(nfe)]]
    assert grid[-1] == 0 and len(grid) == nfe + 1 and math.isclose(grid[0], cal.sigma_max, rel_tol=1e-6), grid
    sig = grid[:-1]
    e0, b0 = euler_as_linear(grid)
    base = per_sample(roll(held, sig, e0, b0, False), rh)
    stock = json.loads(open("experiments/schedule_opt/heldout128_vp.json").read()).get(str(nfe), {})
    stock_rmse = stock.get("best_stock_here_rmse")
    print(f"NFE {nfe}, grid {[round(v, 4) for v in grid]}: Euler on it, held-out {rms(base):.4f}"
          f" (stock best on 128: {stock.get('best_stock_here')} {stock_rmse})", flush=True)
    e = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in e0]
    b = [[torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in row] for row in b0]
    opt = torch.optim.Adam(e + [v for row in b for v in row], lr=lr)
    best = (math.inf, None)
    for it in range(iters):
        opt.zero_grad()
        loss = (roll(cal, sig, [v.float() for v in e], [[v.float() for v in r] for r in b], True) - rc).pow(2).mean()
        loss.backward()
        cal_rmse = float(loss.detach().sqrt())
        if cal_rmse < best[0]:  # the parameters this loss belongs to
            best = (cal_rmse, ([float(v.detach()) for v in e], [[float(v.detach()) for v in r] for r in b]))
        opt.step()
        if it % 5 == 4 or it == iters - 1:
            print(f"  iter {it + 1}: calibration {cal_rmse:.4f} ({time.time() - t0:.0f} s)", flush=True)
    be, bb = best[1]
    got = per_sample(roll(held, sig, be, bb, False), rh)
    res = {"nfe": nfe, "start": start, "iters": iters, "n_cal": n_cal, "n_held": n_held,
           "euler_on_grid": rms(base), "learned": rms(got), "ratio_to_euler_on_grid": rms(got) / rms(base),
           "median_ratio_to_euler_on_grid": float(got.median() / base.median()), "better_than_euler_on_grid": int((got < base).sum()),
           "first32": rms(got[:32]), "calibration": best[0], "sigmas": grid,
           "stock_best_128": stock_rmse, "ratio_to_stock_best_128": rms(got) / stock_rmse if stock_rmse else None,
           "coefficients": {"e": be, "b": bb}, "seconds": round(time.time() - t0)}
    print(json.dumps({k: v for k, v in res.items() if k != "coefficients"}), flush=True)
    return res


if __name__ == "__main__":
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        main(sys.argv[1:])
