"""The solver zoo: every conf/solver entry is classified and passes the conformance kit
(framework.testing: NFE honesty, determinism, batch invariance); convergence order of the
deterministic fixed-step solvers on model=gaussian and model=mixture (float64), through the kit;
churn; parity with diffusers' schedulers on the tiny SD model (float32, whole runs). Measured
numbers are recorded in docs/solvers.md."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from framework import testing
from framework.entry.api import run
from framework.core.errors import ConfigError

SOLVERS = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "solver").glob("*.yaml"))

# Deterministic fixed-step solvers: (solver overrides, theoretical order, schedule overrides).
# The grid is karras (ρ = 7, σ 80 → 0.002 → 0) unless noted; "EXP" is the exponential grid ending at
# σ_min = 0.002 without the final step to 0 (a first-order step of fixed size σ_min whose error,
# ~σ_min²/2 ≈ 2e-6, would otherwise floor the error of the high-order methods at 128 steps).
# "HIGH" is karras with ρ = 3 and σ_max = 20: fewer, smaller steps at high σ, where the warm-up of the
# fourth-order multistep methods otherwise keeps the 64→128 slope near 3.6.
EXP = ["schedule=exponential", "schedule.final_zero=false"]
HIGH = ["schedule.rho=3", "schedule.sigma_max=20"]
KARRAS: list[str] = []
ORDERS: dict[str, tuple[list[str], float, list[str]]] = {
    "euler": (["solver=euler"], 1, KARRAS),
    "ddim": (["solver=ddim"], 1, KARRAS),
    "learned": (["solver=learned"], 1, KARRAS),  # without a file: Euler's coefficients (fitted ones: tests/tools)
    "heun": (["solver=heun"], 2, KARRAS),
    "dpm_2": (["solver=dpm_2"], 2, KARRAS),
    "lms": (["solver=lms"], 4, HIGH),
    "lms_order2": (["solver=lms", "solver.order=2"], 2, KARRAS),
    "plms": (["solver=plms"], 2, KARRAS),  # fixed AB coefficients: order 2 on non-uniform grids
    "ipndm": (["solver=ipndm"], 2, KARRAS),  # idem
    "ipndm_denoise": (["solver=ipndm", "solver.final=denoise"], 2, KARRAS),  # ComfyUI's last step
    # diff-sampler's variable-step iPNDM: exact AB2; order 3 as the step ratios tend to 1. Its published
    # max_order=4 weights are third order on equal steps and do not sum to 1 on unequal ones: no
    # asymptotic order on karras (slopes 1.3-2.1, docs/solvers.md), so its order is not a test case.
    "ipndm_v": (["solver=ipndm_v", "solver.max_order=3"], 3, KARRAS),
    "ipndm_v_order2": (["solver=ipndm_v", "solver.max_order=2"], 2, KARRAS),
    "deis": (["solver=deis"], 3, KARRAS),
    "deis_order2": (["solver=deis", "solver.order=2"], 2, KARRAS),
    "deis_tab": (["solver=deis_tab"], 3, KARRAS),  # tAB-DEIS: ε polynomial in the VP time t(σ)
    "deis_tab_order2": (["solver=deis_tab", "solver.order=2"], 2, KARRAS),
    "deis_tab_order4": (["solver=deis_tab", "solver.order=4"], 4, EXP),
    "dpmpp_2m": (["solver=dpmpp_2m"], 2, KARRAS),
    "dpmpp_2m_sde_eta0": (["solver=dpmpp_2m_sde", "solver.eta=0"], 2, KARRAS),
    "dpmpp_2m_sde_eta0_heun": (["solver=dpmpp_2m_sde", "solver.eta=0", "solver.solver_type=heun"], 2, KARRAS),
    "dpmpp_3m_sde_eta0": (["solver=dpmpp_3m_sde", "solver.eta=0"], 2, EXP),  # published 3M: order 2
    "dpmpp_3m_sde_eta0_taylor": (["solver=dpmpp_3m_sde", "solver.eta=0", "solver.taylor_d2=true"], 3, KARRAS),
    "dpmpp_2s_ancestral_eta0": (["solver=dpmpp_2s_ancestral", "solver.eta=0"], 2, KARRAS),
    "dpm_2_ancestral_eta0": (["solver=dpm_2_ancestral", "solver.eta=0"], 2, KARRAS),
    "euler_ancestral_eta0": (["solver=euler_ancestral", "solver.eta=0"], 1, KARRAS),
    "euler_cfg_pp": (["solver=euler_cfg_pp"], 1, KARRAS),  # no CFG on analytic models: Euler
    "dpmpp_2m_cfg_pp": (["solver=dpmpp_2m_cfg_pp"], 2, KARRAS),  # idem: DPM-Solver++(2M)
    "unipc_bh2": (["solver=unipc"], 3, KARRAS),  # UniP-2 + UniC: order p + 1
    "unipc_bh1": (["solver=unipc", "solver.variant=bh1"], 3, KARRAS),
    "unipc_nocorrector": (["solver=unipc", "solver.corrector=false"], 2, KARRAS),
    "unipc_order3_nocorrector": (["solver=unipc", "solver.order=3", "solver.corrector=false"], 3, KARRAS),
    "optimize_sgd": (["solver=optimize"], 1, KARRAS),  # torch.optim SGD, momentum 0: the Euler step
}
STOCHASTIC = {  # solver: overrides making it stochastic (its defaults)
    "euler_ancestral": [], "dpm_2_ancestral": [], "ddpm": [], "dpmpp_2s_ancestral": [], "dpmpp_sde": [],
    "dpmpp_2m_sde": [], "dpmpp_3m_sde": [], "restart": [], "ddim": ["solver.eta=1.0"],
    "distill": [],  # score distillation: fresh noise at every iteration, no ODE
}
EXCLUDED = {"dpm_adaptive": "adaptive", "reference": "adaptive ground truth", "restart": "stochastic",
            "diffusers": "runs a diffusers scheduler"}

# Solver families tested in modules of their own (tests/plugins/test_solvers_<family>.py) declare
# CLASSIFIED = {solver: where its order or parity is tested} and STOCHASTIC = {solver: overrides}.
for _path in sorted(Path(__file__).parent.glob("test_solvers_*.py")):
    _family = importlib.import_module(f"{__package__}.{_path.stem}")
    STOCHASTIC = {**STOCHASTIC, **getattr(_family, "STOCHASTIC", {})}
    EXCLUDED = {**EXCLUDED, **getattr(_family, "CLASSIFIED", {})}


def test_every_solver_is_classified():
    """A new conf/solver entry must be placed in the order table, the stochastic set or the excluded set
    (here or in its family's test module)."""
    covered = {o[0].split("=")[1] for o, _, _ in ORDERS.values()} | set(STOCHASTIC) | set(EXCLUDED)
    assert sorted(set(SOLVERS) - covered) == []


# Samplers whose error control couples a batch (documented in their docstrings): not batch-invariant.
BATCH_COUPLED = {"dpm_adaptive", "reference"}


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_passes_the_kit(solver):
    """The conformance kit (framework.testing) on model=gaussian, float64: the record's NFE is the
    number of model evaluations actually made, same seed → bit-identical output, and sample k is
    bit-identical whatever the batch size (except the batch-coupled adaptive solvers)."""
    overrides = [f"solver={solver}"] + STOCHASTIC.get(solver, [])
    res = testing.assert_solver_conforms(overrides, steps=6, batch_invariant=solver not in BATCH_COUPLED)
    assert torch.isfinite(res.latents).all()
    assert res.record["plugins"]["step"] == [solver]
    assert res.record["metrics"]["nfe"] >= 5  # at least one evaluation per step before the last
    assert math.isfinite(res.record["metrics"]["rmse_to_reference"])


def test_adaptive_solvers_are_batch_coupled_as_documented():
    with pytest.raises(AssertionError, match="between batch_size=3 and batch_size=1"):
        testing.assert_batch_invariant(["solver=dpm_adaptive"])


# The published DPM-Solver++(3M) mixes an O(h²) and an O(h³) error term: on the mixture its slope is
# 2.47 at 64→128, 2.37 at 128→256 and 2.20 at 256→512 (measured), so its order is checked there.
# Likewise plms/ipndm (fixed AB coefficients on the non-uniform grid) show 2.41 at 64→128 and 2.00 at
# 128→256 on the mixture.
ORDER_STEPS = {("dpmpp_3m_sde_eta0", "mixture"): (256, 512), ("plms", "mixture"): (128, 256),
               ("ipndm", "mixture"): (128, 256), ("ipndm_denoise", "mixture"): (128, 256),
               # ipndm_v's third-order term is exact only as the step ratios tend to 1: 2.55 / 2.74
               # at 64→128, 2.81 / 2.95 at 128→256 (gaussian / mixture)
               ("ipndm_v", "gaussian"): (128, 256), ("ipndm_v", "mixture"): (128, 256)}


def assert_case_order(case: str, model: str) -> None:
    solver, order, sched = ORDERS[case]
    testing.assert_order(solver + sched, order, model=model, steps=ORDER_STEPS.get((case, model), (64, 128)))


# The fast set checks one case per method family on the Gaussian and three on the mixture; the rest
# (same maths under another name or parameter, or the slower mixture runs) are marked slow.
FAST_GAUSSIAN = {"euler", "heun", "lms", "deis", "deis_tab", "dpmpp_2m", "dpmpp_3m_sde_eta0",
                 "dpmpp_3m_sde_eta0_taylor", "unipc_bh2"}
FAST_MIXTURE = {"euler", "dpmpp_2m", "unipc_bh2"}


def _cases(fast: set[str]) -> list:
    return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in ORDERS]


