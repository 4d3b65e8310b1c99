"""Inpainting's seams, measured: how visible is the mask's edge in inpainted pictures, per latent
edge blend and pixel paste-back, against unmasked samples of the same prompts and seeds.

    python -m experiments.guidance_study --config-name inpaint   # docs/guidance/seams.{md,json,png}

Seam visibility is gradient energy across the edge: the mean squared colour difference of adjacent
pixel pairs (horizontal and vertical, every channel) that straddle the mask's edge ("edge"), or lie
within ``band`` px of it ("band"), divided by the same pairs' energy in the unmasked samples: 1 is
no more change across the edge than a picture has there anyway. Kept = mean |image − source| over
the kept half (0 with a paste-back); the VAE's own round trip of the source there is the floor of
any latent-space method. The runs are made with ``paste_back=false`` and each paste-back is applied
to their decoded samples here (plugins.guidance.inpaint.overlay, what the plugin does after decoding).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.guidance_study.figures import image_rows
from experiments.guidance_study.inputs import make_files
from experiments.harness import load_model, save_text
from framework.entry.api import run
from plugins.guidance.inpaint import overlay


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """``mask`` [1, 1, H, W] (0/1) grown by ``px`` pixels (chessboard distance)."""
    return torch.nn.functional.max_pool2d(mask, 2 * px + 1, stride=1, padding=px) if px > 0 else mask


def pair_energy(images: torch.Tensor, generate: torch.Tensor, band: int, median: bool = False) -> float:
    """Mean squared colour difference (summed over channels) of adjacent pixel pairs across the edge
    of ``generate`` [1, 1, H, W] (band 0: pairs whose pixels are on either side; band b: pairs within
    b px of the edge); ``median``: the median over the pairs of each image, averaged over images (the
    step of the background, not of the few objects that cross the edge)."""
    g = generate.float()
    if band == 0:
        h_pairs, v_pairs = g[..., :, 1:] != g[..., :, :-1], g[..., 1:, :] != g[..., :-1, :]
    else:
        near = ((1 - g) * dilate(g, band) + g * dilate(1 - g, band)) > 0
        h_pairs, v_pairs = near[..., :, 1:] & near[..., :, :-1], near[..., 1:, :] & near[..., :-1, :]
    dh = (images[..., :, 1:] - images[..., :, :-1]).pow(2).sum(1)  # [n, H, W-1]
    dv = (images[..., 1:, :] - images[..., :-1, :]).pow(2).sum(1)
    per_image = torch.cat([dh[:, h_pairs[0, 0]], dv[:, v_pairs[0, 0]]], dim=1)  # [n, pairs]
    return float(per_image.median(dim=1).values.mean() if median else per_image.mean())


def study(cfg: DictConfig, folder: Path, out: Path) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    torch.set_num_threads(1)  # the build machine's cores are shared
    pics = make_files(out / "guidance")
    source, generate = pics["source.png"][None], pics["mask.png"][None]
    n, steps = (4, 4) if cfg.fast else (cfg.num_samples, cfg.steps)
    blends, feathers = (list(cfg.blend)[:2], list(cfg.feather)[:2]) if cfg.fast else (list(cfg.blend), list(cfg.feather))
    feathers = [None, "hard", *feathers]
    shown = {(0, None), (0, "hard"), (0, feathers[-1]), (1, None), (1, feathers[-1]), (blends[-1], None)}
    common = ["model=bundled", f"steps={steps}", f"num_samples={n}", f"batch_size={n}", "seed=0",
              f"prompts=[{','.join(cfg.prompts)}]", "save_images=false", "metrics=[prompt_accuracy]"]
    base = run(common + ["guidance=[cfg]"], output_dir=folder / "runs" / "unmasked").images
    ref = {"edge": pair_energy(base, generate, 0), "edge_median": pair_energy(base, generate, 0, median=True),
           "band": pair_energy(base, generate, cfg.band)}
    model = load_model(["model=bundled", "device=cpu"])
    with torch.no_grad():
        roundtrip = model.decode(model.encode_images(source))
    kept = generate[0, 0] < 0.5
    results = {"steps": steps, "samples": n, "band": cfg.band, "unmasked_energy": ref,
               "vae_roundtrip_kept": float((roundtrip - source).abs()[..., kept].mean()), "rows": []}
    rows = [("source (left half kept)", source), ("unmasked samples (same prompts and seeds)", base[:8])]
    for blend in blends:
        res = run(common + ["guidance=[cfg,inpaint]", f"guidance.inpaint.image={out / 'guidance' / 'source.png'}",
                            f"guidance.inpaint.mask={out / 'guidance' / 'mask.png'}", f"guidance.inpaint.blend={blend}",
                            "guidance.inpaint.paste_back=false"],  # the decoder's picture: each paste-back applied below
                  output_dir=folder / "runs" / f"inpaint_blend{blend}")
        m = res.record["metrics"]
        kept_px = generate < 0.5
        for feather in feathers:
            if feather == "hard":  # diffusers' apply_overlay: the source pasted, nothing matched
                img = torch.where(kept_px, source, res.images)
            else:
                img = res.images if feather is None else overlay(res.images, source, generate, feather)
            row = {"blend": blend, "paste": feather, "edge": pair_energy(img, generate, 0) / ref["edge"],
                   "edge_median": pair_energy(img, generate, 0, median=True) / ref["edge_median"],
                   "band": pair_energy(img, generate, cfg.band) / ref["band"],
                   "kept": float((img - source).abs()[..., kept].mean()),
                   "accuracy_colour": m.get("prompt_accuracy_colour"), "accuracy_shape": m.get("prompt_accuracy_shape")}
            results["rows"].append(row)
            if (blend, feather) in shown:
                rows.append((f"blend {blend}, {paste_name(feather)}: seam {row['edge_median']:.2f}× (median), "
                             f"{row['edge']:.2f}× (mean)", img[:8]))
    return results, rows


def paste_name(feather) -> str:
    return {None: "no paste-back", "hard": "plain paste-back"}.get(feather, f"matched paste-back, feather {feather} px")


def write(results: dict, rows: list, out: Path) -> list[str]:
    folder, files = out / "guidance", []
    ref = results["unmasked_energy"]
    lines = [f"Bundled model, karras/Euler/CFG 5, {results['steps']} steps, {results['samples']} samples; the right "
             f"half of source.png generated. Seam energy: squared colour steps of the pixel pairs across the edge, "
             f"median per image (the background's step) and mean (with the objects that cross it), and the mean "
             f"within {results['band']} px of the edge (band), each over the same pairs' in the unmasked samples "
             f"(median {ref['edge_median']:.2e}, mean {ref['edge']:.2e}, band {ref['band']:.2e}); kept = mean "
             f"|image − source| over the kept half (VAE round trip of the source there: {results['vae_roundtrip_kept']:.3f}).",
             "", "| latent blend | paste-back | seam (median) | seam (mean) | seam (band) | kept | colour acc. | shape acc. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        lines.append(f"| {r['blend']} | {paste_name(r['paste'])} | {r['edge_median']:.2f}× | {r['edge']:.2f}× | {r['band']:.2f}× | "
                     f"{r['kept']:.3f} | {r['accuracy_colour']:.2f} | {r['accuracy_shape']:.2f} |")
    save_text("\n".join(lines) + "\n", folder / "seams.md", files)
    save_text(json.dumps(results, indent=1), folder / "seams.json", files)
    image_rows(rows, folder / "seams.png", files, tile=1.0)
    return files
