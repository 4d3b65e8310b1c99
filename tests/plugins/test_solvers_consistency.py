"""Issue 22's older and consistency samplers: dpm_fast, heunpp2, dpmpp_singlestep, lcm, tcd and the CFG++
siblings (euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp, gradient_estimation_cfg_pp).

- measured convergence order (float64, gaussian and mixture, through the kit) against each method's
  theory ± 0.3;
- whole runs against references written here from the published algorithms (ComfyUI's
  ``comfy/k_diffusion/sampling.py`` formulas, k-diffusion's DPM-Solver-fast), float64, noise replayed;
- parity ≤ 1e-4 relative with diffusers' DPMSolverSinglestepScheduler, LCMScheduler and TCDScheduler
  on the tiny SD model (float32, whole runs, CFG 4, the same noise tensors fed to both);
- exact NFE; bad input (a solver that needs a discrete model on a continuous one, lcm beyond its
  useful steps on an ordinary model).

``python -m pytest tests/plugins/test_solvers_consistency.py -s`` prints every figure."""
from __future__ import annotations

import functools
import importlib
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from framework import testing
from framework.core.errors import ConfigError
from framework.entry.api import run
from tests.plugins.test_sampler_names import CFG_MODEL, CFG_SCALE, PROMPTS, ancestral, record_draws

# where each deterministic solver's order or parity is tested (merged into tests/plugins/test_solvers.py)
CLASSIFIED = {
    "dpm_fast": "order (gaussian, mixture) and k-diffusion reference here; owns its λ-uniform grid",
    "heunpp2": "order 1 and ComfyUI reference here",
    "dpmpp_singlestep": "orders 1-3 here; parity with DPMSolverSinglestepScheduler here",
    "gradient_estimation_cfg_pp": "unconditional limit (order 1) and ComfyUI reference here",
    "tcd": "parity with TCDScheduler (γ = 0.3) on the tiny SD model here",
}
# stochastic ones: the overrides the kit runs them with on model=gaussian (continuous: lcm's LCM boundary
# scalings and tcd's γ > 0 need discrete timesteps, so the kit runs lcm without them and tcd at γ = 0;
# both are checked as published on the tiny SD model below)
STOCHASTIC = {
    "euler_ancestral_cfg_pp": [], "dpmpp_2s_ancestral_cfg_pp": [], "lcm": ["solver.boundary=none"],
    "tcd": ["solver.gamma=0"],
}

# ---------------------------------------------------------------------------------------------
# Convergence order (float64). Theory: dpm_fast 3 (its last steps are of order 2, 1 with steps
# shrinking as the grid), heunpp2 1 (its weights σ/(3σ₀) are not Heun's ½), singlestep = its order,
# the CFG++ siblings on an unconditional model (D_u = D) at η = 0: euler 1, DPM-Solver++(2S) 2,
# euler + gradient estimation 1.
# ---------------------------------------------------------------------------------------------
N3 = (66, 132)  # multiples of 3: whole singlestep groups of order 3
ORDERS = {
    "dpm_fast": (["solver=dpm_fast"], 3, (65, 131)),  # NFE budgets 3K − 1: K = 22 → 44 intervals
    "heunpp2": (["solver=heunpp2"], 1, (64, 128)),
    "singlestep_1": (["solver=dpmpp_singlestep", "solver.order=1"], 1, (64, 128)),
    "singlestep_2": (["solver=dpmpp_singlestep"], 2, (64, 128)),
    "singlestep_2_heun": (["solver=dpmpp_singlestep", "solver.solver_type=heun"], 2, (64, 128)),
    "singlestep_2_eps": (["solver=dpmpp_singlestep", "solver.algorithm_type=dpmsolver"], 2, (64, 128)),
    "singlestep_3": (["solver=dpmpp_singlestep", "solver.order=3"], 3, N3),
    "singlestep_3_heun": (["solver=dpmpp_singlestep", "solver.order=3", "solver.solver_type=heun"], 3, N3),
    "singlestep_3_eps": (["solver=dpmpp_singlestep", "solver.order=3", "solver.algorithm_type=dpmsolver"], 3, N3),
    "euler_ancestral_cfg_pp_eta0": (["solver=euler_ancestral_cfg_pp", "solver.eta=0"], 1, (64, 128)),
    "dpmpp_2s_ancestral_cfg_pp_eta0": (["solver=dpmpp_2s_ancestral_cfg_pp", "solver.eta=0"], 2, (64, 128)),
    "gradient_estimation_cfg_pp": (["solver=gradient_estimation_cfg_pp"], 1, (64, 128)),
}
# The mixture leaves the pre-asymptotic range later: dpm_fast measured 2.21 at 65→131 (λ-steps of 0.48 at
# K = 22), 2.85 at 197→395; singlestep order 2: 1.65 at 64→128, 1.84 at 128→256, 1.92 at 256→512; order 3:
# 1.08 at 66→132, 2.85 at 132→264, 2.92 at 264→528 (a group of k intervals is one step of order k, so
# N steps are N/k steps of the method).
MIXTURE_STEPS = {"dpm_fast": (197, 395), **{c: (128, 256) for c in ORDERS if c.startswith("singlestep_2")},
                 **{c: (132, 264) for c in ORDERS if c.startswith("singlestep_3")}}
