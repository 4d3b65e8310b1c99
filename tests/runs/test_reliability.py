"""Reliability (issue 11): bad input, numerical faults, interruptions and resume, shards, external
failures, safe loading. docs/reliability.md maps each requirement to the tests here."""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from framework.core import engine

from framework.core.markers import hookimpl
from framework.entry.api import run
from framework.entry.cli import main
from framework.core.errors import ModelNotFoundError, NumericalError
from framework.models.diffusers_sd import load_pipeline
from tests.core import test_entry_points

ROOT = Path(__file__).resolve().parents[2]
installed_plugin = test_entry_points.installed_plugin  # fixture: a plugin distribution on sys.path
GAUSS = ["model=gaussian", "dtype=float64", "steps=3"]


# --- plugins used by these tests (selected with +group.name._target_=tests.runs.test_reliability.X) ---
@dataclass
class NanGradient:
    """Loss guidance whose gradient is NaN for sample row 1 (and 0 for the others) at step ``at``."""

    at: int = 1

    @hookimpl
    def configure(self, run):
        run.request_grad(self)

    @hookimpl
    def guidance(self, state, pred):
        if state.index != self.at or state.pred is not None:
            return pred
        d = pred.denoised.detach().requires_grad_(True)
        loss = (torch.sqrt(d[1:2] * 0 - 1) * 0).sum() + (d * 0).sum()  # d√u/du at u=-1 is NaN
        (grad,) = torch.autograd.grad(loss, d)
        return pred.shifted(-grad)


@dataclass
class SignalOnce:
    """Sends this process a signal at the end of its first batch, once per ``marker`` file."""

    marker: str = ""
    signum: int = int(signal.SIGTERM)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), self.signum)


@dataclass
class Slow:
    """Sleeps after every batch (gives a subprocess test time to send its signal)."""

    seconds: float = 0.2

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        time.sleep(self.seconds)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path → bytes), without Hydra's own files."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


# --- config errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,expected",
    [
        (["solver=nope"], "unknown solver 'nope'"),
        (["guidance=[nope]"], "unknown guidance 'nope'"),
        (["stepz=3"], "unknown key 'stepz'"),
        (["model=gaussian", "solver.nope=1"], "unknown key 'solver.nope'"),
        (["model=gaussian", "steps=many"], "bad value for 'steps'"),
        (["model=gaussian", "schedule.rho=abc"], "could not be converted to Float"),
        (["model=gaussian", "+guidance.second._target_=plugins.solver.heun.Heun"], "exactly one plugin must answer 'step'"),
        (["model=gaussian", "momentum=[heavy_ball]", "solver=heun"], "does not compose with solver=heun"),
        (["model=gaussian", "guidance=[color_loss]"], "has no decoder"),
        (["model=gaussian", "shard_count=2", "shard_index=2"], "shard_index must be in 0..1"),
        (["model=gaussian", "callback.nan_guard.policy=ignore"], "callback.nan_guard.policy: Invalid value 'ignore', expected one of [mark, stop]"),
    ],
)
def test_config_error_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, expected):
    code, out, err = cli(capsys, *argv, f"hydra.run.dir={tmp_path}/run")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # no run folder, not even Hydra's .hydra/ and log


@pytest.mark.slow  # a sweep; the single-run cases above cover the clean-up fast
def test_config_error_in_sweep_job_writes_nothing_for_it(capsys, tmp_path):
    code, out, err = cli(capsys, "-m", "model=gaussian", "solver=euler,heun", "momentum=[heavy_ball]",
                         f"hydra.sweep.dir={tmp_path}")
    assert code == 1 and "does not compose with solver=heun" in err  # the sweep goes on (tests/entry/test_sweeps.py)
    assert (tmp_path / "0" / "record.json").exists()  # the valid job finished
    assert not (tmp_path / "1" / "record.json").exists() and not (tmp_path / "1" / "batches").exists()


# --- numerical faults ---------------------------------------------------------------------------
NAN_GRAD = ["guidance=[]", "+guidance.nangrad._target_=tests.runs.test_reliability.NanGradient",
            "num_samples=3", "batch_size=3", "steps=4"]


def test_nan_in_guidance_gradient_marks_the_sample_and_names_step_sigma_plugin(tmp_path):
    res = run(GAUSS + NAN_GRAD, output_dir=tmp_path)
    assert res.failed == [1]
    sigma = res.schedule.sigmas[1]
    assert res.failures[1] == f"non-finite values at step 1 (σ={sigma:.4g}) after guidance 'nangrad'"
    finite = torch.isfinite(res.latents).all(1).tolist()
    assert finite == [True, False, True]  # the other samples of the batch are kept
    clean = run(GAUSS + ["num_samples=3", "batch_size=3", "steps=4", "guidance=[]"])
    assert torch.equal(res.latents[[0, 2]], clean.latents[[0, 2]])
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["failed_samples"] == [1] and "after guidance 'nangrad'" in rec["failures"]["1"]


