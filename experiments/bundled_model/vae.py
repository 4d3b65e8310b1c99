"""Stage ``vae``: a light AutoencoderKL (4 latent channels; n blocks downsample 2^(n−1)×: the shipped
v3's 3 blocks 64×64 → 16×16×4, v2's 4 blocks → 8×8×4).

Loss: L1 + MSE on pixels plus a tiny KL term (optionally: ``outlier_weight`` × the mean of each
image's worst ``outlier_frac`` pixel errors, against edges and stray marks; ``latent_noise``:
Gaussian noise of that std, in the UNet's scaled units, added to the latents before decoding); with ``vae.decoder_only=true`` a second phase
fine-tunes the decoder alone (encoder frozen, so latents cached by the UNet stay valid: the
SD "ft-MSE decoder" recipe), which can run beside the UNet stage; the PSNR on a fixed set of fresh scenes is logged
during training (the curve in the model card). ``scaling_factor`` is set at export from the
standard deviation of the latents.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig

from experiments.bundled_model.common import (batch_of_scenes, count_parameters, data_workers,
                                              initialised_with, step_generator, train_loop)
from experiments.harness import psnr
from framework.bundled import marks
from framework.bundled.world import ScenePlan, sample_scenes

VALIDATION_SEED = 987_654  # fresh scenes, never drawn by a training step


def build_vae(cfg: DictConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL of the configured (light) layout."""
    v = cfg.vae
    n = len(v.channels)
    with initialised_with(cfg.seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(v.channels), layers_per_block=v.layers_per_block,
            norm_num_groups=v.norm_groups, mid_block_add_attention=v.mid_attention)