FAST_MIXTURE = {"heunpp2", "singlestep_2"}


@pytest.mark.parametrize("case", list(ORDERS))
def test_order_gaussian(case):
    overrides, order, steps = ORDERS[case]
    measured = testing.assert_order(overrides, order, model="gaussian", steps=steps)
    print(f"order {case} gaussian: {measured:.2f} (theory {order})")


@pytest.mark.parametrize("case", [c if c in FAST_MIXTURE else pytest.param(c, marks=pytest.mark.slow) for c in ORDERS])
def test_order_mixture(case):
    overrides, order, steps = ORDERS[case]
    measured = testing.assert_order(overrides, order, model="mixture", steps=MIXTURE_STEPS.get(case, steps))
    print(f"order {case} mixture: {measured:.2f} (theory {order})")


# ---------------------------------------------------------------------------------------------
# NFE and limits
# ---------------------------------------------------------------------------------------------
GAUSS = ["model=gaussian", "dtype=float64", "num_samples=2", "batch_size=2"]


@pytest.mark.parametrize("budget", [2, 5, 6, 7, 10])
def test_dpm_fast_spends_its_budget_exactly(budget):
    res = testing.assert_nfe_honest(["solver=dpm_fast"], steps=budget)
    assert res.record["metrics"]["nfe"] == budget
    assert res.schedule.steps == budget // 3 + 1
    lam = [-math.log(s) for s in res.schedule.sigmas]
    assert lam[0] == pytest.approx(-math.log(80.0)) and lam[-1] == pytest.approx(-math.log(0.002))
    assert max(abs((b - a) - (lam[1] - lam[0])) for a, b in zip(lam, lam[1:])) < 1e-12  # uniform in λ


def test_heunpp2_nfe():
    assert run(GAUSS + ["solver=heunpp2", "steps=8"]).record["metrics"]["nfe"] == 3 * 6 + 2 + 1


@pytest.mark.parametrize("ours, base", [
    (["solver=euler_ancestral_cfg_pp"], ["solver=euler_ancestral"]),
    (["solver=euler_ancestral_cfg_pp", "solver.eta=0"], ["solver=euler_cfg_pp"]),
    (["solver=dpmpp_2s_ancestral_cfg_pp"], ["solver=dpmpp_2s_ancestral"]),
    (["solver=gradient_estimation_cfg_pp"],
     ["solver=euler", "momentum=[gradient_estimation]", "momentum.gradient_estimation.final=denoise"]),
    (["solver=tcd", "solver.gamma=0"], ["solver=ddim"]),
])
def test_unconditional_limits(ours, base):
    """On an unconditional model (D_u = D) each CFG++ sibling is its base sampler; TCD at γ = 0 is DDIM."""
    a, b = run(GAUSS + ["steps=8"] + ours), run(GAUSS + ["steps=8"] + base)
    assert (a.latents - b.latents).abs().max().item() <= 1e-12


