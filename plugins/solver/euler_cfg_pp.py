"""Euler CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance"): step to
the guided estimate but re-noise with the unconditional noise estimate,
x' = D_guided + σ'·(x − D_uncond)/σ. Use with a small guidance scale (the paper's λ ∈ [0, 1], e.g.
``cfg_scale=0.6``).

On a text-conditioned model the solver requests the unconditional pass itself and needs a CFG
combiner in the guidance list (cfg, cfg_rescale, apg, interval: the plugins that make D_guided from
the two halves); without one there is no guided estimate and the run is refused at start-up. An
unconditional model has no unconditional pass (D_uncond = D): the step is Euler's exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import ConfigError, UncondGuidance, hookimpl


class CFGPP:
    """What the CFG++ solvers share: the unconditional pass and a CFG combiner on conditional models."""

    @hookimpl
    def configure(self, run) -> None:
        if not run.model.is_conditional:
            return
        if not any(isinstance(e.obj, UncondGuidance) for e in run.plugins.by_group("guidance")):
            raise ConfigError(f"solver={run.plugins.name_of(self)} steps to the CFG-guided estimate: add a CFG "
                              "combiner, e.g. guidance=[cfg] cfg_scale=0.6 (CFG++'s λ in [0, 1])")
        run.request_uncond()


@dataclass
class EulerCFGPP(CFGPP):
    capturable: ClassVar[bool] = True  # compile=step: tensor arithmetic of σ and the CFG pair

    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        if pred.uncond_denoised is None:
            return pred.x + (state.sigma_next - state.sigma) * pred.derivative
        return pred.denoised + state.sigma_next * (pred.x - pred.uncond_denoised) / state.sigma
