"""The CFG family: schedules, interval, rescale (parity with diffusers' guidance_rescale), APG."""
from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from framework.core.errors import ConfigError
from framework.entry.api import run


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.fixture
def base(tiny_overrides):
    return tiny_overrides + ["solver=euler", "schedule=uniform", "steps=5", "num_samples=2", "batch_size=2",
                             "cfg_scale=6.0", "prompts=[a red circle,a blue square]"]


def test_constant_schedule_and_full_interval_are_plain_cfg(base):
    ref = run(base).latents
    assert torch.equal(ref, run(base + ["guidance.cfg.shape=linear", "guidance.cfg.end_scale=6.0"]).latents)
    assert torch.equal(ref, run(base + ["guidance.cfg.sigma_lo=0.0", "guidance.cfg.sigma_hi=1000.0"]).latents)


def test_empty_interval_is_conditional_only(base):
    cond_only = run(base + ["cfg_scale=1.0"]).latents
    outside = run(base + ["guidance=[interval]", "guidance.interval.sigma_lo=100.0", "guidance.interval.sigma_hi=200.0"])
    assert close(outside.latents, cond_only)
    assert not close(outside.latents, run(base).latents)


def test_linear_schedule_interpolates(base):
    lo = run(base + ["cfg_scale=2.0"]).latents
    hi = run(base).latents
    ramp = run(base + ["cfg_scale=2.0", "guidance.cfg.shape=linear", "guidance.cfg.end_scale=6.0"]).latents
    assert not close(ramp, lo) and not close(ramp, hi)


def test_cfg_rescale_phi0_is_cfg_and_matches_diffusers(base, tiny_pipe):
    ref = run(base)
    assert close(run(base + ["guidance=[cfg_rescale]", "guidance.cfg_rescale.phi=0.0"]).latents, ref.latents)
    ours = run(base + ["guidance=[cfg_rescale]", "guidance.cfg_rescale.phi=0.7"])
    sched = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(5)
    prompts = ["a red circle", "a blue square"]
    tok = tiny_pipe.tokenizer(prompts + [""] * 2, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    latents = ours.x_T.clone()
    with torch.no_grad():
        cond, uncond = tiny_pipe.text_encoder(tok.input_ids)[0].chunk(2)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            eu, ec = tiny_pipe.unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            eps = rescale_noise_cfg(eu + 6.0 * (ec - eu), ec, guidance_rescale=0.7)
            latents = sched.step(eps, t, latents).prev_sample
    assert close(ours.latents, latents, 1e-4)
    assert not close(ours.latents, ref.latents)


def test_apg_reduces_to_cfg_and_otherwise_differs(base):
    ref = run(base).latents
    plain = run(base + ["guidance=[apg]", "guidance.apg.eta=1.0", "guidance.apg.momentum=0.0"]).latents
    assert close(plain, ref)
    assert not close(run(base + ["guidance=[apg]"]).latents, ref)


@pytest.mark.parametrize("pp,plain", [("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m")])
def test_cfg_pp_solvers(pp, plain, base):
    mix = ["model=mixture", "dtype=float64", "num_samples=3", "batch_size=3", "steps=10"]
    assert (run(mix + [f"solver={pp}"]).latents - run(mix + [f"solver={plain}"]).latents).abs().max() < 1e-12
    guided = run(base + [f"solver={pp}", "cfg_scale=0.6"])  # CFG++'s λ ∈ [0, 1]
    assert torch.isfinite(guided.latents).all()
    assert not close(guided.latents, run(base + [f"solver={plain}", "cfg_scale=0.6"]).latents)
    assert guided.record["metrics"]["nfe"] == 5 and guided.record["metrics"]["unet_calls"] == 5


@pytest.mark.parametrize("pp", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_solvers_request_the_unconditional_pass_and_need_a_combiner(pp, base):
    """On a conditional model CFG++ asks for the unconditional pass itself: with cfg at λ = 1 (which
    alone would not request it) the step still uses D_uncond. Without a CFG combiner there is no
    guided estimate to step to: refused at start-up, in one line."""
    lam1 = run(base + [f"solver={pp}", "cfg_scale=1.0"])
    assert lam1.record["metrics"]["unet_calls"] == 5  # one batched cond+uncond call per step
    assert not close(lam1.latents, run(base + ["cfg_scale=1.0"]).latents)  # not the plain step
    for combiner in ("cfg_rescale", "apg", "interval"):
        assert torch.isfinite(run(base + [f"solver={pp}", f"guidance=[{combiner}]", "cfg_scale=0.6"]).latents).all()
    with pytest.raises(ConfigError, match=rf"^solver={pp} steps to the CFG-guided estimate: add a CFG combiner") as e:
        run(base + [f"solver={pp}", "guidance=[]"])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def source_png(tmp_path_factory):
    from framework.bundled.world import sample_scenes
    from framework.runs.images import to_pil

    scene = sample_scenes(1, seed=5)
    path = tmp_path_factory.mktemp("img") / "src.png"
    to_pil((scene.images[0] + 1) / 2).save(path)
    return path, (scene.images[0] + 1) / 2


def test_img2img_strength_controls_closeness_and_nfe(source_png):
    path, src = source_png
    dist = {}
    for s in (0.2, 1.0):
        res = run(["guidance=[cfg,img2img]", f"guidance.img2img.image={path}", f"guidance.img2img.strength={s}",
                   "num_samples=2", "batch_size=2", "steps=10", "prompts=[a blue square]"])
        assert res.record["metrics"]["nfe"] == int(10 * s)
        assert len(res.record["sigmas"]) == int(10 * s) + 1
        dist[s] = (res.images - src).abs().mean().item()
    assert dist[0.2] < 0.15 and dist[0.2] < 0.5 * dist[1.0]  # measured 0.08 vs 0.51 (20 steps)


def test_img2img_missing_image_is_config_error():
    with pytest.raises(ConfigError, match="not found"):
        run(["guidance=[img2img]", "guidance.img2img.image=/nonexistent.png", "num_samples=1", "steps=2"])
