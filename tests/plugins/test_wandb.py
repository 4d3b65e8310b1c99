"""The W&B logger: offline without a key, files on disk, an unreachable server costs one short
timeout per process, and failures never kill a run."""
from __future__ import annotations

import socket

import pytest

from framework.entry.api import run
from plugins.logger import wandb as wandb_logger


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
        (tmp_path / var.lower()).mkdir()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setattr(wandb_logger, "PROCESS", wandb_logger._Process())  # a fresh process's memory
    return tmp_path


@pytest.fixture
def unreachable_server():
    """A W&B endpoint on localhost that takes connections (into its backlog) and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


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


def test_unreachable_server_goes_offline_after_the_init_timeout_once_per_process(
        wandb_env, monkeypatch, capsys, unreachable_server):
    """With an API key and a server that never answers, the first run waits ``init_timeout`` (1 s
    here, 15 s by default) and goes offline with one warning line; the process's later runs (a
    sweep's jobs) go offline at once, without a second try or a second line."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", unreachable_server)
    tries = []
    real_init = wandb.init

    def spy(*args, **kwargs):
        settings = kwargs.get("settings")
        tries.append(kwargs.get("mode") or f"online, init_timeout={getattr(settings, 'init_timeout', None)}")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    for steps in (2, 3):
        res = run(["logger=[wandb]", "model=gaussian", f"steps={steps}", "++logger.wandb.init_timeout=1"])
        assert res.record["metrics"]["nfe"] == steps
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "W&B could not start online" in line]
    assert len(lines) == 1 and lines[0].startswith("samplerlab: warning: W&B could not start online within 1 s (")
    assert "logging offline for the rest of this process" in lines[0]
    assert tries == ["online, init_timeout=1.0", "offline", "offline"]
    assert len(list((wandb_env / "wandb_dir" / "wandb").glob("offline-run-*"))) == 2


def test_init_timeout_must_be_positive(wandb_env):
    from framework.core.errors import ConfigError

    with pytest.raises(ConfigError, match="init_timeout must be > 0"):
        run(["logger=[wandb]", "model=gaussian", "steps=2", "++logger.wandb.init_timeout=0"])
