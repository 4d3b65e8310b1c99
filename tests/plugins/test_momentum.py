"""The momentum family: exact equivalences with the multistep solvers and diffusers' schedulers
(float64, analytic models), base-solver identities, orders, and incompatible pairs."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, LMSDiscreteScheduler

from framework.entry.api import run
from framework.core.errors import ConfigError
from framework.plugin import hookimpl
from framework.models.analytic import Mixture
from framework.core.registry import CONF_DIR

MIX = ["model=mixture", "dtype=float64", "num_samples=4", "batch_size=4"]
GAUSS = ["model=gaussian", "dtype=float64", "num_samples=4", "batch_size=4"]
MOMENTUM = sorted(p.stem for p in (CONF_DIR / "momentum").glob("*.yaml"))


def maxdiff(a, b) -> float:
    return (a.latents - b.latents).abs().max().item()


@pytest.mark.parametrize("model", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_ddim_plus_multistep2_is_dpmpp_2m(model):
    base = model + ["steps=12"]
    assert maxdiff(run(base + ["solver=dpmpp_2m"]), run(base + ["solver=ddim", "momentum=[multistep]"])) <= 1e-12


@pytest.mark.parametrize("order", [2, 3, 4])
def test_euler_plus_multistep_sigma_is_lms(order):
    base = MIX + ["steps=10"]
    lms = run(base + ["solver=lms", f"solver.order={order}"])
    ours = run(base + ["solver=euler", "momentum=[multistep_sigma]", f"momentum.multistep_sigma.order={order}"])
    assert maxdiff(lms, ours) <= 1e-12


def diffusers_loop(scheduler, model: Mixture, x_T: torch.Tensor) -> torch.Tensor:
    """A diffusers scheduler driving the analytic model: VP latents in, ε out."""
    sig = scheduler.sigmas
    x_vp = x_T / math.sqrt(1 + float(sig[0]) ** 2)
    for i, t in enumerate(scheduler.timesteps):
        s = float(sig[i])
        x = x_vp * math.sqrt(1 + s * s) if isinstance(scheduler, DPMSolverMultistepScheduler) else x_vp
        d = model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        eps = (x - d) / s
        x_vp = scheduler.step(eps, t, x_vp).prev_sample
    return x_vp


SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.mark.parametrize("order,steps", [(2, 10), (3, 10), (3, 20)])
def test_multistep_matches_diffusers_dpmsolver_pp(order, steps):
    sched = DPMSolverMultistepScheduler(**SD, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint")
    sched.set_timesteps(steps)
    grid = [float(s) for s in sched.sigmas]
    ours = run(MIX + ["solver=ddim", "momentum=[multistep]", f"momentum.multistep.order={order}", "schedule=custom",
                      f"schedule.sigmas=[{','.join(repr(s) for s in grid)}]", f"steps={steps}"])
    theirs = diffusers_loop(sched, Mixture(), ours.x_T.clone())
    assert (ours.latents - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("order", [2, 3, 4])
def test_multistep_sigma_matches_diffusers_lms(order):
    sched = LMSDiscreteScheduler(**SD)
    sched.set_timesteps(10)
    grid = [float(s) for s in sched.sigmas]
    ours = run(MIX + ["solver=euler", "momentum=[multistep_sigma]", f"momentum.multistep_sigma.order={order}",
                      "schedule=custom", f"schedule.sigmas=[{','.join(repr(s) for s in grid)}]", "steps=10"])
    x = ours.x_T.clone()
    model = Mixture()
    for i, t in enumerate(sched.timesteps):
        s = float(sched.sigmas[i])
        eps = (x - model(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s
        x = sched.step(eps, t, x, order=order).prev_sample
    assert (ours.latents - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        ["momentum=[heavy_ball]", "momentum.heavy_ball.beta=0.0"],
        ["momentum=[nesterov]", "momentum.nesterov.beta=0.0"],
        ["momentum=[ghvb]", "momentum.ghvb.beta=0.0", "momentum.ghvb.order=1"],
        ["momentum=[gradient_estimation]", "momentum.gradient_estimation.gamma=1.0"],
        ["momentum=[multistep]", "momentum.multistep.order=1"],
        ["momentum=[multistep_sigma]", "momentum.multistep_sigma.order=1"],
        ["momentum=[adam]", "momentum.adam.beta=0.0", "momentum.adam.beta2=0.0"],
    ],
    ids=lambda o: o[0],
)
@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_zero_weight_is_the_base_solver_exactly(overrides, solver):
    base = MIX + ["steps=8", f"solver={solver}"]
    assert torch.equal(run(base).latents, run(base + overrides).latents)


@pytest.mark.parametrize("name", MOMENTUM)
def test_every_momentum_plugin_changes_the_trajectory_and_rejects_heun(name):
    base = MIX + ["steps=8", "solver=euler"]
    assert not torch.equal(run(base).latents, run(base + [f"momentum=[{name}]"]).latents)
    with pytest.raises(ConfigError, match=f"momentum {name} does not compose with solver=heun"):
        run(MIX + ["solver=heun", f"momentum=[{name}]"])


def slope(overrides: list[str]) -> float:
    base = GAUSS + ["solver=ddim"] + overrides
    e = [run(base + [f"steps={n}"]).record["metrics"]["rmse_to_reference"] for n in (64, 128)]
    return math.log2(e[0] / e[1])


@pytest.mark.parametrize(
    "overrides,order",
    [
        (["momentum=[multistep]", "momentum.multistep.order=2"], 2),
        # the published DPM-Solver++(3M) update (diffusers', matched above) halves the second-difference
        # term a Taylor expansion needs: it converges with order 2 (measured 1.77 over 64→128 here)
        (["momentum=[multistep]", "momentum.multistep.order=3"], 2),
        (["momentum=[multistep,unipc_corrector]", "momentum.multistep.order=2", "momentum.unipc_corrector.order=2"], 3),
        (["momentum=[ghvb]", "momentum.ghvb.order=2", "momentum.ghvb.beta=0.0", "solver=euler"], 2),
        (["momentum=[heavy_ball]", "momentum.heavy_ball.beta=0.5"], 1),
        # γ = 2 extrapolates d to 2d_i − d_{i−1}: still first order (0.92 at 64→128; 0.96 at 128→256)
        (["momentum=[gradient_estimation]"], 1),
        (["momentum=[gradient_estimation]", "momentum.gradient_estimation.final=denoise"], 1),
    ],
    ids=["multistep2", "multistep3", "multistep2+unic2", "ghvb2_beta0", "heavy_ball", "gradient_estimation",
         "gradient_estimation_final_denoise"],
)
def test_convergence_order(overrides, order):
    assert slope(overrides) == pytest.approx(order, abs=0.3)


class Recording(Mixture):
    """The mixture, keeping every evaluation (x, σ, D) the run makes (no reference solution)."""

    exact_solution = None

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma):
        out = super().__call__(x, sigma)
        self.calls.append((x.clone(), sigma.clone(), out.clone()))
        return out


@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_gradient_estimation_final_denoise_changes_only_the_step_to_zero(solver):
    """final=denoise (ComfyUI's convention) leaves the step onto σ = 0 uncorrected, so the run ends
    on D of its last evaluation; every evaluation before is the corrected trajectory's
    (tests/plugins/test_sampler_names.py pins the whole run against ComfyUI's algorithm)."""
    base = [o for o in MIX if not o.startswith("model=")] + ["steps=8", f"solver={solver}", "momentum=[gradient_estimation]"]
    runs = {}
    for final in ("corrected", "denoise"):
        model = Recording()
        runs[final] = (run(base + [f"momentum.gradient_estimation.final={final}"], model=model), model.calls)
    (a, ca), (b, cb) = runs["corrected"], runs["denoise"]
    assert len(ca) == len(cb) == 8
    assert all(torch.equal(x, y) and torch.equal(s, t) for (x, s, _), (y, t, _) in zip(ca, cb))
    assert torch.equal(b.latents, cb[-1][2])
    assert 1e-8 < (a.latents - b.latents).abs().max().item() < 1e-2


def test_optimize_sgd_is_euler_and_sgd_momentum_is_heavy_ball():
    base = MIX + ["steps=10"]
    assert maxdiff(run(base + ["solver=euler"]), run(base + ["solver=optimize"])) <= 1e-14
    hb = run(base + ["solver=euler", "momentum=[heavy_ball]", "momentum.heavy_ball.beta=0.5"])
    assert maxdiff(hb, run(base + ["solver=optimize", "solver.momentum=0.5"])) <= 1e-13


def test_optimize_adam_takes_normalised_steps():
    res = run(MIX + ["steps=10", "solver=optimize", "solver.optimizer=adam"])
    assert torch.isfinite(res.latents).all()
    assert res.record["metrics"]["nfe"] == 10
    assert maxdiff(res, run(MIX + ["steps=10", "solver=euler"])) > 1.0  # not an ODE step any more


# --- solver=distill (score-distillation style) --------------------------------------------------
DISTILL = ["solver=distill"]


def test_distill_sgd_lr1_is_the_renoise_denoise_recursion_on_the_gaussian():
    """Exact reference: with SGD at lr 1 and w = 1, z_{i+1} = D(z_i + σ_i·ε_i, σ_i) with the run's
    own per-sample noise (z_0 = the unit start noise); on N(0, 1) D(x, σ) = x/(1 + σ²)."""
    from framework.core.noise import SampleNoise

    res = run(GAUSS + DISTILL + ["steps=8"])
    assert res.record["metrics"]["nfe"] == 8  # one guided evaluation per iteration, counted by the engine
    noise = SampleNoise(0, range(4), (16,), torch.device("cpu"), torch.float64)
    z = noise.draw()
    assert torch.allclose(z, res.x_T / res.schedule.init_noise_scale, rtol=1e-15, atol=0)
    for sigma in res.schedule.sigmas[:-1]:
        z = (z + sigma * noise.draw()) / (1 + sigma**2)
    assert (res.latents - z).abs().max().item() <= 1e-12


def nearest_mean_distance(model: Mixture, z: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z.double(), model.means.double()).min(1).values


@pytest.mark.parametrize("extra", [[], ["solver.optimizer=adam", "solver.lr=0.2"],
                                   ["solver.momentum=0.5", "solver.lr=0.8", "solver.weight_power=-0.5"]],
                         ids=["sgd", "adam", "sgd_momentum_weighted"])
def test_distill_moves_latents_to_the_mixture_modes(extra):
    res = run(MIX + DISTILL + extra + ["steps=20", "num_samples=64", "batch_size=64"])
    model = Mixture()
    start = nearest_mean_distance(model, res.x_T / res.schedule.init_noise_scale).mean().item()
    end = nearest_mean_distance(model, res.latents).mean().item()
    assert end < 0.8 * start, (start, end)  # measured: start 3.9; sgd 0.8, adam 2.1, sgd+momentum 1.3


def test_distill_is_deterministic_for_a_seed():
    base = GAUSS + DISTILL + ["steps=6", "solver.optimizer=adam", "solver.lr=0.3"]
    a, b = run(base), run(base)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, run(base + ["seed=1"]).latents)


def test_distill_is_mode_seeking_on_the_mixture():
    """The documented failure mode, measured: SDS at lr 1 shrinks each mode (a Gaussian's variance
    tends to s²/2), so samples sit closer to the means than true samples or the ODE's."""
    base = MIX + ["steps=20", "num_samples=256", "batch_size=256"]
    model = Mixture()
    ode = nearest_mean_distance(model, run(base + ["solver=euler"]).latents).mean().item()
    sds = nearest_mean_distance(model, run(base + DISTILL).latents).mean().item()
    assert sds < 0.85 * ode, (sds, ode)  # measured 0.84 vs 1.23


def test_distill_composes_with_loss_guidance(tiny_overrides):
    base = tiny_overrides + DISTILL + ["steps=6", "num_samples=2", "batch_size=2", "prompts=[a red circle]"]
    plain = run(base)
    blue = run(base + ["guidance=[cfg,color_loss]", "guidance.color_loss.every=1", "guidance.color_loss.scale=2000",
                 "guidance.color_loss.normalize=false", "guidance.color_loss.sigma_hi=null"])
    assert blue.record["metrics"]["nfe"] == plain.record["metrics"]["nfe"] == 6
    gain = (blue.images[:, 2].mean() - plain.images[:, 2].mean()).item()
    assert gain > 0.03, gain


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["solver=optimize", "+solver.mode=distill"], "unknown parameter\\(s\\) mode"),  # one algorithm per class
        (["solver=optimize", "+solver.weight_power=1"], "unknown parameter\\(s\\) weight_power"),
        (["solver=optimize", "solver.optimizer=lbfgs"], "expected one of \\[sgd, adam\\]"),
        (["solver=optimize", "solver.lr=0"], "solver.lr must be > 0"),
        (DISTILL + ["solver.lr=0"], "solver.lr must be > 0"),
        (DISTILL + ["callback=[churn]", "callback.churn.s_churn=1"], "solver=distill re-noises .* \\(churn\\)"),
        (DISTILL + ["momentum=[heavy_ball]"], "does not compose with solver=distill"),
        (["solver=optimize", "momentum=[heavy_ball]"], "does not compose with solver=optimize"),
    ],
)
def test_optimize_and_distill_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        run(MIX + ["steps=4"] + overrides)


# --- compatibility is a trait of the solver class, not of its config name ------------------------
class RenamedEuler:
    """A third-party single-evaluation solver: the Euler step under another class, with the trait."""

    steps_along_denoised = True

    @hookimpl
    def step(self, state, denoise):
        return state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative


class UntraitedEuler:
    """The same step without the trait: momentum cannot know it steps along D."""

    @hookimpl
    def step(self, state, denoise):
        return state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative


def test_momentum_compatibility_is_the_solver_class_trait():
    hb = MIX + ["steps=8", "momentum=[heavy_ball]"]
    ours = run(hb + ["solver=heun", f"solver._target_={__name__}.RenamedEuler"])  # any config name
    assert torch.equal(ours.latents, run(hb + ["solver=euler"]).latents)
    with pytest.raises(ConfigError, match="momentum heavy_ball does not compose with solver=euler: .*steps along D"):
        run(hb + ["solver=euler", f"solver._target_={__name__}.UntraitedEuler"])
