"""Metrics plugins: prompt accuracy under the bundled judge."""
from __future__ import annotations

import pytest

from framework.api import run
from framework.errors import ConfigError
from plugins.metrics.prompt_accuracy import first_word

PROMPTS = "prompts=[a red circle,a blue square,a green triangle,a yellow diamond]"


def test_first_word():
    assert first_word("a small Red circle above a blue square", ("red", "blue")) == "red"
    assert first_word("a circle", ("red",)) is None


def test_prompt_accuracy_on_bundled_model():
    guided = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=5.0"]).record["metrics"]
    assert guided["prompt_accuracy_colour_n"] == 8 and guided["prompt_accuracy_shape_n"] == 8
    # measured 0.75 (v0 model, 20 euler steps); chance is 1/8
    assert guided["prompt_accuracy_colour"] >= 0.5
    weak = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=1.0"]).record["metrics"]
    assert guided["prompt_accuracy_colour"] > weak["prompt_accuracy_colour"]  # measured 0.25 without guidance


def test_prompt_accuracy_needs_images():
    with pytest.raises(ConfigError, match="no decoder"):
        run(["model=gaussian", "metrics=[prompt_accuracy]"])


def fid_between(a, b):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from framework.metrics.clip_features import BundledCLIPFeatures

    metric = FrechetInceptionDistance(feature=BundledCLIPFeatures(), normalize=True, input_img_size=(3, 64, 64))
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def test_fid_real_vs_real_is_near_zero_and_rises_with_noise():
    import torch

    from framework.bundled.world import sample_scenes

    real_a = (sample_scenes(256, seed=1).images + 1) / 2
    real_b = (sample_scenes(256, seed=2).images + 1) / 2
    base = fid_between(real_a, real_b)
    gen = torch.Generator().manual_seed(0)
    noisy = [fid_between(real_a, (real_b + s * torch.randn(real_b.shape, generator=gen)).clamp(0, 1))
             for s in (0.1, 0.2, 0.4)]
    assert base < 0.05 and base < 0.5 * noisy[0]  # measured 0.022 vs 0.076, 0.17, 0.52 (256 per side)
    assert noisy[0] < noisy[1] < noisy[2]


def test_fid_and_kid_plugins_report():
    m = run(["metrics=[fid,kid]", "num_samples=8", "batch_size=8", "steps=8", "metrics.fid.reference=64",
             "metrics.kid.reference=64"]).record["metrics"]
    assert m["fid"] > 0 and m["kid_std"] >= 0 and "kid" in m


def test_clip_score_ranks_matching_captions_above_mismatched():
    import torch

    from framework.bundled.world import sample_scenes
    from plugins.metrics.clip_score import load_scorer

    scenes = sample_scenes(16, seed=3)
    pixels = ((scenes.images + 1) / 2 * 255).round().to(torch.uint8)
    metric = load_scorer(None)
    metric.update(pixels, scenes.captions)
    matched = float(metric.compute())
    metric.reset()
    metric.update(pixels, scenes.captions[::-1])
    assert matched > float(metric.compute()) + 20  # measured 82 vs 4


def test_clip_score_plugin_and_missing_clip():
    m = run(["metrics=[clip_score]", "num_samples=4", "batch_size=4", "steps=8"]).record["metrics"]
    assert 0 < m["clip_score"] <= 100
    from framework.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not available offline"):
        run(["metrics=[clip_score]", "metrics.clip_score.model=/nonexistent/clip", "num_samples=2", "steps=2"])
