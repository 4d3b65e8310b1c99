"""The bundled guide model of true autoguidance (experiments/bundled_model/guide.py, weights/guide).

- the shipped guide is the recipe's network: guide.yaml's channels, the main UNet's latent channels
  and cross-attention width, fp16 safetensors, ≤ 3 MB;
- the recipe runs end to end on the fast profile (seed from the shipped weights, unet, export) and
  what it exports is accepted as a guide of the bundled model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.bundled import PIPELINE_DIR, WEIGHTS_DIR

GUIDE_DIR = WEIGHTS_DIR / "guide" / "unet"
RECIPE = Path(__file__).resolve().parents[2] / "experiments" / "bundled_model" / "guide.yaml"


def test_the_shipped_guide_is_the_recipes_network():
    from safetensors import safe_open

    config = json.loads((GUIDE_DIR / "config.json").read_text())
    main = json.loads((PIPELINE_DIR / "unet" / "config.json").read_text())
    recipe = OmegaConf.load(RECIPE).unet
    assert config["_class_name"] == main["_class_name"] == "UNet2DConditionModel"
    assert config["block_out_channels"] == list(recipe.channels) != main["block_out_channels"]
    for key in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
        assert config[key] == main[key], key
    weights = GUIDE_DIR / "diffusion_pytorch_model.safetensors"
    assert sum(f.stat().st_size for f in GUIDE_DIR.iterdir()) <= 3e6
    with safe_open(str(weights), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


@pytest.mark.slow
def test_the_recipe_runs_on_the_fast_profile_and_its_guide_loads(tmp_path):
    from experiments.bundled_model.guide import main
    from framework.models.bundled import Bundled
    from framework.models.guide import load_guide

    record = main(["fast=true", "threads=0", f"out_dir={tmp_path}"])
    assert set(record["results"]["stages"]) == {"guide", "guide_seed", "guide_export"}
    exported = tmp_path / "weights_guide" / "unet"
    assert json.loads((tmp_path / "guide.checkpoint.json").read_text())["step"] == 2
    model = Bundled()
    guide = load_guide(model, str(exported))
    assert list(guide.network.config.block_out_channels) == [16, 32]  # the fast profile's
