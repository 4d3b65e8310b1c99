"""Parity of the SDXL, SD3 and Flux adapters with their diffusers pipelines (issue 20).

The engine's output equals the pipeline's own (``output_type="latent"``) with the same tiny random
weights (framework/models/tiny_families.py), prompts, the engine's initial noise given to the
pipeline as ``latents`` and the pipeline's scheduler, in float64 and float32. Two engine paths:

- native plugins on the pipeline's own grid: ``solver=euler`` with ``schedule=uniform`` (SDXL's
  EulerDiscrete) or the model's default ``schedule=flow_match`` (SD3, Flux: FlowMatchEuler, static
  and dynamic shift, from σ = ∞); ``solver=dpmpp_2m``/``unipc`` replaying the multistep schedulers'
  grids (SDXL's DPMSolverMultistep; ``use_flow_sigmas`` on SD3 and Flux, with their int64 timesteps
  carried as model times) with ``schedule=custom``;
- ``solver=diffusers`` running the pipeline's scheduler inside the engine (FlowMatchEuler,
  FlowMatchHeun — Heun in t, which σ-space Heun is not —, DPMSolverMultistep/UniPC).

Measured (relative max difference, 4 steps, 2 prompts; the table in docs/models.md): float64 ≤ 1.9e-7
for the native paths (diffusers keeps its σ's in float32 and steps its Euler and flow schedulers in
float32: that is the floor) and ≤ 1.3e-15 through solver=diffusers; float32 ≤ 1.3e-6, FlowMatchHeun
1.1e-5 (its v = (x_t − D)/t round trip at the last t = 0.009).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from framework.entry.api import run
from framework.maths.sigmas import flow_sigma, sigma_to_t
from framework.models import reference_loops as ref
from framework.models import tiny_families as tiny
from framework.models.flux import Flux
from framework.models.sd3 import StableDiffusion3
from framework.models.sdxl import StableDiffusionXL

PROMPTS = ["a red cube", "two blue balls"]
STEPS = 4
#: float64: the native paths meet diffusers' float32 steps (≤ 1.9e-7 measured); float32: ≤ 1.3e-6,
#: FlowMatchHeun 1.1e-5.
TOL = {"float64": 1e-6, "float32": 2e-5}
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def with_scheduler(pipe, scheduler):
    """The same modules under another scheduler (a new pipeline object; the shared one is unchanged)."""
    out = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    out.set_progress_bar_config(disable=True)
    return out


def custom_grid(scheduler, model=None, init_noise: str | float = "vp") -> list[str]:
    """schedule=custom replaying a scheduler's grid after ``set_timesteps``: a VP scheduler's σ's and
    timesteps; a flow one's t as σ = t/(1 − t), its (int64) timesteps as indices of the model's
    training table, starting from the unit noise at t₀ (y = (1 + σ₀)·ε)."""
    fmt = lambda v: "null" if v is None else repr(v)  # noqa: E731
    if model is None:
        sig = [float(s) for s in scheduler.sigmas]
        ts = [float(t) for t in scheduler.timesteps] + [None]
    else:
        sig = [flow_sigma(float(t)) for t in scheduler.sigmas]
        ts = [sigma_to_t(flow_sigma(float(t) / 1000), model._train_sigmas_np) for t in scheduler.timesteps] + [None]
        init_noise = 1 + sig[0]
    return ["schedule=custom", f"schedule.sigmas=[{','.join(map(fmt, sig))}]",
            f"schedule.timesteps=[{','.join(map(fmt, ts))}]", f"schedule.init_noise={init_noise}"]


def sdxl_case(scheduler=None, engine=("solver=euler", "schedule=uniform"), grid=False):
    def make():
        base = tiny.tiny_pipeline("sdxl")
        pipe = with_scheduler(base, scheduler(base) if scheduler else base.scheduler)
        extra = list(engine)
        if grid:
            sch = scheduler(base)
            sch.set_timesteps(STEPS)
            extra += custom_grid(sch)
        return pipe, StableDiffusionXL(pipeline=base), extra + ["cfg_scale=5"], dict(guidance_scale=5.0), "vp"
    return make


def sd3_case(scheduler, engine, grid=False, dynamic=False):
    def make():
        base = tiny.tiny_pipeline("sd3")
        pipe = with_scheduler(base, scheduler())
        model = StableDiffusion3(pipeline=pipe if dynamic else base)
        extra = list(engine) + (custom_grid(_set(scheduler()), model) if grid else [])
        return pipe, model, extra + ["cfg_scale=7"], dict(guidance_scale=7.0), "flow"
    return make


def flux_case(scheduler, engine, grid=False, true_cfg=False):
    def make():
        base = tiny.tiny_pipeline("flux")
        pipe = with_scheduler(base, scheduler())
        model = Flux(pipeline=pipe, height=64, width=64, true_cfg=true_cfg)
        extra = list(engine) + (custom_grid(_set(scheduler(), mu=model.mu), model) if grid else [])
        call = dict(guidance_scale=3.5)
        if true_cfg:
            extra += ["guidance=[cfg]", "cfg_scale=4", "negative_prompt=blurry"]
            call.update(negative_prompt=["blurry"] * len(PROMPTS), true_cfg_scale=4.0)
        else:
            extra += ["guidance=[]"]
        return pipe, model, extra, call, "flux"
    return make


def _set(scheduler, mu=None):
    scheduler.set_timesteps(STEPS, **({"mu": mu} if mu is not None else {}))
    return scheduler


def euler_sd3():
    return FlowMatchEulerDiscreteScheduler(**tiny.SD3_SCHEDULER)


def euler_dynamic():
    return FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULER)


def diffusers(name: str) -> tuple[str, ...]:
    return ("solver=diffusers", f"solver.scheduler={name}")


NATIVE_FLOW = ("schedule=flow_match", "solver=euler")
CASES = {
    "sdxl-euler": sdxl_case(),
    "sdxl-dpmpp_2m": sdxl_case(lambda p: DPMSolverMultistepScheduler.from_config(p.scheduler.config), ("solver=dpmpp_2m",), grid=True),
    "sdxl-dpmpp_2m-diffusers": sdxl_case(lambda p: DPMSolverMultistepScheduler.from_config(p.scheduler.config),
                                         diffusers("DPMSolverMultistepScheduler")),
    "sd3-euler-static": sd3_case(euler_sd3, NATIVE_FLOW),
    "sd3-euler-dynamic": sd3_case(euler_dynamic, NATIVE_FLOW, dynamic=True),
    "sd3-euler-diffusers": sd3_case(euler_sd3, diffusers("FlowMatchEulerDiscreteScheduler")),
    "sd3-heun-diffusers": sd3_case(lambda: FlowMatchHeunDiscreteScheduler(**tiny.SD3_SCHEDULER), diffusers("FlowMatchHeunDiscreteScheduler")),
    "sd3-dpmpp_2m-flow": sd3_case(lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), ("solver=dpmpp_2m",), grid=True),
    "sd3-unipc-flow": sd3_case(lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0), ("solver=unipc",), grid=True),
    "sd3-dpmpp_2m-flow-diffusers": sd3_case(lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), diffusers("DPMSolverMultistepScheduler")),
    "sd3-unipc-flow-diffusers": sd3_case(lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0), diffusers("UniPCMultistepScheduler")),
    "flux-euler-dynamic": flux_case(euler_dynamic, NATIVE_FLOW),
    "flux-euler-true-cfg": flux_case(euler_dynamic, NATIVE_FLOW, true_cfg=True),
    "flux-euler-diffusers": flux_case(euler_dynamic, diffusers("FlowMatchEulerDiscreteScheduler")),
    "flux-dpmpp_2m-flow": flux_case(lambda: DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True), ("solver=dpmpp_2m",), grid=True),
    "flux-unipc-flow-diffusers": flux_case(lambda: UniPCMultistepScheduler(**FLOW, use_dynamic_shifting=True),
                                           diffusers("UniPCMultistepScheduler")),
}


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_pipeline(case, dtype):
    pipe, model, engine, call, kind = CASES[case]()
    res = run(engine + [f"steps={STEPS}", "num_samples=2", "batch_size=2", f"prompts=[{','.join(PROMPTS)}]", f"dtype={dtype}"],
              model=model)
    unit = res.x_T / res.schedule.init_noise_scale   # the unit noise the pipeline draws (SDXL's is then scaled)
    latents = ref.pack_latents(unit) if kind == "flux" else unit
    pipe.to(getattr(torch, dtype))
    try:
        with torch.no_grad():
            out = pipe(PROMPTS, num_inference_steps=STEPS, height=64, width=64, latents=latents.to(getattr(torch, dtype)),
                       output_type="latent", **call).images
    finally:
        pipe.to(torch.float32)
    expected = ref.unpack_latents(out, 8, 8) if kind == "flux" else out
    diff = relative(res.latents, expected)
    print(f"{case} {dtype}: relative difference {diff:.3g}, nfe {res.record['metrics']['nfe']}")
    assert diff <= TOL[dtype]
    steps_nfe = 2 * STEPS - 1 if "heun" in case else STEPS
    assert res.record["metrics"]["nfe"] == res.record["metrics"]["unet_calls"] == steps_nfe


def test_the_flow_grids_are_the_pipelines():
    """schedule=flow_match gives the σ's of the pipeline's own FlowMatchEuler call: SD3's
    set_timesteps(N) (static shift; the end shifted twice), Flux's sigmas=linspace(1, 1/N, N)
    shifted by e^μ of its 16 image tokens; both from σ = ∞, the unit noise at scale 1."""
    for name, steps in (("tiny_sd3", 4), ("tiny_flux", 4), ("tiny_sd3", 28)):
        res = run([f"model={name}", f"steps={steps}", "num_samples=1", "batch_size=1", "guidance=[]", "save_images=false"])
        pipe = tiny.tiny_pipeline(name.removeprefix("tiny_"))
        sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        if name == "tiny_flux":
            sch.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=ref.calculate_shift(16))
        else:
            sch.set_timesteps(steps)
        assert res.schedule.sigmas == tuple(flow_sigma(float(t)) for t in sch.sigmas)
        assert res.record["plugins"]["schedule"] == ["flow_match"] and res.schedule.init_noise_scale == 1.0