def spectrum_loss(rec: torch.Tensor, x: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Mean L1 distance of the Fourier magnitudes of Hann-windowed ``patch``-pixel tiles (half
    overlapping). Pixel losses punish a texture drawn with the wrong phase twice as much as no
    texture at all, so a VAE that cannot place the stripes exactly learns to paint them flat;
    magnitudes ignore the phase, so this term rewards stripes of the right period and angle."""
    win = torch.hann_window(patch, periodic=False, device=x.device, dtype=x.dtype)
    win = win[:, None] * win[None, :]

    def mags(img: torch.Tensor) -> torch.Tensor:
        tiles = img.unfold(2, patch, patch // 2).unfold(3, patch, patch // 2)  # n, c, ty, tx, p, p
        tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)  # texture, not colour
        return torch.fft.rfft2(tiles * win).abs()

    return (mags(rec) - mags(x)).abs().mean()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """decode(encode(images)) through the posterior mean, in batches, on the CPU (not clamped)."""
    was_training = vae.training
    vae.eval()
    dev = next(vae.parameters()).device
    recs = [vae.decode(vae.encode(images[i:i + batch].to(dev)).latent_dist.mean).sample.cpu()
            for i in range(0, len(images), batch)]
    vae.train(was_training)
    return torch.cat(recs)


def vae_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> float:
    """Mean PSNR (dB, per image then averaged) of reconstructions through the posterior mean, of
    images in [-1, 1] (mapped to [0, 1] for :func:`experiments.harness.psnr`: the peak-to-peak-2 figure)."""
    return float(psnr((reconstruct(vae, images, batch) + 1) / 2, (images + 1) / 2).mean())


def worst_pixels(rec: torch.Tensor, x: torch.Tensor, frac: float) -> torch.Tensor:
    """Mean of the worst ``frac`` of the per-pixel errors (largest channel difference) of each
    image: a loss on the few pixels far off (edges, stray marks) that a mean over all pixels
    barely charges (the 99.9th percentile of the error is one pixel in a thousand)."""
    err = (rec - x).abs().amax(dim=1).flatten(1)  # [n, hw]
    k = max(1, int(round(frac * err.shape[1])))
    return err.topk(k, dim=1).values.mean()


@torch.no_grad()
def mark_scores(vae: AutoencoderKL, images: torch.Tensor, labels: list) -> dict[str, float]:
    """Stray-mark share, 99.9th-percentile pixel error and edge width of reconstructions (images
    in [-1, 1], labels their scenes'; framework.bundled.marks)."""
    rec, ref = (reconstruct(vae, images).clamp(-1, 1) + 1) / 2, (images + 1) / 2
    m = marks.measure_scenes(rec, labels)
    return {"eval_stray": float(m["stray_share"].mean()), "eval_p999": marks.error_quantile(rec, ref),
            "eval_edge_width": float(m["edge_width"])}


def train_vae(cfg: DictConfig, out: Path, device: torch.device) -> AutoencoderKL:
    """Train (or resume) the VAE; saves it, with its latent scaling factor, to ``out/vae``."""
    v = cfg.vae
    vae = build_vae(cfg)
    name = "vae"
    anchor = None
    if v.decoder_only:  # phase 2: the encoder (so the UNet's latents) stays fixed
        vae = AutoencoderKL.from_pretrained(out / "vae")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        name = "vae_decoder"
    elif v.finetune:  # fine-tune the saved VAE whole; the encoder it started from anchors the latents
        if not (out / "vae_anchor").exists():
            shutil.copytree(out / "vae", out / "vae_anchor")
        vae = AutoencoderKL.from_pretrained(out / "vae_anchor")
        anchor = copy.deepcopy(vae).to(device).eval().requires_grad_(False)
        name = "vae_finetune"
    vae = vae.to(device, memory_format=torch.channels_last).train()
    print(f"vae: {count_parameters(vae) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=v.lr,
                            weight_decay=0.0)
    val = sample_scenes(v.n_val, VALIDATION_SEED, **cfg.world)

    def make_batch(step: int) -> ScenePlan:
        return batch_of_scenes(cfg, "vae", step, v.batch_size, **cfg.world)

    def step_fn(step: int, plan: ScenePlan) -> dict[str, float]:
        x = plan.draw(device).images.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = v.lr * min(1.0, (step + 1) / v.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(x).latent_dist
            gen = step_generator(cfg, name, step, device)
            z = post.sample(gen)
            if v.latent_noise:  # decode near-miss latents (a sampler's) as clean scenes too
                sf = vae.config.scaling_factor
                z = z + torch.randn(z.shape, generator=gen, device=device, dtype=z.dtype) * (v.latent_noise / sf)
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + v.kl_weight * kl
        if v.outlier_weight:  # the worst pixels (edges, stray marks), which the means barely see
            loss = loss + v.outlier_weight * worst_pixels(rec, x, v.outlier_frac)
        if anchor is not None:  # latents (in the UNet's units) stay near the first encoder's
            with torch.no_grad():
                ref = anchor.encode(x).latent_dist.mean.float()
            sf = vae.config.scaling_factor
            loss = loss + v.anchor_weight * ((post.mean.float() - ref) * sf).pow(2).mean()
        if v.spectrum_weight:  # textures (the stripes) whatever their phase
            loss = loss + v.spectrum_weight * spectrum_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "kl": kl.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return {"eval_psnr": vae_psnr(vae, val.images), **mark_scores(vae, val.images, val.labels)}

    train_loop(name, out, {"model": vae}, opt, step_fn, v.steps, v.max_minutes,
               eval_fn=eval_fn, eval_every=v.eval_every, make_batch=make_batch,
               workers=data_workers(cfg, device))
    vae.eval()
    if not (v.decoder_only or v.finetune):
        vae.register_to_config(scaling_factor=latent_scaling_factor(cfg, vae, v.n_scale))
    print(f"vae: scaling_factor {vae.config.scaling_factor:.4f}")
    vae.save_pretrained(out / "vae")
    return vae


@torch.no_grad()
def latent_scaling_factor(cfg: DictConfig, vae: AutoencoderKL, n: int = 1024) -> float:
    """1 / std of the posterior-mean latents of ``n`` training-distribution scenes."""
    images = sample_scenes(n, VALIDATION_SEED + 1, **cfg.world).images
    dev = next(vae.parameters()).device
    lat = torch.cat([vae.encode(images[i:i + 128].to(dev)).latent_dist.mean.cpu()
                     for i in range(0, n, 128)])
    return float(1.0 / lat.std())


def pick_vae(out: Path, candidates: list[str]) -> Path:
    """Stage ``vae_pick``: of the VAEs trained in the ``candidates`` folders (each a training folder
    with ``vae/`` and ``vae_log.jsonl``, e.g. two layouts trained at once), copy into ``out/vae`` the
    one whose last validation has the lowest 99.9th-percentile pixel error (issue 29's measure of
    the few pixels far off; ties: the higher PSNR). The table of candidates goes to ``out/vae_pick.json``."""
    import json

    if not candidates:
        raise ValueError("vae_pick needs vae_candidates=[folder,...]: training folders that each hold a vae/")
    rows = []
    for folder in map(Path, candidates):
        evals = [r for r in map(json.loads, (folder / "vae_log.jsonl").read_text().splitlines()) if "eval_p999" in r] \
            if (folder / "vae_log.jsonl").is_file() else []
        if not (folder / "vae").is_dir() or not evals:
            raise FileNotFoundError(f"vae_pick: {folder} has no trained vae/ with a validation in vae_log.jsonl "
                                    "(train it first: stages=[vae] out_dir=<that folder>)")
        last = evals[-1]
        rows.append({"folder": str(folder), "step": last["step"], "psnr": last["eval_psnr"],
                     "p999": last["eval_p999"], "stray": last["eval_stray"],
                     "channels": json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]})
    best = min(rows, key=lambda r: (r["p999"], -r["psnr"]))
    for r in rows:
        print(f"vae_pick: {'*' if r is best else ' '} {r['folder']}: channels {r['channels']}, step {r['step']}, "
              f"PSNR {r['psnr']:.2f} dB, p99.9 error {r['p999']:.3f}, stray {100 * r['stray']:.3f} %")
    shutil.rmtree(out / "vae", ignore_errors=True)
    shutil.copytree(Path(best["folder"]) / "vae", out / "vae")
    (out / "vae_pick.json").write_text(json.dumps({"chosen": best["folder"], "candidates": rows}, indent=2) + "\n")
    return out / "vae"
