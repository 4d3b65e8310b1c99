"""Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + s·(D_cond − D_uncond).

Linear in D, so identical to guiding the noise prediction ε as diffusers does. The scale s is the
top-level ``cfg_scale`` (its only name); the negative prompt (top-level ``negative_prompt``) is the
unconditional input. An unconditional model, or scale 1 throughout, needs no second pass.

Scale schedules over the run's progress p = i/(N − 1): ``shape=constant`` (s = cfg_scale),
``linear`` (from ``cfg_scale`` to ``end_scale``), ``cosine`` (cfg_scale + (end_scale − cfg_scale)·(1 − cos πp)/2).
Guidance interval (Kynkäänniemi et al. 2024, the ``interval`` preset): guidance only for
σ ∈ (sigma_lo, sigma_hi]; outside it D = D_cond. The same window as fractions of the run
(diffusers' guiders' ``start``/``stop``): guidance only at the steps i with
⌊start·N⌋ ≤ i < ⌊stop·N⌋ of the N steps; both windows may be given (guidance where both hold).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import Choice, ConfigError, UncondGuidance, hookimpl


class Shape(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class CFG(UncondGuidance):
    end_scale: float | None = None
    shape: Shape = Shape.constant
    sigma_lo: float | None = None
    sigma_hi: float | None = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if self.sigma_lo is not None and self.sigma_hi is not None and self.sigma_lo >= self.sigma_hi:
            raise ConfigError(f"cfg needs sigma_lo < sigma_hi, got {self.sigma_lo} and {self.sigma_hi}")
        if not 0 <= self.start <= self.stop <= 1:
            raise ConfigError(f"cfg's step window needs 0 ≤ start ≤ stop ≤ 1 (fractions of the run), "
                              f"got start={self.start}, stop={self.stop}")

    def scale_at(self, scale: float, index: int, steps: int) -> float:
        """The guidance scale at step ``index`` of ``steps``, starting from ``scale`` (cfg_scale)."""
        end = scale if self.end_scale is None else self.end_scale
        p = index / (steps - 1) if steps > 1 else 0.0
        if self.shape == "linear":
            return scale + (end - scale) * p
        if self.shape == "cosine":
            return scale + (end - scale) * (1 - math.cos(math.pi * p)) / 2
        return scale

    def active(self, sigma: float, index: int = 0, steps: int = 1) -> bool:
        """Whether σ is in (sigma_lo, sigma_hi] and step ``index`` of ``steps`` in the step window."""
        lo = -math.inf if self.sigma_lo is None else self.sigma_lo
        hi = math.inf if self.sigma_hi is None else self.sigma_hi
        return lo < sigma <= hi and int(self.start * steps) <= index < int(self.stop * steps)

    @property
    def windowed(self) -> bool:
        """Whether a σ or step window limits the guidance."""
        return self.sigma_lo is not None or self.sigma_hi is not None or (self.start, self.stop) != (0.0, 1.0)

    @property
    def scheduled(self) -> bool:
        """Whether the scale changes over the run."""
        return self.shape != "constant" and self.end_scale is not None

    @property
    def capturable(self) -> bool | str:
        """compile=step: the constant-scale, window-free combination is tensor arithmetic."""
        if self.windowed or self.scheduled:
            return "a guidance window or a scale schedule decides per step on the host"
        return True

    @hookimpl
    def configure(self, run):  # scale 1 throughout needs no unconditional pass
        scale = run.settings.cfg_scale
        ends = {scale, scale if self.end_scale is None else self.end_scale}
        if run.model.is_conditional and ends != {1.0}:
            run.request_uncond()

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None:
            return pred
        if self.windowed and not self.active(pred.sigma, state.index, state.schedule.steps):
            return pred.with_denoised(pred.cond_denoised)
        s = state.run.settings.cfg_scale
        if self.scheduled:
            s = self.scale_at(s, state.index, state.schedule.steps)
        return pred.with_denoised(pred.uncond_denoised + s * (pred.cond_denoised - pred.uncond_denoised))