@pytest.mark.parametrize("case", _cases(FAST_GAUSSIAN))
def test_convergence_order_gaussian(case):
    assert_case_order(case, "gaussian")


@pytest.mark.parametrize("case", _cases(FAST_MIXTURE))
def test_convergence_order_mixture(case):
    assert_case_order(case, "mixture")


# ---------------------------------------------------------------------------------------------
# Stochastic solvers and churn
# ---------------------------------------------------------------------------------------------
GAUSS = ["model=gaussian", "dtype=float64", "steps=6"]


def test_eta_zero_ancestral_solvers_are_their_ode_solvers():
    base = GAUSS + ["num_samples=2", "batch_size=2"]
    assert torch.equal(run(base + ["solver=euler_ancestral", "solver.eta=0"]).latents, run(base + ["solver=euler"]).latents)
    assert torch.equal(run(base + ["solver=dpm_2_ancestral", "solver.eta=0"]).latents, run(base + ["solver=dpm_2"]).latents)


def test_ddpm_equals_euler_ancestral():
    base = GAUSS + ["num_samples=2", "batch_size=2"]
    a, b = run(base + ["solver=ddpm"]), run(base + ["solver=euler_ancestral"])
    assert torch.allclose(a.latents, b.latents, rtol=0, atol=1e-12)


