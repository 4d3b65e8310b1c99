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

A model whose own grid starts at σ = ∞ (the bundled flow model, ``schedule=flow_match``: t = 1)
has its reference from there (x_T = ε; DOP853 integrates in t from t = 1), its optimised grids
start there too, and a stock grid that starts at a finite σ (karras, exponential: the model's
σ_max) gets its own reference from its own x_T.
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
from experiments.schedule_opt.common import base_overrides, ratio_interval, reference_overrides
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
    """One model's held-out runs, its reference(s) and its optimised grids; ``extra`` overrides
    (e.g. another ``cfg_scale``) apply to every run, the references and the optimisers."""

    def __init__(self, cfg: DictConfig, model: str, folder: Path, extra: list[str] | None = None, tag: str = "",
                 teachers: dict | None = None, n: int | None = None):
        self.cfg, self.model, self.folder = cfg, model, folder / (model + tag)
        device = str(cfg.get("device") or "cpu")  # every run, reference and optimiser (x_T is drawn on the CPU either way)
        self.extra = ([] if device == "cpu" else [f"device={device}"]) + list(extra or [])
        self.n = int(cfg.heldout.num_samples[model]) if n is None else int(n)
        self.dtype = str(cfg.dtype[model])
        self.base = base_overrides(model, self.dtype, list(cfg.heldout.prompts), int(cfg.heldout.seed), self.n,
                                   cfg.heldout.get("batch_size")) + self.extra
        self.object = None
        node = compose([f"model={model}"])[0].model
        if model in ("mixture", "gaussian"):
            self.object = WithoutExactSolution(instantiate(node, f"model={model}"))
        from experiments.harness import load_model

        adapter = load_model([f"model={model}", "device=cpu"]) if self.object is None else None
        self.sigma_max = float((adapter or self.object).sigma_max)
        self.sigma_min = float((adapter or self.object).sigma_min)
        if adapter is not None and own_grid_from_infinity(model, adapter):  # a flow model: the reference from t = 1
            self.sigma_max = math.inf
        self.nfe_law: dict[str, tuple[float, float]] = {}
        self.teachers: dict = {} if teachers is None else teachers  # shared by the optimisers of one calibration set
        self.refs: dict[tuple[float, float], Any] = {}  # (σ_0, x_T scale) → the reference run from that start
        self.ref_seconds = 0.0

    @property
    def main_reference(self):
        """The reference from the model's own start (computed when first needed: optimisers run without it)."""
        return self.reference(self.sigma_max, self.sigma_max if math.isfinite(self.sigma_max) else 1.0)

    @property
    def ref_nfe(self) -> float:
        return self.main_reference.record["metrics"]["nfe"]

    def reference(self, sigma0: float, scale: float):
        """DOP853 from (σ_0, x_T = scale·ε) to σ_min, then D (one per start; cached)."""
        key = (float(sigma0), float(scale))
        if key not in self.refs:
            r = self.cfg.reference[self.model]
            t0 = time.perf_counter()
            name = "reference" if sigma0 == self.sigma_max else f"reference_{sigma0:.6g}"
            if r.get("solver", "dop853") == "dop853":
                extra = reference_overrides(sigma0, self.sigma_min, float(r.rtol), float(r.atol), scale)
            elif math.isinf(sigma0):  # from t = 1: a many-step solver on the model's own grid (``overrides`` name it)
                extra = [*r.overrides, f"steps={int(r.steps)}"]
            else:  # a many-step solver on an exponential grid from σ_0 (checked against DOP853: docs/optimisation.md)
                vp = not math.isclose(scale, sigma0, rel_tol=1e-6)
                if vp and not math.isclose(scale, math.sqrt(1 + sigma0 ** 2), rel_tol=1e-5):
                    raise ConfigError(f"a grid starting at σ {sigma0:g} with x_T scale {scale:g}: no reference for that start")
                extra = [*r.overrides, "schedule=exponential", f"schedule.sigma_max={sigma0!r}",
                         f"schedule.init_noise={'vp' if vp else 'sigma'}", f"steps={int(r.steps)}"]
            self.refs[key] = self.run(extra, name)
            self.ref_seconds = round(self.ref_seconds + time.perf_counter() - t0, 1)
        return self.refs[key]

    def solver_args(self, solver: str) -> list[str]:
        """A solver spec: a plugin name, or a name of ``solver_specs`` (the plugin with its free
        parameters set, e.g. UniPC's B(h) variant or DEIS's order)."""
        spec = (self.cfg.get("solver_specs") or {}).get(solver)
        return list(spec) if spec is not None else [f"solver={solver}"]

    def run(self, extra: list[str], name: str):
        return run(self.base + extra, model=self.object, output_dir=self.folder / name)

    def error(self, extra: list[str], name: str) -> dict[str, Any]:
        res = self.run(extra, name)
        target, x_T = self.main_reference.latents.cpu(), self.main_reference.x_T.cpu()
        latents, res_x_T = res.latents.cpu(), res.x_T.cpu()  # a run read back from its folder is on the CPU, a fresh one on the device
        sig0 = float(res.schedule.sigmas[0])
        own = not math.isinf(self.sigma_max) and not math.isclose(sig0, self.sigma_max, rel_tol=1e-6)
        if own:  # a grid that starts lower (leading spacing)
            ref = self.reference(sig0, float(res.schedule.init_noise_scale))
            target, x_T = ref.latents.cpu(), ref.x_T.cpu()
        elif math.isinf(self.sigma_max) and math.isfinite(sig0):  # a model from t = 1, a grid whose first evaluation is finite (learned's first_sigma):
            res_x_T = res_x_T / float(res.schedule.init_noise_scale)  # x_T = σ·ε, judged against the solution from ε at t = 1
        # the same noise times σ_max; a schedule computing σ_max as exp(log σ_max) may differ in the last bit
        if res_x_T.shape != x_T.shape or not torch.allclose(res_x_T, x_T, rtol=1e-6, atol=0):
            return {"skipped": "does not start from the reference's x_T"}
        per = (latents.double() - target.double()).pow(2).flatten(1).mean(1).sqrt()
        out = {"nfe": res.record["metrics"]["nfe"], "error": rmse(latents, target), "sigmas": list(res.schedule.sigmas),
               "sample_errors": [round(float(e), 6) for e in per]}
        if own:
            out["own_reference"] = sig0
        return out

    def steps_within(self, solver: str, budget: int) -> int | None:
        """The most steps whose NFE fits ``budget`` (NFE = a·steps + b, from two one-sample probes)."""
        if solver not in self.nfe_law:
            n = [run(self.base + self.solver_args(solver) + [f"steps={s}", "num_samples=1", "batch_size=1"], model=self.object,
                     output_dir=self.folder / f"probe_{solver}_{s}").record["metrics"]["nfe"] for s in (4, 8)]
            a = (n[1] - n[0]) / 4
            self.nfe_law[solver] = (a, n[0] - 4 * a)
        a, b = self.nfe_law[solver]
        s = math.floor((budget - b) / a + 1e-9)
        return s if s >= 2 else None

    def stock(self, budgets: list[int], solvers=None, schedules=None) -> dict:
        out: dict = {}
        own = (self.cfg.get("stock_schedules_of") or {}).get(self.model) or self.cfg.stock_schedules
        cells = [(sv, sc) for sv in (solvers or self.cfg.stock_solvers) for sc in (schedules or own)]
        for solver, schedule in tqdm(cells, desc=f"{self.model} stock"):
            extra = list(self.cfg.schedule_overrides.get(schedule, [f"schedule={schedule}"]))
            row: dict = {}
            for n in budgets:
                steps = self.steps_within(solver, n)
                if steps is None:
                    row[str(n)] = {"skipped": "no run of ≥ 2 steps fits"}
                    continue
                try:
                    row[str(n)] = self.error([*self.solver_args(solver), *extra, f"steps={steps}"], f"{solver}_{schedule}_{steps}")
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
        """The schedule file of (method, solver) from the calibration set with ``seed``; ``method``
        may name an entry of ``method_specs`` (a method with options, e.g. GITS with history)."""
        from framework.tools.schedule_opt import Calibration, Options, optimize

        c = self.cfg.calibration
        spec = dict((self.cfg.get("method_specs") or {}).get(method) or {"method": method})
        label, method = method, spec.pop("method")
        init_from = spec.pop("init_from", None)  # ld3: the file of this method spec (default: ld3_init)
        samples = int(spec.pop("samples", c.num_samples[self.model]))  # a spec's own calibration size
        budgets = self.reachable(solver, budgets)
        if not budgets:
            raise ConfigError(f"solver={solver} meets none of the budgets exactly")
        init = f"from_{init_from}" if init_from else str(self.cfg.ld3_init[self.model])
        if init.startswith("from_"):  # the file another method made for this solver, or for `method/solver` (seed tag kept)
            other, _, of = init[5:].partition("/")
            init = str(self.folder / "schedules" / f"{of or solver}_{other}{tag}.json")
        kwargs = dict(fine=int(self.cfg.fine[self.model]), fine_top=(self.cfg.get("fine_top") or {}).get(self.model), teacher=str(self.cfg.teacher[self.model].solver),
                      teacher_substeps=int(self.cfg.teacher[self.model].substeps),
                      teacher_rtol=float(self.cfg.teacher[self.model].rtol), iterations=int(self.cfg.iterations),
                      seconds=float(self.cfg.ld3_seconds[self.model]), init=init, trials=int(self.cfg.tpe_trials))
        kwargs.update(spec)  # a method spec may set any of these (e.g. its own init or time cap)
        opts = Options(method=method, nfe=list(budgets), out=str(self.folder / "schedules" / f"{solver}_{label}{tag}.json"),
                       progress=False, calibration=Calibration(list(c.prompts), int(seed), samples),
                       **kwargs)
        overrides = [f"model={self.model}", f"dtype={self.dtype}", *self.solver_args(solver), "device=cpu", *self.extra]
        if self.model in ("mixture", "gaussian"):
            overrides.append("guidance=[]")
        content, path = optimize(opts, overrides, log=lambda s: None, teachers=self.teachers)
        return {"file": str(path), "content": content}

    def evaluate_file(self, solver: str, made: dict) -> dict:
        out = {}
        for n, g in made["content"]["grids"].items():
            cell = self.error([*self.solver_args(solver), "schedule=optimized", f"schedule.file={made['file']}",
                               f"steps={g['steps']}"], f"opt_{Path(made['file']).stem}_{n}")
            out[n] = {**cell, "optimiser_seconds": g["seconds"], "optimiser_nfe": g["optimiser_nfe"],
                      "calibration_rmse_to_teacher": g["calibration_rmse_to_teacher"]}
        return out


