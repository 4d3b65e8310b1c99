"""Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
Optimization Perspective", Algorithm 2): step along ε̄ = γ·ε_t + (1 − γ)·ε_prev, where ε = (x − D)/σ
is this step's noise estimate and ε_prev the previous step's; the first step uses ε_t. γ = 1 is the
base solver exactly; the paper recommends γ = 2. (In the family's convention the weight of the past
is 1 − γ.) The step to σ = 0 (``final``): ``corrected`` (default) steps along ε̄ there too, landing
on x − σ·ε̄; ``denoise`` leaves D uncorrected, so the step lands on D, as ComfyUI's
``gradient_estimation`` sampler does."""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import Choice, MomentumPlugin, hookimpl, past_derivative


class Final(Choice):
    """The step to σ = 0: along the corrected ε̄ (``corrected``) or onto D (``denoise``, ComfyUI)."""

    corrected = "corrected"
    denoise = "denoise"


@dataclass
class GradientEstimation(MomentumPlugin):
    gamma: float = 2.0
    final: Final = Final.corrected

    @hookimpl
    def momentum(self, state, pred):
        if not state.history or self.gamma == 1.0 or (state.sigma_next == 0 and self.final == "denoise"):
            return pred
        eps = self.gamma * pred.derivative + (1 - self.gamma) * past_derivative(state.history[-1])
        return pred.with_denoised(pred.x - pred.sigma * eps)
