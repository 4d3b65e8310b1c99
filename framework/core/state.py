"""The data that flows through the sampling loop: Schedule, Conditioning, Prediction, the history
of finished steps and the batch (one trajectory). The step and the run as plugins see them
(:class:`~framework.core.step.SamplerState`, :class:`~framework.core.run.Run`) build on these.

Convention (Karras et al. 2022): the sampler state lives in σ-space, ``x = x0 + σ·ε``; a model is a
denoiser ``D(x, σ, cond) ≈ E[x0 | x]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, TypeVar

import torch

from framework.core.errors import ConfigError
from framework.core.noise import SampleNoise

T = TypeVar("T")


@dataclass(frozen=True)
class Schedule:
    """A descending σ grid with the model time of each σ and the initial noise scale.

    ``sigmas`` holds N+1 Python floats (N steps); the last may be 0, the first may be ∞ (a flow
    model's t = 1: the state there is the unit noise itself, and the engine takes the first step in
    its limit form, see :mod:`framework.core.engine`). ``timesteps``, when the model is discrete,
    holds the model time of each σ (same length; ``None`` entries where a σ has no timestep, e.g. a
    final 0); the model adapter falls back to log-σ interpolation for those. ``init_noise_scale``
    multiplies unit noise to give x at ``sigmas[0]`` (σ₀, or √(1+σ₀²) where a diffusers scheduler
    starts so; 1 when σ₀ = ∞).
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[float | None, ...] | None = None
    init_noise_scale: float | None = None
    _t_of: dict[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sig = tuple(float(s) for s in self.sigmas)
        object.__setattr__(self, "sigmas", sig)
        if len(sig) < 2:
            raise ConfigError("a schedule needs at least one step (two σ values); set steps>=1")
        if any(not math.isfinite(s) or s < 0 for s in sig[1:]) or math.isnan(sig[0]) or sig[0] < 0:
            raise ConfigError(f"schedule σ values must be finite (the first may be ∞) and ≥ 0, got {sig}")
        if any(b >= a for a, b in zip(sig, sig[1:])):
            raise ConfigError(f"schedule σ values must strictly decrease, got {sig}")
        if self.timesteps is not None and len(self.timesteps) != len(sig):
            raise ConfigError("schedule timesteps must have one entry per σ")
        if self.init_noise_scale is None:
            object.__setattr__(self, "init_noise_scale", sig[0] if math.isfinite(sig[0]) else 1.0)
        t_of = {}
        if self.timesteps is not None:
            t_of = {s: float(t) for s, t in zip(sig, self.timesteps) if t is not None}
        object.__setattr__(self, "_t_of", t_of)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def from_infinity(self) -> bool:
        """Whether the grid starts at σ = ∞ (a flow model's pure-noise start)."""
        return math.isinf(self.sigmas[0])

    def timestep(self, sigma: float) -> float | None:
        """The model time carried by the grid for this σ, or None (interpolate)."""
        return self._t_of.get(sigma)


@dataclass
class Conditioning:
    """What the model is conditioned on, for one batch.

    ``tensors`` are keyword arguments of the model (``encoder_hidden_states`` for SD), one row per
    sample; ``uncond`` the same for the unconditional/negative pass, present only when a guidance
    plugin needs it. ``prompts``/``negative_prompts`` are the texts they came from.
    """

    prompts: list[str]
    tensors: dict[str, torch.Tensor]
    negative_prompts: list[str] | None = None
    uncond: dict[str, torch.Tensor] | None = None


@dataclass
class Prediction:
    """One denoiser evaluation at ``(x, sigma)``.

    ``denoised`` is the guided estimate of x0 the solver uses; ``cond_denoised``/``uncond_denoised``
    are the two halves of a classifier-free-guidance batch (None when there was none). A latent
    correction (loss guidance) moves ``x``: see :meth:`shifted`. ``branches`` holds the denoised of
    each perturbed branch a plugin requested (``run.request_branch``) and evaluated here, by name;
    ``attention`` the self-attention maps a plugin asked to capture (``run.request_attention_map``):
    name → {"cond": map, "uncond": map or None}, each [B, heads-mean query, key].
    """

    x: torch.Tensor
    sigma: float
    denoised: torch.Tensor
    cond_denoised: torch.Tensor | None = None
    uncond_denoised: torch.Tensor | None = None
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def derivative(self) -> torch.Tensor:
        """The probability-flow ODE's dx/dσ = (x − D)/σ (the noise estimate ε)."""
        return (self.x - self.denoised) / self.sigma

    def with_denoised(self, denoised: torch.Tensor) -> Prediction:
        return replace(self, denoised=denoised)

    def shifted(self, delta: torch.Tensor) -> Prediction:
        """Move the evaluation point by ``delta`` keeping the noise estimate ε = (x − D)/σ fixed.

        This is the deep dive's latent correction ``x ← x − scale·σ²·∇loss`` followed by a step
        with the noise prediction as computed: the solver then steps from the moved point.
        """
        return Prediction(
            x=self.x + delta,
            sigma=self.sigma,
            denoised=self.denoised + delta,
            cond_denoised=None if self.cond_denoised is None else self.cond_denoised + delta,
            uncond_denoised=None if self.uncond_denoised is None else self.uncond_denoised + delta,
            branches={k: v + delta for k, v in self.branches.items()},
            attention=self.attention,
        )


@dataclass(frozen=True)
class StepRecord:
    """One finished step, kept in the history that momentum/multistep plugins read.

    ``denoised`` is the step's first evaluation after guidance (before momentum); ``direction`` the
    denoised estimate the solver actually used (after momentum).
    """

    index: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor
    direction: torch.Tensor
    x_next: torch.Tensor


class Stash:
    """Per-plugin private state, keyed by plugin object: ``stash.get(self, factory)`` (``name``
    tells apart several entries of one plugin, e.g. a base class's and its subclass's). A batch
    has one (state for one trajectory), a run has one (state for the whole run)."""

    def __init__(self) -> None:
        self._data: dict[tuple[int, str], object] = {}

    def get(self, plugin: object, factory: Callable[[], T], name: str = "") -> T:
        key = (id(plugin), name)
        if key not in self._data:
            self._data[key] = factory()
        return self._data[key]  # type: ignore[return-value]


@dataclass
class Batch:
    """One sampling trajectory of a group of samples (global indices ``indices``)."""

    indices: list[int]
    cond: Conditioning | None
    noise: SampleNoise | None  # None when the batch is not sampled (read back, or scored from images)
    history: list[StepRecord] = field(default_factory=list)
    stash: Stash = field(default_factory=Stash)
    failed: torch.Tensor | None = None  # bool per sample, accumulated on the device
    failure: list[str] = field(default_factory=list)
    nfe: int = 0
    unet_calls: int = 0
    network_inputs: int = 0  # network inputs per sample (a CFG pair: 2, + a perturbed branch: 3); −1: read back unrecorded
    resumed: bool = False  # read back from the run folder instead of sampled


class StepView(Protocol):
    """What a model adapter reads of the step it evaluates for (a ``SamplerState``): the grid (the
    timestep of each σ) and the batch (its model-call counter)."""

    @property
    def schedule(self) -> Schedule: ...

    @property
    def batch(self) -> Batch: ...
