"""Every hook of samplerlab: signatures, semantics and who answers.

Four kinds of semantics:

- **exactly one** — one plugin answers (the model adapter for ``predict``, the solver for ``step``,
  the schedule for ``schedule``); two are a configuration error at start-up, none too.
- **at most one** — ``init_latents``: without a plugin the engine's default applies; two are a
  configuration error at start-up.
- **all run, in config order** — every implementation runs, in the order of the composed config
  (the built-in plugins first — progress, exact error —, then model, schedule, solver,
  conditioning, momentum, guidance, callback, metrics, logger; list groups in the order the user
  wrote them). The engine enforces this order; pluggy's own call order
  (last registered first) is never relied on.
- **chain, in config order** — like "all run", and each implementation receives the previous one's
  return value (``conditioning``, ``guidance``, ``momentum``).

Hooks are always called with keyword arguments. A plugin keeps per-trajectory state in
``state.stash.get(self, factory)`` and per-run state in ``run.stash.get(self, factory)``, never in
globals or on ``self``, so two runs (or one plugin object serving two runs) never interfere.
"""
from __future__ import annotations

from typing import Callable

import torch

from framework.core.markers import hookspec
from framework.core.model import Model
from framework.core.run import Result, Run
from framework.core.state import Batch, Conditioning, Prediction, Schedule
from framework.core.step import SamplerState


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------
@hookspec
def configure(run: Run) -> None:
    """All run, in config order, once per run after every plugin is built and before sampling.

    Check compatibility (raise :class:`framework.core.errors.ConfigError` with a one-line fix) and
    declare needs: ``run.request_uncond()`` when a guidance plugin needs the unconditional
    prediction (the model adapter then batches it), ``run.request_grad(self)`` when the plugin's
    ``guidance`` must run with gradients enabled, ``run.request_branch(name, Perturbation(kind,
    layers))`` for an extra evaluation of the network with a perturbation inside it (perturbation
    guidance: identity or blurred self-attention, skipped blocks, dropped text attention; see
    :mod:`framework.core.perturb`), ``run.request_attention_map(name, layer)`` to capture a layer's
    self-attention maps. The model checks the layers here (a layer that does not exist, a model
    without attention: ``ConfigError``).
    """


@hookspec
def run_start(run: Run) -> None:
    """All run, in config order, once before the first batch (loggers open, metrics reset)."""


@hookspec
def batch_start(run: Run, batch: Batch) -> None:
    """All run, in config order, when a batch starts sampling (after its conditioning, before
    ``init_latents``; batches read back from a run folder have none). Timers use it."""


@hookspec
def adjust_images(run: Run, batch: Batch, images: torch.Tensor) -> torch.Tensor:
    """Chain, in config order, once per batch after the model decodes it, on images [n, 3, H, W] in
    [0, 1] (a model without a decoder has none, and no call): edit the pictures before they are saved,
    passed to ``batch_end`` and returned (inpainting pastes the known pixels back). Batches read back
    from a run folder are decoded again and pass through it too. The engine clamps the last answer to
    [0, 1]."""


@hookspec
def batch_end(run: Run, batch: Batch, latents: torch.Tensor, images: torch.Tensor | None) -> None:
    """All run, in config order, after each batch is sampled and decoded (images in [0, 1], or
    None for models without a decoder). Savers and streaming metrics use it. The batch's files in
    the run folder are written on the run's background worker (:mod:`framework.core.background`),
    so they may not be on disk yet; host work of a plugin's own can be queued there too
    (``background(run).submit``), and is done before ``run_end``."""


@hookspec
def run_end(run: Run, result: Result) -> None:
    """All run, in config order, once after the last batch. Metrics plugins add their scores to
    ``run.metrics`` (str → float); loggers run after metrics (their group comes later)."""


# ---------------------------------------------------------------------------------------------
# Before sampling
# ---------------------------------------------------------------------------------------------
@hookspec
def conditioning(run: Run, cond: Conditioning) -> Conditioning:
    """Chain, in config order, once per batch before sampling: edit the text conditioning
    (token swaps, embedding mixes, prompt weighting). Receives the model's encoding of the
    batch's prompts and returns the conditioning to sample with."""


