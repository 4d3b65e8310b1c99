"""FDG, frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain Enables
High-Fidelity Sampling at Low CFG Scales"): CFG applied separately to the levels of a Laplacian
pyramid of the predictions, with a high scale for the high frequencies and a low one for the low.

Both predictions are split into ``levels`` Laplacian levels (the paper's Algorithm 2: level k is
G_k − up(G_{k+1}) of the Gaussian pyramid G_0 = p, G_{k+1} = down(G_k), the last level G_{L−1});
at level k, Δ_k = p_c,k − p_u,k, optionally re-weighted along p_c,k (Δ_k ← ``parallel_weight``·Δ_∥ + Δ_⊥,
APG's projection), then p_k = p_u,k + w_k·Δ_k; the pyramid is collapsed back. w_0 (the finest
level) is the top-level ``cfg_scale``, w_{L−1} (the coarsest) is ``low_scale`` (default: half of
``cfg_scale``, the ratio of diffusers' default scales [10, 5]), the levels between are linear
in k. The pyramid is kornia's (which diffusers' FrequencyDecoupledGuidance calls: a 5×5 binomial
blur with reflected borders, bilinear halving and doubling), written here in torch, so kornia is
not needed (it is the ``fdg`` extra, for the parity test only).
kornia pads a latent whose sides are not divisible by 2^(levels−1), or of which neither side is a
power of two, to powers of two and diffusers does not crop the result; here such a latent is a
config error instead.

Space: ``native`` by default (the model's output, where diffusers applies it), ``denoised`` as an
option: the pyramid is linear, so without ``parallel_weight`` the two agree. ``start``/``stop``:
the guidance window as fractions of the run. Use instead of ``cfg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from framework.plugin import ConfigError, NativeGuidance, hookimpl, split_parallel

#: The pyramid's blur: the outer product of the binomial taps [1, 4, 6, 4, 1]/16.
TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    taps = torch.tensor(TAPS, dtype=x.dtype, device=x.device) / 16
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then halve each side (bilinear, half-pixel centres)."""
    h, w = x.shape[-2:]
    return F.interpolate(_blur(x), size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def up(x: torch.Tensor) -> torch.Tensor:
    """Double each side (bilinear, half-pixel centres), then blur."""
    h, w = x.shape[-2:]
    return _blur(F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[G_0 − up(G_1), …, G_{L−2} − up(G_{L−1}), G_{L−1}] of a [B, C, H, W] tensor."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(down(gauss[-1]))
    return [g - up(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def collapse(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The tensor a Laplacian pyramid was built from (the inverse of :func:`laplacian_pyramid`)."""
    x = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        x = up(x) + level
    return x


@dataclass
class FDG(NativeGuidance):
    low_scale: float | None = None
    levels: int = 2
    parallel_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels < 2:
            raise ConfigError(f"fdg.levels must be ≥ 2 (one level is plain CFG), got {self.levels}")

    @hookimpl
    def configure(self, run) -> None:
        super().configure(run)
        shape = run.model.latent_shape
        stride = 2 ** (self.levels - 1)
        fits = len(shape) == 3 and all(side % stride == 0 and side // stride >= 3 for side in shape[1:])
        if run.model.is_conditional and not fits:
            raise ConfigError(f"fdg.levels={self.levels} needs latents [C, H, W] with H and W multiples of {stride} "
                              f"and at least {3 * stride}; this model's are {list(shape)}: lower fdg.levels")

    def scales(self, scale: float) -> list[float]:
        """w_k from the finest level (``cfg_scale``) to the coarsest (``low_scale``), linear in k."""
        low, n = scale / 2 if self.low_scale is None else self.low_scale, self.levels - 1
        return [scale + (low - scale) * k / n for k in range(self.levels)]

    def combine(self, state, cond, uncond):
        pc, pu = laplacian_pyramid(cond, self.levels), laplacian_pyramid(uncond, self.levels)
        guided = []
        for c, u, w in zip(pc, pu, self.scales(state.run.settings.cfg_scale)):
            delta = c - u
            if self.parallel_weight != 1.0:
                parallel, orthogonal = split_parallel(delta, c)
                delta = self.parallel_weight * parallel + orthogonal
            guided.append(u + w * delta)
        return collapse(guided)
