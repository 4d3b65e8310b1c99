"""A new user's first hour (issue 25) and a fast start (issue 26 item 4): samplerlab's own --help,
hints that name the closest key, a local path that is not a hub id, quiet libraries, progress off a
terminal, the run's log, the final line, and composition reused by repeated api.run calls."""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from framework.core.errors import ConfigError, ModelNotFoundError
from framework.entry.cli import main, sweep_jobs

ROOT = Path(__file__).resolve().parents[2]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --help ---------------------------------------------------------------------------------------------

def test_help_is_samplerlabs_own_page(capsys):
    code, out, err = cli(capsys, "--help")
    assert code == 0 and err == ""
    assert "powered by Hydra" not in out
    assert out.startswith("samplerlab: sample a latent diffusion model")
    from framework.core.registry import GROUPS, available

    for group in GROUPS:  # every group with its choices, the default marked
        line = next(l for l in out.splitlines() if l.startswith(f"  {group} "))
        assert next(iter(available(group))) in line
    assert "euler*" in out and "karras*" in out and "cfg*" in out
    assert "guidance=[cfg,color_loss]" in out and "'prompts=[a red circle,a blue square]'" in out  # the [a,b] syntax
    assert "outputs/<date>/<time>/" in out and "multirun/" in out and "samplerlab-report" in out  # where outputs go
    assert "samplerlab-plugins" in out  # how to list plugins
    assert "# the metric the app returns to sweepers" in out  # the settings keep conf/config.yaml's comments
    examples = [l for l in out.split("Examples:\n")[1].split("\n\n")[0].splitlines()]
    assert len(examples) >= 10


def test_help_examples_compose():
    """Every example of --help is a valid command: each of its runs composes and type-checks."""
    from framework.core.settings import read_settings
    from framework.entry.compose import compose
    from framework.entry.help import EXAMPLES

    for command, _ in EXAMPLES:
        words = [w for w in shlex.split(command)[1:] if w not in ("--cfg", "job")]
        jobs = sweep_jobs([w for w in words if w != "-m"]) if "-m" in words else [words]
        for job in jobs:
            read_settings(compose([w for w in job if not w.startswith("model.path=")])[0])


def test_help_and_config_errors_import_neither_torch_nor_plugins():
    """``samplerlab --help`` and ``samplerlab solver=nope`` answer without importing torch, Hydra's
    heavy parts aside, or any plugin (the times are benchmarks/cli_start.py's, not a test's)."""
    probe = (
        "import sys\n"
        "from framework.entry.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert 'hydra' not in sys.modules, 'help imported hydra'\n"
        "assert main(['solver=nope']) == 2\n"
        "assert main(['model=gaussian', 'stepz=3']) == 2\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'plugins')]\n"
        "assert not heavy, heavy[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "unknown solver 'nope'" in done.stderr and "did you mean steps?" in done.stderr


def test_cli_start_benchmark_smoke():
    """benchmarks/cli_start.py runs (one measurement each) and finds no heavy import."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cli_start.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "samplerlab --help" in done.stdout and "samplerlab solver=nope" in done.stdout
    assert done.stdout.count("heavy imports: none") == 2


# hints and paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/tmp/samplerlab-no/such/folder", "./no/such/folder", "../no/such/folder",
                                  "~/samplerlab-no-such-folder"])
def test_missing_local_path_is_no_such_folder(path):
    """A model.path that looks like a path is never tried as a hub id: "no such folder" at once."""
    from framework.models.diffusers_sd import StableDiffusion

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        StableDiffusion(path=path)


def test_hub_id_keeps_the_download_hint():
    from framework.models.diffusers_sd import load_pipeline, looks_like_path

    assert not looks_like_path("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ModelNotFoundError, match="hf download samplerlab-test/no-such-model"):
        load_pipeline("samplerlab-test/no-such-model")


def test_not_an_image_says_so(tmp_path):
    from framework.bases.guidance import load_image

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ConfigError, match=r"'.*notes.png' is not an image .* guidance.img2img.image"):
        load_image(str(text), (8, 8))


def test_tiny_random_leaves_no_tokenizer_folder(tmp_path, monkeypatch):
    import tempfile

    from framework.models.tiny import build_tiny_pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipe = build_tiny_pipeline(seed=1)
    assert pipe.tokenizer(["a red circle"]).input_ids  # the tokenizer works after its files are gone
    assert list(tmp_path.glob("samplerlab-tok-*")) == []


# quiet libraries --------------------------------------------------------------------------------------

def test_warnings_one_line_ours_log_theirs(capsys, caplog):
    """Under the CLI a library's warning (torchmetrics' KID notice) goes to the run's log, and
    samplerlab's own prints as one line."""
    import torchmetrics

    from framework.entry.quiet import quiet_libraries

    lib = str(Path(torchmetrics.__file__).parent / "utilities" / "prints.py")
    with caplog.at_level(logging.WARNING, logger="samplerlab"), quiet_libraries():
        warnings.showwarning("Metric `Kernel Inception Distance` will save all extracted features in buffer.\n  more",
                             UserWarning, lib, 43)
        warnings.showwarning("the grid has\nonly 2 steps", UserWarning, str(ROOT / "framework" / "runs" / "x.py"), 1)
    err = capsys.readouterr().err
    assert err == "samplerlab: warning: the grid has only 2 steps\n"
    assert "Kernel Inception Distance" in caplog.text


