"""Metrics plugins: prompt accuracy under the bundled judge."""
from __future__ import annotations

import pytest

from framework.entry.api import run
from framework.core.errors import ConfigError
from plugins.metrics.prompt_accuracy import first_word

PROMPTS = "prompts=[a red circle,a blue square,a green triangle,a yellow diamond]"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Reference features go to a cache of this test session, not the user's ~/.cache/samplerlab."""
    monkeypatch.setenv("SAMPLERLAB_CACHE", str(tmp_path_factory.getbasetemp() / "samplerlab-cache"))


def test_first_word():
    assert first_word("a small Red circle above a blue square", ("red", "blue")) == "red"
    assert first_word("a circle", ("red",)) is None


def test_prompt_accuracy_on_bundled_model():
    guided = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=5.0"]).record["metrics"]
    assert guided["prompt_accuracy_colour_n"] == 8 and guided["prompt_accuracy_shape_n"] == 8
    # measured 0.75 (v0), 1.0 (v1) with 20 euler steps; chance is 1/8
    assert guided["prompt_accuracy_colour"] >= 0.5
    weak = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=0.0"]).record["metrics"]
    # cfg_scale=0 is the unconditional model: v1 follows prompts even at cfg_scale=1 (1.0 there)
    assert guided["prompt_accuracy_colour"] > weak["prompt_accuracy_colour"]


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
    from framework.core.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not available offline"):
        run(["metrics=[clip_score]", "metrics.clip_score.model=/nonexistent/clip", "num_samples=2", "steps=2"])


# --- reference features cache, feature extractors -------------------------------------------------
class MeanColour(__import__("torch").nn.Module):
    """A feature extractor by import path for the tests: per-channel means and stds (6-d)."""

    num_features = 6

    def forward(self, images):
        x = images.float()
        return __import__("torch").cat([x.mean((2, 3)), x.std((2, 3))], dim=1).double()


def test_fid_reference_features_are_cached_and_reused(tiny_overrides, tmp_path, monkeypatch):
    import framework.bundled.world as world

    cache = tmp_path / "cache"
    monkeypatch.setenv("SAMPLERLAB_CACHE", str(cache))
    args = [*tiny_overrides, "num_samples=4", "steps=2", "metrics=[fid]", "metrics.fid.reference=32"]
    first = run(args).record["metrics"]["fid"]
    files = list((cache / "reference_features").glob("world-n32-seed1234__clip-*.safetensors"))
    assert len(files) == 1

    def no_scenes(*a, **k):
        raise AssertionError("the reference set was recomputed instead of read from the cache")

    monkeypatch.setattr(world, "sample_scenes", no_scenes)
    assert run(args).record["metrics"]["fid"] == first  # float64 features stored: bit-identical
    with pytest.raises(Exception, match="recomputed"):  # another reference set is another key
        run([*args, "metrics.fid.reference_seed=7"])


def test_fid_on_a_folder_reference_with_features_by_import_path(tiny_overrides, tmp_path):
    import torch

    from framework.runs.images import png_bytes
    from framework.metrics.reference import ReferenceSet

    folder = tmp_path / "real"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for k in range(6):
        (folder / f"{k}.png").write_bytes(png_bytes(torch.rand(3, 16, 16, generator=gen)))
    key = ReferenceSet(folder=str(folder)).key()
    args = [*tiny_overrides, "num_samples=4", "steps=2", "metrics=[fid]", f"metrics.fid.reference_dir={folder}",
            "metrics.fid.features=tests.metrics.test_metrics.MeanColour", f"metrics.fid.cache_dir={tmp_path / 'c'}"]
    m = run(args).record["metrics"]
    assert m["fid"] > 0
    assert len(list((tmp_path / "c" / "reference_features").glob(f"{key}__tests.metrics.test_metrics.MeanColour-*"))) == 1
    (folder / "0.png").write_bytes(png_bytes(torch.zeros(3, 16, 16)))  # new content, new key
    assert ReferenceSet(folder=str(folder)).key() != key


def test_feature_extractor_errors(tmp_path):
    from framework.core.errors import ModelNotFoundError
    from framework.metrics.features import load_features

    # Inception needs torch-fidelity, a working torchvision and the weights on disk: never in CI
    with pytest.raises((ConfigError, ModelNotFoundError), match="torch-fidelity|torchvision|Inception weights"):
        load_features("inception", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="unknown features 'vgg'"):
        load_features("vgg")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_features("nowhere.Extractor")
    with pytest.raises(ConfigError, match="reference folder .* does not exist"):
        run(["metrics=[fid]", "num_samples=2", "steps=1", f"metrics.fid.reference_dir={tmp_path / 'none'}"])


