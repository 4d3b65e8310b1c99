"""The flow model's own grid (``schedule=flow_match``): diffusers' FlowMatchEulerDiscreteScheduler
as the model's pipeline sets it, rebuilt from the checkpoint's scheduler config (shift, dynamic
shifting with μ of the image size, ``shift_terminal``, its t-space Karras/exponential/beta ramps),
in σ = t/(1 − t); it starts at t = 1, σ = ∞ (the engine's limit step leaves it).

``grid``: ``auto`` is the pipeline's (SD3: ``set_timesteps(N)``, t = shift(linspace(1, shift(t_min), N)),
whose end is shifted twice; Flux: ``sigmas = linspace(1, 1/N, N)`` shifted once), ``default`` and
``linspace`` choose one. ``model=sd3`` and ``model=flux`` select this schedule by default; every
other schedule composes with the model's shift instead (docs/models.md). A flow model without a
scheduler config (the analytic models' ``parametrization=flow``) gets FlowMatchEuler's defaults
(shift 1).

``ramp``: ``config`` keeps the scheduler config's ramp; ``karras``, ``exponential``, ``beta`` or
``none`` replace it (diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
``use_beta_sigmas`` on that config: the ramp in t between the shifted grid's ends, from t = 1). These
are a flow model's Karras and exponential grids as its pipeline makes them; ``schedule=karras`` on a
flow model is instead Karras's ρ = 7 ramp in σ between the model's σ_min and σ_max (~1,600 at t ≈ 0.9994)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import Choice, ConfigError, FlowModel, Schedule, flow_config, flow_match_sigmas, flow_sigma, hookimpl


class Ramp(Choice):
    config = "config"
    none = "none"
    karras = "karras"
    exponential = "exponential"
    beta = "beta"


RAMPS = ("karras", "exponential", "beta")


class Grid(Choice):
    auto = "auto"
    default = "default"
    linspace = "linspace"


@dataclass
class FlowMatch:
    grid: Grid = Grid.auto
    ramp: Ramp = Ramp.config

    @hookimpl
    def schedule(self, model, steps):
        if not isinstance(model, FlowModel):
            raise ConfigError(f"needs a flow model (model=sd3, flux, or parametrization=flow), not {type(model).__name__}: "
                              "use e.g. schedule=karras")
        config = getattr(model, "scheduler_config", None) or flow_config(None)
        if self.ramp != "config":
            config = {**config, **{f"use_{r}_sigmas": r == self.ramp for r in RAMPS}}
        grid = getattr(model, "flow_grid", "default") if self.grid == "auto" else str(self.grid)
        given = np.linspace(1.0, 1 / steps, steps) if grid == "linspace" else None
        t = flow_match_sigmas(config, steps, mu=getattr(model, "mu", None), sigmas=given)
        sigmas = tuple(flow_sigma(float(v)) for v in t)
        # diffusers starts from the unit noise itself at t₀: y = ε/(1 − t₀) = (1 + σ₀)·ε (1 at σ₀ = ∞)
        return Schedule(sigmas, None, 1.0 if sigmas[0] == float("inf") else 1 + sigmas[0])
