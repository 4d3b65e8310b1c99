"""Where the first evaluation of a flow grid should be (``first_sigma``): greedy coefficients on one grid, one teacher,
the first D at each σ_F (∞ = at t = 1 as every stock sampler), the calibration RMSE to the teacher (pooled and median).

    python -m experiments.schedule_opt.first_sigma_scan file=experiments/schedule_opt/learned_fits/bundled_flow_learned_ftr.json \\
        nfe=5 sigmas=inf,200,100,60,40,30,20,14 out=experiments/schedule_opt/first_sigma_scan_flow.json [samples=48 fine=40]

The calibration set, teacher and coefficient family are ``learned_fset5``'s (48 samples of the calibration prompts,
seed 1000; UniPC on 40 fine points from ∞ and σ 100 down, 2 substeps; consistent, guidance terms, p = 2). Calibration
figures only: the choice of σ_F sees no held-out sample (docs/optimisation.md, "The first evaluation at a finite σ").
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from experiments.harness import Experiment
from experiments.schedule_opt.__main__ import HERE
from framework.runs.schedule_file import read_schedule_file
from framework.tools import schedule_opt as so


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    torch.set_num_threads(int(args.get("threads", "2")))
    cfg = Experiment.compose(HERE, []).cfg
    nfe, model = int(args.get("nfe", "5")), args.get("model", "bundled_flow")
    grid = [float(v) for v in read_schedule_file(args["file"])["grids"][str(nfe)]["sigmas"]]
    grid[0] = math.inf  # the grid from t = 1; its first evaluation is what is scanned
    samples = int(args.get("samples", "48"))
    opts = so.Options(method="learned", fine=int(args.get("fine", "40")), fine_top=100.0, teacher_substeps=2, consistent=True,
                      guidance_terms=True, calibration=so.Calibration(list(cfg.calibration.prompts), int(cfg.calibration.seed), samples))
    sampler = so.Sampler([f"model={model}", "dtype=float32", "solver=learned"] + so.calibration_overrides(opts, True))
    t0 = time.perf_counter()
    teacher = so.make_teacher(sampler, so.fine_grid(100.0, sampler.sigma_min, opts.fine, math.inf), opts.teacher,
                              opts.teacher_substeps, opts.teacher_rtol)
    targets = so.teacher_states(sampler, teacher, grid, opts)
    rows = {}
    for v in args.get("sigmas", "inf,200,100,60,40,30,20,14").split(","):
        sampler.first_sigma = None if math.isinf(float(v)) else float(v)
        x = so.greedy_fit(sampler, grid, targets, True, None, True)[-1]
        per = (x - teacher.x[-1]).double().pow(2).flatten(1).mean(1).sqrt()
        rows[v] = {"rmse": so.rmse(x, teacher.x[-1]), "median": float(per.median())}
        print(f"first σ {v}: RMSE {rows[v]['rmse']:.4f}, median {rows[v]['median']:.4f}", flush=True)
    out = {"model": model, "nfe": nfe, "grid": grid, "file": args["file"], "calibration_samples": samples, "fine": opts.fine,
           "seconds": round(time.perf_counter() - t0, 1), "first_sigma": rows}
    if "out" in args:
        Path(args["out"]).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
