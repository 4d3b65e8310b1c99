"""Run folders you can trust (issue 27): one process per folder, one run's files per folder, every
file checked against its digest when read back, input files in the run key by content, full-range
seeds, numerical faults of adaptive solvers and model shapes. docs/reliability.md maps each
requirement to the tests here."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.core import engine
from framework.core.errors import ConfigError, PluginError
from framework.core.markers import hookimpl
from framework.entry.api import run
from framework.entry.cli import main
from framework.runs.folder import _batch_digest
from framework.runs.records import inputs_fingerprint, record_problem, run_key
from framework.tools.score import main as score_main
from framework.tools.score import score

ROOT = Path(__file__).resolve().parents[2]
GAUSS = ["model=gaussian", "dtype=float64", "steps=2", "num_samples=3", "batch_size=2"]


# --- helpers -----------------------------------------------------------------------------------
@dataclass
class Hold:
    """At the end of its first batch: touch ``started``, then wait until ``go`` exists (at most 120 s)."""

    started: str = ""
    go: str = ""

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        if not os.path.exists(self.started):
            Path(self.started).touch()
            deadline = time.monotonic() + 120
            while not os.path.exists(self.go) and time.monotonic() < deadline:
                time.sleep(0.02)


class Proc:
    """A real ``samplerlab`` process whose output is collected as it comes."""

    def __init__(self, argv: list[str], cwd: Path):
        code = f"import sys; from framework.entry.cli import main; sys.exit(main({argv!r}))"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.p = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=lambda s=s, o=o: o.extend(iter(s.readline, "")), daemon=True)
                         for s, o in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    def wait(self) -> int:
        code = self.p.wait(timeout=180)
        for t in self._readers:
            t.join(timeout=30)
        return code


def wait_until(ready, proc: Proc, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.p.poll() is None, f"the process ended before {what}: {''.join(proc.err)}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rerun(over: list[str], folder: Path, **kwargs):
    """Run into ``folder``; returns (result, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(over, output_dir=folder, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def count_sampling(monkeypatch) -> list[list[int]]:
    """The batches actually sampled (not read back) from now on."""
    calls: list[list[int]] = []
    original = engine.sample_batch

    def counted(run_, batch, *args, **kwargs):
        calls.append(list(batch.indices))
        return original(run_, batch, *args, **kwargs)

    monkeypatch.setattr(engine, "sample_batch", counted)
    return calls


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tensor_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after its 8-byte length and JSON header)."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


# --- 1. one process per run folder --------------------------------------------------------------
def test_one_process_per_run_folder_the_same_run_waits_another_is_refused(tmp_path, capsys, monkeypatch):
    """Process A holds ``name=mix``; process B (the same command) waits for it, then finds the run
    finished; a third attempt with another config is refused with one line (exit 2) and touches
    nothing, not even a temporary file A might be writing."""
    hold = ["+callback.hold._target_=tests.runs.test_run_folders.Hold", f"+callback.hold.started={tmp_path}/started",
            f"+callback.hold.go={tmp_path}/go"]
    argv = ["model=gaussian", "steps=2", "num_samples=3", "batch_size=1", "name=mix", *hold]
    a = Proc(argv, tmp_path)
    wait_until((tmp_path / "started").exists, a, "A's first batch")
    folder = tmp_path / "outputs" / "mix"
    in_flight = folder / "batches" / ".000001.safetensors.a1b2.tmp"
    in_flight.parent.mkdir(parents=True, exist_ok=True)  # A's worker may not have written its first batch yet
    in_flight.write_bytes(b"as if A were writing it")
    b = Proc(argv, tmp_path)
    wait_until(lambda: any("making the same run: waiting for it" in line for line in b.err), b, "B to wait")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *[a_ if a_ != "steps=2" else "steps=3" for a_ in argv])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"outputs/mix is in use by process {a.p.pid} on " in err and "making another run" in err
    assert in_flight.read_bytes() == b"as if A were writing it"
    (tmp_path / "go").touch()
    assert a.wait() == 0, "".join(a.err)
    assert b.wait() == 0, "".join(b.err)
    assert any("finished run found" in line for line in b.out)
    rec = json.loads((folder / "record.json").read_text())
    assert rec["config"]["steps"] == 2 and record_problem(rec) is None
    assert sorted(p.name for p in (folder / "batches").glob("*.safetensors")) == [
        "000000.safetensors", "000001.safetensors", "000002.safetensors"]
    assert not (folder / ".lock").exists()