def test_ipndm_v_order_2_is_lms_order_2_and_unipc_without_corrector_is_dpmpp_2m():
    """diff-sampler's variable-step AB2 is the exact one (lms integrates the same line in σ); its
    higher orders are not lms (tests/plugins/test_sampler_names.py)."""
    base = GAUSS + ["num_samples=2", "batch_size=2", "steps=12"]
    a = run(base + ["solver=ipndm_v", "solver.max_order=2"]).latents
    assert torch.allclose(a, run(base + ["solver=lms", "solver.order=2"]).latents, rtol=0, atol=1e-12)
    assert not torch.allclose(run(base + ["solver=ipndm_v"]).latents, run(base + ["solver=lms"]).latents, rtol=0, atol=1e-6)
    a = run(base + ["solver=unipc", "solver.corrector=false"]).latents
    assert torch.allclose(a, run(base + ["solver=dpmpp_2m"]).latents, rtol=0, atol=1e-12)


def test_reference_solver_matches_exact_gaussian_solution(monkeypatch, capsys):
    import framework.runs.progress as progress

    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # every right-hand side due a progress line
    res = run(GAUSS + ["solver=reference", "num_samples=2", "batch_size=2", "steps=2"])
    assert res.record["metrics"]["rmse_to_reference"] < 1e-8
    # its one long adaptive step says how far it got (the engine's progress counts steps only)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "samplerlab: reference: step from σ" in ln]
    assert lines and "of the way" in lines[-1] and lines[-1].endswith(" NFE"), lines[-3:]


def test_dpm_adaptive_tolerance_controls_error():
    base = GAUSS[:2] + ["solver=dpm_adaptive", "steps=2", "num_samples=2", "batch_size=2"]
    loose = run(base + ["solver.rtol=0.05"]).record["metrics"]
    tight = run(base + ["solver.rtol=1e-4", "solver.atol=1e-5"]).record["metrics"]
    assert tight["rmse_to_reference"] < loose["rmse_to_reference"] / 10
    assert tight["nfe"] > loose["nfe"]


def test_restart_adds_its_restart_evaluations():
    res = run(GAUSS[:2] + ["solver=restart", "steps=10", "num_samples=1", "batch_size=1",
                           "solver.restart_steps=3", "solver.k=2"])
    assert res.record["metrics"]["nfe"] == 2 * 10 - 1 + 2 * 3 * 2


