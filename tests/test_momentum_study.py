"""The momentum study runs (fast=true) and writes its table, plot and records."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

import experiments.momentum_study.__main__ as study_mod


def test_momentum_study_fast(tmp_path):
    cfg = OmegaConf.load(Path(study_mod.__file__).with_name("config.yaml"))
    cfg.fast, cfg.out = True, str(tmp_path / "docs")
    del cfg["hydra"]
    table = study_mod.study(cfg, tmp_path / "run")
    study_mod.write(table, cfg, Path(cfg.out))
    assert len(table) == 3 and all(len(row) == 2 for row in table.values())
    assert (tmp_path / "docs" / "momentum_mixture.png").stat().st_size > 1000
    text = (tmp_path / "docs" / "momentum_mixture_table.md").read_text()
    assert "| euler |" in text and "heavy_ball_0.2" in text
    assert len(list((tmp_path / "run" / "runs").glob("*/record.json"))) == 6
