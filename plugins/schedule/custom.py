"""An explicit σ grid (``sigmas``, descending, N + 1 values; may end at 0), with optional model
timesteps (one per σ, ``null`` where none) and initial noise scale (``sigma``: σ₀, ``vp``: √(1+σ₀²),
or a number). ``steps`` must equal len(sigmas) − 1. Useful to replay another tool's grid exactly."""
from __future__ import annotations

from dataclasses import dataclass, field

from framework.plugin import ConfigError, INIT_NOISE_MODES, Schedule, hookimpl, init_noise_scale


@dataclass
class Custom:
    sigmas: list[float] = field(default_factory=list)
    timesteps: list[float | None] | None = None
    init_noise: str = "sigma"

    def __post_init__(self) -> None:
        if len(self.sigmas) < 2:
            raise ConfigError("schedule=custom needs schedule.sigmas with at least two values, e.g. 'schedule.sigmas=[14.6,1.0,0]'")
        if self.init_noise not in INIT_NOISE_MODES:
            try:
                float(self.init_noise)
            except ValueError:
                raise ConfigError(f"schedule.init_noise must be sigma, vp or a number, got '{self.init_noise}'") from None

    @hookimpl
    def schedule(self, model, steps):
        if steps != len(self.sigmas) - 1:
            raise ConfigError(f"has {len(self.sigmas) - 1} steps: set steps={len(self.sigmas) - 1}")
        sig = tuple(float(s) for s in self.sigmas)
        scale = init_noise_scale(sig[0], self.init_noise) if self.init_noise in INIT_NOISE_MODES else float(self.init_noise)
        ts = None if self.timesteps is None else tuple(None if t is None else float(t) for t in self.timesteps)
        return Schedule(sig, ts, scale)