def test_nan_stop_policy_names_step_sigma_plugin():
    with pytest.raises(NumericalError, match=r"sample 1 at step 1 \(σ=.*\) after guidance 'nangrad'"):
        run(GAUSS + NAN_GRAD + ["callback.nan_guard.policy=stop", "callback.nan_guard.check_every=2"])


def test_nan_in_model_is_blamed_on_the_model():
    class Broken:
        sigma_min, sigma_max, shape = 0.01, 10.0, (2,)

        def __call__(self, x, sigma):
            out = x / (1 + sigma.reshape(-1, 1) ** 2)
            out[0] = float("inf") if float(sigma[0]) < 5 else out[0]
            return out

    res = run(["steps=4", "num_samples=2", "batch_size=2", "dtype=float64"], model=Broken())
    assert res.failed == [0]
    assert "after model 'custom'" in res.failures[0]


@pytest.mark.parametrize("policy,reads_per_batch", [("mark", 1), ("stop", 4)])
def test_nan_flags_are_read_every_k_steps_not_every_step(monkeypatch, policy, reads_per_batch):
    """The only host–device syncs of the guard: one read per ``check_every`` steps (stop) and one at
    the end of each batch; the per-step checks only queue device kernels."""
    reads = []
    original = engine.NonFinite.read
    monkeypatch.setattr(engine.NonFinite, "read", lambda self: reads.append(1) or original(self))
    run(["model=gaussian", "steps=10", "num_samples=4", "batch_size=2", f"callback.nan_guard.policy={policy}",
         "callback.nan_guard.check_every=4"])
    assert len(reads) == 2 * reads_per_batch  # stop: after steps 4, 8, 10 + the batch end


def test_no_guard_no_checks(monkeypatch):
    checks = []
    monkeypatch.setattr(engine.NonFinite, "check", lambda self, *a: checks.append(a))
    run(GAUSS + ["callback=[]"])
    assert checks == []


# --- interruptions and resume -------------------------------------------------------------------
def interrupt_during_batch(monkeypatch, n: int) -> list[int]:
    """Make the n-th call of sample_batch raise KeyboardInterrupt (as Ctrl-C would); returns the call log."""
    calls: list[int] = []
    original = engine.sample_batch

    def patched(run_, batch, *args, **kwargs):
        calls.append(batch.indices[0])
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(run_, batch, *args, **kwargs)

    monkeypatch.setattr(engine, "sample_batch", patched)
    return calls


def test_interrupted_run_resumes_to_identical_outputs(tiny_overrides, tmp_path, monkeypatch, capsys):
    over = tiny_overrides + ["steps=2", "num_samples=3", "batch_size=1", "prompts=[a red circle,a blue square]"]
    whole = run(over, output_dir=tmp_path / "whole")

    calls = interrupt_during_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(over, output_dir=tmp_path / "cut")
    assert "interrupted after 1 of 3 batches; 1 samples saved in" in capsys.readouterr().err
    assert sorted(tree(tmp_path / "cut")) == ["batches/000000.safetensors", "samples/000000.png"]  # nothing half
    monkeypatch.undo()

    calls = interrupt_during_batch(monkeypatch, 0)  # count only
    again = run(over, output_dir=tmp_path / "cut")
    assert calls == [1, 2]  # batch 0 was not made again
    assert again.resumed == [0] and again.record["resumed_samples"] == [0]
    assert torch.equal(again.latents, whole.latents) and torch.equal(again.images, whole.images)
    a, b = tree(tmp_path / "whole"), tree(tmp_path / "cut")
    assert sorted(a) == sorted(b)
    assert all(a[name] == b[name] for name in a if name != "record.json")  # PNGs, grid, latents
    ra, rb = (json.loads((tmp_path / d / "record.json").read_text()) for d in ("whole", "cut"))
    assert ra["run_key"] == rb["run_key"] and ra["metrics"]["nfe"] == rb["metrics"]["nfe"]

    calls.clear()
    third = run(over, output_dir=tmp_path / "cut")  # finished: nothing is built or sampled
    assert third.skipped and calls == []
    assert torch.equal(third.latents, whole.latents)
    assert (third.images - whole.images).abs().max() <= 0.5 / 255 + 1e-6  # read back from 8-bit PNGs

    png = tmp_path / "cut" / "samples" / "000001.png"
    png.unlink()  # a removed image is made again from its saved latents, without sampling
    fourth = run(over, output_dir=tmp_path / "cut")
    assert not fourth.skipped and fourth.resumed == [0, 1, 2] and calls == []
    assert png.read_bytes() == a["samples/000001.png"]


