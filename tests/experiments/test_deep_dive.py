"""The deep-dive experiments (fast=true, in-process) and the preview callback they build on."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import experiments.autoencoder.__main__ as autoencoder
import experiments.gallery.__main__ as gallery
import experiments.img2img.__main__ as img2img
import experiments.loop.__main__ as loop
import experiments.schedule.__main__ as schedule
from framework.entry.api import run
from framework.core.errors import ConfigError
from plugins.callback.preview import read_tiles

PNG_TOL = 2 / 255  # PNGs hold 8-bit values; the last column and the final image agree to rounding


def test_preview_last_column_is_the_final_image_and_adds_no_nfe(tmp_path):
    base = ["steps=4", "num_samples=3", "batch_size=2", "resume=false"]  # 3 samples over two batches
    plain = run(base)
    res = run(base + ["callback=[nan_guard,preview]", "callback.preview.samples=3", "callback.preview.every=2"],
              output_dir=tmp_path)
    assert res.record["metrics"]["nfe"] == plain.record["metrics"]["nfe"] == 4
    assert res.record["metrics"]["unet_calls"] == plain.record["metrics"]["unet_calls"]
    assert torch.equal(res.images, plain.images)  # previews do not change the run
    x0, meta = read_tiles(tmp_path, "preview.png")
    xt, _ = read_tiles(tmp_path, "preview_xt.png")
    assert x0.shape == xt.shape == (3, 3, 3, 64, 64)
    assert [c["step"] for c in meta["columns"]] == [0, 2, 3]  # every 2nd step, and the last
    assert [c["nfe"] for c in meta["columns"]] == [1, 3, 4]
    assert meta["samples"] == [0, 1, 2]
    assert (x0[:, -1] - res.images.cpu()).abs().max() <= PNG_TOL
    assert (x0[:, 0] - res.images.cpu()).abs().max() > 0.1  # the first prediction is not the final image
    assert (xt[:, -1] - x0[:, -1]).abs().mean() > 0  # x_t and x0 are different pictures


def test_preview_checks_its_options():
    with pytest.raises(ConfigError, match="every must be"):
        run(["steps=2", "callback=[preview]", "callback.preview.every=0"])


def test_loop_fast(tmp_path):
    rec = loop.main(["fast=true", f"out={tmp_path}", f"runs={tmp_path / 'run'}"])
    assert {"loop_strip.png", "loop.gif"} <= set(rec["files"])
    gif = Image.open(tmp_path / "loop.gif")
    assert gif.n_frames == 4  # fast: 4 steps, every step previewed
    assert (tmp_path / "run" / "preview.png").exists() and (tmp_path / "run" / "record.json").exists()
    assert rec["results"]["last_column_vs_final_max_abs"] <= PNG_TOL
    assert json.loads((tmp_path / "loop.json").read_text())["results"]["nfe"] == 4


def test_autoencoder_fast(tmp_path):
    rec = autoencoder.main(["fast=true", f"out={tmp_path}"])
    res = rec["results"]
    assert set(rec["files"]) == {"autoencoder_latents.png", "autoencoder_noise.png", "autoencoder_edits.png"}
    c, h, w = res["latent_shape"]
    assert res["compression_factor"] == 3 * res["image_shape"][1] * res["image_shape"][2] / (c * h * w)
    assert res["image_shape"][1] == res["downsampling_factor"] * h
    assert len(res["psnr_db"]) == 3 and all(v > 5 for v in res["psnr_db"].values())
    # moving the latent by one position moves the image by the downsampling factor
    assert res["shift_psnr_vs_shifted_image"] > res["shift_psnr_vs_unshifted_image"]


def test_schedule_fast(tmp_path):
    rec = schedule.main(["fast=true", f"out={tmp_path}"])
    table = rec["results"]["schedules"]
    assert set(rec["files"]) == {"schedule_sigmas.png", "schedule_noising.png"}
    assert set(table) == {"karras", "normal", "exponential"}
    for name, rows in table.items():
        for n, row in rows.items():
            assert len(row["sigmas"]) == int(n) + 1 and row["sigmas"] == sorted(row["sigmas"], reverse=True)
    noised = rec["results"]["noised"]
    assert [r["step"] for r in noised] == [0, 4, 7]
    assert noised[0]["x0_rmse_latent"] > noised[-1]["x0_rmse_latent"]  # less noise, better prediction


def test_img2img_fast(tmp_path):
    rec = img2img.main(["fast=true", f"out={tmp_path}", f"runs={tmp_path / 'runs'}"])
    runs = rec["results"]["runs"]
    assert [r["strength"] for r in runs] == [0.5, 1.0]
    assert [r["nfe"] for r in runs] == [2, 4]  # the last ⌊4·strength⌋ of 4 steps
    assert runs[0]["sigma_start"] < runs[1]["sigma_start"]
    assert (tmp_path / "img2img_strengths.png").exists() and (tmp_path / "runs" / "source.png").exists()


def test_gallery_fast_with_a_section_added_in_one_line(tmp_path):
    rec = gallery.main(["fast=true", f"out={tmp_path}", f"runs={tmp_path / 'runs'}",
                        "+sections.mine=[['solver=heun','steps=2'],['solver=euler']]"])
    sections = {"samplers", "guidance", "embeddings", "mine"}
    assert set(rec["results"]) == sections | {"text_embeddings"}
    assert all(len(rec["results"][s]) == 1 for s in sections)  # fast: the first row of each section
    assert {f"gallery_{s}.png" for s in sections | {"text_embeddings"}} <= set(rec["files"])
    assert rec["results"]["mine"][0]["nfe"] == 3  # heun on 2 steps ending at σ = 0: 2·2 − 1
    emb = rec["results"]["text_embeddings"]
    swapped, blue = emb["labels"].index("a red circle [token_swap red→blue]"), emb["labels"].index("a blue circle")
    assert emb["cosine_similarity"][swapped][blue] > 1 - 1e-5  # red→blue at the input = "a blue circle"
    assert emb["cosine_similarity"][swapped][0] < 0.99


def test_experiment_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown gallery section"):
        gallery.main(["fast=true", "only=[nope]"])
    with pytest.raises(ConfigError, match="strengths must be in"):
        img2img.main(["fast=true", "strengths=[0]"])


def test_modules_run_on_a_checkpoint_folder(tmp_path, tiny_overrides):
    """model=sd15 model.path=<folder>: the tiny random pipeline through the ordinary loader."""
    rec = loop.main(["fast=true", f"out={tmp_path}", f"runs={tmp_path / 'loop'}"] + tiny_overrides)
    assert rec["results"]["label"].startswith(f"model {tiny_overrides[1].split('=', 1)[1]}")
    assert (tmp_path / "loop.gif").exists()
    # the tiny tokenizer spells 'red' in 3 tokens: the token-swap row cannot run, and says so
    with pytest.warns(UserWarning, match="cannot run"):
        rec = gallery.main(["fast=true", "fast_rows=3", "only=[embeddings]", "embedding_prompts=[]", f"out={tmp_path}",
                            f"runs={tmp_path / 'gallery'}"] + tiny_overrides)
    rows = rec["results"]["embeddings"]
    assert [("error" in r) for r in rows] == [False, False, True] and "single-token" in rows[2]["error"]
    assert (tmp_path / "gallery_embeddings.png").exists()