@hookspec
def schedule(model: Model, steps: int) -> Schedule:
    """Exactly one (the schedule plugin, or a solver that owns its grid): the σ grid for ``steps``
    steps, with the model time of each σ for discrete models and the initial noise scale."""


@hookspec
def adjust_schedule(run: Run, schedule: Schedule) -> Schedule:
    """Chain, in config order, once per run after ``schedule``: edit the grid the run samples on
    (img2img cuts the first steps so sampling starts at σ = σ(strength)). Returns the Schedule."""


@hookspec(firstresult=True)
def init_latents(run: Run, batch: Batch, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """At most one plugin (two are a configuration error at start-up): the starting point x at
    ``schedule.sigmas[0]`` from unit ``noise``.

    Without a plugin the engine starts from ``noise * schedule.init_noise_scale``; img2img and
    inpainting plugins return an encoded image plus σ₀-scaled noise instead.
    """


# ---------------------------------------------------------------------------------------------
# Per step
# ---------------------------------------------------------------------------------------------
@hookspec
def before_step(state: SamplerState) -> None:
    """All run, in config order, at the start of each step before any evaluation. May replace
    ``state.x`` (churn adds noise and may change the step's starting σ through the state)."""


@hookspec
def predict(state: SamplerState, x: torch.Tensor, sigma: float, cond: Conditioning | None) -> Prediction:
    """Exactly one (the model adapter): evaluate the denoiser at ``(x, sigma)``.

    Returns a :class:`Prediction`; when ``cond.uncond`` is present the adapter batches the
    unconditional pass and fills ``cond_denoised``/``uncond_denoised`` (``denoised`` is then the
    conditional one until a guidance plugin combines them). The engine counts one NFE per call.

    Each branch requested with ``run.request_branch`` and active at this evaluation (its ``when``)
    is evaluated at the same ``(x, sigma)`` with its perturbation applied inside the network to that
    branch only, and removed afterwards even when the call raises; its denoised is
    ``pred.branches[name]``. The adapter stacks [uncond; cond; branches…] into one network call when
    it can perturb a slice of the batch (``Model.perturbs_slices``), else it calls the network once
    more per branch. ``batch.unet_calls`` counts network calls, ``batch.network_inputs`` the inputs
    per sample (a CFG pair 2, with one branch 3: 1.5 NFE in the papers' CFG-pair convention).
    """


@hookspec
def guidance(state: SamplerState, pred: Prediction) -> Prediction:
    """Chain, in config order, after every denoiser evaluation (every stage of multi-stage solvers).

    Adjust ``pred.denoised`` (x0-space: CFG combiners, MPGD) or move the evaluation point with
    ``pred.shifted(delta)`` (a latent correction; honoured at a step's first evaluation, where the
    solver then steps from the moved point). Runs under ``torch.enable_grad`` for plugins that
    called ``run.request_grad(self)``; otherwise gradients are off.
    """


@hookspec
def momentum(state: SamplerState, pred: Prediction) -> Prediction:
    """Chain, in config order, at each step's first evaluation only: transform the direction a
    single-evaluation solver uses from the history (``state.history``). Each plugin states the
    variable it works on and the solvers it composes with (checked in ``configure``)."""


@hookspec
def step(state: SamplerState, denoise: Callable[[torch.Tensor, float], Prediction]) -> torch.Tensor:
    """Exactly one (the solver): return x at ``state.sigma_next``.

    ``state.pred`` already holds the first evaluation at ``(state.x, state.sigma)``; calling
    ``denoise(state.x, state.sigma)`` again returns it without a new evaluation. Further calls
    evaluate the model (one NFE each, with guidance). Stochastic solvers draw from
    ``state.noise()`` (per-sample generators).
    """


@hookspec
def after_step(state: SamplerState, x_next: torch.Tensor) -> None:
    """All run, in config order, after each step: history keepers, NaN guards, previews, logging.
    NaN guards call ``run.request_finite_checks()`` in ``configure``; the engine then checks every
    hook's output on the device (``framework.core.finite.NonFinite``) and reads the flags only every k steps."""
