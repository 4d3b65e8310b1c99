"""Perturbation guidance plugins (pag, seg, sag, slg, autoguidance).

- the combination rule agrees with diffusers' guider classes (PerturbedAttentionGuidance,
  SkipLayerGuidance, SmoothedEnergyGuidance, AutoGuidance) called on the same predictions
  (≤ 1e-5 relative), with and without CFG;
- the step windows; SAG's degraded input agrees with diffusers' SAG pipeline (sag_masking);
  the SEG/SAG blurs agree with diffusers' Gaussian blur;
- end to end on the tiny model: each plugin changes the picture, scale 0 costs nothing;
- bad input → one line, exit 2, nothing written.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from framework.core.state import Prediction
from framework.maths.blur import blur_tokens, gaussian_blur_2d
from plugins.guidance.autoguidance import AutoGuidance
from plugins.guidance.cfg import CFG
from plugins.guidance.pag import PAG
from plugins.guidance.sag import SAG
from plugins.guidance.seg import SEG
from plugins.guidance.slg import SLG


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def preds(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]  # cond, uncond, perturbed


def state(cfg_scale: float, index: int = 5, steps: int = 10):
    settings = SimpleNamespace(cfg_scale=cfg_scale)
    return SimpleNamespace(run=SimpleNamespace(settings=settings), index=index, schedule=SimpleNamespace(steps=steps, sigmas=[1.0] * (steps + 1)))


def ours(plugins, cond, uncond, branch_name, branch, cfg_scale):
    pred = Prediction(x=torch.zeros_like(cond), sigma=1.0, denoised=cond, cond_denoised=cond if uncond is not None else None,
                      uncond_denoised=uncond, branches={branch_name: branch})
    st = state(cfg_scale)
    for p in plugins:
        pred = p.guidance(state=st, pred=pred)
    return pred.denoised


@pytest.mark.parametrize("name", ["pag", "slg", "seg"])
@pytest.mark.parametrize("with_cfg", [True, False])
def test_combination_rule_agrees_with_diffusers_guiders(name, with_cfg):
    """With cfg first: diffusers' default formulation, D_u + s·(D_c − D_u) + s_p·(D_c − D_p); alone:
    D_c + s_p·(D_c − D_p), diffusers' use_original_formulation=True with CFG off (scale 0)."""
    from diffusers.guiders import PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance

    cond, uncond, pert = preds()
    s, sp = 5.0, 2.5
    cfg_scale = s if with_cfg else 0.0
    guider = {
        "pag": lambda: PerturbedAttentionGuidance(guidance_scale=cfg_scale, perturbed_guidance_scale=sp, perturbed_guidance_layers=[0],
                                                  perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                                  use_original_formulation=not with_cfg),
        "slg": lambda: SkipLayerGuidance(guidance_scale=cfg_scale, skip_layer_guidance_scale=sp, skip_layer_guidance_layers=[0],
                                         skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                                         use_original_formulation=not with_cfg),
        "seg": lambda: SmoothedEnergyGuidance(guidance_scale=cfg_scale, seg_guidance_scale=sp, seg_guidance_layers=[0],
                                              use_original_formulation=not with_cfg),
    }[name]()
    guider.set_state(step=5, num_inference_steps=10, timestep=torch.tensor(500))
    assert guider.num_conditions == (3 if with_cfg else 2)
    theirs = guider.forward(cond, uncond if with_cfg else None, pert).pred
    plugin = {"pag": PAG, "slg": SLG, "seg": SEG}[name](scale=sp, start=0.0, stop=1.0)
    mine = ours(([CFG()] if with_cfg else []) + [plugin], cond, uncond if with_cfg else None, name, pert, s)
    assert rel(mine, theirs) <= 1e-5


def test_autoguidance_agrees_with_diffusers_autoguidance():
    from diffusers.guiders import AutoGuidance as Theirs

    cond, _, bad = preds(1)
    guider = Theirs(guidance_scale=4.0, auto_guidance_layers=[0], dropout=1.0)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    theirs = guider.forward(cond, bad).pred
    mine = ours([AutoGuidance(scale=4.0)], cond, None, "autoguidance", bad, 7.0)
    assert rel(mine, theirs) <= 1e-5
    by_cfg_scale = ours([AutoGuidance()], cond, None, "autoguidance", bad, 4.0)  # scale null: cfg_scale
    assert rel(by_cfg_scale, theirs) <= 1e-5