@pytest.mark.parametrize("overrides", [["solver=dpmpp_singlestep", "solver.algorithm_type=sde-dpmsolver++"],
                                       ["solver=dpm_fast", "solver.eta=1"]])
def test_stochastic_forms_pass_the_kit(overrides):
    res = testing.assert_solver_conforms(overrides)
    assert torch.isfinite(res.latents).all()


# ---------------------------------------------------------------------------------------------
# The published algorithms, written out (float64), on the conditional mixture with CFG and the mixture
# ---------------------------------------------------------------------------------------------
def guided_pair(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CFG-guided D, unconditional D_u) of the conditional mixture."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    cond = CFG_MODEL(x, s, CFG_MODEL.encode_prompts(PROMPTS)["c"])
    uncond = CFG_MODEL(x, s, CFG_MODEL.encode_prompts([""] * x.shape[0])["c"])
    return uncond + CFG_SCALE * (cond - uncond), uncond


def ref_euler_ancestral_cfg_pp(P, x, s, noise, eta=1.0):
    for i in range(len(s) - 1):
        D, Du = P(x, s[i])
        if s[i + 1] == 0:
            x = D
            continue
        down, up = ancestral(s[i], s[i + 1], eta)
        x = D + down * (x - Du) / s[i]
        if eta > 0:
            x = x + next(noise) * up
    return x


def ref_dpmpp_2s_ancestral_cfg_pp(P, x, s, noise, eta=1.0):
    for i in range(len(s) - 1):
        D, Du = P(x, s[i])
        g = D - Du
        down, up = ancestral(s[i], s[i + 1], eta)
        if down == 0:
            x = x + (x - Du) / s[i] * (down - s[i])
        else:
            t, tn = -math.log(s[i]), -math.log(down)
            h = tn - t
            sm = math.exp(-(t + h / 2))
            x2 = (sm / s[i]) * x - math.expm1(-h / 2) * Du
            _, Du2 = P(x2, sm)
            x = (down / s[i]) * x - math.expm1(-h) * Du2
        if s[i + 1] > 0:
            x = x + next(noise) * up
        x = x + g
    return x


def ref_gradient_estimation_cfg_pp(P, x, s, noise=None, gamma=2.0):
    old = None
    for i in range(len(s) - 1):
        D, Du = P(x, s[i])
        d = (x - Du) / s[i]
        if s[i + 1] == 0:
            x = D
        else:
            x = D + d * s[i + 1]
            if old is not None:
                x = x + (gamma - 1) * (d - old) * (s[i + 1] - s[i])
        old = d
    return x


