"""Regional prompts: a prompt for a region of the picture, combined as MultiDiffusion's
region-based generation (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for
Controlled Image Generation", eq. 5 with one prompt per region on the whole latent): every region
k = 1…K is a prompt branch of every evaluation (D_k, the network on the whole latent with that
prompt) with a latent-space mask m_k ∈ [0, 1]; the run's prompt is the background, with the mask
m_0 = max(0, 1 − Σ_k m_k), and the conditional prediction becomes

    D_c ← Σ_{k=0…K} m_k·D_k / Σ_{k=0…K} m_k          (D_0 = D_c)

per latent cell, before the CFG combiner (with CFG this equals combining each region's own CFG
prediction D_u + s·(D_k − D_u) with the same weights). A region's mask: a ``box``
[x0, y0, x1, y1] in fractions of the image (x to the right, y down; each latent cell weighted by the
fraction of it the box covers), or a ``mask`` image file (grayscale, white = the region; at the
model's pixel size or its latent size, box-averaged to the latent grid). MultiDiffusion's
"bootstrapping" (the first steps with a random-colour background) is not done.

``regions``: a list of {prompt, box} or {prompt, mask}; ``start``/``stop``: the steps
⌊start·N⌋ ≤ i < ⌊stop·N⌋ where the regions apply (elsewhere no branch is evaluated). Write it
before the CFG combiner: ``guidance=[regional,cfg]``; K regions add K network inputs per sample to
the one call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from framework.plugin import ConfigError, check_window, hookimpl, load_image, step_window
from plugins.guidance.prompt_branch import check_first, check_prompt, with_cond


def box_mask(box: tuple[float, float, float, float], h: int, w: int) -> torch.Tensor:
    """[1, 1, h, w]: the fraction of each latent cell that the box (fractions of the image) covers."""
    x0, y0, x1, y1 = box

    def cover(a: float, b: float, n: int) -> torch.Tensor:
        cells = torch.arange(n, dtype=torch.float64)
        return (torch.minimum(cells + 1, torch.tensor(b * n)) - torch.maximum(cells, torch.tensor(a * n))).clamp(0, 1)

    return (cover(y0, y1, h)[:, None] * cover(x0, x1, w)[None, :])[None, None].float()


def check_box(key: str, box: Any) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4:
        raise ConfigError(f"{key} must be [x0, y0, x1, y1] in fractions of the image, got {box!r}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConfigError(f"{key}={list(values)} is outside the image: need 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1")
    return values  # type: ignore[return-value]


def file_mask(key: str, path: str, model: Any) -> torch.Tensor:
    """[1, 1, h, w] in [0, 1] from a grayscale image at the model's pixel or latent size."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = model.latent_shape
    sizes = [(h, w)]
    vae = getattr(model, "vae", None)
    if vae is not None:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        sizes.insert(0, (h * f, w * f))
    file = Path(str(path)).expanduser()
    if not str(path) or not file.is_file():
        raise ConfigError(f"mask '{path}' not found: give an existing image file in {key}")
    try:
        with Image.open(file) as img:
            size = (img.height, img.width)
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"'{path}' is not an image that can be read ({type(e).__name__}): give a mask image in {key}") from e
    if size not in sizes:
        want = " or ".join(f"{b}×{a}" for a, b in sizes)
        raise ConfigError(f"mask '{path}' is {size[1]}×{size[0]} pixels: {key} must be {want} (width×height) for this model")
    return load_image(str(file), (h, w), key, mode="L")


@dataclass
class Region:
    prompt: str
    box: tuple[float, float, float, float] | None
    mask: str | None


@dataclass
class Regional:
    input_files: ClassVar[tuple[str, ...]] = ("regions.mask",)  # each region's mask file, by content in the run key
    regions: list[Any] = field(default_factory=list)
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        check_window("regional", self.start, self.stop)
        self.masks: list[torch.Tensor] = []

    def parsed(self) -> list[Region]:
        """The regions, checked (one line for a missing prompt, a box outside the image, …)."""
        if not self.regions:
            raise ConfigError("guidance.regional.regions is empty: give a list of {prompt, box} or {prompt, mask}")
        parsed = []
        for k, item in enumerate(self.regions):
            key = f"guidance.regional.regions[{k}]"
            get = item.get if hasattr(item, "get") else (lambda name, default=None: default)
            prompt = check_prompt(f"{key}.prompt", get("prompt"))
            box, mask = get("box"), get("mask")
            if (box is None) == (mask is None):
                raise ConfigError(f"{key} needs exactly one of box=[x0, y0, x1, y1] (fractions) or mask=<image file>")
            parsed.append(Region(prompt, None if box is None else check_box(f"{key}.box", box),
                                 None if mask is None else str(mask)))
        return parsed

    def active(self, state: Any, sigma: float = 0.0) -> bool:
        return step_window(self.start, self.stop, state.index, state.schedule.steps)

    @hookimpl
    def configure(self, run) -> None:
        regions = self.parsed()
        check_first(run, self, "regional")
        c, h, w = run.model.latent_shape
        self.masks = [box_mask(r.box, h, w) if r.box is not None else file_mask(f"guidance.regional.regions[{k}].mask", r.mask, run.model)
                      for k, r in enumerate(regions)]
        for k, r in enumerate(regions):
            run.request_branch(f"regional{k}", text=r.prompt, when=self.active)

    @hookimpl
    def guidance(self, state, pred):
        names = [f"regional{k}" for k in range(len(self.masks))]
        if any(name not in pred.branches for name in names):
            return pred
        base = pred.cond_denoised if pred.cond_denoised is not None else pred.denoised
        masks = [m.to(base.device, base.dtype) for m in self.masks]
        background = (1 - sum(masks)).clamp_min(0)
        total = background * base
        for m, name in zip(masks, names):
            total = total + m * pred.branches[name]
        return with_cond(pred, total / (background + sum(masks)))