def test_windows_include_their_start_step():
    """⌊start·N⌋ ≤ i < ⌊stop·N⌋; diffusers' SLG/PAG windows exclude the start step (documented)."""
    from diffusers.guiders import SkipLayerGuidance

    plugin = SLG(start=0.2, stop=0.6)
    assert [i for i in range(10) if plugin.active(state(1.0, i, 10))] == [2, 3, 4, 5]
    theirs = SkipLayerGuidance(skip_layer_guidance_layers=[0], skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.6)
    enabled = []
    for i in range(10):
        theirs.set_state(step=i, num_inference_steps=10, timestep=torch.tensor(0))
        enabled += [i] if theirs._is_slg_enabled() else []
    assert enabled == [3, 4, 5]


def test_sag_degraded_input_agrees_with_diffusers_sag_pipeline():
    """diffusers' StableDiffusionSAGPipeline.sag_masking (mask from the head-averaged map, 9-tap
    σ = 1 blur inside it, re-noised by DDPM's add_noise) = our x' = x̂₀' + σ·ε̂, scaled to VP (√ᾱ)."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import StableDiffusionSAGPipeline

    from framework.models.tiny import SD_SCHEDULER

    g = torch.Generator().manual_seed(4)
    b, heads, (mh, mw) = 2, 4, (4, 4)
    attn = torch.softmax(torch.randn(b * heads, mh * mw, mh * mw, generator=g) * 3, dim=-1)
    x0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    t = torch.tensor(400)
    abar = scheduler.alphas_cumprod[400]
    sigma = float(((1 - abar) / abar).sqrt())
    fake = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(attention_head_dim=heads)), scheduler=scheduler)
    theirs = StableDiffusionSAGPipeline.sag_masking(fake, x0, attn, (mh, mw), t, eps)
    x = x0 + sigma * eps
    degraded = SAG().degraded(attn.reshape(b, heads, mh * mw, mh * mw).mean(1), x0)
    mine = (degraded + (x - x0)) / math.sqrt(1 + sigma**2)
    assert rel(mine, theirs) <= 1e-5
    assert rel(degraded, x0) > 1e-3  # the mask is not empty


def test_sag_guidance_is_the_eps_rule_in_d():
    """D ← D + s·(x̂₀' − D(x')): ε ← ε + s·(ε̂ − ε'), ε' = (x' − D(x'))/σ, written in D."""
    cond, uncond, _ = preds(5)
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 2, 2.0
    attn = torch.softmax(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(7)) * 3, dim=-1)
    plugin = SAG(scale=0.75)
    seen = {}

    def evaluate(st, x_in, s, prompt):
        seen.update(x=x_in, prompt=prompt)
        return x_in * 0.5

    st = state(5.0)
    st.run.model = SimpleNamespace(evaluate=evaluate)
    combined = uncond + 5.0 * (cond - uncond)
    pred = Prediction(x=x, sigma=sigma, denoised=combined, cond_denoised=cond, uncond_denoised=uncond,
                      attention={"sag": {"cond": attn, "uncond": attn.flip(0)}})
    out = plugin.guidance(state=st, pred=pred).denoised
    degraded = plugin.degraded(attn.flip(0), uncond)
    x_deg = degraded + (x - uncond)
    assert seen["prompt"] == "uncond" and torch.allclose(seen["x"], x_deg)
    eps, eps_u, eps_deg = (x - combined) / sigma, (x - uncond) / sigma, (x_deg - x_deg * 0.5) / sigma
    assert rel(out, x - sigma * (eps + 0.75 * (eps_u - eps_deg))) <= 1e-5


def test_blurs_agree_with_diffusers_gaussian():
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d as theirs

    img = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(8))
    assert rel(gaussian_blur_2d(img, 5, 1.3), theirs(img, 5, 1.3)) <= 1e-6
    tokens = img.flatten(2).transpose(1, 2)  # [B, 96, C] on an 8×12 grid
    blurred = blur_tokens(tokens, 0.8, 8 / 12)  # ⌈4.8⌉ + 1 → 5 taps
    assert rel(blurred, theirs(img, 5, 0.8).flatten(2).transpose(1, 2)) <= 1e-6
    mean = blur_tokens(tokens, math.inf, 8 / 12)
    assert rel(mean, tokens.mean(dim=1, keepdim=True).expand_as(tokens)) <= 1e-6


def test_text_tokens_before_the_image_ones_are_left_alone():
    """Flux's single blocks query [text; image]: the grid is the trailing image tokens."""
    g = torch.Generator().manual_seed(9)
    text, image = torch.randn(2, 7, 5, generator=g), torch.randn(2, 16, 5, generator=g)
    out = blur_tokens(torch.cat([text, image], dim=1), 0.7, 1.0, image_tokens=16)
    assert torch.equal(out[:, :7], text)
    assert rel(out[:, 7:], blur_tokens(image, 0.7, 1.0)) <= 1e-7
    assert rel(out[:, 7:], image) > 1e-3


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------
def run_tiny(*overrides):
    from framework.entry.api import run

    return run(["model=tiny_random", "steps=3", "num_samples=2", "save_images=false", *overrides])


