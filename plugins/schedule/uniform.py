"""Timesteps uniformly spaced over a discrete model's training steps, exactly as diffusers sets them.

Spacings (Lin et al. 2024, table 2): ``linspace`` (0…T−1, fractional), ``leading``
(multiples of T//N plus ``steps_offset``), ``trailing`` (from T−1 down in steps of T/N). σ of each
timestep by linear interpolation of the training σ's (diffusers' EulerDiscreteScheduler). The grid
ends at 0 (``final=zero``, Euler/Heun) or at σ(t=0) (``final=alpha0``, DDIM with
``set_alpha_to_one=False``). Initial noise: ``auto`` follows diffusers' Euler/Heun (σ₀ for
linspace/trailing, √(1+σ₀²) for leading); DDIM always starts at √(1+σ₀²) (``vp``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import Choice, ConfigError, Schedule, hookimpl, init_noise_scale


class Spacing(Choice):
    linspace = "linspace"
    leading = "leading"
    trailing = "trailing"


class Final(Choice):
    zero = "zero"
    alpha0 = "alpha0"


class StartNoise(Choice):
    auto = "auto"
    sigma = "sigma"
    vp = "vp"


def diffusers_timesteps(spacing: str, steps: int, train_steps: int, steps_offset: int) -> np.ndarray:
    """Descending model timesteps (float32, as diffusers computes them)."""
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = train_steps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32) + steps_offset
    ratio = train_steps / steps
    return np.arange(train_steps, 0, -ratio).round().copy().astype(np.float32) - 1


@dataclass
class Uniform:
    spacing: Spacing = Spacing.leading
    final: Final = Final.zero
    init_noise: StartNoise = StartNoise.auto

    @hookimpl
    def schedule(self, model, steps):
        train = getattr(model, "train_sigmas", None)
        if train is None:
            raise ConfigError("needs a discrete-time model (with training timesteps): use schedule=karras")
        train = np.asarray(train)
        if steps > len(train):
            raise ConfigError(f"steps={steps} exceeds the model's {len(train)} training timesteps")
        ts = diffusers_timesteps(self.spacing, steps, len(train), getattr(model, "steps_offset", 0))
        # float32 like diffusers' own grid, so a run reproduces its scheduler bit for bit where it can
        sigmas = [float(s) for s in np.interp(ts, np.arange(len(train)), train).astype(np.float32)]
        timesteps: list[float | None] = [float(t) for t in ts]
        if self.final == "zero":
            sigmas.append(0.0)
            timesteps.append(None)
        else:
            sigmas.append(float(np.float32(train[0])))
            timesteps.append(0.0)
        mode = self.init_noise
        if mode == "auto":
            mode = "vp" if self.spacing == "leading" else "sigma"
        return Schedule(tuple(sigmas), tuple(timesteps), init_noise_scale(sigmas[0], mode))
