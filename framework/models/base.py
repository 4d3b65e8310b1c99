"""What the model adapters share beyond the contract (:class:`framework.core.model.Model`).

Any object following k-diffusion's denoiser protocol — ``__call__(x, sigma, **cond) -> denoised``
with ``sigma`` a tensor of one σ per sample, and attributes ``sigma_min``, ``sigma_max`` and
``shape`` (one sample's shape) — is wrapped by :class:`DenoiserAdapter`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from framework.core.errors import ConfigError
from framework.core.model import Model
from framework.models.flow import FlowModel


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

    def denoise_tensor(self, x, sigma, t, tensors):
        """compile=step: the eager denoiser with σ a 0-d device tensor (one σ per sample, as above)."""
        return self.denoiser(x, sigma.to(x.dtype).expand(x.shape[0]), **tensors)

    native_space = "x0"

    def to_native(self, x, sigma, denoised):
        """A k-diffusion denoiser returns D itself: its native space is x0 (the identity)."""
        return denoised

    def from_native(self, x, sigma, native):
        return native

    def exact_solution(self, x_start, sigma_start, sigma_end):
        fn = getattr(self.denoiser, "exact_solution", None)
        return None if fn is None else fn(x_start, sigma_start, sigma_end)

    def encode_prompts(self, prompts):
        fn = getattr(self.denoiser, "encode_prompts", None)
        if fn is None:
            return super().encode_prompts(prompts)
        return fn(prompts)


class FlowTwin(FlowModel, DenoiserAdapter):
    """A σ-space denoiser served as a flow model (``parametrization: flow`` on the analytic models):
    its D is turned into the velocity v = (x_in − D(x_in/(1 − t), σ))/t a flow network would predict,
    and :class:`FlowModel` turns it back, so the flow arithmetic (and a start at σ = ∞) is tested
    against exact solutions, which are the same paths in σ-space. At t = 1, v = x_in − E[x0] (the
    denoiser's ``data_moments()``)."""

    def velocity(self, x_in, t, tensors):
        if t == 1.0:
            moments = getattr(self.denoiser, "data_moments", None)
            if moments is None:
                raise ConfigError(f"{type(self.denoiser).__name__} cannot start at σ = ∞ (t = 1): it has no data_moments()")
            return x_in - moments()[0].reshape(x_in.shape[1:]).to(x_in)
        sigma = t / (1 - t)
        return (x_in - DenoiserAdapter.denoise_batch(self, x_in / (1 - t), sigma, None, tensors)) / t


def wrap_model(obj: object) -> Model:
    """A model plugin from a configured object: adapters pass through, denoisers get wrapped
    (through the flow arithmetic when they declare ``parametrization = "flow"``)."""
    if isinstance(obj, Model):
        return obj
    return FlowTwin(obj) if str(getattr(obj, "parametrization", "sigma")) == "flow" else DenoiserAdapter(obj)


def vp_scale(sigma: float) -> float:
    """1/√(1+σ²): the variance-preserving input scaling (√ᾱ) of discrete diffusion models."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)
