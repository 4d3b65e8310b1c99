"""Autoguidance by layer skipping — diffusers' AutoGuidance approximation of Karras et al. 2024
("Guiding a Diffusion Model with a Bad Version of Itself"): the "bad model" is the same network with
the chosen transformer blocks skipped, evaluated on the negative prompt (diffusers' choice;
``prompt: cond`` guides with the prompt, as autoguidance proper does), and

    D = D_bad + scale·(D_c − D_bad)

(diffusers' AutoGuidance with ``dropout=1.0``: blocks skipped outright; its random dropout < 1 is
not offered, since it would make sampling non-deterministic). It replaces ``cfg``: the branch takes
the unconditional pass's place, so a step costs 2 network inputs (1 NFE in the CFG-pair
convention). ``scale: null`` is the run's ``cfg_scale``; outside the ``start``/``stop`` window
D = D_c. True autoguidance with a separately trained weaker model is not this plugin.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import (
    Choice, ConfigError, Perturbation, UncondGuidance, check_window, default_layers, hookimpl, step_window,
)


class Prompt(Choice):
    uncond = "uncond"
    cond = "cond"


@dataclass
class AutoGuidance:
    scale: float | None = None
    layers: list[int] | None = None
    prompt: Prompt = Prompt.uncond
    start: float = 0.0
    stop: float = 1.0

    def active(self, state, sigma: float = 0.0) -> bool:
        return step_window(self.start, self.stop, state.index, state.schedule.steps)

    @hookimpl
    def configure(self, run):
        check_window("autoguidance", self.start, self.stop)
        cfg = [e.name for e in run.plugins.by_group("guidance") if isinstance(e.obj, UncondGuidance)]
        if cfg:
            raise ConfigError(f"autoguidance replaces the CFG combiner: remove {cfg[0]} from guidance "
                              f"(the skipped-layer branch takes the unconditional pass's place)")
        if self.prompt == Prompt.uncond and not run.model.is_conditional:
            raise ConfigError("autoguidance.prompt=uncond needs a text-conditioned model: set guidance.autoguidance.prompt=cond")
        layers = default_layers(run.model) if self.layers is None else self.layers
        run.request_branch("autoguidance", Perturbation("skip_blocks", layers), prompt=str(self.prompt), when=self.active)

    @hookimpl
    def guidance(self, state, pred):
        bad = pred.branches.get("autoguidance")
        if bad is None:
            return pred
        scale = state.run.settings.cfg_scale if self.scale is None else self.scale
        return pred.with_denoised(bad + scale * (pred.denoised - bad))
