"""What guidance plugins share: the unconditional-pass request of the CFG combiners, image files
(img2img, inpainting, reference images) and the small feature net of the perceptual and style
losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from framework.core.markers import hookimpl
from framework.core.errors import ConfigError


class UncondGuidance:
    """Base of guidance plugins that combine the conditional and unconditional predictions: on a
    text-conditioned model it requests the batched negative-prompt pass in ``configure``; the
    plugin's ``guidance`` hook leaves predictions without one (unconditional models) unchanged."""

    @hookimpl
    def configure(self, run) -> None:
        if run.model.is_conditional:
            run.request_uncond()


def pixel_size(model) -> tuple[int, int]:
    """(H, W) of the images a latent-diffusion model decodes to."""
    c, h, w = model.latent_shape
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return h * factor, w * factor


def load_image(path: str, size: tuple[int, int], key: str = "guidance.img2img.image", mode: str = "RGB") -> torch.Tensor:
    """A [1, C, H, W] float tensor in [0, 1] from an image file (RGB, or ``mode="L"`` for a mask),
    resized to ``size`` (H, W). ``key`` names the config key in the error of a missing file."""
    from PIL import Image, UnidentifiedImageError

    file = Path(str(path)).expanduser()
    if not str(path) or not file.is_file():
        raise ConfigError(f"image '{path}' not found: give an existing image file in {key}")
    try:
        img = Image.open(file).convert(mode)  # convert() reads the pixels: a truncated file fails here
    except (UnidentifiedImageError, OSError) as e:  # not an image, or a truncated one
        raise ConfigError(f"'{path}' is not an image (PNG, JPEG, …) that can be read ({type(e).__name__}): "
                          f"give an image file in {key}") from e
    resample = Image.Resampling.BOX if mode == "L" else Image.Resampling.BICUBIC
    arr = np.asarray(img.resize((size[1], size[0]), resample)).copy()
    t = torch.from_numpy(arr).float() / 255
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1))[None]


#: Taps of the bundled judge's conv trunk (after each block's last activation): 32, 16, 8, 4 px.
JUDGE_TAPS = (1, 6, 11, 16)


class JudgeFeatures(torch.nn.Module):
    """Feature maps of the bundled judge's conv layers (framework/bundled/judge.py) for images in
    [0, 1] (any size; resized to the judge's 64×64): a small CNN trained on the world's colours,
    shapes and stripes, frozen. Used by the perceptual distance and the Gram (style) statistics."""

    def __init__(self) -> None:
        super().__init__()
        from framework.bundled import load_judge

        judge = load_judge()
        self.layers = judge.features[: JUDGE_TAPS[-1] + 1].requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = images * 2 - 1
        if h.shape[-2:] != (64, 64):
            h = torch.nn.functional.interpolate(h, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        out = []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in JUDGE_TAPS:
                out.append(h)
        return out


def perceptual_distance(fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample distance of feature lists (LPIPS without learned weights): features normalised
    to unit length over channels at each position, squared difference averaged, summed over layers."""
    def unit(f):
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)

    return sum((unit(a) - unit(b)).pow(2).sum(1).flatten(1).mean(1) for a, b in zip(fa, fb))


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices [n, C, C] of feature maps [n, C, H, W], normalised by C·H·W (Gatys et al. 2016)."""
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)
