"""Issue 29's rebuild recipe (experiments/bundled_model/gpu_v3.sh, gpu_v3.yaml): the stages it adds
(seed, vae_pick), a UNet and a flow transformer sized by the VAE's latents, the flow model on a
rebuilt VP pipeline (``pipeline=``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

V3_VAE = Path(__file__).resolve().parents[2] / "experiments" / "bundled_model" / "v3_vae"


def _candidate(folder, channels, evals):
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": channels}))
    rows = [{"step": 1, "loss": 0.1}] + [{"step": 10 * (i + 1), **e} for i, e in enumerate(evals)]
    (folder / "vae_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vae_pick_keeps_the_lowest_p999_of_the_last_validation(tmp_path):
    from experiments.bundled_model.vae import pick_vae

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # a: best p99.9 earlier but not at its last validation; b: lowest last p99.9; c: ties b, lower PSNR
    _candidate(a, [8, 16, 32], [{"eval_psnr": 30.0, "eval_p999": 0.10, "eval_stray": 0.0},
                                {"eval_psnr": 31.0, "eval_p999": 0.40, "eval_stray": 0.0}])
    _candidate(b, [16, 32, 64], [{"eval_psnr": 29.0, "eval_p999": 0.30, "eval_stray": 0.001}])
    _candidate(c, [8, 16, 32, 64], [{"eval_psnr": 28.0, "eval_p999": 0.30, "eval_stray": 0.0}])
    out = tmp_path / "run"
    out.mkdir()
    pick_vae(out, [str(a), str(c), str(b)])
    assert json.loads((out / "vae" / "config.json").read_text())["block_out_channels"] == [16, 32, 64]
    record = json.loads((out / "vae_pick.json").read_text())
    assert record["chosen"] == str(b) and len(record["candidates"]) == 3
    with pytest.raises(FileNotFoundError, match="stages=\\[vae\\]"):
        pick_vae(out, [str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="vae_candidates"):
        pick_vae(out, [])


def test_seed_copies_the_named_shipped_parts_and_the_given_vae(tmp_path):
    from experiments.bundled_model.common import seed_from_shipped

    seed_from_shipped(tmp_path, ["tokenizer", "judge"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge", "tokenizer"]
    with pytest.raises(ValueError, match="choose from"):
        seed_from_shipped(tmp_path, ["unet"])
    seed_from_shipped(tmp_path, ["vae"])  # the shipped VAE, then replaced by the committed v3 candidate (vae_from)
    seed_from_shipped(tmp_path, [], vae_from=V3_VAE)
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["block_out_channels"] == [8, 16, 32]
    with pytest.raises(FileNotFoundError, match="vae_from="):
        seed_from_shipped(tmp_path, [], vae_from=tmp_path / "tokenizer")


def test_the_committed_v3_vae_is_a_4x_autoencoder_of_clean_scenes():
    """The v3 candidate (MODEL_CARD.md, "Stray marks"): 16×16×4 latents; on 32 fresh scenes its
    reconstructions are within issue 29's bars (PSNR ≥ 30 dB and 99.9th-percentile error ≤ 0.25 on
    512 scenes; here 0.30, a small sample's looser bound)."""
    import torch
    from diffusers import AutoencoderKL

    from experiments.bundled_model.vae import reconstruct
    from experiments.harness import psnr
    from framework.bundled import marks
    from framework.bundled.world import sample_scenes

    vae = AutoencoderKL.from_pretrained(V3_VAE).eval()
    scenes = sample_scenes(32, 424242, concept_rate=0.5)
    with torch.no_grad():
        assert vae.encode(scenes.images[:1]).latent_dist.mean.shape == (1, 4, 16, 16)
    rec = (reconstruct(vae, scenes.images).clamp(-1, 1) + 1) / 2
    ref = (scenes.images + 1) / 2
    assert float(psnr(rec, ref).mean()) > 30.0
    assert marks.error_quantile(rec, ref) < 0.30