def test_lock_is_released_and_a_folder_made_for_nothing_is_removed(tmp_path):
    """A run that fails before writing anything leaves neither its lock nor an empty folder."""
    with pytest.raises(ConfigError):
        run(["model=gaussian", "steps=2", "momentum=[heavy_ball]", "solver=heun"], output_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    run(GAUSS, output_dir=tmp_path / "r")
    assert not (tmp_path / "r" / ".lock").exists()


# --- 4. integrity: every file checked against its digest when read back ------------------------
def _tiny(tiny_overrides):
    return tiny_overrides + ["steps=1", "num_samples=3", "batch_size=2", "prompts=[a red circle,a blue square]"]


def test_damaged_png_of_a_finished_run_is_written_again(tiny_overrides, tmp_path, monkeypatch):
    over = _tiny(tiny_overrides)
    first = run(over, output_dir=tmp_path)
    before = files(tmp_path)
    png = tmp_path / "samples" / "000001.png"
    png.write_bytes(png.read_bytes()[:40])  # truncated
    calls = count_sampling(monkeypatch)
    again, said = rerun(over, tmp_path)
    assert not again.skipped and calls == []  # read back from its batch, not sampled
    assert any("samples/000001.png" in m and "does not match its checksum" in m for m in said), said
    assert sum("samples/000001.png" in m and "written again from the saved latents" in m for m in said) == 1
    assert png.read_bytes() == before["samples/000001.png"]
    assert torch.equal(again.latents, first.latents)
    third, said = rerun(over, tmp_path)
    assert third.skipped and said == []  # finished again, for good


def test_flipped_bytes_in_a_batch_files_tensor_data_are_caught(tmp_path, monkeypatch):
    first = run(GAUSS, output_dir=tmp_path)
    (tmp_path / "record.json").unlink()  # as if killed before the end: the batch files are read back
    path = tmp_path / "batches" / "000000.safetensors"
    data = bytearray(path.read_bytes())
    data[tensor_data_offset(path) + 5] ^= 0x10
    path.write_bytes(bytes(data))
    calls = count_sampling(monkeypatch)
    again, said = rerun(GAUSS, tmp_path)
    assert calls == [[0, 1]]  # made again; batch [2] read back
    assert any("batches/000000.safetensors" in m and "checksum does not match" in m for m in said), said
    assert torch.equal(again.latents, first.latents) and again.resumed == [2]


def test_flipped_bytes_in_a_finished_runs_batch_file_make_it_again(tmp_path, monkeypatch):
    first = run(GAUSS, output_dir=tmp_path)
    path = tmp_path / "batches" / "000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    calls = count_sampling(monkeypatch)
    again, said = rerun(GAUSS, tmp_path)
    assert not again.skipped and calls == [[2]]
    assert torch.equal(again.latents, first.latents)
    assert rerun(GAUSS, tmp_path)[0].skipped


@pytest.mark.parametrize("damage", ["empty list", "no sigmas", "directory", "edited value", "v1 without sigmas",
                                    "not JSON"])
def test_malformed_record_is_finished_again_without_a_traceback(tmp_path, monkeypatch, damage):
    first = run(GAUSS, output_dir=tmp_path)
    path = tmp_path / "record.json"
    rec = json.loads(path.read_text())
    if damage == "empty list":
        path.write_text("[]")
    elif damage == "no sigmas":
        del rec["sigmas"]
        path.write_text(json.dumps(rec))
    elif damage == "directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("?")
    elif damage == "edited value":
        rec["metrics"]["nfe"] = 1.0  # still valid JSON, and plausible
        path.write_text(json.dumps(rec))
    elif damage == "v1 without sigmas":
        rec["schema_version"] = 1
        del rec["sigmas"], rec["checksum"]
        path.write_text(json.dumps(rec))
    else:
        path.write_text('{"schema_version": 2, "run_')
    calls = count_sampling(monkeypatch)
    again, said = rerun(GAUSS, tmp_path)
    assert not again.skipped and calls == []  # every batch read back
    assert len(said) == 1 and "record.json in" in said[0] and "is damaged" in said[0], said
    assert torch.equal(again.latents, first.latents)
    rec = json.loads(path.read_text())
    assert record_problem(rec) is None and rec["metrics"]["nfe"] == 2
    assert rerun(GAUSS, tmp_path)[0].skipped


@pytest.mark.parametrize("digest", ["recomputed", "none (an older batch file)"])
def test_wrong_shape_batch_file_is_made_again(tmp_path, monkeypatch, digest):
    from safetensors.torch import save_file

    first = run(GAUSS, output_dir=tmp_path)
    (tmp_path / "record.json").unlink()
    path = tmp_path / "batches" / "000000.safetensors"
    info = {"run_key": first.record["run_key"], "indices": [0, 1], "nfe": 2, "unet_calls": 2, "failures": {}}
    tensors = {"x_T": torch.zeros(2, 5, dtype=torch.float64), "latents": torch.zeros(2, 5, dtype=torch.float64)}
    if digest == "recomputed":
        info.update(format=2, samples={})
        info["sha256"] = _batch_digest(info, tensors)
    save_file(tensors, str(path), metadata={"samplerlab": json.dumps(info)})
    calls = count_sampling(monkeypatch)
    again, said = rerun(GAUSS, tmp_path)
    assert calls == [[0, 1]]
    assert any("batches/000000.safetensors" in m and "has shape [2, 5], expected [2, 16]" in m for m in said), said
    assert torch.equal(again.latents, first.latents)


def test_score_checks_each_listed_sample_and_a_damaged_record_is_one_line(tiny_overrides, tmp_path, capsys):
    over = _tiny(tiny_overrides) + ["metrics=[prompt_accuracy]"]
    run(over, output_dir=tmp_path / "r")
    png = tmp_path / "r" / "samples" / "000001.png"
    png.write_bytes(png.read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"000001.png is missing or damaged: left out of the scores"):
        merged = score([tmp_path / "r"], ["metrics=[prompt_accuracy]"], out=tmp_path / "m")
    assert merged["num_samples"] == 2 and merged["damaged_samples"] == [1] and merged["missing_samples"] == [1]
    assert record_problem(json.loads((tmp_path / "m" / "record.json").read_text())) is None
    (tmp_path / "r" / "record.json").write_text("[]")
    assert score_main([str(tmp_path / "r"), "metrics=[prompt_accuracy]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "record.json is damaged (not a JSON object but list)" in err


# --- 6. one run's files per folder --------------------------------------------------------------
def test_a_different_run_into_the_same_folder_replaces_the_first_runs_files(tiny_overrides, tmp_path):
    base = tiny_overrides + ["batch_size=2", "metrics=[prompt_accuracy]"]
    run(base + ["num_samples=4", "steps=1"], output_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = run(base + ["num_samples=2", "steps=2"], output_dir=tmp_path)
    assert any("holds another run" in str(w.message) for w in caught)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["000000.safetensors"]
    rec = json.loads((tmp_path / "record.json").read_text())
    assert set(rec["files"]) == {"grid.png", "samples/000000.png", "samples/000001.png", "batches/000000.safetensors"}
    assert rec["run_key"] == second.record["run_key"]
    (tmp_path / "samples" / "000007.png").write_bytes((tmp_path / "samples" / "000000.png").read_bytes())  # a stray
    merged = score([tmp_path], [], out=tmp_path.parent / "scored")
    assert merged["num_samples"] == 2  # only what the record lists


def test_resume_false_starts_from_an_empty_folder(tmp_path, monkeypatch):
    run(GAUSS, output_dir=tmp_path)
    (tmp_path / "batches" / "000009.safetensors").write_bytes(b"left over")
    calls = count_sampling(monkeypatch)
    run(GAUSS + ["resume=false"], output_dir=tmp_path)
    assert calls == [[0, 1], [2]]
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["000000.safetensors", "000002.safetensors"]


def test_files_plugins_write_are_in_the_manifest_and_removed_with_their_run(tiny_overrides, tmp_path):
    over = _tiny(tiny_overrides)
    run(over + ["callback=[nan_guard,preview]"], output_dir=tmp_path)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert {"preview.png", "preview.json"} <= set(rec["files"])
    (tmp_path / "notes.txt").write_text("the user's")
    run(over + ["steps=2"], output_dir=tmp_path)  # another run, without previews
    assert not (tmp_path / "preview.png").exists() and not (tmp_path / "preview.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's"  # never listed, never removed


# --- 5. input files enter the run key by content ------------------------------------------------
def test_input_image_changed_on_disk_changes_the_run_key(tiny_overrides, tmp_path, monkeypatch):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    over = tiny_overrides + ["steps=2", "num_samples=1", "guidance=[cfg,img2img]", f"guidance.img2img.image={image}"]
    first = run(over, output_dir=tmp_path / "i")
    assert set(first.record["inputs"]) == {"guidance.img2img.image"}
    Image.new("RGB", (32, 32), (0, 0, 255)).save(image)  # overwritten: same path, new content
    calls = count_sampling(monkeypatch)
    second = run(over, output_dir=tmp_path / "i")
    assert not second.skipped and calls == [[0]]
    assert second.record["run_key"] != first.record["run_key"]
    assert second.record["inputs"]["guidance.img2img.image"] != first.record["inputs"]["guidance.img2img.image"]
    assert not torch.equal(second.latents, first.latents)


def test_declared_input_files_and_folders_are_hashed_others_are_not(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"mask 1")
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "learned_embeds.safetensors").write_bytes(b"vectors 1")
    (tmp_path / "cache").mkdir()
    config = {
        "guidance": {"inpaint": {"_target_": "plugins.guidance.inpaint.Inpaint", "image": str(tmp_path / "mask.png"),
                                 "mask": str(tmp_path / "mask.png")}},
        "conditioning": {"textual_inversion": {"_target_": "plugins.conditioning.textual_inversion.TextualInversion",
                                               "path": str(tmp_path / "emb")}},
        "metrics": {"fid": {"_target_": "plugins.metrics.fid.FID", "cache_dir": str(tmp_path / "cache")}},
        "prompts": [str(tmp_path / "mask.png")],  # a string that names a file, but no plugin reads it as one
    }
    got = inputs_fingerprint(config)
    assert set(got) == {"guidance.inpaint.image", "guidance.inpaint.mask", "conditioning.textual_inversion.path"}
    key = run_key(config)
    (tmp_path / "cache" / "features.bin").write_bytes(b"written by a run")  # an output folder: not an input
    assert run_key(config) == key
    (tmp_path / "emb" / "learned_embeds.safetensors").write_bytes(b"vectors 2")
    assert run_key(config) != key
    assert run_key({"steps": 1}) == run_key({"steps": 1}, inputs={})  # no inputs: the key of schema 1



def test_file_names_nested_in_a_list_parameter_enter_the_key(tmp_path):
    """guidance.regional declares ``regions.mask``: each region's mask file counts by content, its
    prompt (a string that may name a file) does not."""
    (tmp_path / "m.png").write_bytes(b"mask 1")
    regions = [{"prompt": str(tmp_path / "m.png"), "box": [0, 0, 0.5, 1]}, {"prompt": "a cat", "mask": str(tmp_path / "m.png")}]
    config = {"guidance": {"regional": {"_target_": "plugins.guidance.regional.Regional", "regions": regions}}}
    assert set(inputs_fingerprint(config)) == {"guidance.regional.regions[1].mask"}
    key = run_key(config)
    (tmp_path / "m.png").write_bytes(b"mask 2")
    assert run_key(config) != key

# --- 8. seeds ------------------------------------------------------------------------------------
def test_every_bit_of_the_seed_counts_and_smaller_seeds_keep_their_noise():
    from framework.core.noise import sample_seed

    def cut_to_48_bits(seed: int, index: int) -> int:  # the formula before issue 27
        state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFF, index]).generate_state(2, np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])

    for seed in (0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**40 + 5, 2**48 - 1):
        for index in (0, 1, 999, 2**31):
            assert sample_seed(seed, index) == cut_to_48_bits(seed, index)
    x = {s: run(["model=gaussian", "steps=1", f"seed={s}"]).x_T for s in (0, 2**48, 2**70, 2**70 + 2**48)}
    assert all(not torch.equal(x[a], x[b]) for a in x for b in x if a != b)


def test_negative_seed_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = cli(capsys, "model=gaussian", "seed=-1", f"hydra.run.dir={tmp_path}/r")
    assert code == 2 and err.count("\n") == 1
    assert "seed must be a non-negative integer (any size), got -1" in err
    assert not (tmp_path / "r").exists()


# --- 3. numerical faults and shapes -------------------------------------------------------------
def test_nan_model_does_not_kill_dpm_adaptive_under_mark(capsys, tmp_path):
    code, out, err = cli(capsys, "model=gaussian", "model.std=nan", "solver=dpm_adaptive", "steps=4",
                         f"hydra.run.dir={tmp_path}/r")
    assert code == 0, err
    assert "Traceback" not in err and "failed: non-finite values at step 0" in err


def test_one_nan_sample_leaves_the_others_of_a_dpm_adaptive_batch_finite():
    class OneNaN:
        sigma_min, sigma_max, shape = 0.01, 10.0, (2,)

        def __call__(self, x, sigma):
            out = x / (1 + sigma.reshape(-1, 1) ** 2)
            out[0] = float("nan")
            return out

    res = run(["solver=dpm_adaptive", "steps=4", "num_samples=3", "batch_size=3", "dtype=float64"], model=OneNaN())
    assert res.failed == [0] and "after model 'custom'" in res.failures[0]
    assert torch.isfinite(res.latents[1:]).all()


def test_wrong_output_shape_is_blamed_on_the_model():
    class Wrong:
        sigma_min, sigma_max, shape = 0.01, 10.0, (2,)

        def __call__(self, x, sigma):
            return x[:, :1] / (1 + sigma.reshape(-1, 1) ** 2)

    with pytest.raises(PluginError) as err:
        run(["steps=2", "num_samples=2", "batch_size=2", "solver=heun"], model=Wrong())
    assert str(err.value) == ("plugin 'custom' failed in hook 'predict': ValueError: the model returned a denoised of "
                              "shape [2, 1] for x of shape [2, 2]: it must return one prediction shaped like its input")
