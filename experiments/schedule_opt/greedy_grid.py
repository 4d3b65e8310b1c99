"""Pilot for issue 24: a grid chosen *for* greedy coefficients (``coef_init=greedy``), by coordinate descent over
the points of a fine teacher trajectory.

    python -m experiments.schedule_opt.greedy_grid NFE INIT OUT [fine] [sweeps] [samples] [terms] [start] [last]

The study's VP calibration set (24 prompts, seed 1000, ``samples`` of them, default the study's 96; CFG 5) and a
UniPC teacher on ``fine`` points log-uniform from σ_max to σ_min (3 substeps each, default 40 points). A grid is a choice of fine points from σ_max;
its cost is the final calibration RMSE of the consistent greedy coefficients fitted on it to the teacher's states at
those points — one pass of K model evaluations, no teacher rerun, so hundreds of grids cost minutes on the CPU.
Starting from INIT's grid for NFE (a schedule file; each point moved to its nearest fine point), each interior
point in turn moves by up to two fine points while the cost falls, for at most ``sweeps`` sweeps — the tool's
search (``method=learned coef_init=greedy grid_search=<sweeps>``, ``greedy_grid_search``), here with the pilot's
teacher and written as a grid file of its own. OUT is a schedule
file (a copy of INIT with this budget's grid replaced) for ``init=OUT coef_init=greedy`` (spec ``learned_cd_g``); with
``terms`` = 1 the coefficients weigh the guidance differences too (``guidance_terms=true``, spec ``learned_cdt_g``).
``start`` (the tool's ``start``: a σ_0, ``leading`` or ``leading:K``) moves σ_0 and the teacher there; INIT's grid,
where it starts elsewhere, is mapped there (its log σ affinely onto [its last nonzero σ, σ_0]). ``last`` caps the last
nonzero σ (the final jump's start; a jump from σ ≈ 0.5 costs shape accuracy that the RMSE does not see).
Its figures are in docs/optimisation.md.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from experiments.schedule_opt.__main__ import HERE
from experiments.schedule_opt.common import base_overrides
from framework.runs.schedule_file import read_schedule_file, write_schedule_file
from framework.tools.schedule_opt import Options, Sampler, fine_grid, greedy_grid_search, make_teacher, moved_to, start_of


def main(nfe: int, init: str, out: str, n_fine: int = 40, sweeps: int = 4, samples: int | None = None,
         terms: int = 0, start: str | None = None, last: float = math.inf) -> None:
    cfg = OmegaConf.load(HERE / "config.yaml")
    cal = cfg.calibration
    samples = samples or int(cal.num_samples.bundled)
    s = Sampler(base_overrides("bundled", "float32", list(cal.prompts), int(cal.seed), samples)
                + ["solver=euler"])
    sigma0, s.vp_start = start_of(Options(start=start), s, nfe)
    t0 = time.perf_counter()
    fine = fine_grid(sigma0, s.sigma_min, n_fine)
    teacher = make_teacher(s, fine, "unipc", 3, 1e-5)
    print(f"teacher: {teacher.nfe} NFE, {time.perf_counter() - t0:.0f} s", flush=True)
    content = read_schedule_file(init)
    first = [float(v) for v in content["grids"][str(nfe)]["sigmas"]]
    if not math.isclose(first[0], sigma0, rel_tol=1e-6):  # INIT starts elsewhere: its shape, mapped
        first = moved_to(first, sigma0)
    opts = Options(method="learned", coef_init="greedy", consistent=True, guidance_terms=bool(terms), fine=n_fine,
                   grid_search=sweeps, last_sigma=None if math.isinf(last) else last)
    grid, found = greedy_grid_search(s, teacher, [sigma0] + first[1:], opts)
    best = found["rmse"]
    print(f"{found['sweeps']} sweeps, {found['grids']} grids: {found['rmse_start']:.4f} → {best:.4f}, "
          f"{[round(v, 3) for v in grid]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    new = copy.deepcopy(content)
    for key in ("format", "version", "checksum"):
        new.pop(key, None)
    g = new["grids"][str(nfe)]
    g.update(sigmas=grid, init_noise=s.init_scale(sigma0), objective=best, calibration_rmse_to_teacher=best,
             objective_name=f"final RMSE of greedy coefficients{' with guidance terms' if terms else ''} to a {n_fine}-point teacher", seconds=round(time.perf_counter() - t0, 1))
    new["method"] = "greedy_grid (experiments/schedule_opt/greedy_grid.py)"
    new["calibration"] = {**new.get("calibration", {}), "num_samples": samples}
    write_schedule_file(Path(out), new)
    print(f"wrote {out}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), a[1], a[2], *(int(v) for v in a[3:7]), *a[7:8], *(float(v) for v in a[8:9]))
