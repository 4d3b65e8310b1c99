"""``samplerlab-optimize-schedule``: σ grids optimised for one model, solver and NFE budget from a
small calibration set (prompts × seed), written to a schedule file that ``schedule=optimized`` reads.

    samplerlab-optimize-schedule method=gits solver=dpmpp_2m nfe=[5,6,8,10] model=bundled
    samplerlab-optimize-schedule method=oss solver=unipc model=mixture dtype=float64 out=mix_oss.json

Every method runs the *actual* solver plugin (its ``step`` hook, history and stash, with the run's
guidance) on trial grids through :class:`Sampler`, one step at a time, so a grid is optimised for
the sampler that will use it. The target is a teacher trajectory on a fine grid of ``fine``
σ values, log-uniform from σ_max to σ_min, then 0 (the teacher solver on each fine interval split
into ``teacher_substeps`` log-uniform steps; ``teacher=reference`` is scipy's DOP853); its end is
D at σ_min, the final step every fixed-step solver takes.

Methods (``method=``):

- ``gits`` — Chen et al. 2024 ("On the trajectory regularity of ODE-based diffusion sampling",
  GITS): the cost of a step from fine point i to j is the local truncation error of one solver step
  started on the teacher trajectory at i, ‖step(x*_i, σ_i → σ_j) − x*_j‖ (RMS); the grid is the
  K-step path from σ_max to 0 of least summed cost, found exactly by dynamic programming over the
  fine points. The step is history-free, so a multistep solver's cost is that of its first
  (warm-up) step, as GITS's DDIM-based cost.
- ``oss`` — Optimal Stepsize Distillation (Pei et al. 2025): dynamic programming over (steps
  taken k, fine point j) that carries the *student's* own state (x, history, stash) along the best
  path: dp[k][j] = min_i ‖step(z[k−1][i] → σ_j) − x*_j‖, z[k][j] the state it reaches; the
  objective is the final error ‖z[K][0] − x*_0‖ on the calibration set.
- ``ays`` — Align Your Steps (Sabour et al. 2024): minimise the summed KLUB of the Euler/DDIM
  steps, KLUB(σ_a → σ_b) = ∫_{σ_b}^{σ_a} σ^{−3} E‖D(x_σ, σ) − D(x_{σ_a}, σ_a)‖² dσ, x_σ = x0 + σ·ε
  with x0 the teacher's samples (the model's own "data") and ε the calibration noise, by iterative
  refinement: coordinate descent, each interior σ_i moved to the fine point that minimises the
  KLUB of its two intervals, sweeps until no point moves (≤ ``iterations``). Endpoints σ_max and
  σ_min stay fixed; the objective does not depend on the solver (AYS's transfer assumption).
- ``ld3`` — a learned grid after LD3 (Tong et al. 2024): the final-sample latent error
  ‖Φ_grid(x_T) − x*_0‖ is differentiated w.r.t. the log-σ grid through the solver and the model
  and minimised by Adam, starting from the GITS grid. The solver plugins take σ as Python floats,
  so autograd cannot see the grid: the derivative is a central difference (±``fd_step`` in log σ)
  through the real sampler, reusing the unchanged prefix of the trajectory. Stops after
  ``iterations`` steps or ``seconds`` per budget; the best grid seen is kept.
- ``learned`` — the solver's *coefficients* on a fixed grid (S4S, Frankel et al. 2025; bespoke
  solvers, Shaul et al. 2024): with ``solver=learned`` every state is a linear combination of x_T and
  the denoiser outputs so far, x_{j+1} = e_j·x_T + Σ_{k≤j} b_jk·D_k, on the
  grid of ``init`` (GITS, OSS, a stock grid, or a schedule file such as an LD3 grid); the
  coefficients (Euler's; with ``coef_init=<solver>`` that deterministic multistep solver's on the grid,
  recovered by least squares; with ``coef_init=init`` those of the ``init`` file; with ``coef_init=greedy`` fitted
  step by step by least squares to the teacher's states at the grid points, closed form) are fitted by Adam (step
  ``coef_lr``) on the final error to the teacher (``objective``: of the latents, or of the decoded images or
  their edges), by autograd through the model, ``iterations`` steps or ``seconds`` per budget, the best kept. With
  ``consistent=true`` every step stays exact on a constant denoiser (Σ_k b_jk = 1 − e_j, and e = 0 at the last step): a
  free fit shrinks the sample toward 0 (its last row sums to ≈ 0.9), which the RMSE rewards. With ``guidance_terms=true``
  each step also weighs every guidance difference so far, + Σ_k g_jk·(D_cond,k − D_uncond,k), with free g_jk (a guidance
  weight per step and past output; zero on a constant denoiser, so consistency holds). With ``validation=<share>``
  that share of the calibration prompts is held back from the gradient: the coefficients best on them are kept, and
  the fit stops ``patience`` steps after the last gain there (the fit otherwise overfits the calibration set). With
  ``learn_grid=true`` Adam moves the grid's interior points with the coefficients (central differences in log σ, as
  ``ld3``: a point only says where its D is evaluated). With
  ``coef_init=greedy grid_search=<sweeps>`` the grid itself is chosen first, for the greedy coefficients: its points
  move over the fine teacher's points (coordinate descent, the teacher's states as targets: one pass of K evaluations
  per grid tried), ``last_sigma`` capping the last nonzero σ. On a grid from ∞ (a flow model's t = 1)
  ``first_sigma=<σ>`` evaluates the first D at that finite σ on σ·x_T instead of at ∞ on x_T (there the
  network sees pure noise and returns about its prompt's mean, whatever x_T; at a finite σ its first output already
  depends on x_T), while the teacher, the target and the coefficients' x_T stay those from ∞; with ``learn_grid`` that
  point moves too. Its file's grid then starts at that σ with x_T = σ·ε (``init_noise``), which the engine runs as
  it is. The file holds
  the grid and its coefficients; ``solver=learned schedule=optimized schedule.file=…`` runs them.
- ``tpe`` — the Optuna baseline (as ``conf/hydra/sweeper/tune_points.yaml``, which tunes the
  interior points of a 3-step grid by TPE against one metric): Optuna's TPE sampler (seed 0) over
  the K − 1 interior log σ values in [log σ_min, log σ_max] (sorted, so the grid descends),
  ``trials`` trials, objective the final RMSE to the teacher on the calibration set.

Options of the objective and the grid's ends (docs/optimisation.md): ``final=sigma_min`` pins the
last step to 0 at σ_min (the stock grids' near-free final D) and optimises the rest;
``objective=image`` / ``image_grad`` (ld3, tpe) measure the final error on the decoded images or on
their finite differences (edges) instead of the latents; ``start=leading:<K>`` starts every grid
where the model's own ``leading`` grid of K steps starts (x_T = √(1+σ_0²)·ε).

A model whose grids start at σ = ∞ (a flow model's t = 1: ``schedule=flow_match``, the bundled flow
model) gets grids that start there too, x_T = ε: the fine grid is ∞ followed by ``fine`` − 1 points
log-uniform from ``fine_top`` (default: the model's finite σ_max) to σ_min, every method's first step leaves ∞ by the
solver's own limit step (the engine's), and the learned interior points stay below σ_max. AYS's
KLUB has no term from ∞ and refuses such a model.

NFE: the optimiser works in NFE budgets. NFE(steps) of the solver is measured on two probe grids
(the engine's count, affine in steps for every fixed-step solver); a budget no step count meets
exactly (Heun: 2·steps − 1 on a grid ending at 0, so no even NFE) is refused with one line.

Per budget: ``per_nfe.<nfe>.<option>=…`` gives one budget its own options (a set of recipes in one call);
budgets whose teacher options agree share one teacher.

Resumable: the schedule file is rewritten after every finished budget; a rerun with the same
model weights, solver, method, calibration set and settings skips the budgets already in it.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framework.core.errors import ConfigError, SamplerlabError, call
from framework.core.state import Prediction, Schedule, Stash, StepRecord
from framework.core.step import Denoiser, SamplerState
from framework.maths.multistep import euler_as_linear, linear_update

METHODS = ("gits", "oss", "ays", "ld3", "learned", "tpe")
STOCK_INITS = ("leading", "karras", "exponential", "flow_match")  # ``init``: a stock grid of the budget's step count (else gits, oss or a file)
FINALS = ("free", "sigma_min")  # ``final``: where the last step to 0 starts (sigma_min: pinned there, a near-free step)
OBJECTIVES = ("latent", "image", "image_grad")  # ld3 / tpe / learned: the final error in latents, decoded images, or their gradients
OBJECTIVE_NAMES = {"latent": "final RMSE to the teacher", "image": "RMSE of the decoded final images to the teacher's",
                   "image_grad": "RMSE of the decoded final images' finite differences to the teacher's"}
PER_NFE_SHARED = ("method", "nfe", "out", "per_nfe", "resume", "plot", "progress", "calibration")  # one per file or call
CALIBRATION_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow diamond", "a purple circle",
                       "an orange square", "a white triangle", "a black diamond")


# --- options ----------------------------------------------------------------------------------------

@dataclass
class Calibration:
    prompts: list[str] = field(default_factory=lambda: list(CALIBRATION_PROMPTS))
    seed: int = 1000
    num_samples: int = 8


@dataclass
class Options:
    """The tool's own keys; every other override goes to the samplerlab config (model, solver, …)."""

    method: str = "gits"
    nfe: list[int] = field(default_factory=lambda: [5, 6, 8, 10])
    out: str | None = None  # default: schedules/<model>_<solver>_<method>.json
    fine: int = 32  # fine σ points (σ_max … σ_min) the DP / KLUB methods choose from
    fine_top: float | None = None  # grids from ∞: the fine grid's largest finite σ (default σ_max; e.g. 100, t = 0.99)
    teacher: str = "unipc"  # the teacher's solver plugin (reference: DOP853)
    teacher_substeps: int = 4
    teacher_rtol: float = 1e-6  # teacher=reference only
    iterations: int = 20  # ays sweeps / ld3 Adam steps
    seconds: float = 300.0  # ld3: time cap per budget
    lr: float = 0.05  # ld3: Adam's step in log σ
    coef_lr: float = 0.003  # learned: Adam's step on the coefficients
    coef_init: str = "euler"  # learned: the first coefficients: Euler's, this solver's on the grid (least squares), `greedy` (step by step to the teacher's states), or `init`: the init file's
    consistent: bool = False  # learned: every step exact on a denoiser that returns a constant (no shrinkage toward 0)
    guidance_terms: bool = False  # learned: also a free weight on every guidance difference Δ_k = D_cond − D_uncond so far
    sample_power: float = 2.0  # learned: the fits and the grid search minimise Σ_i ‖error_i‖^p over the calibration samples: 2 the pooled RMSE, 1 every sample alike (a far one — a mode flip — weighs less)
    validation: float = 0.0  # learned: the share of calibration prompts held back; the coefficients best on them are kept
    learn_grid: bool = False  # learned: Adam moves the grid's interior points too (log σ, step lr, central differences of fd_step), as ld3
    first_sigma: float | None = None  # learned, grids from ∞: the first D evaluated at this finite σ on σ·x_T (teacher and target from ∞)
    grid_search: int = 0  # learned, coef_init=greedy: sweeps moving the init grid's points over the fine points to its greedy coefficients' least error
    last_sigma: float | None = None  # grid_search: the largest last nonzero σ it may choose (where the final jump starts)
    patience: int = 20  # learned with validation: stop after this many Adam steps without a gain on the held-back prompts
    fd_step: float = 0.02  # ld3: central-difference step in log σ
    init: str = "gits"  # ld3's first grid: gits, oss, or a schedule file (its grid for the budget)
    trials: int = 60  # tpe: Optuna trials per budget
    start: str | None = None  # σ_0 of every grid: the model's σ_max (default), a number, `leading` or `leading:<steps>` (below)
    history: bool = False  # gits: the step's cost with the solver's history of the previous step (DP over pairs)
    objective: str = "latent"  # ld3/tpe: RMSE of the final latents, of the decoded images, or of the images' finite differences (edges)
    final: str = "free"  # the grid's last nonzero σ: free (any fine point), or sigma_min (the final step D at σ_min, as stock grids)
    per_nfe: dict[str, Any] = field(default_factory=dict)  # a budget's own options, e.g. per_nfe.10.grid_search=0: one call, one teacher
    resume: bool = True
    plot: bool = True
    progress: bool = True
    calibration: Calibration = field(default_factory=Calibration)

    def for_budget(self, nfe: int) -> Options:
        """These options with budget ``nfe``'s own (``per_nfe.<nfe>``) in their place, type-checked as the command line's."""
        own = self.per_nfe.get(str(nfe)) or {}
        if not own:
            return self
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        bad = [k for k in own if k not in Options.__dataclass_fields__ or k in PER_NFE_SHARED]
        if bad:
            raise ConfigError(f"per_nfe.{nfe}.{bad[0]}: a budget may set the method's options, not "
                              f"{', '.join(PER_NFE_SHARED)} (shared by the file)" if bad[0] in PER_NFE_SHARED
                              else f"per_nfe.{nfe}.{bad[0]}: no such option")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(replace(self, per_nfe={})), own)
        except OmegaConfBaseException as e:
            raise ConfigError(f"per_nfe.{nfe}: {str(e).strip().splitlines()[0]}") from None
        out = OmegaConf.to_object(merged)
        assert isinstance(out, Options)
        return out

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method}: choose from {', '.join(METHODS)}")
        if not self.nfe or any(int(n) < 1 for n in self.nfe):
            raise ConfigError(f"nfe must be a list of budgets ≥ 1, e.g. nfe=[5,6,8,10], got {self.nfe}")
        if self.fine < 4:
            raise ConfigError(f"fine={self.fine}: the fine grid needs at least 4 points")
        if self.fine_top is not None and not self.fine_top > 0:
            raise ConfigError(f"fine_top={self.fine_top}: give the fine grid's largest finite σ, > σ_min")
        if self.start is not None and str(self.start).startswith("leading:"):
            k = str(self.start)[8:]
            if not (k.isdigit() and int(k) >= 1):
                raise ConfigError(f"start={self.start}: give leading:<steps ≥ 1>, e.g. start=leading:4")
        elif self.start not in (None, "leading"):
            try:
                if not float(self.start) > 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"start={self.start}: give σ_0 > 0, start=leading or start=leading:<steps>") from None
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective}: choose from {', '.join(OBJECTIVES)}")
        if self.final not in FINALS:
            raise ConfigError(f"final={self.final}: choose from {', '.join(FINALS)}")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials}: tpe needs at least one trial")
        if not 0.0 <= self.validation < 1.0 or self.patience < 1:
            raise ConfigError(f"validation={self.validation}, patience={self.patience}: give 0 ≤ validation < 1 "
                              "(the share of calibration prompts held back, e.g. 0.25) and patience ≥ 1")
        if (self.consistent or self.validation or self.guidance_terms or self.sample_power != 2
                or self.learn_grid or self.first_sigma is not None) and self.method != "learned":
            raise ConfigError("consistent=, guidance_terms=, sample_power=, learn_grid=, first_sigma= and validation= are "
                              "method=learned's: drop them for method=" + self.method)
        if self.first_sigma is not None and not (self.first_sigma > 0 and math.isfinite(self.first_sigma)):
            raise ConfigError(f"first_sigma={self.first_sigma}: give the first evaluation's finite σ > 0 (e.g. 30)")
        if self.first_sigma is not None and self.start is not None:
            raise ConfigError("first_sigma= moves the first evaluation of a grid from ∞ and start= starts the grid (and its "
                              "teacher) elsewhere: give one of them")
        if not 1 <= self.sample_power <= 2:
            raise ConfigError(f"sample_power={self.sample_power}: give 1 ≤ p ≤ 2 (2: the pooled RMSE, 1: the mean per-sample RMSE)")
        if self.grid_search < 0 or (self.grid_search and (self.method != "learned" or self.coef_init != "greedy")):
            raise ConfigError(f"grid_search={self.grid_search}: the sweeps of a grid search for greedy coefficients, a count "
                              "≥ 0 with method=learned coef_init=greedy")
        if self.last_sigma is not None and not (self.grid_search and self.last_sigma > 0):
            raise ConfigError(f"last_sigma={self.last_sigma} caps the grid search's last nonzero σ: give it > 0 with "
                              "grid_search=<sweeps>")
        if self.method == "learned" and self.final != "free":
            raise ConfigError("method=learned fits the coefficients on its init grid as it is: drop final=")
        if self.teacher_substeps < 1 or self.calibration.num_samples < 1:
            raise ConfigError("teacher_substeps and calibration.num_samples must be ≥ 1")
        self.per_nfe = {str(k): dict(v or {}) for k, v in (self.per_nfe or {}).items()}  # (YAML: int keys)
        for k in self.per_nfe:
            if k not in {str(int(n)) for n in self.nfe}:
                raise ConfigError(f"per_nfe.{k}: not a budget of nfe={list(self.nfe)}")
            try:
                self.for_budget(int(k)).check()
            except ConfigError as e:
                raise ConfigError(f"per_nfe.{k}: {e}" if not str(e).startswith("per_nfe.") else str(e)) from None


