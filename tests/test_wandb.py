"""The W&B logger: offline without a key, files on disk, and failures never kill a run."""
from __future__ import annotations

import pytest

from framework.entry.api import run


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
        (tmp_path / var.lower()).mkdir()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return tmp_path


def test_wandb_offline_run_holds_images_and_table(wandb_env, capsys):
    res = run(["logger=[wandb]", "num_samples=2", "batch_size=2", "steps=3"])
    assert "logging offline" in capsys.readouterr().out
    runs = list((wandb_env / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [p.name for p in runs[0].rglob("*")]
    assert any(n.endswith(".wandb") for n in files)
    assert any(n.endswith(".png") for n in files)  # grid and table images
    assert any("samples" in n and n.endswith(".table.json") for n in files)
    assert res.record["metrics"]["nfe"] == 3


def test_wandb_failure_is_a_warning(wandb_env, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="W&B init failed"):
        res = run(["logger=[wandb]", "model=gaussian", "steps=2"])
    assert res.record["metrics"]["nfe"] == 2


def test_wandb_logs_the_per_step_previews(wandb_env):
    run(["logger=[wandb]", "callback=[nan_guard,preview]", "num_samples=2", "batch_size=2", "steps=3",
         f"output_dir={wandb_env / 'run'}"])
    assert (wandb_env / "run" / "preview.png").is_file()
    media = [p.name for p in (wandb_env / "wandb_dir" / "wandb").glob("offline-run-*/files/media/images/*.png")]
    assert any(n.startswith("preview") for n in media) and any(n.startswith("grid") for n in media)
