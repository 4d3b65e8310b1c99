"""Optimised σ grids against the best stock sampler (issue 24's table).

    python -m experiments.schedule_opt                       # docs/optimisation_table.md + plots
    python -m experiments.schedule_opt fast=true out=/tmp/so runs=/tmp/so/runs
    python -m experiments.schedule_opt models=[mixture]      # one model
    python -m experiments.schedule_opt from_results=outputs/schedule_opt/record.json   # docs again, no sampling

For each model: the optimisers of ``framework.tools.schedule_opt`` compute grids from the
calibration set (``calibration``: prompts × seed) for each (method, solver) of ``plan`` and each
NFE budget; every grid then runs as an ordinary samplerlab run (``schedule=optimized
schedule.file=…``) on the held-out set (``heldout``: other prompts, other seed). Stock samplers
(``stock_solvers`` × ``stock_schedules``) run on the same held-out set with the most steps whose
NFE fits the budget (NFE(steps) probed, as experiments.solver_table). Every run's final latents
are compared with one reference from the same x_T (checked bit for bit): ``solver=reference``
(DOP853) from σ_max to the model's σ_min, then D there — the final step the fixed-step solvers
take on a grid ending [σ_min, 0]. A grid whose last nonzero σ is above σ_min is compared with the
same target (it stops early, and pays for it). The error is the RMSE over all elements of all
samples. Two calibration seeds (``calibration.seed``, ``second_seed``) give two grids per
(method, solver, budget) in ``agreement``: their RMS difference in log σ.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.harness import Experiment, entry, instantiate, pyplot, save_figure, save_text
from experiments.schedule_opt.common import base_overrides, reference_overrides
from framework.entry.api import run
from framework.entry.compose import compose
from framework.plugin import ConfigError

HERE = Path(__file__).resolve().parent


class WithoutExactSolution:
    """An analytic model with its per-run exact-solution metric off (one reference serves all)."""

    def __init__(self, model):
        self.model = model
        self.sigma_min, self.sigma_max, self.shape = model.sigma_min, model.sigma_max, model.shape

    def __call__(self, x, sigma, **cond):
        return self.model(x, sigma, **cond)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


class Study:
    """One model's held-out runs, its reference and its optimised grids."""

    def __init__(self, cfg: DictConfig, model: str, folder: Path):
        self.cfg, self.model, self.folder = cfg, model, folder / model
        self.n = int(cfg.heldout.num_samples[model])
        self.dtype = str(cfg.dtype[model])
        self.base = base_overrides(model, self.dtype, list(cfg.heldout.prompts), int(cfg.heldout.seed), self.n)
        self.object = None
        node = compose([f"model={model}"])[0].model
        if model in ("mixture", "gaussian"):
            self.object = WithoutExactSolution(instantiate(node, f"model={model}"))
        from experiments.harness import load_model

        adapter = load_model([f"model={model}", "device=cpu"]) if self.object is None else None
        self.sigma_max = float((adapter or self.object).sigma_max)
        self.sigma_min = float((adapter or self.object).sigma_min)
        self.nfe_law: dict[str, tuple[float, float]] = {}
        self.teachers: dict = {}  # teacher trajectories shared by the optimisers of one calibration set
        r = cfg.reference[model]
        t0 = time.perf_counter()
        ref = self.run(reference_overrides(self.sigma_max, self.sigma_min, float(r.rtol), float(r.atol)), "reference")
        self.ref, self.x_T, self.ref_nfe = ref.latents, ref.x_T, ref.record["metrics"]["nfe"]
        self.ref_seconds = round(time.perf_counter() - t0, 1)

    def run(self, extra: list[str], name: str):
        return run(self.base + extra, model=self.object, output_dir=self.folder / name)

    def error(self, extra: list[str], name: str) -> dict[str, Any]:
        res = self.run(extra, name)
        # the same noise times σ_max; a schedule computing σ_max as exp(log σ_max) may differ in the last bit
        if res.x_T.shape != self.x_T.shape or not torch.allclose(res.x_T, self.x_T, rtol=1e-6, atol=0):
            return {"skipped": "does not start from the reference's x_T"}
        return {"nfe": res.record["metrics"]["nfe"], "error": rmse(res.latents, self.ref),
                "sigmas": list(res.schedule.sigmas)}

    def steps_within(self, solver: str, budget: int) -> int | None:
        """The most steps whose NFE fits ``budget`` (NFE = a·steps + b, from two one-sample probes)."""
        if solver not in self.nfe_law:
            n = [run(self.base + [f"solver={solver}", f"steps={s}", "num_samples=1", "batch_size=1"], model=self.object,
                     output_dir=self.folder / f"probe_{solver}_{s}").record["metrics"]["nfe"] for s in (4, 8)]
            a = (n[1] - n[0]) / 4
            self.nfe_law[solver] = (a, n[0] - 4 * a)
        a, b = self.nfe_law[solver]
        s = math.floor((budget - b) / a + 1e-9)
        return s if s >= 2 else None

    def stock(self, budgets: list[int]) -> dict:
        out: dict = {}
        cells = [(sv, sc) for sv in self.cfg.stock_solvers for sc in self.cfg.stock_schedules]
        for solver, schedule in tqdm(cells, desc=f"{self.model} stock"):
            extra = [f"schedule={schedule}", *self.cfg.schedule_overrides.get(schedule, [])]
            row: dict = {}
            for n in budgets:
                steps = self.steps_within(solver, n)
                if steps is None:
                    row[str(n)] = {"skipped": "no run of ≥ 2 steps fits"}
                    continue
                try:
                    row[str(n)] = self.error([f"solver={solver}", *extra, f"steps={steps}"], f"{solver}_{schedule}_{steps}")
                except ConfigError as e:
                    row = {"skipped": str(e)}
                    break
            out.setdefault(solver, {})[schedule] = row
        return out

    def reachable(self, solver: str, budgets: list[int]) -> list[int]:
        """The budgets the solver meets exactly (Heun: odd NFE only)."""
        out = []
        for n in budgets:
            k = self.steps_within(solver, n)
            a, b = self.nfe_law[solver]
            if k is not None and a * k + b == n:
                out.append(n)
        return out

    def optimise(self, method: str, solver: str, budgets: list[int], seed: int, tag: str) -> dict:
        """The schedule file of (method, solver) from the calibration set with ``seed``."""
        from framework.tools.schedule_opt import Calibration, Options, optimize

        c = self.cfg.calibration
        budgets = self.reachable(solver, budgets)
        if not budgets:
            raise ConfigError(f"solver={solver} meets none of the budgets exactly")
        init = str(self.cfg.ld3_init[self.model])
        if init.startswith("from_"):  # the file another method made for this solver (seed tag kept)
            init = str(self.folder / "schedules" / f"{solver}_{init[5:]}{tag}.json")
        opts = Options(method=method, nfe=list(budgets), out=str(self.folder / "schedules" / f"{solver}_{method}{tag}.json"),
                       fine=int(self.cfg.fine[self.model]), teacher=str(self.cfg.teacher[self.model].solver),
                       teacher_substeps=int(self.cfg.teacher[self.model].substeps),
                       teacher_rtol=float(self.cfg.teacher[self.model].rtol), iterations=int(self.cfg.iterations),
                       seconds=float(self.cfg.ld3_seconds[self.model]), progress=False,
                       init=init, calibration=Calibration(list(c.prompts), int(seed), int(c.num_samples[self.model])))
        overrides = [f"model={self.model}", f"dtype={self.dtype}", f"solver={solver}", "device=cpu"]
        if self.model in ("mixture", "gaussian"):
            overrides.append("guidance=[]")
        content, path = optimize(opts, overrides, log=lambda s: None, teachers=self.teachers)
        return {"file": str(path), "content": content}

    def evaluate_file(self, solver: str, made: dict) -> dict:
        out = {}
        for n, g in made["content"]["grids"].items():
            cell = self.error([f"solver={solver}", "schedule=optimized", f"schedule.file={made['file']}",
                               f"steps={g['steps']}"], f"opt_{Path(made['file']).stem}_{n}")
            out[n] = {**cell, "optimiser_seconds": g["seconds"], "optimiser_nfe": g["optimiser_nfe"],
                      "calibration_rmse_to_teacher": g["calibration_rmse_to_teacher"]}
        return out


