"""The tiny SDXL, SD3 and Flux pipelines and the hand-written reference loops of their pipelines.

Parity: each loop, given the pipeline's weights, prompts, scheduler and the noise its generator
draws, ends at the latents the pipeline returns with ``output_type="latent"`` to ≤ 1e-6 relative
in float32 (measured: 0, bit-identical, for every case below), and calls the network as often.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)

from framework.models import reference_loops as ref
from framework.models import tiny_families as tiny

REL = 1e-6
PROMPTS = ["a red cube", "two blue balls"]
SIZE = 64          # the tiny pipelines' image size: 8×8 latents
STEPS = 4


@pytest.fixture(scope="module")
def pipes():
    """Each tiny pipeline, built once for the module."""
    built = {"sdxl": tiny.build_tiny_sdxl(0), "sd3": tiny.build_tiny_sd3(0, with_t5=True),
             "sd3_no_t5": tiny.build_tiny_sd3(0, with_t5=False), "flux": tiny.build_tiny_flux(0)}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def with_scheduler(pipe, scheduler):
    """The same modules under another scheduler (a new pipeline object: the fixture stays as built)."""
    return type(pipe)(**{**pipe.components, "scheduler": scheduler})


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def network(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def count_calls(module: torch.nn.Module, fn):
    """(fn(), number of forward calls of ``module`` during it)."""
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        handle.remove()


def generators():
    return [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]


def noise(pipe):
    """What the pipeline draws from ``generators()``: one sample per generator."""
    return torch.cat([ref.initial_noise(pipe, SIZE, SIZE, s) for s in range(len(PROMPTS))])


SD3, FLUX = tiny.SD3_SCHEDULER, tiny.FLUX_SCHEDULER
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
#: case → (pipeline, scheduler, pipeline kwargs, loop, loop kwargs)
CASES = {
    "sdxl-euler": ("sdxl", lambda p: p.scheduler, dict(guidance_scale=5.0), ref.sdxl_loop, dict(guidance_scale=5.0)),
    "sdxl-euler-negative": ("sdxl", lambda p: p.scheduler, dict(guidance_scale=5.0, negative_prompt=["blurry", "dark"]),
                            ref.sdxl_loop, dict(guidance_scale=5.0, negative_prompts=["blurry", "dark"])),
    "sdxl-dpmpp_2m": ("sdxl", lambda p: DPMSolverMultistepScheduler.from_config(p.scheduler.config), dict(guidance_scale=5.0),
                      ref.sdxl_loop, dict(guidance_scale=5.0)),
    "sdxl-dpmpp_2m-karras": ("sdxl", lambda p: DPMSolverMultistepScheduler.from_config(p.scheduler.config, use_karras_sigmas=True),
                             dict(guidance_scale=5.0), ref.sdxl_loop, dict(guidance_scale=5.0)),
    "sd3-euler": ("sd3", lambda p: p.scheduler, dict(guidance_scale=7.0), ref.sd3_loop, dict(guidance_scale=7.0)),
    "sd3-euler-negative": ("sd3", lambda p: p.scheduler, dict(guidance_scale=7.0, negative_prompt=["blurry", "dark"]),
                           ref.sd3_loop, dict(guidance_scale=7.0, negative_prompts=["blurry", "dark"])),
    "sd3-euler-dynamic": ("sd3", lambda p: FlowMatchEulerDiscreteScheduler(**FLUX), dict(guidance_scale=7.0), ref.sd3_loop,
                          dict(guidance_scale=7.0)),
    "sd3-euler-no-t5": ("sd3_no_t5", lambda p: p.scheduler, dict(guidance_scale=7.0), ref.sd3_loop, dict(guidance_scale=7.0)),
    "sd3-heun": ("sd3", lambda p: FlowMatchHeunDiscreteScheduler(**SD3), dict(guidance_scale=7.0), ref.sd3_loop, dict(guidance_scale=7.0)),
    "sd3-dpmpp_2m-flow": ("sd3", lambda p: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), dict(guidance_scale=7.0),
                          ref.sd3_loop, dict(guidance_scale=7.0)),
    "sd3-unipc-flow": ("sd3", lambda p: UniPCMultistepScheduler(**FLOW, flow_shift=3.0), dict(guidance_scale=7.0),
                       ref.sd3_loop, dict(guidance_scale=7.0)),
    "flux-euler": ("flux", lambda p: p.scheduler, dict(guidance_scale=3.5), ref.flux_loop, dict(guidance=3.5)),
    "flux-euler-true-cfg": ("flux", lambda p: p.scheduler, dict(guidance_scale=3.5, negative_prompt=["blurry", "dark"], true_cfg_scale=4.0),
                            ref.flux_loop, dict(guidance=3.5, negative_prompts=["blurry", "dark"], true_cfg_scale=4.0)),
    "flux-dpmpp_2m-flow": ("flux", lambda p: DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True), dict(guidance_scale=3.5),
                           ref.flux_loop, dict(guidance=3.5)),
    "flux-unipc-flow": ("flux", lambda p: UniPCMultistepScheduler(**FLOW, use_dynamic_shifting=True), dict(guidance_scale=3.5),
                        ref.flux_loop, dict(guidance=3.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_loop_matches_pipeline(case, pipes):
    family, scheduler, call_kwargs, loop, loop_kwargs = CASES[case]
    pipe = with_scheduler(pipes[family], scheduler(pipes[family]))
    expected, pipe_calls = count_calls(network(pipe), lambda: pipe(
        PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent", generator=generators(), **call_kwargs).images)
    got, loop_calls = count_calls(network(pipe), lambda: loop(pipe, PROMPTS, noise(pipe), STEPS, **loop_kwargs))
    print(f"{case}: relative difference {relative(got.latents, expected):.3g}")
    assert relative(got.latents, expected) <= REL
    assert loop_calls == pipe_calls == len(got.steps) * (2 if "true-cfg" in case else 1)
    assert [t for t, _ in got.steps] == pipe.scheduler.timesteps.tolist()


def test_flux_latents_unpack_and_pack(pipes):
    x = noise(pipes["flux"])
    packed = ref.pack_latents(x)
    assert packed.shape == (2, 16, 64)
    assert torch.equal(ref.unpack_latents(packed, 8, 8), x)
    assert ref.latent_image_ids(8, 8)[5].tolist() == [0.0, 1.0, 1.0]


def test_flux_grid_is_the_shifted_linspace(pipes):
    """Flux: σ_t = time_shift(μ, linspace(1, 1/N, N)) with μ of 16 image tokens (64×64 images)."""
    out = ref.flux_loop(pipes["flux"], PROMPTS[:1], noise(pipes["flux"])[:1], STEPS)
    mu = ref.calculate_shift(16, 256, 4096, 0.5, 1.15)
    t = np.linspace(1.0, 1 / STEPS, STEPS)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert [s for _, s in out.steps] == pytest.approx(expected.tolist(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
GRIDS = {
    "sd3": dict(shift=3.0), "unshifted": dict(shift=1.0), "flux": dict(FLUX),
    "linear-shift": dict(FLUX, time_shift_type="linear"), "shift_terminal": dict(shift=3.0, shift_terminal=0.1),
    "karras": dict(shift=3.0, use_karras_sigmas=True), "exponential": dict(shift=3.0, use_exponential_sigmas=True),
    "beta": dict(shift=3.0, use_beta_sigmas=True), "flux-terminal-karras": dict(FLUX, shift_terminal=0.02, use_karras_sigmas=True),
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("flux_style", [False, True], ids=["default", "sigmas=linspace(1,1/N,N)"])
def test_flow_match_sigmas_is_the_schedulers_grid(grid, flux_style):
    """flow_match_sigmas rebuilds FlowMatchEulerDiscreteScheduler's grid bit for bit (float32)."""
    for steps in (2, 4, 10, 28):
        scheduler = FlowMatchEulerDiscreteScheduler(**GRIDS[grid])
        mu = 0.8 if scheduler.config.use_dynamic_shifting else None
        sigmas = np.linspace(1.0, 1 / steps, steps) if flux_style else None
        scheduler.set_timesteps(steps, sigmas=sigmas, **({} if mu is None else {"mu": mu}))
        assert np.array_equal(ref.flow_match_sigmas(scheduler.config, steps, mu=mu, sigmas=sigmas), scheduler.sigmas.numpy())