def own_grid_from_infinity(model: str, adapter) -> bool:
    """Whether the model's default schedule starts at σ = ∞ (a flow model's t = 1)."""
    from framework.tools.schedule_opt import stock_grid

    return math.isinf(stock_grid(compose([f"model={model}"])[1]["schedule"], adapter, 4)[0])


def log_rms(a: list[float], b: list[float]) -> float | None:
    """RMS difference of log σ over the finite nonzero points (None when the grids differ in length)."""
    a, b = [s for s in a if 0 < s < math.inf], [s for s in b if 0 < s < math.inf]
    if len(a) != len(b):
        return None
    return float(np.sqrt(np.mean((np.log(a) - np.log(b)) ** 2)))


def stock_cells(stock: dict, n: str) -> dict[str, dict]:
    """The cells of budget ``n`` that ran in a ``Study.stock`` table, by "solver + schedule"."""
    return {f"{sv} + {sc}": c for sv, by in stock.items() for sc, row in by.items()
            if isinstance(row, dict) and isinstance(c := row.get(n), dict) and "error" in c}


def best_stock(stock: dict, n: str) -> tuple[float, str, dict] | None:
    """The stock sampler with the least held-out RMSE at budget ``n``: (error, "solver + schedule", its cell), None
    where none ran."""
    cells = stock_cells(stock, n)
    name = min(cells, key=lambda k: cells[k]["error"], default=None)
    return None if name is None else (cells[name]["error"], name, cells[name])


