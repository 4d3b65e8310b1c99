"""Issue 26, item 3: a run's host work (PNGs, batch files, metric updates) on one background worker,
in order, with errors raised in the main thread; FID and KID share one feature extraction per batch;
the evaluation-throughput benchmark's smoke mode."""
from __future__ import annotations

import threading

import pytest
import torch

from framework.entry import api
from framework.core.background import Background, HostCopy, background, drain
from framework.runs import execute as execute_module
from tests.benchmark_scripts import load_benchmark


def test_jobs_run_in_order_on_one_thread_with_the_callers_thread_count():
    worker, seen = Background(depth=2), []
    for k in range(20):  # more jobs than the queue holds: submit blocks, nothing is lost
        worker.submit(lambda k=k: seen.append((k, threading.current_thread().name, torch.get_num_threads(),
                                               torch.is_grad_enabled())))
    worker.drain()
    assert [k for k, *_ in seen] == list(range(20))
    assert {name for _, name, _, _ in seen} == {"samplerlab-background"}
    assert {n for _, _, n, _ in seen} == {torch.get_num_threads()}
    assert not any(grad for *_, grad in seen)
    worker.close()


def test_an_error_stops_later_jobs_and_is_raised_in_the_caller():
    worker, seen = Background(), []

    def fail():
        raise OSError("disk full")

    worker.submit(seen.append, 1)
    worker.submit(fail)
    worker.submit(seen.append, 3)  # after the failed job: skipped (a batch file after failed PNGs)
    with pytest.raises(OSError, match="disk full"):
        worker.drain()
    assert seen == [1]
    worker.drain()  # raised once
    worker.close()


def test_host_copy_on_the_cpu_is_the_tensor():
    t = torch.arange(6.0)
    assert HostCopy(t).get().data_ptr() == t.data_ptr()


def test_run_folder_and_metrics_go_through_the_worker(tmp_path, monkeypatch):
    """The run's worker writes every batch (PNGs, then its batch file) and runs the metric updates;
    the record lists every file, and the loop drains before the record."""
    submitted = []
    real_submit = Background.submit

    def spy(self, fn, *args, **kwargs):
        submitted.append(getattr(fn, "__qualname__", repr(fn)))
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(Background, "submit", spy)
    r = api.run(["model=tiny_random", "num_samples=4", "batch_size=2", "steps=2", "metrics=[fid,kid]",
                        "metrics.fid.reference=4", "metrics.kid.reference=4", f"output_dir={tmp_path}",
                        "device=cpu"])
    saves = [s for s in submitted if "_batch" in s]
    assert len(saves) == 2  # one save per batch
    assert sum("_update" in s for s in submitted) == 4  # fid and kid, per batch
    files = r.record["files"]
    assert {f"samples/{k:06d}.png" for k in range(4)} <= set(files)
    assert {"batches/000000.safetensors", "batches/000002.safetensors"} <= set(files)
    assert r.record["metrics"]["fid"] >= 0 and "kid" in r.record["metrics"]


def test_fid_and_kid_share_one_extraction_per_batch(monkeypatch):
    from framework.metrics.clip_features import BundledCLIPFeatures

    calls = []
    forward = BundledCLIPFeatures.forward

    def counted(self, images):
        calls.append(images.shape[0])
        return forward(self, images)

    monkeypatch.setattr(BundledCLIPFeatures, "forward", counted)
    api.run(["model=tiny_random", "num_samples=4", "batch_size=2", "steps=2", "metrics=[fid,kid]",
                    "metrics.fid.reference=4", "metrics.kid.reference=4", "device=cpu"])
    assert calls[-2:] == [2, 2]  # the two batches, once each (reference features come from the cache)
    assert len([c for c in calls if c == 2]) == 2


def test_a_failing_write_fails_the_run_and_leaves_no_batch_file(tmp_path, monkeypatch):
    from framework.runs.folder import RunFolder

    def broken(self, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(RunFolder, "save_samples", broken)
    with pytest.raises(OSError, match="no space left"):
        api.run(["model=tiny_random", "num_samples=4", "batch_size=2", "steps=2", f"output_dir={tmp_path}",
                        "device=cpu"])
    assert not list((tmp_path / "batches").glob("*.safetensors")) if (tmp_path / "batches").exists() else True


def test_quantize_matches_the_png_path():
    from framework.runs.images import to_pil

    images = torch.rand(3, 3, 8, 8) * 1.2 - 0.1
    q = execute_module.quantize(images)
    for k in range(3):
        assert (torch.from_numpy(__import__("numpy").array(to_pil(images[k]))).permute(2, 0, 1) == q[k]).all()
        assert to_pil(q[k]).tobytes() == to_pil(images[k]).tobytes()


def test_drain_without_a_worker_is_a_no_op():
    from framework.core.state import Stash

    class R:
        stash = Stash()

    drain(R())
    assert isinstance(background(R()), Background)


def test_eval_throughput_smoke_prints_the_ratios(tmp_path, capsys):
    res = load_benchmark("eval_throughput").main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for field in ("engine_images_per_s:", "pure_images_per_s:", "ratio_generation:", "ratio_wall:", "load_before:"):
        assert field in out
    assert res["ratio_generation"] > 0 and res["unet_calls_per_batch"] == 2
    assert (tmp_path / "eval_throughput.json").is_file()


@pytest.mark.slow
def test_eval_throughput_smoke_sd15_path(tmp_path):
    res = load_benchmark("eval_throughput").main(["--model", "sd15", "--smoke", "--out", str(tmp_path)])
    assert res["model"] == "sd15" and res["ratio_generation"] > 0 and res["worker_busy_s"] > 0