@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_flow_match_ramp_is_the_pipelines_use_sigmas_option(ramp, pipes):
    """schedule=flow_match schedule.ramp=X is the model's scheduler with use_X_sigmas=True
    (t = σ/(1 + σ) of the run's grid, float32 rounding)."""
    from framework.entry.api import run

    steps = 6
    res = run(["model=tiny_sd3", "schedule=flow_match", f"schedule.ramp={ramp}", f"steps={steps}", "num_samples=1",
               "save_images=false"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipes["sd3"].scheduler.config, **{f"use_{ramp}_sigmas": True})
    scheduler.set_timesteps(steps)
    t = [1.0 if math.isinf(s) else s / (1 + s) for s in res.record["sigmas"]]
    assert t == pytest.approx(scheduler.sigmas.tolist(), rel=1e-6, abs=1e-7)


def test_shifts_are_constant_factors_on_sigma():
    """In σ = t/(1 − t): the static shift multiplies σ by s, the exponential time shift by e^μ, the
    linear one by μ; SD3's default grid is nonetheless shifted twice at its end (t_min is shifted
    at __init__, then the whole linspace again)."""
    base = np.linspace(0.98, 0.05, 7)
    sigma = base / (1 - base)
    for config, factor in ((dict(shift=3.0), 3.0), (dict(FLUX), math.exp(0.8)), (dict(FLUX, time_shift_type="linear"), 0.8)):
        t = ref.flow_match_sigmas(FlowMatchEulerDiscreteScheduler(**config).config, 7, mu=0.8, sigmas=base)[:-1].astype(np.float64)
        assert t / (1 - t) == pytest.approx(factor * sigma, rel=1e-4)
    t_end = ref.flow_match_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0).config, 4)[-2]
    once = 3 * 1e-3 / (1 + 2 * 1e-3)
    assert t_end == pytest.approx(3 * once / (1 + 2 * once), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The σ-space maths the adapters build on
# ---------------------------------------------------------------------------------------------
def test_sigma_space_euler_is_flow_match_euler(pipes):
    """SD3's FlowMatchEuler run is the σ-space Euler (DDIM) step x' = D + (σ'/σ)(y − D) with
    y = x/(1 − t), σ = t/(1 − t), D = x − t·v(x, t); at t = 1 (σ = ∞) in ε-form from the pure-noise
    input, y' = D + σ'·x. Measured 6e-7 relative in float32 (the scheduler steps x + (t' − t)·v)."""
    pipe = pipes["sd3"]
    x = noise(pipe)
    expected = ref.sd3_loop(pipe, PROMPTS, x, STEPS, guidance_scale=7.0)
    context, pooled = (torch.cat(pair) for pair in zip(ref.sd3_text(pipe, [""] * 2, 256), ref.sd3_text(pipe, PROMPTS, 256)))
    ts = [s for _, s in expected.steps] + [0.0]
    with torch.no_grad():
        for t, t_next in zip(ts, ts[1:]):
            v_uncond, v_cond = pipe.transformer(hidden_states=torch.cat([x] * 2), timestep=torch.full((4,), 1000 * t),
                                                encoder_hidden_states=context, pooled_projections=pooled, return_dict=False)[0].chunk(2)
            denoised = x - t * (v_uncond + 7.0 * (v_cond - v_uncond))
            sigma_next = t_next / (1 - t_next)
            if t == 1.0:
                y_next = denoised + sigma_next * x                                       # ε-form: ε̂ = x at t = 1
            else:
                y = x / (1 - t)
                y_next = denoised + sigma_next / (t / (1 - t)) * (y - denoised)
            x = y_next * (1 - t_next)                                                  # x_in = y/(1 + σ) = (1 − t)·y
    print(f"σ-space Euler vs FlowMatchEuler: relative difference {relative(x, expected.latents):.3g}")
    assert relative(x, expected.latents) <= 1e-5


# ---------------------------------------------------------------------------------------------
# The tiny pipelines
# ---------------------------------------------------------------------------------------------
def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for k, v in module.state_dict().items()}


