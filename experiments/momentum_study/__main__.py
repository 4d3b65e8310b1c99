"""Momentum/history methods × steps: error to the reference ODE solution vs NFE on an analytic model
(config.yaml), FID and CLIP score vs NFE on the bundled model (bundled.yaml, see images.py).

    python -m experiments.momentum_study                 # writes docs/momentum_mixture.{md,png}
    python -m experiments.momentum_study fast=true out=/tmp/x
    python -m experiments.momentum_study --config-name bundled   # writes docs/momentum_bundled.{md,png}
    python -m experiments.momentum_study --config-name bundled from_results=<run folder>/results.json  # or [a,b]

Each grid point is an ordinary samplerlab run (framework.entry.api.run, float64, exact/reference error);
the table and plot are written to ``out``, every run's folder and the study's record to ``runs``.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.harness import Experiment, entry, pyplot, save_figure, save_text
from framework.core.files import atomic_write_json
from framework.entry.api import run

HERE = Path(__file__).resolve().parent


def study(cfg: DictConfig, folder: Path) -> dict[str, dict[int, dict[str, float]]]:
    methods = OmegaConf.to_container(cfg.methods)
    steps = list(cfg.steps)
    if cfg.fast:
        methods = {k: methods[k] for k in list(methods)[:3]}
        steps = steps[:2]
    n = 4 if cfg.fast else cfg.num_samples
    base = [f"model={cfg.model}", f"solver={cfg.solver}", "dtype=float64", f"num_samples={n}", f"batch_size={n}",
            "guidance=[]", "callback=[]"]
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name, extra in tqdm([(k, v) for k, v in methods.items()], desc="methods"):
        for s in steps:
            rec = run(base + list(extra) + [f"steps={s}"], output_dir=folder / "runs" / f"{name}_{s}").record
            table.setdefault(name, {})[s] = {k: rec["metrics"][k] for k in ("nfe", "rmse_to_reference")}
    return table


def write(table, cfg: DictConfig, out: Path) -> list[str]:
    """The table (markdown) and the plot; returns the names of the files written."""
    from matplotlib.ticker import NullLocator

    plt = pyplot()
    files: list[str] = []
    steps = sorted({s for row in table.values() for s in row})
    lines = [f"Error to the reference solution (RMSE) on `model={cfg.model}` (float64), base `solver={cfg.solver}`, "
             f"karras grid; columns are steps (NFE = steps for every method here).", "",
             "| method | " + " | ".join(str(s) for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    fig, ax = plt.subplots(figsize=(8.6, 4.6), layout="constrained")
    for i, (name, row) in enumerate(table.items()):
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['rmse_to_reference']:.2e}" for s in steps) + " |")
        ax.loglog([row[s]["nfe"] for s in steps], [row[s]["rmse_to_reference"] for s in steps], marker="os^"[i // 10],
                  linestyle=("-", "--", ":")[i // 10], label=name)
    nfe = sorted({row[s]["nfe"] for row in table.values() for s in steps})
    ax.xaxis.set_minor_locator(NullLocator())  # the NFE of the grid as the ticks: no 6×10⁰ labels colliding
    ax.set_xticks(nfe, [f"{n:g}" for n in nfe])
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to reference")
    ax.set_title(f"momentum family on {cfg.model}")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out / f"momentum_{cfg.model}.png", files, dpi=120)
    save_text("\n".join(lines) + "\n", out / f"momentum_{cfg.model}_table.md", files)
    return files


def main(argv: list[str] | None = None) -> dict:
    """Run the study (config.yaml: the mixture half; ``--config-name bundled``: the image half);
    returns its record, also written to ``<runs>/record.json``."""
    ex = Experiment.compose(HERE, argv)
    cfg, folder, out = ex.cfg, Path(ex.cfg.runs), Path(ex.cfg.out)
    if "cfg_scales" in cfg:  # the bundled-model half (bundled.yaml)
        from experiments.momentum_study import images

        if cfg.get("from_results"):  # tables and plot from finished or interrupted studies' results.json
            results = images.merge([json.loads(Path(p).read_text()) for p in images.as_list(cfg.from_results)])
            results.setdefault("real_vs_real_fid", images.real_noise_floor(
                results["num_samples"], results["fid_reference"], 1234, [cfg.floor_seed + k for k in range(5)]))
        else:
            results = images.study(cfg, folder)
        atomic_write_json(folder / "results.json", results)
        files = images.write(results, cfg, out) + images.sample_grid(cfg, out)
        print(f"results: {folder / 'results.json'}")
        return ex.record(folder / "record.json", results, files)
    table = study(cfg, folder)
    files = write(table, cfg, out)
    print(json.dumps({k: {s: v["rmse_to_reference"] for s, v in row.items()} for k, row in table.items()}, indent=1))
    return ex.record(folder / "record.json", table, files)


if __name__ == "__main__":
    entry(main)
