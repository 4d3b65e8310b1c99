"""The bundled default model: files, world, tokenizer, judge, a fast quality check, fast training."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from framework.bundled import CLIP_DIR, JUDGE_DIR, PIPELINE_DIR, WEIGHTS_DIR, load_clip, load_judge, marks
from framework.bundled.world import (CONCEPT, COLOURS, RGB, SHAPES, caption_for, caption_words,
                                     label_indices, sample_scenes)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge():
    return load_judge()


# --- files -------------------------------------------------------------------------------------

def test_weights_are_safetensors_and_small():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(f.stat().st_size for f in files) <= 40e6
    for part in ("unet", "vae", "text_encoder"):
        assert list((PIPELINE_DIR / part).glob("*.safetensors")), part
    assert list(CLIP_DIR.glob("*.safetensors")) and list(JUDGE_DIR.glob("*.safetensors"))


def test_scheduler_is_sd_schedule():
    cfg = json.loads((PIPELINE_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["num_train_timesteps"] == 1000 and cfg["beta_schedule"] == "scaled_linear"
    assert (cfg["beta_start"], cfg["beta_end"]) == (0.00085, 0.012)
    assert cfg["steps_offset"] == 1 and cfg["prediction_type"] == "epsilon"
    assert cfg["set_alpha_to_one"] is False and cfg["clip_sample"] is False


def test_pipeline_loads_offline_and_makes_64px_images(pipe):
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.safety_checker is None and pipe.vae.config.scaling_factor != 1.0
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_text_encoder_is_the_clip_text_tower(pipe):
    clip, tok = load_clip()
    ids = tok(["a small red circle on a blue background"], padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        a = pipe.text_encoder(ids)[0]
        b = clip.text_model(ids)[0]
    assert torch.allclose(a, b, atol=2e-2)  # the CLIP copy is stored in fp16
    te = pipe.text_encoder.config
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


# --- tokenizer and world -----------------------------------------------------------------------

def test_tokenizer_words_and_held_out_concept(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    for word in caption_words():
        assert len(tok.tokenize(word)) == 1, word
    pieces = tok.tokenize(CONCEPT)
    assert len(pieces) > 1 and f"{CONCEPT}</w>" not in tok.get_vocab()


def test_world_is_seeded_and_captions_match_labels():
    a = sample_scenes(48, 7, concept_rate=0.5, two_shape_rate=0.5, omit_rate=0.3)
    b = sample_scenes(48, 7, concept_rate=0.5, two_shape_rate=0.5, omit_rate=0.3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (48, 3, 64, 64) and a.images.min() >= -1 and a.images.max() <= 1
    assert any(lab.striped for lab in a.labels) and any(len(lab.objects) == 2 for lab in a.labels)
    for img, cap, lab in zip(a.images, a.captions, a.labels):
        words = cap.split()
        assert CONCEPT not in words
        main = lab.main
        assert words.index(main.colour) < words.index(main.shape)
        if len(lab.objects) == 2:
            assert lab.objects[1].colour in words and lab.relation.split()[0] in words
        if "background" in words:
            assert words[words.index("background") - 1] == lab.background
        if not main.striped:  # the centre pixel of the (top-most) main shape has its colour
            pix = (img[:, int(main.cy), int(main.cx)] + 1) / 2
            assert torch.allclose(pix, torch.tensor(RGB[main.colour]), atol=0.1), cap


def test_caption_for_grammar():
    assert caption_for("red", "circle", "small", "left", "yellow") == \
        "a small red circle on the left on a yellow background"
    assert caption_for("orange", "square", second=("blue", "triangle", None),
                       relation="above") == "an orange square above a blue triangle"


# --- judge and generation ----------------------------------------------------------------------

def test_judge_is_accurate_on_fresh_scenes(judge):
    scenes = sample_scenes(96, 424_242, concept_rate=0.5)
    truth, pred = label_indices(scenes.labels), judge.predict(scenes.images)
    acc = {k: (pred[k] == truth[k]).float().mean().item() for k in truth}
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.85 and acc["striped"] >= 0.9, acc


def test_generation_follows_colour_and_shape_prompts(pipe, judge):
    """A broken, swapped or untrained file fails this: chance is 1/8 (colour), 1/4 (shape) per
    image; v1 gets 12/12 and 12/12. And issue 29's stray-mark bar (0.2 % of pixels) on the same images
    (v2 on 256 prompts: 0.23 %; stripes the judge sees are no marks)."""
    colours = ["red", "blue", "green", "yellow"]
    prompts = [f"a large {c} {s}" for c, s in zip(colours, SHAPES) for _ in range(3)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, generator=gens,
               output_type="pt").images * 2 - 1
    got = judge.predict(out)
    colour = (got["colour"] == torch.tensor([COLOURS.index(p.split()[2]) for p in prompts]))
    shape = (got["shape"] == torch.tensor([SHAPES.index(p.split()[3]) for p in prompts]))
    assert colour.sum() >= 11, f"judge found the prompted colour in {int(colour.sum())}/12 images"
    assert shape.sum() >= 11, f"judge found the prompted shape in {int(shape.sum())}/12 images"
    stray = float(marks.measure_prompts((out + 1) / 2, prompts, striped=got["striped"])["stray_share"].mean())
    assert stray < 0.002, f"stray marks on {stray:.4%} of the pixels"


# --- training code -----------------------------------------------------------------------------

def test_fast_training_runs_end_to_end(tmp_path):
    from experiments.bundled_model.__main__ import main

    record = main(["fast=true", "threads=0", f"out_dir={tmp_path}"])
    assert (tmp_path / "weights" / "pipeline" / "model_index.json").exists()
    assert (tmp_path / "weights" / "sample_grid.png").exists()
    results = record["results"]
    assert set(results["stages"]) == {"tokenizer", "clip", "judge", "vae", "unet", "export",
                                      "evaluate"}
    assert 0 <= results["scores"]["gen_colour"] <= 1
    assert json.loads((tmp_path / "record.json").read_text())["results"] == results
    # checkpoints and caches are safetensors + JSON: no pickle anywhere
    assert not [f for f in tmp_path.rglob("*") if f.suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl")]
    assert json.loads((tmp_path / "unet.checkpoint.json").read_text())["step"] == 2
    assert (tmp_path / "unet.checkpoint-0000002.safetensors").exists()
    assert (tmp_path / "unet_cache.json").exists()


def test_fine_tune_stages_run(tmp_path):
    """vae.finetune (latents anchored to the VAE it starts from, spectrum term) and
    unet.init (a UNet fine-tuned from a saved one), as used for v2, on the fast profile; then a
    stage resumed from its checkpoint (clip: 2 steps, then on to 3)."""
    from experiments.bundled_model.__main__ import main

    common = ["fast=true", "threads=0", f"out_dir={tmp_path}"]
    main(common + ["stages=[tokenizer,clip,vae,unet]"])
    main(common + ["stages=[vae,unet]", "vae.finetune=true", "vae.spectrum_weight=1",
                   f"unet.init={tmp_path / 'unet'}", "unet.name=unet_ft"])
    assert (tmp_path / "vae_anchor" / "config.json").exists()  # the encoder the latents are anchored to
    assert json.loads((tmp_path / "vae_finetune.checkpoint.json").read_text())["step"] == 2
    assert (tmp_path / "unet_ft" / "config.json").exists()
    record = main(common + ["stages=[clip]", "fast_profile.clip.steps=3"])  # fast=true: steps live in fast_profile
    logged = [json.loads(line)["step"] for line in (tmp_path / "clip_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # resumed at step 2: only step 3 ran
    assert record["results"]["stages"]["clip"]["runs"] == 2


def test_training_resumes_from_a_checkpoint_exactly(tmp_path):
    """train_loop interrupted after 3 steps and resumed to 6 ends where 6 steps in one go end:
    model, EMA and AdamW moments all come back from the safetensors + JSON checkpoint."""
    from experiments.bundled_model.common import initialised_with, train_loop

    data = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(1))

    def train(folder, stops):
        for steps in stops:  # fresh modules and optimizer each time, as a new process has
            with initialised_with(0):
                model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            ema = copy.deepcopy(model).requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

            def step_fn(step, model=model, ema=ema, opt=opt):
                loss = model(data[step]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(p, 0.1)
                return {"loss": loss.item()}

            train_loop("toy", folder, {"model": model, "ema": ema}, opt, step_fn, steps, 60)
        return model, ema, opt

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = train(tmp_path / "a", [6])
    resumed = train(tmp_path / "b", [3, 6])
    for a, b in zip(whole[:2], resumed[:2]):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sa, sb = whole[2].state_dict(), resumed[2].state_dict()
    assert json.dumps(sa["param_groups"]) == json.dumps(sb["param_groups"])  # (betas come back a list)
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
    assert sorted(p.name for p in (tmp_path / "b").glob("toy.checkpoint*")) == [
        "toy.checkpoint-0000006.safetensors", "toy.checkpoint.json"]


def test_spectrum_loss_ignores_the_phase_of_a_texture():
    """Why v2's VAE keeps stripes: stripes drawn 2 pixels off (of a period of 5) cost more than no
    stripes under a pixel loss, but almost nothing under the spectrum loss, which still charges for
    flat paint (measured: 0.031 against 1.73)."""
    from experiments.bundled_model.vae import spectrum_loss

    yx = torch.arange(64.0)
    diag = yx[:, None] + yx[None, :]

    def stripes(phase: float) -> torch.Tensor:
        return (torch.sin(2 * torch.pi * (diag + phase) / 5.0 + 0.3) > 0).float().expand(1, 3, 64, 64) * 2 - 1

    real, shifted = stripes(0.0), stripes(2.0)
    flat = torch.full_like(real, float(real.mean()))
    assert (shifted - real).abs().mean() > (flat - real).abs().mean()  # the pixel loss prefers flat
    assert spectrum_loss(real, real) == 0
    assert spectrum_loss(shifted, real) < 0.05 * spectrum_loss(flat, real)