def test_networks_take_their_size_from_the_latents():
    from omegaconf import OmegaConf

    from experiments.bundled_flow.model import build_transformer
    from experiments.bundled_model.unet import build_unet

    cfg = OmegaConf.create({"seed": 0, "unet": {"channels": [16, 32], "layers_per_block": 1, "heads": 2, "norm_groups": 8},
                            "flow": {"layers": 1, "width": 32, "heads": 2, "pos_embed_max_size": 4, "qk_norm": None}})
    assert build_unet(cfg, 32, 16).config.sample_size == 16
    sdxl_like = OmegaConf.merge(cfg, {"unet": {"channels": [8, 16, 32], "cross_attention": [False, True, True]}})
    assert list(build_unet(sdxl_like, 32, 16).config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                             "CrossAttnDownBlock2D"]
    with pytest.raises(ValueError, match="one true/false per level"):
        build_unet(OmegaConf.merge(cfg, {"unet": {"cross_attention": [False, True, True]}}), 32, 16)
    assert build_transformer(cfg, 8).config.sample_size == 8
    with pytest.raises(ValueError, match="flow.pos_embed_max_size=8"):
        build_transformer(cfg, 16)  # 8 patches per side do not fit a 4-patch position table


@pytest.mark.slow  # the v3 recipe's stages on the fast profile, then the flow model on its pipeline: ~1 minute
def test_v3_recipe_on_the_fast_profile_makes_16px_latents_and_a_flow_model_on_them(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from experiments.bundled_flow.__main__ import main as flow_main
    from experiments.bundled_model.__main__ import main

    common = ["--config-name", "gpu_v3", "fast=true", "threads=0", "device=cpu", "workers=0",
              "fast_profile.vae.channels=[8,8,8]"]
    main(common + [f"out_dir={tmp_path / 'a'}", "stages=[vae]"])
    main(common + [f"out_dir={tmp_path}", "stages=[seed,vae_pick,unet_cache,unet,export]",
                   f"vae_candidates=[{tmp_path / 'a'}]"])
    pipe_dir = tmp_path / "weights" / "pipeline"
    assert UNet2DConditionModel.load_config(pipe_dir / "unet")["sample_size"] == 16
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    flow_main(["fast=true", "threads=0", f"pipeline={pipe_dir}", f"out_dir={tmp_path / 'flow'}",
               "stages=[cache,flow,export]"])
    config = json.loads((tmp_path / "flow" / "weights_flow" / "transformer" / "config.json").read_text())
    assert config["sample_size"] == 16


def test_vae_compare_scores_a_vae_of_another_latent_space_on_reconstructions(tmp_path):
    from omegaconf import OmegaConf

    from experiments.bundled_model.vae import build_vae
    from experiments.bundled_model.vae_compare import main
    from framework.bundled import PIPELINE_DIR

    cfg = OmegaConf.create({"seed": 0, "vae": {"channels": [8, 8, 8], "layers_per_block": 1, "norm_groups": 4,
                                               "mid_attention": False}})
    build_vae(cfg).save_pretrained(tmp_path / "f4")  # 4× down: 16×16 latents the shipped UNet cannot make
    scores = main(["--out", str(tmp_path / "cmp"), "--vae", f"v2={PIPELINE_DIR / 'vae'}", "--vae", f"f4={tmp_path / 'f4'}",
                   "--reconstructions-only", "--n-real", "16", "--threads", "1"])
    assert scores["v2"]["vae_psnr"] > scores["f4"]["vae_psnr"] + 10  # trained against untrained
    assert "gen_stray" not in scores["f4"] and 0 <= scores["f4"]["vae_striped_recall"] <= 1
    assert (tmp_path / "cmp" / "side_by_side.png").is_file()


def test_side_by_side_draws_each_pipeline_on_the_same_prompts_and_seeds(tmp_path):
    import numpy as np
    from PIL import Image

    from experiments.bundled_model.side_by_side import main
    from framework.bundled import PIPELINE_DIR

    out = main(["--out", str(tmp_path / "sbs.png"), "--pipeline", f"a={PIPELINE_DIR}", "--pipeline", f"b={PIPELINE_DIR}",
                "--seeds", "1", "--steps", "2", "--threads", "1"])
    img = np.asarray(Image.open(out))
    block = 2 * (64 + 2)  # one seed of 64 px with a 1-px border, drawn 2×
    assert img.shape == (2 * (8 * 65 + 1), 2 * block + 12, 3)  # 8 prompts; two pipelines and a 6-px gap (2×)
    left, gap, right = img[:, :block], img[:, block:block + 12], img[:, block + 12:]
    assert (gap == 255).all()
    assert np.abs(left.astype(int) - right.astype(int)).max() <= 1  # one pipeline, the same seeds: the same images
    assert left.std() > 10  # pictures, not blank
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x.png"), "--pipeline", str(PIPELINE_DIR)])
    assert exc.value.code == 2

