"""Self-attention guidance, SAG (Hong et al. 2023, "Improving Sample Quality of Diffusion Models
Using Self-Attention Guidance"), as diffusers' StableDiffusionSAGPipeline implements it, in σ-space:

1. the evaluation captures the self-attention probabilities of one layer (``layer``; null: the
   first mid-block transformer block, the pipeline's ``mid_block.attentions[0]``), averaged over
   heads; the mask marks the key tokens whose summed attention exceeds 1 (attended more than
   average), reshaped to that layer's grid and upsampled (nearest) to the latent;
2. the prediction x̂₀ = D_u (D_c without CFG) is blurred (Gaussian, ``kernel_size`` taps, σ
   ``blur_sigma`` pixels; the pipeline's 9 and 1.0) inside the mask: x̂₀' = mask·blur(x̂₀) + (1 − mask)·x̂₀;
3. x̂₀' is re-noised with the evaluation's own noise estimate ε̂ = (x − x̂₀)/σ: x' = x̂₀' + σ·ε̂;
4. one more network evaluation D' = D(x', σ) on the negative prompt (the prompt without CFG);
5. the paper's ε-space rule ε ← ε + scale·(ε̂ − ε'), ε' = (x' − D')/σ, which in D is
   D ← D + scale·(x̂₀' − D').

The extra evaluation depends on the first one's output, so it is a call of its own: +1 network
input, +1 call and +1 NFE per guided evaluation (a step with CFG: 3 inputs, 1.5 NFE in the CFG-pair
convention). Write it after ``cfg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import (
    ConfigError, UncondGuidance, check_window, default_layers, gaussian_blur_2d, grid_of, hookimpl, step_window,
)


@dataclass
class SAG:
    scale: float = 0.75
    layer: int | None = None
    blur_sigma: float = 1.0
    kernel_size: int = 9
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if not self.blur_sigma > 0 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"guidance.sag needs blur_sigma > 0 and an odd kernel_size ≥ 1, got {self.blur_sigma} and {self.kernel_size}")

    @hookimpl
    def configure(self, run):
        check_window("sag", self.start, self.stop)
        guidance = run.plugins.by_group("guidance")
        mine = next(k for k, e in enumerate(guidance) if e.obj is self)
        later = [e.name for e in guidance[mine + 1:] if isinstance(e.obj, UncondGuidance)]
        if later:
            raise ConfigError(f"guidance {later[0]} comes after sag and would overwrite its term: write guidance=[{later[0]},sag]")
        if self.scale != 0:
            run.request_attention_map("sag", default_layers(run.model)[0] if self.layer is None else self.layer)

    @hookimpl
    def guidance(self, state, pred):
        maps = pred.attention.get("sag")
        if maps is None or not step_window(self.start, self.stop, state.index, state.schedule.steps):
            return pred
        with_cfg = pred.uncond_denoised is not None
        x0 = pred.uncond_denoised if with_cfg else (pred.cond_denoised if pred.cond_denoised is not None else pred.denoised)
        degraded = self.degraded(maps["uncond"] if with_cfg else maps["cond"], x0)
        x_deg = degraded + (pred.x - x0)  # x̂₀' + σ·ε̂
        d_deg = state.run.model.evaluate(state, x_deg, pred.sigma, prompt="uncond" if with_cfg else "cond")
        return pred.with_denoised(pred.denoised + self.scale * (degraded - d_deg))

    def degraded(self, attn: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x̂₀ blurred where the attention mask (step 1) is set."""
        b, c, h, w = x0.shape
        gh, gw = grid_of(attn.shape[-1], h / w)
        mask = (attn.sum(dim=1) > 1.0)[:, :gh * gw].reshape(b, 1, gh, gw).to(x0.dtype)
        mask = torch.nn.functional.interpolate(mask, (h, w))
        return gaussian_blur_2d(x0, self.kernel_size, self.blur_sigma) * mask + x0 * (1 - mask)