def test_sigterm_stops_like_ctrl_c_and_the_same_command_resumes(capsys, tmp_path):
    argv = ["model=gaussian", "steps=3", "num_samples=3", "batch_size=1", f"hydra.run.dir={tmp_path}/run",
            "+callback.term._target_=tests.runs.test_reliability.SignalOnce", f"+callback.term.marker={tmp_path}/sent"]
    code, out, err = cli(capsys, *argv)
    assert code == 128 + signal.SIGTERM
    assert "interrupted after 1 of 3 batches" in err and "rerun the same command to resume" in err
    assert not (tmp_path / "run" / "record.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "1 read back from an earlier attempt" in out
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["resumed_samples"] == [0]


def test_named_sweep_skips_finished_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "-m", "model=gaussian", "steps=2", "name=study")
    assert code == 0, err
    folders = sorted((tmp_path / "multirun" / "study").glob("*/record.json"))
    assert len(folders) == 1
    for path in folders:  # a job's folder is its run key: reordered or extended sweeps still find it
        assert json.loads(path.read_text())["run_key"] == path.parent.name
    stamps = {p: p.stat().st_mtime_ns for p in folders}
    code, out, err = cli(capsys, "-m", "model=gaussian", "steps=3,2", "name=study")  # extended and reordered
    assert code == 0, err
    assert out.count("finished run found") == 1 and "nfe 3" in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(list((tmp_path / "multirun" / "study").glob("*/record.json"))) == 2


def test_named_single_run_folder_is_found_again(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "model=gaussian", "steps=2", "name=one")[0] == 0
    assert (tmp_path / "outputs" / "one" / "record.json").exists()
    code, out, err = cli(capsys, "model=gaussian", "steps=2", "name=one")
    assert code == 0 and "finished run found" in out
    code, out, err = cli(capsys, "model=gaussian", "steps=2", "name=one", "resume=false")
    assert code == 0 and "nfe 2" in out


def test_killed_process_leftovers_are_cleaned_and_damaged_batches_redone(tmp_path):
    over = GAUSS + ["num_samples=2", "batch_size=1"]
    first = run(over, output_dir=tmp_path)
    (tmp_path / "record.json").unlink()  # as if killed before the end
    (tmp_path / "batches" / ".000001.safetensors.x1.tmp").write_bytes(b"half")
    damaged = tmp_path / "batches" / "000001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:20])
    with pytest.warns(UserWarning, match="batches/000001.safetensors in .* is damaged .*: its batch is made again"):
        again = run(over, output_dir=tmp_path)
    assert again.resumed == [0]
    assert torch.equal(again.latents, first.latents)
    assert not list(tmp_path.rglob("*.tmp"))


def test_model_object_passed_in_is_never_resumed(tmp_path):
    """The run key sees the config, not a model object handed to run(): such runs are always made."""
    from framework.models.analytic import Gaussian

    first = run(["steps=2", "dtype=float64"], model=Gaussian(shape=(3,)), output_dir=tmp_path)
    second = run(["steps=2", "dtype=float64"], model=Gaussian(shape=(3,), std=0.5), output_dir=tmp_path)
    assert not second.skipped and second.resumed == []
    assert not torch.equal(first.latents, second.latents)


# --- shards -------------------------------------------------------------------------------------
def test_shards_split_the_samples_and_concatenate_to_the_whole(tmp_path):
    over = GAUSS + ["num_samples=5", "batch_size=2", "solver=euler_ancestral"]
    whole = run(over)
    parts = [run(over + ["shard_count=2", f"shard_index={i}"], output_dir=tmp_path / str(i)) for i in (0, 1)]
    assert [p.indices for p in parts] == [[0, 1], [2, 3, 4]]
    assert torch.equal(torch.cat([p.latents for p in parts]), whole.latents)
    recs = [json.loads((tmp_path / str(i) / "record.json").read_text()) for i in (0, 1)]
    assert recs[1]["shard"] == {"index": 1, "count": 2, "start": 2, "stop": 5}
    assert recs[0]["merge_key"] == recs[1]["merge_key"] == whole.record["merge_key"]
    assert recs[0]["run_key"] != recs[1]["run_key"]


