"""The autoencoder and its latent space: encode a real photo and the bundled world's scenes, show the
latent channels, the reconstruction, the compression factor, and what decoding a noised or edited
latent gives.

    python -m experiments.autoencoder               # docs/deep_dive/autoencoder_*.png, autoencoder.json
    python -m experiments.autoencoder fast=true out=/tmp/dd
    python -m experiments.autoencoder model=sd15 model.path=/path/to/sd15 out=/tmp/sd

Latents are the model's scaled latents z = scaling_factor·mean(q(z|x)) — what the UNet sees.
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.harness import (Experiment, entry, load_model, psnr, pyplot, require_vae, sample_photo, save_figure, show,
                                 world_scenes)
from framework.plugin import ConfigError, pixel_size

HERE = Path(__file__).resolve().parent


def latents_figure(images, latents, recon, names, path, files) -> None:
    plt = pyplot()
    n, c = latents.shape[:2]
    fig, axes = plt.subplots(n, c + 2, figsize=(1.45 * (c + 2), 1.6 * n + 0.5), squeeze=False)
    quality = psnr(recon, images).tolist()
    lim = float(latents.abs().max())
    for r in range(n):
        show(axes[r, 0], images[r], f"input {tuple(images.shape[1:])}" if r == 0 else None)
        axes[r, 0].set_ylabel(names[r], fontsize=7)
        for k in range(c):
            show(axes[r, k + 1], latents[r, k], f"latent ch {k} {tuple(latents.shape[2:])}" if r == 0 else None,
                 cmap="RdBu_r", vmin=-lim, vmax=lim)
        show(axes[r, c + 1], recon[r], f"decoded, {quality[r]:.1f} dB")
        if r:
            axes[r, c + 1].set_title(f"{quality[r]:.1f} dB", fontsize=7)
    fig.suptitle("encode → latent channels (shared colour scale, red > 0 > blue) → decode", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)


def noise_figure(model, latents, names, sigmas, seed, path, files) -> None:
    plt = pyplot()
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(latents.shape, generator=gen).to(latents)
    fig, axes = plt.subplots(len(latents), len(sigmas), figsize=(1.45 * len(sigmas), 1.6 * len(latents) + 0.4), squeeze=False)
    for j, s in enumerate(sigmas):
        imgs = model.decode(latents + s * eps).cpu()
        for r in range(len(latents)):
            show(axes[r, j], imgs[r], f"σ = {s:g}" if r == 0 else None)
            if j == 0:
                axes[r, 0].set_ylabel(names[r], fontsize=7)
    fig.suptitle("decode(z + σ·ε): latent noise decodes to coloured blotches, not pixel noise", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)


def edits_figure(model, images, latents, interpolation, factor, path, files) -> dict[str, float]:
    """Rows (on the first scene): one latent channel zeroed at a time; other edits; then a latent
    vs a pixel blend of the last two scenes."""
    plt = pyplot()
    z, a, b = latents[1], latents[-2], latents[-1]
    c = z.shape[0]
    rows: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    zeroed = [("original", z)] + [(f"ch {k} = 0", z * (torch.arange(c, device=z.device) != k).view(-1, 1, 1)) for k in range(c)]
    rows.append(("zero a channel", zeroed))
    rows.append(("other edits", [("z × 0.5", z * 0.5), ("z × 1.5", z * 1.5), (f"shift 1 latent px\n= {factor} px", torch.roll(z, 1, dims=2)),
                                 ("flip", torch.flip(z, dims=[2])), ("−z", -z)]))
    ts = torch.linspace(0, 1, interpolation).tolist()
    rows.append(("latent blend", [(f"t = {t:.2f}", (1 - t) * a + t * b) for t in ts]))
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(1.45 * cols, 1.75 * (len(rows) + 1) + 0.4), squeeze=False)
    for i, (label, items) in enumerate(rows):
        decoded = model.decode(torch.stack([t for _, t in items])).cpu()
        for j, (name, _) in enumerate(items):
            show(axes[i, j], decoded[j], name)
        axes[i, 0].set_ylabel(label, fontsize=7)
    pa, pb = images[-2], images[-1]
    for j, t in enumerate(ts):
        show(axes[len(rows), j], (1 - t) * pa + t * pb, f"t = {t:.2f}")
    axes[len(rows), 0].set_ylabel("pixel blend", fontsize=7)
    for ax in axes.flat:
        if not ax.images:
            ax.axis("off")
    fig.suptitle("decoding edited latents", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)
    # a measurable fact for the record: does shifting the latent shift the image by `factor` pixels?
    shifted = model.decode(torch.roll(z, 1, dims=2)[None]).cpu()[0]
    base = model.decode(z[None]).cpu()[0]
    crop = (slice(None), slice(factor * 2, -factor * 2), slice(factor * 2, -factor * 2))
    return {"shift_psnr_vs_shifted_image": float(psnr(shifted[crop][None], torch.roll(base, factor, dims=2)[crop][None])),
            "shift_psnr_vs_unshifted_image": float(psnr(shifted[crop][None], base[crop][None]))}


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    ex = Experiment.compose(HERE, argv, passthrough=True)
    cfg = ex.cfg
    n_scenes = 2 if cfg.fast else cfg.scenes
    if n_scenes < 2 or cfg.interpolation < 2 or not cfg.noise_sigmas:
        raise ConfigError("autoencoder needs scenes ≥ 2, interpolation ≥ 2 and at least one noise σ")
    model = load_model(ex.run_overrides())
    require_vae(model, "experiments.autoencoder")
    size = pixel_size(model)
    factor = size[0] // model.latent_shape[1]
    scenes, captions = world_scenes(n_scenes, cfg.seed, size)
    images = torch.cat([sample_photo(size, cfg.photo), scenes])
    names = [f"photo ({cfg.photo})"] + [f"scene {k}" for k in range(n_scenes)]
    out = Path(cfg.out)
    files: list[str] = []
    with torch.no_grad():
        latents = model.encode_images(images)
        recon = model.decode(latents).cpu()
        lat = latents.cpu()
        latents_figure(images, lat, recon, names, out / "autoencoder_latents.png", files)
        noise_figure(model, latents[:2], names[:2], list(cfg.noise_sigmas), cfg.seed, out / "autoencoder_noise.png", files)
        shift = edits_figure(model, images, latents, cfg.interpolation, factor, out / "autoencoder_edits.png", files)
    pixels, values = images[0].numel(), lat[0].numel()
    results = {
        "image_shape": list(images.shape[1:]),
        "latent_shape": list(lat.shape[1:]),
        "downsampling_factor": factor,
        "compression_factor": pixels / values,
        "scaling_factor": getattr(model, "scaling_factor", None),
        "psnr_db": dict(zip(names, psnr(recon, images).tolist())),
        "latent_mean_per_channel": lat.mean((0, 2, 3)).tolist(),
        "latent_std_per_channel": lat.std((0, 2, 3)).tolist(),
        "captions": captions,
        **shift,
    }
    return ex.record(out / "autoencoder.json", results, files)


if __name__ == "__main__":
    entry(main)
