"""Is the study's many-step reference right on single held-out samples? DOP853 against the many-step solver on 100,
200, 400 and 800 steps, one sample at a time (a shard of one). VP (``bundled``): DOP853 at rtol = atol = 1e-7 against
UniPC order 3 on exponential steps from σ_max; flow (``bundled_flow``): DOP853 at rtol = atol = 1e-5 (the solver
table's flow reference) against UniPC on flow_match steps from t = 1 (σ = ∞).

    python -m experiments.schedule_opt.reference_check INDICES [OUT_DIR] [MODEL]

INDICES: held-out sample indices of the 512-sample set (comma-separated), e.g. those every sampler gets most wrong.
Each run is kept under OUT_DIR (default outputs/reference_check; rerunning resumes); prints a table and writes
OUT_DIR/reference_check.json. About 80 s per sample on one core for DOP853 (4,000–4,800 NFE) on the VP model.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiments.schedule_opt.__main__ import HERE
from experiments.schedule_opt.common import base_overrides, reference_overrides
from framework.entry.api import run
from framework.tools.schedule_opt import Sampler

STEPS = (100, 200, 400, 800)


def main(indices: list[int], out: Path, model: str = "bundled") -> dict:
    cfg = OmegaConf.load(HERE / "config.yaml")
    held = cfg.heldout
    base = [o for o in base_overrides(model, "float32", list(held.prompts), int(held.seed), 512)
            if not o.startswith(("num_samples", "batch_size"))] + ["num_samples=512", "batch_size=1", "shard_count=512"]
    m = Sampler(base + ["shard_index=0"]).model
    smax, smin = float(m.sigma_max), float(m.sigma_min)
    if model == "bundled":
        tol, dop_start, many = 1e-7, (smax, smax), ["solver=unipc", "solver.order=3", "schedule=exponential",
                                                    f"schedule.sigma_max={smax!r}", "schedule.init_noise=sigma"]
    else:  # a flow model, from t = 1
        tol, dop_start, many = 1e-5, (math.inf, 1.0), ["solver=unipc", "schedule=flow_match"]
    table = {}
    for k in indices:
        b = base + [f"shard_index={k}"]
        dop = run(b + reference_overrides(dop_start[0], smin, tol, tol, dop_start[1]), output_dir=out / f"dop_{k}")
        row = {"dop853_nfe": int(dop.record["metrics"]["nfe"])}
        for steps in STEPS:
            r = run(b + many + [f"steps={steps}"], output_dir=out / f"unipc{steps}_{k}")
            if not torch.equal(r.x_T.cpu(), dop.x_T.cpu()):
                raise SystemExit(f"sample {k}: the two runs start from different x_T")
            row[f"unipc{steps}"] = float((r.latents.cpu().double() - dop.latents.cpu().double()).pow(2).mean().sqrt())
        table[k] = row
        print(k, " ".join(f"{key} {v:.4f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()), flush=True)
    (out / "reference_check.json").write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    a = sys.argv[1:]
    main([int(v) for v in a[0].split(",")], Path(a[1] if len(a) > 1 else "outputs/reference_check"), *a[2:3])