def test_churn_zero_is_noop_and_churn_raises_sigma():
    base = GAUSS + ["num_samples=2", "batch_size=2", "solver=heun"]
    plain = run(base)
    zero = run(base + ["callback=[churn]"])
    assert torch.equal(plain.latents, zero.latents)
    churned = run(base + ["callback=[churn]", "callback.churn.s_churn=10", "callback.churn.s_tmin=0.05"])
    assert not torch.equal(plain.latents, churned.latents)
    again = run(base + ["callback=[churn]", "callback.churn.s_churn=10", "callback.churn.s_tmin=0.05", "batch_size=1"])
    assert torch.equal(churned.latents, again.latents)


CHURN = ["callback=[churn]", "callback.churn.s_churn=2", "callback.churn.s_tmin=0.05", "callback.churn.s_tmax=10"]


@pytest.fixture(scope="module")
def churned_heun() -> torch.Tensor:
    return run(["model=gaussian", "dtype=float64", "steps=16", "num_samples=2", "batch_size=2", "solver=heun"] + CHURN).latents


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"] + [pytest.param(s, marks=pytest.mark.slow)
                                                              for s in ("lms", "deis", "dpmpp_3m_sde")])
def test_churn_composes_with_multistep_solvers(solver, churned_heun):
    """Multistep history is read at the σ̂ where each evaluation was made and no solver discards the
    churn noise: the churned run lands nearer the churned Heun run (same noise) than its own
    unchurned run (measured 0.31–0.74 vs 1.5–2.3)."""
    base = ["model=gaussian", "dtype=float64", "steps=16", "num_samples=2", "batch_size=2", f"solver={solver}"]
    base += ["solver.eta=0"] if solver == "dpmpp_3m_sde" else []
    plain, churned = run(base).latents, run(base + CHURN).latents
    assert torch.isfinite(churned).all()
    assert (churned - churned_heun).abs().max() < (churned - plain).abs().max()


def test_churn_sigma_hat_is_edm_algorithm_2():
    from plugins.callback.churn import Churn

    c = Churn(s_churn=40, s_tmin=0.05, s_tmax=50)
    assert c.gamma(10.0, 20) == pytest.approx(math.sqrt(2) - 1)
    assert c.gamma(10.0, 400) == pytest.approx(0.1)
    assert c.gamma(60.0, 20) == 0 and c.gamma(0.01, 20) == 0
    with pytest.raises(ConfigError):
        Churn(s_churn=-1)


def test_bad_solver_parameters_are_config_errors():
    with pytest.raises(ConfigError, match=r"^solver=unipc\.variant: Invalid value 'bh3', expected one of \[bh1, bh2\]$"):
        run(GAUSS + ["solver=unipc", "solver.variant=bh3"])
    with pytest.raises(ConfigError, match="solver.order"):
        run(GAUSS + ["solver=lms", "solver.order=0"])


# ---------------------------------------------------------------------------------------------
# Parity with diffusers on the tiny SD model (float32, whole runs, CFG 4)
# ---------------------------------------------------------------------------------------------
PARITY_TOL = 1e-4
STEPS, PROMPTS, CFG = 6, ["a red circle", "a blue square"], 4.0


def max_diff(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, latent scale) — pass when diff ≤ 1e-4·max(1, scale), the convention of
    tests/models/test_parity.py's close()."""
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    return diff, scale


def custom_grid(sched, final_timestep: float | None = None) -> list[str]:
    """schedule=custom replaying a diffusers scheduler's σ grid and timesteps."""
    sig = [float(s) for s in sched.sigmas]
    ts = [float(t) for t in sched.timesteps] + [final_timestep]
    fmt = lambda v: "null" if v is None else repr(v)  # noqa: E731
    return ["schedule=custom", f"schedule.sigmas=[{','.join(map(fmt, sig))}]",
            f"schedule.timesteps=[{','.join(map(fmt, ts))}]", "schedule.init_noise=vp"]


