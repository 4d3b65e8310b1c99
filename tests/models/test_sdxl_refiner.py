"""The SDXL refiner (issue 20): model=sdxl with a StableDiffusionXLImg2ImgPipeline refiner taking over
at diffusers' denoising_end / denoising_start fraction, inside the engine's denoiser, so every solver
runs across the hand-over.

Parity: the engine (solver=euler on the pipeline's EulerDiscrete grid, CFG 5) equals diffusers'
ensemble of experts — StableDiffusionXLPipeline(denoising_end=f, output_type="latent") then
StableDiffusionXLImg2ImgPipeline(image=those latents, denoising_start=f) — on tiny random base and
refiner pipelines (framework/models/tiny_families.py), measured float64 1.2e-7, float32 1.1e-6
relative (diffusers steps EulerDiscrete in float32: the float64 floor)."""
from __future__ import annotations

import pytest
import torch

from framework.core.errors import ConfigError
from framework.entry.api import run
from framework.entry.cli import main
from framework.models import tiny_families as tiny
from framework.models.sdxl import StableDiffusionXL

PROMPTS = ["a red cube", "two blue balls"]
STEPS = 4
SMALL = ["steps=4", "num_samples=1", "batch_size=1", "prompts=['a x circle']", "save_images=false"]


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def diffusers_ensemble(unit: torch.Tensor, dtype: torch.dtype, switch: float) -> torch.Tensor:
    base, refiner = tiny.tiny_pipeline("sdxl"), tiny.tiny_pipeline("sdxl_refiner")
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
        p.to(dtype)
    try:
        with torch.no_grad():
            handed = base(PROMPTS, num_inference_steps=STEPS, height=64, width=64, latents=unit.to(dtype), output_type="latent",
                          guidance_scale=5.0, denoising_end=switch).images
            return refiner(PROMPTS, image=handed, num_inference_steps=STEPS, denoising_start=switch, output_type="latent",
                           guidance_scale=5.0).images
    finally:
        for p in (base, refiner):
            p.to(torch.float32)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-5)])
def test_base_and_refiner_match_diffusers_ensemble(dtype, tol):
    """switch 0.5 on 4 leading-spaced steps: the base at timesteps 751, 501, the refiner at 251, 1."""
    model = StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl"), refiner_pipeline=tiny.tiny_pipeline("sdxl_refiner"),
                              refiner_switch=0.5)
    engine = ["solver=euler", "schedule=uniform", "cfg_scale=5", f"steps={STEPS}", "num_samples=2", "batch_size=2",
              f"prompts=[{','.join(PROMPTS)}]", f"dtype={dtype}"]
    res = run(engine, model=model)
    expected = diffusers_ensemble(res.x_T / res.schedule.init_noise_scale, getattr(torch, dtype), 0.5)
    diff = relative(res.latents, expected)
    print(f"refiner parity {dtype}: {diff:.3g}")
    assert diff <= tol and res.record["metrics"]["nfe"] == STEPS
    # controls: the refiner acts, and the negative prompt's aesthetic score counts
    alone = run(engine, model=StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl")))
    assert relative(alone.latents, expected) > 1e-3
    same_score = StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl"), refiner_pipeline=tiny.tiny_pipeline("sdxl_refiner"),
                                   refiner_switch=0.5, negative_aesthetic_score=6.0)
    assert relative(run(engine, model=same_score).latents, expected) > 10 * tol


def unet_calls(overrides: list[str]) -> tuple[object, int, int]:
    base, refiner = [], []
    h2 = tiny.tiny_pipeline("sdxl_refiner").unet.register_forward_hook(lambda *_: refiner.append(1))   # (builds the base too)
    h1 = tiny.tiny_pipeline("sdxl").unet.register_forward_hook(lambda *_: base.append(1))
    try:
        return run(["model=tiny_sdxl", "model.refiner=true", *overrides]), len(base), len(refiner)
    finally:
        h1.remove()
        h2.remove()


