"""Error to the reference solution vs NFE for every solver × schedule (issue 4's table).

    python -m experiments.solver_table                   # writes docs/solver_table.md + plots
    python -m experiments.solver_table fast=true out=/tmp/x
    python -m experiments.solver_table runs=<earlier run folder>   # resumes: finished runs are read back
    python -m experiments.solver_table from_results=[a/record.json,b/record.json]   # tables from earlier runs
    python -m experiments.solver_table from_results=[experiments/solver_table/results.json]   # the docs' own

``results.json`` beside this file holds the results behind docs/solver_table.md (the study's record,
full precision), so the tables and plots can be redrawn without the study.

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


ANALYTIC = ("mixture", "gaussian")


class WithoutExactSolution:
    """An analytic model with its per-run exact-solution metric switched off: the engine would
    integrate it again for every run, while the table needs one reference per grid."""

    def __init__(self, model):
        self.model = model
        self.sigma_min, self.sigma_max, self.shape = model.sigma_min, model.sigma_max, model.shape

    def __call__(self, x, sigma, **cond):
        return self.model(x, sigma, **cond)


def of_model(cfg: DictConfig, key: str, model: str) -> list:
    """``cfg[key]``, or its per-model replacement ``cfg[key + "_of"][model]`` where one is given
    (e.g. ``nfe_of: {bundled: [5, 6, 8, 10]}``: fewer budgets for the expensive model)."""
    per_model = cfg.get(f"{key}_of") or {}
    return list(per_model[model]) if model in per_model else list(cfg[key])


class Table:
    """One model's runs; references are cached per (first σ, last nonzero σ, whether the grid ends
    at 0, init noise scale)."""

    def __init__(self, cfg: DictConfig, model: str, folder: Path):
        self.cfg, self.model, self.folder = cfg, model, folder
        self.probe_table: Table | None = None  # a cheap model whose runs measure NFE(steps) for this one
        n = 2 if cfg.fast else cfg.num_samples[model]
        self.base = [f"model={model}", f"dtype={cfg.dtype[model]}", f"num_samples={n}", f"batch_size={n}",
                     "callback=[]", "save_images=false"]
        self.model_object = None
        if model in ANALYTIC:
            self.base.append("guidance=[]")
            node = compose([f"model={model}"])[0].model
            self.model_object = WithoutExactSolution(instantiate(node, f"model={model}"))
        self.refs: dict[tuple, torch.Tensor] = {}
        self.ref_nfe: dict[tuple, float] = {}

    def run(self, extra: list[str], name: str):
        return run(self.base + extra, model=self.model_object, output_dir=self.folder / self.model / name)

    def schedule(self, name: str) -> list[str]:
        """The overrides of a schedule column: ``schedule=<name>`` and its ``schedule_overrides``,
        or those alone when they choose the schedule themselves (a named variant, e.g. flow_karras)."""
        extra = list(self.cfg.schedule_overrides.get(name, []))
        return extra if any(o.startswith("schedule=") for o in extra) else [f"schedule={name}", *extra]

    def nfe_of_steps(self, solver: str, schedule: str) -> tuple[float, float]:
        """(a, b) with NFE = a·steps + b, from two short runs (on ``probe_table``'s model when one is
        set and accepts the solver and schedule: NFE(steps) does not depend on the model for the
        solvers here but restart's, and a cell's NFE is measured again in its own run anyway)."""
        if self.probe_table is not None:
            try:
                return self.probe_table.nfe_of_steps(solver, schedule)
            except ConfigError:
                pass
        n = [self.run([f"solver={solver}", *self.schedule(schedule), f"steps={s}", "num_samples=1", "batch_size=1"],
                      f"probe_{solver}_{schedule}_{s}").record["metrics"]["nfe"] for s in (4, 8)]
        a = (n[1] - n[0]) / 4
        return a, n[0] - 4 * a

    def reference(self, result) -> tuple[torch.Tensor, float]:
        sig = result.schedule.sigmas
        last = [s for s in sig if s > 0][-1]
        to_zero = sig[-1] == 0  # a grid that ends above 0 (dpm_fast's) returns x there, not D
        key = (round(sig[0], 9), round(last, 9), to_zero, round(result.schedule.init_noise_scale, 9))
        if key not in self.refs:
            r = self.cfg.reference[self.model]
            grid = ([sig[0], last, 0.0] if last < sig[0] else [sig[0], 0.0]) if to_zero else [sig[0], last]
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
    out: dict = {}
    probe_models = cfg.get("probe_model") or {}
    for model in cfg.models:
        schedules, solvers, budgets = of_model(cfg, "schedules", model), list(cfg.solvers), of_model(cfg, "nfe", model)
        if cfg.fast:
            schedules, solvers, budgets = schedules[:1], ["euler", "heun"], budgets[:2]
        t = Table(cfg, model, folder)
        if model in probe_models and not cfg.fast:
            t.probe_table = Table(cfg, probe_models[model], folder / f"probes_for_{model}")
        for schedule in schedules:
            for solver in tqdm(solvers, desc=f"{model} {schedule}"):
                if solver in (cfg.get("owns_schedule") or []) and schedule != schedules[0]:
                    continue  # its own grid: one row, under the first schedule
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


def series_groups(by_schedule: dict, solvers: list[str]) -> list[list[str]]:
    """The solvers of one model grouped by identical curves (the same NFE and errors, within 1e-9
    relative, in every schedule): ``euler = ddim`` is one series of the plot, not two on top of each
    other. Groups are in the order of ``solvers``."""
    def curve(solver):
        return [[(c["nfe"], c["error"]) for c in rows[solver]] if isinstance(rows.get(solver), list) else None
                for rows in by_schedule.values()]

    def same(a, b):
        return all((x is None) == (y is None) and (x is None or (len(x) == len(y) and all(
            n == m and abs(e - f) <= 1e-9 * max(abs(e), abs(f)) for (n, e), (m, f) in zip(x, y)))) for x, y in zip(a, b))

    groups: list[list[str]] = []
    present = [s for s in solvers if any(isinstance(rows.get(s), list) and rows[s] for rows in by_schedule.values())]
    for solver in present:
        home = next((g for g in groups if same(curve(g[0]), curve(solver))), None)
        (home.append(solver) if home is not None else groups.append([solver]))
    return groups


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#b8860b")
"""Twelve distinguishable colours (matplotlib's tab10, black, dark goldenrod): a row of the plot
holds at most twelve series."""
MARKERS = "osD^v<>pXh*P"


def plot(model: str, by_schedule: dict, solvers: list[str], stochastic: set[str], budgets: list[float], out: Path,
         files: list[str], new: set[str] = frozenset(), new_label: str = "new") -> None:
    """``solver_table_<model>.png``: a column per schedule, deterministic solvers in the top row and
    stochastic ones below (they do not converge to the ODE solution: their curves say how far their
    samples land from it), identical curves merged, one legend per row beside the panels, the NFE
    budgets as the x ticks. Solvers in ``new`` get rows of their own, with the lower envelope of the
    other solvers of their kind (the best of them at each budget) drawn in grey for comparison."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    plt = pyplot()
    panels = {k: v for k, v in by_schedule.items() if any(isinstance(c, list) for c in v.values())}
    if not panels:
        return
    groups = series_groups(panels, solvers)
    rows = [(f"{kind} solvers" + (f", {new_label}" if fresh else ""),
             [g for g in groups if (g[0] in stochastic) == stoch and (g[0] in new) == fresh])
            for kind, stoch in (("deterministic (ODE)", False), ("stochastic", True)) for fresh in (False, True)]
    rows = [(title, gs) for title, gs in rows if gs]
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.3 * len(panels) + 2.9, 3.9 * len(rows)),
                             squeeze=False, sharex=True, sharey="row", layout="constrained")
    for r, (title, gs) in enumerate(rows):
        for ax, (schedule, cells_of) in zip(axes[r], panels.items()):
            if new_label in title:  # the best of the earlier solvers of this kind at each budget
                earlier = [cells for s, cells in cells_of.items() if s not in new and isinstance(cells, list)
                           and (s in stochastic) == title.startswith("stochastic")]
                env = [(b, min(c["error"] for cells in earlier if (c := at_budget(cells, b)) is not None))
                       for b in budgets if any(at_budget(cells, b) for cells in earlier)]
                if env:
                    ax.loglog(*zip(*env), color="#999999", linestyle="--", linewidth=2.2, zorder=0,
                              label="best earlier solver at each budget")
            for k, g in enumerate(gs):
                cells = cells_of.get(g[0])
                if not isinstance(cells, list) or not cells:
                    continue
                ax.loglog([c["nfe"] for c in cells], [max(c["error"], 1e-16) for c in cells], color=PALETTE[k % len(PALETTE)],
                          marker=MARKERS[k % len(MARKERS)], markersize=4.5, linewidth=1.3,
                          linestyle=":" if g[0] in stochastic else "-", label=" = ".join(g))
            ax.set_title(f"{model}, {schedule}: {title}", fontsize=9)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.tick_params(labelsize=8)
            ax.grid(True, which="major", alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("NFE")
        axes[r][0].set_ylabel("RMSE to reference")
        low, high = axes[r][0].get_ylim()
        if high / low < 100:  # under two decades: label 1-2-5 steps, not only the powers of ten
            axes[r][0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes[r][0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axes[r][0].yaxis.set_minor_locator(NullLocator())
        handles, labels = [], []
        for ax in axes[r]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        axes[r][-1].legend(handles, labels, fontsize=7.5, loc="center left", bbox_to_anchor=(1.03, 0.5), frameon=False)
    save_figure(fig, out / f"solver_table_{model}.png", files, dpi=100)


def optimised_rows(cfg: DictConfig, model: str, budgets: list) -> list[str]:
    """The optimised samplers of issue 24 (``optimised_from``: experiments.schedule_opt's record):
    per budget the grid chosen on its calibration set and the best stock sampler of that study, on
    that study's held-out set (its own samples and reference: not the samples of the rows above)."""
    path = cfg.get("optimised_from")
    if not path or not Path(path).is_file():
        return []
    res = json.loads(Path(path).read_text())["results"].get(model)
    if not res or not res.get("best"):
        return []
    shown = [b for b in budgets if str(int(b)) in res["best"]]
    cells = {str(int(b)): res["best"][str(int(b))] for b in shown}
    lines = [f"**Optimised σ grids** ([optimisation.md](optimisation.md), `python -m experiments.schedule_opt`): RMSE to "
             f"the reference on that study's held-out set ({res['heldout_samples']} samples, its own reference; not the "
             "samples of the rows above), the grid chosen on its calibration set beside that study's best stock sampler", "",
             "| sampler | " + " | ".join(f"{b:g}" for b in shown) + " |", "| --- |" + " --- |" * len(shown)]
    how = "chosen on calibration" if all(c.get("selected_on") == "calibration" for c in cells.values()) else "held-out best"
    for side, label in (("optimised", f"optimised ({how})"), ("stock", "best stock")):
        lines.append(f"| {label} | " + " | ".join(f"{c[side]['error']:.2e} ({c[side]['sampler']})" for c in cells.values()) + " |")
    lines.append("| ratio | " + " | ".join(f"{c['ratio']:.2f}" for c in cells.values()) + " |")
    return lines + [""]


def verdict_rows(cfg: DictConfig, model: str, budgets: list) -> list[str]:
    """Issue 24's verdicts (``verdicts``: a probe record of experiments.schedule_opt.probe and the pair chosen per
    budget — the best optimised sampler whose FD and prompt accuracy were kept, docs/optimisation.md) beside the
    record's best stock sampler at that budget, with the ratio's 90 % interval (paired bootstrap over the samples)."""
    from experiments.schedule_opt.common import pair_key, ratio_interval

    v = (cfg.get("verdicts") or {}).get(model)
    if not v or not Path(v.record).is_file():
        return []
    rec = json.loads(Path(v.record).read_text())
    cells = {}
    for b in budgets:
        pair = v.pairs.get(int(b))
        opt = rec.get(pair_key(model, pair, b)) if pair else None
        stock = [(k, e) for k, e in rec.items() if k.startswith(f"{model}/stock/") and int(e["nfe"]) == int(b)]
        if opt is None or not stock:
            continue
        key, best = min(stock, key=lambda ke: ke[1]["error"])
        spec, solver = pair.split("/")
        cells[f"{b:g}"] = (spec if solver == "learned" else f"{solver} + {spec}", opt, " + ".join(key.split("/")[2:4]), best,
                           ratio_interval(best["sample_errors"], opt["sample_errors"]))
    if not cells:
        return []
    n = len(next(iter(cells.values()))[1]["sample_errors"])
    lines = [f"**Verdicts on {n} held-out samples** ([optimisation.md](optimisation.md), `{v.record}`): the best "
             "optimised sampler whose FD and prompt accuracy stay within the stock best's noise floor, beside the best "
             "stock sampler of that record (each against the reference from its own start; on a flow model every sampler "
             "against the one from t = 1, x_T = ε)", "",
             "| sampler | " + " | ".join(cells) + " |", "| --- |" + " --- |" * len(cells),
             "| optimised (pictures kept) | " + " | ".join(f"{c[1]['error']:.2e} ({c[0]})" for c in cells.values()) + " |",
             "| best stock | " + " | ".join(f"{c[3]['error']:.2e} ({c[2]})" for c in cells.values()) + " |",
             "| ratio (90 % interval) | " + " | ".join(f"{c[1]['error'] / c[3]['error']:.2f} ({c[4][0]:.2f}–{c[4][1]:.2f})"
                                                       for c in cells.values()) + " |"]
    return lines + [""]


def write(results: dict, cfg: DictConfig, out: Path) -> list[str]:
    """docs/solver_table.md and a plot per model; returns the names of the files written."""
    files: list[str] = []
    stochastic = set(cfg.stochastic)
    marks = {s: f" *({m})*" for s, m in (cfg.get("marks") or {}).items()}
    lines = ["<!-- made by: python -m experiments.solver_table (do not edit by hand) -->", ""]
    for note in cfg.get("notes") or []:
        lines += [note, ""]
    for model, by_schedule in results.items():
        budgets = of_model(cfg, "nfe", model)[:2] if cfg.fast else of_model(cfg, "nfe", model)
        n = 2 if cfg.fast else cfg.num_samples[model]
        lines += [f"### `model={model}` ({cfg.dtype[model]}, {n} samples{'' if model in ANALYTIC else ', CFG 5'})", ""]
        for schedule, rows in by_schedule.items():
            reasons = {cells["skipped"] for cells in rows.values() if isinstance(cells, dict)}
            if len(reasons) == 1 and all(isinstance(c, dict) for c in rows.values()):
                lines += [f"**schedule={schedule}**: skipped for every solver: {reasons.pop()}", ""]
                continue
            lines += [f"**schedule={schedule}** — RMSE to the reference at each NFE budget: the run with the most "
                      "steps that fit (its NFE in brackets when below the budget; `·`: no run of ≥ 2 steps fits)", "",
                      "| solver | " + " | ".join(f"{b:g}" for b in budgets) + " | s/sample (largest run) |",
                      "| --- |" + " --- |" * (len(budgets) + 1)]
            for solver, cells in rows.items():
                label = solver + (" *(stoch.)*" if solver in stochastic else "") + marks.get(solver, "")
                if isinstance(cells, dict):
                    lines.append(f"| {label} | skipped: {cells['skipped']} |")
                    continue
                row = []
                for b in budgets:
                    c = at_budget(cells, b)
                    row.append("·" if c is None else f"{c['error']:.2e}" + ("" if c["nfe"] == b else f" ({c['nfe']:g})"))
                lines.append(f"| {label} | " + " | ".join(row) + f" | {cells[-1]['seconds_per_sample']:.3g} |" if cells
                             else f"| {label} | " + " | ".join(row) + " | |")
            refs = sorted({c["reference_nfe"] for cells in rows.values() if isinstance(cells, list) for c in cells})
            if refs:
                lines += ["", f"Reference solutions: {len(refs)} distinct, {min(refs):g}–{max(refs):g} NFE each."]
            lines.append("")
        lines += optimised_rows(cfg, model, budgets)
        lines += verdict_rows(cfg, model, budgets)
        plot(model, by_schedule, list(cfg.solvers), stochastic, budgets, out, files, new=set(cfg.get("new") or []),
             new_label=cfg.get("new_label") or "new")
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
