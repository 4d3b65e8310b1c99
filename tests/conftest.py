"""Shared fixtures: one tiny SD pipeline per test session, saved to a folder and loaded back."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SAMPLERLAB_CACHE", tempfile.mkdtemp(prefix="samplerlab-cache-"))  # FID reference stats
# One intra-op thread per test process: xdist runs one process per core, and OpenMP threads that
# outnumber free cores spin-wait (measured: a tiny UNet call takes 40 ms on one thread, 900 ms on
# two when the other core is busy).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved as an ordinary diffusers folder."""
    from framework.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from framework.models.diffusers_sd import load_pipeline

    return load_pipeline(str(tiny_dir))


@pytest.fixture
def tiny_overrides(tiny_dir):
    """Overrides that run the saved tiny pipeline through the ordinary checkpoint loader."""
    return ["model=sd15", f"model.path={tiny_dir}"]
