"""Any diffusers scheduler, by class name, run inside the engine (``solver=diffusers``).

The solver owns the schedule role (``owns_schedule = True``): the σ grid, the model timesteps and
the initial noise scale are the scheduler's own, after ``set_timesteps(steps)``. Each engine step
converts the σ-space state x = x0 + σ·ε into the scheduler's sample space, hands it the noise
estimate ε = (x − D)/σ (``prediction_type`` is forced to ``epsilon``: the model adapter already
turned the model's parametrisation into D) and calls ``scheduler.step``.

Sample spaces: schedulers that scale their model input (``scale_model_input`` ≠ identity: Euler,
Euler ancestral, Heun, LMS, KDPM2) work in σ-space (y = x); the others (DDIM, DDPM, PNDM, DPM-Solver
multistep/singlestep, UniPC, DEIS) work in the variance-preserving frame y = x/√(1 + σ²).

The grid: the scheduler's timesteps are replayed once on a dummy sample to learn, for each
scheduler call, the σ at which it evaluates the model (σ-space schedulers: the one of
``sigmas[step_index]`` or KDPM2's midpoints ``sigmas_interpol`` whose input scale 1/√(σ² + 1)
``scale_model_input`` applies; VP schedulers: ``sigmas[i]`` when they keep one
σ per timestep, else √((1 − ᾱ_t)/ᾱ_t)), and the σ its last call lands on (``sigmas[-1]``, DDIM/PNDM's
final alpha, DDPM's ᾱ = 1). A call that starts a new grid interval is an engine step; the calls
that do not (Heun's and KDPM2's second stage, PNDM's warm-up correction at the first step, PNDM's
Runge–Kutta stages without ``skip_prk_steps``) are
made inside the same engine step with one ``denoise`` each, so NFE is the number of UNet
evaluations diffusers makes (Heun 2N − 1, PNDM N + 1) and the engine advances one interval per
step.

Models: a diffusers model (``model.pipe``) gives its own scheduler config; any other model
(analytic ones) gets Stable Diffusion's (1000 steps, scaled-linear β 0.00085–0.012,
``steps_offset`` 1), i.e. SD's discretisation applied to that denoiser. ``config`` overrides are
passed to ``from_config``.

Noise: stochastic schedulers (ancestral, DDPM, SDE variants using ``generator``) receive the
engine's per-sample generators (one per sample, seeded by (seed, sample index)); diffusers then
draws each sample's noise from its own generator, so same seed → same output and sample k's noise
does not depend on the batch. Schedulers that draw noise otherwise (DPMSolverSDEScheduler's
Brownian tree) are not batch-invariant.

Precision: the arithmetic is diffusers' own (its σ/ᾱ tables are float32, Euler-type steps upcast
to float32), so float64 runs are float32-accurate; the state round-trips x ↔ y with the same σ.

Flow models (SD3, Flux, ``parametrization=flow``): the flow schedulers — FlowMatchEulerDiscrete,
FlowMatchHeunDiscrete, and the multistep ones with ``use_flow_sigmas`` (DPMSolverMultistep,
UniPCMultistep, DEIS, DPMSolverSinglestep, SA-Solver: ``use_flow_sigmas=true``,
``prediction_type=flow_prediction`` and the checkpoint's static shift as ``flow_shift`` are set for
them, ``solver.config`` overrides) — work in the flow frame x_t = y/(1 + σ) and receive the velocity
v = (x_t − D)/t. Their grid is set as the model's pipeline sets it (``mu`` of a dynamically shifted
config; Flux's ``sigmas = linspace(1, 1/N, N)`` where the scheduler takes them); it may start at
t = 1 (σ = ∞), where the first step is the scheduler's own; the initial latents are the unit noise at
t₀, y = (1 + σ₀)·ε. Integer timesteps (the multistep schedulers give int64 ones: the network sees
⌊1000·t⌋ while the update uses t) travel with the grid as model times, so the network sees the same
rounded time. FlowMatchHeun is Heun in t (2N − 1 evaluations), a different method from ``solver=heun``
(Heun in σ, which cannot step from ∞). VP schedulers on a flow model are refused.

Consistency schedulers: LCMScheduler and TCDScheduler are VP schedulers like DDIM (ε in, their
boundary scalings / γ inside); LCM's last step lands on its x̂₀ (σ = 0), TCD's on σ(t = 0); TCD's γ is a
``step`` argument: ``+solver.step_kwargs={eta:0.3}`` (any ``step_kwargs`` go to every ``step`` call).
FlowMatchLCMScheduler runs on flow models like the other FlowMatch schedulers.

EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) work in σ-space on EDM's
preconditioned network output F, D = c_skip·x + c_out·F (σ_data from their config): they receive
F = (D − c_skip·x)/c_out, their σ range is the model's (``sigma_min``/``sigma_max`` unless
``solver.config`` sets them), and their timesteps (EDM's c_noise = ¼·log σ) are not model times, so the
model time of each σ is the engine's (log-σ interpolation on discrete models).

Not supported (one ConfigError line saying why, ``REFUSED`` and the checks below): inverse schedulers
(data → noise), OpenAI consistency models' CMStochasticIterative (c_out = 0 at σ_min), schedulers of
discrete tokens or other domains, schedulers whose ``step`` needs more than one model output (RePaint's
image and mask, CogVideoX-DPM's previous x̂₀), VP schedulers on flow models and flow schedulers on VP
models (their grids start at t = 1 = σ = ∞ with a shift made for a flow model), any other scheduler with
neither a discrete ᾱ table, an EDM form nor a flow mode, and before-step plugins (churn moves a step's
σ; the scheduler's state is tied to its own grid). Momentum plugins reject this solver themselves;
guidance plugins apply to every evaluation as usual. docs/solvers.md lists every diffusers class.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from framework.plugin import (
    ConfigError, FlowModel, SamplerState, Schedule, calculate_shift, flow_config, flow_sigma, flow_time, hookimpl, sigma_to_t,
)

#: Stable Diffusion's scheduler config, used for models that bring none.
SD_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)
EXAMPLES = ("EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
            "HeunDiscreteScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler")
#: Schedulers refused up front, by name (a substring of the class name), with the reason.
REFUSED = {
    "Inverse": "it runs the ODE from data to noise (inversion); samplerlab samples from noise",
    "CMStochasticIterative": "it drives OpenAI consistency models, whose boundary scaling c_out is 0 at σ_min, "
                             "so a denoiser's D cannot be handed to it; use solver=lcm or solver=tcd",
    "Amused": "it decodes masked VQ tokens (MaskGIT), not latents along a σ grid",
    "VQDiffusion": "it denoises discrete VQ tokens, not latents along a σ grid",
    "BlockRefinement": "it commits discrete tokens (masked-token text diffusion), not latents along a σ grid",
    "EntropyBound": "it samples discrete tokens (uniform corruption), not latents along a σ grid",
    "DiscreteDDIM": "it denoises discrete tokens (D3PM uniform corruption), not latents along a σ grid",
    "RFD4Proteina": "it samples protein structures (coordinates and frames), not image latents",
    "ScoreSdeVe": "its predictor-corrector API (step_pred, step_correct) takes a score, not one step per evaluation",
    "KarrasVe": "its deprecated API takes the churned σ̂ from add_noise_to_input; use solver=heun callback=[churn]",
}
#: How the last call of a consistency scheduler lands: LCM on its x̂₀ (σ = 0), TCD on σ(t = 0).
CONSISTENCY_FINAL = ("LCMScheduler", "TCDScheduler")
FLOW_EXAMPLES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "UniPCMultistepScheduler")


def _scheduler_class(name: str) -> type:
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"solver.scheduler '{name}' is not a diffusers scheduler class: {hint}"
                          f"e.g. {', '.join(EXAMPLES[:5])}")
    for bad, why in REFUSED.items():
        if bad in name:
            raise ConfigError(f"solver.scheduler '{name}' is not supported by solver=diffusers: {why}")
    params = inspect.signature(cls.step).parameters.values()
    extra = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
             and p.name not in ("self", "model_output", "timestep", "sample")]
    if extra:
        raise ConfigError(f"solver.scheduler '{name}' is not supported by solver=diffusers: its step() needs "
                          f"{', '.join(extra)} besides one model output; use e.g. {', '.join(EXAMPLES[:3])}")
    return cls


def _is_edm(sch: Any) -> bool:
    """An EDM-preconditioned σ-space scheduler (EDMEuler, EDMDPMSolverMultistep)."""
    return hasattr(sch, "precondition_outputs") and "sigma_data" in sch.config


def _vp_sigma(alpha_cumprod: float) -> float:
    return math.sqrt(max(1.0 - alpha_cumprod, 0.0) / alpha_cumprod)


@dataclass(frozen=True)
class Plan:
    """What the scheduler does for a given step count: per scheduler call its timestep, the σ of its
    model evaluation and whether it starts an engine step; the σ its last call lands on."""

    timesteps: tuple[float, ...]
    eval_sigmas: tuple[float, ...]
    starts: tuple[int, ...]  # scheduler call index that opens each engine step
    final_sigma: float
    sigma_space: bool
    init_noise_sigma: float
    flow: bool = False  # a flow scheduler: the sample is x_t = y/(1 + σ), the model output v
    model_times: tuple[float | None, ...] | None = None  # per call, the grid's model time (flow: None or a table index)
    sigma_data: float | None = None  # an EDM scheduler: its output is EDM's F, D = c_skip·x + c_out·F

    def schedule(self) -> Schedule:
        sig = [self.eval_sigmas[j] for j in self.starts] + [self.final_sigma]
        times = self.model_times if self.model_times is not None else self.timesteps
        ts = [times[j] for j in self.starts] + [None]
        if self.flow:  # diffusers starts from the unit noise at t₀: y = ε/(1 − t₀)
            scale = 1.0 if math.isinf(sig[0]) else 1 + sig[0]
        else:
            scale = self.init_noise_sigma if self.sigma_space else self.init_noise_sigma / _vp(sig[0])
        return Schedule(tuple(sig), tuple(ts), scale)

    def to_sample(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The scheduler's sample of the σ-space state x (at σ = ∞ the state is the unit noise, x_t itself)."""
        if self.flow:
            return x if math.isinf(sigma) else x / (1 + sigma)
        return x if self.sigma_space else x * _vp(sigma)

    def from_sample(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.flow:
            return y if math.isinf(sigma) else y * (1 + sigma)
        return y if self.sigma_space else y / _vp(sigma)

    def output(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """What the scheduler takes as model output: v = (x_t − D)/t (flow), else ε = (x − D)/σ."""
        if self.flow:
            x_t = self.to_sample(x, sigma)
            return (x_t - denoised) / flow_time(sigma)
        if self.sigma_data is not None:  # EDM: F = (D − c_skip·x)/c_out
            sd2 = self.sigma_data**2
            c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.sigma_data / math.sqrt(sigma**2 + sd2)
            return (denoised - c_skip * x) / c_out
        return (x - denoised) / sigma


def _vp(sigma: float) -> float:
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


@dataclass
class Trajectory:
    """One batch's scheduler and where it stands."""

    scheduler: Any
    plan: Plan
    generators: Any
    takes_generator: bool
    call: int = 0  # next scheduler call


@dataclass
class Diffusers:
    """Run diffusers' ``scheduler`` class (by name) with ``config`` overrides inside the engine."""

    scheduler: str = "EulerDiscreteScheduler"
    config: dict[str, Any] = field(default_factory=dict)
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of every step() (TCD's eta)

    owns_schedule = True

    def __post_init__(self) -> None:
        self._cls = _scheduler_class(self.scheduler)

    # -- building --------------------------------------------------------------------------------
    def _make(self, model: Any, steps: int, device: torch.device | str = "cpu") -> Any:
        if isinstance(model, FlowModel):
            return self._make_flow(model, steps, device)
        if self.scheduler.startswith("FlowMatch"):
            raise ConfigError(f"solver.scheduler '{self.scheduler}' is not supported on this model: a flow-matching scheduler "
                              "needs a flow model (model=sd3, flux, or parametrization=flow)")
        pipe = getattr(model, "pipe", None)
        base = dict(pipe.scheduler.config) if pipe is not None else dict(SD_CONFIG)
        overrides = dict(self.config)
        overrides["prediction_type"] = "epsilon"  # the adapter gives D; we hand the scheduler ε (EDM: F)
        if "sigma_data" in inspect.signature(self._cls.__init__).parameters:  # EDM: the model's σ range unless set
            overrides = {"sigma_min": float(model.sigma_min), "sigma_max": float(model.sigma_max), **overrides}
        sch = self._build(base, overrides)
        if getattr(sch, "alphas_cumprod", None) is None and not _is_edm(sch):
            raise ConfigError(f"solver.scheduler '{self.scheduler}' is not supported by solver=diffusers: it has neither "
                              "a discrete ᾱ table (VP), an EDM σ-space form nor a flow mode, so its maths does not map "
                              f"to σ-space here; use e.g. {', '.join(EXAMPLES[:3])}")
        try:
            sch.set_timesteps(steps, device=device)
        except ValueError as e:  # e.g. LCM: more steps than its original_inference_steps
            raise ConfigError(f"solver.scheduler '{self.scheduler}': {' '.join(str(e).split())}") from e
        return sch

    def _build(self, base: dict[str, Any], overrides: dict[str, Any]) -> Any:
        try:
            return self._cls.from_config(base, **overrides)
        except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
            raise ConfigError(f"solver=diffusers: cannot build {self.scheduler} from config ({e})") from e

    def _make_flow(self, model: Any, steps: int, device: torch.device | str) -> Any:
        """A flow scheduler for a flow model, its grid set as the model's pipeline sets it."""
        base = dict(getattr(model, "scheduler_config", None) or flow_config(None))
        flow_match = self.scheduler.startswith("FlowMatch")
        overrides: dict[str, Any] = {} if flow_match else dict(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=float(base["shift"]))
        sch = self._build(base, {**overrides, **self.config})
        if not flow_match and not (sch.config.get("use_flow_sigmas") and sch.config.get("prediction_type") == "flow_prediction"):
            raise ConfigError(f"solver.scheduler '{self.scheduler}' has no flow mode (use_flow_sigmas with flow_prediction) for "
                              f"this flow model: use e.g. {', '.join(FLOW_EXAMPLES)}")
        accepts = inspect.signature(sch.set_timesteps).parameters
        kwargs: dict[str, Any] = {}
        if sch.config.get("use_dynamic_shifting") and "mu" in accepts:
            seq = model.image_seq_len() if hasattr(model, "image_seq_len") else None
            if seq is None:
                raise ConfigError(f"solver.scheduler '{self.scheduler}' with use_dynamic_shifting needs a model with an image "
                                  "size (μ counts its tokens)")
            cfg = sch.config
            kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift") or getattr(model, "max_shift_fallback", 1.15))
        if getattr(model, "flow_grid", "default") == "linspace" and flow_match and "sigmas" in accepts:
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)      # the Flux pipeline's request
            sch.set_timesteps(device=device, **kwargs)
        else:
            sch.set_timesteps(steps, device=device, **kwargs)
        return sch

    def _plan(self, model: Any, steps: int, device: torch.device | str = "cpu") -> tuple[Plan, Any]:
        """Replay the scheduler (on the CPU) on a dummy sample to learn its evaluation σ's and
        grouping; returns the plan and a fresh scheduler for ``device`` (copied before the replay:
        some schedulers build slowly)."""
        sch = self._make(model, steps)
        fresh = copy.deepcopy(sch) if torch.device(device).type == "cpu" else self._make(model, steps, device)
        if isinstance(model, FlowModel):
            return self._flow_plan(model, sch, steps), fresh
        ts = [float(t) for t in sch.timesteps]
        m = len(ts)
        y = torch.zeros(1, 1, 1, 1)
        probe = sch.scale_model_input(torch.ones_like(y), sch.timesteps[0])
        sigma_space = not torch.equal(probe, torch.ones_like(probe))
        sigmas = getattr(sch, "sigmas", None)
        per_call = sigmas is not None and len(sigmas) == m + 1
        ac = sch.alphas_cumprod.double() if getattr(sch, "alphas_cumprod", None) is not None else None
        gen = torch.Generator().manual_seed(0)
        takes_gen = "generator" in inspect.signature(sch.step).parameters
        evals, second = [], []
        for j, t in enumerate(sch.timesteps):
            sch.scale_model_input(y, t)
            evals.append(self._eval_sigma(sch, j, t, sigma_space, per_call, ac))
            second.append(not getattr(sch, "state_in_first_order", True))
            kw = {"generator": gen} if takes_gen else {}
            y = sch.step(torch.zeros_like(y), t, y, **kw, **self.step_kwargs).prev_sample
        if type(sch).__name__ == "LCMScheduler":  # its last call returns x̂₀
            final = 0.0
        elif type(sch).__name__ == "TCDScheduler":  # its last call lands on timestep 0
            final = _vp_sigma(float(ac[0]))
        elif sigma_space or per_call:
            final = float(sigmas[-1])
        elif getattr(sch, "final_alpha_cumprod", None) is not None:
            final = _vp_sigma(float(sch.final_alpha_cumprod))
        else:  # DDPM: the last step lands on ᾱ = 1
            final = 0.0
        # a call opens an engine step unless it is a second stage, or it re-evaluates the σ the next
        # call evaluates (PNDM's warm-up correction)
        starts = [j for j in range(m) if not second[j] and not (j + 1 < m and evals[j] == evals[j + 1])]
        base = getattr(sch, "_timesteps", None)  # PNDM's N step timesteps: its Runge–Kutta warm-up
        if len(starts) != steps and base is not None and len(base) == steps and not sigma_space:  # has midpoints
            grid = {_vp_sigma(float(ac[int(t)])) for t in base}
            starts = [j for j in starts if evals[j] in grid]
        edm = _is_edm(sch)
        plan = Plan(tuple(ts), tuple(evals), tuple(starts), final, sigma_space, float(sch.init_noise_sigma),
                    model_times=(None,) * m if edm else None,  # EDM's timesteps are c_noise, not model times
                    sigma_data=float(sch.config.sigma_data) if edm else None)
        return plan, fresh

    @staticmethod
    def _flow_plan(model: Any, sch: Any, steps: int) -> Plan:
        """A flow scheduler's plan: call j evaluates at t = sigmas[j] (σ = t/(1 − t)); second stages
        (FlowMatchHeun's) do not open an engine step; integer timesteps become table indices."""
        ts = [float(t) for t in sch.timesteps]
        evals = [flow_sigma(float(sch.sigmas[j])) for j in range(len(ts))]
        y = torch.zeros(1, 1, 1, 1)
        takes_gen = "generator" in inspect.signature(sch.step).parameters
        gen = torch.Generator().manual_seed(0)
        second = []
        for t in sch.timesteps:
            second.append(not getattr(sch, "state_in_first_order", True))
            y = sch.step(torch.zeros_like(y), t, y, **({"generator": gen} if takes_gen else {})).prev_sample
        starts = tuple(j for j in range(len(ts)) if not second[j])
        if len(starts) != steps:
            raise ConfigError(f"solver.scheduler '{type(sch).__name__}' makes {len(starts)} steps of {steps}: not supported")
        table = getattr(model, "train_sigmas", None)
        times: list[float | None] = [None] * len(ts)
        if table is not None and not torch.is_floating_point(sch.timesteps):   # a rounded network time
            table = np.asarray(table, dtype=np.float64)
            for j, t in enumerate(ts):
                s = flow_sigma(t / sch.config.num_train_timesteps)
                if s < table[-2]:
                    times[j] = sigma_to_t(s, table)
        return Plan(tuple(ts), tuple(evals), starts, flow_sigma(float(sch.sigmas[-1])), False, 1.0, True, tuple(times))

    @staticmethod
    def _eval_sigma(sch: Any, j: int, t: Any, sigma_space: bool, per_call: bool, ac: torch.Tensor) -> float:
        if sigma_space:
            # the σ whose input scale 1/√(σ² + 1) scale_model_input applies: among the scheduler's
            # candidates (KDPM2 and KDPM2-ancestral index their midpoints differently)
            k = sch.step_index if getattr(sch, "step_index", None) is not None else j
            scale = float(sch.scale_model_input(torch.ones(1), t))
            cands = [float(sch.sigmas[k])]
            mids = getattr(sch, "sigmas_interpol", None)
            if mids is not None:
                cands += [float(mids[k]), float(mids[k - 1])] if k > 0 else [float(mids[k])]
            if getattr(sch, "mid_point_sigma", None) is not None:
                cands.append(float(sch.mid_point_sigma))
            return min(cands, key=lambda c: abs(1 / math.sqrt(1 + c * c) - scale))
        if per_call:
            return float(sch.sigmas[j])
        return _vp_sigma(float(ac[int(t)]))

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def configure(self, run: Any) -> None:
        movers = [name for name, _ in run.plugins.calls("before_step")]
        if movers:
            raise ConfigError(f"solver=diffusers cannot follow before-step plugins ({', '.join(movers)}): a diffusers "
                              "scheduler's state is tied to its own grid; remove them (e.g. callback=[])")

    @hookimpl
    def schedule(self, model: Any, steps: int) -> Schedule:
        return self._plan(model, steps)[0].schedule()

    def _trajectory(self, state: SamplerState) -> Trajectory:
        run = state.run
        plan, sch = self._plan(run.model, run.settings.steps, run.device)
        if plan.schedule().sigmas != state.schedule.sigmas:
            raise ConfigError("solver=diffusers runs on its own grid: remove plugins that change the schedule")
        takes_gen = "generator" in inspect.signature(sch.step).parameters
        return Trajectory(sch, plan, state.batch.noise.generators, takes_gen)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        tr = state.stash.get(self, lambda: self._trajectory(state))
        plan, sch = tr.plan, tr.scheduler
        j = plan.starts[state.index]
        if tr.call != j or state.sigma != plan.eval_sigmas[j]:
            raise ConfigError("solver=diffusers: the step's σ was moved (churn?) or a step was skipped; "
                              "diffusers schedulers cannot follow that")
        end = plan.starts[state.index + 1] if state.index + 1 < len(plan.starts) else len(plan.timesteps)
        pred = state.pred
        x, sigma = pred.x, state.sigma
        out = plan.output(x, pred.denoised, sigma)
        kw = {"generator": tr.generators} if tr.takes_generator else {}
        kw.update(self.step_kwargs)
        while True:
            t = sch.timesteps[j]
            y = plan.to_sample(x, sigma)
            if hasattr(sch, "scale_model_input"):
                sch.scale_model_input(y, t)
            y = sch.step(out.to(y.dtype), t, y, **kw).prev_sample.to(x.dtype)
            j += 1
            sigma = plan.eval_sigmas[j] if j < len(plan.timesteps) else plan.final_sigma
            x = plan.from_sample(y, sigma)
            if j == end:
                break
            out = plan.output(x, denoise(x, sigma).denoised, sigma)
        tr.call = j
        return x

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        """A flow scheduler's grid may start at t = 1 (σ = ∞): its first step is its own."""
        return self.step(state, state.denoise)