# --- analytic models: Fréchet distance to the true distribution --------------------------------------
def test_frechet_distance_matches_the_isotropic_closed_form():
    import torch

    from framework.metrics.frechet import frechet_distance

    d, m1, m2, a, b = 5, 0.3, -0.2, 1.5, 0.5
    f64 = torch.float64
    got = frechet_distance(torch.full((d,), m1, dtype=f64), a * a * torch.eye(d, dtype=f64),
                           torch.full((d,), m2, dtype=f64), b * b * torch.eye(d, dtype=f64))
    assert got == pytest.approx(d * (m1 - m2) ** 2 + d * (a - b) ** 2, rel=1e-12)


def test_mixture_true_moments_match_samples():
    import torch

    from framework.metrics.frechet import moments
    from framework.models.analytic import Mixture
    from plugins.metrics.frechet_to_data import true_moments

    mix = Mixture()
    mean, cov = true_moments(mix, 0, 0)
    s_mean, s_cov = moments(mix.sample_data(200_000, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(mean, s_mean, atol=0.02) and torch.allclose(cov, s_cov, atol=0.05)  # ~5σ of the sampling error


def test_frechet_to_data_falls_with_a_finer_solver():
    args = ["model=gaussian", "metrics=[frechet_to_data]", "num_samples=1024", "batch_size=1024"]
    coarse, fine = run([*args, "steps=3"]), run([*args, "steps=20", "solver=heun"])
    # measured 6.9 (euler, 3 steps) vs 0.10 (heun, 20 steps; the finite-sample bias is of that order)
    assert fine.record["metrics"]["frechet_to_data"] < 0.25 * coarse.record["metrics"]["frechet_to_data"]
    with pytest.raises(ConfigError, match="analytic model"):
        run(["metrics=[frechet_to_data]", "num_samples=2", "steps=1"])


def test_speed_plugin_reports_throughput_and_peak_memory():
    m = run(["model=gaussian", "metrics=[speed]", "num_samples=64", "batch_size=16", "steps=4"]).record["metrics"]
    assert 0 < m["sampling_seconds"] <= m["seconds"]
    assert m["samples_per_second"] == pytest.approx(64 / m["sampling_seconds"])
    assert m["sampling_seconds_per_sample"] == pytest.approx(m["sampling_seconds"] / 64)
    assert m["peak_rss_mb"] > 10 and "images_per_second" not in m  # no decoder: samples, not images


# --- samplerlab-score: scoring saved samples, merging shards ----------------------------------------
def test_score_merges_two_shards_like_one_run(tiny_overrides, tmp_path, capsys):
    import json

    from framework.tools.score import main as score_main

    base = [*tiny_overrides, "num_samples=4", "batch_size=2", "steps=2"]
    fid = [f"metrics.fid.cache_dir={tmp_path / 'c'}", "metrics.fid.reference=16"]
    whole = run([*base, "metrics=[fid,clip_score]", *fid]).record["metrics"]  # scored live, float images
    for k in (0, 1):
        run([*base, f"shard_index={k}", "shard_count=2", f"output_dir={tmp_path / f'shard{k}'}"])
    a, b = tmp_path / "shard0", tmp_path / "shard1"
    assert sorted(p.name for p in b.glob("samples/*.png")) == ["000002.png", "000003.png"]
    assert score_main([str(a), str(b), str(a), "metrics=[fid,clip_score]", *fid, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "record.json").read_text())
    assert merged["num_samples"] == 4 and merged["missing_samples"] == [] and merged["kind"] == "merged"
    assert [s["samples"] for s in merged["sources"]] == [2, 2, 0]  # the repeated folder adds nothing
    # the same four samples, read back from 8-bit PNGs: equal scores up to the quantisation
    assert merged["metrics"]["fid"] == pytest.approx(whole["fid"], rel=0.05, abs=1e-3)
    assert merged["metrics"]["clip_score"] == pytest.approx(whole["clip_score"], rel=0.01)
    assert merged["metrics"]["nfe"] == 2
    # one shard alone: its two samples, the other two reported missing
    assert score_main([str(a), "metrics=[clip_score]", "--out", str(tmp_path / "half")]) == 0
    half = json.loads((tmp_path / "half" / "record.json").read_text())
    assert half["num_samples"] == 2 and half["missing_samples"] == [2, 3]


def test_score_errors(tmp_path, capsys):
    from framework.tools.score import main as score_main

    assert score_main([str(tmp_path)]) == 2
    assert "no record.json" in capsys.readouterr().err
