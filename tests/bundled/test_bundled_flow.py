"""The bundled flow model (experiments/bundled_flow, MODEL_CARD_flow.md).

On a folder written by the export stage (a small random transformer, so it runs without the shipped
weights): it loads with StableDiffusion3Pipeline, its VAE is the VP model's byte for byte, its text
encoders are the bundled CLIP tower with its projection, and samplerlab's engine equals the
pipeline's own FlowMatchEuler loop (float64). On the shipped folder (framework/bundled/weights/flow):
the same, prompt following and ``model=bundled_flow``. And the
training code's compact context is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.bundled import CLIP_DIR, PIPELINE_DIR, WEIGHTS_DIR, load_judge
from framework.bundled.world import COLOURS, SHAPES

FLOW_DIR = WEIGHTS_DIR / "flow"
VAE_FILE = "diffusion_pytorch_model.safetensors"




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A folder written by the export stage around a small random transformer."""
    from omegaconf import OmegaConf

    from experiments.bundled_flow.export import export
    from experiments.bundled_flow.model import build_transformer

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "experiments" / "bundled_flow" / "config.yaml")
    cfg = OmegaConf.merge(cfg, {"flow": {"layers": 1, "width": 32, "heads": 2}})
    out = tmp_path_factory.mktemp("flow")
    build_transformer(cfg).save_pretrained(out / "transformer")
    return export(cfg, out, out / "weights_flow")


@pytest.fixture(scope="module", params=["exported", "shipped"])
def folder(request):
    return request.getfixturevalue("exported") if request.param == "exported" else FLOW_DIR


def load(folder):
    from diffusers import StableDiffusion3Pipeline

    # SD3 without T5, as diffusers documents it: the absent pair passed as None
    p = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(folder):
    return load(folder)


# --- files -------------------------------------------------------------------------------------

def test_folder_is_an_sd3_pipeline_of_small_safetensors(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(f.stat().st_size for f in files) <= 25e6
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 1.6
    assert sched["use_dynamic_shifting"] is False


def test_vae_is_the_vp_pipelines_byte_for_byte(folder):
    """The flow folder's VAE weights are the VP pipeline's file, byte-identical (one latent space);
    its config differs only by shift_factor 0.0 (SD3's pipeline adds it at decode; null would fail)."""
    assert (folder / "vae" / VAE_FILE).read_bytes() == (PIPELINE_DIR / "vae" / VAE_FILE).read_bytes()
    flow = json.loads((folder / "vae" / "config.json").read_text())
    vp = json.loads((PIPELINE_DIR / "vae" / "config.json").read_text())
    assert flow.pop("shift_factor") == 0.0
    vp.pop("shift_factor")
    skip = ("_diffusers_version", "_name_or_path")
    assert {k: v for k, v in flow.items() if k not in skip} == {k: v for k, v in vp.items() if k not in skip}


def test_pipeline_loads_in_fp32_and_makes_64px_images(pipe):
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    t = pipe.transformer.config
    assert (t.patch_size, t.sample_size, t.in_channels, t.out_channels) == (2, 16, 4, 4)  # the v3 VAE's 16×16 latents
    assert pipe.vae.config.shift_factor == 0.0
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()


def test_text_encoders_are_the_bundled_clip_tower_with_its_projection(pipe):
    """Both encoders: the VP pipeline's text tower (same hidden states) and the CLIP's own text
    projection (text_embeds = the CLIP's text features, up to its fp16 storage)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    vp = CLIPTextModel.from_pretrained(PIPELINE_DIR / "text_encoder", local_files_only=True)
    proj = load_file(CLIP_DIR / "model.safetensors")["text_projection.weight"].float()
    ids = pipe.tokenizer(["a small red circle on a blue background"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = vp(ids, output_hidden_states=True)
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            out = enc(ids, output_hidden_states=True)
            torch.testing.assert_close(out.hidden_states[-2], ref.hidden_states[-2], rtol=0, atol=1e-6)
            torch.testing.assert_close(out.text_embeds, ref.pooler_output @ proj.T, rtol=1e-5, atol=1e-5)


def test_compact_context_is_the_full_context():
    """Training feeds one zero row with an attention bias of log 256 for the 256 zero T5 rows of
    the pipeline: the transformer's output is the same (random tiny transformer, float64)."""
    from omegaconf import OmegaConf

    from experiments.bundled_flow.model import build_transformer, compact_context, use_compact_context

    cfg = OmegaConf.create(dict(seed=0, flow=dict(layers=2, width=32, heads=2, pos_embed_max_size=8, qk_norm="rms_norm")))
    net = build_transformer(cfg).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        g = torch.Generator().manual_seed(1)
        x, states = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 20, 256, generator=g, dtype=torch.float64)
        pooled, t = torch.randn(2, 128, generator=g, dtype=torch.float64), torch.tensor([250.0, 800.0], dtype=torch.float64)
        full = net(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([states, torch.zeros(2, 256, 256, dtype=torch.float64)], 1),
                   pooled_projections=pooled).sample
        use_compact_context(net)
        compact = net(hidden_states=x, timestep=t, encoder_hidden_states=compact_context(states), pooled_projections=pooled).sample
        use_compact_context(net, 1)  # one row counted once: a different network input, a different output
        wrong = net(hidden_states=x, timestep=t, encoder_hidden_states=compact_context(states), pooled_projections=pooled).sample
    rel = ((compact - full).abs().max() / full.abs().max()).item()
    assert rel <= 1e-12, rel
    assert ((wrong - full).abs().max() / full.abs().max()).item() > 1e-3