@pytest.mark.parametrize("guidance", ["[cfg,pag]", "[cfg,seg]", "[cfg,sag]", "[autoguidance]",
                                      "[cfg,slg]"])
def test_each_plugin_changes_the_sample_and_scale_zero_is_free(guidance):
    name = guidance.strip("[]").split(",")[-1]
    window = ["guidance.slg.start=0.0", "guidance.slg.stop=1.0"] if name == "slg" else []
    base = run_tiny("guidance=[cfg]") if name != "autoguidance" else run_tiny("guidance=[]")
    guided = run_tiny(f"guidance={guidance}", *window)
    assert rel(guided.latents, base.latents) > 1e-3
    if name != "autoguidance":
        off = run_tiny(f"guidance={guidance}", f"guidance.{name}.scale=0", *window)
        assert off.record["metrics"]["network_inputs"] == 6 and rel(off.latents, base.latents) <= 1e-6


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["model=tiny_random", "guidance=[cfg,pag]", "guidance.pag.layers=[9]"], "layer 9 does not exist: model TinyRandom has layers 0–3"),
    (["model=tiny_random", "guidance=[cfg,slg]", "guidance.slg.layers=[-1]"], "layer -1 does not exist"),
    (["model=gaussian", "guidance=[seg]"], "has no attention layers to perturb"),
    (["model=gaussian", "guidance=[sag]"], "has no attention layers to perturb"),
    (["model=tiny_random", "guidance=[pag,cfg]"], "write guidance=[cfg,pag]"),
    (["model=tiny_random", "guidance=[cfg,autoguidance]"], "autoguidance replaces the CFG combiner"),
    (["model=tiny_random", "guidance=[cfg,seg]", "guidance.seg.blur_sigma=0"], "blur_sigma must be > 0"),
    (["model=tiny_random", "guidance=[cfg,pag]", "guidance.pag.start=0.5", "guidance.pag.stop=0.5"], "need 0 ≤ start < stop ≤ 1"),
])
def test_bad_input_one_line_exit_2(capsys, argv, expected, tmp_path):
    from framework.entry.cli import main

    code = main([*argv, f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model,guidance,calls,inputs", [
    ("tiny_sdxl", "[cfg,pag]", 1, 3), ("tiny_sd3", "[cfg,slg]", 1, 3), ("tiny_sd3", "[autoguidance]", 1, 2),
    ("tiny_flux", "[seg]", 1, 2), ("tiny_flux", "[pag]", 1, 2), ("tiny_sdxl", "[cfg,sag]", 2, 3),
])
def test_the_families_take_the_branches(model, guidance, calls, inputs):
    """SDXL's UNet, SD3's and Flux's transformers: the branch is evaluated, counted, and changes the sample."""
    from framework.entry.api import run

    common = [f"model={model}", "steps=2", "num_samples=1", "save_images=false"]
    window = ["guidance.slg.start=0", "guidance.slg.stop=1"] if "slg" in guidance else []
    guided = run([*common, f"guidance={guidance}", *window])
    base = run([*common, "guidance=[cfg]" if "cfg" in guidance else "guidance=[]"])
    m = guided.record["metrics"]
    assert (m["unet_calls"], m["network_inputs"]) == (2 * calls, 2 * inputs)
    assert rel(guided.latents, base.latents) > 1e-3
