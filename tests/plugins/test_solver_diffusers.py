"""solver=diffusers: any diffusers scheduler run inside the engine matches the hand-written diffusers
loop on the tiny SD model (float32, whole runs, CFG), counts NFE honestly, owns the schedule role,
and agrees with our native plugin where one exists."""
from __future__ import annotations

import functools

import diffusers
import pytest
import torch

from framework.entry.api import run
from framework.core.errors import ConfigError
from framework.models.base import vp_scale
from framework.core.noise import SampleNoise
from framework.testing import diffusers_loop
from plugins.solver.diffusers import SD_CONFIG

TOL = 1e-4
STEPS, PROMPTS, CFG = 6, ["a red circle", "a blue square"], 4.0

# scheduler: (config overrides, UNet evaluations of the diffusers loop for STEPS steps)
CASES = {
    "EulerDiscreteScheduler": ({}, STEPS),
    "DDIMScheduler": ({}, STEPS),
    "DPMSolverMultistepScheduler": ({"solver_order": 2}, STEPS),
    "UniPCMultistepScheduler": ({}, STEPS),
    "HeunDiscreteScheduler": ({}, 2 * STEPS - 1),
    "PNDMScheduler": ({"skip_prk_steps": True}, STEPS + 1),
    "KDPM2DiscreteScheduler": ({}, 2 * STEPS - 1),
}