def best_cells(results: dict, budgets: list[int], select: str = "calibration") -> dict:
    """Per budget: the best stock (solver, schedule) by held-out RMSE; the optimised (method,
    solver) chosen on the calibration set (``select=calibration``: least calibration RMSE to the
    teacher, where recorded) and the held-out best of them (``oracle``), and their ratios."""
    out = {}
    for n in map(str, budgets):
        s = best_stock(results["stock"], n)
        cells = [(c, f"{sv} + {m}") for m, by in results["optimised"].items() for sv, row in by.items()
                 if isinstance(c := row.get(n), dict) and "error" in c]
        if s and cells:
            oracle = min(cells, key=lambda t: t[0]["error"])
            chosen = oracle
            if select == "calibration" and all("calibration_rmse_to_teacher" in c for c, _ in cells):
                chosen = min(cells, key=lambda t: t[0]["calibration_rmse_to_teacher"])
            out[n] = {"stock": {"sampler": s[1], "error": s[0], "nfe": s[2]["nfe"]},
                      "optimised": {"sampler": chosen[1], "error": chosen[0]["error"], "nfe": chosen[0]["nfe"]},
                      "ratio": chosen[0]["error"] / s[0], "selected_on": select,
                      "oracle": {"sampler": oracle[1], "error": oracle[0]["error"], "ratio": oracle[0]["error"] / s[0]}}
            a, b = s[2].get("sample_errors"), chosen[0].get("sample_errors")
            if a and b and len(a) == len(b):  # the same x_T per sample: a few samples that flip mode can carry the RMSE
                out[n]["per_sample"] = {"median_ratio": float(np.median(b) / np.median(a)),
                                        "better": int(sum(y < x for x, y in zip(a, b))), "n": len(a),
                                        "ratio_interval": ratio_interval(a, b)}
    return out