def log_rms(a: list[float], b: list[float]) -> float | None:
    """RMS difference of log σ over the nonzero points (None when the grids differ in length)."""
    a, b = [s for s in a if s > 0], [s for s in b if s > 0]
    if len(a) != len(b):
        return None
    return float(np.sqrt(np.mean((np.log(a) - np.log(b)) ** 2)))


def best_cells(results: dict, budgets: list[int]) -> dict:
    """Per budget: the best stock (solver, schedule) and the best optimised (method, solver) by
    held-out RMSE, and their ratio."""
    out = {}
    for n in map(str, budgets):
        stock = [(c["error"], f"{sv} + {sc}", c["nfe"]) for sv, by in results["stock"].items() for sc, row in by.items()
                 if isinstance(row, dict) and isinstance(c := row.get(n), dict) and "error" in c]
        opt = [(c["error"], f"{sv} + {m}", c["nfe"]) for m, by in results["optimised"].items() for sv, row in by.items()
               if isinstance(c := row.get(n), dict) and "error" in c]
        if stock and opt:
            s, o = min(stock), min(opt)
            out[n] = {"stock": {"sampler": s[1], "error": s[0], "nfe": s[2]},
                      "optimised": {"sampler": o[1], "error": o[0], "nfe": o[2]}, "ratio": o[0] / s[0]}
    return out


