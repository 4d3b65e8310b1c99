"""Momentum/history methods × steps: error to the reference ODE solution vs NFE on an analytic model
(config.yaml), FID and CLIP score vs NFE on the bundled model (bundled.yaml, see images.py).

    python -m experiments.momentum_study                 # writes docs/momentum_mixture.{md,png}
    python -m experiments.momentum_study fast=true out=/tmp/x
    python -m experiments.momentum_study --config-name bundled   # writes docs/momentum_bundled.{md,png}
    python -m experiments.momentum_study --config-name bundled from_results=<run folder>/results.json  # or [a,b]

Each grid point is an ordinary samplerlab run (framework.entry.api.run, float64, exact/reference error);
the table and plot are written to ``out`` and every run's record to the Hydra run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from framework.entry.api import run
from framework.core.files import atomic_write_json


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


def write(table, cfg: DictConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    steps = sorted({s for row in table.values() for s in row})
    lines = [f"Error to the reference solution (RMSE) on `model={cfg.model}` (float64), base `solver={cfg.solver}`, "
             f"karras grid; columns are steps (NFE = steps for every method here).", "",
             "| method | " + " | ".join(str(s) for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, row) in enumerate(table.items()):
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['rmse_to_reference']:.2e}" for s in steps) + " |")
        ax.loglog([row[s]["nfe"] for s in steps], [row[s]["rmse_to_reference"] for s in steps], marker="os^"[i // 10], linestyle=("-", "--", ":")[i // 10], label=name)
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to reference")
    ax.set_title(f"momentum family on {cfg.model}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"momentum_{cfg.model}.png", dpi=120)
    (out / f"momentum_{cfg.model}_table.md").write_text("\n".join(lines) + "\n")


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    folder = Path(HydraConfig.get().runtime.output_dir)
    if "cfg_scales" in cfg:  # the bundled-model half
        from experiments.momentum_study import images

        if cfg.get("from_results"):  # tables and plot from finished or interrupted studies' results.json
            results = images.merge([json.loads(Path(p).read_text()) for p in images.as_list(cfg.from_results)])
            results.setdefault("real_vs_real_fid", images.real_noise_floor(
                results["num_samples"], results["fid_reference"], 1234, [cfg.floor_seed + k for k in range(5)]))
        else:
            results = images.study(cfg, folder)
        atomic_write_json(folder / "results.json", results)
        images.write(results, cfg, Path(cfg.out))
        images.sample_grid(cfg, Path(cfg.out))
        print(f"results: {folder / 'results.json'}")
        return
    table = study(cfg, folder)
    write(table, cfg, Path(cfg.out))
    atomic_write_json(folder / "record.json", {"experiment": "momentum_study", "config": OmegaConf.to_container(cfg),
                                               "results": table})
    print(json.dumps({k: {s: v["rmse_to_reference"] for s, v in row.items()} for k, row in table.items()}, indent=1))


if __name__ == "__main__":
    main()