def test_model_loading_prints_nothing(capfd, tiny_dir):
    """Loading a pipeline (diffusers' bar, transformers' notices) prints nothing, whatever the
    libraries' verbosity was; their settings are restored afterwards."""
    from diffusers.utils import logging as diffusers_logging

    from framework.models.diffusers_sd import PIPELINES, load_pipeline

    PIPELINES.clear()
    diffusers_logging.set_verbosity_info()
    diffusers_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_pipeline(str(tiny_dir))
        out, err = capfd.readouterr()
        assert out == "" and err == "", err
        assert diffusers_logging.get_verbosity() == diffusers_logging.INFO and diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.set_verbosity_error()


# progress, the log, the final line ----------------------------------------------------------------------

def test_progress_lines_off_a_terminal(capsys, caplog, monkeypatch):
    """Off a terminal (pytest's stderr) progress is a line per report (every INTERVAL seconds; 0
    here): batch k of n, images/s, ETA; the same lines go to the samplerlab logger."""
    from framework.entry.api import run
    from framework.runs import progress

    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    with caplog.at_level(logging.INFO, logger="samplerlab"):
        run(["model=gaussian", "steps=3", "num_samples=4", "batch_size=2"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 * 3 + 2  # a line per step and per batch
    assert err[0].startswith("samplerlab: sampling: batch 1 of 2 (step 1 of 3), ETA ")
    assert err[3].startswith("samplerlab: sampling: batch 2 of 2, ") and " images/s, ETA " in err[3]
    assert err[-1].startswith("samplerlab: sampling: 2 of 2 batches done, ") and err[-1].endswith("ETA 0:00:00")
    assert [r.getMessage() for r in caplog.records if "sampling:" in r.getMessage()] == [l[12:] for l in err]


def test_final_line_names_metrics_and_grid_and_the_log_holds_it(capsys, tmp_path, tiny_dir):
    code, out, err = cli(capsys, "model=sd15", f"model.path={tiny_dir}", "steps=2", "num_samples=2",
                         "metrics=[speed]", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    rec = json.loads((tmp_path / "record.json").read_text())
    (line,) = out.splitlines()
    assert line.startswith("samplerlab: 2 samples in ") and line.endswith(f"-> {tmp_path / 'grid.png'}")
    for name in rec["metrics"]:  # every metric (the seconds stated once, up front)
        assert name == "seconds" or f"{name} " in line, name
    log = (tmp_path / "samplerlab.log").read_text()
    assert "2 samples in" in log and "grid.png" in log


# fast start: api.run composes once ------------------------------------------------------------------

def test_repeated_api_run_reuses_composition_with_identical_results():
    from framework.entry import compose as compose_module
    from framework.entry.api import run

    overrides = ["model=gaussian", "solver=heun", "steps=4", "seed=3"]
    first = run(overrides)
    composed = len(compose_module.COMPOSED.data)
    second = run(overrides)
    assert len(compose_module.COMPOSED.data) == composed  # no new composition
    assert torch.equal(first.latents, second.latents) and torch.equal(first.x_T, second.x_T)
    for key in ("run_key", "config", "sigmas", "plugins"):
        assert first.record[key] == second.record[key], key
    timeless = lambda r: {k: v for k, v in r["metrics"].items() if not k.startswith("seconds")}
    assert timeless(first.record) == timeless(second.record)


def test_compose_returns_the_callers_own_copy():
    from framework.entry.compose import compose

    cfg, choices = compose(["model=gaussian", "steps=7"])
    cfg.steps, choices["solver"] = 99, "changed"
    again, choices_again = compose(["model=gaussian", "steps=7"])
    assert again.steps == 7 and choices_again["solver"] == "euler"
