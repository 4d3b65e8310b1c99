"""The bundled guide model: ``python -m experiments.bundled_model.guide [install=true] [overrides]``.

True autoguidance (Karras et al. 2024) guides a model with a weaker version of itself. This builds
that weaker version for the shipped default model with the bundled training code (stage ``unet``):
the training folder is seeded from the *shipped* weights (tokenizer, VAE, CLIP whose text tower is
the pipeline's text encoder), so the guide learns on exactly the main model's latent space, text
conditioning and schedule; then a smaller UNet (``guide.yaml``: channels 32/64) trains for a fixed
small budget and is saved in fp16 as a diffusers UNet folder — ``framework/bundled/weights/guide/unet``
with ``install=true``, else ``<out_dir>/weights_guide/unet``. Rerunning resumes from the checkpoint.
Stages ``evaluate`` (judge accuracy and FD of CFG, autoguidance_model and the guide alone:
``<out_dir>/guide_eval.json``) and ``grid`` (a picture grid: ``<out_dir>/grid.png``, never into the
weights folder, whose fingerprint keys every run) are not in the default stages (docs/autoguidance.md
has their figures).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.bundled_model.common import seed_from_shipped
from experiments.harness import Experiment, entry, resolve_device, resolve_training, stage_results

HERE = Path(__file__).resolve().parent
STAGES = ("seed", "unet", "export", "evaluate", "grid")


def export_guide(out: Path, name: str, target: Path) -> Path:
    """The trained EMA UNet ``out/<name>`` saved in fp16 safetensors as ``target``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / name).to(torch.float16)
    shutil.rmtree(target, ignore_errors=True)
    unet.save_pretrained(target, safe_serialization=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"export: {target} ({size / 1e6:.2f} MB)")
    return target


def guide_pipeline(out: Path, unet: Path) -> Path:
    """A pipeline folder: the shipped pipeline with the guide's UNet (the guide as a model of its own)."""
    from framework.bundled import PIPELINE_DIR

    folder = out / "guide_pipeline"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(PIPELINE_DIR, folder, ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(unet, folder / "unet")
    return folder


def evaluate_guide(cfg: DictConfig, out: Path, unet: Path) -> dict:
    """Judge colour/shape accuracy (and the FD of bundled-CLIP features to real scenes) of ordinary
    samplerlab runs on the bundled model: euler, ``evaluate.steps`` steps, the captions of fresh
    single-shape world scenes as prompts, per set (two disjoint prompt/seed sets: the noise floor).
    Rows: CFG at ``evaluate.cfg_scales``, the conditional model alone, autoguidance_model with the
    guide at ``evaluate.autoguidance_scales``, and the guide alone (its own UNet as the model: no
    guidance, and CFG at ``evaluate.guide_cfg``). Written to ``out/guide_eval.json``."""
    import json

    from framework.bundled.world import sample_scenes
    from framework.entry.api import run as sample

    e = cfg.evaluate
    alone = guide_pipeline(out, unet)
    guide = ["guidance=[autoguidance_model]", f"guidance.autoguidance_model.guide={unet}"]
    rows: dict[str, list[str]] = {f"cfg {s:g}": ["guidance=[cfg]", f"cfg_scale={s}"] for s in e.cfg_scales}
    rows["conditional (no guidance)"] = ["guidance=[]"]
    rows.update({f"autoguidance_model w={w:g}": [*guide, f"guidance.autoguidance_model.scale={w}"]
                 for w in e.autoguidance_scales})
    if e.guide_alone:
        rows["guide alone, no guidance"] = ["model=sd15", f"model.path={alone.resolve()}", "guidance=[]"]
        rows["guide alone, cfg %g" % e.guide_cfg] = ["model=sd15", f"model.path={alone.resolve()}", "guidance=[cfg]",
                                                      f"cfg_scale={e.guide_cfg}"]
    results: dict = {"guide": str(unet), "steps": e.steps, "solver": "euler", "samples": e.samples,
                     "sets": OmegaConf.to_container(e.sets), "rows": {}}
    path = out / "guide_eval.json"
    if path.is_file():  # rows of an earlier evaluation of the same setting are kept (new ones replace them)
        earlier = json.loads(path.read_text())
        if all(earlier.get(k) == results[k] for k in ("guide", "steps", "samples", "sets")):
            results["rows"] = earlier["rows"]
    for label, extra in rows.items():
        per_set = {}
        for name, spec in e.sets.items():
            prompts = list(sample_scenes(e.samples, int(spec.scenes_seed), omit_rate=cfg.world.omit_rate).captions)
            res = sample(["model=bundled", "solver=euler", f"steps={e.steps}", f"num_samples={e.samples}",
                          f"batch_size={e.samples}", f"seed={spec.seed}", "prompts=[" + ",".join(prompts) + "]",
                          "save_images=false", "metrics=[prompt_accuracy,fid]", f"metrics.fid.reference={e.fid_reference}",
                          f"metrics.fid.reference_seed={e.fid_reference_seed}", *extra])
            m = res.record["metrics"]
            per_set[name] = {k: m.get(k) for k in ("prompt_accuracy_colour", "prompt_accuracy_shape", "fid", "nfe",
                                                   "unet_calls", "network_inputs", "nfe_pairs", "guide_inputs",
                                                   "seconds_per_sample")}
        results["rows"][label] = per_set
        print(label, json.dumps(per_set))
        path.write_text(json.dumps(results, indent=1))
    return results


def guide_grid(cfg: DictConfig, out: Path, unet: Path, path: Path) -> Path:
    """A picture grid: the model card's grid prompts (columns) under the conditional model alone,
    CFG 5, autoguidance_model at w = 3 and the guide alone (rows), same seeds, 20 Euler steps."""
    from experiments.bundled_model.evaluate import GRID_PROMPTS
    from experiments.harness import save_grid
    from framework.entry.api import run as sample

    alone = guide_pipeline(out, unet)
    rows = [["guidance=[]"], ["guidance=[cfg]", "cfg_scale=5"],
            ["guidance=[autoguidance_model]", f"guidance.autoguidance_model.guide={unet}", "guidance.autoguidance_model.scale=3"],
            ["model=sd15", f"model.path={alone.resolve()}", "guidance=[]"]]
    n = len(GRID_PROMPTS)
    images = [sample(["model=bundled", "solver=euler", f"steps={cfg.evaluate.steps}", f"num_samples={n}", f"batch_size={n}",
                      "seed=31338500", "prompts=[" + ",".join(GRID_PROMPTS) + "]", "save_images=false", *extra]).images
              for extra in rows]
    save_grid(torch.cat(images).float().cpu(), path, nrow=n, scale=2)
    return path


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
               "export": lambda: export_guide(out, cfg.unet.name, target),
               "evaluate": lambda: evaluate_guide(cfg, out, target),
               "grid": lambda: guide_grid(cfg, out, target, out / "grid.png")}
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