def sampler_args(s: Study, res: dict, side: str, n: str) -> list[str]:
    """The overrides that run the best ``side`` (stock / optimised) sampler of budget ``n``."""
    b = res["best"][n][side]
    solver, what = b["sampler"].split(" + ")
    if side == "stock":
        sig = res["stock"][solver][what][n]["sigmas"]
        return [*s.solver_args(solver), *s.cfg.schedule_overrides.get(what, [f"schedule={what}"]), f"steps={len(sig) - 1}"]
    sig = res["optimised"][what][solver][n]["sigmas"]
    return [*s.solver_args(solver), "schedule=optimized", f"schedule.file={s.folder / 'schedules' / f'{solver}_{what}.json'}",
            f"steps={len(sig) - 1}"]


def quality(s: Study, res: dict, cfg: DictConfig) -> dict:
    """FD (bundled CLIP features, vs fresh world scenes) and prompt accuracy (the bundled judge) of
    the best stock and the best optimised sampler per budget, ``quality.num_samples`` samples of
    the held-out prompts for each of two seeds (the seeds' difference is the noise floor)."""
    q = cfg.quality
    out: dict = {}
    for n in [n for n in res["best"] if not q.get("nfe") or int(n) in q.nfe]:
        row: dict = {}
        for side in ("stock", "optimised"):
            for seed in q.seeds:
                base = base_overrides(s.model, s.dtype, list(cfg.heldout.prompts), int(seed), int(q.num_samples))
                r = run(base + s.extra + sampler_args(s, res, side, n) + [f"batch_size={int(q.batch_size)}",
                                                                           "metrics=[" + ",".join(q.metrics) + "]"],
                        output_dir=s.folder / f"quality_{n}_{side}_{seed}")
                m = r.record["metrics"]
                row.setdefault(side, {})[str(seed)] = {k: m[k] for k in m if k.startswith(("fid", "prompt_accuracy")) or k == "nfe"}
        out[n] = row
    return out


def ld3_init_of(cfg: DictConfig, model: str, method: str) -> str | None:
    """The method (spec) whose file an ld3 method spec starts from, None for other methods."""
    spec = (cfg.get("method_specs") or {}).get(method) or {"method": method}
    if spec["method"] != "ld3":
        return None
    init = spec.get("init_from") or str(cfg.ld3_init[model])
    return init[5:] if init.startswith("from_") else (init if spec.get("init_from") else None)