# --- the sampler, one step at a time --------------------------------------------------------------

@dataclass
class Node:
    """A state of the sampler: x at σ after ``index`` steps along ``path``, with the batch's
    history and stash as the solver left them; ``pred`` is the (guided, final) evaluation at
    (x, σ) once made, shared by every step taken from here."""

    x: torch.Tensor
    sigma: float
    index: int
    path: tuple[float, ...]
    history: list[StepRecord] = field(default_factory=list)
    stash: Stash = field(default_factory=Stash)
    pred: tuple[Prediction, Prediction] | None = None


def power_mean(ms: torch.Tensor, power: float) -> float:
    """What the learned fits descend, from each sample's mean square error ms_i: the power mean (mean_i e_i^p)^(1/p) of
    the per-sample RMSEs e_i = √ms_i — p = 2 the RMSE over every element, p = 1 their mean (a sample far off, one that
    flips mode, then weighs by its error, not its square)."""
    return float(ms.mean().sqrt()) if power == 2 else float(ms.pow(power / 2).mean() ** (1 / power))


def fit_error(a: torch.Tensor, b: torch.Tensor, power: float) -> float:
    return power_mean((a.double() - b.double()).pow(2).flatten(1).mean(1), power)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def final_loss(sampler: "Sampler", target: torch.Tensor, objective: str) -> Callable[[torch.Tensor], float]:
    """The error of final latents x to ``target``: RMSE of the latents (``latent``), of the decoded
    images in [0, 1] (``image``), or of the images' horizontal and vertical finite differences
    (``image_grad``: an edge-sensitive error that a blurred sample pays for)."""
    if objective == "latent":
        return lambda x: rmse(x, target)
    def feats(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_features(sampler, x, objective)

    ref = feats(target)
    return lambda x: rmse(feats(x), ref)


def image_features(sampler: "Sampler", x: torch.Tensor, objective: str) -> torch.Tensor:
    """What ``objective`` compares of final latents x (not ``latent``): the decoded images in [0, 1]
    (``image``), or their horizontal and vertical finite differences (``image_grad``); differentiable."""
    model = sampler.model
    if not getattr(model, "has_decoder", False):
        raise ConfigError(f"objective={objective} decodes the samples: this model has no decoder (use objective=latent)")
    img = model.decode(x).double()
    if objective == "image":
        return img
    return torch.cat([(img[..., 1:, :] - img[..., :-1, :]).flatten(1), (img[..., :, 1:] - img[..., :, :-1]).flatten(1)], 1)


class Sampler:
    """The engine's loop for one calibration batch, opened once, driven step by step on any grid:
    the run's model, guidance and momentum, and its solver plugin (or another ``step``)."""

    def __init__(self, overrides: Sequence[str], model: object | None = None):
        from framework.core import engine
        from framework.core.settings import read_settings
        from framework.entry.compose import compose
        from framework.models.base import wrap_model

        cfg, choices = compose(list(overrides))
        self.cfg, self.choices = cfg, choices
        self.run = engine.open_run(cfg, choices, wrap_model, None if model is None else wrap_model(model))
        # the run's own grid starts at σ = ∞ (a flow model's t = 1): so does every grid made here
        self.from_infinity = self.run.schedule is not None and self.run.schedule.from_infinity
        self.model = self.run.model
        self.sigma_max, self.sigma_min = float(self.model.sigma_max), float(self.model.sigma_min)
        settings = read_settings(cfg)
        with torch.no_grad():  # the prompts' encoding too: nothing here is differentiated
            self.batch = engine.new_batch(self.run, list(settings.indices()))
            self.groups = [k % len(settings.prompts) if settings.prompts else 0 for k in settings.indices()]  # each sample's prompt
            self.noise = self.batch.noise.draw()
        assert self.run.hooks is not None
        self.step_name, self.step_fn = self.run.hooks.step
        self.nfe = 0
        self.vp_start = False  # x_T = √(1+σ_0²)·ε (diffusers' leading spacing) instead of σ_0·ε
        self.first_sigma: float | None = None  # a grid from ∞ evaluates its first D at this σ on σ·x_T (learned's first_sigma)

    def init_scale(self, sigma: float) -> float:
        if math.isinf(sigma):  # the state at σ = ∞ is the unit noise ε (the engine's convention)
            return 1.0
        return math.sqrt(1.0 + sigma * sigma) if self.vp_start else sigma

    @property
    def top(self) -> float:
        """Where every grid starts by default: ∞ for a model whose grid starts there, else σ_max."""
        return math.inf if self.from_infinity else self.sigma_max

    def start(self, sigma: float) -> Node:
        return Node(self.noise * self.init_scale(sigma), sigma, 0, (sigma,))

    def _state(self, node: Node, schedule: Schedule, history: list[StepRecord], stash: Stash):
        batch = replace(self.batch, history=history, stash=stash, nfe=0)
        den = Denoiser(self.run, batch)
        state = SamplerState(run=self.run, batch=batch, index=node.index, x=node.x, sigma=node.sigma,
                             schedule=schedule, denoise=den)
        den.state = state
        return state, den, batch

    def evaluate(self, node: Node) -> tuple[Prediction, Prediction]:
        """(guided, after momentum) at the node, made once."""
        if node.pred is None:
            sched = Schedule(node.path + (0.0,), None, node.path[0]) if node.sigma > 0 else None
            assert sched is not None
            state, den, batch = self._state(node, sched, list(node.history), node.stash)
            with torch.no_grad():
                guided = pred = den.evaluate(node.x, node.sigma)
                for name, fn in self.run.hooks.momentum if math.isfinite(node.sigma) else ():  # as the engine
                    pred = call(name, "momentum", fn, state=state, pred=pred)
            den.state = None  # (the cycle, as in prediction)
            self.nfe += batch.nfe
            node.pred = (guided, pred)
        return node.pred

    def prediction(self, x: torch.Tensor, i: int, grid: Sequence[float]) -> Prediction:
        """The guided evaluation at (x, grid[i]) as step i of ``grid``, differentiable in x (no momentum); a grid from ∞
        with ``first_sigma`` set evaluates its step 0 at (first_sigma·x, first_sigma)."""
        if i == 0 and self.first_sigma is not None and math.isinf(grid[0]):
            x, grid = x * self.first_sigma, [self.first_sigma, *grid[1:]]
        node = Node(x, grid[i], i, tuple(grid[: i + 1]))
        _, den, batch = self._state(node, Schedule(tuple(grid), None, grid[0]), [], Stash())
        out = den.evaluate(x, grid[i])
        den.state = None  # the state ↔ denoiser cycle freed now, not at the next full collection (GBs on a big batch)
        self.nfe += batch.nfe
        return out

    def denoised(self, x: torch.Tensor, i: int, grid: Sequence[float]) -> torch.Tensor:
        """The guided D at (x, grid[i]) as step i of ``grid``, differentiable in x (no momentum)."""
        return self.prediction(x, i, grid).denoised

    def denoised_and_delta(self, x: torch.Tensor, i: int, grid: Sequence[float],
                           terms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The guided D and, with ``terms``, the guidance difference Δ = D_cond − D_uncond at (x, grid[i])."""
        p = self.prediction(x, i, grid)
        if not terms:
            return p.denoised, None
        if p.cond_denoised is None or p.uncond_denoised is None:
            raise ConfigError("guidance_terms=true weighs D_cond − D_uncond, and this run has no classifier-free "
                              "guidance (an unconditional model, or guidance=[]): drop guidance_terms")
        return p.denoised, p.cond_denoised - p.uncond_denoised

    def step(self, node: Node, sigma_next: float, total: int, step_fn: Callable | None = None) -> Node:
        """One step of the solver from ``node`` to ``sigma_next`` as step ``node.index`` of a
        ``total``-step grid (the rest of the grid, which the solver may read, is filled
        geometrically down to 0)."""
        rest = total - node.index - 1
        if rest < 0 or (rest == 0) != (sigma_next == 0) or not sigma_next < node.sigma:
            raise ValueError(f"bad step {node.sigma} → {sigma_next} at {node.index} of {total}")
        tail = tuple(sigma_next * 0.5 ** m for m in range(1, rest)) + ((0.0,) if rest else ())
        schedule = Schedule(node.path + (sigma_next,) + tail, None, node.path[0])
        guided, pred = self.evaluate(node)
        state, den, batch = self._state(node, schedule, list(node.history), copy.deepcopy(node.stash))
        state.guided, state.pred, state.x = guided, pred, pred.x
        fn = step_fn or self.step_fn
        with torch.no_grad():
            if math.isinf(node.sigma):  # the solver's limit step from ∞, as the engine takes it
                from framework.core.engine import from_infinity

                x_next = call(self.step_name, "step_from_infinity", from_infinity(fn), state=state)
            else:
                x_next = call(self.step_name, "step", fn, state=state, denoise=den)
        den.state = None  # (the cycle, as in prediction)
        self.nfe += batch.nfe
        rec = StepRecord(node.index, node.sigma, sigma_next, state.x, guided.denoised, pred.denoised, x_next)
        return Node(x_next, sigma_next, node.index + 1, node.path + (sigma_next,), node.history + [rec], batch.stash)

    def trajectory(self, grid: Sequence[float], step_fn: Callable | None = None,
                   start: Node | None = None) -> list[Node]:
        """Every node along ``grid`` (descending, ending at 0), from ``start`` (default x_T at grid[0])."""
        nodes = [start or self.start(grid[0])]
        total = len(grid) - 1
        for s in grid[nodes[0].index + 1:]:
            nodes.append(self.step(nodes[-1], float(s), total, step_fn))
        return nodes

    def steps_for_nfe(self, budget: int) -> int:
        """The step count whose NFE equals ``budget`` (NFE(steps) measured on two probe grids)."""
        if not hasattr(self, "_affine"):
            counts = []
            for k in (2, 3, 4):
                before = self.nfe
                probe = list(np.geomspace(self.sigma_max, self.sigma_min, k)) + [0.0]
                self.trajectory(([math.inf] + probe[1:]) if self.from_infinity else probe)
                counts.append(self.nfe - before)
            a, b = counts[1] - counts[0], counts[0] - 2 * (counts[1] - counts[0])
            if counts[2] - counts[1] != a or a < 1:
                raise ConfigError(f"solver={self.choices.get('solver')}: its NFE is not affine in steps "
                                  f"({counts} for 2, 3, 4 steps): it cannot be given a fixed NFE budget")
            self._affine = (a, b)
        a, b = self._affine
        k = (budget - b) / a
        if k != int(k) or k < 1:
            near = sorted({int(a * s + b) for s in (math.floor(k), math.ceil(k)) if s >= 1})
            raise ConfigError(f"solver={self.choices.get('solver')} takes {a}·steps{b:+d} evaluations on a grid "
                              f"ending at 0: NFE {budget} is not reachable (nearest: {', '.join(map(str, near))})")
        return int(k)


# --- the teacher and the fine grid ----------------------------------------------------------------

@dataclass
class Teacher:
    fine: list[float]  # σ_max … σ_min, 0
    x: list[torch.Tensor]  # the teacher's state at each fine σ; x[-1] = D at σ_min (the target)
    preds: list[tuple[Prediction, Prediction]]  # evaluations at the nonzero fine points
    nfe: int
    seconds: float = 0.0


def fine_grid(sigma_max: float, sigma_min: float, n: int, top: float | None = None) -> list[float]:
    """``n`` points log-uniform from σ_max to σ_min, then 0; with ``top`` = ∞: ∞, then n − 1 such points."""
    if top is not None and math.isinf(top):
        return [math.inf] + fine_grid(sigma_max, sigma_min, n - 1)
    g = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    g[0], g[-1] = sigma_max, sigma_min
    return [float(s) for s in g] + [0.0]


def teacher_solver(name: str, rtol: float) -> Callable:
    """The ``step`` hook of solver plugin ``name`` (``reference``: DOP853 at ``rtol``, final step D)."""
    from framework.core.registry import instantiate
    from framework.entry.compose import compose

    extra = [f"solver.rtol={rtol!r}", f"solver.atol={rtol!r}", "solver.final=denoise"] if name == "reference" else []
    node = compose([f"solver={name}", *extra])[0].solver
    return instantiate(node, f"solver={name}").step


def make_teacher(sampler: Sampler, fine: list[float], solver: str, substeps: int, rtol: float) -> Teacher:
    grid: list[float] = []
    for a, b in zip(fine[:-1], fine[1:]):  # from ∞ one step (reference: its own integration from t = 1)
        grid += [a] if b == 0 or math.isinf(a) else [a] + [float(s) for s in np.exp(np.linspace(math.log(a), math.log(b), substeps + 1))[1:-1]]
    grid.append(0.0)
    before, t0 = sampler.nfe, time.perf_counter()
    nodes = sampler.trajectory(grid, teacher_solver(solver, rtol))
    at = {n.sigma: n for n in nodes}
    xs = [at[s].x for s in fine]
    preds = [sampler.evaluate(at[s]) for s in fine[:-1]]
    return Teacher(fine, xs, preds, sampler.nfe - before, round(time.perf_counter() - t0, 2))


def _fine_node(teacher: Teacher, i: int) -> Node:
    s = teacher.fine[i]
    return Node(teacher.x[i], s, 0, (s,), pred=teacher.preds[i])


# --- dynamic programming ---------------------------------------------------------------------------

def dp_path(cost: Callable[[int, int], float], last: int, steps: int) -> tuple[list[int], float]:
    """The path 0 = p_0 < p_1 < … < p_steps = ``last`` of least Σ cost(p_k, p_{k+1}) (exact)."""
    if not 1 <= steps <= last:
        raise ValueError(f"cannot reach point {last} in {steps} steps")
    inf = math.inf
    best = [[inf] * (last + 1) for _ in range(steps + 1)]
    back = [[-1] * (last + 1) for _ in range(steps + 1)]
    best[0][0] = 0.0
    for k in range(1, steps + 1):
        lo, hi = k, last - (steps - k)
        for j in range(lo, hi + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] < inf:
                    c = best[k - 1][i] + cost(i, j)
                    if c < best[k][j]:
                        best[k][j], back[k][j] = c, i
    path = [last]
    for k in range(steps, 0, -1):
        path.append(back[k][path[-1]])
    return path[::-1], best[steps][last]


def check_pinned(steps: int, pinned: bool) -> None:
    if pinned and steps < 2:
        raise ConfigError("final=sigma_min needs at least 2 steps (σ_0 → σ_min → 0)")


def gits(sampler: Sampler, teacher: Teacher, steps: int, pinned: bool = False) -> tuple[list[float], float]:
    """GITS: exact least summed local truncation error over the fine points (``pinned``: the
    path passes through σ_min, the last fine point before 0, and takes its final step from there)."""
    check_pinned(steps, pinned)
    fine, last = teacher.fine, len(teacher.fine) - 1
    memo: dict[tuple[int, int], float] = {}

    def cost(i: int, j: int) -> float:
        if (i, j) not in memo:
            total = 1 if j == last else 2
            nxt = sampler.step(_fine_node(teacher, i), fine[j], total)
            memo[(i, j)] = rmse(nxt.x, teacher.x[j])
        return memo[(i, j)]

    if pinned:
        path, obj = dp_path(cost, last - 1, steps - 1)
        return [fine[p] for p in path] + [0.0], obj + cost(last - 1, last)
    path, obj = dp_path(cost, last, steps)
    return [fine[p] for p in path], obj


def history_costs(sampler: Sampler, teacher: Teacher, steps: int) -> tuple[Callable[[int], float],
                                                                          Callable[[int, int, int], float]]:
    """(cost of the first step 0 → i, cost of the step i → j after p → i) for ``gits_history``."""
    fine, last = teacher.fine, len(teacher.fine) - 1
    first: dict[int, Node] = {}  # the real step 0 → i (no history)
    after: dict[tuple[int, int], Node] = {}  # x*_i with the history of the real step p → i

    def carried(p: int, i: int) -> Node:
        if (p, i) not in after:
            step = sampler.step(_fine_node(teacher, p), fine[i], steps)
            after[(p, i)] = replace(step, x=teacher.x[i], pred=teacher.preds[i])
            if p == 0:
                first[i] = step
        return after[(p, i)]

    def first_cost(i: int) -> float:
        carried(0, i)
        return rmse(first[i].x, teacher.x[i])

    def local(p: int, i: int, j: int) -> float:  # the step i → j as the second step of a grid
        return rmse(sampler.step(carried(p, i), fine[j], 2 if j == last else max(steps, 3)).x, teacher.x[j])

    return first_cost, local


def gits_history(sampler: Sampler, teacher: Teacher, steps: int, pinned: bool = False) -> tuple[list[float], float]:
    """GITS with a history-aware cost (``history=true``): the cost of the step i → j after the
    step p → i is the local error of a solver step from the teacher's x*_i that carries the
    history (and stash) of one real step p → i taken from x*_p — what a two-step method such as
    DPM-Solver++(2M) or UniPC(2) extrapolates from. The path minimises the summed cost exactly by
    dynamic programming over (previous, current) fine-point pairs (O(K · fine³) solver steps, the
    model evaluations shared with the teacher's)."""
    fine, last = teacher.fine, len(teacher.fine) - 1
    check_pinned(steps, pinned)
    if steps == 1:
        return [fine[0], 0.0], rmse(sampler.step(_fine_node(teacher, 0), 0.0, 1).x, teacher.x[-1])
    first_cost, local = history_costs(sampler, teacher, steps)
    inf = math.inf
    best: dict[tuple[int, int], float] = {}
    back: list[dict[tuple[int, int], int]] = [{}]
    for i in ([last - 1] if pinned and steps == 2 else range(1, last - steps + 2)):  # step 1: 0 → i
        best[(0, i)] = first_cost(i)
    for k in range(2, steps + 1):
        new: dict[tuple[int, int], float] = {}
        bk: dict[tuple[int, int], int] = {}
        for (p, i), c in best.items():
            targets = [last] if k == steps else ([last - 1] if pinned and k == steps - 1 else
                                                 range(i + 1, last - (steps - k) + 1))
            for j in targets:
                if j <= i or (j == last and k < steps) or (pinned and j == last and i != last - 1):
                    continue
                v = c + local(p, i, j)
                if v < new.get((i, j), inf):
                    new[(i, j)], bk[(i, j)] = v, p
        best = new
        back.append(bk)
    (p, i), obj = min(((key, v) for key, v in best.items() if key[1] == last), key=lambda kv: kv[1])
    path, a, b = [last], p, last  # state after step k: (q_{k-1}, q_k); back[k] gives q_{k-2}
    for k in range(steps, 1, -1):
        path.append(a)
        a, b = back[k - 1][(a, b)], a
    path.append(0)
    return [fine[q] for q in path[::-1]], obj


def oss(sampler: Sampler, teacher: Teacher, steps: int, pinned: bool = False) -> tuple[list[float], float]:
    """OSS: the student's state carried along the best path to every (steps taken, fine point)."""
    check_pinned(steps, pinned)
    fine, last = teacher.fine, len(teacher.fine) - 1
    layer: dict[int, Node] = {0: sampler.start(fine[0])}
    for k in range(1, steps + 1):
        targets = [last] if k == steps else ([last - 1] if pinned and k == steps - 1 else range(k, last - (steps - k) + 1))
        new: dict[int, tuple[float, Node]] = {}
        for j in targets:
            if j == last and k < steps:
                continue
            for i, node in layer.items():
                if i >= j:
                    continue
                nxt = sampler.step(node, fine[j], steps)
                err = rmse(nxt.x, teacher.x[j])
                if j not in new or err < new[j][0]:
                    new[j] = (err, nxt)
        layer = {j: n for j, (_, n) in new.items()}
    final = layer[last]
    return list(final.path), rmse(final.x, teacher.x[-1])


def klub_table(sampler: Sampler, teacher: Teacher) -> np.ndarray:
    """K[a, b] = Σ_{a<m≤b} (σ_{m−1} − σ_m)/σ_m³ · mean‖D_m − D_a‖², D_m = D(x0 + σ_m·ε, σ_m)
    over the nonzero fine points (x0: the teacher's samples, ε: the calibration noise)."""
    fine = teacher.fine[:-1]
    x0, eps = teacher.x[-1], sampler.noise
    d = [sampler.evaluate(Node(x0 + s * eps, s, 0, (s,)))[1].denoised.double() for s in fine]
    n = len(fine)
    w = [0.0] + [(fine[m - 1] - fine[m]) / fine[m] ** 3 for m in range(1, n)]
    table = np.full((n, n), np.inf)
    for a in range(n):
        acc = 0.0
        table[a, a] = 0.0
        for b in range(a + 1, n):
            acc += w[b] * float((d[b] - d[a]).pow(2).mean())
            table[a, b] = acc
    return table


def ays(sampler: Sampler, teacher: Teacher, steps: int, sweeps: int) -> tuple[list[float], float]:
    """AYS: coordinate descent of the summed KLUB over the interior points (σ_max, σ_min fixed)."""
    fine, n = teacher.fine, len(teacher.fine) - 1
    if math.isinf(fine[0]):
        raise ConfigError("method=ays: the KLUB has no term from σ = ∞, where this model's grids start "
                          "(a flow model): use method=gits, oss, ld3 or tpe")
    if steps == 1:
        return [fine[0], 0.0], 0.0
    cache = sampler.__dict__.setdefault("_klub", {})
    table = cache.get(id(teacher))
    if table is None:
        table = cache[id(teacher)] = klub_table(sampler, teacher)
    idx = sorted({int(round(v)) for v in np.linspace(0, n - 1, steps)})
    while len(idx) < steps:  # too few fine points for distinct picks: fill gaps
        idx = sorted(set(idx) | {next(i for i in range(n) if i not in idx)})
    for _ in range(max(1, sweeps)):
        moved = False
        for k in range(1, steps - 1):
            lo, hi = idx[k - 1], idx[k + 1]
            best = min(range(lo + 1, hi), key=lambda m: table[lo, m] + table[m, hi])
            if best != idx[k]:
                idx[k], moved = best, True
        if not moved:
            break
    obj = float(sum(table[a, b] for a, b in zip(idx, idx[1:])))
    return [fine[i] for i in idx] + [0.0], obj


def same_head(old: dict, head: dict) -> bool:
    """Whether a schedule file was made with these settings (its grids can be resumed): equal keys, the model's
    σ range to float32 rounding (a GPU computes it from the same weights to within the last bits), and an ``init``
    schedule file named by its file name (a study's folder resumes where it is copied, e.g. from a GPU machine)."""
    def close(a, b) -> bool:
        return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6)

    def named(s: dict) -> dict:
        init = str(s.get("init", ""))
        return {**s, "init": Path(init).name} if init.endswith(".json") else s

    def settings(h: dict) -> dict:
        s = named(h.get("settings") or {})
        return {**s, "per_nfe": {k: named(v) for k, v in s["per_nfe"].items()}} if "per_nfe" in s else s

    m, n = old.get("model") or {}, head["model"]
    return (all(old.get(k) == v for k, v in head.items() if k not in ("model", "settings"))
            and settings(old) == settings(head) and m.keys() == n.keys()
            and all(m[k] == v or close(m[k], v) for k, v in n.items()))


def moved_to(grid: list[float], top: float) -> list[float]:
    """A grid (descending, ending at 0) started at ``top`` instead: its log σ mapped affinely onto [its last nonzero σ,
    ``top``] (the last nonzero point and the 0 kept)."""
    a, b = math.log(grid[0]), math.log(grid[-2])
    return [math.exp(b + (math.log(v) - b) * (math.log(top) - b) / (a - b)) for v in grid[:-1]] + [0.0]


def initial_inner(sampler: Sampler, teacher: Teacher, steps: int, opts: Options, nfe: int) -> list[float]:
    """The interior points of ``init``'s grid for the budget (below σ_0 = the teacher's top; without the
    pinned σ_min): the start of ``ld3`` and ``learned``."""
    pinned = opts.final == "sigma_min"
    if opts.init == "gits":
        start, _ = gits(sampler, teacher, steps, pinned)
    elif opts.init == "oss":
        start, _ = oss(sampler, teacher, steps, pinned)
    elif opts.init in STOCK_INITS:  # a stock grid of that many steps (points below the start kept)
        start = leading_grid(sampler.model, steps) if opts.init == "leading" else stock_grid(opts.init, sampler.model, steps)
    else:
        from framework.runs.schedule_file import read_schedule_file

        g = read_schedule_file(opts.init)["grids"].get(str(nfe))
        if g is None or g["steps"] != steps:
            raise ConfigError(f"init={opts.init} has no {steps}-step grid for NFE {nfe}")
        start = [float(v) for v in g["sigmas"]]
    top, tail = teacher.fine[0], ([sampler.sigma_min] if pinned else [])
    free = steps - 1 - len(tail)  # the learned σ_1 … (σ_0 = the start; then σ_min if pinned, then 0)
    inner = [v for v in start[1:-1] if v < top and not (pinned and v <= sampler.sigma_min * 1.01)][:free]
    if len(inner) != free and opts.init in STOCK_INITS and len(start) == steps + 1:
        inner = moved_to(start, top)[1:-1][:free]  # too few of the stock grid's points lie below this start: its shape
    if len(inner) != free:
        raise ConfigError(f"init={opts.init}: its {steps}-step grid does not fit below σ_0 = {top:g}")
    return inner


def adam_bar(opts: Options, what: str):
    """The Adam steps of one budget, a progress bar (off with ``progress=false``; the ``seconds`` cap may end it early)."""
    from tqdm import tqdm

    return tqdm(range(1, opts.iterations + 1), desc=what, unit="step", leave=False, disable=not opts.progress or
                opts.iterations < 2, file=sys.stderr)


def adam_step(grad: np.ndarray, m: np.ndarray, v: np.ndarray, it: int, lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adam's step (β = 0.9, 0.999) on a log-σ grid from its derivative: (the step to subtract, m, v)."""
    m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
    return lr * (m / (1 - 0.9 ** it)) / (np.sqrt(v / (1 - 0.999 ** it)) + 1e-12), m, v


def descending(t: np.ndarray, lo: float, top: float) -> np.ndarray:
    """Interior log σ kept in [lo, top] and strictly decreasing, 1 % apart (the first 1 % below ``top``)."""
    t = np.clip(t, lo, top)
    for k in range(len(t)):
        t[k] = min(t[k], (top if k == 0 else t[k - 1]) - 0.01)
    return t


def ld3(sampler: Sampler, teacher: Teacher, steps: int, opts: Options, nfe: int) -> tuple[list[float], float, int]:
    """LD3-style: Adam on the log-σ grid, derivative of the final error by central differences
    (``final=sigma_min``: the last nonzero σ stays at σ_min, the others are learned)."""
    pinned = opts.final == "sigma_min"
    check_pinned(steps, pinned)
    inner = initial_inner(sampler, teacher, steps, opts, nfe)
    loss_of = final_loss(sampler, teacher.x[-1], opts.objective)
    top, tail = teacher.fine[0], ([sampler.sigma_min] if pinned else [])
    free = len(inner)
    lo, hi = math.log(sampler.sigma_min) + (0.01 if pinned else 0.0), math.log(min(top, sampler.sigma_max))
    theta = np.array([math.log(s) for s in inner])

    def grid_of(t: np.ndarray) -> list[float]:
        return [top] + [math.exp(v) for v in t] + tail + [0.0]

    def final_from(nodes: list[Node], k: int, value: float, t: np.ndarray) -> float:
        grid = grid_of(t)
        grid[k + 1] = math.exp(value)
        return loss_of(sampler.trajectory(grid, start=nodes[k])[-1].x)

    if free < 1:
        nodes = sampler.trajectory(grid_of(theta))
        return grid_of(theta), loss_of(nodes[-1].x), 0
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    best_t, best = theta.copy(), math.inf
    t0, it = time.perf_counter(), 0
    bar = adam_bar(opts, "ld3")
    for it in bar:
        nodes = sampler.trajectory(grid_of(theta))
        loss = loss_of(nodes[-1].x)
        if loss < best:
            best, best_t = loss, theta.copy()
        bar.set_postfix_str(f"error {loss:.4f}, best {best:.4f}")
        if time.perf_counter() - t0 > opts.seconds:
            break
        grad = np.zeros_like(theta)
        h = opts.fd_step
        for k in range(len(theta)):
            up = min(theta[k] + h, (hi if k == 0 else theta[k - 1]) - 1e-4)
            down = max(theta[k] - h, ((lo if pinned else lo - 0.5) if k == len(theta) - 1 else theta[k + 1]) + 1e-4)
            f_up, f_down = final_from(nodes, k, up, theta), final_from(nodes, k, down, theta)
            grad[k] = (f_up - f_down) / (up - down)
        step, m, v = adam_step(grad, m, v, it, opts.lr)
        theta = descending(theta - step, lo, hi)
    bar.close()
    nodes = sampler.trajectory(grid_of(theta))
    loss = loss_of(nodes[-1].x)
    if loss < best:
        best, best_t = loss, theta.copy()
    return grid_of(best_t), best, it


def solver_as_linear(sampler: Sampler, name: str, grid: list[float]) -> tuple[list[float], list[list[float]]]:
    """The coefficients e_j, b_jk of solver plugin ``name`` (its defaults) on ``grid``, as ``solver=learned``
    writes a state: recovered by least squares from its own run on the calibration batch (exact for the
    deterministic multistep solvers, whose states are linear in x_T and the D's; refused otherwise)."""
    nodes = sampler.trajectory(grid, step_fn=teacher_solver(name, 1e-6))
    x_T = nodes[0].x.double().flatten().cpu()
    ds = [n.pred[0].denoised.double().flatten().cpu() for n in nodes[:-1]]
    e, b = [], []
    for j in range(len(grid) - 1):
        basis = torch.stack([x_T] + ds[: j + 1], 1)
        target = nodes[j + 1].x.double().flatten().cpu()
        c = torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]
        residual = float((basis @ c - target).norm() / target.norm())
        if residual > 1e-4:
            raise ConfigError(f"coef_init={name}: its step {j} is not a fixed linear combination of x_T and the "
                              f"denoiser outputs (relative residual {residual:.1e}); use coef_init=euler")
        e.append(float(c[0]))
        b.append([float(v) for v in c[1:]])
    return e, b


def teacher_states(sampler: Sampler, teacher: Teacher, grid: list[float], opts: Options) -> list[torch.Tensor]:
    """The teacher's states at ``grid``'s interior points, then its final target: the teacher solver rerun on
    its fine grid merged with those points (the same substeps per interval)."""
    inner = [float(s) for s in grid[1:-1]]
    if grid[0] != teacher.fine[0] or any(s < sampler.sigma_min for s in inner):
        raise ConfigError(f"the grid {[round(s, 4) for s in grid]} does not lie on the teacher's range "
                          f"{teacher.fine[0]:g} … {sampler.sigma_min:g}")
    if all(s in teacher.fine for s in inner):  # the grid lies on the fine points: the teacher's own states
        return [teacher.x[teacher.fine.index(s)] for s in inner] + [teacher.x[-1]]
    pts = list(teacher.fine[:-1])
    for s in inner:  # a fine point within rounding of a grid point becomes it (no zero-length teacher step)
        near = [k for k, f in enumerate(pts) if math.isfinite(f) and abs(math.log(s / f)) < 1e-6]
        if near:
            pts[near[0]] = s
        else:
            pts.append(s)
    fine = sorted(set(pts), reverse=True) + [0.0]
    t = make_teacher(sampler, fine, opts.teacher, opts.teacher_substeps, opts.teacher_rtol)
    at = dict(zip(fine, t.x))
    return [at[s] for s in inner] + [t.x[-1]]


def greedy_coefficients(sampler: Sampler, teacher: Teacher, grid: list[float],
                        opts: Options) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """``coef_init=greedy``: ``greedy_fit`` to the teacher's states at the grid's points (the teacher rerun on
    them), with ``validation`` on the samples not held back only."""
    targets = teacher_states(sampler, teacher, grid, opts)
    seen = None if not opts.validation else ~validation_mask(sampler.groups, opts.validation).to(targets[0].device)
    e, b, g, _ = greedy_fit(sampler, grid, targets, opts.consistent, seen, opts.guidance_terms, power=opts.sample_power)
    return e, b, g


def greedy_grid_search(sampler: Sampler, teacher: Teacher, grid: list[float], opts: Options) -> tuple[list[float], dict[str, Any]]:
    """``grid_search``: the grid's points moved to fine points (the nearest; ``last_sigma`` caps the last), then by
    coordinate descent, each interior point in turn by up to two fine points while the final calibration error (``fit_error``) of the
    greedy coefficients on the grid falls, for at most ``grid_search`` sweeps. A grid costs the model evaluations from
    its moved point on (the teacher's states at the fine points are the targets; the head before it is kept), so a
    sweep tries ~4·K grids in about 2·K² evaluations.
    (The grid, {"sweeps", "grids" tried, "rmse" — the error searched — of the start and of the end}.)"""
    fine, cap = teacher.fine[:-1], opts.last_sigma if opts.last_sigma is not None else math.inf
    below = sampler.first_sigma if sampler.first_sigma is not None and math.isinf(grid[0]) else math.inf  # σ_1 < first_sigma
    seen = None if not opts.validation else ~validation_mask(sampler.groups, opts.validation).to(teacher.x[-1].device)
    memo: dict[tuple[int, ...], float] = {}
    heads: dict = {}  # greedy_fit's model evaluations by the grid's head: a moved point evaluates from there on

    def cost(idx: tuple[int, ...]) -> float:
        if fine[idx[-1]] > cap or fine[idx[1]] >= below:
            return math.inf
        if idx not in memo:
            pts = [fine[i] for i in idx] + [0.0]
            x = greedy_fit(sampler, pts, [teacher.x[i] for i in idx[1:]] + [teacher.x[-1]], opts.consistent, seen,
                           opts.guidance_terms, heads, opts.sample_power)[-1]
            memo[idx] = fit_error(x if seen is None else x[seen], teacher.x[-1] if seen is None else teacher.x[-1][seen],
                                  opts.sample_power)
        return memo[idx]

    logs = [math.log(f) if math.isfinite(f) else math.inf for f in fine]
    near = sorted({min(range(1, len(fine)), key=lambda i: abs(logs[i] - math.log(v))) for v in grid[1:-1]})
    if len(near) != len(grid) - 2:
        raise ConfigError(f"grid_search: the init grid has more points than the {opts.fine} fine points hold apart: raise fine")
    if fine[near[-1]] > cap:  # the last point down to the cap, the others kept above it
        low = next((i for i in range(1, len(fine)) if fine[i] <= cap), None)
        if low is None or low < len(near):
            raise ConfigError(f"last_sigma={cap:g}: too few fine points lie below it for {len(near)} points")
        near = [min(i, low - (len(near) - 1 - p)) for p, i in enumerate(near[:-1])] + [low]
    idx = (0, *near)
    from tqdm import tqdm

    first = best = cost(idx)
    sweeps = 0
    bar = tqdm(range(1, opts.grid_search + 1), desc="grid search", unit="sweep", leave=False, disable=not opts.progress,
               file=sys.stderr)
    for sweeps in bar:
        bar.set_postfix_str(f"RMSE {best:.4f}, {len(memo)} grids")
        moved = False
        for p in range(1, len(idx)):
            for step in (-2, -1, 1, 2):
                cand = list(idx)
                cand[p] += step
                if cand[p - 1] < cand[p] < (cand[p + 1] if p + 1 < len(cand) else len(fine)):
                    value = cost(tuple(cand))
                    if value < best - 1e-9:
                        best, idx, moved = value, tuple(cand), True
        if not moved:
            break
    return [fine[i] for i in idx] + [0.0], {"sweeps": sweeps, "grids": len(memo), "rmse_start": first, "rmse": best}


def greedy_fit(sampler: Sampler, grid: list[float], targets: list[torch.Tensor], consistent: bool,
               seen: torch.Tensor | None = None, terms: bool = False,
               cache: dict | None = None, power: float = 2.0) -> tuple[list[float], list[list[float]], list[list[float]], torch.Tensor]:
    """Step by step, the coefficients whose state is nearest (least squares over the samples ``seen``, default all)
    to ``targets[j]`` at grid point j + 1 (the last: the final sample), given the student's own past states; with
    ``consistent`` inside that family (the newest D's weight implied), with ``terms`` a free weight on every guidance
    difference Δ_k so far besides; with ``power`` p < 2 the least Σ_i ‖residual_i‖^p over the samples instead. Closed form, one evaluation per step: (e, b, g (rows of [] without terms), the
    final state). ``cache`` (a dict the caller keeps, for targets that follow from the grid's points) holds each
    evaluation by the grid's points up to it — the state there is the fit's on them — so a grid that shares a head
    with one fitted before evaluates the model from its first new point on (the same numbers)."""
    steps, finite = len(grid) - 1, not math.isinf(grid[0])
    rows = slice(None) if seen is None else seen
    with torch.no_grad():
        x_T = sampler.start(grid[0]).x
        x, ds, deltas, e, b, g = x_T, [], [], [], [], []
        for j in range(steps):
            hit = None if cache is None else cache.get(tuple(grid[: j + 1]))
            if hit is None:
                hit = sampler.denoised_and_delta(x, j, grid, terms)
                if cache is not None:
                    cache[tuple(grid[: j + 1])] = hit
            d_j, delta = hit
            ds.append(d_j)
            deltas += [] if delta is None else [delta]
            d, last = d_j.double(), j == steps - 1
            if consistent:  # x_{j+1} − D_j = e_j·(x_T − D_j) + Σ_{k<j} b_jk·(D_k − D_j) (from ∞: e_j·x_T)
                cols = ([] if last else [x_T.double() - d if finite else x_T.double()]) + [v.double() - d for v in ds[:-1]]
                y = targets[j].double() - d
            else:
                cols, y = [x_T.double()] + [v.double() for v in ds], targets[j].double()
            c = least_squares([v[rows] for v in cols + [v.double() for v in deltas]], y[rows], power)
            c, gj = c[: len(cols)], c[len(cols):]  # (Δ = 0 on a constant denoiser: its weights are free)
            free = 0 if last else 1  # (a consistent last step has no e_j column)
            ej, row = consistent_step(c[0] if free else 0.0, c[free:], last, finite) if consistent else (c[0], c[1:])
            e.append(ej)
            b.append(row)
            g.append(gj)
            x = linear_update(x_T, ds, torch.tensor(ej).to(x_T), [torch.tensor(v).to(x_T) for v in row],
                              deltas, [torch.tensor(v).to(x_T) for v in gj])
    return e, b, g, x


def consistent_step(ej: Any, head: list[Any], last: bool, finite: bool) -> tuple[Any, list[Any]]:
    """A consistent step's (e_j, b_j) from its free part: the last step leaves no x_T (e = 0) and the newest D's
    weight makes Σ_k b_jk = 1 − e_j (from ∞: 1), so a denoiser that returns a constant gives that constant
    (floats, or tensors that stay differentiable)."""
    ej = 0.0 if last else ej
    return ej, list(head) + [(1.0 - ej if finite else 1.0) - sum(head, 0.0)]


def least_squares(cols: list[torch.Tensor], y: torch.Tensor, power: float = 2.0, sweeps: int = 50) -> list[float]:
    """argmin_c ‖Σ c_k·cols_k − y‖² over every element, the least-norm one where the columns are dependent (as on a
    Gaussian, where every D is a multiple of x_T): the normal equations in float64, solved on the CPU by SVD. With
    ``power`` p < 2, argmin_c Σ_i ‖r_i‖^p over the samples i (dim 0) instead, by iteratively reweighted least squares
    (weights ‖r_i‖^(p−2) from each sample's own Gram matrix, so a sweep costs no pass over the data; at most ``sweeps``)."""
    if not cols:
        return []
    a = torch.stack([v.flatten(1) for v in cols])  # (columns, samples, elements)
    yf = y.flatten(1)
    grams, rhss = torch.einsum("knd,lnd->nkl", a, a).cpu(), torch.einsum("knd,nd->nk", a, yf).cpu()

    def solve(w: torch.Tensor) -> torch.Tensor:
        gram, rhs = torch.einsum("n,nkl->kl", w, grams), w @ rhss
        return torch.linalg.lstsq(gram, rhs[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]

    c = solve(torch.ones(len(grams), dtype=grams.dtype))
    if power != 2:
        yy, kept, least = yf.pow(2).sum(1).cpu(), c, math.inf
        for _ in range(sweeps):
            norms = (torch.einsum("k,nkl,l->n", c, grams, c) - 2 * rhss @ c + yy).clamp_min(0).sqrt()
            total = float(norms.pow(power).sum())
            if not total < least * (1 - 1e-9):  # (a sweep never raises it but by rounding)
                break
            kept, least = c, total
            c = solve(norms.clamp_min(1e-6 * float(norms.median()) + 1e-30).pow(power - 2))
        c = kept
    return [float(v) for v in c]


def learned(sampler: Sampler, teacher: Teacher, steps: int, opts: Options,
            nfe: int) -> tuple[list[float], float, float, dict[str, Any]]:
    """``solver=learned``'s coefficients on ``init``'s grid: Adam on the final error to the teacher
    (``objective``: of the latents, the decoded images or their edges), autograd through the model (and
    the decoder); (grid, the kept coefficients' objective and final latent RMSE on all calibration samples,
    the grid's extra keys: iterations, {"e": …, "b": …, with ``guidance_terms`` "g": …}, with ``validation`` the held-back prompts' RMSE)."""
    if sampler.run.hooks.momentum:
        raise ConfigError("method=learned fits through the guided denoiser only: drop the momentum plugins")
    grid = [teacher.fine[0]] + initial_inner(sampler, teacher, steps, opts, nfe) + [0.0]
    first = sampler.first_sigma if math.isinf(grid[0]) else None  # (the grid search keeps σ_1 below it)
    if first is not None and not max(grid[1], sampler.sigma_min) < first <= sampler.sigma_max:
        raise ConfigError(f"first_sigma={first:g}: the first evaluation lies above the grid's next point σ_1 = "
                          f"{max(grid[1], sampler.sigma_min):.4g} and at most σ_max = {sampler.sigma_max:.4g}: give a σ there")
    terms, g0, searched = opts.guidance_terms, [], None  # (g0: the guidance terms' first weights, where they come from the start)
    if opts.coef_init == "init":  # the coefficients the init file holds for this budget (a fit continued)
        from framework.runs.schedule_file import read_schedule_file

        if opts.init in ("gits", "oss", *STOCK_INITS):
            raise ConfigError(f"coef_init=init continues the coefficients of a schedule file: give init=<file>, not init={opts.init}")
        g_init = read_schedule_file(opts.init)["grids"][str(nfe)]
        c = g_init.get("coefficients")  # the grid itself came from there
        if c is None or len(c["e"]) != steps:
            raise ConfigError(f"coef_init=init: {opts.init} holds no {steps}-step coefficients for NFE {nfe} "
                              "(make it with method=learned solver=learned)")
        if "g" in c and not terms:
            raise ConfigError(f"coef_init=init: {opts.init} weighs the guidance differences: continue it with guidance_terms=true")
        scale = float(g_init.get("init_noise", sampler.init_scale(grid[0]))) / sampler.init_scale(grid[0])  # its x_T in this fit's (a first_sigma file's: σ·ε)
        e0, b0 = [float(v) * scale for v in c["e"]], [[float(v) for v in row] for row in c["b"]]
        g0 = [[float(v) for v in row] for row in c.get("g", [])]
    elif opts.coef_init == "euler":
        e0, b0 = euler_as_linear(grid)
    elif opts.coef_init == "greedy":
        if opts.grid_search:
            grid, searched = greedy_grid_search(sampler, teacher, grid, opts)
        e0, b0, g0 = greedy_coefficients(sampler, teacher, grid, opts)
    else:
        e0, b0 = solver_as_linear(sampler, opts.coef_init, grid)
    if terms and not g0:  # no guidance terms to start from: none
        g0 = [[0.0] * (j + 1) for j in range(steps)]
    e = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in e0]
    b = [[torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in row] for row in b0]
    g = [[torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in row] for row in g0] if terms else []
    finite = not math.isinf(grid[0])

    def coefs(j: int) -> tuple[Any, list[Any]]:
        """Step j's (e_j, b_j) as run (with ``consistent``: ``consistent_step``, no shrinkage toward 0)."""
        return consistent_step(e[j], b[j][:-1], j == steps - 1, finite) if opts.consistent else (e[j], b[j])

    def as_float(v: Any) -> float:
        return float(v.detach()) if torch.is_tensor(v) else float(v)

    free = ([v for j in range(steps - 1) for v in [e[j], *b[j][:-1]]] + b[-1][:-1] if opts.consistent
            else e + [v for row in b for v in row]) + [v for row in g for v in row]
    x_T, target = sampler.start(grid[0]).x, teacher.x[-1]
    latent = opts.objective == "latent"
    with torch.no_grad():
        ref = target if latent else image_features(sampler, target, opts.objective)

    held = validation_mask(sampler.groups, opts.validation).to(x_T.device) if opts.validation else None

    def walk(pts: list[float], j0: int = 0, head: tuple | None = None, trace: list | None = None) -> torch.Tensor:
        """The final latents on the grid ``pts`` from step ``j0`` on (``head``: the state there and the evaluations
        before it); ``trace`` collects each step's (state, evaluations before it), detached."""
        x, ds, deltas = head if head is not None else (x_T, [], [])
        ds, deltas = list(ds), list(deltas)
        for j in range(j0, steps):
            if trace is not None:
                trace.append((x.detach(), [v.detach() for v in ds], [v.detach() for v in deltas]))
            d_j, delta = sampler.denoised_and_delta(x, j, pts, terms)
            ds.append(d_j)
            deltas += [] if delta is None else [delta]
            ej, bj = coefs(j)
            x = linear_update(x_T, ds, torch.as_tensor(ej).to(x_T), [torch.as_tensor(v).to(x_T) for v in bj],  # x_T's dtype and device
                              deltas, [v.to(x_T) for v in g[j]] if terms else ())
        return x

    def per_sample(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective's mean square per sample, what the fit descends)"""
        out = x if latent else image_features(sampler, x, opts.objective)
        per = (out.double() - ref.double()).pow(2).flatten(1).mean(1)
        fit = per.pow(opts.sample_power / 2)  # (Σ_i e_i^p, as ``power_mean``)
        return per, (fit.mean() if held is None else fit[~held].mean())

    def final(trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the objective's mean square per sample, the final latents, what the fit descends)"""
        x = walk(grid, trace=trace)
        per, loss = per_sample(x)
        return per.detach(), x.detach(), loss

    # learn_grid: σ_j only says where D_j is evaluated (the coefficients carry the steps), so moving it re-evaluates
    # from step j on; Adam on the interior log σ as ld3 (central differences), kept below the grid's start and σ_max
    # (with first_sigma: theta[0] is the first evaluation's σ, the grid's points follow)
    lead = 0 if first is None else 1
    hi = math.log(min(grid[0], sampler.sigma_max)) - 1e-3
    theta = np.array([math.log(v) for v in ([first] if lead else []) + grid[1:-1]])
    gm, gv = np.zeros_like(theta), np.zeros_like(theta)

    def grid_gradient(trace: list) -> np.ndarray:
        grad, saved = np.zeros_like(theta), sampler.first_sigma
        with torch.no_grad():
            for k in range(len(theta)):  # grid point k + 1 − lead (0: the first evaluation's σ), evaluated at that step
                up = min(theta[k] + opts.fd_step, (hi if k == 0 else theta[k - 1]) - 1e-4)
                down = max(theta[k] - opts.fd_step, (math.log(sampler.sigma_min) if k == len(theta) - 1 else theta[k + 1]) + 1e-4)
                j, f = k + 1 - lead, []
                for v in (up, down):
                    pts = list(grid)
                    if j:
                        pts[j] = math.exp(v)
                    else:
                        sampler.first_sigma = math.exp(v)
                    f.append(float(per_sample(walk(pts, j, trace[j] if j else None))[1]))
                sampler.first_sigma = saved
                grad[k] = (f[0] - f[1]) / (up - down)
        return grad

    opt = torch.optim.Adam(free, lr=opts.coef_lr) if free else None  # (one consistent step has nothing free)
    best, kept, kept_rmse, kept_it, kept_val, score = math.inf, (e0, b0, g0), math.inf, 0, None, math.inf
    t0, it = time.perf_counter(), 0
    kept_grid, trace = list(grid), [] if opts.learn_grid and len(theta) else None
    kept_first = first
    bar = adam_bar(opts, "learned" + (" + grid" if trace is not None else ""))
    for it in bar:
        if opt is not None:
            opt.zero_grad()
        if trace is not None:
            trace.clear()
        with torch.no_grad() if it == opts.iterations or opt is None else nullcontext():  # no step follows: no graph
            per, x, loss = final(trace)
        value = float(per.mean().sqrt())
        val = None if held is None else float(per[held].mean().sqrt())  # the held-back prompts decide what is kept
        judged = power_mean(per, opts.sample_power) if val is None else val
        bar.set_postfix_str(f"RMSE {value:.4f}" + ("" if val is None else f", held back {val:.4f}"))
        if judged < score:
            score, best, kept_rmse, kept_it, kept_val, kept_grid = judged, value, rmse(x, target), it, val, list(grid)
            kept_first = sampler.first_sigma if lead else None
            rows = [coefs(j) for j in range(steps)]
            kept = ([as_float(ej) for ej, _ in rows], [[as_float(v) for v in bj] for _, bj in rows],
                    [[as_float(v) for v in row] for row in g])
        if (time.perf_counter() - t0 > opts.seconds or it == opts.iterations or (opt is None and trace is None)
                or (held is not None and it - kept_it >= opts.patience)):
            break
        if trace is not None:  # the grid's step, from the derivative at the coefficients the loss was made with
            step, gm, gv = adam_step(grid_gradient(trace), gm, gv, it, opts.lr)
            theta = descending(theta - step, math.log(sampler.sigma_min), hi)  # within (σ_min, the start)
            grid = [grid[0], *(math.exp(v) for v in theta[lead:]), 0.0]
            if lead:
                sampler.first_sigma = math.exp(theta[0])
        if opt is not None:
            loss.backward()
            opt.step()
    bar.close()
    grid = kept_grid
    if lead:  # the file's grid starts at the first evaluation, x_T = σ·ε there (init_noise): e on that x_T
        sampler.first_sigma = kept_first
        grid[0] = kept_first
        kept = ([v / kept_first for v in kept[0]], kept[1], kept[2])
    extra = {"iterations": it, "coefficients": {"e": kept[0], "b": kept[1], **({"g": kept[2]} if terms else {})}}
    if searched is not None:
        extra["grid_search"] = searched
    if held is not None:
        extra.update(kept_iteration=kept_it, validation_rmse=kept_val, validation_samples=int(held.sum()))
    return grid, best, kept_rmse, extra


def validation_mask(groups: Sequence[int], share: float) -> torch.Tensor:
    """The calibration samples held back from ``method=learned``'s gradient (True): those of the last
    ``share`` of the prompts (of the samples, where all share one prompt), so the kept coefficients are the
    ones that carry over to prompts the fit did not see."""
    ids = sorted(set(groups))
    if len(ids) < 2:
        groups, ids = list(range(len(groups))), list(range(len(groups)))
    k = max(1, round(share * len(ids)))
    if k >= len(ids):
        raise ConfigError(f"validation={share}: it holds back all {len(ids)} calibration prompts (samples); "
                          "give a share that leaves some to fit, e.g. validation=0.25")
    back = set(ids[-k:])
    return torch.tensor([g in back for g in groups])


def tpe(sampler: Sampler, teacher: Teacher, steps: int, trials: int, pinned: bool = False,
        objective: str = "latent") -> tuple[list[float], float]:
    """The Optuna baseline: TPE over the sorted interior log σ values, final RMSE to the teacher
    (``pinned``: the last nonzero σ fixed at σ_min)."""
    check_pinned(steps, pinned)
    try:
        import optuna
    except ImportError:
        raise ConfigError("method=tpe needs optuna: pip install 'samplerlab[tune]'") from None
    top, tail = teacher.fine[0], ([sampler.sigma_min] if pinned else [])
    lo, hi = math.log(sampler.sigma_min) + (0.01 if pinned else 0.0), math.log(min(top, sampler.sigma_max))
    loss_of = final_loss(sampler, teacher.x[-1], objective)
    free = steps - 1 - len(tail)

    def grid_of(values: Sequence[float]) -> list[float]:
        inner = sorted((min(max(v, lo), hi - 1e-3) for v in values), reverse=True)
        for k in range(1, len(inner)):  # strictly decreasing
            inner[k] = min(inner[k], inner[k - 1] - 1e-3)
        return [top] + [math.exp(v) for v in inner] + tail + [0.0]

    if free < 1:
        grid = grid_of([])
        return grid, loss_of(sampler.trajectory(grid)[-1].x)

    def objective(trial) -> float:
        values = [trial.suggest_float(f"log_sigma_{k}", lo, hi) for k in range(1, free + 1)]
        return loss_of(sampler.trajectory(grid_of(values))[-1].x)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    best = study.best_params
    return grid_of([best[f"log_sigma_{k}"] for k in range(1, free + 1)]), float(study.best_value)


# --- the command --------------------------------------------------------------------------------

def split_overrides(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """(the tool's options, the samplerlab overrides) of Hydra-style ``key=value`` arguments."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    own_keys = {f.name for f in Options.__dataclass_fields__.values()}
    own, rest = [], []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"'{a}' is not an override: use key=value (e.g. method=gits nfe=[5,6])")
        key = a.split("=", 1)[0].lstrip("+").split(".")[0]
        (own if key in own_keys else rest).append(a)
    try:
        conf = OmegaConf.merge(OmegaConf.structured(Options), OmegaConf.from_dotlist(own))
        opts = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad option: {str(e).strip().splitlines()[0]}") from None
    assert isinstance(opts, Options)
    opts.check()
    return opts, rest


def calibration_overrides(opts: Options, model_is_text: bool) -> list[str]:
    c = opts.calibration
    out = [f"seed={c.seed}", f"num_samples={c.num_samples}", f"batch_size={c.num_samples}", "save_images=false",
           "callback=[]"]
    if model_is_text:
        out.append("prompts=[" + ",".join("'" + p.replace("'", "\\'") + "'" for p in c.prompts) + "]")
    return out


def optimize(opts: Options, overrides: Sequence[str], model: object | None = None,
             log: Callable[[str], None] | None = None, teachers: dict | None = None) -> tuple[dict[str, Any], Path]:
    """Run the optimiser; returns (the schedule file's content, its path). ``model`` (an analytic
    denoiser object) replaces the model group, as in ``api.run``. ``teachers`` (a dict the caller
    keeps) shares teacher trajectories between calls that differ only in solver or method."""
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from framework.entry.compose import compose
    from framework.runs.schedule_file import model_fingerprint, read_schedule_file, write_schedule_file

    say = log or (lambda s: print(s, file=sys.stderr))
    opts.check()
    cfg, choices = compose(list(overrides))
    model_name, solver = choices.get("model", "custom"), choices.get("solver", "")
    if cfg.get("solver") is None:
        raise ConfigError("schedule optimisation needs a solver plugin (a solver that owns its grid has none to optimise)")
    if (opts.method == "learned") != (solver == "learned"):
        raise ConfigError("method=learned fits solver=learned's coefficients (and solver=learned has nothing else to "
                          "optimise): use them together")
    own = {int(n): opts.for_budget(int(n)) for n in opts.nfe}  # each budget's options (``per_nfe``)
    for o in {o.init for o in own.values()} if opts.method in ("ld3", "learned") else ():
        if o not in ("gits", "oss", *STOCK_INITS):
            read_schedule_file(o)  # a missing or damaged init file: refused before the teacher's minutes
    text = model_name not in ("gaussian", "mixture") and model is None
    sampler = Sampler(list(overrides) + calibration_overrides(opts, text), model)
    fingerprint = model_fingerprint(cfg.model) if model is None else "object:" + type(model).__name__
    budgets = [int(n) for n in opts.nfe]
    steps_of = {n: sampler.steps_for_nfe(n) for n in budgets}  # refuses an unreachable budget before any work
    settings = {k: v for k, v in asdict(opts).items() if k in ("fine", "fine_top", "teacher", "teacher_substeps", "teacher_rtol",
                                                                 "iterations", "seconds", "lr", "fd_step", "init", "trials", "history", "start", "final",
                                                                 "objective", "coef_lr", "coef_init", "consistent", "guidance_terms", "validation",
                                                                 "patience", "grid_search", "last_sigma", "sample_power",
                                                                 "learn_grid", "first_sigma", "per_nfe")}
    if not opts.validation:
        settings.pop("patience")
    for key, plain in (("final", "free"), ("objective", "latent"), ("fine_top", None), ("coef_lr", 0.003), ("coef_init", "euler"),
                       ("consistent", False), ("guidance_terms", False), ("validation", 0.0), ("grid_search", 0),
                       ("last_sigma", None), ("sample_power", 2.0), ("learn_grid", False), ("first_sigma", None), ("per_nfe", {})):  # keys only where set: older files still resume
        if settings.get(key) == plain:
            settings.pop(key)
    run_keys = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in ("cfg_scale", "dtype", "guidance", "momentum")}
    head = {"model": {"name": model_name, "fingerprint": fingerprint, "sigma_min": sampler.sigma_min,
                      "sigma_max": sampler.sigma_max},
            "solver": solver, "solver_config": OmegaConf.to_container(cfg.solver, resolve=True), "method": opts.method,
            "calibration": asdict(opts.calibration) if text else {"seed": opts.calibration.seed,
                                                                   "num_samples": opts.calibration.num_samples},
            "settings": settings, "run": run_keys,
            "overrides": [o for o in overrides if not o.lstrip("+~").startswith("device=")]}  # a fit resumes on any device
    out = Path(opts.out) if opts.out else Path("schedules") / f"{model_name}_{solver}_{opts.method}.json"
    grids: dict[str, Any] = {}
    if opts.resume and out.is_file():
        try:
            old = read_schedule_file(out)
        except ConfigError as e:
            say(f"samplerlab-optimize-schedule: {e}; starting afresh")
            old = None
        if old is not None and same_head(old, head):
            grids = dict(old["grids"])  # other budgets stay in the file
            done = sorted((k for k in grids if int(k) in budgets), key=int)
            if done:
                say(f"samplerlab-optimize-schedule: resuming {out}: NFE {', '.join(done)} already done")
        elif old is not None:  # made with other settings: kept beside, not overwritten
            kept = out.with_name(f"{out.stem}.replaced-{str(old.get('checksum', 'old'))[:8]}{out.suffix}")
            out.replace(kept)
            say(f"samplerlab-optimize-schedule: {out} was made with other settings: moved to {kept}")
    todo = [n for n in budgets if str(n) not in grids]
    t_all = time.perf_counter()
    bar = tqdm(todo, desc=f"{opts.method} {solver} on {model_name}", unit="budget", disable=not opts.progress,
               file=sys.stderr)
    made: dict[str, Teacher] = {}  # this call's teachers by their key (a budget's own fine grid or teacher makes its own)
    for n in bar:
        bar.set_postfix_str(f"NFE {n}")
        t0, nfe0 = time.perf_counter(), sampler.nfe
        k, opts = steps_of[n], own[n]
        sigma0, sampler.vp_start = start_of(opts, sampler, k)
        if opts.first_sigma is not None and not math.isinf(sigma0):
            raise ConfigError(f"first_sigma={opts.first_sigma:g} moves the first evaluation of a grid from σ = ∞ (a flow "
                              f"model's t = 1); this model's grids start at σ_max = {sigma0:g}: drop first_sigma (start= "
                              "starts a grid lower)")
        sampler.first_sigma = opts.first_sigma
        key = json.dumps([head["model"], head["calibration"], run_keys, opts.fine, opts.fine_top, opts.teacher,
                          opts.teacher_substeps, opts.teacher_rtol, sigma0, sampler.vp_start,
                          [o for o in overrides if not o.lstrip("+~").startswith("solver")]], sort_keys=True, default=str)
        teacher = made.get(key) or (teachers or {}).get(key)
        if teacher is None:
            high = min(sampler.sigma_max, opts.fine_top or math.inf) if math.isinf(sigma0) else min(sigma0, sampler.sigma_max)
            if not high > sampler.sigma_min:
                raise ConfigError(f"fine_top={opts.fine_top}: the fine grid must start above σ_min = {sampler.sigma_min:g}")
            teacher = make_teacher(sampler, fine_grid(high, sampler.sigma_min, opts.fine, sigma0), opts.teacher,
                                   opts.teacher_substeps, opts.teacher_rtol)
            if teachers is not None:
                teachers[key] = teacher
        made[key] = teacher
        extra: dict[str, Any] = {}
        latent_rmse = None  # learned: its coefficients' final latent RMSE (the solver's own run would be Euler's)
        pinned = opts.final == "sigma_min"
        if opts.method == "gits" and opts.history:
            grid, obj = gits_history(sampler, teacher, k, pinned)
            name = "summed local truncation error with one step of the solver's history (RMS per step)"
        elif opts.method == "gits":
            grid, obj = gits(sampler, teacher, k, pinned)
            name = "summed local truncation error (RMS per step, on the teacher trajectory)"
        elif opts.method == "oss":
            grid, obj = oss(sampler, teacher, k, pinned)
            name = "final RMSE to the teacher (DP over the student's own states)"
        elif opts.method == "ays":
            grid, obj = ays(sampler, teacher, k, opts.iterations)
            name = "summed KLUB of the Euler steps"
        elif opts.method == "tpe":
            grid, obj = tpe(sampler, teacher, k, opts.trials, pinned, opts.objective)
            name = "final RMSE to the teacher (Optuna TPE)"
        elif opts.method == "learned":
            grid, obj, latent_rmse, extra = learned(sampler, teacher, k, opts, n)
            name = OBJECTIVE_NAMES[opts.objective] + " (learned coefficients)"
        else:
            grid, obj, its = ld3(sampler, teacher, k, opts, n)
            name, extra = OBJECTIVE_NAMES[opts.objective], {"iterations": its}
        final = latent_rmse if latent_rmse is not None else rmse(sampler.trajectory(grid)[-1].x, teacher.x[-1])
        grids[str(n)] = {"nfe": n, "steps": k, "sigmas": [float(s) for s in grid], "init_noise": sampler.init_scale(grid[0]),
                         "objective": float(obj),
                         "objective_name": name, "calibration_rmse_to_teacher": final,
                         "seconds": round(time.perf_counter() - t0, 2), "device": str(sampler.run.device),  # where the seconds were spent
                         "optimiser_nfe": sampler.nfe - nfe0, **extra}
        content = {**head, "teacher_nfe": sum(t.nfe for t in made.values()),
                   "teacher_seconds": sum(t.seconds for t in made.values()), "grids": dict(sorted(grids.items(), key=lambda kv: int(kv[0])))}
        write_schedule_file(out, content)
    content = read_schedule_file(out) if out.is_file() else {**head, "grids": grids}
    content["seconds_this_call"] = round(time.perf_counter() - t_all, 2)
    if opts.plot:
        plot_grids(content, sampler.model, out.with_suffix(".png"))
    return content, out


def start_of(opts: Options, sampler: Sampler, steps: int) -> tuple[float, bool]:
    """(σ_0, whether x_T = √(1+σ_0²)·ε) of a ``steps``-step grid: the model's σ_max with x_T = σ_max·ε
    (default), a given σ_0, or ``leading``: the σ_0 and start noise of diffusers' ``leading`` timestep
    spacing for that step count (``schedule=uniform schedule.spacing=leading``; a grid that starts
    below σ_max, as the model's own scheduler does), so the optimiser may choose the same start;
    ``leading:<K>``: the start of the ``leading`` grid of K steps whatever the budget's step count
    (e.g. the later start of a shorter stock grid)."""
    if opts.start is None:
        return sampler.top, False
    if str(opts.start).startswith("leading:"):
        steps = int(str(opts.start)[8:])
    elif opts.start != "leading":
        return min(float(opts.start), sampler.sigma_max), False
    from framework.core.registry import instantiate
    from framework.entry.compose import compose

    node = compose(["schedule=uniform", "schedule.spacing=leading"])[0].schedule
    sched = instantiate(node, "schedule=uniform").schedule(model=sampler.model, steps=steps)
    s0 = float(sched.sigmas[0])
    return s0, not math.isclose(float(sched.init_noise_scale), s0, rel_tol=1e-9)


def leading_grid(model: object, steps: int) -> list[float]:
    """diffusers' ``leading`` grid of ``steps`` steps (``schedule=uniform schedule.spacing=leading``)."""
    from framework.core.registry import instantiate
    from framework.entry.compose import compose

    node = compose(["schedule=uniform", "schedule.spacing=leading"])[0].schedule
    return [float(v) for v in instantiate(node, "schedule=uniform").schedule(model=model, steps=steps).sigmas]


def stock_grid(name: str, model: object, steps: int) -> list[float]:
    """The σ grid of schedule plugin ``name`` (with its defaults) for ``steps`` steps."""
    from framework.core.registry import instantiate
    from framework.entry.compose import compose

    node = compose([f"schedule={name}"])[0].schedule
    return list(instantiate(node, f"schedule={name}").schedule(model=model, steps=steps).sigmas)


def plot_grids(content: dict[str, Any], model: object, path: Path) -> None:
    """Each budget's optimised grid (log σ against step index) beside karras and AYS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = content["grids"]
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.2), squeeze=False, sharey=True)
    for ax, (n, g) in zip(axes[0], sorted(grids.items(), key=lambda kv: int(kv[0]))):
        for label, sig, style in ((f"{content['method']}", g["sigmas"], dict(color="C3", marker="o", linewidth=2)),
                                  ("karras", stock_grid("karras", model, g["steps"]), dict(color="C0", marker=".")),
                                  ("ays", stock_grid("ays", model, g["steps"]), dict(color="C2", marker=".", linestyle="--"))):
            s = [v for v in sig if v > 0]
            first = int(math.isinf(s[0])) if s else 0  # a grid from σ = ∞: its finite points, at their step index
            ax.semilogy(range(first, len(s)), s[first:], label=label, **style)
        ax.set_title(f"NFE {n} ({g['steps']} steps)", fontsize=9)
        ax.set_xlabel("step index i", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("σ_i (final 0 not drawn)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{content['method']} grids for {content['solver']} on {content['model']['name']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-optimize-schedule [key=value …]``: 0 on success, 2 (one line) on a bad input."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    from framework.entry.quiet import quiet_libraries

    try:
        opts, overrides = split_overrides(args)
        with quiet_libraries():
            content, out = optimize(opts, overrides)
    except SamplerlabError as e:
        print(f"samplerlab-optimize-schedule: error: {e}", file=sys.stderr)
        return 2
    rows = ", ".join(f"NFE {n}: {g['calibration_rmse_to_teacher']:.3g}" for n, g in content["grids"].items())
    print(f"samplerlab-optimize-schedule: {content['method']} grids for {content['solver']} -> {out} "
          f"(calibration RMSE to the teacher: {rows}; {content['seconds_this_call']:.1f} s)")
    return 0


def run() -> None:  # console-script shim
    raise SystemExit(main())


if __name__ == "__main__":
    run()