# --- quality -----------------------------------------------------------------------------------

def test_generation_follows_colour_and_shape_prompts():
    """A broken, swapped or untrained file fails this: chance is 1/8 (colour), 1/4 (shape) per
    image. 12 images, 12 Euler steps, CFG 5 (the card's setting)."""
    pipe, judge = load(FLOW_DIR), load_judge()
    colours = ["red", "blue", "green", "yellow"]
    prompts = [f"a large {c} {s}" for c, s in zip(colours, SHAPES) for _ in range(3)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, generator=gens, output_type="pt").images * 2 - 1
    got = judge.predict(out)
    colour = got["colour"] == torch.tensor([COLOURS.index(p.split()[2]) for p in prompts])
    shape = got["shape"] == torch.tensor([SHAPES.index(p.split()[3]) for p in prompts])
    assert colour.sum() >= 10, f"judge found the prompted colour in {int(colour.sum())}/12 images"
    assert shape.sum() >= 7, f"judge found the prompted shape in {int(shape.sum())}/12 images"


# --- the engine --------------------------------------------------------------------------------

def test_engine_matches_the_pipelines_flow_match_euler_loop(folder):
    """The model (the sd3 adapter on the folder; ``model=bundled_flow`` is it on the shipped one) with solver=euler on the flow_match grid, CFG 5) equals the diffusers
    pipeline's own FlowMatchEuler loop from the same unit noise, in float64: ≤ 1e-5 relative (the
    floor is diffusers' float32 σ's and steps; see tests/models/test_families_parity.py)."""
    from framework.entry.api import run
    from framework.models.bundled_flow import BundledFlow
    from framework.models.sd3 import StableDiffusion3

    model = StableDiffusion3(path=str(folder), use_t5=False) if folder != FLOW_DIR else BundledFlow()
    pipe = type(model.pipe)(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square on a yellow background"]
    res = run(["steps=4", "num_samples=2", "batch_size=2", f"prompts=[{','.join(prompts)}]", "dtype=float64",
               "cfg_scale=5", "save_images=false", "schedule=flow_match", "solver=euler"], model=model)
    pipe.to(torch.float64)
    try:
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=4, height=64, width=64, latents=res.x_T.to(torch.float64),
                       guidance_scale=5.0, output_type="latent").images
    finally:
        pipe.to(torch.float32)
    rel = ((res.latents - out).abs().max() / out.abs().max()).item()
    print(f"engine vs pipeline (float64, 4 steps, CFG 5): relative difference {rel:.3g}")
    assert rel <= 1e-5, rel
    assert res.record["metrics"]["nfe"] == 4


def test_model_config_is_the_adapter():
    from framework.entry.api import run

    res = run(["model=bundled_flow", "steps=2", "num_samples=1", "batch_size=1", "save_images=false"])
    assert res.images.shape == (1, 3, 64, 64)
    assert res.record["plugins"]["schedule"] == ["flow_match"]


# --- training code -----------------------------------------------------------------------------

@pytest.mark.slow
def test_fast_build_runs_every_stage_and_resumes(tmp_path):
    """fast=true: cache, flow (2 steps), export, check, evaluate end to end; a rerun of ``flow``
    with more steps resumes from the checkpoint's step."""
    from experiments.bundled_flow.__main__ import main

    out = tmp_path / "run"
    rec = main(["fast=true", f"out_dir={out}", "stages=[cache,flow,export,check,evaluate]"])["results"]
    assert rec["checks"][0]["step"] == 2 and set(rec["scores"]) >= {"gen_colour", "gen_shape", "fd_clip_generated"}
    assert (out / "weights_flow" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    main(["fast=true", f"out_dir={out}", "stages=[flow]", "fast_profile.flow.steps=3"])  # fast_profile wins over flow.*
    steps = [json.loads(line)["step"] for line in (out / "flow_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
