"""record.json: schema, run key, atomic writes."""
from __future__ import annotations

import json

from framework.entry.api import run
from framework.core.files import atomic_write_json
from framework.runs.folder import _batch_digest
from framework.runs.records import file_digest, record_problem, run_key, seal

GAUSS = ["model=gaussian", "dtype=float64", "num_samples=2", "batch_size=2", "steps=3"]


def test_record_fields(tmp_path):
    res = run(GAUSS, output_dir=tmp_path)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec == json.loads(json.dumps(res.record, default=str))
    assert rec["schema_version"] == 2
    assert len(rec["run_key"]) == 16
    assert rec["config"]["steps"] == 3
    assert rec["plugins"]["step"] == ["euler"] and rec["plugins"]["schedule"] == ["karras"]
    assert rec["sigmas"][0] == 80.0 and rec["sigmas"][-1] == 0.0 and len(rec["sigmas"]) == 4
    for key in ("nfe", "unet_calls", "seconds", "seconds_per_sample", "rmse_to_reference"):
        assert key in rec["metrics"]
    assert set(rec["versions"]) == {"python", "torch", "diffusers", "samplerlab", "git_sha"}
    assert rec["seed"] == 0 and rec["images"] is None
    assert rec["shard"] == {"index": 0, "count": 1, "start": 0, "stop": 2}
    assert len(rec["merge_key"]) == 16 and rec["failed_samples"] == [] and rec["failures"] == {}
    assert rec["resumed_samples"] == [] and rec["init_noise_scale"] == 80.0
    assert rec["inputs"] == {} and set(rec["files"]) == {"batches/000000.safetensors"}
    assert rec["checksum"] == seal(dict(rec))["checksum"] and record_problem(rec) is None


def test_batch_file_format(tmp_path):
    """The documented on-disk format (docs/reliability.md) that resume and shard merging read."""
    from safetensors import safe_open

    res = run(GAUSS + ["num_samples=3"], output_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["000000.safetensors", "000002.safetensors"]
    with safe_open(str(tmp_path / "batches" / "000002.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["samplerlab"])
        tensors = {"x_T": f.get_tensor("x_T"), "latents": f.get_tensor("latents")}
    assert info == {"run_key": res.record["run_key"], "indices": [2], "nfe": 3, "unet_calls": 3, "failures": {},
                    "format": 2, "samples": {}, "network_inputs": 3, "sha256": _batch_digest(info, tensors)}
    assert tensors["latents"].equal(res.latents[2:]) and tensors["x_T"].equal(res.x_T[2:])
    assert res.record["files"] == {f"batches/{n}": file_digest(tmp_path / "batches" / n)
                                   for n in ("000000.safetensors", "000002.safetensors")}


def test_run_key_depends_on_config_not_on_output_dir(tmp_path):
    a = run(GAUSS, output_dir=tmp_path / "a").record["run_key"]
    b = run(GAUSS, output_dir=tmp_path / "b").record["run_key"]
    c = run(GAUSS + ["seed=1"]).record["run_key"]
    assert a == b != c
    assert run_key({"x": 1, "output_dir": "p"}) == run_key({"x": 1, "output_dir": "q"})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    atomic_write_json(tmp_path / "r.json", {"a": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_run_key_changes_when_the_weights_change(tiny_dir, tmp_path):
    """A rerun after the checkpoint's weights change must not be answered from the old run folder."""
    import shutil

    from framework.runs.records import run_key

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    config = {"model": {"_target_": "framework.models.diffusers_sd.StableDiffusion", "path": str(folder)}, "steps": 4}
    before = run_key(config)
    assert run_key(config) == before
    weights = next(folder.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert run_key(config) != before


def test_records_written_before_the_restructure_are_read_beside_new_ones(tmp_path, capsys):
    """A run folder of commit 08d86dc (tests/data) and one written now: the report and the scorer
    read both (schema_version 1 there, 2 here), and while the bundled model is still the v2 it was
    made with, today's engine makes the same samples."""
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from framework.bundled import PIPELINE_DIR
    from framework.entry.api import run
    from framework.tools.report import build_report, load_runs
    from framework.tools.score import score

    old = Path(__file__).parents[1] / "data" / "run_before_restructure"
    root = tmp_path / "sweep"
    shutil.copytree(old, root / "before")
    new = run(["steps=3", "num_samples=4", "batch_size=4", "metrics=[prompt_accuracy]", "seed=7"], output_dir=root / "now")
    old_record = json.loads((old / "record.json").read_text())
    assert new.record["schema_version"] == 2 and old_record["schema_version"] == 1
    assert set(new.record) == set(old_record) | {"files", "inputs", "checksum", "nfe_convention"}  # what schema 2 adds (+ the NFE convention, issue 23)
    assert new.record["plugins"] == old_record["plugins"]
    assert record_problem(old_record) is None and record_problem(new.record) is None
    v2 = {"unet/diffusion_pytorch_model.safetensors": "85adbdc62703467e",  # the weights of 08d86dc
          "vae/diffusion_pytorch_model.safetensors": "d484c74ec75b576c", "text_encoder/model.safetensors": "936f12fb1eeb6a9f"}
    same_model = all(file_digest(PIPELINE_DIR / f) == h for f, h in v2.items())
    for k in range(4 if same_model else 0):  # 8-bit PNGs: float rounding (thread count, kernels) may move a pixel by one level
        a, b = (np.asarray(Image.open(f / "samples" / f"{k:06d}.png")).astype(int) for f in (old, root / "now"))
        assert np.abs(a - b).max() <= 1, f"sample {k} differs from the one written before the restructure"
    assert len(load_runs(root)) == 2
    assert build_report(root, wandb=False).is_file()
    for folder in ("before", "now") if same_model else ("before",):  # the judge scores the old samples alike
        merged = score([root / folder], ["metrics=[prompt_accuracy]"], out=tmp_path / f"scored_{folder}")
        assert merged["metrics"]["prompt_accuracy_colour"] == old_record["metrics"]["prompt_accuracy_colour"]
