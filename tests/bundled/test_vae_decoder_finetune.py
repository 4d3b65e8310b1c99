"""Issue 29's training options of the bundled VAE: the worst-pixel loss, latent noise, and the
stray-mark figures logged during a decoder-only fine-tune (experiments/bundled_model/vae.py)."""
from __future__ import annotations

import json

import pytest
import torch


def test_worst_pixels_is_the_mean_of_each_images_largest_errors():
    from experiments.bundled_model.vae import worst_pixels

    x = torch.zeros(2, 3, 10, 10)
    rec = x.clone()
    rec[0, 0, 0, :4] = torch.tensor([0.8, 0.4, 0.2, 0.1])  # image 0: four pixels off (channel 0)
    rec[0, 2, 0, 0] = -0.9  # the largest channel difference counts: pixel (0, 0) is 0.9 off
    rec[1, 1, 5, 5] = 0.5
    # frac 0.02 of 100 pixels = the 2 worst of each image: (0.9 + 0.4) / 2 and (0.5 + 0) / 2
    assert float(worst_pixels(rec, x, 0.02)) == pytest.approx(((0.9 + 0.4) / 2 + 0.25) / 2)
    assert float(worst_pixels(rec, x, 0.001)) == pytest.approx((0.9 + 0.5) / 2)  # at least one pixel


@pytest.mark.slow  # two fast-profile training runs: about 10 s on the shared machine
def test_decoder_only_fine_tune_with_worst_pixel_loss_and_latent_noise(tmp_path):
    from diffusers import AutoencoderKL

    from experiments.bundled_model.__main__ import main

    common = ["fast=true", "threads=0", f"out_dir={tmp_path}"]
    main(common + ["stages=[vae]"])
    before = AutoencoderKL.from_pretrained(tmp_path / "vae")
    main(common + ["stages=[vae]", "vae.decoder_only=true", "vae.outlier_weight=1", "vae.latent_noise=0.1"])
    after = AutoencoderKL.from_pretrained(tmp_path / "vae")
    for name, p in before.encoder.state_dict().items():  # the encoder (the UNet's latents) stays put
        assert torch.equal(p, after.encoder.state_dict()[name]), name
    moved = [n for n, p in before.decoder.state_dict().items() if not torch.equal(p, after.decoder.state_dict()[n])]
    assert moved, "the decoder did not train"
    logs = [json.loads(line) for line in (tmp_path / "vae_decoder_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]
    assert {"eval_psnr", "eval_stray", "eval_p999", "eval_edge_width"} <= set(logs[-1])
    assert 0 <= logs[-1]["eval_stray"] <= 1 and 0 <= logs[-1]["eval_p999"] <= 1
