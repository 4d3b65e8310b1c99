"""The bundled guide model: ``python -m experiments.bundled_model.guide [install=true] [overrides]``.

True autoguidance (Karras et al. 2024) guides a model with a weaker version of itself. This builds
that weaker version for the shipped default model with the bundled training code (stage ``unet``):
the training folder is seeded from the *shipped* weights (tokenizer, VAE, CLIP whose text tower is
the pipeline's text encoder), so the guide learns on exactly the main model's latent space, text
conditioning and schedule; then a smaller UNet (``guide.yaml``: channels 32/64) trains for a fixed
small budget and is saved in fp16 as a diffusers UNet folder — ``framework/bundled/weights/guide/unet``
with ``install=true``, else ``<out_dir>/weights_guide/unet``. Rerunning resumes from the checkpoint.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.harness import Experiment, entry, resolve_device, resolve_training, stage_results

HERE = Path(__file__).resolve().parent
STAGES = ("seed", "unet", "export")


def seed_from_shipped(out: Path) -> None:
    """Copy the shipped tokenizer, VAE and CLIP into ``out`` (the layout stage ``unet`` reads)."""
    from framework.bundled import CLIP_DIR, PIPELINE_DIR

    for name, source in (("tokenizer", PIPELINE_DIR / "tokenizer"), ("vae", PIPELINE_DIR / "vae"),
                         ("clip", CLIP_DIR)):
        if not (out / name).is_dir():
            shutil.copytree(source, out / name)


def export_guide(out: Path, name: str, target: Path) -> Path:
    """The trained EMA UNet ``out/<name>`` saved in fp16 safetensors as ``target``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / name).to(torch.float16)
    shutil.rmtree(target, ignore_errors=True)
    unet.save_pretrained(target, safe_serialization=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"export: {target} ({size / 1e6:.2f} MB)")
    return target


def run(ex: Experiment) -> dict:
    from experiments.bundled_model.unet import train_unet
    from framework.bundled import WEIGHTS_DIR

    cfg: DictConfig = resolve_training(ex.cfg, STAGES, ("outputs/bundled_guide", "outputs/bundled_guide_fast"))
    ex.cfg = cfg
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    target = (WEIGHTS_DIR / "guide" if cfg.install else out / "weights_guide") / "unet"
    actions = {"seed": lambda: seed_from_shipped(out), "unet": lambda: train_unet(cfg, out, device),
               "export": lambda: export_guide(out, cfg.unet.name, target)}
    record: dict = {}
    for stage in cfg.stages:
        t0 = time.time()
        print(f"== stage {stage}")
        actions[stage]()
        key = cfg.unet.name if stage == "unet" else f"guide_{stage}"
        record = ex.record(out / "record.json", stage_results(out / "record.json", device, key, time.time() - t0))
    return record


def main(argv: list[str] | None = None) -> dict:
    return run(Experiment.compose(HERE, argv, config_name="guide"))


if __name__ == "__main__":
    entry(main)
