"""Stray marks and edge sharpness of pictures of the bundled world (issue 29).

The world paints flat colours: every pixel of a scene is its background colour, one of its shape
colours (or a striped shape's dark band), or, on a one-pixel anti-aliased edge, a blend of two of
them. A *stray mark* is a pixel far from every colour of its scene and away from any edge between
two of them: the dark blobs and coloured specks a VAE or a sampler adds.

``stray_share``: per image, the share of pixels whose colour lies farther than ``far`` (Euclidean
distance in RGB, images in [0, 1]) from every palette colour and outside the edge band, i.e. no
two palette colours each have a clean pixel within ``band`` pixels (Chebyshev) of it.

Thresholds: ``far = 0.2`` is about three times the world's colour jitter (±0.04 a channel, at most
0.07 apart in RGB), so real scenes measure 0, and below the distance of the two closest world
colours (orange and yellow, 0.33), so a speck of one world colour on another is counted;
``band = 2`` pixels leaves out the world's anti-aliased edges (1 pixel) and an edge blurred over
up to about 4 pixels, but not a blob inside a shape. The palette is refined once per image (each
colour moves to the mean of the pixels within ``far`` of it), so a uniform tint of a generated
picture is not a mark.

``edge_width``: the 10–90 % rise width of the edges, in pixels per boundary step: the number of
pixels whose colour lies between its two nearest palette colours A and B (projection α on A→B in
[0.1, 0.9], at most ``far`` off the segment) over the number of neighbouring pixel pairs whose
nearest palette colours differ (the boundary's length in grid steps). Real scenes (1-pixel
anti-aliasing) measure about 0.5; a blurred edge more.

Palettes: :func:`scene_palette` (from a scene's exact labels; a striped shape adds its bands and
their blends, so that stripes painted soft count against the stripes, not as marks) or :func:`prompt_palette` (the colour
words of a prompt, plus the picture's border colour as its background, plus the shape colours' stripe
bands for a picture the judge calls striped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.bundled.world import BACKGROUNDS, RGB, SceneLabel

FAR = 0.2
"""A pixel farther than this (RGB Euclidean, [0, 1]) from every scene colour is off-palette."""
BAND = 2
"""Pixels within this many pixels of clean pixels of two palette colours are edge pixels."""


def stripe_colour(colour: str) -> tuple[float, float, float]:
    """The dark band of a striped shape of ``colour`` (as the world draws it)."""
    if colour == "black":
        return (0.85, 0.85, 0.85)
    return tuple(0.3 * c for c in RGB[colour])  # type: ignore[return-value]


def stripe_bands(colour: str) -> list[tuple[float, float, float]]:
    """A striped shape's colours besides ``colour``: its dark band and their blends at 1/4, 1/2 and
    3/4 (a softened texture is no stray mark)."""
    dark = stripe_colour(colour)
    return [tuple(a + t * (b - a) for a, b in zip(RGB[colour], dark)) for t in (0.25, 0.5, 0.75, 1.0)]


def scene_palette(label: SceneLabel) -> torch.Tensor:
    """The nominal colours [k, 3] of a scene: background, each shape, and for a striped shape its
    :func:`stripe_bands`."""
    cols = [RGB[label.background]]
    for obj in label.objects:
        cols.append(RGB[obj.colour])
        if obj.striped:
            cols += stripe_bands(obj.colour)
    return torch.tensor(cols, dtype=torch.float32)


def border_colour(image: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Per-channel median [3] of the outer ``width``-pixel ring of an image [3, H, W]."""
    ring = torch.ones(image.shape[-2:], dtype=torch.bool)
    ring[width:-width, width:-width] = False
    return image[:, ring].median(dim=1).values


def prompt_palette(prompt: str, image: torch.Tensor, striped: bool = False) -> torch.Tensor:
    """The colours [k, 3] a picture of ``prompt`` may show: every world colour word of the prompt
    (shapes and a named background), the picture's border colour (its background, unless it is
    within ``FAR`` of a named colour: two near-equal entries would split the background in two) and,
    when the picture is ``striped`` (the world's concept, which captions never name: the bundled
    judge's striped head tells), the :func:`stripe_bands` of each shape colour."""
    words = prompt.lower().replace(",", " ").split()
    named = torch.tensor([RGB[w] for w in dict.fromkeys(words) if w in BACKGROUNDS], dtype=torch.float32).reshape(-1, 3)
    border = border_colour(image.float().cpu())[None]
    if not (len(named) and torch.cdist(border, named).min() <= FAR):  # the named background: once, not twice
        named = torch.cat([named, border])
    if not striped:
        return named
    shapes = dict.fromkeys(w for w, nxt in zip(words, words[1:] + [""]) if w in RGB and nxt != "background")
    return torch.cat([named, *(torch.tensor(stripe_bands(c)) for c in shapes)])


def _refine(image: torch.Tensor, palette: torch.Tensor, far: float) -> torch.Tensor:
    """Each palette colour moved to the mean of the pixels within ``far`` of it (kept when fewer
    than 4 pixels are)."""
    pix = image.reshape(3, -1).T  # [hw, 3]
    d = torch.cdist(palette, pix)  # [k, hw]
    near = d <= far
    count = near.sum(1, keepdim=True)
    mean = (near.float() @ pix) / count.clamp(min=1)
    return torch.where(count >= 4, mean, palette)


