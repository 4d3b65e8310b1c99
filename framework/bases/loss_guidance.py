"""Loss guidance: steer sampling by the gradient of a loss on the decoded predicted image.

A loss plugin subclasses :class:`LossGuidance` and implements :meth:`LossGuidance.loss` (one value
per sample, on images in [0, 1]); this class turns it into a correction at a step's first
evaluation (Stable Diffusion deep dive, fast.ai):

- ``space=latent`` (default): the latent correction x ← x − scale·σ²·∇ₓloss, applied with
  :meth:`Prediction.shifted` (the noise estimate ε is kept, the solver steps from the moved point).
  ``gradient=decoder`` (default) takes ∇ₓ at fixed ε: D = x − σ·ε, so ∇ₓ = ∇_D and the gradient
  flows through the VAE decoder only (no extra model evaluation). ``gradient=unet`` re-evaluates
  the model on x with gradients on and differentiates through it (universal guidance's forward
  guidance, Bansal et al. 2023; DPS, Chung et al. 2023): one more model evaluation per guided step,
  counted in ``nfe`` and ``unet_calls``.
- ``space=x0`` (MPGD, He et al. 2024, style): adjust the denoised estimate only,
  D ← D − scale·∇_D loss, x unchanged; the solver recomputes its direction from the new D. It applies
  at every evaluation of a guided step (so the stages of multi-stage solvers see it too).
- ``normalize=true``: gradient-norm scaling; each sample's gradient is rescaled to unit RMS and the
  update is scale·σ·ĝ (latent) or scale·ĝ (x0): ``scale`` is then the RMS of the correction
  relative to σ (resp. in latent units), whatever the loss's magnitude.
  The built-in losses (color_loss, palette, image_match, clip_text, style) default to it, at scales
  and σ windows measured on the bundled model (docs/guidance/defaults.md): the raw step's strength
  depends on the model (docs/guidance.md).
- ``every`` k steps and/or only for σ ∈ (sigma_lo, sigma_hi].
- ``recurrence`` r (universal guidance's self-recurrence): after the correction, take the
  deterministic (DDIM) step to σ_next with the guided prediction, re-noise back to σ with fresh
  noise (x ← x' + √(σ² − σ_next²)·z), re-evaluate the model and guide again; r more evaluations per
  guided step, counted.
- ``checkpoint=true``: gradient checkpointing of the VAE decoder (per block, diffusers'
  ``gradient_checkpointing`` switched on for the decode and its backward only, then restored; a
  single ``torch.utils.checkpoint`` segment around ``decode`` for decoders without blocks): the
  decoder's activations are recomputed in the backward pass instead of kept.

The record's metrics get ``guidance_loss_<name>``: the loss of the final (clamped) images, averaged
over samples. Each sample's correction is independent of the batch: the per-sample losses are summed before
differentiation. Extra model evaluations made here run the model adapter and the guidance plugins
configured before this one, except other loss guidances (they correct only the engine's
evaluation; a stateful combiner before this one, APG's momentum, sees the extra evaluations too).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.state import Prediction
from framework.core.step import SamplerState

GRADIENTS = ("decoder", "unet")
SPACES = ("latent", "x0")


@contextlib.contextmanager
def decoder_checkpointing(model: object, enabled: bool = True) -> Iterator[None]:
    """Within the block, the model's VAE decoder checkpoints its blocks (diffusers' switch, restored
    on exit). Run the forward *and* the backward pass inside it."""
    vae = getattr(model, "vae", None)
    decoder = getattr(vae, "decoder", None)
    mods = [] if not enabled or decoder is None else [m for m in decoder.modules() if hasattr(m, "gradient_checkpointing")]
    if not mods:
        yield
        return

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    saved = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in mods]
    try:
        for m in mods:
            m.gradient_checkpointing, m._gradient_checkpointing_func = True, checkpointed
        yield
    finally:
        for m, flag, fn in saved:
            m.gradient_checkpointing = flag
            if fn is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = fn


def decode_for_grad(model, latents: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    """Differentiable decode (unclamped images in [0, 1]); one checkpoint segment when asked and the
    decoder has no per-block switch (call inside :func:`decoder_checkpointing`)."""
    decoder = getattr(getattr(model, "vae", None), "decoder", None)
    if checkpoint and not hasattr(decoder, "gradient_checkpointing"):
        return torch.utils.checkpoint.checkpoint(lambda z: model.decode(z, clamp=False), latents, use_reentrant=False)
    return model.decode(latents, clamp=False)


@dataclass
class LossGuidance:
    """Base of loss-guidance plugins: subclasses implement :meth:`loss` (and :meth:`setup`)."""

    scale: float = 1.0
    every: int = 1
    sigma_lo: float | None = None
    sigma_hi: float | None = None
    gradient: str = "decoder"
    space: str = "latent"
    normalize: bool = False
    recurrence: int = 0
    checkpoint: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.every < 1:
            raise ConfigError(f"{name}.every must be ≥ 1, got {self.every}")
        if self.gradient not in GRADIENTS:
            raise ConfigError(f"{name}.gradient must be one of {', '.join(GRADIENTS)}, got '{self.gradient}'")
        if self.space not in SPACES:
            raise ConfigError(f"{name}.space must be one of {', '.join(SPACES)}, got '{self.space}'")
        if self.space == "x0" and self.gradient == "unet":
            raise ConfigError(f"{name}: space=x0 differentiates with respect to the denoised estimate; use gradient=decoder")
        if self.recurrence < 0:
            raise ConfigError(f"{name}.recurrence must be ≥ 0, got {self.recurrence}")
        if self.sigma_lo is not None and self.sigma_hi is not None and self.sigma_lo >= self.sigma_hi:
            raise ConfigError(f"{name} needs sigma_lo < sigma_hi, got {self.sigma_lo} and {self.sigma_hi}")

    # --- what a loss plugin provides -------------------------------------------------------------
    def setup(self, run) -> Any:
        """Load what the loss needs once per run (reference images, feature nets) and return it: the
        engine keeps it in the run's stash and passes it to every :meth:`loss` call of that run."""
        return None

    def loss(self, images: torch.Tensor, context: Any) -> torch.Tensor:
        """Per-sample loss [n] of decoded images [n, 3, H, W] in [0, 1] (unclamped), differentiable;
        ``context`` is what :meth:`setup` returned for this run."""
        raise NotImplementedError

    def context(self, run) -> Any:
        """This run's :meth:`setup` result."""
        return run.stash.get(self, lambda: self.setup(run), "loss_context")

    # --- the mechanism ---------------------------------------------------------------------------
    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError(f"{type(self).__name__} guides decoded images but this model has no decoder: use an image model (e.g. model=bundled)")
        run.request_grad(self)
        self.context(run)  # set up (and fail) before sampling

    def final_loss(self, run) -> list[float]:
        """[sum, count] of the final images' losses so far in this run."""
        return run.stash.get(self, lambda: [0.0, 0], "final_loss")

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        with torch.no_grad():
            values = self.loss(images.to(run.dtype), self.context(run)).float()
        tally = self.final_loss(run)
        tally[0] += float(values.sum())
        tally[1] += values.numel()

    @hookimpl
    def run_end(self, run, result):
        total, n = self.final_loss(run)
        if n:
            run.metrics[f"guidance_loss_{run.plugins.name_of(self)}"] = total / n

    def active(self, state: SamplerState, sigma: float) -> bool:
        """Whether this step is guided: every k-th step, σ inside (sigma_lo, sigma_hi]; never at
        σ = ∞ (a flow model's pure noise: the correction scales with σ)."""
        lo = -math.inf if self.sigma_lo is None else self.sigma_lo
        hi = math.inf if self.sigma_hi is None else self.sigma_hi
        return state.index % self.every == 0 and lo < sigma <= hi and math.isfinite(sigma)

    @hookimpl
    def guidance(self, state, pred):
        first = state.pred is None
        if not (first or self.space == "x0") or not self.active(state, pred.sigma):
            return pred
        pred = self.correct(state, pred, pred.x)
        if not first:
            return pred
        for _ in range(self.recurrence):
            x = self.renoised(state, pred)
            fresh = None
            if self.gradient == "decoder":  # gradient=unet evaluates at x with gradients in correct()
                with torch.no_grad():
                    fresh = self.evaluate(state, x, pred.sigma)
            pred = self.correct(state, fresh, x)
        return pred

    def correct(self, state: SamplerState, pred: Prediction | None, x: torch.Tensor) -> Prediction:
        """One guidance update of the prediction at ``x`` (``pred``; None: evaluate it here, which
        gradient=unet does anyway)."""
        sigma = state.sigma if pred is None else pred.sigma
        if self.gradient == "unet":
            x = x.detach().requires_grad_(True)
            graph = self.evaluate(state, x, sigma)
            grad = self.gradient_of(state, graph.denoised, x)
            if pred is None:
                pred = detached(graph)
        else:
            assert pred is not None
            d = pred.denoised.detach().requires_grad_(True)
            grad = self.gradient_of(state, d, d)
        if self.normalize:
            rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
            grad = grad / rms.reshape(-1, *[1] * (grad.ndim - 1))
            step = self.scale * (sigma if self.space == "latent" else 1.0)
        else:
            step = self.scale * (sigma**2 if self.space == "latent" else 1.0)
        if self.space == "x0":
            return pred.with_denoised(pred.denoised - step * grad)
        return pred.shifted(-step * grad)

    def gradient_of(self, state: SamplerState, denoised: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
        """∇ of the summed per-sample loss of decode(denoised) with respect to ``wrt``."""
        model = state.run.model
        with decoder_checkpointing(model, self.checkpoint):
            images = decode_for_grad(model, denoised, self.checkpoint)
            per_sample = self.loss(images, self.context(state.run))
            if per_sample.shape != (images.shape[0],):
                raise ValueError(f"{type(self).__name__}.loss must return one value per sample, shape ({images.shape[0]},), got {tuple(per_sample.shape)}")
            (grad,) = torch.autograd.grad(per_sample.sum(), wrt)
        return grad.detach()

    def evaluate(self, state: SamplerState, x: torch.Tensor, sigma: float) -> Prediction:
        """A model evaluation made by this plugin, through the engine's (one NFE, NaN checks): the
        guidance plugins configured before this one apply, except loss guidances."""
        before = []
        for _, fn, _ in state.run.hooks.guidance:
            if fn.__self__ is self:
                break
            before.append(fn.__self__)
        return state.denoise.evaluate(x, sigma, guidance=lambda p: p in before and not isinstance(p, LossGuidance))

    def renoised(self, state: SamplerState, pred: Prediction) -> torch.Tensor:
        """Universal guidance's recurrence: the DDIM step to σ_next with ``pred``, then fresh noise
        back to σ: x = x' + √(σ² − σ_next²)·z."""
        sigma, sigma_next = pred.sigma, state.sigma_next
        x_next = pred.denoised + (sigma_next / sigma) * (pred.x - pred.denoised)
        return x_next + math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) * state.noise()


def detached(pred: Prediction) -> Prediction:
    """``pred`` with every tensor detached from the autograd graph."""
    def d(t):
        return None if t is None else t.detach()

    return Prediction(x=d(pred.x), sigma=pred.sigma, denoised=d(pred.denoised),
                      cond_denoised=d(pred.cond_denoised), uncond_denoised=d(pred.uncond_denoised))
