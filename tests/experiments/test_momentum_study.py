"""The momentum study runs (fast=true) and writes its table, plot and records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import experiments.momentum_study.__main__ as study_mod


def test_momentum_study_fast(tmp_path):
    record = study_mod.main(["fast=true", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'run'}"])
    table = record["results"]
    assert len(table) == 3 and all(len(row) == 2 for row in table.values())
    assert (tmp_path / "docs" / "momentum_mixture.png").stat().st_size > 1000
    text = (tmp_path / "docs" / "momentum_mixture_table.md").read_text()
    assert "| euler |" in text and "heavy_ball_0.2" in text
    assert len(list((tmp_path / "run" / "runs").glob("*/record.json"))) == 6
    assert set(record["files"]) == {"momentum_mixture.png", "momentum_mixture_table.md"}
    assert json.loads((tmp_path / "run" / "record.json").read_text())["experiment"] == "momentum_study"


@pytest.mark.slow  # ~20 s of CPU (three bundled runs with FID and CLIP score); test_bundled_tables_from_results is fast
def test_momentum_study_bundled_fast(tmp_path):
    """The bundled-model half (fast: 2 methods × 1 CFG × 1 step count + the baseline at the floor
    seed, 4 samples): records, results.json, noise floor, table, plot and sample picture."""
    record = study_mod.main(["--config-name", "bundled", "fast=true", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'run'}"])
    results = record["results"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["runs"] == results["runs"]
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("euler", 0), ("heavy_ball_0.2", 0), ("euler", 1)]
    assert all(r["nfe"] == 5 and r["fid"] > 0 and 0 <= r["clipped"] <= 1 for r in results["runs"])
    assert len(results["real_vs_real_fid"]) == 2 and results["model"]["network_sha256"]
    assert len(list((tmp_path / "run" / "runs").glob("*/record.json"))) == 3
    text = (tmp_path / "docs" / "momentum_bundled_table.md").read_text()
    assert "| heavy_ball_0.2 |" in text and "Real vs real" in text and "seed 1 vs seed 0" in text
    assert (tmp_path / "docs" / "momentum_bundled.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "momentum_bundled_samples.png").stat().st_size > 1000


def test_distill_stats_on_true_mixture_samples():
    """The distillation table's mixture statistics are calibrated: true samples give spread ≈ 1, TV ≈ 0."""
    import torch

    from experiments.momentum_study.distill import mixture_stats
    from framework.models.analytic import Mixture

    model = Mixture()
    st = mixture_stats(model, model.sample_data(4096, torch.Generator().manual_seed(0)))
    assert abs(st["spread"] - 1) < 0.05 and st["tv"] < 0.03, st
    shrunk = mixture_stats(model, model.means.repeat(8, 1))
    # samples at the means: spread 0 up to float64 rounding (cdist's matmul form leaves ~1e-16; seen 2.98e-16)
    assert abs(shrunk["spread"]) < 1e-12 and shrunk["nll"] < st["nll"], shrunk


def test_bundled_tables_from_results(tmp_path):
    """The writer: one table per metric and CFG scale, missing cells as —, both noise floors stated."""
    from experiments.harness import Experiment
    from experiments.momentum_study import images

    cfg = Experiment.compose(Path(study_mod.__file__).parent, ["--config-name", "bundled"]).cfg
    row = dict(nfe=5.0, clip_score=40.0, seconds=6.0, clipped=0.01)
    runs = [dict(row, method="euler", cfg_scale=5, steps=5, seed=0, fid=0.40),
            dict(row, method="ghvb2_0.5", cfg_scale=5, steps=5, seed=0, fid=0.30),
            dict(row, method="euler", cfg_scale=5, steps=8, seed=0, fid=0.35, nfe=8.0),
            dict(row, method="euler", cfg_scale=5, steps=5, seed=1, fid=0.46)]
    results = {"model": {"title": "v", "weights_commit": "abc", "unet_sha256": "0"}, "num_samples": 64,
               "fid_reference": 256, "runs": runs, "real_vs_real_fid": [0.2, 0.3]}
    images.write(results, cfg, tmp_path)
    text = (tmp_path / "momentum_bundled_table.md").read_text()
    assert "| ghvb2_0.5 | 0.300 | — |" in text and "| euler | 0.400 | 0.350 |" in text
    assert "FID 0.250 ± 0.071" in text and "|ΔFID| mean 0.060, max 0.060; |ΔCLIP score| mean 0.00" in text
    assert (tmp_path / "momentum_bundled.png").stat().st_size > 1000


def test_interrupted_study_rows_are_reused(tmp_path):
    """A rerun takes the rows an interrupted study wrote (same weights and sample counts), keyed by
    (method, CFG scale, steps, seed); rows measured on other weights or counts are not reused."""
    from experiments.momentum_study import images

    model = {"title": "v", "weights_commit": "abc", "network_sha256": "0"}
    row = dict(method="euler", cfg_scale=5.0, steps=5, seed=0, nfe=5.0, fid=0.4, clip_score=40.0, seconds=6.0, clipped=0.01)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"model": model, "num_samples": 64, "fid_reference": 256, "runs": [row], "schedule": "karras"}))
    fresh = {"model": model, "num_samples": 64, "fid_reference": 256, "runs": []}
    assert images._earlier_runs(path, fresh) == {("euler", 5.0, 5, 0): row} and fresh["schedule"] == "karras"
    for other in ({"num_samples": 32}, {"model": dict(model, network_sha256="1")}):
        assert images._earlier_runs(path, dict(fresh, **other)) == {}
    assert images._earlier_runs(tmp_path / "absent.json", fresh) == {}