def study(cfg: DictConfig, folder: Path) -> dict:
    budgets = [int(n) for n in cfg.nfe]
    out: dict = {}
    for model in cfg.models:
        t0 = time.perf_counter()
        s = Study(cfg, model, folder)
        res: dict[str, Any] = {"reference_nfe": s.ref_nfe, "reference_seconds": s.ref_seconds,
                               "sigma_max": s.sigma_max, "sigma_min": s.sigma_min, "heldout_samples": s.n}
        t1 = time.perf_counter()
        res["stock"] = s.stock(budgets)
        res["stock_seconds"] = round(time.perf_counter() - t1, 1)
        res["optimised"], res["optimiser_seconds"], res["grids"] = {}, {}, {}
        for method, solvers in cfg.plan[model].items():
            for solver in tqdm(list(solvers), desc=f"{model} {method}"):
                t1 = time.perf_counter()
                try:
                    made = s.optimise(method, solver, budgets, int(cfg.calibration.seed), "")
                except ConfigError as e:
                    res["optimised"].setdefault(method, {})[solver] = {"skipped": str(e)}
                    continue
                res["optimiser_seconds"][f"{method}/{solver}"] = round(time.perf_counter() - t1, 1)
                res["grids"][f"{method}/{solver}"] = {n: g["sigmas"] for n, g in made["content"]["grids"].items()}
                res["optimised"].setdefault(method, {})[solver] = s.evaluate_file(solver, made)
        res["agreement"] = {}
        for pair in cfg.agreement[model]:
            method, solver = pair.split("/")
            a = res["grids"].get(pair)
            if a is None:
                continue
            t1 = time.perf_counter()
            tag, init = f"_seed{cfg.second_seed}", str(cfg.ld3_init[model])
            if method == "ld3" and init.startswith("from_"):  # its starting grid, from the same seed
                s.optimise(init[5:], solver, budgets, int(cfg.second_seed), tag)
            made = s.optimise(method, solver, budgets, int(cfg.second_seed), tag)
            b, held = made["content"]["grids"], s.evaluate_file(solver, made)
            first = res["optimised"][method][solver]
            res["agreement"][pair] = {n: {"log_sigma_rms": log_rms(a[n], b[n]["sigmas"]), "second_seed_sigmas": b[n]["sigmas"],
                                          "heldout_rmse": [first[n].get("error"), held[n].get("error")]}
                                      for n in a if n in b}
            res["agreement"][pair]["seconds"] = round(time.perf_counter() - t1, 1)
        res["best"] = best_cells(res, budgets)
        res["transfer"] = transfer(s, res, list(cfg.transfer_solvers))
        res["best"] = best_cells(res, budgets)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[model] = res
    return out


