"""A schedule file made at the default CFG scale, run at other scales against the stock samplers there.

    python -m experiments.schedule_opt.cfg_probe model=bundled_flow solver=learned scales=3,7.5 n=64 \
        file=experiments/schedule_opt/learned_fits/bundled_flow_learned_fset.json stock=euler stock_schedules=flow_match \
        runs=<run folder> out=<record.json> [threads=2]

Each scale is the study's protocol with ``cfg_scale=<scale>`` on every run (``Study`` with that extra override): its own
reference from the same x_T, the stock samplers (``stock``, ``stock_schedules``: the study's lists by default) with
the most steps that fit each budget, and the file's grid (and, for ``solver=learned``, its coefficients) for every
budget it holds. The record holds, per scale and budget, each sampler's held-out RMSE and the file's ratio to the
best stock sampler with its 90 % interval (a paired bootstrap of the per-sample errors); a markdown table is printed.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.harness import Experiment
from experiments.schedule_opt.__main__ import HERE, Study, best_stock, stock_cells
from experiments.schedule_opt.common import ratio_interval
from framework.runs.schedule_file import read_schedule_file


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    model, solver, file = args.pop("model", "bundled"), args.pop("solver"), args.pop("file")
    scales = [float(v) for v in args.pop("scales", "3,7.5").split(",")]
    stock = [v for v in args.pop("stock", "").split(",") if v] or None
    stock_schedules = [v for v in args.pop("stock_schedules", "").split(",") if v] or None
    n = int(args.pop("n", "64"))
    import torch

    torch.set_num_threads(int(args.pop("threads", "1")))
    out = Path(args.pop("out"))
    cfg = Experiment.compose(HERE, [f"{k}={v}" for k, v in args.items()]).cfg
    made = {"file": file, "content": read_schedule_file(file)}
    budgets = sorted(int(k) for k in made["content"]["grids"])
    record = json.loads(out.read_text()) if out.is_file() else {}
    for scale in scales:
        t0 = time.perf_counter()
        s = Study(cfg, model, Path(cfg.runs), extra=[f"cfg_scale={scale:g}"], tag=f"_cfg{scale:g}", n=n)
        rows = s.stock(budgets, stock, stock_schedules)
        mine = s.evaluate_file(solver, made)
        for b in map(str, budgets):
            top = best_stock(rows, b)
            if top is None or "error" not in mine.get(b, {}):
                continue
            (err, name, best), cell = top, mine[b]
            record[f"{model}/cfg{scale:g}/{Path(file).stem}/{b}"] = {
                "model": model, "cfg_scale": scale, "nfe": int(b), "file": file, "error": cell["error"],
                "stock_best": name, "stock_error": err, "ratio": cell["error"] / err,
                "ratio_interval": ratio_interval(best["sample_errors"], cell["sample_errors"]),
                "stock": {k: c["error"] for k, c in stock_cells(rows, b).items()}, "heldout_samples": s.n, "reference_nfe": s.ref_nfe,
                "sample_errors": cell["sample_errors"], "stock_sample_errors": best["sample_errors"]}
        print(f"cfg {scale:g}: {time.perf_counter() - t0:.0f} s", flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    print("| CFG | NFE | best stock | RMSE | file | RMSE | ratio (90 %) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for v in record.values():
        lo, hi = v["ratio_interval"]
        print(f"| {v['cfg_scale']:g} | {v['nfe']} | {v['stock_best']} | {v['stock_error']:.3f} | {Path(v['file']).stem} | "
              f"{v['error']:.3f} | {v['ratio']:.2f} ({lo:.2f}–{hi:.2f}) |")
    return record


if __name__ == "__main__":
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        main(sys.argv[1:])