def test_shard_saves_global_sample_names(tiny_overrides, tmp_path):
    run(tiny_overrides + ["steps=1", "num_samples=3", "batch_size=2", "shard_count=2", "shard_index=1"],
        output_dir=tmp_path)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["images"]["samples"] == ["samples/000001.png", "samples/000002.png"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000001.png", "000002.png"]
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["000001.safetensors"]


# --- external failures --------------------------------------------------------------------------
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


def test_missing_checkpoint_offline_names_how_to_provide_it(capsys, tmp_path):
    code, out, err = cli(capsys, "model=sd15", "model.path=nobody/no-such-model", f"hydra.run.dir={tmp_path}/r")
    assert code == 2
    assert "is not available offline" in err and "hf download" in err and "model.path" in err
    assert not (tmp_path / "r").exists()


def test_hf_offline_setting_wins_over_allow_download(monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        raise OSError("no network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fake)
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        load_pipeline("nobody/offline-test", allow_download=True)
    assert seen["local_files_only"] is True and seen["use_safetensors"] is True


def test_missing_clip_offline_names_how_to_provide_it(tiny_overrides, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"not available offline.*metrics\.clip_score\.model"):
        run(tiny_overrides + ["steps=1", "num_samples=1", "metrics=[clip_score]",
                              f"metrics.clip_score.model={tmp_path}/no-clip"])


def test_wandb_failure_still_writes_the_local_record(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("unreachable")))
    with pytest.warns(UserWarning, match="W&B init failed"):
        run(GAUSS + ["logger=[wandb]"], output_dir=tmp_path)
    assert json.loads((tmp_path / "record.json").read_text())["metrics"]["nfe"] == 3


# --- safety -------------------------------------------------------------------------------------
def test_no_pickle_loading_in_framework_or_plugins():
    """Weights come from safetensors, or torch.load(..., weights_only=True) at most; never pickle."""
    offenders = []
    for path in [*(ROOT / "framework").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                if (owner, node.func.attr) == ("torch", "load"):
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
                if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    assert offenders == []


def test_entry_point_plugins_are_listed_at_start(installed_plugin, capsys, tmp_path):
    code, out, err = cli(capsys, "model=gaussian", "steps=2", f"hydra.run.dir={tmp_path}/r")
    assert code == 0
    listed = [line for line in err.splitlines() if "entry-point plugins" in line]
    assert listed == ["samplerlab: entry-point plugins: midpoint-plugin (midpoint); "
                      "disable with SAMPLERLAB_DISABLE_ENTRY_POINTS=1"]


def test_entry_points_disabled_are_neither_listed_nor_loaded(installed_plugin, capsys, monkeypatch):
    monkeypatch.setenv("SAMPLERLAB_DISABLE_ENTRY_POINTS", "1")
    code, out, err = cli(capsys, "model=gaussian", "solver=midpoint")
    assert code == 2 and "entry-point plugins" not in err and "unknown solver 'midpoint'" in err


def test_exception_in_hook_names_plugin_on_the_command_line(capsys, tmp_path):
    code, out, err = cli(capsys, "model=gaussian", "steps=2", "+callback.boom._target_=tests.plugins_for_tests.Raising",
                         f"hydra.run.dir={tmp_path}/r")
    assert code == 2
    assert err.strip() == "samplerlab: error: plugin 'boom' failed in hook 'before_step': RuntimeError: boom"


@pytest.mark.slow
def test_sigterm_to_a_real_process_then_resume(tmp_path):
    """A real `samplerlab` process gets SIGTERM mid-run; the same command then finishes the work."""
    argv = ["model=gaussian", "steps=2", "num_samples=6", "batch_size=1", f"hydra.run.dir={tmp_path}/run",
            "+callback.slow._target_=tests.runs.test_reliability.Slow", "+callback.slow.seconds=0.3"]
    code = f"import sys; from framework.entry.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "batches" / "000000.safetensors"
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted after" in err and not (tmp_path / "run" / "record.json").exists()
    done = len(list((tmp_path / "run" / "batches").glob("*.safetensors")))
    assert 1 <= done < 6
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert len(rec["resumed_samples"]) == done


@pytest.mark.parametrize("argv", [
    ["solver._target_=os.system", "+solver.command=touch {marker}"],
    ["solver._target_=subprocess.Popen", "+solver.args=[touch,{marker}]"],
    ["model._target_=subprocess.Popen", "+model.args=[touch,{marker}]"],
    ["+callback.x._target_=shutil.rmtree", "+callback.x.path={marker}"],
])
def test_config_targets_are_limited_to_plugin_classes(capsys, tmp_path, argv):
    """A config cannot run an arbitrary callable: the target must be a plugin (or model) class."""
    marker = tmp_path / "PWNED"
    code, out, err = cli(capsys, "model=gaussian", *[a.format(marker=marker) for a in argv], f"hydra.run.dir={tmp_path}/run")
    assert code == 2 and "is not a plugin class" in err and "only such classes are built from a config" in err
    assert err.count("\n") == 1 and not marker.exists() and not (tmp_path / "run").exists()
