"""The model adapter: the only code that knows a model's parametrisation.

Every model is a plugin answering ``predict``. :class:`Model` holds what all adapters share: the
classifier-free-guidance batching (one batched call for the conditional and unconditional passes)
and the accounting of model calls. An adapter implements :meth:`Model.denoise_batch`.

Any object following k-diffusion's denoiser protocol — ``__call__(x, sigma, **cond) -> denoised``
with ``sigma`` a tensor of one σ per sample, and attributes ``sigma_min``, ``sigma_max`` and
``shape`` (one sample's shape) — is wrapped by :class:`DenoiserAdapter`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from framework.core.markers import hookimpl
from framework.core.errors import ConfigError
from framework.core.state import Conditioning, Prediction, SamplerState


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
    def predict(self, state: SamplerState, x: torch.Tensor, sigma: float, cond: Conditioning | None) -> Prediction:
        t = state.schedule.timestep(sigma)
        tensors = cond.tensors if cond is not None else {}
        if cond is None or cond.uncond is None:
            state.batch.unet_calls += 1
            d = self.denoise_batch(x, sigma, t, tensors)
            return Prediction(x=x, sigma=sigma, denoised=d)
        both = self._cfg_tensors(cond.uncond, tensors)
        state.batch.unet_calls += 1
        d_uncond, d_cond = self.denoise_batch(torch.cat([x, x]), sigma, t, both).chunk(2)
        return Prediction(x=x, sigma=sigma, denoised=d_cond, cond_denoised=d_cond, uncond_denoised=d_uncond)

    def _cfg_tensors(self, uncond: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The [uncond; cond] batch of the conditioning tensors, concatenated once per batch (not per
        step): reused while the same tensor objects come in."""
        parts = [(uncond[k], v) for k, v in tensors.items()]
        cached = getattr(self, "_cfg_cache", None)
        if cached is not None and len(cached[0]) == len(parts) and all(
            a is c and b is d for (a, b), (c, d) in zip(parts, cached[0])
        ):
            return cached[1]
        both = {k: torch.cat([u, v]) for k, (u, v) in zip(tensors, parts)}
        self._cfg_cache = (parts, both)
        return both


class DenoiserAdapter(Model):
    """Wraps any object with k-diffusion's denoiser protocol as a model plugin."""

    def __init__(self, denoiser: Any):
        missing = [a for a in ("sigma_min", "sigma_max", "shape") if not hasattr(denoiser, a)]
        if not callable(denoiser) or missing:
            raise ConfigError(
                f"model object {type(denoiser).__name__} does not follow the denoiser protocol: "
                f"needs __call__(x, sigma, **cond) and attributes sigma_min, sigma_max, shape (missing: {', '.join(missing) or '__call__'})"
            )
        self.denoiser = denoiser
        self.sigma_min = float(denoiser.sigma_min)
        self.sigma_max = float(denoiser.sigma_max)
        self.latent_shape = tuple(int(s) for s in denoiser.shape)
        self.is_conditional = bool(getattr(denoiser, "is_conditional", False))

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(device, dtype)
        if hasattr(self.denoiser, "to"):
            self.denoiser.to(device=device, dtype=dtype)

    def prepare_network(self, compile: bool = False, mode: str | None = None, channels_last: bool = False) -> None:
        from framework.models import compiled

        module = self.denoiser
        if not isinstance(module, torch.nn.Module):
            return super().prepare_network(compile, mode, channels_last)
        compiled.set_channels_last(module, channels_last)
        self._compiled = (
            compiled.compile_network(module, compiled.resolve_mode(mode, self.device), self.device, self.dtype)
            if compile else None
        )

    def denoise_batch(self, x, sigma, timestep, tensors):
        s = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
        return self.network_for_call(self.denoiser)(x, s, **tensors)

    def exact_solution(self, x_start, sigma_start, sigma_end):
        fn = getattr(self.denoiser, "exact_solution", None)
        return None if fn is None else fn(x_start, sigma_start, sigma_end)

    def encode_prompts(self, prompts):
        fn = getattr(self.denoiser, "encode_prompts", None)
        if fn is None:
            return super().encode_prompts(prompts)
        return fn(prompts)


def wrap_model(obj: object) -> Model:
    """A model plugin from a configured object: adapters pass through, denoisers get wrapped."""
    if isinstance(obj, Model):
        return obj
    return DenoiserAdapter(obj)


def vp_scale(sigma: float) -> float:
    """1/√(1+σ²): the variance-preserving input scaling (√ᾱ) of discrete diffusion models."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)
