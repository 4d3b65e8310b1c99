"""True autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
eq. 1 with the unconditional model replaced by a weaker conditional one):

    D = D_guide + w·(D_main − D_guide),

both denoisers conditional on the prompt. The guide is a separately trained, deliberately weaker
network of the same family — ``guide: bundled`` (the small, briefly trained UNet shipped with the
bundled model, recipe in framework/bundled/MODEL_CARD.md) or a local diffusers UNet/transformer or
pipeline folder — evaluated through the main model's own adapter (framework ``load_guide``).
It replaces ``cfg``: no unconditional pass; each step costs the main network's conditional input
and one guide input on the guide network (record: ``network_inputs`` 2 per evaluation, so
``nfe_pairs`` counts it like a CFG pair; ``guide_inputs`` the guide's share). ``scale: null`` is the
run's ``cfg_scale``; outside the ``start``/``stop`` window (fractions of the steps) D = D_main and
the guide is not evaluated. (``guidance=autoguidance`` is diffusers' layer-skip approximation.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import ConfigError, UncondGuidance, check_window, hookimpl, load_guide, step_window


@dataclass
class AutoGuidanceModel:
    input_files: ClassVar[tuple[str, ...]] = ("guide",)  # a local guide folder, by content in the run key
    guide: str = "bundled"
    scale: float | None = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        check_window("autoguidance_model", self.start, self.stop)
        if not isinstance(self.guide, str) or not self.guide:
            raise ConfigError(f"guidance.autoguidance_model.guide must be 'bundled' or a folder, got {self.guide!r}")

    @hookimpl
    def configure(self, run):
        cfg = [e.name for e in run.plugins.by_group("guidance") if isinstance(e.obj, UncondGuidance)]
        if cfg:
            raise ConfigError(f"autoguidance_model replaces the CFG combiner: remove {cfg[0]} from guidance "
                              "(the guide model takes the unconditional pass's place)")
        if not run.model.is_conditional:
            raise ConfigError(f"autoguidance_model needs a text-conditioned model, not {type(run.model).__name__}: "
                              "use model=bundled, sd15, … (the guide shares the prompt)")
        run.stash.get(self, lambda: {})["guide"] = load_guide(run.model, self.guide)

    @hookimpl
    def guidance(self, state, pred):
        if not step_window(self.start, self.stop, state.index, state.schedule.steps):
            return pred
        guide = state.run.stash.get(self, dict)["guide"]
        scale = state.run.settings.cfg_scale if self.scale is None else self.scale
        weak = guide.denoise(state, pred.x, pred.sigma)
        return pred.with_denoised(weak + scale * (pred.denoised - weak))

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        if not batch.resumed:
            run.stash.get(self, lambda: {}).setdefault("counts", []).append(run.stash.get(self, dict)["guide"].inputs(batch))

    @hookimpl
    def run_end(self, run, result):
        counts = run.stash.get(self, dict).get("counts")
        if counts:  # guide network inputs per sample (already part of network_inputs and unet_calls)
            run.metrics["guide_inputs"] = sum(counts) / len(counts)