def transfer(s: Study, res: dict, solvers: list[str]) -> dict:
    """The best optimised grid of each budget run with other one-evaluation-per-step solvers (the
    same steps, so the same NFE): how much of the gain belongs to the solver it was made for."""
    out: dict = {}
    for n, b in res["best"].items():
        made_for, method = b["optimised"]["sampler"].split(" + ")
        path = s.folder / "schedules" / f"{made_for}_{method}.json"
        steps = len([v for v in res["optimised"][method][made_for][n]["sigmas"] if v > 0])
        row = {}
        for solver in solvers:
            if solver == made_for:
                continue
            cell = s.error([f"solver={solver}", "schedule=optimized", f"schedule.file={path}", f"steps={steps}"],
                           f"transfer_{made_for}_{method}_{n}_{solver}")
            if cell.get("nfe") == int(n):
                row[solver] = cell["error"]
        out[n] = {"grid": f"{method} for {made_for}", "errors": row}
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}"


def write(results: dict, cfg: DictConfig, out: Path) -> list[str]:
    files: list[str] = []
    budgets = [str(n) for n in cfg.nfe]
    lines = ["<!-- made by: python -m experiments.schedule_opt (do not edit by hand) -->", ""]
    for model, res in results.items():
        lines += [f"### `model={model}` ({cfg.dtype[model]}, {res['heldout_samples']} held-out samples"
                  f"{', CFG at its default (5)' if model not in ('mixture', 'gaussian') else ''})", "",
                  f"Reference: DOP853 σ {res['sigma_max']:g} → {res['sigma_min']:g}, then D; {res['reference_nfe']:g} NFE.", "",
                  "**Best of each side** — RMSE to the reference on the held-out set (ratio = optimised / stock; "
                  "the target is ≤ 0.70)", "",
                  "| NFE | best stock | RMSE | best optimised | RMSE | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        for n in budgets:
            b = res["best"].get(n)
            if b:
                lines.append(f"| {n} | {b['stock']['sampler']} ({b['stock']['nfe']:g}) | {fmt(b['stock']['error'])} | "
                             f"{b['optimised']['sampler']} | {fmt(b['optimised']['error'])} | **{b['ratio']:.2f}** |")
        lines += ["", "**Stock samplers** (the run with the most steps that fit; its NFE in brackets when below)", "",
                  "| solver + schedule | " + " | ".join(budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for solver, by in res["stock"].items():
            for schedule, row in by.items():
                if "skipped" in row:
                    lines.append(f"| {solver} + {schedule} | skipped: {row['skipped']} |")
                    continue
                cells = [("·" if "error" not in (c := row[n]) else fmt(c["error"]) + ("" if c["nfe"] == int(n) else f" ({c['nfe']:g})"))
                         for n in budgets]
                lines.append(f"| {solver} + {schedule} | " + " | ".join(cells) + " |")
        lines += ["", "**Optimised grids** (held-out RMSE; optimiser seconds in brackets; `·`: the solver cannot meet "
                  "that NFE exactly)", "", "| method + solver | " + " | ".join(budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for method, by in res["optimised"].items():
            for solver, row in by.items():
                if "skipped" in row:
                    lines.append(f"| {method} + {solver} | skipped: {row['skipped']} |")
                    continue
                cells = [f"{fmt(row[n]['error'])} ({row[n]['optimiser_seconds']:.0f} s)" if n in row and "error" in row[n] else "·"
                         for n in budgets]
                lines.append(f"| {method} + {solver} | " + " | ".join(cells) + " |")
        if res["agreement"]:
            lines += ["", f"**Two calibration seeds** ({cfg.calibration.seed} and {cfg.second_seed}): RMS difference "
                      "of log σ between the two grids [held-out RMSE of the first / second seed's grid]", "",
                      "| method / solver | " + " | ".join(budgets) + " |", "| --- |" + " --- |" * len(budgets)]
            for pair, row in res["agreement"].items():
                cells = [("·" if n not in row or row[n]["log_sigma_rms"] is None else
                          f"{row[n]['log_sigma_rms']:.3f} [{fmt(row[n]['heldout_rmse'][0])} / {fmt(row[n]['heldout_rmse'][1])}]")
                         for n in budgets]
                lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        if res.get("transfer"):
            lines += ["", "**Transfer across solvers**: the best optimised grid of each budget run with other solvers "
                      "(held-out RMSE; compare with the stock best above)", "", "| NFE | grid made for | " +
                      " | ".join(cfg.transfer_solvers) + " |", "| --- | --- |" + " --- |" * len(cfg.transfer_solvers)]
            for n, t in res["transfer"].items():
                lines.append(f"| {n} | {t['grid']} | " + " | ".join(fmt(t["errors"][v]) if v in t["errors"] else "—"
                                                                   for v in cfg.transfer_solvers) + " |")
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["optimiser_seconds"].items())
        lines += ["", f"Seconds: reference {res['reference_seconds']:.0f}, stock runs {res['stock_seconds']:.0f}, "
                  f"optimisers (all budgets, incl. teacher when first) {secs}; whole model {res['seconds']:.0f}.", ""]
        plot(model, res, cfg, out, files)
        lines += [f"![optimised grids on {model}](optimisation_{model}.png)", ""]
    save_text("\n".join(lines) + "\n", out / "optimisation_table.md", files)
    return files


def plot(model: str, res: dict, cfg: DictConfig, out: Path, files: list[str]) -> None:
    """Per budget: the best optimised grid, the best stock sampler's grid, karras and AYS."""
    from framework.tools.schedule_opt import stock_grid

    plt = pyplot()
    budgets = [str(n) for n in cfg.nfe if str(n) in res["best"]]
    if not budgets:
        return
    adapter = None
    if model in ("mixture", "gaussian"):
        adapter = instantiate(compose([f"model={model}"])[0].model, model)
    else:
        from experiments.harness import load_model

        adapter = load_model([f"model={model}", "device=cpu"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.3 * len(budgets), 3.3), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], budgets):
        b = res["best"][n]
        sv, m = b["optimised"]["sampler"].split(" + ")
        opt = res["optimised"][m][sv][n]["sigmas"]
        ssv, ssc = b["stock"]["sampler"].split(" + ")
        st = res["stock"][ssv][ssc][n]["sigmas"]
        steps = len([s for s in opt if s > 0])
        series = [(f"{m} ({sv})", opt, dict(color="C3", marker="o", linewidth=2)),
                  (f"stock best: {ssc} ({ssv})", st, dict(color="k", marker="s", markersize=3)),
                  ("karras", stock_grid("karras", adapter, steps), dict(color="C0", marker=".", linestyle=":")),
                  ("ays", stock_grid("ays", adapter, steps), dict(color="C2", marker=".", linestyle="--"))]
        for label, sig, style in series:
            s = [v for v in sig if v > 0]
            ax.semilogy(range(len(s)), s, label=label, **style)
        ax.set_title(f"NFE {n}: ratio {b['ratio']:.2f}", fontsize=9)
        ax.set_xlabel("step index i", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("σ_i (final 0 not drawn)", fontsize=8)
    fig.suptitle(f"{model}: best optimised grid vs the best stock sampler's, karras and AYS", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / f"optimisation_{model}.png", files, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    ex = Experiment.compose(HERE, argv)
    cfg = ex.cfg
    if cfg.from_results:  # the tables and plots again from an earlier record, without sampling
        import json

        results = json.loads(Path(cfg.from_results).read_text())["results"]
    else:
        results = study(cfg, Path(cfg.runs))
    files = write(results, cfg, Path(cfg.out))
    return ex.record(Path(cfg.runs) / "record.json", results, files)


if __name__ == "__main__":
    entry(main)
