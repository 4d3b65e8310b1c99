"""Error to the reference solution vs NFE for every solver × schedule (issue 4's table).

    python -m experiments.solver_table                   # writes docs/solver_table.md + plots
    python -m experiments.solver_table fast=true out=/tmp/x
    python -m experiments.solver_table runs=<earlier run folder>   # resumes: finished runs are read back
    python -m experiments.solver_table from_results=[a/record.json,b/record.json]   # tables from earlier runs

For each model, schedule and NFE budget, every solver runs as an ordinary samplerlab run
(framework.entry.api.run) with the largest step count whose measured NFE fits the budget (NFE(steps) is
probed first: it is affine in steps for every solver here). Its final latents are compared with
the reference: ``solver=reference`` (scipy DOP853, tolerances from the config) started from the same
x_T (checked bit for bit) on the grid's first σ, integrated to the grid's last nonzero σ and
finished with D there — the final step the fixed-step solvers take. The error is the RMSE over all
elements of all samples. Stochastic solvers do not converge to the ODE solution: their rows say
how far their samples land from it, not a discretisation error. Seconds per sample are wall time
of the sampling loop on this machine (shared CPU; compare within one table only).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.harness import Experiment, entry, instantiate, pyplot, save_figure, save_text
from framework.entry.api import run
from framework.entry.compose import compose
from framework.plugin import ConfigError

HERE = Path(__file__).resolve().parent


class WithoutExactSolution:
    """An analytic model with its per-run exact-solution metric switched off: the engine would
    integrate it again for every run, while the table needs one reference per grid."""

    def __init__(self, model):
        self.model = model
        self.sigma_min, self.sigma_max, self.shape = model.sigma_min, model.sigma_max, model.shape

    def __call__(self, x, sigma, **cond):
        return self.model(x, sigma, **cond)


class Table:
    """One model's runs; references are cached per (first σ, last nonzero σ, init noise scale)."""

    def __init__(self, cfg: DictConfig, model: str, folder: Path):
        self.cfg, self.model, self.folder = cfg, model, folder
        n = 2 if cfg.fast else cfg.num_samples[model]
        self.base = [f"model={model}", f"dtype={cfg.dtype[model]}", f"num_samples={n}", f"batch_size={n}",
                     "callback=[]", "save_images=false"]
        self.model_object = None
        if model in ("mixture", "gaussian"):
            self.base.append("guidance=[]")
            node = compose([f"model={model}"])[0].model
            self.model_object = WithoutExactSolution(instantiate(node, f"model={model}"))
        self.refs: dict[tuple, torch.Tensor] = {}
        self.ref_nfe: dict[tuple, float] = {}

    def run(self, extra: list[str], name: str):
        return run(self.base + extra, model=self.model_object, output_dir=self.folder / self.model / name)

    def schedule(self, name: str) -> list[str]:
        return [f"schedule={name}", *self.cfg.schedule_overrides.get(name, [])]

    def nfe_of_steps(self, solver: str, schedule: str) -> tuple[float, float]:
        """(a, b) with NFE = a·steps + b, from two short runs."""
        n = [self.run([f"solver={solver}", *self.schedule(schedule), f"steps={s}", "num_samples=1", "batch_size=1"],
                      f"probe_{solver}_{schedule}_{s}").record["metrics"]["nfe"] for s in (4, 8)]
        a = (n[1] - n[0]) / 4
        return a, n[0] - 4 * a

    def reference(self, result) -> tuple[torch.Tensor, float]:
        sig = result.schedule.sigmas
        last = [s for s in sig if s > 0][-1]
        key = (round(sig[0], 9), round(last, 9), round(result.schedule.init_noise_scale, 9))
        if key not in self.refs:
            r = self.cfg.reference[self.model]
            grid = [sig[0], last, 0.0] if last < sig[0] else [sig[0], 0.0]
            ref = self.run(["solver=reference", f"solver.rtol={r.rtol}", f"solver.atol={r.atol}",
                            "solver.final=denoise", "schedule=custom", f"schedule.sigmas=[{','.join(map(repr, grid))}]",
                            f"schedule.init_noise={result.schedule.init_noise_scale!r}", f"steps={len(grid) - 1}"],
                           f"reference_{len(self.refs)}")
            if not torch.equal(ref.x_T, result.x_T):
                raise RuntimeError("the reference run did not start from the solver run's x_T")
            self.refs[key], self.ref_nfe[key] = ref.latents, ref.record["metrics"]["nfe"]
        return self.refs[key], self.ref_nfe[key]

    def cell(self, solver: str, schedule: str, steps: int) -> dict[str, float]:
        res = self.run([f"solver={solver}", *self.schedule(schedule), f"steps={steps}"], f"{solver}_{schedule}_{steps}")
        ref, ref_nfe = self.reference(res)
        err = float((res.latents.double() - ref.double()).pow(2).mean().sqrt())
        m = res.record["metrics"]
        return {"steps": steps, "nfe": m["nfe"], "error": err, "seconds_per_sample": m["seconds_per_sample"],
                "reference_nfe": ref_nfe}