def scaled_diff(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    scale = max(1.0, expected.abs().max().item())
    return (got - expected).abs().max().item(), scale


def sample(tiny_overrides, extra: list[str]):
    return run(tiny_overrides + extra + [f"steps={STEPS}", "num_samples=2", "batch_size=2", f"cfg_scale={CFG}",
                                         f"prompts=[{','.join(PROMPTS)}]"])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_loop(name, tiny_pipe, tiny_overrides):
    config, unet_evals = CASES[name]
    cfg = "{" + ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items()) + "}"
    res = sample(tiny_overrides, ["solver=diffusers", f"solver.scheduler={name}", f"+solver.config={cfg}"]
                 if config else ["solver=diffusers", f"solver.scheduler={name}"])
    sched = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config, **config)
    sigma0, sigma_last = res.schedule.sigmas[0], res.schedule.sigmas[-1]
    vp = sched.init_noise_sigma == 1.0  # the scheduler works in the variance-preserving frame
    start = res.x_T * vp_scale(sigma0) if vp else res.x_T
    expected = diffusers_loop(tiny_pipe, sched, STEPS, start.clone(), PROMPTS, CFG)
    got = res.latents * vp_scale(sigma_last) if vp and sigma_last > 0 else res.latents
    diff, scale = scaled_diff(got, expected)
    print(f"{name}: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= TOL * scale
    assert res.record["plugins"]["schedule"] == ["diffusers"]
    assert res.record["plugins"]["step"] == ["diffusers"]
    assert res.record["metrics"]["nfe"] == unet_evals
    assert res.record["metrics"]["unet_calls"] == unet_evals  # CFG pairs batched: one call per evaluation
    assert res.schedule.steps == STEPS


NATIVE = {  # scheduler: our plugin's overrides on the same grid
    "EulerDiscreteScheduler": ["solver=euler", "schedule=uniform"],
}  # Heun vs solver=heun schedule=uniform: 1.14e-05 at scale 16.4 (measured once; docs/solvers.md)


@pytest.mark.parametrize("name", list(NATIVE))
def test_matches_native_plugin(name, tiny_overrides):
    ours = sample(tiny_overrides, NATIVE[name])
    theirs = sample(tiny_overrides, ["solver=diffusers", f"solver.scheduler={name}"])
    assert theirs.schedule.sigmas == pytest.approx(ours.schedule.sigmas, rel=1e-6)
    assert torch.equal(theirs.x_T, ours.x_T)
    diff, scale = scaled_diff(theirs.latents, ours.latents)
    print(f"{name} vs native: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= 1e-5 * scale
    assert theirs.record["metrics"]["nfe"] == ours.record["metrics"]["nfe"]


def test_stochastic_scheduler_is_seeded_and_batch_invariant(tiny_overrides):
    base = tiny_overrides + ["solver=diffusers", "solver.scheduler=EulerAncestralDiscreteScheduler", "steps=4",
                             "num_samples=2", "prompts=[a red circle]", "cfg_scale=1.0"]
    a = run(base + ["batch_size=2"])
    b = run(base + ["batch_size=2"])
    c = run(base + ["batch_size=1"])
    assert torch.equal(a.latents, b.latents)
    assert (a.latents - c.latents).abs().max().item() <= 1e-5 * max(1.0, a.latents.abs().max().item())


def test_ancestral_noise_comes_from_the_engine_generators(tiny_pipe, tiny_overrides):
    """diffusers, given the same per-sample generators (after the initial draw), makes the same run."""
    name = "EulerAncestralDiscreteScheduler"
    res = sample(tiny_overrides, ["solver=diffusers", f"solver.scheduler={name}"])
    noise = SampleNoise(0, [0, 1], res.x_T.shape[1:], torch.device("cpu"), torch.float32)
    assert torch.equal(noise.draw() * res.schedule.init_noise_scale, res.x_T)  # the initial draw
    sched = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config)
    sched.step = functools.partial(sched.step, generator=noise.generators)
    expected = diffusers_loop(tiny_pipe, sched, STEPS, res.x_T.clone(), PROMPTS, CFG)
    diff, scale = scaled_diff(res.latents, expected)
    print(f"{name}: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= TOL * scale


def test_analytic_model_uses_sd_config():
    res = run(["model=gaussian", "solver=diffusers", "solver.scheduler=DDIMScheduler", "steps=5", "num_samples=1",
               "batch_size=1"])
    sched = diffusers.DDIMScheduler.from_config(SD_CONFIG)
    sched.set_timesteps(5)
    ac = float(sched.alphas_cumprod[sched.timesteps[0]])
    assert res.schedule.sigmas[0] == pytest.approx(((1 - ac) / ac) ** 0.5, rel=1e-6)  # SD's σ at t = 801
    assert res.schedule.timesteps[0] == 801
    assert torch.isfinite(res.latents).all()


def test_unknown_scheduler_is_a_config_error(tiny_overrides):
    with pytest.raises(ConfigError) as e:
        run(["model=gaussian", "solver=diffusers", "solver.scheduler=EulerDiscreetScheduler", "steps=2"])
    msg = str(e.value)
    assert "\n" not in msg and "EulerDiscreteScheduler" in msg and "DDIMScheduler" in msg
    with pytest.raises(ConfigError, match="not supported"):
        run(["model=gaussian", "solver=diffusers", "solver.scheduler=FlowMatchEulerDiscreteScheduler", "steps=2"])


def test_churn_is_rejected_before_sampling():
    with pytest.raises(ConfigError, match="before-step"):
        run(["model=gaussian", "solver=diffusers", "callback=[churn]", "steps=2"])


# ---------------------------------------------------------------------------------------------
# Consistency and EDM schedulers (issue 22)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, steps", [("LCMScheduler", 4), ("TCDScheduler", 4), ("TCDScheduler", 6)])
def test_consistency_schedulers_match_diffusers_loop(name, steps, tiny_pipe, tiny_overrides):
    """LCM and TCD (γ = diffusers' default eta 0.3) run inside the engine as in diffusers' own loop, given
    the same per-sample generators: LCM's last step lands on its x̂₀ (σ = 0), TCD's on σ(t = 0)."""
    res = run(tiny_overrides + ["solver=diffusers", f"solver.scheduler={name}", f"steps={steps}", "num_samples=2",
                                "batch_size=2", f"cfg_scale={CFG}", f"prompts=[{','.join(PROMPTS)}]"])
    noise = SampleNoise(0, [0, 1], res.x_T.shape[1:], torch.device("cpu"), torch.float32)
    assert torch.equal(noise.draw() * res.schedule.init_noise_scale, res.x_T)
    sched = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config)
    sched.step = functools.partial(sched.step, generator=noise.generators)
    sigma0, last = res.schedule.sigmas[0], res.schedule.sigmas[-1]
    expected = diffusers_loop(tiny_pipe, sched, steps, (res.x_T * vp_scale(sigma0)).clone(), PROMPTS, CFG)
    got = res.latents * vp_scale(last) if last > 0 else res.latents
    assert (last == 0) == (name == "LCMScheduler")
    diff, scale = scaled_diff(got, expected)
    print(f"{name} {steps} steps: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= TOL * scale
    assert res.record["metrics"]["nfe"] == steps


def test_tcd_gamma_is_a_step_argument(tiny_overrides):
    """solver.step_kwargs reach every step() call: TCD's eta = 0 is deterministic, and equals our
    ``solver=tcd solver.gamma=0`` replaying its grid (float32 UNet: 1e-5 relative)."""
    base = tiny_overrides + ["steps=4", "num_samples=1", "batch_size=1", "prompts=[a red circle]", "cfg_scale=1.0"]
    sched = ["solver=diffusers", "solver.scheduler=TCDScheduler"]
    default, zero = run(base + sched), run(base + sched + ["+solver.step_kwargs={eta:0.0}"])
    assert not torch.allclose(default.latents, zero.latents, atol=1e-3)
    grid = zero.schedule
    fmt = lambda v: "null" if v is None else repr(float(v))  # noqa: E731
    ours = run(base + ["solver=tcd", "solver.gamma=0", "schedule=custom",
                       f"schedule.sigmas=[{','.join(map(fmt, grid.sigmas))}]",
                       f"schedule.timesteps=[{','.join(map(fmt, grid.timesteps))}]",
                       f"schedule.init_noise={grid.init_noise_scale!r}"])
    diff, scale = scaled_diff(ours.latents, zero.latents)
    print(f"TCD eta 0 vs solver=tcd gamma=0: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= 1e-5 * scale


@pytest.mark.parametrize("name, native", [("EDMEulerScheduler", "euler"), ("EDMDPMSolverMultistepScheduler", "dpmpp_2m")])
def test_edm_schedulers_are_our_solvers_on_their_grid(name, native):
    """EDM's F-preconditioned schedulers, handed F = (D − c_skip·x)/c_out, are Euler and DPM-Solver++(2M)
    in σ-space on their karras grid (the model's σ range), started from their initial noise √(σ_max² + 1)."""
    base = ["model=gaussian", "dtype=float64", "steps=10", "num_samples=2", "batch_size=2"]
    theirs = run(base + ["solver=diffusers", f"solver.scheduler={name}"])
    sig = theirs.schedule.sigmas
    assert sig[0] == pytest.approx(80.0, rel=1e-6) and sig[-2] == pytest.approx(0.002, rel=1e-6) and sig[-1] == 0
    grid = ["schedule=custom", f"schedule.sigmas=[{','.join(map(repr, sig))}]",
            f"schedule.init_noise={theirs.schedule.init_noise_scale!r}"]
    ours = run(base + [f"solver={native}"] + grid)
    assert torch.equal(theirs.x_T, ours.x_T)
    diff = (theirs.latents - ours.latents).abs().max().item()
    print(f"{name} vs solver={native}: max abs diff {diff:.3g}")
    assert diff <= 1e-6 * max(1.0, ours.latents.abs().max().item())  # EDM's float32 arithmetic


@pytest.mark.parametrize("name, why", [
    ("CMStochasticIterativeScheduler", "c_out is 0 at σ_min"),
    ("DDIMInverseScheduler", "inversion"),
    ("DPMSolverMultistepInverseScheduler", "inversion"),
    ("RePaintScheduler", "needs original_image, mask"),
    ("CogVideoXDPMScheduler", "needs old_pred_original_sample, timestep_back"),
    ("AmusedScheduler", "masked VQ tokens"),
    ("IPNDMScheduler", "neither a discrete ᾱ table (VP), an EDM σ-space form nor a flow mode"),
    ("FlowMatchLCMScheduler", "needs a flow model"),
])
def test_refusals_say_why_in_one_line(name, why):
    with pytest.raises(ConfigError) as e:
        run(["model=gaussian", "solver=diffusers", f"solver.scheduler={name}", "steps=3"])
    assert why in str(e.value) and "\n" not in str(e.value)


def test_lcm_beyond_its_original_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="smaller than `num_inference_steps`: 60") as e:
        run(["model=gaussian", "solver=diffusers", "solver.scheduler=LCMScheduler", "steps=60"])
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_every_diffusers_scheduler_runs_or_is_refused_in_one_line():
    """Each scheduler class diffusers exports either runs inside the engine (finite output, one NFE or more
    per step) or is refused with one ConfigError line; docs/solvers.md lists which (tested there)."""
    from tests.plugins.test_solvers_consistency import diffusers_scheduler_outcomes

    outcomes = diffusers_scheduler_outcomes()
    assert len(outcomes) >= 45
    for name, outcome in outcomes.items():
        assert outcome.startswith("runs") or (outcome.startswith("refused: ") and "\n" not in outcome), (name, outcome)