@pytest.mark.parametrize("build", [tiny.build_tiny_sdxl, tiny.build_tiny_sd3, tiny.build_tiny_flux], ids=["sdxl", "sd3", "flux"])
def test_tiny_pipelines_are_deterministic_offline_and_in_eval_mode(build, pipes):
    family = build.__name__.removeprefix("build_tiny_")
    a, b = state(pipes[family]), state(build(0))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = state(build(1))
    assert any(not torch.equal(a[k], other[k]) for k in a)
    modules = [m for m in pipes[family].components.values() if isinstance(m, torch.nn.Module)]
    assert not any(m.training for m in modules)
    assert sum(p.numel() for m in modules for p in m.parameters()) < 2_000_000


def test_tokenizers_spell_any_prompt(pipes):
    t5 = pipes["flux"].tokenizer_2
    ids = t5(["A Red cube, 3 balls!"]).input_ids[0]
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    clip = pipes["flux"].tokenizer                   # CLIP's unknown token is its end token
    assert clip.unk_token_id not in clip(["A Red cube, 3 balls!"]).input_ids[0][1:-1]


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sd3_no_t5", "flux"])
def test_round_trip_through_a_folder(family, pipes, tmp_path):
    pipe = pipes[family]
    tiny.save_tiny(pipe, tmp_path)
    loaded = tiny.load_tiny(tmp_path)
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    a, b = state(pipe), state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent")
    assert torch.equal(loaded(PROMPTS, generator=generators(), **run).images, pipe(PROMPTS, generator=generators(), **run).images)


def test_sd3_folder_without_t5_loads_only_with_t5_set_to_none(pipes, tmp_path):
    tiny.save_tiny(pipes["sd3_no_t5"], tmp_path)
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None


def test_save_helpers_write_loadable_folders(tmp_path):
    folder = tiny.save_tiny_flux(tmp_path / "flux", seed=3)
    assert isinstance(FluxPipeline.from_pretrained(folder, local_files_only=True), FluxPipeline)