def study(cfg: DictConfig, folder: Path) -> dict:
    """{model: {schedule: {solver: [cells] | {"skipped": reason}}}}; one cell per distinct step
    count (≥ 2) that the NFE budgets call for."""
    models, schedules, solvers, budgets = list(cfg.models), list(cfg.schedules), list(cfg.solvers), list(cfg.nfe)
    if cfg.fast:
        schedules, solvers, budgets = schedules[:1], ["euler", "heun"], budgets[:2]
    out: dict = {}
    for model in models:
        t = Table(cfg, model, folder)
        for schedule in schedules:
            for solver in tqdm(solvers, desc=f"{model} {schedule}"):
                try:
                    a, b = t.nfe_of_steps(solver, schedule)
                    steps = sorted({s for n in budgets if (s := math.floor((n - b) / a + 1e-9)) >= 2})
                    cells = [t.cell(solver, schedule, s) for s in steps]
                except ConfigError as e:
                    cells = {"skipped": str(e)}
                out.setdefault(model, {}).setdefault(schedule, {})[solver] = cells
    return out


def at_budget(cells: list[dict], budget: float) -> dict | None:
    """The cell with the most NFE within ``budget`` (None when even the cheapest exceeds it)."""
    fits = [c for c in cells if c["nfe"] <= budget and c["steps"] >= 2]
    return max(fits, key=lambda c: c["nfe"]) if fits else None


def write(results: dict, cfg: DictConfig, out: Path) -> list[str]:
    """docs/solver_table.md and a plot per model; returns the names of the files written."""
    plt = pyplot()
    files: list[str] = []
    stochastic = set(cfg.stochastic)
    budgets = list(cfg.nfe)[:2] if cfg.fast else list(cfg.nfe)
    lines = ["<!-- made by: python -m experiments.solver_table (do not edit by hand) -->", ""]
    for model, by_schedule in results.items():
        n = 2 if cfg.fast else cfg.num_samples[model]
        lines += [f"### `model={model}` ({cfg.dtype[model]}, {n} samples{', CFG 5' if model == 'bundled' else ''})", ""]
        fig, axes = plt.subplots(1, len(by_schedule), figsize=(5.2 * len(by_schedule), 4.4), squeeze=False)
        for ax, (schedule, rows) in zip(axes[0], by_schedule.items()):
            reasons = {cells["skipped"] for cells in rows.values() if isinstance(cells, dict)}
            if len(reasons) == 1 and all(isinstance(c, dict) for c in rows.values()):
                lines += [f"**schedule={schedule}**: skipped for every solver: {reasons.pop()}", ""]
                ax.set_visible(False)
                continue
            lines += [f"**schedule={schedule}** — RMSE to the reference at each NFE budget: the run with the most "
                      "steps that fit (its NFE in brackets when below the budget; `·`: no run of ≥ 2 steps fits)", "",
                      "| solver | " + " | ".join(f"{b:g}" for b in budgets) + " | s/sample (largest run) |",
                      "| --- |" + " --- |" * (len(budgets) + 1)]
            for i, (solver, cells) in enumerate(rows.items()):
                label = solver + (" *(stoch.)*" if solver in stochastic else "")
                if isinstance(cells, dict):
                    lines.append(f"| {label} | skipped: {cells['skipped']} |")
                    continue
                row = []
                for b in budgets:
                    c = at_budget(cells, b)
                    row.append("·" if c is None else f"{c['error']:.2e}" + ("" if c["nfe"] == b else f" ({c['nfe']:g})"))
                lines.append(f"| {label} | " + " | ".join(row) + f" | {cells[-1]['seconds_per_sample']:.3g} |" if cells
                             else f"| {label} | " + " | ".join(row) + " | |")
                ax.loglog([c["nfe"] for c in cells], [max(c["error"], 1e-16) for c in cells],
                          marker="os^D"[i % 4], linestyle=":" if solver in stochastic else "-", label=solver)
            refs = sorted({c["reference_nfe"] for cells in rows.values() if isinstance(cells, list) for c in cells})
            if refs:
                lines += ["", f"Reference solutions: {len(refs)} distinct, {min(refs):g}–{max(refs):g} NFE each."]
            lines.append("")
            ax.set(xlabel="NFE", ylabel="RMSE to reference", title=f"{model}, {schedule}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=6, ncol=2, loc="lower left")
        fig.tight_layout()
        save_figure(fig, out / f"solver_table_{model}.png", files, dpi=100)
        lines += [f"![error vs NFE on {model}](solver_table_{model}.png)", ""]
    save_text("\n".join(lines) + "\n", out / "solver_table.md", files)
    return files


def main(argv: list[str] | None = None) -> dict:
    """Run the study (or, with ``from_results``, rewrite the docs from earlier records); returns its
    record, also written to ``<runs>/record.json``."""
    ex = Experiment.compose(HERE, argv)
    cfg = ex.cfg
    if cfg.from_results:  # rewrite the tables and plots from earlier records, without sampling
        results: dict = {}
        for path in cfg.from_results:
            for model, by_schedule in json.loads(Path(path).read_text())["results"].items():
                results.setdefault(model, {}).update(by_schedule)
    else:
        results = study(cfg, Path(cfg.runs))
        print(json.dumps({m: {s: len(r) for s, r in v.items()} for m, v in results.items()}))
    files = write(results, cfg, Path(cfg.out))
    return ex.record(Path(cfg.runs) / "record.json", results, files)


if __name__ == "__main__":
    entry(main)
