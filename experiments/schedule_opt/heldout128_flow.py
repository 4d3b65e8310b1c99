"""Does the flow study's ratio hold on more samples? A one-off check (docs/optimisation.md, "The flow model").

    python -m experiments.schedule_opt.heldout128_flow N [threads] [runs] [out]

The flow study's best stock sampler (Euler + flow_match) and its chosen grids (OSS for Euler, from the schedule file
in ``runs``, the study's run folder; default the config's ``runs``) at NFE 5, 6, 8, 10 on N held-out samples (seed 0:
the study's 32 first), against Heun with 200 steps on flow_match (0.0067 RMSE from the study's DOP853 reference on
its 32 samples). Prints and writes ``<out>/result_<N>.json``: RMSEs, their ratio (on the first 32 and on the rest),
the ratio of the median per-sample errors and the samples the optimised grid wins."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from experiments.harness import Experiment
from experiments.schedule_opt.__main__ import HERE
from experiments.schedule_opt.common import base_overrides
from framework.entry.api import run


def rms(e: torch.Tensor) -> float:
    return float(e.pow(2).mean().sqrt())


def arguments(argv: list[str], default_out: str):
    """``N [threads] [runs] [out]`` → (N, the study's config, runs, out); sets the torch threads."""
    torch.set_num_threads(int(argv[1]) if len(argv) > 1 else 1)
    cfg = Experiment.compose(HERE, []).cfg
    out = Path(argv[3]) if len(argv) > 3 else Path(default_out)
    out.mkdir(parents=True, exist_ok=True)
    return int(argv[0]), cfg, Path(argv[2]) if len(argv) > 2 else Path(cfg.runs), out


def main(argv: list[str]) -> dict:
    n, cfg, runs, out = arguments(argv, "outputs/schedule_opt_heldout128")
    base = [o if not o.startswith("batch_size") else "batch_size=32"
            for o in base_overrides("bundled_flow", "float32", list(cfg.heldout.prompts), 0, n)]
    t0 = time.perf_counter()
    ref = run(base + ["solver=heun", "schedule=flow_match", "steps=200"], output_dir=out / f"ref_heun200_{n}").latents
    print(f"reference: {time.perf_counter() - t0:.0f} s", flush=True)
    sched = runs / "bundled_flow" / "schedules" / "euler_oss.json"
    grids = json.loads(sched.read_text())["grids"]
    res = {}
    for nfe in [5, 6, 8, 10]:
        stock = run(base + ["solver=euler", "schedule=flow_match", f"steps={nfe}"], output_dir=out / f"euler_fm_{nfe}_{n}")
        opt = run(base + ["solver=euler", "schedule=optimized", f"schedule.file={sched}", f"steps={grids[str(nfe)]['steps']}"],
                  output_dir=out / f"euler_oss_{nfe}_{n}")
        a, b = [((x.latents - ref) ** 2).flatten(1).mean(1).sqrt() for x in (stock, opt)]
        res[nfe] = {"stock": rms(a), "oss": rms(b), "ratio": rms(b) / rms(a), "ratio_first32": rms(b[:32]) / rms(a[:32]),
                    "ratio_rest": rms(b[32:]) / rms(a[32:]) if n > 32 else None,
                    "median_ratio": float(b.median() / a.median()), "better": int((b < a).sum()), "n": n}
        print(nfe, res[nfe], flush=True)
    (out / f"result_{n}.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