def _parity_cases():
    from diffusers import (DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                           PNDMScheduler, UniPCMultistepScheduler)

    # name: (scheduler class, its config changes, our solver overrides, grid: "uniform*" or "custom", vp frame?)
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2),
                     ["solver=dpmpp_2m"], "custom", True),
        "dpmpp_3m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=3),
                     ["solver=dpmpp_3m_sde", "solver.eta=0", "solver.solver_type=midpoint"], "custom", True),
        "dpmpp_2m_heun": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="heun"),
                          ["solver=dpmpp_2m_sde", "solver.eta=0", "solver.solver_type=heun"], "custom", True),
        "lms": (LMSDiscreteScheduler, {}, ["solver=lms"], "uniform", False),
        "dpm_2": (KDPM2DiscreteScheduler, {}, ["solver=dpm_2"], "uniform", False),
        "plms": (PNDMScheduler, dict(skip_prk_steps=True), ["solver=plms"], "uniform_alpha0", True),
        "deis_3": (DEISMultistepScheduler, dict(solver_order=3), ["solver=deis"], "custom", True),
        "deis_2": (DEISMultistepScheduler, dict(solver_order=2), ["solver=deis", "solver.order=2"], "custom", True),
        "unipc_bh2": (UniPCMultistepScheduler, {}, ["solver=unipc"], "custom", True),
        # diffusers' bh1 returns NaN on a grid ending at 0 (B(h) = −h = −∞ times a zero residual at the
        # last step), so this pair ends at the training σ_min (final_sigmas_type="sigma_min")
        "unipc_bh1_3": (UniPCMultistepScheduler, dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
                        ["solver=unipc", "solver.variant=bh1", "solver.order=3"], "custom", True),
        "unipc_nocorrector": (UniPCMultistepScheduler, dict(disable_corrector=list(range(STEPS))),
                              ["solver=unipc", "solver.corrector=false"], "custom", True),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2),
                         ["solver=dpmpp_2m_sde"], "custom", True),
        "ddpm": (DDPMScheduler, {}, ["solver=ddpm"], "uniform", True),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, ["solver=euler_ancestral"], "uniform", False),
    }


PARITY = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_heun", "lms", "dpm_2", "plms", "deis_3", "deis_2", "unipc_bh2",
          "unipc_bh1_3", "unipc_nocorrector", "dpmpp_2m_sde", "ddpm", "euler_ancestral"]
NOISE_MODULES = {"ddpm": "diffusers.schedulers.scheduling_ddpm",
                 "dpmpp_2m_sde": "diffusers.schedulers.scheduling_dpmsolver_multistep",
                 "euler_ancestral": "diffusers.schedulers.scheduling_euler_ancestral_discrete"}


@pytest.fixture(scope="session")
def tiny_model(tiny_pipe):
    from framework.models.diffusers_sd import StableDiffusion

    return StableDiffusion(pipeline=tiny_pipe)


@pytest.mark.parametrize("case", PARITY)
def test_parity_with_diffusers(case, tiny_pipe, tiny_model, monkeypatch):
    import importlib

    from framework.models.base import vp_scale
    from tests.models.test_parity import hand_loop
    from tests.plugins.test_sampler_names import record_draws

    cls, changes, solver, grid, vp_frame = _parity_cases()[case]
    sched = cls.from_config(tiny_pipe.scheduler.config, **changes)
    sched.set_timesteps(STEPS)
    if grid == "custom":
        final_t = None if float(sched.sigmas[-1]) == 0 else 0.0
        schedule = custom_grid(sched, final_t)
    else:
        schedule = ["schedule=uniform"] + (["schedule.final=alpha0", "schedule.init_noise=vp"] if grid == "uniform_alpha0" else [])
        if case == "ddpm":
            schedule += ["schedule.init_noise=vp"]
    draws = record_draws(monkeypatch)
    res = run(schedule + solver + [f"steps={STEPS}", "num_samples=2", "batch_size=2", f"cfg_scale={CFG}",
                                   f"prompts=[{','.join(PROMPTS)}]"], model=tiny_model)
    ours = res.schedule
    if grid != "custom":  # the grid and initial noise are diffusers' own
        theirs = [float(s) for s in sched.sigmas] if hasattr(sched, "sigmas") else None
        if theirs is not None and case not in ("dpm_2",):
            assert list(ours.sigmas) == pytest.approx(theirs[: len(ours.sigmas)], rel=1e-6, abs=1e-7)
    if not vp_frame:
        assert ours.init_noise_scale == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    if case in NOISE_MODULES:  # replay our per-sample step noise inside diffusers
        replay = iter(draws[1:])
        module = importlib.import_module(NOISE_MODULES[case])
        monkeypatch.setattr(module, "randn_tensor",
                            lambda shape, **kw: next(replay, torch.zeros(shape)).to(kw.get("dtype") or torch.float32))
    start = res.x_T * vp_scale(ours.sigmas[0]) if vp_frame else res.x_T
    expected = hand_loop(tiny_pipe, sched, STEPS, start.clone(), PROMPTS, CFG)
    got = res.latents * vp_scale(ours.sigmas[-1]) if (vp_frame and ours.sigmas[-1] > 0) else res.latents
    diff, scale = max_diff(got, expected)
    print(f"parity {case}: max abs diff {diff:.3g} at latent scale {scale:.3g}")
    assert diff <= PARITY_TOL * scale
