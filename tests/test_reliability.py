"""Reliability: damaged or missing weights fail with one clear line (issue 11 grows this file)."""
from __future__ import annotations

import shutil

import pytest

from framework.errors import ModelNotFoundError
from framework.models.diffusers_sd import load_pipeline


def test_corrupt_safetensors_is_a_clear_error(tiny_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dir, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match="corrupt or not safetensors") as err:
        load_pipeline(str(damaged))
    assert "\n" not in str(err.value)


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))