def cfg_transfer(cfg: DictConfig, s: Study, res: dict, folder: Path, budgets: list[int]) -> dict:
    """The best optimised grids (made at the default CFG) run at other CFG scales, against the
    stock samplers at that scale (each scale its own reference from the same x_T); with
    ``cfg_transfer_own``, the same (method, solver) optimised at that scale too."""
    out: dict = {}
    for scale in (cfg.cfg_transfer or {}).get(s.model, []) or []:
        t0 = time.perf_counter()
        t = Study(cfg, s.model, folder, extra=[f"cfg_scale={scale}"], tag=f"_cfg{scale}", n=cfg.get("cfg_transfer_samples"))
        st = cfg.get("cfg_transfer_stock") or {}
        stock = t.stock(budgets, st.get("solvers"), st.get("schedules"))
        cells: dict = {}
        for n, b in res["best"].items():
            solver, method = b["optimised"]["sampler"].split(" + ")
            args = sampler_args(s, res, "optimised", n)
            cell = {"grid": f"{method} for {solver}", **t.error(args, f"transfer_{solver}_{method}_{n}")}
            if cfg.cfg_transfer_own:
                init = ld3_init_of(cfg, s.model, method)
                if init:
                    t.optimise(init, solver, [int(n)], int(cfg.calibration.seed), "")
                made = t.optimise(method, solver, [int(n)], int(cfg.calibration.seed), "")
                own = t.evaluate_file(solver, made).get(n, {})
                cell["own_error"] = own.get("error")
            cells[n] = cell
        stock_best = {}
        for n in map(str, budgets):
            if b := best_stock(stock, n):
                stock_best[n] = {"sampler": b[1], "error": b[0]}
        out[str(scale)] = {"grids": cells, "stock_best": stock_best, "stock": stock, "heldout_samples": t.n,
                           "reference_nfe": t.ref_nfe, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def study(cfg: DictConfig, folder: Path) -> dict:
    budgets = [int(n) for n in cfg.nfe]
    out: dict = {}
    for model in cfg.models:
        t0 = time.perf_counter()
        s = Study(cfg, model, folder)
        r = cfg.reference[model]
        res: dict[str, Any] = {"reference_nfe": s.ref_nfe,
                               "reference_solver": "DOP853" if r.get("solver", "dop853") == "dop853" else
                               f"{' '.join(r.overrides)}, {r.steps} {'steps' if math.isinf(s.sigma_max) else 'exponential steps'}", "sigma_max": s.sigma_max, "sigma_min": s.sigma_min,
                               "heldout_samples": s.n, "calibration_samples": int(cfg.calibration.num_samples[model]),
                               "calibration_prompts": len(cfg.calibration.prompts)}
        t1 = time.perf_counter()
        res["stock"] = s.stock(budgets)
        res["stock_seconds"] = round(time.perf_counter() - t1, 1)
        res["reference_seconds"] = s.ref_seconds  # incl. the references of grids that start lower (leading)
        res["own_references"] = {f"{k[0]:.6g}": r.record["metrics"]["nfe"] for k, r in s.refs.items()}
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
            tag, init = f"_seed{cfg.second_seed}", ld3_init_of(cfg, model, method)
            if init:  # ld3's starting grid, from the same seed
                s.optimise(init, solver, budgets, int(cfg.second_seed), tag)
            made = s.optimise(method, solver, budgets, int(cfg.second_seed), tag)
            b, held = made["content"]["grids"], s.evaluate_file(solver, made)
            first = res["optimised"][method][solver]
            res["agreement"][pair] = {n: {"log_sigma_rms": log_rms(a[n], b[n]["sigmas"]), "second_seed_sigmas": b[n]["sigmas"],
                                          "heldout_rmse": [first[n].get("error"), held[n].get("error")]}
                                      for n in a if n in b}
            res["agreement"][pair]["seconds"] = round(time.perf_counter() - t1, 1)
        res["best"] = best_cells(res, budgets, str(cfg.select))
        res["transfer"] = transfer(s, res, list(cfg.transfer_solvers))
        if model in (cfg.quality.models or []):
            t1 = time.perf_counter()
            res["quality"] = quality(s, res, cfg)
            res["quality_seconds"] = round(time.perf_counter() - t1, 1)
        res["cfg_transfer"] = cfg_transfer(cfg, s, res, folder, budgets)
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
        steps = len(res["optimised"][method][made_for][n]["sigmas"]) - 1
        row = {}
        for solver in solvers:
            if solver == made_for:
                continue
            cell = s.error([*s.solver_args(solver), "schedule=optimized", f"schedule.file={path}", f"steps={steps}"],
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
        calib = (f", calibration {res['calibration_samples']} samples" if "calibration_samples" in res else "")
        own = res.get("own_references") or {}
        lines += [f"### `model={model}` ({cfg.dtype[model]}, {res['heldout_samples']} held-out samples{calib}"
                  f"{', CFG at its default (5)' if model not in ('mixture', 'gaussian') else ''})", "",
                  *([f"(Kept from `{res['kept_from']}`, an earlier run with the settings recorded there; the optimised "
                     "side re-chosen on the calibration set.)", ""] if res.get("kept_from") else []),
                  f"Reference: {res.get('reference_solver', 'DOP853')} σ {res['sigma_max']:g} → {res['sigma_min']:g}, then D; "
                  f"{res['reference_nfe']:g} NFE"
                  + (f"; grids starting elsewhere (leading spacing; a finite σ_max when the model starts at ∞) each get "
                     f"their own from their σ_0 ({len(own) - 1} more: "
                     + ", ".join(f"σ_0 {k}" for k in own if not math.isclose(float(k), res['sigma_max'], rel_tol=1e-5)) + ")"
                     if len(own) > 1 else "") + ".", "",
                  "**Best of each side** — RMSE to the reference on the held-out set (ratio = optimised / stock; "
                  "the target is ≤ 0.70). The optimised sampler is the one chosen on the calibration set (least "
                  "calibration RMSE to the teacher); *oracle*: the held-out best of all optimised grids (a choice "
                  "made on the test set, for comparison only)", "",
                  "| NFE | best stock | RMSE | optimised (chosen on calibration) | RMSE | ratio | oracle | RMSE | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n in budgets:
            b = res["best"].get(n)
            if b:
                o = b.get("oracle", {"sampler": b["optimised"]["sampler"], "error": b["optimised"]["error"], "ratio": b["ratio"]})
                lines.append(f"| {n} | {b['stock']['sampler']} ({b['stock']['nfe']:g}) | {fmt(b['stock']['error'])} | "
                             f"{b['optimised']['sampler']} | {fmt(b['optimised']['error'])} | **{b['ratio']:.2f}** | "
                             f"{o['sampler']} | {fmt(o['error'])} | {o['ratio']:.2f} |")
        split = [(n, res["best"][n]["per_sample"]) for n in budgets if (res["best"].get(n) or {}).get("per_sample")]
        if split:
            lines += ["", "**Per sample** (the same two samplers; each sample's RMSE to its reference): the ratio's 90 % "
                      "interval (a paired bootstrap over the held-out samples), the ratio of the median per-sample errors, "
                      "and on how many samples the optimised one is better — where a few samples that land in another mode "
                      "carry the RMSE, these differ from its ratio", "",
                      "| NFE | ratio, 90 % interval | ratio of the medians | optimised better on |", "| --- | --- | --- | --- |"]
            lines += [f"| {n} | {'–'.join(f'{v:.2f}' for v in p['ratio_interval']) if 'ratio_interval' in p else '—'} | "
                      f"{p['median_ratio']:.2f} | {p['better']} / {p['n']} |" for n, p in split]
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
        if res.get("quality"):
            q = cfg.quality
            lines += ["", f"**Image quality** ({q.num_samples} samples of the held-out prompts per seed, seeds "
                      f"{' and '.join(map(str, q.seeds))}): FD of the bundled CLIP image features to {q.num_samples} "
                      "fresh world scenes, prompt accuracy (colour / shape) by the bundled judge; *floor*: the "
                      "difference between the two seeds of the same sampler", "",
                      "| NFE | sampler | FD (seed a / b) | floor | colour % | shape % |", "| --- | --- | --- | --- | --- | --- |"]
            for n, row in res["quality"].items():
                for side in ("stock", "optimised"):
                    runs_ = list(row[side].values())
                    fd = [r.get("fid") for r in runs_]
                    col = [100 * r.get("prompt_accuracy_colour", float("nan")) for r in runs_]
                    shp = [100 * r.get("prompt_accuracy_shape", float("nan")) for r in runs_]
                    lines.append(f"| {n} | {side}: {res['best'][n][side]['sampler']} | {' / '.join(fmt(v) for v in fd)} | "
                                 f"{fmt(abs(fd[0] - fd[1]))} | {' / '.join(f'{v:.1f}' for v in col)} | "
                                 f"{' / '.join(f'{v:.1f}' for v in shp)} |")
        if res.get("cfg_transfer"):
            lines += ["", "**Transfer across CFG scales**: the best optimised grid of each budget (made at CFG 5) run at "
                      "another scale, against the best stock sampler there (each scale its own reference); *own*: the "
                      "same method and solver optimised at that scale", "",
                      "| CFG | NFE | best stock there | RMSE | grid made at 5 | RMSE | ratio | own RMSE | own ratio |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for scale, t in res["cfg_transfer"].items():
                lines.append(f"| {scale} | ({t.get('heldout_samples', '?')} held-out samples, {t.get('reference_nfe', 0):g}-NFE "
                             f"reference, {t.get('seconds', 0):.0f} s) | | | | | | | |")
                for n, c in t["grids"].items():
                    sb = t["stock_best"].get(n)
                    if sb is None or "error" not in c:
                        continue
                    own_e = c.get("own_error")
                    own_cells = f"{fmt(own_e)} | {own_e / sb['error']:.2f}" if own_e else "— | —"
                    lines.append(f"| {scale} | {n} | {sb['sampler']} | {fmt(sb['error'])} | {c['grid']} | {fmt(c['error'])} | "
                                 f"**{c['error'] / sb['error']:.2f}** | {own_cells} |")
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
        steps = len(opt) - 1
        series = [(f"{m} ({sv})", opt, dict(color="C3", marker="o", linewidth=2)),
                  (f"stock best: {ssc} ({ssv})", st, dict(color="k", marker="s", markersize=3)),
                  ("karras", stock_grid("karras", adapter, steps), dict(color="C0", marker=".", linestyle=":"))]
        try:
            series.append(("ays", stock_grid("ays", adapter, steps), dict(color="C2", marker=".", linestyle="--")))
        except ConfigError:  # no AYS table for this model kind
            pass
        if math.isinf(opt[0]):  # a model whose grids start at ∞: σ-space karras/AYS from its finite σ_max are not its stock
            series = series[:2]
        for label, sig, style in series:  # a grid from σ = ∞: its finite points at their step index
            first = int(math.isinf(sig[0]))
            s = [v for v in sig[first:] if v > 0]
            ax.semilogy(range(first, first + len(s)), s, label=label, **style)
        ax.set_title(f"NFE {n}: ratio {b['ratio']:.2f}", fontsize=9)
        ax.set_xlabel("step index i", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("σ_i (final 0 and a first ∞ not drawn)", fontsize=8)
    others = "" if math.isinf(res["sigma_max"]) else ", karras and AYS"  # from ∞: the stock grids are the model's own
    fig.suptitle(f"{model}: best optimised grid vs the best stock sampler's{others}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / f"optimisation_{model}.png", files, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    ex = Experiment.compose(HERE, argv)
    cfg = ex.cfg
    if cfg.from_results:  # the tables and plots again from an earlier record, without sampling
        import json

        results = json.loads(Path(cfg.from_results).read_text())["results"]
        for res in results.values():  # the choice again (the same), with what best_cells reports now
            chosen_on = next(iter((res.get("best") or {}).values()), {}).get("selected_on", cfg.select)
            res["best"] = best_cells(res, [int(n) for n in cfg.nfe], str(chosen_on))
    else:
        results = study(cfg, Path(cfg.runs))
        keep = cfg.get("keep_results")
        if keep and Path(keep).is_file():  # models not run now: their earlier results, best cells chosen alike
            import json

            for model, res in json.loads(Path(keep).read_text())["results"].items():
                if model not in results:
                    res["best"] = best_cells(res, [int(n) for n in cfg.nfe], str(cfg.select))
                    res["kept_from"] = str(keep)
                    results[model] = res
    files = write(results, cfg, Path(cfg.out))
    return ex.record(Path(cfg.runs) / "record.json", results, files)


if __name__ == "__main__":
    entry(main)