def _analyse(image: torch.Tensor, palette: torch.Tensor, far: float, band: int) -> dict[str, torch.Tensor]:
    """Per-pixel distances and classes of one image [3, H, W] against its palette [k, 3]."""
    image = image.float().cpu().clamp(0, 1)
    palette = _refine(image, palette.float().cpu(), far)
    h, w = image.shape[-2:]
    pix = image.reshape(3, -1).T
    d = torch.cdist(pix, palette)  # [hw, k]
    dmin, cls = d.min(dim=1)
    clean = dmin <= far
    onehot = F.one_hot(cls, len(palette)).T.float() * clean  # [k, hw]: clean pixels of each colour
    present = F.max_pool2d(onehot.reshape(1, -1, h, w), 2 * band + 1, stride=1, padding=band)[0]
    edge = (present.sum(0) >= 2).reshape(-1)
    return {"pix": pix, "palette": palette, "d": d, "cls": cls.reshape(h, w), "clean": clean,
            "edge": edge, "stray": ~clean & ~edge}


def stray_mask(image: torch.Tensor, palette: torch.Tensor, far: float = FAR, band: int = BAND) -> torch.Tensor:
    """Bool [H, W]: the stray-mark pixels of one image [3, H, W] in [0, 1]."""
    a = _analyse(image, palette, far, band)
    return a["stray"].reshape(image.shape[-2:])


def _edge_counts(a: dict[str, torch.Tensor], far: float) -> tuple[int, int]:
    """(ramp pixels, boundary steps) of one analysed image."""
    cls = a["cls"]
    steps = int((cls[:, 1:] != cls[:, :-1]).sum() + (cls[1:, :] != cls[:-1, :]).sum())
    if len(a["palette"]) < 2:
        return 0, steps
    two = a["d"].topk(2, dim=1, largest=False).indices  # [hw, 2]
    pa, pb = a["palette"][two[:, 0]], a["palette"][two[:, 1]]
    ab = pb - pa
    alpha = ((a["pix"] - pa) * ab).sum(1) / ab.pow(2).sum(1).clamp(min=1e-8)
    off = (a["pix"] - (pa + alpha[:, None] * ab)).norm(dim=1)
    ramp = a["edge"] & (alpha >= 0.1) & (alpha <= 0.9) & (off <= far) & (ab.norm(dim=1) > far)
    return int(ramp.sum()), steps


def measure(images: torch.Tensor, palettes: list[torch.Tensor], far: float = FAR,
            band: int = BAND) -> dict[str, torch.Tensor | float]:
    """Stray marks and edge sharpness of images [n, 3, H, W] in [0, 1] with their palettes.

    Returns ``stray_share`` (tensor [n]: share of stray-mark pixels per image), ``stray_images``
    (share of images with any stray pixel), ``edge_width`` (10–90 % rise width over all images:
    ramp pixels / boundary steps), and the counts behind it (``ramp_pixels``, ``boundary_steps``).
    """
    if len(images) != len(palettes):
        raise ValueError(f"{len(images)} images but {len(palettes)} palettes")
    shares, ramp, steps = [], 0, 0
    for image, palette in zip(images, palettes):
        a = _analyse(image, palette, far, band)
        shares.append(a["stray"].float().mean())
        r, s = _edge_counts(a, far)
        ramp, steps = ramp + r, steps + s
    share = torch.stack(shares) if shares else torch.zeros(0)
    return {"stray_share": share, "stray_images": float((share > 0).float().mean()) if len(share) else 0.0,
            "edge_width": ramp / steps if steps else float("nan"), "ramp_pixels": float(ramp),
            "boundary_steps": float(steps)}


def measure_scenes(images: torch.Tensor, labels: list[SceneLabel], **kw) -> dict[str, torch.Tensor | float]:
    """:func:`measure` with palettes from the scenes' exact labels (real scenes, reconstructions)."""
    return measure(images, [scene_palette(lab) for lab in labels], **kw)


def measure_prompts(images: torch.Tensor, prompts: list[str], striped=None, **kw) -> dict[str, torch.Tensor | float]:
    """:func:`measure` with palettes from prompts (generations): named colours + border colour, and
    the stripe bands of the pictures flagged in ``striped`` (one bool per image, e.g. the judge's
    striped head; None: none)."""
    flags = [False] * len(prompts) if striped is None else [bool(f) for f in striped]
    return measure(images, [prompt_palette(p, im, f) for p, im, f in zip(prompts, images, flags)], **kw)


def error_quantile(rec: torch.Tensor, ref: torch.Tensor, q: float = 0.999) -> float:
    """The ``q`` quantile over all pixels of the per-pixel error (largest channel difference) of
    images in [0, 1] (reconstructions clamped to [0, 1])."""
    err = (rec.clamp(0, 1) - ref).abs().amax(dim=1).flatten().float()
    k = max(1, int(round(q * len(err))))
    return float(err.kthvalue(k).values)


__all__ = ["BAND", "FAR", "border_colour", "error_quantile", "measure", "measure_prompts", "measure_scenes",
           "prompt_palette", "scene_palette", "stray_mask", "stripe_bands", "stripe_colour"]