def ref_heunpp2(P, x, s, noise=None):
    D = lambda y, sig: P(y, sig)[0]  # noqa: E731
    for i in range(len(s) - 1):
        d = (x - D(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == s[-1]:
            x = x + d * dt
        elif s[i + 2] == s[-1]:
            x2 = x + d * dt
            d2 = (x2 - D(x2, s[i + 1])) / s[i + 1]
            w2 = s[i + 1] / (2 * s[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - D(x2, s[i + 1])) / s[i + 1]
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            d3 = (x3 - D(x3, s[i + 2])) / s[i + 2]
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def ref_lcm(P, x, s, noise):
    for i in range(len(s) - 1):
        x = P(x, s[i])[0]
        if s[i + 1] > 0:
            x = x + s[i + 1] * next(noise)
    return x


def ref_dpm_fast(P, x, s, noise=None):
    """k-diffusion's DPMSolver.dpm_solver_fast between the grid's ends with nfe = the run's budget (set
    by the caller through ``s``: its ends and K = len(s) − 1), eta = 0."""
    eps = lambda y, t: (y - P(y, math.exp(-t))[0]) / math.exp(-t)  # noqa: E731
    sig = lambda t: math.exp(-t)  # noqa: E731
    t_start, t_end, m = -math.log(s[0]), -math.log(s[-1]), len(s) - 1
    nfe = ref_dpm_fast.nfe
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    ts = [t_start + (t_end - t_start) * j / m for j in range(m + 1)]
    for i, order in enumerate(orders):
        t, tn = ts[i], ts[i + 1]
        h = tn - t
        e = eps(x, t)
        if order == 1:
            x = x - sig(tn) * math.expm1(h) * e
        elif order == 2:
            s1 = t + h / 2
            e1 = eps(x - sig(s1) * math.expm1(h / 2) * e, s1)
            x = x - sig(tn) * math.expm1(h) * e - sig(tn) / (2 * 0.5) * math.expm1(h) * (e1 - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            e1 = eps(x - sig(s1) * math.expm1(r1 * h) * e, s1)
            u2 = (x - sig(s2) * math.expm1(r2 * h) * e
                  - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e))
            e2 = eps(u2, s2)
            x = x - sig(tn) * math.expm1(h) * e - sig(tn) / r2 * (math.expm1(h) / h - 1) * (e2 - e)
    return x


def plain_pair(model):
    def P(x, sigma):
        d = model(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))
        return d, d
    return P


REFERENCES = {  # name: (overrides, reference, conditional?)
    "euler_ancestral_cfg_pp": (["solver=euler_ancestral_cfg_pp"], ref_euler_ancestral_cfg_pp, True),
    "dpmpp_2s_ancestral_cfg_pp": (["solver=dpmpp_2s_ancestral_cfg_pp"], ref_dpmpp_2s_ancestral_cfg_pp, True),
    "gradient_estimation_cfg_pp": (["solver=gradient_estimation_cfg_pp"], ref_gradient_estimation_cfg_pp, True),
    "heunpp2": (["solver=heunpp2"], ref_heunpp2, True),
    "euler_cfg_pp": (["solver=euler_cfg_pp"], functools.partial(ref_euler_ancestral_cfg_pp, eta=0.0), True),
    "lcm": (["solver=lcm", "solver.boundary=none"], ref_lcm, True),
    "dpm_fast": (["solver=dpm_fast"], ref_dpm_fast, False),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reproduces_published_algorithm(name, monkeypatch):
    from framework.models.analytic import Mixture

    overrides, reference, conditional = REFERENCES[name]
    draws = record_draws(monkeypatch)
    if conditional:
        res = testing.sample(overrides + [f"prompts=[{','.join(PROMPTS)}]", f"cfg_scale={CFG_SCALE}"],
                             model=CFG_MODEL, steps=8 if name == "lcm" else 10, num_samples=2)
        P = guided_pair
    else:
        ref_dpm_fast.nfe = 10
        res = testing.sample(overrides, model="mixture", steps=10, num_samples=2)
        P = plain_pair(Mixture())
    expected = reference(P, res.x_T.clone(), list(res.schedule.sigmas), iter(draws[1:]))
    scale = expected.abs().max().item()
    diff = (res.latents - expected).abs().max().item() / scale
    print(f"reference {name}: relative max difference {diff:.2e}")
    assert diff <= 1e-10


# ---------------------------------------------------------------------------------------------
# Parity with diffusers on the tiny SD model (float32, whole runs, CFG 4, same noise)
# ---------------------------------------------------------------------------------------------
STEPS, TINY_PROMPTS, CFG = 6, ["a red circle", "a blue square"], 4.0


@pytest.fixture(scope="module")
def tiny_model(tiny_pipe):
    from framework.models.diffusers_sd import StableDiffusion

    return StableDiffusion(pipeline=tiny_pipe)


def grid_overrides(sigmas: list[float], timesteps: list[float | None]) -> list[str]:
    fmt = lambda v: "null" if v is None else repr(float(v))  # noqa: E731
    return ["schedule=custom", f"schedule.sigmas=[{','.join(map(fmt, sigmas))}]",
            f"schedule.timesteps=[{','.join(map(fmt, timesteps))}]", "schedule.init_noise=vp"]


def run_pair(sched, solver: list[str], steps: int, tiny_pipe, tiny_model, monkeypatch, noise_module: str | None,
             sigmas: list[float], timesteps: list[float | None]) -> tuple[float, float]:
    """(max abs difference, latent scale) of our run against diffusers' loop with ``sched`` from the
    same x_T, our step noise replayed inside diffusers."""
    from framework.models.base import vp_scale
    from framework.testing import diffusers_loop

    draws = record_draws(monkeypatch)
    res = run(grid_overrides(sigmas, timesteps) + solver + [f"steps={steps}", "num_samples=2", "batch_size=2",
                                                            f"cfg_scale={CFG}", f"prompts=[{','.join(TINY_PROMPTS)}]"],
              model=tiny_model)
    if noise_module is not None:
        replay = iter(draws[1:])
        monkeypatch.setattr(importlib.import_module(noise_module), "randn_tensor",
                            lambda shape, **kw: next(replay, torch.zeros(shape)).to(kw.get("dtype") or torch.float32))
    ours = res.schedule
    expected = diffusers_loop(tiny_pipe, sched, steps, (res.x_T * vp_scale(ours.sigmas[0])).clone(), TINY_PROMPTS, CFG)
    got = res.latents * vp_scale(ours.sigmas[-1]) if ours.sigmas[-1] > 0 else res.latents
    scale = max(1.0, expected.abs().max().item())
    return (got - expected).abs().max().item(), scale


SINGLESTEP = {  # case: (scheduler config, our overrides, steps)
    "order1": (dict(solver_order=1), ["solver.order=1"], 6),
    "order2": (dict(solver_order=2), [], 6),
    "order2_heun": (dict(solver_order=2, solver_type="heun"), ["solver.solver_type=heun"], 6),
    "order3": (dict(solver_order=3), ["solver.order=3"], 6),
    "order3_7steps": (dict(solver_order=3), ["solver.order=3"], 7),
    "order3_heun": (dict(solver_order=3, solver_type="heun"), ["solver.order=3", "solver.solver_type=heun"], 6),
    "order3_sigma_min": (dict(solver_order=3, final_sigmas_type="sigma_min"), ["solver.order=3"], 6),
    "dpmsolver_order2": (dict(solver_order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                         ["solver.algorithm_type=dpmsolver"], 6),
    "dpmsolver_order3_heun": (dict(solver_order=3, algorithm_type="dpmsolver", solver_type="heun",
                                   final_sigmas_type="sigma_min"),
                              ["solver.order=3", "solver.algorithm_type=dpmsolver", "solver.solver_type=heun"], 6),
    "sde_order2": (dict(solver_order=2, algorithm_type="sde-dpmsolver++"),
                   ["solver.algorithm_type=sde-dpmsolver++"], 6),
}


@pytest.mark.parametrize("case", list(SINGLESTEP))
def test_singlestep_parity_with_diffusers(case, tiny_pipe, tiny_model, monkeypatch):
    from diffusers import DPMSolverSinglestepScheduler

    config, ours, steps = SINGLESTEP[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated algorithm_type=dpmsolver
        sched = DPMSolverSinglestepScheduler.from_config(tiny_pipe.scheduler.config, **config)
    sched.set_timesteps(steps)
    sigmas = [float(s) for s in sched.sigmas]
    timesteps = [float(t) for t in sched.timesteps] + [None if sigmas[-1] == 0 else 0.0]
    noise = "diffusers.schedulers.scheduling_dpmsolver_singlestep" if "sde" in case else None
    diff, scale = run_pair(sched, ["solver=dpmpp_singlestep"] + ours, steps, tiny_pipe, tiny_model, monkeypatch, noise,
                           sigmas, timesteps)
    print(f"singlestep {case}: max abs diff {diff:.3g} at latent scale {scale:.3g} (relative {diff / scale:.2e})")
    assert diff <= 1e-4 * scale


def _vp_sigma(ac: float) -> float:
    return math.sqrt((1 - ac) / ac)


@pytest.mark.parametrize("name, steps", [("LCMScheduler", 4), ("LCMScheduler", 6), ("TCDScheduler", 4), ("TCDScheduler", 6)])
def test_consistency_parity_with_diffusers(name, steps, tiny_pipe, tiny_model, monkeypatch):
    """lcm (boundary=lcm) and tcd (γ = 0.3, diffusers' default eta) against LCMScheduler/TCDScheduler on
    their own timesteps (replayed with schedule=custom): LCM's last step lands on its x̂₀ (σ = 0), TCD's
    on σ(t = 0)."""
    import diffusers

    sched = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    sigmas = [_vp_sigma(float(ac[t])) for t in ts]
    if name == "LCMScheduler":
        sigmas, timesteps, solver = sigmas + [0.0], ts + [None], ["solver=lcm"]
        module = "diffusers.schedulers.scheduling_lcm"
    else:
        sigmas, timesteps, solver = sigmas + [_vp_sigma(float(ac[0]))], ts + [0], ["solver=tcd"]
        module = "diffusers.schedulers.scheduling_tcd"
    diff, scale = run_pair(sched, solver, steps, tiny_pipe, tiny_model, monkeypatch, module, sigmas, timesteps)
    print(f"{name} {steps} steps: max abs diff {diff:.3g} at latent scale {scale:.3g} (relative {diff / scale:.2e})")
    assert diff <= 1e-4 * scale


def test_tcd_is_seeded_and_batch_invariant_on_a_discrete_model(tiny_model):
    base = ["solver=tcd", "prompts=[a red circle]", "cfg_scale=1.0"]
    # UNet batches differ in the last bits: 1e-5 relative at the latents' scale (≈ 15 here; measured 1.7e-5 abs)
    testing.assert_solver_conforms(base, model=tiny_model, steps=4, atol=1e-5 * 20)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["solver=tcd"], "solver=tcd with gamma > 0 needs a discrete-time model"),
    (["solver=lcm"], "solver=lcm with boundary=lcm needs a discrete-time model"),
    (["solver=dpmpp_singlestep", "solver.algorithm_type=dpmsolver+"], "solver.algorithm_type must be one of"),
    (["solver=dpm_fast", "steps=1"], "NFE budget and must be at least 2"),
])
def test_bad_input_is_one_line_exit_2(argv, expected, capsys, tmp_path):
    from framework.entry.cli import main

    code = main(["model=gaussian", *argv, f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


def test_lcm_beyond_its_useful_steps_warns_on_an_ordinary_model(tiny_model):
    base = ["solver=lcm", "prompts=[a red circle]", "cfg_scale=1.0", "num_samples=1", "batch_size=1"]
    with pytest.warns(UserWarning, match="not consistency-distilled") as record:
        run(base + ["steps=9"], model=tiny_model)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(base + ["steps=8"], model=tiny_model)


# ---------------------------------------------------------------------------------------------
# solver=diffusers over every scheduler class diffusers exports (used by test_solver_diffusers.py and
# the name table's test below)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def diffusers_scheduler_outcomes() -> dict[str, str]:
    """class name → "runs", "runs on flow models" or "refused: <the ConfigError line>" (anything else is a
    crash, reported as such): solver=diffusers on model=gaussian (its flow twin for flow schedulers), 3 steps."""
    import diffusers
    from diffusers import SchedulerMixin

    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and isinstance(getattr(diffusers, n), type)
                   and issubclass(getattr(diffusers, n), SchedulerMixin))
    out = {}
    base = ["model=gaussian", "dtype=float64", "steps=3", "num_samples=1", "batch_size=1", "solver=diffusers"]
    for name in names:
        outcome = "runs"
        for extra in ([], ["model.parametrization=flow"]):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = run(base + [f"solver.scheduler={name}"] + extra)
                outcome = "runs" if not extra else "runs on flow models"
                if not torch.isfinite(res.latents).all():
                    outcome = "crashed: non-finite output"
                break
            except ConfigError as e:
                outcome = f"refused: {e}"
                if "needs a flow model" not in str(e):
                    break
            except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
                outcome = f"crashed: {type(e).__name__}: {e}"
                break
        out[name] = outcome
    return out


# ---------------------------------------------------------------------------------------------
# docs/solvers.md, "Other tools' sampler names": the tables cannot rot
# ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).parents[2]
# ComfyUI's comfy/samplers.py (KSAMPLER_NAMES + SAMPLER_NAMES), as of its late-2025 sources
COMFYUI_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3",
    "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]


def name_tables() -> tuple[list[list[str]], list[list[str]]]:
    """(rows of the A1111/ComfyUI name table, rows of the diffusers class table), cells stripped."""
    text = (ROOT / "docs" / "solvers.md").read_text()
    section = text.split("## Other tools' sampler names", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[list[str]]] = {"names": [], "classes": []}
    current = None
    for line in section.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["A1111", "ComfyUI"]:
            current = "names"
        elif cells[0] == "diffusers class":
            current = "classes"
        elif current and not set(cells[0]) <= {"-"}:
            tables[current].append(cells)
    return tables["names"], tables["classes"]


def test_every_comfyui_sampler_name_is_in_the_table():
    names, _ = name_tables()
    listed = {n.strip() for row in names for n in re.split(r"\s*/\s*|,\s*", row[1])}
    assert sorted(set(COMFYUI_SAMPLERS) - listed) == []


def test_every_diffusers_scheduler_class_is_in_the_table():
    import diffusers
    from diffusers import SchedulerMixin

    classes = {n for n in dir(diffusers) if n.endswith("Scheduler") and isinstance(getattr(diffusers, n), type)
               and issubclass(getattr(diffusers, n), SchedulerMixin)}
    _, rows = name_tables()
    assert sorted(classes - {r[0] for r in rows}) == [] and sorted({r[0] for r in rows} - classes) == []
    for row in rows:  # each maps to a config or says why not
        assert "solver=" in row[1] or row[1].startswith("not applicable: "), row


def test_every_config_the_tables_name_exists():
    """Each `solver=NAME` the name tables point to is a conf/solver YAML (so the tables cannot rot)."""
    names, classes = name_tables()
    named = {m for row in names + classes for m in re.findall(r"solver=([a-z0-9_]+)", " ".join(row[:3]))}
    assert len(named) > 30
    missing = sorted(n for n in named if not (ROOT / "conf" / "solver" / f"{n}.yaml").exists())
    assert missing == []


@pytest.mark.slow
def test_diffusers_table_matches_solver_diffusers():
    """A class the table marks "not applicable" is refused by solver=diffusers; any other runs (~60 s)."""
    _, rows = name_tables()
    outcomes = diffusers_scheduler_outcomes()
    for row in rows:
        refused = row[1].startswith("not applicable: ")
        assert outcomes[row[0]].startswith("refused" if refused else "runs"), (row[0], outcomes[row[0]])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["singlestep_1", "singlestep_2", "singlestep_3", "LCMScheduler", "TCDScheduler"])
def test_parity_on_the_bundled_model(case, monkeypatch):
    """The same pairs on the bundled model (its DDIM config), 6 steps (LCM/TCD 4), CFG 4 (~20 s each)."""
    import diffusers

    model = testing.load_model("bundled")
    pipe = model.pipe
    if case.startswith("singlestep"):
        order = int(case[-1])
        sched = diffusers.DPMSolverSinglestepScheduler.from_config(pipe.scheduler.config, solver_order=order)
        sched.set_timesteps(STEPS)
        sigmas = [float(s) for s in sched.sigmas]
        args = (["solver=dpmpp_singlestep", f"solver.order={order}"], STEPS, None, sigmas,
                [float(t) for t in sched.timesteps] + [None])
    else:
        sched = getattr(diffusers, case).from_config(pipe.scheduler.config)
        sched.set_timesteps(4)
        ac = sched.alphas_cumprod.double()
        ts = [int(t) for t in sched.timesteps]
        sigmas = [_vp_sigma(float(ac[t])) for t in ts]
        lcm = case == "LCMScheduler"
        args = (["solver=lcm" if lcm else "solver=tcd"], 4,
                f"diffusers.schedulers.scheduling_{'lcm' if lcm else 'tcd'}",
                sigmas + [0.0 if lcm else _vp_sigma(float(ac[0]))], ts + [None if lcm else 0])
    solver, steps, noise, sig, times = args
    diff, scale = run_pair(sched, solver, steps, pipe, model, monkeypatch, noise, sig, times)
    print(f"bundled {case}: max abs diff {diff:.3g} at latent scale {scale:.3g} (relative {diff / scale:.2e})")
    assert diff <= 1e-4 * scale
