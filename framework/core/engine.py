"""The sampling loop: the only code that calls the per-step hooks.

```
run   = open_run(cfg)                               # plugins built; configure, schedule, run_start
cond  = conditioning(model.encode(prompts))         # chain, config order (per batch)
batch_start(batch)                                  # all, config order
x     = init_latents(schedule, noise(seed, k))      # at most one plugin; default σ₀-scaled noise
for i in range(N):
    before_step(state)                              # all, config order
    state.pred = denoise(x, σ_i) → momentum         # predict → guidance (every evaluation), then
                                                    #   momentum (the step's first evaluation only)
    x_next = step(state, denoise)                   # exactly one (from σ = ∞: its limit form)
    after_step(state, x_next)                       # all, config order
close_run(run, result)                              # run_end, config order
```
``denoise`` is :class:`framework.core.step.Denoiser` (one NFE per evaluation, counted there).
Gradients are off except inside the guidance calls of plugins that requested them. Batches, run
folders, timings and the record are the caller's (:mod:`framework.runs.execute`).

A grid may start at σ = ∞ (a flow model's t = 1). The state there is the unit noise ε (x/σ in the
limit); the model is evaluated there as anywhere else, and the step to σ₁ is the limit of the
solver's own first step, the only step defined from ∞ in σ-space: x₁ = D + σ₁·ε for every ODE
solver (DDIM's form, what FlowMatchEuler does), or the solver's ``step_from_infinity(state)``
where its limit differs (ancestral and SDE solvers add fresh noise). Momentum plugins do not act on
that step, and multistep history starts after it (``SamplerState.history``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig

from framework.core import graphstep, hookspecs
from framework.core.errors import ConfigError, call
from framework.core.finite import NonFinite
from framework.core.model import Model
from framework.core.noise import SampleNoise
from framework.core.registry import build_plugins
from framework.core.run import Hooks, Result, Run
from framework.core.settings import read_settings
from framework.core.state import Batch, Conditioning, Schedule, StepRecord
from framework.core.step import Denoiser, SamplerState


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device '{name}': use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    return device


def open_run(
    cfg: DictConfig,
    choices: dict[str, str],
    wrap_model: Callable[[object], Model],
    model: Model | None = None,
    builtins: tuple[tuple[str, object], ...] = (),
) -> Run:
    """Build the plugins of a composed config and make them ready to sample: the model on its
    device, ``configure`` (declarations and checks), the grid (``schedule``, ``adjust_schedule``),
    the per-step hooks resolved, ``run_start``."""
    settings = read_settings(cfg)
    device = resolve_device(settings.device)
    plugins = build_plugins(cfg, choices, hookspecs, wrap_model, model, builtins)
    run = Run(cfg, settings, plugins, device)
    run.model.setup(device, run.dtype)
    run.model.prepare_network(compile=bool(settings.compile), mode=settings.compile_mode, channels_last=settings.channels_last)
    for name, fn in plugins.calls("configure"):
        call(name, "configure", fn, run=run)
    run.hooks = Hooks(
        before_step=plugins.calls("before_step"),
        after_step=plugins.calls("after_step"),
        momentum=plugins.calls("momentum"),
        guidance=[(name, fn, run.wants_grad(fn.__self__)) for name, fn in plugins.calls("guidance")],
        predict=plugins.one("predict"),
        step=plugins.one("step"),
    )
    name, fn = plugins.one("schedule")
    try:
        schedule = call(name, "schedule", fn, model=run.model, steps=settings.steps)
    except ConfigError as e:  # the plugin's message, under the preset name the user chose
        raise ConfigError(f"schedule={name}: {e}") from e
    for name, fn in plugins.calls("adjust_schedule"):
        schedule = call(name, "adjust_schedule", fn, run=run, schedule=schedule)
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"the schedule plugins returned {type(schedule).__name__}, not a Schedule")
    run.model.prepare_schedule(schedule)
    run.schedule = schedule
    if settings.compile == "step":  # the whole step in one graph, where its plugins allow
        graphstep.install(run)
    for name, fn in plugins.calls("run_start"):
        call(name, "run_start", fn, run=run)
    return run


def new_batch(run: Run, indices: list[int]) -> Batch:
    """The batch of global sample ``indices``: its prompts' conditioning and per-sample noise."""
    s = run.settings
    assert run.schedule is not None
    top = max(sig for sig in run.schedule.sigmas if math.isfinite(sig))
    until = 2 * top + 1 if s.noise == "brownian" else None  # room for churn
    noise = SampleNoise(s.seed, indices, run.model.latent_shape, run.device, run.dtype, until)
    return Batch(indices=indices, cond=condition(run, [s.prompts[k % len(s.prompts)] for k in indices]), noise=noise)


