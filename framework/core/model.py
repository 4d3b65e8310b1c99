"""The model contract: what a model adapter (a plugin of the ``model`` group) provides.

The engine calls :meth:`Model.setup`, :meth:`Model.prepare_network` and :meth:`Model.prepare_schedule`
once per run, the ``predict`` hook (implemented here: classifier-free-guidance batching and the
count of network calls) at every evaluation, and :meth:`Model.output_latents` / :meth:`Model.decode`
once per batch. An adapter implements :meth:`Model.denoise_batch` (D(x, σ) for a batch) and, for
text-to-image models, :meth:`Model.encode_prompts` and :meth:`Model.decode`. The adapters
themselves (diffusers pipelines, analytic denoisers, any k-diffusion-style denoiser) live in
:mod:`framework.models`: they are the only code that knows a parametrisation.
"""
from __future__ import annotations

from typing import Any

import torch

from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.state import Conditioning, Prediction, StepView


class Model:
    """Base class of model adapters (plugins of the ``model`` group)."""

    sigma_min: float
    sigma_max: float
    #: Shape of one sample's latent.
    latent_shape: tuple[int, ...]
    #: True when the model takes text prompts (and so can be guided by CFG).
    is_conditional: bool = False
    #: The discrete model's σ for each training timestep (ascending in t), or None if continuous.
    train_sigmas: torch.Tensor | None = None
    #: diffusers' steps_offset of a discrete model (1 for Stable Diffusion).
    steps_offset: int = 0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load weights (lazily) and move to the run's device and dtype."""
        self.device, self.dtype = device, dtype

    def prepare_network(self, compile: bool = False, mode: str | None = None, channels_last: bool = False) -> None:
        """Called once per run after :meth:`setup`: compile the network (``compile=true``, see
        :mod:`framework.models.compiled`) and choose its memory layout, or undo both (a model object
        may serve several runs). Models without a neural network refuse both options."""
        if compile or channels_last:
            option = "compile=true" if compile else "channels_last=true"
            raise ConfigError(f"{option}: model {type(self).__name__} has no neural network to compile or re-lay out; "
                              f"remove {option} (it applies to diffusers models and torch.nn.Module denoisers)")

    def network_for_call(self, eager: Any) -> Any:
        """The compiled network set by :meth:`prepare_network` (``self._compiled``) when there is one
        and no gradient is needed; else ``eager`` (loss guidance differentiates the eager module)."""
        compiled = getattr(self, "_compiled", None)
        return eager if compiled is None or torch.is_grad_enabled() else compiled

    def prepare_schedule(self, schedule: Any) -> None:
        """Called once per run with the final grid (a :class:`Schedule`): place per-step constants
        (e.g. the timestep of every σ) on the device, so the steps create no tensors."""

    def denoise_batch(
        self, x: torch.Tensor, sigma: float, timestep: float | None, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """D(x, σ) for a batch (one model call)."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors of a list of prompts (conditional models only)."""
        raise ConfigError(f"{type(self).__name__} takes no prompts")

    has_decoder: bool = False

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor | None:
        """Images in [0, 1] from latents (unclamped, differentiable with ``clamp=False``), or None
        for models without a decoder."""
        return None

    def output_latents(self, x: torch.Tensor, sigma_last: float) -> torch.Tensor:
        """The latents a pipeline would decode from x at the grid's last σ (identity at σ = 0)."""
        return x

    def exact_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor | None:
        """The exact (or high-accuracy reference) probability-flow ODE solution, if known."""
        return None

    @hookimpl
    def predict(self, state: StepView, x: torch.Tensor, sigma: float, cond: Conditioning | None) -> Prediction:
        """One evaluation, the conditional and unconditional passes batched into one network call
        when ``cond.uncond`` is present (one entry of ``batch.unet_calls`` either way)."""
        t = state.schedule.timestep(sigma)
        tensors = cond.tensors if cond is not None else {}
        if cond is None or cond.uncond is None:
            state.batch.unet_calls += 1
            d = self.denoise_batch(x, sigma, t, tensors)
            return Prediction(x=x, sigma=sigma, denoised=d)
        both = state.batch.stash.get(self, lambda: _CFGBatch()).tensors(cond.uncond, tensors)
        state.batch.unet_calls += 1
        d_uncond, d_cond = self.denoise_batch(torch.cat([x, x]), sigma, t, both).chunk(2)
        return Prediction(x=x, sigma=sigma, denoised=d_cond, cond_denoised=d_cond, uncond_denoised=d_uncond)

    #: The space of the network's raw output, which diffusers' guiders act on: ``epsilon`` here (the
    #: σ-space noise ε = (x − D)/σ, a VP ε-model's output), ``v_prediction``, ``flow`` (a flow model's
    #: velocity v ≈ ε − x0) or ``x0`` (a denoiser that returns D itself) where an adapter overrides
    #: :meth:`to_native` / :meth:`from_native`.
    native_space: str = "epsilon"

    def to_native(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        """The network output (in :attr:`native_space`) that gives ``denoised`` at the state x and σ:
        here ε = (x − D)/σ, the inverse of an ε-model's D = x − σ·ε. At σ = ∞ (where ε is not
        defined by D) the limit up to a common factor, x − D: the guidance methods that are
        homogeneous of degree one in the prediction pair combine it exactly as ε."""
        return x - denoised if sigma == float("inf") else (x - denoised) / sigma

    def from_native(self, x: torch.Tensor, sigma: float, native: torch.Tensor) -> torch.Tensor:
        """D from a prediction in :attr:`native_space` (the inverse of :meth:`to_native`)."""
        return x - native if sigma == float("inf") else x - sigma * native


class _CFGBatch:
    """The [uncond; cond] batch of a batch's conditioning tensors, concatenated once per batch (not
    per step): reused while the same tensor objects come in (kept in the batch's stash)."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.both: dict[str, torch.Tensor] = {}

    def tensors(self, uncond: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = [(uncond[k], v) for k, v in tensors.items()]
        if len(parts) != len(self.parts) or any(a is not c or b is not d for (a, b), (c, d) in zip(parts, self.parts)):
            self.parts = parts
            self.both = {k: torch.cat([u, v]) for k, (u, v) in zip(tensors, parts)}
        return self.both