def test_the_hand_over_is_by_model_time_or_by_sigma():
    """Euler, 4 uniform steps (timesteps 751, 501, 251, 1): switch 0.5 (cutoff 500) gives the base two
    evaluations and the refiner two; refiner_sigma between the 2nd and 3rd σ gives the same samples."""
    res, b, r = unet_calls(["solver=euler", "schedule=uniform", "model.refiner_switch=0.5", *SMALL])
    assert (b, r) == (2, 2)
    sigmas = res.schedule.sigmas
    by_sigma, b2, r2 = unet_calls(["solver=euler", "schedule=uniform", f"model.refiner_sigma={(sigmas[1] + sigmas[2]) / 2}", *SMALL])
    assert (b2, r2) == (2, 2) and torch.equal(by_sigma.latents, res.latents)
    _, b3, r3 = unet_calls(["solver=euler", "schedule=uniform", "model.refiner_switch=0.8", *SMALL])   # cutoff 200
    assert (b3, r3) == (3, 1)


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "unipc", "dpmpp_3m_sde"])
def test_every_kind_of_solver_runs_across_the_hand_over(solver):
    """Multi-stage, multistep and stochastic solvers: finite samples, NFE as the UNets were called,
    both UNets used, and the refiner changes the samples."""
    res, b, r = unet_calls([f"solver={solver}", "model.refiner_switch=0.5", *SMALL])
    m = res.record["metrics"]
    assert torch.isfinite(res.latents).all() and b > 0 and r > 0 and m["unet_calls"] == b + r
    plain = run(["model=tiny_sdxl", f"solver={solver}", *SMALL])
    assert relative(res.latents, plain.latents) > 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    return {"base": tiny.save_tiny(tiny.tiny_pipeline("sdxl"), root / "base"),
            "refiner": tiny.save_tiny(tiny.tiny_pipeline("sdxl_refiner"), root / "refiner"),
            "flux": tiny.save_tiny(tiny.tiny_pipeline("flux"), root / "flux")}


@pytest.mark.slow   # saves three pipeline folders and loads two: ~10 s on the shared machine
def test_a_refiner_folder_loads_and_samples_as_the_pipeline_object(folders):
    res = run(["model=sdxl", f"model.path={folders['base']}", f"model.refiner={folders['refiner']}", "model.refiner_switch=0.5",
               *SMALL])
    expected = run(["model=tiny_sdxl", "model.refiner=true", "model.refiner_switch=0.5", *SMALL])
    assert relative(res.latents, expected.latents) <= 1e-6


@pytest.mark.parametrize("case", ["flux_folder", "base_folder", "switch", "perturbation"])
def test_bad_refiners_are_one_line_exit_2(case, folders, capsys, tmp_path):
    argv, expected = {
        "flux_folder": ([f"model.refiner={folders['flux']}"],
                        "is a FluxPipeline folder, not an SDXL refiner (StableDiffusionXLImg2ImgPipeline)"),
        "base_folder": ([f"model.refiner={folders['base']}"], "is a StableDiffusionXLPipeline folder, not an SDXL refiner"),
        "switch": ([f"model.refiner={folders['refiner']}", "model.refiner_switch=1.2"], "model.refiner_switch must be in (0, 1)"),
        "perturbation": ([f"model.refiner={folders['refiner']}", "guidance=[cfg,pag]"],
                         "acts on the base UNet's layers, and model.refiner hands part of the run to another UNet"),
    }[case]
    code = main(["model=sdxl", f"model.path={folders['base']}", *argv, "steps=2", "num_samples=1", "batch_size=1",
                 f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_refiner_of_another_latent_size_is_refused():
    """A refiner whose UNet reads 16-channel latents (SD3/Flux's VAE), for the 4-channel base."""
    from diffusers import UNet2DConditionModel

    good = tiny.tiny_pipeline("sdxl_refiner")
    unet = UNet2DConditionModel(**{**good.unet.config, "in_channels": 16, "out_channels": 16})
    bad = type(good)(**{**good.components, "unet": unet})
    with pytest.raises(ConfigError, match=r"^the refiner's latents \(16 channels, 1/8 of the image\) are not the base's "
                                          r"\(4 channels, 1/8\)") as e:
        StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl"), refiner_pipeline=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not an SDXL refiner"):
        StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl"), refiner_pipeline=tiny.tiny_pipeline("sdxl"))