def condition(run: Run, prompts: list[str]) -> Conditioning | None:
    """The model's encoding of ``prompts`` (and of the negative prompt, in one text-encoder call,
    when a plugin requested the unconditional pass), edited by the ``conditioning`` chain."""
    if not run.model.is_conditional:
        return None
    if not run.needs_uncond:
        cond = Conditioning(prompts=prompts, tensors=run.model.encode_prompts(prompts))
    else:
        negative = [run.settings.negative_prompt] * len(prompts)
        both = run.model.encode_prompts(prompts + negative)
        n = len(prompts)
        cond = Conditioning(prompts=prompts, tensors={k: v[:n] for k, v in both.items()},
                            negative_prompts=negative, uncond={k: v[n:] for k, v in both.items()})
    for name, fn in run.plugins.calls("conditioning"):
        cond = call(name, "conditioning", fn, run=run, cond=cond)
    return cond


@torch.no_grad()
def sample_batch(run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the loop for one batch; returns (x_T, x at the last σ)."""
    hooks, schedule = run.hooks, run.schedule
    assert hooks is not None and schedule is not None and batch.noise is not None
    for name, fn in run.plugins.calls("batch_start"):
        call(name, "batch_start", fn, run=run, batch=batch)
    init = run.plugins.optional("init_latents")
    noise = batch.noise.draw()
    x = noise * schedule.init_noise_scale if init is None else call(
        init[0], "init_latents", init[1], run=run, batch=batch, schedule=schedule, noise=noise)
    x_T = x
    watch = batch.stash.get(NonFinite, lambda: NonFinite(len(batch.indices), x.device)) if run.finite_checks else None
    denoiser = (Denoiser if run.step_capture is None else graphstep.GraphDenoiser)(run, batch)
    step_name, step = hooks.step
    for i in range(schedule.steps):
        state = SamplerState(run=run, batch=batch, index=i, x=x, sigma=schedule.sigmas[i], schedule=schedule,
                             denoise=denoiser)
        denoiser.state = state
        for name, fn in hooks.before_step:
            call(name, "before_step", fn, state=state)
            if watch is not None:
                watch.check(state.x, i, state.sigma, "before_step", name)
        pred = state.guided = denoiser.evaluate(state.x, state.sigma)
        # the step from σ = ∞ is the solver's limit step, not a direction momentum could re-weight
        for name, fn in hooks.momentum if math.isfinite(state.sigma) else ():
            pred = call(name, "momentum", fn, state=state, pred=pred)
            if watch is not None:
                watch.check(pred.denoised, i, state.sigma, "momentum", name)
        state.pred, state.x = pred, pred.x
        if math.isinf(state.sigma):
            x_next = call(step_name, "step_from_infinity", from_infinity(step), state=state)
        else:
            x_next = call(step_name, "step", step, state=state, denoise=denoiser)
        if watch is not None:
            watch.check(x_next, i, state.sigma, "step", step_name)
        for name, fn in hooks.after_step:
            call(name, "after_step", fn, state=state, x_next=x_next)
        batch.history.append(
            StepRecord(i, state.sigma, state.sigma_next, state.x, state.guided.denoised, pred.denoised, x_next))
        x = x_next
    return x_T, x


def from_infinity(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The solver's step from σ = ∞: its ``step_from_infinity`` method, else the ODE limit
    x₁ = D + σ₁·ε (the state at ∞ is the unit noise ε)."""
    return getattr(step.__self__, "step_from_infinity", None) or (
        lambda state: state.pred.denoised + state.sigma_next * state.pred.x)


def adjust_images(run: Run, batch: Batch, images: torch.Tensor) -> torch.Tensor:
    """A batch's decoded images through the ``adjust_images`` chain, clamped to [0, 1]."""
    for name, fn in run.plugins.calls("adjust_images"):
        images = call(name, "adjust_images", fn, run=run, batch=batch, images=images)
    return images.clamp(0, 1)


def end_batch(run: Run, batch: Batch, latents: torch.Tensor, images: torch.Tensor | None) -> None:
    for name, fn in run.plugins.calls("batch_end"):
        call(name, "batch_end", fn, run=run, batch=batch, latents=latents, images=images)


def close_run(run: Run, result: Result) -> None:
    for name, fn in run.plugins.calls("run_end"):
        call(name, "run_end", fn, run=run, result=result)
