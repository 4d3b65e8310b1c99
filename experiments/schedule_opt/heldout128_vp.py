"""Does the VP study's ratio hold on more samples? A one-off check (docs/optimisation.md, "Euler's own grid from σ_max").

    python -m experiments.schedule_opt.heldout128_vp N [threads] [runs] [out]

On N held-out samples (seed 0: the study's 32 first) of the bundled VP model, each sampler against the study's
reference from its own start (UniPC(3), 100 exponential steps; ``Study`` makes one per start): per NFE the stock best
of the study (Euler + leading at 5, Euler + karras at 6 and 8, DPM-Solver++(2M) + karras at 10) and the best of every
stock sampler of the study re-chosen on these samples, the study's chosen grids and LD3 for Euler from σ_max (the
schedule files in ``runs``, the study's run folder). Prints and writes ``<out>/result_<N>.json``: RMSEs,
ratios to the study's stock best and to the one re-chosen here (on all, the first 32 and the rest), the ratio of the
median per-sample errors and the samples each grid wins."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from experiments.schedule_opt.__main__ import Study
from experiments.schedule_opt.heldout128_flow import arguments, rms

STOCK = {5: ("euler", "leading"), 6: ("euler", "karras"), 8: ("euler", "karras"), 10: ("dpmpp_2m", "karras")}  # the study's
GRIDS = {"ld3/euler": "euler_ld3.json", "gitsh_lead/euler": "euler_gitsh_lead.json", "ld3_lead/unipc": "unipc_ld3_lead.json",
         "oss_lead/unipc": "unipc_oss_lead.json"}


def compare(b: torch.Tensor, a: torch.Tensor) -> dict:
    """Per-sample errors ``b`` against ``a``: RMSE ratios (all, the first 32, the rest), medians, samples won."""
    return {"rmse": rms(b), "ratio": rms(b) / rms(a), "ratio_first32": rms(b[:32]) / rms(a[:32]),
            "ratio_rest": rms(b[32:]) / rms(a[32:]) if len(a) > 32 else None,
            "median_ratio": float(b.median() / a.median()), "better": int((b < a).sum()), "n": len(a)}


def main(argv: list[str]) -> dict:
    n, cfg, runs, out = arguments(argv, "outputs/schedule_opt_heldout_vp")
    s = Study(cfg, "bundled", out, n=n)
    stock = s.stock(list(STOCK))  # every stock solver × schedule of the study, on these samples
    errors: dict = {}
    for nfe, (solver, schedule) in STOCK.items():
        cells = {"stock": stock[solver][schedule][str(nfe)]}
        for name, file in GRIDS.items():
            path = runs / "bundled" / "schedules" / file
            grids = json.loads(path.read_text())["grids"]
            if str(nfe) in grids:
                cells[name] = s.error([*s.solver_args(name.split("/")[1]), "schedule=optimized", f"schedule.file={path}",
                                       f"steps={grids[str(nfe)]['steps']}"], f"{name.replace('/', '_')}_{nfe}")
        errors[nfe] = {k: torch.tensor(c["sample_errors"]) for k, c in cells.items() if "sample_errors" in c}
    res: dict = {}  # against the study's stock best and against the stock best re-chosen on these samples
    for nfe, errs in errors.items():
        found = [(c["error"], f"{sv} + {sc}", c) for sv, by in stock.items() for sc, r in by.items()
                 for c in [r.get(str(nfe))] if isinstance(c, dict) and "sample_errors" in c]
        err, best, cell = min(found, key=lambda t: t[0])
        here = torch.tensor(cell["sample_errors"])
        a = errs.pop("stock")
        res[nfe] = {"stock": rms(a), "stock_sampler": " + ".join(STOCK[nfe]),
                    "best_stock_here": best, "best_stock_here_rmse": err,
                    **{k: compare(b, a) for k, b in errs.items()},
                    "against_best_stock_here": {k: compare(b, here) for k, b in errs.items()}}
        print(nfe, json.dumps(res[nfe]), flush=True)
    (out / f"result_{n}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        main(sys.argv[1:])
