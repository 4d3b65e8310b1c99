"""A few (method spec, solver) pairs of the study, on the study's protocol, without the whole study.

    python -m experiments.schedule_opt.probe pairs=gitsh_l3/euler,gitsh_lead_pin/euler nfe=5,6 quality=true [threads=1]
    python -m experiments.schedule_opt.probe model=bundled_flow pairs=ld3_long/unipc nfe=8 runs=<the flow study's runs>
    python -m experiments.schedule_opt.probe pairs=oss/euler stock=euler,unipc stock_schedules=flow_match device=cuda

``stock=<solvers>`` (``stock_schedules=<schedules>``, default the model's own list) runs those stock
samplers on the same held-out set first (entries ``stock/<solver>/<schedule>/<n>``); ``pairs=`` may then be empty.

Each pair is optimised from the study's calibration set (``Study.optimise``: the method specs and
solver specs of config.yaml, the schedule file in the study's run folder, resumed), its grids run
on the held-out set against the reference from the same x_T and start (``Study.error``: one
reference per start, resumed from the study's run folder), and with ``quality=true`` each grid
runs on 256 samples of the held-out prompts for each of the two quality seeds (FD and prompt
accuracy, as the study's ``quality``). Results are merged into ``out`` (a JSON record, one entry
per pair and budget; rerunning a pair replaces its entries, keeping the quality of an unchanged grid
when not measured again) and printed as a markdown table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.harness import Experiment
from experiments.schedule_opt.__main__ import HERE, Study
from experiments.schedule_opt.common import base_overrides, pair_key
from framework.entry.api import run

DEFAULT_OUT = HERE / "probe.json"


def quality(s: Study, cfg, solver: str, file: str, steps: int, tag: str) -> dict:
    q = cfg.quality
    out = {}
    for seed in q.seeds:
        base = base_overrides(s.model, s.dtype, list(cfg.heldout.prompts), int(seed), int(q.num_samples))
        r = run(base + s.extra + [*s.solver_args(solver), "schedule=optimized", f"schedule.file={file}", f"steps={steps}",
                                  f"batch_size={int(q.batch_size)}", "metrics=[" + ",".join(q.metrics) + "]"],
                output_dir=s.folder / f"quality_{tag}_{seed}")
        m = r.record["metrics"]
        out[str(seed)] = {k: m[k] for k in m if k.startswith(("fid", "prompt_accuracy")) or k == "nfe"}
    return out


def table(record: dict) -> str:
    lines = ["| pair | NFE | σ_0 | held-out RMSE | calibration RMSE | FD (seeds) | colour % | shape % | grid |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, c in sorted(record.items(), key=lambda kv: (kv[1].get("model", "bundled"), kv[1]["pair"], int(kv[1]["nfe"]))):
        if "error" not in c:  # a stock cell the budget does not fit
            continue
        q = c.get("quality") or {}
        fd = " / ".join(f"{v['fid']:.3f}" for v in q.values()) or "—"
        col = " / ".join(f"{100 * v['prompt_accuracy_colour']:.1f}" for v in q.values()) or "—"
        shp = " / ".join(f"{100 * v['prompt_accuracy_shape']:.1f}" for v in q.values()) or "—"
        grid = ", ".join(f"{v:.3g}" for v in c["sigmas"])
        pair = c["pair"] if c.get("model", "bundled") == "bundled" else f"{c['model']}: {c['pair']}"
        cal = f"{c['calibration_rmse_to_teacher']:.3g}" if "calibration_rmse_to_teacher" in c else "—"
        lines.append(f"| {pair} | {int(c['nfe'])} | {c['sigmas'][0]:.3g} | {c['error']:.3g} | {cal} | {fd} | {col} | {shp} | {grid} |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    pairs = [p.split("/") for p in args.pop("pairs", "").split(",") if p]
    stock = [v for v in args.pop("stock", "").split(",") if v]
    stock_schedules = [v for v in args.pop("stock_schedules", "").split(",") if v] or None
    budgets = [int(n) for n in args.pop("nfe", "5,6,8,10").split(",")]
    with_quality = args.pop("quality", "false") == "true"
    model = args.pop("model", "bundled")
    import torch

    torch.set_num_threads(int(args.pop("threads", "1")))  # on a shared 2-core machine, 2 threads starve each other
    out = Path(args.pop("out", str(DEFAULT_OUT)))
    cfg = Experiment.compose(HERE, [f"{k}={v}" for k, v in args.items()]).cfg
    record = json.loads(out.read_text()) if out.is_file() else {}
    s = Study(cfg, model, Path(cfg.runs))
    if stock:
        for solver, by in s.stock(budgets, stock, stock_schedules).items():
            for schedule, row in by.items():
                for n, c in row.items() if "skipped" not in row else ():
                    record[f"{model}/stock/{solver}/{schedule}/{n}"] = {"pair": f"stock {solver} + {schedule}", "model": model,
                                                                          "nfe": int(n), **c}
        out.write_text(json.dumps(record, indent=1) + "\n")
    for method, solver in pairs:
        made = s.optimise(method, solver, budgets, int(cfg.calibration.seed), "")
        for n, c in s.evaluate_file(solver, made).items():
            if int(n) not in budgets:
                continue
            cell = {"pair": f"{method}/{solver}", "model": model, "nfe": int(n), **c}
            if with_quality:
                t0 = time.perf_counter()
                cell["quality"] = quality(s, cfg, solver, made["file"], len(c["sigmas"]) - 1, f"{n}_{solver}_{method}")
                cell["quality_seconds"] = round(time.perf_counter() - t0, 1)
            key = pair_key(model, f"{method}/{solver}", n)
            old = record.get(key) or {}
            if "quality" not in cell and old.get("quality") and old.get("sigmas") == cell.get("sigmas"):
                cell["quality"], cell["quality_seconds"] = old["quality"], old.get("quality_seconds")  # same grid: kept
            record[key] = cell
            out.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps({k: cell[k] for k in ("pair", "nfe", "error", "calibration_rmse_to_teacher")}), flush=True)
    print(table(record))
    return record


if __name__ == "__main__":
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        main(sys.argv[1:])
